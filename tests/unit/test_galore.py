"""GaLore and Fira: independent re-implementations, identity / rotated-coordinate equivalences, the official
packages, the guards, state bytes and resume across a projector refresh (docs/optimizers/galore.md and fira.md,
Verified)."""
import math

import pytest
import torch

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes
from memtrain.optim import fira as fira_module, galore as galore_module, transforms
from memtrain.optim.fira import Fira
from memtrain.optim.galore import GaLore

from ..conftest import checkpoint_roundtrip, lm_batch, tiny_llama

SHAPES = [(64, 32), (32, 64)]
B1, B2 = 0.9, 0.999


def grads(shape, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def run(opt_cls_or_factory, w0, gs, **kw):
    w = torch.nn.Parameter(w0.clone())
    opt = opt_cls_or_factory([w], **kw)
    for g in gs:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt


# -- an independent, straightforward transcription of the specs' pseudocode ---------------------------------
def reference(w0, gs, *, lr, rank, gap, alpha, wd=0.0, eps=1e-6, fira=None, gamma=1.01):
    """docs/optimizers/galore.md and fira.md, Update, line by line, fp64 for clarity; ``fira`` is None, "code" or
    "paper"."""
    W = w0.double().clone()
    m, n = W.shape
    side = 0 if m >= n else 1
    r = min(rank, m, n)
    P = M = V = prev = None
    for t, g in enumerate(gs, start=1):
        G = g.double()
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            P = Vh[:r, :] if side == 0 else U[:, :r]
        R = G @ P.T if side == 0 else P.T @ G
        M = torch.zeros_like(R) if M is None else M
        V = torch.zeros_like(R) if V is None else V
        M = B1 * M + (1 - B1) * R
        V = B2 * V + (1 - B2) * R * R
        N = M / (V.sqrt() + eps)
        c = math.sqrt(1 - B2**t) / (1 - B1**t)
        back = (lambda X: X @ P) if side == 0 else (lambda X: P @ X)
        if fira is None:
            W = W - lr * c * alpha * back(N)
        else:
            dim = 1 if side == 0 else 0
            Nphi = N if fira == "code" else c * N
            phi = Nphi.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
            S = phi * (G - alpha * back(R)) if fira == "code" else phi * (G - back(R))
            s = S.norm()
            if prev is None or prev == 0:
                prev = s
            else:
                lim = max(s / (prev + 1e-8), gamma) / gamma
                S, prev = S / lim, s / lim
            if fira == "code":
                W = W - lr * c * (alpha * back(N) + S)
            else:
                W = W - lr * alpha * (c * back(N) + S)
        if wd > 0:
            W = W - lr * wd * W
    return W.float()


def adamw_hf_reference(w0, gs, *, lr, eps=1e-6, wd=0.0):
    W, M, V = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, G in enumerate(gs, start=1):
        M = B1 * M + (1 - B1) * G
        V = B2 * V + (1 - B2) * G * G
        W = W - lr * math.sqrt(1 - B2**t) / (1 - B1**t) * (M / (V.sqrt() + eps))
        if wd > 0:
            W = W - lr * wd * W
    return W


@pytest.mark.parametrize("shape", SHAPES, ids=["right", "left"])
@pytest.mark.parametrize("mode", ["galore", "code", "paper"])
def test_matches_the_spec_pseudocode_across_refreshes(shape, mode):
    gs = grads(shape, 7)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kw = dict(lr=1e-2, rank=8, update_proj_gap=3, weight_decay=0.1)
    if mode == "galore":
        got, _ = run(GaLore, w0, gs, scale=0.25, **kw)
    else:
        got, _ = run(Fira, w0, gs, alpha=0.25, residual_mode=mode, **kw)
    want = reference(w0, gs, lr=1e-2, rank=8, gap=3, alpha=0.25, wd=0.1, fira=None if mode == "galore" else mode)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- the official packages ----------------------------------------------------------------------------------
def _package(module):
    return pytest.importorskip(module, reason=f"{module} (test-only parity dependency, in the dev extra) is not "
                                              "installed: pip install galore-torch==1.0 fira==1.0.2")


@pytest.mark.parametrize("shape", SHAPES, ids=["right", "left"])
@pytest.mark.parametrize("method", ["galore", "fira"])
def test_parity_with_official_package(shape, method):
    gs = grads(shape, 7)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if method == "galore":
        ref_cls = _package("galore_torch").GaLoreAdamW
        ours, _ = run(GaLore, w0, gs, lr=1e-2, rank=8, update_proj_gap=3, scale=0.25)
        extra = {"scale": 0.25}
    else:
        ref_cls = _package("fira").FiraAdamW
        ours, _ = run(Fira, w0, gs, lr=1e-2, rank=8, update_proj_gap=3, alpha=0.25)
        extra = {"alpha": 0.25}
    w = torch.nn.Parameter(w0.clone())
    ref = ref_cls([{"params": [w], "rank": 8, "update_proj_gap": 3, "proj_type": "std", **extra}], lr=1e-2,
                  no_deprecation_warning=True)
    for g in gs:
        w.grad = g.clone()
        ref.step()
    assert (ours - w.detach()).abs().max() <= 3e-7


# -- equivalences with AdamW-HF -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["right", "left"])
@pytest.mark.parametrize("basis", ["identity", "signed_permutation"])
def test_identity_projector_equals_adamw_hf(shape, basis, monkeypatch):
    d = min(shape)
    Q = torch.eye(d)
    if basis == "signed_permutation":
        perm = torch.randperm(d, generator=torch.Generator().manual_seed(3))
        Q = Q[perm] * torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)[:, None]
    monkeypatch.setattr(transforms, "svd_basis", lambda G, r, side: Q.clone())
    gs = grads(shape, 5)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got, opt = run(GaLore, w0, gs, lr=1e-2, rank=d, update_proj_gap=10**9, scale=1.0, weight_decay=0.1)
    want = adamw_hf_reference(w0, gs, lr=1e-2, wd=0.1)
    assert (got - want).abs().max() <= 1e-6
    # ... and the same AdamW-HF is what GaLore runs on the roles it does not project
    vec, _ = run(GaLore, w0[0], [g[0] for g in gs], lr=1e-2, weight_decay=0.1)
    assert (vec - want[0]).abs().max() <= 1e-6


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["right", "left"])
def test_svd_basis_equals_adamw_hf_in_rotated_coordinates(shape):
    """Full rank, α = 1, no refresh: GaLore is AdamW-HF on X = W Pᵀ (or Pᵀ W), mapped back by P."""
    gs = grads(shape, 5)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got, opt = run(GaLore, w0, gs, lr=1e-2, rank=min(shape), update_proj_gap=10**9, scale=1.0)
    P = next(iter(opt.state.values()))["P"]
    if shape[0] >= shape[1]:
        X = adamw_hf_reference(w0 @ P.T, [g @ P.T for g in gs], lr=1e-2)
        want = X @ P
    else:
        X = adamw_hf_reference(P.T @ w0, [P.T @ g for g in gs], lr=1e-2)
        want = P @ X
    assert (got - want).abs().max() <= 1e-5
    # Adam is not rotation-equivariant: in the original coordinates the two differ (docs/optimizers/galore.md, Verified)
    assert (got - adamw_hf_reference(w0, gs, lr=1e-2)).abs().max() > 1e-2


# -- schedule, clipping, guards ---------------------------------------------------------------------------
def test_rank_is_clipped_to_the_short_side():
    _, opt = run(GaLore, torch.randn(32, 48), grads((32, 48), 1), lr=1e-2, rank=64)
    state = next(iter(opt.state.values()))
    assert state["P"].shape == (32, 32) and state["exp_avg"].shape == (32, 48) and state["side"] == 1


def test_refresh_schedule_and_moments_carried_over():
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = GaLore([w], lr=1e-2, rank=8, update_proj_gap=3)
    changed, prev_P = [], None
    for t, g in enumerate(grads((64, 32), 7), start=1):
        w.grad = g
        state = opt.state[w]
        m_before = state["exp_avg"].clone() if state else None
        opt.step()
        if prev_P is None or not torch.equal(prev_P, state["P"]):
            changed.append(t)
        if t == 4:  # refresh step: M continues (β1·M + (1−β1)·R with the new R), it is not reset
            R = g @ state["P"].T
            torch.testing.assert_close(state["exp_avg"], B1 * m_before + (1 - B1) * R)
        prev_P = state["P"].clone()
    assert changed == [1, 4, 7] and opt.state[w]["refreshes"] == 3 and opt.state[w]["step"] == 7


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_non_finite_or_zero_gradient_never_reaches_the_solver_or_the_state(bad, monkeypatch):
    """Decided on the device (no host sync in step()): the solver gets zeros instead of a bad G and its basis is
    discarded; the step uses a zero gradient. A first bad refresh leaves P = 0: no update (but the decay) until the
    next scheduled refresh. The warning comes from flush_warnings(), outside step()."""
    solve = transforms.svd_basis

    def checked(G, r, side):
        assert torch.isfinite(G).all()
        return solve(G, r, side)

    monkeypatch.setattr(transforms, "svd_basis", checked)
    poison = (lambda g: g * float("nan")) if bad == "nan" else torch.zeros_like
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = GaLore([w], lr=1e-2, rank=8, update_proj_gap=3)
    gs = grads((64, 32), 8)
    w0 = w.detach().clone()
    w.grad = poison(gs[0])
    opt.step()  # first step: no subspace -> P stays zero, no update (weight_decay=0 here), no warning yet
    state = opt.state[w]
    assert state["refreshes"] == 1 and state["step"] == 1 and torch.equal(w.detach(), w0)
    assert not state["P"].any() and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    with pytest.warns(UserWarning, match="non-finite or all-zero gradient for a parameter"):
        assert len(opt.flush_warnings()) == 1
    assert opt.flush_warnings() == []  # once per parameter
    for t in (1, 2):  # no projector until the next scheduled refresh (step count 3): nothing moves
        w.grad = gs[t]
        opt.step()
    assert torch.equal(w.detach(), w0) and not state["exp_avg"].any()
    w.grad = gs[3]  # the refresh: from here on exactly GaLore started at this step (but for the bias correction)
    opt.step()
    assert state["refreshes"] == 2 and state["P"].any() and not torch.equal(w.detach(), w0)
    for t in (4, 5):
        w.grad = gs[t]
        opt.step()
    P, m = state["P"].clone(), state["exp_avg"].clone()
    w.grad = poison(gs[6])  # step count 6: a refresh step, the old P is kept and the step uses a zero gradient
    opt.step()
    assert torch.equal(state["P"], P) and state["refreshes"] == 3
    torch.testing.assert_close(state["exp_avg"], B1 * m, rtol=0, atol=0)
    assert torch.isfinite(w).all() and torch.isfinite(state["exp_avg_sq"]).all()


def test_bad_options_are_refused_clearly():
    """The class itself refuses what build_optimizer's type check would catch first (tests/optim_table.py has
    the user-facing error inputs)."""
    with pytest.raises(ValueError, match="residual_mode must be 'code'"):
        Fira([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-2, residual_mode="both")


# -- solvers -------------------------------------------------------------------------------------------------
def _spectrum_matrix():
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(256, 256)).Q
    V = torch.linalg.qr(torch.randn(512, 256)).Q
    return U @ torch.diag(1.0 / torch.arange(1, 257, dtype=torch.float32)) @ V.T  # [256, 512]: side 1


def test_randomized_solver_is_deterministic_and_finds_the_subspace():
    G = _spectrum_matrix()
    exact = transforms.svd_basis(G, 32, 1)
    for niter, need in ((2, 0.97), (4, 0.99)):
        a = galore_module.randomized_basis(G, 32, 1, torch.Generator().manual_seed(5), niter=niter)
        b = galore_module.randomized_basis(G, 32, 1, torch.Generator().manual_seed(5), niter=niter)
        assert torch.equal(a, b)
        assert (exact.T @ a).pow(2).sum() / 32 >= need
    right = galore_module.randomized_basis(G.T.contiguous(), 32, 0, torch.Generator().manual_seed(5))
    assert right.shape == (32, 256) and (exact.T @ right.T).pow(2).sum() / 32 >= 0.97


def test_gram_eigh_is_the_sign_fixed_svd_basis():
    G = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    for side in (0, 1):
        svd = galore_module.sign_fix_(transforms.svd_basis(G, 6, side), side)
        torch.testing.assert_close(galore_module.gram_eigh_basis(G, 6, side), svd, rtol=0, atol=1e-5)


def test_randomized_refreshes_are_reproducible_from_stored_integers():
    gs = grads((64, 32), 7)
    w0 = torch.randn(64, 32)
    a, _ = run(GaLore, w0, gs, lr=1e-2, rank=8, update_proj_gap=3, projector="randomized", seed=7)
    b, _ = run(GaLore, w0, gs, lr=1e-2, rank=8, update_proj_gap=3, projector="randomized", seed=7)
    c, _ = run(GaLore, w0, gs, lr=1e-2, rank=8, update_proj_gap=3, projector="randomized", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- Fira specifics ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=["right", "left"])
def test_fira_modes_coincide_only_without_alpha_and_limiter(shape):
    gs = grads(shape, 7)
    w0 = torch.randn(shape)
    kw = dict(lr=1e-2, rank=8, update_proj_gap=3)
    code, _ = run(Fira, w0, gs, alpha=1.0, gamma=1e30, residual_mode="code", **kw)
    paper, _ = run(Fira, w0, gs, alpha=1.0, gamma=1e30, residual_mode="paper", **kw)
    assert (code - paper).abs().max() <= 5e-7
    code, _ = run(Fira, w0, gs, alpha=0.25, residual_mode="code", **kw)
    paper, _ = run(Fira, w0, gs, alpha=0.25, residual_mode="paper", **kw)
    assert (code - paper).abs().max() > 1e-2


def test_fira_scaling_axis():
    R = torch.randn(6, 3)
    phi = fira_module.fira_scaling(2 * R, R, side=0)
    assert phi.shape == (6, 1) and torch.allclose(phi, torch.full((6, 1), 2.0), atol=1e-6)
    R = torch.randn(3, 7)
    phi = fira_module.fira_scaling(2 * R, R, side=1)
    assert phi.shape == (1, 7) and torch.allclose(phi, torch.full((1, 7), 2.0), atol=1e-6)
    assert fira_module.fira_scaling(2 * R, R, side=1, per="matrix").shape == ()


def test_fira_limiter():
    S = torch.randn(8, 4)
    out, prev = fira_module.limit_norm_growth(S, torch.zeros(()), 1.01)  # first step: unlimited
    assert torch.equal(out, S) and prev == S.norm()
    out, new = fira_module.limit_norm_growth(10 * S, prev, 1.01)  # 10x growth: capped at 1.01·prev
    torch.testing.assert_close(out.norm(), 1.01 * prev, rtol=1e-6, atol=0)
    torch.testing.assert_close(new, out.norm(), rtol=1e-6, atol=0)
    out, _ = fira_module.limit_norm_growth(0.5 * S, prev, 1.01)  # shrinking: no limit
    assert torch.equal(out, 0.5 * S)


def test_fira_zero_residual_does_not_freeze_the_limiter():
    """An all-zero G at step 5 stores a zero norm; step 6 must be unlimited (docs/optimizers/fira.md, Update)."""
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = Fira([w], lr=1e-2, rank=8, update_proj_gap=100)
    gs = grads((64, 32), 6)
    for t in range(4):
        w.grad = gs[t]
        opt.step()
    w.grad = torch.zeros(64, 32)
    opt.step()
    assert opt.state[w]["prev_residual_norm"] == 0
    w.grad = 50 * gs[5]  # a large jump that the limiter would cap
    opt.step()
    state = opt.state[w]
    P, N = state["P"], state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-6)
    R = w.grad @ P.T
    phi = N.norm(dim=1, keepdim=True) / (R.norm(dim=1, keepdim=True) + 1e-8)
    torch.testing.assert_close(state["prev_residual_norm"], (phi * (w.grad - 0.25 * R @ P)).norm())


# -- memory and resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [GaLore, Fira])
@pytest.mark.parametrize("shape,per_param", [((2048, 2048), 3.000), pytest.param((5461, 2048), 2.375, marks=pytest.mark.slow)])
def test_state_bytes_per_parameter(method, shape, per_param, monkeypatch):
    """4·(2r/d_s + r/d_l) B/param at r = 512 (Fira adds one 4-byte scalar). The solver is replaced by a cheap
    orthonormal basis: the bytes do not depend on which subspace is chosen."""
    monkeypatch.setattr(transforms, "svd_basis", lambda G, r, side: torch.eye(r, G.shape[1])
                        if side == 0 else torch.eye(G.shape[0], r))
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = method([w], lr=1e-3, rank=512)
    w.grad = torch.ones(shape)
    opt.step()
    extra = 4 if method is Fira else 0
    assert optimizer_state_bytes(opt) == 4 * (512 * min(shape) + 2 * 512 * max(shape)) + extra
    assert round((optimizer_state_bytes(opt) - extra) / w.numel(), 3) == per_param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,options", [
    ("galore", {}), ("fira", {}), ("galore", {"projector": "randomized"}),
], ids=["galore", "fira", "galore-randomized"])
def test_resume_across_a_refresh_is_bitwise(name, options, dtype):
    """Checkpoint after step 3 of a T = 2 schedule (refreshes at 1, 3, 5): the next steps include a refresh."""
    def steps(model, opt, start, n):
        for s in range(start, start + n):
            model(**lm_batch(s)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    build = lambda model: memtrain.build_optimizer(model, name, lr=1e-2, weight_decay=0.01, rank=4,  # noqa: E731
                                                   update_proj_gap=2, **options)
    ref_model = tiny_llama(dtype=dtype)
    ref = build(ref_model)
    steps(ref_model, ref, 0, 6)
    model = tiny_llama(dtype=dtype)
    opt = build(model)
    steps(model, opt, 0, 3)
    ckpt = checkpoint_roundtrip(model, opt)
    resumed_model = tiny_llama(seed=5, dtype=dtype)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = build(resumed_model)
    resumed.load_state_dict(ckpt["optim"])
    for state in resumed.state.values():
        if "P" in state:
            assert state["P"].dtype == torch.float32 and isinstance(state["side"], int)
    steps(resumed_model, resumed, 3, 3)
    for (n, a), b in zip(resumed_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n


# -- target modules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets,projected", [
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r".*\.mlp\..*", {"gate_proj", "up_proj", "down_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_target_modules_restrict_the_projected_matrices(targets, projected):
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "galore", lr=1e-2, rank=4, target_modules=targets)
    matrix = [n for g in opt.param_groups if g["method"] == "galore" for n in g["names"]]
    assert {n.split(".")[-2] for n in matrix} == projected
    assert len(matrix) == 2 * len(projected)
    routed = [n for g in opt.param_groups for n in g["names"]]
    assert sorted(routed) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="target_modules .* matched no"):
        memtrain.build_optimizer(model, "galore", lr=1e-2, target_modules=["nothing_here"])
