"""The built-in synthetic data: procedural street scenes with six classes, at any resolution, offline."""

from __future__ import annotations

import io

import datasets
import numpy as np
import PIL.Image

from ..config import DataArguments
from .base import DataValidationError, SegmentationData
from .checks import encode_png


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
        labels.append({"bytes": encode_png(label), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _encode_rgb_png(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(arr, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def load_synthetic(args: DataArguments) -> SegmentationData:
    """The synthetic street-scene dataset with the sizes and limits of ``args``."""
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
