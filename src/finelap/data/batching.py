"""Training batches: heterogeneous supervision, duration bucketing, collation with frame targets.

Design for exact resume: the content of the batch at step s is a pure function of
(seed, s). The sampler keeps no hidden state, so resuming at step s reproduces the remaining
batches exactly, whatever the number of data-loader workers.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..audio import Timeline, load_audio, resample
from ..errors import AudioError
from .phrases import PhraseClusters, _normalise
from .types import Clip, Event


def caption_ids(captions: list[str]) -> torch.Tensor:
    """(B,) int64 ids from caption texts (stable hash of the whitespace/case-normalised text), so
    equal captions get equal ids on every rank and in every process."""
    out = []
    for c in captions:
        h = hashlib.blake2b(" ".join(c.lower().split()).encode("utf-8"), digest_size=8).digest()
        out.append(int.from_bytes(h, "little", signed=True))
    return torch.tensor(out, dtype=torch.long)


def wave_digest(wave: torch.Tensor | np.ndarray) -> str:
    """Content digest of one waveform (its float32 samples and their count): the part of a
    feature-cache key that does not depend on the encoder (`models.feature_cache.FeatureCache` adds its `cache_key()`).
    Cheap to compute where the waveform is made (a data-loading worker)."""
    a = wave.detach().to("cpu", torch.float32).contiguous().numpy() if isinstance(wave, torch.Tensor) else np.ascontiguousarray(wave, np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(a.size).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def file_digest(path: str | Path, start: int, n: int, sample_rate: int) -> str | None:
    """Digest of the samples [start, start + n) of `path` decoded and resampled to `sample_rate`,
    named by the file's identity (absolute path, size, modification time) instead of its decoded
    content, so it costs a `stat`, not a decode. None when the file cannot be stat'ed. A feature
    cache keyed on it lets the loading workers skip decoding inputs whose features exist
    (`ClipDataset.skip_decode`); an edited file gets a new size or time and so a new key."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{start}|{n}|{sample_rate}"
    return "file:" + hashlib.blake2b(ident.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


@dataclass
class Batch:
    """A collated batch. Shapes: B clips, N samples, T encoder frames, K phrases per clip.

    wave (B, N) float32 zero-padded; lengths (B,) valid samples.
    captions: one caption per clip ("" when the clip has none); has_caption (B,) bool.
    phrases: per-clip phrase lists, each padded with "" to K; phrase_mask (B, K) bool.
    frame_targets (B, T, K) float in {0,1}, or None when no clip in the batch has events.
    has_frames (B,) bool: the clip has strong labels (frame loss applies).
    caption_group (B,) int: clips sharing a caption text share an id (for masking false negatives).
    wave_digests: each clip's waveform content digest (`models.feature_cache.wave_digest`, made by
    `Collate(digests=True)` in the loading workers), or None; the feature cache keys on it.
    wave_decoded: per clip, False when the loading worker skipped decoding it because the feature
    cache already holds its features (`ClipDataset.skip_decode`): its row of `wave` is zeros and only
    the cache can encode it. None: every clip was decoded.
    """

    wave: torch.Tensor
    lengths: torch.Tensor
    captions: list[str]
    has_caption: torch.Tensor
    phrases: list[list[str]]
    phrase_mask: torch.Tensor
    frame_targets: torch.Tensor | None
    has_frames: torch.Tensor
    caption_group: torch.Tensor
    keys: list[str]
    events: list[list[Event]]
    labels: list[list[str]]
    skipped: list[str] = field(default_factory=list)
    wave_digests: list[str] | None = None
    wave_decoded: list[bool] | None = None

    @property
    def size(self) -> int:
        return int(self.wave.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        self.wave = self.wave.to(device)
        self.lengths = self.lengths.to(device)
        self.has_caption = self.has_caption.to(device)
        self.phrase_mask = self.phrase_mask.to(device)
        self.has_frames = self.has_frames.to(device)
        self.caption_group = self.caption_group.to(device)
        if self.frame_targets is not None:
            self.frame_targets = self.frame_targets.to(device)
        return self


def _item_rng(seed: int, step: int, slot: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, step, slot, index]))


# Audio beyond each side of a crop that is decoded and resampled with it, so the resampler's filter
# sees real neighbours and the crop matches a crop of the whole resampled file (soxr HQ's filter
# spans a few milliseconds; this is far more).
_SPAN_MARGIN_S = 0.05


def _file_frames(path: str | Path) -> tuple[int, int] | None:
    """(frames, sample rate) from the header, without decoding; None when the header says nothing
    usable (the caller then decodes the whole file, which also raises the precise AudioError)."""
    try:
        import soundfile as sf

        info = sf.info(str(path))
    except Exception:
        return None
    return (int(info.frames), int(info.samplerate)) if info.frames > 0 and info.samplerate > 0 else None


def _resampled_length(frames: int, orig_sr: int, target_sr: int) -> int:
    """Length `audio.resample` gives for `frames` samples: round half up of frames * target / orig."""
    return frames if orig_sr == target_sr else (2 * frames * target_sr + orig_sr) // (2 * orig_sr)


def _read_span(path: str | Path, start: int, n: int, frames: int, orig_sr: int, target_sr: int) -> np.ndarray:
    """Samples [start, start + n) at `target_sr` of the file resampled whole, decoding only that span
    (plus a margin when resampling). Returns fewer than n samples if the file is shorter than its header."""
    if orig_sr == target_sr:
        return load_audio(path, None, start_s=start / orig_sr, duration_s=n / orig_sr)
    # Cut the span on a sample that is exact at both rates (a multiple of sr / gcd), so output sample
    # j of the span is output sample first_t + j of the whole file.
    g = math.gcd(orig_sr, target_sr)
    per_t, per_f = target_sr // g, orig_sr // g
    margin = int(math.ceil(_SPAN_MARGIN_S * target_sr))
    k0 = max(0, (start - margin) // per_t)
    k1 = -(-(start + n + margin) // per_t)
    first_f, end_f = k0 * per_f, min(frames, k1 * per_f)
    raw = load_audio(path, None, start_s=first_f / orig_sr, duration_s=(end_f - first_f) / orig_sr)
    if raw.shape[-1] == 0:
        return raw
    off = start - k0 * per_t
    return resample(raw, orig_sr, target_sr)[off : off + n]


def caption_for(clip: Clip, rng: np.random.Generator, clusters: PhraseClusters | None, template: str) -> str:
    """One caption for this step: a random human caption, else a phrase from the clip's labels."""
    if clip.captions:
        return clip.captions[int(rng.integers(len(clip.captions)))]
    labels = clip.labels or sorted({e.label for e in clip.events})
    if not labels:
        return ""
    phrases = []
    for lab in labels:
        c = clusters.cluster_of(lab) if clusters is not None else None
        if c is not None:
            mem = clusters.members(c)
            phrases.append(mem[int(rng.integers(len(mem)))])
        else:
            phrases.append(lab.replace("_", " "))
    return template.format(" and ".join(phrases))


class ClipDataset(torch.utils.data.Dataset):
    """Loads clips for training or evaluation.

    Items are addressed by a key (step, slot, index) so randomness (crop offset, caption choice,
    phrase sampling) is reproducible per step. A bad audio file yields None (the collate function
    drops it and reports it) instead of killing a long run.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        sample_rate: int = 16000,
        clip_seconds: float | None = 10.0,
        random_crop: bool = True,
        clusters: PhraseClusters | None = None,
        phrases_per_clip: int = 20,
        seed: int = 0,
        caption_template: str = "{}",
    ) -> None:
        self.clips = list(clips)
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds
        self.random_crop = random_crop
        self.clusters = clusters
        self.k = phrases_per_clip
        self.seed = seed
        self.caption_template = caption_template
        # Set by the trainer for a frozen tower with an on-disk feature cache: given an input's
        # `file_digest`, True when its features are cached, so the worker need not decode it (the
        # item then has wave None). None: items carry no file digest and are always decoded.
        self.skip_decode: Callable[[str], bool] | None = None

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict | None:
        step, slot, index = key if isinstance(key, tuple) else (0, 0, int(key))
        clip = self.clips[index]
        rng = _item_rng(self.seed, step, slot, index)
        try:
            wave, start, n, digest = self._load(clip.audio, rng)
        except AudioError as e:
            return {"error": str(e), "key": clip.key}
        start_s = start / self.sample_rate
        dur = n / self.sample_rate
        events = [
            Event(e.label, max(0.0, e.onset - start_s), min(dur, e.offset - start_s))
            for e in clip.events
            if e.offset - start_s > 0 and e.onset - start_s < dur
        ]
        phrases: list[str] = []
        positives: dict[str, list[int]] = {}
        if clip.events:
            labels = sorted({e.label for e in clip.events})
            if self.clusters is not None:
                phrases, cids = self.clusters.sample_phrase_set(labels, self.k, rng)
                # map each event label to the slot(s) of its cluster
                for lab in labels:
                    c = self.clusters.cluster_of(lab)
                    positives[lab] = [j for j, cj in enumerate(cids) if c is not None and cj == c]
                    if c is None:
                        positives[lab] = [j for j, p in enumerate(phrases) if p == _normalise(lab)]
            else:
                phrases = [lab.replace("_", " ") for lab in labels][: self.k]
                positives = {lab: [j] for j, lab in enumerate(labels[: self.k])}
        return {
            "wave": wave,
            "n_samples": n,
            "digest": digest,
            "key": clip.key,
            "caption": caption_for(clip, rng, self.clusters, self.caption_template),
            "phrases": phrases,
            "positives": positives,
            "events": events,
            "labels": list(clip.labels) or sorted({e.label for e in clip.events}),
            "has_events": bool(clip.events),
            "start_s": start_s,
        }

    def _load(self, path: str | Path, rng: np.random.Generator) -> tuple[np.ndarray | None, int, int, str | None]:
        """(wave (n,) or None, start sample of the crop, n samples, file digest or None).

        With `skip_decode` set, the crop planned from the header (`_plan`) is named by
        `file_digest` and not decoded when `skip_decode` says its features are cached. A file whose
        decoded length differs from its header's gets no file digest (the feature cache then keys
        on its content)."""
        if self.skip_decode is None:
            wave, start = self._crop(path, rng)
            return wave, start, len(wave), None
        plan = self._plan(path, rng)
        header, n, total, start = plan
        if header is None:
            wave, start = self._crop(path, rng, plan)
            return wave, start, len(wave), None
        want = min(total, n)
        digest = file_digest(path, start, want, self.sample_rate)
        if digest is not None and self.skip_decode(digest):
            return None, start, want, digest
        wave, got = self._crop(path, rng, plan)
        return wave, got, len(wave), (digest if (got, len(wave)) == (start, want) else None)

    def _plan(self, path: str | Path, rng: np.random.Generator) -> tuple[tuple[int, int] | None, int, int, int]:
        """(header (frames, rate) or None, crop length n at self.sample_rate (0: no crop), the
        resampled length the header gives, crop start). The start is drawn here only when the
        header says the file is longer than n; otherwise it is 0 and `_crop` decides after decoding."""
        sr = self.sample_rate
        header = _file_frames(path) if self.clip_seconds is not None else None
        n = int(round(self.clip_seconds * sr)) if self.clip_seconds is not None else 0
        if header is None:
            return None, n, 0, 0
        total = _resampled_length(header[0], header[1], sr)
        start = int(rng.integers(total - n + 1)) if total > n and self.random_crop else 0
        return header, n, total, start

    def _crop(self, path: str | Path, rng: np.random.Generator,
              plan: tuple[tuple[int, int] | None, int, int, int] | None = None) -> tuple[np.ndarray, int]:  # fmt: skip
        """(wave (N,) at self.sample_rate, start sample of the crop in the resampled file).

        The crop offset is drawn from the length the header gives, so it is a pure function of
        (seed, step, slot, index), and only the crop is decoded: a 30-min file in the manifest
        costs a 10-s read per item, not a 30-min decode (and resample) per item. `plan`: `_plan`'s
        result when the caller made it already (else made here)."""
        sr = self.sample_rate
        header, n, total, start = plan if plan is not None else self._plan(path, rng)
        if header is None or total <= n:  # no crop needed (or no usable header): read it all
            wave = load_audio(path, sr)
            start = 0
            if self.clip_seconds is not None and len(wave) > n:  # the header understated the length
                start = int(rng.integers(len(wave) - n + 1)) if self.random_crop else 0
                wave = wave[start : start + n]
            return wave, start
        wave = _read_span(path, start, n, header[0], header[1], sr)
        if len(wave) < n:  # shorter than its header says (a truncated file): crop what is really there
            full = load_audio(path, sr)
            start = min(start, max(0, len(full) - n))
            wave = full[start : start + n]
        return wave, start


class Collate:
    """Pads waves, rasterises events into (B, T, K) targets on the model's Timeline."""

    def __init__(self, timeline: Timeline, phrases_per_clip: int = 20, digests: bool = False) -> None:
        self.timeline = timeline
        self.k = phrases_per_clip
        self.digests = digests  # each wave's content digest (`wave_digest`), for a feature cache

    def __call__(self, items: Sequence[dict | None]) -> Batch:
        skipped = [it["error"] for it in items if it is not None and "error" in it]
        items = [it for it in items if it is not None and "error" not in it]
        if not items:
            raise AudioError("<batch>", "every clip in this batch failed to load: " + "; ".join(skipped))
        b = len(items)
        lengths = torch.tensor([it["n_samples"] if "n_samples" in it else len(it["wave"]) for it in items], dtype=torch.long)
        wave = torch.zeros(b, int(lengths.max()))
        for i, it in enumerate(items):
            if it["wave"] is not None:  # None: not decoded, the feature cache has it (ClipDataset.skip_decode)
                wave[i, : len(it["wave"])] = torch.from_numpy(it["wave"])
        decoded = [it["wave"] is not None for it in items]
        t = self.timeline.num_frames_for_samples(int(lengths.max()))
        has_frames = torch.tensor([it["has_events"] for it in items], dtype=torch.bool)
        phrases = [list(it["phrases"][: self.k]) + [""] * (self.k - len(it["phrases"][: self.k])) for it in items]
        phrase_mask = torch.tensor([[bool(p) for p in ps] for ps in phrases], dtype=torch.bool)
        targets = None
        if bool(has_frames.any()):
            targets = torch.zeros(b, t, self.k)
            for i, it in enumerate(items):
                for e in it["events"]:
                    for j in (j for j in it["positives"].get(e.label, []) if j < self.k):
                        col = self.timeline.rasterize([(0, e.onset, e.offset)], [0], t)[:, 0]
                        targets[i, :, j] = torch.maximum(targets[i, :, j], torch.from_numpy(col))
        captions = [it["caption"] for it in items]
        # a content hash, not a per-batch counter: ids must agree across ranks when losses gather them
        caption_group = caption_ids(captions)
        return Batch(
            wave=wave,
            lengths=lengths,
            captions=captions,
            has_caption=torch.tensor([bool(c) for c in captions], dtype=torch.bool),
            phrases=phrases,
            phrase_mask=phrase_mask,
            frame_targets=targets,
            has_frames=has_frames,
            caption_group=caption_group,
            keys=[it["key"] for it in items],
            events=[it["events"] for it in items],
            labels=[it["labels"] for it in items],
            skipped=skipped,
            wave_digests=[it.get("digest") or wave_digest(it["wave"]) for it in items] if self.digests else None,
            wave_decoded=None if all(decoded) else decoded,
        )


class MixedBatchSampler(torch.utils.data.Sampler):
    """Yields lists of (step, slot, index) keys: one list per training step, forever (or until
    `max_steps`), starting at `start_step`.

    groups: name -> clip indices (e.g. "captions": caption-only clips, "events": strongly
        labelled clips). ratios: name -> share of each batch; slots are allotted by largest
        remainder so a batch of 8 with {captions: .5, events: .5} has exactly 4 + 4.
    durations: optional per-clip seconds; with `buckets` > 1 each group is split into duration
        quantile buckets and one bucket is drawn per batch and group, so padding stays small.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[int]],
        ratios: Mapping[str, float],
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        max_steps: int | None = None,
        durations: Sequence[float] | None = None,
        buckets: int = 1,
    ) -> None:
        names = [n for n in groups if len(groups[n]) > 0 and ratios.get(n, 0) > 0]
        if not names:
            raise ValueError(f"no data for any group with a positive ratio (groups: {dict((k, len(v)) for k, v in groups.items())}, ratios: {dict(ratios)})")
        total = sum(ratios[n] for n in names)
        shares = [batch_size * ratios[n] / total for n in names]
        counts = [int(s) for s in shares]
        for i in np.argsort([-(s - int(s)) for s in shares], kind="stable")[: batch_size - sum(counts)]:
            counts[i] += 1
        self.plan = [(n, c) for n, c in zip(names, counts) if c > 0]
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.max_steps = max_steps
        self.bucketed: dict[str, list[np.ndarray]] = {}
        for n, _ in self.plan:
            idx = np.asarray(groups[n], dtype=np.int64)
            if durations is not None and buckets > 1 and len(idx) >= buckets:
                d = np.asarray(durations, dtype=np.float64)[idx]
                order = idx[np.argsort(d, kind="stable")]
                self.bucketed[n] = [b for b in np.array_split(order, buckets) if len(b)]
            else:
                self.bucketed[n] = [idx]

    def batch_keys(self, step: int) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, 0xBA7C]))
        keys: list[tuple[int, int, int]] = []
        for n, count in self.plan:
            bks = self.bucketed[n]
            sizes = np.array([len(b) for b in bks], dtype=np.float64)
            bucket = bks[int(rng.choice(len(bks), p=sizes / sizes.sum()))]
            pick = rng.choice(bucket, size=count, replace=len(bucket) < count)
            keys.extend((step, len(keys), int(i)) for i in pick)
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            yield self.batch_keys(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("infinite sampler")
        return max(0, self.max_steps - self.start_step)


def split_by_supervision(clips: Sequence[Clip]) -> dict[str, list[int]]:
    """Group clip indices: 'events' (strong labels) and 'captions' (captions or weak labels only)."""
    groups: dict[str, list[int]] = {"events": [], "captions": []}
    for i, c in enumerate(clips):
        (groups["events"] if c.events else groups["captions"]).append(i)
    return groups
