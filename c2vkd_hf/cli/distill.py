"""``c2vkd-distill``: distil a CNN segmentation teacher into a ViT student (C2VKD or a peer method).

    c2vkd-distill --output_dir runs/demo                                    # offline default job
    accelerate launch scripts/distill.py config.yaml                        # all flags from one file
    accelerate launch -m c2vkd_hf.cli.distill --teacher_name_or_path T --train_images ... --method c2vkd ...

Flags: ``DistillationArguments`` and ``DataArguments`` (``c2vkd_hf/config.py``) and transformers'
``TrainingArguments``. Without a teacher on the synthetic dataset (the default), it trains a small CNN
teacher first (cached in ``<output_dir>/teacher``), a no-teacher baseline on the same schedule
(``<output_dir>/baseline``), then the student, and prints the three mIoUs.

``--teacher_cache DIR`` replays the teacher's outputs from a cache instead of running the teacher each
step (built first when missing; see ``scripts/cache_teacher.py`` and ``c2vkd_hf/cache.py``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers import TrainingArguments

from c2vkd_hf.cli.help import DISTILL_SECTIONS, SectionedHelpParser
from c2vkd_hf.config import DataArguments, DistillationArguments
from c2vkd_hf.data import load_segmentation_data
from c2vkd_hf.jobs import (
    TEACHER_RESULTS_NAME,
    config_file_arguments,
    default_job_teacher,
    default_teacher_folder,
    needs_default_teacher,
    previous_distillation,
    push_student_to_hub,
    quiet_library_output,
    recipe_name,
    recipe_values,
    run_distillation,
    run_script,
    teacher_free_arguments,
    validate_distillation_args,
)
from c2vkd_hf.validation import parse_script_arguments

logger = logging.getLogger("c2vkd_hf")

#: Defaults of this script where they differ from TrainingArguments' (a flag or config value wins).
SCRIPT_DEFAULTS = {
    "output_dir": "outputs/c2vkd-default",
    "learning_rate": 6e-4,
    "lr_scheduler_type": "polynomial",
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "max_steps": 200,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "logging_steps": 10,
    "seed": 0,
    "report_to": "none",
    # the process group timeout (s): how long a rank waits at a collective for a rank that died before it gives up
    # (transformers' default is 1800); the launcher usually ends the others sooner (docs/RELIABILITY.md)
    "ddp_timeout": 600,
}


def parse_args(argv: list[str]):
    """``(DistillationArguments, DataArguments, TrainingArguments, train_baseline)`` from flags or one
    config file, type- and range-checked (``c2vkd_hf.validation.parse_script_arguments``)."""
    parser = SectionedHelpParser((DistillationArguments, DataArguments, TrainingArguments), sections=DISTILL_SECTIONS,
                                 own=(DistillationArguments, DataArguments),
                                 usage_line="c2vkd-distill [config.yaml | --flag value ...]")
    parser.add_argument("--train_baseline", choices=["auto", "true", "false"], default="auto",
                        help="Also train the student without a teacher on the same schedule (default: only in "
                             "the offline default job).")
    parser.add_argument("--recipe", default=None,
                        help="A named set of flag values read as defaults (a file of c2vkd_hf/recipes/, e.g. 'paper': "
                             "C2VKD as the paper describes it), or a YAML/JSON file; flags given here win.")
    config = config_file_arguments(argv)
    recipe = recipe_name(argv, config)
    train_baseline = str(config.pop("train_baseline", "auto")).lower() if config is not None else None
    if config is not None:
        config.pop("recipe", None)
    defaults = {**SCRIPT_DEFAULTS, **(recipe_values(recipe) if recipe else {})}
    dist_args, data_args, training_args, extras = parse_script_arguments(
        parser, argv, defaults, config=config, source=argv[0] if config is not None else None)
    return dist_args, data_args, training_args, train_baseline or extras["train_baseline"]


def announce(training_args: TrainingArguments, line: str) -> None:
    """One line on the console (main process only) before a phase starts."""
    if training_args.process_index == 0:
        print(line, flush=True)


def summary_lines(results: dict, baseline_miou: float | None) -> list[str]:
    """The closing summary: the student's, the teacher's and the baseline's validation mIoU, then the
    gain from the teacher with its sign (student minus baseline, in points)."""
    rows = [(f"student ({results['method']})", results["val_mean_iou"])]
    if results.get("teacher_val_mean_iou") is not None:
        rows.append((f"teacher ({results['teacher']})", results["teacher_val_mean_iou"]))
    if baseline_miou is not None:
        rows.append(("student without teacher, same schedule", baseline_miou))
    lines = [f"Validation mIoU on {results['dataset']}"]
    lines += [f"  {value * 100:6.2f}%  {name}" for name, value in rows]
    if baseline_miou is not None:
        gain = (results["val_mean_iou"] - baseline_miou) * 100
        lines.append(f"  {gain:+6.2f}   points from the teacher (student minus student without teacher)")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """The job, holding its output folders' locks (one writer per folder, :mod:`c2vkd_hf.locks`) until it ends."""
    from c2vkd_hf.locks import release_all

    try:
        return _main(argv)
    finally:
        release_all()


def _main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_library_output()
    dist_args, data_args, training_args, train_baseline = parse_args(argv)
    validate_distillation_args(dist_args)  # before anything is loaded or trained
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed once, after everything is saved
    is_default_job = data_args.dataset_name == "synthetic" and data_args.train_images is None
    baseline = is_default_job if train_baseline == "auto" else train_baseline == "true"
    output_dir = Path(training_args.output_dir)

    results = previous_distillation(dist_args, data_args, training_args)  # before any work (e.g. the baseline)
    baseline_miou = results.get("baseline_val_mean_iou") if results is not None else None
    if results is None:
        from dataclasses import replace

        with_baseline = baseline and dist_args.method != "none"
        phases = (["teacher"] if needs_default_teacher(dist_args, data_args) else []) + \
            (["baseline"] if with_baseline else []) + ["student"]
        number = {phase: f"[{i}/{len(phases)}] " if len(phases) > 1 else "" for i, phase in enumerate(phases, 1)}
        data = None
        if "teacher" in phases:
            data = load_segmentation_data(data_args)
            folder = default_teacher_folder(dist_args, training_args)
            trained = (folder / TEACHER_RESULTS_NAME).is_file()
            announce(training_args, f"{number['teacher']}teacher: " + (
                f"reusing the small CNN teacher trained earlier in {folder}" if trained else
                f"training a small CNN (UperNet + tf_efficientnet_lite0), {dist_args.default_teacher_steps} steps, "
                f"in {folder}"))
            default_job_teacher(dist_args, data_args, training_args, data)
        baseline_history = None
        if with_baseline:
            baseline_args = replace(training_args, output_dir=str(output_dir / "baseline"))
            announce(training_args, f"{number['baseline']}baseline: the student without a teacher (cross-entropy "
                                    f"only), same schedule, in {baseline_args.output_dir}")
            baseline_results = run_distillation(teacher_free_arguments(dist_args), data_args, baseline_args,
                                                data=data, write_card=False, phase="baseline")
            baseline_miou = baseline_results["val_mean_iou"]
            baseline_history = baseline_results.get("eval_history")
        teacher = dist_args.teacher_name_or_path or ("the teacher above" if "teacher" in phases else None)
        what = (f"distilling {teacher} into the student with {dist_args.method}" if dist_args.method != "none"
                else "training the student without a teacher")
        if teacher is not None or dist_args.method == "none":  # no teacher: the job stops next, saying which flag
            announce(training_args, f"{number['student']}student: {what}, in {output_dir}")
        results = run_distillation(dist_args, data_args, training_args, data=data, baseline_miou=baseline_miou,
                                   baseline_history=baseline_history, phase="student")
    else:
        print(f"{output_dir} already holds this run, finished: nothing was trained or changed "
              f"(--retrain trains it again).")

    print("\n" + "\n".join(summary_lines(results, baseline_miou)))
    print(f"Saved the student to {output_dir} ({results['wall_time_s']:.0f} s).")
    if push:
        repo = push_student_to_hub(output_dir, training_args.hub_model_id, training_args.hub_token,
                                   training_args.hub_private_repo)
        print(f"Pushed to https://huggingface.co/{repo}")
    return results


def run(argv: list[str] | None = None) -> int:
    """The ``c2vkd-distill`` command: :func:`main`, with one-line errors and exit codes
    (:func:`~c2vkd_hf.jobs.run_script`)."""
    return run_script(main, argv)


if __name__ == "__main__":
    sys.exit(run())
