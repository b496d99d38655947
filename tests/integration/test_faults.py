"""Faults: resume under changed settings or from damaged checkpoints, non-finite values, a failing final eval
(issue 13; docs/resume.md, docs/nonfinite.md). Tiny models, 2-4 steps each; tables where the cases share a shape."""
from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch

import memtrain
from memtrain.hf.checkpoint import RUN_FILE, ResumeError
from memtrain.hf.trainer import FinalEvalError, NonfiniteError
from memtrain.optim import registry

from ..conftest import lm_batch, tiny_llama
from .test_trainer import make_args, pattern_dataset

GALORE = "rank=4,update_proj_gap=2"


def train(tmp, model=None, eval_dataset=None, resume=None, **kw):
    trainer = memtrain.Trainer(model=model or tiny_llama(), args=make_args(tmp, **kw), train_dataset=pattern_dataset(),
                               eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint-2 of a 4-step adamw run and of a 4-step galore run."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, extra in (("adamw", {}), ("galore", {"optim_args": GALORE})):
        train(root / name, optim=name, max_steps=4, save_strategy="steps", save_steps=2, **extra)
        out[name] = root / name / "checkpoint-2"
    return out


def copy_checkpoint(source, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


# -- 1. resume is exact or refuses ----------------------------------------------------------------------------
def test_the_record_names_optimizer_options_version_and_checksums(checkpoints):
    record = json.loads((checkpoints["galore"] / RUN_FILE).read_text())
    assert record["optimizer"] == "galore" and record["memtrain_version"] == memtrain.__version__
    assert record["options"]["rank"] == 4 and record["options"]["update_proj_gap"] == 2
    assert record["options"]["proj_type"] == "std" and record["options"]["layerwise"] is False
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"} <= set(record["sha256"])
    assert sorted((g["role"], g["method"], g["params"]) for g in record["groups"]) == [
        ("embedding", "adamw", 1), ("head", "adamw", 1), ("matrix", "galore", 14), ("vector", "adamw", 5)]


REFUSED = [
    # (checkpoint, new arguments, model change, expected error text)
    ("adamw", {"optim": "adam4bit"}, None, r"trained with optimizer 'adamw', not 'adam4bit'"),
    ("adamw", {"optim": "adafactor"}, None, r"trained with optimizer 'adamw', not 'adafactor'"),
    ("adamw", {"optim": "swan"}, None, r"trained with optimizer 'adamw', not 'swan'"),
    ("adamw", {"optim": "adamw_torch"}, None, r"trained with optimizer 'adamw', not 'adamw_torch'"),
    ("galore", {"optim": "fira", "optim_args": GALORE}, None, r"not 'fira'.*--optim galore --optim_args "
                                                              r"'rank=4,update_proj_gap=2'"),
    ("galore", {"optim": "adamw"}, None, r"trained with optimizer 'galore', not 'adamw'"),
    ("galore", {"optim": "galore", "optim_args": "rank=8,update_proj_gap=2"}, None,
     r"options that shape the optimizer state differ \(rank: 4 -> 8\).*--resume_fresh_optimizer true"),
    ("galore", {"optim": "galore", "optim_args": GALORE + ",proj_type=left"}, None, r"proj_type: 'std' -> 'left'"),
    ("galore", {"optim": "galore", "optim_args": GALORE + ",projector=randomized"}, None,
     r"projector: 'svd' -> 'randomized'"),
    ("adamw", {"optim": "adamw", "layerwise": True, "max_grad_norm": 0.0}, None, r"layerwise: False -> True"),
    ("adamw", {"optim": "adamw", "optim_target_modules": ["q_proj"]}, None, r"target_modules: None -> \['q_proj'\]"),
    ("adamw", {"optim": "adamw"}, "freeze_embedding",
     r"the parameter groups differ .* group 0: saved embedding/adamw with 1 parameters"),
]


@pytest.mark.parametrize("base,new,change,text", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_resume_under_changed_optimizer_settings_refuses_before_training(base, new, change, text, checkpoints,
                                                                         tmp_path):
    model = tiny_llama(seed=7)
    if change == "freeze_embedding":
        model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ResumeError, match=text):
        train(tmp_path, model=model, resume=str(checkpoints[base]), max_steps=4, **new)
    saved = memtrain.Trainer(model=tiny_llama(seed=7), args=make_args(tmp_path / "x", max_steps=4))
    saved._load_from_checkpoint(str(checkpoints[base]))
    for name, p in model.named_parameters():  # untouched, or exactly the checkpoint's weights: no step ran
        assert torch.equal(p, before[name]) or torch.equal(p, dict(saved.model.named_parameters())[name]), name


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGED = [
    # (mutation, drop the record, expected error text)
    ("delete optimizer.pt", False, r"optimizer.pt is missing \(it was saved with the checkpoint\).*"
                                   r"--resume_fresh_optimizer true"),
    ("empty optimizer.pt", False, r"optimizer.pt is empty"),
    ("flip optimizer.pt", False, r"optimizer.pt does not match the SHA-256 recorded at save"),
    ("delete scheduler.pt", False, r"scheduler.pt is missing"),
    ("empty scheduler.pt", False, r"scheduler.pt is empty"),
    ("delete rng_state.pth", False, r"rng_state.pth is missing"),
    ("flip rng_state.pth", False, r"rng_state.pth does not match the SHA-256"),
    ("flip model.safetensors", False, r"model.safetensors does not match the SHA-256"),
    ("garbage memtrain_run.json", False, r"memtrain_run.json is not readable JSON"),
    ("delete optimizer.pt", True, r"the optimizer state \(optimizer.pt or optimizer.bin or optimizer_0\) is missing"),
    ("empty optimizer.pt", True, r"the optimizer state .* is missing or empty"),
    ("empty scheduler.pt", True, r"the lr scheduler state \(scheduler.pt\) is missing or empty"),
    ("delete rng_state.pth", True, r"the RNG state \(rng_state.pth\) is missing or empty"),
    ("garbage optimizer.pt", True, r"the optimizer or scheduler state could not be loaded"),
    ("garbage rng_state.pth", True, r"rng_state.pth could not be loaded"),
]


@pytest.mark.parametrize("mutation,drop_record,text", DAMAGED,
                         ids=[f"{m}{' (no record)' if d else ''}" for m, d, _ in DAMAGED])
def test_missing_or_damaged_checkpoint_files_stop_the_resume_naming_the_file(mutation, drop_record, text,
                                                                             checkpoints, tmp_path):
    ckpt = copy_checkpoint(checkpoints["adamw"], tmp_path)
    action, name = mutation.split(" ")
    path = ckpt / name
    if action == "delete":
        path.unlink()
    elif action == "empty":
        path.write_bytes(b"")
    elif action == "flip":
        _flip_byte(path)
    else:
        path.write_bytes(b"not a checkpoint file \x00\x01" * 8)
    if drop_record:
        (ckpt / RUN_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "has no memtrain_run.json"
        with pytest.raises(ResumeError, match=text):
            train(tmp_path / "out", resume=str(ckpt), optim="adamw", max_steps=4)


def test_a_checkpoint_without_record_resumes_with_a_warning(checkpoints, tmp_path):
    ckpt = copy_checkpoint(checkpoints["adamw"], tmp_path)
    (ckpt / RUN_FILE).unlink()
    with pytest.warns(UserWarning, match="has no memtrain_run.json .* cannot be verified"):
        trainer = train(tmp_path / "out", resume=str(ckpt), optim="adamw", max_steps=4)
    assert trainer.state.global_step == 4


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_resume_with_the_same_settings_is_bitwise_the_uninterrupted_run(name, checkpoints, tmp_path):
    extra = {"optim_args": GALORE} if name == "galore" else {}
    straight = train(tmp_path / "a", optim=name, max_steps=4, **extra)
    resumed = train(tmp_path / "b", model=tiny_llama(seed=7), resume=str(checkpoints[name]), optim=name, max_steps=4,
                    **extra)
    for (n, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(a, b), n


def _logged_lrs(trainer):
    return {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}


def test_new_lr_weight_decay_and_betas_apply_on_resume(checkpoints, tmp_path):
    """Saved at lr 5e-3, wd 0, betas (0.9, 0.999); resumed with lr 2e-3, wd 0.1, betas (0.8, 0.99): steps 3-4 use
    exactly the lr a straight run at 2e-3 schedules there, and the groups hold the new decay and betas. Torch's
    load_state_dict alone would have kept all three from the checkpoint."""
    new = dict(learning_rate=2e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.99, logging_steps=1)
    straight = train(tmp_path / "a", optim="adamw", max_steps=4, **new)
    resumed = train(tmp_path / "b", resume=str(checkpoints["adamw"]), optim="adamw", max_steps=4, **new)
    logged = _logged_lrs(resumed)  # HF keeps the checkpoint's logging_steps (4): step 4 is logged
    assert 4 in logged and logged == {s: lr for s, lr in _logged_lrs(straight).items() if s in logged}
    groups = resumed.optimizer.param_groups
    assert {g["weight_decay"] for g in groups if g["role"] != "vector"} == {0.1}
    assert all(g["betas"] == (0.8, 0.99) and g["initial_lr"] == 2e-3 for g in groups)
    state = resumed.optimizer.state[groups[0]["params"][0]]
    assert state["step"] == 4  # continued from the checkpoint's moments, not fresh


def test_fresh_optimizer_resume_keeps_weights_and_the_schedule_position(checkpoints, tmp_path):
    ckpt = copy_checkpoint(checkpoints["adamw"], tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (ckpt / name).unlink()
    sched = dict(warmup_steps=2, logging_steps=1, max_steps=4)
    straight = train(tmp_path / "a", optim="adamw", **sched)
    fresh = train(tmp_path / "b", model=tiny_llama(seed=7), resume=str(ckpt), optim="adam4bit",
                  resume_fresh_optimizer=True, **sched)
    assert fresh.state.global_step == 4
    logged = _logged_lrs(fresh)  # no warm-up restart: the lr a straight run has there
    assert 4 in logged and logged == {s: lr for s, lr in _logged_lrs(straight).items() if s in logged}
    inner = fresh.optimizer.optimizer if hasattr(fresh.optimizer, "optimizer") else fresh.optimizer
    assert type(inner).__name__ == "Adam4bit" or inner.name == "adam4bit"
    assert all(s["step"] == 2 for s in inner.state.values() if "step" in s)  # fresh state: two steps


# -- 3. one non-finite policy ----------------------------------------------------------------------------------
#: Methods whose first step is a projector refresh that a non-finite gradient cannot define: the matrix keeps its zero
#: projector and makes no update until its next scheduled refresh (docs/nonfinite.md, docs/optimizers/galore.md).
FIRST_STEP_SKIP = {"galore", "fira"}
TARGET, VECTOR = "model.layers.0.mlp.up_proj.weight", "model.norm.weight"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", registry.optimizer_names())
def test_a_nonfinite_gradient_entry_reaches_its_parameter_and_no_other(name, bad):
    """docs/nonfinite.md: never dropped (swan used to zero the row), never spread to other parameters."""
    for at_step in (1, 2):
        model = tiny_llama()
        params = dict(model.named_parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = registry.build_optimizer(model, name, lr=1e-3)
            for step in range(at_step):
                optimizer.zero_grad()
                model(**lm_batch(step)).loss.backward()
                if step == at_step - 1:
                    params[TARGET].grad[0, 0] = bad
                    params[VECTOR].grad[0] = bad
                    before = params[TARGET].detach().clone()
                optimizer.step()
        broken = {n for n, p in params.items() if not torch.isfinite(p).all()}
        if name in FIRST_STEP_SKIP and at_step == 1:
            assert broken == {VECTOR} and torch.equal(params[TARGET], before)  # the AdamW fallback propagates
        else:
            assert broken == {TARGET, VECTOR}, (at_step, broken)
            assert not torch.isfinite(params[TARGET][0]).all()  # the row holding the entry


def test_divergence_stops_the_run_with_a_clear_error_and_a_strict_report(tmp_path):
    """The issue's --learning_rate 1e5: the loss turns NaN after a few steps; the run stops there, non-zero."""
    with pytest.raises(NonfiniteError, match=r"non-finite loss or gradient norm \(NaN/Inf\) at optimizer step \d+: "
                                             r"the run diverged.*--stop_on_nonfinite false"):
        train(tmp_path, optim="adamw", learning_rate=1e5, max_steps=8, logging_steps=1)
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)
    assert report["error"].startswith("NonfiniteError") and report["failed_stage"] == "train"
    assert report["train_loss"] is None and "train_loss" in report["nonfinite"] and report["global_steps"] < 8


def test_without_the_guard_nan_is_logged_as_nan_and_reported_as_null(tmp_path):
    trainer = train(tmp_path, eval_dataset=pattern_dataset(8), optim="adamw", learning_rate=1e5, max_steps=8,
                    logging_steps=1, stop_on_nonfinite=False)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert math.isnan(losses[-1]) and 0.0 not in losses  # HF's nan filter logged the running mean (0 at first)
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail)
    assert report["train_loss"] is None and report["eval_loss"] is None
    assert {"train_loss", "eval_loss", "eval_perplexity"} <= set(report["nonfinite"])


def test_the_guard_sees_a_nonfinite_gradient_norm_with_a_finite_loss(tmp_path):
    class NanGrad(torch.nn.Module):  # the loss stays finite; one gradient entry is NaN
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()
            self.inner.model.norm.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.nan))

        def forward(self, input_ids, labels):
            return self.inner(input_ids=input_ids, labels=labels)

    with pytest.raises(NonfiniteError, match="at optimizer step 1"):
        train(tmp_path, model=NanGrad(), optim="adamw", max_steps=3, max_grad_norm=1.0)


# -- 2. fail before the work; a failing final eval keeps the work ---------------------------------------------
def test_an_empty_eval_set_is_refused_before_training(tmp_path):
    trainer = memtrain.Trainer(model=tiny_llama(), args=make_args(tmp_path, optim="adamw", max_steps=2),
                               train_dataset=pattern_dataset(), eval_dataset=pattern_dataset(8).select([]))
    with pytest.raises(ValueError, match=r"the eval set is empty .* --final_eval false"):
        trainer.train()
    assert trainer.state.global_step == 0


def _failing_eval(*args, **kwargs):
    raise RuntimeError("eval exploded")


def test_a_failing_final_eval_raises_after_writing_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr("memtrain.hf.metrics.evaluate_perplexity", _failing_eval)
    with pytest.raises(FinalEvalError, match=r"training completed \(3 steps\) but the final evaluation failed: "
                                             r"RuntimeError: eval exploded"):
        train(tmp_path, eval_dataset=pattern_dataset(8), optim="adamw", max_steps=3)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed_stage"] == "final_eval" and "eval exploded" in report["error"]
    assert report["global_steps"] == 3 and math.isfinite(report["train_loss"]) and report["eval_loss"] is None


def test_pretrain_saves_the_model_when_the_final_eval_fails(tmp_path, monkeypatch):
    from memtrain.recipes import pretrain

    monkeypatch.setattr("memtrain.hf.metrics.evaluate_perplexity", _failing_eval)
    out = tmp_path / "run"
    with pytest.raises(FinalEvalError):
        pretrain.main(["--output_dir", str(out), "--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples",
                       "2", "--seq_len", "32", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
                       "--report_to", "none"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["global_steps"] == 2 and report["failed_stage"] == "final_eval"
