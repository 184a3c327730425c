"""Small pieces the model modules share: a config's label fields, the project models' output, a model's type."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput


def label_kwargs(id2label: Mapping[int, str]) -> dict[str, Any]:
    """``id2label``, ``label2id`` and ``num_labels`` config arguments for class names with ids 0..K-1."""
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label keys must be 0..K-1, got {sorted(id2label)}")
    return dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))


def segmenter_output(logits: torch.Tensor, labels: torch.Tensor | None, hidden_states: tuple | None,
                     return_dict: bool, ignore_index: int) -> SemanticSegmenterOutput | tuple:
    """The output of the project's segmentation models: with ``labels``, the cross-entropy of the
    logits upsampled (bilinear) to the label grid; a ``SemanticSegmenterOutput`` or, without
    ``return_dict``, the tuple ``(loss?, logits, hidden_states?)``."""
    loss = None
    if labels is not None:
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(upsampled, labels.long(), ignore_index=ignore_index)
    if not return_dict:
        out = (logits,) + ((hidden_states,) if hidden_states is not None else ())
        return ((loss,) + out) if loss is not None else out
    return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


def model_type_of(model: nn.Module) -> str:
    """The model's ``config.model_type``, else its class name."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__
