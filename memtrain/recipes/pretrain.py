"""The pretraining job, ``memtrain pretrain`` (and ``scripts/pretrain.py``): a LLaMA-style model from a named config, trained from
scratch on a text corpus (the embedded Shakespeare corpus by default) with any registered optimizer, ending
with the run report (optimizer-state bytes, peak memory, tokens/s, token-weighted eval perplexity).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import transformers
from transformers import default_data_collator
from transformers.integrations import is_tensorboard_available

from . import data as data_lib
from .arguments import JOB_DEFAULTS, BlockArguments, check_output_dir, check_run_arguments, run_job
from ..hf import Trainer, TrainingArguments
from ..hf.trainer import FinalEvalError
from .models import DEFAULT_MODEL, build_model, get_model_config

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelDataArguments(BlockArguments):
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Named config (llama-tiny, llama-20m, llama-60m, llama-130m, llama-350m, llama-1b, llama-7b), a "
                "config .json, or a directory saved with save_pretrained."})
    model_dtype: str = field(default="float32", metadata={
        "help": "Dtype of the model weights: float32, or bfloat16/float16 for pure low-precision training "
                "(optimizer math and states stay fp32).", "choices": list(DTYPES)})
    dataset: str = field(default=data_lib.EMBEDDED_DATASET, metadata={
        "help": "'shakespeare' (embedded default corpus), a local .txt/.jsonl/.parquet file or directory, a "
                "directory saved with datasets' save_to_disk, a directory of token shards written by `memtrain "
                "prepare-data`, or a Hugging Face Hub dataset NAME[:CONFIG] (online: downloaded or streamed; "
                "offline, HF_DATASETS_OFFLINE/HF_HUB_OFFLINE: from the local cache). See docs/data.md."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "A saved tokenizer directory or a Hub model id. Default: train a byte-level BPE on the training "
                "split (streaming: on the first --tokenizer_sample_bytes of it), cached."})
    streaming: str = field(default="auto", metadata={
        "help": "Stream the corpus (tokenize and pack on the fly, split across ranks and workers, resumable): "
                "true, false, or auto = stream local sources over 1 GiB and Hub datasets while online.",
        "choices": ["auto", "true", "false"]})
    eval_split: str | None = field(default=None, metadata={
        "help": "Streaming: the source split for eval (e.g. validation). Default: the stream's head is held out."})
    stream_window_docs: int = field(default=256, metadata={
        "help": "Streaming: documents packed together; the unit split across ranks and dataloader workers."})
    stream_shuffle_buffer: int = field(default=10_000, metadata={
        "help": "Streaming: documents in the seeded shuffle buffer (0: source order)."})
    tokenizer_sample_bytes: int = field(default=64 << 20, metadata={
        "help": "Streaming: bytes of the stream's head a trained tokenizer learns from."})
    vocab_size: int | None = field(default=None, metadata={
        "help": "Vocabulary of the trained tokenizer. Default: the model config's vocab_size."})
    save_final_model: bool = field(default=True, metadata={
        "help": "Save the trained model and its tokenizer to output_dir (for memtrain finetune)."})
    list_optimizers: bool = field(default=False, metadata={"help": "Print the registered optimizers and exit."})


# The main job's defaults: a few minutes on a 2-core CPU. Flags and config files override them.
PRETRAIN_DEFAULTS = {
    **JOB_DEFAULTS,
    "output_dir": "out/pretrain",
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},  # cosine to 10% of the peak (docs/benchmarks/README.md)
    "warmup_steps": 0.1,  # a float below 1 is a fraction of the steps
    "max_steps": 400,
    "report_to": "tensorboard" if is_tensorboard_available() else "none",
}


def run(margs: ModelDataArguments, args: TrainingArguments) -> dict:
    """Build data, model and Trainer; train; evaluate; return the report."""
    config = get_model_config(margs.model)
    check_run_arguments(args, seq_len=margs.seq_len, max_eval_samples=margs.max_eval_samples,
                        max_train_samples=margs.max_train_samples, config=config, model=margs.model)
    check_output_dir(args)
    transformers.set_seed(args.seed)
    vocab_size = margs.vocab_size or config.vocab_size
    with args.main_process_first(desc="corpus, tokenizer and dataset cache"):
        lm = data_lib.build_lm_data(
            margs.dataset, tokenizer=margs.tokenizer, seq_len=margs.seq_len, vocab_size=vocab_size,
            val_fraction=margs.val_fraction, max_train_samples=margs.max_train_samples,
            max_eval_samples=margs.max_eval_samples, text_column=margs.text_column, streaming=margs.streaming,
            seed=args.seed, eval_split=margs.eval_split, window_docs=margs.stream_window_docs,
            shuffle_buffer=margs.stream_shuffle_buffer, tokenizer_sample_bytes=margs.tokenizer_sample_bytes,
            rank=args.process_index, world_size=args.world_size,
        )
    logger.info("data: %s", lm.summary())
    tok = lm.tokenizer
    model = build_model(
        margs.model,
        vocab_size=max(vocab_size, len(tok)),
        special_token_ids={"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                           "pad_token_id": tok.pad_token_id},
        dtype=DTYPES[margs.model_dtype],
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm.train, eval_dataset=lm.eval,
                      data_collator=default_data_collator, processing_class=tok)
    if lm.mode == "stream":
        data_lib.attach_stream(trainer, lm.train)
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except FinalEvalError:
        if margs.save_final_model:  # training completed: keep it, then fail
            trainer.save_model(args.output_dir)
        raise
    if margs.save_final_model:
        trainer.save_model(args.output_dir)
    return trainer.report_callback.last_report


def main(argv=None) -> dict | None:
    """``memtrain pretrain`` (and ``scripts/pretrain.py``): parse flags and config file, train, report."""
    return run_job(lambda margs, args, _: run(margs, args), (ModelDataArguments, TrainingArguments), PRETRAIN_DEFAULTS,
                   argv)
