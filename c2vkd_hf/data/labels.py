"""Class names and label values: labels files, palettes, colour <-> index masks, and the label mapping.

The label mapping (:class:`LabelMapping`) is applied once, when the data is loaded: the dataset's own
void value (``--dataset_ignore_index``, else the labels file's ``ignore_index``) becomes 255, and with
``--reduce_labels`` 0 becomes 255 and every other value v becomes v - 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

from ..config import IGNORE_INDEX, DataArguments
from .base import DataValidationError


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


@dataclass(frozen=True)
class LabelMapping:
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


def resolve_ignore(args: DataArguments, file_ignore: Optional[int]) -> Optional[int]:
    """The dataset's void value (``--dataset_ignore_index``, else the labels file's), ``None`` when already 255."""
    void = args.dataset_ignore_index if args.dataset_ignore_index is not None else file_ignore
    if void == IGNORE_INDEX:
        return None  # already the internal value
    return void
