"""``adafactor``: Adafactor (Shazeer & Stern 2018), numerically identical to ``transformers.optimization.Adafactor``.

Shazeer & Stern, arXiv 1804.04235; docs/optimizers/adafactor.md. The second moment of every ≥2-D tensor is factored over
its last two dims (a row and a column statistic, ≈ 0 B/param); 1-D tensors keep a full second moment. The update is
clipped to RMS ≤ d, scaled by the step size α_t and, with ``beta1``, smoothed by a momentum on the scaled update (the
T2T/HF form, not Adam's).

The name is HF's too. memtrain names take precedence in memtrain's ``TrainingArguments``, so with default
options this class does exactly what HF Trainer's ``optim="adafactor"`` does: an external lr (the Trainer's
schedule), ``scale_parameter=False``, ``relative_step=False``, coupled weight decay ``p -= λ·α_t·p`` on the
Trainer's decay groups. The paper's relative step size is the flag set
``lr=None, relative_step=True, scale_parameter=True``. HF's ``eps=(ε1, ε2)`` pair is spelled ``eps1``/``eps2``
here: memtrain's Trainer passes ``adam_epsilon`` to any optimizer with an ``eps`` option, which would be wrong
for Adafactor.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .sharding import Rows, local
from .base import MemtrainOptimizer, fp32_view
from .routing import ROLES


def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries, as a 0-d tensor (no host sync). Empty tensors give 0."""
    return x.norm(2) / max(x.numel(), 1) ** 0.5


def mean_over_rows(x: Tensor) -> Tensor:
    """The mean over the second-to-last dim (keepdim): Adafactor's "over the rows" reduction, and the default
    ``column_mean`` of the two factored functions below. Under FSDP2 a sharded matrix passes
    ``sharding.Rows.column_mean`` instead (same values, all-reduced over the row blocks)."""
    return x.mean(dim=-2, keepdim=True)


def factored_second_moment_(row: Tensor, col: Tensor, sq: Tensor, beta2: float,
                            column_mean: Callable = mean_over_rows) -> None:
    """Adafactor's factored EMA of ``sq`` (G² + ε1) over its last two dims, in place.

    ``row`` (shape ``sq.shape[:-1]``) tracks the mean over the last dim, ``col`` (``sq.shape[:-2] + sq.shape[-1:]``)
    the mean over the second-to-last dim, taken by ``column_mean`` (keepdim); the rank-1 reconstruction is in
    :func:`factored_rsqrt`. The row statistic never leaves its rows, so a row block's ``row`` is local under FSDP2.
    """
    row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
    col.mul_(beta2).add_(column_mean(sq).squeeze(-2), alpha=1 - beta2)


def factored_rsqrt(row: Tensor, col: Tensor, column_mean: Callable = mean_over_rows) -> Tensor:
    """``rsqrt`` of the rank-1 estimate ``V̂ = R Cᵀ / mean(R)`` as the outer product of two factors.

    Equal to the paper's sums form ``R_s C_sᵀ / Σ R_s``; computed as HF/fairseq do (row factor normalised by its
    mean, then multiplied by ``rsqrt(C)``), so results match ``transformers.optimization.Adafactor`` bitwise.
    ``mean(R)`` is the mean over all rows, taken by ``column_mean`` on ``R`` as a column (``[..., m, 1]``): the
    same reduction as ``row.mean(dim=-1)`` bit for bit, and a scalar all-reduce when ``row`` is a row block.
    """
    row_mean = column_mean(row.unsqueeze(-1)).squeeze(-1)
    r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def clip_by_rms_(update: Tensor, threshold: float, rms: Callable = rms) -> Tensor:
    """Scale ``update`` in place so that its RMS is at most ``threshold`` (Adafactor's update clipping). ``rms``
    measures the whole tensor (a scalar all-reduce when ``update`` is a row block)."""
    return update.div_((rms(update) / threshold).clamp_(min=1.0))


def global_rms(x: Tensor, rows: Rows) -> Tensor:
    """RMS of the whole tensor whose rows ``x`` holds (under FSDP2 RMS(U) and RMS(p) are scalar all-reduces;
    docs/optimizers/adafactor.md, "Distributed").

    Unsharded (one process, DDP): :func:`rms` itself, HF's ``norm(2) / sqrt(numel)``
    bit for bit. A row block: the sum of squares per row in fp32, across rows and ranks in fp64 (one 8-byte
    all-reduce), over the global element count; identical on every rank. Works on an empty block (0 rows), which
    still joins the all-reduce.
    """
    if not rows.sharded:
        return rms(x)
    width = math.prod(x.shape[1:])
    sum_sq = rows.sum(x.square().reshape(x.shape[0], width).sum(dim=-1).double().sum())
    return (sum_sq / max(rows.total * width, 1)).sqrt().to(x.dtype)


class Adafactor(MemtrainOptimizer):
    name = "adafactor"
    description = "Adafactor: factored second moment (≈0 B/param on matrices), update clipping; HF-identical"
    owns = frozenset(ROLES)  # every parameter: matrices factored, vectors unfactored
    needs_matrix_shape = True  # a factored moment cannot be formed on a flattened shard
    fsdp2 = True  # R local, C from all-reduced column sums (replicated), mean(R)/RMS(U)/RMS(p) scalar all-reduces
    deepspeed = False  # factored moments need the matrix shape

    def __init__(self, params, *, lr: float | None, weight_decay: float = 0.0, eps1: float = 1e-30,
                 eps2: float = 1e-3, clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 scale_parameter: bool = False, relative_step: bool = False, warmup_init: bool = False,
                 min_dim_to_factor: int = 0):
        if relative_step and lr is not None:
            raise ValueError(
                "adafactor: relative_step=True computes its own step size min(1e-2, 1/sqrt(t)) and ignores lr, so "
                f"lr={lr!r} would be silently unused; pass lr=None, or set relative_step=False to use the lr "
                "(HF Trainer's optim='adafactor' behaviour)"
            )
        if lr is None and not relative_step:
            raise ValueError("adafactor: lr=None needs relative_step=True; give an lr or set relative_step=True")
        if warmup_init and not relative_step:
            raise ValueError("adafactor: warmup_init=True requires relative_step=True")
        if not (isinstance(decay_rate, (int, float)) and -1.0 <= decay_rate < 0):
            raise ValueError(f"adafactor: decay_rate must lie in [-1, 0) so that beta2_t = 1 - t^c rises to 1, "
                             f"got {decay_rate!r}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"adafactor: beta1 must be None (no first moment) or lie in [0, 1), got {beta1!r}")
        for name, value in (("eps1", eps1), ("eps2", eps2), ("clip_threshold", clip_threshold)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"adafactor: {name} must be a finite number > 0, got {value!r}")
        if not isinstance(min_dim_to_factor, int) or min_dim_to_factor < 0:
            raise ValueError(f"adafactor: min_dim_to_factor must be an int >= 0, got {min_dim_to_factor!r}")
        super().__init__(params, lr=0.0 if lr is None else lr, weight_decay=weight_decay, eps1=eps1, eps2=eps2,
                         clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                         scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
                         min_dim_to_factor=min_dim_to_factor)
        # Adafactor owns every role, so the AdamW fallback's betas/eps never apply: drop them from the groups so
        # that the printed routing shows only what is used. With relative_step the lr is None, as in HF.
        for target in (self.defaults, *self.param_groups):
            target.pop("betas", None)
            target.pop("eps", None)
            if lr is None:
                target["lr"] = None

    @staticmethod
    def _factored(shape: tuple[int, ...], group: dict) -> bool:
        """Decided on the GLOBAL shape: under FSDP2 a rank's row count must not change the branch."""
        return len(shape) >= 2 and min(shape[-2:]) >= group["min_dim_to_factor"]

    @staticmethod
    def _step_size(group: dict, step: int, param: Tensor, rows: Rows) -> float | Tensor:
        """α_t: ρ_t (relative, or the group lr), times max(ε2, RMS(p)) with scale_parameter. A 0-d tensor when
        it depends on the parameter, so that no value is copied to the host."""
        rho = group["lr"]
        if group["relative_step"]:
            rho = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            return global_rms(param, rows).clamp(min=group["eps2"]) * rho
        return rho

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        grad = grad.float()
        shape = (rows.total, *param.shape[1:]) if rows.sharded else tuple(param.shape)  # the global shape
        factored = self._factored(shape, group)
        # FSDP2 splits dim 0. For a matrix that is the dim C averages over, so C and mean(R) are all-reduced
        # (Rows.column_mean: SUM of local sums / global m); R stays with its rows. For a >2-D tensor dim 0 is a
        # leading (batch) dim of the factorisation, so R, C and mean(R) are all per leading index: local.
        column_mean = rows.column_mean if len(shape) == 2 else mean_over_rows
        if not state:
            state["step"] = 0
            if group["beta1"] is not None:
                state["exp_avg"] = rows.keep(torch.zeros_like(grad))
            if factored:
                state["exp_avg_sq_row"] = rows.keep(grad.new_zeros(grad.shape[:-1]))
                col = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                # A matrix's [n] column statistic is replicated: a plain tensor, identical on every rank because
                # it is an EMA of all-reduced values (saved once by DCP). >2-D: sharded with the leading dim.
                state["exp_avg_sq_col"] = col if len(shape) == 2 else rows.keep(col)
            else:
                state["exp_avg_sq"] = rows.keep(torch.zeros_like(grad))
        state["step"] += 1
        step = state["step"]
        beta2 = 1.0 - math.pow(step, group["decay_rate"])  # 0 at t = 1: no bias correction needed

        with fp32_view(param) as p32:
            alpha = self._step_size(group, step, p32, rows)  # RMS(p) of the pre-step parameter
            sq = grad.square().add_(group["eps1"])  # ε1 added (HF), not used as a floor (torch.optim.Adafactor)
            if factored:
                row, col = local(state["exp_avg_sq_row"]), local(state["exp_avg_sq_col"])
                factored_second_moment_(row, col, sq, beta2, column_mean)
                update = factored_rsqrt(row, col, column_mean).mul_(grad)
            else:
                exp_avg_sq = local(state["exp_avg_sq"])
                exp_avg_sq.mul_(beta2).add_(sq, alpha=1.0 - beta2)
                update = exp_avg_sq.rsqrt().mul_(grad)
            del sq
            clip_by_rms_(update, group["clip_threshold"], lambda u: global_rms(u, rows)).mul_(alpha)
            if group["beta1"] is not None:  # momentum on the scaled, clipped update (T2T/HF)
                update = local(state["exp_avg"]).mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
            if group["weight_decay"] != 0:  # coupled to α_t, from the pre-step parameter: p - λα·p - U
                if torch.is_tensor(alpha):
                    p32.addcmul_(p32, alpha, value=-group["weight_decay"])
                else:
                    p32.add_(p32, alpha=-group["weight_decay"] * alpha)
            p32.add_(-update)

