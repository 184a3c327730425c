"""Publishing: the student folder pushed to the Hub, or the command and Python lines that push it later."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..validation import UserInputError


#: What ``--push_to_hub`` leaves out of the output folder: training state (``checkpoint-*``,
#: ``training_args.bin``), the default job's teacher and baseline, caches and partial files.
PUSH_IGNORE_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "teacher/**", "baseline/**", "text_cache/**", "*.tmp",
                        "training_args.bin", ".c2vkd-lock-*")


def manual_upload_instructions(output_dir: Path, repo_id: str, private: Optional[bool] = None) -> str:
    """A shell command (the ``hf`` CLI of huggingface_hub) and the same few lines of Python that upload
    exactly the files :func:`push_student_to_hub` would (same repo, same ``PUSH_IGNORE_PATTERNS``)."""
    import shlex

    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in PUSH_IGNORE_PATTERNS)
    private_flag = " --private" if private else ""
    command = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(output_dir))} {excludes}{private_flag}"
    python = [
        "from huggingface_hub import HfApi",
        "api = HfApi()",
        f"repo = api.create_repo({repo_id!r}, {'private=True, ' if private else ''}exist_ok=True).repo_id",
        f"api.upload_folder(folder_path={str(output_dir)!r}, repo_id=repo,",
        f"                  ignore_patterns={list(PUSH_IGNORE_PATTERNS)!r})",
    ]
    return "\n".join(["    " + command, "", "or in Python:", "", *("    " + line for line in python)])


def push_student_to_hub(output_dir: Path, repo_id: Optional[str], token: Optional[str] = None,
                        private: Optional[bool] = None) -> str:
    """Uploads the saved student folder (weights, config, processor, card, images; not
    :data:`PUSH_IGNORE_PATTERNS`). Everything is already saved locally; when the upload fails (no
    network, no login) this raises :class:`UserInputError` with a command and a Python snippet that
    upload the same files later (:func:`manual_upload_instructions`)."""
    from huggingface_hub import HfApi

    repo_id = repo_id or output_dir.name
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=url.repo_id, ignore_patterns=list(PUSH_IGNORE_PATTERNS))
    except Exception as error:  # network, auth: the user needs one clear message, not a traceback
        reason = type(error).__name__
        raise UserInputError(
            f"--push_to_hub failed ({reason}): could not upload to the Hub repo '{repo_id}'. The student, its "
            f"card and results are saved in {output_dir}. Once online and logged in (`hf auth login`), upload "
            f"the files the push would (no checkpoints, no training_args.bin) with\n\n"
            f"{manual_upload_instructions(output_dir, repo_id, private)}\n") from None
    return url.repo_id
