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

Cost (the formulas are unchanged): ``S`` is computed per position as ``(y . e_k) / (max(|y|, eps) tau)``
(``y = P_l(F_s)``), and the cosine as ``tau (sum_k r_k S_k) / max(|r E|, eps)``, so beyond ``y`` itself
and its gradient (as channels-last rows, one matrix product each way) no ``D``-channel map is built; the linguistic
term reads the ``S`` that the student's text head already computed when the head is its projector
(:func:`vlfd_linguistic_loss_from_scores`). Per-position channel reductions run on channels-last rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .common import (
    class_balanced_weights,
    check_positive,
    check_unit_interval,
    float32_compute,
    resize,
    resize_labels,
)

__all__ = [
    "vlfd_global_loss",
    "vlfd_relation_loss",
    "vlfd_linguistic_loss",
    "vlfd_linguistic_loss_from_scores",
    "pixel_text_logits",
    "project_pixel_text_logits",
    "conv1x1_rows",
]

_NORM_EPS = 1e-6


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h, w, C)``: channels last, a free view of a ``channels_last`` map (what a
    ``channels_last`` student produces), a copy otherwise. Per-position reductions over channels then
    run along the contiguous last dimension, and every elementwise operation sees one memory layout:
    mixing NCHW and ``channels_last`` operands made PyTorch's CPU kernels fall back to strided loops
    several times slower than the arithmetic (the text head's ``(B, 512, h, w)`` maps cost more than
    the student's backward)."""
    return x.permute(0, 2, 3, 1)


def _check_conv1x1(conv: torch.nn.Conv2d) -> None:
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.groups != 1 \
            or conv.dilation != (1, 1):
        raise ValueError(f"a text or visual projector must be a plain 1x1 convolution, got {conv}")


def conv1x1_rows(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution ``W x + b`` as one matrix product on the positions' channel vectors:
    ``(B, C, h, w) -> (B, h, w, C')`` (:func:`_rows` layout). The same sums as ``conv(x)``, without
    the convolution's memory-format conversions."""
    _check_conv1x1(conv)
    b, _, h, w = x.shape
    rows = _rows(x).reshape(b * h * w, x.shape[1])  # a view for a channels_last map
    return F.linear(rows, conv.weight.flatten(1), conv.bias).view(b, h, w, -1)


class _NormalisedScores(torch.autograd.Function):
    """``S = y e^T / (max(|y|, eps) tau)`` for rows ``y`` (N, D) and fixed normalised ``e`` (K, D), in
    float32, with the closed-form backward ``dL/dy = (g e) / (n tau) - ((g . S) / n^2) y`` (``g = dL/dS``,
    ``n = max(|y|, eps)``; the second term is 0 where ``|y| < eps``, as the clamp's gradient is). Autograd
    on the plain expression builds several more ``(N, D)`` temporaries in the backward."""

    @staticmethod
    def forward(ctx, y, e, tau: float):
        with torch.autocast(device_type=y.device.type, enabled=False):
            y = y.float()
            norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
            n = norm.clamp_min(_NORM_EPS)
            s = torch.mm(y, e.t()).div_(n * tau)
        ctx.save_for_backward(y, e, n, s, norm >= _NORM_EPS)
        ctx.tau = tau
        return s

    @staticmethod
    def backward(ctx, grad):
        y, e, n, s, ok = ctx.saved_tensors
        grad = grad.float()
        c = (grad * s).sum(dim=1, keepdim=True).div_(n * n).mul_(ok)
        grad_y = torch.mm(grad / (n * ctx.tau), e)
        grad_y.addcmul_(y, c, value=-1.0)
        return grad_y, None, None


class _ProjectedScores(torch.autograd.Function):
    """``S = (W x + b) e^T / (max(|W x + b|, eps) tau)`` for rows ``x`` (N, C), a projector ``W`` (D, C) with
    ``D > C``, bias ``b`` (D,) and fixed normalised ``e`` (K, D), without the ``D``-dimensional ``y = W x + b``.

    With the reduced QR factorisation ``W = Q R`` (``Q`` (D, C) orthonormal columns, ``R`` (C, C)) and
    ``b = Q beta + b_perp`` (``beta = Q^T b``, ``b_perp = b - Q beta``): ``y = Q z + b_perp`` with
    ``z = R x + beta``, so ``|y|^2 = |z|^2 + |b_perp|^2`` (a sum of squares, as accurate as ``|y|^2`` itself)
    and ``y . e_k = (E W) x + E b``. Gradients (``g = dL/dS``, ``a = g / (n tau)``, ``c = (g . S) / n^2``,
    0 where ``|y| < eps``; ``dL/dy = E^T a - c y``): ``dL/dx = W^T dL/dy = (E W)^T a - c R^T z``,
    ``dL/dW = sum_pos dL/dy x^T = E^T (a^T X) - Q ((c z)^T X) - b_perp (c^T X)``,
    ``dL/db = E^T sum a - Q sum(c z) - b_perp sum c``. Everything is an exact rewriting of
    :class:`_NormalisedScores` applied to ``W x + b``; the products are C-dimensional instead of
    D-dimensional (half the multiply-adds for SegFormer-B0's 256 -> 512 text projector). The QR is
    recomputed from ``W`` at every call and is not differentiated through.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, e, tau: float):
        ctx_x_dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, w = x.float(), weight.float()
            b = torch.zeros(w.shape[0], device=w.device) if bias is None else bias.float()
            q, r = torch.linalg.qr(w)  # reduced: q (D, C), r (C, C)
            beta = q.t() @ b
            b_perp = b - q @ beta
            z = torch.addmm(beta, x, r.t())  # rows of R x + beta
            norm = ((z * z).sum(dim=1, keepdim=True) + (b_perp @ b_perp)).sqrt()  # |W x + b|
            n = norm.clamp_min(_NORM_EPS)
            ew = e @ w  # (K, C)
            s = torch.addmm(e @ b, x, ew.t()).div_(n * tau)
        ctx.save_for_backward(x, z, q, r, b_perp, ew, e, n, s, norm >= _NORM_EPS)
        ctx.tau = tau
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, ctx_x_dtype)
        return s

    @staticmethod
    def backward(ctx, grad):
        x, z, q, r, b_perp, ew, e, n, s, ok = ctx.saved_tensors
        grad = grad.float()
        a = grad / (n * ctx.tau)  # (N, K)
        c = (grad * s).sum(dim=1, keepdim=True).div_(n * n).mul_(ok)  # (N, 1)
        cz = z * c  # (N, C)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(a, ew).sub_(torch.mm(cz, r)).to(ctx.dtypes[2])
        if ctx.needs_input_grad[1]:
            grad_w = e.t() @ (a.t() @ x) - q @ (cz.t() @ x) - torch.outer(b_perp, (c.t() @ x)[0])
            grad_w = grad_w.to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = (e.t() @ a.sum(dim=0) - q @ cz.sum(dim=0) - b_perp * c.sum()).to(ctx.dtypes[1])
        return grad_x, grad_w, grad_b, None, None


def _projects_through_range(x: torch.Tensor, projector: torch.nn.Conv2d) -> bool:
    """Whether :func:`project_pixel_text_logits` uses :class:`_ProjectedScores`: a projector that widens
    (``D > C``: fewer multiply-adds through the C-dimensional factor) on a CPU tensor (on an accelerator the
    products are cheap next to a QR's synchronisation)."""
    return x.device.type == "cpu" and projector.out_channels > projector.in_channels


def _scores_from_rows(y: torch.Tensor, e: torch.Tensor, tau: float) -> torch.Tensor:
    """``S = normalise(y) E^T / tau`` from rows ``y`` (B, h, w, D) and normalised ``e`` (K, D), returned
    as ``(B, K, h, w)`` (a view of a (B, h, w, K) tensor), float32.

    Computed as ``S_k = (y . e_k) / (max(|y|, eps) tau)`` (:class:`_NormalisedScores`): dividing the K
    scores instead of the D components of ``y`` is the same number (``normalise(y) = y / max(|y|, eps)``,
    F.normalize's definition) and never builds a normalised ``D``-channel copy of ``y``."""
    b, h, w, d = y.shape
    s = _NormalisedScores.apply(y.reshape(b * h * w, d), e.to(device=y.device, dtype=torch.float32), float(tau))
    return s.view(b, h, w, -1).permute(0, 3, 1, 2)


@float32_compute
def vlfd_global_loss(student_feat_projected: torch.Tensor, teacher_feat: torch.Tensor, *, tau: float = 1.0) -> torch.Tensor:
    """Global (channel-distribution) term ``L_glob``:
    ``tau^2 * mean_positions sum_c p_t,c (log p_t,c - log p_s,c)``, ``p = softmax_c(F / tau)``.

    Args:
        student_feat_projected: ``P_v(F_s)``, ``(B, C_t, h_s, w_s)``; resized to the teacher grid.
        teacher_feat: ``F_t``, ``(B, C_t, h_t, w_t)``; detached inside.
        tau: channel-softmax temperature (> 0).

    The channel softmaxes run on channels-last rows (:func:`_rows`), one memory layout for both maps.
    """
    tau = check_positive("tau", tau)
    if student_feat_projected.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(
            f"projected student feature {tuple(student_feat_projected.shape)} and teacher feature "
            f"{tuple(teacher_feat.shape)} must agree in batch and channel dims"
        )
    fs = _rows(resize(student_feat_projected.float(), teacher_feat.shape[-2:]))
    ft = _rows(teacher_feat.detach().float()).contiguous()
    log_ps = F.log_softmax(fs / tau, dim=-1)
    log_pt = F.log_softmax(ft / tau, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=-1)  # (B, h, w)
    return tau**2 * kl.mean()


def _relation_matrix(feat: torch.Tensor, size) -> torch.Tensor:
    """``R = X X^T`` (B, P, P): ``X`` the pooled positions' channel vectors, centred and L2-normalised."""
    x = F.adaptive_avg_pool2d(feat, size).flatten(2).transpose(1, 2)  # (B, P, C)
    x = x - x.mean(dim=2, keepdim=True)
    x = F.normalize(x, dim=2, eps=_NORM_EPS)
    return torch.bmm(x, x.transpose(1, 2))  # (B, P, P)


@float32_compute
def vlfd_relation_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, grid: int = 16) -> torch.Tensor:
    """Relation (position-correlation) term ``L_rel = mean_images mean_{i,j} (R_s,ij - R_t,ij)^2``,
    ``R`` from :func:`_relation_matrix`, computed per image.

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
    with torch.no_grad():
        rt = _relation_matrix(teacher_feat.detach().float(), size)
    return (rs - rt).pow(2).mean()


def pixel_text_logits(student_text_feat: torch.Tensor, text_embeddings: torch.Tensor, *, tau: float = 0.03) -> torch.Tensor:
    """Pixel-text logits ``S = normalise(P_l(F_s)) E^T / tau``, ``(B, K, h, w)``, from the projected
    feature ``P_l(F_s)`` (``(B, D, h, w)``); ``E`` is L2-normalised inside.

    ``text_embeddings`` may hold any class names' embeddings, not only the training classes, which
    turns a C2VKD student into an open-vocabulary scorer of its pixels. Computed per position as
    ``(y . e_k) / (max(|y|, eps) tau)`` on channels-last rows (:func:`_scores_from_rows`).
    """
    tau = check_positive("tau", tau)
    e = F.normalize(text_embeddings.detach().float(), dim=1, eps=_NORM_EPS)
    return _scores_from_rows(_rows(student_text_feat), e, tau)


def project_pixel_text_logits(student_feat: torch.Tensor, projector: torch.nn.Conv2d, text_embeddings: torch.Tensor,
                              *, tau: float = 0.03) -> torch.Tensor:
    """``S = normalise(P_l F_s) E^T / tau`` from the unprojected feature ``F_s`` (``(B, C, h, w)``) and the
    1x1 projector ``P_l`` (C -> D): :func:`pixel_text_logits` of ``projector(F_s)``, the projection done
    as one matrix product on channels-last rows (:func:`conv1x1_rows`), so the ``D``-channel map exists
    only as rows ``y`` (and its gradient), never in a second memory layout. When the projector widens
    (``D > C``) on a CPU, ``y`` is not built at all (:class:`_ProjectedScores`: the same numbers through
    ``W``'s QR factorisation, half the multiply-adds)."""
    tau = check_positive("tau", tau)
    e = F.normalize(text_embeddings.detach().float(), dim=1, eps=_NORM_EPS).to(student_feat.device)
    if not _projects_through_range(student_feat, projector):
        return _scores_from_rows(conv1x1_rows(student_feat, projector), e, tau)
    _check_conv1x1(projector)
    b, c, h, w = student_feat.shape
    rows = _rows(student_feat).reshape(b * h * w, c)
    s = _ProjectedScores.apply(rows, projector.weight.flatten(1), projector.bias, e, float(tau))
    return s.view(b, h, w, -1).permute(0, 3, 1, 2)


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
    """Linguistic term ``L_ling`` on the student feature grid, from the projected feature.

    Args:
        student_text_feat: ``P_l(F_s)``, ``(B, D, h, w)``.
        teacher_logits: ``(B, K, h_t, w_t)``; detached, resized to ``(h, w)``.
        labels: ``(B, H, W)`` or None (no correction); nearest-resized to ``(h, w)``.
        text_embeddings: ``(K, D)``; detached and L2-normalised inside.
        tau: pixel-text temperature (> 0; small, since class-name embeddings are close together).
        label_weight: label correction g in [0, 1].

    Equals :func:`vlfd_linguistic_loss_from_scores` of ``S = pixel_text_logits(P_l(F_s), E, tau)``.
    """
    tau = check_positive("tau", tau)
    if text_embeddings.dim() != 2:
        raise ValueError(f"text_embeddings must be (K, D), got shape {tuple(text_embeddings.shape)}")
    d = text_embeddings.shape[1]
    if student_text_feat.shape[1] != d:
        raise ValueError(f"student text feature has {student_text_feat.shape[1]} channels, text embeddings {d}")
    scores = pixel_text_logits(student_text_feat, text_embeddings, tau=tau)
    return vlfd_linguistic_loss_from_scores(scores, teacher_logits, labels, text_embeddings, tau=tau,
                                            label_weight=label_weight, ignore_index=ignore_index)


@float32_compute
def vlfd_linguistic_loss_from_scores(
    scores: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    text_embeddings: torch.Tensor,
    *,
    tau: float = 0.03,
    label_weight: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    class_balance: bool = False,
    class_balance_power: float = 1.0,
    classes: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linguistic term ``L_ling`` from the pixel-text logits ``S = u E^T / tau`` (``(B, K, h, w)``,
    :func:`pixel_text_logits`; the student's text head computes the same ``S`` for its logits, so C2VKD
    reads it instead of projecting the feature a second time).

    ``L_ling = mean KL(r || softmax(S)) + mean(1 - cos(u, normalise(r E)))`` (module docstring), with
    the cosine written in ``S``: ``u . normalise(r E) = (sum_k r_k u . e_k) / max(|r E|, eps)
    = tau (sum_k r_k S_k) / max(|r E|, eps)``, and ``|r E|^2 = r^T (E E^T) r`` (``E E^T``: the K x K
    Gram matrix of the normalised embeddings; no gradient flows through ``r``). So no ``D``-channel
    map is built. ``r``: the teacher's softmax at ``S``'s grid, label-corrected as in the module docstring.

    ``class_balance`` (needs ``labels``): the two means over positions become ``sum_i w_i (.)`` with
    ``w_i = (n_valid / n) c_i`` at a labelled position (``c``: :func:`~.common.class_balanced_weights` of the
    grid's labels with exponent ``class_balance_power``) and ``1 / n`` at an ignored one (its share of
    the plain mean), ``n`` positions in all.

    ``classes`` (``(K,)`` bool, our addition for class names without a text embedding): the term on the classes
    marked True only. ``S``, ``E`` and the label-corrected target keep those columns, the target renormalised
    over them (``r_k / sum_{j in M} r_j``); positions labelled with an unmarked class are left out of both means
    (their label says the pixel belongs to no class the text space names); ``None``: every class.
    """
    tau = check_positive("tau", tau)
    g = check_unit_interval("label_weight", label_weight)
    if classes is not None and bool(classes.all()):
        classes = None
    if text_embeddings.dim() != 2:
        raise ValueError(f"text_embeddings must be (K, D), got shape {tuple(text_embeddings.shape)}")
    k = text_embeddings.shape[0]
    if scores.shape[1] != k:
        raise ValueError(f"pixel-text logits have {scores.shape[1]} classes, text embeddings {k} rows")
    if teacher_logits.shape[1] != k:
        raise ValueError(f"teacher logits have {teacher_logits.shape[1]} classes, text embeddings {k} rows")
    size = scores.shape[-2:]
    s = scores.float() if classes is None else scores.float()[:, classes.to(scores.device)]
    log_q = F.log_softmax(s, dim=1)
    with torch.no_grad():
        e = F.normalize(text_embeddings.detach().float(), dim=1, eps=_NORM_EPS)
        r = torch.softmax(resize(teacher_logits.detach().float(), size), dim=1)
        # the labels on S's grid, resized once, only when the label correction or class balance reads them
        y = resize_labels(labels, size) if labels is not None and (g > 0 or class_balance) else None
        if y is not None and g > 0:
            valid = y != ignore_index
            onehot = F.one_hot(torch.where(valid, y, torch.zeros_like(y)), k).permute(0, 3, 1, 2).float()
            corrected = (1.0 - g) * r + g * onehot
            r = torch.where(valid[:, None], corrected, r)
        keep = None
        if classes is not None:  # only the classes with a text embedding (docstring)
            cols = classes.to(s.device)
            y = resize_labels(labels, size) if labels is not None and y is None else y
            r = r[:, cols]
            r = r / r.sum(dim=1, keepdim=True).clamp_min(1e-12)
            e = e[cols]
            if y is not None:  # positions labelled with an unmarked class are left out; the others keep their class
                labelled = y != ignore_index
                y_safe = torch.where(labelled, y, torch.zeros_like(y))
                keep = ~labelled | cols[y_safe]
                index = torch.cumsum(cols.long(), 0) - 1  # old column -> new column
                y = torch.where(labelled & keep, index[y_safe], torch.full_like(y, ignore_index))
            k = int(cols.sum())
        r = r.contiguous(memory_format=torch.channels_last) if s.is_contiguous(memory_format=torch.channels_last) \
            and not s.is_contiguous() else r.contiguous()
        gram = e @ e.t()  # (K, K)
        r_gram = torch.einsum("bkhw,kl->blhw", r, gram)
        norm_re = (r_gram * r).sum(dim=1).clamp_min(0.0).sqrt().clamp_min(_NORM_EPS)  # |r E|, (B, h, w)
    # the probability-target form of kl_div computes r * log r with xlogy, so 0 * log 0 = 0
    kl = F.kl_div(log_q, r, reduction="none").sum(dim=1)
    cos = tau * (r * s).sum(dim=1) / norm_re
    if not (class_balance and y is not None):
        if keep is None:
            return kl.mean() + (1.0 - cos).mean()
        w = keep.float() / keep.sum().clamp_min(1)
        return (w * (kl + 1.0 - cos)).sum()
    with torch.no_grad():
        valid = y != ignore_index
        n = valid.numel()
        w = class_balanced_weights(y, k, ignore_index, class_balance_power) * (valid.sum() / n) + (~valid).float() / n
        if keep is not None:
            w = w * keep
            w = w / w.sum().clamp_min(1e-12)
    return (w * (kl + 1.0 - cos)).sum()
