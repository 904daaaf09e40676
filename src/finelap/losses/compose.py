"""Loss configuration and composition by term name.

Term names (the keys of the returned dict, and the keys of ``LossConfig.weights``):

    clip/infonce  clip/sigmoid  clip/hard_negative        one, chosen by LossConfig.clip
    frame/sigmoid                                          FineLAP frame stream (LossConfig.frame="finelap")
    frame/flam  frame/prior                                FLAM frame BCE and prior (frame="flam")
    aux/distill  aux/caption                               SLAP self-distillation and captioning

A weight key is a term name or a group ("clip", "frame", "aux"): the exact name wins, then the
group, then 1.0; so ``loss.weights.frame=2.0`` scales every frame term and
``loss.weights.frame/prior=0.1`` only the prior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import ConfigError
from ..dist import all_reduce_sum
from .aux import _DISTILL_KINDS, caption_loss, masked_distill_loss
from .clip import hard_negative_info_nce, info_nce, sigmoid_loss
from .frame import FLAMLoss, FrameLabels, TargetFn, finelap_frame_loss

__all__ = ["TERMS", "GROUPS", "LossConfig", "LossInputs", "compose", "compute_losses"]

CLIP_KINDS = ("infonce", "sigmoid", "hard_negative")
FRAME_KINDS = ("finelap", "flam")
_CLIP_TERM = {"infonce": "clip/infonce", "sigmoid": "clip/sigmoid", "hard_negative": "clip/hard_negative"}
TERMS = frozenset(
    {"clip/infonce", "clip/sigmoid", "clip/hard_negative", "frame/sigmoid", "frame/flam", "frame/prior", "aux/distill", "aux/caption"}
)
GROUPS = frozenset({"clip", "frame", "aux"})


@dataclass
class LossConfig:
    """Which objectives to train and how to weight them (one dataclass for the loss concern).

    clip: "infonce" | "sigmoid" | "hard_negative" | None.
    frame: "finelap" | "flam" | None.
    weights: term name or group -> weight (see the module docstring); absent = 1.0.
    frame_chunk_size: phrases/texts per chunk of the fused frame BCE (None = full autograd).
    clip_chunk_size: texts per chunk of the sigmoid clip loss (sigmoid only; None = full).
    hard_negative_beta: MGA-CLAP's beta (gamma in the paper), hard_negative only.
    local_loss: InfoNCE computes only local rows under DDP (same gradients, less compute).
    flam_prior: train FLAM's per-text bias with the prior loss (frame="flam").
    mask_false_negatives: clips with equal captions are positives of each other (needs groups).
    distill: SLAP masked-frame self-distillation kind "cosine" | "mse" | "ce" | None.
    caption: train a caption decoder with token cross-entropy; caption_label_smoothing eps.
    """

    clip: str | None = "infonce"
    frame: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    frame_chunk_size: int | None = 16
    clip_chunk_size: int | None = None
    hard_negative_beta: float = 0.15
    local_loss: bool = False
    flam_prior: bool = True
    mask_false_negatives: bool = True
    distill: str | None = None
    distill_student_temperature: float = 0.1
    distill_teacher_temperature: float = 0.04
    caption: bool = False
    caption_label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.clip is not None and self.clip not in CLIP_KINDS:
            raise ConfigError(f"loss.clip: unknown clip loss {self.clip!r}; choose one of {CLIP_KINDS} or null")
        if self.frame is not None and self.frame not in FRAME_KINDS:
            raise ConfigError(f"loss.frame: unknown frame loss {self.frame!r}; choose one of {FRAME_KINDS} or null")
        if self.distill is not None and self.distill not in _DISTILL_KINDS:
            raise ConfigError(f"loss.distill: unknown kind {self.distill!r}; choose one of {_DISTILL_KINDS} or null")
        if not self.terms():
            raise ConfigError("loss: no objective is enabled (clip, frame, distill and caption are all off)")
        for key, w in self.weights.items():
            if key not in TERMS and key not in GROUPS:
                raise ConfigError(f"loss.weights: unknown term {key!r}; known terms: {sorted(TERMS)}, groups: {sorted(GROUPS)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"loss.weights.{key}: weight must be a finite number >= 0, got {w!r}")
            active = self.terms()
            if key in TERMS and key not in active or key in GROUPS and not any(t.startswith(key + "/") for t in active):
                raise ConfigError(f"loss.weights.{key} is set but that term is not enabled by this config (active terms: {active})")
        for name in ("frame_chunk_size", "clip_chunk_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"loss.{name} must be a positive integer or null, got {v!r}")
        if self.clip_chunk_size is not None and self.clip != "sigmoid":
            raise ConfigError(f"loss.clip_chunk_size only applies to clip=sigmoid (clip is {self.clip!r})")
        if self.hard_negative_beta != 0.15 and self.clip != "hard_negative":
            raise ConfigError(f"loss.hard_negative_beta is set but clip is {self.clip!r}, not 'hard_negative'")
        if self.local_loss and self.clip != "infonce":
            raise ConfigError(f"loss.local_loss only applies to clip=infonce (clip is {self.clip!r})")
        if self.caption_label_smoothing and not self.caption:
            raise ConfigError("loss.caption_label_smoothing is set but caption is off")
        if not 0.0 <= self.caption_label_smoothing < 1.0:
            raise ConfigError(f"loss.caption_label_smoothing must be in [0, 1), got {self.caption_label_smoothing}")
        if self.distill_student_temperature <= 0 or self.distill_teacher_temperature <= 0:
            raise ConfigError("loss.distill_*_temperature must be > 0")

    def terms(self) -> list[str]:
        """The term names this config produces, in a fixed order."""
        out = []
        if self.clip is not None:
            out.append(_CLIP_TERM[self.clip])
        if self.frame == "finelap":
            out.append("frame/sigmoid")
        elif self.frame == "flam":
            out += ["frame/flam", "frame/prior"] if self.flam_prior else ["frame/flam"]
        if self.distill is not None:
            out.append("aux/distill")
        if self.caption:
            out.append("aux/caption")
        return out

    def weight(self, name: str) -> float:
        return _weight(self.weights, name)

    def resolved_weights(self) -> dict[str, float]:
        """Every active term's effective weight."""
        return {t: self.weight(t) for t in self.terms()}


def _weight(weights: Mapping[str, float], name: str) -> float:
    if name in weights:
        return float(weights[name])
    return float(weights.get(name.split("/", 1)[0], 1.0))


def compose(terms: Mapping[str, torch.Tensor | None], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Weighted sum of named terms.

    terms: term name -> 0-dim tensor, or None for a term absent from this batch (skipped).
    weights: term name or group -> weight (exact name, then group, then 1.0).
    Returns the present terms plus "loss" = sum_name weight(name) * term.
    Raises ConfigError for an unknown weight name, ValueError for an unknown term name or when
    no term is present.
    """
    for key in weights:
        if key not in TERMS and key not in GROUPS:
            raise ConfigError(f"loss weight for unknown term {key!r}; known terms: {sorted(TERMS)}, groups: {sorted(GROUPS)}")
    out: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for name, value in terms.items():
        if name not in TERMS:
            raise ValueError(f"unknown loss term {name!r}; known terms: {sorted(TERMS)}")
        if value is None:
            continue
        out[name] = value
        part = value * _weight(weights, name)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"no loss term is present in this batch (terms given: {sorted(terms)})")
    out["loss"] = total
    return out


@dataclass
class LossInputs:
    """Everything the losses read, as tensors (independent of the model class). Shapes:
    B clips, D embedding size, T frames, K phrases per clip, N FLAM texts, L tokens, V vocabulary.

    audio_embeds (B, D), text_embeds (B, D): clip embeddings, L2-normalised, one caption per clip.
    logit_scale, logit_bias: clip-level scale (= 1/temperature, already exponentiated) and bias.
    has_caption (B,) bool: rows that take part in the clip loss (None = all).
    caption_groups (B,) int64: equal for equal captions (``caption_ids``), masks false negatives.
    frame_embeds (B, T, D) L2-normalised, frame_mask (B, T) bool.
    FineLAP: phrase_embeds (B, K, D), phrase_mask (B, K), frame_targets (B, T, K) or None when
        no clip of the batch has events, has_frames (B,), frame_logit_scale / frame_logit_bias.
    FLAM: flam_text_embeds (N, D), flam_alpha (N,), flam_beta (N,), flam_targets (dense
        (B, T, N_global) or FrameLabels) or None when absent; has_frames as above.
    SLAP: student_frames / teacher_frames (B, T, D), distill_mask (B, T); caption_logits
        (B, L, V), caption_targets (B, L), caption_pad_id.
    """

    audio_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | float | None = None
    logit_bias: torch.Tensor | float | None = None
    has_caption: torch.Tensor | None = None
    caption_groups: torch.Tensor | None = None
    frame_embeds: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    has_frames: torch.Tensor | None = None
    phrase_embeds: torch.Tensor | None = None
    phrase_mask: torch.Tensor | None = None
    frame_targets: torch.Tensor | None = None
    frame_logit_scale: torch.Tensor | float | None = None
    frame_logit_bias: torch.Tensor | float | None = None
    flam_text_embeds: torch.Tensor | None = None
    flam_alpha: torch.Tensor | None = None
    flam_beta: torch.Tensor | None = None
    flam_targets: torch.Tensor | FrameLabels | TargetFn | None = None
    student_frames: torch.Tensor | None = None
    teacher_frames: torch.Tensor | None = None
    distill_mask: torch.Tensor | None = None
    caption_logits: torch.Tensor | None = None
    caption_targets: torch.Tensor | None = None
    caption_pad_id: int = 0


def _global_any(flag: bool, world_size: int, device: torch.device) -> bool:
    """Whether any rank has the term; ranks must agree, since the losses run collectives."""
    if world_size == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def _need(x, what: str, term: str):
    if x is None:
        raise ValueError(f"loss term {term} needs LossInputs.{what}")
    return x


def compute_losses(cfg: LossConfig, x: LossInputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Every term ``cfg`` enables that this batch supports, composed with ``cfg``'s weights.

    Terms are skipped (absent from the result) when the batch lacks their supervision: frame
    terms without frame targets, distillation without teacher frames, captioning without
    caption targets. Under DDP the frame terms are computed on every rank as soon as one rank
    has targets (ranks without them contribute zero), because those losses run collectives;
    the modules that would have produced the missing inputs (e.g. FLAM's alpha/beta MLPs) are
    then unused on that rank, so wrap the model with ``find_unused_parameters=True`` or always
    pass those inputs. ``caption_groups`` must be given on every rank or on none.
    Returns {term: value, ..., "loss": weighted sum}.
    """
    terms: dict[str, torch.Tensor | None] = {}
    ref = next((t for t in (x.audio_embeds, x.frame_embeds, x.student_frames, x.caption_logits) if isinstance(t, torch.Tensor)), None)
    device = ref.device if ref is not None else torch.device("cpu")
    if cfg.clip is not None:
        name = _CLIP_TERM[cfg.clip]
        audio = _need(x.audio_embeds, "audio_embeds", name)
        text = x.text_embeds
        # under DDP, groups must be given on every rank or on none (they are gathered)
        groups = x.caption_groups if cfg.mask_false_negatives else None
        if text is None:  # no caption in this batch: take part with zero rows (other ranks may have some)
            keep = torch.zeros(audio.shape[0], dtype=torch.bool, device=audio.device)
            text = audio
        else:
            keep = x.has_caption.to(torch.bool) if x.has_caption is not None else None
        if keep is not None:
            audio, text = audio[keep], text[keep]
            groups = groups[keep] if groups is not None else None
        scale = _need(x.logit_scale, "logit_scale", name)
        if cfg.clip == "infonce":
            terms[name] = info_nce(audio, text, scale, rank, world_size, cfg.local_loss, groups)
        elif cfg.clip == "sigmoid":
            bias = _need(x.logit_bias, "logit_bias", name)
            terms[name] = sigmoid_loss(audio, text, scale, bias, rank, world_size, groups, cfg.clip_chunk_size)
        else:
            terms[name] = hard_negative_info_nce(audio, text, scale, cfg.hard_negative_beta, rank, world_size, groups)
    if cfg.frame == "finelap":
        present = x.frame_targets is not None and x.has_frames is not None and bool(x.has_frames.any())
        if _global_any(present, world_size, device):
            fe = _need(x.frame_embeds, "frame_embeds", "frame/sigmoid")
            b, t, d = fe.shape
            fm = x.frame_mask if x.frame_mask is not None else torch.ones(b, t, dtype=torch.bool, device=fe.device)
            if present:
                pe, pm, tg, hf = _need(x.phrase_embeds, "phrase_embeds", "frame/sigmoid"), _need(x.phrase_mask, "phrase_mask", "frame/sigmoid"), x.frame_targets, x.has_frames
            else:  # this rank has no strong labels but another has: take part with zero weight
                pe = fe.new_zeros(b, 0, d)
                pm = torch.zeros(b, 0, dtype=torch.bool, device=fe.device)
                tg = fe.new_zeros(b, t, 0)
                hf = torch.zeros(b, dtype=torch.bool, device=fe.device)
            terms["frame/sigmoid"] = finelap_frame_loss(
                fe, fm, pe, tg, pm, hf,
                _need(x.frame_logit_scale, "frame_logit_scale", "frame/sigmoid"),
                _need(x.frame_logit_bias, "frame_logit_bias", "frame/sigmoid"),
                cfg.frame_chunk_size, rank, world_size,
            )  # fmt: skip
    elif cfg.frame == "flam":
        present = x.flam_targets is not None and (x.has_frames is None or bool(x.has_frames.any()))
        if _global_any(present, world_size, device):
            fe = _need(x.frame_embeds, "frame_embeds", "frame/flam")
            b, t, d = fe.shape
            fm = x.frame_mask if x.frame_mask is not None else torch.ones(b, t, dtype=torch.bool, device=fe.device)
            if present:
                te, al, be = (_need(x.flam_text_embeds, "flam_text_embeds", "frame/flam"),
                              _need(x.flam_alpha, "flam_alpha", "frame/flam"), _need(x.flam_beta, "flam_beta", "frame/flam"))  # fmt: skip
                tg, hf = x.flam_targets, x.has_frames
            else:
                te, al, be = fe.new_zeros(0, d), fe.new_zeros(0), fe.new_zeros(0)
                tg = lambda bs, ks: torch.zeros(b, t, ks.stop - ks.start, device=fe.device)  # noqa: E731
                hf = torch.zeros(b, dtype=torch.bool, device=fe.device)
            terms.update(FLAMLoss(cfg.frame_chunk_size, cfg.flam_prior)(fe, fm, te, al, be, tg, hf, rank, world_size))
    if cfg.distill is not None and x.student_frames is not None and x.teacher_frames is not None:
        terms["aux/distill"] = masked_distill_loss(
            x.student_frames, x.teacher_frames, _need(x.distill_mask, "distill_mask", "aux/distill"), cfg.distill,
            cfg.distill_student_temperature, cfg.distill_teacher_temperature, world_size=world_size,
        )  # fmt: skip
    if cfg.caption and x.caption_logits is not None and x.caption_targets is not None:
        terms["aux/caption"] = caption_loss(x.caption_logits, x.caption_targets, x.caption_pad_id, cfg.caption_label_smoothing, world_size)
    return compose(terms, cfg.weights)
