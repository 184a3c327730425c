"""Batch augmentations (c2vkd_hf/data/batch_augment.py). CutMix: the masks and the mix, hand-checked; the live
teacher and the student see the same mixed batch; a resumed run mixes as an uninterrupted one; the flag's checks.
Colour jitter: the formula, hand-checked; the teacher sees the clean view, the student the jittered one, or
(consistent jitter) both the same jittered view."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from c2vkd_hf.config import DataArguments, DistillationArguments
from c2vkd_hf.data.batch_augment import (apply_cutmix, batch_generator, colour_jitter, cutmix_masks, jitter_factors,
                                         jitter_normalised)
from c2vkd_hf.jobs.setup import setup_distillation
from c2vkd_hf.trainer import DistillationTrainer
from c2vkd_hf.validation import UserInputError, check_ranges
from tiny import c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher


def test_apply_cutmix_pastes_the_partners_box_into_images_and_labels():
    images = torch.stack([torch.zeros(1, 2, 3), torch.ones(1, 2, 3)])
    labels = torch.tensor([[[0, 0, 0], [0, 0, 0]], [[5, 5, 5], [5, 5, 5]]])
    masks = torch.tensor([[[False, True, True], [False, False, False]], [[False] * 3, [False] * 3]])
    partner = torch.tensor([1, 0])
    mixed = apply_cutmix(images, masks, partner)
    assert mixed[0, 0].tolist() == [[0, 1, 1], [0, 0, 0]] and mixed[1].eq(1).all()
    assert apply_cutmix(labels, masks, partner)[0].tolist() == [[0, 5, 5], [0, 0, 0]]
    assert images[0].eq(0).all(), "the input is not changed in place"
    with pytest.raises(ValueError, match="does not fit"):
        apply_cutmix(torch.zeros(2, 3, 4, 4), masks, partner)


def test_masks_are_boxes_from_another_example_drawn_with_the_given_probability():
    generator = torch.Generator().manual_seed(0)
    mixed, drawn = 0, 0
    for _ in range(100):
        masks, partner = cutmix_masks(4, 12, 16, 0.5, generator)
        assert masks.shape == (4, 12, 16) and masks.dtype == torch.bool
        assert (partner != torch.arange(4)).all() and sorted(partner.tolist()) == [0, 1, 2, 3]
        for mask in masks:
            rows, cols = mask.any(1), mask.any(0)
            assert torch.equal(mask, rows[:, None] & cols[None, :]), "a mask is one axis-aligned box"
            if mask.any():  # contiguous rows and columns
                r, c = rows.nonzero().flatten(), cols.nonzero().flatten()
                assert r[-1] - r[0] + 1 == len(r) and c[-1] - c[0] + 1 == len(c)
        mixed += int(masks.flatten(1).any(1).sum())
        drawn += 4
    assert 0.4 < mixed / drawn < 0.6
    assert not cutmix_masks(4, 12, 16, 0.0, generator)[0].any()
    assert cutmix_masks(1, 12, 16, 1.0, generator)[1].tolist() == [0]  # a batch of one mixes with itself
    with pytest.raises(ValueError, match="probability"):
        cutmix_masks(4, 12, 16, 1.5, generator)


def test_batch_generator_depends_only_on_kind_seed_step_rank_and_micro_batch():
    draw = lambda *key: torch.rand(3, generator=batch_generator(*key))  # noqa: E731
    assert torch.equal(draw("cutmix", 0, 5, 0, 0), draw("cutmix", 0, 5, 0, 0))
    for other in (("jitter", 0, 5, 0, 0), ("cutmix", 1, 5, 0, 0), ("cutmix", 0, 6, 0, 0), ("cutmix", 0, 5, 1, 0),
                  ("cutmix", 0, 5, 0, 1)):
        assert not torch.equal(draw("cutmix", 0, 5, 0, 0), draw(*other))


def _one_step_seen(tmp_path, data, **augment):
    """Trains one step on ``data`` (one batch) with ``augment``; returns what the teacher and the student were
    given as pixel values and the labels the loss got."""
    teacher = tiny_teacher()
    model = c2vkd_model(tiny_student(), teacher)
    seen = {"teacher": [], "student": [], "labels": []}

    def capture(store):
        return lambda mod, args, kwargs: store.append(kwargs.get("pixel_values", args[0] if args else None).clone())

    teacher.register_forward_pre_hook(capture(seen["teacher"]), with_kwargs=True)
    model.student.register_forward_pre_hook(capture(seen["student"]), with_kwargs=True)
    model.distill_loss.register_forward_pre_hook(lambda mod, args: seen["labels"].append(args[2].clone()))
    make_trainer(str(tmp_path), model, teacher, data, per_device_train_batch_size=len(data), max_steps=1,
                 **augment).train()
    return seen["teacher"][0], seen["student"][0], seen["labels"][0]


def test_the_live_teacher_the_student_and_the_loss_see_one_mixed_batch(tmp_path):
    data = tensor_dataset(4, seed=2)
    seen_by_teacher, images, labels = _one_step_seen(tmp_path, data, cutmix_prob=1.0)
    torch.testing.assert_close(seen_by_teacher, images, rtol=0, atol=0)
    originals = torch.stack([d["pixel_values"] for d in data])
    pasted = 0
    is_box = lambda m: torch.equal(m, m.any(1)[:, None] & m.any(0)[None, :])  # noqa: E731
    for image, label in zip(images, labels):
        same = (image[None] == originals).all(1)  # (4, H, W): where this image equals each original
        involved = [j for j in range(4) if same[j].any()]
        assert same[involved].any(0).all(), "every pixel comes from an example of the batch"
        assert len(involved) <= 2, "one box from one other example"
        if len(involved) == 2:
            pasted += 1
            a, b = involved
            assert not (same[a] & same[b]).any()
            assert is_box(same[a]) or is_box(same[b]), "the pasted region is a box"
        for j in involved:  # the labels follow the pixels
            assert torch.equal(label[same[j]], data[j]["labels"][same[j]])
    assert pasted >= 2, "with probability 1 most examples get a box"


def test_a_resumed_run_draws_the_same_boxes(tmp_path):
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.randint(0, 3, (4, 16, 16))}
    draws = []
    for _ in range(2):  # two trainers standing for an uninterrupted and a resumed run, at the same step
        teacher = tiny_teacher()
        trainer = make_trainer(str(tmp_path), c2vkd_model(tiny_student(), teacher), teacher, tensor_dataset(4),
                               cutmix_prob=1.0)
        trainer.state.global_step = 7
        draws.append([trainer._cutmix(batch, trainer._batch_key())["labels"] for _ in range(2)])  # 2 micro-batches
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1]), "micro-batches of one step mix differently"


def test_cutmix_flag_is_range_checked_and_refused_with_a_teacher_cache(tmp_path):
    with pytest.raises(UserInputError, match="--cutmix_prob must be a probability"):
        check_ranges({"cutmix_prob": 1.5})
    with pytest.raises(UserInputError, match="--cutmix_prob needs the live teacher"):
        setup_distillation(DistillationArguments(method="kd", teacher_cache=str(tmp_path / "cache")),
                           DataArguments(cutmix_prob=0.5), TrainingArguments(output_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="live teacher"):
        DistillationTrainer(None, teacher_cache=object(), cutmix_prob=0.5)


def test_colour_jitter_follows_its_formula():
    image = torch.tensor([[0.2, 0.6], [0.4, 0.8]]).expand(3, 2, 2).clone()
    image[0] *= 0.5  # a coloured image: R differs from G and B
    batch = image[None]
    torch.testing.assert_close(colour_jitter(batch, torch.ones(1, 3)), batch)
    torch.testing.assert_close(colour_jitter(batch, torch.tensor([[0.5, 1.0, 1.0]])), batch * 0.5)  # brightness
    flat = colour_jitter(batch, torch.tensor([[1.0, 0.0, 1.0]]))  # contrast 0: every pixel at the mean luma
    grey_mean = (batch * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).mean()
    torch.testing.assert_close(flat, torch.full_like(batch, float(grey_mean)))
    grey = colour_jitter(batch, torch.tensor([[1.0, 1.0, 0.0]]))  # saturation 0: the luma in every channel
    torch.testing.assert_close(grey[:, 0], grey[:, 1]) and torch.testing.assert_close(grey[:, 1], grey[:, 2])
    assert colour_jitter(batch, torch.tensor([[3.0, 1.0, 1.0]])).max() == 1.0  # clipped to [0, 1]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(jitter_normalised(normalised, torch.ones(1, 3), mean, std), normalised)
    factors = jitter_factors(1000, 0.3, torch.Generator().manual_seed(0))
    assert factors.min() >= 0.7 and factors.max() <= 1.3 and abs(float(factors.mean()) - 1.0) < 0.02
    with pytest.raises(ValueError, match="strength"):
        jitter_factors(2, 1.0, torch.Generator())


def test_the_teacher_sees_the_clean_view_and_the_student_the_jittered_one(tmp_path):
    data = tensor_dataset(4, seed=3)
    for item in data:  # images in [0, 1] (the tiny trainer's batch is not normalised)
        item["pixel_values"] = item["pixel_values"].sigmoid()
    clean, jittered, labels = _one_step_seen(tmp_path, data, student_jitter=0.4)
    originals = torch.stack([d["pixel_values"] for d in data])
    order = [int((originals == image).flatten(1).all(1).nonzero()) for image in clean]  # the teacher's view is clean
    factors = jitter_factors(4, 0.4, batch_generator("jitter", 0, 0, 0, 0))
    torch.testing.assert_close(jittered, colour_jitter(clean, factors))
    assert not torch.allclose(jittered, clean)
    assert torch.equal(labels, torch.stack([data[i]["labels"] for i in order])), "labels are not jittered"
    with pytest.raises(UserInputError, match="--student_jitter must be a strength"):
        check_ranges({"student_jitter": 1.0})


def test_with_consistent_jitter_the_teacher_sees_the_students_jittered_view(tmp_path):
    data = tensor_dataset(4, seed=3)
    for item in data:
        item["pixel_values"] = item["pixel_values"].sigmoid()
    seen_by_teacher, seen_by_student, _ = _one_step_seen(tmp_path, data, student_jitter=0.4, consistent_jitter=True)
    torch.testing.assert_close(seen_by_teacher, seen_by_student, rtol=0, atol=0)
    originals = torch.stack([d["pixel_values"] for d in data])
    clean = torch.stack([originals[int((originals == image).flatten(1).all(1).nonzero())]
                         for image in _one_step_seen(tmp_path / "clean", data, student_jitter=0.4)[0]])
    factors = jitter_factors(4, 0.4, batch_generator("jitter", 0, 0, 0, 0))
    torch.testing.assert_close(seen_by_student, colour_jitter(clean, factors))  # the same draws as student-only jitter


def test_consistent_jitter_needs_jitter_and_the_live_teacher(tmp_path):
    out = TrainingArguments(output_dir=str(tmp_path / "out"))
    with pytest.raises(UserInputError, match="--consistent_jitter"):
        setup_distillation(DistillationArguments(method="kd", teacher_cache=str(tmp_path / "cache")),
                           DataArguments(student_jitter=0.4, consistent_jitter=True), out)
    with pytest.raises(UserInputError, match="--consistent_jitter"):
        setup_distillation(DistillationArguments(method="kd"), DataArguments(consistent_jitter=True), out)
    with pytest.raises(ValueError, match="consistent_jitter"):
        DistillationTrainer(None, teacher_cache=object(), student_jitter=0.4, consistent_jitter=True)
