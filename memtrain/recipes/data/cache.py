"""The cache directory memtrain keeps derived data in, and the primitives every cache writer uses: an
inter-process file lock, stale-temp cleanup, and an unambiguous content hash for cache keys.

All cache writes are atomic (build in a temporary place next to the target, then rename) and serialised by a file
lock, so a killed run never leaves a half-written entry and several processes (torchrun ranks, pytest-xdist
workers) can start cold at the same time.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
from typing import Iterable, Iterator


def default_cache_dir() -> pathlib.Path:
    """$MEMTRAIN_CACHE if set, else $XDG_CACHE_HOME/memtrain, else ~/.cache/memtrain."""
    if os.environ.get("MEMTRAIN_CACHE"):
        return pathlib.Path(os.environ["MEMTRAIN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "memtrain"
    return pathlib.Path.home() / ".cache" / "memtrain"


def resolve_cache_dir(cache_dir) -> pathlib.Path:
    return pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextlib.contextmanager
def file_lock(cache_dir: pathlib.Path, name: str) -> Iterator[None]:
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


def remove_stale_temps(parent: pathlib.Path, pattern: str) -> None:
    """Delete temp files/dirs left by a run that was killed mid-write.

    Only call this while holding the lock that guards ``pattern``: then nobody else
    can be writing those temps right now.
    """
    for p in parent.glob(pattern):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def sha256_of_strings(parts: Iterable[str]) -> str:
    """Hash a sequence of strings unambiguously (each part is length-prefixed)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
