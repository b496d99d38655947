"""``sinkgd``: Sinkhorn gradient descent, stateless on the hidden matrices (Scetbon et al., arXiv 2502.06742;
docs/optimizers/sinkgd.md).

For every ``matrix`` gradient G (``[out, in]``) the update is L alternations of row-RMS then column-RMS
normalisation (a square-root Sinkhorn scaling of G⊙G), so every column has RMS 1 and every row nearly so. No state
is kept for these matrices; embedding, head and vector parameters get the AdamW-T fallback at ``adam_lr``.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from .base import MemtrainOptimizer, _check_hyper, fp32_view
from .transforms import _whole, as_out_in, descend_


def sinkhorn(g: Tensor, iterations: int = 5, eps: float = 1e-8, *, column_sum: Callable = _whole,
             total_rows: int | None = None) -> Tensor:
    """SinkGD's square-root Sinkhorn (docs/optimizers/sinkgd.md, "Update"): ``iterations`` alternations of row-, then
    column-RMS normalisation. Columns come last, so every column RMS is exactly 1; rows converge geometrically to RMS
    1. A stack ``[B, m, n]`` normalises each matrix on its own.

    Every half-step only rescales rows or columns, so the result is ``diag(r)·G·diag(c)``: G⊙G is formed once and
    each half-step is one matrix–vector product with it, on the squared scales (the row mean square of the iterate
    is ``r²_i·S_i/n`` with ``S_i = Σ_j G²_ij c²_j``, so ``r²_i ← r²_i / max(r²_i·S_i/n, ε²)``, computed as
    ``n·r²_i / max(r²_i·S_i, n·ε²)``), instead of four passes over a new matrix. Same math as normalising the
    matrix itself, to fp32 rounding (docs/optimizers/sinkgd.md, "Cost"). A row or column whose squares are all 0
    stays 0 whatever its scale; adding ``n`` (``m``) to its sums once found makes its scale 1 instead of ε⁻² times
    larger at every half-step (which would overflow), with no per-step test.

    Under FSDP2 ``g`` is this rank's rows of a ``total_rows``-row matrix and ``column_sum`` all-reduces the column
    sums (``sharding.Rows.sum``); row half-steps are local."""
    sq = g.square()
    # Scales are row vectors ([..., 1, m] and [..., 1, n]) on the left of every product: the vector–matrix form is
    # the fast one for batched stacks (torch.bmm with a [k, 1] right operand takes 3–5× longer on CPU).
    sq_t = sq.mT
    m, n = (g.shape[-2] if total_rows is None else total_rows), g.shape[-1]
    floor = eps * eps
    r2 = c2 = row_zero = column_zero = None  # scales of 1 until the first half-step sets them
    for _ in range(iterations):
        if c2 is None:
            sums = sq.sum(dim=-1).unsqueeze(-2)
            row_zero = (sums == 0).to(sums.dtype).mul_(n)
            sums.add_(row_zero)
        else:
            sums = (torch.addmm if sq.dim() == 2 else torch.baddbmm)(row_zero, c2, sq_t)
        r2 = _rescale(r2, sums, n, floor)
        sums = column_sum(r2 @ sq)
        if column_zero is None:  # from the global sums: a column is zero on every rank or not at all
            column_zero = (sums == 0).to(sums.dtype).mul_(m)
        c2 = _rescale(c2, sums.add_(column_zero), m, floor)  # added after the all-reduce: once, not once per rank
    return torch.mul(g, c2.sqrt_()).mul_(r2.sqrt_().mT)  # one new matrix: g·r·c would allocate two


def _rescale(scale2: Tensor | None, sums: Tensor, count: int, floor: float) -> Tensor:
    """One half-step on the squared scales: ``count·s² / max(s²·sums, count·ε²)`` (``scale2`` None: all ones).
    ``sums`` is a fresh product and ``scale2`` is replaced: both are updated in place."""
    if scale2 is None:
        return sums.clamp_(min=count * floor).reciprocal_().mul_(count)
    denominator = sums.mul_(scale2).clamp_(min=count * floor)
    return scale2.mul_(count).div_(denominator)


class SinkGD(MemtrainOptimizer):
    name = "sinkgd"
    description = ("SinkGD: alternating row/column RMS normalisation (Sinkhorn) of hidden-matrix gradients (no "
                   "state there); AdamW-T on the rest")
    owns = frozenset({"matrix"})
    needs_matrix_shape = True
    stateless = True
    fsdp2 = True  # row steps local, one all-reduce of n column sums per iteration
    deepspeed = False  # flat 1-D partitions have no rows: refused
    batched = True  # same-shape matrices normalised together (one kernel per half-step for all of them)

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, adam_lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, iterations: int = 5,
                 norm_eps: float = 1e-8):
        """``adam_lr`` is the lr of the AdamW-T part (None: ``lr``); ``betas``/``eps`` are its options.
        ``iterations`` is L, the number of row/column alternations; ``norm_eps`` floors each row/column RMS."""
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        _check_hyper("norm_eps", norm_eps, positive=True)
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adam_lr=adam_lr,
                         iterations=iterations, norm_eps=norm_eps)
        for group in self.param_groups:
            if group["role"] == "other":
                warnings.warn(f"sinkgd: parameters {group['names']} have role 'other' (2+ dims, not a linear "
                              "weight); they get the AdamW-T fallback", stacklevel=2)

    def update(self, param, grad, state, group, rows):
        # Row steps are local under FSDP2's row sharding; each column step all-reduces n column sums
        # (docs/optimizers/sinkgd.md, "Distributed").
        g = as_out_in(grad.float(), group.get("layout", "linear"))
        delta = sinkhorn(g, group["iterations"], group["norm_eps"], column_sum=rows.sum,
                         total_rows=rows.total if rows.sharded else None)
        with fp32_view(param) as p32:
            descend_(as_out_in(p32, group.get("layout", "linear")), delta, lr=group["lr"],
                     weight_decay=group["weight_decay"])

    def update_batch(self, params, grads, group):
        self.descend_each(params, sinkhorn(torch.stack(grads).float(), group["iterations"], group["norm_eps"]), group)

