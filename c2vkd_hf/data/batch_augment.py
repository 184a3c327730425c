"""Augmentations of a whole training batch that the trainer applies around the teacher.

Two views a teacher can teach on, beyond the labelled images:

**CutMix, before the teacher** (``--cutmix_prob p``). For each example ``i`` of a batch of ``B``
(with probability ``p``) a box of its image and mask is replaced by the same box of a partner example
``j(i) = (i + o) mod B``, one offset ``o`` drawn uniformly from ``1..B-1`` per batch (so no example is
its own partner when ``B > 1``):

``x'_i = M_i * x_j(i) + (1 - M_i) * x_i``   and   ``y'_i = M_i * y_j(i) + (1 - M_i) * y_i``

``M_i`` is 1 inside a box of relative side ``sqrt(r)``, ``r ~ U(0, 1)`` (so its area fraction before
clipping at the border is ``r``), centred at a uniform position, and 0 elsewhere: CutMix with
``lambda ~ Beta(1, 1)`` (Yun et al., ICCV 2019), used for segmentation by French et al. (BMVC 2020,
"Semi-supervised semantic segmentation needs strong, varied perturbations"). The live teacher sees the
very mixed image the student sees, so it teaches its function on inputs outside the labelled set, near
the pasted borders in particular, where context is new: "function matching" with aggressive mixing and
consistent views, which Beyer et al. (CVPR 2022, "Knowledge distillation: A good teacher is patient and
consistent") find is what makes distillation generalise. A teacher cache holds the teacher's outputs on
unmixed views, so CutMix needs the live teacher.

**Colour jitter, after the teacher** (``--student_jitter s``). The teacher (live or cached) has seen
the clean view; the student sees it with per-example brightness ``b``, contrast ``c`` and saturation
``a`` factors drawn from ``U(1 - s, 1 + s)``, applied in that order to the image in [0, 1]
(``g(x)``: the luma ``0.299 R + 0.587 G + 0.114 B``; ``mean``: over the image):

``x1 = b x``;  ``x2 = c (x1 - mean g(x1)) + mean g(x1)``;  ``x3 = clip(a (x2 - g(x2)) + g(x2), 0, 1)``

so the student must match the teacher's clean-view outputs and features under a change of appearance
(Noisy Student, Xie et al., CVPR 2020: noise on the student only), the kind of change a new sequence
of the same streets brings. The labels are unchanged.

The draws of a micro-batch come from generators seeded by ``(seed, step, rank, micro-batch)``
(:func:`batch_generator`), so a run resumed from a checkpoint augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

from ..models.normalization import renormalize
from .transforms import seeded_generator

__all__ = ["batch_generator", "cutmix_masks", "apply_cutmix", "jitter_factors", "colour_jitter",
           "jitter_normalised"]

#: luma weights of R, G, B (ITU-R BT.601)
LUMA = (0.299, 0.587, 0.114)

#: the first seed word of each kind of batch draw (so CutMix and jitter draw unrelated streams)
KINDS = {"cutmix": 1, "jitter": 2}


def batch_generator(kind: str, seed: int, step: int, rank: int = 0, micro: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on ``(kind, seed, step, rank, micro)``
    (:func:`~c2vkd_hf.data.transforms.seeded_generator`, as each example's augmentation)."""
    return seeded_generator(KINDS[kind], int(seed) & 0xFFFFFFFF, step, rank, micro)


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


def jitter_factors(batch: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 3) brightness, contrast and saturation factors, each ``U(1 - strength, 1 + strength)``."""
    if not 0.0 <= strength < 1.0:
        raise ValueError(f"jitter strength must be in [0, 1), got {strength}")
    return 1.0 + strength * (2.0 * torch.rand(batch, 3, generator=generator) - 1.0)


def colour_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (module docstring) of (B, 3, H, W) images in [0, 1] with (B, 3)
    ``factors``; returns new images in [0, 1]."""
    f = factors.to(images).view(-1, 3, 1, 1)
    luma = images.new_tensor(LUMA).view(1, 3, 1, 1)
    x = images * f[:, 0:1]
    grey_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = f[:, 1:2] * (x - grey_mean) + grey_mean
    grey = (x * luma).sum(1, keepdim=True)
    return (f[:, 2:3] * (x - grey) + grey).clamp(0.0, 1.0)


def jitter_normalised(pixel_values: torch.Tensor, factors: torch.Tensor, mean, std) -> torch.Tensor:
    """:func:`colour_jitter` of a batch normalised as ``(x - mean) / std`` (per channel), returned
    normalised the same way."""
    unit = ((0.0,) * len(mean), (1.0,) * len(std))  # pixel values in [0, 1]
    return renormalize(colour_jitter(renormalize(pixel_values, mean, std, *unit), factors), *unit, mean, std)
