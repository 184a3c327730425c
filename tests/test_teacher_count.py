"""End to end on tiny data: the text head with a teacher-free student, C2VKD's stage guidance with its
decaying weight, and the sequence-disjoint selection split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation

from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import SYNTHETIC_CLASSES, DataValidationError, load_segmentation_data, source_paths
from c2vkd_hf.models import load_student
from c2vkd_hf.jobs import EXIT_USER_ERROR, run_script
from tiny import TINY_SEGFORMER, TINY_SEGFORMER_JSON

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import cache_teacher  # noqa: E402
import distill  # noqa: E402

TINY = ["--synthetic_train_size", "8", "--synthetic_validation_size", "2", "--synthetic_height", "32",
        "--synthetic_width", "32", "--student_config_overrides", TINY_SEGFORMER_JSON,
        "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--eval_strategy", "no",
        "--logging_steps", "1", "--train_baseline", "false", "--report_to", "none"]


def _save_tiny(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    load_student("segformer-b0", dict(enumerate(SYNTHETIC_CLASSES)), config_overrides=TINY_SEGFORMER).save_pretrained(folder)
    return str(folder)


def _c2vkd_loss_history(out: Path, steps: int, *flags: str) -> dict:
    """Trains a tiny C2VKD student into ``out`` (tiny teacher and student saved beside it) for ``steps`` steps
    with ``flags``; returns its logged losses by step."""
    distill.main(["--output_dir", str(out), *TINY, "--method", "c2vkd", "--max_steps", str(steps),
                  "--teacher_name_or_path", _save_tiny(out.parent / "teacher", 1),
                  "--student_name_or_path", _save_tiny(out.parent / "student", 2), *flags])
    return {e["step"]: e for e in json.loads((out / "results.json").read_text())["loss_history"]}


def test_text_head_with_no_teacher_gives_a_plain_student_that_classifies_like_the_head(tmp_path):
    torch.save(torch.randn(len(SYNTHETIC_CLASSES), 16), tmp_path / "emb.pth")
    out = tmp_path / "none-head"
    distill.main(["--output_dir", str(out), *TINY, "--method", "none", "--text_head", "true", "--max_steps", "2",
                  "--student_name_or_path", _save_tiny(tmp_path / "student", 2),
                  "--text_embeddings", str(tmp_path / "emb.pth")])
    results = json.loads((out / "results.json").read_text())
    assert results["text_head"] is True and results["linguistic_term"] is False and results["method"] == "none"
    head = load_file(out / "text_head.safetensors")
    folded = torch.nn.functional.normalize(head["text_embeddings"], dim=1) @ head["projector.weight"].flatten(1) / 0.03
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    torch.testing.assert_close(model.decode_head.classifier.weight.flatten(1), folded, atol=1e-4, rtol=1e-4)


def test_stage_guidance_decays_to_zero_by_the_scheduled_fraction(tmp_path):
    """Four stage pairs at weight 0.5, linear decay ending at half of training: the logged weighted stage term
    halves by a quarter of the run, and from half of it the term is no longer computed."""
    history = _c2vkd_loss_history(tmp_path / "stage", 8, "--stage_pairs",
                                  "stage1:stage1,stage2:stage2,stage3:stage3,stage4:stage4", "--stage_weight", "0.5",
                                  "--weight_schedules", "stage:linear:0.5")
    assert history[1]["loss_weighted/stage"] == pytest.approx(0.5 * history[1]["loss/stage"], rel=1e-4)
    assert history[3]["loss_weighted/stage"] == pytest.approx(0.25 * history[3]["loss/stage"], rel=1e-4)
    assert all("loss/stage" not in history[step] for step in range(5, 9))


def test_stage_exits_train_with_the_student_and_are_left_out_of_it(tmp_path):
    """--exit_weight with --stage_pairs and no stage term: the exit term is logged at its scheduled weight, gone
    from half of training, and the saved student is a plain SegFormer with the same weights as one trained
    without exits would have (no exit parameter in it)."""
    out = tmp_path / "exits"
    history = _c2vkd_loss_history(out, 4, "--stage_pairs", "stage1:stage1,stage2:stage2", "--exit_weight", "0.5",
                                  "--weight_schedules", "exit:linear:0.5")
    assert history[1]["loss_weighted/exit"] == pytest.approx(0.5 * history[1]["loss/exit"], rel=1e-4)
    assert "loss/stage" not in history[1]
    assert all("loss/exit" not in history[step] for step in (3, 4))
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    plain = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "student")
    assert set(model.state_dict()) == set(plain.state_dict())


def test_auto_stage_pairs_pair_the_deepest_stages():
    from c2vkd_hf.models import pair_stages

    four = [f"stage{i}" for i in range(1, 5)]
    assert pair_stages(four, four) == [(s, s) for s in four]
    assert pair_stages(four, [f"stage{i}" for i in range(1, 6)]) == [("stage1", "stage2"), ("stage2", "stage3"),
                                                                     ("stage3", "stage4"), ("stage4", "stage5")]
    assert pair_stages(["stage1", "stage2"], four) == [("stage1", "stage3"), ("stage2", "stage4")]
    assert pair_stages([], four) == []


@pytest.mark.parametrize("stage_weight, stored", [
    ("0", ["decoder"]),  # the exits read only the student's stages: the teacher's are not stored
    ("0.5", ["decoder", "stage1", "stage2", "stage3", "stage4"])])
def test_auto_stage_pairs_and_the_cache_script_store_what_distill_reads(tmp_path, stage_weight, stored):
    """``--stage_pairs auto --exit_weight 0.5``: ``scripts/cache_teacher.py`` given distill's flags stores the
    teacher's decoder map, plus its four stages only with stage guidance (auto pairs the tiny SegFormers' four
    stages each), and distill with the same flags replays that cache (it refused it when the script and distill
    disagreed on the maps) and trains its exits."""
    flags = [*TINY, "--method", "c2vkd", "--teacher_name_or_path", _save_tiny(tmp_path / "teacher", 1),
             "--student_name_or_path", _save_tiny(tmp_path / "student", 2), "--stage_pairs", "auto",
             "--exit_weight", "0.5", "--stage_weight", stage_weight, "--teacher_cache", str(tmp_path / "cache")]
    summary = cache_teacher.main(flags)
    assert sorted(summary["features"]) == stored
    meta = (tmp_path / "cache" / "cache_meta.json").stat().st_mtime
    distill.main(["--output_dir", str(tmp_path / "out"), "--max_steps", "2", *flags])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["loss_history"][0]["loss/exit"] > 0
    assert (results["loss_history"][0].get("loss/stage", 0) > 0) is (stage_weight != "0")
    assert (tmp_path / "cache" / "cache_meta.json").stat().st_mtime == meta  # replayed, not rebuilt


def test_c2vkd_default_has_stage_exits_on_auto_pairs_and_other_methods_ignore_them(tmp_path):
    """At its defaults C2VKD trains exits on the auto-paired stages at weight 0.5, decaying to 0 at half of
    training; ``--method kd`` at the same defaults trains without them (no error, no exit term)."""
    history = _c2vkd_loss_history(tmp_path / "c2vkd", 4)
    assert history[1]["loss_weighted/exit"] == pytest.approx(0.5 * history[1]["loss/exit"], rel=1e-4)
    assert all("loss/exit" not in history[step] for step in (3, 4)) and "loss/stage" not in history[1]
    distill.main(["--output_dir", str(tmp_path / "kd"), *TINY, "--method", "kd", "--max_steps", "1",
                  "--teacher_name_or_path", str(tmp_path / "teacher"),
                  "--student_name_or_path", str(tmp_path / "student")])
    kd = json.loads((tmp_path / "kd" / "results.json").read_text())["loss_history"][0]
    assert "loss/kd" in kd and not any("exit" in key for key in kd)


def test_channel_term_is_on_by_default_and_decays(tmp_path):
    """C2VKD's channel-wise term is on by default (weight 3, decaying linearly to 0 at half of training): logged
    unweighted and at three times its value on the first step, gone from the second half; the no-teacher baseline
    of the same job trains without it (a teacher-free run refuses the flag)."""
    out = tmp_path / "channel"
    distill.main(["--output_dir", str(out), *TINY, "--method", "c2vkd", "--max_steps", "4",
                  "--teacher_name_or_path", _save_tiny(tmp_path / "teacher", 1), "--train_baseline", "true"])
    results = json.loads((out / "results.json").read_text())
    first, last = results["loss_history"][0], results["loss_history"][-1]
    assert first["loss/channel"] > 0
    assert first["loss_weighted/channel"] == pytest.approx(3 * first["loss/channel"], rel=1e-4)
    assert "loss/channel" not in last
    assert results["baseline_val_mean_iou"] is not None


@pytest.mark.parametrize("flags, message", [
    (["--stage_pairs", "", "--stage_weight", "0.5"], "--stage_weight needs --stage_pairs"),
    (["--method", "dist", "--stage_pairs", "stage1:stage1", "--stage_weight", "1"], "C2VKD's stage guidance"),
    (["--stage_pairs", "", "--exit_weight", "1"], "--exit_weight needs --stage_pairs"),
    (["--method", "kd", "--exit_weight", "0"], "--exit_weight: C2VKD's stage guidance"),
    (["--method", "dist", "--stage_pairs", "stage1:stage1", "--exit_weight", "1"], "C2VKD's stage guidance"),
    (["--stage_pairs", "stage1:stage1", "--exit_weight", "-1"], "--exit_weight must be a finite number >= 0"),
    (["--weight_schedules", "stage:linear:2"], "end fraction must be in (0, 1]"),
    (["--stage_pairs", "stage9:stage1", "--stage_weight", "1"], "feature pair stage9:stage1"),
    (["--method", "dist", "--channel_weight", "1"], "--channel_weight adds a channel-wise term to C2VKD"),
    (["--method", "kd", "--channel_weight", "0"], "--channel_weight adds a channel-wise term to C2VKD"),
    (["--channel_weight", "-1"], "--channel_weight must be a finite number >= 0"),
    (["--channel_weight", "1", "--channel_tau", "0"], "--channel_tau must be a finite number > 0"),
    (["--channel_weight", "0", "--channel_present_only", "true"], "--channel_present_only was removed"),
    (["--cutmix-prob=0.5"], "--cutmix_prob was removed"),
])
def test_stage_guidance_flags_are_checked(tmp_path, capsys, flags, message):
    argv = ["--output_dir", str(tmp_path / "x"), *TINY, "--method", "c2vkd", "--max_steps", "1",
            "--teacher_name_or_path", _save_tiny(tmp_path / "teacher", 1), *flags]
    assert run_script(distill.main, argv) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err


def _folder(root: Path, names: list[str], size: int = 8) -> None:
    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        PIL.Image.fromarray(np.full((size, size, 3), i * 20, np.uint8)).save(root / "train" / name)
        label = np.zeros((size, size), np.uint8)
        label[size // 2:] = 1
        PIL.Image.fromarray(label).save(root / "trainannot" / name)


def test_text_head_without_embeddings_is_refused(tmp_path, capsys):
    """Class names the built-in vocabulary does not know, no --text_embeddings: --text_head is a user error."""
    _folder(tmp_path, [f"a{i}.png" for i in range(4)], size=32)
    (tmp_path / "classes.json").write_text(json.dumps(["zorblax", "quuxite"]))
    folders = ["--train_images", str(tmp_path / "train"), "--train_labels", str(tmp_path / "trainannot"),
               "--validation_images", str(tmp_path / "train"), "--validation_labels", str(tmp_path / "trainannot"),
               "--labels_file", str(tmp_path / "classes.json")]
    argv = ["--output_dir", str(tmp_path / "x"), *folders, *TINY[8:], "--method", "none", "--text_head", "true",
            "--max_steps", "1"]
    assert run_script(distill.main, argv) == EXIT_USER_ERROR
    assert "--text_head needs the class names' text embeddings" in capsys.readouterr().err


def test_selection_split_holds_out_one_sequence(tmp_path):
    names = [f"0001TP_{i:03d}.png" for i in range(3)] + [f"0006R0_{i:03d}.png" for i in range(2)]
    _folder(tmp_path, names)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    args = DataArguments(train_images=str(tmp_path / "train"), train_labels=str(tmp_path / "trainannot"),
                         validation_images=str(tmp_path / "train"), validation_labels=str(tmp_path / "trainannot"),
                         labels_file=str(tmp_path / "classes.json"), selection_holdout="0006R0_*")
    data = load_segmentation_data(args)
    train = sorted(Path(source_paths(data.train, i)[0]).name for i in range(len(data.train)))
    held = sorted(Path(source_paths(data.validation, i)[0]).name for i in range(len(data.validation)))
    assert train == names[:3] and held == names[3:]
    for pattern in ("nothing_*", "*.png"):
        with pytest.raises(DataValidationError, match="must hold out some, not all"):
            load_segmentation_data(DataArguments(**{**vars(args), "selection_holdout": pattern}))
    with pytest.raises(DataValidationError, match="needs local image/mask folders"):
        load_segmentation_data(DataArguments(selection_holdout="x_*"))


def test_the_loss_module_and_run_config_agree_on_every_constant(tmp_path):
    """One default per constant: the C2VKD loss a run trains with holds exactly the values its run_config.json
    records, for flags at their defaults and for flags given (each C2VKDConfig field is a flag), and every term of
    non-zero weight is weighted as recorded."""
    from dataclasses import fields

    from c2vkd_hf.jobs import setup_distillation
    from c2vkd_hf.losses import C2VKDConfig

    given = ["--pdd_weight", "0.7", "--glob_weight", "0.3", "--channel_weight", "2", "--class_balance_power", "0.25",
             "--ling_tau", "0.05"]
    for name, flags in (("defaults", []), ("given", given)):
        out = tmp_path / name / "run"
        _c2vkd_loss_history(out, 1, *flags)
        recorded = json.loads((out / "run_config.json").read_text())["distillation"]
        argv = ["--output_dir", str(tmp_path / name / "again"), *TINY, "--method", "c2vkd", "--max_steps", "1",
                "--teacher_name_or_path", str(out.parent / "teacher"),
                "--student_name_or_path", str(out.parent / "student"), *flags]
        from c2vkd_hf.cli.distill import parse_args

        dist_args, data_args, training_args, _ = parse_args(argv)
        loss = setup_distillation(dist_args, data_args, training_args).loss_module
        for field in fields(C2VKDConfig):
            assert getattr(loss.config, field.name) == recorded[field.name], field.name
        for term, weight in loss.weights.items():
            assert weight == recorded[f"{term}_weight"], term
        assert set(loss.weights) >= {"ce", "pdd", "glob", "rel", "ling", "channel", "exit"}
    assert recorded["pdd_weight"] == 0.7 and loss.config.class_balance_power == 0.25


def test_every_c2vkd_constant_is_a_flag_with_its_one_default():
    """C2VKDConfig has no defaults of its own: each field is a DistillationArguments flag, whose default it takes."""
    from dataclasses import MISSING, fields

    from c2vkd_hf.config import DistillationArguments, distillation_defaults
    from c2vkd_hf.losses import C2VKDConfig

    defaults = distillation_defaults()
    for field in fields(C2VKDConfig):
        assert field.default is MISSING and field.default_factory is MISSING, field.name
        assert field.name in defaults, field.name
    built = C2VKDConfig.from_args(DistillationArguments())
    assert all(getattr(built, f.name) == defaults[f.name] for f in fields(C2VKDConfig))
