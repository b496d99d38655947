"""``apollo`` and ``apollo_mini``: Adam's per-channel (or per-tensor) rescaling estimated in a random rank-r space and
applied to the raw full-rank gradient (docs/optimizers/apollo.md).

APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv:2412.05270, §3–4) projects each
``matrix`` gradient G with a seeded Gaussian matrix P (entries N(0, 1/r), regenerated every ``update_proj_gap``
steps from a seed chain), keeps AdamW-HF moments of ``R = G·Pᵀ`` (or ``Pᵀ·G``), and turns them into one scale per
row/column (``scale_type="channel"``) or per matrix (``"tensor"``, APOLLO-Mini): ``s = ‖N‖/‖R‖`` with N Adam's
normalised direction. The update is ``G ⊙ s`` — the raw gradient, no momentum in the direction — through Fira's
norm-growth limiter, times ``√scale``. Everything else (sides, refresh counter, inner AdamW-HF, the AdamW-HF
fallback, FSDP2 collectives, plain-tensor state) is GaLore's (:mod:`.galore`).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from . import transforms as T
from .fira import limit_norm_growth
from .galore import GaLore
from .sharding import Rows, local

#: How many int64 draws the seed chain advances per refresh: the reference's ``next_seed`` takes the 15th int64 that
#: ``torch.randint(0, 2**63 - 1, (15,))`` draws from a CPU generator seeded with the current seed.
SEED_ADVANCE = 15
_M32 = 0xFFFFFFFF


def _mt19937(seed: int, count: int) -> list[int]:
    """The first ``count`` 32-bit outputs of MT19937 seeded as torch's CPU generator seeds it (init_genrand with the
    low 32 bits of the seed; Matsumoto & Nishimura 1998). Pure Python: no tensor, so no host read in a step and
    nothing for FakeTensorMode to intercept."""
    state = [seed & _M32]
    for j in range(1, 624):
        state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + j) & _M32)
    out, index = [], 624
    while len(out) < count:
        if index == 624:  # regenerate the 624 words
            for i in range(624):
                y = (state[i] & 0x80000000) | (state[(i + 1) % 624] & 0x7FFFFFFF)
                state[i] = state[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            index = 0
        y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        out.append(y ^ (y >> 18))
    return out


def next_seed(seed: int) -> int:
    """The seed of the next projection: the last of SEED_ADVANCE int64 draws in [0, 2⁶³ − 1), each made of two 32-bit
    outputs (high word first) reduced modulo the range, as torch's CPU ``randint`` draws them. Equal to the
    reference's torch computation (tests/unit/test_apollo.py checks a chain of seeds against it)."""
    words = _mt19937(seed, 2 * SEED_ADVANCE)
    return ((words[-2] << 32) | words[-1]) % (2**63 - 1)


def random_projection(shape: tuple[int, int], seed: int, rank: int, device) -> Tensor:
    """P with entries N(0, 1/rank), drawn on the CPU from ``seed`` (so every device and rank builds the same P
    without communication) and moved to ``device``."""
    P = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) / math.sqrt(rank)
    return P.to(device)


class APOLLO(GaLore):
    """APOLLO (channel-wise scaling, ``rank`` 128 by default) on ``matrix`` parameters; AdamW-HF on the rest."""

    name = "apollo"
    description = "APOLLO: raw gradient scaled per channel by Adam estimated in a random rank-r space (SGD-like memory)"
    # GaLore's collectives (side 1: r×n all-reduce of R); the channel scale is local; the seeded P needs no
    # communication; the tensor scale adds two scalar all-reduces on side 0 (docs/optimizers/apollo.md)
    fsdp2 = True
    deepspeed = False

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, rank: int = 128, update_proj_gap: int = 200, scale: float = 1.0,
                 scale_type: Literal["channel", "tensor"] = "channel", proj: Literal["random", "svd"] = "random",
                 proj_type: Literal["std", "reverse_std", "left", "right"] = "std", scale_front: bool = False,
                 disable_nl: bool = False, gamma: float = 1.01):
        """``scale`` multiplies the update by ``√scale`` (the paper's α = √128 for APOLLO-Mini is ``scale=128``),
        before the limiter with ``scale_front`` else after it; ``disable_nl`` turns Fira's norm-growth limiter
        (growth at most ``gamma`` per step) off; ``proj="svd"`` uses GaLore's SVD basis (rank clipped to
        min(m, n)) instead of the random projection (rank never clipped)."""
        if scale_type not in ("channel", "tensor"):
            raise ValueError(f"scale_type must be 'channel' (per row/column) or 'tensor', got {scale_type!r}")
        if proj not in ("random", "svd"):
            raise ValueError(f"proj must be 'random' or 'svd', got {proj!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 1.0:
            raise ValueError(f"gamma (the norm-growth limit) must be a number >= 1, got {gamma!r}")
        self._setup(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, rank=rank,
                    update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projector="svd",
                    sign_fix=False, seed=0, stagger_refresh=False, scale_type=scale_type, proj=proj,
                    scale_front=bool(scale_front), disable_nl=bool(disable_nl), gamma=float(gamma))

    def projection_rank(self, group: dict, m: int, n: int) -> int:
        # A random P of any rank exists; the reference never clips it (a rank above min(m, n) changes the result).
        return group["rank"] if group["proj"] == "random" else super().projection_rank(group, m, n)

    def init_state(self, G: Tensor, state: dict, group: dict, rows: Rows, name: str) -> None:
        super().init_state(G, state, group, rows, name)
        # The seed chain starts at the parameter's 1-based position among all parameters of the optimizer.
        state["seed"] = rows.position + 1
        state["prev_scaled_norm"] = torch.zeros((), dtype=torch.float32, device=G.device)  # 0: no limit yet

    def _refresh(self, G: Tensor, state: dict, group: dict, index: int, name: str, rows: Rows) -> Tensor:
        if group["proj"] == "svd":
            return super()._refresh(G, state, group, index, name, rows)
        # The random P never looks at G: no finite/zero test, no collective, no host sync; an all-zero first
        # gradient is stepped (s = 0), and the limiter's zero norm then means "no limit" (docs/optimizers/apollo.md).
        side, P = state["side"], local(state["P"])
        rank = P.shape[0] if side == 0 else P.shape[1]
        shape = (rank, G.shape[1]) if side == 0 else (rows.total, rank)
        basis = random_projection(shape, state["seed"], rank, G.device)
        P.copy_(basis if side == 0 else rows.mine(basis))
        state["seed"] = next_seed(state["seed"])
        state["refreshes"] += 1
        return G

    def low_rank_step(self, G: Tensor, R: Tensor, N: Tensor, P: Tensor, state: dict, group: dict,
                      rows: Rows) -> tuple[Tensor, float]:
        side = state["side"]
        beta1, beta2 = group["betas"]
        if group["scale_type"] == "channel":
            # one factor per row of G (side 0, R and N are [m_k, r]: local) or per column (side 1: replicated)
            dim = 1 if side == 0 else 0
            s = torch.linalg.vector_norm(N, dim=dim, keepdim=True) / (
                torch.linalg.vector_norm(R, dim=dim, keepdim=True) + 1e-8)
        else:
            norm = rows.norm if side == 0 else torch.linalg.vector_norm  # side 0's row blocks: scalar all-reduces
            s = norm(N) / (norm(R) + 1e-8)
        U = G * s
        root = math.sqrt(group["scale"])
        if group["scale_front"]:
            U = U * root
        if not group["disable_nl"]:
            U, state["prev_scaled_norm"] = limit_norm_growth(U, state["prev_scaled_norm"], group["gamma"],
                                                               norm=rows.norm)
        if not group["scale_front"]:
            U = U * root
        return U, T.hf_step_size(group["lr"], state["step"], beta1, beta2)


class APOLLOMini(APOLLO):
    """APOLLO-Mini: rank 1, one scale per matrix, ``scale=128`` (the registry preset; build it by name)."""

    name = "apollo_mini"
    description = "APOLLO-Mini: rank-1 random projection, one Adam-estimated scale per matrix (≈0 B/param there)"
    presets = {"rank": 1, "scale_type": "tensor", "scale": 128.0}

