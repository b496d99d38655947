"""No optimizer step reads a tensor value on the host (docs/registry-and-routing.md, The base optimizer).

A host sync in ``step()`` stalls a GPU once per parameter per step, and makes the step impossible to run on fake
tensors (``FakeTensorMode``, which ``memtrain estimate`` uses to measure a real step's memory without memory).
Two checks per registered optimizer and adapter method, plain and layer-wise:

* it steps twice on a small LLaMA built under ``FakeTensorMode``, several optimizers in one process (nothing
  cached across optimizer instances may hold another mode's tensors);
* on real CPU tensors, a ``TorchDispatchMode`` counts ``aten._local_scalar_dense`` (what ``.item()``,
  ``.tolist()``, ``bool(t)``, ``float(t)`` and ``int(t)`` lower to) over whole steps, refresh steps included:
  zero.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import memtrain
from memtrain import adapters

from ..conftest import VOCAB, lm_batch

NAMES = memtrain.optimizer_names()
ADAPTERS = ["gradnormlorp", "lorapro", "lorapro-efficient", "allora", "allora-factor_rows"]
FALLBACKS = ["swan/adam4bit", "galore/adafactor"]  # method/fallback (docs/registry-and-routing.md)
#: Options that make two steps exercise every code path: adam4bit quantises the tiny model's tensors, GaLore and
#: Fira refresh at both steps (the second through the schedule).
OPTIONS = {"adam4bit": {"threshold": 1}, "galore": {"rank": 4, "update_proj_gap": 1},
           "fira": {"rank": 4, "update_proj_gap": 1}}


def small_llama() -> LlamaForCausalLM:
    """conftest's tiny LLaMA, built without ``.to(dtype)``: ``Module.to`` cannot swap fake parameters."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=VOCAB, max_position_embeddings=64, use_cache=False))


def build(case: str, model, layerwise: bool, wrapped: bool = False):
    if case in FALLBACKS:
        name, fallback = case.split("/")
        return memtrain.build_optimizer(model, name, lr=1e-2, weight_decay=0.01, layerwise=layerwise,
                                        fallback=fallback, **OPTIONS.get(name, {}))
    if case in NAMES:
        return memtrain.build_optimizer(model, case, lr=1e-2, weight_decay=0.01, layerwise=layerwise,
                                        layerwise_clip=1.0 if layerwise else 0.0, **OPTIONS.get(case, {}))
    adapter, _, variant = case.partition("-")
    module = {"norm_target": variant} if adapter == "allora" and variant else {}
    if not wrapped:
        model = adapters.wrap(model, adapter, adapters.lora_config(adapter, r=4, lora_alpha=8, **module))
    options = {"mode": variant} if adapter == "lorapro" and variant else {}
    if adapter == "gradnormlorp":
        options["update_proj_gap"] = 1
    opt = adapters.create_optimizer(adapter, model, "adamw", lr=1e-2, weight_decay=0.01, **options)
    return model, opt


def model_and_optimizer(case: str, layerwise: bool):
    model = small_llama()
    if case in NAMES + FALLBACKS:
        return model, build(case, model, layerwise)
    if layerwise:
        pytest.skip("adapter methods are not layer-wise (LoRA-Pro steps its pairs together)")
    return build(case, model, layerwise)


def to_fake(model, mode: FakeTensorMode):
    """Swap every parameter and buffer for a fake one, ties kept. PEFT moves new LoRA layers with ``Module.to``,
    which cannot swap fake parameters (torch 2.13), so adapter models are wrapped on real tensors first."""
    fakes = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None:
                    if id(t) not in fakes:
                        fake = mode.from_tensor(t)
                        fakes[id(t)] = torch.nn.Parameter(fake, t.requires_grad) if table is module._parameters else fake
                    table[key] = fakes[id(t)]
    return model


def steps(model, opt, start: int, n: int) -> None:
    for s in range(start, start + n):
        model(**lm_batch(s, batch=2, length=8)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
def test_every_optimizer_steps_on_fake_tensors(layerwise):
    """All of them in one process, each under its own FakeTensorMode."""
    failed = {}
    for case in NAMES + FALLBACKS + ADAPTERS:
        if layerwise and case in ADAPTERS:
            continue
        try:
            mode = FakeTensorMode()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if case not in ADAPTERS:  # what ``memtrain estimate`` does: the model is built on fake tensors
                    with mode:
                        model, opt = model_and_optimizer(case, layerwise)
                else:
                    model, _ = model_and_optimizer(case, layerwise)
                    model = to_fake(model, mode)
                    with mode:
                        model, opt = build(case, model, layerwise, wrapped=True)
                with mode:
                    steps(model, opt, 0, 2)
                assert opt.state and all(torch._subclasses.fake_tensor.is_fake(t) for s in opt.state.values()
                                         for t in s.values() if torch.is_tensor(t))
        except Exception as e:  # collect them all: one report names every optimizer that syncs
            failed[case] = f"{type(e).__name__}: {str(e)[:200]}"
    assert not failed, failed


class HostSyncs(TorchDispatchMode):
    """Counts the reads of tensor values on the host: ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``,
    ``float(t)``, ``int(t)``, a Python ``if`` on a tensor), plus ``Tensor.tolist`` and ``Tensor.numpy``, which
    read the memory without dispatching, and copies from a non-CPU device to the CPU."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._patched = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        elif func is torch.ops.aten._to_copy.default and str(kwargs.get("device", "")) == "cpu" \
                and args[0].device.type != "cpu":
            self.count += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = self._patched[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t.any()), lambda: float(t[0]),
                 lambda: int(t[0]), lambda: t[0] > 0 and None, lambda: t.numpy()):
        with HostSyncs() as syncs:
            read()
        assert syncs.count >= 1


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
@pytest.mark.parametrize("case", NAMES + FALLBACKS + ADAPTERS)
def test_no_host_sync_in_a_step(case, layerwise):
    """First steps (lazy state, a projector refresh at each step for the low-rank methods), and the backward of
    the layer-wise hooks, all counted."""
    model, opt = model_and_optimizer(case, layerwise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(3):
            loss = model(**lm_batch(s, batch=2, length=8)).loss  # the forward is not the optimizer's
            with HostSyncs() as syncs:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            assert syncs.count == 0, f"{case}: {syncs.count} host syncs in step {s}"
    assert opt.state
