"""The benchmark's run records (``runs/<protocol>/<name>-seed<k>.json``): where they live, how they are written
(atomically) and read, and the per-seed figures a report pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def record_path(out_dir: Path, protocol: str, name: str, seed: int) -> Path:
    """Where run ``name`` with ``seed`` of ``protocol`` keeps its record."""
    return out_dir / "runs" / protocol / f"{name}-seed{seed}.json"


def write_json(path: Path, payload: dict) -> None:
    """Writes ``payload`` to ``path`` through a temporary file, so an interrupted write leaves the old record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def load_runs(out_dir: Path, protocol: Optional[str] = None) -> list[dict]:
    """Every run record of ``protocol`` (all protocols when ``None``) under ``out_dir``."""
    folders = [out_dir / "runs" / protocol] if protocol else sorted((out_dir / "runs").glob("*/"))
    return [json.loads(p.read_text()) for folder in folders for p in sorted(folder.glob("*.json"))]


def values(runs: list[dict], name: str, split: str) -> dict[int, float]:
    """``{seed: mIoU in points}`` of run ``name`` on ``split`` (seeds without that run left out)."""
    return {r["seed"]: r[f"{split}_mean_iou"] * 100 for r in runs
            if r["name"] == name and r.get(f"{split}_mean_iou") is not None}


def paired_gains(runs: list[dict], name: str, base: str, split: str) -> list[tuple[int, float]]:
    """``[(seed, mIoU(name, seed) - mIoU(base, seed))]`` in points over the seeds both have."""
    a, b = values(runs, name, split), values(runs, base, split)
    return [(seed, a[seed] - b[seed]) for seed in sorted(a) if seed in b]


def class_values(runs: list[dict], name: str, split: str) -> dict[int, dict[str, float]]:
    """``{seed: {class: IoU in points}}`` of run ``name`` on ``split`` (classes absent from the split's labels,
    recorded as None, left out)."""
    out = {}
    for r in runs:
        per = r.get("runs", {}).get(split, {}).get("per_category_iou") if r["name"] == name else None
        if per:
            out[r["seed"]] = {k: v * 100 for k, v in per.items() if v is not None}
    return out
