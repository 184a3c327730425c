"""The jobs behind the scripts, top to bottom: train a teacher, distil a student, evaluate a model.

``scripts/train_teacher.py``, ``scripts/distill.py``, ``scripts/evaluate.py`` and
``scripts/benchmark.py`` are thin wrappers around these functions, so that the offline default job
(which trains its own teacher first, then a no-teacher baseline, then the student) and the
benchmark share one code path with what users run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import timm
import torch
import yaml
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, TrainingArguments, set_seed

from .config import IGNORE_INDEX, METHODS, DataArguments, DistillationArguments
from .data import (AugmentationEpochCallback, SegmentationData, build_transform, collate_fn, default_palette,
                   load_segmentation_data, with_example_index)
from .data.decoded import decoded_datasets
from .losses import get_loss
from .metrics import StreamingMeanIoU, make_compute_metrics
from .models import (
    DECODER_FEATURE,
    SEGFORMER_SIZES,
    TORCHVISION_ARCHS,
    build_teacher,
    default_feature_pair,
    feature_channels,
    image_mean_std,
    load_student,
    load_teacher,
    parse_torchvision_name,
    student_image_processor,
)
from .losses.schedule import parse_schedules
from .runs import check_previous_run, run_config, write_run_config
from .text_head import TextHead
from .trainer import (
    DistillationModel,
    DistillationTrainer,
    FoldTextHeadCallback,
    LossScheduleCallback,
    SafeCheckpointTrainer,
    NonFiniteLossError,
    TeacherTrainer,
    TextHeadFoldError,
    checkpoint_problems,
    last_complete_checkpoint,
    parse_feature_pairs,
)
from .validation import UserInputError, check_input_sizes, check_output_dir, is_write_failure, save_errors

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TEACHER_RESULTS_NAME = "teacher_results.json"


#: Exit codes of the scripts: bad input (flags, files, data) and a loss that became NaN/inf.
EXIT_USER_ERROR = 2
EXIT_NON_FINITE_LOSS = 3


def run_script(main, argv: Optional[list[str]] = None, user_errors: tuple = ()) -> int:
    """Runs a script's ``main(argv)`` and returns its exit code: 0; :data:`EXIT_USER_ERROR` for a
    :class:`UserInputError`, :class:`~c2vkd_hf.data.DataValidationError`, ``FileNotFoundError``, a
    write that failed because of the machine (full disk, read-only, permissions) or one of
    ``user_errors``; :data:`EXIT_NON_FINITE_LOSS` when training stopped on a NaN/inf loss (the last
    complete checkpoint is kept). These print one ``error: ...`` paragraph on stderr, no traceback
    (under ``accelerate launch``/``torchrun`` too: the process exits with the code); any other
    exception is a bug and propagates with its traceback."""
    from .data import DataValidationError

    try:
        main(argv)
    except (UserInputError, DataValidationError, FileNotFoundError, *user_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    except OSError as error:
        if not is_write_failure(error):
            raise
        print(f"error: could not write {error.filename or 'a file'} ({error.strerror}).", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def config_file_arguments(argv: list[str]) -> Optional[dict]:
    """When ``argv`` is a single ``.json``/``.yaml``/``.yml`` path (the scripts' config-file form),
    its mapping of flag names to values; else ``None``. A missing, unparsable or non-mapping file
    is a :class:`UserInputError`."""
    if len(argv) != 1 or not argv[0].endswith((".json", ".yaml", ".yml")):
        return None
    path = Path(argv[0])
    if not path.is_file():
        raise UserInputError(f"Config file {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, ValueError) as error:
        raise UserInputError(f"Config file {path}: {error}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"Config file {path}: expected a mapping of flag names to values")
    return config


def saved_data_arguments(model_dir, argv: list[str], data_args: DataArguments,
                         say=logger.info) -> DataArguments:
    """``data_args`` when ``argv`` sets a data flag; else the data configuration saved in the
    ``results.json`` that ``distill.py`` writes in ``model_dir`` (so a trained model is evaluated on
    the data it was trained for without repeating the flags). Neither: a :class:`UserInputError`
    asking for the data (never a silent evaluation on the built-in synthetic scenes)."""
    saved = Path(model_dir) / RESULTS_NAME
    names = {f.name for f in dataclasses.fields(DataArguments)}
    given = any(a.startswith("--") and a[2:].split("=")[0] in names for a in argv)
    if given:
        return data_args
    if not saved.is_file():
        raise UserInputError(f"{model_dir} has no {RESULTS_NAME} to take the data configuration from: give the data "
                             f"flags (--train_images/--train_labels/--validation_images/--validation_labels/"
                             f"--labels_file, or --dataset_name; --dataset_name synthetic for the built-in scenes).")
    say(f"Using the data configuration saved in {saved}.")
    return DataArguments(**json.loads(saved.read_text())["config"]["data"])


# ------------------------------------------------------------------------------------------ checks
def validate_distillation_args(args: DistillationArguments) -> None:
    """Rejects unknown methods, invalid weights/temperatures, malformed flags and missing local files
    before anything is loaded."""
    if args.method not in METHODS:
        raise UserInputError(f"--method '{args.method}' is unknown; choose one of {', '.join(METHODS)}.")
    for name in ("ce_weight", "pdd_weight", "glob_weight", "rel_weight", "ling_weight", "stage_weight", "kd_weight",
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
    try:
        parse_feature_pairs(args.feature_pairs)
        stage_pairs = parse_feature_pairs(args.stage_pairs)
        parse_schedules(args.weight_schedules)
    except ValueError as error:
        raise UserInputError(f"{error}") from None
    if args.stage_weight > 0 and not stage_pairs:
        raise UserInputError("--stage_weight needs --stage_pairs (e.g. stage1:stage1,stage2:stage2,stage3:stage3,"
                             "stage4:stage4).")
    if (args.stage_weight > 0 or stage_pairs) and args.method != "c2vkd":
        raise UserInputError(f"--stage_pairs/--stage_weight are C2VKD's stage guidance; --method {args.method} "
                             "does not use them.")
    student_config_overrides(args)
    check_teacher_name("--teacher_name_or_path", args.teacher_name_or_path)
    check_local_path("--student_name_or_path", args.student_name_or_path)
    if args.text_embeddings and not Path(args.text_embeddings).is_file():
        raise UserInputError(f"--text_embeddings {args.text_embeddings} does not exist.")
    if args.teacher_cache and args.method == "none":
        raise UserInputError("--teacher_cache caches a teacher's outputs, but --method none uses no teacher.")
    if args.teacher_cache_top_k is not None and args.teacher_cache_top_k < 1:
        raise UserInputError(f"--teacher_cache_top_k must be >= 1, got {args.teacher_cache_top_k}.")
    if args.teacher_cache and Path(args.teacher_cache).exists() and not Path(args.teacher_cache).is_dir():
        raise UserInputError(f"--teacher_cache {args.teacher_cache} is a file; it must be a folder.")


def student_config_overrides(args: DistillationArguments) -> Optional[dict]:
    """``--student_config_overrides`` parsed (a JSON object), or ``None``."""
    if not args.student_config_overrides:
        return None
    try:
        overrides = json.loads(args.student_config_overrides)
    except ValueError as error:
        raise UserInputError(f"--student_config_overrides is not valid JSON ({error}).") from None
    if not isinstance(overrides, dict):
        raise UserInputError("--student_config_overrides must be a JSON object of config fields.")
    return overrides


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


def student_head_note(name_or_path: str, id2label: dict[int, str], trust_remote_code: bool = False) -> Optional[str]:
    """A sentence saying that a pretrained student's classification layer is re-initialised for the
    dataset's classes (its checkpoint predicts another number of classes), else ``None``."""
    if name_or_path.lower() in SEGFORMER_SIZES and not os.path.isdir(name_or_path):
        return None  # a named size (segformer-b0): randomly initialised anyway
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if getattr(config, "num_labels", len(id2label)) == len(id2label):
        return None
    return (f"The student {name_or_path} predicts {config.num_labels} classes: its classification layer was "
            f"re-initialised for the dataset's {len(id2label)} classes; the other weights were kept.")


@contextlib.contextmanager
def user_errors(what: str):
    """Turns the loaders' errors about the user's input (ValueError, OSError, and unreadable
    pickle/safetensors files) into one :class:`UserInputError` that starts with ``what``."""
    try:
        yield
    except (ValueError, OSError) as error:
        message = str(error)
        raise UserInputError(message if what.split()[0] in message else f"{what}: {message}") from None
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) refused the file; never suggest weights_only=False (runs pickled code)
        raise UserInputError(f"{what}: a file is corrupt, or is a pickle holding more than tensors, which is never "
                             f"loaded (only safetensors and torch.load(weights_only=True) are used).") from None
    except SafetensorError as error:
        raise UserInputError(f"{what}: a safetensors file is corrupt or truncated ({error}).") from None


def check_local_path(flag: str, name: Optional[str]) -> None:
    """A value that can only be a local path (absolute, ``./``, ``../``, ``~`` or more than one ``/``,
    unlike a Hub id ``org/name``) must exist."""
    if name and (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1):
        if not Path(name).expanduser().exists():
            raise UserInputError(f"{flag} {name} does not exist (it is a local path, not a Hub id).")


def check_teacher_name(flag: str, name: Optional[str]) -> None:
    """A teacher name: ``torchvision:ARCH[:CHECKPOINT]`` must name a known ARCH and, when given, an
    existing CHECKPOINT file; anything else goes through :func:`check_local_path`."""
    parsed = parse_torchvision_name(name) if name else None
    if parsed is None:
        check_local_path(flag, name)
        return
    arch, checkpoint = parsed
    if arch.strip() not in TORCHVISION_ARCHS:
        raise UserInputError(f"{flag} {name}: unknown torchvision segmentation architecture {arch!r}; use "
                             f"torchvision:ARCH[:CHECKPOINT] with ARCH one of {', '.join(TORCHVISION_ARCHS)}.")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise UserInputError(f"{flag} {name}: the checkpoint file {checkpoint} does not exist "
                             f"(torchvision:ARCH:CHECKPOINT takes a local .pth/.safetensors state-dict file).")


# ------------------------------------------------------------------------------------------ helpers
def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _datasets_for(data: SegmentationData, data_args: DataArguments, mean, std, seed: Optional[int] = None,
                  with_views: bool = False):
    """Transformed train and validation datasets, and the callbacks the train transform needs.

    With ``seed`` the training augmentation of each example is a function of (seed, epoch, example
    index), so an interrupted run resumes with exactly the same augmented batches. ``with_views``:
    training batches also carry each example's ``example_index`` and ``geometry`` (what a teacher
    cache replays). With the decoded-dataset cache (``--decoded_cache``, :mod:`c2vkd_hf.data.decoded`) both
    splits are read from memory-mapped decoded arrays, with the same geometries."""
    transform = build_transform(data_args, mean, std, train=True, seed=seed)
    transform.return_index = transform.return_geometry = with_views
    indexed = seed is not None or with_views
    eval_transform = build_transform(data_args, mean, std, train=False)
    decoded = decoded_datasets(data, data_args, transform, eval_transform, indexed)  # None: --decoded_cache false
    if decoded is not None:
        train, validation = decoded
    else:
        train = (with_example_index(data.train) if indexed else data.train).with_transform(transform)
        validation = data.validation.with_transform(eval_transform)
    callbacks = [AugmentationEpochCallback(transform)] if seed is not None else []
    return train, validation, callbacks


def prepare_training_args(training_args: TrainingArguments) -> TrainingArguments:
    """Forces what segmentation training with our data pipeline needs. A ``--hub_token`` is moved
    into this process's ``HF_TOKEN`` environment variable (which ``huggingface_hub`` reads), so that
    nothing that saves or prints the arguments (``training_args.bin``, ``results.json``, logs) can
    contain it."""
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None
    training_args.remove_unused_columns = False  # the transforms need the raw image/label columns
    training_args.batch_eval_metrics = True  # stream the confusion matrix; keep no predictions
    training_args.label_names = ["labels"]
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinned memory needs an accelerator (else a warning per run)
    steps = training_args.max_steps
    if steps and steps > 0 and training_args.warmup_steps >= max(steps, 1):
        # a warm-up as long as the run leaves the polynomial schedule nothing to decay (division by zero)
        training_args.warmup_steps = steps // 10
    return training_args


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` pixels, the last window flush with the end."""
    if window >= length:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


@torch.no_grad()
def sliding_window_logits(model: nn.Module, pixel_values: torch.Tensor, window: tuple[int, int],
                          stride: Optional[tuple[int, int]] = None, *, max_batch: int = 8) -> torch.Tensor:
    """Logits of ``model`` over (B, C, H, W) images from overlapping ``window`` = (h, w) crops.

    Offsets every ``stride`` (default: 2/3 of the window) with the last window flush with the image
    border; a window larger than the image is clamped to it. Each crop's logits are upsampled
    (bilinear) to the crop and averaged where crops overlap, giving (B, K, H, W). When one window
    covers the whole image this is exactly ``model(pixel_values).logits`` (at the model's own output
    resolution). Crops of all images are batched, at most ``max(max_batch, B)`` images per forward.
    """
    height, width = pixel_values.shape[-2:]
    wh, ww = min(int(window[0]), height), min(int(window[1]), width)
    if (wh, ww) == (height, width):
        return model(pixel_values=pixel_values).logits
    sh, sw = stride if stride is not None else (max(1, 2 * wh // 3), max(1, 2 * ww // 3))
    if sh < 1 or sw < 1:
        raise ValueError(f"the sliding-window stride must be positive, got {(sh, sw)}")
    offsets = [(y, x) for y in _window_starts(height, wh, int(sh)) for x in _window_starts(width, ww, int(sw))]
    batch = pixel_values.shape[0]
    per_call = max(1, max_batch // batch)
    total = count = None
    for first in range(0, len(offsets), per_call):
        group = offsets[first:first + per_call]
        crops = torch.cat([pixel_values[..., y:y + wh, x:x + ww] for y, x in group])
        logits = model(pixel_values=crops).logits.float()
        logits = nn.functional.interpolate(logits, size=(wh, ww), mode="bilinear", align_corners=False)
        if total is None:
            total = logits.new_zeros(batch, logits.shape[1], height, width)
            count = logits.new_zeros(1, 1, height, width)
        for (y, x), part in zip(group, logits.split(batch)):
            total[..., y:y + wh, x:x + ww] += part
            count[..., y:y + wh, x:x + ww] += 1
    return total / count


@torch.no_grad()
def segmentation_scores(model: nn.Module, pixel_values: torch.Tensor, *, output_size: Optional[tuple] = None,
                        scales: tuple = (1.0,), flip: bool = False, window: Optional[tuple[int, int]] = None,
                        stride: Optional[tuple[int, int]] = None, max_batch: int = 8) -> torch.Tensor:
    """(B, K, H', W') class scores of ``model`` on normalised images, resized (bilinear) to
    ``output_size`` (default: the image size); their argmax is the prediction.

    * one view (``scales == (1.0,)``, no ``flip``): the logits, from the whole image or from
      :func:`sliding_window_logits` when ``window`` is set; without a window this is exactly the plain
      ``model(pixel_values).logits`` upsampled.
    * several views (multi-scale and/or horizontal flip test-time augmentation): the image is resized
      by each scale (bilinear), optionally flipped, segmented (whole or sliding window at that scale),
      flipped back, resized to ``output_size``; the returned scores are the mean softmax
      probability over the views.
    """
    scales = tuple(float(s) for s in scales) or (1.0,)
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    height, width = pixel_values.shape[-2:]
    size = tuple(int(v) for v in (output_size or (height, width)))

    def view(images: torch.Tensor) -> torch.Tensor:
        if window is not None:
            logits = sliding_window_logits(model, images, window, stride, max_batch=max_batch)
        else:
            logits = model(pixel_values=images).logits
        logits = logits.float()
        if tuple(logits.shape[-2:]) != size:
            logits = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    if scales == (1.0,) and not flip:
        return view(pixel_values)
    probs = None
    for scale in scales:
        scaled = pixel_values
        if scale != 1.0:
            scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = nn.functional.interpolate(pixel_values, size=scaled_size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = view(scaled.flip(-1)) if flipped else view(scaled)
            if flipped:
                logits = logits.flip(-1)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
    return probs / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, num_labels: int, *, batch_size: int = 8,
                   model_mean_std: Optional[tuple] = None, data_mean_std: Optional[tuple] = None,
                   progress: bool = True, scales: tuple = (1.0,), flip: bool = False,
                   window: Optional[tuple[int, int]] = None, stride: Optional[tuple[int, int]] = None,
                   accelerator=None, predictions_dir: Optional[str] = None, palette=None,
                   max_predictions: Optional[int] = None, desc: str = "evaluating") -> dict[str, Any]:
    """mIoU of ``model`` on a transformed dataset (``pixel_values``/``labels``), predictions at the label
    size. Re-normalises inputs when the model's mean/std differ from the data's.

    By default the logits are upsampled bilinearly to the labels and arg-maxed. ``scales``/``flip``
    (multi-scale + horizontal-flip test-time augmentation) and ``window``/``stride`` (sliding-window
    inference for images larger than the training crops) are those of :func:`segmentation_scores`.

    ``accelerator`` (an ``accelerate.Accelerator``): each process evaluates every
    ``num_processes``-th image (no padding, so no image counts twice) on ``accelerator.device`` and the
    confusion matrices are summed across processes (:meth:`StreamingMeanIoU.reduce`); every process
    returns the same metrics. ``predictions_dir``: colourised predictions (``palette``, default
    :func:`default_palette`) saved as ``<dataset index>.png``, for the first ``max_predictions`` images
    (all when ``None``). ``desc`` labels the progress bar.
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from .data import colorize
    from .models import renormalize

    model.eval()
    device = next(model.parameters()).device
    indices = list(range(len(dataset)))
    if accelerator is not None:
        device = accelerator.device
        model.to(device)
        indices = indices[accelerator.process_index::accelerator.num_processes]
        progress = progress and accelerator.is_local_main_process
    if predictions_dir is not None:
        os.makedirs(predictions_dir, exist_ok=True)
        palette = palette or default_palette(num_labels)
    metric = StreamingMeanIoU(num_labels, ignore_index=IGNORE_INDEX)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_fn)
    position = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        pixel_values = batch["pixel_values"].to(device)
        if model_mean_std is not None and data_mean_std is not None:
            pixel_values = renormalize(pixel_values, *data_mean_std, *model_mean_std)
        labels = batch["labels"].to(device)
        scores = segmentation_scores(model, pixel_values, output_size=labels.shape[-2:], scales=scales, flip=flip,
                                     window=window, stride=stride, max_batch=batch_size)
        preds = scores.argmax(1).cpu()
        metric.update(preds, labels.cpu())
        if predictions_dir is not None:
            for pred in preds:
                index = indices[position]
                position += 1
                if max_predictions is None or index < max_predictions:
                    colorize(pred, palette).save(os.path.join(predictions_dir, f"{index:05d}.png"))
    if accelerator is not None and accelerator.num_processes > 1:
        metric.reduce()
    return metric.compute()


def processor_size(data_args: DataArguments, data: SegmentationData) -> dict[str, int]:
    """The input size saved in the image processor: the evaluation resize, else the first validation image's."""
    if data_args.resize_height and data_args.resize_width:
        return {"height": data_args.resize_height, "width": data_args.resize_width}
    width, height = data.validation[0]["image"].size
    return {"height": height, "width": width}


def resume_checkpoint(training_args: TrainingArguments) -> Optional[str]:
    """The checkpoint to resume from: ``--resume_from_checkpoint`` when given (it must be a complete
    checkpoint, else :class:`UserInputError` says what is missing), otherwise the newest complete
    ``checkpoint-N`` in ``--output_dir`` (incomplete ones, left by a kill during a save, are skipped)."""
    require_optimizer = not training_args.save_only_model
    named = training_args.resume_from_checkpoint
    if named:
        problems = checkpoint_problems(named, require_optimizer=require_optimizer)
        if problems:
            raise UserInputError(f"--resume_from_checkpoint {named} is not a complete checkpoint: "
                                 f"{'; '.join(problems)}.")
        return named
    return last_complete_checkpoint(training_args.output_dir, require_optimizer=require_optimizer)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def previous_run(output_dir: Path, config: dict, training_args: TrainingArguments, *, results_name: str,
                 retrain: bool) -> Optional[dict]:
    """Before any work: ``output_dir`` must be a writable folder; then the saved results of a finished
    run of the same ``config`` (:func:`c2vkd_hf.runs.run_config`), or ``None`` to train; another
    configuration's run there is refused, and ``retrain`` deletes it first
    (:func:`c2vkd_hf.runs.check_previous_run`)."""
    check_output_dir(output_dir)
    with training_args.main_process_first(desc="output folder", local=False):
        results = check_previous_run(output_dir, config, results_name=results_name, retrain=retrain,
                                     saved_config=_saved_run_config)
    if results is not None:
        logger.warning("%s already holds this run, finished (%s): nothing to do. Pass --retrain to train it again.",
                       output_dir, results_name)
    return results


def _saved_run_config(results: dict) -> Optional[dict]:
    """The configuration of a finished run: its ``run_config``, or (older results files) the one made
    from its ``config`` dump."""
    if "run_config" in results:
        return results["run_config"]
    return run_config(results["config"]) if isinstance(results.get("config"), dict) else None


def train_evaluate_save(trainer: SafeCheckpointTrainer, training_args: TrainingArguments,
                        output_dir: Path, config: dict) -> dict[str, float]:
    """Trains (resuming from the last complete checkpoint), evaluates, saves; returns the metrics. A
    fresh run first records its ``config`` (``run_config.json``); a resumed one was checked against it
    (:func:`previous_run`), or, started by an earlier version without one, against the checkpoint's
    weights (``SafeCheckpointTrainer.train``)."""
    last = resume_checkpoint(training_args)
    if last:
        logger.warning("Resuming from %s", last)
    elif trainer.is_world_process_zero():
        with save_errors(output_dir):
            write_run_config(output_dir, config)
    trainer.train(resume_from_checkpoint=last)
    metrics = trainer.evaluate()
    with save_errors(output_dir):
        trainer.save_model(str(output_dir))
    return metrics


# ------------------------------------------------------------------------------------------ teacher
def train_teacher(data: SegmentationData, data_args: DataArguments, training_args: TrainingArguments, *,
                  arch: str = "upernet", backbone: str = "tf_efficientnet_lite0",
                  backbone_weights: Optional[str] = None, head_lr_multiplier: float = 5.0,
                  retrain: bool = False, phase: str = "teacher") -> dict[str, Any]:
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
    finished = previous_run(output_dir, config, training_args, results_name=TEACHER_RESULTS_NAME, retrain=retrain)
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
    train, validation, callbacks = _datasets_for(data, data_args, mean, std, seed=training_args.seed)
    backbone_params = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": training_args.learning_rate},
         {"params": head_params, "lr": training_args.learning_rate * head_lr_multiplier}],
        weight_decay=training_args.weight_decay)
    trainer = TeacherTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                      data_collator=collate_fn, compute_metrics=make_compute_metrics(len(data.id2label), IGNORE_INDEX,
                                                                                   data.id2label),
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
            _write_json(output_dir / TEACHER_RESULTS_NAME, results)
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


# ------------------------------------------------------------------------------------------ distil
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


def _default_teacher(data: SegmentationData, data_args: DataArguments, training_args: TrainingArguments,
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
    from .models import efficientnet_lite0_weights_path

    train_teacher(data, data_args, args, backbone_weights=efficientnet_lite0_weights_path())
    return str(folder)


def default_job_teacher(dist_args: DistillationArguments, data_args: DataArguments,
                        training_args: TrainingArguments, data: SegmentationData) -> Optional[str]:
    """The offline default job's teacher folder, trained first when missing (the job trains it before the
    no-teacher baseline, so that the console tells the phases in order); ``None`` when the run has no
    such teacher (:func:`needs_default_teacher`)."""
    if not needs_default_teacher(dist_args, data_args):
        return None
    return _default_teacher(data, data_args, training_args, default_teacher_folder(dist_args, training_args),
                            dist_args.default_teacher_steps, say=logger.debug)


def quiet_library_output() -> None:
    """Silences what transformers prints on every run and that tells a user nothing: the progress bars of
    saving and loading weights ("Writing model shards", "Loading weights"). huggingface_hub's download
    bars stay on."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars (also switches the Hub's off) ...
    enable_progress_bars()  # ... the Hub's download bars back on


def build_loss_module(args: DistillationArguments, *, student_channels: list[int], teacher_channels: list[int],
                      text_embeddings: Optional[torch.Tensor],
                      stage_channels: tuple[list[int], list[int]] = ([], []),
                      ling_projector: Optional[nn.Conv2d] = None) -> nn.Module:
    """The loss module of ``args.method`` with every constant from the flags. C2VKD: ``stage_channels``
    are the (student, teacher) channels of the stage-guidance pairs; ``ling_projector`` the text head's
    projector, which its linguistic term then trains."""
    common = {"ce_weight": args.ce_weight, "ignore_index": IGNORE_INDEX}
    if args.method == "none":
        return get_loss("none", **common)
    if args.method == "c2vkd":
        return get_loss(
            "c2vkd", **common, student_channels=student_channels or None, teacher_channels=teacher_channels or None,
            stage_student_channels=stage_channels[0] or None, stage_teacher_channels=stage_channels[1] or None,
            stage_weight=args.stage_weight, ling_projector=ling_projector,
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


def build_text_head(args: DistillationArguments, s_channels: dict[str, int], text_embeddings: Optional[torch.Tensor],
                    pairs: list[tuple[str, str]], id2label: dict[int, str]) -> Optional[TextHead]:
    """The student's text head (:mod:`c2vkd_hf.text_head`) on its ``decoder`` feature, or ``None``.

    ``--text_head`` unset: on for C2VKD when its linguistic term is on and reads the ``decoder``
    feature (the default pair), off for every other method. With C2VKD the head's projector is the
    linguistic term's, so the term trains the classifier the student ships with."""
    ling_on = args.method == "c2vkd" and args.ling_weight > 0 and text_embeddings is not None
    reads_decoder = bool(pairs) and pairs[-1][0] == DECODER_FEATURE
    wanted = (ling_on and reads_decoder) if args.text_head is None else args.text_head
    if not wanted:
        return None
    if ling_on and not reads_decoder:
        raise UserInputError(f"--text_head with C2VKD: its linguistic term trains the head, so the last --feature_pairs "
                             f"entry must read the student's '{DECODER_FEATURE}' feature (e.g. "
                             f"{DECODER_FEATURE}:{DECODER_FEATURE}); got {pairs}.")
    if DECODER_FEATURE not in s_channels:
        raise UserInputError("--text_head needs a student whose final classifier is a 1x1 convolution reading a "
                             f"'{DECODER_FEATURE}' feature (SegFormer, UperNet, BEiT, DPT do).")
    # whether it can be folded into the student's classifier is checked once, by DistillationModel
    return TextHead.create(s_channels[DECODER_FEATURE], text_embeddings, DECODER_FEATURE, args.ling_tau,
                           [id2label[i] for i in range(len(id2label))])


def distillation_text_embeddings(dist_args: DistillationArguments, id2label: dict[int, str], output_dir: Path,
                                 notes: list[str]) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The class-name text embeddings of C2VKD's linguistic term or of the text head (``--text_head``,
    any method) and their source (one line, for ``results.json`` and the card), or ``(None, None)`` when
    neither is asked for, or no embeddings are found (then a loud warning and a note for the card;
    ``--text_head true`` is refused).

    Sources, first found: ``--text_embeddings``, ``--clip_model``, the built-in CLIP vocabulary when it
    names every class (:mod:`c2vkd_hf.vocabulary`; the log says which names matched what)."""
    if not ((dist_args.method == "c2vkd" and dist_args.ling_weight > 0) or dist_args.text_head):
        return None, None
    from .text import resolve_text_embeddings
    from .vocabulary import closest_vocabulary

    class_names = [id2label[i] for i in range(len(id2label))]
    # fork_rng: computing embeddings (or finding them cached) must not change the models' initialisation
    with user_errors(f"--text_embeddings {dist_args.text_embeddings}" if dist_args.text_embeddings
                     else "text embeddings"), torch.random.fork_rng(devices=[]):
        resolved = resolve_text_embeddings(
            class_names, text_embeddings=dist_args.text_embeddings, clip_model=dist_args.clip_model,
            clip_pretrained=dist_args.clip_pretrained, templates=dist_args.prompt_templates,
            cache_dir=str(output_dir / "text_cache"))
    if resolved is None and dist_args.text_head:
        raise UserInputError("--text_head needs the class names' text embeddings, and the built-in CLIP vocabulary "
                             "does not name every class: give --text_embeddings FILE or --clip_model NAME "
                             "--clip_pretrained TAG_OR_CHECKPOINT.")
    if resolved is None:
        closest, missing = closest_vocabulary(class_names)
        logger.warning(
            "\n" + "!" * 100 + "\nC2VKD's linguistic term is OFF: no class-name text embeddings. The built-in CLIP "
            f"vocabulary does not name every class (closest: '{closest}', which lacks {', '.join(missing)}; see "
            "c2vkd_hf/vocabulary.py for its synonyms). Enable it with --text_embeddings FILE ([num_classes, dim] "
            ".pth/.safetensors/.npy) or --clip_model NAME --clip_pretrained TAG_OR_CHECKPOINT (needs CLIP "
            "weights).\n" + "!" * 100)
        notes.append("The linguistic (CLIP text) term of VLFD was off: no text embeddings were available.")
        return None, None
    logger.info("Class-name text embeddings: %s", resolved.source)
    check_class_agreement(id2label, text_embeddings=resolved.embeddings, text_source=resolved.source)
    return resolved.embeddings, resolved.source


@dataclasses.dataclass
class DistillationSetup:
    """Everything :func:`setup_distillation` built: the ready :class:`DistillationTrainer` and what the
    results and the model card report."""

    trainer: DistillationTrainer
    data: SegmentationData
    loss_module: nn.Module
    teacher: Optional[nn.Module]
    teacher_name: Optional[str]
    text_embeddings: Optional[torch.Tensor]
    notes: list[str]
    teacher_cache: Any = None
    text_source: Optional[str] = None


def setup_distillation(dist_args: DistillationArguments, data_args: DataArguments,
                       training_args: TrainingArguments, *, data: Optional[SegmentationData] = None,
                       callbacks: Optional[list] = None, phase: str = "student") -> DistillationSetup:
    """Loads the data, text embeddings, teacher and student, builds the loss module and (with
    ``--teacher_cache``) opens or builds the teacher cache, and returns the trainer, not yet trained.
    ``callbacks``: extra ``TrainerCallback``s; ``phase`` names the progress bar and console lines."""
    validate_distillation_args(dist_args)
    output_dir = Path(training_args.output_dir)
    prepare_training_args(training_args)
    data = data if data is not None else load_segmentation_data(data_args)
    check_input_sizes(data, data_args, training_args.per_device_train_batch_size,
                      training_args.per_device_eval_batch_size)
    id2label = data.id2label
    notes: list[str] = []

    text_embeddings, text_source = distillation_text_embeddings(dist_args, id2label, output_dir, notes)

    teacher = None
    teacher_name = dist_args.teacher_name_or_path
    if dist_args.method != "none":
        if teacher_name is None:
            if data.name != "synthetic":
                raise UserInputError(f"--teacher_name_or_path is required for --method {dist_args.method} "
                                     f"(a CNN AutoModelForSemanticSegmentation folder or Hub id).")
            teacher_name = _default_teacher(data, data_args, training_args, default_teacher_folder(dist_args, training_args),
                                            dist_args.default_teacher_steps)
        # a torchvision checkpoint carries no class names: it gets the dataset's (its class count is checked)
        names = {"id2label": id2label} if parse_torchvision_name(str(teacher_name)) is not None else {}
        with user_errors(f"--teacher_name_or_path {teacher_name}"):
            teacher = load_teacher(teacher_name, trust_remote_code=dist_args.trust_remote_code, **names)
        check_class_agreement(id2label, teacher=teacher, teacher_name=teacher_name)

    overrides = student_config_overrides(dist_args)
    set_seed(training_args.seed)  # --seed also sets the student's and the projectors' initial weights
    with user_errors(f"--student_name_or_path {dist_args.student_name_or_path}"):
        head_note = student_head_note(dist_args.student_name_or_path, id2label, dist_args.trust_remote_code)
        student = load_student(dist_args.student_name_or_path, id2label,
                               trust_remote_code=dist_args.trust_remote_code, config_overrides=overrides)
    if head_note:
        logger.warning(head_note)
        notes.append(head_note)
    processor = student_image_processor(student, size=processor_size(data_args, data))
    student_mean, student_std = image_mean_std(student)

    pairs: list[tuple[str, str]] = []
    stage_pairs: list[tuple[str, str]] = []
    s_channels, t_channels = feature_channels(student), {}
    if dist_args.method == "c2vkd":
        pairs = parse_feature_pairs(dist_args.feature_pairs) or [default_feature_pair(student, teacher)]
        stage_pairs = parse_feature_pairs(dist_args.stage_pairs) if dist_args.stage_weight > 0 else []
        t_channels = feature_channels(teacher)
        for s_name, t_name in pairs + stage_pairs:
            if s_name not in s_channels or t_name not in t_channels:
                raise UserInputError(f"feature pair {s_name}:{t_name}: the student has features "
                                     f"{sorted(s_channels)}, the teacher {sorted(t_channels)}.")
    text_head = build_text_head(dist_args, s_channels, text_embeddings, pairs, id2label)
    loss_module = build_loss_module(
        dist_args, student_channels=[s_channels[s] for s, _ in pairs],
        teacher_channels=[t_channels[t] for _, t in pairs], text_embeddings=text_embeddings,
        stage_channels=([s_channels[s] for s, _ in stage_pairs], [t_channels[t] for _, t in stage_pairs]),
        ling_projector=text_head.projector if text_head is not None else None)
    loss_module.set_schedules(parse_schedules(dist_args.weight_schedules))
    if dist_args.channels_last:
        student.to(memory_format=torch.channels_last)
    try:
        model = DistillationModel(student, loss_module, [s for s, _ in pairs + stage_pairs], text_head=text_head)
    except TextHeadFoldError as error:
        raise UserInputError(f"--text_head: {error.problem}.") from None
    teacher_feature_names = [t for _, t in pairs + stage_pairs]

    teacher_cache = None
    if dist_args.teacher_cache:
        teacher_cache = open_teacher_cache(dist_args, data_args, training_args, data, teacher, teacher_feature_names)
    train, validation, data_callbacks = _datasets_for(data, data_args, student_mean, student_std,
                                                      seed=training_args.seed, with_views=teacher_cache is not None)
    data_callbacks.append(LossScheduleCallback())
    if text_head is not None:
        data_callbacks.append(FoldTextHeadCallback())
        notes.append("The student's classifier was trained as a text head (a projection of its decoder feature scored "
                     "against the CLIP text embeddings of the class names) and folded into its 1x1 convolution at "
                     "the end of training.")
    trainer = DistillationTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=validation, data_collator=collate_fn,
        callbacks=data_callbacks + list(callbacks or []),
        compute_metrics=make_compute_metrics(len(id2label), IGNORE_INDEX, id2label), processing_class=processor,
        phase=phase, teacher=teacher, teacher_feature_names=teacher_feature_names,
        student_mean_std=(student_mean, student_std),
        teacher_mean_std=image_mean_std(teacher) if teacher is not None else None, teacher_cache=teacher_cache)
    return DistillationSetup(trainer=trainer, data=data, loss_module=loss_module, teacher=teacher,
                             teacher_name=teacher_name, text_embeddings=text_embeddings, notes=notes,
                             teacher_cache=teacher_cache, text_source=text_source)


def open_teacher_cache(dist_args: DistillationArguments, data_args: DataArguments,
                       training_args: TrainingArguments, data: SegmentationData, teacher: nn.Module,
                       feature_names: list[str]):
    """The :class:`~c2vkd_hf.cache.TeacherCache` in ``--teacher_cache`` for this teacher, training set
    and preprocessing. A missing cache is built first and an interrupted one completed (progress
    bar; under several processes each builds its share of the rows); a cache with another key is
    refused with a :class:`UserInputError` that says what differs and how to rebuild."""
    from .cache import TeacherCache, TeacherCacheError, build_teacher_cache, cache_status

    directory = Path(dist_args.teacher_cache).expanduser()
    reference = (data_args.resize_height, data_args.resize_width) if data_args.resize_height else None
    device = training_args.device  # sets up torch.distributed under torchrun/accelerate before sharding the build
    try:
        status = cache_status(directory)
        if not status.complete:
            logger.warning("Teacher cache %s is %s: running the teacher over the %d training images once.",
                           directory, f"incomplete ({status.done}/{status.num_rows} rows)" if status.exists
                           else "missing", len(data.train))
        teacher.to(device)
        key = build_teacher_cache(
            directory, teacher, data.train, reference_size=reference, teacher_mean_std=image_mean_std(teacher),
            feature_names=feature_names, top_k=dist_args.teacher_cache_top_k,
            batch_size=training_args.per_device_eval_batch_size, progress=not training_args.disable_tqdm)
        return TeacherCache(directory, expected_key=key)
    except TeacherCacheError as error:
        raise UserInputError(f"--teacher_cache: {error}") from None


def distillation_run_config(dist_args: DistillationArguments, data_args: DataArguments,
                            training_args: TrainingArguments) -> dict:
    """The configuration identifying a distillation run (:func:`c2vkd_hf.runs.run_config`)."""
    prepare_training_args(training_args)
    return run_config({"distillation": dataclasses.asdict(dist_args), "data": dataclasses.asdict(data_args),
                       "training": training_args.to_dict()})


def previous_distillation(dist_args: DistillationArguments, data_args: DataArguments,
                          training_args: TrainingArguments) -> Optional[dict]:
    """The saved results of a finished distillation of this configuration in ``--output_dir``, or
    ``None`` to train (see :func:`previous_run`; ``--retrain`` deletes a previous run first)."""
    return previous_run(Path(training_args.output_dir), distillation_run_config(dist_args, data_args, training_args),
                        training_args, results_name=RESULTS_NAME, retrain=dist_args.retrain)


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
    teacher_name, text_embeddings, notes = setup.teacher_name, setup.text_embeddings, setup.notes
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
            _write_json(output_dir / RESULTS_NAME, results)
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
    _, validation, _ = _datasets_for(data, data_args, mean, std)
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
    from .model_card import (CURVES_NAME, OVERLAY_NAME, build_model_card, plot_training_curves, save_prediction_overlay,
                             spread_indices, teacher_description)

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
        logits = nn.functional.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
        preds.append(logits.argmax(1)[0].cpu().numpy())
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
                  "learning_rate": args.learning_rate, "scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)), "seed": args.seed},
        notes=results.get("notes", []), student_type=type(student).__name__.replace("ForSemanticSegmentation", ""),
        overlay_image=OVERLAY_NAME if overlay else None, curves_image=CURVES_NAME if curves else None,
        eval_images=results.get("eval_images"), eval_images_total=results.get("eval_images_total"),
        text_source=results.get("text_embeddings_source"))
    card.save(str(output_dir / "README.md"))
    return output_dir / "README.md"


#: What ``--push_to_hub`` leaves out of the output folder: training state (``checkpoint-*``,
#: ``training_args.bin``), the default job's teacher and baseline, caches and partial files.
PUSH_IGNORE_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "teacher/**", "baseline/**", "text_cache/**", "*.tmp",
                        "training_args.bin")


def manual_upload_instructions(output_dir: Path, repo_id: str, private: Optional[bool] = None) -> str:
    """A shell command (the ``hf`` CLI of huggingface_hub) and the same few lines of Python that upload
    exactly the files :func:`push_student_to_hub` would (same repo, same ``PUSH_IGNORE_PATTERNS``)."""
    import shlex

    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in PUSH_IGNORE_PATTERNS)
    private_flag = " --private" if private else ""
    command = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(output_dir))} {excludes}{private_flag}"
    python = [
        "from huggingface_hub import HfApi",
        "api = HfApi()",
        f"repo = api.create_repo({repo_id!r}, {'private=True, ' if private else ''}exist_ok=True).repo_id",
        f"api.upload_folder(folder_path={str(output_dir)!r}, repo_id=repo,",
        f"                  ignore_patterns={list(PUSH_IGNORE_PATTERNS)!r})",
    ]
    return "\n".join(["    " + command, "", "or in Python:", "", *("    " + line for line in python)])


def push_student_to_hub(output_dir: Path, repo_id: Optional[str], token: Optional[str] = None,
                        private: Optional[bool] = None) -> str:
    """Uploads the saved student folder (weights, config, processor, card, images; not
    :data:`PUSH_IGNORE_PATTERNS`). Everything is already saved locally; when the upload fails (no
    network, no login) this raises :class:`UserInputError` with a command and a Python snippet that
    upload the same files later (:func:`manual_upload_instructions`)."""
    from huggingface_hub import HfApi

    repo_id = repo_id or output_dir.name
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=url.repo_id, ignore_patterns=list(PUSH_IGNORE_PATTERNS))
    except Exception as error:  # network, auth: the user needs one clear message, not a traceback
        reason = type(error).__name__
        raise UserInputError(
            f"--push_to_hub failed ({reason}): could not upload to the Hub repo '{repo_id}'. The student, its "
            f"card and results are saved in {output_dir}. Once online and logged in (`hf auth login`), upload "
            f"the files the push would (no checkpoints, no training_args.bin) with\n\n"
            f"{manual_upload_instructions(output_dir, repo_id, private)}\n") from None
    return url.repo_id
