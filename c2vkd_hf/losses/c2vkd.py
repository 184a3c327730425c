"""C2VKD: CNN-to-ViT knowledge distillation = CE + PDD + VLFD (global, relation, linguistic), plus three optional terms.

Zheng, Luo, Zhou, Wang, "Distilling Efficient Vision Transformers from CNNs for Semantic Segmentation", arXiv
2310.07265. Total loss (formulas of each term in :mod:`.pdd`, :mod:`.vlfd`, :mod:`.cwd`):

``L = w_ce CE + w_pdd L_pdd + w_glob L_glob + w_rel L_rel + w_ling L_ling + w_stage s(p) L_stage
+ w_channel s(p) L_channel + w_exit s(p) L_exit``

``s(p)``: a weight schedule over training progress ``p`` (:mod:`.schedule`); a term whose scheduled weight has
reached 0 is not computed. The constants are a :class:`~.c2vkd_config.C2VKDConfig` (their defaults: the flags').

* **Stage guidance** (our addition): VLFD's visual terms on student/teacher stage pairs, each through its own 1x1
  projector ``Q_i``: ``L_stage = mean_i [L_glob(Q_i F_s,i, F_t,i) + L_rel(F_s,i, F_t,i)]`` (locality guidance,
  Li et al., ECCV 2022; DearKD, Chen et al., CVPR 2022).
* **Stage exits** (OFA-KD, Hao et al., NeurIPS 2023): each student stage of the stage pairs gets a 1x1 exit
  ``E_i`` into the K classes, taught the teacher's logits through PDD: ``L_exit = mean_i L_pdd(E_i F_s,i, z_t, y)``.
  Logit space is shared by a CNN and a ViT, so the exits carry the teacher's class knowledge to each stage without
  asking the ViT to copy the CNN's features. The exits live in this module, never in the student.
* **Channel-wise term** (CWD's formula, Shu et al., ICCV 2021, on the logits PDD reads):
  ``L_channel = tau^2 mean_{b, k} KL(softmax_hw(z_t[b, k] / tau) || softmax_hw(z_s[b, k] / tau))``: each class
  map as a distribution over positions, where every class counts once (PDD's pixels favour the frequent classes).
* **Class-balanced means** (our addition, ``class_balance``): PDD's and the linguistic term's means over pixels weigh
  class k by ``n_k^(1-p)``, ``p`` = ``class_balance_power`` (:func:`~.common.class_balanced_weights`); the
  cross-entropy keeps the plain mean.

The logits CE and PDD read are the trainer's: the student's own classifier's, or its text head's pixel-text logits
``S`` (:mod:`c2vkd_hf.text_head`), whose projector the linguistic term then shares (handed in as
``ling_projector``); :meth:`C2VKDLoss.reads_text_head` says when the head's ``S`` can stand in for the linguistic
term's own projection. At ``T = 1`` the cross-entropy comes out of PDD's log-probabilities.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX
from .base import DistillationLoss
from .c2vkd_config import C2VKDConfig
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

__all__ = ["C2VKDLoss", "C2VKDConfig"]

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


def _class_mask(text_classes: Optional[Sequence[bool]], emb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``text_classes`` as a bool tensor, or ``None`` when every class has an embedding (or there are none)."""
    if text_classes is None or emb is None or all(bool(c) for c in text_classes):
        return None
    if len(text_classes) != emb.shape[0]:
        raise ValueError(f"text_classes has {len(text_classes)} entries for {emb.shape[0]} text embeddings")
    if not any(bool(c) for c in text_classes):
        raise ValueError("text_classes marks no class: the linguistic term would have nothing to read")
    return torch.tensor([bool(c) for c in text_classes])


@register_loss("c2vkd")
class C2VKDLoss(DistillationLoss):
    """CE + PDD + VLFD (and the optional terms of the module docstring), with the projectors they need.

    Args:
        config: the loss constants (:class:`~.c2vkd_config.C2VKDConfig`); a term of weight 0 is not computed, not
            reported, and gets no projector.
        student_channels, teacher_channels: channel counts of the aligned feature pairs, one entry each per pair
            (an int is one pair); ``None``: no feature pairs, so no ``glob``/``rel``/``ling`` terms.
        text_embeddings: ``(K, D)`` class-name embeddings, stored L2-normalised as a non-persistent buffer (never
            trained, not saved); ``None`` turns the linguistic term off.
        text_classes: ``(K,)`` bools, False for a class whose name has no embedding (its row a placeholder): the
            linguistic term then reads the marked classes only; ``None``: every class has one.
        ling_feature_index: which feature pair (index into the pair list) feeds the linguistic projector ``P_l``.
        ling_projector: an existing 1x1 conv to use as ``P_l`` (the student's text head's projector, shared so
            that the linguistic term trains the head the student classifies with); default: a new one.
        stage_student_channels, stage_teacher_channels: channel counts of the stage pairs (after the main pairs in
            the feature lists), read by ``L_stage`` and, student side, by the exits ``L_exit``. The teacher's stage
            maps are passed only when ``L_stage`` is on (:attr:`reads_teacher_stages`): the exits never read them.
        num_classes: ``K``, the class count of the exits (needed when ``config.exit_weight > 0``).
        ignore_index: void label value.

    ``forward(student_logits, teacher_logits, labels, student_features, teacher_features)`` returns the unweighted
    terms among ``ce, pdd, channel, glob, rel, ling, stage, exit`` plus ``loss``. Feature terms average over their
    pairs. Teacher tensors are detached.
    """

    def __init__(
        self,
        config: C2VKDConfig,
        *,
        student_channels: Optional[Union[int, Sequence[int]]] = None,
        teacher_channels: Optional[Union[int, Sequence[int]]] = None,
        text_embeddings: Optional[torch.Tensor] = None,
        text_classes: Optional[Sequence[bool]] = None,
        ling_feature_index: int = -1,
        ling_projector: Optional[nn.Conv2d] = None,
        stage_student_channels: Optional[Sequence[int]] = None,
        stage_teacher_channels: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not isinstance(config, C2VKDConfig):
            raise TypeError(f"config must be a C2VKDConfig, got {type(config).__name__}")
        super().__init__(ce_weight=config.ce_weight, ignore_index=ignore_index)
        self.config = config
        for name in ("pdd_alpha", "pdd_beta", "pdd_temperature", "label_weight", "glob_tau", "rel_grid", "ling_tau",
                     "channel_tau", "class_balance", "class_balance_power"):
            setattr(self, name, getattr(config, name))
        s_ch = _as_channel_list("student_channels", student_channels) or []
        t_ch = _as_channel_list("teacher_channels", teacher_channels) or []
        ss_ch = _as_channel_list("stage_student_channels", stage_student_channels) or []
        st_ch = _as_channel_list("stage_teacher_channels", stage_teacher_channels) or []
        if len(s_ch) != len(t_ch) or len(ss_ch) != len(st_ch):
            raise ValueError(f"student and teacher channels need one entry each per pair, got {student_channels!r} "
                             f"and {teacher_channels!r}, stages {stage_student_channels!r} and "
                             f"{stage_teacher_channels!r}")
        self.student_channels, self.teacher_channels = s_ch, t_ch
        self.stage_student_channels, self.stage_teacher_channels = ss_ch, st_ch
        self.ling_feature_index = int(ling_feature_index)
        self.stage_projectors = self._term_projectors("stage", ss_ch, st_ch)
        self.exit_heads = self._exit_heads(ss_ch, num_classes)
        for term in ("pdd", "channel"):
            if getattr(config, f"{term}_weight") > 0:
                self.weights[term] = getattr(config, f"{term}_weight")
        self.visual_projectors = self._term_projectors("glob", s_ch, t_ch)
        if s_ch and config.rel_weight > 0:
            self.weights["rel"] = config.rel_weight
        emb = None if text_embeddings is None else F.normalize(torch.as_tensor(text_embeddings).detach().float(), dim=1)
        self.ling_projector = self._linguistic_projector(emb, ling_projector)
        self.register_buffer("text_embeddings", emb, persistent=False)
        self.register_buffer("text_classes", _class_mask(text_classes, emb), persistent=False)

    def _term_projectors(self, term: str, student: List[int], teacher: List[int]) -> Optional[nn.ModuleList]:
        """The 1x1 projectors ``student[i] -> teacher[i]`` of ``term`` (``glob`` or ``stage``), registering its
        weight, or ``None`` when it is off or has no pairs."""
        weight = getattr(self.config, f"{term}_weight")
        if not student or weight <= 0:
            return None
        self.weights[term] = weight
        return nn.ModuleList(nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in zip(student, teacher))

    def _exit_heads(self, stage_channels: List[int], num_classes: Optional[int]) -> Optional[nn.ModuleList]:
        """The stage exits (a 1x1 conv into the classes per stage pair), or ``None`` when ``exit_weight`` is 0."""
        if self.config.exit_weight <= 0:
            return None
        if not stage_channels:
            raise ValueError("exit_weight > 0 needs stage pairs (the exits read their student features)")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"exit_weight > 0 needs num_classes, a positive int, got {num_classes!r}")
        self.weights["exit"] = self.config.exit_weight
        return nn.ModuleList(nn.Conv2d(cs, num_classes, kernel_size=1) for cs in stage_channels)

    def _linguistic_projector(self, emb: Optional[torch.Tensor], shared: Optional[nn.Conv2d]) -> Optional[nn.Conv2d]:
        """``P_l`` (``shared``, or a new 1x1 conv) from the linguistic feature to the text space, registering the
        term's weight; ``None`` without text embeddings or at ``ling_weight`` 0."""
        if emb is None or self.config.ling_weight <= 0:
            return None
        n_pairs = len(self.student_channels)
        if emb.dim() != 2:
            raise ValueError(f"text_embeddings must be (K, D), got shape {tuple(emb.shape)}")
        if not n_pairs:
            raise ValueError("the linguistic term needs student features: pass student_channels/teacher_channels")
        if not -n_pairs <= self.ling_feature_index < n_pairs:
            raise ValueError(f"ling_feature_index {self.ling_feature_index} is out of range for {n_pairs} feature "
                             "pair(s)")
        self.weights["ling"] = self.config.ling_weight
        in_channels = self.student_channels[self.ling_feature_index]
        if shared is None:
            return nn.Conv2d(in_channels, emb.shape[1], kernel_size=1)
        if (shared.in_channels, shared.out_channels) != (in_channels, emb.shape[1]):
            raise ValueError(f"ling_projector maps {shared.in_channels} -> {shared.out_channels} channels; the "
                             f"linguistic term needs {in_channels} -> {emb.shape[1]}")
        return shared

    @property
    def uses_features(self) -> bool:
        """Whether ``forward`` needs ``student_features`` and ``teacher_features``."""
        return any(k in self.weights for k in ("glob", "rel", "ling", "stage", "exit"))

    @property
    def reads_teacher_stages(self) -> bool:
        """Whether ``forward`` reads the teacher's stage maps (``L_stage`` on); the exits read only the student's."""
        return self.stage_projectors is not None

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
        t_ch = self.teacher_channels + (self.stage_teacher_channels if self.reads_teacher_stages else [])
        if len(fs) != len(s_ch) or len(ft) != len(t_ch):
            raise ValueError(f"expected {len(s_ch)} student and {len(t_ch)} teacher feature(s) (the feature pairs, "
                             f"then the stage pairs; the teacher's stages only with the stage term), got {len(fs)} "
                             f"and {len(ft)}")
        for i, (a, ca) in enumerate(zip(fs, s_ch)):
            if a.dim() != 4 or a.shape[1] != ca:
                raise ValueError(f"student feature {i}: expected a (B, {ca}, h, w) tensor, got {tuple(a.shape)}")
        for i, (b, cb) in enumerate(zip(ft, t_ch)):
            if b.dim() != 4 or b.shape[1] != cb:
                raise ValueError(f"teacher feature {i}: expected a (B, {cb}, h, w) tensor, got {tuple(b.shape)}")
        return fs, ft

    def distillation_terms(
        self, student_logits, teacher_logits, labels, student_features=None, teacher_features=None,
        student_text_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The unweighted terms. ``student_text_logits``: the pixel-text logits
        ``S = normalise(P_l F_s) E^T / tau`` of the linguistic feature, when the caller already has them
        (the student's text head, whose projector is ``P_l``, computed exactly this ``S`` for its logits:
        :class:`~c2vkd_hf.trainer.DistillationModel` passes them); ``None``: projected here."""
        weights = self.effective_weights()  # a scheduled term whose weight has reached 0 is not computed
        terms = self._logit_terms(student_logits, teacher_logits, labels, weights)
        if not self.uses_features:
            return terms
        fs, ft = self._check_features(student_features, teacher_features)
        n = len(self.student_channels)
        terms.update(self._stage_terms(fs[n:], ft[n:], teacher_logits, labels, weights))
        terms.update(self._pair_terms(fs[:n], ft[:n], teacher_logits, labels, student_text_logits))
        return terms

    def _logit_terms(self, zs, zt, labels, weights) -> Dict[str, torch.Tensor]:
        """``pdd`` (with ``ce`` as its by-product at ``T = 1``) and ``channel``."""
        terms: Dict[str, torch.Tensor] = {}
        if "pdd" in self.weights:
            if self.pdd_temperature == 1.0:
                terms["pdd"], terms["ce"] = pdd_loss_and_cross_entropy(zs, zt, labels, **self._pdd_constants())
            else:
                terms["pdd"] = pdd_loss(zs, zt, labels, temperature=self.pdd_temperature, **self._pdd_constants())
        if weights.get("channel", 0) > 0:
            terms["channel"] = cwd_loss(zs, zt, tau=self.channel_tau)
        return terms

    def _stage_terms(self, stage_s, stage_t, zt, labels, weights) -> Dict[str, torch.Tensor]:
        """``stage`` (VLFD's visual terms on the stage pairs) and ``exit`` (PDD on the stage exits)."""
        terms: Dict[str, torch.Tensor] = {}
        if weights.get("stage", 0) > 0:
            per_pair = [vlfd_global_loss(self._project(q, a), b, tau=self.glob_tau)
                        + vlfd_relation_loss(a, b, grid=self.rel_grid)
                        for q, a, b in zip(self.stage_projectors, stage_s, stage_t)]
            terms["stage"] = torch.stack(per_pair).mean()
        if weights.get("exit", 0) > 0:
            per_exit = [pdd_loss(self._project(e, a), zt, labels, temperature=self.pdd_temperature,
                                 **self._pdd_constants())
                        for e, a in zip(self.exit_heads, stage_s)]
            terms["exit"] = torch.stack(per_exit).mean()
        return terms

    def _pair_terms(self, fs, ft, zt, labels, student_text_logits) -> Dict[str, torch.Tensor]:
        """VLFD on the feature pairs: ``glob``, ``rel`` and ``ling``."""
        terms: Dict[str, torch.Tensor] = {}
        if "glob" in self.weights:
            per_pair = [vlfd_global_loss(self._project(p, a), b, tau=self.glob_tau)
                        for p, a, b in zip(self.visual_projectors, fs, ft)]
            terms["glob"] = torch.stack(per_pair).mean()
        if "rel" in self.weights:
            terms["rel"] = torch.stack([vlfd_relation_loss(a, b, grid=self.rel_grid) for a, b in zip(fs, ft)]).mean()
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
                scores, zt, labels, self.text_embeddings, tau=self.ling_tau, label_weight=self.label_weight,
                ignore_index=self.ignore_index, class_balance=self.class_balance,
                class_balance_power=self.class_balance_power, classes=self.text_classes)
        return terms

    def _pdd_constants(self) -> dict:
        """PDD's keyword constants (shared by ``L_pdd`` and the stage exits)."""
        return dict(alpha=self.pdd_alpha, beta=self.pdd_beta, label_weight=self.label_weight,
                    ignore_index=self.ignore_index, class_balance=self.class_balance,
                    class_balance_power=self.class_balance_power)

    @staticmethod
    def _project(projector: nn.Conv2d, feature: torch.Tensor) -> torch.Tensor:
        """``projector(feature)`` (a 1x1 conv), computed on channels-last rows (:func:`~.vlfd.conv1x1_rows`)
        and returned as a ``(B, C_t, h, w)`` view of them."""
        return conv1x1_rows(feature, projector).permute(0, 3, 1, 2)

    def linguistic_head(self, feature_names: Sequence[str]) -> Optional[tuple[nn.Conv2d, torch.Tensor, str, float]]:
        """``(P_l, E, feature, tau)``: the linguistic term's projector, class-name embeddings, the student feature
        it reads (named from ``feature_names``, the student side of the pairs in order, stage pairs last) and its
        temperature; ``None`` without the linguistic term."""
        if self.ling_projector is None:
            return None
        feature = list(feature_names)[:len(self.student_channels)][self.ling_feature_index]
        return self.ling_projector, self.text_embeddings, feature, self.ling_tau

    def reads_text_head(self, head, feature_names: Sequence[str]) -> bool:
        """Whether ``head``'s pixel-text logits (a :class:`~c2vkd_hf.text_head.TextHead` on the student) are
        exactly the ``S`` the linguistic term scores: the same projector module, feature, temperature and
        class-name embeddings, so that it may read them (``student_text_logits``) instead of projecting the
        feature again. The embeddings are compared once per version of the two buffers (a device sync on a GPU)."""
        own = self.linguistic_head(feature_names)
        if own is None or own[0] is not head.projector or float(own[3]) != head.tau or own[2] != head.feature:
            return False
        mine, theirs = own[1], head.text_embeddings
        if mine is None or mine.shape != theirs.shape:
            return False
        key = (mine.data_ptr(), mine._version, mine.device, theirs.data_ptr(), theirs._version, theirs.device)
        if getattr(self, "_same_embeddings", (None, False))[0] != key:
            self._same_embeddings = (key, bool(torch.equal(mine, theirs.to(mine))))
        return self._same_embeddings[1]

    def pixel_text_logits(
        self, student_feature: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Score each pixel of a student feature against class-name embeddings (default: the training
        classes; any ``(K', D)`` embeddings work, e.g. unseen class names). Returns ``(B, K', h, w)``."""
        if self.ling_projector is None:
            raise ValueError("this C2VKDLoss has no linguistic projector (no text_embeddings or ling_weight == 0)")
        emb = self.text_embeddings if text_embeddings is None else text_embeddings.to(student_feature.device)
        return project_pixel_text_logits(student_feature, self.ling_projector, emb, tau=self.ling_tau)
