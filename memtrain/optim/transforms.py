"""Pure tensor functions shared by memtrain's optimizers.

Every optimizer step body is assembled from these pieces, so the math lives in one place. They take and return
plain fp32 tensors (or update fp32 tensors in place), know nothing about parameter groups, roles, sharding or
storage formats, and import only torch.
"""
from __future__ import annotations

import torch
from torch import Tensor


def adamw_t_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in the torch convention ("AdamW-T", specs/README.md §2.4), in place on fp32 tensors.

    The operation order is exactly that of ``torch.optim.AdamW(foreach=False)`` so that an fp32 parameter
    updated here is bit-identical to torch's: decoupled decay first, then the moments, then the
    bias-corrected step with ε added to the corrected square root. ``step`` is the counter after increment.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


# -- low-memory Adam family (Adafactor, SlimAdam) --
def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries, as a 0-d tensor (no host sync). Empty tensors give 0."""
    return x.norm(2) / max(x.numel(), 1) ** 0.5


def factored_second_moment_(row: Tensor, col: Tensor, sq: Tensor, beta2: float) -> None:
    """Adafactor's factored EMA of ``sq`` (G² + ε1) over its last two dims, in place.

    ``row`` (shape ``sq.shape[:-1]``) tracks the mean over the last dim, ``col`` (``sq.shape[:-2] + sq.shape[-1:]``)
    the mean over the second-to-last dim; the rank-1 reconstruction is in :func:`factored_rsqrt`.
    """
    row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
    col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1 - beta2)


def factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """``rsqrt`` of the rank-1 estimate ``V̂ = R Cᵀ / mean(R)`` as the outer product of two factors.

    Equal to the paper's sums form ``R_s C_sᵀ / Σ R_s``; computed as HF/fairseq do (row factor normalised by its
    mean, then multiplied by ``rsqrt(C)``), so results match ``transformers.optimization.Adafactor`` bitwise.
    """
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


def clip_by_rms_(update: Tensor, threshold: float) -> Tensor:
    """Scale ``update`` in place so that its RMS is at most ``threshold`` (Adafactor's update clipping)."""
    return update.div_((rms(update) / threshold).clamp_(min=1.0))


def slim_adamw_t_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    dim: int,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW-T (:func:`adamw_t_`, same operation order) whose second moment is averaged along ``dim``.

    ``exp_avg`` has the shape of ``param``; ``exp_avg_sq`` keeps ``dim`` with size 1 and broadcasts against it
    (SlimAdam, specs/slimadam.md §2). ``dim`` is a stored-tensor dim.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_(grad.square().mean(dim=dim, keepdim=True), alpha=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def second_moment_snr(v: Tensor, dim: int) -> Tensor:
    """SlimAdam's compressibility score of a second moment ``v`` along ``dim`` (specs/slimadam.md §3).

    For every slice along ``dim``: ``mean² / var`` (population variance), then the mean over the slices. A slice
    with zero variance and a nonzero mean counts as +inf (perfectly compressible); an all-zero slice is skipped.
    Returns a 0-d fp64 tensor (NaN when every slice is all-zero).
    """
    v = v.double()
    mean = v.mean(dim=dim)
    var = v.var(dim=dim, unbiased=False)
    nonzero = v.ne(0).any(dim=dim)
    snr = torch.where(var > 0, mean.square() / var.clamp(min=torch.finfo(v.dtype).tiny), torch.inf)
    snr = snr[nonzero]
    return snr.mean() if snr.numel() else torch.tensor(float("nan"), dtype=torch.float64)
