"""Data sources: local image/mask folders (or a SegNet/CamVid layout), ``datasets`` (Hub or disk), synthetic scenes.

Sources, in order of precedence (:func:`load_segmentation_data`):

1. local folders ``--train_images/--train_labels/--validation_images/--validation_labels``
   (image and mask paired by relative path without extension) with a ``--labels_file``;
   a ``--dataset_name`` folder in the SegNet/CamVid layout (``train/``, ``trainannot/``, ``val/``,
   ``valannot/``, ``classes.json``) is read the same way;
2. ``--dataset_name`` other than ``synthetic``: a ``datasets.load_from_disk`` folder or anything
   ``datasets.load_dataset`` accepts (Hub id, local parquet/imagefolder...);
3. the built-in procedural street scenes (:func:`~c2vkd_hf.data.synthetic.make_synthetic_dataset`).

Label values are mapped once, when the data is loaded (:mod:`c2vkd_hf.data.labels`); after mapping
every value must lie in ``[0, K)`` or be 255; this and the readability of every file is checked
(:mod:`c2vkd_hf.data.checks`) before any training starts, and any problem raises
:class:`DataValidationError` naming the file. Images stay on disk and are decoded lazily; masks whose
values change are re-encoded (PNG) in memory with their original path kept (read it with
:func:`source_paths`).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import datasets

from ..config import DataArguments
from .base import DataValidationError, SegmentationData
from .checks import check_pair, raise_collected
from .labels import LabelMapping, load_labels_file, resolve_ignore
from .synthetic import load_synthetic

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_MAX_LISTED = 5  # how many file names an error message lists


def _scan_folder(folder: Optional[str], role: str) -> dict[str, Path]:
    """Image files under ``folder`` (recursive), keyed by relative path without extension."""
    if not folder:
        raise DataValidationError(f"--{role} is required when reading local folders")
    root = Path(folder)
    if not root.exists():
        raise DataValidationError(f"{role} folder {root} does not exist")
    if not root.is_dir():
        raise DataValidationError(f"{role} {root} is not a folder")
    found: dict[str, Path] = {}
    duplicates = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(p.startswith(".") for p in rel.parts):
            continue
        if not path.is_file():
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            duplicates.append(f"{found[key].name} / {path.name}")
        found[key] = path
    if duplicates:
        raise DataValidationError(
            f"{role} folder {root} has several files with the same name stem: {', '.join(duplicates[:_MAX_LISTED])}"
        )
    if not found:
        raise DataValidationError(
            f"{role} folder {root} is empty: no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return found


def _pair_folders(images_dir: Optional[str], labels_dir: Optional[str], split: str) -> list[tuple[Path, Path]]:
    images = _scan_folder(images_dir, f"{split}_images")
    labels = _scan_folder(labels_dir, f"{split}_labels")
    no_mask = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_mask or no_image:
        lines = []
        if no_mask:
            names = ", ".join(images[k].name for k in no_mask[:_MAX_LISTED])
            lines.append(f"{len(no_mask)} images in {images_dir} have no mask in {labels_dir}: {names}"
                         + (" ..." if len(no_mask) > _MAX_LISTED else ""))
        if no_image:
            names = ", ".join(labels[k].name for k in no_image[:_MAX_LISTED])
            lines.append(f"{len(no_image)} masks in {labels_dir} have no image in {images_dir}: {names}"
                         + (" ..." if len(no_image) > _MAX_LISTED else ""))
        raise DataValidationError(
            f"unpaired {split} files (image and mask are paired by file name without extension):\n  "
            + "\n  ".join(lines)
        )
    return [(images[k], labels[k]) for k in sorted(images)]


def split_by_pattern(pairs: list[tuple[Path, Path]], pattern: str) -> tuple[list, list]:
    """``(kept, held_out)``: the (image, mask) pairs whose image file name does not / does match the
    glob ``pattern`` (e.g. ``0006R0_*``: every frame of one CamVid sequence)."""
    held = [pair for pair in pairs if fnmatch.fnmatch(pair[0].name, pattern)]
    return [pair for pair in pairs if not fnmatch.fnmatch(pair[0].name, pattern)], held


def _folder_split(
    pairs: list[tuple[Path, Path]], split: str, mapping: LabelMapping, limit: Optional[int]
) -> datasets.Dataset:
    if limit is not None:
        pairs = pairs[: max(0, limit)]
    if not pairs:
        raise DataValidationError(f"{split} split is empty (max samples {limit})")
    start = time.perf_counter()
    problems: list[str] = []
    label_entries = []
    for image_path, label_path in pairs:
        try:
            new_bytes = check_pair(str(image_path), str(label_path), str(image_path), str(label_path), mapping)
        except DataValidationError as e:
            problems.append(str(e))
            new_bytes = None
        label_entries.append({"bytes": new_bytes, "path": str(label_path)})
    raise_collected(problems, split, len(pairs))
    logger.info("validated %d %s image/mask pairs in %.1fs", len(pairs), split, time.perf_counter() - start)
    features = datasets.Features(
        {
            "image": datasets.Value("string"),
            "label": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p, _ in pairs], "label": label_entries}, features=features, split=split
    )
    return ds.cast_column("image", datasets.Image(mode="RGB")).cast_column("label", datasets.Image())


def segnet_layout(root: Path) -> Optional[dict[str, str]]:
    """Folders of the SegNet/CamVid layout under ``root`` (train/ + trainannot/, val/ + valannot/)."""
    if not (root / "train").is_dir() or not (root / "trainannot").is_dir():
        return None
    for val in ("val", "validation", "valid"):
        if (root / val).is_dir() and (root / f"{val}annot").is_dir():
            break
    else:
        return None
    layout = {
        "train_images": str(root / "train"),
        "train_labels": str(root / "trainannot"),
        "validation_images": str(root / val),
        "validation_labels": str(root / f"{val}annot"),
    }
    for name in ("classes.json", "id2label.json"):
        if (root / name).is_file():
            layout["labels_file"] = str(root / name)
            break
    return layout


def _load_folders(args: DataArguments, folders: dict[str, Optional[str]]) -> SegmentationData:
    if not folders.get("validation_images"):
        raise DataValidationError("--validation_images (and --validation_labels) are required with --train_images")
    if not folders.get("labels_file"):
        raise DataValidationError(
            "--labels_file is required with local folders (JSON list of class names, or an object with "
            "'classes' and optional 'ignore_index')"
        )
    id2label, file_ignore, palette = load_labels_file(folders["labels_file"])
    void = resolve_ignore(args, file_ignore)
    mapping = LabelMapping(len(id2label), void, args.reduce_labels)
    train_pairs = _pair_folders(folders["train_images"], folders.get("train_labels"), "train")
    if args.selection_holdout:
        # a selection split: held-out training images replace the validation split
        train_pairs, eval_pairs = split_by_pattern(train_pairs, args.selection_holdout)
        if not eval_pairs or not train_pairs:
            raise DataValidationError(
                f"--selection_holdout {args.selection_holdout!r} matches {len(eval_pairs)} of the "
                f"{len(train_pairs) + len(eval_pairs)} training images: it must hold out some, not all")
        logger.warning("Selection split: %d training images matching %r are held out for evaluation (the "
                       "validation split is not used); %d remain for training.", len(eval_pairs),
                       args.selection_holdout, len(train_pairs))
    else:
        eval_pairs = _pair_folders(folders["validation_images"], folders.get("validation_labels"), "validation")
    train = _folder_split(train_pairs, "train", mapping, args.max_train_samples)
    validation = _folder_split(eval_pairs, "validation", mapping, args.max_eval_samples)
    name = Path(folders["train_images"]).resolve().parent.name
    total = None
    if args.max_eval_samples is not None:
        total = len(_pair_folders(folders["validation_images"], folders.get("validation_labels"), "validation"))
    return SegmentationData(train, validation, id2label, name, palette, void, args.reduce_labels, total)


def _is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _find_class_label(features: datasets.Features, prefer: str) -> Optional[list[str]]:
    found: list[tuple[str, list[str]]] = []

    def visit(name, feature):
        if isinstance(feature, datasets.ClassLabel):
            found.append((name, list(feature.names)))
        elif isinstance(feature, dict):
            for k, v in feature.items():
                visit(k, v)
        elif isinstance(feature, (list, tuple)):
            for v in feature:
                visit(name, v)
        elif hasattr(feature, "feature"):  # Sequence / List
            visit(name, feature.feature)

    for name, feature in features.items():
        visit(name, feature)
    for name, names in found:
        if name == prefer:
            return names
    return found[0][1] if found else None


def _hub_id2label(
    args: DataArguments, dataset: datasets.DatasetDict
) -> tuple[dict[int, str], Optional[int], Optional[list]]:
    if args.labels_file:
        return load_labels_file(args.labels_file)
    first = next(iter(dataset.values()))
    names = _find_class_label(first.features, args.label_column)
    if names:
        return dict(enumerate(names)), None, None
    local = Path(args.dataset_name)
    if local.is_dir():
        for candidate in (local / "id2label.json", local.parent / "id2label.json", local / "classes.json"):
            if candidate.is_file():
                return load_labels_file(candidate)
    else:
        try:  # Hub segmentation datasets often ship id2label.json at the repo root
            from huggingface_hub import hf_hub_download

            return load_labels_file(hf_hub_download(args.dataset_name, "id2label.json", repo_type="dataset"))
        except Exception as e:  # noqa: BLE001 - offline, missing file, ...
            logger.info("no id2label.json for %s on the Hub (%s)", args.dataset_name, e)
    raise DataValidationError(
        f"cannot tell the class names of dataset {args.dataset_name}: it has no ClassLabel feature and no "
        "id2label.json; pass --labels_file"
    )


def _pick_split(dataset: datasets.DatasetDict, wanted: str, aliases: Sequence[str], name: str) -> str:
    for split in (wanted, *aliases):
        if split in dataset:
            return split
    raise DataValidationError(
        f"dataset {name} has no split '{wanted}' (available: {', '.join(dataset)}); set --train_split / "
        "--validation_split"
    )


def _hub_split(
    ds: datasets.Dataset, split: str, mapping: LabelMapping, limit: Optional[int], name: str
) -> datasets.Dataset:
    if limit is not None:
        ds = ds.select(range(min(max(0, limit), len(ds))))
    if len(ds) == 0:
        raise DataValidationError(f"split '{split}' of dataset {name} is empty")
    for column in ("image", "label"):
        if not isinstance(ds.features[column], datasets.Image):
            raise DataValidationError(
                f"dataset {name}, split '{split}': column '{column}' must be an Image feature, got "
                f"{ds.features[column]!r}"
            )
    raw = ds.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    start = time.perf_counter()
    problems: list[str] = []
    new_labels: list[dict] = []
    changed = False
    for i, row in enumerate(raw):
        where = f"dataset {name}, split '{split}', row {i}"
        image, label = row["image"], row["label"]
        image_src = image["bytes"] if image["bytes"] is not None else image["path"]
        label_src = label["bytes"] if label["bytes"] is not None else label["path"]
        try:
            new_bytes = check_pair(
                image_src,
                label_src,
                f"{where} (image {image['path']})" if image["path"] else f"{where} (image)",
                f"{where} (mask {label['path']})" if label["path"] else f"{where} (mask)",
                mapping,
            )
        except DataValidationError as e:
            problems.append(str(e))
            new_bytes = None
        changed |= new_bytes is not None
        new_labels.append({"bytes": new_bytes if new_bytes is not None else label["bytes"], "path": label["path"]})
    raise_collected(problems, split, len(ds))
    logger.info("validated %d rows of split %s in %.1fs", len(ds), split, time.perf_counter() - start)
    if changed:
        ds = ds.remove_columns("label").add_column("label", new_labels, feature=datasets.Image())
    return ds.cast_column("image", datasets.Image(mode="RGB"))


def _cached_dataset_snapshot(repo_id: str) -> Optional[str]:
    """The folder of dataset repository ``repo_id`` in huggingface_hub's cache (``refs/main``), or ``None``."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, not a repository id, ...
        return None


def _load_hub(args: DataArguments) -> SegmentationData:
    path = Path(args.dataset_name)
    if _is_saved_to_disk(path):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.Dataset):
            raise DataValidationError(
                f"{path} holds a single dataset without splits; save a DatasetDict with "
                f"'{args.train_split}' and '{args.validation_split}' splits"
            )
    else:
        try:
            dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        except FileNotFoundError as e:
            raise DataValidationError(f"dataset {args.dataset_name} not found: {e}") from None
        except ConnectionError as e:
            # offline (HF_HUB_OFFLINE=1) or the Hub unreachable: datasets only looks in its own Arrow cache, not
            # in huggingface_hub's cache, where `hf download --repo-type dataset` puts the repository
            snapshot = _cached_dataset_snapshot(args.dataset_name)
            if snapshot is None:
                raise DataValidationError(
                    f"dataset {args.dataset_name}: {e}, and it is not in the Hugging Face cache (download it "
                    f"first: hf download --repo-type dataset {args.dataset_name})") from None
            logger.warning("%s; using its copy in the Hugging Face cache, %s", e, snapshot)
            dataset = datasets.load_dataset(snapshot, args.dataset_config_name)
    name = path.resolve().name if path.exists() else args.dataset_name

    id2label, file_ignore, palette = _hub_id2label(args, dataset)
    void = resolve_ignore(args, file_ignore)
    mapping = LabelMapping(len(id2label), void, args.reduce_labels)
    train_split = _pick_split(dataset, args.train_split, (), name)
    val_aliases = ("val", "valid") if args.validation_split == "validation" else ()
    val_split = _pick_split(dataset, args.validation_split, val_aliases, name)

    splits = {}
    for split, limit in ((train_split, args.max_train_samples), (val_split, args.max_eval_samples)):
        ds = dataset[split]
        for column in (args.image_column, args.label_column):
            if column not in ds.column_names:
                raise DataValidationError(
                    f"dataset {name}, split '{split}' has no column '{column}' "
                    f"(columns: {', '.join(ds.column_names)}); set --image_column / --label_column"
                )
        ds = ds.select_columns([args.image_column, args.label_column])
        renames = {old: new for old, new in ((args.image_column, "image"), (args.label_column, "label")) if old != new}
        if renames:
            ds = ds.rename_columns(renames)
        splits[split] = _hub_split(ds, split, mapping, limit, name)
    return SegmentationData(splits[train_split], splits[val_split], id2label, name, palette, void, args.reduce_labels,
                            len(dataset[val_split]))


def load_segmentation_data(args: DataArguments) -> SegmentationData:
    """Load, map and validate the data described by ``args`` (see the module docstring).

    Raises :class:`DataValidationError` before any training if a file is unreadable, an image and
    its mask differ in size, files are unpaired, a split is empty, or a label value is not a class
    index in ``[0, K)`` or 255 after mapping.
    """
    if args.train_images or args.train_labels or args.validation_images or args.validation_labels:
        if not args.train_images:
            raise DataValidationError("--train_images is required with --train_labels/--validation_images")
        folders = {
            "train_images": args.train_images,
            "train_labels": args.train_labels,
            "validation_images": args.validation_images,
            "validation_labels": args.validation_labels,
            "labels_file": args.labels_file,
        }
        return _load_folders(args, folders)
    if args.selection_holdout and args.dataset_name != "synthetic" and not Path(args.dataset_name).is_dir():
        raise DataValidationError("--selection_holdout selects training files by name: it needs local image/mask "
                                  "folders (--train_images or a SegNet-layout folder)")
    if args.dataset_name != "synthetic":
        root = Path(args.dataset_name)
        layout = segnet_layout(root) if root.is_dir() else None
        if layout is not None:
            if args.labels_file:
                layout["labels_file"] = args.labels_file
            return _load_folders(args, layout)
        return _load_hub(args)
    if args.selection_holdout:
        raise DataValidationError("--selection_holdout selects training files by name: it needs local image/mask "
                                  "folders (--train_images or a SegNet-layout folder)")
    return load_synthetic(args)


def source_paths(dataset: datasets.Dataset, index: int) -> tuple[Optional[str], Optional[str]]:
    """The original (image, mask) file paths of row ``index`` (``None`` for in-memory data)."""
    row = dataset.with_format("arrow")[int(index)]  # raw storage: no decoding, no cast of the whole table
    return row.column("image")[0].as_py()["path"], row.column("label")[0].as_py()["path"]
