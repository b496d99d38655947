"""memtrain's TrainingArguments/Trainer with memtrain and HF optimizer names, the factory route, resume."""
import copy
import json
import math
import os

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import HfArgumentParser

import memtrain
from memtrain.hf import optimizer_factory

from ..conftest import VOCAB, tiny_llama
from .reference_run import Recorder, assert_same_parameters, linear_decay, plain_training, token_weighted_loss


def pattern_dataset(n=64, length=16, seed=0):
    """Learnable sequences (arithmetic progressions mod VOCAB) so that a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(length)) % VOCAB
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), learning_rate=5e-3, max_steps=12, per_device_train_batch_size=8,
                per_device_eval_batch_size=16, logging_steps=4, save_strategy="no", report_to="none", use_cpu=True,
                seed=0, data_seed=0, disable_tqdm=True)
    base.update(kw)
    return memtrain.TrainingArguments(**base)


def test_memtrain_name_trains_like_a_plain_loop_and_writes_report(tmp_path):
    """12 Trainer steps equal the same batches through a plain loop with torch.optim.AdamW (linear decay, clipping
    at 1.0); the report's numbers equal independent computations."""
    args = make_args(tmp_path, optim="adamw", optim_args="betas=0.9:0.99")
    data, recorder = pattern_dataset(), Recorder()
    model = tiny_llama()
    reference = copy.deepcopy(model)
    eval_data = pattern_dataset(16, seed=1)
    trainer = memtrain.Trainer(model=model, args=args, train_dataset=data, eval_dataset=eval_data,
                               data_collator=recorder)
    before = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(token_weighted_loss(reference, eval_data)[0], rel=1e-5)
    recorder.batches.clear()
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      memtrain.optim.MemtrainOptimizer)
    ref_losses = plain_training(reference, recorder.batches[:12],
                                torch.optim.AdamW(reference.parameters(), lr=5e-3, betas=(0.9, 0.99), weight_decay=0.0,
                                                  foreach=False), linear_decay(12))
    assert_same_parameters(trainer.model, reference)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # the mean over each 4 logged steps
    assert logged == pytest.approx([sum(ref_losses[i:i + 4]) / 4 for i in (0, 4, 8)], rel=1e-5)
    report = json.loads((tmp_path / "report.json").read_text())
    eval_loss, eval_tokens = token_weighted_loss(reference, eval_data)
    assert report["eval_loss"] == pytest.approx(eval_loss, rel=1e-5)
    assert report["eval_perplexity"] == pytest.approx(math.exp(eval_loss), rel=1e-5)
    assert report["eval_tokens"] == eval_tokens == 16 * 15
    assert report["optimizer"] == "adamw" and report["optim_args"] == {"betas": [0.9, 0.99]}
    assert report["optimizer_state_bytes"] == 8 * report["trainable_parameters"]
    assert report["optimizer_state_bytes_per_trainable_parameter"] == 8.0
    assert report["train_tokens"] == 12 * 8 * 16
    # tokens/s leaves out the one step whose memory is tracked by category (docs/estimate.md), as it leaves out eval
    assert report["memory_tracked_step"] is not None
    timed_tokens = report["train_tokens"] - report["train_tokens"] // report["global_steps"]
    timed_seconds = report["train_runtime_s"] - report["memory_tracking_seconds"]
    assert report["tokens_per_second"] == pytest.approx(timed_tokens / timed_seconds, rel=1e-9)
    # the peak holds at least the weights, their gradients and the optimizer state
    assert report["peak_memory_kind"] == "cpu_peak_rss"
    assert report["weight_bytes"] == report["gradient_bytes"] == 4 * report["trainable_parameters"]
    assert report["peak_memory_bytes"] >= (report["weight_bytes"] + report["gradient_bytes"]
                                           + report["optimizer_state_bytes"])


def test_hf_name_still_behaves_as_hf(tmp_path):
    args = make_args(tmp_path, optim="adamw_torch", max_steps=2)
    assert args.optim == transformers.training_args.OptimizerNames.ADAMW_TORCH
    trainer = memtrain.Trainer(model=tiny_llama(), args=args, train_dataset=pattern_dataset())
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(inner) is torch.optim.AdamW


def test_unknown_optimizer_fails_at_parse_time_with_known_names():
    parser = HfArgumentParser(memtrain.TrainingArguments)
    with pytest.raises(ValueError) as e:
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--optim", "adamz", "--use_cpu"])
    msg = str(e.value)
    assert "'adamz'" in msg and "adamw" in msg and "adamw_torch" in msg and "galore_adamw" in msg
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--optim", "adamw", "--use_cpu"])
    assert args.optim == "adamw"


def test_bad_optim_args_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'rank' for optimizer adamw; accepted options: betas, eps"):
        make_args(tmp_path, optim="adamw", optim_args="rank=4")


@pytest.mark.parametrize("route", ["memtrain_trainer", "hf_trainer_factory"])
def test_scheduled_lr_and_wd_are_what_the_groups_use(tmp_path, route):
    data = pattern_dataset()
    if route == "memtrain_trainer":
        args = make_args(tmp_path, optim="adamw", learning_rate=7e-4, weight_decay=0.05, max_steps=1)
        trainer = memtrain.Trainer(model=tiny_llama(), args=args, train_dataset=data)
    else:
        args = transformers.TrainingArguments(str(tmp_path), learning_rate=7e-4, weight_decay=0.05, max_steps=1,
                                              use_cpu=True, report_to="none", save_strategy="no")
        trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=data,
                                       optimizer_cls_and_kwargs=optimizer_factory(
                                           "adamw", lr=args.learning_rate, weight_decay=args.weight_decay))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    groups = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, memtrain.optim.MemtrainOptimizer)
    for g in groups:
        assert g["initial_lr"] == g["lr"] == 7e-4
        assert g["weight_decay"] == (0.0 if g["role"] == "vector" else 0.05)


def test_factory_requires_lr():
    with pytest.raises(TypeError):
        optimizer_factory("adamw")
    with pytest.raises(TypeError, match="unknown option 'foo'"):
        optimizer_factory("adamw", lr=1e-3, foo=1)


@pytest.mark.slow
def test_resume_from_checkpoint_reproduces_uninterrupted_run(tmp_path):
    data = pattern_dataset()
    straight = memtrain.Trainer(model=tiny_llama(), args=make_args(tmp_path / "a", optim="adamw", max_steps=6),
                                train_dataset=data)
    straight.train()

    first = memtrain.Trainer(model=tiny_llama(),
                             args=make_args(tmp_path / "b", optim="adamw", max_steps=6, save_strategy="steps",
                                            save_steps=3), train_dataset=data)
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-3"
    optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optim_state["state"]) == len(list(tiny_llama().parameters()))

    resumed = memtrain.Trainer(model=tiny_llama(seed=7),
                               args=make_args(tmp_path / "c", optim="adamw", max_steps=6), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(a, b), n
    assert os.path.exists(tmp_path / "c" / "report.json")
