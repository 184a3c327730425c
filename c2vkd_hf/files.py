"""File helpers: reading a cache folder's metadata, and durable writes (data on disk before the name that commits it).

Durability: a write that must survive a power loss or a node crash is ``fsync``-ed before the file that commits it
(a checkpoint's manifest, a results file, a cache's metadata) is renamed into place, and the folder is ``fsync``-ed
after the rename, so a committed name never points at data still in the page cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional


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
