"""Auxiliary objectives used by SLAP: masked-frame self-distillation from an EMA teacher, and a
captioning (token cross-entropy) loss; plus the EMA update itself (also the loop's EMA weights).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..loss_config import LossConfig
from .frame import _normalise
from .objective import Inputs, Objective, StepContext, register_objective

__all__ = ["masked_distill_loss", "caption_loss", "ema_update", "DistillObjective", "CaptionObjective"]

_DISTILL_KINDS = ("cosine", "mse", "ce")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 (losses are computed in at least float32); others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_distill_loss(
    student_frames: torch.Tensor,
    teacher_frames: torch.Tensor,
    mask_positions: torch.Tensor,
    kind: str = "cosine",
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    teacher_center: torch.Tensor | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Self-distillation on the frames the student did not see.

    student_frames (B, T, D): student outputs for the masked input (after its predictor head).
    teacher_frames (B, T, D): EMA-teacher outputs for the unmasked input; always treated as a
        constant target (detached here), as in BYOL / data2vec / DINO.
    mask_positions (B, T) bool: frames that were masked for the student. Only they are scored
        (predicting visible frames is trivial); padded frames must be False.

    kind:
      "cosine" (default): mean over masked frames of 2 - 2 cos(s, t), the BYOL regression; it
          needs no projection head and is scale-free, so it is a safe default on tiny models.
      "mse": data2vec-style regression to instance-normalised teacher targets:
          mean over masked frames of mean_d (s - layer_norm(t))^2.
      "ce": DINO/iBOT-style cross-entropy over a projection head's D prototypes:
          -sum_d softmax((t - center)/teacher_temperature)_d * log_softmax(s/student_temperature)_d,
          with teacher_center (D,) the caller's running mean of teacher outputs (None = 0).
    world_size > 1: the masked-frame count is all-reduced, so the rank mean is the global mean
    (convention of finelap.dist); no features are exchanged.
    Returns a 0-dim tensor (0, still attached to the graph, when no frame is masked).
    """
    if kind not in _DISTILL_KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; choose one of {_DISTILL_KINDS}")
    if student_frames.shape != teacher_frames.shape or student_frames.dim() != 3:
        raise ValueError(f"student and teacher frames must both be (B, T, D), got {tuple(student_frames.shape)} and {tuple(teacher_frames.shape)}")
    if mask_positions.shape != student_frames.shape[:2]:
        raise ValueError(f"mask_positions must be (B, T)={tuple(student_frames.shape[:2])}, got {tuple(mask_positions.shape)}")
    s = _upcast(student_frames)
    t = _upcast(teacher_frames.detach())
    m = mask_positions.to(s.dtype)
    if kind == "cosine":
        per = 2.0 - 2.0 * F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    elif kind == "mse":
        per = (s - F.layer_norm(t, t.shape[-1:])).pow(2).mean(-1)
    else:
        c = 0.0 if teacher_center is None else teacher_center.detach().to(t.dtype)
        p_t = F.softmax((t - c) / teacher_temperature, dim=-1)
        per = -(p_t * F.log_softmax(s / student_temperature, dim=-1)).sum(-1)
    return _normalise((per * m).sum(), m.sum(), world_size)


def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int, label_smoothing: float = 0.0, world_size: int = 1
) -> torch.Tensor:
    """Token cross-entropy of a caption decoder (teacher forcing), averaged over non-pad tokens.

    logits (B, L, V): predictions for positions 0..L-1; targets (B, L) int64 next tokens, with
    ``pad_id`` where there is no token (ignored). label_smoothing in [0, 1): the target
    distribution is (1 - eps) one-hot + eps / V uniform (torch's definition).
    world_size > 1: the token count is all-reduced (rank mean = global mean).
    Returns a 0-dim tensor (0, attached, when every target is padding).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, L, V) and targets (B, L); got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    total = F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return _normalise(total, (targets != pad_id).sum().float(), world_size)


def _ema_entries(x: nn.Module | Mapping[str, torch.Tensor], as_state_dict: bool) -> Mapping[str, torch.Tensor]:
    if not isinstance(x, nn.Module):
        return x
    return x.state_dict() if as_state_dict else {**dict(x.named_parameters()), **dict(x.named_buffers())}


@torch.no_grad()
def ema_update(target: nn.Module | Mapping[str, torch.Tensor], source: nn.Module | Mapping[str, torch.Tensor], decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, entry by entry, in place: the one EMA
    helper (the training loop's EMA weights, SLAP's teacher).

    target: a module (its parameters and buffers move, e.g. a teacher made with
    ``copy.deepcopy(student)``) or a name -> tensor mapping (a copy of a state dict, e.g. the
    loop's EMA weights). source: a module or mapping with the same names and shapes; a module is
    read as its parameters and buffers, or as its ``state_dict()`` when the target is a mapping.
    Floating-point entries (e.g. BatchNorm running stats) follow the average; integer entries
    (counters) are copied. decay in [0, 1]; 0 copies the source.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    as_state_dict = not isinstance(target, nn.Module)
    t_state, s_state = _ema_entries(target, as_state_dict), _ema_entries(source, as_state_dict)
    if t_state.keys() != s_state.keys():
        missing = sorted(set(t_state) ^ set(s_state))
        raise ValueError(f"EMA target and source differ in structure: {missing[:5]}")
    for name, e in t_state.items():
        v = s_state[name]
        if e.shape != v.shape:
            raise ValueError(f"EMA target and source differ in shape at {name}: {tuple(e.shape)} vs {tuple(v.shape)}")
        if e.is_floating_point():
            e.mul_(decay).add_(v.detach().to(e.dtype), alpha=1 - decay)
        else:
            e.copy_(v)


# ----------------------------------------------------------------------------- objectives (loss.distill, loss.caption)


@register_objective
class DistillObjective(Objective):
    """SLAP's masked-frame self-distillation (`masked_distill_loss`) of kind ``loss.distill``.

    Its inputs come from the SLAP hook's extra passes (``finelap.train.slap``: student frames of
    the masked input, teacher frames of the unmasked one); skipped when they are absent.
    """

    name = "distill"
    slot = "distill"
    all_terms = ("aux/distill",)
    needs = ("student_frames", "teacher_frames", "distill_mask")

    def selected(self, cfg: LossConfig) -> bool:
        return cfg.distill is not None

    def check(self, cfg: LossConfig) -> None:
        if cfg.distill not in _DISTILL_KINDS:
            raise ConfigError(f"loss.distill: unknown kind {cfg.distill!r}; choose one of {_DISTILL_KINDS} or null")

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        return {k: ctx.extra[k] for k in self.needs if k in ctx.extra}

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        if x.get("student_frames") is None or x.get("teacher_frames") is None:
            return {}
        loss = masked_distill_loss(
            x["student_frames"], x["teacher_frames"], self.need(x, "distill_mask"), cfg.distill,
            cfg.distill_student_temperature, cfg.distill_teacher_temperature, world_size=world_size,
        )  # fmt: skip
        return {"aux/distill": loss}


@register_objective
class CaptionObjective(Objective):
    """Captioning with a small decoder (`caption_loss`), loss.caption; inputs from the SLAP hook
    (the decoder's logits over the batch's captions); skipped when they are absent."""

    name = "caption"
    slot = "caption"
    all_terms = ("aux/caption",)
    needs = ("caption_logits", "caption_targets", "caption_pad_id")
    own_options = ("caption_label_smoothing",)

    def selected(self, cfg: LossConfig) -> bool:
        return bool(cfg.caption)

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        return {k: ctx.extra[k] for k in self.needs if k in ctx.extra}

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        if x.get("caption_logits") is None or x.get("caption_targets") is None:
            return {}
        pad = x.get("caption_pad_id")
        loss = caption_loss(x["caption_logits"], x["caption_targets"], 0 if pad is None else pad, cfg.caption_label_smoothing, world_size)
        return {"aux/caption": loss}
