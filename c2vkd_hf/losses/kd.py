"""KD: pixel-wise knowledge distillation.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531, applied per
pixel as in the segmentation-distillation literature (recipe T = 1, weight 1 as used by CIRKD: Yang et
al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022).

``L_kd = T^2 * mean_pixels KL(softmax(z_t / T) || softmax(z_s / T))``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .base import LogitDistillationLoss
from .common import check_positive, float32_compute, valid_pixel_logits, zero_like_graph
from .registry import register_loss

__all__ = ["kd_loss", "KDLoss"]


@float32_compute
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel KD. With ``labels``, both logits go to the label grid and ignored pixels are dropped;
    with ``labels=None`` the teacher is resized to the student grid and every pixel counts."""
    temperature = check_positive("temperature", temperature)
    _, (zs, zt) = valid_pixel_logits(student_logits, teacher_logits, labels, ignore_index)
    if zs.shape[0] == 0:
        return zero_like_graph(student_logits)
    log_ps = F.log_softmax(zs / temperature, dim=1)
    log_pt = F.log_softmax(zt / temperature, dim=1)
    # KL(p_t || p_s) per row, averaged over rows ("batchmean" divides the sum by the row count).
    return temperature**2 * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


@register_loss("kd")
class KDLoss(LogitDistillationLoss):
    """CE + pixel KD. Terms: ``ce``, ``kd``. Defaults: ``kd_weight=1.0``, ``temperature=1.0``."""

    term, default_weight, default_temperature = "kd", 1.0, 1.0
    loss_fn = staticmethod(kd_loss)
