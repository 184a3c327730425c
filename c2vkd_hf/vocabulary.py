"""The built-in CLIP vocabulary: class-name embeddings for datasets with common class names.

C2VKD's linguistic term needs CLIP text embeddings of the dataset's class names. Without
``--text_embeddings`` or ``--clip_model``, :func:`match_vocabulary` looks the names up in the
vocabularies shipped in ``c2vkd_hf/vocab/`` (OpenAI CLIP ViT-B/16, 85 prompt templates; see its
README): Cityscapes (19), ADE20K (150), Pascal-Context (59), PASCAL VOC (20).

Matching, per vocabulary: a class name matches a vocabulary name when both are equal after
lower-casing and removing everything but letters and digits (``Traffic_Light`` = ``traffic light``,
``pottedplant`` = ``potted plant``); otherwise the name is looked up in :data:`SYNONYMS`, whose
entry names one vocabulary class, or several whose rows are averaged (then L2-normalised). The
primary vocabulary is the one that matches the most names, then with the fewest synonyms, ties in the
order of :data:`VOCABULARIES`; a name it lacks is looked up in the other vocabularies in that order
(every one was made with the same CLIP model and prompt ensemble, so a name found in two is the same
row: cosine >= 0.999 for the shared names). So CamVid's 11 classes resolve to Cityscapes rows (Tree =
vegetation, Bicyclist = mean of rider and bicycle, ...), exactly as the staged
``camvid11_from_city_ViT16_clip_text`` file was built; the synthetic default dataset (sky, building,
road, tree, car, person) to ADE20K rows, which name all six directly; MSRC-21 to Pascal-Context rows
with ``flower`` and ``sign`` from ADE20K.

A name no vocabulary has (Stanford Background's "foreground object", MSRC-21's "face") is
**unmatched**: its row is a placeholder, the L2-normalised mean of the matched rows, and
:attr:`VocabularyMatch.matched` marks it. C2VKD's linguistic term then reads only the matched classes
and the text head learns the unmatched rows from the labels (:mod:`c2vkd_hf.text_head`), so one
unmatched name does not switch the text space off for every class.
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
    matches: tuple[Optional[tuple[str, ...]], ...]
    synonyms: int
    #: per class, the vocabulary its row comes from (default: ``vocabulary``; ``None``: unmatched)
    sources: tuple[Optional[str], ...] = ()

    @property
    def title(self) -> str:
        return VOCABULARIES[self.vocabulary]

    def source_of(self, i: int) -> Optional[str]:
        if self.matches[i] is None:
            return None
        return self.sources[i] if self.sources else self.vocabulary

    @property
    def matched(self) -> tuple[bool, ...]:
        """Per class, whether its name has an embedding (False: an unmatched name, a placeholder row)."""
        return tuple(m is not None for m in self.matches)

    @property
    def unmatched(self) -> tuple[str, ...]:
        return tuple(c for c, m in zip(self.class_names, self.matches) if m is None)

    def embeddings(self) -> torch.Tensor:
        """``(K, 512)`` float32, rows L2-normalised, in the order of ``class_names``; an unmatched class's row
        is the normalised mean of the matched rows (a placeholder)."""
        rows: list[Optional[torch.Tensor]] = []
        for i, match in enumerate(self.matches):
            if match is None:
                rows.append(None)
                continue
            names, table = load_vocabulary(self.source_of(i))
            rows.append(table[[names.index(n) for n in match]].mean(dim=0))
        found = F.normalize(torch.stack([r for r in rows if r is not None]), dim=1)
        placeholder = F.normalize(found.mean(dim=0), dim=0)
        return F.normalize(torch.stack([placeholder if r is None else r for r in rows]), dim=1)

    def mapping(self) -> dict[str, str]:
        """Class name -> what it matched (``"mean(rider, bicycle)"`` for averaged names, ``name (ade)`` for a row
        from another vocabulary than the primary one, ``unmatched``)."""
        out = {}
        for i, (c, m) in enumerate(zip(self.class_names, self.matches)):
            if m is None:
                out[c] = "unmatched"
                continue
            text = m[0] if len(m) == 1 else f"mean({', '.join(m)})"
            out[c] = text if self.source_of(i) == self.vocabulary else f"{text} ({self.source_of(i)})"
        return out

    def describe(self) -> str:
        """One line for logs, ``results.json`` and the model card."""
        pairs = ", ".join(f"{c}={m}" for c, m in self.mapping().items())
        line = f"built-in {MODEL_NAME} vocabulary '{self.vocabulary}' ({self.title}): {pairs}"
        if self.unmatched:
            line += (f"; no built-in embedding for {', '.join(self.unmatched)}: left out of the linguistic term, "
                     "its text-head row learned from the labels")
        return line


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


def match_vocabulary(class_names: Sequence[str], partial: bool = False) -> Optional[VocabularyMatch]:
    """``class_names`` resolved in the built-in vocabularies (module docstring): the primary vocabulary matches
    the most names, then with the fewest synonyms (ties: the order of :data:`VOCABULARIES`), and a name it
    lacks comes from the first other vocabulary that has it. ``None`` when a name stays unmatched, unless
    ``partial`` (then ``None`` only when no name matches)."""
    class_names = tuple(str(c) for c in class_names)
    if not class_names:
        return None
    found = {key: _match_in(key, class_names) for key in VOCABULARIES}
    primary = min(VOCABULARIES, key=lambda k: (-sum(m is not None for m in found[k][0]), found[k][1],
                                               list(VOCABULARIES).index(k)))
    matches, sources, synonyms = list(found[primary][0]), [primary] * len(class_names), found[primary][1]
    for i, match in enumerate(matches):
        if match is not None:
            continue
        for key in VOCABULARIES:
            if found[key][0][i] is not None:
                matches[i], sources[i] = found[key][0][i], key
                break
        else:
            sources[i] = None
    if all(m is None for m in matches) or (not partial and any(m is None for m in matches)):
        return None
    plain = all(s == primary for s in sources)
    return VocabularyMatch(primary, class_names, tuple(matches), synonyms, () if plain else tuple(sources))


def closest_vocabulary(class_names: Sequence[str]) -> tuple[str, list[str]]:
    """The vocabulary that matches most of ``class_names`` and the names it does not match (for the
    message that says why the built-in vocabulary was not used)."""
    missing = {key: [c for c, m in zip(class_names, _match_in(key, class_names)[0]) if m is None]
               for key in VOCABULARIES}
    key = min(VOCABULARIES, key=lambda k: len(missing[k]))
    return key, missing[key]
