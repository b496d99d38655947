"""scripts/pretrain.py end to end (plain python, config file, accelerate launch) and the benchmarks' parts."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from memtrain.bench.engines import _cell
from memtrain.bench.optimizers import Entry
from memtrain.bench.runner import first_error
from memtrain.recipes.data import build_lm_data
from memtrain.recipes.models import get_model_config

from .reference_run import token_weighted_loss

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "8", "--logging_steps", "2",
         "--per_device_train_batch_size", "4", "--save_final_model", "false", "--disable_tqdm", "true"]


def run(cmd, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300, **kw)
    return proc


@pytest.mark.slow
def test_pretrain_runs_end_to_end_and_writes_report(tmp_path):
    proc = run([sys.executable, "scripts/pretrain.py", "--optim", "adamw", "--output_dir", str(tmp_path), *QUICK,
                "--save_final_model", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "adamw" and report["global_steps"] == 4
    assert report["optimizer_state_bytes"] == 8 * report["trainable_parameters"]
    assert report["train_tokens"] == 4 * 4 * 128
    # tokens/s leaves out the one step whose memory is tracked by category (docs/estimate.md), as it leaves out eval
    assert report["memory_tracked_step"] is not None
    timed_tokens = report["train_tokens"] - report["train_tokens"] // report["global_steps"]
    timed_seconds = report["train_runtime_s"] - report["memory_tracking_seconds"]
    assert report["tokens_per_second"] == pytest.approx(timed_tokens / timed_seconds, rel=1e-9)
    # The report's eval loss is the saved model's token-weighted NLL over the same 8 eval blocks, computed here.
    data = build_lm_data(seq_len=128, vocab_size=get_model_config("llama-tiny").vocab_size, max_eval_samples=8)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    eval_loss, eval_tokens = token_weighted_loss(model, data.eval)
    assert report["eval_tokens"] == eval_tokens == 8 * 127
    assert report["eval_loss"] == pytest.approx(eval_loss, rel=1e-5)
    assert report["eval_perplexity"] == pytest.approx(math.exp(eval_loss), rel=1e-5)
    assert "memtrain report" in proc.stdout and "token-weighted" in proc.stdout


@pytest.mark.slow
def test_config_file_with_flag_override(tmp_path):
    proc = run([sys.executable, "scripts/pretrain.py", "configs/pretrain/tiny.yaml", "--output_dir", str(tmp_path),
                *QUICK, "--max_steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["global_steps"] == 2 and report["learning_rate"] == 0.001


@pytest.mark.slow
def test_accelerate_launch(tmp_path):
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                "scripts/pretrain.py", "--optim", "adamw", "--output_dir", str(tmp_path), *QUICK])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["global_steps"] == 4


@pytest.mark.slow
def test_unknown_optimizer_and_config_key_fail_clearly(tmp_path):
    proc = run([sys.executable, "scripts/pretrain.py", "--optim", "adamz", "--output_dir", str(tmp_path)])
    assert proc.returncode != 0 and "unknown optimizer 'adamz'" in proc.stderr and "adamw_torch" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: adamw\nlearning_rte: 0.1\n")
    proc = run([sys.executable, "scripts/pretrain.py", str(bad)])
    assert proc.returncode != 0 and "learning_rte" in proc.stderr


@pytest.mark.slow
def test_list_optimizers():
    proc = run([sys.executable, "scripts/pretrain.py", "--list_optimizers"])
    assert proc.returncode == 0 and "adamw" in proc.stdout and "baseline" in proc.stdout


def test_benchmark_entries():
    """Entry syntax of ``--optims``; the tuned pipeline and its summary are tested in tests/unit/test_bench.py."""
    e = Entry.parse("galore:rank=32,update_proj_gap=50@0.01")
    assert (e.optim, e.optim_args, e.lr) == ("galore", "rank=32,update_proj_gap=50", 0.01)
    assert Entry.parse("adamw") == Entry("adamw", "adamw", "", None)
    with pytest.raises(ValueError, match="learning rate"):
        Entry.parse("adamw@fast")


def test_engine_benchmark_cells():
    stderr = ("[rank0]:     raise ValueError(\n[rank0]: ValueError: optimizer 'swan' needs each weight's matrix shape\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert first_error(stderr) == "ValueError: optimizer 'swan' needs each weight's matrix shape"
    assert first_error("all fine\n") is None
    assert _cell({"error": "ValueError: no"}, {}, None) == {"refused": "ValueError: no"}
    reference = {"eval_loss": 4.0, "optimizer_state_bytes": 800}
    report = {"eval_loss": 4.002, "optimizer_state_bytes_per_rank": [400, 400], "optimizer_comm_bytes_per_step": 64.0,
              "tokens_per_second": 90.0}
    cell = _cell(report, reference, {"tokens_per_second": 100.0})
    assert cell == {"eval_loss_rel_diff": pytest.approx(5e-4), "state_bytes_per_rank": 400,
                    "state_fraction_of_one_process": 0.5, "comm_bytes_per_step": 64.0, "tokens_per_s": 90.0,
                    "tokens_per_s_vs_adamw": pytest.approx(0.9)}
    assert _cell(report, reference, {"error": "refused"})["tokens_per_s_vs_adamw"] is None


def test_bench_preset_end_to_end_then_resumed(tmp_path):
    """``memtrain bench --preset``: a real run through the runner (progress from HF's bar, report.json), the
    report files, and a repeated command that trains nothing."""
    preset = tmp_path / "p.yaml"
    preset.write_text(f"""
name: e2e
model: llama-tiny
max_steps: 2
eval_steps: 1
seeds: [0]
flags: {{max_train_samples: 16, max_eval_samples: 4, per_device_train_batch_size: 4}}
out_dir: {tmp_path / 'docs'}
work_dir: {tmp_path / 'runs'}
optimizers:
  mine:
    optimizer: adamw
    grid: {{lr: [2.0e-3]}}
""")
    proc = run([sys.executable, "-m", "memtrain", "bench", "--preset", str(preset)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/1] mine lr=0.002 seed 0: step 2/2" in proc.stderr and "done: eval ppl" in proc.stderr
    data = json.loads((tmp_path / "docs" / "e2e.json").read_text())
    row = data["rows"][0]
    report = json.loads((tmp_path / "runs" / "e2e" / "mine" / "lr=0.002-seed0" / "report.json").read_text())
    assert row["label"] == "mine" and row["baseline"] and row["ppl_ratio_mean"] == 1.0
    assert row["eval_ppl_per_seed"] == [report["eval_perplexity"]] and report["learning_rate"] == 0.002
    assert row["state_bytes"] == 8 * report["trainable_parameters"] and report["global_steps"] == 2
    assert [h["step"] for h in report["eval_history"]] == [0, 1, 2, 2]
    assert (tmp_path / "docs" / "e2e.png").stat().st_size > 0 and (tmp_path / "docs" / "e2e-memory.png").exists()
    assert "| `mine` | lr=0.002 |" in (tmp_path / "docs" / "e2e.md").read_text()
    again = run([sys.executable, "-m", "memtrain", "bench", "--preset", str(preset)])
    assert again.returncode == 0 and "finished earlier, skipped" in again.stderr and "step" not in again.stderr
