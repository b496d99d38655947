"""The adapters on 2 gloo ranks (DDP, FSDP2 with block-level units) equal 1 rank on the same global batch."""
import json

import pytest

from .adapter_worker import CASES
from .launch import tail, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "results.json"
    proc = torchrun("adapter_worker.py", "--out", str(out))
    assert proc.returncode == 0, tail(proc)
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_two_ranks_equal_one_rank(results, case, engine):
    r = results[f"{case}/{engine}"]
    if case == "gradnormlorp" and engine == "fsdp2":  # refused loudly, never silently wrong
        assert "error" in r and "FSDP2" in r["error"] and "DDP" in r["error"], r
        return
    assert "error" not in r, r.get("trace")
    assert r["max_rel_diff"] < 1e-6
    per_rank = r["state_bytes_per_rank"]
    assert per_rank[0] == per_rank[1]
    if engine == "fsdp2":  # every adapter state is sharded like its factor (LoRA-Pro: like B's rows)
        assert 2 * per_rank[0] == results[f"{case}/ddp"]["state_bytes_per_rank"][0]


def test_lorapro_fsdp2_communicates_only_factor_sized_tensors(results):
    """docs/adapters/lorapro.md, Distributed, counted: per pair and step A and ∇A are all-gathered (2·r·n fp32), the r×r
    Gram BᵀB and
    each adjustment's Bᵀb are all-reduced in fp64 (8·r² bytes each), and full mode all-reduces BᵀU (r·n fp32).
    Never an m×n tensor. The worker adapts q_proj, v_proj (n = 32) and down_proj (n = 48) of 2 layers at r = 4
    for 4 steps."""
    r, steps, ns = 4, 4, [32, 32, 48] * 2
    gathers = steps * sum(2 * r * n * 4 for n in ns)
    full = results["lorapro/fsdp2"]["comm_bytes"]
    assert full == {"all_gather": gathers, "all_reduce": steps * sum(3 * 8 * r * r + r * n * 4 for n in ns)}
    efficient = results["lorapro_efficient/fsdp2"]["comm_bytes"]
    assert efficient == {"all_gather": gathers, "all_reduce": steps * len(ns) * 2 * 8 * r * r}
