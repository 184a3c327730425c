"""What a complete checkpoint is, and the newest one to resume from (a save interrupted by a kill is skipped)."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from typing import Optional

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from ..runs import MANIFEST_NAME, manifest_problems

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # written last by Trainer._save_checkpoint: the commit marker
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def args_without_token(args):
    """A shallow copy of ``TrainingArguments`` without ``hub_token``, for ``training_args.bin``."""
    safe = copy.copy(args)
    safe.hub_token = None
    return safe


def uncommit_checkpoint(folder: str) -> None:
    """Removes the commit marker (``trainer_state.json``) and the manifest of ``folder``, so that a checkpoint
    folder about to be rewritten, or whose save failed, is never taken as complete."""
    for name in (TRAINER_STATE_NAME, MANIFEST_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)


def checkpoint_problems(folder: str, *, require_optimizer: bool = True) -> list[str]:
    """What makes ``folder`` an incomplete checkpoint (an empty list: it is complete).

    Complete means: ``trainer_state.json`` (written last) parses, the config, the weights and, with
    ``require_optimizer`` (unless ``save_only_model``), the optimizer, scheduler and RNG state are
    present, and the files verify against the checkpoint's manifest (sizes and SHA-256; without a
    manifest, no file is truncated: :func:`~c2vkd_hf.runs.manifest_problems`).
    """
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    problems = []
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            json.load(handle)["global_step"]
    except FileNotFoundError:
        problems.append(f"no {TRAINER_STATE_NAME} (the save did not finish)")
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"{TRAINER_STATE_NAME} is unreadable or truncated ({type(error).__name__})")
    files = set(os.listdir(folder))
    if "config.json" not in files:
        problems.append("no config.json")
    if not files & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}:
        problems.append("no model weights (model.safetensors)")
    if require_optimizer:
        problems += [f"no {name}" for name in ("optimizer.pt", "scheduler.pt") if name not in files]
        if not any(name.startswith("rng_state") for name in files):
            problems.append("no rng_state.pth")
    return problems or manifest_problems(folder)


def last_complete_checkpoint(output_dir: str, *, require_optimizer: bool = True) -> Optional[str]:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (``None`` if there is none);
    incomplete ones (a save interrupted by a kill) are skipped with a warning.

    The folders are listed and ordered by step with transformers' ``sort_checkpoints`` (the order its
    own checkpoint rotation uses). ``get_last_checkpoint`` does not fit here: it returns only the
    newest folder, while this function must fall back to older ones when the newest fails
    :func:`checkpoint_problems` (which includes the manifest check of :mod:`c2vkd_hf.runs`)."""
    if not os.path.isdir(output_dir):
        return None
    names = [os.path.basename(path) for path in sort_checkpoints(output_dir, PREFIX_CHECKPOINT_DIR)]
    for name in reversed([n for n in names if _CHECKPOINT_RE.match(n)]):  # newest first
        folder = os.path.join(output_dir, name)
        problems = checkpoint_problems(folder, require_optimizer=require_optimizer)
        if not problems:
            return folder
        logger.warning("Skipping the incomplete or damaged checkpoint %s (%s): it was interrupted while being "
                       "written or deleted, or a file was damaged since.", folder, "; ".join(problems))
    return None
