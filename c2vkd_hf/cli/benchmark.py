"""``c2vkd-benchmark``: which distillation method, for my data? Every method x seeds x splits under one protocol.

    c2vkd-benchmark --dataset camvid --protocol long     # run what is missing, then write the reports
    c2vkd-benchmark --dataset my_data.yaml               # your own folders: a dataset spec (c2vkd_hf/benchmark/spec.py)
    c2vkd-benchmark --dataset msrc21 --report_only       # only regenerate RESULTS.md, ABLATIONS.md, plots
    c2vkd-benchmark --dataset camvid --missing           # the table trainings still to make, one line each
    c2vkd-benchmark --threads 1 & c2vkd-benchmark --threads 1   # two driver processes sharing 2 cores

The protocol, tables and pairing: ``c2vkd_hf/benchmark/__init__.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from c2vkd_hf import benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c2vkd-benchmark", description=benchmark.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="camvid",
                        help="a built-in dataset (benchmarks/<name>/dataset.yaml: camvid, stanford_background, msrc21) "
                             "or the path of a dataset spec file")
    parser.add_argument("--root", default=None,
                        help="the folder holding benchmarks/ (default: the current folder when it has one, else the "
                             "clone this package runs from)")
    parser.add_argument("--out_dir", default=None, help="where the records and reports go (default benchmarks/<name>)")
    parser.add_argument("--work_dir", default=None, help="where the trainings run (default outputs/benchmark-<name>)")
    parser.add_argument("--protocol", default=None, help="one of the spec's protocols (default: its last, e.g. long)")
    parser.add_argument("--splits", default=None, help="comma-separated: val, selection (default: the spec's)")
    parser.add_argument("--main_seeds", type=int, default=benchmark.MAIN_SEEDS,
                        help=f"seeds for {', '.join(benchmark.MAIN_SEED_NAMES)}")
    parser.add_argument("--other_seeds", type=int, default=benchmark.OTHER_SEEDS, help="seeds for the other runs")
    parser.add_argument("--runs", nargs="*", default=None, help="name:method[:extra flags] (default: both tables)")
    parser.add_argument("--ablates", default=None, help="the run the --runs variants change (default c2vkd)")
    parser.add_argument("--control", default=None,
                        help="the teacher-free run the --runs variants' teacher gain is measured against "
                             "(default none-head)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each training (OMP_NUM_THREADS); when several benchmark processes share "
                             "a machine, give each cores/processes (oversubscribed threads trained 4x slower here)")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--missing", action="store_true",
                        help="print, one line per table run and split, the arguments that make the --protocol's "
                             "trainings still missing for --main_seeds/--other_seeds (stale records count), and exit")
    parser.add_argument("--readme", default=None, help="README whose benchmark sections are updated "
                                                       "(default: <root>/README.md)")
    return parser


def default_root() -> Path:
    """The current folder when it holds ``benchmarks/``, else the clone this package is imported from (when it has
    one), else the current folder."""
    here = Path.cwd()
    clone = Path(__file__).resolve().parents[2]
    if not (here / "benchmarks").is_dir() and (clone / "benchmarks").is_dir():
        return clone
    return here


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else default_root()
    try:
        args.spec = benchmark.load_spec(args.dataset, root)
    except benchmark.SpecError as error:
        parser.error(str(error))
    spec = args.spec
    args.protocol = args.protocol or list(spec.protocols)[-1]
    if args.protocol not in spec.protocols:
        parser.error(f"--protocol must be one of {', '.join(spec.protocols)} for {spec.name}, got {args.protocol!r}")
    args.out_dir = args.out_dir or str(root / "benchmarks" / spec.name)
    args.work_dir = args.work_dir or str(root / "outputs" / f"benchmark-{spec.name}")
    readme = Path(args.readme) if args.readme else root / "README.md"
    splits = [s.strip() for s in (args.splits or ",".join(spec.splits)).split(",") if s.strip()]
    if not splits or set(splits) - set(spec.splits):
        parser.error(f"--splits must name some of {', '.join(spec.splits)} for {spec.name}, got {args.splits!r}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.missing:
        runs = benchmark.mark_stale(benchmark.load_runs(Path(args.out_dir), args.protocol), spec, args.protocol)
        for run_spec, split, seeds in benchmark.missing_runs(runs, args.main_seeds, args.other_seeds, tuple(splits)):
            print(f"--dataset {args.dataset} --protocol {args.protocol} --main_seeds {args.main_seeds} --other_seeds "
                  f"{args.other_seeds} --splits {split} --runs {shlex.quote(run_spec)}  # seeds "
                  f"{', '.join(map(str, seeds))}")
        return 0

    def report() -> None:
        benchmark.write_report(args.out_dir, readme, spec)
        specs = []
        for path in sorted((root / "benchmarks").glob("*/dataset.yaml")):
            try:
                specs.append(benchmark.load_spec(str(path), root))
            except benchmark.SpecError:
                continue
        if specs:
            benchmark.write_summary(specs, root / "benchmarks", readme)

    if not args.report_only:
        specs = args.runs or benchmark.table_specs()
        try:
            parsed = {s: benchmark.parse_run(s) for s in specs}
        except ValueError as error:
            parser.error(str(error))
        plan = [(parsed[s], seed, split) for seed in range(max(args.main_seeds, args.other_seeds))
                for s in specs for split in splits]
        for (name, method, extra), seed, split in plan:
            if seed in benchmark.seeds_for(name, args.main_seeds, args.other_seeds):
                benchmark.run_one(name, method, extra, seed, split, args)
                report()
    report()
    return 0


def run(argv=None) -> int:
    """The ``c2vkd-benchmark`` command."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
