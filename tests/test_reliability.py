"""Reliability and security: kill and resume, kill-safe checkpoints, bad input rejected before training
with one message and exit code 2, a NaN loss stopping with exit code 3, no Hub token on disk, class
names escaped in the model card. docs/RELIABILITY.md lists every case with its test here.

Scripts are run in a subprocess where the real process matters (SIGKILL, the ``__main__`` exit code, no
traceback); otherwise through :func:`c2vkd_hf.jobs.run_script`, which is exactly what their
``__main__`` runs, to keep this file fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from c2vkd_hf.data import SYNTHETIC_CLASSES
from c2vkd_hf.models import load_student
from c2vkd_hf.jobs import EXIT_NON_FINITE_LOSS, EXIT_USER_ERROR, resume_checkpoint, run_script
from c2vkd_hf.losses import get_loss
from c2vkd_hf.trainer import (
    TRAINER_STATE_NAME,
    DistillationModel,
    DistillationTrainer,
    checkpoint_problems,
    last_complete_checkpoint,
)
from tiny import ID2LABEL, TINY_SEGFORMER, TINY_SEGFORMER_JSON, make_trainer, tensor_dataset, tiny_student

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import distill  # noqa: E402

SECRET = "hf_reliabilityTestSecretToken123"
TINY_DATA = ["--synthetic_train_size", "16", "--synthetic_validation_size", "4", "--synthetic_height", "32",
             "--synthetic_width", "32"]
QUICK = ["--student_config_overrides", TINY_SEGFORMER_JSON, "--per_device_train_batch_size", "4",
         "--disable_tqdm", "true", "--eval_strategy", "no", "--logging_steps", "1"]


def _start(name: str, *args: str, **kwargs) -> subprocess.Popen:
    """Starts ``scripts/<name>`` (one thread: a benchmark may be sharing the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env, **kwargs)


def _wait_for(log_path: Path, text: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    """Waits until ``text`` is in the log a started script writes, or it ended, or ``seconds`` passed."""
    deadline = time.time() + seconds
    while text not in log_path.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def _save_tiny(folder: Path, id2label: dict, seed: int = 1) -> str:
    torch.manual_seed(seed)
    load_student("segformer-b0", id2label, config_overrides=TINY_SEGFORMER).save_pretrained(folder)
    return str(folder)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def _folder_data(root: Path) -> list[str]:
    """A valid local-folder dataset: 3 train and 2 validation 32x32 images, classes sky/road/car."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            _png(root / split / f"img{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            _png(root / f"{split}annot" / f"img{i}.png", rng.integers(0, 3, (32, 32), dtype=np.uint8))
    (root / "classes.json").write_text(json.dumps(list(ID2LABEL.values())))
    return ["--train_images", str(root / "train"), "--train_labels", str(root / "trainannot"),
            "--validation_images", str(root / "val"), "--validation_labels", str(root / "valannot"),
            "--labels_file", str(root / "classes.json")]


# ------------------------------------------------------------------------------------------------ 1. kill
def test_killed_run_restarts_to_the_same_student_and_no_token_is_written(tmp_path, monkeypatch, caplog):
    """SIGKILL mid-training, then the same command again == one uninterrupted run (same seed).

    The uninterrupted run is in-process, so the student starts from a saved folder (a named size is
    initialised from torch's global RNG as it is when the run starts, which differs between a fresh
    process and this one). Random augmentation (rescale, crop, flip) is on: it is seeded per
    (seed, epoch, example), so the batches prefetched before the kill do not matter; dropout and
    drop-path stay on and are restored from the checkpoint's RNG state."""
    monkeypatch.setenv("HF_TOKEN", "")  # restored after the test: the scripts move --hub_token into HF_TOKEN
    classes = dict(enumerate(SYNTHETIC_CLASSES))
    teacher, student = _save_tiny(tmp_path / "teacher", classes, seed=1), _save_tiny(tmp_path / "student", classes, 2)
    run = TINY_DATA + QUICK + ["--teacher_name_or_path", teacher, "--student_name_or_path", student, "--method", "kd",
                               "--max_steps", "12", "--save_steps", "3", "--train_baseline", "false",
                               "--min_scale", "0.5", "--max_scale", "2", "--hflip", "true", "--hub_token", SECRET]
    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = _start("distill.py", "--output_dir", str(killed), *run, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while checkpoint_problems(str(killed / "checkpoint-3")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "results.json").exists(), "the run must be killed before it ends"
    last = last_complete_checkpoint(str(killed))
    assert last is not None

    reference = tmp_path / "reference"
    full = distill.main(["--output_dir", str(reference), *run])
    resumed = distill.main(["--output_dir", str(killed), *run])
    assert f"Resuming from {last}" in caplog.text
    assert full["steps"] == resumed["steps"] == 12
    expected, actual = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    assert resumed["val_mean_iou"] == pytest.approx(full["val_mean_iou"], abs=1e-6)

    # the Hub token is nowhere on disk: training_args.bin (checkpoints and final), results.json, card, configs
    for path in [*reference.rglob("*"), *killed.rglob("*"), tmp_path / "killed.log"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert os.environ["HF_TOKEN"] == SECRET, "the token still reaches huggingface_hub"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_a_checkpoint_exits_143_and_resumes_to_the_same_student(tmp_path, signum):
    """A scheduler's SIGTERM (or SLURM's SIGUSR1) mid-training: the step in progress finishes, a verified checkpoint
    of it is saved, one line says so and the process exits 143; the same command resumes and reaches the student of
    an uninterrupted run. (Before: exit 143 from the default handler, nothing saved since the last --save_steps.)"""
    from c2vkd_hf.jobs import EXIT_PREEMPTED

    classes = dict(enumerate(SYNTHETIC_CLASSES))
    teacher, student = _save_tiny(tmp_path / "teacher", classes, seed=1), _save_tiny(tmp_path / "student", classes, 2)
    run = TINY_DATA + QUICK + ["--teacher_name_or_path", teacher, "--student_name_or_path", student, "--method", "kd",
                               "--max_steps", "40", "--save_steps", "1000", "--train_baseline", "false"]
    out = tmp_path / "preempted"
    log_path = tmp_path / "preempted.log"
    with log_path.open("w") as log:
        proc = _start("distill.py", "--output_dir", str(out), *run, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(log_path, "step 3/", proc, 300)
        proc.send_signal(signum)
        proc.wait(timeout=120)
    text = log_path.read_text()
    assert proc.returncode == EXIT_PREEMPTED, text[-3000:]
    assert f"stopped: {signal.Signals(signum).name} received: saved" in text and "Traceback" not in text
    last = last_complete_checkpoint(str(out))
    assert last is not None and not (out / "results.json").exists(), "the run must stop before it ends"
    assert 3 <= int(Path(last).name.split("-")[1]) < 40
    if signum != signal.SIGTERM:
        return
    resumed = distill.main(["--output_dir", str(out), *run])
    full = distill.main(["--output_dir", str(tmp_path / "reference"), *run])
    assert resumed["steps"] == full["steps"] == 40
    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder with every file resume reads (tiny, structurally valid) and no manifest."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, folder / name)
    (folder / TRAINER_STATE_NAME).write_text(json.dumps({"global_step": step}))
    return folder


def test_half_written_checkpoints_are_skipped_or_rejected(tmp_path, capsys):
    out = tmp_path / "out"
    good = _fake_checkpoint(out / "checkpoint-2", 2)
    truncated = _fake_checkpoint(out / "checkpoint-4", 4)
    (truncated / TRAINER_STATE_NAME).write_text('{"global_step": 4, "log_hi')
    no_optimizer = _fake_checkpoint(out / "checkpoint-6", 6)
    (no_optimizer / "optimizer.pt").unlink()
    unfinished = _fake_checkpoint(out / "checkpoint-8", 8)
    (unfinished / TRAINER_STATE_NAME).unlink()
    assert last_complete_checkpoint(str(out)) == str(good)
    assert checkpoint_problems(str(no_optimizer)) == ["no optimizer.pt"]
    assert checkpoint_problems(str(no_optimizer), require_optimizer=False) == []
    newer = _fake_checkpoint(out / "checkpoint-10", 10)
    assert resume_checkpoint(TrainingArguments(output_dir=str(out))) == str(newer)
    assert resume_checkpoint(TrainingArguments(output_dir=str(out), resume_from_checkpoint=str(good))) == str(good)

    code = run_script(distill.main, ["--output_dir", str(tmp_path / "o"), "--method", "none", "--max_steps", "1",
                                     "--resume_from_checkpoint", str(truncated), *TINY_DATA, *QUICK])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"--resume_from_checkpoint {truncated} is not a complete checkpoint" in err
    assert "trainer_state.json is unreadable or truncated" in err


def test_a_save_interrupted_while_rewriting_a_checkpoint_leaves_it_incomplete(tmp_path, monkeypatch):
    """A kill during a save, simulated by an exception after the weights are written: the folder being
    rewritten loses its old marker first, so resume never takes the half-rewritten checkpoint. Also:
    training_args.bin never holds the Hub token."""
    def trainer():
        model = DistillationModel(tiny_student(), get_loss("none", ignore_index=255))
        return make_trainer(str(tmp_path), model, None, tensor_dataset(8), per_device_train_batch_size=4,
                            max_steps=4, save_strategy="steps", save_steps=2, hub_token=SECRET)

    trainer().train()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert SECRET.encode() not in (tmp_path / "checkpoint-4" / "training_args.bin").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(DistillationTrainer, "_save_optimizer_and_scheduler", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "no trainer_state.json" in checkpoint_problems(str(tmp_path / "checkpoint-4"))[0]
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


# ------------------------------------------------------------------------------------------ 2. bad input
def _break(case: str, root: Path) -> None:
    if case == "label":
        _png(root / "trainannot" / "img1.png", np.full((32, 32), 9, dtype=np.uint8))
    elif case == "size":
        _png(root / "valannot" / "img1.png", np.zeros((30, 32), dtype=np.uint8))
    elif case == "truncated":
        data = (root / "train" / "img0.png").read_bytes()
        (root / "train" / "img0.png").write_bytes(data[: len(data) // 2])
    elif case == "unpaired":
        _png(root / "train" / "extra.png", np.zeros((32, 32, 3), dtype=np.uint8))
    elif case == "empty":
        for path in (root / "val").iterdir():
            path.unlink()
    elif case == "no_labels_file":
        (root / "classes.json").unlink()


@pytest.mark.parametrize("case, message", [
    ("label", ["trainannot/img1.png", "label values [9] are outside the classes", "K=3"]),
    ("size", ["val/img1.png is 32x32 (WxH) but its mask", "valannot/img1.png is 32x30"]),
    ("truncated", ["train/img0.png: image cannot be read"]),
    ("unpaired", ["unpaired train files", "have no mask", "extra.png"]),
    ("empty", ["validation_images folder", "val is empty"]),
    ("no_labels_file", ["labels file", "classes.json does not exist"]),
], ids=["label_out_of_range", "size_mismatch", "truncated_image", "unpaired", "empty_split", "missing_labels_file"])
def test_bad_data_is_rejected_before_training(tmp_path, capsys, case, message):
    flags = _folder_data(tmp_path / "data")
    _break(case, tmp_path / "data")
    code = run_script(distill.main, [*flags, "--output_dir", str(tmp_path / "out"), "--method", "none", *QUICK])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    for part in message:
        assert part in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from transformers import SegformerConfig, SegformerForImageClassification

    root = tmp_path_factory.mktemp("models")
    classifier = root / "classifier"
    SegformerForImageClassification(SegformerConfig(**TINY_SEGFORMER, num_labels=3)).save_pretrained(classifier)
    truncated = Path(_save_tiny(root / "truncated", ID2LABEL))
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "pickle.pth").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that is not just tensors
    torch.save(torch.nn.functional.normalize(torch.randn(4, 8), dim=1), root / "emb4.pth")
    return {"two_classes": _save_tiny(root / "two", {0: "sky", 1: "road"}), "three_classes": _save_tiny(
        root / "three", ID2LABEL), "classifier": str(classifier), "truncated": str(truncated),
        "pickle": str(root / "pickle.pth"), "emb4": str(root / "emb4.pth"), "root": str(root)}


@pytest.mark.parametrize("flags, message", [
    (["--method", "kd", "--teacher_name_or_path", "{two_classes}"], ["predicts 2 classes but the dataset has 3"]),
    (["--method", "kd", "--teacher_name_or_path", "{classifier}"],
     ["is not a semantic-segmentation model", "SegformerForImageClassification"]),
    (["--method", "kd", "--teacher_name_or_path", "{truncated}"], ["{truncated}", "corrupt or truncated"]),
    (["--method", "kd", "--teacher_name_or_path", "{root}/nothere"], ["{root}/nothere does not exist"]),
    (["--method", "c2vkd", "--teacher_name_or_path", "{three_classes}", "--text_embeddings", "{emb4}"],
     ["--text_embeddings {emb4}", "4 rows but the dataset has 3 classes"]),
    (["--method", "c2vkd", "--teacher_name_or_path", "{three_classes}", "--text_embeddings", "{pickle}"],
     ["--text_embeddings {pickle}", "never loaded"]),
    (["--method", "c2vkd", "--teacher_name_or_path", "{three_classes}", "--text_embeddings", "{root}/no.pth"],
     ["--text_embeddings {root}/no.pth does not exist"]),
    (["--method", "none", "--student_name_or_path", "{root}/nothere"], ["--student_name_or_path {root}/nothere"]),
    (["--method", "none", "--student_config_overrides", "hidden_sizes=8"], ["--student_config_overrides is not valid JSON"]),
    (["--method", "c2vkd", "--feature_pairs", "stage4"], ["--feature_pairs entry 'stage4' must look like"]),
    (["--method", "kd", "--pdd_weight", "-1"], ["--pdd_weight must be a finite number >= 0, got -1.0"]),
    (["--method", "kd", "--kd_temperature", "nan"], ["--kd_temperature must be a finite number > 0, got nan"]),
    (["--method", "c2vkd", "--rel_grid", "0"], ["--rel_grid must be an integer >= 1, got 0"]),
    (["--method", "fitnet"], ["--method 'fitnet' is unknown"]),
], ids=["teacher_class_count", "teacher_not_segmentation", "teacher_truncated_weights", "teacher_missing",
        "text_embedding_rows", "text_embedding_pickle", "text_embedding_missing", "student_missing",
        "student_overrides_json", "feature_pairs", "negative_weight", "nan_temperature", "rel_grid", "unknown_method"])
def test_bad_models_files_and_flags_are_rejected_before_training(tmp_path, capsys, models, flags, message):
    data = _folder_data(tmp_path / "data")
    flags = [flag.format(**models) for flag in flags]
    code = run_script(distill.main, [*data, "--output_dir", str(tmp_path / "out"), *QUICK, *flags])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    for part in message:
        assert part.format(**models) in err, err
    assert not any((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("name, content, message", [
    ("config.yaml", "method: [c2vkd\n", "Config file {path}: while parsing"),
    ("config.json", '{"method": "kd", "not_a_flag": 1}', "Config file {path}: Some keys are not used"),
    ("missing.yaml", None, "Config file {path} does not exist"),
], ids=["yaml_syntax", "unknown_key", "missing"])
def test_bad_config_file_is_rejected(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert run_script(distill.main, [str(path)]) == EXIT_USER_ERROR
    assert message.format(path=path) in capsys.readouterr().err


def test_a_student_with_other_classes_is_reinitialised_and_says_so(tmp_path, models, caplog):
    data = _folder_data(tmp_path / "data")
    results = distill.main([*data, "--output_dir", str(tmp_path / "out"), *QUICK, "--method", "none", "--max_steps",
                            "1", "--student_name_or_path", models["two_classes"]])
    note = f"The student {models['two_classes']} predicts 2 classes: its classification layer was re-initialised " \
           f"for the dataset's 3 classes"
    assert any(n.startswith(note) for n in results["notes"]) and note in caplog.text
    assert note in (tmp_path / "out" / "README.md").read_text()


def test_other_scripts_reject_bad_input_the_same_way(tmp_path, models, capsys):
    import evaluate as evaluate_script

    flags = _folder_data(tmp_path / "data")
    _break("label", tmp_path / "data")
    teacher = _start("train_teacher.py", *flags, "--output_dir", str(tmp_path / "t"), "--backbone_weights", "none")
    _, stderr = teacher.communicate(timeout=240)
    assert teacher.returncode == EXIT_USER_ERROR, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "trainannot/img1.png: label values [9] are outside the classes" in stderr
    # evaluate.py's __main__ reports these errors and OSError with exit code 2 in the same way
    code = run_script(evaluate_script.main, ["--model_name_or_path", models["three_classes"], *flags],
                      user_errors=(OSError,))
    assert code == EXIT_USER_ERROR
    assert "trainannot/img1.png: label values [9] are outside the classes" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--arch", "segnet"], "--arch segnet --backbone tf_efficientnet_lite0: unknown teacher arch 'segnet'"),
    (["--backbone", "resnet_nonexistent"], "--backbone resnet_nonexistent is not a timm model name"),
    (["--backbone_weights", "/nonexistent/weights.pth"], "--backbone_weights /nonexistent/weights.pth does not exist"),
], ids=["arch", "backbone", "backbone_weights"])
def test_train_teacher_rejects_bad_flags(tmp_path, capsys, flags, message):
    import train_teacher

    data = _folder_data(tmp_path / "data")
    code = run_script(train_teacher.main, [*data, "--output_dir", str(tmp_path / "t"), "--backbone_weights", "none",
                                           *flags])
    assert code == EXIT_USER_ERROR
    assert message in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    code = run_script(distill.main, [*TINY_DATA, *QUICK, "--output_dir", str(out), "--method", "none", "--max_steps",
                                     "3", "--save_steps", "1", "--learning_rate", "1e38"])
    assert code == EXIT_NON_FINITE_LOSS
    err = capsys.readouterr().err
    assert "error: Loss term 'ce' became nan at step 1" in err and f"last good checkpoint in {out}" in err
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-1")


def test_internal_errors_keep_their_traceback():
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_script(main, [])


# ------------------------------------------------------------------------------------------- 3. security
def test_class_names_are_escaped_in_the_model_card(tmp_path):
    from huggingface_hub import ModelCard

    from c2vkd_hf.model_card import build_model_card

    id2label = {0: "<script>alert(1)</script>", 1: "|x|", 2: "[link](http://evil.example)\n# heading"}
    card = build_model_card(repo_id="me/student", metrics={"mean_iou": 0.5, "overall_accuracy": 0.8,
                            "per_category_iou": [0.1, 0.2, 0.3]}, id2label=id2label, dataset_name="<b>data</b>",
                            method="c2vkd", teacher_name="teacher")
    card.save(tmp_path / "README.md")
    text = ModelCard.load(tmp_path / "README.md").text
    assert "<script>" not in text and "<b>" not in text and "](http" not in text and "\n# heading" not in text
    assert r"\<script\>alert\(1\)\</script\>" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith(" |")]
    table = rows[rows.index("| class | IoU (%) |") + 1:]
    assert [row.count(" | ") for row in table] == [1, 1, 1], table  # "|x|" does not add table cells
    assert table[1] == r"| \|x\| | 20.00 |"


class _RunsCodeWhenUnpickled:
    """A pickle payload that writes ``marker`` when unpickled: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_no_unsafe_loading_in_the_package(tmp_path):
    """Every file the package reads as tensors (text embeddings .pth/.npy, teacher and backbone weights)
    refuses a pickle that carries code, and never runs it; the same file does run it when unpickled
    the unsafe way, so the payload is real."""
    import pickle

    from c2vkd_hf.models import read_state_dict
    from c2vkd_hf.text import load_text_embeddings

    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCodeWhenUnpickled(marker)}, hostile)
    hostile_npy = tmp_path / "hostile.npy"
    np.save(hostile_npy, np.array([_RunsCodeWhenUnpickled(marker)], dtype=object), allow_pickle=True)

    for load in (load_text_embeddings, read_state_dict):
        with pytest.raises(pickle.UnpicklingError):
            load(hostile)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_text_embeddings(hostile_npy)
    assert not marker.exists()

    torch.load(hostile, weights_only=False)  # the unsafe way: the payload runs
    assert marker.read_text() == "ran"


def test_no_pickle_or_remote_code_in_the_source():
    """No bare unpickling anywhere, and remote code only when asked for (``--trust_remote_code``)."""
    for path in [*(ROOT / "c2vkd_hf").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        source = path.read_text()
        assert "pickle.load" not in source and "allow_pickle=True" not in source, path
        assert "trust_remote_code=True" not in source, path


def test_text_head_folded_into_the_saved_student(tmp_path, capsys):
    """C2VKD's default (decoder pairs, text embeddings given): the text head is trained as the
    classifier and the saved plain student's classifier is the folded head of text_head.safetensors,
    which the model card says; --text_head false keeps the trained classifier; the head is refused
    with a stage4 linguistic pair."""
    from transformers import AutoModelForSemanticSegmentation

    classes = dict(enumerate(SYNTHETIC_CLASSES))
    teacher, student = _save_tiny(tmp_path / "teacher", classes, seed=1), _save_tiny(tmp_path / "student", classes, 2)
    torch.save(torch.randn(len(classes), 16), tmp_path / "emb.pth")
    common = [*TINY_DATA, *QUICK, "--teacher_name_or_path", teacher, "--student_name_or_path", student,
              "--max_steps", "2", "--train_baseline", "false"]
    run = [*common, "--method", "c2vkd", "--text_embeddings", str(tmp_path / "emb.pth")]
    refused = ["--output_dir", str(tmp_path / "refused"), *run, "--feature_pairs", "stage4:stage4", "--text_head", "true"]
    assert run_script(distill.main, refused) == EXIT_USER_ERROR
    assert "--text_head with C2VKD" in capsys.readouterr().err
    distill.main(["--output_dir", str(tmp_path / "out"), *run])
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    head = load_file(tmp_path / "out" / "text_head.safetensors")
    emb = torch.nn.functional.normalize(head["text_embeddings"], dim=1)
    folded = emb @ head["projector.weight"].flatten(1) / 0.03
    torch.testing.assert_close(model.decode_head.classifier.weight.flatten(1), folded, atol=1e-4, rtol=1e-4)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "trained as a text head" in card
    distill.main(["--output_dir", str(tmp_path / "own"), *run, "--text_head", "false"])
    own = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "own").decode_head.classifier.weight
    assert not torch.allclose(own.flatten(1), folded, atol=1e-2)
    results = json.loads((tmp_path / "own" / "results.json").read_text())
    assert results["text_head"] is False
    assert json.loads((tmp_path / "out" / "results.json").read_text())["text_head"] is True


def test_flags_a_method_does_not_read_do_not_identify_its_run(tmp_path):
    """A new default of a C2VKD-only flag (class balance) must not make a `kd` run another configuration
    (refused on resume), also against a run config saved with every flag; for C2VKD it does."""
    from c2vkd_hf.config import DataArguments, DistillationArguments
    from c2vkd_hf.jobs.distill import distillation_run_config
    from c2vkd_hf.runs import config_differences

    data, training = DataArguments(), TrainingArguments(output_dir=str(tmp_path), report_to="none")

    def identity(**flags):
        return distillation_run_config(DistillationArguments(**flags), data, training)

    assert identity(method="kd", class_balance=False, pdd_weight=2.0) == identity(method="kd")
    saved_by_an_earlier_version = json.loads(json.dumps(identity(method="kd")))
    saved_by_an_earlier_version["distillation"].update(class_balance=False, class_balance_power=1.0)
    assert config_differences(saved_by_an_earlier_version, identity(method="kd")) == []
    assert identity(method="kd", kd_temperature=2.0) != identity(method="kd")  # what kd reads still counts
    assert config_differences(identity(method="c2vkd", class_balance=False), identity(method="c2vkd")) == [
        "distillation.class_balance: False -> True"]
    # the schedules of C2VKD's terms neither (the default gained "exit:linear:0.5" with the stage exits) ...
    saved_by_an_earlier_version["distillation"]["weight_schedules"] = "stage:linear:0.5"
    assert config_differences(saved_by_an_earlier_version, identity(method="kd")) == []
    # ... but a schedule of the method's own term does
    assert config_differences(identity(method="kd"), identity(method="kd", weight_schedules="kd:linear:0.5")) == [
        "distillation.own_weight_schedules: '' -> 'kd:linear:0.5'"]
    assert identity(method="kd", weight_schedules="stage:linear:0.5,kd:linear:0.5") == identity(
        method="kd", weight_schedules="kd:linear:0.5")


def test_a_second_run_into_the_same_output_dir_is_refused_or_waits(tmp_path):
    """Two real processes into one --output_dir: the second gets exit 2 naming the holder's PID and host (before: both
    ran and wrote the folder); with --wait_for_lock true it waits and then finds the finished run; a lock left by a
    killed process is taken over."""
    import socket

    from c2vkd_hf.locks import lock_folder

    out = tmp_path / "shared"
    # the first run must still be training when it is killed: a run that reaches max_steps saves a final checkpoint
    # (of another configuration than the third run's), so it is given far more steps than it can make in the test
    run = TINY_DATA + QUICK + ["--method", "none", "--max_steps", "1000000", "--save_steps", "10000000",
                               "--train_baseline", "false"]
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        first = _start("distill.py", "--output_dir", str(out), *run, stdout=log, stderr=subprocess.STDOUT)
        _wait_for(log_path, "step 2/", first, 300)
        second = _start("distill.py", "--output_dir", str(out), *run)
        _, err = second.communicate(timeout=120)
        assert second.returncode == EXIT_USER_ERROR, err[-2000:]
        assert f"is in use by another run (pid {first.pid} on {socket.gethostname()}" in err and "--wait_for_lock" in err
        first.send_signal(signal.SIGKILL)  # a dead holder: its lock is gone with it
        first.wait()
    # taken over at once: another process locks it; a third run with --wait_for_lock waits for it, then runs
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from c2vkd_hf.locks import lock_folder; "
                               f"lock_folder({str(out)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    wait_log = tmp_path / "waiting.log"
    with wait_log.open("w") as log:
        waiting = _start("distill.py", "--output_dir", str(out), *run[:-4], "--max_steps", "2", "--wait_for_lock",
                         "true", "--train_baseline", "false", stdout=log, stderr=subprocess.STDOUT)
        _wait_for(wait_log, "waiting for it", waiting, 120)
        holder.kill()
        holder.wait()
        waiting.wait(timeout=300)
    text = wait_log.read_text()
    assert waiting.returncode == 0, text[-3000:]
    assert "is in use by pid" in text and "waiting for it" in text


def test_checkpoint_files_results_and_manifest_reach_the_disk_before_the_manifest_commits(tmp_path, monkeypatch):
    """Durable commits: every file of a checkpoint is fsync-ed, then the manifest (itself fsync-ed, renamed, the
    folder fsync-ed) commits it; results files are written the same way. (Before: nothing was fsync-ed, so after a
    power loss a checkpoint that verified could hold zeros.) Recorded through os.fsync and os.replace."""
    from c2vkd_hf.jobs.common import write_json
    from c2vkd_hf.runs import MANIFEST_NAME, write_manifest

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    for name in ("model.safetensors", "optimizer.pt", TRAINER_STATE_NAME):
        (folder / name).write_bytes(os.urandom(64))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_manifest(folder)
    commit = events.index(("replace", str(folder / MANIFEST_NAME)))
    synced = {Path(p).name for kind, p in events[:commit] if kind == "fsync"}
    assert {"model.safetensors", "optimizer.pt", TRAINER_STATE_NAME} <= synced
    assert ("fsync", str(folder)) in events[commit:]  # the rename itself, on disk
    events.clear()
    write_json(tmp_path / "results.json", {"a": 1})
    commit = events.index(("replace", str(tmp_path / "results.json")))
    assert any(kind == "fsync" for kind, _ in events[:commit]) and ("fsync", str(tmp_path)) in events[commit:]
