"""Top-k compression of the stored logits, and the geometric replay of stored maps under a training view
(rescale, crop, flip)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as nnf

from ..data import Geometry


def topk_compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, h, w) logits -> ``(values (B, k + 1, h, w), indices (B, k, h, w))``: the k largest logits
    per pixel and, last, the rest logit ``log(sum of exp(other logits) / (K - k))``, so that the other
    K - k classes share the remaining softmax mass equally (top-k probabilities are preserved)."""
    num_classes = logits.shape[1]
    if not 1 <= k < num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes - 1}] for {num_classes} classes, got {k}")
    logits = logits.float()
    values, indices = logits.topk(k, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    rest_logit = torch.logsumexp(rest, dim=1, keepdim=True) - math.log(num_classes - k)
    return torch.cat([values, rest_logit], dim=1), indices


def topk_expand(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse of :func:`topk_compress`: dense (B, K, h, w) logits with the stored top-k values and
    the rest logit everywhere else."""
    k = indices.shape[1]
    dense = values[:, k:k + 1].expand(-1, num_classes, -1, -1).clone()
    return dense.scatter(1, indices.long(), values[:, :k])


def replay_output_size(map_size: Sequence[int], reference_size: Sequence[int],
                       crop_size: Sequence[int]) -> tuple[int, int]:
    """Size of a replayed map: the crop at the map's own stride (``map / reference`` cells per pixel),
    rounded, at least 1. E.g. a stride-32 map of a 120x160 reference is 4x5; a 120x160 crop replays
    to 4x5 too."""
    return tuple(max(1, int(round(c * m / r))) for c, m, r in zip(crop_size, map_size, reference_size))


def replay_grid(geometry: Geometry, output_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample`` coordinates (oh, ow, 2), ``align_corners=False`` convention, that take a map of
    the whole reference view to the ``geometry``'s crop at ``output_size``, and an (oh, ow) mask of
    the positions inside the image (False: padding).

    Output cell (i, j) has its centre at ``((i + 0.5) * crop_h / oh, (j + 0.5) * crop_w / ow)`` in
    crop pixels; mirrored (``crop_w - x``) when ``geometry.flip``; shifted by the crop's (top, left)
    into the scaled frame; divided by the scaled size, this is a fraction of the image, which is what
    ``grid_sample`` samples (any source resolution: the reference view and the scaled view are the
    same image)."""
    (scaled_h, scaled_w), (top, left, crop_h, crop_w) = geometry.scaled_size, geometry.crop_box
    out_h, out_w = int(output_size[0]), int(output_size[1])
    y = (torch.arange(out_h, dtype=torch.float64) + 0.5) * (crop_h / out_h)
    x = (torch.arange(out_w, dtype=torch.float64) + 0.5) * (crop_w / out_w)
    if geometry.flip:
        x = crop_w - x
    u = (top + y) / scaled_h  # fraction of the image height, 0..1 inside
    v = (left + x) / scaled_w
    inside = (u[:, None] <= 1.0) & (v[None, :] <= 1.0)
    grid = torch.stack(torch.broadcast_tensors(2 * v[None, :] - 1, 2 * u[:, None] - 1), dim=-1)
    return grid.float(), inside


def replay_maps(maps: torch.Tensor, geometries: Sequence[Geometry], reference_size: Sequence[int],
                view_scale: float = 1.0) -> torch.Tensor:
    """Apply each example's training ``geometry`` to its cached (B, C, h, w) ``maps`` of the reference
    view, at the maps' own stride (:func:`replay_output_size`) of the crop enlarged ``view_scale``
    times (the teacher's view; 1: the student's): bilinear resampling, clamped at the image border (as
    a resize is), 0 where the crop lies in the padding."""
    crop = geometries[0].output_size
    if any(g.output_size != crop for g in geometries):
        raise ValueError("all views of a batch must have the same crop size")
    if view_scale != 1.0:
        crop = tuple(int(round(c * view_scale)) for c in crop)
    out_size = replay_output_size(maps.shape[-2:], reference_size, crop)
    grids, masks = zip(*(replay_grid(g, out_size) for g in geometries))
    grid = torch.stack(grids).to(maps.device)
    out = nnf.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = torch.stack(masks).to(out.device)
    if not bool(mask.all()):
        out = out * mask[:, None].to(out.dtype)
    return out
