"""memtrain's ``Trainer``: HF's, building memtrain optimizers by name, with layer-wise release, token-weighted
evaluation and the run report."""
from __future__ import annotations

import time

import torch
import transformers
from torch.utils.data import DataLoader, Subset

from . import engines, metrics
from .factory import _optim_name, find_layerwise, is_memtrain_optimizer, optimizer_factory, optimizer_kwargs_from_args
from .report import ReportCallback


class Trainer(transformers.Trainer):
    """HF ``Trainer`` that builds memtrain optimizers by name, evaluates token-weighted perplexity, and writes a
    report at the end of ``train()``. With an HF optimizer name it behaves exactly as HF's Trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.report_callback = ReportCallback(write_on_train_end=False)
        self.add_callback(self.report_callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and is_memtrain_optimizer(self.args.optim):
            engines.refuse_flattening_engine(self, _optim_name(self.args.optim))
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
