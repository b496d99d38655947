"""``swan``: SGD with row standardisation and whitening, stateless on the hidden matrices (Ma et al., arXiv 2412.13148;
docs/optimizers/swan.md).

For every ``matrix`` gradient G (``[out, in]``): GradNorm standardises each row, GradWhitening maps the result to
(approximately) its polar factor with a deflated, damped coupled Newton–Schulz iteration on the short side's
Gram, and the update is rescaled to entry-RMS 1. No state is kept for these matrices. Embedding, head and vector
parameters get the shared AdamW-T fallback at ``adam_lr``, as in the paper's recipe.
"""
from __future__ import annotations

import warnings

from typing import Callable, Literal

import torch
from torch import Tensor

from .sharding import Rows, unsharded
from .base import MemtrainOptimizer, _check_hyper, fp32_view
from .transforms import DTYPES, _here, _whole, as_out_in, column_mean, descend_, ieee_fp32


def standardize(g: Tensor, dim: int = 1, eps: float = 1e-8, rel_tol: float = 1e-5,
                column_mean: Callable = column_mean) -> Tensor:
    """SWAN's GradNorm (docs/optimizers/swan.md, "Update"): subtract the mean over ``dim`` and divide by the population
    std. ``dim`` counts in the last two dims (1 or -1: rows, 0 or -2: columns); leading dims are a batch of matrices.

    A slice whose std is at most ``max(eps, rel_tol·RMS)`` is constant (or zero) up to fp32 centering noise and
    becomes exactly 0; dividing by that noise would blow it up to unit RMS and break scale invariance. A slice
    holding NaN/Inf becomes NaN (never 0), as the non-finite policy says (docs/nonfinite.md).
    ``dim=1`` (rows, the default) is local under FSDP2's row sharding; ``dim=0`` takes its three column
    statistics from ``column_mean`` (``sharding.Rows.column_mean`` all-reduces them)."""
    def mean(t: Tensor) -> Tensor:
        return column_mean(t) if dim in (0, -2) else t.mean(dim=-1, keepdim=True)

    x = g - mean(g)
    sigma = mean(x.square()).sqrt_()
    rms = mean(g.square()).sqrt_()
    # Written as "not constant" so that a NaN/Inf std (a non-finite entry) is kept and propagates like torch's
    # optimizers; "sigma > floor" is False for NaN and zeroed the row silently (docs/nonfinite.md).
    keep = ~(sigma <= (rms * rel_tol).clamp_(min=eps))
    return torch.where(keep, x / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(x))


#: The quintic's coefficients (a, b, c) of the Muon reference (Jordan et al. 2024): chosen to maximise the slope at
#: 0, so that small singular values grow fast (×3.44 per step, against ×1.5 for Newton–Schulz); the iteration then
#: oscillates in about [0.7, 1.2] rather than converging to 1.
QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz_inv_sqrt(a: Tensor, steps: int, quintic_steps: int = 0) -> Tensor:
    """Coupled Newton–Schulz (step factor ½) for ``(A/‖A‖_F)^{-1/2}`` of a symmetric positive definite ``A``
    (docs/optimizers/swan.md, "Update"). Normalising by the Frobenius norm puts every eigenvalue in (0, 1], where it
    converges.

    Per step ``H = ½(3I − ZY) = 1.5·I − ½·ZY; Y ← YH; Z ← HZ``. H is one fused multiply-add (``addmm``/``baddbmm``:
    ``1.5·I`` plus ``−½·ZY`` inside the product), so a step is three products and nothing else; scaling by ½ is exact
    in binary floating point, so this is the textbook ``T = 3I − ZY; Y ← ½·YT; Z ← ½·TZ`` up to the products'
    summation order. Two products of the first step (with Z = I) and the last ``Y`` update (never read) are
    skipped: 3k − 3 products instead of 3k. A stack ``[B, d, d]`` runs the iteration on each matrix (batched
    products).

    ``quintic_steps`` steps come first with ``H = aI + bM + cM²`` (``M = ZY``; (a, b, c) = :data:`QUINTIC`, one
    product more per step): each multiplies the singular values ``σ`` of ``X·Z`` by ``a + bσ² + cσ⁴``, ×3.44 for
    small ones where a Newton–Schulz step gives ×1.5, and leaves the rest in about [0.7, 1.2] for the Newton–Schulz
    steps to converge (docs/optimizers/swan.md, "Cost")."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    y = a / torch.linalg.matrix_norm(a, keepdim=True)
    fused = torch.baddbmm if a.dim() == 3 else torch.addmm
    qa, qb, qc = QUINTIC
    three_halves, quintic_a = 1.5 * eye, qa * eye
    z = None  # Z = I until the first step
    for step in range(quintic_steps + steps):
        if step < quintic_steps:
            m = y if z is None else z @ y
            h = fused(torch.add(quintic_a, m, alpha=qb), m, m, alpha=qc)
        else:
            h = three_halves - 0.5 * y if z is None else fused(three_halves, z, y, alpha=-0.5)
        z = h if z is None else h @ z
        if step < quintic_steps + steps - 1:  # the last Y is never read
            y = y @ h
    return z


def newton_schulz_spectral(a: Tensor, steps: int, quintic_steps: int = 0) -> Tensor:
    """:func:`newton_schulz_inv_sqrt`'s Z computed through one eigendecomposition ``A/‖A‖_F = V·diag(λ)·Vᵀ``
    (``swan``'s ``ns_eval=eigh``; docs/optimizers/swan.md, "Cost per step").

    Every iterate of the coupled iteration is a polynomial in A, so it acts on each eigenvalue on its own:
    ``Z = V·diag(z_k(λ))·Vᵀ``, where ``z_k`` runs the same recurrence (the same quintic and Newton–Schulz steps) on
    the scalars λ, here in fp64. That is the same finite-k map, not the exact inverse square root: an fp32
    ``eigh`` plus one product instead of 3k − 3 products. A Gram holding NaN/Inf gives a NaN Z (LAPACK's
    result there is undefined), with no host round trip. CPU only: on CUDA ``eigh`` checks its result on the host."""
    if a.device.type != "cpu":
        raise ValueError(f"ns_eval=eigh runs on CPU tensors only, got {a.device.type}: on a GPU torch.linalg.eigh "
                         "synchronises with the host every step and the products are faster; use ns_eval=products")
    norm = torch.linalg.matrix_norm(a, keepdim=True)
    finite = torch.isfinite(norm)  # ‖A‖_F is NaN/Inf exactly when an entry is
    lam, v = torch.linalg.eigh(torch.where(finite, a / norm, torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)))
    qa, qb, qc = QUINTIC
    y = lam.double()
    z = torch.where(finite[..., 0], 1.0, float("nan")).double().expand_as(y)  # a NaN Z for a non-finite Gram
    for step in range(quintic_steps + steps):
        m = z * y
        h = qa + m * (qb + qc * m) if step < quintic_steps else 1.5 - 0.5 * m
        z, y = h * z, y * h
    return (v * z.to(v.dtype).unsqueeze(-2)) @ v.mT


def whitening_side(m: int, n: int, centered_dim: int | None = 1) -> bool:
    """True when SWAN whitens an m×n matrix on the right (``XᵀX``): m > n, or square with rows centred (or nothing
    centred). The side rule (docs/registry-and-routing.md, "Orientation and side"), with a square matrix going to the
    side whose Gram has the all-ones null vector, where :func:`whitening_root` deflates it."""
    return m > n or (m == n and centered_dim != 0)


def whitening_root(a: Tensor, *, steps: int, damping: float, deflate: bool, quintic_steps: int = 0,
                   dtype: torch.dtype | None = None, spectral: bool = False) -> Tensor:
    """``Z ≈ (A'/‖A'‖_F)^{-1/2}`` from the short-side Gram ``A``, with ``A' = A [+ (μA/d)·11ᵀ] + δ·μA·I``
    (docs/optimizers/swan.md, "Update").

    ``deflate`` (the Gram of the centred side) adds the rank-one term that gives the all-ones null vector a
    typical eigenvalue (exact, because X is orthogonal to it), without which the coupled iteration amplifies
    rounding noise along it by 1.5× per step. The damping ``δ·μA·I`` keeps A' positive definite in fp32. An
    all-zero Gram (trace 0) runs the iteration on the identity instead, which gives Δ = 0 exactly without a NaN,
    without a host round trip and without a branch (so under FSDP2 every rank runs the same collectives).
    A stack ``[B, d, d]`` gives each Gram its own μ, guard and root. ``dtype`` (bf16: ``swan``'s ``ns_dtype``): the
    iteration's products in that dtype, on A' formed in ``a``'s, and Z returned in ``a``'s dtype. ``spectral``
    (``ns_eval=eigh``): the same Z through :func:`newton_schulz_spectral`, at least in fp32 (LAPACK has no bf16)."""
    damped = damped_gram(a, damping=damping, deflate=deflate)
    if spectral:
        return newton_schulz_spectral(damped.float() if damped.itemsize < 4 else damped, steps,
                                      quintic_steps).to(a.dtype)
    if dtype is None or dtype == a.dtype:
        return newton_schulz_inv_sqrt(damped, steps, quintic_steps)
    return newton_schulz_inv_sqrt(damped.to(dtype), steps, quintic_steps).to(a.dtype)


def damped_gram(a: Tensor, *, damping: float, deflate: bool) -> Tensor:
    """``A' = A [+ (μA/d)·11ᵀ] + δ·μA·I`` of :func:`whitening_root` (the identity where trace(A) = 0); a stack
    ``[B, d, d]`` gives each Gram its own μ."""
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    mean_eig = (a.diagonal(dim1=-2, dim2=-1).sum(dim=-1) / d)[..., None, None]
    if deflate:
        a = a + mean_eig / d
    a = a + (damping * mean_eig) * eye
    return torch.where(mean_eig > 0, a, eye)


class ShortSide:
    """One matrix's whitening (or a stack's) split at its collectives (docs/optimizers/swan.md, "Distributed"):
    constructing it forms the short side's Gram, with its collective (right: ``gram_sum`` of ``XᵀX``; left:
    ``gather`` of X, whose Gram the owner alone forms), :meth:`root` computes Z from it, and :meth:`apply` gives Δ.
    :func:`whiten` runs the three in a row; under FSDP2 ``SWAN.update_window`` runs the first for a window of
    matrices, then each rank's own roots, then every broadcast, so that the ranks' roots run at the same time."""

    def __init__(self, x: Tensor, *, centered_dim: int | None = 1, total_rows: int | None = None,
                 gram_sum: Callable = _whole, gather: Callable = _whole):
        m, n = (x.shape[-2] if total_rows is None else total_rows), x.shape[-1]
        self.right = whitening_side(m, n, centered_dim)
        self.deflate = centered_dim == (1 if self.right else 0)
        self.operand = x if self.right else gather(x)
        self.gram = gram_sum(x.mT @ x) if self.right else None
        self.size = n if self.right else m

    def root(self, *, steps: int, damping: float, quintic_steps: int = 0, root_dtype: torch.dtype | None = None,
             spectral: bool = False) -> Tensor:
        """Z from the Gram (:func:`whitening_root`): what the owner rank computes."""
        a = self.gram if self.right else self.operand @ self.operand.mT
        return whitening_root(a, steps=steps, damping=damping, deflate=self.deflate, quintic_steps=quintic_steps,
                              dtype=root_dtype, spectral=spectral)

    def buffer(self) -> Tensor:
        """An empty Z, for the ranks that receive it."""
        x = self.operand
        return x.new_empty((*x.shape[:-2], self.size, self.size))

    def apply(self, z: Tensor, mine: Callable = _whole) -> Tensor:
        """Δ = X·Z (right) or this rank's rows of Z·X (left)."""
        return self.operand @ z if self.right else mine(z) @ self.operand


def whiten(x: Tensor, *, steps: int = 10, damping: float = 1e-6, centered_dim: int | None = 1, quintic_steps: int = 0,
           root_dtype: torch.dtype | None = None, spectral: bool = False, total_rows: int | None = None,
           gram_sum: Callable = _whole, gather: Callable = _whole, mine: Callable = _whole,
           on_owner: Callable = _here) -> Tensor:
    """SWAN's GradWhitening (docs/optimizers/swan.md, "Update"): approximately the polar factor of ``x``, not yet
    rescaled.

    The short side's Gram is used (right, ``Δ = X·Z`` with ``Z`` from ``XᵀX``, when m > n; left, ``Δ = Z·X`` from
    ``XXᵀ``, when m < n; square: :func:`whitening_side`), and :func:`whitening_root` turns it into ``Z``.
    ``centered_dim`` is the dim GradNorm centred (its Gram is deflated); ``root_dtype`` the dtype of the root's
    iteration (None: ``x``'s); ``spectral`` evaluates it through an eigendecomposition (:func:`whitening_root`).

    The defaults whiten the whole matrix ``x``. Under FSDP2 (docs/optimizers/swan.md, "Distributed") ``x`` is this
    rank's rows of a ``total_rows``-row matrix and the hooks are the collectives of ``sharding.Rows``, so the same
    code runs:

    * right side: ``gram_sum`` all-reduces the n×n Gram (``Σ_k X_kᵀX_k``), ``on_owner(solve, like)`` runs
      ``solve()`` on one rank and broadcasts the result into ``like`` elsewhere (so Z is bitwise identical on all
      ranks), and ``Δ_k = X_k·Z`` is local;
    * left side: ``gather`` assembles the whole X on every rank, ``on_owner`` solves ``Z`` from ``XXᵀ`` on one
      rank and broadcasts it (m² < m·n floats, cheaper than Δ), and ``Δ_k = mine(Z)·X`` uses this rank's rows.

    With the identity defaults every step is the unsharded computation, bitwise; there ``x`` may also be a stack
    ``[B, m, n]`` of same-shape matrices, whitened each on its own with batched products."""
    with ieee_fp32():
        side = ShortSide(x, centered_dim=centered_dim, total_rows=total_rows, gram_sum=gram_sum, gather=gather)
        z = on_owner(lambda: side.root(steps=steps, damping=damping, quintic_steps=quintic_steps,
                                       root_dtype=root_dtype, spectral=spectral), side.buffer())
        return side.apply(z, mine)


def frobenius_sq(x: Tensor) -> Tensor:
    """``‖x‖_F²`` of a matrix as a 0-d fp64 tensor (of a stack ``[B, m, n]``: one per matrix, ``[B]``): summed per
    row in x's dtype, across rows in fp64 (an empty ``x`` gives 0)."""
    return x.square().sum(dim=-1).double().sum(dim=-1)


def unit_rms(delta: Tensor, norm_sq: Callable = frobenius_sq, numel: int | None = None) -> Tensor:
    """Rescale ``delta`` to entry-RMS 1; zero stays zero. ``‖Δ‖²`` is summed per row in fp32 and
    across rows in fp64: an fp32 total over ~1e5 entries is off by ~2e-6, more than the unit-RMS tolerance.
    Under FSDP2 ``delta`` is this rank's rows, ``norm_sq`` all-reduces the fp64 partial sums and ``numel`` is the
    global matrix's element count. A stack ``[B, m, n]`` rescales each matrix on its own."""
    sq = norm_sq(delta)
    numel = delta.shape[-2] * delta.shape[-1] if numel is None else numel
    scale = torch.where(sq > 0, (numel / sq).sqrt(), torch.zeros_like(sq))
    return delta * scale.to(delta.dtype)[..., None, None]


class SWAN(MemtrainOptimizer):
    name = "swan"
    description = ("SWAN: row-standardised, Newton–Schulz-whitened gradient on hidden matrices (no state there); "
                   "AdamW-T on the rest")
    owns = frozenset({"matrix"})
    needs_matrix_shape = True
    stateless = True
    fsdp2 = True  # n×n Gram all-reduce (right) / all-gather (left), Z on the owner rank + broadcast
    deepspeed = False  # flat 1-D partitions have no rows: refused
    batched = True  # same-shape matrices whitened together (batched products)
    spreads = True  # under DDP each rank whitens ~1/world of the matrices and broadcasts them
    windowed = True  # under FSDP2 the ranks' owner-side roots run at the same time (update_window)

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, adam_lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, ns_steps: int = 10,
                 ns_quintic_steps: int = 0, ns_dtype: Literal["float32", "bfloat16"] | None = None,
                 ns_eval: Literal["products", "eigh"] = "products", damping: float = 1e-6, row_eps: float = 1e-8,
                 fp32_whitening: bool = True, norm_dim: int = 1):
        """``adam_lr`` is the lr of the AdamW-T part (None: ``lr``); ``betas``/``eps`` are its options.
        ``ns_steps`` Newton–Schulz iterations, after ``ns_quintic_steps`` steps of the faster-growing quintic
        (:func:`newton_schulz_inv_sqrt`), their products in ``ns_dtype`` (None: the whitening's dtype; ``bfloat16``
        on an fp32 whitening: about 3× faster roots, as close to the polar factor at 10 steps but not beyond,
        docs/optimizers/swan.md "Cost per step"); ``ns_eval`` how the iteration is computed: ``products`` (matrix
        products) or ``eigh`` (the same map on the Gram's eigenvalues, :func:`newton_schulz_spectral`; CPU only,
        about 1.7× faster there in fp32); ``damping`` δ relative to the Gram's mean eigenvalue; ``row_eps``
        floors the GradNorm std; ``fp32_whitening=False`` whitens in the gradient's dtype (bf16 models: bf16
        products) instead of IEEE fp32; ``norm_dim`` is the GradNorm axis (1: each output row over ``in``, the
        paper's formula; 0: each input column over ``out``)."""
        if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or ns_steps < 1:
            raise ValueError(f"ns_steps must be an integer >= 1, got {ns_steps!r}")
        if not isinstance(ns_quintic_steps, int) or isinstance(ns_quintic_steps, bool) or ns_quintic_steps < 0:
            raise ValueError(f"ns_quintic_steps must be an integer >= 0, got {ns_quintic_steps!r}")
        if norm_dim not in (0, 1) or isinstance(norm_dim, bool):
            raise ValueError(f"norm_dim must be 1 (standardise each row) or 0 (each column), got {norm_dim!r}")
        if ns_dtype is not None and ns_dtype not in DTYPES:
            raise ValueError(f"ns_dtype must be one of {', '.join(DTYPES)} (or None), got {ns_dtype!r}")
        if ns_eval not in ("products", "eigh"):
            raise ValueError(f"ns_eval must be 'products' or 'eigh', got {ns_eval!r}")
        if ns_eval == "eigh" and ns_dtype == "bfloat16":
            raise ValueError("ns_eval=eigh takes no ns_dtype=bfloat16: the eigendecomposition runs in fp32 (LAPACK "
                             "has no bf16); for bf16 products use ns_eval=products")
        if ns_dtype == "bfloat16" and ns_steps + ns_quintic_steps > 10:
            warnings.warn(f"swan: ns_dtype=bfloat16 with {ns_steps + ns_quintic_steps} iteration steps: the coupled "
                          "iteration accumulates bf16 rounding beyond 10 (at 15 it diverged on 12 of 56 llama-bench "
                          "matrices; docs/optimizers/swan.md); keep ns_steps at 10 or use float32", stacklevel=2)
        _check_hyper("damping", damping)
        _check_hyper("row_eps", row_eps, positive=True)
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adam_lr=adam_lr,
                         ns_steps=ns_steps, ns_quintic_steps=ns_quintic_steps, ns_dtype=ns_dtype, ns_eval=ns_eval,
                         damping=damping, row_eps=row_eps, fp32_whitening=fp32_whitening, norm_dim=norm_dim)
        devices = {p.device.type for g in self.param_groups if g["role"] == "matrix" for p in g["params"]}
        if ns_eval == "eigh" and devices - {"cpu"}:
            raise ValueError(f"swan: ns_eval=eigh runs on CPU only, but hidden matrices are on {sorted(devices)}: on a "
                             "GPU torch.linalg.eigh synchronises with the host every step and the products are faster; "
                             "use ns_eval=products (ns_dtype=bfloat16 for speed)")
        for group in self.param_groups:
            if group["role"] == "other":
                warnings.warn(f"swan: parameters {group['names']} have role 'other' (2+ dims, not a linear weight); "
                              "they get the AdamW-T fallback", stacklevel=2)

    def update(self, param, grad, state, group, rows):
        layout = group.get("layout", "linear")
        delta = swan_direction(grad, rows, layout=layout, **_direction_options(group))
        with fp32_view(param) as p32:
            descend_(as_out_in(p32, layout), delta, lr=group["lr"], weight_decay=group["weight_decay"])

    def update_batch(self, params, grads, group):
        stack = torch.stack(grads)
        self.descend_each(params, swan_direction(stack, unsharded(stack[0]), **_direction_options(group)), group)

    def update_window(self, params, grads, states, rows, group):
        """FSDP2: :func:`swan_direction` for a window of sharded matrices, one owned by each rank, in three passes
        (docs/optimizers/swan.md, "Distributed"): every Gram's collective in order, then each rank's own root
        while the others compute theirs (the per-matrix path makes them wait at each broadcast), then every
        broadcast in flight at once; each Δ is applied and rescaled as its Z arrives. The same collectives and
        arithmetic as the per-matrix path, so the same result bitwise."""
        root = _root_options(**_direction_options(group))
        with ieee_fp32():
            sides = []
            for grad, r in zip(grads, rows):  # linear layout: FSDP2 refuses conv1d (base._check_param)
                x, _ = _standardized(grad, r, norm_dim=group["norm_dim"], row_eps=group["row_eps"],
                                     fp32_whitening=group["fp32_whitening"])
                sides.append(ShortSide(x, centered_dim=group["norm_dim"], total_rows=r.total, gram_sum=r.sum,
                                       gather=r.gather))
            zs = [side.root(**root) if r.is_owner else side.buffer() for side, r in zip(sides, rows)]
            arrivals = [r.start_broadcast(z) for z, r in zip(zs, rows)]
            for param, side, r, arrived in zip(params, sides, rows, arrivals):
                delta = _rescaled(side.apply(arrived(), r.mine), r)
                with fp32_view(param) as p32:
                    descend_(p32, delta, lr=group["lr"], weight_decay=group["weight_decay"])


def _direction_options(group: dict) -> dict:
    return {k: group[k] for k in ("norm_dim", "row_eps", "ns_steps", "ns_quintic_steps", "ns_dtype", "ns_eval",
                                  "damping", "fp32_whitening")}


def _root_options(*, ns_steps: int, ns_quintic_steps: int, ns_dtype: str | None, ns_eval: str, damping: float,
                  **_) -> dict:
    """The root's arguments (:func:`whiten`, :meth:`ShortSide.root`) from swan's options."""
    return dict(steps=ns_steps, quintic_steps=ns_quintic_steps, root_dtype=DTYPES.get(ns_dtype),
                spectral=ns_eval == "eigh", damping=damping)


def _standardized(grad: Tensor, rows: Rows, *, layout: str = "linear", norm_dim: int = 1, row_eps: float = 1e-8,
                  fp32_whitening: bool = True) -> tuple[Tensor, Rows]:
    """GradNorm of this rank's rows, in the whitening's dtype, and the rows to whiten them with."""
    g = as_out_in(grad.float(), layout)
    if layout == "conv1d":  # the [out, in] view's rows; FSDP2 refuses conv1d (base._check_param), so unsharded
        rows = unsharded(g)
    x = standardize(g, dim=norm_dim, eps=row_eps, column_mean=rows.column_mean)
    return (x if fp32_whitening else x.to(grad.dtype)), rows


def _rescaled(delta: Tensor, rows: Rows) -> Tensor:
    return unit_rms(delta.float(), norm_sq=lambda d: rows.sum(frobenius_sq(d)), numel=rows.total * delta.shape[-1])


def swan_direction(grad: Tensor, rows: Rows, *, layout: str = "linear", norm_dim: int = 1, row_eps: float = 1e-8,
                   ns_steps: int = 10, ns_quintic_steps: int = 0, ns_dtype: str | None = None,
                   ns_eval: str = "products", damping: float = 1e-6, fp32_whitening: bool = True) -> Tensor:
    """SWAN's update direction (docs/optimizers/swan.md, "Update"; ``[out, in]``) for this rank's rows ``grad`` of a
    matrix split as ``rows`` says; unsharded rows make every collective the identity (the single-process numerics),
    and then ``grad`` may be a stack ``[B, m, n]`` of same-shape gradients (``layout="linear"``), one direction each.

    Under FSDP2: GradNorm over rows is local (``norm_dim=0`` all-reduces three length-n column
    statistics); the right side all-reduces the n×n Gram, the left side all-gathers X, and both compute Z on
    ``rows.owner`` (round-robin over matrices) and broadcast it; the rescale all-reduces ‖Δ‖² in fp64."""
    x, rows = _standardized(grad, rows, layout=layout, norm_dim=norm_dim, row_eps=row_eps,
                            fp32_whitening=fp32_whitening)
    root = _root_options(ns_steps=ns_steps, ns_quintic_steps=ns_quintic_steps, ns_dtype=ns_dtype, ns_eval=ns_eval,
                         damping=damping)
    delta = whiten(x, **root, centered_dim=norm_dim, total_rows=rows.total, gram_sum=rows.sum, gather=rows.gather,
                   mine=rows.mine, on_owner=rows.on_owner)
    return _rescaled(delta, rows)
