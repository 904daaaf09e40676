"""Inference: `Pipeline.from_pretrained(dir)` answers questions about audio files of any length.

    pipe = finelap.Pipeline.from_pretrained("runs/finelap/final")
    pipe.embed_audio(["a.wav", "b.flac"])                 # (2, D) clip embeddings, L2-normalised
    pipe.classify("a.wav", ["dog", "rain", "siren"])      # [{"label": "dog", "score": 0.81}, ...]
    pipe.detect("street.flac", ["dog", "car horn"])       # [{"onset", "offset", "score", "label"}, ...]
    pipe.ground("park.wav", "a dog barking")              # [{"onset", "offset", "score", "label"}, ...]
    fs = pipe.frame_scores("park.wav", ["a dog barking"]) # FrameScores: (T, N) probabilities in seconds

Results are dicts, as Hugging Face pipelines return them. One clip is:
- a path (any format soundfile reads; resampled to the model's rate);
- an array or tensor with its rate, `sample_rate=` (required: raw samples have no default rate):
  (samples,) mono, or (samples, channels) / (channels, samples), downmixed to mono (channel
  mean); the channel axis is the dimension of at most 8, or `channel_axis=` says which;
- an HF-style dict {"array" (or "raw"): samples, "sampling_rate": Hz}, e.g. a `datasets` row.
A batch is a list (or tuple) of clips, and gives a list of results, one per clip; a 2-D array
is one multichannel clip, never a batch. Everything is deterministic:

- clip embeddings of audio longer than `audio.max_seconds` are the coverage-weighted mean of the
  clip embeddings of fixed `audio.clip_seconds` windows on a grid starting at 0 (the last window is
  moved back to end at the end of the audio), renormalised; never random crops;
- frame-level outputs of any length are streamed through `finelap.streaming`: windows of
  `window_s` on the encoder's frame grid, read from disk window by window with `margin_s` of
  context on both sides and stitched. For encoders whose receptive field fits in the margin the
  result equals one-pass encoding; memory is O(window) whatever the duration. On CPU, windows
  (and clip-embedding batches) run on `workers` threads with a share of torch's threads each:
  window-level parallelism keeps both cores busy even on a loaded machine, where op-level
  threads mostly wait for each other (measured 3.7x faster on 2 busy cores; benchmarks/long_audio.py).

Prompts: every label or phrase becomes the text query through `finelap.scoring.make_prompt` with
the checkpoint's `eval.prompt_template` (underscores as spaces), in classify, detect, ground,
frame_scores and the evaluators alike. Detection settings (threshold, per-class thresholds, median
filter, minimum duration, merge gap; seconds) come from the checkpoint's calibration
(`finelap calibrate`; else its eval defaults) unless given, and are announced once per Pipeline.

Probabilities: sigmoid of the frame logits, or FLAM's logit-adjusted probability
p / (p + sigmoid(beta_text)) when the model has per-text frame biases
(`model.text_conditioned_scale_bias`); `calibrated=None` picks automatically.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .audio import AUDIO_EXTENSIONS, LogMel, MelConfig, Timeline, audio_duration, load_audio, resample, to_float32
from .eval.plots import display_mel_stream
from .errors import AudioError, ConfigError, FinelapError
from .scoring import (
    DetectionSettings, FrameScores, fmt_threshold, make_prompts, nothing_found_advice, resolve_detection_settings,
)
from .utils import log

__all__ = ["Pipeline", "FrameScores", "FrameEmbeddings", "AudioInput", "parse_labels", "find_audio_files", "display_mel_stream"]

# One clip: a path, an array (samples,) / (samples, channels) / (channels, samples) with its
# sample rate, or an HF-style {"array" or "raw": samples, "sampling_rate": Hz} dict.
AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, Mapping[str, Any]]
# Multichannel arrays: the channel axis is the dimension of at most this many entries.
_MAX_CHANNELS = 8

NO_CHECKPOINT_HELP = (
    "no finelap checkpoint given: pass a checkpoint directory (--checkpoint DIR on the command line, "
    "Pipeline.from_pretrained(DIR) in Python, or set FINELAP_CHECKPOINT=DIR). To get one: `make demo` trains "
    "demo_out/run/final in ~10 minutes on CPU; `finelap train --config configs/sfx.yaml data.train=[your.jsonl]` "
    "trains the default recipe on your data; `finelap import` converts a published FLAM or LAION-CLAP checkpoint"
)

# Files up to this long are decoded whole; longer ones are read window by window from disk.
_IN_MEMORY_S = 600.0
# Text prompts per text-tower call (bounds memory for very long label lists).
_TEXT_BATCH = 256
_DONE = object()


# ----------------------------------------------------------------------------- results


@dataclass
class FrameEmbeddings:
    """Frame embeddings of one audio input: embeds (T, D) float32 unit norm, frame j starting at
    times[j] seconds (see `timeline`), duration_s of the audio."""

    embeds: np.ndarray
    timeline: Timeline
    times: np.ndarray
    duration_s: float
    name: str = ""


@dataclass
class _Source:
    """One audio input, readable window by window: read(start, end) -> float32 samples at the
    model's rate. `wave` is set when the whole input is in memory."""

    name: str
    n_samples: int
    read: Callable[[int, int], np.ndarray]
    wave: np.ndarray | None = None


# ----------------------------------------------------------------------------- helpers


def split_labels(text: str) -> list[str]:
    """Split a label string on ';' and ',' outside double quotes, CSV style: `dog;rain, heavy`
    -> ["dog", "rain", "heavy"]; `dog;"rain, heavy"` -> ["dog", "rain, heavy"]; `""` inside
    quotes is a literal quote. Items are stripped; empty items are kept (the caller decides).

    Raises FinelapError for an unclosed quote."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            if quoted and text[i + 1 : i + 2] == '"':  # "" inside quotes: a literal quote
                cur.append('"')
                i += 1
            else:
                quoted = not quoted
        elif c in ";," and not quoted:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    if quoted:
        raise FinelapError(f"unclosed double quote in the label list {text!r}")
    items.append("".join(cur).strip())
    return items


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels from a list (used as given, stripped) or a string in `--labels` syntax: separated
    by ';' or ',', double quotes keep a separator inside a label ("dog;\"rain, heavy\"").

    Raises FinelapError for an empty list, an empty label or a duplicate.
    """
    items = split_labels(labels) if isinstance(labels, str) else list(labels)
    out = [str(x).strip() for x in items]
    if isinstance(labels, str):
        out = [x for x in out if x]  # "dog;rain;" is forgiving on the command line
    if not out:
        raise FinelapError("empty label list: give at least one label, e.g. --labels 'dog;rain;siren'")
    for x in out:
        if not x:
            raise FinelapError(f"empty label in {list(items)!r}")
    seen = set()
    for x in out:
        if x in seen:
            raise FinelapError(f"duplicate label {x!r} in the label list")
        seen.add(x)
    return out


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


def _event(onset: float, offset: float, score: float, label: str) -> dict[str, Any]:
    """One detected event as `detect`/`ground` return it (seconds rounded to ms)."""
    return {"onset": round(float(onset), 3), "offset": round(float(offset), 3), "score": float(score), "label": str(label)}


def _apply_template(labels: Sequence[str], template: str) -> list[str]:
    """Prompts for labels or phrases: `finelap.scoring.make_prompt`, the one rule everywhere."""
    try:
        return make_prompts(template, labels)
    except FinelapError as e:
        raise ConfigError(str(e)) from None


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


def _hash_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _config_bytes_without_calibration(path: Path) -> bytes:
    """config.json as it was before `finelap calibrate` added `config.eval.calibration`: detection
    settings do not change embeddings, so recalibrating must not orphan a search index. The
    checkpoint writer's own format (indent 2, key order kept) gives back the original bytes."""
    raw = path.read_bytes()
    try:
        meta = json.loads(raw)
        ev = meta["config"]["eval"]
    except (ValueError, KeyError, TypeError):
        return raw
    if not isinstance(ev, dict) or not isinstance(ev.get("calibration"), dict):
        return raw
    if ev["calibration"].get("added_key"):  # a checkpoint from before eval.calibration existed
        ev.pop("calibration")
    else:
        ev["calibration"] = None
    return (json.dumps(meta, indent=2) + "\n").encode()


# ----------------------------------------------------------------------------- pipeline


class Pipeline:
    """Inference on audio of any length with a finelap model (see the module docstring).

    model: a FineLAPModel; config: its RunConfig (audio lengths, prompt template, SED
    post-processing defaults). window_s / margin_s: streaming window and context for frame-level
    outputs. batch_windows: windows encoded together when streaming. workers: streaming windows
    encoded concurrently on CPU, each with torch_threads // workers threads (None: one per torch
    thread, at most 8). device: where the model runs (the pipeline follows the model if moved).
    """

    def __init__(
        self,
        model: Any,
        config: Any,
        checkpoint: Any = None,
        device: str | torch.device = "cpu",
        window_s: float = 60.0,
        margin_s: float = 2.0,
        batch_windows: int = 1,
        workers: int | None = None,
    ) -> None:
        if not window_s > 0 or margin_s < 0 or batch_windows < 1 or (workers is not None and workers < 1):
            raise ConfigError(
                f"need window_s > 0, margin_s >= 0, batch_windows >= 1, workers >= 1; got {window_s}, {margin_s}, {batch_windows}, {workers}"
            )
        self.model = model.to(device).eval()
        self.config = config
        self.checkpoint = checkpoint
        self.window_s = float(window_s)
        self.margin_s = float(margin_s)
        self.batch_windows = int(batch_windows)
        self.workers = workers
        self.use_ema = False  # set by from_pretrained when EMA weights were loaded

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str = "cpu", use_ema: bool = True, **kwargs: Any) -> "Pipeline":
        """Load a checkpoint directory (or a run directory: its latest checkpoint); None: the
        directory in $FINELAP_CHECKPOINT.

        Raises CheckpointError for a missing, incomplete or incompatible checkpoint. kwargs go to
        the constructor (window_s, margin_s, batch_windows, workers)."""
        from .errors import CheckpointError
        from .models.build import load_pretrained

        path = path if path is not None else os.environ.get("FINELAP_CHECKPOINT") or None
        if path is None:
            raise CheckpointError(NO_CHECKPOINT_HELP)

        model, cfg, ckpt = load_pretrained(path, use_ema=use_ema, map_location="cpu")
        pipe = cls(model, cfg, checkpoint=ckpt, device=device, **kwargs)
        pipe.use_ema = bool(use_ema and ckpt.ema_state)
        return pipe

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sample_rate(self) -> int:
        return int(self.model.sample_rate)

    @property
    def timeline(self) -> Timeline:
        return self.model.timeline

    @property
    def frame_rate_hz(self) -> float:
        return float(self.timeline.frame_rate_hz)

    @property
    def embed_dim(self) -> int:
        return int(self.model.cfg.embed_dim)

    @property
    def prompt_template(self) -> str:
        return str(self.config.eval.prompt_template)

    @property
    def has_calibration(self) -> bool:
        """True when the model has FLAM per-text frame biases (calibrated probabilities available)."""
        return bool(self.model.cfg.text_conditioned_scale_bias)

    @property
    def frame_trained(self) -> bool:
        """True when the checkpoint was trained with a frame objective (finelap, flam). Otherwise
        (clap, mgaclap, slap) frame probabilities come from an untrained scale/bias: they rank frames
        (PSDS, AUROC) but a fixed threshold such as 0.5 means nothing."""
        loss = getattr(self.config, "loss", None)
        return (loss.get("frame") if isinstance(loss, dict) else getattr(loss, "frame", None)) is not None

    def _warn_uncalibrated(self, threshold: float) -> None:
        if self.frame_trained or getattr(self, "_warned_uncalibrated", False):
            return
        self._warned_uncalibrated = True
        ceiling = ""
        if not self.has_calibration:
            scale, bias = self.model.frame_scale_bias()
            ceiling = f" (here at most {torch.sigmoid(scale + bias).item():.2f})"
        warnings.warn(
            f"{getattr(self.checkpoint, 'path', 'this model')} was trained without a frame objective "
            f"(preset {getattr(self.config, 'preset', '?')}): its frame "
            f"probabilities are not calibrated{ceiling}, so the default threshold {threshold:g} is arbitrary; "
            "pass a threshold chosen on validation data",
            stacklevel=4,  # the caller of detect/ground
        )

    @property
    def embedder_id(self) -> str:
        """Identifies weights + preprocessing: embeddings with different ids must not be mixed
        (used by `finelap.search.Index`). Hash of the checkpoint files, or of the state dict."""
        if getattr(self, "_embedder_id", None) is None:
            from .checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE

            h = hashlib.blake2b(digest_size=16)
            ckpt_path = getattr(self.checkpoint, "path", None)
            if ckpt_path is not None and (Path(ckpt_path) / CONFIG_FILE).is_file():
                # which weights were loaded is part of the identity (EMA or raw)
                h.update(b"ema" if self.use_ema else b"raw")
                for name in (CONFIG_FILE, EMA_FILE if self.use_ema else MODEL_FILE):
                    f = Path(ckpt_path) / name
                    if name == CONFIG_FILE:
                        h.update(name.encode())
                        h.update(_config_bytes_without_calibration(f))
                    elif f.is_file():
                        h.update(name.encode())
                        _hash_file(f, h)
            else:
                for k, v in sorted(self.model.state_dict().items()):
                    h.update(k.encode())
                    h.update(v.detach().cpu().contiguous().numpy().tobytes())
                h.update(json.dumps(self.config.to_dict() if hasattr(self.config, "to_dict") else str(self.config), sort_keys=True, default=str).encode())
            self._embedder_id = f"finelap-{h.hexdigest()}"
        return self._embedder_id

    @property
    def embedder_info(self) -> dict[str, Any]:
        """JSON-able description stored in search indexes, so `finelap search` finds the model."""
        ckpt_path = getattr(self.checkpoint, "path", None)
        return {
            "checkpoint": str(Path(ckpt_path).resolve()) if ckpt_path is not None else None,
            "step": getattr(self.checkpoint, "step", None),
            "use_ema": self.use_ema,
            "sample_rate": self.sample_rate,
            "frame_rate_hz": self.frame_rate_hz,
            "embed_dim": self.embed_dim,
        }

    # ------------------------------------------------------------------ inputs
    def _as_list(self, inputs: Any) -> tuple[list[Any], bool]:
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

    def _open(self, item: Any, sample_rate: int | None = None, index: int = 0, channel_axis: int | None = None) -> _Source:
        """A readable source at the model's sample rate. Files longer than 10 minutes are read
        window by window from disk; shorter ones are decoded once.

        item: a path; an array (samples,) or (samples, channels) / (channels, samples) recorded
        at `sample_rate` (required: there is no default rate for raw samples); or an HF-style
        dict {"array" or "raw": samples, "sampling_rate": Hz}. Multichannel audio is downmixed
        to mono (channel mean); the channel axis is `channel_axis` (0 or 1; -1 = last) or, when
        None, the one dimension of at most 8."""
        sr = self.sample_rate
        if isinstance(item, _Source):
            return item
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            duration = audio_duration(path)  # validates: missing, empty, unsupported, corrupt header
            if duration <= _IN_MEMORY_S:
                wave = load_audio(path, sr)
                if len(wave) == 0:
                    raise AudioError(path, "zero-length audio after resampling")
                return _Source(str(path), len(wave), lambda s, e, w=wave: w[s:e], wave)
            from .streaming import file_reader

            read, n = file_reader(path, sr)
            return _Source(str(path), n, read)
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
        return _Source(name, len(x), lambda s, e, w=x: w[s:e], x)

    @staticmethod
    def _pad(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        out = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        return out, lengths

    # ------------------------------------------------------------------ clip embeddings
    def _clip_jobs(self, src: _Source) -> list[tuple[int, int, float]]:
        """Fixed windows (start, end, weight) whose clip embeddings are averaged for this source.

        Up to audio.max_seconds: the whole input. Longer: windows of audio.clip_seconds on a grid
        from 0; the last is moved back to end at the end, and each window is weighted by the
        audio it adds (so every second counts once)."""
        sr = self.sample_rate
        n = src.n_samples
        if n <= int(round(self.config.audio.max_seconds * sr)):
            return [(0, n, 1.0)]
        clip = max(1, int(round(self.config.audio.clip_seconds * sr)))
        jobs = []
        for s in range(0, n, clip):
            new = min(n, s + clip) - s
            start = min(s, n - clip)
            jobs.append((start, start + clip, new / clip))
        return jobs

    def _embed_sources(self, sources: Sequence[_Source], batch_size: int) -> np.ndarray:
        """(len(sources), D) clip embeddings; windows of all sources are batched together,
        longest first (less padding), in a fixed order (deterministic)."""
        jobs = [(i, s, e, w) for i, src in enumerate(sources) for s, e, w in self._clip_jobs(src)]
        order = sorted(range(len(jobs)), key=lambda j: (-(jobs[j][2] - jobs[j][1]), j))
        acc = torch.zeros(len(sources), self.embed_dim, dtype=torch.float64)
        dev = self.device

        def work(group: list[tuple[int, int, int, float]]) -> tuple[list, torch.Tensor]:
            wave, lengths = self._pad([sources[i].read(s, e) for i, s, e, _ in group])
            with torch.inference_mode():
                return group, self.model.encode_audio(wave.to(dev), lengths.to(dev)).audio_embeds.double().cpu()

        batches = [[jobs[j] for j in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]
        for group, emb in self._map(work, batches):  # in order: the sums are deterministic
            for k, (i, _, _, w) in enumerate(group):
                acc[i] += w * emb[k]
        return F.normalize(acc, dim=-1).float().numpy()

    def embed_audio(self, inputs: AudioInput | Sequence[AudioInput], sample_rate: int | None = None, batch_size: int = 16,
                    channel_axis: int | None = None) -> np.ndarray:  # fmt: skip
        """Clip embeddings (N, D) float32, L2-normalised, one row per clip (a single clip gives
        (1, D); a batch is a list). Long audio: deterministic window average (module docstring).
        Files are decoded a group at a time, so memory stays bounded for long lists."""
        items, _ = self._as_list(inputs)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(items), self.embed_dim), dtype=np.float32)
        group = max(batch_size * 4, 16)
        for g in range(0, len(items), group):
            sources = [self._open(x, sample_rate, g + k, channel_axis) for k, x in enumerate(items[g : g + group])]
            out[g : g + len(sources)] = self._embed_sources(sources, batch_size)
        return out

    # ------------------------------------------------------------------ frames (streamed)
    def _num_workers(self) -> int:
        if self.device.type != "cpu":
            return 1  # accelerators parallelise inside each window
        return max(1, min(self.workers if self.workers is not None else torch.get_num_threads(), 8))

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        """fn over items, results in order. On CPU, `workers` Python threads each run one item
        with a share of torch's threads (window-level parallelism, which degrades gracefully on
        a busy machine, unlike op-level threads that wait for each other); at most 2 x workers
        items are in flight, so memory stays bounded."""
        workers = min(self._num_workers(), len(items))
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

    def _plan_windows(self, n_samples: int) -> list:
        """`streaming.plan_windows` with this pipeline's window and margin, except for encoders that
        run on fixed, non-overlapping windows of their own (HTS-AT, Whisper, the imported 10-s models):
        their chunks are whole numbers of encoder windows starting on the file's window grid, without
        margins, so a frame sees the same window whether the file is streamed or encoded in one pass
        (with margins, each chunk would restart the window grid at its own first sample)."""
        from .streaming import plan_windows

        window_s, margin_s = self.window_s, self.margin_s
        be = getattr(self.model.audio, "backend", None)
        win = getattr(be, "window_samples", None)
        if be is not None and getattr(be, "variable_length", True) is False and win and getattr(be, "step_samples", None) == win:
            win_s = win / self.sample_rate
            window_s, margin_s = max(1, round(window_s / win_s)) * win_s, 0.0
        return plan_windows(n_samples, self.timeline, window_s, margin_s)

    def _stream(self, src: _Source, fn: Callable[[torch.Tensor], torch.Tensor], raw: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """(first frame, fn(frame_embeds (t, D))) chunks covering every frame of `src` once, in
        order. Windows from `streaming.plan_windows` (frame-grid aligned, with margins); groups of
        `batch_windows` are encoded together, groups run on `workers` threads. `raw`: the audio
        encoder's own frames (t, Da) instead of the projected frame embeddings (what the caption
        decoder reads)."""
        windows = self._plan_windows(src.n_samples)
        spf = self.timeline.hop_length * self.timeline.downsample  # type: ignore[operator]
        groups = [windows[i : i + self.batch_windows] for i in range(0, len(windows), self.batch_windows)]
        dev = self.device

        def work(group: list) -> list[tuple[int, torch.Tensor]]:
            wave, lengths = self._pad([src.read(w.read_start, w.read_end) for w in group])
            with torch.inference_mode():
                if raw:
                    fe = self.model.audio(wave.to(dev), lengths.to(dev)).frames
                else:
                    fe = self.model.encode_audio(wave.to(dev), lengths.to(dev)).frame_embeds
                out = []
                for j, w in enumerate(group):
                    local0 = w.keep_start - w.read_start // spf
                    out.append((w.keep_start, fn(fe[j, local0 : local0 + (w.keep_end - w.keep_start)])))
                return out

        for chunk in self._map(work, groups):
            yield from chunk

    def embed_frames(self, audio: AudioInput, sample_rate: int | None = None, channel_axis: int | None = None) -> FrameEmbeddings:
        """Frame embeddings (T, D) of one clip, any length (streamed), with their seconds."""
        src = self._open(audio, sample_rate, channel_axis=channel_axis)
        t = self.timeline.num_frames_for_samples(src.n_samples)
        out = np.empty((t, self.embed_dim), dtype=np.float32)
        filled = 0
        for start, fe in self._stream(src, lambda x: x):
            out[start : start + len(fe)] = fe.float().cpu().numpy()
            filled += len(fe)
        if filled != t:
            raise RuntimeError(f"{src.name}: encoder produced {filled} frames, its Timeline promises {t}")
        times = np.asarray(self.timeline.frame_start(np.arange(t)), dtype=np.float64)
        return FrameEmbeddings(out, self.timeline, times, src.n_samples / self.sample_rate, src.name)

    def _frame_embeds_batch(self, audio: torch.Tensor | np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(B, T, D) frame embeddings of a batch of equal-length rows (HEAR). Rows that fit in
        one streaming window are encoded together; longer ones are streamed one by one."""
        x = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if x.ndim != 2:
            raise FinelapError(f"audio must be (n_sounds, n_samples), got shape {x.shape}")
        n = x.shape[1]
        t = self.timeline.num_frames_for_samples(n)
        out = np.empty((x.shape[0], t, self.embed_dim), dtype=np.float32)
        if len(self._plan_windows(max(n, 1))) == 1:
            dev = self.device
            with torch.inference_mode():
                for b in range(0, x.shape[0], batch_size):
                    wave = torch.from_numpy(np.ascontiguousarray(to_float32(x[b : b + batch_size])))
                    lengths = torch.full((wave.shape[0],), n, dtype=torch.long)
                    out[b : b + wave.shape[0]] = self.model.encode_audio(wave.to(dev), lengths.to(dev)).frame_embeds.float().cpu().numpy()
            return out
        for i in range(x.shape[0]):
            out[i] = self.embed_frames(x[i], sample_rate=self.sample_rate).embeds
        return out

    # ------------------------------------------------------------------ text
    def _text(self, prompts: Sequence[str]) -> Any:
        """TextOutput for these prompts, in batches of 256. Not cached across calls: the model may
        be a training model whose weights change between evaluations."""
        from .models.model import TextOutput

        parts = []
        with torch.inference_mode():
            for i in range(0, len(prompts), _TEXT_BATCH):
                parts.append(self.model.encode_text(list(prompts[i : i + _TEXT_BATCH])))
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> torch.Tensor | None:
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else torch.cat(vals)

        return TextOutput(cat("text_embeds"), cat("pooled"), cat("frame_logit_scale"), cat("frame_logit_bias"))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings (N, D) float32, L2-normalised. Texts are used as given (no template)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise FinelapError("no texts given (empty list)")
        out = self._text(texts)
        emb = out.text_embeds.float().cpu()
        if out.frame_logit_scale is not None and getattr(self.model.cfg, "scale_bias_input", "embeds") == "pooled":
            # per-text scale/bias computed from the text tower's pooled output (imported OpenFLAM)
            # cannot be recovered from an embedding: keep those of the last texts for
            # `frame_scores_from_embeddings` (a search embeds its queries, then scores frames)
            self._recent_scale_bias = (emb, out.frame_logit_scale.float().cpu(), out.frame_logit_bias.float().cpu())
        return emb.numpy()

    # ------------------------------------------------------------------ clip-level questions
    def clip_scale_bias(self) -> tuple[float, float]:
        """The clip logit scale and bias: logits = scale * cos + bias."""
        with torch.inference_mode():
            s, b = self.model.clip_scale_and_bias()
            return float(s.detach()), float(b.detach())

    _clip_scale_bias = clip_scale_bias  # used by `finelap eval`

    def similarity(self, audio: AudioInput | Sequence[AudioInput], texts: Sequence[str], logits: bool = False,
                   sample_rate: int | None = None, batch_size: int = 16, channel_axis: int | None = None) -> np.ndarray:  # fmt: skip
        """(N_audio, N_text) cosine similarity of clip and text embeddings; `logits=True` applies
        the model's clip logit scale and bias (scale * cos + bias)."""
        a = torch.from_numpy(self.embed_audio(audio, sample_rate, batch_size, channel_axis))
        t = torch.from_numpy(self.embed_text(texts))
        sim = a @ t.T
        if logits:
            s, b = self.clip_scale_bias()
            sim = s * sim + b
        return sim.numpy()

    def classify(
        self,
        audio: AudioInput | Sequence[AudioInput],
        labels: str | Sequence[str],
        template: str | None = None,
        top_k: int | None = 5,
        multi_label: bool = False,
        sample_rate: int | None = None,
        batch_size: int = 16,
        channel_axis: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Zero-shot classification: [{"label", "score"}] sorted by score (a probability), best
        first, top_k of them (None: all), as HF audio-classification pipelines return them.
        Single-label: softmax over scaled cosines (sums to 1 over all labels); multi_label:
        independent sigmoid(scale * cos + bias). Prompts are `template` (default: the
        checkpoint's prompt template) filled with each label. One clip -> one list; a batch (a
        list of clips) -> a list of lists."""
        labels = parse_labels(labels)
        items, is_batch = self._as_list(audio)
        prompts = _apply_template(labels, self.prompt_template if template is None else template)
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        a = torch.from_numpy(self.embed_audio(items, sample_rate, batch_size, channel_axis))
        t = self._text(prompts).text_embeds.float().cpu()
        s, b = self.clip_scale_bias()
        z = s * (a @ t.T)
        p = torch.sigmoid(z + b) if multi_label else torch.softmax(z, dim=-1)
        k = len(labels) if top_k is None else min(top_k, len(labels))
        results = []
        for row in p.numpy():
            order = sorted(range(len(labels)), key=lambda j: (-row[j], j))[:k]
            results.append([{"label": labels[j], "score": float(row[j])} for j in order])
        return results if is_batch else results[0]

    # ------------------------------------------------------------------ frame-level questions
    def _use_calibration(self, calibrated: bool | None) -> bool:
        if calibrated is None:
            return self.has_calibration
        if calibrated and not self.has_calibration:
            raise ConfigError(
                "calibrated probabilities need a model with per-text frame biases "
                "(model.text_conditioned_scale_bias, the FLAM preset); this checkpoint has none"
            )
        return bool(calibrated)

    def _probs(self, frame_embeds: torch.Tensor, text: Any, calibrated: bool) -> torch.Tensor:
        """frame_embeds (..., T, D) -> (..., T, N) probabilities."""
        s, b = self.model.frame_scale_and_bias(text)
        te = text.text_embeds.to(frame_embeds.dtype)
        logits = s * torch.matmul(frame_embeds, te.T) + b
        if calibrated:
            from .losses.frame import flam_calibrated_prob

            return flam_calibrated_prob(logits, b)
        return torch.sigmoid(logits)

    def frame_scores(
        self,
        audio: AudioInput,
        texts: Sequence[str],
        calibrated: bool | None = None,
        sample_rate: int | None = None,
        template: str | None = None,
        channel_axis: int | None = None,
    ) -> FrameScores:
        """Per-frame probabilities (T, N) of N texts for one clip of any length (streamed, memory
        bounded). Prompts: `finelap.scoring.make_prompt` with `template` (default: the
        checkpoint's), the same as `detect`, `ground` and `finelap eval` use. Text embeddings are
        computed once; only the (T, N) scores are kept, never the frame embeddings of the file."""
        if isinstance(texts, str):
            texts = [texts]
        texts = parse_labels(list(texts))
        cal = self._use_calibration(calibrated)
        text = self._text(_apply_template(texts, self.prompt_template if template is None else template))
        return self._frame_scores(self._open(audio, sample_rate, channel_axis=channel_axis), texts, text, cal)

    def _frame_scores(self, src: _Source, texts: list[str], text: Any, cal: bool) -> FrameScores:
        t = self.timeline.num_frames_for_samples(src.n_samples)
        out = np.empty((t, len(texts)), dtype=np.float32)
        filled = 0
        for start, p in self._stream(src, lambda fe: self._probs(fe, text, cal)):
            out[start : start + len(p)] = p.float().cpu().numpy()
            filled += len(p)
        if filled != t:  # an encoder breaking the frame-count contract would leave garbage rows
            raise RuntimeError(f"{src.name}: encoder produced {filled} frames, its Timeline promises {t}")
        return FrameScores(out, self.timeline, src.n_samples / self.sample_rate, list(texts), cal, src.name)

    def frame_scores_from_embeddings(self, text_emb: np.ndarray, frames: np.ndarray, calibrated: bool | None = None) -> np.ndarray:
        """Scores (T,) of one text embedding (D,) against stored frame embeddings (T, D) (search
        index); probabilities as in `frame_scores` (per-text scale/bias from the text embedding)."""
        from .models.model import TextOutput

        te = torch.as_tensor(np.asarray(text_emb, dtype=np.float32)).reshape(1, -1).to(self.device)
        fe = torch.as_tensor(np.asarray(frames, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            text = TextOutput(te)
            fsb = self.model.frame_scale_bias
            if self.has_calibration and getattr(self.model.cfg, "scale_bias_input", "embeds") == "pooled":
                text.frame_logit_scale, text.frame_logit_bias = self._remembered_scale_bias(te[0])
            elif self.has_calibration:
                text.frame_logit_scale, text.frame_logit_bias = fsb(te)
            return self._probs(fe, text, self._use_calibration(calibrated))[:, 0].float().cpu().numpy()

    def _remembered_scale_bias(self, te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale (1,), bias (1,)) of the text whose embedding (D,) `embed_text` returned last."""
        recent = getattr(self, "_recent_scale_bias", None)
        if recent is not None:
            emb, scale, bias = recent
            sims = emb.to(te.device) @ te.float()
            j = int(sims.argmax())
            if float(sims[j]) > 1 - 1e-4:
                return scale[j : j + 1].to(te.device), bias[j : j + 1].to(te.device)
        raise ConfigError("this model's per-text frame scale/bias come from the text itself: embed the text with embed_text first")

    def detection_settings(self, queries: Sequence[str], threshold: float | None = None, median_filter_s: float | None = None,
                           min_duration_s: float | None = None, merge_gap_s: float | None = None,
                           announce: bool = True) -> DetectionSettings:  # fmt: skip
        """The post-processing for these queries: given values win, the rest come from the
        checkpoint's calibration (`finelap calibrate`), else from its eval defaults. With
        `announce`, says once per Pipeline (one line on stderr) which settings are used and where
        they come from, and once per query that is not one of the calibrated classes (it gets the
        global threshold). Raises ConfigError for out-of-range values."""
        try:
            st = resolve_detection_settings(self.config.eval, list(queries), threshold, median_filter_s, min_duration_s, merge_gap_s)
        except FinelapError as e:
            raise ConfigError(str(e)) from None
        if st.source == "defaults" and threshold is None:
            self._warn_uncalibrated(st.global_threshold)
        if announce:
            said = self.__dict__.setdefault("_announced", set())
            line = st.describe()
            if line not in said:
                said.add(line)
                log(line)
            new = [q for q in st.uncalibrated_queries if q not in said]
            if new:
                said.update(new)
                n = len((st.calibration or {}).get("classes") or [])
                log(f"not among the {n} calibrated classes, so using the global threshold {fmt_threshold(st.global_threshold)}: "
                    + ", ".join(repr(q) for q in new[:8]) + (f" and {len(new) - 8} more" if len(new) > 8 else ""))  # fmt: skip
        return st

    def resolve_postprocessing(self, threshold: float | None, median_filter_s: float | None, min_duration_s: float | None,
              merge_gap_s: float | None) -> tuple[float, float, float, float]:  # fmt: skip
        """(global threshold, median_filter_s, min_duration_s, merge_gap_s): the given values, or
        the checkpoint's calibrated settings (else its eval defaults) for None; raises ConfigError
        for out-of-range values. Per-class thresholds: `detection_settings`."""
        st = self.detection_settings([], threshold, median_filter_s, min_duration_s, merge_gap_s, announce=False)
        pp = st.postprocess
        return (st.global_threshold, float(pp.median_filter_s), float(pp.min_duration_s), float(pp.merge_gap_s))  # type: ignore[arg-type]

    def segments_from_scores(
        self,
        scores: FrameScores,
        threshold: float | None = None,
        median_filter_s: float | None = None,
        min_duration_s: float | None = None,
        merge_gap_s: float | None = None,
    ) -> list[tuple[float, float, str, float]]:
        """Post-processing in seconds (`finelap.scoring.PostProcess`; defaults: the checkpoint's
        calibrated settings, see `detection_settings`): median filter, threshold (score >
        threshold), close gaps < merge_gap_s, drop events < min_duration_s. Returns
        [(onset_s, offset_s, text, confidence)] sorted by onset; confidence = the highest
        (filtered) frame probability inside the segment."""
        st = self.detection_settings(scores.texts, threshold, median_filter_s, min_duration_s, merge_gap_s)
        return st.postprocess.segments(scores)

    @staticmethod
    def _say_nothing_found(peak: float, where: str, settings: DetectionSettings, query: str) -> None:
        """One line when nothing was detected: the peak (`where`: its query, file and time) and the
        threshold that was used for that query (its own or the global one, rounded)."""
        advice = nothing_found_advice(peak, settings, query, flag="threshold=")
        log(f"no detection above the threshold; the highest probability was {peak:.3g} ({where}), {advice} "
            "(or calibrate the checkpoint: `finelap calibrate`)")

    def detect(
        self,
        audio: AudioInput | Sequence[AudioInput],
        labels: str | Sequence[str],
        threshold: float | None = None,
        median_filter_s: float | None = None,
        min_duration_s: float | None = None,
        merge_gap_s: float | None = None,
        template: str | None = None,
        calibrated: bool | None = None,
        sample_rate: int | None = None,
        channel_axis: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Sound event detection: [{"onset", "offset", "score", "label"}] per clip (seconds, 3
        decimals; score: the highest probability inside the event), sorted by onset. One clip ->
        one list; a batch (a list of clips) -> a list of lists, in input order. Prompts:
        `template` (default: the checkpoint's) filled with each label (`finelap.scoring.make_prompt`).
        Settings: see `detection_settings`. When nothing crosses the threshold, one line on stderr
        gives the peak and the threshold to pass."""
        labels = parse_labels(labels)
        items, is_batch = self._as_list(audio)
        tmpl = self.prompt_template if template is None else template
        prompts = _apply_template(labels, tmpl)  # validated before any audio is decoded
        st = self.detection_settings(labels, threshold, median_filter_s, min_duration_s, merge_gap_s)
        cal = self._use_calibration(calibrated)
        text = self._text(prompts)  # once for all files
        results: list[list[dict[str, Any]]] = []
        best = (-1.0, "", labels[0])
        for i, item in enumerate(items):
            src = self._open(item, sample_rate, i, channel_axis)
            fs = self._frame_scores(src, labels, text, cal)
            p, j, k = fs.peak()
            if p > best[0]:
                best = (p, f"{labels[k]!r} in {src.name} at {fs.times[j]:.2f} s", labels[k])
            results.append([_event(on, off, conf, lab) for on, off, lab, conf in st.postprocess.segments(fs)])
        if not any(results):
            self._say_nothing_found(best[0], best[1], st, best[2])
        return results if is_batch else results[0]

    def ground(
        self,
        audio: AudioInput,
        text: str,
        threshold: float | None = None,
        median_filter_s: float | None = None,
        min_duration_s: float | None = None,
        merge_gap_s: float | None = None,
        template: str | None = None,
        calibrated: bool | None = None,
        sample_rate: int | None = None,
        channel_axis: int | None = None,
    ) -> list[dict[str, Any]]:
        """Where in one clip does `text` happen: [{"onset", "offset", "score", "label"}] in
        seconds, sorted by onset (label: the phrase). The phrase becomes a prompt as labels do
        (`template`, default the checkpoint's), so `ground(x, q)` equals `detect(x, [q])`;
        post-processing as in `detect`."""
        if not isinstance(text, str) or not text.strip():
            raise FinelapError("empty text query: give a phrase such as 'a dog barking'")
        st = self.detection_settings([text.strip()], threshold, median_filter_s, min_duration_s, merge_gap_s)
        fs = self.frame_scores(audio, [text.strip()], calibrated=calibrated, sample_rate=sample_rate, template=template,
                               channel_axis=channel_axis)  # fmt: skip
        segs = st.postprocess.segments(fs)
        if not segs:
            p, j, _ = fs.peak()
            self._say_nothing_found(p, f"at {fs.times[j]:.2f} s", st, text.strip())
        return [_event(on, off, c, lab) for on, off, lab, c in segs]

    # ------------------------------------------------------------------ evaluators
    def evaluatable(self, name: str | None = None, batch_size: int = 16) -> Any:
        """This model as the functions `finelap.eval.tasks` evaluators take (DESIGN principle 7).
        The evaluators build the prompts (`make_prompt` with the checkpoint's template), so
        frame_scores here takes them as given: `evaluate_sed(pipe.evaluatable(), ...)` scores a
        class exactly as `detect` and `frame_scores` do."""
        from .eval.tasks import Evaluatable

        return Evaluatable(
            embed_audio=lambda audio: self.embed_audio(list(audio), batch_size=batch_size),
            embed_text=lambda texts: self.embed_text(list(texts)),
            frame_scores=lambda audio, texts: self.frame_scores(audio, list(texts), template="{}"),
            clip_scale_bias=self.clip_scale_bias(),
            prompt_template=self.prompt_template,
            name=name or str(getattr(self.checkpoint, "path", "model")),
        )

    # ------------------------------------------------------------------ search-index contract
    def embed_files(self, paths: Sequence[str | os.PathLike], *, with_frames: bool = False, batch_size: int = 16) -> Iterator[Any]:
        """One `finelap.search.EmbedResult` per path, in order; a missing or corrupt file gives a
        result with `error` set instead of raising (the `finelap.search.Embedder` contract)."""
        from .search import EmbedResult

        paths = [Path(p) for p in paths]
        group = max(batch_size * 4, 16)
        for g in range(0, len(paths), group):
            ok: list[tuple[Path, _Source]] = []
            results: dict[int, Any] = {}
            for k, p in enumerate(paths[g : g + group]):
                try:
                    ok.append((p, self._open(p)))
                except FinelapError as e:
                    results[k] = EmbedResult(p, error=str(getattr(e, "problem", e)))
            try:
                embs = self._embed_sources([s for _, s in ok], batch_size) if ok else np.zeros((0, self.embed_dim), np.float32)
            except FinelapError:  # a decode error inside a long file: retry one by one to isolate it
                embs = None
            j = 0
            for k, p in enumerate(paths[g : g + group]):
                if k in results:
                    yield results[k]
                    continue
                src = ok[j][1]
                try:
                    emb = embs[j] if embs is not None else self._embed_sources([src], batch_size)[0]
                    frames = self.embed_frames(src).embeds if with_frames else None
                    yield EmbedResult(p, emb, frames, self.frame_rate_hz if with_frames else None, src.n_samples / self.sample_rate)
                except FinelapError as e:
                    yield EmbedResult(p, error=str(getattr(e, "problem", e)))
                j += 1

    # ------------------------------------------------------------------ captions
    @property
    def can_caption(self) -> bool:
        """True when the checkpoint has a caption decoder (trained with loss.caption, preset slap)."""
        return getattr(self.model, "caption_decoder", None) is not None

    def caption(self, audio: AudioInput, max_len: int = 30, beam_size: int = 3, sample_rate: int | None = None) -> dict[str, Any]:
        """Describe one input in words with the checkpoint's caption decoder:
        {"caption": str, "tokens": [ids], "duration_s": float}.

        The decoder cross-attends to all the audio encoder's frames of the input. Those frames are
        computed window by window (`window_s` + `margin_s`, like `frame_scores`), so memory grows
        with the number of frames (T, Da), not with the samples: a 30-min file never sits in memory
        as a waveform or as one encoder pass. For encoders whose receptive field fits in the margin
        the frames, hence the caption, equal one-pass encoding. Greedy for beam_size 1, else beam
        search (length-normalised log-probability)."""
        from .errors import CheckpointError

        decoder = getattr(self.model, "caption_decoder", None)
        if decoder is None:
            where = getattr(self.checkpoint, "path", "this model")
            raise CheckpointError(f"{where}: this checkpoint was not trained with a caption decoder (preset slap)")
        if not 1 <= max_len <= decoder.max_len:
            raise ConfigError(f"max_len must be in [1, {decoder.max_len}] (the decoder's maximum), got {max_len}")
        if beam_size < 1:
            raise ConfigError(f"beam_size must be >= 1, got {beam_size}")
        src = self._open(audio, sample_rate)
        t = self.timeline.num_frames_for_samples(src.n_samples)
        frames: torch.Tensor | None = None
        filled = 0
        for start, fe in self._stream(src, lambda x: x, raw=True):
            if frames is None:
                frames = torch.empty(t, fe.shape[-1], dtype=fe.dtype, device=fe.device)
            frames[start : start + len(fe)] = fe
            filled += len(fe)
        if frames is None or filled != t:
            raise RuntimeError(f"{src.name}: encoder produced {filled} frames, its Timeline promises {t}")
        mask = torch.ones(1, t, dtype=torch.bool, device=frames.device)
        with torch.inference_mode():
            ids = decoder.generate(frames[None], mask, max_len=max_len, beam_size=beam_size)[0]
        text = self.model.text.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return {"caption": text, "tokens": list(ids), "duration_s": src.n_samples / self.sample_rate}

    # ------------------------------------------------------------------ plots
    def plot(
        self,
        audio: AudioInput,
        scores: FrameScores,
        path: str | os.PathLike,
        segments: Sequence[Sequence[tuple[float, float]]] | None = None,
        threshold: float | Sequence[float] | None = None,
        title: str = "",
        sample_rate: int | None = None,
        reference: Sequence[Sequence[tuple[float, float]]] | None = None,
        log_scale: bool = False,
        channel_axis: int | None = None,
        threshold_kinds: str | Sequence[str] | None = None,
    ) -> Path:
        """PNG: spectrogram with one probability curve per query, the threshold, the detected
        spans shaded (`segments`: one list of (onset, offset) per query) and, when given, the
        reference events (`reference`: one list per query) in a lane below. `log_scale`: a log
        probability axis. `threshold`: one value, or one per query (as `detection_settings(...)
        .threshold_for` gives them, with their `threshold_kinds`: "per-class", "global", ...).
        Long audio is read window by window. See `eval.plots.plot_timeline`."""
        from .eval.plots import plot_timeline

        src = self._open(audio, sample_rate, channel_axis=channel_axis)
        mel, mel_tl, mel_cfg = display_mel_stream(src, self.sample_rate)
        return plot_timeline(
            mel, scores.scores, scores.timeline, scores.texts, path,
            audio_timeline=mel_tl, sample_rate=self.sample_rate, mel_config=mel_cfg,
            detections=segments, ground_truth=reference, threshold=threshold, duration_s=scores.duration_s,
            title=title or f"{Path(scores.name).name}: frame probabilities", log_scale=log_scale,
            threshold_kinds=threshold_kinds,
        )  # fmt: skip
