"""Run one memtrain job in a fresh process and read its report: the one runner every benchmark shares.

A :class:`Job` is a ``memtrain`` subcommand (``pretrain``, ``finetune``, or a benchmark's own child) with its flags,
an output directory and optionally an engine (``accelerate launch`` with a named config from
``memtrain.configs.accelerate_config``) or a number of ``torchrun`` ranks. :func:`run` starts it in its own process
(so peak memory is per run), writes everything it prints to ``<out>/job.log``, shows one progress line, and returns
``<out>/report.json`` plus ``wall_s`` — or ``{"error": the first exception the job raised}``.

Runs are resumable: a finished job leaves ``<out>/job.json`` holding the hash of its command; a later :func:`run`
of the same command finds it next to ``report.json`` and returns that report without training again. Changing any
flag changes the hash, so the job runs again; a failed job is never marked finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .. import configs

#: The training bar of HF's tqdm progress callback ("  12/300 [00:41<16:20, ...").
_BAR = re.compile(r"(\d+)/(\d+) \[[\d:]+<")
#: How often a progress line is printed when the output is not a terminal (seconds).
LOG_EVERY_S = 30.0


def launcher(*subcommand: str, engine: str | None = None, ranks: int | None = None) -> list[str]:
    """The argv prefix that starts ``memtrain <subcommand>`` in a fresh process: plain, under ``accelerate launch``
    with an engine's config (``ddp``, ``fsdp2``, ``zero1``… or a config file), or under ``torchrun`` on ``ranks``."""
    if engine is not None and ranks is not None:
        raise ValueError("a job runs under an accelerate engine or torchrun ranks, not both")
    if engine is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(configs.accelerate_config(engine)), "--main_process_port", "0", "-m", "memtrain", *subcommand]
    if ranks is not None:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                "-m", "memtrain", *subcommand]
    return [sys.executable, "-m", "memtrain", *subcommand]


def flags(options: dict) -> list[str]:
    """``{"max_steps": 20, "use_cpu": True}`` -> ``["--max_steps", "20", "--use_cpu", "true"]``."""
    out = []
    for key, value in options.items():
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value) if isinstance(value, dict) \
            else str(value)
        out += [f"--{key}", text]
    return out


@dataclass(frozen=True)
class Job:
    """One run: ``memtrain <subcommand> <args> --output_dir <out>`` (under ``engine`` or ``ranks`` if given)."""

    subcommand: tuple[str, ...]
    args: tuple[str, ...]
    out: Path
    label: str = ""
    engine: str | None = None
    ranks: int | None = None
    #: Environment for the job (on top of this process's). Part of the hash: threads change tokens/s.
    env: tuple[tuple[str, str], ...] = ()
    #: Training steps, for the progress line only.
    steps: int | None = None

    def argv(self) -> list[str]:
        # the benchmark owns its run directories: a training job may replace what an earlier attempt left there
        owned = ["--overwrite_output_dir", "true"] if self.subcommand[0] in ("pretrain", "finetune") else []
        return [*launcher(*self.subcommand, engine=self.engine, ranks=self.ranks), *self.args,
                "--output_dir", str(self.out), *owned]

    def key(self) -> str:
        """Hash of what decides the result: subcommand, flags, engine, ranks, environment and the modification
        times of the files that flags name (a re-saved base model runs its fine-tuning again); not the output path
        or the Python executable."""
        what = {"subcommand": self.subcommand, "args": self.args, "engine": self.engine, "ranks": self.ranks,
                "env": sorted(self.env), "inputs": [_stamp(a) for a in self.args]}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamp(arg: str) -> int | None:
    """Modification time of a file an argument names (of the newest file directly inside a directory)."""
    path = Path(arg)
    try:
        if path.is_file():
            return path.stat().st_mtime_ns
        if path.is_dir():
            return max((p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()), default=None)
    except OSError:  # a name too long for the file system, say: not a path
        pass
    return None


def first_error(log: str) -> str | None:
    """The first exception a run raised (torchrun prefixes a rank's lines with ``[rankN]: ``), not the launchers'
    own errors that follow it."""
    raised = re.search(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception): .*)$", log, re.MULTILINE)
    return raised.group(1) if raised else None


def finished(job: Job) -> dict | None:
    """The report of an earlier run of exactly this job, or None."""
    stamp, report = job.out / "job.json", job.out / "report.json"
    if not (stamp.is_file() and report.is_file()):
        return None
    meta = json.loads(stamp.read_text())
    if meta.get("key") != job.key():
        return None
    return {**json.loads(report.read_text()), "wall_s": meta.get("wall_s"), "resumed": True}


class _Progress:
    """One line per job: rewritten in place on a terminal (when one job runs at a time), printed every
    ``LOG_EVERY_S`` otherwise."""

    _lock = threading.Lock()

    def __init__(self, name: str, steps: int | None, inplace: bool = True, stream=None):
        self.name, self.steps, self.stream = name, steps, stream or sys.stderr
        self.tty = inplace and self.stream.isatty()
        self.start = self.last_print = time.perf_counter()
        self.step = 0

    def feed(self, chunk: str) -> None:
        for done, total in _BAR.findall(chunk):
            if self.steps is None or int(total) == self.steps:  # eval bars have other totals
                self.step = int(done)
        now = time.perf_counter()
        if self.tty or now - self.last_print >= LOG_EVERY_S:
            self.show("")
            self.last_print = now

    def show(self, end: str, tail: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        where = f"step {self.step}/{self.steps}" if self.steps else "running"  # no bar to read without steps
        line = f"{self.name}: {where}, {elapsed:.0f} s{tail}"
        with self._lock:
            if self.tty:
                self.stream.write(f"\r\033[K{line}{end or ''}")
            else:
                self.stream.write(line + "\n")
            self.stream.flush()


def run(job: Job, *, resume: bool = True, name: str | None = None, inplace: bool = True) -> dict:
    """Run ``job`` (or return its finished report when ``resume``): the report plus ``wall_s``, or
    ``{"error": ...}`` naming the first exception the job raised. ``inplace``: the progress line may rewrite
    itself on a terminal (not when several jobs share it)."""
    name = name or job.label or str(job.out)
    if resume and (report := finished(job)) is not None:
        print(f"{name}: finished earlier, skipped ({job.out})", file=sys.stderr, flush=True)
        return report
    job.out.mkdir(parents=True, exist_ok=True)
    for stale in ("job.json", "report.json"):
        (job.out / stale).unlink(missing_ok=True)
    progress = _Progress(name, job.steps, inplace)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(job.env)}
    start = time.perf_counter()
    with open(job.out / "job.log", "w") as log:
        proc = subprocess.Popen(job.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        while chunk := os.read(proc.stdout.fileno(), 65536):
            text = chunk.decode(errors="replace")
            log.write(text)
            progress.feed(text)
        proc.wait()
    wall = round(time.perf_counter() - start, 1)
    report_path = job.out / "report.json"
    if proc.returncode != 0 or not report_path.is_file():
        text = (job.out / "job.log").read_text(errors="replace")
        error = first_error(text) or f"exit code {proc.returncode}: {text[-500:]}"
        progress.show("\n", f", failed: {error[:120]}")
        return {"error": error, "log": str(job.out / "job.log")}
    report = {**json.loads(report_path.read_text()), "wall_s": wall}
    (job.out / "job.json").write_text(json.dumps({"key": job.key(), "argv": job.argv(), "wall_s": wall}, indent=1))
    ppl = report.get("eval_perplexity")
    progress.show("\n", ", done" + (f": eval ppl {ppl:.3f}" if isinstance(ppl, (int, float)) else ""))
    return report


def run_all(jobs: Sequence[Job], *, workers: int = 1, resume: bool = True) -> list[dict]:
    """Run ``jobs`` (``workers`` at a time); the reports in the order of ``jobs``. ``[i/n]`` prefixes each
    progress line."""
    n = len(jobs)

    def one(item):
        i, job = item
        return run(job, resume=resume, name=f"[{i + 1}/{n}] {job.label or job.out}", inplace=workers <= 1)

    if workers <= 1:
        return [one(item) for item in enumerate(jobs)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, enumerate(jobs)))


def thread_env(workers: int) -> tuple[tuple[str, str], ...]:
    """Threads per job when ``workers`` jobs share this machine's cores (nothing to set for one job at a time)."""
    if workers <= 1:
        return ()
    return (("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers))),)


def slug(text: str) -> str:
    """A directory name for a label: letters, digits and ``-_.=`` kept, the rest ``_``."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def command_line(prog: str, argv: Iterable[str]) -> str:
    """How to type the command that made a table (quoted where a shell would split or glob)."""
    return " ".join([prog, *(f'"{a}"' if any(c in a for c in " :@,;*?") else a for a in argv)]).strip()
