"""Input normalisation: the mean/std a model expects, and a batch converted from one mean/std to another."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def processor_folder(model_or_path: Any) -> str | None:
    """The folder with the image processor (``preprocessor_config.json``) of a model, path or Hub id, or ``None``."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
    elif isinstance(model_or_path, nn.Module):
        config = getattr(extract_model_from_parallel(model_or_path, keep_torch_compile=False), "config", None)
        path = getattr(config, "_name_or_path", "") or ""
    else:
        return None
    if path and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return path
    if path.count("/") == 1 and ":" not in path and not os.path.exists(path):  # a Hub id such as org/name
        return _hub_processor_folder(path)
    return None


@functools.lru_cache(maxsize=None)
def _hub_processor_folder(repo_id: str) -> str | None:
    """The folder (cache snapshot) of ``repo_id``'s ``preprocessor_config.json`` in huggingface_hub's cache, or
    ``None`` when the cache has none (never the network: a model's statistics must not depend on a connection)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        file = try_to_load_from_cache(repo_id, "preprocessor_config.json")
    except Exception:  # noqa: BLE001 - not a valid repository id, ...
        return None
    return os.path.dirname(file) if isinstance(file, str) else None


def image_mean_std(model_or_path: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` the model expects.

    Accepts a folder, a Hub id (its file in the Hugging Face cache), a model (its ``config._name_or_path`` folder or
    Hub id is consulted) or an image processor.
    Reads ``image_mean``/``image_std`` of ``preprocessor_config.json`` when there is one, else
    returns the ImageNet statistics.
    """
    if hasattr(model_or_path, "image_mean") and hasattr(model_or_path, "image_std"):
        return tuple(float(v) for v in model_or_path.image_mean), tuple(float(v) for v in model_or_path.image_std)
    folder = processor_folder(model_or_path)
    if folder is not None:
        with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean is not None and std is not None:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def renormalize(
    pixel_values: torch.Tensor,
    from_mean: Sequence[float],
    from_std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
) -> torch.Tensor:
    """Convert a (B, C, H, W) batch normalised with ``from_mean/from_std`` to ``to_mean/to_std``.

    ``x_raw = x * from_std + from_mean``; returns ``(x_raw - to_mean) / to_std`` (one fused affine op).
    Returns the input unchanged when the statistics are equal.
    """
    fm, fs, tm, ts = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (from_mean, from_std, to_mean, to_std))
    if fm.shape == tm.shape and fs.shape == ts.shape and torch.allclose(fm, tm) and torch.allclose(fs, ts):
        return pixel_values
    scale = (fs / ts).to(device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    shift = ((fm - tm) / ts).to(device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    return pixel_values * scale + shift
