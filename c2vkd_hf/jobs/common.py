"""What the jobs share: results files, script arguments, datasets, training arguments, resuming, finished runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
from pathlib import Path
from typing import Optional

import yaml
from transformers import TrainingArguments

from ..config import DataArguments
from ..data import AugmentationEpochCallback, SegmentationData, build_transform, with_example_index
from ..data.decoded import decoded_datasets
from ..runs import check_previous_run, run_config, write_run_config
from ..trainer import SafeCheckpointTrainer, checkpoint_problems, last_complete_checkpoint
from ..validation import UserInputError, check_output_dir, save_errors

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TEACHER_RESULTS_NAME = "teacher_results.json"


def config_file_arguments(argv: list[str]) -> Optional[dict]:
    """When ``argv`` is a single ``.json``/``.yaml``/``.yml`` path (the scripts' config-file form),
    its mapping of flag names to values; else ``None``. A missing, unparsable or non-mapping file
    is a :class:`UserInputError`."""
    if len(argv) != 1 or not argv[0].endswith((".json", ".yaml", ".yml")):
        return None
    path = Path(argv[0])
    if not path.is_file():
        raise UserInputError(f"Config file {path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, ValueError) as error:
        raise UserInputError(f"Config file {path}: {error}") from None
    if not isinstance(config, dict):
        raise UserInputError(f"Config file {path}: expected a mapping of flag names to values")
    return config


def recipe_values(recipe: str) -> dict:
    """The flags of a recipe: a file of ``c2vkd_hf/recipes/`` by name (``paper``), or a YAML/JSON file by path. An
    unknown name is a :class:`UserInputError` that lists the built-in recipes."""
    from importlib import resources

    folder = resources.files("c2vkd_hf") / "recipes"
    path = Path(recipe)
    if not path.is_file():
        builtin = folder / f"{recipe}.yaml"
        if not builtin.is_file():
            names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
            raise UserInputError(f"--recipe {recipe}: neither a file nor a built-in recipe ({', '.join(names)}).")
        path = Path(str(builtin))
    values = config_file_arguments([str(path)]) if path.suffix in (".json", ".yaml", ".yml") else None
    if values is None:
        raise UserInputError(f"--recipe {recipe}: a recipe file must be .yaml, .yml or .json.")
    return values


def recipe_name(argv: list[str], config: Optional[dict]) -> Optional[str]:
    """The ``--recipe`` of a command line or config file mapping (``None`` without one)."""
    if config is not None:
        return config.get("recipe")
    for i, item in enumerate(argv):
        if item == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith("--recipe="):
            return item.split("=", 1)[1]
    return None


def saved_data_arguments(model_dir, argv: list[str], data_args: DataArguments,
                         say=logger.info) -> DataArguments:
    """``data_args`` when ``argv`` sets a data flag; else the data configuration saved in the
    ``results.json`` that ``distill.py`` writes in ``model_dir`` (so a trained model is evaluated on
    the data it was trained for without repeating the flags). Neither: a :class:`UserInputError`
    asking for the data (never a silent evaluation on the built-in synthetic scenes)."""
    saved = Path(model_dir) / RESULTS_NAME
    names = {f.name for f in dataclasses.fields(DataArguments)}
    given = any(a.startswith("--") and a[2:].split("=")[0] in names for a in argv)
    if given:
        return data_args
    if not saved.is_file():
        raise UserInputError(f"{model_dir} has no {RESULTS_NAME} to take the data configuration from: give the data "
                             f"flags (--train_images/--train_labels/--validation_images/--validation_labels/"
                             f"--labels_file, or --dataset_name; --dataset_name synthetic for the built-in scenes).")
    say(f"Using the data configuration saved in {saved}.")
    return DataArguments(**json.loads(saved.read_text())["config"]["data"])


def quiet_library_output() -> None:
    """Silences what transformers prints on every run and that tells a user nothing: the progress bars of
    saving and loading weights ("Writing model shards", "Loading weights"). huggingface_hub's download
    bars stay on."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars (also switches the Hub's off) ...
    enable_progress_bars()  # ... the Hub's download bars back on


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def datasets_for(data: SegmentationData, data_args: DataArguments, mean, std, seed: Optional[int] = None,
                 with_views: bool = False):
    """Transformed train and validation datasets, and the callbacks the train transform needs.

    With ``seed`` the training augmentation of each example is a function of (seed, epoch, example
    index), so an interrupted run resumes with exactly the same augmented batches. ``with_views``:
    training batches also carry each example's ``example_index`` and ``geometry`` (what a teacher
    cache replays). With the decoded-dataset cache (``--decoded_cache``, :mod:`c2vkd_hf.data.decoded`) both
    splits are read from memory-mapped decoded arrays, with the same geometries."""
    transform = build_transform(data_args, mean, std, train=True, seed=seed)
    transform.return_index = transform.return_geometry = with_views
    indexed = seed is not None or with_views
    eval_transform = build_transform(data_args, mean, std, train=False)
    decoded = decoded_datasets(data, data_args, transform, eval_transform, indexed)  # None: --decoded_cache false
    if decoded is not None:
        train, validation = decoded
    else:
        train = (with_example_index(data.train) if indexed else data.train).with_transform(transform)
        validation = data.validation.with_transform(eval_transform)
    callbacks = [AugmentationEpochCallback(transform)] if seed is not None else []
    return train, validation, callbacks


def prepare_training_args(training_args: TrainingArguments) -> TrainingArguments:
    """Forces what segmentation training with our data pipeline needs. A ``--hub_token`` is moved
    into this process's ``HF_TOKEN`` environment variable (which ``huggingface_hub`` reads), so that
    nothing that saves or prints the arguments (``training_args.bin``, ``results.json``, logs) can
    contain it."""
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None
    training_args.remove_unused_columns = False  # the transforms need the raw image/label columns
    training_args.batch_eval_metrics = True  # stream the confusion matrix; keep no predictions
    training_args.label_names = ["labels"]
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinned memory needs an accelerator (else a warning per run)
    steps = training_args.max_steps
    if steps and steps > 0 and training_args.warmup_steps >= max(steps, 1):
        # a warm-up as long as the run leaves the polynomial schedule nothing to decay (division by zero)
        training_args.warmup_steps = steps // 10
    return training_args


def processor_size(data_args: DataArguments, data: SegmentationData) -> dict[str, int]:
    """The input size saved in the image processor: the evaluation resize (``shortest_edge``/``longest_edge``
    for an aspect-preserving one, as transformers' processors spell it), else the first validation image's."""
    if data_args.resize_height and data_args.resize_width:
        return {"height": data_args.resize_height, "width": data_args.resize_width}
    keep = {name: value for name, value in (("shortest_edge", data_args.resize_shortest_edge),
                                            ("longest_edge", data_args.resize_longest_edge)) if value is not None}
    if keep:
        return keep
    width, height = data.validation[0]["image"].size
    return {"height": height, "width": width}


def resume_checkpoint(training_args: TrainingArguments) -> Optional[str]:
    """The checkpoint to resume from: ``--resume_from_checkpoint`` when given (it must be a complete
    checkpoint, else :class:`UserInputError` says what is missing), otherwise the newest complete
    ``checkpoint-N`` in ``--output_dir`` (incomplete ones, left by a kill during a save, are skipped)."""
    require_optimizer = not training_args.save_only_model
    named = training_args.resume_from_checkpoint
    if named:
        problems = checkpoint_problems(named, require_optimizer=require_optimizer)
        if problems:
            raise UserInputError(f"--resume_from_checkpoint {named} is not a complete checkpoint: "
                                 f"{'; '.join(problems)}.")
        return named
    return last_complete_checkpoint(training_args.output_dir, require_optimizer=require_optimizer)


def write_json(path: Path, payload: dict) -> None:
    """``payload`` as JSON at ``path``, durably (:func:`~c2vkd_hf.files.write_text_durably`)."""
    from ..files import write_text_durably

    write_text_durably(path, json.dumps(payload, indent=2, default=str))


def previous_run(output_dir: Path, config: dict, training_args: TrainingArguments, *, results_name: str,
                 retrain: bool, wait_for_lock: bool = False) -> Optional[dict]:
    """Before any work: ``output_dir`` must be a writable folder, and this process takes its lock (one writer per
    folder, :mod:`c2vkd_hf.locks`: another live run there is a :class:`UserInputError` naming it, or is waited for
    with ``wait_for_lock``); then the saved results of a finished run of the same ``config``
    (:func:`c2vkd_hf.runs.run_config`), or ``None`` to train; another configuration's run there is refused, and
    ``retrain`` deletes it first (:func:`c2vkd_hf.runs.check_previous_run`)."""
    from ..locks import FolderLockedError, lock_folder

    check_output_dir(output_dir)
    try:
        lock_folder(output_dir, process_index=training_args.process_index, wait=wait_for_lock)
    except FolderLockedError as error:
        raise UserInputError(str(error)) from None
    with training_args.main_process_first(desc="output folder", local=False):
        results = check_previous_run(output_dir, config, results_name=results_name, retrain=retrain,
                                     saved_config=_saved_run_config)
    if results is not None:
        logger.warning("%s already holds this run, finished (%s): nothing to do. Pass --retrain to train it again.",
                       output_dir, results_name)
    return results


def _saved_run_config(results: dict) -> Optional[dict]:
    """The configuration of a finished run: its ``run_config``, or (older results files) the one made
    from its ``config`` dump."""
    if "run_config" in results:
        return results["run_config"]
    return run_config(results["config"]) if isinstance(results.get("config"), dict) else None


def train_evaluate_save(trainer: SafeCheckpointTrainer, training_args: TrainingArguments,
                        output_dir: Path, config: dict) -> dict[str, float]:
    """Trains (resuming from the last complete checkpoint), evaluates, saves; returns the metrics. A
    fresh run first records its ``config`` (``run_config.json``); a resumed one was checked against it
    (:func:`previous_run`), or, started by an earlier version without one, against the checkpoint's
    weights (``SafeCheckpointTrainer.train``)."""
    last = resume_checkpoint(training_args)
    if last:
        logger.warning("Resuming from %s", last)
    elif trainer.is_world_process_zero():
        with save_errors(output_dir):
            write_run_config(output_dir, config)
    trainer.train(resume_from_checkpoint=last)
    stopped = getattr(trainer, "preemption", None)
    if stopped is not None and stopped.stopped_at is not None:
        from .errors import Preempted

        raise Preempted(f"{stopped.received} received: saved {output_dir / f'checkpoint-{stopped.stopped_at}'} after "
                        f"step {stopped.stopped_at}; run the same command to resume.")
    metrics = trainer.evaluate()
    with save_errors(output_dir):
        trainer.save_model(str(output_dir))
    return metrics
