"""What a benchmark runs: the two tables' run specs, seeds, each run's configuration (from the dataset spec,
:mod:`.spec`) and which teacher cache a run replays (the package docstring tells the protocol)."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Optional

from . import records

SPLITS = ("val", "selection")
PEERS = ("kd", "cwd", "dist", "dkd")
HEAD = "--text_head true"
PAPER = "c2vkd-paper:c2vkd:--recipe paper"
#: the two tables: (teacher-free baseline, run specs name:method[:flags]); C2VKD's default has the head, and
#: C2VKD as the paper describes it (``--recipe paper``) is a row of both
TABLES = {
    "defaults": ("none", ["none:none", *(f"{p}:{p}" for p in PEERS), "c2vkd:c2vkd", PAPER]),
    "head": ("none-head", [f"none-head:none:{HEAD}", *(f"{p}-head:{p}:{HEAD}" for p in PEERS), "c2vkd:c2vkd", PAPER]),
}
TABLE_TITLES = {"defaults": "Every method at its defaults (what a user gets)",
                "head": "Every method with the text head (what the teacher adds on top of the head)"}
#: the table row of C2VKD as the paper describes it (not a peer)
PAPER_NAME = "c2vkd-paper"
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
    """The spec's cached protocols (CamVid's long one) replay the teacher from a cache (``--teacher_cache``) so that
    a teacher run costs about what the student alone costs: one cache per split and per set of teacher outputs the
    run reads (method and flags; the cache refuses another key). The other protocols run the teacher online."""
    if args.protocol not in args.spec.cached_protocols or method == "none":
        return None
    tag = hashlib.sha1(" ".join([method, *stored_maps(method, extra)]).encode()).hexdigest()[:8]
    return str(Path(args.work_dir) / "teacher-cache" / f"{split}-{method}-{tag}")


def given_flags(extra: list[str]) -> dict[str, str]:
    """``{flag: value as written}`` of a run's extra flags (``--name value`` or ``--name=value``)."""
    given: dict[str, str] = {}
    for i, item in enumerate(extra):
        if item.startswith("--"):
            name, sep, value = item[2:].partition("=")
            given[name] = value if sep else (extra[i + 1] if i + 1 < len(extra) else "")
    return given


def effective_flags(method: str, extra: list[str]) -> dict:
    """Every ``DistillationArguments`` value a run of ``method`` with ``extra`` flags trains with: the dataclass
    defaults, then the values of its ``--recipe`` (if any), then ``extra``'s own (as the command line reads them:
    strings, converted to the defaults' types)."""
    from ..config import distillation_defaults
    from ..jobs import recipe_values

    values = distillation_defaults()
    given = given_flags(extra)
    if given.get("recipe"):
        values.update(recipe_values(given.pop("recipe")))
    values["method"] = method
    values.update({name: value for name, value in _as_flags(given).items() if name in values})
    return values


def _as_flags(given: dict[str, str]) -> dict:
    """``given`` converted as the command line converts those flags (:func:`~c2vkd_hf.validation.config_values` over
    the distill command's dataclasses); other names are kept as written."""
    from transformers import TrainingArguments

    from ..config import DataArguments, DistillationArguments
    from ..validation import config_values

    return config_values(given, (DistillationArguments, DataArguments, TrainingArguments))


#: ``DistillationArguments`` fields only C2VKD reads, and those only the peers read (``method`` none reads neither)
C2VKD_FIELDS = ("pdd_", "label_weight", "class_balance", "feature_pairs", "glob_", "rel_", "ling_", "stage_",
                "exit_weight", "channel_", "weight_schedules")
PEER_FIELDS = ("kd_weight", "kd_temperature")


def method_flags(method: str, extra: list[str]) -> dict:
    """:func:`effective_flags` without the fields ``method`` does not read (a changed C2VKD default does not make
    a KD record stale)."""
    values = effective_flags(method, extra)
    drop = (() if method == "c2vkd" else C2VKD_FIELDS) + (() if method in PEERS else PEER_FIELDS)
    return {k: v for k, v in values.items() if not k.startswith(drop)}


def mark_stale(runs: list[dict], spec, protocol: str) -> list[dict]:
    """Sets each record's ``stale``: the list of :func:`.records.stale_fields` against today's configuration of its
    run (empty: a run of today's code and defaults). Stale records are left out of the tables and listed as missing,
    so a changed default reruns the records it affects instead of relabelling them. Ablations are records of the
    configuration they name (kept in ABLATIONS.md as history): they are never stale. A run that reads the teacher
    is also stale when its ``teacher_sha256`` is not the spec's teacher's now
    (:meth:`~.spec.DatasetSpec.teacher_sha256`; not checked for a Hub id, nor for an absent folder without a
    ``teacher.json``): another teacher is another run."""
    base = spec.shared_config(protocol, "val") if protocol in spec.protocols else {}
    teacher = spec.teacher_sha256() if any(r.get("method") != "none" for r in runs) else None
    for record in runs:
        extra = record.get("extra_flags") or []
        if record.get("ablation"):
            record["stale"] = []
            continue
        try:
            expected = method_flags(record["method"], extra)
            shared = {**base, **{k: v for k, v in _as_flags(given_flags(extra)).items() if k in base}}
        except Exception as error:  # e.g. a recipe that no longer exists
            record["stale"] = [f"its flags no longer parse ({error})"]
            continue
        record["stale"] = records.stale_fields(record, expected, shared,
                                               loss_fields=C2VKD_FIELDS + PEER_FIELDS + ("ce_weight", "text_head"))
        if teacher is not None and record["method"] != "none" and record.get("teacher_sha256") != teacher:
            made = record["teacher_sha256"][:12] if record.get("teacher_sha256") else "an unrecorded teacher"
            record["stale"].append(f"teacher: record made with {made}, the spec's teacher is {teacher[:12]}")
    return runs


def stored_maps(method: str, extra: list[str]) -> list[str]:
    """What decides which teacher maps a run's cache holds, as ``flag=value`` with the flags' values in force
    (:func:`effective_flags`): C2VKD's feature pairs, its stage pairs when stage guidance is on (the exits read
    only the student's stages), and the teacher's input scale. Runs that agree on these share a cache; a changed
    default makes another one."""
    values = {k: str(v) if not isinstance(v, str) and v is not None else v for k, v in
              effective_flags(method, extra).items()}
    kept = ["teacher_input_scale"]
    if method == "c2vkd":
        kept.append("feature_pairs")
        if float(values["stage_weight"]) > 0:
            kept.append("stage_pairs")
    return [f"--{name}={values[name]}" for name in kept]


def shared_config(args, split: str) -> dict:
    """``c2vkd-distill``'s configuration shared by every run of ``args.protocol`` on ``split``, from the dataset spec
    ``args.spec`` (:meth:`~.spec.DatasetSpec.shared_config`)."""
    return args.spec.shared_config(args.protocol, split)


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
