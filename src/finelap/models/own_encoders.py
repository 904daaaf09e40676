"""finelap's own audio encoders, sized for CPU, and their options.

- `CNNEncoder` ("cnn"): EfficientAT/MobileNetV3-like inverted residual blocks on log-mel, 25 Hz
  frames. Padding is masked before every time-mixing convolution and the norms use only valid
  frames, so in eval mode a padded batch gives exactly the per-item frames.
- `TransformerEncoder` ("transformer"): SLAP-like mel-patch transformer with local (windowed) and
  global attention, rotary positions (generalise to longer inputs), key padding masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import LogMel, MelConfig, Timeline
from ..errors import ConfigError
from .encoder_base import AudioEncoder, AudioFeatures, lengths_to_mask
from .encoder_registry import AudioEncoderOptions, register_audio_encoder
from .layers import MaskedNorm, TransformerBlock, attention_masks, rotary_tables

__all__ = ["CNNEncoder", "TransformerEncoder", "CNNOptions", "TransformerOptions", "MelFrontEnd"]


def _as_mel_config(mel: MelConfig | dict | None) -> MelConfig:
    """Encoder front-ends default to a float32 STFT: 3x faster than MelConfig's float64 (which exists
    for librosa parity), and its ~1e-2 dB error on quiet bins is irrelevant to a learned model."""
    if mel is None:
        return MelConfig(compute_dtype="float32")
    if isinstance(mel, MelConfig):
        return mel
    if isinstance(mel, dict):
        try:
            return MelConfig(**{"compute_dtype": "float32", **mel})
        except TypeError as e:
            raise ConfigError(f"bad mel settings {mel}: {e}") from None
    raise ConfigError(f"mel must be a MelConfig or a dict, got {type(mel).__name__}")


# Log-mel statistics (dB, our LogMel, 16 kHz, waves in [-1, 1]) measured on ESC-50: mean -44, std 29.
MEL_DB_MEAN, MEL_DB_STD = -45.0, 30.0


class MelFrontEnd(nn.Module):
    """wave (B, N) -> normalised log-mel (B, n_mels, Tm) with padded frames set to 0, and mel lengths (B,).

    norm="batch": a masked BatchNorm over mel bins (batch statistics in training, running ones at
    inference). norm="fixed": standardise with fixed dB constants, then a learnable per-bin affine;
    no batch statistics, so a sample's features never depend on its batch-mates (gradient
    accumulation then equals one big batch exactly).
    """

    def __init__(self, mel: MelConfig, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "fixed"):
            raise ConfigError(f"input_norm must be 'batch' or 'fixed', got {norm!r}")
        self.cfg = mel
        self.kind = norm
        self.logmel = LogMel(mel)
        if norm == "batch":
            self.norm = MaskedNorm(mel.n_mels, "batch")
        else:
            self.weight = nn.Parameter(torch.ones(mel.n_mels, 1))
            self.bias = nn.Parameter(torch.zeros(mel.n_mels, 1))

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # fixed front-end (no parameters before the norm); kept in full precision under autocast
        with torch.no_grad(), torch.autocast(device_type=wave.device.type, enabled=False):
            x = self.logmel(wave.float())  # (B, F, Tm)
        mel_len = 1 + torch.div(lengths, self.cfg.hop_length, rounding_mode="floor")
        m = lengths_to_mask(mel_len, x.shape[-1])
        if self.kind == "batch":
            x = self.norm(x, m)
        else:
            x = (x - MEL_DB_MEAN) / MEL_DB_STD * self.weight + self.bias
        x = x * m[:, None, :].to(x.dtype)
        return x, mel_len, m


class _ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int | tuple[int, int], stride=1, padding=0, dilation=1, groups=1, norm="batch", act=True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups=groups, bias=False)
        self.norm = MaskedNorm(cout, norm)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x), mask))


def _down_lengths(lengths: torch.Tensor, stride: int) -> torch.Tensor:
    # kernel 3, padding 1, stride s: out = ceil(in / s)
    return torch.div(lengths + stride - 1, stride, rounding_mode="floor")


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand -> 3x3 depthwise (time dilation, stride) -> 1x1 project (+ residual).

    x (B, C, F, T) with time lengths (B,); padded time steps are zeroed before the depthwise
    convolution (the only time-mixing op), so they cannot leak into valid frames.
    """

    def __init__(self, cin: int, cout: int, expand: int, stride: tuple[int, int], dilation_t: int = 1, norm: str = "batch") -> None:
        super().__init__()
        hid = cin * expand
        self.stride_t = stride[1]
        self.expand = _ConvNormAct(cin, hid, 1, norm=norm) if expand != 1 else None
        self.dw = _ConvNormAct(hid, hid, 3, stride, (1, dilation_t), (1, dilation_t), groups=hid, norm=norm)
        self.project = _ConvNormAct(hid, cout, 1, norm=norm, act=False)
        self.residual = stride == (1, 1) and cin == cout

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        m_in = lengths_to_mask(lengths, x.shape[-1])
        h = x
        if self.expand is not None:
            h = self.expand(h, m_in)
            if padded:
                h = h * m_in[:, None, None, :].to(h.dtype)
        out_len = _down_lengths(lengths, self.stride_t)
        t_out = (x.shape[-1] + self.stride_t - 1) // self.stride_t
        m_out = lengths_to_mask(out_len, t_out)
        h = self.dw(h, m_out)
        h = self.project(h, m_out)
        if self.residual:
            h = h + x
        if padded:
            h = h * m_out[:, None, None, :].to(h.dtype)
        return h, out_len


# (out_channels, expand, freq_stride, time_stride, time_dilation, repeats)
# Cheap at high resolution (few channels, low expansion: elementwise ops there dominate CPU time),
# wide at 25 Hz / few bins, where most parameters live.
CNN_STAGES_DEFAULT: tuple[tuple[int, int, int, int, int, int], ...] = (
    (24, 2, 2, 2, 1, 2),
    (48, 4, 2, 1, 1, 3),
    (96, 4, 2, 1, 2, 3),
    (192, 4, 2, 1, 4, 3),
)


@dataclass(kw_only=True)
class CNNOptions(AudioEncoderOptions):
    """`model.audio` of "cnn" (see `CNNEncoder`)."""

    mel: MelConfig | dict | None = None
    dim: int = 256
    stem_channels: int = 16
    stages: Sequence[Sequence[int]] = CNN_STAGES_DEFAULT
    norm: str = "batch"
    input_norm: str = "auto"


@register_audio_encoder("cnn", options=CNNOptions)
class CNNEncoder(AudioEncoder):
    """Depthwise-separable CNN (EfficientAT / MobileNetV3-like) on log-mel; frames at 25 Hz by default.

    Time is downsampled by 4 (stem and first stage, stride 2 each); frequency by 2 per stage. The
    remaining frequency bins are averaged, giving frames (B, T, dim), T = ceil((1 + N // hop) / 4).
    Later stages dilate their depthwise kernels in time to widen the receptive field (under 1 s
    each side: windowed streaming with a 1 s margin is exact) without losing frame rate.

    norm: "batch" (masked BatchNorm, the EfficientAT choice), "group" (per-sample GroupNorm: no
    batch statistics, so gradient accumulation equals one big batch) or "layer" (per-time-step
    channel norm: no batch statistics and local in time, so long audio also stitches exactly). input_norm: "batch" or
    "fixed" mel normalisation; "auto" follows `norm`.
    """

    def __init__(
        self,
        mel: MelConfig | dict | None = None,
        dim: int = 256,
        stem_channels: int = 16,
        stages: Sequence[Sequence[int]] = CNN_STAGES_DEFAULT,
        norm: str = "batch",
        input_norm: str = "auto",
        freeze: bool = False,
        lr_mult: float = 1.0,
    ) -> None:
        super().__init__(freeze=False, lr_mult=lr_mult)
        mel_cfg = _as_mel_config(mel)
        if input_norm == "auto":  # no batch statistics anywhere unless the blocks use them anyway
            input_norm = "batch" if norm == "batch" else "fixed"
        self.frontend = MelFrontEnd(mel_cfg, input_norm)
        self.stem = _ConvNormAct(1, stem_channels, 3, (2, 2), 1, norm=norm)
        blocks = []
        cin = stem_channels
        t_down = 2
        for cout, expand, fs, ts, dil, reps in stages:
            for r in range(reps):
                stride = (fs, ts) if r == 0 else (1, 1)
                blocks.append(InvertedResidual(cin, cout, expand, stride, dil, norm))
                cin = cout
            t_down *= ts
        self.blocks = nn.ModuleList(blocks)
        self.head = _ConvNormAct(cin, dim, 1, norm=norm)
        self.dim = dim
        self.timeline = Timeline.from_mel(mel_cfg, downsample=t_down)
        if freeze:
            self.freeze()

    def _encode(self, wave: torch.Tensor, lengths: torch.Tensor, mask_frames: torch.Tensor | None) -> AudioFeatures:
        mel, mel_len, mel_mask = self.frontend(wave, lengths)
        if mask_frames is not None:  # hide the mel frames under each masked output frame
            ds = self.timeline.downsample
            hide = mask_frames.to(mel.device).repeat_interleave(ds, dim=1)[:, : mel.shape[-1]]
            # fill with each bin's mean over visible frames, not a constant: constant columns have zero
            # variance under the per-time-step norms, whose backward then scales by 1/sqrt(eps) per layer
            keep = (mel_mask & ~hide)[:, None, :].to(mel.dtype)
            fill = (mel * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)
            mel = torch.where(hide[:, None, :], fill.expand_as(mel), mel)
        x = mel[:, None]  # (B, 1, F, Tm)
        len_t = _down_lengths(mel_len, 2)
        t = (x.shape[-1] + 1) // 2
        m = lengths_to_mask(len_t, t)
        padded = not bool((lengths == wave.shape[1]).all())  # nothing to mask in an unpadded batch
        x = self.stem(x, m)
        if padded:
            x = x * m[:, None, None, :].to(x.dtype)
        for blk in self.blocks:
            x, len_t = blk(x, len_t, padded)
        m = lengths_to_mask(len_t, x.shape[-1])
        x = self.head(x, m).mean(2)  # pool frequency: (B, D, T)
        frames = x.transpose(1, 2)
        if padded:
            frames = frames * m[..., None].to(x.dtype)
        return AudioFeatures(frames=frames, frame_mask=m, frame_rate_hz=self.timeline.frame_rate_hz, cls=None)


@dataclass(kw_only=True)
class TransformerOptions(AudioEncoderOptions):
    """`model.audio` of "transformer" (see `TransformerEncoder`)."""

    mel: MelConfig | dict | None = None
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_frames: int = 4
    window: int = 16
    pattern: str = "lg"
    dropout: float = 0.0
    rope_base: float = 10000.0
    input_norm: str = "fixed"


@register_audio_encoder("transformer", options=TransformerOptions)
class TransformerEncoder(AudioEncoder):
    """SLAP-like patch transformer: mel patches of `patch_frames` x all bins -> tokens at 25 Hz.

    Blocks follow `pattern` (e.g. "lg": local, global, local, global...): local blocks attend within
    +-`window` frames, global blocks over the whole (valid) sequence. Rotary positions make the
    model independent of absolute length, so it runs on inputs longer than it was trained on.
    Padding is handled with key masks: valid frames of a padded batch equal per-item frames up to
    float rounding. No batch statistics anywhere (input_norm="fixed" by default).
    """

    def __init__(
        self,
        mel: MelConfig | dict | None = None,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_frames: int = 4,
        window: int = 16,
        pattern: str = "lg",
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        input_norm: str = "fixed",
        freeze: bool = False,
        lr_mult: float = 1.0,
    ) -> None:
        super().__init__(freeze=False, lr_mult=lr_mult)
        mel_cfg = _as_mel_config(mel)
        if not pattern or set(pattern) - {"l", "g"}:
            raise ConfigError(f"pattern must be a string of 'l' (local) and 'g' (global), got {pattern!r}")
        if (dim // heads) % 2:
            raise ConfigError(f"head dim ({dim}//{heads}) must be even for rotary positions")
        self.frontend = MelFrontEnd(mel_cfg, input_norm)
        self.patch_frames = patch_frames
        self.patch = nn.Linear(patch_frames * mel_cfg.n_mels, dim)
        self.patch_norm = nn.LayerNorm(dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.kinds = [pattern[i % len(pattern)] for i in range(depth)]
        self.window = window
        self.heads = heads
        self.rope_base = rope_base
        self.norm = nn.LayerNorm(dim)
        self.dim = dim
        self.timeline = Timeline.from_mel(mel_cfg, downsample=patch_frames)
        nn.init.normal_(self.mask_token, std=0.02)
        if freeze:
            self.freeze()

    def _encode(self, wave: torch.Tensor, lengths: torch.Tensor, mask_frames: torch.Tensor | None) -> AudioFeatures:
        mel, _, _ = self.frontend(wave, lengths)  # padded mel frames are 0
        b, nf, tm = mel.shape
        p = self.patch_frames
        t = -(-tm // p)
        mel = F.pad(mel, (0, t * p - tm))
        x = mel.view(b, nf, t, p).permute(0, 2, 3, 1).reshape(b, t, p * nf)
        x = self.patch_norm(self.patch(x))
        if mask_frames is not None:
            x = torch.where(mask_frames[..., None].to(x.device), self.mask_token.to(x.dtype), x)
        fm = lengths_to_mask(self.frame_lengths(lengths), t)
        masks = {"g": attention_masks(fm, None), "l": attention_masks(fm, self.window)}
        rope = rotary_tables(t, self.dim // self.heads, self.rope_base, x.device, x.dtype)
        for kind, blk in zip(self.kinds, self.blocks):
            x = blk(x, masks[kind], rope)
        x = self.norm(x) * fm[..., None].to(x.dtype)
        return AudioFeatures(frames=x, frame_mask=fm, frame_rate_hz=self.timeline.frame_rate_hz, cls=None)


