"""adam4bit on FSDP2 row blocks, without torchrun: 2 and 3 simulated ranks (tests/unit/thread_rows.py) update their
rows with the method's collectives and must equal one unsharded optimizer **bitwise** (docs/optimizers/adam4bit.md,
Distributed:
row-aligned blocks are local, the rank-1 column maxima come from a MAX all-reduce, which is exact). Per-rank codes
and scales are kept as ``Shard(0)`` state whose global shape splits back into the ranks' parts; ``v_col`` is
replicated; the ranks' state bytes add up to the unsharded bytes plus the replicated copies. ZeRO's flat partitions
get block v and one warning.

Shapes (torch.chunk split): on 3 ranks 7 rows -> 3/3/1, 5 -> 2/2/1, 4 -> 2/2/0, 1 -> 1/0/0 (empty shards), 3 -> 1/1/1;
on 2 ranks 7 -> 4/3, 5 -> 3/2, 3 -> 2/1, 1 -> 1/0. With ``block_size=4`` rows of 10 and 9 columns end in a short
block; the 1-D gain has 4·world elements, so every shard starts at a multiple of 4 (the case the spec calls exact).
The real 2-rank FSDP2 run is tests/distributed/test_parity.py."""
import warnings

import pytest
import torch

from memtrain.hf.metrics import optimizer_state_bytes, storage_bytes
from memtrain.optim import adam4bit
from memtrain.optim.adam4bit import Adam4bit

from .test_distributed_scale_adafactor_slimadam import _rel, check_sharded
from .thread_rows import ThreadRows, run_ranks

OPTIONS = dict(lr=1e-2, weight_decay=0.1, block_size=4, threshold=8)


class ShapeRows(ThreadRows):
    """Records the global shape each kept tensor would get as a ``Shard(0)`` DTensor (what ``Rows.keep`` builds)."""

    def keep(self, t, total=None):
        self.kept_shapes.append((self.total if total is None else total, *t.shape[1:]))
        return super().keep(t, total)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_shapes = []


def _shapes(world):
    return {"q_proj.weight": (7, 10), "up_proj.weight": (5, 9), "embed_tokens.weight": (4, 6),
            "lm_head.weight": (1, 8), "conv.weight": (3, 2, 5), "norm.weight": (4 * world,), "bias": (2,)}


ROLES = {"q_proj.weight": "matrix", "up_proj.weight": "matrix", "embed_tokens.weight": "embedding",
         "lm_head.weight": "head", "conv.weight": "other", "norm.weight": "vector", "bias": "vector"}


def _check_kept_shapes(ranks, world):
    """Every kept tensor describes a DTensor whose global dim 0 splits like torch.chunk into the ranks' parts."""
    for name in ranks[0][2]:
        per_rank = [(rows[name].kept_shapes, rows[name].kept) for _, _, rows in ranks]
        for i, shape in enumerate(per_rank[0][0]):
            assert all(shapes[i] == shape for shapes, _ in per_rank), name
            parts = [len(c) for c in torch.arange(shape[0]).chunk(world)]
            parts += [0] * (world - len(parts))
            assert [kept[i].shape[0] for _, kept in per_rank] == parts, (name, i, shape)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("v_norm", ["rank1", "block"])
def test_sharded_equals_unsharded_bitwise(world, v_norm):
    shapes = _shapes(world)
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    replicated = {(n, "v_col") for n in matrices} if v_norm == "rank1" else set()
    ranks = check_sharded(lambda g: Adam4bit(g, v_norm=v_norm, **OPTIONS), shapes, ROLES, replicated,
                          rows_cls=ShapeRows, world=world, exact=True)
    _check_kept_shapes(ranks, world)

    params, opt, _ = ranks[0]
    state = {n: opt.state[p] for n, p in params.items()}
    v = {"v_row", "v_col"} if v_norm == "rank1" else {"v_scale"}
    assert all(set(state[n]) == {"step", "m_codes", "m_scale", "v_codes"} | v for n in matrices)
    assert set(state["conv.weight"]) >= {"v_scale"} and set(state["norm.weight"]) >= {"v_scale"}  # block v
    assert set(state["bias"]) == {"step", "exp_avg", "exp_avg_sq"}  # 2 < threshold: fp32 moments
    assert state["q_proj.weight"]["m_codes"].dtype == torch.uint8
    assert state["q_proj.weight"]["m_codes"].shape == (ranks[0][0]["q_proj.weight"].shape[0], 5)

    # Bytes: every per-rank field is a slice of the unsharded one; the replicated v_col is held on every rank.
    unsharded = Adam4bit([{"params": [torch.nn.Parameter(torch.zeros(s))], "role": ROLES[n], "names": [n]}
                          for n, s in shapes.items()], v_norm=v_norm, **OPTIONS)
    for group in unsharded.param_groups:
        group["params"][0].grad = torch.ones_like(group["params"][0])
    unsharded.step()
    copies = sum(storage_bytes(opt.state[params[n]][k] for n, k in replicated) for params, opt, _ in ranks[1:])
    assert sum(optimizer_state_bytes(opt) for _, opt, _ in ranks) == optimizer_state_bytes(unsharded) + copies


def test_rank1_column_maxima_need_the_all_reduce():
    """The check above can fail: column maxima over the local rows only (no MAX all-reduce) are wrong."""
    class LocalMax(ThreadRows):
        def max(self, t):
            return t

    with pytest.raises(AssertionError, match="q_proj"):
        check_sharded(lambda g: Adam4bit(g, **OPTIONS), {"q_proj.weight": (7, 10), "lm_head.weight": (1, 8)},
                      ROLES, {("q_proj.weight", "v_col"), ("lm_head.weight", "v_col")}, rows_cls=LocalMax,
                      exact=True)


def test_1d_shards_off_the_block_grid_differ_slightly_and_stay_consistent():
    """A 1-D tensor's shard is encoded in flat blocks of its own (docs/optimizers/adam4bit.md, Distributed): 9 elements
    on 2 ranks (5/4) start the second
    shard at 5, not a multiple of 4, so its blocks differ from the unsharded ones: close, not bitwise. The kept
    codes (3 + 2 bytes) and scales (2 + 1) still form Shard(0) tensors of 5 and 3 entries."""
    gen = torch.Generator().manual_seed(0)
    init, grads = torch.randn(9, generator=gen), [torch.randn(9, generator=gen) for _ in range(3)]

    def train(rows=None):
        p = torch.nn.Parameter(init.clone() if rows is None else rows.mine(init).clone())
        opt = Adam4bit([{"params": [p], "role": "vector", "names": ["norm.weight"]}], lr=1e-2, block_size=4,
                       threshold=8)
        for g in grads:
            if rows is None:
                p.grad = g
                opt.step()
            else:
                opt.update(p.data, rows.mine(g), opt.state[p], opt.param_groups[0], rows)
        return p.detach(), rows

    def rank(r, hub):
        return train(ShapeRows(9, r, hub))

    ranks = run_ranks(2, rank)
    joined, want = torch.cat([p for p, _ in ranks]), train()[0]
    assert not torch.equal(joined, want) and _rel(joined, want) < 1e-3
    assert [rows.kept_shapes for _, rows in ranks] == [[(5,), (3,), (5,), (3,)]] * 2
    assert [[t.shape[0] for t in rows.kept] for _, rows in ranks] == [[3, 2, 3, 2], [2, 1, 2, 1]]


def test_flat_partition_of_a_matrix_gets_block_v_and_one_warning(monkeypatch):
    """DeepSpeed ZeRO hands the optimizer one flat 1-D partition per param group, roles kept: rank-1 v needs rows and
    columns, so such a partition gets block v (docs/optimizers/adam4bit.md, Distributed) and the process is told once."""
    monkeypatch.setattr(adam4bit, "_warned", set())
    flat = [torch.nn.Parameter(torch.randn(4096)) for _ in range(3)]
    opt = Adam4bit([{"params": flat[:1], "role": "matrix", "names": ["model.layers.0.mlp.up_proj.weight"]},
                    {"params": flat[1:2], "role": "embedding", "names": ["model.embed_tokens.weight"]},
                    {"params": flat[2:], "role": "vector", "names": ["model.norm.weight"]}], lr=1e-3)
    for p in flat:
        p.grad = torch.randn(4096)
    with pytest.warns(UserWarning, match=r"flat 1-D partition .* block normalisation \(B128/Linear\)") as caught:
        opt.step()
        opt.step()
    assert len([w for w in caught if "adam4bit" in str(w.message)]) == 1
    assert all("v_scale" in opt.state[p] and "v_row" not in opt.state[p] for p in flat)

    monkeypatch.setattr(adam4bit, "_warned", set())
    quiet = [torch.nn.Parameter(torch.randn(4096)) for _ in range(2)]
    opts = [Adam4bit([{"params": quiet[:1], "role": "matrix", "names": ["w"]}], lr=1e-3, v_norm="block"),  # asked
            Adam4bit([{"params": quiet[1:], "role": "vector", "names": ["norm"]}], lr=1e-3)]  # 1-D by nature
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p, o in zip(quiet, opts):
            p.grad = torch.randn(4096)
            o.step()
