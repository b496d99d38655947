"""The optimizer registry: name -> :class:`OptimizerSpec`, option parsing, and ``build_optimizer``.

Everything the registry knows about a method is on its class (``name``, ``description``, ``owns``,
``needs_matrix_shape``, ``stateless``, ``fsdp2``, ``deepspeed``, ``presets``; see
:class:`~memtrain.optim.base.MemtrainOptimizer`). :data:`BUILTINS` is the one table of built-in methods (adding a
method is one line there); :func:`register` adds a user's class. Options are the keyword arguments of the class's
``__init__``: their annotations give the types that ``optim_args="k=v,k=v"`` strings are converted to, so the
class signature is the single source of truth for names, types and defaults.
"""
from __future__ import annotations

import importlib
import inspect
import re
import typing
from dataclasses import dataclass
from types import MappingProxyType, UnionType
from typing import Any, Literal, Mapping, Union

from torch import nn

from . import routing
from .layerwise import LayerwiseOptimizer

#: The built-in methods: name -> "module:Class" under memtrain.optim, imported on first registry use.
BUILTINS = {
    "adamw": "adamw:AdamW",
    "swan": "swan:SWAN",
    "sinkgd": "sinkgd:SinkGD",
    "scale": "scale:SCALE",
    "galore": "galore:GaLore",
    "fira": "fira:Fira",
    "adafactor": "adafactor:Adafactor",
    "adam4bit": "adam4bit:Adam4bit",
    "slimadam": "slimadam:SlimAdam",
    "muon": "muon:Muon",
    "apollo": "apollo:APOLLO",
    "apollo_mini": "apollo:APOLLOMini",
}

#: Arguments the training loop owns; they are not optim_args options.
TRAINER_ARGS = ("lr", "weight_decay")
#: Options every optimizer accepts, handled here rather than by each class: layer-wise gradient release
#: (``layerwise.LayerwiseOptimizer``), its per-parameter gradient clipping, and the method that updates the roles
#: the optimizer does not own (``MemtrainOptimizer.use_fallback``; docs/registry-and-routing.md).
UNIVERSAL_OPTIONS = {"layerwise": bool, "layerwise_clip": float, "fallback": Literal["adamw", "adam4bit", "adafactor"]}
_UNIVERSAL_DEFAULTS = {"layerwise": False, "layerwise_clip": 0.0, "fallback": "adamw"}
_NOT_OPTIONS = ("self", "params")
CAPABILITIES = ("stateless", "needs_matrix_shape", "fsdp2", "deepspeed")


@dataclass(frozen=True)
class OptimizerSpec:
    """A read-only view of a registered optimizer class: every field comes from the class's attributes."""

    cls: type

    def __post_init__(self):
        for attr in ("name", "description"):
            if not isinstance(getattr(self.cls, attr, None), str) or not getattr(self.cls, attr):
                raise ValueError(f"{self.cls.__name__}: an optimizer class needs a non-empty class attribute {attr!r}")
        bad = set(self.defaults) - set(self.options())
        if bad:
            raise ValueError(f"{self.name}: defaults name unknown options {sorted(bad)}")
        if "lr" in self.defaults:
            raise ValueError(f"{self.name}: lr must come from the training configuration, not a registry default")

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def description(self) -> str:
        return self.cls.description

    @property
    def defaults(self) -> Mapping[str, Any]:
        """The class's ``presets``: values passed unless the user overrides them. Never ``lr``."""
        return MappingProxyType(dict(getattr(self.cls, "presets", {})))

    @property
    def owns(self) -> frozenset:
        return frozenset(getattr(self.cls, "owns", frozenset()))

    def capabilities(self) -> dict[str, bool]:
        """``stateless``, ``needs_matrix_shape``, ``fsdp2``, ``deepspeed`` (an unset one: the base's default)."""
        base = {"stateless": False, "needs_matrix_shape": False, "fsdp2": True, "deepspeed": True}
        return {k: bool(getattr(self.cls, k, base[k])) for k in CAPABILITIES}

    stateless = property(lambda self: self.capabilities()["stateless"])
    needs_matrix_shape = property(lambda self: self.capabilities()["needs_matrix_shape"])
    fsdp2 = property(lambda self: self.capabilities()["fsdp2"])
    deepspeed = property(lambda self: self.capabilities()["deepspeed"])

    def options(self) -> dict[str, inspect.Parameter]:
        """The constructor's keyword options (lr and weight_decay included), in signature order."""
        sig = inspect.signature(self.cls.__init__)
        return {
            n: p for n, p in sig.parameters.items()
            if n not in _NOT_OPTIONS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def option_types(self) -> dict[str, Any]:
        hints = typing.get_type_hints(self.cls.__init__)
        return {n: hints.get(n, Any) for n in self.options()}


_REGISTRY: dict[str, OptimizerSpec] = {}
_loaded = False


def register(cls: type) -> type:
    """Register an optimizer class under ``cls.name`` (usable as a class decorator). Its capabilities and
    presets are read from its class attributes; re-registering a name with another class is refused."""
    spec = OptimizerSpec(cls)
    if spec.name in _REGISTRY and _REGISTRY[spec.name].cls is not cls:
        raise ValueError(f"optimizer name {spec.name!r} is already registered by {_REGISTRY[spec.name].cls}")
    _REGISTRY[spec.name] = spec
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name, target in BUILTINS.items():
            module, _, cls_name = target.partition(":")
            cls = getattr(importlib.import_module(f"{__package__}.{module}"), cls_name)
            if cls.name != name:
                raise RuntimeError(f"BUILTINS[{name!r}] is {target}, whose class name is {cls.name!r}")
            register(cls)


class UnknownOptimizerError(ValueError):
    pass


def optimizer_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; memtrain optimizers are: {', '.join(optimizer_names())}"
        ) from None


def list_optimizers() -> list[dict]:
    """One row per registered optimizer: name, description, capabilities."""
    return [
        {"name": s.name, "description": s.description, **s.capabilities()}
        for s in (get_spec(n) for n in optimizer_names())
    ]


def format_optimizers() -> str:
    rows = list_optimizers()
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        caps = [k for k in CAPABILITIES if r[k]]
        lines.append(f"{r['name']:<{width}}  {r['description']}  [{', '.join(caps) or '-'}]")
    return "\n".join(lines)


def format_options(name: str) -> str:
    """One optimizer's ``optim_args`` options: name, type, default (registry preset where it has one)."""
    spec = get_spec(name)
    types = spec.option_types()
    rows = []
    for option, param in spec.options().items():
        if option in TRAINER_ARGS:
            continue
        default = spec.defaults.get(option, param.default)
        default = "required" if default is inspect.Parameter.empty else repr(default)
        rows.append((option, getattr(types[option], "__name__", str(types[option])).replace("typing.", ""), default))
    rows += [(k, t.__name__ if isinstance(t, type) else str(t).replace("typing.", ""), repr(_UNIVERSAL_DEFAULTS[k]))
             for k, t in UNIVERSAL_OPTIONS.items()]
    width = max(len(r[0]) for r in rows)
    twidth = max(len(r[1]) for r in rows)
    lines = [f"{spec.name}: {spec.description}", f"capabilities: "
             f"{', '.join(k for k, v in spec.capabilities().items() if v) or '-'}", "options (optim_args k=v,k=v):"]
    lines += [f"  {o:<{width}}  {t:<{twidth}}  default {d}" for o, t, d in rows]
    lines.append("lr and weight_decay come from the training arguments (--learning_rate, --weight_decay).")
    return "\n".join(lines)


def list_main(argv=None) -> int:
    """``memtrain list [NAME ...]``: every registered optimizer, or the options of the named ones."""
    names = list(argv or [])
    print(format_optimizers() if not names else "\n\n".join(format_options(n) for n in names))
    return 0


# -- options ----------------------------------------------------------------------------------------------
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(raw: str, annotation, option: str):
    """Convert one optim_args string value to ``annotation``'s type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, UnionType):
        if raw.lower() == "none" and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(raw, member, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = [s for s in raw.strip("()[]").replace("|", ":").split(":") if s]
        if origin is tuple and args and args[-1] is not Ellipsis and len(parts) != len(args):
            raise ValueError(f"expected {len(args)} values separated by ':' (e.g. 0.9:0.999)")
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        member_types = args if fixed else [args[0] if args else str] * len(parts)
        return origin(_convert(p, t, option) for p, t in zip(parts, member_types))
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    return raw  # str and anything unannotated


def _check_type(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (Union, UnionType):
        return any(_check_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def parse_optim_args(name: str, text: str | None) -> dict[str, Any]:
    """Parse ``"k=v,k=v"`` into typed keyword arguments for optimizer ``name``.

    Tuples use ``:`` inside one value (``betas=0.9:0.95``). Unknown options and unconvertible values raise
    ``ValueError`` naming the option and listing the accepted ones.
    """
    spec = get_spec(name)
    types = {**spec.option_types(), **UNIVERSAL_OPTIONS}
    accepted = [o for o in types if o not in TRAINER_ARGS]
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"optim_args entry {item!r} for {name} must look like key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in accepted:
            raise ValueError(
                f"unknown option {key!r} for optimizer {name}; accepted options: {', '.join(accepted) or 'none'}"
                + (" (lr and weight_decay come from the training arguments)" if key in TRAINER_ARGS else "")
            )
        try:
            out[key] = _convert(raw, types[key], key)
        except ValueError as e:
            raise ValueError(f"option {key}={raw!r} for optimizer {name}: {e}") from None
    return out


def validate_options(name: str, options: Mapping[str, Any]) -> None:
    spec = get_spec(name)
    types = {**spec.option_types(), **UNIVERSAL_OPTIONS}
    for key, value in options.items():
        if key not in types:
            raise TypeError(
                f"unknown option {key!r} for optimizer {name}; accepted options: {', '.join(types)}"
            )
        if not _check_type(value, types[key]):
            raise TypeError(f"option {key}={value!r} for optimizer {name} should be of type {types[key]}")


def _module_targeted(targets, module_name: str) -> bool:
    """HF's ``optim_target_modules`` matching (``transformers.trainer_utils.check_target_module_exists``): a
    string is a regex that must match the whole module name; a list matches by exact name, substring, or
    full regex match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return (module_name in targets or any(t in module_name for t in targets)
            or any(re.fullmatch(t, module_name) for t in targets))


def _target_module_rules(model: nn.Module, targets, rules):
    """Routing rules that restrict the ``matrix`` role to the modules ``targets`` names: every other matrix
    becomes ``other``, which methods do not transform (their fallback updates it)."""
    if isinstance(targets, str) and targets.replace("_", "-") == "all-linear":
        return rules
    if not isinstance(targets, (str, list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"target_modules must be a regex string, a list of module names, or 'all-linear'; "
                        f"got {targets!r}")
    matrices = [r.name for r in routing.route_parameters(model, rules) if r.role == "matrix"]
    excluded = [n for n in matrices if not _module_targeted(targets, n.rpartition(".")[0])]
    if matrices and len(excluded) == len(matrices):
        raise ValueError(f"target_modules {targets!r} matched no matrix module of the model (module names look like "
                         f"{matrices[0].rpartition('.')[0]!r}); give names, substrings, a regex, or 'all-linear'")
    return [(f"^{re.escape(n)}$", "other") for n in excluded] + routing._parse_rules(rules)


def build_optimizer(model_or_params, name: str, *, lr: float, weight_decay: float = 0.0, rules=None,
                    target_modules=None, layerwise: bool = False, layerwise_clip: float = 0.0, fallback: str = "adamw",
                    **options):
    """Build the registered optimizer ``name``.

    Given an ``nn.Module``, parameters are routed by role (``routing.build_param_groups``; ``rules`` overrides
    roles with ``(regex, role)`` pairs; ``target_modules``, HF's ``optim_target_modules`` convention, limits the
    ``matrix`` role to those modules). Given parameters or param groups, they are used as they are. ``lr`` is
    required: memtrain has no silent learning-rate default (docs/registry-and-routing.md). ``layerwise=True`` returns
    a :class:`~memtrain.optim.layerwise.LayerwiseOptimizer` around the optimizer (gradient release in backward).
    ``fallback`` (``adamw``, ``adam4bit``, ``adafactor``) is the method for the roles ``name`` does not own.
    """
    spec = get_spec(name)
    merged = {**spec.defaults, **options, "lr": lr, "weight_decay": weight_decay}
    validate_options(name, {**merged, "layerwise": layerwise, "layerwise_clip": layerwise_clip, "fallback": fallback})
    if isinstance(model_or_params, nn.Module):
        if target_modules is not None:
            rules = _target_module_rules(model_or_params, target_modules, rules)
        params = routing.build_param_groups(
            model_or_params, owned_roles=spec.owns, weight_decay=weight_decay, rules=rules
        )
    elif rules is not None or target_modules is not None:
        raise ValueError("routing rules and target_modules need the model: pass the nn.Module, not its parameters")
    else:
        params = model_or_params
    optimizer = spec.cls(params, **merged)
    if fallback != "adamw":
        optimizer.use_fallback(fallback)
    if layerwise:
        return LayerwiseOptimizer(optimizer, clip=layerwise_clip)
    return optimizer


# -- option values: forms, duplicates, ranges, resumability (docs/registry-and-routing.md "Checked options") ----
#: Options that may change when a run resumes from a checkpoint: they shape no optimizer state, so the new value
#: is applied to the restored param groups (docs/resume.md). Every other option must match the checkpoint.
#: ``lr`` follows the new --learning_rate (its schedule is rescaled); trainer-level settings (lr schedule, warm-up,
#: max_grad_norm, batch size, max_steps) always come from the new arguments.
RESUMABLE_COMMON = frozenset({"lr", "adam_lr", "weight_decay", "betas", "eps", "layerwise_clip"})
RESUMABLE: dict[str, frozenset] = {
    "adafactor": frozenset({"eps1", "eps2", "clip_threshold", "decay_rate"}),
    "galore": frozenset({"scale", "update_proj_gap"}),
    "fira": frozenset({"alpha", "gamma", "update_proj_gap"}),
    "scale": frozenset({"momentum", "norm_eps"}),
    "sinkgd": frozenset({"iterations", "norm_eps"}),
    # stateless on matrices
    "swan": frozenset({"ns_steps", "ns_quintic_steps", "ns_dtype", "ns_eval", "damping", "row_eps", "fp32_whitening",
                       "norm_dim"}),
}


def resumable_options(name: str) -> frozenset:
    """The options of ``name`` that a resumed run may change (HF optimizers: the common ones)."""
    return RESUMABLE_COMMON | RESUMABLE.get(name, frozenset())


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ":".join(_format_value(v) for v in value)
    return str(value)


def normalize_optim_args(value) -> str | None:
    """``optim_args`` in any form a user writes it, as the canonical ``"k=v,k=v"`` string.

    Accepted: ``None``/empty, a ``"k=v,k=v"`` string, a JSON object string (``'{"rank": 8}'``), or a mapping
    (YAML/JSON config files, a Python dict in ``TrainingArguments``); tuple values as lists or ``a:b``. A key given
    twice is refused (the last one used to win silently)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("{"):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"optim_args {value!r} starts with '{{' but is not a JSON object: {e}") from None
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"optim_args keys must be option names (strings), got {key!r}")
        return ",".join(f"{k}={_format_value(v)}" for k, v in value.items()) or None
    if not isinstance(value, str):
        raise TypeError(f"optim_args must be a 'k=v,k=v' string or a mapping of option names to values, got "
                        f"{type(value).__name__} {value!r}")
    keys = [item.split("=", 1)[0].strip() for item in value.split(",") if item.strip()]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"optim_args {value!r} gives {', '.join(repeated)} more than once; give each option once")
    return value.strip() or None


def check_option_values(name: str, options: Mapping[str, Any], *, lr: float, weight_decay: float = 0.0) -> None:
    """Refuse out-of-range option values at argument-parsing time, with the valid range.

    The optimizer class is the one source of its constraints (rank >= 1, betas in [0, 1), lr >= 0, …): it is
    built here on a 2×2 probe parameter, which runs every check of its constructor and creates no state (state is
    lazy). Checks that need the model (e.g. a GaLore rank against the matrix sizes) run at build time
    (:func:`check_options_for_model`)."""
    import torch

    spec = get_spec(name)
    own = {k: v for k, v in options.items() if k not in UNIVERSAL_OPTIONS and k not in ("target_modules", "rules")}
    clip = options.get("layerwise_clip", 0.0)
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip >= 0:
        raise ValueError(f"option layerwise_clip={clip!r} for optimizer {name}: must be a number >= 0 (0: no clipping)")
    probe = [{"params": [nn.Parameter(torch.zeros(2, 2))], "role": "matrix", "names": ["probe"]}]
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.cls(probe, **{**spec.defaults, **own, "lr": lr, "weight_decay": weight_decay})
    except (ValueError, TypeError) as e:
        raise ValueError(f"optimizer {name}: {e} (`memtrain list {name}` shows its options and defaults)") from None


def check_options_for_model(name: str, options: Mapping[str, Any], param_groups) -> None:
    """Checks that need the routed model. A projection ``rank`` at or above min(m, n) of every projected matrix
    projects nothing and keeps more state than AdamW: refused with the useful range; clipped on some matrices
    only: a warning naming them."""
    rank = options.get("rank", get_spec(name).defaults.get("rank"))
    if "rank" not in get_spec(name).options() or rank is None:
        return
    shapes = [(n, tuple(p.shape)) for g in param_groups if g.get("role") == "matrix" and g.get("method") == name
              for n, p in zip(g.get("names", [""] * len(g["params"])), g["params"]) if p.dim() >= 2]
    if not shapes:
        return
    clipped = [(n, s) for n, s in shapes if rank >= min(s[0], s[-1])]
    largest = max(min(s[0], s[-1]) for _, s in shapes)
    if len(clipped) == len(shapes):
        raise ValueError(f"optimizer {name}: rank={rank} is at least min(m, n) of every projected matrix (largest "
                         f"min(m, n) = {largest}), so nothing is projected and the state would exceed AdamW's; use "
                         f"1 <= rank < {largest}")
    if clipped:
        import logging

        logging.getLogger(__name__).warning(
            "%s: rank=%d >= min(m, n) of %d of %d projected matrices (%s%s): they are projected onto their full "
            "space", name, rank, len(clipped), len(shapes), ", ".join(f"{n} {s}" for n, s in clipped[:3]),
            ", …" if len(clipped) > 3 else "")
