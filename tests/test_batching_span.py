"""ClipDataset reads only the crop it needs (issue 10.7: a 30-min file in a training manifest was
decoded and resampled whole for every 5-s crop), and the crop is the one a whole-file read gives."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from finelap.audio import load_audio
from finelap.data.batching import ClipDataset
from finelap.data.types import Clip


def _write(path, seconds: float, sr: int) -> None:
    rng = np.random.default_rng(0)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    # a chirp plus noise: every offset looks different, so a misplaced crop cannot match by accident
    x = 0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t) + 0.05 * rng.standard_normal(n)
    sf.write(path, x.astype(np.float32), sr)


@pytest.mark.parametrize("sr", [16000, 44100])
def test_crop_reads_only_its_span_and_matches_a_whole_file_crop(tmp_path, sr):
    path = tmp_path / f"long_{sr}.wav"
    _write(path, 90.0, sr)
    ds = ClipDataset([Clip(str(path), captions=["a chirp"])], 16000, clip_seconds=2.0, random_crop=True, seed=3)
    whole = load_audio(path, 16000)
    n = 32000
    starts = set()
    for step in range(4):
        tracemalloc.start()
        try:
            item = ds[(step, 0, 0)]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # the whole file is 90 s (5.8 MB at 16 kHz float32, 15.9 MB at 44.1 kHz); the crop 2 s (128 kB)
        assert peak < 1.5e6, f"peak {peak / 1e6:.1f} MB for a 2-s crop: the file was decoded whole"
        wave, start = item["wave"], int(round(item["start_s"] * 16000))
        assert wave.shape == (n,) and wave.dtype == np.float32
        ref = whole[start : start + n]
        if sr == 16000:
            assert np.array_equal(wave, ref)  # no resampling: the very same samples
        else:  # resampled span vs resampled file: equal up to the resampler's rounding
            assert np.abs(wave - ref).max() < 1e-4
        assert np.array_equal(ds[(step, 0, 0)]["wave"], wave)  # a pure function of the key
        starts.add(start)
    assert len(starts) == 4  # random crops, not always the start
    assert max(starts) > len(whole) // 2


def test_crop_of_a_file_shorter_than_its_header_uses_what_is_there(tmp_path):
    """A WAV cut off mid-write keeps its original length in the header: the span read comes back
    short, and the crop falls back to the samples that really exist."""
    path = tmp_path / "cut.wav"
    _write(path, 20.0, 16000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 4])  # 5 s of the 20 s the header announces
    ds = ClipDataset([Clip(str(path), captions=["x"])], 16000, clip_seconds=2.0, seed=0)
    real = load_audio(path, 16000)
    for step in range(6):
        item = ds[(step, 0, 0)]
        if "error" in item:  # this libsndfile refuses the file: a named error, not a crash
            assert "cut.wav" in item["error"]
            continue
        start = int(round(item["start_s"] * 16000))
        assert len(item["wave"]) == min(32000, len(real)) and np.array_equal(item["wave"], real[start : start + len(item["wave"])])
