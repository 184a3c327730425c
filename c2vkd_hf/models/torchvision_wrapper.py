"""torchvision's DeepLabV3 / FCN / LR-ASPP as teachers, behind the ``AutoModelForSemanticSegmentation`` interface."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..constants import IGNORE_INDEX
from .backbone_weights import read_state_dict
from .common import label_kwargs, segmenter_output
from .hooks import FeatureHooks, Tap
from .normalization import IMAGENET_MEAN, IMAGENET_STD


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
      ``hidden_states`` are the backbone stages (the outputs of :attr:`stage_paths`, see
      :func:`_torchvision_stage_modules`, collected by :class:`~c2vkd_hf.models.hooks.FeatureHooks`),
      so :func:`forward_features` names them ``stage1..N``;
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
    def stage_paths(self) -> list[str]:
        """The stage modules' paths from this model (``model.backbone.<name>``), shallow to deep."""
        return [f"model.backbone.{name}" for name in self.stage_modules]

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
        taps = {path: Tap(path) for path in self.stage_paths} if output_hidden_states else {}
        with FeatureHooks(self, taps) as hooks:
            logits = self.model(pixel_values)["out"]
        hidden_states = tuple(hooks.features[path] for path in self.stage_paths) if output_hidden_states else None
        return segmenter_output(logits, labels, hidden_states, return_dict, self.config.loss_ignore_index)


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
            state = read_state_dict(checkpoint)
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
        labels = label_kwargs(id2label)
        if num_labels is not None and labels["num_labels"] != int(num_labels):
            raise ValueError(f"id2label has {labels['num_labels']} classes but the model predicts {num_labels}")
    else:
        num_labels = int(num_labels or 21)
        if num_labels == 21:
            from torchvision.models._meta import _VOC_CATEGORIES

            labels = label_kwargs(dict(enumerate(_VOC_CATEGORIES)))
        else:
            labels = label_kwargs({i: f"LABEL_{i}" for i in range(num_labels)})
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
