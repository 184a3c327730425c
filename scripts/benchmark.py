#!/usr/bin/env python
"""CamVid benchmark: every distillation method x seeds x splits under one shared protocol.

    python scripts/benchmark.py --protocol long                 # run what is missing, then write the reports
    python scripts/benchmark.py --report_only                   # only regenerate RESULTS.md, ABLATIONS.md, plots
    python scripts/benchmark.py --protocol short --runs "c2vkd-stage:c2vkd:--stage_weight 0.1 --stage_pairs ..."

**Protocols.** ``short``: 400 steps, evaluated every 100 (about 9 epochs); ``long``: 2000 steps (5x, about 44 epochs), every 250.
Batch 8 at 120x160, SegFormer-B0 from random init, the reference UperNet + EfficientNet-Lite0 teacher.

**Splits.** Each configuration and seed is trained twice: on the full train split, evaluated on val
(``val``: the official table), and on train without sequence 0006R0, evaluated on those 101 held-out
frames (``selection``: ``--selection_holdout 0006R0_*``). All 101 val frames come from sequence
0016E5, which also supplies 204 of the 367 training frames, so val rewards fitting one sequence;
0006R0 is a sequence the selection runs never train on, which is what CamVid's test split asks of a
model. Defaults are chosen on the selection split (and must not lose on val).

**Tables** (RESULTS.md, per protocol, both splits): every method at its defaults (what a user gets;
C2VKD's default includes the text head), and every method with the text head (``--text_head true``,
what the teacher adds on top of the head). Gains are paired by seed against the table's teacher-free
run (``none`` / ``none-head``): a seed fixes the initial weights, the data order and every
augmentation draw for all methods. The gain ratio is C2VKD's mean paired gain over the best peer's.
A run not in the tables is an ablation (ABLATIONS.md), paired against the run it changes
(``--ablates``, default ``c2vkd``); a teacher-based ablation with the text head is also paired against its
teacher-free control (``--control``, default ``none-head``; e.g. the same data flags without a teacher).

**Teacher.** The short protocol runs the teacher online each step; the long one replays it from a
teacher cache (one per split and set of teacher outputs, built by the first run that needs it).

**Runs.** Each is ``scripts/distill.py`` in a subprocess (own folder under ``--work_dir``, resumed
from its last checkpoint when interrupted). ``runs/<protocol>/<name>-seed<k>.json`` holds
``protocol``, ``name``, ``method``, ``text_head``, ``seed``, ``val_mean_iou``, ``selection_mean_iou``
(``null`` until that run is made), ``ablation`` (``null`` for table runs), ``config`` and per split the
per-class IoU, histories, wall time and the command. Records are updated as each run lands, so a
benchmark spread over several sittings loses nothing; several driver processes can share the work
(a lock per run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
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


def table_specs() -> list[str]:
    """Every table run spec once, interleaved so that a partial benchmark covers both tables early."""
    specs: list[str] = []
    for pair in zip(TABLES["defaults"][1], TABLES["head"][1]):
        for spec in pair:
            if spec not in specs:
                specs.append(spec)
    return specs


def table_names() -> set[str]:
    return {parse_run(s)[0] for _, specs in TABLES.values() for s in specs}


def teacher_cache_dir(args, split: str, method: str, extra: list[str]) -> Optional[str]:
    """The long protocol replays the teacher from a cache (``--teacher_cache``) so that a teacher run costs
    about what the student alone costs: one cache per split and per set of teacher outputs the run reads
    (method and flags; the cache refuses another key). The short protocol, and any run with CutMix
    (``--cutmix_prob``) or consistent jitter (``--consistent_jitter``), function matching, run the teacher online."""
    live = ("--cutmix_prob", "--consistent_jitter")
    if args.protocol != "long" or method == "none" or any(f.startswith(live) for f in extra):
        return None  # the teacher must see each mixed or jittered view
    import hashlib

    # only the flags that choose which teacher maps are stored (feature and stage pairs, the teacher's input scale)
    # make another cache
    reads = [f"{flag}={extra[i + 1]}" for i, flag in enumerate(extra[:-1]) if flag in ("--feature_pairs", "--stage_pairs", "--teacher_input_scale")]
    tag = hashlib.sha1(" ".join([method, *reads]).encode()).hexdigest()[:8]
    return str(Path(args.work_dir) / "teacher-cache" / f"{split}-{method}-{tag}")


def shared_config(args, split: str) -> dict:
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
    """``name:method[:extra flags]``."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SystemExit(f"--runs entry {spec!r} must be name:method[:extra flags]")
    return parts[0], parts[1], shlex.split(parts[2]) if len(parts) == 3 else []


def seeds_for(name: str, args) -> list[int]:
    return list(range(args.main_seeds if name in MAIN_SEED_NAMES else args.other_seeds))


def claim(lock: Path) -> bool:
    """Takes the run's lock file unless a live process holds it (a lock left by a killed process is taken over)."""
    if lock.is_file():
        try:
            os.kill(int(lock.read_text()), 0)
            return False
        except (ValueError, ProcessLookupError):
            pass
    lock.write_text(str(os.getpid()))
    return True


def record_path(out_dir: Path, protocol: str, name: str, seed: int) -> Path:
    return out_dir / "runs" / protocol / f"{name}-seed{seed}.json"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def run_one(name: str, method: str, extra: list[str], seed: int, split: str, args) -> None:
    """Trains ``name`` with ``seed`` on ``split``'s training set (resuming an interrupted run) and adds its
    result to the run's record."""
    path = record_path(Path(args.out_dir), args.protocol, name, seed)
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get(f"{split}_mean_iou") is not None:
        return
    work = Path(args.work_dir) / args.protocol / (f"{name}-seed{seed}" + ("-selection" if split == "selection" else ""))
    work.mkdir(parents=True, exist_ok=True)
    if not claim(work / "RUNNING"):
        print(f"[skip] {name} seed {seed} {split}: another benchmark process is running it", flush=True)
        return
    config = {**shared_config(args, split), "method": method, "seed": seed, "output_dir": str(work)}
    cache = teacher_cache_dir(args, split, method, extra)
    if cache:
        config["teacher_cache"] = cache
    config_file = work / "benchmark_config.json"
    config_file.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, str(ROOT / "scripts" / "distill.py")]
    cmd += ([f"--{k}={v}" for k, v in config.items()] + extra) if extra else [str(config_file)]
    start = time.time()
    finished = work / "results.json"
    steps = PROTOCOLS[args.protocol]["max_steps"]
    if not (finished.is_file() and json.loads(finished.read_text()).get("steps") == steps):
        print(f"[run] {args.protocol} {name} seed {seed} {split}: {' '.join(extra) or '(defaults)'}", flush=True)
        with open(work / "log.txt", "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0:
            (work / "RUNNING").unlink(missing_ok=True)
            print(f"[fail] {name} seed {seed} {split}: exit {proc.returncode}, see {work / 'log.txt'}", flush=True)
            return
    (work / "RUNNING").unlink(missing_ok=True)
    results = json.loads(finished.read_text())
    id2label = json.loads((work / "config.json").read_text())["id2label"]
    record = json.loads(path.read_text()) if path.is_file() else {}  # another process may have added a split
    record.update({
        "protocol": args.protocol, "name": name, "method": method, "seed": seed,
        "text_head": bool(results.get("text_head")), "extra_flags": extra,
        "ablation": None if name in table_names() else name,
        f"{split}_mean_iou": results["val_mean_iou"],
        # the teacher's score on the official val split only (a selection run evaluates it on the held-out frames)
        "teacher_val_mean_iou": (results.get("teacher_val_mean_iou") if split == "val" else None)
        or record.get("teacher_val_mean_iou"),
    })
    if args.ablates and record["ablation"]:
        record["ablates"] = args.ablates
    if args.control and record["ablation"]:
        record["control"] = args.control
    if split == "val" or "config" not in record:
        record["config"] = results["config"]
    record.setdefault("runs", {})[split] = {
        "mean_iou": results["val_mean_iou"],
        "per_category_iou": {id2label[str(i)]: v for i, v in enumerate(results["per_category_iou"])},
        "steps": results["steps"], "wall_time_s": results["wall_time_s"], "peak_rss_mb": results["peak_rss_mb"],
        "eval_history": results["eval_history"], "loss_history": results["loss_history"],
        "loss_weights": results["loss_weights"], "command": " ".join(shlex.quote(c) for c in cmd),
        "teacher_mean_iou": results.get("teacher_val_mean_iou"),
        "finished_in_s": time.time() - start,
    }
    record.setdefault("val_mean_iou", None)
    record.setdefault("selection_mean_iou", None)
    write_json(path, record)
    print(f"[done] {args.protocol} {name} seed {seed} {split}: mIoU {results['val_mean_iou'] * 100:.2f}% in "
          f"{results['wall_time_s'] / 60:.1f} min", flush=True)


# ------------------------------------------------------------------------------------------ report
def load_runs(out_dir: Path, protocol: Optional[str] = None) -> list[dict]:
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


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def gain_cell(gains: list[tuple[int, float]]) -> str:
    if not gains:
        return "-"
    g = [x for _, x in gains]
    return f"{statistics.mean(g):+.2f} ({sum(x > 0 for x in g)}/{len(g)} seeds above)"


def gain_ratio(runs: list[dict], table: str, split: str) -> Optional[dict]:
    """C2VKD's gain over the table's baseline against the best peer's, on the seeds they share.

    With ``g_m(s) = mIoU(m, s) - mIoU(base, s)`` (paired by seed) and ``S_p`` the seeds on which both C2VKD and
    peer ``p`` have a paired gain, the best peer is ``argmax_p mean_{s in S_p} g_p(s)`` and the ratio is
    ``mean_{S_best} g_c2vkd / mean_{S_best} g_best`` (``None`` when the best peer's gain is not positive), so a
    peer run on fewer seeds is compared with C2VKD on those seeds only. Returns ``None`` when C2VKD or every
    peer lacks paired runs, else ``{"ratio", "best", "c2vkd", "peer", "seeds"}``."""
    base, specs = TABLES[table]
    c2vkd = dict(paired_gains(runs, "c2vkd", base, split))
    peers = {}
    for spec in specs:
        name = parse_run(spec)[0]
        if name in (base, "c2vkd"):
            continue
        shared = {s: g for s, g in paired_gains(runs, name, base, split) if s in c2vkd}
        if shared:
            peers[name] = shared
    if not c2vkd or not peers:
        return None
    best = max(peers, key=lambda n: statistics.mean(peers[n].values()))
    seeds = sorted(peers[best])
    ours, theirs = statistics.mean(c2vkd[s] for s in seeds), statistics.mean(peers[best].values())
    return {"ratio": ours / theirs if theirs > 0 else None, "best": best, "c2vkd": ours, "peer": theirs,
            "seeds": len(seeds)}


def teacher_gain_line(gains: list[tuple[int, float]], base: str, target: float = 1.5) -> str:
    """The teacher-attributable gain against its target: mean ``g = mean_s [mIoU(c2vkd, s) - mIoU(base, s)]``,
    the standard deviation of the paired gains (how much a seed moves it), the seeds above 0, and whether
    ``g >= target`` and at least 4 of 5 seeds (80%) are positive."""
    g = [x for _, x in gains]
    mean, above = statistics.mean(g), sum(x > 0 for x in g)
    spread = f" ± {statistics.stdev(g):.2f} (std of the paired gains)" if len(g) > 1 else ""
    per_seed = ", ".join(f"s{s}: {x:+.2f}" for s, x in gains)
    verdict = "met" if mean >= target and above >= 0.8 * len(g) else (
        f"missed by {target - mean:.2f}" if mean < target else "missed: too few seeds positive")
    return (f"teacher-attributable gain (C2VKD minus {base}, paired): **{mean:+.2f}**{spread}, positive on "
            f"{above}/{len(g)} seeds ({per_seed}); target >= +{target:.2f} and positive on >= 4 of 5 seeds: "
            f"**{verdict}** on {len(g)} seed{'s' if len(g) > 1 else ''}")


def table_section(runs: list[dict], table: str) -> list[str]:
    """Markdown: one table's runs on both splits, paired gains, the gain ratio and the targets."""
    base, specs = TABLES[table]
    names = [parse_run(s)[0] for s in specs]
    present = [n for n in names if any(values(runs, n, split) for split in SPLITS)]
    if not present:
        return []
    lines = [f"### {TABLE_TITLES[table]}", "",
             f"mIoU in points (mean ± seed std); gain = paired by seed over `{base}`.", "",
             "| run | val seeds | val mIoU | val gain over " + base + " | selection seeds | selection mIoU | "
             "selection gain over " + base + " |", "|---|---|---|---|---|---|---|"]
    for name in present:
        cells = []
        for split in SPLITS:
            v = list(values(runs, name, split).values())
            cells += [str(len(v)), mean_std(v), "+0.00" if name == base and v else gain_cell(paired_gains(runs, name, base, split))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    target = {"defaults": 2.0, "head": 1.5}[table]
    for split in SPLITS:
        r = gain_ratio(runs, table, split)
        if r is None:
            continue
        text = (f"{r['ratio']:.2f}" if r["ratio"] is not None else
                f"undefined (no peer beats {base}: best {r['best']} {r['peer']:+.2f})")
        lines.append(f"- {split}: gain ratio (C2VKD's paired gain {r['c2vkd']:+.2f}) / (best peer {r['best']}'s "
                     f"{r['peer']:+.2f}), on the {r['seeds']} seed{'s' if r['seeds'] > 1 else ''} both have = "
                     f"**{text}** (target > {target:g})")
    if table == "head":
        for split in SPLITS:
            gains = paired_gains(runs, "c2vkd", base, split)
            if gains:
                lines.append(f"- {split}: " + teacher_gain_line(gains, base))
    return lines + [""]


def class_values(runs: list[dict], name: str, split: str) -> dict[int, dict[str, float]]:
    """``{seed: {class: IoU in points}}`` of run ``name`` on ``split`` (classes absent from the split's labels,
    recorded as None, left out)."""
    out = {}
    for r in runs:
        per = r.get("runs", {}).get(split, {}).get("per_category_iou") if r["name"] == name else None
        if per:
            out[r["seed"]] = {k: v * 100 for k, v in per.items() if v is not None}
    return out


def per_class_section(runs: list[dict], base: str, candidates: list[str]) -> list[str]:
    """Markdown: where each run's gain lands, per class and split: ``base``'s IoU (seed mean) and each of
    ``candidates``' IoU minus the baseline's, paired by seed and averaged over the seeds both have,
    ``mean_s [IoU_k(run, s) - IoU_k(base, s)]``."""
    lines = []
    for split in SPLITS:
        ref = class_values(runs, base, split)
        others = {n: class_values(runs, n, split) for n in candidates if n != base}
        others = {n: v for n, v in others.items() if set(v) & set(ref)}
        names = list(others)
        if not ref or not names:
            continue
        classes = list(next(iter(ref.values())))
        lines += [f"**{split}** ({base}: {len(ref)} seeds; a gain column pairs the seeds both runs have)", "",
                  f"| class | {base} IoU | " + " | ".join(f"{n} minus {base}" for n in names) + " |",
                  "|---|" + "---|" * (len(names) + 1)]
        for k in classes:
            cells = [mean_std([v[k] for v in ref.values() if k in v])]
            for n in names:
                diffs = [others[n][s][k] - ref[s][k] for s in sorted(others[n]) if s in ref
                         and k in others[n][s] and k in ref[s]]
                cells.append(f"{statistics.mean(diffs):+.2f}" if diffs else "-")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    if not lines:
        return []
    return [f"### Per class: where the gain over `{base}` lands", "",
            "IoU in points; the baseline's seed mean ± std, then each run minus the baseline, paired by seed.", "",
            *lines]


def teacher_head_variants(runs: list[dict]) -> list[str]:
    """The ablation variants that use the teacher and the text head (compared with ``none-head``)."""
    return sorted({r["name"] for r in runs if r.get("ablation") and r.get("text_head") and r.get("method") != "none"})


def controlled_variants(runs: list[dict]) -> dict[str, list[str]]:
    """``{control: [variants]}`` for the teacher-based head variants whose record names a teacher-free control
    other than ``none-head`` (``--control``)."""
    groups: dict[str, list[str]] = {}
    for name in teacher_head_variants(runs):
        control = next(r.get("control") for r in runs if r["name"] == name)
        if control and control != "none-head":
            groups.setdefault(control, []).append(name)
    return groups


def ablation_section(runs: list[dict]) -> list[str]:
    """Markdown: each ablation paired by seed with the run it changes, on both splits, and (for a teacher-based
    variant with the text head) its teacher-attributable gain: minus its teacher-free control (``none-head``
    unless the record names another), paired by seed."""
    variants = sorted({r["name"] for r in runs if r.get("ablation")})
    if not variants:
        return []
    with_head = set(teacher_head_variants(runs))
    lines = ["| variant | compared with | flags | val: paired gain | selection: paired gain | "
             "teacher-free control | val: minus control | selection: minus control |", "|---|---|---|---|---|---|---|---|"]
    for name in variants:
        run = next(r for r in runs if r["name"] == name)
        ref = run.get("ablates") or "c2vkd"
        control = (run.get("control") or "none-head") if name in with_head else None
        flags = " ".join(run.get("extra_flags") or []) or "-"
        cells = [gain_cell(paired_gains(runs, name, ref, split)) for split in SPLITS] + [control or "-"]
        cells += [gain_cell(paired_gains(runs, name, control, split)) if control else "-" for split in SPLITS]
        lines.append(f"| {name} | {ref} | `{flags}` | " + " | ".join(cells) + " |")
    return lines + [""]


def protocol_lines(runs: list[dict], protocol: str) -> list[str]:
    cfg = next(r["config"] for r in runs if r.get("config"))
    teacher = next((r["teacher_val_mean_iou"] for r in runs if r.get("teacher_val_mean_iou")), None)
    return [f"- {protocol}: {cfg['training']['max_steps']} steps, batch {cfg['training']['per_device_train_batch_size']}, "
            f"AdamW lr {cfg['training']['learning_rate']} polynomial, warm-up {cfg['training']['warmup_steps']}; images "
            f"{cfg['data']['resize_height']}x{cfg['data']['resize_width']}, scale {cfg['data']['min_scale']}-"
            f"{cfg['data']['max_scale']}, crop, flip; SegFormer-B0 from random init; teacher "
            f"`{Path(cfg['distillation']['teacher_name_or_path']).name}`"
            + (f" ({teacher * 100:.2f}% val mIoU at this resolution)" if teacher else "") + c2vkd_balance(runs)]


def c2vkd_balance(runs: list[dict]) -> str:
    """How the table's ``c2vkd`` runs weigh pixels (class balance became C2VKD's default after the short
    protocol's runs were made; each run's configuration says which it used)."""
    cfgs = [r["config"]["distillation"] for r in runs if r["name"] == "c2vkd" and r.get("config")]
    kinds = sorted({(c.get("class_balance", False), c.get("class_balance_power", 1.0)) for c in cfgs})
    text = ", ".join(f"class-balanced means, power {p:g}" if on else "plain pixel means (`--class_balance false`)"
                     for on, p in kinds)
    return f"; `c2vkd` runs: {text}" if text else ""


def make_plots(runs: list[dict], out_dir: Path, protocol: str) -> list[str]:
    """Per protocol: val (and selection) mIoU per run of both tables, and val mIoU over training."""
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, table in zip(axes, TABLES):
        base, specs = TABLES[table]
        names = [n for n in (parse_run(s)[0] for s in specs) if values(runs, n, "val") or values(runs, n, "selection")]
        for i, name in enumerate(names):
            for offset, split, colour in ((-0.2, "val", "tab:blue"), (0.2, "selection", "tab:green")):
                v = list(values(runs, name, split).values())
                if v:
                    ax.bar(i + offset, statistics.mean(v), 0.38, color=colour, alpha=0.6,
                           label=split if i == 0 or not ax.get_legend_handles_labels()[0] else None)
                    ax.scatter([i + offset] * len(v), v, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(TABLE_TITLES[table], fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
    axes[0].set_ylabel("mIoU (%)  (bars: seed mean, dots: seeds)")
    fig.suptitle(f"CamVid, {protocol} protocol: val and selection-split mIoU")
    fig.tight_layout()
    files.append(f"{protocol}_miou.png")
    fig.savefig(out_dir / files[-1], dpi=90)

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for k, name in enumerate(sorted({r["name"] for r in runs if not r.get("ablation")})):
        histories = [r["runs"]["val"]["eval_history"] for r in runs if r["name"] == name and "val" in r.get("runs", {})]
        if not histories:
            continue
        steps = sorted({h["step"] for hist in histories for h in hist})
        mean = [statistics.mean(h["val_mean_iou"] * 100 for hist in histories for h in hist if h["step"] == s)
                for s in steps]
        ax.plot(steps, mean, marker="o", ms=3, color=f"C{k % 10}", ls="--" if name.endswith("-head") else "-",
                label=f"{name} ({len(histories)} seeds)")
    ax.set_xlabel("step"), ax.set_ylabel("val mIoU (%), seed mean")
    ax.set_title(f"Val mIoU over training ({protocol} protocol)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(f"{protocol}_curves.png")
    fig.savefig(out_dir / files[-1], dpi=90)
    return files


def write_report(args) -> Optional[str]:
    out_dir = Path(args.out_dir)
    protocols = [p for p in ("long", "short") if load_runs(out_dir, p)]
    if not protocols:
        return None
    lines = ["# CamVid distillation benchmark", "",
             "Generated by `scripts/benchmark.py` from `runs/<protocol>/*.json` (do not edit by hand). Protocol, "
             "splits and pairing: the script's docstring. `val`: trained on the full train split, evaluated on the "
             "val split (sequence 0016E5, also in training). `selection`: trained without sequence 0006R0, evaluated "
             "on its 101 frames (a sequence never trained on). Ablations: [ABLATIONS.md](ABLATIONS.md).", ""]
    readme_lines: list[str] = []
    ablations = ["# CamVid benchmark: ablations", "",
                 "Generated by `scripts/benchmark.py`. Each variant paired by seed with the run it changes; a teacher-based "
                 "variant with the text head also minus its teacher-free control (`none-head`, or the same data flags "
                 "without a teacher; what the teacher adds), paired by seed.", ""]
    for protocol in protocols:
        runs = load_runs(out_dir, protocol)
        section = [f"## {protocol.capitalize()} protocol", "", *protocol_lines(runs, protocol), ""]
        for table in TABLES:
            section += table_section(runs, table)
        files = make_plots(runs, out_dir, protocol)
        section += [f"![{f}]({f})" for f in files] + [""]
        base, specs = TABLES["head"]
        lines += section + per_class_section(runs, base, [parse_run(s)[0] for s in specs])
        if not readme_lines:
            readme_lines = section[:-len(files) - 1]
        abl = ablation_section(runs)
        if abl:
            ablations += [f"## {protocol.capitalize()} protocol", "", *abl,
                          *per_class_section(runs, base, ["c2vkd", *teacher_head_variants(runs)])]
            for control, variants in sorted(controlled_variants(runs).items()):  # e.g. the same data flags, no teacher
                ablations += per_class_section(runs, control, variants)
    lines += ["## Commands", "", "```bash", "python scripts/benchmark.py --protocol long --main_seeds 5 --other_seeds 3",
              "python scripts/benchmark.py --protocol short --main_seeds 5 --other_seeds 3", "```", ""]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out_dir / "ABLATIONS.md").write_text("\n".join(ablations) + "\n")
    update_readme(Path(args.readme), readme_lines, out_dir / "RESULTS.md")
    print(f"wrote {out_dir / 'RESULTS.md'} and ABLATIONS.md")
    return str(out_dir / "RESULTS.md")


README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def update_readme(readme: Path, table_lines: list[str], report: Path) -> None:
    """Replaces the text between the benchmark markers of ``readme`` (when both are there)."""
    if not readme.is_file():
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = "\n".join(f"#{line}" if line.startswith("## ") or line.startswith("### ") else line
                     for line in table_lines).strip()
    link = report.relative_to(readme.parent) if report.is_relative_to(readme.parent) else report
    readme.write_text(f"{head}{README_START}\n{body}\n\nAll tables, plots and the short protocol: [{link}]({link}).\n"
                      f"{README_END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--teacher", default=str(SHARED / "models" / "camvid-upernet-lite0"))
    parser.add_argument("--text_embeddings", default=str(SHARED / "data" / "clip_text" /
                                                           "camvid11_from_city_ViT16_clip_text.pth"))
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "camvid"))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "benchmark-camvid"))
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="long")
    parser.add_argument("--splits", default="val,selection", help="comma-separated: val, selection")
    parser.add_argument("--main_seeds", type=int, default=5, help=f"seeds for {', '.join(MAIN_SEED_NAMES)}")
    parser.add_argument("--other_seeds", type=int, default=3, help="seeds for the other runs")
    parser.add_argument("--runs", nargs="*", default=None, help="name:method[:extra flags] (default: both tables)")
    parser.add_argument("--ablates", default=None, help="the run the --runs variants change (default c2vkd)")
    parser.add_argument("--control", default=None,
                        help="the teacher-free run the --runs variants' teacher gain is measured against (default none-head)")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose benchmark section is updated")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or set(splits) - set(SPLITS):
        raise SystemExit(f"--splits must name some of {', '.join(SPLITS)}, got {args.splits!r}")
    if not args.report_only:
        specs = args.runs or table_specs()
        plan = [(parse_run(s), seed, split) for seed in range(max(args.main_seeds, args.other_seeds))
                for s in specs for split in splits]
        for (name, method, extra), seed, split in plan:
            if seed in seeds_for(name, args):
                run_one(name, method, extra, seed, split, args)
                write_report(args)
    write_report(args)


if __name__ == "__main__":
    main()
