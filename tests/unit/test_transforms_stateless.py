"""The stateless matrix transforms (SWAN, SinkGD, SCALE) against closed forms and fp64, with fixed test
matrices (heterogeneous row and column scales, low rank plus noise, Gaussian) and per-check tolerances.

RMS and Frobenius checks are evaluated in fp64 (docs/registry-and-routing.md, Precision). The fp64 references here are
written out
independently of memtrain's code.
"""
import pytest
import torch

from memtrain.optim.sinkgd import sinkhorn
from memtrain.optim.swan import QUINTIC, newton_schulz_inv_sqrt, standardize, unit_rms, whiten
from memtrain.optim.transforms import SCALE, adam_, rms_normalize


# -- test matrices (heterogeneous row/column scales, low rank plus noise, Gaussian), fp32 on CPU --------------
def hetero(m, n):
    torch.manual_seed(0)
    return torch.randn(m, n) * (torch.rand(m, 1) ** 3 + 1e-3) * (torch.rand(1, n) ** 2 + 1e-3)


def lowrank(m, n):
    torch.manual_seed(1)
    return torch.randn(m, 8) @ torch.randn(8, n) + 0.1 * torch.randn(m, n)


def gauss(m, n):
    torch.manual_seed(2)
    return torch.randn(m, n)


def swan_direction(g, k=10, damping=1e-6):
    return unit_rms(whiten(standardize(g), steps=k, damping=damping))


def rms(x, dim=None):
    x = x.double()
    return x.square().mean().sqrt() if dim is None else x.square().mean(dim=dim).sqrt()


def rel_err(actual, ref):
    return ((actual.double() - ref).norm() / ref.norm()).item()


def gradnorm64(g):
    g = g.double()
    x = g - g.mean(dim=1, keepdim=True)
    return x / x.square().mean(dim=1, keepdim=True).sqrt()


def rescale64(d):
    m, n = d.shape
    return d * (m * n) ** 0.5 / d.norm()


def exact_polar(g):
    """The exact polar factor: GradNorm in fp64, SVD, singular values > 1e-10·σ_max, U·Vᵀ rescaled to √(mn)/‖·‖_F."""
    u, s, vh = torch.linalg.svd(gradnorm64(g), full_matrices=False)
    keep = s > 1e-10 * s.max()
    return rescale64(u[:, keep] @ vh[keep])


def damped_gram64(x):
    """A' of docs/optimizers/swan.md, Update step 2, in fp64 (right side deflated), and whether the right side is
    used."""
    m, n = x.shape
    right = m >= n
    a = x.T @ x if right else x @ x.T
    d = a.shape[0]
    mu = a.trace() / d
    extra = mu / d * torch.ones(d, d, dtype=a.dtype) if right else 0
    return a + extra + 1e-6 * mu * torch.eye(d, dtype=a.dtype), right


def same_iteration64(g, k):
    """The whole SWAN direction with the same k, δ and deflation, evaluated in fp64."""
    x = gradnorm64(g)
    a, right = damped_gram64(x)
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    y, z = a / a.norm(), eye
    for _ in range(k):
        t = 3 * eye - z @ y
        y, z = 0.5 * y @ t, 0.5 * t @ z
    return rescale64(x @ z if right else z @ x)


def damped_target64(g):
    """X·(A')^{-1/2} (right) or (A')^{-1/2}·X (left) by fp64 eigh, rescaled: what the iteration converges to."""
    x = gradnorm64(g)
    a, right = damped_gram64(x)
    w, v = torch.linalg.eigh(a)
    inv_sqrt = (v / w.sqrt()) @ v.T
    return rescale64(x @ inv_sqrt if right else inv_sqrt @ x)


# -- SWAN GradNorm (docs/optimizers/swan.md, Update step 1) -------------------------------------------------
def test_gradnorm_rows_have_mean_zero_and_unit_population_std():
    g = hetero(256, 688)
    x = standardize(g).double()
    assert x.mean(dim=1).abs().max() < 1e-6
    std = x.var(dim=1, unbiased=False).sqrt()
    assert (std - 1).abs().max() < 1e-5
    assert abs(x.norm().item() / (256 * 688) ** 0.5 - 1) < 1e-6


def test_gradnorm_axis_zero_standardises_columns():
    g = hetero(64, 48)
    torch.testing.assert_close(standardize(g, dim=0), standardize(g.T.contiguous(), dim=1).T, rtol=1e-6, atol=1e-6)
    assert standardize(g, dim=0).double().mean(dim=0).abs().max() < 1e-6


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_constant_rows_become_exact_zeros_and_give_a_zero_update(scale):
    torch.manual_seed(3)
    g = scale * torch.ones(64, 48) * torch.randn(64, 1)
    x = standardize(g)
    assert torch.equal(x, torch.zeros_like(x))
    delta = swan_direction(g)
    assert torch.equal(delta, torch.zeros_like(delta))


def test_one_constant_row_is_zero_and_the_rest_standardised():
    g = gauss(16, 40)
    g[5] = 0.37
    x = standardize(g)
    assert torch.equal(x[5], torch.zeros(40))
    keep = torch.arange(16) != 5
    assert (rms(x[keep], dim=1) - 1).abs().max() < 1e-5


def test_all_zero_gradient_gives_zero_without_nan():
    for shape in [(32, 24), (24, 32), (16, 16)]:
        g = torch.zeros(shape)
        x = standardize(g)
        white = whiten(x)
        assert torch.equal(white, torch.zeros(shape))  # the trace-0 guard: no 0/0 inside Newton–Schulz
        assert torch.equal(unit_rms(white), torch.zeros(shape))


# -- SWAN GradWhitening (docs/optimizers/swan.md, Update step 2) --------------------------------------------
def test_newton_schulz_inverse_square_root_of_a_well_conditioned_matrix():
    torch.manual_seed(4)
    b = torch.randn(24, 24, dtype=torch.float64)
    a = b @ b.T + 24 * torch.eye(24, dtype=torch.float64)
    w, v = torch.linalg.eigh(a / a.norm())
    torch.testing.assert_close(newton_schulz_inv_sqrt(a, 30), (v / w.sqrt()) @ v.T, rtol=1e-10, atol=1e-10)


def test_newton_schulz_skipped_products_change_nothing():
    """The implementation skips the identity products of step 1 and the unused last Y update: bitwise equal to
    the plain k-step loop."""
    x = standardize(hetero(96, 40))
    a = x.T @ x
    for k in (1, 2, 3, 10):
        eye = torch.eye(40)
        y, z = a / torch.linalg.matrix_norm(a), eye
        for _ in range(k):
            t = 3 * eye - z @ y
            y, z = 0.5 * (y @ t), 0.5 * (t @ z)
        assert torch.equal(newton_schulz_inv_sqrt(a, k), z), k


def test_quintic_steps_are_the_plain_coupled_polynomial_iteration():
    """``quintic_steps`` leading steps with H = aI + bM + cM² (M = ZY), then Newton–Schulz's H = ½(3I − M), each
    followed by Y ← YH, Z ← HZ: the fused implementation equals this plain loop in fp64."""
    torch.manual_seed(5)
    b = torch.randn(24, 40, dtype=torch.float64)
    a = b @ b.T
    eye = torch.eye(24, dtype=torch.float64)
    for quintic, cubic in ((1, 1), (3, 2), (4, 1)):
        y, z = a / a.norm(), eye
        for step in range(quintic + cubic):
            m = z @ y
            h = QUINTIC[0] * eye + QUINTIC[1] * m + QUINTIC[2] * m @ m if step < quintic else 0.5 * (3 * eye - m)
            y, z = y @ h, h @ z
        torch.testing.assert_close(newton_schulz_inv_sqrt(a, cubic, quintic), z, rtol=1e-12, atol=1e-12)


def count_products(fn) -> int:
    """How many matrix products (mm, addmm, bmm, baddbmm) ``fn()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in products
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("shape", [(256, 256), (688, 256), (256, 688)])
def test_quintic_steps_reach_the_polar_factor_closer_in_fewer_products(shape):
    """3 quintic + 3 Newton–Schulz steps grow a small singular value ×3.44³·1.5³ ≈ 138 (10 Newton–Schulz steps:
    1.5¹⁰ ≈ 58) in 18 products of the d_s×d_s root instead of 27, and the 3 last steps bring the quintic's
    [0.7, 1.2] to within 1e-3 of 1 (docs/optimizers/swan.md, "Cost"). Measured distances, cubic k=10 → 3+3:
    0.41 → 0.33, 0.31 → 0.23, 7.4e-4 → 3.2e-4."""
    g = hetero(*shape)
    x = standardize(g)
    gram = x.T @ x if shape[0] >= shape[1] else x @ x.T
    assert count_products(lambda: newton_schulz_inv_sqrt(gram, 10)) == 27
    assert count_products(lambda: newton_schulz_inv_sqrt(gram, 3, 3)) == 18
    polar = exact_polar(g)
    cubic = rel_err(unit_rms(whiten(x, steps=10)), polar)
    quintic = rel_err(unit_rms(whiten(x, steps=3, quintic_steps=3)), polar)
    assert quintic < cubic, (quintic, cubic)


def test_converges_to_the_exact_polar_factor_on_the_wide_heterogeneous_case():
    g = hetero(256, 688)
    assert rel_err(swan_direction(g, k=10), exact_polar(g)) < 1e-3  # measured 7.4e-4
    assert rel_err(swan_direction(g, k=5), exact_polar(g)) > 0.1  # k = 5 is far from whitened (0.27)
    assert rel_err(swan_direction(gauss(256, 688), k=10), exact_polar(gauss(256, 688))) < 1e-5


SHAPES = [(256, 688), (688, 256), (256, 256), pytest.param((1024, 1024), marks=pytest.mark.slow)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("make", [hetero, lowrank])
def test_fp32_equals_fp64_evaluation_of_the_same_iteration(make, shape):
    g = make(*shape)
    assert rel_err(swan_direction(g, k=10), same_iteration64(g, 10)) < 1e-4  # max measured 5.5e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("make", [hetero, lowrank])
def test_finite_for_every_k_up_to_100(make, shape):
    """The k-step result is built from the k-th iterate of one deterministic sequence, and a non-finite iterate
    stays non-finite (inf·0 and inf−inf give NaN), so a finite result at k = 100 covers every k ≤ 100."""
    assert torch.isfinite(swan_direction(make(*shape), k=100)).all()


def along_ones(d):
    """The part of ``d`` along the all-ones column direction, relative: ‖d·1/√n‖ / ‖d‖_F."""
    d = d.double()
    return (d.sum(dim=1).norm() / d.shape[1] ** 0.5 / d.norm()).item()


def test_deflation_is_what_keeps_the_tall_case_from_diverging():
    """Row-centred X has the all-ones null vector of XᵀX. Without the deflation and with δ = 0 the coupled
    iteration multiplies any component of X along it by 1.5 per step (docs/optimizers/swan.md) until it is a whole
    unit singular direction of the result: noise turned into 1/√n of the direction. In fp32 that noise is the
    rounding of the centring and of XᵀX, whose size depends on the CPU's summation order (error vs the exact polar
    factor at k = 30: 0.14 on one machine, 2.2e-3 on another), so here it is injected: fp64 (rounding 1e-17 along
    1, measured) plus η·u·1ᵀ, η = 1e-5, a relative component of 1.0e-5 along 1. The clean fp64 input is the
    control: there the undeflated iteration is exact, so the divergence is the noise's amplification."""
    g = hetero(688, 256)
    x = standardize(g.double())
    u = torch.randn(688, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = x + 1e-5 * u
    assert along_ones(x) < 1e-15 and 5e-6 < along_ones(noisy) < 2e-5  # measured 1.0e-17, 1.0e-5

    def bare(t):
        return unit_rms(whiten(t, steps=30, damping=0.0, centered_dim=None))

    assert rel_err(bare(x), exact_polar(g)) < 1e-8  # measured 4.0e-10
    diverged = bare(noisy)
    assert along_ones(diverged) == pytest.approx(256 ** -0.5, rel=1e-3)  # ×6300: measured 0.0625
    assert rel_err(diverged, exact_polar(g)) > 0.05  # measured 0.0625
    deflated = unit_rms(whiten(noisy, steps=30))
    assert along_ones(deflated) < along_ones(noisy)  # carried through, not amplified: measured ×0.9
    assert rel_err(deflated, damped_target64(g)) < 2e-5  # the injected noise itself: measured 9.0e-6
    # and in fp32, with only the machine's own rounding along 1, the deflated iteration converges
    fixed = unit_rms(whiten(standardize(g), steps=30))
    assert rel_err(fixed, damped_target64(g)) < 2e-4  # measured 9.8e-5 and 1.4e-4 on two CPUs


def test_converges_to_the_damped_target():
    assert rel_err(swan_direction(lowrank(688, 256), k=30), damped_target64(lowrank(688, 256))) < 5e-3
    # square low-rank (256² here; 1024² measured 5.4e-2): an fp32 floor, so only finiteness is asserted
    assert torch.isfinite(swan_direction(lowrank(256, 256), k=30)).all()


def test_left_side_deflates_when_columns_are_centred():
    """GradNorm over dim 0 centres columns: 1ₘ is then a null vector of XXᵀ, so the left side (and square
    matrices) take the deflated left Gram; the result is the transpose of the row-wise case, evaluated in fp64."""
    for shape in [(48, 80), (80, 48), (64, 64)]:
        g = hetero(*shape)
        cols = unit_rms(whiten(standardize(g, dim=0), centered_dim=0, steps=10))
        assert rel_err(cols, same_iteration64(g.T.contiguous(), 10).T) < 1e-4, shape  # measured ≤ 4.1e-6


def test_unit_rms_and_scale_invariance():
    g = hetero(256, 688)
    delta = swan_direction(g)
    assert abs(rms(delta).item() - 1) < 1e-6
    for c in (1e-3, 1e3):
        assert rel_err(swan_direction(c * g), delta.double()) < 1e-5  # measured 7.7e-7


def test_unit_rms_rescales_and_keeps_zero():
    torch.manual_seed(5)
    d = 3.7 * torch.randn(300, 700)
    assert abs(rms(unit_rms(d)).item() - 1) < 1e-6
    assert torch.equal(unit_rms(torch.zeros(3, 4)), torch.zeros(3, 4))


# -- SinkGD (docs/optimizers/sinkgd.md) ---------------------------------------------------------------------
def test_sinkhorn_fixed_point_at_five_iterations():
    x = sinkhorn(hetero(256, 688), iterations=5)
    assert (rms(x, dim=1) - 1).abs().max() < 1e-3
    assert (rms(x, dim=0) - 1).abs().max() < 1e-6
    assert abs(rms(x).item() - 1) < 1e-6


def test_sinkhorn_normalises_rows_first():
    row_rms = rms(sinkhorn(hetero(256, 688), iterations=1), dim=1)
    assert abs(row_rms.min().item() - 0.917540) < 1e-4 and abs(row_rms.max().item() - 1.092554) < 1e-4


def test_sinkhorn_equals_the_closed_form_alternation():
    g = gauss(20, 30).double()
    x = g
    for _ in range(3):
        x = x * 30**0.5 / x.norm(dim=1, keepdim=True)  # P_row: every row ℓ2 norm √n
        x = x * 20**0.5 / x.norm(dim=0, keepdim=True)  # P_col: every column ℓ2 norm √m
    torch.testing.assert_close(sinkhorn(g.float(), iterations=3).double(), x, rtol=1e-5, atol=1e-6)


def test_sinkhorn_scale_invariance():
    g = hetero(256, 688)
    ref = sinkhorn(g)
    for c in (1e-3, 1e3):
        assert (sinkhorn(c * g) - ref).abs().max() < 2e-6


def test_sinkhorn_keeps_zero_rows_and_columns():
    g = gauss(12, 9)
    g[4] = 0
    g[:, 7] = 0
    x = sinkhorn(g)
    assert torch.isfinite(x).all()
    assert torch.equal(x[4], torch.zeros(9)) and torch.equal(x[:, 7], torch.zeros(12))
    assert torch.equal(sinkhorn(torch.zeros(5, 6)), torch.zeros(5, 6))


# -- SCALE row/column RMS and scale invariance (docs/optimizers/scale.md) -----------------------------------
def test_rms_normalize_rows_and_columns():
    g = hetero(256, 688)
    rows = rms_normalize(g, dim=1)
    assert (rms(rows, dim=1) - 1).abs().max() < 1e-6 and abs(rms(rows).item() - 1) < 1e-6
    cols = rms_normalize(g, dim=0)
    assert (rms(cols, dim=0) - 1).abs().max() < 1e-6 and abs(rms(cols).item() - 1) < 1e-6
    ref = g.double() / g.double().square().mean(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(rows.double(), ref, rtol=1e-6, atol=1e-7)
    for c in (1e-3, 1e3):
        for dim, out in ((1, rows), (0, cols)):
            assert rel_err(rms_normalize(c * g, dim=dim), out.double()) < 1e-6


def test_rms_normalize_keeps_zero_rows():
    g = gauss(4, 6)
    g[2] = 0
    out = rms_normalize(g, dim=1)
    assert torch.equal(out[2], torch.zeros(6)) and torch.isfinite(out).all()


def test_adamw_scale_matches_the_written_out_formula():
    torch.manual_seed(6)
    p0, grads = torch.randn(10), [torch.randn(10) for _ in range(3)]
    p, m, v = p0.clone(), torch.zeros(10), torch.zeros(10)
    rp, rm, rv = p0.double(), torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    lr, b1, b2, eps, wd = 2e-2, 0.9, 0.999, 1e-8, 0.1
    for t, g in enumerate(grads, 1):
        adam_(p, g, m, v, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, convention=SCALE)
        rm = b1 * rm + (1 - b1) * g.double()
        rv = b2 * rv + (1 - b2) * g.double() ** 2
        rp = rp * (1 - lr * wd)  # decay before the update
        rp = rp - lr * ((1 - b2**t) ** 0.5 / (1 - b1**t)) * rm / (eps + rv.sqrt())  # ε on the uncorrected sqrt
    torch.testing.assert_close(p.double(), rp, rtol=1e-6, atol=1e-7)
