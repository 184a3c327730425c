"""Up-front validation of the scripts' input: flags and config files, the output folder, the label set
and the image sizes, so that every user error is found before any work and reported as one
:class:`UserInputError` (exit code 2, see ``jobs.run_script``) naming the flag, file or value at fault.

* :func:`parse_script_arguments`: one parser path for flags and config files (``script.py config.yaml``):
  config values are converted and type-checked as on the command line, then every numeric flag is
  range-checked (:data:`RANGES`) before the argument dataclasses are built (so transformers cannot
  silently replace a bad value, e.g. ``--eval_steps 0``).
* :func:`check_output_dir`: the output folder is a folder and writable.
* :func:`check_label_set` (called by ``data.load_segmentation_data``): duplicate class names, an
  ignore value that is a class id, a split whose masks are entirely void.
* :func:`check_input_sizes`: images the model cannot take (smaller than :data:`MIN_INPUT_SIDE`) or
  that cannot be batched (different sizes without a resize), naming the files.
* :func:`save_errors`: a write that fails (full disk, read-only folder, permissions) becomes a
  :class:`SaveError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Union

#: Smallest image side (pixels) the models take: SegFormer's and the CNN teachers' deepest stride.
MIN_INPUT_SIDE = 32

#: ``errno`` values of a write that fails because of the machine, not of the program.
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST}


class UserInputError(ValueError):
    """A problem with the user's flags, files or data: reported as one message, no traceback."""


class SaveError(UserInputError):
    """Writing an output failed (full disk, read-only or not permitted): the message names the file."""


# ------------------------------------------------------------------------------------------ flags
def _at_least(low: float, kind: type = int) -> Callable[[Any], Optional[str]]:
    """A rule: a finite ``kind`` value >= ``low``."""
    noun = "an integer" if kind is int else "a finite number"
    return lambda v: None if math.isfinite(v) and v >= low else f"must be {noun} >= {low:g}"


def _above(low: float) -> Callable[[Any], Optional[str]]:
    """A rule: a finite number > ``low``."""
    return lambda v: None if math.isfinite(v) and v > low else f"must be a finite number > {low:g}"


def _max_steps(v: int) -> Optional[str]:
    return None if v == -1 or v >= 1 else "must be >= 1 (or -1: train for --num_train_epochs epochs instead)"


def _eval_steps(v: float) -> Optional[str]:
    return None if math.isfinite(v) and v > 0 else "must be > 0 (a step count, or a fraction of the run below 1)"


#: Range of every numeric flag of the scripts, by name (``None`` values, where allowed, are not checked).
RANGES: dict[str, Callable[[Any], Optional[str]]] = {
    # TrainingArguments
    "per_device_train_batch_size": _at_least(1), "per_device_eval_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1), "learning_rate": _at_least(0, float),
    "weight_decay": _at_least(0, float),
    "max_grad_norm": _at_least(0, float), "warmup_steps": _at_least(0, float), "max_steps": _max_steps,
    "num_train_epochs": _above(0), "eval_steps": _eval_steps, "save_steps": _eval_steps, "logging_steps": _eval_steps,
    "save_total_limit": _at_least(1), "seed": _at_least(0), "dataloader_num_workers": _at_least(0),
    "adam_epsilon": _above(0), "label_smoothing_factor": _at_least(0, float),
    # DataArguments
    "min_scale": _above(0), "max_scale": _above(0),
    "resize_height": _at_least(MIN_INPUT_SIDE),
    "resize_width": _at_least(MIN_INPUT_SIDE), "crop_height": _at_least(MIN_INPUT_SIDE),
    "crop_width": _at_least(MIN_INPUT_SIDE), "resize_shortest_edge": _at_least(MIN_INPUT_SIDE),
    "resize_longest_edge": _at_least(MIN_INPUT_SIDE), "max_train_samples": _at_least(1), "max_eval_samples": _at_least(1),
    "synthetic_train_size": _at_least(1), "synthetic_validation_size": _at_least(1),
    "synthetic_height": _at_least(MIN_INPUT_SIDE), "synthetic_width": _at_least(MIN_INPUT_SIDE),
    "dataset_ignore_index": lambda v: None if 0 <= v <= 255 else "must be a label value in 0..255",
    # DistillationArguments, TeacherArguments, the evaluation scripts
    "default_teacher_steps": _at_least(1), "teacher_cache_top_k": _at_least(1), "head_lr_multiplier": _above(0),
    "teacher_input_scale": _above(0), "class_balance_power": _at_least(0, float),
    **{weight: _at_least(0, float) for weight in ("ce_weight", "pdd_weight", "glob_weight", "rel_weight", "ling_weight",
                                                  "stage_weight", "exit_weight", "channel_weight", "kd_weight",
                                                  "pdd_alpha", "pdd_beta")},
    **{temperature: _above(0) for temperature in ("pdd_temperature", "glob_tau", "ling_tau", "channel_tau",
                                                  "kd_temperature")},
    "label_weight": lambda v: None if 0 <= v <= 1 else "must be in [0, 1]", "rel_grid": _at_least(1),
    "batch_size": _at_least(1), "num_predictions": _at_least(-1), "num_images": _at_least(0),
}

#: Flags of earlier versions that are gone, each with what to do instead: given on the command line or in a config
#: file, they stop the run with this message. Their ablation records stay in benchmarks/camvid/ABLATIONS.md.
REMOVED_FLAGS: dict[str, str] = {
    "cutmix_prob": "CutMix with the live teacher lost CamVid val (ablation c2vkd-cutmix); there is no replacement",
    "student_jitter": "student-only colour jitter helped without a teacher as much as with one (ablation "
                      "c2vkd-jitter); there is no replacement",
    "consistent_jitter": "it went with --student_jitter (ablation c2vkd-jitter-consistent); there is no replacement",
    "pdd_logit_standardization": "z-scored logits in PDD gained nothing (ablation c2vkd-ls); there is no replacement",
    "channel_present_only": "masking the channel-wise term lost CamVid val (ablation c2vkd-cwd-present); "
                            "--channel_weight keeps the unmasked term",
    "class_balance_terms": "--class_balance balances PDD and the linguistic term together; one of them alone was "
                           "never adopted",
}


def check_removed_flags(names) -> None:
    """A flag or config key of :data:`REMOVED_FLAGS` among ``names`` (``--flag``, ``--flag=value``, ``--flag-name``
    or a bare config key) stops with its message."""
    for name in names:
        key = str(name).split("=", 1)[0].lstrip("-").replace("-", "_")
        if key in REMOVED_FLAGS and (str(name).startswith("--") or "=" not in str(name)):
            raise UserInputError(f"--{key} was removed: {REMOVED_FLAGS[key]} (benchmarks/camvid/ABLATIONS.md).")

#: Flags that are only meaningful together.
PAIRS = (("resize_height", "resize_width"), ("crop_height", "crop_width"))


def check_ranges(values: dict[str, Any]) -> None:
    """Range-checks every known numeric flag in ``values`` (raw flag values, before the argument
    dataclasses may rewrite them) and the flags that go together."""
    for name, value in values.items():
        rule = RANGES.get(name)
        if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        problem = rule(value)
        if problem:
            raise UserInputError(f"--{name} {problem}, got {value}.")
    for first, second in PAIRS:
        if (values.get(first) is None) != (values.get(second) is None) and first in values:
            raise UserInputError(f"--{first} and --{second} must be given together (got only "
                                 f"--{first if values.get(first) is not None else second}).")
    keep_ratio = [f"--{name}" for name in ("resize_shortest_edge", "resize_longest_edge") if values.get(name) is not None]
    if keep_ratio and values.get("resize_height") is not None:
        raise UserInputError(f"{' and '.join(keep_ratio)} (aspect-preserving resize) and --resize_height/--resize_width "
                             "(a fixed size) are two ways to resize: give one.")
    if values.get("min_scale") is not None and values.get("max_scale") is not None \
            and values["min_scale"] > values["max_scale"]:
        raise UserInputError(f"--min_scale must be <= --max_scale, got {values['min_scale']} > {values['max_scale']}.")


def _field_types(dataclass_types) -> dict[str, tuple[Any, bool]]:
    """``{field name: (type, may be None)}`` of the dataclasses' init fields."""
    types = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            hint = hints.get(f.name, Any)
            args = typing.get_args(hint)
            optional = typing.get_origin(hint) is Union and type(None) in args
            if optional and len(args) == 2:
                hint = next(a for a in args if a is not type(None))
            types[f.name] = (hint, optional or f.default is None)
    return types


_TRUE, _FALSE = {"true", "yes", "y", "t", "1", "on"}, {"false", "no", "n", "f", "0", "off"}


def _convert(name: str, value: Any, kind: Any, optional: bool) -> Any:
    """``value`` of a config file converted to ``kind`` the way the command line converts a string;
    a value that would be refused on the command line raises :class:`UserInputError`."""
    if value is None:
        if optional:
            return None
        raise UserInputError(f"{name} must be {_noun(kind)}, got null.")
    if kind not in (int, float, bool, str):
        return value  # enums, lists, dicts, unions: the dataclass checks them
    if kind is bool:
        text = str(value).lower()
        if isinstance(value, bool) or text in _TRUE | _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
    elif kind is str:
        if not isinstance(value, (bool, list, dict)):
            return str(value)
    elif not isinstance(value, bool):
        try:
            converted = kind(value) if isinstance(value, str) else value
        except ValueError:
            converted = None
        if kind is int and isinstance(converted, int) or kind is float and isinstance(converted, (int, float)):
            return kind(converted)
    raise UserInputError(f"{name} must be {_noun(kind)}, got {value!r}.")


def _noun(kind: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def config_values(config: dict[str, Any], dataclass_types) -> dict[str, Any]:
    """A config file's mapping with every value of a known flag converted and type-checked as on the
    command line (``max_steps: many`` is refused as ``--max_steps many`` is); unknown keys are kept."""
    types = _field_types(dataclass_types)
    return {key: _convert(key, value, *types[key]) if key in types else value for key, value in config.items()}


def check_mixed_precision(values: dict[str, Any]) -> None:
    """bf16/fp16 asked for on a machine without an accelerator: bf16 is honoured on the CPU only with
    ``--use_cpu true`` (CPU autocast; slower than fp32 on most CPUs), fp16 not at all; either way one line says so
    (instead of ``TrainingArguments``' generic error)."""
    import torch

    half = [name for name in ("bf16", "fp16") if str(values.get(name)).lower() in _TRUE]
    if not half or torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
            torch.backends.mps.is_available():
        return
    if half == ["bf16"] and str(values.get("use_cpu")).lower() in _TRUE:
        return
    raise UserInputError(f"--{half[0]} true needs a GPU, and this machine has none: pass --use_cpu true to train in "
                         f"bf16 on the CPU (--bf16 true only; slower than fp32 on most CPUs), or leave --{half[0]} out.")


def parse_script_arguments(parser, argv: list[str], defaults: dict[str, Any], *, config: Optional[dict] = None,
                           source: Optional[str] = None, allow_extra_keys: bool = False):
    """Parses a script's flags (``argv``) or, with ``config``, a config file's mapping (from ``source``),
    over the script's ``defaults``, range-checks the raw values (:func:`check_ranges`) and builds the
    ``HfArgumentParser``'s dataclasses. Returns ``(dataclasses..., extras)``, ``extras`` being the
    values of the parser's own (non-dataclass) flags. Every problem is a :class:`UserInputError`."""
    prefix = f"Config file {source}: " if source else ""
    try:
        check_removed_flags(config if config is not None else [a for a in argv if str(a).startswith("--")])
        if config is not None:
            values = config_values({**defaults, **config}, parser.dataclass_types)
        else:
            parser.set_defaults(**defaults)  # the script's defaults, overridden by any flag given
            values = vars(parser.parse_args(list(argv)))
        check_ranges(values)
        check_mixed_precision(values)
        fields = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype)}
        extras = {k: v for k, v in values.items() if k not in fields}
        parsed = parser.parse_dict(values, allow_extra_keys=allow_extra_keys or config is None)
    except (UserInputError, ValueError, TypeError) as error:
        raise UserInputError(f"{prefix}{error}") from None
    return (*parsed, extras)


# ------------------------------------------------------------------------------------------ output folder
def check_output_dir(path: Union[str, os.PathLike], flag: str = "--output_dir") -> None:
    """``path`` must be a folder (or creatable) in which files can be written; the folder is created."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{flag} {folder} is a file, not a folder.")
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as error:
        raise UserInputError(f"{flag} {folder} is not writable ({error.strerror or error}).") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed because of the machine (disk full, read-only,
    permissions), not a bug: such an ``OSError``, or torch's serialisation writer failing."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    text = str(error)
    return isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                                or "file write failed" in text)


@contextlib.contextmanager
def save_errors(what: Union[str, os.PathLike], cleanup: Optional[Callable[[], None]] = None):
    """Turns a write failure (:func:`is_write_failure`) while saving ``what`` into a :class:`SaveError`
    naming it; ``cleanup`` runs first (e.g. to make a half-written checkpoint look incomplete)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not is_write_failure(error):
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup()
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        culprit = getattr(error, "filename", None) or what
        raise SaveError(f"Could not write {culprit} ({reason}). Free disk space or fix the folder's permissions, "
                        f"then run the same command again.") from None


# ------------------------------------------------------------------------------------------ data
def check_label_set(id2label: dict[int, str], void: Optional[int], reduce_labels: bool, where: str) -> None:
    """The class names must be distinct, and the dataset's void value (``void``, mapped to the ignore
    index) must not be the value of a class: every pixel of that class would be dropped silently."""
    seen: dict[str, int] = {}
    for index, name in sorted(id2label.items()):
        key = str(name).strip().casefold()
        if key in seen:
            raise UserInputError(f"{where}: class {index} has the same name as class {seen[key]} ({name!r}); "
                                 f"class names must be distinct.")
        seen[key] = index
    if void is None:
        return
    class_id = void - 1 if reduce_labels else void
    if 0 <= class_id < len(id2label) and not (reduce_labels and void == 0):
        raise UserInputError(
            f"{where}: the ignore value {void} is the label value of class {class_id} ({id2label[class_id]!r})"
            + (" after --reduce_labels" if reduce_labels else "") + "; its pixels would be dropped from training and "
            "evaluation. Use the dataset's real void value (--dataset_ignore_index), or fix the labels file.")


def _mask_has_valid_pixel(cell: dict, ignore_index: int) -> bool:
    import io

    import numpy as np
    import PIL.Image

    source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
    with PIL.Image.open(source) as mask:
        return bool((np.asarray(mask) != ignore_index).any())


def check_not_all_void(dataset, split: str, ignore_index: int) -> None:
    """At least one mask of ``split`` must have a pixel that is not void (stops at the first one, so
    a normal dataset costs one mask decode): with none, every loss term is 0 and mIoU undefined."""
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), 64):
        for cell in table[start:start + 64].column("label").to_pylist():
            if _mask_has_valid_pixel(cell, ignore_index):
                return
    raise UserInputError(f"every mask of the {split} split ({len(dataset)} masks) is entirely void (ignore value "
                         f"{ignore_index} after mapping): there is nothing to learn or measure. Check the masks, "
                         f"--dataset_ignore_index and --reduce_labels.")


def image_sizes(dataset) -> list[tuple[tuple[int, int], str]]:
    """``[((height, width), name)]`` of a split's images, from their headers (no full decode)."""
    import io

    import PIL.Image

    from .images import oriented_size

    sizes = []
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), 256):
        for offset, cell in enumerate(table[start:start + 256].column("image").to_pylist()):
            source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
            with PIL.Image.open(source) as image:
                width, height = oriented_size(image)
            sizes.append(((height, width), cell.get("path") or f"row {start + offset}"))
    return sizes


def _size_problem(sizes: list[tuple[tuple[int, int], str]], batch_size: int, split: str, fix: str,
                  check_minimum: bool = True) -> Optional[str]:
    """Why a split's images (``sizes`` from :func:`image_sizes`) cannot be fed as they are, or ``None``."""
    small = [(s, name) for s, name in sizes if min(s) < MIN_INPUT_SIDE] if check_minimum else []
    if small:
        (h, w), name = small[0]
        return (f"{name} is {w}x{h} (WxH): the models need images of at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} "
                f"({len(small)} {split} image(s) are smaller); remove it or set --resize_height/--resize_width.")
    distinct: dict[tuple[int, int], str] = {}
    for size, name in sizes:
        distinct.setdefault(size, name)
    if batch_size > 1 and len(distinct) > 1:
        (s1, n1), (s2, n2) = list(distinct.items())[:2]
        return (f"{split} images have different sizes ({n1} is {s1[1]}x{s1[0]}, {n2} is {s2[1]}x{s2[0]} (WxH)) and "
                f"cannot be batched: {fix}")
    return None


def check_input_sizes(data, data_args, train_batch_size: Optional[int], eval_batch_size: int) -> None:
    """The images as the models will see them: none smaller than :data:`MIN_INPUT_SIDE`, and, for
    training, the same size within a batch (training sees the crop, else the fixed resize, else the
    image). Evaluation batches of different sizes are padded by :func:`~c2vkd_hf.data.collate_fn` and
    scored at each image's own size, so only their minimum side is checked (when nothing resizes them).
    ``train_batch_size`` ``None``: evaluation only; ``eval_batch_size`` is accepted for symmetry."""
    fixed = data_args.resize_height is not None
    resized = fixed or data_args.resize_shortest_edge is not None or data_args.resize_longest_edge is not None
    problem = None
    if train_batch_size is not None and data_args.crop_height is None and not fixed:
        problem = _size_problem(image_sizes(data.train), train_batch_size, "train", "set a crop size "
                                "(--crop_height/--crop_width) or --resize_height/--resize_width, or "
                                "--per_device_train_batch_size 1.", check_minimum=not resized)
    if problem is None and not resized:
        problem = _size_problem(image_sizes(data.validation), 1, "validation", "")
    if problem:
        raise UserInputError(problem)
