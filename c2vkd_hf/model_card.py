"""Model card of a distilled student: model-index mIoU, per-class table, teacher, baseline, images.

``Trainer.create_model_card`` drops ``mean_iou`` (not one of its metric tags), so the model-index is
written here with ``huggingface_hub`` (:class:`ModelCardData`, :class:`EvalResult`). Class names come
from datasets and are escaped before they enter Markdown.
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .constants import IGNORE_INDEX

#: The card template, package data: ``c2vkd_hf/templates/student_card.md``.
TEMPLATE_NAME = "student_card.md"
OVERLAY_NAME = "predictions.png"
CURVES_NAME = "training_curves.png"

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")


def escape_markdown(text: str) -> str:
    """Escapes Markdown/HTML control characters so that a class name renders as plain text."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text).replace("\n", " ").replace("\r", " "))


def is_hub_id(name: Optional[str]) -> bool:
    """``name`` is a Hub repo id (``org/name`` or ``name``) and not a local path or a ``torchvision:`` name."""
    if not name or os.path.exists(os.path.expanduser(name)) or name.startswith(("torchvision:", ".", "/", "~")):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


def _architecture(model: Any, saved: dict[str, Any]) -> str:
    """``"UperNet + tf_efficientnet_lite0"``-style name of a segmentation model: from the
    ``teacher_results.json`` that ``train_teacher`` writes (``saved``), else from the model's config."""
    if saved.get("arch"):
        arch = {"upernet": "UperNet", "deeplabv3plus": "DeepLabV3+"}.get(saved["arch"], saved["arch"])
        return f"{arch} + {saved['backbone']}" if saved.get("backbone") else arch
    config = model.config
    if getattr(config, "arch", None):  # a torchvision model
        return f"torchvision {config.arch}"
    arch = type(model).__name__.replace("ForSemanticSegmentation", "")
    backbone = getattr(config, "backbone_config", None)
    name = getattr(backbone, "backbone", None) or getattr(backbone, "model_type", None)
    return f"{arch} + {name}" if name else arch


def teacher_description(model: Any, name_or_path: str, miou: Optional[float] = None) -> str:
    """How the card names a teacher: its Hub id when it has one, otherwise (a local folder or file
    means nothing once the card is published) its architecture, size and measured mIoU, e.g.
    ``"UperNet + tf_efficientnet_lite0 (6.2M parameters, val mIoU 67.45%)"``."""
    if is_hub_id(name_or_path):
        return name_or_path
    saved_file = Path(os.path.expanduser(name_or_path)) / "teacher_results.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    facts = [f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"]
    if miou is not None:
        facts.append(f"val mIoU {miou * 100:.2f}%")
    return f"{_architecture(model, saved)} ({', '.join(facts)})"


def _template_file(template_path: Optional[str]):
    """A context manager giving the template's path (package data unless ``template_path``)."""
    if template_path:
        import contextlib

        return contextlib.nullcontext(Path(template_path))
    return resources.as_file(resources.files("c2vkd_hf").joinpath("templates", TEMPLATE_NAME))


def _title(method: str) -> str:
    return {"c2vkd": "C2VKD (VLFD + PDD)", "kd": "pixel-wise KD", "cwd": "channel-wise distillation (CWD)",
            "dist": "DIST", "dkd": "decoupled KD (DKD)", "none": "no teacher (cross-entropy only)"}.get(method, method)


def build_model_card(
    *,
    repo_id: str,
    metrics: dict[str, Any],
    id2label: dict[int, str],
    dataset_name: str,
    dataset_split: str = "validation",
    method: str,
    teacher_name: Optional[str],
    teacher_miou: Optional[float] = None,
    baseline_miou: Optional[float] = None,
    loss_weights: Optional[dict[str, float]] = None,
    schedule: Optional[dict[str, Any]] = None,
    notes: Sequence[str] = (),
    student_type: str = "SegFormer",
    overlay_image: Optional[str] = None,
    curves_image: Optional[str] = None,
    template_path: Optional[str] = None,
    eval_images: Optional[int] = None,
    eval_images_total: Optional[int] = None,
    text_source: Optional[str] = None,
) -> ModelCard:
    """A :class:`huggingface_hub.ModelCard` whose metadata has a model-index entry
    (task ``image-segmentation``, metric ``mean_iou`` in percent, plus ``accuracy``).

    ``repo_id``: what the usage snippet loads (the Hub id, else the local folder). ``metrics`` needs
    ``mean_iou`` and ``overall_accuracy`` (fractions in [0, 1]) and ``per_category_iou`` (one value or
    NaN per class, in label order). ``teacher_name``: how the card names the teacher (see
    :func:`teacher_description`). When the evaluation used ``eval_images`` of the split's
    ``eval_images_total`` (a subset, ``--max_eval_samples``), the card says so and the figures do not
    enter the model-index (they are not the split's result). ``text_source``: where C2VKD's class-name
    text embeddings came from.
    """
    mean_iou = float(metrics["mean_iou"])
    accuracy = float(metrics.get("overall_accuracy", float("nan")))
    model_name = repo_id.rstrip("/").split("/")[-1]
    subset = eval_images is not None and eval_images_total is not None and eval_images < eval_images_total
    eval_results = [
        EvalResult(task_type="image-segmentation", task_name="Semantic Segmentation",
                   dataset_type=dataset_name, dataset_name=dataset_name, dataset_split=dataset_split,
                   metric_type="mean_iou", metric_name="mIoU", metric_value=round(mean_iou * 100, 2)),
    ]
    if math.isfinite(accuracy):
        eval_results.append(
            EvalResult(task_type="image-segmentation", task_name="Semantic Segmentation",
                       dataset_type=dataset_name, dataset_name=dataset_name, dataset_split=dataset_split,
                       metric_type="accuracy", metric_name="pixel accuracy", metric_value=round(accuracy * 100, 2)))
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", license="apache-2.0",
        tags=["image-segmentation", "knowledge-distillation", "c2vkd", method],
        model_name=model_name, eval_results=None if subset else eval_results,
    )
    per_class = []
    for index, iou in enumerate(metrics.get("per_category_iou", [])):
        name = escape_markdown(id2label.get(index, id2label.get(str(index), str(index))))
        per_class.append((name, "n/a" if iou is None or not math.isfinite(float(iou)) else f"{float(iou) * 100:.2f}"))
    with _template_file(template_path) as template:
        if not template.is_file():
            raise FileNotFoundError(f"Model card template {template} is missing.")
        return ModelCard.from_template(
            card_data, template_path=str(template), model_name=escape_markdown(model_name), repo_id=repo_id,
            method=method, method_title=_title(method), student_type=escape_markdown(student_type),
            teacher_name=escape_markdown(teacher_name or "none"), teacher_miou=teacher_miou,
            baseline_miou=baseline_miou, dataset_name=escape_markdown(dataset_name), dataset_split=dataset_split,
            mean_iou=mean_iou, overall_accuracy=accuracy if math.isfinite(accuracy) else 0.0, per_class=per_class,
            loss_weights=json.dumps(loss_weights or {}), schedule=json.dumps(schedule or {}),
            notes=[str(n) for n in notes], overlay_image=overlay_image, curves_image=curves_image,
            subset=subset, eval_images=eval_images, eval_images_total=eval_images_total,
            text_source=escape_markdown(text_source) if text_source else None,
        )


def plot_training_curves(log_history: Iterable[dict[str, Any]], path: str | Path) -> Optional[Path]:
    """Plots every logged loss term and the validation mIoU against the step; returns the path
    (``None`` when nothing was logged)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, the caller's backend untouched

    series: dict[str, tuple[list, list]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key == "loss" or key.startswith("loss/") or key == "eval_mean_iou":
                if isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(key, ([], []))
                    series[key][0].append(step)
                    series[key][1].append(value)
    if not series:
        return None
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for key, (steps, values) in sorted(series.items()):
        if key == "eval_mean_iou":
            axes[1].plot(steps, [v * 100 for v in values], marker="o", label="val mIoU")
        else:
            axes[0].plot(steps, values, label=key)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss (unweighted terms)"), axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step"), axes[1].set_ylabel("mIoU (%)")
    if "eval_mean_iou" in series:
        axes[1].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def save_prediction_overlay(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                            predictions: Sequence[np.ndarray], palette: Sequence[Sequence[int]],
                            path: str | Path, ignore_index: int = IGNORE_INDEX) -> Path:
    """Saves a grid (one row per image: image, colourised label, colourised prediction blended on
    the image). ``images`` are uint8 (H, W, 3); labels/predictions integer (H, W)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, the caller's backend untouched

    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    rows = len(images)
    fig = Figure(figsize=(10, 2.8 * rows))
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, (image, label, pred) in enumerate(zip(images, labels, predictions)):
        label_rgb = lut[np.clip(label, 0, 255)]
        label_rgb[label == ignore_index] = 0
        blend = (0.45 * image + 0.55 * lut[np.clip(pred, 0, 255)]).astype(np.uint8)
        for col, (img, title) in enumerate(((image, "image"), (label_rgb, "label"), (blend, "prediction"))):
            axes[row, col].imshow(img)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
