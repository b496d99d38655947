"""Hugging Face integration: drop-in ``TrainingArguments`` / ``Trainer`` that know memtrain's optimizers,
an ``optimizer_factory`` for users who keep HF's own classes, and the end-of-run report.

This is the one module of the library that touches the HF Trainer machinery.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback
from transformers.training_args import OptimizerNames

from . import metrics
from .optim import registry
from .optim.routing import format_param_groups

logger = logging.getLogger(__name__)

HF_OPTIMIZERS = tuple(o.value for o in OptimizerNames)


def _optim_name(optim) -> str:
    return str(optim.value if isinstance(optim, Enum) else optim)


def is_memtrain_optimizer(optim) -> bool:
    """memtrain names take precedence where a name is also HF's (``adafactor``)."""
    return _optim_name(optim) in registry.optimizer_names()


# -- the optimizer factory --------------------------------------------------------------------------------
class MemtrainOptimizerFactory:
    """What HF Trainer instantiates for ``optimizer_cls_and_kwargs=(factory, kwargs)``: it calls
    ``MemtrainOptimizerFactory()(model, **kwargs)``; we route the model's parameters and build the optimizer."""

    def __call__(self, model: torch.nn.Module, *, name: str, lr: float, weight_decay: float,
                 print_param_groups: bool = False, **options):
        optimizer = registry.build_optimizer(model, name, lr=lr, weight_decay=weight_decay, **options)
        table = format_param_groups(optimizer.param_groups)
        if print_param_groups and _is_main_process():
            print(f"memtrain: {name} parameter groups\n{table}", flush=True)
        else:
            logger.info("memtrain: %s parameter groups\n%s", name, table)
        return optimizer


def optimizer_factory(name: str, *, lr: float, weight_decay: float = 0.0, optim_args: str | None = None,
                      **options) -> tuple[type, dict]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    HF's Trainer passes neither ``learning_rate`` nor ``weight_decay`` to a factory, so both are explicit
    here: give the values of your TrainingArguments (the Trainer's lr schedule multiplies this lr).
    Options are validated now, so a typo fails before training starts.
    """
    options = {**registry.parse_optim_args(name, optim_args), **options}
    spec = registry.get_spec(name)
    registry.validate_options(name, {**spec.defaults, **options, "lr": lr, "weight_decay": weight_decay})
    return MemtrainOptimizerFactory, {"name": name, "lr": lr, "weight_decay": weight_decay, **options}


def optimizer_kwargs_from_args(args: transformers.TrainingArguments) -> dict[str, Any]:
    """lr, weight decay, betas and ε from TrainingArguments (when the optimizer takes them), then optim_args."""
    name = _optim_name(args.optim)
    accepted = registry.get_spec(name).options()
    kwargs: dict[str, Any] = {}
    if "betas" in accepted:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in accepted:
        kwargs["eps"] = args.adam_epsilon
    kwargs.update(registry.parse_optim_args(name, args.optim_args))
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay, **kwargs}


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- TrainingArguments ------------------------------------------------------------------------------------
@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF ``TrainingArguments`` whose ``optim`` also accepts every memtrain optimizer name.

    HF names keep HF's meaning, except ``adafactor``, which is memtrain's own implementation (identical to
    HF's Trainer ``adafactor`` at default options). ``optim_args="k=v,k=v"`` is parsed into the optimizer's
    typed keyword options and validated here, so mistakes fail at argument-parsing time.
    """

    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer: a memtrain name (see `python -m memtrain.optim`) or any HF OptimizerNames value."},
    )
    print_param_groups: bool = field(
        default=False, metadata={"help": "Print the resolved parameter routing (role, method, lr, wd per group)."}
    )
    final_eval: bool = field(
        default=True, metadata={"help": "After train(), evaluate token-weighted perplexity on the whole eval set."}
    )
    write_report: bool = field(
        default=True, metadata={"help": "After train(), print the run report and write output_dir/report.json."}
    )

    def __post_init__(self):
        name = _optim_name(self.optim)
        if is_memtrain_optimizer(name):
            registry.parse_optim_args(name, self.optim_args)  # fail now on a bad option
            self.optim = OptimizerNames.ADAMW_TORCH.value  # HF validates its own enum; restore ours after
            super().__post_init__()
            self.optim = name
        elif name in HF_OPTIMIZERS:
            super().__post_init__()
        else:
            raise ValueError(
                f"unknown optimizer {name!r}. memtrain optimizers: {', '.join(registry.optimizer_names())}. "
                f"Hugging Face optimizers: {', '.join(HF_OPTIMIZERS)}."
            )


# -- the report -------------------------------------------------------------------------------------------
class ReportCallback(TrainerCallback):
    """Collects what the run report needs: train time (without evaluation), tokens, memory, final losses.

    memtrain's Trainer adds it and writes the report after its final evaluation. With HF's own Trainer add
    ``ReportCallback(tokens_per_step=...)`` to ``callbacks``; it then writes the report at the end of training.
    """

    def __init__(self, tokens_per_step: int | None = None, write_on_train_end: bool = True):
        self.tokens_per_step = tokens_per_step
        self.write_on_train_end = write_on_train_end
        self.local_tokens = 0  # counted by memtrain's Trainer; summed across ranks at the end
        self.eval_metrics: dict[str, float] = {}
        self.eval_history: list[dict[str, float]] = []  # (step, loss, perplexity) of every evaluation
        self.eval_seconds = 0.0
        self.train_seconds = 0.0
        self.optimizer = None
        self.model = None
        self.train_loss: float | None = None
        self.last_report: dict[str, Any] | None = None
        self._start = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        metrics.reset_peak_memory(args.device)
        self.eval_seconds = 0.0
        self._start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_loss" in logs:
            self.train_loss = logs["train_loss"]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            self.eval_metrics = dict(metrics)
            self.eval_seconds += float(metrics.get("eval_runtime", 0.0))
            if "eval_loss" in metrics:
                self.eval_history.append({"step": state.global_step, "loss": metrics["eval_loss"],
                                          "perplexity": metrics.get("eval_perplexity")})

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.train_seconds = time.perf_counter() - self._start - self.eval_seconds
        self.model, self.optimizer = model, optimizer
        if self.write_on_train_end:
            self.write(args, state)

    def train_tokens(self, args, state) -> int:
        if self.local_tokens:
            total = torch.tensor(self.local_tokens, dtype=torch.int64, device=args.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(total)
            return int(total.item())
        if self.tokens_per_step:
            return self.tokens_per_step * state.global_step
        return int(state.num_input_tokens_seen or 0)

    def report(self, args, state) -> dict[str, Any]:
        tokens = self.train_tokens(args, state)
        model_mem = metrics.model_memory(self.model)
        state_bytes = metrics.optimizer_state_bytes(self.optimizer) if self.optimizer is not None else 0
        optim = _optim_name(args.optim)
        report = {
            "optimizer": optim,
            "optim_args": registry.parse_optim_args(optim, args.optim_args) if is_memtrain_optimizer(optim)
            else args.optim_args,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            **model_mem,
            "optimizer_state_bytes": state_bytes,
            "optimizer_state_bytes_per_trainable_parameter": state_bytes / max(1, model_mem["trainable_parameters"]),
            **metrics.peak_memory(args.device),
            "global_steps": state.global_step,
            "train_tokens": tokens,
            "train_runtime_s": round(self.train_seconds, 3),
            "tokens_per_second": tokens / self.train_seconds if self.train_seconds > 0 else None,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_metrics.get("eval_loss"),
            "eval_perplexity": self.eval_metrics.get("eval_perplexity"),
            "eval_tokens": self.eval_metrics.get("eval_tokens"),
            "eval_history": self.eval_history,
            "world_size": args.world_size,
            "device": str(args.device),
        }
        return report

    def write(self, args, state) -> dict[str, Any]:
        report = self.last_report = self.report(args, state)
        if args.should_save or _is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
            path = os.path.join(args.output_dir, "report.json")
            with open(path, "w") as f:
                json.dump(report, f, indent=2, default=str)
            print(format_report(report) + f"\nreport written to {path}", flush=True)
        return report


def format_report(report: dict[str, Any]) -> str:
    def mib(x):
        return f"{x / 2**20:,.2f} MiB" if isinstance(x, (int, float)) else "n/a"

    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "n/a"

    lines = [
        "memtrain report",
        f"  optimizer            {report['optimizer']} {report['optim_args'] or ''}".rstrip(),
        f"  parameters           {report['parameters']:,} ({report['trainable_parameters']:,} trainable)",
        f"  optimizer state      {report['optimizer_state_bytes']:,} B = {mib(report['optimizer_state_bytes'])} "
        f"({report['optimizer_state_bytes_per_trainable_parameter']:.3f} B/param)",
        f"  weights / grads      {mib(report['weight_bytes'])} / {mib(report['gradient_bytes'])}",
        f"  peak memory          {mib(report['peak_memory_bytes'])} ({report['peak_memory_kind']})",
        f"  steps / tokens       {report['global_steps']} / {report['train_tokens']:,} in {report['train_runtime_s']} s "
        f"= {num(report['tokens_per_second'], ',.0f')} tokens/s",
        f"  train loss           {num(report['train_loss'], '.4f')}",
        f"  eval loss / ppl      {num(report['eval_loss'], '.4f')} / {num(report['eval_perplexity'], '.3f')} "
        f"over {num(report['eval_tokens'], ',')} tokens (token-weighted)",
    ]
    return "\n".join(lines)


# -- Trainer ----------------------------------------------------------------------------------------------
class Trainer(transformers.Trainer):
    """HF ``Trainer`` that builds memtrain optimizers by name, evaluates token-weighted perplexity, and writes a
    report at the end of ``train()``. With an HF optimizer name it behaves exactly as HF's Trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.report_callback = ReportCallback(write_on_train_end=False)
        self.add_callback(self.report_callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and is_memtrain_optimizer(self.args.optim):
            factory, kwargs = optimizer_factory(
                _optim_name(self.args.optim), **optimizer_kwargs_from_args(self.args),
            )
            kwargs["print_param_groups"] = getattr(self.args, "print_param_groups", False)
            self.optimizer_cls_and_kwargs = (factory, kwargs)
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if ids is not None:
            self.report_callback.local_tokens += ids.numel()  # summed across ranks once, in the report
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if getattr(self.args, "final_eval", True) and self.eval_dataset is not None:
            self.evaluate()
        if getattr(self.args, "write_report", True):
            self.report_callback.train_loss = output.training_loss
            report = self.report_callback.write(self.args, self.state)
            self.log({k: v for k, v in report.items()
                      if k in ("optimizer_state_bytes", "peak_memory_bytes", "tokens_per_second")})
        return output

    def _eval_loader(self, dataset) -> DataLoader:
        """Each rank takes every world_size-th example, with no padding or repeats, so the summed token counts
        cover the eval set exactly once whatever the number of ranks."""
        world = self.args.world_size
        rank = self.args.process_index
        columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
        dataset = dataset.select_columns(columns).with_format("torch")
        return DataLoader(Subset(dataset, range(rank, len(dataset), world)),
                          batch_size=self.args.per_device_eval_batch_size, shuffle=False)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted loss and perplexity over the whole eval set: exp(Σ NLL / N tokens), summed across ranks."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        start = time.perf_counter()
        with self.compute_loss_context_manager():
            result = metrics.evaluate_perplexity(self.model, self._eval_loader(dataset), device=self.args.device)
        out = {
            f"{metric_key_prefix}_loss": result["loss"],
            f"{metric_key_prefix}_perplexity": result["perplexity"],
            f"{metric_key_prefix}_tokens": result["tokens"],
            f"{metric_key_prefix}_runtime": round(time.perf_counter() - start, 4),
        }
        self.log(out)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, out)
        return out
