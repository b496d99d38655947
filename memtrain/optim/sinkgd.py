"""``sinkgd``: Sinkhorn gradient descent, stateless on the hidden matrices (Scetbon et al., arXiv 2502.06742;
docs/optimizers/sinkgd.md).

For every ``matrix`` gradient G (``[out, in]``) the update is L alternations of row-RMS then column-RMS
normalisation (a square-root Sinkhorn scaling of G⊙G), so every column has RMS 1 and every row nearly so. No state
is kept for these matrices; embedding, head and vector parameters get the AdamW-T fallback at ``adam_lr``.
"""
from __future__ import annotations

import warnings
from typing import Callable

from torch import Tensor

from .base import MemtrainOptimizer, _check_hyper, fp32_view
from .transforms import as_out_in, column_mean, descend_, rms_normalize


def sinkhorn(g: Tensor, iterations: int = 5, eps: float = 1e-8, column_mean: Callable = column_mean) -> Tensor:
    """SinkGD's square-root Sinkhorn (docs/optimizers/sinkgd.md, "Update"): ``iterations`` alternations of row-, then
    column-RMS normalisation. Columns come last, so every column RMS is exactly 1; rows converge geometrically to RMS
    1."""
    x = g
    for _ in range(iterations):
        x = rms_normalize(x, dim=1, eps=eps)
        x = rms_normalize(x, dim=0, eps=eps, column_mean=column_mean)
    return x


class SinkGD(MemtrainOptimizer):
    name = "sinkgd"
    description = ("SinkGD: alternating row/column RMS normalisation (Sinkhorn) of hidden-matrix gradients (no "
                   "state there); AdamW-T on the rest")
    owns = frozenset({"matrix"})
    needs_matrix_shape = True
    stateless = True
    fsdp2 = True  # row steps local, one all-reduce of n column sums per iteration
    deepspeed = False  # flat 1-D partitions have no rows: refused

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
        delta = sinkhorn(as_out_in(grad.float(), group.get("layout", "linear")), group["iterations"],
                         group["norm_eps"], column_mean=rows.column_mean)
        with fp32_view(param) as p32:
            descend_(as_out_in(p32, group.get("layout", "linear")), delta, lr=group["lr"],
                     weight_decay=group["weight_decay"])

