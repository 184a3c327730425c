"""Console commands: declared in setup.cfg, callable, the same code as scripts/*.py and python -m."""

from __future__ import annotations

import configparser
import importlib
import runpy
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"c2vkd-distill": "distill", "c2vkd-train-teacher": "train_teacher", "c2vkd-evaluate": "evaluate",
            "c2vkd-text-query": "text_query", "c2vkd-benchmark": "benchmark"}


def _console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_console_scripts_are_declared():
    assert _console_scripts() == {cmd: f"c2vkd_hf.cli.{module}:run" for cmd, module in COMMANDS.items()}


@pytest.mark.parametrize("command, module", sorted(COMMANDS.items()))
def test_commands_print_help(command, module, capsys):
    target, attr = _console_scripts()[command].split(":")
    run = getattr(importlib.import_module(target), attr)
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(COMMANDS.values()))
def test_scripts_are_thin_wrappers_of_the_commands(module):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(f"_wrapper_{module}", ROOT / "scripts" / f"{module}.py")
        wrapper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wrapper)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cli = importlib.import_module(f"c2vkd_hf.cli.{module}")
    assert wrapper.main is cli.main and wrapper.run is cli.run
    assert len((ROOT / "scripts" / f"{module}.py").read_text().splitlines()) <= 8


def test_python_dash_m_runs_a_command(monkeypatch, capsys):
    """What ``python -m c2vkd_hf.cli.evaluate --help`` (and ``accelerate launch -m``) executes, in process."""
    monkeypatch.setattr(sys, "argv", ["c2vkd_hf.cli.evaluate", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported by an earlier test
        runpy.run_module("c2vkd_hf.cli.evaluate", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0 and "--model_name_or_path" in capsys.readouterr().out


def test_distill_help_lists_every_flag_once_in_sections(capsys):
    """--help: model and data, method, training, advanced, then the rest of TrainingArguments; every flag once."""
    import re

    import pytest as _pytest

    from c2vkd_hf.cli import distill as cli
    from c2vkd_hf.cli.help import ADVANCED, OTHER

    with _pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    titles = ["model and data:", "method and its main weights:", "training:", f"{ADVANCED}:", f"{OTHER}:"]
    positions = [text.index(f"\n{title}\n") for title in titles]
    assert positions == sorted(positions)
    flags = re.findall(r"^  (--[a-z0-9_]+)", text, flags=re.M)
    assert len(flags) == len(set(flags)) > 150
    assert text.index("--teacher_name_or_path") < positions[1] < text.index("--pdd_weight") < positions[2]
    assert positions[3] < text.index("--class_balance_power") < positions[4] < text.index("--adam_beta1")
