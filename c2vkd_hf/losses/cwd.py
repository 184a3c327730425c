"""CWD: channel-wise distillation.

Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021
(arXiv 2011.13256). Recipe on logits: tau = 4, weight 3 (as in CIRKD's logit baseline).

Each class channel is turned into a distribution over the ``h * w`` positions:
``L_cwd = tau^2 * mean_{b, c} KL(softmax_hw(z_t[b, c] / tau) || softmax_hw(z_s[b, c] / tau))``.
The teacher is resized to the student's grid; labels are not used (no ignore handling: every
position of every channel takes part).

Optional per-map weights ``w[b, c] >= 0`` (e.g. 1 for the classes an image's labels contain, 0 for the others): ``L = tau^2 / (B C) * sum_{b, c} w[b, c] KL_{b, c}``, the same normalisation as the
plain mean, so a map of weight 1 contributes exactly what it does unweighted and a map of weight 0 nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import LogitDistillationLoss
from .common import check_positive, float32_compute, resize
from .registry import register_loss

__all__ = ["cwd_loss", "CWDLoss"]


@float32_compute
def cwd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float = 4.0,
             channel_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Channel-wise distillation on ``(B, K, h, w)`` logits (teacher resized to the student grid):
    ``tau^2 / (B K) * sum_{b, k} w[b, k] KL(softmax_hw(z_t[b, k] / tau) || softmax_hw(z_s[b, k] / tau))`` with
    ``w = channel_weights`` (``(B, K)``; all ones when ``None``: the plain mean over maps)."""
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
    if channel_weights is None:
        # one row per (image, channel): KL over positions, averaged over rows
        return tau**2 * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    if channel_weights.shape != (b, k):
        raise ValueError(f"channel_weights must have shape {(b, k)}, got {tuple(channel_weights.shape)}")
    per_map = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1)  # (B * K,)
    return tau**2 * (per_map * channel_weights.reshape(-1).to(per_map)).sum() / (b * k)


@register_loss("cwd")
class CWDLoss(LogitDistillationLoss):
    """CE + channel-wise distillation. Terms: ``ce``, ``cwd``. Defaults: ``kd_weight=3.0``, ``tau=4.0``."""

    term, default_weight, default_temperature = "cwd", 3.0, 4.0
    temperature_arg, uses_labels = "tau", False
    loss_fn = staticmethod(cwd_loss)
