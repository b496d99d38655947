"""Layer-wise release through the Trainer: same training as the standard loop (with accumulation and the lr
schedule), checkpoint + resume continues identically, HF's own Trainer on the factory route, refusals."""
import pytest
import torch
import transformers

import memtrain
from memtrain.hf import find_layerwise, optimizer_factory

from ..conftest import tiny_llama
from .test_trainer import make_args, pattern_dataset

COMMON = dict(optim="galore", optim_args="rank=4,update_proj_gap=2", max_grad_norm=0.0, learning_rate=1e-2,
              lr_scheduler_type="cosine", warmup_steps=2)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_layerwise_trainer_equals_standard_with_accumulation(tmp_path):
    data = pattern_dataset()
    runs = {}
    for layerwise in (False, True):
        args = make_args(tmp_path / str(layerwise), max_steps=5, gradient_accumulation_steps=2,
                         per_device_train_batch_size=4, layerwise=layerwise, **COMMON)
        trainer = memtrain.Trainer(model=tiny_llama(), args=args, train_dataset=data)
        trainer.train()
        assert (find_layerwise(trainer.optimizer) is not None) == layerwise
        runs[layerwise] = (trainer, _params(trainer))
    (std, std_params), (lw, lw_params) = runs[False], runs[True]
    for n in std_params:
        torch.testing.assert_close(lw_params[n], std_params[n], rtol=0, atol=1e-6, msg=n)
    # one scheduler step per optimizer step: the same lr at the end, and the same logged losses and grad norms
    assert lw.lr_scheduler.get_last_lr() == std.lr_scheduler.get_last_lr()
    log = lambda t, key: [h[key] for h in t.state.log_history if key in h and "train_loss" not in h]  # noqa: E731
    assert log(lw, "loss") == pytest.approx(log(std, "loss"), rel=1e-6)
    assert log(lw, "grad_norm") == pytest.approx(log(std, "grad_norm"), rel=1e-5)
    assert lw.report_callback.last_report["optimizer_state_bytes"] == std.report_callback.last_report[
        "optimizer_state_bytes"]


def test_layerwise_checkpoint_resume_continues_identically(tmp_path):
    data = pattern_dataset()
    straight = memtrain.Trainer(model=tiny_llama(), args=make_args(tmp_path / "a", max_steps=6, layerwise=True,
                                                                   **COMMON), train_dataset=data)
    straight.train()
    first = memtrain.Trainer(model=tiny_llama(), args=make_args(tmp_path / "b", max_steps=6, layerwise=True,
                                                                save_strategy="steps", save_steps=3, **COMMON),
                             train_dataset=data)
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-3"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) == len(list(tiny_llama().parameters()))  # every parameter's state is saved
    resumed = memtrain.Trainer(model=tiny_llama(seed=7), args=make_args(tmp_path / "c", max_steps=6, layerwise=True,
                                                                        **COMMON), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(a, b), n


def test_hf_trainer_with_the_factory_honours_accumulation(tmp_path):
    data = pattern_dataset()
    finals = []
    for layerwise in (False, True):
        args = transformers.TrainingArguments(str(tmp_path / str(layerwise)), learning_rate=1e-2, max_steps=3,
                                              gradient_accumulation_steps=2, per_device_train_batch_size=4,
                                              max_grad_norm=0.0, use_cpu=True, report_to="none", save_strategy="no",
                                              seed=0, data_seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=data,
                                       optimizer_cls_and_kwargs=optimizer_factory(
                                           "adamw", lr=args.learning_rate, weight_decay=0.0, layerwise=layerwise))
        trainer.train()
        finals.append(_params(trainer))
    for n in finals[0]:
        torch.testing.assert_close(finals[1][n], finals[0][n], rtol=0, atol=1e-6, msg=n)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="cannot clip the global gradient norm.*per-parameter clipping"):
        make_args(tmp_path, optim="galore", layerwise=True)  # HF's default max_grad_norm is 1.0
    with pytest.raises(ValueError, match="cannot clip the global gradient norm"):
        make_args(tmp_path, optim="adamw", optim_args="layerwise=true", max_grad_norm=0.5)
    with pytest.raises(ValueError, match="needs a memtrain optimizer"):
        make_args(tmp_path, optim="adamw_torch", layerwise=True, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="non-reentrant gradient checkpointing"):
        make_args(tmp_path, optim="adamw", layerwise=True, max_grad_norm=0.0, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": True})


def test_engine_refusals(tmp_path, monkeypatch):
    """FSDP2 is allowed (from the arguments or accelerate launch's environment); FSDP1 and DeepSpeed are refused."""
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # HF's FSDP setup writes it; restored after
    with pytest.raises(ValueError, match="does not support FSDP1: FSDP1 reduce-scatters one flat gradient"):
        make_args(tmp_path, optim="adamw", layerwise=True, max_grad_norm=0.0, fsdp="full_shard",
                  fsdp_config={"version": 1})
    make_args(tmp_path, optim="adamw", layerwise=True, max_grad_norm=0.0, fsdp="full_shard")  # version 2, HF's default
    args = make_args(tmp_path, optim="adamw", layerwise=True, max_grad_norm=0.0)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with the fsdp2 engine config
    monkeypatch.setenv("FSDP_VERSION", "2")
    args._check_layerwise()
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="does not support FSDP1"):
        args._check_layerwise()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO"):
        args._check_layerwise()


def test_optim_target_modules_reach_the_optimizer(tmp_path):
    args = make_args(tmp_path, optim="galore", optim_args="rank=4", optim_target_modules=["q_proj"], max_steps=1)
    trainer = memtrain.Trainer(model=tiny_llama(), args=args, train_dataset=pattern_dataset())
    trainer.create_optimizer()
    projected = [n for g in trainer.optimizer.param_groups if g["method"] == "galore" for n in g["names"]]
    assert projected and all(".q_proj." in n for n in projected)
