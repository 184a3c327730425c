#!/usr/bin/env python
"""Speed benchmark: how far is a training step from the student's own compute, and what do the teacher
and its cache add?

    python scripts/speed.py                       # CamVid protocol; writes benchmarks/speed/{results.json,RESULTS.md}
    python scripts/speed.py --steps 20 --warmup 3 --data_dir ../shared/data/camvid
    python scripts/speed.py --benchmark_steps 0   # step times only, no whole benchmark runs
    python scripts/speed.py --precision bf16 --protocol large --out_dir benchmarks/speed/cuda   # on a GPU

Measured side by side in one invocation, each configuration in its own fresh subprocess, median over
``--steps`` steps after ``--warmup`` warm-up steps:

* (a0) the **bare student step**, the limit: SegFormer-B0 forward, cross-entropy, backward and AdamW
  on one batch of tensors already in memory (no data loading, no Trainer). Three variants are timed
  interleaved in the same subprocess (one step of each in turn, so load changes hit them alike):
  ``channels_last`` weights (what the pipeline uses, ``--channels_last``), contiguous weights, and
  ``channels_last`` plus gradient clipping at norm 1 (what ``Trainer`` does by default,
  ``max_grad_norm=1.0``).
* (a) the student alone in the real pipeline (``setup_distillation`` + ``DistillationTrainer``,
  ``--method none``), (b) C2VKD with the teacher run online each step, (c) C2VKD replaying the
  teacher cache (``--teacher_cache``; built first, outside the timed subprocess, if missing). The
  step time is the wall time between consecutive ``on_step_end`` callbacks (data loading, teacher or
  cache replay, forward, loss, backward, clipping, optimizer and scheduler step, logging).
* variants of (a) that justify the defaults: the files decoded at every step
  (``--decoded_cache false``, what the pipeline did before) and one data-loader worker.
* one evaluation of (a)'s student over the whole validation split (``Trainer.evaluate``: batched
  forward, loss, streaming mIoU at full label resolution).
* the wall time of whole short benchmark runs (``scripts/benchmark.py``'s configuration: 400 steps,
  evaluation every 100 steps and at the end, checkpoints) of ``none`` and of ``c2vkd`` with the
  teacher cache, ``--benchmark_steps`` steps (0: skip).

The CamVid protocol (``--protocol camvid``): images resized to 120x160, random scale 0.75-1.5, crop
120x160, flip, batch 8, SegFormer-B0 from random init, the reference UperNet + EfficientNet-Lite0
teacher, AdamW. ``--protocol large``: the same at 512x512, batch 16 (a GPU-sized step).

Device: CUDA when available (``--device``), else the CPU; ``--precision bf16`` trains under bf16
autocast (``TrainingArguments(bf16=True)``; the bare step uses ``torch.autocast``). On CUDA every
timestamp is taken after ``torch.cuda.synchronize()`` and peak GPU memory is reported too. Threads:
``--threads`` (default: torch's, one per core); the thread count and the load average at the start
and end of each timed section are recorded with each figure. Data-loader workers: ``--workers``
(default: 0 on a CPU-only machine, where the decoded cache makes loading a few percent of a step and
a worker would compete with the compute threads for the cores; ``min(4, cores - 1)`` on a GPU).

Peak memory, per subprocess: ``ru_maxrss`` (the process's peak resident set) and, for training, the
peak resident set during the training steps only (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs`` once the models and data are loaded).

Also measured (as before): evaluation-metric throughput of ``StreamingMeanIoU`` against keeping every
prediction (``evaluate``'s ``mean_iou``, emulated). ``--report_only`` rewrites ``RESULTS.md`` from an
existing ``results.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFIGS = {
    "bare": "(a0) bare student step on tensors in memory (the limit)",
    "student_only": "(a) student alone in the pipeline (method none)",
    "c2vkd_online": "(b) C2VKD, teacher run online each step",
    "c2vkd_cached": "(c) C2VKD, teacher cache replayed",
}
VARIANTS = {
    "student_only_files": "(a) with --decoded_cache false (files decoded every step, as before)",
    "student_only_worker": "(a) with --dataloader_num_workers 1",
}
BENCHMARK_RUNS = {"none": "none", "c2vkd_cached": "c2vkd with --teacher_cache"}
#: The same configuration before this change (benchmarks/camvid/RESULTS.md, seeds 0-4 of `none`: 11.2 min a run;
#: benchmarks/camvid/runs/c2vkd-seed*.json: 21.4 min a run with the online teacher).
OLD_BENCHMARK_MIN = {"none": 11.2, "c2vkd": 21.4}
PROTOCOLS = {"camvid": {"size": (120, 160), "batch": 8}, "large": {"size": (512, 512), "batch": 16}}
METRICS = {
    "streaming": "StreamingMeanIoU (confusion matrix)",
    "keep_all": "keep all predictions, then per-image histograms (evaluate's mean_iou, emulated)",
}


def device_name(args) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def workers_for(args) -> int:
    if args.workers is not None:
        return args.workers
    return 0 if device_name(args) == "cpu" else max(0, min(4, (os.cpu_count() or 1) - 1))


def train_config(args, name: str, output_dir: str) -> dict:
    """The CamVid benchmark's distill.py configuration (scripts/benchmark.py) for one speed row."""
    data = Path(args.data_dir)
    protocol = PROTOCOLS[args.protocol]
    height, width = protocol["size"]
    config = {
        "train_images": str(data / "train"), "train_labels": str(data / "trainannot"),
        "validation_images": str(data / "val"), "validation_labels": str(data / "valannot"),
        "labels_file": str(data / "classes.json"), "resize_height": height, "resize_width": width,
        "min_scale": 0.75, "max_scale": 1.5, "hflip": True, "student_name_or_path": "segformer-b0",
        "max_steps": args.warmup + args.steps, "per_device_train_batch_size": protocol["batch"],
        "per_device_eval_batch_size": 8, "learning_rate": 6e-4,
        "lr_scheduler_type": "polynomial", "warmup_steps": 2, "weight_decay": 0.01, "eval_strategy": "no",
        "save_strategy": "no", "logging_steps": 20, "report_to": "none", "disable_tqdm": True, "seed": 0,
        "output_dir": output_dir, "method": "none" if name.startswith("student_only") else "c2vkd",
        "dataloader_num_workers": 1 if name == "student_only_worker" else workers_for(args),
        "use_cpu": device_name(args) == "cpu", "bf16": args.precision == "bf16",
    }
    if name == "student_only_files":
        config["decoded_cache"] = False
    if args.decoded_cache_dir:
        config["decoded_cache_dir"] = args.decoded_cache_dir
    if not config["method"] == "none":
        config.update(teacher_name_or_path=args.teacher, text_embeddings=args.text_embeddings)
    if name == "c2vkd_cached":
        config["teacher_cache"] = args.cache
    return config


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_peak_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def _set_threads(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def worker_bare(args, name: str) -> dict:
    """(a0): the student's own step on one batch already in memory, three variants interleaved."""
    import copy

    import torch

    from c2vkd_hf.losses.common import cross_entropy
    from c2vkd_hf.models import load_student

    threads = _set_threads(args)
    device = device_name(args)
    protocol = PROTOCOLS[args.protocol]
    height, width = protocol["size"]
    torch.manual_seed(0)
    base = load_student("segformer-b0", {i: f"class{i}" for i in range(11)}).to(device)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(protocol["batch"], 3, height, width, generator=generator).to(device)
    labels = torch.randint(0, 11, (protocol["batch"], height, width), generator=generator).to(device)
    variants = {"channels_last": (True, False), "contiguous": (False, False), "channels_last_clip": (True, True)}
    state = {}
    for variant, (channels_last, _) in variants.items():
        model = copy.deepcopy(base).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        state[variant] = (model, torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.01))
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if args.precision == "bf16"
                else torch.autocast(device, enabled=False))

    def step(variant: str) -> float:
        model, optimizer = state[variant]
        _sync(device)
        start = time.perf_counter()
        with autocast:
            logits = model(pixel_values=pixels).logits
        loss = cross_entropy(logits.float(), labels)
        loss.backward()
        if variants[variant][1]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for variant in variants:
            step(variant)
    load_start = _load()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.steps):
        for variant in variants:
            times[variant].append(step(variant))
    result = {
        "config": name, "description": CONFIGS[name], "steps_timed": args.steps, "threads": threads,
        "load_start": load_start, "load_end": _load(),
        "step_s_median": statistics.median(times["channels_last"]),
        "variants_s_median": {v: statistics.median(t) for v, t in times.items()},
        "variants_s_all": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "step_s_all": [round(s, 4) for s in times["channels_last"]],
        "peak_rss_mb": _peak_rss_mb(), "train_peak_rss_mb": None, "gpu_peak_mb": _gpu_peak_mb(device),
    }
    return result


def worker_train(args, name: str) -> dict:
    """One pipeline configuration: ``warmup + steps`` real Trainer steps; timings and memory."""
    import torch
    from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

    from c2vkd_hf.config import DataArguments, DistillationArguments
    from c2vkd_hf.jobs import prepare_training_args, setup_distillation

    threads = _set_threads(args)
    device = device_name(args)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.load: list[list[float]] = []

        def on_train_begin(self, *a, **k):
            _sync(device)
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            _sync(device)
            self.ends.append(time.perf_counter())
            if len(self.ends) - 1 == args.warmup:
                self.load.append(_load())

    with tempfile.TemporaryDirectory() as tmp:
        config = train_config(args, name, tmp)
        dist_args, data_args, training_args = HfArgumentParser(
            (DistillationArguments, DataArguments, TrainingArguments)).parse_dict(config)
        prepare_training_args(training_args)
        timer = StepTimes()
        setup = setup_distillation(dist_args, data_args, training_args, callbacks=[timer])
        trainer = setup.trainer
        spent: dict[str, list[float]] = {"teacher": [], "loss_forward": []}

        def timed(fn, key):
            def wrapper(*a, **k):
                _sync(device)
                start = time.perf_counter()
                result = fn(*a, **k)
                _sync(device)
                spent[key].append(time.perf_counter() - start)
                return result
            return wrapper

        if trainer.teacher_source is not None:
            trainer.teacher_source.outputs = timed(trainer.teacher_source.outputs, "teacher")
        loss_module = trainer.model.distill_loss
        loss_module.forward = timed(loss_module.forward, "loss_forward")
        setup_peak = _peak_rss_mb()
        reset = _reset_hwm()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        load_end = _load()
        train_peak = _vm_hwm_mb() if reset else None
        gpu_peak = _gpu_peak_mb(device)
        eval_s = None
        if name == "student_only":  # one whole evaluation, as the benchmark runs it
            _sync(device)
            start = time.perf_counter()
            trainer.evaluate()
            _sync(device)
            eval_s = time.perf_counter() - start
        decoded = type(trainer.train_dataset).__name__ == "DecodedDataset"
        decoded_mb = None
        if decoded:
            decoded_mb = (trainer.train_dataset.split.nbytes + trainer.eval_dataset.split.nbytes) / 2**20
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup:]
    median = lambda xs: statistics.median(xs[args.warmup:]) if len(xs) > args.warmup else None  # noqa: E731
    return {
        "config": name, "description": {**CONFIGS, **VARIANTS}[name], "steps_timed": len(steps),
        "threads": threads, "workers": training_args.dataloader_num_workers, "load_start": timer.load[0] if timer.load
        else None, "load_end": load_end,
        "step_s_median": statistics.median(steps), "step_s_all": [round(s, 4) for s in steps],
        "teacher_or_cache_s_median": median(spent["teacher"]),
        "loss_forward_s_median": median(spent["loss_forward"]),
        "eval_s": eval_s, "decoded_cache": decoded, "decoded_cache_mb": decoded_mb,
        "peak_rss_mb": _peak_rss_mb(), "setup_peak_rss_mb": setup_peak, "train_peak_rss_mb": train_peak,
        "gpu_peak_mb": gpu_peak,
    }


def _camvid_labels(data_dir: Path):
    import numpy as np
    import PIL.Image

    void = json.loads((data_dir / "classes.json").read_text()).get("ignore_index", 11)
    labels = []
    for path in sorted((data_dir / "valannot").glob("*.png")):
        label = np.asarray(PIL.Image.open(path), dtype=np.int64)
        labels.append(np.where(label == void, 255, label))
    return labels


def _keep_all_mean_iou(predictions, references, num_labels: int, ignore_index: int = 255):
    """What ``evaluate``'s ``mean_iou`` computes, the way it does: per-image histograms of intersection,
    union, prediction and label areas over all kept maps, summed, then IoU per class and the mean."""
    import numpy as np

    total_i = np.zeros(num_labels)
    total_u = np.zeros(num_labels)
    for pred, label in zip(predictions, references):
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        area_i = np.histogram(inter, bins=num_labels, range=(0, num_labels - 1))[0]
        area_p = np.histogram(pred, bins=num_labels, range=(0, num_labels - 1))[0]
        area_l = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_i += area_i
        total_u += area_p + area_l - area_i
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = total_i / total_u
    return float(np.nanmean(iou))


def worker_eval(args, name: str) -> dict:
    """One metric: stream or keep every (prediction, label) pair of ``eval_repeats`` passes over the
    CamVid validation labels, in batches of 8."""
    import numpy as np
    import torch

    from c2vkd_hf.metrics import StreamingMeanIoU

    labels = _camvid_labels(Path(args.data_dir))
    num_labels = 11
    pairs = [(np.where(np.roll(lab, 7, axis=1) == 255, 0, np.roll(lab, 7, axis=1)), lab)
             for lab in labels]
    base_peak = _peak_rss_mb()  # inputs loaded: what follows is the metric's own memory
    count = len(pairs) * args.eval_repeats
    start = time.perf_counter()
    if name == "streaming":
        metric = StreamingMeanIoU(num_labels)
        for _ in range(args.eval_repeats):
            for first in range(0, len(pairs), 8):
                chunk = pairs[first:first + 8]
                metric.update(torch.from_numpy(np.stack([p for p, _ in chunk])),
                              torch.from_numpy(np.stack([l for _, l in chunk])))
        miou = metric.compute()["mean_iou"]
    else:
        kept_preds, kept_labels = [], []
        for _ in range(args.eval_repeats):
            for first in range(0, len(pairs), 8):
                chunk = pairs[first:first + 8]
                kept_preds.extend(p.copy() for p, _ in chunk)  # a Trainer hands over fresh arrays each batch
                kept_labels.extend(l.copy() for _, l in chunk)
        miou = _keep_all_mean_iou(kept_preds, kept_labels, num_labels)
    seconds = time.perf_counter() - start
    return {"metric": name, "description": METRICS[name], "images": count, "seconds": seconds,
            "images_per_s": count / seconds, "mean_iou": miou, "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_above_inputs_mb": _peak_rss_mb() - base_peak}


def run_benchmark(args, name: str) -> dict:
    """A whole short benchmark run (the CamVid benchmark's configuration, :mod:`c2vkd_hf.benchmark`, seed 0) of
    ``none`` or of ``c2vkd`` with the teacher cache: ``distill.py`` in a subprocess; its wall time, evaluation time
    and mIoU."""
    from types import SimpleNamespace

    from c2vkd_hf.benchmark import shared_config

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
    command = [sys.executable, str(ROOT / "scripts" / "distill.py"), str(work / "benchmark_config.json")]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"[speed] benchmark run {name}, {steps} steps ...", flush=True)
    load_start, start = _load(), time.time()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
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
              "threads": args.threads or os.cpu_count(), "load_start": load_start, "load_end": _load()}
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
    for key in ("peak_rss_mb", "train_peak_rss_mb", "gpu_peak_mb", "setup_peak_rss_mb"):
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


def summarise(training: list[dict]) -> tuple[dict, str]:
    """The ratios and the verdict. Step-time ratios are paired within a round (the configurations of one
    round ran back to back under similar load) and the median over rounds is reported; memory ratios
    use the peaks over all rounds."""
    t = {r["config"]: r for r in training}
    a0, a, b, c = t["bare"], t["student_only"], t["c2vkd_online"], t["c2vkd_cached"]

    def step_ratio(x: dict, y: dict) -> float:
        xs, ys = x.get("round_medians_s"), y.get("round_medians_s")
        if xs and ys:
            return statistics.median(p / q for p, q in zip(xs, ys))
        return x["step_s_median"] / y["step_s_median"]

    ratios = {
        "student_over_bare_step": step_ratio(a, a0),
        "cached_over_student_step": step_ratio(c, a),
        "online_over_student_step": step_ratio(b, a),
        "online_over_cached_step": step_ratio(b, c),
        "cached_over_student_peak_rss": c["peak_rss_mb"] / a["peak_rss_mb"],
        "online_over_student_peak_rss": b["peak_rss_mb"] / a["peak_rss_mb"],
        "cached_over_student_train_peak_rss": _ratio(c["train_peak_rss_mb"], a["train_peak_rss_mb"]),
        "cached_over_student_gpu_peak": _ratio(c.get("gpu_peak_mb"), a.get("gpu_peak_mb")),
    }
    for name in VARIANTS:
        if name in t:
            ratios[f"{name}_over_student_step"] = step_ratio(t[name], a)
    if a.get("round_medians_s"):
        ratios["per_round"] = {
            "student_over_bare_step": [p / q for p, q in zip(a["round_medians_s"], a0["round_medians_s"])],
            "cached_over_student_step": [p / q for p, q in zip(c["round_medians_s"], a["round_medians_s"])]}
    extra = ratios["cached_over_student_step"] * a["step_s_median"] - a["step_s_median"]
    cache_s = c["teacher_or_cache_s_median"] or 0.0
    verdict = (f"Where (c)'s extra time over (a) goes (about {extra:.3f} s a step at (a)'s median): {cache_s:.3f} s "
               f"reading and replaying the cache; the rest is C2VKD's own work (the text head's pixel-text products, the "
               f"global projector, PDD at the label grid, the relation term: forward {c['loss_forward_s_median']:.3f}"
               f" s vs {a['loss_forward_s_median']:.3f} s for plain cross-entropy, plus their backward; a profile of "
               "each part: docs/RECIPES.md, speed section). With the data pipeline's cost gone from (a), that work is a "
               "larger share of (c)'s step than before.")
    missed = [f"(a)/(a0) = {ratios['student_over_bare_step']:.2f} > 1.25"] if ratios["student_over_bare_step"] > 1.25 else []
    if ratios["cached_over_student_step"] > 1.10:
        missed.append(f"(c)/(a) = {ratios['cached_over_student_step']:.2f} > 1.10")
    if missed:
        verdict = "**Target missed**: " + "; ".join(missed) + ". " + verdict
    return ratios, verdict


def run_worker(args, kind: str, name: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, __file__, "--worker", kind, "--name", name, "--worker_out", out,
               "--data_dir", args.data_dir, "--teacher", args.teacher, "--text_embeddings", args.text_embeddings,
               "--cache", args.cache, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--eval_repeats", str(args.eval_repeats), "--device", args.device, "--precision", args.precision,
               "--protocol", args.protocol]
    for flag in ("threads", "workers", "decoded_cache_dir"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    print(f"[speed] {kind} {name} ...", flush=True)
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {kind} {name} failed")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    result["subprocess_wall_s"] = round(time.time() - start, 1)
    print(f"[speed]   {json.dumps({k: v for k, v in result.items() if k != 'step_s_all'})}", flush=True)
    return result


def ensure_cache(args) -> None:
    """Builds the teacher cache (outside the timed subprocesses) when it is missing or incomplete."""
    from c2vkd_hf.cache import cache_status

    if cache_status(args.cache).complete:
        return
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(train_config(args, "c2vkd_cached", tmp)))
        subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_teacher.py"), str(config_path)], check=True)


def machine(args) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    device = device_name(args)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": os.getloadavg(),
            "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "precision": args.precision, "protocol": args.protocol, "workers": workers_for(args),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _ratio(x, y):
    return x / y if x is not None and y else None


def write_report(results: dict, path: Path) -> None:
    t = {r["config"]: r for r in results["training"]}
    e = {r["metric"]: r for r in results.get("evaluation", [])}
    ratio = results["ratios"]
    m = results["machine"]
    protocol = PROTOCOLS[m.get("protocol", "camvid")]

    def mb(v):
        return "-" if v is None else f"{v:.0f}"

    def s(v):
        return "-" if v is None else f"{v:.3f}"

    def r2(v):
        return "-" if v is None else f"{v:.2f}"

    def load(v):
        return "-" if not v else "/".join(f"{x:.1f}" for x in v)

    lines = [
        "# Speed: the training step against the student's own compute; the teacher online vs its cache",
        "",
        "Generated by `scripts/speed.py` (do not edit by hand). Raw numbers: [results.json](results.json).",
        "",
        "Command:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, device {m.get('device', 'cpu')}"
        f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, precision {m.get('precision', 'fp32')}, torch "
        f"{m['torch']}, {m['torch_threads']} torch threads, {m.get('workers', 0)} data-loader workers. The machine "
        f"is shared with other jobs (load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} "
        f"on {m['cores']} cores; each row below gives the 1-minute load average at the start and end of its timed "
        "steps), so absolute times are inflated and noisy; the rows ran back to back and the ratios are the "
        "meaningful numbers.",
        "",
        f"Protocol: CamVid, {protocol['size'][0]}x{protocol['size'][1]} crops (random scale 0.75-1.5, flip), batch "
        f"{protocol['batch']}, SegFormer-B0 (random init), teacher `{results['teacher']}`; median over "
        f"{results['steps']} steps after {results['warmup']} warm-up steps; each configuration in a fresh subprocess"
        + (f", every configuration run {results['rounds']} times in turn and its steps pooled" if results.get("rounds", 1) > 1
           else "") + ".",
        "",
        "## Training step",
        "",
        "| configuration | step s (median) | / (a0) | teacher / cache s | loss-module forward s | threads | workers | "
        "load start/end | peak RSS MiB | peak RSS during steps MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bare = t["bare"]["step_s_median"]
    for name in [*CONFIGS, *VARIANTS]:
        if name not in t:
            continue
        r = t[name]
        lines.append(f"| {r['description']} | {s(r['step_s_median'])} | {r2(_ratio(r['step_s_median'], bare))} | "
                     f"{s(r.get('teacher_or_cache_s_median'))} | {s(r.get('loss_forward_s_median'))} | "
                     f"{r.get('threads', '-')} | {r.get('workers', '-')} | {load(r.get('load_start'))} -> "
                     f"{load(r.get('load_end'))} | {mb(r['peak_rss_mb'])} | {mb(r.get('train_peak_rss_mb'))} |")
    v = t["bare"]["variants_s_median"]
    a = t["student_only"]
    lines += [
        "",
        f"- **(a)/(a0) = {ratio['student_over_bare_step']:.2f}** (target <= 1.25): the pipeline's overhead over the "
        "student's own step (data, Trainer, logging, gradient clipping).",
        f"- **(c)/(a) = {ratio['cached_over_student_step']:.2f}** step time (target <= 1.10); peak memory "
        f"**{ratio['cached_over_student_peak_rss']:.2f}** (target <= 1.3), during the steps only "
        f"{r2(ratio['cached_over_student_train_peak_rss'])}.",
        f"- (b)/(a) = {ratio['online_over_student_step']:.2f} step time, {ratio['online_over_student_peak_rss']:.2f} "
        f"peak memory; (b)/(c) = {ratio['online_over_cached_step']:.2f}.",
        f"- (a0) variants, interleaved in one process: channels_last {v['channels_last']:.3f} s, contiguous "
        f"{v['contiguous']:.3f} s (ratio {v['channels_last'] / v['contiguous']:.2f}), channels_last + gradient "
        f"clipping at norm 1 {v['channels_last_clip']:.3f} s (ratio to no clipping "
        f"{v['channels_last_clip'] / v['channels_last']:.2f}; clipping is kept: it is Trainer's default).",
    ]
    if ratio.get("per_round"):
        lines.append("- Ratios are paired within each round and their median over rounds is given: per round, "
                     "(a)/(a0) " + ", ".join(f"{x:.2f}" for x in ratio["per_round"]["student_over_bare_step"])
                     + "; (c)/(a) " + ", ".join(f"{x:.2f}" for x in ratio["per_round"]["cached_over_student_step"])
                     + " (the table's medians pool the steps of all rounds, taken at different loads).")
    if "student_only_files" in t:
        lines.append(f"- Decoded-dataset cache: (a) takes {a['step_s_median']:.3f} s with it and "
                     f"{t['student_only_files']['step_s_median']:.3f} s decoding the files every step (paired "
                     f"ratio {r2(ratio.get('student_only_files_over_student_step'))}); its arrays "
                     f"for CamVid at this protocol take {mb(a.get('decoded_cache_mb'))} MiB on disk (train at the "
                     "largest drawable scale, validation at the eval size, masks at full resolution).")
    if "student_only_worker" in t:
        w = t["student_only_worker"]
        lines.append(f"- One data-loader worker ({w.get('threads')} torch threads in the main process): "
                     f"{w['step_s_median']:.3f} s vs {a['step_s_median']:.3f} s with the data loaded in the main "
                     f"process (paired ratio {r2(ratio.get('student_only_worker_over_student_step'))}, per round "
                     + ", ".join(f"{p / q:.2f}" for p, q in zip(w.get("round_medians_s", []),
                                                                 a.get("round_medians_s", []))) + ").")
    if a.get("eval_s") is not None:
        lines.append(f"- One evaluation of the whole validation split (101 images, batch 8, labels at 360x480): "
                     f"{a['eval_s']:.1f} s, about {a['eval_s'] / a['step_s_median']:.0f} training steps.")
    lines += ["", results["verdict"], ""]
    runs = results.get("benchmark_runs") or []
    if runs:
        lines += [
            "## Whole short benchmark runs",
            "",
            f"`scripts/benchmark.py`'s configuration (seed 0, {runs[0]['steps']} steps, evaluation every "
            f"{runs[0]['eval_steps']} steps and at the end, a checkpoint at each evaluation), run by `distill.py` "
            "in a subprocess. Evaluations are kept at every 100 steps over the whole validation split: with the "
            "decoded cache one costs a few training steps.",
            "",
            "| run | wall time min | before (benchmarks/camvid) | speed-up | evaluations s | val mIoU % | "
            "workers | load start/end |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            old = OLD_BENCHMARK_MIN["none" if r["run"] == "none" else "c2vkd"]
            lines.append(f"| {r['description']} | {r['wall_time_s'] / 60:.1f} | {old} | "
                         f"{old * 60 / r['wall_time_s']:.1f}x | {sum(r['eval_runtime_s_during_training']):.0f} | "
                         f"{r['val_mean_iou'] * 100:.2f} | {r['workers']} | {load(r['load_start'])} -> "
                         f"{load(r['load_end'])} |")
        lines += ["", "Before: `none` 11.2 min (mean of seeds 0-4, benchmarks/camvid/RESULTS.md; seed 0: 28.02% "
                  "mIoU, seeds 0-4 26.63..29.07%), `c2vkd` 21.4 min with the online teacher (seed 0: 30.87%).", ""]
    lines += [
        "Peak memory: `ru_maxrss` of each subprocess (whole run, including loading data and models) and the peak "
        "resident set during the training steps alone (`VmHWM` reset via `/proc/self/clear_refs` after set-up). "
        "In (c) the teacher is loaded too (its weights are hashed to check the cache key) but never run.",
        "",
    ]
    if e:
        lines += [
            "## Evaluation metric",
            "",
            f"CamVid validation label maps at 360x480, {e['streaming']['images']} images (the 101 maps "
            f"{results['eval_repeats']} times), predictions = labels shifted by 7 pixels; metric work only.",
            "",
            "| metric | images/s | peak RSS MiB | peak RSS above the inputs MiB | mIoU |",
            "|---|---|---|---|---|",
        ]
        for name in METRICS:
            r = e[name]
            lines.append(f"| {r['description']} | {r['images_per_s']:.0f} | {mb(r['peak_rss_mb'])} | "
                         f"{mb(r['peak_rss_above_inputs_mb'])} | {r['mean_iou'] * 100:.2f} |")
    if results.get("fidelity"):
        f = results["fidelity"]
        lines += [
            "",
            "## Fidelity of the cache (scripts/cache_fidelity.py)",
            "",
            f"{f['crops']} augmented CamVid training crops (seed {f['seed']}, epoch 0, the benchmark's scale "
            f"0.75-1.5 / crop / flip; {f['views_with_padding']} views padded), cached-and-replayed teacher vs the "
            "teacher run on the crop (reference):",
            "",
            "| pixels | argmax agreement | mIoU of cached vs online argmax |",
            "|---|---|---|",
            f"| all crop pixels | {f['pixel_agreement_all'] * 100:.2f}% | {f['miou_agreement_all'] * 100:.2f}% |",
            f"| pixels with a valid label (no padding, no void) | {f['pixel_agreement_valid'] * 100:.2f}% | "
            f"{f['miou_agreement_valid'] * 100:.2f}% |",
            "",
            f"Teacher mIoU against the labels on these crops: online {f['teacher_miou_vs_labels_online'] * 100:.2f}%, "
            f"cached {f['teacher_miou_vs_labels_cached'] * 100:.2f}%. Mean cosine similarity of the replayed and "
            f"online teacher feature maps ({', '.join(f['feature_names'])}): {f['feature_cosine']:.3f}.",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--teacher", default=str(SHARED / "models" / "camvid-upernet-lite0"))
    parser.add_argument("--text_embeddings",
                        default=str(SHARED / "data" / "clip_text" / "camvid11_from_city_ViT16_clip_text.pth"))
    parser.add_argument("--cache", default=None, help="Teacher cache folder (default outputs/teacher-cache/"
                        "camvid-120x160, or -512x512 for --protocol large).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times in turn and pool the step times")
    parser.add_argument("--eval_repeats", type=int, default=3)
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "speed"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--protocol", default="camvid", choices=list(PROTOCOLS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers (default: 0 on a CPU, "
                        "min(4, cores - 1) on a GPU)")
    parser.add_argument("--decoded_cache_dir", default=None, help="passed to distill.py (default: its default)")
    parser.add_argument("--variants", default="true", choices=["true", "false"],
                        help="also time (a) without the decoded cache and with one worker")
    parser.add_argument("--benchmark_steps", type=int, default=400,
                        help="steps of the whole short benchmark runs of none and c2vkd (0: skip them)")
    parser.add_argument("--benchmark_work_dir", default=str(ROOT / "outputs" / "speed-benchmark"))
    parser.add_argument("--report_only", action="store_true", help="Only rewrite RESULTS.md from results.json.")
    parser.add_argument("--worker", choices=["train", "bare", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cache is None:
        height, width = PROTOCOLS[args.protocol]["size"]
        args.cache = str(ROOT / "outputs" / "teacher-cache" / f"camvid-{height}x{width}")
    if args.worker:
        work = {"train": worker_train, "bare": worker_bare, "eval": worker_eval}[args.worker]
        result = work(args, args.name)
        Path(args.worker_out).write_text(json.dumps(result))
        return result

    if args.report_only:
        out_dir = Path(args.out_dir)
        results = json.loads((out_dir / "results.json").read_text())
        results["ratios"], results["verdict"] = summarise(results["training"])
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_report(results, out_dir / "RESULTS.md")
        return results
    start = time.time()
    info = machine(args)
    ensure_cache(args)
    names = list(CONFIGS) + (list(VARIANTS) if args.variants == "true" else [])
    rounds = [[run_worker(args, "bare" if name == "bare" else "train", name) for name in names]
              for _ in range(args.rounds)]
    training = [pool_rounds([r[i] for r in rounds]) for i in range(len(names))]
    evaluation = [run_worker(args, "eval", name) for name in METRICS] if args.protocol == "camvid" else []
    runs = [run_benchmark(args, name) for name in BENCHMARK_RUNS] if args.benchmark_steps > 0 else []
    ratios, verdict = summarise(training)
    t = {r["config"]: r for r in training}
    a0, a, b, c = t["bare"], t["student_only"], t["c2vkd_online"], t["c2vkd_cached"]
    fidelity_path = Path(args.out_dir) / "fidelity.json"
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    results = {
        "command": threads + "python scripts/speed.py" + "".join(
            f" {shlex.quote(a_)}" for a_ in (argv if argv is not None else sys.argv[1:])),
        "machine": info, "teacher": args.teacher, "steps": args.steps, "warmup": args.warmup,
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
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out_dir / "RESULTS.md")
    print(f"[speed] wrote {out_dir / 'results.json'} and RESULTS.md in {results['wall_time_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
