"""The distillation job: what identifies a run, training it (built by :mod:`.setup`), its results, the teacher's
mIoU beside it and the student's model card."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from transformers import TrainingArguments

from ..config import DataArguments, DistillationArguments, distillation_defaults
from ..data import SegmentationData, build_transform, default_palette
from ..inference import evaluate_model
from ..metrics import logits_to_predictions
from ..models import image_mean_std
from ..runs import run_config
from ..trainer import DistillationTrainer
from ..validation import save_errors
from .common import (RESULTS_NAME, datasets_for, peak_rss_mb, prepare_training_args, previous_run,
                     train_evaluate_save, write_json)
from .setup import setup_distillation


#: Flags only C2VKD reads: they do not identify a run of another method, so a change of their defaults
#: (e.g. ``class_balance``) neither refuses nor re-trains a ``kd``/``dist``/``none`` run.
C2VKD_ONLY_FIELDS = frozenset({
    "pdd_weight", "glob_weight", "rel_weight", "ling_weight", "pdd_alpha", "pdd_beta", "pdd_temperature",
    "label_weight", "glob_tau", "rel_grid", "class_balance", "class_balance_power", "feature_pairs", "stage_pairs",
    "stage_weight", "exit_weight", "channel_weight", "channel_tau"})
#: Loss terms only C2VKD has: their ``--weight_schedules`` entries do not identify a run of another method either.
C2VKD_ONLY_TERMS = frozenset({"pdd", "glob", "rel", "ling", "stage", "exit", "channel"})


def teacher_free_arguments(dist_args: DistillationArguments) -> DistillationArguments:
    """The same run without a teacher (the default job's no-teacher baseline): ``--method none``, no teacher
    cache, and every flag only C2VKD reads (:data:`C2VKD_ONLY_FIELDS`) at its default, so no flag that needs a
    teacher (stage guidance, the channel-wise term) reaches it; the student, data and schedule stay."""
    defaults = {name: value for name, value in distillation_defaults().items() if name in C2VKD_ONLY_FIELDS}
    return dataclasses.replace(dist_args, method="none", teacher_cache=None, **defaults)


def distillation_run_config(dist_args: DistillationArguments, data_args: DataArguments,
                            training_args: TrainingArguments) -> dict:
    """The configuration identifying a distillation run (:func:`c2vkd_hf.runs.run_config`), without the
    flags its method does not read (:data:`C2VKD_ONLY_FIELDS`, and the schedules of :data:`C2VKD_ONLY_TERMS`; a
    saved configuration that has them still matches, since fields only one side knows are not compared)."""
    prepare_training_args(training_args)
    distillation = dataclasses.asdict(dist_args)
    if dist_args.method != "c2vkd":
        distillation = {k: v for k, v in distillation.items() if k not in C2VKD_ONLY_FIELDS}
        # nor do the schedules of C2VKD's terms: the method's own schedules are kept under another name, so a run
        # saved under another default of --weight_schedules (before "exit:linear:0.5" was added) still matches
        distillation["own_weight_schedules"] = ",".join(
            entry.strip() for entry in (distillation.pop("weight_schedules") or "").split(",")
            if entry.strip() and entry.split(":")[0].strip() not in C2VKD_ONLY_TERMS)
    return run_config({"distillation": distillation, "data": dataclasses.asdict(data_args),
                       "training": training_args.to_dict()})


def previous_distillation(dist_args: DistillationArguments, data_args: DataArguments,
                          training_args: TrainingArguments) -> Optional[dict]:
    """The saved results of a finished distillation of this configuration in ``--output_dir``, or
    ``None`` to train (see :func:`previous_run`; ``--retrain`` deletes a previous run first)."""
    return previous_run(Path(training_args.output_dir), distillation_run_config(dist_args, data_args, training_args),
                        training_args, results_name=RESULTS_NAME, retrain=dist_args.retrain,
                        wait_for_lock=dist_args.wait_for_lock)


def run_distillation(dist_args: DistillationArguments, data_args: DataArguments,
                     training_args: TrainingArguments, *, data: Optional[SegmentationData] = None,
                     write_card: bool = True, baseline_miou: Optional[float] = None,
                     baseline_history: Optional[list[dict]] = None, phase: str = "student") -> dict[str, Any]:
    """Distils ``dist_args.teacher_name_or_path`` into ``dist_args.student_name_or_path`` and saves the
    plain student, its image processor, ``results.json`` and (``write_card``) the model card with its
    images in ``training_args.output_dir``. Resumes from the last checkpoint there; a finished run of
    the same configuration there is not trained again: its saved results are returned. ``baseline_history``:
    the no-teacher baseline's ``eval_history`` (plotted beside the student's); ``phase`` names the
    progress bar and console lines."""
    start = time.time()
    finished = previous_distillation(dist_args, data_args, training_args)
    if finished is not None:
        return finished
    config = distillation_run_config(dist_args, data_args, training_args)
    setup = setup_distillation(dist_args, data_args, training_args, data=data, phase=phase)
    trainer, data, loss_module, teacher = setup.trainer, setup.data, setup.loss_module, setup.teacher
    teacher_name, notes = setup.teacher_name, setup.notes
    id2label = data.id2label
    output_dir = Path(training_args.output_dir)
    metrics = train_evaluate_save(trainer, training_args, output_dir, config)

    results: dict[str, Any] = {
        "method": dist_args.method,
        "seed": training_args.seed,
        "val_mean_iou": metrics["eval_mean_iou"],
        "overall_accuracy": metrics.get("eval_overall_accuracy"),
        "per_category_iou": [metrics.get(f"eval_iou_{id2label[i]}") for i in range(len(id2label))],
        "steps": trainer.state.global_step,
        "wall_time_s": time.time() - start,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),  # what the wall time was measured with
        "teacher": teacher_name,
        "student": dist_args.student_name_or_path,
        "dataset": data.name,
        **evaluation_size(data),
        "linguistic_term": "ling" in getattr(loss_module, "weights", {}),
        "text_head": trainer.model.text_head is not None,
        "text_embeddings_source": setup.text_source,
        "evaluated_on": (f"selection split (training images matching {data_args.selection_holdout!r})"
                         if data_args.selection_holdout else "validation"),
        "notes": notes,
        "eval_history": [{"step": e["step"], "val_mean_iou": e["eval_mean_iou"]}
                         for e in trainer.state.log_history if "eval_mean_iou" in e],
        "loss_history": [{k: v for k, v in e.items() if k == "step" or k.startswith("loss")}
                         for e in trainer.state.log_history if "loss" in e],
        "loss_weights": dict(getattr(loss_module, "weights", {})),
        "config": {"distillation": dataclasses.asdict(dist_args), "data": dataclasses.asdict(data_args),
                   "training": {k: v for k, v in training_args.to_dict().items() if "token" not in k}},
        "run_config": config,
    }
    if trainer.is_world_process_zero():
        if write_card:
            teacher_miou = None
            if teacher is not None:
                teacher_miou = teacher_val_miou(teacher, teacher_name, data, data_args, training_args)
                results["teacher_val_mean_iou"] = teacher_miou
            results["baseline_val_mean_iou"] = baseline_miou
            with save_errors(output_dir / "README.md"):
                write_student_card(output_dir, trainer, results, data, data_args, teacher_miou=teacher_miou,
                                   baseline_miou=baseline_miou, teacher=teacher, baseline_history=baseline_history)
        with save_errors(output_dir / RESULTS_NAME):  # written last: it marks the run finished
            write_json(output_dir / RESULTS_NAME, results)
    return results


def teacher_val_miou(teacher: nn.Module, teacher_name: str, data: SegmentationData, data_args: DataArguments,
                     training_args: TrainingArguments) -> float:
    """The teacher's validation mIoU under the same evaluation protocol (cached in ``teacher_results.json``
    beside a local teacher when it was made by ``train_teacher``; measured on the same images when the
    student is evaluated on a subset of the split)."""
    saved = Path(teacher_name) / "teacher_results.json"
    if saved.is_file() and not is_eval_subset(data):
        return float(json.loads(saved.read_text())["val_mean_iou"])
    mean, std = image_mean_std(teacher)
    _, validation, _ = datasets_for(data, data_args, mean, std)
    return float(evaluate_model(teacher, validation, len(data.id2label),
                                batch_size=training_args.per_device_eval_batch_size)["mean_iou"])


def evaluation_size(data: SegmentationData) -> dict[str, int]:
    """``eval_images`` (validation images evaluated) and ``eval_images_total`` (the split's size)."""
    evaluated = len(data.validation)
    return {"eval_images": evaluated, "eval_images_total": max(evaluated, data.validation_total or evaluated)}


def is_eval_subset(data: SegmentationData) -> bool:
    """Whether only part of the validation split is evaluated (``--max_eval_samples``)."""
    size = evaluation_size(data)
    return size["eval_images"] < size["eval_images_total"]


def write_student_card(output_dir: Path, trainer: DistillationTrainer, results: dict[str, Any],
                       data: SegmentationData, data_args: DataArguments, *, teacher_miou: Optional[float],
                       baseline_miou: Optional[float] = None, num_images: int = 3,
                       teacher: Optional[nn.Module] = None, baseline_history: Optional[list[dict]] = None) -> Path:
    """Writes README.md (model card), ``predictions.png`` and ``training_curves.png`` into ``output_dir``.
    ``teacher``: the teacher model, which the card describes unless it has a Hub id. ``baseline_history``:
    the no-teacher baseline's ``eval_history``, plotted beside the student's (default: the one in
    ``<output_dir>/baseline/results.json`` when the default job wrote it). ``num_images`` frames spread
    across the validation split are shown."""
    from ..model_card import (CURVES_NAME, OVERLAY_NAME, build_model_card, plot_training_curves,
                              save_prediction_overlay, spread_indices, teacher_description)

    student = trainer.accelerator.unwrap_model(trainer.model).student.eval()
    mean, std = image_mean_std(student)
    transform = build_transform(data_args, mean, std, train=False)
    images, labels, preds = [], [], []
    frames = spread_indices(len(data.validation), num_images)  # across the split: neighbours look alike
    count = len(frames)
    for index in frames:
        raw = data.validation[index]
        example = transform({"image": [raw["image"]], "label": [raw["label"]]})
        pixel_values = example["pixel_values"][0][None].to(next(student.parameters()).device)
        label = np.asarray(example["labels"][0])
        with torch.no_grad():
            logits = student(pixel_values=pixel_values).logits
        preds.append(logits_to_predictions(logits, label.shape)[0].cpu().numpy())
        labels.append(label)
        images.append(np.asarray(raw["image"].convert("RGB").resize(label.shape[::-1])))
    palette = data.palette or default_palette(len(data.id2label))
    class_names = [str(data.id2label[i]) for i in range(len(data.id2label))]
    overlay = save_prediction_overlay(images, labels, preds, palette, output_dir / OVERLAY_NAME,
                                      class_names=class_names, frame_indices=frames) if count else None
    if baseline_history is None and (output_dir / "baseline" / RESULTS_NAME).is_file():  # the default job's baseline
        with contextlib.suppress(ValueError, KeyError, OSError):
            baseline_history = json.loads((output_dir / "baseline" / RESULTS_NAME).read_text())["eval_history"]
    curves = plot_training_curves(trainer.state.log_history, output_dir / CURVES_NAME,
                                  baseline_history=baseline_history, baseline_miou=baseline_miou,
                                  teacher_miou=teacher_miou)
    metrics = {"mean_iou": results["val_mean_iou"], "overall_accuracy": results.get("overall_accuracy") or float("nan"),
               "per_category_iou": [float("nan") if v is None else v for v in results["per_category_iou"]]}
    args = trainer.args
    teacher_name = results.get("teacher")
    if teacher is not None and teacher_name:
        teacher_name = teacher_description(teacher, teacher_name, teacher_miou)
    card = build_model_card(
        repo_id=args.hub_model_id or str(output_dir), metrics=metrics, id2label=data.id2label,
        dataset_name=data.name, dataset_split="validation", method=results["method"],
        teacher_name=teacher_name, teacher_miou=teacher_miou, baseline_miou=baseline_miou,
        loss_weights=results.get("loss_weights"),
        schedule={"steps": results["steps"], "per_device_batch_size": args.per_device_train_batch_size,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "learning_rate": args.learning_rate,
                  "scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
                  "seed": args.seed},
        notes=results.get("notes", []), student_type=type(student).__name__.replace("ForSemanticSegmentation", ""),
        overlay_image=OVERLAY_NAME if overlay else None, curves_image=CURVES_NAME if curves else None,
        eval_images=results.get("eval_images"), eval_images_total=results.get("eval_images_total"),
        text_source=results.get("text_embeddings_source"))
    card.save(str(output_dir / "README.md"))
    return output_dir / "README.md"
