"""``c2vkd-text-query``: text-query segmentation with a C2VKD student (its ``text_head.safetensors``): how good is it, and what
does it do with class names it was not trained on?

    D=../shared/data/camvid; T=../shared/data/clip_text
    c2vkd-text-query --model_name_or_path outputs/benchmark-camvid/c2vkd-seed0 \
        --train_images $D/train --train_labels $D/trainannot --validation_images $D/val \
        --validation_labels $D/valannot --labels_file $D/classes.json --resize_height 120 --resize_width 160 \
        --query_embeddings $T/city_ViT16_clip_text.pth \
        --query_names "road,sidewalk,building,wall,fence,pole,traffic light,traffic sign,vegetation,terrain,sky,person,rider,car,truck,bus,train,motorcycle,bicycle" \
        --query_mapping $T/camvid11_from_city_ViT16_clip_text.json \
        --extra_mapping "wall=Building,terrain=Tree,truck=Car,bus=Car,train=Car,motorcycle=Bicyclist" \
        --show_names "truck,bus,traffic light,person" --output_dir benchmarks/text_query

Without data flags, the data configuration saved in the model folder's ``results.json`` is used.

Measures on the validation split (logits upsampled bilinearly to the labels, streaming mIoU):

1. the student's own segmentation head;
2. text-query segmentation with the training classes' embeddings (those stored in the text head):
   argmax over ``normalise(P_l(F)) E^T``;
3. with ``--query_embeddings`` and ``--query_names`` (or ``--query_vocabulary city|ade|context|voc``, a
   built-in CLIP ViT-B/16 vocabulary): text-query segmentation with ANOTHER vocabulary (e.g. the 19
   Cityscapes class names), each query name assigned to a training class (``--query_mapping``: a JSON whose
   ``"mapping"`` is ``{training class: [query names]}``, plus ``--extra_mapping name=class,...``); the
   prediction of a pixel is the class of its best-scoring name. Also tabulated: where each query name's
   pixels fall in the ground truth.

Writes ``RESULTS.md``, ``results.json`` and ``text_query.png`` (images, ground truth, the student's
prediction, the text-query prediction over the query vocabulary, or over the training names without one
(each name in the colour of its training class when there is a mapping), and per-name heat maps of
``--show_names``: the name's cosine similarity with each pixel's projected feature, min-max scaled per
image, with the name's largest probability within the vocabulary in the title) to ``--output_dir``
(default ``outputs/text_query``), for ``--num_images`` validation images spread evenly over the split
(``--num_images 0``: no figure). ``--show_names`` defaults to the first four query names that are not
training class names. Every flag is checked before the first evaluation; each evaluation has a
progress bar.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSemanticSegmentation, HfArgumentParser

from c2vkd_hf.config import IGNORE_INDEX, DataArguments
from c2vkd_hf.data import build_transform, collate_fn, colorize, default_palette, load_segmentation_data
from c2vkd_hf.metrics import StreamingMeanIoU, class_map
from c2vkd_hf.models import fix_patch_grid, image_mean_std
from c2vkd_hf.inference import evaluate_model, segmentation_scores
from c2vkd_hf.jobs import UserInputError, run_script, saved_data_arguments, user_errors
from c2vkd_hf.validation import check_output_dir, parse_script_arguments
from c2vkd_hf.text import load_text_embeddings
from c2vkd_hf.text_query import TextQuerySegmenter, load_text_head


@dataclass
class TextQueryArguments:
    model_name_or_path: str = field(metadata={"help": "A C2VKD student folder with text_head.safetensors."})
    query_embeddings: Optional[str] = field(default=None, metadata={
        "help": "(K', D) CLIP text embeddings of other class names (.pth/.safetensors/.npy), same CLIP model."})
    query_names: Optional[str] = field(default=None, metadata={"help": "Comma-separated names of those rows."})
    query_vocabulary: Optional[str] = field(default=None, metadata={
        "help": "A built-in CLIP ViT-B/16 vocabulary as the other names, instead of --query_embeddings/--query_names: "
                "city, ade, context or voc (c2vkd_hf/vocab)."})
    query_mapping: Optional[str] = field(default=None, metadata={
        "help": "JSON with 'mapping': {training class: [query names]} (e.g. camvid11_from_city_ViT16_clip_text.json)."})
    extra_mapping: Optional[str] = field(default=None, metadata={
        "help": "More assignments 'query name=training class,...' for names the mapping file leaves out."})
    show_names: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated names shown as heat maps in the figure (default: the first four query names "
                "that are not training class names; without other names, the first four training classes)."})
    num_images: int = field(default=3, metadata={"help": "Validation images in the figure (spread over the split)."})
    batch_size: int = field(default=8, metadata={"help": "Evaluation batch size."})
    output_dir: str = field(default="outputs/text_query", metadata={"help": "Where RESULTS.md and the PNG go."})


def check_flags(args: TextQueryArguments) -> None:
    """Flag checks that need nothing loaded (numeric ranges: ``c2vkd_hf.validation.RANGES``)."""
    if args.query_vocabulary and (args.query_embeddings or args.query_names):
        raise UserInputError("--query_vocabulary replaces --query_embeddings/--query_names: give one or the other.")
    if args.query_names and not args.query_embeddings:
        raise UserInputError("--query_names names the rows of --query_embeddings, which is missing.")
    if (args.query_mapping or args.extra_mapping) and not (args.query_embeddings or args.query_vocabulary):
        raise UserInputError("--query_mapping/--extra_mapping assign query names: give --query_embeddings or "
                             "--query_vocabulary.")
    for flag in ("query_embeddings", "query_mapping"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UserInputError(f"--{flag} {path} does not exist.")


def _query_rows(args: TextQueryArguments, dim: int) -> tuple[torch.Tensor, list[str]]:
    """The other vocabulary's ``(K', D)`` embeddings and names: a built-in vocabulary or a file + names."""
    if args.query_vocabulary:
        from c2vkd_hf.vocabulary import VOCABULARIES, load_vocabulary

        if args.query_vocabulary not in VOCABULARIES:
            raise UserInputError(f"--query_vocabulary {args.query_vocabulary!r}: one of {', '.join(VOCABULARIES)}.")
        names, embeddings = load_vocabulary(args.query_vocabulary)
        names, source = list(names), f"--query_vocabulary {args.query_vocabulary}"
    else:
        with user_errors(f"--query_embeddings {args.query_embeddings}"):
            embeddings = load_text_embeddings(args.query_embeddings)
        names = [n.strip() for n in (args.query_names or "").split(",") if n.strip()]
        source = f"--query_embeddings {args.query_embeddings}"
        if len(names) != embeddings.shape[0]:
            raise UserInputError(f"--query_names gives {len(names)} names for the {embeddings.shape[0]} rows of "
                                 f"{args.query_embeddings}.")
    if embeddings.dim() != 2 or embeddings.shape[1] != dim:
        raise UserInputError(f"{source} holds embeddings of shape {tuple(embeddings.shape)}, but the student's text head "
                             f"needs (K, {dim}): use text embeddings of the CLIP model it was trained with.")
    return embeddings, names


def _query_vocabulary(args: TextQueryArguments, class_names: list[str], dim: int):
    """(embeddings (K', D), names, class index of each name or None without a mapping), or ``None``
    without another vocabulary."""
    if not (args.query_embeddings or args.query_vocabulary):
        return None
    embeddings, names = _query_rows(args, dim)
    if not args.query_mapping and not args.extra_mapping:
        return embeddings, names, None
    lower = {c.lower(): i for i, c in enumerate(class_names)}
    assign: dict[str, int] = {}

    def put(name: str, cls: str, where: str) -> None:
        if cls.lower() not in lower:
            raise UserInputError(f"{where}: {cls!r} is not a training class ({', '.join(class_names)}).")
        assign[name.lower()] = lower[cls.lower()]

    if args.query_mapping:
        try:
            mapping = json.loads(Path(args.query_mapping).read_text())
        except (OSError, ValueError) as error:
            raise UserInputError(f"--query_mapping {args.query_mapping}: {error}") from None
        if not isinstance(mapping, dict):
            raise UserInputError(f"--query_mapping {args.query_mapping} must hold a JSON object.")
        for cls, queries in mapping.get("mapping", mapping).items():
            for query in [queries] if isinstance(queries, str) else queries:
                put(query, cls, args.query_mapping)
    for item in (args.extra_mapping or "").split(","):
        if item.strip():
            if item.count("=") != 1:
                raise UserInputError(f"--extra_mapping entry {item!r} must look like 'query name=training class'.")
            query, cls = (part.strip() for part in item.split("="))
            put(query, cls, "--extra_mapping")
    missing = [n for n in names if n.lower() not in assign]
    if missing:
        raise UserInputError(f"query names without a training class: {', '.join(missing)} (use --extra_mapping).")
    return embeddings, names, [assign[n.lower()] for n in names]


@torch.no_grad()
def _query_confusion(model: nn.Module, dataset, num_names: int, num_labels: int, name_to_class: list[int],
                     batch_size: int) -> tuple[dict, np.ndarray]:
    """mIoU of the mapped query-vocabulary predictions and the (names x classes) pixel counts."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    metric = StreamingMeanIoU(num_labels, ignore_index=IGNORE_INDEX)
    counts = torch.zeros(num_names, num_labels, dtype=torch.int64)
    lookup = torch.tensor(name_to_class)
    batches = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    for batch in tqdm(batches, desc=f"text query, {num_names} other names", leave=False):
        labels = batch["labels"]
        best = class_map(segmentation_scores(model, batch["pixel_values"], output_size=labels.shape[-2:]))
        metric.update(lookup[best], labels)
        valid = labels != IGNORE_INDEX
        counts += torch.bincount(best[valid] * num_labels + labels[valid], minlength=num_names * num_labels
                                 ).reshape(num_names, num_labels)
    return metric.compute(), counts.numpy()


def _figure(path: Path, rows: list[dict], class_names: list[str], palette, query_names: list[str],
            show: list[str], name_to_class: Optional[list[int]]) -> None:
    from matplotlib.figure import Figure  # the object API: no pyplot state, the caller's backend untouched
    from matplotlib.patches import Patch

    if name_to_class is not None:  # a name takes the colour of the training class it stands for
        query_palette = [palette[c] for c in name_to_class]
    else:
        query_palette = default_palette(len(query_names))
    cols = 4 + len(show)
    fig = Figure(figsize=(2.4 * cols, 2.0 * len(rows) + 1.2))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    titles = ["image", "ground truth", "student head", f"text query ({len(query_names)} names)"]
    for r, row in enumerate(rows):
        panels = [row["image"], colorize(row["label"], palette), colorize(row["pred"], palette),
                  colorize(row["query_pred"], query_palette)]
        for c in range(cols):
            ax = axes[r][c]
            if c < 4:
                ax.imshow(panels[c])
            else:
                ax.imshow(row["image"])
                heat = row["heat"][c - 4]
                ax.imshow((heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-6), cmap="inferno",
                          vmin=0, vmax=1, alpha=0.65)
                ax.set_title(f"'{show[c - 4]}' (max p {row['max_prob'][c - 4]:.2f})", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and c < 4:
                ax.set_title(titles[c], fontsize=8)
    handles = [Patch(color=np.array(palette[i]) / 255, label=class_names[i]) for i in range(len(class_names))]
    if name_to_class is None:
        used = sorted({int(v) for row in rows for v in np.unique(row["query_pred"])})
        handles += [Patch(color=np.array(query_palette[i]) / 255, label=f"'{query_names[i]}'") for i in used]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def _show_names(flag: Optional[str], names: list[str], class_names: list[str]) -> list[str]:
    """The names drawn as heat maps: ``--show_names`` (each one of ``names``), else the first four of
    ``names`` that are not training class names (the first four training classes when ``names`` are
    the training classes)."""
    if flag:
        show = [n.strip() for n in flag.split(",") if n.strip()]
        unknown = [n for n in show if n not in names]
        if unknown:
            raise UserInputError(f"--show_names {', '.join(unknown)}: not among the query names ({', '.join(names)}).")
        return show
    from c2vkd_hf.vocabulary import name_key

    trained = {name_key(c) for c in class_names}
    unseen = [n for n in names if name_key(n) not in trained]
    return (unseen or names)[:4]


def _figure_rows(student: nn.Module, query: nn.Module, data, transform, count: int, names: list[str],
                 show: list[str]) -> list[dict]:
    """Image, label, the student's prediction, the text-query prediction and the heat maps of
    ``show`` for ``count`` validation images spread evenly over the split."""
    rows = []
    picks = [names.index(n) for n in show]
    for index in sorted({int(i) for i in np.linspace(0, len(data.validation) - 1, count)}):
        raw = data.validation[index]
        example = transform({"image": [raw["image"]], "label": [raw["label"]]})
        pixel_values, label = example["pixel_values"][0][None], np.asarray(example["labels"][0])
        with torch.inference_mode():
            pred = class_map(segmentation_scores(student, pixel_values, output_size=label.shape))[0]
            scores = segmentation_scores(query, pixel_values, output_size=label.shape)[0]
        probs = scores.softmax(0)
        rows.append({"image": np.asarray(raw["image"].convert("RGB").resize(label.shape[::-1])), "label": label,
                     "pred": pred.numpy(), "query_pred": class_map(scores, 0).numpy(),
                     "heat": [scores[i].numpy() for i in picks],  # cosine / tau
                     "max_prob": [float(probs[i].max()) for i in picks]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, data_args, _ = parse_script_arguments(HfArgumentParser((TextQueryArguments, DataArguments)), argv, {})
    check_flags(args)
    data_args = saved_data_arguments(args.model_name_or_path, argv, data_args, say=print)
    check_output_dir(args.output_dir)
    folder = Path(args.model_name_or_path)
    start = time.time()
    with user_errors(f"--model_name_or_path {folder}"):
        student = fix_patch_grid(AutoModelForSemanticSegmentation.from_pretrained(folder)).eval()
        head = load_text_head(folder)
    data = load_segmentation_data(data_args)
    class_names = [data.id2label[i] for i in range(len(data.id2label))]
    if student.config.num_labels != len(class_names) or head.text_embeddings.shape[0] != len(class_names):
        raise UserInputError(f"the student ({student.config.num_labels} classes, text head "
                             f"{head.text_embeddings.shape[0]}) does not match the dataset ({len(class_names)}).")
    # every flag is checked before the first evaluation
    vocabulary = _query_vocabulary(args, class_names, head.projector.out_channels)
    names = vocabulary[1] if vocabulary is not None else class_names
    show = _show_names(args.show_names, names, class_names)

    mean, std = image_mean_std(student)
    transform = build_transform(data_args, mean, std, train=False)
    validation = data.validation.with_transform(transform)
    k = len(class_names)
    text_model = TextQuerySegmenter(student, head)
    results: dict = {"model": str(folder), "dataset": data.name, "num_images": len(validation),
                     "feature": head.feature, "tau": head.tau, "classes": class_names}
    with torch.inference_mode():
        own = evaluate_model(student, validation, k, batch_size=args.batch_size, desc="student head")
        text = evaluate_model(text_model, validation, k, batch_size=args.batch_size, desc="text query, training names")
    results["student_head"] = own
    results["text_query_training_names"] = text

    query, colours = text_model, list(range(k))  # without other names the figure queries the training names
    if vocabulary is not None:
        embeddings, names, name_to_class = vocabulary
        query, colours = TextQuerySegmenter(student, head, embeddings), name_to_class
        results["query_names"] = names
        if name_to_class is not None:
            with torch.inference_mode():
                mapped, counts = _query_confusion(query, validation, len(names), k, name_to_class, args.batch_size)
            results["text_query_other_names"] = mapped
            results["query_name_to_class"] = {n: class_names[c] for n, c in zip(names, name_to_class)}
            results["query_pixels_by_class"] = {n: dict(zip(class_names, map(int, row))) for n, row in zip(names, counts)}

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.num_images > 0:
        rows = _figure_rows(student, query, data, transform, min(args.num_images, len(data.validation)), names, show)
        _figure(out / "text_query.png", rows, class_names, data.palette or default_palette(k), names, show, colours)
    results["wall_time_s"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "RESULTS.md").write_text(_report(results, argv, show, args.num_images > 0))
    print(f"student head mIoU {own['mean_iou'] * 100:.2f}%, text query (training names) {text['mean_iou'] * 100:.2f}%"
          + (f", text query (other names) {results['text_query_other_names']['mean_iou'] * 100:.2f}%"
             if "text_query_other_names" in results else "") + f"; wrote {out / 'RESULTS.md'}")
    return results


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{v * 100:.2f}"


def _report(results: dict, argv: list[str], show: list[str], figure: bool) -> str:
    classes = results["classes"]
    columns = [("student head", results["student_head"]), ("text query, training names",
                                                           results["text_query_training_names"])]
    if "text_query_other_names" in results:
        columns.append((f"text query, {len(results['query_names'])} other names",
                        results["text_query_other_names"]))
    lines = [f"# Text-query segmentation: {results['model']}", "",
             f"{results['dataset']} validation, {results['num_images']} images; text head on student feature "
             f"`{results['feature']}`, tau {results['tau']:g}. mIoU (%), logits upsampled to the labels:", "",
             "| class | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for i, name in enumerate(classes):
        lines.append(f"| {name} | " + " | ".join(_pct(m["per_category_iou"][i]) for _, m in columns) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_pct(m['mean_iou'])}**" for _, m in columns) + " |")
    lines.append("| pixel accuracy | " + " | ".join(_pct(m["overall_accuracy"]) for _, m in columns) + " |")
    if "query_pixels_by_class" in results:
        lines += ["", "Where each query name wins (share of the validation pixels it takes, and the ground-truth "
                  "classes of those pixels):", "", "| query name | assigned to | pixels (%) | ground truth of its pixels |",
                  "|---|---|---:|---|"]
        total = sum(sum(row.values()) for row in results["query_pixels_by_class"].values()) or 1
        for name, row in results["query_pixels_by_class"].items():
            n = sum(row.values())
            top = sorted(row.items(), key=lambda kv: -kv[1])[:3]
            where = ", ".join(f"{c} {v / n * 100:.0f}%" for c, v in top if v) if n else "-"
            lines.append(f"| {name} | {results['query_name_to_class'][name]} | {n / total * 100:.2f} | {where} |")
    if figure:
        lines += ["", "![text query](text_query.png)", "",
                  "Columns: image, ground truth, the student's own prediction, the text-query prediction over the "
                  "query vocabulary (with a mapping, each name in the colour of its training class), then heat maps "
                  "of " + ", ".join(f"'{n}'" for n in show) + ": the name's cosine similarity with each pixel's "
                  "projected feature, min-max scaled per image (titles: the name's largest softmax probability "
                  "within the vocabulary)."]
    lines += ["", "Command:", "", "```", "c2vkd-text-query " + " ".join(
        f'"{a}"' if (" " in a or "," in a) else a for a in argv), "```", ""]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """The ``c2vkd-text-query`` command: :func:`main`, with one-line errors and exit codes
    (:func:`~c2vkd_hf.jobs.run_script`)."""
    return run_script(main, argv, user_errors=(OSError,))  # OSError: unreadable model folder or image


if __name__ == "__main__":
    sys.exit(run())
