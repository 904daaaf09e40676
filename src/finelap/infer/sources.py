"""Audio inputs of a Pipeline: a path, an array with its rate or an HF-style dict becomes a `Source`
readable window by window at the model's rate (decoded whole up to 10 minutes, else read from
disk); batches are lists; work runs over items on a small thread pool (`map_in_threads`); frame
outputs are streamed over `plan_encoder_windows`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

from ..audio import AUDIO_EXTENSIONS, Timeline, audio_duration, load_audio, resample, to_float32
from ..errors import AudioError, FinelapError

__all__ = [
    "AudioInput", "Source", "as_list", "open_source", "pad", "find_audio_files", "map_in_threads", "plan_encoder_windows",
]  # fmt: skip

# One clip: a path, an array (samples,) / (samples, channels) / (channels, samples) with its
# sample rate, or an HF-style {"array" or "raw": samples, "sampling_rate": Hz} dict.
AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Mapping[str, Any]]
# Multichannel arrays: the channel axis is the dimension of at most this many entries.
_MAX_CHANNELS = 8


# Files up to this long are decoded whole; longer ones are read window by window from disk.
_IN_MEMORY_S = 600.0
_DONE = object()  # end of the items in `map_in_threads`


@dataclass
class Source:
    """One audio input, readable window by window: read(start, end) -> float32 samples at the
    model's rate. `wave` is set when the whole input is in memory."""

    name: str
    n_samples: int
    read: Callable[[int, int], np.ndarray]
    wave: np.ndarray | None = None


def _unpack_audio_dict(item: Mapping[str, Any], sample_rate: int | None, name: str) -> tuple[Any, int]:
    """(samples, rate) of an HF-style {"array" | "raw": samples, "sampling_rate": Hz} dict (what
    `datasets.Audio` yields and HF audio pipelines take). A `sample_rate` argument must agree."""
    keys = [k for k in ("array", "raw") if k in item]
    if len(keys) != 1 or "sampling_rate" not in item:
        raise FinelapError(f"{name}: an audio dict needs 'array' (or 'raw') and 'sampling_rate' keys, got {sorted(map(str, item))}")
    rate = item["sampling_rate"]
    if isinstance(rate, (float, np.floating)) and float(rate).is_integer():
        rate = int(rate)
    if sample_rate is not None and rate != sample_rate:
        raise FinelapError(f"{name}: the dict says sampling_rate={rate} but sample_rate={sample_rate} was passed")
    x = item[keys[0]]
    if isinstance(x, (list, tuple)):
        x = np.asarray(x, dtype=np.float32)
    return x, rate


def _downmix(x: np.ndarray, channel_axis: int | None, name: str) -> np.ndarray:
    """(samples,) unchanged; (samples, channels) or (channels, samples) -> channel mean (samples,).

    The channel axis is `channel_axis` when given, else the one dimension of at most
    _MAX_CHANNELS; an ambiguous shape (both dimensions small, e.g. (6, 4), or both large, e.g.
    (2000, 3000)) is an error that asks for `channel_axis`."""
    if x.ndim == 1:
        if channel_axis is not None:
            raise FinelapError(f"{name}: channel_axis={channel_axis} given for a 1-D (mono) array")
        return x
    if x.ndim != 2:
        raise FinelapError(f"{name}: audio array must be (samples,) or 2-D (samples, channels) / (channels, samples), got shape {x.shape}")
    if channel_axis is None:
        small = [d for d in (0, 1) if x.shape[d] <= _MAX_CHANNELS]
        if len(small) != 1:
            raise FinelapError(
                f"{name}: cannot tell which axis of shape {x.shape} holds the channels (expected one dimension "
                f"of at most {_MAX_CHANNELS}); pass channel_axis=0 for (channels, samples) or 1 for (samples, channels)"
            )
        channel_axis = small[0]
    if channel_axis not in (0, 1, -1, -2):
        raise FinelapError(f"{name}: channel_axis must be 0 or 1 for a 2-D array, got {channel_axis}")
    return x.mean(axis=channel_axis, dtype=np.float64).astype(np.float32)


def find_audio_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively, sorted) into audio files; files are kept as given (even if
    missing, so the caller reports them). Hidden files and folders are skipped. Broken symbolic
    links with an audio extension are kept too, so the caller lists them as failed rather than
    dropping them unseen."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if (f.is_file() or f.is_symlink()) and f.suffix.lower() in AUDIO_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )  # fmt: skip
            out.extend(found)
        else:
            out.append(p)
    return out


def as_list(inputs: Any) -> tuple[list[Any], bool]:
    """(items, is_batch). One clip (a path, a {"array"/"raw", "sampling_rate"} dict, or a 1-D
    or 2-D array: mono, or multichannel to downmix) is one item; a list or tuple of clips is
    a batch. Arrays of 3 or more dimensions are refused: a batch is a list."""
    if isinstance(inputs, (str, os.PathLike, Mapping)):
        return [inputs], False
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        if inputs.ndim > 2:
            raise FinelapError(
                f"audio array must be (samples,) or (samples, channels) / (channels, samples), got shape "
                f"{tuple(inputs.shape)}; pass a batch of clips as a list of arrays"
            )
        return [inputs], False
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise FinelapError("no audio inputs given (empty list)")
        if all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in inputs):
            raise FinelapError(
                "a list is a batch of clips, but this one holds numbers: pass the samples as a numpy array "
                "(with sample_rate=...)"
            )
        return list(inputs), True
    raise FinelapError(f"audio must be a path, an array, a {{'array', 'sampling_rate'}} dict or a list of them, got {type(inputs).__name__}")


def open_source(item: Any, sr: int, sample_rate: int | None = None, index: int = 0, channel_axis: int | None = None) -> Source:
    """A readable source at the model's sample rate. Files longer than 10 minutes are read
    window by window from disk; shorter ones are decoded once.

    item: a path; an array (samples,) or (samples, channels) / (channels, samples) recorded
    at `sample_rate` (required: there is no default rate for raw samples); or an HF-style
    dict {"array" or "raw": samples, "sampling_rate": Hz}. Multichannel audio is downmixed
    to mono (channel mean); the channel axis is `channel_axis` (0 or 1; -1 = last) or, when
    None, the one dimension of at most 8. `sr`: the model's sample rate."""
    if isinstance(item, Source):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        duration = audio_duration(path)  # validates: missing, empty, unsupported, corrupt header
        if duration <= _IN_MEMORY_S:
            wave = load_audio(path, sr)
            if len(wave) == 0:
                raise AudioError(path, "zero-length audio after resampling")
            return Source(str(path), len(wave), lambda s, e, w=wave: w[s:e], wave)
        from ..streaming import file_reader

        read, n = file_reader(path, sr)
        return Source(str(path), n, read)
    name = f"audio_{index}"
    if isinstance(item, Mapping):
        item, sample_rate = _unpack_audio_dict(item, sample_rate, name)
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if not isinstance(item, np.ndarray):
        raise FinelapError(f"{name}: expected a path, an array or an {{'array', 'sampling_rate'}} dict, got {type(item).__name__}")
    if sample_rate is None:
        raise FinelapError(
            f"{name}: an audio array needs its sample rate: pass sample_rate=<Hz> (this model runs at {sr} Hz) "
            f"or {{'array': x, 'sampling_rate': <Hz>}}"
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise FinelapError(f"{name}: sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    try:
        x = to_float32(item)
    except TypeError as e:
        raise FinelapError(f"{name}: {e}") from None
    x = _downmix(x, channel_axis, name)
    if len(x) == 0:
        raise FinelapError(f"{name}: empty audio (0 samples)")
    if not np.isfinite(x).all():
        raise FinelapError(f"{name}: audio contains NaN or Inf samples")
    if int(sample_rate) != sr:
        x = resample(x, int(sample_rate), sr)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return Source(name, len(x), lambda s, e, w=x: w[s:e], x)


def pad(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded batch (B, N_max) float32 of 1-D waves and their lengths (B,)."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out, lengths


def map_in_threads(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """fn over items, results in order. On CPU, `workers` Python threads each run one item
    with a share of torch's threads (window-level parallelism, which degrades gracefully on
    a busy machine, unlike op-level threads that wait for each other); at most 2 x workers
    items are in flight, so memory stays bounded."""
    workers = min(workers, len(items))
    if workers <= 1:
        for x in items:
            yield fn(x)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    prev = torch.get_num_threads()
    per_worker = max(1, prev // workers)
    try:
        # OpenMP thread counts are per OS thread: set it in each worker (torch also keeps a
        # process-wide value, restored below)
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(per_worker,)) as ex:
            it = iter(items)
            pending: deque = deque(ex.submit(fn, x) for x in [next(it) for _ in range(min(len(items), 2 * workers))])
            while pending:
                res = pending.popleft().result()
                nxt = next(it, _DONE)
                if nxt is not _DONE:
                    pending.append(ex.submit(fn, nxt))
                yield res
    finally:
        torch.set_num_threads(prev)


def plan_encoder_windows(encoder: Any, n_samples: int, timeline: Timeline, sample_rate: int, window_s: float, margin_s: float) -> list:
    """`streaming.plan_windows` with `window_s` and `margin_s` (seconds), except for encoders that
    run on fixed, non-overlapping windows of their own (HTS-AT, Whisper, the imported 10-s models):
    their chunks are whole numbers of encoder windows starting on the file's window grid, without
    margins, so a frame sees the same window whether the file is streamed or encoded in one pass
    (with margins, each chunk would restart the window grid at its own first sample)."""
    from ..streaming import plan_windows

    be = getattr(encoder, "backend", None)
    win = getattr(be, "window_samples", None)
    if be is not None and getattr(be, "variable_length", True) is False and win and getattr(be, "step_samples", None) == win:
        win_s = win / sample_rate
        window_s, margin_s = max(1, round(window_s / win_s)) * win_s, 0.0
    return plan_windows(n_samples, timeline, window_s, margin_s)

