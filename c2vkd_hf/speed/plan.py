"""What the speed benchmark measures: the configurations, the protocols, the device and the training configuration
of each row."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
