"""``slimadam``: AdamW with the second moment averaged along one axis per layer (Kalra et al. 2025, arXiv 2503.01843;
docs/optimizers/slimadam.md).

Per parameter a rule K ∈ {None, (0,), (1,)}, in the ``[out, in]`` view: K = (1,) keeps one second-moment value
per output row (mean over ``in``), K = (0,) one per input column (mean over ``out``), None keeps it full. The first
moment stays full, so the state is ≈ 4 B/param instead of 8. With every K = None this is AdamW exactly (decay
only on ≥2-D tensors).

Rules are decided once, at construction, and stored in the param groups (``group["compress_dims"]``); ``step()``
never looks at names. The default rules (the official code's ``DEFAULT_COMPRESSION_RULES``) are keyed by the
parameter's role and, for ``matrix`` weights, by the module kind — the module's attribute name in its parent
(``q_proj``, ``down_proj``, GPT-2's ``c_attn``, Meta's ``wq`` …). A JSON rules file (``rules_file=path``,
``{"param name": [0] | [1] | null}``, e.g. written by ``memtrain slimadam-rules``) overrides them.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from typing import Iterable

import torch
from torch import Tensor

from .sharding import Rows, local
from .base import MemtrainOptimizer, fp32_view, warn_once
from .routing import ROLES
from .transforms import adam_

logger = logging.getLogger(__name__)

FAN_IN, FAN_OUT = (1,), (0,)
#: Default rule by module kind for ``matrix`` weights (docs/optimizers/slimadam.md, "Rules"). HF LLaMA, GPT-2 and Meta
#: names.
MATRIX_RULES = {
    "q_proj": FAN_IN, "k_proj": FAN_IN, "wq": FAN_IN, "wk": FAN_IN,
    "v_proj": FAN_OUT, "o_proj": FAN_OUT, "wv": FAN_OUT, "wo": FAN_OUT,
    "gate_proj": FAN_OUT, "up_proj": FAN_OUT, "down_proj": FAN_OUT, "w1": FAN_OUT, "w2": FAN_OUT, "w3": FAN_OUT,
    "c_fc": FAN_OUT, "c_proj": FAN_OUT,  # GPT-2: attention and MLP c_proj are both fan_out
    "c_attn": None,  # GPT-2's fused qkv mixes fan-in (q, k) and fan-out (v) groups: keep it full
}
#: Default rule by role; ``matrix`` and ``other`` go through the module kind.
ROLE_RULES = {"embedding": FAN_IN, "head": FAN_IN, "vector": None}
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")
_warned: set[str] = set()


def second_moment_snr(v: Tensor, dim: int) -> Tensor:
    """SlimAdam's compressibility score of a second moment ``v`` along ``dim`` (docs/optimizers/slimadam.md, "The SNR
    rules tool").

    For every slice along ``dim``: ``mean² / var`` (population variance), then the mean over the slices. A slice
    with zero variance and a nonzero mean counts as +inf (perfectly compressible); an all-zero slice is skipped.
    Returns a 0-d fp64 tensor (NaN when every slice is all-zero).
    """
    v = v.double()
    mean = v.mean(dim=dim)
    var = v.var(dim=dim, unbiased=False)
    nonzero = v.ne(0).any(dim=dim)
    snr = torch.where(var > 0, mean.square() / var.clamp(min=torch.finfo(v.dtype).tiny), torch.inf)
    snr = snr[nonzero]
    return snr.mean() if snr.numel() else torch.tensor(float("nan"), dtype=torch.float64)


def _mean_along(x: Tensor, dim: int) -> Tensor:
    return x.mean(dim=dim, keepdim=True)


def module_kind(name: str) -> str:
    """The attribute name of the module that owns parameter ``name`` ("model.layers.0.self_attn.q_proj.weight"
    -> "q_proj")."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def default_rule(name: str, role: str, param: Tensor) -> tuple[int, ...] | None:
    if param.dim() < 2:
        return None  # always: a rule on a bias would crash (1,) or collapse it to a scalar (0,)
    if role in ROLE_RULES:
        return ROLE_RULES[role]
    kind = module_kind(name)
    if role == "matrix" and kind in MATRIX_RULES:
        return MATRIX_RULES[kind]
    if role == "other" and kind in POSITION_EMBEDDINGS:
        return FAN_IN  # one value per position
    warn_once(_warned, name, f"slimadam: no default compression rule for {role} {name or '<unnamed>'!r} (module kind "
              f"{kind!r}); its second moment stays full. Give it a rule in a rules file (rules_file=...).",
              logger=logger)
    return None


def _parse_rule(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, list) and value in ([0], [1]):
        return tuple(value)
    raise ValueError(f"slimadam rules: parameter {name!r} has rule {value!r}; a rule is [0] (mean over out, one "
                     "value per input column), [1] (mean over in, one value per output row) or null (no "
                     "compression). [0, 1] (a single scalar) is not supported.")


def load_rules(path: str) -> dict[str, tuple[int, ...] | None]:
    """Read a JSON rules file ``{"param name": [0] | [1] | null}``."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"slimadam: cannot read rules file {path!r}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"slimadam: rules file {path!r} must hold a JSON object {{param name: [0] | [1] | null}}")
    return {name: _parse_rule(name, value) for name, value in raw.items()}


def _resolve_groups(params, rules: dict | None, compress: bool) -> list:
    """Split the routed groups by rule K (and by ≥2-D, which alone gets weight decay); record K in the group."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    rules = dict(rules or {})
    out: list[dict] = []
    for group in groups:
        plist = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        names = group.get("names") or [""] * len(plist)
        split: dict[tuple, dict] = {}
        for p, n in zip(plist, names):
            role = group.get("role", "matrix" if p.dim() >= 2 else "vector")
            k = default_rule(n, role, p) if n not in rules else rules.pop(n)
            if k is not None and p.dim() < 2:
                raise ValueError(f"slimadam: parameter {n!r} is {p.dim()}-D; only ≥2-D tensors can be compressed "
                                 "(use null for it in the rules file)")
            k = k if compress else None
            key = (k, p.dim() >= 2)
            if key not in split:
                split[key] = {**group, "params": [], "names": [], "role": role, "compress_dims": k}
                if p.dim() < 2:
                    split[key]["weight_decay"] = 0.0  # decay only on ≥2-D tensors
            split[key]["params"].append(p)
            split[key]["names"].append(n)
        out.extend(split.values())
    if rules:
        raise ValueError(f"slimadam: the rules file names parameters the optimizer does not have: "
                         f"{', '.join(sorted(rules))}. Names are model.named_parameters() names of trainable "
                         "parameters.")
    return out


class SlimAdam(MemtrainOptimizer):
    name = "slimadam"
    description = "SlimAdam: AdamW with the second moment averaged along a per-layer axis (≈4 B/param)"
    owns = frozenset(ROLES)
    needs_matrix_shape = True  # compressing along an axis is meaningless on a flattened shard
    fsdp2 = True  # K=(1,) and M local (sharded), K=(0,) all-reduces n column sums, V [1, n] replicated
    deepspeed = False  # compressed axes need the matrix shape

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, rules_file: str | None = None, compress: bool = True):
        rules = load_rules(rules_file) if rules_file else None
        super().__init__(_resolve_groups(params, rules, compress), lr=lr, weight_decay=weight_decay, betas=betas,
                         eps=eps, compress_dims=None)

    @staticmethod
    def _stored_dim(group: dict) -> int:
        """The rule is given in the [out, in] view; GPT-2's Conv1D stores [in, out]."""
        k = group["compress_dims"][0]
        return 1 - k if group.get("layout") == "conv1d" else k

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        if group["compress_dims"] is None:
            return self.adamw_update(param, grad, state, group, rows)  # full second moment: exactly AdamW
        dim = self._stored_dim(group)
        if not state:
            state["step"] = 0
            state["exp_avg"] = rows.keep(torch.zeros_like(param, dtype=torch.float32))  # sharded like p
            shape = list(param.shape)
            shape[dim] = 1
            v = param.new_zeros(shape, dtype=torch.float32)
            # Under FSDP2 (rows split on dim 0): K=(1,) keeps one value per row, sharded with the rows; K=(0,)
            # keeps one value per column, [1, n], replicated as a plain tensor (identical on every rank: an EMA of
            # all-reduced column means), saved once by DCP (docs/optimizers/slimadam.md, "Distributed").
            state["exp_avg_sq"] = v if dim == 0 else rows.keep(v)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        with fp32_view(param) as p32:
            # AdamW-T whose second moment is averaged along ``dim`` (kept with size 1, broadcast against p). Along
            # dim 0 the mean is over all m rows: under FSDP2 an all-reduce of n column sums.
            adam_(p32, grad.float(), local(state["exp_avg"]), local(state["exp_avg_sq"]), step=state["step"],
                  lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                  second_mean=rows.column_mean if dim == 0 else functools.partial(_mean_along, dim=dim))

    def load_state_dict(self, state_dict: dict) -> None:
        # torch restores every group key from the checkpoint; the rules of this optimizer (the user's current
        # configuration) stay authoritative, and a moment saved under other rules is refused below.
        rules = [g["compress_dims"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, rule in zip(self.param_groups, rules):
            group["compress_dims"] = rule
        for group in self.param_groups:
            for param, name in zip(group["params"], group["names"]):
                v = self.state.get(param, {}).get("exp_avg_sq")
                if v is None:
                    continue
                expected = list(param.shape)
                if group["compress_dims"] is not None:
                    expected[self._stored_dim(group)] = 1
                if list(v.shape) != expected:
                    raise ValueError(
                        f"slimadam: the checkpoint's second moment of {name or 'a parameter'!r} has shape "
                        f"{tuple(v.shape)} but the current rule {group['compress_dims']} needs {tuple(expected)}: "
                        "the compression rules changed since the checkpoint; resume with the same rules"
                    )


# -- the SNR rule derivation (memtrain slimadam-rules) -------------------------------------------------
def measure_snr(optimizer: torch.optim.Optimizer) -> dict[str, dict[int, float]]:
    """SNR of each ≥2-D parameter's raw second moment (``exp_avg_sq`` of an AdamW-family optimizer) along each
    candidate K, keyed by parameter name and by K in the ``[out, in]`` view."""
    out = {}
    for group in optimizer.param_groups:
        for param, name in zip(group["params"], group.get("names") or [""] * len(group["params"])):
            v = optimizer.state.get(param, {}).get("exp_avg_sq")
            if v is None or v.dim() != 2 or v.shape != param.shape:
                continue
            conv1d = group.get("layout") == "conv1d"
            out[name] = {k: float(second_moment_snr(v, 1 - k if conv1d else k)) for k in (0, 1)}
    return out


def choose_rule(snr: dict[int, float], cutoff: float = 1.0) -> tuple[int, ...] | None:
    """The K with the largest SNR above ``cutoff`` (the official code's choice); None if no K qualifies."""
    good = {k: s for k, s in snr.items() if not math.isnan(s) and s > cutoff}
    return (max(good, key=lambda k: (good[k], -k)),) if good else None


def rules_from_measurements(measurements: Iterable[dict[str, dict[int, float]]], cutoff: float = 1.0) -> dict:
    """Average per-step SNRs (NaN steps skipped) and pick each parameter's rule; JSON-ready values."""
    totals: dict[str, dict[int, list[float]]] = {}
    for snrs in measurements:
        for name, by_k in snrs.items():
            for k, s in by_k.items():
                if not math.isnan(s):
                    totals.setdefault(name, {}).setdefault(k, []).append(s)
    rules = {}
    for name, by_k in totals.items():
        rule = choose_rule({k: sum(v) / len(v) for k, v in by_k.items()}, cutoff)
        rules[name] = list(rule) if rule is not None else None
    return rules

