"""Trainer callbacks of the distillation job: the text head folded at the end, the loss terms' schedules."""

from __future__ import annotations

import logging

from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

from ..models import classifier_module

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
