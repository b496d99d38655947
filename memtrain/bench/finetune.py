"""The fine-tuning benchmark: several adapter entries through ``memtrain finetune`` (one process each, so peak
memory is per run), same flags, data, seed and steps, then a markdown table."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import runner
from ..hf.factory import _optim_name
from ..recipes.finetune import ADAPTER_CHOICES, FinetuneArguments
from ..hf import TrainingArguments


def _parse_entry(entry: str) -> tuple[str, str | None, list[str]]:
    """``adapter[:adapter_args][@lr[,lr...]]`` -> adapter, its args, the lr grid as written (empty: the job's
    ``--learning_rate``)."""
    spec, _, lrs = entry.partition("@")
    adapter, _, adapter_args = spec.partition(":")
    if adapter not in ADAPTER_CHOICES:
        raise ValueError(f"benchmark entry {entry!r}: adapter must be one of {', '.join(ADAPTER_CHOICES)}")
    grid = [lr.strip() for lr in lrs.split(",")] if lrs else []
    for lr in grid:
        try:
            if not float(lr) > 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"benchmark entry {entry!r}: {lr!r} is not a positive learning rate "
                             "(write adapter@lr or adapter@lr1,lr2,lr3)") from None
    return adapter, adapter_args or None, grid


def _drop_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a.split("=")[0] in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _finite(report: dict) -> bool:
    return "error" not in report and math.isfinite(report.get("eval_perplexity", math.inf))


def benchmark(fargs: FinetuneArguments, args: TrainingArguments, argv: list[str]) -> list[dict]:
    """Each entry through ``memtrain finetune`` in its own process (:mod:`.runner`: peak RSS is per run, a finished
    run is not run again), same flags, data and steps. An entry with an lr grid (``lora@1e-3,3e-3,1e-2``) runs
    every lr with the first of ``--benchmark_seeds``, then its best lr (lowest eval perplexity) with every seed;
    the table reports each entry at its tuned lr, mean ± std over the seeds. Writes ``fargs.benchmark_out`` and the
    JSON next to it."""
    common = _drop_flags(list(argv), ("--benchmark", "--benchmark_out", "--benchmark_seeds", "--output_dir",
                                      "--adapter", "--adapter_args", "--learning_rate", "--merge", "--seed"))
    seeds = list(fargs.benchmark_seeds or [args.seed])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--benchmark_seeds repeats a seed: {seeds}")
    entries = [(entry, *_parse_entry(entry)) for entry in fargs.benchmark]  # every entry checked before any run

    def run(entry, adapter, adapter_args, lr, seed):
        flags = [*common, "--adapter", adapter, *(["--adapter_args", adapter_args] if adapter_args else []),
                 "--learning_rate", lr, "--seed", str(seed)]
        spec = entry.partition("@")[0]
        job = runner.Job(("finetune",), tuple(flags), Path(args.output_dir) / runner.slug(f"{spec}@{lr}") / f"seed{seed}",
                         label=f"{spec}@{lr} seed {seed}", steps=args.max_steps if args.max_steps > 0 else None)
        report = runner.run(job)
        if "error" in report:
            raise RuntimeError(f"fine-tuning benchmark entry {entry!r} (lr {lr}, seed {seed}) failed: "
                               f"{report['error']} (log: {report['log']})")
        return report

    rows = []
    for entry, adapter, adapter_args, grid in entries:
        grid = grid or [repr(args.learning_rate)]
        tried = {lr: run(entry, adapter, adapter_args, lr, seeds[0]) for lr in grid}
        finite = {lr: r for lr, r in tried.items() if _finite(r)}
        if not finite:
            raise RuntimeError(f"fine-tuning benchmark entry {entry!r}: every lr of {grid} diverged")
        best = min(finite, key=lambda lr: finite[lr]["eval_perplexity"])
        runs = [tried[best], *(run(entry, adapter, adapter_args, best, s) for s in seeds[1:])]
        ppl = [r["eval_perplexity"] for r in runs]
        rows.append({**runs[0], "entry": entry, "grid": {lr: r.get("eval_perplexity") for lr, r in tried.items()},
                     "tuned_lr": float(best), "edge": len(grid) > 1 and best in (grid[0], grid[-1]),
                     "seeds": seeds, "eval_perplexities": ppl, "eval_ppl_mean": statistics.fmean(ppl),
                     "eval_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else None})
    out = Path(fargs.benchmark_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_table(rows, fargs, args, runner.command_line("memtrain finetune", argv)))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"benchmark table written to {out} (and {out.with_suffix('.json').name})", flush=True)
    return rows


def format_table(rows: list[dict], fargs: FinetuneArguments, args: TrainingArguments, command: str) -> str:
    def mib(x):
        return f"{x / 2**20:,.2f}" if isinstance(x, (int, float)) else "n/a"

    def ppl(r):
        std = f" ± {r['eval_ppl_std']:.2f}" if r["eval_ppl_std"] is not None else ""
        return f"{r['eval_ppl_mean']:.2f}{std}"

    lines = [
        "| entry | tuned lr | eval ppl before → after (mean ± std) | trainable params | optimizer state (MiB) "
        "| state B/trainable param | adapter file (KiB) | peak memory (MiB) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        adapter_kib = f"{r['adapter_bytes'] / 1024:,.1f}" if r.get("adapter_bytes") else "—"
        edge = " (grid edge)" if r["edge"] else ""
        lines.append(
            f"| {r['entry'].partition('@')[0]} | {r['tuned_lr']:g}{edge} | {r['eval_perplexity_before']:.2f} → {ppl(r)} "
            f"| {r['trainable_parameters']:,} | {mib(r['optimizer_state_bytes'])} "
            f"| {r['optimizer_state_bytes_per_trainable_parameter']:.2f} | {adapter_kib} "
            f"| {mib(r['peak_memory_bytes'])} | {r['tokens_per_second']:,.0f} |")
    grid_lines = ["| entry | lr | eval ppl (seed " + str(rows[0]["seeds"][0] if rows else args.seed) + ") |",
                  "|---|---|---|"]
    for r in rows:
        for lr, value in r["grid"].items():
            mark = " ← tuned" if float(lr) == r["tuned_lr"] else ""
            grid_lines.append(f"| {r['entry'].partition('@')[0]} | {float(lr):g} | "
                              f"{value:.2f}{mark} |" if isinstance(value, (int, float)) else
                              f"| {r['entry'].partition('@')[0]} | {float(lr):g} | failed |")
    first = rows[0] if rows else {}
    seeds = first.get("seeds", [args.seed])
    return "\n".join([
        "# Fine-tuning benchmark",
        f"`{command}`",
        "",
        f"Base model `{fargs.model_name_or_path}`, data `{fargs.dataset}` (seq_len {fargs.seq_len}), "
        f"{args.max_steps} steps × {args.per_device_train_batch_size} sequences, equal for every entry; `--optim "
        f"{_optim_name(args.optim)}` (plain LoRA and full fine-tuning: on every trainable tensor; the three methods: "
        f"their own Adam on the adapter tensors), device {first.get('device')}. "
        f"LoRA r = {fargs.lora_r}, alpha = {fargs.lora_alpha or 2 * fargs.lora_r} (ALLoRA: alpha = r), targets {fargs.target_modules}. "
        f"Each entry's lr grid runs with seed {seeds[0]}; its best lr (lowest eval perplexity) runs with seeds "
        f"{', '.join(map(str, seeds))}: the table is that tuned lr, eval perplexity mean ± std over the seeds, and the "
        "memory and speed of the first seed's run. Eval perplexity is token-weighted over the held-out split. Peak "
        f"memory is {first.get('peak_memory_kind')} of each run's own process. \"(grid edge)\": the best lr is at "
        "an end of its grid, so the optimum may lie outside it.",
        "",
        *lines,
        "",
        "The lr grids (one seed):",
        "",
        *grid_lines,
        "",
    ])
