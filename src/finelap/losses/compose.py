"""Composition of the enabled objectives' terms, weighted by name.

Each objective (`finelap.losses.objective.Objective`, one per module of ``finelap.losses``,
registered by name) declares its terms; the config (`LossConfig`, in ``finelap.loss_config``,
re-exported here) says which objectives are on and weights the terms: a weight key is a term name
or a group ("clip", "frame", "aux"); the exact name wins, then the group, then 1.0. So
``loss.weights.frame=2.0`` scales every frame term and ``loss.weights.frame/prior=0.1`` only the
prior. Built-in terms:

    clip/infonce  clip/sigmoid  clip/hard_negative        one, chosen by LossConfig.clip
    frame/sigmoid                                          FineLAP frame stream (LossConfig.frame="finelap")
    frame/flam  frame/prior                                FLAM frame BCE and prior (frame="flam")
    frame/infonce                                          frame-level InfoNCE (frame="frame_infonce")
    aux/distill  aux/caption                               SLAP self-distillation and captioning

``TERMS`` and ``GROUPS`` (every registered term and group) are computed on first access.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from ..errors import ConfigError
from ..loss_config import LossConfig, known_groups, known_terms, term_weight
from .frame import FrameLabels, TargetFn
from .objective import StepContext

__all__ = ["TERMS", "GROUPS", "LossConfig", "LossInputs", "compose", "compute_losses", "gather_inputs"]


def __getattr__(name: str) -> Any:
    # computed on access, not at import: the registry imports this package to fill itself
    if name == "TERMS":
        return known_terms()
    if name == "GROUPS":
        return known_groups()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compose(terms: Mapping[str, torch.Tensor | None], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Weighted sum of named terms.

    terms: term name -> 0-dim tensor, or None for a term absent from this batch (skipped).
    weights: term name or group -> weight (exact name, then group, then 1.0).
    Returns the present terms plus "loss" = sum_name weight(name) * term.
    Raises ConfigError for an unknown weight name, ValueError for an unknown term name or when
    no term is present.
    """
    known, groups = known_terms(), known_groups()
    for key in weights:
        if key not in known and key not in groups:
            raise ConfigError(f"loss weight for unknown term {key!r}; known terms: {sorted(known)}, groups: {sorted(groups)}")
    out: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for name, value in terms.items():
        if name not in known:
            raise ValueError(f"unknown loss term {name!r}; known terms: {sorted(known)}")
        if value is None:
            continue
        out[name] = value
        part = value * term_weight(weights, name)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"no loss term is present in this batch (terms given: {sorted(terms)})")
    out["loss"] = total
    return out


@dataclass
class LossInputs:
    """The inputs of the built-in objectives, as tensors (independent of the model class); a
    plain mapping with the same names (and any an objective adds) works too. Shapes:
    B clips, D embedding size, T frames, K phrases per clip, N FLAM texts, L tokens, V vocabulary.

    audio_embeds (B, D), text_embeds (B, D): clip embeddings, L2-normalised, one caption per clip.
    logit_scale, logit_bias: clip-level scale (= 1/temperature, already exponentiated) and bias.
    has_caption (B,) bool: rows that take part in the clip loss (None = all).
    caption_groups (B,) int64: equal for equal captions (``caption_ids``), masks false negatives.
    frame_embeds (B, T, D) L2-normalised, frame_mask (B, T) bool.
    FineLAP and frame_infonce: phrase_embeds (B, K, D), phrase_mask (B, K), frame_targets
        (B, T, K) or None when no clip of the batch has events, has_frames (B,),
        frame_logit_scale / frame_logit_bias.
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


def _as_inputs(x: LossInputs | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(x, LossInputs):
        return {f.name: getattr(x, f.name) for f in fields(x)}  # not asdict: it would copy every tensor
    return x


def gather_inputs(cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
    """The inputs of every objective ``cfg`` enables, read from one step (`Objective.gather`)."""
    x: dict[str, Any] = {}
    for obj in cfg.objectives():
        x.update(obj.gather(cfg, ctx))
    return x


def frame_rows_needed(cfg: LossConfig) -> str:
    """Whose frame embeddings the enabled objectives read: "all", "labelled" (only clips with
    strong labels) or "none" (`Objective.frame_rows`); the trainer skips the frame head elsewhere."""
    kinds = {obj.frame_rows_read() for obj in cfg.objectives()}
    return "all" if "all" in kinds else "labelled" if "labelled" in kinds else "none"


def compute_losses(cfg: LossConfig, x: LossInputs | Mapping[str, Any], rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Every term ``cfg`` enables that this batch supports, composed with ``cfg``'s weights.

    x: a `LossInputs`, or a mapping of input names to values (`gather_inputs`; an objective may
    read names of its own). Terms are skipped (absent from the result) when the batch lacks their
    supervision: frame terms without frame targets, distillation without teacher frames,
    captioning without caption targets. Under DDP the frame terms are computed on every rank as
    soon as one rank has targets (ranks without them contribute zero), because those losses run
    collectives; the modules that would have produced the missing inputs (e.g. FLAM's alpha/beta
    MLPs) are then unused on that rank, so wrap the model with ``find_unused_parameters=True`` or
    always pass those inputs. ``caption_groups`` must be given on every rank or on none.
    Returns {term: value, ..., "loss": weighted sum}.
    """
    inputs = _as_inputs(x)
    terms: dict[str, torch.Tensor | None] = {}
    for obj in cfg.objectives():
        terms.update(obj.compute(cfg, inputs, rank, world_size))
    return compose(terms, cfg.weights)
