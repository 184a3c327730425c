"""The module the Trainer optimises (student, loss module with its projectors, optional text head), and the text
head's place in it: whether it can become the student's classifier, and where it is saved."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..data import unpad_to_labels
from ..losses.common import cross_entropy
from ..models import DECODER_FEATURE, classifier_module, forward_features
from ..text_head import TextHead, save_text_head


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
                teacher_features: Optional[list[torch.Tensor]] = None, return_terms: bool = False,
                valid_sizes: Optional[torch.Tensor] = None):
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
        if valid_sizes is not None and labels is not None:  # a padded evaluation batch: each image onto its label
            logits = unpad_to_labels(logits, valid_sizes, pixel_values.shape[-2:], labels.shape[-2:])
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
        """Whether the loss reads the student's logits (its text head's ``S``) as its linguistic term's pixel-text
        logits (:meth:`~c2vkd_hf.losses.DistillationLoss.reads_text_head`) instead of projecting the feature a
        second time (the projection and its gradient are most of the text head's cost)."""
        return (self.text_head_logits and self.text_head is not None and
                self.distill_loss.reads_text_head(self.text_head, self.student_feature_names))


def distillation_module_state(wrapper: DistillationModel) -> dict[str, torch.Tensor]:
    """Everything the wrapper trains besides the student (the loss module's projectors, the text head),
    as CPU copies keyed by their names in the wrapper (a projector shared by the head and the
    linguistic term appears under both names)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in wrapper.state_dict().items()
            if not k.startswith("student.")}


def text_head_of(wrapper: DistillationModel) -> Optional[TextHead]:
    """The student's text head: the one it classifies with (``--text_head``), else a view of C2VKD's
    linguistic projector and class-name embeddings (what the text query needs); ``None`` without either."""
    if wrapper.text_head is not None:
        return wrapper.text_head
    linguistic = wrapper.distill_loss.linguistic_head(wrapper.student_feature_names)
    return None if linguistic is None else TextHead(*linguistic)


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
        return (f"{len(head.text_embeddings)} class-name embeddings for a classifier of {classifier.out_channels} "
                "classes")
    return None
