"""File helpers: cache metadata, dataset fingerprints, durable writes (data on disk before the name that commits it).

Durability: a write that must survive a power loss or a node crash is ``fsync``-ed before the file that commits it
(a checkpoint's manifest, a results file, a cache's metadata) is renamed into place, and the folder is ``fsync``-ed
after the rename, so a committed name never points at data still in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import TeacherCacheError


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_meta(path: Path, error: Callable[[str], Exception], remedy: str) -> Optional[dict[str, Any]]:
    """The JSON content of a cache's metadata file ``path``, or ``None`` when there is none (not a cache,
    or not yet one). An unreadable or unparsable file raises ``error("<path> is unreadable (<why>); <remedy>")``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as reason:
        raise error(f"{path} is unreadable ({reason}); {remedy}") from None


def fsync_path(path: os.PathLike | str) -> None:
    """``fsync`` of a file's data, or of a folder's entries (names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durably(path: os.PathLike | str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file that is ``fsync``-ed, renamed into place, then the folder
    ``fsync``-ed: after a crash ``path`` holds the old content or the new one, on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def dataset_fingerprint(dataset, image_column: str = "image") -> dict[str, Any]:
    """``{"num_examples", "sha256"}`` of a ``datasets.Dataset``'s images, in row order: each image's
    bytes (read from its file when the dataset stores a path, else the stored bytes). Labels do not
    enter (the teacher never sees them). Reads the raw storage: no image is decoded."""
    digest = hashlib.sha256()
    column = dataset.with_format("arrow").select_columns([image_column])
    num = len(dataset)
    for start in range(0, num, 256):
        chunk = column[start:start + 256].column(image_column).to_pylist()
        for item in chunk:
            data = item.get("bytes") if isinstance(item, dict) else None
            path = item.get("path") if isinstance(item, dict) else None
            if data is None and path is not None:
                with open(path, "rb") as handle:
                    data = handle.read()
            if data is None:
                raise TeacherCacheError(f"dataset row without image bytes or path: {item!r:.80}")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return {"num_examples": num, "sha256": digest.hexdigest()}


def format_bytes(num: int) -> str:
    """``num`` bytes in binary units, three significant digits: ``"41.3 GiB"``, ``"512 MiB"``, ``"100 B"``."""
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(num)} B"
    return f"{value:.3g} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def free_space(directory: os.PathLike | str) -> int:
    """Free bytes (for this user) of the file system ``directory`` will be on: ``shutil.disk_usage`` of the
    folder, or of its nearest existing parent while it does not exist yet."""
    path = Path(directory).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)
