"""The speed benchmark (:mod:`c2vkd_hf.speed`, ``scripts/speed.py``): its ratios, its pooling of rounds, the
metric it compares against, a probe run in its own subprocess, and the report regenerated from saved results."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from c2vkd_hf import speed
from c2vkd_hf.metrics import StreamingMeanIoU

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("speed_cli", ROOT / "scripts" / "speed.py")
speed_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed_cli)


def _row(config, rounds, **extra):
    """A pooled training row whose per-round medians are ``rounds``."""
    return {"config": config, "step_s_median": float(np.median(rounds)), "round_medians_s": list(rounds),
            "peak_rss_mb": 1000.0, "train_peak_rss_mb": 900.0, "teacher_or_cache_s_median": None,
            "loss_forward_s_median": 0.01, **extra}


def _training(cached_rounds, student_rounds=(1.1, 2.2)):
    return [_row("bare", [1.0, 2.0]), _row("student_only", student_rounds), _row("c2vkd_online", [2.2, 4.4]),
            _row("c2vkd_cached", cached_rounds, teacher_or_cache_s_median=0.02)]


def test_step_ratios_are_paired_within_a_round():
    """Each round ran under its own load: the ratio is the median of the per-round ratios (1.1, 1.2, 1.1), not
    the ratio of medians pooled over rounds (2.4 / 2.0 = 1.2)."""
    training = _training([1.21, 2.42, 4.84], student_rounds=[1.1, 2.4, 4.4])
    training[0] = _row("bare", [1.0, 2.0, 4.0])
    ratios, _ = speed.summarise(training)
    assert ratios["student_over_bare_step"] == pytest.approx(1.1)
    assert ratios["per_round"]["student_over_bare_step"] == pytest.approx([1.1, 1.2, 1.1])
    assert ratios["cached_over_student_step"] == pytest.approx(1.1)


@pytest.mark.parametrize("cached, missed", [([1.1, 2.2], False), ([1.32, 2.64], True)])
def test_the_verdict_says_when_the_cache_target_is_missed(cached, missed):
    _, verdict = speed.summarise(_training(cached))
    assert verdict.startswith("**Target missed**: (c)/(a) = 1.20 > 1.10") is missed
    assert "0.020 s reading and replaying the cache" in verdict


def test_rounds_pool_their_steps_and_keep_the_highest_peak():
    first = {"config": "x", "step_s_all": [1.0, 3.0], "step_s_median": 2.0, "load_end": [1.0], "peak_rss_mb": 10.0,
             "train_peak_rss_mb": None, "loss_forward_s_median": 0.1}
    second = {**first, "step_s_all": [5.0, 7.0], "step_s_median": 6.0, "load_end": [2.0], "peak_rss_mb": 30.0,
              "loss_forward_s_median": 0.3}
    pooled = speed.pool_rounds([first, second])
    assert pooled["step_s_median"] == 4.0 and pooled["steps_timed"] == 4
    assert pooled["round_medians_s"] == [2.0, 6.0]
    assert pooled["peak_rss_mb"] == 30.0 and pooled["train_peak_rss_mb"] is None
    assert pooled["loss_forward_s_median"] == pytest.approx(0.2) and pooled["load_end"] == [2.0]
    assert speed.pool_rounds([first]) is first


def test_the_emulated_keep_all_metric_agrees_with_the_streaming_one():
    """The report's two metric rows must compute the same mIoU, or their speeds are not comparable."""
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 5, (12, 16)) for _ in range(4)]
    labels[0][:3] = 255
    preds = [np.where(rng.random(label.shape) < 0.7, np.where(label == 255, 0, label), rng.integers(0, 5, label.shape))
             for label in labels]
    streaming = StreamingMeanIoU(5)
    streaming.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(labels)))
    assert speed.keep_all_mean_iou(preds, labels, 5) == pytest.approx(streaming.compute()["mean_iou"])


def test_train_config_per_row():
    args = SimpleNamespace(data_dir="/d", protocol="camvid", warmup=2, steps=5, workers=None, device="cpu",
                           precision="fp32", decoded_cache_dir=None, teacher="/t", text_embeddings="/e", cache="/c")
    alone = speed.train_config(args, "student_only", "/o")
    assert alone["method"] == "none" and alone["max_steps"] == 7 and "teacher_name_or_path" not in alone
    assert (alone["resize_height"], alone["resize_width"], alone["per_device_train_batch_size"]) == (120, 160, 8)
    assert speed.train_config(args, "student_only_files", "/o")["decoded_cache"] is False
    assert speed.train_config(args, "student_only_worker", "/o")["dataloader_num_workers"] == 1
    online = speed.train_config(args, "c2vkd_online", "/o")
    assert online["method"] == "c2vkd" and online["teacher_name_or_path"] == "/t" and "teacher_cache" not in online
    assert speed.train_config(args, "c2vkd_cached", "/o")["teacher_cache"] == "/c"


def test_a_probe_runs_in_its_own_process(tmp_path):
    """The metric probe through ``python -m c2vkd_hf.speed.probes`` on a CamVid-shaped label folder."""
    import PIL.Image

    (tmp_path / "valannot").mkdir()
    for i in range(3):
        label = np.full((8, 10), i, np.uint8)
        label[0] = 11  # void
        PIL.Image.fromarray(label).save(tmp_path / "valannot" / f"0016E5_{i}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"ignore_index": 11}))
    args = SimpleNamespace(data_dir=str(tmp_path), eval_repeats=2)
    result = speed.run_probe(args, "eval", "streaming")
    assert result["metric"] == "streaming" and result["images"] == 6 and result["subprocess_wall_s"] > 0
    # each map is one class, shifted by 7 columns: rows 1-7 are right except where the void row moved in
    assert 0 < result["mean_iou"] <= 1


def test_report_only_regenerates_the_committed_report(tmp_path):
    """``--report_only`` rewrites RESULTS.md from results.json alone: on the committed pair it is unchanged."""
    for name in ("results.json", "RESULTS.md"):
        shutil.copy(ROOT / "benchmarks" / "speed" / name, tmp_path / name)
    speed_cli.main(["--report_only", "--out_dir", str(tmp_path)])
    assert (tmp_path / "RESULTS.md").read_text() == (ROOT / "benchmarks" / "speed" / "RESULTS.md").read_text()


@pytest.mark.parametrize("flags, message", [(["--steps", "0"], "--steps must be at least 1"),
                                            (["--warmup", "-1"], "--warmup and --benchmark_steps")])
def test_bad_counts_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        speed_cli.main(flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err
