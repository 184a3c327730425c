#!/usr/bin/env python
"""Rebuild the built-in CLIP vocabulary (``c2vkd_hf/vocab/*.safetensors``) from the staged embeddings.

    python scripts/build_vocabulary.py --clip_text ../shared/data/clip_text

Reads ``<key>_ViT16_clip_text.pth`` (float32 ``(K, 512)``, OpenAI CLIP ViT-B/16, 85 prompt templates)
for each vocabulary of :data:`CLASS_NAMES`, checks that rows of the same class name agree across
vocabularies (the row order is the one thing a file cannot tell), and writes one float16 safetensors
file per vocabulary with its class names, title and recipe in the metadata.

The Pascal-Context file lists the 20 VOC classes first (in VOC's order), then the other 39: not the
alphabetical order of the usual class list. That order was established here, row by row, from the
rows it shares exactly (cosine 1.000) with the Cityscapes, VOC and ADE20K files, and checked on the
rest by nearest neighbours. The staged ``coco_stuff27`` file is not shipped: none of its 27 rows
equals the row of its documented class name in any other vocabulary (e.g. 'person', 'sky', 'wall'),
so its row order is unknown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB_DIR = Path(__file__).resolve().parents[1] / "c2vkd_hf" / "vocab"

#: Vocabulary key -> (title, class names in row order).
CLASS_NAMES = {
    "city": ("Cityscapes (19 classes)", [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]),
    "ade": ("ADE20K (150 classes)", [
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
        "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
        "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
        "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
        "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
        "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
        "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
        "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
        "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
        "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
        "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
        "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
        "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
        "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
        "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
        "glass", "clock", "flag"]),
    "context": ("Pascal-Context (59 classes)", [
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
        "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor", "bag", "bed",
        "bench", "book", "building", "cabinet", "ceiling", "cloth", "computer", "cup", "curtain", "door", "fence",
        "floor", "flower", "food", "grass", "ground", "keyboard", "light", "mountain", "mouse", "plate",
        "platform", "rock", "road", "shelves", "sidewalk", "sign", "sky", "snow", "bedclothes", "track", "tree",
        "truck", "wall", "water", "window", "wood"]),
    "voc": ("PASCAL VOC (20 classes, no background)", [
        "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
        "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]),
}

RECIPE = ("OpenAI CLIP ViT-B/16 text encoder (Radford et al., ICML 2021); each class name in 85 prompt templates "
          "(CLIP's 80 ImageNet templates plus MaskCLIP's 5 scene templates, Zhou et al., ECCV 2022), each "
          "template embedding L2-normalised, averaged, normalised again; stored as float16")


def load_staged(clip_text: Path) -> dict[str, torch.Tensor]:
    """The staged float32 tensors, one per vocabulary, checked against the class-name counts."""
    tensors = {}
    for key, (_, names) in CLASS_NAMES.items():
        emb = torch.load(clip_text / f"{key}_ViT16_clip_text.pth", map_location="cpu", weights_only=True).float()
        if tuple(emb.shape) != (len(names), 512):
            raise SystemExit(f"{key}: expected ({len(names)}, 512), got {tuple(emb.shape)}")
        tensors[key] = torch.nn.functional.normalize(emb, dim=1)
    return tensors


def check_shared_rows(tensors: dict[str, torch.Tensor], min_cosine: float = 0.999) -> int:
    """Every class name found in two vocabularies must have (nearly) the same row in both; returns
    how many such pairs were checked."""
    checked = 0
    for a, b in itertools.combinations(CLASS_NAMES, 2):
        names_a, names_b = CLASS_NAMES[a][1], CLASS_NAMES[b][1]
        for name in set(names_a) & set(names_b):
            cosine = float(tensors[a][names_a.index(name)] @ tensors[b][names_b.index(name)])
            if cosine < min_cosine:
                raise SystemExit(f"'{name}' differs between {a} and {b} (cosine {cosine:.4f}): wrong row order")
            checked += 1
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip_text", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "clip_text", help="Folder of the staged *_ViT16_clip_text.pth files.")
    parser.add_argument("--output_dir", type=Path, default=VOCAB_DIR)
    args = parser.parse_args(argv)
    tensors = load_staged(args.clip_text)
    print(f"{check_shared_rows(tensors)} class names shared between vocabularies have equal rows")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for key, (title, names) in CLASS_NAMES.items():
        metadata = {"title": title, "class_names": json.dumps(names), "model": "OpenAI CLIP ViT-B/16",
                    "recipe": RECIPE, "source": f"{key}_ViT16_clip_text.pth"}
        path = args.output_dir / f"{key}.safetensors"
        save_file({"text_embeddings": tensors[key].half().contiguous()}, str(path), metadata=metadata)
        print(f"wrote {path} ({len(names)} classes, {path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
