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


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (first and last included), not consecutive
    frames: consecutive frames of a video split look alike."""
    if total <= 0 or count <= 0:
        return []
    if count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def _last_per_step(points: Iterable[tuple[Any, float]]) -> tuple[list, list]:
    """``(steps, values)`` with one point per step, the last one logged (the evaluation after training
    comes at the same step as the last periodic one, after the text head's fold)."""
    by_step: dict[Any, float] = {}
    for step, value in points:
        if step is not None and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plain(value: float, _position=None) -> str:
    """A tick label without exponent notation: 0.2, 3, 50."""
    return f"{value:.6g}" if value > 0 else ""


#: The narrowest mIoU axis (points): a few points, so that noise of a hundredth of a point stays flat.
MIN_MIOU_RANGE = 5.0


def training_curves_figure(log_history: Iterable[dict[str, Any]], *,
                           baseline_history: Optional[Iterable[dict[str, Any]]] = None,
                           baseline_miou: Optional[float] = None, teacher_miou: Optional[float] = None):
    """The figure of :func:`plot_training_curves` (a ``matplotlib.figure.Figure`` with two panels), or
    ``None`` when nothing was logged."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, the caller's backend untouched
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    history = list(log_history)
    losses: dict[str, tuple[list, list]] = {}
    for key in sorted({k for e in history for k in e if k == "loss" or k.startswith("loss/")}):
        losses[key] = _last_per_step((e.get("step"), e[key]) for e in history if key in e)
    losses = {k: v for k, v in losses.items() if v[0]}
    student = _last_per_step((e.get("step"), e["eval_mean_iou"]) for e in history if "eval_mean_iou" in e)
    baseline = _last_per_step((e.get("step"), e.get("val_mean_iou", e.get("eval_mean_iou")))
                              for e in (baseline_history or []))
    train_loss = [e["train_loss"] for e in history if isinstance(e.get("train_loss"), (int, float))]
    if not losses and not student[0] and not baseline[0] and not train_loss:
        return None

    fig = Figure(figsize=(11, 4))
    loss_ax, miou_ax = fig.subplots(1, 2)
    if losses:
        for key, (steps, values) in losses.items():
            total = key == "loss"
            loss_ax.plot(steps, values, label="total" if total else key.split("/", 1)[1],
                         marker="o" if len(steps) < 4 else None, color="black" if total else None,
                         linewidth=2 if total else 1.2)
        if all(v > 0 for _, values in losses.values() for v in values):
            loss_ax.set_yscale("log")
            loss_ax.yaxis.set_major_formatter(FuncFormatter(_plain))  # plain numbers, not 10^x
            loss_ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda value, _: _plain(value) if round(value / 10 ** math.floor(math.log10(value))) in (2, 3, 5)
                else ""))
        loss_ax.legend(fontsize=7)
        loss_ax.set_ylabel("loss (total and unweighted terms)")
    else:
        message = "no loss logged"
        if train_loss:
            message += f"\n(the run was shorter than logging_steps)\nmean training loss {train_loss[-1]:.3g}"
        loss_ax.text(0.5, 0.5, message, ha="center", va="center", transform=loss_ax.transAxes, fontsize=10)
        loss_ax.set_xticks([]), loss_ax.set_yticks([])
        loss_ax.set_ylabel("loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_title("training loss")

    levels = []
    if student[0]:
        miou_ax.plot(student[0], [v * 100 for v in student[1]], marker="o", color="C0", label="student")
        levels += student[1]
    if baseline[0]:
        miou_ax.plot(baseline[0], [v * 100 for v in baseline[1]], marker="s", linestyle="--", color="C1",
                     label="student without teacher")
        levels += baseline[1]
    elif baseline_miou is not None:
        miou_ax.axhline(baseline_miou * 100, color="C1", linestyle="--", label="student without teacher (final)")
        levels.append(baseline_miou)
    if teacher_miou is not None:
        miou_ax.axhline(teacher_miou * 100, color="C2", linestyle=":", linewidth=2, label="teacher")
        levels.append(teacher_miou)
    if levels:
        low, high = min(levels) * 100, max(levels) * 100
        pad = max((high - low) * 0.1, (MIN_MIOU_RANGE - (high - low)) / 2, 0.0)
        low, high = max(0.0, low - pad), min(100.0, high + pad)
        if high - low < MIN_MIOU_RANGE:  # clipped at 0 or 100: widen on the other side
            low, high = (low, low + MIN_MIOU_RANGE) if low == 0.0 else (high - MIN_MIOU_RANGE, high)
        miou_ax.set_ylim(low, high)
        miou_ax.legend(fontsize=8)
    else:
        miou_ax.text(0.5, 0.5, "no evaluation during training", ha="center", va="center",
                     transform=miou_ax.transAxes)
    miou_ax.set_xlabel("step"), miou_ax.set_ylabel("val mIoU (%)")
    for ax in (loss_ax, miou_ax) if losses else (miou_ax,):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    miou_ax.set_title("validation mIoU")
    fig.tight_layout()
    return fig


def plot_training_curves(log_history: Iterable[dict[str, Any]], path: str | Path, *,
                         baseline_history: Optional[Iterable[dict[str, Any]]] = None,
                         baseline_miou: Optional[float] = None, teacher_miou: Optional[float] = None) -> Optional[Path]:
    """Saves two panels: the logged training loss (total and every unweighted term; a run shorter than
    ``logging_steps`` says so, with its mean training loss) and the student's validation mIoU against
    the step, beside the no-teacher baseline's (``baseline_history``: its ``eval_history`` entries
    ``{"step", "val_mean_iou"}``; else its final ``baseline_miou`` as a level) and the teacher's level
    (``teacher_miou``). One point per step (the last logged), an mIoU axis at least
    :data:`MIN_MIOU_RANGE` points tall. Returns the path (``None`` when nothing was logged)."""
    fig = training_curves_figure(log_history, baseline_history=baseline_history, baseline_miou=baseline_miou,
                                 teacher_miou=teacher_miou)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def prediction_figure(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      predictions: Sequence[np.ndarray], palette: Sequence[Sequence[int]],
                      class_names: Optional[Sequence[str]] = None, ignore_index: int = IGNORE_INDEX,
                      frame_indices: Optional[Sequence[int]] = None):
    """The figure of :func:`save_prediction_overlay`: one row per frame (image, label, prediction side by
    side, colours from ``palette``) and a legend of the classes that appear (colour and name)."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, the caller's backend untouched
    from matplotlib.patches import Patch

    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    rows = len(images)
    present: set[int] = set()
    has_ignore = False
    for label, pred in zip(labels, predictions):
        present.update(int(v) for v in np.unique(label) if v != ignore_index)
        present.update(int(v) for v in np.unique(pred))
        has_ignore = has_ignore or bool((np.asarray(label) == ignore_index).any())
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(palette))]
    handles = [Patch(facecolor=lut[i] / 255.0, edgecolor="black", linewidth=0.5,
                     label=names[i] if i < len(names) else str(i)) for i in sorted(present) if i < 256]
    if has_ignore:
        handles.append(Patch(facecolor="black", edgecolor="black", label="ignored (not scored)"))
    legend_rows = math.ceil(len(handles) / 6) if handles else 0
    fig = Figure(figsize=(10.5, 2.9 * rows + 0.35 * legend_rows + 0.2))
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, (image, label, pred) in enumerate(zip(images, labels, predictions)):
        label_rgb = lut[np.clip(label, 0, 255)]
        label_rgb[np.asarray(label) == ignore_index] = 0
        pred_rgb = lut[np.clip(pred, 0, 255)]
        for col, (img, title) in enumerate(((image, "image"), (label_rgb, "label"), (pred_rgb, "prediction"))):
            axes[row, col].imshow(img, interpolation="nearest")
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(title)
        if frame_indices is not None:
            axes[row, 0].set_ylabel(f"#{frame_indices[row]}", fontsize=9)
    bottom = (0.35 * legend_rows + 0.2) / fig.get_figheight() if handles else 0.0
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def save_prediction_overlay(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                            predictions: Sequence[np.ndarray], palette: Sequence[Sequence[int]],
                            path: str | Path, ignore_index: int = IGNORE_INDEX,
                            class_names: Optional[Sequence[str]] = None,
                            frame_indices: Optional[Sequence[int]] = None) -> Path:
    """Saves a grid: one row per frame with the image, its colourised label and the colourised
    prediction side by side (not blended), and a legend of the classes shown (palette colour and
    ``class_names``). ``images`` are uint8 (H, W, 3); labels/predictions integer (H, W);
    ``frame_indices``: the frames' indices in the split, written beside each row."""
    fig = prediction_figure(images, labels, predictions, palette, class_names, ignore_index, frame_indices)
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
