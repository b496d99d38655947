"""4-bit storage of optimizer moments ("Memory Efficient Optimizers with 4-bit States", arXiv 2309.01507 §3–4;
docs/optimizers/adam4bit.md, "Storage").

A storage concern only: a codec turns an fp32 tensor into a dict of plain state tensors (uint8 codes, two 4-bit
values per byte, plus fp32 scales) and back. The optimizer math never sees codes; ``adam4bit`` decodes the
moments, runs the shared AdamW step on fp32 temporaries and encodes them again.

Two normalisations, each with its own 16-entry code table:

* :class:`BlockCodec` — block-wise absmax scales. Blocks are **row-aligned**: ``block_size`` consecutive entries
  of one row of the stored tensor (viewed as ``[rows, last_dim]``; a 1-D tensor is one row), the last block of a
  row possibly shorter. Row-aligned blocks keep every block inside an FSDP2 ``Shard(0)`` row block and equal
  torchao's flat blocks whenever ``last_dim % block_size == 0``.
* :class:`Rank1Codec` — for a non-negative 2-D tensor: scale ``s_ij = min(max_j V_ij, max_i V_ij)`` from the row
  maxima and column maxima, which need only ``m + n`` floats.

Quantisation is round to nearest in the table, ties to the larger code, which is bitwise what torchao does
(one ``searchsorted`` against precomputed fp32 decision points, see :func:`rounding_thresholds`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SCALE_FLOOR = 1e-12  # zero blocks/rows get this scale, so decoding never divides by zero


def signed_de_table() -> Tensor:
    """The signed dynamic-exponent table T_DE, built in fp32 arithmetic (bitwise torchao's get_qmap_signed()).

    For exponent level i in {0, 1, 2}: the 2^i midpoints of linspace(0.1, 1, 2^i + 1), scaled by 10^(i-2), both
    signs; then 0 and +1.0 (there is no -1.0)."""
    values = [torch.tensor(0.0), torch.tensor(1.0)]
    for i in range(3):
        bounds = torch.linspace(0.1, 1, 2**i + 1)  # fp32
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += [(10 ** (i - 2)) * mids, -(10 ** (i - 2)) * mids]
    return torch.sort(torch.cat([v.reshape(-1) for v in values])).values


def linear_table() -> Tensor:
    """The unsigned linear table without zero: (k + 1) / 16 for k = 0..15. A second moment never decodes to 0,
    so it can never produce a 1/(0 + ε) step (the paper's zero-point problem)."""
    return torch.linspace(0, 1, 17)[1:]


def rounding_thresholds(table: Tensor) -> Tensor:
    """The 15 fp32 decision points of round-to-nearest in ``table``: ``z`` gets code ``k + 1`` over code ``k`` iff
    ``z >= t[k]``.

    ``t[k]`` is the smallest fp32 value with ``fl(z - T[k]) >= fl((T[k+1] - T[k]) / 2)``, the exact test torchao
    evaluates element by element (ties go to the larger code). The test is monotone in ``z``, so one threshold
    per gap reproduces it bitwise and quantising becomes a single ``searchsorted``."""
    down, up = table[:-1], table[1:]
    half = (up - down) * 0.5
    t = down + half
    inf = torch.full_like(t, float("inf"))
    for _ in range(8):  # a few ulps at most; each pass moves every threshold by one ulp
        t = torch.where(torch.nextafter(t, -inf) - down >= half, torch.nextafter(t, -inf), t)
        t = torch.where(t - down >= half, t, torch.nextafter(t, inf))
    return t


def quantize(z: Tensor, thresholds: Tensor) -> Tensor:
    """Codes (uint8) of the nearest table entries to ``z`` given the table's :func:`rounding_thresholds`; values
    below the first entry get code 0."""
    return torch.searchsorted(thresholds.to(z.device), z.contiguous(), right=True).to(torch.uint8)


def pack(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last dim, ``(even << 4) | odd``; an odd last dim is padded with 0."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack(packed: Tensor, last_dim: int) -> Tensor:
    """Inverse of :func:`pack`: codes of last dim ``last_dim``."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten(-2)
    return codes[..., :last_dim]


def _rows(x: Tensor) -> Tensor:
    """The stored tensor as ``[rows, last_dim]`` (a 1-D tensor is a single row)."""
    return x.reshape(1, -1) if x.dim() <= 1 else x.reshape(-1, x.shape[-1])


class _Table:
    """A 16-entry code table with what encoding and decoding need: the rounding thresholds and a byte -> two
    values lookup, so that decoding is one gather per packed byte."""

    def __init__(self, table: Tensor):
        self.values = table
        self.thresholds = rounding_thresholds(table)
        byte = torch.arange(256)
        self.pair_lut = torch.stack([table[byte >> 4], table[byte & 0x0F]], dim=-1)  # [256, 2]

    def to_(self, device: torch.device) -> "_Table":
        """Move the tables to ``device`` (once; encode and decode then copy nothing per call)."""
        self.values, self.thresholds, self.pair_lut = (t.to(device) for t in (self.values, self.thresholds,
                                                                              self.pair_lut))
        return self

    def decode_packed(self, packed: Tensor, width: int) -> Tensor:
        """Values of packed codes, ``[rows, width]`` (``width`` ≥ the number of codes; extra entries are 0)."""
        lut = self.pair_lut.to(packed.device)
        # explicit sizes, never -1: a rank's FSDP2 shard may have 0 rows
        values = lut.index_select(0, packed.reshape(-1).int()).reshape(packed.shape[0], 2 * packed.shape[-1])
        return torch.nn.functional.pad(values, (0, width - values.shape[-1])) if values.shape[-1] < width else values


class BlockCodec:
    """Row-aligned block-wise absmax normalisation with a 16-entry table (B128/DE for m, B128/Linear for v).

    Fields: ``codes`` ``[*lead, ceil(n/2)]`` (uint8) and ``scale`` ``[*lead, ceil(n/block_size)]`` (fp32) for a
    tensor ``[*lead, n]``: dim 0 is the tensor's own, so under FSDP2 a rank's rows encode to its rows of the
    unsharded fields, bitwise (every block lies inside one row). A 1-D tensor gives flat ``[ceil(k/2)]`` and
    ``[ceil(k/block_size)]`` fields. Every size is explicit, never -1: a shard may have 0 rows."""

    #: Fields identical on every rank of a sharded tensor (none: every field holds this rank's rows).
    replicated: frozenset[str] = frozenset()

    def __init__(self, table: Tensor, block_size: int = 128):
        self.table = _Table(table)
        self.block_size = block_size

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        rows = _rows(x)
        m, n = rows.shape
        n_blocks = -(-n // self.block_size)
        pad = n_blocks * self.block_size - n
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        blocks = rows.reshape(m, n_blocks, self.block_size)
        scale = blocks.abs().amax(dim=-1).clamp_(min=SCALE_FLOOR)  # [rows, n_blocks]
        codes = quantize((blocks / scale.unsqueeze(-1)).reshape(m, n + pad), self.table.thresholds)
        if n % 2:
            codes[:, n] = 0  # the pad nibble of an odd row is code 0
        codes = pack(codes)
        if pad:  # drop the padded blocks' bytes; clone so that the stored tensor does not keep their storage
            codes = codes[:, : (n + 1) // 2].clone()
        if x.dim() <= 1:
            return {"codes": codes.reshape(-1), "scale": scale.reshape(-1)}
        return {"codes": codes.reshape(*x.shape[:-1], codes.shape[-1]),
                "scale": scale.reshape(*x.shape[:-1], n_blocks)}

    def decode(self, fields: dict[str, Tensor], shape: torch.Size) -> Tensor:
        n = shape[-1] if len(shape) else 1
        scale = _rows(fields["scale"])
        m, n_blocks = scale.shape
        values = self.table.decode_packed(_rows(fields["codes"]), n_blocks * self.block_size)
        blocks = values.reshape(m, n_blocks, self.block_size) * scale.unsqueeze(-1)
        return blocks.reshape(m, n_blocks * self.block_size)[:, :n].reshape(shape)


class Rank1Codec:
    """Rank-1 normalisation of a non-negative 2-D tensor with the linear table (Rank-1/Linear for v).

    Stores ``row`` = max over dim 1 (``[m, 1]``) and ``col`` = max over dim 0 (``[1, n]``); each entry is
    normalised by ``max(min(row_i, col_j), 1e-12)`` ∈ [0, 1] after division. Under FSDP2 ``codes`` and ``row``
    are this rank's rows; ``col`` is a max over all rows, which :meth:`encode` takes through ``column_max``
    (a MAX all-reduce: exact, so ``col`` is bitwise the unsharded one on every rank)."""

    replicated: frozenset[str] = frozenset({"col"})

    def __init__(self, table: Tensor):
        self.table = _Table(table)

    @staticmethod
    def _scale(row: Tensor, col: Tensor) -> Tensor:
        return torch.minimum(row, col).clamp_(min=SCALE_FLOOR)

    def encode(self, x: Tensor, column_max: Callable[[Tensor], Tensor] = lambda col: col) -> dict[str, Tensor]:
        """``column_max`` turns this tensor's column maxima into the whole tensor's (the identity when ``x`` is
        whole; :meth:`memtrain.optim.sharding.Rows.max` for a row shard)."""
        if x.dim() != 2:
            raise ValueError(f"rank-1 normalisation needs a 2-D tensor, got shape {tuple(x.shape)}")
        row = x.amax(dim=1, keepdim=True)
        # x >= 0, so 0 is neutral for the max: a rank with no rows still joins the all-reduce
        col = column_max(x.amax(dim=0, keepdim=True) if x.shape[0] else x.new_zeros(1, x.shape[1]))
        codes = pack(quantize(x / self._scale(row, col), self.table.thresholds))
        return {"codes": codes, "row": row, "col": col}

    def decode(self, fields: dict[str, Tensor], shape: torch.Size) -> Tensor:
        values = self.table.decode_packed(fields["codes"], shape[-1])[:, : shape[-1]]
        return values * self._scale(fields["row"], fields["col"])
