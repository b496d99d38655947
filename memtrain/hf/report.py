"""The end-of-run report: exact optimizer-state bytes, weights and gradients, peak memory, tokens/s and
token-weighted eval perplexity, as a ``TrainerCallback``.

Peak memory comes two ways. The device's own counter: ``torch.cuda.max_memory_allocated`` on GPU, the process's
peak RSS on CPU (which mostly measures the Python process, not the training). And the tracked tensor peak by
category (parameters, gradients, optimizer state, activations, temporaries; ``metrics.MemoryTracker``) of one
sampled optimizer step: the second of the run, the first that starts with the optimizer state in place. Tracking
one step costs that step a few times its usual time (a Python dispatch hook on every operator), so tokens/s is
measured over the other steps, as it already leaves out evaluation: the tracked step's seconds and tokens are
taken out of ``tokens_per_second`` (``memory_tracking_seconds`` reports them; docs/estimate.md states the cost).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..optim import registry, sharding
from . import metrics
from .factory import _is_main_process, _optim_name, is_memtrain_optimizer


class ReportCallback(TrainerCallback):
    """Collects what the run report needs: train time (without evaluation), tokens, memory, final losses.

    memtrain's Trainer adds it and writes the report after its final evaluation. With HF's own Trainer add
    ``ReportCallback(tokens_per_step=...)`` to ``callbacks``; it then writes the report at the end of training.
    """

    def __init__(self, tokens_per_step: int | None = None, write_on_train_end: bool = True,
                 track_memory: bool = True):
        self.tokens_per_step = tokens_per_step
        #: Track one optimizer step's tensor memory by category (see the module docstring).
        self.track_memory = track_memory
        self.memory_by_category: dict[str, Any] | None = None
        self.memory_tracked_step: int | None = None
        self.memory_tracking_seconds = 0.0
        self._tracker = None
        self._track_at = None
        self._tracking_tokens = 0
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
        sharding.COMM.clear()
        self.eval_seconds = 0.0
        self._start_step = state.global_step  # > 0 when resumed
        # the run's second step (the first with the optimizer state in place), or its only one
        self._track_at = state.global_step + (1 if state.max_steps - state.global_step >= 2 else 0)
        self.memory_by_category = self.memory_tracked_step = None
        self.memory_tracking_seconds = 0.0
        self._start = time.perf_counter()

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.track_memory and self._tracker is None and state.global_step == self._track_at and model is not None:
            self._tracking_start = time.perf_counter()
            self._tracking_tokens = self.local_tokens
            self._tracker = metrics.MemoryTracker(model, optimizer)
            self._tracker.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self._stop_tracking(state)

    def _stop_tracking(self, state) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self.memory_by_category = self._tracker.peak()
            self.memory_tracked_step = state.global_step  # the step just completed (1-based)
            self._tracker = None
            self.memory_tracking_seconds = time.perf_counter() - self._tracking_start
            self._tracking_tokens = self.local_tokens - self._tracking_tokens  # this rank's tokens in that step

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
        self._stop_tracking(state)
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
        by_category = self.memory_by_category or {}
        tracked = int(by_category.get("total", 0))
        state_per_rank, peak_per_rank, tracked_per_rank, tracked_tokens = _gather_ints(
            [state_bytes, peak["peak_memory_bytes"], tracked, self._tracking_tokens if by_category else 0],
            args.device)
        tracked_tokens = sum(tracked_tokens) if self.local_tokens else self.tokens_per_step or 0
        seconds = self.train_seconds
        if by_category and tracked_tokens and 0 < tracked_tokens < tokens and self.memory_tracking_seconds < seconds:
            # throughput over the untracked steps (module docstring)
            tokens_timed, seconds = tokens - tracked_tokens, seconds - self.memory_tracking_seconds
        else:
            tokens_timed = tokens
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
            # the tracked tensor peak of one sampled step, by category (module docstring); None when not tracked
            "tracked_peak_memory_bytes": tracked if by_category else None,
            "tracked_peak_memory_bytes_per_rank": tracked_per_rank if by_category else None,
            "peak_memory_by_category": {k: v for k, v in by_category.items() if k != "phase"} or None,
            "peak_memory_phase": by_category.get("phase"),
            "memory_tracked_step": self.memory_tracked_step,
            "memory_tracking_seconds": self.memory_tracking_seconds,
            "global_steps": state.global_step,
            # bytes this rank sent through memtrain's own collectives (sharded transforms; not FSDP's or DDP's)
            "optimizer_comm_bytes_per_step": sharding.comm_bytes() / steps if steps else 0.0,
            "train_tokens": tokens,
            "train_runtime_s": self.train_seconds,
            "tokens_per_second": tokens_timed / seconds if seconds > 0 else None,
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
            write_json(path, report)
            print(format_report(report) + f"\nreport written to {path}", flush=True)
        return report


def strict_json(value, path: str = "", found: list | None = None):
    """``value`` with every NaN/Inf float replaced by None, and the list of their dotted paths: report.json is
    strict JSON (a bare NaN is rejected by most parsers), and the ``nonfinite`` field says which values were
    NaN/Inf rather than absent (docs/nonfinite.md)."""
    found = [] if found is None else found
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
        return None, found
    if isinstance(value, dict):
        return {k: strict_json(v, f"{path}.{k}" if path else str(k), found)[0] for k, v in value.items()}, found
    if isinstance(value, (list, tuple)):
        return [strict_json(v, f"{path}[{i}]", found)[0] for i, v in enumerate(value)], found
    return value, found


def write_json(path, report: dict) -> None:
    """Write a report as strict JSON, with ``nonfinite`` listing the values that were NaN/Inf."""
    clean, nonfinite = strict_json(report)
    clean["nonfinite"] = nonfinite
    with open(path, "w") as f:
        json.dump(clean, f, indent=2, default=str, allow_nan=False)


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
    ]
    by_category = report.get("peak_memory_by_category")
    if by_category:
        parts = ", ".join(f"{k} {by_category[k] / 2**20:,.1f}" for k in metrics.MEMORY_CATEGORIES if by_category[k])
        lines.append(f"  tensor peak          {mib(report['tracked_peak_memory_bytes'])} in step "
                     f"{report['memory_tracked_step']}'s {report['peak_memory_phase']}: {parts} MiB "
                     f"(tracked in {report['memory_tracking_seconds']:.2f} s)")
    lines += [
        f"  steps / tokens       {report['global_steps']} / {report['train_tokens']:,} in "
        f"{report['train_runtime_s']:.3f} s = {num(report['tokens_per_second'], ',.0f')} tokens/s",
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
