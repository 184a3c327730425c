"""Checks before any work: distillation flags, local paths, teacher names, classes of data, teacher and text."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig

from ..config import METHODS, DistillationArguments, distillation_defaults
from ..losses.schedule import parse_schedules
from ..models import AUTO_STAGE_PAIRS, SEGFORMER_SIZES, TORCHVISION_ARCHS, parse_feature_pairs, parse_torchvision_name
from ..validation import UserInputError, check_ranges

logger = logging.getLogger(__name__)


def validate_distillation_args(args: DistillationArguments) -> None:
    """Rejects unknown methods, invalid weights/temperatures, malformed flags and missing local files
    before anything is loaded."""
    if args.method not in METHODS:
        raise UserInputError(f"--method '{args.method}' is unknown; choose one of {', '.join(METHODS)}.")
    check_ranges(dataclasses.asdict(args))  # the flags' rules (validation.RANGES), for callers that skip the parser
    try:
        parse_feature_pairs(args.feature_pairs)
        stage_pairs = args.stage_pairs == AUTO_STAGE_PAIRS or parse_feature_pairs(args.stage_pairs)
        parse_schedules(args.weight_schedules)
    except ValueError as error:
        raise UserInputError(f"{error}") from None
    for name in ("stage_weight", "exit_weight"):
        if getattr(args, name) > 0 and not stage_pairs:
            raise UserInputError(f"--{name} needs --stage_pairs ({AUTO_STAGE_PAIRS}, or named pairs such as "
                                 "stage1:stage1,stage2:stage2,stage3:stage3,stage4:stage4).")
    defaults = distillation_defaults()
    changed = [name for name in ("stage_pairs", "stage_weight", "exit_weight") if getattr(args, name) != defaults[name]]
    if changed and args.method != "c2vkd":  # at their defaults they are simply not read
        raise UserInputError(f"--{'/--'.join(changed)}: C2VKD's stage guidance and exits; --method {args.method} does "
                             "not use them.")
    if args.channel_weight != defaults["channel_weight"] and args.method != "c2vkd":  # at its default not read
        raise UserInputError(f"--channel_weight adds a channel-wise term to C2VKD; --method {args.method} does not "
                             "use it (--method cwd is channel-wise distillation on its own).")
    student_config_overrides(args)
    check_teacher_name("--teacher_name_or_path", args.teacher_name_or_path)
    check_local_path("--student_name_or_path", args.student_name_or_path)
    if args.text_embeddings and not Path(args.text_embeddings).is_file():
        raise UserInputError(f"--text_embeddings {args.text_embeddings} does not exist.")
    if args.teacher_cache and args.method == "none":
        raise UserInputError("--teacher_cache caches a teacher's outputs, but --method none uses no teacher.")
    if args.teacher_cache and Path(args.teacher_cache).exists() and not Path(args.teacher_cache).is_dir():
        raise UserInputError(f"--teacher_cache {args.teacher_cache} is a file; it must be a folder.")


def student_config_overrides(args: DistillationArguments) -> Optional[dict]:
    """``--student_config_overrides`` parsed (a JSON object), or ``None``."""
    if not args.student_config_overrides:
        return None
    try:
        overrides = json.loads(args.student_config_overrides)
    except ValueError as error:
        raise UserInputError(f"--student_config_overrides is not valid JSON ({error}).") from None
    if not isinstance(overrides, dict):
        raise UserInputError("--student_config_overrides must be a JSON object of config fields.")
    return overrides


def check_local_path(flag: str, name: Optional[str]) -> None:
    """A value that can only be a local path (absolute, ``./``, ``../``, ``~`` or more than one ``/``,
    unlike a Hub id ``org/name``) must exist."""
    if name and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        if not Path(name).expanduser().exists():
            raise UserInputError(f"{flag} {name} does not exist (it is a local path, not a Hub id).")


def check_teacher_name(flag: str, name: Optional[str]) -> None:
    """A teacher name: ``torchvision:ARCH[:CHECKPOINT]`` must name a known ARCH and, when given, an
    existing CHECKPOINT file; anything else goes through :func:`check_local_path`."""
    parsed = parse_torchvision_name(name) if name else None
    if parsed is None:
        check_local_path(flag, name)
        return
    arch, checkpoint = parsed
    if arch.strip() not in TORCHVISION_ARCHS:
        raise UserInputError(f"{flag} {name}: unknown torchvision segmentation architecture {arch!r}; use "
                             f"torchvision:ARCH[:CHECKPOINT] with ARCH one of {', '.join(TORCHVISION_ARCHS)}.")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise UserInputError(f"{flag} {name}: the checkpoint file {checkpoint} does not exist "
                             f"(torchvision:ARCH:CHECKPOINT takes a local .pth/.safetensors state-dict file).")


def check_class_agreement(id2label: dict[int, str], *, teacher: Optional[nn.Module] = None,
                          teacher_name: str = "teacher", text_embeddings: Optional[torch.Tensor] = None,
                          text_source: str = "text embeddings") -> None:
    """The dataset, the teacher and the text embeddings must agree on the number of classes."""
    num_labels = len(id2label)
    if teacher is not None:
        teacher_labels = int(teacher.config.num_labels)
        if teacher_labels != num_labels:
            raise UserInputError(
                f"The teacher {teacher_name} predicts {teacher_labels} classes but the dataset has {num_labels} "
                f"({', '.join(list(id2label.values())[:12])}). Use a teacher trained on this label set.")
        teacher_names = {int(k): v for k, v in (teacher.config.id2label or {}).items()}
        differing = [i for i in range(num_labels)
                     if teacher_names.get(i, "").lower() != str(id2label[i]).lower()
                     and not teacher_names.get(i, "").startswith("LABEL_")]
        if differing:
            logger.warning("Teacher and dataset name classes differently (e.g. %d: %r vs %r); assuming the "
                           "same order.", differing[0], teacher_names.get(differing[0]), id2label[differing[0]])
    if text_embeddings is not None and text_embeddings.shape[0] != num_labels:
        raise UserInputError(f"{text_source} has {text_embeddings.shape[0]} rows but the dataset has {num_labels} "
                             f"classes: one embedding per class name is needed, in label order.")


def student_head_note(name_or_path: str, id2label: dict[int, str], trust_remote_code: bool = False) -> Optional[str]:
    """A sentence saying that a pretrained student's classification layer is re-initialised for the
    dataset's classes (its checkpoint predicts another number of classes), else ``None``."""
    if name_or_path.lower() in SEGFORMER_SIZES and not os.path.isdir(name_or_path):
        return None  # a named size (segformer-b0): randomly initialised anyway
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if getattr(config, "num_labels", len(id2label)) == len(id2label):
        return None
    return (f"The student {name_or_path} predicts {config.num_labels} classes: its classification layer was "
            f"re-initialised for the dataset's {len(id2label)} classes; the other weights were kept.")
