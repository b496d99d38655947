"""Batched matrix updates (docs/registry-and-routing.md, "Batched matrix updates"): ``step()`` hands the same-shape
matrices of a ``batched`` method (swan, sinkgd) to ``update_batch`` together; the result equals the per-matrix path
(``step_param``, what layer-wise release and FSDP2 run) within the method's tolerance, for fp32 and bf16
parameters; a stack is never larger than the group's largest matrix."""
import copy

import pytest
import torch

import memtrain

from ..conftest import lm_batch, tiny_llama

CASES = [("swan", {}), ("swan", {"norm_dim": 0}), ("swan", {"ns_dtype": "bfloat16"}), ("swan", {"ns_eval": "eigh"}),
         ("sinkgd", {})]


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


def _spy(monkeypatch, name):
    calls = []
    cls = type(memtrain.build_optimizer(tiny_llama(), name, lr=1e-3))
    real = cls.update_batch
    monkeypatch.setattr(cls, "update_batch", lambda self, params, grads, group:
                        calls.append(tuple(p.shape for p in params)) or real(self, params, grads, group))
    return calls


@pytest.mark.parametrize("name,options", CASES)
def test_batched_step_equals_the_per_matrix_path(name, options, monkeypatch):
    calls = _spy(monkeypatch, name)
    batched, opt = _run(name, options, batched=True)
    # tiny_llama's 2 layers: q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48. The largest matrix (1,536 elements)
    # bounds a stack: k/v go 3 + 1, the rest one by one, and a stack of one takes the per-matrix path.
    assert calls == [((16, 32),) * 3] * 3
    per_matrix, ref_opt = _run(name, options, batched=False)
    _assert_same(batched, per_matrix, rtol=1e-6, atol=1e-7)  # observed: swan bitwise, sinkgd <= 3e-8
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


@pytest.mark.parametrize("name", ["swan", "sinkgd"])
def test_a_stack_is_never_larger_than_the_largest_matrix(name, monkeypatch):
    """So batching never raises the step's memory peak: five 8x8 matrices next to one 16x8 go in stacks of 2, 2, 1
    (the last, and the 16x8, on the per-matrix path)."""
    calls = _spy(monkeypatch, name)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(5)] + [torch.nn.Parameter(torch.randn(16, 8))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = memtrain.build_optimizer([{"params": params, "role": "matrix"}], name, lr=0.1)
    ref = memtrain.build_optimizer([{"params": copies, "role": "matrix"}], name, lr=0.1)
    for p, c in zip(params, copies):
        p.grad = torch.randn(p.shape)
        c.grad = p.grad.clone()
    opt.step()
    assert [len(c) for c in calls] == [2, 2]
    _per_matrix_step(ref)
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["swan", "sinkgd"])
def test_bf16_parameters_batched(name):
    batched, _ = _run(name, {}, batched=True, dtype=torch.bfloat16, steps=2)
    per_matrix, _ = _run(name, {}, batched=False, dtype=torch.bfloat16, steps=2)
    assert all(p.dtype == torch.bfloat16 for p in batched.parameters())
    _assert_same(batched, per_matrix, rtol=0, atol=0)  # one fp32 update rounded once into bf16: the same bits


def test_unbatched_methods_and_fallback_groups_keep_the_per_matrix_path(monkeypatch):
    seen = []
    monkeypatch.setattr(type(memtrain.build_optimizer(tiny_llama(), "swan", lr=1e-3)), "update_batch",
                        lambda self, params, grads, group: seen.append(group["role"]))
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "swan", lr=1e-3)
    _grads(model, 0)
    opt.step()
    assert set(seen) == {"matrix"}  # embedding/head/vectors: the AdamW fallback, one parameter at a time
    assert not memtrain.build_optimizer(tiny_llama(), "adamw", lr=1e-3).batched


@pytest.mark.parametrize("name, options", [("swan", {}), ("swan", {"ns_eval": "eigh"}), ("sinkgd", {})])
def test_a_batched_step_never_syncs_and_runs_on_fake_tensors(name, options, monkeypatch):
    """The stacked path keeps the step contract (tests/contract/test_host_sync.py checks every optimizer's default
    path; this checks that the stacks are what ran)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from ..contract.test_host_sync import HostSyncs, small_llama, steps
    calls = _spy(monkeypatch, name)
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, name, lr=1e-3, **options)
    for step in range(2):
        _grads(model, step)
        with HostSyncs() as syncs:
            opt.step()
        assert syncs.count == 0
    assert len(calls) == 2  # the k/v stack of each step
    with FakeTensorMode():
        fake = small_llama()
        fake_opt = memtrain.build_optimizer(fake, name, lr=1e-3, **options)
        steps(fake, fake_opt, 0, 2)
    assert len(calls) > 2 and all(is_fake(p) for p in fake.parameters())


def test_spread_over_ranks_refuses_methods_and_setups_it_cannot_serve():
    """Spreading (docs/distributed.md, "Spreading matrix updates over DDP ranks") is for methods whose matrix update
    is costly, under a process group; the 2-rank behaviour is tests/distributed/test_parity.py's."""
    model = tiny_llama()
    for name in ("sinkgd", "galore", "adamw"):
        with pytest.raises(ValueError, match=r"does not spread its updates over ranks.*\(swan, muon\)"):
            memtrain.build_optimizer(model, name, lr=1e-3).spread_over_ranks()
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        memtrain.build_optimizer(model, "swan", lr=1e-3).spread_over_ranks()
