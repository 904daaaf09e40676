"""Strong-label soundscape curation (FineLAP-100k style): mix labelled single-event clips into
soundscapes with exact, audibility-recalibrated onsets/offsets and template captions.

Pipeline (`synthesize`):
1. **Pool.** Every source file is read once (in parallel), resampled to `cfg.sample_rate` and
   trimmed of leading/trailing silence (frame energy `trim_top_db` below the loudest frame).
   Corrupt, empty, NaN/Inf, missing or silent files are skipped, counted and listed in
   `stats.json`; they never stop the run.
2. **Splits.** Sources are grouped by *recording* (ESC-50's `src_file`; else meta `source_id` or
   `recording`; else the file stem) and whole recordings are assigned to train/val/test, so no
   recording is heard in two splits (`splits.json` lists them). With `split_folds`, splits are
   ESC-50 folds instead (a recording found in two splits is an error).
3. **Mixing** (per soundscape, `Synthesizer.render`). Background: a random crop of a background
   clip (looped if short) or, without backgrounds, a pink or brown noise floor, at an RMS level
   drawn from `background_db` (dBFS). Then 1..`max_events` events: a class (uniform over the
   split's classes when `class_balanced`), one of its sources, a random crop if longer than
   `max_event_s`, short sources (< `repeat_below_s`) looped 2..`max_repeats` times with short gaps
   with probability `repeat_prob`, half-Hann fades of `fade_s`, and a gain giving an SNR drawn from
   `snr_db` between the source's RMS and the background's RMS. The onset is drawn uniformly among
   positions where at most `max_overlap` events would sound at once (`placement_tries` attempts,
   else the event is dropped and counted). If the mix peaks above `peak_dbfs`, everything
   (background and events) is scaled down together, so SNRs are unchanged.
4. **Boundary recalibration.** As FLAM does at -70 dB A-weighted: each event's isolated, scaled
   track is A-weighted (IEC 61672 magnitude response applied to its spectrum) and cut into
   `recal_frame_s` frames on a grid starting at t=0; a frame's level is the mean square of the
   weighted signal in dB relative to a full-scale RMS of 1. The label runs from the first to the last frame above
   `recal_db` (clipped to where the source was placed); with `split_gap_s` it is split at quieter
   stretches at least that long. Events with no frame above the threshold are removed from the mix.
5. **Captions.** `num_captions` template phrasings (order, count, rough timing) from the phrase
   bank (`finelap.data.captions`); or an external `captioner` "module:function".

Determinism: soundscape i of split s uses `np.random.SeedSequence([seed, crc32(s), i])` and is
written by key; manifests are written in index order; no timestamps are stored. The output is
byte-identical for any number of workers.

Output (`out_dir`):
    config.json, splits.json, phrase_bank.json, stats.json, stats.png
    <split>/audio/<split>_<index>.flac   (format "flac": 16-bit PCM)
    <split>/shards/<split>-000000.tar    (format "webdataset": <key>.flac + <key>.json)
    <split>/manifest.jsonl               (format "flac" only: the audio lives in the shards otherwise)
    <split>/strong.tsv, <split>/durations.tsv   (filenames "<key>.flac")
    <split>/sources.jsonl                (the pool clips whose sources this split mixes, as a manifest:
                                          train on soundscapes + their own sources without leaking
                                          another split's recordings; not written for a SourcePool input)
"""
from __future__ import annotations

import io
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import AudioError, ConfigError, FinelapError
from .types import Clip, Event

__all__ = [
    "SynthConfig",
    "SynthResult",
    "Source",
    "SourcePool",
    "Placement",
    "Soundscape",
    "Synthesizer",
    "a_weighting_db",
    "a_weighted_frame_levels",
    "audible_span",
    "trim_bounds",
    "colored_noise",
    "source_id",
    "sources_from_clips",
    "load_pool",
    "load_backgrounds",
    "assign_splits",
    "synthesize",
]


# ----------------------------------------------------------------------------- config


def _pair(v: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (low, high) pair, got {v!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{name} must satisfy low <= high (finite), got {v!r}")
    return lo, hi


@dataclass
class SynthConfig:
    """Everything that decides the content of a synthesised dataset (saved as config.json).

    splits: split name -> number of soundscapes, in output order.
    split_folds: split -> ESC-50 folds to draw its sources from (instead of splitting recordings).
    split_fractions: split -> share of recordings (default: proportional to `splits` counts).
    snr_db / background_db / repeat_gap_s: (low, high) ranges sampled uniformly.
    background_db: RMS level (dBFS, 0 = full-scale RMS 1) of the background or noise floor.
    recal_db: A-weighted frame level (dB re full-scale RMS) above which an event counts as audible.
    event_labels: "raw" keeps the pool's labels; "canonical" writes the phrase bank's phrase.
    captioner: optional "module:function" called as fn(events, duration) -> list[str].
    """

    splits: dict[str, int] = field(default_factory=lambda: {"train": 800, "val": 100, "test": 100})
    seed: int = 0
    sample_rate: int = 16000
    duration: float = 10.0
    min_events: int = 1
    max_events: int = 5
    max_overlap: int = 3
    snr_db: tuple[float, float] = (12.0, 20.0)
    background_db: tuple[float, float] = (-40.0, -30.0)
    noise_colors: tuple[str, ...] = ("pink", "brown")
    trim_top_db: float = 40.0
    trim_frame_s: float = 0.01
    min_source_s: float = 0.05
    max_event_s: float | None = None
    repeat_below_s: float = 1.0
    repeat_prob: float = 0.5
    max_repeats: int = 4
    repeat_gap_s: tuple[float, float] = (0.05, 0.5)
    fade_s: float = 0.02
    recal_db: float = -70.0
    recal_frame_s: float = 0.02
    split_gap_s: float | None = None
    peak_dbfs: float = -1.0
    class_balanced: bool = True
    placement_tries: int = 20
    num_captions: int = 3
    captioner: str | None = None
    event_labels: str = "raw"
    split_folds: dict[str, list[int]] | None = None
    split_fractions: dict[str, float] | None = None
    format: str = "flac"
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if not self.splits or not isinstance(self.splits, Mapping):
            raise ConfigError("splits must be a non-empty mapping split -> number of soundscapes")
        self.splits = {str(k): int(v) for k, v in self.splits.items()}
        for name, n in self.splits.items():
            if n < 0:
                raise ConfigError(f"split '{name}' has a negative count ({n})")
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ConfigError(f"split name {name!r} must be letters, digits, '-' or '_'")
        if sum(self.splits.values()) == 0:
            raise ConfigError("splits ask for 0 soundscapes in total")
        if self.sample_rate < 1000:
            raise ConfigError(f"sample_rate must be >= 1000 Hz, got {self.sample_rate}")
        if not self.duration > 0:
            raise ConfigError(f"duration must be > 0 s, got {self.duration}")
        if not 0 <= self.min_events <= self.max_events:
            raise ConfigError(f"need 0 <= min_events <= max_events, got {self.min_events}..{self.max_events}")
        if self.max_events < 1:
            raise ConfigError("max_events must be >= 1")
        if self.max_overlap < 1:
            raise ConfigError(f"max_overlap must be >= 1, got {self.max_overlap}")
        self.snr_db = _pair(self.snr_db, "snr_db")
        self.background_db = _pair(self.background_db, "background_db")
        self.repeat_gap_s = _pair(self.repeat_gap_s, "repeat_gap_s")
        if self.background_db[1] > 0:
            raise ConfigError(f"background_db must be <= 0 dBFS, got {self.background_db}")
        if self.repeat_gap_s[0] < 0:
            raise ConfigError("repeat_gap_s must be >= 0")
        self.noise_colors = tuple(self.noise_colors)
        bad = [c for c in self.noise_colors if c not in _NOISE_EXPONENTS]
        if not self.noise_colors or bad:
            raise ConfigError(f"noise_colors must be a non-empty subset of {sorted(_NOISE_EXPONENTS)}, got {self.noise_colors}")
        if not self.trim_top_db > 0:
            raise ConfigError("trim_top_db must be > 0")
        if not 0 < self.trim_frame_s <= 0.5 or not 0 < self.recal_frame_s <= 0.5:
            raise ConfigError("trim_frame_s and recal_frame_s must be in (0, 0.5] s")
        if round(self.recal_frame_s * self.sample_rate) < 8:
            raise ConfigError("recal_frame_s is shorter than 8 samples at this sample rate")
        if self.min_source_s < 0:
            raise ConfigError("min_source_s must be >= 0")
        if self.max_event_s is not None and not 0 < self.max_event_s:
            raise ConfigError("max_event_s must be > 0 (or None for the soundscape duration)")
        if not 0 <= self.repeat_prob <= 1:
            raise ConfigError("repeat_prob must be in [0, 1]")
        if self.max_repeats < 1:
            raise ConfigError("max_repeats must be >= 1")
        if self.fade_s < 0:
            raise ConfigError("fade_s must be >= 0")
        if self.split_gap_s is not None and not self.split_gap_s > 0:
            raise ConfigError("split_gap_s must be > 0 or None")
        if self.peak_dbfs > 0:
            raise ConfigError("peak_dbfs must be <= 0")
        if self.placement_tries < 1:
            raise ConfigError("placement_tries must be >= 1")
        if self.num_captions < 0:
            raise ConfigError("num_captions must be >= 0")
        if self.event_labels not in ("raw", "canonical"):
            raise ConfigError(f"event_labels must be 'raw' or 'canonical', got {self.event_labels!r}")
        if self.format not in ("flac", "webdataset"):
            raise ConfigError(f"format must be 'flac' or 'webdataset', got {self.format!r}")
        if self.shard_size < 1:
            raise ConfigError("shard_size must be >= 1")
        if self.captioner is not None and ":" not in self.captioner:
            raise ConfigError(f"captioner must be 'module:function', got {self.captioner!r}")
        if self.split_folds is not None:
            self.split_folds = {str(k): sorted({int(f) for f in v}) for k, v in self.split_folds.items()}
            missing = [s for s, n in self.splits.items() if n > 0 and not self.split_folds.get(s)]
            if missing:
                raise ConfigError(f"split_folds gives no folds for split(s) {', '.join(missing)}")
            extra = [s for s in self.split_folds if s not in self.splits]
            if extra:
                raise ConfigError(f"split_folds names unknown split(s) {', '.join(extra)}")
            seen: dict[int, str] = {}
            for s, folds in self.split_folds.items():
                for f in folds:
                    if f in seen:
                        raise ConfigError(f"fold {f} is given to both '{seen[f]}' and '{s}' (recordings would leak)")
                    seen[f] = s
        if self.split_fractions is not None:
            if self.split_folds is not None:
                raise ConfigError("give split_folds or split_fractions, not both")
            self.split_fractions = {str(k): float(v) for k, v in self.split_fractions.items()}
            if set(self.split_fractions) != set(self.splits):
                raise ConfigError(f"split_fractions must name exactly the splits ({', '.join(self.splits)}), got {', '.join(self.split_fractions)}")
            if any(v < 0 for v in self.split_fractions.values()) or sum(self.split_fractions.values()) <= 0:
                raise ConfigError("split_fractions must be >= 0 and not all 0")

    @property
    def n_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))

    @property
    def frame_len(self) -> int:
        return int(round(self.recal_frame_s * self.sample_rate))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


# ----------------------------------------------------------------------------- signal helpers


def a_weighting_db(freqs: np.ndarray) -> np.ndarray:
    """IEC 61672-1 A-weighting in dB for frequencies in Hz (0 dB at 1 kHz; -inf at 0 Hz)."""
    f2 = np.asarray(freqs, dtype=np.float64) ** 2
    with np.errstate(divide="ignore"):
        ra = (12194.0**2 * f2**2) / (
            (f2 + 20.598997**2) * np.sqrt((f2 + 107.65265**2) * (f2 + 737.86223**2)) * (f2 + 12194.0**2)
        )
        return 20.0 * np.log10(ra) + 2.0


def _fast_len(n: int) -> int:
    """Smallest 2-3-5-smooth integer >= n (fast FFT sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


@lru_cache(maxsize=32)
def _a_gain(sample_rate: int, n_fft: int) -> np.ndarray:
    """A-weighting amplitude gain per rfft bin, float32, (n_fft // 2 + 1,)."""
    g = 10.0 ** (a_weighting_db(np.fft.rfftfreq(n_fft, 1.0 / sample_rate)) / 20.0)
    g[0] = 0.0
    g = g.astype(np.float32)
    g.setflags(write=False)
    return g


def a_weighted_frame_levels(x: np.ndarray, sample_rate: int, frame_len: int, pad: int | None = None) -> np.ndarray:
    """A-weighted level per non-overlapping frame.

    x: (N,) signal. The whole signal is A-weighted in the frequency domain (zero-phase IEC 61672
    magnitude response; zero padding of `pad` samples, default 64 ms, keeps the circular wrap
    away), then cut into frames of `frame_len` samples from sample 0 (the last one zero-padded).
    Returns (ceil(N / frame_len),) float64 dB: 10*log10 of each frame's mean square, so a
    full-scale 1 kHz sine reads -3.01 dB and digital silence -300 dB.
    """
    x = np.asarray(x, dtype=np.float32)
    n_frames = -(-len(x) // frame_len)
    if n_frames == 0:
        return np.zeros(0)
    pad = int(round(0.064 * sample_rate)) if pad is None else pad
    n_fft = _fast_len(n_frames * frame_len + pad)
    spec = np.fft.rfft(x, n_fft)
    spec *= _a_gain(sample_rate, n_fft)
    y = np.fft.irfft(spec, n_fft)[: n_frames * frame_len].reshape(n_frames, frame_len)
    ms = np.einsum("ij,ij->i", y, y, dtype=np.float64) / frame_len
    return 10.0 * np.log10(np.maximum(ms, 1e-30))


def audible_span(x: np.ndarray, sample_rate: int, frame_len: int, threshold_db: float,
                 chunk_frames: int = 32, margin_s: float = 0.1) -> tuple[int, int] | None:
    """(first, last) frame whose A-weighted level exceeds `threshold_db`, or None if none does.

    Same answer as thresholding `a_weighted_frame_levels(x, ...)`, but frames are weighted in
    chunks scanned from each end until an audible frame is found, each chunk with `margin_s` of
    context (the A-weighting impulse response has decayed by > 80 dB after 0.1 s). Sources are
    loud near their trimmed ends, so this costs two short FFTs instead of one over the whole event.
    """
    n_frames = -(-len(x) // frame_len)
    if n_frames <= 3 * chunk_frames:
        act = np.flatnonzero(a_weighted_frame_levels(x, sample_rate, frame_len) > threshold_db)
        return (int(act[0]), int(act[-1])) if len(act) else None
    m = max(1, int(math.ceil(margin_s * sample_rate / frame_len)))

    def active(a: int, b: int) -> np.ndarray:  # audible frames among [a, b), as absolute indices
        lo, hi = max(0, a - m), min(n_frames, b + m)
        lv = a_weighted_frame_levels(x[lo * frame_len : hi * frame_len], sample_rate, frame_len)
        return a + np.flatnonzero(lv[a - lo : b - lo] > threshold_db)

    first = None
    for a in range(0, n_frames, chunk_frames):
        act = active(a, min(n_frames, a + chunk_frames))
        if len(act):
            first = int(act[0])
            break
    if first is None:
        return None
    for b in range(n_frames, first, -chunk_frames):
        act = active(max(first, b - chunk_frames), b)
        if len(act):
            return first, int(act[-1])
    return first, first


def trim_bounds(x: np.ndarray, sample_rate: int, top_db: float = 40.0, frame_s: float = 0.01,
                floor_db: float = -90.0) -> tuple[int, int] | None:
    """[start, end) sample bounds after removing leading/trailing frames more than `top_db` below
    the loudest frame (and below `floor_db` dBFS mean square). None if the whole clip is silent."""
    hop = max(1, int(round(frame_s * sample_rate)))
    n = len(x)
    if n == 0:
        return None
    n_frames = -(-n // hop)
    buf = np.zeros(n_frames * hop, dtype=np.float64)
    buf[:n] = x
    level = 10.0 * np.log10(np.maximum((buf.reshape(n_frames, hop) ** 2).mean(axis=1), 1e-30))
    peak = float(level.max())
    if peak <= floor_db:
        return None
    active = np.flatnonzero(level > max(peak - top_db, floor_db))
    return int(active[0] * hop), int(min(n, (active[-1] + 1) * hop))


# Power spectrum ~ 1/f^k: white 0, pink 1, brown 2. Noise is drawn directly in the frequency
# domain (complex Gaussian bins shaped by f^(-k/2), one inverse FFT): exact slope, no filter
# transient, numpy only, ~2 ms for 10 s at 16 kHz.
_NOISE_EXPONENTS: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0}


@lru_cache(maxsize=8)
def _noise_shape(n: int, color: str) -> np.ndarray:
    f = np.fft.rfftfreq(n).astype(np.float64)
    f[0] = 1.0
    shape = (f ** (-_NOISE_EXPONENTS[color] / 2.0)).astype(np.float32)
    shape[0] = 0.0  # no DC: zero-mean noise
    shape.setflags(write=False)
    return shape


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """(n,) float32 zero-mean noise of the given colour ("white", "pink", "brown") with unit RMS."""
    if color not in _NOISE_EXPONENTS:
        raise ValueError(f"unknown noise colour {color!r}; expected one of {sorted(_NOISE_EXPONENTS)}")
    shape = _noise_shape(n, color)
    spec = rng.standard_normal(2 * len(shape), dtype=np.float32).view(np.complex64)
    spec *= shape
    x = np.fft.irfft(spec, n).astype(np.float32, copy=False)
    rms = float(np.sqrt(np.dot(x, x) / max(n, 1)))
    return x / np.float32(max(rms, 1e-12))


def _half_hann_fades(x: np.ndarray, n_fade: int) -> np.ndarray:
    """Apply half-Hann fade-in/out of n_fade samples (in place on a copy)."""
    n_fade = min(n_fade, len(x) // 2)
    if n_fade <= 0:
        return x
    x = x.copy()
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(n_fade) + 0.5) / n_fade)).astype(x.dtype)
    x[:n_fade] *= ramp
    x[-n_fade:] *= ramp[::-1]
    return x


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


# ----------------------------------------------------------------------------- source pool


@dataclass(frozen=True)
class Source:
    """One usable single-event source after loading and trimming.

    key: unique id (clip key, plus "#k" for the k-th event taken from a multi-event clip).
    recording: recording id used for leakage-free splits. fold: ESC-50 fold if known.
    offset/length: where its samples lie in `SourcePool.audio`.
    """

    key: str
    label: str
    recording: str
    path: str
    fold: int | None
    offset: int
    length: int


@dataclass
class SourcePool:
    """All sources' trimmed audio, concatenated in one float32 array (cheap to share with workers)."""

    sources: list[Source]
    audio: np.ndarray
    sample_rate: int

    def signal(self, i: int) -> np.ndarray:
        s = self.sources[i]
        return self.audio[s.offset : s.offset + s.length]

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for s in self.sources})


def source_id(clip: Clip) -> str:
    """Recording a clip comes from: ESC-50 `src_file`, else meta source_id / recording, else
    the audio file's stem."""
    for k in ("src_file", "source_id", "recording"):
        v = clip.meta.get(k)
        if v not in (None, ""):
            return str(v)
    return os.path.splitext(os.path.basename(clip.audio))[0]


@dataclass(frozen=True)
class _Want:
    """A source to cut from a file: label and optional [start_s, end_s) span."""

    key: str
    label: str
    recording: str
    path: str
    fold: int | None
    start_s: float | None = None
    end_s: float | None = None


def sources_from_clips(clips: Sequence[Clip]) -> tuple[list[_Want], list[dict[str, str]]]:
    """Turn pool clips into wanted sources (plus the clips that cannot give one, with a reason).

    A clip with events gives one source per event that overlaps no other event (the event's span
    is cut out); otherwise a clip with weak `labels` gives one source labelled with its first label.
    """
    wants: list[_Want] = []
    rejected: list[dict[str, str]] = []
    used_keys: set[str] = set()
    for c in clips:
        rec = source_id(c)
        fold_v = c.meta.get("fold")
        try:
            fold = int(fold_v) if fold_v not in (None, "") else None
        except (TypeError, ValueError):
            fold = None
        base = c.key
        key = base
        n = 1
        while key in used_keys:
            key, n = f"{base}~{n}", n + 1
        if c.events:
            evs = sorted(c.events, key=lambda e: (e.onset, e.offset, e.label))
            took = 0
            for k, e in enumerate(evs):
                clash = any(o is not e and o.onset < e.offset and e.onset < o.offset for o in evs)
                if clash:
                    continue
                sub = key if len(evs) == 1 else f"{key}#{k}"
                wants.append(_Want(sub, e.label, rec, c.audio, fold, float(e.onset), float(e.offset)))
                took += 1
            used_keys.add(key)
            if not took:
                rejected.append({"path": c.audio, "problem": "every event overlaps another (need single-event clips)"})
        elif c.labels:
            used_keys.add(key)
            wants.append(_Want(key, str(c.labels[0]), rec, c.audio, fold))
        else:
            rejected.append({"path": c.audio, "problem": "no label (needs 'labels' or 'events')"})
    return wants, rejected


def _load_one(args: tuple[str, int, float, float, float, float | None, float | None]) -> tuple[np.ndarray | None, str | None]:
    """Worker: load, resample, cut and trim one source. Returns (audio, None) or (None, problem)."""
    path, sr, top_db, frame_s, min_s, start_s, end_s = args
    from ..audio import load_audio

    try:
        x = load_audio(path, sr)
    except AudioError as e:
        return None, e.problem
    except Exception as e:  # anything else a decoder may throw is still a bad file, not a crash
        return None, f"unreadable ({type(e).__name__}: {e})"
    if start_s is not None:
        a = max(0, int(round(start_s * sr)))
        b = len(x) if end_s is None else min(len(x), int(round(end_s * sr)))
        x = x[a:b]
    if top_db is None:  # backgrounds: keep as is, but they must not be silent
        return (x, None) if len(x) and _rms(x) > 1e-6 else (None, "silent")
    bounds = trim_bounds(x, sr, top_db, frame_s)
    if bounds is None:
        return None, "silent (no audible frame)"
    x = x[bounds[0] : bounds[1]]
    if len(x) < max(1, int(round(min_s * sr))):
        return None, f"too short after trimming silence ({len(x) / sr:.3f} s < {min_s} s)"
    return np.ascontiguousarray(x, dtype=np.float32), None


def _map(fn: Callable, items: Sequence, workers: int, desc: str, chunksize: int = 4) -> Iterator:
    """Ordered map with a progress bar, in-process for workers <= 1."""
    from ..utils import progress

    if workers <= 1 or len(items) <= 1:
        yield from progress((fn(it) for it in items), total=len(items), desc=desc)
        return
    _warm_imports()
    ctx = _mp_context()
    with ctx.Pool(min(workers, len(items))) as pool:
        yield from progress(pool.imap(fn, items, chunksize=chunksize), total=len(items), desc=desc)


def _warm_imports() -> None:
    import soundfile  # noqa: F401

    from .. import audio  # noqa: F401
    from . import captions, manifests  # noqa: F401


def _mp_context():
    import multiprocessing as mp

    # fork shares the preloaded pool copy-on-write; spawn (macOS/Windows) pickles it once per worker
    # via the initializer. Neither affects the output.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def load_pool(clips: Sequence[Clip], cfg: SynthConfig, workers: int = 1) -> tuple[SourcePool, list[dict[str, str]]]:
    """Load, resample and trim every source once. Returns the pool and the skipped sources
    ([{"path", "problem"}], in pool order)."""
    wants, skipped = sources_from_clips(clips)
    jobs = [(w.path, cfg.sample_rate, cfg.trim_top_db, cfg.trim_frame_s, cfg.min_source_s, w.start_s, w.end_s) for w in wants]
    sources: list[Source] = []
    chunks: list[np.ndarray] = []
    offset = 0
    for w, (x, problem) in zip(wants, _map(_load_one, jobs, workers, "loading sources")):
        if x is None:
            skipped.append({"path": w.path, "problem": problem or "unknown"})
            continue
        sources.append(Source(w.key, w.label, w.recording, w.path, w.fold, offset, len(x)))
        chunks.append(x)
        offset += len(x)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return SourcePool(sources, audio, cfg.sample_rate), skipped


def load_backgrounds(path: str | os.PathLike | Sequence[Clip], cfg: SynthConfig, workers: int = 1) -> tuple[SourcePool, list[dict[str, str]]]:
    """Background pool from a folder of audio files (searched recursively), any `load_clips`
    format, or clips. Labels (if any) are used in captions ("... with rain in the background")."""
    from ..audio import AUDIO_EXTENSIONS

    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise ConfigError(f"no audio files found under backgrounds folder {p}")
            clips: Sequence[Clip] = [Clip(audio=str(f)) for f in files]
        else:
            from .manifests import load_clips

            clips = load_clips(p, check_audio=False)
    else:
        clips = path
    jobs = [(c.audio, cfg.sample_rate, None, cfg.trim_frame_s, 0.0, None, None) for c in clips]
    sources, chunks, skipped, offset = [], [], [], 0
    for c, (x, problem) in zip(clips, _map(_load_one, jobs, workers, "loading backgrounds")):
        if x is None:
            skipped.append({"path": c.audio, "problem": problem or "unknown"})
            continue
        label = c.labels[0] if c.labels else ""
        sources.append(Source(c.key, label, source_id(c), c.audio, None, offset, len(x)))
        chunks.append(np.ascontiguousarray(x, dtype=np.float32))
        offset += len(x)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return SourcePool(sources, audio, cfg.sample_rate), skipped


# ----------------------------------------------------------------------------- splits


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def assign_splits(pool: SourcePool, cfg: SynthConfig, dropped: list[dict[str, Any]] | None = None) -> dict[str, list[int]]:
    """Source indices per split, with every recording in exactly one split.

    By folds (`cfg.split_folds`) or by recording: recordings are walked class by class (in a
    seeded random order within each class) and each goes to the split furthest below its share
    (`split_fractions`, default proportional to the soundscape counts), which spreads every
    class over the splits. Splits asking for 0 soundscapes get no sources.
    With folds, a recording whose clips sit in folds of different splits (ESC-50 has one:
    src_file 134049, hen in fold 2 and rooster in fold 3) is kept only in the first of those
    splits (in `cfg.splits` order); its other clips are left out and appended to `dropped`.
    """
    active = [s for s, n in cfg.splits.items() if n > 0]
    out: dict[str, list[int]] = {s: [] for s in cfg.splits}
    if cfg.split_folds is not None:
        fold_to_split = {f: s for s, folds in cfg.split_folds.items() for f in folds if cfg.splits.get(s, 0) > 0}
        order = {s: k for k, s in enumerate(cfg.splits)}
        home: dict[str, str] = {}
        for src in pool.sources:
            if src.fold is None:
                raise ConfigError(f"split_folds needs a fold for every source; {src.path} has none")
            s = fold_to_split.get(src.fold)
            if s is not None and (src.recording not in home or order[s] < order[home[src.recording]]):
                home[src.recording] = s
        for i, src in enumerate(pool.sources):
            s = fold_to_split.get(src.fold)  # type: ignore[arg-type]
            if s is None:
                continue
            if s != home[src.recording]:
                if dropped is not None:
                    dropped.append({"recording": src.recording, "path": src.path, "fold": src.fold,
                                    "split": s, "kept_in": home[src.recording]})
                continue
            out[s].append(i)
    else:
        by_rec: dict[str, list[int]] = {}
        for i, src in enumerate(pool.sources):
            by_rec.setdefault(src.recording, []).append(i)
        if len(by_rec) < len(active):
            raise ConfigError(
                f"the pool has {len(by_rec)} usable recording(s) but {len(active)} splits need sources; "
                "add sources or drop a split"
            )
        shares = cfg.split_fractions or {s: float(n) for s, n in cfg.splits.items()}
        frac = np.array([shares[s] if s in active else 0.0 for s in cfg.splits], dtype=np.float64)
        frac /= frac.sum()
        names = list(cfg.splits)
        by_class: dict[str, list[str]] = {}
        for rec in sorted(by_rec):
            by_class.setdefault(pool.sources[by_rec[rec][0]].label, []).append(rec)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5B117]))
        counts = np.zeros(len(names))
        for label in sorted(by_class):
            recs = by_class[label]
            for j in rng.permutation(len(recs)):
                deficit = frac * (counts.sum() + 1) - counts
                deficit[frac == 0] = -np.inf
                k = int(np.argmax(deficit))  # ties -> first split in order
                counts[k] += 1
                out[names[k]].extend(by_rec[recs[j]])
        for s in active:
            out[s].sort()
    for s in active:
        if not out[s]:
            raise ConfigError(f"split '{s}' got no usable sources (check split_folds / the pool)")
    return out


# ----------------------------------------------------------------------------- rendering


@dataclass
class Placement:
    """One placed source in a soundscape: samples [start, start + len(signal)) of the mix."""

    label: str
    source: str
    recording: str
    start: int
    signal: np.ndarray  # scaled, faded (and looped) track as mixed, float32
    snr_db: float
    repeats: int
    events: list[Event] = field(default_factory=list)  # recalibrated labels (empty: inaudible, removed)


@dataclass
class Soundscape:
    """A rendered soundscape. audio: (N,) float32 final mix (before 16-bit quantisation)."""

    key: str
    split: str
    index: int
    audio: np.ndarray
    events: list[Event]
    placements: list[Placement]
    captions: list[str]
    background: str
    background_db: float
    scale_db: float
    n_unplaced: int
    n_inaudible: int
    sample_rate: int = 16000

    def clip(self, audio_path: str) -> Clip:
        meta = {
            "split": self.split,
            "background": self.background,
            "background_db": round(self.background_db, 3),
            "sources": [
                {
                    "label": p.label,
                    "source": p.source,
                    "recording": p.recording,
                    "start": round(p.start / self.sample_rate, 6),
                    "end": round((p.start + len(p.signal)) / self.sample_rate, 6),
                    "snr_db": round(p.snr_db, 3),
                    "repeats": p.repeats,
                }
                for p in self.placements
                if p.events
            ],
        }
        return Clip(audio=audio_path, captions=list(self.captions), events=list(self.events),
                    duration=len(self.audio) / self.sample_rate, id=self.key, meta=meta)


def _fits(spans: Sequence[tuple[int, int]], a: int, b: int, cap: int) -> bool:
    """True if adding [a, b) keeps at most `cap` spans active at any instant."""
    pts = []
    for s, e in spans:
        lo, hi = max(s, a), min(e, b)
        if lo < hi:
            pts.append((lo, 1))
            pts.append((hi, -1))
    pts.sort()  # at equal times ends (-1) sort before starts: touching spans do not overlap
    cur = best = 0
    for _, d in pts:
        cur += d
        best = max(best, cur)
    return best + 1 <= cap


class Synthesizer:
    """Renders soundscapes from a loaded pool. Stateless per call: `render(split, i)` depends only
    on (cfg, pool, backgrounds, split assignment, split, i)."""

    def __init__(self, pool: SourcePool, cfg: SynthConfig, backgrounds: SourcePool | None = None,
                 split_sources: Mapping[str, Sequence[int]] | None = None, bank: Any = None) -> None:
        from .captions import PhraseBank

        if pool.sample_rate != cfg.sample_rate:
            raise ConfigError(f"pool sample rate {pool.sample_rate} != config {cfg.sample_rate}")
        if not pool.sources:
            raise ConfigError("the source pool has no usable sources")
        self.pool = pool
        self.cfg = cfg
        self.backgrounds = backgrounds if backgrounds is not None and backgrounds.sources else None
        self.split_sources = {k: list(v) for k, v in (split_sources or assign_splits(pool, cfg)).items()}
        self.bank = bank if bank is not None else PhraseBank.default()
        # per split: class -> source indices (sorted classes: stable draws)
        self._classes: dict[str, tuple[list[str], dict[str, np.ndarray]]] = {}
        for split, idx in self.split_sources.items():
            by: dict[str, list[int]] = {}
            for i in idx:
                by.setdefault(pool.sources[i].label, []).append(i)
            labels = sorted(by)
            self._classes[split] = (labels, {k: np.asarray(v) for k, v in by.items()})

    def key(self, split: str, index: int) -> str:
        return f"{split}_{index:06d}"

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, _split_code(split), index, stream]))

    def _background(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, str, str]:
        """Unit-RMS background (n,), its description, and its label (for captions, may be '')."""
        if self.backgrounds is not None:
            j = int(rng.integers(len(self.backgrounds.sources)))
            src = self.backgrounds.sources[j]
            x = self.backgrounds.signal(j)
            if len(x) < n:
                x = np.tile(x, -(-n // len(x)) + 1)
            start = int(rng.integers(0, len(x) - n + 1))
            seg = x[start : start + n].astype(np.float32)
            r = _rms(seg)
            if r > 1e-6:
                return seg / np.float32(r), src.key, src.label
        color = self.cfg.noise_colors[int(rng.integers(len(self.cfg.noise_colors)))]
        return colored_noise(n, color, rng), f"{color} noise", ""

    def render(self, split: str, index: int) -> Soundscape:
        cfg = self.cfg
        if split not in self._classes or not self._classes[split][0]:
            raise ConfigError(f"split '{split}' has no sources")
        labels, by_class = self._classes[split]
        rng = self._rng(split, index, 0)
        sr, n = cfg.sample_rate, cfg.n_samples
        bg, bg_name, bg_label = self._background(rng, n)
        bg_db = float(rng.uniform(*cfg.background_db))
        bg_rms = 10.0 ** (bg_db / 20.0)
        mix = bg * np.float32(bg_rms)

        max_len = n if cfg.max_event_s is None else min(n, int(round(cfg.max_event_s * sr)))
        n_fade = int(round(cfg.fade_s * sr))
        n_events = int(rng.integers(cfg.min_events, cfg.max_events + 1))
        placements: list[Placement] = []
        spans: list[tuple[int, int]] = []
        n_unplaced = 0
        for _ in range(n_events):
            if cfg.class_balanced:
                cands = by_class[labels[int(rng.integers(len(labels)))]]
            else:
                cands = np.asarray(self.split_sources[split])
            si = int(cands[int(rng.integers(len(cands)))])
            src = self.pool.sources[si]
            x = self.pool.signal(si)
            if len(x) > max_len:
                a = int(rng.integers(0, len(x) - max_len + 1))
                x = x[a : a + max_len]
            unit = _half_hann_fades(x, n_fade)
            unit_rms = _rms(unit)
            repeats = 1
            if len(unit) < cfg.repeat_below_s * sr and cfg.max_repeats > 1 and rng.random() < cfg.repeat_prob:
                repeats = int(rng.integers(2, cfg.max_repeats + 1))
                gap = int(round(rng.uniform(*cfg.repeat_gap_s) * sr))
                while repeats > 1 and repeats * len(unit) + (repeats - 1) * gap > n:
                    repeats -= 1
                if repeats > 1:
                    period = np.zeros(len(unit) + gap, dtype=np.float32)
                    period[: len(unit)] = unit
                    unit = np.tile(period, repeats)[: repeats * len(unit) + (repeats - 1) * gap]
            snr = float(rng.uniform(*cfg.snr_db))
            gain = bg_rms * 10.0 ** (snr / 20.0) / max(unit_rms, 1e-12)
            length = len(unit)
            placed = None
            for _try in range(cfg.placement_tries):
                start = int(rng.integers(0, n - length + 1))
                if _fits(spans, start, start + length, cfg.max_overlap):
                    placed = start
                    break
            if placed is None:
                n_unplaced += 1
                continue
            sig = unit * np.float32(gain)
            label = src.label if cfg.event_labels == "raw" else self.bank.canonical(src.label)
            placements.append(Placement(label, src.key, src.recording, placed, sig, snr, repeats))
            spans.append((placed, placed + length))
            mix[placed : placed + length] += sig

        # one scale for everything keeps every SNR while keeping the peak below peak_dbfs
        peak = float(np.max(np.abs(mix))) if n else 0.0
        limit = 10.0 ** (cfg.peak_dbfs / 20.0)
        scale = min(1.0, limit / peak) if peak > 0 else 1.0
        if scale < 1.0:
            mix *= np.float32(scale)
            for p in placements:
                p.signal = p.signal * np.float32(scale)
        n_inaudible = 0
        for p in placements:
            p.events = self._recalibrate(p)
            if not p.events:
                mix[p.start : p.start + len(p.signal)] -= p.signal
                n_inaudible += 1
        events = sorted((e for p in placements for e in p.events), key=lambda e: (e.onset, e.offset, e.label))
        repeats_of = {id(e): p.repeats for p in placements for e in p.events}
        kept = [p for p in placements if p.events]
        caps_rng = self._rng(split, index, 1)
        from .captions import caption_soundscape

        captions = caption_soundscape(
            events, cfg.duration, self.bank, caps_rng, n=cfg.num_captions,
            repeats=[repeats_of[id(e)] for e in events], background=self.bank.canonical(bg_label) if bg_label else None,
        )
        return Soundscape(
            key=self.key(split, index), split=split, index=index, audio=mix, events=events, placements=kept,
            captions=captions, background=bg_name, background_db=bg_db + 20.0 * math.log10(scale),
            scale_db=20.0 * math.log10(scale), n_unplaced=n_unplaced, n_inaudible=n_inaudible, sample_rate=sr,
        )

    def _recalibrate(self, p: Placement) -> list[Event]:
        """Labels where the isolated track `p` is above `recal_db` A-weighted (frame grid from t=0)."""
        from ..audio import Timeline

        cfg = self.cfg
        sr, hop, n = cfg.sample_rate, cfg.frame_len, cfg.n_samples
        s0, s1 = p.start, p.start + len(p.signal)
        j0, j1 = s0 // hop, -(-s1 // hop)
        buf = np.zeros((j1 - j0) * hop, dtype=np.float32)
        buf[s0 - j0 * hop : s1 - j0 * hop] = p.signal
        if cfg.split_gap_s is None:
            # one label per event: only its first and last audible frames matter
            span = audible_span(buf, sr, hop, cfg.recal_db)
            if span is None:
                return []
            active = np.zeros(j1 - j0, dtype=bool)
            active[span[0] : span[1] + 1] = True
        else:
            active = a_weighted_frame_levels(buf, sr, hop) > cfg.recal_db
            if not active.any():
                return []
        tl = Timeline(frame_rate_hz=sr / hop).shifted(j0 * hop / sr)
        gap = cfg.split_gap_s if cfg.split_gap_s is not None else math.inf
        lo_s, hi_s = s0 / sr, min(s1, n) / sr
        out = []
        for on, off in tl.segments(active, merge_gap_s=gap):
            on, off = max(on, lo_s), min(off, hi_s)
            if off > on:
                out.append(Event(p.label, on, off))
        return out


# ----------------------------------------------------------------------------- workers

_STATE: dict[str, Any] = {}


def _init_worker(synth: Synthesizer, out_dir: str | None) -> None:
    _STATE["synth"] = synth
    _STATE["out_dir"] = out_dir


def _encode_flac(audio: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    # x * 2^15 is the scaling libsndfile/soundfile use when reading PCM_16 back as float
    pcm = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _work(job: tuple[str, int]) -> dict[str, Any]:
    """Render one soundscape; write its FLAC (format flac) or return the bytes (webdataset)."""
    split, index = job
    cpu0 = time.process_time()
    synth: Synthesizer = _STATE["synth"]
    sc = synth.render(split, index)
    flac = _encode_flac(sc.audio, synth.cfg.sample_rate)
    rec: dict[str, Any] = {"clip": sc.clip(f"audio/{sc.key}.flac"), "stats": _soundscape_stats(sc, synth.cfg)}
    if synth.cfg.format == "flac":
        path = Path(_STATE["out_dir"]) / split / "audio" / f"{sc.key}.flac"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(flac)
        os.replace(tmp, path)
    else:
        rec["flac"] = flac
    rec["cpu_s"] = time.process_time() - cpu0  # reported, never written (output must not vary)
    return rec


def _soundscape_stats(sc: Soundscape, cfg: SynthConfig) -> dict[str, Any]:
    from ..audio import Timeline

    tl = Timeline(frame_rate_hz=cfg.sample_rate / cfg.frame_len)
    n_frames = tl.num_frames(cfg.duration)
    poly = np.zeros(n_frames, dtype=np.int64)
    for e in sc.events:
        poly += tl.overlap(e.onset, e.offset, n_frames) > 0
    return {
        "labels": [e.label for e in sc.events],
        "durations": [e.offset - e.onset for e in sc.events],
        "snr_db": [p.snr_db for p in sc.placements],
        "repeats": [p.repeats for p in sc.placements],
        "max_polyphony": int(poly.max()) if n_frames else 0,
        "polyphony_frames": np.bincount(poly, minlength=cfg.max_overlap + 1).tolist(),
        "n_unplaced": sc.n_unplaced,
        "n_inaudible": sc.n_inaudible,
        "scale_db": sc.scale_db,
    }


# ----------------------------------------------------------------------------- stats


def _hist(values: Sequence[float], edges: Sequence[float]) -> dict[str, list]:
    counts, e = np.histogram(np.asarray(values, dtype=np.float64), bins=np.asarray(edges, dtype=np.float64))
    return {"edges": [round(float(x), 6) for x in e], "counts": counts.astype(int).tolist()}


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(len(v)), "mean": round(float(v.mean()), 6), "min": round(float(v.min()), 6),
            "max": round(float(v.max()), 6)}


def _split_stats(records: Sequence[dict[str, Any]], cfg: SynthConfig) -> dict[str, Any]:
    labels = [l for r in records for l in r["labels"]]
    durs = [d for r in records for d in r["durations"]]
    snrs = [s for r in records for s in r["snr_db"]]
    per_class: dict[str, int] = {}
    for l in labels:
        per_class[l] = per_class.get(l, 0) + 1
    poly_frames = np.zeros(cfg.max_overlap + 1, dtype=np.int64)
    for r in records:
        pf = np.asarray(r["polyphony_frames"])
        poly_frames[: len(pf)] += pf[: len(poly_frames)]
    n_ev = [len(r["labels"]) for r in records]
    lo, hi = cfg.snr_db
    return {
        "n_soundscapes": len(records),
        "n_events": len(labels),
        "events_per_soundscape": _hist(n_ev, np.arange(0, max(n_ev + [cfg.max_events]) + 2) - 0.5) if records else {},
        "events_per_class": dict(sorted(per_class.items())),
        "event_duration_s": {**_summary(durs), "hist": _hist(durs, np.linspace(0, cfg.duration, 21))},
        "snr_db": {**_summary(snrs), "hist": _hist(snrs, np.linspace(lo, hi if hi > lo else lo + 1, 17))},
        "max_polyphony": _hist([r["max_polyphony"] for r in records], np.arange(0, cfg.max_overlap + 2) - 0.5),
        "polyphony_time_fraction": [round(float(x), 6) for x in poly_frames / max(1, poly_frames.sum())],
        "looped_events": int(sum(1 for r in records for k in r["repeats"] if k > 1)),
        "unplaced_events": int(sum(r["n_unplaced"] for r in records)),
        "inaudible_events": int(sum(r["n_inaudible"] for r in records)),
        "peak_limited_soundscapes": int(sum(1 for r in records if r["scale_db"] < 0)),
    }


def _plot_stats(stats: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in stats["splits"] if stats["splits"][s]["n_soundscapes"]]
    classes = sorted({c for s in splits for c in stats["splits"][s]["events_per_class"]})
    # class bars on the left (full height, grows with the number of classes), histograms right
    fig = plt.figure(figsize=(14, max(8.0, 0.2 * len(classes) + 1.5)))
    gs = fig.add_gridspec(3, 2, width_ratios=(1.1, 1.0))
    ax = fig.add_subplot(gs[:, 0])
    left = np.zeros(len(classes))
    for s in splits:
        v = np.array([stats["splits"][s]["events_per_class"].get(c, 0) for c in classes], dtype=float)
        ax.barh(np.arange(len(classes)), v, left=left, label=s)
        left += v
    ax.set_yticks(np.arange(len(classes)))
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_ylim(len(classes) - 0.5, -0.5)
    ax.set_title("events per class")
    ax.set_xlabel("events")
    ax.legend(fontsize=8)
    for row, key, title in ((0, "event_duration_s", "event duration (s)"), (2, "snr_db", "event SNR (dB)")):
        ax = fig.add_subplot(gs[row, 1])
        for s in splits:
            h = stats["splits"][s][key]["hist"]
            ax.stairs(h["counts"], np.asarray(h["edges"]), label=s)
        ax.set_title(title)
        ax.set_ylabel("events")
        ax.legend(fontsize=8)
    ax = fig.add_subplot(gs[1, 1])
    width = 0.8 / max(1, len(splits))
    for k, s in enumerate(splits):
        frac = stats["splits"][s]["polyphony_time_fraction"]
        ax.bar(np.arange(len(frac)) + k * width - 0.4 + width / 2, frac, width=width, label=s)
        ax.set_xticks(np.arange(len(frac)))
    ax.set_xlabel("simultaneous events")
    ax.set_ylabel("fraction of time")
    ax.set_title("overlap (polyphony)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- driver


@dataclass
class SynthResult:
    """What `synthesize` produced. Timings are only reported here, never written (determinism)."""

    out_dir: Path
    counts: dict[str, int]
    stats: dict[str, Any]
    stats_path: Path
    stats_png: Path | None
    skipped: list[dict[str, str]]
    load_s: float
    render_s: float
    cpu_s_per_soundscape: float = 0.0  # mean CPU time of one render+encode+write in a worker

    @property
    def soundscapes_per_s(self) -> float:
        return sum(self.counts.values()) / max(self.render_s, 1e-9)

    def summary(self) -> str:
        lines = [f"wrote {sum(self.counts.values())} soundscapes to {self.out_dir}"]
        for s, st in self.stats["splits"].items():
            lines.append(
                f"  {s}: {st['n_soundscapes']} soundscapes, {st['n_events']} events, "
                f"{len(st['events_per_class'])} classes, mean event {st['event_duration_s'].get('mean', 0):.2f} s, "
                f"{st['unplaced_events']} unplaced, {st['inaudible_events']} inaudible"
            )
        pool = self.stats["pool"]
        lines.append(f"  pool: {pool['n_sources']} sources from {pool['n_recordings']} recordings, {pool['n_classes']} classes; "
                     f"skipped {pool['n_skipped']} bad source(s)")
        for s in self.skipped[:10]:
            lines.append(f"    skipped {s['path']}: {s['problem']}")
        if len(self.skipped) > 10:
            lines.append(f"    ... and {len(self.skipped) - 10} more (see {self.stats_path})")
        lines.append(f"  load {self.load_s:.1f} s, render+write {self.render_s:.1f} s ({self.soundscapes_per_s:.1f} soundscapes/s)")
        lines.append(f"  stats: {self.stats_path}")
        if self.stats_png is not None:
            lines.append(f"  plot: {self.stats_png}")
        return "\n".join(lines)


def synthesize(
    pool_clips: Sequence[Clip] | SourcePool,
    out_dir: str | os.PathLike,
    cfg: SynthConfig,
    backgrounds: Sequence[Clip] | SourcePool | str | os.PathLike | None = None,
    workers: int = 1,
    plot: bool = True,
) -> SynthResult:
    """Build a strong-label soundscape dataset in `out_dir` (see the module docstring for layout).

    pool_clips: labelled single-event clips (or an already loaded SourcePool).
    backgrounds: clips, a folder / label file, a loaded SourcePool, or None (noise floor).
    workers: processes for loading and rendering; the output does not depend on it.
    """
    from ..utils import progress, write_json_atomic
    from . import manifests

    out = Path(out_dir)
    workers = max(1, int(workers))
    t0 = time.perf_counter()
    skipped: list[dict[str, str]] = []
    if isinstance(pool_clips, SourcePool):
        pool = pool_clips
    else:
        pool, skipped = load_pool(pool_clips, cfg, workers)
    if not pool.sources:
        raise FinelapError(f"no usable sources in the pool ({len(skipped)} skipped: "
                           + "; ".join(f"{s['path']}: {s['problem']}" for s in skipped[:3]) + ")")
    bg_pool: SourcePool | None = None
    bg_skipped: list[dict[str, str]] = []
    if isinstance(backgrounds, SourcePool):
        bg_pool = backgrounds
    elif backgrounds is not None:
        bg_pool, bg_skipped = load_backgrounds(backgrounds, cfg, workers)
        if not bg_pool.sources:
            raise FinelapError(f"no usable background files ({len(bg_skipped)} skipped)")
    captioner = None
    if cfg.captioner:
        from .captions import load_captioner

        captioner = load_captioner(cfg.captioner)
    leaks: list[dict[str, Any]] = []
    split_sources = assign_splits(pool, cfg, leaks)
    if leaks:
        from ..utils import log

        log(f"synth: left out {len(leaks)} clip(s) whose recording also appears in another split's folds "
            f"(kept there): {', '.join(sorted({d['recording'] for d in leaks}))}")
    from .captions import PhraseBank

    synth = Synthesizer(pool, cfg, bg_pool, split_sources, PhraseBank.default())
    load_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    for split, n in cfg.splits.items():
        if n and cfg.format == "flac":
            (out / split / "audio").mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    split_stats: dict[str, Any] = {}
    counts: dict[str, int] = {}
    used_labels: set[str] = set()
    cpu_total = 0.0
    _warm_imports()  # forked workers inherit them instead of importing each on first use
    ctx = _mp_context() if workers > 1 else None
    pool_ctx = ctx.Pool(workers, initializer=_init_worker, initargs=(synth, str(out))) if ctx else None
    try:
        if pool_ctx is None:
            _init_worker(synth, str(out))
        for split, n in cfg.splits.items():
            if n == 0:
                continue
            jobs = [(split, i) for i in range(n)]
            it = pool_ctx.imap(_work, jobs, chunksize=max(1, min(16, n // (4 * workers) or 1))) if pool_ctx else map(_work, jobs)
            clips: list[Clip] = []
            records: list[dict[str, Any]] = []
            wds: list[tuple[Clip, bytes]] = []
            for rec in progress(it, total=n, desc=f"synth {split}"):
                clip: Clip = rec["clip"]
                if captioner is not None:
                    clip.captions = _external_captions(captioner, clip, cfg)
                clips.append(clip)
                records.append(rec["stats"])
                cpu_total += rec["cpu_s"]
                used_labels.update(e.label for e in clip.events)
                if cfg.format == "webdataset":
                    wds.append((clip, rec["flac"]))
            _write_split(out / split, split, clips, wds, cfg, manifests)
            if not isinstance(pool_clips, SourcePool):
                _write_split_sources(out / split, pool_clips, {pool.sources[i].path for i in split_sources.get(split, [])}, manifests)
            split_stats[split] = _split_stats(records, cfg)
            counts[split] = n
    finally:
        if pool_ctx is not None:
            pool_ctx.close()
            pool_ctx.join()
        _STATE.clear()
    render_s = time.perf_counter() - t1

    # side files: everything sorted / in fixed order so reruns are byte-identical
    synth.bank.for_labels(used_labels | {s.label for s in pool.sources}).save(out / "phrase_bank.json")
    write_json_atomic(out / "config.json", cfg.to_json())
    write_json_atomic(out / "splits.json", {
        split: {
            "n_soundscapes": cfg.splits[split],
            "folds": (cfg.split_folds or {}).get(split),
            "recordings": sorted({pool.sources[i].recording for i in idx}),
            "n_sources": len(idx),
            "classes": sorted({pool.sources[i].label for i in idx}),
            "left_out_for_leakage": [d for d in leaks if d["split"] == split],
        }
        for split, idx in split_sources.items() if cfg.splits.get(split, 0) > 0
    })
    all_skipped = skipped + [{"path": s["path"], "problem": s["problem"], "kind": "background"} for s in bg_skipped]
    stats = {
        "pool": {
            "n_sources": len(pool.sources),
            "n_recordings": len({s.recording for s in pool.sources}),
            "n_classes": len(pool.labels),
            "n_backgrounds": len(bg_pool.sources) if bg_pool is not None else 0,
            "noise_floor": bg_pool is None,
            "n_skipped": len(all_skipped),
            "skipped": all_skipped,
        },
        "splits": split_stats,
    }
    stats_path = out / "stats.json"
    write_json_atomic(stats_path, stats)
    png = _plot_stats(stats, out / "stats.png") if plot else None
    return SynthResult(out, counts, stats, stats_path, png, all_skipped, load_s, render_s,
                       cpu_total / max(1, sum(counts.values())))


def _external_captions(captioner: Callable, clip: Clip, cfg: SynthConfig) -> list[str]:
    try:
        caps = captioner(list(clip.events), float(clip.duration or cfg.duration))
    except FinelapError:
        raise
    except Exception as e:
        raise ConfigError(f"captioner {cfg.captioner} failed on {clip.key}: {type(e).__name__}: {e}") from None
    if not isinstance(caps, (list, tuple)) or not all(isinstance(c, str) for c in caps):
        raise ConfigError(f"captioner {cfg.captioner} must return a list of strings, got {type(caps).__name__}")
    return list(caps) if caps else list(clip.captions)


def _write_split_sources(d: Path, pool_clips: Sequence[Clip], paths: set[str], manifests: Any) -> None:
    """`<split>/sources.jsonl`: the pool clips (as given, labels and events kept) that gave this
    split a usable source, in pool order, audio paths absolute."""
    manifests.write_manifest(d / "sources.jsonl", [c for c in pool_clips if c.audio in paths], absolute=True)


def _write_split(d: Path, split: str, clips: list[Clip], wds: list[tuple[Clip, bytes]], cfg: SynthConfig, manifests: Any) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if cfg.format == "flac":
        for c in clips:
            c.audio = str(d / c.audio)
        manifests.write_manifest(d / "manifest.jsonl", clips)
    else:
        manifests.write_webdataset(d / "shards", wds, shard_size=cfg.shard_size, pattern=f"{split}-%06d.tar")
    manifests.write_strong_tsv(d / "strong.tsv", {f"{c.key}.flac": c.events for c in clips})
    manifests.write_durations_tsv(d / "durations.tsv", {f"{c.key}.flac": float(c.duration or cfg.duration) for c in clips})
