"""adafactor: parity with transformers.optimization.Adafactor, the math against an independent transcription,
and HF Trainer's optim="adafactor" reproduced through memtrain's Trainer."""
import copy
import math

import pytest
import torch
import transformers
from transformers.optimization import Adafactor as HFAdafactor

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core runner (pytest -n 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HF_MODES = {
    # the three cases, plus the Trainer default (external lr, no parameter scale) with decay and momentum
    "relative_step": dict(lr=None, relative_step=True, scale_parameter=True),
    "fixed_lr_momentum": dict(lr=1e-3, relative_step=False, scale_parameter=True, beta1=0.9, weight_decay=0.1),
    "scale_parameter_off": dict(lr=None, relative_step=True, scale_parameter=False, warmup_init=True),
    "trainer_default_wd": dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.8, weight_decay=0.1),
}


def _hf_groups(model, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@pytest.mark.parametrize("mode,dtype", [(m, torch.float32) for m in HF_MODES] + [("trainer_default_wd", torch.bfloat16)],
                         ids=[*HF_MODES, "trainer_default_wd-bf16"])
def test_matches_hf_adafactor_over_20_steps_on_tiny_llama(mode, dtype):
    kw = dict(HF_MODES[mode])
    wd = kw.pop("weight_decay", 0.0)
    ours_model = tiny_llama(dtype=dtype)
    ref_model = copy.deepcopy(ours_model)
    ours = memtrain.build_optimizer(ours_model, "adafactor", weight_decay=wd, **kw)
    ref = HFAdafactor(_hf_groups(ref_model, wd), **kw)
    for step in range(20):  # real LM gradients at our weights, fed to both (the optimizers alone are compared)
        ours_model(**lm_batch(step)).loss.backward()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            b.grad = a.grad.clone()
        for o in (ours, ref):
            o.step()
            o.zero_grad()
    worst = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(ours_model.parameters(), ref_model.parameters()))
    assert worst <= 1e-6, worst
    moved = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(ours_model.parameters(), tiny_llama(dtype=dtype).parameters()))
    assert moved > 1e-4  # the runs really trained (warmup_init steps are 1e-6·t)


def _reference_step(p, g, st, t, *, lr, eps1=1e-30, eps2=1e-3, d=1.0, c=-0.8, beta1=None, wd=0.0,
                    relative_step=False, scale_parameter=False):
    """Adafactor in fp64, written from the paper (sums form of the factored estimate), one parameter."""
    p, g = p.double(), g.double()
    rho = min(1e-2, 1 / math.sqrt(t)) if relative_step else lr
    alpha = max(eps2, p.pow(2).mean().sqrt().item()) * rho if scale_parameter else rho
    beta2 = 1 - t**c
    q = g * g + eps1
    if p.dim() == 2:
        st["R"] = beta2 * st.get("R", 0) + (1 - beta2) * q.sum(dim=1)  # row sums
        st["C"] = beta2 * st.get("C", 0) + (1 - beta2) * q.sum(dim=0)  # column sums
        v = torch.outer(st["R"], st["C"]) / st["R"].sum()  # the paper's R_s C_sᵀ / (1ᵀ R_s)
    else:
        st["V"] = beta2 * st.get("V", 0) + (1 - beta2) * q
        v = st["V"]
    u = g / v.sqrt()
    u = u / max(1.0, u.pow(2).mean().sqrt().item() / d) * alpha
    if beta1 is not None:
        st["M"] = beta1 * st.get("M", 0) + (1 - beta1) * u
        u = st["M"]
    return p - wd * alpha * p - u


@pytest.mark.parametrize("kw", [dict(lr=3e-2), dict(lr=None, relative_step=True, scale_parameter=True, beta1=0.9),
                                dict(lr=1e-2, wd=0.1, scale_parameter=True)])
def test_steps_equal_an_independent_fp64_transcription(kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 7))
    b = torch.nn.Parameter(torch.randn(12))
    ours_kw = {("weight_decay" if k == "wd" else k): v for k, v in kw.items()}
    opt = memtrain.build_optimizer([w, b], "adafactor", **{"weight_decay": 0.0, **ours_kw})
    ref_w, ref_b = w.detach().double().clone(), b.detach().double().clone()
    sw, sb = {}, {}
    for t in range(1, 5):
        gw, gb = torch.randn(12, 7), torch.randn(12)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        ref_w = _reference_step(ref_w, gw, sw, t, **kw)
        ref_b = _reference_step(ref_b, gb, sb, t, **kw)
    torch.testing.assert_close(w.detach().double(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), ref_b, rtol=1e-5, atol=1e-6)


def test_factored_identities_and_first_step_statistics():
    from memtrain.optim.adafactor import factored_rsqrt

    g = torch.randn(9, 5, dtype=torch.float64).square() + 1e-30
    r, c = g.mean(dim=1), g.mean(dim=0)
    sums = torch.outer(g.sum(dim=1), g.sum(dim=0)) / g.sum()
    torch.testing.assert_close(factored_rsqrt(r, c), sums.rsqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.mean(), c.mean(), rtol=1e-12, atol=0)

    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = memtrain.build_optimizer([w], "adafactor", lr=1e-2)
    w.grad = torch.randn(6, 4)
    opt.step()
    st = opt.state[w]
    assert torch.equal(st["exp_avg_sq_row"], (w.grad.square() + 1e-30).mean(dim=1))  # β̂_1 = 0: no history
    assert torch.equal(st["exp_avg_sq_col"], (w.grad.square() + 1e-30).mean(dim=0))
    assert st["step"] == 1 and "exp_avg" not in st and "RMS" not in st


def test_update_is_clipped_to_rms_d_times_alpha():
    b = torch.nn.Parameter(torch.zeros(4))
    # At t = 1 the unclipped update of a vector is G/|G| = ±1 per entry (RMS 1); with d = 1/3 the clip bites
    # (unclipped RMS / d = 3) and the applied update must have RMS exactly d·α.
    opt = memtrain.build_optimizer([b], "adafactor", lr=0.5, clip_threshold=1 / 3)
    b.grad = torch.tensor([3.0, -1.0, 2.0, 0.5])
    opt.step()
    applied = (-b.detach()).pow(2).mean().sqrt()
    torch.testing.assert_close(applied, torch.tensor(0.5 / 3), rtol=1e-6, atol=0)


def test_state_bytes_factored_is_about_zero_per_param():
    w = torch.nn.Parameter(torch.zeros(2048, 5461))
    opt = memtrain.build_optimizer([w], "adafactor", lr=1e-3)
    w.grad = torch.ones_like(w)
    opt.step()
    assert optimizer_state_bytes(opt) == 4 * (2048 + 5461)
    momentum = memtrain.build_optimizer([w], "adafactor", lr=1e-3, beta1=0.9)
    momentum.step()
    assert optimizer_state_bytes(momentum) == 4 * (2048 + 5461) + 4 * w.numel()


def test_min_dim_to_factor_keeps_small_matrices_full():
    w = torch.nn.Parameter(torch.randn(4, 300))
    opt = memtrain.build_optimizer([w], "adafactor", lr=1e-3, min_dim_to_factor=128)
    w.grad = torch.randn(4, 300)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg_sq"} and opt.state[w]["exp_avg_sq"].shape == (4, 300)


def test_options_parse():  # bad options: tests/optim_table.py
    assert memtrain.parse_optim_args("adafactor", "beta1=0.9,eps2=1e-4") == {"beta1": 0.9, "eps2": 1e-4}
    assert memtrain.parse_optim_args("adafactor", "beta1=none") == {"beta1": None}


def test_flattened_shard_is_refused():
    w = torch.nn.Parameter(torch.randn(12))
    opt = memtrain.build_optimizer([{"params": [w], "role": "matrix", "names": ["layer.q_proj.weight"]}],
                                   "adafactor", lr=1e-3)
    w.grad = torch.randn(12)
    with pytest.raises(RuntimeError, match="use FSDP2 \\(fully_shard\\) or DDP"):
        opt.step()


@pytest.mark.slow
def test_trainer_optim_adafactor_is_ours_and_equals_hf_trainer(tmp_path):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (32, 16), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    common = dict(learning_rate=3e-3, weight_decay=0.1, max_steps=4, per_device_train_batch_size=8,
                  save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    ours = memtrain.Trainer(model=tiny_llama(), train_dataset=data,
                            args=memtrain.TrainingArguments(str(tmp_path / "ours"), optim="adafactor",
                                                            final_eval=False, write_report=False, **common))
    ours.train()
    hf = transformers.Trainer(model=tiny_llama(), train_dataset=data,
                              args=transformers.TrainingArguments(str(tmp_path / "hf"), optim="adafactor", **common))
    hf.train()
    inner = getattr(ours.optimizer, "optimizer", ours.optimizer)
    assert type(inner).__module__ == "memtrain.optim.adafactor"
    assert type(getattr(hf.optimizer, "optimizer", hf.optimizer)) is HFAdafactor
    group = next(g for g in inner.param_groups if g["role"] == "matrix")
    assert not group["relative_step"] and not group["scale_parameter"] and "eps" not in group
    worst = max((a - b).abs().max().item() for a, b in zip(ours.model.parameters(), hf.model.parameters()))
    assert worst <= 1e-6, worst
    assert max((a - b).abs().max().item() for a, b in zip(ours.model.parameters(), tiny_llama().parameters())) > 1e-3
