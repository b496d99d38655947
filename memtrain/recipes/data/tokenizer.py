"""Tokenizers: a given one (local directory or Hub id), or a byte-level BPE trained on the training text and cached
under ``<cache>/tokenizers/<key>/`` (the key hashes the texts, the vocabulary size and a format version).

For streaming sources the BPE is trained on a bounded sample of the stream's head (:func:`sample_texts`), so its
cost does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from . import hub
from .cache import file_lock, remove_stale_temps, resolve_cache_dir, sha256_of_strings

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Bump when the tokenizer training changes, so stale cached tokenizers are ignored.
TOKENIZER_FORMAT_VERSION = 1

# ------------------------------------------------------------------------- tokenizer


def _train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): every byte is in the alphabet, so there is no <unk>
    and decode(encode(text)) == text for any Unicode input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the round trip exact (no invented leading space).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() < vocab_size:
        logger.warning(
            "tokenizer vocab is %d < requested %d: the training text is too small to learn more merges",
            tok.get_vocab_size(), vocab_size,
        )
    # One special token does every job: documents are separated by EOS, padding is
    # never needed for packed blocks, and byte-level BPE never produces <unk>.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # would break the exact round trip
    )


_ACCEPTED_TOKENIZERS = "a directory written by save_pretrained, or a Hugging Face Hub model id with a fast tokenizer"


def _load_saved_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A local directory, or a Hub id (downloaded when online, from the cache when offline: ``HF_HUB_OFFLINE``)."""
    path = pathlib.Path(name).expanduser()
    if not path.exists() and not hub.looks_like_hub_id(name):
        raise FileNotFoundError(f"tokenizer {name!r} does not exist. Accepted: {_ACCEPTED_TOKENIZERS}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as e:
        if path.exists():
            raise
        raise hub.repo_error("tokenizer", name, _ACCEPTED_TOKENIZERS, e) from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"tokenizer {name} loaded as {type(tok).__name__}; a fast (tokenizer.json) tokenizer is required")
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name} has no eos_token; it is needed to separate documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def get_tokenizer(tokenizer: str | None, train_texts: list[str], vocab_size: int, cache_dir=None) -> PreTrainedTokenizerFast:
    """A saved tokenizer if ``tokenizer`` is given (local path or Hub id), else a byte-level BPE trained on
    ``train_texts`` (cached under ``cache_dir/tokenizers/<key>/``; the key hashes the
    texts, ``vocab_size`` and a format version, so the same inputs reuse the same files)."""
    if tokenizer is not None:
        return _load_saved_tokenizer(tokenizer)
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    cache_dir = resolve_cache_dir(cache_dir)
    key = sha256_of_strings(
        [f"bpe-v{TOKENIZER_FORMAT_VERSION}", str(vocab_size), *(hashlib.sha256(t.encode()).hexdigest() for t in train_texts)]
    )[:20]
    target = cache_dir / "tokenizers" / key
    if not (target / "tokenizer.json").is_file():
        with file_lock(cache_dir, f"tokenizer-{key}"):
            if not (target / "tokenizer.json").is_file():
                logger.info("training tokenizer: byte-level BPE, vocab %d, %d documents", vocab_size, len(train_texts))
                target.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(target.parent, f".tmp-{key}-*")
                with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".tmp-{key}-") as tmp:
                    staged = pathlib.Path(tmp) / key
                    _train_bpe_tokenizer(train_texts, vocab_size).save_pretrained(str(staged))
                    os.rename(staged, target)
    # Always load from disk, so a fresh and a cached call return identical objects.
    return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Identity of a tokenizer for cache keys: its full serialized pipeline + EOS id."""
    return sha256_of_strings([tok.backend_tokenizer.to_str(), str(tok.eos_token_id)])


def sample_texts(texts: Iterable[str], max_bytes: int) -> list[str]:
    """The first texts of a stream up to ``max_bytes`` of UTF-8 (at least one text): the bounded sample a
    tokenizer for a streaming source is trained on."""
    out, total = [], 0
    for text in texts:
        if out and total + len(text.encode("utf-8")) > max_bytes:
            break
        out.append(text)
        total += len(text.encode("utf-8"))
    return out
