"""memtrain's ``Trainer``: HF's, building memtrain optimizers by name, with layer-wise release, token-weighted
evaluation and the run report."""
from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.distributed as dist
import transformers
from torch.utils.data import DataLoader, Subset

from ..optim.base import MemtrainOptimizer
from . import checkpoint as ckpt
from . import engines, metrics
from .factory import _optim_name, find_layerwise, is_memtrain_optimizer, optimizer_factory, optimizer_kwargs_from_args
from .report import ReportCallback

logger = logging.getLogger(__name__)


class NonfiniteError(RuntimeError):
    """The run diverged: a step's loss or gradient norm is NaN or Inf (``--stop_on_nonfinite``)."""


class FinalEvalError(RuntimeError):
    """Training completed but the final evaluation failed; the report (with ``error``) is written."""


class _NonfiniteGuard(transformers.TrainerCallback):
    """Stops at the end of the first optimizer step that saw a non-finite loss or gradient norm. The flag is a
    device tensor OR-ed in ``training_step`` / ``_get_grad_norm`` without a host sync; it is read once per step
    here (HF's own logging_nan_inf_filter, which memtrain turns off, synced once per micro-batch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.trainer._nonfinite
        if flag is None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a loss is per rank: every rank stops together
        if bool(flag):
            raise NonfiniteError(
                f"non-finite loss or gradient norm (NaN/Inf) at optimizer step {state.global_step}: the run diverged "
                f"(docs/nonfinite.md). Lower --learning_rate (now {args.learning_rate}), clip with --max_grad_norm, "
                "check the data and dtype, or pass --stop_on_nonfinite false to train on")


class Trainer(transformers.Trainer):
    """HF ``Trainer`` that builds memtrain optimizers by name, evaluates token-weighted perplexity, and writes a
    report at the end of ``train()``. With an HF optimizer name it behaves exactly as HF's Trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.report_callback = ReportCallback(write_on_train_end=False)
        self.add_callback(self.report_callback)
        self._nonfinite = None  # device bool: a non-finite loss / grad norm since the last check
        self._resume_record = None
        if getattr(self.args, "stop_on_nonfinite", False):
            self.add_callback(_NonfiniteGuard(self))

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and is_memtrain_optimizer(self.args.optim):
            engines.refuse_flattening_engine(self, _optim_name(self.args.optim))
            factory, kwargs = optimizer_factory(
                _optim_name(self.args.optim), **optimizer_kwargs_from_args(self.args),
            )
            kwargs["print_param_groups"] = getattr(self.args, "print_param_groups", False)
            self.optimizer_cls_and_kwargs = (factory, kwargs)
        optimizer = super().create_optimizer(model)
        if (isinstance(optimizer, MemtrainOptimizer) and optimizer.spreads
                and getattr(self.args, "spread_matrix_updates", True) and engines.trainer_engine(self) == "ddp"
                and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            optimizer.spread_over_ranks()  # each rank updates ~1/world of the matrices (docs/distributed.md)
        return optimizer

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
                    return self._watch(super().training_step(model, inputs, num_items_in_batch))
        return self._watch(super().training_step(model, inputs, num_items_in_batch))

    def _get_grad_norm(self, model, grad_norm=None):
        layerwise = find_layerwise(self.optimizer)
        if layerwise is not None and grad_norm is None:  # the gradients are gone; the hooks summed their norms
            return self._watch(layerwise.pending_grad_norm())
        return self._watch(super()._get_grad_norm(model, grad_norm))

    def log(self, logs, *args, **kwargs):
        # Warnings that depend on tensor values are recorded as device flags in step() (which never syncs) and
        # emitted here, where the loss is read anyway (MemtrainOptimizer.flush_warnings).
        optimizer = self.optimizer
        while optimizer is not None and not hasattr(optimizer, "flush_warnings"):
            optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is not None:
            optimizer.flush_warnings()
        return super().log(logs, *args, **kwargs)

    def _watch(self, value):
        """OR ``value``'s non-finiteness into the guard's device flag (no host sync)."""
        if getattr(self.args, "stop_on_nonfinite", False) and torch.is_tensor(value):
            bad = ~torch.isfinite(value.detach()).all()
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return value

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """HF's ``train()``, then the final token-weighted evaluation and the report. Before any step: the resume
        checks (docs/resume.md) and the eval set (an empty one would fail only after training). Any failure writes
        ``report.json`` with an ``error`` field saying what completed; a final-eval failure raises
        :class:`FinalEvalError` after training is complete (the model is intact: save it)."""
        final_eval = getattr(self.args, "final_eval", True) and self.eval_dataset is not None
        if final_eval and hasattr(self.eval_dataset, "__len__") and len(self.eval_dataset) == 0:
            raise ValueError("the eval set is empty (no block of seq_len tokens in the validation split, or "
                             "--max_eval_samples 0), so the final evaluation would fail after training; give more "
                             "eval data (--val_fraction), a smaller --seq_len, or --final_eval false")
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "false"):
            resume_from_checkpoint = resume_from_checkpoint.lower() == "true"
        resume_from_checkpoint = ckpt.resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            self._resume_record = ckpt.check_resume(self, resume_from_checkpoint)
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        except Exception as e:
            self._write_report(error=e, stage="train")
            raise
        if final_eval:
            try:
                self.evaluate()
            except Exception as e:
                self.report_callback.train_loss = output.training_loss
                self._write_report(error=e, stage="final_eval")
                raise FinalEvalError(f"training completed ({self.state.global_step} steps) but the final evaluation "
                                     f"failed: {type(e).__name__}: {e}") from e
        if getattr(self.args, "write_report", True):
            self.report_callback.train_loss = output.training_loss
            report = self._write_report()
            self.log({k: v for k, v in report.items()
                      if k in ("optimizer_state_bytes", "peak_memory_bytes", "tokens_per_second")})
        return output

    def _write_report(self, error: BaseException | None = None, stage: str | None = None) -> dict:
        callback = self.report_callback
        if not getattr(self.args, "write_report", True):
            return {}
        callback.extra["engine"] = str(self.accelerator.distributed_type.value)
        if error is not None:
            if self.args.world_size > 1 and not isinstance(error, NonfiniteError):
                return {}  # the report gathers across ranks; after one rank's own error the others would hang
            callback.extra["error"] = f"{type(error).__name__}: {error}"
            if isinstance(error, NonfiniteError):
                callback.train_loss = math.nan  # the mean loss includes the non-finite step
            callback.extra["failed_stage"] = stage
            if callback.model is None:  # failed before on_train_end: what exists now
                callback.model, callback.optimizer = self.model, self.optimizer
            if callback._start is not None and not callback.train_seconds:
                callback.train_seconds = time.perf_counter() - callback._start - callback.eval_seconds
            try:
                return callback.write(self.args, self.state)
            except Exception:  # the report must never hide the original error
                logger.exception("could not write the failure report")
                return {}
        return callback.write(self.args, self.state)

    # -- checkpoints: a record at save, checks and the new arguments' options at resume (docs/resume.md) ------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's files (RNG, DCP shards) are written before they are hashed
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            prefix = transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
            folder = os.path.join(run_dir, f"{prefix}-{self.state.global_step}")
            ckpt.write_run_record(self, folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        if getattr(self.args, "resume_fresh_optimizer", False):
            logger.warning("--resume_fresh_optimizer: %s: weights and step %d restored; fresh %s optimizer state, lr "
                           "schedule fast-forwarded to the step", checkpoint, self.state.global_step,
                           _optim_name(self.args.optim))
            ckpt.fast_forward_scheduler(self.lr_scheduler, self.state.global_step)
            return
        ckpt.check_layout(checkpoint, self._resume_record, self.optimizer)
        snapshot = ckpt.snapshot_groups(self.optimizer, _optim_name(self.args.optim))
        with ckpt.loading(checkpoint, "the optimizer or scheduler state", "a fresh optimizer"):
            super()._load_optimizer_and_scheduler(checkpoint)
        ckpt.apply_new_options(self.optimizer, self.lr_scheduler, snapshot)

    def _load_rng_state(self, checkpoint):
        if checkpoint is None or getattr(self.args, "resume_fresh_optimizer", False):
            return
        with ckpt.loading(checkpoint, ckpt.rng_file(checkpoint, self.args).name, "fresh RNG streams"):
            super()._load_rng_state(checkpoint)

    def get_train_dataloader(self) -> DataLoader:
        """A dataset that splits itself across ranks (memtrain's streams, memtrain/recipes/data/streaming.py) gets a
        plain per-rank DataLoader: accelerate would otherwise shard it a second time (IterableDatasetShard) or read
        it on rank 0 only and broadcast (dispatch_batches). Batches go to the device in ``_prepare_inputs``."""
        dataset = self.train_dataset
        if not getattr(dataset, "splits_across_ranks", False):
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        return DataLoader(dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """A dataset that resumes itself from its checkpointed position must not be replayed batch by batch."""
        dataset = getattr(dataloader, "dataset", None)
        if getattr(dataset, "resumes_itself", False):
            dataset.check_resumed(num_batches)
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

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
