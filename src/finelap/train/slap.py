"""SLAP's extra objectives as a hook for the training loop: masked-frame self-distillation from an
EMA teacher (term "aux/distill") and captioning with a small decoder (term "aux/caption").

Switched on by the loss config (``loss.distill: cosine|mse|ce``, ``loss.caption: true``); the
other SLAP ingredient, variable-length training without cropping, is data configuration
(``audio.clip_seconds = audio.max_seconds``, ``data.bucket_by_duration``; see configs/slap.yaml).

Modules:
- ``model.caption_decoder`` (a `CaptionDecoder`, loss.caption) and ``model.slap_predictor`` (a
  2-layer MLP on the student's frames, loss.distill; the BYOL/data2vec predictor that makes
  student and teacher asymmetric) are model modules built from the model config
  (``model.caption_decoder``, ``model.slap_predictor``; a run config that turns the losses on
  sets them), so the optimizer ("heads" group), the EMA weights and checkpoints include them.
- The teacher is a frozen copy of ``model.audio`` held by `SLAPState`, *not* a submodule of the
  model: it is neither optimised nor part of the model's state dict. `SLAPState.state_dict` gives
  its weights for the trainer state of a checkpoint (exact resume).

Options: ``train.slap`` (`finelap.config.SLAPConfig`: mask ratio, mask block, teacher decay) and
``model.caption_decoder`` (the decoder's sizes).

Masks are a pure function of (train.seed, step, rank) (`mask_generator`), so a resumed run draws
the same masks as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import nn

from ..config import SLAPConfig
from ..errors import ConfigError
from ..loss_config import LossConfig
from ..losses.aux import ema_update
from ..models.audio_encoders import lengths_to_mask
from ..models.decoder import prepare_targets
from ..models.slap_modules import DECODER_ATTR, PREDICTOR_ATTR

__all__ = [
    "needs_decoder",
    "needs_predictor",
    "needs_slap_modules",
    "check_slap_config",
    "make_teacher",
    "update_teacher",
    "mask_generator",
    "sample_block_mask",
    "slap_inputs",
    "SLAPState",
]

_DEFAULTS = SLAPConfig()
_DECODER = DECODER_ATTR
_PREDICTOR = PREDICTOR_ATTR


def _loss_cfg(run_cfg: Any) -> LossConfig:
    loss = run_cfg.loss if hasattr(run_cfg, "loss") else run_cfg
    return loss if isinstance(loss, LossConfig) else LossConfig(**dict(loss or {}))


def needs_decoder(run_cfg: Any) -> bool:
    """Whether this run (RunConfig or LossConfig) trains a caption decoder (loss.caption)."""
    return bool(_loss_cfg(run_cfg).caption)


def needs_predictor(run_cfg: Any) -> bool:
    """Whether this run trains masked-frame self-distillation (loss.distill set)."""
    return _loss_cfg(run_cfg).distill is not None


def needs_slap_modules(run_cfg: Any) -> bool:
    """Whether any SLAP term is on, i.e. whether the loop needs a `SLAPState`."""
    return needs_decoder(run_cfg) or needs_predictor(run_cfg)


def check_slap_config(run_cfg: Any, model: nn.Module | None = None) -> None:
    """ConfigError for SLAP settings the hook cannot honour: gradient accumulation (the hook runs
    its own passes outside GradCache), distillation into a frozen audio encoder."""
    if not needs_slap_modules(run_cfg):
        return
    accum = getattr(getattr(run_cfg, "train", None), "accum_steps", 1)
    if accum != 1:
        raise ConfigError(
            f"loss.distill / loss.caption (SLAP) need train.accum_steps=1, got {accum}: their extra encoder and "
            "decoder passes are not part of gradient caching; lower data.batch_size instead"
        )
    if model is not None and needs_predictor(run_cfg) and getattr(model.audio, "frozen", False):
        raise ConfigError("loss.distill trains the audio encoder, but it is frozen (model.audio.freeze=true)")


# ----------------------------------------------------------------------------- teacher


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen (no grad, eval mode) deep copy of ``model.audio``: the EMA teacher's start."""
    teacher = copy.deepcopy(model.audio)
    if hasattr(teacher, "freeze"):
        teacher.freeze()  # AudioEncoder: no grad, stays in eval mode even under .train()
    else:
        teacher.requires_grad_(False).eval()
    return teacher


def update_teacher(teacher: nn.Module, model: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * model.audio (parameters and float buffers), with
    the same helper as the loop's EMA weights (`finelap.losses.aux.ema_update`)."""
    ema_update(teacher, model.audio, decay)


# ----------------------------------------------------------------------------- masks


def mask_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, rank): masks depend on nothing else, so runs resume
    exactly and every rank draws different masks."""
    g = torch.Generator()
    g.manual_seed(((int(seed) * 1_000_003 + int(step)) * 1_009 + int(rank)) % (2**63 - 1))
    return g


def sample_block_mask(frame_mask: torch.Tensor, ratio: float, block: int, generator: torch.Generator) -> torch.Tensor:
    """Random contiguous-block mask over each clip's valid frames.

    frame_mask (B, T) bool (valid frames). Each clip with n valid frames gets exactly
    m = floor(ratio * n + 0.5) masked frames, in ceil(m / block) non-overlapping blocks of `block`
    frames (the last may be shorter) at uniformly random places: the blocks and the n - m visible
    frames are shuffled as units. Padded frames are never masked. Returns (B, T) bool on
    frame_mask's device; drawn on CPU from `generator` (deterministic).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if block < 1:
        raise ValueError(f"mask block must be >= 1 frame, got {block}")
    valid = frame_mask.detach().to("cpu", torch.bool)
    b, t = valid.shape
    out = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        idx = torch.nonzero(valid[i]).flatten()
        n = int(idx.numel())
        m = min(n, int(math.floor(ratio * n + 0.5)))
        if m == 0:
            continue
        sizes = [block] * (m // block) + ([m % block] if m % block else [])
        units = n - m + len(sizes)
        block_slots = set(torch.randperm(units, generator=generator)[: len(sizes)].tolist())
        pos, k = 0, 0
        flags = torch.zeros(n, dtype=torch.bool)
        for u in range(units):
            if u in block_slots:
                flags[pos : pos + sizes[k]] = True
                pos += sizes[k]
                k += 1
            else:
                pos += 1
        out[i, idx] = flags
    return out.to(frame_mask.device)


# ----------------------------------------------------------------------------- the hook


def slap_inputs(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: Any,
    loss_cfg: Any,
    generator: torch.Generator,
    *,
    mask_ratio: float = _DEFAULTS.mask_ratio,
    mask_block: int = _DEFAULTS.mask_block,
    clean_frames: torch.Tensor | None = None,
    clean_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The inputs of SLAP's objectives for one batch (LossInputs fields; the training loop passes
    them as the step's ``StepContext.extra``, which the distill and caption objectives read).

    Distillation (loss.distill): a block mask (`sample_block_mask`, from `generator`) hides
    frames from the student, ``model.audio(wave, lengths, mask_frames)``; the teacher encodes the
    unmasked input without gradient. Returns ``student_frames`` = slap_predictor(student frames)
    (B, T, Da), ``teacher_frames`` (B, T, Da) (detached) and ``distill_mask`` (B, T) = masked and
    valid: the loss is taken on masked frames only.

    Captioning (loss.caption): the decoder reads `clean_frames` (B, T, Da) with `clean_mask`
    (B, T) when given, which should be the raw encoder frames of the step's ordinary (unmasked)
    pass, ``AudioOutput.frames``: the decoder then trains on what it sees at inference, and the
    caption loss shapes the encoder through that pass. Without them it reads the student's masked
    frames (a masking augmentation; cheaper) or, with distillation off, its own unmasked pass.
    Returns ``caption_logits`` (B, L, V), ``caption_targets`` (B, L) (clips without a caption are
    all padding and do not count) and ``caption_pad_id``. They are returned even when no clip has
    a caption (the loss is then an attached 0), so every DDP rank runs the same collectives.
    """
    loss_cfg = loss_cfg if isinstance(loss_cfg, LossConfig) else _loss_cfg(loss_cfg)
    out: dict[str, Any] = {}
    wave, lengths = batch.wave, batch.lengths
    student = None
    if loss_cfg.distill is not None:
        if teacher is None:
            raise ConfigError("loss.distill needs an EMA teacher (SLAPState.create)")
        predictor = getattr(model, _PREDICTOR, None)
        if predictor is None:
            raise ConfigError("loss.distill needs model.slap_predictor: build the model with model.slap_predictor=true")
        t = model.audio.num_frames(wave.shape[1])
        valid = lengths_to_mask(model.audio.frame_lengths(lengths), t)
        hide = sample_block_mask(valid, mask_ratio, mask_block, generator)
        with torch.no_grad():
            target = teacher(wave, lengths).frames
        student = model.audio(wave, lengths, hide)
        out["student_frames"] = predictor(student.frames)
        out["teacher_frames"] = target.detach()
        out["distill_mask"] = hide & student.frame_mask
    if loss_cfg.caption:
        decoder = getattr(model, _DECODER, None)
        if decoder is None:
            raise ConfigError("loss.caption needs model.caption_decoder: build the model with a model.caption_decoder section")
        if clean_frames is not None:
            frames, fmask = clean_frames, clean_mask
        elif student is not None:
            frames, fmask = student.frames, student.frame_mask
        else:
            feats = model.audio(wave, lengths)
            frames, fmask = feats.frames, feats.frame_mask
        inputs, targets = prepare_targets(
            model.text.tokenizer, batch.captions, decoder.max_len, decoder.bos_id, decoder.eos_id, decoder.pad_id
        )
        out["caption_logits"] = decoder(frames, fmask, inputs.to(frames.device))
        out["caption_targets"] = targets.to(frames.device)
        out["caption_pad_id"] = decoder.pad_id
    return out


class SLAPState:
    """What SLAP adds to a training run besides model modules: the EMA teacher, its decay, the
    mask options and the seed. Build with `SLAPState.create(model, run_cfg)` after
    moving the model to its device."""

    def __init__(
        self,
        teacher: nn.Module | None,
        loss_cfg: Any,
        decay: float,
        seed: int = 0,
        mask_ratio: float = _DEFAULTS.mask_ratio,
        mask_block: int = _DEFAULTS.mask_block,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"SLAP teacher decay must be in (0, 1), got {decay}")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"SLAP mask ratio must be in (0, 1), got {mask_ratio}")
        self.teacher = teacher
        self.loss_cfg = _loss_cfg(loss_cfg)
        self.decay = float(decay)
        self.seed = int(seed)
        self.mask_ratio = float(mask_ratio)
        self.mask_block = int(mask_block)

    @classmethod
    def create(cls, model: nn.Module, run_cfg: Any, **kw: Any) -> "SLAPState":
        """Check the config (`check_slap_config`), copy the teacher from ``model.audio`` (only when
        loss.distill is on) and take the options from train.slap (`TrainConfig.slap_teacher_decay`);
        keyword arguments override them."""
        check_slap_config(run_cfg, model)
        loss = _loss_cfg(run_cfg)
        train = run_cfg.train
        teacher = make_teacher(model) if loss.distill is not None else None
        opts = {"decay": train.slap_teacher_decay, "seed": train.seed, "mask_ratio": train.slap.mask_ratio,
                "mask_block": train.slap.mask_block, **kw}  # fmt: skip
        return cls(teacher, loss, **opts)

    def inputs(
        self,
        model: nn.Module,
        batch: Any,
        step: int,
        rank: int = 0,
        clean_frames: torch.Tensor | None = None,
        clean_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """`slap_inputs` for optimizer step `step` (masks drawn from (seed, step, rank))."""
        return slap_inputs(
            model, self.teacher, batch, self.loss_cfg, mask_generator(self.seed, step, rank),
            mask_ratio=self.mask_ratio, mask_block=self.mask_block, clean_frames=clean_frames, clean_mask=clean_mask,
        )  # fmt: skip

    def update(self, model: nn.Module) -> None:
        """EMA step of the teacher towards ``model.audio``; call after each optimizer step."""
        if self.teacher is not None:
            update_teacher(self.teacher, model, self.decay)

    def reset(self, model: nn.Module) -> None:
        """Teacher <- a fresh copy of ``model.audio`` (resuming from a checkpoint without teacher state)."""
        if self.teacher is not None:
            self.teacher = make_teacher(model)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers for a checkpoint's trainer state (exact resume)."""
        return {"decay": self.decay, "teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()} if self.teacher is not None else None}

    def load_state_dict(self, state: Mapping[str, Any] | None, model: nn.Module | None = None) -> bool:
        """Restore the teacher; returns False (and, given `model`, resets the teacher from it) when
        `state` has no teacher weights."""
        teacher_state = (state or {}).get("teacher")
        if self.teacher is None:
            return True
        if teacher_state is None:
            if model is not None:
                self.reset(model)
            return False
        self.teacher.load_state_dict(teacher_state)
        return True
