"""The cache's key: what the stored outputs depend on (the teacher's weights, the dataset's images, the
preprocessing), compared on every open; a mismatch is refused, naming each differing part."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import TeacherCacheError
from ..files import dataset_fingerprint  # noqa: F401  (importable from here as before)

CACHE_VERSION = 1


def teacher_weights_hash(model: nn.Module) -> str:
    """SHA-256 over the teacher's state dict: every entry's name, dtype, shape and raw bytes, in sorted
    name order (independent of where the weights came from or how they are stored on disk)."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(*, teacher_hash: str, dataset: dict[str, Any], reference_size: Sequence[int],
              teacher_mean_std: tuple, feature_names: Sequence[str], top_k: Optional[int]) -> dict[str, Any]:
    """The cache's identity: what must be equal for cached outputs to be the teacher's outputs on the
    training images (see the module docstring)."""
    mean, std = teacher_mean_std
    return {
        "version": CACHE_VERSION,
        "teacher_sha256": teacher_hash,
        "dataset": {"num_examples": int(dataset["num_examples"]), "sha256": dataset["sha256"]},
        "reference_size": [int(v) for v in reference_size],
        "teacher_mean": [round(float(v), 8) for v in mean],
        "teacher_std": [round(float(v), 8) for v in std],
        "feature_names": list(feature_names),
        "top_k": None if top_k is None else int(top_k),
        "dtype": "float16",
    }


_KEY_LABELS = {
    "version": "cache format version",
    "teacher_sha256": "teacher weights (SHA-256 of the state dict)",
    "dataset": "training images (count and SHA-256 of the files)",
    "reference_size": "reference size (--resize_height/--resize_width)",
    "teacher_mean": "teacher input mean",
    "teacher_std": "teacher input std",
    "feature_names": "stored teacher feature maps",
    "top_k": "top-k logits (--teacher_cache_top_k)",
    "dtype": "storage dtype",
    "keep_ratio": "aspect-preserving resize (--resize_shortest_edge/--resize_longest_edge)",
}


def key_differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One human-readable line per key entry that differs between a stored and an expected key
    (an empty list: the cache matches)."""
    lines = []
    for name in sorted(set(stored) | set(expected), key=lambda n: list(_KEY_LABELS).index(n)
                       if n in _KEY_LABELS else len(_KEY_LABELS)):
        if stored.get(name) != expected.get(name):
            def short(value):
                text = json.dumps(value)
                return text if len(text) <= 90 else text[:87] + "..."
            lines.append(f"{_KEY_LABELS.get(name, name)}: cache has {short(stored.get(name))}, "
                         f"this run has {short(expected.get(name))}")
    return lines


def check_key(directory: Path, stored: dict, expected: dict, rebuild_hint: str) -> None:
    differences = key_differences(stored, expected)
    if differences:
        raise TeacherCacheError(
            f"The teacher cache {directory} was built for another teacher, dataset or preprocessing and is "
            f"refused:\n  - " + "\n  - ".join(differences) +
            f"\n{rebuild_hint}")


REBUILD_HINT = ("Rebuild it: delete the folder (or pass another --teacher_cache) and rerun, or run "
                "`python scripts/cache_teacher.py <the same flags as distill.py> --overwrite`.")
