"""Tests of c2vkd_hf.metrics against an independent numpy computation."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c2vkd_hf.metrics import (
    StreamingMeanIoU,
    logits_to_predictions,
    make_compute_metrics,
    preprocess_logits_for_metrics,
)

IGNORE = 255


def numpy_reference(preds, labels, k, ignore=IGNORE):
    """Per-class loops, no confusion matrix: IoU over classes present in labels or predictions."""
    preds, labels = np.asarray(preds).ravel(), np.asarray(labels).ravel()
    keep = labels != ignore
    preds, labels = preds[keep], labels[keep]
    ious, accs = [], []
    for c in range(k):
        p, g = preds == c, labels == c
        inter, union = np.sum(p & g), np.sum(p | g)
        ious.append(inter / union if union else math.nan)
        accs.append(inter / g.sum() if g.sum() else math.nan)
    return {
        "mean_iou": float(np.nanmean(ious)),
        "per_category_iou": ious,
        "overall_accuracy": float(np.mean(preds == labels)),
        "mean_accuracy": float(np.nanmean(accs)),
    }


def assert_same(result, ref):
    for key in ("mean_iou", "overall_accuracy", "mean_accuracy"):
        assert result[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_allclose(result["per_category_iou"], ref["per_category_iou"], atol=1e-12, equal_nan=True)


def random_batch(rng, k, shape=(3, 7, 9), absent=(), ignore_frac=0.2):
    labels = rng.integers(0, k, size=shape)
    preds = rng.integers(0, k, size=shape)
    for c in absent:  # class c absent from both labels and predictions
        labels[labels == c] = (c + 1) % k
        preds[preds == c] = (c + 1) % k
    labels[rng.random(shape) < ignore_frac] = IGNORE
    return preds, labels


def test_matches_numpy_with_ignore_and_absent_class():
    rng = np.random.default_rng(0)
    preds, labels = random_batch(rng, 5, absent=(3,))
    preds[0, 0, :] = 4  # predicted somewhere ...
    labels[labels == 4] = 0  # ... but never labelled: IoU 0, counted in the mean
    m = StreamingMeanIoU(5, ignore_index=IGNORE)
    m.update(torch.from_numpy(preds), torch.from_numpy(labels))
    out = m.compute()
    assert math.isnan(out["per_category_iou"][3])
    assert out["per_category_iou"][4] == 0.0
    assert math.isnan(out["per_category_accuracy"][4])
    assert_same(out, numpy_reference(preds, labels, 5))


def test_streamed_pieces_equal_one_shot():
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, 6, shape=(2, 5, 8), absent=(5,)) for _ in range(5)]
    streamed = StreamingMeanIoU(6)
    for p, y in batches:
        # numpy input and uneven splits of each batch
        streamed.update(p[:1], y[:1])
        streamed.update(torch.from_numpy(p[1:]), torch.from_numpy(y[1:]))
    all_p = np.concatenate([p for p, _ in batches])
    all_y = np.concatenate([y for _, y in batches])
    one = StreamingMeanIoU(6)
    one.update(all_p, all_y)
    assert torch.equal(streamed.confusion, one.confusion)
    assert streamed.confusion.dtype == torch.int64
    assert_same(streamed.compute(), numpy_reference(all_p, all_y, 6))
    streamed.reset()
    assert int(streamed.confusion.sum()) == 0 and math.isnan(streamed.compute()["mean_iou"])


def test_out_of_range_labels_ignored_and_bad_inputs_rejected():
    m = StreamingMeanIoU(3)
    m.update(torch.tensor([0, 1, 2, 1]), torch.tensor([0, -100, 7, 1]))  # -100: Trainer padding
    assert int(m.confusion.sum()) == 2
    with pytest.raises(ValueError):
        m.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        m.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_reduce_is_noop_without_distributed():
    m = StreamingMeanIoU(2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = m.confusion.clone()
    m.reduce()
    assert torch.equal(before, m.confusion)


def _reduce_worker(rank, store, world, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        m = StreamingMeanIoU(3)
        if rank == 0:
            m.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        else:
            m.update(torch.tensor([2, 2]), torch.tensor([2, 255]))
        m.reduce()
        torch.save(m.confusion, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduce_sums_across_two_processes(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo unavailable")
    mp.spawn(_reduce_worker, args=(str(tmp_path / "store"), 2, str(tmp_path)), nprocs=2, join=True)
    expected = [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt").tolist() == expected


def test_logits_upsampled_bilinear_then_argmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 10, 12))
    expected = F.interpolate(logits, size=(10, 12), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(logits_to_predictions(logits, (10, 12)), expected)
    assert torch.equal(preprocess_logits_for_metrics((logits, "hidden"), labels), expected)
    assert torch.equal(logits_to_predictions(expected, (10, 12)), expected)


def test_compute_metrics_called_as_trainer_does():
    """Per batch with compute_result=False, last with True; numpy or tensors; flat dict; resets."""
    from transformers import EvalPrediction

    rng = np.random.default_rng(2)
    id2label = {0: "sky", 1: "road", 2: "car"}
    fn = make_compute_metrics(3, id2label=id2label)
    all_p, all_y = [], []
    for step in range(3):
        logits = torch.from_numpy(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
        labels = rng.integers(0, 3, size=(2, 8, 8))
        labels[:, 0] = IGNORE
        preds = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False).argmax(1).numpy()
        all_p.append(preds), all_y.append(labels)
        pred_in = logits if step % 2 == 0 else logits.numpy()
        out = fn(EvalPrediction(predictions=pred_in, label_ids=torch.from_numpy(labels)), compute_result=step == 2)
        if step < 2:
            assert out == {}
    ref = numpy_reference(np.concatenate(all_p), np.concatenate(all_y), 3)
    assert set(out) == {"mean_iou", "overall_accuracy", "mean_accuracy", "iou_sky", "iou_road", "iou_car"}
    assert out["mean_iou"] == pytest.approx(ref["mean_iou"])
    assert out["iou_car"] == pytest.approx(ref["per_category_iou"][2])
    assert int(fn.metric.confusion.sum()) == 0  # reset after the final call


def test_trainer_evaluate_with_batch_eval_metrics(tmp_path):
    """A real Trainer.evaluate (transformers 5) with batch_eval_metrics and a tiny model."""
    from transformers import Trainer, TrainingArguments

    class TinySeg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)

        def forward(self, pixel_values, labels=None):
            logits = self.conv(pixel_values)
            loss = None
            if labels is not None:
                up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(up, labels, ignore_index=IGNORE)
            return {"loss": loss, "logits": logits}

    torch.manual_seed(0)
    data = []
    for _ in range(5):  # 5 samples, batch 2: the last batch is partial
        y = torch.randint(0, 3, (12, 16))
        y[:2] = IGNORE
        data.append({"pixel_values": torch.randn(3, 12, 16), "labels": y})
    model = TinySeg().eval()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, batch_eval_metrics=True,
        report_to=[], use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, eval_dataset=data,
                      compute_metrics=make_compute_metrics(3, id2label={0: "a", 1: "b", 2: "c"}))
    metrics = trainer.evaluate()

    with torch.no_grad():
        x = torch.stack([d["pixel_values"] for d in data])
        y = torch.stack([d["labels"] for d in data])
        preds = logits_to_predictions(model(x)["logits"], y.shape[-2:])
    ref = numpy_reference(preds.numpy(), y.numpy(), 3)
    assert metrics["eval_mean_iou"] == pytest.approx(ref["mean_iou"])
    assert metrics["eval_overall_accuracy"] == pytest.approx(ref["overall_accuracy"])
    assert metrics["eval_iou_b"] == pytest.approx(ref["per_category_iou"][1])
    # a second evaluation starts from a clean state
    assert trainer.evaluate()["eval_mean_iou"] == pytest.approx(ref["mean_iou"])


def test_matches_evaluate_mean_iou_when_it_can_be_loaded():
    """The same numbers as the ``evaluate`` library's ``mean_iou`` (the reference the streaming metric
    replaces, see docs/DESIGN.md). Its script comes from the Hub, so offline the test skips."""
    evaluate = pytest.importorskip("evaluate")
    try:
        reference = evaluate.load("mean_iou")
    except Exception as error:  # offline, no cached script: nothing to compare with
        pytest.skip(f"evaluate.load('mean_iou') unavailable: {type(error).__name__}")
    rng = np.random.default_rng(3)
    preds, labels = random_batch(rng, 5, absent=(3,))
    m = StreamingMeanIoU(5, ignore_index=IGNORE)
    m.update(torch.from_numpy(preds), torch.from_numpy(labels))
    ours = m.compute()
    theirs = reference.compute(predictions=list(preds), references=list(labels), num_labels=5,
                               ignore_index=IGNORE, reduce_labels=False)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    np.testing.assert_allclose(ours["per_category_iou"], theirs["per_category_iou"], atol=1e-12, equal_nan=True)


def test_class_map_is_argmax_with_its_tie_and_nan_rules():
    """The fast prediction path picks the same class as ``argmax``: the first of tied scores, NaN as highest."""
    from c2vkd_hf.metrics import class_map

    torch.manual_seed(0)
    scores = torch.randint(0, 3, (3, 7, 9, 11)).float()  # many ties
    scores[0, 4, 2, 2] = float("nan")
    scores[1, :, 0, 0] = float("nan")
    scores[2, 5, 1, 1] = float("inf")
    assert torch.equal(class_map(scores), scores.argmax(1))
    assert class_map(torch.tensor([[[[1.0]], [[2.0]], [[2.0]]]])).item() == 1  # first of the tied maxima
    assert class_map(scores[0], 0).shape == (9, 11)
    assert torch.equal(class_map(scores[0], 0), scores[0].argmax(0))
    assert torch.equal(class_map(scores.bfloat16()), scores.bfloat16().argmax(1))
