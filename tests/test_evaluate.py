"""Inference at scale: sliding windows, multi-scale + flip test-time augmentation, distributed evaluation,
scripts/evaluate.py outputs. Tiny models, offline."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from c2vkd_hf.data import SYNTHETIC_CLASSES
from c2vkd_hf.metrics import StreamingMeanIoU
from c2vkd_hf.models import load_student
from c2vkd_hf.config import DataArguments
from c2vkd_hf.inference import evaluate_model, segmentation_scores, sliding_window_logits
from c2vkd_hf.jobs import UserInputError, saved_data_arguments
from tiny import TINY_SEGFORMER, tensor_dataset, tiny_student

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import evaluate as evaluate_script  # noqa: E402


class Pointwise(nn.Module):
    """Per-pixel logits (a 1x1 conv): equivariant to flips and translations, blind to context, so a
    sliding window must reproduce whole-image inference exactly."""

    def __init__(self, num_labels: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_labels, 1)

    def forward(self, pixel_values, **_):
        return SemanticSegmenterOutput(logits=self.conv(pixel_values))


class Symmetric(nn.Module):
    """A 3x3 conv with left-right symmetric kernels at stride 2: context-dependent, and flip-equivariant on
    images of odd width (the strided grid then includes both borders), upsampling included."""

    def __init__(self, num_labels: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_labels, 3, padding=1, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, pixel_values, **_):
        return SemanticSegmenterOutput(logits=self.conv(pixel_values))


def _x(b=2, h=32, w=48, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _upsampled(model, x, size):
    logits = model(pixel_values=x).logits
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def test_window_covering_the_image_is_plain_inference():
    model, x = tiny_student().eval(), _x()
    plain = model(pixel_values=x).logits
    for window in ((32, 48), (64, 64)):  # exact, and larger than the image (clamped)
        assert torch.equal(sliding_window_logits(model, x, window), plain)
        scores = segmentation_scores(model, x, output_size=(64, 96), window=window)
        torch.testing.assert_close(scores, _upsampled(model, x, (64, 96)), rtol=0, atol=0)


@torch.no_grad()
def test_sliding_window_tiles_and_averages_overlaps():
    model, x = Pointwise(), _x(h=40, w=52)
    for window, stride in (((16, 16), (8, 8)), ((16, 24), None), ((40, 20), (40, 7))):
        torch.testing.assert_close(sliding_window_logits(model, x, window, stride, max_batch=3),
                                   model(pixel_values=x).logits, rtol=1e-6, atol=1e-6)
    # a context-dependent model: each pixel averages the crops that cover it
    tiny = tiny_student().eval()
    out = sliding_window_logits(tiny, x[:1], (32, 32), (8, 20))
    assert out.shape == (1, 3, 40, 52)
    crop = _upsampled(tiny, x[:1, :, :32, :32], (32, 32))
    torch.testing.assert_close(out[..., :8, :20], crop[..., :8, :20])  # covered by the first crop only


@torch.no_grad()
def test_flip_tta_on_flip_equivariant_models():
    x = _x(w=49)
    for model in (Pointwise(), Symmetric()):
        plain = _upsampled(model, x, (32, 49)).softmax(1)
        flipped = segmentation_scores(model, x, flip=True)
        torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(segmentation_scores(Symmetric(), _x(w=48), flip=True),
                              _upsampled(Symmetric(), _x(w=48), (32, 48)).softmax(1), atol=1e-3)
    # a model that is not flip-equivariant: the mean of the two views' probabilities
    model, x = tiny_student().eval(), _x()
    expected = (_upsampled(model, x, (32, 48)).softmax(1) + _upsampled(model, x.flip(-1), (32, 48)).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(segmentation_scores(model, x, flip=True), expected)


@torch.no_grad()
def test_multi_scale_scores():
    model, x = tiny_student().eval(), _x(b=3, h=48, w=64)
    scores = segmentation_scores(model, x, output_size=(50, 60), scales=(0.75, 1.0, 1.5), flip=True)
    assert scores.shape == (3, 3, 50, 60)
    torch.testing.assert_close(scores.sum(1), torch.ones(3, 50, 60))
    single = segmentation_scores(model, x, output_size=(50, 60), scales=(1.5,))  # one view: probabilities
    x15 = nn.functional.interpolate(x, size=(72, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(single, _upsampled(model, x15, (50, 60)).softmax(1))
    # scales and windows combine: every view is tiled at its own scale
    tiled = segmentation_scores(Pointwise(), x, scales=(1.0, 2.0), window=(16, 16))
    assert tiled.shape == (3, 3, 48, 64)
    with pytest.raises(ValueError, match="positive"):
        segmentation_scores(model, x, scales=(0.0,))


def test_evaluate_model_options_and_predictions(tmp_path):
    from accelerate import Accelerator

    model, data = tiny_student().eval(), tensor_dataset(5, size=32, ignore=True)
    metric = StreamingMeanIoU(3)
    with torch.no_grad():
        for item in data:
            metric.update(_upsampled(model, item["pixel_values"][None], (32, 32)).argmax(1), item["labels"][None])
    plain = evaluate_model(model, data, 3, batch_size=2, progress=False)
    assert plain == metric.compute()
    same = evaluate_model(model, data, 3, batch_size=2, progress=False, window=(32, 32), accelerator=Accelerator(cpu=True),
                          predictions_dir=str(tmp_path / "pred"), max_predictions=3)
    assert same == plain
    assert sorted(os.listdir(tmp_path / "pred")) == ["00000.png", "00001.png", "00002.png"]
    image = PIL.Image.open(tmp_path / "pred" / "00001.png")
    assert image.mode == "RGB" and image.size == (32, 32)
    # multi-scale + flip: the prediction is the argmax of the mean probability over the views (each
    # scale, and the flipped image's prediction flipped back), written out here by hand
    expected = StreamingMeanIoU(3)
    with torch.no_grad():
        for item in data:
            x, views = item["pixel_values"][None], []
            for scale in (1.0, 1.5):
                xs = nn.functional.interpolate(x, size=(round(32 * scale),) * 2, mode="bilinear", align_corners=False)
                views.append(_upsampled(model, xs, (32, 32)).softmax(1))
                views.append(_upsampled(model, xs.flip(-1), (32, 32)).flip(-1).softmax(1))
            expected.update(torch.stack(views).mean(0).argmax(1), item["labels"][None])
    tta = evaluate_model(model, data, 3, batch_size=2, progress=False, scales=(1.0, 1.5), flip=True)
    assert tta == expected.compute()
    # with a sliding window as well: the same as scoring each image with segmentation_scores
    tiled = StreamingMeanIoU(3)
    with torch.no_grad():
        for item in data:
            scores = segmentation_scores(model, item["pixel_values"][None], output_size=(32, 32), scales=(1.0, 1.5),
                                         flip=True, window=(32, 32), stride=(8, 8))
            tiled.update(scores.argmax(1), item["labels"][None])
    assert evaluate_model(model, data, 3, batch_size=2, progress=False, scales=(1.0, 1.5), flip=True,
                          window=(32, 32), stride=(8, 8)) == tiled.compute()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    load_student("segformer-b0", dict(enumerate(SYNTHETIC_CLASSES)), config_overrides=TINY_SEGFORMER).save_pretrained(folder)
    return folder


DATA = ["--synthetic_validation_size", "5", "--synthetic_train_size", "2", "--synthetic_height", "40",
        "--synthetic_width", "56"]


def test_evaluate_script_writes_table_and_predictions(saved_model, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_script.main(["--model_name_or_path", str(saved_model), "--output_dir", str(out), "--batch_size", "2",
                                   "--scales", "0.75,1.0", "--flip", "--window_height", "32", "--window_width", "32",
                                   "--num_predictions", "2"] + DATA)
    assert result["inference"] == {"scales": [0.75, 1.0], "flip": True, "window": [32, 32], "stride": None}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["mean_iou"] == pytest.approx(result["mean_iou"]) and saved["num_images"] == 5
    table = (out / "miou.md").read_text()
    assert "sliding window 32x32; scales 0.75, 1; flip" in table and "| **mIoU** |" in table and "| sky |" in table
    assert sorted(os.listdir(out / "predictions")) == ["00000.png", "00001.png"]
    plain = evaluate_script.main(["--model_name_or_path", str(saved_model)] + DATA)
    whole = evaluate_script.main(["--model_name_or_path", str(saved_model), "--window_height", "40", "--window_width",
                                  "56"] + DATA)
    assert whole["mean_iou"] == plain["mean_iou"]
    with pytest.raises(Exception, match="window_width"):
        evaluate_script.main(["--model_name_or_path", str(saved_model), "--window_height", "40"] + DATA)


def _evaluate_as_rank(rank: int, port: int, out_dir: str) -> None:
    """One of 2 forked processes: accelerate's CPU (gloo) state from torchrun-style variables, then
    evaluate_model on its share of the images and the summed confusion matrix."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    AcceleratorState._reset_state(True)  # the parent's single-process state was inherited by fork
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and accelerator.process_index == rank
    metrics = evaluate_model(tiny_student().eval(), tensor_dataset(7, size=32, ignore=True), 3, batch_size=2,
                             progress=False, accelerator=accelerator, predictions_dir=os.path.join(out_dir, "pred"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(metrics, fh)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_process_evaluation_matches_one_process(tmp_path):
    """Each process evaluates every 2nd image; the summed confusion matrix gives the single-process metrics
    on every rank, and the saved predictions cover every image once. (scripts/evaluate.py runs the same
    code under ``torchrun --nproc_per_node 2`` / ``accelerate launch``.)"""
    import torch.multiprocessing as mp

    single = evaluate_model(tiny_student().eval(), tensor_dataset(7, size=32, ignore=True), 3, batch_size=2, progress=False)
    mp.start_processes(_evaluate_as_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        metrics = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert metrics["mean_iou"] == pytest.approx(single["mean_iou"], abs=1e-12)
        assert metrics["per_category_iou"] == pytest.approx(single["per_category_iou"], abs=1e-12)
    assert sorted(os.listdir(tmp_path / "pred")) == [f"{i:05d}.png" for i in range(7)]


def test_saved_data_configuration_is_used_only_without_data_flags(tmp_path):
    """evaluate.py and text_query.py evaluate a trained folder on the data saved in its results.json,
    unless a data flag is given."""
    saved = DataArguments(synthetic_train_size=5, synthetic_height=40, resize_height=20, resize_width=24)
    (tmp_path / "results.json").write_text(json.dumps({"config": {"data": saved.__dict__}}))
    parsed = DataArguments()
    assert saved_data_arguments(tmp_path, ["--model_name_or_path", str(tmp_path)], parsed) == saved
    assert saved_data_arguments(tmp_path, ["--resize_height=8", "--resize_width", "8"], parsed) is parsed
    with pytest.raises(UserInputError, match="has no results.json to take the data configuration from"):
        saved_data_arguments(tmp_path / "elsewhere", [], parsed)  # never silently the synthetic scenes
