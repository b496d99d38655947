"""``adam4bit``: AdamW whose two moments are stored in 4 bits (Li, Chen & Zhu 2023, arXiv 2309.01507;
docs/optimizers/adam4bit.md).

The step is the shared AdamW-T step (``transforms.adam_`` in the torch convention, the same as ``adamw``): the moments
are decoded to fp32 temporaries, updated together with the weight, and encoded again, so quantisation error only reaches
the next step. Storage is :mod:`quant4`'s business: the first moment uses row-aligned blocks of ``block_size`` with the
signed dynamic-exponent table (B128/DE); the second moment uses rank-1 (row max / column max) normalisation with the
zero-free linear table (Rank-1/Linear, the paper's configuration), or blocks (``v_norm="block"``, torchao's and lpmm's
default). Tensors with fewer than ``threshold`` elements (global count) keep fp32 moments and take the plain AdamW path.

State per quantised parameter: ``m_codes``/``v_codes`` (uint8, two codes per byte), ``m_scale`` and either
``v_row``/``v_col`` or ``v_scale`` (fp32), and the int ``step``; all plain tensors (under FSDP2, per-rank ones
wrapped as ``Shard(0)`` DTensors), so ``weights_only`` resume works and the base ``load_state_dict`` keeps the
uint8 codes uint8.

FSDP2 (docs/optimizers/adam4bit.md, "Distributed"): blocks are row-aligned, so m and block v encode each rank's rows
alone, bitwise as unsharded; their codes and scales are ``Shard(0)`` DTensors with the global shape. Rank-1 v keeps its
row maxima with the rows and takes the column maxima from a MAX all-reduce (``v_col``, replicated). A 1-D tensor's shard
is encoded in flat blocks of its own. DeepSpeed ZeRO's flat partitions get block v and a one-time warning.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable, Literal

import torch
from torch import Tensor

from .sharding import Rows, local
from .base import SHAPED_ROLES, MemtrainOptimizer, fp32_view, warn_once
from .quant4 import BlockCodec, Rank1Codec, linear_table, signed_de_table
from .routing import ROLES
from .transforms import adam_


def _codecs(block_size: int, device: torch.device) -> tuple[BlockCodec, BlockCodec, Rank1Codec]:
    """(m codec, block v codec, rank-1 v codec) with their constant code tables on ``device``: built on the CPU
    (fp32 arithmetic, bitwise torchao's tables) and moved once, so a step copies nothing to the device."""
    codecs = (BlockCodec(signed_de_table(), block_size), BlockCodec(linear_table(), block_size),
              Rank1Codec(linear_table()))
    for codec in codecs:
        codec.table.to_(device)
    return codecs


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
    description = "AdamW with 4-bit moments (B128/DE m, rank-1/linear v): ≈1.03 B/param on large tensors"
    owns = frozenset(ROLES)
    # FSDP2: m and block v local (row-aligned blocks, codes and scales Shard(0)); rank-1 v: row maxima local,
    # column maxima from a MAX all-reduce of n floats (replicated). ZeRO: block v on the flat partition.
    fsdp2 = True
    deepspeed = True

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
        self._tables: dict[tuple, tuple[BlockCodec, BlockCodec, Rank1Codec]] = {}

    def _codecs(self, param: Tensor, group: dict):
        # Per optimizer, not per process: the tables are tensors, and one made under a FakeTensorMode (memory
        # estimation) must never meet another mode's tensors ("Mixing fake modes").
        key = (group["block_size"], param.device)
        if key not in self._tables:
            self._tables[key] = _codecs(*key)
        m_codec, v_block, v_rank1 = self._tables[key]
        if group["v_norm"] == "rank1" and param.dim() == 2:
            return m_codec, "rank1", v_rank1
        return m_codec, "block", v_block

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        # The GLOBAL element count (param holds this rank's rows of a sharded tensor), so that every rank and every
        # world size quantise the same tensors; torchao uses the local count, which makes numerics mesh-dependent.
        if not group["quantize"] or rows.total * math.prod(param.shape[1:]) < group["threshold"]:
            return self.adamw_update(param, grad, state, group, rows)
        m_codec, v_kind, v_codec = self._codecs(param, group)
        if not state:
            _warn_if_flat(param, group)
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
            adam_(p32, grad.float(), exp_avg, exp_avg_sq, step=state["step"], lr=group["lr"], beta1=beta1,
                  beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        keep = (lambda t, field: rows.keep(t)) if param.dim() >= 2 else partial(_keep_flat, rows, group["block_size"])
        _store(state, "m", m_codec.encode(exp_avg), keep, m_codec.replicated)
        # rank-1: the column maxima are a max over every rank's rows (a MAX all-reduce of n floats)
        v_fields = v_codec.encode(exp_avg_sq, rows.max) if v_kind == "rank1" else v_codec.encode(exp_avg_sq)
        _store(state, "v", v_fields, keep, v_codec.replicated)


_warned: set[str] = set()


def _warn_if_flat(param: Tensor, group: dict) -> None:
    """Once per process: a matrix-role parameter that arrives 1-D (a DeepSpeed ZeRO or FSDP1 flat partition) cannot have
    rank-1 V; it gets block V and blocks that follow the flat partition (docs/optimizers/adam4bit.md, "Distributed")."""
    if param.dim() >= 2 or group["v_norm"] != "rank1" or group["role"] not in SHAPED_ROLES:
        return
    warn_once(_warned, "flat", 
        f"adam4bit: {group['role']} parameters arrive as a flat 1-D partition ({param.numel()} elements here): "
        "DeepSpeed ZeRO and FSDP1 hand the optimizer flat shards, which have no rows and columns. Their second "
        f"moment uses block normalisation (B{group['block_size']}/Linear) instead of rank-1, and blocks follow the "
        "flat partition, so numerics differ slightly from an unsharded run. For rank-1 V use FSDP2 (fully_shard) "
        "or DDP; v_norm='block' silences this warning. (Warned once.)", stacklevel=3)


def _keep_flat(rows: Rows, block_size: int, t: Tensor, field: str):
    """Keep a 1-D per-rank state tensor whose length is not the shard's (the packed codes and block scales of a
    1-D parameter's shard): a ``Shard(0)`` DTensor whose global length is the sum of the ranks' lengths. Those
    lengths (ceil(k/2) bytes, ceil(k/block_size) scales of a torch.chunk split of k) are again the torch.chunk split
    of their sum, so DCP places them right; the layout equals the unsharded one when every shard starts at a
    multiple of ``block_size``. The sum is computed from the split on the host (no collective, no sync).
    Unsharded: ``t`` itself."""
    if not rows.sharded:
        return t
    chunk = math.ceil(rows.total / rows.world) if rows.total else 0
    held = [max(0, min(chunk, rows.total - j * chunk)) for j in range(rows.world)]
    total = sum((k + 1) // 2 if field == "codes" else -(-k // block_size) for k in held)
    return rows.keep(t, total=total)


def _store(state: dict, prefix: str, fields: dict[str, Tensor], keep: Callable, replicated: frozenset[str]) -> None:
    """Write encoded fields into the existing state tensors (same storage every step), or create them: per-rank
    fields through ``keep`` (a ``Shard(0)`` DTensor under FSDP2), replicated ones (rank-1's column maxima,
    identical on every rank) as plain tensors."""
    for name, value in fields.items():
        key = f"{prefix}_{name}"
        if key in state:
            local(state[key]).copy_(value)
        else:
            state[key] = value if name in replicated else keep(value, name)


def _fields(state: dict, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: local(v) for k, v in state.items() if k.startswith(prefix + "_")}

