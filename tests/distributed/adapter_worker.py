"""2-rank adapter parity worker: run under ``torchrun --nproc_per_node 2``.

For every adapter case, K steps of a tiny LLaMA with PEFT LoRA on 2 ranks (DDP, and FSDP2 with block-level units:
``fully_shard`` on the decoder layers and the root, so each LoRA layer lies inside one unit, docs/distributed.md)
are compared with 1 process on the full global batch. Rank 0 writes one JSON result per (case, engine).
"""
import argparse
import json
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel

from memtrain import adapters
from memtrain.hf.engines import end_process_group
from memtrain.optim import sharding
from memtrain.hf.metrics import optimizer_state_bytes

from tests.distributed.parity_worker import LR, full, fully_shard_units, tiny_llama, train
from tests.distributed.launch import leave

#: name -> (adapter, adapter options). LoRA factors start random (``init_lora_weights=False``) so that B ≠ 0
#: and every term of the methods is exercised from step 1.
CASES = {
    "lora": ("lora", {}),
    "lorapro": ("lorapro", {}),
    "lorapro_efficient": ("lorapro", {"mode": "efficient"}),
    "allora": ("allora", {}),
    "allora_factor_rows": ("allora", {"norm_target": "factor_rows"}),
    "gradnormlorp": ("gradnormlorp", {"update_proj_gap": 2}),
}


def peft_model(adapter, options):
    alpha = 4 if adapter == "allora" else 8  # ALLoRA has no α/r scaling: its config requires α = r
    base = LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = tiny_llama()
    torch.manual_seed(1)
    return adapters.wrap(model, adapter, adapters.lora_config(adapter, base=base, **options))


def run_case(case, engine, rank, world):
    adapter, options = CASES[case]
    reference = peft_model(adapter, options)
    train(reference, adapters.create_optimizer(adapter, reference, lr=LR, weight_decay=0.01, **options), 0, 1)
    model = peft_model(adapter, options)
    if engine == "fsdp2":
        wrapped = fully_shard_units(model, model.base_model.model.model.layers, world)
    else:
        wrapped = DistributedDataParallel(model)
    opt = adapters.create_optimizer(adapter, model, lr=LR, weight_decay=0.01, **options)
    sharding.COMM.clear()
    train(wrapped, opt, rank, world)
    worst = 0.0
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        if a.requires_grad:
            a = full(a.detach())
            worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    state = torch.tensor([optimizer_state_bytes(opt)], dtype=torch.int64)
    states = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    return {"max_rel_diff": worst, "state_bytes_per_rank": [int(s) for s in states],
            "comm_bytes": dict(sharding.COMM)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--engines", default="ddp,fsdp2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    try:
        for case in args.cases.split(","):
            for engine in args.engines.split(","):
                try:
                    results[f"{case}/{engine}"] = run_case(case, engine, rank, world)
                except Exception as e:  # recorded, so one refusal does not hide the other cases
                    results[f"{case}/{engine}"] = {"error": f"{type(e).__name__}: {e}",
                                                   "trace": traceback.format_exc()[-2000:]}
                dist.barrier()
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        end_process_group()


if __name__ == "__main__":
    main()
    leave()
