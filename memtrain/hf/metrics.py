"""What memtrain measures: exact optimizer-state bytes, memory, and token-weighted perplexity.

Memory is counted, not guessed: state bytes are summed from the storages of the tensors the optimizer really
holds, and :class:`MemoryTracker` attributes every tensor a training step allocates to a category (parameters,
gradients, optimizer state, activations, temporaries) and keeps the peak, on real or fake tensors (the latter is
how ``memtrain estimate`` simulates models that do not fit this machine; docs/estimate.md). Perplexity is ``exp(Σ token NLL / N predicted tokens)`` over the whole eval set, with both sums taken
in fp64 and added across ranks before the division (never a mean of batch means; docs/getting-started.md, The report).
"""
from __future__ import annotations

import math
import resource
import warnings
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

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
        # keyed by the storage object itself (not its data pointer), so fake tensors (memtrain estimate) count too
        key = storage._cdata
        if storage.nbytes() == 0 or key in seen:
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


# -- memory by category ----------------------------------------------------------------------------------
#: The categories of :meth:`MemoryTracker.peak`, in display order. ``state`` is what the optimizer holds across
#: steps; ``temporaries`` are backward temporaries (activation gradients) and the optimizer step's scratch
#: tensors; ``unsharded`` (FSDP2 only) are all-gathered parameters and the all-gather / reduce-scatter buffers.
MEMORY_CATEGORIES = ("params", "buffers", "grads", "state", "activations", "temporaries", "unsharded", "other")
_CATEGORY_OF = {  # torch's reference types (_MemRefType, _FSDPRefType) by member name -> our category
    "PARAM": "params", "SHARDED_PARAM": "params", "BUFFER": "buffers", "GRAD": "grads", "SHARDED_GRAD": "grads",
    "UNSHARDED_GRAD": "grads", "ACT": "activations", "TEMP": "temporaries", "OPT": "state", "OTH": "other",
    "INP": "other", "UNSHARDED_PARAM": "unsharded", "ALL_GATHER": "unsharded", "REDUCE_SCATTER": "unsharded",
}


def _memtrain_optimizer(optimizer):
    """The memtrain optimizer inside ``optimizer`` (accelerate and layer-wise release wrap it), or None."""
    from ..optim.base import MemtrainOptimizer

    while optimizer is not None and not isinstance(optimizer, MemtrainOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class _CategoryPeak:
    """What memtrain adds to torch's ``MemTracker`` (torch/distributed/_tools/mem_tracker.py): the peak of the
    whole step by category and its phase, the optimizer state split from the step's scratch tensors, and layer-wise
    updates (run inside backward by hooks, not by ``optimizer.step()``) counted as optimizer work.

    torch labels every tensor allocated inside ``optimizer.step()`` as optimizer state; at the peak we therefore
    count how much of it the optimizer still holds in ``optimizer.state`` and call the rest step temporaries. Per-
    module peaks are not kept: torch updates them on every operator, which costs O(modules) per op.
    """

    def _init_category_peak(self, optimizer) -> None:
        self.optimizer = optimizer
        self.peak_phase: dict[torch.device, str] = {}
        self._peak_state: dict[torch.device, int] = {}
        self._inner = _memtrain_optimizer(optimizer)

    # -- hooks into torch's tracker ----------------------------------------------------------------------------
    def _update_peak_stats(self, peak_state) -> None:  # called after every operator
        for dev, snap in self._curr_mem_snap.items():
            if snap[_TOTAL_KEY] > self._peak_mem.get(dev, 0):
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_phase[dev] = self._phase()
                opt = self._ref_class.OPT
                self._peak_state[dev] = self._state_bytes(dev) if self._in_opt else snap[opt]

    def _pre_fw_hook(self, module, inputs) -> None:
        # The root module called again is the next micro-batch or step: start the module statistics afresh
        # (torch's tracker refuses a second iteration otherwise).
        name = self._mod_tracker.get_known_fqn(module)
        if (module in self.memory_tracking and not self._mod_tracker.is_bw
                and set(self._mod_tracker.parents) - {name} == {"Global"}):
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)

    def _phase(self) -> str:
        in_backward = torch._C._current_graph_task_id() != -1
        if self._in_opt:
            return "step (layer-wise, in backward)" if in_backward else "step"
        return "backward" if in_backward else "forward"

    def _state_bytes(self, device=None) -> int:
        """Tracked bytes of the distinct storages ``optimizer.state`` holds now (on ``device``)."""
        if self.optimizer is None:
            return 0
        seen, total = set(), 0
        for t in _tensors(list(self.optimizer.state.values())):
            for st in get_untyped_storages(t):
                winfo, _ = self._WINFO.get(st, (None, None))
                if winfo is None or id(winfo) in seen or (device is not None and winfo.device != device):
                    continue
                seen.add(id(winfo))
                total += winfo.mem_consumed
        return total

    def _optimizer_region(self, step_param):
        def wrapped(*args, **kwargs):
            before, self._in_opt = self._in_opt, True
            try:
                return step_param(*args, **kwargs)
            finally:
                self._in_opt = before
        return wrapped

    def __enter__(self):
        if self._depth == 0:
            if self._inner is not None:
                # Layer-wise release calls step_param from backward hooks, outside optimizer.step(): mark it too.
                self._inner.step_param = self._optimizer_region(type(self._inner).step_param.__get__(self._inner))
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            # torch's module tracker warns on checkpointed re-entries, and its gradient hook when layer-wise
            # release has already freed the gradient it was to label: both harmless here
            warnings.filterwarnings("ignore", message="The module hierarchy tracking")
            warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        return super().__enter__()

    def __exit__(self, *args):
        super().__exit__(*args)
        if self._depth == 0:
            self._quiet.__exit__(None, None, None)
            if self._inner is not None:
                self._inner.__dict__.pop("step_param", None)

    # -- results -------------------------------------------------------------------------------------------
    def mark_state(self) -> None:
        """Label everything ``optimizer.state`` holds as optimizer state (call after a step)."""
        if self.optimizer is not None:
            for t in _tensors(list(self.optimizer.state.values())):
                self._update_and_maybe_create_winfos(t, self._ref_class.OPT)

    def _categories(self, snap: dict, state: int) -> dict[str, int]:
        out = dict.fromkeys(MEMORY_CATEGORIES, 0)
        for ref, nbytes in snap.items():
            if ref != _TOTAL_KEY:
                out[_CATEGORY_OF[ref.name]] += nbytes
        out["temporaries"] += out["state"] - state  # optimizer-step scratch, not state
        out["state"] = state
        out["total"] = snap.get(_TOTAL_KEY, 0)
        return out

    def peak(self, device=None) -> dict:
        """The peak (bytes by category, ``total``, and ``phase``) on ``device`` (default: the largest)."""
        if not self._peak_mem:
            return {**dict.fromkeys((*MEMORY_CATEGORIES, "total"), 0), "phase": None}
        device = device if device is not None else max(self._peak_mem, key=self._peak_mem.get)
        return {**self._categories(self._peak_mem_snap[device], self._peak_state[device]),
                "phase": self.peak_phase[device]}

    def current(self, device=None) -> dict[str, int]:
        """Bytes by category now."""
        if not self._curr_mem_snap:
            return {**dict.fromkeys((*MEMORY_CATEGORIES, "total"), 0)}
        device = device if device is not None else next(iter(self._curr_mem_snap))
        snap = self._curr_mem_snap[device]
        return self._categories(snap, snap[self._ref_class.OPT])


class MemoryTracker(_CategoryPeak, MemTracker):
    """torch's ``MemTracker`` with memtrain's categories and peak phase (see :class:`_CategoryPeak`).

    Tensors created before entering (the model, existing optimizer state) are tracked by ``track_external``;
    entering does it for ``model`` and ``optimizer`` when given. Works on real and on fake tensors.
    """

    def __init__(self, model: nn.Module | None = None, optimizer=None):
        super().__init__()
        self._init_category_peak(optimizer)
        self.track_external(*(x for x in (model, optimizer) if x is not None))

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # torch hooks every parameter's gradient, which fails on frozen ones (an adapter's base weights): hook the
        # trainable parameters (gathered in a throwaway module, no copy), track the rest without hooks.
        if install_grad_hooks and any(not p.requires_grad for p in module.parameters()):
            trainable = torch.nn.Module()
            trainable.params = torch.nn.ParameterList([p for p in module.parameters() if p.requires_grad])
            super()._track_module_params_and_buffers(trainable, install_grad_hooks=True)
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


class FSDPMemoryTracker(_CategoryPeak, FSDPMemTracker):
    """torch's ``FSDPMemTracker`` (FSDP2 categories: sharded/unsharded parameters and gradients, all-gather and
    reduce-scatter buffers) with memtrain's categories and peak phase."""

    def __init__(self, model: nn.Module, optimizer=None):
        super().__init__(model, None)  # the optimizer is marked through step_param and step hooks instead
        self._init_category_peak(optimizer)

    def __enter__(self):
        entered = super().__enter__()
        if self._depth == 1:  # track what exists already: state from earlier steps
            self.mark_state()
        return entered


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
