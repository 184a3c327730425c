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
from ..runs import checkpoint_fit_problem
from ..validation import UserInputError, is_write_failure, save_errors
from .callbacks import CheckpointCommitCallback, PreemptionCallback
from .checkpoints import checkpoint_problems, last_complete_checkpoint, uncommit_checkpoint


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
    half-rewritten folder never looks complete; after the marker comes the checkpoint's manifest, its
    files ``fsync``-ed first (:class:`~c2vkd_hf.trainer.callbacks.CheckpointCommitCallback`, started by
    :meth:`save_model`, finished on the ``on_save`` event). A write failure during a checkpoint save
    (full disk, read-only) removes that folder's marker and manifest again and is raised as a
    :class:`~c2vkd_hf.validation.SaveError`. Resuming (:func:`last_complete_checkpoint`, which the
    scripts use, and ``train(resume_from_checkpoint=True)``) skips incomplete folders with a warning
    and takes the newest complete one; a named incomplete checkpoint is rejected with the list of
    what is missing. This is simpler than writing into a temporary folder and renaming it
    (``Trainer``'s best-model bookkeeping, hub pushes and checkpoint rotation all assume the final
    name) and gives the same guarantee. ``training_args.bin`` is written without ``hub_token``.
    The private ``Trainer`` methods overridden here and in the subclasses, and why: docs/DESIGN.md,
    "Private Trainer methods"; ``tests/test_trainer_overrides.py`` checks their signatures and call order.
    """

    def __init__(self, *args, phase: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean: the Trainer must divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        use_console_callbacks(self, phase)
        self.preemption = PreemptionCallback()  # SIGTERM/SIGUSR1: checkpoint after this step, then stop
        self.add_callback(self.preemption)
        #: uncommits a checkpoint folder before it is written, writes its manifest after trainer_state.json;
        #: first in line, so no other callback's on_save sees a checkpoint without its manifest
        self.checkpoint_commit = CheckpointCommitCallback()
        self.callback_handler.callbacks.insert(0, self.checkpoint_commit)

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

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, with ``hub_token`` cleared while the files are written (``Trainer`` pickles
        its arguments into ``training_args.bin``) and back for the Hub push that a user's call makes.

        ``Trainer._save_checkpoint`` calls it first with ``_internal_call=True`` and ``checkpoint-<step>``:
        such a save starts the checkpoint's commit (:class:`CheckpointCommitCallback`: the folder's old marker
        and manifest are removed before anything is written). What is written: :meth:`_write_model`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call and os.path.basename(os.path.normpath(output_dir)) == \
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}":
            self.checkpoint_commit.begin(output_dir, self.args.should_save)
        token, self.args.hub_token = self.args.hub_token, None
        try:
            self._write_model(output_dir, checkpoint=_internal_call)
        finally:
            self.args.hub_token = token
        if self.args.push_to_hub and not _internal_call:  # what Trainer.save_model does after saving
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _write_model(self, output_dir: str, *, checkpoint: bool) -> None:
        """Writes the model's files into ``output_dir``. ``checkpoint``: a save ``Trainer`` makes itself (a
        checkpoint, or the folder ``push_to_hub`` uploads), not the user's final ``save_model``. Here:
        ``Trainer.save_model`` (weights, config, processor, ``training_args.bin``), without its Hub push."""
        super().save_model(output_dir, _internal_call=True)

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
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        except (OSError, RuntimeError) as error:
            folder = self.checkpoint_commit.folder  # set while a checkpoint is being written
            if folder is None or not is_write_failure(error):
                raise
            cleanup = (lambda: uncommit_checkpoint(folder)) if self.args.should_save else None
            with save_errors(folder, cleanup=cleanup):
                raise error


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
