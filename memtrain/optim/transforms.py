"""Pure tensor primitives that two or more memtrain methods share.

A method's own math lives next to its class (``swan.py``, ``sinkgd.py``, ``galore.py``, ``fira.py``,
``adafactor.py``, ``slimadam.py``, ``adapters/lorapro.py`` …). What is here is used by several of them: the Adam
moment kernel (every AdamW fallback, ``adamw``, ``adam4bit``, ``slimadam``, SCALE's vector AdamW, GaLore/Fira, and
the adapters), the low-rank projection (GaLore, Fira, GradNormLoRP), the IEEE-fp32 matmul context (GaLore's solvers,
SWAN's whitening), and the steps of the stateless matrix methods (SWAN, SinkGD, SCALE). The functions take and
return plain fp32 tensors (or update them in place), know nothing about parameter groups, roles, sharding or
storage formats, and import only torch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


# -- the Adam moment kernel ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamConvention:
    """How one Adam-family implementation writes the step (docs/registry-and-routing.md, "AdamW conventions").

    The conventions differ only in rounding, but memtrain matches each reference bit for bit, so the operation
    order of each is kept exactly."""

    #: First moment as ``m.lerp_(g, 1−β1)`` (torch) or ``m·β1 + (1−β1)·g`` (HF transformers' AdamW, GaLore).
    lerp_first: bool = True
    #: Second moment as ``v.lerp_(g², 1−β2)`` (SCALE's official code) or ``v·β2 + (1−β2)·g⊙g``.
    lerp_second: bool = False
    #: ε added to the bias-corrected ``√v̂`` (torch), or to the raw ``√v`` with the bias correction folded into
    #: the step size ``η·√(1−β2ᵗ)/(1−β1ᵗ)`` (HF, SCALE).
    corrected_eps: bool = True
    #: Decoupled decay applied to the updated weight (HF: ``W ← W − η·λ·W`` after the step) instead of first
    #: (torch: ``W ← W·(1 − η·λ)``).
    decay_after: bool = False
    #: ``√(1−β2ᵗ)`` of the step size as a float power (SCALE's official code) rather than ``math.sqrt`` (HF):
    #: the two differ in the last bit for about 0.1% of steps.
    pow_root: bool = False


#: AdamW-T: ``torch.optim.AdamW(foreach=False)``, the fallback of every method and the whole of ``adamw``.
TORCH = AdamConvention()
#: AdamW-HF: transformers' (deprecated) AdamW and GaLore's ``GaLoreAdamW``.
HF = AdamConvention(lerp_first=False, corrected_eps=False, decay_after=True)
#: SCALE's AdamW for 1-D parameters: decay first as in AdamW-T, ε on the uncorrected root as in AdamW-HF, both
#: moments as lerps (the official order).
SCALE = AdamConvention(lerp_second=True, corrected_eps=False, pow_root=True)


def hf_step_size(lr: float, step: int, beta1: float, beta2: float, pow_root: bool = False) -> float:
    """The step size with the bias correction folded in: ``lr·√(1−β2ᵗ)/(1−β1ᵗ)``."""
    bias_correction2 = 1.0 - beta2**step
    root = bias_correction2**0.5 if pow_root else math.sqrt(bias_correction2)
    return lr * root / (1.0 - beta1**step)


def adam_moments_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float, beta2: float,
                  convention: AdamConvention = TORCH, second_mean: Callable | None = None) -> None:
    """Update both moments with ``grad`` in place. ``second_mean`` (keepdim) averages ``g²`` along an axis before
    it enters the second moment (SlimAdam's compressed ``exp_avg_sq``, which broadcasts against ``grad``)."""
    if convention.lerp_first:
        exp_avg.lerp_(grad, 1 - beta1)
    else:
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    if second_mean is not None:
        exp_avg_sq.mul_(beta2).add_(second_mean(grad.square()), alpha=1 - beta2)
    elif convention.lerp_second:
        exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_direction_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, beta1: float, beta2: float,
                    eps: float, convention: AdamConvention = TORCH) -> Tensor:
    """Update the moments (:func:`adam_moments_`) and return Adam's direction as a new tensor, for methods that
    transform it further (GaLore's projection back, LoRA-Pro's map to the factors).

    ``corrected_eps``: ``m̂ / (√v̂ + ε)``. Otherwise ``m / (√v + ε)``, uncorrected: the caller folds the bias
    correction in (:func:`hf_step_size`). ``step`` is the counter after increment."""
    adam_moments_(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, convention=convention)
    if convention.corrected_eps:
        return (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps))
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def adam_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, lr: float, beta1: float,
          beta2: float, eps: float, weight_decay: float, convention: AdamConvention = TORCH,
          second_mean: Callable | None = None) -> None:
    """One AdamW step in place on fp32 tensors, in ``convention``; ``step`` is the counter after increment.

    :data:`TORCH` has exactly the operation order of ``torch.optim.AdamW(foreach=False)``, so an fp32 parameter
    updated here is bit-identical to torch's: decoupled decay first, then the moments, then the bias-corrected
    step with ε added to the corrected square root."""
    if weight_decay != 0 and not convention.decay_after:
        param.mul_(1 - lr * weight_decay)
    adam_moments_(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, convention=convention,
                  second_mean=second_mean)
    if convention.corrected_eps:
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
        return
    direction = exp_avg / exp_avg_sq.sqrt().add_(eps)
    step_size = hf_step_size(lr, step, beta1, beta2, convention.pow_root)
    if convention.decay_after:
        descend_(param, direction, lr=lr, weight_decay=weight_decay, step_size=step_size, decay_after=True)
    else:  # decayed first, above
        param.add_(direction, alpha=-step_size)


def descend_(param: Tensor, direction: Tensor, *, lr: float, weight_decay: float, step_size: float | None = None,
             decay_after: bool = False) -> None:
    """``W ← W − s·Δ`` in place (``s = step_size``, default ``lr``), with decoupled decay ``η·λ``: first,
    ``W ← W·(1 − η·λ)`` (torch; every stateless branch), or ``decay_after``, on the updated weight,
    ``W ← W − η·λ·W`` (AdamW-HF, GaLore)."""
    if weight_decay != 0 and not decay_after:
        param.mul_(1 - lr * weight_decay)
    param.add_(direction, alpha=-(lr if step_size is None else step_size))
    if weight_decay != 0 and decay_after:
        param.add_(param, alpha=-lr * weight_decay)


# -- the identity collective hooks --------------------------------------------------------------------------------
#
# A transform that reduces over a matrix's rows takes the reduction as a hook whose default does it on the whole
# matrix. Under FSDP2 (rank k holds rows G_k) the optimizer passes ``sharding.Rows``'s collectives instead, so the
# same code runs on a row block; with these defaults every step is the unsharded computation, bitwise.


def _whole(t: Tensor) -> Tensor:
    """Default ``gram_sum``/``row_sum``/``gather``/``mine``: the tensor already covers every row."""
    return t


def _here(solve: Callable[[], Tensor], like: Tensor) -> Tensor:
    """Default ``on_owner``: this process is the only one, so it solves."""
    return solve()


#: The working dtypes an option may name (muon's and swan's ``ns_dtype``, scale's ``state_dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextmanager
def ieee_fp32():
    """Full fp32 matmuls inside iterative solvers (GaLore's bases, SWAN's whitening): TF32, which some GPUs allow
    for fp32 matmuls, would perturb the result. Only the new ``fp32_precision`` flag is touched: torch refuses
    mixing it with the legacy ``allow_tf32``. It has no effect on CPU tensors or on other dtypes."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = old


# -- low-rank gradient projection (GaLore, Fira, GradNormLoRP; docs/optimizers/galore.md) ------------------------
def projector_side(m: int, n: int, proj_type: str = "std") -> int:
    """0 = right (P is ``[r, n]``, ``R = G Pᵀ``), 1 = left (P is ``[m, r]``, ``R = Pᵀ G``).

    "std" projects the longer side away, which keeps the moments at ``r × max(m, n)``: right when m ≥ n."""
    if proj_type == "std":
        return 0 if m >= n else 1
    if proj_type == "reverse_std":
        return 1 if m >= n else 0
    if proj_type in ("right", "left"):
        return 0 if proj_type == "right" else 1
    raise ValueError(f"proj_type must be one of std, reverse_std, left, right; got {proj_type!r}")


def svd_basis(G: Tensor, rank: int, side: int) -> Tensor:
    """Top-``rank`` singular vectors of G from an exact fp32 SVD: ``Vh[:r]`` (side 0) or ``U[:, :r]`` (side 1).
    Needs the whole G (under FSDP2: gathered, and solved on one rank)."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return Vh[:rank].clone() if side == 0 else U[:, :rank].clone()  # clone: free the unused factor's storage


def project(G: Tensor, P: Tensor, side: int, row_sum: Callable = _whole) -> Tensor:
    """The low-rank gradient: ``G Pᵀ`` ([m, r], side 0) or ``Pᵀ G`` ([r, n], side 1).

    Side 0 maps each row of G on its own. Side 1 sums over G's rows: with G and P this rank's rows (FSDP2),
    ``row_sum`` adds the ranks' ``P_kᵀ G_k`` (an r×n all-reduce)."""
    return G @ P.T if side == 0 else row_sum(P.T @ G)


def project_back(X: Tensor, P: Tensor, side: int, *, add_to: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """Back to full size: ``X P`` (side 0) or ``P X`` (side 1). Row by row, so a row block of X (side 0) or P
    (side 1) gives that block of the result. With ``add_to``: ``add_to + alpha·back(X)`` as one fused product
    (``addmm``), without the full-size temporaries of a separate scale and add."""
    a, b = (X, P) if side == 0 else (P, X)
    return a @ b if add_to is None else torch.addmm(add_to, a, b, alpha=alpha)


# -- the stateless matrix methods' steps (SWAN, SinkGD, SCALE) ----------------------------------------------------
#
# Each method maps a gradient-like fp32 matrix in the [out, in] orientation to an update direction. Each division is
# guarded so that a zero gradient (or a zero row/column) gives an exactly zero direction with no NaN, and nothing
# reads a value back to the host, so the functions never synchronise a GPU.


def as_out_in(t: Tensor, layout: str) -> Tensor:
    """The ``[out, in]`` view of a weight-shaped tensor: GPT-2 ``Conv1D`` stores ``[in, out]``. In-place ops on
    the returned view write through to ``t``."""
    return t.t() if layout == "conv1d" else t


def column_mean(x: Tensor) -> Tensor:
    """Each column's mean over the rows (dim -2, keepdim; a stack ``[B, m, n]`` of matrices gives each its own): the
    default ``column_mean`` hook of the row/column statistics; under FSDP2, where a rank holds only some rows,
    ``sharding.Rows.column_mean`` all-reduces it."""
    return x.mean(dim=-2, keepdim=True)


def rms_normalize(x: Tensor, dim: int, eps: float = 1e-8, column_mean: Callable = column_mean) -> Tensor:
    """Divide ``x`` by its RMS over ``dim`` of its last two dims (``dim=1`` or -1: every row gets RMS 1; ``dim=0`` or
    -2: every column; leading dims are a batch of matrices), with the RMS floored at ``eps`` so that an all-zero
    row/column stays zero (SCALE's normalisation, one half-step of SinkGD)."""
    ms = column_mean(x.square()) if dim in (0, -2) else x.square().mean(dim=-1, keepdim=True)
    return x / ms.sqrt_().clamp_(min=eps)
