"""DPT on non-square inputs: the patch grid of the current input, passed to DPT's neck by two pre-hooks."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .common import model_type_of


def fix_patch_grid(model: nn.Module) -> nn.Module:
    """Let ``DPTForSemanticSegmentation`` run on non-square images (returns ``model``).

    In transformers 5.23 it calls its neck without the patch grid, and the neck then assumes a square
    grid (a reshape error on e.g. 120x160 images). Two forward pre-hooks (not saved with the weights)
    pass the grid of the current input. Other models are returned unchanged; calling it twice is a no-op.
    """
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if model_type_of(inner) != "dpt" or not hasattr(inner, "neck") or getattr(inner, "_c2vkd_grid_fixed", False):
        return model
    state: dict[str, tuple[int, int]] = {}

    def remember_input(_module, args, kwargs):
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor):
            state["hw"] = tuple(pixel_values.shape[-2:])

    def pass_grid(_module, args, kwargs):
        if kwargs.get("patch_height") is not None or "hw" not in state:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = next((h for h in hidden if h.dim() == 3), None)
        if tokens is None:
            return None
        grid = patch_grid(tokens.shape[1] - 1, state["hw"], inner.config)
        if grid is None:
            return None
        return args, {**kwargs, "patch_height": grid[0], "patch_width": grid[1]}

    inner.register_forward_pre_hook(remember_input, with_kwargs=True)
    inner.neck.register_forward_pre_hook(pass_grid, with_kwargs=True)
    inner._c2vkd_grid_fixed = True
    return model


def patch_grid(n: int, image_hw: Sequence[int], config: Any) -> tuple[int, int] | None:
    """The (h, w) token grid of ``n`` patch tokens for an input of ``image_hw``: the config's patch size
    when it fits, else the factorisation of ``n`` closest to the image's aspect ratio."""
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and patch > 0 and (image_hw[0] // patch) * (image_hw[1] // patch) == n:
        return image_hw[0] // patch, image_hw[1] // patch
    best = None
    for gh in range(1, n + 1):
        if n % gh == 0:
            err = abs(math.log((gh / (n // gh)) / (image_hw[0] / image_hw[1])))
            if best is None or err < best[0]:
                best = (err, (gh, n // gh))
    return best[1] if best else None
