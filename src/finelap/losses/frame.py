"""Frame-level audio-text losses: FineLAP's dual-stream frame sigmoid loss and FLAM's
open-vocabulary frame loss with its prior loss and logit-adjusted inference.

Both are binary cross-entropy over "bilinear" logits

    z[b, t, k] = scale_k * <f[b, t], c[(b,) k]> + bias_k,

with frame embeddings ``f`` (B, T, D) and column embeddings ``c`` (per clip (B, K, D) for
FineLAP's phrase sets, shared (N, D) for FLAM's batch texts). Embeddings are L2-normalised by
the model, so the dot product is the cosine.

Memory. A naive implementation keeps several (B, T, K) tensors alive for backward; with FLAM's
every-audio-x-every-text logits that is quadratic in the batch. The chunked path
(``chunk_size`` columns at a time) runs a fused autograd function that computes the loss and
its analytic gradient chunk by chunk in the forward pass:

    d loss / d z = w * (sigmoid(z) - y)

so that only input-sized gradients are kept, never a (B, T, K) tensor. The result equals the
full autograd path to float rounding (tests/test_losses_frame.py checks loss and gradients).

Distributed. Losses follow the convention of ``finelap.dist``: the value on a rank is
world_size times its share of the global loss, normalisers are global counts (all-reduced).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..audio import Timeline
from ..data.batching import Batch
from ..data.phrases import PhraseClusters
from ..dist import all_gather_sizes, all_reduce_sum, gather_with_grad, get_rank, get_world_size, is_dist
from ..errors import ConfigError
from ..loss_config import LossConfig
from ..models.model import frame_similarity
from .objective import Inputs, Objective, StepContext, any_rank, input_device, register_objective

__all__ = [
    "FrameLabels",
    "finelap_frame_loss",
    "flam_frame_loss",
    "flam_prior_loss",
    "flam_pos_fraction",
    "flam_calibrated_prob",
    "FLAMLoss",
    "bilinear_bce_sum",
    "cluster_activity",
    "FineLAPFrameObjective",
    "FLAMFrameObjective",
]

# A target spec: a dense (B, T, K) tensor, or fn(audio_slice, column_slice) -> (b, T, k).
TargetFn = Callable[[slice, slice], torch.Tensor]


@dataclass
class FrameLabels:
    """Sparse FLAM targets: labels for every audio x text x frame triple without a (B, T, N) tensor.

    activity: (B, T, C) in {0,1} (bool or float): is an event of label cluster c active at frame t
        of clip b. Cluster ids must be global (e.g. the phrase bank's cluster ids), so that
        synonyms share an id and ids mean the same thing on every rank.
    text_cluster: (N,) long, the cluster of each text in the batch; -1 = none (all targets 0).
    The target of (b, t, n) is ``activity[b, t, text_cluster[n]]``.
    """

    activity: torch.Tensor
    text_cluster: torch.Tensor

    def __post_init__(self) -> None:
        if self.activity.dim() != 3:
            raise ValueError(f"FrameLabels.activity must be (B, T, C), got shape {tuple(self.activity.shape)}")
        if self.text_cluster.dim() != 1 or self.text_cluster.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"FrameLabels.text_cluster must be a 1-D integer tensor, got {self.text_cluster.dtype} {tuple(self.text_cluster.shape)}")
        if self.text_cluster.numel() and int(self.text_cluster.max()) >= self.activity.shape[2]:
            raise ValueError(
                f"FrameLabels.text_cluster has id {int(self.text_cluster.max())} but activity has only {self.activity.shape[2]} clusters"
            )

    def fn(self, text_cluster: torch.Tensor | None = None) -> TargetFn:
        """The chunk function; ``text_cluster`` overrides the stored one (the gathered ids under DDP)."""
        act = self.activity
        tc = self.text_cluster if text_cluster is None else text_cluster

        def chunk(bs: slice, ks: slice) -> torch.Tensor:
            ids = tc[ks].to(act.device)
            valid = (ids >= 0).to(torch.float32)
            cols = act[bs][:, :, ids.clamp(min=0)].to(torch.float32)
            return cols * valid

        return chunk


def _as_fn(targets: torch.Tensor | TargetFn) -> TargetFn:
    if callable(targets) and not isinstance(targets, torch.Tensor):
        return targets
    dense = targets

    def chunk(bs: slice, ks: slice) -> torch.Tensor:
        return dense[bs, :, ks].to(torch.float32)

    return chunk


def _chunks(n: int, size: int):
    for s in range(0, n, max(1, size)):
        yield slice(s, min(n, s + size))


def _cols_of(p: torch.Tensor, ks: slice) -> torch.Tensor:
    """A scale/bias (0-dim, (K,) or (B, K)) for columns ``ks``, broadcastable to (B, T, k)."""
    if p.dim() == 0:
        return p
    return p[ks] if p.dim() == 1 else p[:, ks][:, None, :]


def _add_cols(acc: torch.Tensor, g: torch.Tensor, ks: slice) -> None:
    """Accumulate d/d(scale or bias) from a (B, T, k) gradient into ``acc`` of the param's shape."""
    if acc.dim() == 0:
        acc += g.sum()
    elif acc.dim() == 1:
        acc[ks] += g.sum(dim=(0, 1))
    else:
        acc[:, ks] += g.sum(dim=1)


def _bilinear_chunks(
    frames: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    targets: TargetFn,
    w_bt: torch.Tensor,
    w_bk: torch.Tensor | None,
    chunk_size: int,
    want: tuple[bool, bool, bool, bool],
    norm: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """norm * loss sum and (optionally) its gradients w.r.t. frames, cols, scale, bias."""
    shared = cols.dim() == 2
    k_total = cols.shape[-2]
    b = frames.shape[0]
    g_f = frames.new_zeros(frames.shape) if want[0] else None  # contiguous, for the in-place matmuls
    g_c = cols.new_zeros(cols.shape) if want[1] else None
    g_s = torch.zeros_like(scale) if want[2] else None
    g_b = torch.zeros_like(bias) if want[3] else None
    total = frames.new_zeros(())
    for ks in _chunks(k_total, chunk_size):
        c = cols[ks] if shared else cols[:, ks]
        dot = frame_similarity(frames, c)
        s, bb = _cols_of(scale, ks), _cols_of(bias, ks)
        z = dot * s + bb  # = frame_logits(frames, c, s, bb), keeping `dot` for the scale's gradient
        y = targets(slice(0, b), ks).to(z.dtype)
        w = w_bt[:, :, None] if w_bk is None else w_bt[:, :, None] * w_bk[:, None, ks]
        w = w.expand_as(z)
        total = total + F.binary_cross_entropy_with_logits(z, y, weight=w, reduction="sum")
        if not any(want):
            continue
        g = (torch.sigmoid(z) - y) * (w * norm)  # d (norm * sum) / d z
        if want[0] or want[1]:
            gs = g * s
            # accumulate in place (addmm_/baddbmm_) so no (B, T, D) temporary is made per chunk
            if want[0]:
                if shared:
                    g_f.view(-1, g_f.shape[-1]).addmm_(gs.reshape(-1, gs.shape[-1]), c)
                else:
                    g_f.baddbmm_(gs, c)
            if want[1]:
                if shared:
                    g_c[ks] += gs.reshape(-1, gs.shape[-1]).T @ frames.reshape(-1, frames.shape[-1])
                else:
                    g_c[:, ks] += torch.bmm(gs.transpose(1, 2), frames)
        if want[2]:
            _add_cols(g_s, g * dot, ks)
        if want[3]:
            _add_cols(g_b, g, ks)
    return total * norm, [g_f, g_c, g_s, g_b]


class _FusedBilinearBCE(torch.autograd.Function):
    """Forward computes the (normalised) loss and its gradients chunk by chunk; backward only
    rescales them by the incoming gradient. When that is exactly 1 (the loss is summed into the
    total with weight 1) the saved gradients are handed on as they are: autograd releases this
    node's saved tensors right after backward (unless retain_graph), so no second copy exists."""

    @staticmethod
    def forward(ctx, frames, cols, scale, bias, w_bt, w_bk, targets, chunk_size, norm):  # type: ignore[override]
        want = tuple(bool(x) for x in ctx.needs_input_grad[:4])
        total, grads = _bilinear_chunks(frames, cols, scale, bias, targets, w_bt, w_bk, chunk_size, want, norm)  # type: ignore[arg-type]
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.want = want
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        unit = bool(grad_out == 1)
        out = [(saved[i] if unit else saved[i] * grad_out) if ctx.want[i] else None for i in range(4)]
        return out[0], out[1], out[2], out[3], None, None, None, None, None


def _param(x: torch.Tensor | float, name: str, b: int, k: int, dt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """A scale/bias as 0-dim, (K,) or (B, K) (from (B, 1, K)) of the compute dtype."""
    t = torch.as_tensor(x, device=dev).to(dt)
    if t.numel() == 1:
        return t.reshape(())
    if t.dim() == 3 and t.shape[1] == 1:
        t = t[:, 0]
    if tuple(t.shape) not in ((k,), (b, k)):
        raise ValueError(f"{name} must be a scalar, ({k},) or ({b}, {k}) [or ({b}, 1, {k})], got {tuple(t.shape)}")
    return t


def bilinear_bce_sum(
    frames: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float,
    targets: torch.Tensor | TargetFn,
    w_bt: torch.Tensor,
    w_bk: torch.Tensor | None = None,
    chunk_size: int | None = None,
    norm: float = 1.0,
) -> torch.Tensor:
    """norm * sum_{b,t,k} w_bt[b,t] * w_bk[b,k] * BCE(sigmoid(z[b,t,k]), y[b,t,k]) with
    z = scale_k * <frames[b,t], cols[(b,)k]> + bias_k.

    frames (B, T, D); cols (K, D) shared or (B, K, D) per clip; scale, bias: scalars, per column
    (K,) or per clip and column (B, K) (also accepted as (B, 1, K));
    targets (B, T, K) or a chunk function; w_bt (B, T); w_bk (B, K) or None.
    chunk_size None: plain autograd over the full (B, T, K) logits; an int: the fused chunked
    path (columns ``chunk_size`` at a time). Computed in float32 (float64 for float64 frames)
    with autocast off.
    """
    dev = frames.device
    dt = torch.float64 if frames.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=dev.type, enabled=False):
        frames = frames.to(dt)
        cols = cols.to(dt)
        scale_t = _param(scale, "scale", frames.shape[0], cols.shape[-2], dt, dev)
        bias_t = _param(bias, "bias", frames.shape[0], cols.shape[-2], dt, dev)
        w_bt = w_bt.to(dt)
        w_bk = None if w_bk is None else w_bk.to(dt)
        fn = _as_fn(targets)
        norm = float(norm)
        if cols.shape[-2] == 0:  # no columns: zero, but attached to every input (DDP needs used parameters)
            return (frames.sum() + cols.sum() + scale_t.sum() + bias_t.sum()) * 0.0
        if chunk_size is None:
            total, _ = _bilinear_chunks(frames, cols, scale_t, bias_t, fn, w_bt, w_bk, cols.shape[-2], (False,) * 4, norm)
            return total
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (frames, cols, scale_t, bias_t)):
            return _FusedBilinearBCE.apply(frames, cols, scale_t, bias_t, w_bt, w_bk, fn, int(chunk_size), norm)
        total, _ = _bilinear_chunks(frames, cols, scale_t, bias_t, fn, w_bt, w_bk, int(chunk_size), (False,) * 4, norm)
        return total


def _check_dist(rank: int, world_size: int) -> None:
    if world_size > 1 and not (is_dist() and get_world_size() == world_size and get_rank() == rank):
        raise RuntimeError(
            f"loss called with rank={rank}, world_size={world_size} but the process group is "
            f"{'rank %d of %d' % (get_rank(), get_world_size()) if is_dist() else 'not initialised'}"
        )


def _norm_factor(count: torch.Tensor, world_size: int) -> float:
    """world_size / global_count, so that the mean over ranks of (factor * local sum) is the
    global mean; 0 when nothing is valid anywhere (the loss is then 0, still in the graph)."""
    if world_size > 1:
        count = all_reduce_sum(count)
    c = float(count)
    return world_size / c if c > 0 else 0.0


def _normalise(total: torch.Tensor, count: torch.Tensor, world_size: int) -> torch.Tensor:
    return total * _norm_factor(count, world_size)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_phrase_set_shapes(frame_embeds: torch.Tensor, frame_mask: torch.Tensor, phrase_embeds: torch.Tensor,
                            targets: torch.Tensor, phrase_mask: torch.Tensor, has_frames: torch.Tensor) -> tuple[int, int, int, int]:  # fmt: skip
    """(B, T, D, K) of a per-clip phrase-set loss's inputs, or a ValueError naming the input whose
    shape disagrees (frame_embeds (B, T, D), frame_mask (B, T), phrase_embeds (B, K, D), targets
    (B, T, K), phrase_mask (B, K), has_frames (B,))."""
    b, t, d = frame_embeds.shape
    k = phrase_embeds.shape[1]
    _check_shape("frame_mask", frame_mask, (b, t))
    _check_shape("phrase_embeds", phrase_embeds, (b, k, d))
    _check_shape("targets", targets, (b, t, k))
    _check_shape("phrase_mask", phrase_mask, (b, k))
    _check_shape("has_frames", has_frames, (b,))
    return b, t, d, k


def finelap_frame_loss(
    frame_embeds: torch.Tensor,
    frame_mask: torch.Tensor,
    phrase_embeds: torch.Tensor,
    targets: torch.Tensor,
    phrase_mask: torch.Tensor,
    has_frames: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float,
    chunk_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """FineLAP's frame stream of the dual-stream sigmoid loss.

        z[b,t,k] = scale * <frame_embeds[b,t], phrase_embeds[b,k]> + bias
        loss = sum_{b,t,k valid} BCE(sigmoid(z), targets[b,t,k]) / #valid

    valid = has_frames[b] & frame_mask[b,t] & phrase_mask[b,k]: clips without strong labels do
    not contribute, padded frames and padded phrase slots neither.

    frame_embeds (B, T, D) and phrase_embeds (B, K, D): L2-normalised; each clip has its own
    phrase set (positives plus cluster-sampled negatives, padded to K).
    frame_mask (B, T) bool; targets (B, T, K) in [0, 1]; phrase_mask (B, K) bool; has_frames (B,) bool.
    scale = 1 / tau_l, bias = b_l: scalars or 0-dim tensors (learnable, owned by the model), or
    per phrase slot (B, K) / (B, 1, K) when a text-conditioned head predicts them per phrase.
    chunk_size: phrases per chunk for the fused chunked path (None = full autograd).
    Under DDP no features are exchanged (phrase sets are per clip); the valid-pair count is
    all-reduced so the rank mean equals the global mean (see finelap.dist).
    Returns a 0-dim tensor (0, still attached to the graph, when nothing is valid).
    """
    _check_dist(rank, world_size)
    b, t, d, k = check_phrase_set_shapes(frame_embeds, frame_mask, phrase_embeds, targets, phrase_mask, has_frames)
    has = has_frames.to(torch.float32)
    w_bt = frame_mask.to(torch.float32) * has[:, None]
    w_bk = phrase_mask.to(torch.float32) * has[:, None]
    norm = _norm_factor((w_bt.sum(1) * w_bk.sum(1)).sum(), world_size)
    return bilinear_bce_sum(frame_embeds, phrase_embeds, scale, bias, targets, w_bt, w_bk, chunk_size, norm)


def _gather_texts(
    text_embeds: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, extra: torch.Tensor | None, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if world_size == 1:
        return text_embeds, alpha, beta, extra
    sizes = all_gather_sizes(text_embeds.shape[0], text_embeds.device)
    out = [gather_with_grad(x, sizes) for x in (text_embeds, alpha, beta)]
    ex = gather_with_grad(extra, sizes) if extra is not None else None
    return out[0], out[1], out[2], ex


def _flam_checks(frame_embeds, frame_mask, text_embeds, alpha, beta, has_frames) -> None:
    b, t, d = frame_embeds.shape
    n = text_embeds.shape[0]
    _check_shape("frame_mask", frame_mask, (b, t))
    _check_shape("text_embeds", text_embeds, (n, d))
    _check_shape("alpha", alpha, (n,))
    _check_shape("beta", beta, (n,))
    if has_frames is not None:
        _check_shape("has_frames", has_frames, (b,))


def _flam_targets(targets: torch.Tensor | FrameLabels | TargetFn, tc_all: torch.Tensor | None, b: int, t: int, n_all: int):
    if isinstance(targets, FrameLabels):
        if targets.activity.shape[:2] != (b, t):
            raise ValueError(f"FrameLabels.activity must be (B={b}, T={t}, C), got {tuple(targets.activity.shape)}")
        return targets.fn(tc_all)
    if isinstance(targets, torch.Tensor):
        _check_shape("targets (B, T, N_global)", targets, (b, t, n_all))
    return _as_fn(targets)


def _frame_weights(frame_mask: torch.Tensor, has_frames: torch.Tensor | None) -> torch.Tensor:
    w = frame_mask.to(torch.float32)
    if has_frames is not None:
        w = w * has_frames.to(torch.float32)[:, None]
    return w


def flam_frame_loss(
    frame_embeds: torch.Tensor,
    frame_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    targets: torch.Tensor | FrameLabels | TargetFn,
    has_frames: torch.Tensor | None = None,
    chunk_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """FLAM's frame loss over every audio x text x frame triple of the (global) batch.

        h[b,t,n] = alpha[n] * <frame_embeds[b,t], text_embeds[n]> + beta[n]
        loss = sum_{b,t valid; n} BCE(sigmoid(h), y[b,t,n]) / (#valid frames * N)

    frame_embeds (B, T, D), text_embeds (N, D): L2-normalised. alpha (N,) = exp(MLP(text)),
    beta (N,) = MLP(text), per text. frame_mask (B, T) bool; has_frames (B,) bool or None (all).
    targets: a dense (B, T, N_global) tensor, a ``FrameLabels`` (cluster activity, synonyms
    share a cluster) or a chunk function fn(audio_slice, text_slice) -> (b, T, n).
    This function differentiates through ``beta``; FLAM's convention (frame loss sees
    beta.detach(), the prior loss trains beta) is applied by ``FLAMLoss``.
    Under DDP texts, alpha and beta (and FrameLabels.text_cluster) are gathered with gradient;
    local audio rows are scored against all texts.
    """
    _check_dist(rank, world_size)
    _flam_checks(frame_embeds, frame_mask, text_embeds, alpha, beta, has_frames)
    tc = targets.text_cluster if isinstance(targets, FrameLabels) else None
    text_all, alpha_all, beta_all, tc_all = _gather_texts(text_embeds, alpha, beta, tc, world_size)
    return _flam_frame(frame_embeds, frame_mask, text_all, alpha_all, beta_all, targets, tc_all, has_frames, chunk_size, world_size)


def _flam_frame(frame_embeds, frame_mask, text_all, alpha_all, beta_all, targets, tc_all, has_frames, chunk_size, world_size):
    b, t, _ = frame_embeds.shape
    n_all = text_all.shape[0]
    fn = _flam_targets(targets, tc_all, b, t, n_all)
    w_bt = _frame_weights(frame_mask, has_frames)
    norm = _norm_factor(w_bt.sum() * n_all, world_size)
    return bilinear_bce_sum(frame_embeds, text_all, alpha_all, beta_all, fn, w_bt, None, chunk_size, norm)


def _pos_counts(fn: TargetFn, w_bt: torch.Tensor, num_texts: int, chunk_size: int | None, world_size: int):
    b = w_bt.shape[0]
    pos = torch.zeros(num_texts, dtype=torch.float32, device=w_bt.device)
    with torch.no_grad():
        for ks in _chunks(num_texts, chunk_size or max(num_texts, 1)):
            pos[ks] = (fn(slice(0, b), ks).float() * w_bt.float()[:, :, None]).sum(dim=(0, 1))
        den = w_bt.float().sum()
        if world_size > 1:
            pos = all_reduce_sum(pos)
            den = all_reduce_sum(den)
    return pos, den


def flam_pos_fraction(
    targets: torch.Tensor | FrameLabels | TargetFn,
    frame_mask: torch.Tensor,
    num_texts: int,
    has_frames: torch.Tensor | None = None,
    chunk_size: int | None = None,
    world_size: int = 1,
    text_cluster: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N,) fraction of valid frames of the (global) batch at which each text is active:
    sum_{b,t} w[b,t] y[b,t,n] / sum_{b,t} w[b,t], w = frame_mask * has_frames. No gradient.
    Under DDP the sums are all-reduced (``num_texts`` and the targets' text axis are then the
    global text set; for FrameLabels pass the gathered ``text_cluster``). 0 where no frame is valid.
    """
    fn = targets.fn(text_cluster) if isinstance(targets, FrameLabels) else _as_fn(targets)
    pos, den = _pos_counts(fn, _frame_weights(frame_mask, has_frames), num_texts, chunk_size, world_size)
    return pos / den.clamp(min=1.0)


def flam_prior_loss(beta: torch.Tensor, pos_fraction: torch.Tensor) -> torch.Tensor:
    """FLAM's prior loss: mean_n BCE(sigmoid(beta[n]), pos_fraction[n]).

    beta (N,): the per-text bias (logit); pos_fraction (N,) in [0, 1], the text's fraction of
    positive frames (``flam_pos_fraction``). Its minimum over beta is logit(pos_fraction), so
    sigmoid(beta) learns the text's frame prior.
    """
    _check_shape("pos_fraction", pos_fraction, (beta.shape[0],))
    with torch.autocast(device_type=beta.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(beta.float(), pos_fraction.float().to(beta.device))


def flam_calibrated_prob(logits: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Logit-adjusted (prior-corrected) probability at inference: p / (p + sigmoid(beta)),
    p = sigmoid(logits). Computed as sigmoid(logsigmoid(logits) - logsigmoid(beta)) for stability.

    logits (..., N) frame logits h = alpha * cos + beta; beta (N,) broadcast on the last axis.
    p equal to the prior gives 0.5; the map is increasing in p.
    """
    return torch.sigmoid(F.logsigmoid(logits) - F.logsigmoid(beta))


class FLAMLoss:
    """FLAM's two terms with its detach convention.

    - "frame/flam": ``flam_frame_loss`` with **beta.detach()**: the frame BCE trains the
      embeddings and alpha but not beta, so beta cannot absorb the frame imbalance;
    - "frame/prior": ``flam_prior_loss(beta, pos_fraction)`` trains beta towards the logit of
      the text's positive-frame fraction, which is what inference divides out
      (``flam_calibrated_prob``).

    Under DDP the texts are gathered once for both terms; the prior term is computed on the
    gathered beta and is identical on every rank (convention of finelap.dist).
    """

    def __init__(self, chunk_size: int | None = None, prior: bool = True) -> None:
        self.chunk_size = chunk_size
        self.prior = prior

    def __call__(
        self,
        frame_embeds: torch.Tensor,
        frame_mask: torch.Tensor,
        text_embeds: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        targets: torch.Tensor | FrameLabels | TargetFn,
        has_frames: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Shapes as in ``flam_frame_loss``. Returns {"frame/flam": ..., "frame/prior": ...}."""
        _check_dist(rank, world_size)
        _flam_checks(frame_embeds, frame_mask, text_embeds, alpha, beta, has_frames)
        tc = targets.text_cluster if isinstance(targets, FrameLabels) else None
        text_all, alpha_all, beta_all, tc_all = _gather_texts(text_embeds, alpha, beta, tc, world_size)
        out = {
            "frame/flam": _flam_frame(
                frame_embeds, frame_mask, text_all, alpha_all, beta_all.detach(), targets, tc_all, has_frames, self.chunk_size, world_size
            )
        }
        if self.prior:
            b, t, _ = frame_embeds.shape
            fn = _flam_targets(targets, tc_all, b, t, text_all.shape[0])
            pos, den = _pos_counts(fn, _frame_weights(frame_mask, has_frames), text_all.shape[0], self.chunk_size, world_size)
            if float(den) > 0:
                out["frame/prior"] = flam_prior_loss(beta_all, pos / den)
            else:  # no valid frame anywhere: no prior evidence, keep beta in the graph with zero gradient
                out["frame/prior"] = beta_all.sum() * 0.0
        return out


# ----------------------------------------------------------------------------- objectives (loss.frame)


def frame_inputs(ctx: StepContext) -> dict[str, Any]:
    """The inputs every frame objective reads: frame_embeds (B, T, D) float, frame_mask (B, T),
    has_frames (B,)."""
    return {"frame_embeds": ctx.audio.frame_embeds.float(), "frame_mask": ctx.audio.frame_mask, "has_frames": ctx.batch.has_frames}


def phrase_inputs(ctx: StepContext) -> dict[str, Any]:
    """Each clip's phrase set (FineLAP's frame stream): phrase_embeds (B, K, D), phrase_mask
    (B, K), frame_targets (B, T, K) or None, and frame_logit_scale / frame_logit_bias: the
    model's scalars, or one per phrase slot (B, 1, K) when the model predicts them per text."""
    te = ctx.text.text_embeds.float()
    pi = ctx.texts.phrase_index
    fs, fb = ctx.model.frame_scale_and_bias(ctx.text)
    if ctx.text.frame_logit_scale is not None:  # per-text scale/bias: one per phrase slot
        fs, fb = fs[pi][:, None, :], fb[pi][:, None, :]
    return {
        "phrase_embeds": te[pi],
        "phrase_mask": ctx.batch.phrase_mask,
        "frame_targets": ctx.batch.frame_targets,
        "frame_logit_scale": fs,
        "frame_logit_bias": fb,
    }


def phrase_set_present(x: Inputs) -> bool:
    """Whether this rank's batch has strong labels for its phrase sets."""
    has = x.get("has_frames")
    return x.get("frame_targets") is not None and has is not None and bool(has.any())


def empty_phrase_set(fe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phrase_embeds (B, 0, D), phrase_mask (B, 0), targets (B, T, 0), has_frames (B,) False):
    a rank without strong labels takes part with zero weight when another rank has some."""
    b, t, d = fe.shape
    return (fe.new_zeros(b, 0, d), torch.zeros(b, 0, dtype=torch.bool, device=fe.device), fe.new_zeros(b, t, 0),
            torch.zeros(b, dtype=torch.bool, device=fe.device))  # fmt: skip


def frame_mask_of(x: Inputs, fe: torch.Tensor) -> torch.Tensor:
    """The step's frame mask (B, T), all frames valid when the inputs give none."""
    fm = x.get("frame_mask")
    return fm if fm is not None else torch.ones(fe.shape[:2], dtype=torch.bool, device=fe.device)


@register_objective
class FineLAPFrameObjective(Objective):
    """FineLAP's frame stream (`finelap_frame_loss`) over each annotated clip's phrase set.

    Skipped when no rank has strong labels; under DDP computed on every rank as soon as one has
    (ranks without them contribute zero), because the loss runs collectives.
    """

    name = "finelap"
    slot = "frame"
    all_terms = ("frame/sigmoid",)
    frame_rows = "labelled"  # every frame term is weighted by has_frames
    needs = ("frame_embeds", "frame_mask", "has_frames", "phrase_embeds", "phrase_mask", "frame_targets",
             "frame_logit_scale", "frame_logit_bias")  # fmt: skip

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        return {**frame_inputs(ctx), **phrase_inputs(ctx)}

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        present = phrase_set_present(x)
        if not any_rank(present, world_size, input_device(x)):
            return {}
        fe = self.need(x, "frame_embeds")
        fm = frame_mask_of(x, fe)
        if present:
            pe, pm, tg, hf = self.need(x, "phrase_embeds"), self.need(x, "phrase_mask"), x["frame_targets"], x["has_frames"]
        else:
            pe, pm, tg, hf = empty_phrase_set(fe)
        loss = finelap_frame_loss(fe, fm, pe, tg, pm, hf, self.need(x, "frame_logit_scale"), self.need(x, "frame_logit_bias"),
                                  cfg.frame_chunk_size, rank, world_size)  # fmt: skip
        return {"frame/sigmoid": loss}


def cluster_activity(batch: Batch, clusters: PhraseClusters, timeline: Timeline, n_frames: int) -> torch.Tensor:
    """(B, T, C) float: is an event of cluster c active at frame t of clip b (FLAM targets)."""
    act = torch.zeros(batch.size, n_frames, max(1, clusters.num_clusters))
    for b, events in enumerate(batch.events):
        for e in events:
            c = clusters.cluster_of(e.label)
            if c is None:
                continue
            col = timeline.rasterize([(0, e.onset, e.offset)], [0], n_frames)[:, 0]
            act[b, :, c] = torch.maximum(act[b, :, c], torch.from_numpy(col))
    return act


@register_objective
class FLAMFrameObjective(Objective):
    """FLAM's frame BCE over every audio x text x frame of the batch and its prior loss (`FLAMLoss`).

    The text set is the batch's distinct phrases, each with the model's per-text alpha/beta; every
    (clip, text) pair is labelled through the phrase clusters. DDP as in FineLAP's objective.
    """

    name = "flam"
    slot = "frame"
    all_terms = ("frame/flam", "frame/prior")
    frame_rows = "labelled"  # every frame term is weighted by has_frames
    needs = ("frame_embeds", "frame_mask", "has_frames", "flam_text_embeds", "flam_alpha", "flam_beta", "flam_targets")

    def terms(self, cfg: LossConfig) -> list[str]:
        return ["frame/flam", "frame/prior"] if cfg.flam_prior else ["frame/flam"]

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        x = frame_inputs(ctx)
        st = ctx.texts
        if not len(st.flam_index) or ctx.batch.frame_targets is None:
            return x
        if ctx.text.frame_logit_scale is None:
            raise ConfigError("loss.frame=flam needs model.text_conditioned_scale_bias=true (per-text alpha/beta)")
        if ctx.clusters is None:
            raise ConfigError("loss.frame=flam needs a phrase bank (clusters) to label every audio-text pair")
        n_frames = x["frame_embeds"].shape[1]
        x["flam_text_embeds"] = ctx.text.text_embeds.float()[st.flam_index]
        x["flam_alpha"] = ctx.text.frame_logit_scale[st.flam_index].float()
        x["flam_beta"] = ctx.text.frame_logit_bias[st.flam_index].float()
        x["flam_targets"] = FrameLabels(cluster_activity(ctx.batch, ctx.clusters, ctx.model.timeline, n_frames), st.flam_cluster)
        return x

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        has = x.get("has_frames")
        present = x.get("flam_targets") is not None and (has is None or bool(has.any()))
        if not any_rank(present, world_size, input_device(x)):
            return {}
        fe = self.need(x, "frame_embeds")
        b, t, d = fe.shape
        fm = frame_mask_of(x, fe)
        if present:
            te, al, be = self.need(x, "flam_text_embeds"), self.need(x, "flam_alpha"), self.need(x, "flam_beta")
            tg, hf = x["flam_targets"], has
        else:  # this rank has no strong labels but another has: take part with zero texts
            te, al, be = fe.new_zeros(0, d), fe.new_zeros(0), fe.new_zeros(0)
            tg = lambda bs, ks: torch.zeros(b, t, ks.stop - ks.start, device=fe.device)  # noqa: E731
            hf = torch.zeros(b, dtype=torch.bool, device=fe.device)
        return dict(FLAMLoss(cfg.frame_chunk_size, cfg.flam_prior)(fe, fm, te, al, be, tg, hf, rank, world_size))
