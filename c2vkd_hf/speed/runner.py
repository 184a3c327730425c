"""Runs the measurements: each probe in a fresh subprocess, rounds pooled, whole benchmark runs, the teacher cache
they need; :func:`measure` puts it all into one results dict, :func:`measure_memory` the memory mode's."""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .plan import (BENCHMARK_RUNS, CONFIGS, METRICS, PROTOCOLS, VARIANTS, device_name, machine, memory_rows,
                   parse_sizes, train_config, workers_for)
from .probes import load_average
from .report import summarise, summarise_memory


def run_probe(args, kind: str, name: str, module: str = "c2vkd_hf.speed.probes") -> dict:
    """One probe (``kind``: ``bare``, ``train``, ``eval`` or ``memory``; of ``module``: ``peer`` and ``peer_loss`` of
    :mod:`.peers`) for row ``name`` in a fresh Python process, so that no configuration inherits another's
    allocations, threads or caches; its result plus the subprocess wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        options, out = Path(tmp) / "args.json", Path(tmp) / "result.json"
        options.write_text(json.dumps(vars(args)))
        size = getattr(args, "memory_size", None)
        print(f"[speed] {kind} {name}{' at %dx%d' % tuple(size) if size else ''} ...", flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", module, str(options), kind, name, str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"speed probe {kind} {name} failed")
        result = json.loads(out.read_text())
    result["subprocess_wall_s"] = round(time.time() - start, 1)
    print(f"[speed]   {json.dumps({k: v for k, v in result.items() if k != 'step_s_all'})}", flush=True)
    return result


def run_benchmark(args, name: str) -> dict:
    """A whole short benchmark run (the CamVid benchmark's configuration, :mod:`c2vkd_hf.benchmark`, seed 0) of
    ``none`` or of ``c2vkd`` with the teacher cache: ``distill.py`` in a subprocess; its wall time, evaluation time
    and mIoU."""
    from types import SimpleNamespace

    from ..benchmark import shared_config
    from ..benchmark.runner import thread_env

    height, width = PROTOCOLS[args.protocol]["size"]
    steps = args.benchmark_steps
    protocol = SimpleNamespace(data_dir=args.data_dir, teacher=args.teacher, text_embeddings=args.text_embeddings,
                               protocol="short")
    work = Path(args.benchmark_work_dir) / name
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    eval_steps = max(1, steps // 4)
    config = {**shared_config(protocol, "val"), "method": "none" if name == "none" else "c2vkd", "seed": 0,
              "output_dir": str(work), "dataloader_num_workers": workers_for(args),
              "max_steps": steps, "eval_steps": eval_steps, "save_steps": eval_steps,
              "resize_height": height, "resize_width": width,
              "per_device_train_batch_size": PROTOCOLS[args.protocol]["batch"],
              "use_cpu": device_name(args) == "cpu", "bf16": args.precision == "bf16"}
    if args.decoded_cache_dir:
        config["decoded_cache_dir"] = args.decoded_cache_dir
    if name == "c2vkd_cached":
        config["teacher_cache"] = args.cache
    (work / "benchmark_config.json").write_text(json.dumps(config, indent=2))
    command = [sys.executable, "-m", "c2vkd_hf.cli.distill", str(work / "benchmark_config.json")]
    env = thread_env(args.threads)
    print(f"[speed] benchmark run {name}, {steps} steps ...", flush=True)
    load_start, start = load_average(), time.time()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run {name} failed, see {work / 'log.txt'}")
    results = json.loads((work / "results.json").read_text())
    evals = []
    for state in glob.glob(str(work / "checkpoint-*" / "trainer_state.json")):
        evals = [e["eval_runtime"] for e in json.loads(Path(state).read_text())["log_history"] if "eval_runtime" in e]
    result = {"run": name, "description": BENCHMARK_RUNS[name], "steps": results["steps"],
              "eval_steps": config["eval_steps"], "wall_time_s": results["wall_time_s"], "process_wall_s": wall,
              "eval_runtime_s_during_training": evals, "val_mean_iou": results["val_mean_iou"],
              "peak_rss_mb": results["peak_rss_mb"], "workers": config["dataloader_num_workers"],
              "threads": args.threads or os.cpu_count(), "load_start": load_start, "load_end": load_average()}
    print(f"[speed]   {json.dumps(result)}", flush=True)
    return result


def pool_rounds(results: list[dict]) -> dict:
    """One configuration's results over ``--rounds`` rounds (each round runs every configuration once, in
    turn, so slow load changes spread over all of them): step times pooled, medians over the pool."""
    if len(results) == 1:
        return results[0]
    pooled = dict(results[0])
    pooled["step_s_all"] = [x for r in results for x in r["step_s_all"]]
    pooled["step_s_median"] = statistics.median(pooled["step_s_all"])
    pooled["round_medians_s"] = [r["step_s_median"] for r in results]
    pooled["steps_timed"] = len(pooled["step_s_all"])
    pooled["load_end"] = results[-1]["load_end"]
    for key in ("peak_rss_mb", "train_peak_rss_mb", "gpu_peak_mb", "setup_peak_rss_mb", "rss_before_mb", "extra_mb"):
        values = [r[key] for r in results if r.get(key) is not None]
        pooled[key] = max(values) if values else None
    if "variants_s_all" in pooled:
        pooled["variants_s_all"] = {v: [x for r in results for x in r["variants_s_all"][v]]
                                    for v in pooled["variants_s_all"]}
        pooled["variants_s_median"] = {v: statistics.median(t) for v, t in pooled["variants_s_all"].items()}
    for key in ("teacher_or_cache_s_median", "loss_forward_s_median", "eval_s"):
        values = [r[key] for r in results if r.get(key) is not None]
        pooled[key] = statistics.median(values) if values else None
    return pooled


def build_teacher_cache(cache_dir: str, config_for) -> None:
    """Builds the teacher cache ``cache_dir`` (outside the timed subprocesses) when it is missing or incomplete:
    setting up the training of ``config_for(output_dir)`` (a ``distill.py`` configuration whose ``teacher_cache``
    is ``cache_dir``) opens the cache and builds what it lacks."""
    from transformers import HfArgumentParser, TrainingArguments

    from ..cache import cache_status
    from ..config import DataArguments, DistillationArguments
    from ..jobs import prepare_training_args, setup_distillation

    if cache_status(cache_dir).complete:
        return
    with tempfile.TemporaryDirectory() as tmp:
        parsed = HfArgumentParser((DistillationArguments, DataArguments, TrainingArguments)).parse_dict(
            config_for(tmp))
        prepare_training_args(parsed[2])
        print(f"[speed] building the teacher cache {cache_dir} ...", flush=True)
        setup_distillation(*parsed)


def ensure_cache(args) -> None:
    """The teacher cache of row (c), ``args.cache`` (:func:`build_teacher_cache`)."""
    build_teacher_cache(args.cache, lambda output_dir: train_config(args, "c2vkd_cached", output_dir))


def measure(args, command: str) -> dict:
    """Every row of the speed report, measured side by side: ``args.rounds`` rounds of the training rows (each round
    runs every row once, in turn), the metric rows (CamVid protocol only) and the whole benchmark runs
    (``args.benchmark_steps`` > 0); the ratios, the verdict and ``fidelity.json`` from ``args.out_dir`` when
    present. ``command`` is recorded as the command that reproduces it."""
    start = time.time()
    info = machine(args)
    ensure_cache(args)
    names = list(CONFIGS) + (list(VARIANTS) if args.variants == "true" else [])
    rounds = [[run_probe(args, "bare" if name == "bare" else "train", name) for name in names]
              for _ in range(args.rounds)]
    training = [pool_rounds([r[i] for r in rounds]) for i in range(len(names))]
    evaluation = [run_probe(args, "eval", name) for name in METRICS] if args.protocol == "camvid" else []
    runs = [run_benchmark(args, name) for name in BENCHMARK_RUNS] if args.benchmark_steps > 0 else []
    ratios, verdict = summarise(training)
    t = {r["config"]: r for r in training}
    a0, a, b, c = t["bare"], t["student_only"], t["c2vkd_online"], t["c2vkd_cached"]
    fidelity_path = Path(args.out_dir) / "fidelity.json"
    results = {
        "command": command, "machine": info, "teacher": args.teacher, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "eval_repeats": args.eval_repeats,
        "bare_step_s": a0["step_s_median"],
        "student_only_step_s": a["step_s_median"], "c2vkd_online_step_s": b["step_s_median"],
        "c2vkd_cached_step_s": c["step_s_median"],
        "student_only_peak_rss_mb": a["peak_rss_mb"], "c2vkd_online_peak_rss_mb": b["peak_rss_mb"],
        "c2vkd_cached_peak_rss_mb": c["peak_rss_mb"],
        "student_only_train_peak_rss_mb": a["train_peak_rss_mb"],
        "c2vkd_online_train_peak_rss_mb": b["train_peak_rss_mb"],
        "c2vkd_cached_train_peak_rss_mb": c["train_peak_rss_mb"],
        "decoded_cache_mb": a.get("decoded_cache_mb"), "eval_s": a.get("eval_s"),
        "ratios": ratios, "verdict": verdict, "training": training, "evaluation": evaluation,
        "benchmark_runs": runs,
        "fidelity": json.loads(fidelity_path.read_text()) if fidelity_path.is_file() else None,
        "wall_time_s": round(time.time() - start, 1),
    }
    if evaluation:
        results.update({
            "eval_streaming_images_per_s": evaluation[0]["images_per_s"],
            "eval_keep_all_images_per_s": evaluation[1]["images_per_s"],
            "eval_streaming_peak_rss_mb": evaluation[0]["peak_rss_mb"],
            "eval_keep_all_peak_rss_mb": evaluation[1]["peak_rss_mb"]})
    return results


def ensure_memory_teacher(args) -> None:
    """Builds the memory mode's teacher when ``args.memory_teacher`` is not a folder yet: a DeepLabV3+ on the timm
    backbone ``args.memory_teacher_backbone`` (random init, nothing downloaded) for the synthetic scenes' classes,
    saved there (outside the measured subprocesses)."""
    from ..data.synthetic import SYNTHETIC_CLASSES
    from ..models import build_teacher

    folder = Path(args.memory_teacher)
    if (folder / "config.json").is_file():
        return
    print(f"[speed] building the teacher DeepLabV3+ {args.memory_teacher_backbone} (random init) in {folder} ...",
          flush=True)
    import torch

    torch.manual_seed(0)
    teacher = build_teacher("deeplabv3plus", args.memory_teacher_backbone, id2label=dict(enumerate(SYNTHETIC_CLASSES)))
    teacher.save_pretrained(folder)


def measure_memory(args, command: str) -> dict:
    """The memory mode (``scripts/speed.py --memory``): every row of :func:`~.plan.memory_rows` at every size of
    ``args.memory_sizes``, each in its own fresh subprocess (:func:`~.probes.memory_steps`), then the ratios to the
    student-only row at the same size and the growth between the sizes (:func:`~.report.summarise_memory`).
    ``command`` is recorded as the command that reproduces it."""
    from types import SimpleNamespace

    start = time.time()
    info = machine(args)
    rows = memory_rows(args)
    sizes = parse_sizes(args.memory_sizes)
    if any(name != "student_only" for name in rows):
        ensure_memory_teacher(args)
    measured = []
    for size in sizes:
        sized = SimpleNamespace(**{**vars(args), "memory_size": list(size)})
        measured += [run_probe(sized, "memory", name) for name in rows]
    summary = summarise_memory(measured, sizes)
    return {"command": command, "machine": info, "student": args.memory_student,
            "student_overrides": args.memory_student_overrides, "teacher": f"DeepLabV3+ "
            f"{args.memory_teacher_backbone} (random init)", "teacher_folder": args.memory_teacher, "sizes": [list(s) for s in sizes],
            "batch": args.memory_batch, "warmup": args.warmup, "steps": args.steps,
            "rows": {name: description for name, (description, _) in rows.items()}, "measured": measured,
            **summary, "load_average_at_end": load_average(), "wall_time_s": round(time.time() - start, 1)}
