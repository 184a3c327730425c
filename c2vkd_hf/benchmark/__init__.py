"""CamVid benchmark: every distillation method x seeds x splits under one shared protocol.

    python scripts/benchmark.py --protocol long                 # run what is missing, then write the reports
    python scripts/benchmark.py --report_only                   # only regenerate RESULTS.md, ABLATIONS.md, plots
    python scripts/benchmark.py --missing                       # the table trainings still to make, one line each
    python scripts/benchmark.py --threads 1 & python scripts/benchmark.py --threads 1   # two processes, 2 cores
    python scripts/benchmark.py --protocol short --runs "c2vkd-stage:c2vkd:--stage_weight 0.1 --stage_pairs ..."

**Protocols.** ``short``: 400 steps, evaluated every 100 (about 9 epochs); ``long``: 2000 steps (5x, about 44
epochs), every 250.
Batch 8 at 120x160, SegFormer-B0 from random init, the reference UperNet + EfficientNet-Lite0 teacher.

**Splits.** Each configuration and seed is trained twice: on the full train split, evaluated on val
(``val``: the official table), and on train without sequence 0006R0, evaluated on those 101 held-out
frames (``selection``: ``--selection_holdout 0006R0_*``). All 101 val frames come from sequence
0016E5, which also supplies 204 of the 367 training frames, so val rewards fitting one sequence;
0006R0 is a sequence the selection runs never train on, which is what CamVid's test split asks of a
model. Defaults are chosen on the selection split and must not lose on val, on five paired seeds: the
selection gain's mean above 0 with at least 4/5 seeds above, and the val gain's mean not below 0.

**Tables** (RESULTS.md, per protocol, both splits): every method at its defaults (what a user gets;
C2VKD's default includes the text head), and every method with the text head (``--text_head true``,
what the teacher adds on top of the head). Gains are paired by seed against the table's teacher-free
run (``none`` / ``none-head``): a seed fixes the initial weights, the data order and every
augmentation draw for all methods. The gain ratio is C2VKD's mean paired gain over the best peer's.
The tables ask for 5 seeds of ``none``, ``dist``, ``c2vkd`` and the head variants of the first two, 3 of
the others; the long protocol's section lists the trainings still missing (``--missing``: one command line each).
A run not in the tables is an ablation (ABLATIONS.md), paired against the run it changes
(``--ablates``, default ``c2vkd``); a teacher-based ablation with the text head is also paired against its
teacher-free control (``--control``, default ``none-head``; e.g. the same data flags without a teacher).

**Teacher.** The short protocol runs the teacher online each step; the long one replays it from a
teacher cache (one per split and set of teacher outputs, built by the first run that needs it).

**Runs.** Each is ``c2vkd-distill`` (``python -m c2vkd_hf.cli.distill``) in a subprocess (own folder under
``--work_dir``, resumed from its last checkpoint when interrupted). ``runs/<protocol>/<name>-seed<k>.json`` holds
``protocol``, ``name``, ``method``, ``text_head``, ``seed``, ``val_mean_iou``, ``selection_mean_iou``
(``null`` until that run is made), ``ablation`` (``null`` for table runs), ``config`` and per split the
per-class IoU, histories, wall time and the command. Records are updated as each run lands, so a
benchmark spread over several sittings loses nothing; several driver processes can share the work
(a lock per run; give each ``--threads`` = cores / processes: two 2-thread trainings on 2 cores spent half
their CPU time in the kernel and trained about 4x slower than two 1-thread ones: 14 vs 60 steps/min).

Modules: :mod:`.plan` (what runs: protocols, tables, seeds, the shared configuration, teacher caches),
:mod:`.runner` (one training, its record), :mod:`.records` (record files and the per-seed figures),
:mod:`.report` (RESULTS.md, ABLATIONS.md, plots and the README section), :mod:`.migrate` (relabelling the
records when a default changes). ``scripts/benchmark.py`` is the command.
"""

from .plan import (HEAD, MAIN_SEED_NAMES, MAIN_SEEDS, OTHER_SEEDS, PEERS, PROTOCOLS, SELECTION_HOLDOUT, SPLITS,
                   TABLE_TITLES, TABLES, missing_runs, parse_run, seeds_for, shared_config, table_names, table_specs,
                   teacher_cache_dir)
from .migrate import change_default
from .records import class_values, load_runs, paired_gains, record_path, values, write_json
from .report import (ablation_section, controlled_variants, gain_ratio, head_to_head_line, per_class_section,
                     protocol_lines, table_section, teacher_gain_line, update_readme, write_report)
from .runner import claim, run_one

__all__ = [
    "HEAD", "MAIN_SEED_NAMES", "MAIN_SEEDS", "OTHER_SEEDS", "PEERS", "PROTOCOLS", "SELECTION_HOLDOUT", "SPLITS",
    "TABLE_TITLES", "TABLES", "missing_runs", "parse_run", "seeds_for", "shared_config", "table_names", "table_specs",
    "teacher_cache_dir",
    "change_default", "class_values", "load_runs", "paired_gains", "record_path", "values", "write_json",
    "ablation_section", "controlled_variants", "gain_ratio", "head_to_head_line", "per_class_section", "protocol_lines",
    "table_section", "teacher_gain_line", "update_readme", "write_report", "claim", "run_one",
]
