"""Layer-wise gradient release for every memtrain optimizer (docs/layerwise.md).

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
* **DDP**: a hook all-reduces (averages) its gradient before updating. The backward must therefore run without
  DDP's own all-reduce (``model.no_sync()`` on every micro-batch, or no DDP wrapper): the hooks fire on the local
  gradient, before DDP's buckets would be reduced. memtrain's Trainer arranges this.
* **FSDP2** (``fully_shard``): FSDP2 calls the sharded DTensor parameter's post-accumulate-grad hooks itself,
  right after it has stored (or accumulated) the reduce-scattered, averaged gradient shard (torch 2.13,
  ``_fsdp_collectives.foreach_reduce``). The hook therefore sees the final sharded gradient and needs no
  collective of its own: ``step_param`` updates this rank's rows (matrix methods run their own collectives;
  every rank fires the hooks of the same parameters in the same order, FSDP unit by unit, an empty shard
  included). Memory is released per FSDP unit: a unit's gradient shards are views of one reduce-scatter output
  buffer, which is freed once the last of them is released. With FSDP2's ``set_requires_gradient_sync(False)``
  (accelerate's ``no_sync``) on earlier micro-batches, the hooks fire only on the last one; without it they
  fire every micro-batch and the gate leaves the accumulating shards alone.

What it refuses: global-norm gradient clipping (all gradients never exist at once; use per-parameter clipping,
``clip``), FSDP1 ``FlatParameter`` s (FSDP1 reduce-scatters a flat gradient that mixes parameters outside
autograd, after the hooks), optimizers that are not memtrain optimizers (they have no per-parameter update).
Under DeepSpeed ZeRO no parameter hook sees a final gradient either; ``memtrain.hf`` refuses it up front.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .sharding import Rows, local
from .base import MemtrainOptimizer

GLOBAL_CLIP_MESSAGE = (
    "layer-wise mode cannot clip the global gradient norm: each gradient is applied and freed during backward, "
    "so all gradients never exist at once. Set max_grad_norm=0, and use per-parameter clipping instead "
    "(optim_args 'layerwise=true,layerwise_clip=<max norm per parameter>') if you need clipping."
)


class LayerwiseOptimizer(Optimizer):
    """Step each parameter of ``optimizer`` inside backward and free its gradient (see the module docstring).

    ``clip`` > 0 clips each parameter's gradient to that L2 norm before its update. ``all_reduce`` (default:
    whenever a process group with more than one rank is running) averages each plain (DDP) gradient across ranks
    first; FSDP2's DTensor gradients arrive reduced.
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
        self._grad_sq: Tensor | None = None  # Σ‖g‖² of this step's gradients, global
        self._shard_sq: dict = {}  # device mesh -> this rank's part of Σ‖g‖² of FSDP2 gradients, to all-reduce
        # parameter -> ((group index, index), hook handle). Weak: accelerate drops its references to the
        # unsharded parameters it swaps out (below), and so must we.
        self._hooked = WeakIdKeyDictionary()
        self.ensure_hooks()

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
        self.ensure_hooks()

    def __repr__(self):
        return f"LayerwiseOptimizer({self.optimizer!r})"

    # -- the hooks ------------------------------------------------------------------------------------------
    def ensure_hooks(self) -> None:
        """Give every parameter now in ``param_groups`` its release hook, and remove the hooks of parameters that
        are no longer there. Cheap when nothing changed: memtrain's Trainer calls it before every backward, and
        ``step()`` after every step.

        The parameter objects can change after construction. HF Trainer (transformers 5.25,
        ``_prepare_for_training``) builds the optimizer *before* ``accelerator.prepare`` under FSDP2 (it turns
        ``delay_optimizer_creation`` off for FSDP2), and accelerate 1.16's ``_prepare_fsdp2`` then runs
        ``fully_shard`` and swaps the new DTensor parameters into ``param_groups``
        (``fsdp2_switch_optimizer_parameters``): hooks registered on the old objects would never fire. An optimizer
        built after ``fully_shard`` sees the DTensor parameters directly.
        """
        live = set()
        for gi, group in enumerate(self.optimizer.param_groups):
            for index, param in enumerate(group["params"]):
                if getattr(param, "_is_flat_param", False):
                    raise NotImplementedError(
                        "layer-wise release does not support FSDP1 (FlatParameter): FSDP1 reduce-scatters one flat "
                        "gradient that mixes parameters and stores it outside autograd, so no per-parameter hook sees "
                        "a final gradient. Use FSDP2 (fully_shard), DDP or a single process, or turn layerwise off.")
                live.add(id(param))
                hooked = self._hooked.get(param)
                if hooked is not None and hooked[0] == (gi, index):
                    continue
                if hooked is not None:
                    hooked[1].remove()
                handle = param.register_post_accumulate_grad_hook(partial(self._hook, gi=gi, index=index))
                self._hooked[param] = ((gi, index), handle)
        for param in [p for p in self._hooked.keys() if id(p) not in live]:  # swapped out of param_groups
            self._hooked.pop(param)[1].remove()

    def remove_hooks(self) -> None:
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()

    def _last_microbatch(self) -> bool:
        return bool(self.gate()) if self.gate is not None else self.is_last_microbatch

    def _hook(self, param: Tensor, *, gi: int, index: int) -> None:
        if self._last_microbatch():
            self._step_param(param, gi, index)

    def _world_size(self) -> int:
        if self.all_reduce is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    @torch.no_grad()
    def _step_param(self, param: Tensor, gi: int, index: int) -> None:
        grad = param.grad
        if grad is None:
            return
        if isinstance(grad, DTensor):
            # FSDP2 runs this hook after its reduce-scatter: grad holds this rank's rows of the averaged gradient.
            sq = torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32).square()
            if self.clip > 0:  # clipping needs the parameter's global norm now: one scalar all-reduce (Rows.sum)
                sq = Rows(1, mesh=grad.device_mesh).sum(sq)
                self._add_sq(sq)
            else:  # for the logged norm only: summed here, all-reduced once per step (_global_grad_sq)
                mesh = grad.device_mesh
                self._shard_sq[mesh] = self._shard_sq[mesh] + sq if mesh in self._shard_sq else sq
        else:
            world = self._world_size()
            if world > 1:  # every rank steps its parameters in the same (backward) order, so the collectives match
                dist.all_reduce(grad)
                grad.div_(world)
            sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            self._add_sq(sq)
        if self.clip > 0:
            local(grad).mul_(torch.clamp(self.clip / (sq.sqrt() + 1e-6), max=1.0).to(grad.dtype))
        self.optimizer.step_param(param, grad, self.optimizer.param_groups[gi], index)
        param.grad = None  # the release

    def _add_sq(self, sq: Tensor) -> None:
        self._grad_sq = sq if self._grad_sq is None else self._grad_sq + sq

    def _global_grad_sq(self) -> Tensor | None:
        """Σ‖g‖² of the gradients applied so far in this step. Under FSDP2 the ranks' partial sums are all-reduced
        here (one scalar per step): every rank must call it, as the Trainer and ``step()`` do."""
        for mesh, sq in self._shard_sq.items():  # same insertion (hook) order on every rank
            self._add_sq(Rows(1, mesh=mesh).sum(sq))
        self._shard_sq.clear()
        return self._grad_sq

    def pending_grad_norm(self) -> Tensor | None:
        """L2 norm (0-d tensor) of the gradients applied so far in the current optimizer step (a collective under
        FSDP2: call it on every rank)."""
        sq = self._global_grad_sq()
        return sq.sqrt() if sq is not None else None

    # -- the optimizer step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """End the logical step. The hooks already updated the parameters; any gradient still present (one that
        arrived while ``is_last_microbatch`` was False) is applied here, so no gradient is ever lost."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.optimizer.param_groups):
            for index, param in enumerate(group["params"]):
                if param.grad is not None:
                    self._step_param(param, gi, index)
        self.last_grad_norm = self.pending_grad_norm()
        self._grad_sq = None
        self.ensure_hooks()  # a plain loop or HF's own Trainer that swapped parameters: release from the next step
        return loss
