"""Bad inputs are refused before any work, with an error naming the problem and the fix (issue 13; docs/resume.md,
docs/nonfinite.md). Table-driven: input -> expected error text. Nothing here builds data or trains."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

import memtrain
from memtrain.hf import MemtrainOptimizerFactory
from memtrain.hf.report import strict_json, write_json
from memtrain.optim import registry
from memtrain.recipes import finetune, pretrain
from memtrain.recipes.arguments import parse_args, wants_list_optimizers

from ..conftest import tiny_llama


def targs(**kw):
    return memtrain.TrainingArguments(**{"output_dir": "unused", "use_cpu": True, "report_to": "none", **kw})


# -- TrainingArguments: options and numbers, refused at parsing time ------------------------------------------
PARSE_ERRORS = [
    # (TrainingArguments fields, error type, expected text)
    ({"optim": "galore", "optim_args": "rank=0"}, ValueError, r"rank must be a positive integer, got 0"),
    ({"optim": "galore", "optim_args": "rank=-3"}, ValueError, r"rank must be a positive integer"),
    ({"optim": "galore", "optim_args": "update_proj_gap=0"}, ValueError, r"update_proj_gap must be a positive"),
    ({"optim": "galore", "optim_args": "scale=-1"}, ValueError, r"scale α must be a positive number"),
    ({"optim": "galore", "optim_args": "proj_type=diagonal"}, ValueError, r"expected one of std, reverse_std"),
    ({"optim": "adamw", "optim_args": "betas=1.5:0.9"}, ValueError, r"betas must lie in \[0, 1\), got \(1.5, 0.9\)"),
    ({"optim": "adamw", "optim_args": "betas=0.9"}, ValueError, r"expected 2 values separated by ':'"),
    ({"optim": "adamw", "optim_args": "eps=-1"}, ValueError, r"eps must be >= 0"),
    ({"optim": "swan", "optim_args": "ns_steps=0"}, ValueError, r"ns_steps must be an integer >= 1"),
    ({"optim": "swan", "optim_args": "norm_dim=2"}, ValueError, r"norm_dim must be 1 .* or 0"),
    ({"optim": "swan", "optim_args": "adam_lr=-0.1"}, ValueError, r"adam_lr must be >= 0"),
    ({"optim": "adam4bit", "optim_args": "block_size=0"}, ValueError, r"block_size must be an even int >= 2"),
    ({"optim": "adamw", "optim_args": "layerwise_clip=-1"}, ValueError,
     r"layerwise_clip=-1.0 .* must be a number >= 0"),
    ({"optim": "galore", "optim_args": "rank=4,rank=8"}, ValueError, r"gives rank more than once"),
    ({"optim": "galore", "optim_args": "rank=4, update_proj_gap=2,rank=4"}, ValueError, r"gives rank more than once"),
    ({"optim": "galore", "optim_args": "rank"}, ValueError, r"must look like key=value"),
    ({"optim": "galore", "optim_args": "rnk=4"}, ValueError, r"unknown option 'rnk' for optimizer galore"),
    ({"optim": "galore", "optim_args": {"rnk": 4}}, ValueError, r"unknown option 'rnk' for optimizer galore"),
    ({"optim": "galore", "optim_args": {"rank": 0}}, ValueError, r"rank must be a positive integer, got 0"),
    ({"optim": "galore", "optim_args": {"rank": "eight"}}, ValueError, r"rank='eight' .*expected an integer"),
    ({"optim": "galore", "optim_args": {4: 8}}, ValueError, r"keys must be option names"),
    ({"optim": "galore", "optim_args": '{"rank": 8'}, ValueError, r"not a JSON object"),
    ({"optim": "galore", "optim_args": 8}, TypeError, r"optim_args must be a 'k=v,k=v' string or a mapping"),
    ({"optim": "adamw", "optim_args": "lr=1e-3"}, ValueError, r"lr and weight_decay come from the training arguments"),
    ({"optim": "adamz"}, ValueError, r"unknown optimizer 'adamz'"),
    ({"learning_rate": -1e-3}, ValueError, r"--learning_rate -0.001 is out of range: it must be a finite number >= 0"),
    ({"learning_rate": math.nan}, ValueError, r"--learning_rate nan is out of range"),
    ({"learning_rate": math.inf, "optim": "adamw"}, ValueError, r"--learning_rate inf is out of range"),
    ({"weight_decay": -0.1}, ValueError, r"--weight_decay -0.1 is out of range"),
    ({"adam_beta1": 1.5}, ValueError, r"--adam_beta1 1.5 is out of range: it must be in \[0, 1\)"),
    ({"adam_beta2": 1.0, "optim": "adamw"}, ValueError, r"--adam_beta2 1.0 is out of range"),
    ({"adam_epsilon": -1e-8}, ValueError, r"--adam_epsilon -1e-08 is out of range"),
    ({"max_grad_norm": -1.0}, ValueError, r"--max_grad_norm -1.0 is out of range: .*\(0: no clipping\)"),
]


@pytest.mark.parametrize("fields,error,text", PARSE_ERRORS, ids=[str(i) for i in range(len(PARSE_ERRORS))])
def test_bad_training_arguments_are_refused_at_parsing(fields, error, text):
    with pytest.raises(error, match=text):
        targs(**fields)


OPTIM_ARGS_FORMS = [
    # (optim_args as written, canonical string, parsed options)
    ("rank=8,update_proj_gap=2", "rank=8,update_proj_gap=2", {"rank": 8, "update_proj_gap": 2}),
    ({"rank": 8}, "rank=8", {"rank": 8}),  # YAML/JSON config mapping, Python dict
    ({"rank": 8, "betas": [0.9, 0.95], "sign_fix": True}, "rank=8,betas=0.9:0.95,sign_fix=true",
     {"rank": 8, "betas": (0.9, 0.95), "sign_fix": True}),
    ({"rank": 8, "betas": (0.9, 0.95)}, "rank=8,betas=0.9:0.95", {"rank": 8, "betas": (0.9, 0.95)}),
    ('{"rank": 8, "scale": 0.5}', "rank=8,scale=0.5", {"rank": 8, "scale": 0.5}),  # a JSON string on the CLI
    ({}, None, {}),
    ("", None, {}),
    (None, None, {}),
]


@pytest.mark.parametrize("value,canonical,parsed", OPTIM_ARGS_FORMS, ids=[str(i) for i in range(len(OPTIM_ARGS_FORMS))])
def test_optim_args_forms_are_one_canonical_string(value, canonical, parsed):
    args = targs(optim="galore", optim_args=value)
    assert args.optim_args == canonical
    assert registry.parse_optim_args("galore", args.optim_args) == parsed


def test_optim_args_mapping_from_a_yaml_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("optim: galore\noptim_args:\n  rank: 8\n  betas: [0.9, 0.95]\nuse_cpu: true\n")
    margs, args = parse_args((pretrain.ModelDataArguments, memtrain.TrainingArguments), pretrain.PRETRAIN_DEFAULTS,
                             [str(config), "--output_dir", str(tmp_path / "out")])
    assert args.optim_args == "rank=8,betas=0.9:0.95"
    assert registry.parse_optim_args("galore", args.optim_args) == {"rank": 8, "betas": (0.9, 0.95)}


CONFIG_ERRORS = [
    # (file name, text, expected error)
    ("dup.yaml", "optim: galore\noptim_args: {rank: 4, rank: 8}\n", r"gives rank more than once"),
    ("dup_top.yaml", "max_steps: 3\noptim: adamw\nmax_steps: 4\n", r"gives max_steps more than once"),
    ("dup.json", '{"optim_args": {"rank": 4, "rank": 8}}', r"gives rank more than once"),
    ("list.yaml", "- optim\n- adamw\n", r"must hold a mapping of argument names to values"),
    ("unknown.yaml", "optimm: adamw\n", r"unknown argument\(s\) in config file: optimm"),
    ("range.yaml", "optim: galore\noptim_args: {rank: 0}\n", r"rank must be a positive integer, got 0"),
]


@pytest.mark.parametrize("name,text,error", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_config_files_are_refused(name, text, error, tmp_path):
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ValueError, match=error):
        parse_args((pretrain.ModelDataArguments, memtrain.TrainingArguments), pretrain.PRETRAIN_DEFAULTS,
                   [str(config), "--output_dir", str(tmp_path / "out")])


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    from memtrain.recipes.arguments import load_config_file

    config = tmp_path / "merge.yaml"
    config.write_text("base: &b {rank: 4, scale: 0.5}\noptim_args:\n  <<: *b\n  rank: 8\n")
    assert load_config_file(config)["optim_args"] == {"rank": 8, "scale": 0.5}


def test_the_python_factory_checks_ranges_before_training():
    with pytest.raises(ValueError, match=r"optimizer galore: rank must be a positive integer, got 0"):
        memtrain.hf.optimizer_factory("galore", lr=1e-3, optim_args={"rank": 0})
    with pytest.raises(ValueError, match=r"gives rank more than once"):
        memtrain.hf.optimizer_factory("galore", lr=1e-3, optim_args="rank=2,rank=3")


def test_resumable_options_name_real_options():
    """A typo in the resumable table would silently let a state-shaping option change on resume."""
    for name, keys in registry.RESUMABLE.items():
        assert keys <= set(registry.get_spec(name).options()), name
    for name in registry.optimizer_names():
        options = set(registry.get_spec(name).options()) | set(registry.UNIVERSAL_OPTIONS)
        assert "lr" in registry.resumable_options(name) and "rank" not in registry.resumable_options(name)
        assert registry.resumable_options(name) - registry.RESUMABLE_COMMON <= options


# -- options that need the model: a GaLore rank at or above every min(m, n) -----------------------------------
def test_rank_above_every_matrix_is_refused_with_the_useful_range():
    # tiny_llama's matrices: q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48: largest min(m, n) is 32
    with pytest.raises(ValueError, match=r"rank=100000 is at least min\(m, n\) of every projected matrix .*"
                                         r"use 1 <= rank < 32"):
        MemtrainOptimizerFactory()(tiny_llama(), name="galore", lr=1e-3, weight_decay=0.0, rank=100000)
    with pytest.raises(ValueError, match=r"rank=32 .* use 1 <= rank < 32"):
        MemtrainOptimizerFactory()(tiny_llama(), name="fira", lr=1e-3, weight_decay=0.0, rank=32)


def test_rank_clipped_on_some_matrices_is_warned_by_name(caplog):
    with caplog.at_level(logging.WARNING, logger="memtrain.optim.registry"):
        MemtrainOptimizerFactory()(tiny_llama(), name="galore", lr=1e-3, weight_decay=0.0, rank=20)
    text = caplog.text
    assert "rank=20 >= min(m, n) of 4 of 14 projected matrices" in text and "k_proj.weight (16, 32)" in text


# -- recipe arguments: refused before any data or model is built -----------------------------------------------
def _saved_model_without_tokenizer(root: Path) -> Path:
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    return model_dir


RECIPE_ERRORS = [
    # (job, argv (ROOT = a temporary directory), error type, expected text)
    ("pretrain", ["--seq_len", "100000"], ValueError,
     r"--seq_len 100000 exceeds the model's max_position_embeddings=\d+ \(llama-tiny\)"),
    ("pretrain", ["--model", "ROOT/gpt2.json", "--seq_len", "64"], ValueError,
     r"--seq_len 64 exceeds the model's max_position_embeddings=32"),
    ("pretrain", ["--seq_len", "0"], ValueError, r"--seq_len must be >= 1"),
    ("pretrain", ["--max_eval_samples", "0"], ValueError,
     r"--max_eval_samples 0 leaves no eval block.*--final_eval false"),
    ("pretrain", ["--max_eval_samples", "-2", "--final_eval", "false"], ValueError, r"--max_eval_samples -2"),
    ("pretrain", ["--max_train_samples", "0"], ValueError, r"--max_train_samples must be >= 1"),
    ("pretrain", ["--optim", "galore", "--optim_args", "rank=0"], ValueError, r"rank must be a positive integer"),
    ("pretrain", ["--output_dir", "ROOT/used"], ValueError,
     r"--output_dir '.*used' already holds a run \(report.json, checkpoint-2\).*--overwrite_output_dir true"),
    ("pretrain", ["--optim", "nosuch"], ValueError, r"unknown optimizer 'nosuch'"),
    ("finetune", ["--model_name_or_path", "ROOT/model"], ValueError,
     r"--model_name_or_path \(no --tokenizer given\) '.*model' has no tokenizer files.*pass --tokenizer DIR"),
    ("finetune", ["--model_name_or_path", "ROOT/model", "--tokenizer", "ROOT/model"], ValueError,
     r"--tokenizer '.*model' has no tokenizer files"),
    ("finetune", ["--model_name_or_path", "ROOT/missing"], ValueError,
     r"--model_name_or_path '.*missing' is not a directory"),
    ("finetune", ["--model_name_or_path", "ROOT/model", "--seq_len", "65"], ValueError,
     r"--seq_len 65 exceeds the model's max_position_embeddings=64"),
    ("finetune", ["--model_name_or_path", "ROOT/model", "--max_eval_samples", "0"], ValueError,
     r"--max_eval_samples 0 leaves no eval block"),
]


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    _saved_model_without_tokenizer(root)
    (root / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 32, "n_embd": 16, "n_layer": 1,
                                                "n_head": 2, "vocab_size": 300}))
    used = root / "used"
    (used / "checkpoint-2").mkdir(parents=True)
    (used / "report.json").write_text("{}")
    return root


@pytest.mark.parametrize("job,argv,error,text", RECIPE_ERRORS, ids=[str(i) for i in range(len(RECIPE_ERRORS))])
def test_bad_recipe_arguments_fail_before_any_work(job, argv, error, text, recipe_root, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("memtrain.recipes.data.build_lm_data", lambda *a, **k: built.append(1))  # must not run
    argv = [a.replace("ROOT", str(recipe_root)) for a in argv]
    if not any(a.startswith("--output_dir") for a in argv):
        argv += ["--output_dir", str(tmp_path / "out")]
    if job == "finetune" and "--seq_len" not in argv:
        argv += ["--seq_len", "32"]  # within the saved tiny model's 64 positions
    main = pretrain.main if job == "pretrain" else finetune.main
    with pytest.raises(error, match=text):
        main(argv)
    assert not built


def test_a_used_output_dir_is_accepted_when_resuming_or_overwriting(recipe_root, tmp_path):
    from memtrain.recipes.arguments import check_output_dir

    used = str(recipe_root / "used")
    check_output_dir(targs(output_dir=used, overwrite_output_dir=True))
    check_output_dir(targs(output_dir=used, resume_from_checkpoint=f"{used}/checkpoint-2"))
    check_output_dir(targs(output_dir=str(tmp_path)))  # exists, empty


# -- flags: both spellings, --list-optimizers, --help ---------------------------------------------------------
LIST_FLAGS = [
    (["--list_optimizers"], True), (["--list-optimizers"], True), (["--list_optimizers=true"], True),
    (["--list-optimizers=true"], True), (["--list_optimizers", "true"], True), (["--list_optimizers", "yes"], True),
    (["--max_steps", "3", "--list-optimizers"], True), (["--list_optimizers=false"], False),
    (["--list-optimizers", "false"], False), ([], False), (["--max_steps", "3"], False), (["--list"], False),
]


@pytest.mark.parametrize("argv,expected", LIST_FLAGS, ids=[" ".join(a) or "none" for a, _ in LIST_FLAGS])
def test_list_optimizers_in_every_spelling(argv, expected):
    assert wants_list_optimizers(argv) is expected


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
@pytest.mark.parametrize("flag", ["--list-optimizers", "--list_optimizers=true"])
def test_list_optimizers_lists_and_never_trains(job, flag, capsys, monkeypatch):
    monkeypatch.setattr("memtrain.recipes.arguments.parse_args", None)  # would fail if reached
    main = pretrain.main if job == "pretrain" else finetune.main
    assert main([flag]) is None
    out = capsys.readouterr().out
    assert all(name in out for name in registry.optimizer_names())


def _parser(job):
    from transformers import HfArgumentParser

    from memtrain.recipes.arguments import _memtrain_flags_first

    types = (pretrain.ModelDataArguments if job == "pretrain" else finetune.FinetuneArguments,
             memtrain.TrainingArguments)
    parser = HfArgumentParser(types)
    _memtrain_flags_first(parser, types)
    return parser


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_every_memtrain_flag_takes_both_spellings(job):
    parser = _parser(job)
    group = parser._action_groups[0]
    assert group.title == "memtrain options"
    dests = {a.dest for a in group._group_actions}
    assert len(dests) >= 20
    for name in dests:  # a bool defaulting to true has two actions: --name and --no_name
        spellings = {s for a in parser._actions if a.dest == name for s in a.option_strings}
        assert {f"--{name}", f"--{name.replace('_', '-')}"} <= spellings, name


def test_dash_spellings_parse_to_the_same_values(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--stop-on-nonfinite", "false", "--resume-fresh-optimizer", "true",
            "--overwrite-output-dir", "--seq-len", "32", "--max-eval-samples", "3", "--optim-args", "eps=1e-7"]
    margs, args = parse_args((pretrain.ModelDataArguments, memtrain.TrainingArguments), pretrain.PRETRAIN_DEFAULTS,
                             argv)
    assert (args.stop_on_nonfinite, args.resume_fresh_optimizer, args.overwrite_output_dir) == (False, True, True)
    assert (margs.seq_len, margs.max_eval_samples, args.optim_args) == (32, 3, "eps=1e-7")


def test_help_shows_memtrain_flags_first_and_how_to_list_an_optimizer(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    own = out.index("memtrain options:")
    hf = out.index("\n  --per_device_train_batch_size")  # HF's flags' help entries (the usage line lists all)
    assert own < hf
    for flag in ("--list_optimizers", "--stop_on_nonfinite", "--resume_fresh_optimizer", "--optim_args", "--seq_len"):
        assert own < out.index(f"\n  {flag}", own) < hf, flag
    assert "`memtrain list NAME` lists one optimizer's" in " ".join(out.split())


# -- report.json is strict JSON ---------------------------------------------------------------------------------
def test_report_json_is_strict_with_a_nonfinite_list(tmp_path):
    report = {"train_loss": math.nan, "eval_loss": 2.5, "eval_history": [{"loss": math.inf}, {"loss": 1.0}],
              "per": {"x": -math.inf, "y": 3}, "name": "adamw"}
    clean, found = strict_json(report)
    assert found == ["train_loss", "eval_history[0].loss", "per.x"]
    assert clean == {"train_loss": None, "eval_loss": 2.5, "eval_history": [{"loss": None}, {"loss": 1.0}],
                     "per": {"x": None, "y": 3}, "name": "adamw"}
    write_json(tmp_path / "r.json", report)

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    loaded = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert loaded["nonfinite"] == found and loaded["train_loss"] is None
