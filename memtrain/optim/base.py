"""The shared base of every memtrain optimizer.

A method subclasses :class:`MemtrainOptimizer`, names the roles it transforms in ``owns`` and implements
``update()`` for one parameter. Everything else is here, once:

* role-tagged param groups (built by ``routing.build_param_groups``); each group records the ``method`` that
  updates it: the subclass for owned roles, the AdamW fallback (AdamW-T, docs/registry-and-routing.md, "The AdamW
  conventions") for the rest, with its own ``adam_lr`` / betas / ε options, or the method ``use_fallback``
  chose (``adam4bit``, ``adafactor``);
* no host sync in a step: warnings that depend on tensor values are device flags, emitted by ``flush_warnings``;
* lazy state: nothing is created before the first ``step()`` that sees a gradient, and state holds only
  tensors and Python numbers, so ``torch.load(weights_only=True)`` resume and accelerate's FSDP2 parameter
  swap both work;
* fp32 arithmetic on low-precision parameters, written back in the parameter's own dtype;
* a ``load_state_dict`` that keeps each state tensor's saved dtype (torch casts floating state to the
  parameter dtype, turning fp32 moments of a bf16 model into bf16 and uint8 codes into floats);
* the loud refusal of flattened 1-D shards for roles whose method needs the matrix shape, and of FSDP2 shards for
  a method whose sharded update is not verified (the rules: ``capabilities.engine_refusal``);
* the method's identity and capabilities as class attributes, which the registry reads (``registry.BUILTINS``);
* FSDP2: ``update()`` gets the rank's local rows of a sharded parameter and its gradient, plus a
  :class:`~memtrain.optim.sharding.Rows` that provides the collectives the method's transforms need (see
  ``memtrain/optim/sharding.py``); unsharded parameters get the same call with identity collectives; methods that
  set ``windowed`` get ``world`` sharded matrices at a time (``update_window``), so the ranks' owner-only work
  overlaps;
* DDP: ``spread_over_ranks`` lets each rank update a share of the owned matrices and broadcast them (methods that
  set ``spreads``).
"""
from __future__ import annotations

import importlib
import logging
import math
import warnings
from contextlib import contextmanager
from itertools import chain
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from .routing import ROLES
from .capabilities import method_refusal
from .sharding import Rows, Spread, local, unsharded
from .transforms import TORCH, AdamConvention, adam_, descend_

FALLBACK = "adamw"
#: The methods ``fallback=`` may name for the roles a method does not own (:meth:`MemtrainOptimizer.use_fallback`):
#: name -> "module:Class" under memtrain.optim (adamw: this base's own AdamW).
FALLBACKS = {"adamw": "", "adam4bit": "adam4bit:Adam4bit", "adafactor": "adafactor:Adafactor"}
SHAPED_ROLES = ("matrix", "embedding", "head")


def _check_hyper(name: str, value, *, positive: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_betas(name: str, betas) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of floats like (0.9, 0.999), got {betas!r}") from None
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {betas!r}")
    return beta1, beta2


def warn_once(seen: set, key, message: str, *, logger: logging.Logger | None = None, stacklevel: int = 2) -> None:
    """Say ``message`` the first time ``key`` enters ``seen``, the caller's scope: a module-level set (once per
    process) or an instance's (once per optimizer). A ``UserWarning`` pointing ``stacklevel`` frames above the
    caller, or ``logger.warning`` where the notice is information rather than a problem with the user's call."""
    if key in seen:
        return
    seen.add(key)
    if logger is not None:
        logger.warning(message)
    else:
        warnings.warn(message, stacklevel=stacklevel + 1)


def _tag_untyped_groups(params) -> list[dict]:
    """Plain parameters (not built by ``build_optimizer``) carry no role. Give them one by shape: 2+ dims ->
    ``matrix``, else ``vector``. This cannot tell an embedding from a matrix; use ``build_optimizer(model, ...)``
    for real routing."""
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    tagged = []
    for group in groups:
        if "role" in group:
            tagged.append(group)
            continue
        plist = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        for role in ("vector", "matrix"):
            members = [p for p in plist if (p.dim() >= 2) == (role == "matrix")]
            if members:
                tagged.append({**group, "params": members, "role": role})
    return tagged


@contextmanager
def fp32_view(param: Tensor):
    """Yield an fp32 tensor to update in place; write it back in the parameter's dtype (round to nearest).

    fp32 parameters are updated in place directly, so they see exactly the operations of the math, no copy."""
    if param.dtype == torch.float32:
        yield param
    else:
        work = param.float()
        yield work
        param.copy_(work)


def _restore_dtypes(loaded, saved):
    """Give every tensor in ``loaded`` (nested dicts/lists) the dtype of its counterpart in ``saved``."""
    if torch.is_tensor(loaded) and torch.is_tensor(saved):
        if loaded.dtype != saved.dtype:
            return saved.to(device=loaded.device, copy=True)
        return loaded
    if isinstance(loaded, dict) and isinstance(saved, dict):
        return {k: _restore_dtypes(v, saved.get(k)) for k, v in loaded.items()}
    if isinstance(loaded, (list, tuple)) and isinstance(saved, (list, tuple)) and len(loaded) == len(saved):
        return type(loaded)(_restore_dtypes(a, b) for a, b in zip(loaded, saved))
    return loaded


class MemtrainOptimizer(Optimizer):
    """Base class: subclasses set ``name``, ``description``, ``owns`` (and the capabilities that differ from the
    defaults below) and implement :meth:`update`. The registry reads all of it from the class."""

    name: ClassVar[str] = "base"
    #: One line for ``memtrain list``.
    description: ClassVar[str] = ""
    #: Roles this method transforms; every other role is updated by the AdamW fallback.
    owns: ClassVar[frozenset[str]] = frozenset()
    #: Whether the transform needs the 2-D shape (refuses flattened 1-D shards of shaped roles).
    needs_matrix_shape: ClassVar[bool] = False
    #: Keeps no per-parameter state on the roles it owns.
    stateless: ClassVar[bool] = False
    #: Runs exactly under FSDP2 (DTensor ``Shard(0)`` parameters).
    fsdp2: ClassVar[bool] = True
    #: Runs as a DeepSpeed ZeRO client optimizer (flat 1-D partitions).
    deepspeed: ClassVar[bool] = True
    #: Preset option values (a method's hyperparameter table) passed unless the user overrides them; never ``lr``.
    #: (Not called ``defaults``: torch's ``Optimizer.defaults`` is the instance's dict of group defaults.)
    presets: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: Under DDP each rank may update only its share of the owned matrices and receive the rest by broadcast
    #: (:meth:`spread_over_ranks`): worth it where a matrix's update costs far more than sending it (SWAN's
    #: whitening, Muon's Newton–Schulz). The other ranks still run :meth:`update_state`, so every rank's state
    #: stays the same.
    spreads: ClassVar[bool] = False
    #: ``step()`` hands the owned, unsharded same-shape matrices of a group to :meth:`update_batch` together
    #: (docs/registry-and-routing.md, "Batched matrix updates"); only stateless methods set it.
    batched: ClassVar[bool] = False
    #: Under FSDP2 ``step()`` hands the owned sharded matrices of a group to :meth:`update_window`, ``world`` at a
    #: time (one owned by each rank), so that the ranks' owner-only work runs at the same time rather than in turn
    #: (docs/distributed.md, "How a method runs on a sharded weight"). Layer-wise release keeps the per-matrix path.
    windowed: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_lr: float | None = None,
        **method_defaults: Any,
    ):
        _check_hyper("lr", lr)
        _check_hyper("weight_decay", weight_decay)
        _check_hyper("eps", eps)
        if adam_lr is not None:
            _check_hyper("adam_lr", adam_lr)
        betas = _check_betas("betas", betas)
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **method_defaults)
        super().__init__(_tag_untyped_groups(params), defaults)
        for group in self.param_groups:
            if group["role"] in self.owns:
                group.setdefault("method", self.name)
            else:
                group.setdefault("method", FALLBACK)
                if adam_lr is not None:
                    group["lr"] = adam_lr
            group.setdefault("names", [""] * len(group["params"]))
        self._flagged: dict[str, tuple[Tensor, str]] = {}  # lazy warnings: key -> (device flag, message)
        self._warned_keys: set[str] = set()
        self._fallbacks: dict[str, MemtrainOptimizer] = {}  # fallback method name -> its per-parameter update
        self._spread_over: tuple | None = None  # (process group, world size) once spread_over_ranks() is called

    # -- the method for the roles this one does not own ------------------------------------------------
    def use_fallback(self, name: str) -> "MemtrainOptimizer":
        """Update every group this method does not own (``method == "adamw"``: embedding, head, vectors, ... as
        routed) with the registered method ``name`` instead of the AdamW fallback: ``"adamw"`` (the default, a
        no-op), ``"adam4bit"`` (4-bit moments) or ``"adafactor"`` (factored second moment).

        The update is that method's own per-parameter ``update()``, run by an instance of it that holds no
        parameters, with that method's defaults for its options; lr, weight decay (and adam4bit's betas and ε) are
        the group's, i.e. this method's fallback options (``adam_lr``, ``betas``, ``eps``). Call before the first
        step (``build_optimizer(..., fallback=name)`` and ``optim_args="fallback=name"`` do). Returns ``self``."""
        if name not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {name!r}")
        if name == FALLBACK:
            return self
        if self.state:
            raise RuntimeError(f"{self.name}: choose the fallback before the first step (state exists already)")
        # The method's class, imported by name like the registry's BUILTINS (a module-level import would be a cycle:
        # every method module imports this one). An instance over a placeholder: its update() and per-instance
        # caches, never its groups.
        module, _, cls_name = FALLBACKS[name].partition(":")
        cls = getattr(importlib.import_module(f"{__package__}.{module}"), cls_name)
        method = cls([torch.zeros(1)], lr=1e-3, **getattr(cls, "presets", {}))
        shared = ("lr", "weight_decay", "betas", "eps")  # the group's own values
        options = {k: v for k, v in method.defaults.items() if k not in shared}
        clash = sorted(set(options) & set(self.defaults))
        if clash:
            raise RuntimeError(f"{self.name}: fallback={name} options {clash} would overwrite this method's options")
        groups = [g for g in self.param_groups
                  if g["method"] == FALLBACK and g["role"] in ROLES and g["role"] not in self.owns]
        if not groups:  # routed roles only: an adapter's own groups keep their update
            raise ValueError(f"{self.name} updates every routed parameter itself (it owns roles "
                             f"{', '.join(sorted(self.owns))}), so fallback={name} would change nothing; drop it")
        for group in groups:
            group.update(options, method=name)
        self._fallbacks[name] = method
        return self

    # -- data parallelism: each rank updates a share of the matrices --------------------------------------
    def spread_over_ranks(self, group=None) -> "MemtrainOptimizer":
        """Under DDP (every rank holds the same parameters and, after DDP's all-reduce, the same gradients): from
        now on each rank of ``group`` (None: the default process group) updates only its share of the owned
        matrices, about 1/world of each shape, and receives the others by broadcast from their owners, bitwise what
        it would have computed itself (docs/distributed.md, "Spreading matrix updates over DDP ranks"). The
        fallback's parameters are updated on every rank as before. memtrain's Trainer calls this under DDP for
        methods that set :attr:`spreads`. FSDP2's sharded matrices keep their own owner-rank scheme, and
        layer-wise release (whose hooks update one parameter as its gradient is ready) does not spread. A group
        of one rank changes nothing. Returns ``self``."""
        if not self.spreads:
            raise ValueError(f"{self.name} does not spread its updates over ranks: only methods whose matrix "
                             "updates cost far more than sending the matrix do (swan, muon)")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("spread_over_ranks needs an initialised process group (torch.distributed)")
        world = dist.get_world_size(group)
        self._spread_over = (group, world) if world > 1 else None
        return self

    # -- warnings about tensor values, without a host sync ---------------------------------------------
    def flag_warning(self, key: str, flag: Tensor, message: str) -> None:
        """Remember that ``message`` is due if the 0-d boolean ``flag`` is (or, for ``key``, ever was) True.

        ``step()`` never reads a tensor value on the host (a GPU stall per parameter per step, and a failure under
        ``FakeTensorMode``), so a warning that depends on values is recorded as a device flag, OR-ed per ``key``,
        and emitted by :meth:`flush_warnings`, which memtrain's Trainer calls at every logging step."""
        if key in self._warned_keys:
            return
        held = self._flagged.get(key)
        self._flagged[key] = (flag if held is None else held[0] | flag, message)

    def flush_warnings(self) -> list[str]:
        """Emit (once per key) the recorded warnings whose flag is True, and return their messages. One host sync
        for all of them; call it outside ``step()`` (memtrain's Trainer does at logging steps)."""
        if not self._flagged:
            return []
        keys = list(self._flagged)
        device = self._flagged[keys[0]][0].device
        values = torch.stack([self._flagged[k][0].reshape(()).to(device, torch.bool) for k in keys]).tolist()
        emitted = []
        for key, value in zip(keys, values):
            if value:
                message = self._flagged.pop(key)[1]
                self._warned_keys.add(key)
                warnings.warn(message, stacklevel=2)
                emitted.append(message)
        return emitted

    # -- the per-parameter updates -------------------------------------------------------------------
    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        """Update one parameter of an owned role in place. ``state`` is empty on the first call. Under FSDP2
        ``param``/``grad`` are this rank's rows and ``rows`` gives the collectives; state that holds this rank's
        rows is stored with ``rows.keep()`` and read with ``sharding.local()``."""
        raise NotImplementedError(f"{type(self).__name__} owns roles {sorted(self.owns)} but has no update()")

    def update_state(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        """The state part of :meth:`update` alone (a momentum buffer's update), bitwise as :meth:`update` does it:
        what a rank runs for a matrix another rank updates under :meth:`spread_over_ranks`. Stateless methods:
        nothing."""

    def update_batch(self, params: list[Tensor], grads: list[Tensor], group: dict) -> None:
        """Update same-shape, unsharded ``[out, in]`` matrices of an owned role at once, with the same result as
        :meth:`update` on each (within the method's documented tolerance): ``batched`` methods only."""
        raise NotImplementedError(f"{type(self).__name__} sets batched but has no update_batch()")

    def update_window(self, params: list[Tensor], grads: list[Tensor], states: list[dict], rows: list[Rows],
                      group: dict) -> None:
        """Update sharded matrices of an owned role together (this rank's rows, their states and :class:`Rows`), with
        the same result as :meth:`update` on each: ``windowed`` methods only."""
        raise NotImplementedError(f"{type(self).__name__} sets windowed but has no update_window()")

    @staticmethod
    def descend_each(params: list[Tensor], deltas: Tensor, group: dict) -> None:
        """``W ← W·(1 − η·λ) − η·Δ`` for each parameter and its row of the stacked directions ``deltas``."""
        for param, delta in zip(params, deltas):
            with fp32_view(param) as p32:
                descend_(p32, delta, lr=group["lr"], weight_decay=group["weight_decay"])

    def adamw_update(self, param: Tensor, grad: Tensor, state: dict, group: dict, rows: Rows) -> None:
        """The AdamW-T fallback for roles the method does not own (and the whole of ``adamw``)."""
        self.adam_step(param, grad, state, group, TORCH, rows)

    @staticmethod
    def adam_step(param: Tensor, grad: Tensor, state: dict, group: dict, convention: AdamConvention,
                  rows: Rows) -> None:
        """One Adam-family step (``transforms.adam_`` in ``convention``: ``TORCH``, ``HF``, ``SCALE``) with fp32
        ``exp_avg``/``exp_avg_sq`` state and the group's lr, betas, ε and decay: lazy state, counter, fp32 math
        written back in the param dtype. Elementwise, so the moments are sharded like the parameter."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = rows.keep(torch.zeros_like(param, dtype=torch.float32))
            state["exp_avg_sq"] = rows.keep(torch.zeros_like(param, dtype=torch.float32))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        with fp32_view(param) as p32:
            adam_(p32, grad.float(), local(state["exp_avg"]), local(state["exp_avg_sq"]), step=state["step"],
                  lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                  convention=convention)

    def _update_fn(self, group: dict) -> Callable:
        if group["method"] in self._fallbacks:
            return self._fallbacks[group["method"]].update
        return self.adamw_update if group["method"] == FALLBACK else self.update

    # -- the loop -------------------------------------------------------------------------------------
    def _check_param(self, param: Tensor, group: dict, index: int) -> None:
        """Refuse, before any state exists, parameters this method would silently get wrong."""
        if group["method"] == FALLBACK:
            return  # the AdamW fallback is elementwise: any shard layout is fine
        method = self._fallbacks.get(group["method"], self)  # the method that updates this group
        name = group["names"][index] or f"group {group['role']} #{index}"
        if group["role"] in SHAPED_ROLES and param.dim() < 2:
            refusal = method_refusal(method, "flat", method.name)
            if refusal:
                raise RuntimeError(f"{method.name}: parameter {name!r} (role {group['role']}) arrived as a flattened "
                                   f"{param.dim()}-D tensor of {param.numel()} elements, so its rows and columns are "
                                   f"lost: {refusal}")
        if isinstance(param, DTensor):
            refusal = method_refusal(method, "fsdp2", method.name,
                                     alternative="an optimizer whose capabilities list fsdp2 (memtrain list)")
            if refusal:
                raise RuntimeError(f"{method.name}: parameter {name!r} is a sharded DTensor (FSDP2): {refusal}")
        if isinstance(param, DTensor) and method.needs_matrix_shape and group.get("layout") == "conv1d":
            raise RuntimeError(  # Shard(0) of a stored [in, out] weight splits the columns (docs/distributed.md)
                f"{method.name}: parameter {name!r} is a Conv1D weight (stored [in, out]) sharded by FSDP2, which then "
                "splits its columns, not its rows; memtrain's matrix transforms support this layout only unsharded. "
                "Use DDP, or an elementwise optimizer such as adamw."
            )

    def step_param(self, param: Tensor, grad: Tensor, group: dict, index: int) -> None:
        """Update one parameter of ``group`` (its ``index``-th) from ``grad``: what ``step()`` does for each
        parameter, and what layer-wise release calls from inside backward."""
        if grad.is_sparse:
            raise RuntimeError(f"{self.name} does not support sparse gradients")
        state = self.state[param]
        if not state:
            self._check_param(param, group, index)
        position = self._position(group, index)
        if isinstance(param, DTensor):
            rows = Rows.of(param, group["names"][index], position)
            param, grad = param.to_local(), local(grad)
        else:
            rows = unsharded(param, position)
        self._update_fn(group)(param, grad, state, group, rows)

    def _position(self, group: dict, index: int) -> int:
        """The parameter's position in the optimizer (over all groups): ``Rows.position``; picks its owner rank for
        ``full`` operations."""
        before = 0
        for g in self.param_groups:
            if g is group:
                return before + index
            before += len(g["params"])
        return index

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        spread = Spread(*self._spread_over) if self._spread_over is not None else None
        for group in self.param_groups:
            batches: dict[tuple, list[int]] = {}
            sharded: list[int] = []  # windowed methods' FSDP2 matrices
            for index, param in enumerate(group["params"]):
                if param.grad is None:  # skipped, no state, no counter (docs/registry-and-routing.md)
                    continue
                if self.windowed and group["method"] == self.name and isinstance(param, DTensor):
                    sharded.append(index)
                    continue
                key = self._batch_key(param, group)
                if spread is not None and group["method"] == self.name and not isinstance(param, DTensor) \
                        and spread.owner(param, key or param.shape) != spread.rank:
                    state = self.state[param]  # touched as on its owner: state_dict() lists it
                    if not state:
                        self._check_param(param, group, index)
                    self.update_state(param, param.grad, state, group)
                    continue
                if key is None:
                    self.step_param(param, param.grad, group, index)
                else:
                    batches.setdefault(key, []).append(index)
            # A stack never holds more elements than the group's largest matrix, whose own update needs temporaries of
            # that size anyway: batching never raises the step's memory peak (memtrain estimate's numbers hold).
            limit = max((group["params"][i].numel() for indices in batches.values() for i in indices), default=0)
            for indices in batches.values():
                self._step_batch(group, indices, limit)
            self._step_windows(group, sharded)
        if spread is not None:
            spread.finish()
        return loss

    def _batch_key(self, param: Tensor, group: dict) -> tuple | None:
        """What a parameter is batched by (None: updated on its own): owned, plain 2-D ``[out, in]`` matrices of a
        ``batched`` method, by shape, dtypes and device. Sharded (FSDP2) matrices keep the per-matrix path, whose
        collectives and owner rank are per matrix; layer-wise release sees one parameter at a time anyway."""
        if not self.batched or group["method"] != self.name or isinstance(param, DTensor) or param.dim() != 2 \
                or group.get("layout", "linear") != "linear" or param.grad.is_sparse:
            return None
        return param.shape, param.dtype, param.grad.dtype, param.device

    def _step_batch(self, group: dict, indices: list[int], limit: int) -> None:
        per_chunk = max(1, limit // group["params"][indices[0]].numel())
        for start in range(0, len(indices), per_chunk):
            chunk = indices[start:start + per_chunk]
            if len(chunk) == 1:  # a stack of one would only add a copy
                self.step_param(group["params"][chunk[0]], group["params"][chunk[0]].grad, group, chunk[0])
                continue
            params = [group["params"][i] for i in chunk]
            for index, param in zip(chunk, params):
                if not self.state[param]:  # touched as step_param does, so state_dict() lists the same entries
                    self._check_param(param, group, index)
            self.update_batch(params, [p.grad for p in params], group)

    def _step_windows(self, group: dict, indices: list[int]) -> None:
        """:meth:`update_window` over the group's sharded matrices, ``world`` at a time, in the group's order (the
        same on every rank, so the collectives match). Every parameter is checked before any collective runs."""
        items = []
        for index in indices:
            param = group["params"][index]
            if not self.state[param]:  # touched as step_param does, so state_dict() lists the same entries
                self._check_param(param, group, index)
            rows = Rows.of(param, group["names"][index], self._position(group, index))
            items.append((param.to_local(), local(param.grad), self.state[param], rows))
        world = items[0][3].world if items else 1
        for start in range(0, len(items), world):
            params, grads, states, rows = (list(column) for column in zip(*items[start:start + world]))
            self.update_window(params, grads, states, rows, group)

    # -- checkpoints ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            if saved.get("method", group["method"]) != group["method"] and group["role"] not in self.owns:
                raise ValueError(
                    f"{self.name}: the checkpoint updated the {group['role']} group with {saved['method']!r}, this "
                    f"optimizer with {group['method']!r}: resume with the fallback it was saved with "
                    f"(fallback={saved['method']})")
        saved_state = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, param in zip(saved_ids, params):
            if pid in saved_state and param in self.state:
                self.state[param] = _restore_dtypes(self.state[param], saved_state[pid])
