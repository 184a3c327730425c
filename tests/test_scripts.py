"""End to end: scripts/distill.py (offline default job, tiny), evaluate.py, the model card, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from tiny import TINY_SEGFORMER_JSON

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import distill  # noqa: E402
import evaluate as evaluate_script  # noqa: E402

TINY_DATA = ["--synthetic_train_size", "16", "--synthetic_validation_size", "6", "--synthetic_height", "32",
             "--synthetic_width", "32"]
TINY_RUN = TINY_DATA + ["--student_config_overrides", TINY_SEGFORMER_JSON, "--default_teacher_steps", "4",
                        "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
                        "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    results = distill.main(["--output_dir", str(out)] + TINY_RUN)
    return out, results


def test_default_job_saves_a_plain_student_with_card(default_run):
    out, results = default_run
    assert results["method"] == "c2vkd" and results["steps"] == 4
    assert (out / "teacher" / "teacher_results.json").is_file(), "the default teacher is trained and cached"
    assert (out / "baseline" / "results.json").is_file(), "a no-teacher baseline on the same schedule"
    assert results["baseline_val_mean_iou"] is not None and results["teacher_val_mean_iou"] is not None
    # the synthetic classes are in the built-in CLIP vocabulary: full C2VKD offline, and the source is recorded
    assert results["linguistic_term"] is True and results["text_embeddings_source"].startswith("built-in CLIP")
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert model.config.id2label[0] == "sky" and model.config.num_labels == 6
    processor = AutoImageProcessor.from_pretrained(out)
    image = PIL.Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8))
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[(40, 50)])[0]
    assert seg.shape == (40, 50)
    assert not any(p.name.startswith("distillation_modules") for p in out.iterdir())

    card = ModelCard.load(out / "README.md")
    result = card.data.eval_results[0]
    assert result.metric_type == "mean_iou" and result.task_type == "image-segmentation"
    assert result.metric_value == pytest.approx(round(results["val_mean_iou"] * 100, 2))
    assert "built-in CLIP ViT-B/16 vocabulary" in card.text and "| sky |" in card.text
    assert f'from_pretrained("{out}")' in card.text  # no --hub_model_id: the output folder, which exists
    assert str(out / "teacher") not in card.text and r"UperNet \+ tf\_efficientnet\_lite0" in card.text
    assert (out / "predictions.png").is_file() and (out / "training_curves.png").is_file()


def test_card_of_a_subset_evaluation(tmp_path, default_run):
    """--max_eval_samples: the card says "n of N images", the model-index stays empty, and the
    teacher's figure is measured on the same images."""
    out, _ = default_run
    run = tmp_path / "subset"
    results = distill.main(["--output_dir", str(run), "--teacher_name_or_path", str(out / "teacher"), "--method", "kd",
                            "--max_eval_samples", "2", "--eval_strategy", "no", "--save_strategy", "no",
                            "--train_baseline", "false", "--max_steps", "1", "--per_device_train_batch_size", "4",
                            "--student_config_overrides", TINY_SEGFORMER_JSON, "--disable_tqdm", "true"] + TINY_DATA)
    assert results["eval_images"] == 2 and results["eval_images_total"] == 6
    card = ModelCard.load(run / "README.md")
    assert "Results on synthetic (validation, 2 of 6 images)" in card.text and not card.data.eval_results
    assert results["teacher_val_mean_iou"] is not None and str(out / "teacher") not in card.text


def test_evaluate_reproduces_the_card(default_run):
    out, results = default_run
    metrics = evaluate_script.main(["--model_name_or_path", str(out)])
    assert metrics["mean_iou"] == pytest.approx(results["val_mean_iou"], abs=1e-6)


def test_rerun_reuses_teacher_and_resumes(default_run):
    out, results = default_run
    teacher_mtime = (out / "teacher" / "model.safetensors").stat().st_mtime
    again = distill.main(["--output_dir", str(out)] + TINY_RUN)
    assert (out / "teacher" / "model.safetensors").stat().st_mtime == teacher_mtime
    assert again["steps"] == 4


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("flags, message", [
    (["--method", "fitnet"], "--method 'fitnet' is unknown"),
    (["--ling_tau", "0"], "--ling_tau must be a finite number > 0"),
    (["--label_weight", "1.5"], "--label_weight must be in [0, 1]"),
    (["--train_images", "/nonexistent/x", "--train_labels", "/nonexistent/y"], "--validation_images"),
    (["--train_images", "/nonexistent/x", "--train_labels", "/nonexistent/y", "--validation_images", "/nonexistent/v",
      "--validation_labels", "/nonexistent/w"], "--labels_file is required"),
    (["--train_images", "/nonexistent/x", "--train_labels", "/nonexistent/y", "--validation_images", "/nonexistent/v",
      "--validation_labels", "/nonexistent/w", "--labels_file", "/nonexistent/classes.json"], "/nonexistent/"),
])
def test_bad_input_exits_with_one_message(tmp_path, flags, message):
    proc = _cli("--output_dir", str(tmp_path), *TINY_DATA, *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_teacher_and_half_precision_on_a_cpu_are_one_line_each(tmp_path):
    """Real data without a teacher stops on the missing flag without announcing "distilling None"; --bf16 on a CPU
    without --use_cpu is our own line (not transformers' generic one)."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(2):
            for sub, array in ((split, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                               (f"{split}annot", rng.integers(0, 2, (32, 32), dtype=np.uint8))):
                (data / sub).mkdir(parents=True, exist_ok=True)
                PIL.Image.fromarray(array).save(data / sub / f"{i}.png")
    (data / "classes.json").write_text('["sky", "road"]')
    proc = _cli("--output_dir", str(tmp_path / "out"), "--train_images", str(data / "train"), "--train_labels",
                str(data / "trainannot"), "--validation_images", str(data / "val"), "--validation_labels",
                str(data / "valannot"), "--labels_file", str(data / "classes.json"))
    assert proc.returncode == 2 and "--teacher_name_or_path is required for --method c2vkd" in proc.stderr
    assert "None" not in proc.stdout and "Traceback" not in proc.stderr
    if torch.cuda.is_available():
        return
    proc = _cli("--output_dir", str(tmp_path / "bf16"), "--bf16", "true")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --bf16 true needs a GPU, and this machine has none: pass --use_cpu true to train in bf16 on the CPU "
        "(--bf16 true only; slower than fp32 on most CPUs), or leave --bf16 out.")


def test_class_count_mismatch_with_text_embeddings(tmp_path, default_run):
    out, _ = default_run
    emb = tmp_path / "emb.pth"
    torch.save(torch.nn.functional.normalize(torch.randn(4, 8), dim=1), emb)
    proc = _cli("--output_dir", str(tmp_path / "o"), *TINY_DATA, "--teacher_name_or_path", str(out / "teacher"),
                "--text_embeddings", str(emb), "--max_steps", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "4 rows" in proc.stderr and "6 classes" in proc.stderr


def test_push_to_hub_offline_fails_clearly_after_saving(tmp_path, default_run, monkeypatch):
    from c2vkd_hf.jobs import UserInputError, push_student_to_hub

    out, _ = default_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="saved in"):
        push_student_to_hub(out, "someone/tiny-student", token="hf_secret_token_value")
    try:
        push_student_to_hub(out, "someone/tiny-student", token="hf_secret_token_value")
    except UserInputError as error:
        assert "hf_secret_token_value" not in str(error)


def test_seed_sets_the_initial_weights(tmp_path):
    from safetensors.torch import load_file

    def init_weights(seed: int, name: str) -> dict:
        out = tmp_path / name
        distill.main(["--output_dir", str(out), "--method", "none", "--seed", str(seed), "--learning_rate", "0",
                      "--lr_scheduler_type", "constant",
                      "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"] + TINY_DATA +
                     ["--student_config_overrides", TINY_SEGFORMER_JSON, "--train_baseline", "false",
                      "--disable_tqdm", "true"])
        return load_file(out / "model.safetensors")

    first, again, other = init_weights(0, "a"), init_weights(0, "b"), init_weights(1, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_paper_recipe_trains_the_papers_terms_and_a_flag_wins_over_it(tmp_path, default_run):
    """``--recipe paper``: PDD and VLFD (global, relation, linguistic) on stage4:stage4 with the released code's
    weights, no exits, no channel-wise term, no text head; a flag given beside it wins; an unknown recipe is one
    line naming the built-in ones."""
    out, _ = default_run
    results = distill.main(["--output_dir", str(tmp_path / "paper"), "--recipe", "paper", "--rel_weight", "0.2",
                            "--teacher_name_or_path", str(out / "teacher"), "--train_baseline", "false"] + TINY_RUN)
    weights = results["loss_weights"]
    assert set(weights) == {"ce", "pdd", "glob", "rel", "ling"} and not results["text_head"]
    assert (weights["glob"], weights["rel"], weights["ling"]) == (0.1, 0.2, 0.5)
    config = results["config"]["distillation"]
    assert (config["pdd_alpha"], config["pdd_beta"], config["class_balance"], config["feature_pairs"]) == (
        0.5, 0.5, False, "stage4:stage4")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "distill.py"), "--recipe", "nope",
                           "--output_dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "built-in recipe (paper, paper-scale)" in proc.stderr
