"""The fast C2VKD loss paths against straightforward float64 reference computations: values and gradients.

The references below are the formulas as written in the module docstrings, computed the plain way
(normalised ``D``-channel maps, rows of valid pixels, autograd everywhere) in float64; the library
computes the same numbers through rewritten expressions (closed-form backwards, the text projector
through its QR factorisation, the cross-entropy as a by-product of PDD, the linguistic term from the
text head's logits). Inputs include ignored pixels, large logit scales, temperatures, ``g`` in {0, 1}
and both memory layouts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from c2vkd_hf.config import IGNORE_INDEX
from c2vkd_hf.losses import (
    C2VKDLoss,
    cross_entropy,
    dkd_loss,
    pdd_loss,
    pdd_loss_and_cross_entropy,
    pixel_text_logits,
    project_pixel_text_logits,
    vlfd_global_loss,
    vlfd_linguistic_loss,
    vlfd_linguistic_loss_from_scores,
    vlfd_relation_loss,
)
from c2vkd_hf.losses import vlfd
from tiny import c2vkd_loss

EPS = 1e-6


# ------------------------------------------------------------------------------------ references (float64)
def ref_resize(x, size):
    size = tuple(int(v) for v in size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def ref_rows(labels, *maps, ignore_index=IGNORE_INDEX):
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    return flat[valid], [m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])[valid] for m in maps]


def ref_pdd(s, t, y, *, alpha=1.0, beta=1.0, temperature=1.0, g=0.5):
    """Per valid pixel: b = (p_y, 1 - p_y), q = (1 - g) b_t + g (1, 0), TC = KL(q || b_s),
    NC = KL(p_hat_t || p_hat_s) over the non-target classes; T^2 * mean(alpha TC + beta NC)."""
    size = y.shape[-2:]
    zs, zt = ref_resize(s.double(), size), ref_resize(t.detach().double(), size)
    target, (zs, zt) = ref_rows(y, zs, zt)
    if target.numel() == 0:
        return s.double().sum() * 0
    zs, zt = zs / temperature, zt / temperature
    mask = F.one_hot(target, zs.shape[1]).bool()

    def split(z):
        lse = torch.logsumexp(z, 1)
        lse_nt = torch.logsumexp(z.masked_fill(mask, -float("inf")), 1)
        log_hat = torch.where(mask, torch.zeros_like(z), z - lse_nt[:, None])
        return z.gather(1, target[:, None])[:, 0] - lse, lse_nt - lse, log_hat

    ls_t, ls_nt, ls_hat = split(zs)
    lt_t, lt_nt, lt_hat = split(zt)
    q_t = (1 - g) * lt_t.exp() + g
    q_nt = (1 - g) * lt_nt.exp()
    tc = torch.xlogy(q_t, q_t) - q_t * ls_t + torch.xlogy(q_nt, q_nt) - q_nt * ls_nt
    p_hat_t = torch.where(mask, torch.zeros_like(lt_hat), lt_hat.exp())
    nc = (p_hat_t * (lt_hat - ls_hat)).sum(1)
    return temperature**2 * (alpha * tc + beta * nc).mean()


def ref_ce(s, y):
    z = ref_resize(s.double(), y.shape[-2:])
    target, (rows,) = ref_rows(y, z)
    if target.numel() == 0:
        return s.double().sum() * 0
    return F.cross_entropy(rows, target)


def ref_global(fs, ft, tau=1.0):
    fs = ref_resize(fs.double(), ft.shape[-2:])
    log_ps = F.log_softmax(fs / tau, 1)
    log_pt = F.log_softmax(ft.detach().double() / tau, 1)
    return tau**2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


def ref_relation(fs, ft, grid=16):
    size = (min(grid, fs.shape[-2], ft.shape[-2]), min(grid, fs.shape[-1], ft.shape[-1]))

    def corr(f):
        x = F.adaptive_avg_pool2d(f.double(), size).flatten(2).transpose(1, 2)
        x = F.normalize(x - x.mean(2, keepdim=True), dim=2, eps=EPS)
        return x @ x.transpose(1, 2)

    return (corr(fs) - corr(ft.detach())).pow(2).mean()


def ref_scores(y, emb, tau):
    """S = normalise(y) E^T / tau with normalise = F.normalize (denominator max(|y|, eps))."""
    u = F.normalize(y.double(), dim=1, eps=EPS)
    e = F.normalize(emb.detach().double(), dim=1, eps=EPS)
    return torch.einsum("bdhw,kd->bkhw", u, e) / tau


def ref_project(x, conv):
    return F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double())


def ref_linguistic(y, t, labels, emb, *, tau=0.03, g=0.5):
    """KL(r || softmax(S)) + (1 - cos(u, normalise(r E))), means over the feature grid."""
    size = y.shape[-2:]
    k = emb.shape[0]
    u = F.normalize(y.double(), dim=1, eps=EPS)
    e = F.normalize(emb.detach().double(), dim=1, eps=EPS)
    log_q = F.log_softmax(torch.einsum("bdhw,kd->bkhw", u, e) / tau, 1)
    r = torch.softmax(ref_resize(t.detach().double(), size), 1)
    if labels is not None and g > 0:
        lab = labels.long() if tuple(labels.shape[-2:]) == tuple(size) else \
            F.interpolate(labels[:, None].double(), size=size, mode="nearest")[:, 0].long()
        valid = lab != IGNORE_INDEX
        onehot = F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), k).permute(0, 3, 1, 2).double()
        r = torch.where(valid[:, None], (1 - g) * r + g * onehot, r)
    v = F.normalize(torch.einsum("bkhw,kd->bdhw", r, e), dim=1, eps=EPS)
    kl = (torch.xlogy(r, r) - r * log_q).sum(1)
    return kl.mean() + (1 - (u * v).sum(1)).mean()


# ------------------------------------------------------------------------------------ helpers
def leaf(x, channels_last=False):
    x = x.detach().clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def grads(value, *tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


def close(got, want, *, rtol=2e-5, atol=1e-6):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def close_grads(got, want, *, rtol=1e-4, atol=1e-6):
    for a, b in zip(got, want):
        scale = max(float(b.abs().max()), 1.0) if b is not None else 1.0
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale)


def labels_with_void(b, h, w, k, frac, gen):
    y = torch.randint(0, k, (b, h, w), generator=gen)
    y[torch.rand(b, h, w, generator=gen) < frac] = IGNORE_INDEX
    return y


# ------------------------------------------------------------------------------------ PDD and CE
@pytest.mark.parametrize("k", [2, 5, 11])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 60.0])
@pytest.mark.parametrize("temperature,g,alpha,beta", [(1.0, 0.5, 1.0, 1.0), (2.0, 0.0, 0.5, 0.5),
                                                      (1.0, 1.0, 1.0, 2.0), (4.0, 0.3, 0.0, 1.0),
                                                      (1.0, 0.5, 1.0, 0.0)])
def test_pdd_matches_reference(k, scale, temperature, g, alpha, beta):
    gen = torch.Generator().manual_seed(k * 1000 + int(scale * 10))
    s = torch.randn(2, k, 5, 6, generator=gen) * scale
    t = torch.randn(2, k, 9, 11, generator=gen) * scale
    y = labels_with_void(2, 10, 12, k, 0.25, gen)
    for channels_last in (False, True):
        s_new, s_ref = leaf(s, channels_last), leaf(s)
        got = pdd_loss(s_new, t, y, alpha=alpha, beta=beta, temperature=temperature, label_weight=g)
        want = ref_pdd(s_ref, t, y, alpha=alpha, beta=beta, temperature=temperature, g=g)
        close(got, want, rtol=1e-5, atol=2e-6 * scale)
        close_grads(grads(got, s_new), grads(want, s_ref), atol=1e-5)
    s_new, s_ref = leaf(s), leaf(s)
    close(dkd_loss(s_new, t, y), ref_pdd(s_ref, t, y, alpha=0.5, beta=0.5, g=0.0), rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("frac", [0.0, 0.4, 1.0])
def test_pdd_and_cross_entropy_in_one_pass(frac):
    """The by-product cross-entropy equals the plain one; a weighted sum of both has the reference gradient."""
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(3, 11, 30, 40, generator=gen) * 3
    t = torch.randn(3, 11, 120, 160, generator=gen) * 3
    y = labels_with_void(3, 120, 160, 11, frac, gen)
    s_new, s_ref = leaf(s, channels_last=True), leaf(s)
    pdd, ce = pdd_loss_and_cross_entropy(s_new, t, y)
    close(ce, cross_entropy(s.clone(), y), rtol=1e-6, atol=1e-6)
    want_pdd, want_ce = ref_pdd(s_ref, t, y), ref_ce(s_ref, y)
    close(pdd, want_pdd, rtol=1e-5, atol=1e-6)
    close(ce, want_ce, rtol=1e-5, atol=1e-6)
    close_grads(grads(pdd + 0.7 * ce, s_new), grads(want_pdd + 0.7 * want_ce, s_ref))


def test_pdd_single_class_matches_reference():
    """K = 1 (degenerate: the target is the only class) keeps the row form's value and gradient."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(1, 1, 3, 3, generator=gen), torch.randn(1, 1, 3, 3, generator=gen)
    y = torch.zeros(1, 3, 3, dtype=torch.long)
    s_new = leaf(s)
    from c2vkd_hf.losses.common import mask_target
    # the row form with its finite mask (the reference above uses -inf, undefined for K = 1)
    zs, zt = s_new.reshape(-1, 1), t.reshape(-1, 1)
    target = y.reshape(-1)

    def split(z):
        lse = torch.logsumexp(z, 1)
        z_nt = mask_target(z, target)
        lse_nt = torch.logsumexp(z_nt, 1)
        return z.gather(1, target[:, None])[:, 0] - lse, lse_nt - lse, z_nt - lse_nt[:, None]

    ls = split(zs)
    with torch.no_grad():
        lt = split(zt)
    q_t, q_nt = 0.5 * lt[0].exp() + 0.5, 0.5 * lt[1].exp()
    tc = torch.xlogy(q_t, q_t) - q_t * ls[0] + torch.xlogy(q_nt, q_nt) - q_nt * ls[1]
    nc = (lt[2].exp() * (lt[2] - ls[2])).sum(1)
    old = (tc + nc).mean()
    s_new2 = leaf(s)
    got = pdd_loss(s_new2, t, y)
    close(got, old, atol=1e-6)
    close_grads(grads(got, s_new2), grads(old, s_new))


# ------------------------------------------------------------------------------------ VLFD visual terms
@pytest.mark.parametrize("student_cl,teacher_cl", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("grid", [(6, 8), (3, 4), (12, 16)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_global_matches_reference(student_cl, teacher_cl, grid, tau):
    gen = torch.Generator().manual_seed(11)
    fs = torch.randn(2, 7, 6, 8, generator=gen) * 3
    ft = torch.randn(2, 7, *grid, generator=gen) * 3
    ft = ft.contiguous(memory_format=torch.channels_last) if teacher_cl else ft
    a, b = leaf(fs, student_cl), leaf(fs)
    got, want = vlfd_global_loss(a, ft, tau=tau), ref_global(b, ft, tau=tau)
    close(got, want)
    close_grads(grads(got, a), grads(want, b))


def test_global_through_the_module_projector_matches_conv():
    """C2VKD's visual projector applied as a matrix product on rows equals the 1x1 convolution."""
    gen = torch.Generator().manual_seed(12)
    loss = c2vkd_loss(student_channels=[6], teacher_channels=[5], pdd_weight=0, rel_weight=0)
    proj = loss.visual_projectors[0]
    fs, ft = torch.randn(2, 6, 4, 5, generator=gen), torch.randn(2, 5, 8, 10, generator=gen)
    y = torch.randint(0, 3, (2, 8, 10), generator=gen)
    a, b = leaf(fs, channels_last=True), leaf(fs)
    got = loss(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 8, 10), y, [a], [ft])["glob"]
    want = ref_global(ref_project(b, proj), ft)
    close(got, want)
    close_grads(grads(got, a, proj.weight, proj.bias), grads(want, b, proj.weight, proj.bias))


@pytest.mark.parametrize("student_cl", [False, True])
@pytest.mark.parametrize("shape_s,shape_t,grid", [((5, 30, 40), (3, 30, 40), 16), ((4, 6, 7), (6, 12, 14), 4),
                                                  ((3, 2, 3), (2, 2, 3), 16)])
def test_relation_matches_reference(student_cl, shape_s, shape_t, grid):
    gen = torch.Generator().manual_seed(13)
    fs, ft = torch.randn(2, *shape_s, generator=gen), torch.randn(2, *shape_t, generator=gen)
    a, b = leaf(fs, student_cl), leaf(fs)
    got, want = vlfd_relation_loss(a, ft, grid=grid), ref_relation(b, ft, grid=grid)
    close(got, want)
    close_grads(grads(got, a), grads(want, b))


# ------------------------------------------------------------------------------------ text scores
def _projector(c, d, *, bias=True, rank=None, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, d, kernel_size=1, bias=bias)
    if rank is not None:  # a rank-deficient projector: QR with a singular R
        with torch.no_grad():
            u, v = torch.randn(d, rank), torch.randn(rank, c)
            conv.weight.copy_((u @ v / rank).view(d, c, 1, 1))
    return conv


@pytest.mark.parametrize("c,d,bias,rank", [(6, 10, True, None), (6, 10, False, None), (6, 10, True, 2),
                                           (10, 6, True, None), (8, 8, True, None)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_projected_pixel_text_logits_match_reference(c, d, bias, rank, channels_last):
    """S = normalise(P F) E^T / tau, through the QR path (D > C) or the rows path, values and gradients for
    the feature and the projector; without bias, a position with P F = 0 (|y| < eps) included."""
    gen = torch.Generator().manual_seed(c * 10 + d)
    conv = _projector(c, d, bias=bias, rank=rank)
    if bias:
        with torch.no_grad():
            conv.bias.normal_(0, 0.3, generator=gen)
    x = torch.randn(2, c, 4, 5, generator=gen)
    if not bias:
        x[0, :, 1, 1] = 0  # y = P F = 0 there: |y| < eps, normalise divides by eps
    emb = torch.randn(3, d, generator=gen)
    a, b = leaf(x, channels_last), leaf(x)
    params = [p for p in conv.parameters()]
    got = project_pixel_text_logits(a, conv, emb, tau=0.07)
    want = ref_scores(ref_project(b, conv), emb, 0.07)
    close(got, want, rtol=2e-5, atol=2e-5)
    w = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    close_grads(grads((got.double() * w).sum(), a, *params), grads((want * w).sum(), b, *params), atol=2e-5)
    assert vlfd._projects_through_range(a, conv) == (d > c)


def test_projected_scores_with_bias_outside_the_projector_range():
    gen = torch.Generator().manual_seed(21)
    conv = _projector(3, 9, rank=2)
    with torch.no_grad():
        conv.bias.normal_(0, 1.0, generator=gen)
    x = torch.randn(2, 3, 3, 3, generator=gen) * 5
    a, b = leaf(x, True), leaf(x)
    emb = torch.randn(4, 9, generator=gen)
    got = project_pixel_text_logits(a, conv, emb, tau=0.03)
    want = ref_scores(ref_project(b, conv), emb, 0.03)
    close(got, want, rtol=2e-5, atol=1e-4)
    close_grads(grads(got.sum(), a, conv.weight, conv.bias), grads(want.sum(), b, conv.weight, conv.bias), atol=1e-5)


def test_pixel_text_logits_of_a_projected_feature_match_reference():
    gen = torch.Generator().manual_seed(22)
    y = torch.randn(2, 8, 3, 4, generator=gen)
    y[1, :, 2, 3] = 0
    emb = torch.randn(5, 8, generator=gen) * 4
    for channels_last in (False, True):
        a, b = leaf(y, channels_last), leaf(y)
        got, want = pixel_text_logits(a, emb, tau=0.1), ref_scores(b, emb, 0.1)
        close(got, want)
        close_grads(grads((got * got).sum(), a), grads((want * want).sum(), b))


# ------------------------------------------------------------------------------------ linguistic term
@pytest.mark.parametrize("g", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_linguistic_matches_reference(g, with_labels):
    gen = torch.Generator().manual_seed(31)
    y = torch.randn(2, 12, 6, 8, generator=gen)
    t = torch.randn(2, 5, 24, 32, generator=gen) * 3
    labels = labels_with_void(2, 24, 32, 5, 0.3, gen) if with_labels else None
    emb = torch.randn(5, 12, generator=gen)
    a, b = leaf(y, True), leaf(y)
    got = vlfd_linguistic_loss(a, t, labels, emb, tau=0.05, label_weight=g)
    want = ref_linguistic(b, t, labels, emb, tau=0.05, g=g)
    close(got, want)
    want_grads = grads(want, b)
    close_grads(grads(got, a), want_grads)
    a2 = leaf(y)
    from_scores = vlfd_linguistic_loss_from_scores(pixel_text_logits(a2, emb, tau=0.05), t, labels, emb, tau=0.05,
                                                   label_weight=g)
    close(from_scores, want)
    close_grads(grads(from_scores, a2), want_grads)


# ------------------------------------------------------------------------------------ the C2VKD module
def _module_inputs(seed=0, k=5, c=6, d=10):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(2, k, 6, 8, generator=gen) * 2
    t = torch.randn(2, k, 24, 32, generator=gen) * 2
    y = labels_with_void(2, 24, 32, k, 0.2, gen)
    fs = torch.randn(2, c, 6, 8, generator=gen)
    ft = torch.randn(2, 7, 12, 16, generator=gen)
    emb = torch.randn(k, d, generator=gen)
    return s, t, y, fs, ft, emb


@pytest.mark.parametrize("pdd_temperature", [1.0, 2.0])
def test_c2vkd_module_matches_reference(pdd_temperature):
    """Every term and the total of C2VKDLoss, and the gradients of the student logits, the feature and all
    projectors, against the float64 references composed by hand."""
    s, t, y, fs, ft, emb = _module_inputs()
    torch.manual_seed(0)
    loss = c2vkd_loss(student_channels=[6], teacher_channels=[7], text_embeddings=emb, ling_tau=0.05,
                     pdd_temperature=pdd_temperature)
    a_s, a_f = leaf(s, True), leaf(fs, True)
    b_s, b_f = leaf(s), leaf(fs)
    out = loss(a_s, t, y, [a_f], [ft])
    pv, pl = loss.visual_projectors[0], loss.ling_projector
    want = {
        "ce": ref_ce(b_s, y),
        "pdd": ref_pdd(b_s, t, y, temperature=pdd_temperature),
        "glob": ref_global(ref_project(b_f, pv), ft),
        "rel": ref_relation(b_f, ft),
        "ling": ref_linguistic(ref_project(b_f, pl), t, y, emb, tau=0.05),
    }
    assert set(out) == set(want) | {"loss"}
    for name, value in want.items():
        close(out[name], value, rtol=2e-5, atol=2e-6)
    total = sum(loss.weights[k] * v for k, v in want.items())
    close(out["loss"], total, rtol=2e-5, atol=2e-6)
    params = list(loss.parameters())
    close_grads(grads(out["loss"], a_s, a_f, *params), grads(total, b_s, b_f, *params))


def test_c2vkd_reads_the_text_heads_logits():
    """student_text_logits (the text head's S, whose projector is the linguistic one) give the same terms and
    gradients as projecting the feature inside the loss."""
    from c2vkd_hf.text_head import TextHead

    s, t, y, fs, ft, emb = _module_inputs(seed=2)
    head = TextHead.create(6, emb, "decoder", 0.05)
    loss = c2vkd_loss(student_channels=[6], teacher_channels=[7], text_embeddings=emb, ling_tau=0.05,
                     ling_projector=head.projector)
    a_f, b_f = leaf(fs, True), leaf(fs, True)
    shared_logits = head(a_f)
    shared = loss(shared_logits, t, y, [a_f], [ft], student_text_logits=shared_logits)
    own_logits = head(b_f)
    own = loss(own_logits, t, y, [b_f], [ft])
    for name in own:
        close(shared[name], own[name], rtol=1e-6, atol=1e-7)
    params = list(loss.parameters())
    close_grads(grads(shared["loss"], a_f, *params), grads(own["loss"], b_f, *params), rtol=1e-5)
    with pytest.raises(ValueError, match="student_text_logits"):
        loss(shared_logits.detach(), t, y, [a_f.detach()], [ft], student_text_logits=shared_logits.detach()[:, :, :3])


@pytest.mark.parametrize("text_dim", [12, 40])  # below and above the decoder's 16 channels (rows and QR paths)
def test_distillation_model_shares_the_text_head_logits_with_the_linguistic_term(text_dim):
    """DistillationModel passes the head's S to C2VKD only when the head is the linguistic projector (same
    module, feature, tau, embeddings); the terms and gradients equal the unshared computation."""
    from c2vkd_hf.losses import get_loss
    from c2vkd_hf.models import feature_channels, forward_features
    from c2vkd_hf.text_head import TextHead
    from c2vkd_hf.trainer import DistillationModel

    from tiny import tiny_student

    student = tiny_student(5, batch_norm=False)
    channels = feature_channels(student)["decoder"]
    k = student.config.num_labels
    text = F.normalize(torch.randn(k, text_dim, generator=torch.Generator().manual_seed(1)), dim=1)
    head = TextHead.create(channels, text, "decoder", 0.03)
    loss = c2vkd_loss(student_channels=[channels], teacher_channels=[channels], text_embeddings=text,
                    ling_projector=head.projector)
    model = DistillationModel(student, loss, ["decoder"], text_head=head).train()
    assert model._text_head_is_linguistic_head()
    gen = torch.Generator().manual_seed(2)
    x, labels = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, k, (2, 32, 32), generator=gen)
    labels[:, :5] = IGNORE_INDEX
    with torch.no_grad():
        own_logits, feats = forward_features(student, x)
    teacher_logits = torch.randn(own_logits.shape, generator=gen)
    teacher_features = [torch.randn(feats["decoder"].shape, generator=gen)]
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(x, labels=labels, teacher_logits=teacher_logits, teacher_features=teacher_features, return_terms=True)
    got = grads(out["loss"], *params)
    logits, features = forward_features(student, x)
    s = head(features["decoder"])
    reference = loss(s, teacher_logits, labels, student_features=[features["decoder"]],
                     teacher_features=teacher_features)  # the loss projects the feature itself
    for name, value in reference.items():
        close(out["terms"][name], value, rtol=1e-6, atol=1e-7)
    close_grads(got, grads(reference["loss"], *params), rtol=1e-5)

    head.tau = 0.05  # another temperature: no longer the linguistic term's S
    assert not model._text_head_is_linguistic_head()
    head.tau = 0.03
    model.text_head_logits = False  # after the fold, the logits are the own classifier's
    assert not model._text_head_is_linguistic_head()
