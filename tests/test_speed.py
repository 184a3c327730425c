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


def _memory_row(config, size, before, peak, saved):
    """A measured memory row (what ``memory_steps`` returns, the fields the summary reads)."""
    return {"config": config, "description": config, "size": list(size), "terms": ["ce"], "text_head": False,
            "rss_before_mb": before, "train_peak_rss_mb": peak, "extra_mb": peak - before, "peak_rss_mb": peak + 10,
            "saved_model_mb": saved - 1.0, "saved_loss_mb": 1.0, "hwm_after_step_mb": [peak], "step_s_all": [1.0]}


def test_memory_ratios_are_against_the_student_only_row_at_the_same_size():
    """Every ratio divides by the student-only row of its own size; a term's memory is its row's extra (and saved
    bytes) minus the all-weights-0 row's; growth is largest size over smallest, and only what outgrows the pixel
    ratio above the noise floor is flagged."""
    small, large = (8, 8), (8, 16)
    measured = [
        _memory_row("student_only", small, 100, 300, 10), _memory_row("c2vkd_online", small, 150, 450, 20),
        _memory_row("teacher_ce", small, 150, 400, 12), _memory_row("rel", small, 150, 420, 13),
        _memory_row("student_only", large, 100, 500, 20), _memory_row("c2vkd_online", large, 150, 900, 40),
        _memory_row("teacher_ce", large, 150, 700, 24), _memory_row("rel", large, 150, 900, 30),
    ]
    summary = speed.summarise_memory(measured, [small, large])
    rows = {(t["config"], tuple(t["size"])): t for t in summary["table"]}
    assert summary["pixel_ratio"] == 2
    assert rows[("student_only", large)]["train_peak_over_student"] == 1.0
    assert rows[("c2vkd_online", small)]["train_peak_over_student"] == pytest.approx(450 / 300)
    assert rows[("c2vkd_online", large)]["train_peak_over_student"] == pytest.approx(900 / 500)
    assert rows[("c2vkd_online", large)]["extra_over_student"] == pytest.approx(750 / 400)
    assert rows[("c2vkd_online", large)]["peak_over_student"] == pytest.approx(910 / 510)
    assert rows[("rel", small)]["term_mb"] == 20 and rows[("rel", large)]["term_mb"] == 200
    assert rows[("rel", small)]["term_saved_mb"] == 1 and rows[("rel", large)]["term_saved_mb"] == 6
    assert rows[("c2vkd_online", large)]["saved_mb"] == 40 and rows[("c2vkd_online", large)]["saved_loss_mb"] == 1
    assert rows[("teacher_ce", large)]["term_mb"] is None and rows[("student_only", large)]["term_mb"] is None
    assert rows[("rel", large)]["growth_term"] == pytest.approx(10.0)
    assert rows[("rel", large)]["growth_term_saved"] == pytest.approx(6.0)
    assert rows[("student_only", small)]["growth_extra"] == pytest.approx(2.0)
    flagged = {(f["config"], f["quantity"]) for f in summary["faster_than_pixels"]}
    # rel's term grew 10x for 2x the pixels (its extra 750 / 270, its saved bytes 6 / 1), the online row's extra
    # 750 / 300 and term 200 / 50; the student's exactly 2x, the reference's 550 / 250 = 2.2x, the online row's
    # saved bytes and term saved bytes (2x) stay within the tolerance
    assert flagged == {("rel", "term_mb"), ("rel", "extra_mb"), ("rel", "term_saved_mb"), ("rel", "saved_mb"),
                       ("c2vkd_online", "extra_mb"), ("c2vkd_online", "term_mb")}
    target = summary["target"]
    assert target["size"] == [8, 16] and not target["met"] and target["online_over_student"] == pytest.approx(1.8)
    assert target["excess_mb"] == pytest.approx(900 - 1.5 * 500)
    assert summary["verdict"].startswith("**Target missed**: at 8x16") and "150 MiB above 1.5x" in summary["verdict"]


def test_a_share_below_the_noise_floor_is_not_flagged():
    """A term's resident-set share under 128 MiB at the largest size says nothing about growth (allocator noise):
    not flagged however it grew; a share that went negative has no growth."""
    small, large = (8, 8), (8, 16)
    measured = [_memory_row("student_only", small, 100, 300, 10), _memory_row("teacher_ce", small, 150, 400, 12),
                _memory_row("glob", small, 150, 410, 14), _memory_row("rel", small, 150, 401, 13),
                _memory_row("student_only", large, 100, 500, 20), _memory_row("teacher_ce", large, 150, 700, 24),
                _memory_row("glob", large, 150, 690, 28), _memory_row("rel", large, 150, 725, 26)]
    summary = speed.summarise_memory(measured, [small, large])
    rows = {(t["config"], tuple(t["size"])): t for t in summary["table"]}
    assert rows[("glob", large)]["term_mb"] == -10 and rows[("glob", large)]["growth_term"] is None
    assert rows[("rel", large)]["growth_term"] == pytest.approx(25.0)  # 25 MiB: under the floor
    assert summary["faster_than_pixels"] == [] and "Nothing grows faster" in summary["verdict"]


def test_memory_mode_runs_each_row_in_its_own_process_and_writes_the_report(tmp_path):
    """``scripts/speed.py --memory`` end to end at 32x32 with a tiny SegFormer and a DeepLabV3+ ResNet-18 teacher
    (built by the command, random init): the student alone, the all-weights-0 reference and PDD alone, each in a
    fresh subprocess; memory.json and MEMORY.md hold the rows, ratios against the student-only row, and the
    hand-written analysis of MEMORY.md survives ``--report_only``."""
    from tests.tiny import TINY_SEGFORMER_JSON

    out = tmp_path / "out"
    flags = ["--memory", "--threads", "1", "--memory_sizes", "32x32", "--memory_rows", "teacher_ce,pdd",
             "--memory_student_overrides", TINY_SEGFORMER_JSON, "--memory_teacher_backbone", "resnet18",
             "--memory_teacher", str(tmp_path / "teacher"), "--out_dir", str(out)]
    results = speed_cli.main(flags)
    assert (tmp_path / "teacher" / "config.json").is_file()
    assert [(r["config"], r["size"]) for r in results["measured"]] == [
        ("student_only", [32, 32]), ("teacher_ce", [32, 32]), ("pdd", [32, 32])]
    measured = {r["config"]: r for r in results["measured"]}
    assert measured["student_only"]["terms"] == ["ce"] and measured["pdd"]["terms"] == ["ce", "pdd"]
    for r in measured.values():
        assert r["steps_done"] == 3 and len(r["hwm_after_step_mb"]) == 3 and r["subprocess_wall_s"] > 0
        # VmHWM and ru_maxrss come from two counters that may differ by a page table's worth
        assert r["hwm_reset"] and 0 < r["rss_before_mb"] <= r["train_peak_rss_mb"] <= r["peak_rss_mb"] + 1.0
        assert r["saved_model_mb"] > 0 and r["saved_loss_mb"] > 0 and len(r["saved_mb_all"]) == 3
        assert r["extra_mb"] == pytest.approx(r["train_peak_rss_mb"] - r["rss_before_mb"])
    rows = {t["config"]: t for t in results["table"]}
    student = measured["student_only"]
    for name, t in rows.items():
        assert t["train_peak_over_student"] == pytest.approx(measured[name]["train_peak_rss_mb"]
                                                             / student["train_peak_rss_mb"])
        assert t["extra_over_student"] == pytest.approx(measured[name]["extra_mb"] / student["extra_mb"])
    assert rows["student_only"]["train_peak_over_student"] == 1.0
    assert rows["pdd"]["term_mb"] == pytest.approx(measured["pdd"]["extra_mb"] - measured["teacher_ce"]["extra_mb"])
    assert results["pixel_ratio"] is None and results["target"] is None  # one size, no online row: no verdict
    saved = json.loads((out / "memory.json").read_text())
    assert saved["table"] == results["table"] and "python scripts/speed.py --memory --threads 1" in saved["command"]
    report = (out / "MEMORY.md").read_text()
    assert "| (c) ce + pdd | 32x32 |" in report and "| teacher_ce | 32x32 |" in report
    (out / "MEMORY.md").write_text(report + "Hand-written finding.\n")
    speed_cli.main(["--memory", "--report_only", "--out_dir", str(out)])
    regenerated = (out / "MEMORY.md").read_text()
    assert regenerated.endswith("Hand-written finding.\n") and regenerated.count("Hand-written finding.") == 1
    assert regenerated.replace("Hand-written finding.\n", "") == report


def test_unknown_memory_rows_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        speed_cli.main(["--memory", "--memory_rows", "pdd,nonsense"])
    assert stop.value.code == 2 and "unknown memory rows ['nonsense']" in capsys.readouterr().err
