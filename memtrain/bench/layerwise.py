"""Measure what layer-wise gradient release saves: peak live gradient bytes (counted exactly by hooks) and
peak process memory (CUDA max allocated on GPU; peak RSS on CPU, coarse), with and without release.

    memtrain bench layerwise --model llama-20m --optims adamw galore:rank=64 --steps 4
    memtrain bench layerwise --fsdp2 2 --model llama-20m --optims adamw   # FSDP2 on 2 ranks (torchrun)

Each configuration runs in a fresh process (group) through :mod:`.runner`, so peak RSS is not inherited from an
earlier run and a finished configuration is not measured again. Prints a
markdown table (and writes it with --out). Gradient bytes are those of the distinct storages behind the live
``.grad`` tensors: under FSDP2 a unit's gradient shards are views of one reduce-scatter buffer, alive until the
last of them is released, so "largest gradient" is the largest such buffer (one FSDP unit's shards). With
``--fsdp2`` every byte count is per rank ("rank 0 / rank 1 / ..."); each rank trains on ``--batch`` sequences.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import runner


def measure(model_name: str, optim: str, layerwise: bool, steps: int, batch: int, seq_len: int,
            fsdp2: bool = False) -> dict:
    import resource

    import torch

    import memtrain
    from memtrain.optim.sharding import local
    from memtrain.hf.metrics import optimizer_state_bytes, storage_bytes
    from memtrain.recipes.models import build_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name).to(device)
    if fsdp2:  # as the fsdp2 engine config: each decoder layer is an FSDP unit, the root another
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(dist.get_rank())
            model = model.to(torch.cuda.current_device())
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    peak, largest = [0], [0]

    # Registered before the release hooks, so each call sees the gradient that just became final before it is
    # freed: the storage behind the live ``.grad`` tensors at that moment is the gradient memory held then.
    def record(param):
        peak[0] = max(peak[0], storage_bytes(p.grad for p in params if p.grad is not None))
        largest[0] = max(largest[0], storage_bytes([param.grad]))

    for p in params:
        p.register_post_accumulate_grad_hook(record)
    name, _, args = optim.partition(":")
    options = memtrain.parse_optim_args(name, args.replace(";", ","))
    opt = memtrain.build_optimizer(model, name, lr=1e-3, layerwise=layerwise, **options)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak_memory, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak_memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
    out = {
        "model": model_name, "optim": optim, "layerwise": layerwise, "peak_memory_kind": kind,
        "parameters": sum(p.numel() for p in params),
        "all_gradient_bytes": sum(local(p).numel() * p.element_size() for p in params),
        "largest_gradient_bytes": largest[0],
        "peak_live_gradient_bytes": peak[0],
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "peak_memory_bytes": peak_memory,
    }
    if fsdp2:  # every byte count as a list over ranks
        counts = [k for k, v in out.items() if k.endswith("_bytes")]
        mine = torch.tensor([out[k] for k in counts], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        out |= {k: [int(g[i]) for g in gathered] for i, k in enumerate(counts)}
        if dist.get_rank() != 0:
            out = None
        dist.destroy_process_group()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--optims", nargs="+", default=["adamw", "galore"],
                        help="name[:k=v;k=v] (';' separates options inside one entry)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--fsdp2", type=int, default=0, metavar="RANKS",
                        help="shard with FSDP2 over this many ranks (torchrun; gloo on CPU, nccl on GPUs)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--work_dir", default="out/bench_layerwise", help="each configuration's report.json")
    parser.add_argument("--no_resume", action="store_true", help="re-run finished configurations too")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a._one:  # child process (runner.Job): one configuration, its report.json in --output_dir
        optim, layerwise = json.loads(a._one)
        result = measure(a.model, optim, layerwise, a.steps, a.batch, a.seq_len, fsdp2=bool(a.fsdp2))
        if result is not None:
            Path(a.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(a.output_dir) / "report.json").write_text(json.dumps(result))
        return
    common = ["--model", a.model, "--steps", str(a.steps), "--batch", str(a.batch), "--seq_len", str(a.seq_len),
              "--fsdp2", str(a.fsdp2)]
    jobs = [runner.Job(("bench", "layerwise"), (*common, "--_one", json.dumps([optim, layerwise])),
                       Path(a.work_dir) / runner.slug(f"{a.model}-{optim}-{'layerwise' if layerwise else 'plain'}"
                                                      f"-fsdp{a.fsdp2}"),
                       label=f"{optim}{' layer-wise' if layerwise else ''}", ranks=a.fsdp2 or None)
            for optim in a.optims for layerwise in (False, True)]
    rows = runner.run_all(jobs, resume=not a.no_resume)
    failed = [(j.label, r["error"]) for j, r in zip(jobs, rows) if "error" in r]
    if failed:
        raise RuntimeError("layer-wise measurement failed: " + "; ".join(f"{n}: {e}" for n, e in failed))

    def mib(b):
        return " / ".join(mib(x) for x in b) if isinstance(b, list) else f"{b / 2**20:,.2f}"

    engine = f", FSDP2 on {a.fsdp2} ranks (bytes per rank, each rank {a.batch} sequences)" if a.fsdp2 else ""
    lines = [
        f"Model `{a.model}`, batch {a.batch} × {a.seq_len} tokens, {a.steps} steps, fp32{engine}.",
        "",
        "| optimizer | layer-wise | peak live gradients (MiB, hooks) | all gradients (MiB) | largest gradient (MiB) "
        f"| optimizer state (MiB) | peak memory (MiB, {rows[0]['peak_memory_kind']}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['optim']} | {'yes' if r['layerwise'] else 'no'} | {mib(r['peak_live_gradient_bytes'])} | "
                     f"{mib(r['all_gradient_bytes'])} | {mib(r['largest_gradient_bytes'])} | "
                     f"{mib(r['optimizer_state_bytes'])} | {mib(r['peak_memory_bytes'])} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
