"""What every data source returns (:class:`SegmentationData`) and the error it raises (:class:`DataValidationError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import datasets

from ..config import IGNORE_INDEX
from ..validation import check_label_set, check_not_all_void


class DataValidationError(ValueError):
    """The data cannot be used as given; the message names the file(s) and what is wrong."""


@dataclass
class SegmentationData:
    """Train and validation splits (columns ``image``, ``label``) and the class names.

    ``palette`` holds one RGB colour per class when the source defines one (labels file
    ``palette_rgb``, the synthetic dataset), else ``None`` (use :func:`default_palette`).
    ``dataset_ignore_index`` records the source's own void value that was mapped to 255.
    ``validation_total``: the validation split's size before ``--max_eval_samples`` (``None``: not
    recorded; ``len(validation)`` is then the whole split).
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    id2label: dict[int, str]
    name: str
    palette: Optional[list[tuple[int, int, int]]] = None
    dataset_ignore_index: Optional[int] = None
    reduce_labels: bool = False
    validation_total: Optional[int] = None

    def __post_init__(self):
        """Refuses a label set that would give silently wrong results (``c2vkd_hf.validation``):
        duplicate class names, a void value that is a class's value, a split whose masks are all void."""
        check_label_set(self.id2label, self.dataset_ignore_index, self.reduce_labels, f"dataset {self.name}")
        check_not_all_void(self.train, "train", IGNORE_INDEX)
        check_not_all_void(self.validation, "validation", IGNORE_INDEX)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX
