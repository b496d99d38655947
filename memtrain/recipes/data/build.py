"""The driver of the data pipeline: :func:`build_lm_data` turns a ``--dataset`` into training and eval blocks, in
memory (small corpora; ``load_documents -> split_documents -> get_tokenizer -> tokenize -> pack``, cached), as a
stream (large or remote corpora, :mod:`.streaming`) or from pre-tokenized shards (:mod:`.shards`).
"""
from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerFast

from . import hub, packing
from .cache import file_lock, remove_stale_temps, resolve_cache_dir, sha256_of_strings
from .corpus import EMBEDDED_DATASET
from .documents import load_documents, open_document_stream, source_bytes, split_documents
from .shards import TokenBlocks, is_shards_dir, load_index
from .streaming import PackedStream, tokenizer_and_eval_head
from .tokenizer import get_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Bump when the on-disk format of the in-memory pipeline's cache or its processing changes.
DATASET_FORMAT_VERSION = 1
# --streaming auto streams local sources larger than this (reading them whole would need several times their
# size in memory) and Hub datasets while online (loading them whole downloads the full dataset first).
AUTO_STREAMING_BYTES = 1 << 30


def resolve_streaming(streaming, dataset: str) -> bool:
    """``--streaming`` true/false, or ``auto``/None: see :data:`AUTO_STREAMING_BYTES`."""
    if isinstance(streaming, bool):
        return streaming
    value = str(streaming).lower() if streaming is not None else "auto"
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    if value != "auto":
        raise ValueError(f"--streaming must be true, false or auto, got {streaming!r}")
    size = source_bytes(dataset)
    if size is not None:
        return size > AUTO_STREAMING_BYTES
    return dataset != EMBEDDED_DATASET and hub.looks_like_hub_id(dataset.partition(":")[0]) \
        and not hub.datasets_offline()


@dataclass
class LMData:
    """Training and eval blocks (``input_ids`` and ``labels == input_ids``, seq_len tokens each) and the tokenizer.

    ``mode`` says where ``train`` comes from: ``"memory"`` (a ``datasets.Dataset`` of packed blocks), ``"stream"``
    (a :class:`PackedStream`, unbounded: ``max_steps`` ends training) or ``"shards"`` (a :class:`TokenBlocks` over
    memory-mapped token shards). ``train_docs`` is None where it is not known without reading the whole source.
    """

    train: datasets.Dataset | torch.utils.data.Dataset | torch.utils.data.IterableDataset
    eval: datasets.Dataset | torch.utils.data.Dataset
    tokenizer: PreTrainedTokenizerFast
    train_docs: int | None
    eval_docs: int | None
    mode: str = "memory"

    def summary(self) -> str:
        def part(name: str, ds, n_docs) -> str:
            if isinstance(ds, torch.utils.data.IterableDataset):
                return f"{name}: streamed from the source ({ds.seq_len}-token blocks, windows of {ds.window_docs} docs)"
            seq_len = len(ds[0]["input_ids"]) if len(ds) else 0
            docs = f"{n_docs} docs, " if n_docs is not None else ""
            return f"{name}: {docs}{len(ds)} blocks, {len(ds) * seq_len} tokens"

        return f"{part('train', self.train, self.train_docs)} | {part('eval', self.eval, self.eval_docs)} | vocab {len(self.tokenizer)}"


def build_lm_data(
    dataset: str = EMBEDDED_DATASET,
    tokenizer: str | None = None,
    seq_len: int = 128,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir=None,
    num_proc: int | None = None,
    text_column: str = "text",
    *,
    streaming: bool | str = False,
    seed: int = 0,
    eval_split: str | None = None,
    window_docs: int = 256,
    shuffle_buffer: int = 10_000,
    tokenizer_sample_bytes: int = 64 << 20,
    rank: int | None = None,
    world_size: int | None = None,
) -> LMData:
    """Load, split, tokenize and pack a corpus into fixed-length causal-LM blocks.

    A directory written by ``memtrain prepare-data`` is read from its shards (:func:`_shards_data`); with
    ``streaming`` true (or ``"auto"`` and a large or remote source, :func:`resolve_streaming`) the corpus is
    streamed (:func:`_stream_data`). Otherwise, in memory:

    The tokenizer is trained on the training documents only (no validation leakage).
    Train and eval are packed separately, so no block spans the split boundary. The
    tokenized and packed datasets are cached under ``cache_dir/datasets/<key>/``, where
    the key hashes the documents, the tokenizer and a format version (seq_len is in the
    file name of the packed blocks).
    ``max_*_samples`` keep the first N blocks.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    cache_dir = resolve_cache_dir(cache_dir)
    if is_shards_dir(dataset):
        return _shards_data(dataset, tokenizer, seq_len, max_train_samples, max_eval_samples)
    if resolve_streaming(streaming, dataset):
        if max_train_samples is not None:
            raise ValueError("a stream has no fixed number of training blocks: drop --max_train_samples and let "
                             "--max_steps end training (or prepare shards with `memtrain prepare-data`)")
        return _stream_data(dataset, tokenizer, seq_len, vocab_size, max_eval_samples or STREAM_EVAL_BLOCKS,
                            cache_dir, text_column, seed, eval_split, window_docs, shuffle_buffer,
                            tokenizer_sample_bytes, rank, world_size)
    if eval_split is not None:
        raise ValueError("--eval_split applies to streamed sources only (in memory, eval is a split by document "
                         "with --val_fraction); pass --streaming true")
    train_docs, eval_docs = split_documents(load_documents(dataset, cache_dir, text_column), val_fraction)
    tok = get_tokenizer(tokenizer, [t for _, t in train_docs], vocab_size, cache_dir)

    key = sha256_of_strings(
        [
            f"lm-data-v{DATASET_FORMAT_VERSION}",
            tokenizer_fingerprint(tok),
            *(p for doc in train_docs for p in doc),
            "--validation--",
            *(p for doc in eval_docs for p in doc),
        ]
    )[:20]
    out_dir = cache_dir / "datasets" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    # datasets writes each cache file to a temp name and renames it when complete; the
    # lock additionally stops two cold processes from both doing the work.
    with file_lock(cache_dir, f"datasets-{key}"):
        remove_stale_temps(out_dir, "tmp*")  # datasets' partial map outputs (NamedTemporaryFile names)
        train = packing._build_split(train_docs, "train", tok, seq_len, out_dir, key, num_proc)
        # split_documents guarantees at least one validation document.
        eval_ = packing._build_split(eval_docs, "eval", tok, seq_len, out_dir, key, num_proc)

    if len(train) == 0:
        raise ValueError(f"training split of {dataset!r} has fewer than seq_len={seq_len} tokens; use a smaller --seq-len or more data")
    if len(eval_) == 0:
        logger.warning("validation split of %r has fewer than seq_len=%d tokens: eval set is empty", dataset, seq_len)
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        eval_ = eval_.select(range(min(max_eval_samples, len(eval_))))

    data = LMData(train=train, eval=eval_, tokenizer=tok, train_docs=len(train_docs), eval_docs=len(eval_docs))
    logger.info("%s", data.summary())
    return data

# Eval blocks of a streamed source when --max_eval_samples is not given.
STREAM_EVAL_BLOCKS = 64


def _stream_data(dataset, tokenizer, seq_len, vocab_size, eval_blocks, cache_dir, text_column, seed, eval_split,
                 window_docs, shuffle_buffer, tokenizer_sample_bytes, rank, world_size) -> LMData:
    """A :class:`PackedStream` for training and a fixed in-memory eval set from a separate split or the head."""
    documents = open_document_stream(dataset, text_column, "train", cache_dir)
    held_out = open_document_stream(dataset, text_column, eval_split, cache_dir) if eval_split else None
    tok, eval_flat, eval_docs, skip = tokenizer_and_eval_head(
        documents, held_out, tokenizer, vocab_size, eval_blocks * seq_len, tokenizer_sample_bytes, cache_dir)
    blocks = packing.cut_blocks(eval_flat, seq_len)[:eval_blocks].tolist()
    eval_ = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}, features=packing._BLOCK_FEATURES)
    fingerprint = sha256_of_strings(["stream-v1", dataset, text_column, eval_split or "", tokenizer_fingerprint(tok),
                                     *map(str, (seq_len, window_docs, shuffle_buffer, seed, skip))])
    train = PackedStream(documents, tok, seq_len, seed=seed, window_docs=window_docs, shuffle_buffer=shuffle_buffer,
                         skip_docs=skip, rank=rank, world_size=world_size, fingerprint=fingerprint)
    data = LMData(train=train, eval=eval_, tokenizer=tok, train_docs=None, eval_docs=eval_docs, mode="stream")
    logger.info("%s", data.summary())
    return data


def _shards_data(path, tokenizer, seq_len, max_train_samples, max_eval_samples) -> LMData:
    """Blocks of a ``memtrain prepare-data`` directory, with the tokenizer saved there."""
    index = load_index(path)
    tok = get_tokenizer(str(pathlib.Path(path).expanduser() / "tokenizer"), [], 0)
    if tokenizer is not None and tokenizer_fingerprint(get_tokenizer(tokenizer, [], 0)) != index["tokenizer_fingerprint"]:
        raise ValueError(f"--tokenizer {tokenizer} is not the tokenizer the shards in {path} were made with; drop "
                         "--tokenizer (the shards carry theirs) or re-run `memtrain prepare-data` with it")
    train = TokenBlocks(path, "train", seq_len, limit=max_train_samples)
    held_out = TokenBlocks(path, "eval", seq_len, limit=max_eval_samples)
    # The eval set is small and evaluated whole: hold it as a datasets.Dataset like the other modes.
    blocks = held_out.tokens(0, len(held_out) * seq_len).reshape(-1, seq_len).tolist() if len(held_out) else []
    eval_ = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}, features=packing._BLOCK_FEATURES)
    if len(train) == 0:
        raise ValueError(f"{path}: the train split has fewer than seq_len={seq_len} tokens")
    data = LMData(train=train, eval=eval_, tokenizer=tok, train_docs=index["splits"]["train"]["documents"],
                  eval_docs=index["splits"]["eval"]["documents"], mode="shards")
    logger.info("%s", data.summary())
    return data
