"""DIST: distillation of inter- and intra-class relations by Pearson correlation.

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv 2205.10536). Recipe for segmentation: beta = gamma = 1, tau = 1.

With ``Y = softmax(z / tau)`` per valid pixel (rows: pixels, columns: classes),

* ``inter = 1 - mean_pixels Pearson(Y_s[i, :], Y_t[i, :])``
* ``intra = 1 - mean_classes Pearson(Y_s[:, k], Y_t[:, k])`` over all valid pixels of the batch
* ``L_dist = tau^2 * (beta * inter + gamma * intra)``

The ``tau^2`` factor is DIST's own (it is 1 at the recipe's tau = 1). Pearson's denominator is
``sqrt(|a|^2 |b|^2 + 1e-16)``, smooth at zero variance (a constant row gives correlation 0).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..constants import IGNORE_INDEX
from .base import LogitDistillationLoss
from .common import check_positive, check_weight, float32_compute, valid_pixel_logits, zero_like_graph
from .registry import register_loss

__all__ = ["dist_loss", "pearson", "DISTLoss"]

_PEARSON_EPS = 1e-16


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (smooth at zero variance)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    num = (a * b).sum(dim=dim)
    den = torch.sqrt((a * a).sum(dim=dim) * (b * b).sum(dim=dim) + _PEARSON_EPS)
    return num / den


@float32_compute
def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """DIST on pixels: logits resized to the label grid (or, with ``labels=None``, teacher to the
    student grid), ignored pixels removed; see the module docstring."""
    beta = check_weight("beta", beta)
    gamma = check_weight("gamma", gamma)
    tau = check_positive("tau", tau)
    _, (zs, zt) = valid_pixel_logits(student_logits, teacher_logits, labels, ignore_index)
    if zs.shape[0] == 0:
        return zero_like_graph(student_logits)
    ys = torch.softmax(zs / tau, dim=1)
    yt = torch.softmax(zt / tau, dim=1)
    inter = 1.0 - pearson(ys, yt, dim=1).mean()
    intra = 1.0 - pearson(ys, yt, dim=0).mean()
    return tau**2 * (beta * inter + gamma * intra)


@register_loss("dist")
class DISTLoss(LogitDistillationLoss):
    """CE + DIST. Terms: ``ce``, ``dist``. Defaults: ``kd_weight=1.0``, ``beta=gamma=1``, ``tau=1``."""

    term, default_weight, default_temperature, temperature_arg = "dist", 1.0, 1.0, "tau"
    loss_fn = staticmethod(dist_loss)

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, **kwargs) -> None:
        super().__init__(constants={"beta": check_weight("beta", beta), "gamma": check_weight("gamma", gamma)},
                         **kwargs)
