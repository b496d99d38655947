"""``adam4bit``: AdamW whose two moments are stored in 4 bits (Li, Chen & Zhu 2023; specs/adam4bit.md).

The step is the shared AdamW-T step (``transforms.adamw_t_``, the same as ``adamw``): the moments are decoded
to fp32 temporaries, updated together with the weight, and encoded again, so quantisation error only reaches the
next step. Storage is :mod:`quant4`'s business: the first moment uses row-aligned blocks of ``block_size`` with
the signed dynamic-exponent table (B128/DE); the second moment uses rank-1 (row max / column max) normalisation
with the zero-free linear table (Rank-1/Linear, the paper's configuration), or blocks (``v_norm="block"``,
torchao's and lpmm's default). Tensors with fewer than ``threshold`` elements (global count) keep fp32 moments
and take the plain AdamW path.

State per quantised parameter: ``m_codes``/``v_codes`` (uint8, two codes per byte), ``m_scale`` and either
``v_row``/``v_col`` or ``v_scale`` (fp32), and the int ``step``; all plain tensors, so ``weights_only`` resume
works and the base ``load_state_dict`` keeps the uint8 codes uint8.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

from ..distributed import Rows
from .base import MemtrainOptimizer, fp32_view
from .quant4 import BlockCodec, Rank1Codec, linear_table, signed_de_table
from .registry import OptimizerSpec, register
from .routing import ROLES
from .transforms import adamw_t_


@lru_cache(maxsize=None)
def _codecs(block_size: int) -> tuple[BlockCodec, BlockCodec, Rank1Codec]:
    """(m codec, block v codec, rank-1 v codec); built once, they hold only the constant code tables."""
    return (BlockCodec(signed_de_table(), block_size), BlockCodec(linear_table(), block_size),
            Rank1Codec(linear_table()))


def _split_fp32_groups(params, pattern: str | None) -> list:
    """Move parameters whose name matches ``pattern`` into groups with ``quantize=False`` (decided here, once)."""
    params = list(params)
    if pattern is None:
        return params
    if not params or not isinstance(params[0], dict) or not any(g.get("names") for g in params):
        raise ValueError("adam4bit: keep_fp32 matches parameter names; build the optimizer from the model "
                         "(memtrain.build_optimizer(model, 'adam4bit', ...)) so that parameters have names")
    regex = re.compile(pattern)
    out = []
    for group in params:
        names = group.get("names") or [""] * len(group["params"])
        for keep in (False, True):
            members = [(p, n) for p, n in zip(group["params"], names) if bool(regex.search(n)) == keep]
            if members:
                out.append({**group, "params": [p for p, _ in members], "names": [n for _, n in members],
                            "quantize": not keep})
    return out


class Adam4bit(MemtrainOptimizer):
    name = "adam4bit"
    owns = frozenset(ROLES)

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, block_size: int = 128, v_norm: Literal["rank1", "block"] = "rank1",
                 threshold: int = 4096, keep_fp32: str | None = None):
        if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
            raise ValueError(f"adam4bit: block_size must be an even int >= 2 (the paper uses 128), got {block_size!r}")
        if v_norm not in ("rank1", "block"):
            raise ValueError(f"adam4bit: v_norm must be 'rank1' (the paper's) or 'block' (torchao's), got {v_norm!r}")
        if not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"adam4bit: threshold must be an int >= 1 (elements), got {threshold!r}")
        super().__init__(_split_fp32_groups(params, keep_fp32), lr=lr, weight_decay=weight_decay, betas=betas,
                         eps=eps, block_size=block_size, v_norm=v_norm, threshold=threshold, quantize=True)

    @staticmethod
    def _codecs(param: Tensor, group: dict):
        m_codec, v_block, v_rank1 = _codecs(group["block_size"])
        if group["v_norm"] == "rank1" and param.dim() == 2:
            return m_codec, "rank1", v_rank1
        return m_codec, "block", v_block

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        # The global element count (a DTensor reports it), so every rank and world size quantises the same tensors.
        if not group["quantize"] or param.numel() < group["threshold"]:
            return self.adamw_update(param, grad, state, group, rows)
        m_codec, v_kind, v_codec = self._codecs(param, group)
        if not state:
            state["step"] = 0
            exp_avg = torch.zeros_like(param, dtype=torch.float32)
            exp_avg_sq = torch.zeros_like(param, dtype=torch.float32)
        else:
            if ("v_row" in state) != (v_kind == "rank1"):
                raise RuntimeError(f"adam4bit: saved state stores the second moment in another layout than "
                                   f"v_norm={group['v_norm']!r} gives; resume with the v_norm it was saved with")
            exp_avg = m_codec.decode(_fields(state, "m"), param.shape)
            exp_avg_sq = v_codec.decode(_fields(state, "v"), param.shape)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        with fp32_view(param) as p32:  # the update uses the new, unquantised moments
            adamw_t_(p32, grad.float(), exp_avg, exp_avg_sq, step=state["step"], lr=group["lr"], beta1=beta1,
                     beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        _store(state, "m", m_codec.encode(exp_avg))
        _store(state, "v", v_codec.encode(exp_avg_sq))


def _store(state: dict, prefix: str, fields: dict[str, Tensor]) -> None:
    """Write encoded fields into the existing state tensors (same storage every step), or create them."""
    for key, value in fields.items():
        key = f"{prefix}_{key}"
        if key in state:
            state[key].copy_(value)
        else:
            state[key] = value


def _fields(state: dict, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + "_")}


register(OptimizerSpec(
    name="adam4bit",
    cls=Adam4bit,
    description="AdamW with 4-bit moments (B128/DE m, rank-1/linear v): ≈1.03 B/param on large tensors",
    fsdp2=False,  # rank-1 v needs a MAX all-reduce of the column maxima and DTensor state: the distributed issue
))
