"""Soundscape curation: A-weighting, trimming, noise, placement, boundary recalibration, labels,
splits without leakage, determinism across worker counts, bad sources, output formats, CLI."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.data.synth import (
    SourcePool,
    SynthConfig,
    Synthesizer,
    a_weighted_frame_levels,
    a_weighting_db,
    assign_splits,
    audible_span,
    colored_noise,
    load_pool,
    synthesize,
    trim_bounds,
)
from finelap.data.synth import _fits  # noqa: PLC2701 - hand-checked helper
from finelap.errors import ConfigError

from _figures import assert_png_picture, axes_titled, tick_labels

SR = 16000


# ----------------------------------------------------------------------------- fixtures


def _burst(kind: str, seconds: float, rng: np.random.Generator, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    if kind == "tone":
        x = np.sin(2 * np.pi * rng.uniform(300, 2000) * t)
    elif kind == "noise":
        x = rng.standard_normal(len(t))
    elif kind == "chirp":
        x = np.sin(2 * np.pi * (400 * t + 1500 * t**2))
    elif kind == "thump":
        # a 1 kHz burst followed by a quiet 50 Hz tail: above the trim threshold (unweighted) but
        # ~58 dB below the burst once A-weighted, so recalibration must cut the label before it
        x = np.where(t < 0.4 * t[-1], np.sin(2 * np.pi * 1000 * t), 0.02 * np.sin(2 * np.pi * 50 * t))
    else:  # clicks: short decaying pulses
        x = np.zeros(len(t))
        for s in range(0, len(t), int(0.12 * sr)):
            n = min(200, len(t) - s)
            x[s : s + n] = rng.standard_normal(n) * np.exp(-np.arange(n) / 40)
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def _write_pool(root: Path, per_class: int = 3, sr: int = 22050, seed: int = 0) -> Path:
    """Folder-per-class pool of short generated sounds with silent padding (exercises trimming and
    resampling: written at 22.05 kHz)."""
    rng = np.random.default_rng(seed)
    for cls in ("tone", "noise", "chirp", "clicks", "thump"):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            body = _burst(cls, rng.uniform(0.3, 1.5), rng, sr)
            pad = np.zeros(int(0.2 * sr), np.float32)
            sf.write(d / f"{cls}{i}.wav", np.concatenate([pad, body, pad]), sr)
    return root


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    return _write_pool(tmp_path_factory.mktemp("pool"))


def _cfg(**kw) -> SynthConfig:
    base = dict(splits={"train": 4, "val": 2, "test": 2}, duration=3.0, seed=0, max_events=4)
    base.update(kw)
    return SynthConfig(**base)


def _pool(pool_dir: Path, cfg: SynthConfig) -> SourcePool:
    from finelap.data.manifests import read_class_folders

    pool, skipped = load_pool(read_class_folders(pool_dir), cfg)
    assert not skipped
    return pool


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- signal helpers


def test_a_weighting_matches_iec_table():
    # IEC 61672-1 Table 3: A-weightings (dB, one decimal) at the exact base-10 band frequencies
    # 1000 * 10^(n/10) whose nominal names are 31.5, 50, 100, 250, 500, 1k, 2k, 4k, 8k, 10k Hz
    f = 1000.0 * 10.0 ** (np.array([-15, -13, -10, -6, -3, 0, 3, 6, 9, 10]) / 10)
    want = np.array([-39.4, -30.2, -19.1, -8.6, -3.2, 0.0, 1.2, 1.0, -1.1, -2.5])
    np.testing.assert_allclose(a_weighting_db(f), want, atol=0.1)


def test_frame_levels_hand_checked_sines():
    t = np.arange(SR) / SR
    # 20-ms frames hold whole periods of 100 Hz and 1 kHz: mean square of a unit sine is 1/2
    lv1k = a_weighted_frame_levels(np.sin(2 * np.pi * 1000 * t), SR, 320)
    lv100 = a_weighted_frame_levels(np.sin(2 * np.pi * 100 * t), SR, 320)
    assert lv1k.shape == (50,)
    np.testing.assert_allclose(lv1k[2:-2], 10 * np.log10(0.5), atol=0.01)
    np.testing.assert_allclose(lv100[2:-2], 10 * np.log10(0.5) - 19.14, atol=0.05)
    assert a_weighted_frame_levels(np.zeros(1000), SR, 320).max() < -250  # silence
    assert len(a_weighted_frame_levels(np.ones(321), SR, 320)) == 2  # last frame zero-padded


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_frame_levels_parity_with_iir_a_filter(color):
    """Reference: the IEC analog A-weighting prototype as a bilinear IIR filter applied in the time
    domain at 48 kHz (where bilinear warping below 7 kHz is negligible), then framewise energy."""
    sig = pytest.importorskip("scipy.signal")
    sr, frame = 48000, 960
    z = [0.0] * 4
    p = [-2 * np.pi * 20.598997] * 2 + [-2 * np.pi * 107.65265, -2 * np.pi * 737.86223] + [-2 * np.pi * 12194.0] * 2
    k = (2 * np.pi * 12194.0) ** 2 * 10 ** (2.0 / 20)
    sos = sig.zpk2sos(*sig.bilinear_zpk(z, p, k, sr))
    x = colored_noise(2 * sr, color, np.random.default_rng(1)).astype(np.float64)
    x = sig.sosfilt(sig.butter(8, 7000, fs=sr, output="sos"), x)
    y = sig.sosfilt(sos, x)
    ref = 10 * np.log10((y.reshape(-1, frame) ** 2).mean(1))
    ours = a_weighted_frame_levels(x, sr, frame)
    d = np.abs(ref - ours)[25:-5]  # skip the IIR start-up (0.5 s: 20-Hz poles) and the end
    assert d.mean() < 0.15 and d.max() < 0.6


def test_audible_span_equals_full_thresholding():
    """The chunked edge scan must give exactly the first/last frames of the full computation."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.uniform(0.05, 9.0) * SR)
        if rng.random() < 0.3:
            x = 0.1 * np.sin(2 * np.pi * rng.uniform(20, 200) * np.arange(n) / SR)
        else:
            x = 0.1 * rng.standard_normal(n)
        a, b = sorted(rng.integers(0, n, 2))
        x[:a] *= 10 ** rng.uniform(-5, 0)  # quiet lead-in / tail of random depth
        x[b:] *= 10 ** rng.uniform(-5, 0)
        x = x.astype(np.float32)
        thr = rng.uniform(-90, -40)
        act = np.flatnonzero(a_weighted_frame_levels(x, SR, 320) > thr)
        want = (int(act[0]), int(act[-1])) if len(act) else None
        assert audible_span(x, SR, 320, thr) == want
    assert audible_span(np.zeros(5 * SR, np.float32), SR, 320, -70.0) is None


def test_colored_noise_unit_rms_and_slope():
    rng = np.random.default_rng(0)
    for color, slope in (("white", 0.0), ("pink", -1.0), ("brown", -2.0)):
        x = colored_noise(8 * SR, color, rng)
        assert x.dtype == np.float32 and x.shape == (8 * SR,)
        assert abs(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) - 1.0) < 1e-4
        assert abs(float(x.mean())) < 1e-3
        p = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1 / SR)
        m = (f > 50) & (f < 5000)
        fit = np.polyfit(np.log10(f[m]), np.log10(p[m] + 1e-30), 1)[0]
        assert abs(fit - slope) < 0.1, (color, fit)
    a = colored_noise(1000, "pink", np.random.default_rng(5))
    b = colored_noise(1000, "pink", np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_trim_bounds():
    x = np.zeros(SR, np.float32)
    x[4000:9000] = 0.3 * np.sin(np.arange(5000) * 0.3)
    x[:100] = 1e-6  # far below 40 dB under the peak
    lo, hi = trim_bounds(x, SR, top_db=40, frame_s=0.01)
    assert lo == 4000 and hi == 9120  # 160-sample frames: the event ends inside frame 56
    assert trim_bounds(np.zeros(500, np.float32), SR) is None
    assert trim_bounds(np.zeros(0, np.float32), SR) is None


def test_fits_caps_simultaneous_events():
    spans = [(0, 10), (5, 15)]
    assert _fits(spans, 20, 30, cap=1)  # disjoint
    assert _fits(spans, 10, 12, cap=2)  # touches the end of (0,10): only (5,15) active
    assert not _fits(spans, 6, 8, cap=2)  # three at once
    assert _fits(spans, 6, 8, cap=3)
    assert _fits([], 0, 5, cap=1)


# ----------------------------------------------------------------------------- rendering


def _reference_levels(track: np.ndarray, sr: int, frame: int) -> np.ndarray:
    """Independent A-weighted frame levels: whole-track FFT with the IEC formula written out."""
    n = len(track)
    spec = np.fft.rfft(track.astype(np.float64), 2 * n)
    f = np.fft.rfftfreq(2 * n, 1 / sr)
    f2 = f**2
    with np.errstate(divide="ignore", invalid="ignore"):
        ra = 12194.0**2 * f2**2 / ((f2 + 20.6**2) * np.sqrt((f2 + 107.7**2) * (f2 + 737.9**2)) * (f2 + 12194.0**2))
    gain = np.nan_to_num(ra * 10 ** (2.0 / 20))
    y = np.fft.irfft(spec * gain, 2 * n)[:n]
    n_frames = -(-n // frame)
    y = np.concatenate([y, np.zeros(n_frames * frame - n)])
    return 10 * np.log10(np.maximum((y.reshape(n_frames, frame) ** 2).mean(1), 1e-30))


def _check_isolated_tracks(sc, cfg: SynthConfig) -> int:
    """Each event's isolated track: A-weighted energy above threshold only inside its labels; the
    first and last frame of each label above threshold. Returns the number of events checked."""
    n, frame = cfg.n_samples, cfg.frame_len
    checked = 0
    for p in sc.placements:
        track = np.zeros(n, np.float32)
        track[p.start : p.start + len(p.signal)] = p.signal
        lv = _reference_levels(track, cfg.sample_rate, frame)
        inside = np.zeros(len(lv), bool)
        for e in p.events:
            assert 0.0 <= e.onset < e.offset <= cfg.duration + 1e-9
            j0 = int(math.floor(e.onset * cfg.sample_rate / frame + 1e-9))
            j1 = int(math.ceil(e.offset * cfg.sample_rate / frame - 1e-9))
            inside[j0:j1] = True
            assert lv[j0] > cfg.recal_db - 0.5, (p.label, e, lv[j0])
            assert lv[j1 - 1] > cfg.recal_db - 0.5, (p.label, e, lv[j1 - 1])
            # labels never start before the source was placed nor end after it stopped
            assert e.onset >= p.start / cfg.sample_rate - 1e-9
            assert e.offset <= (p.start + len(p.signal)) / cfg.sample_rate + 1e-9
            checked += 1
        assert np.all(lv[~inside] < cfg.recal_db + 0.5), (p.label, lv[~inside].max())
        # and (A-weighted) practically all of the event's energy lies inside its labels. Unweighted
        # energy may remain outside: sub-audible rumble is exactly what A-weighting discounts.
        energy = 10.0 ** (lv / 10)
        assert energy[~inside].sum() <= 1e-4 * energy.sum()
    return checked


def test_labels_mark_where_each_isolated_event_is_audible(pool_dir):
    cfg = _cfg(splits={"train": 6, "val": 2, "test": 2}, max_events=5)
    syn = Synthesizer(_pool(pool_dir, cfg), cfg)
    total = 0
    for split, n in cfg.splits.items():
        for i in range(n):
            sc = syn.render(split, i)
            total += _check_isolated_tracks(sc, cfg)
            assert sc.audio.shape == (cfg.n_samples,)
            assert float(np.abs(sc.audio).max()) <= 10 ** (cfg.peak_dbfs / 20) + 1e-6
            # the labels are exactly the placements' recalibrated events
            assert sc.events == sorted((e for p in sc.placements for e in p.events), key=lambda e: (e.onset, e.offset, e.label))
    assert total >= 10


def test_snr_and_background_level(pool_dir):
    cfg = _cfg(repeat_prob=0.0, snr_db=(12.0, 20.0), background_db=(-40.0, -30.0))
    syn = Synthesizer(_pool(pool_dir, cfg), cfg)
    for i in range(4):
        sc = syn.render("train", i)
        bg = sc.audio.astype(np.float64).copy()
        for p in sc.placements:
            bg[p.start : p.start + len(p.signal)] -= p.signal
        bg_db = 20 * np.log10(np.sqrt(np.mean(bg**2)))
        assert abs(bg_db - sc.background_db) < 0.05
        assert -40.0 - 1e-6 <= sc.background_db - sc.scale_db <= -30.0 + 1e-6
        for p in sc.placements:
            snr = 20 * np.log10(np.sqrt(np.mean(p.signal.astype(np.float64) ** 2)) / 10 ** (sc.background_db / 20))
            assert 12.0 - 0.05 <= snr <= 20.0 + 0.05
            assert abs(snr - p.snr_db) < 0.05


def test_backgrounds_folder_and_manifest(pool_dir, tmp_path):
    from finelap.data.manifests import read_class_folders, read_manifest

    rng = np.random.default_rng(0)
    bg = tmp_path / "bg"
    bg.mkdir()
    sf.write(bg / "long.wav", 0.1 * rng.standard_normal(5 * SR).astype(np.float32), SR)
    sf.write(bg / "short.wav", 0.1 * rng.standard_normal(SR // 2).astype(np.float32), SR)  # looped to 3 s
    (bg / "broken.wav").write_bytes(b"not audio at all")
    cfg = _cfg(splits={"train": 6, "val": 1, "test": 1}, repeat_prob=0.0)
    res = synthesize(read_class_folders(pool_dir), tmp_path / "out", cfg, backgrounds=bg, plot=False)
    stats = res.stats["pool"]
    assert stats["n_backgrounds"] == 2 and not stats["noise_floor"]
    assert [Path(s["path"]).name for s in stats["skipped"]] == ["broken.wav"] and stats["skipped"][0]["kind"] == "background"
    used = {c.meta["background"] for c in read_manifest(tmp_path / "out" / "train" / "manifest.jsonl")}
    assert used <= {"long", "short"} and used
    # labelled backgrounds from a manifest are named in one caption; SNRs are against them
    (tmp_path / "bg.jsonl").write_text(json.dumps({"audio": str(bg / "long.wav"), "labels": ["street noise"]}) + "\n")
    from finelap.data.synth import load_backgrounds

    bgp, _ = load_backgrounds(tmp_path / "bg.jsonl", cfg)
    syn = Synthesizer(_pool(pool_dir, cfg), cfg, backgrounds=bgp)
    sc = syn.render("train", 0)
    assert sc.background == "long" and sc.captions[0].endswith("with street noise in the background.")
    rest = sc.audio.astype(np.float64).copy()
    for p in sc.placements:
        rest[p.start : p.start + len(p.signal)] -= p.signal
    assert abs(20 * np.log10(np.sqrt(np.mean(rest**2))) - sc.background_db) < 0.05


def test_overlap_cap_and_event_counts(pool_dir):
    cfg = _cfg(min_events=3, max_events=3, max_overlap=1, duration=4.0, splits={"train": 6, "val": 1, "test": 1})
    syn = Synthesizer(_pool(pool_dir, cfg), cfg)
    for i in range(6):
        sc = syn.render("train", i)
        assert len(sc.placements) + sc.n_unplaced + sc.n_inaudible == 3
        ev = sorted(sc.events, key=lambda e: e.onset)
        for a, b in zip(ev, ev[1:]):
            assert a.offset <= b.onset + 1e-9  # never two at once
        spans = sorted((p.start, p.start + len(p.signal)) for p in sc.placements)
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            assert e0 <= s1


def test_repeated_short_events_split_at_gaps(pool_dir):
    cfg = _cfg(repeat_prob=1.0, repeat_below_s=5.0, max_repeats=3, repeat_gap_s=(0.25, 0.3), split_gap_s=0.1,
               max_events=2, duration=6.0, max_overlap=2)
    syn = Synthesizer(_pool(pool_dir, cfg), cfg)
    reps = []
    for i in range(4):
        sc = syn.render("train", i)
        for p in sc.placements:
            reps.append(p.repeats)
            if p.label not in ("clicks", "thump"):  # these have their own inaudible stretches
                assert len(p.events) == p.repeats, (p.label, p.repeats, p.events)
        _check_isolated_tracks(sc, cfg)
    assert max(reps) > 1


def test_render_is_a_pure_function_of_seed_split_index(pool_dir):
    cfg = _cfg()
    pool = _pool(pool_dir, cfg)
    a, b = Synthesizer(pool, cfg), Synthesizer(pool, cfg)
    x, y = a.render("train", 3), b.render("train", 3)
    assert np.array_equal(x.audio, y.audio) and x.events == y.events and x.captions == y.captions
    assert not np.array_equal(a.render("train", 2).audio, x.audio)
    c = Synthesizer(pool, _cfg(seed=1)).render("train", 3)
    assert not np.array_equal(c.audio, x.audio)


def test_canonical_event_labels(pool_dir):
    from finelap.data.captions import PhraseBank

    cfg = _cfg(event_labels="canonical")
    bank = PhraseBank.default()
    sc = Synthesizer(_pool(pool_dir, cfg), cfg).render("train", 0)
    assert sc.events
    assert {e.label for e in sc.events} <= {bank.canonical(c) for c in ("tone", "noise", "chirp", "clicks", "thump")}
    assert bank.canonical("tone") == "a tone" and "tone" not in {e.label for e in sc.events}


def test_recalibration_cuts_inaudible_tails(pool_dir):
    """The thump's 50 Hz tail is placed but inaudible (A-weighted): its label must end early."""
    cfg = _cfg(splits={"train": 12, "val": 1, "test": 1}, repeat_prob=0.0)
    syn = Synthesizer(_pool(pool_dir, cfg), cfg)
    cut = []
    for i in range(12):
        for p in syn.render("train", i).placements:
            if p.label == "thump":
                placed_end = (p.start + len(p.signal)) / SR
                cut.append(placed_end - p.events[-1].offset)
    assert cut and min(cut) > 0.15  # the tail is >= 0.18 s long in every thump source


# ----------------------------------------------------------------------------- splits


def _manifest_pool(tmp_path: Path, n_rec: int = 8, takes: int = 3) -> Path:
    """A JSONL pool where each recording gives several clips (takes), like ESC-50's src_file."""
    rng = np.random.default_rng(3)
    lines = []
    (tmp_path / "wav").mkdir()
    for r in range(n_rec):
        cls = ["tone", "noise"][r % 2]
        for t in range(takes):
            p = tmp_path / "wav" / f"r{r}_{t}.wav"
            sf.write(p, _burst(cls, 0.4, rng, SR), SR)
            lines.append(json.dumps({"audio": str(p), "labels": [cls], "src_file": f"rec{r}"}))
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_splits_by_recording_do_not_leak(tmp_path):
    from finelap.data.manifests import read_manifest

    pool_path = _manifest_pool(tmp_path)
    cfg = _cfg(splits={"train": 6, "val": 3, "test": 3}, duration=2.0)
    res = synthesize(read_manifest(pool_path), tmp_path / "out", cfg, workers=1, plot=False)
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    recs = {s: set(v["recordings"]) for s, v in splits.items()}
    assert all(recs.values())
    assert not (recs["train"] & recs["val"]) and not (recs["train"] & recs["test"]) and not (recs["val"] & recs["test"])
    assert set.union(*recs.values()) == {f"rec{r}" for r in range(8)}
    # every soundscape only uses recordings of its own split
    for s in cfg.splits:
        for clip in read_manifest(tmp_path / "out" / s / "manifest.jsonl"):
            used = {src["recording"] for src in clip.meta["sources"]}
            assert used <= recs[s], (s, used)
    assert res.counts == cfg.splits
    # <split>/sources.jsonl: exactly the pool clips of that split's recordings, labels kept, readable anywhere
    pool = read_manifest(pool_path)
    for s in cfg.splits:
        src = read_manifest(tmp_path / "out" / s / "sources.jsonl")
        assert [c.meta["src_file"] for c in src] == [c.meta["src_file"] for c in pool if c.meta["src_file"] in recs[s]]
        assert all(Path(c.audio).is_absolute() and Path(c.audio).is_file() for c in src)
        assert [(c.labels, c.events) for c in src] == [(c.labels, c.events) for c in pool if c.meta["src_file"] in recs[s]]
    assert sum(len(read_manifest(tmp_path / "out" / s / "sources.jsonl")) for s in cfg.splits) == len(pool)


def test_split_assignment_spreads_classes_and_follows_shares(pool_dir):
    cfg = _cfg(splits={"train": 80, "val": 10, "test": 10})
    pool = _pool(pool_dir, cfg)  # 15 recordings, 5 classes
    a = assign_splits(pool, cfg)
    assert sorted(i for v in a.values() for i in v) == list(range(len(pool.sources)))
    assert len(a["train"]) > len(a["val"]) >= 1 and len(a["test"]) >= 1
    assert a == assign_splits(pool, cfg)  # deterministic
    with pytest.raises(ConfigError, match="recording"):
        assign_splits(SourcePool(pool.sources[:2], pool.audio, SR), cfg)  # 2 recordings, 3 splits


def _esc_style_pool(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i in range(10):
        fold, cls = 1 + i % 5, ["dog", "rain"][i % 2]
        name = f"{fold}-{100 + i}-A-{i % 2}.wav"
        sf.write(tmp_path / "audio" / name, _burst("tone" if cls == "dog" else "noise", 0.5, rng, SR), SR)
        rows.append(f"{name},{fold},{i % 2},{cls},False,{100 + i},A")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "meta.csv"


def test_split_folds(tmp_path):
    from finelap.data.manifests import read_esc50_csv

    csv_path = _esc_style_pool(tmp_path)
    clips = read_esc50_csv(csv_path, tmp_path / "audio")
    cfg = _cfg(splits={"train": 3, "val": 2, "test": 2}, split_folds={"train": [1, 2, 3], "val": [4], "test": [5]}, duration=2.0)
    synthesize(clips, tmp_path / "out", cfg, plot=False)
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits["train"]["folds"] == [1, 2, 3]
    assert set(splits["val"]["recordings"]) == {"103", "108"}  # fold 4
    assert set(splits["test"]["recordings"]) == {"104", "109"}  # fold 5
    with pytest.raises(ConfigError, match="both"):
        _cfg(split_folds={"train": [1, 2], "val": [2], "test": [3]})
    # the same recording in folds of two splits (ESC-50 has one such src_file) is kept only in the
    # first split; its other clips are left out and reported
    clips[3].meta["src_file"] = clips[0].meta["src_file"]  # fold 4 (val) now shares fold 1's recording
    pool, _ = load_pool(clips, cfg)
    dropped: list = []
    a = assign_splits(pool, cfg, dropped)
    rec = clips[0].meta["src_file"]
    assert [d["recording"] for d in dropped] == [rec] and dropped[0]["split"] == "val" and dropped[0]["kept_in"] == "train"
    assert rec in {pool.sources[i].recording for i in a["train"]}
    assert rec not in {pool.sources[i].recording for i in a["val"] + a["test"]}
    synthesize(clips, tmp_path / "out2", cfg, plot=False)
    sp = json.loads((tmp_path / "out2" / "splits.json").read_text())
    assert rec not in sp["val"]["recordings"] and sp["val"]["left_out_for_leakage"][0]["recording"] == rec


# ----------------------------------------------------------------------------- end to end


def test_outputs_round_trip_and_match_render(pool_dir, tmp_path, saved_figures):
    from finelap.data.manifests import read_class_folders, read_durations_tsv, read_manifest, read_strong_tsv

    cfg = _cfg()
    out = tmp_path / "out"
    res = synthesize(read_class_folders(pool_dir), out, cfg, workers=1)
    for name in ("config.json", "splits.json", "phrase_bank.json", "stats.json", "stats.png"):
        assert (out / name).is_file(), name
    stats = json.loads((out / "stats.json").read_text())
    # stats.png: a picture of these statistics (events per class stacked over splits, polyphony per split)
    assert_png_picture(out / "stats.png")
    (fig,) = saved_figures
    per_class = axes_titled(fig, "events per class")
    classes = tick_labels(per_class)
    assert classes == sorted({c for st in stats["splits"].values() for c in st["events_per_class"]})
    drawn = {c: 0.0 for c in classes}
    for bar in per_class.patches:
        drawn[classes[round(bar.get_y() + bar.get_height() / 2)]] += bar.get_width()
    assert drawn == {c: sum(st["events_per_class"].get(c, 0) for st in stats["splits"].values()) for c in classes}
    heights = [b.get_height() for b in axes_titled(fig, "overlap (polyphony)").patches]
    assert heights == pytest.approx([f for st in stats["splits"].values() for f in st["polyphony_time_fraction"]])
    assert stats["pool"]["n_sources"] == 15 and stats["pool"]["n_skipped"] == 0 and stats["pool"]["noise_floor"]
    syn = Synthesizer(_pool(pool_dir, cfg), cfg)
    for split, n in cfg.splits.items():
        clips = read_manifest(out / split / "manifest.jsonl")
        strong = read_strong_tsv(out / split / "strong.tsv")
        durs = read_durations_tsv(out / split / "durations.tsv")
        assert [c.key for c in clips] == [f"{split}_{i:06d}" for i in range(n)]
        st = stats["splits"][split]
        assert st["n_soundscapes"] == n and st["n_events"] == sum(len(c.events) for c in clips)
        assert sum(st["events_per_class"].values()) == st["n_events"]
        for i, c in enumerate(clips):
            fname = f"{c.key}.flac"
            assert durs[fname] == pytest.approx(cfg.duration)
            assert [(e.label, round(e.onset, 6), round(e.offset, 6)) for e in strong[fname]] == \
                   [(e.label, round(e.onset, 6), round(e.offset, 6)) for e in c.events]
            assert len(c.captions) == cfg.num_captions
            info = sf.info(c.audio)
            assert info.samplerate == SR and info.frames == cfg.n_samples and info.subtype == "PCM_16"
            wav, _ = sf.read(c.audio, dtype="float64")
            sc = syn.render(split, i)
            assert np.max(np.abs(wav - sc.audio)) <= 0.5 / 32768 + 1e-9  # written audio is the render
            assert [(e.label, round(e.onset, 6)) for e in sc.events] == [(e.label, round(e.onset, 6)) for e in c.events]
    labels = set(json.loads((out / "phrase_bank.json").read_text())["entries"])
    assert {"tone", "noise", "chirp", "clicks"} <= labels
    assert "plot:" in res.summary() and str(out / "stats.png") in res.summary()


def test_split_fractions_keep_val_and_test_when_train_grows(pool_dir, tmp_path, capsys):
    from finelap.cli import main

    def run(out: Path, splits: str, *extra: str) -> dict:
        assert main(["synth", "--pool", str(pool_dir), "--out", str(out), "--splits", splits, "--duration", "2",
                     "--workers", "1", "--no-plot", *extra]) == 0
        return json.loads((out / "splits.json").read_text())

    small = run(tmp_path / "a", "train=4,val=2,test=2")
    grown = run(tmp_path / "b", "train=12,val=2,test=2", "--split-fractions", "train=4,val=2,test=2")
    default = run(tmp_path / "c", "train=12,val=2,test=2")
    for s in ("train", "val", "test"):
        assert grown[s]["recordings"] == small[s]["recordings"], s
    for s in ("val", "test"):  # same recordings, same seed -> byte-identical soundscapes
        assert _tree_hash(tmp_path / "b" / s) == _tree_hash(tmp_path / "a" / s)
    # without fixed shares, more train soundscapes take recordings from val/test (proportional shares)
    assert len(default["train"]["recordings"]) > len(small["train"]["recordings"])
    with pytest.raises(SystemExit):
        main(["synth", "--pool", str(pool_dir), "--out", str(tmp_path / "d"), "--split-fractions", "train"])
    rc = main(["synth", "--pool", str(pool_dir), "--out", str(tmp_path / "e"), "--splits", "train=2,test=1",
               "--split-fractions", "train=1,val=1", "--no-plot"])
    assert rc == 2 and "split_fractions must name exactly the splits" in capsys.readouterr().err


def test_byte_identical_for_any_worker_count(pool_dir, tmp_path):
    from finelap.data.manifests import read_class_folders

    clips = read_class_folders(pool_dir)
    cfg = _cfg(splits={"train": 6, "val": 2, "test": 2})
    synthesize(clips, tmp_path / "w1", cfg, workers=1)
    synthesize(clips, tmp_path / "w2", cfg, workers=2)
    h1, h2 = _tree_hash(tmp_path / "w1"), _tree_hash(tmp_path / "w2")
    assert len(h1) > 10 and h1 == h2
    synthesize(clips, tmp_path / "s1", _cfg(splits={"train": 6, "val": 2, "test": 2}, seed=1), workers=1, plot=False)
    h3 = _tree_hash(tmp_path / "s1")
    assert h3["train/audio/train_000000.flac"] != h1["train/audio/train_000000.flac"]


def test_webdataset_format_deterministic(pool_dir, tmp_path):
    from finelap.data.manifests import decode_audio_bytes, iter_webdataset, read_class_folders, read_strong_tsv

    clips = read_class_folders(pool_dir)
    cfg = _cfg(format="webdataset", shard_size=3, splits={"train": 5, "val": 1, "test": 1})
    synthesize(clips, tmp_path / "a", cfg, workers=2, plot=False)
    synthesize(clips, tmp_path / "b", cfg, workers=1, plot=False)
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    shards = sorted((tmp_path / "a" / "train" / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar"]
    samples = list(iter_webdataset(tmp_path / "a" / "train" / "shards"))
    strong = read_strong_tsv(tmp_path / "a" / "train" / "strong.tsv")
    assert [c.id for c, _ in samples] == [f"train_{i:06d}" for i in range(5)]
    for clip, data in samples:
        assert [(e.label, round(e.onset, 6)) for e in clip.events] == [(e.label, round(e.onset, 6)) for e in strong[f"{clip.id}.flac"]]
        assert len(decode_audio_bytes(data, SR)) == cfg.n_samples
        assert clip.captions
    assert not (tmp_path / "a" / "train" / "manifest.jsonl").exists()


def test_bad_source_files_are_skipped_and_listed(tmp_path, capsys):
    from finelap.cli import main

    root = _write_pool(tmp_path / "pool", per_class=2)
    (root / "tone" / "empty.wav").write_bytes(b"")
    (root / "noise" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(256)))
    nan = np.full(4000, 0.1, np.float32)
    nan[100] = np.nan
    sf.write(root / "chirp" / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(root / "clicks" / "silent.wav", np.zeros(4000, np.float32), SR)
    out = tmp_path / "out"
    rc = main(["synth", "--pool", str(root), "--out", str(out), "--splits", "train=3,val=1,test=1",
               "--duration", "2", "--workers", "2", "--no-plot"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    bad = {Path(s["path"]).name: s["problem"] for s in stats["pool"]["skipped"]}
    assert set(bad) == {"empty.wav", "corrupt.wav", "nan.wav", "silent.wav"}
    assert "empty" in bad["empty.wav"] and "NaN" in bad["nan.wav"] and "silent" in bad["silent.wav"]
    assert stats["pool"]["n_skipped"] == 4 and stats["pool"]["n_sources"] == 10
    printed = capsys.readouterr().out
    assert "skipped 4 bad source(s)" in printed and "corrupt.wav" in printed


def test_external_captioner_hook(pool_dir, tmp_path, monkeypatch):
    from finelap.data.manifests import read_class_folders, read_manifest

    (tmp_path / "mycap.py").write_text(
        "def caption(events, duration):\n    return [f'{len(events)} events in {duration:g} s']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(splits={"train": 2, "val": 1, "test": 1}, captioner="mycap:caption")
    synthesize(read_class_folders(pool_dir), tmp_path / "out", cfg, plot=False)
    clips = read_manifest(tmp_path / "out" / "train" / "manifest.jsonl")
    assert [c.captions for c in clips] == [[f"{len(c.events)} events in 3 s"] for c in clips]
    with pytest.raises(ConfigError, match="cannot import"):
        synthesize(read_class_folders(pool_dir), tmp_path / "o2", _cfg(captioner="no_such_mod_xyz:f"), plot=False)


def test_config_validation():
    with pytest.raises(ConfigError):
        SynthConfig(min_events=3, max_events=2)
    with pytest.raises(ConfigError):
        SynthConfig(snr_db=(20, 12))
    with pytest.raises(ConfigError):
        SynthConfig(format="mp3")
    with pytest.raises(ConfigError):
        SynthConfig(splits={"train": 0})
    with pytest.raises(ConfigError):
        SynthConfig(max_overlap=0)
    with pytest.raises(ConfigError):
        SynthConfig(split_folds={"train": [1]}, splits={"train": 1, "val": 1})
    with pytest.raises(ConfigError):
        SynthConfig(captioner="nocolon")
    assert SynthConfig().to_json()["snr_db"] == [12.0, 20.0]


def test_cli_help_and_user_error(tmp_path, capsys):
    from finelap.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["synth", "--help"])
    assert ex.value.code == 0
    assert "--max-overlap" in capsys.readouterr().out
    rc = main(["synth", "--pool", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.csv" in err and len(err.strip().splitlines()) == 1


def test_real_esc50_subset(esc50_dir, tmp_path):
    from finelap.data.manifests import read_esc50_csv

    clips = read_esc50_csv(esc50_dir / "meta" / "esc50.csv", esc50_dir / "audio")[:10]
    cfg = _cfg(splits={"train": 3, "val": 1, "test": 1}, duration=5.0)
    res = synthesize(clips, tmp_path / "out", cfg, workers=1, plot=False)
    assert res.stats["pool"]["n_sources"] == 10
    syn = Synthesizer(load_pool(clips, cfg)[0], cfg)
    cats = {c.labels[0] for c in clips}
    n = 0
    for i in range(3):
        sc = syn.render("train", i)
        assert {e.label for e in sc.events} <= cats
        n += _check_isolated_tracks(sc, cfg)
    assert n >= 3
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    recs = [set(v["recordings"]) for v in splits.values()]
    assert sum(len(r) for r in recs) == len(set.union(*recs))  # no recording in two splits
