"""Worker for test_layerwise_ddp.py (``--engine ddp``) and test_layerwise_fsdp2.py (``--engine fsdp2``), launched
by torchrun with 2 gloo ranks.

For every registered optimizer and accumulation 1 and 2, three steps of a tiny LLaMA: layer-wise release on the
engine, standard training on the same engine done the same way, and one process on the global batch. Rank 0 writes
the parameter differences, the logged gradient norms and whether every gradient was released to ``--out``.

* ddp: the layer-wise backward runs under ``no_sync``; each hook all-reduces its gradient.
* fsdp2: ``fully_shard`` per decoder layer and the root (as parity_worker.py); the hooks get FSDP2's reduce-scattered
  shards. Accumulation 2 runs both ways FSDP2 accumulates: reduce-scatter on every micro-batch (the sharded
  gradients accumulate; the gate leaves them alone) and ``set_requires_gradient_sync(False)`` on the first (what
  accelerate's ``no_sync`` does; FSDP2 then reduce-scatters once, on the last). Also: per-parameter clipping, the
  peak of live sharded gradient storage, and a model whose 1-row layer leaves rank 1 an empty shard.
"""
import argparse
import contextlib
import datetime
import json
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import memtrain
from memtrain.hf.engines import end_process_group
from memtrain.hf.metrics import storage_bytes
from tests.conftest import VOCAB, lm_batch, tiny_llama
from tests.distributed.parity_worker import OPTIONS, full, fully_shard_units
from tests.distributed.launch import leave

GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-2
#: parity_worker's options (a true low rank and a refresh inside the steps, galore/fira sign-fixed), except
#: adam4bit's low threshold: with quantised moments a last-bit difference of the reduced gradient (reduction order)
#: can move a code across a quantisation boundary, and the run then differs from 1 process by 4e-4 (measured, on
#: DDP as on FSDP2), while layer-wise and standard training stay bitwise equal.
METHOD_OPTIONS = {name: options for name, options in OPTIONS.items() if name != "adam4bit"}


class OneRow(torch.nn.Module):
    """A 1-row output layer: FSDP2 on 2 ranks leaves rank 1 an empty shard of its weight [1, 24] and bias [1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(VOCAB, 24)
        self.out = torch.nn.Linear(24, 1)

    def forward(self, input_ids, labels):
        x = torch.nn.functional.one_hot(input_ids, VOCAB).float().mean(dim=1)
        return SimpleNamespace(loss=self.out(torch.tanh(self.hidden(x))).square().mean())


def train(name, engine, *, layerwise, accumulation=1, defer_reduce=False, clip=0.0, one_row=False):
    """Parameters after STEPS steps (full tensors), the gradient norm of each step, whether no ``.grad`` was left
    after any step's last backward, and the peak / largest single storage of live gradients (record hook)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if engine != "single" else (0, 1)
    model = OneRow() if one_row else tiny_llama()
    wrapped = model
    if engine == "ddp":
        wrapped = DDP(model)
    elif engine == "fsdp2":
        fully_shard_units(model, [model.hidden, model.out] if one_row else model.model.layers, world)
    params = list(model.parameters())
    peak, largest = [0], [0]

    def record(param):  # registered before the release hooks: sees each gradient before it is freed
        peak[0] = max(peak[0], storage_bytes(p.grad for p in params if p.grad is not None))
        largest[0] = max(largest[0], storage_bytes([param.grad]))

    for p in params:
        p.register_post_accumulate_grad_hook(record)
    opt = memtrain.build_optimizer(model, name, lr=LR, weight_decay=0.01, layerwise=layerwise, layerwise_clip=clip,
                                   **METHOD_OPTIONS.get(name, {}))
    share = GLOBAL_BATCH // world
    norms, released = [], True
    for step in range(STEPS):
        for micro in range(accumulation):
            batch = lm_batch(100 * step + micro, batch=GLOBAL_BATCH)
            batch = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
            last = micro == accumulation - 1
            if layerwise:
                opt.is_last_microbatch = last
            context = contextlib.nullcontext()
            if engine == "ddp" and (layerwise or not last):
                context = wrapped.no_sync()  # layer-wise: the hooks reduce each gradient themselves
            elif engine == "fsdp2":
                model.set_requires_gradient_sync(last or not defer_reduce)
            with context:
                (wrapped(**batch).loss / accumulation).backward()
        if layerwise:
            released &= all(p.grad is None for p in params)
        else:
            if engine == "single":
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())
            for p in params if clip else []:  # the reference: clip each parameter's gradient on its own
                torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        if layerwise:
            norms.append(opt.last_grad_norm.item())
        opt.zero_grad(set_to_none=True)
    return {"params": [full(p.detach()).clone() for p in params], "norms": norms, "released": released,
            "peak": peak[0], "largest": largest[0]}


def compare(a, b):
    """Largest absolute and relative (‖a − b‖ / ‖b‖) difference over the parameters."""
    return {"abs": max((x - y).abs().max().item() for x, y in zip(a["params"], b["params"])),
            "rel": max(((x - y).norm() / y.norm().clamp_min(1e-12)).item() for x, y in zip(a["params"], b["params"]))}


def replicas_identical(run):
    flat = torch.cat([p.flatten() for p in run["params"]])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def case(name, engine, accumulation, defer_reduce=False, clip=0.0, one_row=False):
    opts = dict(accumulation=accumulation, clip=clip, one_row=one_row)
    layerwise = train(name, engine, layerwise=True, defer_reduce=defer_reduce, **opts)
    standard = train(name, engine, layerwise=False, defer_reduce=defer_reduce, **opts)
    single = train(name, "single", layerwise=False, **opts)
    return {"name": name, "engine": engine, "accumulation": accumulation, "defer_reduce": defer_reduce,
            "clip": clip, "one_row": one_row, "released": layerwise["released"],
            "vs_standard": compare(layerwise, standard), "vs_single": compare(layerwise, single),
            "norms": [layerwise["norms"], single["norms"]], "replicas_identical": replicas_identical(layerwise),
            "peak_gradient_bytes": [layerwise["peak"], standard["peak"]], "largest_gradient_bytes": layerwise["largest"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    results = []
    try:
        for name in memtrain.optimizer_names():
            results.append(case(name, args.engine, 1))
            results.append(case(name, args.engine, 2))
            if args.engine == "fsdp2":
                results.append(case(name, args.engine, 2, defer_reduce=True))
                results.append(case(name, args.engine, 1, one_row=True))
        if args.engine == "fsdp2":
            results.append(case("adamw", args.engine, 2, clip=0.05))
            results.append(case("galore", args.engine, 1, clip=0.05))
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(results, f)
    finally:
        end_process_group()


if __name__ == "__main__":
    main()
    leave()
