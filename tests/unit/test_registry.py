import pytest
import torch

import memtrain
from memtrain.optim import registry
from memtrain.optim.registry import OptimizerSpec, UnknownOptimizerError

from ..conftest import tiny_llama


def test_every_registered_name_resolves_and_builds():
    names = memtrain.optimizer_names()
    assert "adamw" in names
    rows = {r["name"]: r for r in memtrain.list_optimizers()}
    assert set(rows) == set(names)
    for name in names:
        spec = registry.get_spec(name)
        assert spec.name == name and spec.description
        assert set(spec.capabilities()) == {"stateless", "needs_matrix_shape", "fsdp2", "deepspeed"}
        opt = memtrain.build_optimizer(tiny_llama(), name, lr=1e-3)
        assert isinstance(opt, torch.optim.Optimizer)
        assert all(g["lr"] == 1e-3 for g in opt.param_groups)  # no group keeps a default lr of its own


def test_list_shows_description_and_capabilities():
    text = registry.format_optimizers()
    assert "adamw" in text and "baseline" in text and "fsdp2" in text


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownOptimizerError) as e:
        memtrain.build_optimizer(tiny_llama(), "adamz", lr=1e-3)
    assert "'adamz'" in str(e.value)
    for name in memtrain.optimizer_names():
        assert name in str(e.value)


def test_optim_args_are_typed():
    assert memtrain.parse_optim_args("adamw", "betas=0.9:0.95, eps=1e-6") == {"betas": (0.9, 0.95), "eps": 1e-6}
    assert memtrain.parse_optim_args("adamw", "") == {}
    assert memtrain.parse_optim_args("adamw", None) == {}


@pytest.mark.parametrize("text, words", [
    ("foo=1", ["'foo'", "adamw", "betas", "eps"]),
    ("eps=abc", ["eps", "'abc'", "number"]),
    ("betas=0.9", ["betas", "2 values"]),
    ("eps", ["key=value"]),
    ("lr=0.1", ["'lr'", "training arguments"]),
])
def test_bad_optim_args_name_the_problem(text, words):
    with pytest.raises(ValueError) as e:
        memtrain.parse_optim_args("adamw", text)
    for word in words:
        assert word in str(e.value)


def test_build_optimizer_requires_lr_and_checks_options():
    model = tiny_llama()
    with pytest.raises(TypeError):
        memtrain.build_optimizer(model, "adamw")  # no silent lr default; bad options: tests/optim_table.py


def test_spec_rejects_lr_default_and_unknown_defaults():
    base = registry.get_spec("adamw").cls
    with pytest.raises(ValueError, match="lr must come from"):
        OptimizerSpec(type("X", (base,), {"name": "x", "description": "x", "presets": {"lr": 1e-3}}))
    with pytest.raises(ValueError, match="unknown options"):
        OptimizerSpec(type("X", (base,), {"name": "x", "description": "x", "presets": {"rank": 4}}))
    with pytest.raises(ValueError, match="description"):
        registry.register(type("X", (base,), {"name": "x", "description": ""}))
    assert "x" not in registry.optimizer_names()


def test_spec_reads_every_capability_from_the_class():
    class Mine(registry.get_spec("adamw").cls):
        name, description, stateless, fsdp2, presets = "mine", "d", True, False, {"eps": 1e-6}
    spec = OptimizerSpec(Mine)
    assert spec.capabilities() == {"stateless": True, "needs_matrix_shape": False, "fsdp2": False, "deepspeed": True}
    assert dict(spec.defaults) == {"eps": 1e-6} and spec.owns == frozenset()


def test_duplicate_registration_with_another_class_is_refused():
    class Other(torch.optim.SGD):
        name, description = "adamw", "x"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Other)
