"""ALLoRA (docs/adapters/allora.md): backward formulas vs independent math, guards, merge, save/load, autocast,
the factor_rows reading, resume."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from memtrain import adapters
from memtrain.adapters.allora import ALLoRALinear, allora_config, check_allora_model

from .adapter_helpers import assert_merge_matches, assert_resume_exact, peft_tiny, train_steps

ETA = 2.0


class Toy(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(16, 12, bias=False, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def toy(b_std=0.3, seed=0, **options):
    torch.manual_seed(seed)
    model = get_peft_model(Toy(), allora_config(4, ["lin"], eta=ETA, **options))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, b_std) if b_std else None
    return model, layer


def grads(model, layer, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return x.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone(), y


def test_gradients_equal_the_formula_and_input_gradient_is_unscaled():
    model, layer = toy()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    W0 = layer.base_layer.weight.detach()
    x = torch.randn(5, 7, 16, dtype=torch.float64)
    gx, gA, gB, y = grads(model, layer, x)
    # independent: ρ from the explicit B A, δ = ∂(Σy²)/∂y = 2y
    rho = (B @ A).norm(dim=1)
    c = 1 / torch.sqrt(rho + 1 / ETA**2)
    delta = (2 * y.detach()).reshape(-1, 12)
    X = x.reshape(-1, 16)
    G = delta.T @ X  # Σ_tokens δᵀ x
    torch.testing.assert_close(gA, B.T @ torch.diag(c) @ G, atol=1e-12, rtol=0)
    torch.testing.assert_close(gB, torch.diag(c) @ G @ A.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(gx.reshape(-1, 16), delta @ (W0 + B @ A), atol=1e-12, rtol=0)
    # ∇B is a plain row scaling of LoRA's ∇B; ∇A is not recoverable from LoRA's ∇A with one scalar (≈ 9.5%).
    torch.testing.assert_close(gB, c[:, None] * (G @ A.T), atol=1e-12, rtol=0)
    mean_c = B.T @ (c.mean() * G)
    assert 0.05 < ((mean_c - gA).norm() / gA.norm()).item() < 0.2
    assert model.base_model.model.lin.scaling == {"default": 1.0}


def test_norm_power_two_uses_rho_squared():
    model, layer = toy(norm_power=2)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(3, 16, dtype=torch.float64)
    _, _, gB, y = grads(model, layer, x)
    c = 1 / torch.sqrt((B @ A).norm(dim=1) ** 2 + 1 / ETA**2)
    torch.testing.assert_close(gB, c[:, None] * ((2 * y.detach()).T @ x @ A.T), atol=1e-12, rtol=0)


def test_init_rows_get_eta_and_row_norm_without_ba_handles_zero_rows():
    model, layer = toy(b_std=0)
    x = torch.randn(5, 16, dtype=torch.float64)
    _, _, gB, y = grads(model, layer, x)
    A = layer.lora_A["default"].weight.detach()
    torch.testing.assert_close(gB, ETA * ((2 * y.detach()).T @ x @ A.T), atol=1e-12, rtol=0)
    from memtrain.adapters.allora import lora_row_norm

    B = torch.randn(12, 4, dtype=torch.float64)
    B[3] = 0
    rho = lora_row_norm(A, B)
    torch.testing.assert_close(rho, (B @ A).norm(dim=1), atol=1e-12, rtol=0)
    assert rho[3] == 0


def test_rho_is_fresh_after_an_optimizer_step():
    model, layer = toy()
    opt = adapters.create_optimizer("allora", model, lr=0.05)
    x = torch.randn(5, 16, dtype=torch.float64)
    _, _, gB1, y1 = grads(model, layer, x)
    base1 = (2 * y1.detach()).T @ x @ layer.lora_A["default"].weight.detach().T
    opt.step()
    opt.zero_grad()
    _, _, gB2, y2 = grads(model, layer, x)
    base2 = (2 * y2.detach()).T @ x @ layer.lora_A["default"].weight.detach().T
    c1, c2 = gB1[:, 0] / base1[:, 0], gB2[:, 0] / base2[:, 0]
    assert not torch.allclose(c1, c2)


@pytest.mark.filterwarnings("ignore:.*lora_bias=True")
def test_config_and_module_guards():
    with pytest.raises(ValueError, match="lora_alpha=8.*must equal r=4"):
        allora_config(base=LoraConfig(r=4, lora_alpha=8, target_modules=["lin"]))
    with pytest.raises(ValueError, match="lora_dropout"):
        allora_config(base=LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, target_modules=["lin"]))
    cases = {
        "scaling 0.5": dict(rank_pattern={"lin": 8}),
        "lora_bias": dict(lora_bias=True),
        "DoraLinearVariant": dict(use_dora=True),
    }
    for message, extra in cases.items():
        config = allora_config(base=LoraConfig(r=4, lora_alpha=4, target_modules=["lin"], **extra))
        model = get_peft_model(Toy(), config)
        with pytest.raises(ValueError, match=rf"'base_model.model.lin'.*{message}"):
            check_allora_model(model)
    vanilla = get_peft_model(Toy(), LoraConfig(r=4, lora_alpha=4, target_modules=["lin"]))
    with pytest.raises(ValueError, match="not an ALLoRALinear"):
        check_allora_model(vanilla)


def test_autocast_bf16_backward_has_no_dtype_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12)).to(torch.bfloat16)
    model = get_peft_model(net, allora_config(4, ["0", "2"]))
    for module in model.modules():
        if isinstance(module, ALLoRALinear):
            nn.init.normal_(module.lora_B["default"].weight, 0, 0.1)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_factor_rows_step_equals_independent_math():
    model, layer = toy(norm_target="factor_rows")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A0, B0 = A.detach().clone(), B.detach().clone()
    lr, eps = 1e-2, 1e-8
    opt = adapters.create_optimizer("allora", model, lr=lr)
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x).square().sum().backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    # plain LoRA gradients at scaling 1 (no backward scaling in this reading)
    y0 = x @ (layer.base_layer.weight.detach() + B0 @ A0).T
    torch.testing.assert_close(gB, 2 * y0.T @ x @ A0.T, atol=1e-10, rtol=0)
    opt.step()
    for p0, g, p in ((A0, gA, A), (B0, gB, B)):
        c = 1 / torch.sqrt(p0.norm(dim=1, keepdim=True) + 1 / ETA**2)
        g = (g * c).float()  # AdamW-T's first step: lr · ĝ / (|ĝ| + ε) with ĝ the scaled gradient
        expected = p0 - lr * (g / (g.abs() + eps)).double()
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("norm_target", ["delta_row", "factor_rows"])
def test_tiny_llama_trains_merges_and_round_trips(tmp_path, norm_target):
    model = peft_tiny("allora", eta=2.0, norm_target=norm_target)
    opt = adapters.create_optimizer("allora", model, lr=1e-2)
    losses = train_steps(model, opt, 0, 6, fixed_batch=True)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    from ..conftest import lm_batch, tiny_llama

    ids = lm_batch(7)["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = adapters.load(tiny_llama(), str(tmp_path), "allora", norm_target=norm_target)
    assert any(isinstance(m, ALLoRALinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)
    assert_merge_matches(model)


def test_resume_is_exact():
    assert_resume_exact("allora")
    assert_resume_exact("allora", norm_target="factor_rows")
