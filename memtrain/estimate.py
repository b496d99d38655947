"""``memtrain estimate``: the memory of a training step of any model with any optimizer, by running it on fake tensors.

The model is built from its config and the optimizer by the registry, exactly as training builds them, but under
``FakeTensorMode`` (torch/_subclasses/fake_tensor.py): every tensor has its real shape, dtype and device and no data.
Two training steps run (forward, backward, ``optimizer.step()``; the optimizer state exists from the first) under
:class:`memtrain.hf.metrics.MemoryTracker`, torch's ``MemTracker`` dispatch mode, which attributes every storage to
parameters, gradients, optimizer state, activations or temporaries. The result is the peak of those two steps by
category and the phase it happens in. Nothing here knows what an optimizer keeps: the numbers come from the code
that trains. FSDP2 runs ``fully_shard`` on a fake process group (``backend="fake"``) once per simulated rank,
under torch's ``FSDPMemTracker``. docs/estimate.md describes what is simulated and the limits.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM

from .hf import metrics
from .optim import registry
from .recipes.models import DEFAULT_MODEL, get_model_config, model_names

#: --dtype: (weight dtype, autocast dtype or None). "mixed" is HF's --bf16: fp32 master weights, bf16 autocast.
DTYPES = {"bf16": (torch.bfloat16, None), "fp32": (torch.float32, None), "mixed": (torch.float32, torch.bfloat16)}
ENGINES = ("single", "ddp", "fsdp2")
GiB, GB = 2**30, 10**9
UNITS = {"GiB": GiB, "GB": GB, "MiB": 2**20}
#: Columns of the tables: (header, key). ``params+state`` is the "weights + optimizer state" of papers' tables.
COLUMNS = (("params", "params"), ("grads", "grads"), ("state", "state"), ("activations", "activations"),
           ("temps", "temporaries"), ("other", "other_all"), ("peak", "total"))


@dataclass(frozen=True)
class Setup:
    """One training configuration to simulate (the flags of ``memtrain estimate``)."""

    model: str = DEFAULT_MODEL
    optim: str = "adamw"
    optim_args: str = ""
    layerwise: bool = False
    gradient_checkpointing: bool = False
    batch_size: int = 1
    seq_len: int = 256
    dtype: str = "bf16"
    engine: str = "single"
    world_size: int = 1
    ranks: tuple[int, ...] | None = None  # FSDP2: the ranks to simulate (default: all up to 8, else first and last)
    steps: int = 2

    def check(self) -> None:
        """Every problem with the settings, raised before any work is done."""
        get_model_config(self.model)  # names the accepted models when unknown
        registry.get_spec(self.optim)  # names the registered optimizers when unknown
        self.options()  # names the accepted options when one is wrong
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        for name in ("batch_size", "seq_len", "world_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.steps < 2:
            raise ValueError("--steps must be >= 2: the optimizer state exists only after the first step")
        if self.engine == "single" and self.world_size != 1:
            raise ValueError("--world_size > 1 needs --engine ddp or fsdp2")
        if self.engine == "fsdp2" and not registry.get_spec(self.optim).fsdp2:
            raise ValueError(f"{self.optim} does not run under FSDP2 (its registry capabilities lack fsdp2); "
                             "use --engine ddp or single")
        bad = [r for r in self.rank_list() if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"--ranks {bad} outside 0..{self.world_size - 1}")

    def options(self) -> dict[str, Any]:
        options = registry.parse_optim_args(self.optim, self.optim_args)
        if self.layerwise:
            options["layerwise"] = True
        return options

    def rank_list(self) -> tuple[int, ...]:
        if self.engine != "fsdp2":
            return (0,)  # one process, or DDP replicas that are all alike
        if self.ranks is not None:
            return tuple(self.ranks)
        return tuple(range(self.world_size)) if self.world_size <= 8 else (0, self.world_size - 1)

    def label(self) -> str:
        parts = [self.optim + (f" {self.optim_args}" if self.optim_args else ""), self.model, self.dtype,
                 f"batch {self.batch_size}x{self.seq_len}"]
        parts += ["layer-wise"] * self.layerwise + ["grad ckpt"] * self.gradient_checkpointing
        if self.engine != "single":
            parts.append(f"{self.engine} x{self.world_size}")
        return ", ".join(parts)


# -- one simulated (or real) run ---------------------------------------------------------------------------------
def build(setup: Setup, mesh=None):
    """The model (train mode, engine applied), its optimizer and one batch, on whatever tensor mode is active.
    ``mesh``: the FSDP2 device mesh (made outside fake mode)."""
    weight_dtype, _ = DTYPES[setup.dtype]
    config = get_model_config(setup.model)
    model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype)
    model.train()
    if setup.gradient_checkpointing:  # what HF's Trainer does for --gradient_checkpointing (non-reentrant)
        model.activation_checkpointing_enable()
    if setup.engine == "fsdp2":  # accelerate's FSDP2 config: each decoder layer a unit, then the root
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = registry.build_optimizer(model, setup.optim, lr=1e-3, **setup.options())
    ids = torch.randint(0, config.vocab_size, (setup.batch_size, setup.seq_len))
    return model, optimizer, {"input_ids": ids, "labels": ids}


def ddp_buckets(model) -> list[torch.Tensor]:
    """What DDP adds to a replica: the reducer's flat gradient buckets, one element per trainable parameter element
    (torch's ``Reducer`` with accelerate's default ``gradient_as_bucket_view=False``), allocated for the life of
    the wrapper. DDP itself cannot be built on fake tensors (its C++ reducer reads parameter data), so the replica
    is simulated unwrapped plus these buffers; layer-wise release all-reduces each gradient in its hook on the fake
    process group, as memtrain's Trainer does under ``no_sync``."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return [torch.empty(n, dtype=dtype) for dtype, n in sizes.items()]


def _train(setup: Setup, model, optimizer, batch, tracker) -> None:
    _, autocast = DTYPES[setup.dtype]
    for _ in range(setup.steps):
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.mark_state()
        tracker.reset_mod_stats()


def measure(setup: Setup, *, fake: bool = True, mesh=None) -> dict[str, Any]:
    """Run ``setup``'s training steps in this process under the tracker: the peak by category (``total``,
    ``phase``) and the exact optimizer-state bytes after the last step (``optimizer_state_bytes``).

    ``fake=False`` runs the same code on real tensors, which is what the estimate is checked against (tests). Under
    FSDP2 a process group must be running and ``mesh`` be its 1-D device mesh.
    """
    start = time.perf_counter()
    with FakeTensorMode() if fake else contextlib.nullcontext():
        model, optimizer, batch = build(setup, mesh)
        if setup.engine == "fsdp2":
            tracker = metrics.FSDPMemoryTracker(model, optimizer)
        else:
            tracker = metrics.MemoryTracker(model, optimizer)
        buckets = ddp_buckets(model) if setup.engine == "ddp" else []  # alive for the whole run, as DDP's are
        tracker.track_external(*buckets)
        with tracker:
            _train(setup, model, optimizer, batch, tracker)
        peak = tracker.peak()
        state = metrics.optimizer_state_bytes(optimizer)
        counts = metrics.model_memory(model)
    return {**peak, "optimizer_state_bytes": state, "parameters": counts["parameters"],
            "seconds": round(time.perf_counter() - start, 2)}


def run_rank(setup: Setup, rank: int = 0) -> dict[str, Any]:
    """The simulation of one rank: one process, or rank ``rank`` of a fake process group (DDP, FSDP2)."""
    if setup.engine == "single":
        return {"rank": 0, **measure(setup)}
    if dist.is_initialized():
        raise RuntimeError("memtrain estimate simulates ranks on a fake process group and cannot run inside an "
                           "initialised torch.distributed job; run it as a plain process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=setup.world_size)
    try:
        mesh = None
        if setup.engine == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (setup.world_size,))  # outside fake mode: it reads the rank map's values
        return {"rank": rank, **measure(setup, mesh=mesh)}
    finally:
        dist.destroy_process_group()


def _explain(error: Exception) -> str:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    name = type(error).__name__
    if name in ("DataDependentOutputException", "DynamicOutputShapeException") or "data-dependent" in text.lower():
        return (f"cannot step on fake tensors: its step() reads tensor values on the host (.item(), .tolist(), "
                f"bool(tensor)), so its memory cannot be simulated until that sync is removed [{text}]")
    if "Mixing fake modes" in text or "convert all Tensors to FakeTensors" in text:
        return (f"cannot step on fake tensors: it caches a tensor across optimizer instances (made under an earlier "
                f"fake mode) [{text}]")
    return text


def estimate(setup: Setup) -> dict[str, Any]:
    """The estimate of ``setup``: settings, per-rank results, the worst rank's peak; or the error that stopped it."""
    setup.check()
    result: dict[str, Any] = {"setup": asdict(setup), "label": setup.label()}
    start = time.perf_counter()
    try:
        result["ranks"] = [run_rank(setup, rank=r) for r in setup.rank_list()]
    except Exception as error:  # one optimizer's failure must not hide the others in --all
        result["error"] = _explain(error)
        return result
    result["peak"] = max(result["ranks"], key=lambda r: r["total"])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def estimate_all(setup: Setup, optimizers=None) -> list[dict[str, Any]]:
    """``setup`` with every registered optimizer (or the named ones); each keeps its own registry defaults."""
    return [estimate(replace(setup, optim=name, optim_args="" if name != setup.optim else setup.optim_args))
            for name in (optimizers or registry.optimizer_names())]


# -- tables ------------------------------------------------------------------------------------------------------
def _cells(peak: dict, divisor: int) -> dict[str, str]:
    row = dict(peak, other_all=peak["buffers"] + peak["unsharded"] + peak["other"])
    return {key: f"{row[key] / divisor:,.2f}" for _, key in COLUMNS}


def table_rows(results: list[dict], *, units: str = "GiB") -> tuple[list[str], list[list[str]]]:
    divisor = UNITS[units]
    header = ["optimizer", "layer-wise", "rank", *(f"{h} ({units})" for h, _ in COLUMNS), "peak phase"]
    rows = []
    for r in results:
        s = r["setup"]
        name = s["optim"] + (f" `{s['optim_args']}`" if s["optim_args"] else "")
        if "error" in r:
            rows.append([name, "yes" if s["layerwise"] else "no", "-", *["-"] * len(COLUMNS), r["error"]])
            continue
        for rank in r["ranks"]:
            cells = _cells(rank, divisor)
            rows.append([name, "yes" if s["layerwise"] else "no", str(rank["rank"]),
                         *(cells[k] for _, k in COLUMNS), rank["phase"]])
    return header, rows


def format_table(results: list[dict], *, units: str = "GiB") -> str:
    header, rows = table_rows(results, units=units)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, len(header) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[dict], *, units: str = "GiB") -> str:
    header, rows = table_rows(results, units=units)
    align = ["---" if i in (0, 1, len(header) - 1) else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, align, *rows])


def describe(setup: Setup) -> str:
    engine = "one process" if setup.engine == "single" else f"{setup.engine}, world size {setup.world_size}"
    return (f"{setup.model}, {setup.dtype}, micro-batch {setup.batch_size} x {setup.seq_len} tokens"
            f"{', gradient checkpointing' if setup.gradient_checkpointing else ''}, {engine}; "
            f"peak of {setup.steps} simulated training steps")


# -- the benchmark page (docs/benchmarks/estimates.md) -----------------------------------------------------------
SIZES = ("llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b")
#: Published weights + optimizer-state columns (GB = 10^9 bytes, bf16, LLaMA 60M/130M/350M/1B/7B), as quoted in
#: issue 12, and the memtrain optimizer each corresponds to.
PUBLISHED = {"adamw": ("Adam", (0.35, 0.80, 2.21, 8.03, 40.43)),
             "swan": ("SWAN-style", (0.25, 0.46, 1.00, 3.20, 14.53)),
             "scale": ("SCALE", (0.15, 0.32, 0.80, 2.81, 13.74))}
BUDGETS_GIB = (16, 24, 80)
#: The 7B pretraining step of the "what fits" question.
STEP_7B = dict(model="llama-7b", dtype="bf16", seq_len=2048, batch_size=1, gradient_checkpointing=True)
LOW_MEMORY_FALLBACKS = ("adam4bit", "adafactor")
REPORT_COMMAND = "memtrain estimate --report docs/benchmarks/estimates.md"


def recipe_candidates() -> list[tuple[str, str]]:
    """Every registered optimizer with its defaults, plus, for methods that take a ``fallback`` option (the optimizer
    of the roles they do not own), each low-memory fallback it accepts."""
    import typing

    from .optim.routing import ROLES

    out = [(name, "") for name in registry.optimizer_names()]
    for name in registry.optimizer_names():
        spec = registry.get_spec(name)
        types = {**spec.option_types(), **registry.UNIVERSAL_OPTIONS}  # fallback= is universal (optim/registry.py)
        if "fallback" in types and spec.owns and not set(ROLES) <= spec.owns:  # a method that leaves roles over
            choices = [c for c in typing.get_args(types["fallback"]) if isinstance(c, str)] or LOW_MEMORY_FALLBACKS
            out += [(name, f"fallback={c}") for c in choices if c in LOW_MEMORY_FALLBACKS]
    return out


def sweep_setups() -> list[Setup]:
    """The page's size sweep: every optimizer x size, with and without layer-wise release (micro-batch 1 x 256)."""
    return [Setup(model=size, optim=name, layerwise=layerwise)
            for size in SIZES for layerwise in (False, True) for name in registry.optimizer_names()]


def step7_setups() -> list[Setup]:
    """The page's 7B step: every optimizer (and low-memory fallback), with and without layer-wise release."""
    return [Setup(optim=name, optim_args=args, layerwise=layerwise, **STEP_7B)
            for name, args in recipe_candidates() for layerwise in (False, True)]


def collect(setups: list[Setup], progress=None) -> list[dict]:
    """``estimate`` of each setup; an optimizer that cannot step on fake tensors fails alike at every size, so
    it runs once."""
    unsimulable, out = {}, []
    for setup in setups:
        if (setup.optim, setup.optim_args) in unsimulable:
            r = {**unsimulable[setup.optim, setup.optim_args], "setup": asdict(setup), "label": setup.label()}
        else:
            r = estimate(setup)
            if "cannot step on fake tensors" in r.get("error", ""):
                unsimulable[setup.optim, setup.optim_args] = r
        out.append(r)
        if progress is not None:
            progress(r)
    return out


def _progress(r: dict) -> None:
    what = r["error"] if "error" in r else f"{r['peak']['total'] / GiB:.2f} GiB"
    print(f"estimate: {r['label']}: {what} ({r.get('seconds', 0)} s)", file=sys.stderr, flush=True)


def timed_all_7b() -> tuple[list[dict], dict]:
    """``memtrain estimate --all --model llama-7b --seq_len 2048 --gradient_checkpointing``, timed."""
    import os

    wall, cpu = time.perf_counter(), time.process_time()
    results = estimate_all(Setup(**STEP_7B))
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
              "load_average": os.getloadavg()[0]}
    return results, timing


def report_page() -> str:
    """The page docs/benchmarks/estimates.md: every optimizer x size, with and without layer-wise release, against
    the published weights + state columns; and the 7B step that fits 16 / 24 / 80 GiB."""
    sweep = collect(sweep_setups(), _progress)
    all7b, timing = timed_all_7b()
    done = {(r["setup"]["optim"], r["setup"]["optim_args"], r["setup"]["layerwise"]) for r in all7b}
    rest = [s for s in step7_setups() if (s.optim, s.optim_args, s.layerwise) not in done]
    return render_page(sweep, all7b + collect(rest, _progress), timing)


MISSING = {"error": "not run"}  # a setup whose result render_page was not given


def render_page(sweep_results: list[dict], step7_results: list[dict], timing: dict) -> str:
    """The markdown of the page from the results of ``sweep_setups``, ``step7_setups`` and ``timed_all_7b``."""
    import os
    import platform

    def gb(x):
        return f"{x / GB:.2f}"

    def gib(x):
        return f"{x / GiB:.2f}"

    names = registry.optimizer_names()
    sweep = {(r["setup"]["optim"], r["setup"]["layerwise"], r["setup"]["model"]): r for r in sweep_results}
    step7 = {(r["setup"]["optim"], r["setup"]["optim_args"], r["setup"]["layerwise"]): r for r in step7_results}
    cpu7, wall7, load = timing["cpu_s"], timing["wall_s"], timing["load_average"]

    lines = [
        "# Memory estimates: every optimizer, LLaMA 60M to 7B",
        "",
        f"Generated by `{REPORT_COMMAND}` (memtrain/estimate.py; how it works: [../estimate.md](../estimate.md)). "
        "Every number comes from running the real model's forward and backward and the real optimizer's `step()` "
        "(layer-wise hooks included) on fake tensors under PyTorch's `MemTracker`: two training steps, the peak of "
        "both. Nothing is a per-optimizer formula.",
        "",
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs. The timed 7B `--all` run "
        f"(`memtrain estimate --all --model llama-7b --seq_len 2048 --gradient_checkpointing`): **{cpu7:.0f} s of "
        f"CPU time, {wall7:.0f} s wall** (load average {load:.1f} when it ended, on a machine shared "
        "with other jobs).",
        "",
        "## Weights + optimizer state (bf16 weights), against the published columns",
        "",
        "GB = 10^9 bytes, as the published columns. `params + state` is what memtrain holds; memtrain keeps every "
        "optimizer's floating-point state in fp32 (`memtrain/optim/base.py`), the published columns count 2-byte "
        "(bf16) state, so `state at bf16 width` (= params + state / 2) is the like-for-like number.",
        "",
        "| optimizer | accounting | " + " | ".join(s.removeprefix("llama-") for s in SIZES) + " |",
        "|---|---|" + "---:|" * len(SIZES),
    ]
    for name in names:
        cells, halves = [], []
        for size in SIZES:
            r = sweep.get((name, False, size), MISSING)
            if "error" in r:
                cells.append(r["error"] if r is MISSING else "error")
                halves.append(cells[-1])
                continue
            p = r["peak"]
            cells.append(gb(p["params"] + p["optimizer_state_bytes"]))
            halves.append(gb(p["params"] + p["optimizer_state_bytes"] / 2))
        lines.append(f"| {name} | params + state | " + " | ".join(cells) + " |")
        if name in PUBLISHED:
            label, published = PUBLISHED[name]
            lines.append(f"| {name} | state at bf16 width | " + " | ".join(halves) + " |")
            lines.append(f"| {label} | published | " + " | ".join(f"{v:.2f}" for v in published) + " |")
    diffs = [abs(p["params"] + p["optimizer_state_bytes"] / 2 - published[i] * GB) / GB
             for name, (_, published) in PUBLISHED.items() for i, size in enumerate(SIZES)
             if "peak" in (r := sweep.get((name, False, size), MISSING)) for p in (r["peak"],)]
    lines += [
        "",
        "Why the numbers differ: (1) **state width**: memtrain's Adam moments, SWAN's fallback moments and SCALE's "
        "head momentum are fp32 by design (the update math runs in fp32 on bf16 weights), twice the bytes of the "
        "bf16 state the published columns count; counted at bf16 width, memtrain reproduces every published cell "
        + (f"to within {max(diffs):.3f} GB (the columns are rounded to 0.01 GB)" if diffs else "(not run here)")
        + ". (2) **GB vs GiB**: the columns are 10^9 bytes; a GiB is 7.4 % more. (3) **the model**: the configs "
        "are the GaLore protocol's (vocabulary 32000, untied embedding and head, `memtrain/configs/models/`); the "
        "embedding and head are the rows that SWAN (AdamW on embedding, head and norm gains) and SCALE (momentum on "
        "the head, AdamW on norm gains) keep state for, so their state grows with the vocabulary, not with depth.",
    ]
    lines += [
        "",
        "## Peak of a training step (bf16, micro-batch 1 x 256 tokens, no checkpointing), GiB",
        "",
        "`lw` = layer-wise gradient release (`layerwise=true`). Peak = parameters + gradients + state + activations "
        "+ temporaries at the worst moment of the step; the phase says where that moment is.",
        "",
        "| optimizer | lw | " + " | ".join(s.removeprefix("llama-") for s in SIZES) + " | phase at 7b |",
        "|---|---|" + "---:|" * len(SIZES) + "---|",
    ]
    for name in names:
        for layerwise in (False, True):
            rs = [sweep.get((name, layerwise, size), MISSING) for size in SIZES]
            cells = [(r["error"] if r is MISSING else "error") if "error" in r else gib(r["peak"]["total"]) for r in rs]
            phase = rs[-1].get("peak", {}).get("phase", "-")
            lines.append(f"| {name} | {'yes' if layerwise else 'no'} | " + " | ".join(cells) + f" | {phase} |")
    if len(sweep) < len(names) * len(SIZES) * 2:
        lines += ["", f"`not run`: this copy of the page holds only part of the sweep; `{REPORT_COMMAND}` runs all."]
    lines += [
        "",
        "## LLaMA-7B pretraining step: what fits in 16 / 24 / 80 GiB",
        "",
        "bf16 weights, sequence 2048, micro-batch 1, gradient checkpointing, one GPU. GiB (2^30 bytes), the unit "
        "of a card's memory (a \"16 GB\" card holds 16 GiB). Tensor memory only: the CUDA context (about "
        "0.3-0.5 GiB) and allocator fragmentation come on top, so leave about 1 GiB of margin.",
        "",
        "| optimizer | optim_args | lw | params | grads | state | activations | temps | peak | phase | "
        + " | ".join(f"≤ {b}" for b in BUDGETS_GIB) + " |",
        "|---|---|---|" + "---:|" * 6 + "---|" + "---|" * len(BUDGETS_GIB),
    ]
    fits = {b: [] for b in BUDGETS_GIB}
    errors = {}
    for (name, args, layerwise), r in sorted(step7.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        label = f"{name}{' ' + args if args else ''}{' + layer-wise' if layerwise else ''}"
        if "error" in r:
            errors[name] = r["error"]
            lines.append(f"| {name} | {args} | {'yes' if layerwise else 'no'} | " + " | ".join(["-"] * 6)
                         + " | error | " + " | ".join(["-"] * len(BUDGETS_GIB)) + " |")
            continue
        p = r["peak"]
        marks = []
        for b in BUDGETS_GIB:
            ok = p["total"] <= b * GiB
            marks.append("yes" if ok else "no")
            if ok:
                fits[b].append(f"{label} ({gib(p['total'])})")
        lines.append(f"| {name} | {args} | {'yes' if layerwise else 'no'} | {gib(p['params'])} | {gib(p['grads'])} | "
                     f"{gib(p['optimizer_state_bytes'])} | {gib(p['activations'])} | {gib(p['temporaries'])} | "
                     f"**{gib(p['total'])}** | {p['phase']} | " + " | ".join(marks) + " |")
    lines += [
        "",
        "Reading it: without layer-wise release every optimizer peaks in `step()` holding all bf16 gradients (as "
        "many bytes as the weights); activations are gone by then. With it, the peak moves to the layer-wise update "
        "of the embedding or head (the largest tensors: 32000 x 4096), inside backward, with one gradient alive. "
        "What remains above the weights is state and the step's scratch. State above a method's theory (SWAN, "
        "SinkGD and SCALE keep no state on the hidden matrices) is the **fallback** of the roles they do not own: "
        "AdamW with fp32 moments, 8 bytes per element, on the embedding, head and norm gains (SCALE: momentum on the "
        "head only). The scratch (`temps`) is the fp32 working copies of the tensor being updated (parameter, "
        "gradient and the update's intermediates) for the largest tensor, about 0.5 GiB each at 7B; a "
        "low-memory fallback (`fallback=adam4bit` or `adafactor`, where a method offers it) shrinks the state, "
        "not that scratch.",
    ]
    lines += ["", "Fits (peak GiB):", ""]
    for b in BUDGETS_GIB:
        lines.append(f"- **≤ {b} GiB**: " + (", ".join(fits[b]) if fits[b] else "nothing"))
    if not any(args for _, args in recipe_candidates()):
        lines += ["", "No optimizer in this build takes a `fallback=` option (the optimizer of the roles a method "
                  "does not own: embedding, head, norm gains), so the 16 GiB candidates that need "
                  "`fallback=adam4bit` or `fallback=adafactor` are not in the table yet; once the option exists, "
                  f"`{REPORT_COMMAND}` adds them."]
    if errors:
        lines += ["", "Optimizers the estimator cannot simulate in this build (the estimate reports the reason):", ""]
        lines += [f"- `{name}`: {error}" for name, error in sorted(errors.items())]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memtrain estimate",
        description="Peak memory of a training step by category (parameters, gradients, optimizer state, "
                    "activations, temporaries), simulated on fake tensors with the real model and optimizer code.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"named config ({', '.join(model_names())}), a config .json, or a saved model directory")
    p.add_argument("--optim", default="adamw", help="a registered optimizer (memtrain list)")
    p.add_argument("--optim_args", default="", help="optimizer options k=v,k=v (memtrain list NAME)")
    p.add_argument("--all", action="store_true", help="every registered optimizer side by side")
    p.add_argument("--layerwise", action="store_true", help="layer-wise gradient release")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--batch_size", type=int, default=1, help="micro-batch size per rank")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="bf16: pure bf16 weights; fp32; mixed: fp32 weights with bf16 autocast (HF --bf16)")
    p.add_argument("--engine", default="single", choices=ENGINES)
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--ranks", default=None, help="FSDP2: ranks to simulate, e.g. 0,7 (default: all up to 8)")
    p.add_argument("--steps", type=int, default=2, help="training steps to simulate (>= 2)")
    p.add_argument("--units", default="GiB", choices=tuple(UNITS))
    p.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    p.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    p.add_argument("--report", metavar="FILE", help="write the benchmark page (every optimizer x LLaMA 60M..7B, "
                                                    "and the 7B step that fits 16/24/80 GiB) and exit")
    return p


def setup_from_args(args) -> Setup:
    try:
        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None
    except ValueError:
        raise ValueError(f"--ranks {args.ranks!r}: give rank numbers separated by commas, e.g. 0,7") from None
    return Setup(model=args.model, optim=args.optim, optim_args=args.optim_args, layerwise=args.layerwise,
                 gradient_checkpointing=args.gradient_checkpointing, batch_size=args.batch_size,
                 seq_len=args.seq_len, dtype=args.dtype, engine=args.engine, world_size=args.world_size,
                 ranks=ranks, steps=args.steps)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.report:
        page = report_page()
        with open(args.report, "w") as f:
            f.write(page)
        print(page)
        return 0
    try:
        setup = setup_from_args(args)
        setup.check()
    except (ValueError, TypeError, OSError) as error:  # OSError: not a named model, a path nor a loadable Hub id
        print(f"memtrain estimate: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = estimate_all(setup) if args.all else [estimate(setup)]
    seconds = time.perf_counter() - start
    print(f"memtrain estimate: {describe(setup)} ({seconds:.0f} s)\n{format_table(results, units=args.units)}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{describe(setup)}.\n\n{markdown_table(results, units=args.units)}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if any("error" in r for r in results) and not args.all else 0
