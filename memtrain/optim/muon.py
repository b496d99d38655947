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
from .swan import QUINTIC, ShortSide
from .transforms import DTYPES, as_out_in, ieee_fp32

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
    windowed = True  # under FSDP2 the ranks' owner-side iterations run at the same time (update_window)
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
        self._apply(param, self.orthogonalize(self._direction(param, grad, state, group, rows), group, rows),
                    group, rows)

    def update_window(self, params, grads, states, rows, group):
        """FSDP2: :meth:`update` for a window of sharded matrices, one owned by each rank, in three passes: every
        momentum and gather (or Gram) in order, then each rank's own orthogonalisation while the others compute
        theirs, then every broadcast in flight at once; each update is applied as its result arrives. The same
        collectives and arithmetic as :meth:`update`, so the same result bitwise (docs/optimizers/muon.md)."""
        work = [Orthogonalization(self._direction(p, g, s, group, r), group, r)
                for p, g, s, r in zip(params, grads, states, rows)]
        arrivals = [r.start_broadcast(o.solve() if r.is_owner else o.buffer()) for o, r in zip(work, rows)]
        for param, o, r, arrived in zip(params, work, rows, arrivals):
            self._apply(param, o.finish(arrived()), group, r)

    def _direction(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> Tensor:
        """The momentum (Nesterov: ``G + μ(B − G)``) to orthogonalise, ``[out, in]``."""
        g, buf = self._momentum(param, grad, state, group, rows)
        direction = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        return as_out_in(direction, group.get("layout", "linear"))

    @staticmethod
    def _apply(param: Tensor, ortho: Tensor, group: dict, rows: Rows) -> None:
        """``W ← W·(1 − η·λ) − η·scale(m, n)·O``."""
        layout = group.get("layout", "linear")
        m, n = ortho.shape
        m = rows.total if layout == "linear" else m
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
        work = Orthogonalization(x, group, rows)
        return work.finish(rows.on_owner(work.solve, work.buffer()))


class Orthogonalization:
    """One matrix's orthogonalisation split at its collectives: constructing it gathers the matrix (``quintic``) or
    forms the short side's Gram (``polar``, :class:`~memtrain.optim.swan.ShortSide`), :meth:`solve` is the owner
    rank's iteration, :meth:`buffer` the other ranks' receiving buffer, :meth:`finish` this rank's rows of the
    result. :meth:`Muon.orthogonalize` runs them in a row, :meth:`Muon.update_window` a window at a time."""

    def __init__(self, x: Tensor, group: dict, rows: Rows):
        self.group, self.rows, self.polar = group, rows, group["ns"] == "polar"
        if self.polar:
            # SWAN's whitening is X·(A/‖A‖_F)^{-1/2} with A = XᵀX (or the left form): the polar factor times
            # ‖A‖_F^{1/2}, damped by δ, nothing centred. Rescaled to the polar factor's norm sqrt(min(m, n)).
            with ieee_fp32():
                self.side = ShortSide(x, centered_dim=None, total_rows=rows.total, gram_sum=rows.sum,
                                      gather=rows.gather)
            self.target = min(rows.total, x.shape[1])
        else:
            self.full = rows.gather(x)
            self.dtype = DTYPES[group["ns_dtype"]]

    def solve(self) -> Tensor:
        g = self.group
        if self.polar:
            with ieee_fp32():
                return self.side.root(steps=g["ns_steps"], damping=g["damping"])
        return quintic_orthogonalize(self.full, steps=g["ns_steps"], coefficients=g["ns_coefficients"],
                                     eps=g["ns_eps"], dtype=self.dtype)

    def buffer(self) -> Tensor:
        return self.side.buffer() if self.polar else self.full.new_empty(self.full.shape, dtype=self.dtype)

    def finish(self, solved: Tensor) -> Tensor:
        if not self.polar:
            return self.rows.mine(solved)
        with ieee_fp32():
            white = self.side.apply(solved, self.rows.mine)
        norm_sq = self.rows.norm_sq(white)
        return white * torch.where(norm_sq > 0, (self.target / norm_sq).sqrt(), torch.zeros_like(norm_sq)).float()
