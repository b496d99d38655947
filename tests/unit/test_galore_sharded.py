"""galore and fira on FSDP2 row blocks, without torchrun (docs/optimizers/galore.md and fira.md, Distributed): 2 and 3
simulated ranks
(tests/unit/thread_rows.py) update their rows of each parameter with the method's collectives, over steps with two
projector refreshes (``update_proj_gap=2``: step counts 0 and 2). The joined result must equal one unsharded
optimizer with the same solver; the state must be placed as docs/optimizers/galore.md, Distributed, says: side 0 (m ≥ n)
keeps P ``[r, n]`` replicated
and the moments ``[m_k, r]`` sharded, side 1 (m < n) keeps P ``[m_k, r]`` sharded and the moments ``[r, n]``
replicated; Fira's ``prev_residual_norm`` is replicated. Every rank must enter the same collectives (run_ranks),
including ranks with no rows.

Shapes (torch.chunk split): on 3 ranks 7 rows -> 3/3/1, 4 -> 2/2/0, 5 -> 2/2/1, 1 -> 1/0/0; on 2 ranks 7 -> 4/3,
4 -> 2/2, 5 -> 3/2, 1 -> 1/0. The real 2-rank FSDP2 run is tests/distributed/test_parity.py."""
import io
import threading
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch import nn

from memtrain.optim.sharding import unsharded
from memtrain.optim import galore as galore_module, transforms
from memtrain.optim.fira import Fira
from memtrain.optim.galore import GaLore

from .test_distributed_scale_adafactor_slimadam import check_sharded
from .thread_rows import ThreadRows, run_ranks

SHAPES = {"q_proj.weight": (7, 4), "k_proj.weight": (4, 4),  # side 0
          "down_proj.weight": (5, 9), "up_proj.weight": (1, 6),  # side 1
          "norm.weight": (5,)}  # the AdamW-HF fallback
ROLES = {n: "vector" if n == "norm.weight" else "matrix" for n in SHAPES}
SIDE0, SIDE1 = ("q_proj.weight", "k_proj.weight"), ("down_proj.weight", "up_proj.weight")

METHODS = {
    "galore": lambda g, **kw: GaLore(g, lr=1e-2, weight_decay=0.1, rank=2, update_proj_gap=2, scale=0.5, **kw),
    "fira-code": lambda g, **kw: Fira(g, lr=1e-2, rank=2, update_proj_gap=2, **kw),
    "fira-paper": lambda g, **kw: Fira(g, lr=1e-2, rank=2, update_proj_gap=2, residual_mode="paper", **kw),
    "fira-matrix": lambda g, **kw: Fira(g, lr=1e-2, rank=2, update_proj_gap=2, scaling="matrix", **kw),
}


def replicated(method: str) -> set[tuple[str, str]]:
    keys = {(n, "P") for n in SIDE0} | {(n, k) for n in SIDE1 for k in ("exp_avg", "exp_avg_sq")}
    if method != "galore":
        keys |= {(n, "prev_residual_norm") for n in SIDE0 + SIDE1}
    return keys


def tolerance(solver: str) -> float:
    """The sharded-vs-one-process bound: the side-0 gram_eigh Gram is a sum of the ranks' partial Grams (see
    test_row_blocks_equal_one_process), every other solver sees the whole G bitwise."""
    return 1e-5 if solver == "gram_eigh" else 1e-6


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("solver", ["svd", "gram_eigh", "randomized"])
@pytest.mark.parametrize("method", list(METHODS))
def test_row_blocks_equal_one_process(method, solver, world):
    """svd and randomized solve the gathered G, bitwise the unsharded G; what differs is the order of the side-1
    R all-reduce and of ‖S‖² (measured ≤ 1.3e-7 over parameters and state). gram_eigh sums the ranks' Grams in
    another order than one GᵀG, and eigh turns that rounding into basis error ∝ λ₁/(λ_r − λ_{r+1}) (measured
    7.7e-7 here on one CPU, 1.0e-6 on 3 ranks on another; 2e-5 in the moments of a 4×3 gradient whose λ₃/λ₁ is
    1e-6): the spec's 1e-5 bound."""
    ranks = check_sharded(lambda g: METHODS[method](g, projector=solver), SHAPES, ROLES, replicated(method),
                          world=world, tol=tolerance(solver))
    for params, opt, _ in ranks:
        for n in SIDE0 + SIDE1:
            assert opt.state[params[n]]["refreshes"] == 2, n


class CountingRows(ThreadRows):
    """Counts this rank's collectives by kind, and records which thread is which rank (for the solver spy)."""

    RANK = threading.local()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = Counter()
        CountingRows.RANK.value = self.rank

    def _all_reduce(self, t, op):
        self.calls[{dist.ReduceOp.MIN: "all", dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}[op]] += 1
        return super()._all_reduce(t, op)

    def gather(self, x):
        self.calls["gather"] += 1
        return super().gather(x)

    def broadcast(self, t):
        self.calls["broadcast"] += 1
        return super().broadcast(t)


@pytest.mark.parametrize("solver", ["svd", "gram_eigh", "randomized"])
@pytest.mark.parametrize("method", ["galore", "fira-code", "fira-matrix"])
def test_collectives_per_side_and_the_solver_runs_on_the_owner_only(method, solver, monkeypatch):
    """3 steps, 2 refreshes. A refresh: one MIN all-reduce of the flags; side 0 with gram_eigh all-reduces the
    Gram, every other case gathers G; the basis is solved on the owner and broadcast. Every step: side 1
    all-reduces R; Fira all-reduces ‖S‖² (and on side 0 with scaling="matrix" also ‖N‖² and ‖R‖²)."""
    solved = []  # the simulated rank of every solver call (the unsharded reference runs in the main thread)

    def spy(real):
        def run(*args, **kwargs):
            solved.append(getattr(CountingRows.RANK, "value", "reference"))
            return real(*args, **kwargs)
        return run

    for module, fn in ((transforms, "svd_basis"), (galore_module, "randomized_basis")):
        monkeypatch.setattr(module, fn, spy(getattr(module, fn)))
    monkeypatch.setattr(torch.linalg, "eigh", spy(torch.linalg.eigh))

    ranks = check_sharded(lambda g: METHODS[method](g, projector=solver), SHAPES, ROLES, replicated(method),
                          rows_cls=CountingRows, world=3, tol=tolerance(solver))
    for position, n in enumerate(SIDE0 + SIDE1):  # SHAPES order: the position picks the owner rank
        side = 0 if n in SIDE0 else 1
        want = Counter(all=2, broadcast=2)
        want["sum" if side == 0 and solver == "gram_eigh" else "gather"] += 2
        want["sum"] += 3 * ((side == 1) + (method != "galore") + 2 * (side == 0 and method == "fira-matrix"))
        for r, (_, _, rows) in enumerate(ranks):
            assert rows[n].calls == want, (n, r)
    # the fallback (norm.weight) is elementwise: no collective
    assert all(rows["norm.weight"].calls == Counter() for _, _, rows in ranks)
    on_ranks = sorted(r for r in solved if r != "reference")
    assert on_ranks == sorted(p % 3 for p in range(4) for _ in range(2))  # 2 solves per matrix, on its owner only


def test_state_dict_of_the_row_blocks():
    """Each rank's state_dict holds its part with the documented shapes and loads back with weights_only=True (the
    real run wraps the sharded tensors as Shard(0) DTensors of the global shape; parity_worker checks the bytes)."""
    ranks = check_sharded(lambda g: METHODS["fira-code"](g), SHAPES, ROLES, replicated("fira-code"), world=3)
    names = list(SHAPES)
    for params, opt, rows in ranks:
        saved = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)["state"]
        for n in SIDE0:
            m_k, n_cols, r = rows[n].held, SHAPES[n][1], 2
            s = state[names.index(n)]
            assert s["side"] == 0 and s["P"].shape == (r, n_cols)
            assert s["exp_avg"].shape == s["exp_avg_sq"].shape == (m_k, r)
            assert s["prev_residual_norm"].shape == ()
        for n in SIDE1:
            m_k, n_cols, r = rows[n].held, SHAPES[n][1], min(2, SHAPES[n][0])
            s = state[names.index(n)]
            assert s["side"] == 1 and s["P"].shape == (m_k, r)
            assert s["exp_avg"].shape == s["exp_avg_sq"].shape == (r, n_cols)
        assert state[names.index("norm.weight")]["exp_avg"].shape == (rows["norm.weight"].held,)


@pytest.mark.filterwarnings("ignore:galore. (non-finite|all-zero) gradient")
def test_the_refresh_decision_is_global():
    """A refresh keeps P only if the WHOLE G is non-finite or all zero (docs/distributed.md, Rules every sharded update
    follows): rank 0's rows of the first
    gradient are all zero (a local test would skip the refresh there while rank 1 gathers G and hangs), and
    the third gradient (a refresh step) has a NaN in rank 1's rows only, so every rank keeps the old P."""
    gen = torch.Generator().manual_seed(0)
    w0, gs = torch.randn(6, 4, generator=gen), [torch.randn(6, 4, generator=gen) for _ in range(3)]
    gs[0][:3] = 0  # rank 0's rows (6 rows on 2 ranks: 3/3)
    gs[2][4, 1] = float("nan")  # one of rank 1's rows

    def run(rows, param):
        opt = GaLore([param], lr=1e-2, rank=2, update_proj_gap=2)
        projectors = []
        for g in gs:
            with torch.no_grad():
                opt.update(param, rows.mine(g), opt.state[param], opt.param_groups[0], rows)
            projectors.append(opt.state[param]["P"].clone())
        return projectors, opt.state[param]["refreshes"]

    whole = run(unsharded(w0), nn.Parameter(w0.clone()))
    ranks = run_ranks(2, lambda r, hub: run(rows := ThreadRows(6, r, hub), nn.Parameter(rows.mine(w0).clone())))
    for projectors, refreshes in ranks:
        assert refreshes == whole[1] == 2  # refresh steps 0 and 2, counted whether or not they replace P
        assert all(torch.equal(a, b) for a, b in zip(projectors, whole[0]))  # the gathered G: svd is bitwise
