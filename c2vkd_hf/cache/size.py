"""The teacher cache's size on disk, from its layout, and the free-space check made before a build writes it.

The size is known before the teacher runs over the training set: every row of every array has the same shape
(one forward pass on a blank image at the reference size gives the map sizes). The arrays are ``.npy`` memory
maps created at full length but sparse (no block is allocated until a row is written), so the space a build
still needs is what its unwritten rows will take: the whole cache for a new build, the missing rows for a
resumed one. The size is logged in one line and recorded in ``cache_meta.json`` as ``disk_bytes``, outside
the key (it is derived from what the key holds).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..data.decoded import CacheSpaceError
from ..files import format_bytes, free_space
from .key import TeacherCacheError

#: bytes per stored logit and feature value (float16)
VALUE_BYTES = 2
#: bytes of a row's completion marker (``rows_done.npy``, uint8)
MARKER_BYTES = 1

#: the top-k size quoted in the refusal as an example of ``--teacher_cache_top_k``
EXAMPLE_TOP_K = 5


class TeacherCacheSpaceError(TeacherCacheError, CacheSpaceError):
    """The teacher cache would not fit in the free space of its folder's file system (a user error: the
    message names the size, the free space and the options)."""


def topk_index_dtype(num_classes: int) -> np.dtype:
    """dtype of the stored top-k class indices: uint8 up to 256 classes, else int16."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16)


def cache_layout(num_classes: int, logits_size: Sequence[int], feature_shapes: Mapping[str, Sequence[int]] = (),
                 top_k: Optional[int] = None) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``{array name: (dtype, shape of one row)}`` of a cache, in the order the arrays are created:
    ``logits`` (K, h, w) float16, or with ``top_k`` = k ``logits_topk_values`` (k + 1, h, w) float16 and
    ``logits_topk_indices`` (k, h, w) (:func:`topk_index_dtype`); then ``feature_<name>`` (C, h', w')
    float16 for each entry of ``feature_shapes`` (``{name: (C, h', w')}``). ``logits_size``: (h, w) of the
    teacher's logits at the reference size. A ``top_k`` outside [1, K - 1] is a :class:`TeacherCacheError`."""
    from .files import LOGITS_NAME, TOPK_INDICES_NAME, TOPK_VALUES_NAME

    num_classes = int(num_classes)
    size = tuple(int(v) for v in logits_size)
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    if top_k is None:
        layout[LOGITS_NAME] = (np.dtype(np.float16), (num_classes, *size))
    else:
        if not 1 <= top_k < num_classes:
            raise TeacherCacheError(f"--teacher_cache_top_k must be in [1, {num_classes - 1}] for a teacher with "
                                    f"{num_classes} classes, got {top_k}")
        layout[TOPK_VALUES_NAME] = (np.dtype(np.float16), (int(top_k) + 1, *size))
        layout[TOPK_INDICES_NAME] = (topk_index_dtype(num_classes), (int(top_k), *size))
    for name, shape in dict(feature_shapes).items():
        layout[f"feature_{name}"] = (np.dtype(np.float16), tuple(int(v) for v in shape))
    return layout


def row_bytes(layout: Mapping[str, tuple[np.dtype, Sequence[int]]]) -> int:
    """Bytes one row takes in every array of ``layout`` (:func:`cache_layout`) plus its marker byte."""
    return sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in layout.values()) + MARKER_BYTES


def teacher_cache_bytes(num_rows: int, num_classes: int, logits_size: Sequence[int],
                        feature_shapes: Mapping[str, Sequence[int]] = (), top_k: Optional[int] = None) -> int:
    """Bytes of a teacher cache's arrays on disk, from its layout (:func:`cache_layout`).

    With ``N`` rows, ``K`` classes, logits of ``h x w`` and stored feature maps ``f`` of ``C_f x h_f x w_f``
    (float16, 2 bytes a value; one marker byte per row)::

        all logits:   N * (2 K h w            + sum_f 2 C_f h_f w_f + 1)
        top-k logits: N * (2 (k + 1) h w + b k h w + sum_f 2 C_f h_f w_f + 1)

    ``b`` the bytes of a class index (1 up to 256 classes, else 2). Not counted: one ``.npy`` header per
    file (a multiple of 64 bytes, 128 for these shapes) and ``cache_meta.json`` (a few KiB). The maps
    are at the teacher's own strides of the reference size (``logits_size`` = the logits' grid, e.g.
    ``H/4 x W/4`` for a stride-4 classifier, ``H x W`` for a teacher that upsamples its logits)."""
    return int(num_rows) * row_bytes(cache_layout(num_classes, logits_size, feature_shapes, top_k))


def describe(num_rows: int, num_classes: int, logits_size: Sequence[int],
             feature_shapes: Mapping[str, Sequence[int]] = (), top_k: Optional[int] = None) -> str:
    """One line: ``Teacher cache: N rows x (K logits at hxw + feature <name> C at hxw ...) float16 = S on disk``."""
    h, w = (int(v) for v in logits_size)
    if top_k is None:
        parts = [f"{num_classes} logits at {h}x{w}"]
    else:
        parts = [f"top-{top_k} of {num_classes} logits at {h}x{w} ({top_k + 1} values + {top_k} "
                 f"{topk_index_dtype(num_classes).name} indices)"]
    parts += [f"feature {name} {shape[0]} at {shape[1]}x{shape[2]}" for name, shape in dict(feature_shapes).items()]
    total = teacher_cache_bytes(num_rows, num_classes, logits_size, feature_shapes, top_k)
    return f"Teacher cache: {num_rows} rows x ({' + '.join(parts)}) float16 = {format_bytes(total)} on disk"


def check_fits(directory: Path, needed: int, *, num_rows: int, num_classes: int, logits_size: Sequence[int],
               feature_shapes: Mapping[str, Sequence[int]], top_k: Optional[int], reclaimed: int = 0) -> int:
    """Free bytes of ``directory``'s file system (``shutil.disk_usage`` of the folder or its nearest existing
    parent) plus ``reclaimed`` (what the build frees by overwriting); raises :class:`TeacherCacheSpaceError`
    when ``needed`` bytes do not fit, naming the size, the free space and the options."""
    free = free_space(directory) + int(reclaimed)
    if needed <= free:
        return free
    total = teacher_cache_bytes(num_rows, num_classes, logits_size, feature_shapes, top_k)
    still = "" if needed >= total else f" ({format_bytes(needed)} of it still to write)"
    logits = teacher_cache_bytes(num_rows, num_classes, logits_size, {}, top_k) - num_rows * MARKER_BYTES
    features = total - logits - num_rows * MARKER_BYTES
    options = [f"another --teacher_cache folder on a file system with at least {format_bytes(needed)} free"]
    if top_k is None:
        example = ""
        if num_classes > EXAMPLE_TOP_K + 1:
            smaller = teacher_cache_bytes(num_rows, num_classes, logits_size, feature_shapes, EXAMPLE_TOP_K)
            example = f"; K = {EXAMPLE_TOP_K}: {format_bytes(smaller)} in all"
        options.append(f"--teacher_cache_top_k K, which stores K + 1 values and K indices per pixel instead of the "
                       f"{num_classes} logits (the logits are {format_bytes(logits)} of the total{example})")
    elif top_k > 1:
        options.append(f"a smaller --teacher_cache_top_k (the top-k logits are {format_bytes(logits)} of the total)")
    if feature_shapes:
        options.append(f"fewer teacher feature maps: C2VKD stores those of --feature_pairs and, with --stage_weight "
                       f"> 0, of --stage_pairs ({format_bytes(features)} of the total)")
    options.append("the teacher online: leave out --teacher_cache (it then runs at every step)")
    counted = f" (counting the {format_bytes(reclaimed)} of the files it overwrites)" if reclaimed else ""
    raise TeacherCacheSpaceError(
        f"{describe(num_rows, num_classes, logits_size, feature_shapes, top_k)}{still}, but the file system of "
        f"{directory} has {format_bytes(free)} free{counted}: the cache would not fit. Options:\n  - " +
        "\n  - ".join(options))
