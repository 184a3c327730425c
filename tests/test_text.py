"""Tests of c2vkd_hf.text: loading precomputed embeddings, open_clip computation and caching (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from c2vkd_hf import text as text_mod
from c2vkd_hf.text import (
    ENSEMBLE_TEMPLATES,
    compute_text_embeddings,
    get_text_embeddings,
    load_text_embeddings,
    resolve_templates,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAMVID_TEXT = SHARED / "data" / "clip_text" / "camvid11_from_city_ViT16_clip_text.pth"
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"]

TINY_NAME = "c2vkd-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ---------------------------------------------------------------- loading


def test_load_real_camvid_embeddings():
    if not CAMVID_TEXT.is_file():
        pytest.skip(f"staged CLIP text embeddings not found at {CAMVID_TEXT}")
    emb = load_text_embeddings(CAMVID_TEXT)
    assert emb.shape == (11, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(11), atol=1e-5)
    out = get_text_embeddings(CAMVID_CLASSES, text_embeddings=str(CAMVID_TEXT))
    assert torch.equal(out, emb)
    with pytest.raises(ValueError, match=r"11 rows .* 10 classes"):
        get_text_embeddings(CAMVID_CLASSES[:10], text_embeddings=CAMVID_TEXT)


@pytest.mark.parametrize("fmt", ["pth_tensor", "pt_dict", "safetensors", "npy"])
def test_load_formats(tmp_path, fmt):
    raw = torch.randn(3, 5) * 4
    if fmt == "pth_tensor":
        path = tmp_path / "e.pth"
        torch.save(raw, path)
    elif fmt == "pt_dict":
        path = tmp_path / "e.pt"
        torch.save({"anything": raw}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "e.safetensors"
        save_file({"weights": raw}, str(path))
    else:
        path = tmp_path / "e.npy"
        np.save(path, raw.numpy().astype(np.float64))
    emb = load_text_embeddings(path)
    assert emb.dtype == torch.float32 and emb.shape == (3, 5)
    assert torch.allclose(emb, F.normalize(raw, dim=1), atol=1e-6)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_embeddings(tmp_path / "missing.pth")
    torch.save(torch.randn(2, 3, 4), tmp_path / "rank3.pth")
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        load_text_embeddings(tmp_path / "rank3.pth")
    torch.save({"a": torch.randn(2, 3), "b": torch.randn(2, 3)}, tmp_path / "two.pth")
    with pytest.raises(ValueError, match="2 tensors"):
        load_text_embeddings(tmp_path / "two.pth")
    torch.save(torch.zeros(2, 3), tmp_path / "zero.pth")
    with pytest.raises(ValueError, match="zero"):
        load_text_embeddings(tmp_path / "zero.pth")
    (tmp_path / "e.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported"):
        load_text_embeddings(tmp_path / "e.txt")


def test_get_text_embeddings_dispatch():
    assert get_text_embeddings(["a", "b"]) is None
    t = torch.randn(2, 4)
    assert torch.allclose(get_text_embeddings(["a", "b"], text_embeddings=t).norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match=r"2 rows .* 3 classes"):
        get_text_embeddings(["a", "b", "c"], text_embeddings=t)


def test_templates():
    assert len(ENSEMBLE_TEMPLATES) == 85 and len(set(ENSEMBLE_TEMPLATES)) == 85
    assert all("{}" in t for t in ENSEMBLE_TEMPLATES)
    assert resolve_templates("ensemble") == ENSEMBLE_TEMPLATES
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert resolve_templates("a {} here.") == ("a {} here.",)
    assert resolve_templates(["x {}", "y {}"]) == ("x {}", "y {}")
    with pytest.raises(ValueError, match="containing"):
        resolve_templates("no placeholder")
    with pytest.raises(ValueError, match="empty"):
        resolve_templates([])


# ---------------------------------------------------------------- open_clip (tiny random model, offline)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("tiny_clip")
    cfg = root / f"{TINY_NAME}.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME, pretrained=None)
    ckpt = root / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return model.eval(), open_clip.get_tokenizer(TINY_NAME), str(ckpt)


def test_compute_matches_manual_ensemble(tiny_clip, tmp_path):
    model, tokenizer, ckpt = tiny_clip
    templates = ["a photo of a {}.", "a {} in the scene."]
    emb = compute_text_embeddings(["car", "road", "sky"], TINY_NAME, ckpt, templates=templates, cache_dir=tmp_path)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        per_template = [F.normalize(model.encode_text(tokenizer([t.format("road")])), dim=-1)[0] for t in templates]
    manual = F.normalize(torch.stack(per_template).mean(0), dim=0)
    assert torch.allclose(emb[1], manual, atol=1e-5)


def test_compute_caches_and_hits_cache(tiny_clip, tmp_path, monkeypatch):
    _, _, ckpt = tiny_clip
    import open_clip

    classes = ["car", "person"]
    first = compute_text_embeddings(classes, TINY_NAME, ckpt, templates="ensemble", cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the model was created although the cache should have been hit")

    monkeypatch.setattr(open_clip, "create_model", no_model)
    second = get_text_embeddings(classes, clip_model=TINY_NAME, clip_pretrained=ckpt, cache_dir=tmp_path)
    assert torch.equal(first, second)
    # a different template set or class list is a different cache entry (and needs the model)
    with pytest.raises(AssertionError, match="cache should have been hit"):
        compute_text_embeddings(classes, TINY_NAME, ckpt, templates="single", cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="cache should have been hit"):
        compute_text_embeddings(classes[::-1], TINY_NAME, ckpt, cache_dir=tmp_path)


def test_random_weights_not_cached(tiny_clip, tmp_path):
    emb = compute_text_embeddings(["a", "b"], TINY_NAME, None, templates="single", cache_dir=tmp_path)
    assert emb.shape == (2, 16)
    assert not list(tmp_path.iterdir())


def test_weights_identity_tracks_local_file(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"123")
    a = text_mod._weights_identity(str(f))
    f.write_bytes(b"12345")
    assert text_mod._weights_identity(str(f)) != a
    assert text_mod._weights_identity("openai") == "tag:openai"
    assert text_mod._weights_identity(None) is None
    assert text_mod._weights_identity(None, "hf-hub:org/model") == "hub:hf-hub:org/model"
    assert text_mod._weights_identity(None, f"local-dir:{tmp_path}").startswith("dir:")
