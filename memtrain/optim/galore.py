"""``galore`` and ``fira``: Adam run on a low-rank projection of each ``matrix`` gradient (specs/galore.md,
specs/fira.md).

GaLore keeps the Adam moments at the projected shape ``r × max(m, n)``. The projector ``P`` (the top-r singular
vectors of the gradient on the side ``projector_side`` picks) is refreshed every ``update_proj_gap`` steps; the
moments are carried over a refresh unchanged, as in the reference. Fira adds back the part of the gradient that
GaLore discards, scaled per row/column by how much Adam rescaled the projected gradient, with a limiter on the
growth of its norm. Every other role runs AdamW-HF (bias correction folded into the step size, ε on the
uncorrected √V, decay after the update; README §2.4) with the same lr and no α, as ``GaLoreAdamW`` does.

State per projected parameter is plain (README §2.8): ints ``step``, ``side``, ``refreshes``; fp32 tensors
``P``, ``exp_avg``, ``exp_avg_sq`` (Fira: also the 0-d ``prev_residual_norm``). No projector object, so
``torch.load(weights_only=True)`` resume works; the randomized solver's seed is rebuilt from stored integers.
"""
from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import transforms as T
from ..distributed import Rows
from .base import MemtrainOptimizer, fp32_view
from .registry import OptimizerSpec, register

logger = logging.getLogger(__name__)

_SOLVERS = ("svd", "randomized", "gram_eigh")
_PROJ_TYPES = ("std", "reverse_std", "left", "right")


def _replicated_across_ranks(P: Tensor) -> Tensor:
    """Under data parallelism every rank holds the same gradient, but an SVD need not be bitwise identical
    across devices; rank 0's basis is broadcast so that the replicas cannot drift (galore.md §7)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(P, src=0)
    return P


class GaLore(MemtrainOptimizer):
    """GaLore with an AdamW-HF inner update (galore.md §2.1); AdamW-HF on every role but ``matrix``."""

    name = "galore"
    owns = frozenset({"matrix"})
    needs_matrix_shape = True

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
                 projector: Literal["svd", "randomized", "gram_eigh"] = "svd", sign_fix: bool = False,
                 seed: int = 0, stagger_refresh: bool = False):
        self._setup(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, rank=rank,
                    update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projector=projector,
                    sign_fix=sign_fix, seed=seed, stagger_refresh=stagger_refresh)

    def _setup(self, params, *, rank, update_proj_gap, scale, proj_type, projector, sign_fix, seed,
               stagger_refresh, **rest):
        """Validate the projection options and build the groups (shared by GaLore and Fira)."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not isinstance(update_proj_gap, int) or isinstance(update_proj_gap, bool) or update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be a positive integer (steps between projector refreshes), "
                             f"got {update_proj_gap!r}")
        if proj_type not in _PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {', '.join(_PROJ_TYPES)}, got {proj_type!r}")
        if projector not in _SOLVERS:
            raise ValueError(f"projector must be one of {', '.join(_SOLVERS)}, got {projector!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"the scale α must be a positive number, got {scale!r}")
        MemtrainOptimizer.__init__(
            self, params, rank=rank, update_proj_gap=update_proj_gap, scale=float(scale), proj_type=proj_type,
            projector=projector, sign_fix=bool(sign_fix or projector == "gram_eigh"), seed=int(seed),
            stagger_refresh=bool(stagger_refresh), **rest)
        # Each parameter's 0-based position over all groups, in param_groups order (README §2.5): it seeds the
        # randomized solver and the staggered refresh phase, and is saved with the groups.
        index = 0
        for group in self.param_groups:
            group["param_indices"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
        self._warned: set[str] = set()

    # -- the roles GaLore does not project ----------------------------------------------------------------
    def adamw_update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        """AdamW-HF (README §2.4), no α: what GaLoreAdamW does for groups without a rank."""
        self.adam_step(param, grad, state, group, T.adamw_hf_, rows)

    # -- the projected update -------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _solve(self, G: Tensor, rank: int, side: int, state: dict, group: dict, index: int) -> Tensor:
        solver = group["projector"]
        if solver == "svd":
            P = T.svd_basis(G, rank, side)
        elif solver == "gram_eigh":
            P = T.gram_eigh_basis(G, rank, side)
        else:
            refreshes = state.get("refreshes", 0)  # the value before this refresh's increment
            s64 = ((group["seed"] * 1_000_003 + index) * 1_000_003 + refreshes) % (2**63)
            P = T.randomized_basis(G, rank, side, torch.Generator("cpu").manual_seed(s64))
        if group["sign_fix"] and solver != "gram_eigh":
            T.sign_fix_(P, side)
        return _replicated_across_ranks(P)

    def _refresh(self, G: Tensor, state: dict, group: dict, index: int, name: str) -> bool:
        """Replace P from the current gradient; False when G is non-finite or all zero (then P is kept).

        Only at refresh steps, so the host sync of the finiteness test is paid once per ``update_proj_gap``."""
        finite, zero = (bool(x) for x in torch.stack([torch.isfinite(G).all(), (G == 0).all()]).tolist())
        if not finite or zero:
            what = "non-finite" if not finite else "all-zero"
            self._warn_once(f"bad:{name}", f"{self.name}: {what} gradient for {name or 'a parameter'} at a projector "
                            "refresh; keeping the previous projector (or skipping the step if there is none)")
            return False
        m, n = G.shape
        side = state.get("side", T.projector_side(m, n, group["proj_type"]))
        rank = min(group["rank"], m, n)
        if rank < group["rank"]:
            if f"rank:{name}" not in self._warned:
                self._warned.add(f"rank:{name}")
                logger.info("%s: rank %d clipped to %d for %s %s", self.name, group["rank"], rank, name, (m, n))
        state["P"] = self._solve(G, rank, side, state, group, index)
        state["side"] = side
        state["refreshes"] = state.get("refreshes", 0) + 1
        return True

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        if hasattr(param, "device_mesh") or hasattr(grad, "device_mesh"):
            raise NotImplementedError(
                f"{self.name}: sharded (FSDP2 DTensor) parameters are not supported in this version; train with "
                "DDP or a single process")
        position = next(i for i, p in enumerate(group["params"]) if p is param)
        index, name = group["param_indices"][position], group["names"][position]
        conv1d = group.get("layout") == "conv1d"  # stored [in, out]: work on the [out, in] view (README §2.1)
        G = grad.float()
        G = G.T if conv1d else G
        phase = index % group["update_proj_gap"] if group["stagger_refresh"] else 0
        if "P" not in state or (state["step"] + phase) % group["update_proj_gap"] == 0:
            if not self._refresh(G, state, group, index, name) and "P" not in state:
                return  # no subspace yet: skip entirely, retried at the next step (galore.md §2.1)
        P, side = state["P"], state["side"]
        R = T.project(G, P, side)
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(R)
            state["exp_avg_sq"] = torch.zeros_like(R)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        N = T.adam_hf_direction_(R, state["exp_avg"], state["exp_avg_sq"], beta1=beta1, beta2=beta2,
                                 eps=group["eps"])
        direction, coefficient = self.low_rank_step(G, R, N, state, group)
        with fp32_view(param) as p32:
            w = p32.T if conv1d else p32
            w.add_(direction, alpha=-coefficient)
            T.decay_after_(w, lr=group["lr"], weight_decay=group["weight_decay"])

    def low_rank_step(self, G: Tensor, R: Tensor, N: Tensor, state: dict, group: dict) -> tuple[Tensor, float]:
        """The full-size direction D and the coefficient c with ``W ← W − c·D``. GaLore: ``D = α·back(N)``,
        ``c = η_t·√(1−β2ᵗ)/(1−β1ᵗ)``."""
        beta1, beta2 = group["betas"]
        D = T.project_back(N, state["P"], state["side"]) * group["scale"]
        return D, T.hf_step_size(group["lr"], state["step"], beta1, beta2)


class Fira(GaLore):
    """GaLore plus Fira's norm-scaled residual and norm-growth limiter (fira.md §2).

    ``residual_mode="code"`` (default) is ``fira==1.0.2``: ``S = φ⊙(G − α·back(R))``, α on the Adam term only.
    ``"paper"`` is the paper's Algorithm 1: ``S = c_t·φ⊙(G − back(R))``, α on both terms."""

    name = "fira"

    def __init__(self, params, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, rank: int = 128, update_proj_gap: int = 200, alpha: float = 0.25,
                 gamma: float = 1.01, residual_mode: Literal["code", "paper"] = "code",
                 scaling: Literal["vector", "matrix"] = "vector",
                 proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
                 projector: Literal["svd", "randomized", "gram_eigh"] = "svd", sign_fix: bool = False,
                 seed: int = 0, stagger_refresh: bool = False):
        if residual_mode not in ("code", "paper"):
            raise ValueError(f"residual_mode must be 'code' (fira 1.0.2) or 'paper' (Algorithm 1), got {residual_mode!r}")
        if scaling not in ("vector", "matrix"):
            raise ValueError(f"scaling must be 'vector' (per row/column) or 'matrix', got {scaling!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 1.0:
            raise ValueError(f"gamma (the norm-growth limit) must be a number >= 1, got {gamma!r}")
        self._setup(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, rank=rank,
                    update_proj_gap=update_proj_gap, scale=alpha, proj_type=proj_type, projector=projector,
                    sign_fix=sign_fix, seed=seed, stagger_refresh=stagger_refresh, gamma=float(gamma),
                    residual_mode=residual_mode, scaling=scaling)

    def low_rank_step(self, G, R, N, state, group):
        P, side, alpha = state["P"], state["side"], group["scale"]
        beta1, beta2 = group["betas"]
        if "prev_residual_norm" not in state:
            state["prev_residual_norm"] = torch.zeros((), dtype=torch.float32, device=G.device)  # 0 = no limit
        if group["residual_mode"] == "code":
            phi = T.fira_scaling(N, R, side, group["scaling"])
            S = (G - T.project_back(R, P, side) * alpha) * phi
            S, state["prev_residual_norm"] = T.limit_norm_growth(S, state["prev_residual_norm"], group["gamma"])
            D = T.project_back(N, P, side) * alpha + S
            return D, T.hf_step_size(group["lr"], state["step"], beta1, beta2)
        c_t = T.hf_step_size(1.0, state["step"], beta1, beta2)
        phi = T.fira_scaling(c_t * N, R, side, group["scaling"])
        S = (G - T.project_back(R, P, side)) * phi
        S, state["prev_residual_norm"] = T.limit_norm_growth(S, state["prev_residual_norm"], group["gamma"])
        return T.project_back(N, P, side) * c_t + S, group["lr"] * alpha


register(OptimizerSpec(
    name="galore",
    cls=GaLore,
    description="GaLore: AdamW-HF on a rank-r SVD projection of each matrix gradient, refreshed every T steps",
    fsdp2=False,
    deepspeed=False,
))
register(OptimizerSpec(
    name="fira",
    cls=Fira,
    description="Fira: GaLore plus the norm-scaled residual outside the subspace, with a norm-growth limiter",
    fsdp2=False,
    deepspeed=False,
))
