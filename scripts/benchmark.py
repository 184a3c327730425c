#!/usr/bin/env python
"""The CamVid benchmark command (the protocol: :mod:`c2vkd_hf.benchmark`, shown by ``--help``).

    python scripts/benchmark.py --protocol long                 # run what is missing, then write the reports
    python scripts/benchmark.py --report_only                   # only regenerate RESULTS.md, ABLATIONS.md, plots
    python scripts/benchmark.py --missing                       # the table trainings still to make, one line each
    python scripts/benchmark.py --threads 1 & python scripts/benchmark.py --threads 1   # two processes, 2 cores
    python scripts/benchmark.py --protocol short --runs "c2vkd-stage:c2vkd:--stage_weight 0.1 --stage_pairs ..."
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from c2vkd_hf import benchmark

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main(argv=None):
    parser = argparse.ArgumentParser(description=benchmark.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--teacher", default=str(SHARED / "models" / "camvid-upernet-lite0"))
    parser.add_argument("--text_embeddings",
                        default=str(SHARED / "data" / "clip_text" / "camvid11_from_city_ViT16_clip_text.pth"))
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "camvid"))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "benchmark-camvid"))
    parser.add_argument("--protocol", choices=sorted(benchmark.PROTOCOLS), default="long")
    parser.add_argument("--splits", default="val,selection", help="comma-separated: val, selection")
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
                             "trainings still missing for --main_seeds/--other_seeds, and exit")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose benchmark section is updated")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits or set(splits) - set(benchmark.SPLITS):
        parser.error(f"--splits must name some of {', '.join(benchmark.SPLITS)}, got {args.splits!r}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.missing:
        runs = benchmark.load_runs(Path(args.out_dir), args.protocol)
        for spec, split, seeds in benchmark.missing_runs(runs, args.main_seeds, args.other_seeds, tuple(splits)):
            print(f"--protocol {args.protocol} --main_seeds {args.main_seeds} --other_seeds {args.other_seeds} "
                  f"--splits {split} --runs {shlex.quote(spec)}  # seeds {', '.join(map(str, seeds))}")
        return
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
                benchmark.write_report(args.out_dir, args.readme)
    benchmark.write_report(args.out_dir, args.readme)


if __name__ == "__main__":
    main()
