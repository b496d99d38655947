"""scripts/finetune.py end to end: pretrain a tiny model with scripts/pretrain.py, then fine-tune it on a different
local text with each adapter; held-out perplexity on that text drops, the adapter round-trips, and the merged
plain model gives the adapter model's logits."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from memtrain.recipes.data import build_lm_data
from memtrain.recipes.finetune import load_finetuned

from .finetune_text import TEXT
from .reference_run import token_weighted_loss

pytestmark = pytest.mark.slow  # every test fine-tunes a model pretrained by the module fixture

ROOT = Path(__file__).resolve().parents[2]
MICRO = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 128, "vocab_size": 4096,
         "tie_word_embeddings": False, "use_cache": False}
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seq_len", "32",
          "--logging_steps", "4"]


def script_main(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    (root / "micro.json").write_text(json.dumps(MICRO))
    (root / "lighthouse.txt").write_text(TEXT)
    script_main("pretrain")([
        "--model", str(root / "micro.json"), "--output_dir", str(root / "base"), "--max_steps", "12",
        "--max_train_samples", "256", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
        "--learning_rate", "3e-3", *COMMON])
    assert (root / "base" / "model.safetensors").exists() and (root / "base" / "tokenizer.json").exists()
    return root


def finetune(workdir, out, adapter, *extra):
    script_main("finetune")([
        "--model_name_or_path", str(workdir / "base"), "--dataset", str(workdir / "lighthouse.txt"),
        "--val_fraction", "0.2", "--adapter", adapter, "--lora_r", "4", "--max_steps", "8",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--output_dir", str(out), *COMMON, *extra])
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("adapter", ["lora", "gradnormlorp", "lorapro", "allora"])
def test_finetune_lowers_perplexity_saves_and_merges(workdir, tmp_path, adapter):
    report = finetune(workdir, tmp_path, adapter, "--merge")
    assert report["adapter"] == adapter
    # The report's held-out losses are the base's and the saved adapter model's token-weighted NLL, computed here.
    held_out = build_lm_data(str(workdir / "lighthouse.txt"), tokenizer=str(workdir / "base"), seq_len=32,
                             val_fraction=0.2).eval
    base = AutoModelForCausalLM.from_pretrained(workdir / "base", local_files_only=True)
    assert report["eval_loss_before"] == pytest.approx(token_weighted_loss(base, held_out)[0], rel=1e-5)
    trainable = report["trainable_parameters"]
    assert 0 < trainable < report["parameters"] // 10
    assert report["adapter_parameters"] == trainable and report["adapter_bytes"] > 4 * trainable
    if adapter == "lorapro":  # full mode: 8 bytes per element of every adapted base weight
        assert report["optimizer_state_bytes"] == 8 * 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # q,o; k,v; mlp
    elif adapter in ("lora", "allora"):
        assert report["optimizer_state_bytes"] == 8 * trainable
    # the saved adapter reloads (custom module re-registered) and the merged plain model matches it
    ids = torch.arange(24).reshape(2, 12) * 37 % 4096
    adapted = load_finetuned(str(workdir / "base"), str(tmp_path)).eval()
    eval_loss, eval_tokens = token_weighted_loss(adapted, held_out)
    assert report["eval_loss"] == pytest.approx(eval_loss, rel=1e-5) and report["eval_tokens"] == eval_tokens
    assert report["eval_loss"] < report["eval_loss_before"] - 0.01, report  # and fine-tuning lowered it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_peft_config_file_and_bad_input(workdir, tmp_path):
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]}))
    report = finetune(workdir, tmp_path / "run", "allora", "--peft_config", str(config), "--max_steps", "2",
                      "--eval_before_training", "false")
    assert report["trainable_parameters"] == 2 * (2 * (64 + 64) + 2 * (64 + 32))
    config.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="lora_alpha=4 .*must equal r=2"):
        finetune(workdir, tmp_path / "bad", "allora", "--peft_config", str(config))
    with pytest.raises(ValueError, match="unknown option 'rank' for adapter lorapro"):
        finetune(workdir, tmp_path / "bad", "lorapro", "--adapter_args", "rank=3")


@pytest.mark.parametrize("adapter", ["lora", "gradnormlorp", "lorapro", "allora"])
def test_trainer_resume_from_checkpoint_is_exact(workdir, tmp_path, adapter):
    """HF checkpoint (adapter weights + optimizer.pt) → resume → the same final adapter, bit for bit."""
    from safetensors.torch import load_file

    quick = ["--max_steps", "4", "--eval_before_training", "false", "--final_eval", "false", "--adapter_args",
             "update_proj_gap=2" if adapter == "gradnormlorp" else ""]
    finetune(workdir, tmp_path / "a", adapter, *quick, "--save_strategy", "steps", "--save_steps", "2")
    finetune(workdir, tmp_path / "b", adapter, *quick, "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2"))
    full, resumed = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_benchmark_mode_tunes_each_entry_and_runs_every_process_once(workdir, tmp_path):
    """``--benchmark`` through memtrain.bench.runner: one process per (entry, lr, seed); an lr grid runs with the
    first seed, its best lr with every seed; a table and its JSON; a repeated command skips the finished runs
    (their job.log is not written again); a bad lr is refused before any run."""
    table = tmp_path / "finetune.md"
    argv = ["--model_name_or_path", str(workdir / "base"), "--dataset", str(workdir / "lighthouse.txt"),
            "--val_fraction", "0.2", "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--output_dir", str(tmp_path / "runs"), "--benchmark", "lora@1e-3,1e-2",
            "--benchmark_seeds", "0", "1", "--benchmark_out", str(table), *COMMON]
    with pytest.raises(ValueError, match="'x' is not a positive learning rate"):
        script_main("finetune")([a if a != "lora@1e-3,1e-2" else "lora@1e-3,x" for a in argv])
    assert not (tmp_path / "runs").exists()
    rows = script_main("finetune")(argv)
    assert [r["entry"] for r in rows] == ["lora@1e-3,1e-2"] and rows[0]["adapter"] == "lora"
    lora = rows[0]
    assert lora["tuned_lr"] == float(min(lora["grid"], key=lora["grid"].get))
    assert lora["edge"] and len(lora["eval_perplexities"]) == 2 and lora["eval_ppl_std"] is not None
    assert lora["eval_perplexities"][0] == min(lora["grid"].values()) == lora["eval_perplexity"]
    assert lora["trainable_parameters"] < lora["parameters"]
    text = table.read_text()
    assert f"| lora | {lora['tuned_lr']:g} (grid edge) |" in text
    assert json.loads(table.with_suffix(".json").read_text())[0]["eval_perplexities"] == lora["eval_perplexities"]
    log = tmp_path / "runs" / "lora_1e-3" / "seed0" / "job.log"
    stamp = log.stat().st_mtime_ns
    again = script_main("finetune")(argv)
    assert all(r["resumed"] for r in again) and log.stat().st_mtime_ns == stamp
    assert [r["eval_perplexities"] for r in again] == [r["eval_perplexities"] for r in rows]
