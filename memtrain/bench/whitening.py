"""``memtrain bench whitening``: where SWAN's matrix update spends its time, and how far each whitening is from the
exact polar factor (docs/optimizers/swan.md, "Cost").

    memtrain bench whitening                         # llama-bench, real gradients of one batch, 1 thread

For one gradient of every hidden-matrix shape of the model (from one forward/backward on random tokens), the
parts of SWAN's direction are timed separately (GradNorm, the Gram, the root, applying it, the rescale), and the
root is computed every way in :data:`ROOTS`: ``ns_steps`` of 5 to 20; 3 or 4 quintic steps before the Newton–Schulz
ones (``ns_quintic_steps``); bf16 products (``ns_dtype``) at k = 10 and 15 and with 3 + 3; k = 10 evaluated on the
Gram's eigenvalues (``ns_eval=eigh``); and exactly, by an eigendecomposition of the same damped, deflated Gram
(the k → ∞ limit, which ``swan`` does not compute).
Distance: ``‖Δ − P‖_F / ‖P‖_F`` of the unit-RMS direction Δ from the unit-RMS polar factor P of the standardised
gradient on its range (fp64 SVD, :func:`polar_factor`), for every hidden matrix of the model. Times are the median
process CPU time of 7 repetitions.
"""
from __future__ import annotations

import argparse
import json
import math
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


DAMPING = 1e-6  # swan's default δ


def _newton_schulz(steps: int, quintic_steps: int = 0, dtype: torch.dtype = torch.float32, spectral: bool = False):
    """``swan``'s root with ``ns_steps=steps, ns_quintic_steps=quintic_steps``, its products in ``dtype``
    (``ns_dtype``: A' formed in fp32, the iteration in ``dtype``), or on A's eigenvalues (``ns_eval=eigh``)."""
    def root(a: torch.Tensor, deflate: bool) -> torch.Tensor:
        return whitening_root(a, steps=steps, quintic_steps=quintic_steps, damping=DAMPING, deflate=deflate,
                              dtype=dtype, spectral=spectral)
    return root


#: The roots compared: name → ``root(a, deflate)`` on the same fp32 short-side Gram ``a``. The bf16 rows run only
#: the root's products in bf16 (the Gram and the apply stay fp32), to show the iteration's own bf16 behaviour.
ROOTS = {
    **{f"newton-schulz k={k}": _newton_schulz(k) for k in (5, 10, 15, 20)},
    **{f"quintic {q} + newton-schulz {k}": _newton_schulz(k, q) for q, k in ((3, 2), (3, 3), (4, 3))},
    **{f"newton-schulz k={k}, bf16": _newton_schulz(k, dtype=torch.bfloat16) for k in (10, 15)},
    "quintic 3 + newton-schulz 3, bf16": _newton_schulz(3, 3, dtype=torch.bfloat16),
    "newton-schulz k=10, on eigenvalues": _newton_schulz(10, spectral=True),
    "eigh (exact root)": lambda a, deflate: _eigh_root(a, DAMPING, deflate),
}
DEFAULT = "newton-schulz k=10"


def _gradients(model_name: str, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Every hidden matrix's gradient of one forward/backward on random tokens."""
    torch.manual_seed(seed)
    model = build_model(model_name, seed=seed)
    ids = torch.randint(0, model.config.vocab_size, (8, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    return [(name, p.grad.detach().float()) for group in build_param_groups(model, owned_roles={"matrix"})
            if group["role"] == "matrix" for name, p in zip(group["names"], group["params"])]


def measure(model_name: str, seed: int = 0) -> dict:
    """Times of the parts of one matrix's direction, per shape, and every root's distance from the polar factor
    on every hidden matrix (``distances``: root name → one distance per matrix, in model order)."""
    rows, distances = [], {name: [] for name in ROOTS}
    for name, g in _gradients(model_name, seed):
        x = standardize(g)
        right = whitening_side(*g.shape)
        gram = (lambda: x.mT @ x) if right else (lambda: x @ x.mT)
        a = gram()
        polar = polar_factor(x)
        zs = {root: fn(a, right) for root, fn in ROOTS.items()}
        for root, z in zs.items():
            white = unit_rms((x @ z if right else z @ x).double())
            distances[root].append(((white - polar).norm() / polar.norm()).item())
        if any(r["shape"] == list(g.shape) for r in rows):
            continue
        z10 = zs[DEFAULT]
        rows.append({"matrix": name, "shape": list(g.shape), "side": "right" if right else "left",
                     "gradnorm_ms": _cpu_ms(lambda: standardize(g)), "gram_ms": _cpu_ms(gram),
                     "apply_ms": _cpu_ms(lambda: x @ z10 if right else z10 @ x),
                     "rescale_ms": _cpu_ms(lambda: unit_rms(x @ z10 if right else z10 @ x)),
                     "roots": {root: {"ms": _cpu_ms(lambda: fn(a, right)), "distance": distances[root][-1]}
                               for root, fn in ROOTS.items()}})
    return {"rows": rows, "distances": distances}


def markdown(result: dict, meta: dict) -> str:
    rows, distances = result["rows"], result["distances"]
    lines = [f"# SWAN's whitening: time and distance from the polar factor ({meta['model']}, CPU)",
             f"`{meta['command']}`", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s); the gradients of one forward/backward on random "
             "tokens (seed 0). Parts of one matrix's SWAN direction, one matrix per shape, median CPU ms:",
             "", f"| matrix | shape | side | GradNorm | Gram | root ({DEFAULT}, the default) | apply | rescale |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['shape'][0]}×{r['shape'][1]} | {r['side']} | {r['gradnorm_ms']:.2f} | "
                     f"{r['gram_ms']:.2f} | {r['roots'][DEFAULT]['ms']:.2f} | {r['apply_ms']:.2f} | "
                     f"{r['rescale_ms']:.2f} |")
    shapes = [f"{r['shape'][0]}×{r['shape'][1]}" for r in rows]
    count = len(next(iter(distances.values()), []))
    lines += ["", "The root computed other ways: CPU ms per shape (that matrix), and the distance of the unit-RMS "
              f"direction from the polar factor over all {count} hidden matrices (median and max of the finite ones, and how "
              "many diverged to inf/NaN):", "",
              "| root | " + " | ".join(f"ms {s}" for s in shapes) + " | distance median | distance max | non-finite |",
              "|---|" + "---|" * (len(shapes) + 3)]
    for root, ds in distances.items():
        times = " | ".join(f"{r['roots'][root]['ms']:.2f}" for r in rows)
        finite = [d for d in ds if math.isfinite(d)]  # a diverged root is counted, never averaged in
        stats = f"{statistics.median(finite):.2e} | {max(finite):.2e}" if finite else "— | —"
        lines.append(f"| {root} | {times} | {stats} | {len(ds) - len(finite)} of {len(ds)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="memtrain bench whitening", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/benchmarks/swan-whitening.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.model)
    meta = {"command": command_line("memtrain bench whitening", argv if argv is not None else sys.argv[1:]),
            "model": args.model, "threads": args.threads, "torch": torch.__version__}
    page = markdown(result, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(page)
    Path(args.out).with_suffix(".json").write_text(json.dumps({**meta, **result}, indent=1))
    print(page)
    return result
