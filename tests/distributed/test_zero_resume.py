"""DeepSpeed ZeRO-1/3 through HF Trainer: resuming a 2-rank run from its DeepSpeed checkpoint restores the
partitioned optimizer state exactly, so the resumed run ends where the uninterrupted one does."""
import json

import pytest

from memtrain.models import build_model

from .launch import accelerate_launch, tail

QUICK = ["--optim", "adamw", "--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "8",
         "--per_device_train_batch_size", "4", "--save_final_model", "false", "--disable_tqdm", "true",
         "--seed", "0", "--data_seed", "0", "--ddp_timeout", "120"]


@pytest.mark.parametrize("stage", [1, 3])  # ZeRO-2 shares stage 1's checkpoint code and runs in test_engines
def test_zero_resume_continues_the_uninterrupted_run(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    init = tmp_path / "init"  # ZeRO-3 builds partitioned models: start both runs from the same saved weights
    build_model("llama-tiny", seed=0).save_pretrained(init)
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    proc = accelerate_launch(f"zero{stage}", "--output_dir", str(first), "--model", str(init), *QUICK,
                             "--save_strategy", "steps", "--save_steps", "2")
    assert proc.returncode == 0, tail(proc)
    checkpoint = first / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's own partitioned checkpoint
    proc = accelerate_launch(f"zero{stage}", "--output_dir", str(resumed), "--model", str(init), *QUICK,
                             "--resume_from_checkpoint", str(checkpoint))
    assert proc.returncode == 0, tail(proc)
    straight, again = (json.loads((d / "report.json").read_text()) for d in (first, resumed))
    assert again["engine"] == "DEEPSPEED" and again["world_size"] == 2
    assert again["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6)
