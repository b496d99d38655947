"""GradNormLoRP (docs/adapters/gradnormlorp.md): DoRA parity, exact weight-norm gradient vs direct autograd, identity
at init, merge, save/load (also as vanilla PEFT DoRA), the projected optimizer vs independent math, state bytes,
wiring checks, resume."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from memtrain import adapters
from memtrain.adapters.gradnormlorp import (GradNormLoRPLinear, check_gradnormlorp_model,
                                            create_gradnormlorp_optimizer, gradnormlorp_config,
                                            gradnormlorp_state_bytes, init_magnitudes)
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama
from .adapter_helpers import assert_merge_matches, assert_resume_exact, peft_tiny, train_steps


class Toy(nn.Module):
    def __init__(self, n=32, m=48, bias=True, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(n, m, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def toy(detach_norm, dtype=torch.float32, r=4, alpha=8, b_std=0.3, seed=0, n=32, m=48, bias=True):
    torch.manual_seed(seed)
    base = Toy(n, m, bias, dtype)
    model = get_peft_model(base, gradnormlorp_config(r, alpha, ["lin"], detach_norm=detach_norm))
    init_magnitudes(model)
    layer = model.base_model.model.lin
    if b_std:
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, b_std)
    return model, layer


def factor_grads(layer):
    return [t.grad.clone() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                     layer.lora_magnitude_vector["default"].weight)]


def test_detached_norm_is_peft_dora():
    model, layer = toy(detach_norm=True)
    torch.manual_seed(1)
    dora = get_peft_model(Toy(), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lin"]))
    dora.load_state_dict(model.state_dict())
    x = torch.randn(5, 32)
    y, y_dora = model(x), dora(x)
    torch.testing.assert_close(y, y_dora, atol=1e-6, rtol=0)
    y.square().sum().backward()
    y_dora.square().sum().backward()
    for ours, theirs in zip(factor_grads(layer), factor_grads(dora.base_model.model.lin)):
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-6


def test_exact_norm_gradient_equals_direct_autograd_fp64():
    m, n, r, s = 40, 30, 4, 2.0
    model, layer = toy(detach_norm=False, dtype=torch.float64, r=r, alpha=int(s * r), b_std=0, n=n, m=m, bias=False)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        B.copy_(0.1 * torch.randn(m, r, dtype=torch.float64))
        g.copy_(torch.randn(m, dtype=torch.float64).abs())
    x = torch.randn(7, n, dtype=torch.float64)
    loss = model(x).square().sum()
    loss.backward()
    # independent: the weight-normalised matrix formed explicitly
    A2, B2, g2 = (t.detach().clone().requires_grad_(True) for t in (A, B, g))
    W = layer.base_layer.weight.detach() + s * B2 @ A2
    ref = (x @ ((g2 / W.norm(dim=1))[:, None] * W).T).square().sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    for ours, theirs in zip((A.grad, B.grad, g.grad), (A2.grad, B2.grad, g2.grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-11, rtol=1e-11)
    # the exact gradient differs from the detached one (the weight-norm projection term)
    model_d, layer_d = toy(detach_norm=True, dtype=torch.float64, r=r, alpha=int(s * r), b_std=0, n=n, m=m, bias=False)
    model_d.load_state_dict(model.state_dict())
    model_d(x).square().sum().backward()
    assert not torch.allclose(layer_d.lora_A["default"].weight.grad, A.grad)


def test_identity_at_init_and_zero_row_gradients_are_finite():
    model, layer = toy(detach_norm=False, b_std=0)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model(x), layer.base_layer(x), atol=1e-6, rtol=0)
    with torch.no_grad():
        layer.base_layer.weight[3] = 0
        layer.lora_B["default"].weight.zero_()
    model(x).square().sum().backward()
    assert all(torch.isfinite(t).all() for t in factor_grads(layer))


def test_bf16_base_magnitude_is_fp32_row_norm():
    model, layer = toy(detach_norm=False, dtype=torch.bfloat16, b_std=0)
    W0 = layer.base_layer.weight.float()
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.float(), W0.norm(dim=1), atol=0, rtol=0)


def independent_projected_adam(p, grads, lr, rank, gap, alpha, b1=0.9, b2=0.999, eps=1e-6, wd=0.0):
    """docs/optimizers/galore.md, Update, written out: refresh at step 0, T, ... (and once more at step 1 if step 0
    found no subspace);
    a zero-gradient refresh keeps P, and with no P yet the step changes nothing (but it counts)."""
    P, mom, var, t = None, None, None, 0
    p = p.clone()
    for G in grads:
        m, n = G.shape
        side = 0 if m >= n else 1
        if (t % gap == 0 or (t == 1 and P is None)) and G.abs().sum() > 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            P = Vh[:rank] if side == 0 else U[:, :rank]
        t += 1
        if P is None:
            continue
        R = G @ P.T if side == 0 else P.T @ G
        if mom is None:
            mom, var = torch.zeros_like(R), torch.zeros_like(R)
        mom = b1 * mom + (1 - b1) * R
        var = b2 * var + (1 - b2) * R * R
        Nd = mom / (var.sqrt() + eps)
        c = (1 - b2**t) ** 0.5 / (1 - b1**t)
        D = Nd @ P if side == 0 else P @ Nd
        p = p - lr * c * alpha * D
        p = p - lr * wd * p
    return p


def test_projected_optimizer_equals_independent_math():
    model, layer = toy(detach_norm=False, b_std=0)  # B = 0 init: ∇A ≡ 0 at step 1, so A's first step is skipped
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = layer.lora_magnitude_vector["default"].weight
    start = [t.detach().clone() for t in (A, B, g)]
    lr, gap, alpha, wd = 1e-2, 2, 0.5, 0.1
    opt = create_gradnormlorp_optimizer(model, lr=lr, weight_decay=wd, update_proj_gap=gap, proj_scale=alpha)
    history = [[], [], []]
    for step in range(5):
        model(torch.randn(6, 32)).square().mean().backward()
        for h, t in zip(history, (A, B, g)):
            h.append(t.grad.clone())
        opt.step()
        opt.zero_grad()
    assert history[0][0].abs().sum() == 0  # the skipped first step of A
    assert opt.state[A]["step"] == opt.state[B]["step"] == 5 and opt.state[B]["refreshes"] == 3
    for p, p0, grads in ((A, start[0], history[0]), (B, start[1], history[1])):
        expected = independent_projected_adam(p0, grads, lr, 4, gap, alpha, wd=wd)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
    # the magnitude: AdamW-HF, no projection, no α
    gm = start[2].clone()
    mom = var = torch.zeros_like(gm)
    for t, grad in enumerate(history[2], 1):
        mom = 0.9 * mom + 0.1 * grad
        var = 0.999 * var + 0.001 * grad * grad
        gm = gm - lr * ((1 - 0.999**t) ** 0.5 / (1 - 0.9**t)) * mom / (var.sqrt() + 1e-6)
        gm = gm - lr * wd * gm
    torch.testing.assert_close(g.detach(), gm, atol=1e-6, rtol=1e-5)


def test_state_bytes_formula_and_low_rank_projection():
    model = peft_tiny("gradnormlorp", r=8)
    with pytest.warns(UserWarning, match="proj_rank=4 < r"):
        opt = create_gradnormlorp_optimizer(model, lr=1e-3, proj_rank=4)
    train_steps(model, opt, 0, 2)
    assert optimizer_state_bytes(opt) == gradnormlorp_state_bytes(model, proj_rank=4)
    # worked out: r = 8, r_p = 4, a 64×64 layer gives A: 4·(2·4·64 + 8·4), B: 4·(2·64·4 + 4·8)
    torch.manual_seed(0)
    toy_model = get_peft_model(Toy(64, 64), gradnormlorp_config(8, 16, ["lin"]))
    assert gradnormlorp_state_bytes(toy_model, 4) == 4 * (2 * 4 * 64 + 8 * 4) + 4 * (2 * 64 * 4 + 4 * 8) + 8 * 64


def test_wiring_checks():
    vanilla = get_peft_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="q_proj.*not a GradNormLoRPLinear"):
        check_gradnormlorp_model(vanilla)
    model = peft_tiny("gradnormlorp")
    assert all(isinstance(m, GradNormLoRPLinear) for m in model.modules() if hasattr(m, "lora_A"))
    assert model.peft_config["default"].use_dora


def test_trains_merges_and_round_trips_also_as_vanilla_dora(tmp_path):
    model = peft_tiny("gradnormlorp")
    opt = adapters.create_optimizer("gradnormlorp", model, lr=1e-2)
    losses = train_steps(model, opt, 0, 6, fixed_batch=True)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    ids = lm_batch(7)["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = adapters.load(tiny_llama(), str(tmp_path), "gradnormlorp")
        assert any(isinstance(m, GradNormLoRPLinear) for m in loaded.modules())
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)
        dora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # no custom module: PEFT's own DoRA
        torch.testing.assert_close(dora(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert_merge_matches(model)


@pytest.mark.slow
def test_resume_is_exact():
    assert_resume_exact("gradnormlorp")
    assert_resume_exact("gradnormlorp", j=1, dtype=torch.bfloat16)
