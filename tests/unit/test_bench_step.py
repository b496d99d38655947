"""``memtrain bench step``: one round on llama-tiny gives every row a time and exact state bytes; bad entries are
refused before a model is built."""
from __future__ import annotations

import json

import pytest

from memtrain.bench import step
from memtrain.optim import UnknownOptimizerError
from memtrain.recipes.models import build_model


def test_one_round_on_llama_tiny(tmp_path):
    out = tmp_path / "step.md"
    step.main(["--model", "llama-tiny", "--rounds", "1", "--warmup", "1", "--optims", "adamw", "sinkgd",
               "--references", "torch-adamw", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["adamw", "torch-adamw", "sinkgd"]  # the reference right under its method
    for row in rows.values():
        assert row["status"] == "ok"
        assert len(row["wall_ms"]) == len(row["cpu_ms"]) == 1 and row["wall_ms"][0] > 0
        assert row["median_ms"] == row["min_ms"] == row["wall_ms"][0]
    assert rows["adamw"]["reference"] == "torch-adamw" and rows["adamw"]["x_reference"] > 0
    assert rows["torch-adamw"]["x_adamw_foreach"] == 1.0
    assert rows["sinkgd"]["x_reference"] is None

    model = build_model("llama-tiny")
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    assert report["parameters"] == numel
    # memtrain's AdamW: two fp32 moments, its step count a Python int; torch's adds a 0-d fp32 step per tensor
    assert rows["adamw"]["state_bytes"] == 8 * numel
    assert rows["adamw"]["state_bytes_per_param"] == 8.0
    assert rows["torch-adamw"]["state_bytes"] == 8 * numel + 4 * len(params)

    page = out.read_text().splitlines()
    assert page[1].startswith("`memtrain bench step --model llama-tiny")  # the command on the second line
    assert any(line.startswith("| adamw | torch AdamW (foreach) |") for line in page)


def test_bad_entries_are_refused_before_anything_runs(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the entries were checked")

    monkeypatch.setattr(step, "build_model", no_model)
    out = tmp_path / "step.md"
    with pytest.raises(UnknownOptimizerError, match="unknown optimizer 'nosuch'; memtrain optimizers are: .*adamw"):
        step.main(["--optims", "adamw", "nosuch", "--out", str(out)])
    with pytest.raises(ValueError, match="unknown option 'bogus' for optimizer galore"):
        step.main(["--optims", "galore:bogus=1", "--out", str(out)])
    with pytest.raises(ValueError, match="unknown reference\\(s\\) nosuch; references are: torch-adamw"):
        step.main(["--optims", "adamw", "--references", "nosuch", "--out", str(out)])
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_the_default_entries_are_every_optimizer_and_the_variants_next_to_their_method():
    from memtrain.optim import registry
    entries = step.default_entries()
    assert [e.split(":")[0] for e in entries if e not in sum(step.VARIANTS.values(), [])] == \
        [n for n in registry.BUILTINS if n in registry.optimizer_names()]
    assert entries[entries.index("swan") + 1: entries.index("swan") + 4] == \
        ["swan:ns_quintic_steps=3,ns_steps=3", "swan:ns_dtype=bfloat16", "swan:ns_eval=eigh"]
    assert "galore:rank=64" in entries and "fira:rank=64" in entries and "apollo:rank=64" in entries
    assert [e for e in entries if e not in step.default_entries("cuda")] == ["swan:ns_eval=eigh"]  # CPU only
