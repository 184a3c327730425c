#!/usr/bin/env python
"""Evaluate a saved segmentation model (a distilled student or a teacher) on a dataset's validation split.

    python scripts/evaluate.py --model_name_or_path outputs/c2vkd-default
    python scripts/evaluate.py --model_name_or_path runs/camvid-c2vkd --validation_images D/val \
        --validation_labels D/valannot --train_images D/train --train_labels D/trainannot \
        --labels_file D/classes.json --resize_height 180 --resize_width 240

Without data flags, the data configuration saved in the model folder's ``results.json`` (written by
``scripts/distill.py``) is used, so the command reproduces the model card's mIoU. Prints mIoU,
pixel accuracy and per-class IoU, and writes them to ``--output_file`` when given.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForSemanticSegmentation, HfArgumentParser

from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import DataValidationError, build_transform, load_segmentation_data
from c2vkd_hf.models import image_mean_std
from c2vkd_hf.pipeline import RESULTS_NAME, UserInputError, evaluate_model


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(metadata={"help": "Folder or Hub id of an AutoModelForSemanticSegmentation."})
    batch_size: int = field(default=8, metadata={"help": "Evaluation batch size."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write the metrics here as JSON."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code."})


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((EvaluationArguments, DataArguments))
    eval_args, data_args = parser.parse_args_into_dataclasses(args=argv)
    saved = Path(eval_args.model_name_or_path) / RESULTS_NAME
    data_flags_given = any(arg.startswith("--") and arg[2:].split("=")[0] in {f.name for f in dataclasses.fields(
        DataArguments)} for arg in argv)
    if saved.is_file() and not data_flags_given:
        data_args = DataArguments(**json.loads(saved.read_text())["config"]["data"])
        print(f"Using the data configuration saved in {saved}.")
    model = AutoModelForSemanticSegmentation.from_pretrained(eval_args.model_name_or_path,
                                                             trust_remote_code=eval_args.trust_remote_code)
    data = load_segmentation_data(data_args)
    if model.config.num_labels != len(data.id2label):
        raise UserInputError(f"The model predicts {model.config.num_labels} classes but the dataset has "
                             f"{len(data.id2label)}.")
    mean, std = image_mean_std(model)
    validation = data.validation.with_transform(build_transform(data_args, mean, std, train=False))
    with torch.inference_mode():
        metrics = evaluate_model(model, validation, len(data.id2label), batch_size=eval_args.batch_size)
    per_class = {data.id2label[i]: v for i, v in enumerate(metrics["per_category_iou"])}
    print(f"{eval_args.model_name_or_path} on {data.name} validation ({len(validation)} images): "
          f"mIoU {metrics['mean_iou'] * 100:.2f}%, pixel accuracy {metrics['overall_accuracy'] * 100:.2f}%")
    for name, iou in per_class.items():
        print(f"  {name:>20s}  {iou * 100:6.2f}")
    result = {"mean_iou": metrics["mean_iou"], "overall_accuracy": metrics["overall_accuracy"],
              "per_category_iou": per_class, "num_images": len(validation)}
    if eval_args.output_file:
        Path(eval_args.output_file).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        main()
    except (UserInputError, DataValidationError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
