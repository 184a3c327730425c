"""The benchmark's reports from its run records: RESULTS.md (both tables on both splits, paired gains, gain
ratios, the teacher-attributable gain against its target, per-class gains, plots), ABLATIONS.md and the
README's benchmark section. Nothing in them is typed by hand."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from .plan import MAIN_SEED_NAMES, MAIN_SEEDS, OTHER_SEEDS, SPLITS, TABLE_TITLES, TABLES, missing_runs, parse_run
from .records import class_values, load_runs, paired_gains, values


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def gain_cell(gains: list[tuple[int, float]]) -> str:
    if not gains:
        return "-"
    g = [x for _, x in gains]
    return f"{statistics.mean(g):+.2f} ({sum(x > 0 for x in g)}/{len(g)} seeds above)"


def gain_ratio(runs: list[dict], table: str, split: str) -> Optional[dict]:
    """C2VKD's gain over the table's baseline against the best peer's, on the seeds they share.

    With ``g_m(s) = mIoU(m, s) - mIoU(base, s)`` (paired by seed) and ``S_p`` the seeds on which both C2VKD and
    peer ``p`` have a paired gain, the best peer is ``argmax_p mean_{s in S_p} g_p(s)`` and the ratio is
    ``mean_{S_best} g_c2vkd / mean_{S_best} g_best`` (``None`` when the best peer's gain is not positive), so a
    peer run on fewer seeds is compared with C2VKD on those seeds only. Returns ``None`` when C2VKD or every
    peer lacks paired runs, else ``{"ratio", "best", "c2vkd", "peer", "seeds"}``."""
    base, specs = TABLES[table]
    c2vkd = dict(paired_gains(runs, "c2vkd", base, split))
    peers = {}
    for spec in specs:
        name = parse_run(spec)[0]
        if name in (base, "c2vkd"):
            continue
        shared = {s: g for s, g in paired_gains(runs, name, base, split) if s in c2vkd}
        if shared:
            peers[name] = shared
    if not c2vkd or not peers:
        return None
    best = max(peers, key=lambda n: statistics.mean(peers[n].values()))
    seeds = sorted(peers[best])
    ours, theirs = statistics.mean(c2vkd[s] for s in seeds), statistics.mean(peers[best].values())
    return {"ratio": ours / theirs if theirs > 0 else None, "best": best, "c2vkd": ours, "peer": theirs,
            "seeds": len(seeds)}


def teacher_gain_line(gains: list[tuple[int, float]], base: str, target: float = 1.5) -> str:
    """The teacher-attributable gain against its target: mean ``g = mean_s [mIoU(c2vkd, s) - mIoU(base, s)]``,
    the standard deviation of the paired gains (how much a seed moves it), the seeds above 0, and whether
    ``g >= target`` and at least 4 of 5 seeds (80%) are positive."""
    g = [x for _, x in gains]
    mean, above = statistics.mean(g), sum(x > 0 for x in g)
    spread = f" ± {statistics.stdev(g):.2f} (std of the paired gains)" if len(g) > 1 else ""
    per_seed = ", ".join(f"s{s}: {x:+.2f}" for s, x in gains)
    verdict = "met" if mean >= target and above >= 0.8 * len(g) else (
        f"missed by {target - mean:.2f}" if mean < target else "missed: too few seeds positive")
    return (f"teacher-attributable gain (C2VKD minus {base}, paired): **{mean:+.2f}**{spread}, positive on "
            f"{above}/{len(g)} seeds ({per_seed}); target >= +{target:.2f} and positive on >= 4 of 5 seeds: "
            f"**{verdict}** on {len(g)} seed{'s' if len(g) > 1 else ''}")


def head_to_head_line(gains: list[tuple[int, float]], peer: str) -> str:
    """C2VKD against ``peer`` directly: ``d(s) = mIoU(c2vkd, s) - mIoU(peer, s)`` paired by seed, its mean, the
    standard deviation of ``d`` over seeds, the seeds with ``d > 0`` and each seed's ``d``. The ratio of mean gains
    says how much larger C2VKD's gain is; this says whether the difference is larger than a seed moves it."""
    d = [x for _, x in gains]
    spread = f" ± {statistics.stdev(d):.2f} (std over seeds)" if len(d) > 1 else ""
    per_seed = ", ".join(f"s{s}: {x:+.2f}" for s, x in gains)
    return (f"C2VKD minus best peer {peer}, paired by seed: **{statistics.mean(d):+.2f}**{spread}, C2VKD above on "
            f"{sum(x > 0 for x in d)}/{len(d)} seeds ({per_seed})")


def table_section(runs: list[dict], table: str) -> list[str]:
    """Markdown: one table's runs on both splits, paired gains, the gain ratio and the targets."""
    base, specs = TABLES[table]
    names = [parse_run(s)[0] for s in specs]
    present = [n for n in names if any(values(runs, n, split) for split in SPLITS)]
    if not present:
        return []
    lines = [f"### {TABLE_TITLES[table]}", "",
             f"mIoU in points (mean ± seed std); gain = paired by seed over `{base}`.", "",
             "| run | val seeds | val mIoU | val gain over " + base + " | selection seeds | selection mIoU | "
             "selection gain over " + base + " |", "|---|---|---|---|---|---|---|"]
    for name in present:
        cells = []
        for split in SPLITS:
            v = list(values(runs, name, split).values())
            cells += [str(len(v)), mean_std(v), "+0.00" if name == base and v else gain_cell(paired_gains(runs, name, base, split))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    target = {"defaults": 2.0, "head": 1.5}[table]
    for split in SPLITS:
        r = gain_ratio(runs, table, split)
        if r is None:
            continue
        text = (f"{r['ratio']:.2f}" if r["ratio"] is not None else
                f"undefined (no peer beats {base}: best {r['best']} {r['peer']:+.2f})")
        lines.append(f"- {split}: gain ratio (C2VKD's paired gain {r['c2vkd']:+.2f}) / (best peer {r['best']}'s "
                     f"{r['peer']:+.2f}), on the {r['seeds']} seed{'s' if r['seeds'] > 1 else ''} both have = "
                     f"**{text}** (target > {target:g})")
        lines.append(f"- {split}: " + head_to_head_line(paired_gains(runs, "c2vkd", r["best"], split), r["best"]))
    if table == "head":
        for split in SPLITS:
            gains = paired_gains(runs, "c2vkd", base, split)
            if gains:
                lines.append(f"- {split}: " + teacher_gain_line(gains, base))
    return lines + [""]


def per_class_section(runs: list[dict], base: str, candidates: list[str]) -> list[str]:
    """Markdown: where each run's gain lands, per class and split: ``base``'s IoU (seed mean) and each of
    ``candidates``' IoU minus the baseline's, paired by seed and averaged over the seeds both have,
    ``mean_s [IoU_k(run, s) - IoU_k(base, s)]``."""
    lines = []
    for split in SPLITS:
        ref = class_values(runs, base, split)
        others = {n: class_values(runs, n, split) for n in candidates if n != base}
        others = {n: v for n, v in others.items() if set(v) & set(ref)}
        names = list(others)
        if not ref or not names:
            continue
        classes = list(next(iter(ref.values())))
        lines += [f"**{split}** ({base}: {len(ref)} seeds; a gain column pairs the seeds both runs have)", "",
                  f"| class | {base} IoU | " + " | ".join(f"{n} minus {base}" for n in names) + " |",
                  "|---|" + "---|" * (len(names) + 1)]
        for k in classes:
            cells = [mean_std([v[k] for v in ref.values() if k in v])]
            for n in names:
                diffs = [others[n][s][k] - ref[s][k] for s in sorted(others[n]) if s in ref
                         and k in others[n][s] and k in ref[s]]
                cells.append(f"{statistics.mean(diffs):+.2f}" if diffs else "-")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    if not lines:
        return []
    return [f"### Per class: where the gain over `{base}` lands", "",
            "IoU in points; the baseline's seed mean ± std, then each run minus the baseline, paired by seed.", "",
            *lines]


def teacher_head_variants(runs: list[dict]) -> list[str]:
    """The ablation variants that use the teacher and the text head (compared with ``none-head``)."""
    return sorted({r["name"] for r in runs if r.get("ablation") and r.get("text_head") and r.get("method") != "none"})


def controlled_variants(runs: list[dict]) -> dict[str, list[str]]:
    """``{control: [variants]}`` for the teacher-based head variants whose record names a teacher-free control
    other than ``none-head`` (``--control``)."""
    groups: dict[str, list[str]] = {}
    for name in teacher_head_variants(runs):
        control = next(r.get("control") for r in runs if r["name"] == name)
        if control and control != "none-head":
            groups.setdefault(control, []).append(name)
    return groups


def ablation_section(runs: list[dict]) -> list[str]:
    """Markdown: each ablation paired by seed with the run it changes, on both splits, and (for a teacher-based
    variant with the text head) its teacher-attributable gain: minus its teacher-free control (``none-head``
    unless the record names another), paired by seed."""
    variants = sorted({r["name"] for r in runs if r.get("ablation")})
    if not variants:
        return []
    with_head = set(teacher_head_variants(runs))
    lines = ["| variant | compared with | flags | val: paired gain | selection: paired gain | "
             "teacher-free control | val: minus control | selection: minus control |", "|---|---|---|---|---|---|---|---|"]
    for name in variants:
        run = next(r for r in runs if r["name"] == name)
        ref = run.get("ablates") or "c2vkd"
        control = (run.get("control") or "none-head") if name in with_head else None
        flags = " ".join(run.get("extra_flags") or []) or "-"
        cells = [gain_cell(paired_gains(runs, name, ref, split)) for split in SPLITS] + [control or "-"]
        cells += [gain_cell(paired_gains(runs, name, control, split)) if control else "-" for split in SPLITS]
        lines.append(f"| {name} | {ref} | `{flags}` | " + " | ".join(cells) + " |")
    return lines + [""]


def protocol_lines(runs: list[dict], protocol: str) -> list[str]:
    cfg = next(r["config"] for r in runs if r.get("config"))
    teacher = next((r["teacher_val_mean_iou"] for r in runs if r.get("teacher_val_mean_iou")), None)
    return [f"- {protocol}: {cfg['training']['max_steps']} steps, batch {cfg['training']['per_device_train_batch_size']}, "
            f"AdamW lr {cfg['training']['learning_rate']} polynomial, warm-up {cfg['training']['warmup_steps']}; images "
            f"{cfg['data']['resize_height']}x{cfg['data']['resize_width']}, scale {cfg['data']['min_scale']}-"
            f"{cfg['data']['max_scale']}, crop, flip; SegFormer-B0 from random init; teacher "
            f"`{Path(cfg['distillation']['teacher_name_or_path']).name}`"
            + (f" ({teacher * 100:.2f}% val mIoU at this resolution)" if teacher else "") + c2vkd_settings(runs)]


def missing_section(runs: list[dict]) -> list[str]:
    """The table trainings still to make for the seed counts the tables ask for (:func:`.plan.missing_runs`), one line
    per run, and the command that makes them; empty when none is missing."""
    missing = missing_runs(runs)
    if not missing:
        return []
    by_name: dict[str, list[str]] = {}
    for spec, split, seeds in missing:
        by_name.setdefault(parse_run(spec)[0], []).append(f"{split} seed{'s' * (len(seeds) > 1)} "
                                                          + ", ".join(map(str, seeds)))
    total = sum(len(seeds) for _, _, seeds in missing)
    return ["### Still to run", "",
            f"{total} trainings are missing from the seed counts the tables ask for ({MAIN_SEEDS} seeds for "
            f"{', '.join(f'`{n}`' for n in MAIN_SEED_NAMES)}, {OTHER_SEEDS} for the others); "
            "`python scripts/benchmark.py --missing` prints one command line for each:", "",
            *(f"- `{name}`: {'; '.join(parts)}" for name, parts in by_name.items()), ""]


def c2vkd_settings(runs: list[dict]) -> str:
    """How the table's ``c2vkd`` runs weigh pixels and whether they have stage exits and the channel-wise term (class
    balance, the exits, then the channel-wise term became C2VKD's defaults after earlier runs were made; each run's
    configuration says which it used)."""
    cfgs = [r["config"]["distillation"] for r in runs if r["name"] == "c2vkd" and r.get("config")]
    kinds = sorted({(c.get("class_balance", False), c.get("class_balance_power", 1.0), c.get("exit_weight") or 0.0,
                     c.get("channel_weight") or 0.0) for c in cfgs})
    text = "; ".join((f"class-balanced means, power {p:g}" if on else "plain pixel means (`--class_balance false`)")
                     + (f", stage exits at {e:g}" if e else "") + (f", channel-wise term at {k:g}" if k else "")
                     for on, p, e, k in kinds)
    return f"; `c2vkd` runs: {text}" if text else ""


def make_plots(runs: list[dict], out_dir: Path, protocol: str) -> list[str]:
    """Per protocol: val (and selection) mIoU per run of both tables, and val mIoU over training."""
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, table in zip(axes, TABLES):
        base, specs = TABLES[table]
        names = [n for n in (parse_run(s)[0] for s in specs) if values(runs, n, "val") or values(runs, n, "selection")]
        for i, name in enumerate(names):
            for offset, split, colour in ((-0.2, "val", "tab:blue"), (0.2, "selection", "tab:green")):
                v = list(values(runs, name, split).values())
                if v:
                    ax.bar(i + offset, statistics.mean(v), 0.38, color=colour, alpha=0.6,
                           label=split if i == 0 or not ax.get_legend_handles_labels()[0] else None)
                    ax.scatter([i + offset] * len(v), v, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(TABLE_TITLES[table], fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
    axes[0].set_ylabel("mIoU (%)  (bars: seed mean, dots: seeds)")
    fig.suptitle(f"CamVid, {protocol} protocol: val and selection-split mIoU")
    fig.tight_layout()
    files.append(f"{protocol}_miou.png")
    fig.savefig(out_dir / files[-1], dpi=90)

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for k, name in enumerate(sorted({r["name"] for r in runs if not r.get("ablation")})):
        histories = [r["runs"]["val"]["eval_history"] for r in runs if r["name"] == name and "val" in r.get("runs", {})]
        if not histories:
            continue
        steps = sorted({h["step"] for hist in histories for h in hist})
        mean = [statistics.mean(h["val_mean_iou"] * 100 for hist in histories for h in hist if h["step"] == s)
                for s in steps]
        ax.plot(steps, mean, marker="o", ms=3, color=f"C{k % 10}", ls="--" if name.endswith("-head") else "-",
                label=f"{name} ({len(histories)} seeds)")
    ax.set_xlabel("step"), ax.set_ylabel("val mIoU (%), seed mean")
    ax.set_title(f"Val mIoU over training ({protocol} protocol)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(f"{protocol}_curves.png")
    fig.savefig(out_dir / files[-1], dpi=90)
    return files


def write_report(out_dir: Path, readme: Optional[Path] = None) -> Optional[str]:
    """Writes RESULTS.md, ABLATIONS.md and the plots into ``out_dir`` from its run records, and the long (else
    short) protocol's tables into ``readme``'s benchmark section; returns RESULTS.md's path (``None`` without
    records)."""
    out_dir = Path(out_dir)
    by_protocol = {p: runs for p in ("long", "short") if (runs := load_runs(out_dir, p))}
    if not by_protocol:
        return None
    lines = ["# CamVid distillation benchmark", "",
             "Generated by `scripts/benchmark.py` from `runs/<protocol>/*.json` (do not edit by hand). Protocol, "
             "splits and pairing: `python scripts/benchmark.py --help` (`c2vkd_hf/benchmark/__init__.py`). `val`: "
             "trained on the full train split, evaluated on the val split (sequence 0016E5, also in training). `selection`: trained without sequence 0006R0, evaluated "
             "on its 101 frames (a sequence never trained on). Ablations: [ABLATIONS.md](ABLATIONS.md).", ""]
    readme_lines: list[str] = []
    ablations = ["# CamVid benchmark: ablations", "",
                 "Generated by `scripts/benchmark.py`. Each variant paired by seed with the run it changes; a teacher-based "
                 "variant with the text head also minus its teacher-free control (`none-head`, or the same data flags "
                 "without a teacher; what the teacher adds), paired by seed.", ""]
    for protocol, runs in by_protocol.items():
        section = [f"## {protocol.capitalize()} protocol", "", *protocol_lines(runs, protocol), ""]
        for table in TABLES:
            section += table_section(runs, table)
        if not readme_lines:
            readme_lines = list(section)
        section += [f"![{f}]({f})" for f in make_plots(runs, out_dir, protocol)] + [""]
        if protocol == "long":  # the protocol whose seed counts the tables are held to
            section += missing_section(runs)
        base, specs = TABLES["head"]
        lines += section + per_class_section(runs, base, [parse_run(s)[0] for s in specs])
        abl = ablation_section(runs)
        if abl:
            ablations += [f"## {protocol.capitalize()} protocol", "", *abl,
                          *per_class_section(runs, base, ["c2vkd", *teacher_head_variants(runs)])]
            for control, variants in sorted(controlled_variants(runs).items()):  # e.g. the same data flags, no teacher
                ablations += per_class_section(runs, control, variants)
    lines += ["## Commands", "", "```bash", "python scripts/benchmark.py --protocol long --main_seeds 5 --other_seeds 3",
              "python scripts/benchmark.py --protocol short --main_seeds 5 --other_seeds 3", "```", ""]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out_dir / "ABLATIONS.md").write_text("\n".join(ablations) + "\n")
    if readme is not None:
        update_readme(Path(readme), readme_lines, out_dir / "RESULTS.md")
    print(f"wrote {out_dir / 'RESULTS.md'} and ABLATIONS.md")
    return str(out_dir / "RESULTS.md")


README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def update_readme(readme: Path, table_lines: list[str], report: Path) -> None:
    """Replaces the text between the benchmark markers of ``readme`` (when both are there)."""
    if not readme.is_file():
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = "\n".join(f"#{line}" if line.startswith("## ") or line.startswith("### ") else line
                     for line in table_lines).strip()
    link = report.relative_to(readme.parent) if report.is_relative_to(readme.parent) else report
    readme.write_text(f"{head}{README_START}\n{body}\n\nAll tables, plots and the short protocol: [{link}]({link}).\n"
                      f"{README_END}{tail}")
