"""HF Trainer + accelerate configs on 2 CPU ranks: FSDP2 really shards and resumes exactly from a sharded
checkpoint; DeepSpeed ZeRO-2/3 run elementwise optimizers exactly; matrix methods refuse flat partitions."""
import json

import pytest

from memtrain.models import build_model
from memtrain.optim.registry import get_spec, optimizer_names

from .launch import accelerate_launch, tail

QUICK = ["--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "1",
         "--per_device_train_batch_size", "4", "--save_final_model", "false", "--disable_tqdm", "true",
         "--seed", "0", "--data_seed", "0", "--ddp_timeout", "120"]


def report(path):
    return json.loads((path / "report.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def saved_init(tmp_path_factory):
    """Every run starts from the same saved weights: ZeRO-3 initialises fresh models partitioned
    (deepspeed.zero.Init), which draws different random numbers than a plain init."""
    path = tmp_path_factory.mktemp("init")
    build_model("llama-tiny", seed=0).save_pretrained(path)
    QUICK.extend(["--model", str(path)])
    yield path
    del QUICK[-2:]


@pytest.fixture(scope="module")
def single(tmp_path_factory, saved_init):
    """1 process on the same global batch (8 sequences per step) as 2 ranks × 4."""
    out = tmp_path_factory.mktemp("single")
    batch = QUICK.index("--per_device_train_batch_size") + 1
    quick = [("8" if i == batch else a) for i, a in enumerate(QUICK)]
    proc = accelerate_launch("single", "--output_dir", str(out), *quick)
    assert proc.returncode == 0, tail(proc)
    return report(out)


def test_fsdp2_shards_and_resumes_from_sharded_checkpoint(tmp_path, single):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    proc = accelerate_launch("fsdp2", "--output_dir", str(straight), *QUICK)
    assert proc.returncode == 0, tail(proc)
    r = report(straight)
    assert r["engine"] == "FSDP" and r["world_size"] == 2
    # Sharded for real: each rank holds half of adamw's 8 B/param.
    assert r["optimizer_state_bytes_per_rank"] == [4 * r["trainable_parameters"]] * 2
    assert r["eval_tokens"] == single["eval_tokens"]  # token-weighted eval covers the set once across ranks
    assert r["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)

    proc = accelerate_launch("fsdp2", "--output_dir", str(first), *QUICK, "--save_strategy", "steps", "--save_steps", "2")
    assert proc.returncode == 0, tail(proc)
    assert (first / "checkpoint-2" / "optimizer_0").is_dir()  # distributed (DCP) checkpoint
    proc = accelerate_launch("fsdp2", "--output_dir", str(resumed), *QUICK,
                             "--resume_from_checkpoint", str(first / "checkpoint-2"))
    assert proc.returncode == 0, tail(proc)
    assert report(resumed)["eval_loss"] == pytest.approx(r["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_runs_adamw_exactly(tmp_path, single, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    proc = accelerate_launch(f"zero{stage}", "--output_dir", str(tmp_path), "--optim", "adamw", *QUICK)
    assert proc.returncode == 0, tail(proc)
    r = report(tmp_path)
    assert r["engine"] == "DEEPSPEED" and r["world_size"] == 2
    assert r["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert r["optimizer_state_bytes_per_rank"] == [4 * r["trainable_parameters"]] * 2  # ZeRO partitions it


REFUSED = [n for n in optimizer_names() if not get_spec(n).deepspeed]


@pytest.mark.parametrize("name", REFUSED[:1])
def test_zero_refuses_matrix_methods_before_training(tmp_path, name):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    proc = accelerate_launch("zero2", "--output_dir", str(tmp_path), "--optim", name, *QUICK)
    assert proc.returncode != 0
    assert f"optimizer {name!r} needs each weight's matrix shape" in proc.stderr
    assert "FSDP2" in proc.stderr
