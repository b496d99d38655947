"""HF Trainer + the ``fsdp2`` engine config on 2 CPU ranks, every optimizer registered as FSDP2-exact.

FSDP2 really shards (the report's engine, per-rank state), each optimizer's Trainer run equals 1 process on the
same global batch, and resuming from the distributed (DCP) checkpoint ends exactly where the uninterrupted run
does — with the optimizer built before accelerate swaps in the sharded parameters, as HF Trainer does. Layer-wise
release (adamw, galore) equals the same run without it and resumes exactly. One launch runs every optimizer
(tests/distributed/trainer_resume_worker.py).
"""
import json

import pytest

from memtrain.optim.registry import get_spec, optimizer_names

from .launch import trainer_runs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FSDP2 = [n for n in optimizer_names() if get_spec(n).fsdp2]
#: Layer-wise release through the Trainer (a matrix method and an elementwise one), each with its reference: the
#: same run without layer-wise release, both with accumulation 2 and max_grad_norm 0 (trainer_resume_worker.py).
LAYERWISE = ["adamw", "galore"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1 process on the same global batch (8 sequences per step) as 2 ranks × 4."""
    return trainer_runs(tmp_path_factory.mktemp("single"), "single", FSDP2, batch=8, resume=False)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp2")
    variants = [f"{n}+{v}" for n in LAYERWISE for v in ("layerwise", "standard")]
    return trainer_runs(workdir, "fsdp2", FSDP2 + variants) | {"_workdir": workdir}


@pytest.mark.parametrize("name", FSDP2)
def test_fsdp2_trainer_equals_one_process_and_resumes_exactly(fsdp2, single, name):
    first, resumed, reference = fsdp2[name]["first"], fsdp2[name]["resumed"], single[name]["first"]
    assert first["engine"] == "FSDP" and first["world_size"] == 2  # not silently DDP (memtrain/hf/engines.py)
    assert (fsdp2["_workdir"] / name / "first" / "checkpoint-2" / "optimizer_0").is_dir()  # distributed checkpoint
    assert first["eval_tokens"] == reference["eval_tokens"]  # token-weighted eval covers the set once across ranks
    assert first["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    # Sharded for real: both ranks hold the same amount, less than one process; adamw exactly half its 8 B/param.
    per_rank = first["optimizer_state_bytes_per_rank"]
    assert per_rank[0] == per_rank[1] and 0 < per_rank[0] < reference["optimizer_state_bytes"]
    if name == "adamw":
        assert per_rank == [4 * first["trainable_parameters"]] * 2
    # Counted: every matrix-aware method all-reduces or gathers some statistic; elementwise adamw needs nothing.
    assert (first["optimizer_comm_bytes_per_step"] > 0) == (name != "adamw")


def _logged_grad_norms(run_dir):
    state = json.loads((run_dir / "first" / "checkpoint-2" / "trainer_state.json").read_text())
    return [h["grad_norm"] for h in state["log_history"] if "grad_norm" in h]


@pytest.mark.parametrize("name", LAYERWISE)
def test_fsdp2_trainer_layerwise_equals_standard_and_resumes_exactly(fsdp2, name):
    """HF Trainer builds the optimizer before accelerate swaps in the sharded parameters; memtrain's Trainer hooks the
    new ones (ensure_hooks), so the update runs in backward: the logged norm exists before step() and is the global
    norm HF computes over the DTensor gradients of the standard run."""
    layerwise, standard = fsdp2[f"{name}+layerwise"], fsdp2[f"{name}+standard"]
    assert layerwise["first"]["engine"] == "FSDP" and layerwise["first"]["world_size"] == 2
    assert layerwise["first"]["eval_loss"] == pytest.approx(standard["first"]["eval_loss"], rel=1e-6)
    assert layerwise["resumed"]["eval_loss"] == layerwise["first"]["eval_loss"]
    assert layerwise["first"]["optimizer_state_bytes_per_rank"] == standard["first"]["optimizer_state_bytes_per_rank"]
    norms = _logged_grad_norms(fsdp2["_workdir"] / f"{name}+layerwise")
    reference = _logged_grad_norms(fsdp2["_workdir"] / f"{name}+standard")
    assert len(norms) == 2 and norms == pytest.approx(reference, rel=1e-5)
