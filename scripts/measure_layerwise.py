"""Measure what layer-wise gradient release saves: peak live gradient bytes (counted exactly by hooks) and
peak process memory (CUDA max allocated on GPU; peak RSS on CPU, coarse), with and without release.

    python scripts/measure_layerwise.py --model llama-20m --optims adamw galore:rank=64 --steps 4

Each configuration runs in a fresh process, so peak RSS is not inherited from an earlier run. Prints a
markdown table (and writes it with --out).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(model_name: str, optim: str, layerwise: bool, steps: int, batch: int, seq_len: int) -> dict:
    import resource

    import torch

    import memtrain
    from memtrain.metrics import optimizer_state_bytes
    from memtrain.models import build_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_name).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    peak = [0]

    # Registered before the release hooks, so each call sees the gradient that just became final before it is
    # freed: the sum over live ``.grad`` tensors at that moment is the gradient memory held then.
    def record(param):
        current = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak[0] = max(peak[0], current)

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
    out = {
        "model": model_name, "optim": optim, "layerwise": layerwise,
        "parameters": sum(p.numel() for p in params),
        "all_gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        "largest_gradient_bytes": max(p.numel() * p.element_size() for p in params),
        "peak_live_gradient_bytes": peak[0],
        "optimizer_state_bytes": optimizer_state_bytes(opt),
    }
    if device.type == "cuda":
        out["peak_memory_bytes"], out["peak_memory_kind"] = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        out["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_memory_kind"] = "cpu_peak_rss"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--optims", nargs="+", default=["adamw", "galore"],
                        help="name[:k=v;k=v] (';' separates options inside one entry)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a._one:  # child process: one configuration
        optim, layerwise = json.loads(a._one)
        print(json.dumps(measure(a.model, optim, layerwise, a.steps, a.batch, a.seq_len)))
        return
    rows = []
    for optim in a.optims:
        for layerwise in (False, True):
            cmd = [sys.executable, __file__, "--model", a.model, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--seq_len", str(a.seq_len), "--_one", json.dumps([optim, layerwise])]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                                   .strip().splitlines()[-1]))
    mib = lambda b: f"{b / 2**20:,.2f}"  # noqa: E731
    lines = [
        f"Model `{a.model}`, batch {a.batch} × {a.seq_len} tokens, {a.steps} steps, fp32.",
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
