"""CWD: channel-wise distillation.

Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021
(arXiv 2011.13256). Recipe on logits: tau = 4, weight 3 (as in CIRKD's logit baseline).

Each class channel is turned into a distribution over the ``h * w`` positions:
``L_cwd = tau^2 * mean_{b, c} KL(softmax_hw(z_t[b, c] / tau) || softmax_hw(z_s[b, c] / tau))``.
The teacher is resized to the student's grid; labels are not used (no ignore handling: every
position of every channel takes part).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import IGNORE_INDEX
from .base import DistillationLoss, pick_temperature
from .common import check_positive, check_weight, float32_compute, resize
from .registry import register_loss

__all__ = ["cwd_loss", "CWDLoss"]


@float32_compute
def cwd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation on ``(B, K, h, w)`` logits (teacher resized to the student grid)."""
    tau = check_positive("tau", tau)
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch and channel dims, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, k = student_logits.shape[:2]
    zs = student_logits.float().reshape(b * k, -1)
    zt = resize(teacher_logits.detach().float(), student_logits.shape[-2:]).reshape(b * k, -1)
    log_ps = F.log_softmax(zs / tau, dim=1)
    log_pt = F.log_softmax(zt / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return tau**2 * kl.mean()


@register_loss("cwd")
class CWDLoss(DistillationLoss):
    """CE + channel-wise distillation. Terms: ``ce``, ``cwd``. Defaults: ``kd_weight=3.0``, ``tau=4.0``."""

    def __init__(
        self,
        *,
        kd_weight: Optional[float] = None,
        tau: Optional[float] = None,
        temperature: Optional[float] = None,
        ce_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(ce_weight=ce_weight, ignore_index=ignore_index)
        self.tau = pick_temperature(temperature, tau, 4.0)
        weight = check_weight("kd_weight", 3.0 if kd_weight is None else kd_weight)
        if weight > 0:
            self.weights["cwd"] = weight

    def distillation_terms(self, student_logits, teacher_logits, labels, student_features=None, teacher_features=None):
        return {"cwd": cwd_loss(student_logits, teacher_logits, tau=self.tau)}
