"""Layer-wise release under DDP with 2 gloo ranks (torchrun): equal to standard DDP and to one process on the
same global batch, for every registered optimizer, with and without gradient accumulation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import memtrain

from .launch import tail, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(worker: str, tmp_path) -> object:
    out = tmp_path / "results.json"
    env = {**os.environ, "LAYERWISE_DDP_OUT": str(out), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name(worker))]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.json"
    proc = torchrun("layerwise_worker.py", "--engine", "ddp", "--out", str(out))
    assert proc.returncode == 0, tail(proc)
    return {(r["name"], r["accumulation"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", memtrain.optimizer_names())
def test_two_rank_layerwise_equals_standard_ddp_and_one_process(results, name, accumulation):
    r = results[(name, accumulation)]
    assert r["replicas_identical"], "the two ranks' parameters drifted apart"
    assert r["released"]
    assert r["vs_standard"]["abs"] <= 1e-6, r
    assert r["vs_single"]["abs"] <= 1e-5, r
    assert r["norms"][0] == pytest.approx(r["norms"][1], rel=1e-5)  # the logged grad norm: the global one


def test_trainer_under_ddp_layerwise_equals_standard(tmp_path):
    """memtrain.Trainer on 2 ranks (accelerate wraps DDP): --layerwise runs backward under no_sync and the hooks
    all-reduce; with accumulation 2 and a schedule it matches standard DDP training bitwise. swan spreads its
    matrix updates over the ranks, bitwise the unspread run."""
    r = _torchrun("layerwise_trainer_ddp_worker.py", tmp_path)
    assert r["world_size"] == 2 and r["replicas_identical"]
    assert r["max_abs_diff"] == 0.0
    assert r["losses"][0] == r["losses"][1] and len(r["losses"][0]) == 4
    # swan through the Trainer: DDP spreads its whitening over the ranks by default (--spread_matrix_updates),
    # bitwise the run that does not
    assert r["swan_spread_active"] == [True, False]
    assert r["swan_spread_max_abs_diff"] == 0.0 and r["swan_losses"][0] == r["swan_losses"][1]
