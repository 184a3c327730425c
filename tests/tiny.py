"""Tiny models and data shared by the trainer tests (no downloads, a few seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainingArguments

from dataclasses import fields

from c2vkd_hf.config import DistillationArguments
from c2vkd_hf.losses import C2VKDConfig, C2VKDLoss, get_loss
from c2vkd_hf.metrics import make_compute_metrics
from c2vkd_hf.models import forward_features, load_student
from c2vkd_hf.trainer import DistillationModel, DistillationTrainer

ID2LABEL = {0: "sky", 1: "road", 2: "car"}
TINY_SEGFORMER = {
    "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 1, 1],
    "decoder_hidden_size": 16, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.0,
}
TINY_SEGFORMER_JSON = (
    '{"hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 1, 1], '
    '"decoder_hidden_size": 16}'
)


def tiny_student(seed: int = 0, *, batch_norm: bool = True) -> nn.Module:
    """A tiny SegFormer. ``batch_norm=False`` replaces the decode head's BatchNorm (whose batch
    statistics make micro-batches differ from a full batch) by the identity."""
    torch.manual_seed(seed)
    model = load_student("segformer-b0", ID2LABEL, config_overrides=TINY_SEGFORMER)
    if not batch_norm:
        model.decode_head.batch_norm = nn.Identity()
    return model


def tiny_teacher(seed: int = 1) -> nn.Module:
    """A frozen tiny segmentation model standing in for the CNN teacher."""
    model = tiny_student(seed, batch_norm=False)
    return model.eval().requires_grad_(False)


def tensor_dataset(n: int = 8, size: int = 32, seed: int = 0, ignore: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        labels = torch.randint(0, len(ID2LABEL), (size, size), generator=g)
        if ignore:
            labels[:4] = 255
        items.append({"pixel_values": torch.randn(3, size, size, generator=g), "labels": labels})
    return items


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def c2vkd_model(student: nn.Module, teacher: nn.Module, seed: int = 0) -> DistillationModel:
    torch.manual_seed(seed)
    s_channels = student.config.hidden_sizes[-1]
    t_channels = teacher.config.hidden_sizes[-1]
    text = nn.functional.normalize(torch.randn(len(ID2LABEL), 12, generator=torch.Generator().manual_seed(3)), dim=1)
    loss = c2vkd_loss(student_channels=[s_channels], teacher_channels=[t_channels], text_embeddings=text)
    return DistillationModel(student, loss, ["stage4"])


#: The product's C2VKD with its three additions to the paper off (plain means, no channel-wise term, no exits): the
#: loss tests' reference, every other constant at its flag's default.
PLAIN_C2VKD = {"class_balance": False, "channel_weight": 0.0, "exit_weight": 0.0}


def c2vkd_loss(**kwargs) -> C2VKDLoss:
    """A :class:`C2VKDLoss`: keyword arguments naming a :class:`C2VKDConfig` field set that constant (the others:
    :data:`PLAIN_C2VKD`, then the flags' defaults); the rest go to the constructor."""
    names = {f.name for f in fields(C2VKDConfig)}
    constants = {**PLAIN_C2VKD, **{k: v for k, v in kwargs.items() if k in names}}
    config = C2VKDConfig.from_args(DistillationArguments(), **constants)
    return C2VKDLoss(config, **{k: v for k, v in kwargs.items() if k not in names})


def make_loss(name: str, **kwargs):
    """The loss registered as ``name`` (:func:`~c2vkd_hf.losses.get_loss`), C2VKD through :func:`c2vkd_loss`."""
    return c2vkd_loss(**kwargs) if name == "c2vkd" else get_loss(name, **kwargs)


def make_trainer(output_dir: str, model: DistillationModel, teacher: nn.Module, train, *, eval_dataset=None,
                 **training_kwargs) -> DistillationTrainer:
    kwargs = dict(output_dir=output_dir, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2,
                  report_to="none", save_strategy="no", logging_steps=1, seed=0, remove_unused_columns=False,
                  disable_tqdm=True, use_cpu=True, batch_eval_metrics=True, label_names=["labels"])
    kwargs.update(training_kwargs)
    return DistillationTrainer(
        model=model, args=TrainingArguments(**kwargs), train_dataset=train, eval_dataset=eval_dataset,
        data_collator=collate, teacher=teacher, teacher_feature_names=["stage4"],
        compute_metrics=make_compute_metrics(len(ID2LABEL), 255, ID2LABEL))


__all__ = ["c2vkd_loss", "make_loss", "PLAIN_C2VKD", "ID2LABEL", "TINY_SEGFORMER", "TINY_SEGFORMER_JSON", "tiny_student", "tiny_teacher", "tensor_dataset",
           "collate", "c2vkd_model", "make_trainer", "forward_features"]
