"""``TeacherCache``: the read-only view of a complete cache, rows at the reference geometry or replayed under
training views."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data import Geometry
from .files import (DONE_NAME, LOGITS_NAME, META_NAME, TOPK_INDICES_NAME, TOPK_VALUES_NAME, load_npy, open_array,
                    read_meta, release_pages)
from .key import REBUILD_HINT, TeacherCacheError, check_key
from .replay import replay_maps, topk_expand


class TeacherCache:
    """Read-only view of a complete cache folder (see the module docstring).

    ``TeacherCache(directory, expected_key)`` refuses a missing, incomplete or mismatching cache with
    :class:`TeacherCacheError`. :meth:`read` returns rows at the reference geometry; :meth:`replay`
    returns them under training geometries, as the online teacher's ``(logits, [features])``.
    """

    def __init__(self, directory: os.PathLike | str, expected_key: Optional[dict[str, Any]] = None):
        self.directory = Path(directory)
        meta = read_meta(self.directory)
        if meta is None:
            raise TeacherCacheError(f"{self.directory} is not a teacher cache (no {META_NAME}). Build it with "
                                    f"`python scripts/cache_teacher.py <the same flags as distill.py>`.")
        self.key = meta["key"]
        if expected_key is not None:
            check_key(self.directory, self.key, expected_key, REBUILD_HINT)
        self.num_classes = int(meta["num_classes"])
        self.reference_size = tuple(self.key["reference_size"])
        self.feature_names = list(meta["features"])
        self._arrays = {name: open_array(self.directory, entry, "r") for name, entry in meta["arrays"].items()}
        self._features = dict(meta["features"])
        done = load_npy(self.directory / DONE_NAME, "r")
        missing = int(done.shape[0] - np.count_nonzero(done))
        if missing:
            raise TeacherCacheError(
                f"The teacher cache {self.directory} is incomplete ({missing} of {done.shape[0]} rows missing: "
                f"its build was interrupted). Resume it with `python scripts/cache_teacher.py <the same flags as "
                f"distill.py>` (or rerun distill.py, which resumes it).")
        self.num_rows = int(done.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    def read(self, indices: Sequence[int], feature_names: Optional[Sequence[str]] = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Rows ``indices`` at the reference geometry: dense float32 logits (B, K, h, w) and the
        ``feature_names`` maps (default: all stored), each (B, C, h, w) float32."""
        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"cache rows {idx.tolist()} out of range 0..{self.num_rows - 1}: the batch's "
                             f"example_index does not refer to this cache's dataset")
        if LOGITS_NAME in self._arrays:
            logits = torch.from_numpy(np.ascontiguousarray(self._arrays[LOGITS_NAME][idx])).float()
        else:
            values = torch.from_numpy(np.ascontiguousarray(self._arrays[TOPK_VALUES_NAME][idx])).float()
            indices_k = torch.from_numpy(np.ascontiguousarray(self._arrays[TOPK_INDICES_NAME][idx]).astype(np.int64))
            logits = topk_expand(values, indices_k, self.num_classes)
        names = self.feature_names if feature_names is None else list(feature_names)
        missing = [n for n in names if n not in self._features]
        if missing:
            raise TeacherCacheError(f"The teacher cache {self.directory} has no feature map {missing[0]!r} (it "
                                    f"stores {self.feature_names}). " + REBUILD_HINT)
        features = [torch.from_numpy(np.ascontiguousarray(self._arrays[self._features[n]][idx])).float()
                    for n in names]
        for array in self._arrays.values():
            release_pages(array)
        return logits, features

    def replay(self, indices: Sequence[int], geometries: Sequence[Geometry],
               feature_names: Optional[Sequence[str]] = None, device=None, view_scale: float = 1.0
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's ``(logits, [features])`` for examples ``indices`` seen through ``geometries``
        (:func:`replay_maps`: logits and each feature map at their own stride), on ``device``.
        ``view_scale``: how many times the student's resolution the teacher saw (the cache was built at
        the data's reference size times this, ``--teacher_input_scale``); the maps replay at the
        teacher's stride of that larger view, as the online teacher's would."""
        if len(indices) != len(geometries):
            raise ValueError(f"{len(indices)} indices but {len(geometries)} geometries")
        logits, features = self.read(indices, feature_names)
        if device is not None:
            logits, features = logits.to(device), [f.to(device) for f in features]
        logits = replay_maps(logits, geometries, self.reference_size, view_scale)
        features = [replay_maps(f, geometries, self.reference_size, view_scale) for f in features]
        return logits, features
