"""DistillationTrainer on tiny models: gradient accumulation, resume, saving, evaluation, logging."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForSemanticSegmentation, TrainerCallback

from c2vkd_hf.losses import get_loss
from c2vkd_hf.models import parse_feature_pairs
from c2vkd_hf.trainer import DISTILLATION_MODULES_NAME, NonFiniteLossError
from tiny import c2vkd_loss, make_loss, c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=lambda m: f"{key}: {m}")


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Batch 8 once == batch 2 x 4 accumulation steps (SGD, no BatchNorm, no ignore pixels)."""
    data = tensor_dataset(8)
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        teacher = tiny_teacher()
        model = c2vkd_model(tiny_student(batch_norm=False), teacher)
        start = _params(model)
        trainer = make_trainer(str(tmp_path / f"b{batch}"), model, teacher, data, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                               learning_rate=0.1, lr_scheduler_type="constant")
        trainer.train()
        results.append(_params(model))
    moved = max((results[0][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4, "the step must change the weights for the comparison to mean anything"
    _assert_same(results[0], results[1], atol=1e-5)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_restores_student_projectors_optimizer_and_rng(tmp_path):
    data = tensor_dataset(16, seed=1)
    common = dict(per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=2,
                  learning_rate=3e-3)

    teacher = tiny_teacher()
    full = c2vkd_model(tiny_student(), teacher)
    make_trainer(str(tmp_path / "full"), full, teacher, data, **common).train()

    teacher = tiny_teacher()
    part = c2vkd_model(tiny_student(), teacher)
    trainer = make_trainer(str(tmp_path / "part"), part, teacher, data, **common)
    trainer.add_callback(_StopAt(2))
    trainer.train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / DISTILLATION_MODULES_NAME).is_file()
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()

    teacher = tiny_teacher()
    resumed = c2vkd_model(tiny_student(seed=5), teacher, seed=5)  # different init: everything must come from disk
    make_trainer(str(tmp_path / "part"), resumed, teacher, data, **common).train(resume_from_checkpoint=str(checkpoint))
    _assert_same(_params(full), _params(resumed), atol=1e-5)


def test_saved_folder_is_a_plain_student_and_eval_skips_teacher(tmp_path):
    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(), teacher)
    trainer = make_trainer(str(tmp_path), model, teacher, tensor_dataset(8), eval_dataset=tensor_dataset(4, seed=9))
    trainer.train()
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    metrics = trainer.evaluate()
    handle.remove()
    assert not calls, "evaluation must not run the teacher"
    assert 0.0 <= metrics["eval_mean_iou"] <= 1.0
    out = tmp_path / "student"
    trainer.save_model(str(out))
    assert not (out / DISTILLATION_MODULES_NAME).exists()
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(str(out)).eval()
    assert reloaded.config.id2label == model.student.config.id2label
    x = torch.randn(1, 3, 32, 32)
    model.student.eval()
    torch.testing.assert_close(reloaded(pixel_values=x).logits, model.student(pixel_values=x).logits)


def test_every_loss_term_is_logged_and_teacher_untouched(tmp_path):
    teacher = tiny_teacher()
    before = _params(teacher)
    model = c2vkd_model(tiny_student(), teacher)
    projectors_before = _params(model.distill_loss)
    trainer = make_trainer(str(tmp_path), model, teacher, tensor_dataset(8))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged
    for term in ("ce", "pdd", "glob", "rel", "ling"):
        assert f"loss/{term}" in logged[0], logged[0]
        assert f"loss_weighted/{term}" in logged[0]
    _assert_same(before, _params(teacher), atol=0)
    assert all(p.grad is None for p in teacher.parameters())
    # projectors are trained, the text embeddings are not
    after = _params(model.distill_loss)
    changed = [k for k in projectors_before if not torch.equal(projectors_before[k], after[k])]
    assert changed and all("text" not in k for k in changed), changed


def test_non_finite_loss_stops_with_the_term_name(tmp_path):
    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(), teacher)
    data = tensor_dataset(8)
    data[0]["pixel_values"][:] = float("nan")
    trainer = make_trainer(str(tmp_path), model, teacher, data)
    with pytest.raises(NonFiniteLossError, match="Loss term '.*' became nan at step 0"):
        trainer.train()


def test_parse_feature_pairs():
    assert parse_feature_pairs("stage4:stage4, stage3:stage2") == [("stage4", "stage4"), ("stage3", "stage2")]
    assert parse_feature_pairs(None) == []
    with pytest.raises(ValueError, match="student_name:teacher_name"):
        parse_feature_pairs("stage4")


def test_final_save_keeps_the_text_head_beside_the_plain_student(tmp_path):
    from safetensors import safe_open

    from c2vkd_hf.losses.vlfd import pixel_text_logits
    from c2vkd_hf.models import forward_features
    from c2vkd_hf.text_head import TEXT_HEAD_NAME

    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(), teacher)
    trainer = make_trainer(str(tmp_path), model, teacher, tensor_dataset(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    with safe_open(str(tmp_path / "out" / TEXT_HEAD_NAME), "pt") as head:
        meta = head.metadata()
        weight, bias, text = (head.get_tensor(k) for k in ("projector.weight", "projector.bias", "text_embeddings"))
    assert meta["feature"] == "stage4" and float(meta["tau"]) == model.distill_loss.ling_tau
    student = AutoModelForSemanticSegmentation.from_pretrained(str(tmp_path / "out")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, feats = forward_features(student, x)
        u = torch.nn.functional.conv2d(feats["stage4"], weight[..., None, None] if weight.dim() == 2 else weight, bias)
        expected = model.distill_loss.eval().pixel_text_logits(feats["stage4"])
    torch.testing.assert_close(pixel_text_logits(u, text, tau=float(meta["tau"])), expected)


def test_teacher_training_evaluates_on_full_resolution_labels(tmp_path):
    """train_teacher with images resized below the label size: validation labels stay at full
    resolution (the default), so the loss must upsample the logits (UperNet's own loss cannot)."""
    from transformers import TrainingArguments

    from c2vkd_hf.config import DataArguments
    from c2vkd_hf.data import load_segmentation_data
    from c2vkd_hf.jobs import train_teacher

    data_args = DataArguments(synthetic_train_size=4, synthetic_validation_size=2, synthetic_height=32,
                              synthetic_width=48, resize_height=16, resize_width=24)
    args = TrainingArguments(output_dir=str(tmp_path / "teacher"), max_steps=2, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             report_to="none", disable_tqdm=True, use_cpu=True)
    results = train_teacher(load_segmentation_data(data_args), data_args, args)
    assert results["steps"] == 2 and 0.0 <= results["val_mean_iou"] <= 1.0
    assert AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "teacher").config.num_labels == 6


def test_folded_text_head_classifier_predicts_like_the_text_query():
    """TextHead.fold_into: the student's own logits then have the per-pixel argmax of the text query
    with the training names (exactly), and the student stays a plain SegFormer; a head on another
    feature than the classifier's input cannot be the classifier."""
    from c2vkd_hf.models import classifier_module, feature_channels, forward_features
    from c2vkd_hf.text_head import TextHead
    from c2vkd_hf.trainer import DistillationModel, text_head_fold_problem

    student = tiny_student(4).eval()
    channels = feature_channels(student)["decoder"]
    text = torch.nn.functional.normalize(torch.randn(student.config.num_labels, 12), dim=1)
    head = TextHead.create(channels, text, "decoder", 0.03)
    torch.nn.init.normal_(head.projector.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before, feats = forward_features(student, x)
        query = head(feats["decoder"])
        assert not torch.equal(before.argmax(1), query.argmax(1))
        head.fold_into(classifier_module(student))
        after = student(pixel_values=x).logits
    assert torch.equal(after.argmax(1), query.argmax(1))

    stage4 = TextHead.create(32, text, "stage4", 0.03)
    assert "decoder" in text_head_fold_problem(tiny_student(), stage4)
    with pytest.raises(ValueError, match="decoder"):
        DistillationModel(tiny_student(), get_loss("none"), text_head=stage4)


@pytest.mark.parametrize("method", ["none", "dist", "c2vkd"])
def test_text_head_is_the_classifier_for_every_method(method):
    """DistillationModel(text_head=...): for any method its logits are the head's pixel-text logits in
    training and evaluation, every term's gradient reaches the projector and none the frozen own
    classifier (C2VKD's linguistic term shares the head's projector); after FoldTextHeadCallback the
    plain student predicts like the head."""
    from c2vkd_hf.models import classifier_module, feature_channels, forward_features
    from c2vkd_hf.text_head import TextHead
    from c2vkd_hf.trainer import DistillationModel, FoldTextHeadCallback

    student = tiny_student(4)
    classifier = classifier_module(student)
    channels = feature_channels(student)["decoder"]
    text = torch.nn.functional.normalize(torch.randn(student.config.num_labels, 12), dim=1)
    head = TextHead.create(channels, text, "decoder", 0.03)
    if method == "c2vkd":
        loss = c2vkd_loss(student_channels=[channels], teacher_channels=[channels], text_embeddings=text,
                        ling_projector=head.projector)
        assert loss.ling_projector is head.projector
        model = DistillationModel(student, loss, ["decoder"], text_head=head)
    else:
        model = DistillationModel(student, make_loss(method), text_head=head)
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, student.config.num_labels, (2, 32, 32))
    own_logits, feats = forward_features(student, x)
    out = model(x, labels=labels, teacher_logits=torch.randn_like(own_logits),
                teacher_features=[torch.randn_like(feats["decoder"])], return_terms=True)
    torch.testing.assert_close(out["logits"], head(feats["decoder"]))
    out["loss"].backward()
    assert classifier.weight.grad is None and not classifier.weight.requires_grad
    assert head.projector.weight.grad.abs().sum() > 0
    with torch.no_grad():
        evaluated = model(x, labels=labels).logits
    torch.testing.assert_close(evaluated, head(feats["decoder"]).detach())

    FoldTextHeadCallback().on_train_end(None, None, None, model=model)
    assert not model.text_head_logits and classifier.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(student(pixel_values=x).logits.argmax(1), evaluated.argmax(1))
        assert torch.equal(model(x).logits, student(pixel_values=x).logits)  # the folded classifier now
