"""``fira``: GaLore plus the part of the gradient GaLore discards (Chen et al. 2024, "Fira: Can We Achieve Full-rank
Training of LLMs Under Low-rank Constraint?", arXiv 2410.01623; docs/optimizers/fira.md).

Fira adds back the residual ``G − back(R)`` outside the projected subspace, scaled per row/column by how much Adam
rescaled the projected gradient (φ), with a limiter on the growth of its norm. Everything else (projector, refresh,
moments, fallback, FSDP2 collectives) is :class:`~memtrain.optim.galore.GaLore`'s.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from . import transforms as T
from .galore import GaLore


def fira_scaling(N: Tensor, R: Tensor, side: int, per: str = "vector",
                 norm: Callable = torch.linalg.vector_norm) -> Tensor:
    """Fira's φ = ‖N‖/(‖R‖ + 1e-8) per index of the non-projected dimension: rows (``[m, 1]``, side 0) or
    columns (``[1, n]``, side 1); ``per="matrix"`` gives one scalar (the Fira-matrix ablation), from ``norm``,
    the Frobenius norm of a whole matrix (an all-reduced norm where N and R are row blocks: FSDP2, side 0).
    The vector form reduces over the projected dim only, so it is local to a row block."""
    if per == "matrix":
        return norm(N) / (norm(R) + 1e-8)
    dim = 1 if side == 0 else 0
    return torch.linalg.vector_norm(N, dim=dim, keepdim=True) / (
        torch.linalg.vector_norm(R, dim=dim, keepdim=True) + 1e-8)


def limit_norm_growth(S: Tensor, prev: Tensor, gamma: float,
                      norm: Callable = torch.linalg.vector_norm) -> tuple[Tensor, Tensor]:
    """Fira's norm-growth limiter (code form): if ‖S‖ grew more than γ× since the previous (post-limit) norm,
    scale S down to exactly γ·prev. ``prev == 0`` (first step, or after an exactly zero residual) means no
    limiting. Branch-free, so no host sync. Returns the limited S and the new post-limit norm. ``norm`` gives
    ‖S‖_F of the whole matrix (where S is a row block, FSDP2: a scalar all-reduce, so the limit is global)."""
    size = norm(S)
    limiter = torch.clamp_min(size / (prev + 1e-8), gamma) / gamma
    limiter = torch.where(prev > 0, limiter, torch.ones_like(limiter))
    return S / limiter, size / limiter


class Fira(GaLore):
    """GaLore plus Fira's norm-scaled residual and norm-growth limiter (docs/optimizers/fira.md, "Update").

    ``residual_mode="code"`` (default) is ``fira==1.0.2``: ``S = φ⊙(G − α·back(R))``, α on the Adam term only.
    ``"paper"`` is the paper's Algorithm 1: ``S = c_t·φ⊙(G − back(R))``, α on both terms."""

    name = "fira"
    description = "Fira: GaLore plus the norm-scaled residual outside the subspace, with a norm-growth limiter"
    # GaLore's collectives, plus scalar all-reduces of ‖S‖² (and of ‖N‖², ‖R‖² for side 0 with scaling="matrix")

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, rank: int = 128, update_proj_gap: int = 200, alpha: float = 0.25,
                 gamma: float = 1.01, residual_mode: Literal["code", "paper"] = "code",
                 scaling: Literal["vector", "matrix"] = "vector",
                 proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
                 projector: Literal["svd", "randomized", "gram_eigh"] = "svd", sign_fix: bool = False,
                 seed: int = 0, stagger_refresh: bool = False):
        if residual_mode not in ("code", "paper"):
            raise ValueError(f"residual_mode must be 'code' (fira 1.0.2) or 'paper' (Algorithm 1), "
                             f"got {residual_mode!r}")
        if scaling not in ("vector", "matrix"):
            raise ValueError(f"scaling must be 'vector' (per row/column) or 'matrix', got {scaling!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 1.0:
            raise ValueError(f"gamma (the norm-growth limit) must be a number >= 1, got {gamma!r}")
        self._setup(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, rank=rank,
                    update_proj_gap=update_proj_gap, scale=alpha, proj_type=proj_type, projector=projector,
                    sign_fix=sign_fix, seed=seed, stagger_refresh=stagger_refresh, gamma=float(gamma),
                    residual_mode=residual_mode, scaling=scaling)

    def init_state(self, G, state, group, rows, name):
        super().init_state(G, state, group, rows, name)
        # replicated (computed from the all-reduced ‖S‖); 0 = no limit on the first residual
        state["prev_residual_norm"] = torch.zeros((), dtype=torch.float32, device=G.device)

    def low_rank_step(self, G, R, N, P, state, group, rows):
        side, alpha = state["side"], group["scale"]
        beta1, beta2 = group["betas"]
        # φ reduces over r only: local on side 0's row blocks, and side 1's R and N are replicated. The whole-matrix
        # norms (scaling="matrix" of side 0's [m_k, r] blocks, and ‖S‖ of the [m_k, n] residual) are all-reduced.
        matrix_norm = rows.norm if side == 0 else torch.linalg.vector_norm
        if group["residual_mode"] == "code":
            phi = fira_scaling(N, R, side, group["scaling"], norm=matrix_norm)
            S = T.project_back(R, P, side, add_to=G, alpha=-alpha).mul_(phi)
            S, state["prev_residual_norm"] = limit_norm_growth(S, state["prev_residual_norm"], group["gamma"],
                                                                 norm=rows.norm)
            D = T.project_back(N, P, side, add_to=S, alpha=alpha)
            return D, T.hf_step_size(group["lr"], state["step"], beta1, beta2)
        c_t = T.hf_step_size(1.0, state["step"], beta1, beta2)
        phi = fira_scaling(c_t * N, R, side, group["scaling"], norm=matrix_norm)
        S = T.project_back(R, P, side, add_to=G, alpha=-1.0).mul_(phi)
        S, state["prev_residual_norm"] = limit_norm_growth(S, state["prev_residual_norm"], group["gamma"],
                                                             norm=rows.norm)
        return T.project_back(N, P, side, add_to=S, alpha=c_t), group["lr"] * alpha
