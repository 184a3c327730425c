"""Opening an image file (a path or its bytes) and its size as ``datasets`` decodes it; imports nothing from the package."""

from __future__ import annotations

import io
from typing import Union

import PIL.Image


def open_source(source: Union[str, bytes]):
    """The PIL image of a file path or of encoded bytes (not decoded yet)."""
    return PIL.Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def oriented_size(im: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF rotation that ``datasets`` applies on decode."""
    w, h = im.size
    if im.format == "PNG":  # reading a PNG's EXIF means decoding it; PNG orientation tags are rare
        return w, h
    try:
        orientation = im.getexif().get(PIL.Image.ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - broken EXIF is not our concern here
        orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
