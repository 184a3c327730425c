"""Cache sizes on disk (c2vkd_hf/cache/size.py, c2vkd_hf/data/decoded.py): the estimates equal the bytes a build
writes (up to the .npy headers), and a cache that would not fit is refused before the teacher runs over the data."""

from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from c2vkd_hf.cache import TeacherCache, build_teacher_cache
from c2vkd_hf.cache.size import TeacherCacheSpaceError, cache_layout, teacher_cache_bytes
from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import build_transform, make_synthetic_dataset
from c2vkd_hf.data.decoded import (DecodedCacheSpaceError, build_decoded_cache, decoded_cache_bytes, format_bytes,
                                   stored_size)
from c2vkd_hf.models import IMAGENET_MEAN, IMAGENET_STD, forward_features
from c2vkd_hf.validation import UserInputError
from tiny import TINY_SEGFORMER, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
MEAN_STD = (IMAGENET_MEAN, IMAGENET_STD)
Usage = namedtuple("Usage", "total used free")


def build(directory, teacher, dataset, **kwargs):
    options = dict(reference_size=(32, 48), teacher_mean_std=MEAN_STD, feature_names=["stage2", "decoder"],
                   progress=False, batch_size=4)
    options.update(kwargs)
    return build_teacher_cache(directory, teacher, dataset, **options)


def data_and_headers(directory: Path) -> tuple[int, int, int]:
    """(bytes of every .npy file, of their headers, number of .npy files) in ``directory``."""
    files = sorted(directory.glob("*.npy"))
    headers = [int(np.load(f, mmap_mode="r").offset) for f in files]
    return sum(f.stat().st_size for f in files), sum(headers), len(files)


def shapes_of(teacher, reference_size, names):
    """The teacher's map shapes at the reference size, read here independently of the cache code."""
    with torch.no_grad():
        logits, features = forward_features(teacher, torch.zeros(1, 3, *reference_size))
    return int(logits.shape[1]), tuple(logits.shape[2:]), {n: tuple(features[n].shape[1:]) for n in names}


def free_space_of(monkeypatch, free: int) -> list:
    """Makes ``shutil.disk_usage`` report ``free`` bytes; returns the list of paths it was asked about."""
    asked = []

    def usage(path):
        asked.append(Path(path))
        return Usage(10 * free + 1, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


def test_the_formula_on_small_layouts():
    # N (2 K h w + sum_f 2 C_f h_f w_f + 1)
    assert teacher_cache_bytes(5, 3, (8, 12), {"stage2": (16, 4, 6), "decoder": (16, 8, 12)}) == \
        5 * (2 * 3 * 8 * 12 + 2 * 16 * 4 * 6 + 2 * 16 * 8 * 12 + 1)
    # top-k: N (2 (k + 1) h w + b k h w + 1), b = 1 byte up to 256 classes, 2 beyond
    assert teacher_cache_bytes(2, 19, (4, 4), top_k=3) == 2 * (2 * 4 * 16 + 1 * 3 * 16 + 1)
    assert teacher_cache_bytes(2, 300, (4, 4), top_k=3) == 2 * (2 * 4 * 16 + 2 * 3 * 16 + 1)
    assert list(cache_layout(19, (4, 4), {"decoder": (8, 4, 4)}, top_k=3)) == [
        "logits_topk_values", "logits_topk_indices", "feature_decoder"]
    assert [format_bytes(n) for n in (100, 2048, 5 * 2**20 + 2**19, 41.3 * 2**30, 300 * 2**30)] == [
        "100 B", "2.0 KiB", "5.5 MiB", "41.3 GiB", "300 GiB"]


@pytest.mark.parametrize("names, top_k", [(["stage2", "decoder"], None), ([], 2), (["stage4"], 1)],
                         ids=["logits+features", "top-k", "top-k+feature"])
def test_teacher_cache_bytes_is_what_a_build_writes(tmp_path, names, top_k):
    dataset = make_synthetic_dataset(5, 48, 64, seed=1)
    teacher = tiny_teacher()
    build(tmp_path / "c", teacher, dataset, feature_names=names, top_k=top_k)
    num_classes, logits_size, features = shapes_of(teacher, (32, 48), names)
    estimate = teacher_cache_bytes(len(dataset), num_classes, logits_size, features, top_k)
    written, headers, files = data_and_headers(tmp_path / "c")
    assert written - headers == estimate
    assert headers <= 128 * files  # one .npy header per file, 128 bytes for these shapes
    meta = json.loads((tmp_path / "c" / "cache_meta.json").read_text())
    assert meta["disk_bytes"] == estimate and "disk_bytes" not in meta["key"]


def test_a_cache_that_would_not_fit_is_refused_before_the_teacher_runs_over_the_data(tmp_path, monkeypatch):
    dataset = make_synthetic_dataset(5, 48, 64, seed=1)
    teacher = tiny_teacher()
    num_classes, logits_size, features = shapes_of(teacher, (32, 48), ["stage2", "decoder"])
    needed = teacher_cache_bytes(5, num_classes, logits_size, features)
    inputs = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(kwargs.get("pixel_values", (
        args or (None,))[0])), with_kwargs=True)
    asked = free_space_of(monkeypatch, needed - 1)
    directory = tmp_path / "new" / "cache"
    for rank in (0, 1):  # every rank refuses, so none waits for the others at the barrier
        with pytest.raises(TeacherCacheSpaceError) as info:
            build(directory, teacher, dataset, rank=rank, world_size=2)
        assert isinstance(info.value, UserInputError)
    message = str(info.value)
    assert f"Teacher cache: 5 rows x ({num_classes} logits at 8x12 + feature stage2 16 at 4x6" in message
    assert format_bytes(needed) in message and f"{format_bytes(needed - 1)} free" in message
    for option in ("another --teacher_cache folder", "--teacher_cache_top_k K", "leave out --teacher_cache"):
        assert option in message
    assert asked and all(p == tmp_path for p in asked)  # the nearest existing folder of the target
    assert not directory.exists()  # nothing created
    # the teacher ran only on the blank image that gives the map sizes, never on a training image
    assert len(inputs) == 2 and all(x.shape[0] == 1 and not x.any() for x in inputs)

    free_space_of(monkeypatch, needed)  # exactly enough
    key = build(directory, teacher, dataset)
    TeacherCache(directory, expected_key=key)


def test_a_resumed_build_counts_only_its_missing_rows_and_a_complete_cache_needs_no_space(tmp_path, monkeypatch):
    dataset = make_synthetic_dataset(5, 48, 64, seed=1)
    teacher = tiny_teacher()
    directory = tmp_path / "c"
    build(directory, teacher, dataset, max_rows=2)
    meta_path = directory / "cache_meta.json"
    meta = json.loads(meta_path.read_text())
    per_row = meta["disk_bytes"] // 5
    del meta["disk_bytes"]  # a cache from before the field: resumes and opens all the same
    meta_path.write_text(json.dumps(meta))
    free_space_of(monkeypatch, 3 * per_row - 1)
    with pytest.raises(TeacherCacheSpaceError, match=r"(?s)of it still to write.*the cache would not fit"):
        build(directory, teacher, dataset)
    free_space_of(monkeypatch, 3 * per_row)
    key = build(directory, teacher, dataset)
    free_space_of(monkeypatch, 0)
    assert build(directory, teacher, dataset) == key  # complete: nothing to write, nothing checked
    assert len(TeacherCache(directory, expected_key=key)) == 5


def test_the_cache_script_refuses_with_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys):
    from c2vkd_hf.data.synthetic import SYNTHETIC_CLASSES
    from c2vkd_hf.jobs import EXIT_USER_ERROR, run_script
    from c2vkd_hf.models import load_student

    sys.path.insert(0, str(ROOT / "scripts"))
    import cache_teacher

    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    load_student("segformer-b0", dict(enumerate(SYNTHETIC_CLASSES)), config_overrides=TINY_SEGFORMER
                 ).save_pretrained(teacher_dir)
    free_space_of(monkeypatch, 1000)
    code = run_script(cache_teacher.main, [
        "--teacher_cache", str(tmp_path / "cache"), "--teacher_name_or_path", str(teacher_dir), "--method", "kd",
        "--synthetic_train_size", "4", "--synthetic_validation_size", "2", "--synthetic_height", "32",
        "--synthetic_width", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "error: --teacher_cache: Teacher cache: 4 rows x (6 logits at 8x8) float16 = " in err
    assert "1000 B free" in err and "Traceback" not in err
    assert not any((tmp_path / "cache").iterdir())  # the script's folder check made it; nothing written in it


def _mixed_sizes():
    return datasets.concatenate_datasets([make_synthetic_dataset(3, 24, 32, seed=5),
                                          make_synthetic_dataset(2, 30, 20, seed=6)])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_decoded_cache_bytes_is_what_a_build_writes(tmp_path, train):
    dataset = _mixed_sizes()
    args = DataArguments(resize_height=12, resize_width=16, min_scale=0.5, max_scale=1.5)
    transform = build_transform(args, (0.5,) * 3, (0.2,) * 3, train=train, seed=0 if train else None)
    originals = [(24, 32)] * 3 + [(30, 20)] * 2
    assert {stored_size(o, transform) for o in originals} == ({(18, 24), (18, 20)} if train else {(12, 16)})
    build_decoded_cache(tmp_path / "d", dataset, transform)
    estimate = decoded_cache_bytes(originals, transform)
    written, headers, files = data_and_headers(tmp_path / "d")
    assert written - headers == estimate and files == 4 and headers <= 128 * files
    meta = json.loads((tmp_path / "d" / "decoded_meta.json").read_text())
    assert meta["disk_bytes"] == estimate and "disk_bytes" not in meta["key"]


def test_a_decoded_cache_that_would_not_fit_is_refused_and_a_resume_counts_its_missing_rows(tmp_path, monkeypatch):
    dataset = make_synthetic_dataset(4, 24, 32, seed=5)
    transform = build_transform(DataArguments(), (0.5,) * 3, (0.2,) * 3, train=False)
    needed = decoded_cache_bytes([(24, 32)] * 4, transform)
    free_space_of(monkeypatch, needed - 1)
    with pytest.raises(DecodedCacheSpaceError) as info:
        build_decoded_cache(tmp_path / "root" / "d", dataset, transform)
    assert isinstance(info.value, UserInputError)
    message = str(info.value)
    assert "Decoded cache (eval): 4 rows x (image 3x24x32 + mask 24x32) uint8" in message
    assert "--decoded_cache_dir" in message and "--decoded_cache false" in message
    assert not (tmp_path / "root").exists()

    free_space_of(monkeypatch, needed)
    build_decoded_cache(tmp_path / "d", dataset, transform, max_rows=1)
    row = 4 * 24 * 32  # 3 h w image bytes + H W mask bytes
    free_space_of(monkeypatch, 3 * row - 1)
    with pytest.raises(DecodedCacheSpaceError, match="3 of 4 rows still to write"):
        build_decoded_cache(tmp_path / "d", dataset, transform)
    free_space_of(monkeypatch, 3 * row)
    build_decoded_cache(tmp_path / "d", dataset, transform)
    assert np.load(tmp_path / "d" / "rows_done.npy").all()


def test_overwriting_a_stale_cache_counts_the_space_its_files_free(tmp_path, monkeypatch):
    dataset = make_synthetic_dataset(5, 48, 64, seed=1)
    directory = tmp_path / "c"
    build(directory, tiny_teacher(seed=1), dataset)
    free_space_of(monkeypatch, 0)  # the same layout for another teacher fits in the blocks it replaces
    key = build(directory, tiny_teacher(seed=2), dataset, overwrite=True)
    TeacherCache(directory, expected_key=key)
    with pytest.raises(TeacherCacheSpaceError, match="counting the .* of the files it overwrites"):
        build(directory, tiny_teacher(seed=3), dataset, overwrite=True, reference_size=(128, 192))  # 16 x the bytes
