"""How a transform runs on a weight that FSDP2 has sharded: the only DTensor-aware code in memtrain.

FSDP2 (``fully_shard``) makes every parameter and gradient a DTensor with placement ``Shard(0)`` on a 1-D mesh:
rank k holds a contiguous block of rows ``W_k`` (split like ``torch.chunk``, so a block may be shorter, or empty).
The shared optimizer base hands a method's ``update()`` the rank's local tensors and a :class:`Rows` object that
says how the rows are split. Every transform then declares what it needs by the call it makes
(docs/distributed.md, "How a method runs on a sharded weight"):

* **local** — reduces over dim 1 or is elementwise: plain tensor code on the local rows, no call at all;
* **reduce** — a small all-reduced statistic: :meth:`Rows.sum` (column sums, an n×n Gram, a squared norm),
  :meth:`Rows.max`, :meth:`Rows.all` (global decisions that choose which collectives run);
* **full** — the whole matrix: :meth:`Rows.gather` it, compute on :attr:`Rows.owner` (round-robin over
  matrices, so each rank does about 1/world of the work), :meth:`Rows.broadcast` the result (or
  :meth:`Rows.start_broadcast` it, to have several owners' results in flight at once) and keep :meth:`Rows.mine`.

Unsharded tensors (one process, DDP) get :func:`unsharded` rows, whose collectives are identities that return their
input untouched, so one code path serves every engine and the single-process numerics do not change.

State that holds this rank's rows is stored through :meth:`Rows.keep` as a DTensor with the parameter's global shape and
``Shard(0)`` placement: distributed checkpointing (DCP) treats a plain tensor as replicated and would restore one rank's
rows on every rank (docs/distributed.md, "Checkpoints and resume"). Replicated state (a ``[1, n]`` statistic, a
right-side projector) stays a plain tensor, identical on all ranks. :func:`local` reads either form.

Every collective adds its payload to :data:`COMM` (bytes per rank: the tensor all-reduced or broadcast, the
gathered result of an all-gather), which ``memtrain bench`` and the distributed tests report per step.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

#: Bytes moved by memtrain's own collectives, by kind ("all_reduce", "all_gather", "broadcast"), on this rank.
COMM: Counter = Counter()


def local(t):
    """This rank's part of a state tensor stored by :meth:`Rows.keep` (or the tensor itself)."""
    return t.to_local() if isinstance(t, DTensor) else t


class Rows:
    """The row split of one matrix across the ranks of a process group (``mesh=None``: not split)."""

    def __init__(self, total: int, start: int = 0, *, mesh=None, position: int = 0):
        self.total = total  #: global number of rows (dim 0)
        self.start = start  #: first global row held by this rank
        #: the parameter's 0-based position in the optimizer, over all param groups (the update receives only the
        #: local rows of a DTensor, so it cannot find the parameter in its group by identity)
        self.position = position
        self.mesh = mesh
        self.group = mesh.get_group() if mesh is not None else None
        self.world = dist.get_world_size(self.group) if mesh is not None else 1
        self.rank = dist.get_rank(self.group) if mesh is not None else 0
        self.owner = position % self.world  #: the rank that computes this matrix's ``full`` operations

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @classmethod
    def of(cls, param: DTensor, name: str, position: int) -> "Rows":
        """The split of an FSDP2 parameter; its ``position`` in the optimizer picks the owner.
        Anything but ``Shard(0)`` on a 1-D mesh (HSDP, tensor parallelism) is refused: memtrain's collectives
        are written for row blocks."""
        mesh, placements = param.device_mesh, tuple(param.placements)
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise RuntimeError(
                f"parameter {name!r} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; memtrain's "
                "matrix optimizers support FSDP2's row sharding only (Shard(0) on a 1-D mesh, fully_shard without "
                "HSDP or tensor parallelism). Use an elementwise optimizer such as adamw for other layouts."
            )
        rows = cls(param.shape[0], mesh=mesh, position=position)
        rows.start = min(rows.rank * math.ceil(rows.total / rows.world), rows.total)
        held = param.to_local().shape[0]
        if held != rows.held:
            raise RuntimeError(f"parameter {name!r}: rank {rows.rank} holds {held} of {rows.total} rows, not the "
                               "torch.chunk split FSDP2 uses; memtrain cannot place its rows")
        return rows

    # -- reduce ---------------------------------------------------------------------------------------------
    def _all_reduce(self, t: Tensor, op) -> Tensor:
        if self.group is None:
            return t
        t = t.contiguous()
        dist.all_reduce(t, op=op, group=self.group)
        COMM["all_reduce"] += t.numel() * t.element_size()
        return t

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over ranks (in place, returned); unsharded: ``t`` itself."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def max(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def all(self, flags: Tensor) -> Tensor:
        """Global logical AND of boolean ``flags``: a data-dependent branch that decides whether a collective runs
        must be taken from this, never from the local shard (an empty or all-zero shard would enter a different
        collective than its peers and hang)."""
        return self._all_reduce(flags.to(torch.int32), dist.ReduceOp.MIN).bool()

    def column_mean(self, x: Tensor) -> Tensor:
        """Each column's mean over all rows of the global matrix (dim -2, keepdim): a ``reduce`` op."""
        if self.group is None:
            return x.mean(dim=-2, keepdim=True)
        return self.sum(x.sum(dim=-2, keepdim=True)) / self.total

    def norm_sq(self, x: Tensor) -> Tensor:
        """``‖X‖_F²`` of the global matrix as a 0-d fp64 tensor: summed per row in x's dtype, across rows (and
        ranks) in fp64."""
        sq = x.square()
        per_row = sq.flatten(1).sum(dim=-1) if x.dim() > 1 else sq  # flatten(1), not reshape: empty shards work
        return self.sum(per_row.double().sum())

    def norm(self, x: Tensor) -> Tensor:
        """``‖X‖_F`` of the global matrix as a 0-d tensor in x's dtype. Unsharded: ``torch.linalg.vector_norm(x)``,
        bitwise the single-process value; sharded: the root of :meth:`norm_sq` (an fp64 scalar all-reduce)."""
        if self.group is None:
            return torch.linalg.vector_norm(x)
        return self.norm_sq(x).sqrt().to(x.dtype)

    # -- full -----------------------------------------------------------------------------------------------
    def gather(self, x: Tensor) -> Tensor:
        """The global matrix from every rank's rows (an all-gather; every rank gets it)."""
        if self.group is None:
            return x
        chunk = math.ceil(self.total / self.world)
        padded = x.new_zeros((chunk, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        full = torch.cat(parts)[: self.total]
        COMM["all_gather"] += full.numel() * full.element_size()
        return full

    def broadcast(self, t: Tensor) -> Tensor:
        """``t`` as computed on :attr:`owner`, on every rank (in place, returned). Other ranks pass a buffer of the
        same shape and dtype; replicated results are thus bitwise identical everywhere."""
        return self.start_broadcast(t)()

    def start_broadcast(self, t: Tensor) -> Callable[[], Tensor]:
        """:meth:`broadcast` issued without waiting: returns a function that waits for it and returns ``t``, so that
        several broadcasts (from different owners) are in flight at once. Unsharded: ``t`` at once."""
        if self.group is None:
            return lambda: t
        t = t.contiguous()
        work = _start_broadcast(t, self.owner, self.group)

        def arrived() -> Tensor:
            work.wait()
            return t
        return arrived

    def on_owner(self, solve, like: Tensor) -> Tensor:
        """``solve()`` run on :attr:`owner` only and broadcast into ``like`` (a buffer of the result's shape and
        dtype) on the other ranks: a replicated result, bitwise identical everywhere. Unsharded: ``solve()``."""
        return self.broadcast(solve() if self.is_owner else like)

    @property
    def held(self) -> int:
        """How many rows this rank holds under the ``torch.chunk`` split FSDP2 uses."""
        if self.group is None:
            return self.total
        chunk = math.ceil(self.total / self.world) if self.total else 0
        return max(0, min(chunk, self.total - self.start))

    @property
    def is_owner(self) -> bool:
        return self.rank == self.owner

    def mine(self, full: Tensor) -> Tensor:
        """This rank's rows of a global ``[total, ...]`` tensor."""
        if self.group is None:
            return full
        return full[self.start: self.start + self.held]

    # -- state ----------------------------------------------------------------------------------------------
    def keep(self, t: Tensor, total: int | None = None):
        """Store ``t`` (this rank's rows of a ``[total, ...]`` tensor) as optimizer state: a ``Shard(0)`` DTensor
        with the global shape under FSDP2, ``t`` itself otherwise. ``total``: the global length of dim 0 when it
        is not the parameter's (state packed along a flat 1-D shard)."""
        if self.group is None:
            return t
        shape = (self.total if total is None else total, *t.shape[1:])
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(t, self.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def unsharded(t: Tensor, position: int = 0) -> Rows:
    """The :class:`Rows` of a tensor that is not sharded (one process, DDP): every collective is the identity.
    ``position``: the parameter's position in the optimizer (:attr:`Rows.position`)."""
    return Rows(t.shape[0] if t.dim() else 1, position=position)


class Spread:
    """One ``step()``'s division of the owned matrices among data-parallel ranks
    (:meth:`MemtrainOptimizer.spread_over_ranks <memtrain.optim.base.MemtrainOptimizer.spread_over_ranks>`):
    every rank holds the same parameters and gradients; the k-th matrix of each shape (in ``step()``'s order) is
    updated by rank ``k mod world`` only, and :meth:`finish` broadcasts each from its owner, so every rank ends
    with the owner's values, bitwise what it would have computed itself."""

    def __init__(self, group, world: int):
        self.group = group  #: the process group (None: the default one)
        self.world = world
        self.rank = dist.get_rank(group)
        self._seen: Counter = Counter()  # matrices assigned so far, per shape key
        self._owners: list[tuple[Tensor, int]] = []

    def owner(self, param: Tensor, key) -> int:
        """The rank that updates ``param`` (``key``: its shape class; same-shape matrices alternate owners, so each
        rank gets about 1/world of every shape and can still batch its share)."""
        owner = self._seen[key] % self.world
        self._seen[key] += 1
        self._owners.append((param, owner))
        return owner

    def finish(self) -> None:
        """Every assigned matrix broadcast from its owner, all in flight at once, then waited for."""
        works = [_start_broadcast(param.detach(), owner, self.group) for param, owner in self._owners]
        for work in works:
            work.wait()
        self._owners.clear()


def _start_broadcast(t: Tensor, owner: int, group):
    """An asynchronous broadcast of contiguous ``t`` from ``owner`` (a rank of ``group``; None: the default group),
    counted in :data:`COMM`; returns its work handle."""
    src = dist.get_global_rank(group or dist.group.WORLD, owner)
    COMM["broadcast"] += t.numel() * t.element_size()
    return dist.broadcast(t, src=src, group=group, async_op=True)


def comm_bytes() -> int:
    return sum(COMM.values())
