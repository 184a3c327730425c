"""The private ``transformers.Trainer`` methods our trainers override, and what the public hooks that replaced the
others rely on: their signatures, that each is called during a tiny training run in the order the code expects,
and ``load_best_model_at_end`` end to end (docs/DESIGN.md, "Private Trainer methods").

A failure here after a transformers upgrade means an override or a hook no longer fits Trainer: read the new
``Trainer`` source before changing the expected values."""

from __future__ import annotations

import errno
import inspect
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerState

from c2vkd_hf import runs
from c2vkd_hf.losses import get_loss
from c2vkd_hf.models import feature_channels, student_image_processor
from c2vkd_hf.runs import MANIFEST_NAME
from c2vkd_hf.text_head import TextHead
from c2vkd_hf.trainer import (DISTILLATION_MODULES_NAME, DistillationModel, DistillationTrainer,
                              SafeCheckpointTrainer, TeacherTrainer, last_complete_checkpoint)
from c2vkd_hf.validation import SaveError
from tiny import ID2LABEL, collate, tensor_dataset, tiny_student, tiny_teacher

#: Every private Trainer method a trainer of ours overrides, with the parameters of Trainer's own version (in
#: transformers 5.25) and the classes overriding it.
OVERRIDDEN = {
    "_run_epoch": (("model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
                    "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
                    "steps_trained_in_current_epoch"), (SafeCheckpointTrainer,)),
    "_load_from_checkpoint": (("resume_from_checkpoint", "model"), (DistillationTrainer,)),
    "_load_best_model": ((), (DistillationTrainer,)),
}
#: Public methods we override or call whose private parameter we rely on (``_internal_call``: a save Trainer makes
#: itself, a checkpoint's or ``push_to_hub``'s; then Trainer does not push).
PUBLIC = {"save_model": ("output_dir", "_internal_call")}
#: The files of a distillation checkpoint: those of the paused benchmark runs' checkpoints (e.g.
#: outputs/benchmark-msrc21/long/c2vkd-seed0/checkpoint-1591), which must keep resuming.
CHECKPOINT_FILES = {"checkpoint_manifest.json", "config.json", DISTILLATION_MODULES_NAME, "model.safetensors",
                    "optimizer.pt", "preprocessor_config.json", "rng_state.pth", "scheduler.pt", "trainer_state.json",
                    "training_args.bin"}
FINAL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "text_head.safetensors",
               "training_args.bin"}
SECRET = "hf_overrides_test_token_0123456789"


def _parameters(function) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters if name != "self")


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_private_methods_keep_their_signature(name):
    """Trainer's private method still exists with the parameters our override was written for, and our override
    accepts them the way Trainer passes them (all keywords for ``_run_epoch``, positions for the others)."""
    expected, classes = OVERRIDDEN[name]
    assert name in vars(Trainer), f"Trainer.{name} is gone: our override of it is never called"
    assert _parameters(getattr(Trainer, name)) == expected, f"Trainer.{name} changed its parameters"
    for cls in classes:
        assert name in vars(cls), f"{cls.__name__} no longer overrides {name}: update OVERRIDDEN and the design table"
        signature = inspect.signature(getattr(cls, name))
        signature.bind(None, **{p: None for p in expected})
        signature.bind(None, *[None] * len(expected))


def test_no_other_private_trainer_method_is_overridden():
    """The table of docs/DESIGN.md lists every private override: a new one must be added to it (and here)."""
    for cls in (SafeCheckpointTrainer, TeacherTrainer, DistillationTrainer):
        private = {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")
                   and callable(getattr(Trainer, name, None))}
        assert private <= set(OVERRIDDEN), f"{cls.__name__} overrides {sorted(private - set(OVERRIDDEN))}"


def test_public_methods_keep_the_parameters_we_rely_on():
    for name, expected in PUBLIC.items():
        assert _parameters(getattr(Trainer, name)) == expected
        assert _parameters(getattr(SafeCheckpointTrainer, name)) == expected
    assert {"commit_message", "revision"} <= set(_parameters(Trainer.push_to_hub))
    assert "on_save" in vars(TrainerCallback)  # the event that writes a checkpoint's manifest


# ------------------------------------------------------------------------------------------ tiny runs
def _model(seed: int = 0) -> DistillationModel:
    """A tiny student with KD and a text head: the head's projector is what the checkpoints'
    ``distillation_modules.safetensors`` holds."""
    student = tiny_student(seed)
    text = torch.nn.functional.normalize(torch.randn(len(ID2LABEL), 12, generator=torch.Generator().manual_seed(3)),
                                         dim=1)
    torch.manual_seed(seed)
    head = TextHead.create(feature_channels(student)["decoder"], text, "decoder", 0.03)
    return DistillationModel(student, get_loss("kd"), text_head=head)


def _scripted_metric(scores):
    """``compute_metrics`` whose n-th evaluation scores ``scores[n]``, so the best checkpoint is known."""
    done = []

    def compute(prediction, compute_result=True):
        if not compute_result:
            return {}
        done.append(1)
        return {"score": scores[len(done) - 1]}
    return compute


def _args(output_dir, **kwargs) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=3, learning_rate=3e-3,
                  report_to="none", logging_steps=1, seed=0, remove_unused_columns=False, disable_tqdm=True,
                  use_cpu=True, batch_eval_metrics=True, label_names=["labels"], save_strategy="steps", save_steps=1)
    values.update(kwargs)
    return TrainingArguments(**values)


def _best_args(output_dir, **kwargs) -> TrainingArguments:
    return _args(output_dir, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="score", greater_is_better=True, **kwargs)


def _distiller(args, model, scores=None, callbacks=None) -> DistillationTrainer:
    return DistillationTrainer(
        model=model, args=args, train_dataset=tensor_dataset(16, seed=1), data_collator=collate,
        eval_dataset=tensor_dataset(4, seed=9) if scores else None,
        compute_metrics=_scripted_metric(scores) if scores else None, teacher=tiny_teacher(), teacher_feature_names=[],
        processing_class=student_image_processor(model.student, size={"height": 32, "width": 32}),
        callbacks=callbacks)


def _spy(events: list, target, name: str, record):
    """Wraps ``target.name`` so that each call first appends ``record(*args, **kwargs)`` to ``events``."""
    original = getattr(target, name)

    def spy(*args, **kwargs):
        events.append(record(*args, **kwargs))
        return original(*args, **kwargs)
    return spy


class _Events(TrainerCallback):
    def __init__(self, events, output_dir):
        self.events, self.output_dir = events, output_dir

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(self.output_dir, f"checkpoint-{state.global_step}")
        self.events.append(("other on_save", os.path.isfile(os.path.join(folder, MANIFEST_NAME))))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("on_train_end",))


def _state(folder) -> dict:
    """The weights of the model saved in ``folder``, by their in-memory names (``from_pretrained``)."""
    model = AutoModelForSemanticSegmentation.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_saves_and_best_model_loading_run_in_the_expected_order(tmp_path, monkeypatch):
    """One run, a checkpoint and an evaluation every step, ``load_best_model_at_end``: ``_run_epoch`` runs; each
    checkpoint is saved by ``save_model`` first (its stale marker and manifest already gone), then the optimizer,
    then ``trainer_state.json``, then our manifest, before any other callback's ``on_save``; at the end
    ``_load_best_model`` runs before ``on_train_end``. The folders have the benchmark checkpoints' files."""
    out = tmp_path / "run"
    stale = out / "checkpoint-2"  # a folder from an earlier run, rewritten by this one
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    (stale / MANIFEST_NAME).write_text("{}")
    events: list = []
    trainer = _distiller(_best_args(out, hub_token=SECRET), _model(), scores=[0.2, 0.9, 0.5],
                         callbacks=[_Events(events, str(out))])

    def folder_of(path):
        return os.path.basename(os.path.normpath(path))

    monkeypatch.setattr(trainer, "_run_epoch", _spy(events, trainer, "_run_epoch", lambda *a, **k: ("_run_epoch",)))
    monkeypatch.setattr(trainer, "_write_model", _spy(events, trainer, "_write_model", lambda output_dir, **k: (
        "write model", folder_of(output_dir), os.path.exists(os.path.join(output_dir, "trainer_state.json")),
        os.path.exists(os.path.join(output_dir, MANIFEST_NAME)))))
    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", _spy(
        events, trainer, "_save_optimizer_and_scheduler", lambda output_dir: ("optimizer", folder_of(output_dir))))
    monkeypatch.setattr(TrainerState, "save_to_json", _spy(
        events, TrainerState, "save_to_json", lambda self, path: ("trainer_state", folder_of(os.path.dirname(path)))))
    monkeypatch.setattr(runs, "write_manifest", _spy(
        events, runs, "write_manifest", lambda folder: ("manifest", folder_of(folder))))
    monkeypatch.setattr(trainer, "_load_best_model", _spy(
        events, trainer, "_load_best_model",
        lambda: ("_load_best_model", folder_of(trainer.state.best_model_checkpoint))))
    trainer.train()

    expected = [("_run_epoch",)]
    for step in (1, 2, 3):
        name = f"checkpoint-{step}"
        expected += [("write model", name, False, False), ("optimizer", name), ("trainer_state", name),
                     ("manifest", name), ("other on_save", True)]
    expected += [("_load_best_model", "checkpoint-2"), ("on_train_end",)]
    assert events == expected

    for step in (1, 2, 3):
        folder = out / f"checkpoint-{step}"
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        listed = set(json.loads((folder / MANIFEST_NAME).read_text())["files"])
        assert listed == CHECKPOINT_FILES - {MANIFEST_NAME}
        assert SECRET not in (folder / "training_args.bin").read_bytes().decode("latin-1")
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-3")
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} == FINAL_FILES


def test_load_best_model_at_end_restores_the_best_checkpoints_student_and_modules(tmp_path):
    """The metric peaks at step 2 of 4: the final student (and the folder ``save_model`` writes) has exactly the
    weights of checkpoint-2's student, not the last step's, and the projector of the text head (the distillation
    modules) is checkpoint-2's too."""
    out = tmp_path / "run"
    model = _model()
    trainer = _distiller(_best_args(out, max_steps=4), model, scores=[0.2, 0.9, 0.5, 0.1])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    best, last = _state(out / "checkpoint-2"), _state(out / "checkpoint-4")
    assert not _same(best, last), "the steps must change the student for the comparison to mean anything"
    assert _same(model.student.state_dict(), best)
    modules = load_file(str(out / "checkpoint-2" / DISTILLATION_MODULES_NAME))
    assert modules and not _same(modules, load_file(str(out / "checkpoint-4" / DISTILLATION_MODULES_NAME)))
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in modules.items())
    trainer.save_model(str(tmp_path / "final"))
    assert _same(_state(tmp_path / "final"), best)


def test_teacher_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    """``TeacherTrainer`` keeps ``Trainer._load_best_model``, which loads ``model.safetensors`` into the model by
    its on-disk key names: with the benchmarks' teacher (UperNet on EfficientNet-Lite0, teacher.yaml's
    ``load_best_model_at_end``) those are the model's own, and the final teacher is checkpoint-2's."""
    from c2vkd_hf.models import build_teacher

    torch.manual_seed(0)
    model = build_teacher(arch="upernet", backbone="tf_efficientnet_lite0", id2label=ID2LABEL)
    out = tmp_path / "teacher"
    trainer = TeacherTrainer(model=model, args=_best_args(out, max_steps=3, learning_rate=1e-2),
                             train_dataset=tensor_dataset(16, seed=1), eval_dataset=tensor_dataset(4, seed=9),
                             data_collator=collate, compute_metrics=_scripted_metric([0.2, 0.9, 0.5]))
    assert "_load_best_model" not in vars(TeacherTrainer) and "_load_from_checkpoint" not in vars(TeacherTrainer)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    on_disk = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert set(on_disk) == set(model.state_dict()), "Trainer's own loading needs the on-disk names to be the model's"
    best, last = _state(out / "checkpoint-2"), _state(out / "checkpoint-3")
    assert not _same(best, last)
    assert _same(model.state_dict(), best)


def test_resume_loads_the_checkpoint_first_and_trains_no_step_past_max_steps(tmp_path, monkeypatch):
    """Resumed from the final checkpoint of a run whose ``max_steps`` (3) does not end an epoch (4 steps):
    ``_load_from_checkpoint`` restores student and modules before ``_run_epoch``, which then trains no step."""
    out = tmp_path / "run"
    _distiller(_args(out), _model()).train()
    final = out / "checkpoint-3"
    events: list = []
    model = _model(seed=5)  # another init: everything must come from the checkpoint
    trainer = _distiller(_args(out), model)
    monkeypatch.setattr(trainer, "_load_from_checkpoint", _spy(
        events, trainer, "_load_from_checkpoint", lambda folder, model=None: ("_load_from_checkpoint", str(folder))))
    monkeypatch.setattr(trainer, "_run_epoch", _spy(events, trainer, "_run_epoch", lambda *a, **k: ("_run_epoch",)))
    monkeypatch.setattr(trainer, "training_step", _spy(events, trainer, "training_step", lambda *a, **k: ("step",)))
    trainer.train(resume_from_checkpoint=str(final))
    assert events == [("_load_from_checkpoint", str(final)), ("_run_epoch",)]
    assert trainer.state.global_step == 3
    assert _same(model.student.state_dict(), _state(final))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in load_file(str(final / DISTILLATION_MODULES_NAME)).items())


def test_save_model_writes_no_token_and_pushes_like_trainer(tmp_path, monkeypatch):
    """``save_model`` clears ``hub_token`` while writing, restores it, and makes the push that Trainer's own
    ``save_model`` makes after a user's call (none after an internal one)."""
    for trainer in (TeacherTrainer(model=tiny_student(), args=_args(tmp_path / "t", hub_token=SECRET)),
                    _distiller(_args(tmp_path / "d", hub_token=SECRET), _model())):
        pushes: list = []
        monkeypatch.setattr(trainer, "push_to_hub", lambda *a, **k: pushes.append((a, k)))
        trainer.args.push_to_hub = True
        trainer.save_model(str(tmp_path / "ours"))
        trainer.save_model(str(tmp_path / "ours-internal"), _internal_call=True)
        assert trainer.args.hub_token == SECRET
        for folder in ("ours", "ours-internal"):
            assert SECRET not in (tmp_path / folder / "training_args.bin").read_bytes().decode("latin-1")
        monkeypatch.setattr(trainer, "_save", lambda *a, **k: None)  # Trainer's push only, nothing written
        Trainer.save_model(trainer, str(tmp_path / "theirs"))
        Trainer.save_model(trainer, str(tmp_path / "theirs"), _internal_call=True)
        assert len(pushes) == 2 and pushes[0] == pushes[1]


def test_a_failed_manifest_write_uncommits_the_checkpoint(tmp_path, monkeypatch):
    """A write failure in the ``on_save`` half of the commit (the manifest) is reported as a ``SaveError`` and
    leaves the checkpoint without its marker; the previous one stays the newest complete checkpoint."""
    out = tmp_path / "run"
    original = runs.write_manifest

    def full_at_step_2(folder):
        if str(folder).endswith("checkpoint-2"):
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, MANIFEST_NAME))
        return original(folder)

    monkeypatch.setattr(runs, "write_manifest", full_at_step_2)
    with pytest.raises(SaveError, match=r"Could not write .*checkpoint-2/checkpoint_manifest.json"):
        _distiller(_args(out), _model()).train()
    assert not (out / "checkpoint-2" / "trainer_state.json").exists()
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-1")
