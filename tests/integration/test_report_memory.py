"""The run report's tracked tensor peak by category (one sampled step under metrics.MemoryTracker)."""
import json

import pytest

import memtrain
from memtrain.hf import metrics
from memtrain.hf.report import format_report

from ..conftest import tiny_llama
from .test_trainer import make_args, pattern_dataset


@pytest.mark.parametrize("optim, extra", [
    ("adamw", {}),
    ("adamw_torch", {}),  # an HF optimizer: its step is marked by torch's global optimizer hooks
    ("swan", {"optim_args": "layerwise=true", "gradient_accumulation_steps": 2, "max_grad_norm": 0.0}),
])
def test_report_has_the_tracked_peak_by_category(tmp_path, optim, extra):
    args = make_args(tmp_path, optim=optim, max_steps=4, **extra)
    trainer = memtrain.Trainer(model=tiny_llama(), args=args, train_dataset=pattern_dataset())
    trainer.train()
    report = json.loads((tmp_path / "report.json").read_text())
    by = report["peak_memory_by_category"]
    assert report["memory_tracked_step"] == 2  # the first step that starts with the optimizer state in place
    assert by["params"] == report["weight_bytes"]
    assert by["state"] == report["optimizer_state_bytes"] > 0  # nothing is created after step 1
    assert by["total"] == report["tracked_peak_memory_bytes"] == sum(by[c] for c in metrics.MEMORY_CATEGORIES)
    assert by["activations"] > 0 and report["peak_memory_phase"] in ("forward", "backward", "step",
                                                                     "step (layer-wise, in backward)")
    if "gradient_accumulation_steps" not in extra:  # without release every gradient exists at the peak
        assert by["grads"] in (0, report["gradient_bytes"])
    assert report["peak_memory_kind"] == "cpu_peak_rss" and report["peak_memory_bytes"] > by["total"]
    assert report["memory_tracking_seconds"] > 0 and report["tokens_per_second"] > 0
    assert report["train_tokens"] == 4 * 8 * 16 * args.gradient_accumulation_steps
    assert "tensor peak" in format_report(report)
