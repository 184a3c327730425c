"""Runs one benchmark configuration: ``c2vkd-distill`` in a subprocess with its own folder (resumed from its last
checkpoint when interrupted, a lock per run so several driver processes can share the work), then folds its
results into the run's record."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .plan import mark_stale, shared_config, table_names, teacher_cache_dir
from .records import record_path, write_json


def work_folder(work_dir: Path, protocol: str, name: str, seed: int, split: str) -> Path:
    """The folder where run ``name`` with ``seed`` of ``protocol`` trains on ``split``'s training set."""
    return Path(work_dir) / protocol / (f"{name}-seed{seed}" + ("-selection" if split == "selection" else ""))


def thread_env(threads: int | None) -> dict | None:
    """The environment for a training subprocess limited to ``threads`` CPU threads (``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``; torch reads them when it starts), or ``None`` (inherit this process's) when not given.
    Two 2-thread trainings on 2 cores spin against each other; two 1-thread ones make about 4x the steps."""
    if not threads:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def held(lock: Path) -> bool:
    """Whether a live process holds the run's lock file (one left by a killed process holds nothing)."""
    try:
        os.kill(int(lock.read_text()), 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False


def claim(lock: Path) -> bool:
    """Takes the run's lock file unless a live process holds it (a lock left by a killed process is taken over)."""
    if held(lock):
        return False
    lock.write_text(str(os.getpid()))
    return True


def run_one(name: str, method: str, extra: list[str], seed: int, split: str, args) -> None:
    """Trains ``name`` with ``seed`` on ``split``'s training set (resuming an interrupted run) and adds its
    result to the run's record."""
    path = record_path(Path(args.out_dir), args.protocol, name, seed)
    record = json.loads(path.read_text()) if path.is_file() else {}
    stale = bool(record) and bool(mark_stale([dict(record)], args.spec, args.protocol)[0]["stale"])
    if record.get(f"{split}_mean_iou") is not None and not stale:
        return
    work = work_folder(Path(args.work_dir), args.protocol, name, seed, split)
    work.mkdir(parents=True, exist_ok=True)
    if not claim(work / "RUNNING"):
        print(f"[skip] {name} seed {seed} {split}: another benchmark process is running it", flush=True)
        return
    if stale:  # a run of another configuration: trained again from scratch, its record replaced (git keeps the old)
        print(f"[stale] {name} seed {seed}: its record is not today's configuration; training it again", flush=True)
        path.unlink()
    if (work / "results.json").is_file():
        old = {"method": method, "extra_flags": extra, "config": json.loads((work / "results.json").read_text())["config"]}
        if mark_stale([old], args.spec, args.protocol)[0]["stale"]:  # the folder holds another configuration's run
            work.rename(work.with_name(work.name + f"-stale-{int(time.time())}"))
            work.mkdir(parents=True)
            claim(work / "RUNNING")
    teacher = args.spec.teacher_sha256() if method != "none" else None  # the weights this run distils from
    config = {**shared_config(args, split), "method": method, "seed": seed, "output_dir": str(work)}
    cache = teacher_cache_dir(args, split, method, extra)
    if cache:
        config["teacher_cache"] = cache
    config_file = work / "benchmark_config.json"
    config_file.write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "c2vkd_hf.cli.distill"]
    cmd += ([f"--{k}={v}" for k, v in config.items()] + extra) if extra else [str(config_file)]
    env = thread_env(getattr(args, "threads", None))
    start = time.time()
    finished = work / "results.json"
    steps = args.spec.protocols[args.protocol]["max_steps"]
    if not (finished.is_file() and json.loads(finished.read_text()).get("steps") == steps):
        print(f"[run] {args.protocol} {name} seed {seed} {split}: {' '.join(extra) or '(defaults)'}", flush=True)
        with open(work / "log.txt", "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            (work / "RUNNING").unlink(missing_ok=True)
            print(f"[fail] {name} seed {seed} {split}: exit {proc.returncode}, see {work / 'log.txt'}", flush=True)
            return
    (work / "RUNNING").unlink(missing_ok=True)
    results = json.loads(finished.read_text())
    id2label = json.loads((work / "config.json").read_text())["id2label"]
    record = json.loads(path.read_text()) if path.is_file() else {}  # another process may have added a split
    record.pop("relabelled_from", None)
    record.update({
        "protocol": args.protocol, "name": name, "method": method, "seed": seed,
        "text_head": bool(results.get("text_head")), "extra_flags": extra,
        "ablation": None if name in table_names() else name,
        f"{split}_mean_iou": results["val_mean_iou"],
        # the teacher's score on the official val split only (a selection run evaluates it on the held-out frames)
        "teacher_val_mean_iou": (results.get("teacher_val_mean_iou") if split == "val" else None)
        or record.get("teacher_val_mean_iou"),
        "teacher_sha256": teacher,
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
        "torch_threads": results.get("torch_threads"),
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
