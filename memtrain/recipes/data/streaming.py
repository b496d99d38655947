"""Streaming pretraining data: documents are read, tokenized and packed on the fly into fixed-length blocks, so
memory and start-up time do not grow with the corpus (docs/data.md).

**The stream.** Per epoch, the training documents (the source minus the held-out head, see :func:`take_head`) are
shuffled with a buffer seeded by ``seed + epoch`` and cut into *windows* of ``window_docs`` consecutive documents.
Each window is tokenized (EOS after every document) and cut into ``seq_len`` blocks; the window's remainder
(< seq_len tokens) is dropped, so no block ever needs padding. The stream is the blocks of window 0, then window 1, …

**Splitting.** The windows are the unit of work: with ``R`` data-parallel ranks of ``W`` dataloader workers each,
consumer ``c = rank * W + worker`` of ``N = R * W`` takes windows ``c, c + N, c + 2N, …``. Every consumer reads
the document stream (cheap) but tokenizes only its own windows (the expensive part), and because the window
boundaries do not depend on ``N``, the consumers' blocks are disjoint and their union is exactly the
single-process stream. The stream repeats epoch after epoch forever; ``max_steps`` ends training.

**Resuming.** The HF DataLoader takes batches from its workers round-robin, so after ``B`` batches on a rank,
worker ``w`` has delivered exactly ``ceil((B - w) / W)`` batches. Each worker logs, in a small shared-memory ledger,
at which block count each of its windows started; at a checkpoint, :class:`.resume.StreamStateCallback` turns the
delivered counts into (epoch, window, offset) positions and writes them into the checkpoint directory. A resumed
run reads them back (:meth:`PackedStream.load_state`) and each consumer skips documents without tokenizing them
up to its window, then drops ``offset`` blocks: the first batch after resuming is bit-equal to the batch the
uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Iterator

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .packing import cut_blocks, tokenize_flat

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Shared-memory ledger: per dataloader worker, the last LEDGER_SLOTS windows it tokenized. A worker runs at most
# prefetch_factor batches ahead of what was consumed, so this only has to cover the prefetch depth.
MAX_WORKERS = 64
LEDGER_SLOTS = 1024


def _state_file(checkpoint_dir, rank: int) -> pathlib.Path:
    return pathlib.Path(checkpoint_dir) / f"stream_state-rank{rank}.json"


def _iter_windows(documents: datasets.IterableDataset, window_docs: int) -> Iterator[list[str]]:
    # .iter() (not __iter__): datasets would otherwise split its shards across the torch workers on its own.
    for batch in documents.iter(batch_size=window_docs):
        texts = batch["text"]
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"the text column must hold strings, found {type(bad).__name__}")
        yield [t for t in texts if t.strip()]  # whitespace-only documents would add nothing but an EOS


def take_head(documents: datasets.IterableDataset, tokenizer: PreTrainedTokenizerFast, min_tokens: int,
              window_docs: int = 64) -> tuple[np.ndarray, int]:
    """Tokens of the fewest leading documents that give at least ``min_tokens`` (EOS after each), and how many
    documents that took. The held-out eval set of a stream is its head; training skips those documents."""
    parts, n_tokens, n_docs = [], 0, 0
    for batch in documents.iter(batch_size=window_docs):
        for text in batch["text"]:
            n_docs += 1
            if not text.strip():
                continue
            flat = tokenize_flat(tokenizer, [text])
            parts.append(flat)
            n_tokens += len(flat)
            if n_tokens >= min_tokens:
                return np.concatenate(parts), n_docs
    if min_tokens > 0:
        raise ValueError(f"the source has only {n_tokens} tokens, fewer than the {min_tokens} the eval set needs; "
                         "lower --max_eval_samples or use a larger source")
    return np.zeros(0, dtype=np.int64), 0


def tokenizer_and_eval_head(documents: datasets.IterableDataset, held_out: datasets.IterableDataset | None,
                            tokenizer: str | None, vocab_size: int, eval_tokens: int, sample_bytes: int,
                            cache_dir=None) -> tuple[PreTrainedTokenizerFast, np.ndarray, int, int]:
    """The tokenizer and the held-out eval tokens of a stream: ``(tokenizer, eval tokens, eval documents,
    training documents to skip)``.

    Eval is the head (:func:`take_head`) of ``held_out`` (a separate split) if given, else of ``documents``, which
    training then skips. The tokenizer is ``tokenizer`` (local directory or Hub id), else a byte-level BPE trained
    on the first ``sample_bytes`` of training documents that follow the region the eval head can occupy: eval
    needs ``eval_tokens`` tokens, and no byte-level BPE packs more than 8 bytes into a token of natural text, so
    skipping ``8 * eval_tokens`` bytes keeps eval text out of the tokenizer's training sample (checked below).
    """
    from .tokenizer import get_tokenizer, sample_texts

    sample_skip = 0
    if tokenizer is None:
        if held_out is None:
            sample_skip, seen = 0, 0
            for row in documents:
                if seen >= 8 * eval_tokens:
                    break
                sample_skip, seen = sample_skip + 1, seen + len(row["text"].encode("utf-8"))
        head = documents.skip(sample_skip) if sample_skip else documents
        sample = sample_texts((r["text"] for r in head if r["text"].strip()), sample_bytes)
        if not sample:
            raise ValueError(f"no text is left to train a tokenizer on after the {sample_skip} documents held out "
                             f"for the eval head ({eval_tokens} tokens); lower --max_eval_samples, pass --tokenizer "
                             "or --eval_split, or use a larger source")
        tok = get_tokenizer(None, sample, vocab_size, cache_dir)
    else:
        tok = get_tokenizer(tokenizer, [], vocab_size, cache_dir)
    eval_flat, eval_docs = take_head(held_out if held_out is not None else documents, tok, eval_tokens)
    if tokenizer is None and held_out is None and eval_docs > sample_skip:
        raise RuntimeError(f"the eval head ({eval_docs} documents) reaches into the tokenizer's training sample "
                           f"(from document {sample_skip}); pass --tokenizer or --eval_split")
    return tok, eval_flat, eval_docs, 0 if held_out is not None else eval_docs


class PackedStream(torch.utils.data.IterableDataset):
    """Fixed-length causal-LM blocks packed on the fly from a document stream (see the module docstring).

    ``documents`` is a ``datasets.IterableDataset`` with a ``text`` column in source order; the first
    ``skip_docs`` documents (the eval head) are never trained on. ``rank``/``world_size`` default to the
    initialised ``torch.distributed`` group at iteration time. Items are ``{"input_ids", "labels"}`` int64 tensors.
    """

    # memtrain's Trainer reads these: it must not shard this dataset across ranks again, and must not replay
    # batches on resume (memtrain/hf/trainer.py).
    splits_across_ranks = True
    resumes_itself = True

    def __init__(self, documents: datasets.IterableDataset, tokenizer: PreTrainedTokenizerFast, seq_len: int, *,
                 seed: int = 0, window_docs: int = 256, shuffle_buffer: int = 10_000, skip_docs: int = 0,
                 rank: int | None = None, world_size: int | None = None, loop: bool = True, fingerprint: str = ""):
        if seq_len < 1 or window_docs < 1 or shuffle_buffer < 0 or skip_docs < 0:
            raise ValueError(f"need seq_len >= 1, window_docs >= 1, shuffle_buffer >= 0, skip_docs >= 0; got "
                             f"{seq_len}, {window_docs}, {shuffle_buffer}, {skip_docs}")
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.seed, self.window_docs, self.shuffle_buffer, self.skip_docs = seed, window_docs, shuffle_buffer, skip_docs
        self.rank, self.world_size, self.loop, self.fingerprint = rank, world_size, loop, fingerprint
        # (epoch, window, blocks delivered before this window) per logged window; written by the workers.
        self._ledger = torch.zeros(MAX_WORKERS, LEDGER_SLOTS, 3, dtype=torch.int64).share_memory_()
        self._heads = torch.zeros(MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._start: list[list[int]] | None = None  # per worker: epoch, window, offset, blocks delivered
        self._resumed_batches = 0

    # ------------------------------------------------------------------ who am I

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    # ------------------------------------------------------------------ the stream

    def epoch_documents(self, epoch: int) -> datasets.IterableDataset:
        docs = self.documents.skip(self.skip_docs) if self.skip_docs else self.documents
        if self.shuffle_buffer > 1:
            docs = docs.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            docs.set_epoch(epoch)  # the buffer's generator is seeded with seed + epoch
        return docs

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = self._rank_world()
        worker, n_workers = self._worker()
        if n_workers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} dataloader workers per rank, got {n_workers}")
        consumer, n_consumers = rank * n_workers + worker, world * n_workers
        epoch, first_window, offset, delivered = self._start[worker] if self._start else (0, 0, 0, 0)
        self._heads[worker] = 0
        while True:
            produced_this_epoch = 0
            for window, texts in enumerate(_iter_windows(self.epoch_documents(epoch), self.window_docs)):
                if window % n_consumers != consumer or window < first_window:
                    continue
                blocks = cut_blocks(tokenize_flat(self.tokenizer, texts), self.seq_len)
                skip = offset if window == first_window else 0
                head = int(self._heads[worker])
                self._ledger[worker, head % LEDGER_SLOTS] = torch.tensor([epoch, window, delivered - skip])
                self._heads[worker] = head + 1
                produced_this_epoch += len(blocks)
                for block in blocks[skip:]:
                    ids = torch.from_numpy(np.array(block, dtype=np.int64))
                    delivered += 1
                    yield {"input_ids": ids, "labels": ids.clone()}
            if not self.loop:
                return
            if produced_this_epoch == 0:
                raise ValueError(
                    f"stream consumer {consumer} of {n_consumers} (rank {rank}, worker {worker}) got no block in a "
                    f"whole epoch: the source has too few windows of {self.window_docs} documents (or too few "
                    f"tokens per window for seq_len {self.seq_len}); use fewer dataloader workers, a smaller "
                    "--stream_window_docs, or more data")
            epoch, first_window, offset = epoch + 1, 0, 0

    # ------------------------------------------------------------------ position and resume

    def positions(self, consumed_batches: int, batch_size: int, num_workers: int) -> list[list[int]]:
        """Per worker ``[epoch, window, offset, delivered]`` of the next block after ``consumed_batches`` batches of
        this rank (the round-robin rule of the module docstring)."""
        n_workers = max(num_workers, 1)
        out = []
        for w in range(n_workers):
            delivered = (consumed_batches - w + n_workers - 1) // n_workers * batch_size if consumed_batches > w else 0
            head = int(self._heads[w])
            entries = [self._ledger[w, i % LEDGER_SLOTS].tolist() for i in range(max(0, head - LEDGER_SLOTS), head)]
            best = next((e for e in reversed(entries) if e[2] <= delivered), None)
            if best is None:
                start = self._start[w] if self._start else [0, 0, 0, 0]
                if delivered != start[3]:
                    raise RuntimeError(f"stream worker {w}: no record of the window holding block {delivered} (the "
                                       f"ledger keeps the last {LEDGER_SLOTS} windows); cannot checkpoint the position")
                out.append(list(start))
            else:
                out.append([best[0], best[1], delivered - best[2], delivered])
        return out

    def state_dict(self, consumed_batches: int, batch_size: int, num_workers: int) -> dict:
        rank, world = self._rank_world()
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "rank": rank, "world_size": world,
                "num_workers": num_workers, "batch_size": batch_size, "consumed_batches": consumed_batches,
                "positions": self.positions(consumed_batches, batch_size, num_workers)}

    def save_state(self, checkpoint_dir, consumed_batches: int, batch_size: int, num_workers: int) -> pathlib.Path:
        state = self.state_dict(consumed_batches, batch_size, num_workers)
        path = _state_file(checkpoint_dir, state["rank"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)
        return path

    def load_state(self, checkpoint_dir, batch_size: int, num_workers: int) -> None:
        """Continue from the position saved in ``checkpoint_dir`` (by :class:`.resume.StreamStateCallback`)."""
        rank, world = self._rank_world()
        path = _state_file(checkpoint_dir, rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by a streaming run, so the "
                                    "stream position is unknown; resume from a streaming run's checkpoint, or start "
                                    "a new run (or pass --ignore_data_skip to restart the stream from its beginning)")
        state = json.loads(path.read_text())
        want = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "world_size": world,
                "num_workers": num_workers, "batch_size": batch_size}
        diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"{path}: the stream cannot continue exactly, these settings differ (saved, now): {diff}; "
                             "resume with the same data, tokenizer, seq_len, seed, world size, dataloader workers "
                             "and batch size")
        self._start = [list(p) for p in state["positions"]]
        self._resumed_batches = state["consumed_batches"]

    def check_resumed(self, num_batches: int) -> None:
        """The Trainer resumes after ``num_batches`` batches: the loaded stream position must be the same point."""
        if num_batches != self._resumed_batches:
            raise RuntimeError(f"the Trainer resumes after {num_batches} batches but the stream was positioned "
                               f"after {self._resumed_batches}; call load_state(checkpoint) before train()")
