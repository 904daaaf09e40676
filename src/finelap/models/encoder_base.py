"""The audio encoder contract: `AudioEncoder` (the base class) and its output `AudioFeatures`.

Every encoder returns frames first: `AudioFeatures(frames (B, T, D), frame_mask (B, T),
frame_rate_hz, cls)`, and exposes the `Timeline` that maps its frames to seconds.

Contract shared by all encoders (tested for many lengths):
- input: `wave (B, N)` float at `encoder.sample_rate`, zero-padded, and `lengths (B,)` valid samples;
- output T = `timeline.num_frames_for_samples(N)`, and item b has
  `timeline.num_frames_for_samples(lengths[b])` valid frames (the rest are masked);
- nothing is cropped at random: the full input is encoded (fixed-window HF models are run over a
  deterministic grid of windows and their frames concatenated).

The encoders: `own_encoders` (finelap's CNN and transformer), `hf_encoders` (Hugging Face
adapters), `pretrained` (aisfx), `published` (HTS-AT), `eat` (EAT); each registers itself with
its options dataclass through `encoder_registry.register_audio_encoder`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..audio import Timeline
from ..errors import ConfigError

__all__ = ["AudioFeatures", "AudioEncoder", "lengths_to_mask"]


@dataclass
class AudioFeatures:
    """frames (B, T, D); frame_mask (B, T) bool, True at valid frames; frame_rate_hz; cls (B, D) or None.

    context_frames (B, T', D) / context_mask (B, T'), optional (fixed-window encoders that emulate a
    reference model, e.g. EAT): the frames of every whole window that holds audio (T' >= T: the
    last window may reach past T), *not* zeroed past the end of the audio, i.e. what the reference
    model's heads saw on that window (its padding included). Heads that reproduce such a reference
    attend over these and keep the first T outputs; everything else uses `frames`.
    """

    frames: torch.Tensor
    frame_mask: torch.Tensor
    frame_rate_hz: float
    cls: torch.Tensor | None = None
    context_frames: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None


def lengths_to_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """lengths (B,) -> (B, size) bool mask, True where index < length."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class AudioEncoder(nn.Module):
    """Base class: input checking, Timeline-based frame counts, freezing.

    Subclasses set `self.dim` (D) and `self.timeline`, and implement `_encode`.
    """

    dim: int
    timeline: Timeline

    def __init__(self, freeze: bool = False, lr_mult: float = 1.0) -> None:
        super().__init__()
        if lr_mult < 0:
            raise ConfigError(f"audio encoder lr_mult must be >= 0, got {lr_mult}")
        self.lr_mult = float(lr_mult)
        self._frozen = bool(freeze)

    @property
    def sample_rate(self) -> int:
        return int(self.timeline.sample_rate)  # type: ignore[arg-type]

    @property
    def frame_rate_hz(self) -> float:
        return self.timeline.frame_rate_hz

    def num_frames(self, n_samples: int) -> int:
        """Frames emitted for n_samples of audio (equals timeline.num_frames_for_samples)."""
        return self.timeline.num_frames_for_samples(int(n_samples))

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Vectorised `num_frames`: lengths (B,) samples -> (B,) valid frames."""
        tl = self.timeline
        n_in = 1 + torch.div(lengths, tl.hop_length, rounding_mode="floor")  # type: ignore[arg-type]
        return torch.div(n_in + tl.downsample - 1, tl.downsample, rounding_mode="floor")

    # -------------------------------------------------------------- freezing
    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> None:
        """No gradients into the encoder, and eval mode (frozen norms/dropout) from now on."""
        self._frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def unfreeze(self) -> None:
        self._frozen = False
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "AudioEncoder":
        return super().train(mode and not self._frozen)

    # -------------------------------------------------------------- forward
    def _check(self, wave: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"wave must be (B, N) samples, got shape {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise ValueError(f"wave must be a float tensor, got {wave.dtype}")
        b, n = wave.shape
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long, device=wave.device)
        lengths = torch.as_tensor(lengths, device=wave.device).long().reshape(-1)
        if lengths.shape[0] != b:
            raise ValueError(f"lengths has {lengths.shape[0]} entries for a batch of {b}")
        if b and (int(lengths.min()) < 0 or int(lengths.max()) > n):
            raise ValueError(f"lengths must lie in [0, {n}] (wave has {n} samples), got {lengths.tolist()}")
        # padding must be silence: per-item encoding pads with zeros, so the batch must too
        wave = wave * lengths_to_mask(lengths, n).to(wave.dtype)
        return wave, lengths

    def forward(
        self, wave: torch.Tensor, lengths: torch.Tensor | None = None, mask_frames: torch.Tensor | None = None
    ) -> AudioFeatures:
        """wave (B, N) float at `sample_rate`; lengths (B,) valid samples (None: all N).

        mask_frames (B, T) bool, optional: output frames whose input is hidden from the encoder
        (masked-frame self-distillation, SLAP). Returns AudioFeatures with T = num_frames(N).
        """
        wave, lengths = self._check(wave, lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            out = self._encode(wave, lengths, mask_frames)
        t_expected = self.num_frames(wave.shape[1])
        if out.frames.shape[1] != t_expected:  # a broken Timeline contract would corrupt every label
            raise RuntimeError(
                f"{type(self).__name__} produced {out.frames.shape[1]} frames for {wave.shape[1]} samples, "
                f"its Timeline says {t_expected}"
            )
        return out

    def _encode(self, wave: torch.Tensor, lengths: torch.Tensor, mask_frames: torch.Tensor | None) -> AudioFeatures:
        raise NotImplementedError
