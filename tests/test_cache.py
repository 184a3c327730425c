"""Teacher-output cache: round trip, geometric replay, interrupted builds, stale caches, top-k, distill.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSemanticSegmentation

from c2vkd_hf.cache import (DONE_NAME, TeacherCache, TeacherCacheError, build_teacher_cache, replay_maps,
                            topk_compress, topk_expand)
from c2vkd_hf.data import Geometry, SegmentationTransform, apply_geometry, make_synthetic_dataset
from c2vkd_hf.models import IMAGENET_MEAN, IMAGENET_STD, forward_features
from c2vkd_hf.teacher import CachedTeacher, LiveTeacher
from tiny import TINY_SEGFORMER_JSON, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
MEAN_STD = (IMAGENET_MEAN, IMAGENET_STD)


class PointwiseTeacher(nn.Module):
    """A linear per-pixel teacher (1x1 convolutions, no nonlinearity): it commutes with crops, flips
    and bilinear resampling, so replayed cached outputs must equal its online outputs."""

    def __init__(self, seed: int = 0, num_labels: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(model_type="pointwise", num_labels=num_labels)
        self.features = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, num_labels, 1)

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        features = self.features(pixel_values)
        return SimpleNamespace(logits=self.head(features), hidden_states=(features,))


def build(directory, teacher, dataset, **kwargs):
    options = dict(reference_size=None, teacher_mean_std=MEAN_STD, feature_names=["stage1"], progress=False,
                   batch_size=4)
    options.update(kwargs)
    return build_teacher_cache(directory, teacher, dataset, **options)


def normalised(dataset, size=None):
    transform = SegmentationTransform(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, train=False, resize=size)
    return torch.stack(transform({"image": list(dataset["image"])})["pixel_values"])


def test_round_trip_equals_the_teacher_at_the_reference_geometry(tmp_path):
    dataset = make_synthetic_dataset(6, 48, 64, seed=1)
    teacher = tiny_teacher()
    key = build(tmp_path / "c", teacher, dataset, reference_size=(32, 48), feature_names=["stage2", "stage4"])
    cache = TeacherCache(tmp_path / "c", expected_key=key)
    with torch.no_grad():
        logits, features = forward_features(teacher, normalised(dataset, (32, 48)))
    cached_logits, cached_features = cache.read(range(6), ["stage2", "stage4"])
    assert cached_logits.shape == logits.shape and cached_features[1].shape == features["stage4"].shape
    torch.testing.assert_close(cached_logits, logits, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached_features[0], features["stage2"], atol=5e-3, rtol=2e-3)
    torch.testing.assert_close(cached_features[1], features["stage4"], atol=5e-3, rtol=2e-3)
    # replaying the identity view gives the stored rows back
    identity = Geometry((32, 48), (0, 0, 32, 48), False)
    replayed, _ = cache.replay([4, 2], [identity, identity], ["stage4"])
    torch.testing.assert_close(replayed, cached_logits[[4, 2]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("geometry", [
    Geometry((32, 40), (0, 0, 32, 40), True),  # flip
    Geometry((32, 40), (5, 7, 24, 24), False),  # crop
    Geometry((32, 40), (3, 11, 24, 24), True),  # crop + flip
])
def test_replay_matches_the_online_teacher_for_an_equivariant_teacher(tmp_path, geometry):
    dataset = make_synthetic_dataset(4, 32, 40, seed=2)
    teacher = PointwiseTeacher()
    build(tmp_path / "c", teacher, dataset)
    cache = TeacherCache(tmp_path / "c")
    transform = SegmentationTransform(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, train=True,
                                      crop=geometry.output_size)
    transform.geometry_for = lambda size, index=None: geometry  # the view under test
    views = transform({"image": list(dataset["image"])})
    with torch.no_grad():
        online = teacher(torch.stack(views["pixel_values"]))
    logits, (features,) = cache.replay(range(4), [geometry] * 4, ["stage1"])
    torch.testing.assert_close(logits, online.logits, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(features, online.hidden_states[0], atol=3e-3, rtol=3e-3)
    assert not torch.allclose(logits, cache.replay(range(4), [Geometry((32, 40), (0, 0) + geometry.output_size,
                                                                      not geometry.flip)] * 4)[0], atol=1e-2)


def test_replay_agrees_with_apply_geometry_and_with_the_analytic_view_at_a_stride():
    # at full resolution and scale 1, replay is exactly the data pipeline's crop + flip
    maps = torch.randn(2, 3, 20, 30)
    g = Geometry((20, 30), (4, 6, 12, 16), True)
    torch.testing.assert_close(replay_maps(maps, [g, g], (20, 30)), apply_geometry(maps, g), atol=1e-5, rtol=0)
    # a stride-4 map of a linear ramp (a function of the position as a fraction of the image): bilinear
    # resampling reproduces it exactly away from the border, so each replayed cell must hold the ramp's
    # value at that cell's centre in the original image, under rescale, crop and flip
    h, w = 10, 12  # stride-4 map of a 40x48 reference view
    fy = (torch.arange(h) + 0.5) / h
    fx = (torch.arange(w) + 0.5) / w
    ramp = torch.stack([fy[:, None].expand(h, w), fx[None, :].expand(h, w)])[None]
    g = Geometry((60, 72), (8, 12, 40, 48), True)  # scale 1.5, crop, flip
    out = replay_maps(ramp, [g], (40, 48))[0]
    assert out.shape == (2, 10, 12)
    cy = (torch.arange(10) + 0.5) * 4
    cx = 48 - (torch.arange(12) + 0.5) * 4
    expected_y = ((8 + cy) / 60)[:, None].expand(10, 12)
    expected_x = ((12 + cx) / 72)[None, :].expand(10, 12)
    inner = (expected_y > 0.5 / h) & (expected_y < 1 - 0.5 / h) & (expected_x > 0.5 / w) & (expected_x < 1 - 0.5 / w)
    torch.testing.assert_close(out[0][inner], expected_y[inner], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1][inner], expected_x[inner], atol=1e-5, rtol=0)
    # the padding of a down-scaled view replays as 0
    small = Geometry((30, 36), (0, 0, 40, 48), False)
    padded = replay_maps(ramp + 1, [small], (40, 48))[0]
    assert (padded[:, -2:] == 0).all() and (padded[:, :7, :9] > 0).all()


def test_teacher_input_scale_replays_the_larger_teacher_view(tmp_path):
    # a cache built at twice the reference size (--teacher_input_scale 2) replays each view at the teacher's
    # stride of the doubled view: for a pointwise teacher, what the online teacher gives on the student's view
    # upsampled 2x (the trainer's online path), away from the crop's border
    dataset = make_synthetic_dataset(4, 32, 40, seed=3)
    teacher = PointwiseTeacher()
    build(tmp_path / "c", teacher, dataset, reference_size=(64, 80))
    cache = TeacherCache(tmp_path / "c")
    identity = Geometry((32, 40), (0, 0, 32, 40), False)
    logits, _ = cache.replay([1, 3], [identity] * 2, view_scale=2.0)
    assert logits.shape[-2:] == (64, 80)
    torch.testing.assert_close(logits, cache.read([1, 3])[0], atol=1e-5, rtol=0)
    geometry = Geometry((32, 40), (4, 8, 24, 24), True)
    transform = SegmentationTransform(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, train=True,
                                      crop=geometry.output_size)
    transform.geometry_for = lambda size, index=None: geometry
    views = torch.stack(transform({"image": list(dataset["image"])})["pixel_values"])
    # the trainer's two teacher sources: the live teacher enlarges the view, the cached one replays it
    online, _ = LiveTeacher(teacher, input_scale=2.0).outputs({"pixel_values": views})
    replayed, _ = CachedTeacher(cache, input_scale=2.0).outputs(
        {"pixel_values": views, "example_index": torch.arange(4), "geometry": [geometry] * 4})
    assert replayed.shape == online.shape == (4, 3, 48, 48)
    torch.testing.assert_close(replayed[..., 2:-2, 2:-2], online[..., 2:-2, 2:-2], atol=3e-2, rtol=3e-2)
    # without the scale the same cache replays at the student's size, and differs
    assert cache.replay(range(4), [geometry] * 4)[0].shape[-2:] == (24, 24)


def test_an_interrupted_build_resumes_and_never_serves_half_written_rows(tmp_path):
    dataset = make_synthetic_dataset(10, 32, 32, seed=3)
    teacher = PointwiseTeacher()
    full = tmp_path / "full"
    build(full, teacher, dataset)
    reference = TeacherCache(full).read(range(10))

    partial = tmp_path / "partial"
    build(partial, teacher, dataset, max_rows=5)  # "killed" after 5 rows
    with pytest.raises(TeacherCacheError, match="incomplete.*5 of 10 rows missing"):
        TeacherCache(partial)
    # a row whose data were being written when the process died: marker unset, data garbage
    done = np.load(partial / DONE_NAME, mmap_mode="r+")
    done[2] = 0
    done.flush()
    logits = np.load(partial / "logits.npy", mmap_mode="r+")
    logits[2] = 1234.0
    logits.flush()
    del done, logits
    build(partial, teacher, dataset)  # resume
    resumed = TeacherCache(partial).read(range(10))
    torch.testing.assert_close(resumed[0], reference[0], atol=0, rtol=0)
    torch.testing.assert_close(resumed[1][0], reference[1][0], atol=0, rtol=0)

    # several processes: each rank fills rows rank::world_size of the same files
    sharded = tmp_path / "sharded"
    build(sharded, teacher, dataset, rank=0, world_size=2)
    assert np.load(sharded / DONE_NAME).tolist() == [1, 0] * 5
    build(sharded, teacher, dataset, rank=1, world_size=2)
    torch.testing.assert_close(TeacherCache(sharded).read(range(10))[0], reference[0], atol=0, rtol=0)


def test_a_stale_or_foreign_cache_is_refused_with_what_differs(tmp_path):
    dataset = make_synthetic_dataset(4, 32, 32, seed=4)
    directory = tmp_path / "c"
    build(directory, PointwiseTeacher(seed=0), dataset, reference_size=(32, 32))
    with pytest.raises(TeacherCacheError, match=r"(?s)teacher weights.*Rebuild"):
        build(directory, PointwiseTeacher(seed=1), dataset, reference_size=(32, 32))
    with pytest.raises(TeacherCacheError, match=r"(?s)reference size.*\[32, 32\].*\[24, 24\]") as info:
        build(directory, PointwiseTeacher(seed=0), dataset, reference_size=(24, 24))
    assert "teacher weights" not in str(info.value)
    with pytest.raises(TeacherCacheError, match="training images"):
        build(directory, PointwiseTeacher(seed=0), make_synthetic_dataset(4, 32, 32, seed=5), reference_size=(32, 32))
    # --overwrite rebuilds it for the new teacher
    key = build(directory, PointwiseTeacher(seed=1), dataset, reference_size=(32, 32), overwrite=True)
    TeacherCache(directory, expected_key=key)


def test_top_k_storage_round_trip(tmp_path):
    logits = torch.randn(2, 5, 6, 7) * 3
    values, indices = topk_compress(logits, 2)
    dense = topk_expand(values, indices, 5)
    p, q = logits.softmax(1), dense.softmax(1)
    top = logits.topk(2, dim=1).indices
    torch.testing.assert_close(q.gather(1, top), p.gather(1, top), atol=1e-5, rtol=1e-5)
    assert torch.equal(dense.argmax(1), logits.argmax(1))
    torch.testing.assert_close(q.sum(1), torch.ones(2, 6, 7))

    dataset = make_synthetic_dataset(4, 32, 32, seed=6)
    teacher = PointwiseTeacher(num_labels=5)
    build(tmp_path / "k", teacher, dataset, top_k=2, feature_names=[])
    cache = TeacherCache(tmp_path / "k")
    assert not (tmp_path / "k" / "logits.npy").exists()
    with torch.no_grad():
        online = teacher(normalised(dataset)).logits
    cached, features = cache.read(range(4))
    assert features == [] and cached.shape == online.shape
    top = online.topk(2, dim=1).indices
    torch.testing.assert_close(cached.softmax(1).gather(1, top), online.softmax(1).gather(1, top), atol=2e-3, rtol=0)


def test_distill_with_teacher_cache_trains_without_running_the_teacher(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import distill

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran during training although a cache was given")

    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    flags = ["--output_dir", str(out), "--teacher_cache", str(cache_dir), "--synthetic_train_size", "12",
             "--synthetic_validation_size", "4", "--synthetic_height", "32", "--synthetic_width", "32",
             "--student_config_overrides", TINY_SEGFORMER_JSON, "--default_teacher_steps", "3", "--max_steps", "3",
             "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "4",
             "--disable_tqdm", "true"]
    monkeypatch.setattr(LiveTeacher, "outputs", no_teacher)
    results = distill.main(flags)  # the default job: its no-teacher baseline runs without the cache
    assert results["steps"] == 3 and results["config"]["distillation"]["teacher_cache"] == str(cache_dir)
    baseline = json.loads((out / "baseline" / "results.json").read_text())
    assert results["baseline_val_mean_iou"] == baseline["val_mean_iou"]
    assert baseline["config"]["distillation"]["teacher_cache"] is None
    assert results["loss_history"] and "loss/pdd" in results["loss_history"][0]
    meta = json.loads((cache_dir / "cache_meta.json").read_text())
    # the decoder pair only: the default stage exits read the student's stages, not the teacher's
    assert meta["key"]["feature_names"] == ["decoder"]
    assert meta["key"]["dataset"]["num_examples"] == 12
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert model.config.num_labels == 6
    # the same cache under other preprocessing is refused before training, naming the difference
    from c2vkd_hf.jobs import UserInputError

    with pytest.raises(UserInputError, match=r"(?s)--teacher_cache.*reference size.*Rebuild") as info:
        distill.main(["--output_dir", str(tmp_path / "run2"), "--teacher_name_or_path", str(out / "teacher"),
                                  "--resize_height", "48", "--resize_width", "48"] + flags[2:])
    assert "teacher weights" not in str(info.value)


def test_two_runs_of_one_c2vkd_configuration_with_the_cache_give_identical_weights(tmp_path):
    """Reproducibility of a record: C2VKD at its defaults (class balance, stage exits, channel-wise term, text head)
    replaying one teacher cache, trained twice into two folders with the same seed, ends with bit-identical
    student weights on a CPU."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "scripts"))
    import distill

    common = ["--teacher_cache", str(tmp_path / "cache"), "--teacher_cache_dir", str(tmp_path / "teacher"),
              "--synthetic_train_size", "8", "--synthetic_validation_size", "4", "--synthetic_height", "32",
              "--synthetic_width", "32", "--student_config_overrides", TINY_SEGFORMER_JSON,
              "--default_teacher_steps", "2", "--max_steps", "4", "--eval_steps", "4", "--save_strategy", "no",
              "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--train_baseline", "false",
              "--seed", "3"]
    first = distill.main(["--output_dir", str(tmp_path / "a"), *common])
    second = distill.main(["--output_dir", str(tmp_path / "b"), *common])
    assert first["loss_weights"].get("channel") and first["loss_weights"].get("exit") and first["text_head"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["val_mean_iou"] == second["val_mean_iou"]
