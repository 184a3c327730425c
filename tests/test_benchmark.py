"""scripts/benchmark.py's report: table, gain ratio and README table from per-run JSONs (no training)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402


def _run(out: Path, name: str, method: str, seed: int, miou: float):
    record = {
        "name": name, "method": method, "seed": seed, "extra_flags": [], "val_mean_iou": miou,
        "per_category_iou": {"Sky": miou, "Road": miou / 2}, "steps": 10, "wall_time_s": 60.0, "peak_rss_mb": 100.0,
        "teacher_val_mean_iou": 0.6, "eval_history": [{"step": 10, "val_mean_iou": miou}],
        "loss_history": [{"step": 5, "loss": 1.0, "loss_weighted/pdd": 0.5}], "loss_weights": {"ce": 1.0},
        "config": {"data": {"train_images": "t", "resize_height": 12, "resize_width": 16, "min_scale": 0.75,
                            "max_scale": 1.5},
                   "distillation": {"teacher_name_or_path": "T", "text_embeddings": "E"},
                   "training": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                                "warmup_steps": 1}},
    }
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}-seed{seed}.json").write_text(json.dumps(record))


def test_gain_ratio_from_seed_means(tmp_path):
    for seed, value in enumerate((0.30, 0.32)):
        _run(tmp_path, "none", "none", seed, value)
    for seed, value in enumerate((0.36, 0.38)):
        _run(tmp_path, "c2vkd", "c2vkd", seed, value)
    _run(tmp_path, "kd", "kd", 0, 0.33)
    _run(tmp_path, "cwd", "cwd", 0, 0.34)
    _run(tmp_path, "dist", "dist", 0, 0.29)
    table = benchmark.summarise(benchmark.load_runs(tmp_path))
    ratio, best = benchmark.gain_ratio(table)
    assert best == "cwd"
    assert ratio == pytest.approx((37 - 31) / (34 - 31))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{benchmark.README_START}\nold\n{benchmark.README_END}\noutro\n")
    benchmark.main(["--report_only", "--out_dir", str(tmp_path), "--readme", str(readme)])
    report = (tmp_path / "RESULTS.md").read_text()
    assert "**2.00**" in report and "| c2vkd | c2vkd | - | 2 | 37.00 |" in report
    text = readme.read_text()
    assert "old" not in text and "| c2vkd | c2vkd |" in text and text.endswith("outro\n")
    assert (tmp_path / "results_miou.png").is_file()


def test_paired_gains_subtract_the_same_seed(tmp_path):
    for seed, value in enumerate((0.30, 0.34, 0.28)):
        _run(tmp_path, "none", "none", seed, value)
    for seed, value in enumerate((0.31, 0.33)):
        _run(tmp_path, "c2vkd", "c2vkd", seed, value)
    _run(tmp_path, "kd", "kd", 5, 0.40)  # no plain-student run with seed 5: not paired
    gains = benchmark.paired_gains(benchmark.load_runs(tmp_path))
    assert list(gains) == ["c2vkd"]
    assert [s for s, _ in gains["c2vkd"]] == [0, 1]
    assert [g for _, g in gains["c2vkd"]] == pytest.approx([1.0, -1.0])
    lines = benchmark.paired_table(benchmark.load_runs(tmp_path))
    assert "| c2vkd | 2 | s0: +1.00, s1: -1.00 | +0.00 | 1/2 |" in lines


def test_ratio_warns_when_the_best_peer_is_inside_the_seed_noise(tmp_path):
    for seed, value in enumerate((0.30, 0.34, 0.32)):
        _run(tmp_path, "none", "none", seed, value)
    for seed, value in enumerate((0.33, 0.35, 0.34)):
        _run(tmp_path, "c2vkd", "c2vkd", seed, value)
    _run(tmp_path, "cwd", "cwd", 0, 0.325)  # +0.5 over the 3-seed mean, but +2.5 over seed 0
    benchmark.main(["--report_only", "--out_dir", str(tmp_path), "--readme", str(tmp_path / "none.md")])
    report = (tmp_path / "RESULTS.md").read_text()
    assert "= **4.00**" in report
    assert "smaller than the plain student's seed standard deviation (2.00)" in report
    assert "cwd has 1 seed(s) against none's 3; paired on its seeds it is +2.50" in report
    assert "| cwd | cwd | - | 1 | 32.50 | - | 32.50..32.50 | +2.50 |" in report  # the table's gain: same seeds


def test_ablations_are_paired_with_the_default_they_change(tmp_path):
    """A variant carrying ``ablates`` is compared with that run, the others with c2vkd."""
    _run(tmp_path, "none", "none", 0, 0.30)
    _run(tmp_path, "c2vkd", "c2vkd", 0, 0.36)
    _run(tmp_path, "c2vkd-old", "c2vkd", 0, 0.34)
    _run(tmp_path, "c2vkd-no-x", "c2vkd", 0, 0.35)
    path = tmp_path / "runs" / "c2vkd-old-no-y-seed0.json"
    _run(tmp_path, "c2vkd-old-no-y", "c2vkd", 0, 0.31)
    path.write_text(json.dumps({**json.loads(path.read_text()), "ablates": "c2vkd-old"}))
    runs = benchmark.load_runs(tmp_path)
    assert benchmark.ablation_references(runs) == ["c2vkd", "c2vkd-old"]
    benchmark.main(["--report_only", "--suite", "ablations", "--out_dir", str(tmp_path)])
    report = (tmp_path / "ABLATIONS.md").read_text()
    over_default = report.split("## Gain over c2vkd, paired")[1].split("## ")[0]
    over_old = report.split("## Gain over c2vkd-old, paired")[1].split("## ")[0]
    assert "| c2vkd-no-x | 1 | s0: -1.00 |" in over_default and "| c2vkd-old | 1 | s0: -2.00 |" in over_default
    assert "c2vkd-old-no-y" not in over_default
    assert "| c2vkd-old-no-y | 1 | s0: -3.00 |" in over_old and "c2vkd-no-x" not in over_old


def test_report_command_covers_peers_with_more_seeds(tmp_path):
    """A peer with more seeds than the others gets its own --runs command in RESULTS.md."""
    for seed in range(3):
        _run(tmp_path, "none", "none", seed, 0.30)
        _run(tmp_path, "c2vkd", "c2vkd", seed, 0.33)
        _run(tmp_path, "dist", "dist", seed, 0.32)
    _run(tmp_path, "kd", "kd", 0, 0.31)
    benchmark.main(["--report_only", "--out_dir", str(tmp_path), "--readme", str(tmp_path / "none.md")])
    report = (tmp_path / "RESULTS.md").read_text()
    assert ("python scripts/benchmark.py --main_seeds 3\n"
            "python scripts/benchmark.py --main_seeds 3 --other_seeds 3 --runs dist:dist\n") in report


def test_main_report_pairs_c2vkd_with_the_head_control(tmp_path):
    """The head control joins the main table and C2VKD is paired against it; the ratio ignores it, and
    README gets the report's sections as subsections."""
    for seed, (base, control, c2vkd) in enumerate([(0.30, 0.35, 0.34), (0.28, 0.33, 0.35)]):
        _run(tmp_path, "none", "none", seed, base)
        _run(tmp_path, "dist", "dist", seed, base + 0.01)
        _run(tmp_path, "c2vkd", "c2vkd", seed, c2vkd)
        _run(tmp_path, benchmark.HEAD_CONTROL, "c2vkd", seed, control)
        path = tmp_path / "runs" / f"{benchmark.HEAD_CONTROL}-seed{seed}.json"
        flags = benchmark.parse_run(benchmark.HEAD_CONTROL_RUN)[2]
        path.write_text(json.dumps({**json.loads(path.read_text()), "extra_flags": flags}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## CamVid benchmark\n\n<!-- benchmark:start -->\nold\n<!-- benchmark:end -->\n")
    benchmark.main(["--report_only", "--out_dir", str(tmp_path), "--readme", str(readme)])
    report = (tmp_path / "RESULTS.md").read_text()
    assert "= **5.50**" in report  # (mean c2vkd - mean none) / (mean dist - mean none) = 0.055 / 0.01
    over_control = report.split(f"## Gain over {benchmark.HEAD_CONTROL}, paired")[1].split("## ")[0]
    assert "| c2vkd | 2 | s0: -1.00, s1: +2.00 | +0.50 | 1/2 |" in over_control and "dist" not in over_control
    assert f"| {benchmark.HEAD_CONTROL} | c2vkd | --pdd_weight 0 --glob_weight 0 --rel_weight 0 --label_weight 1 | 2 |" in report
    # the control gets the main seeds, so its spec is not listed apart (a peer with fewer seeds would be)
    assert "python scripts/benchmark.py --other_seeds 2\n" in report
    text = readme.read_text()
    assert "### Gain over none, paired by seed" in text and "\n## Gain" not in text and "old" not in text


def test_ablations_give_each_variant_its_gain_ratio(tmp_path):
    """Each C2VKD variant's paired gain over none is divided by the best peer's paired gain."""
    for seed in range(2):
        _run(tmp_path, "none", "none", seed, 0.30 - 0.02 * seed)
        _run(tmp_path, "kd", "kd", seed, 0.30 - 0.02 * seed + 0.01)
        _run(tmp_path, "dist", "dist", seed, 0.30 - 0.02 * seed + 0.02)
        _run(tmp_path, "c2vkd", "c2vkd", seed, 0.30 - 0.02 * seed + 0.03)
    _run(tmp_path, "c2vkd-no-x", "c2vkd", 1, 0.28 + 0.05)  # one seed: paired on it only
    benchmark.main(["--report_only", "--suite", "ablations", "--out_dir", str(tmp_path)])
    section = (tmp_path / "ABLATIONS.md").read_text().split("## Gain ratio with each variant")[1].split("## ")[0]
    assert "(dist, +2.00)" in section
    assert "| c2vkd-no-x | +5.00 | 2.50 |" in section and "| c2vkd | +3.00 | 1.50 |" in section
    assert "| kd |" not in section and "| dist |" not in section
