"""Audio front-end: loading, resampling, log-mel features (torch) and the Timeline.

`Timeline` is the one place in finelap that converts between frame indices and seconds.
Every other module (label rasterisation, detection output, plots, long-audio stitching) asks a
Timeline; none derives a hop size on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import AudioError
from .mel_config import MelConfig  # re-exported: it used to be defined here

__all__ = [
    "AUDIO_EXTENSIONS",
    "TruncatedAudioWarning",
    "load_audio",
    "audio_duration",
    "to_float32",
    "resample",
    "MelConfig",
    "LogMel",
    "mel_filterbank",
    "Timeline",
]

# Extensions we try to decode with libsndfile. mp3 needs libsndfile >= 1.1 (checked at load time).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


def _soundfile():
    import soundfile as sf  # local: keeps `import finelap` light

    return sf


def to_float32(x: np.ndarray) -> np.ndarray:
    """Convert integer PCM or float audio to float32 in [-1, 1) without changing its shape."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind == "i":
        return (x.astype(np.float64) / float(2 ** (8 * x.dtype.itemsize - 1))).astype(np.float32)
    if x.dtype.kind == "u":  # unsigned PCM (8-bit wav) is offset-binary
        half = float(2 ** (8 * x.dtype.itemsize - 1))
        return ((x.astype(np.float64) - half) / half).astype(np.float32)
    raise TypeError(f"unsupported audio dtype {x.dtype}")


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample along the last axis with soxr (high quality). Returns float32."""
    if orig_sr == target_sr:
        return x.astype(np.float32, copy=False)
    import soxr

    if x.ndim == 1:
        return soxr.resample(x, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    # soxr wants (frames, channels)
    return soxr.resample(x.T, orig_sr, target_sr, quality="HQ").T.astype(np.float32, copy=False)


class TruncatedAudioWarning(UserWarning):
    """An audio file holds less audio than its header declares (an interrupted copy or download);
    the audio that is there is used."""


# (path, size, mtime_ns) of files already warned about: a streamed file is opened once per window
_WARNED_TRUNCATED: set[tuple[str, int, int]] = set()


def _declared_wav_frames(path: Path, file_size: int) -> tuple[int, int] | None:
    """(frames the RIFF/WAVE header's data chunk declares, frames present in the file), or None
    when the file is not a plain RIFF WAVE, the chunks cannot be walked, or the size is the
    "unknown" placeholder (0 or 0xFFFFFFFF) that streaming writers leave. libsndfile silently
    clamps its frame count to what is present, so a cut-off WAV reads as a shorter file."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = 0
            pos = 12
            while pos + 8 <= file_size:
                f.seek(pos)
                cid, size = struct.unpack("<4sI", f.read(8))
                if cid == b"fmt ":
                    fmt = f.read(min(size, 16))
                    if len(fmt) >= 14:
                        block_align = struct.unpack("<H", fmt[12:14])[0]
                elif cid == b"data":
                    if block_align <= 0 or size in (0, 0xFFFFFFFF):
                        return None
                    present = max(0, file_size - (pos + 8))
                    return size // block_align, min(size, present) // block_align
                pos += 8 + size + (size & 1)  # chunks are padded to an even size
    except (OSError, struct.error):
        return None
    return None


def _warn_truncated(path: Path, declared: int, present: int, sr: int) -> None:
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return
    if key in _WARNED_TRUNCATED:
        return
    _WARNED_TRUNCATED.add(key)
    import warnings

    warnings.warn(
        f"{path}: truncated file: its header declares {declared / sr:.3f} s of audio but only {present / sr:.3f} s "
        f"is present; using the {present / sr:.3f} s",
        TruncatedAudioWarning,
        stacklevel=3,
    )


def _check_truncated(path: Path, frames: int, sr: int) -> None:
    """Warn (once per file) when a WAV's data chunk declares more frames than the file holds."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    wav = _declared_wav_frames(path, size)
    if wav is not None and wav[0] > wav[1]:
        _warn_truncated(path, wav[0], min(wav[1], frames) if frames > 0 else wav[1], sr)


def _check_readable(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            import os

            raise AudioError(path, f"broken symbolic link (its target {os.readlink(path)} does not exist)")
        raise AudioError(path, "file not found")
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    ext = path.suffix.lower()
    if ext not in AUDIO_EXTENSIONS:
        raise AudioError(path, f"unsupported format '{ext or '(none)'}'; supported: {', '.join(AUDIO_EXTENSIONS)}")
    if ext == ".mp3" and "MP3" not in _soundfile().available_formats():
        raise AudioError(path, "mp3 is not supported by this libsndfile build (needs >= 1.1); convert to wav/flac")


def load_audio(
    path: str | Path,
    sample_rate: int | None = 16000,
    mono: bool = True,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> np.ndarray:
    """Read an audio file as float32.

    Returns shape (N,) if `mono` else (C, N), resampled to `sample_rate` (None keeps the file's rate).
    `start_s`/`duration_s` read a window without decoding the whole file (used for long audio).
    Raises AudioError naming the file for: missing, empty, corrupt, unsupported, zero-length, NaN/Inf.
    """
    sf = _soundfile()
    path = Path(path)
    _check_readable(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            start = int(round(start_s * sr))
            if start:
                f.seek(min(start, f.frames) if f.frames > 0 else start)
            frames = -1 if duration_s is None else int(round(duration_s * sr))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
            header_frames = f.frames
    except AudioError:
        raise
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/ValueError
        raise AudioError(path, f"corrupt or unreadable audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0 and start_s == 0.0:
        raise AudioError(path, "zero-length audio (no samples)")
    if start_s == 0.0 and duration_s is None and 0 < data.shape[0] < header_frames:
        _warn_truncated(path, header_frames, data.shape[0], sr)  # e.g. a FLAC cut at a frame boundary
    else:
        _check_truncated(path, header_frames, sr)
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or Inf samples")
    x = data.T  # (C, N)
    if mono:
        x = x.mean(axis=0)
    if sample_rate is not None and sr != sample_rate and x.shape[-1] > 0:
        x = resample(x, sr, sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32)


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the header (no decode). Raises AudioError like `load_audio`."""
    sf = _soundfile()
    path = Path(path)
    _check_readable(path)
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(path, f"corrupt or unreadable audio ({type(e).__name__}: {e})") from None
    if info.frames <= 0:
        raise AudioError(path, "zero-length audio (no samples)")
    _check_truncated(path, info.frames, info.samplerate)
    return info.frames / float(info.samplerate)


# ----------------------------------------------------------------------------- log-mel


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-style (Auditory Toolbox) mel filterbank with area normalisation, shape (n_mels, n_fft//2+1).

    Same definition as librosa.filters.mel(htk=False, norm='slaney'); float64.
    """
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    mel_pts = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    hz_pts = _mel_to_hz_slaney(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels]))[:, None]
    return weights


class LogMel(torch.nn.Module):
    """Batched log-mel spectrogram in torch; matches librosa (center=True, constant padding, slaney mel,
    power 2, `10*log10(max(S, amin))`).

    forward: wave (B, N) or (N,) float -> (B, n_mels, T) float32 dB, T = 1 + N // hop_length.
    """

    def __init__(self, cfg: MelConfig = MelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)
        # periodic Hann window (librosa get_window('hann', fftbins=True)), zero-padded to n_fft centrally
        win = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
        lpad = (cfg.n_fft - cfg.win_length) // 2
        win = torch.nn.functional.pad(win, (lpad, cfg.n_fft - cfg.win_length - lpad))
        self.register_buffer("window", win, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        squeeze = wave.dim() == 1
        if squeeze:
            wave = wave[None]
        dtype = torch.float64 if cfg.compute_dtype == "float64" else torch.float32
        x = wave.to(dtype)
        pad = cfg.n_fft // 2
        x = torch.nn.functional.pad(x, (pad, pad))
        spec = torch.stft(
            x,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            window=self.window.to(device=x.device, dtype=dtype),
            center=False,
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()  # (B, F, T)
        mel = torch.matmul(self.fb.to(device=x.device, dtype=dtype), power)
        db = 10.0 * torch.log10(torch.clamp(mel, min=cfg.amin))
        if cfg.top_db is not None:
            peak = db.amax(dim=(-2, -1), keepdim=True)
            db = torch.maximum(db, peak - cfg.top_db)
        db = db.to(torch.float32)
        return db[0] if squeeze else db


# ----------------------------------------------------------------------------- Timeline


@dataclass(frozen=True)
class Timeline:
    """Maps encoder frame indices to seconds and back.

    Frame j covers the half-open span [j / frame_rate_hz, (j + 1) / frame_rate_hz) + offset_s.
    Built from the front-end (`from_mel`) for our encoders, or from a frame rate reported by an
    adapter (HF encoders). All label rasterisation and detection output go through this class.
    """

    frame_rate_hz: float
    offset_s: float = 0.0
    # Set when the timeline comes from a mel front-end; lets us count frames for a sample count.
    sample_rate: int | None = None
    hop_length: int | None = None
    downsample: int = 1

    def __post_init__(self) -> None:
        if not self.frame_rate_hz > 0:
            raise ValueError(f"frame_rate_hz must be positive, got {self.frame_rate_hz}")

    @classmethod
    def from_mel(cls, mel: MelConfig, downsample: int = 1) -> "Timeline":
        """Timeline for an encoder that pools `downsample` mel frames into one output frame."""
        return cls(
            frame_rate_hz=mel.sample_rate / (mel.hop_length * downsample),
            sample_rate=mel.sample_rate,
            hop_length=mel.hop_length,
            downsample=downsample,
        )

    @property
    def hop_s(self) -> float:
        return 1.0 / self.frame_rate_hz

    def num_frames(self, duration_s: float) -> int:
        """Frames needed to cover `duration_s` seconds (at least 1)."""
        return max(1, int(math.ceil(duration_s * self.frame_rate_hz - 1e-9)))

    def num_frames_for_samples(self, n_samples: int) -> int:
        """Frames an encoder emits for n_samples (centered mel, then pooling by `downsample`)."""
        if self.hop_length is None or self.sample_rate is None:
            raise ValueError("this Timeline was not built from a mel front-end; use num_frames(duration_s)")
        # mel frames = 1 + n // hop (centered STFT); the encoder pools groups of `downsample`,
        # keeping a partial last group (ceil)
        n_mel = 1 + n_samples // self.hop_length
        return -(-n_mel // self.downsample)

    def frame_start(self, idx: np.ndarray | int) -> np.ndarray | float:
        return np.asarray(idx) / self.frame_rate_hz + self.offset_s

    def frame_center(self, idx: np.ndarray | int) -> np.ndarray | float:
        return (np.asarray(idx) + 0.5) / self.frame_rate_hz + self.offset_s

    def frame_edges(self, n_frames: int, duration_s: float | None = None) -> np.ndarray:
        """n_frames + 1 boundaries in seconds; the last is clipped to `duration_s` when given."""
        edges = np.arange(n_frames + 1, dtype=np.float64) / self.frame_rate_hz + self.offset_s
        if duration_s is not None:
            edges = np.minimum(edges, self.offset_s + duration_s)
            edges[-1] = self.offset_s + duration_s if n_frames > 0 else edges[-1]
        return edges

    def seconds_to_frame(self, t: float | np.ndarray) -> np.ndarray | int:
        """Index of the frame containing time t."""
        out = np.floor((np.asarray(t, dtype=np.float64) - self.offset_s) * self.frame_rate_hz + 1e-9).astype(np.int64)
        return int(out) if out.ndim == 0 else out

    def shifted(self, offset_s: float) -> "Timeline":
        """Same rate, starting at `offset_s` (used for windows of long audio)."""
        return Timeline(self.frame_rate_hz, offset_s, self.sample_rate, self.hop_length, self.downsample)

    def overlap(self, onset: float, offset: float, n_frames: int) -> np.ndarray:
        """Fraction of each frame covered by [onset, offset), shape (n_frames,)."""
        edges = self.frame_edges(n_frames)
        lo = np.clip(onset, edges[:-1], edges[1:])
        hi = np.clip(offset, edges[:-1], edges[1:])
        return (hi - lo) * self.frame_rate_hz

    def rasterize(
        self,
        events: Iterable[tuple[object, float, float]],
        classes: Sequence[object] | dict,
        n_frames: int,
        min_overlap: float = 0.5,
    ) -> np.ndarray:
        """Per-frame binary targets (n_frames, n_classes) from (label, onset, offset) events.

        A frame is positive when the event covers >= `min_overlap` of it; an event too short to
        cover any frame that much still marks the frame holding its midpoint, so no event vanishes.
        Events with labels not in `classes` are ignored.
        """
        index = classes if isinstance(classes, dict) else {c: i for i, c in enumerate(classes)}
        y = np.zeros((n_frames, len(index)), dtype=np.float32)
        for label, onset, offset in events:
            k = index.get(label)
            if k is None or offset <= onset:
                continue
            frac = self.overlap(onset, offset, n_frames)
            pos = frac >= min_overlap - 1e-9
            if not pos.any():
                mid = self.seconds_to_frame(0.5 * (onset + offset))
                if 0 <= mid < n_frames:
                    pos[mid] = True
            y[pos, k] = 1.0
        return y

    def segments(
        self,
        active: np.ndarray,
        duration_s: float | None = None,
        min_duration_s: float = 0.0,
        merge_gap_s: float = 0.0,
    ) -> list[tuple[float, float]]:
        """Turn a binary frame activity (T,) into [(onset_s, offset_s)], merging gaps shorter than
        `merge_gap_s` and dropping segments shorter than `min_duration_s`."""
        active = np.asarray(active, dtype=bool)
        edges = self.frame_edges(len(active), duration_s)
        padded = np.concatenate([[False], active, [False]])
        d = np.diff(padded.astype(np.int8))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        segs = [(float(edges[s]), float(edges[e])) for s, e in zip(starts, ends)]
        merged: list[tuple[float, float]] = []
        for on, off in segs:
            if merged and on - merged[-1][1] < merge_gap_s - 1e-9:
                merged[-1] = (merged[-1][0], off)
            else:
                merged.append((on, off))
        return [(on, off) for on, off in merged if off - on >= min_duration_s - 1e-9]
