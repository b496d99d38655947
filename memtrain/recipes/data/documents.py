"""Documents: every accepted ``--dataset`` input read as ``[(doc_id, text)]`` (:func:`load_documents`) or as a
stream of texts (:func:`open_document_stream`), and the deterministic train/validation split by document.

Hub datasets (``NAME`` or ``NAME:CONFIG``) load through ``datasets.load_dataset``, which follows the Hub libraries'
own offline switches (:mod:`.hub`): online they are downloaded (or streamed), offline they come from the cache.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Sequence

import datasets

from . import hub
from .corpus import EMBEDDED_DATASET, ensure_embedded_corpus

Document = tuple[str, str]  # (doc_id, text)

_ACCEPTED_INPUTS = (
    f"'{EMBEDDED_DATASET}' (the embedded corpus), a local .txt or .jsonl file, "
    "a directory of .txt/.jsonl files, a .parquet file or a directory of them, a directory written by datasets' "
    "save_to_disk, or a Hugging Face Hub dataset id NAME or NAME:CONFIG (downloaded or streamed when online, "
    "read from the local datasets cache when offline)"
)



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


def _hub_dataset(name: str, **kwargs):
    """``NAME`` or ``NAME:CONFIG`` through ``datasets.load_dataset`` (Hub when online, cache when offline)."""
    path, _, config = name.partition(":")
    try:
        return datasets.load_dataset(path, config or None, **kwargs)
    except Exception as e:  # datasets raises many types here; all mean "not usable"
        raise hub.dataset_error(name, _ACCEPTED_INPUTS, e) from e


def _looks_like_path(s: str) -> bool:
    # Hub ids are "name" or "owner/name" (optionally ":CONFIG"); anything else was meant as a missing path.
    return not hub.looks_like_hub_id(s.partition(":")[0])


def _parquet_files(path: pathlib.Path) -> list[str]:
    """The .parquet file itself, or the .parquet files of a directory that holds no .txt/.jsonl."""
    if path.is_file():
        return [str(path)] if path.suffix == ".parquet" else []
    if not path.is_dir() or _is_saved_hf_dataset(path):
        return []
    files = sorted(p for p in path.rglob("*") if p.is_file())
    parquet = [str(p) for p in files if p.suffix == ".parquet"]
    return parquet if parquet and not any(p.suffix in (".txt", ".jsonl") for p in files) else []


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
    - a ``.parquet`` file or a directory holding only ``.parquet`` files: one document per row
      (doc_id = ``"train:<row>"``).
    - otherwise a Hub id ``NAME`` or ``NAME:CONFIG`` loaded with ``datasets.load_dataset``: downloaded when
      online, read from the local datasets cache when offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``).

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
        elif _parquet_files(path):
            parquet = datasets.load_dataset("parquet", data_files=_parquet_files(path), split="train")
            docs = _documents_from_hf(parquet, str(path), text_column)
        elif path.is_dir() and _is_saved_hf_dataset(path):
            docs = _documents_from_hf(datasets.load_from_disk(str(path)), str(path), text_column)
        elif path.is_dir():
            docs = _documents_from_text_dir(path, text_column)
            if not docs:
                raise ValueError(f"directory {path} contains no .txt or .jsonl files. Accepted: {_ACCEPTED_INPUTS}")
        elif path.exists():
            raise ValueError(f"unsupported dataset file {path} (need .txt, .jsonl or .parquet). Accepted: {_ACCEPTED_INPUTS}")
        elif _looks_like_path(dataset):
            raise FileNotFoundError(f"dataset path {dataset!r} does not exist. Accepted: {_ACCEPTED_INPUTS}")
        else:
            docs = _documents_from_hf(_hub_dataset(dataset), dataset, text_column)

    docs = sorted((doc_id, text) for doc_id, text in docs if text.strip())
    if not docs:
        raise ValueError(f"dataset {dataset!r} contains no non-empty documents")
    return docs



def _stream_files(path: pathlib.Path) -> tuple[str, list[str]] | None:
    """(``datasets`` builder, files) when ``path`` is a .jsonl/.parquet file or a directory of only one of the
    two; these stream from disk. Other local inputs are small enough to read whole (:func:`load_documents`)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir() and _is_saved_hf_dataset(path):
        return None
    kinds = {p.suffix for p in files if p.suffix in (".txt", ".jsonl", ".parquet")}
    if kinds == {".jsonl"}:
        return "json", [str(p) for p in files if p.suffix == ".jsonl"]
    if kinds == {".parquet"}:
        return "parquet", [str(p) for p in files if p.suffix == ".parquet"]
    return None


def source_bytes(dataset: str) -> int | None:
    """Size on disk of a local source, None for a Hub id (the automatic streaming choice uses it)."""
    path = pathlib.Path(dataset).expanduser()
    if dataset == EMBEDDED_DATASET or not path.exists():
        return None
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def open_document_stream(dataset: str = EMBEDDED_DATASET, text_column: str = "text", split: str = "train",
                         cache_dir=None) -> datasets.IterableDataset:
    """The documents of ``dataset`` as a ``datasets.IterableDataset`` with the one column ``text``, in source order.

    Local .jsonl/.parquet files (or directories of them) and Hub ids stream through
    ``datasets.load_dataset(..., streaming=True)`` (the same code path for both; a Hub id's ``split`` picks the
    split, local files have only ``train``). Every other input is read whole by :func:`load_documents` (those
    inputs are small: the embedded corpus, .txt files, ``save_to_disk`` directories) and then streamed.
    """
    path = pathlib.Path(dataset).expanduser()
    if dataset != EMBEDDED_DATASET and path.exists() and _stream_files(path) is not None:
        builder, files = _stream_files(path)
        if split != "train":
            raise ValueError(f"local files {dataset!r} have only the split 'train', not {split!r}")
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    elif dataset == EMBEDDED_DATASET or path.exists() or _looks_like_path(dataset):
        if split != "train":
            raise ValueError(f"dataset {dataset!r} has only the split 'train', not {split!r}")
        docs = load_documents(dataset, cache_dir, text_column)
        return datasets.Dataset.from_dict({"text": [t for _, t in docs]}).to_iterable_dataset()
    else:
        ds = _hub_dataset(dataset, split=split, streaming=True)
    if ds.column_names is not None and text_column not in ds.column_names:
        raise ValueError(f"{dataset}: no column {text_column!r} (columns: {ds.column_names}); "
                         "choose one with --text_column")
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


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
