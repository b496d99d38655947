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

A refresh whose gradient is non-finite or all zero keeps P and takes the step with a zero gradient, so neither the
solver nor the moments ever see a bad value. This is decided on the device, never by a host branch (``step()``
does not sync): ``step`` and ``refreshes`` count every step and every refresh step, and a matrix whose first
refresh is bad keeps P = 0, so it makes no update (zero moments; only its decoupled weight decay applies) until
its next scheduled refresh. The warning about it is emitted lazily, by ``flush_warnings()``.

Under FSDP2 (galore.md §7, fira.md §7) ``update()`` gets this rank's rows G_k and the collectives of
:class:`~memtrain.optim.sharding.Rows`:

* the refresh decision (finite, not all zero) is one MIN all-reduce of the local flags, so every rank enters the
  same collectives, empty shards included;
* side 0 (m ≥ n, P ``[r, n]`` replicated): a ``gram_eigh`` refresh all-reduces the n×n Gram; ``svd`` and
  ``randomized`` gather G (the solver the user chose is kept, so the sharded run equals the single-process one);
  the basis is computed on the owner rank and broadcast. ``R_k = G_k Pᵀ``, the moments ``[m_k, r]`` (sharded,
  ``Rows.keep``) and ``D_k = N_k P`` are local;
* side 1 (m < n, P ``[m, r]`` sharded): a refresh gathers G, solves on the owner, broadcasts P and keeps this
  rank's rows. ``R = Σ_k P_kᵀ G_k`` is an r×n all-reduce, the moments ``[r, n]`` are replicated, ``D_k = P_k N``;
* Fira: φ is local (per row of a row block on side 0, per column of the replicated N, R on side 1); ‖S‖_F and
  the ``scaling="matrix"`` norms of side-0 row blocks are scalar all-reduces; ``prev_residual_norm`` is replicated.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import transforms as T
from .sharding import Rows, local, unsharded
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

    # -- the roles GaLore does not project ----------------------------------------------------------------
    def adamw_update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        """AdamW-HF (README §2.4), no α: what GaLoreAdamW does for groups without a rank."""
        self.adam_step(param, grad, state, group, T.adamw_hf_, rows)

    # -- the projected update -------------------------------------------------------------------------------
    def _basis(self, G: Tensor, rank: int, side: int, state: dict, group: dict, index: int) -> Tensor:
        """The group's solver on the whole matrix G (sign-fixed if asked)."""
        solver = group["projector"]
        if solver == "svd":
            P = T.svd_basis(G, rank, side)
        elif solver == "gram_eigh":
            return T.gram_eigh_basis(G, rank, side)  # sign-fixed already
        else:
            refreshes = state.get("refreshes", 0)  # the value before this refresh's increment
            s64 = ((group["seed"] * 1_000_003 + index) * 1_000_003 + refreshes) % (2**63)
            P = T.randomized_basis(G, rank, side, torch.Generator("cpu").manual_seed(s64))
        if group["sign_fix"]:
            T.sign_fix_(P, side)
        return P

    def _solve(self, G: Tensor, rank: int, side: int, state: dict, group: dict, index: int, rows: Rows) -> Tensor:
        """The whole new basis (side 0 ``[r, n]``, side 1 ``[m, r]``), bitwise identical on every rank.

        Under FSDP2 (galore.md §7) the side-0 ``gram_eigh`` refresh needs only the n×n Gram all-reduced; every
        other solver needs the whole G, so G is gathered. ``svd``/``randomized`` are not switched to ``gram_eigh``
        (the spec's auto-switch) [DECISION]: the sharded run then equals the single-process run with the same
        options. Either way one rank (``rows.owner``) solves and broadcasts."""
        if group["projector"] == "gram_eigh" and side == 0:
            P = T.gram_eigh_basis(G, rank, side, gram_sum=rows.sum, on_owner=rows.on_owner)
        else:
            whole = rows.gather(G)
            shape = (rank, whole.shape[1]) if side == 0 else (whole.shape[0], rank)
            P = rows.on_owner(lambda: self._basis(whole, rank, side, state, group, index), G.new_empty(shape))
        # DDP: every rank solved on the same G, but solvers need not be bitwise reproducible across devices
        return P if rows.sharded else _replicated_across_ranks(P)

    def _refresh(self, G: Tensor, state: dict, group: dict, index: int, name: str, rows: Rows) -> Tensor:
        """Replace P from the current gradient, unless G is non-finite or all zero (then P is kept). Returns the
        gradient the step then uses: G itself, or zeros when it is bad.

        No host sync (README §2.7; a GPU stall per refresh, and an error under ``FakeTensorMode``): the test is a
        device flag, global under FSDP2 (a MIN all-reduce of this rank's flags). The solver always runs, so every
        rank enters the same collectives, but on zeros when G is bad (it never sees a non-finite value), and its
        basis is then discarded by ``torch.where``; for a good G every value is bitwise what a host branch gives.
        A bad refresh is warned about lazily (:meth:`flush_warnings`)."""
        flags = rows.all(torch.stack([torch.isfinite(G).all(), (G == 0).all()]))
        ok = flags[0] & ~flags[1]
        self.flag_warning(f"bad:{name}", ~ok, (
            f"{self.name}: non-finite or all-zero gradient for {name or 'a parameter'} at a projector refresh; the "
            "previous projector was kept and the step used a zero gradient (a matrix that had no projector yet "
            "makes no update but its weight decay until the next refresh, every update_proj_gap steps)"))
        G = torch.where(ok, G, torch.zeros((), dtype=G.dtype, device=G.device))
        side, P = state["side"], local(state["P"])
        rank = P.shape[0] if side == 0 else P.shape[1]  # [r, n] or [m_k, r]
        basis = self._solve(G, rank, side, state, group, index, rows)
        P.copy_(torch.where(ok, basis if side == 0 else rows.mine(basis), P))  # side 1: this rank's rows of [m, r]
        state["refreshes"] += 1
        return G

    def projection_rank(self, group: dict, m: int, n: int) -> int:
        """The rank of an m×n matrix's projection: an SVD basis has at most min(m, n) vectors."""
        return min(group["rank"], m, n)

    def init_state(self, G: Tensor, state: dict, group: dict, rows: Rows, name: str) -> None:
        """Every state entry of a projected parameter, zero, at its final shape, on the parameter's first step, even
        when that step's gradient is bad (then P stays zero until a refresh succeeds). Distributed checkpointing builds its
        load template from a zero-gradient step (README §2.8): an entry missing then is never restored on resume.

        Side 0: P ``[r, n]`` replicated, moments ``[m_k, r]`` this rank's rows (sharded like the weight); side 1:
        P ``[m_k, r]`` sharded, moments ``[r, n]`` replicated (R is all-reduced)."""
        m, n = rows.total, G.shape[1]
        side = T.projector_side(m, n, group["proj_type"])
        rank = self.projection_rank(group, m, n)
        if rank < group["rank"]:
            logger.info("%s: rank %d clipped to %d for %s %s", self.name, group["rank"], rank, name, (m, n))
        state.update(step=0, side=side, refreshes=0)
        mine, whole = (G.shape[0], rank), (rank, n)  # [m_k, r]: this rank's rows; [r, n]: the same on every rank
        sharded = lambda: rows.keep(G.new_zeros(mine))  # noqa: E731
        replicated = lambda: G.new_zeros(whole)  # noqa: E731
        if side == 0:
            state["P"], state["exp_avg"], state["exp_avg_sq"] = replicated(), sharded(), sharded()
        else:
            state["P"], state["exp_avg"], state["exp_avg_sq"] = sharded(), replicated(), replicated()

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        index = rows.position  # == group["param_indices"][i] for this parameter's place i in the group
        name = group["names"][group["param_indices"].index(index)]
        conv1d = group.get("layout") == "conv1d"  # stored [in, out]: work on the [out, in] view (README §2.1)
        G = grad.float()
        if conv1d:  # FSDP2 refuses a sharded conv1d weight (base._check_param), so the view is whole
            G = G.T
            rows = unsharded(G, index)
        if not state:
            self.init_state(G, state, group, rows, name)
        phase = index % group["update_proj_gap"] if group["stagger_refresh"] else 0
        if state["refreshes"] == 0 or (state["step"] + phase) % group["update_proj_gap"] == 0:
            G = self._refresh(G, state, group, index, name, rows)  # a bad G is replaced by zeros (P kept)
        P, side = local(state["P"]), state["side"]
        R = T.project(G, P, side, row_sum=rows.sum)  # side 1: an r×n all-reduce under FSDP2
        state["step"] += 1
        beta1, beta2 = group["betas"]
        N = T.adam_hf_direction_(R, local(state["exp_avg"]), local(state["exp_avg_sq"]), beta1=beta1, beta2=beta2,
                                 eps=group["eps"])
        direction, coefficient = self.low_rank_step(G, R, N, P, state, group, rows)
        with fp32_view(param) as p32:
            w = p32.T if conv1d else p32
            w.add_(direction, alpha=-coefficient)
            T.decay_after_(w, lr=group["lr"], weight_decay=group["weight_decay"])

    def low_rank_step(self, G: Tensor, R: Tensor, N: Tensor, P: Tensor, state: dict, group: dict,
                      rows: Rows) -> tuple[Tensor, float]:
        """The full-size direction D (this rank's rows) and the coefficient c with ``W ← W − c·D``. GaLore:
        ``D = α·back(N)``, ``c = η_t·√(1−β2ᵗ)/(1−β1ᵗ)``. ``P`` is this rank's part of the projector."""
        beta1, beta2 = group["betas"]
        D = T.project_back(N, P, state["side"]) * group["scale"]
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
            phi = T.fira_scaling(N, R, side, group["scaling"], norm=matrix_norm)
            S = (G - T.project_back(R, P, side) * alpha) * phi
            S, state["prev_residual_norm"] = T.limit_norm_growth(S, state["prev_residual_norm"], group["gamma"],
                                                                 norm=rows.norm)
            D = T.project_back(N, P, side) * alpha + S
            return D, T.hf_step_size(group["lr"], state["step"], beta1, beta2)
        c_t = T.hf_step_size(1.0, state["step"], beta1, beta2)
        phi = T.fira_scaling(c_t * N, R, side, group["scaling"], norm=matrix_norm)
        S = (G - T.project_back(R, P, side)) * phi
        S, state["prev_residual_norm"] = T.limit_norm_growth(S, state["prev_residual_norm"], group["gamma"],
                                                             norm=rows.norm)
        return T.project_back(N, P, side) * c_t + S, group["lr"] * alpha


register(OptimizerSpec(
    name="galore",
    cls=GaLore,
    description="GaLore: AdamW-HF on a rank-r SVD projection of each matrix gradient, refreshed every T steps",
    # global refresh flags (MIN all-reduce); refresh: n×n Gram all-reduce (side 0, gram_eigh) or all-gather of G,
    # basis on the owner rank + broadcast; side 1: r×n all-reduce of R every step (galore.md §7)
    fsdp2=True,
    deepspeed=False,
))
register(OptimizerSpec(
    name="fira",
    cls=Fira,
    description="Fira: GaLore plus the norm-scaled residual outside the subspace, with a norm-growth limiter",
    # GaLore's collectives, plus scalar all-reduces of ‖S‖² (and of ‖N‖², ‖R‖² for side 0 with scaling="matrix")
    fsdp2=True,
    deepspeed=False,
))
