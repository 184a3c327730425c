"""``DistillationTrainer``: a :class:`transformers.Trainer` that distils a frozen CNN teacher into a student.

One code path serves every method (``c2vkd``, ``kd``, ``cwd``, ``dist``, ``dkd`` and ``none``): the
trainer runs the frozen teacher (or, with a ``teacher_cache``, replays its cached outputs under each
example's training view: :mod:`c2vkd_hf.cache`), then calls the trained :class:`DistillationModel` (student + the
loss module that owns the projectors), which returns a dict of named loss terms. Design choices,
each forced by how ``Trainer`` works (see docs/DESIGN.md, "Trainer facts"):

* The projectors must be optimised, DDP-synchronised and checkpointed, so they live inside the
  module the Trainer trains (:class:`DistillationModel`); the loss is computed inside its
  ``forward`` so that DDP sees every parameter that gets a gradient.
* The teacher is placed with ``accelerator.prepare_model(..., evaluation_mode=True)``: right device,
  mixed precision, never DDP-wrapped; it is frozen (``eval()``, ``requires_grad_(False)``) and runs
  under ``torch.no_grad()``.
* Our loss is a per-batch mean, so ``model_accepts_loss_kwargs`` and ``loss_is_scaled_for_ga`` are
  both ``False``: the Trainer then divides it by the accumulation steps exactly once.
* Saving: the output folder (``save_model``) is a plain student: weights, config with ``id2label``
  and the image processor, loadable with ``AutoModelForSemanticSegmentation``. Checkpoints
  additionally hold ``distillation_modules.safetensors`` (the projectors), restored on resume.
  ``training_args.bin`` is written without ``hub_token``.
* Checkpoints survive a kill at any moment and a NaN/inf loss stops training
  (:class:`SafeCheckpointTrainer`, the base class it shares with the teacher's ``TeacherTrainer``).
* Evaluation skips the teacher: the student's logits and cross-entropy only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer, TrainerCallback
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .console import use_console_callbacks
from .constants import IGNORE_INDEX
from .runs import MANIFEST_NAME, checkpoint_fit_problem, manifest_problems, write_manifest
from .validation import UserInputError, save_errors
from .losses.common import cross_entropy
from .models import DECODER_FEATURE, classifier_module, forward_features
from .data.batch_augment import apply_cutmix, batch_generator, cutmix_masks, jitter_factors, jitter_normalised
from .teacher import CachedTeacher, LiveTeacher
from .text_head import TextHead, save_text_head

logger = logging.getLogger(__name__)

DISTILLATION_MODULES_NAME = "distillation_modules.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"  # written last by Trainer._save_checkpoint: the commit marker
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite during training."""


class TextHeadFoldError(ValueError):
    """A text head that cannot become the student's classifier; ``problem`` says why
    (:func:`text_head_fold_problem`)."""

    def __init__(self, problem: str):
        super().__init__(f"text head: {problem}")
        self.problem = problem


class DistillationModel(nn.Module):
    """The module the Trainer optimises: the student, the loss module holding the projectors, and
    optionally the student's text head (:class:`~c2vkd_hf.text_head.TextHead`).

    ``forward(pixel_values, labels=None, teacher_logits=None, teacher_features=None)``:
    without teacher outputs (evaluation) it returns the student's logits and, given labels, the
    loss module's cross-entropy; with them it returns the total distillation loss, the logits and
    every unweighted term in ``terms``.

    With a ``text_head`` (``--text_head``, any method), the student's logits *are* the head's
    pixel-text logits ``S = normalise(P D) E^T / tau`` on its ``decoder`` feature ``D``: the
    cross-entropy, every distillation term and evaluation read the head, and the student's own 1x1
    classifier is frozen until :class:`FoldTextHeadCallback` writes the head into it at the end
    (same per-pixel argmax) and switches ``text_head_logits`` off. When the head's projector is also
    C2VKD's linguistic projector (the pipeline's default), the loss reads the head's ``S`` for the
    linguistic term instead of projecting the feature again (:meth:`_text_head_is_linguistic_head`).
    """

    main_input_name = "pixel_values"

    def __init__(self, student: nn.Module, loss_module: nn.Module,
                 student_feature_names: Optional[list[str]] = None, *, text_head: Optional[TextHead] = None):
        super().__init__()
        self.student = student
        self.distill_loss = loss_module
        self.student_feature_names = list(student_feature_names or [])
        self.config = student.config  # read by Trainer (e.g. keys_to_ignore_at_inference)
        self.text_head = text_head
        self.text_head_logits = False
        if text_head is not None:
            problem = text_head_fold_problem(student, text_head)  # the one check, for every caller
            if problem is not None:
                raise TextHeadFoldError(problem)
            self.text_head_logits = True
            # the own classifier gets no gradient (DDP would wait for it); the fold overwrites it
            classifier_module(self.student).requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None,
                teacher_features: Optional[list[torch.Tensor]] = None, return_terms: bool = False):
        wants_features = bool(self.student_feature_names) and teacher_logits is not None
        student_features = None
        if wants_features or self.text_head_logits:
            logits, features = forward_features(self.student, pixel_values)
            if wants_features:
                student_features = [features[name] for name in self.student_feature_names]
            if self.text_head_logits:
                logits = self.text_head(features[self.text_head.feature])
        else:
            logits = self.student(pixel_values=pixel_values).logits
        if labels is None:
            return SemanticSegmenterOutput(logits=logits)
        if teacher_logits is None and self.distill_loss.requires_teacher:
            # evaluation: the student's weighted cross-entropy only
            ce = cross_entropy(logits, labels, ignore_index=self.distill_loss.ignore_index)
            terms = {"ce": ce, "loss": self.distill_loss.weights["ce"] * ce}
        else:
            shared = {"student_text_logits": logits} if self._text_head_is_linguistic_head() else {}
            terms = self.distill_loss(logits, teacher_logits, labels, student_features=student_features,
                                      teacher_features=teacher_features, **shared)
        if return_terms:
            return {"loss": terms["loss"], "logits": logits, "terms": terms}
        return SemanticSegmenterOutput(loss=terms["loss"], logits=logits)

    def _text_head_is_linguistic_head(self) -> bool:
        """Whether the student's logits (its text head's ``S``) are exactly the pixel-text logits C2VKD's
        linguistic term scores: same projector module, same feature, temperature and class-name
        embeddings. The loss then reads them instead of projecting the feature a second time (the
        projection and its gradient are most of the text head's cost). The embeddings are compared once
        per version of the two buffers (a comparison is a device sync on a GPU)."""
        loss = self.distill_loss
        head = self.text_head
        if not self.text_head_logits or head is None or "ling" not in getattr(loss, "weights", {}):
            return False
        if getattr(loss, "ling_projector", None) is not head.projector or float(loss.ling_tau) != head.tau:
            return False
        names = self.student_feature_names[:len(getattr(loss, "student_channels", []))]  # main pairs, not stages
        if not names or names[loss.ling_feature_index] != head.feature:
            return False
        own, theirs = loss.text_embeddings, head.text_embeddings
        if own is None or own.shape != theirs.shape:
            return False
        key = (own.data_ptr(), own._version, own.device, theirs.data_ptr(), theirs._version, theirs.device)
        if getattr(self, "_same_embeddings", (None, False))[0] != key:
            self._same_embeddings = (key, bool(torch.equal(own, theirs.to(own))))
        return self._same_embeddings[1]


class SafeCheckpointTrainer(Trainer):
    """``Trainer`` whose checkpoints are safe against a kill at any moment (SIGKILL, out-of-memory
    killer, preemption) and which stops on a non-finite loss with :class:`NonFiniteLossError`.
    Subclasses' ``compute_loss`` returns a per-batch mean, which the Trainer divides by the
    gradient-accumulation steps (``model_accepts_loss_kwargs = loss_is_scaled_for_ga = False``).

    Atomic checkpoints, by a commit marker: ``Trainer._save_checkpoint`` writes straight into
    ``checkpoint-N`` (weights, projectors, optimizer, scheduler, RNG state) and writes
    ``trainer_state.json`` last, so that file marks a finished save. A checkpoint is *complete* only
    when ``trainer_state.json`` parses and every file resume reads is present
    (:func:`checkpoint_problems`). Before a folder is (re)written its old marker is removed, so a
    half-rewritten folder never looks complete. Resuming (:func:`last_complete_checkpoint`, which the
    scripts use, and ``train(resume_from_checkpoint=True)``) skips incomplete folders with a warning
    and takes the newest complete one; a named incomplete checkpoint is rejected with the list of
    what is missing. This is simpler than writing into a temporary folder and renaming it
    (``Trainer``'s best-model bookkeeping, hub pushes and checkpoint rotation all assume the final
    name) and gives the same guarantee. It does not cover power loss (``Trainer`` does not ``fsync``).
    ``training_args.bin`` is written without ``hub_token``.
    """

    def __init__(self, *args, phase: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean: the Trainer must divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        use_console_callbacks(self, phase)

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        values = [value.detach().float().reshape(-1) for value in terms.values()]
        if values and bool(torch.isfinite(torch.cat(values)).all()):
            return  # one check (one device sync on a GPU) per step; the loop below names the culprit
        for name, value in terms.items():
            if not torch.isfinite(value.detach()).all():
                raise NonFiniteLossError(
                    f"Loss term '{name}' became {value.item()} at step {self.state.global_step}. Training was "
                    f"stopped; the last good checkpoint in {self.args.output_dir} is kept. Lower the learning "
                    f"rate or this term's weight, or use float32.")

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        token, self.args.hub_token = self.args.hub_token, None  # Trainer._save pickles self.args
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` then the checkpoint's manifest (:func:`~c2vkd_hf.runs.write_manifest`).
        The commit marker and manifest of a folder about to be rewritten are removed first, and again
        when the save fails (full disk, read-only: a :class:`~c2vkd_hf.validation.SaveError`), so a
        half-written checkpoint never looks complete."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

        def uncommit() -> None:
            for name in (TRAINER_STATE_NAME, MANIFEST_NAME):
                if os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))

        with save_errors(folder, cleanup=uncommit if self.args.should_save else None):
            if self.args.should_save:
                uncommit()
            super()._save_checkpoint(model, trial)
            if self.args.should_save and os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
                write_manifest(folder)

    def _run_epoch(self, *args, **kwargs):
        """``Trainer._run_epoch``, skipped once ``max_steps`` are done: ``Trainer`` resumed from the
        final checkpoint of a run whose ``max_steps`` does not end an epoch would train one step more."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _saved_module(self) -> nn.Module:
        """The module whose weights the checkpoints' ``model.safetensors`` holds."""
        return self.accelerator.unwrap_model(self.model)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` means the last *complete* checkpoint in
        ``output_dir``, and a named checkpoint must be complete."""
        require_optimizer = not self.args.save_only_model
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, require_optimizer=require_optimizer)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problems = checkpoint_problems(resume_from_checkpoint, require_optimizer=require_optimizer)
            if problems:
                raise ValueError(f"Can't resume from {resume_from_checkpoint}: it is not a complete checkpoint "
                                 f"({'; '.join(problems)}).")
        if resume_from_checkpoint:
            misfit = checkpoint_fit_problem(resume_from_checkpoint, self._saved_module())
            if misfit:
                raise UserInputError(f"Can't resume from {resume_from_checkpoint}: it holds another model ({misfit}). "
                                     f"Use another --output_dir, or pass --retrain to train from scratch.")
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)


class TeacherTrainer(SafeCheckpointTrainer):
    """The ``Trainer`` for the CNN teacher, with safe checkpoints and the non-finite loss check.

    The loss is pixel cross-entropy with the logits upsampled to the label grid (:func:`cross_entropy`),
    not the model's own loss: models such as UperNet compare logits and labels only at the input
    size, which fails when validation labels are kept at full resolution (``--eval_full_resolution``)
    while images are resized."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"])
        loss = cross_entropy(outputs.logits, inputs["labels"], ignore_index=IGNORE_INDEX)
        if model.training:
            self._check_finite({"loss": loss})
        return (loss, outputs) if return_outputs else loss


class DistillationTrainer(SafeCheckpointTrainer):
    """Trainer that distils ``teacher`` into ``model.student`` with ``model.distill_loss``.

    Args:
        model: a :class:`DistillationModel`.
        teacher: a segmentation model, or ``None`` for ``--method none``.
        teacher_feature_names: names (see :func:`c2vkd_hf.models.forward_features`) of the teacher
            feature maps paired with ``model.student_feature_names``.
        student_mean_std / teacher_mean_std: input normalisations; the batch arrives normalised
            for the student and is re-normalised for the teacher.
        teacher_cache: a :class:`c2vkd_hf.cache.TeacherCache`: the teacher's outputs are replayed from
            it (training batches must carry ``example_index`` and ``geometry``); ``teacher`` is then
            not placed or run.
        teacher_input_scale: the teacher sees each view at this many times the student's resolution
            (online: the batch upsampled bilinearly; cached: the cache was built at that size).
        cutmix_prob: each training example gets a box of another example of its batch pasted in (image and
            labels) with this probability, before the teacher (run live) sees the batch; needs
            ``teacher_cache=None``.
        student_jitter: colour jitter of this strength on the student's view only, after the teacher (live
            or cached) has seen the clean one (``student_mean_std`` says how the batch is normalised).
            Both: :mod:`c2vkd_hf.data.batch_augment`.
        consistent_jitter: the jitter comes before the teacher instead, which then sees the student's very view
            (consistent views, Beyer et al. CVPR 2022); needs ``teacher_cache=None``.
        The teacher arguments become one object, ``self.teacher_source`` (:class:`~c2vkd_hf.teacher.LiveTeacher`
        or :class:`~c2vkd_hf.teacher.CachedTeacher`), whose ``outputs(inputs, device)`` the loss reads.
        All other arguments are :class:`transformers.Trainer`'s.
    """

    def __init__(self, *args, teacher: Optional[nn.Module] = None,
                 teacher_feature_names: Optional[list[str]] = None,
                 student_mean_std: Optional[tuple] = None, teacher_mean_std: Optional[tuple] = None,
                 teacher_cache=None, teacher_input_scale: float = 1.0, cutmix_prob: float = 0.0,
                 student_jitter: float = 0.0, consistent_jitter: bool = False, **kwargs):
        if cutmix_prob > 0 and teacher_cache is not None:
            raise ValueError("CutMix needs the live teacher: a teacher cache holds its outputs on unmixed views")
        if consistent_jitter and (teacher_cache is not None or student_jitter <= 0):
            raise ValueError("consistent_jitter needs student_jitter > 0 and the live teacher (a teacher cache holds "
                             "its outputs on clean views)")
        super().__init__(*args, **kwargs)
        self.cutmix_prob = float(cutmix_prob)
        self.student_jitter = float(student_jitter)
        self.consistent_jitter = bool(consistent_jitter)
        self.student_mean_std = student_mean_std or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self._batch_position = (-1, 0)  # (global step, micro-batches seen at it): seeds each batch's draws
        names = list(teacher_feature_names or [])
        #: where the teacher's outputs come from (:mod:`c2vkd_hf.teacher`); ``None`` for --method none
        self.teacher_source = None
        if teacher_cache is not None:
            self.teacher_source = CachedTeacher(teacher_cache, names, input_scale=teacher_input_scale)
        elif teacher is not None:
            self.teacher_source = LiveTeacher(teacher, names, student_mean_std=student_mean_std,
                                              teacher_mean_std=teacher_mean_std, input_scale=teacher_input_scale)
        if self.teacher_source is not None:
            self.teacher_source.prepare(self.accelerator)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = {}

    # ----------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values, labels = inputs["pixel_values"], inputs.get("labels")
        if not model.training:
            # Evaluation (or prediction): the student alone, no teacher.
            outputs = model(pixel_values=pixel_values, labels=labels)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        key = self._batch_key()
        if self.cutmix_prob > 0:
            inputs = self._cutmix(inputs, key)
            pixel_values, labels = inputs["pixel_values"], inputs.get("labels")
        if self.consistent_jitter:  # the teacher sees the student's jittered view
            pixel_values = self._jitter(pixel_values, key)
            inputs = {**inputs, "pixel_values": pixel_values}
        teacher_logits, teacher_features = (None, None)
        if self.teacher_source is not None:
            teacher_logits, teacher_features = self.teacher_source.outputs(inputs, pixel_values.device)
        if self.student_jitter > 0 and not self.consistent_jitter:  # the student's view only: the teacher saw the clean one
            pixel_values = self._jitter(pixel_values, key)
        outputs = model(pixel_values=pixel_values, labels=labels, teacher_logits=teacher_logits,
                        teacher_features=teacher_features, return_terms=True)
        self._check_finite(outputs["terms"])
        self._accumulate_terms(outputs["terms"])
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _batch_key(self) -> tuple[int, int, int, int]:
        """``(seed, global step, rank, micro-batch)`` of this training batch: seeds its augmentation draws
        (:func:`~c2vkd_hf.data.batch_augment.batch_generator`), so a resumed run draws as an uninterrupted one."""
        step, micro = self._batch_position
        micro = micro + 1 if step == self.state.global_step else 0
        self._batch_position = (self.state.global_step, micro)
        return self.args.seed, self.state.global_step, self.args.process_index, micro

    def _jitter(self, pixel_values: torch.Tensor, key: tuple[int, int, int, int]) -> torch.Tensor:
        """The (normalised) batch with colour jitter of strength ``student_jitter``, drawn for batch ``key``."""
        factors = jitter_factors(pixel_values.shape[0], self.student_jitter, batch_generator("jitter", *key))
        return jitter_normalised(pixel_values, factors, *self.student_mean_std)

    def _cutmix(self, inputs: dict, key: tuple[int, int, int, int]) -> dict:
        """The batch with CutMix applied to its images and labels, drawn for batch ``key``."""
        pixel_values = inputs["pixel_values"]
        masks, partner = cutmix_masks(pixel_values.shape[0], *pixel_values.shape[-2:], self.cutmix_prob,
                                      batch_generator("cutmix", *key))
        mixed = {**inputs, "pixel_values": apply_cutmix(pixel_values, masks, partner)}
        if inputs.get("labels") is not None:
            mixed["labels"] = apply_cutmix(inputs["labels"], masks, partner)
        return mixed

    def _accumulate_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Sums every term (and its weighted value at this step's schedule) until the next log."""
        weights = self.accelerator.unwrap_model(self.model).distill_loss.effective_weights()
        for name, value in terms.items():
            if name == "loss":
                continue
            value = value.detach().float()
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
            self._term_sums[f"{name}@weighted"] = self._term_sums.get(f"{name}@weighted", 0.0) + value * weights[name]
            self._term_counts[name] = self._term_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds the mean of every loss term since the last log, unweighted (``loss/<term>``) and
        weighted at the steps' scheduled weights (``loss_weighted/<term>``), averaged across processes.
        A term not computed at some steps (a scheduled weight at 0) is averaged over the steps that had it."""
        if "loss" in logs and self._term_counts:
            keys = sorted(self._term_sums)
            stacked = torch.stack([torch.as_tensor(self._term_sums[k], device=self.args.device)
                                   / self._term_counts[k.split("@")[0]] for k in keys])
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.reduce(stacked, reduction="mean")
            for key, value in zip(keys, stacked.tolist()):
                name, weighted = key.split("@")[0], key.endswith("@weighted")
                logs[f"loss_weighted/{name}" if weighted else f"loss/{name}"] = round(value, 6)
            self._term_sums, self._term_counts = {}, {}
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------- saving
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        self._saving_checkpoint = _internal_call
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Saves the plain student (and, in checkpoints, the projectors beside it)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        wrapper.student.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if getattr(self, "_saving_checkpoint", False):
            extra = distillation_module_state(wrapper)
            if extra:
                save_file(extra, os.path.join(output_dir, DISTILLATION_MODULES_NAME))
        else:
            write_text_head(wrapper, output_dir)
        torch.save(args_without_token(self.args), os.path.join(output_dir, "training_args.bin"))

    def _saved_module(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).student

    def _load_student_and_modules(self, folder: str) -> None:
        """Restores the student (through ``from_pretrained``, which maps transformers' on-disk key
        names) and the projectors of a checkpoint folder."""
        wrapper = self.accelerator.unwrap_model(self.model)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"Can't find a valid checkpoint at {folder} (no config.json).")
        saved = type(wrapper.student).from_pretrained(folder)
        wrapper.student.load_state_dict(saved.state_dict(), strict=True)
        extra = os.path.join(folder, DISTILLATION_MODULES_NAME)
        if os.path.isfile(extra):
            missing, unexpected = wrapper.load_state_dict(load_file(extra, device="cpu"), strict=False)
            missing = [k for k in missing if not k.startswith("student.")]
            if missing or unexpected:
                raise ValueError(f"{extra} does not match this run's projectors and text head (missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}): was it made with other flags?")
        elif distillation_module_state(wrapper):
            logger.warning("%s has no %s: projectors start from scratch.", folder, DISTILLATION_MODULES_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_student_and_modules(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_student_and_modules(self.state.best_model_checkpoint)


def distillation_module_state(wrapper: DistillationModel) -> dict[str, torch.Tensor]:
    """Everything the wrapper trains besides the student (the loss module's projectors, the text head),
    as CPU copies keyed by their names in the wrapper (a projector shared by the head and the
    linguistic term appears under both names)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in wrapper.state_dict().items()
            if not k.startswith("student.")}


def args_without_token(args):
    """A shallow copy of ``TrainingArguments`` without ``hub_token``, for ``training_args.bin``."""
    safe = copy.copy(args)
    safe.hub_token = None
    return safe


# --------------------------------------------------------------------------------------------- checkpoints
def checkpoint_problems(folder: str, *, require_optimizer: bool = True) -> list[str]:
    """What makes ``folder`` an incomplete checkpoint (an empty list: it is complete).

    Complete means: ``trainer_state.json`` (written last) parses, the config, the weights and, with
    ``require_optimizer`` (unless ``save_only_model``), the optimizer, scheduler and RNG state are
    present, and the files verify against the checkpoint's manifest (sizes and SHA-256; without a
    manifest, no file is truncated: :func:`~c2vkd_hf.runs.manifest_problems`).
    """
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    problems = []
    try:
        with open(os.path.join(folder, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            json.load(handle)["global_step"]
    except FileNotFoundError:
        problems.append(f"no {TRAINER_STATE_NAME} (the save did not finish)")
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"{TRAINER_STATE_NAME} is unreadable or truncated ({type(error).__name__})")
    files = set(os.listdir(folder))
    if "config.json" not in files:
        problems.append("no config.json")
    if not files & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}:
        problems.append("no model weights (model.safetensors)")
    if require_optimizer:
        problems += [f"no {name}" for name in ("optimizer.pt", "scheduler.pt") if name not in files]
        if not any(name.startswith("rng_state") for name in files):
            problems.append("no rng_state.pth")
    return problems or manifest_problems(folder)


def last_complete_checkpoint(output_dir: str, *, require_optimizer: bool = True) -> Optional[str]:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (``None`` if there is none);
    incomplete ones (a save interrupted by a kill) are skipped with a warning.

    The folders are listed and ordered by step with transformers' ``sort_checkpoints`` (the order its
    own checkpoint rotation uses). ``get_last_checkpoint`` does not fit here: it returns only the
    newest folder, while this function must fall back to older ones when the newest fails
    :func:`checkpoint_problems` (which includes the manifest check of :mod:`c2vkd_hf.runs`)."""
    if not os.path.isdir(output_dir):
        return None
    names = [os.path.basename(path) for path in sort_checkpoints(output_dir, PREFIX_CHECKPOINT_DIR)]
    for name in reversed([n for n in names if _CHECKPOINT_RE.match(n)]):  # newest first
        folder = os.path.join(output_dir, name)
        problems = checkpoint_problems(folder, require_optimizer=require_optimizer)
        if not problems:
            return folder
        logger.warning("Skipping the incomplete or damaged checkpoint %s (%s): it was interrupted while being "
                       "written or deleted, or a file was damaged since.", folder, "; ".join(problems))
    return None


def text_head_of(wrapper: DistillationModel) -> Optional[TextHead]:
    """The student's text head: the one it classifies with (``--text_head``), else a view of C2VKD's
    linguistic projector and class-name embeddings (what the text query needs); ``None`` without either."""
    if wrapper.text_head is not None:
        return wrapper.text_head
    loss = wrapper.distill_loss
    projector = getattr(loss, "ling_projector", None)
    if projector is None:
        return None
    feature = wrapper.student_feature_names[loss.ling_feature_index]
    return TextHead(projector, loss.text_embeddings, feature, loss.ling_tau)


def write_text_head(wrapper: DistillationModel, output_dir: str) -> Optional[str]:
    """Saves the student's text head (:func:`text_head_of`) as ``text_head.safetensors`` beside the plain
    student (``from_pretrained`` ignores it); returns the path, or ``None`` without a head."""
    head = text_head_of(wrapper)
    return save_text_head(head, output_dir) if head is not None else None


def text_head_fold_problem(student: nn.Module, head: TextHead) -> Optional[str]:
    """Why ``head`` cannot be the classifier of ``student`` (``None`` when it can): the student needs a final
    1x1 classifier, and the head must read that classifier's input (feature ``decoder``) and score as
    many classes as it predicts."""
    classifier = classifier_module(student)
    if classifier is None:
        return "the student has no final 1x1 convolution classifier to fold the text head into"
    if head.feature != DECODER_FEATURE:
        return (f"the head reads the student feature {head.feature!r}, not the classifier's input "
                f"{DECODER_FEATURE!r}")
    if classifier.out_channels != len(head.text_embeddings):
        return f"{len(head.text_embeddings)} class-name embeddings for a classifier of {classifier.out_channels} classes"
    return None


class FoldTextHeadCallback(TrainerCallback):
    """At the end of training (before the final evaluation and save), writes the text head into the
    student's own 1x1 classifier (:meth:`~c2vkd_hf.text_head.TextHead.fold_into`), so the saved
    student is a plain ``AutoModelForSemanticSegmentation`` that classifies like the head."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        wrapper = extract_model_from_parallel(model)
        if wrapper.text_head is None or not wrapper.text_head_logits:
            return
        classifier = classifier_module(wrapper.student)
        wrapper.text_head.fold_into(classifier)
        wrapper.text_head_logits = False  # from now on the folded classifier is the text head
        classifier.requires_grad_(True)
        logger.info("The student's classifier is now its text head (projector and class-name embeddings), folded.")


class LossScheduleCallback(TrainerCallback):
    """Sets the loss module's ``progress`` (step / max_steps) before each step, which its term weight
    schedules read (:mod:`c2vkd_hf.losses.schedule`)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        loss = getattr(extract_model_from_parallel(model), "distill_loss", None)
        if loss is not None and state.max_steps:
            loss.progress = state.global_step / state.max_steps


def parse_feature_pairs(spec: Optional[str]) -> list[tuple[str, str]]:
    """``"stage4:stage4,stage3:stage3"`` -> ``[("stage4", "stage4"), ("stage3", "stage3")]``."""
    if not spec:
        return []
    pairs = []
    for item in spec.split(","):
        if item.count(":") != 1 or not all(part.strip() for part in item.split(":")):
            raise ValueError(f"--feature_pairs entry '{item}' must look like student_name:teacher_name.")
        student_name, teacher_name = (part.strip() for part in item.split(":"))
        pairs.append((student_name, teacher_name))
    return pairs

