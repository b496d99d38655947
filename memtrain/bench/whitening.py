"""``memtrain bench whitening``: where SWAN's matrix update spends its time, and how far each whitening is from the
exact polar factor (docs/optimizers/swan.md, "Cost").

    memtrain bench whitening                         # llama-bench, real gradients of one batch, 1 thread

For one gradient of every hidden-matrix shape of the model (from one forward/backward on random tokens), the
parts of SWAN's direction are timed separately (GradNorm, the Gram, the root, applying it, the rescale), and the
root is also computed with ``ns_steps`` of 5, 10, 15 and 20 and, as the alternative, exactly by an eigendecomposition
of the same damped, deflated Gram (``torch.linalg.eigh``; not used by ``swan``: on CUDA it checks its result on the
host, a sync per matrix). Distance: ``‖Δ − P‖_F / ‖P‖_F`` of the unit-RMS direction Δ from the unit-RMS polar
factor P of the standardised gradient on its range (fp64 SVD, :func:`polar_factor`). Times are the median process CPU time of 7 repetitions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..optim.routing import build_param_groups
from ..optim.swan import damped_gram, standardize, unit_rms, whitening_root, whitening_side
from ..recipes.models import build_model
from .runner import command_line


def _cpu_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def _eigh_root(a: torch.Tensor, damping: float, deflate: bool) -> torch.Tensor:
    """The k → ∞ limit of ``whitening_root``: the same A', its inverse square root from its eigendecomposition."""
    a = damped_gram(a, damping=damping, deflate=deflate)
    w, v = torch.linalg.eigh(a / torch.linalg.matrix_norm(a))
    return (v * w.clamp(min=torch.finfo(w.dtype).tiny).rsqrt()) @ v.mT


def polar_factor(x: torch.Tensor, rel_tol: float = 1e-5) -> torch.Tensor:
    """The unit-RMS polar factor ``U·Vᵀ`` of ``x`` on its range (fp64 SVD; singular values under ``rel_tol`` of the
    largest are 0): centring makes the standardised gradient rank-deficient (``X·1 = 0``), and the polar factor of
    that null direction is arbitrary, so it is left out as SWAN's deflated whitening leaves it out."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    keep = s > rel_tol * s[0]
    return unit_rms(u[:, keep] @ vh[keep])


def measure(model_name: str, seed: int = 0, damping: float = 1e-6) -> list[dict]:
    torch.manual_seed(seed)
    model = build_model(model_name, seed=seed)
    ids = torch.randint(0, model.config.vocab_size, (8, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    matrices = {}
    for group in build_param_groups(model, owned_roles={"matrix"}):
        if group["role"] == "matrix":
            for name, p in zip(group["names"], group["params"]):
                matrices.setdefault(tuple(p.shape), (name, p.grad.detach().float()))
    rows = []
    for shape, (name, g) in matrices.items():
        x = standardize(g)
        right = whitening_side(*shape)
        gram = (lambda: x.mT @ x) if right else (lambda: x @ x.mT)
        a = gram()
        polar = polar_factor(x)

        def distance(z):
            return ((unit_rms((x @ z if right else z @ x).double()) - polar).norm() / polar.norm()).item()

        z10 = whitening_root(a, steps=10, damping=damping, deflate=right)
        row = {"matrix": name, "shape": list(shape), "side": "right" if right else "left",
               "gradnorm_ms": _cpu_ms(lambda: standardize(g)), "gram_ms": _cpu_ms(gram),
               "apply_ms": _cpu_ms(lambda: x @ z10 if right else z10 @ x),
               "rescale_ms": _cpu_ms(lambda: unit_rms(x @ z10 if right else z10 @ x)), "roots": {}}
        for k in (5, 10, 15, 20):
            z = whitening_root(a, steps=k, damping=damping, deflate=right)
            row["roots"][f"newton-schulz k={k}"] = {
                "ms": _cpu_ms(lambda: whitening_root(a, steps=k, damping=damping, deflate=right)),
                "distance": distance(z)}
        row["roots"]["eigh (exact root)"] = {"ms": _cpu_ms(lambda: _eigh_root(a, damping, right)),
                                             "distance": distance(_eigh_root(a, damping, right))}
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    variants = list(rows[0]["roots"]) if rows else []
    lines = [f"# SWAN's whitening: time and distance from the polar factor ({meta['model']}, CPU)",
             f"`{meta['command']}`", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s); one real gradient per hidden-matrix shape "
             "(one forward/backward on random tokens, seed 0). Parts of one matrix's SWAN direction, median CPU ms:",
             "", "| matrix | shape | side | GradNorm | Gram | root k=10 (default) | apply | rescale |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['shape'][0]}×{r['shape'][1]} | {r['side']} | {r['gradnorm_ms']:.2f} | "
                     f"{r['gram_ms']:.2f} | {r['roots']['newton-schulz k=10']['ms']:.2f} | {r['apply_ms']:.2f} | "
                     f"{r['rescale_ms']:.2f} |")
    lines += ["", "The root computed other ways: CPU ms / distance of the unit-RMS direction from the polar factor:",
              "", "| shape | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for r in rows:
        cells = [f"{r['roots'][v]['ms']:.2f} / {r['roots'][v]['distance']:.2e}" for v in variants]
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="memtrain bench whitening", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/benchmarks/swan-whitening.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.model)
    meta = {"command": command_line("memtrain bench whitening", argv if argv is not None else sys.argv[1:]),
            "model": args.model, "threads": args.threads, "torch": torch.__version__}
    page = markdown(rows, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(page)
    Path(args.out).with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(page)
    return rows
