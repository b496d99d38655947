"""Every registered optimizer on 2 gloo ranks (DDP and FSDP2) equals 1 rank on the same global batch."""
import json

import pytest

import memtrain
from memtrain.optim.registry import get_spec

from .launch import tail, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NAMES = memtrain.optimizer_names()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "results.json"
    proc = torchrun("parity_worker.py", "--out", str(out))
    assert proc.returncode == 0, tail(proc)
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_ddp_two_ranks_equal_one_rank(results, name):
    r = results[f"{name}/ddp"]
    assert "error" not in r, r.get("trace")
    assert r["max_rel_diff"] < 1e-5
    assert r["state_bytes_per_rank"][0] == r["state_bytes_per_rank"][1]  # DDP replicates the state


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_two_ranks_equal_one_rank_with_sharded_state(results, name):
    r = results[f"{name}/fsdp2"]
    if not get_spec(name).fsdp2:
        assert "error" in r and "FSDP2" in r["error"], r
        return
    assert "error" not in r, r.get("trace")
    assert r["max_rel_diff"] < 1e-5
    ddp = results[f"{name}/ddp"]["state_bytes_per_rank"][0]
    # State with the parameter's rows is sharded like the parameter: each rank holds 1/world of it (the tiny
    # model's dims split evenly). Replicated items (column statistics, right-side projectors; documented per
    # method) are held whole on every rank, so they count once in the unsharded total.
    replicated = r["replicated_state_bytes_per_rank"]
    assert replicated[0] == replicated[1]
    assert sum(r["state_bytes_per_rank"]) - replicated[0] == ddp
    assert r["state_bytes_per_rank"][0] == r["state_bytes_per_rank"][1]


SPREADING = [n for n in NAMES if getattr(get_spec(n).cls, "spreads", False)]


def test_the_costly_matrix_methods_spread():
    assert sorted(SPREADING) == ["muon", "swan"]


@pytest.mark.parametrize("name", SPREADING)
def test_ddp_spread_over_ranks_is_bitwise_ddp_with_half_the_updates_each(results, name):
    """``spread_over_ranks``: each of the 2 ranks updates half of the matrices (of every shape) and broadcasts
    them (the other rank updates only the state: muon's momentum); the result is bitwise DDP's without spreading,
    and each matrix is sent once per step."""
    r = results[f"{name}/ddp-spread"]
    assert "error" not in r, r.get("trace")
    assert r["bitwise_equal_to_ddp"]
    assert r["max_rel_diff"] < 1e-5
    assert r["matrices_updated_per_rank"] == [r["matrices"] // 2] * 2
    assert r["comm_bytes_per_step"] == {"broadcast": r["matrix_bytes"]}
