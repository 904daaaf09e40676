"""Search index: build, incremental rebuild, failures, backends, spans, embedder mismatch, atomicity.

The fake embedder below "understands" generated tone files: an embedding is the energy in 16 bands
of 250 Hz (8 kHz audio), and the text "875" embeds as the band holding 875 Hz. So which file (and
which time span) matches a query is known exactly from how the test wrote the audio.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest
import soundfile as sf

import finelap.search as search_mod
from finelap.audio import load_audio
from finelap.errors import AudioError, CheckpointError, DataFormatError, FinelapError
from finelap.search import (
    EmbedResult,
    Index,
    SpanConfig,
    best_span,
    file_hash,
    scan_audio_files,
)

SR = 8000
BAND_HZ = 250.0
N_BANDS = 16
FRAME_RATE = 10.0  # the fake encoder's frame rate: 800-sample frames
HOP = int(SR / FRAME_RATE)


def center(band: int) -> float:
    return band * BAND_HZ + BAND_HZ / 2


class ToneEmbedder:
    """Deterministic embedder for tone files; records which files it was asked to embed."""

    def __init__(self, embedder_id: str = "tone-v1", raise_on_bad: bool = False) -> None:
        self._id = embedder_id
        self.calls: list[str] = []
        self.raise_on_bad = raise_on_bad
        self.text_calls = 0
        self.embedder_info = {"checkpoint": "/ckpt/tone", "sample_rate": SR}

    @property
    def embedder_id(self) -> str:
        return self._id

    @staticmethod
    def _bands(frames: np.ndarray) -> np.ndarray:
        """frames (T, HOP) -> band energies (T, N_BANDS)."""
        spec = np.abs(np.fft.rfft(frames * np.hanning(HOP), axis=-1)) ** 2
        freqs = np.fft.rfftfreq(HOP, 1 / SR)
        band = np.minimum((freqs // BAND_HZ).astype(int), N_BANDS - 1)
        out = np.zeros((frames.shape[0], N_BANDS))
        for b in range(N_BANDS):
            out[:, b] = spec[:, band == b].sum(-1)
        return out + 1e-9  # silence -> a flat vector, cosine 0.25 with any one-band query

    def embed_files(self, paths: list[Path], *, with_frames: bool = False) -> Iterator[EmbedResult]:
        for p in paths:
            self.calls.append(Path(p).name)
            try:
                x = load_audio(p, sample_rate=SR)
            except AudioError as e:
                if self.raise_on_bad:
                    raise
                yield EmbedResult(p, error=e.problem)
                continue
            t = -(-len(x) // HOP)
            fr = np.zeros(t * HOP, np.float64)
            fr[: len(x)] = x
            bands = self._bands(fr.reshape(t, HOP))
            clip = bands.sum(0)
            frames = bands / np.linalg.norm(bands, axis=1, keepdims=True)
            yield EmbedResult(
                p,
                clip_embedding=(clip / np.linalg.norm(clip)).astype(np.float32),
                frame_embeddings=frames.astype(np.float32) if with_frames else None,
                frame_rate_hz=FRAME_RATE if with_frames else None,
                duration_s=len(x) / SR,
            )

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        self.text_calls += 1
        out = np.zeros((len(texts), N_BANDS), np.float32)
        for i, t in enumerate(texts):
            out[i, int(float(re.findall(r"[\d.]+", t)[0]) // BAND_HZ)] = 1.0
        return out


def write_tones(path: Path, parts: Sequence[tuple[float, float]], amp: float = 0.5) -> Path:
    """Write a wav made of consecutive (frequency_hz or 0 for silence, seconds) parts."""
    chunks = []
    for f, dur in parts:
        n = int(round(dur * SR))
        t = np.arange(n) / SR
        chunks.append(np.zeros(n) if f == 0 else amp * np.sin(2 * np.pi * f * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.concatenate(chunks).astype(np.float32), SR, subtype="FLOAT")
    return path


def write_mix(path: Path, freqs: Sequence[float], dur: float = 1.0) -> Path:
    t = np.arange(int(dur * SR)) / SR
    x = sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), SR, subtype="FLOAT")
    return path


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    write_tones(root / "a" / "low.wav", [(center(1), 1.0)])
    write_tones(root / "b" / "mid.wav", [(center(4), 1.0)])
    write_mix(root / "b" / "mix.wav", [center(1), center(4)])
    write_tones(root / "high.wav", [(center(10), 1.0)])
    (root / "notes.txt").write_text("not audio")
    return root


def build(root: Path, emb: ToneEmbedder, out: Path, **kw) -> Index:
    kw.setdefault("show_progress", False)
    return Index.build(root, emb, out, **kw)


# ----------------------------------------------------------------------------- build + search


class ProtocolOnlyEmbedder:
    """An Embedder written from the protocol alone (no base class): it answers a batch in reverse
    order (the contract allows any order) and reports `corrupt` files as errors. `flaw` makes it
    break the contract in one way: "no_id", "skip" (drops a file), "foreign" (answers for a path
    it was not given)."""

    embedder_id = "protocol-only"

    def __init__(self, flaw: str = "") -> None:
        self.tones = ToneEmbedder()
        self.flaw = flaw
        if flaw == "no_id":
            self.embedder_id = ""

    def embed_files(self, paths: list[Path], *, with_frames: bool = False) -> Iterator[EmbedResult]:
        results = list(self.tones.embed_files(paths, with_frames=with_frames))[::-1]
        if self.flaw == "skip":
            results = [r for r in results if Path(r.path).name != "mid.wav"]
        if self.flaw == "foreign":
            results[0] = EmbedResult(Path(results[0].path).with_name("other.wav"), clip_embedding=results[0].clip_embedding)
        yield from results

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.tones.embed_text(texts)


def test_index_works_through_any_embedder_that_keeps_the_protocol(library: Path, tmp_path: Path) -> None:
    """What the Embedder protocol promises, checked through a protocol-only implementation: results
    are matched to files by path whatever their order, so the ranking is the one the audio implies;
    each way of breaking the contract is reported, not silently indexed."""
    (library / "broken.wav").write_bytes(b"RIFF" + b"\0" * 40)
    idx = build(library, ProtocolOnlyEmbedder(), tmp_path / "idx", batch_size=8)
    assert idx.embedder_id == "protocol-only" and [f["path"] for f in idx.failed] == ["broken.wav"]
    for band, ranked in ((1, ["a/low.wav", "b/mix.wav"]), (4, ["b/mid.wav", "b/mix.wav"]), (10, ["high.wav"])):
        hits = idx.search(f"{center(band)} Hz", k=len(ranked))
        assert [h.rel_path for h in hits] == ranked, band
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    # contract violations
    with pytest.raises(TypeError, match="no usable `embedder_id`"):
        build(library, ProtocolOnlyEmbedder("no_id"), tmp_path / "x")
    skipped = build(library, ProtocolOnlyEmbedder("skip"), tmp_path / "skip", batch_size=8)
    assert "b/mid.wav" not in skipped.paths
    assert {f["path"]: f["error"] for f in skipped.failed}["b/mid.wav"] == "embedder returned no result for this file"
    with pytest.raises(ValueError, match="returned results for paths it was not given"):
        build(library, ProtocolOnlyEmbedder("foreign"), tmp_path / "foreign", batch_size=8)


def test_build_and_search_ranking(library: Path, tmp_path: Path) -> None:
    emb = ToneEmbedder()
    out = tmp_path / "idx"
    idx = build(library, emb, out)
    assert idx.paths == ["a/low.wav", "b/mid.wav", "b/mix.wav", "high.wav"]  # sorted relative paths
    assert idx.report.counts()["added"] == 4 and idx.report.embedded == 4
    hits = idx.search(f"{center(1)} Hz", k=3)
    assert [h.rel_path for h in hits] == ["a/low.wav", "b/mix.wav", hits[2].rel_path]
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[1].score == pytest.approx(2 ** -0.5, abs=0.02)  # equal energy in two bands
    assert hits[2].score < 0.05
    assert hits[0].path == library / "a" / "low.wav" and hits[0].path.exists()
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].span is None  # no frames stored
    assert hits[0].duration_s == pytest.approx(1.0)
    # several queries at once; k larger than the index is clamped
    both = idx.search([str(center(10)), str(center(4))], k=10)
    assert [len(h) for h in both] == [4, 4]
    assert both[0][0].rel_path == "high.wav" and both[1][0].rel_path == "b/mid.wav"
    # reopened from disk: same answer
    again = Index.load(out, embedder=emb).search(str(center(1)), k=3)
    assert [(h.rel_path, round(h.score, 6)) for h in again] == [(h.rel_path, round(h.score, 6)) for h in hits]
    # what the CLI prints: the hit as JSON, no time span without frames; the build in one line
    assert json.loads(json.dumps(hits[0].to_dict())) == {
        "rank": 1, "path": str(library / "a" / "low.wav"), "rel_path": "a/low.wav", "score": hits[0].score,
        "onset": None, "offset": None, "span_score": None, "duration": 1.0}  # fmt: skip
    assert idx.report.summary().startswith("4 files indexed: 4 added, 0 updated, 0 removed, 0 unchanged, 0 failed (4 embedded, 0 reused) in ")


def test_meta_and_layout(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out, with_frames=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "finelap-index" and meta["version"] == 1
    assert meta["embedder_id"] == "tone-v1" and meta["dim"] == N_BANDS and meta["count"] == 4
    assert meta["root"] == str(library.resolve()) and meta["with_frames"] is True
    assert Index.load(out).embedder_info == {"checkpoint": "/ckpt/tone", "sample_rate": SR}
    clip = np.load(out / meta["data"]["clip"])
    assert clip.shape == (4, N_BANDS) and clip.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(clip, axis=1), 1.0, atol=1e-5)
    frames = np.load(out / meta["data"]["frames"], mmap_mode="r")
    assert frames.dtype == np.float16 and frames.shape == (40, N_BANDS)  # 4 files x 1 s x 10 Hz
    rows = [json.loads(l) for l in (out / meta["data"]["files"]).read_text().splitlines()]
    assert [r["frame_start"] for r in rows] == [0, 10, 20, 30] and all(r["n_frames"] == 10 for r in rows)
    assert rows[0]["hash"] == file_hash(library / rows[0]["path"])
    # exactly one generation on disk, no temp files
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and not any(n.endswith(".tmp") for n in names)
    assert isinstance(Index.load(out).frames, np.memmap)


def test_scan_is_sorted_recursive_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for rel in ["z.WAV", "a/b/c.flac", "a/x.ogg", ".hidden/y.wav", "._z.wav", "a/readme.md"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    rels = [p.relative_to(root).as_posix() for p in scan_audio_files(root)]
    assert rels == ["a/b/c.flac", "a/x.ogg", "z.WAV"]
    assert len(scan_audio_files(root, include_hidden=True)) == 5
    assert [p.name for p in scan_audio_files(root, extensions=["flac"])] == ["c.flac"]
    assert scan_audio_files(root, exclude=[root / "a"]) == [root / "z.WAV"]


def test_file_hash_streams_and_depends_on_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    data = os.urandom(3 * 1000 + 7)
    a.write_bytes(data)
    b.write_bytes(data)
    assert file_hash(a, chunk_bytes=1000) == file_hash(b) == file_hash(a)
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_hash(a) != file_hash(b)


# ----------------------------------------------------------------------------- incremental


def test_incremental_rebuild_embeds_only_changes(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    emb = ToneEmbedder()
    idx = build(library, emb, out)
    assert emb.calls == []
    assert idx.report.counts() | {"seconds": 0} == {
        "added": 0, "updated": 0, "removed": 0, "unchanged": 4, "failed": 0, "embedded": 0, "reused": 0,
        "total": 4, "seconds": 0, "interrupted": False,
    }
    # new file, a changed file (mid.wav becomes a band-12 tone), a deleted file
    write_tones(library / "c" / "new.wav", [(center(7), 0.5)])
    write_tones(library / "b" / "mid.wav", [(center(12), 1.0)])
    (library / "high.wav").unlink()
    emb = ToneEmbedder()
    idx = build(library, emb, out)
    assert sorted(emb.calls) == ["mid.wav", "new.wav"]
    c = idx.report.counts()
    assert (c["added"], c["updated"], c["removed"], c["unchanged"], c["failed"], c["total"]) == (1, 1, 1, 2, 0, 4)
    assert idx.paths == ["a/low.wav", "b/mid.wav", "b/mix.wav", "c/new.wav"]
    assert idx.search(str(center(12)), k=1)[0].rel_path == "b/mid.wav"
    assert idx.search(str(center(7)), k=1)[0].rel_path == "c/new.wav"
    assert "high.wav" not in idx.paths
    assert json.loads((out / "meta.json").read_text())["last_build"]["removed"] == 1


def test_stat_fast_path_and_rehash(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    p = library / "a" / "low.wav"
    st = p.stat()
    write_tones(p, [(center(9), 1.0)])  # same size, different content
    assert p.stat().st_size == st.st_size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    emb = ToneEmbedder()
    assert build(library, emb, out).report.unchanged == 4 and emb.calls == []  # size+mtime trusted
    emb = ToneEmbedder()
    idx = build(library, emb, out, rehash=True)
    assert emb.calls == ["low.wav"] and idx.report.updated == 1
    assert idx.search(str(center(9)), k=1)[0].rel_path == "a/low.wav"
    # touching a file without changing it costs a hash, not an embedding
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    emb = ToneEmbedder()
    assert build(library, emb, out).report.unchanged == 4 and emb.calls == []


def test_moved_and_duplicate_files_reuse_embeddings(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    (library / "moved").mkdir()
    os.replace(library / "high.wav", library / "moved" / "high.wav")
    emb = ToneEmbedder()
    idx = build(library, emb, out)
    assert emb.calls == []
    assert (idx.report.added, idx.report.removed, idx.report.reused) == (1, 1, 1)
    assert idx.search(str(center(10)), k=1)[0].rel_path == "moved/high.wav"
    # duplicates in a fresh build are embedded once
    root2 = tmp_path / "dups"
    for name in ["x.wav", "y.wav", "z.wav"]:
        write_tones(root2 / name, [(center(3), 0.5)])
    emb = ToneEmbedder()
    idx2 = build(root2, emb, tmp_path / "idx2")
    assert len(emb.calls) == 1 and len(idx2) == 3 and idx2.report.reused == 2 and idx2.report.added == 3
    np.testing.assert_array_equal(idx2.clip[0], idx2.clip[2])


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("raise_on_bad", [False, True])
def test_corrupt_and_empty_files_are_skipped_and_reported(
    library: Path, tmp_path: Path, capsys: pytest.CaptureFixture, raise_on_bad: bool
) -> None:
    (library / "bad.wav").write_bytes(b"RIFF this is not audio at all" * 10)
    (library / "empty.flac").write_bytes(b"")
    out = tmp_path / "idx"
    emb = ToneEmbedder(raise_on_bad=raise_on_bad)  # True: the embedder raises instead of reporting
    idx = build(library, emb, out)
    assert len(idx) == 4 and "bad.wav" not in idx.paths
    failed = {f["path"]: f["error"] for f in idx.report.failed}
    assert set(failed) == {"bad.wav", "empty.flac"}
    assert "corrupt" in failed["bad.wav"] and "empty" in failed["empty.flac"]
    assert idx.failed == idx.report.failed  # persisted in meta.json
    err = capsys.readouterr().err
    assert "warning: skipped bad.wav" in err and "warning: skipped empty.flac" in err
    # retried on the next run (may have been fixed), still failing, good files untouched
    emb = ToneEmbedder(raise_on_bad=raise_on_bad)
    idx = build(library, emb, out)
    assert set(emb.calls) == {"bad.wav", "empty.flac"} and idx.report.unchanged == 4
    # fixed -> indexed and no longer listed
    write_tones(library / "bad.wav", [(center(14), 0.5)])
    idx = build(library, ToneEmbedder(raise_on_bad=raise_on_bad), out)
    assert [f["path"] for f in idx.failed] == ["empty.flac"]
    assert idx.search(str(center(14)), k=1)[0].rel_path == "bad.wav"


def test_changed_file_that_now_fails_loses_its_old_row(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    (library / "high.wav").write_bytes(b"garbage" * 100)
    idx = build(library, ToneEmbedder(), out)
    assert "high.wav" not in idx.paths and [f["path"] for f in idx.failed] == ["high.wav"]
    assert idx.report.removed == 0 and len(idx.report.failed) == 1


def test_bad_embedder_output_is_a_clear_error(library: Path, tmp_path: Path) -> None:
    class WrongShape(ToneEmbedder):
        def embed_files(self, paths, *, with_frames=False):
            for r in super().embed_files(paths, with_frames=with_frames):
                r.clip_embedding = np.ones((3, 3), np.float32)
                yield r

    with pytest.raises(ValueError, match=r"clip_embedding for .* must be \(D,\)"):
        build(library, WrongShape(), tmp_path / "idx")


def test_not_a_directory_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FinelapError, match="not a directory"):
        build(tmp_path / "nope", ToneEmbedder(), tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    idx = build(tmp_path / "empty", ToneEmbedder(), tmp_path / "idx")
    assert len(idx) == 0 and idx.search("875") == [] and idx.search(["875", "375"]) == [[], []]
    assert len(Index.load(tmp_path / "idx")) == 0


# ----------------------------------------------------------------------------- backends


def _random_index(n: int, d: int, seed: int, backend: str) -> Index:
    rng = np.random.default_rng(seed)
    return Index.from_arrays(rng.standard_normal((n, d)), [f"f{i}.wav" for i in range(n)], "rand", backend=backend)


def test_faiss_and_numpy_give_identical_topk() -> None:
    pytest.importorskip("faiss")
    n, d, k = 3000, 32, 10
    rng = np.random.default_rng(1)
    q = rng.standard_normal((40, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    fa, nu = _random_index(n, d, 0, "faiss"), _random_index(n, d, 0, "numpy")
    assert fa.backend == "faiss" and nu.backend == "numpy"
    sf_, if_ = fa.search_vectors(q, k)
    sn, in_ = nu.search_vectors(q, k)
    np.testing.assert_array_equal(if_, in_)
    np.testing.assert_allclose(sf_, sn, atol=1e-5)
    # both equal a brute-force full sort
    ref = np.argsort(-(q @ np.asarray(nu.clip).T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(in_, ref)
    # one query at a time (faiss' non-BLAS path) agrees too
    for i in range(5):
        np.testing.assert_array_equal(fa.search_vectors(q[i], k)[1][0], in_[i])


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_ties_break_by_row_and_k_is_clamped(backend: str) -> None:
    if backend == "faiss":
        pytest.importorskip("faiss")
    clip = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], np.float32)
    idx = Index.from_arrays(clip, [f"{i}" for i in range(5)], "x", backend=backend)
    s, r = idx.search_vectors(np.array([1.0, 0.0]), k=3)
    assert r.tolist() == [[0, 2, 3]] and s[0].tolist() == pytest.approx([1, 1, 1])
    s, r = idx.search_vectors(np.array([1.0, 0.0]), k=50)
    assert r.tolist() == [[0, 2, 3, 4, 1]]


def test_backend_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    idx = _random_index(10, 4, 0, "numpy")
    with pytest.raises(ValueError, match=r"queries must be \(Q, 4\)"):
        idx.search_vectors(np.ones(5))
    with pytest.raises(ValueError, match="backend must be"):
        _random_index(10, 4, 0, "annoy").search_vectors(np.ones(4))
    monkeypatch.setattr(search_mod, "faiss_available", lambda: False)
    assert _random_index(10, 4, 0, "auto").backend == "numpy"  # fallback without faiss
    with pytest.raises(FinelapError, match="faiss is not installed"):
        _random_index(10, 4, 0, "faiss").search_vectors(np.ones(4))


def test_float16_storage_keeps_ranking(library: Path, tmp_path: Path) -> None:
    emb = ToneEmbedder()
    a = build(library, emb, tmp_path / "a")
    b = build(library, emb, tmp_path / "b", clip_dtype="float16")
    assert b.clip.dtype == np.float16 and a.clip.dtype == np.float32
    for f in (center(1), center(4), center(10)):
        ha, hb = a.search(str(f)), b.search(str(f))
        # files that match at all keep their order; the ~0 scores of unrelated files may swap
        assert [h.rel_path for h in ha if h.score > 0.1] == [h.rel_path for h in hb if h.score > 0.1]
        np.testing.assert_allclose(sorted(h.score for h in ha), sorted(h.score for h in hb), atol=2e-3)


# ----------------------------------------------------------------------------- spans


def test_best_span_by_hand() -> None:
    # 4 Hz frames: frame j covers [j/4, (j+1)/4)
    s = np.array([0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.8, 0.9, 1.0, 0.7, 0.1, 0.1])
    # median 0.1, peak 1.0 -> level-0.5 threshold 0.55: frames 6..9 -> [1.5, 2.5)
    assert best_span(s, 4.0) == ((1.5, 2.5), 1.0)
    assert best_span(s, 4.0, config=SpanConfig(level=0.8)) == ((1.75, 2.25), 1.0)  # >= 0.82
    assert best_span(s, 4.0, config=SpanConfig(threshold=0.75)) == ((1.5, 2.25), 1.0)
    assert best_span(s, 4.0, config=SpanConfig(threshold=1.5)) == (None, 1.0)
    # only the run holding the peak is returned; merge_gap joins a nearby run first
    s2 = np.array([0.0, 0.9, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert best_span(s2, 4.0) == ((1.0, 1.5), 1.0)
    assert best_span(s2, 4.0, config=SpanConfig(merge_gap_s=0.6)) == ((0.25, 1.5), 1.0)
    # the last frame is clipped to the duration; frames past the duration (padding) are ignored
    s3 = np.array([0.0, 0.0, 0.0, 0.4, 1.0, 5.0])
    assert best_span(s3, 4.0, duration_s=1.1) == ((1.0, 1.1), 1.0)
    # flat curve: the whole file
    assert best_span(np.ones(8), 4.0, duration_s=2.0) == ((0.0, 2.0), 1.0)
    # a single spike is one frame; a one-frame file works
    assert best_span(np.array([0.3]), 50.0, duration_s=0.01) == ((0.0, 0.01), 0.3)
    span, peak = best_span(np.array([]), 4.0)
    assert span is None and np.isnan(peak)
    # median filter removes a one-frame glitch that would otherwise win
    s4 = np.array([0, 0, 0, 2.0, 0, 0, 1, 1, 1, 1, 1, 0, 0], float)
    assert best_span(s4, 4.0) == ((0.75, 1.0), 2.0)
    assert best_span(s4, 4.0, config=SpanConfig(median_filter_s=0.75))[0] == (1.5, 2.75)


def test_best_span_matches_naive_scan() -> None:
    """Parity with a direct frame loop (expand left/right from the argmax while >= threshold)."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        t = int(rng.integers(1, 40))
        s = rng.random(t)
        rate = float(rng.choice([4.0, 10.0, 31.25]))
        dur = t / rate - float(rng.random()) * 0.9 / rate  # last frame partially covered
        p = int(np.argmax(s))
        thr = np.median(s) + 0.5 * (s[p] - np.median(s))
        lo, hi = p, p
        while lo > 0 and s[lo - 1] >= thr:
            lo -= 1
        while hi < t - 1 and s[hi + 1] >= thr:
            hi += 1
        span, peak = best_span(s, rate, duration_s=dur)
        assert peak == s[p]
        assert span == pytest.approx((lo / rate, min((hi + 1) / rate, dur)))


def test_span_recovery_on_audio(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    # 0-1.0 s silence, 1.0-2.5 s band-3 tone, 2.5-4.0 s band-10 tone (frame grid: 0.1 s)
    write_tones(root / "scene.wav", [(0, 1.0), (center(3), 1.5), (center(10), 1.5)])
    write_tones(root / "short.wav", [(center(10), 0.25)])  # 2.5 frames: last frame partial
    emb = ToneEmbedder()
    idx = build(root, emb, tmp_path / "idx", with_frames=True)
    (h,) = idx.search(str(center(3)), k=1)
    assert h.rel_path == "scene.wav" and h.span == pytest.approx((1.0, 2.5))
    assert h.span_score == pytest.approx(1.0, abs=1e-2)
    hits = idx.search(str(center(10)), k=2)
    assert hits[0].rel_path == "short.wav" and hits[0].span == pytest.approx((0.0, 0.25))
    assert hits[1].rel_path == "scene.wav" and hits[1].span == pytest.approx((2.5, 4.0))
    assert idx.search(str(center(3)), k=1, spans=False)[0].span is None


def test_custom_frame_scorer_is_used(tmp_path: Path) -> None:
    class Inverted(ToneEmbedder):
        def frame_scores_from_embeddings(self, text_emb: np.ndarray, frames: np.ndarray) -> np.ndarray:
            assert text_emb.shape == (N_BANDS,) and frames.shape[1] == N_BANDS
            return -(frames @ text_emb)  # "best" where the text matches least

    write_tones(tmp_path / "lib" / "s.wav", [(center(3), 1.0), (0, 0.5), (center(3), 1.0)])
    idx = build(tmp_path / "lib", Inverted(), tmp_path / "idx", with_frames=True)
    (h,) = idx.search(str(center(3)), k=1)
    assert h.span == pytest.approx((1.0, 1.5))


def test_toggling_frames(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    emb = ToneEmbedder()
    idx = build(library, emb, out, with_frames=True)  # stored rows have no frames: re-embed
    assert len(emb.calls) == 4 and idx.report.updated == 4
    assert idx.search(str(center(1)), k=1)[0].span == pytest.approx((0.0, 1.0))
    emb = ToneEmbedder()
    idx = build(library, emb, out, with_frames=False)  # dropping frames needs no embedding
    assert emb.calls == [] and idx.frames is None and idx.report.unchanged == 4
    assert idx.search(str(center(1)), k=1)[0].span is None
    assert not any(p.name.startswith("frames-") for p in out.iterdir())


# ----------------------------------------------------------------------------- embedder identity


def test_embedder_mismatch_is_refused(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder("ckpt-A"), out)
    with pytest.raises(CheckpointError, match=r"built with checkpoint 'ckpt-A', not 'ckpt-B'.*--rebuild"):
        build(library, ToneEmbedder("ckpt-B"), out)
    with pytest.raises(CheckpointError, match="ckpt-A.*ckpt-B"):
        Index.load(out).search("875", embedder=ToneEmbedder("ckpt-B"))
    with pytest.raises(CheckpointError):
        Index.load(out, embedder=ToneEmbedder("ckpt-B"))
    emb = ToneEmbedder("ckpt-B")
    idx = build(library, emb, out, rebuild=True)
    assert len(emb.calls) == 4 and idx.embedder_id == "ckpt-B"
    assert idx.search(str(center(4)), k=1)[0].rel_path == "b/mid.wav"
    with pytest.raises(ValueError, match="needs an embedder"):
        Index.load(out).search("875")
    with pytest.raises(FinelapError, match="empty search query"):
        idx.search("  ")


# ----------------------------------------------------------------------------- atomicity / resume


def test_crash_before_commit_keeps_previous_index(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "idx"
    before = build(library, ToneEmbedder(), out, with_frames=True)
    want = [(h.rel_path, h.span) for h in before.search(str(center(1)))]
    write_tones(library / "new.wav", [(center(5), 1.0)])
    (library / "high.wav").unlink()

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(search_mod, "write_json_atomic", crash)  # data files written, meta not swapped
    with pytest.raises(RuntimeError, match="disk full"):
        build(library, ToneEmbedder(), out, with_frames=True)
    monkeypatch.undo()
    idx = Index.load(out, embedder=ToneEmbedder())
    assert "high.wav" in idx.paths and "new.wav" not in idx.paths  # the old index, whole
    assert [(h.rel_path, h.span) for h in idx.search(str(center(1)))] == want
    # the next build finishes the job and removes the orphaned generation
    idx = build(library, ToneEmbedder(), out, with_frames=True)
    assert "new.wav" in idx.paths and "high.wav" not in idx.paths
    assert len(list(out.iterdir())) == 4


def test_crash_midway_resumes_from_checkpoint(library: Path, tmp_path: Path) -> None:
    for i in range(6):
        write_tones(library / "more" / f"t{i}.wav", [(center(i + 2), 0.3)])

    class Dies(ToneEmbedder):
        def embed_files(self, paths, *, with_frames=False):
            if len(self.calls) >= 4:
                raise RuntimeError("killed")
            yield from super().embed_files(paths, with_frames=with_frames)

    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="killed"):
        build(library, Dies(), out, batch_size=2, checkpoint_every_s=0.0)
    partial = Index.load(out)
    assert len(partial) == 4  # two batches committed
    emb = ToneEmbedder()
    idx = build(library, emb, out)
    assert len(emb.calls) == 6 and len(idx) == 10 and idx.report.unchanged == 4


def test_checkpoint_keeps_old_rows_of_changed_files_not_yet_embedded(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    write_tones(library / "b" / "mid.wav", [(center(12), 1.0)])
    write_mix(library / "b" / "mix.wav", [center(13), center(14)])

    class DiesAfterOne(ToneEmbedder):
        def embed_files(self, paths, *, with_frames=False):
            if self.calls:
                raise RuntimeError("killed")
            yield from super().embed_files(paths, with_frames=with_frames)

    with pytest.raises(RuntimeError):
        build(library, DiesAfterOne(), out, batch_size=1, checkpoint_every_s=0.0)
    partial = Index.load(out, embedder=ToneEmbedder())
    assert len(partial) == 4  # mix.wav keeps its old (still searchable) row until re-embedded
    assert partial.search(str(center(12)), k=1)[0].rel_path == "b/mid.wav"
    assert [h.rel_path for h in partial.search(str(center(1)), k=2)] == ["a/low.wav", "b/mix.wav"]
    emb = ToneEmbedder()
    idx = build(library, emb, out)
    assert emb.calls == ["mix.wav"] and idx.report.updated == 1 and idx.report.unchanged == 3
    assert idx.search(str(center(13)), k=1)[0].rel_path == "b/mix.wav"


def test_interrupt_saves_progress(library: Path, tmp_path: Path) -> None:
    class CtrlC(ToneEmbedder):
        def embed_files(self, paths, *, with_frames=False):
            if len(self.calls) >= 2:
                raise KeyboardInterrupt
            yield from super().embed_files(paths, with_frames=with_frames)

    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build(library, CtrlC(), out, batch_size=2, checkpoint_every_s=None)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 2 and meta["last_build"]["interrupted"] is True
    emb = ToneEmbedder()
    assert len(build(library, emb, out)) == 4 and len(emb.calls) == 2


def test_load_errors_name_the_file(library: Path, tmp_path: Path) -> None:
    with pytest.raises(FinelapError, match="not a finelap index"):
        Index.load(tmp_path)
    out = tmp_path / "idx"
    build(library, ToneEmbedder(), out)
    meta = json.loads((out / "meta.json").read_text())
    files = out / meta["data"]["files"]
    lines = files.read_text().splitlines()
    files.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(DataFormatError, match=r"files-.*\.jsonl:3: bad index row"):
        Index.load(out).paths  # rows are parsed on first access
    files.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataFormatError, match="2 rows but meta.json says 4"):
        Index.load(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(DataFormatError, match=r"meta\.json: unreadable index metadata"):
        Index.load(out)
    # a broken index can always be rebuilt
    assert len(build(library, ToneEmbedder(), out, rebuild=True)) == 4
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(DataFormatError, match="version 99 is not supported"):
        Index.load(out)


def test_save_and_from_arrays_roundtrip(tmp_path: Path) -> None:
    idx = _random_index(50, 8, 0, "numpy")
    idx.save(tmp_path / "idx")
    back = Index.load(tmp_path / "idx", backend="numpy")
    np.testing.assert_allclose(np.asarray(back.clip), np.asarray(idx.clip))
    assert back.paths == idx.paths and back.embedder_id == "rand"
    q = np.asarray(idx.clip[7])
    assert back.search_vectors(q, 1)[1][0, 0] == 7
