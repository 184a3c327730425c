"""The card's figures: frames spread across the split, side by side with a legend; honest training curves."""

from __future__ import annotations

import numpy as np

from c2vkd_hf.model_card import (MIN_MIOU_RANGE, plot_training_curves, prediction_figure, save_prediction_overlay,
                                 spread_indices, training_curves_figure)


def test_frames_are_spread_across_the_split():
    assert spread_indices(100, 3) == [0, 50, 99]
    assert spread_indices(367, 4) == [0, 122, 244, 366]
    assert spread_indices(2, 3) == [0, 1] and spread_indices(10, 1) == [5] and spread_indices(0, 3) == []


def _frames(count: int):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 20, 3), dtype=np.uint8) for _ in range(count)]
    labels = [np.full((16, 20), i % 2) for i in range(count)]
    labels[0][:2] = 255  # ignored pixels
    preds = [np.full((16, 20), 2) for _ in range(count)]
    return images, labels, preds


def test_predictions_side_by_side_with_a_legend(tmp_path):
    images, labels, preds = _frames(3)
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    names = ["sky", "road", "car", "tree"]
    fig = prediction_figure(images, labels, preds, palette, names, frame_indices=[0, 50, 99])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 9  # 3 frames x (image, label, prediction)
    prediction = panels[2].images[0].get_array()
    assert np.array_equal(np.asarray(prediction)[0, 0], palette[2])  # the class colour, not blended with the photo
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["sky", "road", "car", "ignored (not scored)"]  # the classes shown, not "tree"
    path = save_prediction_overlay(images, labels, preds, palette, tmp_path / "p.png", class_names=names)
    assert path.is_file() and path.stat().st_size > 0


def _history():
    return [{"loss": 2.0, "loss/ce": 1.5, "loss/pdd": 0.5, "step": 10}, {"eval_mean_iou": 0.5000, "step": 10},
            {"loss": 1.0, "loss/ce": 0.8, "loss/pdd": 0.2, "step": 20}, {"eval_mean_iou": 0.5001, "step": 20},
            {"train_loss": 1.5, "step": 20}, {"eval_mean_iou": 0.5002, "step": 20}]  # final evaluation after the fold


def test_curves_one_point_per_step_baseline_and_teacher_and_a_readable_axis(tmp_path):
    baseline = [{"step": 10, "val_mean_iou": 0.49}, {"step": 20, "val_mean_iou": 0.495},
                {"step": 20, "val_mean_iou": 0.495}]
    fig = training_curves_figure(_history(), baseline_history=baseline, teacher_miou=0.52)
    loss_ax, miou_ax = fig.axes
    lines = {line.get_label(): line for line in miou_ax.get_lines()}
    assert set(lines) == {"student", "student without teacher", "teacher"}
    assert list(lines["student"].get_xdata()) == [10, 20]  # no vertical artefact at the last step
    assert np.isclose(lines["student"].get_ydata()[-1], 50.02)  # the last evaluation at that step
    assert list(lines["student without teacher"].get_xdata()) == [10, 20]
    assert np.allclose(lines["teacher"].get_ydata(), 52.0)
    low, high = miou_ax.get_ylim()
    assert high - low >= MIN_MIOU_RANGE and low <= 49.0 and high >= 52.0
    assert {line.get_label() for line in loss_ax.get_lines()} == {"total", "ce", "pdd"}
    assert plot_training_curves(_history(), tmp_path / "c.png", baseline_miou=0.4).is_file()


def test_curves_of_a_run_shorter_than_logging_steps():
    fig = training_curves_figure([{"eval_mean_iou": 0.3, "step": 4}, {"train_loss": 1.25, "step": 4}])
    loss_ax, miou_ax = fig.axes
    texts = " ".join(t.get_text() for t in loss_ax.texts)
    assert "no loss logged" in texts and "1.25" in texts
    low, high = miou_ax.get_ylim()
    assert high - low >= MIN_MIOU_RANGE
    assert training_curves_figure([{"epoch": 1.0, "step": 1}]) is None
