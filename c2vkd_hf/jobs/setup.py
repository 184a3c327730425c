"""Builds a distillation from its flags: text embeddings, teacher, student, loss module, text head, feature pairs,
teacher cache, and the trainer ready to train (:func:`setup_distillation`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainingArguments, set_seed

from ..config import IGNORE_INDEX, DataArguments, DistillationArguments
from ..data import SegmentationData, collate_fn, load_segmentation_data
from ..losses import get_loss
from ..losses.c2vkd import C2VKDConfig
from ..losses.schedule import parse_schedules
from ..metrics import make_compute_metrics
from ..models import (
    AUTO_STAGE_PAIRS,
    DECODER_FEATURE,
    default_feature_pair,
    default_stage_pairs,
    feature_channels,
    image_mean_std,
    load_student,
    load_teacher,
    parse_feature_pairs,
    parse_torchvision_name,
    student_image_processor,
)
from ..text_head import TextHead
from ..trainer import (
    DistillationModel,
    DistillationTrainer,
    FoldTextHeadCallback,
    LossScheduleCallback,
    TextHeadFoldError,
)
from ..validation import UserInputError, check_input_sizes
from .checks import check_class_agreement, student_config_overrides, student_head_note, validate_distillation_args
from .common import datasets_for as _datasets_for, prepare_training_args, processor_size
from .errors import user_errors
from .teacher import default_teacher as _default_teacher, default_teacher_folder

logger = logging.getLogger(__name__)


def build_loss_module(args: DistillationArguments, *, student_channels: list[int], teacher_channels: list[int],
                      text_embeddings: Optional[torch.Tensor],
                      text_classes: Optional[tuple[bool, ...]] = None,
                      stage_channels: tuple[list[int], list[int]] = ([], []),
                      ling_projector: Optional[nn.Conv2d] = None, num_classes: Optional[int] = None) -> nn.Module:
    """The loss module of ``args.method`` with every constant from the flags. C2VKD: ``stage_channels``
    are the (student, teacher) channels of the stage-guidance pairs; ``ling_projector`` the text head's
    projector, which its linguistic term then trains; ``num_classes`` the class count of the stage exits."""
    common = {"ce_weight": args.ce_weight, "ignore_index": IGNORE_INDEX}
    if args.method == "none":
        return get_loss("none", **common)
    if args.method == "c2vkd":
        stages = {} if stage_channels[0] else {"stage_weight": 0.0, "exit_weight": 0.0}  # no stage pairs: off
        return get_loss(
            "c2vkd", C2VKDConfig.from_args(args, **stages), ignore_index=IGNORE_INDEX,
            student_channels=student_channels or None, teacher_channels=teacher_channels or None,
            stage_student_channels=stage_channels[0] or None, stage_teacher_channels=stage_channels[1] or None,
            num_classes=num_classes, ling_projector=ling_projector, text_embeddings=text_embeddings,
            text_classes=text_classes)
    peer = dict(common)
    if args.kd_weight is not None:
        peer["kd_weight"] = args.kd_weight
    if args.kd_temperature is not None:
        peer["temperature" if args.method in ("kd", "dkd") else "tau"] = args.kd_temperature
    return get_loss(args.method, **peer)


def build_text_head(args: DistillationArguments, s_channels: dict[str, int], text_embeddings: Optional[torch.Tensor],
                    pairs: list[tuple[str, str]], id2label: dict[int, str],
                    text_classes: Optional[tuple[bool, ...]] = None) -> Optional[TextHead]:
    """The student's text head (:mod:`c2vkd_hf.text_head`) on its ``decoder`` feature, or ``None``; the rows of
    the classes ``text_classes`` marks False (no embedding of their name) are learned.

    ``--text_head`` unset: on for C2VKD when its linguistic term is on and reads the ``decoder``
    feature (the default pair), off for every other method. With C2VKD the head's projector is the
    linguistic term's, so the term trains the classifier the student ships with."""
    ling_on = args.method == "c2vkd" and args.ling_weight > 0 and text_embeddings is not None
    reads_decoder = bool(pairs) and pairs[-1][0] == DECODER_FEATURE
    wanted = (ling_on and reads_decoder) if args.text_head is None else args.text_head
    if not wanted:
        return None
    if ling_on and not reads_decoder:
        raise UserInputError(f"--text_head with C2VKD: its linguistic term trains the head, so the last "
                             f"--feature_pairs entry must read the student's '{DECODER_FEATURE}' feature (e.g. "
                             f"{DECODER_FEATURE}:{DECODER_FEATURE}); got {pairs}.")
    if DECODER_FEATURE not in s_channels:
        raise UserInputError("--text_head needs a student whose final classifier is a 1x1 convolution reading a "
                             f"'{DECODER_FEATURE}' feature (SegFormer, UperNet, BEiT, DPT do).")
    # whether it can be folded into the student's classifier is checked once, by DistillationModel
    return TextHead.create(s_channels[DECODER_FEATURE], text_embeddings, DECODER_FEATURE, args.ling_tau,
                           [id2label[i] for i in range(len(id2label))],
                           learned=None if text_classes is None else [not found for found in text_classes])


def distillation_text_embeddings(dist_args: DistillationArguments, id2label: dict[int, str], output_dir: Path,
                                 notes: list[str]
                                 ) -> tuple[Optional[torch.Tensor], Optional[str], Optional[tuple[bool, ...]]]:
    """The class-name text embeddings of C2VKD's linguistic term or of the text head (``--text_head``,
    any method), their source (one line, for ``results.json`` and the card) and which classes have one
    (``None``: all), or ``(None, None, None)`` when neither is asked for, or no embeddings are found
    (then a loud warning and a note for the card; ``--text_head true`` is refused).

    Sources, first found: ``--text_embeddings``, ``--clip_model``, the built-in CLIP vocabulary when it
    names at least one class (:mod:`c2vkd_hf.vocabulary`; the log says which names matched what; the
    unmatched ones are left out of the linguistic term and learned by the text head)."""
    if not ((dist_args.method == "c2vkd" and dist_args.ling_weight > 0) or dist_args.text_head):
        return None, None, None
    from ..text import resolve_text_embeddings
    from ..vocabulary import closest_vocabulary

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
        return None, None, None
    logger.info("Class-name text embeddings: %s", resolved.source)
    if resolved.matched is not None:
        unmatched = [id2label[i] for i, found in enumerate(resolved.matched) if not found]
        notes.append(f"No built-in CLIP embedding names {', '.join(unmatched)}: the linguistic term reads the other "
                     "classes only, and the text head (when used) learns the row of each of these from the labels.")
    check_class_agreement(id2label, text_embeddings=resolved.embeddings, text_source=resolved.source)
    return resolved.embeddings, resolved.source, resolved.matched


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

    text_embeddings, text_source, text_classes = distillation_text_embeddings(dist_args, id2label, output_dir, notes)

    teacher = None
    teacher_name = dist_args.teacher_name_or_path
    if dist_args.method != "none":
        if teacher_name is None:
            if data.name != "synthetic":
                raise UserInputError(f"--teacher_name_or_path is required for --method {dist_args.method} "
                                     f"(a CNN AutoModelForSemanticSegmentation folder or Hub id).")
            teacher_name = _default_teacher(data, data_args, training_args,
                                            default_teacher_folder(dist_args, training_args),
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

    s_channels = feature_channels(student)
    t_channels = feature_channels(teacher) if dist_args.method == "c2vkd" else {}
    pairs, stage_pairs = c2vkd_feature_pairs(dist_args, student, teacher, channels=(s_channels, t_channels))
    text_head = build_text_head(dist_args, s_channels, text_embeddings, pairs, id2label, text_classes)
    loss_module = build_loss_module(
        dist_args, student_channels=[s_channels[s] for s, _ in pairs],
        teacher_channels=[t_channels[t] for _, t in pairs], text_embeddings=text_embeddings,
        text_classes=text_classes,
        stage_channels=([s_channels[s] for s, _ in stage_pairs], [t_channels[t] for _, t in stage_pairs]),
        ling_projector=text_head.projector if text_head is not None else None, num_classes=len(id2label))
    loss_module.set_schedules(parse_schedules(dist_args.weight_schedules))
    if dist_args.channels_last:
        student.to(memory_format=torch.channels_last)
    try:
        model = DistillationModel(student, loss_module, [s for s, _ in pairs + stage_pairs], text_head=text_head)
    except TextHeadFoldError as error:
        raise UserInputError(f"--text_head: {error.problem}.") from None
    names = teacher_maps_read(pairs, stage_pairs, dist_args.stage_weight)

    teacher_cache = None
    if dist_args.teacher_cache:
        teacher_cache = open_teacher_cache(dist_args, data_args, training_args, data, teacher, names)
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
        phase=phase, teacher=teacher, teacher_feature_names=names,
        student_mean_std=(student_mean, student_std),
        teacher_mean_std=image_mean_std(teacher) if teacher is not None else None, teacher_cache=teacher_cache,
        teacher_input_scale=dist_args.teacher_input_scale)
    return DistillationSetup(trainer=trainer, data=data, loss_module=loss_module, teacher=teacher,
                             teacher_name=teacher_name, text_embeddings=text_embeddings, notes=notes,
                             teacher_cache=teacher_cache, text_source=text_source)


def keep_ratio(data_args: DataArguments) -> Optional[tuple[Optional[int], Optional[int]]]:
    """``(shortest_edge, longest_edge)`` of the data's aspect-preserving resize, or ``None`` without one."""
    if data_args.resize_shortest_edge is None and data_args.resize_longest_edge is None:
        return None
    return data_args.resize_shortest_edge, data_args.resize_longest_edge


def teacher_reference_size(dist_args: DistillationArguments, data_args: DataArguments) -> Optional[tuple[int, int]]:
    """The size a teacher cache is built at: the data's reference size (``--resize_height/--resize_width``;
    ``None``: the images' common size) times ``--teacher_input_scale``."""
    reference = (data_args.resize_height, data_args.resize_width) if data_args.resize_height else None
    scale = dist_args.teacher_input_scale
    if scale == 1.0:
        return reference
    if reference is None:
        raise UserInputError("--teacher_input_scale with --teacher_cache needs --resize_height/--resize_width "
                             "(the reference size the teacher's view is scaled from).")
    return tuple(int(round(v * scale)) for v in reference)


def c2vkd_feature_pairs(dist_args: DistillationArguments, student: nn.Module, teacher: Optional[nn.Module], *,
                        channels: Optional[tuple[dict[str, int], dict[str, int]]] = None
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(feature pairs, stage pairs)``, each a list of ``(student feature, teacher feature)``: what C2VKD reads from
    the two models (the teacher cache stores the teacher's side of both). Feature pairs: ``--feature_pairs``, else
    :func:`~c2vkd_hf.models.default_feature_pair`; stage pairs, when ``--stage_weight`` or ``--exit_weight`` is on:
    ``--stage_pairs``, or for ``auto`` :func:`~c2vkd_hf.models.default_stage_pairs`. Both empty for the other
    methods. A pair naming a feature a model lacks is a :class:`UserInputError` listing what each model has.
    ``channels``: the two models' :func:`~c2vkd_hf.models.feature_channels` when the caller has them already."""
    if dist_args.method != "c2vkd":
        return [], []
    pairs = parse_feature_pairs(dist_args.feature_pairs) or [default_feature_pair(student, teacher)]
    stage_pairs = []
    if dist_args.stage_weight > 0 or dist_args.exit_weight > 0:
        if dist_args.stage_pairs == AUTO_STAGE_PAIRS:
            stage_pairs = default_stage_pairs(student, teacher)
        else:
            stage_pairs = parse_feature_pairs(dist_args.stage_pairs)
    s_channels, t_channels = channels or (feature_channels(student), feature_channels(teacher))
    if not stage_pairs and (dist_args.stage_weight > 0 or dist_args.exit_weight > 0):
        logger.warning("--stage_pairs %s: the student (features %s) and the teacher (%s) have no stages to pair, so "
                       "C2VKD runs without stage guidance and exits; name the pairs to have them.", AUTO_STAGE_PAIRS,
                       sorted(s_channels), sorted(t_channels))
    for s_name, t_name in pairs + stage_pairs:
        if s_name not in s_channels or t_name not in t_channels:
            raise UserInputError(f"feature pair {s_name}:{t_name}: the student has features "
                                 f"{sorted(s_channels)}, the teacher {sorted(t_channels)}.")
    return pairs, stage_pairs


def teacher_maps_read(pairs: list, stage_pairs: list, stage_weight: float) -> list[str]:
    """The teacher maps C2VKD reads (online, or stored in the teacher cache): the feature pairs' teacher side, then
    the stage pairs' only with stage guidance (``stage_weight > 0``): the stage exits read the student's stages
    alone (:attr:`~c2vkd_hf.losses.C2VKDLoss.reads_teacher_stages`)."""
    return [t for _, t in pairs] + ([t for _, t in stage_pairs] if stage_weight > 0 else [])


def open_teacher_cache(dist_args: DistillationArguments, data_args: DataArguments,
                       training_args: TrainingArguments, data: SegmentationData, teacher: nn.Module,
                       feature_names: list[str]):
    """The :class:`~c2vkd_hf.cache.TeacherCache` in ``--teacher_cache`` for this teacher, training set
    and preprocessing. A missing cache is built first and an interrupted one completed (progress
    bar; under several processes each builds its share of the rows); a cache with another key is
    refused with a :class:`UserInputError` that says what differs and how to rebuild."""
    from ..cache import TeacherCache, TeacherCacheError, build_teacher_cache, cache_status

    directory = Path(dist_args.teacher_cache).expanduser()
    reference = teacher_reference_size(dist_args, data_args)
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
            batch_size=training_args.per_device_eval_batch_size, progress=not training_args.disable_tqdm,
            keep_ratio=keep_ratio(data_args))
        return TeacherCache(directory, expected_key=key)
    except TeacherCacheError as error:
        raise UserInputError(f"--teacher_cache: {error}") from None
