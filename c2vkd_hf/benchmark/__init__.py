"""The benchmark: every distillation method x seeds x splits under one shared protocol, on any dataset the loaders
read ("which method, for my data?").

    c2vkd-benchmark --dataset camvid --protocol long          # run what is missing, then write the reports
    c2vkd-benchmark --dataset my_data.yaml                    # a user's own folders (a dataset spec: .spec)
    c2vkd-benchmark --dataset msrc21 --report_only            # only regenerate RESULTS.md, ABLATIONS.md, plots
    c2vkd-benchmark --dataset camvid --missing                # the table trainings still to make, one line each
    c2vkd-benchmark --threads 1 & c2vkd-benchmark --threads 1 # two driver processes on 2 cores
    c2vkd-benchmark --dataset camvid --protocol long --runs "c2vkd-x:c2vkd:--exit_weight 0"   # an ablation

**Dataset.** A spec file (:mod:`.spec`: data flags, resize, splits, teacher, protocols); the built-in ones are
``benchmarks/<name>/dataset.yaml`` (camvid, stanford_background, msrc21) and results go to ``benchmarks/<name>/``.

**Splits.** Each configuration and seed is trained on the train split and evaluated on val (``val``); a spec with a
``selection_holdout`` also trains without the matching training images and evaluates on them (``selection``: CamVid
holds out sequence 0006R0, a sequence never trained on). Defaults are chosen on CamVid's selection split and must not
lose on val, on five paired seeds: the selection gain's mean above 0 with at least 4/5 seeds above, and the val gain's
mean not below 0. The other datasets confirm; they are never tuned on.

**Tables** (RESULTS.md, per protocol and split): every method at its defaults (what a user gets; C2VKD's default
includes the text head), and every method with the text head (``--text_head true``, what the teacher adds on top of
the head); both have C2VKD as the paper describes it (``c2vkd-paper``: ``--recipe paper``). Gains are paired by seed
against the table's teacher-free run (``none`` / ``none-head``): a seed fixes the initial weights, the data order and
every augmentation draw for all methods. The gain ratio is C2VKD's mean paired gain over the best peer's. The tables
ask for 5 seeds of ``none``, ``dist``, ``c2vkd`` and the head variants of the first two, 3 of the others
(``--missing``: one command line each). A run not in the tables is an ablation (ABLATIONS.md), paired against the
run it changes (``--ablates``, default ``c2vkd``) and, with the text head, against its teacher-free control
(``--control``, default ``none-head``).

**Records.** ``runs/<protocol>/<name>-seed<k>.json``: ``protocol``, ``name``, ``method``, ``text_head``, ``seed``,
``val_mean_iou``, ``selection_mean_iou`` (``null`` until that run is made), ``ablation`` (``null`` for table runs),
``config``, ``teacher_sha256`` (the SHA-256 of the teacher's ``model.safetensors``; ``null`` without a teacher) and
per split the per-class IoU, histories, wall time and the command. A record whose configuration is not what today's
code and defaults give its run, or whose teacher is not the spec's teacher now (:func:`.plan.mark_stale`), is stale:
left out of the tables, listed as missing, and trained again (its old record replaced) when the benchmark runs.

**Teacher.** The spec's ``cached_protocols`` replay the teacher from a teacher cache (one per split and set of teacher
outputs, built by the first run that needs it); the others run it online.

**Runs.** Each is ``c2vkd-distill`` in a subprocess (own folder under ``--work_dir``, resumed from its last
checkpoint when interrupted, a lock per run so several driver processes share the work; give each ``--threads`` =
cores / processes: two 2-thread trainings on 2 cores trained about 4x slower than two 1-thread ones).

Modules: :mod:`.spec` (the dataset spec), :mod:`.plan` (what runs: tables, seeds, configurations, teacher caches,
staleness), :mod:`.runner` (one training, its record), :mod:`.records` (record files and the per-seed figures),
:mod:`.report` (RESULTS.md, ABLATIONS.md, plots, the README section and the cross-dataset summary).
``c2vkd-benchmark`` (:mod:`c2vkd_hf.cli.benchmark`, ``scripts/benchmark.py``) is the command.
"""

from .plan import (HEAD, MAIN_SEED_NAMES, MAIN_SEEDS, OTHER_SEEDS, PAPER, PEERS, SPLITS, TABLE_TITLES, TABLES,
                   effective_flags, mark_stale, method_flags, missing_runs, parse_run, seeds_for, shared_config,
                   table_names, table_specs, teacher_cache_dir)
from .records import class_values, load_runs, paired_gains, record_path, stale_fields, values, write_json
from .report import (ablation_section, controlled_variants, gain_ratio, head_to_head_line, per_class_section,
                     protocol_lines, summary_section, table_section, teacher_gain_line, update_readme, write_report,
                     write_summary)
from .runner import claim, run_one
from .spec import DatasetSpec, SpecError, load_spec

__all__ = [
    "HEAD", "MAIN_SEED_NAMES", "MAIN_SEEDS", "OTHER_SEEDS", "PAPER", "PEERS", "SPLITS", "TABLE_TITLES", "TABLES",
    "effective_flags", "mark_stale", "method_flags", "missing_runs", "parse_run", "seeds_for", "shared_config",
    "table_names", "table_specs", "teacher_cache_dir",
    "class_values", "load_runs", "paired_gains", "record_path", "stale_fields", "values", "write_json",
    "ablation_section", "controlled_variants", "gain_ratio", "head_to_head_line", "per_class_section", "protocol_lines",
    "summary_section", "table_section", "teacher_gain_line", "update_readme", "write_report", "write_summary",
    "claim", "run_one", "DatasetSpec", "SpecError", "load_spec",
]
