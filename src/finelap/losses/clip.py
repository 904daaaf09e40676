"""Clip-level audio-text losses: InfoNCE (CLAP/CLIP), pairwise sigmoid (SigLIP) and MGA-CLAP's
hard-negative guided InfoNCE.

Inputs: ``audio`` (B, D) and ``text`` (B, D), L2-normalised, row i of each forming a pair.
Several captions per clip: the caller picks one caption per clip per step (the batcher does),
so each row has exactly one text. Clips sharing a caption text are false negatives of each
other; pass ``groups`` (B,) int64 ids, equal for equal captions, to make such pairs positives
(``caption_ids`` hashes caption strings to ids that agree across ranks).

Distributed (rank, world_size > 1): features are gathered with gradient (``gather_with_grad``)
and each rank computes the rows of its own audio (audio->text) and its own texts
(text->audio) against the global batch, normalised by the global batch size. See
``finelap.dist`` for the convention that makes DDP gradients equal single-process ones.
Local batch sizes may differ between ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.batching import caption_ids  # re-exported: the hash is made at collation time
from ..dist import all_gather_sizes, gather_with_grad
from ..loss_config import LossConfig
from .frame import _check_dist, bilinear_bce_sum
from .objective import Inputs, Objective, StepContext, register_objective

__all__ = [
    "info_nce", "sigmoid_loss", "hard_negative_info_nce", "caption_ids",
    "InfoNCEObjective", "SigmoidObjective", "HardNegativeObjective",
]  # fmt: skip


@dataclass
class _Global:
    audio_all: torch.Tensor  # (N, D)
    text_all: torch.Tensor  # (N, D)
    groups_local: torch.Tensor  # (n,)
    groups_all: torch.Tensor  # (N,)
    n_global: int


def _prepare(audio: torch.Tensor, text: torch.Tensor, groups: torch.Tensor | None, rank: int, world_size: int) -> _Global:
    if audio.dim() != 2 or audio.shape != text.shape:
        raise ValueError(f"audio and text must both be (B, D) with the same shape, got {tuple(audio.shape)} and {tuple(text.shape)}")
    if groups is not None and (groups.dim() != 1 or groups.shape[0] != audio.shape[0]):
        raise ValueError(f"groups must be (B,)={audio.shape[0]}, got {tuple(groups.shape)}")
    _check_dist(rank, world_size)
    n = audio.shape[0]
    if world_size == 1:
        g = groups if groups is not None else torch.arange(n, device=audio.device)
        return _Global(audio, text, g, g, n)
    sizes = all_gather_sizes(n, audio.device)
    offset = sum(sizes[:rank])
    a_all = gather_with_grad(audio, sizes)
    t_all = gather_with_grad(text, sizes)
    if groups is None:
        g_all = torch.arange(sum(sizes), device=audio.device)
        g_loc = g_all[offset : offset + n]
    else:
        g_all = gather_with_grad(groups.to(audio.device), sizes)
        g_loc = groups.to(audio.device)
    return _Global(a_all, t_all, g_loc, g_all, sum(sizes))


def _positives(g_rows: torch.Tensor, g_cols: torch.Tensor) -> torch.Tensor:
    return g_rows[:, None] == g_cols[None, :]


def _soft_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per row: -sum_j P_ij log softmax(logits)_ij with P uniform over the row's positives."""
    p = pos.to(logits.dtype)
    p = p / p.sum(1, keepdim=True).clamp(min=1.0)
    return -(p * F.log_softmax(logits, dim=1)).sum(1)


def _zero(*xs) -> torch.Tensor:
    """0, attached to every tensor given (an empty global batch must still use the parameters)."""
    ts = [x for x in xs if isinstance(x, torch.Tensor)]
    return sum((t.sum() for t in ts[1:]), ts[0].sum()) * 0.0


def _f32(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]


def info_nce(
    audio: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLAP/CLIP).

        L = logit_scale * A @ T^T                      (N, N), N = global batch
        P_ij = [g_i == g_j] / #{k: g_k == g_i}         (identity without groups)
        loss = ( mean_i CE(L[i, :], P[i]) + mean_j CE(L[:, j], P[j]) ) / 2

    audio, text (B, D) L2-normalised; logit_scale = 1/temperature (already exponentiated).
    local_loss=False (world_size > 1): every rank builds the full (N, N) matrix and returns the
    global loss; True: only its own rows/columns (B, N), returning world_size x its share.
    Both give the same DDP gradients. Returns a 0-dim tensor.
    """
    audio, text = _f32(audio, text)
    g = _prepare(audio, text, groups, rank, world_size)
    if g.n_global == 0:
        return _zero(audio, text, logit_scale)
    if local_loss or world_size == 1:
        pos = _positives(g.groups_local, g.groups_all)
        la = logit_scale * audio @ g.text_all.T  # (B, N): own audio vs all texts
        lt = logit_scale * text @ g.audio_all.T  # (B, N): own texts vs all audio
        total = _soft_ce(la, pos).sum() + _soft_ce(lt, pos).sum()
        return total / 2 * (world_size / g.n_global)
    pos = _positives(g.groups_all, g.groups_all)
    logits = logit_scale * g.audio_all @ g.text_all.T
    return (_soft_ce(logits, pos).mean() + _soft_ce(logits.T, pos).mean()) / 2


def sigmoid_loss(
    audio: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float,
    rank: int = 0,
    world_size: int = 1,
    groups: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss, normalised by the number of audio clips (as in SigLIP):

        z_ij = +1 if g_i == g_j (the pair, or an equal caption) else -1
        loss = -(1/N) sum_{i,j} log sigmoid( z_ij * (scale * <a_i, t_j> + bias) )

    audio, text (B, D) L2-normalised; scale (= exp(t')) and bias learnable scalars.
    Cross-rank: texts are gathered with gradient; each rank sums its own audio rows against all
    texts (audio rows cover every pair exactly once), returning world_size x its share.
    chunk_size: texts per chunk through the fused chunked BCE (same value and gradients as the
    full path, memory O(B x chunk) instead of O(B x N)). Returns a 0-dim tensor.
    """
    audio, text = _f32(audio, text)
    g = _prepare(audio, text, groups, rank, world_size)
    if g.n_global == 0:
        return _zero(audio, text, scale, bias)
    pos = _positives(g.groups_local, g.groups_all)  # (B, N); bool labels are tiny next to the logits
    norm = world_size / g.n_global
    if chunk_size is None:
        logits = scale * audio @ g.text_all.T + bias
        signs = pos.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum() * norm
    # -log sigmoid(z * l) = BCE(sigmoid(l), y) with y = (z + 1) / 2: the frame BCE kernel with T = 1.
    y = pos.to(audio.dtype)[:, None, :]
    w_bt = torch.ones(audio.shape[0], 1, dtype=audio.dtype, device=audio.device)
    return bilinear_bce_sum(audio[:, None, :], g.text_all, scale, bias, y, w_bt, None, chunk_size, norm)


def _hard_negative_rows(logits: torch.Tensor, pos: torch.Tensor, beta: float, detach_weights: bool) -> torch.Tensor:
    """Per-row hard-negative guided CE (see ``hard_negative_info_nce``)."""
    neg = ~pos
    n_neg = neg.sum(1, keepdim=True)
    bl = beta * (logits.detach() if detach_weights else logits)
    no_neg = n_neg == 0
    # rows without negatives keep finite entries so logsumexp and its gradient stay finite
    lse_neg = torch.logsumexp(bl.masked_fill(~(neg | no_neg), float("-inf")), dim=1, keepdim=True)
    log_w = torch.where(neg, torch.log(n_neg.clamp(min=1).to(logits.dtype)) + bl - lse_neg, torch.zeros_like(bl))
    log_den = torch.logsumexp(logits + log_w, dim=1, keepdim=True)
    p = pos.to(logits.dtype)
    p = p / p.sum(1, keepdim=True).clamp(min=1.0)
    return -(p * (logits - log_den)).sum(1)


def hard_negative_info_nce(
    audio: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    beta: float = 0.15,
    rank: int = 0,
    world_size: int = 1,
    groups: torch.Tensor | None = None,
    detach_weights: bool = False,
) -> torch.Tensor:
    """MGA-CLAP's hard-negative guided InfoNCE (Li et al., ACM MM 2024), both directions.

    With logits L = logit_scale * A @ T^T, for each row i (audio->text; text->audio uses L^T),
    positives Pos_i = {j: g_j == g_i}, negatives Neg_i = the rest:

        w_ij = |Neg_i| * exp(beta * L_ij) / sum_{k in Neg_i} exp(beta * L_ik)   for j in Neg_i
        w_ij = 1                                                                 for j in Pos_i
        loss_i = -sum_{j in Pos_i} (1/|Pos_i|) * log( exp(L_ij) / sum_k w_ik exp(L_ik) )
        loss = (mean_i loss_i[a->t] + mean_j loss_j[t->a]) / 2

    The negative weights average exactly 1 over each row, so beta = 0 gives InfoNCE and
    beta > 0 up-weights negatives that score high (hard negatives). As in the official code
    (Ming-er/MGA-CLAP tools/losses.py, beta there = gamma in the paper, default 0.15), beta
    multiplies the *scaled* logits and the weights are not detached (``detach_weights=True``
    treats them as constants). One deliberate difference: the official code normalises by
    (B-1) / (sum_k exp(beta L_ik) - exp(beta L_ij)), i.e. by the row minus entry j (the
    positive included); we normalise over the negatives, so weights average 1 as the paper states.
    Cross-rank: own rows against the gathered batch; rows are complete, so weights are exact.
    """
    audio, text = _f32(audio, text)
    g = _prepare(audio, text, groups, rank, world_size)
    if g.n_global == 0:
        return _zero(audio, text, logit_scale)
    pos = _positives(g.groups_local, g.groups_all)
    la = logit_scale * audio @ g.text_all.T
    lt = logit_scale * text @ g.audio_all.T
    total = _hard_negative_rows(la, pos, beta, detach_weights).sum() + _hard_negative_rows(lt, pos, beta, detach_weights).sum()
    return total / 2 * (world_size / g.n_global)


# ----------------------------------------------------------------------------- objectives (loss.clip)


class _ClipObjective(Objective):
    """A clip-level objective over the batch's (audio, caption) pairs: rows without a caption are
    left out, and clips with equal captions are positives of each other (mask_false_negatives)."""

    slot = "clip"
    needs = ("audio_embeds", "text_embeds", "logit_scale", "logit_bias", "has_caption", "caption_groups")

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        """audio_embeds (B, D), text_embeds (B, D) (each clip's caption), logit_scale/bias (0-dim),
        has_caption (B,), caption_groups (B,)."""
        scale, bias = ctx.model.clip_scale_and_bias()
        return {
            "audio_embeds": ctx.audio.audio_embeds.float(),
            "text_embeds": ctx.text.text_embeds.float()[ctx.texts.caption_index],
            "logit_scale": scale,
            "logit_bias": bias,
            "has_caption": ctx.batch.has_caption,
            "caption_groups": ctx.batch.caption_group,
        }

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        (term,) = self.all_terms
        audio = self.need(x, "audio_embeds")
        text = x.get("text_embeds")
        # under DDP, groups must be given on every rank or on none (they are gathered)
        groups = x.get("caption_groups") if cfg.mask_false_negatives else None
        if text is None:  # no caption in this batch: take part with zero rows (other ranks may have some)
            keep = torch.zeros(audio.shape[0], dtype=torch.bool, device=audio.device)
            text = audio
        else:
            has = x.get("has_caption")
            keep = has.to(torch.bool) if has is not None else None
        if keep is not None:
            audio, text = audio[keep], text[keep]
            groups = groups[keep] if groups is not None else None
        return {term: self.loss(cfg, x, audio, text, groups, rank, world_size)}

    def loss(self, cfg: LossConfig, x: Inputs, audio: torch.Tensor, text: torch.Tensor, groups: torch.Tensor | None,
             rank: int, world_size: int) -> torch.Tensor:  # fmt: skip
        """The loss over the kept rows: audio, text (n, D), groups (n,) or None."""
        raise NotImplementedError


@register_objective
class InfoNCEObjective(_ClipObjective):
    """CLAP/CLIP's symmetric InfoNCE (`info_nce`)."""

    name = "infonce"
    all_terms = ("clip/infonce",)
    own_options = ("local_loss",)

    def loss(self, cfg, x, audio, text, groups, rank, world_size):
        return info_nce(audio, text, self.need(x, "logit_scale"), rank, world_size, cfg.local_loss, groups)


@register_objective
class SigmoidObjective(_ClipObjective):
    """SigLIP's pairwise sigmoid loss (`sigmoid_loss`), optionally chunked over texts."""

    name = "sigmoid"
    all_terms = ("clip/sigmoid",)
    own_options = ("clip_chunk_size",)

    def loss(self, cfg, x, audio, text, groups, rank, world_size):
        scale, bias = self.need(x, "logit_scale"), self.need(x, "logit_bias")
        return sigmoid_loss(audio, text, scale, bias, rank, world_size, groups, cfg.clip_chunk_size)


@register_objective
class HardNegativeObjective(_ClipObjective):
    """MGA-CLAP's hard-negative guided InfoNCE (`hard_negative_info_nce`)."""

    name = "hard_negative"
    all_terms = ("clip/hard_negative",)
    own_options = ("hard_negative_beta",)

    def loss(self, cfg, x, audio, text, groups, rank, world_size):
        return hard_negative_info_nce(audio, text, self.need(x, "logit_scale"), cfg.hard_negative_beta, rank, world_size, groups)
