"""Evaluators for retrieval, zero-shot classification, sound event detection and grounding.

They take FUNCTIONS, not models (DESIGN.md principle 7), bundled in an `Evaluatable`:

- ``embed_audio(paths) -> (N, D)`` L2-normalised clip embeddings, one row per path;
- ``embed_text(texts) -> (M, D)`` L2-normalised text embeddings;
- ``frame_scores(path_or_wave, texts) -> FrameScores`` with ``scores (T, N)`` probabilities in
  [0, 1], the ``timeline`` that maps its frames to seconds, and ``duration_s``.

So one evaluator scores a trained model, its EMA weights, a baseline or an imported checkpoint.
Metric names and protocols follow DESIGN.md "Metric protocols"; the numbers come from the pure
functions in `finelap.eval.metrics`. Each evaluator returns a JSON-ready dict (plus an
``"artifacts"`` entry holding arrays for plots and score files, consumed by
`finelap.eval.report.write_report`).

Bad input: an audio file that cannot be read (the functions raise `AudioError` or
`FileNotFoundError`) is skipped with a warning and listed under ``result["skipped"]``;
evaluation goes on with the others.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from ..audio import Timeline
from ..data.manifests import GroundingItem
from ..data.types import Clip
from ..errors import AudioError, FinelapError
from ..utils import log, progress
from ..scoring import FrameScores, PerClass, PostProcess, check_template, make_prompt
from . import metrics as M

__all__ = [
    "AudioInput",
    "FrameScores",
    "EmbedAudioFn",
    "EmbedTextFn",
    "FrameScoresFn",
    "Evaluatable",
    "PostProcess",
    "make_prompt",
    "calibrate_detection",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "evaluate_sed",
    "evaluate_grounding",
    "TASKS",
]

AudioInput = Union[str, os.PathLike, np.ndarray]

# Errors that mean "this file is unusable", not "the model is broken": skip the file, go on.
_SKIPPABLE: tuple[type[BaseException], ...] = (AudioError, FileNotFoundError)


# ============================================================================ function protocols


@runtime_checkable
class EmbedAudioFn(Protocol):
    def __call__(self, audio: Sequence[AudioInput]) -> np.ndarray:
        """N audio paths (or waves) -> (N, D) L2-normalised clip embeddings."""
        ...


@runtime_checkable
class EmbedTextFn(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """M texts -> (M, D) L2-normalised text embeddings."""
        ...


@runtime_checkable
class FrameScoresFn(Protocol):
    def __call__(self, audio: AudioInput, texts: Sequence[str]) -> FrameScores:
        """One audio (path or wave) and N texts -> FrameScores with scores (T, N) in [0, 1]."""
        ...


@dataclass
class Evaluatable:
    """What an evaluator needs from a model: functions, plus how prompts are written.

    embed_audio / embed_text: for retrieval and zero-shot. frame_scores: for SED and grounding.
    Each may be None when the model cannot do that task; an evaluator that needs it says so.
    clip_scale_bias: optional (scale, bias) of the clip logits; when given, zero-shot examples
        report calibrated probabilities sigmoid(scale * cos + bias) instead of cosines (ranking
        metrics do not change under it).
    prompt_template: how a class label or phrase becomes a text query (`finelap.scoring.make_prompt`:
        "{}" is replaced by the label, underscores as spaces: "chirping_birds" -> "the sound of
        chirping birds"); the same rule as `Pipeline.detect` / `ground` / `frame_scores`.
    name: shown in reports.
    """

    embed_audio: EmbedAudioFn | Callable[[Sequence[AudioInput]], np.ndarray] | None = None
    embed_text: EmbedTextFn | Callable[[Sequence[str]], np.ndarray] | None = None
    frame_scores: FrameScoresFn | Callable[[AudioInput, Sequence[str]], Any] | None = None
    clip_scale_bias: tuple[float, float] | None = None
    prompt_template: str = "the sound of {}"
    name: str = "model"

    def require(self, *what: str, task: str) -> None:
        missing = [w for w in what if getattr(self, w) is None]
        if missing:
            raise FinelapError(f"{task} evaluation needs {', '.join(missing)} from '{self.name}', which it does not provide")


def _fill(template: str, text: str) -> str:
    """Fill a template with a caption verbatim (retrieval queries are sentences, not labels)."""
    return check_template(template).replace("{}", text)


# ============================================================================ shared helpers


def _skip(skipped: list[dict[str, str]], path: Any, err: BaseException) -> None:
    problem = err.problem if isinstance(err, AudioError) else str(err)
    skipped.append({"path": str(path), "error": problem})
    log(f"warning: skipping {path}: {problem}")


def _as_matrix(x: Any, n: int, what: str) -> np.ndarray:
    """Check a (n, D) embedding matrix from a user function and L2-normalise it (idempotent)."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] != n:
        raise FinelapError(f"{what} must return an array of shape ({n}, D) for {n} inputs, got {a.shape}")
    if not np.isfinite(a).all():
        raise FinelapError(f"{what} returned NaN or Inf")
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _embed_audio(
    fn: Callable, paths: Sequence[str], batch_size: int, skipped: list[dict[str, str]], desc: str
) -> tuple[np.ndarray | None, list[int]]:
    """Embed `paths` in batches; a batch that fails on a bad file is retried file by file so only
    the bad files are skipped. Returns (embeddings (K, D) or None, indices of the K kept paths)."""
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    starts = list(range(0, len(paths), batch_size))
    for lo in progress(starts, total=len(starts), desc=desc):
        idx = list(range(lo, min(lo + batch_size, len(paths))))
        try:
            chunks.append(_as_matrix(fn([paths[i] for i in idx]), len(idx), "embed_audio"))
            kept.extend(idx)
            continue
        except _SKIPPABLE:
            pass
        for i in idx:
            try:
                chunks.append(_as_matrix(fn([paths[i]]), 1, "embed_audio"))
                kept.append(i)
            except _SKIPPABLE as e:
                _skip(skipped, paths[i], e)
    if not chunks:
        return None, []
    dims = {c.shape[1] for c in chunks}
    if len(dims) > 1:
        raise FinelapError(f"embed_audio returned different embedding sizes across batches: {sorted(dims)}")
    return np.concatenate(chunks), kept


def _embed_texts(fn: Callable, texts: Sequence[str], batch_size: int, desc: str) -> np.ndarray:
    chunks = []
    starts = list(range(0, len(texts), batch_size))
    for lo in progress(starts, total=len(starts), desc=desc):
        batch = list(texts[lo : lo + batch_size])
        chunks.append(_as_matrix(fn(batch), len(batch), "embed_text"))
    return np.concatenate(chunks)


def _frame_scores(fn: Callable, audio: Any, texts: Sequence[str]) -> tuple[np.ndarray, Timeline, float]:
    """Call frame_scores and check its answer: (T, N) finite probabilities, a Timeline, a duration."""
    out = fn(audio, list(texts))
    try:
        scores, timeline, duration = out.scores, out.timeline, out.duration_s
    except AttributeError:
        raise FinelapError(
            f"frame_scores must return an object with .scores (T, N), .timeline and .duration_s, got {type(out).__name__}"
        ) from None
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().float().numpy()
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(texts) or s.shape[0] == 0:
        raise FinelapError(f"frame_scores returned scores of shape {s.shape} for {len(texts)} texts; expected (T >= 1, {len(texts)})")
    if not np.isfinite(s).all():
        raise FinelapError(f"frame_scores returned NaN or Inf for {audio}")
    if s.min() < -1e-6 or s.max() > 1 + 1e-6:
        raise FinelapError(
            f"frame_scores must return probabilities in [0, 1] (apply the sigmoid), got range [{s.min():.3g}, {s.max():.3g}]"
        )
    if not isinstance(timeline, Timeline):
        raise FinelapError(f"frame_scores must return a finelap.audio.Timeline, got {type(timeline).__name__}")
    d = float(duration)
    if not (math.isfinite(d) and d > 0):
        raise FinelapError(f"frame_scores returned a non-positive duration {duration!r} for {audio}")
    return np.clip(s, 0.0, 1.0), timeline, d


def _unique_keys(paths: Sequence[str], keys: Sequence[str]) -> list[str]:
    """File ids for score tables: the clip key, or the full path where two clips share a key."""
    count = Counter(keys)
    out = [k if count[k] == 1 else str(p) for k, p in zip(keys, paths)]
    if len(set(out)) != len(out):
        dup = [k for k, n in Counter(out).items() if n > 1]
        raise FinelapError(f"the same audio is listed more than once: {dup[:3]}")
    return out


def _activity_frame(events: Sequence[tuple[float, float, str]], df: Any, classes: Sequence[str]) -> Any:
    """A score DataFrame on `df`'s frame grid holding 1.0 where a detection is active, else 0.0.

    Detections start and end on frame edges (Timeline.segments), so this is exact; fed to
    sed_scores_eval with threshold 0.5 it reproduces the post-processed detections."""
    onsets = df["onset"].to_numpy(dtype=np.float64)
    act = np.zeros((len(df), len(classes)), dtype=np.float64)
    col = {c: i for i, c in enumerate(classes)}
    for on, off, lab in events:
        act[(onsets >= on - 1e-9) & (onsets < off - 1e-9), col[lab]] = 1.0
    # one construction, not a column at a time (pandas inserts are slow with many classes)
    data = np.column_stack([onsets, df["offset"].to_numpy(dtype=np.float64), act])
    return type(df)(data, columns=["onset", "offset", *classes], index=df.index)


def _base_result(task: str, fns: Evaluatable, template: str | None, pp: PostProcess | None) -> dict[str, Any]:
    return {
        "task": task,
        "model": fns.name,
        "n_items": 0,
        "prompt_template": template,
        "postprocess": None if pp is None else pp.to_dict(),
    }


def _check_labels(labels: Sequence[str] | None, what: str) -> list[str]:
    if labels is None:
        return []
    if isinstance(labels, str):
        raise FinelapError(f"{what} must be a list of labels, not the single string {labels!r}")
    out = [str(l).strip() for l in labels]
    if any(not l for l in out):
        raise FinelapError(f"{what} contains an empty label")
    dup = [l for l, n in Counter(out).items() if n > 1]
    if dup:
        raise FinelapError(f"{what} lists label(s) more than once: {dup[:5]}")
    return out


# ============================================================================ retrieval


def evaluate_retrieval(
    fns: Evaluatable,
    clips: Sequence[Clip],
    template: str | None = None,
    batch_size: int = 32,
    text_batch_size: int = 256,
) -> dict[str, Any]:
    """Text<->audio retrieval, multi-caption protocol: every caption is a query.

    clips: clips with `captions` (clips without any are left out and counted in
        ``n_without_captions``). template: applied to captions when given (default: verbatim).
    Returns ``text_to_audio_R@{1,5,10}``, ``audio_to_text_R@{1,5,10}``, ``mAP@10``, mean/median
    ranks (see metrics.retrieval_metrics), ``n_items`` (clips), ``n_captions``, ``skipped``.
    """
    fns.require("embed_audio", "embed_text", task="retrieval")
    if template is not None:
        _fill(template, "x")
    result = _base_result("retrieval", fns, template or "{}", None)
    with_caps = [c for c in clips if any(t.strip() for t in c.captions)]
    if not with_caps:
        raise FinelapError(f"retrieval needs clips with captions; none of the {len(clips)} clips has one")
    skipped: list[dict[str, str]] = []
    emb_a, kept = _embed_audio(fns.embed_audio, [c.audio for c in with_caps], batch_size, skipped, "retrieval: audio")
    if emb_a is None:
        raise FinelapError(f"no audio could be read: all {len(with_caps)} files were skipped (e.g. {skipped[0]})")
    texts, owner = [], []
    for j, i in enumerate(kept):
        for cap in with_caps[i].captions:
            if cap.strip():
                texts.append(_fill(template, cap) if template else cap)
                owner.append(j)
    emb_t = _embed_texts(fns.embed_text, texts, text_batch_size, "retrieval: text")
    if emb_t.shape[1] != emb_a.shape[1]:
        raise FinelapError(f"text embeddings have size {emb_t.shape[1]} but audio embeddings {emb_a.shape[1]}")
    sim = emb_t.astype(np.float64) @ emb_a.astype(np.float64).T  # (n_texts, n_audio)
    result.update(M.retrieval_metrics(sim, np.asarray(owner, dtype=np.int64)))
    result.update(
        n_items=len(kept), n_captions=len(texts), n_without_captions=len(clips) - len(with_caps), skipped=skipped,
    )  # fmt: skip
    return result


# ============================================================================ zero-shot classification


def evaluate_zeroshot(
    fns: Evaluatable,
    clips: Sequence[Clip],
    labels: Sequence[str] | None = None,
    template: str | None = None,
    batch_size: int = 32,
    n_examples: int = 5,
) -> dict[str, Any]:
    """Zero-shot classification: each label becomes the prompt `template` (default: the
    Evaluatable's, "the sound of {}"); a clip is assigned the label whose prompt is most similar.

    clips: clips with `labels` (one label each = single-label: top-1/top-5 accuracy, mAP,
        confusion matrix; any clip with several = multi-label: mAP only). Clips without labels
        are left out (``n_unlabelled``).
    labels: the candidate classes (default: every label found in the clips, sorted). A clip label
        missing from the list is an error.
    Returns ``top1_accuracy``, ``top5_accuracy``, ``mAP``, ``per_class_AP`` {label: AP or None},
    ``confusion_matrix`` (rows true, columns predicted, in ``labels`` order), ``labels``,
    ``multi_label``, ``examples`` (first `n_examples` clips with their top-3 predictions).
    """
    fns.require("embed_audio", "embed_text", task="zero-shot")
    template = template if template is not None else fns.prompt_template
    make_prompt(template, "x")  # validate before any work
    labelled = [c for c in clips if c.labels]
    if labels is not None:
        labels = _check_labels(labels, "labels")
        if not labels:
            raise FinelapError("the label list is empty: give at least one class label for zero-shot classification")
    else:
        labels = sorted({l for c in labelled for l in c.labels})
        if not labels:
            raise FinelapError("no labels: no label list was given and no clip has labels to take them from")
    if not labelled:
        raise FinelapError(f"zero-shot evaluation needs clips with labels; none of the {len(clips)} clips has one")
    index = {l: i for i, l in enumerate(labels)}
    unknown = sorted({l for c in labelled for l in c.labels if l not in index})
    if unknown:
        raise FinelapError(f"clip label(s) {unknown[:10]} are not in the label list ({len(labels)} labels: {labels[:10]}...)")
    multi = any(len(set(c.labels)) > 1 for c in labelled)
    result = _base_result("zeroshot", fns, template, None)
    skipped: list[dict[str, str]] = []
    emb_a, kept = _embed_audio(fns.embed_audio, [c.audio for c in labelled], batch_size, skipped, "zero-shot: audio")
    if emb_a is None:
        raise FinelapError(f"no audio could be read: all {len(labelled)} files were skipped (e.g. {skipped[0]})")
    prompts = [make_prompt(template, l) for l in labels]
    emb_t = _embed_texts(fns.embed_text, prompts, 256, "zero-shot: labels")
    if emb_t.shape[1] != emb_a.shape[1]:
        raise FinelapError(f"text embeddings have size {emb_t.shape[1]} but audio embeddings {emb_a.shape[1]}")
    scores = emb_a.astype(np.float64) @ emb_t.astype(np.float64).T  # (N, C) cosine
    kept_clips = [labelled[i] for i in kept]
    if multi:
        targets = np.zeros((len(kept_clips), len(labels)), dtype=np.int64)
        for r, c in enumerate(kept_clips):
            targets[r, [index[l] for l in c.labels]] = 1
    else:
        targets = np.array([index[c.labels[0]] for c in kept_clips], dtype=np.int64)
    m = M.classification_metrics(scores, targets)
    result.update({k: v for k, v in m.items() if k not in ("per_class_AP", "confusion_matrix")})
    result["per_class_AP"] = dict(zip(labels, m["per_class_AP"]))
    if "confusion_matrix" in m:
        result["confusion_matrix"] = m["confusion_matrix"]
    shown = scores
    score_kind = "cosine"
    if fns.clip_scale_bias is not None:
        scale, bias = (float(v) for v in fns.clip_scale_bias)
        shown = 1.0 / (1.0 + np.exp(-(scale * scores + bias)))
        score_kind = "probability"
    examples = []
    for r, c in enumerate(kept_clips[:n_examples]):
        top = np.argsort(-shown[r], kind="stable")[:3]
        examples.append({"audio": c.audio, "labels": list(c.labels),
                         "top3": [{"label": labels[k], score_kind: round(float(shown[r, k]), 4)} for k in top]})  # fmt: skip
    result.update(
        labels=labels, n_classes=len(labels), multi_label=multi, n_items=len(kept_clips),
        n_unlabelled=len(clips) - len(labelled), examples=examples, skipped=skipped,
    )  # fmt: skip
    return result


# ============================================================================ SED


def _example_queries(scores: np.ndarray, classes: Sequence[str], gt: Sequence[tuple[float, float, str]],
                     dets: Sequence[tuple[float, float, str]], limit: int = 6, false_positives: int = 2) -> list[int]:  # fmt: skip
    """Which classes to draw for one file: the reference classes (highest-scoring first), then
    up to `false_positives` classes without a reference event in this file (detected ones first,
    then the highest-scoring), so the plot shows what the model wrongly fires on, not only hits.
    At most `limit` classes, in class order."""
    ref = {e[2] for e in gt}
    detected = {e[2] for e in dets}
    peak = scores.max(axis=0) if scores.size else np.zeros(len(classes))
    in_ref = sorted((i for i, c in enumerate(classes) if c in ref), key=lambda i: -float(peak[i]))
    others = sorted((i for i, c in enumerate(classes) if c not in ref), key=lambda i: (classes[i] not in detected, -float(peak[i])))
    n_fp = min(false_positives, len(others), limit)
    chosen = in_ref[: limit - n_fp] + others[:n_fp]
    chosen += others[n_fp : n_fp + limit - len(chosen)] if not in_ref else []
    return sorted(int(i) for i in chosen)


def _psds_summary(name: str, res: M.PSDSResult, scores_kind: str) -> dict[str, Any]:
    """One PSDS with what a reader needs to trust it: the DCASE parameters, which scores, the
    per-class values with their mean and spread, the same PSDS without the spread penalty
    (alpha_st = 0, a diagnostic) and one sentence explaining a zero."""
    per = {c: float(v) for c, v in res.per_class.items()}
    vals = np.array(list(per.values()), dtype=np.float64)
    alpha = float(res.params.get("alpha_st") or 0.0)
    no_penalty = res.with_alpha_st(0.0) if alpha else res.value
    note = None
    if res.value <= 1e-9:
        if no_penalty > 1e-9:
            note = (f"{name} is 0 because of the penalty on the spread of the per-class TPRs (alpha_st = {alpha:g}): "
                    f"without it (alpha_st = 0) it is {no_penalty:.3f}; the per-class values (mean {vals.mean():.3f}, "
                    f"std {vals.std():.3f} over {len(vals)} classes) vary too much across classes.")  # fmt: skip
        else:
            note = (f"{name} is 0 even without the spread penalty (alpha_st = 0 gives {no_penalty:.3f}): no class reaches "
                    f"the detection criteria (dtc = {res.params['dtc']:g}, gtc = {res.params['gtc']:g}) within "
                    f"{res.params['max_efpr']:g} false positives per hour; the cause is localisation, not the class spread.")  # fmt: skip
    return {
        "value": res.value,
        "scores": scores_kind,
        "params": dict(res.params),
        "per_class": per,
        "per_class_mean": float(vals.mean()) if len(vals) else None,
        "per_class_std": float(vals.std()) if len(vals) else None,
        "alpha_st0": float(no_penalty),
        "note": note,
    }


def _score_kind(pp: PostProcess, classes: Sequence[str]) -> str:
    win = pp.values("median_filter_s", classes)
    if not (win > 0).any():
        return "raw frame probabilities (no median filter)"
    if np.all(win == win[0]):
        return f"frame probabilities median-filtered over {win[0]:g} s"
    return "frame probabilities median-filtered per class (" + ", ".join(f"{c}: {w:g} s" for c, w in list(zip(classes, win))[:5]) + ")"


def evaluate_sed(
    fns: Evaluatable,
    clips: Sequence[Clip],
    classes: Sequence[str] | None = None,
    postprocess: PostProcess | None = None,
    template: str | None = None,
    n_examples: int = 3,
    psds_variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sound event detection with DCASE protocols (sed_scores_eval).

    clips: the evaluation files with their strong labels (`events`; a clip without events is a
        negative file) and `duration` (taken from frame_scores when None).
    classes: the event classes (default: every event label found, sorted). Each is queried with
        `make_prompt(template, class)` (default template: the Evaluatable's). Events of other
        labels are ignored.
    postprocess: seconds-based post-processing (the checkpoint's calibrated settings, usually).
    psds_variants: extra PSDS settings to report next to PSDS1/PSDS2, {name: keyword arguments of
        `metrics.psds`} (dtc, gtc, cttc, alpha_ct, alpha_st, max_efpr; unset ones take psds's
        defaults), computed on the same scores as the headline PSDS. Returned as
        ``psds_variants`` {name: value}.

    Per file, frame_scores gives (T, C) probabilities, computed once; with the Timeline's frame
    edges they become sed_scores_eval score DataFrames. Returns
      ``PSDS1``, ``PSDS2``: exact DCASE parameters, on the scores after the post-processing's
          median filter (the field's protocol; `PostProcess.filter_psds_scores=False`: raw);
      ``PSDS1_raw``, ``PSDS2_raw``: the same on the raw frame probabilities;
      ``PSDS1_alpha_st0``, ``PSDS2_alpha_st0``: the headline PSDS without the class-spread penalty;
      ``psds``: {PSDS1, PSDS2, PSDS1_raw, PSDS2_raw: {value, scores, params, per_class,
          per_class_mean, per_class_std, alpha_st0, note}} (`note` explains a zero);
      ``event_F1`` (collar 200 ms, macro) and ``segment_F1`` (1 s, macro) on the post-processed
          detections, with their micro averages, precision and recall,
      ``frame_AUROC`` (macro over classes, raw scores),
      ``per_class`` {class: {PSDS1, PSDS2, PSDS1_raw, PSDS2_raw, event_F1, segment_F1,
          frame_AUROC, n_events}},
      ``detections``: DCASE rows [{filename, onset, offset, event_label}],
      ``n_items``, ``classes``, ``classes_without_events``, ``skipped``.
    """
    fns.require("frame_scores", task="SED")
    variants = {str(k): dict(v) for k, v in (psds_variants or {}).items()}
    for name, kw in variants.items():
        unknown = sorted(set(kw) - set(M.PSDS1_PARAMS))  # PSDS1_PARAMS names every psds setting
        if unknown:
            raise FinelapError(f"psds_variants[{name!r}]: unknown PSDS parameter(s) {unknown}")
    pp = postprocess or PostProcess()
    template = template if template is not None else fns.prompt_template
    check_template(template)
    data = _score_sed_files(fns, clips, classes, template, pp, n_examples)
    classes, raw_df, filt_df, act_df, gt, durations = (data[k] for k in ("classes", "raw", "filtered", "active", "gt", "durations"))
    skipped, detections, examples = data["skipped"], data["detections"], data["examples"]
    # sed_scores_eval cannot evaluate a class with no reference event: score those, but leave
    # them out of the metrics (and say so) rather than failing the whole evaluation.
    present = {lab for evs in gt.values() for _, _, lab in evs}
    eval_classes = [c for c in classes if c in present]
    missing = [c for c in classes if c not in present]
    if not eval_classes:
        raise FinelapError(f"none of the classes {classes[:10]} has a ground-truth event in the {len(raw_df)} scored files")
    if missing:
        log(f"SED: class(es) {missing[:10]} have no ground-truth event in the scored files; left out of the metrics")
    cols = ["onset", "offset", *eval_classes]

    def restrict(dfs: dict[str, Any]) -> dict[str, Any]:
        return {k: df[cols] for k, df in dfs.items()} if missing else dfs

    raw_e, act_e = restrict(raw_df), restrict(act_df)
    filtered = pp.filter_psds_scores and bool((pp.values("median_filter_s", classes) > 0).any())
    head_e = restrict(filt_df) if filtered else raw_e
    kind = _score_kind(pp, eval_classes) if filtered else "raw frame probabilities (no median filter)"
    p1 = M.psds1(head_e, gt, durations)
    p2 = M.psds2(head_e, gt, durations)
    p1r = M.psds1(raw_e, gt, durations) if filtered else p1
    p2r = M.psds2(raw_e, gt, durations) if filtered else p2
    psds_block = {
        "PSDS1": _psds_summary("PSDS1", p1, kind),
        "PSDS2": _psds_summary("PSDS2", p2, kind),
        "PSDS1_raw": _psds_summary("PSDS1 (raw scores)", p1r, "raw frame probabilities (no median filter)"),
        "PSDS2_raw": _psds_summary("PSDS2 (raw scores)", p2r, "raw frame probabilities (no median filter)"),
    }
    extra_psds = {name: M.psds(head_e, gt, durations, **kw).value for name, kw in variants.items()}
    ef = M.collar_f1(act_e, gt, threshold=0.5)
    sf = M.segment_f1(act_e, gt, durations, threshold=0.5, segment_length=1.0)
    try:
        au = M.sed_frame_auroc(raw_e, gt)
    except ValueError as e:  # every class covers all or none of the frames
        log(f"SED: frame AUROC undefined ({e})")
        au = {"frame_AUROC_macro": None, "frame_AUROC_per_class": {c: None for c in eval_classes}}
    n_events = Counter(lab for evs in gt.values() for _, _, lab in evs)
    result = _base_result("sed", fns, template, pp)
    result.update({
        "PSDS1": p1.value,
        "PSDS2": p2.value,
        "PSDS1_raw": p1r.value,
        "PSDS2_raw": p2r.value,
        "PSDS1_alpha_st0": psds_block["PSDS1"]["alpha_st0"],
        "PSDS2_alpha_st0": psds_block["PSDS2"]["alpha_st0"],
        "event_F1": ef["event_F1_macro"],
        "segment_F1": sf["segment_F1_macro"],
        "frame_AUROC": au["frame_AUROC_macro"],
        "event_F1_micro": ef["event_F1_micro"],
        "event_precision_macro": ef["event_precision_macro"],
        "event_recall_macro": ef["event_recall_macro"],
        "segment_F1_micro": sf["segment_F1_micro"],
        "segment_precision_macro": sf["segment_precision_macro"],
        "segment_recall_macro": sf["segment_recall_macro"],
        "psds_scores": kind,
        "psds_params": {"PSDS1": dict(p1.params), "PSDS2": dict(p2.params)},
        "psds": psds_block,
        **({"psds_variants": extra_psds} if variants else {}),
        "per_class": {
            c: {
                "PSDS1": p1.per_class.get(c),
                "PSDS2": p2.per_class.get(c),
                "PSDS1_raw": p1r.per_class.get(c),
                "PSDS2_raw": p2r.per_class.get(c),
                "event_F1": ef["event_per_class"][c]["F1"],
                "segment_F1": sf["segment_per_class"][c]["F1"],
                "frame_AUROC": au["frame_AUROC_per_class"].get(c),
                "n_events": int(n_events[c]),
            }
            for c in eval_classes
        },
        "n_items": len(raw_df),
        "n_events": int(sum(n_events.values())),
        "classes": list(classes),
        "classes_without_events": missing,
        "detections": detections,
        "skipped": skipped,
        "artifacts": {
            "psd_roc": {f"PSDS1 = {p1.value:.3f}": (p1.efpr, p1.etpr), f"PSDS2 = {p2.value:.3f}": (p2.efpr, p2.etpr)},
            "scores": raw_df,
            **({"scores_filtered": filt_df} if filtered else {}),  # what PSDS1/PSDS2 were computed on
            "examples": examples,
        },
    })  # fmt: skip
    return result


def _threshold_kind(pp: PostProcess, query: str) -> str:
    """"per-class" when `query` has a threshold of its own in `pp`, else "global"."""
    thr = pp.threshold
    return "per-class" if isinstance(thr, Mapping) and query in thr and query != "*" else "global"


def _sed_classes(clips: Sequence[Clip], classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        classes = _check_labels(classes, "classes")
        if not classes:
            raise FinelapError("the class list is empty: give at least one event class to detect")
    else:
        classes = sorted({e.label for c in clips for e in c.events})
        if not classes:
            raise FinelapError("no event classes: no class list was given and no clip has events")
    bad = [c for c in classes if "\\" in c or c in ("onset", "offset")]
    if bad:
        raise FinelapError(f"class name(s) {bad} cannot be used (reserved or containing a backslash)")
    return list(classes)


def _sed_frame_scores(fns: Evaluatable, clips: Sequence[Clip], classes: Sequence[str] | None, template: str,
                      desc: str) -> dict[str, Any]:  # fmt: skip
    """Frame scores of every clip for every class, computed ONCE: {classes, keys, items: [(clip,
    key, scores (T, C), timeline, duration)], skipped}. Unreadable files are skipped."""
    classes = _sed_classes(clips, classes)
    prompts = [make_prompt(template, c) for c in classes]
    keys = _unique_keys([c.audio for c in clips], [c.key for c in clips])
    skipped: list[dict[str, str]] = []
    items = []
    for clip, key in progress(list(zip(clips, keys)), total=len(clips), desc=desc):
        try:
            s, tl, dur_fs = _frame_scores(fns.frame_scores, clip.audio, prompts)
        except _SKIPPABLE as e:
            _skip(skipped, clip.audio, e)
            continue
        items.append((clip, key, s, tl, float(clip.duration) if clip.duration else dur_fs))
    if not items:
        raise FinelapError(f"no audio could be scored: all {len(clips)} files were skipped (e.g. {skipped[0] if skipped else None})")
    known = set(classes)
    n_ignored = sum(1 for clip, *_ in items for e in clip.events if e.label not in known)
    if n_ignored:
        log(f"SED: ignored {n_ignored} event(s) whose label is not one of the {len(classes)} classes")
    return {"classes": classes, "items": items, "skipped": skipped}


def _score_sed_files(fns: Evaluatable, clips: Sequence[Clip], classes: Sequence[str] | None, template: str,
                     pp: PostProcess, n_examples: int) -> dict[str, Any]:  # fmt: skip
    fsd = _sed_frame_scores(fns, clips, classes, template, "SED: frame scores")
    classes = fsd["classes"]
    known = set(classes)
    raw_df: dict[str, Any] = {}
    filt_df: dict[str, Any] = {}
    act_df: dict[str, Any] = {}
    gt: dict[str, list[tuple[float, float, str]]] = {}
    durations: dict[str, float] = {}
    detections: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for clip, key, s, tl, dur in fsd["items"]:
        smooth = pp.smooth(s, tl, classes)
        raw_df[key] = M.scores_to_dataframe(s, tl, classes, dur)
        filt_df[key] = M.scores_to_dataframe(smooth, tl, classes, dur)
        dets = pp.detect(smooth, tl, classes, dur, already_smoothed=True)
        act_df[key] = _activity_frame(dets, raw_df[key], classes)
        events = [(e.onset, e.offset, e.label) for e in clip.events if e.label in known]
        gt[key] = events
        durations[key] = dur
        fname = os.path.basename(str(clip.audio))
        detections.extend({"filename": fname, "onset": round(on, 6), "offset": round(off, 6), "event_label": lab}
                          for on, off, lab in dets)  # fmt: skip
        if len(examples) < n_examples and events:
            q = _example_queries(smooth, classes, events, dets)
            examples.append({
                "audio": str(clip.audio), "key": key, "scores": smooth[:, q].astype(np.float32), "timeline": tl,
                "duration_s": dur, "queries": [classes[i] for i in q],
                "detections": [[(on, off) for on, off, lab in dets if lab == classes[i]] for i in q],
                "ground_truth": [[(on, off) for on, off, lab in events if lab == classes[i]] for i in q],
                "threshold": [float(t) for t in pp.values("threshold", [classes[i] for i in q])],
                "threshold_kinds": [_threshold_kind(pp, classes[i]) for i in q],
                "title": f"{fname}: SED scores ({fns.name})",
            })  # fmt: skip
    return {"classes": classes, "raw": raw_df, "filtered": filt_df, "active": act_df, "gt": gt, "durations": durations,
            "skipped": fsd["skipped"], "detections": detections, "examples": examples}  # fmt: skip


# ============================================================================ calibration

#: Detection settings searched by `calibrate_detection` (seconds). Filters up to 3 s: events of
#: real recordings (a dog barking three times in 5 s) are one reference event with silent gaps
#: inside, which a 1-s filter splits (ESC-50 soundscapes: calibration picks 2 s, PSDS1 0.264 -> 0.303).
CALIBRATION_GRID: dict[str, tuple[float, ...]] = {
    "median_filter_s": (0.0, 0.2, 0.48, 1.0, 1.5, 2.0, 3.0),
    "min_duration_s": (0.0, 0.1, 0.25, 0.5),
    "merge_gap_s": (0.0, 0.2, 0.5),
}
#: What calibration maximises (stated in the checkpoint and in every notice that uses it).
CALIBRATION_CRITERION = (
    "micro-averaged collar-based event F1 on the validation data (sed_scores_eval; DCASE collars: onset 200 ms, "
    "offset max(200 ms, 20% of the event length)); per-class thresholds maximise their class's F1 and are shrunk "
    "toward the global threshold by n / (n + min_class_events), where n is the class's support: its distinct "
    "validation recordings when the data name them (synthesised soundscapes' sources[].recording, a clip's "
    "src_file), else its validation events; classes with n < min_class_events use the global threshold"
)
_COLLAR = dict(onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2)
_MAX_CANDIDATES = 4000


def _f1_curves(stats: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]], classes: Sequence[str],
               candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(tp, fp, n_ref) of each class at each candidate threshold, shapes (C, K), (C, K), (C,),
    read off sed_scores_eval's threshold-free intermediate statistics (one pass, all thresholds):
    at threshold t a class's counts are those of its first change-point score > t."""
    tp = np.zeros((len(classes), len(candidates)))
    fp = np.zeros_like(tp)
    n_ref = np.zeros(len(classes))
    for i, c in enumerate(classes):
        cp, st = stats[c]
        idx = np.minimum(np.searchsorted(np.asarray(cp), candidates, side="right"), len(cp) - 1)
        tp[i] = np.asarray(st["tps"])[idx]
        fp[i] = np.asarray(st["fps"])[idx]
        n_ref[i] = float(st["n_ref"])
    return tp, fp, n_ref


def _f1(tp: np.ndarray, fp: np.ndarray, n_ref: np.ndarray | float) -> np.ndarray:
    return 2 * tp / np.maximum(2 * tp + fp + (n_ref - tp), 1e-12)


def _middle_of_best(f: np.ndarray) -> int:
    """Index of the middle of the candidates reaching the maximum (a threshold away from the
    edges of the best plateau generalises better than its first point)."""
    best = np.flatnonzero(f >= f.max() - 1e-12)
    return int(best[len(best) // 2])


def class_support(clips_and_events: Sequence[tuple[Clip, Sequence[tuple[float, float, str]]]], classes: Sequence[str]
                  ) -> tuple[dict[str, int], dict[str, str]]:
    """Per class, how much independent validation evidence there is: the number of distinct source
    recordings of its events when every clip holding them names those recordings (a synthesised
    soundscape's ``meta["sources"][i]["recording"]``, a single clip's ``meta["src_file"]``), else
    its number of events. Ten events cut from one recording support a threshold for that recording,
    not for the class. Returns ({class: n}, {class: "recordings" | "events"})."""
    events: Counter = Counter()
    recordings: dict[str, set] = {c: set() for c in classes}
    named = dict.fromkeys(classes, True)
    for clip, evs in clips_and_events:
        here = Counter(lab for *_, lab in evs if lab in named)
        if not here:
            continue
        events.update(here)
        meta = clip.meta or {}
        srcs = meta.get("sources")
        for c in here:
            if isinstance(srcs, list):
                recs = {str(x["recording"]) for x in srcs if isinstance(x, Mapping) and x.get("label") == c and x.get("recording")}
            elif meta.get("src_file"):
                recs = {str(meta["src_file"])}
            else:
                recs = set()
            if recs:
                recordings[c] |= recs
            else:
                named[c] = False
    support, unit = {}, {}
    for c in classes:
        if named[c] and recordings[c]:
            support[c], unit[c] = len(recordings[c]), "recordings"
        else:
            support[c], unit[c] = int(events[c]), "events"
    return support, unit


def calibrate_detection(
    fns: Evaluatable,
    clips: Sequence[Clip],
    classes: Sequence[str] | None = None,
    template: str | None = None,
    min_class_events: int = 5,
    grid: Mapping[str, Sequence[float]] | None = None,
    data_name: str = "",
) -> dict[str, Any]:
    """Choose detection settings on validation data with strong labels (`finelap calibrate`).

    Frame scores are computed ONCE per file. For each median filter of the grid, sed_scores_eval's
    threshold-free collar statistics give every class's TP/FP counts at all thresholds at once,
    so the global threshold maximising micro event F1 is found vectorised over thresholds; then
    per-class thresholds (classes with a support (`class_support`: distinct recordings, or events)
    of at least `min_class_events`, shrunk toward the global one),
    then the merge gap and the minimum duration (one after the other) at those thresholds. The criterion is
    `CALIBRATION_CRITERION`.

    Returns the record stored in the checkpoint as `eval.calibration`: ``threshold``,
    ``class_thresholds`` {class: threshold}, ``median_filter_s``, ``min_duration_s``,
    ``merge_gap_s``, ``criterion``, ``score`` (micro event F1 with these settings),
    ``score_global_threshold`` (the same with the global threshold only), ``classes`` (the
    calibrated classes), ``events_per_class``, ``support_per_class`` {class: [n, "recordings" |
    "events"]}, ``n_files``, ``n_events``, ``prompt_template``,
    ``data``, ``min_class_events``, ``grid``, ``skipped``.
    """
    fns.require("frame_scores", task="calibration")
    if min_class_events < 1:
        raise FinelapError(f"min_class_events must be >= 1, got {min_class_events}")
    g = {**CALIBRATION_GRID, **{k: tuple(float(x) for x in v) for k, v in (grid or {}).items()}}
    for k, v in g.items():
        if k not in CALIBRATION_GRID or not v or min(v) < 0:
            raise FinelapError(f"calibration grid {k!r}: expected one of {sorted(CALIBRATION_GRID)} with values >= 0, got {v!r}")
    template = check_template(template if template is not None else fns.prompt_template)
    if not any(c.events for c in clips):
        raise FinelapError("calibration needs validation clips with strong labels (events); none of the clips has any")
    fsd = _sed_frame_scores(fns, clips, classes, template, "calibration: frame scores")
    all_classes, items = fsd["classes"], fsd["items"]
    known = set(all_classes)
    gt = {key: [(e.onset, e.offset, e.label) for e in clip.events if e.label in known] for clip, key, *_ in items}
    counts = Counter(lab for evs in gt.values() for *_, lab in evs)
    cal_classes = [c for c in all_classes if counts[c] > 0]
    if not cal_classes:
        raise FinelapError("none of the classes has a reference event in the scored validation files")
    col = [all_classes.index(c) for c in cal_classes]
    # sed_scores_eval's form: overlapping events of a class merged (it asserts they do not occur)
    gt_sse = M._prepare_ground_truth({k: [e for e in v if e[2] in set(cal_classes)] for k, v in gt.items()},
                                     dict.fromkeys(gt), cal_classes)  # fmt: skip
    M._sse()  # imports sed_scores_eval quietly
    from sed_scores_eval.collar_based.intermediate_statistics import accumulated_intermediate_statistics

    best: tuple[float, float, float, np.ndarray, np.ndarray] | None = None  # (F1, median, threshold, class F1 rows...)
    for med in g["median_filter_s"]:
        pp = PostProcess(median_filter_s=med)
        dfs = {key: M.scores_to_dataframe(pp.smooth(s[:, col], tl, cal_classes), tl, cal_classes, dur) for _, key, s, tl, dur in items}
        deltas = M.collar_deltas(dfs, gt_sse, **_COLLAR)  # bounded memory on long files
        stats, _ = accumulated_intermediate_statistics(scores=dfs, ground_truth=gt_sse, deltas=deltas, **_COLLAR)
        cps = np.unique(np.concatenate([np.asarray(stats[c][0])[np.isfinite(stats[c][0])] for c in cal_classes]))
        cps = cps[(cps > 0) & (cps < 1)] if ((cps > 0) & (cps < 1)).any() else cps
        if len(cps) > _MAX_CANDIDATES:  # keep the search bounded on big sets: quantiles of the change points
            cps = np.unique(np.quantile(cps, np.linspace(0, 1, _MAX_CANDIDATES)))
        # thresholds between consecutive change points (and just below the lowest)
        cand = np.concatenate([[max(0.0, cps[0] - 1e-6)], (cps[:-1] + cps[1:]) / 2]) if len(cps) else np.array([0.5])
        cand = np.clip(cand, 0.0, 1.0)
        tp, fp, n_ref = _f1_curves(stats, cal_classes, cand)
        micro = _f1(tp.sum(0), fp.sum(0), n_ref.sum())
        k = _middle_of_best(micro)
        if best is None or micro[k] > best[0] + 1e-12:  # ties keep the smaller filter (grid order)
            best = (float(micro[k]), float(med), float(cand[k]), _f1(tp, fp, n_ref[:, None]), cand)
    assert best is not None
    _, med, thr, class_f1, cand = best
    support, unit = class_support([(clip, gt[key]) for clip, key, *_ in items], cal_classes)
    class_thr: dict[str, float] = {}
    for i, c in enumerate(cal_classes):
        n = support[c]
        if n >= min_class_events:
            own = float(cand[_middle_of_best(class_f1[i])])
            w = n / (n + min_class_events)
            class_thr[c] = round(thr + w * (own - thr), 6)
    thr = round(thr, 6)

    # the chosen filter's scores and each file's frame grid, once for every (min duration, gap) tried
    smoothed = [(key, PostProcess(median_filter_s=med).smooth(s[:, col], tl, cal_classes), tl, dur) for _, key, s, tl, dur in items]
    grids = {key: M.scores_to_dataframe(sm[:, :1], tl, cal_classes[:1], dur)[["onset", "offset"]] for key, sm, tl, dur in smoothed}

    def micro_f1(pp: PostProcess) -> float:
        act = {key: _activity_frame(pp.detect(sm, tl, cal_classes, dur, already_smoothed=True), grids[key], cal_classes)
               for key, sm, tl, dur in smoothed}  # fmt: skip
        return float(M.collar_f1(act, gt, threshold=0.5)["event_F1_micro"])

    threshold: PerClass = {**class_thr, "*": thr} if class_thr else thr
    # one coordinate at a time (merge gap with no minimum duration, then the minimum duration with
    # that gap): each try is a full collar-F1 pass, so this halves the work of the full grid;
    # ties keep the smaller value (grid order)
    tried: dict[tuple[float, float], float] = {}

    def f_at(min_d: float, gap: float) -> float:
        if (min_d, gap) not in tried:
            tried[(min_d, gap)] = micro_f1(PostProcess(median_filter_s=med, threshold=threshold, min_duration_s=min_d, merge_gap_s=gap))
        return tried[(min_d, gap)]

    d0 = min(g["min_duration_s"])
    gap = max(g["merge_gap_s"], key=lambda v: (f_at(d0, v), -v))
    min_d = max(g["min_duration_s"], key=lambda v: (f_at(v, gap), -v))
    best_pp = PostProcess(median_filter_s=med, threshold=threshold, min_duration_s=min_d, merge_gap_s=gap)
    best_f = f_at(min_d, gap)
    global_only = micro_f1(PostProcess(median_filter_s=med, threshold=thr, min_duration_s=best_pp.min_duration_s,
                                       merge_gap_s=best_pp.merge_gap_s))  # fmt: skip
    return {
        "threshold": thr,
        "class_thresholds": class_thr,
        "median_filter_s": med,
        "min_duration_s": float(best_pp.min_duration_s),
        "merge_gap_s": float(best_pp.merge_gap_s),
        "criterion": CALIBRATION_CRITERION,
        "criterion_short": "micro event F1",
        "score": best_f,
        "score_global_threshold": global_only,
        "classes": cal_classes,
        "events_per_class": {c: int(counts[c]) for c in cal_classes},
        "support_per_class": {c: [int(support[c]), unit[c]] for c in cal_classes},
        "n_files": len(items),
        "n_events": int(sum(counts.values())),
        "prompt_template": template,
        "data": data_name,
        "min_class_events": int(min_class_events),
        "grid": {k: list(v) for k, v in g.items()},
        "skipped": fsd["skipped"],
    }


# ============================================================================ grounding


def evaluate_grounding(
    fns: Evaluatable,
    items: Sequence[GroundingItem],
    postprocess: PostProcess | None = None,
    template: str | None = None,
    n_examples: int = 3,
) -> dict[str, Any]:
    """Text-to-audio grounding (AudioGrounding protocol): each phrase is its own query on its
    item's audio, prompted as class labels are (`make_prompt(template, phrase)`, default template:
    the Evaluatable's), so grounding a phrase equals detecting it as a label.

    Returns ``grounding_PSDS`` (dtc = gtc = 0.5, max eFPR 100, on the median-filtered scores as
    SED's PSDS; ``grounding_PSDS_raw`` on raw scores), ``grounding_event_F1`` (collar 200 ms, on
    post-processed detections), ``grounding_event_precision``/``_recall``,
    ``grounding_frame_AUROC`` (raw scores), and TextToAudioGrounding's own protocol
    (`metrics.tag_grounding_metrics`, raw scores, named as there): ``tag_psds`` {max_efpr: value},
    ``tag_th_auc`` {"0.00~1.00", "0.20~0.80": value}, flattened as ``psds@max_efpr=400`` ... and
    ``th_auc@0.00~1.00`` ...; ``n_items`` (items scored), ``n_queries``,
    ``detections`` [{filename, onset, offset, phrase, item}], ``skipped``.
    """
    fns.require("frame_scores", task="grounding")
    pp = postprocess or PostProcess()
    template = check_template(template if template is not None else fns.prompt_template)
    result = _base_result("grounding", fns, template, pp)
    skipped: list[dict[str, str]] = []
    raw: dict[str, Any] = {}
    raw_only: dict[str, Any] = {}
    tag_scores: dict[str, np.ndarray] = {}
    tag_tl: dict[str, Timeline] = {}
    act: dict[str, Any] = {}
    gt: dict[str, list[tuple[float, float]]] = {}
    durations: dict[str, float] = {}
    detections: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    n_scored = 0
    usable = [(i, it) for i, it in enumerate(items) if it.phrases]
    if not usable:
        raise FinelapError(f"grounding needs items with phrases; none of the {len(items)} items has one")
    for i, it in progress(usable, total=len(usable), desc="grounding: frame scores"):
        phrases = [p.phrase for p in it.phrases]
        queries = [make_prompt(template, p) for p in phrases]
        try:
            s, tl, dur_fs = _frame_scores(fns.frame_scores, it.audio, queries)
        except _SKIPPABLE as e:
            _skip(skipped, it.audio, e)
            continue
        n_scored += 1
        dur = float(it.duration) if it.duration else dur_fs
        smooth = pp.smooth(s, tl, phrases)
        # one phrase at a time: an item may hold the same phrase twice (different token spans)
        dets = [pp.detect(smooth[:, j : j + 1], tl, [p], dur, already_smoothed=True) for j, p in enumerate(phrases)]
        fname = os.path.basename(str(it.audio))
        for j, ph in enumerate(it.phrases):
            qid = f"{i}/{j}"
            df = M.scores_to_dataframe((smooth if pp.filter_psds_scores else s)[:, j : j + 1], tl, ["query"], dur)
            raw[qid] = df
            raw_only[qid] = M.scores_to_dataframe(s[:, j : j + 1], tl, ["query"], dur)
            tag_scores[qid], tag_tl[qid] = s[:, j], tl
            mine = [(on, off, "query") for on, off, _ in dets[j]]
            act[qid] = _activity_frame(mine, df, ["query"])
            gt[qid] = [(float(on), float(off)) for on, off in ph.segments]
            durations[qid] = dur
            detections.extend({"filename": fname, "onset": round(on, 6), "offset": round(off, 6), "phrase": ph.phrase, "item": i}
                              for on, off, _ in mine)  # fmt: skip
        if len(examples) < n_examples and any(p.segments for p in it.phrases):
            examples.append({
                "audio": str(it.audio), "key": str(i), "scores": smooth.astype(np.float32), "timeline": tl,
                "duration_s": dur, "queries": phrases,
                "detections": [[(on, off) for on, off, _ in d] for d in dets],
                "ground_truth": [list(p.segments) for p in it.phrases],
                "threshold": [float(t) for t in pp.values("threshold", phrases)],
                "threshold_kinds": [_threshold_kind(pp, ph) for ph in phrases],
                "title": f"{fname}: \"{_clip_text(it.caption)}\" ({fns.name})",
            })  # fmt: skip
    if not raw:
        raise FinelapError(f"no audio could be scored: all {len(usable)} items were skipped (e.g. {skipped[0] if skipped else None})")
    if not any(gt.values()):
        raise FinelapError("no phrase of the scored items has a ground-truth segment; grounding PSDS is undefined")
    m = M.grounding_metrics(raw, gt, durations)
    m_raw = M.grounding_metrics(raw_only, gt, durations) if pp.filter_psds_scores else m
    f = M.grounding_metrics(act, gt, durations, threshold=0.5)
    tag = M.tag_grounding_metrics(tag_scores, tag_tl, gt, durations)
    result.update({
        "grounding_PSDS": m["grounding_PSDS"],
        "grounding_PSDS_raw": m_raw["grounding_PSDS"],
        "grounding_event_F1": f["grounding_event_F1"],
        "grounding_frame_AUROC": m_raw["grounding_frame_AUROC"],
        "grounding_event_precision": f["grounding_event_precision"],
        "grounding_event_recall": f["grounding_event_recall"],
        "psds_params": dict(M.GROUNDING_PSDS_PARAMS),
        **{f"psds@max_efpr={k}": v for k, v in tag["psds"].items()},
        **{f"th_auc@{k}": v for k, v in tag["th_auc"].items()},
        "tag_protocol": {
            "source": "wsntxxn/TextToAudioGrounding (run_strong.py evaluate, utils/eval_util.py), on raw scores",
            "psds": tag["psds"], "th_auc": tag["th_auc"], "settings": tag["protocol"],
        },
        "n_items": n_scored,
        "n_queries": len(raw),
        "n_queries_without_segments": sum(1 for v in gt.values() if not v),
        "detections": detections,
        "skipped": skipped,
        "artifacts": {
            "psd_roc": {f"grounding PSDS = {m['grounding_PSDS']:.3f}": (m["grounding_PSD_ROC"]["efpr"], m["grounding_PSD_ROC"]["etpr"])},
            "examples": examples,
        },
    })  # fmt: skip
    return result


def _clip_text(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


#: name -> evaluator, for the CLI (`finelap eval {retrieval,zeroshot,sed,grounding}`).
TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "retrieval": evaluate_retrieval,
    "zeroshot": evaluate_zeroshot,
    "sed": evaluate_sed,
    "grounding": evaluate_grounding,
}
