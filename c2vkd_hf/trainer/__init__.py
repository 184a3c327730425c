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

Modules: :mod:`.model` (:class:`DistillationModel` and where its text head may fold), :mod:`.base`
(:class:`SafeCheckpointTrainer`, :class:`TeacherTrainer`), :mod:`.checkpoints` (what a complete checkpoint is),
:mod:`.distillation` (:class:`DistillationTrainer`), :mod:`.callbacks` (the text head's fold, the loss schedules).
"""

from .base import NonFiniteLossError, SafeCheckpointTrainer, TeacherTrainer
from .callbacks import PREEMPTION_SIGNALS, FoldTextHeadCallback, LossScheduleCallback, PreemptionCallback
from .checkpoints import TRAINER_STATE_NAME, args_without_token, checkpoint_problems, last_complete_checkpoint
from .distillation import DISTILLATION_MODULES_NAME, DistillationTrainer
from .model import (DistillationModel, TextHeadFoldError, distillation_module_state, text_head_fold_problem,
                    text_head_of, write_text_head)

__all__ = [
    "PREEMPTION_SIGNALS", "PreemptionCallback",
    "NonFiniteLossError", "SafeCheckpointTrainer", "TeacherTrainer", "FoldTextHeadCallback", "LossScheduleCallback",
    "TRAINER_STATE_NAME", "args_without_token", "checkpoint_problems", "last_complete_checkpoint",
    "DISTILLATION_MODULES_NAME", "DistillationTrainer", "DistillationModel", "TextHeadFoldError",
    "distillation_module_state", "text_head_fold_problem", "text_head_of", "write_text_head",
]
