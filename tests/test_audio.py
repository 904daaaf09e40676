from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from finelap.audio import LogMel, MelConfig, Timeline, audio_duration, load_audio, mel_filterbank, to_float32
from finelap.errors import AudioError


def _tone(sr: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("ext,subtype", [(".wav", "PCM_16"), (".wav", "FLOAT"), (".flac", "PCM_24"), (".ogg", "VORBIS")])
def test_load_formats_resample_to_16k(tmp_path, ext, subtype):
    x = _tone(44100, 1.0)
    p = tmp_path / f"a{ext}"
    sf.write(p, x, 44100, subtype=subtype)
    y = load_audio(p, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 16000) <= 1
    # the tone survives resampling: dominant bin at 440 Hz
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 2
    assert audio_duration(p) == pytest.approx(1.0, abs=1e-3)


def test_stereo_to_mono_and_native_rate(tmp_path):
    left, right = _tone(8000, 0.5, 200), np.zeros(4000, np.float32)
    p = tmp_path / "st.wav"
    sf.write(p, np.stack([left, right], 1), 8000, subtype="FLOAT")
    y = load_audio(p, sample_rate=None)
    np.testing.assert_allclose(y, 0.5 * left, atol=1e-7)
    both = load_audio(p, sample_rate=None, mono=False)
    assert both.shape == (2, 4000)


def test_int_pcm_to_float32():
    np.testing.assert_allclose(to_float32(np.array([0, 16384, -32768], np.int16)), [0.0, 0.5, -1.0])
    np.testing.assert_allclose(to_float32(np.array([128, 255, 0], np.uint8)), [0.0, 127 / 128, -1.0])
    assert to_float32(np.zeros(3, np.float64)).dtype == np.float32


def test_window_read(tmp_path):
    x = np.arange(16000, dtype=np.float32) / 16000
    p = tmp_path / "ramp.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    w = load_audio(p, 16000, start_s=0.25, duration_s=0.5)
    np.testing.assert_allclose(w, x[4000:12000])


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"RIFF\x00\x00garbage-not-a-wave" * 4), "corrupt"),
    ],
)
def test_bad_files_raise_naming_file(tmp_path, make, problem):
    p = tmp_path / "bad.wav"
    make(p)
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert str(p) in str(e.value) and problem in str(e.value)


def test_zero_length_nan_unsupported_missing(tmp_path):
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(p)
    p = tmp_path / "nan.wav"
    x = _tone(16000, 0.1)
    x[10] = np.nan
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or Inf"):
        load_audio(p)
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(AudioError, match="unsupported format '.txt'"):
        load_audio(p)
    with pytest.raises(AudioError, match="file not found"):
        load_audio(tmp_path / "missing.wav")


def test_truncated_wav_warns_naming_the_file(tmp_path):
    """A WAV cut off mid-copy: libsndfile quietly reads the part that is there (0.22 s of 2 s).
    The rule: read it, but warn once per file, naming it and both durations."""
    import warnings

    from finelap.audio import TruncatedAudioWarning

    x = np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32)
    full = tmp_path / "full.wav"
    sf.write(full, x, 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + 7040])
    with pytest.warns(TruncatedAudioWarning, match=r"cut\.wav: truncated file: its header declares 2\.000 s of audio but only 0\.220 s"):
        assert audio_duration(cut) == pytest.approx(0.22)
    cut2 = tmp_path / "cut2.wav"
    cut2.write_bytes(full.read_bytes()[: 44 + 7040])
    with pytest.warns(TruncatedAudioWarning, match="cut2.wav"):
        y = load_audio(cut2)
    np.testing.assert_allclose(y, x[:3520], atol=1e-4)  # the part that is there is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete files (odd-sized 24-bit data, extra chunks) do not warn
        audio_duration(full), load_audio(full)
        sf.write(tmp_path / "odd.wav", np.zeros((101, 3)), 16000, subtype="PCM_24")
        load_audio(tmp_path / "odd.wav", start_s=0.001)
        load_audio(cut2, start_s=0.1)  # already reported once for this file


def test_mp3_clear_error_or_loads(tmp_path):
    """mp3 decodes where libsndfile supports it; otherwise the error says so (never garbage)."""
    p = tmp_path / "x.mp3"
    if "MP3" in sf.available_formats():
        sf.write(p, _tone(16000, 0.5), 16000, format="MP3")
        assert len(load_audio(p)) > 0
    else:
        p.write_bytes(b"\xff\xfb" + b"\x00" * 100)
        with pytest.raises(AudioError, match="mp3"):
            load_audio(p)


def test_real_ogg_decodes(esc50_dir):
    f = sorted((esc50_dir / "audio").glob("*.ogg"))[0]
    y = load_audio(f, 16000)
    info = sf.info(str(f))
    assert info.samplerate == 44100
    assert len(y) == pytest.approx(info.frames * 16000 / 44100, abs=2) and np.isfinite(y).all()
    assert audio_duration(f) == pytest.approx(5.0, abs=0.01)


# ----------------------------------------------------------------------------- log-mel


def test_mel_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(16000, 512, 64, 50.0, 8000.0)
    ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=50.0, fmax=8000.0, htk=False, norm="slaney", dtype=np.float64)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def _librosa_logmel(x: np.ndarray, cfg: MelConfig) -> np.ndarray:
    import librosa

    S = librosa.feature.melspectrogram(
        y=x.astype(np.float64), sr=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
        hop_length=cfg.hop_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
        center=True, pad_mode="constant", power=2.0,
    )
    return librosa.power_to_db(S, ref=1.0, amin=cfg.amin, top_db=cfg.top_db)


@pytest.mark.parametrize("top_db", [None, 80.0])
def test_logmel_matches_librosa_on_real_esc50(esc50_dir, top_db):
    """Issue contract: max abs error <= 1e-3 dB against librosa on real clips."""
    pytest.importorskip("librosa")
    cfg = MelConfig(top_db=top_db)
    mel = LogMel(cfg)
    files = sorted((esc50_dir / "audio").glob("*.ogg"))[::80]  # 16 clips across classes
    worst = 0.0
    for f in files:
        x = load_audio(f, cfg.sample_rate)
        ours = mel(torch.from_numpy(x)).numpy()
        ref = _librosa_logmel(x, cfg)
        assert ours.shape == ref.shape == (cfg.n_mels, cfg.num_frames(len(x)))
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= 1e-3, worst


def test_logmel_batched_equals_single_and_other_params():
    pytest.importorskip("librosa")
    cfg = MelConfig(sample_rate=22050, n_fft=1024, win_length=1024, hop_length=256, n_mels=80, fmin=0.0, fmax=11025.0)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((3, 22050)).astype(np.float32) * 0.1
    mel = LogMel(cfg)
    batched = mel(torch.from_numpy(xs))
    for i in range(3):
        single = mel(torch.from_numpy(xs[i]))
        torch.testing.assert_close(batched[i], single)
        assert np.abs(single.numpy() - _librosa_logmel(xs[i], cfg)).max() <= 1e-3


def test_melconfig_rejects_contradictions():
    with pytest.raises(ValueError, match="win_length"):
        MelConfig(n_fft=256, win_length=400)
    with pytest.raises(ValueError, match="fmax"):
        MelConfig(fmax=9000.0)


# ----------------------------------------------------------------------------- Timeline


def test_timeline_frames_seconds_roundtrip():
    tl = Timeline.from_mel(MelConfig(), downsample=4)
    assert tl.frame_rate_hz == 25.0 and tl.hop_s == pytest.approx(0.04)
    assert tl.seconds_to_frame(0.0) == 0
    assert tl.seconds_to_frame(0.039) == 0
    assert tl.seconds_to_frame(0.04) == 1
    assert tl.frame_start(25) == pytest.approx(1.0)
    np.testing.assert_allclose(tl.frame_edges(3, duration_s=0.1), [0.0, 0.04, 0.08, 0.1])
    # encoder frames for n samples: ceil((1 + n // hop) / 4)
    assert tl.num_frames_for_samples(160000) == 251
    assert tl.num_frames_for_samples(100) == 1
    assert tl.shifted(10.0).frame_start(0) == 10.0


def test_rasterize_hand_case():
    tl = Timeline(frame_rate_hz=10.0)  # 100 ms frames
    y = tl.rasterize([("dog", 0.15, 0.42), ("car", 0.0, 0.05), ("cat", 0.91, 0.93), ("unknown", 0, 1)], ["dog", "car", "cat"], 10)
    # dog covers frame1 50%, frames 2-3 fully, frame 4 20% -> frames 1,2,3
    np.testing.assert_array_equal(np.flatnonzero(y[:, 0]), [1, 2, 3])
    # car covers 50% of frame 0
    np.testing.assert_array_equal(np.flatnonzero(y[:, 1]), [0])
    # cat is 20 ms long: still marks the frame holding its midpoint
    np.testing.assert_array_equal(np.flatnonzero(y[:, 2]), [9])


def test_segments_merge_and_min_duration():
    tl = Timeline(frame_rate_hz=10.0)
    act = np.array([0, 1, 1, 0, 1, 0, 0, 0, 1, 1], bool)
    assert tl.segments(act) == [(0.1, 0.3), (0.4, 0.5), (0.8, 1.0)]
    merged = tl.segments(act, merge_gap_s=0.15)
    assert [tuple(round(v, 6) for v in s) for s in merged] == [(0.1, 0.5), (0.8, 1.0)]
    assert [tuple(round(v, 6) for v in s) for s in tl.segments(act, min_duration_s=0.15)] == [(0.1, 0.3), (0.8, 1.0)]
    # last edge clipped to the clip duration
    assert tl.segments(act, duration_s=0.95)[-1] == (0.8, 0.95)


def test_rasterize_then_segments_roundtrip():
    tl = Timeline(frame_rate_hz=25.0)
    y = tl.rasterize([("a", 1.0, 2.2)], ["a"], 100)
    assert tl.segments(y[:, 0]) == [(pytest.approx(1.0), pytest.approx(2.2))]
