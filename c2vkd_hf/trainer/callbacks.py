"""Trainer callbacks: the text head folded at the end, the loss terms' schedules, checkpoint-and-stop on preemption,
the commit of each checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

from .. import runs
from ..models import classifier_module
from .checkpoints import TRAINER_STATE_NAME, uncommit_checkpoint

logger = logging.getLogger(__name__)


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


#: The signals a scheduler sends before it kills a job (SLURM, Kubernetes, spot instances: SIGTERM; SLURM's
#: ``--signal=USR1@<seconds>``: SIGUSR1).
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionCallback(TrainerCallback):
    """Checkpoint, then stop, when the scheduler says the job is about to be killed.

    While training, SIGTERM and SIGUSR1 only set a flag (the handler does no work). At the end of the optimizer
    step in progress every process reads it (under several processes the flags are combined with one ``MAX``
    all-reduce per step, so all ranks stop after the same step and save one consistent checkpoint, whichever rank
    got the signal), the Trainer saves a checkpoint (:class:`~c2vkd_hf.trainer.SafeCheckpointTrainer`'s verified
    save) and training stops; the job then exits with :data:`~c2vkd_hf.jobs.EXIT_PREEMPTED`. The same command
    resumes from that checkpoint. A second signal while the first is handled restores the default action and
    re-raises it (a scheduler's or user's insistence kills at once)."""

    def __init__(self):
        self.received: Optional[str] = None
        self.stopped_at: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:  # a second signal: the default action now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.received = name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.stopped_at = None, None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in PREEMPTION_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _any_rank_received(self, args) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = args.device if dist.get_backend() == "nccl" else "cpu"
            value = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flag = bool(value.item())
            if flag and self.received is None:
                self.received = "a signal to another process"
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class CheckpointCommitCallback(TrainerCallback):
    """Makes each checkpoint commit after its last file: the folder's old commit marker and manifest go before
    anything is written into it, its manifest (:func:`~c2vkd_hf.runs.write_manifest`) comes after
    ``trainer_state.json``, the marker ``Trainer`` writes last.

    :class:`~c2vkd_hf.trainer.SafeCheckpointTrainer` calls :meth:`begin` from ``save_model``, which
    ``Trainer._save_checkpoint`` calls first, into ``checkpoint-<step>``; ``on_save``, the event that follows
    every checkpoint save, then writes the manifest. Between the two, :attr:`folder` names the checkpoint being
    written, so that a failed save can be uncommitted and reported. The trainer puts this callback first, so the
    manifest exists before any other callback's ``on_save`` sees the folder."""

    def __init__(self):
        #: the checkpoint folder being written (``None`` outside a checkpoint save)
        self.folder: Optional[str] = None

    def begin(self, folder: str, should_save: bool) -> None:
        """A checkpoint save into ``folder`` starts: the process that writes (``should_save``) uncommits it."""
        self.folder = folder
        if should_save:
            uncommit_checkpoint(folder)

    def on_train_begin(self, args, state, control, **kwargs):
        self.folder = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.folder = None  # a save outside _save_checkpoint (hyperparameter search) has no on_save

    def on_save(self, args, state, control, **kwargs):
        folder = self.folder
        if folder is not None and args.should_save and os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            runs.write_manifest(folder)
        self.folder = None
