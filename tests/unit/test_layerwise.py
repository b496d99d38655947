"""Layer-wise gradient release: equal to the standard loop for every registered optimizer (table-driven, so
optimizers added later are covered), with gradient accumulation, per-parameter clipping, a real state_dict,
and peak gradient memory of one parameter's gradient (docs/layerwise.md)."""

import pytest
import torch

import memtrain
from memtrain.optim.adamw import AdamW
from memtrain.optim.layerwise import LayerwiseOptimizer

from ..conftest import checkpoint_roundtrip, lm_batch, tiny_llama

NAMES = memtrain.optimizer_names()


def _train(name, *, layerwise, accumulation, steps=3, clip=0.0, tied=False, scheduler=False):
    model = tiny_llama(tied=tied)
    opt = memtrain.build_optimizer(model, name, lr=1e-2, weight_decay=0.01, layerwise=layerwise,
                                   layerwise_clip=clip)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if scheduler else None
    for step in range(steps):
        for micro in range(accumulation):
            if layerwise:
                opt.is_last_microbatch = micro == accumulation - 1
            (model(**lm_batch(100 * step + micro)).loss / accumulation).backward()
        if clip and not layerwise:  # the reference: clip each parameter's gradient on its own
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("name", NAMES)
def test_layerwise_equals_standard(name, accumulation):
    ref_model, ref = _train(name, layerwise=False, accumulation=accumulation)
    model, opt = _train(name, layerwise=True, accumulation=accumulation)
    assert isinstance(opt, LayerwiseOptimizer)
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    # one real optimizer: the same state, parameter by parameter
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    for pid, state in ref.state_dict()["state"].items():
        for key, value in state.items():
            got = opt.state_dict()["state"][pid][key]
            if torch.is_tensor(value):
                torch.testing.assert_close(got, value, rtol=0, atol=1e-6)
            else:
                assert got == value, key
    assert all(p.grad is None for p in model.parameters())  # every gradient was released


def test_tied_embeddings_and_lr_schedule_and_per_parameter_clipping():
    ref_model, _ = _train("adamw", layerwise=False, accumulation=2, tied=True, scheduler=True, clip=0.05)
    model, opt = _train("adamw", layerwise=True, accumulation=2, tied=True, scheduler=True, clip=0.05)
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)  # the scheduler stepped once per step (3 steps)


def test_gradients_that_missed_the_gate_are_applied_by_step():
    """If nothing marks the last micro-batch, gradients accumulate and step() applies them: nothing is lost."""
    ref_model, _ = _train("adamw", layerwise=False, accumulation=2)
    model = tiny_llama()
    opt = memtrain.build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.01, layerwise=True)
    opt.is_last_microbatch = False
    for step in range(3):
        for micro in range(2):
            (model(**lm_batch(100 * step + micro)).loss / 2).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hooks_follow_parameters_swapped_into_the_groups():
    """HF Trainer builds the optimizer before accelerate's FSDP2 preparation swaps new parameter objects into
    ``param_groups``: ensure_hooks() moves the release hooks to them (and off the old ones)."""
    ref_model, _ = _train("adamw", layerwise=False, accumulation=1)
    old, model = tiny_llama(), tiny_llama()
    opt = memtrain.build_optimizer(old, "adamw", lr=1e-2, weight_decay=0.01, layerwise=True)
    new = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [new[n] for n in group["names"]]
    opt.ensure_hooks()
    assert not any(p._post_accumulate_grad_hooks for p in old.parameters())
    for step in range(3):
        model(**lm_batch(100 * step)).loss.backward()
        assert all(p.grad is None for p in model.parameters())  # applied and released inside backward
        opt.step()
        opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_peak_gradient_memory_is_one_parameter(name):
    """A test hook, registered before the release hooks so it sees each gradient before it is freed, records the
    bytes of all live ``.grad`` tensors each time one becomes final."""
    peaks = {}
    for layerwise in (False, True):
        model = tiny_llama()
        params = [p for p in model.parameters() if p.requires_grad]
        peak = [0]

        def record(_param, params=params, peak=peak):
            live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            peak[0] = max(peak[0], live)

        for p in params:
            p.register_post_accumulate_grad_hook(record)
        opt = memtrain.build_optimizer(model, name, lr=1e-2, layerwise=layerwise)
        for step in range(2):
            model(**lm_batch(step)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peaks[layerwise] = peak[0]
    largest = max(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() * p.element_size() for p in params)
    assert peaks[True] <= largest
    assert peaks[False] == total


def test_state_dict_round_trip_resumes_bitwise():
    ref_model, _ = _train("galore", layerwise=True, accumulation=1, steps=6)
    model, opt = _train("galore", layerwise=True, accumulation=1, steps=3)
    ckpt = checkpoint_roundtrip(model, opt)
    resumed_model = tiny_llama(seed=9)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = memtrain.build_optimizer(resumed_model, "galore", lr=1e-2, weight_decay=0.01, layerwise=True)
    resumed.load_state_dict(ckpt["optim"])
    resumed.param_groups[0]["lr"] = 1e-2  # new group dicts after load: the hooks must use them
    for step in range(3, 6):
        resumed_model(**lm_batch(100 * step)).loss.backward()
        resumed.step()
        resumed.zero_grad()
    for a, b in zip(resumed_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_refusals():
    model = tiny_llama()
    with pytest.raises(TypeError, match="needs a memtrain optimizer"):
        LayerwiseOptimizer(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="layerwise_clip must be"):
        memtrain.build_optimizer(model, "adamw", lr=1e-3, layerwise=True, layerwise_clip=-1.0)
    assert memtrain.parse_optim_args("galore", "layerwise=true,layerwise_clip=1.5") == {
        "layerwise": True, "layerwise_clip": 1.5}
    flat = torch.nn.Parameter(torch.zeros(8))
    flat._is_flat_param = True  # how FSDP1 marks its FlatParameter
    with pytest.raises(NotImplementedError, match="does not support FSDP1"):
        LayerwiseOptimizer(AdamW([flat], lr=1e-3))
