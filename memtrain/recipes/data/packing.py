"""Tokenize documents and pack them into fixed-length causal-LM blocks: one EOS after every document marks the
boundary once documents are concatenated, and the token stream is cut into ``seq_len`` blocks with no padding.
The same rule serves the in-memory datasets (:func:`_build_split`, on Arrow data), the streaming blocks and the
token shards (:func:`tokenize_flat` / :func:`cut_blocks`, on numpy).
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast



def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    # No BOS/post-processor tokens; one EOS after every document marks the boundary
    # once documents are concatenated. verbose=False: whole documents are longer than
    # model_max_length by design (they are cut into blocks afterwards).
    ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return {"input_ids": [x + [eos] for x in ids]}


def _pack_table(table: pa.Table, seq_len: int) -> pa.Table:
    """Concatenate all token lists and cut them into seq_len blocks, dropping the remainder.

    Runs on Arrow data (no Python ints), so packing costs a few memcpys even for large
    corpora. It must see the whole split in one batch: packing per batch would drop a
    remainder per batch and break the "floor(total / seq_len) blocks" guarantee.
    """
    # int32 list offsets cap a split at 2**31 tokens; pyarrow raises (not wraps) beyond.
    flat = pc.list_flatten(table.column("input_ids")).combine_chunks()
    n_blocks = len(flat) // seq_len
    offsets = pa.array(range(0, (n_blocks + 1) * seq_len, seq_len), type=pa.int32())
    blocks = pa.ListArray.from_arrays(offsets, flat.slice(0, n_blocks * seq_len))
    # Causal-LM models shift labels internally, so labels are just a copy.
    return pa.table({"input_ids": blocks, "labels": blocks})


_TOKENS_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
_BLOCK_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32"))}
)


def _build_split(docs: list[tuple[str, str]], split: str, tokenizer, seq_len: int, out_dir: pathlib.Path, key: str, num_proc):
    """docs -> tokenized (cached) -> packed blocks (cached). Files: out_dir/<split>-*.arrow.

    ``key`` identifies the documents and the tokenizer; seq_len only enters the name of
    the blocks file, so trying another seq_len re-packs without re-tokenizing.
    """
    ds = datasets.Dataset.from_dict({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs]})
    tokens = ds.map(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer},
        batched=True,
        remove_columns=["doc_id", "text"],
        features=_TOKENS_FEATURES,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > 1 else None,
        # Explicit file name + fingerprint: our key already covers every input, and it
        # spares datasets from hashing the tokenizer object (slow, sometimes unstable).
        cache_file_name=str(out_dir / f"{split}-tokens.arrow"),
        new_fingerprint=f"{key}-{split}-tokens",
        load_from_cache_file=True,
        desc=f"tokenizing {split}",
    )
    blocks = tokens.with_format("arrow").map(
        _pack_table,
        fn_kwargs={"seq_len": seq_len},
        batched=True,
        batch_size=None,  # whole split at once, see _pack_table
        features=_BLOCK_FEATURES,
        cache_file_name=str(out_dir / f"{split}-blocks-{seq_len}.arrow"),
        new_fingerprint=f"{key}-{split}-blocks-{seq_len}",
        load_from_cache_file=True,
        desc=f"packing {split} into {seq_len}-token blocks",
    )
    return blocks.with_format(None)


def tokenize_flat(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], dtype=np.int64) -> np.ndarray:
    """The token ids of ``texts``, each followed by EOS, concatenated (what :func:`_tokenize_batch` produces)."""
    if not texts:
        return np.zeros(0, dtype=dtype)
    ids = _tokenize_batch({"text": list(texts)}, tokenizer)["input_ids"]
    return np.fromiter((t for x in ids for t in x), dtype=dtype, count=sum(map(len, ids)))


def cut_blocks(flat: np.ndarray, seq_len: int) -> np.ndarray:
    """``[n_blocks, seq_len]`` view of a flat token array; the remainder (< seq_len tokens) is dropped."""
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)
