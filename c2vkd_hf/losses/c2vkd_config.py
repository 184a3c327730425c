"""The constants of C2VKD's loss (:class:`C2VKDConfig`): weights, temperatures and class balance, with no defaults of
their own. The one default of each is its flag's, in :class:`c2vkd_hf.config.DistillationArguments`;
:meth:`C2VKDConfig.from_args` reads them from there (or from any object with those attributes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..validation import check_ranges

__all__ = ["C2VKDConfig"]


@dataclass(frozen=True)
class C2VKDConfig:
    """C2VKD's loss constants; each field is the flag of the same name (formulas: :mod:`.c2vkd`, :mod:`.pdd`,
    :mod:`.vlfd`). A weight of 0 turns its term off. Built values are range-checked by the flags' own rules
    (:data:`c2vkd_hf.validation.RANGES`)."""

    ce_weight: float
    pdd_weight: float
    glob_weight: float
    rel_weight: float
    ling_weight: float
    stage_weight: float
    exit_weight: float
    channel_weight: float
    pdd_alpha: float
    pdd_beta: float
    pdd_temperature: float
    label_weight: float
    glob_tau: float
    rel_grid: int
    ling_tau: float
    channel_tau: float
    class_balance: bool
    class_balance_power: float

    def __post_init__(self) -> None:
        check_ranges(dataclasses.asdict(self))

    @classmethod
    def from_args(cls, args, **overrides) -> "C2VKDConfig":
        """The configuration of ``args`` (a :class:`~c2vkd_hf.config.DistillationArguments`), with ``overrides``."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, **overrides})
