"""The log-mel front-end's parameters, `MelConfig`: one dataclass for the feature extractor
(`finelap.audio.LogMel`, which re-exports it) and the run configuration (`finelap.config.AudioConfig`
extends it with crop lengths, so the YAML keys `audio.sample_rate`, `audio.n_mels`, ... are these
fields). No torch and no numpy here, so configs validate before the heavy imports.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MelConfig"]


@dataclass(frozen=True)
class MelConfig:
    """Log-mel front-end parameters. Defaults: 16 kHz, 25 ms window, 10 ms hop, 64 mel bands."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    amin: float = 1e-10
    top_db: float | None = None  # None: no per-clip clamp (keeps windowed long-audio features seamless)
    # STFT and mel projection run in float64: float32 FFT error is ~1e-2 dB on quiet bins, above our
    # 1e-3 dB parity target with librosa. Cost is small next to the encoder. Output is float32.
    compute_dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must be <= n_fft ({self.n_fft})")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}")
        if self.compute_dtype not in ("float32", "float64"):
            raise ValueError("compute_dtype must be 'float32' or 'float64'")

    def num_frames(self, n_samples: int) -> int:
        """Mel frames for a signal of n_samples (centered STFT)."""
        return 1 + n_samples // self.hop_length
