"""What the console shows: short rounded log lines, named phases announced in order, the summary's gain."""

from __future__ import annotations

import re

import pytest
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from c2vkd_hf.console import ConsolePrinterCallback, ConsoleProgressCallback, console_line
from tiny import c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher

TRAIN_LOGS = {"loss": 0.734567, "grad_norm": 3.21, "learning_rate": 0.000551234, "epoch": 1.5,
              "loss/ce": 0.61234, "loss_weighted/ce": 0.61234, "loss/pdd": 1.0123, "loss_weighted/pdd": 0.10123,
              "loss/rel": 0.0004567, "loss_weighted/rel": 0.00004567}


def test_training_line_is_short_rounded_and_shows_weighted_terms_once():
    line = console_line(TRAIN_LOGS, 20, 200, "student")
    assert line == "student step 20/200 | loss 0.735 | ce 0.612 pdd 0.101 rel 4.6e-5 | lr 5.5e-4"
    assert "loss/" not in line and "'" not in line and len(line) < 100


def test_unweighted_terms_when_no_weighted_ones_and_plain_ce_shows_no_terms():
    line = console_line({"loss": 2.0, "loss/ce": 1.5, "loss/kd": 0.5}, 3)
    assert line == "step 3 | loss 2 | ce 1.5 kd 0.5"
    assert console_line({"loss": 1.79, "loss/ce": 1.79, "loss_weighted/ce": 1.79, "learning_rate": 4.5e-4}, 2, 4,
                        "baseline") == "baseline step 2/4 | loss 1.79 | lr 4.5e-4"


def test_evaluation_end_of_training_and_other_lines():
    logs = {"eval_loss": 0.81234, "eval_mean_iou": 0.452149, "eval_iou_sky": 0.9, "eval_runtime": 1.5}
    assert console_line(logs, 100, 200, "student") == "student step 100/200 | val mIoU 45.21% | val loss 0.812"
    assert console_line(logs, 200, 200, "student", final=True) == "student final | val mIoU 45.21% | val loss 0.812"
    assert console_line({"train_runtime": 191.6, "train_loss": 0.7512, "epoch": 3.0}, 200, 200, "teacher") == \
        "teacher done: 200 steps in 192 s | mean loss 0.751"
    assert console_line({"epoch": 1.0}, 5) is None


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_trainer_prints_short_lines_with_its_phase(tmp_path, capsys, disable_tqdm):
    train = tensor_dataset(8, size=32)
    trainer = make_trainer(str(tmp_path), c2vkd_model(tiny_student(), tiny_teacher()), tiny_teacher(), train,
                           disable_tqdm=disable_tqdm)
    kinds = {type(cb) for cb in trainer.callback_handler.callbacks}
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, (ConsolePrinterCallback, ConsoleProgressCallback)):
            callback.phase = "student"  # what DistillationTrainer(..., phase="student") sets
    assert (ConsolePrinterCallback if disable_tqdm else ConsoleProgressCallback) in kinds
    assert ProgressCallback not in kinds and PrinterCallback not in kinds
    trainer.train()
    out = capsys.readouterr()
    printed = out.out + out.err
    assert re.search(r"student step 1/2 \| loss [\d.]+ \| ce [\d.]+ .*pdd [\d.e-]+.* \| lr [\d.e-]+", printed)
    assert "{'loss'" not in printed and "loss_weighted/" not in printed
    if not disable_tqdm:
        assert "student:" in printed  # the named progress bar
    # everything stays in the logs (results.json, report_to backends)
    logged = [e for e in trainer.state.log_history if "loss" in e][0]
    assert "loss/pdd" in logged and "loss_weighted/pdd" in logged


def test_default_job_announces_teacher_then_baseline_then_student(monkeypatch, tmp_path, capsys):
    """The default job's phases, in order, each announced on one line before it starts; the summary
    keeps its three lines and adds the gain with its sign."""
    from c2vkd_hf.cli import distill

    order = []
    monkeypatch.setattr(distill, "load_segmentation_data", lambda data_args: "data")
    monkeypatch.setattr(distill, "default_job_teacher", lambda *a, **k: order.append(("teacher", None)))

    def fake_run(dist_args, data_args, training_args, *, data=None, write_card=True, baseline_miou=None,
                 baseline_history=None, phase="student"):
        order.append((phase, dist_args.method))
        assert data == "data"
        miou = 0.40 if phase == "baseline" else 0.4234
        return {"method": dist_args.method, "val_mean_iou": miou, "teacher": "t", "teacher_val_mean_iou": 0.6,
                "dataset": "synthetic", "wall_time_s": 1.0, "eval_history": [{"step": 1, "val_mean_iou": miou}]}

    monkeypatch.setattr(distill, "run_distillation", fake_run)
    distill.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "2"])
    out = capsys.readouterr().out
    assert order == [("teacher", None), ("baseline", "none"), ("student", "c2vkd")]
    announced = [line for line in out.splitlines() if re.match(r"\[\d/3\] ", line)]
    assert [line.split()[1] for line in announced] == ["teacher:", "baseline:", "student:"]
    summary = out[out.index("Validation mIoU"):].splitlines()
    assert summary[1].strip().startswith("42.34%") and summary[2].strip().startswith("60.00%")
    assert summary[3].strip().startswith("40.00%")
    assert summary[4].strip().startswith("+2.34") and "points" in summary[4]
