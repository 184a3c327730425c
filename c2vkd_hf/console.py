"""What a training run prints: one short line per ``Trainer.log`` entry, and progress bars named after the phase.

:func:`console_line` formats a log entry; :class:`ConsoleProgressCallback` and :class:`ConsolePrinterCallback`
replace transformers' ``ProgressCallback`` / ``PrinterCallback`` (:func:`use_console_callbacks`), so the
teacher, baseline and student phases of a job each get a named bar and readable lines, while every value
stays in ``log_history`` and the ``report_to`` backends.
"""

from __future__ import annotations

import math
from typing import Optional

from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["console_line", "ConsoleProgressCallback", "ConsolePrinterCallback", "use_console_callbacks"]


def _number(value: float) -> str:
    """A loss-like value rounded for the console: 3 significant digits, no exponent above 1e-3."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.3g}" if abs(value) >= 1e-3 else f"{value:.1e}".replace("e-0", "e-")


def console_line(logs: dict, step: Optional[int] = None, max_steps: Optional[int] = None,
                 phase: Optional[str] = None, final: bool = False) -> Optional[str]:
    """The short console line for one ``Trainer.log`` entry, or ``None`` for entries not shown.

    * training: ``student step 20/200 | loss 0.734 | ce 0.61 pdd 0.1 glob 0.012 | lr 5.5e-4``: the
      weighted terms (``loss_weighted/<term>``, which add up to the loss; the unweighted
      ``loss/<term>`` when no weighted one was logged);
    * evaluation: ``student step 100/200 | val mIoU 45.21% | val loss 0.812`` (``final``: the
      evaluation after training, ``student final | val mIoU ...``);
    * end of training: ``student done: 200 steps in 192 s | mean loss 0.75``.

    Everything stays in ``logs`` (``log_history``, ``report_to`` backends, ``results.json``); only
    the console line is short.
    """
    where = None if step is None else (f"step {step}/{max_steps}" if max_steps else f"step {step}")
    prefix = " ".join(p for p in (phase, "final" if final else where) if p)
    if "eval_mean_iou" in logs:
        parts = [f"val mIoU {logs['eval_mean_iou'] * 100:.2f}%"]
        if isinstance(logs.get("eval_loss"), (int, float)):
            parts.append(f"val loss {_number(logs['eval_loss'])}")
        return " | ".join([prefix, *parts]) if prefix else " | ".join(parts)
    if "train_runtime" in logs:
        line = f"{phase + ' ' if phase else ''}done: {step} steps in {logs['train_runtime']:.0f} s"
        if isinstance(logs.get("train_loss"), (int, float)):
            line += f" | mean loss {_number(logs['train_loss'])}"
        return line
    if "loss" not in logs:
        return None
    parts = [prefix] if prefix else []
    parts.append(f"loss {_number(logs['loss'])}")
    weighted = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("loss_weighted/")}
    terms = weighted or {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("loss/")}
    if terms and list(terms) != ["ce"]:
        order = ["ce"] + sorted(t for t in terms if t != "ce")
        parts.append(" ".join(f"{t} {_number(terms[t])}" for t in order if t in terms))
    if isinstance(logs.get("learning_rate"), (int, float)):
        parts.append(f"lr {logs['learning_rate']:.1e}".replace("e-0", "e-"))
    return " | ".join(parts)


class ConsoleProgressCallback(ProgressCallback):
    """transformers' ``ProgressCallback`` with its bars named after the ``phase`` (``teacher``,
    ``baseline``, ``student``) and one short line per log (:func:`console_line`) instead of the
    whole logs dict."""

    def __init__(self, phase: Optional[str] = None):
        super().__init__()
        self.phase = phase
        self.trained = False

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=self.phase)
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero and self.prediction_bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") \
                else None
            self.prediction_bar = tqdm(total=total, leave=False, dynamic_ncols=True,
                                       desc=f"{self.phase} eval" if self.phase else "eval")
        if state.is_world_process_zero:
            self.prediction_bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        self.trained = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = console_line(logs, state.global_step, state.max_steps, self.phase, final=self.trained)
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


class ConsolePrinterCallback(PrinterCallback):
    """transformers' ``PrinterCallback`` (used with ``--disable_tqdm``), printing :func:`console_line`."""

    def __init__(self, phase: Optional[str] = None):
        self.phase = phase
        self.trained = False

    def on_train_end(self, args, state, control, **kwargs):
        self.trained = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            line = console_line(logs, state.global_step, state.max_steps, self.phase, final=self.trained)
            if line is not None:
                print(line, flush=True)


def use_console_callbacks(trainer: Trainer, phase: Optional[str] = None) -> None:
    """Replaces ``trainer``'s ``ProgressCallback``/``PrinterCallback`` (whichever ``disable_tqdm``
    chose) by :class:`ConsoleProgressCallback`/:class:`ConsolePrinterCallback` for ``phase``."""
    handler = trainer.callback_handler
    for old, new in ((ProgressCallback, ConsoleProgressCallback), (PrinterCallback, ConsolePrinterCallback)):
        if any(type(cb) is old for cb in handler.callbacks):
            handler.remove_callback(old)
            handler.add_callback(new(phase))
