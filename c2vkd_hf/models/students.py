"""Students: SegFormer B0-B5 by name, any segmentation config or checkpoint, and their image processor."""

from __future__ import annotations

import os
from typing import Any, Mapping

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    PretrainedConfig,
    PreTrainedModel,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
)

from ..constants import IGNORE_INDEX
from .common import label_kwargs
from .dpt_grid import fix_patch_grid
from .normalization import image_mean_std, processor_folder


#: Mix Transformer (MiT) encoder sizes of SegFormer B0-B5 (Xie et al., 2021, Table 6).
SEGFORMER_SIZES: dict[str, dict[str, Any]] = {
    "segformer-b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "segformer-b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "segformer-b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
    "segformer-b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], decoder_hidden_size=768),
    "segformer-b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], decoder_hidden_size=768),
    "segformer-b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768),
}
_SEGFORMER_COMMON = dict(
    num_encoder_blocks=4,
    num_attention_heads=[1, 2, 5, 8],
    sr_ratios=[8, 4, 2, 1],
    patch_sizes=[7, 3, 3, 3],
    strides=[4, 2, 2, 2],
    mlp_ratios=[4, 4, 4, 4],
    drop_path_rate=0.1,
    semantic_loss_ignore_index=IGNORE_INDEX,
)


def segformer_config(size: str, id2label: Mapping[int, str], **overrides: Any) -> SegformerConfig:
    """A :class:`SegformerConfig` for a named MiT size (``"segformer-b0"`` .. ``"segformer-b5"``)."""
    key = size.lower()
    if key not in SEGFORMER_SIZES:
        raise ValueError(f"unknown SegFormer size {size!r}; choose one of {sorted(SEGFORMER_SIZES)}")
    kwargs = {**_SEGFORMER_COMMON, **SEGFORMER_SIZES[key], **overrides}
    labels = label_kwargs(id2label)
    labels.pop("num_labels")
    return SegformerConfig(**kwargs, **labels)


def load_student(
    name_or_path: str | PretrainedConfig,
    id2label: Mapping[int, str],
    *,
    trust_remote_code: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Build or load the student.

    * ``"segformer-b0"`` .. ``"segformer-b5"`` (unless a local folder of that name exists): a randomly
      initialised :class:`SegformerForSemanticSegmentation` with the standard MiT sizes;
      ``config_overrides`` changes any :class:`SegformerConfig` field (tiny test models).
    * a :class:`PretrainedConfig`, a ``config.json`` file, or a folder holding only ``config.json`` (no
      weights): ``AutoModelForSemanticSegmentation.from_config`` with the labels set (random init). Any
      semantic-segmentation family works, e.g. UperNet on a plain ViT backbone
      (``UperNetConfig(backbone_config=Dinov2Config(out_indices=[3, 6, 9, 12]))``, ``BeitConfig(add_fpn=True)``
      or ``VitDetConfig``), DPT (``DPTConfig``), BEiT (``BeitConfig``). Give backbones as config objects,
      never as ``backbone="hub-name"`` strings.
    * anything else: ``AutoModelForSemanticSegmentation.from_pretrained(..., ignore_mismatched_sizes=True)``
      with the labels (so an ImageNet encoder such as ``nvidia/mit-b0`` or a model fine-tuned on
      another label set gets a fresh decode head); ``config_overrides`` are passed as config kwargs.
    """
    overrides = dict(config_overrides or {})
    labels = label_kwargs(id2label)
    if not isinstance(name_or_path, PretrainedConfig) and _is_config_only(name_or_path):
        name_or_path = AutoConfig.from_pretrained(os.fspath(name_or_path), trust_remote_code=trust_remote_code)
    if isinstance(name_or_path, PretrainedConfig):
        config = name_or_path
        for key, value in overrides.items():
            setattr(config, key, value)
        config.id2label, config.label2id = labels["id2label"], labels["label2id"]
        model = AutoModelForSemanticSegmentation.from_config(config, trust_remote_code=trust_remote_code)
        return fix_patch_grid(model)
    name = os.fspath(name_or_path)
    if name.lower() in SEGFORMER_SIZES and not os.path.isdir(name):
        return SegformerForSemanticSegmentation(segformer_config(name, id2label, **overrides))
    labels.pop("num_labels")  # implied by id2label; passing both warns when the checkpoint's K differs
    model = AutoModelForSemanticSegmentation.from_pretrained(
        name,
        ignore_mismatched_sizes=True,
        trust_remote_code=trust_remote_code,
        **labels,
        **overrides,
        **from_pretrained_kwargs,
    )
    return fix_patch_grid(model)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _is_config_only(name_or_path: Any) -> bool:
    """A ``config.json`` file, or a folder with ``config.json`` but no weights: build from random init."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path.endswith(".json")
    return os.path.isfile(os.path.join(path, "config.json")) and not any(
        os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES
    )


def student_image_processor(model_or_path: Any, *, size: Mapping[str, int] | None = None, **kwargs: Any):
    """The image processor to save next to the student.

    A folder (or a model loaded from one) that has ``preprocessor_config.json`` gives its own processor
    (``AutoImageProcessor``); otherwise a :class:`SegformerImageProcessor` with the model's mean/std
    (:func:`image_mean_std`: ImageNet statistics for the named sizes), ``do_reduce_labels=False``.
    ``size`` (e.g. ``{"height": 180, "width": 240}``) and other kwargs override processor fields.
    """
    extra = dict(kwargs)
    if size is not None:
        extra["size"] = dict(size)
    folder = processor_folder(model_or_path)
    if folder is not None:
        return AutoImageProcessor.from_pretrained(folder, **extra)
    mean, std = image_mean_std(model_or_path)
    extra.setdefault("do_reduce_labels", False)
    return SegformerImageProcessor(image_mean=list(mean), image_std=list(std), **extra)
