"""Tests of c2vkd_hf.losses: hand-computed values, invariances, gradients, precision, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiny import c2vkd_loss, make_loss
from hypothesis import given, settings
from hypothesis import strategies as st

from c2vkd_hf.config import IGNORE_INDEX
from c2vkd_hf.losses import (
    C2VKDLoss,
    available_losses,
    cross_entropy,
    cwd_loss,
    dist_loss,
    dkd_loss,
    get_loss,
    kd_loss,
    pdd_loss,
    pixel_text_logits,
    register_loss,
    vlfd_global_loss,
    vlfd_linguistic_loss,
    vlfd_relation_loss,
)

LN3 = math.log(3.0)


def logits(*values):
    """(1, K, 1, 1) tensor from K numbers."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def np_softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def np_kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(np.sum(p * np.log(p / q)))


def label(*values, w=None):
    t = torch.tensor(values, dtype=torch.long)
    return t.view(1, 1, -1) if w is None else t.view(1, -1, w)


# ---------------------------------------------------------------- hand-computed values


def test_cross_entropy_hand_value_and_ignore():
    z = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2): pixel0 (1, 0), pixel1 (0, 2)
    y = label(0, IGNORE_INDEX)
    assert cross_entropy(z, y).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert cross_entropy(z, label(IGNORE_INDEX, IGNORE_INDEX)).item() == 0.0


def test_kd_hand_value():
    s, t = logits(0.0, 0.0), logits(LN3, 0.0)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, label(0)).item() == pytest.approx(expected, rel=1e-5)
    # T = 2: teacher softmax(ln3/2, 0) = (sqrt3, 1) / (sqrt3 + 1), times T^2
    pt = np.array([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    assert kd_loss(s, t, label(1), temperature=2.0).item() == pytest.approx(4 * np_kl(pt, [0.5, 0.5]), rel=1e-5)
    # labels None: every pixel counts, same value here
    assert kd_loss(s, t, None).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("g,alpha,beta,temp", [(0.5, 1.0, 2.0, 1.0), (0.0, 0.5, 0.5, 1.0), (1.0, 1.0, 1.0, 2.0), (0.3, 0.7, 0.2, 3.0)])
def test_pdd_hand_value(g, alpha, beta, temp):
    s, t, y = [1.0, 0.0, -1.0], [0.0, 2.0, 1.0], 0
    ps, pt = np_softmax(np.array(s) / temp), np_softmax(np.array(t) / temp)
    b_s = np.array([ps[y], 1 - ps[y]])
    q = (1 - g) * np.array([pt[y], 1 - pt[y]]) + g * np.array([1.0, 0.0])
    tc = sum(qi * math.log(qi / bi) for qi, bi in zip(q, b_s) if qi > 0)
    nc = np_kl(np_softmax(np.array(t[1:]) / temp), np_softmax(np.array(s[1:]) / temp))
    expected = temp**2 * (alpha * tc + beta * nc)
    got = pdd_loss(logits(*s), logits(*t), label(y), alpha=alpha, beta=beta, temperature=temp, label_weight=g)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dkd_equals_pdd_without_label_correction():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 6, 8)
    y = torch.randint(0, 5, (2, 6, 8))
    y[0, :2] = IGNORE_INDEX
    for a, b, temp in [(0.5, 0.5, 1.0), (1.0, 8.0, 4.0), (0.0, 1.0, 0.5)]:
        d = dkd_loss(s, t, y, alpha=a, beta=b, temperature=temp)
        p = pdd_loss(s, t, y, alpha=a, beta=b, temperature=temp, label_weight=0.0)
        assert d.item() == pytest.approx(p.item(), rel=1e-6, abs=1e-8)
    assert dkd_loss(s, t, y).item() == pytest.approx(pdd_loss(s, t, y, alpha=0.5, beta=0.5, label_weight=0.0).item())


def test_cwd_hand_value():
    # channel 0 differs (teacher softmax over positions = (.75, .25) at tau 4), channel 1 identical
    s = torch.tensor([[[[0.0, 0.0]], [[1.0, 2.0]]]])
    t = torch.tensor([[[[4 * LN3, 0.0]], [[1.0, 2.0]]]])
    expected = 16 * np_kl([0.75, 0.25], [0.5, 0.5]) / 2  # tau^2 * mean over (batch, channel)
    assert cwd_loss(s, t, tau=4.0).item() == pytest.approx(expected, rel=1e-5)
    # teacher on a finer grid is resized to the student's grid: constant maps stay constant
    assert cwd_loss(s[..., :1], torch.zeros(1, 2, 4, 4)).item() == pytest.approx(0.0, abs=1e-7)


def test_cwd_channel_weights_keep_the_plain_normalisation():
    """L = tau^2 / (B K) sum w[b, k] KL_bk: all-ones weights are the plain mean; a weight of 0 on the only
    differing map (hand value above) leaves 0; weight 1 on it alone keeps its full contribution."""
    s = torch.tensor([[[[0.0, 0.0]], [[1.0, 2.0]]]])
    t = torch.tensor([[[[4 * LN3, 0.0]], [[1.0, 2.0]]]])
    expected = 16 * np_kl([0.75, 0.25], [0.5, 0.5]) / 2
    assert cwd_loss(s, t, channel_weights=torch.ones(1, 2)).item() == pytest.approx(expected, rel=1e-5)
    assert cwd_loss(s, t, channel_weights=torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert cwd_loss(s, t, channel_weights=torch.tensor([[1.0, 0.0]])).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="channel_weights must have shape"):
        cwd_loss(s, t, channel_weights=torch.ones(2))


def test_dist_hand_value():
    s = torch.tensor([[[[1.0, 0.0, 0.5]], [[0.0, 1.0, 0.2]], [[-1.0, 0.5, 0.0]]]])  # (1, 3, 1, 3)
    t = torch.tensor([[[[2.0, -1.0, 9.0]], [[0.5, 0.0, 9.0]], [[0.0, 1.5, 9.0]]]])
    y = label(0, 2, IGNORE_INDEX)
    ys = np.stack([np_softmax(s[0, :, 0, i].numpy()) for i in range(2)])  # (pixels, classes)
    yt = np.stack([np_softmax(t[0, :, 0, i].numpy()) for i in range(2)])
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(2)])
    intra = 1 - np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(3)])
    assert dist_loss(s, t, y).item() == pytest.approx(inter + intra, rel=1e-5)
    assert dist_loss(s, t, y, beta=2.0, gamma=0.5).item() == pytest.approx(2 * inter + 0.5 * intra, rel=1e-5)


def test_vlfd_global_hand_value():
    fs = torch.tensor([[[[0.0, 1.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2): position 1 identical
    ft = torch.tensor([[[[LN3, 1.0]], [[0.0, 2.0]]]])
    expected = np_kl([0.75, 0.25], [0.5, 0.5]) / 2  # summed over channels, mean over positions
    assert vlfd_global_loss(fs, ft, tau=1.0).item() == pytest.approx(expected, rel=1e-5)
    ft2 = torch.tensor([[[[2 * LN3, 1.0]], [[0.0, 2.0]]]])
    assert vlfd_global_loss(fs, ft2, tau=2.0).item() == pytest.approx(4 * expected, rel=1e-5)


def test_vlfd_relation_hand_value():
    a = np.array([[1.0, 2.0, 4.0], [0.0, 1.0, -1.0], [2.0, 2.0, 3.0]])  # (positions, channels)
    b = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0], [1.0, 3.0, 2.0]])

    def corr(x):
        x = x - x.mean(axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    expected = float(np.mean((corr(a) - corr(b)) ** 2))
    fs = torch.tensor(a.T, dtype=torch.float32).view(1, 3, 1, 3)
    ft = torch.tensor(b.T, dtype=torch.float32).view(1, 3, 1, 3)
    assert vlfd_relation_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    # per-position offset and scale do not change correlations; channel counts may differ
    ft_wide = torch.cat([fs * 3 + 1, fs * 3 + 1], dim=1)
    assert vlfd_relation_loss(fs, ft_wide).item() == pytest.approx(0.0, abs=1e-6)


def test_vlfd_linguistic_hand_value():
    tau, g = 0.5, 0.5
    feat = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)  # D = 2
    emb = torch.eye(2)  # K = 2
    t = logits(LN3, 0.0)  # p_t = (.75, .25)
    u = np.array([3.0, 1.0]) / math.sqrt(10)
    r = (1 - g) * np.array([0.75, 0.25]) + g * np.array([0.0, 1.0])
    kl = np_kl(r, np_softmax(u / tau))
    v = r / np.linalg.norm(r)
    expected = kl + 1 - float(u @ v)
    got = vlfd_linguistic_loss(feat, t, label(1), emb, tau=tau, label_weight=g)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # ignored label: no correction, r = p_t
    r0 = np.array([0.75, 0.25])
    expected0 = np_kl(r0, np_softmax(u / tau)) + 1 - float(u @ (r0 / np.linalg.norm(r0)))
    got0 = vlfd_linguistic_loss(feat, t, label(IGNORE_INDEX), emb, tau=tau, label_weight=g)
    assert got0.item() == pytest.approx(expected0, rel=1e-5, abs=1e-6)
    assert vlfd_linguistic_loss(feat, t, None, emb, tau=tau).item() == pytest.approx(expected0, rel=1e-5, abs=1e-6)
    s = pixel_text_logits(feat, emb * 5, tau=tau)  # embeddings normalised inside
    assert torch.allclose(s.flatten(), torch.tensor(u / tau, dtype=torch.float32))


# ---------------------------------------------------------------- zero when student == teacher


def test_zero_for_identical_inputs():
    torch.manual_seed(1)
    z = torch.randn(2, 4, 3, 5)
    y = torch.randint(0, 4, (2, 3, 5))
    assert kd_loss(z, z, y).item() == 0.0
    assert cwd_loss(z, z).item() == 0.0
    assert dkd_loss(z, z, y).item() == pytest.approx(0.0, abs=1e-7)
    assert pdd_loss(z, z, y, label_weight=0.0).item() == pytest.approx(0.0, abs=1e-7)
    assert pdd_loss(z, z, y).item() > 0  # label correction still pulls towards the label
    assert dist_loss(z, z, y).item() == pytest.approx(0.0, abs=1e-5)
    f = torch.randn(2, 6, 4, 4)
    assert vlfd_global_loss(f, f).item() == 0.0
    assert vlfd_relation_loss(f, f).item() == pytest.approx(0.0, abs=1e-10)


def test_global_zero_with_identity_projector():
    loss = c2vkd_loss(student_channels=[4], teacher_channels=[4], pdd_weight=0, rel_weight=0)
    with torch.no_grad():
        loss.visual_projectors[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        loss.visual_projectors[0].bias.zero_()
    f = torch.randn(1, 4, 3, 3)
    out = loss(torch.randn(1, 3, 3, 3), torch.randn(1, 3, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), [f], [f])
    assert out["glob"].item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- gradients


def _c2vkd_inputs(seed=0, k=4):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, k, 4, 4, generator=g, requires_grad=True)
    t = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    y = torch.randint(0, k, (2, 16, 16), generator=g)
    y[:, :3] = IGNORE_INDEX
    fs = [torch.randn(2, 6, 2, 2, generator=g, requires_grad=True), torch.randn(2, 5, 4, 4, generator=g, requires_grad=True)]
    ft = [torch.randn(2, 7, 4, 4, generator=g, requires_grad=True), torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)]
    emb = torch.randn(k, 8, generator=g, requires_grad=True)
    return s, t, y, fs, ft, emb


def test_gradients_reach_student_and_projectors_never_teacher():
    s, t, y, fs, ft, emb = _c2vkd_inputs()
    loss = c2vkd_loss(student_channels=[6, 5], teacher_channels=[7, 3], text_embeddings=emb, ling_feature_index=0)
    out = loss(s, t, y, fs, ft)
    assert set(out) == {"ce", "pdd", "glob", "rel", "ling", "loss"}
    out["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    assert t.grad is None and all(f.grad is None for f in ft)
    assert emb.grad is None and not loss.text_embeddings.requires_grad
    for p in loss.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t, y: kd_loss(s, t, y, temperature=2.0),
        lambda s, t, y: cwd_loss(s, t),
        lambda s, t, y: dist_loss(s, t, y),
        lambda s, t, y: dkd_loss(s, t, y),
        lambda s, t, y: pdd_loss(s, t, y),
    ],
    ids=["kd", "cwd", "dist", "dkd", "pdd"],
)
def test_logit_losses_grad_student_only(fn):
    s, t, y, *_ = _c2vkd_inputs(seed=3)
    out = fn(s, t, y)
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_linguistic_pure_function_no_grad_to_embeddings():
    s, t, y, fs, _, emb = _c2vkd_inputs(seed=4)
    feat = torch.randn(2, 8, 3, 3, requires_grad=True)
    vlfd_linguistic_loss(feat, t, y, emb).backward()
    assert feat.grad is not None and emb.grad is None and t.grad is None


# ---------------------------------------------------------------- ignore index


@pytest.mark.parametrize("name", ["none", "kd", "dist", "dkd", "c2vkd"])
def test_ignored_pixels_do_not_contribute(name):
    torch.manual_seed(5)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    y[0, 1:3, 1:3] = IGNORE_INDEX
    y[1, :, 0] = IGNORE_INDEX
    ign = (y == IGNORE_INDEX)[:, None].expand_as(s)
    s2 = torch.where(ign, torch.randn_like(s) * 50, s)
    t2 = torch.where(ign, torch.randn_like(t) * 50, t)
    loss = make_loss(name)
    a, b = loss(s, t, y), loss(s2, t2, y)
    for key in a:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-6, abs=1e-7), key


def test_all_ignored_gives_zero_and_finite_grads():
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    t = torch.randn(1, 3, 2, 2)
    y = torch.full((1, 2, 2), IGNORE_INDEX)
    for name in ["none", "kd", "dist", "dkd", "c2vkd"]:
        s.grad = None
        out = make_loss(name)(s, t, y)
        assert out["loss"].item() == 0.0
        out["loss"].backward()
        assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- precision


def _all_modules(k, d=8):
    mods = {n: get_loss(n) for n in available_losses() if n != "c2vkd"}
    mods["c2vkd"] = c2vkd_loss(student_channels=[6], teacher_channels=[10], text_embeddings=torch.randn(k, d))
    return mods


def test_finite_under_bf16_autocast():
    torch.manual_seed(6)
    k = 4
    mods = _all_modules(k)
    s = torch.randn(2, k, 4, 4, requires_grad=True)
    t = torch.randn(2, k, 8, 8)
    y = torch.randint(0, k, (2, 16, 16))
    fs, ft = torch.randn(2, 6, 2, 2, requires_grad=True), torch.randn(2, 10, 4, 4)
    conv = torch.nn.Conv2d(k, k, 1)  # a model layer that autocast runs in bf16
    for name, mod in mods.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mod(conv(s), conv(t), y, [fs], [ft])
        assert out["loss"].dtype == torch.float32, name
        assert all(torch.isfinite(v) for v in out.values()), name
        out["loss"].backward()
        assert torch.isfinite(s.grad).all(), name
        assert (fs.grad is not None) == (name == "c2vkd"), name
        assert fs.grad is None or torch.isfinite(fs.grad).all(), name
        s.grad = fs.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_with_extreme_logits(dtype):
    torch.manual_seed(7)
    k = 5
    sign = lambda *shape: (torch.randint(0, 2, shape) * 2 - 1).float() * 1e4  # noqa: E731
    s = sign(2, k, 3, 3).to(dtype).requires_grad_(True)
    t = sign(2, k, 6, 6).to(dtype)
    y = torch.randint(0, k, (2, 6, 6))
    fs, ft = (sign(2, 6, 2, 2) / 10).to(dtype).requires_grad_(True), (sign(2, 10, 3, 3) / 10).to(dtype)
    for name, mod in _all_modules(k).items():
        mod = mod.to(dtype) if dtype != torch.float32 else mod
        out = mod(s, t, y, [fs], [ft])
        assert all(torch.isfinite(v) for v in out.values()), (name, {a: b.item() for a, b in out.items()})
        out["loss"].backward()
        assert torch.isfinite(s.grad).all(), name
        assert (fs.grad is not None) == (name == "c2vkd"), name
        assert fs.grad is None or torch.isfinite(fs.grad).all(), name
        s.grad = fs.grad = None


# ---------------------------------------------------------------- property test


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    k=st.integers(2, 5),
    hs=st.integers(1, 5), ws=st.integers(1, 5),
    ht=st.integers(1, 7), wt=st.integers(1, 7),
    hy=st.integers(1, 9), wy=st.integers(1, 9),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_finite_and_nonnegative(b, k, hs, ws, ht, wt, hy, wy, scale, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, k, hs, ws, generator=g) * scale).requires_grad_(True)
    t = torch.randn(b, k, ht, wt, generator=g) * scale
    y = torch.randint(0, k, (b, hy, wy), generator=g)
    y[torch.rand(b, hy, wy, generator=g) < ignore_frac] = IGNORE_INDEX
    fs = (torch.randn(b, 3, hs, ws, generator=g) * scale).requires_grad_(True)
    ft = torch.randn(b, 4, ht, wt, generator=g) * scale
    emb = torch.randn(k, 6, generator=g)
    values = {
        "ce": cross_entropy(s, y),
        "kd": kd_loss(s, t, y, temperature=2.0),
        "cwd": cwd_loss(s, t),
        "dist": dist_loss(s, t, y),
        "dkd": dkd_loss(s, t, y),
        "pdd": pdd_loss(s, t, y),
        "glob": vlfd_global_loss(torch.cat([fs, fs[:, :1]], 1), ft),
        "rel": vlfd_relation_loss(fs, ft, grid=2),
        "ling": vlfd_linguistic_loss(torch.cat([fs, fs], 1), t, y, emb),
    }
    total = 0
    for name, v in values.items():
        assert v.dim() == 0 and torch.isfinite(v), name
        assert v.item() >= -1e-5, (name, v.item())
        total = total + v
    total.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(fs.grad).all()


# ---------------------------------------------------------------- registry and modules

EXPECTED_TERMS = {
    "none": {"ce"},
    "kd": {"ce", "kd"},
    "cwd": {"ce", "cwd"},
    "dist": {"ce", "dist"},
    "dkd": {"ce", "dkd"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_get_loss_peer_terms(name):
    mod = make_loss(name)
    s, t, y, *_ = _c2vkd_inputs(seed=8)
    out = mod(s, None if name == "none" else t, y)
    assert set(out) == EXPECTED_TERMS[name] | {"loss"}
    assert set(mod.weights) == EXPECTED_TERMS[name]
    expected = sum(mod.weights[k] * out[k] for k in mod.weights)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_registry_names_and_unknown():
    assert set(available_losses()) >= {"none", "kd", "cwd", "dist", "dkd", "c2vkd"}
    with pytest.raises(ValueError, match="valid names: .*c2vkd.*cwd"):
        get_loss("fitnet")
    assert type(get_loss(" KD ")).__name__ == "KDLoss"


def test_register_custom_loss():
    from c2vkd_hf.losses import DistillationLoss

    @register_loss("test-ce-only")
    class _Custom(DistillationLoss):
        requires_teacher = False

    out = get_loss("test-ce-only", ce_weight=2.0)(torch.randn(1, 2, 2, 2), None, torch.zeros(1, 2, 2, dtype=torch.long))
    assert out["loss"].item() == pytest.approx(2 * out["ce"].item())


def test_published_recipes_and_overrides():
    assert get_loss("kd").weights == {"ce": 1.0, "kd": 1.0} and get_loss("kd").temperature == 1.0
    cwd = get_loss("cwd")
    assert cwd.weights["cwd"] == 3.0 and cwd.tau == 4.0
    d = get_loss("dist")
    assert (d.weights["dist"], d.beta, d.gamma, d.tau) == (1.0, 1.0, 1.0, 1.0)
    k = get_loss("dkd")
    assert (k.weights["dkd"], k.alpha, k.beta, k.temperature) == (1.0, 0.5, 0.5, 1.0)
    assert get_loss("cwd", kd_weight=None, temperature=None).weights["cwd"] == 3.0
    assert get_loss("cwd", kd_weight=2.0, temperature=1.0).tau == 1.0
    assert get_loss("kd", tau=4.0, ce_weight=0.5).weights == {"ce": 0.5, "kd": 1.0}
    assert set(get_loss("kd", kd_weight=0.0).weights) == {"ce"}
    with pytest.raises(ValueError, match="aliases"):
        get_loss("kd", temperature=1.0, tau=2.0)
    with pytest.raises(TypeError):
        get_loss("kd", pdd_weight=1.0)


def test_c2vkd_terms_and_buffers():
    s, t, y, fs, ft, emb = _c2vkd_inputs(seed=9)
    no_text = c2vkd_loss(student_channels=[6, 5], teacher_channels=[7, 3])
    out = no_text(s, t, y, fs, ft)
    assert set(out) == {"ce", "pdd", "glob", "rel", "loss"} and no_text.ling_projector is None
    logits_only = c2vkd_loss()
    assert set(logits_only(s, t, y)) == {"ce", "pdd", "loss"}
    with_text = c2vkd_loss(student_channels=6, teacher_channels=7, text_embeddings=emb * 3, glob_weight=2.0)
    assert with_text.weights == {"ce": 1.0, "pdd": 1.0, "glob": 2.0, "rel": 1.0, "ling": 1.0}
    out = with_text(s, t, y, fs[0], ft[0])
    assert set(out) == {"ce", "pdd", "glob", "rel", "ling", "loss"}
    expected = sum(with_text.weights[k] * out[k] for k in with_text.weights)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(with_text.text_embeddings.norm(dim=1), torch.ones(4))
    assert not any("text" in k for k in with_text.state_dict())
    assert with_text.pixel_text_logits(fs[0]).shape == (2, 4, 2, 2)
    assert with_text.pixel_text_logits(fs[0], torch.randn(9, 8)).shape == (2, 9, 2, 2)
    off = c2vkd_loss(student_channels=6, teacher_channels=7, text_embeddings=emb, ling_weight=0, glob_weight=0)
    assert off.ling_projector is None and off.visual_projectors is None and len(list(off.parameters())) == 0
    assert set(off(s, t, y, fs[0], ft[0])) == {"ce", "pdd", "rel", "loss"}


def test_c2vkd_feature_errors():
    s, t, y, fs, ft, emb = _c2vkd_inputs(seed=10)
    loss = c2vkd_loss(student_channels=[6], teacher_channels=[7])
    with pytest.raises(ValueError, match="needs student_features"):
        loss(s, t, y)
    with pytest.raises(ValueError, match="expected 1 student and 1 teacher feature"):
        loss(s, t, y, fs, ft)
    with pytest.raises(ValueError, match="student feature 0"):
        loss(s, t, y, [fs[1]], [ft[0]])
    with pytest.raises(ValueError, match="needs teacher_logits"):
        loss(s, None, y, fs[:1], ft[:1])
    with pytest.raises(ValueError, match="one entry each per pair"):
        c2vkd_loss(student_channels=[6, 5], teacher_channels=[7])
    with pytest.raises(ValueError, match="student_channels"):
        c2vkd_loss(text_embeddings=emb)
    with pytest.raises(ValueError, match="ling_feature_index"):
        c2vkd_loss(student_channels=[6], teacher_channels=[7], text_embeddings=emb, ling_feature_index=3)


@pytest.mark.parametrize(
    "name,kwargs,param",
    [
        ("c2vkd", {"pdd_weight": -1.0}, "pdd_weight"),
        ("c2vkd", {"glob_weight": -0.1}, "glob_weight"),
        ("c2vkd", {"rel_weight": float("nan")}, "rel_weight"),
        ("c2vkd", {"ling_weight": -1}, "ling_weight"),
        ("c2vkd", {"ce_weight": -1}, "ce_weight"),
        ("c2vkd", {"pdd_temperature": 0.0}, "pdd_temperature"),
        ("c2vkd", {"glob_tau": -1.0}, "glob_tau"),
        ("c2vkd", {"ling_tau": 0}, "ling_tau"),
        ("c2vkd", {"label_weight": 1.5}, "label_weight"),
        ("c2vkd", {"pdd_alpha": -1}, "pdd_alpha"),
        ("c2vkd", {"rel_grid": 0}, "rel_grid"),
        ("kd", {"kd_weight": -1.0}, "kd_weight"),
        ("kd", {"temperature": 0.0}, "temperature"),
        ("cwd", {"tau": -4.0}, "temperature"),
        ("dist", {"gamma": -1.0}, "gamma"),
        ("dkd", {"alpha": -0.5}, "alpha"),
        ("none", {"ce_weight": -2.0}, "ce_weight"),
    ],
)
def test_invalid_constants_raise(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        make_loss(name, **kwargs)


def test_pure_function_validation():
    z, y = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="label_weight"):
        pdd_loss(z, z, y, label_weight=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(z, z, y, temperature=0)
    with pytest.raises(ValueError, match="tau"):
        cwd_loss(z, z, tau=0)
    with pytest.raises(ValueError, match="tau"):
        vlfd_global_loss(z, z, tau=-1)
    with pytest.raises(ValueError, match="grid"):
        vlfd_relation_loss(z, z, grid=0)
    with pytest.raises(ValueError, match="beta"):
        dist_loss(z, z, y, beta=-1)


def test_weight_schedules_by_hand():
    """s(p): constant 1; linear max(0, 1 - p/end); cosine (1 + cos(pi min(p/end, 1))) / 2."""
    from c2vkd_hf.losses.schedule import parse_schedules, schedule_factor

    assert [schedule_factor(("linear", 0.5), p) for p in (0.0, 0.25, 0.5, 0.9)] == [1.0, 0.5, 0.0, 0.0]
    assert schedule_factor(("cosine", 1.0), 0.5) == pytest.approx(0.5)
    assert schedule_factor(("cosine", 0.5), 0.75) == 0.0 and schedule_factor(None, 0.7) == 1.0
    assert parse_schedules("stage:linear:0.5, pdd:constant") == {"stage": ("linear", 0.5), "pdd": ("constant", 1.0)}
    for bad in ("stage:linear", "stage:exp:0.5", "stage:linear:0", "stage:linear:x", "stage:linear:0.5,stage:cosine:1"):
        with pytest.raises(ValueError):
            parse_schedules(bad)


def test_stage_guidance_term_and_its_decay():
    """C2VKD's stage term = mean over stage pairs of L_glob(Q_i F_s, F_t) + L_rel(F_s, F_t), added after
    the main pairs; with a linear schedule ending at half of training its weight halves at p = 0.25 and
    the term is gone (not computed, not in the total) from p = 0.5."""
    torch.manual_seed(0)
    loss = c2vkd_loss(student_channels=[6], teacher_channels=[7], stage_student_channels=[4, 5],
                     stage_teacher_channels=[3, 2], stage_weight=0.4, pdd_weight=0, glob_weight=0, rel_weight=0)
    loss.set_schedules({"stage": ("linear", 0.5), "kd": ("linear", 0.5)})  # a term it lacks is ignored
    assert set(loss.schedules) == {"stage"} and loss.reads_teacher_stages
    zs, zt, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    fs = [torch.randn(2, 6, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 2, 2)]
    ft = [torch.randn(2, 7, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)]
    expected = torch.stack([vlfd_global_loss(q(a), b) + vlfd_relation_loss(a, b)
                            for q, a, b in zip(loss.stage_projectors, fs[1:], ft[1:])]).mean()
    out = loss(zs, zt, y, fs, ft)
    torch.testing.assert_close(out["stage"], expected)
    torch.testing.assert_close(out["loss"], out["ce"] + 0.4 * expected)
    loss.progress = 0.25
    torch.testing.assert_close(loss(zs, zt, y, fs, ft)["loss"], out["ce"] + 0.2 * expected)
    loss.progress = 0.5
    late = loss(zs, zt, y, fs, ft)
    assert "stage" not in late and torch.equal(late["loss"], late["ce"])
    with pytest.raises(ValueError, match="one entry each per pair"):
        c2vkd_loss(stage_student_channels=[4], stage_teacher_channels=[3, 2], stage_weight=1)


def test_channel_term_is_cwd_on_the_logits_pdd_reads_and_ignores_per_class_offsets():
    """C2VKD's channel term = CWD's L_cwd(z_s, z_t, tau) added with its weight; it compares each class map's
    distribution over positions, so adding a constant per class map to the teacher (which changes every pixel's
    class distribution, hence PDD) leaves it unchanged; off by default."""
    from c2vkd_hf.losses.cwd import cwd_loss

    torch.manual_seed(0)
    zs, zt, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), torch.randint(0, 3, (2, 4, 4))
    loss = c2vkd_loss(channel_weight=3.0, channel_tau=2.0)
    out = loss(zs, zt, y)
    torch.testing.assert_close(out["channel"], cwd_loss(zs, zt, tau=2.0))
    torch.testing.assert_close(out["loss"], out["ce"] + out["pdd"] + 3.0 * out["channel"])
    shifted = loss(zs, zt + torch.tensor([5.0, -3.0, 0.0])[None, :, None, None], y)
    torch.testing.assert_close(shifted["channel"], out["channel"])
    assert not torch.allclose(shifted["pdd"], out["pdd"])
    assert "channel" not in c2vkd_loss()(zs, zt, y)
    loss.set_schedules({"channel": ("linear", 0.5)})  # decayed to 0: not computed, not reported
    loss.progress = 0.5
    assert "channel" not in loss(zs, zt, y)
    with pytest.raises(ValueError, match="channel_tau"):
        c2vkd_loss(channel_weight=1.0, channel_tau=0.0)


def test_class_balanced_weights_give_every_present_class_the_same_total():
    from c2vkd_hf.losses.common import class_balanced_weights

    labels = torch.tensor([[0, 0, 0, 0, 0, 0, 2, 255], [0, 0, 0, 0, 0, 0, 0, 2]])
    w = class_balanced_weights(labels, num_classes=4, ignore_index=255)
    assert w.shape == labels.shape and w[0, 7] == 0
    torch.testing.assert_close(w[labels == 0].sum(), torch.tensor(0.5))
    torch.testing.assert_close(w[labels == 2].sum(), torch.tensor(0.5))
    torch.testing.assert_close(w[0, 6], torch.tensor(0.25))  # 2 pixels of class 2 share half the weight
    assert class_balanced_weights(torch.full((2, 3), 255), 4, 255).sum() == 0


def test_class_balanced_pdd_and_linguistic_term_weigh_a_rare_class_up():
    # a pixel-wise loss that is large only on the rare class: the balanced mean gives it half the weight
    from c2vkd_hf.losses.pdd import pdd_loss, pdd_loss_and_cross_entropy
    from c2vkd_hf.losses.vlfd import vlfd_linguistic_loss_from_scores

    torch.manual_seed(0)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 1
    zt = torch.zeros(1, 3, 4, 4)
    zs = torch.zeros(1, 3, 4, 4)
    zt[0, 2, 0, 0] = 5.0  # the teacher disagrees with the student only at the rare pixel
    plain = pdd_loss(zs, zt, labels)
    balanced = pdd_loss(zs, zt, labels, class_balance=True)
    rare = pdd_loss(zs[..., :1, :1], zt[..., :1, :1], labels[:, :1, :1])
    common = pdd_loss(zs[..., 1:2, 1:2], zt[..., 1:2, 1:2], labels[:, 1:2, 1:2])  # the 15 others are alike
    assert rare > 2 * common
    torch.testing.assert_close(plain, (rare + 15 * common) / 16)
    torch.testing.assert_close(balanced, (rare + common) / 2)  # the rare pixel's weight: 1/16 -> 1/2
    # the cross-entropy by-product keeps the plain mean
    pdd_b, ce_b = pdd_loss_and_cross_entropy(zs, zt, labels, class_balance=True)
    _, ce = pdd_loss_and_cross_entropy(zs, zt, labels)
    torch.testing.assert_close(pdd_b, balanced)
    torch.testing.assert_close(ce_b, ce)
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    scores = torch.randn(1, 3, 4, 4)
    per_position_plain = vlfd_linguistic_loss_from_scores(scores, zt, labels, emb)
    bal = vlfd_linguistic_loss_from_scores(scores, zt, labels, emb, class_balance=True)
    assert not torch.allclose(bal, per_position_plain)
    # with one class everywhere the balanced mean is the plain mean
    same = torch.zeros(1, 4, 4, dtype=torch.long)
    torch.testing.assert_close(vlfd_linguistic_loss_from_scores(scores, zt, same, emb, class_balance=True),
                               vlfd_linguistic_loss_from_scores(scores, zt, same, emb))
    torch.testing.assert_close(pdd_loss(zs, zt, same, class_balance=True), pdd_loss(zs, zt, same))


def test_class_balance_power_interpolates_between_the_plain_and_the_balanced_mean():
    from c2vkd_hf.losses.common import class_balanced_weights

    labels = torch.tensor([[0] * 9 + [1]])  # 9 pixels of class 0, 1 of class 1
    plain = class_balanced_weights(labels, 2, 255, power=0.0)
    torch.testing.assert_close(plain, torch.full((1, 10), 0.1))
    half = class_balanced_weights(labels, 2, 255, power=0.5)
    # class k weighs n_k^(1 - p): 9^0.5 = 3 against 1^0.5 = 1
    torch.testing.assert_close(half[labels == 0].sum(), torch.tensor(0.75))
    torch.testing.assert_close(half[labels == 1].sum(), torch.tensor(0.25))
    full = class_balanced_weights(labels, 2, 255, power=1.0)
    torch.testing.assert_close(full[labels == 1].sum(), torch.tensor(0.5))


def test_c2vkd_from_the_default_flags_uses_half_way_class_balanced_means():
    """The product's C2VKD (flags at their defaults) weighs class k by n_k^(1 - 0.5) in PDD; --class_balance
    false gives the paper's plain pixel mean. Checked on the loss value of a batch with a rare class."""
    from c2vkd_hf.cli.distill import parse_args
    from c2vkd_hf.jobs.setup import build_loss_module
    from c2vkd_hf.losses.common import class_balanced_weights
    from c2vkd_hf.losses.pdd import pdd_loss

    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 1
    zs, zt = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    zt[0, 2, 0, 0] = 5.0
    per_pixel = torch.stack([pdd_loss(zs[..., i:i + 1, j:j + 1], zt[..., i:i + 1, j:j + 1], labels[:, i:i + 1, j:j + 1])
                             for i in range(4) for j in range(4)]).view(1, 4, 4)
    half = (class_balanced_weights(labels, 3, IGNORE_INDEX, power=0.5).view(1, 4, 4) * per_pixel).sum()

    def pdd_term(argv):
        dist_args = parse_args(["--output_dir", "unused", "--method", "c2vkd", *argv])[0]
        loss = build_loss_module(dist_args, student_channels=[], teacher_channels=[], text_embeddings=None)
        return pdd_loss(zs, zt, labels, class_balance=loss.class_balance, class_balance_power=loss.class_balance_power)

    torch.testing.assert_close(pdd_term([]), half)
    torch.testing.assert_close(pdd_term(["--class_balance", "false"]), per_pixel.mean())
    assert not torch.allclose(half, per_pixel.mean())


def test_stage_exits_teach_every_student_stage_the_teacher_logits_through_pdd():
    """L_exit = mean_i L_pdd(E_i F_s,i, z_t, y) over the stage pairs' student features (the teacher's stage
    features are not read); the exits get gradients, follow their schedule and need stage pairs and K."""
    from c2vkd_hf.losses.pdd import pdd_loss

    torch.manual_seed(0)
    loss = c2vkd_loss(student_channels=[6], teacher_channels=[7], stage_student_channels=[4, 5],
                     stage_teacher_channels=[3, 2], exit_weight=0.5, num_classes=3, pdd_weight=0, glob_weight=0,
                     rel_weight=0, class_balance=True, class_balance_power=0.5)
    assert "stage" not in loss.weights and loss.stage_projectors is None
    loss.set_schedules({"exit": ("linear", 0.5)})
    zs, zt, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))
    fs = [torch.randn(2, 6, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 5, 2, 2)]
    ft = [torch.randn(2, 7, 4, 4)]  # the feature pair's teacher map only: no term reads the teacher's stages
    assert not loss.reads_teacher_stages
    expected = torch.stack([pdd_loss(e(a), zt, y, class_balance=True, class_balance_power=0.5)
                            for e, a in zip(loss.exit_heads, fs[1:])]).mean()
    out = loss(zs, zt, y, fs, ft)
    torch.testing.assert_close(out["exit"], expected)
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * expected)
    out["loss"].backward()
    assert all(e.weight.grad.abs().sum() > 0 for e in loss.exit_heads)
    with pytest.raises(ValueError, match="expected 3 student and 1 teacher feature"):
        loss(zs, zt, y, fs, [ft[0], torch.randn(2, 3, 4, 4), torch.randn(2, 2, 2, 2)])
    loss.progress = 0.5
    assert "exit" not in loss(zs, zt, y, fs, ft)
    with pytest.raises(ValueError, match="needs stage pairs"):
        c2vkd_loss(exit_weight=1.0, num_classes=3)
    with pytest.raises(ValueError, match="needs num_classes"):
        c2vkd_loss(stage_student_channels=[4], stage_teacher_channels=[3], exit_weight=1.0)
