"""The model card tells the truth: subset evaluations, how the teacher is named, the usage snippet,
the text-embedding source; the template is package data."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from c2vkd_hf.model_card import build_model_card, is_hub_id, teacher_description
from tiny import tiny_teacher

METRICS = {"mean_iou": 0.5, "overall_accuracy": 0.8, "per_category_iou": [0.4, 0.6]}
ID2LABEL = {0: "sky", 1: "road"}


def _card(tmp_path, **kwargs) -> ModelCard:
    args = dict(repo_id="me/student", metrics=METRICS, id2label=ID2LABEL, dataset_name="camvid", method="c2vkd",
                teacher_name="org/teacher", teacher_miou=0.7)
    args.update(kwargs)
    build_model_card(**args).save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_a_subset_is_labelled_and_stays_out_of_the_model_index(tmp_path):
    card = _card(tmp_path, eval_images=8, eval_images_total=101)
    assert "Results on camvid (validation, 8 of 101 images)" in card.text
    assert "not the split's result" in card.text and "these 8 validation images" in card.text
    assert not card.data.eval_results and "model-index" not in card.content.split("---")[1]  # the metadata
    full = _card(tmp_path, eval_images=101, eval_images_total=101)
    assert "of 101 images" not in full.text and "Results on camvid (validation)" in full.text
    assert full.data.eval_results[0].metric_value == 50.0 and full.data.eval_results[0].dataset_split == "validation"


def test_usage_snippet_loads_what_exists(tmp_path):
    hub = _card(tmp_path, repo_id="me/segformer-c2vkd")
    assert 'from_pretrained("me/segformer-c2vkd")' in hub.text
    local = _card(tmp_path, repo_id="outputs/camvid-c2vkd")
    assert 'from_pretrained("outputs/camvid-c2vkd")' in local.text and local.text.count("# camvid-c2vkd") == 1


def test_text_source_is_recorded(tmp_path):
    card = _card(tmp_path, text_source="built-in CLIP ViT-B/16 vocabulary 'city' (Cityscapes): Tree=vegetation")
    assert "class-name text embeddings" in card.text and "Tree=vegetation" in card.text


def test_teacher_named_by_hub_id_else_by_architecture_size_and_miou(tmp_path):
    teacher = tiny_teacher()
    assert is_hub_id("openmmlab/upernet-convnext-small") and teacher_description(
        teacher, "openmmlab/upernet-convnext-small", 0.5) == "openmmlab/upernet-convnext-small"
    local = tmp_path / "teachers" / "camvid"
    local.mkdir(parents=True)
    assert not is_hub_id(str(local)) and not is_hub_id("torchvision:deeplabv3_resnet50:/x.pth")
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    assert teacher_description(teacher, str(local), 0.6745) == f"Segformer ({params:.1f}M parameters, val mIoU 67.45%)"
    (local / "teacher_results.json").write_text(json.dumps({"arch": "upernet", "backbone": "tf_efficientnet_lite0"}))
    described = teacher_description(teacher, str(local))
    assert described == f"UperNet + tf_efficientnet_lite0 ({params:.1f}M parameters)" and str(local) not in described
    card = _card(tmp_path, teacher_name=teacher_description(teacher, str(local), 0.6745))
    assert str(local) not in card.text and r"UperNet \+ tf\_efficientnet\_lite0" in card.text
