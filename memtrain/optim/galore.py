"""``galore``: Adam run on a low-rank projection of each ``matrix`` gradient (Zhao et al., "GaLore", arXiv
2403.03507; docs/optimizers/galore.md). Fira, which adds the discarded residual back, subclasses it (``fira.py``).

GaLore keeps the Adam moments at the projected shape ``r × max(m, n)``. The projector ``P`` (the top-r singular vectors
of the gradient on the side ``projector_side`` picks) is refreshed every ``update_proj_gap`` steps; the moments are
carried over a refresh unchanged, as in the reference. Fira adds back the part of the gradient that GaLore discards,
scaled per row/column by how much Adam rescaled the projected gradient, with a limiter on the growth of its norm. Every
other role runs AdamW-HF (bias correction folded into the step size, ε on the uncorrected √V, decay after the update;
docs/registry-and-routing.md, "The AdamW conventions") with the same lr and no α, as ``GaLoreAdamW`` does.

State per projected parameter is plain (docs/registry-and-routing.md, "State rules"): ints ``step``, ``side``,
``refreshes``; fp32 tensors ``P``, ``exp_avg``, ``exp_avg_sq`` (Fira: also the 0-d ``prev_residual_norm``). No projector
object, so ``torch.load(weights_only=True)`` resume works; the randomized solver's seed is rebuilt from stored integers.

A refresh whose gradient is non-finite or all zero keeps P and takes the step with a zero gradient, so neither the
solver nor the moments ever see a bad value. This is decided on the device, never by a host branch (``step()``
does not sync): ``step`` and ``refreshes`` count every step and every refresh step, and a matrix whose first
refresh is bad keeps P = 0, so it makes no update (zero moments; only its decoupled weight decay applies) until
its next scheduled refresh. The warning about it is emitted lazily, by ``flush_warnings()``.

Under FSDP2 (docs/optimizers/galore.md and docs/optimizers/fira.md, "Distributed") ``update()`` gets this rank's rows
G_k and the collectives of :class:`~memtrain.optim.sharding.Rows`:

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
import math
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import transforms as T
from .transforms import _here, _whole, ieee_fp32
from .sharding import Rows, local, unsharded
from .base import MemtrainOptimizer, fp32_view

logger = logging.getLogger(__name__)

_SOLVERS = ("svd", "randomized", "gram_eigh")
_PROJ_TYPES = ("std", "reverse_std", "left", "right")


def _replicated_across_ranks(P: Tensor) -> Tensor:
    """Under data parallelism every rank holds the same gradient, but an SVD need not be bitwise identical
    across devices; rank 0's basis is broadcast so that the replicas cannot drift."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(P, src=0)
    return P


def sign_fix_(basis: Tensor, side: int) -> Tensor:
    """Flip each basis vector (rows of a side-0 ``[r, n]``, columns of a side-1 ``[m, r]``) so that its entry
    of largest magnitude is positive (the first such entry on ties). Makes the basis independent of the
    solver's sign convention. Needs the whole basis (under FSDP2 it runs before the basis is broadcast)."""
    vectors = basis if side == 0 else basis.T  # [r, d], a view: flips write through
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vectors.gather(1, idx))
    vectors.mul_(torch.where(signs == 0, torch.ones_like(signs), signs))
    return basis


def gram_eigh_basis(G: Tensor, rank: int, side: int, *, gram_sum: Callable = _whole,
                    on_owner: Callable = _here) -> Tensor:
    """Top-``rank`` eigenvectors of ``GᵀG`` (side 0) or ``GGᵀ`` (side 1), by descending eigenvalue, sign-fixed.

    The side-0 Gram is what an FSDP2 refresh can all-reduce: with G this rank's rows, ``gram_sum``
    sums ``G_kᵀG_k`` over ranks (n×n) and ``on_owner(solve, like)`` runs the eigensolver on one rank and broadcasts
    the ``[rank, n]`` basis into ``like`` elsewhere, so it is bitwise identical on all ranks. ``GGᵀ`` (side 1)
    pairs every row with every other: it needs the whole G."""
    with ieee_fp32():
        gram = gram_sum(G.T @ G) if side == 0 else G @ G.T

    def solve() -> Tensor:
        _, vecs = torch.linalg.eigh(gram)  # ascending
        top = vecs[:, -rank:].flip(1)
        return sign_fix_(top.T.contiguous() if side == 0 else top.contiguous(), side)

    d = gram.shape[0]
    return on_owner(solve, G.new_empty((rank, d) if side == 0 else (d, rank)))


def randomized_basis(G: Tensor, rank: int, side: int, generator: torch.Generator, niter: int = 2) -> Tensor:
    """Halko range finder (Halko, Martinsson & Tropp, arXiv 0909.4061, Alg. 4.4): the top-``rank`` left singular vectors
    of G (side 1), or the right ones via Gᵀ (side 0). Ω is drawn on the CPU from ``generator`` so the global RNG is
    never touched. Needs the whole G (under FSDP2: gathered, and solved on one rank)."""
    A = G if side == 1 else G.T  # we want A's left singular vectors
    d_s = min(A.shape)
    q = min(rank + max(8, math.ceil(rank / 8)), d_s)
    omega = torch.randn(A.shape[1], q, generator=generator, dtype=torch.float32).to(A.device)
    with ieee_fp32():
        Q = torch.linalg.qr(A @ omega).Q
        for _ in range(niter):
            Q = torch.linalg.qr(A @ (A.T @ Q)).Q
        U_small, _, _ = torch.linalg.svd(Q.T @ A, full_matrices=False)
        left = (Q @ U_small)[:, :rank]
    return left.contiguous() if side == 1 else left.T.contiguous()


class GaLore(MemtrainOptimizer):
    """GaLore with an AdamW-HF inner update (docs/optimizers/galore.md, "Update"); AdamW-HF on every role but
    ``matrix``."""

    name = "galore"
    description = "GaLore: AdamW-HF on a rank-r SVD projection of each matrix gradient, refreshed every T steps"
    owns = frozenset({"matrix"})
    needs_matrix_shape = True
    # global refresh flags (MIN all-reduce); refresh: n×n Gram all-reduce (side 0, gram_eigh) or all-gather of G,
    # basis on the owner rank + broadcast; side 1: r×n all-reduce of R every step
    fsdp2 = True
    deepspeed = False

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
        # Each parameter's 0-based position over all groups, in param_groups order (docs/registry-and-routing.md,
        # "Roles, group order and the learning rate"): it seeds the randomized solver and the staggered refresh phase,
        # and is saved with the groups.
        index = 0
        for group in self.param_groups:
            group["param_indices"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])

    # -- the roles GaLore does not project ----------------------------------------------------------------
    def adamw_update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        """AdamW-HF (docs/registry-and-routing.md, "The AdamW conventions"), no α: what GaLoreAdamW does for groups
        without a rank."""
        self.adam_step(param, grad, state, group, T.HF, rows)

    # -- the projected update -------------------------------------------------------------------------------
    def _basis(self, G: Tensor, rank: int, side: int, state: dict, group: dict, index: int) -> Tensor:
        """The group's solver on the whole matrix G (sign-fixed if asked)."""
        solver = group["projector"]
        if solver == "svd":
            P = T.svd_basis(G, rank, side)
        elif solver == "gram_eigh":
            return gram_eigh_basis(G, rank, side)  # sign-fixed already
        else:
            refreshes = state.get("refreshes", 0)  # the value before this refresh's increment
            s64 = ((group["seed"] * 1_000_003 + index) * 1_000_003 + refreshes) % (2**63)
            P = randomized_basis(G, rank, side, torch.Generator("cpu").manual_seed(s64))
        if group["sign_fix"]:
            sign_fix_(P, side)
        return P

    def _solve(self, G: Tensor, rank: int, side: int, state: dict, group: dict, index: int, rows: Rows) -> Tensor:
        """The whole new basis (side 0 ``[r, n]``, side 1 ``[m, r]``), bitwise identical on every rank.

        Under FSDP2 (docs/optimizers/galore.md, "Distributed") the side-0 ``gram_eigh`` refresh needs only the n×n Gram
        all-reduced; every other solver needs the whole G, so G is gathered. ``svd``/``randomized`` are not switched to
        ``gram_eigh`` (an automatic switch was considered and rejected): the sharded run then equals the single-process
        run with the same options. Either way one rank (``rows.owner``) solves and broadcasts."""
        if group["projector"] == "gram_eigh" and side == 0:
            P = gram_eigh_basis(G, rank, side, gram_sum=rows.sum, on_owner=rows.on_owner)
        else:
            whole = rows.gather(G)
            shape = (rank, whole.shape[1]) if side == 0 else (whole.shape[0], rank)
            P = rows.on_owner(lambda: self._basis(whole, rank, side, state, group, index), G.new_empty(shape))
        # DDP: every rank solved on the same G, but solvers need not be bitwise reproducible across devices
        return P if rows.sharded else _replicated_across_ranks(P)

    def _refresh(self, G: Tensor, state: dict, group: dict, index: int, name: str, rows: Rows) -> Tensor:
        """Replace P from the current gradient, unless G is non-finite or all zero (then P is kept). Returns the
        gradient the step then uses: G itself, or zeros when it is bad.

        No host sync (docs/registry-and-routing.md; a GPU stall per refresh, and an error under ``FakeTensorMode``): the test is a
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
        load template from a zero-gradient step (docs/registry-and-routing.md, "State rules"): an entry missing then is never restored on resume.

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
        conv1d = group.get("layout") == "conv1d"  # stored [in, out]: work on the [out, in] view
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
        N = T.adam_direction_(R, local(state["exp_avg"]), local(state["exp_avg_sq"]), step=state["step"],
                              beta1=beta1, beta2=beta2, eps=group["eps"], convention=T.HF)
        direction, coefficient = self.low_rank_step(G, R, N, P, state, group, rows)
        with fp32_view(param) as p32:
            T.descend_(p32.T if conv1d else p32, direction, lr=group["lr"], weight_decay=group["weight_decay"],
                       step_size=coefficient, decay_after=True)

    def low_rank_step(self, G: Tensor, R: Tensor, N: Tensor, P: Tensor, state: dict, group: dict,
                      rows: Rows) -> tuple[Tensor, float]:
        """The full-size direction D (this rank's rows) and the coefficient c with ``W ← W − c·D``. GaLore:
        ``D = α·back(N)``, ``c = η_t·√(1−β2ᵗ)/(1−β1ᵗ)``. ``P`` is this rank's part of the projector."""
        beta1, beta2 = group["betas"]
        D = T.project_back(N, P, state["side"]) * group["scale"]
        return D, T.hf_step_size(group["lr"], state["step"], beta1, beta2)
