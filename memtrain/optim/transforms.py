"""Pure tensor functions shared by memtrain's optimizers.

Every optimizer step body is assembled from these pieces, so the math lives in one place. They take and return
plain fp32 tensors (or update fp32 tensors in place), know nothing about parameter groups, roles, sharding or
storage formats, and import only torch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

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


# -- the identity collective hooks --
#
# A transform that reduces over a matrix's rows takes the reduction as a hook whose default does it on the whole
# matrix. Under FSDP2 (rank k holds rows G_k) the optimizer passes ``distributed.Rows``'s collectives instead, so the
# same code runs on a row block; with these defaults every step is the unsharded computation, bitwise.


def _whole(t: Tensor) -> Tensor:
    """Default ``gram_sum``/``row_sum``/``gather``/``mine``: the tensor already covers every row."""
    return t


def _here(solve: Callable[[], Tensor], like: Tensor) -> Tensor:
    """Default ``on_owner``: this process is the only one, so it solves."""
    return solve()


# -- low-rank gradient projection (GaLore, Fira; specs/galore.md, fira.md) --
#
# Under FSDP2 (galore.md §7, fira.md §7) the solvers that need the whole G (svd_basis, randomized_basis, the side-1
# gram_eigh_basis) run on a gathered G on one rank; sign_fix_ works on a whole basis before it is broadcast; the
# side-0 Gram, the side-1 projection and the whole-matrix norms take a reduction hook.


@contextmanager
def ieee_fp32():
    """Full fp32 matmuls inside iterative solvers: TF32 (allowed on some GPUs) would perturb the basis."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = old


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


def sign_fix_(basis: Tensor, side: int) -> Tensor:
    """Flip each basis vector (rows of a side-0 ``[r, n]``, columns of a side-1 ``[m, r]``) so that its entry
    of largest magnitude is positive (the first such entry on ties). Makes the basis independent of the
    solver's sign convention. Needs the whole basis (under FSDP2 it runs before the basis is broadcast)."""
    vectors = basis if side == 0 else basis.T  # [r, d], a view: flips write through
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vectors.gather(1, idx))
    vectors.mul_(torch.where(signs == 0, torch.ones_like(signs), signs))
    return basis


def svd_basis(G: Tensor, rank: int, side: int) -> Tensor:
    """Top-``rank`` singular vectors of G from an exact fp32 SVD: ``Vh[:r]`` (side 0) or ``U[:, :r]`` (side 1).
    Needs the whole G (under FSDP2: gathered, and solved on one rank)."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return Vh[:rank].clone() if side == 0 else U[:, :rank].clone()  # clone: free the unused factor's storage


def gram_eigh_basis(G: Tensor, rank: int, side: int, *, gram_sum: Callable = _whole,
                    on_owner: Callable = _here) -> Tensor:
    """Top-``rank`` eigenvectors of ``GᵀG`` (side 0) or ``GGᵀ`` (side 1), by descending eigenvalue, sign-fixed.

    The side-0 Gram is what an FSDP2 refresh can all-reduce (galore.md §7): with G this rank's rows, ``gram_sum``
    sums ``G_kᵀG_k`` over ranks (n×n) and ``on_owner(solve, like)`` runs the eigensolver on one rank and broadcasts
    the ``[rank, n]`` basis into ``like`` elsewhere, so it is bitwise identical on all ranks. ``GGᵀ`` (side 1)
    pairs every row with every other: it needs the whole G."""
    with ieee_fp32():
        gram = gram_sum(G.T @ G) if side == 0 else G @ G.T

    def solve() -> Tensor:
        _, vecs = torch.linalg.eigh(gram)  # ascending
        top = vecs[:, -rank:].flip(1)
        return sign_fix_(top.T.contiguous() if side == 0 else top.contiguous(), side)

    d = gram.shape[0]
    return on_owner(solve, G.new_empty((rank, d) if side == 0 else (d, rank)))


def randomized_basis(G: Tensor, rank: int, side: int, generator: torch.Generator, niter: int = 2) -> Tensor:
    """Halko range finder (galore.md §2.2): the top-``rank`` left singular vectors of G (side 1), or the right
    ones via Gᵀ (side 0). Ω is drawn on the CPU from ``generator`` so the global RNG is never touched. Needs the
    whole G (under FSDP2: gathered, and solved on one rank)."""
    A = G if side == 1 else G.T  # we want A's left singular vectors
    d_s = min(A.shape)
    q = min(rank + max(8, math.ceil(rank / 8)), d_s)
    omega = torch.randn(A.shape[1], q, generator=generator, dtype=torch.float32).to(A.device)
    with ieee_fp32():
        Q = torch.linalg.qr(A @ omega).Q
        for _ in range(niter):
            Q = torch.linalg.qr(A @ (A.T @ Q)).Q
        U_small, _, _ = torch.linalg.svd(Q.T @ A, full_matrices=False)
        left = (Q @ U_small)[:, :rank]
    return left.contiguous() if side == 1 else left.T.contiguous()


def project(G: Tensor, P: Tensor, side: int, row_sum: Callable = _whole) -> Tensor:
    """The low-rank gradient: ``G Pᵀ`` ([m, r], side 0) or ``Pᵀ G`` ([r, n], side 1).

    Side 0 maps each row of G on its own. Side 1 sums over G's rows: with G and P this rank's rows (FSDP2),
    ``row_sum`` adds the ranks' ``P_kᵀ G_k`` (an r×n all-reduce)."""
    return G @ P.T if side == 0 else row_sum(P.T @ G)


def project_back(X: Tensor, P: Tensor, side: int) -> Tensor:
    """Back to full size: ``X P`` (side 0) or ``P X`` (side 1). Row by row, so a row block of X (side 0) or P
    (side 1) gives that block of the result."""
    return X @ P if side == 0 else P @ X


def hf_step_size(lr: float, step: int, beta1: float, beta2: float) -> float:
    """AdamW-HF's step size with the bias correction folded in: ``lr·√(1−β2ᵗ)/(1−β1ᵗ)`` (README §2.4)."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_hf_direction_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float, beta2: float,
                       eps: float) -> Tensor:
    """Update the moments in place and return ``N = M / (√V + ε)`` (AdamW-HF: ε on the uncorrected √V)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


def decay_after_(param: Tensor, *, lr: float, weight_decay: float) -> None:
    """AdamW-HF's decoupled decay, applied AFTER the update to the updated weight: ``W ← W − η·λ·W``."""
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


def adamw_hf_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, lr: float,
              beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW-HF step (README §2.4) in place on fp32 tensors; ``step`` is the counter after increment."""
    direction = adam_hf_direction_(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps)
    param.add_(direction, alpha=-hf_step_size(lr, step, beta1, beta2))
    decay_after_(param, lr=lr, weight_decay=weight_decay)


def fira_scaling(N: Tensor, R: Tensor, side: int, per: str = "vector",
                 norm: Callable = torch.linalg.vector_norm) -> Tensor:
    """Fira's φ = ‖N‖/(‖R‖ + 1e-8) per index of the non-projected dimension: rows (``[m, 1]``, side 0) or
    columns (``[1, n]``, side 1); ``per="matrix"`` gives one scalar (the Fira-matrix ablation), from ``norm``,
    the Frobenius norm of a whole matrix (an all-reduced norm where N and R are row blocks: FSDP2, side 0).
    The vector form reduces over the projected dim only, so it is local to a row block."""
    if per == "matrix":
        return norm(N) / (norm(R) + 1e-8)
    dim = 1 if side == 0 else 0
    return torch.linalg.vector_norm(N, dim=dim, keepdim=True) / (
        torch.linalg.vector_norm(R, dim=dim, keepdim=True) + 1e-8)


def limit_norm_growth(S: Tensor, prev: Tensor, gamma: float,
                      norm: Callable = torch.linalg.vector_norm) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter (code form): if ‖S‖ grew more than γ× since the previous (post-limit) norm,
    scale S down to exactly γ·prev. ``prev == 0`` (first step, or after an exactly zero residual) means no
    limiting. Branch-free, so no host sync. Returns the limited S and the new post-limit norm. ``norm`` gives
    ‖S‖_F of the whole matrix (where S is a row block, FSDP2: a scalar all-reduce, so the limit is global)."""
    size = norm(S)
    limiter = torch.clamp_min(size / (prev + 1e-8), gamma) / gamma
    limiter = torch.where(prev > 0, limiter, torch.ones_like(limiter))
    return S / limiter, size / limiter


# -- low-memory Adam family (Adafactor, SlimAdam) --
def rms(x: Tensor) -> Tensor:
    """Root mean square of all entries, as a 0-d tensor (no host sync). Empty tensors give 0."""
    return x.norm(2) / max(x.numel(), 1) ** 0.5


def mean_over_rows(x: Tensor) -> Tensor:
    """The mean over the second-to-last dim (keepdim): Adafactor's "over the rows" reduction, and the default
    ``column_mean`` of the two factored functions below. Under FSDP2 a sharded matrix passes
    ``distributed.Rows.column_mean`` instead (same values, all-reduced over the row blocks)."""
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
    mean: Callable | None = None,
) -> None:
    """AdamW-T (:func:`adamw_t_`, same operation order) whose second moment is averaged along ``dim``.

    ``exp_avg`` has the shape of ``param``; ``exp_avg_sq`` keeps ``dim`` with size 1 and broadcasts against it
    (SlimAdam, specs/slimadam.md §2). ``dim`` is a stored-tensor dim. ``mean`` (keepdim) replaces
    ``x.mean(dim=dim, keepdim=True)`` where ``dim`` is split across ranks (FSDP2: ``Rows.column_mean`` for dim 0).
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    sq = grad.square()
    exp_avg_sq.mul_(beta2).add_(sq.mean(dim=dim, keepdim=True) if mean is None else mean(sq), alpha=1 - beta2)
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


def column_mean(x: Tensor) -> Tensor:
    """Each column's mean over the rows (dim 0, keepdim). The default ``column_mean`` of the functions below;
    under FSDP2, where a rank holds only some rows, ``distributed.Rows.column_mean`` all-reduces it instead."""
    return x.mean(dim=0, keepdim=True)


def rms_normalize(x: Tensor, dim: int, eps: float = 1e-8, column_mean: Callable = column_mean) -> Tensor:
    """Divide ``x`` by its RMS over ``dim`` (``dim=1``: every row gets RMS 1; ``dim=0``: every column), with the
    RMS floored at ``eps`` so that an all-zero row/column stays zero (SCALE §2, one half-step of SinkGD)."""
    ms = column_mean(x.square()) if dim == 0 else x.square().mean(dim=dim, keepdim=True)
    return x / ms.sqrt_().clamp_(min=eps)


def sinkhorn(g: Tensor, iterations: int = 5, eps: float = 1e-8, column_mean: Callable = column_mean) -> Tensor:
    """SinkGD's square-root Sinkhorn (sinkgd.md §2): ``iterations`` alternations of row-, then column-RMS
    normalisation. Columns come last, so every column RMS is exactly 1; rows converge geometrically to RMS 1."""
    x = g
    for _ in range(iterations):
        x = rms_normalize(x, dim=1, eps=eps)
        x = rms_normalize(x, dim=0, eps=eps, column_mean=column_mean)
    return x


def standardize(g: Tensor, dim: int = 1, eps: float = 1e-8, rel_tol: float = 1e-5,
                column_mean: Callable = column_mean) -> Tensor:
    """SWAN's GradNorm (swan.md §2.1): subtract the mean over ``dim`` and divide by the population std.

    A slice whose std is at most ``max(eps, rel_tol·RMS)`` is constant (or zero) up to fp32 centering noise and
    becomes exactly 0; dividing by that noise would blow it up to unit RMS and break scale invariance. A slice
    holding NaN/Inf becomes NaN (never 0), as the non-finite policy says (docs/nonfinite.md).
    ``dim=1`` (rows, the default) is local under FSDP2's row sharding; ``dim=0`` takes its three column
    statistics from ``column_mean`` (``distributed.Rows.column_mean`` all-reduces them)."""
    def mean(t: Tensor) -> Tensor:
        return column_mean(t) if dim == 0 else t.mean(dim=dim, keepdim=True)

    x = g - mean(g)
    sigma = mean(x.square()).sqrt_()
    rms = mean(g.square()).sqrt_()
    # Written as "not constant" so that a NaN/Inf std (a non-finite entry) is kept and propagates like torch's
    # optimizers; "sigma > floor" is False for NaN and zeroed the row silently (docs/nonfinite.md).
    keep = ~(sigma <= (rms * rel_tol).clamp_(min=eps))
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


def whitening_side(m: int, n: int, centered_dim: int | None = 1) -> bool:
    """True when SWAN whitens an m×n matrix on the right (``XᵀX``): m > n, or square with rows centred (or
    nothing centred). The side rule of specs/README.md §2.1, with a square matrix going to the side whose Gram
    has the all-ones null vector, where :func:`whitening_root` deflates it."""
    return m > n or (m == n and centered_dim != 0)


def whitening_root(a: Tensor, *, steps: int, damping: float, deflate: bool) -> Tensor:
    """``Z ≈ (A'/‖A'‖_F)^{-1/2}`` from the short-side Gram ``A`` (swan.md §2.2), ``A' = A [+ (μA/d)·11ᵀ] + δ·μA·I``.

    ``deflate`` (the Gram of the centred side) adds the rank-one term that gives the all-ones null vector a
    typical eigenvalue (exact, because X is orthogonal to it), without which the coupled iteration amplifies
    rounding noise along it by 1.5× per step. The damping ``δ·μA·I`` keeps A' positive definite in fp32. An
    all-zero Gram (trace 0) runs the iteration on the identity instead, which gives Δ = 0 exactly without a NaN,
    without a host round trip and without a branch (so under FSDP2 every rank runs the same collectives)."""
    d = a.shape[0]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    mean_eig = a.diagonal().sum() / d
    if deflate:
        a = a + mean_eig / d
    a = a + (damping * mean_eig) * eye
    a = torch.where(mean_eig > 0, a, eye)
    return newton_schulz_inv_sqrt(a, steps)


@contextmanager
def _ieee_on_cuda(x: Tensor):
    """TF32 off for fp32 CUDA matmuls inside SWAN's solver (specs/README.md §2.3); nothing elsewhere. Only the new
    ``fp32_precision`` flag is touched: torch refuses mixing it with the legacy ``allow_tf32``."""
    flags = torch.backends.cuda.matmul
    ieee = x.is_cuda and x.dtype == torch.float32
    previous = flags.fp32_precision if ieee else None
    if ieee:
        flags.fp32_precision = "ieee"
    try:
        yield
    finally:
        if ieee:
            flags.fp32_precision = previous


def whiten(x: Tensor, *, steps: int = 10, damping: float = 1e-6, centered_dim: int | None = 1,
           total_rows: int | None = None, gram_sum: Callable = _whole, gather: Callable = _whole,
           mine: Callable = _whole, on_owner: Callable = _here) -> Tensor:
    """SWAN's GradWhitening (swan.md §2.2): approximately the polar factor of ``x``, not yet rescaled.

    The short side's Gram is used (right, ``Δ = X·Z`` with ``Z`` from ``XᵀX``, when m > n; left, ``Δ = Z·X`` from
    ``XXᵀ``, when m < n; square: :func:`whitening_side`), and :func:`whitening_root` turns it into ``Z``.
    ``centered_dim`` is the dim GradNorm centred (its Gram is deflated).

    The defaults whiten the whole matrix ``x``. Under FSDP2 (swan.md §7) ``x`` is this rank's rows of a
    ``total_rows``-row matrix and the hooks are the collectives of ``distributed.Rows``, so the same code runs:

    * right side: ``gram_sum`` all-reduces the n×n Gram (``Σ_k X_kᵀX_k``), ``on_owner(solve, like)`` runs
      ``solve()`` on one rank and broadcasts the result into ``like`` elsewhere (so Z is bitwise identical on all
      ranks), and ``Δ_k = X_k·Z`` is local;
    * left side: ``gather`` assembles the whole X on every rank, ``on_owner`` solves ``Z`` from ``XXᵀ`` on one
      rank and broadcasts it (m² < m·n floats, cheaper than Δ), and ``Δ_k = mine(Z)·X`` uses this rank's rows.

    With the identity defaults every step is the unsharded computation, bitwise."""
    m, n = (x.shape[0] if total_rows is None else total_rows), x.shape[1]
    right = whitening_side(m, n, centered_dim)
    deflate = centered_dim == (1 if right else 0)
    with _ieee_on_cuda(x):
        if right:
            a = gram_sum(x.T @ x)
            z = on_owner(lambda: whitening_root(a, steps=steps, damping=damping, deflate=deflate),
                         torch.empty_like(a))
            return x @ z
        full = gather(x)
        z = on_owner(lambda: whitening_root(full @ full.T, steps=steps, damping=damping, deflate=deflate),
                     x.new_empty((m, m)))
        return mine(z) @ full


def frobenius_sq(x: Tensor) -> Tensor:
    """``‖x‖_F²`` of a 2-D tensor as a 0-d fp64 tensor: summed per row in x's dtype, across rows in fp64 (an empty
    ``x`` gives 0)."""
    return x.square().sum(dim=-1).double().sum()


def unit_rms(delta: Tensor, norm_sq: Callable = frobenius_sq, numel: int | None = None) -> Tensor:
    """Rescale ``delta`` to entry-RMS 1 (swan.md §2.3); zero stays zero. ``‖Δ‖²`` is summed per row in fp32 and
    across rows in fp64: an fp32 total over ~1e5 entries is off by ~2e-6, more than the unit-RMS tolerance.
    Under FSDP2 ``delta`` is this rank's rows, ``norm_sq`` all-reduces the fp64 partial sums and ``numel`` is the
    global matrix's element count."""
    sq = norm_sq(delta)
    numel = delta.numel() if numel is None else numel
    scale = torch.where(sq > 0, (numel / sq).sqrt(), torch.zeros_like(sq))
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
                   sylvester: bool, eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                   row_sum: Callable = lambda t: t) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's closed-form adjusted factor gradients (specs/lorapro.md §2.1).

    ``A [r, n]``, ``B [m, r]``, and a consistent gradient-like pair ``a [r, n]``, ``b [m, r]`` (true LoRA
    gradients ``s·BᵀG``, ``s·GAᵀ``). Returns ``(h_A, h_B)`` with ``s·(B h_A + h_B A)`` the orthogonal projection of
    G onto the tangent space of the rank-r manifold at BA. With ``sylvester`` the free r×r matrix X is the one
    that keeps (h_A, h_B) closest to (a, b); otherwise X = 0. Every r×r quantity is formed and solved in fp64
    (fp32 Grams of ill-conditioned factors are not numerically SPD); only the r×n and m×r products run in the
    factors' dtype. The m×m projector is never formed. ``eig``: ``lorapro_eigh(*lorapro_grams(A, B))``, if known
    (it depends on A and B only, so one decomposition serves both adjustments of a step, and can be batched).
    Under FSDP2 ``B``/``b`` (and so ``h_B``) may be this rank's rows while ``A``/``a`` are whole: the only sum over
    B's rows, ``Bᵀb``, then goes through ``row_sum`` (an r×r all-reduce), and ``eig`` must come from the
    all-reduced ``BᵀB`` (specs/lorapro.md §7).
    """
    dtype = A.dtype
    eb, qb, ea, qa = eig if eig is not None else lorapro_eigh(*lorapro_grams(A, B))
    b_inv = (qb / (eb + delta)) @ qb.T  # (BᵀB + δI)⁻¹
    a_inv = (qa / (ea + delta)) @ qa.T  # (AAᵀ + δI)⁻¹
    inv_s2 = 1.0 / scaling**2
    h_a = inv_s2 * (b_inv.to(dtype) @ a)
    b_perp = b - B @ (b_inv @ row_sum(B.double().T @ b.double())).to(dtype)  # (I − P_B) b
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
