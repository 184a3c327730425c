"""DKD: decoupled knowledge distillation, per pixel.

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv 2203.08679).
This is PDD (:mod:`c2vkd_hf.losses.pdd`) without label correction (g = 0):
``L_dkd = T^2 * mean_pixels(alpha * KL(b_t || b_s) + beta * KL(p_hat_t || p_hat_s))``, ignored pixels
removed before the target class is indexed. Recipe here: alpha = beta = 0.5, T = 1, weight 1.
"""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from .base import LogitDistillationLoss
from .common import check_weight
from .pdd import pdd_loss
from .registry import register_loss

__all__ = ["dkd_loss", "DKDLoss"]


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-pixel DKD, i.e. :func:`~c2vkd_hf.losses.pdd.pdd_loss` with ``label_weight=0``."""
    return pdd_loss(
        student_logits,
        teacher_logits,
        labels,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        label_weight=0.0,
        ignore_index=ignore_index,
    )


@register_loss("dkd")
class DKDLoss(LogitDistillationLoss):
    """CE + DKD. Terms: ``ce``, ``dkd``. Defaults: ``kd_weight=1.0``, ``alpha=beta=0.5``, ``T=1``."""

    term, default_weight, default_temperature = "dkd", 1.0, 1.0
    loss_fn = staticmethod(dkd_loss)

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.5, **kwargs) -> None:
        super().__init__(constants={"alpha": check_weight("alpha", alpha), "beta": check_weight("beta", beta)}, **kwargs)
