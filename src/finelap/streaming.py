"""Audio of any length: encode in overlapping windows and stitch frames without seams.

Windows start on the encoder's frame grid (multiples of hop_length * downsample samples), so a
window's frame j is global frame start/samples_per_frame + j. Each window is read with a margin
of context on both sides; only its core frames are kept. With a margin at least the encoder's
receptive field, the stitched frames equal one-pass encoding (tested); for encoders with global
attention the margin bounds the context instead. Memory is O(window), whatever the duration,
and the output is deterministic (no random crops, fixed window grid).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .audio import Timeline, audio_duration, load_audio

# encode_fn(wave (B, N) float32, lengths (B,) long) -> frames (B, T, D)
EncodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """One window in samples: read [read_start, read_end); keep global frames [keep_start, keep_end)
    which are the window's local frames [keep_start - read_start // spf, ...)."""

    read_start: int
    read_end: int
    keep_start: int
    keep_end: int


def plan_windows(n_samples: int, timeline: Timeline, window_s: float = 60.0, margin_s: float = 2.0) -> list[Window]:
    """Cover all frames of an n_samples signal with core windows of ~window_s plus margins."""
    if timeline.hop_length is None or timeline.sample_rate is None:
        raise ValueError("streaming needs a Timeline built from a mel front-end (Timeline.from_mel)")
    spf = timeline.hop_length * timeline.downsample
    total = timeline.num_frames_for_samples(n_samples)
    core = max(1, int(round(window_s * timeline.frame_rate_hz)))
    margin = max(0, int(math.ceil(margin_s * timeline.frame_rate_hz)))
    out = []
    for f0 in range(0, total, core):
        f1 = min(total, f0 + core)
        rs = max(0, f0 - margin) * spf
        re = min(n_samples, (f1 + margin) * spf)
        out.append(Window(rs, re, f0, f1))
    return out


def stream_frames(
    encode_fn: EncodeFn,
    read_fn: Callable[[int, int], np.ndarray],
    n_samples: int,
    timeline: Timeline,
    window_s: float = 60.0,
    margin_s: float = 2.0,
    batch_windows: int = 1,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first_global_frame, frames (t, D)) chunks in order, covering every frame once.

    read_fn(start, end) returns samples [start, end) as float32 (from memory or a file).
    `batch_windows` windows of equal length are encoded together for throughput.
    """
    windows = plan_windows(n_samples, timeline, window_s, margin_s)
    spf = timeline.hop_length * timeline.downsample  # type: ignore[operator]
    for i in range(0, len(windows), batch_windows):
        group = windows[i : i + batch_windows]
        waves = [np.asarray(read_fn(w.read_start, w.read_end), dtype=np.float32) for w in group]
        lengths = torch.tensor([len(x) for x in waves], dtype=torch.long)
        wave = torch.zeros(len(waves), int(lengths.max()))
        for j, x in enumerate(waves):
            wave[j, : len(x)] = torch.from_numpy(x)
        with torch.inference_mode():
            frames = encode_fn(wave, lengths)
        for j, w in enumerate(group):
            local0 = w.keep_start - w.read_start // spf
            yield w.keep_start, frames[j, local0 : local0 + (w.keep_end - w.keep_start)]


def file_reader(path: str | Path, sample_rate: int) -> tuple[Callable[[int, int], np.ndarray], int]:
    """A windowed reader over an audio file at `sample_rate`, and its length in samples.

    Reads only the requested span (plus a resampling guard) from disk, so memory stays bounded.
    """
    import soundfile as sf

    path = Path(path)
    duration = audio_duration(path)
    native_sr = sf.info(str(path)).samplerate
    n = int(round(duration * sample_rate)) if native_sr != sample_rate else sf.info(str(path)).frames
    guard = 0.05 if native_sr != sample_rate else 0.0  # seconds of context for the resampler

    def read(start: int, end: int) -> np.ndarray:
        t0, t1 = start / sample_rate, end / sample_rate
        g0 = min(guard, t0)
        x = load_audio(path, sample_rate, start_s=t0 - g0, duration_s=(t1 - t0) + g0 + guard)
        off = int(round(g0 * sample_rate))
        x = x[off : off + (end - start)]
        if len(x) < end - start:
            x = np.pad(x, (0, end - start - len(x)))
        return x

    return read, n


def array_reader(wave: np.ndarray) -> Callable[[int, int], np.ndarray]:
    return lambda s, e: wave[s:e]
