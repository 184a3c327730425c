"""The project's CNN teacher: DeepLabV3+ on a timm backbone, registered with the transformers Auto classes."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import load_backbone
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..constants import IGNORE_INDEX
from .common import segmenter_output


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
        return segmenter_output(logits, labels, features if output_hidden_states else None, return_dict,
                                self.config.loss_ignore_index)


AutoConfig.register(TimmDeepLabV3PlusConfig.model_type, TimmDeepLabV3PlusConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(
    TimmDeepLabV3PlusConfig, TimmDeepLabV3PlusForSemanticSegmentation, exist_ok=True
)
