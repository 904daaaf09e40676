"""Checkpoints for training: the file format and I/O live in ``finelap.checkpoint`` (below models
and training, re-exported here); this module adds restoring the training state (optimizer,
scheduler, grad scaler, RNGs) from a loaded checkpoint.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..checkpoint import *  # noqa: F401,F403  (re-export: the file format and I/O)
from ..checkpoint import __all__ as _IO_ALL
from ..checkpoint import CONFIG_FILE, EMA_FILE, LATEST_FILE, MODEL_FILE, OPTIM_FILE, TRAINER_FILE  # noqa: F401
from ..checkpoint import Checkpoint, restore_rng
from ..errors import CheckpointError

__all__ = [*_IO_ALL, "restore_optimizer", "restore_training_state"]


def restore_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any] | None) -> None:
    """`optimizer.load_state_dict(state)` with a clear error when the checkpoint has no or mismatched state."""
    if state is None:
        raise CheckpointError("checkpoint has no optimizer state (it was saved without an optimizer)")
    try:
        optimizer.load_state_dict(dict(state))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state in the checkpoint does not match this optimizer: {e}") from None


def restore_training_state(
    ckpt: Checkpoint,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    rng: bool = True,
) -> int:
    """Restore whichever of optimizer / scheduler / scaler / global RNGs are given; returns ckpt.step.
    (Model and EMA weights are loaded by the caller: `model.load_state_dict(ckpt.state_dict)`.)"""
    if optimizer is not None:
        restore_optimizer(optimizer, ckpt.optimizer_state)
    if scheduler is not None:
        if ckpt.scheduler_state is None:
            raise CheckpointError(f"{ckpt.path}: checkpoint has no scheduler state")
        scheduler.load_state_dict(ckpt.scheduler_state)
    if scaler is not None:
        if ckpt.scaler_state is None:
            raise CheckpointError(f"{ckpt.path}: checkpoint has no grad-scaler state")
        scaler.load_state_dict(ckpt.scaler_state)
    if rng:
        restore_rng(ckpt.rng_state)
    return ckpt.step
