"""memtrain.bench: the shared runner (resume, errors) and the tuned benchmark's pipeline on fake reports
(grid -> best point -> seeds -> best-vs-best rows), with presets and their errors. No training here."""
import json
import math
import sys
import textwrap

import pytest

from memtrain.bench import optimizers as bench
from memtrain.bench import runner

# A stand-in for `memtrain <subcommand>`: writes a report.json from its flags (or fails when asked to).
FAKE_JOB = textwrap.dedent("""
    import json, sys, pathlib
    args = sys.argv[1:]
    flag = lambda name: args[args.index(name) + 1]
    out = pathlib.Path(flag("--output_dir"))
    if "--fail" in args:
        raise ValueError("optimizer 'swan' needs each weight's matrix shape")
    counter = out.parent / "calls"
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
    print(" 3/4 [00:01<00:00, 3.0it/s]", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"eval_perplexity": float(flag("--ppl"))}))
""")


@pytest.fixture
def fake_memtrain(monkeypatch):
    monkeypatch.setattr(runner, "launcher", lambda *sub, engine=None, ranks=None: [sys.executable, "-c", FAKE_JOB])


def test_runner_runs_once_then_skips_the_finished_job(tmp_path, fake_memtrain):
    job = runner.Job(("pretrain",), ("--ppl", "12.5"), tmp_path / "a", label="a", steps=4)
    first = runner.run(job)
    assert first["eval_perplexity"] == 12.5 and first["wall_s"] >= 0 and "resumed" not in first
    assert json.loads((tmp_path / "a" / "job.json").read_text())["key"] == job.key()
    again = runner.run(job)
    assert again["eval_perplexity"] == 12.5 and again["resumed"] is True
    assert (tmp_path / "calls").read_text() == "1"  # not run again
    runner.run(job, resume=False)
    assert (tmp_path / "calls").read_text() == "2"
    # Another flag is another job: same directory, run again, the stamp rewritten.
    changed = runner.Job(("pretrain",), ("--ppl", "11.0"), tmp_path / "a", label="a")
    assert changed.key() != job.key() and runner.finished(changed) is None
    assert runner.run(changed)["eval_perplexity"] == 11.0 and (tmp_path / "calls").read_text() == "3"
    assert runner.finished(job) is None


def test_runner_key_follows_the_files_that_flags_name(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    job = runner.Job(("finetune",), ("--model_name_or_path", str(model)), tmp_path / "out")
    key = job.key()
    assert key == runner.Job(("finetune",), ("--model_name_or_path", str(model)), tmp_path / "elsewhere").key()
    import os

    os.utime(model / "config.json", ns=(1, 1))  # the base model was saved again
    assert job.key() != key


def test_runner_returns_the_first_error_and_does_not_mark_the_job_finished(tmp_path, fake_memtrain):
    job = runner.Job(("pretrain",), ("--ppl", "1", "--fail"), tmp_path / "b", label="b")
    report = runner.run(job)
    assert report["error"] == "ValueError: optimizer 'swan' needs each weight's matrix shape"
    assert not (tmp_path / "b" / "job.json").exists() and runner.finished(job) is None
    stderr = ("[rank0]:     raise ValueError(\n[rank0]: ValueError: no\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert runner.first_error(stderr) == "ValueError: no" and runner.first_error("all fine\n") is None


def test_run_all_keeps_job_order_with_workers(tmp_path, fake_memtrain):
    jobs = [runner.Job(("pretrain",), ("--ppl", str(p)), tmp_path / f"j{p}") for p in (3, 1, 2)]
    assert [r["eval_perplexity"] for r in runner.run_all(jobs, workers=2)] == [3, 1, 2]


def test_launcher_and_flags():
    assert runner.launcher("pretrain")[1:] == ["-m", "memtrain", "pretrain"]
    acc = runner.launcher("pretrain", engine="ddp")
    assert acc[1:3] == ["-m", "accelerate.commands.launch"] and acc[4].endswith("ddp.yaml")
    torchrun = runner.launcher("bench", "layerwise", ranks=2)
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "2" and torchrun[-3:] == ["memtrain", "bench", "layerwise"]
    with pytest.raises(ValueError, match="unknown engine 'zero9'"):
        runner.launcher("pretrain", engine="zero9")
    with pytest.raises(ValueError, match="not both"):
        runner.launcher("pretrain", engine="ddp", ranks=2)
    assert runner.flags({"max_steps": 20, "use_cpu": True, "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}) == [
        "--max_steps", "20", "--use_cpu", "true", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}']


# -- presets ------------------------------------------------------------------------------------------------------
PRESET = """
name: t
model: llama-tiny
max_steps: 12
seeds: [0, 1, 2]
flags: {max_eval_samples: 8}
optimizers:
  tuned-adamw:                     # the baseline by optimizer name, whatever its label
    optimizer: adamw
    grid: {lr: [1e-3, 3e-3], adam_lr: [1e-3, 1e-2]}
  swan:
    grid: {lr: [1e-3, 3e-3]}
    tie: {adam_lr: adam_lr}
  galore:
    args: {rank: 4, update_proj_gap: 5}
    grid: {scale: [0.25, 1.0]}
    tie: {lr: adam_lr}
  galore-layerwise:
    optimizer: galore
    args: {rank: 4, update_proj_gap: 5, layerwise: true}
    same_as: galore
"""


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_preset_parses_numbers_and_finds_the_baseline_by_name(tmp_path):
    preset = bench.load_preset(write(tmp_path, PRESET), {"max_steps": None, "jobs": 2})
    assert preset.max_steps == 12 and preset.eval_steps == 2 and preset.jobs == 2 and preset.seeds == [0, 1, 2]
    base = preset.baseline_candidate()
    assert base.label == "tuned-adamw" and base.grid == {"lr": [1e-3, 3e-3], "adam_lr": [1e-3, 1e-2]}
    assert preset.candidates[2].args == {"rank": 4, "update_proj_gap": 5}
    job = bench.make_job(preset, preset.candidates[2], {"scale": 0.25, "lr": 1e-2}, seed=1)
    args = list(job.args)
    assert args[args.index("--optim_args") + 1] == "rank=4,update_proj_gap=5,scale=0.25"
    assert args[args.index("--learning_rate") + 1] == "0.01" and args[args.index("--seed") + 1] == "1"
    assert args[args.index("--max_eval_samples") + 1] == "8" and job.steps == 12
    assert job.out.parts[-3:] == ("t", "galore", "scale=0.25_lr=0.01-seed1")
    assert "--max_grad_norm" not in args  # HF's global clip (1.0) applies
    # layer-wise release cannot clip globally: the same threshold per parameter instead
    layerwise = list(bench.make_job(preset, preset.candidates[3], {"scale": 0.25, "lr": 1e-2}, seed=1).args)
    assert layerwise[layerwise.index("--max_grad_norm") + 1] == "0"
    assert layerwise[layerwise.index("--optim_args") + 1] == \
        "rank=4,update_proj_gap=5,layerwise=true,scale=0.25,layerwise_clip=1.0"


SWAN = "  swan:\n    grid: {lr: [1e-3, 3e-3]}\n    tie: {adam_lr: adam_lr}\n"


@pytest.mark.parametrize("swan, message", [
    (SWAN + "    grid_x: 1\n", "unknown keys \\['grid_x'\\]"),
    ("  swan:\n    grid: {lr: [1e-3], ns_stepz: [5]}\n", "unknown option 'ns_stepz' for optimizer swan"),
    ("  swan:\n    grid: {ns_steps: [5]}\n", "swan needs an lr"),
    ("  swan:\n    args: {lr: 0.1}\n", "put the learning rate in grid"),
    ("  swan:\n    grid: {lr: []}\n", "swan.grid.lr is empty"),
    ("  swan:\n    grid: {lr: [1e-3]}\n    tie: {adam_lr: momentum}\n", "the baseline has no 'momentum'"),
    ("  swan:\n    grid: {lr: [1e-3]}\n    args: {ns_steps: 5}\n    tie: {ns_steps: lr}\n", "more than one of"),
    (SWAN + "  swan2:\n    optimizer: swan\n    same_as: nothing\n", "same_as must name a tuned entry"),
    (SWAN + "  galore2:\n    optimizer: galore\n    same_as: swan\n", "same_as needs the same optimizer"),
    (SWAN + "  adamz:\n    grid: {lr: [1e-3]}\n", "unknown optimizer 'adamz'"),
])
def test_preset_errors_name_the_problem_before_any_run(tmp_path, swan, message):
    text = textwrap.dedent(PRESET)
    assert SWAN in text
    with pytest.raises(ValueError, match=message):
        bench.load_preset(write(tmp_path, text.replace(SWAN, swan)))


@pytest.mark.parametrize("text, message", [
    ("name: t\noptimizers: {adamw: {grid: {lr: [1e-3]}}}\nseeds: [0, 0]\n", "distinct integers"),
    ("name: t\noptimizers: {adamw: {grid: {lr: [1e-3]}}}\nmodel: llama-huge\n", "llama-huge"),
    ("name: t\noptimizer: {adamw: {grid: {lr: [1e-3]}}}\n", "unknown keys \\['optimizer'\\]"),
    ("name: t\n", "'optimizers' must map labels"),
    ("optimizers: {swan: {grid: {lr: [1e-3]}, tie: {adam_lr: adam_lr}}}\n", "no entry has optimizer: adamw"),
])
def test_preset_file_level_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        bench.load_preset(write(tmp_path, text))
    with pytest.raises(ValueError, match="not found"):
        bench.load_preset(tmp_path / "missing.yaml")


# -- the pipeline on fake reports -----------------------------------------------------------------------------------
def fake_report(job: runner.Job) -> dict:
    """A deterministic landscape: adamw is best at lr=3e-3, adam_lr=1e-2; swan at lr=1e-3; galore at scale 1;
    seed s adds s / 10 to the perplexity; swan's lr=3e-3 diverges."""
    a = list(job.args)
    get = lambda flag, default=None: a[a.index(flag) + 1] if flag in a else default  # noqa: E731
    optim, lr, seed = get("--optim"), float(get("--learning_rate")), int(get("--seed"))
    opts = dict(kv.split("=") for kv in get("--optim_args", "").split(",") if kv)
    if optim == "adamw":
        ppl = 10 + abs(math.log10(lr / 3e-3)) + abs(math.log10(float(opts.get("adam_lr", lr)) / 1e-2))
    elif optim == "swan":
        ppl = 9.0 if lr == 1e-3 else float("nan")
        assert opts["adam_lr"] == "0.01"  # tied to the tuned baseline's non-matrix lr
    else:
        assert lr == 1e-2 and opts["rank"] == "4"  # lr tied to adamw's adam_lr
        ppl = 12 - float(opts["scale"]) - (0.5 if opts.get("layerwise") == "true" else 0)
    return {"eval_perplexity": ppl + seed / 10, "tokens_per_second": 100.0 if optim == "adamw" else 50.0,
            "optimizer_state_bytes": 8 if optim == "adamw" else 2,
            "optimizer_state_bytes_per_trainable_parameter": 8.0 if optim == "adamw" else 2.0,
            "peak_memory_bytes": 2**20, "peak_memory_kind": "cpu_peak_rss", "seed": seed, "lr": lr, "opts": opts}


def test_grid_then_best_point_then_seeds_then_best_vs_best(tmp_path):
    preset = bench.load_preset(write(tmp_path, PRESET))
    batches = []

    def execute(jobs):
        batches.append([j.label for j in jobs])
        return [fake_report(j) for j in jobs]

    results = bench.tune(preset, execute)
    assert len(batches[0]) == 4 and all(label.startswith("tuned-adamw") for label in batches[0])  # baseline first
    assert len(batches[1]) == 4  # swan's 2 lrs and galore's 2 scales, after the baseline is known
    assert len(batches[2]) == 4 * 3  # every best point (layer-wise: galore's) with the 3 seeds, seed-major
    assert [label.split()[0] for label in batches[2][:4]] == ["tuned-adamw", "swan", "galore", "galore-layerwise"]
    assert [label.rsplit(" ", 1)[1] for label in batches[2]] == ["0"] * 4 + ["1"] * 4 + ["2"] * 4
    assert results["tuned-adamw"]["best"] == {"lr": 3e-3, "adam_lr": 1e-2}
    assert results["swan"]["best"] == {"lr": 1e-3, "adam_lr": 1e-2}  # the diverged point is never best
    assert results["galore"]["best"] == {"scale": 1.0, "lr": 1e-2}
    assert results["galore-layerwise"]["best"] == results["galore"]["best"]
    assert [r["opts"].get("layerwise") for r in results["galore-layerwise"]["runs"]] == ["true"] * 3
    assert [r["seed"] for r in results["swan"]["runs"]] == [0, 1, 2]

    rows = {r["label"]: r for r in bench.summarize(results, preset)}
    base = rows["tuned-adamw"]
    assert base["baseline"] and base["eval_ppl_mean"] == pytest.approx(10.1) and base["ppl_ratio_mean"] == 1.0
    assert base["eval_ppl_std"] == pytest.approx(0.1) and base["grid_edge"] == ["lr", "adam_lr"]
    swan = rows["swan"]
    assert swan["eval_ppl_per_seed"] == pytest.approx([9.0, 9.1, 9.2])
    ratios = [9.0 / 10.0, 9.1 / 10.1, 9.2 / 10.2]  # paired by seed
    assert swan["ppl_ratio_mean"] == pytest.approx(sum(ratios) / 3)
    assert swan["ppl_ratio_std"] == pytest.approx(__import__("statistics").stdev(ratios))
    assert swan["tokens_per_s_ratio"] == 0.5 and swan["state_bytes"] == 2 and swan["grid_edge"] == ["lr"]
    assert rows["galore-layerwise"]["eval_ppl_mean"] == pytest.approx(10.6)

    md = bench.markdown(list(rows.values()), results, preset, "memtrain bench --preset p.yaml", (1000, 0.75))
    assert "| `swan` | lr=0.001,adam_lr=0.01 (edge: lr) | 9.10 ± 0.10 | 0.901 ± 0.001 |" in md
    assert "75.0 % in hidden matrices" in md and "`tuned-adamw` gets two tuned lrs" in md
    assert "| lr=0.003,adam_lr=0.001 | failed" not in md and "failed: nan" in md  # swan's diverged point


def test_entries_without_an_adamw_label_still_find_the_baseline():
    """``--optims adamw@3e-3 swan@1e-3``: the baseline is the adamw entry, so every ratio is filled in."""
    preset = bench.build_preset(bench.candidates_from_entries(["adamw@3e-3", "swan:ns_steps=5@1e-3"]),
                                {"max_steps": 4})
    assert preset.baseline_candidate().label == "adamw@3e-3"
    results = bench.tune(preset, lambda jobs: [_plain(j) for j in jobs])
    rows = bench.summarize(results, preset)
    assert [r["label"] for r in rows] == ["adamw@3e-3", "swan:ns_steps=5@1e-3"]
    assert rows[0]["ppl_ratio_mean"] == 1.0 and rows[1]["ppl_ratio_mean"] == pytest.approx(7.0 / 10.0)
    assert rows[1]["tokens_per_s_ratio"] == 0.5


def _plain(job):
    a = list(job.args)
    optim = a[a.index("--optim") + 1]
    return {"eval_perplexity": 10.0 if optim == "adamw" else 7.0, "tokens_per_second": 100.0 if optim == "adamw"
            else 50.0, "optimizer_state_bytes": 8, "optimizer_state_bytes_per_trainable_parameter": 8.0,
            "peak_memory_bytes": 2**20, "peak_memory_kind": "cpu_peak_rss"}


def test_a_failed_entry_is_a_row_with_its_error(tmp_path):
    preset = bench.build_preset(bench.candidates_from_entries(["adamw@1e-3", "swan@1e-3"]), {"max_steps": 4})
    results = bench.tune(preset, lambda jobs: [_plain(j) if "adamw" in j.label else {"error": "ValueError: no"}
                                               for j in jobs])
    rows = bench.summarize(results, preset)
    assert rows[1]["eval_ppl_mean"] is None and rows[1]["errors"] == ["ValueError: no"]
    assert "| `swan@1e-3` | failed: ValueError: no" in bench.markdown(rows, results, preset, "x", None)


def test_the_command_asks_for_a_preset_or_entries(capsys, tmp_path):
    for argv in ([], ["--preset", "p.yaml", "--optims", "adamw"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
    err = capsys.readouterr().err
    assert "give --preset FILE" in err and "not both" in err
    with pytest.raises(ValueError, match="not found"):
        bench.main(["--preset", str(tmp_path / "nope.yaml")])


def test_the_shipped_presets_load():
    """Every preset under configs/bench/ parses and validates (a typo there would fail only when a user runs it)."""
    from pathlib import Path
    presets = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "bench").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"pretrain-cpu", "smoke", "throughput-cpu"}
    for path in presets:
        preset = bench.load_preset(path)
        assert preset.name == path.stem and preset.candidates and preset.baseline_candidate() is not None


@pytest.mark.parametrize("adamw,text", [
    ("grid: {lr: [1.0e-3, 3.0e-3], adam_lr: [1.0e-3, 1.0e-2]}", "gets two tuned lrs"),
    ("grid: {lr: [3.0e-4], adam_lr: [1.0e-2]}", "has two lrs: `lr` for the hidden matrices (one value) and `adam_lr`"),
    ("grid: {lr: [1.0e-4, 3.0e-4]}\n    args: {adam_lr: 1.0e-2}", "has two lrs: `lr` for the hidden matrices (tuned)"),
    ("grid: {lr: [1.0e-3, 3.0e-3]}", "has one lr for every parameter"),
])
def test_the_fairness_line_says_which_lrs_the_baseline_had(tmp_path, adamw, text):
    preset = bench.load_preset(write(tmp_path, f"name: p\nmodel: llama-tiny\nmax_steps: 1\noptimizers:\n"
                                               f"  adamw:\n    {adamw}\n"))
    assert bench.fairness(preset).startswith(f"`adamw` {text}")
