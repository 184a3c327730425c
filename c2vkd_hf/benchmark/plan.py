"""What the CamVid benchmark runs: protocols, splits, the two tables' run specs, seeds, the shared training
configuration and which teacher cache a run replays (the package docstring tells the protocol)."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Optional

from . import records

PROTOCOLS = {"short": {"max_steps": 400, "eval_steps": 100}, "long": {"max_steps": 2000, "eval_steps": 250}}
SPLITS = ("val", "selection")
SELECTION_HOLDOUT = "0006R0_*"
PEERS = ("kd", "cwd", "dist", "dkd")
HEAD = "--text_head true"
#: the two tables: (teacher-free baseline, run specs name:method[:flags]); C2VKD's default has the head
TABLES = {
    "defaults": ("none", ["none:none", *(f"{p}:{p}" for p in PEERS), "c2vkd:c2vkd"]),
    "head": ("none-head", [f"none-head:none:{HEAD}", *(f"{p}-head:{p}:{HEAD}" for p in PEERS), "c2vkd:c2vkd"]),
}
TABLE_TITLES = {"defaults": "Every method at its defaults (what a user gets)",
                "head": "Every method with the text head (what the teacher adds on top of the head)"}
MAIN_SEED_NAMES = ("none", "dist", "c2vkd", "none-head", "dist-head")
#: the seed counts the tables ask for: ``MAIN_SEEDS`` for :data:`MAIN_SEED_NAMES`, ``OTHER_SEEDS`` for the other runs
MAIN_SEEDS, OTHER_SEEDS = 5, 3


def table_specs() -> list[str]:
    """Every table run spec once, interleaved so that a partial benchmark covers both tables early."""
    specs: list[str] = []
    for pair in zip(TABLES["defaults"][1], TABLES["head"][1]):
        for spec in pair:
            if spec not in specs:
                specs.append(spec)
    return specs


def table_names() -> set[str]:
    """The names of the two tables' runs (any other run name is an ablation)."""
    return {parse_run(s)[0] for _, specs in TABLES.values() for s in specs}


def teacher_cache_dir(args, split: str, method: str, extra: list[str]) -> Optional[str]:
    """The long protocol replays the teacher from a cache (``--teacher_cache``) so that a teacher run costs
    about what the student alone costs: one cache per split and per set of teacher outputs the run reads
    (method and flags; the cache refuses another key). The short protocol, and any run with CutMix
    (``--cutmix_prob``) or consistent jitter (``--consistent_jitter``), function matching, run the teacher online."""
    live = ("--cutmix_prob", "--consistent_jitter")
    if args.protocol != "long" or method == "none" or any(f.startswith(live) for f in extra):
        return None  # the teacher must see each mixed or jittered view
    tag = hashlib.sha1(" ".join([method, *stored_maps(method, extra)]).encode()).hexdigest()[:8]
    return str(Path(args.work_dir) / "teacher-cache" / f"{split}-{method}-{tag}")


def stored_maps(method: str, extra: list[str]) -> list[str]:
    """What decides which teacher maps a run's cache holds, as ``flag=value`` with the flags' values in force (given
    in ``extra``, else their defaults): C2VKD's feature pairs, its stage pairs when stage guidance or exits are on,
    and the teacher's input scale. Runs that agree on these share a cache; a changed default makes another one."""
    from ..config import distillation_defaults

    values = distillation_defaults()
    for i, item in enumerate(extra):
        if item.startswith("--"):
            name, _, value = item[2:].partition("=")
            if name in values:
                values[name] = value if value else (extra[i + 1] if i + 1 < len(extra) else "")
    kept = ["teacher_input_scale"]
    if method == "c2vkd":
        kept.append("feature_pairs")
        if float(values["stage_weight"]) > 0 or float(values["exit_weight"]) > 0:
            kept.append("stage_pairs")
    return [f"--{name}={values[name]}" for name in kept]


def shared_config(args, split: str) -> dict:
    """``c2vkd-distill``'s configuration shared by every run of ``args.protocol`` on ``split`` (data under
    ``args.data_dir``, ``args.teacher``, ``args.text_embeddings``); a selection run holds out
    :data:`SELECTION_HOLDOUT`."""
    data = Path(args.data_dir)
    protocol = PROTOCOLS[args.protocol]
    config = {
        "train_images": str(data / "train"), "train_labels": str(data / "trainannot"),
        "validation_images": str(data / "val"), "validation_labels": str(data / "valannot"),
        "labels_file": str(data / "classes.json"),
        "resize_height": 120, "resize_width": 160, "min_scale": 0.75, "max_scale": 1.5, "hflip": True,
        "teacher_name_or_path": args.teacher, "student_name_or_path": "segformer-b0",
        "text_embeddings": args.text_embeddings,
        "max_steps": protocol["max_steps"], "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
        "learning_rate": 6e-4, "lr_scheduler_type": "polynomial", "warmup_steps": 30, "weight_decay": 0.01,
        "eval_strategy": "steps", "eval_steps": protocol["eval_steps"], "save_strategy": "steps",
        "save_steps": protocol["eval_steps"], "save_total_limit": 1, "logging_steps": 20,
        "report_to": "none", "disable_tqdm": True, "train_baseline": "false",
    }
    if split == "selection":
        config["selection_holdout"] = SELECTION_HOLDOUT
    return config


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """``name:method[:extra flags]`` as ``(name, method, [flags])``; a malformed spec is a ``ValueError``."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"--runs entry {spec!r} must be name:method[:extra flags]")
    return parts[0], parts[1], shlex.split(parts[2]) if len(parts) == 3 else []


def missing_runs(runs: list[dict], main_seeds: int = MAIN_SEEDS, other_seeds: int = OTHER_SEEDS,
                 splits: tuple[str, ...] = SPLITS) -> list[tuple[str, str, list[int]]]:
    """The table trainings ``runs`` (one protocol's records) still lack: ``(spec, split, seeds)`` for each table run
    spec and split with a seed in ``0 .. n-1`` (``n`` as in :func:`seeds_for`) that has no mIoU on that split."""
    out = []
    for spec in table_specs():
        name = parse_run(spec)[0]
        for split in splits:
            done = records.values(runs, name, split)
            seeds = [seed for seed in seeds_for(name, main_seeds, other_seeds) if seed not in done]
            if seeds:
                out.append((spec, split, seeds))
    return out


def seeds_for(name: str, main_seeds: int, other_seeds: int) -> list[int]:
    """Seeds ``0 .. n-1`` of run ``name``: ``n = main_seeds`` for :data:`MAIN_SEED_NAMES`, else ``other_seeds``."""
    return list(range(main_seeds if name in MAIN_SEED_NAMES else other_seeds))
