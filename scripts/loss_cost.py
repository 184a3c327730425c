#!/usr/bin/env python
"""Time and memory cost of each distillation loss (forward + backward), on CPU.

Inputs (fixed seed): student and teacher logits (8, 19, 128, 256), labels (8, 128, 256) at the logit
grid (about 5% ignored), student features (8, 256, 16, 32), teacher features (8, 320, 16, 32),
text embeddings (19, 512). Labels at the logit grid keep the run light; at the usual label grid
(4x the logit grid per side) the pixel losses cost about 16x more.

Method:
* time: median wall time of ``forward + backward`` over ``--repeats`` runs after ``--warmup`` runs;
* memory: each loss runs in a fresh subprocess; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the
  process's peak resident set size) is read after the inputs and the module are built and again
  after all runs; the difference is the extra peak memory of the loss (intermediates, gradients of
  the student inputs and projectors). It is a process-level high-water mark, so it includes the
  allocator's slack and is only a coarse upper bound.

Usage::

    python scripts/loss_cost.py --output benchmarks/losses/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, K, H, W = 8, 19, 128, 256
STUDENT_FEAT = (8, 256, 16, 32)
TEACHER_FEAT = (8, 320, 16, 32)
TEXT = (19, 512)

# row name -> (registered loss, kwargs); the pseudo-kwargs features/text switch those inputs on
CASES = {
    "none (ce)": ("none", {}),
    "kd": ("kd", {}),
    "cwd": ("cwd", {}),
    "dist": ("dist", {}),
    "dkd": ("dkd", {}),
    "c2vkd: ce+pdd": ("c2vkd", {}),
    "c2vkd: ce+glob": ("c2vkd", {"pdd_weight": 0, "rel_weight": 0, "ling_weight": 0, "features": True}),
    "c2vkd: ce+rel": ("c2vkd", {"pdd_weight": 0, "glob_weight": 0, "ling_weight": 0, "features": True}),
    "c2vkd: ce+ling": ("c2vkd", {"pdd_weight": 0, "glob_weight": 0, "rel_weight": 0, "features": True, "text": True}),
    "c2vkd (all terms)": ("c2vkd", {"features": True, "text": True}),
}


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20  # Linux: KiB, macOS: bytes


def run_case(case: str, repeats: int, warmup: int) -> dict:
    import torch

    from c2vkd_hf.losses import get_loss

    name, kwargs = CASES[case]
    kwargs = dict(kwargs)
    use_features = kwargs.pop("features", False)
    use_text = kwargs.pop("text", False)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, K, H, W, generator=g, requires_grad=True)
    t = torch.randn(B, K, H, W, generator=g)
    y = torch.randint(0, K, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < 0.05] = 255
    fs = [torch.randn(*STUDENT_FEAT, generator=g, requires_grad=True)]
    ft = [torch.randn(*TEACHER_FEAT, generator=g)]
    if name == "c2vkd" and use_features:
        kwargs.update(student_channels=[STUDENT_FEAT[1]], teacher_channels=[TEACHER_FEAT[1]])
    if use_text:
        kwargs["text_embeddings"] = torch.randn(*TEXT, generator=g)
    module = get_loss(name, **kwargs)
    params = list(module.parameters())

    def step():
        for p in [s, fs[0], *params]:
            p.grad = None
        out = module(s, t, y, fs if use_features else None, ft if use_features else None)
        out["loss"].backward()
        return out

    base = _max_rss_mib()
    for _ in range(warmup):
        out = step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
    peak = _max_rss_mib()
    return {
        "case": case,
        "terms": sorted(k for k in out if k != "loss"),
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "peak_extra_mib": peak - base,
        "threads": torch.get_num_threads(),
    }


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (
        f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/losses/RESULTS.md", help="Markdown file to write.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="Subset of rows to run.")
    parser.add_argument("--note", default="", help="Free text added under the table (e.g. machine load).")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single:
        print(json.dumps(run_case(args.single, args.repeats, args.warmup)))
        return

    rows = []
    for case in args.cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {list(CASES)}")
        cmd = [sys.executable, __file__, "--single", case, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case:22s} {row['median_ms']:9.1f} ms  {row['peak_extra_mib']:8.1f} MiB  terms={row['terms']}", flush=True)

    lines = [
        "# Loss cost (forward + backward, CPU)",
        "",
        f"Command: `python scripts/loss_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {_machine()}.",
        "",
        f"Inputs: student and teacher logits ({B}, {K}, {H}, {W}); labels ({B}, {H}, {W}) at the logit grid "
        f"(5% ignored); student features {STUDENT_FEAT}; teacher features {TEACHER_FEAT}; text embeddings {TEXT}. "
        "Every row includes the cross-entropy term. Time: median over "
        f"{args.repeats} runs after {args.warmup} warm-up run(s). Peak extra memory: increase of the process's "
        "peak RSS (`resource.getrusage(...).ru_maxrss`) over the state with inputs and module built, one fresh "
        "subprocess per row (a coarse upper bound: allocator slack included).",
        "",
        "| loss | terms | median time (ms) | min time (ms) | peak extra memory (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {', '.join(r['terms'])} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['peak_extra_mib']:.0f} |"
        )
    if args.note:
        lines += ["", args.note]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
