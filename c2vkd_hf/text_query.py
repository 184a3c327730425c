"""Text-query segmentation with a C2VKD student: score its pixels against any class name.

C2VKD's linguistic term (``c2vkd_hf.losses.vlfd``) trains a 1x1 projector ``P_l`` that maps one student
feature map into CLIP's text space. The final save of a C2VKD run writes it beside the plain student
as ``text_head.safetensors`` (``c2vkd_hf.trainer.save_text_head``: ``projector.weight``/``projector.bias``,
the training classes' ``text_embeddings`` and metadata ``feature``/``tau``). With it:

    from c2vkd_hf.text_query import load_text_head, segment_by_text
    student = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    head = load_text_head(folder)
    logits = segment_by_text(student, head, pixel_values, embeddings)   # (B, K', h, w)

``embeddings`` are ``(K', D)`` CLIP text embeddings of any class names (same CLIP model as in
training; ``None``: the training classes). The logits are ``normalise(P_l(F)) E^T / tau`` on the grid of
the student feature ``F`` named in the head (e.g. SegFormer ``stage4``, stride 32): upsample them for
a full-resolution map. :class:`TextQuerySegmenter` wraps a student and a vocabulary as a model whose
``logits`` are these scores, so every evaluation helper (``pipeline.evaluate_model``) applies.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .losses.vlfd import pixel_text_logits
from .models import forward_features
from .trainer import TEXT_HEAD_NAME

__all__ = ["TEXT_HEAD_NAME", "TextHead", "TextQuerySegmenter", "load_text_head", "segment_by_text"]


class TextHead(nn.Module):
    """The linguistic projector of a C2VKD student and the text embeddings it was trained against.

    Attributes: ``projector`` (1x1 conv C -> D), ``text_embeddings`` ((K, D) buffer, L2-normalised),
    ``feature`` (the student feature name it reads), ``tau`` (pixel-text temperature),
    ``class_names`` (the K training class names when known, else ``None``).
    """

    def __init__(self, projector: nn.Conv2d, text_embeddings: torch.Tensor, feature: str, tau: float,
                 class_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.projector = projector
        self.register_buffer("text_embeddings", nn.functional.normalize(text_embeddings.float(), dim=1))
        self.feature = str(feature)
        self.tau = float(tau)
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.text_embeddings.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.text_embeddings.shape[0]} text embeddings")

    def forward(self, feature_map: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, h, w) student feature -> (B, K', h, w) pixel-text logits."""
        emb = self.text_embeddings if text_embeddings is None else text_embeddings
        emb = emb.to(device=feature_map.device)
        if emb.dim() != 2 or emb.shape[1] != self.projector.out_channels:
            raise ValueError(f"text embeddings must be (K, {self.projector.out_channels}), got {tuple(emb.shape)}")
        return pixel_text_logits(self.projector(feature_map.to(self.projector.weight.dtype)), emb, tau=self.tau)


def load_text_head(folder_or_file: str | os.PathLike, *, device: str | torch.device = "cpu") -> TextHead:
    """Reads ``text_head.safetensors`` (a folder holding it, or the file itself). The class names come
    from ``id2label`` of the ``config.json`` beside it when it has one entry per embedding."""
    path = os.fspath(folder_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, TEXT_HEAD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: only a C2VKD student trained with the linguistic term (text embeddings) "
            "has a text head")
    with safe_open(path, framework="pt", device=str(device)) as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    missing = {"projector.weight", "projector.bias", "text_embeddings"} - set(tensors)
    if missing or "feature" not in meta or "tau" not in meta:
        raise ValueError(f"{path} is not a text head (missing {sorted(missing) or 'feature/tau metadata'})")
    weight = tensors["projector.weight"]
    projector = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
    with torch.no_grad():
        projector.weight.copy_(weight)
        projector.bias.copy_(tensors["projector.bias"])
    names = None
    config = os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as fh:
            id2label = json.load(fh).get("id2label") or {}
        if len(id2label) == tensors["text_embeddings"].shape[0]:
            names = [id2label[str(i)] if str(i) in id2label else id2label.get(i) for i in range(len(id2label))]
    head = TextHead(projector, tensors["text_embeddings"], meta["feature"], float(meta["tau"]), names)
    return head.to(device).eval()


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
    prediction (for ``pipeline.evaluate_model``, sliding windows, test-time augmentation)."""

    def __init__(self, student: nn.Module, head: TextHead, text_embeddings: Optional[torch.Tensor] = None):
        super().__init__()
        self.student = student
        self.head = head
        emb = head.text_embeddings if text_embeddings is None else torch.as_tensor(text_embeddings).float()
        self.register_buffer("vocabulary", emb)

    def forward(self, pixel_values: torch.Tensor, **_: object) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=segment_by_text(self.student, self.head, pixel_values, self.vocabulary))
