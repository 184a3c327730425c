"""One-off relabelling of the long-protocol CamVid records when C2VKD's default gained stage exits (session 11).

The old default (no exits) is now the ablation ``c2vkd-noexit`` (``--exit_weight 0``, the same training); the
``c2vkd-exit`` runs (explicit ``--stage_pairs stage1:stage1,...,stage4:stage4 --exit_weight 0.5
--weight_schedules exit:linear:0.5``) are the same training as the new default (``--stage_pairs auto`` resolves
to those four pairs for SegFormer-B0 against the reference teacher; the stage weight is 0, so the stage schedule
changes nothing) and become the table's ``c2vkd`` rows. Ablations made on the old default are now paired
against ``c2vkd-noexit``. Work folders are renamed alike, so the runner never folds an old-default result into a
new-default record. Records are rewritten in place; each relabelled record keeps its configuration as run and
gains ``relabelled_from``.

    python benchmarks/camvid/migrations/exits_default.py . outputs/benchmark-camvid 0,1   # then seed 2 alone, once its val run landed
"""
import json
import sys
from pathlib import Path

repo, work, seeds = Path(sys.argv[1]), Path(sys.argv[2]) / "long", [int(s) for s in sys.argv[3].split(",") if s]
runs = repo / "benchmarks" / "camvid" / "runs" / "long"
NEW_ABLATIONS = {"c2vkd-noexit", "c2vkd-exit-cwd-decay"}  # made or named on the new default
DROP = object()


def move(old: str, new: str, seed: int, **changes) -> None:
    """Record ``old``-seed -> ``new``-seed with ``changes`` (:data:`DROP` removes a key), and its work folders."""
    path = runs / f"{old}-seed{seed}.json"
    record = json.loads(path.read_text())
    record.update({k: v for k, v in changes.items() if v is not DROP})
    for key in [k for k, v in changes.items() if v is DROP]:
        record.pop(key, None)
    (runs / f"{new}-seed{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
    path.unlink()
    for suffix in ("", "-selection"):
        if (work / f"{old}-seed{seed}{suffix}").is_dir():
            (work / f"{old}-seed{seed}{suffix}").rename(work / f"{new}-seed{seed}{suffix}")


# 1. ablations made on the old default now ablate c2vkd-noexit (idempotent: only those still pointing at c2vkd)
for path in sorted(runs.glob("*.json")):
    record = json.loads(path.read_text())
    if record.get("ablation") and record["name"] not in NEW_ABLATIONS and record.get("ablates", "c2vkd") == "c2vkd":
        record["ablates"] = "c2vkd-noexit"
        path.write_text(json.dumps(record, indent=2) + "\n")
# 2. the old default's records (no exits in their configuration) and folders become c2vkd-noexit
for path in sorted(runs.glob("c2vkd-seed*.json")):
    if not json.loads(path.read_text())["config"]["distillation"].get("exit_weight"):
        move("c2vkd", "c2vkd-noexit", int(path.stem.rsplit("seed", 1)[1]), name="c2vkd-noexit",
             extra_flags=["--exit_weight", "0"], ablation="c2vkd-noexit", ablates="c2vkd",
             relabelled_from="c2vkd (the default before stage exits)")
# 3. finished c2vkd-exit seeds become the table's c2vkd
for seed in seeds:
    record = json.loads((runs / f"c2vkd-exit-seed{seed}.json").read_text())
    assert record.get("val_mean_iou") is not None and record.get("selection_mean_iou") is not None, seed
    move("c2vkd-exit", "c2vkd", seed, name="c2vkd", extra_flags=[], ablation=None, ablates=DROP, control=DROP,
         relabelled_from="c2vkd-exit (the same training as the new default)")
