"""One scoring path: prompts, per-frame scores and their post-processing, shared by inference
(`finelap.infer.Pipeline`, the CLI) and evaluation (`finelap.eval.tasks`, the trainer's validation).

- `make_prompt(template, query)`: THE rule that turns a class label or a phrase into the text the
  text tower sees. Underscores become spaces ("chirping_birds" -> "chirping birds"), runs of white
  space collapse to one, and the result fills the template's single "{}". The template is the
  checkpoint's `eval.prompt_template` (recorded in config.json), default "the sound of {}".
  Captions used as retrieval queries are sentences and are used verbatim (no template).
- `FrameScores`: per-frame probabilities (T, N) of N queries for one audio input, with the
  `Timeline` that maps frames to seconds.
- `PostProcess`: frame probabilities -> detections; median filter, threshold, merge gap and minimum
  duration, every duration in SECONDS. Any setting may be per class ({class: value}, "*" default).
- `DetectionSettings`: the settings a checkpoint records (`eval.calibration`, chosen on validation
  data by `finelap calibrate`), or today's defaults for older checkpoints, with where they came from.

No torch here: the module is imported by the evaluators and the CLI alike.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np

from .errors import FinelapError

if TYPE_CHECKING:  # pragma: no cover
    from .audio import Timeline

__all__ = ["make_prompt", "make_prompts", "check_template", "FrameScores", "PostProcess", "PerClass", "DetectionSettings"]

_SPACES = re.compile(r"\s+")


# ============================================================================ prompts


def check_template(template: Any) -> str:
    """The template itself, or FinelapError when it does not contain '{}' exactly once."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise FinelapError(f"prompt template must contain '{{}}' exactly once (where the label goes), got {template!r}")
    return template


def make_prompt(template: str, query: str) -> str:
    """The text the text tower sees for a class label or phrase `query`: underscores as spaces,
    white space collapsed, placed where the template's "{}" is.

    >>> make_prompt("the sound of {}", "chirping_birds")
    'the sound of chirping birds'
    """
    text = _SPACES.sub(" ", str(query).replace("_", " ")).strip()
    return check_template(template).replace("{}", text)


def make_prompts(template: str, queries: Sequence[str]) -> list[str]:
    """`make_prompt` for each query, in order."""
    check_template(template)
    return [make_prompt(template, q) for q in queries]


# ============================================================================ frame scores


@dataclass
class FrameScores:
    """Per-frame probabilities of N queries for one audio input.

    scores: (T, N) float in [0, 1] (the sigmoid / calibration already applied).
    timeline: maps frame j to [timeline.frame_start(j), + timeline.hop_s) seconds; the only
        frames<->seconds mapping.
    duration_s: length of the audio in seconds (frames past it are encoder padding).
    texts: the N queries (labels or phrases, not the prompts built from them).
    calibrated: whether FLAM's logit adjustment was applied.
    name: file name (or "audio_<i>" for arrays).
    """

    scores: np.ndarray
    timeline: "Timeline"
    duration_s: float
    texts: list[str] = field(default_factory=list)
    calibrated: bool = False
    name: str = ""

    @property
    def times(self) -> np.ndarray:
        """(T,) start of each frame in seconds."""
        return np.asarray(self.timeline.frame_start(np.arange(len(self.scores))), dtype=np.float64)

    def to_dataframe(self, classes: Sequence[str] | None = None) -> Any:
        """sed_scores_eval score DataFrame (onset, offset, *classes), frames clipped to duration_s."""
        from .eval.metrics import scores_to_dataframe

        return scores_to_dataframe(self.scores, self.timeline, list(classes or self.texts), self.duration_s)

    def peak(self) -> tuple[float, int, int]:
        """(highest probability, its frame, its query index)."""
        s = np.asarray(self.scores)
        j, k = np.unravel_index(int(np.argmax(s)), s.shape)
        return float(s[j, k]), int(j), int(k)


# ============================================================================ post-processing (seconds)

PerClass = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class PostProcess:
    """Turn frame probabilities into detections; every duration is in SECONDS, never frames.

    median_filter_s: median-filter window (0 = none); converted to frames per score Timeline, so
        the same setting means the same thing at any frame rate.
    threshold: a frame is active when its score > threshold.
    merge_gap_s: gaps shorter than this between two detections of a class are closed.
    min_duration_s: detections shorter than this (after merging) are dropped.
    Each of the four may be a scalar or a {class: value} dict; a "*" key is the default for
    classes not listed.
    filter_psds_scores: the headline PSDS (and frame AUROC) are computed on the median-filtered
        scores, as the field's protocol does (FineLAP: 3 frames of 0.16 s); the raw-score values
        are always reported alongside. False makes the headline values the raw-score ones.
    """

    median_filter_s: PerClass = 0.0
    threshold: PerClass = 0.5
    merge_gap_s: PerClass = 0.0
    min_duration_s: PerClass = 0.0
    filter_psds_scores: bool = True

    def __post_init__(self) -> None:
        for name in ("median_filter_s", "threshold", "merge_gap_s", "min_duration_s"):
            value = getattr(self, name)
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            for cls, v in items:
                where = f"postprocess.{name}" + (f"[{cls!r}]" if cls is not None else "")
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    raise FinelapError(f"{where} must be a number, got {v!r}") from None
                if not math.isfinite(x) or x < 0:
                    raise FinelapError(f"{where} must be a finite number >= 0, got {v!r}")
                if name == "threshold" and x > 1:
                    raise FinelapError(f"{where} must be in [0, 1] (scores are probabilities), got {v!r}")

    def values(self, name: str, classes: Sequence[str]) -> np.ndarray:
        """One value of setting `name` per class, shape (C,)."""
        value = getattr(self, name)
        if not isinstance(value, Mapping):
            return np.full(len(classes), float(value))
        missing = [c for c in classes if c not in value and "*" not in value]
        if missing:
            raise FinelapError(f"postprocess.{name} has no value for class(es) {missing[:5]} (add them, or a '*' default)")
        return np.array([float(value[c]) if c in value else float(value["*"]) for c in classes])

    def smooth(self, scores: np.ndarray, timeline: "Timeline", classes: Sequence[str]) -> np.ndarray:
        """(T, C) scores median-filtered with the per-class window in seconds (float64)."""
        from .eval.metrics import median_filter_seconds

        win = self.values("median_filter_s", classes)
        if not (win > 0).any():
            return np.asarray(scores, dtype=np.float64)
        return median_filter_seconds(scores, timeline.frame_rate_hz, win)

    def detect(
        self,
        scores: np.ndarray,
        timeline: "Timeline",
        classes: Sequence[str],
        duration_s: float | None = None,
        already_smoothed: bool = False,
    ) -> list[tuple[float, float, str]]:
        """(T, C) probabilities -> [(onset_s, offset_s, class)] sorted by onset: median filter,
        threshold, merge close detections, drop short ones."""
        from .eval.metrics import binarize_and_segment

        s = np.asarray(scores, dtype=np.float64)
        if s.ndim == 1:
            s = s[:, None]
        if not already_smoothed:
            s = self.smooth(s, timeline, classes)
        return binarize_and_segment(
            s,
            timeline,
            threshold=self.values("threshold", classes),
            min_duration_s=self.values("min_duration_s", classes),
            merge_gap_s=self.values("merge_gap_s", classes),
            duration_s=duration_s,
            classes=list(classes),
        )

    def segments(self, fs: FrameScores) -> list[tuple[float, float, str, float]]:
        """Detections of a FrameScores with their confidence: [(onset_s, offset_s, query, conf)]
        sorted by onset; conf = the highest (filtered) frame probability inside the segment."""
        s = self.smooth(fs.scores, fs.timeline, fs.texts)
        events = self.detect(s, fs.timeline, fs.texts, fs.duration_s, already_smoothed=True)
        tl = fs.timeline
        out = []
        for on, off, lab in events:
            k = fs.texts.index(lab)
            f0 = int(tl.seconds_to_frame(on))
            f1 = max(f0 + 1, int(tl.seconds_to_frame(off - 1e-6)) + 1)
            out.append((float(on), float(off), str(lab), float(np.max(s[f0:f1, k]))))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "PostProcess":
        if not d:
            return cls()
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise FinelapError(f"unknown postprocess option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**dict(d))


# ============================================================================ the checkpoint's detection settings


@dataclass
class DetectionSettings:
    """Detection settings for a set of queries, and where they come from (for the one-line notice).

    postprocess: what detection uses. source: "calibration" (chosen on validation data and stored
    in the checkpoint), "defaults" (the checkpoint's eval section: it was never calibrated) or
    "given" (every setting passed by the caller). overridden: settings the caller passed.
    uncalibrated_queries: queries without a per-class threshold of their own (they get the global
    one). calibration: the stored record (criterion, data, score), or None.
    """

    postprocess: PostProcess
    source: str
    overridden: list[str] = field(default_factory=list)
    uncalibrated_queries: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None

    @property
    def global_threshold(self) -> float:
        thr = self.postprocess.threshold
        return float(thr.get("*", min(thr.values()))) if isinstance(thr, Mapping) else float(thr)

    def threshold_for(self, query: str) -> tuple[float, str]:
        """The threshold detection uses for `query` and what it is: "per-class" (the class's own
        calibrated threshold), "global" (the calibrated global one: the query has none of its own),
        "given" (passed by the caller, for every query) or "default" (the checkpoint's eval default:
        it was never calibrated)."""
        thr = self.postprocess.threshold
        if isinstance(thr, Mapping) and query in thr and query != "*":
            return float(thr[query]), "per-class"
        if any(o.startswith("threshold=") for o in self.overridden):
            return self.global_threshold, "given"
        return self.global_threshold, "global" if self.source == "calibration" else "default"

    def threshold_note(self, query: str) -> str:
        """The threshold used for `query`, rounded, and what it is: "0.312 (per-class threshold)"."""
        value, kind = self.threshold_for(query)
        return f"{fmt_threshold(value)} ({kind} threshold)"

    def describe(self) -> str:
        """One line: which settings and where from."""
        pp = self.postprocess
        thr = pp.threshold
        if isinstance(thr, Mapping):
            own = [k for k in thr if k != "*"]
            t = f"threshold {self.global_threshold:.3g} (own thresholds for {len(own)} class(es))"
        else:
            t = f"threshold {float(thr):.3g}"
        parts = [t, f"median filter {_scalar(pp.median_filter_s):g} s", f"min duration {_scalar(pp.min_duration_s):g} s",
                 f"merge gap {_scalar(pp.merge_gap_s):g} s"]  # fmt: skip
        if self.source == "calibration":
            cal = self.calibration or {}
            where = (f"calibrated on {cal.get('data', '?')} ({cal.get('criterion_short', 'event F1')} "
                     f"{float(cal.get('score', float('nan'))):.3f})")  # fmt: skip
        elif self.source == "defaults":
            where = "checkpoint defaults (not calibrated; run `finelap calibrate`)"
        else:
            where = "as given"
        if self.overridden and self.source != "given":
            where += f"; given: {', '.join(self.overridden)}"
        return "detection settings: " + ", ".join(parts) + f" [{where}]"


def _scalar(v: PerClass) -> float:
    if isinstance(v, Mapping):
        return float(v.get("*", next(iter(v.values()), 0.0)))
    return float(v)


def fmt_threshold(value: float) -> str:
    """A threshold as people read it: 3 decimals, no trailing zeros (0.285422 -> "0.285",
    0.5 -> "0.5"); one significant digit below 0.0005 rather than a misleading 0."""
    v = float(value)
    if 0 < abs(v) < 0.0005:
        return f"{v:.1g}"
    return f"{round(v, 3):g}"


def nothing_found_advice(peak: float, settings: "DetectionSettings", query: str, flag: str = "--threshold") -> str:
    """What to say when nothing was detected for `query` although its raw (unfiltered) frame
    probability peaked at `peak`: either the peak is under the threshold (suggest a lower one), or
    it crossed it too briefly to survive the median filter / minimum duration (say so)."""
    value, _ = settings.threshold_for(query)
    note = settings.threshold_note(query)
    if peak > value:
        pp = settings.postprocess
        med = pp.median_filter_s.get(query, _scalar(pp.median_filter_s)) if isinstance(pp.median_filter_s, Mapping) else float(pp.median_filter_s)
        mind = pp.min_duration_s.get(query, _scalar(pp.min_duration_s)) if isinstance(pp.min_duration_s, Mapping) else float(pp.min_duration_s)
        return (f"above the threshold {note} used for {query!r}, but too briefly to survive the {med:g}-s median filter "
                f"and {mind:g}-s minimum duration: try a shorter median filter or a threshold under the filtered peak")
    v = suggest_threshold(peak)
    hint = f"pass {flag}{v:g}" if flag.endswith("=") else f"try {flag} {v:g}"
    return f"under the threshold {note} used for {query!r}: {hint}"


def suggest_threshold(peak: float) -> float:
    """A threshold just under `peak` (2 significant digits, rounded down), to suggest when nothing
    crossed the threshold."""
    if not peak > 0:
        return 0.0
    exp = math.floor(math.log10(peak)) - 1
    step = 10.0**exp
    return max(step, math.floor(peak * 0.9 / step) * step)


def resolve_detection_settings(
    eval_cfg: Any,
    queries: Sequence[str],
    threshold: float | None = None,
    median_filter_s: float | None = None,
    min_duration_s: float | None = None,
    merge_gap_s: float | None = None,
) -> DetectionSettings:
    """The detection settings for `queries`: each given value wins; the rest come from the
    checkpoint's calibration (`eval_cfg.calibration`) when it has one, else from its eval defaults
    (sed_threshold, median_filter_s, min_event_s, merge_gap_s: older checkpoints load unchanged).

    A query with its own calibrated threshold uses it; any other query uses the global threshold
    (listed in `uncalibrated_queries`). Raises FinelapError for out-of-range values."""
    cal = getattr(eval_cfg, "calibration", None) or None
    given = {"threshold": threshold, "median_filter_s": median_filter_s, "min_duration_s": min_duration_s, "merge_gap_s": merge_gap_s}
    overridden = [f"{k}={v:g}" for k, v in given.items() if v is not None]
    if cal is not None:
        base = {k: float(cal.get(k, 0.0)) for k in ("threshold", "median_filter_s", "min_duration_s", "merge_gap_s")}
        per = {str(k): float(v) for k, v in (cal.get("class_thresholds") or {}).items()}
        source = "calibration"
    else:
        base = {"threshold": float(eval_cfg.sed_threshold), "median_filter_s": float(eval_cfg.median_filter_s),
                "min_duration_s": float(eval_cfg.min_event_s), "merge_gap_s": float(eval_cfg.merge_gap_s)}  # fmt: skip
        per = {}
        source = "defaults"
    vals: dict[str, Any] = {k: (float(v) if v is not None else base[k]) for k, v in given.items()}
    uncal: list[str] = []
    if cal is not None and threshold is None:
        known = set(cal.get("classes") or per)
        uncal = [q for q in queries if q not in known]
        mine = {q: per[q] for q in queries if q in per}
        if mine:
            vals["threshold"] = {**mine, "*": base["threshold"]}
    if all(v is not None for v in given.values()):
        source = "given"
    if isinstance(vals["threshold"], float) and not 0 <= vals["threshold"] <= 1:
        raise FinelapError(f"threshold must be in [0, 1] (a probability), got {vals['threshold']}")
    for k in ("median_filter_s", "min_duration_s", "merge_gap_s"):
        if vals[k] < 0:
            raise FinelapError(f"{k.replace('_s', '').replace('_', ' ')} must be >= 0 seconds, got {vals[k]}")
    pp = PostProcess(median_filter_s=vals["median_filter_s"], threshold=vals["threshold"], merge_gap_s=vals["merge_gap_s"],
                     min_duration_s=vals["min_duration_s"])  # fmt: skip
    return DetectionSettings(pp, source, overridden, uncal, dict(cal) if cal else None)
