"""``--help`` in sections (model and data, method and its main weights, training, advanced, the rest of
``TrainingArguments``) instead of one list of some 200 flags: :class:`SectionedHelpParser`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from transformers import HfArgumentParser

#: The sections of ``c2vkd-distill --help``, in order, by flag (``dest``) name. Flags of our dataclasses in none of
#: them are listed under :data:`ADVANCED`; ``TrainingArguments``' others under :data:`OTHER`.
DISTILL_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model and data", (
        "student_name_or_path", "teacher_name_or_path", "dataset_name", "dataset_config_name", "image_column",
        "label_column", "train_images", "train_labels", "validation_images", "validation_labels", "labels_file",
        "reduce_labels", "resize_height", "resize_width", "resize_shortest_edge", "crop_height", "crop_width")),
    ("method and its main weights", (
        "method", "recipe", "ce_weight", "pdd_weight", "glob_weight", "rel_weight", "ling_weight", "kd_weight",
        "kd_temperature", "text_head", "text_embeddings", "clip_model", "clip_pretrained", "teacher_cache")),
    ("training", (
        "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed",
        "bf16", "use_cpu", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "logging_steps",
        "load_best_model_at_end", "metric_for_best_model", "report_to", "push_to_hub", "hub_model_id", "retrain",
        "train_baseline")),
)
ADVANCED = "advanced: the methods' other constants, data details, caches and stage exits"
OTHER = "other transformers.TrainingArguments"


class SectionedHelpParser(HfArgumentParser):
    """An ``HfArgumentParser`` whose ``--help`` lists the flags in ``sections`` (``(title, flag names)``), then
    the other flags of ``own`` dataclasses (:data:`ADVANCED`), then the rest (:data:`OTHER`). Parsing is
    unchanged."""

    def __init__(self, dataclass_types, *, sections: Sequence[tuple[str, Sequence[str]]], own: Sequence[type],
                 usage_line: str, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.sections = [(title, tuple(names)) for title, names in sections]
        self.own = {f.name for dtype in own for f in dataclasses.fields(dtype)}
        self.usage_line = usage_line

    def add_argument(self, *args, **kwargs):
        """Flags added by hand (not from a dataclass) count as our own."""
        action = super().add_argument(*args, **kwargs)
        if getattr(self, "own", None) is not None:
            self.own.add(action.dest)
        return action

    def sectioned_actions(self) -> list[tuple[str, list]]:
        """``[(title, argparse actions)]`` in the order ``--help`` shows them (``-h`` first, in no section)."""
        actions = [a for a in self._actions if a.dest != "help"]
        placed, out = set(), []
        for title, names in self.sections:
            chosen = [a for name in names for a in actions if a.dest == name]
            placed.update(id(a) for a in chosen)
            out.append((title, chosen))
        out.append((ADVANCED, [a for a in actions if id(a) not in placed and a.dest in self.own]))
        out.append((OTHER, [a for a in actions if id(a) not in placed and a.dest not in self.own]))
        return out

    def format_help(self) -> str:
        formatter = self.formatter_class(prog=self.prog)
        formatter.add_usage(self.usage_line, [], [])
        formatter.add_text(self.description)
        for title, actions in self.sectioned_actions():
            formatter.start_section(title)
            formatter.add_arguments(actions)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()
