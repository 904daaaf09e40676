from __future__ import annotations

import numpy as np

from finelap.audio import Timeline
from finelap.data.batching import Collate
from finelap.data.types import Event


def test_collate_truncates_phrase_sets_longer_than_k():
    """A dataset built for K=20 collated with K=1 (validation) keeps the first phrase only."""
    item = {"wave": np.zeros(1600, np.float32), "key": "a", "caption": "", "phrases": ["dog", "rain", "car"],
            "positives": {"dog": [0], "rain": [1]}, "events": [Event("dog", 0.0, 0.05), Event("rain", 0.0, 0.1)],
            "labels": ["dog"], "has_events": True}
    b = Collate(Timeline(25.0, sample_rate=16000, hop_length=160, downsample=4), phrases_per_clip=1)([item])
    assert b.phrases == [["dog"]] and b.phrase_mask.tolist() == [[True]]
    assert b.frame_targets.shape == (1, 3, 1) and b.frame_targets[0, :, 0].sum() >= 1
