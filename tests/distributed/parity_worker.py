"""2-rank parity worker: run under ``torchrun --nproc_per_node 2``.

For every optimizer name given, K steps of a tiny LLaMA on 2 ranks (DDP and FSDP2, each rank half of the
global batch) are compared with 1 process on the full global batch. Rank 0 writes a JSON result per
(optimizer, engine): the max relative parameter difference, the per-rank state bytes, or the error raised.
"""
import argparse
import json
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import memtrain
from memtrain.hf.engines import end_process_group
from memtrain.optim import sharding
from memtrain.optim.registry import get_spec
from memtrain.hf.metrics import optimizer_state_bytes, storage_bytes
from tests.optim_table import BY_NAME
from tests.distributed.launch import leave

STEPS, LR, GLOBAL_BATCH, LENGTH, VOCAB = 4, 3e-3, 8, 16, 64
#: Options that make each method do its real work on this tiny model (the optimizer table's kwargs): a true low rank
#: and a projector refresh inside the K steps (galore, fira, apollo); a threshold under the model's largest tensors
#: (64×32, 48×32) so that adam4bit quantises them instead of keeping every tensor in fp32. muon orthogonalises in
#: fp32 here: in bf16 (its default) the last-bit differences of an averaged gradient become bf16 roundings (measured
#: 2.5e-3), the bf16 noise floor rather than a distributed error.
#:
#: galore and fira fix each basis vector's sign (``sign_fix``) so that "2 ranks equal 1 process" is a
#: well-conditioned comparison. The moments are carried across a refresh in the old basis' coordinates, so a basis
#: vector that comes back negated changes the next update by O(1); and LAPACK's SVD has no sign convention that is
#: continuous in its input. The 2-rank gradient differs from one process's in the last bits (reduction order, 1e-6
#: relative), and for layerwise_worker.py's layers.1.k_proj gradient at the step-3 refresh that negates the 8th
#: left singular vector (6 of 50 random 1e-6 perturbations of that G do): 2.2e-2 instead of 1e-6 (measured; which
#: run and which vector depends on the CPU). Largest-entry-positive is stable there: no flip in 11,200 perturbed
#: basis vectors of that run's 28 refreshes.
OPTIONS = {name: BY_NAME[name].kwargs for name in ("galore", "fira", "adam4bit", "apollo", "apollo_mini")}
OPTIONS["muon"] = {"ns_dtype": "float32"}
for name in ("galore", "fira"):
    OPTIONS[name] = {**OPTIONS[name], "sign_fix": True}


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(config)


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def local_part(batch, rank, world):
    n = GLOBAL_BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def train(model, opt, rank, world):
    for step in range(STEPS):
        model(**local_part(global_batch(step), rank, world)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def fully_shard_units(model, units, world):
    """FSDP2 as accelerate's config applies it: ``fully_shard`` each unit (the decoder layers), then the root."""
    mesh = init_device_mesh("cpu", (world,))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "FSDP2 did not shard the parameters"
    return model


def run_ddp(name, rank, world, options, spread=False):
    """DDP training; with ``spread``, also how many matrix updates this rank computed (its update/update_batch)."""
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, name, lr=LR, weight_decay=0.01, **options)
    computed = [0]
    if spread:
        opt.spread_over_ranks()
        update, update_batch = opt.update, opt.update_batch

        def counted_update(param, *rest):
            computed[0] += 1
            return update(param, *rest)

        def counted_batch(params, *rest):
            computed[0] += len(params)
            return update_batch(params, *rest)

        opt.update, opt.update_batch = counted_update, counted_batch
    train(DistributedDataParallel(model), opt, rank, world)
    return model, opt, computed[0]


def run_case(name, engine, rank, world, options):
    reference = tiny_llama()
    train(reference, memtrain.build_optimizer(reference, name, lr=LR, weight_decay=0.01, **options), 0, 1)
    sharding.COMM.clear()
    extra = {}
    if engine == "fsdp2":
        model = tiny_llama()
        wrapped = fully_shard_units(model, model.model.layers, world)  # before the optimizer: it swaps the params
        opt = memtrain.build_optimizer(model, name, lr=LR, weight_decay=0.01, **options)
        train(wrapped, opt, rank, world)
    else:
        model, opt, computed = run_ddp(name, rank, world, options, spread=engine == "ddp-spread")
    comm = dict(sharding.COMM)
    if engine == "ddp-spread":  # against DDP without spreading: bitwise, on every rank
        plain = run_ddp(name, rank, world, options)[0]
        equal = all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
        owned = [p for g in opt.param_groups if g["method"] == opt.name for p in g["params"]]
        mine = torch.tensor([equal, computed], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        extra = {"bitwise_equal_to_ddp": all(bool(t[0]) for t in every),
                 "matrices_updated_per_rank": [int(t[1]) for t in every],
                 "matrices": len(owned) * STEPS, "matrix_bytes": sum(p.numel() * p.element_size() for p in owned)}
    worst = 0.0
    for a, b in zip(model.parameters(), reference.parameters()):
        a = full(a.detach())
        rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
    # Replicated state: plain tensors kept for sharded parameters (identical on every rank, saved once).
    replicated = storage_bytes(t for s in opt.state.values() for t in s.values()
                               if torch.is_tensor(t) and not isinstance(t, DTensor)) if engine == "fsdp2" else 0
    state = torch.tensor([optimizer_state_bytes(opt), replicated], dtype=torch.int64)
    states = [torch.zeros_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    return {"max_rel_diff": worst, "state_bytes_per_rank": [int(s[0]) for s in states],
            "replicated_state_bytes_per_rank": [int(s[1]) for s in states],
            "comm_bytes_per_step": {k: v / STEPS for k, v in comm.items()}, **extra}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--optims", default=",".join(memtrain.optimizer_names()))
    parser.add_argument("--engines", default="ddp,fsdp2")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    try:
        for name in args.optims.split(","):
            spreads = getattr(get_spec(name).cls, "spreads", False)
            for engine in args.engines.split(",") + (["ddp-spread"] if spreads else []):
                try:
                    results[f"{name}/{engine}"] = run_case(name, engine, rank, world, OPTIONS.get(name, {}))
                except Exception as e:  # recorded, so one refusal does not hide the other cases
                    results[f"{name}/{engine}"] = {"error": f"{type(e).__name__}: {e}",
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
