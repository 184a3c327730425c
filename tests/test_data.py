"""Tests of c2vkd_hf.data: sources, label mapping, validation errors, synthetic data, transforms."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from c2vkd_hf.config import IGNORE_INDEX, DataArguments
from c2vkd_hf.data import (
    SYNTHETIC_CLASSES,
    DataValidationError,
    Geometry,
    apply_geometry,
    build_transform,
    collate_fn,
    colorize,
    default_palette,
    load_labels_file,
    load_segmentation_data,
    make_synthetic_dataset,
    rgb_to_index,
    sample_geometry,
    source_paths,
    with_example_index,
    AugmentationEpochCallback,
)

H, W = 8, 10
CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ------------------------------------------------------------------------------------------ helpers


def save_image(path: Path, seed: int = 0, size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path: Path, values=(0, 1, 2), size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.asarray(values, dtype=np.uint8), size[0] * size[1]).reshape(size)
    PIL.Image.fromarray(arr, mode="L").save(path)
    return path


def make_folders(root: Path, stems=("a", "b"), values=(0, 1, 2), labels=("road", "car", "sky")) -> DataArguments:
    """train/val image and mask folders under root plus a list-style labels file."""
    for split in ("train", "val"):
        for i, stem in enumerate(stems):
            save_image(root / split / f"{stem}.png", seed=i)
            save_mask(root / f"{split}annot" / f"{stem}.png", values)
    (root / "labels.json").write_text(json.dumps(list(labels)))
    return DataArguments(
        train_images=str(root / "train"),
        train_labels=str(root / "trainannot"),
        validation_images=str(root / "val"),
        validation_labels=str(root / "valannot"),
        labels_file=str(root / "labels.json"),
    )


def label_values(dataset, i=0) -> set[int]:
    return set(np.unique(np.asarray(dataset[i]["label"])).tolist())


# ------------------------------------------------------------------------------------------ folders


def test_folder_pairing_by_stem(tmp_path):
    root = tmp_path / "mydata"
    args = make_folders(root, stems=("a", "b", "c"))
    # an image in another format pairs with a PNG mask of the same stem; stray non-images are ignored
    (root / "train" / "c.png").unlink()
    PIL.Image.open(root / "val" / "c.png").save(root / "train" / "c.jpg", quality=95)
    (root / "train" / "notes.txt").write_text("not an image")
    data = load_segmentation_data(args)
    assert data.name == "mydata"
    assert data.id2label == {0: "road", 1: "car", 2: "sky"}
    assert data.num_labels == 3 and data.label2id["sky"] == 2
    assert len(data.train) == 3 and len(data.validation) == 3
    example = data.train[2]
    assert example["image"].mode == "RGB" and example["image"].size == (W, H)
    assert example["label"].mode == "L" and example["label"].size == (W, H)
    image_path, label_path = source_paths(data.train, 2)
    assert image_path.endswith("c.jpg") and label_path.endswith("c.png")
    assert label_values(data.train) == {0, 1, 2}


def test_max_samples_truncation(tmp_path):
    args = make_folders(tmp_path / "d", stems=("a", "b", "c"))
    args.max_train_samples, args.max_eval_samples = 2, 1
    data = load_segmentation_data(args)
    assert (len(data.train), len(data.validation)) == (2, 1)


def test_labels_file_formats(tmp_path):
    p = tmp_path / "l.json"
    p.write_text(json.dumps(["a", "b"]))
    assert load_labels_file(p) == ({0: "a", 1: "b"}, None, None)
    p.write_text(json.dumps({"classes": ["a", "b"], "ignore_index": 11, "palette_rgb": [[1, 2, 3], [4, 5, 6]]}))
    assert load_labels_file(p) == ({0: "a", 1: "b"}, 11, [(1, 2, 3), (4, 5, 6)])
    p.write_text(json.dumps({"1": "b", "0": "a"}))  # id2label.json style
    assert load_labels_file(p)[0] == {0: "a", 1: "b"}
    p.write_text(json.dumps({"0": "a", "2": "c"}))
    with pytest.raises(DataValidationError, match="without gaps"):
        load_labels_file(p)
    p.write_text("{not json")
    with pytest.raises(DataValidationError, match="l.json"):
        load_labels_file(p)
    with pytest.raises(DataValidationError, match="missing.json"):
        load_labels_file(tmp_path / "missing.json")


def test_void_value_is_mapped_to_ignore(tmp_path):
    args = make_folders(tmp_path / "d", values=(0, 1, 2))
    Path(args.labels_file).write_text(json.dumps({"classes": ["road", "car"], "ignore_index": 2}))
    data = load_segmentation_data(args)
    assert data.dataset_ignore_index == 2 and data.num_labels == 2
    assert label_values(data.train) == {0, 1, IGNORE_INDEX}
    assert label_values(data.validation) == {0, 1, IGNORE_INDEX}
    # the flag overrides the labels file: now 0 is void and 2 would be out of range
    args.dataset_ignore_index = 0
    with pytest.raises(DataValidationError, match=r"\[2\]"):
        load_segmentation_data(args)


def test_reduce_labels(tmp_path):
    args = make_folders(tmp_path / "d", values=(0, 1, 2, 255), labels=("car", "sky"))
    args.reduce_labels = True
    data = load_segmentation_data(args)
    mask = np.asarray(data.train[0]["label"]).ravel()
    np.testing.assert_array_equal(mask[:4], [255, 0, 1, 255])


# ------------------------------------------------------------------------------------------ errors


def _break_bad_values(root: Path):
    save_mask(root / "trainannot" / "b.png", values=(0, 1, 7))
    return "b.png", r"\[7\].*K=3"


def _break_truncated_image(root: Path):
    path = root / "train" / "b.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "b.png", "cannot be read"


def _break_truncated_mask(root: Path):
    path = root / "valannot" / "a.png"
    path.write_bytes(path.read_bytes()[:40])
    return "a.png", "cannot be read"


def _break_size_mismatch(root: Path):
    save_mask(root / "valannot" / "b.png", size=(H + 1, W))
    return "b.png", "10x8.*10x9"


def _break_unpaired(root: Path):
    (root / "trainannot" / "a.png").unlink()
    save_mask(root / "trainannot" / "zz.png")
    return "a.png", "no mask.*zz.png|zz.png.*no image"


def _break_empty(root: Path):
    for f in (root / "val").iterdir():
        f.unlink()
    return "val", "empty"


def _break_missing_folder(root: Path):
    for f in (root / "valannot").iterdir():
        f.unlink()
    (root / "valannot").rmdir()
    return "valannot", "does not exist"


def _break_rgb_mask(root: Path):
    save_image(root / "trainannot" / "a.png")
    return "a.png", "palette"


def _break_labels_file(root: Path):
    (root / "labels.json").unlink()
    return "labels.json", "does not exist"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_bad_values,
        _break_truncated_image,
        _break_truncated_mask,
        _break_size_mismatch,
        _break_unpaired,
        _break_empty,
        _break_missing_folder,
        _break_rgb_mask,
        _break_labels_file,
    ],
    ids=lambda f: f.__name__[len("_break_"):],
)
def test_validation_errors_name_the_file(tmp_path, breaker):
    args = make_folders(tmp_path / "d")
    name, pattern = breaker(tmp_path / "d")
    with pytest.raises(DataValidationError) as info:
        load_segmentation_data(args)
    message = str(info.value)
    assert name in message
    assert re.search(pattern, message, flags=re.S), message


def test_grey_rgb_mask_is_accepted(tmp_path):
    args = make_folders(tmp_path / "d")
    arr = np.asarray(PIL.Image.open(tmp_path / "d" / "trainannot" / "a.png"))
    PIL.Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "d" / "trainannot" / "a.png")
    data = load_segmentation_data(args)
    assert data.train[0]["label"].mode == "L"
    np.testing.assert_array_equal(np.asarray(data.train[0]["label"]), arr)


def test_missing_labels_file_argument(tmp_path):
    args = make_folders(tmp_path / "d")
    args.labels_file = None
    with pytest.raises(DataValidationError, match="--labels_file"):
        load_segmentation_data(args)


def test_segnet_layout_from_dataset_name(tmp_path):
    root = tmp_path / "street"
    make_folders(root, labels=("road", "car"))
    (root / "classes.json").write_text(json.dumps({"classes": ["road", "car"], "ignore_index": 2}))
    data = load_segmentation_data(DataArguments(dataset_name=str(root)))
    assert data.name == "street" and data.num_labels == 2
    assert IGNORE_INDEX in label_values(data.train)


# ------------------------------------------------------------------------------------------ datasets sources


def _hub_style_dict(values=(1, 2, 3)) -> datasets.DatasetDict:
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"img": datasets.Image(), "annotation": datasets.Image(), "extra": datasets.Value("int32")}
    )

    def split(n):
        masks = [np.resize(np.asarray(values, np.uint8), H * W).reshape(H, W) for _ in range(n)]
        images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]
        return datasets.Dataset.from_dict(
            {"img": [PIL.Image.fromarray(a) for a in images],
             "annotation": [PIL.Image.fromarray(m, mode="L") for m in masks], "extra": list(range(n))},
            features=features,
        )

    return datasets.DatasetDict({"train": split(3), "val": split(2)})


def test_saved_dataset_with_id2label_json(tmp_path):
    path = tmp_path / "saved"
    _hub_style_dict().save_to_disk(str(path))
    (path / "id2label.json").write_text(json.dumps({"0": "background", "1": "road", "2": "car"}))
    args = DataArguments(dataset_name=str(path), image_column="img", label_column="annotation",
                         reduce_labels=True, max_train_samples=2)
    data = load_segmentation_data(args)
    assert data.name == "saved" and data.num_labels == 3
    assert data.train.column_names == ["image", "label"] and len(data.train) == 2 and len(data.validation) == 2
    assert data.train[0]["image"].mode == "RGB" and data.train[0]["label"].mode == "L"
    assert label_values(data.train) == {0, 1, 2}  # 1, 2, 3 reduced


def test_hub_style_errors_name_split_and_row(tmp_path):
    path = tmp_path / "saved"
    _hub_style_dict(values=(1, 2, 9)).save_to_disk(str(path))
    args = DataArguments(dataset_name=str(path), image_column="img", label_column="annotation")
    with pytest.raises(DataValidationError, match="id2label"):
        load_segmentation_data(args)
    (path / "id2label.json").write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(DataValidationError, match=r"split 'train', row 0.*\[9\]"):
        load_segmentation_data(args)
    args.label_column = "nope"
    with pytest.raises(DataValidationError, match="no column 'nope'"):
        load_segmentation_data(args)


def test_local_parquet_via_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    dd = _hub_style_dict(values=(0, 1, 255))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    for split, name in (("train", "train"), ("val", "validation")):
        dd[split].to_parquet(str(tmp_path / "pq" / "data" / f"{name}-00000-of-00001.parquet"))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["road", "car"]))
    data = load_segmentation_data(DataArguments(dataset_name=str(tmp_path / "pq"), image_column="img",
                                                label_column="annotation", labels_file=str(labels)))
    assert data.name == "pq" and len(data.train) == 3 and len(data.validation) == 2
    assert label_values(data.validation) == {0, 1, IGNORE_INDEX}


def test_class_label_feature_gives_names(tmp_path):
    dd = _hub_style_dict(values=(0, 1))
    dd = dd.cast_column("extra", datasets.ClassLabel(names=["road", "car", "sky"]))
    path = tmp_path / "cl"
    dd.save_to_disk(str(path))
    data = load_segmentation_data(DataArguments(dataset_name=str(path), image_column="img", label_column="annotation"))
    assert data.id2label == {0: "road", 1: "car", 2: "sky"}


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_fast():
    start = time.process_time()  # this process's CPU time: other jobs on a shared machine do not count
    a = make_synthetic_dataset(64, 64, 64, seed=3)
    elapsed = time.process_time() - start
    assert elapsed < 2.0, elapsed  # spec: < 1 s; slack for a slower CPU
    b = make_synthetic_dataset(2, 64, 64, seed=3)
    c = make_synthetic_dataset(2, 64, 64, seed=4)
    for i in range(2):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
        assert np.array_equal(np.asarray(a[i]["label"]), np.asarray(b[i]["label"]))
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(c[0]["image"]))
    assert a[0]["image"].mode == "RGB" and a[0]["label"].mode == "L"


def test_synthetic_class_coverage_and_any_size():
    ds = make_synthetic_dataset(16, 48, 72, seed=0)
    counts = np.zeros(256, dtype=np.int64)
    for example in ds:
        assert example["image"].size == (72, 48)
        counts += np.bincount(np.asarray(example["label"]).ravel(), minlength=256)
    assert set(np.flatnonzero(counts)) == set(range(len(SYNTHETIC_CLASSES)))
    assert counts[: len(SYNTHETIC_CLASSES)].min() / counts.sum() > 0.002  # every class really present


def test_synthetic_source_splits_are_disjoint():
    args = DataArguments(synthetic_train_size=4, synthetic_validation_size=3, synthetic_height=16,
                         synthetic_width=20, max_eval_samples=2)
    data = load_segmentation_data(args)
    assert data.name == "synthetic" and data.id2label == dict(enumerate(SYNTHETIC_CLASSES))
    assert (len(data.train), len(data.validation)) == (4, 2)
    assert data.train[0]["image"].size == (20, 16)
    assert not np.array_equal(np.asarray(data.train[0]["image"]), np.asarray(data.validation[0]["image"]))


# ------------------------------------------------------------------------------------------ transforms

COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], dtype=np.uint8)


def _coded_example(h=24, w=32):
    """Image whose colour encodes the label: asymmetric blocks, so a one-sided flip is detected."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[:, : w // 4] = 1
    label[h // 2 :, w // 4 : w // 2] = 2
    label[: h // 3, w - w // 3 :] = 3
    return PIL.Image.fromarray(COLOURS[label]), PIL.Image.fromarray(label, mode="L")


def test_train_transform_keeps_image_label_correspondence():
    image, label = _coded_example()
    args = DataArguments(crop_height=20, crop_width=28, min_scale=0.5, max_scale=1.8)
    transform = build_transform(args, MEAN, STD, train=True)
    transform.return_geometry = True
    torch.manual_seed(0)
    flips = 0
    for _ in range(12):
        out = transform({"image": [image], "label": [label]})
        pv, lab, geometry = out["pixel_values"][0], out["labels"][0], out["geometry"][0]
        assert pv.shape == (3, 20, 28) and pv.dtype == torch.float32
        assert lab.shape == (20, 28) and lab.dtype == torch.long
        flips += geometry.flip
        rgb = (pv * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
        distance = (rgb.permute(1, 2, 0)[..., None, :] - torch.tensor(COLOURS, dtype=torch.float32)) ** 2
        nearest = distance.sum(-1).argmin(-1)
        valid = lab != IGNORE_INDEX
        agreement = (nearest[valid] == lab[valid]).float().mean().item()
        assert agreement > 0.9, (agreement, geometry)
        assert torch.all(pv[:, ~valid] == 0)  # padding is the mean colour
    assert 0 < flips < 12


def test_train_transform_pads_with_ignore():
    image, label = _coded_example(16, 20)
    args = DataArguments(min_scale=0.5, max_scale=0.5, hflip=False)  # crop defaults to the image size
    out = build_transform(args, MEAN, STD, train=True)({"image": [image], "label": [label]})
    pv, lab = out["pixel_values"][0], out["labels"][0]
    assert pv.shape == (3, 16, 20) and lab.shape == (16, 20)
    assert torch.all(lab[8:, :] == IGNORE_INDEX) and torch.all(lab[:, 10:] == IGNORE_INDEX)
    assert torch.all(lab[:8, :10] != IGNORE_INDEX)
    assert torch.all(pv[:, 8:, :] == 0)


def test_train_transform_resize_then_crop_default():
    image, label = _coded_example(24, 32)
    args = DataArguments(resize_height=12, resize_width=16)
    out = build_transform(args, MEAN, STD, train=True)({"image": [image], "label": [label]})
    assert out["pixel_values"][0].shape == (3, 12, 16) and out["labels"][0].shape == (12, 16)


def test_eval_transform_label_resolution():
    image, label = _coded_example(24, 32)
    batch = {"image": [image], "label": [label]}
    full = build_transform(DataArguments(resize_height=12, resize_width=16), MEAN, STD, train=False)(batch)
    assert full["pixel_values"][0].shape == (3, 12, 16)
    assert torch.equal(full["labels"][0], torch.from_numpy(np.array(label)).long())
    low = build_transform(DataArguments(resize_height=12, resize_width=16, eval_full_resolution=False),
                          MEAN, STD, train=False)(batch)
    assert low["labels"][0].shape == (12, 16)
    assert torch.equal(low["labels"][0], torch.from_numpy(np.array(label)[1::2, 1::2]).long())


def test_with_transform_and_collate(tmp_path):
    ds = make_synthetic_dataset(3, 16, 20, seed=0)
    args = DataArguments(crop_height=8, crop_width=12)
    batch = collate_fn([ds.with_transform(build_transform(args, MEAN, STD, True))[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 12) and batch["labels"].shape == (3, 8, 12)
    assert batch["labels"].dtype == torch.long
    examples = [{"pixel_values": torch.zeros(3, 4, 4), "labels": torch.zeros(4, 4, dtype=torch.long)},
                {"pixel_values": torch.zeros(3, 4, 4), "labels": torch.zeros(5, 4, dtype=torch.long)}]
    padded = collate_fn(examples)  # labels of different sizes (evaluation at full resolution): padded, recorded
    assert padded["labels"].shape == (2, 5, 4) and (padded["labels"][0, 4] == IGNORE_INDEX).all()
    assert padded["valid_sizes"].tolist() == [[4, 4, 4, 4], [4, 4, 5, 4]]


def test_geometry_replays_on_lower_resolution_maps():
    torch.manual_seed(1)
    geometry = sample_geometry((24, 32), (16, 16), 0.8, 1.2, hflip=True)
    assert isinstance(geometry, Geometry) and geometry.output_size == (16, 16)
    labels = torch.arange(4).repeat_interleave(8).view(1, 32).expand(24, 32)  # 4 vertical stripes
    logits = torch.nn.functional.one_hot(labels[::4, ::4], 4).permute(2, 0, 1).float()  # (4, 6, 8)
    a = apply_geometry(labels, geometry, "nearest", fill=IGNORE_INDEX)
    b = apply_geometry(logits, geometry, "bilinear").argmax(0)
    valid = a != IGNORE_INDEX
    assert (a[valid] == b[valid]).float().mean() > 0.8


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index():
    """A seeded train transform draws each example's geometry from (seed, epoch, index): the global
    RNG, the batch an example arrives in and the order do not matter; epochs and seeds differ."""
    args = DataArguments(synthetic_train_size=6, synthetic_validation_size=1, synthetic_height=24,
                         synthetic_width=32, min_scale=0.5, max_scale=2.0, hflip=True)
    data = load_segmentation_data(args)
    train = with_example_index(data.train)
    assert train["example_index"] == list(range(6)) and with_example_index(train) is train

    def views(seed, epoch, order, chunk):
        transform = build_transform(args, MEAN, STD, train=True, seed=seed)
        transform.epoch = epoch
        transform.return_geometry = True
        ds = train.select(order).with_transform(transform)
        out = {}
        for start in range(0, len(order), chunk):
            batch = ds[start:start + chunk]
            for i, g, pv in zip(order[start:start + chunk], batch["geometry"], batch["pixel_values"]):
                out[i] = (g, pv)
        return out

    torch.manual_seed(0)
    a = views(3, 1, [0, 1, 2, 3, 4, 5], 6)
    torch.manual_seed(123)  # a different global RNG state, order and batching
    b = views(3, 1, [5, 2, 0, 4, 1, 3], 2)
    for i in range(6):
        assert a[i][0] == b[i][0]
        torch.testing.assert_close(a[i][1], b[i][1])
    geometries = [a[i][0] for i in range(6)]
    assert len(set(geometries)) > 1, "examples of one epoch must get different views"
    other_epoch = views(3, 2, list(range(6)), 6)
    other_seed = views(4, 1, list(range(6)), 6)
    assert [other_epoch[i][0] for i in range(6)] != geometries
    assert [other_seed[i][0] for i in range(6)] != geometries

    class State:
        epoch = 2.9999999
    transform = build_transform(args, MEAN, STD, train=True, seed=3)
    AugmentationEpochCallback(transform).on_epoch_begin(None, State(), None)
    assert transform.epoch == 3


# ------------------------------------------------------------------------------------------ palettes


def test_palette_and_colorize():
    assert default_palette(12) == default_palette(12) and len(set(default_palette(12))) == 12
    mask = np.array([[0, 1], [255, 7]], dtype=np.uint8)
    out = np.asarray(colorize(mask, [(1, 2, 3), (4, 5, 6)]))
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [1, 2, 3] and out[0, 1].tolist() == [4, 5, 6]
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]
    back = np.asarray(rgb_to_index(out, [(1, 2, 3), (4, 5, 6)]))
    np.testing.assert_array_equal(back, [[0, 1], [255, 255]])


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid not found at {CAMVID} (../shared/data/camvid)")
def test_camvid_folders():
    args = DataArguments(
        train_images=str(CAMVID / "train"),
        train_labels=str(CAMVID / "trainannot"),
        validation_images=str(CAMVID / "val"),
        validation_labels=str(CAMVID / "valannot"),
        labels_file=str(CAMVID / "classes.json"),
        max_train_samples=3,
        max_eval_samples=2,
    )
    data = load_segmentation_data(args)
    assert data.name == "camvid" and data.num_labels == 11 and data.dataset_ignore_index == 11
    assert len(data.train) == 3 and len(data.validation) == 2 and data.palette is not None
    _, label_path = source_paths(data.train, 0)
    raw = np.asarray(PIL.Image.open(label_path))
    mapped = np.asarray(data.train[0]["label"])
    assert 11 in raw and 11 not in mapped
    np.testing.assert_array_equal(mapped == IGNORE_INDEX, raw == 11)
    np.testing.assert_array_equal(mapped[raw != 11], raw[raw != 11])
