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


# -- low-rank adapters (LoRA-Pro, ALLoRA, GradNormLoRP) --
def lorapro_grams(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """The fp64 r×r Grams ``BᵀB`` and ``AAᵀ`` of a LoRA pair."""
    A64, B64 = A.double(), B.double()
    return B64.T @ B64, A64 @ A64.T


def lorapro_eigh(gram_b: Tensor, gram_a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(e_B, Q_B, e_A, Q_A)``: eigendecompositions of the Grams (batched over leading dims), eigenvalues clamped
    at 0 (rounding can make them slightly negative)."""
    eb, qb = torch.linalg.eigh(gram_b)
    ea, qa = torch.linalg.eigh(gram_a)
    return eb.clamp_min(0), qb, ea.clamp_min(0), qa


def lorapro_adjust(A: Tensor, B: Tensor, a: Tensor, b: Tensor, *, scaling: float, delta: float,
                   sylvester: bool, eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's closed-form adjusted factor gradients (specs/lorapro.md §2.1).

    ``A [r, n]``, ``B [m, r]``, and a consistent gradient-like pair ``a [r, n]``, ``b [m, r]`` (true LoRA
    gradients ``s·BᵀG``, ``s·GAᵀ``). Returns ``(h_A, h_B)`` with ``s·(B h_A + h_B A)`` the orthogonal projection of
    G onto the tangent space of the rank-r manifold at BA. With ``sylvester`` the free r×r matrix X is the one
    that keeps (h_A, h_B) closest to (a, b); otherwise X = 0. Every r×r quantity is formed and solved in fp64
    (fp32 Grams of ill-conditioned factors are not numerically SPD); only the r×n and m×r products run in the
    factors' dtype. The m×m projector is never formed. ``eig``: ``lorapro_eigh(*lorapro_grams(A, B))``, if known
    (it depends on A and B only, so one decomposition serves both adjustments of a step, and can be batched).
    """
    dtype = A.dtype
    eb, qb, ea, qa = eig if eig is not None else lorapro_eigh(*lorapro_grams(A, B))
    b_inv = (qb / (eb + delta)) @ qb.T  # (BᵀB + δI)⁻¹
    a_inv = (qa / (ea + delta)) @ qa.T  # (AAᵀ + δI)⁻¹
    inv_s2 = 1.0 / scaling**2
    h_a = inv_s2 * (b_inv.to(dtype) @ a)
    b_perp = b - B @ (b_inv @ (B.double().T @ b.double())).to(dtype)  # (I − P_B) b
    h_b = inv_s2 * (b_perp @ a_inv.to(dtype))
    if sylvester:
        c = -inv_s2 * (b_inv @ (a.double() @ A.double().T))
        # (BᵀB) X + X (AAᵀ) = C, diagonalised by the two eigenbases.
        x = qb @ ((qb.T @ c @ qa) / (eb[:, None] + ea[None, :]).clamp_min(1e-30)) @ qa.T
        x = x.to(dtype)
        h_a = h_a + x @ A
        h_b = h_b - B @ x
    return h_a, h_b


def adam_direction_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, *, step: int, beta1: float, beta2: float,
                    eps: float, torch_eps: bool = True) -> Tensor:
    """Update Adam's moments with ``grad`` in place and return the bias-corrected direction (a new tensor).

    ``torch_eps``: ε added to the corrected root, ``m̂ / (sqrt(v̂) + ε)`` (torch / AdamW-T). Otherwise HF's
    AdamW convention: ``c_t · m / (sqrt(v) + ε)`` with ``c_t = sqrt(1 − β2^t) / (1 − β1^t)`` (AdamW-HF).
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    if torch_eps:
        return (exp_avg / bc1) / ((exp_avg_sq / bc2).sqrt_().add_(eps))
    return exp_avg / exp_avg_sq.sqrt().add_(eps) * (bc2**0.5 / bc1)


def lora_row_norm(A: Tensor, B: Tensor) -> Tensor:
    """``‖(B A)_{i,:}‖₂`` per output row i, without forming B A: ``sqrt(rowsum(B (AAᵀ) ⊙ B))``, O((m+n)·r²).

    Clamped at 0 before the root, since rounding can make a zero row's sum slightly negative."""
    return ((B @ (A @ A.T)) * B).sum(dim=1).clamp_min(0).sqrt()


def svd_projector(grad: Tensor, rank: int, side: int) -> Tensor:
    """GaLore's one-sided projector (specs/galore.md §2.1): ``Vh[:r]`` ``[r, n]`` for side 0 (right), ``U[:, :r]``
    ``[m, r]`` for side 1 (left), from an exact fp32 SVD of ``grad``; r is clipped to min(m, n)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return vh[:rank].contiguous() if side == 0 else u[:, :rank].contiguous()
