"""Low-rank adapters on PEFT LoRA: ``lorapro`` (optimizer-side), ``allora`` and ``gradnormlorp`` (custom PEFT
LoRA modules plus their optimizers), and plain ``lora``.

One entry point per step of a fine-tuning job, by adapter name:
``lora_config`` (the ``LoraConfig``, with the method's module registered) → ``wrap`` (``get_peft_model`` plus the
method's per-module checks) → ``create_optimizer`` (the method on its tensors, any registered memtrain optimizer
on the rest) → ``load`` (a saved adapter back onto a base model, custom modules re-registered).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..optim import capabilities, registry
from . import allora, gradnormlorp, lorapro
from .allora import ALLoRALinear, allora_config, check_allora_model, create_allora_optimizer
from .common import AdapterFactory, LoraPair, lora_layers
from .gradnormlorp import (GradNormLoRPLinear, check_gradnormlorp_model, create_gradnormlorp_optimizer,
                           gradnormlorp_config, init_magnitudes)
from .lorapro import create_lorapro_optimizer, lorapro_pairs

ADAPTERS = ("lora", "gradnormlorp", "lorapro", "allora")

#: Method options (``--adapter_args k=v,...``) and their types; MODULE_OPTIONS live on the LoRA modules (and in
#: memtrain's run config: LoraConfig cannot carry them), the rest are optimizer options.
ADAPTER_OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {},
    "lorapro": {"mode": str, "x_mode": str, "delta": float, "other_lora_layers": str},
    "allora": {"eta": float, "norm_target": str, "norm_power": int},
    "gradnormlorp": {"detach_norm": bool, "proj_rank": int, "update_proj_gap": int, "proj_scale": float},
}
MODULE_OPTIONS = {"allora": ("eta", "norm_target", "norm_power"), "gradnormlorp": ("detach_norm",)}


def _check_name(adapter: str) -> None:
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")


def parse_adapter_args(adapter: str, text: str | None) -> dict[str, Any]:
    """``"k=v,k=v"`` → typed options of ``adapter`` (errors name the option and list the accepted ones)."""
    _check_name(adapter)
    accepted = ADAPTER_OPTIONS[adapter]
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise ValueError(f"adapter_args entry {item!r} must look like key=value")
        if key not in accepted:
            raise ValueError(f"unknown option {key!r} for adapter {adapter}; accepted options: "
                             f"{', '.join(accepted) or 'none'}")
        try:
            out[key] = registry._convert(raw, accepted[key], key)
        except ValueError as e:
            raise ValueError(f"adapter option {key}={raw!r}: {e}") from None
    return out


def engine_refusal(adapter: str, engine: str, options: dict | None = None) -> str | None:
    """Why ``adapter`` (with its ``adapter_args`` options) cannot train under ``engine`` (the names of
    :func:`memtrain.optim.capabilities.engine_refusal`), or None. Plain LoRA runs anywhere."""
    _check_name(adapter)
    if adapter == "allora" and (options or {}).get("norm_target") == "factor_rows":
        needs = allora.FACTOR_ROWS_CAPABILITIES
    else:
        needs = {"lorapro": lorapro.CAPABILITIES, "gradnormlorp": gradnormlorp.CAPABILITIES,
                 "allora": allora.CAPABILITIES}.get(adapter, {})
    return capabilities.engine_refusal(engine, f"adapter {adapter!r}", **needs, alternative="--adapter lora")


def _split(adapter: str, options: dict) -> tuple[dict, dict]:
    module_keys = MODULE_OPTIONS.get(adapter, ())
    return ({k: v for k, v in options.items() if k in module_keys},
            {k: v for k, v in options.items() if k not in module_keys})


def lora_config(adapter: str, *, r: int = 8, lora_alpha: int = 16, target_modules="all-linear",
                lora_dropout: float = 0.0, base=None, **options):
    """The ``LoraConfig`` for ``adapter``; ``base`` (a user's LoraConfig) replaces r/alpha/targets/dropout."""
    from peft import LoraConfig

    _check_name(adapter)
    module_opts, _ = _split(adapter, options)
    if adapter == "allora":
        # ALLoRA has no α/r scaling and no dropout: its own config unless the user gave one (then it is checked).
        return allora_config(r, target_modules, base, **module_opts)
    if base is None:
        base = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=lora_dropout)
    if adapter == "gradnormlorp":
        return gradnormlorp_config(base=base, **module_opts)
    return base


def wrap(model: nn.Module, adapter: str, config):
    """``get_peft_model`` plus the method's checks (and GradNormLoRP's fp32 magnitude init)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if adapter == "allora":
        check_allora_model(peft_model)
    elif adapter == "gradnormlorp":
        init_magnitudes(peft_model)
    elif adapter == "lorapro":
        lorapro_pairs(peft_model)
    return peft_model


def create_optimizer(adapter: str, model: nn.Module, optim: str = "adamw", *, lr: float, weight_decay: float = 0.0,
                     optim_args: str | None = None, **options):
    """The optimizer of a wrapped model: the adapter's method on its tensors, ``optim`` on every other one."""
    _check_name(adapter)
    _, opt_opts = _split(adapter, options)
    if adapter == "lora":  # plain LoRA: the chosen optimizer with its normal routing
        return registry.build_optimizer(model, optim, lr=lr, weight_decay=weight_decay,
                                        **registry.parse_optim_args(optim, optim_args), **opt_opts)
    create = {"lorapro": create_lorapro_optimizer, "allora": create_allora_optimizer,
              "gradnormlorp": create_gradnormlorp_optimizer}[adapter]
    return create(model, optim, lr=lr, weight_decay=weight_decay, optim_args=optim_args, **opt_opts)


def load(model: nn.Module, path: str, adapter: str, *, is_trainable: bool = False, **options):
    """A saved adapter onto ``model`` with the method's custom module re-registered (without it PEFT would
    silently rebuild vanilla LoRA/DoRA layers), then the method's checks."""
    from peft import LoraConfig, PeftModel

    _check_name(adapter)
    module_opts, _ = _split(adapter, options)
    config = LoraConfig.from_pretrained(path)
    if adapter == "allora":
        config = allora_config(base=config, **module_opts)
    elif adapter == "gradnormlorp":
        config = gradnormlorp_config(base=config, **module_opts)
    peft_model = PeftModel.from_pretrained(model, path, config=config, is_trainable=is_trainable)
    if adapter == "allora":
        check_allora_model(peft_model, trainable_only=False)
    elif adapter == "gradnormlorp":
        check_gradnormlorp_model(peft_model, trainable_only=False)
    return peft_model


__all__ = ["ADAPTERS", "ADAPTER_OPTIONS", "parse_adapter_args", "lora_config", "wrap", "create_optimizer", "load",
           "AdapterFactory", "LoraPair", "lora_layers", "ALLoRALinear", "GradNormLoRPLinear",
           "create_lorapro_optimizer", "create_allora_optimizer", "create_gradnormlorp_optimizer"]
