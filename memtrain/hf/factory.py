"""memtrain optimizers for HF's Trainer: optimizer names, the ``optimizer_cls_and_kwargs`` factory, and the
keyword arguments a ``TrainingArguments`` implies."""
from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
import transformers
from transformers.training_args import OptimizerNames

from ..optim import registry
from ..optim.layerwise import LayerwiseOptimizer
from ..optim.routing import format_param_groups

logger = logging.getLogger(__name__)

HF_OPTIMIZERS = tuple(o.value for o in OptimizerNames)


def _optim_name(optim) -> str:
    return str(optim.value if isinstance(optim, Enum) else optim)


def is_memtrain_optimizer(optim) -> bool:
    """memtrain names take precedence where a name is also HF's (``adafactor``)."""
    return _optim_name(optim) in registry.optimizer_names()


# -- the optimizer factory --------------------------------------------------------------------------------
class MemtrainOptimizerFactory:
    """What HF Trainer instantiates for ``optimizer_cls_and_kwargs=(factory, kwargs)``: it calls
    ``MemtrainOptimizerFactory()(model, **kwargs)``; we route the model's parameters and build the optimizer."""

    def __call__(self, model: torch.nn.Module, *, name: str, lr: float, weight_decay: float,
                 print_param_groups: bool = False, **options):
        optimizer = registry.build_optimizer(model, name, lr=lr, weight_decay=weight_decay, **options)
        registry.check_options_for_model(name, options, optimizer.param_groups)  # e.g. a rank above every min(m, n)
        if isinstance(optimizer, LayerwiseOptimizer):
            # HF's Trainer marks the last micro-batch of each accumulation window in accelerate's (shared)
            # gradient state before that micro-batch's backward; the hooks step only then.
            from accelerate.state import GradientState

            gradient_state = GradientState()
            optimizer.gate = lambda: gradient_state.sync_gradients
        table = format_param_groups(optimizer.param_groups)
        if print_param_groups and _is_main_process():
            print(f"memtrain: {name} parameter groups\n{table}", flush=True)
        else:
            logger.info("memtrain: %s parameter groups\n%s", name, table)
        return optimizer


def optimizer_factory(name: str, *, lr: float, weight_decay: float = 0.0, optim_args: str | None = None,
                      **options) -> tuple[type, dict]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    HF's Trainer passes neither ``learning_rate`` nor ``weight_decay`` to a factory, so both are explicit
    here: give the values of your TrainingArguments (the Trainer's lr schedule multiplies this lr).
    Options are validated now, so a typo fails before training starts.
    """
    options = {**registry.parse_optim_args(name, registry.normalize_optim_args(optim_args)), **options}
    spec = registry.get_spec(name)
    build_args = ("target_modules", "rules")  # routing arguments of build_optimizer, not optimizer options
    registry.validate_options(name, {**spec.defaults, **{k: v for k, v in options.items() if k not in build_args},
                                     "lr": lr, "weight_decay": weight_decay})
    registry.check_option_values(name, options, lr=lr, weight_decay=weight_decay)  # ranges, before any training
    return MemtrainOptimizerFactory, {"name": name, "lr": lr, "weight_decay": weight_decay, **options}


def optimizer_kwargs_from_args(args: transformers.TrainingArguments) -> dict[str, Any]:
    """lr, weight decay, betas and ε from TrainingArguments (when the optimizer takes them), then optim_args.

    A method whose own ε (or betas) default differs from HF's keeps it unless the user set the TrainingArguments
    value: the GaLore family's ε is 1e-6 (docs/optimizers/galore.md, Options), and HF's untouched adam_epsilon=1e-8 must
    not replace it.
    """
    name = _optim_name(args.optim)
    accepted = registry.get_spec(name).options()
    hf_fields = transformers.TrainingArguments.__dataclass_fields__

    def user_set(option: str, value, *fields: str) -> bool:
        own = accepted[option].default
        hf_default = tuple(hf_fields[f].default for f in fields)
        hf_default = hf_default[0] if len(fields) == 1 else hf_default
        return own is accepted[option].empty or value != hf_default or own == hf_default

    kwargs: dict[str, Any] = {}
    betas = (args.adam_beta1, args.adam_beta2)
    if "betas" in accepted and user_set("betas", betas, "adam_beta1", "adam_beta2"):
        kwargs["betas"] = betas
    if "eps" in accepted and user_set("eps", args.adam_epsilon, "adam_epsilon"):
        kwargs["eps"] = args.adam_epsilon
    if args.optim_target_modules is not None:
        kwargs["target_modules"] = args.optim_target_modules
    kwargs.update(registry.parse_optim_args(name, args.optim_args))
    if getattr(args, "layerwise", False):
        kwargs["layerwise"] = True
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay, **kwargs}


def find_layerwise(optimizer) -> LayerwiseOptimizer | None:
    """The LayerwiseOptimizer inside ``optimizer`` (accelerate wraps it), or None."""
    while optimizer is not None and not isinstance(optimizer, LayerwiseOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
