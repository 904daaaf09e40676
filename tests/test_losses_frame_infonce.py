"""The frame-level InfoNCE objective (losses/frame_infonce.py) and the objective plug-in mechanics:
hand values, parity with a naive loop (values and gradients), selection by config, and a new
objective registered without editing any other module."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finelap.config import resolve_run_config
from finelap.errors import ConfigError
from finelap.losses import LossConfig, LossInputs, compute_losses
from finelap.losses.frame_infonce import frame_info_nce
from finelap.losses.objective import Objective, register_objective
from finelap.registry import LOSSES


def test_hand_values():
    """One clip, 2-d embeddings on the axes, scale 1, bias 0:
    frame 0 = e0 with phrase 0 active: z = [1, 0]      -> -log(e / (e + 1))        = log(1 + 1/e)
    frame 1 = e1 with phrases 0 and 1:  z = [0, 1]      -> -(0.5 log p0 + 0.5 log p1) = log(1 + e) - 0.5
    frame 2 has no active phrase, frame 3 is padding, phrase slot 2 is padding: none counts."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    frames = torch.stack([e0, e1, e0, e1])[None]  # (1, 4, 2)
    phrases = torch.stack([e0, e1, e0])[None]  # (1, 3, 2); slot 2 is padding
    targets = torch.tensor([[[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    frame_mask = torch.tensor([[True, True, True, False]])
    phrase_mask = torch.tensor([[True, True, False]])
    got = frame_info_nce(frames, frame_mask, phrases, targets, phrase_mask, torch.tensor([True]), 1.0, 0.0)
    want = (math.log(1 + 1 / math.e) + math.log(1 + math.e) - 0.5) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)
    # a clip without strong labels counts for nothing: 0, still attached to the graph
    f = frames.clone().requires_grad_()
    zero = frame_info_nce(f, frame_mask, phrases, targets, phrase_mask, torch.tensor([False]), 1.0, 0.0)
    assert zero.item() == 0.0 and zero.requires_grad


def _naive(frames, frame_mask, phrases, targets, phrase_mask, has_frames, scale, bias):
    """Loop over clips and frames: softmax over the clip's valid phrases, soft targets."""
    terms = []
    b, t, _ = frames.shape
    for i in range(b):
        if not has_frames[i]:
            continue
        valid = torch.nonzero(phrase_mask[i]).flatten()
        for j in range(t):
            y = targets[i, j, valid]
            if not frame_mask[i, j] or float(y.sum()) == 0:
                continue
            s = scale[i, 0, valid] if scale.dim() == 3 else scale
            bb = bias[i, 0, valid] if bias.dim() == 3 else bias
            z = s * (phrases[i, valid] @ frames[i, j]) + bb
            terms.append(-(y / y.sum() * torch.log_softmax(z, dim=0)).sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("per_slot", [False, True])
def test_equals_naive_loop_with_gradients(per_slot):
    g = torch.Generator().manual_seed(0)
    b, t, k, d = 3, 5, 4, 6
    frames = F.normalize(torch.randn(b, t, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    phrases = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    targets = (torch.rand(b, t, k, generator=g, dtype=torch.float64) > 0.6).double() * torch.rand(b, t, k, generator=g, dtype=torch.float64)
    frame_mask = torch.rand(b, t, generator=g) > 0.2
    phrase_mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, True, True]])
    has = torch.tensor([True, False, True])
    shape = (b, 1, k) if per_slot else ()
    scale = (torch.rand(shape, generator=g, dtype=torch.float64) * 5 + 5).requires_grad_()
    bias = (torch.rand(shape, generator=g, dtype=torch.float64) - 2).requires_grad_()
    ins = (frames, frame_mask, phrases, targets, phrase_mask, has, scale, bias)
    got, want = frame_info_nce(*ins), _naive(*ins)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [frames, phrases, scale, bias]
    for g_got, g_want in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def _inputs(with_targets=True):
    g = torch.Generator().manual_seed(3)
    n = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return LossInputs(
        audio_embeds=n(4, 6), text_embeds=n(4, 6), logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-5.0),
        frame_embeds=n(4, 5, 6), frame_mask=torch.ones(4, 5, dtype=torch.bool), has_frames=torch.tensor([True, True, False, True]),
        phrase_embeds=n(4, 3, 6), phrase_mask=torch.ones(4, 3, dtype=torch.bool),
        frame_targets=(torch.rand(4, 5, 3, generator=g) > 0.5).float() if with_targets else None,
        frame_logit_scale=torch.tensor(10.0), frame_logit_bias=torch.tensor(-3.0),
    )  # fmt: skip


def test_selected_by_config_and_weighted_by_term_name():
    cfg = resolve_run_config({"loss": {"clip": "infonce", "frame": "frame_infonce", "weights": {"frame/infonce": 0.5}}}).loss
    assert cfg.terms() == ["clip/infonce", "frame/infonce"] and "frame_infonce" in LOSSES.names()
    x = _inputs()
    out = compute_losses(cfg, x)
    want = frame_info_nce(x.frame_embeds, x.frame_mask, x.phrase_embeds, x.frame_targets, x.phrase_mask, x.has_frames, 10.0, -3.0)
    assert out["frame/infonce"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["clip/infonce"].item() + 0.5 * want.item(), rel=1e-6)
    assert set(compute_losses(cfg, _inputs(with_targets=False))) == {"clip/infonce", "loss"}  # no strong labels: skipped


def test_unknown_objective_is_a_config_error_at_resolution():
    with pytest.raises(ConfigError, match=r"loss\.frame: unknown frame loss 'frame_infonse'.*'frame_infonce'"):
        resolve_run_config({"loss": {"frame": "frame_infonse"}})
    with pytest.raises(ConfigError, match=r"loss\.clip: unknown clip loss 'finelap'"):  # a frame objective in the clip slot
        LossConfig(clip="finelap")


def test_a_new_objective_needs_no_other_edit(monkeypatch):
    """Registering a class is all it takes: config names it, its term is weighted by name, and
    it reads an input of its own (not a LossInputs field)."""
    LOSSES.names()  # fill the registry first, then register on a copy that the test drops
    monkeypatch.setattr(LOSSES, "_items", dict(LOSSES._items))

    @register_objective
    class Margin(Objective):
        name = "toy_margin"
        slot = "clip"
        all_terms = ("clip/margin",)
        needs = ("margins",)

        def compute(self, cfg, x, rank=0, world_size=1):
            return {"clip/margin": F.relu(1 - self.need(x, "margins")).mean()}

    cfg = LossConfig(clip="toy_margin", weights={"clip": 3.0})
    assert cfg.terms() == ["clip/margin"] and cfg.resolved_weights() == {"clip/margin": 3.0}
    out = compute_losses(cfg, {"margins": torch.tensor([0.5, 2.0])})
    assert out["clip/margin"].item() == pytest.approx(0.25) and out["loss"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"clip/margin needs .*margins"):
        compute_losses(cfg, {})
    with pytest.raises(TypeError, match="group/name"):

        @register_objective
        class Bad(Objective):
            name, slot, all_terms = "toy_bad", "clip", ("nogroup",)


def test_options_of_an_objective_that_is_off_are_rejected():
    with pytest.raises(ConfigError, match=r"loss\.local_loss is set but clip=infonce is off \(active: clip=sigmoid\)"):
        LossConfig(clip="sigmoid", local_loss=True)


def test_training_step_with_gradient_caching_equals_one_big_batch(tmp_path):
    """Through the loop (the objective gathers its inputs from the step): 4 micro-batches give the
    terms and gradients of one batch of 16."""
    import copy
    from pathlib import Path

    from finelap.config import load_run_config
    from finelap.data.batching import ClipDataset, Collate, MixedBatchSampler, split_by_supervision
    from finelap.data.manifests import read_manifest
    from finelap.models.build import build_model
    from finelap.train.loop import build_clusters, forward_backward

    from tinyfactory import tiny_dataset, tiny_overrides

    torch.manual_seed(0)
    man = tiny_dataset(tmp_path / "data", n=16)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_run_config(repo / "configs" / "finelap.yaml", tiny_overrides(tmp_path, man, **{"loss.frame": "frame_infonce"}))
    clips = read_manifest(man)
    model = build_model(cfg)
    clusters = build_clusters(model, clips, cfg)
    ds = ClipDataset(clips, 16000, cfg.audio.clip_seconds, clusters=clusters, phrases_per_clip=cfg.data.phrases_per_clip)
    keys = MixedBatchSampler(split_by_supervision(clips), cfg.data.mix, 16, seed=1).batch_keys(0)
    batch = Collate(model.timeline, cfg.data.phrases_per_clip)([ds[k] for k in keys])
    m1, m4 = model, copy.deepcopy(model)
    full = forward_backward(m1, cfg.loss, batch, clusters, accum_steps=1)
    acc = forward_backward(m4, cfg.loss, batch, clusters, accum_steps=4)
    assert set(full) == set(acc) == {"clip/sigmoid", "frame/infonce", "loss"}
    for k in full:
        assert acc[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k
    grads = [(n, p1.grad, p4.grad) for (n, p1), (_, p4) in zip(m1.named_parameters(), m4.named_parameters()) if p1.grad is not None]
    assert len(grads) > 10
    for name, g1, g4 in grads:
        torch.testing.assert_close(g4, g1, rtol=1e-4, atol=1e-6, msg=name)
    assert m1.frame_scale_bias.log_scale.grad is not None  # the frame scale is trained by the new term
