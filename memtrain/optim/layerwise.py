"""Layer-wise gradient release for every memtrain optimizer (specs/galore.md §10).

:class:`LayerwiseOptimizer` wraps one real optimizer. A post-accumulate-grad hook on every parameter runs that
optimizer's own per-parameter update inside backward, as soon as the parameter's gradient is final, and frees
the gradient at once: peak gradient memory becomes one parameter's gradient instead of all of them.

What it keeps that HF's and LLaMA-Factory's layer-wise modes drop:

* **one real optimizer**: ``state_dict()`` / ``load_state_dict()`` are the wrapped optimizer's, so a checkpoint
  holds every parameter's state (and is interchangeable with a non-layer-wise one) and resumes exactly;
* **the lr schedule**: the hooks read the current ``group["lr"]``; the scheduler steps the (shared) groups once
  per optimizer step, exactly as in the standard loop;
* **gradient accumulation**: the hooks act only on the last micro-batch of an accumulation window (set
  ``is_last_microbatch``, or give a ``gate`` callable; memtrain's HF integration reads accelerate's
  ``sync_gradients``); earlier micro-batches accumulate into ``p.grad`` as usual;
* **data parallelism**: a hook all-reduces (averages) its gradient before updating. The backward must therefore
  run without DDP's own all-reduce (``model.no_sync()`` on every micro-batch, or no DDP wrapper): the hooks fire
  on the local gradient, before DDP's buckets would be reduced. memtrain's Trainer arranges this.

What it refuses: global-norm gradient clipping (all gradients never exist at once; use per-parameter clipping,
``clip``), FSDP2 DTensor parameters (their gradients are reduce-scattered after the hooks), optimizers that are
not memtrain optimizers (they have no per-parameter update).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .base import MemtrainOptimizer

GLOBAL_CLIP_MESSAGE = (
    "layer-wise mode cannot clip the global gradient norm: each gradient is applied and freed during backward, "
    "so all gradients never exist at once. Set max_grad_norm=0, and use per-parameter clipping instead "
    "(optim_args 'layerwise=true,layerwise_clip=<max norm per parameter>') if you need clipping."
)


class LayerwiseOptimizer(Optimizer):
    """Step each parameter of ``optimizer`` inside backward and free its gradient (see the module docstring).

    ``clip`` > 0 clips each parameter's gradient to that L2 norm before its update. ``all_reduce`` (default:
    whenever a process group with more than one rank is running) averages each gradient across ranks first.
    """

    def __init__(self, optimizer: MemtrainOptimizer, *, clip: float = 0.0, all_reduce: bool | None = None,
                 gate: Callable[[], bool] | None = None):
        if not isinstance(optimizer, MemtrainOptimizer):
            raise TypeError(f"layer-wise release needs a memtrain optimizer (one with a per-parameter update), "
                            f"got {type(optimizer).__name__}")
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip >= 0 or not math.isfinite(clip):
            raise ValueError(f"layerwise_clip must be a finite number >= 0 (0 = no clipping), got {clip!r}")
        # No Optimizer.__init__: this object owns no groups or state of its own; it delegates (as accelerate's
        # AcceleratedOptimizer does), so schedulers and checkpoints see the wrapped optimizer's.
        self.optimizer = optimizer
        self.clip = float(clip)
        self.all_reduce = all_reduce
        #: Whether the current backward is the last micro-batch of its accumulation window (ignored if ``gate``).
        self.is_last_microbatch = True
        self.gate = gate
        #: L2 norm (0-d tensor) of the gradients applied in the last completed optimizer step, before clipping.
        self.last_grad_norm: Tensor | None = None
        self._grad_sq: Tensor | None = None
        self._positions: dict[Tensor, tuple[int, int]] = {}
        self._handles = []
        for gi, group in enumerate(optimizer.param_groups):
            self._register(gi, group)

    # -- delegation: the wrapped optimizer is the real one -----------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)  # replaces the group dicts; hooks look groups up by position

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        self._register(len(self.optimizer.param_groups) - 1, self.optimizer.param_groups[-1])

    def __repr__(self):
        return f"LayerwiseOptimizer({self.optimizer!r})"

    # -- the hooks ------------------------------------------------------------------------------------------
    def _register(self, gi: int, group: dict) -> None:
        for index, param in enumerate(group["params"]):
            if hasattr(param, "device_mesh"):
                raise NotImplementedError(
                    "layer-wise release does not support FSDP2 (DTensor) parameters: FSDP2 reduce-scatters the "
                    "gradients after the hooks run. Use DDP or a single process, or turn layerwise off.")
            self._positions[param] = (gi, index)
            self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _last_microbatch(self) -> bool:
        return bool(self.gate()) if self.gate is not None else self.is_last_microbatch

    def _hook(self, param: Tensor) -> None:
        if self._last_microbatch():
            self._step_param(param)

    def _world_size(self) -> int:
        if self.all_reduce is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    @torch.no_grad()
    def _step_param(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        world = self._world_size()
        if world > 1:  # every rank steps its parameters in the same (backward) order, so the collectives match
            dist.all_reduce(grad)
            grad.div_(world)
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq
        if self.clip > 0:
            grad.mul_(torch.clamp(self.clip / (sq.sqrt() + 1e-6), max=1.0).to(grad.dtype))
        gi, index = self._positions[param]
        self.optimizer.step_param(param, grad, self.optimizer.param_groups[gi], index)
        param.grad = None  # the release

    def pending_grad_norm(self) -> Tensor | None:
        """L2 norm (0-d tensor) of the gradients applied so far in the current optimizer step."""
        return self._grad_sq.sqrt() if self._grad_sq is not None else None

    # -- the optimizer step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """End the logical step. The hooks already updated the parameters; any gradient still present (one that
        arrived while ``is_last_microbatch`` was False) is applied here, so no gradient is ever lost."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_param(param)
        self.last_grad_norm = self._grad_sq.sqrt() if self._grad_sq is not None else None
        self._grad_sq = None
        return loss
