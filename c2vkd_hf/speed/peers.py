"""Our training loop beside the peers' loops (``scripts/speed.py --peers``; writes ``peers.json`` and ``PEERS.md``).

One configuration, the CamVid protocol of :mod:`c2vkd_hf.speed` (SegFormer-B0 from random init, the reference
UperNet + EfficientNet-Lite0 teacher, 120x160 crops, batch 8, AdamW at lr 6e-4 and weight decay 0.01, gradient
clipping at norm 1, a linear decay), trained by six loops, each in its own fresh subprocess:

* ``ours_kd_online``: ``c2vkd-distill --method kd`` (our ``DistillationTrainer``), the teacher run online;
* ``torchdistill_kd``: torchdistill's own loop (``DistillationBox.forward_process`` then
  ``post_forward_process``: backward, clipping, optimizer and scheduler step), on the same student, teacher and
  batches, with its ``WeightedSumLoss`` over its ``KDLoss`` at our temperature and weights;
* ``ours_kd_cached``: ``--method kd`` replaying the teacher cache (``--teacher_cache``; torchdistill has none);
* ``ours_student_only``: ``--method none``, the student alone in our loop;
* ``torchdistill_student``: torchdistill's loop without a teacher (``TrainingBox``), its ``CrossEntropyLoss`` over
  the labelled pixels, so that each loop's cost of distillation is its KD row minus its own student row;
* ``hf_example_student``: the recipe of transformers' semantic-segmentation example: ``transformers.Trainer`` on
  ``SegformerForSemanticSegmentation``, whose own loss (cross-entropy of the logits upsampled to the labels) trains
  it, on the same batches.

KD is pixel-wise (Hinton et al., 2015): ``L = w_ce CE(z_s, y) + w_kd T^2 KL(softmax(z_t / T) || softmax(z_s / T))``
with both logits upsampled bilinearly to the label grid, averaged over the labelled pixels. torchdistill's
``KDLoss`` reduces with ``batchmean`` over its first dimension, so its forward procedures hand it the labelled
pixels as rows (:func:`pixel_rows`), the per-pixel mean ours takes.

Per row: the median step time (wall time between consecutive optimizer steps: data, teacher or cache, forward,
loss, backward, clipping, optimizer) over ``--steps`` after ``--warmup``, and the peak resident set over the steps
(``VmHWM`` reset right before the first) over the state built before it. Ratios are taken within one invocation.
The loss values of one fixed batch (:func:`loss_equality`, KD and the student-only cross-entropy): ours and
torchdistill's on the same student forward (the same RNG state: stochastic depth draws alike), before any step.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .plan import device_name, train_config
from .probes import (load_average, release_free_memory, reset_hwm, run_probe_main, set_threads, sync, touch_weights,
                     vm_hwm_mb, vm_rss_mb)
from .report import format_figure

PEER_ROWS = {
    "ours_kd_online": "c2vkd-distill --method kd, teacher online (our Trainer)",
    "torchdistill_kd": "torchdistill's loop (DistillationBox: forward_process, post_forward_process), same models, "
                       "batches, KD loss and optimizer",
    "ours_kd_cached": "c2vkd-distill --method kd, teacher cache replayed (torchdistill has no cache)",
    "ours_student_only": "c2vkd-distill --method none (our Trainer)",
    "torchdistill_student": "torchdistill's loop without a teacher (TrainingBox), same student, batches, "
                            "cross-entropy and optimizer",
    "hf_example_student": "transformers' semantic-segmentation example recipe: Trainer + "
                          "SegformerForSemanticSegmentation, its own loss",
}
#: (row, reference) pairs of the report's ratios.
PEER_PAIRS = (("ours_kd_online", "torchdistill_kd"), ("ours_kd_cached", "torchdistill_kd"),
              ("ours_student_only", "torchdistill_student"), ("ours_student_only", "hf_example_student"))
#: (distillation row, its loop's student-only row): what distillation adds to a step, per loop.
KD_OVERHEADS = (("ours_kd_online", "ours_student_only"), ("torchdistill_kd", "torchdistill_student"))
#: Largest difference accepted between the two frameworks' loss on the fixed batch (float32 sums in another order).
LOSS_TOLERANCE = 1e-5


def peer_config(args, name: str, output_dir: str) -> dict:
    """The ``distill.py`` configuration row ``name`` is built from: the speed protocol's (:func:`~.plan.train_config`)
    with ``--method kd`` and the teacher for the KD rows (``args.kd_cache`` for ``ours_kd_cached``), ``--method none``
    for the student rows; ``args.peer_flags`` (a dict, where given) overrides any flag (tests: a tiny student)."""
    config = train_config(args, "student_only", output_dir)
    if "kd" in name:
        config.update(method="kd", teacher_name_or_path=args.teacher)
    if name == "ours_kd_cached":
        config["teacher_cache"] = args.kd_cache
    config.update(getattr(args, "peer_flags", None) or {})
    return config


def pixel_rows(logits, labels, ignore_index: int):
    """``logits`` (B, K, h, w) upsampled bilinearly to the label grid, one row per labelled pixel: (n, K) float32."""
    from ..losses.common import resize

    z = resize(logits.float(), labels.shape[-2:]).permute(0, 2, 3, 1)
    return z[labels != ignore_index]


def torchdistill_box(trainer, steps: int):
    """A torchdistill box over our ``trainer``'s student (an untrained copy): with the trainer's teacher a
    ``DistillationBox`` with torchdistill's ``KDLoss`` at the trainer's temperature and weights (``alpha`` = the CE
    weight, ``beta`` = the KD weight: ``alpha CE + beta T^2 KL``), without one (``--method none``) a ``TrainingBox``
    with ``CrossEntropyLoss`` over the labelled pixels at the CE weight. Both with AdamW at the trainer's learning
    rate and weight decay, clipping at its ``max_grad_norm`` and a linear decay over ``steps``. Returns
    ``(box, inputs)``: ``inputs(batch)`` gives ``forward_process``'s arguments for one of our batches."""
    from torchdistill.core.distillation import DistillationBox
    from torchdistill.core.interfaces.registry import FORWARD_PROC_FUNC_DICT, register_forward_proc_func
    from torchdistill.core.training import TrainingBox

    source = trainer.teacher_source
    loss = trainer.model.distill_loss
    training = trainer.args
    if "c2vkd_student_rows" not in FORWARD_PROC_FUNC_DICT:  # registered once per process; all they read is passed
        @register_forward_proc_func(key="c2vkd_student_rows")
        def student_rows(model, sample_batch, targets=None, supp_dict=None, **kwargs):
            return pixel_rows(model(pixel_values=sample_batch).logits, supp_dict["labels"], supp_dict["ignore_index"])

        @register_forward_proc_func(key="c2vkd_teacher_rows")
        def teacher_rows(model, sample_batch, targets=None, supp_dict=None, **kwargs):
            logits = model(pixel_values=supp_dict["teacher_input"](sample_batch)).logits
            return pixel_rows(logits, supp_dict["labels"], supp_dict["ignore_index"])

    config = {
        "optimizer": {"key": "AdamW", "kwargs": {"lr": training.learning_rate, "weight_decay": training.weight_decay},
                      "max_grad_norm": training.max_grad_norm},
        "scheduler": {"key": "LinearLR", "kwargs": {"start_factor": 1.0, "end_factor": 0.0, "total_iters": steps},
                      "scheduling_step": 1},
        "num_epochs": 1,
    }
    student = copy.deepcopy(trainer.model.student)
    if source is None:
        ce = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
              "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                  "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                  "target": {"uses_label": True}}},
              "weight": float(loss.weights["ce"])}
        config.update(model={"forward_proc": "c2vkd_student_rows"},
                      criterion={"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"ce": ce}}})
        box = TrainingBox(student, {}, config, training.device, None, False, 1)
    else:
        kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
              "teacher_module_io": "output", "temperature": float(loss.temperature),
              "alpha": float(loss.weights["ce"]), "beta": float(loss.weights["kd"])}
        config.update(teacher={"forward_proc": "c2vkd_teacher_rows", "requires_grad": False},
                      student={"forward_proc": "c2vkd_student_rows"},
                      criterion={"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
                          "kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}})
        box = DistillationBox(source.model, student, {}, config, training.device, None, False, 1)

    def inputs(batch: dict) -> dict:
        labels = batch["labels"]
        supp = {"labels": labels, "ignore_index": loss.ignore_index}
        if source is not None:
            supp["teacher_input"] = source.teacher_input
        return {"sample_batch": batch["pixel_values"], "targets": labels[labels != loss.ignore_index],
                "supp_dict": supp}

    return box, inputs


def _memory(before, reset) -> dict:
    peak = vm_hwm_mb() if reset else None
    return {"rss_before_mb": before, "train_peak_rss_mb": peak,
            "extra_mb": None if peak is None or before is None else peak - before}


def peer_steps(args, name: str) -> dict:
    """Row ``name`` of :data:`PEER_ROWS`: ``args.warmup + args.steps`` steps of its loop; step times and memory."""
    import torch
    from transformers import Trainer, TrainerCallback

    from .probes import build_trainer

    threads = set_threads(args)
    device = device_name(args)
    total = args.warmup + args.steps
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync(device)
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        trainer, training_args = build_trainer(peer_config(args, name, tmp), [StepTimes()])
        if name.startswith("torchdistill_"):
            box, inputs = torchdistill_box(trainer, total)
            loader = trainer.get_train_dataloader()
            run = None
        elif name == "hf_example_student":
            collate = trainer.data_collator
            keep = ("pixel_values", "labels")
            student = copy.deepcopy(trainer.model.student)
            run = Trainer(model=student, args=training_args, train_dataset=trainer.train_dataset,
                          data_collator=lambda rows: {k: v for k, v in collate(rows).items() if k in keep},
                          callbacks=[StepTimes()])
        else:
            run = trainer
        touch_weights(trainer.model, getattr(trainer.teacher_source, "model", None))
        release_free_memory()
        before = vm_rss_mb()
        reset = reset_hwm()
        load_start = load_average()
        if run is None:
            sync(device)
            ends.append(time.perf_counter())
            epoch = 0
            while len(ends) <= total:  # epochs of the loader until ``total`` steps, as Trainer runs them
                box.pre_epoch_process(epoch=epoch)
                for batch in loader:
                    batch = {k: v.to(training_args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    box.post_forward_process(loss=box.forward_process(**inputs(batch)))
                    sync(device)
                    ends.append(time.perf_counter())
                    if len(ends) > total:
                        break
                epoch += 1
        else:
            run.train()
        memory = _memory(before, reset)
        load_end = load_average()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup:]
    return {"config": name, "description": PEER_ROWS[name], "steps_timed": len(times), "threads": threads,
            "load_start": load_start, "load_end": load_end, "step_s_median": statistics.median(times),
            "step_s_all": [round(t, 4) for t in times], **memory}


#: The loss each fixed-batch check compares, and the row of ours it is built from.
LOSS_CHECKS = {"kd": "ours_kd_online", "ce": "ours_student_only"}


def loss_equality(args, name: str = "kd") -> dict:
    """The loss ``name`` (:data:`LOSS_CHECKS`: KD, or the student-only cross-entropy) of one fixed batch (the first
    of the seed's data order) computed by our trainer (``compute_loss``) and by torchdistill's ``forward_process``,
    on the same untrained student under the same RNG state; ``abs_diff`` and whether it is within
    :data:`LOSS_TOLERANCE`."""
    import torch

    from .probes import build_trainer

    set_threads(args)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, training_args = build_trainer(peer_config(args, LOSS_CHECKS[name], tmp), [])
        box, inputs = torchdistill_box(trainer, 1)
        batch = next(iter(trainer.get_train_dataloader()))
        batch = {k: v.to(training_args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        trainer.model.train()
        box.pre_epoch_process(epoch=0)
        with torch.no_grad():
            torch.manual_seed(0)
            _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            torch.manual_seed(0)
            theirs = box.forward_process(**inputs(batch))
        ours = outputs["loss"]
    diff = abs(float(ours) - float(theirs))
    return {"config": name, "ours": float(ours), "torchdistill": float(theirs),
            "ours_terms": {k: float(v) for k, v in outputs["terms"].items()}, "abs_diff": diff,
            "tolerance": LOSS_TOLERANCE, "equal": diff <= LOSS_TOLERANCE,
            "labelled_pixels": int((batch["labels"] != trainer.model.distill_loss.ignore_index).sum())}


def ensure_kd_cache(args) -> None:
    """The KD teacher cache of ``ours_kd_cached`` (the teacher's logits only), ``args.kd_cache``, built outside the
    timed subprocesses when missing (:func:`~.runner.build_teacher_cache`)."""
    from .runner import build_teacher_cache

    build_teacher_cache(args.kd_cache, lambda output_dir: peer_config(args, "ours_kd_cached", output_dir))


def round_medians(row: dict) -> list:
    """A pooled row's median step time of each round (one round: its median)."""
    return row.get("round_medians_s", [row["step_s_median"]])


def summarise_peers(rows: dict) -> dict:
    """``{"ours_kd_online/torchdistill_kd": {"step": ratio, "step_per_round": [...], "train_peak": ratio,
    "extra": ratio}, ...}`` for :data:`PEER_PAIRS` (None where a figure is missing): ``step`` is the median of the
    per-round ratios of the rows' median step times (each round ran under its own load)."""
    def ratio(a, b):
        return None if a is None or not b else a / b

    def per_round(a, b):
        return [ratio(x, y) for x, y in zip(round_medians(a), round_medians(b))]

    return {f"{a}/{b}": {"step": statistics.median(per_round(rows[a], rows[b])),
                         "step_per_round": per_round(rows[a], rows[b]),
                         "train_peak": ratio(rows[a]["train_peak_rss_mb"], rows[b]["train_peak_rss_mb"]),
                         "extra": ratio(rows[a]["extra_mb"], rows[b]["extra_mb"])}
            for a, b in PEER_PAIRS if a in rows and b in rows}


def distillation_overheads(rows: dict) -> dict:
    """``{"ours_kd_online-ours_student_only": seconds, ...}`` for :data:`KD_OVERHEADS`: what distillation adds to one
    loop's step, the median over rounds of the per-round differences of the rows' median step times."""
    return {f"{a}-{b}": statistics.median(x - y for x, y in zip(round_medians(rows[a]), round_medians(rows[b])))
            for a, b in KD_OVERHEADS if a in rows and b in rows}


def measure_peers(args, command: str) -> dict:
    """The peer mode: the fixed-batch loss check, then ``args.rounds`` rounds of every row of :data:`PEER_ROWS`
    (each round runs every row once, in turn, each in a fresh subprocess), pooled (:func:`~.runner.pool_rounds`);
    ``command`` is recorded."""
    from .plan import machine
    from .runner import pool_rounds, run_probe

    start = time.time()
    info = machine(args)
    ensure_kd_cache(args)
    loss = run_probe(args, "peer_loss", "kd", module=__name__)
    ce = run_probe(args, "peer_loss", "ce", module=__name__)
    rounds = [[run_probe(args, "peer", name, module=__name__) for name in PEER_ROWS] for _ in range(args.rounds)]
    rows = {name: pool_rounds([r[i] for r in rounds]) for i, name in enumerate(PEER_ROWS)}
    import torchdistill
    import transformers

    return {"command": command, "machine": info, "teacher": args.teacher, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "versions": {"torchdistill": torchdistill.__version__,
                                                "transformers": transformers.__version__},
            "loss_equality": loss, "ce_equality": ce, "rows": rows, "ratios": summarise_peers(rows),
            "distillation_overheads_s": distillation_overheads(rows),
            "load_average_at_end": load_average(), "wall_time_s": round(time.time() - start, 1)}


def _loss_check_sentence(check: dict, theirs: str) -> str:
    """``ours X, torchdistill (theirs) Y, difference Z (within T)`` for one :func:`loss_equality` result."""
    return (f"ours (`compute_loss`) {check['ours']:.7f}, torchdistill ({theirs}) {check['torchdistill']:.7f}, difference "
            f"{check['abs_diff']:.1e} ({'within' if check['equal'] else 'OUTSIDE'} {check['tolerance']:.0e}).")


def write_peer_report(results: dict, path: Path) -> None:
    """``PEERS.md`` from :func:`measure_peers`' results."""
    m, loss, ce, rows = results["machine"], results["loss_equality"], results["ce_equality"], results["rows"]
    lines = [
        "# Our loop beside torchdistill's and the transformers example's", "",
        "Written by `scripts/speed.py --peers` (:mod:`c2vkd_hf.speed.peers`); do not edit. Reproduce with:", "",
        f"    {results['command']}", "",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), {m['device']}, {m['precision']}; "
        f"torch {m['torch']}, transformers {results['versions']['transformers']}, torchdistill "
        f"{results['versions']['torchdistill']}. Load average at the start {[round(x, 2) for x in m['load_average_at_start']]}, at "
        f"the end {results['load_average_at_end']}. CamVid 120x160 crops, batch 8, SegFormer-B0 (random init), the UperNet + "
        f"EfficientNet-Lite0 teacher; {results['rounds']} round(s) of {results['warmup']} warm-up + {results['steps']} "
        "timed steps per row, each row in its own fresh process, the rows in turn.", "",
        "## The loss on one fixed batch", "",
        f"KD (temperature and weights of `--method kd`) on the first batch of seed 0, the same untrained student "
        f"forward under the same RNG state, {loss['labelled_pixels']} labelled pixels: "
        + _loss_check_sentence(loss, "`DistillationBox.forward_process`, its `KDLoss`"), "",
        "The student-only cross-entropy on the same batch: "
        + _loss_check_sentence(ce, "`TrainingBox.forward_process`, `CrossEntropyLoss` over the labelled pixels"), "",
        "## Step time and memory", "",
        "| row | loop | step s (median) | train peak RSS MiB | over the built state MiB |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        step = format_figure(row["step_s_median"], ".3f")
        peak, extra = (format_figure(row[k], ".0f") for k in ("train_peak_rss_mb", "extra_mb"))
        lines.append(f"| `{name}` | {row['description']} | {step} | {peak} | {extra} |")
    lines += ["", "| ratio | step time (median of the rounds' ratios; per round) | train peak RSS | memory over the "
              "built state |", "|---|---|---|---|"]
    for pair, ratio in results["ratios"].items():
        rounds = ", ".join(format_figure(r, ".2f") for r in ratio["step_per_round"])
        step, peak, extra = (format_figure(ratio[k], ".2f") for k in ("step", "train_peak", "extra"))
        lines.append(f"| `{pair}` | {step}x ({rounds}) | {peak}x | {extra}x |")
    lines += [
        "", "What distillation adds to a step in each loop (the KD row's median step minus its own loop's student-only "
        "row's, median over rounds): " + "; ".join(f"`{pair}` {format_figure(value, '+.3f')} s"
                                                   for pair, value in results["distillation_overheads_s"].items()) + ".",
        "", "## What differs between the loops", "",
        "- The same student object (copied before any step), teacher, batches (our data loader, decoded cache, seed 0 "
        "order) and loss formula in every row; the teacher runs under `no_grad` in eval mode in both KD loops.",
        "- Ours: `transformers.Trainer`'s AdamW leaves biases and norm weights out of weight decay and warms up for 2 "
        "steps before the linear decay; torchdistill's `get_optimizer` decays every parameter and its `LinearLR` has "
        "no warm-up. Neither changes a step's cost.",
        "- torchdistill's `KDLoss` reduces with `batchmean` over its first dimension, so its forward procedures give it "
        "the labelled pixels as rows (`pixel_rows`: both logits upsampled to the label grid), the per-pixel mean ours "
        "takes. Its loop has no teacher cache; `ours_kd_cached` replays ours.",
        "- `hf_example_student` is `transformers.Trainer` on the plain `SegformerForSemanticSegmentation` (its own "
        "loss), as the semantic-segmentation example trains, on our batches (its data path, `datasets` transforms, is "
        "not timed here).", "",
    ]
    path.write_text("\n".join(lines))


PROBES = {"peer": peer_steps, "peer_loss": loss_equality}


def main(argv: list[str]) -> None:
    """Subprocess entry of this module's :data:`PROBES` (:func:`~.probes.run_probe_main`)."""
    run_probe_main(argv, PROBES)


if __name__ == "__main__":
    main(sys.argv[1:])
