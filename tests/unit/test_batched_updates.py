"""Batched matrix updates (docs/registry-and-routing.md, "Batched matrix updates"): ``step()`` hands the same-shape
matrices of a ``batched`` method (swan, sinkgd) to ``update_batch`` together; the result equals the per-matrix path
(``step_param``, what layer-wise release and FSDP2 run) within the method's tolerance, in chunks of any size, for
fp32 and bf16 parameters."""
import copy

import pytest
import torch

import memtrain
import memtrain.optim.base as base

from ..conftest import lm_batch, tiny_llama

CASES = [("swan", {}), ("swan", {"norm_dim": 0}), ("sinkgd", {})]


def _grads(model, step):
    model.zero_grad()
    model(**lm_batch(step)).loss.backward()


def _per_matrix_step(opt):
    with torch.no_grad():
        for group in opt.param_groups:
            for index, param in enumerate(group["params"]):
                if param.grad is not None:
                    opt.step_param(param, param.grad, group, index)


def _run(name, options, *, batched, dtype=torch.float32, steps=3):
    model = tiny_llama(dtype=dtype)
    opt = memtrain.build_optimizer(model, name, lr=1e-2, weight_decay=0.1, adam_lr=3e-3, **options)
    for step in range(steps):
        _grads(model, step)
        opt.step() if batched else _per_matrix_step(opt)
    return model, opt


def _assert_same(a, b, rtol, atol):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name,options", CASES)
def test_batched_step_equals_the_per_matrix_path(name, options, monkeypatch):
    calls = []
    cls = type(memtrain.build_optimizer(tiny_llama(), name, lr=1e-3))
    real = cls.update_batch
    monkeypatch.setattr(cls, "update_batch",
                        lambda self, params, grads, group: calls.append(len(params)) or real(self, params, grads, group))
    batched, opt = _run(name, options, batched=True)
    # tiny_llama: 2 layers of q/o (32x32), k/v (16x32), gate/up (48x32), down (32x48): one call per shape per step
    assert sorted(calls[:4]) == [2, 4, 4, 4] and len(calls) == 12
    per_matrix, ref_opt = _run(name, options, batched=False)
    _assert_same(batched, per_matrix, rtol=1e-6, atol=1e-7)  # observed: swan bitwise, sinkgd <= 3e-8
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


@pytest.mark.parametrize("name,options", CASES[::2])
def test_chunks_of_any_size_give_the_same_step(name, options, monkeypatch):
    whole, _ = _run(name, options, batched=True, steps=2)
    monkeypatch.setattr(base, "BATCH_ELEMENTS", 32 * 32 * 3)  # q/o in chunks of 3 and 1, gate/up of 2 and 2
    chunked, _ = _run(name, options, batched=True, steps=2)
    _assert_same(whole, chunked, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["swan", "sinkgd"])
def test_bf16_parameters_batched(name):
    batched, _ = _run(name, {}, batched=True, dtype=torch.bfloat16, steps=2)
    per_matrix, _ = _run(name, {}, batched=False, dtype=torch.bfloat16, steps=2)
    assert all(p.dtype == torch.bfloat16 for p in batched.parameters())
    _assert_same(batched, per_matrix, rtol=0, atol=0)  # one fp32 update rounded once into bf16: the same bits


def test_unbatched_methods_and_fallback_groups_keep_the_per_matrix_path(monkeypatch):
    seen = []
    monkeypatch.setattr(type(memtrain.build_optimizer(tiny_llama(), "swan", lr=1e-3)), "update_batch", lambda self, params, grads, group: seen.append(group["role"]))
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "swan", lr=1e-3)
    _grads(model, 0)
    opt.step()
    assert set(seen) == {"matrix"}  # embedding/head/vectors: the AdamW fallback, one parameter at a time
    assert not memtrain.build_optimizer(tiny_llama(), "adamw", lr=1e-3).batched
