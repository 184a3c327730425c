#!/usr/bin/env python
"""CamVid benchmark: every distillation method x seeds under one shared configuration.

    python scripts/benchmark.py                        # run what is missing, then write RESULTS.md
    python scripts/benchmark.py --report_only          # only regenerate RESULTS.md and plots
    python scripts/benchmark.py --suite ablations --runs "pdd-only:c2vkd:--glob_weight 0 --rel_weight 0 --ling_weight 0"

Each run is ``scripts/distill.py`` in a subprocess (own folder under ``--work_dir``, resumed from its
last checkpoint when interrupted) and leaves ``<out_dir>/runs/<name>-seed<k>.json`` with the method,
seed, validation mIoU, per-class IoU, steps, wall time, peak RSS, the loss terms over training and
the full configuration. Runs whose JSON exists are skipped, so the table can be built over several
sittings. The report (``RESULTS.md`` or ``ABLATIONS.md``) and plots are regenerated from all JSONs; a
run's optional ``note`` (e.g. that it was renamed when a default changed) is shown beside it, and its
optional ``ablates`` names the default a variant changes (``c2vkd`` when absent; variants made before a
default changed keep the old default's runs as their reference).

The gain ratio is ``(mIoU(c2vkd) - mIoU(none)) / max over kd, cwd, dist, dkd of (mIoU(peer) - mIoU(none))``
on seed means, computed here from the JSONs. The main suite also runs a head control
(``c2vkd-labels-only``: C2VKD's text head as the classifier, no teacher term) with the main seeds and
pairs C2VKD against it, separating what the teacher adds from what the head adds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEERS = ("kd", "cwd", "dist", "dkd")
PROTOCOL_DEFAULTS = {"height": 120, "width": 160, "max_steps": 400, "eval_steps": 100}
# The head control: the plain student with C2VKD's text head trained as its classifier and no teacher
# term (the linguistic target is the label wherever one exists). C2VKD is paired against it, so the
# report separates what the teacher adds from what the head adds.
HEAD_CONTROL = "c2vkd-labels-only"
HEAD_CONTROL_RUN = f"{HEAD_CONTROL}:c2vkd:--pdd_weight 0 --glob_weight 0 --rel_weight 0 --label_weight 1"
DEFAULT_RUNS = ["none:none", "kd:kd", "cwd:cwd", "dist:dist", "dkd:dkd", "c2vkd:c2vkd", HEAD_CONTROL_RUN]
MAIN_SEED_RUNS = ("none", "c2vkd", HEAD_CONTROL)  # the runs that get --main_seeds


def shared_config(args) -> dict:
    data = Path(args.data_dir)
    return {
        "train_images": str(data / "train"), "train_labels": str(data / "trainannot"),
        "validation_images": str(data / "val"), "validation_labels": str(data / "valannot"),
        "labels_file": str(data / "classes.json"),
        "resize_height": args.height, "resize_width": args.width,
        "min_scale": 0.75, "max_scale": 1.5, "hflip": True,
        "teacher_name_or_path": args.teacher, "student_name_or_path": "segformer-b0",
        "text_embeddings": args.text_embeddings,
        "max_steps": args.max_steps, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
        "learning_rate": 6e-4, "lr_scheduler_type": "polynomial", "warmup_steps": 30, "weight_decay": 0.01,
        "eval_strategy": "steps", "eval_steps": args.eval_steps, "save_strategy": "steps",
        "save_steps": args.eval_steps, "save_total_limit": 1, "logging_steps": 20,
        "report_to": "none", "disable_tqdm": True, "train_baseline": "false",
    }


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """``name:method[:extra flags]``."""
    parts = spec.split(":", 2)
    if len(parts) < 2:
        raise SystemExit(f"--runs entry {spec!r} must be name:method[:extra flags]")
    return parts[0], parts[1], shlex.split(parts[2]) if len(parts) == 3 else []


def seeds_for(name: str, args) -> list[int]:
    if name in MAIN_SEED_RUNS:
        return list(range(args.main_seeds))
    return list(range(args.other_seeds))


def claim(lock: Path) -> bool:
    """Takes the run's lock file unless a live process holds it (so that several benchmark processes
    can share the table; a lock left by a killed process is taken over)."""
    import os

    if lock.is_file():
        try:
            os.kill(int(lock.read_text()), 0)
            return False
        except (ValueError, ProcessLookupError):
            pass
    lock.write_text(str(os.getpid()))
    return True


def run_one(name: str, method: str, extra: list[str], seed: int, args) -> None:
    run_json = Path(args.out_dir) / "runs" / f"{name}-seed{seed}.json"
    if run_json.is_file():
        print(f"[skip] {run_json.name} exists")
        return
    work = Path(args.work_dir) / f"{name}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    if not claim(work / "RUNNING"):
        print(f"[skip] {name} seed {seed}: another benchmark process is running it")
        return
    config = {**shared_config(args), "method": method, "seed": seed, "output_dir": str(work)}
    config_file = work / "benchmark_config.json"
    config_file.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, str(ROOT / "scripts" / "distill.py")]
    if extra:  # extra flags override the file: pass everything on the command line
        cmd += [f"--{k}={v}" for k, v in config.items()] + extra
    else:
        cmd += [str(config_file)]
    start = time.time()
    finished = work / "results.json"
    if finished.is_file() and json.loads(finished.read_text()).get("steps") == args.max_steps:
        print(f"[collect] {name} seed {seed}: finished in {work}", flush=True)  # e.g. its driver was stopped
    else:
        print(f"[run] {name} seed {seed}: {' '.join(extra) or '(defaults)'}", flush=True)
        with open(work / "log.txt", "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0:
            (work / "RUNNING").unlink(missing_ok=True)
            print(f"[fail] {name} seed {seed}: exit {proc.returncode}, see {work / 'log.txt'}", flush=True)
            return
    (work / "RUNNING").unlink(missing_ok=True)
    results = json.loads((work / "results.json").read_text())
    id2label = json.loads((work / "config.json").read_text())["id2label"]
    record = {
        "name": name, "method": method, "seed": seed, "extra_flags": extra,
        "val_mean_iou": results["val_mean_iou"],
        "per_category_iou": {id2label[str(i)]: v for i, v in enumerate(results["per_category_iou"])},
        "steps": results["steps"], "wall_time_s": results["wall_time_s"], "peak_rss_mb": results["peak_rss_mb"],
        "teacher_val_mean_iou": results.get("teacher_val_mean_iou"),
        "eval_history": results["eval_history"], "loss_history": results["loss_history"],
        "loss_weights": results["loss_weights"], "config": results["config"],
        "command": " ".join(shlex.quote(c) for c in cmd), "finished_in_s": time.time() - start,
    }
    run_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_json)
    print(f"[done] {name} seed {seed}: mIoU {record['val_mean_iou'] * 100:.2f}% in {record['wall_time_s'] / 60:.1f} min",
          flush=True)


# ------------------------------------------------------------------------------------------ report
def load_runs(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]


def summarise(runs: list[dict]) -> dict[str, dict]:
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    table = {}
    for name, items in by_name.items():
        values = [r["val_mean_iou"] * 100 for r in items]
        table[name] = {"method": items[0]["method"], "n": len(values), "mean": statistics.mean(values),
                       "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
                       "min": min(values), "max": max(values), "values": values,
                       "wall_min": statistics.mean(r["wall_time_s"] for r in items) / 60,
                       "rss": max(r["peak_rss_mb"] for r in items), "flags": " ".join(items[0]["extra_flags"])}
    return table


def gain_ratio(table: dict[str, dict], c2vkd_name: str = "c2vkd") -> tuple[float | None, str | None]:
    """(mIoU(c2vkd) - mIoU(none)) / max over peers of (mIoU(peer) - mIoU(none)), on seed means."""
    if "none" not in table or c2vkd_name not in table:
        return None, None
    base = table["none"]["mean"]
    peers = {p: table[p]["mean"] - base for p in PEERS if p in table}
    if not peers:
        return None, None
    best = max(peers, key=peers.get)
    return (table[c2vkd_name]["mean"] - base) / peers[best], best


def paired_gains(runs: list[dict], base: str = "none") -> dict[str, list[tuple[int, float]]]:
    """Per run name, ``[(seed, mIoU(name, seed) - mIoU(base, seed))]`` in points over the seeds both have.

    A seed fixes the student's initial weights, the data order and (since augmentation is seeded per
    example) every augmentation draw for all methods, so the per-seed difference removes the variance
    the methods share."""
    reference = {r["seed"]: r["val_mean_iou"] for r in runs if r["name"] == base}
    gains: dict[str, list[tuple[int, float]]] = {}
    for r in sorted(runs, key=lambda r: (r["name"], r["seed"])):
        if r["name"] != base and r["seed"] in reference:
            gains.setdefault(r["name"], []).append((r["seed"], (r["val_mean_iou"] - reference[r["seed"]]) * 100))
    return gains


def ratio_caveats(table: dict[str, dict], gains: dict[str, list[tuple[int, float]]], best_peer: str) -> list[str]:
    """Warnings that go with a defined gain ratio: a denominator inside the plain student's seed
    spread, or seed sets that differ between the best peer and the plain student."""
    base, peer = table["none"], table[best_peer]
    notes = []
    if base["n"] > 1 and peer["mean"] - base["mean"] < base["std"]:
        notes.append(f"the denominator ({best_peer} {peer['mean'] - base['mean']:+.2f}) is smaller than the plain "
                     f"student's seed standard deviation ({base['std']:.2f}), so the ratio is mostly noise")
    if peer["n"] != base["n"] and gains.get(best_peer):
        paired = statistics.mean(g for _, g in gains[best_peer])
        notes.append(f"{best_peer} has {peer['n']} seed(s) against none's {base['n']}; paired on its seeds it is "
                     f"{paired:+.2f} (table below)")
    return [f"Caveat: {'; '.join(notes)}.", ""] if notes else []


def variant_ratios(variants: list[dict], all_runs: list[dict]) -> list[str]:
    """Markdown lines: the gain ratio with each C2VKD variant in C2VKD's place, on gains paired with
    none by seed (the variant's mean paired gain / the best peer's mean paired gain), so variants with
    fewer seeds than none are compared on their own seeds."""
    gains = {name: statistics.mean(g for _, g in items) for name, items in paired_gains(all_runs).items()}
    peers = {p: gains[p] for p in PEERS if p in gains}
    if not peers or max(peers.values()) <= 0:
        return []
    best = max(peers, key=peers.get)
    names = sorted({r["name"] for r in variants if r["method"] == "c2vkd" and r["name"] in gains},
                   key=lambda n: -gains[n])
    return ["## Gain ratio with each variant in C2VKD's place", "",
            f"Variant's paired gain over none / best peer's paired gain ({best}, {peers[best]:+.2f}); the "
            "main table's ratio uses seed means instead.", "",
            "| run | paired gain over none | ratio |", "|---|---|---|"] + [
            f"| {n} | {gains[n]:+.2f} | {gains[n] / peers[best]:.2f} |" for n in names] + [""]


def ablates(run: dict) -> str | None:
    """The run an ablation variant is compared with: its ``ablates`` field, else default ``c2vkd``
    (``None`` for ``c2vkd`` itself and for other methods)."""
    if run["method"] != "c2vkd" or run["name"] == "c2vkd":
        return None
    return run.get("ablates", "c2vkd")


def ablation_references(runs: list[dict]) -> list[str]:
    """The reference runs of the ablation variants, ``c2vkd`` first."""
    names = {ablates(r) for r in runs} - {None}
    return sorted(names, key=lambda n: (n != "c2vkd", n))


def paired_table(runs: list[dict], base: str = "none") -> list[str]:
    """Markdown section of :func:`paired_gains` against ``base``, best mean first."""
    gains = paired_gains(runs, base)
    if not gains:
        return []
    lines = [f"## Gain over {base}, paired by seed", "",
             "Same seed = same initial student and data order for every method, and the same augmentation draws "
             "for runs made since augmentation was seeded (runs without that are noted in the Runs table).", "",
             f"| run | seeds | per-seed gain (points) | mean | seeds above {base} |", "|---|---|---|---|---|"]
    for name, items in sorted(gains.items(), key=lambda kv: -statistics.mean(g for _, g in kv[1])):
        values = [g for _, g in items]
        per_seed = ", ".join(f"s{seed}: {g:+.2f}" for seed, g in items)
        lines.append(f"| {name} | {len(values)} | {per_seed} | {statistics.mean(values):+.2f} | "
                     f"{sum(g > 0 for g in values)}/{len(values)} |")
    return lines


def make_plots(runs: list[dict], table: dict[str, dict], out_dir: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(table, key=lambda n: table[n]["mean"])
    files = []
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, name in enumerate(names):
        ax.bar(i, table[name]["mean"], color="tab:orange" if name.startswith("c2vkd") else "tab:blue", alpha=0.7)
        ax.scatter([i] * table[name]["n"], table[name]["values"], color="black", zorder=3, s=14)
    if "none" in table:
        ax.axhline(table["none"]["mean"], color="gray", ls="--", lw=1, label="no teacher")
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("val mIoU (%)")
    lo = min(min(t["values"]) for t in table.values())
    ax.set_ylim(max(0, lo - 5), max(max(t["values"]) for t in table.values()) + 3)
    ax.set_title("CamVid val mIoU per method (bars: seed mean, dots: seeds)")
    fig.tight_layout()
    files.append(f"{prefix}_miou.png")
    fig.savefig(out_dir / files[-1], dpi=90)
    plt.close(fig)

    classes = list(runs[0]["per_category_iou"])
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        items = [r for r in runs if r["name"] == name]
        means = [statistics.mean((r["per_category_iou"][c] or 0) * 100 for r in items) for c in classes]
        ax.bar([i + j * width for i in range(len(classes))], means, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, rotation=30, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Per-class IoU (seed mean)")
    fig.tight_layout()
    files.append(f"{prefix}_per_class.png")
    fig.savefig(out_dir / files[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in names:
        for k, run in enumerate(r for r in runs if r["name"] == name):
            hist = run["eval_history"]
            axes[0].plot([h["step"] for h in hist], [h["val_mean_iou"] * 100 for h in hist], marker="o", ms=3,
                         label=name if k == 0 else None, color=f"C{names.index(name)}")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("val mIoU (%)"), axes[0].legend(fontsize=7)
    axes[0].set_title("Validation mIoU over training")
    for name in names:
        run = next(r for r in runs if r["name"] == name)
        if not run["method"] == "c2vkd":
            continue
        for key in sorted({k for e in run["loss_history"] for k in e if k.startswith("loss_weighted/")}):
            steps = [e["step"] for e in run["loss_history"] if key in e]
            axes[1].plot(steps, [e[key] for e in run["loss_history"] if key in e],
                         label=f"{name}: {key.split('/')[1]}")
    axes[1].set_yscale("log"), axes[1].set_xlabel("step"), axes[1].set_ylabel("weighted loss term")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=6, ncol=2)
    axes[1].set_title("C2VKD runs: weighted loss terms")
    fig.tight_layout()
    files.append(f"{prefix}_curves.png")
    fig.savefig(out_dir / files[-1], dpi=90)
    plt.close(fig)
    return files


def report_command(table: dict, args) -> str:
    """The commands that rebuild a report. Main table: the default one with the seed counts found (the
    peers' smallest), plus one ``--runs`` command per larger seed count of a peer. Ablations: every run
    in it as a ``--runs`` spec, with the largest seed counts found (variants with fewer seeds get the
    missing ones)."""
    protocol = [f"--{k} {getattr(args, k)}" for k, default in PROTOCOL_DEFAULTS.items() if getattr(args, k) != default]
    main = max((t["n"] for name, t in table.items() if name in MAIN_SEED_RUNS), default=1)
    others = {name: t["n"] for name, t in table.items() if name not in MAIN_SEED_RUNS}
    other = max(others.values(), default=1)

    def spec(name: str) -> str:
        t = table[name]
        return shlex.quote(f"{name}:{t['method']}" + (f":{t['flags']}" if t["flags"] else ""))

    if args.suite == "main":
        low = min(others.values(), default=1)
        seeds = [f"--main_seeds {main}"] * (main != 2) + [f"--other_seeds {low}"] * (low != 1)
        commands = [" ".join(["python scripts/benchmark.py", *protocol, *seeds])]
        for n in sorted(set(others.values()) - {low}):
            specs = [spec(name) for name in sorted(others) if others[name] == n]
            commands.append(" ".join(["python scripts/benchmark.py", *protocol, f"--main_seeds {main}",
                                      f"--other_seeds {n}", "--runs", *specs]))
        return "\n".join(commands)
    specs = [spec(name) for name in sorted(table)]
    return " \\\n    ".join(["python scripts/benchmark.py --suite ablations " + " ".join(protocol)
                              + f" --main_seeds {main} --other_seeds {other} --runs", *specs])


def final_terms_table(runs: list[dict]) -> list[str]:
    """Markdown table of each C2VKD-method run's weighted loss terms at the last logged step."""
    rows = []
    for r in sorted(runs, key=lambda r: (r["name"], r["seed"])):
        if r["method"] != "c2vkd" or not r.get("loss_history"):
            continue
        last = r["loss_history"][-1]
        terms = {k.split("/")[1]: v for k, v in last.items() if k.startswith("loss_weighted/")}
        rows.append((r["name"], r["seed"], last.get("step"), terms))
    if not rows:
        return []
    names = [n for n in ("ce", "pdd", "glob", "rel", "ling") if any(n in t for *_, t in rows)]
    lines = ["", "## C2VKD loss terms at the end of training (weighted, mean of the last logging window)", "",
             "| run | seed | step | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for name, seed, step, terms in rows:
        lines.append(f"| {name} | {seed} | {step} | " + " | ".join(f"{terms[n]:.3f}" if n in terms else "-"
                                                                   for n in names) + " |")
    return lines


def write_report(args) -> str:
    out_dir = Path(args.out_dir)
    main_names = {parse_run(s)[0] for s in DEFAULT_RUNS}
    # main: the six methods and the head control; ablations: every C2VKD variant beside the plain student
    all_runs = load_runs(out_dir)
    runs = [r for r in all_runs if (r["name"] in main_names if args.suite == "main"
                                    else r["method"] in ("none", "c2vkd"))]
    if not runs:
        return ""
    table = summarise(runs)
    ratio, best_peer = gain_ratio(table)
    base = table.get("none", {}).get("mean")
    defined = ratio is not None and table[best_peer]["mean"] - base > 0
    cfg = runs[0]["config"]
    lines = [f"# CamVid distillation benchmark{' : ablations' if args.suite != 'main' else ''}", "",
             "Generated by `scripts/benchmark.py` from `runs/*.json` (do not edit by hand).", "",
             "| run | method | extra flags | seeds | val mIoU % (mean) | std | min..max | gain over none "
             "(same seeds) | minutes/run | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    same_seeds = {name: statistics.mean(g for _, g in items) for name, items in paired_gains(runs).items()}
    for name in sorted(table, key=lambda n: -table[n]["mean"]):
        t = table[name]
        gain = "+0.00" if name == "none" else f"{same_seeds[name]:+.2f}" if name in same_seeds else "n/a"
        std = f"{t['std']:.2f}" if t["n"] > 1 else "-"
        lines.append(f"| {name} | {t['method']} | {t['flags'] or '-'} | {t['n']} | {t['mean']:.2f} | {std} | "
                     f"{t['min']:.2f}..{t['max']:.2f} | {gain} | {t['wall_min']:.1f} | {t['rss']:.0f} |")
    lines.append("")
    if defined:
        lines += [f"**Gain ratio** (c2vkd gain over none) / (best peer gain, {best_peer}) = "
                  f"**{ratio:.2f}** (paper's claim: > 2). Computed from seed means.", ""]
        lines += ratio_caveats(table, paired_gains(runs), best_peer)
    elif ratio is not None:
        lines += [f"**Gain ratio: undefined.** No peer improves on the plain student (best peer: {best_peer}, "
                  f"{table[best_peer]['mean'] - base:+.2f}), so the ratio's denominator is <= 0; c2vkd's gain is "
                  f"{table['c2vkd']['mean'] - base:+.2f}. Compare the gains directly.", ""]
    lines += paired_table(runs) + [""]
    if args.suite == "main" and HEAD_CONTROL in table:
        lines += paired_table([r for r in runs if r["name"] in ("c2vkd", HEAD_CONTROL)], HEAD_CONTROL)
        lines += ["", f"`{HEAD_CONTROL}` is not a method but a control: the plain student with C2VKD's text head "
                  f"trained as its classifier and no teacher term (`{table[HEAD_CONTROL]['flags']}`: the "
                  "linguistic target is the label wherever one exists). C2VKD paired against it measures what "
                  "the teacher adds on top of that head.", ""]
    if args.suite != "main":  # each variant's ratio, then each variant against the default it changes
        lines += variant_ratios(runs, all_runs)
        for reference in ablation_references(runs):
            lines += paired_table([r for r in runs if r["name"] == reference or ablates(r) == reference],
                                  reference) + [""]
    teacher = next((r["teacher_val_mean_iou"] for r in runs if r.get("teacher_val_mean_iou")), None)
    lines += ["## Protocol", "",
              f"- data: CamVid (11 classes, void ignored), train split ({cfg['data']['train_images']}) for training, "
              f"val split (101 images) for evaluation at full 360x480 label resolution (logits upsampled)",
              f"- input resolution: images resized to {cfg['data']['resize_height']}x{cfg['data']['resize_width']}, "
              f"random scale {cfg['data']['min_scale']}-{cfg['data']['max_scale']}, crop, horizontal flip",
              f"- teacher: `{cfg['distillation']['teacher_name_or_path']}` (UperNet + ImageNet EfficientNet-Lite0), "
              f"val mIoU at this input resolution {teacher * 100:.2f}%" if teacher else "- teacher: none",
              "- student: SegFormer-B0 from random init (no ImageNet weights exist offline)",
              f"- schedule: {cfg['training']['max_steps']} steps, batch {cfg['training']['per_device_train_batch_size']}, "
              f"AdamW lr {cfg['training']['learning_rate']}, polynomial decay, warm-up {cfg['training']['warmup_steps']}",
              f"- text embeddings (C2VKD): `{cfg['distillation']['text_embeddings']}`",
              "- peers at their published recipes (DESIGN.md): KD T=1 w=1; CWD tau=4 w=3; DIST beta=gamma=1 tau=1; "
              "DKD alpha=beta=0.5 T=1; each plus cross-entropy",
              "- minutes/run is wall time on a shared 2-core CPU: it depends on how many runs shared it", "",
              "Command (runs what is missing, resumes interrupted runs, then rewrites this file):", "",
              "```bash", report_command(table, args), "```", ""]
    files = make_plots(runs, table, out_dir, "ablations" if args.suite != "main" else "results")
    lines += [f"![{f}]({f})" for f in files]
    lines += final_terms_table(runs)
    lines += ["", "## Runs", "", "| run | seed | mIoU % | minutes | steps | note |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["name"], r["seed"])):
        lines.append(f"| {r['name']} | {r['seed']} | {r['val_mean_iou'] * 100:.2f} | {r['wall_time_s'] / 60:.1f} | "
                     f"{r['steps']} | {r.get('note', '')} |")
    report = out_dir / ("RESULTS.md" if args.suite == "main" else "ABLATIONS.md")
    report.write_text("\n".join(lines) + "\n")
    if args.suite == "main":
        table_end = lines.index("## Protocol")
        update_readme(Path(args.readme), lines[4:table_end], report)
    if args.suite == "main":
        print(f"wrote {report}; gain ratio " + (f"{ratio:.2f}" if defined else "undefined (no peer beats none)"))
    else:
        print(f"wrote {report}")
    return str(report)


README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def update_readme(readme: Path, table_lines: list[str], report: Path) -> None:
    """Replaces the table between the benchmark markers of ``readme`` (when both are there)."""
    if not readme.is_file():
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    # the report's sections become subsections of README's benchmark section
    body = "\n".join(f"#{line}" if line.startswith("## ") else line for line in table_lines).strip()
    link = report.relative_to(readme.parent) if report.is_relative_to(readme.parent) else report
    readme.write_text(f"{head}{README_START}\n{body}\n\nFull protocol, plots and per-run numbers: [{link}]({link}).\n"
                      f"{README_END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--teacher", default=str(SHARED / "models" / "camvid-upernet-lite0"))
    parser.add_argument("--text_embeddings", default=str(SHARED / "data" / "clip_text" /
                                                           "camvid11_from_city_ViT16_clip_text.pth"))
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "camvid"))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "benchmark-camvid"))
    for key, default in PROTOCOL_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=int, default=default)
    parser.add_argument("--main_seeds", type=int, default=2, help="seeds for none and c2vkd")
    parser.add_argument("--other_seeds", type=int, default=1, help="seeds for the other runs")
    parser.add_argument("--suite", default="main", help="'main' (RESULTS.md) or 'ablations' (ABLATIONS.md)")
    parser.add_argument("--runs", nargs="*", default=None, help="name:method[:extra flags] (default: the six methods)")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose benchmark table is updated")
    args = parser.parse_args(argv)
    specs = args.runs or DEFAULT_RUNS
    if not args.report_only:
        # interleave seeds so that a partial table already covers every method
        plan = [(parse_run(s), seed) for seed in range(max(args.main_seeds, args.other_seeds)) for s in specs]
        for (name, method, extra), seed in plan:
            if seed in seeds_for(name, args):
                run_one(name, method, extra, seed, args)
                write_report(args)
    write_report(args)


if __name__ == "__main__":
    main()
