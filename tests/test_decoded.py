"""The decoded-dataset cache (c2vkd_hf/data/decoded.py): round trip, stale keys, interrupted builds, and
augmentation identical with and without it (geometry and labels exactly, pixels within rounding)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from c2vkd_hf.config import DataArguments
from c2vkd_hf.data import build_transform, load_segmentation_data, make_synthetic_dataset, with_example_index
from c2vkd_hf.data.decoded import (DecodedCacheError, DecodedDataset, DecodedSplit, build_decoded_cache, decoded_key,
                                   open_or_build, stored_size, use_decoded_cache)
from c2vkd_hf.data.transforms import image_tensor, label_tensor
from c2vkd_hf.jobs.common import datasets_for

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _transform(train: bool, seed=0, **kwargs):
    args = DataArguments(**{"resize_height": 12, "resize_width": 16, "min_scale": 0.5, "max_scale": 1.5, **kwargs})
    transform = build_transform(args, MEAN, STD, train=train, seed=seed if train else None)
    transform.return_index = transform.return_geometry = train
    return transform


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(6, 24, 32, seed=5)


def test_round_trip_stores_the_resized_images_and_the_original_masks(tmp_path, dataset):
    train = _transform(True)
    assert stored_size((24, 32), train) == (18, 24)  # resize 12x16 * max_scale 1.5, below the original
    assert stored_size((10, 40), train) == (10, 24)  # capped per side: never upsampled
    build_decoded_cache(tmp_path / "c", dataset, train)
    split = DecodedSplit(tmp_path / "c", expected_key=decoded_key(dataset, train))
    assert len(split) == 6 and split.nbytes == 6 * (3 * 18 * 24 + 24 * 32)
    for row in range(6):
        image, label, original = split.read(row)
        source = image_tensor(dataset[row]["image"])
        expected = TF.resize(source, [18, 24], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert original == (24, 32) and image.dtype == torch.uint8
        assert torch.equal(image, expected)
        assert torch.equal(label, label_tensor(dataset[row]["label"]))
    # the evaluation split is stored at the eval resize: its inputs are bit-identical to decoding the files
    evaluation = _transform(False)
    decoded = DecodedDataset(open_or_build(tmp_path / "root", dataset, evaluation), evaluation, indexed=False)
    direct = dataset.with_transform(evaluation)
    for row in range(6):
        assert torch.equal(decoded[row]["pixel_values"], direct[row]["pixel_values"])
        assert torch.equal(decoded[row]["labels"], direct[row]["labels"])
    # a data-loader worker gets the folder, not a copy of the arrays
    assert len(pickle.dumps(decoded)) < 4096


@pytest.mark.parametrize("max_scale", [1.5, 4.0])
def test_augmentation_is_identical_with_and_without_the_cache(tmp_path, dataset, max_scale):
    """Same Geometry, same labels and example indices; pixels equal up to the rounding of resizing twice
    (exactly equal when the cached copy is the original, max_scale 4)."""
    train = _transform(True, seed=3, max_scale=max_scale)
    train.epoch = 2
    decoded = DecodedDataset(open_or_build(tmp_path, dataset, train), train, indexed=True)
    direct = with_example_index(dataset).with_transform(train)
    std = torch.tensor(STD).view(3, 1, 1)
    for row in range(6):
        a, b = direct[row], decoded[row]
        assert a["geometry"] == b["geometry"] and a["example_index"] == b["example_index"] == row
        assert torch.equal(a["labels"], b["labels"])
        grey_levels = ((a["pixel_values"] - b["pixel_values"]).abs() * std * 255)
        if max_scale == 4.0:
            assert grey_levels.max() < 1e-3
        else:
            # synthetic images carry per-pixel noise, the worst case for resizing twice (CamVid: mean 1.5)
            assert grey_levels.mean() < 8 and grey_levels.max() <= 64


def test_a_stale_cache_is_refused_or_rebuilt_and_the_key_follows_the_file_contents(tmp_path, dataset):
    a, b = _transform(True), _transform(True, max_scale=2.0)
    folder = tmp_path / "c"
    key_a = build_decoded_cache(folder, dataset, a)
    key_b = decoded_key(dataset, b)
    with pytest.raises(DecodedCacheError, match="max_scale: cache has 1.5, this run has 2.0"):
        DecodedSplit(folder, expected_key=key_b)
    with pytest.raises(DecodedCacheError, match="refused"):
        build_decoded_cache(folder, dataset, b)
    assert DecodedSplit(folder, expected_key=key_a).key == key_a  # untouched
    build_decoded_cache(folder, dataset, b, overwrite=True)
    assert DecodedSplit(folder, expected_key=key_b).read(0)[0].shape == (3, 24, 32)  # 2 x 12x16, capped

    # local files: rewriting one image changes the key, so the cache root gets a new folder
    root = tmp_path / "data"
    for split in ("train", "val"):
        for i in range(2):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(root / split / f"{i}.png")
            PIL.Image.fromarray(np.full((24, 32), i, np.uint8)).save(root / f"{split}annot" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps(["a", "b"]))
    args = DataArguments(dataset_name=str(root), resize_height=12, resize_width=16)
    assert use_decoded_cache(args) and not use_decoded_cache(DataArguments(dataset_name=str(root), decoded_cache=False))
    first = decoded_key(load_segmentation_data(args).train, a)
    PIL.Image.fromarray(np.full((24, 32, 3), 99, np.uint8)).save(root / "train" / "1.png")
    second = decoded_key(load_segmentation_data(args).train, a)
    assert first["images_sha256"] != second["images_sha256"] and first["labels_sha256"] == second["labels_sha256"]


def test_an_interrupted_build_resumes_and_is_never_read_half_written(tmp_path, dataset):
    train = _transform(True)
    build_decoded_cache(tmp_path / "full", dataset, train)
    partial = tmp_path / "partial"
    build_decoded_cache(partial, dataset, train, max_rows=2)  # "killed" after 2 rows
    with pytest.raises(DecodedCacheError, match="incomplete \\(4 of 6 rows missing"):
        DecodedSplit(partial)
    done_before = np.load(partial / "rows_done.npy").copy()
    build_decoded_cache(partial, dataset, train)  # resumes: the 4 missing rows
    assert done_before.sum() == 2 and np.load(partial / "rows_done.npy").all()
    for name in ("images.npy", "labels.npy", "index.npy"):
        assert np.array_equal(np.load(partial / name), np.load(tmp_path / "full" / name)), name


def test_the_pipeline_reads_the_decoded_cache_by_default_and_not_when_off(tmp_path):
    args = DataArguments(synthetic_train_size=4, synthetic_validation_size=2, synthetic_height=24,
                         synthetic_width=32, resize_height=12, resize_width=16, decoded_cache_dir=str(tmp_path))
    data = load_segmentation_data(args)
    train, validation, _ = datasets_for(data, args, MEAN, STD, seed=0, with_views=True)
    assert isinstance(train, DecodedDataset) and isinstance(validation, DecodedDataset)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["eval", "train"]
    args.decoded_cache = False
    plain, plain_validation, _ = datasets_for(data, args, MEAN, STD, seed=0, with_views=True)
    assert not isinstance(plain, DecodedDataset)
    for row in range(4):
        assert train[row]["geometry"] == plain[row]["geometry"]
        assert torch.equal(train[row]["labels"], plain[row]["labels"])
    assert torch.equal(validation[1]["pixel_values"], plain_validation[1]["pixel_values"])


def test_a_file_truncated_under_the_cache_is_refused_and_rebuilt(tmp_path, dataset):
    """``images.npy`` cut short after the build (a full disk, a copy that stopped): opening the folder refuses it,
    naming the file, and the pipeline's open-or-build rebuilds it instead of reading it half-way into training.
    (Before: the folder opened and the first read of a missing row failed mid-training.)"""
    from c2vkd_hf.data.decoded import IMAGES_NAME, open_or_build

    train = _transform(True)
    first = open_or_build(tmp_path, dataset, train)
    expected = first.read(3)[0].clone()
    path = first.directory / IMAGES_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DecodedCacheError, match=f"{IMAGES_NAME} is truncated or unreadable"):
        DecodedSplit(first.directory)
    again = open_or_build(tmp_path, dataset, train)
    assert torch.equal(again.read(3)[0], expected)
