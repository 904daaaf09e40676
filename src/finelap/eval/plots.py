"""Figures for evaluation reports and the `detect`/`ground --plot` commands (matplotlib, Agg).

Every function takes plain arrays, writes one PNG atomically and returns its path. matplotlib is
imported inside the functions (no import-time cost, no display needed). Time axes are always in
seconds and come from a `finelap.audio.Timeline`: the spectrogram's from the mel front-end, the
scores' from the encoder. The two are drawn on one shared seconds axis, so a score curve sits
exactly under the sound that caused it, whatever the two frame rates are.
"""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..audio import LogMel, MelConfig, Timeline, _hz_to_mel_slaney, _mel_to_hz_slaney
from ..errors import DataFormatError
from ..scoring import fmt_threshold
from ..utils import atomic_path

__all__ = [
    "display_mel_stream",
    "plot_confusion",
    "plot_per_class_ap",
    "plot_psd_roc",
    "plot_comparison",
    "plot_timeline",
    "timeline_figure",
    "training_curves_figure",
    "plot_similarity_heatmap",
    "plot_training_curves",
    "display_mel",
]

Segments = Sequence[tuple[float, float]]

# Spectrogram display: at most this many columns (long audio is average-pooled), this dynamic range.
_MAX_COLUMNS = 4000
_DYNAMIC_RANGE_DB = 80.0


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    plt = _plt()
    path = Path(path)
    try:
        with atomic_path(path, mode_suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _short(s: str, n: int = 32) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def _colors(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------- classification


def plot_confusion(cm: np.ndarray | Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix (C, C) of counts, rows = true class, columns = predicted class.

    Colours are row-normalised (fraction of each true class), so rare classes are as readable as
    frequent ones; counts are printed in the cells when C <= 20.
    """
    plt = _plt()
    m = np.asarray(cm, dtype=np.float64)
    c = len(labels)
    if m.shape != (c, c):
        raise ValueError(f"confusion matrix must be ({c}, {c}) for {c} labels, got {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    side = min(22.0, max(5.0, 0.24 * c + 3.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fs = 9 if c <= 20 else max(4, int(9 - c / 12))
    ax.set_xticks(range(c), [_short(l, 24) for l in labels], rotation=90, fontsize=fs)
    ax.set_yticks(range(c), [_short(l, 24) for l in labels], fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if frac[i, j] > 0.5 else "black")  # fmt: skip
    acc = np.trace(m) / max(1.0, m.sum())
    ax.set_title(title or f"Confusion matrix (top-1 accuracy {acc:.3f}, {int(m.sum())} clips)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of true class")
    return _save(fig, path)


def plot_per_class_ap(
    ap: Sequence[float | None] | Mapping[str, float | None], labels: Sequence[str] | None, path: str | Path, title: str = ""
) -> Path:
    """Horizontal bars of per-class average precision, best class on top, with the mean (mAP).

    ap: one value per label (None/NaN = undefined, drawn as "n/a"), or a {label: AP} dict (then
    `labels` may be None).
    """
    plt = _plt()
    if isinstance(ap, Mapping):
        labels = list(ap.keys()) if labels is None else list(labels)
        vals = [ap.get(l) for l in labels]
    else:
        vals = list(ap)
        if labels is None or len(labels) != len(vals):
            raise ValueError(f"need one label per AP value, got {None if labels is None else len(labels)} for {len(vals)}")
        labels = list(labels)
    v = np.array([np.nan if x is None else float(x) for x in vals])
    order = sorted(range(len(v)), key=lambda i: (np.isnan(v[i]), -np.nan_to_num(v[i]), labels[i]))
    n = len(order)
    fig, ax = plt.subplots(figsize=(8.0, min(30.0, max(3.0, 0.24 * n + 1.4))))
    y = np.arange(n)[::-1]  # best at the top
    shown = np.nan_to_num(v[order])
    ax.barh(y, shown, color=plt.get_cmap("viridis")(0.35 + 0.5 * shown), height=0.75)
    for yi, i in zip(y, order):
        txt = "n/a" if np.isnan(v[i]) else f"{v[i]:.2f}"
        ax.text(min(1.0, np.nan_to_num(v[i])) + 0.01, yi, txt, va="center", fontsize=7)
    ax.set_yticks(y, [_short(labels[i], 28) for i in order], fontsize=8 if n <= 40 else 6)
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.7, n - 0.3)
    valid = v[~np.isnan(v)]
    if valid.size:
        mean = float(valid.mean())
        ax.axvline(mean, color="crimson", ls="--", lw=1.2, label=f"mAP = {mean:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("average precision")
    ax.set_title(title or f"Per-class average precision ({n} classes)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_comparison(
    results: Mapping[str, Mapping[str, float | None]], metrics: Sequence[tuple[str, str]], path: str | Path, title: str = ""
) -> Path:
    """Grouped bars comparing models (or methods) on several metrics in [0, 1].

    results: {model name: {metric key: value}}; a missing/None/NaN value is drawn as "n/a".
    metrics: [(metric key, axis title), ...], one group of bars per metric, one bar per model.
    """
    plt = _plt()
    names = list(results)
    if not names or not metrics:
        raise ValueError("need at least one model and one metric to compare")
    vals = np.array([[np.nan if results[n].get(k) is None else float(results[n][k]) for k, _ in metrics] for n in names])
    m, k = vals.shape
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(6.0, k * max(1.4, 0.3 * m) + 1.5), 4.2))
    x = np.arange(k)
    for i, (name, color) in enumerate(zip(names, _colors(m))):
        xs = x - 0.4 + width * (i + 0.5)
        ax.bar(xs, np.nan_to_num(vals[i]), width * 0.92, color=color, label=name)
        for xi, v in zip(xs, vals[i]):
            ax.text(xi, (0.0 if np.isnan(v) else v) + 0.01, "n/a" if np.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=7, rotation=90)  # fmt: skip
    ax.set_xticks(x, [textwrap.fill(_short(t, 40), 14) for _, t in metrics], fontsize=9)
    top = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
    ax.set_ylim(0, min(1.05, max(0.1, top * 1.25 + 0.05)))
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(m, 5), loc="upper right")
    ax.set_title(title or f"{m} models on {k} metrics")
    return _save(fig, path)


def plot_psd_roc(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, max_efpr: float = 100.0, title: str = ""
) -> Path:
    """PSD-ROC staircases: {name: (efpr per hour, eTPR)}; x limited to `max_efpr` (the PSDS
    integration range), so the area on screen is the area that PSDS normalises."""
    plt = _plt()
    if not curves:
        raise ValueError("no PSD-ROC curves to plot")
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    for (name, (efpr, tpr)), col in zip(curves.items(), _colors(len(curves))):
        x, y = np.asarray(efpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size == 0:
            continue
        order = np.argsort(x, kind="mergesort")
        x, y = x[order], y[order]
        if x[0] > 0:  # nothing is detected below the first operating point
            x, y = np.r_[0.0, x], np.r_[0.0, y]
        # extend the last step to the right edge, so the curve visibly covers the integrated range
        x, y = np.r_[x, max(max_efpr, x[-1])], np.r_[y, y[-1]]
        ax.step(x, y, where="post", color=col, lw=1.8, label=name)
    ax.set_xlim(0, max_efpr)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("eFPR (false positives per hour)")
    ax.set_ylabel("eTPR (effective true positive rate)")
    ax.set_title(title or "PSD-ROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------- spectrogram helpers


def display_mel(wave: np.ndarray, sample_rate: int = 16000, max_columns: int = _MAX_COLUMNS) -> tuple[np.ndarray, Timeline, MelConfig]:
    """Log-mel for display: (n_mels, T_disp) dB, its Timeline and the MelConfig used.

    Computed in 60 s chunks (memory stays bounded for hours of audio) and average-pooled along
    time to at most `max_columns` columns; the returned Timeline accounts for the pooling.
    """
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"wave must be 1-D (mono), got shape {x.shape}")
    import torch

    cfg = MelConfig(sample_rate=sample_rate, fmax=min(8000.0, sample_rate / 2), compute_dtype="float32")
    mel = LogMel(cfg)
    n_mel = cfg.num_frames(len(x))
    pool = max(1, math.ceil(n_mel / max_columns))
    chunk = cfg.hop_length * 6000 * pool  # a whole number of pooled columns per chunk
    cols = []
    with torch.no_grad():
        for s in range(0, max(1, len(x)), chunk):
            seg = x[s : s + chunk]
            m = mel(torch.from_numpy(np.ascontiguousarray(seg))).numpy()  # (n_mels, 1 + len // hop)
            if s + chunk < len(x):  # the frame centred on the chunk's end is the next chunk's first
                m = m[:, : chunk // cfg.hop_length]
            cols.append(m)
    db = np.concatenate(cols, axis=1)[:, :n_mel]
    if pool > 1:
        t = db.shape[1] // pool * pool
        head = db[:, :t].reshape(db.shape[0], -1, pool).mean(axis=2)
        db = np.concatenate([head, db[:, t:].mean(axis=1, keepdims=True)], axis=1) if t < db.shape[1] else head
    return db, Timeline.from_mel(cfg, downsample=pool), cfg


def _spectrogram(ax: Any, audio: np.ndarray, audio_timeline: Timeline | None, sample_rate: int,
                 mel_config: MelConfig | None, duration_s: float | None) -> tuple[float, Any]:  # fmt: skip
    """Draw a log-mel on `ax` with a seconds x-axis; returns (end time in s, image)."""
    a = np.asarray(audio)
    if a.ndim == 1:
        mel, tl, mel_config = display_mel(a, sample_rate)
        end = len(a) / sample_rate
    elif a.ndim == 2:
        if audio_timeline is None:
            raise ValueError("a mel spectrogram (n_mels, T) needs its Timeline (audio_timeline=...)")
        mel, tl = a.astype(np.float32), audio_timeline
        end = float(tl.frame_edges(mel.shape[1])[-1])
    else:
        raise ValueError(f"audio must be a wave (N,) or a mel (n_mels, T), got shape {a.shape}")
    if duration_s is not None:
        end = tl.offset_s + float(duration_s)
    edges = tl.frame_edges(mel.shape[1])
    finite = mel[np.isfinite(mel)]
    vmax = float(finite.max()) if finite.size else 0.0
    im = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                   extent=(float(edges[0]), float(edges[-1]), 0, mel.shape[0]),
                   vmin=vmax - _DYNAMIC_RANGE_DB, vmax=vmax)  # fmt: skip
    n_mels = mel.shape[0]
    if mel_config is not None and mel_config.n_mels == n_mels:
        # label mel bands with their centre frequency: easier to read than band numbers
        centres = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(mel_config.fmin), _hz_to_mel_slaney(mel_config.fmax), n_mels + 2))[1:-1]
        ticks, names = [], []
        for f in (100, 250, 500, 1000, 2000, 4000, 8000, 16000):
            y = float(np.interp(f, centres, np.arange(n_mels))) + 0.5
            if mel_config.fmin <= f <= mel_config.fmax and (not ticks or y - ticks[-1] >= n_mels / 16):  # no overlaps
                ticks.append(y)
                names.append(f"{f / 1000:g}k" if f >= 1000 else f"{f}")
        ax.set_yticks(ticks, names, fontsize=8)
        ax.set_ylabel("frequency (Hz)")
    else:
        ax.set_ylabel("mel band")
    return end, im


def _check_scores(scores: np.ndarray, names: Sequence[str]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[1] != len(names):
        raise ValueError(f"scores must be (T, {len(names)}) for {len(names)} queries, got {np.shape(scores)}")
    return s


# ----------------------------------------------------------------------------- timelines


def timeline_figure(
    audio: np.ndarray,
    scores: np.ndarray,
    timeline: Timeline,
    queries: Sequence[str],
    *,
    audio_timeline: Timeline | None = None,
    sample_rate: int = 16000,
    mel_config: MelConfig | None = None,
    detections: Sequence[Segments] | None = None,
    ground_truth: Sequence[Segments] | None = None,
    threshold: float | Sequence[float] | None = None,
    duration_s: float | None = None,
    title: str = "",
    score_label: str = "probability",
    log_scale: bool = False,
    threshold_kinds: str | Sequence[str] | None = None,
) -> Any:
    """The figure of `plot_timeline` (a matplotlib Figure, not closed: the caller saves or closes
    it). Axes: `fig.axes[0]` spectrogram, `[1]` scores, `[2]` the event lanes when drawn."""
    plt = _plt()
    names = [str(q) for q in queries]
    s = _check_scores(scores, names)
    q = len(names)
    for what, segs in (("detections", detections), ("ground_truth", ground_truth)):
        if segs is not None and len(segs) != q:
            raise ValueError(f"{what} must hold one list of segments per query ({q}), got {len(segs)}")
    lanes = detections is not None or ground_truth is not None
    heights = [2.6, 2.2] + ([0.32 * q + 0.45] if lanes else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(12.0, sum(heights) + 1.0), sharex=True,
                             gridspec_kw={"height_ratios": heights, "hspace": 0.08})  # fmt: skip
    ax_spec, ax_s = axes[0], axes[1]
    end, _ = _spectrogram(ax_spec, audio, audio_timeline, sample_rate, mel_config, duration_s)
    edges = timeline.frame_edges(s.shape[0], duration_s)
    start = min(float(edges[0]), 0.0 if audio_timeline is None else audio_timeline.offset_s)
    end = max(end, float(edges[-1])) if duration_s is None else end
    cols = _colors(q)
    thr = None if threshold is None else np.broadcast_to(np.asarray(threshold, dtype=np.float64), (q,))
    kinds = [None] * q if threshold_kinds is None else (
        [threshold_kinds] * q if isinstance(threshold_kinds, str) else [str(k) for k in threshold_kinds])  # fmt: skip
    if len(kinds) != q:
        raise ValueError(f"threshold_kinds must hold one kind per query ({q}), got {len(kinds)}")

    def thr_text(k: int) -> str:  # "0.312 (per-class threshold)": the value as used, 3 decimals
        return fmt_threshold(thr[k]) + (f" ({kinds[k]} threshold)" if kinds[k] else "")

    def thr_legend(k: int) -> str:  # "per-class threshold 0.312"
        return (f"{kinds[k]} " if kinds[k] else "") + f"threshold {fmt_threshold(thr[k])}"

    # a query without any reference event in this file is a candidate false positive: say so
    def label(k: int) -> str:
        extra = " (no reference event)" if ground_truth is not None and not ground_truth[k] else ""
        return _short(names[k], 40) + extra

    floor = 1e-6  # log axis: probabilities below this are drawn at it (log(0) has no place)
    shown = np.clip(s, floor, None) if log_scale else s
    handles = []
    for k in range(q):
        h = ax_s.stairs(shown[:, k], edges, color=cols[k], lw=1.6, baseline=None, label=label(k))
        handles.append(h)
        if detections is not None:
            for on, off in detections[k]:
                ax_s.axvspan(on, off, color=cols[k], alpha=0.18, lw=0)
    extra = []
    if thr is not None:
        if np.all(thr == thr[0]) and len(set(kinds)) == 1:  # one threshold: one black line, named with its value
            extra.append(ax_s.axhline(max(thr[0], floor) if log_scale else thr[0], color="black", ls="--", lw=1.0,
                                      label=thr_legend(0)))  # fmt: skip
        else:  # per-class thresholds: each in its query's colour, each named in the legend
            for k in range(q):
                extra.append(ax_s.axhline(max(thr[k], floor) if log_scale else thr[k], color=cols[k], ls="--", lw=1.0,
                                          label=f"{thr_legend(k)} ({_short(names[k], 20)})"))  # fmt: skip
    lo, hi = float(np.nanmin(s)) if s.size else 0.0, float(np.nanmax(s)) if s.size else 1.0
    if log_scale:
        ax_s.set_yscale("log")
        y0 = max(floor, min(lo, float(np.min(thr)) if thr is not None else lo)) * 0.8
        ax_s.set_ylim(y0, 1.2)
        # plain numbers (0.01, 0.1, 1) read faster than powers of ten
        ticks = [t for t in (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0) if t >= y0]
        ax_s.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax_s.minorticks_off()
    elif lo >= 0.0 and hi <= 1.0:  # probabilities: fixed axis, comparable across plots
        ax_s.set_ylim(-0.02, 1.02)
    ax_s.set_ylabel(score_label + (" (log)" if log_scale else ""))
    ax_s.grid(alpha=0.25)
    if detections is not None and thr is not None:
        # an empty plot must not look like a broken one: name what found nothing, and its peak
        empty = [k for k in range(q) if not detections[k]]
        if empty:
            msg = "\n".join(f"no detection above {thr_text(k)} for {_short(names[k], 24)} (peak {np.nanmax(s[:, k]):.3g})"
                             for k in empty[:4]) + ("\n..." if len(empty) > 4 else "")  # one line each: fits the axes
            ax_s.text(0.01, 0.97, msg, transform=ax_s.transAxes, ha="left", va="top", fontsize=8,
                      bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"})  # fmt: skip
    if detections is not None:
        extra.append(plt.Rectangle((0, 0), 1, 1, facecolor=(0.5, 0.5, 0.5, 0.25), edgecolor="gray", hatch="///",
                                   label="detected span"))  # fmt: skip
    if ground_truth is not None:
        extra.append(plt.Rectangle((0, 0), 1, 1, color="gray", label="reference event"))
    if lanes:
        ax_l = axes[2]
        for k in range(q):
            y = q - 1 - k  # first query on top, like the legend
            if ground_truth is not None and ground_truth[k]:
                ax_l.broken_barh([(on, off - on) for on, off in ground_truth[k]], (y + 0.05, 0.4), color=cols[k],
                                 label=f"reference: {names[k]}")  # fmt: skip
            if detections is not None and detections[k]:
                ax_l.broken_barh([(on, off - on) for on, off in detections[k]], (y - 0.45, 0.4),
                                 facecolor=(*cols[k][:3], 0.25), edgecolor=cols[k], hatch="///", lw=0.8,
                                 label=f"detected: {names[k]}")  # fmt: skip
        ax_l.set_yticks(range(q), [_short(n, 24) for n in reversed(names)], fontsize=8)
        ax_l.set_ylim(-0.55, q - 0.45)
        ax_l.grid(axis="x", alpha=0.25)
        ax_l.set_xlabel("time (s)")
    else:
        ax_s.set_xlabel("time (s)")
    ax_spec.set_xlim(start, end)
    ax_spec.set_title(title or "Spectrogram and per-query scores", fontsize=11)
    fig.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(0.905, 0.62 if lanes else 0.5),
               fontsize=8, frameon=False)  # fmt: skip
    fig.subplots_adjust(right=0.9)
    return fig


def plot_timeline(
    audio: np.ndarray,
    scores: np.ndarray,
    timeline: Timeline,
    queries: Sequence[str],
    path: str | Path,
    *,
    audio_timeline: Timeline | None = None,
    sample_rate: int = 16000,
    mel_config: MelConfig | None = None,
    detections: Sequence[Segments] | None = None,
    ground_truth: Sequence[Segments] | None = None,
    threshold: float | Sequence[float] | None = None,
    duration_s: float | None = None,
    title: str = "",
    score_label: str = "probability",
    log_scale: bool = False,
    threshold_kinds: str | Sequence[str] | None = None,
) -> Path:
    """Spectrogram on top, one score curve per query below, on one seconds axis; writes `path`.

    audio: the wave (N,) at `sample_rate` (log-mel computed here), or a log-mel (n_mels, T_mel)
        with its `audio_timeline` (and optionally `mel_config` to label frequencies).
    scores: (T, Q) per-frame scores (probabilities) of the Q queries; `timeline` maps its frames
        to seconds (each frame drawn as a flat step over its own span).
    detections / ground_truth: per query, [(onset_s, offset_s), ...]. Detections are shaded under
        the curves; both are drawn as bars in a lane per query at the bottom (reference events
        solid above, detections hatched below). A query with no reference event in the file is
        named "(no reference event)" in the legend: its detections are false positives.
    threshold: decision threshold(s), dashed: one value -> one black line; one per query -> a
        line in each query's colour; the legend gives the value (3 decimals). With detections, a
        query with none says "no detection above t" (and its peak) on the plot, t being that
        query's own threshold.
    threshold_kinds: what each threshold is ("per-class", "global", "given", "default"; one for
        all or one per query, as `scoring.DetectionSettings.threshold_for` says), named next to
        the value: "no detection above 0.312 (per-class threshold)".
    log_scale: probabilities on a log axis (small, badly calibrated scores become readable).
    """
    fig = timeline_figure(
        audio, scores, timeline, queries, audio_timeline=audio_timeline, sample_rate=sample_rate, mel_config=mel_config,
        detections=detections, ground_truth=ground_truth, threshold=threshold, duration_s=duration_s, title=title,
        score_label=score_label, log_scale=log_scale, threshold_kinds=threshold_kinds,
    )  # fmt: skip
    return _save(fig, path)


def plot_similarity_heatmap(
    audio: np.ndarray,
    frame_sims: np.ndarray,
    timeline: Timeline,
    labels: Sequence[str],
    path: str | Path,
    *,
    audio_timeline: Timeline | None = None,
    sample_rate: int = 16000,
    mel_config: MelConfig | None = None,
    duration_s: float | None = None,
    title: str = "",
    value_label: str = "similarity",
) -> Path:
    """Spectrogram on top, a (query x time) heatmap of frame similarities below, same seconds axis.

    audio: wave (N,) at `sample_rate` or log-mel (n_mels, T_mel) with `audio_timeline`.
    frame_sims: (T, N) per-frame similarity (or probability) of N texts; `timeline` maps its frames.
    """
    plt = _plt()
    names = [str(l) for l in labels]
    s = _check_scores(frame_sims, names)
    n = len(names)
    fig, (ax_spec, ax_h) = plt.subplots(2, 1, figsize=(12.0, 2.8 + max(1.6, 0.28 * n) + 1.0), sharex=True,
                                        gridspec_kw={"height_ratios": [2.6, max(1.6, 0.28 * n)], "hspace": 0.08})  # fmt: skip
    end, im_spec = _spectrogram(ax_spec, audio, audio_timeline, sample_rate, mel_config, duration_s)
    edges = timeline.frame_edges(s.shape[0], duration_s)
    im = ax_h.pcolormesh(edges, np.arange(n + 1) - 0.5, s.T, cmap="viridis", shading="flat")
    ax_h.set_yticks(range(n), [_short(x, 28) for x in names], fontsize=8)
    ax_h.set_ylim(n - 0.5, -0.5)  # first label on top
    ax_h.set_xlabel("time (s)")
    ax_spec.set_xlim(min(float(edges[0]), 0.0), max(end, float(edges[-1])) if duration_s is None else end)
    ax_spec.set_title(title or "Frame-level text similarity", fontsize=11)
    # both panels get a colorbar of the same width, so their time axes stay aligned
    fig.colorbar(im_spec, ax=ax_spec, pad=0.01, fraction=0.03, label="dB")
    fig.colorbar(im, ax=ax_h, pad=0.01, fraction=0.03, label=value_label)
    return _save(fig, path)


# ----------------------------------------------------------------------------- training


def _read_curves(csv_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{column: (steps, values)} for every numeric column, blanks skipped."""
    if not csv_path.is_file():
        raise DataFormatError(csv_path, "training log not found")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise DataFormatError(csv_path, f"expected a 'step' column, got {reader.fieldnames}", 1)
        cols: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in reader.fieldnames if k != "step"}
        for row in reader:
            try:
                step = float(row["step"])
            except (TypeError, ValueError):
                raise DataFormatError(csv_path, f"bad step value {row.get('step')!r}", reader.line_num) from None
            for k in cols:
                v = row.get(k)
                if v in (None, ""):
                    continue
                try:
                    x = float(v)
                except ValueError:
                    continue  # a text column: not plottable
                if math.isfinite(x):
                    cols[k][0].append(step)
                    cols[k][1].append(x)
    return {k: (np.array(a), np.array(b)) for k, (a, b) in cols.items() if a}


# loss panels of the training curves, in order: metrics.csv column prefix -> panel title. Terms of
# different objectives have different scales (a clip InfoNCE near log(batch), a frame sigmoid
# loss near 0.1), so each objective gets its own axis.
_LOSS_PANELS = (
    ("train/loss", "total loss (weighted sum)"),
    ("train/clip/", "clip loss"),
    ("train/frame/", "frame loss"),
    ("train/aux/", "auxiliary losses"),
)


def training_curves_figure(csv_path: str | Path, title: str = "") -> Any:
    """The figure of `plot_training_curves` (a matplotlib Figure, not closed). One axis per
    panel, each with its title: total loss, clip loss terms, frame loss terms, auxiliary terms,
    other train/* columns, learning rate, validation metrics (each only if present)."""
    plt = _plt()
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.FuncFormatter below)

    csv_path = Path(csv_path)
    curves = _read_curves(csv_path)
    losses = {k: v for k, v in curves.items() if k.startswith("train/")}
    panels: list[tuple[str, str, Any]] = []
    taken: set[str] = set()
    for prefix, name in _LOSS_PANELS:
        group = {k: v for k, v in losses.items() if (k == prefix if not prefix.endswith("/") else k.startswith(prefix))}
        if group:
            panels.append(("loss", name, group))
            taken |= set(group)
    rest = {k: v for k, v in losses.items() if k not in taken}
    if rest:
        panels.append(("loss", "other training terms", rest))
    if curves.get("lr"):
        panels.append(("lr", "learning rate", curves["lr"]))
    vals = {k: v for k, v in curves.items() if k.startswith("val/")}
    if vals:
        panels.append(("val", "validation metrics", vals))
    if not panels:
        raise DataFormatError(csv_path, "no numeric train/*, lr or val/* values to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.0, 2.3 * len(panels) + 0.6), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, (kind, name, data) in zip(axes, panels):
        if kind == "loss":
            for (k, (x, y)), col in zip(sorted(data.items()), _colors(len(data))):
                total = k == "train/loss"
                ax.plot(x, y, color="black" if total else col, lw=2.0 if total else 1.3, label=k[len("train/"):])
            ax.set_ylabel("loss")
        elif kind == "lr":
            x, y = data
            ax.plot(x, y, color="tab:purple", lw=1.4, label="lr")
            ax.set_ylabel("learning rate")
            # tick labels like 5e-04 instead of a "1e-3" offset text that collides with the title
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
        else:
            for (k, (x, y)), col in zip(sorted(data.items()), _colors(len(data))):
                ax.plot(x, y, color=col, marker="o", ms=4, lw=1.4, label=k[len("val/"):])
            ax.set_ylabel("validation")
        ax.set_title(name, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if kind != "lr":
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    fig.suptitle(title or f"Training curves ({csv_path.name})", fontsize=11)
    fig.tight_layout()
    return fig


def plot_training_curves(csv_path: str | Path, path: str | Path, title: str = "") -> Path:
    """Training log (the trainer's metrics.csv: step, lr, train/<term>..., val/<metric>...) ->
    PNG with the total loss, the clip loss and the frame loss each on its own axis (their
    scales differ), then learning rate and validation metrics (each panel only if present)."""
    return _save(training_curves_figure(csv_path, title), path)


def display_mel_stream(source: Any, sample_rate: int, max_columns: int = 4000) -> tuple[np.ndarray, Timeline, MelConfig]:
    """Log-mel for display, (n_mels, T_disp) dB, computed window by window from a source (anything
    with `n_samples` and `read(start, end) -> float32 samples at sample_rate`; so a
    1-hour file never sits in memory) and average-pooled to at most `max_columns` columns.

    Same arithmetic as `eval.plots.display_mel`, which needs the whole wave."""
    cfg = MelConfig(sample_rate=sample_rate, fmax=min(8000.0, sample_rate / 2), compute_dtype="float32")
    mel = LogMel(cfg)
    hop = cfg.hop_length
    n = source.n_samples
    n_mel = cfg.num_frames(n)
    pool = max(1, math.ceil(n_mel / max_columns))
    per_chunk = pool * max(1, math.ceil(6000 / pool))  # ~60 s of mel frames, whole pooled columns
    ctx = hop * math.ceil((cfg.n_fft // 2) / hop)  # context (whole hops) covering the STFT window
    import torch

    cols = []
    with torch.inference_mode():
        for f0 in range(0, n_mel, per_chunk):
            f1 = min(n_mel, f0 + per_chunk)
            # read with context on both sides, so every kept frame sees the same samples as a
            # one-pass STFT (zeros only beyond the ends of the audio, like the centred STFT)
            s0, s1 = max(0, f0 * hop - ctx), min(n, (f1 - 1) * hop + ctx + 1)
            m = mel(torch.from_numpy(np.ascontiguousarray(source.read(s0, s1), dtype=np.float32))).numpy()
            k0 = (f0 * hop - s0) // hop
            m = m[:, k0 : k0 + (f1 - f0)]
            if pool > 1:
                t = m.shape[1] // pool * pool
                head = m[:, :t].reshape(m.shape[0], -1, pool).mean(axis=2)
                m = np.concatenate([head, m[:, t:].mean(axis=1, keepdims=True)], axis=1) if t < m.shape[1] else head
            cols.append(m)
    return np.concatenate(cols, axis=1), Timeline.from_mel(cfg, downsample=pool), cfg
