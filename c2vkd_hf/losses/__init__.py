"""Distillation losses: pure functions of tensors, plus thin registered ``nn.Module`` wrappers.

Methods (``get_loss(name, **kwargs)``; every module adds cross-entropy ``ce`` on the labels):

=========  ===================================================  ==========================================
name       terms                                                paper
=========  ===================================================  ==========================================
``none``   ce                                                   (student without teacher)
``kd``     ce, kd                                               Hinton et al. 2015, arXiv 1503.02531
``cwd``    ce, cwd                                              Shu et al. ICCV 2021, arXiv 2011.13256
``dist``   ce, dist                                             Huang et al. NeurIPS 2022, arXiv 2205.10536
``dkd``    ce, dkd                                              Zhao et al. CVPR 2022, arXiv 2203.08679
``c2vkd``  ce, pdd, glob, rel, ling (ling only with text)       Zheng et al. 2023, arXiv 2310.07265
=========  ===================================================  ==========================================

Module ``forward(student_logits, teacher_logits, labels, student_features=None,
teacher_features=None)`` returns ``{term: unweighted scalar, ..., "loss": weighted total}``, and
``module.weights`` maps term names to weights. Formulas live in each submodule's docstring.
"""

from .base import DistillationLoss
from .c2vkd import C2VKDLoss
from .c2vkd_config import C2VKDConfig
from .ce import CrossEntropyLoss
from .common import IGNORE_INDEX, cross_entropy
from .cwd import CWDLoss, cwd_loss
from .dist import DISTLoss, dist_loss
from .dkd import DKDLoss, dkd_loss
from .kd import KDLoss, kd_loss
from .pdd import pdd_loss, pdd_loss_and_cross_entropy
from .registry import available_losses, get_loss, register_loss
from .vlfd import (
    pixel_text_logits,
    project_pixel_text_logits,
    vlfd_global_loss,
    vlfd_linguistic_loss,
    vlfd_linguistic_loss_from_scores,
    vlfd_relation_loss,
)

__all__ = [
    "C2VKDConfig",
    "IGNORE_INDEX",
    "DistillationLoss",
    "CrossEntropyLoss",
    "KDLoss",
    "CWDLoss",
    "DISTLoss",
    "DKDLoss",
    "C2VKDLoss",
    "cross_entropy",
    "kd_loss",
    "cwd_loss",
    "dist_loss",
    "dkd_loss",
    "pdd_loss",
    "pdd_loss_and_cross_entropy",
    "vlfd_global_loss",
    "vlfd_relation_loss",
    "vlfd_linguistic_loss",
    "vlfd_linguistic_loss_from_scores",
    "pixel_text_logits",
    "project_pixel_text_logits",
    "get_loss",
    "register_loss",
    "available_losses",
]
