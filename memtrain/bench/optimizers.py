"""Side-by-side optimizer benchmark behind ``memtrain bench`` (and ``scripts/benchmark.py``).

Every entry runs ``memtrain pretrain`` in its own process (so peak memory is per run) with the same model,
data, seeds, schedule and token budget; the reports are then tabulated against ``adamw`` measured in the same
invocation. Entries read ``name[:optim_args][@lr]``, e.g. ``"galore:rank=32,update_proj_gap=50@0.01"``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import configs

BASELINE = "adamw"


@dataclass(frozen=True)
class Entry:
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
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)


def launcher(engine: str | None) -> list[str]:
    """How a run starts: a plain process, or ``accelerate launch`` with the engine's accelerate config (``memtrain/configs/accelerate/<engine>.yaml``)."""
    if engine is None:
        return [sys.executable, "-m", "memtrain", "pretrain"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(configs.accelerate_config(engine)),
            "--main_process_port", "0", "-m", "memtrain", "pretrain"]


def first_error(stderr: str) -> str | None:
    """The first exception a run raised (torchrun prefixes a rank's lines with ``[rankN]: ``), not the launchers'
    own errors that follow it."""
    raised = re.search(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception): .*)$", stderr, re.MULTILINE)
    return raised.group(1) if raised else None


def pretrain(entry: Entry, out: Path, flags: list[str], engine: str | None = None) -> dict:
    """One ``memtrain pretrain`` run of ``entry`` writing into ``out``: its report (plus ``wall_s``), or
    ``{"error": last line of stderr}`` if the run failed (a refusal, say)."""
    cmd = [*launcher(engine), "--optim", entry.optim, "--output_dir", str(out), "--overwrite_output_dir", "true",
           "--save_final_model", "false", "--report_to", "none", "--disable_tqdm", "true", *flags]
    if entry.optim_args:
        cmd += ["--optim_args", entry.optim_args]
    if entry.lr is not None:
        cmd += ["--learning_rate", str(entry.lr)]
    print(f"[benchmark] {entry.label} on {engine or 'one process'}: {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if engine not in (None, "single") else None  # 1 thread per rank
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": first_error(proc.stderr) or f"exit code {proc.returncode}: {proc.stderr[-500:]}"}
    report = json.loads((out / "report.json").read_text())
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def run_one(entry: Entry, seed: int, args, extra: list[str]) -> dict:
    out = Path(args.work_dir) / args.name / f"{entry.slug}-seed{seed}"
    report = pretrain(entry, out, [
        "--model", args.model, "--seed", str(seed), "--max_steps", str(args.max_steps), "--eval_strategy", "steps",
        "--eval_steps", str(args.eval_steps), "--eval_on_start", "true",
        "--logging_steps", str(max(1, args.max_steps // 10)), *extra], engine=args.engine)
    if "error" in report:
        raise RuntimeError(f"benchmark run {entry.label} seed {seed} failed: {report['error']}")
    print(f"[benchmark]   ppl {report['eval_perplexity']:.3f}  tokens/s {report['tokens_per_second']:,.0f}", flush=True)
    return report


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    base = results.get(BASELINE)
    base_ppl = _mean(r["eval_perplexity"] for r in base) if base else None
    base_tps = _mean(r["tokens_per_second"] for r in base) if base else None
    rows = []
    for label, reports in results.items():
        ppl = _mean(r["eval_perplexity"] for r in reports)
        tps = _mean(r["tokens_per_second"] for r in reports)
        rows.append({
            "entry": label,
            "eval_ppl": ppl,
            "eval_ppl_per_seed": [r["eval_perplexity"] for r in reports],
            "ppl_vs_adamw_pct": 100 * (ppl / base_ppl - 1) if base_ppl else None,
            "state_bytes": reports[0]["optimizer_state_bytes"],
            "bytes_per_param": reports[0]["optimizer_state_bytes_per_trainable_parameter"],
            "peak_memory_mib": _mean(r["peak_memory_bytes"] for r in reports) / 2**20,
            "peak_memory_kind": reports[0]["peak_memory_kind"],
            "tokens_per_s": tps,
            "tokens_per_s_vs_adamw": tps / base_tps if base_tps else None,
        })
    return rows


def _fmt(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def markdown(rows: list[dict], args, results: dict[str, list[dict]], command: str) -> str:
    any_report = next(iter(results.values()))[0]
    tokens = any_report["train_tokens"]
    lines = [
        f"# Benchmark: {args.name}",
        "",
        f"`{command}`",
        "",
        f"- model `{args.model}` ({any_report['parameters']:,} parameters), {args.max_steps} steps, "
        f"{tokens:,} training tokens per run, seeds {', '.join(map(str, args.seeds))}",
        f"- eval: token-weighted perplexity over the whole validation split ({any_report['eval_tokens']:,} tokens)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"device `{any_report['device']}`; peak memory is `{rows[0]['peak_memory_kind']}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| optimizer | eval ppl (mean) | per seed | vs adamw | state bytes | B/param | peak MiB | tokens/s | × adamw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['entry']}` | {_fmt(r['eval_ppl'], '.3f')} | "
            f"{' / '.join(_fmt(p, '.3f') for p in r['eval_ppl_per_seed'])} | "
            f"{_fmt(r['ppl_vs_adamw_pct'], '+.2f')}% | {r['state_bytes']:,} | {_fmt(r['bytes_per_param'], '.3f')} | "
            f"{_fmt(r['peak_memory_mib'], ',.0f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['tokens_per_s_vs_adamw'], '.3f')} |"
        )
    lines += ["", f"![eval loss vs tokens]({args.name}.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, reports in results.items():
        tokens_per_step = reports[0]["train_tokens"] / max(1, reports[0]["global_steps"])
        steps = [h["step"] for h in reports[0]["eval_history"]]
        losses = [statistics.fmean(r["eval_history"][i]["loss"] for r in reports) for i in range(len(steps))]
        ax.plot([s * tokens_per_step for s in steps], losses, marker="o", markersize=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("eval loss (token-weighted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optims", nargs="+", default=["adamw"], help="entries name[:optim_args][@lr]")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=None, help="default: max_steps // 6")
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--name", default="benchmark", help="output file stem under --out_dir")
    parser.add_argument("--out_dir", default="docs/benchmarks")
    parser.add_argument("--work_dir", default="out/bench")
    parser.add_argument("--engine", default=None, help="run under accelerate launch with configs/accelerate/<engine>.yaml")
    args, extra = parser.parse_known_args(argv)
    args.eval_steps = args.eval_steps or max(1, args.max_steps // 6)
    entries = [Entry.parse(e) for e in args.optims]
    results: dict[str, list[dict]] = {}
    for entry in entries:
        results[entry.label] = [run_one(entry, seed, args, extra) for seed in args.seeds]
    rows = summarize(results)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "memtrain bench " + " ".join(
        f'"{a}"' if any(c in a for c in " :@,") else a for a in (argv if argv is not None else sys.argv[1:])
    )
    (out_dir / f"{args.name}.md").write_text(markdown(rows, args, results, command))
    (out_dir / f"{args.name}.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1, default=str))
    plot(results, out_dir / f"{args.name}.png", f"{args.name}: {args.model}, {args.max_steps} steps")
    print((out_dir / f"{args.name}.md").read_text())
    return rows
