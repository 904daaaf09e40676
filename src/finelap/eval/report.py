"""Evaluation reports: strict JSON, readable Markdown, PNG figures and score/detection files.

`write_report(result, "out/OUT.json", checkpoint_config)` writes, next to OUT.json:

- OUT.json: every metric of the evaluator's result (DESIGN.md names), the prompt template, the
  post-processing, skipped files, the checkpoint config and the list of files written. Strict
  JSON (NaN/Inf become null) and stable: the same result gives the same bytes.
- OUT.md: a headline-metric table, settings, per-class results, skipped files, the figures.
- OUT_confusion.png, OUT_per_class_ap.png (zero-shot), OUT_psd_roc.png (SED, grounding),
  OUT_timeline_<i>.png (a few example files: spectrogram + score curves + spans).
- OUT_detections.tsv (thresholded detections, DCASE columns) and OUT_scores/<file>.tsv
  (sed_scores_eval per-file score tables of the raw probabilities; OUT_scores_filtered/ holds the
  median-filtered ones the headline PSDS used) for SED; OUT_detections.tsv for grounding.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..utils import atomic_path, log, write_text_atomic

__all__ = ["write_report", "to_jsonable", "HEADLINE_METRICS"]

#: The metrics shown first (and in this order) for each task.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "retrieval": (
        "text_to_audio_R@1", "text_to_audio_R@5", "text_to_audio_R@10",
        "audio_to_text_R@1", "audio_to_text_R@5", "audio_to_text_R@10", "mAP@10",
    ),
    "zeroshot": ("top1_accuracy", "top5_accuracy", "mAP"),
    "sed": ("PSDS1", "PSDS2", "PSDS1_raw", "PSDS2_raw", "event_F1", "segment_F1", "frame_AUROC"),
    "grounding": ("grounding_PSDS", "grounding_event_F1", "grounding_frame_AUROC", "th_auc@0.00~1.00", "psds@max_efpr=1000"),
}  # fmt: skip

_TASK_TITLES = {"retrieval": "text-audio retrieval", "zeroshot": "zero-shot classification",
                "sed": "sound event detection", "grounding": "text-to-audio grounding"}  # fmt: skip


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types only: NaN/Inf -> None, numpy -> Python, tuples -> lists, Paths -> str,
    dataclasses -> dicts; dict keys become strings (order kept, so output is stable)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors
        return to_jsonable(obj.item())
    raise TypeError(f"cannot write {type(obj).__name__} to a JSON report")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _fmt_s(x: float) -> str:
    s = f"{round(float(x), 6):.6f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _tsv_field(value: Any) -> str:
    return re.sub(r"[\t\r\n]+", " ", str(value))


def _write_detections(path: Path, rows: Sequence[Mapping[str, Any]], task: str) -> Path:
    """DCASE detection TSV (filename, onset, offset, event_label); grounding adds the phrase's item."""
    lines = ["filename\tonset\toffset\tevent_label" + ("\titem" if task == "grounding" else "")]
    for r in rows:
        label = r.get("event_label", r.get("phrase", ""))
        line = f"{_tsv_field(r['filename'])}\t{_fmt_s(r['onset'])}\t{_fmt_s(r['offset'])}\t{_tsv_field(label)}"
        if task == "grounding":
            line += f"\t{r.get('item', '')}"
        lines.append(line)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _safe_name(key: str) -> str:
    """A file name for a score table: path separators and odd characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key)).strip("._") or "file"
    return name[:180]


def _write_scores(folder: Path, scores: Mapping[str, Any]) -> Path:
    """sed_scores_eval per-file score TSVs (onset, offset, <class...>), one per audio file."""
    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for key, df in scores.items():
        name = _safe_name(key)
        while name in used:  # two keys that sanitise alike
            name += "_"
        used.add(name)
        with atomic_path(folder / f"{name}.tsv") as tmp:
            df.to_csv(tmp, sep="\t", index=False)  # full precision: onsets of long files need it
    return folder


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return _md_escape(v)


def _pp_text(pp: Mapping[str, Any] | None) -> str:
    if not pp:
        return "none"

    def v(x: Any, unit: str) -> str:
        if isinstance(x, Mapping):
            return "per class (" + ", ".join(f"{_md_escape(k)}: {x[k]:g}{unit}" for k in list(x)[:6]) + (", …" if len(x) > 6 else "") + ")"
        return f"{x:g}{unit}"

    parts = [
        f"median filter {v(pp.get('median_filter_s', 0), ' s')}",
        f"threshold {v(pp.get('threshold', 0.5), '')}",
        f"merge gap {v(pp.get('merge_gap_s', 0), ' s')}",
        f"min duration {v(pp.get('min_duration_s', 0), ' s')}",
    ]
    if pp.get("filter_psds_scores"):
        parts.append("PSDS on filtered scores")
    return ", ".join(parts)


def _markdown(doc: Mapping[str, Any], figures: Mapping[str, Path], out_dir: Path) -> str:
    task = str(doc.get("task", "?"))
    lines = [f"# finelap evaluation: {_TASK_TITLES.get(task, task)}", ""]
    extra = doc.get("extra") or {}
    info = [("model", doc.get("model")), ("items evaluated", doc.get("n_items"))]
    for k in ("n_captions", "n_queries", "n_classes", "n_events"):
        if k in doc:
            info.append((k.replace("n_", "").replace("_", " "), doc[k]))
    info.append(("prompt template", f"`{doc.get('prompt_template')}`"))
    if task in ("sed", "grounding"):
        info.append(("post-processing", _pp_text(doc.get("postprocess"))))
    for k, v in extra.items():
        if isinstance(v, (str, int, float)) or v is None:
            info.append((str(k), v))
    info.append(("skipped files", len(doc.get("skipped") or [])))
    lines += ["| | |", "|---|---|"] + [f"| {_md_escape(k)} | {_md_value(v)} |" for k, v in info] + [""]

    head = [k for k in HEADLINE_METRICS.get(task, ()) if k in doc]
    lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {_md_escape(k)} | {_md_value(doc[k])} |" for k in head]
    lines.append("")
    others = [k for k, v in doc.items() if k not in head and isinstance(v, float) and k not in ("n_items",)]
    if others:
        lines += ["<details><summary>more metrics</summary>", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {_md_escape(k)} | {_md_value(doc[k])} |" for k in others] + ["", "</details>", ""]

    if task == "sed" and doc.get("psds"):
        lines += ["## PSDS (DCASE, sed_scores_eval)", "",
                  "| | value | scores | dtc | gtc | cttc | alpha_ct | alpha_st | max eFPR | per-class mean | per-class std | alpha_st = 0 |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        notes = []
        for name, b in doc["psds"].items():
            pr = b.get("params") or {}
            cells = [b.get("value"), b.get("scores"), *(pr.get(k) for k in ("dtc", "gtc", "cttc", "alpha_ct", "alpha_st", "max_efpr")),
                     b.get("per_class_mean"), b.get("per_class_std"), b.get("alpha_st0")]  # fmt: skip
            lines.append(f"| {_md_escape(name)} | " + " | ".join(_md_value(c) for c in cells) + " |")
            if b.get("note"):
                notes.append(f"- {_md_escape(b['note'])}")
        lines += [""] + (notes + [""] if notes else [])
    if task == "grounding" and doc.get("tag_protocol"):
        tag = doc["tag_protocol"]
        lines += ["## TextToAudioGrounding protocol", "", f"Source: {_md_escape(tag.get('source'))}.", "",
                  "| metric | value |", "|---|---:|"]  # fmt: skip
        lines += [f"| psds (max_efpr {_md_escape(k)}) | {_md_value(v)} |" for k, v in (tag.get("psds") or {}).items()]
        lines += [f"| th_auc (threshold {_md_escape(k)}) | {_md_value(v)} |" for k, v in (tag.get("th_auc") or {}).items()]
        lines.append("")
    if task == "sed" and doc.get("per_class"):
        cols = ("PSDS1", "PSDS2", "PSDS1_raw", "event_F1", "segment_F1", "frame_AUROC", "n_events")
        lines += ["## Per class", "", "| class | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for c, row in doc["per_class"].items():
            lines.append(f"| {_md_escape(c)} | " + " | ".join(_md_value(row.get(k)) for k in cols) + " |")
        lines.append("")
        if doc.get("classes_without_events"):
            lines += [f"Classes without reference events (not in the metrics): {', '.join(map(_md_escape, doc['classes_without_events']))}", ""]
    if task == "zeroshot" and doc.get("per_class_AP"):
        ap = doc["per_class_AP"]
        order = sorted(ap, key=lambda k: (ap[k] is None, -(ap[k] or 0.0), k))
        lines += ["## Per-class AP", "", "| class | AP |", "|---|---:|"]
        lines += [f"| {_md_escape(k)} | {_md_value(ap[k])} |" for k in order] + [""]
    if task == "zeroshot" and doc.get("examples"):
        lines += ["## Examples", "", "| audio | true | top-3 predictions |", "|---|---|---|"]
        for ex in doc["examples"]:
            preds = ", ".join(f"{_md_escape(p['label'])} ({next(v for k, v in p.items() if k != 'label'):.3f})" for p in ex["top3"])
            lines.append(f"| {_md_escape(os.path.basename(ex['audio']))} | {_md_escape(', '.join(ex['labels']))} | {preds} |")
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for name, p in figures.items():
            rel = os.path.relpath(p, out_dir).replace(os.sep, "/")
            lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({rel})", ""]
    files = doc.get("files") or {}
    data_files = {k: v for k, v in files.items() if k in ("detections", "scores", "scores_filtered")}
    if data_files:
        lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in data_files.items()] + [""]

    skipped = doc.get("skipped") or []
    lines += [f"## Skipped files ({len(skipped)})", ""]
    if skipped:
        for s in skipped[:200]:
            lines.append(f"- `{_md_escape(s.get('path'))}`: {_md_escape(s.get('error'))}")
        if len(skipped) > 200:
            lines.append(f"- … and {len(skipped) - 200} more (see the JSON)")
    else:
        lines.append("None: every file was read.")
    lines.append("")
    return "\n".join(lines)


def _plot_examples(examples: Sequence[Mapping[str, Any]], stem: Path, sample_rate: int) -> dict[str, Path]:
    from types import SimpleNamespace

    from ..errors import AudioError
    from ..streaming import file_reader
    from .plots import display_mel_stream, plot_timeline

    out: dict[str, Path] = {}
    for i, ex in enumerate(examples):
        try:  # the spectrogram is computed window by window: a 30-min file is never decoded whole
            read, n = file_reader(ex["audio"], sample_rate)
            mel, mel_tl, mel_cfg = display_mel_stream(SimpleNamespace(n_samples=n, read=read), sample_rate)
        except AudioError as e:
            log(f"report: no timeline plot for {ex['audio']} ({e.problem})")
            continue
        p = Path(f"{stem}_timeline_{i}.png")
        plot_timeline(
            mel, ex["scores"], ex["timeline"], ex["queries"], p, sample_rate=sample_rate, audio_timeline=mel_tl,
            mel_config=mel_cfg,
            detections=ex.get("detections"), ground_truth=ex.get("ground_truth"), threshold=ex.get("threshold"),
            duration_s=ex.get("duration_s"), title=ex.get("title", ""), threshold_kinds=ex.get("threshold_kinds"),
        )  # fmt: skip
        out[f"timeline_{i}"] = p
    return out


def write_report(
    result: Mapping[str, Any],
    out_json: str | Path,
    checkpoint_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    plots: bool = True,
    sample_rate: int = 16000,
) -> dict[str, Path]:
    """Write OUT.json, OUT.md, the PNGs and score/detection files for an evaluator's result.

    result: a dict from `finelap.eval.tasks.evaluate_*` (its "artifacts" feed the figures and
        score files and are not written to the JSON; "detections" go to OUT_detections.tsv).
    checkpoint_config: the checkpoint's config.json (stored verbatim under "checkpoint_config").
    extra: run information shown in the Markdown and stored under "extra" (e.g. {"checkpoint":
        dir, "data": path}).
    plots: False skips the PNGs (JSON, Markdown and TSVs are still written).
    sample_rate: rate at which example audio is loaded for the timeline spectrograms.
    Returns {"json", "md", "confusion", "per_class_ap", "psd_roc", "timeline_<i>", "detections",
    "scores": path} for the files actually written. A figure that fails is logged and left out;
    it never loses the metrics.
    """
    from .._version import __version__

    out_json = Path(out_json)
    if out_json.suffix.lower() != ".json":
        out_json = out_json.with_name(out_json.name + ".json")
    out_dir = out_json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / out_json.stem
    task = str(result.get("task", ""))
    artifacts = result.get("artifacts") or {}
    paths: dict[str, Path] = {}
    figures: dict[str, Path] = {}

    def figure(name: str, fn: Any, *args: Any, **kw: Any) -> None:
        try:
            figures[name] = fn(*args, **kw)
        except Exception as e:  # a figure never loses an evaluation's numbers
            log(f"report: could not draw {name} ({type(e).__name__}: {e})")

    if plots:
        from . import plots as P

        labels = result.get("labels")
        if result.get("confusion_matrix") is not None and labels:
            figure("confusion", P.plot_confusion, result["confusion_matrix"], labels, Path(f"{stem}_confusion.png"))
        if result.get("per_class_AP"):
            figure("per_class_ap", P.plot_per_class_ap, result["per_class_AP"], None, Path(f"{stem}_per_class_ap.png"))
        if artifacts.get("psd_roc"):
            figure("psd_roc", P.plot_psd_roc, artifacts["psd_roc"], Path(f"{stem}_psd_roc.png"),
                   title=f"PSD-ROC ({_TASK_TITLES.get(task, task)})")  # fmt: skip
        if artifacts.get("examples"):
            try:
                figures.update(_plot_examples(artifacts["examples"], stem, sample_rate))
            except Exception as e:
                log(f"report: could not draw example timelines ({type(e).__name__}: {e})")
    paths.update(figures)

    files: dict[str, str] = {}
    if "detections" in result:
        paths["detections"] = _write_detections(Path(f"{stem}_detections.tsv"), result["detections"], task)
        files["detections"] = paths["detections"].name
    if artifacts.get("scores"):
        paths["scores"] = _write_scores(Path(f"{stem}_scores"), artifacts["scores"])
        files["scores"] = paths["scores"].name + "/"
    if artifacts.get("scores_filtered"):  # the median-filtered scores the headline PSDS used
        paths["scores_filtered"] = _write_scores(Path(f"{stem}_scores_filtered"), artifacts["scores_filtered"])
        files["scores_filtered"] = paths["scores_filtered"].name + "/"
    files.update({k: p.name for k, p in figures.items()})

    doc: dict[str, Any] = {k: v for k, v in result.items() if k not in ("artifacts", "detections")}
    if "detections" in result:
        doc["n_detections"] = len(result["detections"])
    doc["finelap_version"] = __version__
    doc["checkpoint_config"] = dict(checkpoint_config) if checkpoint_config is not None else None
    doc["extra"] = dict(extra) if extra else {}
    doc["files"] = files
    doc = to_jsonable(doc)
    text = _dumps(doc)
    paths["md"] = out_json.with_suffix(".md")
    write_text_atomic(paths["md"], _markdown(doc, figures, out_dir))
    write_text_atomic(out_json, text)
    paths["json"] = out_json
    return paths
