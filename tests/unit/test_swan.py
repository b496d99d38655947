"""``swan`` (docs/optimizers/swan.md): steps equal a straight transcription of its Update, no state on matrices,
options."""
import pytest
import torch

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama


def spec_swan_direction(g, k=10, damping=1e-6):
    """docs/optimizers/swan.md, Update steps 1–3, written out directly, in fp32 (the rescale's norm in fp64)."""
    m, n = g.shape
    x = g - g.mean(dim=1, keepdim=True)
    sigma = torch.sqrt(torch.mean(x * x, dim=1, keepdim=True))
    rho = torch.sqrt(torch.mean(g * g, dim=1, keepdim=True))
    constant = sigma <= torch.clamp(1e-5 * rho, min=1e-8)
    x = torch.where(constant, torch.zeros_like(x), x / torch.where(constant, torch.ones_like(sigma), sigma))
    if m >= n:
        a = x.T @ x
        mu = torch.trace(a) / n
        a = a + (mu / n) * torch.ones(n, n) + damping * mu * torch.eye(n)
    else:
        a = x @ x.T
        mu = torch.trace(a) / m
        a = a + damping * mu * torch.eye(m)
    eye = torch.eye(a.shape[0])
    y, z = a / torch.linalg.norm(a), eye.clone()
    for _ in range(k):
        t = 3 * eye - z @ y
        y = 0.5 * (y @ t)
        z = 0.5 * (t @ z)
    delta = x @ z if m >= n else z @ x
    s = delta.double().norm()
    return (delta.double() * (m * n) ** 0.5 / s).float()


def hidden_matrices(model):
    head = model.get_output_embeddings().weight
    return [mod.weight for mod in model.modules() if isinstance(mod, torch.nn.Linear) and mod.weight is not head]


def test_no_state_on_matrices_and_adamw_state_on_the_rest():
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "swan", lr=1e-3, adam_lr=2e-2)
    for step in range(3):
        model(**lm_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    matrices = hidden_matrices(model)
    assert all(opt.state[w] == {} for w in matrices)
    non_matrix = sum(p.numel() for p in model.parameters() if all(p is not w for w in matrices))
    assert optimizer_state_bytes(opt) == 8 * non_matrix
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["matrix"]["method"] == "swan" and groups["matrix"]["lr"] == 1e-3
    assert all(groups[r]["method"] == "adamw" and groups[r]["lr"] == 2e-2 for r in ("embedding", "head", "vector"))


def test_tied_embedding_gets_adamw():
    model = tiny_llama(tied=True)
    opt = memtrain.build_optimizer(model, "swan", lr=1e-3)
    roles = {g["role"]: g["method"] for g in opt.param_groups}
    assert roles == {"embedding": "adamw", "vector": "adamw", "matrix": "swan"}


def test_conv1d_layout_is_the_transposed_linear_update():
    torch.manual_seed(0)
    w, g = torch.randn(24, 40), torch.randn(24, 40)
    linear = torch.nn.Parameter(w.clone())
    conv = torch.nn.Parameter(w.T.contiguous())
    opt = memtrain.build_optimizer([{"params": [linear], "role": "matrix", "layout": "linear"},
                                    {"params": [conv], "role": "matrix", "layout": "conv1d"}], "swan", lr=0.1)
    linear.grad, conv.grad = g.clone(), g.T.contiguous()
    opt.step()
    # transposed products round differently: compare at a 1e-4 relative bound on Δ (fp32's same-iteration precision)
    torch.testing.assert_close(conv.detach().T, linear.detach(), rtol=1e-6, atol=0.1 * 1e-4)
    torch.testing.assert_close(linear.detach(), w - 0.1 * spec_swan_direction(g), rtol=1e-6, atol=0.1 * 1e-4)


def test_options_parse_and_reach_the_groups():
    opts = memtrain.parse_optim_args(
        "swan", "ns_steps=7,ns_quintic_steps=3,ns_dtype=bfloat16,damping=1e-7,fp32_whitening=false,norm_dim=0,"
                "adam_lr=0.01")
    assert opts == {"ns_steps": 7, "ns_quintic_steps": 3, "ns_dtype": "bfloat16", "damping": 1e-7,
                    "fp32_whitening": False, "norm_dim": 0, "adam_lr": 0.01}
    opt = memtrain.build_optimizer(tiny_llama(), "swan", lr=1e-3, **opts)
    matrix = next(g for g in opt.param_groups if g["role"] == "matrix")
    assert (matrix["ns_steps"], matrix["ns_quintic_steps"], matrix["ns_dtype"], matrix["damping"],
            matrix["fp32_whitening"], matrix["norm_dim"]) == (7, 3, "bfloat16", 1e-7, False, 0)
    assert memtrain.parse_optim_args("swan", "ns_dtype=none") == {"ns_dtype": None}
    with pytest.raises(ValueError, match="ns_dtype"):
        memtrain.parse_optim_args("swan", "ns_dtype=float16")
    assert memtrain.optim.get_spec("swan").stateless


def test_bf16_whitening_in_the_gradient_dtype_stays_close_to_fp32():
    torch.manual_seed(1)
    start, grad = torch.randn(48, 32).bfloat16(), torch.randn(48, 32).bfloat16()
    results = []
    for fp32_whitening in (True, False):
        p = torch.nn.Parameter(start.clone())
        opt = memtrain.build_optimizer([p], "swan", lr=1.0, fp32_whitening=fp32_whitening)
        p.grad = grad.clone()
        opt.step()
        results.append((start.float() - p.detach().float()))
    exact, low = results
    assert torch.isfinite(low).all()
    assert ((low - exact).norm() / exact.norm()) < 0.05


def test_bf16_root_on_an_fp32_whitening():
    """``ns_dtype=bfloat16``: A' formed in fp32, the iteration's products in bf16, Z back in fp32; the direction stays
    within bf16 rounding of the fp32 one at 10 steps (docs/optimizers/swan.md, "Cost per step")."""
    from memtrain.optim.swan import damped_gram, newton_schulz_inv_sqrt, swan_direction, whitening_root
    from memtrain.optim.sharding import unsharded

    torch.manual_seed(0)
    a = (lambda x: x.T @ x)(torch.randn(96, 64))
    z = whitening_root(a, steps=10, damping=1e-6, deflate=True, dtype=torch.bfloat16)
    assert z.dtype == torch.float32
    damped = damped_gram(a, damping=1e-6, deflate=True)
    assert torch.equal(z, newton_schulz_inv_sqrt(damped.bfloat16(), 10).float())
    g = torch.randn(96, 64) * torch.logspace(-2, 0, 64)  # heterogeneous columns
    exact = swan_direction(g, unsharded(g))
    low = swan_direction(g, unsharded(g), ns_dtype="bfloat16")
    assert low.dtype == torch.float32 and not torch.equal(low, exact)
    assert ((low - exact).norm() / exact.norm()) < 0.03  # measured 0.019


def test_bf16_roots_past_ten_steps_warn():
    with pytest.warns(UserWarning, match=r"ns_dtype=bfloat16 with 15 iteration steps.*keep ns_steps at 10"):
        memtrain.build_optimizer(tiny_llama(), "swan", lr=1e-3, ns_dtype="bfloat16", ns_steps=15)
    from memtrain.optim.swan import SWAN
    with pytest.raises(ValueError, match=r"ns_dtype must be one of float32, bfloat16 \(or None\), got 'fp16'"):
        SWAN([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, ns_dtype="fp16")


def test_spectral_evaluation_is_the_same_iteration():
    """``ns_eval=eigh`` (docs/optimizers/swan.md, "Cost per step"): Newton–Schulz's Z evaluated on the eigenvalues is
    the products' Z (fp64: to 1e-10, with and without the quintic start), not the exact inverse square root; in
    fp32 the direction stays within fp32 rounding of the products' (measured 1.1e-5 to 3.5e-5 here); a Gram with
    Inf gives NaN rather than LAPACK's error, and a zero gradient a zero direction."""
    from memtrain.optim.sharding import unsharded
    from memtrain.optim.swan import newton_schulz_inv_sqrt, newton_schulz_spectral, swan_direction

    torch.manual_seed(0)
    x = torch.randn(96, 64, dtype=torch.float64) * torch.logspace(-3, 0, 64, dtype=torch.float64)
    a = x.T @ x
    for steps, quintic in ((10, 0), (3, 3), (1, 0)):
        torch.testing.assert_close(newton_schulz_spectral(a, steps, quintic), newton_schulz_inv_sqrt(a, steps, quintic),
                                   rtol=1e-10, atol=1e-10)
    w, v = torch.linalg.eigh(a / torch.linalg.matrix_norm(a))
    assert (newton_schulz_spectral(a, 10) - (v * w.rsqrt()) @ v.T).abs().max() > 1.0  # k = 10 is not converged here
    for shape in ((96, 64), (64, 64), (64, 96)):
        g = torch.randn(*shape) * torch.logspace(-3, 0, shape[1])
        products, spectral = swan_direction(g, unsharded(g)), swan_direction(g, unsharded(g), ns_eval="eigh")
        assert not torch.equal(spectral, products)
        assert ((spectral - products).norm() / products.norm()) < 5e-5
    bad = a.float().clone()
    bad[0, 0] = float("inf")
    assert newton_schulz_spectral(torch.stack([bad, a.float()]), 10)[0].isnan().all()
    assert torch.equal(swan_direction(torch.zeros(8, 4), unsharded(torch.zeros(8, 4)), ns_eval="eigh"),
                       torch.zeros(8, 4))


def test_spectral_evaluation_options_are_checked():
    opts = memtrain.parse_optim_args("swan", "ns_eval=eigh")
    assert opts == {"ns_eval": "eigh"}
    opt = memtrain.build_optimizer(tiny_llama(), "swan", lr=1e-3, **opts)
    assert next(g for g in opt.param_groups if g["role"] == "matrix")["ns_eval"] == "eigh"
    from memtrain.optim.swan import SWAN
    with pytest.raises(ValueError, match="ns_eval must be 'products' or 'eigh', got 'svd'"):
        SWAN([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, ns_eval="svd")
    with pytest.raises(ValueError, match="ns_eval=eigh takes no ns_dtype=bfloat16"):
        SWAN([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3, ns_eval="eigh", ns_dtype="bfloat16")
    meta = torch.nn.Linear(8, 8, bias=False, device="meta")
    with pytest.raises(ValueError, match=r"ns_eval=eigh runs on CPU only, but hidden matrices are on \['meta'\]"):
        memtrain.build_optimizer(meta, "swan", lr=1e-3, ns_eval="eigh")


def test_flattened_matrix_is_refused_with_the_fix():
    flat = torch.nn.Parameter(torch.randn(64))
    opt = memtrain.build_optimizer([{"params": [flat], "role": "matrix", "names": ["layers.0.q_proj.weight"]}],
                                   "swan", lr=1e-3)
    flat.grad = torch.randn(64)
    with pytest.raises(RuntimeError, match=r"layers\.0\.q_proj\.weight.*FSDP2"):
        opt.step()
