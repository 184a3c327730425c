"""Text-query segmentation: load_text_head, segment_by_text, TextQuerySegmenter, scripts/text_query.py (tiny, offline)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSemanticSegmentation

from c2vkd_hf.data import SYNTHETIC_CLASSES
from c2vkd_hf.losses import get_loss
from tiny import c2vkd_loss
from c2vkd_hf.metrics import StreamingMeanIoU
from c2vkd_hf.models import forward_features, load_student
from c2vkd_hf.inference import evaluate_model
from c2vkd_hf.text_query import TEXT_HEAD_NAME, TextQuerySegmenter, load_text_head, segment_by_text
from c2vkd_hf.trainer import DistillationModel, write_text_head
from tiny import c2vkd_loss, ID2LABEL, TINY_SEGFORMER, c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import text_query as text_query_script  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny C2VKD student after 2 steps, saved by the trainer (plain student + text head)."""
    out = tmp_path_factory.mktemp("c2vkd")
    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(), teacher)
    trainer = make_trainer(str(out / "run"), model, teacher, tensor_dataset(8))
    trainer.train()
    trainer.save_model(str(out / "student"))
    return out / "student", model


def test_load_text_head_reads_the_saved_projector(trained):
    folder, model = trained
    head = load_text_head(folder)
    loss = model.distill_loss
    assert head.feature == "stage4" and head.tau == pytest.approx(loss.ling_tau)
    assert head.class_names == [ID2LABEL[i] for i in range(3)]
    torch.testing.assert_close(head.projector.weight, loss.ling_projector.weight.detach())
    torch.testing.assert_close(head.text_embeddings, loss.text_embeddings)
    assert load_text_head(folder / TEXT_HEAD_NAME).feature == "stage4"  # the file itself works too


def test_segment_by_text_matches_the_training_scores_and_takes_any_vocabulary(trained):
    folder, model = trained
    student = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    head = load_text_head(folder)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        logits = segment_by_text(student, head, x)
        _, feats = forward_features(student, x)
        expected = model.distill_loss.eval().pixel_text_logits(feats["stage4"])
        torch.testing.assert_close(logits, expected)
        assert logits.shape == (2, 3) + feats["stage4"].shape[-2:]
        other = torch.randn(5, 12)
        assert segment_by_text(student, head, x, other).shape == (2, 5) + feats["stage4"].shape[-2:]
        # rows are scored independently: a vocabulary that contains the training rows scores them the same
        both = segment_by_text(student, head, x, torch.cat([head.text_embeddings, other]))
        torch.testing.assert_close(both[:, :3], logits)
        with pytest.raises(ValueError, match=r"\(K, 12\)"):
            segment_by_text(student, head, x, torch.randn(4, 7))
    # as a model: evaluation helpers apply
    data = tensor_dataset(4, seed=3)
    expected = StreamingMeanIoU(3)
    with torch.no_grad():
        for item in data:
            x = item["pixel_values"][None]
            scores = nn.functional.interpolate(segment_by_text(student, head, x), size=item["labels"].shape[-2:],
                                               mode="bilinear", align_corners=False)
            expected.update(scores.argmax(1), item["labels"][None])
    metrics = evaluate_model(TextQuerySegmenter(student, head), data, 3, progress=False)
    assert metrics == expected.compute()


def test_missing_text_head_is_a_clear_error(tmp_path):
    tiny_student().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="only a student trained with a text head"):
        load_text_head(tmp_path)


def _student_folder(tmp_path, text: torch.Tensor) -> Path:
    """A tiny synthetic-data student with a text head trained against ``text`` (6, D)."""
    torch.manual_seed(0)
    student = load_student("segformer-b0", dict(enumerate(SYNTHETIC_CLASSES)), config_overrides=TINY_SEGFORMER)
    loss = c2vkd_loss(student_channels=[32], teacher_channels=[32], text_embeddings=text)
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    write_text_head(DistillationModel(student, loss, ["stage4"]), str(folder))
    return folder



def test_text_query_script_on_synthetic_data(tmp_path):
    torch.manual_seed(0)
    folder = _student_folder(tmp_path, nn.functional.normalize(torch.randn(6, 12), dim=1))
    names = ["sky", "house", "street", "plant", "vehicle", "pedestrian", "bus"]
    torch.save(torch.randn(len(names), 12), tmp_path / "query.pth")
    (tmp_path / "mapping.json").write_text(json.dumps({"mapping": {"sky": ["sky"], "building": ["house"],
                                                                   "road": ["street"], "tree": ["plant"],
                                                                   "car": ["vehicle"]}}))
    out = tmp_path / "report"
    argv = ["--model_name_or_path", str(folder), "--synthetic_train_size", "2", "--synthetic_validation_size", "4",
            "--synthetic_height", "32", "--synthetic_width", "48", "--query_embeddings", str(tmp_path / "query.pth"),
            "--query_names", ",".join(names), "--query_mapping", str(tmp_path / "mapping.json"),
            "--extra_mapping", "pedestrian=person,bus=car", "--show_names", "bus,pedestrian", "--num_images", "2",
            "--output_dir", str(out)]
    results = text_query_script.main(argv)
    for key in ("student_head", "text_query_training_names", "text_query_other_names"):
        assert 0.0 <= results[key]["mean_iou"] <= 1.0
    assert results["query_name_to_class"]["bus"] == "car"
    counted = sum(sum(row.values()) for row in results["query_pixels_by_class"].values())
    assert counted == 4 * 32 * 48  # synthetic labels have no void pixels
    report = (out / "RESULTS.md").read_text()
    assert "| **mIoU** |" in report and "text query, 7 other names" in report and "text_query.png" in report
    assert (out / "text_query.png").stat().st_size > 1000
    with pytest.raises(Exception, match="without a training class: bus"):
        text_query_script.main([a if a != "pedestrian=person,bus=car" else "pedestrian=person" for a in argv])


SMALL_DATA = ["--synthetic_train_size", "2", "--synthetic_validation_size", "3", "--synthetic_height", "32",
              "--synthetic_width", "32"]


@pytest.mark.parametrize("flags, message", [
    (["--show_names", "sky,unicorn"], "--show_names unicorn: not among the query names"),
    (["--query_vocabulary", "city", "--show_names", "tree"], "--show_names tree: not among"),
    (["--query_vocabulary", "klingon"], "--query_vocabulary 'klingon'"),
    (["--query_names", "a,b"], "--query_names names the rows of --query_embeddings"),
    (["--query_vocabulary", "city", "--extra_mapping", "road=sky"], "query names without a training class"),
    (["--query_vocabulary", "city", "--extra_mapping", "road=street"], "'street' is not a training class"),
    (["--query_embeddings", "{small}", "--query_names", "a,b"], "holds embeddings of shape (2, 12), but the "
                                                                "student's text head needs (K, 512)"),
    (["--query_mapping", "/nonexistent.json", "--query_vocabulary", "voc"], "--query_mapping /nonexistent.json does "
                                                                             "not exist"),
    (["--num_images", "-1"], "--num_images must be an integer >= 0"),
])
def test_every_flag_is_checked_before_any_evaluation(tmp_path, monkeypatch, flags, message):
    from c2vkd_hf.cli import text_query as cli
    from c2vkd_hf.jobs import UserInputError
    from c2vkd_hf.vocabulary import match_vocabulary

    folder = _student_folder(tmp_path, match_vocabulary(SYNTHETIC_CLASSES).embeddings())
    torch.save(torch.randn(2, 12), tmp_path / "small.pth")
    monkeypatch.setattr(cli, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the flags were checked"))
    flags = [f.replace("{small}", str(tmp_path / "small.pth")) for f in flags]
    with pytest.raises(UserInputError, match=re.escape(message)):
        cli.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")] + SMALL_DATA + flags)


def test_figure_and_defaults_without_and_with_a_built_in_vocabulary(tmp_path, capsys):
    from c2vkd_hf.cli import text_query as cli
    from c2vkd_hf.vocabulary import load_vocabulary, match_vocabulary

    folder = _student_folder(tmp_path, match_vocabulary(SYNTHETIC_CLASSES).embeddings())
    base = ["--model_name_or_path", str(folder), "--num_images", "1"] + SMALL_DATA
    plain = cli.main(base + ["--output_dir", str(tmp_path / "plain")])
    assert "query_names" not in plain and (tmp_path / "plain" / "text_query.png").stat().st_size > 1000
    report = (tmp_path / "plain" / "RESULTS.md").read_text()
    assert "'sky', 'building', 'road', 'tree'" in report and "c2vkd-text-query" in report  # default: training names
    assert "student head" in capsys.readouterr().err  # the progress bars are named

    city = cli.main(base + ["--output_dir", str(tmp_path / "city"), "--query_vocabulary", "city"])
    assert city["query_names"] == list(load_vocabulary("city")[0])
    report = (tmp_path / "city" / "RESULTS.md").read_text()
    assert "'sidewalk', 'wall', 'fence', 'pole'" in report  # default: the first four names it was not trained on
    assert (tmp_path / "city" / "text_query.png").stat().st_size > 1000
