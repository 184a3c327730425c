"""The benchmark (:mod:`c2vkd_hf.benchmark`, ``c2vkd-benchmark``): both tables, the splits a dataset spec names,
paired gains, ratios and README from run JSONs; the run plan; dataset specs; stale records."""

import argparse
import json
import os
from pathlib import Path

import pytest

from c2vkd_hf import benchmark
from c2vkd_hf.cli.benchmark import main as cli_main

SPEC = {
    "title": "Tiny", "data": {"train_images": "t", "train_labels": "ta", "validation_images": "v",
                              "validation_labels": "va", "labels_file": "c.json", "resize_height": 12,
                              "resize_width": 16, "min_scale": 0.75, "max_scale": 1.5, "hflip": True},
    "teacher": "T", "splits": ["val", "selection"], "selection_holdout": "0006R0_*",
    "protocols": {"short": {"max_steps": 10, "eval_steps": 5}, "long": {"max_steps": 10, "eval_steps": 5}},
    "cached_protocols": ["long"],
}


def spec_file(folder: Path, **changes) -> Path:
    """A dataset spec in ``folder`` (the records and reports of these tests live beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.json"
    path.write_text(json.dumps({**SPEC, **changes}))
    return path


def make_report(out: Path, *flags: str) -> None:
    """``c2vkd-benchmark --report_only`` on the records in ``out`` (its spec written there when missing)."""
    spec = out / "dataset.json"
    if not spec.is_file():
        spec_file(out)
    cli_main(["--dataset", str(spec), "--root", str(out), "--report_only", "--out_dir", str(out),
              "--readme", str(out / "none.md"), *flags])


def _config(method: str, extra=()) -> dict:
    """A record's configuration as today's code gives the run (so the record is current, not stale)."""
    return {"data": {"resize_height": 12, "resize_width": 16, "min_scale": 0.75, "max_scale": 1.5},
            "distillation": {**benchmark.method_flags(method, list(extra)), "teacher_name_or_path": "T"},
            "training": {"max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 6e-4, "warmup_steps": 30}}


def _run(out: Path, name: str, method: str, seed: int, val: float, selection=None, protocol="long", **extra):
    history = {"eval_history": [{"step": 10, "val_mean_iou": val}], "loss_history": [{"step": 5, "loss": 1.0}]}
    flags = benchmark.parse_run(next((s for s in benchmark.table_specs() if benchmark.parse_run(s)[0] == name),
                                     f"{name}:{method}"))[2]
    record = {
        "protocol": protocol, "name": name, "method": method, "seed": seed, "text_head": name.endswith("head"),
        "extra_flags": flags, "ablation": None if name in benchmark.table_names() else name,
        "val_mean_iou": val, "selection_mean_iou": selection, "teacher_val_mean_iou": 0.6,
        "config": _config(method, flags),
        "runs": {"val": {"mean_iou": val, **history}}, **extra,
    }
    benchmark.write_json(benchmark.record_path(out, protocol, name, seed), record)


def test_paired_gains_subtract_the_same_seed(tmp_path):
    for seed, value in enumerate((0.30, 0.34, 0.28)):
        _run(tmp_path, "none", "none", seed, value)
    for seed, value in enumerate((0.31, 0.33)):
        _run(tmp_path, "c2vkd", "c2vkd", seed, value)
    _run(tmp_path, "kd", "kd", 5, 0.40)  # no plain-student run with seed 5: not paired
    runs = benchmark.load_runs(tmp_path)
    gains = benchmark.paired_gains(runs, "c2vkd", "none", "val")
    assert [s for s, _ in gains] == [0, 1] and [g for _, g in gains] == pytest.approx([1.0, -1.0])
    assert benchmark.paired_gains(runs, "kd", "none", "val") == []
    assert benchmark.paired_gains(runs, "c2vkd", "none", "selection") == []  # no selection runs yet


def test_both_tables_on_both_splits_with_ratios_and_teacher_attributable_gain(tmp_path):
    """Defaults table: C2VKD's paired gain over none / the best peer's; head table: over none-head, and the
    teacher-attributable gain line; README gets the long protocol's section with subsections."""
    for seed in range(2):
        _run(tmp_path, "none", "none", seed, 0.30 + seed / 100, selection=0.20)
        _run(tmp_path, "dist", "dist", seed, 0.31 + seed / 100, selection=0.21)
        _run(tmp_path, "kd", "kd", seed, 0.305 + seed / 100, selection=0.22)
        _run(tmp_path, "c2vkd", "c2vkd", seed, 0.34 + seed / 100, selection=0.23 + seed / 100)
        _run(tmp_path, "none-head", "none", seed, 0.33 + seed / 100, selection=0.21)
        _run(tmp_path, "dist-head", "dist", seed, 0.335 + seed / 100)
    _run(tmp_path, "none", "none", 0, 0.25, protocol="short")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmark\n\n<!-- benchmark:tiny:start -->\nold\n<!-- benchmark:tiny:end -->\ntail\n")
    spec_file(tmp_path, name="tiny")
    make_report(tmp_path, "--readme", str(readme))
    report = (tmp_path / "RESULTS.md").read_text()
    assert report.index("## Long protocol") < report.index("## Short protocol")
    assert "| c2vkd | 2 | 34.50 ± 0.71 | +4.00 (2/2 seeds above) | 2 | 23.50 ± 0.71 | +3.50 (2/2 seeds above) |" in report
    assert "val: gain ratio (C2VKD's paired gain +4.00) / (best peer dist's +1.00), on the 2 seeds both have = **4.00** (target > 2)" in report
    assert "selection: gain ratio (C2VKD's paired gain +3.50) / (best peer kd's +2.00), on the 2 seeds both have = **1.75**" in report
    head = report.split("### Every method with the text head")[1].split("## Short")[0]
    assert "val: gain ratio (C2VKD's paired gain +1.00) / (best peer dist-head's +0.50), on the 2 seeds both have = **2.00** (target > 1.5)" in head
    assert ("val: teacher-attributable gain (C2VKD minus none-head, paired): **+1.00** ± 0.00 (std of the paired "
            "gains), positive on 2/2 seeds (s0: +1.00, s1: +1.00)") in head
    assert "**missed by 0.50** on 2 seeds" in head.split("- val: teacher")[1].split("\n")[0]
    assert "selection: teacher-attributable gain (C2VKD minus none-head, paired): **+2.50** ± 0.71" in head
    assert "**met** on 2 seeds" in head.split("- selection: teacher")[1].split("\n")[0]
    text = readme.read_text()
    assert "old" not in text and "### Long protocol" in text and "#### Every method at its defaults" in text
    assert "Short protocol" not in text and text.endswith("tail\n")
    assert (tmp_path / "long_miou.png").is_file() and (tmp_path / "long_curves.png").is_file()


def test_missing_lists_the_table_trainings_still_to_make(tmp_path, capsys):
    """Per table run and split, the seeds below the table's count without a result on that split; ablations and
    finished runs are not listed. RESULTS.md says so (the README does not) and ``--missing`` prints lines the
    command accepts back."""
    for seed in range(5):
        _run(tmp_path, "none", "none", seed, 0.30, selection=0.20 if seed < 3 else None)
        _run(tmp_path, "c2vkd", "c2vkd", seed, 0.34, selection=0.23)
    _run(tmp_path, "kd", "kd", 0, 0.31, selection=0.21)
    _run(tmp_path, "c2vkd-x", "c2vkd", 0, 0.35)  # an ablation: never "missing"
    runs = benchmark.load_runs(tmp_path, "long")
    missing = {(spec, split): seeds for spec, split, seeds in benchmark.missing_runs(runs)}
    assert missing[("none:none", "selection")] == [3, 4] and ("none:none", "val") not in missing
    assert missing[("kd:kd", "val")] == [1, 2] and missing[("kd:kd", "selection")] == [1, 2]
    assert missing[("dist:dist", "val")] == [0, 1, 2, 3, 4]
    assert missing[("cwd-head:cwd:--text_head true", "val")] == [0, 1, 2]
    assert not any(spec.startswith(("c2vkd:", "c2vkd-x")) for spec, _ in missing)
    # none; none-head, dist, dist-head; kd; kd-head, cwd, cwd-head, dkd, dkd-head, c2vkd-paper
    assert sum(map(len, missing.values())) == 2 + 3 * 10 + 4 + 6 * 6
    assert benchmark.missing_runs(runs, main_seeds=1, other_seeds=1, splits=("val",)) == [
        ("none-head:none:--text_head true", "val", [0]), ("kd-head:kd:--text_head true", "val", [0]),
        ("cwd:cwd", "val", [0]), ("cwd-head:cwd:--text_head true", "val", [0]),
        ("dist:dist", "val", [0]), ("dist-head:dist:--text_head true", "val", [0]), ("dkd:dkd", "val", [0]),
        ("dkd-head:dkd:--text_head true", "val", [0]), (benchmark.PAPER, "val", [0])]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark:tiny:start -->\n<!-- benchmark:tiny:end -->\n")
    spec_file(tmp_path, name="tiny")
    make_report(tmp_path, "--readme", str(readme))
    still = (tmp_path / "RESULTS.md").read_text().split("### Still to run")[1].split("###")[0]
    assert "72 trainings are missing" in still
    assert "- `none`: selection seeds 3, 4\n" in still and "- `kd`: val seeds 1, 2; selection seeds 1, 2\n" in still
    assert "`c2vkd`:" not in still and "Still to run" not in readme.read_text()
    capsys.readouterr()
    cli_main(["--dataset", str(tmp_path / "dataset.json"), "--missing", "--out_dir", str(tmp_path),
              "--splits", "selection"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"--dataset {tmp_path / 'dataset.json'} --protocol long --main_seeds 5 --other_seeds 3 "
                        "--splits selection --runs none:none  # seeds 3, 4")
    assert "--runs 'kd-head:kd:--text_head true'  # seeds 0, 1, 2" in lines[3] and len(lines) == 11
    import shlex
    parsed = argparse.ArgumentParser()
    parsed.add_argument("--runs", nargs="*")
    known, _ = parsed.parse_known_args(shlex.split(lines[3], comments=True))
    assert known.runs == ["kd-head:kd:--text_head true"]


def test_teacher_gain_verdict_needs_the_mean_and_four_of_five_seeds():
    """A mean at the target with only 3/5 seeds positive misses; 4/5 positive and the mean at +1.5 meets it."""
    three_of_five = [(0, 4.0), (1, -0.5), (2, 3.0), (3, -1.0), (4, 2.0)]
    assert "**missed: too few seeds positive** on 5 seeds" in benchmark.teacher_gain_line(three_of_five, "none-head")
    four_of_five = [(0, 4.0), (1, 0.5), (2, 3.0), (3, -1.0), (4, 1.0)]
    line = benchmark.teacher_gain_line(four_of_five, "none-head")
    assert "**+1.50** ± 2.00" in line and "positive on 4/5 seeds" in line and "**met** on 5 seeds" in line
    assert "**missed by 1.00** on 1 seed" in benchmark.teacher_gain_line([(0, 0.5)], "none-head")


def test_ratio_undefined_when_no_peer_beats_the_baseline(tmp_path):
    _run(tmp_path, "none", "none", 0, 0.30)
    _run(tmp_path, "kd", "kd", 0, 0.29)
    _run(tmp_path, "c2vkd", "c2vkd", 0, 0.31)
    make_report(tmp_path)
    assert "= **undefined (no peer beats none: best kd -1.00)**" in (tmp_path / "RESULTS.md").read_text()


def test_ratio_compares_c2vkd_with_a_peer_on_the_seeds_the_peer_has(tmp_path):
    """C2VKD gains +1 and +5 on seeds 0-1; a peer run on seed 0 only (+2) is compared with C2VKD's seed-0 gain,
    not with its two-seed mean (which would give 1.50)."""
    for seed in range(2):
        _run(tmp_path, "none", "none", seed, 0.30)
        _run(tmp_path, "c2vkd", "c2vkd", seed, (0.31, 0.35)[seed])
    _run(tmp_path, "kd", "kd", 0, 0.32)
    r = benchmark.gain_ratio(benchmark.load_runs(tmp_path), "defaults", "val")
    assert r["best"] == "kd" and r["seeds"] == 1
    assert (r["c2vkd"], r["peer"], r["ratio"]) == pytest.approx((1.0, 2.0, 0.5))


def test_results_pair_c2vkd_directly_with_the_best_peer(tmp_path):
    """C2VKD minus the best peer, seed by seed: seed 0 -1, seed 1 +3 (mean +1, std 2.83); seed 2 has no peer run."""
    for seed in range(3):
        _run(tmp_path, "none", "none", seed, 0.30)
        _run(tmp_path, "c2vkd", "c2vkd", seed, (0.31, 0.36, 0.40)[seed])
    _run(tmp_path, "cwd", "cwd", 0, 0.32)
    _run(tmp_path, "cwd", "cwd", 1, 0.33)
    _run(tmp_path, "kd", "kd", 0, 0.30)
    make_report(tmp_path)
    assert ("- val: C2VKD minus best peer cwd, paired by seed: **+1.00** ± 2.83 (std over seeds), C2VKD above on 1/2 "
            "seeds (s0: -1.00, s1: +3.00)") in (tmp_path / "RESULTS.md").read_text()
    assert benchmark.head_to_head_line([(4, 0.5)], "dist") == (
        "C2VKD minus best peer dist, paired by seed: **+0.50**, C2VKD above on 1/1 seeds (s4: +0.50)")


def test_ablations_are_paired_with_the_run_they_change(tmp_path):
    _run(tmp_path, "none", "none", 0, 0.30)
    _run(tmp_path, "c2vkd", "c2vkd", 0, 0.36, selection=0.20)
    _run(tmp_path, "c2vkd-stage", "c2vkd", 0, 0.35, selection=0.22, text_head=True)
    _run(tmp_path, "none-head", "none", 0, 0.32, selection=0.25)
    _run(tmp_path, "none-head-x", "none", 0, 0.31, ablates="none", selection=0.24)
    _run(tmp_path, "c2vkd-x", "c2vkd", 0, 0.33, selection=0.27, text_head=True, control="none-head-x")
    make_report(tmp_path)
    ablations = (tmp_path / "ABLATIONS.md").read_text()
    # paired with the run it changes, and (teacher-based, with the head) minus none-head of the same seed
    assert ("| c2vkd-stage | c2vkd | `-` | -1.00 (0/1 seeds above) | +2.00 (1/1 seeds above) | none-head | "
            "+3.00 (1/1 seeds above) | -3.00 (0/1 seeds above) |") in ablations
    assert "| none-head-x | none | `-` | +1.00 (1/1 seeds above) | - | - | - | - |" in ablations
    # or minus the teacher-free control the record names (same data flags, no teacher)
    assert ("| c2vkd-x | c2vkd | `-` | -3.00 (0/1 seeds above) | +7.00 (1/1 seeds above) | none-head-x | "
            "+2.00 (1/1 seeds above) | +3.00 (1/1 seeds above) |") in ablations
    assert benchmark.controlled_variants(benchmark.load_runs(tmp_path, "long")) == {"none-head-x": ["c2vkd-x"]}
    assert "c2vkd-stage" not in (tmp_path / "RESULTS.md").read_text()


def test_a_spec_gives_the_shared_configuration_of_each_split(tmp_path):
    spec = benchmark.load_spec(str(spec_file(tmp_path)))
    args = argparse.Namespace(spec=spec, protocol="long")
    assert benchmark.shared_config(args, "selection")["selection_holdout"] == "0006R0_*"
    assert "selection_holdout" not in benchmark.shared_config(args, "val")
    assert benchmark.shared_config(args, "val")["max_steps"] == 10
    assert benchmark.shared_config(args, "val")["train_images"] == str((tmp_path / "t").resolve())  # beside the spec
    specs = benchmark.table_specs()
    assert len(specs) == len(set(specs)) == 12 and specs.count("c2vkd:c2vkd") == 1
    assert specs.count(benchmark.PAPER) == 1


@pytest.mark.parametrize("changes, message", [
    ({"splits": ["val", "selection"], "selection_holdout": None}, "needs 'selection_holdout'"),
    ({"protocols": {"long": {"max_steps": 5}}}, "'protocols' must map names"),
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"cached_protocols": ["huge"]}, "unknown protocols"),
])
def test_bad_specs_name_the_key(tmp_path, changes, message):
    with pytest.raises(benchmark.SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        benchmark.load_spec(str(spec_file(tmp_path, **changes)))


def test_builtin_specs_load_and_keep_camvid_configuration():
    """The three built-in datasets load; CamVid's runs get the configuration its records were made with."""
    root = Path(__file__).resolve().parents[1]
    specs = {name: benchmark.load_spec(name, root) for name in ("camvid", "stanford_background", "msrc21")}
    camvid = specs["camvid"].shared_config("long", "selection")
    assert (camvid["resize_height"], camvid["resize_width"], camvid["max_steps"], camvid["learning_rate"]) == (
        120, 160, 2000, 6e-4)
    assert camvid["selection_holdout"] == "0006R0_*" and camvid["teacher_name_or_path"].endswith("camvid-upernet-lite0")
    for name in ("stanford_background", "msrc21"):
        config = specs[name].shared_config("long", "val")
        assert config["resize_shortest_edge"] == 120 and "resize_height" not in config
        assert specs[name].splits == ("val",)


def test_a_record_of_another_configuration_is_stale_and_left_out(tmp_path):
    """A record whose configuration is not what today's defaults give its run is stale: out of the tables, listed as
    missing with why, while a peer record is not made stale by a C2VKD-only flag."""
    _run(tmp_path, "none", "none", 0, 0.30)
    _run(tmp_path, "kd", "kd", 0, 0.32)
    _run(tmp_path, "c2vkd", "c2vkd", 0, 0.40)
    path = benchmark.record_path(tmp_path, "long", "c2vkd", 0)
    record = json.loads(path.read_text())
    record["config"]["distillation"]["channel_weight"] = 0.0  # made before the channel-wise term was the default
    benchmark.write_json(path, record)
    kd = benchmark.record_path(tmp_path, "long", "kd", 0)
    record = json.loads(kd.read_text())
    record["config"]["distillation"]["exit_weight"] = 0.0  # a C2VKD flag: KD does not read it
    benchmark.write_json(kd, record)
    spec = benchmark.load_spec(str(spec_file(tmp_path)))
    runs = benchmark.mark_stale(benchmark.load_runs(tmp_path, "long"), spec, "long")
    stale = {r["name"]: r["stale"] for r in runs}
    assert stale["none"] == [] and stale["kd"] == []
    assert stale["c2vkd"] == ["channel_weight: record has 0.0, today 3.0"]
    assert benchmark.values(runs, "c2vkd", "val") == {}
    assert any(spec_ == "c2vkd:c2vkd" and seeds == [0, 1, 2, 3, 4]
               for spec_, split, seeds in benchmark.missing_runs(runs, splits=("val",)))
    make_report(tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| c2vkd seed 0 | channel_weight: record has 0.0, today 3.0 |" in text
    assert "| c2vkd | 1 |" not in text


def test_paper_recipe_flags_are_the_papers():
    flags = benchmark.effective_flags("c2vkd", ["--recipe", "paper"])
    assert (flags["class_balance"], flags["exit_weight"], flags["channel_weight"], flags["text_head"]) == (
        False, 0.0, 0.0, False)
    assert (flags["pdd_alpha"], flags["pdd_beta"], flags["glob_weight"], flags["rel_weight"], flags["ling_weight"]) == (
        0.5, 0.5, 0.1, 0.1, 0.5)
    assert benchmark.effective_flags("c2vkd", ["--recipe", "paper", "--ce_weight", "0"])["ce_weight"] == 0.0


def test_protocol_line_says_how_the_c2vkd_runs_weigh_pixels(tmp_path):
    _run(tmp_path, "none", "none", 0, 0.30)
    _run(tmp_path, "c2vkd", "c2vkd", 0, 0.31)
    _run(tmp_path, "none", "none", 0, 0.30, protocol="short")
    _run(tmp_path, "c2vkd", "c2vkd", 0, 0.31, protocol="short")
    record = benchmark.record_path(tmp_path, "short", "c2vkd", 0)
    run = json.loads(record.read_text())
    run["config"]["distillation"].update(class_balance=False)  # another configuration: stale, not described
    record.write_text(json.dumps(run))
    make_report(tmp_path)
    long, short = (tmp_path / "RESULTS.md").read_text().split("## Short protocol")
    assert "`c2vkd` runs: class-balanced means, power 0.5, stage exits at 0.5, channel-wise term at 3" in long
    assert "plain pixel means" not in short and "| c2vkd seed 0 | class_balance: record has False" in short


def test_per_class_gains_are_paired_by_seed_and_skip_absent_classes(tmp_path):
    def with_classes(name, method, seed, car, road):
        _run(tmp_path, name, method, seed, 0.3)
        path = benchmark.record_path(tmp_path, "long", name, seed)
        record = json.loads(path.read_text())
        record["runs"]["val"]["per_category_iou"] = {"car": car, "road": road}
        benchmark.write_json(path, record)

    with_classes("none-head", "none", 0, 0.10, 0.90)
    with_classes("none-head", "none", 1, 0.20, None)  # road absent from this run's labels
    with_classes("c2vkd", "c2vkd", 0, 0.15, 0.80)
    with_classes("c2vkd", "c2vkd", 1, 0.40, 0.85)
    with_classes("dist-head", "dist", 2, 0.90, 0.90)  # no none-head seed 2: nothing to pair, no column
    lines = benchmark.per_class_section(benchmark.load_runs(tmp_path, "long"), "none-head", ["c2vkd", "dist-head"])
    assert "| class | none-head IoU | c2vkd minus none-head |" in lines
    assert "| car | 15.00 ± 7.07 | +12.50 |" in lines  # (5 + 20) / 2
    assert "| road | 90.00 | -10.00 |" in lines  # seed 1 has no road IoU for none-head: seed 0 only
    assert not any("dist-head minus" in line for line in lines)


def test_long_runs_replay_a_cache_keyed_by_the_maps_they_read(tmp_path):
    args = argparse.Namespace(protocol="long", work_dir=str(tmp_path),
                              spec=benchmark.load_spec(str(spec_file(tmp_path))))
    cached = benchmark.teacher_cache_dir(args, "val", "c2vkd", ["--channel_weight", "3"])
    assert cached and cached == benchmark.teacher_cache_dir(args, "val", "c2vkd", [])  # a loss flag: the same cache
    assert cached != benchmark.teacher_cache_dir(args, "val", "c2vkd", ["--teacher_input_scale", "1.5"])
    assert benchmark.teacher_cache_dir(args, "val", "none", []) is None
    # the teacher's stage maps are stored only while stage guidance reads them (the default's exits read the
    # student's stages alone), with the pairs in force
    assert cached == benchmark.teacher_cache_dir(args, "val", "c2vkd", ["--exit_weight", "0"])
    assert cached == benchmark.teacher_cache_dir(args, "val", "c2vkd", ["--stage_pairs", "stage4:stage4"])
    staged = benchmark.teacher_cache_dir(args, "val", "c2vkd", ["--stage_weight", "0.5"])
    assert staged != cached
    assert staged != benchmark.teacher_cache_dir(args, "val", "c2vkd", ["--stage_weight=0.5", "--stage_pairs", "x:y"])


def test_a_run_trains_through_the_distill_command_and_lands_in_its_record(tmp_path):
    """One short-protocol table run on a CamVid-shaped folder (tiny student, 1 step through the extra flags):
    ``c2vkd-distill`` runs in a subprocess for each split, the record holds both splits' mIoU and per-class IoU,
    and a second call finds the run done and trains nothing."""
    import shlex

    import numpy as np
    import PIL.Image
    from tiny import TINY_SEGFORMER_JSON

    data = tmp_path / "camvid"
    names = {"train": ["0001TP_000.png", "0001TP_001.png", "0006R0_000.png", "0006R0_001.png"],
             "val": ["0016E5_000.png", "0016E5_001.png"]}
    for split, files in names.items():
        for sub in (split, f"{split}annot"):
            (data / sub).mkdir(parents=True)
        for i, name in enumerate(files):
            PIL.Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / split / name)
            label = np.zeros((32, 32), np.uint8)
            label[16:] = 1
            PIL.Image.fromarray(label).save(data / f"{split}annot" / name)
    (data / "classes.json").write_text(json.dumps(["road", "car"]))
    tiny = (f"--per_device_train_batch_size 2 "
            f"--per_device_eval_batch_size 2 --student_config_overrides {shlex.quote(TINY_SEGFORMER_JSON)}")
    spec = spec_file(tmp_path / "out", data={**SPEC["data"], "resize_height": 32, "resize_width": 32,
                                             "train_images": str(data / "train"),
                                             "train_labels": str(data / "trainannot"),
                                             "validation_images": str(data / "val"),
                                             "validation_labels": str(data / "valannot"),
                                             "labels_file": str(data / "classes.json")},
                     protocols={"short": {"max_steps": 1, "eval_steps": 1}}, cached_protocols=[],
                     training={"warmup_steps": 0})
    argv = ["--dataset", str(spec), "--root", str(tmp_path / "out"), "--protocol", "short", "--out_dir", str(tmp_path / "out"),
            "--work_dir", str(tmp_path / "work"), "--main_seeds", "1", "--readme", str(tmp_path / "none.md"),
            "--threads", "1",
            "--runs", f"none:none:{tiny}"]
    cli_main(argv)
    record = json.loads(benchmark.record_path(tmp_path / "out", "short", "none", 0).read_text())
    assert record["protocol"] == "short" and record["method"] == "none" and record["ablation"] is None
    assert 0 <= record["val_mean_iou"] <= 1 and 0 <= record["selection_mean_iou"] <= 1
    assert set(record["runs"]["val"]["per_category_iou"]) == {"road", "car"}
    assert "c2vkd_hf.cli.distill" in record["runs"]["selection"]["command"]
    assert record["runs"]["val"]["torch_threads"] == 1  # --threads reached the training subprocess
    assert record["teacher_sha256"] is None  # no teacher read
    held_out = json.loads((tmp_path / "work" / "short" / "none-seed0-selection" / "benchmark_config.json").read_text())
    assert held_out["selection_holdout"] == "0006R0_*"
    mtime = benchmark.record_path(tmp_path / "out", "short", "none", 0).stat().st_mtime
    cli_main(argv)  # both splits done: nothing runs, the record is not rewritten
    assert benchmark.record_path(tmp_path / "out", "short", "none", 0).stat().st_mtime == mtime
    assert "| none | 1 |" in (tmp_path / "out" / "RESULTS.md").read_text()


def test_thread_env_limits_both_thread_pools_and_keeps_the_rest_of_the_environment():
    from c2vkd_hf.benchmark.runner import thread_env

    assert thread_env(None) is None and thread_env(0) is None  # not given: the subprocess inherits ours
    env = thread_env(3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("flags, message", [
    (["--runs", "c2vkd-x"], "must be name:method[:extra flags]"),
    (["--splits", "test"], "--splits must name some of val, selection"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_run_specs_and_splits_are_usage_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        cli_main(["--dataset", str(spec_file(tmp_path)), "--root", str(tmp_path), "--out_dir", str(tmp_path), "--work_dir",
                  str(tmp_path / "w"), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing ran


def test_the_cross_dataset_summary_pairs_ours_with_the_best_peer_and_with_the_papers_recipe(tmp_path):
    """One summary row from hand-made records: seed means, the gain ratio over the best peer, C2VKD minus that peer
    and C2VKD (ours) minus C2VKD (paper), each paired by seed (ours - paper: s0 +2, s1 +4 = +3.00 ± 1.41)."""
    for seed in range(2):
        _run(tmp_path, "none", "none", seed, (0.30, 0.32)[seed])
        _run(tmp_path, "dist", "dist", seed, (0.31, 0.33)[seed])
        _run(tmp_path, "c2vkd", "c2vkd", seed, (0.33, 0.34)[seed])
        _run(tmp_path, "c2vkd-paper", "c2vkd", seed, (0.31, 0.30)[seed])
    spec = benchmark.load_spec(str(spec_file(tmp_path)))
    lines = benchmark.summary_section([(spec, benchmark.mark_stale(benchmark.load_runs(tmp_path), spec, "long"))])
    header = next(line for line in lines if line.startswith("| dataset"))
    assert "| C2VKD (paper) | ours minus paper | ratio, defaults |" in header
    assert ("| Tiny | val | 60.00 | 31.00 (2) | dist: 32.00 (2) | 33.50 (2) | 30.50 (2) | +3.00 ± 1.41 (2/2) | "
            "2.50 (vs dist) | +1.50 ± 0.71 (2/2) | - | - |") in lines
    assert "| Tiny | selection | - | - | - | - | - | - | - | - | - | - |" in lines


def test_a_record_names_its_teacher_and_is_stale_once_the_teacher_changes(tmp_path, monkeypatch):
    """``run_one`` records the SHA-256 of the teacher's weights; the record is current while the spec's teacher is
    those weights and stale (listed with why) once they change. A teacher run whose record names no teacher is
    stale; a teacher-free run never is. (The training subprocess is replaced by one that writes its outputs.)"""
    import hashlib

    from c2vkd_hf.benchmark import runner

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights one")
    spec = benchmark.load_spec(str(spec_file(tmp_path / "out", teacher=str(teacher), cached_protocols=[])))

    def fake_training(cmd, **kwargs):
        work = Path(json.loads(Path(cmd[-1]).read_text())["output_dir"])
        (work / "config.json").write_text(json.dumps({"id2label": {"0": "road", "1": "car"}}))
        (work / "results.json").write_text(json.dumps({
            "val_mean_iou": 0.4, "config": _config("kd"), "per_category_iou": [0.5, 0.3], "steps": 10,
            "wall_time_s": 1.0, "peak_rss_mb": 1.0, "eval_history": [], "loss_history": [], "loss_weights": {},
            "text_head": False, "teacher_val_mean_iou": 0.6}))
        return argparse.Namespace(returncode=0)

    monkeypatch.setattr(runner.subprocess, "run", fake_training)
    args = argparse.Namespace(out_dir=str(tmp_path / "out"), protocol="long", work_dir=str(tmp_path / "work"),
                              spec=spec, threads=None, ablates=None, control=None)
    runner.run_one("kd", "kd", [], 0, "val", args)
    record = json.loads(benchmark.record_path(tmp_path / "out", "long", "kd", 0).read_text())
    assert record["teacher_sha256"] == hashlib.sha256(b"weights one").hexdigest()
    _run(tmp_path / "out", "none", "none", 0, 0.30)  # no teacher_sha256: a teacher-free run needs none
    _run(tmp_path / "out", "cwd", "cwd", 0, 0.35)  # a teacher run that does not name its teacher

    def stale():
        return {r["name"]: r["stale"] for r in benchmark.mark_stale(benchmark.load_runs(tmp_path / "out"), spec, "long")}

    assert stale()["kd"] == [] and stale()["none"] == []
    assert stale()["cwd"] == [f"teacher: record made with an unrecorded teacher, the spec's teacher is "
                              f"{record['teacher_sha256'][:12]}"]
    (teacher / "model.safetensors").write_bytes(b"weights two")  # the teacher retrained into its folder
    now = hashlib.sha256(b"weights two").hexdigest()[:12]
    assert stale()["kd"] == [f"teacher: record made with {record['teacher_sha256'][:12]}, the spec's teacher is {now}"]
    assert stale()["none"] == []


def test_without_its_folder_the_teacher_is_the_one_teacher_json_records(tmp_path):
    """A spec whose teacher folder is absent (a reset shared store) takes its teacher's identity from the
    ``teacher.json`` beside it, so records of another teacher stay stale; with neither there is nothing to check."""
    spec_path = spec_file(tmp_path, teacher=str(tmp_path / "gone"))
    assert benchmark.load_spec(str(spec_path)).teacher_sha256() is None
    (tmp_path / "teacher.json").write_text(json.dumps({"model_safetensors_sha256": "ab" * 32}))
    assert benchmark.load_spec(str(spec_path)).teacher_sha256() == "ab" * 32
