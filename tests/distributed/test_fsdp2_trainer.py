"""HF Trainer + ``configs/accelerate/fsdp2.yaml`` on 2 CPU ranks, every optimizer registered as FSDP2-exact.

FSDP2 really shards (the report's engine, per-rank state), each optimizer's Trainer run equals 1 process on the
same global batch, and resuming from the distributed (DCP) checkpoint ends exactly where the uninterrupted run
does — with the optimizer built before accelerate swaps in the sharded parameters, as HF Trainer does. One
launch runs every optimizer (tests/distributed/trainer_resume_worker.py).
"""
import pytest

from memtrain.optim.registry import get_spec, optimizer_names

from .launch import trainer_runs

FSDP2 = [n for n in optimizer_names() if get_spec(n).fsdp2]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1 process on the same global batch (8 sequences per step) as 2 ranks × 4."""
    return trainer_runs(tmp_path_factory.mktemp("single"), "single", FSDP2, batch=8, resume=False)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp2")
    return trainer_runs(workdir, "fsdp2", FSDP2) | {"_workdir": workdir}


@pytest.mark.parametrize("name", FSDP2)
def test_fsdp2_trainer_equals_one_process_and_resumes_exactly(fsdp2, single, name):
    first, resumed, reference = fsdp2[name]["first"], fsdp2[name]["resumed"], single[name]["first"]
    assert first["engine"] == "FSDP" and first["world_size"] == 2  # not silently DDP (accelerate_cpu.py)
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
