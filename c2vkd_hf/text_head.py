"""The text head: a student's classifier made of a learned projection and fixed CLIP class-name embeddings.

A text head scores each pixel's feature ``F`` (the input of the student's final 1x1 classifier,
feature ``decoder``) against the L2-normalised text embeddings ``E`` (K, D) of the class names:

``S = normalise(P F) E^T / tau``   (``P``: a learned 1x1 conv C -> D; ``tau``: temperature)

It is C2VKD's linguistic projector (Zheng et al., arXiv 2310.07265, VLFD) used as a cosine classifier
(as in MaskCLIP, Zhou et al. ECCV 2022, and DenseCLIP, Rao et al. CVPR 2022, which score dense features
against CLIP text embeddings). With ``--text_head`` any method (``none``, ``kd``, ``cwd``, ``dist``,
``dkd``, ``c2vkd``) trains it as the student's classifier from the first step; at the end
:meth:`TextHead.fold_into` writes it into the student's own 1x1 classifier, so the saved student stays a
plain ``AutoModelForSemanticSegmentation``. The head itself is also saved beside the student as
``text_head.safetensors`` (``projector.weight``/``projector.bias``, ``text_embeddings``, metadata
``feature``/``tau``), which the text query (:mod:`c2vkd_hf.text_query`) reads to score pixels against
any class name.

Learned rows: a class whose name has no text embedding (an unmatched name of the built-in vocabulary,
:mod:`c2vkd_hf.vocabulary`) gets a row ``e_k = normalise(l_k)`` with ``l_k`` a parameter trained with the
head (initialised to its placeholder row), so the head still classifies it; the saved head holds the learned
rows in ``text_embeddings`` and lists them in its ``learned_rows`` metadata.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .losses.vlfd import project_pixel_text_logits

__all__ = ["TEXT_HEAD_NAME", "TextHead", "load_text_head", "save_text_head"]

TEXT_HEAD_NAME = "text_head.safetensors"


class TextHead(nn.Module):
    """A projector and the text embeddings it scores against (see the module docstring).

    Attributes: ``projector`` (1x1 conv C -> D), ``text_embeddings`` ((K, D) buffer, L2-normalised),
    ``feature`` (the student feature name it reads), ``tau`` (pixel-text temperature),
    ``class_names`` (the K training class names when known, else ``None``).
    """

    def __init__(self, projector: nn.Conv2d, text_embeddings: torch.Tensor, feature: str, tau: float,
                 class_names: Optional[Sequence[str]] = None, learned: Optional[Sequence[bool]] = None):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.projector = projector
        self.register_buffer("text_embeddings", nn.functional.normalize(text_embeddings.detach().float(), dim=1))
        self.feature = str(feature)
        self.tau = float(tau)
        self.class_names = list(class_names) if class_names is not None else None
        if self.class_names is not None and len(self.class_names) != self.text_embeddings.shape[0]:
            raise ValueError(f"{len(self.class_names)} class names for {self.text_embeddings.shape[0]} text embeddings")
        rows = [i for i, flag in enumerate(learned or ()) if flag]
        if learned is not None and len(learned) != self.text_embeddings.shape[0]:
            raise ValueError(f"learned has {len(learned)} entries for {self.text_embeddings.shape[0]} text embeddings")
        self.learned_index = rows
        self.learned_rows = nn.Parameter(self.text_embeddings[rows].clone()) if rows else None

    @classmethod
    def create(cls, in_channels: int, text_embeddings: torch.Tensor, feature: str, tau: float,
               class_names: Optional[Sequence[str]] = None, learned: Optional[Sequence[bool]] = None) -> "TextHead":
        """A new head with a freshly initialised projector ``in_channels -> D`` (``learned``: per class, whether its
        row is learned, module docstring)."""
        projector = nn.Conv2d(int(in_channels), int(text_embeddings.shape[1]), kernel_size=1)
        return cls(projector, text_embeddings, feature, tau, class_names, learned)

    def class_embeddings(self) -> torch.Tensor:
        """(K, D) rows the head scores against: ``text_embeddings`` with the learned rows ``normalise(l_k)`` in place."""
        if self.learned_rows is None:
            return self.text_embeddings
        emb = self.text_embeddings.clone()
        emb[self.learned_index] = nn.functional.normalize(self.learned_rows.float(), dim=1)
        return emb

    def forward(self, feature_map: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, h, w) student feature -> (B, K', h, w) pixel-text logits ``S`` (default: the training
        classes; any (K', D) embeddings work, e.g. unseen class names). The projection runs as one matrix
        product on the positions' channel vectors and ``S_k = (P F . e_k) / (max(|P F|, eps) tau)``
        (:func:`~c2vkd_hf.losses.vlfd.project_pixel_text_logits`): the same numbers as normalising the
        ``D``-channel map first, without building it."""
        emb = self.text_embeddings if text_embeddings is None else text_embeddings
        emb = emb.to(device=feature_map.device)
        if emb.dim() != 2 or emb.shape[1] != self.projector.out_channels:
            raise ValueError(f"text embeddings must be (K, {self.projector.out_channels}), got {tuple(emb.shape)}")
        scores = project_pixel_text_logits(feature_map.to(self.projector.weight.dtype), self.projector, emb,
                                           tau=self.tau)
        if text_embeddings is not None or self.learned_rows is None:
            return scores
        # the learned rows' columns, with the gradient into l_k: (normalise(P F) . normalise(l_k)) / tau
        u = nn.functional.normalize(self.projector(feature_map.to(self.projector.weight.dtype)).float(), dim=1)
        rows = nn.functional.normalize(self.learned_rows.float(), dim=1)
        learned = torch.einsum("bdhw,kd->bkhw", u, rows) / self.tau
        columns = list(scores.unbind(1))
        for j, k in enumerate(self.learned_index):
            columns[k] = learned[:, j]
        return torch.stack(columns, dim=1)

    def fold_into(self, classifier: nn.Conv2d) -> None:
        """Writes the head into ``classifier`` (a 1x1 conv reading the same feature ``F``).

        Per pixel, the normalisation in ``S`` divides every class score by the same positive number,
        so ``argmax_k S = argmax_k E (W F + b)``, a linear map of ``F``: the classifier becomes
        ``W' = E W / tau``, ``b' = E b / tau``. Its per-pixel argmax equals the head's exactly (its
        logits are ``S`` times ``|W F + b|``, so softmax probabilities and bilinear upsampling differ
        slightly)."""
        if not isinstance(classifier, nn.Conv2d) or classifier.kernel_size != (1, 1):
            raise ValueError("a text head folds only into a 1x1 convolution")
        if classifier.in_channels != self.projector.in_channels or classifier.out_channels != len(self.text_embeddings):
            raise ValueError(f"classifier {classifier.in_channels}->{classifier.out_channels} does not match the head "
                             f"{self.projector.in_channels}->{len(self.text_embeddings)}")
        emb = self.class_embeddings().detach().to(self.projector.weight)
        weight = self.projector.weight.detach().flatten(1)  # (D, C)
        with torch.no_grad():
            classifier.weight.copy_((emb @ weight / self.tau).view_as(classifier.weight))
            classifier.bias.copy_(emb @ self.projector.bias.detach() / self.tau)


def save_text_head(head: TextHead, output_dir: str) -> str:
    """Writes ``head`` as ``output_dir/text_head.safetensors``; returns the path."""
    tensors = {"projector.weight": head.projector.weight.detach().cpu().contiguous(),
               "projector.bias": head.projector.bias.detach().cpu().contiguous(),
               "text_embeddings": head.class_embeddings().detach().float().cpu().contiguous()}
    path = os.path.join(output_dir, TEXT_HEAD_NAME)
    save_file(tensors, path, metadata={"feature": head.feature, "tau": str(head.tau),
                                       "learned_rows": json.dumps(list(head.learned_index))})
    return path


def load_text_head(folder_or_file: str | os.PathLike, *, device: str | torch.device = "cpu") -> TextHead:
    """Reads ``text_head.safetensors`` (a folder holding it, or the file itself). The class names come
    from ``id2label`` of the ``config.json`` beside it when it has one entry per embedding."""
    path = os.fspath(folder_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, TEXT_HEAD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: only a student trained with a text head or C2VKD's linguistic term "
            "(text embeddings) has one")
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
