"""`Pipeline`: a loaded finelap model answering questions about audio of any length (see the
`finelap.infer` package docstring). Inputs and streaming: `sources`; labels and prompts:
`labels`; detection settings and events: `postprocess`; the search-index contract: `index`."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..audio import Timeline, to_float32
from ..eval.plots import display_mel_stream
from ..errors import ConfigError, FinelapError
from ..scoring import DetectionSettings, FrameScores
from ..models.model import frame_logits
from . import index as search_index
from .labels import apply_template, parse_labels
from .postprocess import announce_settings, event, resolve_settings, say_nothing_found
from .sources import AudioInput, Source, as_list, map_in_threads, open_source, pad, plan_encoder_windows

__all__ = ["Pipeline", "FrameEmbeddings", "NO_CHECKPOINT_HELP"]

NO_CHECKPOINT_HELP = (
    "no finelap checkpoint given: pass a checkpoint directory (--checkpoint DIR on the command line, "
    "Pipeline.from_pretrained(DIR) in Python, or set FINELAP_CHECKPOINT=DIR). To get one: `make demo` trains "
    "demo_out/run/final in ~10 minutes on CPU; `finelap train --config configs/sfx.yaml data.train=[your.jsonl]` "
    "trains the default recipe on your data; `finelap import` converts a published FLAM or LAION-CLAP checkpoint"
)


# Text prompts per text-tower call (bounds memory for very long label lists).
_TEXT_BATCH = 256


@dataclass
class FrameEmbeddings:
    """Frame embeddings of one audio input: embeds (T, D) float32 unit norm, frame j starting at
    times[j] seconds (see `timeline`), duration_s of the audio."""

    embeds: np.ndarray
    timeline: Timeline
    times: np.ndarray
    duration_s: float
    name: str = ""


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
        from ..errors import CheckpointError
        from ..models.build import load_pretrained

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
            self._embedder_id = search_index.embedder_id(self.model, self.config, self.checkpoint, self.use_ema)
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
    def _open(self, item: Any, sample_rate: int | None = None, index: int = 0, channel_axis: int | None = None) -> Source:
        """A readable source at the model's sample rate (`sources.open_source`): a path, an array
        recorded at `sample_rate`, or an {"array" or "raw", "sampling_rate"} dict; multichannel
        audio is downmixed (`channel_axis`, else the one dimension of at most 8)."""
        return open_source(item, self.sample_rate, sample_rate, index, channel_axis)

    # ------------------------------------------------------------------ clip embeddings
    def _clip_jobs(self, src: Source) -> list[tuple[int, int, float]]:
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

    def _embed_sources(self, sources: Sequence[Source], batch_size: int) -> np.ndarray:
        """(len(sources), D) clip embeddings; windows of all sources are batched together,
        longest first (less padding), in a fixed order (deterministic)."""
        jobs = [(i, s, e, w) for i, src in enumerate(sources) for s, e, w in self._clip_jobs(src)]
        order = sorted(range(len(jobs)), key=lambda j: (-(jobs[j][2] - jobs[j][1]), j))
        acc = torch.zeros(len(sources), self.embed_dim, dtype=torch.float64)
        dev = self.device

        def work(group: list[tuple[int, int, int, float]]) -> tuple[list, torch.Tensor]:
            wave, lengths = pad([sources[i].read(s, e) for i, s, e, _ in group])
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
        items, _ = as_list(inputs)
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
        """fn over items, results in order, on `workers` threads on CPU (`sources.map_in_threads`)."""
        return map_in_threads(fn, items, self._num_workers())

    def _plan_windows(self, n_samples: int) -> list:
        """Streaming windows for this pipeline's window, margin and encoder (`sources.plan_encoder_windows`)."""
        return plan_encoder_windows(self.model.audio, n_samples, self.timeline, self.sample_rate, self.window_s, self.margin_s)

    def _stream(self, src: Source, fn: Callable[[torch.Tensor], torch.Tensor], raw: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
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
            wave, lengths = pad([src.read(w.read_start, w.read_end) for w in group])
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
        from ..models.model import TextOutput

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
        items, is_batch = as_list(audio)
        prompts = apply_template(labels, self.prompt_template if template is None else template)
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
        logits = frame_logits(frame_embeds, text.text_embeds.to(frame_embeds.dtype), s, b)
        if calibrated:
            from ..losses.frame import flam_calibrated_prob

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
        text = self._text(apply_template(texts, self.prompt_template if template is None else template))
        return self._frame_scores(self._open(audio, sample_rate, channel_axis=channel_axis), texts, text, cal)

    def _frame_scores(self, src: Source, texts: list[str], text: Any, cal: bool) -> FrameScores:
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
        from ..models.model import TextOutput

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
        st = resolve_settings(self.config.eval, queries, threshold, median_filter_s, min_duration_s, merge_gap_s)
        if st.source == "defaults" and threshold is None:
            self._warn_uncalibrated(st.global_threshold)
        if announce:
            announce_settings(st, self.__dict__.setdefault("_announced", set()))
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
        items, is_batch = as_list(audio)
        tmpl = self.prompt_template if template is None else template
        prompts = apply_template(labels, tmpl)  # validated before any audio is decoded
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
            results.append([event(on, off, conf, lab) for on, off, lab, conf in st.postprocess.segments(fs)])
        if not any(results):
            say_nothing_found(best[0], best[1], st, best[2])
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
            say_nothing_found(p, f"at {fs.times[j]:.2f} s", st, text.strip())
        return [event(on, off, c, lab) for on, off, lab, c in segs]

    # ------------------------------------------------------------------ evaluators
    def evaluatable(self, name: str | None = None, batch_size: int = 16) -> Any:
        """This model as the functions `finelap.eval.tasks` evaluators take (DESIGN principle 7).
        The evaluators build the prompts (`make_prompt` with the checkpoint's template), so
        frame_scores here takes them as given: `evaluate_sed(pipe.evaluatable(), ...)` scores a
        class exactly as `detect` and `frame_scores` do."""
        from ..eval.tasks import Evaluatable

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
        return search_index.embed_files(self, paths, with_frames=with_frames, batch_size=batch_size)

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
        from ..errors import CheckpointError

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
        from ..eval.plots import plot_timeline

        src = self._open(audio, sample_rate, channel_axis=channel_axis)
        mel, mel_tl, mel_cfg = display_mel_stream(src, self.sample_rate)
        return plot_timeline(
            mel, scores.scores, scores.timeline, scores.texts, path,
            audio_timeline=mel_tl, sample_rate=self.sample_rate, mel_config=mel_cfg,
            detections=segments, ground_truth=reference, threshold=threshold, duration_s=scores.duration_s,
            title=title or f"{Path(scores.name).name}: frame probabilities", log_scale=log_scale,
            threshold_kinds=threshold_kinds,
        )  # fmt: skip
