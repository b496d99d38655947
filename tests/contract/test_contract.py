"""The contract every registered optimizer keeps (DESIGN.md, "Tests we want to see").

Table-driven over ``memtrain.optimizer_names()``: a new registration is tested here automatically, and must add
its state-bytes formula to ``STATE_BYTES``.
"""
import io
import math
import warnings

import pytest
import torch

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama

NAMES = memtrain.optimizer_names()
LR = 1e-3


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _projected_bytes(model, rank=128, per_matrix_extra=0):
    """GaLore/Fira at their default rank: per ``matrix`` weight [m, n] fp32 P (r·d_s) and moments (2·r·d_l),
    r = min(rank, m, n), plus ``per_matrix_extra`` bytes; AdamW-HF's 8 B/param on every other role."""
    total = 0
    for route in memtrain.optim.route_parameters(model):
        if route.role == "matrix":
            r = min(rank, *route.param.shape)
            total += 4 * (r * min(route.param.shape) + 2 * r * max(route.param.shape)) + per_matrix_extra
        else:
            total += 8 * route.param.numel()
    return total


#: name -> exact optimizer-state bytes after a step on ``model`` (all trainable parameters had gradients).
STATE_BYTES = {
    "adamw": lambda model: 8 * sum(p.numel() for p in _trainable(model)),
    "galore": _projected_bytes,
    "fira": lambda model: _projected_bytes(model, per_matrix_extra=4),  # + the 0-d limiter norm per matrix
    # factored row + column statistics for ≥2-D tensors, a full second moment for 1-D ones (β1 = None)
    "adafactor": lambda model: sum(4 * (p.shape[:-1].numel() + p.shape[:-2].numel() * p.shape[-1]) if p.dim() >= 2
                                   else 4 * p.numel() for p in _trainable(model)),
    # ≥ 4096 elements: packed 4-bit m and v (N/2 B each), B128 m scales, rank-1 v row/col maxima; else fp32 AdamW
    "adam4bit": lambda model: sum(2 * (p.shape[0] * ((p.shape[1] + 1) // 2)) + 4 * p.shape[0] * -(-p.shape[1] // 128)
                                  + 4 * (p.shape[0] + p.shape[1]) if p.numel() >= 4096 else 8 * p.numel()
                                  for p in _trainable(model)),
    # full fp32 m; v of [m, 1] for q/k/embedding/head, [1, n] for v/o/MLP (default rules), full v on vectors
    "slimadam": lambda model: sum(
        8 * p.numel() if p.dim() < 2
        else 4 * p.numel() + 4 * (p.shape[1] if n.split(".")[-2] in ("v_proj", "o_proj", "gate_proj", "up_proj",
                                                                        "down_proj") else p.shape[0])
        for n, p in model.named_parameters() if p.requires_grad),
    # swan, sinkgd: nothing on hidden matrices; fp32 AdamW-T moments on embedding, head and 1-D params.
    "swan": lambda model: 8 * sum(p.numel() for p in _trainable(model) if p.dim() < 2 or any(
        p is e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()))),
    "sinkgd": lambda model: 8 * sum(p.numel() for p in _trainable(model) if p.dim() < 2 or any(
        p is e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()))),
    # apollo: fp32 P, moments (rank 128 never clipped: the random projection) and the 0-d limiter norm per matrix
    "apollo": lambda model: sum(4 * (128 * min(r.param.shape) + 2 * 128 * max(r.param.shape)) + 4
                                if r.role == "matrix" else 8 * r.param.numel()
                                for r in memtrain.optim.route_parameters(model)),
    "apollo_mini": lambda model: sum(4 * (min(r.param.shape) + 2 * max(r.param.shape)) + 4
                                     if r.role == "matrix" else 8 * r.param.numel()
                                     for r in memtrain.optim.route_parameters(model)),
    # muon: one fp32 momentum buffer per hidden matrix; fp32 AdamW moments on embedding, head and 1-D params.
    "muon": lambda model: sum(8 * p.numel() if p.dim() < 2 or any(
        p is e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings())) else 4 * p.numel()
        for p in _trainable(model)),
    # scale: fp32 momentum V×d on the head only; fp32 AdamW moments on 1-D params; nothing on matrices/embedding.
    "scale": lambda model: 4 * model.get_output_embeddings().weight.numel()
    + 8 * sum(p.numel() for p in _trainable(model) if p.dim() < 2),
}


def _build(name, model, lr=LR, **kw):
    return memtrain.build_optimizer(model, name, lr=lr, weight_decay=0.01, **kw)


def _steps(model, opt, start, n):
    for s in range(start, start + n):
        model(**lm_batch(s)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_every_optimizer_has_a_state_formula():
    assert set(NAMES) <= set(STATE_BYTES), f"add state formulas for {sorted(set(NAMES) - set(STATE_BYTES))}"


@pytest.mark.parametrize("name", NAMES)
def test_state_is_lazy_and_bytes_match_formula(name):
    model = tiny_llama()
    opt = _build(name, model)
    assert len(opt.state) == 0 and optimizer_state_bytes(opt) == 0  # nothing before the first step()
    _steps(model, opt, 0, 2)
    assert optimizer_state_bytes(opt) == STATE_BYTES[name](model)
    for state in opt.state.values():
        for key, value in state.items():
            assert torch.is_tensor(value) or isinstance(value, (int, float, bool)), (key, type(value))


@pytest.mark.parametrize("name", NAMES)
def test_params_change_frozen_and_gradless_untouched(name):
    model = tiny_llama()
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    gradless = model.model.layers[1].self_attn.q_proj.weight
    opt = _build(name, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**lm_batch(0)).loss.backward()
    gradless.grad = None
    opt.step()
    assert frozen not in opt.state and gradless not in opt.state
    for n, p in model.named_parameters():
        if p is frozen or p is gradless:
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), f"{n} did not change"


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradient_with_lr_zero_is_a_noop(name):
    model = tiny_llama()
    opt = _build(name, model)
    _steps(model, opt, 0, 1)  # existing state, then a fresh-state parameter case below
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    fresh_model = tiny_llama()
    fresh = _build(name, fresh_model, lr=0.0)
    before = [p.detach().clone() for p in fresh_model.parameters()]
    for p in fresh_model.parameters():
        p.grad = torch.zeros_like(p)
    fresh.step()
    for a, b in zip(fresh_model.parameters(), before):
        assert torch.equal(a, b)
    for o in (opt, fresh):
        for state in o.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.is_floating_point():
                    assert torch.isfinite(v).all()
                elif isinstance(v, float):
                    assert math.isfinite(v)


def _state_layout(opt):
    """Per parameter, in group order: each state entry's shape and dtype (tensors) or type (numbers)."""
    return [{k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else type(v) for k, v in opt.state[p].items()}
            for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradient_step_builds_the_whole_state(name):
    """Distributed checkpointing (FSDP2 resume through accelerate) builds its load template from one zero-gradient
    lr=0 step of a fresh optimizer and restores only the entries that template has (README §2.8): every entry a
    trained optimizer holds must exist after that step, with its shape and dtype, or resume silently loses it."""
    model = tiny_llama()
    trained = _build(name, model)
    _steps(model, trained, 0, 2)
    fresh_model = tiny_llama()
    fresh = _build(name, fresh_model, lr=0.0)
    for p in fresh_model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore/fira: "all-zero gradient at a projector refresh"
        fresh.step()
    assert _state_layout(fresh) == _state_layout(trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_with_weights_only_load_is_bitwise(name, dtype):
    k, j = 3, 3
    ref_model = tiny_llama(dtype=dtype)
    ref = _build(name, ref_model)
    _steps(ref_model, ref, 0, k + j)

    model = tiny_llama(dtype=dtype)
    opt = _build(name, model)
    _steps(model, opt, 0, k)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    saved_dtypes = {(pid, key): v.dtype for pid, s in opt.state_dict()["state"].items()
                    for key, v in s.items() if torch.is_tensor(v)}
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed_model = tiny_llama(seed=123, dtype=dtype)  # different init: everything must come from the checkpoint
    resumed_model.load_state_dict(ckpt["model"])
    resumed = _build(name, resumed_model)
    resumed.load_state_dict(ckpt["optim"])
    loaded_dtypes = {(pid, key): v.dtype for pid, s in resumed.state_dict()["state"].items()
                     for key, v in s.items() if torch.is_tensor(v)}
    assert loaded_dtypes == saved_dtypes
    _steps(resumed_model, resumed, k, j)
    for (n, a), b in zip(resumed_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n
