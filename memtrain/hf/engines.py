"""The training engines (DDP, FSDP1/FSDP2, DeepSpeed ZeRO) as accelerate configures them: which one a run uses,
the refusal of engines an optimizer would silently get wrong, the end of a process group, and a CPU shim.

The CPU shim (:func:`enable_cpu_engines`) makes accelerate's FSDP and DeepSpeed configs do what they say on CPU
(gloo). It is not needed on GPUs, where it does nothing. Measured with accelerate 1.15 / DeepSpeed 0.19.8 on CPU
(docs/distributed.md, "Engines on CPU"):

* An FSDP config silently runs as plain DDP and exits 0: ``AcceleratorState`` upgrades a run to FSDP only
  for GPU-like distributed types, never for ``MULTI_CPU``. We upgrade ``MULTI_CPU`` + an FSDP plugin to FSDP,
  with the device ``cpu`` (FSDP1 rejects accelerate's ``cpu:0``: "Inconsistent compute device").
* FSDP1's full state dict with ``offload_to_cpu=True`` segfaults on CPU and accelerate hard-codes it; it is
  pinned to False (offloading a CPU tensor to the CPU is a no-op anyway).
* DeepSpeed JIT-compiles a shared-memory communication op with g++ on its first CPU start (20–110 s); gloo
  does not need it, so the build is skipped.

It patches accelerate and torch classes process-wide, so it is never a side effect of importing memtrain or
building arguments: memtrain's own entry points (``memtrain pretrain|finetune``, ``scripts/*.py``) and the test
launchers call it explicitly before building ``TrainingArguments``. Your own script running FSDP/ZeRO on CPU calls
``memtrain.hf.engines.enable_cpu_engines()`` first. It is idempotent.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

from ..optim.capabilities import method_refusal
from ..optim.registry import get_spec

_patched: set[str] = set()


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested(args=None) -> bool:
    return _flag("ACCELERATE_USE_FSDP") or bool(getattr(args, "fsdp", None))


def fsdp_version(args=None) -> int | None:
    """The FSDP version a run will use (1 or 2), None without FSDP. ``TrainingArguments`` (after their
    ``__post_init__``; transformers defaults to 2) take precedence over ``accelerate launch``'s environment
    (``FSDP_VERSION``; accelerate defaults to 1), as in HF Trainer's ``create_accelerator_and_postprocess``."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args:
        return int(plugin_args.get("fsdp_version", 2))
    if fsdp_requested(args):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def deepspeed_requested(args=None) -> bool:
    return _flag("ACCELERATE_USE_DEEPSPEED") or bool(getattr(args, "deepspeed", None))


def _patch_fsdp() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            self.device = torch.device("cpu")
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.PartialState._shared_state["device"] = torch.device("cpu")

    state.AcceleratorState.__init__ = __init__

    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    for cls in (FullStateDictConfig, FullOptimStateDictConfig):
        cls.offload_to_cpu = property(lambda self: False, lambda self, value: None)


def _patch_deepspeed() -> None:
    try:
        comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    comm_torch.build_shm_op = lambda: None


def enable_cpu_engines(args=None) -> None:
    """Apply the CPU fixes for the engine ``args`` (or the accelerate environment) asks for."""
    if torch.cuda.is_available():
        return
    if fsdp_requested(args) and "fsdp" not in _patched:
        _patch_fsdp()
        _patched.add("fsdp")
    if deepspeed_requested(args) and "deepspeed" not in _patched:
        _patch_deepspeed()
        _patched.add("deepspeed")


def trainer_engine(trainer) -> str:
    """The engine a prepared HF Trainer runs: ``ddp`` (also one process), ``fsdp1``, ``fsdp2`` or ``zero1``–``zero3``
    (the names of :func:`memtrain.optim.capabilities.engine_refusal`)."""
    if trainer.is_deepspeed_enabled:
        return f"zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        return "fsdp1" if getattr(plugin, "fsdp_version", 1) == 1 else "fsdp2"
    return "ddp"


def refuse_flattening_engine(trainer, name: str) -> None:
    """Refuse, before training, an engine the optimizer ``name`` would silently get wrong (DeepSpeed ZeRO and FSDP1
    hand it flat 1-D partitions; FSDP2 row blocks need a verified sharded update)."""
    refusal = method_refusal(get_spec(name), trainer_engine(trainer))
    if refusal:
        raise ValueError(refusal)


def end_process_group() -> None:
    """End a script's process group, if it started one: wait for every rank, then destroy it. Without the barrier a
    rank that finishes first tears its gloo/NCCL connections down while a peer still uses them, and without the
    destroy the process exits with live communicator threads; both can abort a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
