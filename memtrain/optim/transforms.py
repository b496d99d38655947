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


# -- stateless matrix transforms: SWAN, SinkGD, SCALE (specs/swan.md, sinkgd.md, scale.md) --
#
# Every function below maps a gradient-like fp32 matrix in the [out, in] orientation (specs/README.md §2.1) to an
# update direction. Each division is guarded so that a zero gradient (or a zero row/column) gives an exactly zero
# direction with no NaN, and nothing reads a value back to the host, so the functions never synchronise a GPU.


def as_out_in(t: Tensor, layout: str) -> Tensor:
    """The ``[out, in]`` view of a weight-shaped tensor: GPT-2 ``Conv1D`` stores ``[in, out]``. In-place ops on
    the returned view write through to ``t``."""
    return t.t() if layout == "conv1d" else t


def descend_(param: Tensor, direction: Tensor, *, lr: float, weight_decay: float) -> None:
    """``W ← W·(1 − η·λ); W ← W − η·Δ`` in place: decoupled decay first, then the step (every stateless branch)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(direction, alpha=-lr)


def rms_normalize(x: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Divide ``x`` by its RMS over ``dim`` (``dim=1``: every row gets RMS 1; ``dim=0``: every column), with the
    RMS floored at ``eps`` so that an all-zero row/column stays zero (SCALE §2, one half-step of SinkGD)."""
    rms = x.square().mean(dim=dim, keepdim=True).sqrt_().clamp_(min=eps)
    return x / rms


def sinkhorn(g: Tensor, iterations: int = 5, eps: float = 1e-8) -> Tensor:
    """SinkGD's square-root Sinkhorn (sinkgd.md §2): ``iterations`` alternations of row-, then column-RMS
    normalisation. Columns come last, so every column RMS is exactly 1; rows converge geometrically to RMS 1."""
    x = g
    for _ in range(iterations):
        x = rms_normalize(x, dim=1, eps=eps)
        x = rms_normalize(x, dim=0, eps=eps)
    return x


def standardize(g: Tensor, dim: int = 1, eps: float = 1e-8, rel_tol: float = 1e-5) -> Tensor:
    """SWAN's GradNorm (swan.md §2.1): subtract the mean over ``dim`` and divide by the population std.

    A slice whose std is at most ``max(eps, rel_tol·RMS)`` is constant (or zero) up to fp32 centering noise and
    becomes exactly 0; dividing by that noise would blow it up to unit RMS and break scale invariance."""
    x = g - g.mean(dim=dim, keepdim=True)
    sigma = x.square().mean(dim=dim, keepdim=True).sqrt_()
    rms = g.square().mean(dim=dim, keepdim=True).sqrt_()
    keep = sigma > (rms * rel_tol).clamp_(min=eps)
    return torch.where(keep, x / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(x))


def newton_schulz_inv_sqrt(a: Tensor, steps: int) -> Tensor:
    """Coupled Newton–Schulz (step factor ½) for ``(A/‖A‖_F)^{-1/2}`` of a symmetric positive definite ``A``
    (swan.md §2.2). Normalising by the Frobenius norm puts every eigenvalue in (0, 1], where it converges.

    Per step ``T = 3I − ZY; Y ← ½·YT; Z ← ½·TZ``. Two products of the first step (with Z = I) and the last ``Y``
    update (never read) are skipped: the result is bitwise the same, with 3k − 3 products instead of 3k."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    y = a / torch.linalg.matrix_norm(a)
    t = 3 * eye - y  # step 1: Z = I, so ZY = Y and TZ = T exactly
    z = 0.5 * t
    for step in range(1, steps):
        y = 0.5 * (y @ t)  # the Y of step ``step``, built from the previous T
        t = 3 * eye - z @ y
        z = 0.5 * (t @ z)
    return z


def whiten(x: Tensor, *, steps: int = 10, damping: float = 1e-6, centered_dim: int | None = 1) -> Tensor:
    """SWAN's GradWhitening (swan.md §2.2): approximately the polar factor of ``x``, not yet rescaled.

    The short side's Gram is used (right, ``XᵀX``, when m > n; left, ``XXᵀ``, when m < n). ``centered_dim`` is the
    dim that GradNorm centred: it makes the all-ones vector a null vector of one Gram (``XᵀX`` for rows centred,
    ``XXᵀ`` for columns), and a square matrix takes that side (right for the default rows, as the side rule of
    specs/README.md §2.1 says). On that side the rank-one deflation ``(μA/d)·11ᵀ`` gives the null vector a
    typical eigenvalue (exact, because X is orthogonal to it), without which the coupled iteration amplifies
    rounding noise along it by 1.5× per step. The damping ``δ·μA·I`` keeps the Gram positive definite in fp32.
    An all-zero ``x`` (trace 0) runs the iteration on the identity instead, which gives Δ = 0 exactly without a
    NaN and without a host round trip."""
    m, n = x.shape
    right = m > n or (m == n and centered_dim != 0)
    flags = torch.backends.cuda.matmul
    ieee = x.is_cuda and x.dtype == torch.float32  # TF32 off in the solver (specs/README.md §2.3)
    previous = flags.fp32_precision if ieee else None  # the new flag API only: torch refuses mixing it with
    if ieee:                                            # the legacy ``allow_tf32``
        flags.fp32_precision = "ieee"
    try:
        a = x.T @ x if right else x @ x.T
        d = a.shape[0]
        eye = torch.eye(d, dtype=a.dtype, device=a.device)
        mean_eig = a.diagonal().sum() / d
        if centered_dim == (1 if right else 0):
            a = a + mean_eig / d
        a = a + (damping * mean_eig) * eye
        a = torch.where(mean_eig > 0, a, eye)
        z = newton_schulz_inv_sqrt(a, steps)
        return x @ z if right else z @ x
    finally:
        if ieee:
            flags.fp32_precision = previous


def unit_rms(delta: Tensor) -> Tensor:
    """Rescale ``delta`` to entry-RMS 1 (swan.md §2.3); zero stays zero. ``‖Δ‖²`` is summed per row in fp32 and
    across rows in fp64: an fp32 total over ~1e5 entries is off by ~2e-6, more than the unit-RMS tolerance."""
    sq = delta.square().sum(dim=-1).double().sum()
    scale = torch.where(sq > 0, (delta.numel() / sq).sqrt(), torch.zeros_like(sq))
    return delta * scale.to(delta.dtype)


def adamw_scale_(
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
    """SCALE's AdamW for 1-D parameters (scale.md §2 d), in place on fp32 tensors: decay BEFORE the update as in
    AdamW-T, but ε added to the UNcorrected sqrt as in AdamW-HF, with both moments as lerps (the official order)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    direction = exp_avg / exp_avg_sq.sqrt().add_(eps)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(direction, alpha=-lr * bias_correction2**0.5 / bias_correction1)
