"""The optimizer benchmark behind ``memtrain bench``: a tuned, best-vs-best comparison (docs/benchmarks/README.md).

    memtrain bench --preset configs/bench/pretrain-cpu.yaml          # the tuned comparison (the default benchmark)
    memtrain bench --optims adamw@3e-3 "galore:rank=32@0.01" --seeds 0 1 2   # fixed points, no tuning

Every run is one ``memtrain pretrain`` process (:mod:`.runner`, so peak memory is per run, and finished runs are
skipped when the command is repeated) with the same model, data, schedule and token budget. A preset lists per
optimizer a grid (``lr`` and any option, e.g. ``adam_lr`` or GaLore's ``scale``), options tied to the tuned
baseline's values, and seeds. The benchmark runs every grid point with the first seed, keeps each optimizer's best
point (lowest eval perplexity), re-runs it with every seed, and reports best against best: eval perplexity mean ±
std, its ratio to the tuned baseline (paired by seed), optimizer-state bytes, memory, and tokens/s against the
baseline measured in the same invocation. The baseline is the entry whose *optimizer* is ``baseline``
(``adamw``), whatever its label. ``--optims`` entries (``name[:optim_args][@lr]``) are a preset whose grids have
one point each.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import runner

BASELINE = "adamw"
#: Keys of a preset file; everything but ``optimizers`` can also be given (and overridden) on the command line.
PRESET_KEYS = ("name", "description", "model", "max_steps", "eval_steps", "seeds", "baseline", "flags",
               "optimizers", "out_dir", "work_dir", "jobs", "engine")
#: Keys of one optimizer entry in a preset.
ENTRY_KEYS = ("optimizer", "args", "grid", "tie", "same_as")
DEFAULTS = {"name": "benchmark", "model": "llama-tiny", "max_steps": 300, "eval_steps": None, "seeds": [0],
            "baseline": BASELINE, "flags": {}, "out_dir": "docs/benchmarks", "work_dir": "out/bench", "jobs": 1,
            "engine": None, "description": ""}


@dataclass(frozen=True)
class Entry:
    """One ``--optims`` entry: ``name[:k=v,k=v][@lr]``."""

    label: str
    optim: str
    optim_args: str
    lr: float | None

    @classmethod
    def parse(cls, text: str) -> "Entry":
        body, _, lr = text.partition("@")
        optim, _, args = body.partition(":")
        if not optim:
            raise ValueError(f"benchmark entry {text!r} must look like name[:k=v,k=v][@lr]")
        try:
            lr_value = float(lr) if lr else None
        except ValueError:
            raise ValueError(f"benchmark entry {text!r}: the part after @ must be a learning rate") from None
        return cls(text, optim, args, lr_value)

    @property
    def slug(self) -> str:
        return runner.slug(self.label)


@dataclass(frozen=True)
class Candidate:
    """One optimizer configuration of a preset: fixed ``args``, a ``grid`` over ``lr`` and options, options
    ``tie``d to the tuned baseline (option -> baseline key), or the tuned point of another entry (``same_as``)."""

    label: str
    optim: str
    args: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    tie: dict = field(default_factory=dict)
    same_as: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    max_steps: int
    eval_steps: int
    seeds: list
    baseline: str
    flags: dict
    candidates: list
    out_dir: str
    work_dir: str
    jobs: int
    engine: str | None
    description: str = ""
    source: str = ""

    def baseline_candidate(self) -> Candidate | None:
        """The entry whose optimizer is the baseline (by name, not label): the first that is tuned itself."""
        return next((c for c in self.candidates if c.optim == self.baseline and c.same_as is None), None)


# -- preset parsing -----------------------------------------------------------------------------------------
def _number(value):
    """YAML 1.1 reads ``1e-3`` as a string; grids and options mean numbers there."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def optim_args_text(options: dict) -> str:
    """``{"rank": 32, "layerwise": True, "betas": (0.9, 0.95)}`` -> ``"rank=32,layerwise=true,betas=0.9:0.95"``
    (the ``--optim_args`` syntax of ``memtrain.parse_optim_args``)."""
    def text(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            return ":".join(map(str, v))
        return str(v)

    return ",".join(f"{k}={text(v)}" for k, v in options.items())


def _entry(label: str, spec: Any, where: str) -> Candidate:
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: optimizer entry {label!r} must be a mapping with keys {', '.join(ENTRY_KEYS)}")
    unknown = set(spec) - set(ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: optimizer entry {label!r} has unknown keys {sorted(unknown)}; "
                         f"use {', '.join(ENTRY_KEYS)}")
    grid = {}
    for key, values in (spec.get("grid") or {}).items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ValueError(f"{where}: {label}.grid.{key} is empty: give at least one value")
        grid[key] = [_number(v) for v in values]
    tie = dict(spec.get("tie") or {})
    args = {k: _number(v) for k, v in (spec.get("args") or {}).items()}
    for section, keys in (("args", args), ("grid", grid), ("tie", tie)):
        if not isinstance(keys, dict):
            raise ValueError(f"{where}: {label}.{section} must be a mapping")
    clash = (set(args) & set(grid)) | (set(args) & set(tie)) | (set(grid) & set(tie))
    if clash:
        raise ValueError(f"{where}: {label} sets {sorted(clash)} in more than one of args, grid and tie")
    if "lr" in args:
        raise ValueError(f"{where}: {label}.args.lr: put the learning rate in grid (one value is a fixed lr)")
    return Candidate(label, str(spec.get("optimizer") or label), args, grid, tie, spec.get("same_as"))


def validate(preset: Preset) -> Preset:
    """Every error a preset can hold, raised before any run starts."""
    from ..optim.registry import parse_optim_args
    from ..recipes.models import get_model_config

    where = preset.source or "benchmark"
    try:
        get_model_config(preset.model)  # unknown model: the error lists the named ones
    except OSError as e:  # neither a named config, a path nor a Hub id that can be loaded
        raise ValueError(f"{where}: model: {e}") from None
    if not preset.candidates:
        raise ValueError(f"{where}: no optimizers to run")
    if not preset.seeds or len(set(preset.seeds)) != len(preset.seeds) or not all(
            isinstance(s, int) for s in preset.seeds):
        raise ValueError(f"{where}: seeds must be a non-empty list of distinct integers, got {preset.seeds!r}")
    if preset.max_steps < 1 or preset.eval_steps < 1 or preset.jobs < 1:
        raise ValueError(f"{where}: max_steps, eval_steps and jobs must be >= 1")
    labels = [c.label for c in preset.candidates]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: duplicate labels {sorted({x for x in labels if labels.count(x) > 1})}")
    base = preset.baseline_candidate()
    by_label = {c.label: c for c in preset.candidates}
    for c in preset.candidates:
        if c.same_as is not None:
            other = by_label.get(c.same_as)
            if other is None or other.same_as is not None:
                raise ValueError(f"{where}: {c.label}.same_as must name a tuned entry ({', '.join(by_label)}), "
                                 f"got {c.same_as!r}")
            if c.grid or c.tie:
                raise ValueError(f"{where}: {c.label} re-runs {c.same_as}'s tuned point; it takes no grid or tie")
            if other.optim != c.optim:
                raise ValueError(f"{where}: {c.label} ({c.optim}) cannot re-run the point of {c.same_as} "
                                 f"({other.optim}): same_as needs the same optimizer")
        elif "lr" not in c.grid and "lr" not in c.tie:
            raise ValueError(f"{where}: {c.label} needs an lr: add grid: {{lr: [...]}} (one value fixes it)")
        if c.tie:
            if base is None:
                raise ValueError(f"{where}: {c.label} ties {sorted(c.tie)} to the {preset.baseline} baseline, "
                                 f"but no entry has optimizer: {preset.baseline}")
            if c is base:
                raise ValueError(f"{where}: the baseline {c.label} cannot tie options to itself")
            for option, key in c.tie.items():
                if key not in ("lr", "adam_lr") and key not in base.grid and key not in base.args:
                    raise ValueError(f"{where}: {c.label}.tie.{option}: the baseline has no {key!r}; use lr, "
                                     f"adam_lr or one of its grid/args keys")
        sample = {**c.args, **{k: v[0] for k, v in c.grid.items()}, **{k: 1.0 for k in c.tie}}
        sample.pop("lr", None)
        try:
            parse_optim_args(c.optim, optim_args_text(sample))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}: optimizer entry {c.label!r}: {e}") from None
    return preset


def load_preset(path: str | Path, overrides: dict | None = None) -> Preset:
    """Read a YAML preset (keys: ``PRESET_KEYS``); ``overrides`` (command-line values that are not None) win."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"benchmark preset {str(path)!r} not found (presets live in configs/bench/)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset is a mapping of {', '.join(PRESET_KEYS)}")
    unknown = set(data) - set(PRESET_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a preset takes {', '.join(PRESET_KEYS)}")
    optimizers = data.pop("optimizers", None)
    if not isinstance(optimizers, dict) or not optimizers:
        raise ValueError(f"{path}: 'optimizers' must map labels to entries ({', '.join(ENTRY_KEYS)})")
    candidates = [_entry(str(label), spec, str(path)) for label, spec in optimizers.items()]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return build_preset(candidates, {**data, **given}, source=str(path))


def build_preset(candidates: list[Candidate], values: dict, source: str = "") -> Preset:
    v = {**DEFAULTS, **{k: val for k, val in values.items() if val is not None}}
    flags = v["flags"] or {}
    if not isinstance(flags, dict):
        raise ValueError(f"{source or 'benchmark'}: flags must map memtrain pretrain flags to values")
    max_steps = int(v["max_steps"])
    eval_steps = int(v["eval_steps"] or max(1, max_steps // 6))
    seeds = v["seeds"] if isinstance(v["seeds"], list) else [v["seeds"]]
    return validate(Preset(
        name=str(v["name"]), model=str(v["model"]), max_steps=max_steps, eval_steps=eval_steps, seeds=seeds,
        baseline=str(v["baseline"]), flags=dict(flags), candidates=candidates, out_dir=str(v["out_dir"]),
        work_dir=str(v["work_dir"]), jobs=int(v["jobs"]), engine=v["engine"], description=str(v["description"]),
        source=source))


def candidates_from_entries(texts: Sequence[str]) -> list[Candidate]:
    """``--optims`` entries as one-point grids (an entry without ``@lr`` runs at the default lr, 1e-3)."""
    from ..optim.registry import parse_optim_args
    from ..recipes.pretrain import PRETRAIN_DEFAULTS

    out = []
    for text in texts:
        e = Entry.parse(text)
        args = parse_optim_args(e.optim, e.optim_args)
        out.append(Candidate(e.label, e.optim, args, {"lr": [e.lr or PRETRAIN_DEFAULTS["learning_rate"]]}))
    return out


# -- the tuning pipeline --------------------------------------------------------------------------------------
def baseline_value(point: dict, key: str):
    """A tied option's value from the tuned baseline point. ``adam_lr`` is the lr of the non-matrix roles, which
    is ``lr`` when the baseline has no separate one."""
    if key == "adam_lr" and key not in point:
        return point["lr"]
    return point[key]


def grid_points(c: Candidate, baseline_point: dict | None) -> list[dict]:
    """Every point of ``c``'s grid (cartesian product, in preset order) with its tied options filled in."""
    tied = {option: baseline_value(baseline_point, key) for option, key in c.tie.items()} if c.tie else {}
    keys = list(c.grid)
    return [{**dict(zip(keys, values)), **tied} for values in itertools.product(*(c.grid[k] for k in keys))]


def point_text(point: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def ok(report: dict) -> bool:
    ppl = report.get("eval_perplexity")
    return "error" not in report and isinstance(ppl, (int, float)) and math.isfinite(ppl)


def best(trials: list[tuple[dict, dict]]) -> tuple[dict, dict] | None:
    """The (point, report) with the lowest finite eval perplexity; None if every point failed or diverged."""
    good = [t for t in trials if ok(t[1])]
    return min(good, key=lambda t: t[1]["eval_perplexity"]) if good else None


def optim_flags(optim: str, optim_args: str, lr: float | None) -> list[str]:
    """The ``memtrain pretrain`` flags that choose the optimizer."""
    return (["--optim", optim] + (["--optim_args", optim_args] if optim_args else [])
            + (["--learning_rate", str(lr)] if lr is not None else []))


def make_job(preset: Preset, c: Candidate, point: dict, seed: int) -> runner.Job:
    options = {**c.args, **{k: v for k, v in point.items() if k != "lr"}}
    flags = dict(preset.flags)
    if str(options.get("layerwise", "")).lower() in ("true", "1"):
        # Layer-wise release cannot clip the global gradient norm (docs/layerwise.md): the runs' global threshold
        # (HF's default 1.0 unless the preset sets max_grad_norm) becomes the same threshold per parameter.
        clip = float(flags.get("max_grad_norm", 1.0))
        flags["max_grad_norm"] = 0
        if clip > 0:
            options.setdefault("layerwise_clip", clip)
    args = ["--model", preset.model, *optim_flags(c.optim, optim_args_text(options), point["lr"]), "--seed", str(seed),
            "--max_steps", str(preset.max_steps), "--eval_strategy", "steps", "--eval_steps", str(preset.eval_steps),
            "--eval_on_start", "true", "--logging_steps", str(max(1, preset.max_steps // 10)),
            "--save_final_model", "false", "--report_to", "none", "--disable_tqdm", "false",
            *runner.flags(flags)]
    out = Path(preset.work_dir) / preset.name / runner.slug(c.label) / f"{runner.slug(point_text(point))}-seed{seed}"
    env = runner.thread_env(preset.jobs) if preset.engine is None else (("OMP_NUM_THREADS", "1"),)
    return runner.Job(("pretrain",), tuple(args), out, label=f"{c.label} {point_text(point)} seed {seed}",
                      engine=preset.engine, env=env, steps=preset.max_steps)


Execute = Callable[[list[runner.Job]], list[dict]]


def tune(preset: Preset, execute: Execute) -> dict[str, dict]:
    """Grid with the first seed, best point per entry, best point with every seed. Per label: ``candidate``,
    ``grid`` [(point, report)], ``best`` point (None if every point failed) and ``runs`` (one report per seed)."""
    seed0 = preset.seeds[0]
    base = preset.baseline_candidate()
    tuned = [c for c in preset.candidates if c.same_as is None]
    results: dict[str, dict] = {}

    def search(cands: list[Candidate], baseline_point: dict | None):
        points = {c.label: grid_points(c, baseline_point) for c in cands}
        jobs = [make_job(preset, c, p, seed0) for c in cands for p in points[c.label]]
        reports = iter(execute(jobs))
        for c in cands:
            trials = [(p, next(reports)) for p in points[c.label]]
            found = best(trials)
            results[c.label] = {"candidate": c, "grid": trials, "best": found[0] if found else None, "runs": []}

    # The baseline's grid first: tied options need its tuned values.
    if base is not None:
        search([base], None)
    base_point = results[base.label]["best"] if base is not None else None
    rest = [c for c in tuned if c is not base]
    if base is not None and base_point is None and any(c.tie for c in rest):
        raise RuntimeError(f"every grid point of the baseline {base.label} failed: nothing to tie "
                           f"{', '.join(c.label for c in rest if c.tie)} to; see the errors above")
    search(rest, base_point)
    for c in preset.candidates:
        if c.same_as is not None:
            results[c.label] = {"candidate": c, "grid": [], "best": results[c.same_as]["best"], "runs": []}
    final = [(c, results[c.label]["best"]) for c in preset.candidates if results[c.label]["best"] is not None]
    # Seed-major: every entry's seed-s run before any entry's next seed, so that a drift of the machine's speed
    # (other load, clocks) over the benchmark falls on every entry alike, and tokens/s ratios pair runs made
    # close in time.
    jobs = [make_job(preset, c, point, seed) for seed in preset.seeds for c, point in final]
    reports = execute(jobs)
    for i, (c, _) in enumerate(final):
        results[c.label]["runs"] = reports[i::len(final)]
    return {c.label: results[c.label] for c in preset.candidates}


# -- the summary ------------------------------------------------------------------------------------------------
def _mean(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def _std(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.stdev(values) if len(values) > 1 else None


def edge(c: Candidate, point: dict) -> list[str]:
    """Grid keys whose best value sits at the end of a grid of 2+ values: the optimum may lie outside it."""
    return [k for k, values in c.grid.items() if len(values) > 1 and point.get(k) in (min(values), max(values))]


def summarize(results: dict[str, dict], preset: Preset) -> list[dict]:
    """One row per entry: best point, eval ppl over seeds, paired ratio to the tuned baseline, state, memory and
    tokens/s against the baseline."""
    base = preset.baseline_candidate()
    base_runs = results[base.label]["runs"] if base is not None else []
    base_by_seed = {s: r for s, r in zip(preset.seeds, base_runs) if ok(r)}
    base_tps = _mean(r.get("tokens_per_second") for r in base_by_seed.values())
    rows = []
    for label, res in results.items():
        c, runs = res["candidate"], res["runs"]
        good = {s: r for s, r in zip(preset.seeds, runs) if ok(r)}
        errors = sorted({r["error"] for _, r in res["grid"] if "error" in r} | {r["error"] for r in runs if "error" in r})
        row = {"label": label, "optimizer": c.optim, "options": c.args, "tuned": res["best"],
               "grid_edge": edge(c, res["best"]) if res["best"] else [], "seeds": list(good),
               "errors": errors, "baseline": c is base}
        if not good:
            rows.append({**row, "eval_ppl_mean": None})
            continue
        ppl = [r["eval_perplexity"] for r in good.values()]
        ratios = [good[s]["eval_perplexity"] / base_by_seed[s]["eval_perplexity"] for s in good if s in base_by_seed]
        first = next(iter(good.values()))
        tps = _mean(r.get("tokens_per_second") for r in good.values())
        rows.append({
            **row,
            "eval_ppl_mean": statistics.fmean(ppl),
            "eval_ppl_std": _std(ppl),
            "eval_ppl_per_seed": ppl,
            "ppl_ratio_mean": _mean(ratios),
            "ppl_ratio_std": _std(ratios),
            "state_bytes": first["optimizer_state_bytes"],
            "bytes_per_param": first["optimizer_state_bytes_per_trainable_parameter"],
            "weight_bytes": first.get("weight_bytes"),
            "gradient_bytes": first.get("gradient_bytes"),
            "peak_memory_bytes": _mean(r["peak_memory_bytes"] for r in good.values()),
            "peak_memory_kind": first.get("peak_memory_kind"),
            "tokens_per_s": tps,
            "tokens_per_s_ratio": tps / base_tps if tps and base_tps else None,
            "train_tokens": first.get("train_tokens"),
        })
    return rows


# -- the report ----------------------------------------------------------------------------------------------------
def _fmt(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def _pm(mean, std, fmt):
    if mean is None:
        return "n/a"
    return format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")


def matrix_fraction(model: str) -> tuple[int, float]:
    """Parameters of ``model`` and the fraction of them in hidden (``matrix``-role) weights."""
    from ..optim.routing import route_parameters
    from ..recipes.models import build_model

    routes = route_parameters(build_model(model))
    total = sum(r.param.numel() for r in routes)
    return total, sum(r.param.numel() for r in routes if r.role == "matrix") / total


def how_tuned(c: Candidate, res: dict, preset: Preset) -> str:
    if c.same_as:
        return f"the tuned point of `{c.same_as}`"
    parts = [f"{k} ∈ {{{', '.join(format(v, 'g') if isinstance(v, float) else str(v) for v in vs)}}}"
             for k, vs in c.grid.items()]
    parts += [f"{o} = tuned {preset.baseline}'s {k}" for o, k in c.tie.items()]
    return "; ".join(parts)


def fairness(preset: Preset) -> str:
    """Which freedom the baseline had, as the report states it."""
    base = preset.baseline_candidate()
    if base is None:
        return f"no `{preset.baseline}` entry: no ratios."
    tied = [c.label for c in preset.candidates if "adam_lr" in c.tie.values() or "adam_lr" in c.tie]
    if "adam_lr" in base.grid and len(base.grid["adam_lr"]) > 1:
        text = (f"`{base.label}` gets two tuned lrs: `lr` for the hidden matrices and `adam_lr` for the embedding, "
                "head and vectors, the freedom methods with their own non-matrix lr have.")
    elif "adam_lr" in base.grid or "adam_lr" in base.args:
        def how(key):
            return "tuned" if len(base.grid.get(key, [])) > 1 else "one value"
        text = (f"`{base.label}` has two lrs: `lr` for the hidden matrices ({how('lr')}) and `adam_lr` for the "
                f"embedding, head and vectors ({how('adam_lr')}).")
    else:
        text = f"`{base.label}` has one lr for every parameter."
    if tied:
        text += (f" {', '.join(f'`{t}`' for t in tied)} {'takes' if len(tied) == 1 else 'take'} the baseline's tuned "
                 "non-matrix lr instead of tuning their own (every such method shares one tuned non-matrix lr).")
    return text


def markdown(rows: list[dict], results: dict[str, dict], preset: Preset, command: str,
             params: tuple[int, float] | None) -> str:
    any_report = next((r for res in results.values() for r in res["runs"] if ok(r)), {})
    kind = any_report.get("peak_memory_kind", "n/a")
    lines = [f"# Benchmark: {preset.name}", ""]
    if preset.description:
        lines += [preset.description.strip(), ""]
    lines += [
        f"`{command}`", "",
        f"- model `{preset.model}`" + (f" ({params[0]:,} parameters, {100 * params[1]:.1f} % in hidden matrices)"
                                       if params else "")
        + f", {preset.max_steps} steps, {any_report.get('train_tokens', 0):,} training tokens per run",
        f"- tuning: every grid point with seed {preset.seeds[0]}; each entry's best point (lowest eval perplexity) "
        f"re-run with seeds {', '.join(map(str, preset.seeds))}; ratios are paired by seed with the tuned "
        f"`{preset.baseline}` (the entry whose optimizer is `{preset.baseline}`)",
        f"- baseline fairness: {fairness(preset)}",
        f"- eval: token-weighted perplexity over the validation split ({any_report.get('eval_tokens') or 0:,} tokens)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, device `{any_report.get('device', 'n/a')}`, "
        f"{preset.jobs} run(s) at a time; peak memory is `{kind}` of each run's process",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"| optimizer | tuned | eval ppl (mean ± std) | × tuned {preset.baseline} | state bytes | B/param | "
        f"peak MiB | tokens/s | × {preset.baseline} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["eval_ppl_mean"] is None:
            lines.append(f"| `{r['label']}` | failed: {'; '.join(r['errors'])[:120] or 'no finite perplexity'} "
                         "| | | | | | | |")
            continue
        tuned = point_text(r["tuned"]) + (f" (edge: {', '.join(r['grid_edge'])})" if r["grid_edge"] else "")
        lines.append(
            f"| `{r['label']}` | {tuned} | {_pm(r['eval_ppl_mean'], r['eval_ppl_std'], '.2f')} | "
            f"{_pm(r['ppl_ratio_mean'], r['ppl_ratio_std'], '.3f')} | {r['state_bytes']:,} | "
            f"{_fmt(r['bytes_per_param'], '.3f')} | {_fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**20, ',.0f')} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['tokens_per_s_ratio'], '.3f')} |")
    lines += ["", "\"edge\": the best value is at the end of its grid, so the optimum may lie outside it.", "",
              f"![eval loss vs tokens]({preset.name}.png)", "", f"![memory]({preset.name}-memory.png)", "",
              f"## Grid (seed {preset.seeds[0]})", "", "| optimizer | searched | point | eval ppl |", "|---|---|---|---|"]
    for label, res in results.items():
        c = res["candidate"]
        searched = how_tuned(c, res, preset)
        for point, report in res["grid"] or [(res["best"], None)]:
            if point is None:
                continue
            value = "see above" if report is None else (
                _fmt(report.get("eval_perplexity"), ".2f") if ok(report) else f"failed: {report.get('error', 'nan')[:80]}")
            mark = " **best**" if point == res["best"] and report is not None and len(res["grid"]) > 1 else ""
            lines.append(f"| `{label}` | {searched} | {point_text(point)}{mark} | {value} |")
            searched = ""
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], results: dict[str, dict], preset: Preset, out_dir: Path) -> None:
    """Eval loss vs training tokens of each best run (mean over seeds, band min–max), and a memory bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        runs = [x for x in results[r["label"]]["runs"] if ok(x)]
        if not runs:
            continue
        per_step = runs[0]["train_tokens"] / max(1, runs[0]["global_steps"])
        n = min(len(x["eval_history"]) for x in runs)
        tokens = [runs[0]["eval_history"][i]["step"] * per_step for i in range(n)]
        losses = [[x["eval_history"][i]["loss"] for x in runs] for i in range(n)]
        line, = ax.plot(tokens, [statistics.fmean(v) for v in losses], marker="o", markersize=3, label=r["label"])
        if len(runs) > 1:
            ax.fill_between(tokens, [min(v) for v in losses], [max(v) for v in losses], color=line.get_color(),
                            alpha=0.15)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("eval loss (token-weighted)")
    ax.set_title(f"{preset.name}: {preset.model}, best point of each optimizer, {len(preset.seeds)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{preset.name}.png", dpi=120)
    plt.close(fig)

    done = [r for r in rows if r["eval_ppl_mean"] is not None]
    if not done:
        return
    # Two panels: the exact bytes memtrain counts, and the measured peak (on CPU the process's RSS, which the
    # runtime dominates; on GPU torch's allocator peak).
    fig, (exact, peak) = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(done) + 4), 4.5))
    xs = list(range(len(done)))
    mib = lambda key: [(r.get(key) or 0) / 2**20 for r in done]  # noqa: E731
    bottom = [0.0] * len(done)
    for key, name in (("weight_bytes", "weights"), ("gradient_bytes", "gradients"), ("state_bytes", "optimizer state")):
        exact.bar(xs, mib(key), bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, mib(key))]
    exact.set_title("weights, gradients, optimizer state (exact)")
    exact.legend(fontsize=8)
    peak.bar(xs, mib("peak_memory_bytes"), color="gray")
    peak.set_title(f"peak memory ({done[0]['peak_memory_kind']})")
    for ax in (exact, peak):
        ax.set_xticks(xs, [r["label"] for r in done], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MiB")
    fig.suptitle(f"{preset.name}: memory per run")
    fig.tight_layout()
    fig.savefig(out_dir / f"{preset.name}-memory.png", dpi=120)
    plt.close(fig)


def write_report(preset: Preset, results: dict[str, dict], command: str) -> list[dict]:
    rows = summarize(results, preset)
    out_dir = Path(preset.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        params = matrix_fraction(preset.model)
    except Exception:  # a saved model directory the bench process cannot build cheaply: leave the count out
        params = None
    (out_dir / f"{preset.name}.md").write_text(markdown(rows, results, preset, command, params))
    runs = {label: {"candidate": vars(res["candidate"]), "best": res["best"],
                    "grid": [{"point": p, "report": r} for p, r in res["grid"]], "runs": res["runs"]}
            for label, res in results.items()}
    (out_dir / f"{preset.name}.json").write_text(json.dumps(
        {"command": command, "preset": {k: v for k, v in vars(preset).items() if k != "candidates"},
         "parameters": params and {"total": params[0], "matrix_fraction": params[1]}, "rows": rows, "runs": runs},
        indent=1, default=str))
    plot(rows, results, preset, out_dir)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="memtrain bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="a YAML preset (configs/bench/*.yaml): the tuned comparison")
    parser.add_argument("--optims", nargs="+", default=None, help="entries name[:optim_args][@lr] (no tuning)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--eval_steps", type=int, default=None, help="default: max_steps // 6")
    parser.add_argument("--model", default=None)
    parser.add_argument("--name", default=None, help="output file stem under --out_dir")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--work_dir", default=None, help="where the runs write (finished runs there are skipped)")
    parser.add_argument("--engine", default=None, help="run under accelerate launch with this engine's config")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--no_resume", action="store_true", help="re-run finished runs too")
    args, extra = parser.parse_known_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = {k: getattr(args, k) for k in ("seeds", "max_steps", "eval_steps", "model", "name", "out_dir",
                                               "work_dir", "engine", "jobs")}
    if args.preset and args.optims:
        parser.error("give --preset or --optims, not both")
    if not (args.preset or args.optims):
        parser.error("give --preset FILE (the tuned comparison: configs/bench/pretrain-cpu.yaml in the repository) "
                     "or --optims ENTRY [ENTRY ...] (fixed points, e.g. --optims adamw \"swan@1e-3\")")
    if args.preset:
        preset = load_preset(args.preset, overrides)
    else:
        preset = build_preset(candidates_from_entries(args.optims), overrides)
    if extra:  # further memtrain pretrain flags, after the preset's
        preset = replace(preset, flags={**preset.flags, **_pairs(extra, parser)})
    resume = not args.no_resume
    results = tune(preset, lambda jobs: runner.run_all(jobs, workers=preset.jobs, resume=resume))
    rows = write_report(preset, results, runner.command_line("memtrain bench", argv))
    print((Path(preset.out_dir) / f"{preset.name}.md").read_text())
    return rows


def _pairs(extra: list[str], parser) -> dict:
    """``["--max_train_samples", "64"]`` -> ``{"max_train_samples": "64"}`` (pretrain flags take one value)."""
    if len(extra) % 2 or not all(a.startswith("--") for a in extra[::2]):
        parser.error(f"unrecognised arguments {' '.join(extra)}: extra memtrain pretrain flags go as --flag value")
    return {a[2:]: b for a, b in zip(extra[::2], extra[1::2])}
