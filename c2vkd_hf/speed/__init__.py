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

**Memory mode** (``--memory``; writes ``memory.json`` and ``MEMORY.md`` in ``--out_dir``): the peak memory of the
real training step at each ``--memory_sizes`` (default 512x512 and 512x1024), batch ``--memory_batch`` (2), on the
built-in synthetic scenes, each configuration at each size in its own fresh subprocess, ``--warmup`` (1) +
``--steps`` (2) steps: (a) the student alone (``--memory_student``, default MiT-B0 from random init), (b) C2VKD with
the online teacher (``--memory_teacher``, built once when missing: DeepLabV3+ on ``--memory_teacher_backbone``,
default ResNet-101, random init) at every default, the same with every distillation weight 0 (the terms'
reference), and each term alone with CE (``pdd``, ``glob``, ``rel``, ``ling``, the text head, ``channel``,
``exit``); ``--memory_peers true`` adds KD, DIST, CWD, DKD; ``--memory_rows`` picks rows. Per row: the resident set
with everything built, the peak over the steps (``VmHWM`` after a reset), their difference, the process's
``ru_maxrss``, each as a ratio to (a) at the same size, each term's share (its row's extra minus the reference's)
and its growth from the smallest to the largest size against the pixel ratio (:func:`.probes.memory_steps`,
:func:`.report.summarise_memory`).

**Peer mode** (``--peers``; writes ``peers.json`` and ``PEERS.md``): our loop beside torchdistill's (the same KD
configuration in its ``DistillationBox``) and beside the transformers semantic-segmentation example's recipe (the
student alone; also in torchdistill's ``TrainingBox``), and the KD and cross-entropy losses of one fixed batch in
both frameworks (:mod:`.peers`).

Modules: :mod:`.plan` (the rows, protocols, device and each row's training configuration), :mod:`.probes` (the
timed measurements, each in a fresh subprocess), :mod:`.runner` (rounds, whole benchmark runs, the teacher cache;
:func:`measure`), :mod:`.report` (ratios, verdict, RESULTS.md), :mod:`.peers` (the peer mode: its rows, probes,
measurement and PEERS.md). ``scripts/speed.py`` is the command.
"""

from .plan import (BENCHMARK_RUNS, CONFIGS, MEMORY_BATCH, MEMORY_PEERS, MEMORY_ROWS, MEMORY_SIZES, METRICS,
                   OLD_BENCHMARK_MIN, PROTOCOLS, VARIANTS, device_name, machine, memory_config, memory_rows, parse_sizes,
                   train_config, workers_for)
from .probes import bare_step, keep_all_mean_iou, memory_steps, metric_throughput, pipeline_steps
from .report import MEMORY_TARGET, memory_analysis, summarise, summarise_memory, write_memory_report, write_report
from .runner import ensure_cache, ensure_memory_teacher, measure, measure_memory, pool_rounds, run_benchmark, run_probe

__all__ = [
    "BENCHMARK_RUNS", "CONFIGS", "METRICS", "OLD_BENCHMARK_MIN", "PROTOCOLS", "VARIANTS", "device_name", "machine",
    "train_config", "workers_for", "bare_step", "keep_all_mean_iou", "metric_throughput", "pipeline_steps",
    "summarise", "write_report", "ensure_cache", "measure", "pool_rounds", "run_benchmark", "run_probe",
    "MEMORY_BATCH", "MEMORY_PEERS", "MEMORY_ROWS", "MEMORY_SIZES", "MEMORY_TARGET", "memory_config", "memory_rows",
    "parse_sizes", "memory_steps", "memory_analysis", "summarise_memory", "write_memory_report",
    "ensure_memory_teacher", "measure_memory",
]
