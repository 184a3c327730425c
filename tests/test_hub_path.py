"""The Hub path end to end, without mocks (issue 40, item 1).

Real on-disk layouts, written offline with the libraries' own writers, read by the real code paths:

* a Hub-format dataset repository in a folder (``data/<split>-00000-of-00001.parquet`` shards written by
  ``datasets``, the ``configs`` card ``push_to_hub`` writes, ``id2label.json`` at the root as
  segments/sidewalk-semantic ships it), with the mask column under other names than ours;
* a Hugging Face cache under a temporary ``HF_HOME`` (``hub/<kind>s--org--name/{blobs,refs/main,snapshots/<sha>}``,
  the layout huggingface_hub writes) holding a tiny teacher, a tiny student and that dataset, used by Hub id
  with ``HF_HUB_OFFLINE=1`` in a separate ``scripts/distill.py`` process (huggingface_hub and datasets read
  ``HF_HOME`` when they are imported);
* ``reduce_labels`` on a hand-made mask; the trained student through ``transformers.pipeline``.

Nothing of ``datasets``, ``huggingface_hub`` or ``transformers`` is replaced; the one setting changed in this
process is where ``datasets`` writes its Arrow cache (a temporary folder instead of ``~/.cache``).
(``--push_to_hub``'s offline fallback is covered by tests/test_push.py and tests/test_scripts.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, SegformerImageProcessor, pipeline

from c2vkd_hf.cli.distill import main as distill_main
from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import DataValidationError, load_segmentation_data
from tiny import TINY_SEGFORMER_JSON, tiny_student, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
#: id2label.json as segments/sidewalk-semantic ships it: a bare {"id": "name"} object
ID2LABEL = {"0": "flat-road", "1": "flat-sidewalk", "2": "vehicle-car"}
#: the dataset card ``DatasetDict.push_to_hub`` writes (its ``configs`` part)
CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# tiny sidewalk
"""
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIZE = 32
#: the tiny student's and teacher's own normalisation, not ImageNet's: a run must read them from the cache
STUDENT_MEAN, STUDENT_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
TEACHER_MEAN, TEACHER_STD = [0.25, 0.25, 0.25], [0.125, 0.125, 0.125]
TRAIN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
         "--learning_rate", "1e-3", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
         "--disable_tqdm", "true", "--train_baseline", "false", "--report_to", "none"]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """``datasets`` writes the Arrow files it builds from parquet into a temporary folder, not ``~/.cache``."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def blocky_mask(rng: np.random.Generator, values=(0, 1, 2)) -> np.ndarray:
    """A SIZE x SIZE mask of 8 x 8 blocks, each one of ``values``."""
    blocks = rng.choice(np.asarray(values, dtype=np.uint8), size=(SIZE // 8, SIZE // 8))
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def write_hub_dataset(root: Path, image_column: str = "image", label_column: str = "label", *, masks=None,
                      id2label=ID2LABEL, sizes=(("train", 4), ("validation", 2))) -> Path:
    """A dataset repository as the Hub holds it: one parquet shard per split written by ``datasets``, the
    ``configs`` card, ``id2label.json`` at the root. ``masks``: {split: [uint8 arrays]} (default: blocky)."""
    rng = np.random.default_rng(0)
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.Image()})
    (root / "data").mkdir(parents=True)
    for split, n in sizes:
        split_masks = masks[split] if masks is not None else [blocky_mask(rng) for _ in range(n)]
        images = [PIL.Image.fromarray(rng.integers(0, 256, (*m.shape, 3), dtype=np.uint8)) for m in split_masks]
        ds = datasets.Dataset.from_dict(
            {image_column: images, label_column: [PIL.Image.fromarray(m, mode="L") for m in split_masks]},
            features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "id2label.json").write_text(json.dumps(id2label))
    (root / "README.md").write_text(CARD)
    return root


def hub_cache_snapshot(hf_home: Path, kind: str, repo_id: str) -> Path:
    """The empty ``snapshots/<COMMIT>`` folder of ``repo_id`` in the cache under ``hf_home``, with ``refs/main``."""
    repo = hf_home / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def into_blobs(snapshot: Path) -> None:
    """Move every file of ``snapshot`` into ``../../blobs/<sha256>`` and leave a relative symlink, as
    huggingface_hub's cache stores downloads."""
    blobs = snapshot.parent.parent / "blobs"
    blobs.mkdir(exist_ok=True)
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file() and not p.is_symlink()):
        blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
        path.replace(blob)
        path.symlink_to(os.path.relpath(blob, path.parent))


def offline_cache_env(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """The environment of a process that finds everything in the cache under ``hf_home``, with no network."""
    for name in list(os.environ):
        if name.startswith(("HF_", "HUGGINGFACE_")) or name in ("TRANSFORMERS_CACHE", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def processor(mean, std) -> SegformerImageProcessor:
    return SegformerImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=mean, image_std=std,
                                   do_reduce_labels=False)


def saved_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------------------------------ a Hub-format folder


@pytest.mark.parametrize("image_column, label_column", [
    ("image", "annotation"),         # scene_parse_150 / ADE20K style
    ("pixel_values", "label"),       # segments/sidewalk-semantic
    ("image", "segmentation_mask"),
])
def test_distill_from_a_hub_format_dataset_folder(tmp_path, datasets_cache, image_column, label_column):
    """``--dataset_name <folder>`` with parquet shards: the mask column is the one ``--label_column`` names, the
    class names come from the repository's id2label.json, and the student trains and is saved with them."""
    repo = write_hub_dataset(tmp_path / "sidewalk-tiny", image_column, label_column)
    out = tmp_path / "student"
    results = distill_main(["--output_dir", str(out), "--dataset_name", str(repo), "--image_column", image_column,
                            "--label_column", label_column, "--method", "none",
                            "--student_config_overrides", TINY_SEGFORMER_JSON, *TRAIN])
    assert results["steps"] == 2 and results["dataset"] == "sidewalk-tiny"
    assert 0.0 <= results["val_mean_iou"] <= 1.0
    config = saved_config(out)
    assert config["id2label"] == ID2LABEL
    assert config["label2id"] == {name: int(i) for i, name in ID2LABEL.items()}
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "results.json").read_text())["steps"] == 2


def test_reduce_labels_maps_a_hand_made_mask_exactly(tmp_path, datasets_cache):
    """ADE20K-style ``reduce_labels`` through the Hub-format loader: 0 (background) -> 255, v -> v - 1, 255 stays."""
    mask = np.array([[0, 1, 2, 3],
                     [3, 2, 1, 0],
                     [255, 1, 0, 3],
                     [2, 2, 255, 255]], dtype=np.uint8)
    expected = np.array([[255, 0, 1, 2],
                         [2, 1, 0, 255],
                         [255, 0, 255, 2],
                         [1, 1, 255, 255]], dtype=np.uint8)
    repo = write_hub_dataset(tmp_path / "ade-tiny", "image", "annotation",
                             masks={"train": [mask], "validation": [mask.T.copy()]},
                             id2label={"0": "wall", "1": "building", "2": "sky"})
    args = DataArguments(dataset_name=str(repo), label_column="annotation", reduce_labels=True)
    data = load_segmentation_data(args)
    assert data.id2label == {0: "wall", 1: "building", 2: "sky"} and data.reduce_labels
    np.testing.assert_array_equal(np.asarray(data.train[0]["label"]), expected)
    np.testing.assert_array_equal(np.asarray(data.validation[0]["label"]), expected.T)
    assert data.train[0]["image"].size == (4, 4) and data.train[0]["image"].mode == "RGB"
    # without the reduction, value 3 is not a class of a 3-class dataset: the loader refuses it, naming the row
    args.reduce_labels = False
    with pytest.raises(DataValidationError, match=r"split 'train', row 0.*\[3\]"):
        load_segmentation_data(args)


# ------------------------------------------------------------------------------------------ the Hugging Face cache


@pytest.fixture(scope="module")
def hub_cache_run(tmp_path_factory):
    """A tiny teacher, a tiny student and the dataset in a Hugging Face cache under a fresh HF_HOME; then
    ``scripts/distill.py`` by Hub ids, offline, in its own process. Returns (output folder, process, HF_HOME)."""
    tmp = tmp_path_factory.mktemp("hub-cache")
    hf_home = tmp / "hf-home"
    teacher = hub_cache_snapshot(hf_home, "model", "org/teacher")
    tiny_teacher().save_pretrained(teacher)
    processor(TEACHER_MEAN, TEACHER_STD).save_pretrained(teacher)
    student = hub_cache_snapshot(hf_home, "model", "org/student")
    tiny_student(seed=3).save_pretrained(student)  # id2label sky/road/car: the run gives it the dataset's
    processor(STUDENT_MEAN, STUDENT_STD).save_pretrained(student)
    write_hub_dataset(hub_cache_snapshot(hf_home, "dataset", "org/data"), "pixel_values", "label")
    for snapshot in (teacher, student, hf_home / "hub" / "datasets--org--data" / "snapshots" / COMMIT):
        into_blobs(snapshot)

    out = tmp / "student-out"
    with pytest.MonkeyPatch.context() as mp:
        offline_cache_env(mp, hf_home)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "distill.py"), "--output_dir", str(out),
             "--teacher_name_or_path", "org/teacher", "--student_name_or_path", "org/student",
             "--dataset_name", "org/data", "--image_column", "pixel_values", "--method", "kd", *TRAIN],
            capture_output=True, text=True, timeout=300, cwd=tmp)
    return out, proc, hf_home


def test_distill_by_hub_ids_from_the_offline_cache(hub_cache_run, monkeypatch):
    """``--teacher_name_or_path org/teacher --student_name_or_path org/student --dataset_name org/data`` with
    ``HF_HUB_OFFLINE=1``: all three resolve from the cache by id (no network), and the student trains 2 steps
    with the dataset's class names and its own normalisation."""
    out, proc, hf_home = hub_cache_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["method"] == "kd"
    assert (results["teacher"], results["student"], results["dataset"]) == ("org/teacher", "org/student", "org/data")
    assert results["teacher_val_mean_iou"] is not None
    config = saved_config(out)
    assert config["id2label"] == ID2LABEL  # from the cached repository's id2label.json, not the student's own
    assert config["hidden_sizes"] == [8, 16, 16, 32]  # the cached student's architecture, no overrides given
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert (saved["image_mean"], saved["image_std"]) == (STUDENT_MEAN, STUDENT_STD), "the Hub student's processor"
    assert (saved["size"]["height"], saved["size"]["width"]) == (SIZE, SIZE)
    # the teacher by id is fed its own normalisation too (what the run gives the trainer), read in the same setting
    offline_cache_env(monkeypatch, hf_home)
    probe = subprocess.run([sys.executable, "-c", "from c2vkd_hf.models import image_mean_std, load_teacher; "
                            "print(image_mean_std(load_teacher('org/teacher')))"],
                           capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == str((tuple(TEACHER_MEAN), tuple(TEACHER_STD)))


def test_dataset_id_missing_from_the_offline_cache_is_one_line(tmp_path, monkeypatch):
    """Offline, a dataset id the cache does not hold: exit code 2 and one line saying so and how to get it."""
    offline_cache_env(monkeypatch, tmp_path / "empty-hf-home")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "distill.py"), "--output_dir", str(tmp_path / "out"),
         "--dataset_name", "org/absent", "--method", "none", "--student_config_overrides", TINY_SEGFORMER_JSON,
         *TRAIN], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not in the Hugging Face cache" in proc.stderr
    assert "hf download --repo-type dataset org/absent" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trained_student_through_the_pipeline(hub_cache_run):
    """The saved student loads in ``transformers.pipeline("image-segmentation")`` and gives one mask per
    predicted class, named with the dataset's labels, covering every pixel once."""
    out, proc, _ = hub_cache_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    image = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(out), device="cpu")
    found = segmenter(image)

    model = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    image_processor = AutoImageProcessor.from_pretrained(out)
    with torch.no_grad():
        logits = model(**image_processor(images=image, return_tensors="pt"))
    seg = image_processor.post_process_semantic_segmentation(logits, target_sizes=[(40, 48)])[0]
    predicted = [ID2LABEL[str(i)] for i in sorted(torch.unique(seg).tolist())]

    labels = [entry["label"] for entry in found]
    assert sorted(labels) == sorted(predicted) and len(set(labels)) == len(labels)
    assert set(labels) <= set(ID2LABEL.values())
    coverage = np.zeros((40, 48), dtype=int)
    for entry in found:
        assert entry["mask"].size == (48, 40)
        coverage += np.asarray(entry["mask"]) > 0
    assert (coverage == 1).all()
