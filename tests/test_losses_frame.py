"""Frame-level losses (FineLAP frame stream, FLAM frame + prior + calibrated probability) on
hand-checkable values and against naive loops, full == chunked == loops for values and
gradients; also the SLAP auxiliaries (masked self-distillation, EMA update)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from finelap.losses import (
    FLAMLoss,
    FrameLabels,
    bilinear_bce_sum,
    ema_update,
    finelap_frame_loss,
    flam_calibrated_prob,
    flam_frame_loss,
    flam_pos_fraction,
    flam_prior_loss,
    masked_distill_loss,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(z, y):
    return -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))


def _norm(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()


def _leaf(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


# ---------------------------------------------------------------- FineLAP
def test_finelap_hand_value():
    # one frame [1,0], phrases [1,0] (positive) and [0,1] (negative), scale 2, bias -1:
    # logits 1 and -1 -> both BCE terms are -log sigmoid(1)
    f = torch.tensor([[[1.0, 0.0]]])
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    y = torch.tensor([[[1.0, 0.0]]])
    ones = lambda *s: torch.ones(*s, dtype=torch.bool)  # noqa: E731
    for chunk in (None, 1):
        v = finelap_frame_loss(f, ones(1, 1), p, y, ones(1, 2), ones(1), 2.0, -1.0, chunk_size=chunk)
        assert v.item() == pytest.approx(-math.log(_sig(1.0)), rel=1e-6)


def _finelap_loop(f, fm, p, y, pm, has, s, b):
    total, count = 0.0, 0
    bsz, t, k = y.shape
    for i in range(bsz):
        if not has[i]:
            continue
        for j in range(t):
            if not fm[i, j]:
                continue
            for q in range(k):
                if not pm[i, q]:
                    continue
                si = s[i, q] if s.dim() == 2 else s
                bi = b[i, q] if b.dim() == 2 else b
                z = si * (f[i, j] * p[i, q]).sum() + bi
                total = total + _bce(z, y[i, j, q])
                count += 1
    return total / count


def _finelap_case(seed=0, b=3, t=5, k=4, d=3):
    g = torch.Generator().manual_seed(seed)
    f = _norm(b, t, d, gen=g)
    p = _norm(b, k, d, gen=g)
    y = (torch.rand(b, t, k, generator=g, dtype=torch.float64) > 0.6).double()
    fm = torch.ones(b, t, dtype=torch.bool)
    fm[1, 3:] = False  # a shorter clip
    pm = torch.ones(b, k, dtype=torch.bool)
    pm[0, 2:] = False  # padded phrase slots
    has = torch.tensor([True, True, False] + [True] * (b - 3))  # clip 2 has captions only
    return f, fm, p, y, pm, has


def test_finelap_full_chunked_and_loop_agree_with_grads():
    f, fm, p, y, pm, has = _finelap_case()
    s, b = _leaf(8.0), _leaf(-2.0)
    ref = _finelap_loop(f, fm, p, y, pm, has, s, b)
    g_ref = torch.autograd.grad(ref, (f, p, s, b))
    for chunk in (None, 1, 3, 4, 100):
        v = finelap_frame_loss(f, fm, p, y, pm, has, s, b, chunk_size=chunk)
        assert v.item() == pytest.approx(ref.item(), rel=1e-10), chunk
        for g1, g2 in zip(torch.autograd.grad(v, (f, p, s, b)), g_ref):
            torch.testing.assert_close(g1, g2)


def test_finelap_per_slot_scale_bias():
    # a text-conditioned head may predict scale and bias per phrase slot: (B, K) or (B, 1, K)
    f, fm, p, y, pm, has = _finelap_case(seed=8)
    g = torch.Generator().manual_seed(9)
    s = (torch.rand(3, 4, generator=g, dtype=torch.float64) * 5 + 5).requires_grad_()
    b = (torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 - 3).requires_grad_()
    ref = _finelap_loop(f, fm, p, y, pm, has, s, b)
    g_ref = torch.autograd.grad(ref, (f, p, s, b))
    for chunk in (None, 3):
        for s_in, b_in in ((s, b), (s[:, None, :], b[:, None, :])):
            v = finelap_frame_loss(f, fm, p, y, pm, has, s_in, b_in, chunk_size=chunk)
            assert v.item() == pytest.approx(ref.item(), rel=1e-10)
            for g1, g2 in zip(torch.autograd.grad(v, (f, p, s, b)), g_ref):
                torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="scale must be"):
        finelap_frame_loss(f, fm, p, y, pm, has, torch.ones(2, 4), 0.0)


def test_finelap_masks_equal_dropping_invalid_entries():
    f, fm, p, y, pm, has = _finelap_case(seed=1)
    v = finelap_frame_loss(f, fm, p, y, pm, has, 5.0, -1.0, chunk_size=2)
    # clip 2 has no frames: changing its targets or embeddings changes nothing
    y2 = y.clone()
    y2[2] = 1 - y2[2]
    assert finelap_frame_loss(f, fm, p, y2, pm, has, 5.0, -1.0, chunk_size=2).item() == pytest.approx(v.item(), rel=1e-12)
    # only clip 0 valid, phrases 0..1: equals the loss on that slice
    only0 = torch.tensor([True, False, False])
    want = finelap_frame_loss(f[:1], fm[:1], p[:1, :2], y[:1, :, :2], pm[:1, :2], only0[:1], 5.0, -1.0)
    assert finelap_frame_loss(f, fm, p, y, pm, only0, 5.0, -1.0).item() == pytest.approx(want.item(), rel=1e-12)
    # nothing valid: zero, still attached to the graph
    z = finelap_frame_loss(f, fm, p, y, pm, torch.zeros(3, dtype=torch.bool), 5.0, -1.0, chunk_size=2)
    assert z.item() == 0.0 and z.requires_grad


def test_no_phrases_is_zero_and_attached():
    f, fm, p, y, pm, has = _finelap_case()
    for chunk in (None, 2):
        v = finelap_frame_loss(f, fm, p[:, :0], y[:, :, :0], pm[:, :0], has, 5.0, -1.0, chunk_size=chunk)
        (g,) = torch.autograd.grad(v, f)
        assert v.item() == 0.0 and float(g.abs().sum()) == 0.0


def test_finelap_shape_errors_name_the_argument():
    f, fm, p, y, pm, has = _finelap_case()
    with pytest.raises(ValueError, match="targets"):
        finelap_frame_loss(f, fm, p, y[:, :, :2], pm, has, 1.0, 0.0)
    with pytest.raises(ValueError, match="phrase_mask"):
        finelap_frame_loss(f, fm, p, y, pm[:, :2], has, 1.0, 0.0)


def test_fused_chunked_gradcheck():
    g = torch.Generator().manual_seed(2)
    f = _norm(2, 3, 2, gen=g)
    c = _norm(2, 4, 2, gen=g)
    s, b = _leaf(3.0), _leaf(-0.5)
    y = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) > 0.5).double()
    w = torch.ones(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f_, c_, s_, b_: bilinear_bce_sum(f_, c_, s_, b_, y, w, None, chunk_size=3), (f, c, s, b))


def test_fused_backward_twice_and_with_other_branches():
    # the fused node hands its saved gradients on when the incoming gradient is 1; retained
    # graphs, a second backward and gradient accumulation from other branches must stay exact
    f, fm, p, y, pm, has = _finelap_case(seed=7)
    s = _leaf(4.0)

    def build(chunk):
        h = f * 1.5  # a non-leaf path, as in a model
        loss = finelap_frame_loss(h, fm, p, y, pm, has, s, -1.0, chunk_size=chunk)
        return loss, loss + (h**2).sum() * 0.01  # a second branch also reaching h

    want = [torch.autograd.grad(x, (f, p, s), retain_graph=True) for x in build(None)]
    loss, total = build(2)
    for _ in range(2):
        for got, ref in zip(torch.autograd.grad(loss, (f, p, s), retain_graph=True), want[0]):
            torch.testing.assert_close(got, ref)
        for got, ref in zip(torch.autograd.grad(total, (f, p, s), retain_graph=True), want[1]):
            torch.testing.assert_close(got, ref)
    # .backward() accumulation into leaves, twice, and with a weight != 1
    f.grad = p.grad = None
    (loss * 2.0).backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(f.grad, 3 * want[0][0])
    torch.testing.assert_close(p.grad, 3 * want[0][1])
    f.grad = p.grad = None


def test_chunked_no_grad_and_bf16_autocast():
    f, fm, p, y, pm, has = _finelap_case(seed=3)
    full = finelap_frame_loss(f, fm, p, y, pm, has, 5.0, -1.0)
    with torch.no_grad():
        assert finelap_frame_loss(f, fm, p, y, pm, has, 5.0, -1.0, chunk_size=2).item() == pytest.approx(full.item(), rel=1e-12)
    # under CPU bf16 autocast the loss is still computed in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = finelap_frame_loss(f.float(), fm, p.float(), y.float(), pm, has, 5.0, -1.0, chunk_size=2)
    assert v.dtype == torch.float32 and v.item() == pytest.approx(full.item(), rel=1e-5)


# ---------------------------------------------------------------- FLAM
def _flam_loop(f, fm, te, alpha, beta, y, has=None):
    b, t, _ = f.shape
    n = te.shape[0]
    total, count = 0.0, 0
    for i in range(b):
        if has is not None and not has[i]:
            continue
        for j in range(t):
            if not fm[i, j]:
                continue
            for q in range(n):
                h = alpha[q] * (f[i, j] * te[q]).sum() + beta[q]
                total = total + _bce(h, y[i, j, q])
                count += 1
    return total / count


def _flam_case(seed=0, b=3, t=4, n=5, d=3, c=3):
    g = torch.Generator().manual_seed(seed)
    f = _norm(b, t, d, gen=g)
    te = _norm(n, d, gen=g)
    alpha = (torch.rand(n, generator=g, dtype=torch.float64) * 5 + 5).requires_grad_()
    beta = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 4).requires_grad_()
    fm = torch.ones(b, t, dtype=torch.bool)
    fm[0, -1] = False
    activity = torch.rand(b, t, c, generator=g) > 0.6
    text_cluster = torch.tensor([0, 2, 0, -1, 1][:n])  # texts 0 and 2 are synonyms; text 3 has no cluster
    return f, fm, te, alpha, beta, FrameLabels(activity, text_cluster)


def test_flam_hand_value():
    # one frame [1,0]; texts [1,0] (active) and [0,1] (inactive); alpha 2, beta -1 -> logits 1, -1
    f = torch.tensor([[[1.0, 0.0]]])
    te = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[[1.0, 0.0]]])
    v = flam_frame_loss(f, torch.ones(1, 1, dtype=torch.bool), te, torch.tensor([2.0, 2.0]), torch.tensor([-1.0, -1.0]), y)
    assert v.item() == pytest.approx(-math.log(_sig(1.0)), rel=1e-6)


def test_flam_full_chunked_loop_agree_dense_sparse_callable():
    f, fm, te, alpha, beta, labels = _flam_case()
    dense = torch.stack([labels.activity[:, :, max(int(c), 0)].double() * (int(c) >= 0) for c in labels.text_cluster], dim=-1)
    assert torch.equal(dense[..., 0], dense[..., 2])  # synonyms share targets
    assert dense[..., 3].sum() == 0
    has = torch.tensor([True, False, True])
    ref = _flam_loop(f, fm, te, alpha, beta, dense, has)
    g_ref = torch.autograd.grad(ref, (f, te, alpha, beta))
    fn = lambda bs, ks: dense[bs, :, ks]  # noqa: E731
    for targets in (dense, labels, fn):
        for chunk in (None, 1, 2, 5):
            v = flam_frame_loss(f, fm, te, alpha, beta, targets, has_frames=has, chunk_size=chunk)
            assert v.item() == pytest.approx(ref.item(), rel=1e-10)
            for g1, g2 in zip(torch.autograd.grad(v, (f, te, alpha, beta)), g_ref):
                torch.testing.assert_close(g1, g2)


def test_flam_prior_loss_hand_values():
    # beta = 0 -> sigmoid 0.5, BCE(0.5, f) = log 2 for any f
    assert flam_prior_loss(torch.zeros(2), torch.tensor([0.25, 0.9])).item() == pytest.approx(math.log(2), rel=1e-6)
    # beta = logit(0.25) -> BCE equals the entropy of 0.25, and the gradient vanishes (the minimum)
    beta = torch.tensor([math.log(0.25 / 0.75)], requires_grad=True)
    v = flam_prior_loss(beta, torch.tensor([0.25]))
    assert v.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)
    (g,) = torch.autograd.grad(v, beta)
    assert abs(g.item()) < 1e-6


def test_flam_pos_fraction_hand_value():
    # 2 clips x 2 frames, one padded frame; text 0 active on 2 of 3 valid frames, text 1 on none
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    fm = torch.tensor([[True, True], [True, False]])
    frac = flam_pos_fraction(y, fm, 2)
    torch.testing.assert_close(frac, torch.tensor([2 / 3, 0.0]))


def test_flam_loss_detach_convention():
    f, fm, te, alpha, beta, labels = _flam_case(seed=4)
    out = FLAMLoss(chunk_size=2)(f, fm, te, alpha, beta, labels)
    assert set(out) == {"frame/flam", "frame/prior"}
    # frame term: same value as flam_frame_loss, but no gradient into beta
    assert out["frame/flam"].item() == pytest.approx(flam_frame_loss(f, fm, te, alpha, beta, labels).item(), rel=1e-10)
    g_beta, g_alpha = torch.autograd.grad(out["frame/flam"], (beta, alpha), retain_graph=True, allow_unused=True)
    assert g_beta is None or float(g_beta.abs().sum()) == 0.0
    assert float(g_alpha.abs().sum()) > 0
    # prior term: exactly BCE(sigmoid(beta), positive-frame fraction)
    frac = flam_pos_fraction(labels, fm, te.shape[0])
    assert out["frame/prior"].item() == pytest.approx(flam_prior_loss(beta, frac).item(), rel=1e-10)
    (gp,) = torch.autograd.grad(out["frame/prior"], beta)
    assert float(gp.abs().sum()) > 0


def test_flam_calibrated_prob_properties():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 3, generator=g) * 4
    beta = torch.tensor([-8.0, -2.0, 1.0])
    p, prior = torch.sigmoid(logits), torch.sigmoid(beta)
    cal = flam_calibrated_prob(logits, beta)
    torch.testing.assert_close(cal, p / (p + prior))
    # at p == prior the calibrated probability is 1/2; increasing in the logit; finite at extremes
    torch.testing.assert_close(flam_calibrated_prob(beta, beta), torch.full((3,), 0.5))
    xs = torch.linspace(-20, 20, 41)[:, None]
    c = flam_calibrated_prob(xs, beta)
    assert bool((c[1:] >= c[:-1]).all()) and bool(((c > 0) & (c <= 1)).all())
    ext = flam_calibrated_prob(torch.tensor([-200.0, 200.0]), torch.tensor([-200.0, -200.0]))
    assert torch.isfinite(ext).all() and ext[0].item() == pytest.approx(0.5) and ext[1].item() == pytest.approx(1.0)


def test_frame_labels_validation():
    with pytest.raises(ValueError, match="clusters"):
        FrameLabels(torch.zeros(1, 2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        FrameLabels(torch.zeros(1, 2, 3), torch.tensor([0.0]))


# ---------------------------------------------------------------- SLAP auxiliaries
def test_masked_distill_cosine_hand_values_and_mask():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    t = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]], requires_grad=True)
    # per frame 2 - 2cos: 0 (same direction), 2 (orthogonal), 4 (opposite)
    m = torch.tensor([[True, True, False]])
    assert masked_distill_loss(s, t, m).item() == pytest.approx(1.0, rel=1e-6)
    assert masked_distill_loss(s, t, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(2.0, rel=1e-6)
    v = masked_distill_loss(s, t, m)
    v.backward()
    assert t.grad is None  # the teacher is a constant target
    assert float(s.grad[0, 2].abs().sum()) == 0.0  # an unmasked frame gets no gradient
    z = masked_distill_loss(s, t.detach(), torch.zeros(1, 3, dtype=torch.bool))
    assert z.item() == 0.0


def test_masked_distill_mse_and_ce():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 4, generator=g)
    t = torch.randn(2, 3, 4, generator=g)
    m = torch.tensor([[True, False, True], [False, False, True]])
    want = ((s - F.layer_norm(t, (4,))) ** 2).mean(-1)[m].mean()
    assert masked_distill_loss(s, t, m, kind="mse").item() == pytest.approx(want.item(), rel=1e-6)
    # ce: student equal to a sharp teacher over 2 prototypes -> near-zero entropy target
    tt = torch.tensor([[[10.0, -10.0]]])
    ce = masked_distill_loss(tt * 0.1 / 0.04, tt, torch.ones(1, 1, dtype=torch.bool), kind="ce")
    assert ce.item() < 1e-6
    ce_u = masked_distill_loss(torch.zeros(1, 1, 2), tt, torch.ones(1, 1, dtype=torch.bool), kind="ce")
    assert ce_u.item() == pytest.approx(math.log(2), rel=1e-5)  # uniform student: CE = log 2
    with pytest.raises(ValueError, match="unknown distillation kind"):
        masked_distill_loss(s, t, m, kind="l1")


def test_ema_update_hand_values():
    student = torch.nn.BatchNorm1d(2)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        student.weight.fill_(1.0)
        student.running_mean.fill_(2.0)
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, decay=0.9)
    torch.testing.assert_close(teacher.weight.data, torch.full((2,), 0.1))
    torch.testing.assert_close(teacher.running_mean, torch.full((2,), 0.2))
    assert int(teacher.num_batches_tracked) == 7
    ema_update(teacher, student, decay=0.9)
    torch.testing.assert_close(teacher.weight.data, torch.full((2,), 0.19))
    ema_update(teacher, student, decay=0.0)  # decay 0 copies the student
    torch.testing.assert_close(teacher.weight.data, student.weight.data)
    with pytest.raises(ValueError, match="structure"):
        ema_update(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, bias=False), 0.9)
    with pytest.raises(ValueError, match="decay"):
        ema_update(teacher, student, 1.5)


def test_ema_update_of_a_state_dict_copy_is_the_loops_ema():
    """The loop's EMA weights (a state-dict copy) and SLAP's teacher (a module) use one helper."""
    from finelap.train import loop, slap

    assert loop.ema_update is ema_update and slap.ema_update is ema_update
    student = torch.nn.BatchNorm1d(2)
    ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        student.weight.fill_(3.0)
        student.num_batches_tracked.fill_(4)
    ema_update(ema, student, 0.75)
    torch.testing.assert_close(ema["weight"], torch.full((2,), 0.75 * 1.0 + 0.25 * 3.0))
    assert int(ema["num_batches_tracked"]) == 4 and float(student.weight.detach()[0]) == 3.0  # the source is not touched
    with pytest.raises(ValueError, match="structure"):
        ema_update({"weight": ema["weight"]}, student, 0.5)


def test_frame_logits_one_definition_shared_and_per_clip():
    from finelap.models.model import frame_logits, frame_similarity

    frames = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    texts = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # (3, 2), shared
    torch.testing.assert_close(frame_similarity(frames, texts), torch.tensor([[[1.0, 0.0, 1.0], [2.0, 2.0, 0.0]]]))
    z = frame_logits(frames, texts, torch.tensor([1.0, 2.0, 3.0]), -1.0)  # per-text scale
    torch.testing.assert_close(z, torch.tensor([[[0.0, -1.0, 2.0], [1.0, 3.0, -1.0]]]))
    per_clip = frame_logits(frames, texts[None], torch.tensor([[[1.0, 2.0, 3.0]]]), torch.zeros(1, 1, 3))  # (1, 3, 2), (1, 1, 3)
    torch.testing.assert_close(per_clip, z + 1.0)
