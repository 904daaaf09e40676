"""Pure, tested losses. Each takes tensors (and ``rank``/``world_size`` where it exchanges data
across ranks), never a trainer; ``compute_losses`` returns named terms plus their weighted
sum, e.g. {"clip/sigmoid": ..., "frame/sigmoid": ..., "loss": ...}.

Every module here may define objectives (`objective.Objective`, registered by name in
``finelap.registry.LOSSES``); the registry imports each module of this package on first use.
"""
from __future__ import annotations

from typing import Any

from .aux import caption_loss, ema_update, masked_distill_loss
from .clip import caption_ids, hard_negative_info_nce, info_nce, sigmoid_loss
from .compose import LossConfig, LossInputs, compose, compute_losses, gather_inputs
from .frame import (
    FLAMLoss,
    FrameLabels,
    bilinear_bce_sum,
    finelap_frame_loss,
    flam_calibrated_prob,
    flam_frame_loss,
    flam_pos_fraction,
    flam_prior_loss,
)
from .objective import Objective, StepContext, register_objective

__all__ = [
    "info_nce",
    "sigmoid_loss",
    "hard_negative_info_nce",
    "caption_ids",
    "finelap_frame_loss",
    "flam_frame_loss",
    "flam_prior_loss",
    "flam_pos_fraction",
    "flam_calibrated_prob",
    "FLAMLoss",
    "FrameLabels",
    "bilinear_bce_sum",
    "masked_distill_loss",
    "caption_loss",
    "ema_update",
    "LossConfig",
    "LossInputs",
    "compose",
    "compute_losses",
    "gather_inputs",
    "Objective",
    "StepContext",
    "register_objective",
    "TERMS",
    "GROUPS",
]


def __getattr__(name: str) -> Any:
    if name in ("TERMS", "GROUPS"):  # computed on access (see compose)
        import importlib

        return getattr(importlib.import_module(".compose", __name__), name)  # the name `compose` is the function
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
