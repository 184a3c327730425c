"""Streaming semantic-segmentation metrics from a confusion matrix.

Definitions (C is the K x K confusion matrix of valid pixels, rows = label, columns = prediction;
pixels whose label is the ignore index, or outside ``0..K-1``, are skipped):

* ``IoU_k = TP_k / (TP_k + FP_k + FN_k)``; NaN when class k occurs neither in the labels nor in the
  predictions (the denominator is 0).
* ``mean_iou`` = nanmean of ``IoU_k``: the mean over the classes that occur in the labels or in the
  predictions. A class that is predicted but absent from the labels counts with IoU 0.
* ``overall_accuracy`` = sum_k TP_k / number of valid pixels.
* ``Acc_k = TP_k / (TP_k + FN_k)`` (NaN for classes absent from the labels);
  ``mean_accuracy`` = nanmean of ``Acc_k``.

Only the K x K int64 matrix is kept, never the predictions, unlike ``evaluate.load("mean_iou")``.

Distributed use: :meth:`StreamingMeanIoU.reduce` sums the matrix across processes. In the
``Trainer`` path (:func:`make_compute_metrics` with ``batch_eval_metrics=True``) the Trainer already
gathers every batch's predictions and labels from all processes before calling ``compute_metrics``,
so each process sees all pixels: do NOT reduce there, or every pixel is counted world-size times.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from .constants import IGNORE_INDEX

__all__ = ["StreamingMeanIoU", "class_map", "logits_to_predictions", "make_compute_metrics",
           "preprocess_logits_for_metrics"]


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def class_map(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The predicted class of every pixel: the index of the highest score along ``dim`` (``(B, K, H, W)`` ->
    ``(B, H, W)``), the first one on ties, NaN counting as highest: exactly ``scores.argmax(dim)``.

    Computed as ``scores.max(dim).indices``, which gives the same indices; on CPU (torch 2.x) ``argmax`` over
    the class dimension of a contiguous ``(B, K, H, W)`` tensor is about 5x slower (measured: 0.72 s against
    0.14 s for 8 x 11 x 360 x 480 on one thread)."""
    return scores.max(dim).indices


class StreamingMeanIoU:
    """Confusion-matrix mIoU, per-class IoU and accuracies, accumulated batch by batch.

    >>> m = StreamingMeanIoU(num_labels=3)
    >>> m.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 255]))
    >>> m.compute()["mean_iou"]
    1.0
    """

    def __init__(self, num_labels: int, ignore_index: int = IGNORE_INDEX):
        if num_labels < 1:
            raise ValueError("num_labels must be positive")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, preds: Any, labels: Any) -> None:
        """Add a batch: integer class maps of the same shape (tensors on any device, or numpy)."""
        preds, labels = _as_tensor(preds), _as_tensor(labels)
        if preds.shape != labels.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
        if preds.is_floating_point() or labels.is_floating_point():
            raise TypeError("update() takes integer class maps; use logits_to_predictions for logits")
        k = self.num_labels
        preds = preds.reshape(-1).to(labels.device, torch.int64)
        labels = labels.reshape(-1).to(torch.int64)
        valid = (labels != self.ignore_index) & (labels >= 0) & (labels < k)
        preds, labels = preds[valid], labels[valid]
        if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= k):
            raise ValueError(f"predictions must be in 0..{k - 1}")
        counts = torch.bincount(labels * k + preds, minlength=k * k)
        self.confusion += counts.reshape(k, k).cpu()

    def reduce(self) -> None:
        """Sum the matrix over all processes when ``torch.distributed`` is initialised (no-op otherwise).

        Not for the Trainer's ``compute_metrics`` path, which already receives gathered batches.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        buf = self.confusion.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.confusion.copy_(buf.cpu())

    def compute(self) -> dict[str, Any]:
        """``{"mean_iou", "per_category_iou", "overall_accuracy", "mean_accuracy", "per_category_accuracy"}``
        (Python floats; per-category lists hold NaN for undefined classes)."""
        conf = self.confusion.to(torch.float64)
        tp = conf.diag()
        gt = conf.sum(dim=1)
        pred = conf.sum(dim=0)
        union = gt + pred - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = conf.sum()
        return {
            "mean_iou": _nanmean(iou),
            "per_category_iou": iou.tolist(),
            "overall_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_accuracy": _nanmean(acc),
            "per_category_accuracy": acc.tolist(),
        }


def _nanmean(x: torch.Tensor) -> float:
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if keep.any() else float("nan")


@torch.no_grad()
def logits_to_predictions(logits: Any, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, K, h, w) logits -> (B, H, W) int64 class map: bilinear upsampling (align_corners=False) to
    ``size``, then argmax. Integer (B, h, w) maps pass through (nearest-resized if needed)."""
    logits = _as_tensor(logits)
    size = tuple(int(s) for s in size)
    if logits.dim() == 3 and not logits.is_floating_point():
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits[:, None].float(), size=size, mode="nearest")[:, 0]
        return logits.long()
    if logits.dim() != 4:
        raise ValueError(f"expected (B, K, h, w) logits, got shape {tuple(logits.shape)}")
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return class_map(logits)


def _first(x: Any) -> Any:
    """Logits are the first element when a model returns a tuple (e.g. logits + hidden states)."""
    while isinstance(x, (tuple, list)):
        x = x[0]
    return x


def make_compute_metrics(
    num_labels: int,
    ignore_index: int = IGNORE_INDEX,
    id2label: Mapping[int, str] | None = None,
) -> Callable[..., dict[str, float]]:
    """``compute_metrics`` for ``Trainer`` with ``TrainingArguments(batch_eval_metrics=True)``.

    transformers 5 calls it once per evaluation batch as
    ``compute_metrics(EvalPrediction(predictions=logits, label_ids=labels), compute_result=is_last)``
    with tensors already gathered across processes (possibly on the accelerator; labels padded with
    -100 across processes, which counts as ignored here). Logits (B, K, h, w) are upsampled bilinearly
    to the label size and arg-maxed; integer maps (from :func:`preprocess_logits_for_metrics`) are
    used as they are. Intermediate calls return ``{}``; the last returns
    ``{"mean_iou", "overall_accuracy", "mean_accuracy", "iou_<class>", ...}`` and resets the state.

    Without ``batch_eval_metrics`` (one call with all predictions as numpy), it works too: the call
    without ``compute_result`` is treated as the final one.
    """
    metric = StreamingMeanIoU(num_labels, ignore_index=ignore_index)
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
    names = [id2label.get(i, str(i)) for i in range(num_labels)]

    def compute_metrics(eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        if compute_result is None:  # not batch_eval_metrics: this is the only call
            compute_result = True
        preds, labels = _first(eval_pred.predictions), _first(eval_pred.label_ids)
        if preds is not None and labels is not None:
            labels = _as_tensor(labels)
            preds = logits_to_predictions(preds, labels.shape[-2:])
            metric.update(preds, labels.to(preds.device))
        if not compute_result:
            return {}
        result = metric.compute()
        metric.reset()
        flat = {
            "mean_iou": result["mean_iou"],
            "overall_accuracy": result["overall_accuracy"],
            "mean_accuracy": result["mean_accuracy"],
        }
        for name, value in zip(names, result["per_category_iou"]):
            flat[f"iou_{name}"] = value
        return flat

    compute_metrics.metric = metric  # type: ignore[attr-defined]
    return compute_metrics


def preprocess_logits_for_metrics(logits: Any, labels: Any) -> torch.Tensor:
    """``Trainer(preprocess_logits_for_metrics=...)`` helper: upsample and arg-max on the device
    before the cross-process gather, so only (B, H, W) class maps travel."""
    return logits_to_predictions(_first(logits), _as_tensor(labels).shape[-2:])
