"""EAT (Efficient Audio Transformer) as a finelap audio encoder: FineLAP's released audio tower.

Written from the architecture of cwx-worst-one/EAT (a data2vec 2.0-style ViT, `models/images.py`,
`base.py`, `modules.py`, `mae.py`, as vendored in xiquan-li/FineLAP) and FineLAP's pre-processing
(`models/feature_extractor.py: EAT_preprocess`); no code is taken from either.

Front-end (`kaldi_fbank`): the Kaldi filterbank that `torchaudio.compliance.kaldi.fbank` computes
with FineLAP's options (16 kHz, 25 ms frames every 10 ms, snip_edges, per-frame DC removal,
pre-emphasis 0.97, symmetric Hann window ("hanning"), 512-point FFT, power spectrum, 128 Kaldi mel
bins from 20 Hz to Nyquist, natural log floored at float32 eps, no energy term, dither 0), padded
with zeros or cut to 1024 frames (10.24 s), then (x + 4.268) / (4.569 * 2).

Tower (`EATViT`): 16x16 conv patches on the (1024 x 128) image -> a 64 x 8 grid (time-major token
order), fixed 2-D sin-cos positions, one extra (CLS) token in front, a LayerNorm (the data2vec
"context encoder" of a post-norm model with no prenet blocks), then post-norm blocks
(x = norm1(x + attn(x)); x = norm2(x + mlp(x))).

Frames: the 512 patch tokens averaged over the 8 frequency patches of each time row -> 64 frames
of 0.16 s per 10.24-s window (6.25 Hz); the CLS token is the encoder's clip token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..audio import Timeline
from ..errors import ConfigError
from .audio_encoders import AudioEncoder, PublishedWindowEncoder, _WindowBackend
from .encoder_registry import AudioEncoderOptions, register_audio_encoder

__all__ = ["kaldi_mel_banks", "kaldi_fbank", "EATViT", "EATEncoder", "EAT_NORM_MEAN", "EAT_NORM_STD"]

# AudioSet fbank statistics used by EAT and FineLAP (the same as AST's)
EAT_NORM_MEAN, EAT_NORM_STD = -4.268, 4.569
_F32_EPS = float(np.finfo(np.float32).eps)  # torchaudio's log floor (torch.finfo(torch.float).eps)


def _kaldi_mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: int, low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters (no VTLN), (n_mels, n_fft // 2 + 1) float64.

    Triangles are linear in Kaldi's mel scale (1127 ln(1 + f / 700)), equally spaced between the
    mels of low_freq and high_freq (<= 0: relative to Nyquist); the Nyquist bin gets weight 0.
    """
    nyquist = sample_rate / 2.0
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise ConfigError(f"kaldi mel banks need 0 <= low_freq < high_freq <= Nyquist, got {low_freq}, {high}")
    n_bins = n_fft // 2
    lo, hi = _kaldi_mel(low_freq), _kaldi_mel(high)
    delta = (hi - lo) / (n_mels + 1)
    left = lo + delta * np.arange(n_mels)[:, None]
    center, right = left + delta, left + 2 * delta
    mel = _kaldi_mel(sample_rate / n_fft * np.arange(n_bins))[None, :]
    w = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.concatenate([w, np.zeros((n_mels, 1))], axis=1)


def kaldi_fbank(
    wave: torch.Tensor,
    sample_rate: int = 16000,
    n_mels: int = 128,
    win_length: int = 400,
    hop_length: int = 160,
    n_fft: int = 512,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
) -> torch.Tensor:
    """Kaldi log-mel filterbank with FineLAP's options. wave (K, N) -> (K, T, n_mels) float32,
    T = 1 + (N - win_length) // hop_length (snip_edges; 0 frames when N < win_length).

    Computed in float64; torchaudio computes in the input's dtype (float32), so expect rounding-level
    differences from it, largest in near-silent bins (not measured: torchaudio does not run here).
    """
    x = wave.to(torch.float64)
    k, n = x.shape
    if n < win_length:
        return torch.zeros(k, 0, n_mels, dtype=torch.float32, device=wave.device)
    frames = x.unfold(1, win_length, hop_length)  # (K, T, win)
    frames = frames - frames.mean(-1, keepdim=True)  # remove_dc_offset
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # Kaldi: x[0] -= c * x[0]
    frames = frames - preemphasis * prev
    window = torch.hann_window(win_length, periodic=False, dtype=torch.float64, device=wave.device)
    power = torch.fft.rfft(frames * window, n=n_fft).abs().square()  # zero-padded to n_fft
    banks = torch.from_numpy(kaldi_mel_banks(n_mels, n_fft, sample_rate, low_freq)).to(wave.device)
    mel = torch.matmul(power, banks.T)
    return torch.log(torch.clamp(mel, min=_F32_EPS)).to(torch.float32)


def _sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows * cols, dim) fixed 2-D sine-cosine positions, row-major; half the channels encode the
    row, half the column. Only an initialisation: imported checkpoints carry their own table."""
    if dim % 4:
        raise ConfigError(f"EAT embed dim must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    r, c = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    parts = []
    for pos in (r.reshape(-1), c.reshape(-1)):
        ang = pos[:, None] * omega[None, :]
        parts += [np.sin(ang), np.cos(ang)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


class EATBlock(nn.Module):
    """Post-norm ViT block (data2vec 2.0's AltBlock with layer_norm_first=False):
    x = norm1(x + attn(x)); x = norm2(x + fc2(gelu(fc1(x)))). x (K, L, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"EAT dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n, d = x.shape
        q, kk, v = self.qkv(x).view(k, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(k, n, d)
        x = self.norm1(x + self.proj(a))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class EATViT(nn.Module):
    """EAT's ViT. forward(fbank (K, target_length, n_mels), normalised) -> tokens (K, 1 + P, dim),
    token 0 the CLS token, then the P = (target_length / patch) x (n_mels / patch) patch tokens in
    time-major order (consecutive tokens share a time row)."""

    def __init__(self, dim: int = 768, depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, patch_size: int = 16,
                 n_mels: int = 128, target_length: int = 1024, eps: float = 1e-6) -> None:  # fmt: skip
        super().__init__()
        if n_mels % patch_size or target_length % patch_size:
            raise ConfigError(f"EAT: n_mels ({n_mels}) and target_length ({target_length}) must be multiples of patch_size ({patch_size})")
        self.rows, self.cols = target_length // patch_size, n_mels // patch_size
        self.patch_embed = nn.Conv2d(1, dim, patch_size, patch_size)
        self.register_buffer("pos_embed", _sincos_2d(self.rows, self.cols, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.input_norm = nn.LayerNorm(dim, eps=eps)
        self.blocks = nn.ModuleList(EATBlock(dim, heads, mlp_ratio, eps) for _ in range(depth))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(fbank[:, None]).flatten(2).transpose(1, 2)  # (K, rows * cols, D)
        x = x + self.pos_embed[None, : x.shape[1]]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.input_norm(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class _EATBackend(_WindowBackend):
    """EAT on fixed windows: each window is the audio of `target_length` fbank frames
    ((target_length - 1) * hop + win samples); windows start every target_length * hop samples,
    so consecutive windows' fbank frames tile the signal. Fbank frames beyond the audio (Kaldi's
    snip_edges drops partial frames) are the zeros FineLAP pads with, as in `EAT_preprocess`."""

    uses_lengths = True
    returns_context = True

    def __init__(self, vit: EATViT, patch_size: int, target_length: int, n_mels: int, sample_rate: int,
                 win_length: int, hop_length: int, n_fft: int, norm_mean: float, norm_std: float) -> None:  # fmt: skip
        super().__init__()
        self.vit = vit
        self.n_mels, self.target_length = n_mels, target_length
        self.sample_rate, self.win_length, self.hop_length, self.n_fft = sample_rate, win_length, hop_length, n_fft
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)
        self.frames_per_window = target_length // patch_size
        self.step_samples = target_length * hop_length
        self.window_samples = (target_length - 1) * hop_length + win_length
        self.timeline = Timeline(frame_rate_hz=sample_rate / (hop_length * patch_size), sample_rate=sample_rate,
                                 hop_length=hop_length, downsample=patch_size)  # fmt: skip
        self.dim = int(vit.patch_embed.out_channels)

    def fbank(self, chunks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """chunks (K, window_samples), valid (K,) samples of audio in each -> normalised (K, target_length, n_mels)."""
        x = kaldi_fbank(chunks, self.sample_rate, self.n_mels, self.win_length, self.hop_length, self.n_fft)
        x = x[:, : self.target_length]
        if x.shape[1] < self.target_length:
            x = F.pad(x, (0, 0, 0, self.target_length - x.shape[1]))
        if valid is not None:
            v = valid.to(x.device).long()
            n_real = torch.where(v >= self.win_length, 1 + torch.div(v - self.win_length, self.hop_length, rounding_mode="floor"), 0)
            x = x * (torch.arange(self.target_length, device=x.device)[None, :] < n_real[:, None])[..., None].to(x.dtype)
        return (x - self.norm_mean) / (2.0 * self.norm_std)

    def features(self, chunks: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"fbank": self.fbank(chunks, valid)}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.vit(feats["fbank"])
        k = x.shape[0]
        frames = x[:, 1:].reshape(k, self.vit.rows, self.vit.cols, -1).mean(2)  # average the frequency patches of a time row
        return frames, x[:, 0]


@dataclass(kw_only=True)
class EATOptions(AudioEncoderOptions):
    """`model.audio` of "eat" (see `EATEncoder`)."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    eps: float = 1e-6
    n_mels: int = 128
    target_length: int = 1024
    sample_rate: int = 16000
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    norm_mean: float = EAT_NORM_MEAN
    norm_std: float = EAT_NORM_STD
    window_batch: int = 8


@register_audio_encoder("eat", options=EATOptions)
class EATEncoder(PublishedWindowEncoder):
    """EAT (FineLAP's audio tower): frames (B, T, dim) at 6.25 Hz (0.16 s; 64 per 10.24-s window)
    and the CLS token as `cls` (mean over the item's windows).

    dim, depth, heads, mlp_ratio, patch_size, eps: the ViT (EAT-base: 768, 12, 12, 4, 16, 1e-6).
    n_mels, target_length, sample_rate, win_length, hop_length, n_fft, norm_mean, norm_std: the
    Kaldi fbank front-end (128 bins, 1024 frames of 10 ms at 16 kHz, 25-ms frames, (x - mean) / (2 std)).

    Audio of any length is encoded on a fixed grid of 10.24-s windows (the HF adapter's
    machinery); a frame is valid when it starts before the end of the audio (ceil(n / 2560)
    frames), so a 10-s clip has 63 valid frames, its 64th (10.08-10.24 s) is masked. The encoder
    also returns each window's frames unmasked (`context_frames`), which FineLAP's frame projector
    attends over, as the reference does.
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        eps: float = 1e-6,
        n_mels: int = 128,
        target_length: int = 1024,
        sample_rate: int = 16000,
        win_length: int = 400,
        hop_length: int = 160,
        n_fft: int = 512,
        norm_mean: float = EAT_NORM_MEAN,
        norm_std: float = EAT_NORM_STD,
        freeze: bool = False,
        lr_mult: float = 1.0,
        window_batch: int = 8,
    ) -> None:
        AudioEncoder.__init__(self, freeze=False, lr_mult=lr_mult)
        if n_fft < win_length:
            raise ConfigError(f"EAT: n_fft ({n_fft}) must be >= win_length ({win_length})")
        vit = EATViT(dim, depth, heads, mlp_ratio, patch_size, n_mels, target_length, eps)
        backend = _EATBackend(vit, patch_size, target_length, n_mels, sample_rate, win_length, hop_length, n_fft, norm_mean, norm_std)
        self._adopt(backend, "eat", window_batch, freeze)


def heads_for_width(dim: int) -> int:
    """Attention heads of an EAT/ViT of width `dim` (64 channels per head: base 768 -> 12, large
    1024 -> 16). Head counts are not stored in a state dict; this is the ViT convention EAT follows."""
    h = max(1, dim // 64)
    return h if dim % h == 0 else 1
