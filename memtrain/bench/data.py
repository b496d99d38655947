"""``memtrain bench data``: what the data pipeline delivers per dataloader worker, and what it costs in memory.

1. generates a JSONL source of ``--source_gb`` under ``--work_dir`` (deleted at the end unless ``--keep``);
2. streaming: tokens/s of one consumer packing blocks on the fly (as one dataloader worker does), alone and as
   consumer 0 of 4 (it then reads, but does not tokenize, the other consumers' windows);
3. shards: tokens/s of ``memtrain prepare-data`` and of reading random blocks from the memory-mapped shards;
4. memory: runs ``memtrain pretrain --streaming true`` on the whole source for ``--steps`` steps in a subprocess
   and samples the memory (PSS: resident pages, shared ones counted once) of it and its dataloader workers at
   every tenth of the steps; it must stay flat.

Results go to stdout as a Markdown table and to ``<work_dir>/results.json``; docs/data.md reports them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np


def generate_source(path: pathlib.Path, target_bytes: int, seed: int = 0) -> dict:
    """JSONL documents of real English: passages of 50–1,500 words cut at random from the embedded Shakespeare
    corpus, written in a shuffled round-robin with a unique first line until ``target_bytes``."""
    from memtrain.recipes.data import load_documents

    rng = np.random.default_rng(seed)
    words = [text.split(" ") for _, text in load_documents("shakespeare")]
    pool = []
    for _ in range(4000):
        play = words[int(rng.integers(len(words)))]
        n = int(rng.integers(50, 1500))
        start = int(rng.integers(0, max(len(play) - n, 1)))
        pool.append(" ".join(play[start:start + n]))
    written, docs = 0, 0
    with open(path, "w") as f:
        while written < target_bytes:
            line = json.dumps({"text": f"Passage {docs}.\n{pool[int(rng.integers(len(pool)))]}"}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return {"bytes": written, "documents": docs}


def stream_tokens_per_s(documents, tok, seq_len: int, seconds: float, world_size: int = 1) -> dict:
    from memtrain.recipes.data import PackedStream

    stream = PackedStream(documents, tok, seq_len, seed=0, window_docs=256, shuffle_buffer=10_000, rank=0,
                          world_size=world_size, loop=True)
    it = iter(stream)
    next(it)  # fills the shuffle buffer: start-up, not throughput
    start, cpu, blocks = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        blocks += 1
    return _rates(blocks * seq_len, start, cpu)


def _rates(tokens: int, start: float, cpu: float) -> dict:
    """Tokens per wall second, and per CPU second of this process: what one worker on a core of its own delivers
    (the wall rate is lower whenever the machine is shared)."""
    return {"wall": tokens / (time.perf_counter() - start), "cpu": tokens / max(time.process_time() - cpu, 1e-9)}


def shard_read_tokens_per_s(path, seq_len: int, batch: int, seconds: float) -> dict:
    import torch

    from memtrain.recipes.data import TokenBlocks

    blocks = TokenBlocks(path, "train", seq_len)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(blocks, batch_size=batch, sampler=order.tolist(), num_workers=0)
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for b in loader:
        tokens += b["input_ids"].numel()
        if time.perf_counter() - start > seconds:
            break
    return _rates(tokens, start, cpu)


def _pss(pid: int) -> int:
    """Proportional set size in bytes: resident memory with pages shared between processes (a forked dataloader
    worker shares most of its parent's) counted once across them, so the sum over processes is meaningful."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def _tree_pss(pid: int) -> int:
    """PSS of a process and all its descendants (the dataloader workers)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _pss(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def pretrain_memory(source, tokenizer, work: pathlib.Path, model: str, steps: int, seq_len: int, batch: int,
                    workers: int) -> dict:
    """Run ``memtrain pretrain --streaming true`` and read the memory of it and its workers every time it logs
    (every tenth of the steps) and twice a second in between."""
    log_every = max(steps // 10, 1)
    cmd = [sys.executable, "-m", "memtrain", "pretrain", "--dataset", str(source), "--streaming", "true",
           "--tokenizer", str(tokenizer), "--model", model, "--max_steps", str(steps), "--seq_len", str(seq_len),
           "--per_device_train_batch_size", str(batch), "--dataloader_num_workers", str(workers),
           "--max_eval_samples", "8", "--logging_steps", str(log_every), "--disable_tqdm", "true",
           "--report_to", "none", "--save_final_model", "false", "--output_dir", str(work / "pretrain")]
    log_path = work / "pretrain.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        at_logs, during, peak = [], [], 0
        while proc.poll() is None:
            mem = _tree_pss(proc.pid)
            peak = max(peak, mem)
            logged = log_path.read_text(errors="replace").count("{'loss'")
            if logged > len(at_logs):
                at_logs.append((logged * log_every, mem))
            if at_logs and mem:
                during.append(mem)
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain failed ({proc.returncode}); see {log_path}")
    report = json.loads((work / "pretrain" / "report.json").read_text())
    mib = 2**20
    return {"command": "memtrain " + " ".join(cmd[3:]), "seconds": round(time.perf_counter() - start, 1),
            "pss_mib_at_step": [(step, round(m / mib, 1)) for step, m in at_logs],
            "pss_mib_training_min_max": (round(min(during) / mib, 1), round(max(during) / mib, 1)) if during else None,
            "pss_mib_peak_whole_run": round(peak / mib, 1),
            "train_tokens_per_s": report.get("tokens_per_second")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="memtrain bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp/memtrain-bench-data")
    p.add_argument("--source_gb", type=float, default=1.0)
    p.add_argument("--tokenizer", help="tokenizer directory or Hub id; default: a BPE trained on the source's head")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each throughput measurement")
    p.add_argument("--shard_tokens", type=int, default=5_000_000, help="tokens prepare-data writes for the test")
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="dataloader workers of the pretraining run")
    p.add_argument("--keep", action="store_true", help="keep the generated source and shards")
    a = p.parse_args(argv)

    from memtrain.recipes import data as D

    work = pathlib.Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source.jsonl"
    results: dict = {"args": vars(a), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    try:
        t = time.perf_counter()
        results["source"] = generate_source(source, int(a.source_gb * 2**30))
        results["source"]["generate_s"] = round(time.perf_counter() - t, 1)
        documents = D.open_document_stream(str(source))
        if a.tokenizer:
            tok_dir = a.tokenizer
            tok = D.get_tokenizer(a.tokenizer, [], a.vocab_size)
        else:
            t = time.perf_counter()
            sample = D.tokenizer.sample_texts((r["text"] for r in documents), 16 << 20)
            tok = D.get_tokenizer(None, sample, a.vocab_size, cache_dir=work / "cache")
            results["tokenizer_train_s"] = round(time.perf_counter() - t, 1)
            tok_dir = str(work / "tokenizer")
            tok.save_pretrained(tok_dir)
        results["vocab"] = len(tok)
        results["stream_tokens_per_s"] = stream_tokens_per_s(documents, tok, a.seq_len, a.seconds)
        results["stream_tokens_per_s_consumer_of_4"] = stream_tokens_per_s(documents, tok, a.seq_len, a.seconds, 4)

        t, cpu = time.perf_counter(), time.process_time()
        D.prepare_data(str(source), work / "shards", tokenizer=tok_dir, max_train_tokens=a.shard_tokens,
                       eval_tokens=1 << 16, batch_docs=64)
        results["prepare_tokens_per_s"] = _rates(a.shard_tokens, t, cpu)  # includes the eval head
        results["shard_read_tokens_per_s"] = shard_read_tokens_per_s(work / "shards", a.seq_len, a.batch, a.seconds)
        results["pretrain"] = pretrain_memory(source, tok_dir, work, a.model, a.steps, a.seq_len, a.batch, a.workers)
    finally:
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if not a.keep:
            source.unlink(missing_ok=True)
            shutil.rmtree(work / "shards", ignore_errors=True)

    r, pt = results, results["pretrain"]
    def rate(x):
        return f"{x['wall']:,.0f} / {x['cpu']:,.0f}"

    rows = [
        ("source", f"{r['source']['bytes'] / 2**30:.2f} GiB JSONL, {r['source']['documents']:,} documents, "
                   f"tokenizer vocab {r['vocab']:,}"),
        ("streaming, 1 consumer (tokens per wall s / per CPU s)", rate(r["stream_tokens_per_s"])),
        ("streaming, consumer 0 of 4 (tokens per wall s / per CPU s)", rate(r["stream_tokens_per_s_consumer_of_4"])),
        ("prepare-data (tokens per wall s / per CPU s)", rate(r["prepare_tokens_per_s"])),
        ("memmap shards, random blocks (tokens per wall s / per CPU s)", rate(r["shard_read_tokens_per_s"])),
        (f"pretrain {a.model} streaming the source: memory (PSS, MiB, process + workers) at step",
         ", ".join(f"{step}: {m:.0f}" for step, m in pt["pss_mib_at_step"])),
        ("memory while training, min / max (MiB)", " / ".join(f"{m:.0f}" for m in pt["pss_mib_training_min_max"] or ())),
        ("training tokens/s of that run", f"{pt['train_tokens_per_s']:,.0f}"),
    ]
    print("| measurement | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(f"\nresults: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
