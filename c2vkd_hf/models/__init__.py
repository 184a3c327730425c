"""Students, teachers, their feature maps and their input normalisation (one module per job).

Everything here works offline: named model sizes are built from config objects, timm backbones are
described by :class:`~transformers.TimmBackboneConfig` objects (never by a Hub string, which makes
transformers 5 query the Hub even for timm names) and are created with ``pretrained=False``.

* Students (:mod:`.students`): :func:`load_student` (``"segformer-b0"`` .. ``"segformer-b5"`` from
  random init, a config (object, ``config.json`` or a folder with only a config) of any family, e.g.
  UperNet on a plain ViT or DPT, or any ``AutoModelForSemanticSegmentation`` checkpoint),
  :func:`student_image_processor`.
* Teachers (:mod:`.teachers`): :func:`load_teacher` (any saved semantic-segmentation model, e.g. the
  reference UperNet + EfficientNet-Lite0, or ``"torchvision:ARCH[:CHECKPOINT]"`` for torchvision's
  DeepLabV3 / FCN / LR-ASPP through :class:`TorchvisionForSemanticSegmentation`, :mod:`.torchvision_wrapper`),
  :func:`build_teacher` (UperNet or the project's :class:`TimmDeepLabV3PlusForSemanticSegmentation`,
  :mod:`.deeplabv3plus`), :func:`load_backbone_weights` (:mod:`.backbone_weights`: ImageNet init of a
  timm backbone from a state-dict file whose key names differ from timm's).
* Features (:mod:`.features`): :func:`forward_features` returns ``(logits, {"stage1": ..., ...})``
  from ONE forward pass for SegFormer, backbone-based models (UperNet on CNN or plain-ViT backbones,
  DeepLabV3+), DPT, BEiT, MobileNetV2, torchvision models and, as a fallback, any model whose
  ``hidden_states`` are feature maps; :func:`feature_family`, :func:`feature_channels`,
  :func:`default_feature_pair`. Tensors inside a model are read by module path with one mechanism,
  :class:`~c2vkd_hf.models.hooks.FeatureHooks` (:mod:`.hooks`).
* Normalisation (:mod:`.normalization`): :func:`image_mean_std`, :func:`renormalize` (student batch
  -> teacher statistics).
* DPT on non-square inputs (:mod:`.dpt_grid`): :func:`fix_patch_grid`.

Importing this package registers ``c2vkd_deeplabv3plus`` and ``c2vkd_torchvision_segmentation`` with
``AutoConfig`` and ``AutoModelForSemanticSegmentation``, so a saved project teacher loads with
``AutoModelForSemanticSegmentation.from_pretrained(path)`` once ``c2vkd_hf.models`` is imported.
"""

from .backbone_weights import (BackboneLoadReport, efficientnet_lite0_weights_path, load_backbone_weights,
                               read_state_dict)
from .deeplabv3plus import TimmDeepLabV3PlusConfig, TimmDeepLabV3PlusForSemanticSegmentation
from .dpt_grid import fix_patch_grid
from .features import (
    AUTO_STAGE_PAIRS,
    DECODER_FEATURE,
    classifier_module,
    deepest_feature,
    default_feature_pair,
    default_stage_pairs,
    feature_channels,
    feature_family,
    forward_features,
    pair_stages,
    parse_feature_pairs,
    stage_names,
)
from .hooks import FeatureHooks, Tap
from .normalization import IMAGENET_MEAN, IMAGENET_STD, image_mean_std, renormalize
from .students import SEGFORMER_SIZES, load_student, segformer_config, student_image_processor
from .teachers import build_teacher, load_teacher
from .torchvision_wrapper import (
    TORCHVISION_ARCHS,
    TORCHVISION_PREFIX,
    TorchvisionForSemanticSegmentation,
    TorchvisionSegmentationConfig,
    load_torchvision_teacher,
    parse_torchvision_name,
)

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
    "AUTO_STAGE_PAIRS",
    "default_stage_pairs",
    "pair_stages",
    "stage_names",
    "parse_feature_pairs",
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
    "read_state_dict",
    "load_student",
    "load_teacher",
    "load_torchvision_teacher",
    "parse_torchvision_name",
    "renormalize",
    "segformer_config",
    "student_image_processor",
    "DECODER_FEATURE",
    "classifier_module",
    "FeatureHooks",
    "Tap",
]
