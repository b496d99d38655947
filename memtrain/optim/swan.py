"""``swan``: SGD with row standardisation and whitening, stateless on the hidden matrices (specs/swan.md).

For every ``matrix`` gradient G (``[out, in]``): GradNorm standardises each row, GradWhitening maps the result to
(approximately) its polar factor with a deflated, damped coupled Newton–Schulz iteration on the short side's
Gram, and the update is rescaled to entry-RMS 1. No state is kept for these matrices. Embedding, head and vector
parameters get the shared AdamW-T fallback at ``adam_lr``, as in the paper's recipe.
"""
from __future__ import annotations

import warnings

from torch import Tensor

from .sharding import Rows, unsharded
from .base import MemtrainOptimizer, _check_hyper, fp32_view
from .registry import OptimizerSpec, register
from .transforms import as_out_in, descend_, frobenius_sq, standardize, unit_rms, whiten


class SWAN(MemtrainOptimizer):
    name = "swan"
    owns = frozenset({"matrix"})
    needs_matrix_shape = True

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, adam_lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, ns_steps: int = 10,
                 damping: float = 1e-6, row_eps: float = 1e-8, fp32_whitening: bool = True, norm_dim: int = 1):
        """``adam_lr`` is the lr of the AdamW-T part (None: ``lr``); ``betas``/``eps`` are its options.
        ``ns_steps`` Newton–Schulz iterations; ``damping`` δ relative to the Gram's mean eigenvalue; ``row_eps``
        floors the GradNorm std; ``fp32_whitening=False`` whitens in the gradient's dtype (bf16 models: bf16
        products) instead of IEEE fp32; ``norm_dim`` is the GradNorm axis (1: each output row over ``in``, the
        paper's formula; 0: each input column over ``out``)."""
        if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
            raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}")
        if norm_dim not in (0, 1) or isinstance(norm_dim, bool):
            raise ValueError(f"norm_dim must be 1 (standardise each row) or 0 (each column), got {norm_dim!r}")
        _check_hyper("damping", damping)
        _check_hyper("row_eps", row_eps, positive=True)
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adam_lr=adam_lr,
                         ns_steps=ns_steps, damping=damping, row_eps=row_eps, fp32_whitening=fp32_whitening,
                         norm_dim=norm_dim)
        for group in self.param_groups:
            if group["role"] == "other":
                warnings.warn(f"swan: parameters {group['names']} have role 'other' (2+ dims, not a linear weight); "
                              "they get the AdamW-T fallback", stacklevel=2)

    def update(self, param, grad, state, group, rows):
        layout = group.get("layout", "linear")
        delta = swan_direction(grad, rows, layout=layout, norm_dim=group["norm_dim"], row_eps=group["row_eps"],
                               ns_steps=group["ns_steps"], damping=group["damping"],
                               fp32_whitening=group["fp32_whitening"])
        with fp32_view(param) as p32:
            descend_(as_out_in(p32, layout), delta, lr=group["lr"], weight_decay=group["weight_decay"])


def swan_direction(grad: Tensor, rows: Rows, *, layout: str = "linear", norm_dim: int = 1, row_eps: float = 1e-8,
                   ns_steps: int = 10, damping: float = 1e-6, fp32_whitening: bool = True) -> Tensor:
    """SWAN's update direction (swan.md §2.1–2.3, ``[out, in]``) for this rank's rows ``grad`` of a matrix split as
    ``rows`` says; unsharded rows make every collective the identity (the single-process numerics).

    Under FSDP2 (swan.md §7): GradNorm over rows is local (``norm_dim=0`` all-reduces three length-n column
    statistics); the right side all-reduces the n×n Gram, the left side all-gathers X, and both compute Z on
    ``rows.owner`` (round-robin over matrices) and broadcast it; the rescale all-reduces ‖Δ‖² in fp64."""
    g = as_out_in(grad.float(), layout)
    if layout == "conv1d":  # the [out, in] view's rows; FSDP2 refuses conv1d (base._check_param), so unsharded
        rows = unsharded(g)
    x = standardize(g, dim=norm_dim, eps=row_eps, column_mean=rows.column_mean)
    if not fp32_whitening:
        x = x.to(grad.dtype)
    delta = whiten(x, steps=ns_steps, damping=damping, centered_dim=norm_dim, total_rows=rows.total,
                   gram_sum=rows.sum, gather=rows.gather, mine=rows.mine, on_owner=rows.on_owner)
    return unit_rms(delta.float(), norm_sq=lambda d: rows.sum(frobenius_sq(d)), numel=rows.total * delta.shape[1])


register(OptimizerSpec(
    name="swan",
    cls=SWAN,
    description="SWAN: row-standardised, Newton–Schulz-whitened gradient on hidden matrices (no state there); "
                "AdamW-T on the rest",
    stateless=True,
    fsdp2=True,  # n×n Gram all-reduce (right) / all-gather (left), Z on the owner rank + broadcast (swan.md §7)
    deepspeed=False,  # flat 1-D partitions have no rows: refused
))
