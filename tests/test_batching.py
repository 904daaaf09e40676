from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from finelap.audio import Timeline
from finelap.data.batching import ClipDataset, Collate, MixedBatchSampler, split_by_supervision
from finelap.data.phrases import PhraseClusters
from finelap.data.types import Clip, Event


def _clips(tmp_path, n=6):
    clips = []
    for i in range(n):
        p = tmp_path / f"c{i}.wav"
        sf.write(p, np.full(16000 * (1 + i % 3), 0.01 * (i + 1), np.float32), 16000)
        if i % 2:
            clips.append(Clip(str(p), captions=[f"caption {i}"]))
        else:
            clips.append(Clip(str(p), events=[Event("dog", 0.2, 0.6), Event("rain", 0.0, 1.0)], duration=1.0 + i % 3))
    return clips


def test_sampler_ratios_and_determinism():
    groups = {"captions": list(range(10)), "events": list(range(10, 20))}
    s = MixedBatchSampler(groups, {"captions": 0.25, "events": 0.75}, batch_size=8, seed=3, max_steps=5)
    batches = list(s)
    assert len(batches) == 5
    for b in batches:
        idx = [k[2] for k in b]
        assert sum(i < 10 for i in idx) == 2 and sum(i >= 10 for i in idx) == 6
    # resume at step 3 gives exactly the remaining batches
    resumed = list(MixedBatchSampler(groups, {"captions": 0.25, "events": 0.75}, 8, seed=3, start_step=3, max_steps=5))
    assert resumed == batches[3:]


def test_sampler_buckets_keep_similar_durations():
    durations = [1.0] * 50 + [30.0] * 50
    s = MixedBatchSampler({"all": list(range(100))}, {"all": 1.0}, 8, seed=0, max_steps=20, durations=durations, buckets=2)
    for b in s:
        d = {durations[k[2]] for k in b}
        assert len(d) == 1


def test_sampler_rejects_empty():
    import pytest

    with pytest.raises(ValueError, match="no data"):
        MixedBatchSampler({"events": []}, {"events": 1.0}, 4)


def test_collate_targets_follow_timeline(tmp_path):
    clips = _clips(tmp_path)
    pc = PhraseClusters.build(["dog", "rain", "piano", "car horn"])
    ds = ClipDataset(clips, clusters=pc, phrases_per_clip=4, clip_seconds=None)
    tl = Timeline(frame_rate_hz=10.0, sample_rate=16000, hop_length=160, downsample=10)
    coll = Collate(tl, phrases_per_clip=4)
    batch = coll([ds[(0, j, i)] for j, i in enumerate([0, 1, 2])])
    assert batch.wave.shape == (3, 48000)
    assert batch.lengths.tolist() == [16000, 32000, 48000]
    assert batch.frame_targets is not None
    t = tl.num_frames_for_samples(48000)
    assert batch.frame_targets.shape == (3, t, 4)
    assert batch.has_frames.tolist() == [True, False, True]
    # clip 0: phrase slots 0,1 are its positives (dog/rain in label order), then 2 negatives
    ph = batch.phrases[0]
    dog, rain = ph.index("dog"), ph.index("rain")
    expect_dog = tl.rasterize([("d", 0.2, 0.6)], ["d"], t)[:, 0]
    np.testing.assert_array_equal(batch.frame_targets[0, :, dog].numpy(), expect_dog)
    assert batch.frame_targets[0, :, rain].sum() == 10  # 1 s at 10 Hz
    assert batch.frame_targets[0, :, 2:].sum() == 0
    assert batch.frame_targets[1].sum() == 0 and batch.phrase_mask[1].sum() == 0
    assert batch.captions[1] == "caption 1" and batch.captions[0] == "dog and rain"


def test_bad_file_is_skipped_and_reported(tmp_path):
    clips = _clips(tmp_path, 2)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    clips.append(Clip(str(bad), captions=["x"]))
    ds = ClipDataset(clips)
    batch = Collate(Timeline(25.0, sample_rate=16000, hop_length=160, downsample=4))([ds[i] for i in range(3)])
    assert batch.size == 2 and len(batch.skipped) == 1 and "bad.wav" in batch.skipped[0]


def test_random_crop_is_reproducible_and_shifts_events(tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, np.arange(16000 * 4, dtype=np.float32) / 1e5, 16000)
    clip = Clip(str(p), events=[Event("x", 1.0, 3.0)], duration=4.0)
    ds = ClipDataset([clip], clip_seconds=2.0, random_crop=True, seed=7)
    a, b = ds[(5, 0, 0)], ds[(5, 0, 0)]
    np.testing.assert_array_equal(a["wave"], b["wave"])
    start = a["wave"][0] * 1e5 / 16000
    ev = a["events"][0]
    assert abs(ev.onset - max(0.0, 1.0 - start)) < 1e-3 and abs(ev.offset - min(2.0, 3.0 - start)) < 1e-3
    assert split_by_supervision([clip, Clip("y", captions=["c"])]) == {"events": [0], "captions": [1]}
