#!/usr/bin/env python
"""Run the teacher once over the training set and store its outputs for ``distill.py --teacher_cache``.

    python scripts/cache_teacher.py config.json                       # distill.py's config file
    python scripts/cache_teacher.py --teacher_cache DIR <distill.py's flags>
    torchrun --nproc_per_node 2 scripts/cache_teacher.py config.json  # each process builds its share

Takes the same flags (or config file) as ``scripts/distill.py``: the teacher, the data, the resize,
the method, ``--feature_pairs`` and, with ``--stage_weight``, ``--stage_pairs`` decide what is stored (logits;
plus, for C2VKD, the teacher feature maps of the feature pairs and, with stage guidance, of the stage pairs, resolved
as ``distill.py`` resolves them; the stage exits read only the student's stages); training flags are ignored. ``--teacher_cache_top_k K`` stores only the K
largest logits per pixel. An interrupted build resumes where it stopped; a folder holding a cache for
another teacher, dataset or preprocessing is refused unless ``--overwrite``. Before the teacher runs, the
cache's size on disk is logged in one line, and a cache that would not fit in the free space of the folder's
file system is refused (exit code 2) with the options: another ``--teacher_cache``, ``--teacher_cache_top_k``,
or the teacher online. See ``c2vkd_hf/cache/`` for the format and the key.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser

from c2vkd_hf.cache import TeacherCache, TeacherCacheError, build_teacher_cache, cache_status
from c2vkd_hf.config import DataArguments, DistillationArguments
from c2vkd_hf.data import load_segmentation_data
from c2vkd_hf.models import image_mean_std, load_student, load_teacher
from c2vkd_hf.jobs import (UserInputError, config_file_arguments, check_class_agreement, run_script,
                           student_config_overrides, user_errors, validate_distillation_args)
from c2vkd_hf.jobs.setup import c2vkd_feature_pairs, keep_ratio, teacher_maps_read, teacher_reference_size
from c2vkd_hf.validation import check_output_dir, check_ranges, parse_script_arguments

logger = logging.getLogger("c2vkd_hf")


def parse_args(argv: list[str]):
    """``(DistillationArguments, DataArguments, extra)`` from flags or one distill.py config file
    (its training keys are ignored)."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--batch_size", type=int, default=8, help="Teacher forward batch size.")
    extra.add_argument("--overwrite", action="store_true", help="Replace a cache built for something else.")
    extra.add_argument("--device", default=None, help="Device for the teacher (default: cuda if available).")
    own, rest = extra.parse_known_args(argv)
    check_ranges(vars(own))
    parser = HfArgumentParser((DistillationArguments, DataArguments))
    config = config_file_arguments(rest)
    if config is None:
        known = {option for action in parser._actions for option in action.option_strings}
        unknown = _foreign_flags(rest, known)
        if unknown:
            logger.info("Ignoring flags that do not concern the cache: %s", " ".join(unknown))
            rest = [a for a in rest if a not in unknown]
    dist_args, data_args, _ = parse_script_arguments(parser, rest, {}, config=config, allow_extra_keys=True,
                                                     source=rest[0] if config is not None else None)
    return dist_args, data_args, own


def _foreign_flags(argv: list[str], known: set[str]) -> list[str]:
    """The flags of ``argv`` (with their values) that are not in ``known``: distill.py's training flags."""
    foreign, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=")[0] not in known
        if skipping:
            foreign.append(arg)
    return foreign


def teacher_feature_names(dist_args: DistillationArguments, teacher) -> list[str]:
    """The teacher feature maps the method reads, as ``distill.py`` resolves them for the same flags
    (:func:`~c2vkd_hf.jobs.setup.teacher_maps_read`: C2VKD's feature pairs and, with stage guidance, its stage
    pairs); none for the logit methods."""
    if dist_args.method != "c2vkd":
        return []
    student = load_student(dist_args.student_name_or_path, {i: str(i) for i in range(teacher.config.num_labels)},
                           config_overrides=student_config_overrides(dist_args))
    pairs, stage_pairs = c2vkd_feature_pairs(dist_args, student, teacher)
    return teacher_maps_read(pairs, stage_pairs, dist_args.stage_weight)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dist_args, data_args, own = parse_args(argv)
    validate_distillation_args(dist_args)
    if not dist_args.teacher_cache:
        raise UserInputError("--teacher_cache DIR is required: the folder to write the cache to.")
    if not dist_args.teacher_name_or_path:
        raise UserInputError("--teacher_name_or_path is required (the teacher whose outputs are cached).")
    check_output_dir(dist_args.teacher_cache, "--teacher_cache")
    import torch
    from accelerate import PartialState

    state = PartialState()  # sets up torch.distributed under torchrun / accelerate launch
    device = own.device or str(state.device)
    data = load_segmentation_data(data_args)
    with user_errors(f"--teacher_name_or_path {dist_args.teacher_name_or_path}"):
        teacher = load_teacher(dist_args.teacher_name_or_path, trust_remote_code=dist_args.trust_remote_code)
    check_class_agreement(data.id2label, teacher=teacher, teacher_name=dist_args.teacher_name_or_path)
    names = teacher_feature_names(dist_args, teacher)
    reference = teacher_reference_size(dist_args, data_args)
    directory = Path(dist_args.teacher_cache).expanduser()
    try:
        before = cache_status(directory)
        with torch.no_grad():
            key = build_teacher_cache(directory, teacher.to(device), data.train, reference_size=reference,
                                      keep_ratio=keep_ratio(data_args),
                                      teacher_mean_std=image_mean_std(teacher), feature_names=names,
                                      top_k=dist_args.teacher_cache_top_k, batch_size=own.batch_size,
                                      overwrite=own.overwrite)
        cache = TeacherCache(directory, expected_key=key)
    except TeacherCacheError as error:
        raise UserInputError(f"--teacher_cache: {error}") from None
    summary = {"teacher_cache": str(directory), "rows": len(cache), "features": cache.feature_names,
               "reference_size": list(cache.reference_size), "top_k": dist_args.teacher_cache_top_k,
               "resumed_from_rows": before.done if before.exists else 0,
               "size_mb": round(sum(p.stat().st_size for p in directory.iterdir()) / 2**20, 1)}
    if state.is_main_process:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(run_script(main))
