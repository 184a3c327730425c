"""Feature extraction: the logits and the named feature maps of any model family from one forward pass.

Each family (:func:`feature_family`) is one entry of :data:`_FAMILIES`: which tensors to collect by
module path (:class:`~c2vkd_hf.models.hooks.FeatureHooks`), whether to ask the model for its
``hidden_states``, how to arrange what was collected into ``stage1..N`` maps, and, when the config
says, their channels. The ``decoder`` feature (the input of the final classifier) is collected the
same way for every family that has one (:func:`classifier_module`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers.backbone_utils import BackboneMixin

from .common import model_type_of
from .dpt_grid import fix_patch_grid, patch_grid
from .hooks import FeatureHooks, Tap
from .torchvision_wrapper import TorchvisionForSemanticSegmentation

__all__ = [
    "DECODER_FEATURE",
    "classifier_module",
    "default_feature_pair",
    "deepest_feature",
    "feature_channels",
    "feature_family",
    "forward_features",
]

#: The name of the classifier's input among the features of :func:`forward_features`.
DECODER_FEATURE = "decoder"


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
    model_type = model_type_of(inner)
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


def _classifier_path(inner: nn.Module) -> Optional[str]:
    """The path of the final classifier convolution where segmentation models usually keep it
    (``decode_head.classifier``, ``classifier``, the last layer of ``head.head``), else ``None``."""
    candidates = ["decode_head.classifier", "classifier"]
    head = getattr(getattr(inner, "head", None), "head", None)
    if isinstance(head, nn.Sequential) and len(head):
        candidates.append(f"head.head.{list(head._modules)[-1]}")
    for path in candidates:
        try:
            module = inner.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Conv2d):
            return path
    return None


def classifier_module(model: nn.Module) -> Optional[nn.Conv2d]:
    """The final 1x1 convolution that maps decoder features to class logits, when the model has one
    where segmentation models usually keep it (``decode_head.classifier``: SegFormer, UperNet, BEiT;
    ``classifier``: the project DeepLabV3+; ``head.head[-1]``: DPT); else ``None``."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    path = _classifier_path(inner)
    return None if path is None else inner.get_submodule(path)


# --------------------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------------------


def _numbered(maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"stage{i + 1}": f for i, f in enumerate(maps)}


def _collected(inner: nn.Module, hooked: dict[str, Any], name: str, what: str) -> Any:
    if name not in hooked:
        raise RuntimeError(f"the {what} of the {model_type_of(inner)!r} model was not called")
    return hooked[name]


def _hidden_states(inner: nn.Module, out: Any) -> Sequence[torch.Tensor]:
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise NotImplementedError(f"{model_type_of(inner)!r} models return no hidden_states to distil from")
    return hidden


def _segformer_stages(inner, out, hooked, pixel_values):
    # (B, C, h, w) each: SegformerForSemanticSegmentation itself requires reshape_last_stage=True
    return _numbered(out.hidden_states)


def _backbone_stages(inner, out, hooked, pixel_values):
    output = _collected(inner, hooked, "backbone", "backbone")
    return _numbered(output.feature_maps if hasattr(output, "feature_maps") else output[0])


def _patch_token_stages(tap_name: str):
    """Stages from the hidden states a ViT feeds its neck (``tap_name``): (B, 1 + h*w, C) tokens with a
    leading readout (CLS) token are arranged on the patch grid; maps are kept as they are."""

    def stages(inner, out, hooked, pixel_values):
        feats = {}
        for i, h in enumerate(_collected(inner, hooked, tap_name, "neck")):
            if h.dim() == 3:
                grid = patch_grid(h.shape[1] - 1, pixel_values.shape[-2:], inner.config)
                h = h[:, 1:].transpose(1, 2).reshape(h.shape[0], h.shape[2], *grid)
            feats[f"stage{i + 1}"] = h
        return feats

    return stages


def _torchvision_taps(inner) -> dict[str, Tap]:
    return {f"stage{i + 1}": Tap(path) for i, path in enumerate(inner.stage_paths)}


def _torchvision_stages(inner, out, hooked, pixel_values):
    return {name: _collected(inner, hooked, name, "backbone stage") for name in _torchvision_taps(inner)}


def _mobilenet_v2_stages(inner, out, hooked, pixel_values):
    stages = []
    for h in _hidden_states(inner, out):
        key = (h.shape[1], *h.shape[-2:])
        if stages and stages[-1][0] == key:
            stages[-1] = (key, h)
        else:
            stages.append((key, h))
    return _numbered([h for _, h in stages])


def _generic_stages(inner, out, hooked, pixel_values):
    model_type = model_type_of(inner)
    feats = {}
    for i, h in enumerate(_hidden_states(inner, out)):
        if h.dim() == 3:
            h = _tokens_to_map(h, pixel_values.shape[-2:], getattr(inner, "config", None), model_type)
        elif h.dim() != 4:
            raise NotImplementedError(f"{model_type!r} hidden state {i} has shape {tuple(h.shape)}")
        feats[f"stage{i + 1}"] = h
    return feats


def _dpt_channels(inner) -> Optional[list[int]]:
    config = inner.config
    if getattr(config, "is_hybrid", False):
        return None  # a hybrid DPT's CNN stages: measured by a dry run
    return [config.hidden_size] * len(config.backbone_out_indices)


@dataclass(frozen=True)
class _Family:
    """How :func:`forward_features` reads one family's stages.

    ``taps(inner)``: the tensors to collect by module path during the forward pass;
    ``hidden_states``: call the model with ``output_hidden_states=True``;
    ``stages(inner, output, collected, pixel_values)``: the ``stage1..N`` maps;
    ``channels(inner)``: their channels when the config says (``None``: a dry forward pass measures them);
    ``prepare(inner)``: run once before the forward pass.
    """

    stages: Callable[[nn.Module, Any, dict[str, Any], torch.Tensor], dict[str, torch.Tensor]]
    taps: Callable[[nn.Module], dict[str, Tap]] = lambda inner: {}
    hidden_states: bool = False
    channels: Callable[[nn.Module], Optional[Sequence[int]]] = lambda inner: None
    prepare: Optional[Callable[[nn.Module], Any]] = None


#: :func:`feature_family` -> how its feature maps are read (see :func:`forward_features`).
_FAMILIES: dict[str, _Family] = {
    "segformer": _Family(_segformer_stages, hidden_states=True, channels=lambda inner: inner.config.hidden_sizes),
    "backbone": _Family(_backbone_stages, taps=lambda inner: {"backbone": Tap("backbone")},
                        channels=lambda inner: inner.backbone.channels),
    "dpt": _Family(_patch_token_stages("neck"), taps=lambda inner: {"neck": Tap("neck", "input")},
                   channels=_dpt_channels, prepare=fix_patch_grid),
    "beit": _Family(_patch_token_stages("fpn"), taps=lambda inner: {"fpn": Tap("fpn", "input")},
                    channels=lambda inner: [inner.config.hidden_size] * len(inner.config.out_indices),
                    prepare=fix_patch_grid),
    "mobilenet_v2": _Family(_mobilenet_v2_stages, hidden_states=True),
    "torchvision": _Family(_torchvision_stages, taps=_torchvision_taps),
    "hidden_states": _Family(_generic_stages, hidden_states=True),
}


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def forward_features(
    model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass returning ``(logits, {"stage1": F1, ..., "stageN": FN, "decoder": D})``.

    ``decoder`` (when :func:`classifier_module` finds the final classifier) is the classifier's
    input: the decoder's last feature map, (B, C, h, w) at the logits' grid (stride 4 for SegFormer
    and UperNet), the most semantic map at the highest resolution. The stages (shallow to deep, each
    (B, C, h, w)) come per family (:func:`feature_family`):

    * ``segformer``: the four encoder stages (``output_hidden_states=True``).
    * ``backbone``, models with a transformers backbone: the backbone's ``feature_maps``, the output
      of ``model.backbone`` (UperNet's own ``output_hidden_states`` path crashes with timm
      backbones in transformers 5.23). Covers UperNet on CNNs (ConvNeXt, ResNet, timm) and on plain
      ViTs (DINOv2, BEiT (with ``add_fpn``: a 4-scale pyramid), ViTDet: the ``out_indices`` blocks on
      the patch grid), and the project DeepLabV3+.
    * ``dpt``: the encoder blocks DPT feeds its neck (``backbone_out_indices``), CLS token dropped,
      arranged on the patch grid (the input of ``model.neck``); a hybrid DPT's CNN stages as they are.
    * ``beit`` (``BeitForSemanticSegmentation``): the four ``out_indices`` blocks on the patch grid,
      before the model's own FPN resampling (the input of ``model.fpn``).
    * ``mobilenet_v2`` (MobileNetV2-DeepLabV3): the last hidden state of each run of layers with the
      same channels and resolution (the bottleneck sequences of Sandler et al., Table 2).
    * ``torchvision`` (:class:`TorchvisionForSemanticSegmentation`): its backbone stages (the outputs
      of its :attr:`~TorchvisionForSemanticSegmentation.stage_paths`).
    * ``hidden_states``, any other model: its 4-D ``hidden_states``; 3-D token states are arranged on the
      patch grid (leading CLS tokens dropped) or a square grid, else ``NotImplementedError``.

    Every tensor read from inside the model (the classifier's input, a backbone's output, a neck's
    input, torchvision's stages) is collected by module path with
    :class:`~c2vkd_hf.models.hooks.FeatureHooks`, the hooks living only for this call.

    ``model`` may be wrapped (DDP, accelerate); the call goes through the wrapper. Extra
    ``forward_kwargs`` (e.g. ``labels``) are passed to the model.
    """
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    family = _FAMILIES[feature_family(inner)]
    if family.prepare is not None:
        family.prepare(inner)
    taps: dict[str, Tap] = {}
    classifier = _classifier_path(inner)
    if classifier is not None:
        taps[DECODER_FEATURE] = Tap(classifier, "input")
    taps.update(family.taps(inner))
    extra = {"output_hidden_states": True} if family.hidden_states else {}
    with FeatureHooks(inner, taps) as hooks:
        out = model(pixel_values=pixel_values, return_dict=True, **extra, **forward_kwargs)
    feats = family.stages(inner, out, hooks.features, pixel_values)
    if DECODER_FEATURE in hooks.features:
        feats[DECODER_FEATURE] = hooks.features[DECODER_FEATURE]
    return out.logits, feats


def feature_channels(model: nn.Module, image_size: Sequence[int] | int | None = None) -> dict[str, int]:
    """``{feature name: channels}`` as returned by :func:`forward_features` (from the config when it
    says, else from a dry forward pass at ``image_size``, default the config's or 64x64)."""
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    config = getattr(inner, "config", None)
    classifier = classifier_module(inner)
    decoder = {DECODER_FEATURE: int(classifier.in_channels)} if classifier is not None else {}
    stages = _FAMILIES[feature_family(inner)].channels(inner)
    if stages is not None:
        return {**{f"stage{i + 1}": int(c) for i, c in enumerate(stages)}, **decoder}
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
    become the student's classifier (``--text_head``); the measured choice is in benchmarks/camvid/ABLATIONS.md.
    """
    if DECODER_FEATURE in feature_channels(student) and DECODER_FEATURE in feature_channels(teacher):
        return DECODER_FEATURE, DECODER_FEATURE
    return deepest_feature(student), deepest_feature(teacher)


def parse_feature_pairs(spec: Optional[str]) -> list[tuple[str, str]]:
    """``"stage4:stage4,stage3:stage3"`` -> ``[("stage4", "stage4"), ("stage3", "stage3")]``."""
    if not spec:
        return []
    pairs = []
    for item in spec.split(","):
        if item.count(":") != 1 or not all(part.strip() for part in item.split(":")):
            raise ValueError(f"--feature_pairs entry '{item}' must look like student_name:teacher_name.")
        student_name, teacher_name = (part.strip() for part in item.split(":"))
        pairs.append((student_name, teacher_name))
    return pairs


#: ``--stage_pairs`` value that pairs the two models' stages by :func:`default_stage_pairs`.
AUTO_STAGE_PAIRS = "auto"


def pair_stages(student_stages: Sequence[str], teacher_stages: Sequence[str]) -> list[tuple[str, str]]:
    """Stages paired from the deepest down, as many as the model with fewer stages has: with ``N_s`` student and
    ``N_t`` teacher stages (each list shallow to deep) and ``k = min(N_s, N_t)``, the pairs are
    ``(s[N_s - k + i], t[N_t - k + i])`` for ``i = 0 .. k-1``, shallow to deep. Equal counts pair stage ``i`` with
    stage ``i``; a teacher with one stage more loses its shallowest (its stem-level map has no student peer)."""
    k = min(len(student_stages), len(teacher_stages))
    return list(zip(list(student_stages)[len(student_stages) - k:], list(teacher_stages)[len(teacher_stages) - k:]))


def stage_names(model: nn.Module) -> list[str]:
    """The ``stage1..N`` feature names of ``model`` (:func:`forward_features`), shallow to deep."""
    names = [name for name in feature_channels(model) if name.startswith("stage") and name[5:].isdigit()]
    return sorted(names, key=lambda name: int(name[5:]))


def default_stage_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """``--stage_pairs auto``: the student's and the teacher's backbone stages paired by :func:`pair_stages`.
    SegFormer's four MiT stages against a four-stage CNN backbone (the reference UperNet + EfficientNet-Lite0)
    give ``stage1:stage1, ..., stage4:stage4``, the pairs of C2VKD's stage exits."""
    return pair_stages(stage_names(student), stage_names(teacher))
