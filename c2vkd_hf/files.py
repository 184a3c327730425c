"""File helpers shared by the on-disk caches (teacher and decoded-dataset caches): reading a folder's metadata."""

from __future__ import annotations

import json
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
