"""scale, adafactor and slimadam on FSDP2 row blocks, without torchrun: 3 simulated ranks (tests/unit/thread_rows.py)
update their rows of each parameter with the method's collectives; the joined result must equal one unsharded
optimizer, the state must be placed as the pages' Distributed sections say (per-rank rows via ``Rows.keep``, replicated
statistics as
plain tensors bitwise identical on every rank), and an empty shard (a rank with 0 rows) must work.

Shapes are chosen for 3 ranks (torch.chunk split): 7 rows -> 3/3/1, 5 -> 2/2/1, 4 -> 2/2/0 (an empty shard),
3 -> 1/1/1, 2 -> 1/1/0 (an empty 1-D shard). The real 2-rank FSDP2 run is tests/distributed/test_parity.py."""
import pytest
import torch
from torch import nn

from memtrain.optim.adafactor import Adafactor
from memtrain.optim.scale import SCALE
from memtrain.optim.slimadam import SlimAdam

from .thread_rows import ThreadRows, run_ranks

WORLD, STEPS = 3, 3


def _groups(params: dict[str, nn.Parameter], roles: dict[str, str]) -> list[dict]:
    return [{"params": [p], "role": roles[name], "names": [name]} for name, p in params.items()]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_sharded(make_opt, shapes: dict[str, tuple], roles: dict[str, str], replicated: set[tuple[str, str]],
                  rows_cls=ThreadRows, world: int = WORLD, exact: bool = False, tol: float = 1e-6,
                  windowed: bool = False):
    """Run STEPS steps unsharded and on ``world`` simulated ranks; compare parameters and state (to ``tol``
    relative, or bitwise with ``exact``).

    ``replicated``: the (param name, state key) pairs that must be plain tensors identical on every rank; every
    other state tensor must hold this rank's rows and be stored through ``Rows.keep``. ``windowed``: the method's
    own matrices go through ``update_window`` together, as ``step()`` hands them over under FSDP2."""
    def same(a, b):
        return torch.equal(a, b) if exact else _rel(a, b) < tol

    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    # Row scales differ a lot, so a column statistic taken over one rank's rows only would be visibly wrong.
    grads = [{n: torch.randn(s, generator=gen) * torch.logspace(-2, 1, s[0]).reshape(-1, *[1] * (len(s) - 1))
              for n, s in shapes.items()} for _ in range(STEPS)]

    ref = {n: nn.Parameter(t.clone()) for n, t in init.items()}
    ref_opt = make_opt(_groups(ref, roles))
    for step in range(STEPS):
        for n, p in ref.items():
            p.grad = grads[step][n].clone()
        ref_opt.step()

    def rank(r, hub):
        rows = {n: rows_cls(s[0], r, hub, owner=i) for i, (n, s) in enumerate(shapes.items())}
        params = {n: nn.Parameter(rows[n].mine(t).clone()) for n, t in init.items()}
        opt = make_opt(_groups(params, roles))
        with torch.no_grad():
            for step in range(STEPS):  # what step_param does for a DTensor, with the simulated Rows
                for group in opt.param_groups:
                    if windowed and group["method"] == opt.name:
                        names = group["names"]
                        opt.update_window(group["params"], [rows[n].mine(grads[step][n]) for n in names],
                                          [opt.state[p] for p in group["params"]], [rows[n] for n in names], group)
                        continue
                    for p, n in zip(group["params"], group["names"]):
                        opt._update_fn(group)(p, rows[n].mine(grads[step][n]), opt.state[p], group, rows[n])
        return params, opt, rows

    ranks = run_ranks(world, rank)
    assert any(p.shape[0] == 0 for params, _, _ in ranks for p in params.values()), "no empty shard exercised"
    for n, p in ref.items():
        joined = torch.cat([params[n].detach() for params, _, _ in ranks])
        assert same(joined, p.detach()), n
        assert _rel(joined, init[n]) > 1e-4, n  # it trained
        ref_state = ref_opt.state[p]
        for key, want in ref_state.items():
            if not torch.is_tensor(want):
                assert all(opt.state[params[n]][key] == want for params, opt, _ in ranks), (n, key)
                continue
            got = [opt.state[params[n]][key] for params, opt, _ in ranks]
            kept = [rows[n].is_kept(t) for (_, _, rows), t in zip(ranks, got)]
            if (n, key) in replicated:
                assert not any(kept), f"{n}.{key} is replicated, must not be stored with Rows.keep"
                assert all(torch.equal(t, got[0]) for t in got), f"{n}.{key} differs across ranks"
                assert same(got[0], want), (n, key)
            else:
                assert all(kept), f"{n}.{key} holds this rank's rows and must be stored with Rows.keep"
                assert same(torch.cat(got), want), (n, key)
    return ranks


def test_scale_rows_local_head_momentum_sharded_embedding_columns_all_reduced():
    shapes = {"q_proj.weight": (7, 6), "embed_tokens.weight": (4, 5), "lm_head.weight": (5, 6), "norm.weight": (5,),
              "bias": (2,)}
    roles = {"q_proj.weight": "matrix", "embed_tokens.weight": "embedding", "lm_head.weight": "head",
             "norm.weight": "vector", "bias": "vector"}
    ranks = check_sharded(lambda g: SCALE(g, lr=0.05, weight_decay=0.1, adam_lr=0.01), shapes, roles, set())
    opt = ranks[0][1]
    assert {g["names"][0]: g["branch"] for g in opt.param_groups}["embed_tokens.weight"] == "columns"


def test_scale_embedding_columns_need_the_all_reduce():
    """The check above can fail: a column RMS over the local rows only (no all-reduce) is far off."""
    class LocalRows(ThreadRows):
        def column_mean(self, x):
            return x.mean(dim=0, keepdim=True)  # wrong under sharding: this rank's rows only

    with pytest.raises(AssertionError, match="embed_tokens"):
        check_sharded(lambda g: SCALE(g, lr=0.05), {"embed_tokens.weight": (4, 5), "lm_head.weight": (4, 5)},
                      {"embed_tokens.weight": "embedding", "lm_head.weight": "head"}, set(), rows_cls=LocalRows)


ADAFACTOR_SHAPES = {"q_proj.weight": (7, 6), "embed_tokens.weight": (4, 5), "norm.weight": (5,), "bias": (2,),
                    "conv.weight": (3, 4, 5), "narrow.weight": (7, 2)}
ADAFACTOR_ROLES = {"q_proj.weight": "matrix", "embed_tokens.weight": "embedding", "norm.weight": "vector",
                   "bias": "vector", "conv.weight": "other", "narrow.weight": "matrix"}


@pytest.mark.parametrize("options", [
    dict(lr=1e-2, beta1=0.9, scale_parameter=True, weight_decay=0.1),  # RMS(p) all-reduced, momentum sharded
    dict(lr=None, relative_step=True, scale_parameter=True),
    dict(lr=3e-2),  # the Trainer default: clipping is the only scalar all-reduce
], ids=["momentum-scale_parameter-decay", "relative_step", "trainer_default"])
def test_adafactor_row_factor_local_column_factor_replicated(options):
    # min_dim_to_factor=3 leaves narrow.weight ([7, 2]) unfactored: decided on the global shape, on every rank
    ranks = check_sharded(lambda g: Adafactor(g, min_dim_to_factor=3, **options), ADAFACTOR_SHAPES, ADAFACTOR_ROLES,
                          replicated={("q_proj.weight", "exp_avg_sq_col"), ("embed_tokens.weight", "exp_avg_sq_col")})
    for params, opt, _ in ranks:
        assert set(opt.state[params["narrow.weight"]]) >= {"exp_avg_sq"}  # unfactored on every rank
        # a matrix's column statistic is [n] on every rank; a 3-D tensor's is per leading index, sharded
        assert opt.state[params["q_proj.weight"]]["exp_avg_sq_col"].shape == (6,)
        assert opt.state[params["conv.weight"]]["exp_avg_sq_col"].shape == (params["conv.weight"].shape[0], 5)


def test_slimadam_fan_in_local_fan_out_all_reduced_and_replicated():
    shapes = {"self_attn.q_proj.weight": (7, 6), "self_attn.v_proj.weight": (4, 6), "embed_tokens.weight": (5, 6),
              "norm.weight": (5,), "bias": (2,)}
    roles = {"self_attn.q_proj.weight": "matrix", "self_attn.v_proj.weight": "matrix",
             "embed_tokens.weight": "embedding", "norm.weight": "vector", "bias": "vector"}
    ranks = check_sharded(lambda g: SlimAdam(g, lr=1e-2, weight_decay=0.1), shapes, roles,
                          replicated={("self_attn.v_proj.weight", "exp_avg_sq")})
    params, opt, _ = ranks[0]
    rules = {g["names"][0]: g["compress_dims"] for g in opt.param_groups}
    assert rules == {"self_attn.q_proj.weight": (1,), "self_attn.v_proj.weight": (0,),
                     "embed_tokens.weight": (1,), "norm.weight": None, "bias": None}
    assert opt.state[params["self_attn.v_proj.weight"]]["exp_avg_sq"].shape == (1, 6)  # one value per column
    assert opt.state[params["self_attn.q_proj.weight"]]["exp_avg_sq"].shape == (3, 1)  # this rank's rows
