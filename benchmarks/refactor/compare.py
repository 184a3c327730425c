"""Compares the runs of two same-metrics checks (benchmarks/refactor/run.sh): every metric, every logged loss value
and the loss weights must be equal to the last digit; timings, paths and flags a refactor removed are not compared.

    python benchmarks/refactor/compare.py BEFORE_DIR AFTER_DIR [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNS = ("camvid-short", "default-job")
COMPARED = ("val_mean_iou", "overall_accuracy", "per_category_iou", "steps", "teacher_val_mean_iou",
            "baseline_val_mean_iou", "eval_history", "loss_history", "loss_weights")
UNTIMED = ("runtime", "samples_per_second", "steps_per_second", "wall_time", "epoch_time")


def _without_timings(value):
    """``value`` with every timing entry (``*_runtime``, ``*_per_second``, ...) dropped, recursively."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not any(t in k for t in UNTIMED)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def compare(before: Path, after: Path) -> dict:
    """``{run: {"equal": bool, "differences": [...], "val_mean_iou": (before, after)}}``."""
    report = {}
    for run in RUNS:
        old = json.loads((before / run / "results.json").read_text())
        new = json.loads((after / run / "results.json").read_text())
        differences = [key for key in COMPARED if _without_timings(old.get(key)) != _without_timings(new.get(key))]
        report[run] = {"equal": not differences, "differences": differences,
                       "val_mean_iou": [old["val_mean_iou"], new["val_mean_iou"]],
                       "baseline_val_mean_iou": [old.get("baseline_val_mean_iou"), new.get("baseline_val_mean_iou")],
                       "teacher_val_mean_iou": [old.get("teacher_val_mean_iou"), new.get("teacher_val_mean_iou")],
                       "logged_loss_values": sum(len(e) for e in old.get("loss_history", []))}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    report = compare(args.before, args.after)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(r["equal"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
