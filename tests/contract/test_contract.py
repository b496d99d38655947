"""The contract every registered optimizer keeps, iterated over the optimizer table (tests/optim_table.py).

A new registration fails ``test_the_table_covers_every_registered_optimizer`` until it has a row: build kwargs, the
state-bytes formula, its reference, capabilities and error inputs. Then every test here runs on it.
"""
import copy
import io
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

import memtrain
from memtrain.hf.metrics import optimizer_state_bytes

from ..conftest import lm_batch, tiny_llama
from ..optim_table import BY_NAME, LR, OPTIMS

NAMES = [info.name for info in OPTIMS]
TESTS = Path(__file__).resolve().parents[1]


def _build(name, model, lr=LR, **kw):
    return BY_NAME[name].build(model, lr=lr, **kw)


def _build_lr0(name, model):
    """Every learning rate 0, the separate fallback lr (``adam_lr``) included."""
    return _build(name, model, lr=0.0, **{k: 0.0 for k in BY_NAME[name].kwargs if k == "adam_lr"})


def _steps(model, opt, start, n):
    for s in range(start, start + n):
        model(**lm_batch(s)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_the_table_covers_every_registered_optimizer():
    registered = set(memtrain.optimizer_names())
    assert registered - set(NAMES) == set(), f"add rows to tests/optim_table.py for {sorted(registered - set(NAMES))}"
    assert set(NAMES) - registered == set(), f"rows for unregistered names {sorted(set(NAMES) - registered)}"


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_what_the_table_says(name):
    row = next(r for r in memtrain.list_optimizers() if r["name"] == name)
    assert {k: row[k] for k in BY_NAME[name].capabilities} == BY_NAME[name].capabilities
    assert set(row) == {"name", "description", *BY_NAME[name].capabilities}


@pytest.mark.parametrize("name", NAMES)
def test_the_table_names_an_existing_reference_test(name):
    path, test = BY_NAME[name].reference.test.split("::")
    assert re.search(rf"^def {test}\(", (TESTS.parent / path).read_text(), re.M), BY_NAME[name].reference.test


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("name", [i.name for i in OPTIMS if i.reference.build is not None])
def test_matches_its_reference_on_tiny_llama(name, weight_decay):
    """4 steps (galore/fira refresh at steps 1 and 3) of real LM gradients at our weights, fed to both: the
    optimizers alone are compared, every parameter to the table's tolerance (bitwise where it is 0)."""
    info = BY_NAME[name]
    model = tiny_llama()
    reference_model = copy.deepcopy(model)
    ours = info.build(model, weight_decay=weight_decay)
    reference_step = info.reference.build(reference_model, ours)
    for step in range(4):
        model(**lm_batch(step)).loss.backward()
        for a, b in zip(model.parameters(), reference_model.parameters()):
            b.grad = a.grad.clone()
        ours.step()
        reference_step()
        ours.zero_grad(set_to_none=True)
        reference_model.zero_grad(set_to_none=True)
    for (n, a), b in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=info.reference.rtol, atol=info.reference.atol, msg=n)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny_llama().model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("name, bad", [(i.name, bad) for i in OPTIMS for bad in i.errors],
                         ids=[f"{i.name}-{bad}" for i in OPTIMS for bad in i.errors])
def test_error_inputs_fail_with_the_text_a_user_needs(name, bad):
    model = tiny_llama()
    with pytest.raises(bad.error, match=bad.match):
        if bad.optim_args is not None:
            memtrain.parse_optim_args(name, bad.optim_args)
        else:
            target = list(model.parameters()) if bad.on_params else model
            memtrain.build_optimizer(target, name, **{"lr": LR, **bad.options})


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_refuses_unknown_options_listing_the_accepted_ones(name):
    with pytest.raises(TypeError, match=f"unknown option 'nope' for optimizer {name}; accepted options: .*lr"):
        memtrain.build_optimizer(tiny_llama(), name, lr=LR, nope=1)
    with pytest.raises(ValueError, match=f"unknown option 'nope' for optimizer {name}; accepted options: "):
        memtrain.parse_optim_args(name, "nope=1")
    assert BY_NAME[name].errors, "give the row at least one method-specific bad input"


@pytest.mark.parametrize("name", NAMES)
def test_state_is_lazy_and_bytes_match_formula(name):
    model = tiny_llama()
    opt = _build(name, model)
    assert len(opt.state) == 0 and optimizer_state_bytes(opt) == 0  # nothing before the first step()
    _steps(model, opt, 0, 2)
    assert optimizer_state_bytes(opt) == BY_NAME[name].state_bytes(model)
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
    fresh = _build_lr0(name, fresh_model)
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
    lr=0 step of a fresh optimizer and restores only the entries that template has (docs/registry-and-routing.md, State
    rules): every entry a
    trained optimizer holds must exist after that step, with its shape and dtype, or resume silently loses it."""
    model = tiny_llama()
    trained = _build(name, model)
    _steps(model, trained, 0, 2)
    fresh_model = tiny_llama()
    fresh = _build_lr0(name, fresh_model)
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
