"""The cache folder's files: names, the metadata written atomically, read-only memory maps whose pages are
released after reading, and the folder's status."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..files import fsync_path, read_json_meta
from .key import TeacherCacheError

META_NAME = "cache_meta.json"
DONE_NAME = "rows_done.npy"
LOGITS_NAME = "logits"
TOPK_VALUES_NAME = "logits_topk_values"
TOPK_INDICES_NAME = "logits_topk_indices"


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)  # the rename, on disk


def read_meta(directory: Path) -> Optional[dict[str, Any]]:
    return read_json_meta(directory / META_NAME, TeacherCacheError, f"delete {directory} and rebuild the cache.")


def open_array(directory: Path, entry: dict[str, Any], mode: str) -> np.memmap:
    return load_npy(directory / entry["file"], mode)


def load_npy(path: Path, mode: str) -> np.memmap:
    """``np.load(path, mmap_mode=mode)``; a truncated or unreadable file is a :class:`TeacherCacheError`
    naming it."""
    try:
        return np.load(path, mmap_mode=mode)
    except (OSError, ValueError, EOFError) as error:
        raise TeacherCacheError(f"{path} is truncated or unreadable ({error}); delete {path.parent} and rebuild the "
                                f"cache (or pass --overwrite to scripts/cache_teacher.py).") from None


def release_pages(array: np.memmap) -> None:
    """Drops the pages of a read-only memory map from this process's resident set once their rows were
    copied out (``madvise(MADV_DONTNEED)``; they stay in the kernel's shared page cache), so that
    reading the whole cache over an epoch does not grow the process's memory. No-op where unsupported."""
    import mmap

    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


@dataclass
class CacheStatus:
    """What a cache folder holds: ``exists`` (metadata present), the stored ``key`` and how many rows
    are ``done`` out of ``num_rows``."""

    exists: bool
    key: Optional[dict] = None
    done: int = 0
    num_rows: int = 0

    @property
    def complete(self) -> bool:
        return self.exists and self.num_rows > 0 and self.done == self.num_rows


def cache_status(directory: os.PathLike | str) -> CacheStatus:
    """The :class:`CacheStatus` of ``directory`` (no key check)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta is None:
        return CacheStatus(False)
    done = load_npy(directory / DONE_NAME, "r")
    return CacheStatus(True, meta["key"], int(np.count_nonzero(done)), int(done.shape[0]))
