"""Weight schedules of loss terms over training: constant, or decaying to zero by a fraction of training.

A schedule is ``(kind, end)`` with ``end`` in (0, 1] the fraction of training at which a decaying
weight reaches 0; ``p`` = progress = step / total steps in [0, 1]:

* ``constant``: ``s(p) = 1``
* ``linear``:   ``s(p) = max(0, 1 - p / end)``
* ``cosine``:   ``s(p) = (1 + cos(pi * min(p / end, 1))) / 2``

A term's effective weight is ``w * s(p)``. Why decay: a from-scratch ViT student profits from a CNN
teacher's intermediate features early and is held back by them late (locality guidance, Li et al.,
ECCV 2022; DearKD, Chen et al., CVPR 2022; CSKD, Zhao et al., ICCV 2023).

Flag syntax (:func:`parse_schedules`): ``"stage:linear:0.5,rel:cosine:0.8"``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

__all__ = ["SCHEDULE_KINDS", "schedule_factor", "parse_schedules"]

SCHEDULE_KINDS = ("constant", "linear", "cosine")

Schedule = Tuple[str, float]


def schedule_factor(schedule: Optional[Schedule], progress: float) -> float:
    """The multiplier ``s(p)`` of ``schedule`` at ``progress`` (``None``: constant 1)."""
    if schedule is None:
        return 1.0
    kind, end = schedule
    p = min(max(float(progress), 0.0), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - p / end)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(p / end, 1.0)))
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")


def parse_schedules(spec: Optional[str]) -> Dict[str, Schedule]:
    """``"stage:linear:0.5,glob:cosine:1"`` -> ``{"stage": ("linear", 0.5), "glob": ("cosine", 1.0)}``;
    ``"rel:constant"`` needs no fraction. Raises ``ValueError`` naming the bad entry."""
    schedules: Dict[str, Schedule] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        parts = [p.strip() for p in item.split(":")]
        if len(parts) not in (2, 3) or not parts[0] or parts[1] not in SCHEDULE_KINDS:
            raise ValueError(f"schedule entry {item!r} must look like term:kind[:end], kind one of "
                             f"{', '.join(SCHEDULE_KINDS)} (e.g. stage:linear:0.5)")
        if len(parts) == 2:
            if parts[1] != "constant":
                raise ValueError(f"schedule entry {item!r}: {parts[1]} needs the fraction of training at which the "
                                 "weight reaches 0, e.g. stage:linear:0.5")
            end = 1.0
        else:
            try:
                end = float(parts[2])
            except ValueError:
                raise ValueError(f"schedule entry {item!r}: {parts[2]!r} is not a number") from None
            if not 0.0 < end <= 1.0:
                raise ValueError(f"schedule entry {item!r}: the end fraction must be in (0, 1], got {end}")
        if parts[0] in schedules:
            raise ValueError(f"schedule for term {parts[0]!r} given twice")
        schedules[parts[0]] = (parts[1], end)
    return schedules
