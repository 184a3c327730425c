"""Model families beyond SegFormer: ViT students (UperNet on plain-ViT backbones, DPT, BEiT) and CNN teachers
(torchvision DeepLabV3 / FCN / LR-ASPP, UperNet-ConvNeXt / ResNet, MobileNetV2-DeepLabV3). Tiny configs, offline."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForSemanticSegmentation,
    BeitConfig,
    ConvNextConfig,
    Dinov2Config,
    DPTConfig,
    MobileNetV2Config,
    ResNetConfig,
    TrainingArguments,
    UperNetConfig,
    VitDetConfig,
)

from c2vkd_hf import models as M
from c2vkd_hf.losses import get_loss
from tiny import c2vkd_loss
from c2vkd_hf.jobs import UserInputError, check_class_agreement
from c2vkd_hf.text_head import TEXT_HEAD_NAME
from c2vkd_hf.trainer import DistillationModel
from tiny import c2vkd_loss, ID2LABEL, make_trainer, tiny_student, tiny_teacher

_VIT = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, patch_size=8,
            image_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _student_config(family: str):
    if family == "upernet-dinov2":
        backbone = Dinov2Config(**_VIT, out_indices=[1, 2, 3, 4])
        return UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False)
    if family == "upernet-beit":
        backbone = BeitConfig(**_VIT, out_indices=[1, 2, 3, 4], add_fpn=True, use_mask_token=False)
        return UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False)
    if family == "upernet-vitdet":
        backbone = VitDetConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                                image_size=32, pretrain_image_size=32, out_indices=[2, 4])
        return UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False)
    if family == "dpt":
        return DPTConfig(**_VIT, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                         backbone_out_indices=[0, 1, 2, 3], use_auxiliary_head=False)
    if family == "beit":
        return BeitConfig(**_VIT, out_indices=[1, 2, 3, 4], use_auxiliary_head=False, pool_scales=[1, 2])
    raise KeyError(family)


#: family -> (stage count, feature grid at a 32x48 input, default student feature)
STUDENTS = {
    "upernet-dinov2": (4, [(4, 6)] * 4, "stage4"),
    "upernet-beit": (4, [(16, 24), (8, 12), (4, 6), (2, 3)], "stage4"),
    "upernet-vitdet": (2, [(4, 6)] * 2, "stage2"),
    "dpt": (4, [(4, 6)] * 4, "stage4"),
    "beit": (4, [(4, 6)] * 4, "stage4"),
}


def _images(n: int = 8, height: int = 32, width: int = 48, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, height, width, generator=g),
             "labels": torch.randint(0, len(ID2LABEL), (height, width), generator=g)} for _ in range(n)]


def _c2vkd(student: nn.Module, teacher: nn.Module) -> tuple[DistillationModel, str]:
    s_name, t_name = M.default_feature_pair(student, teacher)
    text = nn.functional.normalize(torch.randn(len(ID2LABEL), 12, generator=torch.Generator().manual_seed(3)), dim=1)
    loss = c2vkd_loss(student_channels=[M.feature_channels(student)[s_name]],
                    teacher_channels=[M.feature_channels(teacher)[t_name]], text_embeddings=text)
    return DistillationModel(student, loss, [s_name]), t_name


def _distil_and_reload(tmp_path, student, teacher, data):
    model, t_name = _c2vkd(student, teacher)
    trainer = make_trainer(str(tmp_path / "run"), model, teacher, data, per_device_train_batch_size=4)
    trainer.teacher_source.feature_names = [t_name]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss/ling" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items()), "the student must train"
    out = tmp_path / "student"
    trainer.save_model(str(out))
    assert (out / TEXT_HEAD_NAME).is_file()
    reloaded = M.fix_patch_grid(AutoModelForSemanticSegmentation.from_pretrained(str(out))).eval()
    assert type(reloaded) is type(student) and reloaded.config.id2label == ID2LABEL
    x = data[0]["pixel_values"][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, student.eval()(pixel_values=x).logits)
    return reloaded


# ---------------------------------------------------------------- students


@pytest.mark.parametrize("family", list(STUDENTS))
def test_student_family_features_and_default_pair(family):
    torch.manual_seed(0)
    student = M.load_student(_student_config(family), ID2LABEL).eval()
    count, grids, default = STUDENTS[family]
    with torch.no_grad():
        logits, feats = M.forward_features(student, torch.randn(2, 3, 32, 48))  # not square
    assert logits.shape[:2] == (2, 3)
    assert M.feature_channels(student) == {k: v.shape[1] for k, v in feats.items()}
    if M.classifier_module(student) is not None:
        assert feats.pop("decoder").shape[1] == M.classifier_module(student).in_channels
    assert list(feats) == [f"stage{i + 1}" for i in range(count)]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == grids and all(f.shape[0] == 2 for f in feats.values())
    assert M.deepest_feature(student) == default
    has_decoder = M.classifier_module(student) is not None  # the tiny teacher (UperNet) has one
    assert M.default_feature_pair(student, tiny_teacher()) == (("decoder", "decoder") if has_decoder else (default, "stage4"))


@pytest.mark.parametrize("family", ["upernet-dinov2", "upernet-beit", "dpt"])
def test_student_family_distils_end_to_end_and_reloads(family, tmp_path):
    torch.manual_seed(0)
    student = M.load_student(_student_config(family), ID2LABEL)
    _distil_and_reload(tmp_path, student, tiny_teacher(), _images())


def test_student_from_a_config_folder_or_file(tmp_path):
    config = _student_config("upernet-dinov2")
    config.save_pretrained(tmp_path / "folder")
    for source in (tmp_path / "folder", tmp_path / "folder" / "config.json"):
        student = M.load_student(str(source), {0: "a", 1: "b"})
        assert type(student).__name__ == "UperNetForSemanticSegmentation"
        assert student.config.num_labels == 2 and student.config.backbone_config.model_type == "dinov2"
    # a folder with weights is still loaded from them
    student.save_pretrained(tmp_path / "weights")
    again = M.load_student(str(tmp_path / "weights"), {0: "a", 1: "b"})
    key = "backbone.embeddings.patch_embeddings.projection.weight"
    assert torch.equal(again.state_dict()[key], student.state_dict()[key])


def test_dpt_patch_grid_fix_is_idempotent():
    model = M.load_student(_student_config("dpt"), ID2LABEL).eval()
    assert M.fix_patch_grid(model) is model and M.fix_patch_grid(model) is model
    assert len(model.neck._forward_pre_hooks) == 1
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        assert model(pixel_values=x).logits.shape == (1, 3, 64, 128)


# ---------------------------------------------------------------- Hub CNN teachers (tiny configs)


def _hub_teacher_config(family: str):
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if family == "upernet-convnext":
        backbone = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=stages)
        return UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False)
    if family == "upernet-resnet":
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic",
                                out_features=stages)
        return UperNetConfig(backbone_config=backbone, hidden_size=16, use_auxiliary_head=False)
    if family == "mobilenet_v2":
        return MobileNetV2Config(depth_multiplier=0.25, image_size=32, semantic_loss_ignore_index=255)
    raise KeyError(family)


@pytest.mark.parametrize("family,stages,last", [
    ("upernet-convnext", [8, 16, 24, 32], "stage4"),
    ("upernet-resnet", [8, 16, 24, 32], "stage4"),
    ("mobilenet_v2", [8, 8, 16, 24, 40, 80], "stage6"),
])
def test_hub_cnn_teachers_load_from_folders_with_features(family, stages, last, tmp_path):
    config = _hub_teacher_config(family)
    config.id2label, config.label2id = ID2LABEL, {v: k for k, v in ID2LABEL.items()}
    AutoModelForSemanticSegmentation.from_config(config).save_pretrained(tmp_path)
    teacher = M.load_teacher(str(tmp_path))
    assert not teacher.training
    check_class_agreement(ID2LABEL, teacher=teacher)
    with torch.no_grad():
        logits, feats = M.forward_features(teacher, torch.randn(2, 3, 64, 96))
    assert logits.shape[:2] == (2, 3)
    assert M.feature_channels(teacher) == {k: v.shape[1] for k, v in feats.items()}
    assert ("decoder" in feats) == (M.classifier_module(teacher) is not None)  # UperNet: the classifier's input
    feats.pop("decoder", None)
    assert [f.shape[1] for f in feats.values()] == stages
    assert M.deepest_feature(teacher) == last
    assert M.default_feature_pair(tiny_student(), teacher) == (("decoder", "decoder") if "decoder" in M.feature_channels(teacher)
                                                               else ("stage4", last))
    assert M.image_mean_std(teacher) == (M.IMAGENET_MEAN, M.IMAGENET_STD)


# ---------------------------------------------------------------- torchvision teachers


def _torchvision(arch: str, num_classes: int = 3, aux: bool = False):
    from torchvision.models import segmentation

    torch.manual_seed(0)
    return getattr(segmentation, arch)(weights=None, weights_backbone=None, num_classes=num_classes,
                                       aux_loss=aux).eval()


@pytest.mark.parametrize("arch,channels,strides", [
    ("lraspp_mobilenet_v3_large", [16, 24, 40, 112, 960], [2, 4, 8, 16, 16]),
    ("fcn_resnet50", [256, 512, 1024, 2048], [4, 8, 8, 8]),
])
def test_torchvision_teacher_from_checkpoint(arch, channels, strides, tmp_path):
    reference = _torchvision(arch, aux=arch.startswith("fcn"))  # aux_classifier tensors are dropped on load
    torch.save({"model": reference.state_dict()}, tmp_path / "ckpt.pth")
    teacher = M.load_teacher(f"torchvision:{arch}:{tmp_path / 'ckpt.pth'}")
    assert isinstance(teacher, M.TorchvisionForSemanticSegmentation) and not teacher.training
    assert teacher.config.num_labels == 3 and teacher.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    check_class_agreement(ID2LABEL, teacher=teacher)  # LABEL_i names: no complaint
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        logits, feats = M.forward_features(teacher, x)
        torch.testing.assert_close(logits, reference(x)["out"])
        assert teacher(pixel_values=x).hidden_states is None
    assert list(feats) == [f"stage{i + 1}" for i in range(len(channels))]
    assert [f.shape[1] for f in feats.values()] == channels
    assert [32 // f.shape[-2] for f in feats.values()] == strides and all(f.shape[-1] * 2 == f.shape[-2] * 4 for f in feats.values())
    assert M.feature_channels(teacher) == dict(zip(feats, channels))
    assert M.image_mean_std(teacher) == (M.IMAGENET_MEAN, M.IMAGENET_STD)
    assert M.default_feature_pair(tiny_student(), teacher) == ("stage4", list(feats)[-1])  # no decoder feature
    # saved wrapper: a plain AutoModelForSemanticSegmentation folder
    teacher.save_pretrained(tmp_path / "saved")
    again = M.load_teacher(str(tmp_path / "saved"))
    assert type(again) is M.TorchvisionForSemanticSegmentation and again.config.arch == arch
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).logits, logits)
    with pytest.raises(UserInputError, match="predicts 3 classes"):
        check_class_agreement({i: str(i) for i in range(5)}, teacher=teacher)


def test_torchvision_names_labels_and_unsafe_checkpoints(tmp_path):
    # safetensors with class names in the metadata
    state = {k: v.contiguous() for k, v in _torchvision("lraspp_mobilenet_v3_large").state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"id2label": json.dumps(ID2LABEL)})
    teacher = M.load_teacher(f"torchvision:lraspp_mobilenet_v3_large:{tmp_path / 'w.safetensors'}")
    assert teacher.config.id2label == ID2LABEL
    # no checkpoint: random weights, 21 VOC classes unless told otherwise
    voc = M.load_teacher("torchvision:lraspp_mobilenet_v3_large")
    assert voc.config.num_labels == 21 and voc.config.id2label[15] == "person"
    assert M.load_teacher("torchvision:lraspp_mobilenet_v3_large", id2label=ID2LABEL).config.num_labels == 3
    assert M.parse_torchvision_name("torchvision:fcn_resnet101:/a/b.pth") == ("fcn_resnet101", "/a/b.pth")
    assert M.parse_torchvision_name("openmmlab/upernet-convnext-small") is None
    with pytest.raises(ValueError, match="unknown torchvision segmentation arch"):
        M.load_teacher("torchvision:pspnet_resnet50")
    # torch.load(weights_only=True) refuses pickled objects (a training checkpoint with its argparse args)
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "train_ckpt.pth")
    with pytest.raises(ValueError, match="safely"):
        M.load_teacher(f"torchvision:lraspp_mobilenet_v3_large:{tmp_path / 'train_ckpt.pth'}")
    with pytest.raises(ValueError, match="does not fit"):
        save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        M.load_teacher(f"torchvision:lraspp_mobilenet_v3_large:{tmp_path / 'bad.safetensors'}")
    with pytest.raises(ValueError, match="predicts 3 classes, not 4"):
        M.load_torchvision_teacher("lraspp_mobilenet_v3_large", tmp_path / "w.safetensors", num_labels=4)


def test_torchvision_teacher_names_are_validated_as_arch_and_checkpoint(tmp_path, monkeypatch):
    """``validate_distillation_args`` checks the ARCH of ``torchvision:ARCH:CHECKPOINT`` and the CHECKPOINT alone
    as a file (an absolute checkpoint path used to be taken for a missing local folder)."""
    from c2vkd_hf.config import DistillationArguments
    from c2vkd_hf.jobs import validate_distillation_args

    state = {k: v.contiguous() for k, v in _torchvision("lraspp_mobilenet_v3_large").state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    arch = "lraspp_mobilenet_v3_large"

    def validate(teacher):
        validate_distillation_args(DistillationArguments(method="kd", teacher_name_or_path=teacher))

    for name in (f"torchvision:{arch}:{tmp_path / 'w.safetensors'}", f"torchvision:{arch}"):
        validate(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    validate(f"torchvision:{arch}:~/w.safetensors")
    assert M.load_teacher(f"torchvision:{arch}:~/w.safetensors").config.num_labels == 3
    missing = tmp_path / "no" / "ckpt.pth"
    with pytest.raises(UserInputError, match="checkpoint file") as error:
        validate(f"torchvision:{arch}:{missing}")
    assert str(error.value).startswith(f"--teacher_name_or_path torchvision:{arch}:{missing}") and str(missing) in str(error.value)
    with pytest.raises(UserInputError, match="unknown torchvision segmentation architecture") as error:
        validate(f"torchvision:pspnet_resnet50:{tmp_path / 'w.safetensors'}")
    assert str(error.value).startswith("--teacher_name_or_path") and all(a in str(error.value) for a in M.TORCHVISION_ARCHS)
    with pytest.raises(UserInputError, match="does not exist"):  # other names: still checked as local paths
        validate(str(tmp_path / "no" / "folder"))


def test_torchvision_teacher_distils_a_vit_student_end_to_end(tmp_path):
    reference = _torchvision("lraspp_mobilenet_v3_large")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "t.safetensors"))
    teacher = M.load_teacher(f"torchvision:lraspp_mobilenet_v3_large:{tmp_path / 't.safetensors'}")
    torch.manual_seed(0)
    student = M.load_student(_student_config("upernet-dinov2"), ID2LABEL)
    assert M.default_feature_pair(student, teacher) == ("stage4", "stage5")
    _distil_and_reload(tmp_path, student, teacher, _images(seed=2))


def test_run_distillation_with_config_folder_student_and_torchvision_teacher(tmp_path, monkeypatch):
    """The pipeline path of `scripts/distill.py --student_name_or_path FOLDER --teacher_name_or_path torchvision:...`.

    The checkpoint is named by a path relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    from c2vkd_hf.config import DataArguments, DistillationArguments
    from c2vkd_hf.data import load_segmentation_data
    from c2vkd_hf.jobs import run_distillation

    data_args = DataArguments(synthetic_train_size=8, synthetic_validation_size=2, synthetic_height=32,
                              synthetic_width=48)
    data = load_segmentation_data(data_args)
    reference = _torchvision("lraspp_mobilenet_v3_large", num_classes=len(data.id2label))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "t.safetensors"),
              metadata={"id2label": json.dumps(data.id2label)})
    _student_config("dpt").save_pretrained(tmp_path / "dpt-tiny")
    text = tmp_path / "text.pth"
    torch.save(torch.randn(len(data.id2label), 12), text)
    dist_args = DistillationArguments(student_name_or_path=str(tmp_path / "dpt-tiny"), method="c2vkd",
                                      teacher_name_or_path="torchvision:lraspp_mobilenet_v3_large:t.safetensors",
                                      text_embeddings=str(text))
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                      per_device_eval_batch_size=2, report_to="none", save_strategy="no",
                                      eval_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    results = run_distillation(dist_args, data_args, training_args, data=data, write_card=False)
    assert results["steps"] == 2 and results["linguistic_term"] and 0.0 <= results["val_mean_iou"] <= 1.0
    student = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert type(student).__name__ == "DPTForSemanticSegmentation"
    assert (tmp_path / "out" / TEXT_HEAD_NAME).is_file()
