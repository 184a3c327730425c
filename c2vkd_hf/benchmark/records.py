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


def values(runs: list[dict], name: str, split: str, include_stale: bool = False) -> dict[int, float]:
    """``{seed: mIoU in points}`` of run ``name`` on ``split`` (seeds without that run left out, and stale records
    unless ``include_stale``: the ablations' history pairs with the records of its time)."""
    return {r["seed"]: r[f"{split}_mean_iou"] * 100 for r in runs if r["name"] == name and
            r.get(f"{split}_mean_iou") is not None and (include_stale or not r.get("stale"))}


def paired_gains(runs: list[dict], name: str, base: str, split: str,
                 include_stale: bool = False) -> list[tuple[int, float]]:
    """``[(seed, mIoU(name, seed) - mIoU(base, seed))]`` in points over the seeds both have."""
    a, b = values(runs, name, split, include_stale), values(runs, base, split, include_stale)
    return [(seed, a[seed] - b[seed]) for seed in sorted(a) if seed in b]


def class_values(runs: list[dict], name: str, split: str, include_stale: bool = False) -> dict[int, dict[str, float]]:
    """``{seed: {class: IoU in points}}`` of run ``name`` on ``split`` (classes absent from the split's labels,
    recorded as None, left out; stale records as in :func:`values`)."""
    out = {}
    for r in runs:
        if r.get("stale") and not include_stale:
            continue
        per = r.get("runs", {}).get(split, {}).get("per_category_iou") if r["name"] == name else None
        if per:
            out[r["seed"]] = {k: v * 100 for k, v in per.items() if v is not None}
    return out


#: configuration entries that name where things are (the machine's paths), not what is trained
LOCATION_KEYS = {"teacher_name_or_path", "text_embeddings", "teacher_cache", "teacher_cache_dir", "retrain",
                 "output_dir", "logging_dir", "train_images", "train_labels", "validation_images", "validation_labels",
                 "labels_file", "decoded_cache_dir", "disable_tqdm", "selection_holdout", "report_to"}


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    return a == b


def stale_fields(record: dict, expected_distillation: dict, expected_shared: dict,
                 loss_fields: tuple[str, ...] = ()) -> list[str]:
    """Why ``record`` is not a run of the configuration today's code gives it: one ``name: record has a, today b``
    per differing entry (empty: current). ``expected_distillation``: every ``DistillationArguments`` value the
    run's method reads (:func:`.plan.method_flags`); ``expected_shared``: the spec's shared flags (data and
    training). Paths and logging (:data:`LOCATION_KEYS`) are not compared. An entry the record lacks (a flag added
    after it ran, which then kept the old behaviour) counts as different only for the loss flags (names starting
    with one of ``loss_fields``) whose value today is not off (``None``, ``False``, 0 or empty): a term that is on
    today and did not exist then."""
    config = record.get("config") or {}
    if not config:
        return ["the record has no configuration"]
    out = []
    sections = [(config.get("distillation", {}), expected_distillation)]
    flat = {**config.get("data", {}), **config.get("training", {})}
    sections.append((flat, {k: v for k, v in expected_shared.items() if k in flat or k in ("max_steps",)}))
    for stored, expected in sections:
        for name, value in expected.items():
            if name in LOCATION_KEYS:
                continue
            if name not in stored:
                if name.startswith(loss_fields) and value not in (None, False, 0, 0.0, ""):
                    out.append(f"{name}: the record lacks it, today {value!r}")
            elif not _same(stored[name], value):
                out.append(f"{name}: record has {stored[name]!r}, today {value!r}")
    return out
