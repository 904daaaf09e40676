"""What the detection/grounding timelines and training curves show, read from the matplotlib
objects (legend texts, line colours, bar extents, axis scales), not from PNG bytes."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from finelap.audio import Timeline
from finelap.eval import plots as P
from finelap.eval.tasks import _example_queries

from _figures import assert_png_picture

SR = 16000


def _wave(seconds: float = 4.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for lg in fig.legends for t in lg.get_texts()]


def _legend_handle(fig, text: str):
    for lg in fig.legends:
        for h, t in zip(lg.legend_handles, lg.get_texts()):
            if t.get_text() == text:
                return h
    raise AssertionError(f"no legend entry {text!r} in {_legend_texts(fig)}")


def _scores(t: int = 100) -> np.ndarray:
    s = np.full((t, 2), 0.05)
    s[25:50, 0] = 0.8  # query 0 above 0.5 from 1.0 to 2.0 s (25 Hz frames)
    s[60:70, 1] = 0.3  # query 1 peaks at 0.3: nothing above 0.5
    return s


def test_threshold_line_has_its_legend_colour_and_value():
    fig = P.timeline_figure(_wave(), _scores(), Timeline(25.0), ["dog", "rain"], sample_rate=SR, threshold=0.5,
                            detections=[[(1.0, 2.0)], []])  # fmt: skip
    try:
        ax = fig.axes[1]
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(dashed) == 1 and set(dashed[0].get_ydata()) == {0.5}
        handle = _legend_handle(fig, "threshold 0.5")
        assert to_rgba(handle.get_color()) == to_rgba(dashed[0].get_color())
    finally:
        fig.clf()
    # per-class thresholds: one line per query, in the query's colour, each named with its value
    fig = P.timeline_figure(_wave(), _scores(), Timeline(25.0), ["dog", "rain"], sample_rate=SR, threshold=[0.5, 0.2])
    try:
        dashed = [ln for ln in fig.axes[1].get_lines() if ln.get_linestyle() == "--"]
        assert sorted(float(ln.get_ydata()[0]) for ln in dashed) == [0.2, 0.5]
        for text, curve in (("threshold 0.5 (dog)", "dog"), ("threshold 0.2 (rain)", "rain")):
            assert to_rgba(_legend_handle(fig, text).get_color()) == to_rgba(_legend_handle(fig, curve).get_color())
    finally:
        fig.clf()


def test_empty_detections_say_so_with_the_peak():
    fig = P.timeline_figure(_wave(), _scores(), Timeline(25.0), ["dog", "rain"], sample_rate=SR, threshold=0.5,
                            detections=[[(1.0, 2.0)], []])  # fmt: skip
    try:
        texts = [t.get_text() for t in fig.axes[1].texts]
        assert texts == ["no detection above 0.5 for rain (peak 0.3)"]  # not for dog, which has one
    finally:
        fig.clf()
    # each query's own threshold, rounded to 3 decimals, and what it is (a class's own or the global one)
    fig = P.timeline_figure(_wave(), _scores(), Timeline(25.0), ["dog", "rain"], sample_rate=SR, threshold=[0.954321, 0.285422],
                            threshold_kinds=["per-class", "global"], detections=[[], []])  # fmt: skip
    try:
        (text,) = [t.get_text() for t in fig.axes[1].texts]
        assert text.startswith("no detection above 0.954 (per-class threshold) for dog (peak ")
        assert "\nno detection above 0.285 (global threshold) for rain (peak 0.3)" in text
        for text, curve in (("per-class threshold 0.954 (dog)", "dog"), ("global threshold 0.285 (rain)", "rain")):
            assert to_rgba(_legend_handle(fig, text).get_color()) == to_rgba(_legend_handle(fig, curve).get_color())
    finally:
        fig.clf()


def test_reference_overlay_spans_the_right_seconds_and_marks_false_positive_queries():
    fig = P.timeline_figure(_wave(), _scores(), Timeline(25.0), ["dog", "rain"], sample_rate=SR, threshold=0.5,
                            detections=[[(1.0, 2.0)], [(2.4, 2.8)]], ground_truth=[[(0.9, 2.1), (3.0, 3.5)], []])  # fmt: skip
    try:
        lanes = fig.axes[2]
        ref = [c for c in lanes.collections if c.get_label() == "reference: dog"]
        assert len(ref) == 1
        spans = sorted((round(float(p.vertices[:, 0].min()), 3), round(float(p.vertices[:, 0].max()), 3)) for p in ref[0].get_paths())
        assert spans == [(0.9, 2.1), (3.0, 3.5)]
        assert not [c for c in lanes.collections if c.get_label() == "reference: rain"]
        det = [c for c in lanes.collections if c.get_label() == "detected: rain"][0]
        assert [(round(float(p.vertices[:, 0].min()), 3), round(float(p.vertices[:, 0].max()), 3)) for p in det.get_paths()] == [(2.4, 2.8)]
        legend = _legend_texts(fig)
        assert "dog" in legend and "rain (no reference event)" in legend and "reference event" in legend
    finally:
        fig.clf()


def test_log_scale_probabilities():
    s = _scores()
    s[0, 0] = 0.0  # log(0): drawn at the floor, not lost
    fig = P.timeline_figure(_wave(), s, Timeline(25.0), ["dog", "rain"], sample_rate=SR, threshold=0.5, log_scale=True)
    try:
        ax = fig.axes[1]
        assert ax.get_yscale() == "log" and "log" in ax.get_ylabel()
        lo, hi = ax.get_ylim()
        assert 0 < lo <= 0.05 and hi >= 1.0
    finally:
        fig.clf()
    fig = P.timeline_figure(_wave(), s, Timeline(25.0), ["dog", "rain"], sample_rate=SR)
    try:
        assert fig.axes[1].get_yscale() == "linear"
    finally:
        fig.clf()


def test_training_curves_put_clip_and_frame_losses_on_separate_axes(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "step,lr,train/clip/sigmoid,train/frame/sigmoid,train/loss,val/top1_accuracy\n"
        "1,0.001,7.0,0.10,7.2,\n2,0.0009,6.0,0.08,6.16,\n2,,,,,0.25\n4,0.0005,5.0,0.05,5.1,\n4,,,,,0.5\n"
    )
    fig = P.training_curves_figure(csv_path)
    try:
        by_title = {ax.get_title(loc="left"): ax for ax in fig.axes}
        assert list(by_title) == ["total loss (weighted sum)", "clip loss", "frame loss", "learning rate", "validation metrics"]
        clip = by_title["clip loss"].get_lines()
        frame = by_title["frame loss"].get_lines()
        assert [ln.get_label() for ln in clip] == ["clip/sigmoid"] and [ln.get_label() for ln in frame] == ["frame/sigmoid"]
        np.testing.assert_allclose(frame[0].get_ydata(), [0.10, 0.08, 0.05])
        lo, hi = by_title["frame loss"].get_ylim()
        assert hi < 1.0  # its own scale: not squashed under a clip loss of 5-7
    finally:
        fig.clf()
    assert_png_picture(P.plot_training_curves(csv_path, tmp_path / "curves.png"))


def test_eval_timeline_queries_include_top_scoring_false_positives():
    classes = ["a", "b", "c", "d", "e"]
    s = np.zeros((50, 5))
    s[:, 0] = 0.9  # reference class
    s[:, 2] = 0.7  # not in the reference, high: a candidate false positive
    s[:, 3] = 0.6
    s[:, 4] = 0.1
    gt = [(0.0, 1.0, "a")]
    assert _example_queries(s, classes, gt, dets=[]) == [0, 2, 3]  # reference + 2 top-scoring others
    # a detected false positive comes before a higher-scoring undetected one
    assert _example_queries(s, classes, gt, dets=[(0.0, 0.5, "e")]) == [0, 2, 4]
    assert _example_queries(s, classes, gt, dets=[], false_positives=0) == [0]
