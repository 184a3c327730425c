"""Paired image+mask transforms (train: rescale, crop, flip as an explicit :class:`Geometry`; eval: resize), collate.

Transforms (:func:`build_transform`) are applied with ``Dataset.with_transform``. Training geometry
(random rescale, padded crop, horizontal flip) is drawn by :func:`sample_geometry` as an explicit
:class:`Geometry` and applied by :func:`apply_geometry`, so the same geometry can be replayed on other
maps of the same view (e.g. cached teacher logits at any resolution). With a seed, each example's
geometry is a pure function of ``(seed, epoch, example index)`` (:func:`augmentation_generator`), so a
resumed run augments exactly like an uninterrupted one, whatever the data loader prefetched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as TF
from transformers import TrainerCallback

from ..config import IGNORE_INDEX, DataArguments
from .base import DataValidationError


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
#: Batch key added by :func:`collate_fn` when it pads images of different sizes: (B, 4) long, per
#: image its own input size and label size ``(h, w, H, W)`` inside the padded tensors.
VALID_SIZES = "valid_sizes"


def keep_ratio_size(size: Sequence[int], shortest_edge: Optional[int] = None,
                    longest_edge: Optional[int] = None) -> tuple[int, int]:
    """Aspect-preserving resize of ``size`` (h, w): ``s = min(shortest_edge / min(h, w), longest_edge / max(h, w))``
    over the bounds given, and ``(round(s h), round(s w))`` (at least 1 each). As image processors'
    ``shortest_edge``/``longest_edge`` and mmseg's ``Resize(keep_ratio=True)``."""
    height, width = int(size[0]), int(size[1])
    scales = []
    if shortest_edge is not None:
        scales.append(shortest_edge / min(height, width))
    if longest_edge is not None:
        scales.append(longest_edge / max(height, width))
    if not scales:
        return height, width
    scale = min(scales)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def seeded_generator(*words: int) -> torch.Generator:
    """A ``torch.Generator`` seeded from the non-negative integers ``words`` through numpy's ``SeedSequence``
    (well-mixed, so neighbouring keys give unrelated streams)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one example's augmentation, from ``(seed, epoch, index)`` (:func:`seeded_generator`)."""
    return seeded_generator(int(seed) & 0xFFFFFFFF, epoch, index)


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


def image_tensor(image) -> torch.Tensor:
    """A PIL image or (H, W, 3) array as a (3, H, W) uint8 tensor (a tensor is returned as it is)."""
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return image


def label_tensor(label) -> torch.Tensor:
    """A single-channel mask as an (H, W) uint8 tensor; other shapes or values outside 0..255 are refused."""
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

    Aspect-preserving resize: with ``shortest_edge``/``longest_edge`` instead of ``resize``, each image
    is first resized to :func:`keep_ratio_size` of its own size (train: the base of the rescale and
    crop; eval: the input size).

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
    shortest_edge: Optional[int] = None
    longest_edge: Optional[int] = None
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self._mean = torch.tensor(list(self.image_mean), dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(list(self.image_std), dtype=torch.float32).view(-1, 1, 1)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / 255.0 - self._mean) / self._std

    def resized_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) an image of ``image_size`` is resized to before anything else: ``resize``, else
        :func:`keep_ratio_size` with ``shortest_edge``/``longest_edge``, else its own size."""
        if self.resize is not None:
            return tuple(int(v) for v in self.resize)
        return keep_ratio_size(image_size, self.shortest_edge, self.longest_edge)

    def geometry_for(self, image_size: tuple[int, int], index: Optional[int] = None) -> Geometry:
        """The training geometry of an example of ``image_size``; seeded by ``(seed, epoch, index)``
        when both ``seed`` and ``index`` are known."""
        base = self.resized_size(image_size)
        generator = None
        if self.seed is not None and index is not None:
            generator = augmentation_generator(self.seed, self.epoch, index)
        return sample_geometry(base, self.crop or base, self.min_scale, self.max_scale, self.hflip, generator)

    def transform_example(self, image, label=None, index: Optional[int] = None,
                          source_size: Optional[tuple[int, int]] = None):
        """One example (``index``: its row, for seeded augmentation): returns
        (pixel_values, labels or None, geometry or None). ``source_size``: the original (h, w) when
        ``image`` is a resized copy of it (:mod:`c2vkd_hf.data.decoded`); the geometry is drawn from it and
        the mask must have it."""
        img = image_tensor(image)
        lab = label_tensor(label) if label is not None else None
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
        target = self.resized_size(size if source_size is None else source_size)
        if target != size:
            img = TF.resize(img, list(target), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
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
        shortest_edge=args.resize_shortest_edge,
        longest_edge=args.resize_longest_edge,
    )


def _pad_to(x: torch.Tensor, size: Sequence[int], value: float) -> torch.Tensor:
    return nnf.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]), value=value)


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` (B, 3, H, W) and ``labels`` (B, H, W); other keys become lists.

    Examples of different sizes (evaluation at each image's own size) are padded at the bottom and
    right to the largest height and width, images with 0 (the mean colour after normalisation) and
    labels with the ignore value, and the batch gets :data:`VALID_SIZES`, each image's own input and
    label size, from which :func:`unpad_to_labels` maps the model's output back onto each label."""
    if not examples:
        raise ValueError("collate_fn got an empty batch")
    batch: dict[str, Any] = {}
    image_shapes = [tuple(e["pixel_values"].shape[-2:]) for e in examples]
    has_labels = "labels" in examples[0] and examples[0]["labels"] is not None
    label_shapes = [tuple(e["labels"].shape[-2:]) for e in examples] if has_labels else image_shapes
    if len(set(image_shapes)) == 1 and len(set(label_shapes)) == 1:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples])
        if has_labels:
            batch["labels"] = torch.stack([e["labels"] for e in examples])
    else:
        top = tuple(max(s[k] for s in image_shapes) for k in (0, 1))
        batch["pixel_values"] = torch.stack([_pad_to(e["pixel_values"], top, 0.0) for e in examples])
        if has_labels:
            label_top = tuple(max(s[k] for s in label_shapes) for k in (0, 1))
            batch["labels"] = torch.stack([_pad_to(e["labels"], label_top, IGNORE_INDEX) for e in examples])
        batch[VALID_SIZES] = torch.tensor([[*i, *l] for i, l in zip(image_shapes, label_shapes)], dtype=torch.long)
    for key in examples[0]:
        if key not in ("pixel_values", "labels"):
            batch[key] = [e[key] for e in examples]
    return batch


def unpad_to_labels(maps: torch.Tensor, valid_sizes: torch.Tensor, input_size: Sequence[int],
                    label_size: Sequence[int]) -> torch.Tensor:
    """Score maps of a padded batch, each resampled from its own image onto its own label grid.

    ``maps`` (B, C, h, w) cover the padded input of ``input_size`` (Hp, Wp); image ``i`` fills its top-left
    ``(h_i, w_i)`` (``valid_sizes[i, :2]``) and its label the top-left ``(H_i, W_i)`` (``valid_sizes[i, 2:]``)
    of the (B, ``label_size``) labels. Output (B, C, *label_size): label pixel ``(y, x)`` of image ``i`` takes
    the bilinear sample of ``maps[i]`` at map coordinates ``u = (y + 1/2) c_i / H_i - 1/2`` with ``c_i = h h_i / Hp``
    the image's extent in map cells (likewise for ``x``), clamped to ``[0, ceil(c_i) - 1]``: exactly
    ``interpolate(maps[i, :, :c_i, :], (H_i, W_i), mode="bilinear")`` of the image's own part of the map;
    0 outside its label."""
    batch, channels, map_h, map_w = maps.shape
    out = maps.new_zeros(batch, channels, int(label_size[0]), int(label_size[1]))

    def coordinates(own: int, padded: int, cells: int, label: int) -> torch.Tensor:
        extent = cells * own / float(padded)  # the image's extent in map cells
        u = (torch.arange(label, device=maps.device, dtype=torch.float32) + 0.5) * extent / label - 0.5
        u = u.clamp(0.0, max(0.0, math.ceil(extent - 1e-6) - 1.0))
        return (2 * u + 1) / cells - 1  # grid_sample's normalised coordinate (align_corners=False)

    for i, (h, w, label_h, label_w) in enumerate(valid_sizes.tolist()):
        ys = coordinates(h, int(input_size[0]), map_h, label_h)
        xs = coordinates(w, int(input_size[1]), map_w, label_w)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        out[i, :, :label_h, :label_w] = nnf.grid_sample(maps[i:i + 1].float(), grid[None], mode="bilinear",
                                                        padding_mode="border", align_corners=False)[0].to(maps.dtype)
    return out
