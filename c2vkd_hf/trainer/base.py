"""The ``Trainer`` base of both jobs: checkpoints safe against a kill, a stop on a non-finite loss; and the teacher's
trainer."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..console import use_console_callbacks
from ..constants import IGNORE_INDEX
from ..data import VALID_SIZES, unpad_to_labels
from ..losses.common import cross_entropy
from ..runs import MANIFEST_NAME, checkpoint_fit_problem, write_manifest
from ..validation import UserInputError, save_errors
from .callbacks import PreemptionCallback
from .checkpoints import TRAINER_STATE_NAME, checkpoint_problems, last_complete_checkpoint


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite during training."""


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
        self.preemption = PreemptionCallback()  # SIGTERM/SIGUSR1: checkpoint after this step, then stop
        self.add_callback(self.preemption)

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
        if inputs.get(VALID_SIZES) is not None:  # a padded evaluation batch: each image onto its own label
            outputs.logits = unpad_to_labels(outputs.logits, inputs[VALID_SIZES], inputs["pixel_values"].shape[-2:],
                                             inputs["labels"].shape[-2:])
        loss = cross_entropy(outputs.logits, inputs["labels"], ignore_index=IGNORE_INDEX)
        if model.training:
            self._check_finite({"loss": loss})
        return (loss, outputs) if return_outputs else loss
