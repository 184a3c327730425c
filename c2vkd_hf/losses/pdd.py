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

:func:`pdd_loss` computes this on ``(B, K, H*W)`` maps with a closed-form backward
(:class:`_PixelDecoupledKL`: ``NC`` written as ``sum_k p_hat_t,k (z_t,k - z_s,k) - sigma_t (lse_nt,t - lse_nt,s)``,
the same number as the elementwise KL), weighting ignored pixels by 0 instead of gathering the valid
ones; at ``T = 1`` the student's cross-entropy is a by-product (:func:`pdd_loss_and_cross_entropy`).
:func:`decoupled_kl` is the row form on ``(N, K)`` rows of valid pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .common import (
    class_balanced_weights,
    MASK_MARGIN,
    check_positive,
    check_unit_interval,
    check_weight,
    float32_compute,
    mask_target,
    resize,
)

__all__ = ["pdd_loss", "pdd_loss_and_cross_entropy", "decoupled_kl"]


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
    # TC: KL between two-way distributions. The probability-target form of kl_div computes q * log q
    # with xlogy, so 0 * log 0 = 0 (q_nt is exactly 0 when g == 1, where log q_nt is -inf).
    tc = F.kl_div(torch.stack((ls_t, ls_nt), dim=1), torch.stack((q_t, q_nt), dim=1), reduction="none").sum(dim=1)
    # NC: the masked target class has log p_hat_t ~ -1e4, so exp() is exactly 0 and it adds nothing.
    nc = F.kl_div(ls_hat, lt_hat, reduction="none", log_target=True).sum(dim=1)
    return alpha * tc + beta * nc


def _nontarget_softmax(z: torch.Tensor, index: torch.Tensor):
    """``(lse_nt, p_hat)`` of ``(B, K, P)`` logits: the log-sum-exp and the softmax over the non-target
    classes (``index``: ``(B, 1, P)`` target classes), computed on a copy of ``z`` whose target logit is
    ``-inf`` (its ``exp`` is exactly 0; no gradient flows through this function). With a single class
    the target is the only class: it is then masked as :func:`~.common.mask_target` does (a finite value
    :data:`~.common.MASK_MARGIN` below it), which gives ``p_hat = 1`` there, as the row form does."""
    if z.shape[1] == 1:
        fill = z - MASK_MARGIN
    else:
        fill = torch.full_like(index, -math.inf, dtype=z.dtype)
    z_nt = z.clone().scatter_(1, index, fill)
    m = z_nt.amax(dim=1, keepdim=True)
    e = z_nt.sub_(m).exp_()
    total = e.sum(dim=1, keepdim=True)
    return (m + total.log())[:, 0], e.div_(total)


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))`` for finite ``a``, ``b``: ``max + log1p(exp(-|a - b|))``."""
    return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))


class _PixelDecoupledKL(torch.autograd.Function):
    """Per-pixel ``alpha * TC + beta * NC`` (module docstring) of ``(B, K, P)`` logit maps already divided
    by T, with a closed-form backward. Returns the ``(B, P)`` per-pixel values and, as a by-product, the
    per-pixel cross-entropy of the student ``-log p_s,y = lse_s - z_s,y``; pixels whose label is ignored must
    get the target 0 here and weight 0 outside (their values are finite, their gradient then 0).

    Forward, per pixel, with ``lse_nt`` the log-sum-exp over the non-target classes (the target masked:
    :func:`_nontarget_softmax`), ``lse = logaddexp(lse_nt, z_y)``, ``log p_y = z_y - lse``,
    ``log(1 - p_y) = lse_nt - lse`` (all in log space, as :func:`decoupled_kl`):

    * ``TC = q_t (log q_t - log p_s,y) + q_nt (log q_nt - log(1 - p_s,y))`` (``0 log 0 = 0``);
    * ``NC = sum_k p_hat_t,k (z_t,k - z_s,k) - sigma_t (lse_nt,t - lse_nt,s)``, ``sigma_t = sum_k p_hat_t,k``:
      ``KL(p_hat_t || p_hat_s)`` with ``log p_hat_k = z_k - lse_nt`` substituted (``p_hat_t`` is exactly 0
      at the target), the same number as the elementwise form without building ``log p_hat_s``.

    Backward, with ``p_hat_s`` the student's non-target softmax, ``e_y`` the target's one-hot and
    ``sigma_q = q_t + q_nt``: ``d TC/d z_s = (sigma_q (1 - p_y) - q_nt) p_hat_s + (sigma_q p_y - q_t) e_y`` and
    ``d NC/d z_s = sigma_t p_hat_s - p_hat_t`` (from ``d lse/dz = p``, ``d lse_nt/dz = p_hat``,
    ``p = (1 - p_y) p_hat + p_y e_y``); ``d CE/d z_s = p - e_y = (1 - p_y) p_hat_s + (p_y - 1) e_y``.
    """

    @staticmethod
    def forward(ctx, zs, zt, target, alpha: float, beta: float, label_weight: float):
        k = zs.shape[1]
        index = target[:, None, :]  # (B, 1, P)
        lse_nt_t, p_hat_t = _nontarget_softmax(zt, index)
        zt_y = zt.gather(1, index)[:, 0]
        lse_t = _logaddexp(lse_nt_t, zt_y)
        g = label_weight
        log_g = math.log(g) if g > 0 else -math.inf
        log_1mg = math.log1p(-g) if g < 1 else -math.inf
        # log q = log((1 - g) * b_t + g * (1, 0)), in log space
        lq_t = torch.logaddexp(zt_y - lse_t + log_1mg, torch.full_like(lse_t, log_g))
        lq_nt = lse_nt_t - lse_t + log_1mg
        q_t, q_nt = lq_t.exp(), lq_nt.exp()
        sigma_t = p_hat_t.sum(dim=1)

        lse_nt_s, p_hat_s = _nontarget_softmax(zs, index)
        zs_y = zs.gather(1, index)[:, 0]
        lse_s = _logaddexp(lse_nt_s, zs_y)
        ls_t, ls_nt = zs_y - lse_s, lse_nt_s - lse_s  # log p_y, log(1 - p_y)
        # xlogy: 0 * log 0 = 0 (q_nt is exactly 0 when g == 1, where its log is -inf)
        tc = torch.xlogy(q_t, q_t) - q_t * ls_t + torch.xlogy(q_nt, q_nt) - q_nt * ls_nt
        if k == 1:  # no non-target class: NC is 0 (the row form: 0 with no gradient, its mask a constant)
            nc = torch.zeros_like(tc)
            p_hat_s, p_hat_t = torch.zeros_like(p_hat_s), torch.zeros_like(p_hat_t)
        else:
            nc = (zt - zs).mul_(p_hat_t).sum(dim=1) - sigma_t * (lse_nt_t - lse_nt_s)
        sigma_q = q_t + q_nt
        p_y, p_nt = ls_t.exp(), ls_nt.exp()
        coef_hat = alpha * (sigma_q * p_nt - q_nt) + beta * sigma_t  # factor of p_hat_s in the gradient
        coef_y = alpha * (sigma_q * p_y - q_t)  # factor of e_y
        ctx.save_for_backward(p_hat_s, p_hat_t, index, coef_hat, coef_y, p_y, p_nt)
        ctx.beta = beta
        ctx.set_materialize_grads(False)
        return alpha * tc + beta * nc, -ls_t

    @staticmethod
    def backward(ctx, grad, grad_ce):
        p_hat_s, p_hat_t, index, coef_hat, coef_y, p_y, p_nt = ctx.saved_tensors
        if grad is None and grad_ce is None:
            return None, None, None, None, None, None
        grad_hat = torch.zeros_like(coef_hat) if grad is None else grad.float() * coef_hat
        grad_y = torch.zeros_like(coef_y) if grad is None else grad.float() * coef_y
        if grad_ce is not None:
            grad_hat = grad_hat + grad_ce.float() * p_nt
            grad_y = grad_y + grad_ce.float() * (p_y - 1.0)
        out = p_hat_s * grad_hat[:, None, :]
        if grad is not None and ctx.beta != 0:
            out.sub_(p_hat_t * (grad.float() * ctx.beta)[:, None, :])
        out.scatter_add_(1, index, grad_y[:, None, :])
        return out, None, None, None, None, None


def _pdd_and_cross_entropy(student_logits, teacher_logits, labels, alpha, beta, temperature, label_weight,
                           ignore_index, class_balance=False, class_balance_power=1.0):
    """``(L_pdd, CE)``: PDD (validated arguments) and the student's cross-entropy ``mean_valid(-log p_s,y)`` at
    temperature T (the usual cross-entropy when T = 1), both means over the valid pixels (0 if none); with
    ``class_balance`` PDD's mean is class-balanced (:func:`~.common.class_balanced_weights`), CE's is not."""
    if labels is None:
        raise ValueError("pdd_loss needs labels (the target class of each pixel)")
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in batch and class dims, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    size = labels.shape[-2:]
    # (B, K, H*W) maps, classes along dim 1: every per-pixel reduction over the K classes is then K - 1
    # vectorised elementwise passes over the pixels (the channels-last rows of K = 11 values were slower).
    b, k = student_logits.shape[:2]
    zs = resize(student_logits.float().contiguous(), size).contiguous().view(b, k, -1)
    with torch.no_grad():
        zt = resize(teacher_logits.detach().float().contiguous(), size).contiguous().view(b, k, -1)
        labels = labels.reshape(b, -1).long()
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.zeros_like(labels))
        weight = valid.float() / valid.sum().clamp_min(1)  # the mean over valid pixels; 0 if there are none
        pdd_weight = class_balanced_weights(labels, k, ignore_index, class_balance_power) if class_balance else weight
    if temperature != 1.0:
        zs, zt = zs / temperature, zt / temperature
    per_pixel, ce = _PixelDecoupledKL.apply(zs, zt, target, alpha, beta, label_weight)
    return temperature**2 * (per_pixel * pdd_weight).sum(), (ce * weight).sum()


def _check_constants(alpha, beta, temperature, label_weight):
    return (check_weight("alpha", alpha), check_weight("beta", beta), check_positive("temperature", temperature),
            check_unit_interval("label_weight", label_weight))


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
    class_balance: bool = False,
    class_balance_power: float = 1.0,
) -> torch.Tensor:
    """Pixel-wise decoupled distillation ``L_pdd`` (see the module docstring for the formula).

    Args:
        student_logits: ``(B, K, h_s, w_s)``.
        teacher_logits: ``(B, K, h_t, w_t)``; detached inside.
        labels: ``(B, H, W)``; both logits are resized bilinearly to this grid, and pixels equal to
            ``ignore_index`` get weight 0 in the mean (their target class is never used).
        alpha: weight of the target term TC (>= 0).
        beta: weight of the non-target term NC (>= 0).
        temperature: softmax temperature T (> 0); the loss is scaled by T^2.
        label_weight: label correction g in [0, 1]; 0 gives DKD.
        ignore_index: void label value.
        class_balance: replace the mean over valid pixels by the class-balanced mean
            ``sum_i w_i (alpha TC_i + beta NC_i)``, ``w`` from :func:`~.common.class_balanced_weights` (every
            class present in ``labels`` weighs the same); ``class_balance_power`` is its exponent ``p``
            (1: fully balanced, 0: the plain mean).

    Returns:
        A float32 scalar, the mean over valid pixels (0 if there are none).
    """
    constants = _check_constants(alpha, beta, temperature, label_weight)
    return _pdd_and_cross_entropy(student_logits, teacher_logits, labels, *constants, ignore_index,
                                  class_balance, class_balance_power)[0]


@float32_compute
def pdd_loss_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    label_weight: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    class_balance: bool = False,
    class_balance_power: float = 1.0,
):
    """``(pdd_loss(...), cross_entropy(student_logits, labels))`` at temperature 1, in one pass: the
    cross-entropy ``mean_valid(lse_s - z_s,y)`` is a by-product of PDD's log-probabilities (same upsampled
    logits, same valid pixels, so the same value as :func:`~.common.cross_entropy`). ``class_balance``
    applies to PDD only (see :func:`pdd_loss`)."""
    constants = _check_constants(alpha, beta, 1.0, label_weight)
    return _pdd_and_cross_entropy(student_logits, teacher_logits, labels, *constants, ignore_index, class_balance,
                                  class_balance_power)
