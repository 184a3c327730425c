"""What the speed benchmark measures: the configurations, the protocols, the device and the training configuration
of each row; for the memory mode (``--memory``) its rows (:data:`MEMORY_ROWS`), sizes and configuration
(:func:`memory_config`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

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
#: The same configuration before the pipeline's speed work (benchmarks/camvid/RESULTS.md, seeds 0-4 of `none`: 11.2
#: min a run; benchmarks/camvid/runs/c2vkd-seed*.json: 21.4 min a run with the online teacher).
OLD_BENCHMARK_MIN = {"none": 11.2, "c2vkd": 21.4}
PROTOCOLS = {"camvid": {"size": (120, 160), "batch": 8}, "large": {"size": (512, 512), "batch": 16}}
#: The memory mode's rows (``scripts/speed.py --memory``): name -> (description, the flags it changes from the
#: C2VKD defaults). Each term row keeps one distillation term at its default weight and sets the other five to 0, so
#: it is CE + that term with the teacher online; ``teacher_ce`` sets all six to 0 (the teacher still runs and its
#: decoder feature is still read): the reference a term's own memory is measured against.
TERM_WEIGHTS = {"pdd": "pdd_weight", "glob": "glob_weight", "rel": "rel_weight", "ling": "ling_weight",
                "channel": "channel_weight", "exit": "exit_weight"}


def _only(term: Optional[str]) -> dict:
    """The flags that turn every C2VKD distillation term off but ``term`` (which keeps its default weight)."""
    return {flag: 0.0 for name, flag in TERM_WEIGHTS.items() if name != term}


MEMORY_ROWS = {
    "student_only": ("(a) student alone (method none)", {"method": "none"}),
    "c2vkd_online": ("(b) C2VKD, teacher online, every default (text head, class balance, exits, channel term)", {}),
    "teacher_ce": ("C2VKD with every distillation weight 0: teacher online, CE only (the terms' reference)",
                   _only(None)),
    "pdd": ("(c) ce + pdd", _only("pdd")),
    "glob": ("(c) ce + glob", _only("glob")),
    "rel": ("(c) ce + rel", _only("rel")),
    "ling": ("(c) ce + ling (with the text head it trains, its default)", _only("ling")),
    "text_head": ("(c) ce + the text head alone (--text_head true, no term)", {**_only(None), "text_head": True}),
    "channel": ("(c) ce + channel", _only("channel")),
    "exit": ("(c) ce + exit (stage exits on the auto stage pairs)", _only("exit")),
}
#: Rows for the peers (``--memory_peers true``): each method at its published recipe, teacher online.
MEMORY_PEERS = {name: (f"(d) {name}", {"method": name}) for name in ("kd", "dist", "cwd", "dkd")}
#: The rows a term's own memory is the difference of: (row, reference).
MEMORY_TERM_REFERENCE = "teacher_ce"
MEMORY_SIZES = ((512, 512), (512, 1024))
MEMORY_BATCH = 2
#: The memory mode's nominal schedule length. Training stops after ``warmup + steps`` steps (a callback), so the
#: scheduled terms (exit, channel: linear to 0 at half of training) keep at least 99% of their weight on every step.
MEMORY_NOMINAL_STEPS = 1000
METRICS = {
    "streaming": "StreamingMeanIoU (confusion matrix)",
    "keep_all": "keep all predictions, then per-image histograms (evaluate's mean_iou, emulated)",
}


def device_name(args) -> str:
    """``args.device``, with ``auto`` resolved to ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def workers_for(args) -> int:
    """Data-loader workers: ``args.workers``, else 0 on a CPU (the decoded cache makes loading a few percent of a
    step and a worker would compete with the compute threads) and ``min(4, cores - 1)`` on a GPU."""
    if args.workers is not None:
        return args.workers
    return 0 if device_name(args) == "cpu" else max(0, min(4, (os.cpu_count() or 1) - 1))


def train_config(args, name: str, output_dir: str) -> dict:
    """The CamVid benchmark's ``distill.py`` configuration (:mod:`c2vkd_hf.benchmark`) for one speed row ``name``
    (a key of :data:`CONFIGS` or :data:`VARIANTS`), training ``warmup + steps`` steps without evaluation."""
    data = Path(args.data_dir)
    height, width = PROTOCOLS[args.protocol]["size"]
    config = {
        "train_images": str(data / "train"), "train_labels": str(data / "trainannot"),
        "validation_images": str(data / "val"), "validation_labels": str(data / "valannot"),
        "labels_file": str(data / "classes.json"), "resize_height": height, "resize_width": width,
        "min_scale": 0.75, "max_scale": 1.5, "hflip": True, "student_name_or_path": "segformer-b0",
        "max_steps": args.warmup + args.steps, "per_device_train_batch_size": PROTOCOLS[args.protocol]["batch"],
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
    if config["method"] != "none":
        config.update(teacher_name_or_path=args.teacher, text_embeddings=args.text_embeddings)
    if name == "c2vkd_cached":
        config["teacher_cache"] = args.cache
    return config


def memory_rows(args) -> dict:
    """The memory mode's rows, in order: ``args.memory_rows`` (names, comma-separated; empty: all of
    :data:`MEMORY_ROWS`), plus :data:`MEMORY_PEERS` with ``args.memory_peers``. ``student_only`` always comes first
    (every ratio is taken against it)."""
    every = {**MEMORY_ROWS, **MEMORY_PEERS}
    names = [n.strip() for n in (getattr(args, "memory_rows", "") or "").split(",") if n.strip()] or list(MEMORY_ROWS)
    if getattr(args, "memory_peers", "false") == "true":
        names += [n for n in MEMORY_PEERS if n not in names]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ValueError(f"unknown memory rows {unknown}; choose from {list(every)}")
    names = ["student_only"] + [n for n in names if n != "student_only"]
    return {n: every[n] for n in dict.fromkeys(names)}


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    """``"512x512,512x1024"`` -> ``[(512, 512), (512, 1024)]`` (height x width)."""
    sizes = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"size {item!r} must look like HEIGHTxWIDTH, e.g. 512x1024")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def memory_config(args, name: str, output_dir: str) -> dict:
    """The ``distill.py`` configuration of memory row ``name`` at ``args.memory_size`` (height, width): the built-in
    synthetic scenes at that size (``args.memory_batch`` + 2 training images, one validation image), taken whole
    (scale 1, no flip: every batch is exactly that size), batch ``args.memory_batch``, the student
    ``args.memory_student`` (random init), the teacher folder ``args.memory_teacher``, text embeddings from the
    built-in vocabulary (as the synthetic default job), no evaluation, no saving; the row's flags on top."""
    height, width = args.memory_size
    batch = args.memory_batch
    config = {
        "dataset_name": "synthetic", "synthetic_height": height, "synthetic_width": width,
        "synthetic_train_size": batch + 2, "synthetic_validation_size": 1, "crop_height": height, "crop_width": width,
        "min_scale": 1.0, "max_scale": 1.0, "hflip": False, "decoded_cache_dir": str(Path(output_dir) / "decoded"),
        "student_name_or_path": args.memory_student, "max_steps": MEMORY_NOMINAL_STEPS,
        "per_device_train_batch_size": batch, "per_device_eval_batch_size": 1, "learning_rate": 6e-4,
        "lr_scheduler_type": "polynomial", "warmup_steps": 2, "weight_decay": 0.01, "eval_strategy": "no",
        "save_strategy": "no", "logging_steps": MEMORY_NOMINAL_STEPS, "report_to": "none", "disable_tqdm": True,
        "seed": 0, "output_dir": output_dir, "dataloader_num_workers": 0, "use_cpu": device_name(args) == "cpu",
        "bf16": args.precision == "bf16", "method": "c2vkd",
    }
    if getattr(args, "memory_student_overrides", None):
        config["student_config_overrides"] = args.memory_student_overrides
    config.update({**MEMORY_ROWS, **MEMORY_PEERS}[name][1])
    if config["method"] != "none":
        config["teacher_name_or_path"] = args.memory_teacher
    return config


def machine(args) -> dict:
    """The machine, the device and the software the figures were taken on."""
    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    device = device_name(args)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_at_start": os.getloadavg(),
            "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "precision": args.precision, "protocol": args.protocol, "workers": workers_for(args),
            "memory_total_mb": _memory_total_mb(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def proc_mb(path: str, key: str) -> Optional[float]:
    """The ``key:`` line of a ``/proc`` file given in kB (``MemTotal`` of ``/proc/meminfo``, ``VmRSS`` or ``VmHWM``
    of ``/proc/self/status``), in MiB; None where the file is unreadable or has no such line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _memory_total_mb() -> Optional[float]:
    """The machine's RAM (``MemTotal``), in MiB; None where ``/proc/meminfo`` is unreadable."""
    return proc_mb("/proc/meminfo", "MemTotal")
