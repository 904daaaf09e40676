"""The search-index contract of a Pipeline (`finelap.search.Embedder`): an identity of weights +
preprocessing (`embedder_id`; embeddings with different ids must not be mixed) and embeddings of
files that report a bad file instead of raising (`embed_files`)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import FinelapError
from .sources import Source

__all__ = ["embedder_id", "embed_files"]


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


def embedder_id(model: Any, config: Any, checkpoint: Any, use_ema: bool) -> str:
    """"finelap-<hash>": of the checkpoint's config.json (without its calibration: detection
    settings do not change embeddings) and the weights file that was loaded (EMA or raw), or,
    for a model not loaded from a checkpoint directory, of its state dict and config."""
    from ..checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE

    h = hashlib.blake2b(digest_size=16)
    ckpt_path = getattr(checkpoint, "path", None)
    if ckpt_path is not None and (Path(ckpt_path) / CONFIG_FILE).is_file():
        # which weights were loaded is part of the identity (EMA or raw)
        h.update(b"ema" if use_ema else b"raw")
        for name in (CONFIG_FILE, EMA_FILE if use_ema else MODEL_FILE):
            f = Path(ckpt_path) / name
            if name == CONFIG_FILE:
                h.update(name.encode())
                h.update(_config_bytes_without_calibration(f))
            elif f.is_file():
                h.update(name.encode())
                _hash_file(f, h)
    else:
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else str(config), sort_keys=True, default=str).encode())
    return f"finelap-{h.hexdigest()}"


def embed_files(pipe: Any, paths: Sequence[str | os.PathLike], *, with_frames: bool = False, batch_size: int = 16) -> Iterator[Any]:
    """One `finelap.search.EmbedResult` per path, in order; a missing or corrupt file gives a
    result with `error` set instead of raising (the `finelap.search.Embedder` contract)."""
    from ..search import EmbedResult

    paths = [Path(p) for p in paths]
    group = max(batch_size * 4, 16)
    for g in range(0, len(paths), group):
        ok: list[tuple[Path, Source]] = []
        results: dict[int, Any] = {}
        for k, p in enumerate(paths[g : g + group]):
            try:
                ok.append((p, pipe._open(p)))
            except FinelapError as e:
                results[k] = EmbedResult(p, error=str(getattr(e, "problem", e)))
        try:
            embs = pipe._embed_sources([s for _, s in ok], batch_size) if ok else np.zeros((0, pipe.embed_dim), np.float32)
        except FinelapError:  # a decode error inside a long file: retry one by one to isolate it
            embs = None
        j = 0
        for k, p in enumerate(paths[g : g + group]):
            if k in results:
                yield results[k]
                continue
            src = ok[j][1]
            try:
                emb = embs[j] if embs is not None else pipe._embed_sources([src], batch_size)[0]
                frames = pipe.embed_frames(src).embeds if with_frames else None
                yield EmbedResult(p, emb, frames, pipe.frame_rate_hz if with_frames else None, src.n_samples / pipe.sample_rate)
            except FinelapError as e:
                yield EmbedResult(p, error=str(getattr(e, "problem", e)))
            j += 1
