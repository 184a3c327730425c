"""A benchmark's dataset: what a user writes to ask "which method, for my data?" (a small YAML/JSON file).

Keys (relative paths are read from the spec file's folder):

* ``name`` (default: the file's folder name) and ``title`` (for the reports);
* ``data``: ``c2vkd-distill`` data flags: ``train_images``, ``train_labels``, ``validation_images``,
  ``validation_labels``, ``labels_file`` (or ``dataset_name`` ...), the resize (``resize_height``/``resize_width``, or
  ``resize_shortest_edge`` for images of mixed sizes and orientations), ``crop_height``/``crop_width``, ``min_scale``,
  ``max_scale``, ``hflip``;
* ``teacher``: the CNN teacher folder or Hub id every method shares; ``text_embeddings`` (optional: the class names
  resolve in the built-in CLIP vocabulary otherwise);
* ``splits``: ``[val]``, or ``[val, selection]`` with ``selection_holdout``: a glob on training file names held out of
  training and evaluated on instead (a split disjoint from training, for choosing defaults);
  ``split_notes``: one line per split for the reports;
* ``protocols``: ``{name: {max_steps, eval_steps}}``; ``cached_protocols``: the protocols whose teacher-based runs
  replay a teacher cache (default: all);
* ``training`` (optional): ``c2vkd-distill`` training flags over the benchmark's shared recipe (:data:`TRAINING`).

``benchmarks/<name>/dataset.yaml`` holds the built-in ones (``--dataset camvid``, ``stanford_background``,
``msrc21``); results go to ``benchmarks/<name>/``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from ..files import file_sha256

#: The shared training recipe of every benchmark run (a spec's ``training`` overrides entries).
TRAINING = {
    "student_name_or_path": "segformer-b0",
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
    "learning_rate": 6e-4, "lr_scheduler_type": "polynomial", "warmup_steps": 30, "weight_decay": 0.01,
    "eval_strategy": "steps", "save_strategy": "steps", "save_total_limit": 1, "logging_steps": 20,
    "report_to": "none", "disable_tqdm": True, "train_baseline": "false",
}
PATH_FLAGS = ("train_images", "train_labels", "validation_images", "validation_labels", "labels_file")
SPEC_KEYS = {"name", "title", "data", "teacher", "text_embeddings", "splits", "selection_holdout", "split_notes",
             "protocols", "cached_protocols", "training"}


class SpecError(ValueError):
    """A dataset spec that cannot be used (the message names the file and the key)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    data: dict
    teacher: Optional[str]
    text_embeddings: Optional[str]
    splits: tuple[str, ...]
    selection_holdout: Optional[str]
    split_notes: dict
    protocols: dict
    cached_protocols: tuple[str, ...]
    training: dict
    path: Optional[str] = None

    def teacher_sha256(self) -> Optional[str]:
        """The SHA-256 of the teacher folder's ``model.safetensors``: the identity of the teacher a run of this spec
        distils from now. Where the folder is absent, the ``model_safetensors_sha256`` of a ``teacher.json`` beside
        the spec (the record of the teacher trained for it, as ``benchmarks/<name>/teacher.json``); else ``None``
        (a Hub id, or nothing recorded)."""
        weights = Path(self.teacher) / "model.safetensors" if self.teacher else None
        if weights is not None and weights.is_file():
            return file_sha256(weights)
        recorded = Path(self.path).parent / "teacher.json" if self.path else None
        if recorded is not None and recorded.is_file():
            return json.loads(recorded.read_text()).get("model_safetensors_sha256")
        return None

    def shared_config(self, protocol: str, split: str) -> dict:
        """``c2vkd-distill``'s flags shared by every run of ``protocol`` on ``split``."""
        steps = self.protocols[protocol]
        config = {**self.data, "teacher_name_or_path": self.teacher}
        if self.text_embeddings:
            config["text_embeddings"] = self.text_embeddings
        config.update({**TRAINING, **self.training})
        config.update({"max_steps": steps["max_steps"], "eval_steps": steps["eval_steps"],
                       "save_steps": steps["eval_steps"]})
        if split == "selection":
            config["selection_holdout"] = self.selection_holdout
        return config


def builtin_spec_path(name: str, root: Path) -> Path:
    return Path(root) / "benchmarks" / name / "dataset.yaml"


def load_spec(dataset: str, root: Path = Path(".")) -> DatasetSpec:
    """The spec named ``dataset`` (``benchmarks/<dataset>/dataset.yaml`` under ``root``) or in the file
    ``dataset``; a missing file or a bad key is a :class:`SpecError`."""
    path = Path(dataset)
    if not path.is_file():
        path = builtin_spec_path(dataset, root)
        if not path.is_file():
            known = sorted(p.parent.name for p in (Path(root) / "benchmarks").glob("*/dataset.yaml"))
            raise SpecError(f"--dataset {dataset}: not a spec file, and no benchmarks/{dataset}/dataset.yaml"
                            + (f" (built-in: {', '.join(known)})" if known else ""))
    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, ValueError) as error:
        raise SpecError(f"{path}: {error}") from None
    return spec_from_mapping(raw, path)


def spec_from_mapping(raw: Any, path: Path) -> DatasetSpec:
    """A :class:`DatasetSpec` from the mapping read from ``path`` (relative paths resolved from its folder)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of spec keys")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(SPEC_KEYS))})")
    folder = path.resolve().parent

    def resolve(value: Optional[str], always: bool = False) -> Optional[str]:
        """A path relative to the spec's folder; a teacher or embeddings value that is neither such a path nor
        starts with '.' (a Hub id such as org/name) is kept as written."""
        if value is None or Path(value).is_absolute():
            return value
        candidate = folder / value
        return str(candidate.resolve()) if always or value.startswith(".") or candidate.exists() else str(value)

    data = dict(raw.get("data") or {})
    if not data:
        raise SpecError(f"{path}: 'data' must give the data flags (train_images, ... or dataset_name)")
    for flag in PATH_FLAGS:
        if data.get(flag) is not None:
            data[flag] = resolve(data[flag], always=True)
    splits = tuple(raw.get("splits") or ("val",))
    if set(splits) - {"val", "selection"} or "val" not in splits:
        raise SpecError(f"{path}: 'splits' must be [val] or [val, selection], got {list(splits)}")
    holdout = raw.get("selection_holdout")
    if ("selection" in splits) != (holdout is not None):
        raise SpecError(f"{path}: the selection split needs 'selection_holdout' (a glob on training file names), "
                        f"and 'selection_holdout' needs 'selection' in 'splits'")
    protocols = raw.get("protocols") or {}
    if not protocols or not all(isinstance(p, dict) and {"max_steps", "eval_steps"} <= set(p)
                                for p in protocols.values()):
        raise SpecError(f"{path}: 'protocols' must map names to {{max_steps, eval_steps}}")
    cached = tuple(raw.get("cached_protocols", list(protocols)))
    if set(cached) - set(protocols):
        raise SpecError(f"{path}: 'cached_protocols' names unknown protocols {sorted(set(cached) - set(protocols))}")
    name = str(raw.get("name") or folder.name)
    return DatasetSpec(name=name, title=str(raw.get("title") or name), data=data, teacher=resolve(raw.get("teacher")),
                       text_embeddings=resolve(raw.get("text_embeddings")), splits=splits,
                       selection_holdout=holdout, split_notes=dict(raw.get("split_notes") or {}),
                       protocols={k: dict(v) for k, v in protocols.items()}, cached_protocols=cached,
                       training=dict(raw.get("training") or {}), path=str(path))
