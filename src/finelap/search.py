"""Sound-library search: embed a folder once, then find files (and the time span inside each file)
that match a text query.

The index is built around an abstract :class:`Embedder`, so any model plugs in (the inference
Pipeline, a baseline, a test fake). It keeps one L2-normalised clip embedding per file and,
optionally, the file's frame embeddings, which give the best-matching time span of every hit.

On-disk layout (a directory)::

    IDX/meta.json                 format version, embedder_id, dim, count, data file names, failures
    IDX/clip-<gen>.npy            (N, D) float32 (or float16) clip embeddings, row i = files line i
    IDX/files-<gen>.jsonl         one line per row: path relative to the root, content hash, size,
                                  mtime, duration, frame offset/count/rate
    IDX/frames-<gen>.npy          (sum T, D) float16 concatenated frame embeddings (optional),
                                  memory-mapped on load

`meta.json` is the commit point. A build writes the data files of a new generation `<gen>` next to
the old ones (each through `utils.atomic_path`, so fsynced), then swaps `meta.json` atomically to
point at them, then deletes the old generation. A reader (or a crash at any moment) therefore sees
either the old index or the new one, never a mix of rows from two builds, which fixed names
(`clip.npy` + `files.jsonl` replaced one after the other) could not guarantee.

Re-running a build embeds only new or changed files: a file is unchanged when its size and mtime
match the stored ones (like git and rsync; `rehash=True` hashes every file instead), or when its
content hash (blake2b over size + bytes) matches. Content seen before under another path (a moved
or duplicated file) reuses the stored embedding. Missing or corrupt files are skipped with a
warning and listed in the report and in meta.json; they never stop a build.

Search ranks files by clip cosine with faiss (`IndexFlatIP`, exact) when it is importable, else
numpy (matrix product + `argpartition`); both give the same ranking (ties broken by row; only
exact ties straddling the k-th place may pick different rows). Time spans come from the
frame-score curve of each hit, converted to seconds by `audio.Timeline` only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from .audio import AUDIO_EXTENSIONS, Timeline
from .errors import AudioError, CheckpointError, DataFormatError, FinelapError
from .utils import atomic_path, log, progress, write_json_atomic

__all__ = [
    "EmbedResult",
    "Embedder",
    "FrameScorer",
    "SpanConfig",
    "Hit",
    "BuildReport",
    "Index",
    "best_span",
    "file_hash",
    "scan_audio_files",
    "faiss_available",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "finelap-index"
FORMAT_VERSION = 1
META_FILE = "meta.json"
Backend = Literal["auto", "faiss", "numpy"]


# ----------------------------------------------------------------------------- embedder contract


@dataclass
class EmbedResult:
    """What an embedder returns for one audio file.

    Either `clip_embedding` is set (success) or `error` is (the file was missing, corrupt, ...):
      path             the path that was asked for (one of the `paths` given to `embed_files`)
      clip_embedding   (D,) float, L2-normalised (the index re-normalises defensively)
      frame_embeddings (T, D) float16/float32, one row per encoder frame; None if not requested
                       or not available (the file then gets no time span)
      frame_rate_hz    frames per second of `frame_embeddings` (frame j starts at j / rate)
      duration_s       audio duration; clips spans at the file's end; None if unknown
      error            one-line reason the file could not be embedded
    """

    path: Path
    clip_embedding: np.ndarray | None = None
    frame_embeddings: np.ndarray | None = None
    frame_rate_hz: float | None = None
    duration_s: float | None = None
    error: str | None = None


@runtime_checkable
class Embedder(Protocol):
    """What the index needs from a model.

    `embedder_id` identifies the weights + preprocessing (e.g. a hash of the checkpoint's weights
    and config): embeddings from two ids are never mixed in one index.

    `embed_files(paths, with_frames=...)` yields one EmbedResult per path (any order). Per-file
    problems must come back as `EmbedResult(path, error=...)`; an embedder that raises a
    FinelapError instead still works (the index retries that batch file by file), but slower.

    `embed_text(texts)` returns (N, D) float text embeddings, L2-normalised.

    An embedder may also provide `frame_scores_from_embeddings` (see FrameScorer), e.g. calibrated
    FLAM-style frame probabilities; without it frame scores are cosine similarities. And an
    `embedder_info` dict (JSON-serialisable, e.g. {"checkpoint": "/abs/path"}), stored in
    meta.json so that `finelap search` can find the model the index was built with.
    """

    @property
    def embedder_id(self) -> str: ...

    def embed_files(self, paths: list[Path], *, with_frames: bool = False) -> Iterator[EmbedResult]: ...

    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class FrameScorer(Protocol):
    """Optional embedder method: frame scores of one text against one file's frames.

    text_emb (D,) float32 unit norm, frames (T, D) float32 unit norm -> (T,) scores (higher =
    better match; any scale, e.g. logits or probabilities)."""

    def frame_scores_from_embeddings(self, text_emb: np.ndarray, frames: np.ndarray) -> np.ndarray: ...


def _embedder_id(embedder: Any) -> str:
    eid = getattr(embedder, "embedder_id", None)
    if not isinstance(eid, str) or not eid:
        raise TypeError(f"{type(embedder).__name__} has no usable `embedder_id` (a non-empty str)")
    return eid


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SpanConfig:
    """How the best-matching time span of a hit is cut from its frame-score curve.

    level          the span is the contiguous run of frames around the peak frame whose score is
                   >= median + level * (peak - median), i.e. level 0.5 is the width at half
                   height of the peak above the file's typical (median) score. In (0, 1].
    threshold      absolute frame-score threshold instead of `level` (e.g. 0.5 for calibrated
                   probabilities); when the peak is below it the hit gets no span.
    merge_gap_s    gaps shorter than this between active runs are closed first.
    median_filter_s  median-filter the curve over this window (seconds) first; 0 = off.
    """

    level: float = 0.5
    threshold: float | None = None
    merge_gap_s: float = 0.0
    median_filter_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.level <= 1.0:
            raise ValueError(f"SpanConfig.level must be in (0, 1], got {self.level}")
        if self.merge_gap_s < 0 or self.median_filter_s < 0:
            raise ValueError("SpanConfig.merge_gap_s and median_filter_s must be >= 0")


@dataclass(frozen=True)
class Hit:
    """One search result.

    path        absolute path of the file (index root / rel_path)
    score       clip cosine similarity between the query and the file
    span        (onset_s, offset_s) of the best-matching segment, None without stored frames
    span_score  peak frame score inside the span (cosine, or the embedder's frame score)
    """

    path: Path
    score: float
    span: tuple[float, float] | None = None
    span_score: float | None = None
    rel_path: str = ""
    duration_s: float | None = None
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "path": str(self.path),
            "rel_path": self.rel_path,
            "score": self.score,
            "onset": None if self.span is None else self.span[0],
            "offset": None if self.span is None else self.span[1],
            "span_score": self.span_score,
            "duration": self.duration_s,
        }


def _unreadable_reason(path: Path, err: OSError) -> str:
    """Why a file could not be read, in the words the audio loader uses for it (a broken link, a
    missing file, ...), else the OS error."""
    from .audio import _check_readable

    try:
        _check_readable(path)
    except AudioError as e:
        return e.problem
    except OSError:
        pass
    return f"cannot read file ({err.strerror or err})"


@dataclass
class BuildReport:
    """Outcome of `Index.build`. Every audio file found is exactly one of unchanged / added /
    updated / failed; `removed` counts indexed files that are gone from the folder.

    updated   the file was indexed before and was re-embedded (content changed, or frames were
              requested and the stored row has none)
    embedded  files actually sent to the embedder; `reused` got a stored embedding of identical
              content instead (moved or duplicated files)
    failed    [{"path": rel_path, "error": reason}]
    """

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    embedded: int = 0
    reused: int = 0
    total: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def counts(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": len(self.failed),
            "embedded": self.embedded,
            "reused": self.reused,
            "total": self.total,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
        }

    def summary(self) -> str:
        c = self.counts()
        return (
            f"{c['total']} files indexed: {c['added']} added, {c['updated']} updated, {c['removed']} removed, "
            f"{c['unchanged']} unchanged, {c['failed']} failed ({c['embedded']} embedded, {c['reused']} reused) "
            f"in {c['seconds']:.1f} s"
        )


@dataclass(slots=True)  # slots: an index of 1e6 files keeps 1e6 of these in memory
class _Record:
    """One row of files.jsonl. `with_frames` says whether frames were requested when the row was
    embedded (so a with-frames rebuild knows which rows to re-embed)."""

    path: str
    hash: str
    size: int
    mtime_ns: int
    duration_s: float | None
    frame_start: int = 0
    n_frames: int = 0
    frame_rate_hz: float | None = None
    with_frames: bool = False

    KEYS = ("path", "hash", "size", "mtime_ns", "duration_s", "frame_start", "n_frames", "frame_rate_hz", "with_frames")

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self.KEYS}, separators=(",", ":"))


# ----------------------------------------------------------------------------- helpers


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def file_hash(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Content hash of a file: blake2b-160 over its size then its bytes, read in chunks (bounded
    memory for files of any size). Returns 'blake2b:<hex>'."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        h.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return "blake2b:" + h.hexdigest()


def _norm_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({(e if e.startswith(".") else "." + e).lower() for e in extensions}))


def scan_audio_files(
    root: str | Path,
    extensions: Iterable[str] = AUDIO_EXTENSIONS,
    exclude: Sequence[Path] = (),
    include_hidden: bool = False,
) -> list[Path]:
    """Audio files under `root`, recursively, sorted by relative POSIX path (deterministic on every
    platform). Extensions match case-insensitively. Hidden files and folders (leading '.', e.g.
    macOS '._x.wav' resource forks, '.git') are skipped unless `include_hidden`; folders in
    `exclude` (e.g. the index itself) are skipped; symlinked folders are not followed (no cycles)."""
    root = Path(root)
    exts = _norm_extensions(extensions)
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[tuple[str, Path]] = []
    def warn(e: OSError) -> None:  # os.walk drops unreadable folders silently otherwise
        log(f"warning: skipped folder {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=warn):
        dirnames[:] = [
            d for d in dirnames
            if (include_hidden or not d.startswith(".")) and os.path.realpath(os.path.join(dirpath, d)) not in excluded
        ]
        for name in filenames:
            if not include_hidden and name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in exts:
                p = Path(dirpath) / name
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def best_span(
    scores: np.ndarray,
    frame_rate_hz: float,
    duration_s: float | None = None,
    config: SpanConfig = SpanConfig(),
) -> tuple[tuple[float, float] | None, float]:
    """Best-matching time span of one frame-score curve.

    scores (T,): frame scores (higher = better). Frames that start at or after `duration_s`
    (encoder padding) are ignored. The span is the contiguous active segment that contains the
    peak frame (see SpanConfig), in seconds via Timeline. Returns ((onset_s, offset_s) or None,
    peak score); None when the curve is empty or the peak is below an absolute threshold.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return None, float("nan")
    tl = Timeline(frame_rate_hz)
    if duration_s is not None:
        starts = tl.frame_edges(len(s))[:-1]
        s = s[: max(1, int(np.count_nonzero(starts < duration_s - 1e-9)))]
    if config.median_filter_s > 0:
        from .eval.metrics import median_filter_seconds

        s = median_filter_seconds(s, frame_rate_hz, config.median_filter_s)
    finite = np.isfinite(s)
    if not finite.any():
        return None, float("nan")
    s = np.where(finite, s, -np.inf)
    peak = int(np.argmax(s))
    top = float(s[peak])
    if config.threshold is not None:
        thr = float(config.threshold)
        if top < thr:
            return None, top
    else:
        base = float(np.median(s[finite]))
        thr = base + config.level * (top - base)
    active = s >= thr - 1e-12 * max(1.0, abs(thr))  # the peak itself is always active
    t_peak = float(tl.frame_edges(len(s))[peak])
    for on, off in tl.segments(active, duration_s, merge_gap_s=config.merge_gap_s):
        if on - 1e-9 <= t_peak < off:
            return (on, off), top
    return None, top  # unreachable for well-formed input; kept so a span is never invented


# ----------------------------------------------------------------------------- search backends


class _NumpyBackend:
    """Exact inner-product top-k with numpy: scores in blocks of queries (bounded memory), then
    argpartition + a sort of the k survivors."""

    name = "numpy"

    def __init__(self, clip: np.ndarray) -> None:
        # (N, D) in RAM: a memmap would page the whole matrix in from disk on every cold query
        self.mat = np.array(clip, dtype=np.float32, order="C") if isinstance(clip, np.memmap) else np.ascontiguousarray(clip, dtype=np.float32)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.mat.shape[0]
        nq = q.shape[0]
        k = min(k, n)
        scores = np.empty((nq, k), dtype=np.float32)
        ids = np.empty((nq, k), dtype=np.int64)
        block = max(1, (1 << 25) // max(n, 1))  # ~128 MiB of float32 scores per block
        for s in range(0, nq, block):
            sims = q[s : s + block] @ self.mat.T  # (b, N)
            if k < n:
                part = np.argpartition(sims, n - k, axis=1)[:, n - k :]
            else:
                part = np.broadcast_to(np.arange(n), sims.shape).copy()
            ps = np.take_along_axis(sims, part, axis=1)
            order = np.lexsort((part, -ps), axis=-1)  # score desc, then row asc on ties
            scores[s : s + block] = np.take_along_axis(ps, order, axis=1)
            ids[s : s + block] = np.take_along_axis(part, order, axis=1)
        return scores, ids


class _FaissBackend:
    """Exact inner-product top-k with faiss.IndexFlatIP (rows added in chunks, so loading a
    memory-mapped matrix never holds two full copies)."""

    name = "faiss"

    def __init__(self, clip: np.ndarray, chunk_rows: int = 1 << 16) -> None:
        import faiss

        n, d = clip.shape
        self.index = faiss.IndexFlatIP(d)
        for s in range(0, n, chunk_rows):
            self.index.add(np.ascontiguousarray(clip[s : s + chunk_rows], dtype=np.float32))

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        # same tie order as numpy (score desc, row asc); faiss' heap order on exact ties is unspecified
        order = np.lexsort((ids, -scores), axis=-1)
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1).astype(np.int64)


def _make_backend(clip: np.ndarray, backend: Backend) -> _NumpyBackend | _FaissBackend:
    if backend not in ("auto", "faiss", "numpy"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'numpy', got {backend!r}")
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        if backend == "faiss" and not faiss_available():
            raise FinelapError("backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        if clip.shape[0] > 0:
            return _FaissBackend(clip)
    return _NumpyBackend(clip)


# ----------------------------------------------------------------------------- storage


def _read_meta(out: Path) -> dict[str, Any]:
    p = out / META_FILE
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FinelapError(f"{out}: not a finelap index (no {META_FILE}); build one with `finelap index build`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(p, f"unreadable index metadata ({e}); rebuild the index with --rebuild") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataFormatError(p, f"not a {FORMAT} metadata file")
    if meta.get("version") != FORMAT_VERSION:
        raise DataFormatError(
            p, f"index format version {meta.get('version')} is not supported (this finelap reads {FORMAT_VERSION}); rebuild with --rebuild"
        )
    for key in ("embedder_id", "dim", "count", "data"):
        if key not in meta:
            raise DataFormatError(p, f"missing key '{key}'; rebuild with --rebuild")
    return meta


class _LazyRecords(Sequence[_Record]):
    """The rows of files.jsonl, each parsed on first access. Opening an index of 1e6 files then
    costs one file read, not 1e6 json.loads (seconds), and a search parses only its k hits."""

    def __init__(self, lines: list[str], path: Path) -> None:
        self._lines = lines
        self._path = path
        self._parsed: list[_Record | None] = [None] * len(lines)

    def __len__(self) -> int:
        return len(self._lines)

    def _parse(self, i: int) -> _Record:
        try:
            d = json.loads(self._lines[i])
            rec = _Record(**{k: d[k] for k in _Record.KEYS})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataFormatError(self._path, f"bad index row ({type(e).__name__}: {e}); rebuild with --rebuild", line=i + 1) from None
        self._parsed[i] = rec
        return rec

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # bounds check + negative indices
        rec = self._parsed[i]
        return rec if rec is not None else self._parse(i)

    def __iter__(self) -> Iterator[_Record]:
        for i in range(len(self)):
            yield self[i]


def _read_records(path: Path, expected: int) -> _LazyRecords:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(path, "index file list is missing; rebuild with --rebuild") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"not UTF-8 text ({e}); rebuild with --rebuild") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != expected:
        raise DataFormatError(path, f"{len(lines)} rows but meta.json says {expected}; rebuild with --rebuild")
    return _LazyRecords(lines, path)


def _load_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataFormatError(path, "index data file is missing; rebuild with --rebuild") from None
    except ValueError as e:
        raise DataFormatError(path, f"unreadable array ({e}); rebuild with --rebuild") from None
    if tuple(arr.shape) != shape:
        raise DataFormatError(path, f"shape {tuple(arr.shape)} does not match meta.json {shape}; rebuild with --rebuild")
    return arr


_DATA_PREFIXES = ("clip-", "frames-", "files-")


def _cleanup(out: Path, keep: set[str], stale_temps: bool = False) -> None:
    """Delete data files of other generations (and, at the start of a build, temp files left by a
    crashed one). Only names this module creates are touched."""
    for p in out.iterdir():
        name = p.name
        ours = name.startswith(_DATA_PREFIXES) and name.endswith((".npy", ".jsonl"))
        temp = stale_temps and name.startswith(".") and name.endswith(".tmp") and (
            name[1:].startswith(_DATA_PREFIXES) or name.startswith((".staging-", f".{META_FILE}."))
        )
        if (ours and name not in keep) or temp:
            try:
                p.unlink()
            except OSError:  # e.g. still memory-mapped on Windows; removed by a later build
                pass


def _write_index(
    out: Path,
    meta: dict[str, Any],
    records: list[_Record],
    clip: np.ndarray | str,
    frames: list[tuple[np.ndarray, int, int]] | str | None,
    frames_dtype: np.dtype,
    keep: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Write one generation and commit it by replacing meta.json. `clip` / `frames` are either data
    to write or the file name of an existing generation's array to reuse unchanged; `frames` as
    data is a list of (source (M, D) array, start row, n rows) copied in order."""
    out.mkdir(parents=True, exist_ok=True)
    gen = uuid.uuid4().hex[:12]
    data: dict[str, str | None] = {}
    dim = int(meta["dim"])
    if isinstance(clip, str):
        data["clip"] = clip
    else:
        data["clip"] = f"clip-{gen}.npy"
        with atomic_path(out / data["clip"]) as tmp, open(tmp, "wb") as f:
            np.save(f, clip)
    if frames is None:
        data["frames"] = None
    elif isinstance(frames, str):
        data["frames"] = frames
    else:
        total = sum(n for _, _, n in frames)
        data["frames"] = f"frames-{gen}.npy"
        with atomic_path(out / data["frames"]) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=frames_dtype, shape=(total, dim))
            cur = 0
            for src, start, n in frames:
                if n:
                    mm[cur : cur + n] = src[start : start + n]
                    cur += n
            mm.flush()
            del mm
    data["files"] = f"files-{gen}.jsonl"
    with atomic_path(out / data["files"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    meta = dict(meta, generation=gen, data=data, count=len(records), updated=_utc_now())
    meta["n_frames_total"] = int(sum(r.n_frames for r in records)) if data["frames"] else 0
    write_json_atomic(out / META_FILE, meta)  # the commit point
    _cleanup(out, keep={v for v in data.values() if v} | set(keep))
    return meta


# ----------------------------------------------------------------------------- the index


class Index:
    """A searchable set of clip (and optionally frame) embeddings of the audio files under a root.

    Create with `Index.build(root, embedder, out)` (incremental), open with `Index.load(out)`,
    query with `index.search("a door slams", k=10, embedder=...)`.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        records: Sequence[_Record],
        clip: np.ndarray,
        frames: np.ndarray | None,
        directory: Path | None = None,
        backend: Backend = "auto",
        embedder: Any | None = None,
    ) -> None:
        self.meta = meta
        self.records = records
        self.clip = clip  # (N, D), memory-mapped when loaded from disk
        self.frames = frames  # (sum T, D) float16 memmap or None
        self.directory = directory
        self.embedder = embedder
        self.report: BuildReport | None = None
        self._backend_name: Backend = backend
        self._backend: _NumpyBackend | _FaissBackend | None = None
        if embedder is not None:
            self._check_embedder(embedder)

    # -------------------------------------------------------------- properties
    @property
    def embedder_id(self) -> str:
        return str(self.meta["embedder_id"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def embedder_info(self) -> dict[str, Any]:
        """What the embedder said about itself at build time (e.g. {"checkpoint": path}); {} if nothing."""
        return dict(self.meta.get("embedder_info") or {})

    @property
    def root(self) -> Path | None:
        r = self.meta.get("root")
        return Path(r) if r else None

    @property
    def paths(self) -> list[str]:
        """Indexed files, relative to the root, in row order."""
        return [r.path for r in self.records]

    @property
    def failed(self) -> list[dict[str, str]]:
        """Files the last build could not embed: [{"path", "error"}]."""
        return list(self.meta.get("failed", []))

    @property
    def backend(self) -> str:
        return self._get_backend().name

    def __len__(self) -> int:
        return len(self.records)

    def info(self) -> dict[str, Any]:
        """Summary for `finelap index info`-style output."""
        keys = ("embedder_id", "embedder_info", "dim", "count", "root", "with_frames", "clip_dtype", "n_frames_total", "created", "updated", "last_build")
        return {k: self.meta.get(k) for k in keys} | {"failed": len(self.failed), "backend": self._resolved_backend()}

    def _resolved_backend(self) -> str:
        if self._backend is not None:
            return self._backend.name
        if self._backend_name == "auto":
            return "faiss" if faiss_available() and len(self) else "numpy"
        return self._backend_name

    # -------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | Path, embedder: Any | None = None, backend: Backend = "auto") -> "Index":
        """Open an index directory. Arrays are memory-mapped; the search backend is set up on the
        first query. With `embedder`, its embedder_id must match the index's (CheckpointError)."""
        out = Path(path)
        if out.is_file():
            raise FinelapError(f"{out}: is a file; an index is a directory with {META_FILE}")
        meta = _read_meta(out)
        n, d = int(meta["count"]), int(meta["dim"])
        data = meta["data"]
        records = _read_records(out / data["files"], n)
        clip = _load_array(out / data["clip"], (n, d))
        frames = None
        if data.get("frames"):
            frames = _load_array(out / data["frames"], (int(meta.get("n_frames_total", 0)), d))
        return cls(meta, records, clip, frames, directory=out, backend=backend, embedder=embedder)

    @classmethod
    def from_arrays(
        cls,
        clip: np.ndarray,
        paths: Sequence[str],
        embedder_id: str,
        root: str | Path | None = None,
        durations: Sequence[float | None] | None = None,
        backend: Backend = "auto",
    ) -> "Index":
        """An in-memory index from precomputed clip embeddings (N, D) (rows are L2-normalised here)
        and their paths (relative to `root`). No frames, so hits get no spans. `save()` writes it;
        a later `build` over `root` with the same embedder re-embeds these rows (no stored hashes)."""
        clip = np.asarray(clip)
        if clip.ndim != 2 or clip.shape[0] != len(paths):
            raise ValueError(f"clip must be (N, D) with N = len(paths) = {len(paths)}, got {clip.shape}")
        clip = _l2_normalize_rows(clip)
        durs = list(durations) if durations is not None else [None] * len(paths)
        records = [_Record(str(p), "", 0, 0, d) for p, d in zip(paths, durs)]
        meta = cls._new_meta(embedder_id, clip.shape[1], root, with_frames=False, clip_dtype="float32")
        meta["count"] = len(records)
        return cls(meta, records, clip, None, backend=backend)

    @staticmethod
    def _new_meta(embedder_id: str, dim: int, root: str | Path | None, with_frames: bool, clip_dtype: str) -> dict[str, Any]:
        from ._version import __version__

        now = _utc_now()
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "finelap_version": __version__,
            "embedder_id": embedder_id,
            "dim": int(dim),
            "count": 0,
            "root": None if root is None else str(Path(root).resolve()),
            "with_frames": bool(with_frames),
            "clip_dtype": clip_dtype,
            "frames_dtype": "float16",
            "created": now,
            "updated": now,
            "failed": [],
            "last_build": None,
        }

    def save(self, path: str | Path) -> None:
        """Write this index to a directory (atomically, like build)."""
        out = Path(path)
        frames: list[tuple[np.ndarray, int, int]] | None = None
        if self.frames is not None:
            frames = [(self.frames, r.frame_start, r.n_frames) for r in self.records]
        recs, cur = [], 0
        for r in self.records:
            recs.append(replace(r, frame_start=cur if frames is not None else 0))
            cur += r.n_frames if frames is not None else 0
        clip = np.asarray(self.clip, dtype=np.float16 if self.meta.get("clip_dtype") == "float16" else np.float32)
        self.meta = _write_index(out, self.meta, recs, clip, frames, np.dtype(np.float16))
        self.records, self.directory = recs, out

    # -------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        root_dir: str | Path,
        embedder: Embedder,
        out_path: str | Path,
        with_frames: bool = False,
        extensions: Iterable[str] = AUDIO_EXTENSIONS,
        batch_size: int = 16,
        rebuild: bool = False,
        rehash: bool = False,
        clip_dtype: Literal["float32", "float16"] = "float32",
        include_hidden: bool = False,
        checkpoint_every_s: float | None = 600.0,
        backend: Backend = "auto",
        show_progress: bool | None = None,
    ) -> "Index":
        """Embed the audio files under `root_dir` (recursively) into an index directory `out_path`.

        Re-running it updates the index in place: only new or changed files are embedded, deleted
        files are dropped, moved/duplicated content reuses stored embeddings. `rebuild=True`
        ignores any existing index (required to switch embedders; otherwise an index built by a
        different embedder_id raises CheckpointError). `rehash=True` hashes every file instead of
        trusting unchanged size + mtime. Failed files are skipped with a warning, listed in
        `index.report.failed` and meta.json, and retried on the next run. Progress is committed
        every `checkpoint_every_s` seconds and on Ctrl-C, so an interrupted build resumes.
        Returns the loaded Index; its `report` (BuildReport) has the counts.
        """
        t0 = time.perf_counter()
        root = Path(root_dir)
        if not root.is_dir():
            raise FinelapError(f"{root}: not a directory (index build needs a folder of audio files)")
        root = root.resolve()
        out = Path(out_path)
        if out.exists() and not out.is_dir():
            raise FinelapError(f"{out}: exists and is not a directory; choose another --out")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if clip_dtype not in ("float32", "float16"):
            raise ValueError(f"clip_dtype must be 'float32' or 'float16', got {clip_dtype!r}")
        eid = _embedder_id(embedder)
        disable = None if show_progress is None else not show_progress

        old: Index | None = None
        if out.is_dir() and (out / META_FILE).exists() and not rebuild:
            old = cls.load(out)
            if old.embedder_id != eid:
                raise CheckpointError(
                    f"{out}: index was built with checkpoint '{old.embedder_id}', not '{eid}'; "
                    f"rebuild with --rebuild (re-embeds every file) or use checkpoint '{old.embedder_id}'"
                )
        out.mkdir(parents=True, exist_ok=True)
        # keep whatever meta.json points at until our own commit replaces it (also under --rebuild,
        # so a crash before the first commit leaves the previous index usable)
        try:
            current = {v for v in _read_meta(out)["data"].values() if v}
        except FinelapError:
            current = set()
        _cleanup(out, keep=current, stale_temps=True)

        builder = _Builder(root, out, embedder, eid, old, with_frames, batch_size, rehash, clip_dtype, disable)
        try:
            builder.scan(extensions, include_hidden)
            builder.embed(checkpoint_every_s)
            builder.report.seconds = time.perf_counter() - t0
            builder.commit(final=True)
        except KeyboardInterrupt:
            # save what was embedded; an interrupt while hashing saves nothing (unscanned files
            # would look deleted)
            if builder.scanned and builder.report.embedded:
                builder.report.interrupted = True
                builder.report.seconds = time.perf_counter() - t0
                builder.commit(final=False)
                log(f"interrupted: saved {builder.report.total} files to {out}; re-run the same command to continue")
            raise
        finally:
            builder.close()
        index = cls.load(out, embedder=embedder, backend=backend)
        index.report = builder.report
        return index

    # -------------------------------------------------------------- search
    def _check_embedder(self, embedder: Any) -> None:
        eid = _embedder_id(embedder)
        if eid != self.embedder_id:
            where = f"{self.directory}: " if self.directory else ""
            raise CheckpointError(
                f"{where}index was built with checkpoint '{self.embedder_id}' but the query model is '{eid}'; "
                f"search with checkpoint '{self.embedder_id}' or rebuild the index with --rebuild"
            )

    def _get_backend(self) -> _NumpyBackend | _FaissBackend:
        if self._backend is None:
            clip = self.clip if self.clip.dtype == np.float32 else np.asarray(self.clip, dtype=np.float32)
            self._backend = _make_backend(clip, self._backend_name)
            if isinstance(self.clip, np.memmap):
                # the backend holds its own copy; drop the mapping whose pages it just read, or
                # they count twice in the resident set (1 GB at 1e6 x 256)
                if isinstance(self._backend, _NumpyBackend) and self.clip.dtype == np.float32:
                    self.clip = self._backend.mat
                elif self.directory is not None:
                    self.clip = np.load(self.directory / self.meta["data"]["clip"], mmap_mode="r")
        return self._backend

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product. queries (Q, D) float, L2-normalised -> (scores (Q, k'),
        rows (Q, k')) with k' = min(k, len(self)), best first, ties broken by lower row."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        return self._get_backend().search(np.ascontiguousarray(q), k)

    def frame_embeddings(self, row: int) -> np.ndarray | None:
        """(T, D) float32 frame embeddings of one row, or None when not stored."""
        r = self.records[row]
        if self.frames is None or r.n_frames == 0:
            return None
        return np.asarray(self.frames[r.frame_start : r.frame_start + r.n_frames], dtype=np.float32)

    def search(
        self,
        query: str | Sequence[str],
        k: int = 10,
        embedder: Any | None = None,
        *,
        spans: bool = True,
        span_config: SpanConfig = SpanConfig(),
    ) -> list[Hit] | list[list[Hit]]:
        """Rank files by clip cosine with the query text(s).

        Returns list[Hit] (best first, at most k) for one string, list[list[Hit]] for a list of
        strings. With stored frames and `spans`, each hit has its best-matching span (seconds).
        `embedder` defaults to the one given to load/build; its embedder_id must match.
        """
        emb = embedder if embedder is not None else self.embedder
        if emb is None:
            raise ValueError("search needs an embedder (pass embedder=..., or Index.load(path, embedder=...))")
        self._check_embedder(emb)
        single = isinstance(query, str)
        texts = [query] if single else list(query)  # type: ignore[list-item]
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise FinelapError(f"empty search query {t!r}; give some words, e.g. \"a door slams\"")
        if not texts:
            return []
        if len(self) == 0:
            return [] if single else [[] for _ in texts]
        q = np.asarray(emb.embed_text(texts), dtype=np.float32)
        if q.shape != (len(texts), self.dim):
            raise ValueError(f"embed_text returned shape {q.shape}, expected ({len(texts)}, {self.dim})")
        q = _l2_normalize_rows(q)
        scores, rows = self.search_vectors(q, k)
        scorer = getattr(emb, "frame_scores_from_embeddings", None)
        root = self.root
        out: list[list[Hit]] = []
        for qi in range(len(texts)):
            hits = []
            for rank, (s, row) in enumerate(zip(scores[qi], rows[qi]), 1):
                row = int(row)
                if row < 0:  # faiss pads with -1 when fewer than k rows exist
                    continue
                rec = self.records[row]
                span, span_score = None, None
                if spans and rec.frame_rate_hz:
                    fr = self.frame_embeddings(row)
                    if fr is not None:
                        curve = scorer(q[qi], fr) if scorer is not None else fr @ q[qi]
                        span, peak = best_span(np.asarray(curve).reshape(-1), rec.frame_rate_hz, rec.duration_s, span_config)
                        span_score = None if math.isnan(peak) else peak
                path = (root / rec.path) if root is not None else Path(rec.path)
                hits.append(Hit(path, float(s), span, span_score, rec.path, rec.duration_s, rank))
            out.append(hits)
        return out[0] if single else out


# ----------------------------------------------------------------------------- build machinery


class _Builder:
    """State of one incremental build: what is on disk (old index), what is in the folder, and the
    embeddings computed so far (clip rows in memory, frames appended to a staging file so memory
    stays bounded for large folders)."""

    def __init__(
        self,
        root: Path,
        out: Path,
        embedder: Embedder,
        eid: str,
        old: Index | None,
        with_frames: bool,
        batch_size: int,
        rehash: bool,
        clip_dtype: str,
        disable_progress: bool | None,
    ) -> None:
        self.root, self.out, self.embedder, self.eid, self.old = root, out, embedder, eid, old
        self.with_frames, self.batch_size, self.rehash = with_frames, batch_size, rehash
        self.clip_dtype = np.dtype(clip_dtype)
        self.disable = disable_progress
        self.dim: int | None = old.dim if old is not None and len(old) else None
        self.report = BuildReport()
        # per current file (sorted): rel path, stat (size, mtime_ns), hash or None, status
        self.files: list[tuple[str, Path, int, int]] = []
        self.hashes: dict[str, str] = {}
        self.status: dict[str, str] = {}  # rel -> unchanged / added / updated / failed
        self.source: dict[str, tuple[str, int]] = {}  # rel -> ("old", row) | ("new", slot)
        self.failed: dict[str, str] = {}
        self.todo: list[tuple[str, list[str]]] = []  # (hash, [rel paths with that content]) to embed
        self.new_clip: list[np.ndarray] = []
        self.new_meta: list[tuple[int, int, float | None, float | None]] = []  # frame start, n, rate, duration
        self.staging_path = out / f".staging-{uuid.uuid4().hex[:12]}.tmp"
        self.staging = None
        self.staged_rows = 0
        self._staging_view: np.ndarray | None = None
        self.scanned = False

    # ---------------------------------------------------------- scan
    def _reusable(self, rec: _Record) -> bool:
        return rec.hash != "" and (rec.with_frames or not self.with_frames)

    def scan(self, extensions: Iterable[str], include_hidden: bool) -> None:
        old = self.old
        old_rows = {r.path: i for i, r in enumerate(old.records)} if old else {}
        old_by_hash: dict[str, int] = {}
        if old:
            for i, r in enumerate(old.records):
                if self._reusable(r):
                    old_by_hash.setdefault(r.hash, i)
        paths = scan_audio_files(self.root, extensions, exclude=[self.out], include_hidden=include_hidden)
        if not paths:
            log(f"warning: no audio files ({', '.join(_norm_extensions(extensions))}) found under {self.root}")
        seen: set[str] = set()
        pending: dict[str, list[str]] = {}
        for p in progress(paths, total=len(paths), desc="hashing", disable=self.disable):
            rel = p.relative_to(self.root).as_posix()
            seen.add(rel)
            row = old_rows.get(rel)
            rec = old.records[row] if (old and row is not None) else None
            try:
                st = p.stat()
                size, mtime = st.st_size, st.st_mtime_ns
                if rec is not None and self._reusable(rec) and not self.rehash and rec.size == size and rec.mtime_ns == mtime:
                    h = rec.hash
                else:
                    h = file_hash(p)
            except OSError as e:
                self._fail(rel, _unreadable_reason(p, e))
                continue
            self.files.append((rel, p, size, mtime))
            self.hashes[rel] = h
            if rec is not None and self._reusable(rec) and rec.hash == h:
                self.status[rel] = "unchanged"
                self.source[rel] = ("old", row)  # type: ignore[assignment]
                continue
            self.status[rel] = "updated" if rec is not None else "added"
            if h in old_by_hash:
                self.source[rel] = ("old", old_by_hash[h])
                self.report.reused += 1
            else:
                pending.setdefault(h, []).append(rel)
        self.todo = list(pending.items())
        self.report.removed = sum(1 for rel in old_rows if rel not in seen)
        self.scanned = True

    def _fail(self, rel: str, error: str) -> None:
        error = " ".join(str(error).split()) or "unknown error"
        self.failed[rel] = error
        self.status[rel] = "failed"
        self.source.pop(rel, None)
        log(f"warning: skipped {rel}: {error}")

    # ---------------------------------------------------------- embed
    def _embed_batch(self, batch: list[tuple[str, list[str]]]) -> None:
        by_path = {self.root / rels[0]: (h, rels) for h, rels in batch}
        got: dict[Path, EmbedResult] = {}
        paths = list(by_path)
        try:
            for res in self.embedder.embed_files(paths, with_frames=self.with_frames):
                got[Path(res.path)] = res
        except FinelapError:
            # the embedder raised for a file instead of reporting it: find which, one file at a time
            for p in paths:
                if p in got:
                    continue
                try:
                    for res in self.embedder.embed_files([p], with_frames=self.with_frames):
                        got[Path(res.path)] = res
                except FinelapError as e:  # AudioError already names the file: keep just the problem
                    got[p] = EmbedResult(p, error=str(getattr(e, "problem", None) or e))
        unknown = [str(p) for p in got if p not in by_path]
        if unknown:
            raise ValueError(f"{type(self.embedder).__name__}.embed_files returned results for paths it was not given: {unknown[:3]}")
        for p, (h, rels) in by_path.items():
            res = got.get(p)
            err = "embedder returned no result for this file" if res is None else self._accept(res, p)
            if err is not None:
                for rel in rels:
                    self._fail(rel, err)
                continue
            slot = len(self.new_clip) - 1
            self.report.embedded += 1
            for rel in rels:
                self.source[rel] = ("new", slot)
            self.report.reused += len(rels) - 1

    def _accept(self, res: EmbedResult, p: Path) -> str | None:
        """Validate one result and stage it; returns an error string for a per-file failure.
        Contract violations (wrong shapes) are embedder bugs and raise ValueError."""
        name = type(self.embedder).__name__
        if res.error is not None:
            return res.error
        if res.clip_embedding is None:
            return "embedder returned neither an embedding nor an error"
        c = np.asarray(res.clip_embedding)
        if c.ndim == 2 and c.shape[0] == 1:  # tolerate (1, D)
            c = c[0]
        if c.ndim != 1 or c.shape[0] == 0:
            raise ValueError(f"{name}: clip_embedding for {p} must be (D,), got {np.shape(res.clip_embedding)}")
        c = c.astype(np.float32)
        if self.dim is None:
            self.dim = int(c.shape[0])
        if c.shape[0] != self.dim:
            raise ValueError(f"{name}: clip_embedding for {p} has dim {c.shape[0]}, index dim is {self.dim}")
        norm = float(np.linalg.norm(c))
        if not np.isfinite(c).all() or norm == 0.0:
            return "embedder produced a non-finite or zero embedding"
        n_frames, rate = 0, None
        fr = None
        if self.with_frames and res.frame_embeddings is not None:
            fr = np.asarray(res.frame_embeddings, dtype=np.float32)
            if fr.ndim != 2 or fr.shape[1] != self.dim:
                raise ValueError(f"{name}: frame_embeddings for {p} must be (T, {self.dim}), got {fr.shape}")
            if not (res.frame_rate_hz and res.frame_rate_hz > 0):
                raise ValueError(f"{name}: frame_embeddings for {p} need a positive frame_rate_hz, got {res.frame_rate_hz}")
            if not np.isfinite(fr).all():
                return "embedder produced non-finite frame embeddings"
            fr = _l2_normalize_rows(fr)
            n_frames, rate = int(fr.shape[0]), float(res.frame_rate_hz)
        start = self.staged_rows
        if fr is not None and n_frames:
            if self.staging is None:
                self.staging = open(self.staging_path, "wb")
            self.staging.write(np.ascontiguousarray(fr, dtype=np.float16).tobytes())
            self.staged_rows += n_frames
            self._staging_view = None
        dur = None if res.duration_s is None else float(res.duration_s)
        self.new_clip.append(c / norm)
        self.new_meta.append((start, n_frames, rate, dur))
        return None

    def embed(self, checkpoint_every_s: float | None) -> None:
        batches = [self.todo[i : i + self.batch_size] for i in range(0, len(self.todo), self.batch_size)]
        last = time.monotonic()
        n = sum(len(b) for b in batches)
        bar = progress(range(n), total=n, desc="embedding", disable=self.disable)
        next(bar, None)  # start the bar; each later next() advances it by one file
        for batch in batches:
            self._embed_batch(batch)
            for _ in batch:
                next(bar, None)
            if checkpoint_every_s is not None and time.monotonic() - last >= checkpoint_every_s:
                self.commit(final=False)
                last = time.monotonic()

    # ---------------------------------------------------------- commit
    def _staged_frames(self) -> np.ndarray | None:
        if self.staging is None or self.staged_rows == 0 or self.dim is None:
            return None
        self.staging.flush()
        if self._staging_view is None:
            self._staging_view = np.memmap(self.staging_path, dtype=np.float16, mode="r", shape=(self.staged_rows, self.dim))
        return self._staging_view

    def commit(self, final: bool) -> None:
        """Write the current state. Rows: files whose embedding is known (unchanged, reused, or
        embedded so far). In a partial (checkpoint) commit, changed files not embedded yet keep
        their old row with the old hash and stat, so the next run still sees them as changed."""
        old = self.old
        rows: list[tuple[_Record, tuple[str, int]]] = []
        old_rows = {r.path: i for i, r in enumerate(old.records)} if old else {}
        for rel, _p, size, mtime in self.files:
            src = self.source.get(rel)
            if src is None:
                if not final and self.status.get(rel) == "updated" and rel in old_rows:
                    i = old_rows[rel]
                    rows.append((old.records[i], ("old", i)))  # type: ignore[union-attr]
                continue
            kind, i = src
            if kind == "old":
                o = old.records[i]  # type: ignore[union-attr]
                rec = replace(o, path=rel, hash=self.hashes[rel], size=size, mtime_ns=mtime)
            else:
                start, n, rate, dur = self.new_meta[i]
                rec = _Record(rel, self.hashes[rel], size, mtime, dur, start, n, rate, self.with_frames)
            rows.append((rec, src))

        dim = self.dim if self.dim is not None else (old.dim if old else 0)
        keep_frames = self.with_frames
        recs: list[_Record] = []
        frame_parts: list[tuple[np.ndarray, int, int]] = []
        staged = self._staged_frames()
        cur = 0
        for rec, (kind, i) in rows:
            n = rec.n_frames if keep_frames else 0
            src_arr = (old.frames if kind == "old" else staged) if n else None  # type: ignore[union-attr]
            if n and src_arr is None:  # old index without frames array: drop the frame info
                n = 0
            if n:
                frame_parts.append((src_arr, rec.frame_start, n))  # type: ignore[arg-type]
            recs.append(replace(rec, frame_start=cur, n_frames=n, frame_rate_hz=rec.frame_rate_hz if n else None,
                                with_frames=rec.with_frames and keep_frames))
            cur += n

        meta = dict(old.meta) if old else Index._new_meta(self.eid, dim, self.root, self.with_frames, self.clip_dtype.name)
        meta.update(embedder_id=self.eid, dim=int(dim), root=str(self.root), with_frames=self.with_frames, clip_dtype=self.clip_dtype.name)
        info = getattr(self.embedder, "embedder_info", None)
        if isinstance(info, dict):
            meta["embedder_info"] = json.loads(json.dumps(info, default=str))
        meta["failed"] = [{"path": rel, "error": err} for rel, err in sorted(self.failed.items())]
        self._finish_report(rows, final)
        meta["last_build"] = self.report.counts()

        # reuse the old arrays untouched when the rows are exactly the old rows in the old order
        sources = [src for _, src in rows]
        same_rows = (
            old is not None
            and len(rows) == len(old)
            and all(k == "old" and i == j for j, (k, i) in enumerate(sources))
        )
        if same_rows and old.clip.dtype == self.clip_dtype:  # type: ignore[union-attr]
            clip: np.ndarray | str = old.meta["data"]["clip"]  # type: ignore[union-attr]
        else:
            clip = np.empty((len(rows), dim), dtype=self.clip_dtype)
            old_pos = [j for j, (k, _) in enumerate(sources) if k == "old"]
            new_pos = [j for j, (k, _) in enumerate(sources) if k == "new"]
            if old_pos:
                clip[old_pos] = old.clip[[sources[j][1] for j in old_pos]]  # type: ignore[union-attr]
            if new_pos:
                clip[new_pos] = np.stack([self.new_clip[sources[j][1]] for j in new_pos])
        frames: list[tuple[np.ndarray, int, int]] | str | None
        if not keep_frames:
            frames = None
        elif same_rows and old.meta["data"].get("frames") and [r.n_frames for r in recs] == [r.n_frames for r in old.records]:  # type: ignore[union-attr]
            frames = old.meta["data"]["frames"]  # type: ignore[union-attr]
        else:
            frames = frame_parts
        # the old generation stays on disk until the final commit: its memmaps are still being read
        keep = set() if final or old is None else {v for v in old.meta["data"].values() if v}
        _write_index(self.out, meta, recs, clip, frames, np.dtype(np.float16), keep=keep)

    def _finish_report(self, rows: list, final: bool) -> None:
        r = self.report
        r.total = len(rows)
        r.failed = [{"path": rel, "error": err} for rel, err in sorted(self.failed.items())]
        r.unchanged = sum(1 for s in self.status.values() if s == "unchanged")
        r.added = sum(1 for rel, s in self.status.items() if s == "added" and rel in self.source)
        r.updated = sum(1 for rel, s in self.status.items() if s == "updated" and rel in self.source)

    def close(self) -> None:
        self._staging_view = None
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        try:
            self.staging_path.unlink()
        except FileNotFoundError:
            pass
