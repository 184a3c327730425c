"""The peer mode of the speed benchmark (``scripts/speed.py --peers``, :mod:`c2vkd_hf.speed.peers`): torchdistill's
KD loss equals ours on a fixed batch, every loop trains, and the report regenerates. torchdistill is a test
dependency (``pip install -e ".[test]"``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from c2vkd_hf.speed import peers
from tests.tiny import ID2LABEL, TINY_SEGFORMER_JSON, tiny_teacher


def _camvid_shaped(root: Path, n: int = 4) -> None:
    """``n`` train and 2 val images of 32x32 with labels 0-2 and a void row (value 3), CamVid's layout."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / f"a_{i}.png")
            label = rng.integers(0, 3, (32, 32), dtype=np.uint8)
            label[0] = 3
            PIL.Image.fromarray(label).save(root / f"{split}annot" / f"a_{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": list(ID2LABEL.values()), "ignore_index": 3}))


@pytest.fixture()
def peer_args(tmp_path):
    _camvid_shaped(tmp_path / "data")
    teacher = tiny_teacher()
    with torch.no_grad():  # confident teacher logits, so that KD is far from 0 (random init is near uniform)
        bias = teacher.decode_head.classifier.bias
        bias.copy_(torch.linspace(4.0, -4.0, bias.numel()))
    teacher.save_pretrained(tmp_path / "teacher")
    return SimpleNamespace(
        data_dir=str(tmp_path / "data"), teacher=str(tmp_path / "teacher"), kd_cache=str(tmp_path / "kd-cache"),
        protocol="camvid", device="cpu", precision="fp32", threads=1, workers=None, decoded_cache_dir=None,
        warmup=1, steps=2, rounds=1,
        peer_flags={"student_config_overrides": TINY_SEGFORMER_JSON, "resize_height": 32, "resize_width": 32,
                    "per_device_train_batch_size": 2, "kd_temperature": 2.0, "kd_weight": 0.5})


def test_torchdistill_computes_our_kd_loss_on_a_fixed_batch(peer_args):
    """At temperature 2 and KD weight 0.5 (so that ``T^2`` and both weights count), torchdistill's ``KDLoss`` over
    the labelled pixels equals ours."""
    result = peers.loss_equality(peer_args)
    assert result["equal"] and result["abs_diff"] <= peers.LOSS_TOLERANCE, result
    assert 0 < result["labelled_pixels"] < 2 * 32 * 32  # the void row (rescaled and cropped) is left out
    terms = result["ours_terms"]
    assert terms["kd"] > 0.1 and result["ours"] == pytest.approx(terms["ce"] + 0.5 * terms["kd"], rel=1e-6)


def test_torchdistill_without_a_teacher_computes_our_cross_entropy(peer_args):
    """The student-only rows train the same loss: torchdistill's ``CrossEntropyLoss`` over the labelled pixels (its
    ``TrainingBox``) equals our ``--method none`` loss on the fixed batch, and it is not a trivial value."""
    result = peers.loss_equality(peer_args, "ce")
    assert result["equal"] and result["abs_diff"] <= peers.LOSS_TOLERANCE, result
    assert result["ours"] > 0.5 and set(result["ours_terms"]) == {"ce", "loss"}


def test_a_different_torchdistill_configuration_gives_another_loss(peer_args, monkeypatch):
    """The check can fail: with torchdistill's temperature at 1 instead of 2 its loss is another number."""
    build = peers.torchdistill_box

    def at_temperature_one(trainer, steps):
        box, inputs = build(trainer, steps)
        box.criterion.term_dict["kd"][0].temperature = 1.0
        return box, inputs

    monkeypatch.setattr(peers, "torchdistill_box", at_temperature_one)
    result = peers.loss_equality(peer_args)
    assert not result["equal"] and result["abs_diff"] > 1e-3


def test_every_loop_trains_and_the_report_regenerates(peer_args, tmp_path):
    """All six rows in their own processes (the KD cache built first), their ratios, each loop's distillation
    overhead, and PEERS.md from peers.json."""
    results = peers.measure_peers(peer_args, "python scripts/speed.py --peers")
    assert set(results["rows"]) == set(peers.PEER_ROWS) and results["loss_equality"]["equal"]
    assert results["ce_equality"]["equal"]
    for row in results["rows"].values():
        assert row["steps_timed"] == 2 and row["step_s_median"] > 0 and row["subprocess_wall_s"] > 0
        assert 0 < row["rss_before_mb"] <= row["train_peak_rss_mb"]
    ratio = results["ratios"]["ours_kd_online/torchdistill_kd"]
    online, torchdistill = (results["rows"][n]["step_s_median"] for n in ("ours_kd_online", "torchdistill_kd"))
    assert ratio["step"] == pytest.approx(online / torchdistill) and ratio["step_per_round"] == [ratio["step"]]
    rows = results["rows"]
    overheads = results["distillation_overheads_s"]
    assert overheads["torchdistill_kd-torchdistill_student"] == pytest.approx(
        rows["torchdistill_kd"]["step_s_median"] - rows["torchdistill_student"]["step_s_median"])
    assert set(overheads) == {"ours_kd_online-ours_student_only", "torchdistill_kd-torchdistill_student"}
    assert (Path(peer_args.kd_cache) / "cache_meta.json").is_file()
    peers.write_peer_report(results, tmp_path / "PEERS.md")
    report = (tmp_path / "PEERS.md").read_text()
    assert "| `torchdistill_kd` |" in report and "| `torchdistill_student` |" in report and "(within 1e-05)" in report
    assert "`torchdistill_kd-torchdistill_student`" in report
