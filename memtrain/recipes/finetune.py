"""The fine-tuning job, ``memtrain finetune`` (and ``scripts/finetune.py``): a local causal LM (e.g. saved by ``memtrain pretrain``)
fine-tuned on a local text dataset with a PEFT LoRA adapter (``lora``, ``gradnormlorp``, ``lorapro``,
``allora``) or fully (``full``), with any registered memtrain optimizer for the trainable parameters. It ends
with pretrain's run report plus the adapter's numbers, saves the adapter in PEFT's format, and with ``--merge``
also a plain merged model that loads with ``from_pretrained``.

``--benchmark`` runs several entries through this job (``memtrain.bench.finetune``).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import default_data_collator

from .. import adapters
from ..hf.engines import trainer_engine
from . import data as data_lib
from .arguments import (JOB_DEFAULTS, BlockArguments, check_output_dir, check_run_arguments, check_tokenizer_dir,
                        run_job)
from ..hf import Trainer, TrainingArguments, optimizer_kwargs_from_args
from ..hf.factory import _optim_name
from ..hf.report import write_json
from ..hf.trainer import FinalEvalError
from .models import build_model, get_model_config
from ..optim import registry
from .pretrain import DTYPES

logger = logging.getLogger(__name__)

ADAPTER_CHOICES = (*adapters.ADAPTERS, "full")
RUN_CONFIG = "memtrain_adapter.json"  # adapter name and method options (LoraConfig cannot carry them)


@dataclass
class FinetuneArguments(BlockArguments):
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Directory of a local causal LM saved with save_pretrained (e.g. by memtrain pretrain)."})
    adapter: str = field(default="lora", metadata={
        "help": "lora, gradnormlorp, lorapro, allora, or full (no adapter: full fine-tuning).",
        "choices": list(ADAPTER_CHOICES)})
    adapter_args: str | None = field(default=None, metadata={
        "help": "Method options 'k=v,k=v': lorapro mode, x_mode, delta, other_lora_layers; allora eta, "
                "norm_target, norm_power; gradnormlorp detach_norm, proj_rank, update_proj_gap, proj_scale."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={
        "help": "LoRA alpha. Default 2·r; ALLoRA uses alpha = r (no α/r scaling) and rejects any other value."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (ALLoRA requires 0)."})
    target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names to adapt, or 'all-linear'."})
    peft_config: str | None = field(default=None, metadata={
        "help": "A JSON file holding a LoraConfig; replaces --lora_r/--lora_alpha/--lora_dropout/--target_modules."})
    merge: bool = field(default=False, metadata={
        "help": "Also write the adapter merged into the base weights to output_dir/merged (a plain model)."})
    model_dtype: str = field(default="float32", metadata={"help": "Dtype of the loaded model.",
                                                           "choices": list(DTYPES)})
    dataset: str = field(default=data_lib.EMBEDDED_DATASET, metadata={
        "help": "A local .txt/.jsonl file or directory, a saved datasets directory, or 'shakespeare'."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Directory of the tokenizer. Default: the model's directory."})
    eval_before_training: bool = field(default=True, metadata={
        "help": "Evaluate before fine-tuning too (report: eval_perplexity_before)."})
    benchmark: list[str] = field(default_factory=list, metadata={
        "help": "Benchmark mode: entries 'adapter[:adapter_args][@lr[,lr...]]' (e.g. lora@1e-3,3e-3 "
                "lorapro:mode=efficient full@1e-4), each run through this script with the other flags; an lr grid "
                "is tuned (best eval perplexity), then re-run with every --benchmark_seeds; writes --benchmark_out "
                "and its .json."})
    benchmark_seeds: list[int] = field(default_factory=list, metadata={
        "help": "Benchmark mode: the seeds each entry's tuned lr runs with (the grid uses the first). "
                "Default: --seed."})
    benchmark_out: str = field(default="docs/benchmarks/finetune.md", metadata={
        "help": "Markdown file written in benchmark mode."})
    list_optimizers: bool = field(default=False, metadata={"help": "Print the registered optimizers and exit."})


FINETUNE_DEFAULTS = {
    **JOB_DEFAULTS,
    "output_dir": "out/finetune",
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "max_steps": 200,
    "report_to": "none",
}


def load_lora_config(fargs: FinetuneArguments):
    """The user's LoraConfig (``--peft_config``) or one built from the flags; task type causal LM."""
    from peft import LoraConfig

    if fargs.peft_config:
        path = Path(fargs.peft_config)
        if not path.is_file():
            raise FileNotFoundError(f"--peft_config {str(path)!r} does not exist")
        fields = json.loads(path.read_text())
        if fields.pop("peft_type", "LORA") != "LORA":
            raise ValueError(f"--peft_config {str(path)!r} must hold a LoraConfig (peft_type LORA)")
        fields.setdefault("task_type", "CAUSAL_LM")
        return LoraConfig(**fields)
    targets = fargs.target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    alpha = fargs.lora_alpha
    if alpha is None:
        alpha = fargs.lora_r if fargs.adapter == "allora" else 2 * fargs.lora_r
    return LoraConfig(r=fargs.lora_r, lora_alpha=alpha, lora_dropout=fargs.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def _adapter_factory_kwargs(fargs: FinetuneArguments, args: TrainingArguments, options: dict) -> dict:
    """What HF Trainer passes to ``AdapterFactory``: lr and weight decay explicitly (it passes neither itself)."""
    kwargs = {"create": functools.partial(adapters.create_optimizer, fargs.adapter), "optim": _optim_name(args.optim),
              **options}
    if fargs.adapter == "lora":  # plain LoRA: exactly what memtrain's Trainer builds for --optim
        kwargs.update(optimizer_kwargs_from_args(args))
    else:  # the adapter's own Adam on its tensors takes TrainingArguments' betas; optim_args go to --optim
        kwargs.update(lr=args.learning_rate, weight_decay=args.weight_decay, optim_args=args.optim_args,
                      betas=(args.adam_beta1, args.adam_beta2))
    return kwargs


def check_engine(trainer, adapter: str, options: dict) -> None:
    """Refuse, before training, an engine the adapter would get wrong (the rules: memtrain.optim.capabilities;
    each adapter's needs: ``adapters.engine_refusal``). Full fine-tuning is checked as its optimizer is."""
    refusal = adapters.engine_refusal(adapter, trainer_engine(trainer), options) if adapter != "full" else None
    if refusal:
        raise ValueError(refusal)


def run(fargs: FinetuneArguments, args: TrainingArguments) -> dict:
    if not fargs.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a directory saved by memtrain pretrain or "
                         "save_pretrained")
    if fargs.adapter not in ADAPTER_CHOICES:
        raise ValueError(f"--adapter must be one of {', '.join(ADAPTER_CHOICES)}, got {fargs.adapter!r}")
    if fargs.adapter != "full" and _optim_name(args.optim) not in registry.optimizer_names():
        raise ValueError(f"--optim {_optim_name(args.optim)!r}: adapters need a memtrain optimizer; choose one of "
                         f"{', '.join(registry.optimizer_names())}")
    options = adapters.parse_adapter_args(fargs.adapter, fargs.adapter_args) if fargs.adapter != "full" else {}
    if not Path(fargs.model_name_or_path).is_dir():
        raise ValueError(f"--model_name_or_path {fargs.model_name_or_path!r} is not a directory: give a model saved "
                         "by memtrain pretrain or save_pretrained")
    check_run_arguments(args, seq_len=fargs.seq_len, max_eval_samples=fargs.max_eval_samples,
                        max_train_samples=fargs.max_train_samples, config=get_model_config(fargs.model_name_or_path),
                        model=fargs.model_name_or_path)
    check_tokenizer_dir(fargs.tokenizer or fargs.model_name_or_path,
                        "--tokenizer" if fargs.tokenizer else "--model_name_or_path (no --tokenizer given)")
    check_output_dir(args)
    transformers.set_seed(args.seed)
    with args.main_process_first(desc="dataset cache"):
        lm = data_lib.build_lm_data(
            fargs.dataset, tokenizer=fargs.tokenizer or fargs.model_name_or_path, seq_len=fargs.seq_len,
            val_fraction=fargs.val_fraction, max_train_samples=fargs.max_train_samples,
            max_eval_samples=fargs.max_eval_samples, text_column=fargs.text_column,
        )
    logger.info("data: %s", lm.summary())
    model = build_model(fargs.model_name_or_path, vocab_size=len(lm.tokenizer), dtype=DTYPES[fargs.model_dtype])
    factory = None
    if fargs.adapter != "full":
        config = adapters.lora_config(fargs.adapter, base=load_lora_config(fargs), **options)
        model = adapters.wrap(model, fargs.adapter, config)
        factory = (adapters.AdapterFactory, _adapter_factory_kwargs(fargs, args, options))
    trainer = Trainer(model=model, args=args, train_dataset=lm.train, eval_dataset=lm.eval,
                      data_collator=default_data_collator, processing_class=lm.tokenizer,
                      optimizer_cls_and_kwargs=factory)
    check_engine(trainer, fargs.adapter, options)
    before = trainer.evaluate() if fargs.eval_before_training and len(lm.eval) else {}
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except FinalEvalError:
        if trainer.is_world_process_zero():  # training completed: keep the adapter/model, then fail
            trainer.save_model(args.output_dir)
        raise
    report = dict(trainer.report_callback.last_report or {})
    out = Path(args.output_dir)
    if trainer.is_world_process_zero():
        trainer.save_model(args.output_dir)  # PEFT models save adapter_config.json + adapter_model.safetensors
        report.update(adapter=fargs.adapter, adapter_args=options, eval_perplexity_before=before.get("eval_perplexity"),
                      eval_loss_before=before.get("eval_loss"))
        if fargs.adapter != "full":
            (out / RUN_CONFIG).write_text(json.dumps({"adapter": fargs.adapter, "options": options}, indent=2))
            weights = out / "adapter_model.safetensors"
            report["adapter_parameters"] = report.get("trainable_parameters")
            report["adapter_bytes"] = weights.stat().st_size if weights.exists() else None
        if fargs.merge:
            merged_dir = out / "merged"
            merged = model.merge_and_unload() if fargs.adapter != "full" else model
            merged.save_pretrained(merged_dir)
            lm.tokenizer.save_pretrained(merged_dir)
            report["merged_model_dir"] = str(merged_dir)
        write_json(out / "report.json", report)
        print(f"adapter {fargs.adapter}: {report.get('trainable_parameters'):,} trainable parameters, adapter file "
              f"{report.get('adapter_bytes')} B; eval perplexity {report.get('eval_perplexity_before')} -> "
              f"{report.get('eval_perplexity')}", flush=True)
    return report


def load_finetuned(model_dir: str, adapter_dir: str, dtype=torch.float32):
    """Base model + saved adapter, with the method's custom module re-registered from ``memtrain_adapter.json``."""
    run_config = json.loads((Path(adapter_dir) / RUN_CONFIG).read_text())
    model = build_model(model_dir, dtype=dtype)
    return adapters.load(model, adapter_dir, run_config["adapter"], **run_config["options"])


def main(argv=None) -> dict | list | None:
    """``memtrain finetune`` (and ``scripts/finetune.py``); with ``--benchmark`` entries, the fine-tuning benchmark."""
    def job(fargs, args, argv):
        if fargs.benchmark:
            from ..bench.finetune import benchmark

            return benchmark(fargs, args, argv)
        return run(fargs, args)

    return run_job(job, (FinetuneArguments, TrainingArguments), FINETUNE_DEFAULTS, argv)
