"""What an output folder holds, and whether a run may use it: finished runs, other runs' checkpoints,
verified checkpoints.

**Run identity.** A run is identified by its configuration (:func:`run_config`: the argument
dataclasses, without the fields that cannot change its result, :data:`IGNORED_FIELDS`), stored in
``run_config.json`` when training starts and in the results file at the end. :func:`check_previous_run`
decides, before any work, what a new run does with its ``--output_dir``:

* it holds a finished run (results file + saved model) of the same configuration: nothing to do, the
  saved results are returned (the scripts print them and exit 0, changing nothing);
* it holds a finished run, or checkpoints, of another configuration: refused (:class:`UserInputError`
  listing the differences), never resumed or overwritten;
* ``--retrain``: the previous run's results, checkpoints and ``run_config.json`` are deleted first and
  training starts from scratch.

**Checkpoint manifests.** Each checkpoint gets ``checkpoint_manifest.json`` (every file's size and
SHA-256), written right after the commit marker ``trainer_state.json`` by
``trainer.SafeCheckpointTrainer``; :func:`manifest_problems` verifies it. A checkpoint without a
manifest (written by an earlier version) gets cheaper structural checks: every safetensors file's
header matches its size, every torch file's zip directory is readable (a truncated file fails both).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

from .files import file_sha256
from .validation import UserInputError

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "run_config.json"
MANIFEST_NAME = "checkpoint_manifest.json"
CHECKPOINT_PREFIX = "checkpoint-"

#: Fields that do not change what a run computes: where and how it reports, saves and loads data.
IGNORED_FIELDS = {
    "output_dir", "logging_dir", "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "log_on_each_node", "report_to", "run_name", "project", "disable_tqdm",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
    "hub_revision", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "resume_from_checkpoint",
    "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "skip_memory_metrics", "local_rank", "ddp_timeout",
    "per_device_eval_batch_size", "eval_accumulation_steps", "trust_remote_code", "retrain", "teacher_cache_dir",
    "decoded_cache_dir", "wait_for_lock",
}


def _normalise(value: Any) -> Any:
    """A JSON round trip: tuples become lists, enums and paths strings, so saved and new configs compare."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def run_config(sections: dict[str, dict]) -> dict[str, dict]:
    """``{section: {field: value}}`` (e.g. ``distillation``, ``data``, ``training``) without
    :data:`IGNORED_FIELDS` and secrets: what identifies a run."""
    return _normalise({name: {k: v for k, v in values.items() if k not in IGNORED_FIELDS and "token" not in k}
                       for name, values in sections.items()})


def config_differences(saved: dict, current: dict) -> list[str]:
    """``section.field: saved -> current`` for every field both configs have and that differs (fields
    only one side knows, e.g. added by a newer version, are not compared)."""
    differences = []
    for section in sorted(set(saved) & set(current)):
        old, new = saved[section] or {}, current[section] or {}
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key]:
                differences.append(f"{section}.{key}: {old[key]!r} -> {new[key]!r}")
    return differences


def _read_json(path: Path) -> Optional[dict]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def checkpoint_folders(output_dir: os.PathLike | str) -> list[Path]:
    """The ``checkpoint-N`` folders in ``output_dir``."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
            and p.name[len(CHECKPOINT_PREFIX):].isdigit()]


def _refuse(output_dir: Path, what: str, differences: list[str]) -> UserInputError:
    shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
    return UserInputError(f"--output_dir {output_dir} holds {what} of another configuration ({shown}). Use another "
                          f"--output_dir, or pass --retrain to delete it and train from scratch.")


def check_previous_run(output_dir: os.PathLike | str, config: dict, *, results_name: str, retrain: bool,
                       saved_config=lambda results: results.get("run_config")) -> Optional[dict]:
    """What a run of ``config`` (:func:`run_config`) does with ``output_dir`` (see the module docstring):
    returns the saved results of a finished run of the same configuration, ``None`` to train (fresh or
    resuming), or raises :class:`UserInputError` for another configuration's run. ``saved_config``
    reads a results file's configuration (older results files may keep it elsewhere)."""
    output_dir = Path(output_dir)
    if retrain:
        clear_previous_run(output_dir, results_name)
        return None
    results = _read_json(output_dir / results_name)
    if results is not None and has_saved_model(output_dir):
        stored = saved_config(results)
        differences = config_differences(stored, config) if stored else []
        if differences:
            raise _refuse(output_dir, "a finished run", differences)
        if stored is None:
            logger.warning("%s was written by an earlier version without its configuration; it is taken as this "
                           "run's (pass --retrain to train again).", output_dir / results_name)
        return results
    if checkpoint_folders(output_dir):
        stored = _read_json(output_dir / RUN_CONFIG_NAME)
        differences = config_differences(stored, config) if stored else []
        if differences:
            raise _refuse(output_dir, "checkpoints", differences)
    return None


def has_saved_model(folder: Path) -> bool:
    """Whether ``folder`` holds a saved model (its config and weights)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in weights)


def checkpoint_fit_problem(folder: os.PathLike | str, module) -> Optional[str]:
    """Why the weights in checkpoint ``folder`` (``model.safetensors``) cannot be this ``module``'s
    (another architecture or size), read from the file's header only; ``None`` when they fit."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            saved = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError):
        return None  # unreadable files are the manifest checks' business
    own = {key: list(value.shape) for key, value in module.state_dict().items()}
    common = sorted(set(saved) & set(own))
    if not common:
        return f"none of its {len(saved)} weights are this model's (e.g. {next(iter(saved), '-')})"
    for key in common:
        if saved[key] != own[key]:
            return f"{key} is {saved[key]} there but {own[key]} in this model"
    return None


def write_run_config(output_dir: os.PathLike | str, config: dict) -> None:
    """Records ``config`` as the configuration of the run training in ``output_dir``."""
    path = Path(output_dir) / RUN_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)


def clear_previous_run(output_dir: Path, results_name: str) -> None:
    """``--retrain``: deletes the previous run's results file, checkpoints and ``run_config.json``
    (nothing else: the offline default job's ``teacher/`` and ``baseline/`` stay)."""
    removed = [p for p in (output_dir / results_name, output_dir / RUN_CONFIG_NAME) if p.is_file()]
    for path in removed:
        path.unlink()
    for folder in checkpoint_folders(output_dir):
        shutil.rmtree(folder)
        removed.append(folder)
    if removed:
        logger.warning("--retrain: deleted the previous run in %s (%s).", output_dir,
                       ", ".join(p.name for p in sorted(removed)))


# ------------------------------------------------------------------------------------------ manifests
#: Files that other processes of a distributed run write into the checkpoint at the same time.
_OTHER_PROCESS_FILE = re.compile(r"^rng_state_[1-9][0-9]*\.pth$")


def write_manifest(folder: os.PathLike | str) -> Path:
    """Writes ``checkpoint_manifest.json`` in ``folder``: the size and SHA-256 of every file in it, each file
    ``fsync``-ed first, the manifest written durably last (:func:`~c2vkd_hf.files.write_text_durably`), so a
    checkpoint that verifies after a power loss holds what was written."""
    from .files import fsync_path, write_text_durably

    folder = Path(folder)
    names = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME
             and not _OTHER_PROCESS_FILE.match(p.name) and not p.name.startswith(".")]
    for p in names:
        fsync_path(p)
    for sub in sorted({p.parent for p in names}, key=lambda d: -len(d.parts)):
        fsync_path(sub)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in names}
    path = folder / MANIFEST_NAME
    write_text_durably(path, json.dumps({"files": files}, indent=1))
    return path


def manifest_problems(folder: os.PathLike | str) -> list[str]:
    """What is wrong with the files of a checkpoint ``folder`` (empty: nothing found): checked against
    its manifest (sizes, then SHA-256) when it has one, else structurally (:func:`structural_problems`)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return structural_problems(folder)
    manifest = _read_json(path)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return [f"{MANIFEST_NAME} is unreadable"]
    problems = []
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{name} is {file.stat().st_size} bytes, {expected['size']} were written (truncated?)")
        elif file_sha256(file) != expected["sha256"]:
            problems.append(f"{name} does not match its checksum (corrupt)")
    return problems


def structural_problems(folder: Path) -> list[str]:
    """Truncation checks that need no manifest: a safetensors file must be as long as its header says,
    a torch file (``.pt``, ``.pth``, ``.bin``: zip archives) must have a readable zip directory."""
    problems = []
    for file in sorted(folder.iterdir()):
        if file.suffix == ".safetensors" and not _safetensors_complete(file):
            problems.append(f"{file.name} is truncated or corrupt (its size does not match its header)")
        elif file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
            problems.append(f"{file.name} is truncated or corrupt (not a complete torch file)")
    return problems


def _safetensors_complete(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return path.stat().st_size == 8 + header_size + end
