"""memtrain estimate under FSDP2: each simulated rank (fake process group) holds exactly the optimizer-state bytes
that rank holds in a real 2-rank gloo run of the same steps, and peaks within 2 % of it."""
import json

import pytest

from memtrain import estimate
from memtrain.optim import registry

from .launch import tail, torchrun

#: every optimizer that runs under FSDP2; one that cannot step on fake tensors yet (host syncs in step(), issue 12
#: item 1) is an expected failure until it can
NAMES = [n for n in registry.optimizer_names() if registry.get_spec(n).fsdp2]


@pytest.fixture(scope="module", params=[False, True], ids=["standard", "layerwise"])
def real(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("estimate") / "real.json"
    proc = torchrun("estimate_worker.py", "--out", str(out), "--optims", ",".join(NAMES),
                    *(["--layerwise"] if request.param else []))
    assert proc.returncode == 0, tail(proc)
    return request.param, json.loads(out.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_simulated_ranks_hold_the_real_ranks_state(real, name):
    layerwise, results = real
    ranks = results[name]
    assert all("error" not in r for r in ranks), ranks
    est = estimate.estimate(estimate.Setup(model="llama-tiny", optim=name, batch_size=2, seq_len=64,
                                           engine="fsdp2", world_size=2, layerwise=layerwise))
    if "cannot step on fake tensors" in est.get("error", ""):
        pytest.xfail(f"{name}: {est['error']}")
    assert "error" not in est, est["error"]
    assert [r["optimizer_state_bytes"] for r in est["ranks"]] == [r["optimizer_state_bytes"] for r in ranks]
    for sim, r in zip(est["ranks"], ranks):
        assert sim["params"] == r["params"]
        assert abs(sim["total"] - r["total"]) <= 0.02 * r["total"], (sim, r)
