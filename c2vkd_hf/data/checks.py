"""Validation of single image and mask files: readable, the same size, label values that are classes after mapping.

Every problem raises (or is collected into) a :class:`~c2vkd_hf.data.base.DataValidationError` naming
the file, before any training starts. Masks whose values change under the label mapping are
re-encoded (PNG) in memory.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

import numpy as np
import PIL.Image

from ..config import IGNORE_INDEX
from ..images import open_source, oriented_size
from .base import DataValidationError
from .labels import LabelMapping

LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
_MAX_PROBLEMS = 10  # how many per-file problems one error message reports


def _check_image(source: Union[str, bytes], where: str) -> tuple[int, int]:
    """Open, verify and cheaply decode an image; returns its (width, height)."""
    try:
        with open_source(source) as im:
            im.verify()  # reads the whole file: chunk CRCs for PNG, structure for others
        with open_source(source) as im:
            size = oriented_size(im)
            if im.format != "PNG":  # PNG is fully checked by verify; others need a (cheap) decode
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataValidationError(f"{where}: image cannot be read ({type(e).__name__}: {e})") from None
    return size


def encode_png(arr: np.ndarray) -> bytes:
    """A class-index mask as the bytes of a fast, lossless PNG (mode ``"L"``)."""
    buffer = io.BytesIO()
    # zlib's run-length strategy (compress_type 3, Z_RLE): faster and smaller than the default on masks
    PIL.Image.fromarray(arr.astype(np.uint8, copy=False), mode="L").save(
        buffer, format="PNG", compress_level=1, compress_type=3
    )
    return buffer.getvalue()


def _check_mask(
    source: Union[str, bytes], where: str, mapping: LabelMapping
) -> tuple[tuple[int, int], Optional[bytes]]:
    """Read a mask, check its values after mapping; returns ((w, h), new PNG bytes or None if unchanged)."""
    if isinstance(source, str) and source.lower().endswith(LOSSY_EXTENSIONS):
        raise DataValidationError(
            f"{where}: mask is stored in a lossy format ({Path(source).suffix}); class-index masks must be "
            "lossless (PNG/BMP/TIFF)"
        )
    try:
        with open_source(source) as im:
            im.verify()
        with open_source(source) as im:
            size = oriented_size(im)
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
    return size, encode_png(new)


def check_pair(image_src, label_src, where_image: str, where_label: str, mapping: LabelMapping):
    """Checks an image and its mask (readable, same size, label values); the remapped mask's PNG bytes or None."""
    image_size = _check_image(image_src, where_image)
    mask_size, new_bytes = _check_mask(label_src, where_label, mapping)
    if image_size != mask_size:
        raise DataValidationError(
            f"{where_image} is {image_size[0]}x{image_size[1]} (WxH) but its mask {where_label} is "
            f"{mask_size[0]}x{mask_size[1]}"
        )
    return new_bytes


def raise_collected(problems: list[str], split: str, total: int) -> None:
    """Raises one :class:`DataValidationError` listing a split's invalid examples (the first few), if any."""
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DataValidationError(
        f"{len(problems)} of {total} {split} examples are invalid:\n  " + "\n  ".join(shown) + more
    )
