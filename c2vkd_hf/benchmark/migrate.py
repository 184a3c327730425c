"""Relabels the benchmark's run records when a method's default changes, so the tables keep showing what a user
of the current defaults gets without retraining anything.

A default changes when an ablation ``promote`` wins by the rule in :mod:`c2vkd_hf.benchmark`; its runs are then the
same trainings as the table's row under the new defaults. :func:`change_default`:

- renames the table row's records (made with the old default) to the ablation ``demote_as``, whose ``extra_flags``
  reproduce the old default under the new one and which ablates the table row;
- points every other ablation made on the old default (``ablates`` the table row) at ``demote_as``, and every
  ablation of ``promote`` at the table row;
- renames ``promote``'s records to the table row (no extra flags, no ablation).

An ablation's ``extra_flags`` read relative to the run it ablates, so retargeted ablations keep theirs.
Each relabelled record keeps its configuration and command as run and says where it came from in
``relabelled_from``. The runs' work folders are renamed alike, so a resumed benchmark never folds a result of one
configuration into a record of the other. Nothing is changed while a benchmark process holds a lock on one of the
folders involved.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plan import SPLITS
from .records import record_path, write_json
from .runner import held, work_folder


def _records(runs: Path, name: str) -> dict[int, Path]:
    """``{seed: record path}`` of run ``name`` in the protocol folder ``runs``."""
    return {int(p.stem.rsplit("-seed", 1)[1]): p for p in runs.glob(f"{name}-seed*.json")
            if p.stem.rsplit("-seed", 1)[0] == name}


def change_default(out_dir: Path, work_dir: Path, protocol: str, table_name: str, promote: str, demote_as: str,
                   demote_flags: list[str]) -> dict:
    """Makes ``promote``'s records the table row ``table_name`` and the row's old records the ablation
    ``demote_as`` (module docstring).

    Returns ``{"demoted": seeds, "promoted": seeds, "retargeted": names}``. Raises ``ValueError`` when ``promote``
    has no records, when ``demote_as`` already has records or its folders exist, or when a promoted seed would land
    on a table-row folder no record owns, and ``RuntimeError`` when a live benchmark process holds one of the involved
    work folders; nothing is changed then."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    runs = out_dir / "runs" / protocol  # the record_path layout, as records.load_runs reads it

    def folders(name: str, seed: int) -> list[Path]:
        return [work_folder(work_dir, protocol, name, seed, split) for split in SPLITS]

    old, new = _records(runs, table_name), _records(runs, promote)
    if not new:
        raise ValueError(f"{promote!r} has no {protocol} records under {runs}; nothing to promote")
    if _records(runs, demote_as) or any(f.exists() for s in old for f in folders(demote_as, s)):
        raise ValueError(f"{demote_as!r} already has records or work folders; choose another name for the old default")
    stale = [str(f) for s in new if s not in old for f in folders(table_name, s) if f.exists()]
    if stale:
        raise ValueError(f"{', '.join(stale)} belong to no {table_name!r} record; move them away first")
    busy = [f for name, seeds in ((table_name, old), (promote, new)) for s in seeds for f in folders(name, s)
            if held(f / "RUNNING")]
    if busy:
        raise RuntimeError(f"a benchmark process is running {', '.join(map(str, busy))}; stop it first")

    def move(source: str, name: str, seed: int, why: str, changes: dict, drop: tuple = ()) -> None:
        """Record and work folders of ``source``-seed become ``name``-seed, with ``changes`` and without ``drop``."""
        path = record_path(out_dir, protocol, source, seed)
        record = json.loads(path.read_text())
        before = record.get("relabelled_from")
        record.update(changes, name=name,
                      relabelled_from=f"{source} ({why})" + (f"; before that {before}" if before else ""))
        for key in drop:
            record.pop(key, None)
        write_json(record_path(out_dir, protocol, name, seed), record)
        path.unlink()
        for src, dst in zip(folders(source, seed), folders(name, seed)):
            if src.is_dir():
                src.rename(dst)

    retargeted = []
    for path in sorted(runs.glob("*.json")):
        record = json.loads(path.read_text())
        if not record.get("ablation") or record["name"] in (promote, demote_as):
            continue
        target = record.get("ablates") or table_name
        if target in (table_name, promote):
            record["ablates"] = demote_as if target == table_name else table_name
            write_json(path, record)
            retargeted.append(record["name"])
    for seed in sorted(old):
        move(table_name, demote_as, seed, f"the default before {promote} replaced it",
             {"extra_flags": list(demote_flags), "ablation": demote_as, "ablates": table_name})
    for seed in sorted(new):
        move(promote, table_name, seed, "the same training as the new default", {"extra_flags": [], "ablation": None},
             drop=("ablates", "control"))
    return {"demoted": sorted(old), "promoted": sorted(new), "retargeted": sorted(set(retargeted))}
