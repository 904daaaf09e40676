"""Calibration of detection settings (finelap.eval.tasks.calibrate_detection) on hand-made
score/reference sets whose best settings are known, and how the stored settings are resolved."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.audio import Timeline
from finelap.config import EvalConfig
from finelap.data.types import Clip, Event
from finelap.errors import ConfigError, FinelapError
from finelap.eval.tasks import Evaluatable, calibrate_detection, class_support
from finelap.scoring import FrameScores, fmt_threshold, make_prompt, resolve_detection_settings, suggest_threshold
from conftest import record_statistics_sizes

TEMPLATE = "the sound of {}"
RATE = 10.0  # frames per second of the fake scores


def _wav(path, seconds=4.0, sr=8000):
    sf.write(str(path), np.zeros(int(seconds * sr), dtype=np.float32), sr)
    return str(path)


def _fake(tmp_path, spec):
    """spec: {file: {class: [(start_s, end_s, score), ...]}} on a 0.05 floor -> (clips, fns, calls).
    Events are the spans marked with an 'E' as 4th element."""
    clips, table = [], {}
    classes = sorted({c for f in spec.values() for c in f})
    for name, per in spec.items():
        path = _wav(tmp_path / f"{name}.wav")
        s = np.full((40, len(classes)), 0.05)
        events = []
        for c, spans in per.items():
            for span in spans:
                a, b, v = span[:3]
                s[int(a * RATE) : int(b * RATE), classes.index(c)] = v
                if len(span) > 3:
                    events.append(Event(c, a, b))
        table[path] = s
        clips.append(Clip(path, events=events, duration=4.0))
    calls = []

    def frame_scores(path, texts):
        calls.append(path)
        cols = [classes.index(next(c for c in classes if make_prompt(TEMPLATE, c) == t)) for t in texts]
        return FrameScores(table[path][:, cols], Timeline(RATE), 4.0)

    return clips, Evaluatable(frame_scores=frame_scores, prompt_template=TEMPLATE, name="fake"), calls


def test_calibration_on_a_long_file_keeps_the_statistics_small(tmp_path, monkeypatch):
    """sed_scores_eval's collar statistics of one file are (thresholds x detections x events)
    arrays: for a 30-min file of noisy scores, tens of GB. Calibration goes through
    `metrics.collar_deltas`, which keeps them small."""
    from sed_scores_eval.collar_based import intermediate_statistics as cb

    rng = np.random.default_rng(0)
    n = 3000  # 5 minutes at 10 frames/s, a distinct score in nearly every frame
    s = 0.2 * rng.random((n, 1))
    events = [Event("dog", float(a), float(a) + 2.0) for a in range(10, 290, 40)]
    for e in events:
        s[int(e.onset * RATE) : int(e.offset * RATE), 0] += 0.6
    path = _wav(tmp_path / "long.wav")

    def frame_scores(audio, texts):
        return FrameScores(s, Timeline(RATE), n / RATE)

    fns = Evaluatable(frame_scores=frame_scores, prompt_template=TEMPLATE, name="fake")
    seen = record_statistics_sizes(monkeypatch, cb)
    cal = calibrate_detection(fns, [Clip(path, events=events, duration=n / RATE)],
                              grid={"median_filter_s": [0.0], "min_duration_s": [0.0], "merge_gap_s": [0.0]})  # fmt: skip
    assert 0.2 <= cal["threshold"] < 0.6 and cal["score"] == 1.0  # the events, and nothing else
    assert seen and max(seen) <= 100_000, (len(seen), max(seen))


def test_best_threshold_is_the_known_one_and_scores_are_computed_once(tmp_path):
    # dog: true events score 0.7 and 0.55, false blobs 0.45 and 0.35. Event F1 (micro) by
    # threshold: < 0.35 -> 2/3, [0.35, 0.45) -> 0.8, [0.45, 0.55) -> 1.0, [0.55, 0.7) -> 2/3.
    spec = {
        "a": {"dog": [(1.0, 2.0, 0.7, "E"), (3.0, 3.5, 0.45)]},
        "b": {"dog": [(0.5, 1.5, 0.55, "E"), (2.5, 3.0, 0.35)]},
    }
    clips, fns, calls = _fake(tmp_path, spec)
    cal = calibrate_detection(fns, clips, grid={"median_filter_s": [0.0], "min_duration_s": [0.0], "merge_gap_s": [0.0]})
    assert 0.45 < cal["threshold"] < 0.55 and cal["score"] == pytest.approx(1.0)
    assert cal["classes"] == ["dog"] and cal["events_per_class"] == {"dog": 2} and cal["n_events"] == 2
    assert cal["class_thresholds"] == {}  # 2 events < min_class_events (5): the global threshold
    assert "event F1" in cal["criterion"] and cal["prompt_template"] == TEMPLATE
    assert sorted(calls) == sorted(c.audio for c in clips)  # one frame_scores call per file, whatever the grid


def test_median_filter_is_chosen_when_it_removes_spikes(tmp_path):
    # one-frame spikes of 0.9 in a file without events are false positives at any threshold
    # below 0.9 unless a median filter removes them; the smallest filter that does (0.2 s = 3
    # frames at 10 Hz) is chosen.
    spec = {
        "a": {"dog": [(1.0, 2.0, 0.7, "E")]},
        "b": {"dog": [(0.5, 1.5, 0.6, "E")]},
        "c": {"dog": [(1.0, 1.1, 0.9), (2.0, 2.1, 0.9), (3.0, 3.1, 0.9)]},
    }
    clips, fns, _ = _fake(tmp_path, spec)
    cal = calibrate_detection(fns, clips, grid={"min_duration_s": [0.0], "merge_gap_s": [0.0]})
    assert cal["median_filter_s"] == 0.2 and cal["score"] == pytest.approx(1.0)
    raw = calibrate_detection(fns, clips, grid={"median_filter_s": [0.0], "min_duration_s": [0.0], "merge_gap_s": [0.0]})
    assert raw["score"] < 1.0


def test_min_duration_removes_short_false_positives(tmp_path):
    spec = {
        "a": {"dog": [(1.0, 2.0, 0.7, "E")]},
        "b": {"dog": [(0.5, 1.5, 0.7, "E"), (2.5, 2.8, 0.7)]},  # a 0.3-s blob as strong as the events
    }
    clips, fns, _ = _fake(tmp_path, spec)
    cal = calibrate_detection(fns, clips, grid={"median_filter_s": [0.0], "min_duration_s": [0.0, 0.5], "merge_gap_s": [0.0]})
    assert cal["min_duration_s"] == 0.5 and cal["score"] == pytest.approx(1.0)


def test_per_class_thresholds_only_with_enough_events_and_shrunk(tmp_path):
    # "dog" events score 0.8 with false blobs at 0.6 (best threshold in [0.6, 0.8)); "cat" events
    # score 0.3 with blobs at 0.2 (best in [0.2, 0.3)); "bird" has one event only.
    spec = {}
    for i in range(6):
        spec[f"d{i}"] = {"dog": [(1.0, 2.0, 0.8, "E"), (3.0, 3.5, 0.6)]}
        spec[f"c{i}"] = {"cat": [(1.0, 2.0, 0.3, "E"), (3.0, 3.5, 0.2)]}
    spec["b0"] = {"bird": [(1.0, 2.0, 0.5, "E")]}
    clips, fns, _ = _fake(tmp_path, spec)
    cal = calibrate_detection(fns, clips, min_class_events=3, grid={"median_filter_s": [0.0], "min_duration_s": [0.0],
                                                                   "merge_gap_s": [0.0]})  # fmt: skip
    g = cal["threshold"]
    assert set(cal["class_thresholds"]) == {"cat", "dog"}  # bird: 1 event < 3
    w = 6 / (6 + 3)
    dog, cat = cal["class_thresholds"]["dog"], cal["class_thresholds"]["cat"]
    # shrunk toward the global threshold by n / (n + min_class_events)
    assert (dog - g) / w + g == pytest.approx(0.7, abs=0.11) and (cat - g) / w + g == pytest.approx(0.25, abs=0.06)
    assert 0 < cal["score_global_threshold"] <= cal["score"] <= 1


def test_class_support_counts_distinct_recordings_where_the_data_name_them():
    def clip(labels, **meta):
        return Clip("x.wav", events=[Event(c, 0.0, 1.0) for c in labels], meta=meta), [(0.0, 1.0, c) for c in labels]

    items = [
        clip(["dog", "cat"], sources=[{"label": "dog", "recording": "dog-1"}, {"label": "cat", "recording": "cat-1"}]),
        clip(["dog"], sources=[{"label": "dog", "recording": "dog-1"}]),  # the same dog recording again
        clip(["dog", "cat"], sources=[{"label": "dog", "recording": "dog-2"}, {"label": "cat", "recording": "cat-2"}]),
        clip(["bird"], src_file="b-7"),  # a single clip: its src_file
        clip(["bird"], src_file="b-7"),
        clip(["cat"]),  # no recording named: cat falls back to its events
        clip(["owl"]),
    ]
    support, unit = class_support(items, ["bird", "cat", "dog", "owl", "yak"])
    assert support == {"bird": 1, "cat": 3, "dog": 2, "owl": 1, "yak": 0}
    assert unit == {"bird": "recordings", "cat": "events", "dog": "recordings", "owl": "events", "yak": "events"}


def test_events_cut_from_one_recording_do_not_earn_a_class_threshold(tmp_path):
    """The same scores as above; "dog"'s 6 events come from one recording (a synthesised
    soundscape's sources[].recording), "cat"'s from 6: only cat gets its own threshold, and it is
    shrunk by its recordings, not its events."""
    spec = {}
    for i in range(6):
        spec[f"d{i}"] = {"dog": [(1.0, 2.0, 0.8, "E"), (3.0, 3.5, 0.6)]}
        spec[f"c{i}"] = {"cat": [(1.0, 2.0, 0.3, "E"), (3.0, 3.5, 0.2)]}
    clips, fns, _ = _fake(tmp_path, spec)
    for c in clips:
        label = c.events[0].label
        rec = f"{label}-0" if label == "dog" else f"{label}-{Path(c.audio).stem}"
        c.meta["sources"] = [{"label": label, "recording": rec, "start": 1.0, "end": 2.0}]
    grid = {"median_filter_s": [0.0], "min_duration_s": [0.0], "merge_gap_s": [0.0]}
    cal = calibrate_detection(fns, clips, min_class_events=3, grid=grid)
    assert cal["support_per_class"] == {"cat": [6, "recordings"], "dog": [1, "recordings"]}
    assert set(cal["class_thresholds"]) == {"cat"} and cal["events_per_class"] == {"cat": 6, "dog": 6}
    for c in clips:  # without recording names, both classes count their 6 events (as before)
        c.meta.clear()
    assert set(calibrate_detection(fns, clips, min_class_events=3, grid=grid)["class_thresholds"]) == {"cat", "dog"}


def test_calibration_needs_strong_labels(tmp_path):
    clips, fns, _ = _fake(tmp_path, {"a": {"dog": [(1.0, 2.0, 0.7)]}})
    with pytest.raises(FinelapError, match="strong labels"):
        calibrate_detection(fns, clips)


# ---------------------------------------------------------------------------- resolving stored settings


def test_settings_resolve_from_calibration_defaults_and_flags():
    ev = EvalConfig()
    st = resolve_detection_settings(ev, ["dog"])
    assert st.source == "defaults" and st.postprocess.threshold == 0.5 and "not calibrated" in st.describe()
    ev = EvalConfig(calibration={"threshold": 0.2, "class_thresholds": {"dog": 0.3}, "median_filter_s": 0.48,
                                 "min_duration_s": 0.1, "merge_gap_s": 0.0, "classes": ["dog", "cat"], "data": "val.jsonl",
                                 "score": 0.61})  # fmt: skip
    st = resolve_detection_settings(ev, ["dog", "cat", "violin"])
    assert st.source == "calibration" and st.postprocess.threshold == {"dog": 0.3, "*": 0.2}
    assert st.postprocess.median_filter_s == 0.48 and st.uncalibrated_queries == ["violin"]
    assert "calibrated on val.jsonl" in st.describe() and "\n" not in st.describe()
    st = resolve_detection_settings(ev, ["dog"], threshold=0.7)
    assert st.postprocess.threshold == 0.7 and st.overridden == ["threshold=0.7"] and st.postprocess.median_filter_s == 0.48
    with pytest.raises(FinelapError, match="threshold"):
        resolve_detection_settings(ev, ["dog"], threshold=2.0)
    with pytest.raises(ConfigError, match="calibration.threshold"):
        EvalConfig(calibration={"threshold": 1.5})


def test_the_threshold_used_for_a_query_and_what_it_is():
    cal = {"threshold": 0.285422, "class_thresholds": {"dog": 0.31265}, "classes": ["dog", "cat"]}
    st = resolve_detection_settings(EvalConfig(calibration=cal), ["dog", "cat", "violin"])
    assert st.threshold_for("dog") == (0.31265, "per-class")
    assert st.threshold_for("cat") == (0.285422, "global") and st.threshold_for("violin") == (0.285422, "global")
    assert st.threshold_note("dog") == "0.313 (per-class threshold)" and st.threshold_note("cat") == "0.285 (global threshold)"
    given = resolve_detection_settings(EvalConfig(calibration=cal), ["dog"], threshold=0.4)
    assert given.threshold_for("dog") == (0.4, "given")
    assert resolve_detection_settings(EvalConfig(), ["dog"]).threshold_note("dog") == "0.5 (default threshold)"
    assert [fmt_threshold(v) for v in (0.285422, 0.5, 0.0, 1.0, 0.0004)] == ["0.285", "0.5", "0", "1", "0.0004"]


def test_nothing_found_advice_tells_a_low_peak_from_a_filtered_one():
    from finelap.scoring import nothing_found_advice

    cal = {"threshold": 0.277, "class_thresholds": {"dog": 0.358}, "classes": ["dog"], "median_filter_s": 1.0, "min_duration_s": 0.25}
    st = resolve_detection_settings(EvalConfig(calibration=cal), ["dog", "accordion"])
    low = nothing_found_advice(0.294, st, "dog")
    assert low.startswith("under the threshold 0.358 (per-class threshold)") and "--threshold 0.26" in low
    # a raw peak above the threshold that the median filter / minimum duration removed is not "under" it
    brief = nothing_found_advice(0.417, st, "accordion")
    assert brief.startswith("above the threshold 0.277 (global threshold)") and "1-s median filter" in brief
    assert "0.25-s minimum duration" in brief and "under the threshold" not in brief


def test_suggested_threshold_is_just_below_the_peak():
    assert suggest_threshold(0.078) == pytest.approx(0.07)
    assert suggest_threshold(0.5) == pytest.approx(0.45)
    assert 0 < suggest_threshold(0.0012) < 0.0012


def test_overlapping_reference_events_of_a_class_are_merged_not_an_error(tmp_path):
    # sed_scores_eval asserts that events of one class do not overlap; annotations often do
    spec = {"a": {"dog": [(1.0, 2.0, 0.7, "E"), (1.5, 2.5, 0.7, "E")]}, "b": {"dog": [(0.5, 1.5, 0.6, "E")]}}
    clips, fns, _ = _fake(tmp_path, spec)
    cal = calibrate_detection(fns, clips, grid={"median_filter_s": [0.0], "min_duration_s": [0.0], "merge_gap_s": [0.0]})
    assert cal["score"] == pytest.approx(1.0) and cal["threshold"] < 0.6
