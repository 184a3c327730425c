"""``"none"``: the student trained on labels only (cross-entropy), the no-teacher baseline."""

from __future__ import annotations

from ..constants import IGNORE_INDEX
from .base import DistillationLoss
from .registry import register_loss

__all__ = ["CrossEntropyLoss"]


@register_loss("none")
class CrossEntropyLoss(DistillationLoss):
    """Cross-entropy on labels only; ``teacher_logits`` may be ``None``. Terms: ``ce``."""

    requires_teacher = False

    def __init__(self, *, ce_weight: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(ce_weight=ce_weight, ignore_index=ignore_index)
