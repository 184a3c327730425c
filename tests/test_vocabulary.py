"""The built-in CLIP vocabulary (c2vkd_hf/vocab, c2vkd_hf/vocabulary.py) and how distillation uses it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from c2vkd_hf.config import DistillationArguments
from c2vkd_hf.data import SYNTHETIC_CLASSES
from c2vkd_hf.jobs import distillation_text_embeddings
from c2vkd_hf.text import get_text_embeddings, resolve_text_embeddings
from c2vkd_hf.vocabulary import VOCABULARIES, closest_vocabulary, load_vocabulary, match_vocabulary, name_key

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]


def _row(vocabulary: str, *names: str) -> torch.Tensor:
    """The L2-normalised mean of the named rows of a built-in vocabulary."""
    table_names, table = load_vocabulary(vocabulary)
    return F.normalize(table[[table_names.index(n) for n in names]].mean(0), dim=0)


def test_package_data_holds_every_vocabulary():
    sizes = {key: len(load_vocabulary(key)[0]) for key in VOCABULARIES}
    assert sizes == {"city": 19, "ade": 150, "context": 59, "voc": 20}
    for key in VOCABULARIES:
        names, emb = load_vocabulary(key)
        assert emb.shape == (len(names), 512) and emb.dtype == torch.float32
        assert torch.allclose(emb.norm(dim=1), torch.ones(len(names)), atol=1e-5)
    assert (Path(__file__).resolve().parents[1] / "c2vkd_hf" / "vocab" / "README.md").is_file()


def test_camvid_classes_resolve_with_synonyms():
    match = match_vocabulary(CAMVID_CLASSES)
    assert match.vocabulary == "city" and match.synonyms == 5
    mapping = match.mapping()
    assert mapping["Tree"] == "vegetation" and mapping["Pavement"] == "sidewalk" and mapping["Pedestrian"] == "person"
    assert mapping["SignSymbol"] == "mean(traffic sign, traffic light)" and mapping["Bicyclist"] == "mean(rider, bicycle)"
    emb = match.embeddings()
    torch.testing.assert_close(emb[5], _row("city", "vegetation"))
    torch.testing.assert_close(emb[10], _row("city", "rider", "bicycle"))
    assert "Tree=vegetation" in match.describe() and "'city'" in match.describe()


def test_synthetic_classes_resolve_directly():
    match = match_vocabulary(SYNTHETIC_CLASSES)
    assert match.synonyms == 0 and match.vocabulary == "ade"  # names all six without a synonym
    assert list(match.mapping().values()) == list(SYNTHETIC_CLASSES)


def test_names_are_normalised():
    assert name_key("Traffic_Light") == name_key("traffic light") == name_key("TRAFFIC-LIGHT")
    match = match_vocabulary(["Traffic_Light", "SKY", "side walk", "Motor-Cycle"])
    assert match.vocabulary == "city" and match.synonyms == 0
    assert match.mapping() == {"Traffic_Light": "traffic light", "SKY": "sky", "side walk": "sidewalk",
                               "Motor-Cycle": "motorcycle"}


def test_a_name_that_matches_nothing():
    assert match_vocabulary(["sky", "road", "unicorn"]) is None  # every name, unless partial
    assert closest_vocabulary(["sky", "road", "unicorn"]) == ("city", ["unicorn"])
    assert resolve_text_embeddings(["unicorn", "zorblax"]) is None  # no name at all: nothing to resolve


def test_names_resolve_across_vocabularies_and_unmatched_ones_are_marked():
    """MSRC-21-like names: the primary vocabulary names the most classes; a name it lacks comes from another built-in
    vocabulary (same CLIP model and prompts); a name none has is unmatched, its row the normalised mean of the
    matched rows, and the source line says how it is treated."""
    names = ["sky", "grass", "flower", "face"]
    match = match_vocabulary(names, partial=True)
    assert match.matched == (True, True, True, False) and match.unmatched == ("face",)
    emb = match.embeddings()
    for i in range(3):
        torch.testing.assert_close(emb[i], _row(match.source_of(i), *match.matches[i]))
    torch.testing.assert_close(emb[3], F.normalize(emb[:3].mean(0), dim=0))
    assert "face=unmatched" in match.describe() and "left out of the linguistic term" in match.describe()
    stanford = match_vocabulary(["sky", "tree", "road", "grass", "water", "building", "mountain", "foreground object"],
                                partial=True)
    assert stanford.unmatched == ("foreground object",) and stanford.vocabulary == "ade"
    msrc = match_vocabulary(["building", "airplane", "sign", "book", "face"], partial=True)
    assert msrc.unmatched == ("face",) and len({msrc.source_of(i) for i in range(4)}) >= 1
    resolved = resolve_text_embeddings(["sky", "unicorn"])
    assert resolved.matched == (True, False) and resolved.embeddings.shape == (2, 512)
    assert resolve_text_embeddings(["sky", "road"]).matched is None  # every name matched


def test_explicit_embeddings_win_and_get_text_embeddings_keeps_its_default(tmp_path):
    assert get_text_embeddings(["sky", "road"]) is None  # the built-in vocabulary only when asked for
    torch.testing.assert_close(get_text_embeddings(["sky", "road"], builtin=True),
                               torch.stack([_row("city", "sky"), _row("city", "road")]))
    path = tmp_path / "emb.pth"
    torch.save(torch.randn(2, 8), path)
    resolved = resolve_text_embeddings(["sky", "road"], text_embeddings=path)
    assert resolved.kind == "file" and resolved.source == str(path) and resolved.embeddings.shape == (2, 8)
    builtin = resolve_text_embeddings(["sky", "road"])
    assert builtin.kind == "builtin" and builtin.source.startswith("built-in CLIP ViT-B/16 vocabulary 'city'")


def test_distillation_logs_the_match_or_the_fallback(tmp_path, caplog):
    args = DistillationArguments()
    notes: list[str] = []
    with caplog.at_level(logging.INFO, logger="c2vkd_hf.jobs.setup"):
        emb, source, matched = distillation_text_embeddings(args, dict(enumerate(CAMVID_CLASSES)), tmp_path, notes)
    assert emb.shape == (11, 512) and "Bicyclist=mean(rider, bicycle)" in source and not notes and matched is None
    assert source in caplog.text
    emb, source, matched = distillation_text_embeddings(args, {0: "sky", 1: "unicorn"}, tmp_path, notes)
    assert matched == (True, False) and "unicorn=unmatched" in source and "unicorn" in notes[-1]
    caplog.clear()
    notes.clear()
    with caplog.at_level(logging.WARNING, logger="c2vkd_hf.jobs.setup"):
        emb, source, matched = distillation_text_embeddings(args, {0: "zorblax", 1: "unicorn"}, tmp_path, notes)
    assert emb is None and source is None and "linguistic term is OFF" in caplog.text and "unicorn" in caplog.text
    assert any("linguistic" in n for n in notes)
    assert distillation_text_embeddings(DistillationArguments(method="kd"), {0: "sky"}, tmp_path, []) == (
        None, None, None)


def test_builtin_rows_equal_the_staged_files(shared_dir):
    """The float16 package data equals the staged float32 files, and CamVid's match equals the staged
    camvid11_from_city file (built from the Cityscapes rows by the same mapping)."""
    clip_text = shared_dir / "data" / "clip_text"
    for key in VOCABULARIES:
        staged = F.normalize(torch.load(clip_text / f"{key}_ViT16_clip_text.pth", map_location="cpu",
                                        weights_only=True).float(), dim=1)
        torch.testing.assert_close(load_vocabulary(key)[1], staged, atol=2e-3, rtol=0)
    camvid = torch.load(clip_text / "camvid11_from_city_ViT16_clip_text.pth", map_location="cpu", weights_only=True)
    emb = match_vocabulary(CAMVID_CLASSES).embeddings()
    torch.testing.assert_close(emb, F.normalize(camvid.float(), dim=1), atol=2e-3, rtol=0)
    assert float((emb * F.normalize(camvid.float(), dim=1)).sum(1).min()) > 0.9999
