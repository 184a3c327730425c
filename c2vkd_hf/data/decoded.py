"""Decoded-dataset cache: decode and resize each split once, then augment tensors read from memory maps.

Why: decoding a 360x480 PNG costs about 5 ms on a CPU core, and the training transform decoded every
image and mask again at every step, in the process that also runs the model. This cache decodes a
split once, stores it as uint8 arrays in ``.npy`` files that every step reads through memory maps,
and runs the same paired transform (:class:`~c2vkd_hf.data.SegmentationTransform`: rescale, crop,
flip, normalisation) on tensors from it (:class:`DecodedDataset`).

What is stored, per example (:func:`stored_size`):

* the image (3, h, w) uint8, resized once (bilinear, antialiased, the transform's own resize) to the
  largest size the augmentation can draw: ``resize * max_scale`` per side for training (``resize``:
  ``--resize_height/--resize_width``, else the image's own size), capped at the original size (a
  side is never upsampled), and exactly the evaluation resize for validation (so evaluation inputs
  are bit-identical to decoding the files);
* the mask (H, W) uint8 at its original resolution (nearest-neighbour resizing of a resized mask is
  not the resizing of the original, so masks are kept as they are: labels stay exact);
* the original (H, W), from which the training geometry is drawn.

Exactness: each example's :class:`~c2vkd_hf.data.Geometry` is drawn from the original size (or
``resize``) with the same generator as without the cache, so geometries, labels, example indices
and therefore the teacher-cache replay (:mod:`c2vkd_hf.cache`) are identical; training pixels differ
only by the rounding of resizing twice (``original -> stored -> scaled`` instead of
``original -> scaled``, both uint8; a few grey levels at most, 0 when the stored size is the scaled
size or the original). ``--decoded_cache false`` decodes the files at every step as before.

Storage (one folder per split and key, under ``--decoded_cache_dir``):

* ``decoded_meta.json``: format version, the key (below), the arrays' sizes and ``disk_bytes``
  (:func:`decoded_cache_bytes`, not part of the key); written with the empty arrays into a temporary
  folder that is renamed into place, so a folder with this name is always complete in its layout;
* ``images.npy`` / ``labels.npy``: every example's pixels, flat uint8, one after another;
* ``index.npy`` (N, 6) int64: per row the image's offset, stored height and width, the mask's
  offset, and the original height and width;
* ``rows_done.npy`` (N,) uint8: a row's marker is set (and flushed) only after its pixels were
  flushed, so an interrupted build resumes with the unmarked rows and a reader refuses a folder
  with any unmarked row.

Key (:func:`decoded_key`): SHA-256 of the image and mask bytes in row order (read from the files,
or the in-memory bytes; remapped masks by their remapped bytes), the role (train/eval), the sizes
that decide what is stored (``resize``, ``max_scale``) and the torchvision version (its resize
writes the pixels). The folder name holds a hash of the key (``<role>-<hash>``), so another dataset
or preprocessing gets its own folder and a finished folder never changes under a reader (several
runs and processes can share one cache root). Opening a folder whose stored key differs from the
expected one raises :class:`DecodedCacheError` naming what differs; building into it replaces it
only with ``overwrite``.

Several processes building the same folder at once (e.g. the ranks of a distributed run) all fill
the unmarked rows; they write identical bytes, so the result is the same. This relies on a local
file system with coherent memory maps.

Size: :func:`decoded_cache_bytes` (from the image headers, before anything is decoded), logged in one
line when a split is allocated. The arrays are sparse files, so a build needs the space of the rows it
still writes: all of them for a new folder, the unmarked ones when resuming; a build that would not fit
in the free space of the folder's file system is refused before it starts
(:class:`DecodedCacheSpaceError`, a :class:`~c2vkd_hf.validation.UserInputError`).

``datasets`` sources (Hub ids, saved datasets) leave this cache off by default (``--decoded_cache true``
turns it on). Such a dataset already sits in ``datasets``' own Arrow cache (``~/.cache/huggingface``),
memory-mapped, with each image stored as its encoded PNG/JPEG bytes: decoding it is the only step
left, and this cache would be a second copy of the split, uncompressed (3 bytes a pixel plus the mask:
several times the encoded files; sizes for Cityscapes and ADE20K in docs/RECIPES.md, "Scale"), with a
key that reads every image's bytes at each start. Keep the Arrow cache alone
(the default) when the data loader decodes in workers beside an accelerator
(``--dataloader_num_workers``), when the disk is short, or for a large Hub dataset; turn this cache on
when decoding in the training process is a visible share of the step (a CPU run, few cores) and the
size above fits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ..config import DataArguments
from ..files import dataset_fingerprint, read_json_meta, format_bytes, free_space
from ..images import open_source, oriented_size
from ..validation import UserInputError
from .base import SegmentationData
from .sources import segnet_layout
from .transforms import INDEX_COLUMN, SegmentationTransform, image_tensor, label_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "DecodedCacheError",
    "DECODED_VERSION",
    "default_cache_root",
    "stored_size",
    "decoded_cache_bytes",
    "CacheSpaceError",
    "format_bytes",
    "free_space",
    "decoded_key",
    "build_decoded_cache",
    "DecodedSplit",
    "DecodedDataset",
    "decoded_datasets",
    "use_decoded_cache",
]

DECODED_VERSION = 1
META_NAME = "decoded_meta.json"
DONE_NAME = "rows_done.npy"
INDEX_NAME = "index.npy"
IMAGES_NAME = "images.npy"
LABELS_NAME = "labels.npy"
_OWN_FILES = {META_NAME, DONE_NAME, INDEX_NAME, IMAGES_NAME, LABELS_NAME}


class DecodedCacheError(ValueError):
    """The decoded-dataset cache cannot be used as given (incomplete, stale or foreign); the message
    says what differs."""


class CacheSpaceError(UserInputError):
    """A cache (this one, or the teacher cache of :mod:`c2vkd_hf.cache`) would not fit in the free space of
    its folder's file system; the message names the size, the free space and the options."""


class DecodedCacheSpaceError(DecodedCacheError, CacheSpaceError):
    """The decoded-dataset cache would not fit in the free space of ``--decoded_cache_dir``'s file system."""


def default_cache_root() -> Path:
    """``$C2VKD_HF_CACHE/decoded`` when that variable is set, else ``$XDG_CACHE_HOME/c2vkd_hf/decoded``
    (``~/.cache/c2vkd_hf/decoded``): shared by every run on this machine, one folder per dataset and
    preprocessing."""
    base = os.environ.get("C2VKD_HF_CACHE")
    if base:
        return Path(base).expanduser() / "decoded"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "c2vkd_hf" / "decoded"


# ---------------------------------------------------------------------------------------------
# Sizes and key
# ---------------------------------------------------------------------------------------------


def stored_size(original: Sequence[int], transform: SegmentationTransform) -> tuple[int, int]:
    """(h, w) at which an image of ``original`` (h, w) is stored for ``transform``: for training the
    largest scaled size :func:`~c2vkd_hf.data.sample_geometry` can draw (``round(base * max_scale)``
    per side, ``base`` = ``resize`` or the original), capped per side at the original; for
    evaluation the evaluation resize (or the original)."""
    height, width = int(original[0]), int(original[1])
    if not transform.train:
        return transform.resized_size((height, width))
    base = transform.resized_size((height, width))
    top = tuple(max(1, int(round(b * transform.max_scale))) for b in base)
    return min(top[0], height), min(top[1], width)


# ---------------------------------------------------------------------------------------------
# Size on disk
# ---------------------------------------------------------------------------------------------


def decoded_cache_bytes(original_sizes: Sequence[Sequence[int]], transform: SegmentationTransform) -> int:
    """Bytes of a split's decoded-cache arrays on disk, for images of ``original_sizes`` ((H_i, W_i) per row,
    as decoded) under ``transform``. With ``(h_i, w_i)`` = :func:`stored_size` and ``N`` rows (uint8 pixels,
    an int64 index of 6 values and a one-byte marker per row)::

        max(sum_i 3 h_i w_i, 1) + max(sum_i H_i W_i, 1) + 48 N + N

    Not counted: the four ``.npy`` headers (128 bytes each) and ``decoded_meta.json`` (under 1 KiB)."""
    images = labels = 0
    for original in original_sizes:
        height, width = int(original[0]), int(original[1])
        sh, sw = stored_size((height, width), transform)
        images += 3 * sh * sw
        labels += height * width
    rows = len(original_sizes)
    return max(images, 1) + max(labels, 1) + rows * (6 * np.dtype(np.int64).itemsize + 1)


def _describe(original_sizes: Sequence[Sequence[int]], transform: SegmentationTransform, role: str) -> str:
    """One line: ``Decoded cache (train): N rows x (image 3x<h>x<w> + mask <H>x<W>) uint8 = S on disk``."""
    from collections import Counter

    pairs = Counter((stored_size(o, transform), (int(o[0]), int(o[1]))) for o in original_sizes)
    ((sh, sw), (h, w)), _ = pairs.most_common(1)[0] if pairs else (((0, 0), (0, 0)), 0)
    varies = f", the most common of {len(pairs)} sizes" if len(pairs) > 1 else ""
    return (f"Decoded cache ({role}): {len(original_sizes)} rows x (image 3x{sh}x{sw} + mask {h}x{w}{varies}) uint8 "
            f"= {format_bytes(decoded_cache_bytes(original_sizes, transform))} on disk")


def _check_fits(directory: Path, needed: int, summary: str) -> None:
    """Refuses (:class:`DecodedCacheSpaceError`) ``needed`` bytes more than the free space at ``directory``."""
    free = free_space(directory)
    if needed > free:
        raise DecodedCacheSpaceError(
            f"{summary}, but the file system of {directory} has {format_bytes(free)} free: the cache would not "
            f"fit. Options:\n"
            f"  - another --decoded_cache_dir (or $C2VKD_HF_CACHE) on a file system with at least "
            f"{format_bytes(needed)} free\n"
            f"  - --decoded_cache false: decode the files at each step (no disk needed)\n"
            f"  - a smaller --resize_height/--resize_width or --max_scale (the training images are stored at "
            f"resize x max_scale)")


def _fingerprint(dataset, column: str) -> dict[str, Any]:
    return dataset_fingerprint(dataset, column)


def decoded_key(dataset, transform: SegmentationTransform) -> dict[str, Any]:
    """The cache's identity for ``dataset`` (columns ``image``, ``label``) under ``transform``: what must
    be equal for the stored arrays to be what decoding the files would give (module docstring)."""
    import torchvision

    images, labels = _fingerprint(dataset, "image"), _fingerprint(dataset, "label")
    key = {
        "version": DECODED_VERSION,
        "role": "train" if transform.train else "eval",
        "num_examples": images["num_examples"],
        "images_sha256": images["sha256"],
        "labels_sha256": labels["sha256"],
        "resize": list(transform.resize) if transform.resize else None,
        "max_scale": float(transform.max_scale) if transform.train else None,
        "torchvision": torchvision.__version__,
    }
    if transform.shortest_edge is not None or transform.longest_edge is not None:
        key["keep_ratio"] = [transform.shortest_edge, transform.longest_edge]
    return key


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _differences(stored: dict, expected: dict) -> list[str]:
    return [f"{name}: cache has {json.dumps(stored.get(name))[:80]}, this run has {json.dumps(expected.get(name))[:80]}"
            for name in sorted(set(stored) | set(expected)) if stored.get(name) != expected.get(name)]


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def _read_meta(directory: Path) -> Optional[dict[str, Any]]:
    return read_json_meta(directory / META_NAME, DecodedCacheError, f"delete {directory} to rebuild it.")


def _original_sizes(dataset) -> list[tuple[int, int]]:
    """(h, w) of every row's image as ``datasets`` decodes it, from the file headers (no decoding)."""
    column = dataset.with_format("arrow").select_columns(["image"])
    sizes = []
    for start in range(0, len(dataset), 256):
        for item in column[start:start + 256].column("image").to_pylist():
            source = item.get("bytes") or item.get("path")
            with open_source(source) as image:
                width, height = oriented_size(image)
            sizes.append((height, width))
    return sizes


def _allocate(directory: Path, key: dict, dataset, transform: SegmentationTransform,
              originals: Optional[list[tuple[int, int]]] = None) -> None:
    """Creates the empty arrays and the metadata in a temporary folder and renames it to ``directory``
    (if another process got there first, its folder is kept). ``originals``: :func:`_original_sizes`, when
    the caller has them."""
    originals = _original_sizes(dataset) if originals is None else originals
    index = np.zeros((len(originals), 6), dtype=np.int64)
    image_total = label_total = 0
    for row, (height, width) in enumerate(originals):
        sh, sw = stored_size((height, width), transform)
        index[row] = (image_total, sh, sw, label_total, height, width)
        image_total += 3 * sh * sw
        label_total += height * width
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / INDEX_NAME, index)
    for name, total in ((IMAGES_NAME, image_total), (LABELS_NAME, label_total)):
        np.lib.format.open_memmap(tmp / name, mode="w+", dtype=np.uint8, shape=(max(total, 1),)).flush()
    np.lib.format.open_memmap(tmp / DONE_NAME, mode="w+", dtype=np.uint8, shape=(len(originals),)).flush()
    meta = {"key": key, "num_rows": len(originals), "image_bytes": image_total, "label_bytes": label_total,
            "disk_bytes": decoded_cache_bytes(originals, transform)}  # not part of the key
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    try:
        os.rename(tmp, directory)  # replaces a missing or empty folder; fails on a non-empty one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_meta(directory) is None:  # not another process's finished allocation
            raise DecodedCacheError(f"{directory} exists but holds no decoded-dataset cache (an interrupted "
                                    f"replacement, or other files): delete it to rebuild.") from None


def _remove(directory: Path) -> None:
    foreign = [p.name for p in directory.iterdir() if p.name not in _OWN_FILES] if directory.is_dir() else []
    if foreign:
        raise DecodedCacheError(f"{directory} is not a decoded-dataset cache (it holds {foreign[:3]}); "
                                f"choose another --decoded_cache_dir.")
    (directory / META_NAME).unlink(missing_ok=True)  # from here on no reader takes it for a cache
    shutil.rmtree(directory, ignore_errors=True)


def build_decoded_cache(directory: os.PathLike | str, dataset, transform: SegmentationTransform, *,
                        key: Optional[dict] = None, overwrite: bool = False, max_rows: Optional[int] = None,
                        progress: bool = False) -> dict[str, Any]:
    """Decodes ``dataset`` (a ``datasets.Dataset`` with ``image``/``label`` columns, row order = example
    index) into ``directory`` for ``transform`` and returns the key. Resumes a partial build with the
    same key; a folder with another key raises :class:`DecodedCacheError` unless ``overwrite``.
    ``max_rows``: stop after this many rows (tests of an interrupted build)."""
    directory = Path(directory)
    key = key if key is not None else decoded_key(dataset, transform)
    meta = _read_meta(directory)
    if meta is not None and _differences(meta["key"], key):
        if not overwrite:
            raise DecodedCacheError(f"The decoded-dataset cache {directory} was built for other data or "
                                    f"preprocessing and is refused:\n  - " + "\n  - ".join(
                                        _differences(meta["key"], key)) + "\nDelete it or pass overwrite.")
        logger.warning("Replacing the stale decoded-dataset cache %s.", directory)
        _remove(directory)
        meta = None
    resumed = meta is not None
    if meta is None:
        originals = _original_sizes(dataset)
        summary = _describe(originals, transform, key["role"])
        _check_fits(directory, decoded_cache_bytes(originals, transform), summary)
        logger.info("%s (%s free).", summary, format_bytes(free_space(directory)))
        _allocate(directory, key, dataset, transform, originals)
        meta = _read_meta(directory)
        if _differences(meta["key"], key):  # another process allocated it for another key meanwhile
            raise DecodedCacheError(f"{directory} was just built for other data or preprocessing by another "
                                    f"process.")
    done = np.load(directory / DONE_NAME, mmap_mode="r+")
    todo = [int(i) for i in np.flatnonzero(done == 0)]
    if todo and resumed:  # an existing folder: its files are sparse, only the unmarked rows are still to write
        index = np.load(directory / INDEX_NAME)
        needed = int(sum(3 * int(index[r, 1]) * int(index[r, 2]) + int(index[r, 4]) * int(index[r, 5]) for r in todo))
        _check_fits(directory, needed, f"Decoded cache ({key['role']}) {directory.name}: {len(todo)} of {len(done)} "
                                       f"rows still to write, {format_bytes(needed)}")
    if max_rows is not None:
        todo = todo[:max_rows]
    if todo:
        _fill(directory, done, todo, dataset, transform, progress)
    del done
    return key


def _fill(directory: Path, done: np.memmap, todo: list[int], dataset, transform, progress: bool) -> None:
    from tqdm.auto import tqdm

    index = np.load(directory / INDEX_NAME)
    images = np.load(directory / IMAGES_NAME, mmap_mode="r+")
    labels = np.load(directory / LABELS_NAME, mmap_mode="r+")
    raw = dataset.select_columns(["image", "label"])
    chunk = 32
    with tqdm(total=len(todo), desc=f"decoding {'train' if transform.train else 'eval'} images once",
              disable=not progress, unit="img") as bar:
        for first in range(0, len(todo), chunk):
            rows = todo[first:first + chunk]
            for row in rows:
                if done[row]:
                    continue  # another process did it
                example = raw[row]
                image = image_tensor(example["image"])
                label = label_tensor(example["label"])
                image_offset, sh, sw, label_offset, height, width = (int(v) for v in index[row])
                if tuple(image.shape[-2:]) != (height, width) or tuple(label.shape) != (height, width):
                    raise DecodedCacheError(
                        f"row {row}: the image decodes to {tuple(image.shape[-2:])} and its mask to "
                        f"{tuple(label.shape)}, but its file header said {(height, width)}")
                if (sh, sw) != (height, width):
                    image = TF.resize(image, [sh, sw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
                images[image_offset:image_offset + 3 * sh * sw] = image.contiguous().numpy().reshape(-1)
                labels[label_offset:label_offset + height * width] = label.contiguous().numpy().reshape(-1)
            images.flush()
            labels.flush()  # the rows' pixels reach the files before their markers are set
            done[rows] = 1
            done.flush()
            bar.update(len(rows))
    del images, labels


# ---------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------


class DecodedSplit:
    """Read-only view of a complete cache folder; refuses a missing, incomplete or mismatching one.

    Memory maps are opened lazily in each process (a data-loader worker gets the path, not a copy of
    the arrays)."""

    def __init__(self, directory: os.PathLike | str, expected_key: Optional[dict[str, Any]] = None):
        self.directory = Path(directory)
        meta = _read_meta(self.directory)
        if meta is None:
            raise DecodedCacheError(f"{self.directory} is not a decoded-dataset cache (no {META_NAME}).")
        self.key = meta["key"]
        if expected_key is not None and _differences(self.key, expected_key):
            raise DecodedCacheError(f"The decoded-dataset cache {self.directory} was built for other data or "
                                    f"preprocessing and is refused:\n  - " + "\n  - ".join(
                                        _differences(self.key, expected_key)))
        done = np.load(self.directory / DONE_NAME, mmap_mode="r")
        missing = int(done.shape[0] - np.count_nonzero(done))
        if missing:
            raise DecodedCacheError(f"The decoded-dataset cache {self.directory} is incomplete ({missing} of "
                                    f"{done.shape[0]} rows missing: its build was interrupted); building it "
                                    f"again resumes it.")
        for name, expected in ((IMAGES_NAME, int(meta["image_bytes"])), (LABELS_NAME, int(meta["label_bytes"]))):
            try:  # a file cut short or replaced under the cache is refused here, not read half-way into training
                size = np.load(self.directory / name, mmap_mode="r").nbytes
            except (ValueError, OSError) as error:
                raise DecodedCacheError(f"{self.directory / name} is truncated or unreadable ({error}).") from None
            if size != expected:
                raise DecodedCacheError(f"{self.directory / name} holds {size} bytes, its metadata says {expected}.")
        self.index = np.load(self.directory / INDEX_NAME)
        self.num_rows = int(meta["num_rows"])
        self.nbytes = int(meta["image_bytes"]) + int(meta["label_bytes"])
        self._arrays: Optional[tuple] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = state["_pid"] = None
        return state

    def _maps(self):
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = (np.load(self.directory / IMAGES_NAME, mmap_mode="r"),
                            np.load(self.directory / LABELS_NAME, mmap_mode="r"))
            self._pid = os.getpid()
        return self._arrays

    def read(self, row: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Row ``row``: the stored image (3, h, w) uint8, the mask (H, W) uint8 at the original
        resolution, and the original (H, W)."""
        images, labels = self._maps()
        image_offset, sh, sw, label_offset, height, width = (int(v) for v in self.index[int(row)])
        image = torch.from_numpy(np.array(images[image_offset:image_offset + 3 * sh * sw])).view(3, sh, sw)
        label = torch.from_numpy(np.array(labels[label_offset:label_offset + height * width])).view(height, width)
        return image, label, (height, width)


class DecodedDataset(torch.utils.data.Dataset):
    """A split read from a :class:`DecodedSplit` and transformed by ``transform``: row ``i`` is what the
    ``datasets`` split with ``transform`` gives (``pixel_values``, ``labels``, and, as the transform's
    ``return_geometry``/``return_index`` say, ``geometry`` and ``example_index``). ``indexed``: seed
    the augmentation by the row number (the ``example_index`` column of the ``datasets`` path)."""

    def __init__(self, split: DecodedSplit, transform: SegmentationTransform, indexed: bool = True):
        self.split = split
        self.transform = transform
        self.indexed = indexed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int) -> dict[str, Any]:
        row = int(row)
        if not 0 <= row < len(self.split):
            raise IndexError(f"row {row} out of range 0..{len(self.split) - 1}")
        image, label, original = self.split.read(row)
        index = row if self.indexed else None
        pixel_values, labels, geometry = self.transform.transform_example(image, label, index,
                                                                          source_size=original)
        out = {"pixel_values": pixel_values, "labels": labels}
        if self.transform.return_geometry:
            out["geometry"] = geometry
        if self.transform.return_index and index is not None:
            out[INDEX_COLUMN] = index
        return out


# ---------------------------------------------------------------------------------------------
# Pipeline hook
# ---------------------------------------------------------------------------------------------


def use_decoded_cache(data_args: DataArguments) -> bool:
    """``--decoded_cache``, or by default on for local folders (``--train_images``, a SegNet/CamVid
    layout folder) and the synthetic set, off for ``datasets`` sources (Hub ids, saved datasets)."""
    choice = getattr(data_args, "decoded_cache", None)
    if choice is not None:
        return bool(choice)
    if data_args.train_images or data_args.dataset_name == "synthetic":
        return True
    root = Path(data_args.dataset_name)
    return root.is_dir() and segnet_layout(root) is not None


def open_or_build(root: os.PathLike | str, dataset, transform: SegmentationTransform,
                  progress: bool = False) -> DecodedSplit:
    """The complete :class:`DecodedSplit` of ``dataset`` under ``transform`` in ``root`` (folder
    ``<role>-<key hash>``), built or resumed first when needed."""
    key = decoded_key(dataset, transform)
    directory = Path(root).expanduser() / f"{key['role']}-{_key_hash(key)}"
    meta = _read_meta(directory)
    if meta is None or not np.load(directory / DONE_NAME, mmap_mode="r").all():
        logger.info("Decoding %d %s images once into %s.", len(dataset), key["role"], directory)
        build_decoded_cache(directory, dataset, transform, key=key, progress=progress)
    try:
        return DecodedSplit(directory, expected_key=key)
    except DecodedCacheError as error:  # its files changed under it (the key, from the data, still matches): rebuilt
        logger.warning("%s Rebuilding %s.", error, directory)
        _remove(directory)
        build_decoded_cache(directory, dataset, transform, key=key, progress=progress)
        return DecodedSplit(directory, expected_key=key)


def decoded_datasets(data: SegmentationData, data_args: DataArguments, train_transform: SegmentationTransform,
                     eval_transform: SegmentationTransform, indexed: bool, progress: bool = False
                     ) -> Optional[tuple[DecodedDataset, DecodedDataset]]:
    """Train and validation :class:`DecodedDataset` s for ``data`` when the decoded cache is on
    (:func:`use_decoded_cache`), else ``None`` (decode the files at each step)."""
    if not use_decoded_cache(data_args):
        return None
    root = getattr(data_args, "decoded_cache_dir", None) or default_cache_root()
    train = open_or_build(root, data.train, train_transform, progress)
    validation = open_or_build(root, data.validation, eval_transform, progress)
    return DecodedDataset(train, train_transform, indexed), DecodedDataset(validation, eval_transform, False)
