"""``DistillationTrainer``: the teacher's outputs (live or cached) for each training batch, every loss term logged,
and the plain student saved."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import VALID_SIZES
from ..teacher import CachedTeacher, LiveTeacher
from .base import SafeCheckpointTrainer
from .checkpoints import args_without_token
from .model import distillation_module_state, write_text_head

logger = logging.getLogger(__name__)

DISTILLATION_MODULES_NAME = "distillation_modules.safetensors"


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
        The teacher arguments become one object, ``self.teacher_source`` (:class:`~c2vkd_hf.teacher.LiveTeacher`
        or :class:`~c2vkd_hf.teacher.CachedTeacher`), whose ``outputs(inputs, device)`` the loss reads.
        All other arguments are :class:`transformers.Trainer`'s.
    """

    def __init__(self, *args, teacher: Optional[nn.Module] = None,
                 teacher_feature_names: Optional[list[str]] = None,
                 student_mean_std: Optional[tuple] = None, teacher_mean_std: Optional[tuple] = None,
                 teacher_cache=None, teacher_input_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
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
            outputs = model(pixel_values=pixel_values, labels=labels, valid_sizes=inputs.get(VALID_SIZES))
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        teacher_logits, teacher_features = (None, None)
        if self.teacher_source is not None:
            teacher_logits, teacher_features = self.teacher_source.outputs(inputs, pixel_values.device)
        outputs = model(pixel_values=pixel_values, labels=labels, teacher_logits=teacher_logits,
                        teacher_features=teacher_features, return_terms=True)
        self._check_finite(outputs["terms"])
        self._accumulate_terms(outputs["terms"])
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

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
    def _write_model(self, output_dir: str, *, checkpoint: bool) -> None:
        """Saves the plain student (``save_pretrained``: weights and config), the image processor and
        ``training_args.bin``; beside them, in Trainer's own saves (checkpoints), the projectors and text head
        (``distillation_modules.safetensors``, what resume restores), else the text head as
        ``text_head.safetensors`` (what the text query reads). Only the process that saves writes."""
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        wrapper.student.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if checkpoint:
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
        """Resume: the student and the projectors of the checkpoint (``Trainer``'s own loading would put
        ``model.safetensors``, the bare student, into the wrapper and match none of its keys)."""
        self._load_student_and_modules(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the student and the projectors of the best checkpoint, for the
        same reason."""
        self._load_student_and_modules(self.state.best_model_checkpoint)
