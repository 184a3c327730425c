"""Text-query segmentation with a C2VKD student: score its pixels against any class name.

C2VKD's linguistic term (``c2vkd_hf.losses.vlfd``) trains a 1x1 projector ``P_l`` that maps one student
feature map into CLIP's text space. The final save of a C2VKD run writes it beside the plain student
as ``text_head.safetensors`` (:mod:`c2vkd_hf.text_head`: ``projector.weight``/``projector.bias``,
the training classes' ``text_embeddings`` and metadata ``feature``/``tau``). With it:

    from c2vkd_hf.text_query import load_text_head, segment_by_text
    student = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    head = load_text_head(folder)
    logits = segment_by_text(student, head, pixel_values, embeddings)   # (B, K', h, w)

``embeddings`` are ``(K', D)`` CLIP text embeddings of any class names (same CLIP model as in
training; ``None``: the training classes). The logits are ``normalise(P_l(F)) E^T / tau`` on the grid of
the student feature ``F`` named in the head (e.g. SegFormer ``stage4``, stride 32): upsample them for
a full-resolution map. :class:`TextQuerySegmenter` wraps a student and a vocabulary as a model whose
``logits`` are these scores, so every evaluation helper (``inference.evaluate_model``) applies.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .models import forward_features
from .text_head import TEXT_HEAD_NAME, TextHead, load_text_head

__all__ = ["TEXT_HEAD_NAME", "TextHead", "TextQuerySegmenter", "load_text_head", "segment_by_text"]


def segment_by_text(student: nn.Module, head: TextHead, pixel_values: torch.Tensor,
                    text_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixel-text logits (B, K', h, w) of ``student`` for ``text_embeddings`` (K', D) (default: the
    head's training classes), on the grid of the student feature ``head.feature``; one forward pass."""
    _, features = forward_features(student, pixel_values)
    if head.feature not in features:
        raise ValueError(f"the student has no feature {head.feature!r} (it has {sorted(features)})")
    return head(features[head.feature], text_embeddings)


class TextQuerySegmenter(nn.Module):
    """A segmentation model made of a student, its text head and a fixed vocabulary: ``forward``
    returns ``SemanticSegmenterOutput(logits=segment_by_text(...))``, so the vocabulary's argmax is the
    prediction (for ``inference.evaluate_model``, sliding windows, test-time augmentation)."""

    def __init__(self, student: nn.Module, head: TextHead, text_embeddings: Optional[torch.Tensor] = None):
        super().__init__()
        self.student = student
        self.head = head
        emb = head.text_embeddings if text_embeddings is None else torch.as_tensor(text_embeddings).float()
        self.register_buffer("vocabulary", emb)

    def forward(self, pixel_values: torch.Tensor, **_: object) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=segment_by_text(self.student, self.head, pixel_values, self.vocabulary))
