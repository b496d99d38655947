"""2-rank FSDP2 worker for test_estimate_fsdp2.py: run under ``torchrun --nproc_per_node 2``.

Each rank runs memtrain estimate's training steps on real llama-tiny tensors, sharded by ``fully_shard`` over gloo,
and rank 0 writes every rank's exact optimizer-state bytes and tracked peak per optimizer (or the error raised).
"""
import argparse
import json
import traceback

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from memtrain import estimate
from tests.distributed.launch import leave


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--optims", required=True)
    parser.add_argument("--layerwise", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name in args.optims.split(","):
        setup = estimate.Setup(model="llama-tiny", optim=name, batch_size=2, seq_len=64, engine="fsdp2",
                               world_size=world, layerwise=args.layerwise)
        try:
            r = estimate.measure(setup, fake=False, mesh=mesh)
            local = {k: r[k] for k in ("optimizer_state_bytes", "total", "state", "params", "phase")}
        except Exception:
            local = {"error": traceback.format_exc()}
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        results[name] = gathered
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
    leave()
