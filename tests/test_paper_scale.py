"""``--recipe paper-scale`` (``c2vkd_hf/recipes/paper-scale.yaml``): the paper's setting as one recipe that runs.

The recipe is C2VKD with ``--recipe paper``'s loss at the paper's scale: MiT-B0 student, DeepLabV3+ ResNet-101
teacher, 512x1024 crops, batch 8 per device, bf16, 80k polynomial-decay steps. What a GPU user changes is the
model ids and the data path only; the first test holds the recipe to that and to ``paper.yaml``'s loss values
(a recipe cannot include another, so they are repeated there). The second runs the recipe end to end for two
steps at 512x1024 on the built-in synthetic scenes, with only the scale-independent overrides: the synthetic
data, batch 1, two steps, fp32 (this CPU has no native bf16: ``--bf16 true --use_cpu true`` is honoured, but its
emulated bf16 convolutions are far slower than fp32; ``tests/test_bf16_losses.py`` covers bf16), no data-loading
workers, and the two models built locally with random weights and the recipe's architectures (MiT-B0's sizes are
``SegformerConfig``'s defaults; the project's DeepLabV3+ on a timm ResNet-101), so nothing is downloaded. The
text embeddings come from the built-in CLIP vocabulary, as in the synthetic default job.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, SegformerConfig

from c2vkd_hf.cli.distill import parse_args
from c2vkd_hf.config import DataArguments, DistillationArguments
from c2vkd_hf.data.synthetic import SYNTHETIC_CLASSES
from c2vkd_hf.jobs import recipe_values
from c2vkd_hf.models import build_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import distill  # noqa: E402

RECIPE = ROOT / "c2vkd_hf" / "recipes" / "paper-scale.yaml"
#: the recipe's entries a GPU user replaces: model ids and where the data and the run live
USER_PATHS = ("student_name_or_path", "teacher_name_or_path", "dataset_name", "output_dir")


def test_recipe_is_the_papers_setting_and_names_what_to_change():
    values = recipe_values("paper-scale")
    paper = recipe_values("paper")
    assert {k: values.get(k) for k in paper} == paper, "the loss is --recipe paper's, value for value"
    assert values["student_name_or_path"] == "nvidia/mit-b0"
    assert (values["crop_height"], values["crop_width"], values["per_device_train_batch_size"]) == (512, 1024, 8)
    assert (values["bf16"], values["max_steps"], values["lr_scheduler_type"]) == (True, 80000, "polynomial")
    header = RECIPE.read_text().split("\n\n")[0]
    assert all(name in header for name in USER_PATHS if name != "output_dir"), "the header says what to change"
    # every entry is a flag of c2vkd-distill (bf16 without a GPU needs --use_cpu true)
    dist_args, data_args, training_args, _ = parse_args(["--recipe", "paper-scale", "--use_cpu", "true"])
    parsed = {**dataclasses.asdict(dist_args), **dataclasses.asdict(data_args), **training_args.to_dict()}
    for name, value in values.items():
        got = getattr(parsed[name], "value", parsed[name])  # enums (lr_scheduler_type, eval_strategy)
        assert got == value, (name, got, value)
    assert training_args.bf16 and not training_args.fp16


@pytest.mark.slow
def test_paper_scale_recipe_runs_two_steps_at_512x1024(tmp_path):
    mit_b0 = SegformerConfig()  # its defaults are MiT-B0's sizes
    assert (list(mit_b0.hidden_sizes), list(mit_b0.depths)) == ([32, 64, 160, 256], [2, 2, 2, 2])
    student = tmp_path / "mit-b0"
    mit_b0.save_pretrained(student)  # a config alone: random init, nothing downloaded
    teacher = tmp_path / "deeplabv3plus-r101"
    build_teacher("deeplabv3plus", "resnet101", id2label=dict(enumerate(SYNTHETIC_CLASSES))).save_pretrained(teacher)
    out = tmp_path / "run"
    results = distill.main([
        "--recipe", "paper-scale", "--output_dir", str(out),
        "--student_name_or_path", str(student), "--teacher_name_or_path", str(teacher),
        "--dataset_name", "synthetic", "--synthetic_height", "512", "--synthetic_width", "1024",
        "--synthetic_train_size", "2", "--synthetic_validation_size", "1",
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--max_steps", "2",
        "--bf16", "false", "--dataloader_num_workers", "0", "--eval_strategy", "no", "--logging_steps", "1",
        "--train_baseline", "false", "--disable_tqdm", "true"])

    assert results["steps"] == 2 and results["method"] == "c2vkd"
    assert results["loss_weights"] == {"ce": 1.0, "pdd": 1.0, "glob": 0.1, "rel": 0.1, "ling": 0.5}
    assert results["linguistic_term"] and not results["text_head"]
    assert results["text_embeddings_source"].startswith("built-in CLIP")
    assert 0.0 <= results["val_mean_iou"] <= 1.0 and results["teacher_val_mean_iou"] is not None
    assert results["eval_images"] == 1 and results["dataset"] == "synthetic"
    history = results["loss_history"]
    assert [entry["step"] for entry in history] == [1, 2]
    assert all(math.isfinite(value) for entry in history for key, value in entry.items() if key.startswith("loss"))
    config = results["config"]
    data = DataArguments(**config["data"])
    assert (data.crop_height, data.crop_width, data.min_scale, data.max_scale) == (512, 1024, 0.5, 2.0)
    assert (data.synthetic_height, data.synthetic_width) == (512, 1024)
    dist = DistillationArguments(**config["distillation"])
    assert (dist.feature_pairs, dist.class_balance, dist.exit_weight, dist.channel_weight) == (
        "stage4:stage4", False, 0.0, 0.0)
    training = config["training"]
    assert (training["learning_rate"], training["weight_decay"]) == (6e-5, 0.01)
    assert training["lr_scheduler_type"] == "polynomial" and training["bf16"] is False
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert list(AutoConfig.from_pretrained(out).hidden_sizes) == [32, 64, 160, 256]  # the saved student is a MiT-B0
