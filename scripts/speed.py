#!/usr/bin/env python
"""The speed benchmark command (what it measures: :mod:`c2vkd_hf.speed`, shown by ``--help``).

    python scripts/speed.py                       # CamVid protocol; writes benchmarks/speed/{results.json,RESULTS.md}
    python scripts/speed.py --benchmark_steps 0   # step times only, no whole benchmark runs
    python scripts/speed.py --report_only         # only rewrite RESULTS.md from results.json
    OMP_NUM_THREADS=1 python scripts/speed.py --memory --threads 1   # peak memory: memory.json, MEMORY.md
    OMP_NUM_THREADS=1 python scripts/speed.py --peers --threads 1    # beside torchdistill: peers.json, PEERS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from c2vkd_hf import speed

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=speed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(SHARED / "data" / "camvid"))
    parser.add_argument("--teacher", default=str(SHARED / "models" / "camvid-upernet-lite0"))
    parser.add_argument("--text_embeddings",
                        default=str(SHARED / "data" / "clip_text" / "camvid11_from_city_ViT16_clip_text.pth"))
    parser.add_argument("--cache", default=None, help="Teacher cache folder (default outputs/teacher-cache/"
                        "camvid-120x160, or -512x512 for --protocol large).")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --memory: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; --memory: 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times in turn and pool the step times")
    parser.add_argument("--eval_repeats", type=int, default=3)
    parser.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "speed"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--protocol", default="camvid", choices=list(speed.PROTOCOLS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers (default: 0 on a CPU, "
                        "min(4, cores - 1) on a GPU)")
    parser.add_argument("--decoded_cache_dir", default=None, help="passed to distill.py (default: its default)")
    parser.add_argument("--variants", default="true", choices=["true", "false"],
                        help="also time (a) without the decoded cache and with one worker")
    parser.add_argument("--benchmark_steps", type=int, default=400,
                        help="steps of the whole short benchmark runs of none and c2vkd (0: skip them)")
    parser.add_argument("--benchmark_work_dir", default=str(ROOT / "outputs" / "speed-benchmark"))
    parser.add_argument("--report_only", action="store_true", help="Only rewrite RESULTS.md from results.json "
                        "(with --memory: MEMORY.md from memory.json).")
    memory = parser.add_argument_group("memory mode")
    memory.add_argument("--memory", action="store_true", help="Measure the peak memory of the training step per "
                        "configuration and size instead (memory.json, MEMORY.md in --out_dir).")
    memory.add_argument("--memory_sizes", default=",".join(f"{h}x{w}" for h, w in speed.MEMORY_SIZES),
                        help="HEIGHTxWIDTH sizes, comma-separated (smallest first: growth is largest over smallest)")
    memory.add_argument("--memory_batch", type=int, default=speed.MEMORY_BATCH)
    memory.add_argument("--memory_rows", default="", help="rows to run, comma-separated (default: all; "
                        f"{', '.join([*speed.MEMORY_ROWS, *speed.MEMORY_PEERS])}); student_only is always run")
    memory.add_argument("--memory_peers", default="false", choices=["true", "false"],
                        help="also the peers KD, DIST, CWD, DKD with the online teacher")
    memory.add_argument("--memory_student", default="segformer-b0", help="student (default MiT-B0, random init)")
    memory.add_argument("--memory_student_overrides", default=None, help="JSON of SegformerConfig fields (tests)")
    memory.add_argument("--memory_teacher", default=None,
                        help="teacher folder, built when missing: DeepLabV3+ on --memory_teacher_backbone, random "
                        "init (default outputs/speed-memory/deeplabv3plus-BACKBONE)")
    memory.add_argument("--memory_teacher_backbone", default="resnet101", help="timm backbone of the built teacher")
    peers = parser.add_argument_group("peer mode")
    peers.add_argument("--peers", action="store_true", help="Time our loop beside torchdistill's (KD) and the "
                       "transformers example's (student alone) instead, and check the KD and cross-entropy losses of one "
                       "batch against torchdistill's (peers.json, PEERS.md in --out_dir; torchdistill comes with the test extra).")
    peers.add_argument("--kd_cache", default=str(ROOT / "outputs" / "teacher-cache" / "camvid-120x160-kd"),
                       help="the teacher cache of the KD row replaying it (built when missing)")
    args = parser.parse_args(argv)
    defaults = {"steps": 2, "warmup": 1} if args.memory else {"steps": 20, "warmup": 3}
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag in ("steps", "rounds", "eval_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.benchmark_steps < 0:
        parser.error("--warmup and --benchmark_steps must be at least 0")
    if args.cache is None:
        height, width = speed.PROTOCOLS[args.protocol]["size"]
        args.cache = str(ROOT / "outputs" / "teacher-cache" / f"camvid-{height}x{width}")
    out_dir = Path(args.out_dir)
    if args.memory:
        return memory_main(args, argv, out_dir, parser)
    if args.peers:
        return peers_main(args, argv, out_dir)
    if args.report_only:
        results = json.loads((out_dir / "results.json").read_text())
        results["ratios"], results["verdict"] = speed.summarise(results["training"])
    else:
        command = command_line(argv)
        results = speed.measure(args, command)
        out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    speed.write_report(results, out_dir / "RESULTS.md")
    print(f"[speed] wrote {out_dir / 'results.json'} and RESULTS.md")
    return results


def command_line(argv) -> str:
    """The command that reproduces this run (with its ``OMP_NUM_THREADS``), as recorded beside the figures."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    return threads + "python scripts/speed.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))


def peers_main(args, argv, out_dir: Path) -> dict:
    """``--peers``: measures (or with ``--report_only`` re-reads) peers.json and writes PEERS.md."""
    from c2vkd_hf.speed import peers

    if args.report_only:
        results = json.loads((out_dir / "peers.json").read_text())
        results["ratios"] = peers.summarise_peers(results["rows"])
    else:
        results = peers.measure_peers(args, command_line(argv))
        out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers.json").write_text(json.dumps(results, indent=2))
    peers.write_peer_report(results, out_dir / "PEERS.md")
    print(f"[speed] wrote {out_dir / 'peers.json'} and PEERS.md")
    return results


def memory_main(args, argv, out_dir: Path, parser) -> dict:
    """``--memory``: measures (or with ``--report_only`` re-reads) memory.json and writes MEMORY.md, keeping the
    hand-written analysis of an existing MEMORY.md."""
    if args.memory_teacher is None:
        args.memory_teacher = str(ROOT / "outputs" / "speed-memory" / f"deeplabv3plus-{args.memory_teacher_backbone}")
    if args.memory_batch < 1:
        parser.error(f"--memory_batch must be at least 1, got {args.memory_batch}")
    try:
        speed.parse_sizes(args.memory_sizes)
        speed.memory_rows(args)
    except ValueError as error:
        parser.error(str(error))
    report = out_dir / "MEMORY.md"
    if args.report_only:
        results = json.loads((out_dir / "memory.json").read_text())
        results.update(speed.summarise_memory(results["measured"], results["sizes"]))
    else:
        command = command_line(argv)
        results = speed.measure_memory(args, command)
        out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps(results, indent=2))
    speed.write_memory_report(results, report, analysis=speed.memory_analysis(report))
    print(f"[speed] wrote {out_dir / 'memory.json'} and MEMORY.md")
    print(f"[speed] {results['verdict']}")
    return results


if __name__ == "__main__":
    main()
