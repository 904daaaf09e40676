"""Pure, tested losses. Each takes tensors (and ``rank``/``world_size`` where it exchanges data
across ranks), never a trainer; ``compute_losses`` returns named terms plus their weighted
sum, e.g. {"clip/sigmoid": ..., "frame/sigmoid": ..., "loss": ...}.
"""
from __future__ import annotations

from .aux import caption_loss, ema_update, masked_distill_loss
from .clip import caption_ids, hard_negative_info_nce, info_nce, sigmoid_loss
from .compose import GROUPS, TERMS, LossConfig, LossInputs, compose, compute_losses
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
    "TERMS",
    "GROUPS",
]
