"""Data of mixed sizes and orientations: aspect-preserving resize, padded batches, evaluation at each image's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from c2vkd_hf.config import IGNORE_INDEX, DataArguments
from c2vkd_hf.data import (
    VALID_SIZES,
    SegmentationTransform,
    collate_fn,
    keep_ratio_size,
    load_segmentation_data,
    unpad_to_labels,
)
from c2vkd_hf.inference import evaluate_model
from c2vkd_hf.validation import UserInputError, check_ranges

from tiny import tiny_student


def test_keep_ratio_size_keeps_orientation():
    assert keep_ratio_size((240, 320), shortest_edge=120) == (120, 160)
    assert keep_ratio_size((320, 240), shortest_edge=120) == (160, 120)  # portrait stays portrait
    assert keep_ratio_size((213, 320), shortest_edge=120) == (120, 180)  # round(320 * 120 / 213) = 180
    assert keep_ratio_size((240, 320), longest_edge=160) == (120, 160)
    # both bounds: the smaller scale wins (mmseg's keep_ratio with a (long, short) scale)
    assert keep_ratio_size((100, 400), shortest_edge=100, longest_edge=200) == (50, 200)
    assert keep_ratio_size((30, 40)) == (30, 40)


def test_both_kinds_of_resize_are_refused_together():
    with pytest.raises(UserInputError, match="two ways to resize"):
        check_ranges({"resize_height": 120, "resize_width": 160, "resize_shortest_edge": 120})


def _transform(train: bool, **kw) -> SegmentationTransform:
    return SegmentationTransform(image_mean=(0.5,) * 3, image_std=(0.5,) * 3, train=train, shortest_edge=32, **kw)


def test_eval_transform_preserves_aspect_and_keeps_labels_at_full_size():
    image = PIL.Image.fromarray(np.zeros((96, 64, 3), np.uint8))  # portrait, 64 wide x 96 high
    label = PIL.Image.fromarray(np.ones((96, 64), np.uint8))
    pixel_values, labels, _ = _transform(False).transform_example(image, label)
    assert tuple(pixel_values.shape) == (3, 48, 32)
    assert tuple(labels.shape) == (96, 64)


def test_train_transform_crops_portrait_images_without_squashing():
    image = PIL.Image.fromarray(np.zeros((96, 64, 3), np.uint8))
    label = PIL.Image.fromarray(np.ones((96, 64), np.uint8))
    transform = _transform(True, crop=(32, 48), seed=0)
    pixel_values, labels, geometry = transform.transform_example(image, label, index=0)
    assert geometry.scaled_size == (48, 32)  # 32 x 48 (WxH) after the resize: still portrait
    assert tuple(pixel_values.shape) == (3, 32, 48)
    assert (labels[:, 32:] == IGNORE_INDEX).all()  # padded to the crop width with the ignore value


def test_collate_pads_mixed_sizes_and_records_them():
    a = {"pixel_values": torch.ones(3, 4, 6), "labels": torch.zeros(8, 12, dtype=torch.long)}
    b = {"pixel_values": torch.ones(3, 6, 4), "labels": torch.ones(12, 8, dtype=torch.long)}
    batch = collate_fn([a, b])
    assert tuple(batch["pixel_values"].shape) == (2, 3, 6, 6)
    assert tuple(batch["labels"].shape) == (2, 12, 12)
    assert batch["pixel_values"][0, :, 4:].abs().sum() == 0
    assert (batch["labels"][0, 8:] == IGNORE_INDEX).all() and (batch["labels"][1, :, 8:] == IGNORE_INDEX).all()
    assert batch[VALID_SIZES].tolist() == [[4, 6, 8, 12], [6, 4, 12, 8]]
    same = collate_fn([a, dict(a)])
    assert VALID_SIZES not in same  # nothing padded, nothing recorded


def test_unpad_to_labels_equals_per_image_interpolation():
    torch.manual_seed(0)
    maps = [torch.randn(1, 3, 5, 7), torch.randn(1, 3, 7, 4)]  # stride-2 maps of 10x14 and 14x8 images
    label_sizes = [(20, 28), (28, 16)]
    padded = torch.zeros(2, 3, 7, 7)
    padded[0, :, :5, :7] = maps[0]
    padded[1, :, :7, :4] = maps[1]
    sizes = torch.tensor([[10, 14, 20, 28], [14, 8, 28, 16]])
    out = unpad_to_labels(padded, sizes, (14, 14), (28, 28))
    for i, (m, (h, w)) in enumerate(zip(maps, label_sizes)):
        expected = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0]
        assert torch.allclose(out[i, :, :h, :w], expected, atol=1e-5)
        assert out[i, :, h:].abs().sum() == 0 and out[i, :, :, w:].abs().sum() == 0


def _folders(root: Path, sizes) -> DataArguments:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i, (h, w) in enumerate(sizes):
            PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
            PIL.Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(root / f"{split}annot" / f"{i}.png")
    (root / "classes.json").write_text('{"classes": ["sky", "road", "car"]}')
    return DataArguments(train_images=str(root / "train"), train_labels=str(root / "trainannot"),
                         validation_images=str(root / "val"), validation_labels=str(root / "valannot"),
                         labels_file=str(root / "classes.json"), resize_shortest_edge=32, decoded_cache=False)


def test_batched_evaluation_of_mixed_sizes_matches_one_image_at_a_time(tmp_path):
    """Landscape and portrait images of three sizes, evaluated in one padded batch and one by one: the
    same metrics when the model is pointwise (padding cannot leak into an image's logits)."""
    args = _folders(tmp_path, [(48, 72), (72, 48), (40, 80)])  # resized: 32x48, 48x32, 32x64 (even: stride 2)
    data = load_segmentation_data(args)
    transform = SegmentationTransform(image_mean=(0.5,) * 3, image_std=(0.5,) * 3, train=False, shortest_edge=32)
    validation = data.validation.with_transform(transform)

    class Pointwise(torch.nn.Module):  # logits at stride 2 that depend on the pixel only: padding cannot leak in
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, pixel_values):
            from transformers.modeling_outputs import SemanticSegmenterOutput
            return SemanticSegmenterOutput(logits=self.conv(F.avg_pool2d(pixel_values, 2)))

    torch.manual_seed(0)
    model = Pointwise()
    batched = evaluate_model(model, validation, 3, batch_size=3, progress=False)
    single = evaluate_model(model, validation, 3, batch_size=1, progress=False)
    assert batched["per_category_iou"] == pytest.approx(single["per_category_iou"], abs=1e-6)


def test_distillation_evaluation_batches_mixed_sizes(tmp_path):
    """The student's evaluation inside the trainer on a padded batch: one loss and mIoU, no size error."""
    from transformers import TrainingArguments

    from c2vkd_hf.losses import get_loss
    from c2vkd_hf.metrics import make_compute_metrics
    from c2vkd_hf.trainer import DistillationModel, DistillationTrainer

    args = _folders(tmp_path, [(48, 64), (64, 48)])
    data = load_segmentation_data(args)
    transform = SegmentationTransform(image_mean=(0.5,) * 3, image_std=(0.5,) * 3, train=False, shortest_edge=32)
    validation = data.validation.with_transform(transform)
    model = DistillationModel(tiny_student(), get_loss("none"), [])
    trainer = DistillationTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=2,
                                            report_to="none", use_cpu=True, batch_eval_metrics=True,
                                            label_names=["labels"], remove_unused_columns=False),
        eval_dataset=validation, data_collator=collate_fn, teacher=None,
        compute_metrics=make_compute_metrics(3, IGNORE_INDEX, {0: "sky", 1: "road", 2: "car"}))
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_mean_iou"] <= 1.0 and np.isfinite(metrics["eval_loss"])


def test_keep_ratio_teacher_cache_runs_the_teacher_at_each_images_own_shape(tmp_path):
    """Landscape and portrait images: each row is the teacher's output on the image at its own aspect-preserved size,
    resampled onto the canvas (the most common size); replaying the identity view of a portrait image gives back
    the teacher's output on that portrait image (resampled twice: close, not exact)."""
    import datasets as hf_datasets

    from c2vkd_hf.cache import TeacherCache, build_teacher_cache
    from c2vkd_hf.data import Geometry
    from c2vkd_hf.models import IMAGENET_MEAN, IMAGENET_STD

    shapes = [(48, 64), (48, 64), (64, 48)]  # two landscape, one portrait

    def smooth(h, w, phase):  # a natural-image-like (low-frequency) picture
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        channels = [np.sin(3 * x + phase + c) * np.cos(2 * y - c) for c in range(3)]
        return PIL.Image.fromarray(((np.stack(channels, -1) + 1) * 127).astype(np.uint8))

    images = [smooth(h, w, i) for i, (h, w) in enumerate(shapes)]
    dataset = hf_datasets.Dataset.from_dict({"image": images}, features=hf_datasets.Features(
        {"image": hf_datasets.Image()}))

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.config = type("C", (), {"model_type": "pointwise", "num_labels": 3})()

        def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
            from transformers.modeling_outputs import SemanticSegmenterOutput
            return SemanticSegmenterOutput(logits=self.conv(pixel_values))

    teacher = Pointwise()
    key = build_teacher_cache(tmp_path / "c", teacher, dataset, reference_size=None,
                              teacher_mean_std=(IMAGENET_MEAN, IMAGENET_STD), progress=False, batch_size=3,
                              keep_ratio=(32, None))
    assert key["reference_size"] == [32, 43] and key["keep_ratio"] == [32, None]  # the common (landscape) size
    cache = TeacherCache(tmp_path / "c", expected_key=key)
    transform = SegmentationTransform(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, train=False, shortest_edge=32)
    with torch.no_grad():
        landscape = teacher(transform({"image": [images[0]]})["pixel_values"][0][None]).logits
        portrait = teacher(transform({"image": [images[2]]})["pixel_values"][0][None]).logits
    stored, _ = cache.read([0, 2], [])
    torch.testing.assert_close(stored[:1], landscape, atol=2e-3, rtol=2e-3)  # the canvas's own size: exact
    replayed, _ = cache.replay([2], [Geometry((43, 32), (0, 0, 43, 32), False)], [])
    assert tuple(replayed.shape[-2:]) == (43, 32)
    error = (replayed - portrait).abs().mean() / portrait.abs().mean()
    assert error < 0.05  # the portrait view, resampled twice
