"""LoRA-Pro (docs/adapters/lorapro.md): closed form vs independent math, the optimizer step vs an independent
re-implementation, equivalent-gradient quality, pairing/scaling/refusals, state bytes, resume."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from memtrain import adapters
from memtrain.adapters.lorapro import create_lorapro_optimizer, lorapro_state_bytes
from memtrain.hf.metrics import optimizer_state_bytes
from memtrain.adapters.lorapro import lorapro_adjust

from ..conftest import lm_batch, tiny_llama
from .adapter_helpers import assert_merge_matches, assert_resume_exact, peft_tiny, train_steps

M, N, R, S = 40, 30, 4, 2.0


def setup64():
    torch.manual_seed(0)
    B = torch.randn(M, R, dtype=torch.float64)
    A = torch.randn(R, N, dtype=torch.float64)
    G = torch.randn(M, N, dtype=torch.float64)
    return A, B, G, S * B.T @ G, S * G @ A.T


def sylvester_kron(P, Q, C):
    """Solve P X + X Q = C by vectorisation (column-major vec): (I ⊗ P + Qᵀ ⊗ I) vec X = vec C."""
    r = P.shape[0]
    eye = torch.eye(r, dtype=P.dtype)
    K = torch.kron(eye, P) + torch.kron(Q.T.contiguous(), eye)
    x = torch.linalg.solve(K, C.T.reshape(-1))
    return x.reshape(r, r).T


def closed_form(A, B, a, b, s, sylvester=True):
    """Independent: explicit inverses, the explicit m×m projector, Kronecker Sylvester solve (δ = 0)."""
    BtB_inv = torch.linalg.inv(B.T @ B)
    AAt_inv = torch.linalg.inv(A @ A.T)
    P_B = B @ BtB_inv @ B.T
    h_a = BtB_inv @ a / s**2
    h_b = (torch.eye(B.shape[0], dtype=B.dtype) - P_B) @ b @ AAt_inv / s**2
    if sylvester:
        X = sylvester_kron(B.T @ B, A @ A.T, -BtB_inv @ a @ A.T / s**2)
        h_a, h_b = h_a + X @ A, h_b - B @ X
    return h_a, h_b


def test_adjusted_gradients_equal_the_closed_form():
    A, B, G, gA, gB = setup64()
    for sylvester in (False, True):
        h_a, h_b = lorapro_adjust(A, B, gA, gB, scaling=S, delta=0.0, sylvester=sylvester)
        e_a, e_b = closed_form(A, B, gA, gB, S, sylvester)
        torch.testing.assert_close(h_a, e_a, atol=1e-10, rtol=0)
        torch.testing.assert_close(h_b, e_b, atol=1e-10, rtol=0)


def test_equivalent_gradient_is_the_tangent_projection_and_beats_plain_lora():
    A, B, G, gA, gB = setup64()
    h_a, h_b = lorapro_adjust(A, B, gA, gB, scaling=S, delta=0.0, sylvester=False)
    g_pro = S * (B @ h_a + h_b @ A)
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    torch.testing.assert_close(g_pro, P_B @ G + G @ P_A - P_B @ G @ P_A, atol=1e-10, rtol=0)
    g_lora = S * (B @ gA + gB @ A)  # plain LoRA's equivalent gradient, s²(BBᵀG + GAᵀA)
    err_pro, err_lora = (g_pro - G).norm().item(), (g_lora - G).norm().item()
    assert err_pro == pytest.approx(31.03, abs=0.01) and err_lora == pytest.approx(2382.4, abs=0.1)
    # X does not change it, and no other (h_A, h_B) does better.
    X = torch.randn(R, R, dtype=torch.float64)
    torch.testing.assert_close(S * (B @ (h_a + X @ A) + (h_b - B @ X) @ A), g_pro, atol=1e-10, rtol=0)
    for _ in range(50):
        da, db = 1e-2 * torch.randn_like(h_a), 1e-2 * torch.randn_like(h_b)
        assert (S * (B @ (h_a + da) + (h_b + db) @ A) - G).norm().item() >= err_pro


def test_sylvester_x_stays_closest_to_the_lora_gradients():
    A, B, G, gA, gB = setup64()
    h_a, h_b = lorapro_adjust(A, B, gA, gB, scaling=S, delta=0.0, sylvester=True)
    best = (h_a - gA).square().sum() + (h_b - gB).square().sum()
    for _ in range(50):
        X = 1e-3 * torch.randn(R, R, dtype=torch.float64)
        assert best <= (h_a + X @ A - gA).square().sum() + (h_b - B @ X - gB).square().sum()


def test_fp32_factors_keep_fp64_accuracy_of_the_rxr_algebra():
    """An ill-conditioned B (cond(BᵀB) ≈ 4e6) in fp32 still gives ΔA within 1e-3 of fp64."""
    m, n, r, s = 2048, 1024, 8, 2.0
    torch.manual_seed(0)
    B = 0.05 * torch.randn(m, r)
    B[:, 7] = B[:, 6] + 1e-3 * 0.05 * torch.randn(m)
    A = (2 * torch.rand(r, n) - 1) / n**0.5
    U = torch.randn(m, n)
    args32 = (A, B, s * B.T @ U, s * U @ A.T)
    A64, B64, U64 = A.double(), B.double(), U.double()
    args64 = (A64, B64, s * B64.T @ U64, s * U64 @ A64.T)
    d32, _ = lorapro_adjust(*args32, scaling=s, delta=1e-8, sylvester=True)
    d64, _ = lorapro_adjust(*args64, scaling=s, delta=1e-8, sylvester=True)
    assert ((d32.double() - d64).norm() / d64.norm()).item() < 1e-3


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N, M, bias=False)

    def forward(self, x):
        return self.lin(x)


def one_pair_model(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(OneLinear(), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.normal_(0, 0.3)
    return model


def test_full_mode_steps_equal_an_independent_reimplementation():
    model = one_pair_model()
    layer = model.base_model.model.lin
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.999), 1e-8
    opt = create_lorapro_optimizer(model, lr=lr, weight_decay=wd)
    A_ref, B_ref = A.detach().double().clone(), B.detach().double().clone()
    m1 = torch.zeros(M, N, dtype=torch.float64)
    v1 = torch.zeros(M, N, dtype=torch.float64)
    for t in range(1, 4):
        x = torch.randn(8, N)
        model(x).square().sum().backward()
        gA, gB = A.grad.double(), B.grad.double()
        opt.step()
        opt.zero_grad()
        # independent LoRA-Pro full mode (δ = 1e-8 is far below these Grams' eigenvalues)
        h_a, h_b = closed_form(A_ref, B_ref, gA, gB, S, sylvester=False)
        g_full = S * (B_ref @ h_a + h_b @ A_ref)
        m1 = b1 * m1 + (1 - b1) * g_full
        v1 = b2 * v1 + (1 - b2) * g_full**2
        U = (m1 / (1 - b1**t)) / ((v1 / (1 - b2**t)).sqrt() + eps)
        d_a, d_b = closed_form(A_ref, B_ref, S * B_ref.T @ U, S * U @ A_ref.T, S, sylvester=True)
        f = (1 - lr * wd) ** 0.5
        A_ref, B_ref = f * A_ref - lr * d_a, f * B_ref - lr * d_b
        torch.testing.assert_close(A.detach().double(), A_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B.detach().double(), B_ref, rtol=1e-4, atol=1e-6)
    state = opt.state[A]
    assert state["step"] == 3 and state["exp_avg"].shape == (M, N) and state["exp_avg"].dtype == torch.float32
    assert not opt.state.get(B)  # the pair's moments live on A only
    assert optimizer_state_bytes(opt) == 8 * M * N == lorapro_state_bytes(model)


def test_lorapro_step_is_closer_to_full_finetuning_than_plain_lora_on_a_peft_model():
    """The true full gradient G = ∂L/∂W_eff is ∂L/∂W0 (W0 frozen in training; unfrozen here to read it)."""
    model = one_pair_model(1)
    layer = model.base_model.model.lin
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W0 = layer.base_layer.weight
    W0.requires_grad_(True)
    model(torch.randn(16, N)).square().sum().backward()
    G, s = W0.grad.detach(), layer.scaling["default"]
    h_a, h_b = lorapro_adjust(A.detach(), B.detach(), A.grad, B.grad, scaling=s, delta=1e-8, sylvester=True)
    pro = s * (B.detach() @ h_a + h_b @ A.detach())
    lora = s * (B.detach() @ A.grad + B.grad @ A.detach())
    assert (pro - G).norm() < 0.5 * (lora - G).norm()


def test_b_zero_init_stays_finite_and_trains():
    model = peft_tiny("lorapro")
    opt = adapters.create_optimizer("lorapro", model, lr=5e-3)
    losses = train_steps(model, opt, 0, 6, fixed_batch=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-3:]) < sum(losses[:3])


def test_pairs_by_module_with_real_scaling_rslora():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                                                    target_modules=["q_proj", "v_proj"]))
    opt = create_lorapro_optimizer(model, lr=1e-3)
    (group,) = [g for g in opt.param_groups if g.get("lora_pairs")]
    assert len(group["lora_pairs"]) == 4  # 2 layers × (q, v)
    for ia, ib, s in group["lora_pairs"]:
        assert s == pytest.approx(6 / 2.0)  # lora_alpha / sqrt(r)
        assert group["names"][ia].replace("lora_A", "lora_B") == group["names"][ib]
        assert group["params"][ia].shape[0] == group["params"][ib].shape[1] == 4


def test_efficient_mode_has_lora_sized_state_and_trains():
    model = peft_tiny("lorapro")
    opt = adapters.create_optimizer("lorapro", model, lr=5e-3, mode="efficient", weight_decay=0.01)
    losses = train_steps(model, opt, 0, 6, fixed_batch=True)
    assert losses[-1] < losses[0]
    assert optimizer_state_bytes(opt) == lorapro_state_bytes(model, "efficient")


def test_weight_decay_shrinks_ba_by_exactly_one_minus_lr_wd():
    for mode in ("full", "efficient"):
        model = one_pair_model()
        layer = model.base_model.model.lin
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        before = (B @ A).detach().clone()
        opt = create_lorapro_optimizer(model, lr=0.1, weight_decay=0.5, mode=mode)
        A.grad, B.grad = torch.zeros_like(A), torch.zeros_like(B)
        opt.step()
        torch.testing.assert_close((B @ A).detach(), before * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)


def test_refuses_dora_and_embedding_lora_unless_routed_to_adamw():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match=r"embed_tokens.*not nn.Linear.*other_lora_layers='adamw'"):
        create_lorapro_optimizer(model, lr=1e-3)
    dora = get_peft_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"q_proj.*DoraLinearVariant"):
        create_lorapro_optimizer(dora, lr=1e-3)
    with pytest.warns(UserWarning, match="AdamW-T"):
        opt = create_lorapro_optimizer(model, lr=1e-3, other_lora_layers="adamw")
    pair_group = next(g for g in opt.param_groups if g.get("lora_pairs"))
    other = next(g for g in opt.param_groups if g.get("role") == "lora" and "lora_pairs" not in g)
    assert len(pair_group["lora_pairs"]) == 2 and all("embed" in n for n in other["names"])
    assert other["method"] == "adamw"
    train_steps(model, opt, 0, 1)


def test_flattened_factors_are_refused():
    model = one_pair_model()
    opt = create_lorapro_optimizer(model, lr=1e-3)
    group = next(g for g in opt.param_groups if g.get("lora_pairs"))
    flat = [nn.Parameter(p.detach().reshape(-1)) for p in group["params"]]
    for p in flat:
        p.grad = torch.ones_like(p)
    group["params"] = flat
    with pytest.raises(RuntimeError, match="flattened.*FSDP2"):
        opt.step()


def test_other_trainable_tensors_keep_the_chosen_optimizer():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    opt = create_lorapro_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    routed = {n for g in opt.param_groups if g.get("role") != "lora" for n in g["names"]}
    assert any("lm_head" in n for n in routed)
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0.1 for g in opt.param_groups)
    model(**lm_batch(0)).loss.backward()
    opt.step()


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_resume_is_exact(mode):
    assert_resume_exact("lorapro", mode=mode)


@pytest.mark.slow
def test_resume_is_exact_bf16_with_fp32_moments():
    assert_resume_exact("lorapro", j=1, dtype=torch.bfloat16)


def test_merged_model_equals_adapter_model():
    model = peft_tiny("lorapro")
    opt = adapters.create_optimizer("lorapro", model, lr=1e-2)
    train_steps(model, opt, 0, 3)
    assert_merge_matches(model)


@pytest.mark.parametrize("adapter", ["lorapro", "allora", "gradnormlorp"])
def test_trainer_factory_route_uses_the_given_lr_and_weight_decay(tmp_path, adapter):
    """docs/adapters/lorapro.md, Use: HF Trainer calls the factory with the model only, so lr/wd are explicit."""
    import functools

    from memtrain import Trainer, TrainingArguments
    from memtrain.adapters import AdapterFactory

    args = TrainingArguments(str(tmp_path), learning_rate=5e-4, weight_decay=0.1, max_steps=1, use_cpu=True,
                             report_to="none")
    kwargs = {"create": functools.partial(adapters.create_optimizer, adapter), "optim": "adamw",
              "lr": args.learning_rate, "weight_decay": args.weight_decay}
    trainer = Trainer(model=peft_tiny(adapter), args=args, optimizer_cls_and_kwargs=(AdapterFactory, kwargs))
    trainer.create_optimizer()
    groups = trainer.optimizer.param_groups
    assert groups and all(g["lr"] == 5e-4 and g["weight_decay"] == 0.1 for g in groups)
    assert all(g["role"] == "lora" for g in groups)  # the factors left memtrain's `matrix` routing
