"""The built-in CLIP vocabulary: class-name embeddings for datasets with common class names.

C2VKD's linguistic term needs CLIP text embeddings of the dataset's class names. Without
``--text_embeddings`` or ``--clip_model``, :func:`match_vocabulary` looks the names up in the
vocabularies shipped in ``c2vkd_hf/vocab/`` (OpenAI CLIP ViT-B/16, 85 prompt templates; see its
README): Cityscapes (19), ADE20K (150), Pascal-Context (59), PASCAL VOC (20).

Matching, per vocabulary: a class name matches a vocabulary name when both are equal after
lower-casing and removing everything but letters and digits (``Traffic_Light`` = ``traffic light``,
``pottedplant`` = ``potted plant``); otherwise the name is looked up in :data:`SYNONYMS`, whose
entry names one vocabulary class, or several whose rows are averaged (then L2-normalised). A
vocabulary is used only when it matches **every** class name; among those, the one that needs the
fewest synonyms wins, ties in the order of :data:`VOCABULARIES`. So CamVid's 11 classes resolve to
Cityscapes rows (Tree = vegetation, Bicyclist = mean of rider and bicycle, ...), exactly as the
staged ``camvid11_from_city_ViT16_clip_text`` file was built, and the synthetic default dataset
(sky, building, road, tree, car, person) to ADE20K rows, which name all six directly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from importlib import resources
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open

__all__ = ["VOCABULARIES", "SYNONYMS", "MODEL_NAME", "VocabularyMatch", "load_vocabulary", "match_vocabulary",
           "name_key", "closest_vocabulary"]

#: Vocabulary key -> title, in order of preference when several match equally well.
VOCABULARIES = {
    "city": "Cityscapes",
    "ade": "ADE20K",
    "context": "Pascal-Context",
    "voc": "PASCAL VOC",
}

#: The CLIP model of every built-in vocabulary.
MODEL_NAME = "CLIP ViT-B/16"

#: Class name (as :func:`name_key` writes it) -> the vocabulary names that stand for it; several
#: names are averaged. Used only when the name itself is not in a vocabulary.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "tree": ("vegetation",),
    "pavement": ("sidewalk",),
    "pedestrian": ("person",),
    "signsymbol": ("traffic sign", "traffic light"),
    "bicyclist": ("rider", "bicycle"),
    "cyclist": ("rider", "bicycle"),
    "aeroplane": ("airplane",),
    "motorbike": ("motorcycle",),
    "motorcycle": ("motorbike",),
    "vegetation": ("tree",),
}


def name_key(name: str) -> str:
    """A class name reduced for matching: lower case, letters and digits only."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


@functools.lru_cache(maxsize=None)
def load_vocabulary(key: str) -> tuple[tuple[str, ...], torch.Tensor]:
    """``(class names, (K, 512) float32 embeddings with L2-normalised rows)`` of a built-in vocabulary."""
    if key not in VOCABULARIES:
        raise KeyError(f"unknown built-in vocabulary {key!r}; one of {', '.join(VOCABULARIES)}")
    resource = resources.files("c2vkd_hf").joinpath("vocab", f"{key}.safetensors")
    with resources.as_file(resource) as path, safe_open(str(path), framework="pt") as handle:
        names = tuple(json.loads(handle.metadata()["class_names"]))
        embeddings = handle.get_tensor("text_embeddings")
    return names, F.normalize(embeddings.float(), dim=1)


@dataclasses.dataclass(frozen=True)
class VocabularyMatch:
    """Class names resolved in one built-in vocabulary.

    ``matches[i]`` is the tuple of vocabulary names that class ``i`` got (one name, or several
    averaged); ``synonyms`` counts the classes that needed :data:`SYNONYMS`."""

    vocabulary: str
    class_names: tuple[str, ...]
    matches: tuple[tuple[str, ...], ...]
    synonyms: int

    @property
    def title(self) -> str:
        return VOCABULARIES[self.vocabulary]

    def embeddings(self) -> torch.Tensor:
        """``(K, 512)`` float32, rows L2-normalised, in the order of ``class_names``."""
        names, table = load_vocabulary(self.vocabulary)
        rows = [table[[names.index(n) for n in match]].mean(dim=0) for match in self.matches]
        return F.normalize(torch.stack(rows), dim=1)

    def mapping(self) -> dict[str, str]:
        """Class name -> what it matched (``"mean(rider, bicycle)"`` for averaged names)."""
        return {c: m[0] if len(m) == 1 else f"mean({', '.join(m)})" for c, m in zip(self.class_names, self.matches)}

    def describe(self) -> str:
        """One line for logs, ``results.json`` and the model card."""
        pairs = ", ".join(f"{c}={m}" for c, m in self.mapping().items())
        return f"built-in {MODEL_NAME} vocabulary '{self.vocabulary}' ({self.title}): {pairs}"


def _match_in(key: str, class_names: Sequence[str]) -> tuple[list[Optional[tuple[str, ...]]], int]:
    """Per class, the vocabulary names it matches in ``key`` (``None``: no match), and the synonym count."""
    names, _ = load_vocabulary(key)
    by_key = {name_key(n): n for n in names}
    matches, synonyms = [], 0
    for name in class_names:
        direct = by_key.get(name_key(name))
        if direct is not None:
            matches.append((direct,))
            continue
        targets = [by_key.get(name_key(t)) for t in SYNONYMS.get(name_key(name), ())]
        found = bool(targets) and all(t is not None for t in targets)
        matches.append(tuple(targets) if found else None)
        synonyms += found
    return matches, synonyms


def match_vocabulary(class_names: Sequence[str]) -> Optional[VocabularyMatch]:
    """The built-in vocabulary that matches every name of ``class_names`` with the fewest synonyms
    (ties: the order of :data:`VOCABULARIES`), or ``None`` when none matches them all."""
    class_names = tuple(str(c) for c in class_names)
    best = None
    for key in VOCABULARIES:
        matches, synonyms = _match_in(key, class_names)
        if class_names and all(m is not None for m in matches) and (best is None or synonyms < best.synonyms):
            best = VocabularyMatch(key, class_names, tuple(matches), synonyms)
    return best


def closest_vocabulary(class_names: Sequence[str]) -> tuple[str, list[str]]:
    """The vocabulary that matches most of ``class_names`` and the names it does not match (for the
    message that says why the built-in vocabulary was not used)."""
    missing = {key: [c for c, m in zip(class_names, _match_in(key, class_names)[0]) if m is None]
               for key in VOCABULARIES}
    key = min(VOCABULARIES, key=lambda k: len(missing[k]))
    return key, missing[key]
