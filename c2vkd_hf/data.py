"""Segmentation data: sources, label handling, validation and paired image+mask transforms.

Every source ends up as :class:`SegmentationData`: two ``datasets.Dataset`` splits with the columns
``image`` (PIL RGB) and ``label`` (PIL mode ``"L"`` class-index masks in which
:data:`~c2vkd_hf.config.IGNORE_INDEX` = 255 marks pixels to ignore), plus ``id2label``.

Sources, in order of precedence (:func:`load_segmentation_data`):

1. local folders ``--train_images/--train_labels/--validation_images/--validation_labels``
   (image and mask paired by relative path without extension) with a ``--labels_file``;
   a ``--dataset_name`` folder in the SegNet/CamVid layout (``train/``, ``trainannot/``, ``val/``,
   ``valannot/``, ``classes.json``) is read the same way;
2. ``--dataset_name`` other than ``synthetic``: a ``datasets.load_from_disk`` folder or anything
   ``datasets.load_dataset`` accepts (Hub id, local parquet/imagefolder...);
3. the built-in procedural street scenes (:func:`make_synthetic_dataset`).

Label values are mapped once, when the data is loaded: the dataset's own void value
(``--dataset_ignore_index``, else the labels file's ``ignore_index``) becomes 255, and with
``--reduce_labels`` 0 becomes 255 and every other value v becomes v - 1. After mapping every value
must lie in ``[0, K)`` or be 255; this and the readability of every file is checked before any
training starts, and any problem raises :class:`DataValidationError` naming the file.
Images stay on disk and are decoded lazily; masks whose values change are re-encoded (PNG) in memory
with their original path kept (read it with :func:`source_paths`).

Transforms (:func:`build_transform`) are applied with ``Dataset.with_transform``. Training geometry
(random rescale, padded crop, horizontal flip) is drawn by :func:`sample_geometry` as an explicit
:class:`Geometry` and applied by :func:`apply_geometry`, so the same geometry can be replayed on other
maps of the same view (e.g. cached teacher logits at any resolution). With a seed, each example's
geometry is a pure function of ``(seed, epoch, example index)`` (:func:`augmentation_generator`), so a
resumed run augments exactly like an uninterrupted one, whatever the data loader prefetched.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as TF
from transformers import TrainerCallback

from .config import IGNORE_INDEX, DataArguments

logger = logging.getLogger(__name__)

__all__ = [
    "DataValidationError",
    "SegmentationData",
    "load_segmentation_data",
    "load_labels_file",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "make_synthetic_dataset",
    "Geometry",
    "sample_geometry",
    "augmentation_generator",
    "with_example_index",
    "AugmentationEpochCallback",
    "INDEX_COLUMN",
    "apply_geometry",
    "SegmentationTransform",
    "build_transform",
    "collate_fn",
    "default_palette",
    "colorize",
    "rgb_to_index",
    "source_paths",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
_MAX_LISTED = 5  # how many file names an error message lists
_MAX_PROBLEMS = 10  # how many per-file problems one error message reports


class DataValidationError(ValueError):
    """The data cannot be used as given; the message names the file(s) and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Result type
# ---------------------------------------------------------------------------------------------


@dataclass
class SegmentationData:
    """Train and validation splits (columns ``image``, ``label``) and the class names.

    ``palette`` holds one RGB colour per class when the source defines one (labels file
    ``palette_rgb``, the synthetic dataset), else ``None`` (use :func:`default_palette`).
    ``dataset_ignore_index`` records the source's own void value that was mapped to 255.
    ``validation_total``: the validation split's size before ``--max_eval_samples`` (``None``: not
    recorded; ``len(validation)`` is then the whole split).
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    id2label: dict[int, str]
    name: str
    palette: Optional[list[tuple[int, int, int]]] = None
    dataset_ignore_index: Optional[int] = None
    reduce_labels: bool = False
    validation_total: Optional[int] = None

    def __post_init__(self):
        """Refuses a label set that would give silently wrong results (``c2vkd_hf.validation``):
        duplicate class names, a void value that is a class's value, a split whose masks are all void."""
        from .validation import check_label_set, check_not_all_void

        check_label_set(self.id2label, self.dataset_ignore_index, self.reduce_labels, f"dataset {self.name}")
        check_not_all_void(self.train, "train", IGNORE_INDEX)
        check_not_all_void(self.validation, "validation", IGNORE_INDEX)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX


# ---------------------------------------------------------------------------------------------
# Labels file, palettes
# ---------------------------------------------------------------------------------------------


def _id2label_from_mapping(mapping: dict, where: str) -> dict[int, str]:
    try:
        id2label = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"{where}: id2label keys must be integers ({e})") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise DataValidationError(
            f"{where}: class ids must be 0..K-1 without gaps, got {sorted(id2label)[:20]}"
        )
    return dict(sorted(id2label.items()))


def load_labels_file(path: Union[str, os.PathLike]) -> tuple[dict[int, str], Optional[int], Optional[list[tuple]]]:
    """Read class names from a JSON file; returns ``(id2label, ignore_index, palette)``.

    Accepted formats: a list of class names in label order; an ``id2label`` object
    (``{"0": "road", ...}``); or an object with ``classes`` (list or id2label object), optional
    ``ignore_index`` (the dataset's own void value, mapped to 255 when loading) and optional
    ``palette_rgb`` (or ``palette``: one ``[r, g, b]`` per class).
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"labels file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataValidationError(f"labels file {path} is not readable JSON ({e})") from None

    ignore_index: Optional[int] = None
    palette_raw = None
    if isinstance(content, list):
        classes: Any = content
    elif isinstance(content, dict) and ("classes" in content or "id2label" in content):
        classes = content.get("classes", content.get("id2label"))
        ignore_index = content.get("ignore_index")
        palette_raw = content.get("palette_rgb", content.get("palette"))
    elif isinstance(content, dict):
        classes = content  # a bare id2label object
    else:
        raise DataValidationError(
            f"labels file {path}: expected a list of class names or an object with 'classes', "
            f"got {type(content).__name__}"
        )

    if isinstance(classes, list):
        if not classes or not all(isinstance(c, str) for c in classes):
            raise DataValidationError(f"labels file {path}: 'classes' must be a non-empty list of strings")
        id2label = dict(enumerate(classes))
    elif isinstance(classes, dict):
        id2label = _id2label_from_mapping(classes, f"labels file {path}")
    else:
        raise DataValidationError(f"labels file {path}: 'classes' must be a list or an id2label object")
    if not id2label:
        raise DataValidationError(f"labels file {path} defines no classes")

    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or ignore_index < 0:
            raise DataValidationError(f"labels file {path}: ignore_index must be a non-negative integer")
    palette = None
    if palette_raw is not None:
        try:
            palette = [tuple(int(c) for c in rgb) for rgb in palette_raw]
        except (TypeError, ValueError):
            raise DataValidationError(f"labels file {path}: palette must be a list of [r, g, b]") from None
        if len(palette) < len(id2label) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
            raise DataValidationError(
                f"labels file {path}: palette needs one [r, g, b] (0..255) per class "
                f"({len(id2label)} classes, {len(palette)} colours)"
            )
        palette = palette[: len(id2label)]
    return id2label, ignore_index, palette


def default_palette(num_labels: int) -> list[tuple[int, int, int]]:
    """``num_labels`` distinct, deterministic RGB colours (golden-ratio hue steps, varied value)."""
    import colorsys

    colours = []
    for i in range(num_labels):
        hue = (i * 0.618033988749895) % 1.0
        saturation = 0.65 + 0.35 * ((i // 3) % 2)
        value = 0.95 - 0.3 * ((i // 2) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((int(round(r * 255)), int(round(g * 255)), int(round(b * 255))))
    return colours


def _as_mask_array(mask) -> np.ndarray:
    if isinstance(mask, PIL.Image.Image):
        return np.asarray(mask)
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy()
    return np.asarray(mask)


def colorize(
    mask,
    palette: Optional[Sequence[Sequence[int]]] = None,
    ignore_color: tuple[int, int, int] = (0, 0, 0),
) -> PIL.Image.Image:
    """Colour a class-index mask (PIL, numpy or tensor, (H, W)) as an RGB PIL image.

    Values without a palette entry (255 = ignore included) get ``ignore_color``.
    """
    arr = _as_mask_array(mask).astype(np.int64)
    if arr.ndim != 2:
        raise ValueError(f"colorize expects a (H, W) mask, got shape {arr.shape}")
    if palette is None:
        palette = default_palette(int(arr[arr != IGNORE_INDEX].max(initial=-1)) + 1)
    colours = np.asarray(list(palette), dtype=np.uint8).reshape(-1, 3)
    valid = (arr >= 0) & (arr < len(colours)) & (arr != IGNORE_INDEX)
    out = np.empty(arr.shape + (3,), dtype=np.uint8)
    out[:] = np.asarray(ignore_color, dtype=np.uint8)
    out[valid] = colours[arr[valid]]
    return PIL.Image.fromarray(out, mode="RGB")


def rgb_to_index(mask, palette: Sequence[Sequence[int]], ignore_index: int = IGNORE_INDEX) -> PIL.Image.Image:
    """Convert a colour-coded RGB mask to a class-index mask (mode ``"L"``).

    Pixel colour ``palette[k]`` becomes ``k``; any other colour becomes ``ignore_index``.
    """
    arr = _as_mask_array(mask)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"rgb_to_index expects an (H, W, 3) colour mask, got shape {arr.shape}")
    code = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
    out = np.full(code.shape, ignore_index, dtype=np.uint8)
    for k, (r, g, b) in enumerate(palette):
        out[code == ((int(r) << 16) | (int(g) << 8) | int(b))] = k
    return PIL.Image.fromarray(out, mode="L")


# ---------------------------------------------------------------------------------------------
# Label mapping and validation of single files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LabelMapping:
    """Dataset label value -> internal value: void -> 255; reduce_labels: 0 -> 255, v -> v - 1."""

    num_labels: int
    void: Optional[int] = None
    reduce_labels: bool = False

    def __call__(self, values: np.ndarray) -> np.ndarray:
        values = values.astype(np.int64)
        out = values.copy()
        if self.reduce_labels:
            out = np.where(values == 0, IGNORE_INDEX, np.where(values == IGNORE_INDEX, IGNORE_INDEX, values - 1))
        if self.void is not None:
            out = np.where(values == self.void, IGNORE_INDEX, out)
        return out

    def describe(self) -> str:
        parts = [f"K={self.num_labels} classes (valid values 0..{self.num_labels - 1}, ignore value {IGNORE_INDEX})"]
        if self.void is not None:
            parts.append(f"dataset void value {self.void} is mapped to {IGNORE_INDEX}")
        if self.reduce_labels:
            parts.append("reduce_labels maps 0 -> 255 and v -> v-1")
        return "; ".join(parts)


def _open_source(source: Union[str, bytes]):
    return PIL.Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def _oriented_size(im: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF rotation that ``datasets`` applies on decode."""
    w, h = im.size
    if im.format == "PNG":  # reading a PNG's EXIF means decoding it; PNG orientation tags are rare
        return w, h
    try:
        orientation = im.getexif().get(PIL.Image.ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - broken EXIF is not our concern here
        orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_image(source: Union[str, bytes], where: str) -> tuple[int, int]:
    """Open, verify and cheaply decode an image; returns its (width, height)."""
    try:
        with _open_source(source) as im:
            im.verify()  # reads the whole file: chunk CRCs for PNG, structure for others
        with _open_source(source) as im:
            size = _oriented_size(im)
            if im.format != "PNG":  # PNG is fully checked by verify; others need a (cheap) decode
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataValidationError(f"{where}: image cannot be read ({type(e).__name__}: {e})") from None
    return size


def _encode_png(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # zlib's run-length strategy (compress_type 3, Z_RLE): faster and smaller than the default on masks
    PIL.Image.fromarray(arr.astype(np.uint8, copy=False), mode="L").save(
        buffer, format="PNG", compress_level=1, compress_type=3
    )
    return buffer.getvalue()


def _check_mask(
    source: Union[str, bytes], where: str, mapping: _LabelMapping
) -> tuple[tuple[int, int], Optional[bytes]]:
    """Read a mask, check its values after mapping; returns ((w, h), new PNG bytes or None if unchanged)."""
    if isinstance(source, str) and source.lower().endswith(LOSSY_EXTENSIONS):
        raise DataValidationError(
            f"{where}: mask is stored in a lossy format ({Path(source).suffix}); class-index masks must be "
            "lossless (PNG/BMP/TIFF)"
        )
    try:
        with _open_source(source) as im:
            im.verify()
        with _open_source(source) as im:
            size = _oriented_size(im)
            mode = im.mode
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise DataValidationError(f"{where}: mask cannot be read ({type(e).__name__}: {e})") from None

    if arr.ndim == 3:
        grey = (
            mode in ("RGB", "RGBA")
            and (arr[..., 0] == arr[..., 1]).all()
            and (arr[..., 0] == arr[..., 2]).all()
            and (mode == "RGB" or (arr[..., 3] == 255).all())
        )
        if not grey:
            raise DataValidationError(
                f"{where}: mask has mode {mode} with {arr.shape[2]} channels; masks must be single-channel "
                "class indices. If this is a colour-coded mask, convert it first with a palette "
                "(class colour -> index), e.g. c2vkd_hf.data.rgb_to_index(mask, palette)"
            )
        arr = arr[..., 0]  # grey values stored as RGB: take one channel (re-encoded as mode L)
    if arr.ndim != 2:
        raise DataValidationError(f"{where}: mask has unsupported shape {arr.shape} (mode {mode})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataValidationError(f"{where}: mask has non-integer values (mode {mode})")

    if arr.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
        inverse = None
    else:
        values, inverse = np.unique(arr, return_inverse=True)
    mapped = mapping(values)
    bad = values[(mapped != IGNORE_INDEX) & ((mapped < 0) | (mapped >= mapping.num_labels))]
    if bad.size:
        listed = ", ".join(str(int(v)) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
        raise DataValidationError(
            f"{where}: label values [{listed}] are outside the classes: {mapping.describe()}. "
            "Check --labels_file, --dataset_ignore_index and --reduce_labels."
        )
    if mode == "L" and arr.dtype == np.uint8 and np.array_equal(mapped, values):
        return size, None
    if inverse is None:
        lut = np.arange(256, dtype=np.uint8)
        lut[values] = mapped
        new = np.take(lut, arr)
    else:
        new = mapped[inverse.reshape(arr.shape)]
    return size, _encode_png(new)


def _check_pair(image_src, label_src, where_image: str, where_label: str, mapping: _LabelMapping):
    image_size = _check_image(image_src, where_image)
    mask_size, new_bytes = _check_mask(label_src, where_label, mapping)
    if image_size != mask_size:
        raise DataValidationError(
            f"{where_image} is {image_size[0]}x{image_size[1]} (WxH) but its mask {where_label} is "
            f"{mask_size[0]}x{mask_size[1]}"
        )
    return new_bytes


def _raise_collected(problems: list[str], split: str, total: int) -> None:
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DataValidationError(
        f"{len(problems)} of {total} {split} examples are invalid:\n  " + "\n  ".join(shown) + more
    )


# ---------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------


def _scan_folder(folder: Optional[str], role: str) -> dict[str, Path]:
    """Image files under ``folder`` (recursive), keyed by relative path without extension."""
    if not folder:
        raise DataValidationError(f"--{role} is required when reading local folders")
    root = Path(folder)
    if not root.exists():
        raise DataValidationError(f"{role} folder {root} does not exist")
    if not root.is_dir():
        raise DataValidationError(f"{role} {root} is not a folder")
    found: dict[str, Path] = {}
    duplicates = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(p.startswith(".") for p in rel.parts):
            continue
        if not path.is_file():
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            duplicates.append(f"{found[key].name} / {path.name}")
        found[key] = path
    if duplicates:
        raise DataValidationError(
            f"{role} folder {root} has several files with the same name stem: {', '.join(duplicates[:_MAX_LISTED])}"
        )
    if not found:
        raise DataValidationError(
            f"{role} folder {root} is empty: no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return found


def _pair_folders(images_dir: Optional[str], labels_dir: Optional[str], split: str) -> list[tuple[Path, Path]]:
    images = _scan_folder(images_dir, f"{split}_images")
    labels = _scan_folder(labels_dir, f"{split}_labels")
    no_mask = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_mask or no_image:
        lines = []
        if no_mask:
            names = ", ".join(images[k].name for k in no_mask[:_MAX_LISTED])
            lines.append(f"{len(no_mask)} images in {images_dir} have no mask in {labels_dir}: {names}"
                         + (" ..." if len(no_mask) > _MAX_LISTED else ""))
        if no_image:
            names = ", ".join(labels[k].name for k in no_image[:_MAX_LISTED])
            lines.append(f"{len(no_image)} masks in {labels_dir} have no image in {images_dir}: {names}"
                         + (" ..." if len(no_image) > _MAX_LISTED else ""))
        raise DataValidationError(
            f"unpaired {split} files (image and mask are paired by file name without extension):\n  "
            + "\n  ".join(lines)
        )
    return [(images[k], labels[k]) for k in sorted(images)]


def split_by_pattern(pairs: list[tuple[Path, Path]], pattern: str) -> tuple[list, list]:
    """``(kept, held_out)``: the (image, mask) pairs whose image file name does not / does match the
    glob ``pattern`` (e.g. ``0006R0_*``: every frame of one CamVid sequence)."""
    held = [pair for pair in pairs if fnmatch.fnmatch(pair[0].name, pattern)]
    return [pair for pair in pairs if not fnmatch.fnmatch(pair[0].name, pattern)], held


def _folder_split(
    pairs: list[tuple[Path, Path]], split: str, mapping: _LabelMapping, limit: Optional[int]
) -> datasets.Dataset:
    if limit is not None:
        pairs = pairs[: max(0, limit)]
    if not pairs:
        raise DataValidationError(f"{split} split is empty (max samples {limit})")
    start = time.perf_counter()
    problems: list[str] = []
    label_entries = []
    for image_path, label_path in pairs:
        try:
            new_bytes = _check_pair(str(image_path), str(label_path), str(image_path), str(label_path), mapping)
        except DataValidationError as e:
            problems.append(str(e))
            new_bytes = None
        label_entries.append({"bytes": new_bytes, "path": str(label_path)})
    _raise_collected(problems, split, len(pairs))
    logger.info("validated %d %s image/mask pairs in %.1fs", len(pairs), split, time.perf_counter() - start)
    features = datasets.Features(
        {
            "image": datasets.Value("string"),
            "label": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p, _ in pairs], "label": label_entries}, features=features, split=split
    )
    return ds.cast_column("image", datasets.Image(mode="RGB")).cast_column("label", datasets.Image())


def _segnet_layout(root: Path) -> Optional[dict[str, str]]:
    """Folders of the SegNet/CamVid layout under ``root`` (train/ + trainannot/, val/ + valannot/)."""
    if not (root / "train").is_dir() or not (root / "trainannot").is_dir():
        return None
    for val in ("val", "validation", "valid"):
        if (root / val).is_dir() and (root / f"{val}annot").is_dir():
            break
    else:
        return None
    layout = {
        "train_images": str(root / "train"),
        "train_labels": str(root / "trainannot"),
        "validation_images": str(root / val),
        "validation_labels": str(root / f"{val}annot"),
    }
    for name in ("classes.json", "id2label.json"):
        if (root / name).is_file():
            layout["labels_file"] = str(root / name)
            break
    return layout


def _resolve_ignore(args: DataArguments, file_ignore: Optional[int]) -> Optional[int]:
    void = args.dataset_ignore_index if args.dataset_ignore_index is not None else file_ignore
    if void == IGNORE_INDEX:
        return None  # already the internal value
    return void


def _load_folders(args: DataArguments, folders: dict[str, Optional[str]]) -> SegmentationData:
    if not folders.get("validation_images"):
        raise DataValidationError("--validation_images (and --validation_labels) are required with --train_images")
    if not folders.get("labels_file"):
        raise DataValidationError(
            "--labels_file is required with local folders (JSON list of class names, or an object with "
            "'classes' and optional 'ignore_index')"
        )
    id2label, file_ignore, palette = load_labels_file(folders["labels_file"])
    void = _resolve_ignore(args, file_ignore)
    mapping = _LabelMapping(len(id2label), void, args.reduce_labels)
    train_pairs = _pair_folders(folders["train_images"], folders.get("train_labels"), "train")
    if args.selection_holdout:
        # a selection split: held-out training images replace the validation split
        train_pairs, eval_pairs = split_by_pattern(train_pairs, args.selection_holdout)
        if not eval_pairs or not train_pairs:
            raise DataValidationError(
                f"--selection_holdout {args.selection_holdout!r} matches {len(eval_pairs)} of the "
                f"{len(train_pairs) + len(eval_pairs)} training images: it must hold out some, not all")
        logger.warning("Selection split: %d training images matching %r are held out for evaluation (the "
                       "validation split is not used); %d remain for training.", len(eval_pairs),
                       args.selection_holdout, len(train_pairs))
    else:
        eval_pairs = _pair_folders(folders["validation_images"], folders.get("validation_labels"), "validation")
    train = _folder_split(train_pairs, "train", mapping, args.max_train_samples)
    validation = _folder_split(eval_pairs, "validation", mapping, args.max_eval_samples)
    name = Path(folders["train_images"]).resolve().parent.name
    total = None
    if args.max_eval_samples is not None:
        total = len(_pair_folders(folders["validation_images"], folders.get("validation_labels"), "validation"))
    return SegmentationData(train, validation, id2label, name, palette, void, args.reduce_labels, total)


# ---------------------------------------------------------------------------------------------
# datasets (Hub id, local saved dataset, parquet...)
# ---------------------------------------------------------------------------------------------


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _find_class_label(features: datasets.Features, prefer: str) -> Optional[list[str]]:
    found: list[tuple[str, list[str]]] = []

    def visit(name, feature):
        if isinstance(feature, datasets.ClassLabel):
            found.append((name, list(feature.names)))
        elif isinstance(feature, dict):
            for k, v in feature.items():
                visit(k, v)
        elif isinstance(feature, (list, tuple)):
            for v in feature:
                visit(name, v)
        elif hasattr(feature, "feature"):  # Sequence / List
            visit(name, feature.feature)

    for name, feature in features.items():
        visit(name, feature)
    for name, names in found:
        if name == prefer:
            return names
    return found[0][1] if found else None


def _hub_id2label(
    args: DataArguments, dataset: datasets.DatasetDict
) -> tuple[dict[int, str], Optional[int], Optional[list]]:
    if args.labels_file:
        return load_labels_file(args.labels_file)
    first = next(iter(dataset.values()))
    names = _find_class_label(first.features, args.label_column)
    if names:
        return dict(enumerate(names)), None, None
    local = Path(args.dataset_name)
    if local.is_dir():
        for candidate in (local / "id2label.json", local.parent / "id2label.json", local / "classes.json"):
            if candidate.is_file():
                return load_labels_file(candidate)
    else:
        try:  # Hub segmentation datasets often ship id2label.json at the repo root
            from huggingface_hub import hf_hub_download

            return load_labels_file(hf_hub_download(args.dataset_name, "id2label.json", repo_type="dataset"))
        except Exception as e:  # noqa: BLE001 - offline, missing file, ...
            logger.info("no id2label.json for %s on the Hub (%s)", args.dataset_name, e)
    raise DataValidationError(
        f"cannot tell the class names of dataset {args.dataset_name}: it has no ClassLabel feature and no "
        "id2label.json; pass --labels_file"
    )


def _pick_split(dataset: datasets.DatasetDict, wanted: str, aliases: Sequence[str], name: str) -> str:
    for split in (wanted, *aliases):
        if split in dataset:
            return split
    raise DataValidationError(
        f"dataset {name} has no split '{wanted}' (available: {', '.join(dataset)}); set --train_split / "
        "--validation_split"
    )


def _hub_split(
    ds: datasets.Dataset, split: str, mapping: _LabelMapping, limit: Optional[int], name: str
) -> datasets.Dataset:
    if limit is not None:
        ds = ds.select(range(min(max(0, limit), len(ds))))
    if len(ds) == 0:
        raise DataValidationError(f"split '{split}' of dataset {name} is empty")
    for column in ("image", "label"):
        if not isinstance(ds.features[column], datasets.Image):
            raise DataValidationError(
                f"dataset {name}, split '{split}': column '{column}' must be an Image feature, got "
                f"{ds.features[column]!r}"
            )
    raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    start = time.perf_counter()
    problems: list[str] = []
    new_labels: list[dict] = []
    changed = False
    for i, row in enumerate(raw):
        where = f"dataset {name}, split '{split}', row {i}"
        image, label = row["image"], row["label"]
        image_src = image["bytes"] if image["bytes"] is not None else image["path"]
        label_src = label["bytes"] if label["bytes"] is not None else label["path"]
        try:
            new_bytes = _check_pair(
                image_src,
                label_src,
                f"{where} (image {image['path']})" if image["path"] else f"{where} (image)",
                f"{where} (mask {label['path']})" if label["path"] else f"{where} (mask)",
                mapping,
            )
        except DataValidationError as e:
            problems.append(str(e))
            new_bytes = None
        changed |= new_bytes is not None
        new_labels.append({"bytes": new_bytes if new_bytes is not None else label["bytes"], "path": label["path"]})
    _raise_collected(problems, split, len(ds))
    logger.info("validated %d rows of split %s in %.1fs", len(ds), split, time.perf_counter() - start)
    if changed:
        ds = ds.remove_columns("label").add_column("label", new_labels, feature=datasets.Image())
    return ds.cast_column("image", datasets.Image(mode="RGB"))


def _load_hub(args: DataArguments) -> SegmentationData:
    path = Path(args.dataset_name)
    if _is_saved_to_disk(path):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.Dataset):
            raise DataValidationError(
                f"{path} holds a single dataset without splits; save a DatasetDict with "
                f"'{args.train_split}' and '{args.validation_split}' splits"
            )
    else:
        try:
            dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        except FileNotFoundError as e:
            raise DataValidationError(f"dataset {args.dataset_name} not found: {e}") from None
    name = path.resolve().name if path.exists() else args.dataset_name

    id2label, file_ignore, palette = _hub_id2label(args, dataset)
    void = _resolve_ignore(args, file_ignore)
    mapping = _LabelMapping(len(id2label), void, args.reduce_labels)
    train_split = _pick_split(dataset, args.train_split, (), name)
    val_aliases = ("val", "valid") if args.validation_split == "validation" else ()
    val_split = _pick_split(dataset, args.validation_split, val_aliases, name)

    splits = {}
    for split, limit in ((train_split, args.max_train_samples), (val_split, args.max_eval_samples)):
        ds = dataset[split]
        for column in (args.image_column, args.label_column):
            if column not in ds.column_names:
                raise DataValidationError(
                    f"dataset {name}, split '{split}' has no column '{column}' "
                    f"(columns: {', '.join(ds.column_names)}); set --image_column / --label_column"
                )
        ds = ds.select_columns([args.image_column, args.label_column])
        renames = {old: new for old, new in ((args.image_column, "image"), (args.label_column, "label")) if old != new}
        if renames:
            ds = ds.rename_columns(renames)
        splits[split] = _hub_split(ds, split, mapping, limit, name)
    return SegmentationData(splits[train_split], splits[val_split], id2label, name, palette, void, args.reduce_labels,
                            len(dataset[val_split]))


# ---------------------------------------------------------------------------------------------
# Synthetic street scenes
# ---------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("sky", "building", "road", "tree", "car", "person")
SYNTHETIC_PALETTE = [(70, 130, 180), (140, 70, 50), (128, 64, 128), (60, 150, 40), (20, 20, 160), (220, 20, 60)]
_SYNTHETIC_VALIDATION_OFFSET = 1_000_000  # validation images come from a disjoint index range


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Blocky value noise in [0, 1) with roughly ``cell``-pixel features (nearest upsampling)."""
    cell = max(1, cell)
    coarse = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]


def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def _draw_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One street-like scene: (H, W, 3) uint8 image and (H, W) uint8 labels."""
    H, W = height, width
    y = ((np.arange(H, dtype=np.float32) + 0.5) / H)[:, None]  # normalised pixel centres
    x = ((np.arange(W, dtype=np.float32) + 0.5) / W)[None, :]
    px = 1.0 / W  # one pixel, in normalised x units
    py = 1.0 / H
    img = np.zeros((H, W, 3), dtype=np.float32)
    lab = np.zeros((H, W), dtype=np.uint8)
    fine = rng.random((H, W), dtype=np.float32)

    def paint(mask, colour, label):
        img[mask] = colour if np.ndim(colour) == 1 else colour[mask]
        lab[mask] = label

    horizon = rng.uniform(0.38, 0.62)

    # sky (0): vertical gradient, sometimes overcast grey
    overcast = rng.uniform(0.0, 0.8)
    top = _jitter(rng, (0.25, 0.45, 0.85), 0.08) * (1 - overcast) + overcast * rng.uniform(0.55, 0.8)
    low = np.clip(top * 0.6 + 0.4 * _jitter(rng, (0.9, 0.88, 0.85), 0.08), 0, 1)
    t = np.clip(y / horizon, 0, 1)[..., None]
    img[:] = top * (1 - t) + low * t
    lab[:] = 0

    # road (2): everything below the horizon, grey asphalt with texture, dashed lane marks
    ground = np.broadcast_to(y >= horizon, (H, W))
    road = _jitter(rng, (0.42, 0.40, 0.43), 0.1)
    texture = 0.08 * (_value_noise(rng, H, W, max(1, H // 16)) - 0.5) + 0.06 * (fine - 0.5)
    paint(ground, np.clip(road + texture[..., None], 0, 1), 2)
    if rng.random() < 0.6:
        centre = 0.5 + rng.uniform(-0.1, 0.1)
        depth = np.clip((y - horizon) / (1 - horizon), 0, 1)
        dash = ground & (np.abs(x - centre) < (0.004 + 0.02 * depth)) & (((y - horizon) * 12 / (1 - horizon)) % 1 < 0.5)
        paint(dash, _jitter(rng, (0.85, 0.85, 0.8), 0.08), 2)

    # buildings (1): rectangles standing on the horizon, window grids
    for _ in range(rng.integers(2, 6)):
        x0 = rng.uniform(-0.15, 0.9)
        bw = rng.uniform(0.12, 0.4)
        y0 = rng.uniform(0.02, max(0.05, horizon - 0.12))
        y1 = horizon + rng.uniform(0.0, 0.06)
        base = [(0.55, 0.3, 0.22), (0.75, 0.68, 0.55), (0.5, 0.5, 0.52), (0.85, 0.85, 0.82)][rng.integers(4)]
        colour = _jitter(rng, base, 0.1)
        box = (x >= x0) & (x < x0 + bw) & (y >= y0) & (y < y1)
        shade = (0.9 + 0.2 * fine)[..., None]
        paint(box, np.clip(colour * shade, 0, 1), 1)
        period_x = rng.uniform(0.03, 0.07) + 2 * px
        period_y = rng.uniform(0.04, 0.08) + 2 * py
        windows = box & (((x - x0) / period_x) % 1 < 0.5) & (((y - y0) / period_y) % 1 > 0.4) & (y < y1 - period_y)
        window_colour = _jitter(rng, (0.2, 0.25, 0.35) if rng.random() < 0.6 else (0.6, 0.7, 0.8), 0.1)
        paint(windows, window_colour, 1)

    # trees (3): trunks and blobby crowns with leafy noise
    for _ in range(rng.integers(1, 4)):
        cx = rng.uniform(0.0, 1.0)
        cy = horizon - rng.uniform(0.05, 0.2)
        r = rng.uniform(0.05, 0.14)
        trunk = (np.abs(x - cx) < max(0.012, 0.75 * px)) & (y >= cy) & (y < horizon + 0.04)
        paint(trunk, _jitter(rng, (0.35, 0.25, 0.15), 0.06), 3)
        crown = np.zeros((H, W), dtype=bool)
        for _ in range(rng.integers(3, 6)):
            ox, oy = rng.normal(0, r * 0.6, 2)
            rr = r * rng.uniform(0.5, 0.9)
            crown |= ((x - cx - ox) / max(rr, 1.5 * px)) ** 2 + ((y - cy - oy) / max(rr, 1.5 * py)) ** 2 < 1
        leaves = _value_noise(rng, H, W, max(1, H // 32))
        green = _jitter(rng, (0.2, 0.45, 0.15), 0.1)
        paint(crown, np.clip(green * (0.55 + 0.7 * (0.6 * leaves + 0.4 * fine))[..., None], 0, 1), 3)

    # cars (4) and persons (5) on the road, drawn far to near so near ones occlude
    objects = [("car", rng.uniform(horizon + 0.08, 1.02)) for _ in range(rng.integers(1, 4))]
    objects += [("person", rng.uniform(horizon + 0.04, 0.98)) for _ in range(rng.integers(1, 4))]
    objects.sort(key=lambda o: o[1])
    for kind, bottom in objects:
        depth = 0.35 + 0.65 * np.clip((bottom - horizon) / (1 - horizon), 0, 1)  # perspective size factor
        cx = rng.uniform(0.0, 1.0)
        if kind == "car":
            half_w = max(rng.uniform(0.08, 0.16) * depth, 2 * px)
            half_h = max(half_w * rng.uniform(0.35, 0.5) * W / H, 2 * py)
            cy = bottom - half_h
            dx, dy = (x - cx) / half_w, (y - cy) / half_h
            body = dx**4 + dy**4 < 1  # rounded rectangle (superellipse)
            if rng.random() < 0.4:
                colour = np.full(3, rng.uniform(0.1, 0.9), dtype=np.float32)  # grey / black / white cars
            else:
                colour = rng.random(3).astype(np.float32)
            paint(body, np.clip(colour * (0.85 + 0.3 * fine)[..., None], 0, 1), 4)
            glass = body & (dy < -0.2) & (np.abs(dx) < 0.7)
            paint(glass, _jitter(rng, (0.15, 0.2, 0.28), 0.06), 4)
            for side in (-0.6, 0.6):
                wheel = ((x - cx - side * half_w) / max(0.3 * half_w, px)) ** 2 + (
                    (y - bottom + 0.1 * half_h) / max(0.35 * half_h, py)
                ) ** 2 < 1
                paint(wheel, _jitter(rng, (0.06, 0.06, 0.06), 0.04), 4)
        else:
            height = rng.uniform(0.15, 0.3) * depth
            half_w = max(height * rng.uniform(0.1, 0.16) * H / W, 0.75 * px)
            top = bottom - height
            body = (np.abs(x - cx) < half_w) & (y >= top + 0.18 * height) & (y < bottom)
            legs_gap = (np.abs(x - cx) < 0.3 * half_w) & (y >= top + 0.65 * height)
            paint(body & ~legs_gap, rng.random(3).astype(np.float32) * 0.9, 5)
            head_r = 0.09 * height
            head_x = (x - cx) / max(head_r * H / W, 0.75 * px)
            head_y = (y - top - head_r) / max(head_r, 0.75 * py)
            head = head_x**2 + head_y**2 < 1
            paint(head, _jitter(rng, (0.8, 0.6, 0.45), 0.15), 5)

    # global photometric variation: illumination gradient, colour cast, pixel noise
    gain = rng.uniform(0.75, 1.2) * (1 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    light = 1 + rng.uniform(-0.2, 0.2) * (x - 0.5)
    img = img * gain * light[..., None] + rng.normal(0, 0.05, (H, W, 3)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), lab


def make_synthetic_dataset(
    num_images: int, height: int = 64, width: int = 64, seed: int = 0, start_index: int = 0
) -> datasets.Dataset:
    """Procedural street scenes with :data:`SYNTHETIC_CLASSES` labels (columns ``image``, ``label``).

    Image ``i`` is drawn from ``numpy.random.default_rng([seed, start_index + i])``: deterministic,
    independent of ``num_images``, at any resolution. Sky with a gradient, buildings with windows,
    textured road, leafy trees, cars of any colour and thin persons, with jittered colours,
    occlusion and pixel noise, so that classes overlap in colour and a small CNN does clearly better
    than chance but not perfectly.
    """
    if num_images < 0 or height < 1 or width < 1:
        raise ValueError("num_images must be >= 0 and height, width >= 1")
    images, labels = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, start_index + i])
        image, label = _draw_scene(rng, height, width)
        images.append({"bytes": _encode_rgb_png(image), "path": None})
        labels.append({"bytes": _encode_png(label), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _encode_rgb_png(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(arr, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _load_synthetic(args: DataArguments) -> SegmentationData:
    n_train, n_val = args.synthetic_train_size, args.synthetic_validation_size
    if args.max_train_samples is not None:
        n_train = min(n_train, args.max_train_samples)
    if args.max_eval_samples is not None:
        n_val = min(n_val, args.max_eval_samples)
    if n_train < 1 or n_val < 1:
        raise DataValidationError(
            f"synthetic dataset needs at least one image per split (train {n_train}, validation {n_val})"
        )
    h, w, seed = args.synthetic_height, args.synthetic_width, args.synthetic_seed
    train = make_synthetic_dataset(n_train, h, w, seed)
    validation = make_synthetic_dataset(n_val, h, w, seed, start_index=_SYNTHETIC_VALIDATION_OFFSET)
    return SegmentationData(train, validation, dict(enumerate(SYNTHETIC_CLASSES)), "synthetic", list(SYNTHETIC_PALETTE),
                            validation_total=args.synthetic_validation_size)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_segmentation_data(args: DataArguments) -> SegmentationData:
    """Load, map and validate the data described by ``args`` (see the module docstring).

    Raises :class:`DataValidationError` before any training if a file is unreadable, an image and
    its mask differ in size, files are unpaired, a split is empty, or a label value is not a class
    index in ``[0, K)`` or 255 after mapping.
    """
    if args.train_images or args.train_labels or args.validation_images or args.validation_labels:
        if not args.train_images:
            raise DataValidationError("--train_images is required with --train_labels/--validation_images")
        folders = {
            "train_images": args.train_images,
            "train_labels": args.train_labels,
            "validation_images": args.validation_images,
            "validation_labels": args.validation_labels,
            "labels_file": args.labels_file,
        }
        return _load_folders(args, folders)
    if args.selection_holdout and args.dataset_name != "synthetic" and not Path(args.dataset_name).is_dir():
        raise DataValidationError("--selection_holdout selects training files by name: it needs local image/mask "
                                  "folders (--train_images or a SegNet-layout folder)")
    if args.dataset_name != "synthetic":
        root = Path(args.dataset_name)
        layout = _segnet_layout(root) if root.is_dir() else None
        if layout is not None:
            if args.labels_file:
                layout["labels_file"] = args.labels_file
            return _load_folders(args, layout)
        return _load_hub(args)
    if args.selection_holdout:
        raise DataValidationError("--selection_holdout selects training files by name: it needs local image/mask "
                                  "folders (--train_images or a SegNet-layout folder)")
    return _load_synthetic(args)


def source_paths(dataset: datasets.Dataset, index: int) -> tuple[Optional[str], Optional[str]]:
    """The original (image, mask) file paths of row ``index`` (``None`` for in-memory data)."""
    row = dataset.with_format("arrow")[int(index)]  # raw storage: no decoding, no cast of the whole table
    return row.column("image")[0].as_py()["path"], row.column("label")[0].as_py()["path"]


# ---------------------------------------------------------------------------------------------
# Paired transforms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """One training view, as explicit values that can be replayed on any map of the same image.

    The input (at any resolution) is resized to ``scaled_size`` (h, w); padded at the bottom/right
    to at least the crop size; cropped to ``crop_box`` = (top, left, height, width) in that scaled
    frame; then mirrored left-right if ``flip``.
    """

    scaled_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    flip: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop_box[2], self.crop_box[3]


INDEX_COLUMN = "example_index"


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``(seed, epoch, index)`` through numpy's ``SeedSequence``
    (well-mixed, so neighbouring indices and epochs give unrelated streams)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def with_example_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` plus an integer column ``example_index`` = row number (what a seeded
    :class:`SegmentationTransform` derives each example's augmentation from)."""
    if INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))


class AugmentationEpochCallback(TrainerCallback):
    """Tells a seeded training :class:`SegmentationTransform` the current epoch at each epoch start
    (``Trainer`` calls ``on_epoch_begin`` before it creates the epoch's data iterator, also when it
    resumes mid-epoch, where ``state.epoch`` is the fractional epoch of the checkpoint). With
    ``dataloader_persistent_workers`` the workers would keep a stale copy, so it is refused."""

    def __init__(self, transform: "SegmentationTransform"):
        self.transform = transform

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
            raise ValueError("seeded augmentation needs fresh data-loader workers each epoch: do not combine "
                             "--dataloader_persistent_workers with a seeded training transform")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = int(math.floor((state.epoch or 0.0) + 1e-6))


def sample_geometry(
    size: tuple[int, int],
    crop_size: Optional[tuple[int, int]] = None,
    min_scale: float = 1.0,
    max_scale: float = 1.0,
    hflip: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Geometry:
    """Draw a random rescale in [min_scale, max_scale] of ``size`` (h, w), a crop of ``crop_size``
    (default ``size``) and a flip with probability 0.5 if ``hflip``; draws from ``generator``
    (default: torch's global RNG)."""
    if min_scale <= 0 or max_scale < min_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    height, width = size
    crop_h, crop_w = crop_size if crop_size is not None else size
    u = torch.rand((), generator=generator).item()
    scale = min_scale + (max_scale - min_scale) * u
    scaled_h, scaled_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    top = int(torch.randint(0, max(scaled_h, crop_h) - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, max(scaled_w, crop_w) - crop_w + 1, (), generator=generator))
    flip = bool(hflip and torch.rand((), generator=generator).item() < 0.5)
    return Geometry((scaled_h, scaled_w), (top, left, crop_h, crop_w), flip)


def apply_geometry(
    x: torch.Tensor, geometry: Geometry, interpolation: str = "bilinear", fill: float = 0.0
) -> torch.Tensor:
    """Apply ``geometry`` to ``x`` of shape (..., H, W) (any H, W: the same view, any resolution).

    ``interpolation``: ``"bilinear"`` (images, logits; float or uint8) or ``"nearest"``
    (label maps; nearest-exact, pixel-centre aligned like bilinear). ``fill``: padding value.
    """
    lead = x.shape[:-2]
    y = x.reshape(-1, *x.shape[-2:]) if x.dim() != 3 else x
    if tuple(y.shape[-2:]) != tuple(geometry.scaled_size):
        mode = {"bilinear": TF.InterpolationMode.BILINEAR, "nearest": TF.InterpolationMode.NEAREST_EXACT}[interpolation]
        y = TF.resize(y, list(geometry.scaled_size), interpolation=mode, antialias=interpolation == "bilinear")
    top, left, crop_h, crop_w = geometry.crop_box
    pad_h, pad_w = max(0, top + crop_h - y.shape[-2]), max(0, left + crop_w - y.shape[-1])
    if pad_h or pad_w:
        y = nnf.pad(y, (0, pad_w, 0, pad_h), value=fill)
    y = y[..., top : top + crop_h, left : left + crop_w]
    if geometry.flip:
        y = y.flip(-1)
    return y.reshape(*lead, crop_h, crop_w)


def _image_tensor(image) -> torch.Tensor:
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return image


def _label_tensor(label) -> torch.Tensor:
    if isinstance(label, torch.Tensor):
        return label
    arr = np.array(label)
    if arr.ndim != 2:
        raise DataValidationError(f"a label mask must be single-channel (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DataValidationError(f"label values must be 0..255, got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    return torch.from_numpy(arr)


@dataclass
class SegmentationTransform:
    """Paired image+mask transform for ``Dataset.with_transform`` (batch of ``image``/``label``).

    Returns ``pixel_values`` (3, H, W) float, normalised with ``image_mean``/``image_std``, and
    ``labels`` (H, W) long (255 = ignore, also on padding). Train: optional resize to ``resize``,
    random rescale, padded random crop of ``crop`` (default: the resized/original size), random
    horizontal flip (geometry from :func:`sample_geometry`). Eval: image resized to ``resize`` if
    set; label kept at its original size if ``eval_full_resolution`` else resized (nearest) to the
    image size. With ``return_geometry`` each example also carries its :class:`Geometry`
    (train only).

    Randomness: with ``seed`` set and batches that carry ``example_index`` (see
    :func:`with_example_index`), example ``i`` of epoch ``epoch`` uses
    :func:`augmentation_generator` ``(seed, epoch, i)``, independent of any global RNG, data order,
    prefetching or number of processes (:class:`AugmentationEpochCallback` keeps ``epoch`` current).
    Otherwise it draws from torch's global RNG. ``example_index`` is passed through to the output
    only with ``return_index``.
    """

    image_mean: Sequence[float]
    image_std: Sequence[float]
    train: bool
    resize: Optional[tuple[int, int]] = None
    crop: Optional[tuple[int, int]] = None
    min_scale: float = 1.0
    max_scale: float = 1.0
    hflip: bool = False
    eval_full_resolution: bool = True
    return_geometry: bool = False
    seed: Optional[int] = None
    epoch: int = 0
    return_index: bool = False
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self._mean = torch.tensor(list(self.image_mean), dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(list(self.image_std), dtype=torch.float32).view(-1, 1, 1)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / 255.0 - self._mean) / self._std

    def geometry_for(self, image_size: tuple[int, int], index: Optional[int] = None) -> Geometry:
        """The training geometry of an example of ``image_size``; seeded by ``(seed, epoch, index)``
        when both ``seed`` and ``index`` are known."""
        base = self.resize or image_size
        generator = None
        if self.seed is not None and index is not None:
            generator = augmentation_generator(self.seed, self.epoch, index)
        return sample_geometry(base, self.crop or base, self.min_scale, self.max_scale, self.hflip, generator)

    def transform_example(self, image, label=None, index: Optional[int] = None,
                          source_size: Optional[tuple[int, int]] = None):
        """One example (``index``: its row, for seeded augmentation): returns
        (pixel_values, labels or None, geometry or None). ``source_size``: the original (h, w) when
        ``image`` is a resized copy of it (:mod:`c2vkd_hf.decoded`); the geometry is drawn from it and
        the mask must have it."""
        img = _image_tensor(image)
        lab = _label_tensor(label) if label is not None else None
        size = tuple(source_size) if source_size is not None else tuple(img.shape[-2:])
        if lab is not None and tuple(lab.shape[-2:]) != size:
            raise DataValidationError(
                f"image is {size} (HxW) but its mask is {tuple(lab.shape[-2:])}"
            )
        if self.train:
            geometry = self.geometry_for(size, index)
            # resize in uint8 first, normalise, then pad with 0 = the mean colour after normalisation
            scaled = apply_geometry(img, Geometry(geometry.scaled_size, (0, 0, *geometry.scaled_size)))
            pixel_values = apply_geometry(self.normalize(scaled), geometry, "bilinear", fill=0.0)
            labels = None
            if lab is not None:
                labels = apply_geometry(lab, geometry, "nearest", fill=IGNORE_INDEX).long()
            return pixel_values, labels, geometry
        size = tuple(img.shape[-2:])
        if self.resize is not None and tuple(self.resize) != size:
            img = TF.resize(img, list(self.resize), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        pixel_values = self.normalize(img)
        labels = None
        if lab is not None:
            if not self.eval_full_resolution and tuple(lab.shape) != tuple(img.shape[-2:]):
                lab = TF.resize(lab[None], list(img.shape[-2:]), interpolation=TF.InterpolationMode.NEAREST_EXACT)[0]
            labels = lab.long()
        return pixel_values, labels, None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        labels_in = batch.get("label")
        indices = batch.get(INDEX_COLUMN)
        out: dict[str, list] = {"pixel_values": [], "labels": []}
        geometries = []
        for i, image in enumerate(batch["image"]):
            index = int(indices[i]) if indices is not None else None
            pv, lab, geometry = self.transform_example(image, labels_in[i] if labels_in is not None else None, index)
            out["pixel_values"].append(pv)
            out["labels"].append(lab)
            geometries.append(geometry)
        if labels_in is None:
            del out["labels"]
        if self.return_geometry:
            out["geometry"] = geometries
        if self.return_index and indices is not None:
            out[INDEX_COLUMN] = [int(i) for i in indices]
        return out


def build_transform(
    args: DataArguments, image_mean: Sequence[float], image_std: Sequence[float], train: bool,
    seed: Optional[int] = None,
) -> SegmentationTransform:
    """The train or eval :class:`SegmentationTransform` described by ``args``.

    ``image_mean``/``image_std`` are the student's (e.g. its image processor's), in [0, 1] units.
    ``seed``: seeds the training augmentation per example (see :class:`SegmentationTransform`).
    """
    resize = None
    if args.resize_height is not None or args.resize_width is not None:
        if args.resize_height is None or args.resize_width is None:
            raise ValueError("--resize_height and --resize_width must be given together")
        resize = (args.resize_height, args.resize_width)
    crop = None
    if args.crop_height is not None or args.crop_width is not None:
        if args.crop_height is None or args.crop_width is None:
            raise ValueError("--crop_height and --crop_width must be given together")
        crop = (args.crop_height, args.crop_width)
    return SegmentationTransform(
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
        train=train,
        resize=resize,
        crop=crop,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        hflip=args.hflip,
        eval_full_resolution=args.eval_full_resolution,
        seed=seed if train else None,
    )


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` (B, 3, H, W) and ``labels`` (B, H, W); other keys become lists."""
    if not examples:
        raise ValueError("collate_fn got an empty batch")
    batch: dict[str, Any] = {}
    shapes = {tuple(e["pixel_values"].shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch have different sizes {sorted(shapes)}: set --resize_height/--resize_width "
            "(and a crop size for training) or use a batch size of 1"
        )
    batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
    if "labels" in examples[0] and examples[0]["labels"] is not None:
        shapes = {tuple(e["labels"].shape) for e in examples}
        if len(shapes) > 1:
            raise ValueError(
                f"labels in one batch have different sizes {sorted(shapes)} (eval labels are kept at their "
                "original resolution): use --per_device_eval_batch_size 1 or --eval_full_resolution false"
            )
        batch["labels"] = torch.stack([e["labels"] for e in examples])
    for key in examples[0]:
        if key not in ("pixel_values", "labels"):
            batch[key] = [e[key] for e in examples]
    return batch
