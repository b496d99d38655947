"""Hugging Face Hub ids for datasets, tokenizers and models: online they are downloaded (or streamed), offline they
come from the local cache. memtrain never decides which: ``huggingface_hub`` and ``datasets`` read the switches
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` themselves, and memtrain neither sets nor patches them. It only reads
what the libraries decided, to say in an error which cache was searched and which switch applies.
"""
from __future__ import annotations

import re

import datasets

# "name" or "owner/name" (Hub repo ids); anything else was meant as a local path.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".bin", ".arrow")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID_RE.match(name)) and not name.endswith(_FILE_SUFFIXES)


def hub_offline() -> bool:
    """Whether ``huggingface_hub`` is in offline mode (it read ``HF_HUB_OFFLINE`` when it was imported)."""
    import huggingface_hub.constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def datasets_offline() -> bool:
    """Whether ``datasets`` is in offline mode (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    return bool(datasets.config.HF_DATASETS_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _unreachable(kind: str, name: str, cache: str, offline: bool, switch: str, accepted: str, err: Exception) -> str:
    if offline:
        mode = f"offline mode is on ({switch}), so only the local cache {cache} was searched and it is not there"
        fix = f"run once online (unset {switch}) to download it, or pass a local path"
    else:
        mode = (f"online, the Hub did not serve it (no such id, no access, or no network) and the local cache "
                f"{cache} does not hold it")
        fix = f"check the id, log in for gated repos, or set {switch} to use the cache only"
    return f"{kind} {name!r} is not a local path and could not be loaded as a Hugging Face Hub id: {mode}. " \
           f"Fix: {fix}. Accepted: {accepted}. Loader said: {type(err).__name__}: {err}"


def dataset_error(name: str, accepted: str, err: Exception) -> ValueError:
    switch = "HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1"
    return ValueError(_unreachable("dataset", name, str(datasets.config.HF_DATASETS_CACHE), datasets_offline(),
                                   switch, accepted, err))


def repo_error(kind: str, name: str, accepted: str, err: Exception) -> OSError:
    """For tokenizers and models (``from_pretrained``): they live in the ``huggingface_hub`` cache."""
    import huggingface_hub.constants as hub_constants

    return OSError(_unreachable(kind, name, str(hub_constants.HF_HUB_CACHE), hub_offline(), "HF_HUB_OFFLINE=1",
                                accepted, err))
