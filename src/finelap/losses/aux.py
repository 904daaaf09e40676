"""Auxiliary objectives used by SLAP: masked-frame self-distillation from an EMA teacher, and a
captioning (token cross-entropy) loss; plus the EMA update itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .frame import _normalise

__all__ = ["masked_distill_loss", "caption_loss", "ema_update"]

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


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter, in place.

    Floating-point buffers (e.g. BatchNorm running stats) follow the same average; integer buffers
    (counters) are copied. The modules must have identical structure (parameter and buffer names
    and shapes), e.g. ``teacher = copy.deepcopy(student)`` at start.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    t_bufs = dict(teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
        missing = sorted((set(s_params) | set(s_bufs)) ^ (set(t_params) | set(t_bufs)))
        raise ValueError(f"teacher and student differ in structure: {missing[:5]}")
    for name, tp in t_params.items():
        sp = s_params[name]
        if tp.shape != sp.shape:
            raise ValueError(f"teacher and student differ in shape at {name}: {tuple(tp.shape)} vs {tuple(sp.shape)}")
        tp.lerp_(sp.detach().to(tp.dtype), 1.0 - decay)
    for name, tb in t_bufs.items():
        sb = s_bufs[name]
        if tb.is_floating_point():
            tb.lerp_(sb.to(tb.dtype), 1.0 - decay)
        else:
            tb.copy_(sb)
