"""Inference and evaluation: sliding windows, multi-scale + flip test-time augmentation, mIoU on a dataset."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from .config import IGNORE_INDEX
from .data import VALID_SIZES, collate_fn, default_palette, unpad_to_labels
from .metrics import StreamingMeanIoU, class_map


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` pixels, the last window flush with the end."""
    if window >= length:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


@torch.no_grad()
def sliding_window_logits(model: nn.Module, pixel_values: torch.Tensor, window: tuple[int, int],
                          stride: Optional[tuple[int, int]] = None, *, max_batch: int = 8) -> torch.Tensor:
    """Logits of ``model`` over (B, C, H, W) images from overlapping ``window`` = (h, w) crops.

    Offsets every ``stride`` (default: 2/3 of the window) with the last window flush with the image
    border; a window larger than the image is clamped to it. Each crop's logits are upsampled
    (bilinear) to the crop and averaged where crops overlap, giving (B, K, H, W). When one window
    covers the whole image this is exactly ``model(pixel_values).logits`` (at the model's own output
    resolution). Crops of all images are batched, at most ``max(max_batch, B)`` images per forward.
    """
    height, width = pixel_values.shape[-2:]
    wh, ww = min(int(window[0]), height), min(int(window[1]), width)
    if (wh, ww) == (height, width):
        return model(pixel_values=pixel_values).logits
    sh, sw = stride if stride is not None else (max(1, 2 * wh // 3), max(1, 2 * ww // 3))
    if sh < 1 or sw < 1:
        raise ValueError(f"the sliding-window stride must be positive, got {(sh, sw)}")
    offsets = [(y, x) for y in _window_starts(height, wh, int(sh)) for x in _window_starts(width, ww, int(sw))]
    batch = pixel_values.shape[0]
    per_call = max(1, max_batch // batch)
    total = count = None
    for first in range(0, len(offsets), per_call):
        group = offsets[first:first + per_call]
        crops = torch.cat([pixel_values[..., y:y + wh, x:x + ww] for y, x in group])
        logits = model(pixel_values=crops).logits.float()
        logits = nn.functional.interpolate(logits, size=(wh, ww), mode="bilinear", align_corners=False)
        if total is None:
            total = logits.new_zeros(batch, logits.shape[1], height, width)
            count = logits.new_zeros(1, 1, height, width)
        for (y, x), part in zip(group, logits.split(batch)):
            total[..., y:y + wh, x:x + ww] += part
            count[..., y:y + wh, x:x + ww] += 1
    return total / count


@torch.no_grad()
def segmentation_scores(model: nn.Module, pixel_values: torch.Tensor, *, output_size: Optional[tuple] = None,
                        scales: tuple = (1.0,), flip: bool = False, window: Optional[tuple[int, int]] = None,
                        stride: Optional[tuple[int, int]] = None, max_batch: int = 8,
                        valid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K, H', W') class scores of ``model`` on normalised images, resized (bilinear) to
    ``output_size`` (default: the image size); their argmax is the prediction.

    ``valid_sizes``: a padded batch of images of different sizes (:data:`~c2vkd_hf.data.VALID_SIZES`);
    each image's scores are then resampled from its own part onto its own label inside ``output_size``
    (:func:`~c2vkd_hf.data.unpad_to_labels`) instead of the whole padded map being resized.

    * one view (``scales == (1.0,)``, no ``flip``): the logits, from the whole image or from
      :func:`sliding_window_logits` when ``window`` is set; without a window this is exactly the plain
      ``model(pixel_values).logits`` upsampled.
    * several views (multi-scale and/or horizontal flip test-time augmentation): the image is resized
      by each scale (bilinear), optionally flipped, segmented (whole or sliding window at that scale),
      flipped back, resized to ``output_size``; the returned scores are the mean softmax
      probability over the views.
    """
    scales = tuple(float(s) for s in scales) or (1.0,)
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    height, width = pixel_values.shape[-2:]
    size = tuple(int(v) for v in (output_size or (height, width)))

    def to_output(maps: torch.Tensor) -> torch.Tensor:
        if valid_sizes is not None:
            return unpad_to_labels(maps, valid_sizes, (height, width), size)
        if tuple(maps.shape[-2:]) != size:
            maps = nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps

    def view(images: torch.Tensor, single: bool = False) -> torch.Tensor:
        if window is not None:
            logits = sliding_window_logits(model, images, window, stride, max_batch=max_batch)
        else:
            logits = model(pixel_values=images).logits
        logits = logits.float()
        if single:
            return to_output(logits)
        # one view of several, onto the grid where the views are averaged: the output (the padded input's
        # grid when the images are padded, mapped onto each label at the end)
        grid = size if valid_sizes is None else (height, width)
        if tuple(logits.shape[-2:]) != grid:
            logits = nn.functional.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
        return logits

    if scales == (1.0,) and not flip:
        return view(pixel_values, single=True)
    probs = None
    for scale in scales:
        scaled = pixel_values
        if scale != 1.0:
            scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = nn.functional.interpolate(pixel_values, size=scaled_size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = view(scaled.flip(-1)) if flipped else view(scaled)
            if flipped:
                logits = logits.flip(-1)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
    probs = probs / (len(scales) * (2 if flip else 1))
    return probs if valid_sizes is None else to_output(probs)


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, num_labels: int, *, batch_size: int = 8,
                   model_mean_std: Optional[tuple] = None, data_mean_std: Optional[tuple] = None,
                   progress: bool = True, scales: tuple = (1.0,), flip: bool = False,
                   window: Optional[tuple[int, int]] = None, stride: Optional[tuple[int, int]] = None,
                   accelerator=None, predictions_dir: Optional[str] = None, palette=None,
                   max_predictions: Optional[int] = None, desc: str = "evaluating") -> dict[str, Any]:
    """mIoU of ``model`` on a transformed dataset (``pixel_values``/``labels``), predictions at the label
    size. Re-normalises inputs when the model's mean/std differ from the data's.

    By default the logits are upsampled bilinearly to the labels and arg-maxed. ``scales``/``flip``
    (multi-scale + horizontal-flip test-time augmentation) and ``window``/``stride`` (sliding-window
    inference for images larger than the training crops) are those of :func:`segmentation_scores`.

    ``accelerator`` (an ``accelerate.Accelerator``): each process evaluates every
    ``num_processes``-th image (no padding, so no image counts twice) on ``accelerator.device`` and the
    confusion matrices are summed across processes (:meth:`StreamingMeanIoU.reduce`); every process
    returns the same metrics. ``predictions_dir``: colourised predictions (``palette``, default
    :func:`default_palette`) saved as ``<dataset index>.png``, for the first ``max_predictions`` images
    (all when ``None``). ``desc`` labels the progress bar.
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from .data import colorize
    from .models import renormalize

    model.eval()
    device = next(model.parameters()).device
    indices = list(range(len(dataset)))
    if accelerator is not None:
        device = accelerator.device
        model.to(device)
        indices = indices[accelerator.process_index::accelerator.num_processes]
        progress = progress and accelerator.is_local_main_process
    if predictions_dir is not None:
        os.makedirs(predictions_dir, exist_ok=True)
        palette = palette or default_palette(num_labels)
    metric = StreamingMeanIoU(num_labels, ignore_index=IGNORE_INDEX)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_fn)
    position = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        pixel_values = batch["pixel_values"].to(device)
        if model_mean_std is not None and data_mean_std is not None:
            pixel_values = renormalize(pixel_values, *data_mean_std, *model_mean_std)
        labels = batch["labels"].to(device)
        scores = segmentation_scores(model, pixel_values, output_size=labels.shape[-2:], scales=scales, flip=flip,
                                     window=window, stride=stride, max_batch=batch_size,
                                     valid_sizes=batch.get(VALID_SIZES))
        preds = class_map(scores).cpu()
        metric.update(preds, labels.cpu())
        if predictions_dir is not None:
            for pred in preds:
                index = indices[position]
                position += 1
                if max_predictions is None or index < max_predictions:
                    colorize(pred, palette).save(os.path.join(predictions_dir, f"{index:05d}.png"))
    if accelerator is not None and accelerator.num_processes > 1:
        metric.reduce()
    return metric.compute()
