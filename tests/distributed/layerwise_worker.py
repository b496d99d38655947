"""Worker for test_layerwise_ddp.py, launched by torchrun with 2 gloo ranks.

For every registered optimizer and accumulation 1 and 2, three steps of: (a) layer-wise release under DDP
(backward under ``no_sync``; each hook all-reduces its gradient), (b) standard DDP, (c) one process on the
global batch. Writes the max-abs parameter differences (and whether the replicas are bitwise identical) to the
JSON file named by ``LAYERWISE_DDP_OUT``.
"""
import datetime
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import memtrain
from tests.conftest import lm_batch, tiny_llama

GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-2


def train(name, mode, accumulation, rank, world):
    model = tiny_llama()
    ddp = DDP(model) if mode != "single" else None
    opt = memtrain.build_optimizer(model, name, lr=LR, weight_decay=0.01, layerwise=mode == "layerwise")
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        for micro in range(accumulation):
            batch = lm_batch(100 * step + micro, batch=GLOBAL_BATCH)
            if mode == "single":
                (model(**batch).loss / accumulation).backward()
                continue
            local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
            last = micro == accumulation - 1
            if mode == "layerwise":
                opt.is_last_microbatch = last
                with ddp.no_sync():  # the hooks reduce each gradient themselves
                    (ddp(**local).loss / accumulation).backward()
            elif last:
                (ddp(**local).loss / accumulation).backward()
            else:
                with ddp.no_sync():
                    (ddp(**local).loss / accumulation).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    try:
        for name in memtrain.optimizer_names():
            for accumulation in (1, 2):
                layerwise = train(name, "layerwise", accumulation, rank, world)
                standard = train(name, "standard", accumulation, rank, world)
                single = train(name, "single", accumulation, rank, world)
                flat = torch.cat([p.flatten() for p in layerwise])
                gathered = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(gathered, flat)
                results.append({
                    "name": name, "accumulation": accumulation,
                    "vs_standard_ddp": max((a - b).abs().max().item() for a, b in zip(layerwise, standard)),
                    "vs_single_process": max((a - b).abs().max().item() for a, b in zip(layerwise, single)),
                    "replicas_identical": all(torch.equal(g, gathered[0]) for g in gathered),
                })
        if rank == 0:
            with open(os.environ["LAYERWISE_DDP_OUT"], "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
