"""Which training engines a method can run under, and the message that refuses one (docs/distributed.md).

The one source of truth for the engine rules: the optimizer base (a parameter that arrives flattened or sharded),
memtrain's Trainer (the optimizer's engine, before training) and ``memtrain finetune`` (the adapter's engine) all ask
:func:`engine_refusal`. Engines are named ``ddp`` (also one process), ``fsdp1``, ``fsdp2``, ``zero1``–``zero3``
(DeepSpeed ZeRO stages; ``zero0`` too) and ``flat`` (a parameter seen as a flat 1-D shard: FSDP1 or ZeRO, the optimizer
cannot tell which).

* FSDP1 and ZeRO hand the optimizer flat 1-D partitions that cut across rows and parameters: a method that needs
  the matrix shape is refused under FSDP1 (``needs_matrix_shape``) and under ZeRO unless it declares ``deepspeed``.
* ZeRO-3 and FSDP1 also split a layer's weights across ranks outside forward: a custom module that reads its layer
  whole in forward (``whole_module``: ALLoRA's and GradNormLoRP's LoRA layers) is refused there.
* FSDP2 hands ``Shard(0)`` row blocks; a method whose sharded update is not verified exact (``fsdp2=False``) is
  refused there.
"""
from __future__ import annotations

ENGINES = ("ddp", "fsdp1", "fsdp2", "zero0", "zero1", "zero2", "zero3", "flat")
_FLAT = {"fsdp1": "FSDP1 hands", "flat": "FSDP1 and DeepSpeed ZeRO hand"}  # every ZeRO stage: "DeepSpeed ZeRO hands"


def engine_refusal(engine: str, subject: str, *, needs_matrix_shape: bool = False, fsdp2: bool = True,
                   deepspeed: bool = True, whole_module: bool = False,
                   alternative: str = "an elementwise optimizer such as adamw") -> str | None:
    """Why ``subject`` (``"optimizer 'swan'"``, ``"adapter 'lorapro'"`` …) with these capabilities cannot train
    under ``engine``, naming the engines that work and ``alternative``; None when it can."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; engines are {', '.join(ENGINES)}")
    zero = engine.startswith("zero")
    if (zero and not deepspeed) or (engine in _FLAT and needs_matrix_shape):
        hands = _FLAT.get(engine, "DeepSpeed ZeRO hands")
        why = f"needs each weight's matrix shape, but {hands} optimizers flat 1-D partitions that cut across rows " \
              "and parameters"
    elif whole_module and engine in ("fsdp1", "zero3"):
        splitter = "FSDP1" if engine == "fsdp1" else "DeepSpeed ZeRO-3"
        why = f"reads each adapted layer whole in forward, but {splitter} splits the layer's weights across ranks"
    elif engine == "fsdp2" and not fsdp2:
        why = "is not verified exact on FSDP2-sharded weights yet"
    else:
        return None
    use = ("FSDP2 (fully_shard) or DDP (engines fsdp2, ddp: memtrain engines)" if fsdp2
           else "DDP (engine ddp: memtrain engines)")
    return f"{subject} {why}; use {use}, or {alternative}."


def method_refusal(method, engine: str, subject: str | None = None, **options) -> str | None:
    """:func:`engine_refusal` for an optimizer (class, instance or registry spec), from its capability attributes;
    ``subject`` defaults to ``"optimizer '<name>'"``."""
    return engine_refusal(engine, subject or f"optimizer {method.name!r}", needs_matrix_shape=method.needs_matrix_shape,
                          fsdp2=method.fsdp2, deepspeed=method.deepspeed, **options)
