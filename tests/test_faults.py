"""Reliability, round two (docs/RELIABILITY.md): a finished run is not trained again, another
configuration's run is refused, damaged checkpoints are skipped for the newest that verifies, a failed
save leaves no checkpoint that looks complete, and every user error (flags, config files, output folder,
label sets, image sizes, cache and embedding files) exits 2 with one message naming the culprit.

Scripts run through :func:`c2vkd_hf.jobs.run_script` (what their ``__main__`` runs), on tiny data.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from c2vkd_hf.losses import get_loss
from c2vkd_hf.jobs import EXIT_USER_ERROR, run_script
from c2vkd_hf.runs import MANIFEST_NAME, RUN_CONFIG_NAME
from c2vkd_hf.trainer import DistillationModel, DistillationTrainer, last_complete_checkpoint
from c2vkd_hf.validation import SaveError, UserInputError
from tiny import ID2LABEL, TINY_SEGFORMER_JSON, make_trainer, tensor_dataset, tiny_student

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import distill  # noqa: E402
import evaluate as evaluate_script  # noqa: E402

TINY_DATA = ["--synthetic_train_size", "16", "--synthetic_validation_size", "2", "--synthetic_height", "32",
             "--synthetic_width", "32"]
# 16 images at batch 4: 4 steps an epoch, so 3 steps do not end on an epoch boundary
RUN = TINY_DATA + ["--student_config_overrides", TINY_SEGFORMER_JSON, "--per_device_train_batch_size", "4",
                   "--disable_tqdm", "true", "--eval_strategy", "no", "--logging_steps", "1", "--method", "none",
                   "--max_steps", "3", "--save_steps", "3", "--train_baseline", "false"]


def _distill(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_script(distill.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> bool:
    """One ``error:`` line (progress bars may precede it) and no traceback."""
    return sum(line.startswith("error:") for line in err.splitlines()) == 1 and "Traceback" not in err


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder, but its lock files (which name the process that last held the folder)."""
    from c2vkd_hf.locks import LOCK_PREFIX

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(LOCK_PREFIX)}


# ----------------------------------------------------------------------------------- 1. finished means finished
def test_a_finished_run_is_not_trained_again_and_another_configuration_is_refused(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert _distill(capsys, "--output_dir", str(out), *RUN)[0] == 0
    finished = json.loads((out / "results.json").read_text())
    assert finished["steps"] == 3 and (out / RUN_CONFIG_NAME).is_file()
    before = _snapshot(out)

    # the same command, and one that differs only in reporting flags: nothing trained, nothing changed
    for extra in ([], ["--logging_steps", "2", "--report_to", "none", "--disable_tqdm", "false"]):
        code, stdout, _ = _distill(capsys, "--output_dir", str(out), *RUN, *extra)
        assert code == 0 and "already holds this run, finished" in stdout
        assert _snapshot(out) == before

    # another configuration: refused, nothing changed
    code, _, err = _distill(capsys, "--output_dir", str(out), *RUN, "--learning_rate", "1e-3")
    assert code == EXIT_USER_ERROR
    assert "holds a finished run of another configuration (training.learning_rate: 0.0006 -> 0.001)" in err
    assert "--retrain" in err and _snapshot(out) == before

    # killed after the final checkpoint, before the results: resuming trains no extra step
    (out / "results.json").unlink()
    assert _distill(capsys, "--output_dir", str(out), *RUN)[0] == 0
    assert f"Resuming from {out / 'checkpoint-3'}" in caplog.text
    assert json.loads((out / "results.json").read_text())["steps"] == 3

    # --retrain: the previous run is deleted and trained again
    assert _distill(capsys, "--output_dir", str(out), *RUN, "--learning_rate", "1e-3", "--retrain", "true")[0] == 0
    assert json.loads((out / "results.json").read_text())["run_config"]["training"]["learning_rate"] == 1e-3


def test_checkpoints_of_another_configuration_or_model_are_refused(tmp_path, capsys):
    out, one_step = tmp_path / "out", [*RUN, "--max_steps", "1", "--save_steps", "1"]
    assert _distill(capsys, "--output_dir", str(out), *one_step)[0] == 0
    for name in ("results.json", "model.safetensors"):  # as if killed before the end
        (out / name).unlink()
    other = json.dumps({**json.loads(TINY_SEGFORMER_JSON), "decoder_hidden_size": 8})
    code, _, err = _distill(capsys, "--output_dir", str(out), *one_step, "--student_config_overrides", other)
    assert code == EXIT_USER_ERROR
    assert "holds checkpoints of another configuration (distillation.student_config_overrides:" in err
    # without run_config.json (an older version's run) the weights themselves are compared, from the header
    (out / RUN_CONFIG_NAME).unlink()
    code, _, err = _distill(capsys, "--output_dir", str(out), *one_step, "--student_config_overrides", other)
    assert code == EXIT_USER_ERROR and _one_error(err)
    assert f"Can't resume from {out / 'checkpoint-1'}: it holds another model (decode_head." in err


# ----------------------------------------------------------------------------------- 3. verified checkpoints
def _trained_checkpoints(tmp_path: Path) -> Path:
    model = DistillationModel(tiny_student(), get_loss("none", ignore_index=255))
    make_trainer(str(tmp_path), model, None, tensor_dataset(8), per_device_train_batch_size=4, max_steps=4,
                 save_strategy="steps", save_steps=2).train()
    return tmp_path


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "optimizer.pt is {n} bytes, {m} were written (truncated?)"),
    ("flip", "model.safetensors does not match its checksum (corrupt)"),
    ("legacy_truncate", "optimizer.pt is truncated or corrupt (not a complete torch file)"),
    ("legacy_safetensors", "model.safetensors is truncated or corrupt (its size does not match its header)"),
])
def test_a_damaged_checkpoint_is_skipped_for_the_newest_that_verifies(tmp_path, caplog, damage, reason):
    out = _trained_checkpoints(tmp_path)
    newest = out / "checkpoint-4"
    manifest = json.loads((newest / MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest)
    name = "model.safetensors" if damage in ("flip", "legacy_safetensors") else "optimizer.pt"
    data = (newest / name).read_bytes()
    if damage.startswith("legacy"):
        (newest / MANIFEST_NAME).unlink()  # a checkpoint of an earlier version: structural checks
    if damage == "flip":
        data = data[:-1] + bytes([data[-1] ^ 1])
    else:
        data = data[: len(data) - 100]
    (newest / name).write_bytes(data)
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert reason.format(n=len(data), m=len(data) + 100) in caplog.text
    assert f"Skipping the incomplete or damaged checkpoint {newest}" in caplog.text


def test_a_failed_save_leaves_no_complete_checkpoint_and_exits_2(tmp_path, monkeypatch, capsys):
    def disk_full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/optimizer.pt")

    out = _trained_checkpoints(tmp_path)
    monkeypatch.setattr(DistillationTrainer, "_save_optimizer_and_scheduler", disk_full)
    model = DistillationModel(tiny_student(), get_loss("none", ignore_index=255))
    trainer = make_trainer(str(out), model, None, tensor_dataset(8), per_device_train_batch_size=4, max_steps=4,
                           save_strategy="steps", save_steps=2)
    with pytest.raises(SaveError, match=r"Could not write .*checkpoint-4/optimizer.pt \(No space left on device\)"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out / "checkpoint-4" / MANIFEST_NAME).exists()
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")

    # through a script: exit 2, one line naming the file
    code, _, err = _distill(capsys, "--output_dir", str(tmp_path / "run"), *RUN, "--save_steps", "1")
    assert code == EXIT_USER_ERROR and _one_error(err)
    assert "checkpoint-1/optimizer.pt (No space left on device)" in err


# ----------------------------------------------------------------------------------- 2+4. user errors
@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an integer >= 1, got 0."),
    (["--per_device_eval_batch_size", "-2"], "--per_device_eval_batch_size must be an integer >= 1, got -2."),
    (["--learning_rate", "-0.1"], "--learning_rate must be a finite number >= 0, got -0.1."),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan."),
    (["--max_steps", "0"], "--max_steps must be >= 1 (or -1: train for --num_train_epochs epochs instead), got 0."),
    (["--max_steps", "-3"], "--max_steps must be >= 1 (or -1"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be a finite number > 0, got 0.0."),
    (["--eval_strategy", "steps", "--eval_steps", "0"], "--eval_steps must be > 0"),
    (["--save_steps", "0"], "--save_steps must be > 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be an integer >= 1, got 0."),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1."),
    (["--min_scale", "2", "--max_scale", "1"], "--min_scale must be <= --max_scale, got 2.0 > 1.0."),
    (["--min_scale", "-0.5"], "--min_scale must be a finite number > 0, got -0.5."),
    (["--resize_height", "64"], "--resize_height and --resize_width must be given together (got only --resize_height)."),
    (["--crop_width", "64"], "--crop_height and --crop_width must be given together (got only --crop_width)."),
    (["--resize_height", "8", "--resize_width", "8"], "--resize_height must be an integer >= 32, got 8."),
    (["--dataset_ignore_index", "300"], "--dataset_ignore_index must be a label value in 0..255, got 300."),
    (["--max_train_samples", "0"], "--max_train_samples must be an integer >= 1, got 0."),
    (["--default_teacher_steps", "0"], "--default_teacher_steps must be an integer >= 1, got 0."),
], ids=["batch_0", "eval_batch_negative", "negative_lr", "nan_lr", "max_steps_0", "max_steps_negative",
        "epochs_0", "eval_steps_0", "save_steps_0", "accumulation_0", "negative_seed", "min_scale_above_max",
        "negative_scale", "resize_height_alone", "crop_width_alone", "resize_too_small", "ignore_index_range",
        "max_train_samples_0", "teacher_steps_0"])
def test_every_numeric_flag_is_range_checked_up_front(tmp_path, capsys, flags, message):
    code, _, err = _distill(capsys, "--output_dir", str(tmp_path / "out"), *RUN, *flags)
    assert code == EXIT_USER_ERROR
    assert message in err and _one_error(err), err
    assert not (tmp_path / "out").exists(), "nothing is created before the flags are checked"


@pytest.mark.parametrize("content, message", [
    ("max_steps: many\n", "Config file {path}: max_steps must be an integer, got 'many'."),
    ("learning_rate: fast\n", "Config file {path}: learning_rate must be a number, got 'fast'."),
    ("max_steps: 2.5\n", "Config file {path}: max_steps must be an integer, got 2.5."),
    ("hflip: maybe\n", "Config file {path}: hflip must be true or false, got 'maybe'."),
    ("method: [kd]\n", "Config file {path}: method must be a string, got ['kd']."),
    ("per_device_train_batch_size: 0\n", "Config file {path}: --per_device_train_batch_size must be an integer >= 1"),
    ("max_steps: null\n", "Config file {path}: max_steps must be an integer, got null."),
], ids=["int_word", "float_word", "int_fraction", "bool_word", "str_list", "range", "null"])
def test_config_file_values_are_type_checked_as_on_the_command_line(tmp_path, capsys, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n" + content)
    code, _, err = _distill(capsys, str(path))
    assert code == EXIT_USER_ERROR
    assert message.format(path=path) in err and _one_error(err), err


def test_a_config_file_of_strings_parses_like_flags(tmp_path):
    """Quoted numbers and yes/no are what the command line would accept: the types are converted."""
    from transformers import HfArgumentParser, TrainingArguments

    from c2vkd_hf.config import DataArguments
    from c2vkd_hf.validation import parse_script_arguments

    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args, _ = parse_script_arguments(
        parser, [], {}, config={"output_dir": str(tmp_path), "max_steps": "7", "learning_rate": 1, "hflip": "no",
                                "min_scale": "0.5"}, source="c.yaml")
    assert (training_args.max_steps, training_args.learning_rate, data_args.hflip, data_args.min_scale) == (7, 1.0,
                                                                                                          False, 0.5)


def test_the_output_folder_must_be_a_writable_folder(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = _distill(capsys, "--output_dir", str(a_file), *RUN)
    assert code == EXIT_USER_ERROR and f"--output_dir {a_file} is a file, not a folder." in err
    code, _, err = _distill(capsys, "--output_dir", str(a_file / "sub"), *RUN)
    assert code == EXIT_USER_ERROR and f"--output_dir {a_file / 'sub'} is not writable (Not a directory)." in err

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    code, _, err = _distill(capsys, "--output_dir", str(tmp_path / "ro"), *RUN)
    assert code == EXIT_USER_ERROR and f"--output_dir {tmp_path / 'ro'} is not writable (Read-only file system)." in err


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def _folder_data(root: Path, classes=None, sizes=((32, 32),) * 3, mask_value=None, ignore_index=None) -> list[str]:
    """A local-folder dataset: train images of ``sizes`` (H, W), two 32x32 validation images."""
    rng = np.random.default_rng(0)
    for split, split_sizes in (("train", sizes), ("val", ((32, 32),) * 2)):
        for i, (h, w) in enumerate(split_sizes):
            _png(root / split / f"img{i}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            mask = rng.integers(0, 3, (h, w), dtype=np.uint8) if mask_value is None or split == "val" else \
                np.full((h, w), mask_value, dtype=np.uint8)
            _png(root / f"{split}annot" / f"img{i}.png", mask)
    labels = {"classes": classes or list(ID2LABEL.values())}
    if ignore_index is not None:
        labels["ignore_index"] = ignore_index
    (root / "classes.json").write_text(json.dumps(labels))
    return ["--train_images", str(root / "train"), "--train_labels", str(root / "trainannot"),
            "--validation_images", str(root / "val"), "--validation_labels", str(root / "valannot"),
            "--labels_file", str(root / "classes.json")]


@pytest.mark.parametrize("data, flags, message", [
    ({"classes": ["sky", "Sky", "car"]}, [], "class 1 has the same name as class 0 ('Sky'); class names must be distinct"),
    ({"ignore_index": 1}, [], "the ignore value 1 is the label value of class 1 ('road')"),
    ({}, ["--dataset_ignore_index", "0"], "the ignore value 0 is the label value of class 0 ('sky')"),
    ({}, ["--dataset_ignore_index", "3", "--reduce_labels", "true"],
     "the ignore value 3 is the label value of class 2 ('car') after --reduce_labels"),
    ({"mask_value": 255}, [], "every mask of the train split (3 masks) is entirely void"),
    ({"sizes": ((32, 32), (40, 32), (32, 32))}, ["--per_device_train_batch_size", "2"],
     "train images have different sizes ({root}/train/img0.png is 32x32, {root}/train/img1.png is 32x40 (WxH))"),
    ({"sizes": ((32, 32), (1, 1), (32, 32))}, ["--per_device_train_batch_size", "1"],
     "{root}/train/img1.png is 1x1 (WxH): the models need images of at least 32x32"),
], ids=["duplicate_names", "ignore_is_a_class", "dataset_ignore_is_a_class", "ignore_is_a_class_reduced",
        "all_void", "different_sizes", "tiny_image"])
def test_silently_wrong_data_is_refused(tmp_path, capsys, data, flags, message):
    root = tmp_path / "data"
    code, _, err = _distill(capsys, *_folder_data(root, **data), "--output_dir", str(tmp_path / "out"), *RUN, *flags)
    assert code == EXIT_USER_ERROR
    assert message.format(root=root) in err, err


def test_evaluate_asks_for_data_and_checks_its_flags(tmp_path, capsys):
    from c2vkd_hf.models import load_student
    from tiny import TINY_SEGFORMER

    model = tmp_path / "model"
    load_student("segformer-b0", ID2LABEL, config_overrides=TINY_SEGFORMER).save_pretrained(model)
    for argv, message in [
        ([], f"{model} has no results.json to take the data configuration from: give the data flags"),
        (["--dataset_name", "synthetic", "--num_predictions", "-5"], "--num_predictions must be an integer >= -1, got -5."),
        (["--dataset_name", "synthetic", "--batch_size", "0"], "--batch_size must be an integer >= 1, got 0."),
    ]:
        code = run_script(evaluate_script.main, ["--model_name_or_path", str(model), *argv], user_errors=(OSError,))
        assert code == EXIT_USER_ERROR
        assert message in capsys.readouterr().err


def test_train_teacher_takes_a_config_file_and_refuses_a_vit_backbone(tmp_path, capsys):
    import train_teacher

    config = tmp_path / "teacher.yaml"
    data = _folder_data(tmp_path / "data")
    flags = {a[2:]: b for a, b in zip(data[::2], data[1::2])}
    config.write_text("".join(f"{k}: {v}\n" for k, v in flags.items()) + f"output_dir: {tmp_path / 't'}\n"
                      "backbone: vit_tiny_patch16_224\nbackbone_weights: none\nmax_steps: 1\n")
    assert run_script(train_teacher.main, [str(config)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--backbone vit_tiny_patch16_224 is not a CNN backbone: its feature maps have strides [16, 16, 16, 16]" in err
    config.write_text(config.read_text().replace("max_steps: 1", "max_steps: many"))
    assert run_script(train_teacher.main, [str(config)]) == EXIT_USER_ERROR
    assert f"Config file {config}: max_steps must be an integer, got 'many'." in capsys.readouterr().err


def test_a_truncated_teacher_cache_file_is_named(tmp_path):
    from c2vkd_hf.cache import TeacherCache, TeacherCacheError, build_teacher_cache
    from c2vkd_hf.data import make_synthetic_dataset
    from c2vkd_hf.models import IMAGENET_MEAN, IMAGENET_STD
    from tiny import tiny_teacher

    dataset = make_synthetic_dataset(2, 32, 32, seed=0)
    build_teacher_cache(tmp_path / "cache", tiny_teacher(), dataset, reference_size=None, batch_size=2,
                        teacher_mean_std=(IMAGENET_MEAN, IMAGENET_STD), feature_names=[], progress=False)
    logits = tmp_path / "cache" / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-64])
    with pytest.raises(TeacherCacheError, match=f"{logits} is truncated or unreadable"):
        TeacherCache(tmp_path / "cache")


@pytest.mark.parametrize("embeddings, message", [
    (torch.randn(3, 5), "holds embeddings of shape (3, 5), but the student's text head needs (K, 8)"),
    (torch.full((3, 8), float("nan")), "contain non-finite values"),
], ids=["other_dimension", "nan"])
def test_text_query_embeddings_of_another_dimension_or_nan_are_refused(tmp_path, embeddings, message):
    from c2vkd_hf.cli import text_query

    path = tmp_path / "emb.pth"
    torch.save(embeddings, path)
    args = text_query.TextQueryArguments(model_name_or_path=str(tmp_path), query_embeddings=str(path),
                                         query_names="a,b,c")
    with pytest.raises(UserInputError, match=f"--query_embeddings {path}") as error:
        text_query._query_vocabulary(args, ["sky", "road", "car"], 8)
    assert message in str(error.value)
