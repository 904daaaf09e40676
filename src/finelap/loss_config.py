"""The loss section of a run config: which objectives to train and how to weight their terms.

The objectives themselves live in ``finelap.losses`` (one module each, registered by name in
``finelap.registry.LOSSES``). This module sits below them (floor 2): it looks objectives up by
name through the registry, which imports the ``finelap.losses`` package on the first lookup, so a
config naming an unknown objective fails with a ConfigError when it is resolved, and nothing here
imports upwards.

Term names (the keys ``compute_losses`` returns and the keys of ``LossConfig.weights``) are
"group/name", declared by each objective, e.g.

    clip/infonce  clip/sigmoid  clip/hard_negative        one, chosen by loss.clip
    frame/sigmoid  frame/flam  frame/prior  ...           chosen by loss.frame
    aux/distill  aux/caption                               loss.distill, loss.caption (SLAP)

A weight key is a term name or a group ("clip", "frame", "aux"): the exact name wins, then the
group, then 1.0; so ``loss.weights.frame=2.0`` scales every frame term and
``loss.weights.frame/prior=0.1`` only the prior.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .registry import LOSSES

__all__ = ["LossConfig", "SLOTS", "KIND_SLOTS", "all_objectives", "known_terms", "known_groups", "term_weight"]

# LossConfig fields that switch objectives on, in the order their terms are summed and logged
SLOTS = ("clip", "frame", "distill", "caption")
# slots whose value is an objective's registered name (distill's value is a kind, caption's a flag)
KIND_SLOTS = ("clip", "frame")


def all_objectives() -> list[Any]:
    """Every registered objective (``finelap.losses.objective.Objective``), in slot then name order."""
    objs = [LOSSES.get(n) for n in LOSSES.names()]
    return sorted(objs, key=lambda o: (SLOTS.index(o.slot), o.name))


def known_terms() -> frozenset[str]:
    """Every term name a registered objective can produce."""
    return frozenset(t for o in all_objectives() for t in o.all_terms)


def known_groups() -> frozenset[str]:
    return frozenset(t.split("/", 1)[0] for t in known_terms())


def term_weight(weights: Mapping[str, float], name: str) -> float:
    """The weight of term ``name``: the exact name, then its group, then 1.0."""
    if name in weights:
        return float(weights[name])
    return float(weights.get(name.split("/", 1)[0], 1.0))


@dataclass
class LossConfig:
    """Which objectives to train and how to weight them (one dataclass for the loss concern).

    clip: a registered clip objective ("infonce" | "sigmoid" | "hard_negative" | ...) or None.
    frame: a registered frame objective ("finelap" | "flam" | "frame_infonce" | ...) or None.
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
        registered = all_objectives()
        for slot in KIND_SLOTS:
            value = getattr(self, slot)
            choices = tuple(o.name for o in registered if o.slot == slot)
            if value is not None and value not in choices:
                raise ConfigError(f"loss.{slot}: unknown {slot} loss {value!r}; choose one of {choices} or null")
        active = self.objectives()
        for obj in active:
            obj.check(self)
        terms = self.terms()
        if not terms:
            raise ConfigError("loss: no objective is enabled (clip, frame, distill and caption are all off)")
        known, groups = known_terms(), known_groups()
        for key, w in self.weights.items():
            if key not in known and key not in groups:
                raise ConfigError(f"loss.weights: unknown term {key!r}; known terms: {sorted(known)}, groups: {sorted(groups)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"loss.weights.{key}: weight must be a finite number >= 0, got {w!r}")
            if key in known and key not in terms or key in groups and not any(t.startswith(key + "/") for t in terms):
                raise ConfigError(f"loss.weights.{key} is set but that term is not enabled by this config (active terms: {terms})")
        for name in ("frame_chunk_size", "clip_chunk_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"loss.{name} must be a positive integer or null, got {v!r}")
        self._check_own_options(registered, active)
        if not 0.0 <= self.caption_label_smoothing < 1.0:
            raise ConfigError(f"loss.caption_label_smoothing must be in [0, 1), got {self.caption_label_smoothing}")
        if self.distill_student_temperature <= 0 or self.distill_teacher_temperature <= 0:
            raise ConfigError("loss.distill_*_temperature must be > 0")

    def _check_own_options(self, registered: list[Any], active: list[Any]) -> None:
        """An option that only some objectives read (their ``own_options``) must keep its default
        unless one of them is on: a setting that would be silently ignored is an error."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        owners: dict[str, list[Any]] = {}
        for obj in registered:
            for opt in obj.own_options:
                owners.setdefault(opt, []).append(obj)
        for opt, objs in owners.items():
            if getattr(self, opt) != defaults[opt] and not any(o in active for o in objs):
                which = " / ".join(o.describe() for o in objs)
                raise ConfigError(f"loss.{opt} is set but {which} is off ({self._describe_active(active)})")

    @staticmethod
    def _describe_active(active: list[Any]) -> str:
        return "active: " + (", ".join(o.describe() for o in active) or "none")

    def objectives(self) -> list[Any]:
        """The enabled objectives (``finelap.losses.objective.Objective``), in SLOTS order."""
        return [o for o in all_objectives() if o.selected(self)]

    def terms(self) -> list[str]:
        """The term names this config produces, in a fixed order."""
        return [t for o in self.objectives() for t in o.terms(self)]

    def weight(self, name: str) -> float:
        return term_weight(self.weights, name)

    def resolved_weights(self) -> dict[str, float]:
        """Every active term's effective weight."""
        return {t: self.weight(t) for t in self.terms()}
