"""Class-name text embeddings for the linguistic term of C2VKD.

Three sources, one dispatcher (:func:`resolve_text_embeddings`, or :func:`get_text_embeddings` for the
tensor alone):

* a precomputed ``(K, D)`` file (``.pth``/``.pt``, ``.safetensors``, ``.npy``):
  :func:`load_text_embeddings`;
* an open_clip model (a model name plus a pretrained tag or a local checkpoint file):
  :func:`compute_text_embeddings`, with prompt ensembling as in CLIP (Radford et al., "Learning
  Transferable Visual Models From Natural Language Supervision", ICML 2021, arXiv 2103.00020): each
  class name is put into every template, each template embedding is L2-normalised, the mean over
  templates is L2-normalised again. Results are cached on disk (safetensors) under a content hash of
  the model name, the weights' identity, the templates and the class names;
* the built-in CLIP ViT-B/16 vocabulary (:mod:`c2vkd_hf.vocabulary`), when it names every class.

Every returned tensor is float32 on the CPU with L2-normalised rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_TEMPLATES",
    "SCENE_TEMPLATES",
    "ENSEMBLE_TEMPLATES",
    "SINGLE_TEMPLATE",
    "resolve_templates",
    "load_text_embeddings",
    "compute_text_embeddings",
    "get_text_embeddings",
    "resolve_text_embeddings",
    "ResolvedTextEmbeddings",
    "default_cache_dir",
]

#: Five scene-level templates added for dense prediction (MaskCLIP: Zhou, Loy, Dai, "Extract Free
#: Dense Labels from CLIP", ECCV 2022), giving the 85-template ensemble of the staged embeddings.
SCENE_TEMPLATES = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)


@functools.lru_cache(maxsize=None)
def _imagenet_templates() -> tuple:
    """The 80 ImageNet prompt templates CLIP ensembles for zero-shot classification (Radford et al. 2021),
    as open_clip ships them (``open_clip.OPENAI_IMAGENET_TEMPLATES``, callables), turned into
    ``str.format`` strings. Imported on first use: open_clip is a slow import that most runs never need."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def __getattr__(name: str):
    # IMAGENET_TEMPLATES (80) and ENSEMBLE_TEMPLATES (``templates="ensemble"``: those 80 + the 5 scene
    # templates) are module attributes computed on first access (PEP 562)
    if name == "IMAGENET_TEMPLATES":
        return _imagenet_templates()
    if name == "ENSEMBLE_TEMPLATES":
        return _imagenet_templates() + SCENE_TEMPLATES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ``templates="single"``.
SINGLE_TEMPLATE = ("a photo of a {}.",)

_EMBEDDING_KEY = "text_embeddings"

Templates = Union[str, Sequence[str]]
PathLike = Union[str, os.PathLike]


def resolve_templates(templates: Templates = "ensemble") -> tuple:
    """``"ensemble"`` (85 templates), ``"single"`` (``"a photo of a {}."``), one template string
    containing ``{}``, or a list of such strings."""
    if isinstance(templates, str):
        if templates == "ensemble":
            return _imagenet_templates() + SCENE_TEMPLATES
        if templates == "single":
            return SINGLE_TEMPLATE
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates must not be empty")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(
                f"each prompt template must be a string containing '{{}}' (or use 'ensemble'/'single'), got {t!r}"
            )
    return templates


def _normalise_rows(x: torch.Tensor, source: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"text embeddings from {source} must have shape (K, D), got {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float32)
    norms = x.norm(dim=1)
    if not torch.isfinite(x).all():
        raise ValueError(f"text embeddings from {source} contain non-finite values")
    if (norms == 0).any():
        raise ValueError(f"text embeddings from {source}: row(s) {torch.nonzero(norms == 0).flatten().tolist()} are zero")
    return F.normalize(x, dim=1).contiguous()


def _single_tensor(obj, source: str) -> torch.Tensor:
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        if _EMBEDDING_KEY in obj and torch.is_tensor(obj[_EMBEDDING_KEY]):
            return obj[_EMBEDDING_KEY]
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ValueError(
            f"{source} holds a dict with {len(tensors)} tensors ({sorted(map(str, tensors))}); expected exactly one "
            f"or a '{_EMBEDDING_KEY}' entry"
        )
    raise ValueError(f"{source} holds a {type(obj).__name__}, expected a (K, D) tensor")


def load_text_embeddings(path: PathLike) -> torch.Tensor:
    """Load precomputed ``(K, D)`` class-name embeddings; float32, rows L2-normalised.

    Accepted: ``.pth``/``.pt`` (``torch.load(weights_only=True)``: a tensor or a dict with one tensor),
    ``.safetensors`` (one tensor, or one named ``text_embeddings``), ``.npy``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embeddings file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    elif suffix == ".npy":
        obj = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"unsupported text embeddings format {suffix!r} ({path}); use .pth, .pt, .safetensors or .npy")
    return _normalise_rows(_single_tensor(obj, str(path)).float(), str(path))


def default_cache_dir() -> Path:
    """``$C2VKD_HF_CACHE/text_embeddings``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/c2vkd_hf/text_embeddings``."""
    root = os.environ.get("C2VKD_HF_CACHE")
    if root:
        return Path(root) / "text_embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "c2vkd_hf" / "text_embeddings"


def _file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _weights_identity(pretrained: Optional[str], model_name: str = "") -> Optional[str]:
    """A string identifying the weights, or ``None`` for random weights (never cached).

    A local file is identified by absolute path, size and modification time (cheap, and any rewrite
    changes it); a ``local-dir:`` model by the same for every file in the folder; a tag or an
    ``hf-hub:`` model by its name.
    """
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return "dir:" + ";".join(_file_identity(str(p)) for p in files)
    if model_name.startswith("hf-hub:"):
        return f"hub:{model_name}"
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return "file:" + _file_identity(pretrained)
    return f"tag:{pretrained}"


def _cache_key(model_name: str, weights_id: str, templates: tuple, class_names: Sequence[str]) -> str:
    payload = json.dumps(
        {"model": model_name, "weights": weights_id, "templates": list(templates), "classes": list(class_names)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _encode_classes(model, tokenizer, class_names: Sequence[str], templates: tuple, device) -> torch.Tensor:
    """``(K, D)`` prompt-ensembled embeddings through open_clip's ``build_zero_shot_classifier`` (each
    prompt embedding L2-normalised, the mean over templates L2-normalised again)."""
    from open_clip import build_zero_shot_classifier

    weights = build_zero_shot_classifier(model, tokenizer, list(class_names), list(templates), device=device)
    return weights.T.float().cpu()  # it returns (D, K), the zero-shot classifier's weight layout


def compute_text_embeddings(
    class_names: Sequence[str],
    model_name: str,
    pretrained: Optional[str],
    templates: Templates = "ensemble",
    cache_dir: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """Prompt-ensembled open_clip text embeddings of ``class_names``, ``(K, D)``.

    Args:
        class_names: class names in label order.
        model_name: an open_clip model name (e.g. ``"ViT-B-16"``), or ``local-dir:``/``hf-hub:`` forms.
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``) or a local checkpoint file (ignored
            by open_clip for ``local-dir:``/``hf-hub:`` names); ``None`` otherwise gives random weights
            (useful only for tests; a warning is logged and nothing is cached).
        templates: see :func:`resolve_templates`.
        cache_dir: where ``<hash>.safetensors`` files are kept (default :func:`default_cache_dir`).
        device: where the text tower runs.
    """
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError("class_names must not be empty")
    templates = resolve_templates(templates)
    weights_id = _weights_identity(pretrained, model_name)
    cache_file = None
    if weights_id is None:
        logger.warning("compute_text_embeddings: no pretrained weights for %s, using random init (not cached)", model_name)
    else:
        cache_file = Path(cache_dir or default_cache_dir()) / f"{_cache_key(model_name, weights_id, templates, class_names)}.safetensors"
        if cache_file.is_file():
            logger.info("text embeddings: cache hit %s", cache_file)
            return load_text_embeddings(cache_file)

    import open_clip

    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        raise RuntimeError(
            f"could not create open_clip model {model_name!r} with pretrained={pretrained!r} ({err}). Without "
            "internet access, pass a local checkpoint file as the pretrained value, or a precomputed (K, D) "
            "embeddings file instead."
        ) from err
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    emb = _normalise_rows(_encode_classes(model, tokenizer, class_names, templates, device), model_name)

    if cache_file is not None:
        from safetensors.torch import save_file

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp")
        metadata = {
            "model_name": model_name,
            "weights": weights_id,
            "num_templates": str(len(templates)),
            "class_names": json.dumps(class_names),
        }
        save_file({_EMBEDDING_KEY: emb}, str(tmp), metadata=metadata)
        os.replace(tmp, cache_file)  # atomic: concurrent processes never read a partial file
    # what a later cache hit returns (load_text_embeddings normalises the stored rows once more; a
    # normalisation is not always bitwise idempotent), so a first and a cached call agree exactly
    return _normalise_rows(emb, model_name)


@dataclasses.dataclass(frozen=True)
class ResolvedTextEmbeddings:
    """Text embeddings and where they came from: ``kind`` is ``"file"``, ``"tensor"``, ``"open_clip"``
    or ``"builtin"``; ``source`` is one line for logs, ``results.json`` and the model card."""

    embeddings: torch.Tensor
    kind: str
    source: str
    #: per class, whether its row is an embedding of its name (False: a placeholder for an unmatched name of
    #: the built-in vocabulary); ``None``: every row is
    matched: Optional[tuple[bool, ...]] = None


def resolve_text_embeddings(
    class_names: Sequence[str],
    *,
    text_embeddings: Optional[Union[PathLike, torch.Tensor]] = None,
    clip_model: Optional[str] = None,
    clip_pretrained: Optional[str] = None,
    templates: Templates = "ensemble",
    cache_dir: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    builtin: bool = True,
) -> Optional[ResolvedTextEmbeddings]:
    """Text embeddings for ``class_names``, first found of: a file/tensor, an open_clip model, and
    (``builtin``) the built-in CLIP vocabulary when it names at least one class
    (:func:`c2vkd_hf.vocabulary.match_vocabulary`; ``matched`` marks the classes it names). ``None`` when
    there is none.

    Raises ``ValueError`` when the row count differs from ``len(class_names)``.
    """
    if text_embeddings is not None:
        if clip_model is not None:
            logger.warning("both text_embeddings and clip_model given; using text_embeddings")
        if torch.is_tensor(text_embeddings):
            resolved = ResolvedTextEmbeddings(_normalise_rows(text_embeddings, "the given tensor"), "tensor",
                                              "the given tensor")
        else:
            resolved = ResolvedTextEmbeddings(load_text_embeddings(text_embeddings), "file", str(text_embeddings))
    elif clip_model is not None:
        emb = compute_text_embeddings(class_names, clip_model, clip_pretrained, templates, cache_dir, device)
        resolved = ResolvedTextEmbeddings(emb, "open_clip", f"open_clip {clip_model} ({clip_pretrained})")
    elif builtin:
        from .vocabulary import match_vocabulary

        match = match_vocabulary(class_names, partial=True)
        if match is None:
            return None
        resolved = ResolvedTextEmbeddings(match.embeddings(), "builtin", match.describe(),
                                          None if all(match.matched) else match.matched)
    else:
        return None
    if resolved.embeddings.shape[0] != len(class_names):
        raise ValueError(
            f"text embeddings from {resolved.source} have {resolved.embeddings.shape[0]} rows but the dataset has "
            f"{len(class_names)} classes"
        )
    return resolved


def get_text_embeddings(
    class_names: Sequence[str],
    *,
    text_embeddings: Optional[Union[PathLike, torch.Tensor]] = None,
    clip_model: Optional[str] = None,
    clip_pretrained: Optional[str] = None,
    templates: Templates = "ensemble",
    cache_dir: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    builtin: bool = False,
) -> Optional[torch.Tensor]:
    """Text embeddings for ``class_names`` from a file/tensor (preferred), an open_clip model or
    (``builtin=True``) the built-in vocabulary: :func:`resolve_text_embeddings` without the source.

    Returns ``None`` when there is none (the linguistic term is then off). Raises ``ValueError``
    when the row count differs from ``len(class_names)``.
    """
    resolved = resolve_text_embeddings(
        class_names, text_embeddings=text_embeddings, clip_model=clip_model, clip_pretrained=clip_pretrained,
        templates=templates, cache_dir=cache_dir, device=device, builtin=builtin)
    return None if resolved is None else resolved.embeddings
