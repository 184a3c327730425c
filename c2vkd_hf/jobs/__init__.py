"""The jobs behind the scripts: train a teacher, distil a student (evaluation: :mod:`c2vkd_hf.inference`).

``scripts/train_teacher.py``, ``scripts/distill.py`` and ``scripts/evaluate.py`` are thin wrappers around these
functions (through :mod:`c2vkd_hf.cli`), and the benchmark (:mod:`c2vkd_hf.benchmark`) runs every training through
``c2vkd-distill``, so that the offline default job (which trains its own teacher first, then a no-teacher
baseline, then the student) and the benchmark share one code path with what users run.

* :mod:`.errors`: how scripts end: user errors, exit codes, the process group shut down
  (:func:`run_script`, :func:`user_errors`, :func:`end_distributed`);
* :mod:`.checks`: checks of the flags before any work, and of the classes of data, teacher and text;
* :mod:`.common`: what the jobs share (results files, script arguments, datasets and training
  arguments, resuming, finished runs, train-evaluate-save);
* :mod:`.teacher`: :func:`train_teacher` and the offline default job's teacher;
* :mod:`.setup`: :func:`setup_distillation`, which builds teacher, student, loss, text head, teacher cache and trainer
  from the flags;
* :mod:`.distill`: :func:`run_distillation` (what identifies a run, its results) and the student's model card;
* :mod:`.publish`: :func:`push_student_to_hub`.
"""

from ..validation import UserInputError
from .checks import (
    check_class_agreement,
    check_local_path,
    check_teacher_name,
    student_config_overrides,
    student_head_note,
    validate_distillation_args,
)
from .common import (
    RESULTS_NAME,
    TEACHER_RESULTS_NAME,
    config_file_arguments,
    peak_rss_mb,
    prepare_training_args,
    previous_run,
    processor_size,
    recipe_name,
    recipe_values,
    quiet_library_output,
    resume_checkpoint,
    saved_data_arguments,
    train_evaluate_save,
)
from .distill import (
    distillation_run_config,
    evaluation_size,
    is_eval_subset,
    previous_distillation,
    run_distillation,
    teacher_free_arguments,
    teacher_val_miou,
    write_student_card,
)
from .errors import EXIT_NON_FINITE_LOSS, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, end_distributed, run_script, user_errors
from .publish import PUSH_IGNORE_PATTERNS, manual_upload_instructions, push_student_to_hub
from .setup import (
    DistillationSetup,
    build_loss_module,
    build_text_head,
    c2vkd_feature_pairs,
    distillation_text_embeddings,
    open_teacher_cache,
    setup_distillation,
    teacher_reference_size,
)
from .teacher import (
    DEFAULT_TEACHER_LR,
    check_pyramid_backbone,
    default_job_teacher,
    default_teacher_folder,
    needs_default_teacher,
    train_teacher,
)

__all__ = [
    "UserInputError",
    "EXIT_USER_ERROR",
    "EXIT_NON_FINITE_LOSS",
    "EXIT_PREEMPTED",
    "Preempted",
    "run_script",
    "end_distributed",
    "user_errors",
    "check_class_agreement",
    "check_local_path",
    "check_teacher_name",
    "student_config_overrides",
    "student_head_note",
    "validate_distillation_args",
    "RESULTS_NAME",
    "TEACHER_RESULTS_NAME",
    "config_file_arguments",
    "peak_rss_mb",
    "prepare_training_args",
    "previous_run",
    "processor_size",
    "recipe_name",
    "recipe_values",
    "quiet_library_output",
    "resume_checkpoint",
    "saved_data_arguments",
    "train_evaluate_save",
    "DEFAULT_TEACHER_LR",
    "check_pyramid_backbone",
    "default_job_teacher",
    "default_teacher_folder",
    "needs_default_teacher",
    "train_teacher",
    "DistillationSetup",
    "build_loss_module",
    "build_text_head",
    "c2vkd_feature_pairs",
    "teacher_reference_size",
    "distillation_run_config",
    "teacher_free_arguments",
    "distillation_text_embeddings",
    "evaluation_size",
    "is_eval_subset",
    "open_teacher_cache",
    "previous_distillation",
    "run_distillation",
    "setup_distillation",
    "teacher_val_miou",
    "write_student_card",
    "PUSH_IGNORE_PATTERNS",
    "manual_upload_instructions",
    "push_student_to_hub",
]
