"""Audio towers. Every encoder returns frames first: `AudioFeatures(frames (B, T, D), frame_mask (B, T),
frame_rate_hz, cls)`, and exposes the `Timeline` that maps its frames to seconds.

Contract shared by all encoders (tested for many lengths):
- input: `wave (B, N)` float at `encoder.sample_rate`, zero-padded, and `lengths (B,)` valid samples;
- output T = `timeline.num_frames_for_samples(N)`, and item b has
  `timeline.num_frames_for_samples(lengths[b])` valid frames (the rest are masked);
- nothing is cropped at random: the full input is encoded (fixed-window HF models are run over a
  deterministic grid of windows and their frames concatenated).

Own encoders, sized for CPU:
- `CNNEncoder`: EfficientAT/MobileNetV3-like inverted residual blocks on log-mel, 25 Hz frames.
  Padding is masked before every time-mixing convolution and the norms use only valid frames, so in
  eval mode a padded batch gives exactly the per-item frames.
- `TransformerEncoder`: SLAP-like mel-patch transformer with local (windowed) and global attention,
  rotary positions (generalise to longer inputs), key padding masks.
Adapter:
- `HFAudioEncoder`: wav2vec2 / HuBERT / WavLM / data2vec-audio, Whisper encoder, AST and CLAP's
  HTS-AT, loaded from a local directory (nothing downloads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import LogMel, MelConfig, Timeline
from ..errors import ConfigError
from ..registry import AUDIO_ENCODERS

__all__ = [
    "AudioFeatures",
    "AudioEncoder",
    "PublishedWindowEncoder",
    "CNNEncoder",
    "TransformerEncoder",
    "HFAudioEncoder",
    "TransformerBlock",
    "MaskedNorm",
    "lengths_to_mask",
    "rotary_tables",
]


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


# ============================================================================ shared layers


class MaskedNorm(nn.Module):
    """BatchNorm or GroupNorm whose statistics use only valid time steps.

    x (B, C, ..., T) with mask (B, T) bool. kind="batch": per-channel statistics over batch and
    valid positions in training, running statistics in eval (then the mask is irrelevant).
    kind="group": per-sample statistics over each channel group and valid positions.
    kind="layer": statistics over channels (and frequency) at each time step: no batch statistics
        and no pooling over time, so outputs are independent of other items and of far-away audio
        (exact gradient accumulation and DDP parity, and windowed long audio stitches seamlessly).
    Padded positions are normalised too (their values are masked by the caller).
    """

    def __init__(self, channels: int, kind: str = "batch", groups: int = 8, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if kind not in ("batch", "group", "layer"):
            raise ConfigError(f"norm must be 'batch', 'group' or 'layer', got {kind!r}")
        self.kind, self.eps, self.momentum = kind, eps, momentum
        self.groups = math.gcd(groups, channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if kind == "batch":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.weight.view(shape), self.bias.view(shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in float32 (autocast/bf16 runs)
            return self._forward(x.float(), mask).to(x.dtype)
        return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        full = mask is None or bool(mask.all())
        if self.kind == "batch":
            # F.batch_norm refuses one value per channel in training; the masked path handles it
            if not self.training or (full and x.numel() > x.shape[1]):
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
                )
            if mask is None:
                mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
            m = mask.view(mask.shape[0], 1, *([1] * (x.dim() - 3)), mask.shape[1]).to(x.dtype)
            dims = [0] + list(range(2, x.dim()))
            count = m.sum() * math.prod(x.shape[2:-1])
            mean = (x * m).sum(dims) / count
            shape = (1, -1) + (1,) * (x.dim() - 2)
            var = ((x - mean.view(shape)).square() * m).sum(dims) / count
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
            w, b = self._affine(x)
            return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * w + b
        if self.kind == "layer":  # per (sample, time step): local in time, batch-independent
            # time to dim 1 so F.layer_norm's fused kernel normalises the trailing (C, ...) dims:
            # ~5x faster than spelling the statistics out, forward + backward
            y = F.layer_norm(x.movedim(-1, 1), x.shape[1:-1], eps=self.eps).movedim(1, -1).contiguous()
            w, b = self._affine(x)
            return torch.addcmul(b, y, w)
        # group norm, per sample
        if full:
            return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)
        bsz, c = x.shape[:2]
        xg = x.reshape(bsz, self.groups, c // self.groups, *x.shape[2:])
        m = mask.view(bsz, 1, 1, *([1] * (x.dim() - 3)), mask.shape[1]).to(x.dtype)
        dims = list(range(2, xg.dim()))
        count = m.sum(dims, keepdim=True) * (c // self.groups) * math.prod(x.shape[2:-1])
        mean = (xg * m).sum(dims, keepdim=True) / count
        var = ((xg - mean).square() * m).sum(dims, keepdim=True) / count
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape_as(x)
        w, b = self._affine(x)
        return y * w + b


def rotary_tables(n: int, head_dim: int, base: float = 10000.0, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (n, head_dim) for rotary position embeddings (rotate-half convention)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

    x (B, T, D); attn_mask (B, 1, T, T) bool, True = may attend; rope (cos, sin) each (T, D/heads).
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _apply_rotary(q, *rope), _apply_rotary(k, *rope)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


def attention_masks(frame_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) bool: keys must be valid (and within `window` frames when given).

    Every query may attend to itself, so padded queries (whose outputs are discarded) never see an
    empty row, which would give NaN.
    """
    t = frame_mask.shape[1]
    allowed = frame_mask[:, None, None, :]
    if window is not None:
        idx = torch.arange(t, device=frame_mask.device)
        allowed = allowed & ((idx[:, None] - idx[None, :]).abs() <= window)
    return allowed | torch.eye(t, dtype=torch.bool, device=frame_mask.device)


# ============================================================================ own encoders


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


@AUDIO_ENCODERS.register("cnn")
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


@AUDIO_ENCODERS.register("transformer")
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


# ============================================================================ Hugging Face adapters

WAVE_FAMILY = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "wav2vec2-conformer", "sew", "sew-d")


def _load_feature_extractor(path: Path):
    if not (path / "preprocessor_config.json").exists():
        return None
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load preprocessor_config.json ({type(e).__name__}: {e})") from None


class _WaveBackend(nn.Module):
    """wav2vec2-family: raw waveform -> conv feature extractor (stride S, receptive field R) -> transformer.

    The wave is padded (R - S) / 2 samples on the left, so frame j is centred on its Timeline span
    [jS, (j+1)S), and enough on the right that the model emits at least 1 + n // S frames.
    """

    variable_length = True

    def __init__(self, model: nn.Module, config: Any, fe: Any, layer: int | None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        kernels, strides = list(config.conv_kernel), list(config.conv_stride)
        self.kernels, self.strides = kernels, strides
        stride = math.prod(strides)
        rf, jump = 1, 1
        for k, s in zip(kernels, strides):
            rf += (k - 1) * jump
            jump *= s
        self.rf = rf
        self.left = max(0, (rf - stride) // 2)
        self.right = rf
        sr = int(getattr(fe, "sampling_rate", 16000)) if fe is not None else 16000
        self.do_normalize = bool(getattr(fe, "do_normalize", True)) if fe is not None else True
        if fe is not None:
            self.use_mask = bool(getattr(fe, "return_attention_mask", False))
        else:  # HF convention: group-norm feature encoders were trained without attention masks
            self.use_mask = getattr(config, "feat_extract_norm", "group") == "layer"
        self.timeline = Timeline(frame_rate_hz=sr / stride, sample_rate=sr, hop_length=stride, downsample=1)
        self.dim = int(config.hidden_size)

    def native_frames(self, n: int) -> int:
        for k, s in zip(self.kernels, self.strides):
            n = (n - k) // s + 1
        return n

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.do_normalize:  # Wav2Vec2FeatureExtractor: zero mean, unit variance over each item's valid samples
            m = lengths_to_mask(lengths, wave.shape[1]).to(wave.dtype)
            cnt = lengths.clamp(min=1).to(wave.dtype)[:, None]
            mean = (wave * m).sum(1, keepdim=True) / cnt
            var = ((wave - mean).square() * m).sum(1, keepdim=True) / cnt
            wave = (wave - mean) / torch.sqrt(var + 1e-7) * m
        x = F.pad(wave, (self.left, self.right))
        kwargs: dict[str, Any] = {}
        if self.use_mask:
            kwargs["attention_mask"] = lengths_to_mask(lengths + self.left + self.right, x.shape[1]).long()
        if self.layer is not None:
            kwargs["output_hidden_states"] = True
        out = self.model(x, **kwargs)
        h = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        return h, None


class _WindowBackend(nn.Module):
    """Fixed-input models (Whisper, AST, CLAP): each window of `window_samples` yields `frames_per_window`
    frames; windows start every frames_per_window * samples_per_frame samples (a fixed grid)."""

    variable_length = False
    uses_lengths = False  # features(chunks, valid_samples): the backend needs each window's audio length
    returns_context = False  # _encode also returns the unmasked window frames (AudioFeatures.context_frames)
    frames_per_window: int
    step_samples: int
    window_samples: int

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def _extractor_features(fe: Any, chunks: torch.Tensor, sr: int, key: str, **kw) -> torch.Tensor:
    arrays = [c.detach().cpu().double().numpy() for c in chunks]
    out = fe(arrays, sampling_rate=sr, return_tensors="pt", **kw)
    return out[key].to(device=chunks.device, dtype=torch.float32)


class _WhisperBackend(_WindowBackend):
    def __init__(self, model: nn.Module, config: Any, fe: Any) -> None:
        super().__init__()
        self.encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        self.fe = fe
        n_pos = int(config.max_source_positions)
        sr, hop = 16000, 160
        if fe is not None:
            sr, hop = int(fe.sampling_rate), int(fe.hop_length)
            if int(fe.nb_max_frames) != 2 * n_pos:
                raise ConfigError(
                    f"Whisper feature extractor makes {fe.nb_max_frames} mel frames per window but the encoder "
                    f"expects {2 * n_pos} (max_source_positions={n_pos})"
                )
        self.sr = sr
        self.frames_per_window = n_pos
        self.window_samples = self.step_samples = 2 * n_pos * hop
        self.timeline = Timeline(frame_rate_hz=sr / (2 * hop), sample_rate=sr, hop_length=hop, downsample=2)
        self.dim = int(config.d_model)
        self.n_mel_frames = 2 * n_pos
        if fe is None:
            self.logmel = LogMel(
                MelConfig(sample_rate=sr, n_fft=400, win_length=400, hop_length=hop, n_mels=int(config.num_mel_bins),
                          fmin=0.0, fmax=sr / 2, compute_dtype="float32")
            )

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fe is not None:
            return {"input_features": _extractor_features(self.fe, chunks, self.sr, "input_features")}
        # WhisperFeatureExtractor's recipe: log10 mel, drop the last frame, floor at max - 8, (x + 4) / 4
        x = (self.logmel(chunks) / 10.0)[..., : self.n_mel_frames]
        x = torch.maximum(x, x.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return {"input_features": (x + 4.0) / 4.0}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encoder(feats["input_features"]).last_hidden_state, None


class _ASTBackend(_WindowBackend):
    """AST: patches on a (max_length x n_mels) fbank; frames = patch columns averaged over frequency."""

    def __init__(self, model: nn.Module, config: Any, fe: Any) -> None:
        super().__init__()
        self.model = model
        self.fe = fe
        p = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        self.f_dim = (config.num_mel_bins - p) // config.frequency_stride + 1
        self.t_dim = (config.max_length - p) // config.time_stride + 1
        sr, hop, win = 16000, 160, 400  # kaldi fbank framing used by ASTFeatureExtractor
        if fe is not None:
            sr = int(fe.sampling_rate)
            if int(fe.max_length) != int(config.max_length) or int(fe.num_mel_bins) != int(config.num_mel_bins):
                raise ConfigError(
                    f"AST feature extractor (max_length={fe.max_length}, num_mel_bins={fe.num_mel_bins}) does not "
                    f"match the model (max_length={config.max_length}, num_mel_bins={config.num_mel_bins})"
                )
        self.sr = sr
        self.max_length = int(config.max_length)
        self.frames_per_window = self.t_dim
        self.step_samples = self.t_dim * config.time_stride * hop
        self.window_samples = (self.max_length - 1) * hop + win
        self.timeline = Timeline(frame_rate_hz=sr / (hop * config.time_stride), sample_rate=sr, hop_length=hop,
                                 downsample=int(config.time_stride))
        self.dim = int(config.hidden_size)
        if fe is None:
            self.logmel = LogMel(
                MelConfig(sample_rate=sr, n_fft=512, win_length=win, hop_length=hop, n_mels=int(config.num_mel_bins),
                          fmin=20.0, fmax=sr / 2, compute_dtype="float32")
            )

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fe is not None:
            return {"input_values": _extractor_features(self.fe, chunks, self.sr, "input_values")}
        # natural-log mel energies like kaldi fbank, then ASTFeatureExtractor's AudioSet normalisation
        x = self.logmel(chunks)[..., : self.max_length] * (math.log(10.0) / 10.0)
        x = (x.transpose(1, 2) - (-4.2677393)) / (4.5689974 * 2)
        return {"input_values": x}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.model(feats["input_values"]).last_hidden_state  # (K, 2 + f*t, H)
        cls = 0.5 * (h[:, 0] + h[:, 1])  # ASTModel's pooler: mean of CLS and distillation tokens
        k = h.shape[0]
        frames = h[:, 2:].reshape(k, self.f_dim, self.t_dim, -1).mean(1)
        return frames, cls


class _ClapBackend(_WindowBackend):
    """CLAP's HTS-AT audio tower: 10 s (max_length_s) windows at 48 kHz; frames from the token-semantic
    grid before pooling (last_hidden_state (K, C, F', T') averaged over F')."""

    def __init__(self, model: nn.Module, config: Any, fe: Any) -> None:
        super().__init__()
        self.model = model
        self.fe = fe
        self.fusion = bool(getattr(config, "enable_fusion", False))
        stride_t = config.patch_stride if isinstance(config.patch_stride, int) else config.patch_stride[1]
        freq_ratio = config.spec_size // config.num_mel_bins
        self.frames_per_window = (config.spec_size // stride_t // 2 ** (len(config.depths) - 1)) * freq_ratio
        if fe is not None:
            sr, hop, n_fft = int(fe.sampling_rate), int(fe.hop_length), int(fe.fft_window_size)
            window = int(fe.max_length_s) * sr
        else:  # LAION-CLAP's recipe: 10 s at 48 kHz, or less if the model's input is shorter
            sr, hop, n_fft = 48000, 480, 1024
            max_mel = config.spec_size * freq_ratio  # HTS-AT refuses more mel frames than this
            window = min(10 * sr, (max_mel - 1) * hop)
            window -= window % self.frames_per_window
        self.sr = sr
        self.window_samples = self.step_samples = window
        if self.window_samples % self.frames_per_window:
            raise ConfigError(
                f"CLAP window of {self.window_samples} samples does not split into {self.frames_per_window} frames"
            )
        spf = self.window_samples // self.frames_per_window
        self.timeline = Timeline(frame_rate_hz=sr / spf, sample_rate=sr, hop_length=spf, downsample=1)
        self.dim = int(config.patch_embeds_hidden_size * 2 ** (len(config.depths) - 1))  # width of the last stage
        if fe is None:
            self.logmel = LogMel(
                MelConfig(sample_rate=sr, n_fft=n_fft, win_length=n_fft, hop_length=hop, n_mels=int(config.num_mel_bins),
                          fmin=50.0, fmax=14000.0, compute_dtype="float32")
            )

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fe is not None:
            # chunks are exactly max_length_s long, so neither truncation mode draws a random crop
            trunc = "fusion" if self.fusion else "rand_trunc"
            out = self.fe([c.detach().cpu().double().numpy() for c in chunks], sampling_rate=self.sr,
                          return_tensors="pt", truncation=trunc, padding="repeatpad")
            feats = {"input_features": out["input_features"].to(chunks.device, torch.float32)}
            if self.fusion:
                # no window is longer than max_length_s; the extractor marks a random one "longer"
                # anyway (a training trick) which would make inference random, so we don't use its flag
                feats["is_longer"] = torch.zeros(chunks.shape[0], 1, dtype=torch.bool, device=chunks.device)
            return feats
        x = self.logmel(chunks).transpose(1, 2)[:, None]  # (K, 1, T, F) dB
        if self.fusion:
            return {"input_features": x.repeat(1, 4, 1, 1),
                    "is_longer": torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)}
        return {"input_features": x}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(**feats)
        frames = out.last_hidden_state.mean(2).transpose(1, 2)  # (K, T', C)
        return frames, out.pooler_output


@AUDIO_ENCODERS.register("hf")
class HFAudioEncoder(AudioEncoder):
    """Adapter for Hugging Face audio encoders stored in a local directory.

    Supported `model_type`s: wav2vec2, hubert, wavlm, data2vec-audio (and other wav2vec2-style conv
    front-ends), whisper (encoder only), audio-spectrogram-transformer (AST), clap / clap_audio_model
    (HTS-AT). The frame rate comes from the model config (conv strides / sample rate, Whisper's 2 x
    mel hop, AST's time stride, HTS-AT's token grid). Preprocessing follows the model's
    feature extractor when the directory has one (preprocessor_config.json), otherwise our torch
    log-mel with that extractor's recipe. Fixed-length models (Whisper, AST, CLAP) are run on a
    deterministic grid of windows covering the whole input.

    layer: which hidden state to return for wav2vec2-family models (None = last_hidden_state).
    window_batch: windows encoded per call for fixed-length models (bounds memory).
    """

    def __init__(
        self,
        path: str | Path,
        layer: int | None = None,
        freeze: bool = False,
        lr_mult: float = 1.0,
        window_batch: int = 16,
        use_feature_extractor: bool = True,
    ) -> None:
        super().__init__(freeze=False, lr_mult=lr_mult)
        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path}: not a Hugging Face model directory (no config.json)")
        from .text_encoders import refuse_custom_code

        refuse_custom_code(path)  # before any transformers call: nothing is asked, nothing imported from `path`
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read config.json ({type(e).__name__}: {e})") from None
        mt = config.model_type
        self.model_type = mt
        self.path = path
        fe = _load_feature_extractor(path) if use_feature_extractor else None
        self.window_batch = window_batch
        try:
            if mt in WAVE_FAMILY:
                self.backend: nn.Module = _WaveBackend(AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False), config, fe, layer)
            elif mt == "whisper":
                self.backend = _WhisperBackend(AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False), config, fe)
            elif mt == "audio-spectrogram-transformer":
                self.backend = _ASTBackend(AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False), config, fe)
            elif mt in ("clap", "clap_audio_model"):
                if mt == "clap":  # full CLAP checkpoint: keep only the audio tower (our heads replace its projection)
                    from transformers import ClapModel

                    audio = ClapModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False).audio_model
                    acfg = config.audio_config
                else:
                    from transformers import ClapAudioModel

                    audio = ClapAudioModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
                    acfg = config
                self.backend = _ClapBackend(audio, acfg, fe)
            else:
                raise ConfigError(
                    f"{path}: unsupported audio model_type {mt!r}; supported: {', '.join(WAVE_FAMILY)}, whisper, "
                    "audio-spectrogram-transformer, clap"
                )
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot load the audio model ({type(e).__name__}: {e})") from None
        if layer is not None and mt not in WAVE_FAMILY:
            raise ConfigError(f"layer= is only supported for wav2vec2-family models, not {mt!r}")
        self.timeline = self.backend.timeline
        self.dim = self.backend.dim
        if freeze:
            self.freeze()

    def _encode(self, wave: torch.Tensor, lengths: torch.Tensor, mask_frames: torch.Tensor | None) -> AudioFeatures:
        if mask_frames is not None:
            raise ConfigError("masked-frame input (mask_frames) is not supported by HF audio adapters")
        tl = self.timeline
        t = self.num_frames(wave.shape[1])
        valid = self.frame_lengths(lengths)
        fm = lengths_to_mask(valid, t)
        be = self.backend
        context = context_mask = None
        if be.variable_length:
            h, cls = be(wave, lengths)
            if h.shape[1] < t:
                raise RuntimeError(f"{self.model_type} gave {h.shape[1]} frames, need {t}")
            frames = h[:, :t]
        else:
            fpw, step, win = be.frames_per_window, be.step_samples, be.window_samples
            n_win = -(-t // fpw)
            x = F.pad(wave, (0, max(0, (n_win - 1) * step + win - wave.shape[1])))
            chunks = x.unfold(1, win, step)[:, :n_win]  # (B, K, win)
            need = torch.arange(n_win, device=wave.device)[None, :] * fpw < valid[:, None]  # skip all-padding windows
            idx = need.flatten().nonzero().squeeze(1)
            flat = chunks.reshape(-1, win)
            # samples of audio in each window (0 for windows past the end)
            win_valid = (lengths[:, None] - torch.arange(n_win, device=wave.device)[None, :] * step).clamp(0, win).reshape(-1)
            out = torch.zeros(flat.shape[0], fpw, self.dim, device=wave.device, dtype=wave.dtype)
            cls_all = None
            for i in range(0, idx.numel(), self.window_batch):
                sel = idx[i : i + self.window_batch]
                feats_i = be.features(flat[sel], win_valid[sel]) if be.uses_lengths else be.features(flat[sel])
                f_i, c_i = be.run(feats_i)
                out = out.index_copy(0, sel, f_i.to(out.dtype))
                if c_i is not None:
                    if cls_all is None:
                        cls_all = torch.zeros(flat.shape[0], c_i.shape[-1], device=wave.device, dtype=wave.dtype)
                    cls_all = cls_all.index_copy(0, sel, c_i.to(wave.dtype))
            frames = out.view(wave.shape[0], n_win * fpw, self.dim)[:, :t]
            if be.returns_context:  # whole windows: the last one may extend past T
                context = out.view(wave.shape[0], n_win * fpw, self.dim)
                context_mask = need.repeat_interleave(fpw, dim=1)
            cls = None
            if cls_all is not None:  # clip token: mean over the item's windows
                w = need.to(wave.dtype)
                cls = (cls_all.view(wave.shape[0], n_win, -1) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        frames = frames * fm[..., None].to(frames.dtype)
        if context is not None:
            return AudioFeatures(frames=frames, frame_mask=fm, frame_rate_hz=tl.frame_rate_hz, cls=cls,
                                 context_frames=context, context_mask=context_mask)  # fmt: skip
        return AudioFeatures(frames=frames, frame_mask=fm, frame_rate_hz=tl.frame_rate_hz, cls=cls)


class PublishedWindowEncoder(HFAudioEncoder):
    """Base of finelap's own builds of published fixed-window towers (HTS-AT, EAT): the HF adapter's
    window machinery around a backend made from a config rather than a Hugging Face folder.

    A frame is valid when it starts before the end of the audio: ceil(n / samples_per_frame) frames.
    """

    def _adopt(self, backend: _WindowBackend, model_type: str, window_batch: int, freeze: bool) -> None:
        """Finish construction (after `AudioEncoder.__init__` and building `backend`)."""
        self.backend = backend
        self.model_type = model_type
        self.path = None
        self.window_batch = int(window_batch)
        self.timeline = backend.timeline
        self.dim = backend.dim
        if freeze:
            self.freeze()

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        spf = self.timeline.hop_length * self.timeline.downsample  # type: ignore[operator]
        return torch.div(lengths + spf - 1, spf, rounding_mode="floor")
