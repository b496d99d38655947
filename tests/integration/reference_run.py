"""Independent references for Trainer runs: the same steps as a plain loop, and token-weighted eval loss by hand.

A Trainer test records the batches its dataloader produced (``Recorder`` as the data collator), replays them through
``plain_training`` on a copy of the starting model with the optimizer it should have built, and compares every
parameter; ``token_weighted_loss`` recomputes the report's eval loss as ``Σ NLL / N tokens`` over the eval split.
"""
from __future__ import annotations

import torch
from transformers import default_data_collator


class Recorder:
    """A data collator that keeps every batch it builds, in order (training batches come first: the Trainer
    evaluates only after the last step)."""

    def __init__(self, collate=default_data_collator):
        self.collate, self.batches = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def plain_training(model, batches, optimizer, schedule=lambda step: 1.0, max_grad_norm=1.0):
    """HF Trainer's step without the Trainer: loss, backward, clip to ``max_grad_norm``, step, then the lr factor
    ``schedule(step)`` for the next step. Returns the per-step losses."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def linear_decay(max_steps):
    """HF's default ``lr_scheduler_type="linear"`` without warmup."""
    return lambda step: max(0.0, (max_steps - step) / max_steps)


@torch.no_grad()
def token_weighted_loss(model, dataset, batch_size=8):
    """``Σ NLL / N`` over every predicted token of ``dataset`` (labels shifted by one, -100 ignored)."""
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(dataset), batch_size):
        batch = default_data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].double()
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
        tokens += int((labels != -100).sum())
    return (total / tokens).item(), tokens


def assert_same_parameters(model, reference, rtol=1e-5, atol=1e-6):
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, msg=name)
