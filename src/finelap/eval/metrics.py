"""Pure evaluation metrics: retrieval, zero-shot classification, SED, grounding, post-processing.

Everything here takes numpy arrays / pandas DataFrames / plain Python containers and returns
plain Python values (floats, lists, dicts), so the results go straight into a JSON report.
No models, no torch. Metric names follow DESIGN.md "Metric protocols".

Conventions (read these before comparing numbers with another codebase):

* **Fractions, not percent.** Every recall/accuracy/F1/AP/AUROC is in [0, 1].
* **Ties in ranking metrics are counted pessimistically** (default ``ties="pessimistic"``):
  rank = 1 + #(non-relevant candidates scored strictly higher than the best relevant one)
  + #(non-relevant candidates scored *equal* to it). A collapsed model that outputs constant
  scores therefore gets the worst, not the best, rank. ``ties="optimistic"`` drops the second
  term (rank = 1 + #strictly greater), which is what `argsort`-based code gets when ties happen
  to break in the relevant item's favour. With float embeddings from a real model, ties are
  rare and both give the same numbers.
* **SED** goes through `sed_scores_eval` (imported lazily). Score inputs are that library's
  per-file DataFrames: columns ``onset, offset, <class...>``, one row per frame, each frame's
  offset equal to the next frame's onset (see :func:`scores_to_dataframe`). Ground truth is
  ``{file: [(onset, offset, label), ...]}`` in seconds; durations ``{file: seconds}``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..audio import Timeline

__all__ = [
    "retrieval_metrics",
    "retrieval_ranks",
    "classification_metrics",
    "average_precision",
    "roc_auc",
    "frame_auroc",
    "sed_frame_auroc",
    "PSDSResult",
    "psds",
    "psds1",
    "psds2",
    "PSDS1_PARAMS",
    "PSDS2_PARAMS",
    "GROUNDING_PSDS_PARAMS",
    "collar_f1",
    "segment_f1",
    "grounding_metrics",
    "tag_grounding_metrics",
    "TAG_PROTOCOL",
    "scores_to_dataframe",
    "median_filter_seconds",
    "binarize_and_segment",
]

_TIES = ("pessimistic", "optimistic")


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _finite_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if a.size and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} contains NaN/Inf (first at index {tuple(int(i) for i in bad)})")
    return a


# ============================================================================ retrieval


def retrieval_ranks(
    sim: np.ndarray, text_to_audio: np.ndarray, ties: str = "pessimistic", chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of the correct item for each query, in both directions.

    sim: (n_texts, n_audio) similarity, higher = more similar.
    text_to_audio: (n_texts,) int, index of the audio clip each caption describes.
    Returns (t2a_ranks (n_texts,), a2t_ranks (n_audio,)) as int64. For audio-to-text, a clip's
    rank is the best rank among its captions (the position of its first relevant caption).
    Ties: see module docstring. Rows are processed in chunks so memory stays
    O(chunk_size * n_audio) for large test sets.
    """
    _check_ties(ties)
    s = _finite_2d(sim, "sim")
    n_t, n_a = s.shape
    g = np.asarray(text_to_audio)
    if g.shape != (n_t,):
        raise ValueError(f"text_to_audio must have shape ({n_t},) to match sim {s.shape}, got {g.shape}")
    if n_t == 0 or n_a == 0:
        raise ValueError(f"empty similarity matrix {s.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        if np.issubdtype(g.dtype, np.floating) and np.all(g == np.round(g)):
            g = g.astype(np.int64)
        else:
            raise ValueError(f"text_to_audio must hold integer audio indices, got dtype {g.dtype}")
    g = g.astype(np.int64)
    if g.min() < 0 or g.max() >= n_a:
        raise ValueError(f"text_to_audio indices must be in [0, {n_a}), got range [{g.min()}, {g.max()}]")
    n_caps = np.bincount(g, minlength=n_a)
    if (n_caps == 0).any():
        missing = np.flatnonzero(n_caps == 0)
        raise ValueError(
            f"{len(missing)} audio clip(s) have no caption (e.g. indices {missing[:5].tolist()}); "
            "audio-to-text retrieval needs at least one caption per clip"
        )
    pessimistic = ties == "pessimistic"
    rows = np.arange(n_t)
    pos = s[rows, g]  # score of each caption's own clip

    # text -> audio: exactly one relevant clip per caption
    t2a = np.empty(n_t, dtype=np.int64)
    # audio -> text: best relevant caption score per clip, then count texts above (and tied with) it
    best = np.full(n_a, -np.inf)
    np.maximum.at(best, g, pos)
    a2t_greater = np.zeros(n_a, dtype=np.int64)
    a2t_equal = np.zeros(n_a, dtype=np.int64)
    for lo in range(0, n_t, chunk_size):
        blk = s[lo : lo + chunk_size]
        p = pos[lo : lo + chunk_size, None]
        t2a[lo : lo + chunk_size] = 1 + (blk > p).sum(axis=1)
        if pessimistic:  # the clip itself is the one tie that is not a competitor
            t2a[lo : lo + chunk_size] += (blk == p).sum(axis=1) - 1
        a2t_greater += (blk > best[None, :]).sum(axis=0)
        if pessimistic:
            a2t_equal += (blk == best[None, :]).sum(axis=0)
    a2t = 1 + a2t_greater
    if pessimistic:
        # relevant captions tied with the best one are not competitors: remove them
        rel_ties = np.bincount(g, weights=(pos == best[g]).astype(np.float64), minlength=n_a).astype(np.int64)
        a2t += a2t_equal - rel_ties
    return t2a, a2t


def retrieval_metrics(
    sim: np.ndarray,
    text_to_audio: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    ties: str = "pessimistic",
) -> dict[str, float]:
    """Text<->audio retrieval with the multi-caption protocol (AudioCaps/Clotho, DCASE task 6b).

    sim: (n_texts, n_audio) similarity, higher = more similar (e.g. text_embeds @ audio_embeds.T).
    text_to_audio: (n_texts,) int index of the audio each caption belongs to; every clip needs
        at least one caption.

    Returns (all fractions in [0, 1], ranks 1-based):
      ``text_to_audio_R@k`` for k in ks: fraction of captions whose clip is within the top k
          (averaged over all captions);
      ``audio_to_text_R@k``: fraction of clips with *any* of their captions in the top k;
      ``mAP@10``: text-to-audio mean average precision at 10. With one relevant clip per caption,
          AP@10 = 1/rank if rank <= 10 else 0 (the DCASE 2022+ task 6b definition);
      ``text_to_audio_mean_rank``, ``text_to_audio_median_rank``,
      ``audio_to_text_mean_rank``, ``audio_to_text_median_rank`` (a2t rank = best caption rank).
    Ties: see module docstring (pessimistic by default).
    """
    t2a, a2t = retrieval_ranks(sim, text_to_audio, ties=ties)
    out: dict[str, float] = {}
    for k in ks:
        out[f"text_to_audio_R@{k}"] = float(np.mean(t2a <= k))
    for k in ks:
        out[f"audio_to_text_R@{k}"] = float(np.mean(a2t <= k))
    out["mAP@10"] = float(np.mean(np.where(t2a <= 10, 1.0 / t2a, 0.0)))
    out["text_to_audio_mean_rank"] = float(np.mean(t2a))
    out["text_to_audio_median_rank"] = float(np.median(t2a))
    out["audio_to_text_mean_rank"] = float(np.mean(a2t))
    out["audio_to_text_median_rank"] = float(np.median(a2t))
    return out


# ============================================================================ classification


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of one ranking (same definition as sklearn's `average_precision_score`).

    scores: (N,) float, higher = more likely positive. labels: (N,) binary.
    AP = mean over positives i of precision at threshold scores[i], where the precision counts
    every item scored >= scores[i] (so tied items enter together; no interpolation).
    Returns NaN when there is no positive (AP is undefined).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    # last index of each block of tied scores: precision is evaluated once per distinct threshold
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp_at = tp[last]
    precision = tp_at / (last + 1)
    new_pos = np.diff(np.r_[0, tp_at])  # positives entering at this threshold
    return float(np.sum(new_pos * precision) / n_pos)


def classification_metrics(
    scores: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (1, 5), ties: str = "pessimistic"
) -> dict[str, Any]:
    """Zero-shot classification metrics.

    scores: (N, C) class scores (similarities or probabilities), higher = more likely.
    targets: (N,) int class index (single-label), or (N, C) multi-hot (multi-label).

    Single-label returns ``top1_accuracy``, ``top5_accuracy`` (one key per k in ks; k is capped at
    C, so with C <= 5 top-5 accuracy is 1), ``mAP`` (macro AP over classes, one-vs-rest),
    ``per_class_AP`` (list, length C) and ``confusion_matrix`` (C x C list of int lists;
    rows = true class, columns = argmax prediction, ties to the lowest index).
    Multi-label returns ``mAP`` and ``per_class_AP`` only.
    Classes with no positive target have AP ``None`` in ``per_class_AP`` and are left out of
    ``mAP`` (AP is undefined for them). Top-k ties: see module docstring.
    """
    _check_ties(ties)
    s = _finite_2d(scores, "scores")
    n, c = s.shape
    if n == 0 or c == 0:
        raise ValueError(f"empty scores matrix {s.shape}")
    t = np.asarray(targets)
    out: dict[str, Any] = {}
    if t.ndim == 1:
        if t.shape != (n,):
            raise ValueError(f"targets must have shape ({n},) to match scores {s.shape}, got {t.shape}")
        if not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"single-label targets must be integer class indices, got dtype {t.dtype}")
        if t.min() < 0 or t.max() >= c:
            raise ValueError(f"targets must be in [0, {c}), got range [{t.min()}, {t.max()}]")
        pos = s[np.arange(n), t][:, None]
        rank = 1 + (s > pos).sum(axis=1)
        if ties == "pessimistic":
            rank += (s == pos).sum(axis=1) - 1
        for k in ks:
            out[f"top{k}_accuracy"] = float(np.mean(rank <= min(k, c)))
        onehot = np.zeros((n, c), dtype=bool)
        onehot[np.arange(n), t] = True
        pred = np.argmax(s, axis=1)
        cm = np.zeros((c, c), dtype=np.int64)
        np.add.at(cm, (t, pred), 1)
        out["confusion_matrix"] = cm.tolist()
    elif t.ndim == 2:
        if t.shape != s.shape:
            raise ValueError(f"multi-hot targets must have shape {s.shape} like scores, got {t.shape}")
        if not np.isin(t, (0, 1)).all():
            raise ValueError("multi-hot targets must contain only 0/1")
        onehot = t.astype(bool)
    else:
        raise ValueError(f"targets must be (N,) class indices or (N, C) multi-hot, got shape {t.shape}")
    aps = [average_precision(s[:, k], onehot[:, k]) for k in range(c)]
    valid = [a for a in aps if not math.isnan(a)]
    if not valid:
        raise ValueError("no class has a positive target; mAP is undefined")
    out["mAP"] = float(np.mean(valid))
    out["per_class_AP"] = [None if math.isnan(a) else float(a) for a in aps]
    return out


# ============================================================================ ROC AUC


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of tie blocks in sorted order
    starts = np.r_[0, np.flatnonzero(np.diff(xs) != 0) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = 0.5 * (starts + 1 + ends)  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    scores: (N,) float; labels: (N,) binary. Equals P(score_pos > score_neg) + 0.5 P(tie) over
    all positive/negative pairs. Returns NaN when labels hold only one class.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def frame_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Frame-level AUROC of one class: scores (N,) per frame, labels (N,) binary per frame.

    Raises ValueError when labels contain only positives or only negatives (undefined).
    """
    auc = roc_auc(scores, labels)
    if math.isnan(auc):
        raise ValueError("frame AUROC is undefined: labels contain only one class")
    return auc


# ============================================================================ SED inputs


def _sse():
    """Import sed_scores_eval lazily. It pulls in sed_eval -> dcase_util -> pkg_resources, which
    warns on setuptools 80 and is gone in setuptools >= 81 (hence the `setuptools<81` pin)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        try:
            import sed_scores_eval  # noqa: F401
            from sed_scores_eval import collar_based, intersection_based, segment_based  # noqa: F401
            from sed_scores_eval.base_modules import scores as _scores  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name == "pkg_resources":
                raise ImportError(
                    "sed_scores_eval needs pkg_resources (via dcase_util); install setuptools<81"
                ) from e
            raise ImportError(f"SED metrics need sed_scores_eval ({e}); pip install sed_scores_eval") from e
    return sed_scores_eval


def scores_to_dataframe(
    scores: np.ndarray, timeline: "Timeline", classes: Sequence[str], duration_s: float | None = None
) -> "pd.DataFrame":
    """Frame scores (T, C) -> sed_scores_eval score DataFrame (columns onset, offset, *classes).

    Frame edges come from `timeline` (the one frames<->seconds mapping). With `duration_s`, frames
    starting at or after the end of the audio (encoder padding) are dropped and the last kept frame
    ends exactly at `duration_s`.
    """
    sse = _sse()
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(classes):
        raise ValueError(f"scores must be (T, {len(classes)}) for {len(classes)} classes, got {s.shape}")
    _check_class_names(classes)
    if duration_s is not None:
        if not duration_s > 0:
            raise ValueError(f"duration_s must be positive, got {duration_s}")
        starts = np.asarray(timeline.frame_start(np.arange(s.shape[0])), dtype=np.float64)
        n = max(1, int(np.sum(starts < timeline.offset_s + duration_s - 1e-9)))
        s = s[:n]
    if s.shape[0] == 0:
        raise ValueError("scores have no frames")
    edges = timeline.frame_edges(s.shape[0], duration_s)
    return sse.base_modules.scores.create_score_dataframe(s, edges, list(classes))


def _check_class_names(classes: Sequence[Any]) -> None:
    for c in classes:
        if not isinstance(c, str):
            raise ValueError(f"class names must be str, got {c!r} ({type(c).__name__})")
        if c in ("onset", "offset"):
            raise ValueError(f"class name {c!r} clashes with the onset/offset columns")
        if "\\" in c:
            raise ValueError(f"class name {c!r} must not contain a backslash (sed_scores_eval restriction)")


def _validate_scores(scores: Mapping[Hashable, "pd.DataFrame"]) -> list[str]:
    """Check every per-file DataFrame; return the shared class list."""
    sse = _sse()
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict {file: DataFrame}")
    classes: list[str] | None = None
    first = None
    for key, df in scores.items():
        try:
            _, cls = sse.base_modules.scores.validate_score_dataframe(df)
        except (ValueError, AssertionError) as e:
            raise ValueError(f"scores for {key!r}: {e}") from None
        if len(df) == 0:
            raise ValueError(f"scores for {key!r}: no frames")
        vals = df[cls].to_numpy(dtype=np.float64)
        if np.isnan(vals).any():
            raise ValueError(f"scores for {key!r}: contain NaN")
        if classes is None:
            classes, first = list(cls), key
            _check_class_names(classes)
        elif list(cls) != classes:
            raise ValueError(f"scores for {key!r}: classes {list(cls)} differ from {classes} (in {first!r})")
    assert classes is not None
    return classes


def _prepare_ground_truth(
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    scores: Mapping[Hashable, Any],
    classes: Sequence[str],
) -> dict[Hashable, list[tuple[float, float, str]]]:
    """Ground truth restricted to the scored files, in sed_scores_eval's form.

    Files missing from `ground_truth` have no events (DCASE TSVs only list files with events).
    A file with events but no scores is an error (the system skipped it), so is a class with no
    event in any scored file (sed_scores_eval cannot evaluate it). Overlapping or
    touching events of the same class are merged: sed_scores_eval asserts they do not occur,
    and for counting detections they are one event.
    """
    if not isinstance(ground_truth, Mapping):
        raise ValueError(f"ground_truth must be a dict {{file: [(onset, offset, label), ...]}}, got {type(ground_truth).__name__}")
    unscored = [k for k, ev in ground_truth.items() if k not in scores and len(ev) > 0]
    if unscored:
        raise ValueError(f"{len(unscored)} file(s) have ground-truth events but no scores, e.g. {unscored[:3]}")
    known = set(classes)
    out: dict[Hashable, list[tuple[float, float, str]]] = {}
    for key in scores:
        per_class: dict[str, list[tuple[float, float]]] = {}
        for i, ev in enumerate(ground_truth.get(key, ())):
            try:
                on, off, lab = ev
                on, off = float(on), float(off)
            except (TypeError, ValueError):
                raise ValueError(f"ground truth for {key!r}, event {i}: expected (onset, offset, label), got {ev!r}") from None
            if not (math.isfinite(on) and math.isfinite(off)) or off <= on:
                raise ValueError(f"ground truth for {key!r}, event {i}: need onset < offset, got ({on}, {off})")
            if lab not in known:
                raise ValueError(f"ground truth for {key!r}, event {i}: label {lab!r} is not a scored class {sorted(known)}")
            per_class.setdefault(lab, []).append((on, off))
        events: list[tuple[float, float, str]] = []
        for lab, spans in per_class.items():
            spans.sort()
            merged = [list(spans[0])]
            for on, off in spans[1:]:
                if on <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], off)
                else:
                    merged.append([on, off])
            events.extend((on, off, lab) for on, off in merged)
        out[key] = sorted(events, key=lambda e: (e[0], e[1], e[2]))
    # sed_scores_eval asserts (AssertionError) that every scored class has an event somewhere
    present = {lab for evs in out.values() for _, _, lab in evs}
    empty = [c for c in classes if c not in present]
    if empty:
        raise ValueError(
            f"class(es) {empty} have no ground-truth event in the scored files; sed_scores_eval cannot "
            "evaluate them: drop their score columns or add files that contain them"
        )
    return out


def _prepare_durations(durations: Mapping[Hashable, float], scores: Mapping[Hashable, Any]) -> dict[Hashable, float]:
    """Durations of the scored files (extra entries are ignored: a durations file usually lists a
    superset). Every scored file needs one, since eFPR is per hour of evaluated audio."""
    if not isinstance(durations, Mapping):
        raise ValueError(f"durations must be a dict {{file: seconds}}, got {type(durations).__name__}")
    missing = [k for k in scores if k not in durations]
    if missing:
        raise ValueError(f"{len(missing)} scored file(s) have no duration, e.g. {missing[:3]}")
    out = {}
    for k in scores:
        d = float(durations[k])
        if not (math.isfinite(d) and d > 0):
            raise ValueError(f"duration of {k!r} must be a positive number of seconds, got {durations[k]!r}")
        out[k] = d
    return out


# ============================================================================ PSDS

#: DCASE PSDS scenario 1 (DESIGN.md): strict localisation, no cross-trigger penalty.
PSDS1_PARAMS: dict[str, Any] = dict(dtc=0.7, gtc=0.7, cttc=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0)
#: DCASE PSDS scenario 2: loose localisation, cross triggers penalised.
PSDS2_PARAMS: dict[str, Any] = dict(dtc=0.1, gtc=0.1, cttc=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0)
#: Grounding: every query is one "class" (alpha_st is irrelevant with one class, so 0).
GROUNDING_PSDS_PARAMS: dict[str, Any] = dict(dtc=0.5, gtc=0.5, cttc=None, alpha_ct=0.0, alpha_st=0.0, max_efpr=100.0)


@dataclass(frozen=True)
class PSDSResult:
    """PSDS value and its PSD-ROC.

    value: area under the PSD-ROC up to max_efpr, normalised by max_efpr, in [0, 1].
    per_class: single-class PSDS per event class.
    etpr, efpr: the multi-class PSD-ROC (effective TP ratio vs effective FP rate per hour), 1-D,
        a staircase (plot with `drawstyle="steps-post"`).
    per_class_roc: {class: (tpr, efpr)} single-class ROCs.
    params: the PSDS parameters used.
    """

    value: float
    per_class: dict[str, float]
    etpr: np.ndarray
    efpr: np.ndarray
    per_class_roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    params: dict[str, Any]

    def with_alpha_st(self, alpha_st: float) -> float:
        """The PSDS of the same per-class ROCs combined with another spread penalty `alpha_st`
        (sed_scores_eval's own combination step; exact, no recomputation of the ROCs). With
        alpha_st = 0 it tells a PSDS lowered by uneven classes from one lowered by localisation."""
        from sed_scores_eval.intersection_based.psds import multi_class_psd_roc_from_single_class_psd_rocs, psds_from_psd_roc

        _sse()
        max_efpr = self.params.get("max_efpr")
        tpr, efpr = multi_class_psd_roc_from_single_class_psd_rocs(self.per_class_roc, alpha_st=alpha_st, max_efpr=max_efpr)
        return float(psds_from_psd_roc(tpr, efpr, max_efpr if max_efpr is not None else float(np.max(efpr))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (arrays as lists)."""
        return {
            "psds": self.value,
            "per_class_psds": dict(self.per_class),
            "psd_roc": {"efpr": self.efpr.tolist(), "etpr": self.etpr.tolist()},
            "params": dict(self.params),
        }


#: Doubles per block of (decision thresholds x frames / 2) that sed_scores_eval's
#: `onset_offset_curves` allocates at once in `intersection_deltas` (x2 arrays, 8 bytes: 64 MB).
INTERSECTION_BLOCK = 4_000_000


def _drop_unmatchable(
    onsets: np.ndarray, offsets: np.ndarray, gt_onsets: np.ndarray, gt_offsets: np.ndarray,
    too_short: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Drop the detections that no reference event can count, whatever the statistics.

    onsets, offsets: (B, M) detections per decision threshold (inactive: onset == offset);
    gt_onsets, gt_offsets: sorted (G,) spans of the reference events that the statistics look at
    (intersection-based: the target class's events, and the other classes' when cross triggers
    count; collar-based: the target class's events widened by their collars). A detection that
    overlaps none of them can only be a false positive, except those that `too_short(lengths)`
    marks (intersection-based: dtc/cttc * length rounds to 0, so they pass with no overlap):
    those are kept. Returns the compacted (B, M') onsets and offsets (padding inactive, 0.0) and
    the number of dropped active detections per row (B,), which are false positives.
    """
    active = offsets > onsets
    droppable = active.copy()
    if too_short is not None:
        droppable &= ~too_short(offsets - onsets)
    if len(gt_onsets):
        # spans overlapping [on, off): #(g_on < off) - #(g_off <= on) (each g_on < g_off)
        n_overlap = np.searchsorted(gt_onsets, offsets, side="left") - np.searchsorted(gt_offsets, onsets, side="right")
        droppable &= n_overlap <= 0
    keep = active & ~droppable
    rows, cols = np.nonzero(keep)
    slot = (np.cumsum(keep, axis=1) - 1)[rows, cols]  # kept ones first, in their order
    m = max(1, int(slot.max(initial=-1)) + 1)
    on = np.zeros((len(onsets), m))
    off = np.zeros((len(onsets), m))
    on[rows, slot] = onsets[rows, cols]
    off[rows, slot] = offsets[rows, cols]
    return on, off, droppable.sum(axis=1)


def _squeeze_background(
    scores: np.ndarray, timestamps: np.ndarray, gt_onsets: np.ndarray, gt_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The score sequence with the stretches between reference events ("gaps") reduced to what
    the detections that reach an event's frames see of them; None when there is no gap.

    A frame is kept as it is when it overlaps a reference event (sorted `gt_onsets`,
    `gt_offsets`) or is shorter than 1 ms. In a gap [a, b) between kept frames, a detection
    coming from the left at threshold t covers the frames x with min(s[a..x]) >= t, one from the
    right those with min(s[x..b-1]) >= t; so the gap becomes max(running min from the left,
    running min from the right) (just one of them at the file's ends), whose frames above t are
    exactly those covered by event-reaching detections, and equal neighbours are merged (they
    never separate two detections). Detections that stay inside a gap disappear: the caller
    counts them in closed form. Returns (scores (T',), timestamps (T' + 1,)).
    """
    starts, ends = timestamps[:-1], timestamps[1:]
    n_overlap = np.searchsorted(gt_onsets, ends, side="left") - np.searchsorted(gt_offsets, starts, side="right")
    kept = (n_overlap > 0) | (ends - starts < 1e-3)
    if kept.all() or not kept.any():
        return None
    vals = scores.copy()
    own = np.ones(len(scores), dtype=bool)  # frames that start a segment of the squeezed sequence
    gap = np.flatnonzero(~kept)
    cut = np.flatnonzero(np.diff(gap) > 1)
    for a, b in zip(np.r_[gap[0], gap[cut + 1]], np.r_[gap[cut], gap[-1]] + 1):
        seg = scores[a:b]
        from_left = np.minimum.accumulate(seg)
        from_right = np.minimum.accumulate(seg[::-1])[::-1]
        g = from_left if b == len(scores) else from_right if a == 0 else np.maximum(from_left, from_right)
        vals[a:b] = g
        own[a + 1 : b] = g[1:] != g[:-1]
    return vals[own], np.r_[starts[own], timestamps[-1]]


def _deltas_in_blocks(
    scores: np.ndarray, timestamps: np.ndarray, gt_onsets: np.ndarray, gt_offsets: np.ndarray,
    statistics_fn: Callable[..., dict[str, Any]], kw: Mapping[str, Any], candidates: np.ndarray,
    too_short: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """sed_scores_eval's change points and deltas of one file and class at the decision
    thresholds `candidates` (sorted, unique), with its `statistics_fn` (kw: the events and the
    criteria). The detections at a threshold t are those at the smallest score of the sequence
    >= t, so the statistics are computed at the sequence's own scores (and once with no
    detection, for thresholds above all of them) and read off for each candidate; in blocks of
    `INTERSECTION_BLOCK` / (T/2) thresholds, without the detections that cannot count
    (`_drop_unmatchable`)."""
    from sed_scores_eval.base_modules.cy_detection import onset_offset_curves
    from sed_scores_eval.base_modules.statistics import _deltas_from_intermediate_statistics

    n_events = max(1, len(gt_onsets))
    own = np.unique(scores)
    step = max(1, INTERSECTION_BLOCK // max(1, (len(scores) + 1) // 2))
    blocks: list[dict[str, Any]] = []
    for lo in range(0, len(own), step):
        _, on, off = onset_offset_curves(scores, timestamps, own[lo : lo + step])
        on, off, n_dropped = _drop_unmatchable(on, off, gt_onsets, gt_offsets, too_short)
        # statistics_fn builds (thresholds, detections, events) arrays: as many thresholds at a time as fit
        rows = max(1, INTERSECTION_BLOCK // 4 // (on.shape[1] * n_events))
        for r in range(0, len(on), rows):
            st = statistics_fn(detection_onset_times=on[r : r + rows], detection_offset_times=off[r : r + rows], **kw)
            st["fps"] = st["fps"] + n_dropped[r : r + rows]
            blocks.append(st)
    none = np.zeros((1, 1))  # no detection (an inactive one: onset == offset)
    blocks.append(statistics_fn(detection_onset_times=none, detection_offset_times=none, **kw))
    at = np.searchsorted(own, candidates, side="left")  # len(own): above every score, the no-detection row
    stats: dict[str, Any] = {}
    for k, v in blocks[0].items():
        if isinstance(v, dict):
            stats[k] = {c: np.concatenate([b[k][c] for b in blocks])[at] for c in v}
        else:
            stats[k] = np.concatenate([b[k] for b in blocks])[at]
    return _deltas_from_intermediate_statistics(candidates, stats)


def _squeezed_deltas(
    scores: np.ndarray, timestamps: np.ndarray, gt_onsets: np.ndarray, gt_offsets: np.ndarray,
    statistics_fn: Callable[..., dict[str, Any]], kw: Mapping[str, Any],
    too_short: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[None, np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """The acceleration_fn answer (None, change points, deltas) of one file and class: the
    stretches away from the spans `gt_onsets`/`gt_offsets` (sorted) that the statistics look at
    are squeezed (`_squeeze_background`): the detections that reach a span keep their exact
    extent; the ones that stay between spans are false positives whatever the threshold, counted
    in closed form with sed_scores_eval's `onset_deltas` (detections in the file minus those
    left). The rest goes through `_deltas_in_blocks`."""
    from sed_scores_eval.base_modules.detection import onset_deltas

    scores = np.asarray(scores, dtype=np.float64)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    # every distinct score of the file stays a threshold, as in sed_scores_eval (squeezing drops some
    # scores, but the statistics at them can differ: e.g. an event shorter than 1 us counts as found
    # at every threshold evaluated)
    candidates = np.unique(scores)
    squeezed = _squeeze_background(scores, timestamps, gt_onsets, gt_offsets) if len(gt_onsets) else None
    if squeezed is None:
        return None, *_deltas_in_blocks(scores, timestamps, gt_onsets, gt_offsets, statistics_fn, kw, candidates, too_short)
    sq_scores, sq_times = squeezed
    cp, deltas = _deltas_in_blocks(sq_scores, sq_times, gt_onsets, gt_offsets, statistics_fn, kw, candidates, too_short)
    # the detections between spans: those of the file minus those left after squeezing, each a false positive
    d_all, d_left = onset_deltas(scores), onset_deltas(sq_scores)
    m_all, m_left = d_all != 0, d_left != 0
    keys = list(deltas)
    points = np.concatenate([cp, scores[m_all], sq_scores[m_left]])
    rows = np.zeros((len(points), len(keys)), dtype=np.result_type(d_all.dtype, *(deltas[k].dtype for k in keys)))
    for i, k in enumerate(keys):
        rows[: len(cp), i] = deltas[k]
    rows[len(cp) :, keys.index("fps")] = np.concatenate([d_all[m_all], -d_left[m_left]])
    unique, inverse = np.unique(points, return_inverse=True)
    summed = np.zeros((len(unique), len(keys)), dtype=rows.dtype)
    np.add.at(summed, inverse, rows)
    changed = np.abs(summed).sum(axis=1) > 0  # as sed_scores_eval: only scores where a statistic changes
    return None, unique[changed], {k: summed[changed, i] for i, k in enumerate(keys)}


def _blocked_intersection_deltas(
    scores: np.ndarray, timestamps: np.ndarray, target_onset_times: np.ndarray, target_offset_times: np.ndarray,
    other_onset_times: Mapping[str, np.ndarray], other_offset_times: Mapping[str, np.ndarray],
    dtc_threshold: float, gtc_threshold: float, cttc_threshold: float | None, time_decimals: int = 6,
) -> tuple[None, np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """sed_scores_eval `acceleration_fn` for intersection-based statistics of one file and class:
    the same change points and deltas as its own path, in memory and time that follow the
    frames near reference events rather than the square of the file's length.

    Its own path evaluates every distinct score of the file as a threshold at once: (U, T/2)
    onset/offset arrays and (U, M, G) intersections (U distinct scores, M detections, G events),
    tens of GB for a 30-min file of 40-ms frames. Here
    1. the stretches between the events that the statistics look at (the target class's, and
       the other classes' when cross triggers count) are squeezed (`_squeeze_background`): the
       detections that reach an event keep their exact extent, the ones that stay between
       events are false positives whatever the threshold, counted in closed form with
       sed_scores_eval's `onset_deltas` (detections in the file minus those left);
    2. the thresholds go in blocks, and detections that overlap no event are counted as false
       positives outside the (U, M, G) products (`_drop_unmatchable`).
    The statistics per threshold are sed_scores_eval's own `statistics_fn`, so they are identical.
    """
    from sed_scores_eval.intersection_based import intermediate_statistics as ib

    kw = dict(dtc_threshold=dtc_threshold, gtc_threshold=gtc_threshold, cttc_threshold=cttc_threshold,
              time_decimals=time_decimals)  # fmt: skip
    shortcut = ib.acceleration_fn(scores=scores, timestamps=timestamps, target_onset_times=target_onset_times,
                                  target_offset_times=target_offset_times, other_onset_times=other_onset_times,
                                  other_offset_times=other_offset_times, **kw)  # fmt: skip
    if shortcut[1] is not None:  # no event that could match: sed_scores_eval's closed form
        return shortcut
    g_on = [np.asarray(target_onset_times, dtype=np.float64)]
    g_off = [np.asarray(target_offset_times, dtype=np.float64)]
    if cttc_threshold is not None:
        g_on += [np.asarray(v, dtype=np.float64) for v in other_onset_times.values()]
        g_off += [np.asarray(v, dtype=np.float64) for v in other_offset_times.values()]

    def too_short(length: np.ndarray) -> np.ndarray:  # relevant / a cross trigger with no overlap at all
        short = np.round(dtc_threshold * length, decimals=time_decimals) <= 0
        if cttc_threshold is not None:
            short |= np.round(cttc_threshold * length, decimals=time_decimals) <= 0
        return short

    events = dict(target_onset_times=target_onset_times, target_offset_times=target_offset_times,
                  other_onset_times=other_onset_times, other_offset_times=other_offset_times)  # fmt: skip
    return _squeezed_deltas(scores, timestamps, np.sort(np.concatenate(g_on)), np.sort(np.concatenate(g_off)),
                            ib.statistics_fn, {**events, **kw}, too_short)  # fmt: skip


def _blocked_collar_deltas(
    scores: np.ndarray, timestamps: np.ndarray, target_onset_times: np.ndarray, target_offset_times: np.ndarray,
    other_onset_times: Any, other_offset_times: Any, onset_collar: float, offset_collar: float,
    offset_collar_rate: float = 0.0, return_onset_offset_dist_sum: bool = False, time_decimals: int = 6,
) -> tuple[None, np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """sed_scores_eval `acceleration_fn` for collar-based statistics of one file and class, as
    `_blocked_intersection_deltas` does for intersection-based ones: a detection can only hit a
    target event when its onset is within the onset collar of the event's onset, so one that
    overlaps none of the events widened by their collars (plus 1 ms for the rounding) is a false
    positive; those are squeezed out or dropped, the rest is sed_scores_eval's `statistics_fn`."""
    from sed_scores_eval.collar_based import intermediate_statistics as cb

    kw = dict(onset_collar=onset_collar, offset_collar=offset_collar, offset_collar_rate=offset_collar_rate,
              return_onset_offset_dist_sum=return_onset_offset_dist_sum, time_decimals=time_decimals)  # fmt: skip
    events = dict(target_onset_times=target_onset_times, target_offset_times=target_offset_times,
                  other_onset_times=other_onset_times, other_offset_times=other_offset_times)  # fmt: skip
    shortcut = cb.acceleration_fn(scores=scores, timestamps=timestamps, **events, **kw)
    if shortcut[1] is not None:  # no target event: sed_scores_eval's closed form
        return shortcut
    on = np.asarray(target_onset_times, dtype=np.float64)
    off = np.asarray(target_offset_times, dtype=np.float64)
    off_collar = np.maximum(offset_collar, offset_collar_rate * (off - on))
    margin = 1e-3
    return _squeezed_deltas(scores, timestamps, np.sort(on - onset_collar - margin), np.sort(off + off_collar + margin),
                            cb.statistics_fn, {**events, **kw}, None)  # fmt: skip


def collar_deltas(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    onset_collar: float,
    offset_collar: float,
    offset_collar_rate: float = 0.0,
    time_decimals: int = 6,
) -> dict:
    """sed_scores_eval's collar-based intermediate-statistics deltas (to pass as ``deltas=`` to its
    `collar_based.accumulated_intermediate_statistics`), in memory that does not grow with the
    square of a file's length (`_blocked_collar_deltas`). Ground truth already cleaned."""
    _sse()
    from sed_scores_eval.base_modules.statistics import intermediate_statistics_deltas
    from sed_scores_eval.collar_based.intermediate_statistics import statistics_fn

    return intermediate_statistics_deltas(
        dict(scores), dict(ground_truth), intermediate_statistics_fn=statistics_fn, acceleration_fn=_blocked_collar_deltas,
        onset_collar=onset_collar, offset_collar=offset_collar, offset_collar_rate=offset_collar_rate,
        return_onset_offset_dist_sum=False, time_decimals=time_decimals,
    )  # fmt: skip


def intersection_deltas(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    dtc: float,
    gtc: float,
    cttc: float | None = None,
    time_decimals: int = 6,
) -> dict:
    """sed_scores_eval's intersection-based intermediate-statistics deltas ({file: {class:
    (change-point scores, deltas)}}, to pass as ``deltas=`` to its `psds`/`psd_roc`), computed
    in memory that does not grow with the square of a file's length (`_blocked_intersection_deltas`).
    Inputs as sed_scores_eval takes them (ground truth already cleaned)."""
    _sse()
    from sed_scores_eval.base_modules.statistics import intermediate_statistics_deltas
    from sed_scores_eval.intersection_based.intermediate_statistics import statistics_fn

    deltas = intermediate_statistics_deltas(
        dict(scores), dict(ground_truth), intermediate_statistics_fn=statistics_fn,
        acceleration_fn=_blocked_intersection_deltas, dtc_threshold=dtc, gtc_threshold=gtc, cttc_threshold=cttc,
        time_decimals=time_decimals,
    )  # fmt: skip
    # in the order of `scores`: given deltas, sed_scores_eval sums the durations in this order (without,
    # in the durations' order), and the total duration must be bit-identical to its own path's
    return {k: deltas[k] for k in scores}


def psds(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    durations: Mapping[Hashable, float],
    dtc: float,
    gtc: float,
    cttc: float | None = None,
    alpha_ct: float = 0.0,
    alpha_st: float = 0.0,
    max_efpr: float = 100.0,
) -> PSDSResult:
    """Polyphonic Sound Detection Score, computed exactly (threshold-free) by sed_scores_eval.

    scores: {file: score DataFrame (onset, offset, <class...>)}; ground_truth:
    {file: [(onset_s, offset_s, label)]} (files without events may be omitted); durations:
    {file: seconds}. eFPR is per hour. See `_prepare_ground_truth` for the input cleaning.
    """
    sse = _sse()
    classes = _validate_scores(scores)
    gt = _prepare_ground_truth(ground_truth, scores, classes)
    dur = _prepare_durations(durations, scores)
    # With one class there is no other class to cross-trigger, so the cross-trigger term of eFPR
    # is zero by definition; sed_scores_eval crashes on it (TypeError inside its statistics),
    # so drop the term explicitly. The reported params stay the ones asked for.
    one_class = len(classes) == 1
    cttc_used = None if one_class else cttc
    value, per_class, (etpr, efpr), per_class_roc = sse.intersection_based.psds(
        scores=dict(scores),
        ground_truth=gt,
        audio_durations=dur,
        deltas=intersection_deltas(scores, gt, dtc, gtc, cttc_used),  # bounded memory on long files
        dtc_threshold=dtc,
        gtc_threshold=gtc,
        cttc_threshold=cttc_used,
        alpha_ct=0.0 if one_class else alpha_ct,
        alpha_st=alpha_st,
        unit_of_time="hour",
        max_efpr=max_efpr,
    )
    return PSDSResult(
        value=float(value),
        per_class={str(k): float(v) for k, v in per_class.items()},
        etpr=np.asarray(etpr, dtype=np.float64),
        efpr=np.asarray(efpr, dtype=np.float64),
        per_class_roc={str(k): (np.asarray(v[0]), np.asarray(v[1])) for k, v in per_class_roc.items()},
        params=dict(dtc=dtc, gtc=gtc, cttc=cttc, alpha_ct=alpha_ct, alpha_st=alpha_st, max_efpr=max_efpr),
    )


def psds1(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    durations: Mapping[Hashable, float],
) -> PSDSResult:
    """DCASE PSDS1: dtc = gtc = 0.7, no cttc, alpha_ct = 0, alpha_st = 1, max eFPR 100/h."""
    return psds(scores, ground_truth, durations, **PSDS1_PARAMS)


def psds2(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    durations: Mapping[Hashable, float],
) -> PSDSResult:
    """DCASE PSDS2: dtc = gtc = 0.1, cttc = 0.3, alpha_ct = 0.5, alpha_st = 1, max eFPR 100/h."""
    return psds(scores, ground_truth, durations, **PSDS2_PARAMS)


# ============================================================================ F-scores


def _fscore_dict(prefix: str, f: dict, p: dict, r: dict, stats: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for avg in ("macro", "micro"):
        out[f"{prefix}_F1_{avg}"] = float(f[f"{avg}_average"])
        out[f"{prefix}_precision_{avg}"] = float(p[f"{avg}_average"])
        out[f"{prefix}_recall_{avg}"] = float(r[f"{avg}_average"])
    out[f"{prefix}_per_class"] = {
        str(c): {
            "F1": float(f[c]),
            "precision": float(p[c]),
            "recall": float(r[c]),
            "tp": int(stats[c]["tps"]),
            "fp": int(stats[c]["fps"]),
            "n_ref": int(stats[c]["n_ref"]),
        }
        for c in stats
    }
    return out


def collar_f1(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    threshold: float | Mapping[str, float] = 0.5,
    onset_collar: float = 0.2,
    offset_collar: float = 0.2,
    offset_collar_rate: float = 0.2,
) -> dict[str, Any]:
    """Collar-based event F1 (DCASE: 200 ms onset collar, offset collar max(200 ms, 20% of the
    event length)), at a fixed decision threshold (a frame is active when score > threshold;
    scalar or per class). Detections are the thresholded score DataFrames with no extra
    post-processing: apply `median_filter_seconds` before building the DataFrames if wanted.

    Returns ``event_F1_macro``, ``event_F1_micro``, ``event_precision_{macro,micro}``,
    ``event_recall_{macro,micro}`` and ``event_per_class`` {class: {F1, precision, recall, tp, fp, n_ref}}.
    """
    sse = _sse()
    classes = _validate_scores(scores)
    gt = _prepare_ground_truth(ground_truth, scores, classes)
    f, p, r, stats = sse.collar_based.fscore(
        scores=dict(scores),
        ground_truth=gt,
        deltas=collar_deltas(scores, gt, onset_collar, offset_collar, offset_collar_rate),  # bounded memory on long files
        threshold=dict(threshold) if isinstance(threshold, Mapping) else float(threshold),
        onset_collar=onset_collar,
        offset_collar=offset_collar,
        offset_collar_rate=offset_collar_rate,
    )
    return _fscore_dict("event", f, p, r, stats)


def segment_f1(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
    durations: Mapping[Hashable, float],
    threshold: float | Mapping[str, float] = 0.5,
    segment_length: float = 1.0,
) -> dict[str, Any]:
    """Segment-based F1 on fixed `segment_length`-second segments (DCASE: 1 s), at a fixed
    threshold. Returns ``segment_F1_{macro,micro}``, ``segment_precision_*``, ``segment_recall_*``
    and ``segment_per_class``."""
    sse = _sse()
    classes = _validate_scores(scores)
    gt = _prepare_ground_truth(ground_truth, scores, classes)
    dur = _prepare_durations(durations, scores)
    f, p, r, stats = sse.segment_based.fscore(
        scores=dict(scores),
        ground_truth=gt,
        audio_durations=dur,
        threshold=dict(threshold) if isinstance(threshold, Mapping) else float(threshold),
        segment_length=segment_length,
    )
    return _fscore_dict("segment", f, p, r, stats)


# ============================================================================ frame AUROC on DataFrames


def _rasterize_on_grid(
    onsets: np.ndarray, offsets: np.ndarray, events: Sequence[tuple[float, float, str]], classes: Sequence[str]
) -> np.ndarray:
    """(T, C) bool: frame t is positive for class c when its centre lies in [onset, offset) of a
    class-c event. Uses the DataFrame's own frame grid, whatever its resolution."""
    centers = 0.5 * (onsets + offsets)
    idx = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(centers), len(classes)), dtype=bool)
    for on, off, lab in events:
        y[(centers >= on) & (centers < off), idx[lab]] = True
    return y


def _pooled_frames(
    scores: Mapping[Hashable, "pd.DataFrame"], gt: Mapping[Hashable, Sequence[tuple[float, float, str]]], classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Frame scores (sum_T, C) and rasterised labels (sum_T, C) of all files, concatenated."""
    all_s, all_y = [], []
    for key, df in scores.items():
        on = df["onset"].to_numpy(dtype=np.float64)
        off = df["offset"].to_numpy(dtype=np.float64)
        all_s.append(df[list(classes)].to_numpy(dtype=np.float64))
        all_y.append(_rasterize_on_grid(on, off, gt[key], classes))
    return np.concatenate(all_s), np.concatenate(all_y)


def sed_frame_auroc(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float, str]]],
) -> dict[str, Any]:
    """Frame-level AUROC per class, pooling the frames of all files (each frame counts once,
    whatever its length), and their macro average.

    Returns ``frame_AUROC_macro`` (mean over classes with both positive and negative frames)
    and ``frame_AUROC_per_class`` {class: AUROC or None when undefined}.
    """
    classes = _validate_scores(scores)
    gt = _prepare_ground_truth(ground_truth, scores, classes)
    s, y = _pooled_frames(scores, gt, classes)
    per_class = {c: roc_auc(s[:, k], y[:, k]) for k, c in enumerate(classes)}
    valid = [v for v in per_class.values() if not math.isnan(v)]
    if not valid:
        raise ValueError("frame AUROC is undefined for every class (each has only positive or only negative frames)")
    return {
        "frame_AUROC_macro": float(np.mean(valid)),
        "frame_AUROC_per_class": {c: (None if math.isnan(v) else float(v)) for c, v in per_class.items()},
    }


# ============================================================================ grounding


def grounding_metrics(
    scores: Mapping[Hashable, "pd.DataFrame"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float]]],
    durations: Mapping[Hashable, float],
    threshold: float = 0.5,
    collar_s: float = 0.2,
    offset_collar_rate: float = 0.2,
) -> dict[str, Any]:
    """Text-to-audio grounding, each phrase scored as its own query.

    scores: {query_id: DataFrame with onset, offset and ONE score column (any name)} on the
        query's audio; ground_truth: {query_id: [(onset_s, offset_s), ...]} (may be empty);
        durations: {query_id: seconds of that query's audio}.

    All queries are treated as one class ("query"), each query as its own "file", so that
    PSDS/F1 count detections per query and the eFPR is per hour of query audio.
      ``grounding_PSDS``: PSDS with dtc = gtc = 0.5, no cross-trigger term (alpha_ct = 0, and
          alpha_st = 0 since there is a single class), max eFPR 100/h;
      ``grounding_event_F1``: collar event F1 (onset collar `collar_s`, offset collar
          max(`collar_s`, `offset_collar_rate` x length)) at `threshold`; with one class micro = macro;
      ``grounding_event_precision``, ``grounding_event_recall``;
      ``grounding_frame_AUROC``: AUROC over all frames of all queries pooled (frame positive when
          its centre lies inside a ground-truth segment); None if no frame (or every frame) is positive;
      ``grounding_PSD_ROC``: {"efpr": [...], "etpr": [...]} for plotting; ``n_queries``.
    """
    import pandas as pd

    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict {query_id: DataFrame}")
    q_scores: dict[Hashable, pd.DataFrame] = {}
    for key, df in scores.items():
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"scores for query {key!r}: expected a DataFrame, got {type(df).__name__}")
        if len(df.columns) != 3 or list(df.columns[:2]) != ["onset", "offset"]:
            raise ValueError(
                f"scores for query {key!r}: need columns onset, offset and exactly one score column, got {list(df.columns)}"
            )
        q_scores[key] = df.set_axis(["onset", "offset", "query"], axis=1)
    if not isinstance(ground_truth, Mapping):
        raise ValueError("ground_truth must be a dict {query_id: [(onset, offset), ...]}")
    q_gt: dict[Hashable, list[tuple[float, float, str]]] = {}
    for key, segs in ground_truth.items():
        evs = []
        for i, seg in enumerate(segs):
            try:
                on, off = seg
            except (TypeError, ValueError):
                raise ValueError(f"ground truth for query {key!r}, segment {i}: expected (onset, offset), got {seg!r}") from None
            evs.append((on, off, "query"))
        q_gt[key] = evs
    res = psds(q_scores, q_gt, durations, **GROUNDING_PSDS_PARAMS)
    f1 = collar_f1(
        q_scores, q_gt, threshold=threshold, onset_collar=collar_s, offset_collar=collar_s, offset_collar_rate=offset_collar_rate
    )
    fs, fy = _pooled_frames(q_scores, _prepare_ground_truth(q_gt, q_scores, ["query"]), ["query"])
    auroc = roc_auc(fs[:, 0], fy[:, 0])
    return {
        "grounding_PSDS": res.value,
        "grounding_event_F1": f1["event_F1_micro"],
        "grounding_event_precision": f1["event_precision_micro"],
        "grounding_event_recall": f1["event_recall_micro"],
        "grounding_frame_AUROC": None if math.isnan(auroc) else auroc,
        "grounding_PSD_ROC": {"efpr": res.efpr.tolist(), "etpr": res.etpr.tolist()},
        "n_queries": len(q_scores),
    }


# ============================================================================ grounding: TextToAudioGrounding's protocol

#: The settings of TextToAudioGrounding's evaluation (wsntxxn/TextToAudioGrounding,
#: python_scripts/training/run_strong.py `evaluate` + utils/eval_util.py), named as there.
TAG_PROTOCOL: dict[str, Any] = dict(
    dtc_threshold=0.5, gtc_threshold=0.5, alpha_ct=0.0, alpha_st=0.0, max_efprs=(400, 600, 800, 1000, None),
    n_thresholds=50, th_auc_ranges=((0.0, 1.0), (0.2, 0.8)), connect_s=0.5, window_size=1,
)  # fmt: skip


def _tag_precision_recall(dets: Mapping[Hashable, np.ndarray], gts: Mapping[Hashable, np.ndarray], dtc: float, gtc: float) -> tuple[float, float]:
    """TextToAudioGrounding's `Grounding_PrecisionRecall._evaluate_detections`, per query.

    dets / gts: {query: (n, 2) [onset, offset] seconds}. A reference counts as found when the
    detections that each put >= dtc of their length on references cover >= gtc of it; a detection
    counts as correct when it puts >= dtc of its length on references that are each covered >= gtc
    (intersections summed over overlaps, as there; touching spans intersect with length 0)."""
    tp_refs = tp_dets = n_refs = n_dets = 0
    for q in set(dets) | set(gts):
        d = np.asarray(dets.get(q, np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
        g = np.asarray(gts.get(q, np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
        n_refs += len(g)
        n_dets += len(d)
        if not len(d) or not len(g):
            continue
        cross = (d[:, None, 0] <= g[None, :, 1]) & (g[None, :, 0] <= d[:, None, 1])
        inter = np.where(cross, np.minimum(d[:, None, 1], g[None, :, 1]) - np.maximum(d[:, None, 0], g[None, :, 0]), 0.0)
        det_prec = inter / (d[:, 1] - d[:, 0])[:, None]
        gt_cov = inter / (g[:, 1] - g[:, 0])[None, :]
        dtc_ok = det_prec.sum(axis=1) >= dtc
        # a reference joins the TP table only through a crossing dtc-passing detection (inner merge)
        joined = (cross & dtc_ok[:, None]).any(axis=0)
        tp_refs += int(np.sum(joined & ((gt_cov * dtc_ok[:, None]).sum(axis=0) >= gtc)))
        gtc_ok = gt_cov.sum(axis=0) >= gtc
        joined_d = (cross & gtc_ok[None, :]).any(axis=1)
        tp_dets += int(np.sum(joined_d & ((det_prec * gtc_ok[None, :]).sum(axis=1) >= dtc)))
    eps = 1e-15
    return tp_dets / max(n_dets, eps), tp_refs / max(n_refs, eps)


def _tag_segments(scores: np.ndarray, timeline: "Timeline", threshold: float, n_connect: int) -> np.ndarray:
    """TAG's decoding at one threshold: binarise (score > threshold), connect runs separated by
    at most `n_connect` frames, runs -> (n, 2) seconds on the frame grid (not clipped)."""
    active = np.asarray(scores) > threshold
    if not active.any():
        return np.zeros((0, 2))
    x = np.r_[False, active, False].astype(np.int8)
    starts = np.flatnonzero(np.diff(x) == 1)
    ends = np.flatnonzero(np.diff(x) == -1)
    keep_s, keep_e = [starts[0]], []
    for s0, e0, s1 in zip(starts[:-1], ends[:-1], starts[1:]):
        if s1 - e0 > n_connect:
            keep_e.append(e0)
            keep_s.append(s1)
    keep_e.append(ends[-1])
    on = np.asarray(timeline.frame_start(np.asarray(keep_s)), dtype=np.float64)
    off = np.asarray(timeline.frame_start(np.asarray(keep_e)), dtype=np.float64)
    return np.stack([on, off], axis=1)


def tag_grounding_metrics(
    scores: Mapping[Hashable, np.ndarray],
    timelines: Mapping[Hashable, "Timeline"],
    ground_truth: Mapping[Hashable, Sequence[tuple[float, float]]],
    durations: Mapping[Hashable, float],
    protocol: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Text-to-audio grounding with TextToAudioGrounding's protocol, on RAW frame scores, as there.

    scores: {query: (T,) probabilities}; timelines: {query: Timeline}; ground_truth: {query:
    [(onset, offset)]} (may be empty); durations: {query: seconds of its audio}.
    Returns
      ``psds`` {str(max_efpr): value}: sed_scores_eval PSDS with dtc = gtc = 0.5, alpha_ct =
          alpha_st = 0, every query its own file of one class, for max_efpr in 400, 600, 800,
          1000 and None (None: normalised by the largest eFPR reached), as TAG's
          `compute_psds_sed_scores`;
      ``th_auc`` {"0.00~1.00", "0.20~0.80": value}: TAG's `compute_th_auc`: at 50 thresholds
          (1/100, 3/100, ..., 99/100) the scores are binarised, runs closer than 0.5 s joined,
          precision/recall counted with dtc = gtc = 0.5 (`_tag_precision_recall`), F1 per
          threshold, and the trapezoid area of F1 over the thresholds in the range divided by its
          width;
      ``f_by_threshold`` {threshold: F1} and ``protocol`` (the settings).
    """
    _sse()
    from sed_scores_eval.intersection_based import psd_roc as _psd_roc
    from sed_scores_eval.base_modules.curves import staircase_auc

    proto = {**TAG_PROTOCOL, **(protocol or {})}
    keys = list(scores)
    if not keys:
        raise ValueError("no grounding queries")
    cls = "fake_event"  # TAG's single class name
    dfs = {k: scores_to_dataframe(np.asarray(scores[k], dtype=np.float64).reshape(-1, 1), timelines[k], [cls], durations[k]) for k in keys}
    # overlapping segments of one phrase merged (sed_scores_eval asserts there are none; TAG's data has none)
    gt = _prepare_ground_truth({k: [(float(a), float(b), cls) for a, b in ground_truth.get(k, ())] for k in keys},
                               dict.fromkeys(keys), [cls])  # fmt: skip
    if not any(gt.values()):
        raise ValueError("no query has a ground-truth segment")
    dur = {k: float(durations[k]) for k in keys}
    psds_out: dict[str, float | None] = {}
    deltas = intersection_deltas(dfs, gt, proto["dtc_threshold"], proto["gtc_threshold"])  # the same for every max_efpr
    for m in proto["max_efprs"]:
        (etpr, efpr), _ = _psd_roc(
            scores=dfs, ground_truth=gt, audio_durations=dur, deltas=deltas, dtc_threshold=proto["dtc_threshold"],
            gtc_threshold=proto["gtc_threshold"], cttc_threshold=None, alpha_ct=proto["alpha_ct"],
            alpha_st=proto["alpha_st"], unit_of_time="hour", max_efpr=m,
        )  # fmt: skip
        area = staircase_auc(etpr, efpr, max_x=m)
        norm = m if m is not None else float(np.max(efpr))
        # max_efpr None normalises by the largest eFPR reached: undefined (None) with no false positive at all
        psds_out[str(m)] = float(area / norm) if norm > 0 else None
    n = int(proto["n_thresholds"])
    thresholds = np.arange(1 / (n * 2), 1, 1 / n)
    gts = {k: np.asarray([(a, b) for a, b, _ in gt[k]], dtype=np.float64).reshape(-1, 2) for k in keys}
    f = np.zeros(len(thresholds))
    for i, th in enumerate(thresholds):
        dets = {}
        for k in keys:
            tl = timelines[k]
            dets[k] = _tag_segments(scores[k], tl, float(th), math.ceil(proto["connect_s"] * tl.frame_rate_hz - 1e-9))
        p, r = _tag_precision_recall(dets, gts, proto["dtc_threshold"], proto["gtc_threshold"])
        f[i] = 2 * p * r / max(p + r, 1e-15)
    th_auc = {}
    for lo, hi in proto["th_auc_ranges"]:
        sel = (thresholds >= lo) & (thresholds <= hi)
        x, y = thresholds[sel], f[sel]
        th_auc[f"{lo:.2f}~{hi:.2f}"] = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (hi - lo))
    return {
        "psds": psds_out,
        "th_auc": th_auc,
        "f_by_threshold": {f"{t:.2f}": float(v) for t, v in zip(thresholds, f)},
        "protocol": {k: (list(v) if isinstance(v, tuple) else v) for k, v in proto.items()},
    }


# ============================================================================ post-processing


def _per_class(value: float | Sequence[float], c: int, name: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    if v.ndim == 0:
        return np.full(c, float(v))
    if v.shape != (c,):
        raise ValueError(f"{name} must be a scalar or one value per class ({c}), got shape {v.shape}")
    return v


def median_filter_seconds(
    scores: np.ndarray, frame_rate_hz: float, window_s: float | Sequence[float]
) -> np.ndarray:
    """Median-filter frame scores along time with a window given in seconds.

    scores: (T, C) or (T,); frame_rate_hz: frames per second of the scores (from the Timeline);
    window_s: scalar or one window per class. The window in frames is round(window_s x rate),
    made odd (+1 when even) so it is centred; <= 1 frame means no filtering. Edges use scipy's
    'reflect' mode, as the DCASE baseline does. Returns an array of the input's shape.
    """
    from scipy.ndimage import median_filter

    if not frame_rate_hz > 0:
        raise ValueError(f"frame_rate_hz must be positive, got {frame_rate_hz}")
    s = np.asarray(scores, dtype=np.float64)
    squeeze = s.ndim == 1
    if squeeze:
        s = s[:, None]
    if s.ndim != 2:
        raise ValueError(f"scores must be (T, C) or (T,), got shape {s.shape}")
    windows = _per_class(window_s, s.shape[1], "window_s")
    if (windows < 0).any():
        raise ValueError(f"window_s must be >= 0, got {window_s}")
    out = np.empty_like(s)
    for k in range(s.shape[1]):
        n = int(round(windows[k] * frame_rate_hz))
        n += 1 - n % 2  # odd, so the median is centred on the frame
        out[:, k] = s[:, k] if n <= 1 or s.shape[0] == 0 else median_filter(s[:, k], size=n, mode="reflect")
    return out[:, 0] if squeeze else out


def binarize_and_segment(
    scores: np.ndarray,
    timeline: "Timeline",
    threshold: float | Sequence[float] = 0.5,
    min_duration_s: float | Sequence[float] = 0.0,
    merge_gap_s: float | Sequence[float] = 0.0,
    duration_s: float | None = None,
    classes: Sequence[str] | None = None,
) -> list[tuple[float, float, Any]]:
    """Threshold frame scores and turn active runs into events in seconds.

    scores: (T, C) (or (T,) for one class); a frame is active when score > threshold (the
    sed_scores_eval convention). threshold / min_duration_s / merge_gap_s: scalar or per class.
    Gaps shorter than merge_gap_s are closed first, then events shorter than min_duration_s
    dropped (Timeline.segments). Returns [(onset_s, offset_s, label)] sorted by onset, label =
    classes[c] if given else the class index c.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2:
        raise ValueError(f"scores must be (T, C) or (T,), got shape {s.shape}")
    c = s.shape[1]
    if classes is not None and len(classes) != c:
        raise ValueError(f"got {len(classes)} class names for {c} score columns")
    thr = _per_class(threshold, c, "threshold")
    min_d = _per_class(min_duration_s, c, "min_duration_s")
    gap = _per_class(merge_gap_s, c, "merge_gap_s")
    events: list[tuple[float, float, Any]] = []
    for k in range(c):
        label = classes[k] if classes is not None else k
        for on, off in timeline.segments(s[:, k] > thr[k], duration_s, min_duration_s=min_d[k], merge_gap_s=gap[k]):
            if off > on:  # frames past `duration_s` (encoder padding) collapse to zero length
                events.append((on, off, label))
    events.sort(key=lambda e: (e[0], e[1], str(e[2])))
    return events
