"""The optimizer × engine table behind ``memtrain bench engines`` (docs/distributed.md).

Every optimizer runs ``memtrain pretrain`` under each accelerate config (2 ranks) and once in one process on the
same global batch. Per cell: whether the engine refused it (the error it raised), the relative eval-loss
difference to the one-process run, this rank's optimizer-state bytes, the bytes memtrain's own collectives moved
per step (``distributed.COMM``: not FSDP's or DDP's traffic), and tokens/s against ``adamw`` on the same engine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import runner
from .optimizers import BASELINE, Entry, optim_flags
from ..recipes.models import build_model
from ..optim.registry import optimizer_names

ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
WORLD = 2  # num_processes in the engines' accelerate configs (memtrain/configs/accelerate)


def _cell(report: dict, reference: dict, baseline: dict | None) -> dict:
    if "error" in report:
        return {"refused": report["error"]}
    tps, base = report["tokens_per_second"], (baseline or {}).get("tokens_per_second")
    return {
        "eval_loss_rel_diff": abs(report["eval_loss"] - reference["eval_loss"]) / reference["eval_loss"],
        "state_bytes_per_rank": report["optimizer_state_bytes_per_rank"][0],
        "state_fraction_of_one_process": report["optimizer_state_bytes_per_rank"][0]
        / max(1, reference["optimizer_state_bytes"]),
        "comm_bytes_per_step": report["optimizer_comm_bytes_per_step"],
        "tokens_per_s": tps,
        "tokens_per_s_vs_adamw": tps / base if base and "error" not in baseline else None,
    }


def markdown(table: dict, args, command: str) -> str:
    lines = [
        f"# Optimizers × engines: {args.model}, {WORLD} ranks",
        "",
        f"`{command}`",
        "",
        f"- {args.max_steps} steps from the same saved initial weights, {args.batch} sequences per rank "
        f"({WORLD * args.batch} per step), seed 0; the reference is one process on the same global batch",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; ranks use gloo and one "
        "thread each, so tokens/s ratios (vs `adamw` on the same engine) are the signal, not the absolute values",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| optimizer | engine | eval loss vs 1 process | state B/rank | of 1 process | memtrain comm B/step | "
        "tokens/s | × adamw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        for engine, c in row.items():
            if "refused" in c:
                lines.append(f"| `{name}` | {engine} | refused: {c['refused'].split(',')[0][:80]} | | | | | |")
                continue
            ratio = c["tokens_per_s_vs_adamw"]
            lines.append(
                f"| `{name}` | {engine} | {c['eval_loss_rel_diff']:.1e} | {c['state_bytes_per_rank']:,} | "
                f"{c['state_fraction_of_one_process']:.3f} | {c['comm_bytes_per_step']:,.0f} | "
                f"{c['tokens_per_s']:,.0f} | {'n/a' if ratio is None else format(ratio, '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optims", nargs="+", default=None, help="entries name[:optim_args][@lr]; default: all")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--max_steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--name", default="engines")
    parser.add_argument("--out_dir", default="docs/benchmarks")
    parser.add_argument("--work_dir", default="out/bench_engines")
    parser.add_argument("--no_resume", action="store_true", help="re-run finished runs too")
    args = parser.parse_args(argv)
    entries = [Entry.parse(e) for e in (args.optims or optimizer_names())]
    work = Path(args.work_dir)
    # Every run starts from the same saved weights: ZeRO-3 builds a fresh model partitioned (deepspeed.zero.Init),
    # which draws other random numbers than a plain init.
    init = work / "init" / runner.slug(args.model)
    if not (init / "config.json").is_file():  # saved once, so that finished runs stay finished (runner.Job.key)
        build_model(args.model, seed=0).save_pretrained(init)
    flags = ["--model", str(init), "--max_steps", str(args.max_steps), "--seed", "0", "--data_seed", "0",
             "--logging_steps", str(args.max_steps), "--max_eval_samples", "64", "--save_final_model", "false",
             "--report_to", "none", "--disable_tqdm", "false"]

    def job(e: Entry, engine: str | None) -> runner.Job:
        batch = ["--per_device_train_batch_size", str(WORLD * args.batch)] if engine is None else \
            ["--per_device_train_batch_size", str(args.batch), "--ddp_timeout", "300"]
        return runner.Job(("pretrain",), tuple(flags + batch + optim_flags(e.optim, e.optim_args, e.lr)), work / (engine or "single") / e.slug,
                          label=f"{e.label} on {engine or 'one process'}", engine=engine, steps=args.max_steps,
                          env=(("OMP_NUM_THREADS", "1"),) if engine else ())  # one thread per rank

    resume = not args.no_resume
    reference = dict(zip([e.label for e in entries], runner.run_all([job(e, None) for e in entries], resume=resume)))
    runs = {engine: dict(zip([e.label for e in entries],
                             runner.run_all([job(e, engine) for e in entries], resume=resume)))
            for engine in args.engines}
    base = next((e.label for e in entries if e.optim == BASELINE), None)  # by optimizer name, not label
    table = {e.label: {engine: _cell(runs[engine][e.label], reference[e.label], runs[engine].get(base))
                       for engine in args.engines} for e in entries}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = runner.command_line("memtrain bench engines", argv if argv is not None else sys.argv[1:])
    (out_dir / f"{args.name}.md").write_text(markdown(table, args, command))
    (out_dir / f"{args.name}.json").write_text(json.dumps({"table": table, "reference": reference, "runs": runs},
                                                          indent=1, default=str))
    print((out_dir / f"{args.name}.md").read_text())
    return table
