"""What the three adapter methods share: finding LoRA (A, B) pairs by module, reading each module's real scaling,
and building "adapter + any memtrain optimizer" at construction time.

Pairs come from the modules themselves (``module.lora_A[adapter]`` with ``module.lora_B[adapter]`` of the same
``LoraLayer``), never from parameter names or list positions, and the scaling is ``module.scaling[adapter]``, so
rsLoRA, ``rank_pattern`` and ``alpha_pattern`` are honoured. An optimizer group stores its pairs as
``[index_of_A, index_of_B, scaling]`` over its own ``params`` (plain ints and floats, so ``state_dict()`` stays
``weights_only``-loadable); ``step()`` never looks at names.

Routing: memtrain's routing tags ``lora_A``/``lora_B`` weights ``matrix`` (they are ``nn.Linear`` weights). The
adapter methods do not want a matrix method (SWAN, GaLore, ...) on the factors: their papers give the factors an
Adam of their own. So each factory takes the adapter's tensors out of the routed groups and puts them in groups
with role ``lora`` (a role no method owns, so the AdamW-T fallback unless the adapter takes over); every other
trainable tensor keeps the chosen optimizer's routing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..optim import registry, routing
from ..optim.base import MemtrainOptimizer

LORA_ROLE = "lora"


@dataclass(frozen=True)
class LoraPair:
    name: str  # the module's qualified name, for messages
    module: nn.Module
    adapter: str
    A: nn.Parameter  # lora_A[adapter].weight, [r, n]
    B: nn.Parameter  # lora_B[adapter].weight, [m, r]
    scaling: float


def lora_layers(model: nn.Module, trainable_only: bool = True):
    """``(name, module, adapter)`` for every PEFT ``LoraLayer`` adapter (that has a trainable tensor)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}))
        for adapter in sorted(adapters):
            if not trainable_only or any(p.requires_grad for p in adapter_tensors(module, adapter)):
                yield name, module, adapter


def adapter_tensors(module: nn.Module, adapter: str) -> list[nn.Parameter]:
    """Every parameter of ``module`` that belongs to ``adapter`` (factors, biases, DoRA magnitude, ...)."""
    out = []
    for attr in module.adapter_layer_names:
        container = getattr(module, attr, None)
        if container is not None and adapter in container:
            item = container[adapter]
            out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return out


def plain_pair_problem(module: nn.Module, adapter: str, *, allow_variants: tuple[str, ...] = ()) -> str | None:
    """Why ``(module, adapter)`` is not a plain LoRA ``Linear`` pair with ``W_eff = W0 + s·B A``, or None."""
    from peft.tuners.lora.layer import ParamWrapper

    if isinstance(module, ParamWrapper) or getattr(module, "num_experts", 1) > 1:
        return "it is a ParamWrapper / multi-expert LoRA layer (its delta is not s·B A)"
    variant = module.lora_variant.get(adapter)
    if variant is not None and type(variant).__name__ not in allow_variants:
        return f"it uses the LoRA variant {type(variant).__name__} (DoRA or another W_eff-changing variant)"
    if adapter not in module.lora_A or not isinstance(module.lora_A[adapter], nn.Linear) \
            or not isinstance(module.lora_B[adapter], nn.Linear):
        return "its LoRA factors are not nn.Linear (embedding or convolution LoRA)"
    if not (module.lora_A[adapter].weight.requires_grad and module.lora_B[adapter].weight.requires_grad):
        return "one of its LoRA factors is frozen"
    return None


def unadapted_forward(module: nn.Module, x, args: tuple, kwargs: dict):
    """The part of a custom PEFT LoRA ``Linear.forward`` that every adapter module shares: PEFT's argument checks,
    mixed-adapter batches refused, variant keywords dropped (``kwargs`` is edited in place). Returns the base layer's
    output when no adapter applies (adapters disabled, or merged into the weight), else None."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    module._check_forward_args(x, *args, **kwargs)
    if kwargs.pop("adapter_names", None) is not None:
        raise ValueError(f"{type(module).__name__} does not support mixed-adapter batches (adapter_names)")
    for key in VARIANT_KWARG_KEYS:
        kwargs.pop(key, None)
    if module.disable_adapters:
        if module.merged:
            module.unmerge()
        return module.base_layer(x, *args, **kwargs)
    if module.merged:
        return module.base_layer(x, *args, **kwargs)
    return None


def make_pair(name: str, module: nn.Module, adapter: str) -> LoraPair:
    return LoraPair(name, module, adapter, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                    float(module.scaling[adapter]))


def pair_group(pairs: list[LoraPair], **keys) -> dict:
    """One param group holding the factors of ``pairs`` as ``[A0, B0, A1, B1, ...]`` plus ``lora_pairs``."""
    params, names, index = [], [], []
    for pair in pairs:
        index.append([len(params), len(params) + 1, pair.scaling])
        params += [pair.A, pair.B]
        names += [f"{pair.name}.lora_A.{pair.adapter}.weight", f"{pair.name}.lora_B.{pair.adapter}.weight"]
    return {"params": params, "names": names, "role": LORA_ROLE, "layout": "linear", "lora_pairs": index, **keys}


def tensor_group(tensors: list[tuple[str, nn.Parameter]], **keys) -> dict:
    return {"params": [p for _, p in tensors], "names": [n for n, _ in tensors], "role": LORA_ROLE,
            "layout": "none", **keys}


def named_adapter_tensors(model: nn.Module, name: str, module: nn.Module, adapter: str):
    ids = {id(p) for p in adapter_tensors(module, adapter)}
    prefix = f"{name}." if name else ""
    return [(prefix + n, p) for n, p in module.named_parameters() if id(p) in ids and p.requires_grad]


# -- "adapter + any registered optimizer" ---------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _combined_class(mixin: type, base: type) -> type:
    """``mixin`` on top of a registered optimizer class (PEFT's create_riemannian_optimizer pattern)."""
    return type(f"{mixin.__name__}[{base.__name__}]", (mixin, base), {"__module__": mixin.__module__})


def build_adapter_optimizer(model: nn.Module, optim: str, *, lr: float, weight_decay: float, adapter_groups: list,
                            mixin: type | None = None, optim_args: str | None = None, **options: Any):
    """The registered optimizer ``optim`` over ``model``'s trainable parameters, with the tensors listed in
    ``adapter_groups`` taken out of the normal routing and put in those groups instead. ``mixin`` (a class that
    overrides ``_update_fn``/``step`` for groups it marks) is combined with the optimizer's class."""
    spec = registry.get_spec(optim)
    merged = {**spec.defaults, **registry.parse_optim_args(optim, optim_args), **options, "lr": lr,
              "weight_decay": weight_decay}
    registry.validate_options(optim, merged)
    fallback = merged.pop("fallback", "adamw")
    if not issubclass(spec.cls, MemtrainOptimizer):
        raise TypeError(f"optimizer {optim!r} is not a MemtrainOptimizer; adapters need one")
    taken = {id(p) for g in adapter_groups for p in g["params"]}
    if len(taken) != sum(len(g["params"]) for g in adapter_groups):
        raise ValueError("a tensor appears in two adapter groups")
    groups = []
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    if rest:
        for group in routing.build_param_groups(model, owned_roles=spec.owns, weight_decay=weight_decay):
            keep = [(p, n) for p, n in zip(group["params"], group["names"]) if id(p) not in taken]
            if keep:
                groups.append({**group, "params": [p for p, _ in keep], "names": [n for _, n in keep]})
    for group in adapter_groups:
        if group["params"]:
            groups.append({"weight_decay": weight_decay, **group})
    cls = _combined_class(mixin, spec.cls) if mixin is not None else spec.cls
    return cls(groups, **merged).use_fallback(fallback)


class AdapterFactory:
    """What HF Trainer instantiates for ``optimizer_cls_and_kwargs=(AdapterFactory, kwargs)``: it calls
    ``AdapterFactory()(model, **kwargs)``. lr and weight decay are explicit (the Trainer passes neither)."""

    def __call__(self, model: nn.Module, *, create, **kwargs):
        return create(model, **kwargs)


def fallback_update_without_decay(optimizer: MemtrainOptimizer, param, grad, state, group, rows) -> None:
    """AdamW-T with the group's decay switched off (the adapter applied its own decay already)."""
    optimizer.adamw_update(param, grad, state, {**group, "weight_decay": 0.0}, rows)


__all__ = ["LoraPair", "lora_layers", "plain_pair_problem", "make_pair", "pair_group", "tensor_group",
           "build_adapter_optimizer", "AdapterFactory", "LORA_ROLE"]
