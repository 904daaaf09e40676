"""Clip-level losses (InfoNCE, SigLIP sigmoid, MGA-CLAP hard-negative) on hand-checkable values
and against reference implementations; the caption loss and the loss composer (LossConfig,
compose, compute_losses) are tested here too."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finelap.errors import ConfigError
from finelap.losses import (
    LossConfig,
    LossInputs,
    caption_ids,
    caption_loss,
    compose,
    compute_losses,
    hard_negative_info_nce,
    info_nce,
    sigmoid_loss,
)


def _emb(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return a.requires_grad_(), t.requires_grad_()


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


EYE2 = torch.eye(2, dtype=torch.float64)


# ---------------------------------------------------------------- InfoNCE
def test_info_nce_hand_value_orthogonal():
    # logits = s * I: each row is -log(e^s / (e^s + 1)) = log(1 + e^-s), in both directions
    s = 2.0
    assert info_nce(EYE2, EYE2, s).item() == pytest.approx(math.log(1 + math.exp(-s)), rel=1e-12)
    # swapped texts: the positive scores 0 and the negative s
    swapped = EYE2.flip(0)
    assert info_nce(EYE2, swapped, s).item() == pytest.approx(math.log(1 + math.exp(s)), rel=1e-12)


def test_info_nce_equals_cross_entropy_reference_with_grads():
    a, t = _emb(6, 5, 0)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    ours = info_nce(a, t, scale)
    logits = scale * a @ t.T
    labels = torch.arange(6)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for g1, g2 in zip(_grads(ours, a, t, scale), _grads(ref, a, t, scale)):
        torch.testing.assert_close(g1, g2)


def test_info_nce_groups_make_equal_captions_positives():
    a, t = _emb(5, 4, 1)
    groups = torch.tensor([0, 1, 0, 2, 1])
    ours = info_nce(a, t, 3.0, groups=groups)
    logits = 3.0 * a @ t.T
    p = (groups[:, None] == groups[None, :]).double()
    p = p / p.sum(1, keepdim=True)
    ref = (F.cross_entropy(logits, p) + F.cross_entropy(logits.T, p)) / 2  # probability targets
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    # hand: orthogonal pairs, but both captions equal -> the target is (1/2, 1/2) on each row:
    # row logits (s, 0): CE = log(e^s + 1) - s/2, in both directions
    s = 5.0
    val = info_nce(EYE2, EYE2, s, groups=torch.tensor([7, 7])).item()
    assert val == pytest.approx(math.log(math.exp(s) + 1) - s / 2, rel=1e-12)


def test_info_nce_local_loss_matches_single_process_value():
    a, t = _emb(4, 3, 3)
    assert info_nce(a, t, 4.0, local_loss=True).item() == pytest.approx(info_nce(a, t, 4.0).item(), rel=1e-12)


def test_empty_batch_is_zero_and_attached():
    scale = torch.tensor(3.0, requires_grad=True)
    empty = torch.zeros(0, 4, requires_grad=True)
    for fn in (lambda: info_nce(empty, empty, scale), lambda: hard_negative_info_nce(empty, empty, scale),
               lambda: sigmoid_loss(empty, empty, scale, -1.0), lambda: sigmoid_loss(empty, empty, scale, -1.0, chunk_size=2)):  # fmt: skip
        v = fn()
        assert v.item() == 0.0
        (g,) = torch.autograd.grad(v, scale)
        assert g.item() == 0.0


def test_caption_ids_stable_and_normalised():
    ids = caption_ids(["A dog  barks", "a dog barks", "a cat"])
    assert ids.dtype == torch.long and ids[0] == ids[1] and ids[0] != ids[2]
    assert torch.equal(caption_ids(["a cat"]), ids[2:])


def test_clip_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        info_nce(torch.zeros(2, 3), torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="groups"):
        sigmoid_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 0.0, groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="process group"):
        info_nce(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, rank=0, world_size=2)


# ---------------------------------------------------------------- sigmoid (SigLIP)
def test_sigmoid_hand_value_orthogonal():
    s, b = 3.0, -1.0
    # 2 positives with logit s + b, 2 negatives with logit b; normalised by the 2 audio clips
    want = -(2 * math.log(_sig(s + b)) + 2 * math.log(_sig(-b))) / 2
    assert sigmoid_loss(EYE2, EYE2, s, b).item() == pytest.approx(want, rel=1e-12)
    assert sigmoid_loss(EYE2, EYE2, s, b, chunk_size=1).item() == pytest.approx(want, rel=1e-12)


def _sigmoid_loop(a, t, scale, bias, groups=None):
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            same = (i == j) if groups is None else bool(groups[i] == groups[j])
            z = 1.0 if same else -1.0
            total = total - F.logsigmoid(z * (scale * (a[i] * t[j]).sum() + bias))
    return total / n


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 1, 1, 2, 0, 3, 4])])
def test_sigmoid_equals_double_loop_full_and_chunked_with_grads(groups):
    a, t = _emb(7, 4, 4)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    ref = _sigmoid_loop(a, t, scale, bias, groups)
    g_ref = _grads(ref, a, t, scale, bias)
    for chunk in (None, 1, 3, 7, 50):
        val = sigmoid_loss(a, t, scale, bias, groups=groups, chunk_size=chunk)
        assert val.item() == pytest.approx(ref.item(), rel=1e-10), chunk
        for g1, g2 in zip(_grads(val, a, t, scale, bias), g_ref):
            torch.testing.assert_close(g1, g2)


def test_sigmoid_chunked_without_grad_matches():
    a, t = _emb(5, 3, 5)
    with torch.no_grad():
        assert sigmoid_loss(a, t, 5.0, -2.0, chunk_size=2).item() == pytest.approx(sigmoid_loss(a, t, 5.0, -2.0).item(), rel=1e-12)


# ---------------------------------------------------------------- hard-negative InfoNCE (MGA-CLAP)
def _hn_loop(a, t, s, beta, groups=None):
    """Direct transcription of the documented formula, one row at a time."""
    n = a.shape[0]
    g = list(range(n)) if groups is None else groups.tolist()

    def direction(x, y):
        total = 0.0
        for i in range(n):
            logits = [s * (x[i] * y[j]).sum() for j in range(n)]
            pos = [j for j in range(n) if g[j] == g[i]]
            neg = [j for j in range(n) if g[j] != g[i]]
            z = sum(torch.exp(beta * logits[k]) for k in neg) if neg else None
            den = 0.0
            for j in range(n):
                w = 1.0 if j in pos else len(neg) * torch.exp(beta * logits[j]) / z
                den = den + w * torch.exp(logits[j])
            total = total - sum(logits[j] - torch.log(den) for j in pos) / len(pos)
        return total / n

    return (direction(a, t) + direction(t, a)) / 2


def test_hard_negative_beta_zero_is_info_nce_and_b2_is_info_nce():
    a, t = _emb(5, 4, 6)
    assert hard_negative_info_nce(a, t, 8.0, beta=0.0).item() == pytest.approx(info_nce(a, t, 8.0).item(), rel=1e-12)
    # with B = 2 each row has one negative, whose normalised weight is exactly 1 for any beta
    a2, t2 = _emb(2, 4, 7)
    assert hard_negative_info_nce(a2, t2, 8.0, beta=0.7).item() == pytest.approx(info_nce(a2, t2, 8.0).item(), rel=1e-12)
    # hand value on orthogonal pairs
    assert hard_negative_info_nce(EYE2, EYE2, 2.0).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-12)


@pytest.mark.parametrize("groups", [None, torch.tensor([0, 0, 1, 2, 1, 3])])
def test_hard_negative_equals_loop_with_grads(groups):
    a, t = _emb(6, 3, 8)
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    ours = hard_negative_info_nce(a, t, s, beta=0.15, groups=groups)
    ref = _hn_loop(a, t, s, 0.15, groups)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    for g1, g2 in zip(_grads(ours, a, t, s), _grads(ref, a, t, s)):
        torch.testing.assert_close(g1, g2)


def test_hard_negative_upweights_hard_negatives():
    # weights average 1 and grow with the score, so the loss is >= InfoNCE (Chebyshev's sum inequality)
    a, t = _emb(8, 4, 9)
    hn = hard_negative_info_nce(a, t, 10.0, beta=0.5).item()
    assert hn > info_nce(a, t, 10.0).item() + 1e-6
    assert hard_negative_info_nce(a, t, 10.0, beta=1.0).item() > hn


def test_hard_negative_detach_weights_same_value_different_grad():
    a, t = _emb(5, 3, 10)
    v1 = hard_negative_info_nce(a, t, 10.0, beta=0.5)
    v2 = hard_negative_info_nce(a, t, 10.0, beta=0.5, detach_weights=True)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-12)
    assert not torch.allclose(_grads(v1, a)[0], _grads(v2, a)[0])


def test_hard_negative_row_without_negatives_is_finite():
    a, t = _emb(3, 3, 11)
    v = hard_negative_info_nce(a, t, 5.0, groups=torch.tensor([4, 4, 4]))
    assert torch.isfinite(v)
    assert all(torch.isfinite(g).all() for g in _grads(v, a, t))


# ---------------------------------------------------------------- caption loss
def test_caption_loss_hand_values_and_padding():
    v = 5
    logits = torch.zeros(1, 3, v, requires_grad=True)
    targets = torch.tensor([[2, 4, 0]])  # last token is padding (pad_id 0)
    assert caption_loss(logits, targets, pad_id=0).item() == pytest.approx(math.log(v), rel=1e-6)
    # one confident correct token: logit L on the target -> CE = log(e^L + V - 1) - L
    lg = torch.zeros(1, 1, v)
    lg[0, 0, 3] = 2.0
    want = math.log(math.exp(2.0) + v - 1) - 2.0
    assert caption_loss(lg, torch.tensor([[3]]), pad_id=0).item() == pytest.approx(want, rel=1e-6)
    # label smoothing eps: (1 - eps) * CE + eps * mean_v(-log p_v)
    eps = 0.1
    logp = F.log_softmax(lg[0, 0], -1)
    want_ls = (1 - eps) * (-logp[3]) + eps * (-logp.mean())
    assert caption_loss(lg, torch.tensor([[3]]), pad_id=0, label_smoothing=eps).item() == pytest.approx(want_ls.item(), rel=1e-6)
    # all padding: zero, still differentiable
    z = caption_loss(logits, torch.zeros(1, 3, dtype=torch.long), pad_id=0)
    assert z.item() == 0.0 and z.requires_grad
    with pytest.raises(ValueError, match="targets"):
        caption_loss(logits, torch.zeros(1, 2, dtype=torch.long), pad_id=0)


# ---------------------------------------------------------------- LossConfig / compose / compute_losses
def test_loss_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="unknown clip loss"):
        LossConfig(clip="contrastive")
    with pytest.raises(ConfigError, match="unknown frame loss"):
        LossConfig(frame="sed")
    with pytest.raises(ConfigError, match="unknown term"):
        LossConfig(weights={"frame/typo": 1.0})
    with pytest.raises(ConfigError, match="not enabled"):
        LossConfig(clip="infonce", frame=None, weights={"frame/prior": 0.5})
    with pytest.raises(ConfigError, match="not enabled"):
        LossConfig(clip="infonce", weights={"frame": 2.0})
    with pytest.raises(ConfigError, match=">= 0"):
        LossConfig(weights={"clip": -1.0})
    with pytest.raises(ConfigError, match="no objective"):
        LossConfig(clip=None)
    with pytest.raises(ConfigError, match="hard_negative_beta"):
        LossConfig(clip="infonce", hard_negative_beta=0.3)
    with pytest.raises(ConfigError, match="clip_chunk_size"):
        LossConfig(clip="infonce", clip_chunk_size=4)
    with pytest.raises(ConfigError, match="frame_chunk_size"):
        LossConfig(frame="finelap", frame_chunk_size=0)
    with pytest.raises(ConfigError, match="caption is off"):
        LossConfig(caption_label_smoothing=0.1)
    cfg = LossConfig(clip="sigmoid", frame="flam", weights={"frame": 2.0, "frame/prior": 0.1})
    assert cfg.terms() == ["clip/sigmoid", "frame/flam", "frame/prior"]
    assert cfg.resolved_weights() == {"clip/sigmoid": 1.0, "frame/flam": 2.0, "frame/prior": 0.1}


def test_compose_weights_by_name_and_skips_absent_terms():
    a, b, c = torch.tensor(1.5), torch.tensor(2.0), torch.tensor(4.0)
    out = compose({"clip/sigmoid": a, "frame/sigmoid": b, "frame/prior": c, "aux/distill": None}, {"frame": 3.0, "frame/prior": 0.5})
    assert set(out) == {"clip/sigmoid", "frame/sigmoid", "frame/prior", "loss"}
    assert out["loss"].item() == pytest.approx(1.5 + 3.0 * 2.0 + 0.5 * 4.0)
    with pytest.raises(ConfigError, match="unknown term"):
        compose({"clip/sigmoid": a}, {"clip/sigmod": 1.0})
    with pytest.raises(ValueError, match="unknown loss term"):
        compose({"clip/other": a}, {})
    with pytest.raises(ValueError, match="no loss term"):
        compose({"frame/sigmoid": None}, {})


def _inputs(b=4, t=5, k=3, d=6, with_frames=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1).requires_grad_()  # noqa: E731
    return LossInputs(
        audio_embeds=n(b, d),
        text_embeds=n(b, d),
        logit_scale=torch.tensor(10.0, requires_grad=True),
        logit_bias=torch.tensor(-5.0, requires_grad=True),
        has_caption=torch.tensor([True] * (b - 1) + [False]),
        caption_groups=caption_ids(["dog", "cat", "dog", ""][:b]),
        frame_embeds=n(b, t, d),
        frame_mask=torch.ones(b, t, dtype=torch.bool),
        has_frames=torch.tensor([True, False] * (b // 2)),
        phrase_embeds=n(b, k, d),
        phrase_mask=torch.ones(b, k, dtype=torch.bool),
        frame_targets=(torch.rand(b, t, k, generator=g) > 0.5).float() if with_frames else None,
        frame_logit_scale=torch.tensor(10.0, requires_grad=True),
        frame_logit_bias=torch.tensor(-3.0, requires_grad=True),
    )


def test_compute_losses_finelap_terms_and_skips_missing_frames():
    cfg = LossConfig(clip="sigmoid", frame="finelap", weights={"frame/sigmoid": 2.0}, frame_chunk_size=2)
    x = _inputs()
    out = compute_losses(cfg, x)
    assert set(out) == {"clip/sigmoid", "frame/sigmoid", "loss"}
    # the clip term uses only clips with captions, with equal captions as positives
    keep = x.has_caption
    want_clip = sigmoid_loss(x.audio_embeds[keep], x.text_embeds[keep], x.logit_scale, x.logit_bias, groups=x.caption_groups[keep])
    assert out["clip/sigmoid"].item() == pytest.approx(want_clip.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["clip/sigmoid"].item() + 2.0 * out["frame/sigmoid"].item(), rel=1e-6)
    out["loss"].backward()
    assert x.frame_logit_scale.grad.abs() > 0 and x.logit_bias.grad.abs() > 0  # both terms reach their own scale/bias
    # a batch without strong labels has no frame term
    out2 = compute_losses(cfg, _inputs(with_frames=False))
    assert set(out2) == {"clip/sigmoid", "loss"}


def test_compute_losses_flam_and_aux_terms():
    cfg = LossConfig(clip="infonce", frame="flam", distill="cosine", caption=True)
    x = _inputs()
    g = torch.Generator().manual_seed(1)
    x.flam_text_embeds = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    x.flam_alpha = torch.full((3,), 10.0)
    x.flam_beta = torch.full((3,), -2.0, requires_grad=True)
    x.flam_targets = (torch.rand(4, 5, 3, generator=g) > 0.6).float()
    x.has_frames = None
    x.student_frames = torch.randn(4, 5, 6, generator=g, requires_grad=True)
    x.teacher_frames = torch.randn(4, 5, 6, generator=g)
    x.distill_mask = torch.rand(4, 5, generator=g) > 0.5
    x.caption_logits = torch.randn(4, 7, 11, generator=g, requires_grad=True)
    x.caption_targets = torch.randint(1, 11, (4, 7), generator=g)
    out = compute_losses(cfg, x)
    assert set(out) == {"clip/infonce", "frame/flam", "frame/prior", "aux/distill", "aux/caption", "loss"}
    assert out["loss"].item() == pytest.approx(sum(v.item() for k, v in out.items() if k != "loss"), rel=1e-6)
    # FLAM's bias is trained by the prior term only
    (gb_frame,) = torch.autograd.grad(out["frame/flam"], x.flam_beta, retain_graph=True, allow_unused=True)
    assert gb_frame is None or float(gb_frame.abs().sum()) == 0.0
    (gb_prior,) = torch.autograd.grad(out["frame/prior"], x.flam_beta, retain_graph=True)
    assert float(gb_prior.abs().sum()) > 0


def test_compute_losses_hard_negative_and_missing_input_message():
    cfg = LossConfig(clip="hard_negative", hard_negative_beta=0.3)
    x = _inputs()
    out = compute_losses(cfg, x)
    keep = x.has_caption
    want = hard_negative_info_nce(x.audio_embeds[keep], x.text_embeds[keep], x.logit_scale, 0.3, groups=x.caption_groups[keep])
    assert out["clip/hard_negative"].item() == pytest.approx(want.item(), rel=1e-6)
    x.logit_scale = None
    with pytest.raises(ValueError, match="logit_scale"):
        compute_losses(cfg, x)
