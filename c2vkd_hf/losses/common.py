"""Shared helpers for the distillation losses: resizing, ignore handling, cross-entropy, validation.

Conventions used by every loss in :mod:`c2vkd_hf.losses`:

* logits are ``(B, K, h, w)``; labels ``(B, H, W)`` integer maps where ``ignore_index`` marks void;
* when labels are given, logits are resized bilinearly (``align_corners=False``) to the label grid
  and every average is over valid (non-ignored) pixels;
* all arithmetic runs in float32 with autocast disabled (:func:`float32_compute`), so the losses are
  stable when the models run under ``torch.autocast`` (fp16 or bf16);
* teacher tensors are detached inside the loss: gradients never reach the teacher.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "MASK_MARGIN",
    "float32_compute",
    "resize",
    "resize_labels",
    "flatten_valid",
    "valid_pixel_logits",
    "mask_target",
    "zero_like_graph",
    "cross_entropy",
    "check_weight",
    "check_positive",
    "check_unit_interval",
]

#: Masked (excluded) logits are set this far below the smallest logit of their row. exp(-1e4) is
#: exactly 0 in every floating format, and 1e4 itself is finite in fp16, bf16 and fp32.
MASK_MARGIN = 1.0e4

_F = TypeVar("_F", bound=Callable)


def float32_compute(fn: _F) -> _F:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    Inside, the losses cast their inputs to float32 explicitly; disabling autocast keeps matmuls and
    convolutions inside the loss from being silently re-cast to half precision.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = "cpu"
        for a in list(args) + list(kwargs.values()):
            if torch.is_tensor(a):
                device_type = a.device.type
                break
        try:
            ctx = torch.autocast(device_type=device_type, enabled=False)
        except RuntimeError:  # a device type without autocast support
            return fn(*args, **kwargs)
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size`` (``align_corners=False``); no-op if equal.

    When a dimension shrinks, the resize is antialiased (a bilinear kernel widened to the scale
    factor, like PIL's bilinear resize) so that downsampled maps average their inputs instead of
    sampling a sparse subset of them.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(B, H, W)`` integer labels to ``size``."""
    size = (int(size[0]), int(size[1]))
    if tuple(labels.shape[-2:]) == size:
        return labels.long()
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return out[:, 0].long()


def flatten_valid(
    labels: Optional[torch.Tensor], ignore_index: int, *maps: torch.Tensor
) -> Tuple[Optional[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """Flatten ``(B, K, H, W)`` maps to ``(N, K)`` rows of valid pixels.

    Returns ``(targets, rows)`` where ``targets`` is the ``(N,)`` long tensor of valid labels (or
    ``None`` when ``labels`` is ``None``, in which case every pixel is kept).
    """
    rows = tuple(m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps)
    if labels is None:
        return None, rows
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    return flat[valid], tuple(r[valid] for r in rows)


def valid_pixel_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int
) -> Tuple[Optional[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """The per-pixel logit rows a pixel-wise logit loss compares: ``(targets, (z_s, z_t))``, each ``z`` of shape
    ``(N, K)`` in float32. With ``labels`` both logits are resized bilinearly to the label grid and only the
    valid pixels are kept (``targets``: their labels); with ``labels=None`` the teacher is resized to the
    student's grid, every pixel is kept and ``targets`` is ``None``. The teacher is detached."""
    size = labels.shape[-2:] if labels is not None else student_logits.shape[-2:]
    zs = resize(student_logits.float(), size)
    zt = resize(teacher_logits.detach().float(), size)
    return flatten_valid(labels, ignore_index, zs, zt)


def class_balanced_weights(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
                           power: float = 1.0) -> torch.Tensor:
    """Pixel weights, shaped like ``labels``, that give rare classes more weight:
    ``w_i = n_{y_i}^-p / sum_k n_k^(1 - p)`` for a valid pixel of class ``y_i`` (``n_k``: the batch's
    pixels of class ``k``, the sum over classes present), 0 for an ignored pixel; they sum to 1 (all 0
    when no pixel is valid). ``p = 0`` is the plain mean over valid pixels; ``p = 1`` gives every class
    present the same total weight ``1 / |C|``; in between, class ``k`` weighs ``n_k^(1 - p)``. A
    pixel-averaged distillation term spends nearly all of its signal on the frequent classes; with
    ``p = 1`` a class of 1% of the pixels counts as much as one of 40% (the class-level view of DIST's
    intra-class relation, Huang et al., NeurIPS 2022, applied to a per-pixel loss)."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    counts = torch.bincount(target[valid].reshape(-1), minlength=num_classes).float()
    present = counts > 0
    per_class = torch.where(present, counts.clamp_min(1).pow(-float(power)), torch.zeros_like(counts))
    total = (counts * per_class).sum().clamp_min(1e-12)
    return (per_class / total)[target] * valid.float()


def mask_target(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Replace each row's target logit by a value :data:`MASK_MARGIN` below the row's minimum.

    ``z`` is ``(N, K)`` float32, ``target`` ``(N,)``. The masked class then has probability exactly
    0 in a softmax, for any logit scale (a fixed fill such as -1e4 would not dominate logits of
    -1e4 themselves), without ``-inf`` arithmetic. The fill value carries no gradient.
    """
    fill = z.detach().amin(dim=1, keepdim=True) - MASK_MARGIN
    onehot = torch.zeros_like(z, dtype=torch.bool).scatter_(1, target[:, None], True)
    return torch.where(onehot, fill, z)


def zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A float32 scalar 0 that is still connected to ``x``'s graph (backward gives zero grads)."""
    return x.float().sum() * 0.0


@float32_compute
def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel cross-entropy of ``student_logits`` upsampled to the label grid, mean over valid pixels.

    Returns 0 (connected to the graph) when every pixel is ignored, where PyTorch's mean reduction
    would return NaN.
    """
    labels = labels.long()
    z = resize(student_logits.float(), labels.shape[-2:])
    n_valid = (labels != ignore_index).sum().clamp_min(1)  # no host sync; the sum is 0 if all ignored
    total = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    return total / n_valid


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_weight(name: str, value) -> float:
    """Validate a loss weight: a finite number >= 0."""
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    """Validate a temperature-like constant: a finite number > 0."""
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value) -> float:
    """Validate a mixing coefficient in [0, 1]."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)
