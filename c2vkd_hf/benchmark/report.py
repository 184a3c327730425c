"""The benchmark's reports from its run records: RESULTS.md (both tables on both splits, paired gains, gain
ratios, the teacher-attributable gain against its target, per-class gains, plots), ABLATIONS.md and the
README's benchmark section. Nothing in them is typed by hand."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from .plan import (MAIN_SEED_NAMES, MAIN_SEEDS, OTHER_SEEDS, PAPER_NAME, SPLITS, TABLE_TITLES, TABLES, mark_stale,
                   missing_runs, parse_run)
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
        if name in (base, "c2vkd", PAPER_NAME):  # C2VKD's own rows are not peers
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


def head_to_head_line(gains: list[tuple[int, float]], peer: str, what: Optional[str] = None) -> str:
    """C2VKD against ``peer`` directly: ``d(s) = mIoU(c2vkd, s) - mIoU(peer, s)`` paired by seed, its mean, the
    standard deviation of ``d`` over seeds, the seeds with ``d > 0`` and each seed's ``d``. The ratio of mean gains
    says how much larger C2VKD's gain is; this says whether the difference is larger than a seed moves it."""
    d = [x for _, x in gains]
    spread = f" ± {statistics.stdev(d):.2f} (std over seeds)" if len(d) > 1 else ""
    per_seed = ", ".join(f"s{s}: {x:+.2f}" for s, x in gains)
    return (f"{what or f'C2VKD minus best peer {peer}'}, paired by seed: **{statistics.mean(d):+.2f}**{spread}, "
            f"C2VKD above on "
            f"{sum(x > 0 for x in d)}/{len(d)} seeds ({per_seed})")


def table_section(runs: list[dict], table: str, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Markdown: one table's runs on ``splits``, paired gains, the gain ratio, C2VKD against the best peer and
    against the paper's recipe, and the targets."""
    base, specs = TABLES[table]
    names = [parse_run(s)[0] for s in specs]
    present = [n for n in names if any(values(runs, n, split) for split in splits)]
    if not present:
        return []
    header = " | ".join(f"{sp} seeds | {sp} mIoU | {sp} gain over {base}" for sp in splits)
    lines = [f"### {TABLE_TITLES[table]}", "",
             f"mIoU in points (mean ± seed std); gain = paired by seed over `{base}`.", "",
             f"| run | {header} |", "|---|" + "---|---|---|" * len(splits)]
    for name in present:
        cells = []
        for split in splits:
            v = list(values(runs, name, split).values())
            cells += [str(len(v)), mean_std(v), "+0.00" if name == base and v else gain_cell(paired_gains(runs, name, base, split))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    target = {"defaults": 2.0, "head": 1.5}[table]
    for split in splits:
        r = gain_ratio(runs, table, split)
        if r is None:
            continue
        text = (f"{r['ratio']:.2f}" if r["ratio"] is not None else
                f"undefined (no peer beats {base}: best {r['best']} {r['peer']:+.2f})")
        lines.append(f"- {split}: gain ratio (C2VKD's paired gain {r['c2vkd']:+.2f}) / (best peer {r['best']}'s "
                     f"{r['peer']:+.2f}), on the {r['seeds']} seed{'s' if r['seeds'] > 1 else ''} both have = "
                     f"**{text}** (target > {target:g})")
        lines.append(f"- {split}: " + head_to_head_line(paired_gains(runs, "c2vkd", r["best"], split), r["best"]))
    for split in splits:
        paper = paired_gains(runs, "c2vkd", PAPER_NAME, split)
        if paper and table == "defaults":
            lines.append(f"- {split}: " + head_to_head_line(paper, PAPER_NAME, what="C2VKD (ours) minus C2VKD (paper)"))
    if table == "head":
        for split in splits:
            gains = paired_gains(runs, "c2vkd", base, split)
            if gains:
                lines.append(f"- {split}: " + teacher_gain_line(gains, base))
    return lines + [""]


def per_class_section(runs: list[dict], base: str, candidates: list[str], splits: tuple[str, ...] = SPLITS,
                      include_stale: bool = False) -> list[str]:
    """Markdown: where each run's gain lands, per class and split: ``base``'s IoU (seed mean) and each of
    ``candidates``' IoU minus the baseline's, paired by seed and averaged over the seeds both have,
    ``mean_s [IoU_k(run, s) - IoU_k(base, s)]``."""
    lines = []
    for split in splits:
        ref = class_values(runs, base, split, include_stale)
        others = {n: class_values(runs, n, split, include_stale) for n in candidates if n != base}
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


def ablation_section(runs: list[dict], splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Markdown: each ablation paired by seed with the run it changes, on ``splits``, and (for a teacher-based
    variant with the text head) its teacher-attributable gain: minus its teacher-free control (``none-head``
    unless the record names another), paired by seed."""
    variants = sorted({r["name"] for r in runs if r.get("ablation")})
    if not variants:
        return []
    with_head = set(teacher_head_variants(runs))
    lines = ["| variant | compared with | flags | " + " | ".join(f"{sp}: paired gain" for sp in splits)
             + " | teacher-free control | " + " | ".join(f"{sp}: minus control" for sp in splits) + " |",
             "|---|---|---|" + "---|" * (2 * len(splits) + 1)]
    for name in variants:
        run = next(r for r in runs if r["name"] == name)
        ref = run.get("ablates") or "c2vkd"
        control = (run.get("control") or "none-head") if name in with_head else None
        flags = " ".join(run.get("extra_flags") or []) or "-"
        cells = [gain_cell(paired_gains(runs, name, ref, split, True)) for split in splits] + [control or "-"]
        cells += [gain_cell(paired_gains(runs, name, control, split, True)) if control else "-" for split in splits]
        lines.append(f"| {name} | {ref} | `{flags}` | " + " | ".join(cells) + " |")
    return lines + [""]


def _resize_text(data: dict) -> str:
    if data.get("resize_height"):
        return f"{data['resize_height']}x{data['resize_width']}"
    if data.get("resize_shortest_edge"):
        crop = f", crops {data['crop_height']}x{data['crop_width']}" if data.get("crop_height") else ""
        return f"shorter side {data['resize_shortest_edge']} (aspect kept){crop}"
    return "at their own size"


def protocol_lines(runs: list[dict], protocol: str) -> list[str]:
    current = [r for r in runs if r.get("config") and not r.get("stale")] or [r for r in runs if r.get("config")]
    cfg = current[0]["config"]
    teacher = next((r["teacher_val_mean_iou"] for r in runs if r.get("teacher_val_mean_iou")), None)
    return [f"- {protocol}: {cfg['training']['max_steps']} steps, batch {cfg['training']['per_device_train_batch_size']}, "
            f"AdamW lr {cfg['training']['learning_rate']} polynomial, warm-up {cfg['training']['warmup_steps']}; images "
            f"{_resize_text(cfg['data'])}, scale {cfg['data']['min_scale']}-"
            f"{cfg['data']['max_scale']}, crop, flip; SegFormer-B0 from random init; teacher "
            f"`{Path(cfg['distillation']['teacher_name_or_path']).name}`"
            + (f" ({teacher * 100:.2f}% val mIoU at this resolution)" if teacher else "") + c2vkd_settings(current)]


def missing_section(runs: list[dict], dataset: str, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """The table trainings still to make for the seed counts the tables ask for (:func:`.plan.missing_runs`), one line
    per run, and the command that makes them; empty when none is missing."""
    missing = missing_runs(runs, splits=splits)
    if not missing:
        return []
    by_name: dict[str, list[str]] = {}
    for spec, split, seeds in missing:
        by_name.setdefault(parse_run(spec)[0], []).append(f"{split} seed{'s' * (len(seeds) > 1)} "
                                                          + ", ".join(map(str, seeds)))
    total = sum(len(seeds) for _, _, seeds in missing)
    return ["### Still to run", "",
            f"{total} trainings are missing from the seed counts the tables ask for ({MAIN_SEEDS} seeds for "
            f"{', '.join(f'`{n}`' for n in MAIN_SEED_NAMES)}, {OTHER_SEEDS} for the others; stale records count as "
            f"missing); `c2vkd-benchmark --dataset {dataset} --missing` prints one command line for each:", "",
            *(f"- `{name}`: {'; '.join(parts)}" for name, parts in by_name.items()), ""]


def stale_section(runs: list[dict]) -> list[str]:
    """The records that are not runs of today's configuration (left out of every table), with why."""
    stale = [r for r in runs if r.get("stale")]
    if not stale:
        return []
    lines = ["### Stale records (left out of the tables; trained again when the benchmark runs)", "",
             "| record | why (first differences) |", "|---|---|"]
    for r in sorted(stale, key=lambda r: (r["name"], r["seed"])):
        lines.append(f"| {r['name']} seed {r['seed']} | {'; '.join(r['stale'][:3])} |")
    return lines + [""]


def c2vkd_settings(runs: list[dict]) -> str:
    """How the table's ``c2vkd`` runs weigh pixels and whether they have stage exits and the channel-wise term (each
    run's configuration says which it used)."""
    cfgs = [r["config"]["distillation"] for r in runs if r["name"] == "c2vkd" and r.get("config")]
    kinds = sorted({(c.get("class_balance", False), c.get("class_balance_power", 1.0), c.get("exit_weight") or 0.0,
                     c.get("channel_weight") or 0.0) for c in cfgs})
    text = "; ".join((f"class-balanced means, power {p:g}" if on else "plain pixel means (`--class_balance false`)")
                     + (f", stage exits at {e:g}" if e else "") + (f", channel-wise term at {k:g}" if k else "")
                     for on, p, e, k in kinds)
    return f"; `c2vkd` runs: {text}" if text else ""


def make_plots(runs: list[dict], out_dir: Path, protocol: str, title: str = "",
               splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Per protocol: mIoU per run of both tables on ``splits``, and val mIoU over training."""
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    colours = {"val": "tab:blue", "selection": "tab:green"}
    width = 0.76 / len(splits)
    for ax, table in zip(axes, TABLES):
        base, specs = TABLES[table]
        names = [n for n in (parse_run(s)[0] for s in specs) if any(values(runs, n, sp) for sp in splits)]
        for i, name in enumerate(names):
            for k, split in enumerate(splits):
                offset = (k - (len(splits) - 1) / 2) * width
                v = list(values(runs, name, split).values())
                if v:
                    ax.bar(i + offset, statistics.mean(v), width * 0.95, color=colours[split], alpha=0.6,
                           label=split)
                    ax.scatter([i + offset] * len(v), v, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(TABLE_TITLES[table], fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
    axes[0].set_ylabel("mIoU (%)  (bars: seed mean, dots: seeds)")
    fig.suptitle(f"{title}, {protocol} protocol: " + " and ".join(splits) + " mIoU")
    fig.tight_layout()
    files.append(f"{protocol}_miou.png")
    fig.savefig(out_dir / files[-1], dpi=90)

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for k, name in enumerate(sorted({r["name"] for r in runs if not r.get("ablation") and not r.get("stale")})):
        histories = [r["runs"]["val"]["eval_history"] for r in runs if r["name"] == name and not r.get("stale")
                     and "val" in r.get("runs", {})]
        if not histories:
            continue
        steps = sorted({h["step"] for hist in histories for h in hist})
        mean = [statistics.mean(h["val_mean_iou"] * 100 for hist in histories for h in hist if h["step"] == s)
                for s in steps]
        ax.plot(steps, mean, marker="o", ms=3, color=f"C{k % 10}", ls="--" if name.endswith("-head") else "-",
                label=f"{name} ({len(histories)} seeds)")
    ax.set_xlabel("step"), ax.set_ylabel("val mIoU (%), seed mean")
    ax.set_title(f"{title}: val mIoU over training ({protocol} protocol)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(f"{protocol}_curves.png")
    fig.savefig(out_dir / files[-1], dpi=90)
    return files


def write_report(out_dir: Path, readme: Optional[Path] = None, spec=None) -> Optional[str]:
    """Writes RESULTS.md, ABLATIONS.md and the plots into ``out_dir`` from its run records (stale ones marked against
    ``spec``, the dataset spec), and the long (else first) protocol's tables into ``readme``'s benchmark section;
    returns RESULTS.md's path (``None`` without records)."""
    out_dir = Path(out_dir)
    order = list(spec.protocols)[::-1] if spec is not None else ["long", "short"]
    by_protocol = {p: runs for p in order if (runs := load_runs(out_dir, p))}
    if not by_protocol:
        return None
    title = spec.title if spec is not None else out_dir.name
    splits = spec.splits if spec is not None else SPLITS
    name = spec.name if spec is not None else out_dir.name
    notes = "; ".join(f"`{sp}`: {spec.split_notes[sp]}" for sp in splits if spec is not None and sp in spec.split_notes)
    lines = [f"# {title} distillation benchmark", "",
             f"Generated by `c2vkd-benchmark --dataset {name}` from `runs/<protocol>/*.json` (do not edit by hand). "
             "Protocol, splits and pairing: `c2vkd-benchmark --help` (`c2vkd_hf/benchmark/__init__.py`)"
             + (f". {notes}" if notes else "") + ". Ablations: [ABLATIONS.md](ABLATIONS.md).", ""]
    readme_lines: list[str] = []
    ablations = [f"# {title} benchmark: ablations", "",
                 "Generated by `c2vkd-benchmark`. Each variant paired by seed with the run it changes; a teacher-based "
                 "variant with the text head also minus its teacher-free control (`none-head`, or the same data flags "
                 "without a teacher; what the teacher adds), paired by seed. An ablation is a record of the "
                 "configuration it ran (its record holds it) and pairs with the records of its time, also those the "
                 "tables now leave out as stale.", ""]
    for protocol, runs in by_protocol.items():
        if spec is not None and protocol in spec.protocols:
            mark_stale(runs, spec, protocol)
        section = [f"## {protocol.capitalize()} protocol", "", *protocol_lines(runs, protocol), ""]
        for table in TABLES:
            section += table_section(runs, table, splits)
        if not readme_lines:
            readme_lines = list(section)
        section += [f"![{f}]({f})" for f in make_plots(runs, out_dir, protocol, title, splits)] + [""]
        if protocol == "long":  # the protocol whose seed counts the tables are held to
            section += missing_section(runs, name, splits)
        section += stale_section(runs)
        base, specs = TABLES["head"]
        lines += section + per_class_section(runs, base, [parse_run(s)[0] for s in specs], splits)
        abl = ablation_section(runs, splits)
        if abl:
            ablations += [f"## {protocol.capitalize()} protocol", "", *abl,
                          *per_class_section(runs, base, ["c2vkd", *teacher_head_variants(runs)], splits, True)]
            for control, variants in sorted(controlled_variants(runs).items()):  # e.g. the same data flags, no teacher
                ablations += per_class_section(runs, control, variants, splits, True)
    lines += ["## Commands", "", "```bash",
              *(f"c2vkd-benchmark --dataset {name} --protocol {p} --main_seeds 5 --other_seeds 3" for p in order),
              "```", ""]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out_dir / "ABLATIONS.md").write_text("\n".join(ablations) + "\n")
    if readme is not None:
        update_readme(Path(readme), readme_lines, out_dir / "RESULTS.md", key=name)
    print(f"wrote {out_dir / 'RESULTS.md'} and ABLATIONS.md")
    return str(out_dir / "RESULTS.md")


def best_peer(runs: list[dict], table: str, split: str) -> Optional[str]:
    """The peer of ``table`` with the largest mean paired gain over the table's teacher-free run on ``split`` (over
    all its seeds; :func:`gain_ratio` compares on the seeds C2VKD shares), or ``None`` without peer runs."""
    base, specs = TABLES[table]
    gains = {}
    for spec in specs:
        name = parse_run(spec)[0]
        if name not in (base, "c2vkd", PAPER_NAME) and (g := paired_gains(runs, name, base, split)):
            gains[name] = statistics.mean(x for _, x in g)
    return max(gains, key=gains.get) if gains else None


def summary_rows(runs: list[dict], split: str) -> dict[str, Optional[dict]]:
    """Per table, the figures of the cross-dataset summary on ``split``: :func:`gain_ratio`'s, the table's
    teacher-free run (``base``) and ``minus_best``, C2VKD minus the best peer per shared seed (``None`` where a table
    has no ratio yet)."""
    out = {}
    for table in TABLES:
        base = TABLES[table][0]
        r = gain_ratio(runs, table, split)
        if r is None:
            out[table] = None
            continue
        out[table] = {**r, "base": base, "minus_best": [x for _, x in paired_gains(runs, "c2vkd", r["best"], split)]}
    return out


def _teacher_results_miou(teacher: Optional[str]) -> Optional[float]:
    """The val mIoU a teacher folder's ``teacher_results.json`` records (``c2vkd-train-teacher``), else ``None``."""
    import json

    path = Path(teacher) / "teacher_results.json" if teacher else None
    try:
        return float(json.loads(path.read_text())["val_mean_iou"]) if path and path.is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def summary_section(datasets: list[tuple[object, list[dict]]], protocol: str = "long") -> list[str]:
    """Markdown: the cross-dataset summary, one row per dataset and split: the teacher, the plain student, the best
    peer, C2VKD (ours) and C2VKD (paper), mIoU as seed means, then per table the gain ratio (C2VKD's paired gain over
    the best peer's), C2VKD minus the best peer paired by seed, and C2VKD (ours) minus C2VKD (paper) paired by seed
    (each: mean ± std over seeds, seeds above)."""
    lines = [f"mIoU in points ({protocol} protocol; seed means, seeds in brackets); ratio = C2VKD's paired gain over "
             "the table's teacher-free run / the best peer's; minus best = C2VKD minus that peer, paired by seed, "
             "± std over seeds (seeds above / seeds); ours minus paper likewise.", "",
             "| dataset | split | teacher | plain student | best peer | C2VKD (ours) | C2VKD (paper) | ours minus paper "
             "| ratio, defaults | minus best, defaults | ratio, with head | minus best, with head |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(name: str, runs: list[dict], split: str) -> str:
        v = list(values(runs, name, split).values())
        return f"{statistics.mean(v):.2f} ({len(v)})" if v else "-"

    def paired_cell(d: list[float]) -> str:
        spread = f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else ""
        return f"{statistics.mean(d):+.2f}{spread} ({sum(x > 0 for x in d)}/{len(d)})" if d else "-"

    for spec, runs in datasets:
        teacher = next((r["teacher_val_mean_iou"] for r in runs if r.get("teacher_val_mean_iou") and not r.get("stale")),
                       None)  # a stale record may have been made with another teacher
        if teacher is None:
            teacher = _teacher_results_miou(spec.teacher)
        for split in spec.splits:
            rows = summary_rows(runs, split)
            best = rows["defaults"]["best"] if rows.get("defaults") else best_peer(runs, "defaults", split)
            cells = [spec.title, split, f"{teacher * 100:.2f}" if teacher and split == "val" else "-",
                     cell("none", runs, split), f"{best}: {cell(best, runs, split)}" if best else "-",
                     cell("c2vkd", runs, split), cell(PAPER_NAME, runs, split),
                     paired_cell([x for _, x in paired_gains(runs, "c2vkd", PAPER_NAME, split)])]
            for table in TABLES:
                r = rows.get(table)
                if r is None:
                    cells += ["-", "-"]
                    continue
                ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "undefined"
                cells += [f"{ratio} (vs {r['best']})", paired_cell(r["minus_best"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_summary(specs: list, benchmarks_dir: Path, readme: Optional[Path] = None, protocol: str = "long") -> str:
    """``benchmarks/RESULTS.md``: the cross-dataset summary (:func:`summary_section`) of every dataset in ``specs``
    with records, also written into ``readme``'s summary section; returns its path."""
    datasets = []
    for spec in specs:
        runs = load_runs(Path(benchmarks_dir) / spec.name, protocol)
        if runs:
            datasets.append((spec, mark_stale(runs, spec, protocol)))
    body = summary_section(datasets, protocol)
    lines = ["# Distillation benchmarks: every dataset", "",
             "Generated by `c2vkd-benchmark` from each dataset's run records (do not edit by hand); the tables per "
             "dataset: " + ", ".join(f"[{s.title}]({s.name}/RESULTS.md)" for s, _ in datasets) + ".", "", *body]
    path = Path(benchmarks_dir) / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    if readme is not None:
        update_readme(Path(readme), body, path, key="summary")
    return str(path)


def readme_markers(key: str) -> tuple[str, str]:
    """The markers around a generated section of the README (``key``: a dataset's name, or ``summary``)."""
    return f"<!-- benchmark:{key}:start -->", f"<!-- benchmark:{key}:end -->"


def update_readme(readme: Path, table_lines: list[str], report: Path, key: str = "camvid") -> None:
    """Replaces the text between the ``key`` markers of ``readme`` (when both are there)."""
    if not readme.is_file():
        return
    text = readme.read_text()
    start, end = readme_markers(key)
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(f"#{line}" if line.startswith("## ") or line.startswith("### ") else line
                     for line in table_lines).strip()
    link = report.relative_to(readme.parent) if report.is_relative_to(readme.parent) else report
    readme.write_text(f"{head}{start}\n{body}\n\nAll tables and plots: [{link}]({link}).\n{end}{tail}")
