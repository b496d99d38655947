"""FSDP2 row sharding simulated in one process: one thread per rank, collectives through a shared hub.

:class:`ThreadRows` is a :class:`memtrain.optim.sharding.Rows` whose collectives exchange tensors between threads
instead of calling ``torch.distributed``. Each thread plays one rank: it holds its rows of every parameter (the
``torch.chunk`` split FSDP2 uses, so a rank may hold 0 rows) and calls the optimizer's ``update()`` with its own
:class:`ThreadRows`. A method that enters different collectives on different ranks, or a different number of them,
fails with a barrier timeout instead of hanging. Reductions are done in rank order on every rank, so replicated
results are bitwise identical across ranks, as with a real all-reduce.

``keep()`` records the tensors a method stores as per-rank state (the real one wraps them as ``Shard(0)``
DTensors) and returns them unchanged, so a test can check which state is sharded and which is replicated.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from memtrain.optim.sharding import Rows

TIMEOUT_S = 30


class Hub:
    """The "process group": every rank puts its tensor in, all of them come out, in rank order."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT_S)
        self.slots: list = [None] * world
        self.calls = [0] * world  # collectives entered per rank

    def exchange(self, rank: int, t: Tensor) -> list[Tensor]:
        self.calls[rank] += 1
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody refills a slot before every rank has read them all
        return parts


class ThreadRows(Rows):
    def __init__(self, total: int, rank: int, hub: Hub, owner: int = 0):
        super().__init__(total, position=owner)  # owner: the parameter's position, as Rows.of is given
        self.hub, self.group = hub, hub  # a non-None group: ``sharded`` is True
        self.world, self.rank, self.owner = hub.world, rank, owner % hub.world
        self.start = min(rank * math.ceil(total / hub.world), total)
        self.kept: list[Tensor] = []
        self.comm: Counter = Counter()  #: payload bytes by kind, counted like ``distributed.COMM``
        self.broadcasts: list[Tensor] = []  #: every broadcast result this rank received, in order

    def _all_reduce(self, t: Tensor, op) -> Tensor:
        t = t.contiguous()
        stacked = torch.stack(self.hub.exchange(self.rank, t))
        if op == dist.ReduceOp.SUM:
            result = stacked[0].clone()
            for part in stacked[1:]:
                result += part
        elif op == dist.ReduceOp.MAX:
            result = stacked.amax(dim=0)
        elif op == dist.ReduceOp.MIN:
            result = stacked.amin(dim=0)
        else:
            raise NotImplementedError(op)
        self.comm["all_reduce"] += t.numel() * t.element_size()
        return t.copy_(result)

    def gather(self, x: Tensor) -> Tensor:
        chunk = math.ceil(self.total / self.world)
        padded = x.new_zeros((chunk, *x.shape[1:]))
        padded[: x.shape[0]] = x
        full = torch.cat(self.hub.exchange(self.rank, padded))[: self.total]
        self.comm["all_gather"] += full.numel() * full.element_size()
        return full

    def broadcast(self, t: Tensor) -> Tensor:
        t.copy_(self.hub.exchange(self.rank, t.contiguous())[self.owner])
        self.comm["broadcast"] += t.numel() * t.element_size()
        self.broadcasts.append(t.clone())
        return t

    def start_broadcast(self, t: Tensor):
        t = self.broadcast(t)  # the threads' exchange is synchronous; the order of the broadcasts is what is tested
        return lambda: t

    def keep(self, t: Tensor, total: int | None = None) -> Tensor:
        self.kept.append(t)
        return t

    def is_kept(self, t: Tensor) -> bool:
        return any(t is k for k in self.kept)


def run_ranks(world: int, fn: Callable[[int, Hub], object]) -> list:
    """Run ``fn(rank, hub)`` in ``world`` threads; return the results in rank order, re-raise the first error."""
    hub = Hub(world)
    results, errors = [None] * world, [None] * world

    def body(rank):
        try:
            results[rank] = fn(rank, hub)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after every thread ended
            errors[rank] = e
            hub.barrier.abort()  # wake the other ranks instead of letting them wait for the timeout

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raised = [e for e in errors if e is not None]
    if raised:  # the cause first: BrokenBarrierError is only the other ranks being woken up
        raise next((e for e in raised if not isinstance(e, threading.BrokenBarrierError)), raised[0])
    assert len(set(hub.calls)) == 1, f"ranks entered different numbers of collectives: {hub.calls}"
    return results
