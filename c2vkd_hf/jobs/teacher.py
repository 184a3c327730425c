"""The teacher job: fine-tune a CNN teacher (UperNet or DeepLabV3+ on timm), and the default job's own teacher."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn
from transformers import TrainingArguments, set_seed

from ..config import IGNORE_INDEX, DataArguments, DistillationArguments
from ..data import SegmentationData, collate_fn
from ..metrics import make_compute_metrics
from ..models import build_teacher, image_mean_std, student_image_processor
from ..runs import run_config
from ..trainer import TeacherTrainer
from ..validation import UserInputError, check_input_sizes, save_errors
from .common import (TEACHER_RESULTS_NAME, datasets_for, prepare_training_args, previous_run, processor_size,
                     train_evaluate_save, write_json)
from .errors import user_errors

logger = logging.getLogger(__name__)


def train_teacher(data: SegmentationData, data_args: DataArguments, training_args: TrainingArguments, *,
                  arch: str = "upernet", backbone: str = "tf_efficientnet_lite0",
                  backbone_weights: Optional[str] = None, head_lr_multiplier: float = 5.0,
                  retrain: bool = False, phase: str = "teacher", wait_for_lock: bool = False) -> dict[str, Any]:
    """Fine-tunes a CNN teacher with :class:`~c2vkd_hf.trainer.TeacherTrainer` (``transformers.Trainer``
    with kill-safe checkpoints and the NaN/inf loss check) and saves an
    ``AutoModelForSemanticSegmentation`` folder in ``training_args.output_dir`` with
    ``teacher_results.json`` (validation mIoU, schedule, wall time). Resumes from the last checkpoint
    there; a finished run of the same configuration is not trained again (its results are returned;
    ``retrain``: trained from scratch). The backbone gets ``learning_rate``, the decoder
    ``head_lr_multiplier`` times it. ``phase`` names the progress bar and the console lines."""
    start = time.time()
    output_dir = Path(training_args.output_dir)
    prepare_training_args(training_args)
    config = run_config({"teacher": {"arch": arch, "backbone": backbone, "backbone_weights": backbone_weights,
                                     "head_lr_multiplier": head_lr_multiplier},
                         "data": dataclasses.asdict(data_args), "training": training_args.to_dict()})
    finished = previous_run(output_dir, config, training_args, results_name=TEACHER_RESULTS_NAME, retrain=retrain,
                            wait_for_lock=wait_for_lock)
    if finished is not None:
        return finished
    check_input_sizes(data, data_args, training_args.per_device_train_batch_size,
                      training_args.per_device_eval_batch_size)
    if not timm.is_model(backbone):
        raise UserInputError(f"--backbone {backbone} is not a timm model name (e.g. tf_efficientnet_lite0, resnet50).")
    if backbone_weights is not None and not os.path.isfile(backbone_weights):
        raise UserInputError(f"--backbone_weights {backbone_weights} does not exist.")
    set_seed(training_args.seed)
    with user_errors(f"--arch {arch} --backbone {backbone}"):
        model = build_teacher(arch=arch, backbone=backbone, id2label=data.id2label, backbone_weights=backbone_weights)
    check_pyramid_backbone(model, backbone)
    mean, std = image_mean_std(model)
    train, validation, callbacks = datasets_for(data, data_args, mean, std, seed=training_args.seed)
    backbone_params = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": training_args.learning_rate},
         {"params": head_params, "lr": training_args.learning_rate * head_lr_multiplier}],
        weight_decay=training_args.weight_decay)
    trainer = TeacherTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=validation, data_collator=collate_fn,
        compute_metrics=make_compute_metrics(len(data.id2label), IGNORE_INDEX, data.id2label),
        processing_class=student_image_processor(model, size=processor_size(data_args, data)),
        optimizers=(optimizer, None), callbacks=callbacks, phase=phase)
    metrics = train_evaluate_save(trainer, training_args, output_dir, config)
    results = {
        "val_mean_iou": metrics["eval_mean_iou"],
        "metrics": metrics,
        "arch": arch, "backbone": backbone, "backbone_weights": backbone_weights,
        "steps": trainer.state.global_step,
        "wall_time_s": time.time() - start,
        "data": dataclasses.asdict(data_args),
        "training": {"learning_rate": training_args.learning_rate, "batch_size":
                     training_args.per_device_train_batch_size, "max_steps": training_args.max_steps},
        "run_config": config,
    }
    if trainer.is_world_process_zero():
        with save_errors(output_dir / TEACHER_RESULTS_NAME):
            write_json(output_dir / TEACHER_RESULTS_NAME, results)
    return results


def check_pyramid_backbone(model: nn.Module, backbone: str) -> None:
    """The teacher builder's decoders (UperNet, DeepLabV3+) need a CNN-like feature pyramid (strides
    increasing, e.g. 4, 8, 16, 32); a plain ViT's features all have one stride and a fixed input size."""
    inner = getattr(getattr(model, "backbone", None), "_backbone", None)
    info = getattr(inner, "feature_info", None)
    strides = list(info.reduction()) if info is not None else []
    if strides and any(later <= earlier for earlier, later in zip(strides, strides[1:])):
        raise UserInputError(f"--backbone {backbone} is not a CNN backbone: its feature maps have strides {strides}, "
                             f"the teacher's decoder needs a pyramid (e.g. 4, 8, 16, 32). Use a CNN such as "
                             f"tf_efficientnet_lite0, resnet50 or convnext_tiny.")


#: The offline default job: small enough for a 2-core CPU in well under 10 minutes.
DEFAULT_TEACHER_LR = 2e-3


def default_teacher_folder(dist_args: DistillationArguments, training_args: TrainingArguments) -> Path:
    """Where the offline default job keeps its small CNN teacher: ``--teacher_cache_dir``, else
    ``<output_dir>/teacher``."""
    return Path(dist_args.teacher_cache_dir or Path(training_args.output_dir) / "teacher")


def needs_default_teacher(dist_args: DistillationArguments, data_args: DataArguments) -> bool:
    """Whether the run trains the default job's own teacher (a method with a teacher, none given,
    the built-in synthetic dataset)."""
    return (dist_args.method != "none" and dist_args.teacher_name_or_path is None
            and data_args.dataset_name == "synthetic" and data_args.train_images is None)


def default_teacher(data: SegmentationData, data_args: DataArguments, training_args: TrainingArguments,
                    folder: Path, steps: int, say=logger.warning) -> str:
    """Trains (once; reused afterwards) the small CNN teacher of the offline default job. ``say``: how
    the training is announced (a warning, unless the caller announced the phase)."""
    if (folder / TEACHER_RESULTS_NAME).is_file():
        logger.info("Reusing the default teacher in %s", folder)
        return str(folder)
    say("No --teacher_name_or_path: training a small CNN teacher first, %d steps, in %s (cached for later runs).",
        steps, folder)
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, learning_rate=DEFAULT_TEACHER_LR,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        lr_scheduler_type="polynomial", warmup_steps=10, weight_decay=1e-4, logging_steps=25,
        eval_strategy="no", save_strategy="no", report_to="none", seed=training_args.seed,
        dataloader_num_workers=training_args.dataloader_num_workers, use_cpu=training_args.use_cpu,
        disable_tqdm=training_args.disable_tqdm)
    from ..models import efficientnet_lite0_weights_path

    train_teacher(data, data_args, args, backbone_weights=efficientnet_lite0_weights_path())
    return str(folder)


def default_job_teacher(dist_args: DistillationArguments, data_args: DataArguments,
                        training_args: TrainingArguments, data: SegmentationData) -> Optional[str]:
    """The offline default job's teacher folder, trained first when missing (the job trains it before the
    no-teacher baseline, so that the console tells the phases in order); ``None`` when the run has no
    such teacher (:func:`needs_default_teacher`)."""
    if not needs_default_teacher(dist_args, data_args):
        return None
    return default_teacher(data, data_args, training_args, default_teacher_folder(dist_args, training_args),
                           dist_args.default_teacher_steps, say=logger.debug)
