"""``c2vkd-evaluate``: evaluate a saved segmentation model (a distilled student or a teacher) on a
dataset's validation split.

    c2vkd-evaluate --model_name_or_path outputs/c2vkd-default
    c2vkd-evaluate --model_name_or_path runs/camvid-c2vkd --validation_images D/val \
        --validation_labels D/valannot --train_images D/train --train_labels D/trainannot \
        --labels_file D/classes.json --resize_height 180 --resize_width 240

Without data flags, the data configuration saved in the model folder's ``results.json`` (written by
``scripts/distill.py``) is used, so the command reproduces the model card's mIoU. Prints mIoU,
pixel accuracy and per-class IoU, and writes them to ``--output_file`` when given.

Large images and test-time augmentation (``c2vkd_hf.inference.segmentation_scores``):

* ``--window_height 180 --window_width 240 [--stride_height 120 --stride_width 160]``: sliding-window
  inference (overlapping crops of the training size, logits averaged where they overlap), e.g. on
  full-resolution images (no ``--resize_*``, ``--batch_size 1`` when image sizes differ);
* ``--scales 0.75,1.0,1.25 --flip``: multi-scale + horizontal-flip averaging of the softmax.

``--output_dir DIR`` writes ``metrics.json``, an mIoU table ``miou.md`` and colourised predictions
(``predictions/<index>.png``, the first ``--num_predictions``). Distributed (each process evaluates a
share of the images; confusion matrices are summed): ``torchrun --nproc_per_node 2 scripts/evaluate.py ...``
(on CPU: gloo) or ``accelerate launch --num_processes N scripts/evaluate.py ...`` on GPUs.
``--model_name_or_path`` also takes ``torchvision:ARCH:CHECKPOINT`` teachers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser

from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import build_transform, default_palette, load_segmentation_data
from c2vkd_hf.models import image_mean_std, load_teacher
from c2vkd_hf.inference import evaluate_model
from c2vkd_hf.jobs import UserInputError, run_script, saved_data_arguments, user_errors
from c2vkd_hf.validation import check_input_sizes, check_output_dir, parse_script_arguments


@dataclass
class EvaluationArguments:
    model_name_or_path: str = field(metadata={"help": "Folder or Hub id of an AutoModelForSemanticSegmentation, "
                                              "or torchvision:ARCH:CHECKPOINT."})
    batch_size: int = field(default=8, metadata={"help": "Evaluation batch size (images per forward; sliding "
                                                 "windows are batched up to this many crops)."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write the metrics here as JSON."})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Write metrics.json, the mIoU table miou.md and colourised predictions/ here."})
    num_predictions: int = field(default=8, metadata={
        "help": "With --output_dir: how many colourised predictions to save (-1: all)."})
    scales: str = field(default="1.0", metadata={"help": "Comma-separated test scales, e.g. 0.75,1.0,1.25."})
    flip: bool = field(default=False, metadata={"help": "Average with the horizontally flipped image."})
    window_height: Optional[int] = field(default=None, metadata={"help": "Sliding-window height (with --window_width)."})
    window_width: Optional[int] = field(default=None, metadata={"help": "Sliding-window width."})
    stride_height: Optional[int] = field(default=None, metadata={"help": "Sliding-window vertical stride "
                                                                 "(default 2/3 of the window)."})
    stride_width: Optional[int] = field(default=None, metadata={"help": "Sliding-window horizontal stride."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code."})


def _inference_options(args: EvaluationArguments) -> dict:
    try:
        scales = tuple(float(v) for v in args.scales.split(",") if v.strip())
    except ValueError:
        raise UserInputError(f"--scales must be comma-separated numbers, got {args.scales!r}.") from None
    if not scales or any(s <= 0 for s in scales):
        raise UserInputError(f"--scales must be positive numbers, got {args.scales!r}.")
    window = stride = None
    if (args.window_height is None) != (args.window_width is None):
        raise UserInputError("--window_height and --window_width must be given together.")
    if args.window_height is not None:
        window = (args.window_height, args.window_width)
        if min(window) < 1:
            raise UserInputError(f"the sliding window must be positive, got {window}.")
        if (args.stride_height is None) != (args.stride_width is None):
            raise UserInputError("--stride_height and --stride_width must be given together.")
        if args.stride_height is not None:
            stride = (args.stride_height, args.stride_width)
            if min(stride) < 1:
                raise UserInputError(f"the sliding-window stride must be positive, got {stride}.")
    elif args.stride_height is not None or args.stride_width is not None:
        raise UserInputError("--stride_height/--stride_width need --window_height/--window_width.")
    return {"scales": scales, "flip": args.flip, "window": window, "stride": stride}


def _miou_table(result: dict, model_name: str, dataset: str, options: dict) -> str:
    mode = []
    if options["window"]:
        mode.append(f"sliding window {options['window'][0]}x{options['window'][1]}"
                    + (f", stride {options['stride'][0]}x{options['stride'][1]}" if options["stride"] else ""))
    if options["scales"] != (1.0,):
        mode.append("scales " + ", ".join(f"{s:g}" for s in options["scales"]))
    if options["flip"]:
        mode.append("flip")
    lines = [f"# {model_name} on {dataset} validation", "",
             f"Inference: {'; '.join(mode) or 'single scale, whole image'}. {result['num_images']} images, "
             f"{result['seconds']:.1f} s.", "",
             "| class | IoU (%) |", "|---|---:|"]
    lines += [f"| {name} | {iou * 100:.2f} |" for name, iou in result["per_category_iou"].items()]
    lines += [f"| **mIoU** | **{result['mean_iou'] * 100:.2f}** |",
              f"| pixel accuracy | {result['overall_accuracy'] * 100:.2f} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator

    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((EvaluationArguments, DataArguments))
    eval_args, data_args, _ = parse_script_arguments(parser, argv, {})
    options = _inference_options(eval_args)
    if eval_args.output_dir:
        check_output_dir(eval_args.output_dir)
    # on a CPU-only machine, cpu=True lets accelerate run several processes (gloo) under torchrun
    on_device = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(cpu=not on_device)
    say = accelerator.print
    data_args = saved_data_arguments(eval_args.model_name_or_path, argv, data_args, say=say)
    with user_errors(f"--model_name_or_path {eval_args.model_name_or_path}"):
        model = load_teacher(eval_args.model_name_or_path, trust_remote_code=eval_args.trust_remote_code)
    data = load_segmentation_data(data_args)
    if not options["window"]:  # sliding windows take any image size, one image at a time per batch row
        check_input_sizes(data, data_args, None, eval_args.batch_size)
    if model.config.num_labels != len(data.id2label):
        raise UserInputError(f"The model predicts {model.config.num_labels} classes but the dataset has "
                             f"{len(data.id2label)}.")
    mean, std = image_mean_std(model)
    validation = data.validation.with_transform(build_transform(data_args, mean, std, train=False))
    output_dir = Path(eval_args.output_dir) if eval_args.output_dir else None
    predictions_dir = str(output_dir / "predictions") if output_dir and eval_args.num_predictions != 0 else None
    start = time.time()
    with torch.inference_mode():
        metrics = evaluate_model(
            model, validation, len(data.id2label), batch_size=eval_args.batch_size, accelerator=accelerator,
            predictions_dir=predictions_dir, palette=data.palette or default_palette(len(data.id2label)),
            max_predictions=None if eval_args.num_predictions < 0 else eval_args.num_predictions, **options)
    seconds = time.time() - start
    per_class = {data.id2label[i]: v for i, v in enumerate(metrics["per_category_iou"])}
    say(f"{eval_args.model_name_or_path} on {data.name} validation ({len(validation)} images, {seconds:.1f} s): "
        f"mIoU {metrics['mean_iou'] * 100:.2f}%, pixel accuracy {metrics['overall_accuracy'] * 100:.2f}%")
    for name, iou in per_class.items():
        say(f"  {name:>20s}  {iou * 100:6.2f}")
    result = {"mean_iou": metrics["mean_iou"], "overall_accuracy": metrics["overall_accuracy"],
              "per_category_iou": per_class, "num_images": len(validation), "seconds": seconds,
              "inference": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
              "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        if eval_args.output_file:
            Path(eval_args.output_file).write_text(json.dumps(result, indent=2))
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
            (output_dir / "miou.md").write_text(_miou_table(result, eval_args.model_name_or_path, data.name, options))
    return result


def run(argv: list[str] | None = None) -> int:
    """The ``c2vkd-evaluate`` command: :func:`main`, with one-line errors and exit codes
    (:func:`~c2vkd_hf.jobs.run_script`)."""
    return run_script(main, argv, user_errors=(OSError,))  # OSError: unreadable model folder or image


if __name__ == "__main__":
    sys.exit(run())
