"""--push_to_hub: when the upload fails, the message's command (huggingface_hub's `hf` CLI) and its
Python lines upload exactly the files the push would. The Hub is never reached: the upload is stopped
after huggingface_hub has chosen the files."""

from __future__ import annotations

import re
import shlex
import textwrap
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi

from c2vkd_hf.jobs import UserInputError, push_student_to_hub

KEPT = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "predictions.png",
        "training_curves.png", "results.json", "text_head.safetensors"}
LEFT_OUT = {"training_args.bin", "checkpoint-4/model.safetensors", "checkpoint-4/optimizer.pt",
            "teacher/model.safetensors", "baseline/results.json", "text_cache/a.safetensors", "results.json.tmp"}


class _Chosen(Exception):
    """Stops an upload once huggingface_hub has listed the files it would upload."""


@pytest.fixture
def chosen_files(monkeypatch):
    """The relative paths of every upload attempted through ``HfApi.upload_folder``, one set per call."""
    calls: list[set[str]] = []
    prepare = HfApi._prepare_upload_folder_additions

    def record(self, *args, **kwargs):
        calls.append({op.path_in_repo for op in prepare(self, *args, **kwargs)})
        raise _Chosen()

    monkeypatch.setattr(HfApi, "_prepare_upload_folder_additions", record)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: SimpleNamespace(repo_id=repo_id))
    return calls


def test_the_fallback_uploads_exactly_what_the_push_would(tmp_path, chosen_files):
    from click.testing import CliRunner
    from huggingface_hub.cli.hf import app  # the `hf` command of the installed huggingface_hub

    folder = tmp_path / "my student"  # a space: the command quotes paths
    for name in KEPT | LEFT_OUT:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("---\nlicense: apache-2.0\n---\n" if name == "README.md" else "x")
    with pytest.raises(UserInputError) as failure:
        push_student_to_hub(folder, "someone/tiny-student", token="hf_secret_token_value")
    message = str(failure.value)
    assert chosen_files == [KEPT] and "hf_secret_token_value" not in message and str(folder) in message

    command = re.search(r"^    (hf upload .*)$", message, re.MULTILINE).group(1)
    CliRunner().invoke(app, shlex.split(command)[1:])
    assert chosen_files[-1] == KEPT, "the hf command"

    python = textwrap.dedent(message.split("or in Python:", 1)[1])
    with pytest.raises(_Chosen):
        exec(compile(python, "<message>", "exec"), {})
    assert chosen_files[-1] == KEPT and len(chosen_files) == 3, "the Python lines"
