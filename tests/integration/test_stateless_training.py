"""SWAN, SinkGD and SCALE through memtrain's TrainingArguments/Trainer and the CLI parser: on the embedded corpus, the
Trainer's run equals the same batches through a plain loop with the optimizer the configuration names (the lrs it
gives), and the report's token-weighted eval loss equals one computed by hand."""
import copy

import pytest
import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

import memtrain
from memtrain.recipes.data import build_lm_data

from .reference_run import Recorder, assert_same_parameters, plain_training, token_weighted_loss

STEPS = 15
# lr of the owned matrices, and adam_lr of the rest (SCALE: of the norm gains; its embedding/head use lr)
SETTINGS = {
    "swan": ("ns_steps=10", 1e-2, 1e-2),
    "sinkgd": ("iterations=5", 1e-2, 1e-2),
    "scale": ("momentum=0.9", 1e-2, 1e-2),
}


@pytest.fixture(scope="module")
def lm_data():
    return build_lm_data(seq_len=128, vocab_size=4096, max_train_samples=STEPS * 8, max_eval_samples=8)


def small_llama(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, use_cache=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_trains_like_a_plain_loop_through_the_trainer(name, lm_data, tmp_path):
    extra, lr, adam_lr = SETTINGS[name]
    args = memtrain.TrainingArguments(
        output_dir=str(tmp_path), optim=name, optim_args=f"{extra},adam_lr={adam_lr}", learning_rate=lr,
        weight_decay=0.01, max_steps=STEPS, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        lr_scheduler_type="constant", logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    model, recorder = small_llama(len(lm_data.tokenizer)), Recorder()
    reference = copy.deepcopy(model)
    trainer = memtrain.Trainer(model=model, args=args, train_dataset=lm_data.train, eval_dataset=lm_data.eval,
                               data_collator=recorder)
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    opt = trainer.optimizer
    assert type(opt).name == name
    for group in opt.param_groups:  # the lr the Trainer schedules is the lr each group uses
        fallback = group["role"] == "vector" if name == "scale" else group["role"] != "matrix"
        assert group["initial_lr"] == group["lr"] == (adam_lr if fallback else lr)
        assert group["weight_decay"] == (0.0 if group["role"] == "vector" else 0.01)
    trainer.train()
    options = memtrain.parse_optim_args(name, extra)
    plain_training(reference, recorder.batches[:STEPS],
                   memtrain.build_optimizer(reference, name, lr=lr, weight_decay=0.01, adam_lr=adam_lr, **options))
    # the same fp32 operations; SWAN's Newton–Schulz may amplify an ulp (docs/optimizers/swan.md): lr·1e-4
    assert_same_parameters(trainer.model, reference, rtol=1e-5, atol=lr * 1e-4)
    report = trainer.report_callback.last_report
    assert report["optimizer"] == name
    eval_loss, eval_tokens = token_weighted_loss(reference, lm_data.eval)
    assert report["eval_loss"] == pytest.approx(eval_loss, rel=1e-4) and report["eval_tokens"] == eval_tokens


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_cli_flags_parse_to_the_optimizer(name):
    parser = HfArgumentParser(memtrain.TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--optim", name, "--optim_args", "adam_lr=0.005", "--use_cpu"])
    assert args.optim == name and memtrain.parse_optim_args(name, args.optim_args) == {"adam_lr": 0.005}
    with pytest.raises(ValueError, match=f"unknown option 'rank' for optimizer {name}"):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--optim", name, "--optim_args", "rank=4"])
