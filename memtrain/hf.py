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

from . import accelerate_cpu, distributed, metrics
from .optim import registry
from .optim.layerwise import GLOBAL_CLIP_MESSAGE, LayerwiseOptimizer
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
        if isinstance(optimizer, LayerwiseOptimizer):
            # HF's Trainer marks the last micro-batch of each accumulation window in accelerate's (shared)
            # gradient state before that micro-batch's backward; the hooks step only then.
            from accelerate.state import GradientState

            gradient_state = GradientState()
            optimizer.gate = lambda: gradient_state.sync_gradients
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
    build_args = ("target_modules", "rules")  # routing arguments of build_optimizer, not optimizer options
    registry.validate_options(name, {**spec.defaults, **{k: v for k, v in options.items() if k not in build_args},
                                     "lr": lr, "weight_decay": weight_decay})
    return MemtrainOptimizerFactory, {"name": name, "lr": lr, "weight_decay": weight_decay, **options}


def optimizer_kwargs_from_args(args: transformers.TrainingArguments) -> dict[str, Any]:
    """lr, weight decay, betas and ε from TrainingArguments (when the optimizer takes them), then optim_args.

    A method whose own ε (or betas) default differs from HF's keeps it unless the user set the TrainingArguments
    value: the GaLore family's ε is 1e-6 (galore.md §4), and HF's untouched adam_epsilon=1e-8 must not replace it.
    """
    name = _optim_name(args.optim)
    accepted = registry.get_spec(name).options()
    hf_fields = transformers.TrainingArguments.__dataclass_fields__

    def user_set(option: str, value, *fields: str) -> bool:
        own = accepted[option].default
        hf_default = tuple(hf_fields[f].default for f in fields)
        hf_default = hf_default[0] if len(fields) == 1 else hf_default
        return own is accepted[option].empty or value != hf_default or own == hf_default

    kwargs: dict[str, Any] = {}
    betas = (args.adam_beta1, args.adam_beta2)
    if "betas" in accepted and user_set("betas", betas, "adam_beta1", "adam_beta2"):
        kwargs["betas"] = betas
    if "eps" in accepted and user_set("eps", args.adam_epsilon, "adam_epsilon"):
        kwargs["eps"] = args.adam_epsilon
    if args.optim_target_modules is not None:
        kwargs["target_modules"] = args.optim_target_modules
    kwargs.update(registry.parse_optim_args(name, args.optim_args))
    if getattr(args, "layerwise", False):
        kwargs["layerwise"] = True
    return {"lr": args.learning_rate, "weight_decay": args.weight_decay, **kwargs}


def find_layerwise(optimizer) -> LayerwiseOptimizer | None:
    """The LayerwiseOptimizer inside ``optimizer`` (accelerate wraps it), or None."""
    while optimizer is not None and not isinstance(optimizer, LayerwiseOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


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
    layerwise: bool = field(default=False, metadata={
        "help": "Layer-wise gradient release (memtrain optimizers): update each parameter inside backward and free "
                "its gradient at once. Needs --max_grad_norm 0 (per-parameter clipping: optim_args "
                "layerwise_clip=<norm>). Same as optim_args layerwise=true."})

    def __post_init__(self):
        accelerate_cpu.enable(self)  # CPU only: make FSDP/DeepSpeed configs real (see accelerate_cpu.py)
        name = _optim_name(self.optim)
        if is_memtrain_optimizer(name):
            options = registry.parse_optim_args(name, self.optim_args)  # fail now on a bad option
            self.optim = OptimizerNames.ADAMW_TORCH.value  # HF validates its own enum; restore ours after
            super().__post_init__()
            self.optim = name
            if self.layerwise or options.get("layerwise", False):
                self._check_layerwise()  # after HF's __post_init__, which resolves the FSDP version
        elif name in HF_OPTIMIZERS:
            if self.layerwise:
                raise ValueError(f"--layerwise needs a memtrain optimizer, not HF's {name!r}; memtrain optimizers: "
                                 f"{', '.join(registry.optimizer_names())}")
            super().__post_init__()
        else:
            raise ValueError(
                f"unknown optimizer {name!r}. memtrain optimizers: {', '.join(registry.optimizer_names())}. "
                f"Hugging Face optimizers: {', '.join(HF_OPTIMIZERS)}."
            )

    def _check_layerwise(self) -> None:
        """Refuse what layer-wise release cannot do, before any training starts (galore.md §10.1)."""
        if self.max_grad_norm and self.max_grad_norm > 0:
            raise ValueError(f"{GLOBAL_CLIP_MESSAGE} (got max_grad_norm={self.max_grad_norm})")
        if accelerate_cpu.deepspeed_requested(self):
            raise ValueError("layer-wise release does not support DeepSpeed ZeRO: ZeRO reduces the gradients into "
                             "its own flat buffers and hands the optimizer flat partitions, so no per-parameter hook "
                             "sees a final gradient. Use FSDP2 (configs/accelerate/fsdp2.yaml), DDP or a single "
                             "process, or turn layerwise off")
        if accelerate_cpu.fsdp_version(self) == 1:
            raise ValueError("layer-wise release does not support FSDP1: FSDP1 reduce-scatters one flat gradient that "
                             "mixes parameters and stores it outside autograd, so no per-parameter hook sees a final "
                             "gradient. Use FSDP2 (fsdp_version 2, configs/accelerate/fsdp2.yaml), DDP or a single "
                             "process, or turn layerwise off")
        ckpt_kwargs = self.gradient_checkpointing_kwargs
        if self.gradient_checkpointing and isinstance(ckpt_kwargs, dict) and ckpt_kwargs.get("use_reentrant"):
            raise ValueError("layer-wise release needs non-reentrant gradient checkpointing: with use_reentrant=True a "
                             "parameter's hook can fire on a partial gradient. Set gradient_checkpointing_kwargs="
                             "{'use_reentrant': False} (the default)")


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
        self.extra: dict[str, Any] = {}  # set by memtrain's Trainer: the engine really used
        self._start = None
        self._start_step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        metrics.reset_peak_memory(args.device)
        distributed.COMM.clear()
        self.eval_seconds = 0.0
        self._start_step = state.global_step  # > 0 when resumed
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
        """The run report. Byte counts are this rank's (per device); ``*_per_rank`` lists every rank's."""
        tokens = self.train_tokens(args, state)
        model_mem = metrics.model_memory(self.model)
        state_bytes = metrics.optimizer_state_bytes(self.optimizer) if self.optimizer is not None else 0
        peak = metrics.peak_memory(args.device)
        state_per_rank, peak_per_rank = _gather_ints([state_bytes, peak["peak_memory_bytes"]], args.device)
        steps = state.global_step - self._start_step
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
            "optimizer_state_bytes_per_rank": state_per_rank,
            **peak,
            "peak_memory_bytes_per_rank": peak_per_rank,
            "global_steps": state.global_step,
            # bytes this rank sent through memtrain's own collectives (sharded transforms; not FSDP's or DDP's)
            "optimizer_comm_bytes_per_step": distributed.comm_bytes() / steps if steps else 0.0,
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
            **self.extra,
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


def _gather_ints(values: list[int], device) -> list[list[int]]:
    """Each value as a list over ranks (one all-gather; just ``[[v] for v in values]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [[int(v)] for v in values]
    local = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [[int(g[i]) for g in gathered] for i in range(len(values))]


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
    ]
    if report.get("world_size", 1) > 1:
        lines.append(f"  per rank             state {report['optimizer_state_bytes_per_rank']} B, "
                     f"peak {[round(b / 2**20) for b in report['peak_memory_bytes_per_rank']]} MiB, "
                     f"optimizer comm {report['optimizer_comm_bytes_per_step']:,.0f} B/step")
    lines += [
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

    def _refuse_flattening_engine(self, name: str) -> None:
        """DeepSpeed ZeRO and FSDP1 hand the optimizer flat 1-D partitions that mix rows (and parameters); a
        method that needs the matrix shape would silently degrade there, so it is refused before training."""
        spec = registry.get_spec(name)
        engine = None
        if self.is_deepspeed_enabled and not spec.deepspeed:
            engine = "DeepSpeed ZeRO"
        elif self.is_fsdp_enabled:
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            if getattr(plugin, "fsdp_version", 1) == 1 and spec.needs_matrix_shape:
                engine = "FSDP1"
            elif not spec.fsdp2:
                raise ValueError(
                    f"optimizer {name!r} is not verified exact on FSDP2-sharded weights yet; use DDP "
                    "(configs/accelerate/ddp.yaml) or an optimizer whose capabilities list fsdp2 (python -m memtrain.optim)."
                )
        if engine:
            raise ValueError(
                f"optimizer {name!r} needs each weight's matrix shape, but {engine} hands optimizers flat 1-D "
                "partitions that cut across rows and parameters. Use FSDP2 (configs/accelerate/fsdp2.yaml) or DDP "
                "(configs/accelerate/ddp.yaml), or an elementwise optimizer such as adamw."
            )

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and is_memtrain_optimizer(self.args.optim):
            self._refuse_flattening_engine(_optim_name(self.args.optim))
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
        layerwise = find_layerwise(self.optimizer)
        if layerwise is not None:
            # Under FSDP2 HF Trainer built the optimizer before accelerate swapped the sharded parameters in: hook
            # those (ensure_hooks). FSDP2 reduce-scatters before its hooks run, so it needs nothing else; on earlier
            # micro-batches accelerate's no_sync defers that reduce-scatter (set_requires_gradient_sync(False)).
            layerwise.ensure_hooks()
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                # Layer-wise hooks all-reduce each DDP gradient themselves; DDP's bucketed all-reduce must not run.
                with model.no_sync():
                    return super().training_step(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_grad_norm(self, model, grad_norm=None):
        layerwise = find_layerwise(self.optimizer)
        if layerwise is not None and grad_norm is None:  # the gradients are gone; the hooks summed their norms
            return layerwise.pending_grad_norm()
        return super()._get_grad_norm(model, grad_norm)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if getattr(self.args, "final_eval", True) and self.eval_dataset is not None:
            self.evaluate()
        if getattr(self.args, "write_report", True):
            self.report_callback.train_loss = output.training_loss
            self.report_callback.extra["engine"] = str(self.accelerator.distributed_type.value)
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
