"""Building the cache: the teacher run once over the training set at the reference geometry, rows sharded over
processes, every row committed by its marker so an interrupted build resumes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from collections import Counter

import torch.nn.functional as F

from ..data import VALID_SIZES, SegmentationTransform, collate_fn, keep_ratio_size
from .files import (DONE_NAME, LOGITS_NAME, META_NAME, TOPK_INDICES_NAME, TOPK_VALUES_NAME, load_npy, open_array,
                    read_meta, write_json_atomic)
from .key import (REBUILD_HINT, TeacherCacheError, cache_key, check_key, dataset_fingerprint,
                  key_differences, teacher_weights_hash)
from .replay import topk_compress
from .size import cache_layout, check_fits, describe, format_bytes, teacher_cache_bytes

logger = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _distributed() -> tuple[int, int, Callable[[], None]]:
    """``(rank, world_size, barrier)`` of an initialised ``torch.distributed`` group, else (0, 1, no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


@torch.no_grad()
def _teacher_maps(teacher: nn.Module, pixel_values: torch.Tensor,
                  feature_names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from ..models import forward_features

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
    keep_ratio: Optional[tuple[Optional[int], Optional[int]]] = None,
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

    ``keep_ratio``: ``(shortest_edge, longest_edge)`` of an aspect-preserving resize
    (:func:`~c2vkd_hf.data.keep_ratio_size`). The teacher then sees each image at its own resized size
    (portrait stays portrait) and its maps are stored resampled (bilinear) onto the maps of the
    ``reference_size`` canvas (default: the most common resized size), which holds the whole image as
    every stored row does; replay samples fractions of the image, so it is unchanged. Rows of the
    canvas's size are stored exactly; others lose what the resampling loses.

    Size: before any row is computed, every rank works out what the rows still to write will take
    (:func:`~c2vkd_hf.cache.size.teacher_cache_bytes`; the map sizes of a new cache from one forward pass
    on a blank image, those of a resumed one from its metadata) and refuses with
    :class:`~c2vkd_hf.cache.size.TeacherCacheSpaceError` when it exceeds the free space of ``directory``'s
    file system; rank 0 logs the size in one line.
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
    if reference_size is None and keep_ratio is not None:
        sizes = Counter(keep_ratio_size(image.size[::-1], *keep_ratio) for image in images["image"])
        reference_size = max(sizes, key=lambda size: (sizes[size], size[0] * size[1]))
    if reference_size is None:
        width, height = images[0]["image"].size
        reference_size = (height, width)
    reference_size = tuple(int(v) for v in reference_size)
    mean, std = teacher_mean_std
    key = cache_key(teacher_hash=teacher_weights_hash(teacher), dataset=dataset_fingerprint(dataset, image_column),
                    reference_size=reference_size, teacher_mean_std=(mean, std), feature_names=feature_names,
                    top_k=top_k)
    if keep_ratio is not None:
        key["keep_ratio"] = [None if v is None else int(v) for v in keep_ratio]
    num_rows = len(dataset)
    if num_rows == 0:
        raise TeacherCacheError("the training set is empty: nothing to cache")

    meta = read_meta(directory)
    stale = meta is not None and bool(key_differences(meta["key"], key))
    if stale and not overwrite:
        check_key(directory, meta["key"], key, REBUILD_HINT)  # every rank refuses: none waits at the barrier
    if meta is None or stale:  # every rank reads the layout, so every rank can refuse (none waits at the barrier)
        shapes = _probe_shapes(teacher, reference_size, key["feature_names"], device)
        rows_left = num_rows
    else:
        shapes = _stored_shapes(meta)
        rows_left = num_rows - int(np.count_nonzero(load_npy(directory / DONE_NAME, "r")))
    layout = cache_layout(*shapes, top_k=top_k)  # checks top_k against the classes
    if rows_left:
        total = teacher_cache_bytes(num_rows, *shapes, top_k=top_k)
        needed = teacher_cache_bytes(rows_left, *shapes, top_k=top_k)
        # creating truncates the files of these names (a stale cache's, an interrupted creation's)
        reclaimed = _allocated_bytes(directory, layout) if meta is None or stale else 0
        free = check_fits(directory, needed, num_rows=num_rows, num_classes=shapes[0], logits_size=shapes[1],
                          feature_shapes=shapes[2], top_k=top_k, reclaimed=reclaimed)
        if rank == 0:
            left = "" if needed == total else f", {format_bytes(needed)} of it still to write ({rows_left} rows)"
            logger.info("%s%s; %s free in %s.", describe(num_rows, *shapes, top_k=top_k), left, format_bytes(free),
                        directory)
    if rank == 0 and (meta is None or stale):
        if stale:
            logger.warning("Overwriting the stale teacher cache %s.", directory)
        _create_files(directory, key, num_rows, layout, shapes[0], teacher_cache_bytes(num_rows, *shapes, top_k=top_k))
    barrier()
    meta = read_meta(directory)
    if meta is None or key_differences(meta["key"], key):
        raise TeacherCacheError(f"{directory}: the cache metadata changed while building (another build?)")
    arrays = {name: open_array(directory, entry, "r+") for name, entry in meta["arrays"].items()}
    done = load_npy(directory / DONE_NAME, "r+")
    todo = [i for i in range(rank, num_rows, world_size) if not done[i]]
    if max_rows is not None:
        todo = todo[:max_rows]
    if todo:
        _fill_rows(arrays, done, todo, teacher, images, reference_size, (mean, std), feature_names, top_k,
                   batch_size, device, progress and rank == 0, keep_ratio)
    del arrays, done
    barrier()
    return key


def _probe_shapes(teacher: nn.Module, reference_size: tuple[int, int], feature_names: Sequence[str], device
                  ) -> tuple[int, tuple[int, int], dict[str, tuple[int, ...]]]:
    """``(num_classes, logits (h, w), {feature: (C, h, w)})`` of the teacher at the reference size, from one
    forward pass on a blank image."""
    logits, features = _teacher_maps(teacher, torch.zeros(1, 3, *reference_size, device=device), feature_names)
    return (int(logits.shape[1]), tuple(int(v) for v in logits.shape[2:]),
            {name: tuple(int(v) for v in feature.shape[1:]) for name, feature in features.items()})


def _stored_shapes(meta: dict[str, Any]) -> tuple[int, tuple[int, int], dict[str, tuple[int, ...]]]:
    """The :func:`_probe_shapes` of an existing cache, from its metadata."""
    arrays = meta["arrays"]
    first = arrays[LOGITS_NAME] if LOGITS_NAME in arrays else arrays[TOPK_VALUES_NAME]
    return (int(meta["num_classes"]), tuple(int(v) for v in first["shape"][2:]),
            {name: tuple(int(v) for v in arrays[entry]["shape"][1:]) for name, entry in meta["features"].items()})


def _allocated_bytes(directory: Path, layout: dict) -> int:
    """Bytes the files of ``layout`` (and the markers) hold on disk now in ``directory``: what creating the cache
    there frees, since it truncates them."""
    total = 0
    for file in [f"{name}.npy" for name in layout] + [DONE_NAME]:
        try:
            total += (directory / file).stat().st_blocks * 512
        except (OSError, AttributeError):
            pass
    return total


def _create_files(directory: Path, key: dict, num_rows: int, layout: dict, num_classes: int, disk_bytes: int) -> None:
    """Allocates every array of ``layout`` (:func:`~c2vkd_hf.cache.size.cache_layout`) and the row markers,
    then writes the metadata last, atomically (``disk_bytes``: recorded beside the key, not part of it)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / META_NAME
    if meta_path.exists():
        meta_path.unlink()  # until the new metadata is written, this folder is not a cache
    entries: dict[str, dict[str, Any]] = {}
    for name, (dtype, shape) in layout.items():
        file = f"{name}.npy"
        array = np.lib.format.open_memmap(directory / file, mode="w+", dtype=dtype, shape=(num_rows, *shape))
        array.flush()
        del array
        entries[name] = {"file": file, "dtype": np.dtype(dtype).name, "shape": [num_rows, *shape]}
    done = np.lib.format.open_memmap(directory / DONE_NAME, mode="w+", dtype=np.uint8, shape=(num_rows,))
    done.flush()
    del done
    write_json_atomic(meta_path, {"key": key, "num_classes": num_classes, "arrays": entries,
                                  "features": {name: f"feature_{name}" for name in key["feature_names"]},
                                  "disk_bytes": int(disk_bytes)})


def _canvas_maps(teacher, batch, reference_size, feature_names, map_sizes):
    """The teacher's logits and features of a padded batch of images of different sizes, each run at its
    own size and resampled onto the canvas maps ``map_sizes`` (``{"logits" or name: (h, w)}``)."""
    logits_rows, feature_rows = [], {name: [] for name in feature_names}

    def fit(x: torch.Tensor, size) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)

    for image, (h, w, _, _) in zip(batch["pixel_values"], batch[VALID_SIZES].tolist()):
        logits, features = _teacher_maps(teacher, image[None, :, :h, :w], feature_names)
        logits_rows.append(fit(logits, map_sizes["logits"]))
        for name in feature_names:
            feature_rows[name].append(fit(features[name], map_sizes[name]))
    return torch.cat(logits_rows), {name: torch.cat(rows) for name, rows in feature_rows.items()}


def _fill_rows(arrays, done, todo, teacher, images, reference_size, mean_std, feature_names, top_k,
               batch_size, device, progress, keep_ratio=None) -> None:
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    if keep_ratio is None:
        transform = SegmentationTransform(image_mean=mean_std[0], image_std=mean_std[1], train=False,
                                          resize=reference_size)
    else:
        transform = SegmentationTransform(image_mean=mean_std[0], image_std=mean_std[1], train=False,
                                          shortest_edge=keep_ratio[0], longest_edge=keep_ratio[1])
        first = arrays[LOGITS_NAME] if LOGITS_NAME in arrays else arrays[TOPK_VALUES_NAME]
        map_sizes = {"logits": first.shape[2:], **{n: arrays[f"feature_{n}"].shape[2:] for n in feature_names}}
    loader = DataLoader(Subset(images.with_transform(transform), todo), batch_size=batch_size, collate_fn=collate_fn)
    position = 0
    with tqdm(total=len(todo), desc="caching teacher outputs", disable=not progress, unit="img") as bar:
        for batch in loader:
            rows = todo[position:position + len(batch["pixel_values"])]
            position += len(rows)
            pixel_values = batch["pixel_values"].to(device)
            if keep_ratio is not None and (VALID_SIZES in batch or tuple(pixel_values.shape[-2:]) != reference_size):
                if VALID_SIZES not in batch:  # one size in this batch, not the canvas's
                    batch[VALID_SIZES] = torch.tensor([[*pixel_values.shape[-2:]] * 2] * len(pixel_values))
                batch = {**batch, "pixel_values": pixel_values}
                logits, features = _canvas_maps(teacher, batch, reference_size, feature_names, map_sizes)
            elif tuple(pixel_values.shape[-2:]) != tuple(reference_size):
                raise TeacherCacheError(f"an image is {tuple(pixel_values.shape[-2:])} but the reference size is "
                                        f"{tuple(reference_size)}: set --resize_height/--resize_width")
            else:
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
