"""The timed measurements, each run in a fresh subprocess (``python -m c2vkd_hf.speed.probes ARGS.json KIND NAME
OUT.json``): the bare student step, real Trainer steps of one pipeline configuration, the evaluation metric's
throughput, and the peak memory of a few real Trainer steps of one memory row (:func:`memory_steps`). Timestamps
are taken after ``torch.cuda.synchronize()`` on CUDA."""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .plan import (CONFIGS, proc_mb, MEMORY_PEERS, MEMORY_ROWS, METRICS, PROTOCOLS, VARIANTS, device_name, memory_config,
                   train_config)


def sync(device: str) -> None:
    """Waits for queued CUDA work, so a timestamp taken next covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def vm_hwm_mb() -> float | None:
    """The process's peak resident set since the last :func:`reset_hwm` (Linux ``VmHWM``), in MiB."""
    return proc_mb("/proc/self/status", "VmHWM")


def vm_rss_mb() -> float | None:
    """The process's resident set now (Linux ``VmRSS``), in MiB."""
    return proc_mb("/proc/self/status", "VmRSS")


def release_free_memory() -> None:
    """Collects garbage and hands the C heap's free pages back to the system (glibc ``malloc_trim(0)``, where
    there is one), so that the resident set read next holds live data, not what set-up allocated and freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def touch_weights(*modules) -> None:
    """Reads every parameter and buffer of ``modules`` once. Weights loaded from safetensors are memory-mapped
    from the file, and their pages enter the resident set only when first read (the teacher's at its first
    forward): read here, they count in the built state, not in what the first step adds."""
    import torch

    with torch.no_grad():
        for module in modules:
            if module is not None:
                for tensor in [*module.parameters(), *module.buffers()]:
                    if tensor.numel():
                        tensor.sum()


class SavedForBackward:
    """Counts the bytes autograd keeps for the backward pass (``torch.autograd.graph.saved_tensors_hooks``): each
    storage once (views share it), the trained parameters' own storages left out (they are in the built state). A
    deterministic count, free of the allocator's slack, of what a forward holds until its backward: the student's
    activations (``model``) and the loss module's intermediates (``loss``, while :meth:`wrap`'s function runs)."""

    def __init__(self, parameters):
        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.phase = "model"
        self.seen: set[int] = set()
        self.bytes = {"model": 0, "loss": 0}
        self.steps: list[dict[str, float]] = []

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.skip and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.phase] += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def around(self, fn):
        """``fn`` (the model's forward) counted: the totals of each call go to :attr:`steps`, in MiB."""
        import torch

        @functools.wraps(fn)  # Trainer reads the forward's signature
        def wrapper(*a, **k):
            self.seen, self.bytes = set(), {"model": 0, "loss": 0}
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                result = fn(*a, **k)
            self.steps.append({key: value / 2**20 for key, value in self.bytes.items()})
            self.seen = set()  # no storage pointer outlives the step
            return result
        return wrapper

    def wrap(self, fn):
        """``fn`` (the loss module's forward) with what it saves counted as ``loss``."""
        @functools.wraps(fn)
        def wrapper(*a, **k):
            self.phase = "loss"
            try:
                return fn(*a, **k)
            finally:
                self.phase = "model"
        return wrapper


def reset_hwm() -> bool:
    """Resets ``VmHWM`` to the current resident set (``/proc/self/clear_refs``); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """The process's peak resident set over its whole life (``ru_maxrss``), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_peak_mb(device: str) -> float | None:
    """Peak GPU memory allocated by torch, in MiB (None off CUDA)."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def set_threads(args) -> int:
    """Applies ``args.threads`` (when given) and returns torch's thread count."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def bare_step(args, name: str) -> dict:
    """(a0): the student's own step on one batch already in memory, three variants interleaved."""
    import copy

    import torch

    from c2vkd_hf.losses.common import cross_entropy
    from c2vkd_hf.models import load_student

    threads = set_threads(args)
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
        sync(device)
        start = time.perf_counter()
        with autocast:
            logits = model(pixel_values=pixels).logits
        loss = cross_entropy(logits.float(), labels)
        loss.backward()
        if variants[variant][1]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for variant in variants:
            step(variant)
    load_start = load_average()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.steps):
        for variant in variants:
            times[variant].append(step(variant))
    result = {
        "config": name, "description": CONFIGS[name], "steps_timed": args.steps, "threads": threads,
        "load_start": load_start, "load_end": load_average(),
        "step_s_median": statistics.median(times["channels_last"]),
        "variants_s_median": {v: statistics.median(t) for v, t in times.items()},
        "variants_s_all": {v: [round(x, 4) for x in t] for v, t in times.items()},
        "step_s_all": [round(s, 4) for s in times["channels_last"]],
        "peak_rss_mb": _peak_rss_mb(), "train_peak_rss_mb": None, "gpu_peak_mb": _gpu_peak_mb(device),
    }
    return result


def build_trainer(config: dict, callbacks: list):
    """``(trainer, training_args)`` of a ``distill.py`` configuration dict, built by ``setup_distillation`` (data,
    text embeddings, teacher, student, loss module, trainer) with the extra ``callbacks``; not yet trained."""
    from transformers import HfArgumentParser, TrainingArguments

    from c2vkd_hf.config import DataArguments, DistillationArguments
    from c2vkd_hf.jobs import prepare_training_args, setup_distillation

    dist_args, data_args, training_args = HfArgumentParser(
        (DistillationArguments, DataArguments, TrainingArguments)).parse_dict(config)
    prepare_training_args(training_args)
    setup = setup_distillation(dist_args, data_args, training_args, callbacks=callbacks)
    return setup.trainer, training_args


def pipeline_steps(args, name: str) -> dict:
    """One pipeline configuration: ``warmup + steps`` real Trainer steps; timings and memory."""
    import torch
    from transformers import TrainerCallback

    threads = set_threads(args)
    device = device_name(args)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.load: list[list[float]] = []

        def on_train_begin(self, *a, **k):
            sync(device)
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            self.ends.append(time.perf_counter())
            if len(self.ends) - 1 == args.warmup:
                self.load.append(load_average())

    with tempfile.TemporaryDirectory() as tmp:
        timer = StepTimes()
        trainer, training_args = build_trainer(train_config(args, name, tmp), [timer])
        spent: dict[str, list[float]] = {"teacher": [], "loss_forward": []}

        def timed(fn, key):
            def wrapper(*a, **k):
                sync(device)
                start = time.perf_counter()
                result = fn(*a, **k)
                sync(device)
                spent[key].append(time.perf_counter() - start)
                return result
            return wrapper

        if trainer.teacher_source is not None:
            trainer.teacher_source.outputs = timed(trainer.teacher_source.outputs, "teacher")
        loss_module = trainer.model.distill_loss
        loss_module.forward = timed(loss_module.forward, "loss_forward")
        setup_peak = _peak_rss_mb()
        reset = reset_hwm()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        load_end = load_average()
        train_peak = vm_hwm_mb() if reset else None
        gpu_peak = _gpu_peak_mb(device)
        eval_s = None
        if name == "student_only":  # one whole evaluation, as the benchmark runs it
            sync(device)
            start = time.perf_counter()
            trainer.evaluate()
            sync(device)
            eval_s = time.perf_counter() - start
        decoded = type(trainer.train_dataset).__name__ == "DecodedDataset"
        decoded_mb = None
        if decoded:
            decoded_mb = (trainer.train_dataset.split.nbytes + trainer.eval_dataset.split.nbytes) / 2**20
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup:]

    def median(xs):
        return statistics.median(xs[args.warmup:]) if len(xs) > args.warmup else None

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


def camvid_val_labels(data_dir: Path):
    import numpy as np
    import PIL.Image

    void = json.loads((data_dir / "classes.json").read_text()).get("ignore_index", 11)
    labels = []
    for path in sorted((data_dir / "valannot").glob("*.png")):
        label = np.asarray(PIL.Image.open(path), dtype=np.int64)
        labels.append(np.where(label == void, 255, label))
    return labels


def keep_all_mean_iou(predictions, references, num_labels: int, ignore_index: int = 255):
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


def metric_throughput(args, name: str) -> dict:
    """One metric: stream or keep every (prediction, label) pair of ``eval_repeats`` passes over the
    CamVid validation labels, in batches of 8."""
    import numpy as np
    import torch

    from c2vkd_hf.metrics import StreamingMeanIoU

    labels = camvid_val_labels(Path(args.data_dir))
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
        miou = keep_all_mean_iou(kept_preds, kept_labels, num_labels)
    seconds = time.perf_counter() - start
    return {"metric": name, "description": METRICS[name], "images": count, "seconds": seconds,
            "images_per_s": count / seconds, "mean_iou": miou, "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_above_inputs_mb": _peak_rss_mb() - base_peak}


def memory_steps(args, name: str) -> dict:
    """The peak memory of memory row ``name`` (:data:`~.plan.MEMORY_ROWS`) at ``args.memory_size``: the row's
    trainer is built (:func:`~.plan.memory_config`: synthetic scenes, the models, the loss module), then trained
    for ``args.warmup + args.steps`` real Trainer steps (data, teacher online, student forward, loss, backward,
    clipping, AdamW, whose state is allocated at the first step) and stopped by a callback.

    Memory, in MiB, read from ``/proc/self/status`` and ``getrusage``:

    * ``rss_before_mb``: the resident set with everything built, right before the first step, after
      :func:`touch_weights` (memory-mapped weights paged in) and :func:`release_free_memory` (so it counts live
      data, not set-up's freed heap);
    * ``train_peak_rss_mb``: the peak resident set over the steps (``VmHWM``, reset to the resident set through
      ``/proc/self/clear_refs`` right before the first step; ``ru_maxrss`` where that is refused); after each step
      too (``hwm_after_step_mb``), to show where the peak is reached;
    * ``extra_mb = train_peak_rss_mb - rss_before_mb``: what the steps add over the built state (activations,
      gradients, optimizer state, the loss's intermediates, allocator slack);
    * ``peak_rss_mb``: ``ru_maxrss``, the peak over the process's whole life (set-up included);
    * ``saved_model_mb``, ``saved_loss_mb``: the bytes autograd keeps for the backward pass of the first step
      (:class:`SavedForBackward`: the student's forward and text head, and the loss module), a deterministic
      count, where the resident set carries the allocator's noise (tens of MiB);
    * ``gpu_peak_mb`` on CUDA (``torch.cuda.max_memory_allocated`` over the steps).
    """
    import torch
    from transformers import TrainerCallback

    threads = set_threads(args)
    device = device_name(args)
    total = args.warmup + args.steps

    class Steps(TrainerCallback):
        """Reads the memory after each step and stops training after ``total`` steps."""

        def __init__(self):
            self.hwm: list[float | None] = []
            self.ends: list[float] = []

        def on_train_begin(self, *a, **k):
            sync(device)
            self.ends.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **k):
            sync(device)
            self.ends.append(time.perf_counter())
            self.hwm.append(vm_hwm_mb())
            if state.global_step >= total:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        steps = Steps()
        trainer, _ = build_trainer(memory_config(args, name, tmp), [steps])
        terms = sorted(trainer.model.distill_loss.weights)
        text_head = trainer.model.text_head is not None
        saved = SavedForBackward(trainer.model.parameters())
        trainer.model.forward = saved.around(trainer.model.forward)
        trainer.model.distill_loss.forward = saved.wrap(trainer.model.distill_loss.forward)
        touch_weights(trainer.model, getattr(trainer.teacher_source, "model", None))
        release_free_memory()
        setup_peak = _peak_rss_mb()
        before = vm_rss_mb()
        reset = reset_hwm()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        load_start = load_average()
        trainer.train()
        load_end = load_average()
        done = trainer.state.global_step
        train_peak = vm_hwm_mb() if reset else None
        peak = _peak_rss_mb()
    if train_peak is None or before is None:  # no /proc: the process's peak against the set-up peak
        train_peak, before = peak, setup_peak
    times = [b - a for a, b in zip(steps.ends, steps.ends[1:])]
    return {
        "config": name, "description": {**MEMORY_ROWS, **MEMORY_PEERS}[name][0], "size": list(args.memory_size),
        "batch": args.memory_batch, "steps_done": done, "warmup": args.warmup, "steps": args.steps,
        "terms": terms, "text_head": text_head, "threads": threads, "load_start": load_start, "load_end": load_end,
        "step_s_all": [round(t, 3) for t in times], "hwm_reset": reset,
        "rss_before_mb": before, "setup_peak_rss_mb": setup_peak, "train_peak_rss_mb": train_peak,
        "extra_mb": train_peak - before, "peak_rss_mb": peak, "hwm_after_step_mb": steps.hwm,
        "saved_model_mb": saved.steps[0]["model"] if saved.steps else None,
        "saved_loss_mb": saved.steps[0]["loss"] if saved.steps else None,
        "saved_mb_all": [round(x["model"] + x["loss"], 3) for x in saved.steps], "gpu_peak_mb": _gpu_peak_mb(device),
    }


PROBES = {"train": pipeline_steps, "bare": bare_step, "eval": metric_throughput, "memory": memory_steps}


def run_probe_main(argv: list[str], probes: dict) -> None:
    """Subprocess entry: ``ARGS.json KIND NAME OUT.json`` runs ``probes[KIND]`` for row ``NAME`` with the options in
    ``ARGS.json`` and writes its result to ``OUT.json``."""
    args_path, kind, name, out = argv
    args = SimpleNamespace(**json.loads(Path(args_path).read_text()))
    Path(out).write_text(json.dumps(probes[kind](args, name)))


def main(argv: list[str]) -> None:
    """Subprocess entry of this module's :data:`PROBES` (:func:`run_probe_main`)."""
    run_probe_main(argv, PROBES)


if __name__ == "__main__":
    main(sys.argv[1:])
