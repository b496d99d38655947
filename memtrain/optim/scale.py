"""``scale``: SCALE, Stochastic Column-normalized Last-layer momEntum (Glentis et al., arXiv 2506.16659;
docs/optimizers/scale.md).

Nearly stateless: each ``matrix`` gradient has every output row scaled to RMS 1; the input ``embedding`` has every
feature (column) scaled to RMS 1 over the vocabulary; only the LM ``head`` keeps a momentum buffer, whose rows are
then scaled to RMS 1; ``vector`` parameters (norm gains) get SCALE's own AdamW at ``adam_lr``, which follows the main
schedule because the Trainer's scheduler scales every group's initial lr by the same factor.

The branch of each group is decided once, here, from its routing role and stored in the group (``branch``):

=========== ============ =====================================================================
role        branch       update
=========== ============ =====================================================================
matrix      ``rows``     u = G / RMS over each row (dim 1)
embedding   ``columns``  u = G / RMS over each column (dim 0, over the vocabulary)
head        ``momentum`` M ← β·M + (1−β)·G;  u = M / RMS over each row
other       ``momentum`` as head (the official "secondary" params), with a warning
vector      ``adamw``    AdamW with ε on the uncorrected sqrt and decay first (AdamConvention SCALE)
=========== ============ =====================================================================

Tied embedding/head: routing gives the single shared tensor the role ``embedding`` and emits no ``head`` group. With
``tied_role="head"`` (default, docs/optimizers/scale.md, "Tied embedding/head") SCALE treats an ``embedding`` group as
the head when the optimizer has no ``head`` group, so the last layer keeps its momentum; ``tied_role="embedding"``
reproduces the official code (vocabulary-axis normalisation, no momentum). Caveat: an untied model whose head is frozen
also has no ``head`` group; route such an embedding explicitly (``rules={"embed": "embedding"}`` keeps it, and
``tied_role="embedding"`` disables the substitution).
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch

from .sharding import local
from .base import MemtrainOptimizer, _check_hyper, fp32_view
from .transforms import DTYPES, SCALE as SCALE_ADAMW, as_out_in, descend_, rms_normalize

_BRANCH = {"matrix": "rows", "embedding": "columns", "head": "momentum", "other": "momentum", "vector": "adamw"}


class SCALE(MemtrainOptimizer):
    name = "scale"
    description = ("SCALE: row-RMS-normalised SGD on matrices, column-normalised embedding, momentum only on the "
                   "head, AdamW on norm gains")
    owns = frozenset(_BRANCH)
    needs_matrix_shape = True
    fsdp2 = True  # rows local, head momentum sharded, embedding column RMS: one all-reduce of d sums
    deepspeed = False  # flat 1-D partitions have no rows: refused

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, adam_lr: float | None = None,
                 momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 norm_eps: float = 1e-8, tied_role: Literal["head", "embedding"] = "head",
                 state_dtype: Literal["float32", "bfloat16"] = "float32"):
        """``adam_lr`` is the initial lr of the vector AdamW (None: ``lr``), ``betas``/``eps`` its options;
        ``momentum`` is the head's EMA β; ``norm_eps`` floors every RMS; ``tied_role`` is how a tied
        embedding/head is treated; ``state_dtype`` is the dtype of the head momentum (the official code keeps it
        in the gradient dtype, i.e. bfloat16 in its runs)."""
        if not 0.0 <= momentum < 1.0 or isinstance(momentum, bool):
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if tied_role not in ("head", "embedding"):
            raise ValueError(f"tied_role must be 'head' or 'embedding', got {tied_role!r}")
        if state_dtype not in DTYPES:
            raise ValueError(f"state_dtype must be one of {', '.join(DTYPES)}, got {state_dtype!r}")
        _check_hyper("norm_eps", norm_eps, positive=True)
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, adam_lr=adam_lr,
                         momentum=momentum, norm_eps=norm_eps, state_dtype=state_dtype)
        roles = {g["role"] for g in self.param_groups}
        embedding_is_head = tied_role == "head" and "embedding" in roles and "head" not in roles
        for group in self.param_groups:
            role = group["role"]
            group["branch"] = "momentum" if role == "embedding" and embedding_is_head else _BRANCH[role]
            if role == "vector" and adam_lr is not None:
                group["lr"] = adam_lr
            if role == "other":
                warnings.warn(f"scale: parameters {group['names']} have role 'other' (2+ dims, not a linear weight); "
                              "they get the head's momentum branch, as the official 'secondary' params do",
                              stacklevel=2)

    def update(self, param, grad, state, group, rows):
        branch, lr, wd = group["branch"], group["lr"], group["weight_decay"]
        if branch == "adamw":
            self.adam_step(param, grad, state, group, SCALE_ADAMW, rows)
            return
        g = grad.float()
        if branch == "momentum":
            if not state:  # stored in the parameter's own orientation (docs/registry-and-routing.md), sharded like it
                state["momentum"] = rows.keep(torch.zeros_like(param, dtype=DTYPES[group["state_dtype"]]))
            buf = local(state["momentum"])
            buf.lerp_(grad.to(buf.dtype), 1 - group["momentum"])  # no bias correction: the normalisation removes it
            g = buf.float()
        # Row RMS (matrix, head) is local to a row block under FSDP2; the embedding's column RMS over the vocabulary
        # all-reduces the d column sums of squares and divides by the global V (docs/optimizers/scale.md,
        # "Distributed").
        dim = 0 if branch == "columns" else 1
        u = rms_normalize(as_out_in(g, group.get("layout", "linear")), dim=dim, eps=group["norm_eps"],
                          column_mean=rows.column_mean)
        with fp32_view(param) as p32:
            descend_(as_out_in(p32, group.get("layout", "linear")), u, lr=lr, weight_decay=wd)

