"""C2VKD: CNN-to-ViT knowledge distillation = CE + PDD + VLFD (global, relation, linguistic) + stage guidance.

Zheng, Luo, Zhou, Wang, "Distilling Efficient Vision Transformers from CNNs for Semantic
Segmentation", arXiv 2310.07265. Total loss (formulas in :mod:`.pdd` and :mod:`.vlfd`):

``L = w_ce CE + w_pdd L_pdd + w_glob L_glob + w_rel L_rel + w_ling L_ling + w_stage s(p) L_stage
+ w_channel L_channel + w_exit s(p) L_exit``

Stage guidance (our addition, the paper's thesis applied to the CNN's intermediate stages): VLFD's
visual terms on several student/teacher stage pairs at once, each pair through its own 1x1
projector ``Q_i``: ``L_stage = mean_i [L_glob(Q_i F_s,i, F_t,i) + L_rel(F_s,i, F_t,i)]``. Its weight
follows a schedule ``s(p)`` over training progress ``p`` (:mod:`.schedule`; the flag default decays
it linearly to 0 at half of training): imitating a CNN's intermediate features speeds up a
from-scratch ViT early and limits it late (locality guidance, Li et al., ECCV 2022; DearKD, Chen et
al., CVPR 2022; CSKD, Zhao et al., ICCV 2023). Once its weight has reached 0 the term is not computed.

Stage exits (our addition, off by default; the exits of OFA-KD: Hao, Guo, Wang, Han, Xu, Tang, Wang, "One-for-All:
Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023): each student stage of
the stage pairs gets an exit, a 1x1 convolution ``E_i`` into the K classes, and the teacher's logits teach every
exit through PDD, ``L_exit = mean_i L_pdd(E_i F_s,i, z_t, y)`` (same constants and class balance as ``L_pdd``).
Intermediate features of a CNN and a ViT live in different spaces, which a feature loss must bridge with a
projector; logit space is shared, so the exits pass the teacher's class knowledge to each stage without asking
the ViT to copy the CNN's features. The exits live in this module, never in the student, and follow a weight
schedule like the stage term. They read the student side of the stage pairs only.

Channel-wise logit term (our addition, off by default): CWD's formula (Shu et al., "Channel-wise Knowledge
Distillation for Dense Prediction", ICCV 2021) on the logits PDD reads,
``L_channel = tau^2 * mean_{b, k} KL(softmax_hw(z_t[b, k] / tau) || softmax_hw(z_s[b, k] / tau))``
(:func:`~.cwd.cwd_loss`). PDD matches each pixel's distribution over classes, where the frequent classes own
most pixels; ``L_channel`` matches each class map's distribution over positions, where every class counts
once. On CamVid's held-out sequence CWD gained more over the plain student than C2VKD did (section 0f of
``benchmarks/camvid/FINDINGS.md``), which this term tests inside C2VKD.
With ``channel_present_only`` the term keeps only the maps of the classes an image's labels contain,
``L_channel = tau^2 / (B K) * sum_{b, k} m[b, k] KL_{b, k}`` with ``m[b, k] = 1`` when class k labels a pixel of
image b (:func:`~.common.present_classes`): where a class is absent, the teacher's map of it says where its
logits are least low, which is no knowledge of that class. The normalisation stays ``B K``, so a present map
weighs what it weighs unmasked. On CamVid val the unmasked term cost the rare moving classes (Bicyclist -13,
Pedestrian -6 IoU against C2VKD, both seeds), which are absent from most images (FINDINGS section 0h). The
mask did not give that back (seed 0: val -0.44 against the unmasked term, Bicyclist +4.6 but Fence -7.5; FINDINGS
section 0i), so it stays off by default.

Logit standardisation in PDD (our addition, off by default, ``pdd_logit_standardization``): PDD reads the
z-scored logits ``Z(z) = (z - mean_k z) / std_k z`` of student and teacher, per pixel at the logit grid
(:func:`~.common.standardize_logits`; Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024),
at its temperature ``T``: ``L_pdd(Z(z_s), Z(z_t))``. The student then matches the shape of the teacher's class
distribution, not its logit scale, which a text head (cosine scores over a fixed ``tau``) bounds. The
cross-entropy keeps the raw logits.

Which logits CE and PDD read is the trainer's choice: the student's own classifier's, or (the
default with the ``decoder`` feature pair and text embeddings) the linguistic head's pixel-text
logits ``S`` of the student's text head (``--text_head``, :mod:`c2vkd_hf.text_head`), whose projector the
linguistic term then shares and which becomes the student's classifier at the end. Training the head that ships with the labels and PDD, not only with the
linguistic term on the feature grid, raised CamVid val mIoU by +1.5 points on average over 3 seeds;
this is our addition, not the paper's. The same head with no teacher term scored higher still, so
that gain belongs to the head, not to distillation (``benchmarks/camvid/FINDINGS.md``, section 3a).

Class-balanced means (our addition, ``class_balance``/``class_balance_power``): PDD's and the linguistic
term's means over pixels weigh class k by ``n_k^(1-p)`` (:func:`~.common.class_balanced_weights`). This class
defaults to the paper's plain means; the product's flags default to ``p = 0.5``, because with plain means
C2VKD lost CamVid's rare classes and ended below the teacher-free student with the same head
(``benchmarks/camvid/FINDINGS.md``, section 0a). ``class_balance_terms`` balances one term only (the
other keeps the plain mean): per class, balance traded the large classes for the rare ones (section 0c).

Cost (the formulas are unchanged; :mod:`.pdd`, :mod:`.vlfd`): when the student's text head is the
linguistic projector, the linguistic term reads the head's ``S`` (``student_text_logits``) instead of
projecting the feature a second time; the 1x1 projectors run as matrix products on channels-last rows;
at ``T = 1`` the cross-entropy comes out of PDD's log-probabilities.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX
from .base import DistillationLoss
from .common import check_positive, check_unit_interval, check_weight, present_classes, standardize_logits
from .cwd import cwd_loss
from .pdd import pdd_loss, pdd_loss_and_cross_entropy
from .registry import register_loss
from .vlfd import (
    conv1x1_rows,
    project_pixel_text_logits,
    vlfd_global_loss,
    vlfd_linguistic_loss_from_scores,
    vlfd_relation_loss,
)

__all__ = ["C2VKDLoss", "BALANCEABLE_TERMS", "parse_class_balance_terms"]

#: The terms whose means over pixels ``class_balance`` can make class-balanced.
BALANCEABLE_TERMS = ("pdd", "ling")


def parse_class_balance_terms(spec: str) -> tuple[str, ...]:
    """``"pdd,ling"`` -> ``("pdd", "ling")``: the comma-separated ``--class_balance_terms`` flag, each name one of
    :data:`BALANCEABLE_TERMS`, at least one, none twice."""
    terms = tuple(t.strip() for t in str(spec).split(",") if t.strip())
    if not terms or set(terms) - set(BALANCEABLE_TERMS) or len(set(terms)) < len(terms):
        raise ValueError(f"--class_balance_terms must name some of {', '.join(BALANCEABLE_TERMS)} once each, "
                         f"comma-separated, got {spec!r}")
    return terms

FeatureList = Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]


def _as_channel_list(name: str, value) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    value = [int(v) for v in value]
    if not value or any(v < 1 for v in value):
        raise ValueError(f"{name} must be a non-empty list of positive channel counts, got {value!r}")
    return value


def _as_feature_list(name: str, value: FeatureList) -> Optional[List[torch.Tensor]]:
    if value is None:
        return None
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        raise TypeError(f"{name} must be a list of (B, C, h, w) tensors in pair order, not a dict")
    return list(value)


@register_loss("c2vkd")
class C2VKDLoss(DistillationLoss):
    """CE + PDD + VLFD, with the projectors it needs.

    Args:
        student_channels: channel count of each student feature in the aligned pairs (an int is one
            pair). ``None``: no feature pairs, so no ``glob``/``rel``/``ling`` terms.
        teacher_channels: channel count of each teacher feature, same length.
        text_embeddings: ``(K, D)`` class-name embeddings, stored L2-normalised as a non-persistent
            buffer (never trained, not saved); ``None`` turns the linguistic term off.
        text_classes: ``(K,)`` bools, False for a class whose name has no embedding (its row a placeholder):
            the linguistic term then reads the marked classes only (``classes`` of
            :func:`~.vlfd.vlfd_linguistic_loss_from_scores`); ``None``: every class has one.
        ling_feature_index: which student feature (index into the pair list) feeds ``P_l``.
        ling_projector: an existing 1x1 conv to use as ``P_l`` (the student's text head's projector,
            shared so that the linguistic term trains the head the student classifies with); default:
            a new one.
        stage_student_channels, stage_teacher_channels: channel counts of the stage-guidance pairs
            (``L_stage``, after the main pairs in the feature lists); ``None``: no stage term.
        exit_weight, num_classes: weight of the stage exits ``L_exit`` (module docstring; 0: off) and the class
            count ``K`` of their logits (needed when ``exit_weight > 0``); the exits read the stage pairs' student
            features.
        ce_weight, pdd_weight, glob_weight, rel_weight, ling_weight, stage_weight, channel_weight: term weights
            (>= 0; ``channel_weight`` defaults to 0, the paper's C2VKD); a term of
            weight 0 is not computed, not reported, and gets no projector. ``glob_weight`` defaults to
            0.1, not 1: on CamVid (SegFormer-B0 from scratch, UperNet-Lite0 teacher) the global term at
            weight 1 stayed near 2.2 nats per position all run long (three times the cross-entropy),
            dominated the gradient and the student ended 3.4 mIoU below the plain student
            (``benchmarks/camvid/ABLATIONS.md``, run ``c2vkd-glob1``).
        pdd_alpha, pdd_beta, pdd_temperature, label_weight: PDD constants (``label_weight`` is also
            the linguistic target's label correction g).
        pdd_logit_standardization: PDD reads z-scored logits (module docstring); the cross-entropy does not.
        glob_tau, rel_grid, ling_tau: VLFD constants. ``channel_tau``: the channel-wise term's temperature
            (CWD's recipe, 4). ``channel_present_only``: the channel-wise term reads only the maps of the classes
            each image's labels contain (module docstring).
        class_balance: PDD's and the linguistic term's means over pixels become class-balanced (every class
            present in the batch's labels weighs the same, :func:`~.common.class_balanced_weights`); the
            cross-entropy stays the plain mean. Our addition, not the paper's. ``class_balance_power``: the
            exponent ``p`` of the balancing (class ``k`` weighs ``n_k^(1 - p)``; 1: every class the same).
            ``class_balance_terms``: which of the two terms balance (``("pdd", "ling")``, the default, or one
            of them; the other keeps the plain mean).
        ignore_index: void label value.

    ``forward(student_logits, teacher_logits, labels, student_features, teacher_features)`` returns
    the unweighted terms among ``ce, pdd, channel, glob, rel, ling, stage, exit`` plus ``loss``. The feature lists
    hold the main pairs, then the stage pairs. Feature terms average over their pairs. Teacher
    tensors are detached.
    """

    def __init__(
        self,
        *,
        student_channels: Optional[Union[int, Sequence[int]]] = None,
        teacher_channels: Optional[Union[int, Sequence[int]]] = None,
        text_embeddings: Optional[torch.Tensor] = None,
        text_classes: Optional[Sequence[bool]] = None,
        ling_feature_index: int = -1,
        ling_projector: Optional[nn.Conv2d] = None,
        stage_student_channels: Optional[Sequence[int]] = None,
        stage_teacher_channels: Optional[Sequence[int]] = None,
        stage_weight: float = 0.0,
        exit_weight: float = 0.0,
        num_classes: Optional[int] = None,
        ce_weight: float = 1.0,
        pdd_weight: float = 1.0,
        glob_weight: float = 0.1,
        rel_weight: float = 1.0,
        ling_weight: float = 1.0,
        pdd_alpha: float = 1.0,
        pdd_beta: float = 1.0,
        pdd_temperature: float = 1.0,
        label_weight: float = 0.5,
        pdd_logit_standardization: bool = False,
        glob_tau: float = 1.0,
        rel_grid: int = 16,
        ling_tau: float = 0.03,
        channel_weight: float = 0.0,
        channel_tau: float = 4.0,
        channel_present_only: bool = False,
        class_balance: bool = False,
        class_balance_power: float = 1.0,
        class_balance_terms: Sequence[str] = BALANCEABLE_TERMS,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(ce_weight=ce_weight, ignore_index=ignore_index)
        pdd_weight = check_weight("pdd_weight", pdd_weight)
        glob_weight = check_weight("glob_weight", glob_weight)
        rel_weight = check_weight("rel_weight", rel_weight)
        ling_weight = check_weight("ling_weight", ling_weight)
        stage_weight = check_weight("stage_weight", stage_weight)
        exit_weight = check_weight("exit_weight", exit_weight)
        channel_weight = check_weight("channel_weight", channel_weight)
        self.channel_tau = check_positive("channel_tau", channel_tau)
        self.channel_present_only = bool(channel_present_only)
        self.pdd_alpha = check_weight("pdd_alpha", pdd_alpha)
        self.pdd_beta = check_weight("pdd_beta", pdd_beta)
        self.pdd_temperature = check_positive("pdd_temperature", pdd_temperature)
        self.label_weight = check_unit_interval("label_weight", label_weight)
        self.pdd_logit_standardization = bool(pdd_logit_standardization)
        self.glob_tau = check_positive("glob_tau", glob_tau)
        self.ling_tau = check_positive("ling_tau", ling_tau)
        self.class_balance = bool(class_balance)
        self.class_balance_power = check_weight("class_balance_power", class_balance_power)
        terms = tuple(class_balance_terms)
        if not terms or set(terms) - set(BALANCEABLE_TERMS):
            raise ValueError(f"class_balance_terms must name some of {', '.join(BALANCEABLE_TERMS)}, got {terms!r}")
        self.class_balance_terms = terms
        if not isinstance(rel_grid, int) or isinstance(rel_grid, bool) or rel_grid < 1:
            raise ValueError(f"rel_grid must be an integer >= 1, got {rel_grid!r}")
        self.rel_grid = rel_grid

        s_ch = _as_channel_list("student_channels", student_channels)
        t_ch = _as_channel_list("teacher_channels", teacher_channels)
        if (s_ch is None) != (t_ch is None) or (s_ch is not None and len(s_ch) != len(t_ch)):
            raise ValueError(
                f"student_channels and teacher_channels must be given together with one entry per feature "
                f"pair, got {student_channels!r} and {teacher_channels!r}"
            )
        self.student_channels = s_ch or []
        self.teacher_channels = t_ch or []
        n_pairs = len(self.student_channels)
        ss_ch = _as_channel_list("stage_student_channels", stage_student_channels) or []
        st_ch = _as_channel_list("stage_teacher_channels", stage_teacher_channels) or []
        if len(ss_ch) != len(st_ch):
            raise ValueError(f"stage_student_channels and stage_teacher_channels need one entry per stage pair, got "
                             f"{stage_student_channels!r} and {stage_teacher_channels!r}")
        self.stage_student_channels, self.stage_teacher_channels = ss_ch, st_ch
        self.stage_projectors = None
        if ss_ch and stage_weight > 0:
            self.weights["stage"] = stage_weight
            self.stage_projectors = nn.ModuleList(nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in zip(ss_ch, st_ch))
        self.exit_heads = None
        if exit_weight > 0:
            if not ss_ch:
                raise ValueError("exit_weight > 0 needs stage pairs (the exits read their student features)")
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
                raise ValueError(f"exit_weight > 0 needs num_classes, a positive int, got {num_classes!r}")
            self.weights["exit"] = exit_weight
            self.exit_heads = nn.ModuleList(nn.Conv2d(cs, num_classes, kernel_size=1) for cs in ss_ch)

        if pdd_weight > 0:
            self.weights["pdd"] = pdd_weight
        if channel_weight > 0:
            self.weights["channel"] = channel_weight
        self.visual_projectors = None
        if n_pairs and glob_weight > 0:
            self.weights["glob"] = glob_weight
            self.visual_projectors = nn.ModuleList(
                nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in zip(self.student_channels, self.teacher_channels)
            )
        if n_pairs and rel_weight > 0:
            self.weights["rel"] = rel_weight

        self.ling_projector = None
        self.ling_feature_index = int(ling_feature_index)
        emb = None
        if text_embeddings is not None:
            emb = torch.as_tensor(text_embeddings).detach().float()
            if emb.dim() != 2:
                raise ValueError(f"text_embeddings must be (K, D), got shape {tuple(emb.shape)}")
            emb = F.normalize(emb, dim=1)
            if ling_weight > 0:
                if not n_pairs:
                    raise ValueError("the linguistic term needs student features: pass student_channels/teacher_channels")
                if not -n_pairs <= self.ling_feature_index < n_pairs:
                    raise ValueError(f"ling_feature_index {ling_feature_index} is out of range for {n_pairs} feature pair(s)")
                self.weights["ling"] = ling_weight
                in_channels = self.student_channels[self.ling_feature_index]
                if ling_projector is not None:
                    if (ling_projector.in_channels, ling_projector.out_channels) != (in_channels, emb.shape[1]):
                        raise ValueError(f"ling_projector maps {ling_projector.in_channels} -> {ling_projector.out_channels} "
                                         f"channels; the linguistic term needs {in_channels} -> {emb.shape[1]}")
                    self.ling_projector = ling_projector
                else:
                    self.ling_projector = nn.Conv2d(in_channels, emb.shape[1], kernel_size=1)
        self.register_buffer("text_embeddings", emb, persistent=False)
        classes = None
        if text_classes is not None and emb is not None and not all(bool(c) for c in text_classes):
            if len(text_classes) != emb.shape[0]:
                raise ValueError(f"text_classes has {len(text_classes)} entries for {emb.shape[0]} text embeddings")
            if not any(bool(c) for c in text_classes):
                raise ValueError("text_classes marks no class: the linguistic term would have nothing to read")
            classes = torch.tensor([bool(c) for c in text_classes])
        self.register_buffer("text_classes", classes, persistent=False)

    @property
    def uses_features(self) -> bool:
        """Whether ``forward`` needs ``student_features`` and ``teacher_features``."""
        return any(k in self.weights for k in ("glob", "rel", "ling", "stage", "exit"))

    def _check_features(self, student_features, teacher_features):
        fs = _as_feature_list("student_features", student_features)
        ft = _as_feature_list("teacher_features", teacher_features)
        if fs is None or ft is None:
            raise ValueError(
                "C2VKD with feature terms "
                f"{[k for k in self.weights if k in ('glob', 'rel', 'ling', 'stage', 'exit')]} needs student_features and "
                "teacher_features"
            )
        s_ch = self.student_channels + self.stage_student_channels
        t_ch = self.teacher_channels + self.stage_teacher_channels
        n = len(s_ch)
        if len(fs) != n or len(ft) != n:
            raise ValueError(f"expected {n} feature pair(s), got {len(fs)} student and {len(ft)} teacher features")
        for i, (a, b, ca, cb) in enumerate(zip(fs, ft, s_ch, t_ch)):
            if a.dim() != 4 or b.dim() != 4 or a.shape[1] != ca or b.shape[1] != cb:
                raise ValueError(
                    f"feature pair {i}: expected (B, {ca}, h, w) student and (B, {cb}, h, w) teacher tensors, "
                    f"got {tuple(a.shape)} and {tuple(b.shape)}"
                )
        return fs, ft

    def distillation_terms(
        self, student_logits, teacher_logits, labels, student_features=None, teacher_features=None,
        student_text_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The unweighted terms. ``student_text_logits``: the pixel-text logits
        ``S = normalise(P_l F_s) E^T / tau`` of the linguistic feature, when the caller already has them
        (the student's text head, whose projector is ``P_l``, computed exactly this ``S`` for its logits:
        :class:`~c2vkd_hf.trainer.DistillationModel` passes them); ``None``: projected here."""
        terms: Dict[str, torch.Tensor] = {}
        weights = self.effective_weights()  # a scheduled term whose weight has reached 0 is not computed
        if "pdd" in self.weights:
            constants = self._pdd_constants()
            if self.pdd_temperature == 1.0 and not self.pdd_logit_standardization:
                # the cross-entropy is a by-product of PDD's log-probabilities at T = 1 (the same value)
                terms["pdd"], terms["ce"] = pdd_loss_and_cross_entropy(student_logits, teacher_logits, labels,
                                                                       **constants)
            else:
                zs, zt = student_logits, teacher_logits
                if self.pdd_logit_standardization:  # PDD on z-scored logits; CE (raw logits) from the base class
                    zs, zt = standardize_logits(zs), standardize_logits(zt.detach())
                terms["pdd"] = pdd_loss(zs, zt, labels, temperature=self.pdd_temperature, **constants)
        if weights.get("channel", 0) > 0:
            present = (present_classes(labels, student_logits.shape[1], self.ignore_index)
                       if self.channel_present_only else None)
            terms["channel"] = cwd_loss(student_logits, teacher_logits, tau=self.channel_tau, channel_weights=present)
        if not self.uses_features:
            return terms
        fs, ft = self._check_features(student_features, teacher_features)
        n = len(self.student_channels)
        fs, ft, stage_s, stage_t = fs[:n], ft[:n], fs[n:], ft[n:]
        if weights.get("stage", 0) > 0:
            per_pair = [vlfd_global_loss(self._project(q, a), b, tau=self.glob_tau)
                        + vlfd_relation_loss(a, b, grid=self.rel_grid)
                        for q, a, b in zip(self.stage_projectors, stage_s, stage_t)]
            terms["stage"] = torch.stack(per_pair).mean()
        if weights.get("exit", 0) > 0:
            per_exit = [pdd_loss(self._project(e, a), teacher_logits, labels, temperature=self.pdd_temperature,
                                 **self._pdd_constants())
                        for e, a in zip(self.exit_heads, stage_s)]
            terms["exit"] = torch.stack(per_exit).mean()
        if "glob" in self.weights:
            per_pair = [vlfd_global_loss(self._project(p, a), b, tau=self.glob_tau)
                        for p, a, b in zip(self.visual_projectors, fs, ft)]
            terms["glob"] = torch.stack(per_pair).mean()
        if "rel" in self.weights:
            per_pair = [vlfd_relation_loss(a, b, grid=self.rel_grid) for a, b in zip(fs, ft)]
            terms["rel"] = torch.stack(per_pair).mean()
        if "ling" in self.weights:
            feature = fs[self.ling_feature_index]
            scores = student_text_logits
            if scores is None:
                scores = project_pixel_text_logits(feature, self.ling_projector, self.text_embeddings,
                                                   tau=self.ling_tau)
            elif tuple(scores.shape) != (feature.shape[0], self.text_embeddings.shape[0], *feature.shape[-2:]):
                raise ValueError(f"student_text_logits {tuple(scores.shape)} must be (B, K, h, w) at the linguistic "
                                 f"feature's grid {tuple(feature.shape[-2:])}")
            terms["ling"] = vlfd_linguistic_loss_from_scores(
                scores,
                teacher_logits,
                labels,
                self.text_embeddings,
                tau=self.ling_tau,
                label_weight=self.label_weight,
                ignore_index=self.ignore_index,
                class_balance=self.balances("ling"),
                class_balance_power=self.class_balance_power,
                classes=self.text_classes,
            )
        return terms

    def _pdd_constants(self) -> dict:
        """PDD's keyword constants (shared by ``L_pdd`` and the stage exits)."""
        return dict(alpha=self.pdd_alpha, beta=self.pdd_beta, label_weight=self.label_weight,
                    ignore_index=self.ignore_index, class_balance=self.balances("pdd"),
                    class_balance_power=self.class_balance_power)

    def balances(self, term: str) -> bool:
        """Whether ``term`` (``pdd`` or ``ling``) takes class-balanced means."""
        return self.class_balance and term in self.class_balance_terms

    @staticmethod
    def _project(projector: nn.Conv2d, feature: torch.Tensor) -> torch.Tensor:
        """``projector(feature)`` (a 1x1 conv), computed on channels-last rows (:func:`~.vlfd.conv1x1_rows`)
        and returned as a ``(B, C_t, h, w)`` view of them."""
        return conv1x1_rows(feature, projector).permute(0, 3, 1, 2)

    def pixel_text_logits(
        self, student_feature: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Score each pixel of a student feature against class-name embeddings (default: the training
        classes; any ``(K', D)`` embeddings work, e.g. unseen class names). Returns ``(B, K', h, w)``."""
        if self.ling_projector is None:
            raise ValueError("this C2VKDLoss has no linguistic projector (no text_embeddings or ling_weight == 0)")
        emb = self.text_embeddings if text_embeddings is None else text_embeddings.to(student_feature.device)
        return project_pixel_text_logits(student_feature, self.ling_projector, emb, tau=self.ling_tau)
