"""Base class of the loss modules: cross-entropy on labels plus named, weighted terms.

Every registered loss is an ``nn.Module`` whose ``forward(student_logits, teacher_logits, labels,
student_features=None, teacher_features=None)`` returns a dict of *unweighted* scalar terms plus
``"loss"``, the weighted total ``sum(weights[k] * terms[k])``. ``self.weights`` maps each reported
term name to its weight, so a trainer can log ``loss/<term>`` and the weighted values.

Cross-entropy (term ``"ce"``, weight ``ce_weight``) is always computed and reported, even at weight
0 (it is cheap and the most useful curve to watch). Any other term whose weight is 0 is neither
computed nor reported, and no projector is built for it.

A term may follow a weight schedule over training (:mod:`.schedule`): ``set_schedules`` assigns them,
``progress`` (step / total steps, set by the trainer each step) selects the point on it, and
:meth:`DistillationLoss.effective_weights` gives ``w * s(progress)``, which the total uses.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from ..constants import IGNORE_INDEX
from .common import check_positive, check_weight, cross_entropy
from .schedule import Schedule, schedule_factor

__all__ = ["DistillationLoss", "LogitDistillationLoss", "pick_temperature"]


def pick_temperature(temperature: Optional[float], tau: Optional[float], default: float) -> float:
    """Resolve the ``temperature`` / ``tau`` aliases (None means the method's default)."""
    if temperature is not None and tau is not None and float(temperature) != float(tau):
        raise ValueError(f"temperature={temperature!r} and tau={tau!r} are aliases; give only one")
    value = temperature if temperature is not None else tau
    return check_positive("temperature", default if value is None else value)


class DistillationLoss(nn.Module):
    """Cross-entropy plus distillation terms; subclasses fill ``self.weights`` and ``terms()``."""

    method_name: str = ""
    #: whether forward needs teacher logits
    requires_teacher: bool = True

    def __init__(self, *, ce_weight: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.ignore_index = int(ignore_index)
        self.weights: Dict[str, float] = {"ce": self.ce_weight}
        self.schedules: Dict[str, Schedule] = {}
        #: fraction of training done, in [0, 1]; the trainer sets it before each step
        self.progress = 0.0

    @property
    def term_names(self) -> List[str]:
        """Names of the terms ``forward`` reports (besides ``"loss"``)."""
        return list(self.weights)

    def set_schedules(self, schedules: Dict[str, Schedule]) -> None:
        """Weight schedules by term name (:mod:`.schedule`); a schedule for a term this loss does not
        have (e.g. ``stage`` with no stage pairs) is ignored, so one setting serves every method."""
        self.schedules = {name: sched for name, sched in schedules.items() if name in self.weights}

    def effective_weights(self) -> Dict[str, float]:
        """``{term: weight * s(progress)}``: the weights the total uses at the current progress."""
        return {name: w * schedule_factor(self.schedules.get(name), self.progress) for name, w in self.weights.items()}

    def distillation_terms(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor],
        student_features=None,
        teacher_features=None,
    ) -> Dict[str, torch.Tensor]:
        """Unweighted distillation terms (everything except ``"ce"``; a subclass that gets the
        cross-entropy as a by-product may return it as ``"ce"``, which :meth:`forward` then uses)."""
        raise NotImplementedError

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        student_features=None,
        teacher_features=None,
        **term_inputs,
    ) -> Dict[str, torch.Tensor]:
        """The terms and their weighted total ``"loss"``. ``term_inputs``: extra keyword inputs a
        subclass's :meth:`distillation_terms` accepts (C2VKD: ``student_text_logits``), passed through."""
        terms = {}
        if len(self.weights) > 1:
            if teacher_logits is None and self.requires_teacher:
                raise ValueError(f"loss {self.method_name!r} needs teacher_logits")
            terms = self.distillation_terms(student_logits, teacher_logits, labels, student_features,
                                            teacher_features, **term_inputs)
        ce = terms.pop("ce", None)  # a subclass may compute it as a by-product (C2VKD's PDD at T = 1)
        if ce is None:
            ce = cross_entropy(student_logits, labels, ignore_index=self.ignore_index)
        terms = {"ce": ce, **terms}
        total = None
        weights = self.effective_weights()
        for key, value in terms.items():
            weighted = weights[key] * value
            total = weighted if total is None else total + weighted
        terms["loss"] = total
        return terms

    def linguistic_head(self, feature_names) -> Optional[tuple]:
        """``(projector, text embeddings, student feature, tau)`` of a term scoring student pixels against class
        names (C2VKD's linguistic term), or ``None``: this loss has none."""
        return None

    def reads_text_head(self, head, feature_names) -> bool:
        """Whether this loss may read ``head``'s pixel-text logits instead of computing its own (C2VKD); here no."""
        return False

    def extra_repr(self) -> str:
        return ", ".join(f"{k}_weight={v:g}" for k, v in self.weights.items())


class LogitDistillationLoss(DistillationLoss):
    """CE plus one logit-distillation term computed by a pure function (KD, CWD, DIST, DKD).

    A subclass sets ``term`` (its name), ``default_weight``, ``default_temperature``,
    ``temperature_arg`` (the keyword its function takes: ``"temperature"`` or ``"tau"``),
    ``uses_labels`` and ``loss_fn``; its own constants (e.g. DKD's ``alpha``/``beta``), validated by
    the subclass, arrive as ``constants``, become attributes and are forwarded to ``loss_fn``.
    ``kd_weight`` (``None``: the method's recipe) weighs the term; ``temperature``/``tau`` are aliases.
    """

    term: str = ""
    default_weight: float = 1.0
    default_temperature: float = 1.0
    temperature_arg: str = "temperature"
    uses_labels: bool = True
    loss_fn = None

    def __init__(
        self,
        *,
        kd_weight: Optional[float] = None,
        temperature: Optional[float] = None,
        tau: Optional[float] = None,
        ce_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        constants: Optional[Dict[str, float]] = None,
    ) -> None:
        super().__init__(ce_weight=ce_weight, ignore_index=ignore_index)
        self.temperature = pick_temperature(temperature, tau, self.default_temperature)
        self.constants = dict(constants or {})
        for name, value in self.constants.items():
            setattr(self, name, value)
        weight = check_weight("kd_weight", self.default_weight if kd_weight is None else kd_weight)
        if weight > 0:
            self.weights[self.term] = weight

    @property
    def tau(self) -> float:
        """Alias of ``temperature``."""
        return self.temperature

    def distillation_terms(self, student_logits, teacher_logits, labels, student_features=None, teacher_features=None):
        kwargs = {self.temperature_arg: self.temperature, **self.constants}
        if self.uses_labels:
            value = type(self).loss_fn(student_logits, teacher_logits, labels, ignore_index=self.ignore_index, **kwargs)
        else:
            value = type(self).loss_fn(student_logits, teacher_logits, **kwargs)
        return {self.term: value}
