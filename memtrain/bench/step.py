"""``memtrain bench step``: the time of one ``optimizer.step()`` per memtrain optimizer, next to reference packages.

    memtrain bench step                                   # every registered optimizer on llama-bench
    memtrain bench step --model llama-60m --device cuda --optims adamw "galore:rank=128" --references torch-adamw

Every optimizer (``name[:k=v,k=v][@lr]`` entries, the syntax of ``memtrain bench --optims``) and every reference
(an official implementation, measured when its package imports) updates its own copy of the model from the same
fixed, seeded random gradients: no forward or backward, only the step. After ``--warmup`` steps (which also create
the lazy state), ``--rounds`` interleaved rounds step every optimizer once each, in a shuffled order, so that a
change of machine load during the run is shared by all of them rather than landing on one. Each step is timed with
``time.perf_counter`` (the device synchronised before and after) and ``time.process_time`` (CPU time of all
threads); the table gives the median and the min over rounds, ratios to torch's ``AdamW(foreach=True)`` and to the
method's own reference, and the optimizer-state bytes per parameter (docs/benchmarks/README.md, "Step time").
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..hf.metrics import optimizer_state_bytes, storage_bytes
from ..optim import registry
from ..optim.routing import build_param_groups
from ..recipes.models import build_model
from .optimizers import Entry
from .runner import command_line

LR = 1e-3
#: The projection rank of the pretrain benchmark's presets (configs/bench/pretrain-cpu.yaml), for methods and
#: references alike; the other options are the methods' defaults (update_proj_gap 200: no refresh while timing).
RANK = 64
RANKED = ("galore", "fira", "apollo")
BASELINE = "torch-adamw"


#: Variants timed next to their method's default: SWAN with 3 quintic steps before 3 Newton–Schulz ones (closer
#: to the polar factor than the default 10, in fewer products), with its Newton–Schulz products in bf16, and with
#: the default iteration evaluated on the Gram's eigenvalues (docs/optimizers/swan.md, "Cost per step").
VARIANTS = {"swan": ["swan:ns_quintic_steps=3,ns_steps=3", "swan:ns_dtype=bfloat16", "swan:ns_eval=eigh"]}
#: Variants that run on CPU tensors only (swan refuses ``ns_eval=eigh`` on a GPU).
CPU_ONLY = frozenset({"swan:ns_eval=eigh"})


def default_entries(device: str = "cpu") -> list[str]:
    """Every registered optimizer, built-ins in their table order, the projected ones at rank 64, each followed
    by its :data:`VARIANTS` (those that run on ``device``)."""
    names = [n for n in registry.BUILTINS if n in registry.optimizer_names()]
    names += [n for n in registry.optimizer_names() if n not in names]  # user-registered classes
    variants = {n: [v for v in vs if device == "cpu" or v not in CPU_ONLY] for n, vs in VARIANTS.items()}
    return [entry for n in names for entry in [f"{n}:rank={RANK}" if n in RANKED else n, *variants.get(n, [])]]


# -- references -----------------------------------------------------------------------------------------------
def _projected_groups(model, **matrix_options) -> list[dict]:
    """memtrain's routing, other roles first as HF's GaLore setup orders them: the hidden matrices get the
    projection options, the embedding, head and vectors the package's plain AdamW."""
    return [{"params": g["params"], "weight_decay": 0.0, **(matrix_options if g["role"] == "matrix" else {})}
            for g in build_param_groups(model, owned_roles={"matrix"})]


def _galore_like(package: str, cls: str, scale_key: str) -> Callable:
    def build(model):  # memtrain's defaults: scale (galore) / alpha (fira) 0.25, a refresh every 200 steps
        groups = _projected_groups(model, rank=RANK, update_proj_gap=200, proj_type="std", **{scale_key: 0.25})
        return getattr(importlib.import_module(package), cls)(groups, lr=LR, no_deprecation_warning=True)
    return build


def _apollo(model):
    from apollo_torch import APOLLOAdamW

    # memtrain's apollo defaults: random projection, channel-wise scale, scale 1, scale applied after the limiter
    groups = _projected_groups(model, rank=RANK, proj="random", scale_type="channel", scale=1.0,
                               update_proj_gap=200, proj_type="std")
    return APOLLOAdamW(groups, lr=LR, scale_front=False)


def _hf_adafactor(model):
    from transformers.optimization import Adafactor

    return Adafactor(model.parameters(), lr=LR, scale_parameter=False, relative_step=False, warmup_init=False)


def _torchao_adamw4bit(model):
    from torchao.optim import AdamW4bit

    return AdamW4bit(model.parameters(), lr=LR, weight_decay=0.0)


def _bnb_adamw8bit(model):
    from bitsandbytes.optim import AdamW8bit

    return AdamW8bit(model.parameters(), lr=LR, weight_decay=0.0)


@dataclass(frozen=True)
class Reference:
    label: str
    package: str  # imported first: when that fails the row says "not installed"
    build: Callable


REFERENCES = {
    "torch-adamw": Reference("torch AdamW (foreach)", "torch",
                             lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0, foreach=True)),
    "torch-adamw-fused": Reference("torch AdamW (fused)", "torch",
                                   lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0, fused=True)),
    "hf-adafactor": Reference("transformers Adafactor", "transformers", _hf_adafactor),
    "torch-adafactor": Reference("torch Adafactor", "torch", lambda m: torch.optim.Adafactor(m.parameters(), lr=LR)),
    "galore-torch": Reference("galore-torch GaLoreAdamW", "galore_torch",
                              _galore_like("galore_torch", "GaLoreAdamW", "scale")),
    "fira": Reference("fira FiraAdamW", "fira", _galore_like("fira", "FiraAdamW", "alpha")),
    "torchao-adamw4bit": Reference("torchao AdamW4bit", "torchao", _torchao_adamw4bit),
    "bnb-adamw8bit": Reference("bitsandbytes AdamW8bit (information only)", "bitsandbytes", _bnb_adamw8bit),
    "apollo-torch": Reference("apollo-torch APOLLOAdamW", "apollo_torch", _apollo),
}
#: memtrain method -> the reference it is compared with.
PAIRS = {"adamw": "torch-adamw", "adafactor": "hf-adafactor", "galore": "galore-torch", "fira": "fira",
         "adam4bit": "torchao-adamw4bit", "apollo": "apollo-torch"}


def _state_tensors(obj, depth: int = 0):
    """The tensors an optimizer's state holds, also inside tensor subclasses (torchao's quantised state flattens
    to its codes and scales) and in the attributes of helper objects (galore-torch keeps a projector object whose
    basis is an attribute): ``metrics.optimizer_state_bytes`` sees only plain tensors in containers."""
    if torch.is_tensor(obj):
        if hasattr(type(obj), "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                yield from _state_tensors(getattr(obj, name), depth)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v, depth)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v, depth)
    elif hasattr(obj, "__dict__") and depth < 2:
        yield from _state_tensors(vars(obj), depth + 1)


# -- measurement ------------------------------------------------------------------------------------------------
@dataclass
class Item:
    key: str  # the entry text, or the reference's key
    kind: str  # "memtrain" or "reference"
    label: str
    reference: str | None = None  # memtrain rows: the paired reference's key
    status: str = "ok"  # ok, failed: ..., not installed: ...
    wall_ms: list = field(default_factory=list)
    cpu_ms: list = field(default_factory=list)
    state_bytes: int | None = None
    optimizer: Any = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _parse(texts: list[str]) -> list[tuple[Entry, dict]]:
    """Every entry checked (name, options and their values) before anything is built."""
    parsed = []
    for text in texts:
        entry = Entry.parse(text)
        options = registry.parse_optim_args(entry.optim, entry.optim_args)
        if options.get("layerwise"):
            raise ValueError(f"{text}: layerwise=true applies the update during backward, so step() would time "
                             f"nothing; measure it with `memtrain bench layerwise`")
        registry.check_option_values(entry.optim, options, lr=entry.lr or LR)
        parsed.append((entry, options))
    return parsed


def _prepare(item: Item, base, grads, build: Callable, warmup: int, sync: Callable) -> None:
    """A private copy of the model with the fixed gradients, its optimizer, and the warm-up steps."""
    try:
        model = copy.deepcopy(base)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        item.optimizer = build(model)
        for _ in range(warmup):
            item.optimizer.step()
        sync()
    except Exception as e:  # one entry's failure is its row, never the end of the benchmark
        item.status, item.optimizer = f"failed: {_first_line(e)}", None


def measure(items: list[Item], rounds: int, seed: int, sync: Callable) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        order = [i for i in items if i.optimizer is not None]
        rng.shuffle(order)  # no optimizer always runs first, or right after the same neighbour
        for item in order:
            try:
                sync()
                wall, cpu = time.perf_counter(), time.process_time()
                item.optimizer.step()
                sync()
                item.wall_ms.append((time.perf_counter() - wall) * 1e3)
                item.cpu_ms.append((time.process_time() - cpu) * 1e3)
            except Exception as e:
                item.status, item.optimizer = f"failed: {_first_line(e)}", None


# -- report ------------------------------------------------------------------------------------------------------
def rows(items: list[Item], params: int) -> list[dict]:
    ok = {i.key: i for i in items if i.status == "ok" and i.kind == "reference"}  # entry texts may equal keys
    base = ok.get(BASELINE)
    out = []
    for i in items:
        row = {"key": i.key, "kind": i.kind, "label": i.label, "reference": i.reference, "status": i.status,
               "wall_ms": i.wall_ms, "cpu_ms": i.cpu_ms, "state_bytes": i.state_bytes,
               "state_bytes_per_param": i.state_bytes / params if i.state_bytes is not None else None}
        if i.status == "ok":
            row.update(median_ms=statistics.median(i.wall_ms), min_ms=min(i.wall_ms),
                       cpu_median_ms=statistics.median(i.cpu_ms))
            row["x_adamw_foreach"] = row["median_ms"] / statistics.median(base.wall_ms) if base else None
            ref = ok.get(i.reference)
            row["x_reference"] = row["median_ms"] / statistics.median(ref.wall_ms) if ref else None
        out.append(row)
    return out


def markdown(table: list[dict], meta: dict) -> str:
    def num(x, fmt=".2f"):
        return "—" if x is None else format(x, fmt)

    lines = [
        f"# Optimizer step time: {meta['model']} on {meta['device']}",
        f"`{meta['command']}`",
        "",
        f"- one `optimizer.step()` on `{meta['model']}` ({meta['parameters']:,} parameters, fp32) from fixed seeded "
        f"random gradients, no forward or backward; device {meta['device']}, torch {meta['torch']}, "
        f"{meta['threads']} thread(s), {meta['device_name'] or meta['machine']}",
        f"- {meta['warmup']} warm-up step(s), then {meta['rounds']} interleaved round(s): every optimizer steps once "
        "per round, in a shuffled order, on its own copy of the model; median and min of the wall-clock times, "
        "CPU ms the median process CPU time of a step (all threads)",
        "- × AdamW(foreach): median over torch `AdamW(foreach=True)`'s median; × its reference: over the paired "
        "reference's; state B/param: the optimizer state's bytes (distinct storages) per model parameter",
        "",
        "| method | reference | median ms | min ms | CPU ms | × AdamW(foreach) | × its reference | state B/param |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        ref = REFERENCES[r["reference"]].label if r["reference"] else \
            ("(reference)" if r["kind"] == "reference" else "—")
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {ref} | {r['status']} | — | — | — | — | — |")
            continue
        lines.append(f"| {r['label']} | {ref} | {num(r['median_ms'])} | {num(r['min_ms'])} | "
                     f"{num(r['cpu_median_ms'])} | {num(r['x_adamw_foreach'])} | {num(r['x_reference'])} | "
                     f"{num(r['state_bytes_per_param'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="memtrain bench step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-bench", help="a named config (memtrain/configs/models) or a path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optims", nargs="+", default=None, metavar="ENTRY",
                        help="name[:k=v,k=v][@lr] (default: every registered optimizer, galore/fira/apollo at "
                             f"rank={RANK})")
    parser.add_argument("--references", nargs="*", default=list(REFERENCES), metavar="KEY",
                        help=f"reference implementations, or none (default: all of {', '.join(REFERENCES)})")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (they create the lazy state)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--seed", type=int, default=0, help="model weights, gradients and the round order")
    parser.add_argument("--out", default="docs/benchmarks/step.md", help="the markdown page; the JSON goes next to it")
    args = parser.parse_args(argv)
    entries = _parse(args.optims or default_entries(torch.device(args.device).type))
    if args.references == ["none"]:
        args.references = []
    unknown = [k for k in args.references if k not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown reference(s) {', '.join(unknown)}; references are: {', '.join(REFERENCES)}")
    if args.rounds < 1 or args.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"memtrain bench step: {args.model} on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    base = build_model(args.model, seed=args.seed).to(device)
    params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(args.seed)
    grads = [torch.randn(p.shape, generator=generator).to(device) for p in base.parameters()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    items: list[Item] = []
    pending = list(dict.fromkeys(args.references))
    for entry, options in entries:
        paired = PAIRS.get(entry.optim) if PAIRS.get(entry.optim) in args.references else None
        items.append(Item(entry.label, "memtrain", entry.label, paired))
        _prepare(items[-1], base, grads, lambda m, e=entry, o=options: registry.build_optimizer(
            m, e.optim, lr=e.lr or LR, **o), args.warmup, sync)
        if paired in pending:  # each reference's row right under its method's
            pending.remove(paired)
            items.append(Item(paired, "reference", REFERENCES[paired].label))
    items += [Item(k, "reference", REFERENCES[k].label) for k in pending]
    for item in items:
        if item.kind != "reference":
            continue
        ref = REFERENCES[item.key]
        try:
            importlib.import_module(ref.package)
        except ImportError as e:
            item.status = f"not installed ({_first_line(e)})"
            continue
        _prepare(item, base, grads, ref.build, args.warmup, sync)

    measure(items, args.rounds, args.seed, sync)
    for item in items:
        if item.optimizer is not None:
            item.state_bytes = (optimizer_state_bytes(item.optimizer) if item.kind == "memtrain"
                                else storage_bytes(_state_tensors(item.optimizer.state)))
            item.optimizer = None  # release the copies before writing

    command = command_line("memtrain bench step", argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "model": args.model, "parameters": params, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rounds": args.rounds, "warmup": args.warmup, "seed": args.seed, "lr": LR}
    table = rows(items, params)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = markdown(table, meta)
    out.write_text(page)
    report = {**meta, "rows": table}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(page)
    return report
