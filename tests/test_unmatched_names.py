"""Class names without a text embedding: the linguistic term on the matched classes only, learned text-head rows,
and a distillation run that keeps both for a dataset with one unmatched name."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from c2vkd_hf.losses.vlfd import vlfd_linguistic_loss_from_scores
from c2vkd_hf.text_head import TextHead, load_text_head, save_text_head


def _inputs(seed=0, k=3, d=6):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, k, 4, 4, generator=g)
    teacher = torch.randn(2, k, 4, 4, generator=g)
    labels = torch.randint(0, k, (2, 4, 4), generator=g)
    labels[0, 0, :2] = 255
    emb = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return scores, teacher, labels, emb


def test_linguistic_term_on_matched_classes_is_the_term_of_the_smaller_problem():
    """With class 2 unmatched: its column and row leave, the label-corrected target is renormalised over classes 0
    and 1, and the positions labelled 2 leave the mean. Written out by hand for g = 0.5."""
    scores, teacher, labels, emb = _inputs()
    mask = torch.tensor([True, True, False])
    got = vlfd_linguistic_loss_from_scores(scores, teacher, labels, emb, tau=0.5, label_weight=0.5, classes=mask)
    r = torch.softmax(teacher, dim=1)
    valid = labels != 255
    onehot = F.one_hot(torch.where(valid, labels, 0), 3).permute(0, 3, 1, 2).float()
    r = torch.where(valid[:, None], 0.5 * r + 0.5 * onehot, r)[:, :2]
    r = r / r.sum(1, keepdim=True)
    s = scores[:, :2]
    kl = (r * (r.log() - F.log_softmax(s, 1))).sum(1)
    re = torch.einsum("bkhw,kd->bdhw", r, emb[:2])
    cos = 0.5 * (r * s).sum(1) / re.norm(dim=1)
    keep = labels != 2
    expected = ((kl + 1 - cos) * keep).sum() / keep.sum()
    torch.testing.assert_close(got, expected)
    # every class marked: the plain term
    full = vlfd_linguistic_loss_from_scores(scores, teacher, labels, emb, tau=0.5, label_weight=0.5)
    torch.testing.assert_close(vlfd_linguistic_loss_from_scores(
        scores, teacher, labels, emb, tau=0.5, label_weight=0.5, classes=torch.ones(3, dtype=torch.bool)), full)
    # the unmatched column does not reach the term: changing it changes nothing
    other = scores.clone()
    other[:, 2] += 5.0
    torch.testing.assert_close(vlfd_linguistic_loss_from_scores(other, teacher, labels, emb, tau=0.5,
                                                                label_weight=0.5, classes=mask), got)


def test_class_balanced_linguistic_term_also_leaves_the_unmatched_class_out():
    scores, teacher, labels, emb = _inputs(1)
    mask = torch.tensor([True, True, False])
    got = vlfd_linguistic_loss_from_scores(scores, teacher, labels, emb, class_balance=True, classes=mask)
    other = scores.clone()
    other[:, 2] -= 3.0
    torch.testing.assert_close(vlfd_linguistic_loss_from_scores(other, teacher, labels, emb, class_balance=True,
                                                                classes=mask), got)
    assert torch.isfinite(got)


def test_learned_rows_train_save_and_fold(tmp_path):
    """A head whose class 1 has no embedding: only that row is a parameter, it gets a gradient, the saved head holds
    the learned row, and the folded classifier predicts like the head."""
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(3, 8), dim=1)
    head = TextHead.create(5, emb, "decoder", 0.1, ["a", "b", "c"], learned=[False, True, False])
    assert head.learned_rows.shape == (1, 8) and head.learned_index == [1]
    feature = torch.randn(2, 5, 4, 4)
    head(feature)[:, 1].sum().backward()
    assert head.learned_rows.grad is not None and head.learned_rows.grad.abs().sum() > 0
    with torch.no_grad():
        head.learned_rows.add_(torch.randn(1, 8))
    torch.testing.assert_close(head.class_embeddings()[[0, 2]], emb[[0, 2]])
    save_text_head(head, str(tmp_path))
    loaded = load_text_head(tmp_path)
    torch.testing.assert_close(loaded.text_embeddings, head.class_embeddings().detach())
    classifier = torch.nn.Conv2d(5, 3, 1)
    head.fold_into(classifier)
    assert torch.equal(classifier(feature).argmax(1), head(feature).argmax(1))


def test_distillation_with_an_unmatched_class_keeps_the_linguistic_term_and_the_head(tmp_path):
    """The synthetic street scenes with 'person' renamed to a name no vocabulary has: C2VKD still has its linguistic
    term (on the other classes) and the text head, the head's row for the renamed class is learned, and
    results.json and the card say so."""
    from c2vkd_hf.cli.distill import main
    from tiny import TINY_SEGFORMER_JSON

    from c2vkd_hf.data import SYNTHETIC_CLASSES
    import PIL.Image
    import numpy as np

    names = [("zorblax" if c == "person" else c) for c in SYNTHETIC_CLASSES]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / f"{split}annot").mkdir()
        for i in range(4):
            PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
            PIL.Image.fromarray(rng.integers(0, len(names), (32, 32), dtype=np.uint8)).save(
                tmp_path / f"{split}annot" / f"{i}.png")
    (tmp_path / "classes.json").write_text(json.dumps(names))
    teacher = tmp_path / "teacher"
    from c2vkd_hf.models import load_student
    torch.manual_seed(0)
    load_student("segformer-b0", dict(enumerate(names)), config_overrides=json.loads(TINY_SEGFORMER_JSON)).save_pretrained(teacher)
    out = tmp_path / "out"
    results = main([
        "--train_images", str(tmp_path / "train"), "--train_labels", str(tmp_path / "trainannot"),
        "--validation_images", str(tmp_path / "val"), "--validation_labels", str(tmp_path / "valannot"),
        "--labels_file", str(tmp_path / "classes.json"), "--teacher_name_or_path", str(teacher),
        "--student_config_overrides", TINY_SEGFORMER_JSON, "--output_dir", str(out), "--max_steps", "2",
        "--eval_steps", "2", "--save_strategy", "no", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
        "--exit_weight", "0"])
    assert "zorblax=unmatched" in results["text_embeddings_source"]
    assert "ling" in results["loss_weights"] and results["text_head"]
    head = load_text_head(out)
    with open(out / "text_head.safetensors", "rb"):
        pass
    from safetensors import safe_open
    with safe_open(str(out / "text_head.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["learned_rows"]) == [names.index("zorblax")]
    assert head.text_embeddings.shape[0] == len(names)
    assert "zorblax" in (out / "README.md").read_text()
