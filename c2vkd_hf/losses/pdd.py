"""PDD: pixel-wise decoupled distillation (the logit half of C2VKD).

C2VKD: Zheng, Luo, Zhou, Wang, "Distilling Efficient Vision Transformers from CNNs for Semantic
Segmentation", arXiv 2310.07265. The decoupling into a target and a non-target part follows DKD:
Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv 2203.08679).

Per valid pixel with label ``y``, ``p = softmax(z / T)``:

* binary target split ``b = (p[y], 1 - p[y])`` for student and teacher;
* label correction ``q = (1 - g) * b_t + g * (1, 0)`` (``g = label_weight``): the label guarantees
  the target class a mass of at least ``g`` even where the teacher is wrong;
* ``TC = KL(q || b_s)``;
* ``NC = KL(p_hat_t || p_hat_s)``, ``p_hat`` the softmax over the non-target classes (the target
  logit is masked to a large finite negative value, see :func:`~.common.mask_target`);
* ``L_pdd = T^2 * mean_pixels(alpha * TC + beta * NC)``.

With ``g = 0`` this is exactly DKD applied per pixel (:func:`c2vkd_hf.losses.dkd.dkd_loss`).

Everything is evaluated in log space: ``log(1 - p[y]) = logsumexp(non-target) - logsumexp(all)``,
which stays finite for logits of any magnitude.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .common import (
    check_positive,
    check_unit_interval,
    check_weight,
    flatten_valid,
    float32_compute,
    mask_target,
    resize,
    zero_like_graph,
)

__all__ = ["pdd_loss", "decoupled_kl"]


def _split_log_probs(z: torch.Tensor, target: torch.Tensor):
    """Log-probabilities of the binary split and of the non-target softmax, rows of ``z`` (N, K)."""
    lse = torch.logsumexp(z, dim=1)
    z_nt = mask_target(z, target)
    lse_nt = torch.logsumexp(z_nt, dim=1)
    log_target = z.gather(1, target[:, None])[:, 0] - lse  # log p[y]
    log_nontarget = lse_nt - lse  # log(1 - p[y])
    log_hat = z_nt - lse_nt[:, None]  # log softmax over non-target classes (target: ~ -1e4)
    return log_target, log_nontarget, log_hat


def decoupled_kl(
    zs: torch.Tensor,
    zt: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    label_weight: float,
) -> torch.Tensor:
    """Per-row ``alpha * TC + beta * NC`` for float32 rows ``zs``, ``zt`` (N, K) already divided by T.

    ``zt`` must already be detached. Returns an ``(N,)`` tensor.
    """
    ls_t, ls_nt, ls_hat = _split_log_probs(zs, target)
    with torch.no_grad():
        lt_t, lt_nt, lt_hat = _split_log_probs(zt, target)
        g = label_weight
        log_g = math.log(g) if g > 0 else -math.inf
        log_1mg = math.log1p(-g) if g < 1 else -math.inf
        # log q = log((1 - g) * b_t + g * (1, 0)), in log space
        lq_t = torch.logaddexp(lt_t + log_1mg, torch.full_like(lt_t, log_g))
        lq_nt = lt_nt + log_1mg
        q_t, q_nt = lq_t.exp(), lq_nt.exp()
        p_hat_t = lt_hat.exp()  # exactly 0 at the target class
    # TC: KL between two-way distributions. The probability-target form of kl_div computes q * log q
    # with xlogy, so 0 * log 0 = 0 (q_nt is exactly 0 when g == 1, where log q_nt is -inf).
    tc = F.kl_div(torch.stack((ls_t, ls_nt), dim=1), torch.stack((q_t, q_nt), dim=1), reduction="none").sum(dim=1)
    # NC: the masked target class has log p_hat_t ~ -1e4, so exp() is exactly 0 and it adds nothing.
    nc = F.kl_div(ls_hat, lt_hat, reduction="none", log_target=True).sum(dim=1)
    return alpha * tc + beta * nc


@float32_compute
def pdd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    label_weight: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Pixel-wise decoupled distillation ``L_pdd`` (see the module docstring for the formula).

    Args:
        student_logits: ``(B, K, h_s, w_s)``.
        teacher_logits: ``(B, K, h_t, w_t)``; detached inside.
        labels: ``(B, H, W)``; both logits are resized bilinearly to this grid, and pixels equal to
            ``ignore_index`` are removed before the target class is indexed.
        alpha: weight of the target term TC (>= 0).
        beta: weight of the non-target term NC (>= 0).
        temperature: softmax temperature T (> 0); the loss is scaled by T^2.
        label_weight: label correction g in [0, 1]; 0 gives DKD.
        ignore_index: void label value.

    Returns:
        A float32 scalar, the mean over valid pixels (0 if there are none).
    """
    alpha = check_weight("alpha", alpha)
    beta = check_weight("beta", beta)
    temperature = check_positive("temperature", temperature)
    label_weight = check_unit_interval("label_weight", label_weight)
    if labels is None:
        raise ValueError("pdd_loss needs labels (the target class of each pixel)")
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch and class dims, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    size = labels.shape[-2:]
    zs = resize(student_logits.float(), size)
    zt = resize(teacher_logits.detach().float(), size)
    target, (zs, zt) = flatten_valid(labels, ignore_index, zs, zt)
    if target.numel() == 0:
        return zero_like_graph(student_logits)
    per_pixel = decoupled_kl(
        zs / temperature, zt / temperature, target, alpha=alpha, beta=beta, label_weight=label_weight
    )
    return temperature**2 * per_pixel.mean()
