"""``muon``: momentum SGD whose update on each hidden matrix is the orthogonalised momentum (docs/optimizers/muon.md).

Muon (Jordan et al. 2024; Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982) keeps one momentum
buffer per hidden matrix and replaces the update by an approximation of its polar factor ``U·Vᵀ`` (``U·S·Vᵀ`` the
SVD), computed with a few Newton–Schulz iterations of an odd quintic polynomial. Embedding, head and vector
parameters get the shared AdamW fallback at ``adam_lr``.

The orthogonaliser is either the quintic iteration of the Muon reference (``ns="quintic"``, bf16 by default, as
torch.optim.Muon computes it) or SWAN's damped coupled Newton–Schulz inverse square root of the short-side Gram
(``ns="polar"``), which converges to the polar factor itself; both reuse the same owner-rank scheme under FSDP2.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .base import MemtrainOptimizer, _check_hyper, fp32_view
from .sharding import Rows, local, unsharded
from .swan import QUINTIC, whiten
from .transforms import DTYPES, as_out_in

#: Default iterations: the reference quintic's 5; the coupled iteration reaches the polar factor to ~1e-6 in 10 on
#: rectangular Gaussian matrices (square ones need ~20: docs/optimizers/muon.md).
NS_STEPS = {"quintic": 5, "polar": 10}


def quintic_orthogonalize(x: Tensor, *, steps: int, coefficients: tuple[float, float, float], eps: float,
                          dtype: torch.dtype) -> Tensor:
    """``steps`` iterations of ``X ← a·X + (b·A + c·A²)·X`` with ``A = X·Xᵀ`` on the wide orientation of ``x``
    (the Gram is the short side's), after scaling ``x`` to Frobenius norm 1 (so every singular value is ≤ 1).
    Returns the result in ``dtype``, with ``x``'s orientation."""
    a, b, c = coefficients
    tall = x.shape[0] > x.shape[1]
    y = x.to(dtype)
    if tall:
        y = y.T
    y = y / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        y = torch.addmm(y, poly, y, beta=a)
    return y.T if tall else y


def update_scale(m: int, n: int, rule: str) -> float:
    """The lr multiplier of an ``m×n`` matrix's orthogonal update (whose entry RMS is about ``1/sqrt(max(m, n))``):

    * ``match_rms_adamw`` (Liu et al. 2025, §2.2): ``0.2·sqrt(max(m, n))``, giving the update the entry RMS ≈ 0.2 of
      a typical AdamW update, so AdamW's lr and weight decay transfer (and one lr serves Muon and the fallback);
    * ``original`` (the Muon reference and torch.optim.Muon's default): ``sqrt(max(1, m/n))``;
    * ``none``: 1."""
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "original":
        return math.sqrt(max(1.0, m / n))
    return 1.0


class Muon(MemtrainOptimizer):
    name = "muon"
    description = "Muon: Newton–Schulz-orthogonalised momentum on hidden matrices (4 B/param there); AdamW on the rest"
    owns = frozenset({"matrix"})
    needs_matrix_shape = True
    fsdp2 = True  # gather, orthogonalise on the owner rank, broadcast (docs/optimizers/muon.md)
    spreads = True  # under DDP each rank orthogonalises ~1/world of the matrices and broadcasts them
    deepspeed = False  # flat 1-D partitions have no rows: refused

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, adam_lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.95,
                 nesterov: bool = True, ns: Literal["quintic", "polar"] = "quintic", ns_steps: int | None = None,
                 ns_coefficients: tuple[float, float, float] = QUINTIC, ns_eps: float = 1e-7,
                 ns_dtype: Literal["bfloat16", "float32"] = "bfloat16",
                 scale: Literal["match_rms_adamw", "original", "none"] = "match_rms_adamw", damping: float = 1e-6):
        """``adam_lr`` is the lr of the AdamW fallback (None: ``lr``); ``betas``/``eps`` are its options.
        ``momentum`` μ of the buffer ``B ← μB + (1−μ)G``; ``nesterov`` steps along ``G + μ(B − G)`` instead of B.
        ``ns``: ``quintic`` (the reference iteration, ``ns_steps``, ``ns_coefficients``, ``ns_eps`` floor of the
        norm, computed in ``ns_dtype``) or ``polar`` (SWAN's coupled Newton–Schulz, ``ns_steps`` iterations, fp32,
        ``damping`` δ); ``ns_steps=None`` takes :data:`NS_STEPS`. ``scale``: the shape-based lr multiplier (:func:`update_scale`)."""
        ns_steps = NS_STEPS[ns] if ns_steps is None and ns in NS_STEPS else ns_steps
        if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or not 1 <= ns_steps <= 100:
            raise ValueError(f"ns_steps must be an integer in [1, 100], got {ns_steps!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if ns not in ("quintic", "polar"):
            raise ValueError(f"ns must be 'quintic' or 'polar', got {ns!r}")
        if ns_dtype not in DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(DTYPES)}, got {ns_dtype!r}")
        if scale not in ("match_rms_adamw", "original", "none"):
            raise ValueError(f"scale must be 'match_rms_adamw', 'original' or 'none', got {scale!r}")
        if len(tuple(ns_coefficients)) != 3:
            raise ValueError(f"ns_coefficients must be three numbers a:b:c, got {ns_coefficients!r}")
        _check_hyper("ns_eps", ns_eps, positive=True)
        _check_hyper("damping", damping)
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adam_lr=adam_lr,
                         momentum=momentum, nesterov=nesterov, ns=ns, ns_steps=ns_steps,
                         ns_coefficients=tuple(float(c) for c in ns_coefficients), ns_eps=ns_eps, ns_dtype=ns_dtype,
                         scale=scale, damping=damping)

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        g, buf = self._momentum(param, grad, state, group, rows)
        direction = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        layout = group.get("layout", "linear")
        m, n = as_out_in(direction, layout).shape
        m = rows.total if layout == "linear" else m
        ortho = self.orthogonalize(as_out_in(direction, layout), group, rows)
        lr = group["lr"]
        with fp32_view(param) as p32:
            view = as_out_in(p32, layout)
            if group["weight_decay"] != 0:
                view.mul_(1 - lr * group["weight_decay"])
            view.add_(ortho.to(view.dtype), alpha=-lr * update_scale(m, n, group["scale"]))

    @staticmethod
    def _momentum(param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> tuple[Tensor, Tensor]:
        """``B ← μB + (1−μ)G`` (the buffer created at the first step); returns the fp32 G and B (this rank's rows)."""
        if not state:
            state["momentum_buffer"] = rows.keep(torch.zeros_like(param, dtype=torch.float32))
        g = grad.float()
        buf = local(state["momentum_buffer"])
        buf.lerp_(g, 1 - group["momentum"])
        return g, buf

    def update_state(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        self._momentum(param, grad, state, group, unsharded(param))

    @staticmethod
    def orthogonalize(x: Tensor, group: dict, rows: Rows) -> Tensor:
        """This rank's rows of the orthogonalised ``[out, in]`` matrix. The iteration needs the whole matrix: it is
        gathered, solved on the matrix's owner rank and broadcast (the identity without sharding), so every rank
        holds the single-process result bitwise."""
        if group["ns"] == "polar":
            # SWAN's whitening is X·(A/‖A‖_F)^{-1/2} with A = XᵀX (or the left form): the polar factor times
            # ‖A‖_F^{1/2}, damped by δ, nothing centred. Rescaled to the polar factor's norm sqrt(min(m, n)).
            white = whiten(x, steps=group["ns_steps"], damping=group["damping"], centered_dim=None,
                           total_rows=rows.total, gram_sum=rows.sum, gather=rows.gather, mine=rows.mine,
                           on_owner=rows.on_owner)
            norm_sq = rows.norm_sq(white)
            target = min(rows.total, x.shape[1])
            return white * torch.where(norm_sq > 0, (target / norm_sq).sqrt(), torch.zeros_like(norm_sq)).float()
        full = rows.gather(x)
        dtype = DTYPES[group["ns_dtype"]]
        ortho = rows.on_owner(lambda: quintic_orthogonalize(full, steps=group["ns_steps"],
                                                            coefficients=group["ns_coefficients"],
                                                            eps=group["ns_eps"], dtype=dtype),
                              full.new_empty(full.shape, dtype=dtype))
        return rows.mine(ortho)

