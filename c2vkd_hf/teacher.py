"""The teacher as one object: its logits and feature maps for a training batch, from the live model or its cache.

The trainer asks a teacher for ``outputs(inputs, device) -> (logits, features)`` and does not care where
they come from (the pattern of timm's distillation task, where the teacher owns its normalisation and
is always frozen):

* :class:`LiveTeacher` runs a frozen CNN on the batch. It owns its input: the batch arrives normalised
  for the student and is re-normalised with the teacher's mean/std, and (``input_scale``) enlarged to
  the resolution the teacher works best at (a CNN is not scale-invariant; CamVid's reference teacher was
  trained at 1.5x the student's 120x160).
* :class:`CachedTeacher` replays the same maps from a :class:`~c2vkd_hf.cache.TeacherCache` under each
  example's training view (crop, rescale, flip), so the teacher never runs during training.

``features`` is ``None`` when no feature map is asked for (logit-only methods).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .models import forward_features, renormalize

__all__ = ["LiveTeacher", "CachedTeacher", "TeacherOutputs"]

TeacherOutputs = tuple[torch.Tensor, Optional[list[torch.Tensor]]]


class LiveTeacher:
    """A frozen teacher model run on every training batch.

    Args:
        model: a segmentation model (``logits``; feature maps by name through
            :func:`c2vkd_hf.models.forward_features`).
        feature_names: the teacher feature maps to return, in pair order.
        student_mean_std / teacher_mean_std: input normalisations (``None``: the batch is passed as is).
        input_scale: the teacher sees the batch enlarged this many times (bilinear; antialiased when < 1).
    """

    def __init__(self, model: nn.Module, feature_names: Sequence[str] = (), *,
                 student_mean_std: Optional[tuple] = None, teacher_mean_std: Optional[tuple] = None,
                 input_scale: float = 1.0):
        self.model = model
        self.feature_names = list(feature_names)
        self.student_mean_std = student_mean_std
        self.teacher_mean_std = teacher_mean_std
        self.input_scale = float(input_scale)

    def prepare(self, accelerator) -> None:
        """Eval mode, no gradients, placed by ``accelerator`` (right device and precision, no DDP wrapper)."""
        self.model.eval()
        self.model.requires_grad_(False)
        self.model = accelerator.prepare_model(self.model, evaluation_mode=True)

    def teacher_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The student's batch as this teacher wants it: re-normalised, then rescaled by ``input_scale``."""
        if self.student_mean_std is not None and self.teacher_mean_std is not None:
            pixel_values = renormalize(pixel_values, *self.student_mean_std, *self.teacher_mean_std)
        if self.input_scale != 1.0:
            size = [int(round(v * self.input_scale)) for v in pixel_values.shape[-2:]]
            pixel_values = nn.functional.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False,
                                                     antialias=self.input_scale < 1.0)
        return pixel_values

    @torch.no_grad()
    def outputs(self, inputs: dict, device=None) -> TeacherOutputs:
        pixel_values = self.teacher_input(inputs["pixel_values"])
        if self.feature_names:
            logits, features = forward_features(self.model, pixel_values)
            return logits.detach(), [features[name].detach() for name in self.feature_names]
        return self.model(pixel_values=pixel_values).logits.detach(), None


class CachedTeacher:
    """The teacher's outputs replayed from a :class:`~c2vkd_hf.cache.TeacherCache` (built at the data's
    reference size times ``input_scale``) for the batch's examples (``example_index``) under their
    training views (``geometry``)."""

    def __init__(self, cache, feature_names: Sequence[str] = (), *, input_scale: float = 1.0):
        self.cache = cache
        self.feature_names = list(feature_names)
        self.input_scale = float(input_scale)

    def prepare(self, accelerator) -> None:
        """Nothing to place: the maps are read to the batch's device as they are replayed."""

    def outputs(self, inputs: dict, device=None) -> TeacherOutputs:
        from .data import INDEX_COLUMN

        if INDEX_COLUMN not in inputs or "geometry" not in inputs:
            raise ValueError("a teacher cache needs batches with 'example_index' and 'geometry' (the training "
                             "transform's return_index=True and return_geometry=True, on a dataset with an "
                             "example_index column)")
        logits, features = self.cache.replay(inputs[INDEX_COLUMN], inputs["geometry"], self.feature_names,
                                             device=device, view_scale=self.input_scale)
        return logits, (features if self.feature_names else None)
