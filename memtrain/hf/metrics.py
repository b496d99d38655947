"""What memtrain measures: exact optimizer-state bytes, memory, and token-weighted perplexity.

Memory is counted, not guessed: state bytes are summed from the storages of the tensors the optimizer really
holds. Perplexity is ``exp(Σ token NLL / N predicted tokens)`` over the whole eval set, with both sums taken
in fp64 and added across ranks before the division (never a mean of batch means; benchmark.md §3.2).
"""
from __future__ import annotations

import math
import resource
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


# -- bytes ------------------------------------------------------------------------------------------------
def _tensors(obj) -> Iterator[Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (FSDP2 state), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases count once)."""
    seen, total = set(), 0
    for t in tensors:
        t = _local(t)
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.data_ptr() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes held in ``optimizer.state`` on this rank, de-duplicated by storage."""
    return storage_bytes(_tensors(list(optimizer.state.values())))


def parameter_bytes(params: Iterable[Tensor]) -> int:
    return sum(_local(p).numel() * p.element_size() for p in params)


def model_memory(model: nn.Module) -> dict[str, int]:
    """Parameter counts and the bytes of weights and (full-size) gradients of the trainable parameters."""
    params = list(model.parameters())  # de-duplicated: a tied tensor appears once
    trainable = [p for p in params if p.requires_grad]
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "weight_bytes": parameter_bytes(params),
        "gradient_bytes": parameter_bytes(trainable),
    }


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str | None = None) -> dict[str, object]:
    """Peak memory of this process: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "cuda_max_memory_allocated"}
    # ru_maxrss is in KiB on Linux.
    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "peak_memory_kind": "cpu_peak_rss"}


# -- perplexity -------------------------------------------------------------------------------------------
def token_nll(logits: Tensor, labels: Tensor, *, shift: bool = True) -> tuple[Tensor, Tensor]:
    """Sum of token negative log-likelihoods (fp64) and the number of predicted tokens (int64).

    ``shift=True`` is the causal-LM convention: position t predicts label t+1. Labels equal to -100 (padding,
    prompts) are not predicted and not counted.
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    labels = labels.reshape(-1)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll.double(), (labels != IGNORE_INDEX).sum()


class PerplexityMeter:
    """Accumulates token NLL across batches (and ranks) in fp64."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._reduced = False

    def update(self, logits: Tensor, labels: Tensor, *, shift: bool = True) -> None:
        nll, count = token_nll(logits, labels, shift=shift)
        self.nll += nll.to(self.nll.device)
        self.tokens += count.to(self.tokens.device)

    def all_reduce(self) -> "PerplexityMeter":
        """Sum both totals over all ranks (once), so every rank divides the global sums."""
        if not self._reduced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = torch.stack([self.nll, self.tokens.double()])
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            self.nll, self.tokens = totals[0], totals[1].round().long()
        self._reduced = True
        return self

    def result(self) -> dict[str, float]:
        tokens = int(self.tokens.item())
        if tokens == 0:
            raise ValueError("perplexity over zero predicted tokens: the eval set is empty or fully masked")
        loss = float(self.nll.item()) / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, batches: Iterable[dict], device: torch.device | str | None = None) -> dict:
    """Token-weighted loss/perplexity of a causal LM over ``batches`` (dicts with input_ids, labels and an
    optional attention_mask), summed across ranks when a process group is running."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    meter = PerplexityMeter(device)
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            logits = model(**inputs).logits
            meter.update(logits, batch["labels"].to(device))
    finally:
        model.train(was_training)
    return meter.all_reduce().result()
