"""Checkpoints that resume exactly or refuse (docs/resume.md).

Each checkpoint memtrain's ``Trainer`` saves gets a ``memtrain_run.json``: the optimizer name, its resolved options
(registry presets + TrainingArguments + optim_args), its parameter-group layout, the memtrain version, and the
SHA-256 of every file of the checkpoint. On resume, before any step:

* a missing, empty or changed file (optimizer.pt, scheduler.pt, rng_state*.pth, the FSDP2 ``optimizer_0/``
  shards, the weights, …) stops the run with an error naming the file;
* a different optimizer or a different state-shaping option (rank, block size, rules, routing, layerwise …)
  stops it with an error listing old -> new values and the two ways on;
* the options that shape no state (``registry.resumable_options``: lr, weight decay, betas, ε, …) are taken from
  the new arguments and applied to the restored param groups (torch's ``load_state_dict`` would keep the
  checkpoint's).

``--resume_fresh_optimizer`` restores the weights and the step only: a fresh optimizer (any settings), the lr
schedule fast-forwarded to the checkpoint's step, fresh RNG streams.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..version import __version__
from ..optim import registry
from .engines import deepspeed_requested
from .factory import _optim_name, is_memtrain_optimizer, optimizer_factory, optimizer_kwargs_from_args

logger = logging.getLogger(__name__)

RUN_FILE = "memtrain_run.json"
#: Where the optimizer state lives: a file, or a directory of DCP shards (FSDP2).
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer_0")  # plain / accelerate / FSDP DCP directory
SCHEDULER_FILE = "scheduler.pt"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked; the message says what differs and how to proceed."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != RUN_FILE)


def _jsonable(options: dict) -> dict:
    """Options as JSON holds them (tuples become lists); values JSON cannot hold (callables) are left out."""
    out = {}
    for key, value in options.items():
        try:
            out[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return out


def run_options(trainer) -> dict[str, Any]:
    """The optimizer's resolved options, as the optimizer is (or will be) built from ``trainer``'s arguments."""
    args = trainer.args
    name = _optim_name(args.optim)
    if trainer.optimizer_cls_and_kwargs is not None:
        options = dict(trainer.optimizer_cls_and_kwargs[1])
    elif is_memtrain_optimizer(name):
        options = optimizer_factory(name, **optimizer_kwargs_from_args(args))[1]
    else:  # an HF optimizer: HF builds it from these fields
        options = {"lr": args.learning_rate, "weight_decay": args.weight_decay, "optim_args": args.optim_args,
                   "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon}
    if is_memtrain_optimizer(name):
        options = {**_defaults(name), **options}
    for key in ("name", "print_param_groups", "create"):
        options.pop(key, None)
    return _jsonable(options)


def _defaults(name: str) -> dict:
    """Every option's value when not given: registry preset, else the signature's default (so a default that
    changes between memtrain versions is caught too)."""
    spec = registry.get_spec(name)
    out = {k: spec.defaults.get(k, p.default) for k, p in spec.options().items() if p.default is not p.empty}
    return {**out, **{k: (False if t is bool else 0.0) for k, t in registry.UNIVERSAL_OPTIONS.items()}}


def group_layout(optimizer) -> list[dict]:
    """What routing decided: per param group its role, method, size and parameter names."""
    return [{"role": g.get("role"), "method": g.get("method"), "params": len(g["params"]),
             "names": list(g.get("names", []))} for g in optimizer.param_groups]


def write_run_record(trainer, checkpoint_dir: str) -> None:
    """Write ``memtrain_run.json`` into a just-saved checkpoint (main process, after every rank saved)."""
    directory = Path(checkpoint_dir)
    record = {
        "memtrain_version": __version__,
        "optimizer": _optim_name(trainer.args.optim),
        "optimizer_class": type(_inner(trainer.optimizer)).__qualname__,
        "options": run_options(trainer),
        "groups": group_layout(trainer.optimizer),
        "world_size": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "sha256": {name: _sha256(directory / name) for name in _files(directory)},
    }
    (directory / RUN_FILE).write_text(json.dumps(record, indent=2))


def _inner(optimizer):
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def read_run_record(checkpoint: str) -> dict | None:
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeError(f"{path} is not readable JSON ({e}): the checkpoint's record is damaged") from None


def _present(directory: Path, name: str) -> bool:
    path = directory / name
    return (path.is_file() and path.stat().st_size > 0) or (path.is_dir() and any(path.iterdir()))


def _rng_name(args) -> str:
    """HF's name for this process's RNG state."""
    return "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"


def check_files(checkpoint: str, args, record: dict | None) -> None:
    """Every file the resume reads is there, non-empty and (with a record) unchanged since it was saved."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise ResumeError(f"--resume_from_checkpoint {checkpoint!r} is not a directory")
    fresh = getattr(args, "resume_fresh_optimizer", False)
    how = ("pass --resume_fresh_optimizer true to resume the weights and step with a fresh optimizer, or resume "
           "from an intact checkpoint")
    if record is not None:
        for name, digest in record.get("sha256", {}).items():
            path = directory / name
            optional = fresh and (name.startswith(OPTIMIZER_FILES) or name.startswith((SCHEDULER_FILE, "rng_state")))
            if not path.is_file():
                if optional:
                    continue
                raise ResumeError(f"checkpoint {checkpoint}: {name} is missing (it was saved with the checkpoint); "
                                  f"{how}")
            if _sha256(path) != digest:
                if optional:
                    continue
                what = "is empty" if path.stat().st_size == 0 else "does not match the SHA-256 recorded at save"
                raise ResumeError(f"checkpoint {checkpoint}: {name} {what}, so it is damaged or was replaced; {how}")
    if fresh or args.save_only_model:
        return
    needed = [("optimizer state", OPTIMIZER_FILES), ("lr scheduler state", (SCHEDULER_FILE,)),
              ("RNG state", (_rng_name(args),))]
    if deepspeed_requested(args):  # DeepSpeed keeps optimizer and scheduler in its global_step*/ directory
        needed = [("DeepSpeed engine state", tuple(p.name for p in directory.glob("global_step*")) or ("global_step*",)),
                  *needed[2:]]
    for label, names in needed:
        if not any(_present(directory, n) for n in names):
            raise ResumeError(f"checkpoint {checkpoint}: the {label} ({' or '.join(names)}) is missing or empty, so "
                              f"training cannot continue exactly; {how}")


def compare_options(checkpoint: str, record: dict, name: str, options: dict) -> list[str]:
    """Refuse a changed optimizer or state-shaping option; return the resumable changes (old -> new) to apply."""
    how = (f"Resume with the checkpoint's settings ({_settings(record)}), or pass --resume_fresh_optimizer true to "
           "keep the weights and step and start a fresh optimizer")
    if record["optimizer"] != name:
        raise ResumeError(f"checkpoint {checkpoint} was trained with optimizer {record['optimizer']!r}, not {name!r}: "
                          f"its optimizer state cannot be continued by another method. {how}")
    old = record["options"]
    resumable = registry.resumable_options(name)
    changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
    shaping = [k for k in changed if k not in resumable]
    if shaping:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {options.get(k)!r}" for k in shaping)
        raise ResumeError(f"checkpoint {checkpoint}: {name} options that shape the optimizer state differ ({diffs}). "
                          f"Options that may change on resume: {', '.join(sorted(resumable))}. {how}")
    return [f"{k}: {old.get(k)!r} -> {options.get(k)!r}" for k in changed]


def _settings(record: dict) -> str:
    """The flags that rebuild the checkpoint's optimizer: options that differ from today's defaults."""
    name, saved = record["optimizer"], record["options"]
    if not is_memtrain_optimizer(name):
        text = saved.get("optim_args")
    else:
        defaults = _jsonable(_defaults(name))
        text = registry.normalize_optim_args({k: v for k, v in saved.items() if k in defaults and k not in (
            "lr", "weight_decay", "betas", "eps") and defaults[k] != v})
    return f"--optim {record['optimizer']}" + (f" --optim_args '{text}'" if text else "")


def check_resume(trainer, checkpoint: str) -> dict | None:
    """Everything that can be checked before the optimizer exists; returns the record (None: an HF checkpoint)."""
    args = trainer.args
    record = read_run_record(checkpoint)
    check_files(checkpoint, args, record)
    if getattr(args, "resume_fresh_optimizer", False):
        return record
    if record is None:
        warnings.warn(f"checkpoint {checkpoint} has no {RUN_FILE} (not saved by memtrain's Trainer, or by an older "
                      "memtrain): its optimizer settings and file integrity cannot be verified", stacklevel=2)
        return None
    changes = compare_options(checkpoint, record, _optim_name(args.optim), run_options(trainer))
    if changes:
        logger.warning("resuming %s with new values of options that shape no state: %s", checkpoint,
                       "; ".join(changes))
    return record


def check_layout(checkpoint: str, record: dict | None, optimizer) -> None:
    """The routed param groups (roles, methods, parameter names) must be the checkpoint's."""
    if record is None or "groups" not in record:
        return
    now = group_layout(optimizer)
    if now != record["groups"]:
        first = next((i for i, (a, b) in enumerate(zip(record["groups"], now)) if a != b),
                     min(len(now), len(record["groups"])))
        saved = record["groups"][first] if first < len(record["groups"]) else None
        new = now[first] if first < len(now) else None
        raise ResumeError(f"checkpoint {checkpoint}: the parameter groups differ from the checkpoint's (routing "
                          f"rules, target modules, trainable parameters or the model changed); group {first}: saved "
                          f"{_brief(saved)}, now {_brief(new)}. Resume with the same model and routing, or pass "
                          "--resume_fresh_optimizer true")


def _brief(group: dict | None) -> str:
    if group is None:
        return "none"
    names = ", ".join(group["names"][:2]) + (", …" if len(group["names"]) > 2 else "")
    return f"{group['role']}/{group['method']} with {group['params']} parameters ({names})"


def snapshot_groups(optimizer, name: str) -> list[dict]:
    """The new arguments' values of the resumable options, per group, before the checkpoint overwrites them."""
    keep = registry.resumable_options(name) - {"lr"}
    return [{"initial_lr": g.get("initial_lr", g["lr"]), **{k: g[k] for k in keep if k in g}}
            for g in optimizer.param_groups]


def apply_new_options(optimizer, scheduler, snapshot: list[dict]) -> None:
    """Give the restored groups the new arguments' resumable values. The lr: the restored schedule position is
    kept and rescaled by new/old initial lr, so a changed --learning_rate applies from the next step and an
    unchanged one is bitwise the checkpoint's."""
    base_lrs = getattr(scheduler, "base_lrs", None)
    last = getattr(scheduler, "_last_lr", None)
    for i, (group, new) in enumerate(zip(optimizer.param_groups, snapshot)):
        old_initial = group.get("initial_lr", group["lr"])
        target = new["initial_lr"]
        if old_initial != target:
            ratio = target / old_initial if old_initial else 0.0
            group["lr"] = group["lr"] * ratio if old_initial else target
            group["initial_lr"] = target
            if base_lrs is not None and i < len(base_lrs):
                base_lrs[i] = target
            if last is not None and i < len(last):
                last[i] = group["lr"]
        for key, value in new.items():
            if key != "initial_lr":
                group[key] = value


def fast_forward_scheduler(scheduler, steps: int) -> None:
    """A fresh scheduler at the checkpoint's step (``--resume_fresh_optimizer``): no warm-up restart."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()


@contextmanager
def loading(checkpoint: str, what: str, fresh: str):
    """A file torch cannot load (one without a record to check it against) is reported by name."""
    try:
        yield
    except ResumeError:
        raise
    except Exception as e:
        raise ResumeError(f"checkpoint {checkpoint}: {what} could not be loaded ({type(e).__name__}: {e}); pass "
                          f"--resume_fresh_optimizer true to resume the weights and step with {fresh}") from e


def rng_file(checkpoint: str, args) -> Path:
    return Path(checkpoint) / _rng_name(args)


def resolve_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    """HF's ``resume_from_checkpoint=True``: the last checkpoint in output_dir."""
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise ResumeError(f"--resume_from_checkpoint true: no checkpoint-* directory in {output_dir}")
        return found
    return resume_from_checkpoint or None
