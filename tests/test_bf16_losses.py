"""Every loss under bf16 autocast agrees with float32, returns a float32 value and gives finite gradients.

A model trained with ``--bf16 true`` hands the losses bf16 logits and features (autocast runs its matmuls and
convolutions in bf16), and autocast is still on while the loss runs. Each case here computes a loss twice from
the same stand-in model (1x1 convolutions, a few of them carrying the labels so the logits are peaked and mostly
right, as a trained model's are): once in float32, once with the model and the loss under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Shapes are the project's at a small scale: B = 2, K = 11 classes,
student logits 32x40, teacher logits 16x20, labels 128x160 with ignored (255) rows and scattered ignored pixels,
features of 64-256 channels at two strides, 512-dimensional class-name embeddings.

Tolerances:

* ``RTOL = 2e-2`` (relative, per reported term; float32 vs the bf16 model and loss): the two values differ by
  the model's own rounding, since bf16 keeps 8 significant bits (unit roundoff 2^-9, about 2e-3, on every logit
  and feature). A loss is a smooth mean over thousands of pixels of functions of those inputs, so its relative
  error stays within a few roundoffs; 2e-2 is about ten of them. This bounds what a bf16 run gets, not how the
  loss computes: autocast itself runs ``kl_div`` and the cross-entropy in float32, so a loss that took its
  softmax in bf16 could still pass it.
* ``INTERNAL_RTOL = 1e-5`` (the pure functions): the same bf16 tensors, given once upcast to float32 outside
  autocast and once as bf16 under autocast, must give the same number up to float32 rounding: every function
  casts its inputs to float32 and disables autocast before any arithmetic (``losses/common.py::float32_compute``).
  This is the check that the loss itself computes in float32: a softmax or logarithm taken in bf16 moves the
  value by far more than 1e-5.
* ``GRAD_COS = 0.99``: the gradient of the loss with respect to the student-side parameters (stand-in model and
  the loss module's projectors) points the same way in both precisions (cosine similarity), and is finite.

The loss modules are built the way the product builds them (:func:`c2vkd_hf.jobs.build_loss_module` from
``DistillationArguments``), not with their constructors. ``--bf16 true`` itself on a CPU: honoured with
``--use_cpu true``, refused otherwise with our own line (the last tests; the command-line refusal is in
``tests/test_scripts.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from c2vkd_hf.config import DistillationArguments
from c2vkd_hf.jobs import build_loss_module, recipe_values
from c2vkd_hf.losses import (
    cross_entropy,
    cwd_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
    pdd_loss,
    pdd_loss_and_cross_entropy,
    project_pixel_text_logits,
    vlfd_global_loss,
    vlfd_linguistic_loss,
    vlfd_linguistic_loss_from_scores,
    vlfd_relation_loss,
)

RTOL = 2e-2
INTERNAL_RTOL = 1e-5
GRAD_COS = 0.99

B, K, D = 2, 11, 512
LABEL_SIZE = (128, 160)
IGNORE = 255


def _precision(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)


class Scene(nn.Module):
    """Fixed inputs and the 1x1 convolutions of a stand-in student and teacher: :meth:`outputs` gives their logits
    and features (bf16 under autocast, float32 otherwise). The first K input channels of each logit head carry the
    labels, so the logits are peaked and mostly right, as a trained model's are."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        blocks = torch.randint(0, K, (B, 1, 8, 10), generator=g).float()
        labels = F.interpolate(blocks, size=LABEL_SIZE, mode="nearest")[:, 0].long()
        labels[:, :12] = IGNORE  # a void band (an ego-vehicle bonnet, say) ...
        labels[torch.rand(labels.shape, generator=g) < 0.05] = IGNORE  # ... and scattered void pixels
        self.register_buffer("labels", labels)
        onehot = F.one_hot(torch.where(labels == IGNORE, 0, labels), K).permute(0, 3, 1, 2).float()
        self.inputs, self.heads = {}, nn.ModuleDict()
        #   name: (input channels, output channels, grid, weight gain, label signal in the input)
        spec = {
            "student_logits": (64, K, (32, 40), 2.0, 3.0),
            "teacher_logits": (128, K, (16, 20), 3.0, 4.0),
            "student_feature": (96, 256, (16, 20), 1.0, 0.0),  # the linguistic / main visual pair
            "teacher_feature": (96, 128, (8, 10), 1.0, 0.0),
            "student_stage": (32, 64, (32, 40), 1.0, 0.0),  # a shallower stage pair
            "teacher_stage": (32, 64, (32, 40), 1.0, 0.0),
            # for the internal checks: a projected student map (teacher channels) and a text-space one (D)
            "student_projected": (96, 128, (16, 20), 1.0, 0.0),
            "student_text": (96, D, (16, 20), 1.0, 0.0),
        }
        for name, (cin, cout, size, gain, signal) in spec.items():
            x = torch.randn(B, cin, *size, generator=g)
            x[:, :K] += signal * F.interpolate(onehot, size=size, mode="bilinear", antialias=True)
            conv = nn.Conv2d(cin, cout, 1)
            with torch.no_grad():
                conv.weight.normal_(0.0, gain / math.sqrt(cin), generator=g)
                conv.bias.normal_(0.0, 0.1, generator=g)
                if signal:
                    conv.weight[:, :K, 0, 0] += gain * torch.eye(K)
            self.inputs[name] = x
            self.heads[name] = conv
        # class-name embeddings are close to each other (CLIP's mean cosine is about 0.8): a shared direction
        e = torch.randn(K, D, generator=g) + 2.0 * torch.randn(1, D, generator=g)
        self.register_buffer("text_embeddings", F.normalize(e, dim=1))
        for name in spec:
            if name.startswith("teacher"):
                self.heads[name].requires_grad_(False)

    def outputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, conv in self.heads.items():
            with torch.set_grad_enabled(not name.startswith("teacher")):  # the teacher runs under no_grad
                out[name] = conv(self.inputs[name])
        return out


def _evaluate(scene: Scene, loss: Callable, bf16: bool, module: nn.Module | None = None):
    """``(terms, gradient)``: the loss's terms (a dict; a single value is ``{"loss": value}``) computed with the
    stand-in model and the loss under autocast when ``bf16``, and the flattened gradient of ``terms["loss"]``
    with respect to every student-side parameter (the scene's student heads and the loss module's projectors)."""
    params = [p for p in scene.parameters() if p.requires_grad]
    params += [] if module is None else [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with _precision(bf16):
        out = scene.outputs()
        dtypes = {name: t.dtype for name, t in out.items()}
        terms = loss(out)
    terms = terms if isinstance(terms, dict) else {"loss": terms}
    expected = torch.bfloat16 if bf16 else torch.float32
    assert all(d == expected for d in dtypes.values()), dtypes  # the model side really ran in bf16
    terms["loss"].backward()
    grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    return {k: v.detach() for k, v in terms.items()}, grad


def _assert_agree(name: str, scene: Scene, loss: Callable, module: nn.Module | None = None) -> None:
    ref, ref_grad = _evaluate(scene, loss, False, module)
    got, got_grad = _evaluate(scene, loss, True, module)
    assert set(got) == set(ref), name
    for term, value in got.items():
        assert value.dtype == torch.float32, (name, term, value.dtype)
        assert value.dim() == 0 and torch.isfinite(value), (name, term, value)
        expected = ref[term]
        assert abs(value.item() - expected.item()) <= RTOL * abs(expected.item()), (
            name, term, value.item(), expected.item())
    assert torch.isfinite(got_grad).all(), name
    assert got_grad.abs().sum() > 0, name
    cos = F.cosine_similarity(got_grad, ref_grad, dim=0).item()
    assert cos >= GRAD_COS, (name, cos)


# ------------------------------------------------------------------------------------------ pure functions

def _conv(cin: int, cout: int, seed: int) -> nn.Conv2d:
    """A 1x1 projector with seeded default initialisation (the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(cin, cout, 1)


def _narrow_projector() -> nn.Conv2d:
    """A text projector that does not widen (256 -> 64): :func:`project_pixel_text_logits` then projects with
    a plain matrix product (the path every accelerator takes), not through the projector's QR factors."""
    return _conv(256, 64, 5)


def _wide_projector() -> nn.Conv2d:
    return _conv(256, D, 6)


def _visual_projector() -> nn.Conv2d:
    return _conv(256, 128, 7)


#: name -> the loss, a function of the scene (its labels and embeddings) and of the model's outputs
FUNCTIONS: dict[str, Callable] = {
    "cross_entropy": lambda s, o: cross_entropy(o["student_logits"], s.labels),
    "kd": lambda s, o: kd_loss(o["student_logits"], o["teacher_logits"], s.labels),
    "kd_T4_no_labels": lambda s, o: kd_loss(o["student_logits"], o["teacher_logits"], None, temperature=4.0),
    "cwd": lambda s, o: cwd_loss(o["student_logits"], o["teacher_logits"], tau=4.0),
    "dist": lambda s, o: dist_loss(o["student_logits"], o["teacher_logits"], s.labels),
    "dkd": lambda s, o: dkd_loss(o["student_logits"], o["teacher_logits"], s.labels),
    "pdd": lambda s, o: pdd_loss(o["student_logits"], o["teacher_logits"], s.labels, alpha=0.5, beta=0.5),
    "pdd_T2_balanced": lambda s, o: pdd_loss(o["student_logits"], o["teacher_logits"], s.labels, temperature=2.0,
                                             class_balance=True, class_balance_power=0.5),
    "pdd_and_ce": lambda s, o: dict(zip(("loss", "ce"), pdd_loss_and_cross_entropy(
        o["student_logits"], o["teacher_logits"], s.labels))),
    "vlfd_relation": lambda s, o: vlfd_relation_loss(o["student_feature"], o["teacher_feature"]),
}
#: losses that read a projected feature: (the loss, the projector whose output it reads)
PROJECTED: dict[str, tuple[Callable, Callable[[], nn.Conv2d]]] = {
    "vlfd_global": (lambda s, o, p: vlfd_global_loss(p(o["student_feature"]), o["teacher_feature"]),
                    _visual_projector),
    "vlfd_linguistic": (lambda s, o, p: vlfd_linguistic_loss(p(o["student_feature"]), o["teacher_logits"], s.labels,
                                                             s.text_embeddings), _wide_projector),
    "vlfd_linguistic_from_scores_wide": (
        lambda s, o, p: vlfd_linguistic_loss_from_scores(
            project_pixel_text_logits(o["student_feature"], p, s.text_embeddings), o["teacher_logits"], s.labels,
            s.text_embeddings, class_balance=True, class_balance_power=0.5), _wide_projector),
    "vlfd_linguistic_from_scores_narrow": (
        lambda s, o, p: vlfd_linguistic_loss_from_scores(
            project_pixel_text_logits(o["student_feature"], p, s.text_embeddings[:, :64]), o["teacher_logits"],
            s.labels, s.text_embeddings[:, :64], classes=torch.tensor([True] * (K - 2) + [False] * 2)),
        _narrow_projector),
}


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene()


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_function_agrees_with_float32(scene, name):
    _assert_agree(name, scene, lambda out: FUNCTIONS[name](scene, out))


@pytest.mark.parametrize("name", list(PROJECTED))
def test_projected_feature_loss_agrees_with_float32(scene, name):
    loss, make_projector = PROJECTED[name]
    projector = make_projector()
    _assert_agree(name, scene, lambda out: loss(scene, out, projector), projector)


#: the pure functions on the same bf16 tensors: (loss of the named scene outputs, their names)
INTERNAL: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "cross_entropy": (lambda s, zs: cross_entropy(zs, s.labels), ("student_logits",)),
    "kd": (lambda s, zs, zt: kd_loss(zs, zt, s.labels), ("student_logits", "teacher_logits")),
    "cwd": (lambda s, zs, zt: cwd_loss(zs, zt, tau=4.0), ("student_logits", "teacher_logits")),
    "dist": (lambda s, zs, zt: dist_loss(zs, zt, s.labels), ("student_logits", "teacher_logits")),
    "dkd": (lambda s, zs, zt: dkd_loss(zs, zt, s.labels), ("student_logits", "teacher_logits")),
    "pdd": (lambda s, zs, zt: pdd_loss(zs, zt, s.labels, temperature=2.0, class_balance=True),
            ("student_logits", "teacher_logits")),
    "pdd_and_ce": (lambda s, zs, zt: sum(pdd_loss_and_cross_entropy(zs, zt, s.labels)),
                   ("student_logits", "teacher_logits")),
    "vlfd_global": (lambda s, fs, ft: vlfd_global_loss(fs, ft), ("student_projected", "teacher_feature")),
    "vlfd_relation": (lambda s, fs, ft: vlfd_relation_loss(fs, ft), ("student_feature", "teacher_feature")),
    "vlfd_linguistic": (lambda s, fs, zt: vlfd_linguistic_loss(fs, zt, s.labels, s.text_embeddings),
                        ("student_text", "teacher_logits")),
}


@pytest.mark.parametrize("name", list(INTERNAL))
def test_function_computes_in_float32(scene, name):
    """The same bf16 values as float32 outside autocast and as bf16 under it: the same number (INTERNAL_RTOL)."""
    loss, names = INTERNAL[name]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = scene.outputs()
    inputs = [out[n] for n in names]
    assert all(t.dtype == torch.bfloat16 for t in inputs)
    with torch.autocast("cpu", enabled=False):
        ref = loss(scene, *[t.float() for t in inputs])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(scene, *inputs)
    assert got.dtype == torch.float32 and ref.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= INTERNAL_RTOL * abs(ref.item()), (name, got.item(), ref.item())


# ------------------------------------------------------------------------------------------ loss modules

def _paper_arguments(**overrides) -> DistillationArguments:
    names = {f.name for f in dataclasses.fields(DistillationArguments)}
    values = {k: v for k, v in recipe_values("paper").items() if k in names}
    return DistillationArguments(**{**values, **overrides})


#: method cases: name -> DistillationArguments
METHODS = {
    "none": DistillationArguments(method="none"),
    "kd": DistillationArguments(method="kd"),
    "cwd": DistillationArguments(method="cwd"),
    "dist": DistillationArguments(method="dist"),
    "dkd": DistillationArguments(method="dkd"),
    "c2vkd": DistillationArguments(method="c2vkd"),  # the product's default: class balance, exits, channel term
    "c2vkd-stage-guidance": DistillationArguments(method="c2vkd", stage_weight=0.1),
    "c2vkd-paper": _paper_arguments(),  # --recipe paper
    "c2vkd-paper-T2": _paper_arguments(pdd_temperature=2.0),  # PDD and CE apart (not a by-product at T != 1)
}


def _module_for(scene: Scene, args: DistillationArguments, text_head: bool = False):
    """The loss module as :func:`~c2vkd_hf.jobs.setup_distillation` builds it: C2VKD's feature pair is the student
    feature (256 channels) with the teacher feature (128), its stage pairs the shallow pair and that one; with
    ``text_head`` the linguistic projector is the text head's (whose pixel-text logits the trainer passes in)."""
    if args.method != "c2vkd":
        return build_loss_module(args, student_channels=[], teacher_channels=[], text_embeddings=None,
                                 num_classes=K), None
    projector = _conv(256, D, 8) if text_head else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)  # the module's projectors and exits
        module = build_loss_module(args, student_channels=[256], teacher_channels=[128],
                                   text_embeddings=scene.text_embeddings, stage_channels=([64, 256], [64, 128]),
                                   ling_projector=projector, num_classes=K)
    return module, projector


def _module_loss(scene: Scene, module: nn.Module, projector: nn.Conv2d | None):
    def loss(out):
        kwargs = {}
        features = None, None
        if getattr(module, "uses_features", False):
            teacher_stages = ([out["teacher_stage"], out["teacher_feature"]] if module.reads_teacher_stages else [])
            features = ([out["student_feature"], out["student_stage"], out["student_feature"]],
                        [out["teacher_feature"], *teacher_stages])
        if projector is not None:
            kwargs["student_text_logits"] = project_pixel_text_logits(out["student_feature"], projector,
                                                                      scene.text_embeddings, tau=module.ling_tau)
        return module(out["student_logits"], out["teacher_logits"], scene.labels, *features, **kwargs)
    return loss


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_module_agrees_with_float32(scene, name):
    module, projector = _module_for(scene, METHODS[name])
    if name.startswith("c2vkd"):
        expected = {"ce", "pdd", "glob", "rel", "ling"}
        assert expected <= set(module.weights), module.weights  # every C2VKD term is exercised
    _assert_agree(name, scene, _module_loss(scene, module, projector), module)


def test_c2vkd_with_text_head_logits_agrees_with_float32(scene):
    """C2VKD's default with the text head: the linguistic term reads the head's pixel-text logits."""
    module, projector = _module_for(scene, DistillationArguments(method="c2vkd"), text_head=True)
    assert module.ling_projector is projector
    holder = nn.ModuleList([module, projector])
    _assert_agree("c2vkd-text-head", scene, _module_loss(scene, module, projector), holder)


# ------------------------------------------------------------------------------------------ --bf16 on a CPU

def test_bf16_on_a_cpu_is_honoured_with_use_cpu(tmp_path):
    """``--bf16 true --use_cpu true`` parses into bf16 training arguments on any machine, and a two-step run
    with them trains under CPU autocast: the student's logits are bf16, every logged loss term is finite."""
    from c2vkd_hf.cli.distill import parse_args
    from tiny import c2vkd_model, make_trainer, tensor_dataset, tiny_student, tiny_teacher

    _, _, training, _ = parse_args(["--output_dir", str(tmp_path / "parsed"), "--bf16", "true", "--use_cpu", "true"])
    assert training.bf16 and training.use_cpu and training.device.type == "cpu"

    student = tiny_student()
    seen = []
    student.register_forward_hook(lambda m, i, o: seen.append(o.logits.dtype))
    model = c2vkd_model(student, tiny_teacher())
    trainer = make_trainer(str(tmp_path / "run"), model, tiny_teacher(), tensor_dataset(ignore=True), bf16=True,
                           per_device_train_batch_size=4)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    logged = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert len(logged) == 2
    for entry in logged:
        assert all(math.isfinite(v) for k, v in entry.items() if k.startswith("loss")), entry


@pytest.mark.skipif(torch.cuda.is_available(), reason="half precision is accepted where there is a GPU")
@pytest.mark.parametrize("values", [{"bf16": "true"}, {"bf16": True, "use_cpu": False}, {"fp16": "true"},
                                    {"fp16": True, "use_cpu": True}])
def test_half_precision_without_a_gpu_is_refused_in_one_line(values):
    """Without an accelerator, bf16 without ``--use_cpu`` and fp16 at all are our own one-line error (the
    command-line form of the first is in tests/test_scripts.py)."""
    from c2vkd_hf.validation import UserInputError, check_mixed_precision

    flag = "bf16" if "bf16" in values else "fp16"
    with pytest.raises(UserInputError) as error:
        check_mixed_precision(values)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--{flag} true needs a GPU") and "--use_cpu true" in message
    check_mixed_precision({"bf16": "true", "use_cpu": "true"})  # and the honoured form passes
