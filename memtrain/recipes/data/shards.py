"""Pre-tokenized token shards: ``memtrain prepare-data`` tokenizes a corpus once; pretraining then reads fixed-length
blocks straight from memory-mapped files, with no Python work per document (docs/data.md).

Layout of a shards directory::

    index.json                 format, dtype, EOS id, vocab size, tokenizer fingerprint, per-split files and counts
    tokenizer/                 the tokenizer the tokens were made with (save_pretrained)
    train-00000.bin, ...       token ids, native byte order, uint16 when the vocabulary fits (< 65536) else uint32
    eval-00000.bin             the held-out split (a separate source split, or the source's head)

Each split is one token stream (documents in source order, EOS after each) cut into files of at most
``shard_tokens`` tokens; block ``i`` of a split is tokens ``[i * seq_len, (i + 1) * seq_len)`` of the stream, so any
``seq_len`` can read the same shards. :class:`TokenBlocks` is a map-style dataset: the HF Trainer's seeded sampler
gives a deterministic order per seed, accelerate splits it across ranks, and a resumed run skips sampler indices
without reading data.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import torch

from .documents import open_document_stream
from .packing import tokenize_flat

logger = logging.getLogger(__name__)

FORMAT = "memtrain-token-shards"
FORMAT_VERSION = 1
INDEX = "index.json"


def is_shards_dir(path) -> bool:
    index = pathlib.Path(path).expanduser() / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class _SplitWriter:
    """Appends token arrays to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, out_dir: pathlib.Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.documents = 0
        self._fh = None

    def write(self, flat: np.ndarray, n_docs: int) -> None:
        self.documents += n_docs
        flat = flat.astype(self.dtype, copy=False)
        while len(flat):
            if self._fh is None or self.files[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["tokens"]
            part, flat = flat[:room], flat[room:]
            self._fh.write(part.tobytes())
            self.files[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self._fh = open(self.out_dir / name, "wb")
        self.files.append({"name": name, "tokens": 0})

    def close(self) -> dict:
        if self._fh is not None:
            self._fh.close()
        return {"files": self.files, "tokens": sum(f["tokens"] for f in self.files), "documents": self.documents}


def prepare_data(dataset: str, out_dir, *, tokenizer: str | None = None, vocab_size: int = 32000,
                 text_column: str = "text", split: str = "train", eval_split: str | None = None,
                 eval_tokens: int = 1 << 20, max_train_tokens: int | None = None, shard_tokens: int = 1 << 30,
                 tokenizer_sample_bytes: int = 64 << 20, batch_docs: int = 1024, cache_dir=None) -> dict:
    """Tokenize ``dataset`` into a shards directory at ``out_dir`` and return its index.

    The tokenizer is ``tokenizer`` (a local directory or Hub id) or a byte-level BPE of ``vocab_size`` trained on
    the first ``tokenizer_sample_bytes`` of the training documents. The eval split is ``eval_split`` of the source
    (its first ``eval_tokens`` tokens' worth of documents), else the source's head: the fewest leading documents
    with at least ``eval_tokens`` tokens, which the train split then skips. ``max_train_tokens`` stops early.
    """
    from .streaming import tokenizer_and_eval_head

    out_dir = pathlib.Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --output_dir")
    documents = open_document_stream(dataset, text_column, split, cache_dir)
    held_out = open_document_stream(dataset, text_column, eval_split, cache_dir) if eval_split else None
    tok, eval_flat, head_docs, skip = tokenizer_and_eval_head(
        documents, held_out, tokenizer, vocab_size, eval_tokens, tokenizer_sample_bytes, cache_dir)
    dtype = token_dtype(len(tok))

    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        index = _write_shards(staging, documents, skip, tok, eval_flat, head_docs, dtype, shard_tokens, batch_docs,
                              max_train_tokens)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted run leaves nothing behind
        raise
    index["source"] = {"dataset": dataset, "text_column": text_column, "split": split, "eval_split": eval_split,
                       "eval_head_documents": 0 if eval_split else head_docs}
    (staging / INDEX).write_text(json.dumps(index, indent=1))  # written last: a directory with it is complete
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        out_dir.rmdir()
    os.rename(staging, out_dir)
    logger.info("wrote %s: train %d tokens, eval %d tokens, %s", out_dir, index["splits"]["train"]["tokens"],
                index["splits"]["eval"]["tokens"], dtype.name)
    return index


def _write_shards(staging, documents, skip, tok, eval_flat, head_docs, dtype, shard_tokens, batch_docs,
                  max_train_tokens) -> dict:
    from .tokenizer import tokenizer_fingerprint

    evals = _SplitWriter(staging, "eval", dtype, shard_tokens)
    evals.write(eval_flat, head_docs)
    train = _SplitWriter(staging, "train", dtype, shard_tokens)
    written = 0
    for batch in (documents.skip(skip) if skip else documents).iter(batch_size=batch_docs):
        flat = tokenize_flat(tok, [t for t in batch["text"] if t.strip()])
        if max_train_tokens is not None:
            flat = flat[: max_train_tokens - written]
        train.write(flat, len(batch["text"]))
        written += len(flat)
        if max_train_tokens is not None and written >= max_train_tokens:
            break
    tok.save_pretrained(str(staging / "tokenizer"))
    return {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "eos_token_id": tok.eos_token_id,
            "vocab_size": len(tok), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "splits": {"train": train.close(), "eval": evals.close()}}


def load_index(path) -> dict:
    path = pathlib.Path(path).expanduser()
    if not is_shards_dir(path):
        raise ValueError(f"{path} is not a token-shards directory (no {INDEX} of format {FORMAT}); "
                         "write one with `memtrain prepare-data`")
    index = json.loads((path / INDEX).read_text())
    if index["version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: shards format version {index['version']}, this memtrain reads {FORMAT_VERSION}; "
                         "re-run `memtrain prepare-data`")
    return index


class TokenBlocks(torch.utils.data.Dataset):
    """Block ``i`` of a split is tokens ``[i * seq_len, (i + 1) * seq_len)`` of its token stream, read from
    ``np.memmap`` views (opened lazily in each process, so dataloader workers open their own)."""

    def __init__(self, path, split: str, seq_len: int, limit: int | None = None):
        self.path, self.split, self.seq_len = pathlib.Path(path).expanduser(), split, seq_len
        index = load_index(self.path)
        if split not in index["splits"]:
            raise ValueError(f"{path} has no split {split!r} (it has {sorted(index['splits'])})")
        self.dtype = np.dtype(index["dtype"])
        self.files = index["splits"][split]["files"]
        for f in self.files:
            size = (self.path / f["name"]).stat().st_size
            if size != f["tokens"] * self.dtype.itemsize:
                raise ValueError(f"{self.path / f['name']}: {size} bytes, the index says {f['tokens']} {self.dtype} "
                                 "tokens; the shards are damaged, re-run `memtrain prepare-data`")
        self.starts = np.cumsum([0] + [f["tokens"] for f in self.files])
        total = int(self.starts[-1]) // seq_len
        self.n_blocks = total if limit is None else min(limit, total)
        self._maps = None

    def __len__(self) -> int:
        return self.n_blocks

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}  # memmaps are reopened in the receiving process

    def tokens(self, start: int, stop: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(self.path / f["name"], dtype=self.dtype, mode="r") for f in self.files]
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.starts[first])
            hi = min(stop, int(self.starts[first + 1])) - int(self.starts[first])
            parts.append(self._maps[first][lo:hi])
            start += hi - lo
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} of {self.n_blocks}")
        ids = torch.from_numpy(self.tokens(i * self.seq_len, (i + 1) * self.seq_len).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv=None) -> int:
    """``memtrain prepare-data DATASET --output_dir DIR [...]`` (and ``scripts/prepare_data.py``)."""
    p = argparse.ArgumentParser(prog="memtrain prepare-data", description=main.__doc__ + "\n\n" + __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="any --dataset input of memtrain pretrain: 'shakespeare', local .txt/.jsonl/"
                                   ".parquet files or directories, or a Hub id NAME[:CONFIG]")
    p.add_argument("--output_dir", required=True, help="new directory for the shards")
    p.add_argument("--tokenizer", help="local tokenizer directory or Hub id; default: train a byte-level BPE")
    p.add_argument("--vocab_size", type=int, default=32000, help="vocabulary of the trained BPE (default 32000)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--split", default="train", help="source split to train on (Hub datasets)")
    p.add_argument("--eval_split", help="source split for eval (e.g. validation); default: the source's head")
    p.add_argument("--eval_tokens", type=int, default=1 << 20, help="tokens held out for eval (default 2**20)")
    p.add_argument("--max_train_tokens", type=int, help="stop after this many training tokens")
    p.add_argument("--shard_tokens", type=int, default=1 << 30, help="tokens per .bin file (default 2**30)")
    p.add_argument("--tokenizer_sample_bytes", type=int, default=64 << 20,
                   help="bytes of the training head the BPE is trained on (default 64 MiB)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index = prepare_data(a.dataset, a.output_dir, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                         text_column=a.text_column, split=a.split, eval_split=a.eval_split, eval_tokens=a.eval_tokens,
                         max_train_tokens=a.max_train_tokens, shard_tokens=a.shard_tokens,
                         tokenizer_sample_bytes=a.tokenizer_sample_bytes)
    train, evals = index["splits"]["train"], index["splits"]["eval"]
    print(f"{a.output_dir}: train {train['tokens']} tokens from {train['documents']} documents, eval "
          f"{evals['tokens']} tokens from {evals['documents']} documents; {index['dtype']}, vocab {index['vocab_size']}")
    return 0
