"""CutMix of training batches, so that a live teacher is asked about images no label covers.

For each example ``i`` of a batch of ``B`` (with probability ``p``, ``--cutmix_prob``) a box of its
image and mask is replaced by the same box of a partner example ``j(i) = (i + o) mod B``, one offset
``o`` drawn uniformly from ``1..B-1`` per batch (so no example is its own partner when ``B > 1``):

``x'_i = M_i * x_j(i) + (1 - M_i) * x_i``   and   ``y'_i = M_i * y_j(i) + (1 - M_i) * y_i``

``M_i`` is 1 inside a box of relative side ``sqrt(r)``, ``r ~ U(0, 1)`` (so its area fraction before
clipping at the border is ``r``), centred at a uniform position, and 0 elsewhere: CutMix with
``lambda ~ Beta(1, 1)`` (Yun et al., ICCV 2019), used for segmentation by French et al. (BMVC 2020,
"Semi-supervised semantic segmentation needs strong, varied perturbations").

Why it belongs in distillation: the teacher (run live) sees the very mixed image the student sees,
so its predictions teach the student the teacher's function on inputs outside the labelled set, and
near the pasted borders in particular, where context is new. Beyer et al. (CVPR 2022, "Knowledge
distillation: A good teacher is patient and consistent") find such "function matching" with
aggressive mixing and consistent teacher/student views is what makes distillation generalise. A
teacher cache holds the teacher's outputs on unmixed views, so CutMix needs the live teacher.

The draws of a step come from a generator seeded by ``(seed, step, rank, micro-batch)``
(:func:`mix_generator`), so a run resumed from a checkpoint mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["cutmix_masks", "apply_cutmix", "mix_generator"]


def mix_generator(seed: int, step: int, rank: int = 0, micro: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, step, rank, micro)``."""
    digest = hashlib.sha256(f"cutmix:{int(seed)}:{int(step)}:{int(rank)}:{int(micro)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def cutmix_masks(batch: int, height: int, width: int, prob: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, partner)``: ``M`` a (B, H, W) bool tensor, True inside each mixed example's box (all False
    for an example left unmixed, drawn with probability ``1 - prob``), and ``partner`` (B,) the index of
    the example each box comes from (see the module docstring for the distribution)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"cutmix probability must be in [0, 1], got {prob}")
    offset = int(torch.randint(1, batch, (1,), generator=generator)) if batch > 1 else 0
    partner = (torch.arange(batch) + offset) % batch
    mixed = torch.rand(batch, generator=generator) < prob
    side = torch.rand(batch, generator=generator).sqrt()
    centre_y = torch.rand(batch, generator=generator) * height
    centre_x = torch.rand(batch, generator=generator) * width
    half_h, half_w = side * height / 2, side * width / 2
    rows = torch.arange(height, dtype=torch.float32)[None, :] + 0.5
    cols = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    in_rows = ((rows >= (centre_y - half_h)[:, None]) & (rows < (centre_y + half_h)[:, None]))
    in_cols = ((cols >= (centre_x - half_w)[:, None]) & (cols < (centre_x + half_w)[:, None]))
    masks = in_rows[:, :, None] & in_cols[:, None, :] & mixed[:, None, None]
    return masks, partner


def apply_cutmix(tensor: torch.Tensor, masks: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``M * tensor[partner] + (1 - M) * tensor`` for a (B, H, W) mask and a (B, ..., H, W) tensor
    (images (B, C, H, W), label maps (B, H, W)); returns a new tensor."""
    if tensor.shape[0] != masks.shape[0] or tuple(tensor.shape[-2:]) != tuple(masks.shape[-2:]):
        raise ValueError(f"a {tuple(masks.shape)} mix mask does not fit a {tuple(tensor.shape)} tensor")
    m = masks.to(tensor.device).view(masks.shape[0], *([1] * (tensor.dim() - 3)), *masks.shape[-2:])
    return torch.where(m, tensor[partner.to(tensor.device)], tensor)
