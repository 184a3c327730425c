"""VLFD: visual-linguistic feature distillation (the feature half of C2VKD).

C2VKD: Zheng, Luo, Zhou, Wang, "Distilling Efficient Vision Transformers from CNNs for Semantic
Segmentation", arXiv 2310.07265. The formulas below are this project's precise definition (see
``docs/DESIGN.md``, "Losses"); CLIP text embeddings come from Radford et al., "Learning
Transferable Visual Models From Natural Language Supervision", ICML 2021.

Visual terms, in the teacher's feature space (``P_v``: a 1x1 conv C_s -> C_t held by the module):

* :func:`vlfd_global_loss`: per position, ``KL(softmax_c(F_t / tau) || softmax_c(P_v(F_s) / tau))``
  summed over channels, averaged over positions, times ``tau^2``; ``P_v(F_s)`` is resized to
  ``F_t``'s grid.
* :func:`vlfd_relation_loss`: per image, both maps are average-pooled to the same grid of at most
  ``G x G`` positions; each position's channel vector is centred (its channel mean removed) and
  L2-normalised, so ``R = X X^T`` holds the Pearson correlations between positions. The loss is
  ``mean_images mean((R_s - R_t)^2)``; it is channel-count agnostic, so it takes the raw student
  feature (no projector).

Linguistic term, in CLIP's text space (``E``: ``(K, D)`` class-name embeddings, L2-normalised;
``P_l``: a 1x1 conv C_s -> D):

* :func:`vlfd_linguistic_loss`: ``u = normalise(P_l(F_s))`` per position, pixel-text logits
  ``S = u E^T / tau``; target ``r = softmax(z_t)`` label-corrected where a valid label exists,
  ``r = (1 - g) p_t + g onehot(y)`` (ignored positions keep ``r = p_t``).
  ``L_ling = mean KL(r || softmax(S)) + mean(1 - cos(u, normalise(r E)))``, over all positions of
  the student feature grid: the teacher logits are resized (bilinear, antialiased when shrinking)
  and the labels nearest-resized to that grid, which keeps the ``D``-channel maps small.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .common import (
    check_positive,
    check_unit_interval,
    float32_compute,
    resize,
    resize_labels,
)

__all__ = ["vlfd_global_loss", "vlfd_relation_loss", "vlfd_linguistic_loss", "pixel_text_logits"]

_NORM_EPS = 1e-6


@float32_compute
def vlfd_global_loss(student_feat_projected: torch.Tensor, teacher_feat: torch.Tensor, *, tau: float = 1.0) -> torch.Tensor:
    """Global (channel-distribution) term ``L_glob``.

    Args:
        student_feat_projected: ``P_v(F_s)``, ``(B, C_t, h_s, w_s)``; resized to the teacher grid.
        teacher_feat: ``F_t``, ``(B, C_t, h_t, w_t)``; detached inside.
        tau: channel-softmax temperature (> 0).
    """
    tau = check_positive("tau", tau)
    if student_feat_projected.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(
            f"projected student feature {tuple(student_feat_projected.shape)} and teacher feature "
            f"{tuple(teacher_feat.shape)} must agree in batch and channel dims"
        )
    fs = resize(student_feat_projected.float(), teacher_feat.shape[-2:])
    ft = teacher_feat.detach().float()
    log_ps = F.log_softmax(fs / tau, dim=1)
    log_pt = F.log_softmax(ft / tau, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1)  # (B, h, w)
    return tau**2 * kl.mean()


def _relation_matrix(feat: torch.Tensor, size) -> torch.Tensor:
    x = F.adaptive_avg_pool2d(feat, size).flatten(2).transpose(1, 2)  # (B, P, C)
    x = x - x.mean(dim=2, keepdim=True)
    x = F.normalize(x, dim=2, eps=_NORM_EPS)
    return torch.bmm(x, x.transpose(1, 2))  # (B, P, P)


@float32_compute
def vlfd_relation_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, grid: int = 16) -> torch.Tensor:
    """Relation (position-correlation) term ``L_rel``, computed per image.

    Args:
        student_feat: ``(B, C_s, h_s, w_s)`` (any channel count).
        teacher_feat: ``(B, C_t, h_t, w_t)``; detached inside.
        grid: G; both maps are pooled to ``(min(G, h_s, h_t), min(G, w_s, w_t))`` positions.
    """
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"batch sizes differ: {student_feat.shape[0]} vs {teacher_feat.shape[0]}")
    size = (
        min(grid, student_feat.shape[-2], teacher_feat.shape[-2]),
        min(grid, student_feat.shape[-1], teacher_feat.shape[-1]),
    )
    rs = _relation_matrix(student_feat.float(), size)
    rt = _relation_matrix(teacher_feat.detach().float(), size)
    return (rs - rt).pow(2).mean()


def pixel_text_logits(student_text_feat: torch.Tensor, text_embeddings: torch.Tensor, *, tau: float = 0.03) -> torch.Tensor:
    """Pixel-text logits ``S = normalise(P_l(F_s)) E^T / tau``, ``(B, K, h, w)``.

    ``text_embeddings`` may hold any class names' embeddings, not only the training classes, which
    turns a C2VKD student into an open-vocabulary scorer of its pixels.
    """
    tau = check_positive("tau", tau)
    u = F.normalize(student_text_feat.float(), dim=1, eps=_NORM_EPS)
    e = F.normalize(text_embeddings.detach().float(), dim=1, eps=_NORM_EPS)
    return torch.einsum("bdhw,kd->bkhw", u, e) / tau


@float32_compute
def vlfd_linguistic_loss(
    student_text_feat: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    text_embeddings: torch.Tensor,
    *,
    tau: float = 0.03,
    label_weight: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Linguistic term ``L_ling`` on the student feature grid.

    Args:
        student_text_feat: ``P_l(F_s)``, ``(B, D, h, w)``.
        teacher_logits: ``(B, K, h_t, w_t)``; detached, resized to ``(h, w)``.
        labels: ``(B, H, W)`` or None (no correction); nearest-resized to ``(h, w)``.
        text_embeddings: ``(K, D)``; detached and L2-normalised inside.
        tau: pixel-text temperature (> 0; small, since class-name embeddings are close together).
        label_weight: label correction g in [0, 1].
    """
    tau = check_positive("tau", tau)
    g = check_unit_interval("label_weight", label_weight)
    if text_embeddings.dim() != 2:
        raise ValueError(f"text_embeddings must be (K, D), got shape {tuple(text_embeddings.shape)}")
    k, d = text_embeddings.shape
    if student_text_feat.shape[1] != d:
        raise ValueError(f"student text feature has {student_text_feat.shape[1]} channels, text embeddings {d}")
    if teacher_logits.shape[1] != k:
        raise ValueError(f"teacher logits have {teacher_logits.shape[1]} classes, text embeddings {k} rows")
    size = student_text_feat.shape[-2:]
    e = F.normalize(text_embeddings.detach().float(), dim=1, eps=_NORM_EPS)
    u = F.normalize(student_text_feat.float(), dim=1, eps=_NORM_EPS)
    log_q = F.log_softmax(torch.einsum("bdhw,kd->bkhw", u, e) / tau, dim=1)
    with torch.no_grad():
        r = torch.softmax(resize(teacher_logits.detach().float(), size), dim=1)
        if labels is not None and g > 0:
            y = resize_labels(labels, size)
            valid = y != ignore_index
            onehot = F.one_hot(torch.where(valid, y, torch.zeros_like(y)), k).permute(0, 3, 1, 2).float()
            corrected = (1.0 - g) * r + g * onehot
            r = torch.where(valid[:, None], corrected, r)
        v = F.normalize(torch.einsum("bkhw,kd->bdhw", r, e), dim=1, eps=_NORM_EPS)
    # the probability-target form of kl_div computes r * log r with xlogy, so 0 * log 0 = 0
    kl = F.kl_div(log_q, r, reduction="none").sum(dim=1)
    cos = (u * v).sum(dim=1)
    return kl.mean() + (1.0 - cos).mean()

