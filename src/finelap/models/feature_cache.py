"""Feature cache for frozen audio towers: each input's encoder frames are computed once.

With a frozen pretrained tower (e.g. `aisfx`), the tower's output for a given waveform never
changes, so training pays for it once per distinct input and later epochs cost only the heads.
Entries are keyed by the waveform's content (`wave_digest`: blake2b of its float32 samples, after
the dataset's decoding, resampling, mixing and cropping; computed by the data-loading workers) and by the encoder's `cache_key()` (architecture
options + weights), so soundscapes mixed in the waveform domain are cached per mix, a random crop
is cached per crop, and a changed tower never reads stale features.

Exactness: encoders used with the cache must give each item of a padded batch exactly the frames
of a single-item pass (finelap's own towers do; tests check it), so cached and uncached training
see identical features and identical losses.

Storage: an in-memory dict plus, when `folder` is set, one safetensors file per entry under
`folder/<encoder key>/<2 hex>/<key>.safetensors` (written atomically; a damaged file is recomputed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.batching import wave_digest
from .audio_encoders import AudioEncoder, AudioFeatures, lengths_to_mask

__all__ = ["CachedOnDisk", "FeatureCache", "supports_feature_cache", "wave_digest"]  # wave_digest: from data.batching



def supports_feature_cache(encoder: AudioEncoder) -> bool:
    """True for a frozen encoder that can name its features (`cache_key()`)."""
    return bool(getattr(encoder, "frozen", False)) and callable(getattr(encoder, "cache_key", None))


def _length_groups(lengths: list[int], items: list[int], ratio: float = 1.25, max_group: int = 16) -> list[list[int]]:
    """`items` split into groups of at most `max_group` whose lengths differ by at most `ratio`."""
    groups: list[list[int]] = []
    first = 0  # length of the current group's shortest item
    for j in sorted(range(len(items)), key=lambda j: lengths[j]):
        if groups and len(groups[-1]) < max_group and lengths[j] <= ratio * max(1, first):
            groups[-1].append(items[j])
        else:
            groups.append([items[j]])
            first = lengths[j]
    return groups


def _entry_path(folder: Path, enc_key: str, key: str) -> Path:
    """Where the entry `key` of the encoder `enc_key` lies in a cache folder."""
    return folder / enc_key / key[:2] / f"{key}.safetensors"


class CachedOnDisk:
    """`ClipDataset.skip_decode` for a FeatureCache with a folder: True when the entry of an input's
    digest is on disk, so the loading worker need not decode that input. Picklable (plain fields),
    so it travels to data-loading worker processes."""

    def __init__(self, folder: str | Path, enc_key: str) -> None:
        self.folder = Path(folder)
        self.enc_key = enc_key

    def __call__(self, digest: str) -> bool:
        key = FeatureCache._key(self.enc_key, digest)
        return _entry_path(self.folder, self.enc_key, key).is_file()


class FeatureCache:
    """encode(encoder, wave (B, N), lengths (B,)) -> AudioFeatures, computing only unseen inputs."""

    def __init__(self, folder: str | Path | None = None, max_items: int | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.max_items = max_items
        self._mem: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "disk_hits": self.disk_hits, "entries": len(self._mem)}

    # ------------------------------------------------------------------ keys and storage
    @staticmethod
    def _key(enc_key: str, digest: str) -> str:
        """The entry's name: the encoder's key and the waveform's `wave_digest`."""
        return hashlib.blake2b(f"{enc_key}|{digest}".encode(), digest_size=16).hexdigest()

    def _path(self, enc_key: str, key: str) -> Path | None:
        return None if self.folder is None else _entry_path(self.folder, enc_key, key)

    def _get(self, enc_key: str, key: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        hit = self._mem.get(key)
        if hit is not None:
            return hit
        p = self._path(enc_key, key)
        if p is None or not p.is_file():
            return None
        from safetensors.torch import load_file

        try:
            d = load_file(str(p))
        except Exception:  # damaged entry: recompute it
            return None
        entry = (d["frames"], d.get("cls"))
        self._remember(key, entry)
        self.disk_hits += 1
        return entry

    def _remember(self, key: str, entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        if self.max_items is not None and len(self._mem) >= self.max_items:
            self._mem.pop(next(iter(self._mem)))
        self._mem[key] = entry

    def _put(self, enc_key: str, key: str, entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self._remember(key, entry)
        p = self._path(enc_key, key)
        if p is None:
            return
        from safetensors.torch import save_file

        from ..utils import atomic_path

        tensors = {"frames": entry[0].contiguous()}
        if entry[1] is not None:
            tensors["cls"] = entry[1].contiguous()
        try:
            with atomic_path(p) as tmp:
                save_file(tensors, str(tmp))
        except OSError:  # a full or read-only disk costs speed, never the run
            pass

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, encoder: AudioEncoder, wave: torch.Tensor, lengths: torch.Tensor | None = None,
               digests: Sequence[str] | None = None, decoded: Sequence[bool] | None = None) -> AudioFeatures:  # fmt: skip
        """digests: each item's `wave_digest` (or `file_digest`) when the caller has it already (the
        training batches compute them in the data-loading workers), else computed here. decoded:
        False for items whose wave was not decoded because their entry was on disk
        (`CachedOnDisk`); such an item must be found here."""
        if wave.dim() != 2 or not wave.is_floating_point():
            wave, lengths = encoder._check(wave, lengths)  # its error, naming the problem
        b, n = wave.shape
        lengths = torch.full((b,), n, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long().reshape(-1).cpu()
        if lengths.shape[0] != b or (b and (int(lengths.min()) < 0 or int(lengths.max()) > n)):
            wave, lengths = encoder._check(wave, lengths)
        if digests is None:
            digests = [wave_digest(wave[i, : int(lengths[i])]) for i in range(b)]
        elif len(digests) != b:
            raise ValueError(f"{len(digests)} wave digests for a batch of {b}")
        enc_key = encoder.cache_key()  # type: ignore[attr-defined]
        keys = [self._key(enc_key, d) for d in digests]
        entries: list[Any] = [self._get(enc_key, k) for k in keys]
        todo = [i for i, e in enumerate(entries) if e is None]
        lost = [i for i in todo if decoded is not None and not decoded[i]]
        if lost:
            p = self._path(enc_key, keys[lost[0]])
            raise RuntimeError(f"feature cache: the entry {p} was on disk when the batch was loaded and is gone or unreadable "
                               f"now ({len(lost)} input(s) of this batch); was the cache folder cleaned during training? "
                               "Resume the run: missing entries are then recomputed")  # fmt: skip
        self.hits += b - len(todo)
        self.misses += len(todo)
        for group in _length_groups([int(lengths[i]) for i in todo], todo):
            # similar lengths together: a 5-s clip padded to a 10-s soundscape would cost twice its compute
            n_max = max(1, max(int(lengths[i]) for i in group))
            out = encoder(wave[group, :n_max], lengths[group].to(wave.device))
            for j, i in enumerate(group):
                v = int(out.frame_mask[j].sum())
                entry = (out.frames[j, :v].detach().clone(), None if out.cls is None else out.cls[j].detach().clone())
                self._put(enc_key, keys[i], entry)
                entries[i] = entry
        t = encoder.num_frames(n)
        d = entries[0][0].shape[-1]
        frames = wave.new_zeros(b, t, d)
        valid = torch.tensor([e[0].shape[0] for e in entries], dtype=torch.long, device=wave.device)
        for i, e in enumerate(entries):
            frames[i, : e[0].shape[0]] = e[0].to(frames.dtype)
        has_cls = all(e[1] is not None for e in entries)
        cls = torch.stack([e[1] for e in entries]).to(frames.dtype) if has_cls else None
        return AudioFeatures(frames=frames, frame_mask=lengths_to_mask(valid, t), frame_rate_hz=encoder.frame_rate_hz, cls=cls)
