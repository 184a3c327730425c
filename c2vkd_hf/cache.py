"""Teacher-output cache: run the frozen teacher once, then replay its outputs under each training view.

Why: on a CPU the teacher's forward pass costs several student training steps. The cache stores, for
every training example, what the distillation loss reads from the teacher (its logits and the named
feature maps of the configured feature pairs), computed once at a fixed **reference geometry**: the
image resized to the reference size (the data's ``--resize_height/--resize_width``, else the images'
common size), no crop, no flip. During training each batch carries its examples' row numbers
(``example_index``) and their :class:`~c2vkd_hf.data.Geometry`; :meth:`TeacherCache.replay` reads those
rows and applies the same rescale, crop and flip to the cached maps (:func:`replay_maps`), so the
teacher never runs.

Fidelity: replay equals the online teacher exactly when the teacher commutes with the geometry
(e.g. identity or flip for a flip-equivariant model); in general it approximates the teacher's output
on the transformed image (a CNN is not scale-equivariant; ``scripts/cache_fidelity.py`` measures how
closely). Padding (a crop reaching beyond a down-scaled image) replays as 0 (uniform logits, zero
features), where the online teacher would see a padded image.

Storage (one folder):

* ``cache_meta.json``: format version, the key (below), and one entry per array (file, dtype, shape);
  written last at creation, through a temporary file and ``os.replace``. A folder without it is not a
  cache (an interrupted creation is started again).
* ``logits.npy`` (N, K, h, w) float16, or with ``top_k`` = k: ``logits_topk_values.npy``
  (N, k + 1, h, w) float16 (the k largest logits, then one "rest" logit per pixel, chosen so that
  every other class gets an equal share of the remaining softmax mass: the top-k probabilities are
  exact) and ``logits_topk_indices.npy`` (N, k, h, w) uint8 (int16 beyond 256 classes).
* ``feature_<name>.npy`` (N, C, h, w) float16 for each stored feature map.
* ``rows_done.npy`` (N,) uint8: the completion marker of each row.

All arrays are ``.npy`` files opened with ``numpy`` memory maps, so neither building nor training
holds the cache in RAM; readers open them read-only and drop the pages they read from their resident
set after copying the rows out (the kernel keeps them in its shared page cache). A row is written to every array, the arrays are
flushed (``msync``), and only then is the row's marker set and flushed: an interrupted build resumes
with the rows whose marker is unset, and a reader refuses a cache in which any marker is unset, so a
half-written row is never read.

Key (:func:`cache_key`), stored in the metadata and compared on every open: the teacher's weights
(SHA-256 of its state dict), the dataset (number of examples and a SHA-256 over the image files'
bytes, in row order; in-memory images by their bytes), and the preprocessing (reference size, the
teacher's input mean/std, the stored feature names, ``top_k``, dtype). A mismatch raises
:class:`TeacherCacheError` naming each differing part and how to rebuild.

Several processes: building shards the missing rows by rank (``rank::world_size``; rank 0 creates the
files, then every rank fills its share into the shared memory maps; markers are one byte per row, so
ranks never write the same bytes); reading needs nothing but read-only maps. This relies on a local
file system with shared memory maps (not a network file system without coherent ``mmap``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from .data import Geometry, SegmentationTransform, collate_fn
from .files import read_json_meta

logger = logging.getLogger(__name__)

__all__ = [
    "TeacherCacheError",
    "CACHE_VERSION",
    "teacher_weights_hash",
    "dataset_fingerprint",
    "cache_key",
    "key_differences",
    "topk_compress",
    "topk_expand",
    "replay_grid",
    "replay_maps",
    "build_teacher_cache",
    "TeacherCache",
    "cache_status",
]

CACHE_VERSION = 1
META_NAME = "cache_meta.json"
DONE_NAME = "rows_done.npy"
LOGITS_NAME = "logits"
TOPK_VALUES_NAME = "logits_topk_values"
TOPK_INDICES_NAME = "logits_topk_indices"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class TeacherCacheError(ValueError):
    """The teacher cache cannot be used as given (missing, incomplete, stale or foreign); the message
    says what differs and how to rebuild."""


# ---------------------------------------------------------------------------------------------
# Key
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Top-k logits
# ---------------------------------------------------------------------------------------------


def topk_compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, h, w) logits -> ``(values (B, k + 1, h, w), indices (B, k, h, w))``: the k largest logits
    per pixel and, last, the rest logit ``log(sum of exp(other logits) / (K - k))``, so that the other
    K - k classes share the remaining softmax mass equally (top-k probabilities are preserved)."""
    num_classes = logits.shape[1]
    if not 1 <= k < num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes - 1}] for {num_classes} classes, got {k}")
    logits = logits.float()
    values, indices = logits.topk(k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    rest_logit = torch.logsumexp(rest, dim=1, keepdim=True) - math.log(num_classes - k)
    return torch.cat([values, rest_logit], dim=1), indices


def topk_expand(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse of :func:`topk_compress`: dense (B, K, h, w) logits with the stored top-k values and
    the rest logit everywhere else."""
    k = indices.shape[1]
    dense = values[:, k:k + 1].expand(-1, num_classes, -1, -1).clone()
    return dense.scatter(1, indices.long(), values[:, :k])


# ---------------------------------------------------------------------------------------------
# Geometric replay
# ---------------------------------------------------------------------------------------------


def replay_output_size(map_size: Sequence[int], reference_size: Sequence[int],
                       crop_size: Sequence[int]) -> tuple[int, int]:
    """Size of a replayed map: the crop at the map's own stride (``map / reference`` cells per pixel),
    rounded, at least 1. E.g. a stride-32 map of a 120x160 reference is 4x5; a 120x160 crop replays
    to 4x5 too."""
    return tuple(max(1, int(round(c * m / r))) for c, m, r in zip(crop_size, map_size, reference_size))


def replay_grid(geometry: Geometry, output_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample`` coordinates (oh, ow, 2), ``align_corners=False`` convention, that take a map of
    the whole reference view to the ``geometry``'s crop at ``output_size``, and an (oh, ow) mask of
    the positions inside the image (False: padding).

    Output cell (i, j) has its centre at ``((i + 0.5) * crop_h / oh, (j + 0.5) * crop_w / ow)`` in
    crop pixels; mirrored (``crop_w - x``) when ``geometry.flip``; shifted by the crop's (top, left)
    into the scaled frame; divided by the scaled size, this is a fraction of the image, which is what
    ``grid_sample`` samples (any source resolution: the reference view and the scaled view are the
    same image)."""
    (scaled_h, scaled_w), (top, left, crop_h, crop_w) = geometry.scaled_size, geometry.crop_box
    out_h, out_w = int(output_size[0]), int(output_size[1])
    y = (torch.arange(out_h, dtype=torch.float64) + 0.5) * (crop_h / out_h)
    x = (torch.arange(out_w, dtype=torch.float64) + 0.5) * (crop_w / out_w)
    if geometry.flip:
        x = crop_w - x
    u = (top + y) / scaled_h  # fraction of the image height, 0..1 inside
    v = (left + x) / scaled_w
    inside = (u[:, None] <= 1.0) & (v[None, :] <= 1.0)
    grid = torch.stack(torch.broadcast_tensors(2 * v[None, :] - 1, 2 * u[:, None] - 1), dim=-1)
    return grid.float(), inside


def replay_maps(maps: torch.Tensor, geometries: Sequence[Geometry], reference_size: Sequence[int],
                view_scale: float = 1.0) -> torch.Tensor:
    """Apply each example's training ``geometry`` to its cached (B, C, h, w) ``maps`` of the reference
    view, at the maps' own stride (:func:`replay_output_size`) of the crop enlarged ``view_scale``
    times (the teacher's view; 1: the student's): bilinear resampling, clamped at the image border (as
    a resize is), 0 where the crop lies in the padding."""
    crop = geometries[0].output_size
    if any(g.output_size != crop for g in geometries):
        raise ValueError("all views of a batch must have the same crop size")
    if view_scale != 1.0:
        crop = tuple(int(round(c * view_scale)) for c in crop)
    out_size = replay_output_size(maps.shape[-2:], reference_size, crop)
    grids, masks = zip(*(replay_grid(g, out_size) for g in geometries))
    grid = torch.stack(grids).to(maps.device)
    out = nnf.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = torch.stack(masks).to(out.device)
    if not bool(mask.all()):
        out = out * mask[:, None].to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int, Callable[[], None]]:
    """``(rank, world_size, barrier)`` of an initialised ``torch.distributed`` group, else (0, 1, no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_meta(directory: Path) -> Optional[dict[str, Any]]:
    return read_json_meta(directory / META_NAME, TeacherCacheError, f"delete {directory} and rebuild the cache.")


def _open_array(directory: Path, entry: dict[str, Any], mode: str) -> np.memmap:
    return _load_npy(directory / entry["file"], mode)


def _load_npy(path: Path, mode: str) -> np.memmap:
    """``np.load(path, mmap_mode=mode)``; a truncated or unreadable file is a :class:`TeacherCacheError`
    naming it."""
    try:
        return np.load(path, mmap_mode=mode)
    except (OSError, ValueError, EOFError) as error:
        raise TeacherCacheError(f"{path} is truncated or unreadable ({error}); delete {path.parent} and rebuild the "
                                f"cache (or pass --overwrite to scripts/cache_teacher.py).") from None


def _release_pages(array: np.memmap) -> None:
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
    meta = _read_meta(directory)
    if meta is None:
        return CacheStatus(False)
    done = _load_npy(directory / DONE_NAME, "r")
    return CacheStatus(True, meta["key"], int(np.count_nonzero(done)), int(done.shape[0]))


def _check_key(directory: Path, stored: dict, expected: dict, rebuild_hint: str) -> None:
    differences = key_differences(stored, expected)
    if differences:
        raise TeacherCacheError(
            f"The teacher cache {directory} was built for another teacher, dataset or preprocessing and is "
            f"refused:\n  - " + "\n  - ".join(differences) +
            f"\n{rebuild_hint}")


REBUILD_HINT = ("Rebuild it: delete the folder (or pass another --teacher_cache) and rerun, or run "
                "`python scripts/cache_teacher.py <the same flags as distill.py> --overwrite`.")


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _teacher_maps(teacher: nn.Module, pixel_values: torch.Tensor,
                  feature_names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from .models import forward_features

    if feature_names:
        logits, features = forward_features(teacher, pixel_values)
        missing = [n for n in feature_names if n not in features]
        if missing:
            raise TeacherCacheError(f"the teacher has no feature map {missing[0]!r}; it has {sorted(features)}")
        return logits, {n: features[n] for n in feature_names}
    return teacher(pixel_values=pixel_values).logits, {}


def _to_float16(x: torch.Tensor) -> np.ndarray:
    return x.float().clamp(-_FLOAT16_MAX, _FLOAT16_MAX).cpu().numpy().astype(np.float16)


def build_teacher_cache(
    directory: os.PathLike | str,
    teacher: nn.Module,
    dataset,
    *,
    reference_size: Optional[Sequence[int]],
    teacher_mean_std: tuple,
    feature_names: Sequence[str] = (),
    top_k: Optional[int] = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    barrier: Optional[Callable[[], None]] = None,
    image_column: str = "image",
    max_rows: Optional[int] = None,
) -> dict[str, Any]:
    """Runs ``teacher`` over ``dataset`` (a ``datasets.Dataset`` with an ``image`` column, row order =
    ``example_index``) at the reference geometry and stores its logits and ``feature_names`` maps in
    ``directory``; returns the cache key. Resumes a partial build with the same key; a folder with
    another key raises :class:`TeacherCacheError` unless ``overwrite``.

    ``reference_size``: (h, w) the images are resized to (None: every image must already have one
    common size). ``teacher_mean_std``: the teacher's input normalisation. ``rank``/``world_size``/
    ``barrier``: default from ``torch.distributed`` when initialised; each rank computes the missing
    rows ``rank::world_size``. ``max_rows``: stop after this many rows of this rank (for tests of an
    interrupted build).
    """
    directory = Path(directory)
    dist_rank, dist_world, dist_barrier = _distributed()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    barrier = dist_barrier if barrier is None else barrier
    teacher.eval()
    device = next(teacher.parameters()).device
    images = dataset.select_columns([image_column])
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    if reference_size is None:
        width, height = images[0]["image"].size
        reference_size = (height, width)
    reference_size = tuple(int(v) for v in reference_size)
    mean, std = teacher_mean_std
    key = cache_key(teacher_hash=teacher_weights_hash(teacher), dataset=dataset_fingerprint(dataset, image_column),
                    reference_size=reference_size, teacher_mean_std=(mean, std), feature_names=feature_names,
                    top_k=top_k)
    num_rows = len(dataset)
    if num_rows == 0:
        raise TeacherCacheError("the training set is empty: nothing to cache")

    meta = _read_meta(directory)
    stale = meta is not None and bool(key_differences(meta["key"], key))
    if stale and not overwrite:
        _check_key(directory, meta["key"], key, REBUILD_HINT)  # every rank refuses: none waits at the barrier
    if rank == 0 and (meta is None or stale):
        if stale:
            logger.warning("Overwriting the stale teacher cache %s.", directory)
        _create_files(directory, teacher, key, num_rows, reference_size, device)
    barrier()
    meta = _read_meta(directory)
    if meta is None or key_differences(meta["key"], key):
        raise TeacherCacheError(f"{directory}: the cache metadata changed while building (another build?)")
    arrays = {name: _open_array(directory, entry, "r+") for name, entry in meta["arrays"].items()}
    done = _load_npy(directory / DONE_NAME, "r+")
    todo = [i for i in range(rank, num_rows, world_size) if not done[i]]
    if max_rows is not None:
        todo = todo[:max_rows]
    if todo:
        _fill_rows(arrays, done, todo, teacher, images, reference_size, (mean, std), feature_names, top_k,
                   batch_size, device, progress and rank == 0)
    del arrays, done
    barrier()
    return key


def _create_files(directory: Path, teacher: nn.Module, key: dict, num_rows: int,
                  reference_size: tuple[int, int], device) -> None:
    """Allocates every array (shapes from one forward pass on a blank image) and the row markers,
    then writes the metadata last, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / META_NAME
    if meta_path.exists():
        meta_path.unlink()  # until the new metadata is written, this folder is not a cache
    logits, features = _teacher_maps(teacher, torch.zeros(1, 3, *reference_size, device=device),
                                     key["feature_names"])
    num_classes = int(logits.shape[1])
    entries: dict[str, dict[str, Any]] = {}

    def allocate(name: str, dtype, shape) -> None:
        file = f"{name}.npy"
        array = np.lib.format.open_memmap(directory / file, mode="w+", dtype=dtype, shape=(num_rows, *shape))
        array.flush()
        del array
        entries[name] = {"file": file, "dtype": np.dtype(dtype).name, "shape": [num_rows, *shape]}

    top_k = key["top_k"]
    if top_k is None:
        allocate(LOGITS_NAME, np.float16, logits.shape[1:])
    else:
        if not 1 <= top_k < num_classes:
            raise TeacherCacheError(f"--teacher_cache_top_k must be in [1, {num_classes - 1}] for a teacher with "
                                    f"{num_classes} classes, got {top_k}")
        allocate(TOPK_VALUES_NAME, np.float16, (top_k + 1, *logits.shape[2:]))
        allocate(TOPK_INDICES_NAME, np.uint8 if num_classes <= 256 else np.int16, (top_k, *logits.shape[2:]))
    for name, feature in features.items():
        allocate(f"feature_{name}", np.float16, feature.shape[1:])
    done = np.lib.format.open_memmap(directory / DONE_NAME, mode="w+", dtype=np.uint8, shape=(num_rows,))
    done.flush()
    del done
    _write_json_atomic(meta_path, {"key": key, "num_classes": num_classes, "arrays": entries,
                                   "features": {name: f"feature_{name}" for name in features}})


def _fill_rows(arrays, done, todo, teacher, images, reference_size, mean_std, feature_names, top_k,
               batch_size, device, progress) -> None:
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    transform = SegmentationTransform(image_mean=mean_std[0], image_std=mean_std[1], train=False,
                                      resize=reference_size)
    loader = DataLoader(Subset(images.with_transform(transform), todo), batch_size=batch_size, collate_fn=collate_fn)
    position = 0
    with tqdm(total=len(todo), desc="caching teacher outputs", disable=not progress, unit="img") as bar:
        for batch in loader:
            rows = todo[position:position + len(batch["pixel_values"])]
            position += len(rows)
            pixel_values = batch["pixel_values"].to(device)
            if tuple(pixel_values.shape[-2:]) != tuple(reference_size):
                raise TeacherCacheError(f"an image is {tuple(pixel_values.shape[-2:])} but the reference size is "
                                        f"{tuple(reference_size)}: set --resize_height/--resize_width")
            logits, features = _teacher_maps(teacher, pixel_values, feature_names)
            if top_k is None:
                arrays[LOGITS_NAME][rows] = _to_float16(logits)
            else:
                values, indices = topk_compress(logits, top_k)
                arrays[TOPK_VALUES_NAME][rows] = _to_float16(values)
                arrays[TOPK_INDICES_NAME][rows] = indices.cpu().numpy().astype(arrays[TOPK_INDICES_NAME].dtype)
            for name, feature in features.items():
                arrays[f"feature_{name}"][rows] = _to_float16(feature)
            for array in arrays.values():
                array.flush()  # the rows' data reach the file before their markers are set
            done[rows] = 1
            done.flush()
            bar.update(len(rows))


# ---------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------


class TeacherCache:
    """Read-only view of a complete cache folder (see the module docstring).

    ``TeacherCache(directory, expected_key)`` refuses a missing, incomplete or mismatching cache with
    :class:`TeacherCacheError`. :meth:`read` returns rows at the reference geometry; :meth:`replay`
    returns them under training geometries, as the online teacher's ``(logits, [features])``.
    """

    def __init__(self, directory: os.PathLike | str, expected_key: Optional[dict[str, Any]] = None):
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta is None:
            raise TeacherCacheError(f"{self.directory} is not a teacher cache (no {META_NAME}). Build it with "
                                    f"`python scripts/cache_teacher.py <the same flags as distill.py>`.")
        self.key = meta["key"]
        if expected_key is not None:
            _check_key(self.directory, self.key, expected_key, REBUILD_HINT)
        self.num_classes = int(meta["num_classes"])
        self.reference_size = tuple(self.key["reference_size"])
        self.feature_names = list(meta["features"])
        self._arrays = {name: _open_array(self.directory, entry, "r") for name, entry in meta["arrays"].items()}
        self._features = dict(meta["features"])
        done = _load_npy(self.directory / DONE_NAME, "r")
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
            _release_pages(array)
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
