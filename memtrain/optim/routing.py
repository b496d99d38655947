"""Parameter routing: every trainable parameter gets exactly one role, decided once when groups are built.

Roles (docs/registry-and-routing.md, "Routing"):

=========== ================================================================================
``matrix``    weight of an ``nn.Linear`` (or GPT-2 ``Conv1D``) other than the output head
``embedding`` ``model.get_input_embeddings().weight`` (also the head when the two are tied)
``head``      ``model.get_output_embeddings().weight`` when it is not tied to the embedding
``vector``    every other trainable tensor with fewer than 2 dims (norm gains, biases)
``other``     every other trainable tensor with 2+ dims (e.g. position embeddings, convolutions)
=========== ================================================================================

Roles come from module types and the model's own accessors, never from name substrings; users may override
them with ordered ``(regex, role)`` rules (first match wins). The role is stored in each param group
(``group["role"]``), so ``step()`` never has to look a parameter up. A ``matrix`` weight keeps its role even if
a sharding engine later hands the optimizer a flattened 1-D view of it: that is how matrix methods detect
flattened shards and refuse them instead of silently degrading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

ROLES = ("matrix", "embedding", "head", "vector", "other")
# Roles that get no weight decay by default: biases and norm gains, as in HF Trainer's
# `get_decay_parameter_names` (which excludes biases and LayerNorm/RMSNorm weights).
NO_DECAY_ROLES = ("vector",)


@dataclass(frozen=True)
class Route:
    name: str
    param: nn.Parameter
    role: str
    layout: str  # "linear" ([out, in]), "conv1d" (stored [in, out]) or "none"


def _parse_rules(rules) -> list[tuple[re.Pattern, str]]:
    """Accept [(regex, role)], {regex: role} or "regex=role;regex=role"."""
    if not rules:
        return []
    if isinstance(rules, str):
        pairs = []
        for item in filter(None, (s.strip() for s in rules.split(";"))):
            if "=" not in item:
                raise ValueError(f"routing rule {item!r} must look like 'regex=role'")
            pattern, role = item.rsplit("=", 1)
            pairs.append((pattern.strip(), role.strip()))
        rules = pairs
    elif isinstance(rules, dict):
        rules = list(rules.items())
    parsed = []
    for pattern, role in rules:
        if role not in ROLES:
            raise ValueError(f"routing rule {pattern!r} names unknown role {role!r}; roles are {', '.join(ROLES)}")
        parsed.append((re.compile(pattern), role))
    return parsed


def _accessor_weight(model: nn.Module, accessor: str):
    getter = getattr(model, accessor, None)
    if getter is None:
        return None
    try:
        module = getter()
    except (NotImplementedError, AttributeError):
        return None
    return getattr(module, "weight", None) if module is not None else None


def _linear_layouts(model: nn.Module) -> dict[int, str]:
    """id(weight) -> layout for every linear-like module. GPT-2's Conv1D stores [in, out]; it is matched by
    class name so that this module does not import transformers."""
    layouts = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, nn.Linear):
            layouts[id(weight)] = "linear"
        elif type(module).__name__ == "Conv1D":
            layouts[id(weight)] = "conv1d"
    return layouts


def route_parameters(model: nn.Module, rules=None) -> list[Route]:
    """Resolve the role of every trainable parameter of ``model``, in ``named_parameters()`` order.

    Frozen parameters are left out. A tied embedding/head is one parameter and appears once, as ``embedding``.
    """
    parsed = _parse_rules(rules)
    embedding = _accessor_weight(model, "get_input_embeddings")
    head = _accessor_weight(model, "get_output_embeddings")
    layouts = _linear_layouts(model)
    routes = []
    for name, param in model.named_parameters():  # removes duplicates: a tied tensor appears once
        if not param.requires_grad:
            continue
        layout = layouts.get(id(param), "none")
        role = next((r for pattern, r in parsed if pattern.search(name)), None)
        if role is None:
            if param is embedding:
                role = "embedding"
            elif param is head:
                role = "head"
            elif layout != "none":
                role = "matrix"
            elif param.dim() < 2:
                role = "vector"
            else:
                role = "other"
        routes.append(Route(name, param, role, layout))
    if not routes:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return routes


def build_param_groups(
    model: nn.Module,
    *,
    owned_roles: Iterable[str] = (),
    weight_decay: float = 0.0,
    rules=None,
    no_decay_roles: Sequence[str] = NO_DECAY_ROLES,
) -> list[dict]:
    """Param groups tagged with ``role``, ``layout`` and parameter ``names``.

    One group per (role, layout). The groups of roles the method does not own (its AdamW fallback) come first,
    then the owned ones; within each, groups are ordered by first appearance and parameters keep
    ``named_parameters()`` order (docs/registry-and-routing.md, "Roles, group order and the learning rate": the order
    HF's GaLore setup uses).
    """
    owned = frozenset(owned_roles)
    groups: dict[tuple[str, str], dict] = {}
    for route in route_parameters(model, rules):
        key = (route.role, route.layout)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "role": route.role,
                "layout": route.layout,
                "weight_decay": 0.0 if route.role in no_decay_roles else weight_decay,
            }
        groups[key]["params"].append(route.param)
        groups[key]["names"].append(route.name)
    ordered = list(groups.values())
    return [g for g in ordered if g["role"] not in owned] + [g for g in ordered if g["role"] in owned]


def format_param_groups(param_groups: Sequence[dict]) -> str:
    """A printable table of the resolved routing: one line per group, then every parameter name."""
    lines = [f"{'group':>5}  {'role':<9} {'method':<10} {'layout':<7} {'tensors':>7} {'elements':>12}  lr / wd"]
    for i, g in enumerate(param_groups):
        numel = sum(p.numel() for p in g["params"])
        lines.append(
            f"{i:>5}  {g.get('role', '?'):<9} {g.get('method', '?'):<10} {g.get('layout', '?'):<7} "
            f"{len(g['params']):>7} {numel:>12,}  {g.get('lr')} / {g.get('weight_decay')}"
        )
        for name in g.get("names", []):
            lines.append(f"{'':>7}{name}")
    return "\n".join(lines)
