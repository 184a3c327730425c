"""The jobs behind the scripts, top to bottom: train a teacher, distil a student, evaluate a model.

``scripts/train_teacher.py``, ``scripts/distill.py``, ``scripts/evaluate.py`` and
``scripts/benchmark.py`` are thin wrappers around these functions, so that the offline default job
(which trains its own teacher first, then the student, then a no-teacher baseline) and the
benchmark share one code path with what users run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .config import IGNORE_INDEX, METHODS, DataArguments, DistillationArguments
from .data import SegmentationData, build_transform, collate_fn, default_palette, load_segmentation_data
from .losses import get_loss
from .metrics import StreamingMeanIoU, make_compute_metrics
from .models import (
    build_teacher,
    default_feature_pair,
    feature_channels,
    image_mean_std,
    load_student,
    load_teacher,
    student_image_processor,
)
from .text import get_text_embeddings
from .trainer import DistillationModel, DistillationTrainer, parse_feature_pairs

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"


class UserInputError(ValueError):
    """A problem with the user's flags, files or data: reported as one message, no traceback."""


# ------------------------------------------------------------------------------------------ checks
def validate_distillation_args(args: DistillationArguments) -> None:
    """Rejects unknown methods and invalid weights/temperatures before anything is loaded."""
    if args.method not in METHODS:
        raise UserInputError(f"--method '{args.method}' is unknown; choose one of {', '.join(METHODS)}.")
    for name in ("ce_weight", "pdd_weight", "glob_weight", "rel_weight", "ling_weight", "kd_weight",
                 "pdd_alpha", "pdd_beta"):
        value = getattr(args, name)
        if value is not None and (not np.isfinite(value) or value < 0):
            raise UserInputError(f"--{name} must be a finite number >= 0, got {value}.")
    for name in ("pdd_temperature", "glob_tau", "ling_tau", "kd_temperature"):
        value = getattr(args, name)
        if value is not None and (not np.isfinite(value) or value <= 0):
            raise UserInputError(f"--{name} must be a finite number > 0, got {value}.")
    if not 0.0 <= args.label_weight <= 1.0:
        raise UserInputError(f"--label_weight must be in [0, 1], got {args.label_weight}.")
    if args.rel_grid < 1:
        raise UserInputError(f"--rel_grid must be >= 1, got {args.rel_grid}.")


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


@contextlib.contextmanager
def user_errors(what: str):
    """Turns the loaders' ValueError/OSError about the user's input into one :class:`UserInputError`."""
    try:
        yield
    except (ValueError, OSError) as error:
        message = str(error)
        raise UserInputError(message if what.split()[0] in message else f"{what}: {message}") from None


# ------------------------------------------------------------------------------------------ helpers
def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _datasets_for(data: SegmentationData, data_args: DataArguments, mean, std):
    train = data.train.with_transform(build_transform(data_args, mean, std, train=True))
    validation = data.validation.with_transform(build_transform(data_args, mean, std, train=False))
    return train, validation


def prepare_training_args(training_args: TrainingArguments) -> TrainingArguments:
    """Forces what segmentation training with our data pipeline needs."""
    training_args.remove_unused_columns = False  # the transforms need the raw image/label columns
    training_args.batch_eval_metrics = True  # stream the confusion matrix; keep no predictions
    training_args.label_names = ["labels"]
    steps = training_args.max_steps
    if steps and steps > 0 and training_args.warmup_steps >= max(steps, 1):
        # a warm-up as long as the run leaves the polynomial schedule nothing to decay (division by zero)
        training_args.warmup_steps = steps // 10
    return training_args


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, num_labels: int, *, batch_size: int = 8,
                   model_mean_std: Optional[tuple] = None, data_mean_std: Optional[tuple] = None,
                   progress: bool = True) -> dict[str, Any]:
    """mIoU of ``model`` on a transformed dataset (``pixel_values``/``labels``), logits upsampled
    bilinearly to the label size. Re-normalises inputs when the model's mean/std differ from the
    data's."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .models import renormalize

    model.eval()
    device = next(model.parameters()).device
    metric = StreamingMeanIoU(num_labels, ignore_index=IGNORE_INDEX)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        pixel_values = batch["pixel_values"].to(device)
        if model_mean_std is not None and data_mean_std is not None:
            pixel_values = renormalize(pixel_values, *data_mean_std, *model_mean_std)
        logits = model(pixel_values=pixel_values).logits
        labels = batch["labels"].to(device)
        logits = nn.functional.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                                           align_corners=False)
        metric.update(logits.argmax(1).cpu(), labels.cpu())
    return metric.compute()


def processor_size(data_args: DataArguments, data: SegmentationData) -> dict[str, int]:
    """The input size saved in the image processor: the evaluation resize, else the first validation image's."""
    if data_args.resize_height and data_args.resize_width:
        return {"height": data_args.resize_height, "width": data_args.resize_width}
    width, height = data.validation[0]["image"].size
    return {"height": height, "width": width}


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ teacher
def train_teacher(data: SegmentationData, data_args: DataArguments, training_args: TrainingArguments, *,
                  arch: str = "upernet", backbone: str = "tf_efficientnet_lite0",
                  backbone_weights: Optional[str] = None, head_lr_multiplier: float = 5.0) -> dict[str, Any]:
    """Fine-tunes a CNN teacher with the plain ``transformers.Trainer`` and saves an
    ``AutoModelForSemanticSegmentation`` folder in ``training_args.output_dir`` with
    ``teacher_results.json`` (validation mIoU, schedule, wall time). Resumes from the last checkpoint
    there. The backbone gets ``learning_rate``, the decoder ``head_lr_multiplier`` times it."""
    start = time.time()
    output_dir = Path(training_args.output_dir)
    model = build_teacher(arch=arch, backbone=backbone, id2label=data.id2label, backbone_weights=backbone_weights)
    mean, std = image_mean_std(model)
    train, validation = _datasets_for(data, data_args, mean, std)
    prepare_training_args(training_args)
    backbone_params = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": training_args.learning_rate},
         {"params": head_params, "lr": training_args.learning_rate * head_lr_multiplier}],
        weight_decay=training_args.weight_decay)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                      data_collator=collate_fn, compute_metrics=make_compute_metrics(len(data.id2label), IGNORE_INDEX,
                                                                                   data.id2label),
                      processing_class=student_image_processor(model, size=processor_size(data_args, data)), optimizers=(optimizer, None))
    trainer.model_accepts_loss_kwargs = False  # the model's own loss is a per-batch mean
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir))
    results = {
        "val_mean_iou": metrics["eval_mean_iou"],
        "metrics": metrics,
        "arch": arch, "backbone": backbone, "backbone_weights": backbone_weights,
        "steps": trainer.state.global_step,
        "wall_time_s": time.time() - start,
        "data": dataclasses.asdict(data_args),
        "training": {"learning_rate": training_args.learning_rate, "batch_size":
                     training_args.per_device_train_batch_size, "max_steps": training_args.max_steps},
    }
    if trainer.is_world_process_zero():
        _write_json(output_dir / "teacher_results.json", results)
    return results


# ------------------------------------------------------------------------------------------ distil
#: The offline default job: small enough for a 2-core CPU in well under 10 minutes.
DEFAULT_TEACHER_LR = 2e-3


def _default_teacher(data: SegmentationData, data_args: DataArguments, training_args: TrainingArguments,
                     folder: Path, steps: int) -> str:
    """Trains (once; reused afterwards) the small CNN teacher of the offline default job."""
    if (folder / "teacher_results.json").is_file():
        logger.info("Reusing the default teacher in %s", folder)
        return str(folder)
    logger.warning("No --teacher_name_or_path: training a small CNN teacher first, in %s (cached for later runs).",
                   folder)
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, learning_rate=DEFAULT_TEACHER_LR,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        lr_scheduler_type="polynomial", warmup_steps=10, weight_decay=1e-4, logging_steps=25,
        eval_strategy="no", save_strategy="no", report_to="none", seed=training_args.seed,
        dataloader_num_workers=training_args.dataloader_num_workers, use_cpu=training_args.use_cpu,
        disable_tqdm=training_args.disable_tqdm)
    from .models import efficientnet_lite0_weights_path

    train_teacher(data, data_args, args, backbone_weights=efficientnet_lite0_weights_path())
    return str(folder)


def build_loss_module(args: DistillationArguments, *, student_channels: list[int], teacher_channels: list[int],
                      text_embeddings: Optional[torch.Tensor]) -> nn.Module:
    """The loss module of ``args.method`` with every constant from the flags."""
    common = {"ce_weight": args.ce_weight, "ignore_index": IGNORE_INDEX}
    if args.method == "none":
        return get_loss("none", **common)
    if args.method == "c2vkd":
        return get_loss(
            "c2vkd", **common, student_channels=student_channels, teacher_channels=teacher_channels,
            text_embeddings=text_embeddings, pdd_weight=args.pdd_weight, glob_weight=args.glob_weight,
            rel_weight=args.rel_weight, ling_weight=args.ling_weight, pdd_alpha=args.pdd_alpha,
            pdd_beta=args.pdd_beta, pdd_temperature=args.pdd_temperature, label_weight=args.label_weight,
            glob_tau=args.glob_tau, rel_grid=args.rel_grid, ling_tau=args.ling_tau)
    peer = dict(common)
    if args.kd_weight is not None:
        peer["kd_weight"] = args.kd_weight
    if args.kd_temperature is not None:
        peer["temperature" if args.method in ("kd", "dkd") else "tau"] = args.kd_temperature
    return get_loss(args.method, **peer)


def run_distillation(dist_args: DistillationArguments, data_args: DataArguments,
                     training_args: TrainingArguments, *, data: Optional[SegmentationData] = None,
                     write_card: bool = True, baseline_miou: Optional[float] = None) -> dict[str, Any]:
    """Distils ``dist_args.teacher_name_or_path`` into ``dist_args.student_name_or_path`` and saves the
    plain student, its image processor, ``results.json`` and (``write_card``) the model card with its
    images in ``training_args.output_dir``. Resumes from the last checkpoint there."""
    start = time.time()
    validate_distillation_args(dist_args)
    output_dir = Path(training_args.output_dir)
    prepare_training_args(training_args)
    data = data if data is not None else load_segmentation_data(data_args)
    id2label = data.id2label
    notes: list[str] = []

    teacher = None
    teacher_name = dist_args.teacher_name_or_path
    if dist_args.method != "none":
        if teacher_name is None:
            if data.name != "synthetic":
                raise UserInputError(f"--teacher_name_or_path is required for --method {dist_args.method} "
                                     f"(a CNN AutoModelForSemanticSegmentation folder or Hub id).")
            cache = Path(dist_args.teacher_cache_dir or output_dir / "teacher")
            teacher_name = _default_teacher(data, data_args, training_args, cache, dist_args.default_teacher_steps)
        with user_errors(f"--teacher_name_or_path {teacher_name}"):
            teacher = load_teacher(teacher_name, trust_remote_code=dist_args.trust_remote_code)
        check_class_agreement(id2label, teacher=teacher, teacher_name=teacher_name)

    overrides = json.loads(dist_args.student_config_overrides) if dist_args.student_config_overrides else None
    with user_errors(f"--student_name_or_path {dist_args.student_name_or_path}"):
        student = load_student(dist_args.student_name_or_path, id2label,
                               trust_remote_code=dist_args.trust_remote_code, config_overrides=overrides)
    processor = student_image_processor(student, size=processor_size(data_args, data))
    student_mean, student_std = image_mean_std(student)

    text_embeddings = None
    if dist_args.method == "c2vkd" and dist_args.ling_weight > 0:
        with user_errors("text embeddings"):
            text_embeddings = get_text_embeddings(
                [id2label[i] for i in range(len(id2label))], text_embeddings=dist_args.text_embeddings,
                clip_model=dist_args.clip_model, clip_pretrained=dist_args.clip_pretrained,
                templates=dist_args.prompt_templates, cache_dir=str(output_dir / "text_cache"))
        if text_embeddings is None:
            logger.warning(
                "\n" + "!" * 100 + "\nC2VKD's linguistic term is OFF: no class-name text embeddings. Enable it with "
                "--text_embeddings FILE ([num_classes, dim] .pth/.safetensors/.npy) or --clip_model NAME "
                "--clip_pretrained TAG_OR_CHECKPOINT (needs CLIP weights).\n" + "!" * 100)
            notes.append("The linguistic (CLIP text) term of VLFD was off: no text embeddings were available.")
        else:
            check_class_agreement(id2label, text_embeddings=text_embeddings,
                                  text_source=dist_args.text_embeddings or f"{dist_args.clip_model} embeddings")

    pairs: list[tuple[str, str]] = []
    student_channels: list[int] = []
    teacher_channels: list[int] = []
    if dist_args.method == "c2vkd":
        pairs = parse_feature_pairs(dist_args.feature_pairs) or [default_feature_pair(student, teacher)]
        s_channels, t_channels = feature_channels(student), feature_channels(teacher)
        for s_name, t_name in pairs:
            if s_name not in s_channels or t_name not in t_channels:
                raise UserInputError(f"--feature_pairs {s_name}:{t_name}: the student has features "
                                     f"{sorted(s_channels)}, the teacher {sorted(t_channels)}.")
        student_channels = [s_channels[s] for s, _ in pairs]
        teacher_channels = [t_channels[t] for _, t in pairs]
    loss_module = build_loss_module(dist_args, student_channels=student_channels,
                                    teacher_channels=teacher_channels, text_embeddings=text_embeddings)
    model = DistillationModel(student, loss_module, [s for s, _ in pairs])

    train, validation = _datasets_for(data, data_args, student_mean, student_std)
    trainer = DistillationTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=validation, data_collator=collate_fn,
        compute_metrics=make_compute_metrics(len(id2label), IGNORE_INDEX, id2label), processing_class=processor,
        teacher=teacher, teacher_feature_names=[t for _, t in pairs],
        student_mean_std=(student_mean, student_std),
        teacher_mean_std=image_mean_std(teacher) if teacher is not None else None)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        logger.warning("Resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir))

    results: dict[str, Any] = {
        "method": dist_args.method,
        "seed": training_args.seed,
        "val_mean_iou": metrics["eval_mean_iou"],
        "overall_accuracy": metrics.get("eval_overall_accuracy"),
        "per_category_iou": [metrics.get(f"eval_iou_{id2label[i]}") for i in range(len(id2label))],
        "steps": trainer.state.global_step,
        "wall_time_s": time.time() - start,
        "peak_rss_mb": peak_rss_mb(),
        "teacher": teacher_name,
        "student": dist_args.student_name_or_path,
        "dataset": data.name,
        "linguistic_term": text_embeddings is not None,
        "notes": notes,
        "eval_history": [{"step": e["step"], "val_mean_iou": e["eval_mean_iou"]}
                         for e in trainer.state.log_history if "eval_mean_iou" in e],
        "loss_history": [{k: v for k, v in e.items() if k == "step" or k.startswith("loss")}
                         for e in trainer.state.log_history if "loss" in e],
        "loss_weights": dict(getattr(loss_module, "weights", {})),
        "config": {"distillation": dataclasses.asdict(dist_args), "data": dataclasses.asdict(data_args),
                   "training": {k: v for k, v in training_args.to_dict().items() if "token" not in k}},
    }
    if trainer.is_world_process_zero():
        _write_json(output_dir / RESULTS_NAME, results)
        if write_card:
            teacher_miou = None
            if teacher is not None:
                teacher_miou = teacher_val_miou(teacher, teacher_name, data, data_args, training_args)
                results["teacher_val_mean_iou"] = teacher_miou
            results["baseline_val_mean_iou"] = baseline_miou
            write_student_card(output_dir, trainer, results, data, data_args, teacher_miou=teacher_miou,
                               baseline_miou=baseline_miou)
            _write_json(output_dir / RESULTS_NAME, results)
    return results


def teacher_val_miou(teacher: nn.Module, teacher_name: str, data: SegmentationData, data_args: DataArguments,
                     training_args: TrainingArguments) -> float:
    """The teacher's validation mIoU under the same evaluation protocol (cached in ``teacher_results.json``
    beside a local teacher when it was made by ``train_teacher``)."""
    saved = Path(teacher_name) / "teacher_results.json"
    if saved.is_file():
        return float(json.loads(saved.read_text())["val_mean_iou"])
    mean, std = image_mean_std(teacher)
    _, validation = _datasets_for(data, data_args, mean, std)
    return float(evaluate_model(teacher, validation, len(data.id2label),
                                batch_size=training_args.per_device_eval_batch_size)["mean_iou"])


def write_student_card(output_dir: Path, trainer: DistillationTrainer, results: dict[str, Any],
                       data: SegmentationData, data_args: DataArguments, *, teacher_miou: Optional[float],
                       baseline_miou: Optional[float] = None, num_images: int = 3) -> Path:
    """Writes README.md (model card), ``predictions.png`` and ``training_curves.png`` into ``output_dir``."""
    from .model_card import CURVES_NAME, OVERLAY_NAME, build_model_card, plot_training_curves, save_prediction_overlay

    student = trainer.accelerator.unwrap_model(trainer.model).student.eval()
    mean, std = image_mean_std(student)
    transform = build_transform(data_args, mean, std, train=False)
    images, labels, preds = [], [], []
    count = min(num_images, len(data.validation))
    for index in range(count):
        raw = data.validation[index]
        example = transform({"image": [raw["image"]], "label": [raw["label"]]})
        pixel_values = example["pixel_values"][0][None].to(next(student.parameters()).device)
        label = np.asarray(example["labels"][0])
        with torch.no_grad():
            logits = student(pixel_values=pixel_values).logits
        logits = nn.functional.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
        preds.append(logits.argmax(1)[0].cpu().numpy())
        labels.append(label)
        images.append(np.asarray(raw["image"].convert("RGB").resize(label.shape[::-1])))
    palette = data.palette or default_palette(len(data.id2label))
    overlay = save_prediction_overlay(images, labels, preds, palette, output_dir / OVERLAY_NAME) if count else None
    curves = plot_training_curves(trainer.state.log_history, output_dir / CURVES_NAME)
    metrics = {"mean_iou": results["val_mean_iou"], "overall_accuracy": results.get("overall_accuracy") or float("nan"),
               "per_category_iou": [float("nan") if v is None else v for v in results["per_category_iou"]]}
    args = trainer.args
    card = build_model_card(
        repo_id=args.hub_model_id or output_dir.name, metrics=metrics, id2label=data.id2label,
        dataset_name=data.name, dataset_split="validation", method=results["method"],
        teacher_name=results.get("teacher"), teacher_miou=teacher_miou, baseline_miou=baseline_miou,
        loss_weights=results.get("loss_weights"),
        schedule={"steps": results["steps"], "per_device_batch_size": args.per_device_train_batch_size,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "learning_rate": args.learning_rate, "scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)), "seed": args.seed},
        notes=results.get("notes", []), student_type=type(student).__name__.replace("ForSemanticSegmentation", ""),
        overlay_image=OVERLAY_NAME if overlay else None, curves_image=CURVES_NAME if curves else None)
    card.save(str(output_dir / "README.md"))
    return output_dir / "README.md"


def push_student_to_hub(output_dir: Path, repo_id: Optional[str], token: Optional[str] = None,
                        private: Optional[bool] = None) -> str:
    """Uploads the saved student folder (weights, config, processor, card, images). Everything is
    already saved locally; without network this raises :class:`UserInputError` saying so."""
    from huggingface_hub import HfApi

    repo_id = repo_id or output_dir.name
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=url.repo_id,
                          ignore_patterns=["checkpoint-*", "checkpoint-*/**", "teacher/**", "baseline/**",
                                           "text_cache/**", "*.tmp", "training_args.bin"])
    except Exception as error:  # network, auth: the user needs one clear sentence, not a traceback
        reason = type(error).__name__
        raise UserInputError(
            f"--push_to_hub failed ({reason}): could not upload to the Hub repo '{repo_id}'. The student, its "
            f"card and results are saved in {output_dir}; upload later with `huggingface-cli upload {repo_id} "
            f"{output_dir}` once online and logged in.") from None
    return url.repo_id
