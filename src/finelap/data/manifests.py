"""Readers and writers for the standard data formats (DESIGN.md "Data formats").

Every reader produces `finelap.data.types.Clip` records and every writer consumes them, so any
format can feed training, evaluation and curation:

- Manifest JSONL: one clip per line (`read_manifest`, `iter_manifest`, `write_manifest`).
- DCASE TSV: strong labels `filename onset offset event_label`, durations `filename duration`,
  weak labels `filename event_labels` (`read_strong_tsv`, `read_durations_tsv`, `read_weak_tsv`,
  their writers, `clips_from_dcase`, `clips_from_weak`).
- AudioGrounding JSON (`read_grounding_json`, `write_grounding_json`, `grounding_to_clips`).
- ESC-50-style CSV and folder-per-class (`read_esc50_csv`, `write_esc50_csv`, `read_class_folders`).
- WebDataset tar shards `<key>.flac` + `<key>.json` (`write_webdataset`, `iter_webdataset`,
  `decode_audio_bytes`), written with the standard library so `webdataset` is optional.
- `load_clips(path)` picks the reader from the extension / contents.

Validation is the same everywhere: a bad entry raises `DataFormatError(path, problem, line)` that
names the file and the 1-based line (for JSON documents: the line where the entry starts). Readers
take `on_error="skip"` to drop bad entries instead and collect the messages in a `ReadReport`
(pass one in to inspect it; otherwise a one-line summary is logged to stderr), so a long run is not
killed by one bad line but also does not skip silently.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence, Union

import numpy as np

from ..errors import AudioError, ConfigError, DataFormatError
from ..utils import atomic_path, log
from .types import Clip, Event

__all__ = [
    "DURATION_TOLERANCE",
    "ReadReport",
    "validate_clips",
    "read_manifest",
    "iter_manifest",
    "write_manifest",
    "read_strong_tsv",
    "write_strong_tsv",
    "read_durations_tsv",
    "write_durations_tsv",
    "read_weak_tsv",
    "write_weak_tsv",
    "clips_from_dcase",
    "clips_from_weak",
    "GroundingPhrase",
    "GroundingItem",
    "read_grounding_json",
    "write_grounding_json",
    "grounding_to_clips",
    "read_esc50_csv",
    "write_esc50_csv",
    "read_class_folders",
    "write_webdataset",
    "iter_webdataset",
    "decode_audio_bytes",
    "load_clips",
    "read_text_file",
]

PathLike = Union[str, "os.PathLike[str]"]
OnError = Literal["raise", "skip"]

# Annotations are often rounded to ms or written against a 10.0 s nominal length of a clip that
# decodes to 9.9995 s; a 1 ms slack avoids rejecting those while still catching real mistakes.
DURATION_TOLERANCE = 1e-3

# Manifest fields with a dedicated Clip attribute; everything else on a line goes to Clip.meta.
_RESERVED = ("audio", "id", "duration", "captions", "labels", "events")


# ----------------------------------------------------------------------------- error handling


@dataclass
class ReadReport:
    """What a reader kept and what it skipped (with `on_error="skip"`).

    n_ok: entries kept (clips, files or items, depending on the reader).
    errors: one DataFormatError per skipped entry; `messages` gives them as "file:line: problem".
    """

    source: str = ""
    n_ok: int = 0
    errors: list[DataFormatError] = field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        return [str(e) for e in self.errors]

    @property
    def n_skipped(self) -> int:
        return len(self.errors)

    def summary(self, max_lines: int = 5) -> str:
        head = f"{self.source}: kept {self.n_ok}, skipped {self.n_skipped} bad entr{'y' if self.n_skipped == 1 else 'ies'}"
        lines = [head] + ["  " + m for m in self.messages[:max_lines]]
        if self.n_skipped > max_lines:
            lines.append(f"  ... and {self.n_skipped - max_lines} more")
        return "\n".join(lines)


class _Bad(Exception):
    """Internal: one entry is invalid; the reader turns it into a DataFormatError with file/line."""


class _Sink:
    """Raise or collect entry errors according to `on_error`."""

    def __init__(self, on_error: str, report: ReadReport | None, source: object) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.skip = on_error == "skip"
        self.own = report is None
        self.report = report if report is not None else ReadReport(str(source))
        if not self.report.source:
            self.report.source = str(source)

    def error(self, path: object, problem: str, line: int | None = None) -> None:
        err = DataFormatError(path, problem, line)
        if not self.skip:
            raise err
        self.report.errors.append(err)

    def ok(self, n: int = 1) -> None:
        self.report.n_ok += n

    def done(self) -> None:
        # Without a caller-owned report, skipped entries would vanish; say so on stderr.
        if self.skip and self.own and self.report.errors:
            log(self.report.summary())


# ----------------------------------------------------------------------------- small parsers


def _num(value: Any, what: str) -> float:
    """A finite float from a JSON number or numeric string; _Bad otherwise."""
    if isinstance(value, bool) or value is None:
        raise _Bad(f"{what} must be a number, got {json.dumps(value)}")
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise _Bad(f"non-numeric {what} {value!r}") from None
    else:
        raise _Bad(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(x):
        raise _Bad(f"{what} must be finite, got {value!r}")
    return x


def _event_problem(label: str, onset: float, offset: float, duration: float | None) -> str | None:
    if onset < 0:
        return f"event '{label}': negative onset {onset:g}"
    if onset >= offset:
        return f"event '{label}': onset {onset:g} >= offset {offset:g}"
    if duration is not None and offset > duration + DURATION_TOLERANCE:
        return f"event '{label}': offset {offset:g} is past the end of the clip (duration {duration:g} s)"
    return None


def _check_event(label: str, onset: float, offset: float, duration: float | None) -> None:
    problem = _event_problem(label, onset, offset, duration)
    if problem:
        raise _Bad(problem)


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Bad(f"'{what}' must be a list of strings, got {type(value).__name__}")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise _Bad(f"'{what}[{i}]' must be a string, got {type(s).__name__}")
        if not s.strip():
            raise _Bad(f"'{what}[{i}]' is empty")
        out.append(s)
    return out


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    d = _num(value, "duration")
    if d <= 0:
        raise _Bad(f"duration must be > 0, got {d:g}")
    return d


def _is_url(audio: str) -> bool:
    return "://" in audio


def _resolve(audio: str, base_dir: Path) -> str:
    """Absolute path for `audio`: relative paths are taken relative to `base_dir` (the label file's
    folder), so a dataset folder can be moved or mounted elsewhere without rewriting manifests."""
    if _is_url(audio):
        return audio
    audio = os.path.expanduser(audio)
    if os.path.isabs(audio):
        return audio
    return os.path.normpath(os.path.join(os.path.abspath(base_dir), audio))


def _check_audio_exists(audio: str) -> None:
    if not _is_url(audio) and not os.path.isfile(audio):
        raise _Bad(f"audio file not found: {audio}")


def _clip_fields(obj: Mapping[str, Any], audio: str) -> Clip:
    """Clip from a manifest object (everything but resolving `audio`). Raises _Bad."""
    if "captions" in obj:
        captions = _str_list(obj["captions"], "captions")
    else:  # common single-caption spelling; written back as "captions"
        captions = _str_list(obj.get("caption"), "caption")
    labels = _str_list(obj.get("labels"), "labels")
    duration = _duration(obj.get("duration"))
    raw_events = obj.get("events")
    if raw_events is None:
        raw_events = []
    if not isinstance(raw_events, list):
        raise _Bad(f"'events' must be a list of {{label, onset, offset}} objects, got {type(raw_events).__name__}")
    events = []
    for i, ev in enumerate(raw_events):
        if not isinstance(ev, dict):
            raise _Bad(f"events[{i}] must be an object with label, onset, offset")
        for k in ("label", "onset", "offset"):
            if k not in ev:
                raise _Bad(f"events[{i}] is missing required field '{k}'")
        label = ev["label"]
        if not isinstance(label, str) or not label.strip():
            raise _Bad(f"events[{i}]: label must be a non-empty string")
        onset, offset = _num(ev["onset"], f"onset of events[{i}]"), _num(ev["offset"], f"offset of events[{i}]")
        _check_event(label, onset, offset, duration)
        events.append(Event(label, onset, offset))
    cid = obj.get("id")
    if cid is not None:
        if isinstance(cid, bool) or not isinstance(cid, (str, int)):
            raise _Bad(f"'id' must be a string, got {type(cid).__name__}")
        cid = str(cid)
    meta = {k: v for k, v in obj.items() if k not in _RESERVED and not (k == "caption" and "captions" not in obj)}
    return Clip(audio=audio, captions=captions, events=events, labels=labels, duration=duration, id=cid, meta=meta)


def _clip_to_obj(clip: Clip, audio: str | None) -> dict[str, Any]:
    """Manifest object for a clip; `audio=None` leaves the audio field out (WebDataset json)."""
    obj: dict[str, Any] = {}
    if audio is not None:
        obj["audio"] = audio
    if clip.id is not None:
        obj["id"] = clip.id
    if clip.duration is not None:
        obj["duration"] = float(clip.duration)
    if clip.captions:
        obj["captions"] = list(clip.captions)
    if clip.labels:
        obj["labels"] = list(clip.labels)
    if clip.events:
        obj["events"] = [e.as_dict() for e in clip.events]
    for k, v in clip.meta.items():
        if k in _RESERVED:
            raise _Bad(f"meta key '{k}' clashes with the manifest field of the same name")
        obj[k] = v
    return obj


def _clip_problem(clip: Clip, check_audio: bool) -> str | None:
    """Why an in-memory clip is invalid, or None."""
    if not isinstance(clip.audio, str) or not clip.audio:
        return "clip has no audio path"
    try:
        d = _duration(clip.duration)
        _str_list(list(clip.captions), "captions")
        _str_list(list(clip.labels), "labels")
        for ev in clip.events:
            _check_event(ev.label, float(ev.onset), float(ev.offset), d)
        if check_audio:
            _check_audio_exists(clip.audio)
    except _Bad as e:
        return str(e)
    return None


def validate_clips(
    clips: Sequence[Clip],
    source: PathLike,
    check_audio: bool = False,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[Clip]:
    """Check clips built in memory with the same rules the readers apply.

    Errors name `source` and the clip's 1-based position in `clips` as the line (which is the
    manifest line for clips read from, or about to be written to, a JSONL manifest).
    Returns the valid clips (all of them with on_error="raise").
    """
    sink = _Sink(on_error, report, source)
    out = []
    for i, clip in enumerate(clips, start=1):
        problem = _clip_problem(clip, check_audio)
        if problem:
            sink.error(source, f"clip '{clip.key}': {problem}", i)
            continue
        sink.ok()
        out.append(clip)
    sink.done()
    return out


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataFormatError(path, "file not found")
    if path.is_dir():
        raise DataFormatError(path, "is a directory, expected a file")


# Text files are read with errors="surrogateescape": every byte that is not valid UTF-8 becomes one
# lone surrogate U+DC80..U+DCFF (valid UTF-8 never decodes to those), so a bad line is found and
# reported with its line and column, and the other lines (and line splitting) are unaffected.
_TEXT_KW: dict[str, Any] = dict(encoding="utf-8-sig", errors="surrogateescape")
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _utf8_problem(text: str) -> str | None:
    """None if `text` (decoded with surrogateescape) was valid UTF-8; else what is wrong and where."""
    m = _BAD_BYTE.search(text)
    if m is None:
        return None
    return f"not valid UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} at column {m.start() + 1}); save the file as UTF-8"


def _check_utf8(path: Path, text: str) -> None:
    """DataFormatError naming the first line of a whole-file `text` that is not valid UTF-8."""
    m = _BAD_BYTE.search(text)
    if m is not None:
        line_start = text.rfind("\n", 0, m.start()) + 1
        raise DataFormatError(path, _utf8_problem(text[line_start:]) or "not valid UTF-8 text", text.count("\n", 0, m.start()) + 1)


def read_text_file(path: PathLike) -> str:
    """The contents of a UTF-8 text file (a BOM is dropped). DataFormatError naming the file for a
    missing file, a directory, or bytes that are not UTF-8 (with the line and column)."""
    path = Path(path)
    _require_file(path)
    text = path.read_text(**_TEXT_KW)
    _check_utf8(path, text)
    return text


# ----------------------------------------------------------------------------- JSONL manifest


def iter_manifest(
    path: PathLike,
    check_audio: bool = True,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> Iterator[Clip]:
    """Stream clips from a JSONL manifest, one JSON object per line (blank lines ignored).

    Relative `audio` paths are resolved against the manifest's folder. Unknown keys go to
    `Clip.meta`. With `check_audio`, a missing audio file is an error of that line.
    """
    path = Path(path)
    _require_file(path)
    sink = _Sink(on_error, report, path)
    base = path.parent
    with open(path, **_TEXT_KW) as f:
        for ln, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                bad = _utf8_problem(line)
                if bad:
                    raise _Bad(bad)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad(f"invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise _Bad(f"expected a JSON object per line, got {type(obj).__name__}")
                clip = _clip_from_manifest_obj(obj, base, check_audio)
            except _Bad as e:
                sink.error(path, str(e), ln)
                continue
            sink.ok()
            yield clip
    sink.done()


def _clip_from_manifest_obj(obj: Mapping[str, Any], base: Path, check_audio: bool) -> Clip:
    if "audio" not in obj:
        raise _Bad("missing required field 'audio'")
    audio = obj["audio"]
    if not isinstance(audio, str) or not audio.strip():
        raise _Bad("'audio' must be a non-empty path string")
    clip = _clip_fields(obj, _resolve(audio, base))
    if check_audio:
        _check_audio_exists(clip.audio)
    return clip


def read_manifest(
    path: PathLike,
    check_audio: bool = True,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[Clip]:
    """Read a JSONL manifest into a list of clips (see `iter_manifest`)."""
    return list(iter_manifest(path, check_audio=check_audio, on_error=on_error, report=report))


def _rel_audio(audio: str, base: Path, absolute: bool) -> str:
    if _is_url(audio):
        return audio
    p = os.path.abspath(os.path.expanduser(audio))
    if absolute:
        return p
    try:
        rel = os.path.relpath(p, base)
    except ValueError:  # different drive on Windows
        return p
    # Paths that climb out of the base folder are brittle when the folder moves; keep them absolute.
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return p
    return rel.replace(os.sep, "/")


def write_manifest(
    path: PathLike,
    clips: Iterable[Clip],
    relative_to: PathLike | None = None,
    absolute: bool = False,
) -> Path:
    """Write clips as a JSONL manifest (atomically) and return its path.

    Audio paths inside `relative_to` (default: the manifest's folder, which is what
    `read_manifest` resolves against) are written relative to it; others are written absolute.
    Pass a different `relative_to` only for a manifest that will be moved into that folder.
    `absolute=True` writes every path absolute. Clip.meta keys are written back as-is.
    Invalid clips (bad events, non-JSON meta) raise DataFormatError naming the clip's line.
    """
    path = Path(path)
    base = Path(os.path.abspath(relative_to if relative_to is not None else path.parent))
    lines = []
    for i, clip in enumerate(clips, start=1):
        problem = _clip_problem(clip, check_audio=False)
        try:
            if problem:
                raise _Bad(problem)
            obj = _clip_to_obj(clip, _rel_audio(clip.audio, base, absolute))
            lines.append(json.dumps(obj, ensure_ascii=False, allow_nan=False))
        except _Bad as e:
            raise DataFormatError(path, f"cannot write clip '{clip.key}': {e}", i) from None
        except (TypeError, ValueError) as e:
            raise DataFormatError(path, f"cannot write clip '{clip.key}': meta is not JSON-serialisable ({e})", i) from None
    with atomic_path(path) as tmp:
        tmp.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- DCASE TSV


def _fmt(x: float) -> str:
    """Seconds with at most 6 decimals and no exponent (DCASE tools and spreadsheets read it)."""
    s = f"{round(float(x), 6):.6f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str], str | None]]:
    """(1-based line number, tab-separated fields, problem) for non-blank lines. Only the line
    break is stripped: trailing empty fields (`file\\t\\t\\t`) are meaningful in DCASE files.
    `problem` is None, or says that the line is not valid UTF-8: its row is still given (bad
    bytes as U+FFFD), so a reader can drop everything that belongs to the file it names."""
    with open(path, **_TEXT_KW, newline="") as f:
        for ln, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            bad = _utf8_problem(line)
            if bad:
                line = _BAD_BYTE.sub("\ufffd", line)
            yield ln, line.split("\t"), bad


_FILENAME_NAMES = ("filename", "file", "fname", "audio", "audio_id", "audio_filename")


def _strong_rows(
    path: Path, sink: _Sink
) -> tuple[dict[str, list[tuple[Event, int]]], dict[str, int]]:
    """Parse a strong-label TSV: ({filename: [(event, line)]}, {filename: first line}).
    With on_error="skip", a file with any bad row is dropped entirely: keeping its other rows
    would turn the missing event into a false negative for training and scoring."""
    _require_file(path)
    out: dict[str, list[tuple[Event, int]]] = {}
    first_line: dict[str, int] = {}
    bad: set[str] = set()
    idx = (0, 1, 2, 3)
    ncols = 4
    first = True
    for ln, row, undecodable in _tsv_rows(path):
        if first:
            first = False
            lower = [c.strip().lower() for c in row]
            if not undecodable and (lower[0] in _FILENAME_NAMES or "onset" in lower):
                names = {"event_label": ("event_label", "label", "event"), "filename": _FILENAME_NAMES}
                try:
                    fi = next(lower.index(n) for n in names["filename"] if n in lower)
                    li = next(lower.index(n) for n in names["event_label"] if n in lower)
                    idx = (fi, lower.index("onset"), lower.index("offset"), li)
                except (StopIteration, ValueError):
                    raise DataFormatError(
                        path, f"header must name the columns filename, onset, offset, event_label; got {row}", ln
                    ) from None
                ncols = len(row)
                continue
        fname = row[0].strip() if row else ""
        try:
            if undecodable:  # the file it names is dropped with it (skip mode), like any bad row
                if len(row) == ncols:
                    fname = row[idx[0]].strip()
                raise _Bad(undecodable)
            if len(row) == 1:  # bare filename: a clip without events
                if not fname:
                    raise _Bad("empty filename")
                out.setdefault(fname, [])
                first_line.setdefault(fname, ln)
                continue
            if len(row) != ncols:
                raise _Bad(
                    f"expected {ncols} tab-separated columns (filename, onset, offset, event_label), got {len(row)}"
                )
            fname = row[idx[0]].strip()
            on_s, off_s, label = row[idx[1]].strip(), row[idx[2]].strip(), row[idx[3]].strip()
            if not fname:
                raise _Bad("empty filename")
            first_line.setdefault(fname, ln)
            if not on_s and not off_s and not label:  # DCASE's way of listing a clip with no events
                out.setdefault(fname, [])
                continue
            if not on_s or not off_s:
                raise _Bad(f"event '{label}' has an empty onset or offset")
            if not label:
                raise _Bad("empty event_label")
            onset, offset = _num(on_s, "onset"), _num(off_s, "offset")
            _check_event(label, onset, offset, None)
        except _Bad as e:
            sink.error(path, str(e), ln)
            if fname:
                bad.add(fname)
                first_line.setdefault(fname, ln)  # so callers never re-add it as an event-free clip
            continue
        out.setdefault(fname, []).append((Event(label, onset, offset), ln))
    for fname in bad:
        out.pop(fname, None)
    return out, first_line


def read_strong_tsv(
    path: PathLike, on_error: OnError = "raise", report: ReadReport | None = None
) -> dict[str, list[Event]]:
    """DCASE strong labels `filename<TAB>onset<TAB>offset<TAB>event_label` -> {filename: events}.

    The header is optional (without it the columns are positional). Rows with empty onset,
    offset and label (or only a filename) list a file without events: it maps to [].
    """
    path = Path(path)
    sink = _Sink(on_error, report, path)
    rows, _ = _strong_rows(path, sink)
    sink.ok(len(rows))
    sink.done()
    return {f: [e for e, _ in evs] for f, evs in rows.items()}


def _check_tsv_field(path: Path, value: str, what: str) -> None:
    if any(c in value for c in "\t\r\n"):
        raise DataFormatError(path, f"cannot write {what} {value!r}: contains a tab or line break")


def write_strong_tsv(path: PathLike, events_by_file: Mapping[str, Sequence[Event]]) -> Path:
    """Write DCASE strong labels with a header; files with no events get an empty row."""
    path = Path(path)
    lines = ["filename\tonset\toffset\tevent_label"]
    for fname, events in events_by_file.items():
        _check_tsv_field(path, fname, "filename")
        if not events:
            lines.append(f"{fname}\t\t\t")
        for ev in events:
            _check_tsv_field(path, ev.label, "event label")
            problem = _event_problem(ev.label, float(ev.onset), float(ev.offset), None)
            if problem:
                raise DataFormatError(path, f"cannot write {fname}: {problem}")
            lines.append(f"{fname}\t{_fmt(ev.onset)}\t{_fmt(ev.offset)}\t{ev.label}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _durations_rows(path: Path, sink: _Sink) -> dict[str, tuple[float, int]]:
    _require_file(path)
    out: dict[str, tuple[float, int]] = {}
    first = True
    for ln, row, undecodable in _tsv_rows(path):
        if first:
            first = False
            if len(row) == 2 and (row[0].strip().lower() in _FILENAME_NAMES or row[1].strip().lower() == "duration"):
                continue
        try:
            if undecodable:
                raise _Bad(undecodable)
            if len(row) != 2:
                raise _Bad(f"expected 2 tab-separated columns (filename, duration), got {len(row)}")
            fname = row[0].strip()
            if not fname:
                raise _Bad("empty filename")
            if fname in out:
                raise _Bad(f"duplicate filename '{fname}' (first on line {out[fname][1]})")
            d = _duration(row[1])
        except _Bad as e:
            sink.error(path, str(e), ln)
            continue
        out[fname] = (d, ln)  # type: ignore[assignment]
    return out


def read_durations_tsv(
    path: PathLike, on_error: OnError = "raise", report: ReadReport | None = None
) -> dict[str, float]:
    """DCASE durations `filename<TAB>duration` (header optional) -> {filename: seconds}."""
    path = Path(path)
    sink = _Sink(on_error, report, path)
    rows = _durations_rows(path, sink)
    sink.ok(len(rows))
    sink.done()
    return {f: d for f, (d, _) in rows.items()}


def write_durations_tsv(path: PathLike, durations: Mapping[str, float]) -> Path:
    path = Path(path)
    lines = ["filename\tduration"]
    for fname, d in durations.items():
        _check_tsv_field(path, fname, "filename")
        if not (math.isfinite(float(d)) and float(d) > 0):
            raise DataFormatError(path, f"cannot write duration {d!r} for {fname}: must be > 0")
        lines.append(f"{fname}\t{_fmt(d)}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _weak_rows(path: Path, sink: _Sink) -> dict[str, tuple[list[str], int]]:
    _require_file(path)
    out: dict[str, tuple[list[str], int]] = {}
    first = True
    for ln, row, undecodable in _tsv_rows(path):
        if first:
            first = False
            lower = [c.strip().lower() for c in row]
            if lower[0] in _FILENAME_NAMES or (len(lower) > 1 and lower[1] in ("event_labels", "event_label", "labels")):
                continue
        try:
            if undecodable:
                raise _Bad(undecodable)
            if len(row) not in (1, 2):
                raise _Bad(f"expected 2 tab-separated columns (filename, event_labels), got {len(row)}")
            fname = row[0].strip()
            if not fname:
                raise _Bad("empty filename")
            if fname in out:
                raise _Bad(f"duplicate filename '{fname}' (first on line {out[fname][1]})")
            labels = [s.strip() for s in row[1].split(",")] if len(row) == 2 else []
        except _Bad as e:
            sink.error(path, str(e), ln)
            continue
        out[fname] = ([s for s in labels if s], ln)
    return out


def read_weak_tsv(
    path: PathLike, on_error: OnError = "raise", report: ReadReport | None = None
) -> dict[str, list[str]]:
    """DCASE weak labels `filename<TAB>event_labels` (comma-separated; header optional)."""
    path = Path(path)
    sink = _Sink(on_error, report, path)
    rows = _weak_rows(path, sink)
    sink.ok(len(rows))
    sink.done()
    return {f: labels for f, (labels, _) in rows.items()}


def write_weak_tsv(path: PathLike, labels_by_file: Mapping[str, Sequence[str]]) -> Path:
    path = Path(path)
    lines = ["filename\tevent_labels"]
    for fname, labels in labels_by_file.items():
        _check_tsv_field(path, fname, "filename")
        for lab in labels:
            _check_tsv_field(path, lab, "label")
            if "," in lab or not lab.strip():
                raise DataFormatError(path, f"cannot write label {lab!r} for {fname}: empty or contains a comma")
        lines.append(f"{fname}\t{','.join(labels)}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def clips_from_dcase(
    strong_tsv: PathLike,
    audio_dir: PathLike | None = None,
    durations_tsv: PathLike | None = None,
    check_audio: bool = True,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[Clip]:
    """Clips from DCASE strong labels (+ optional durations).

    Filenames are resolved against `audio_dir` (default: the TSV's folder). With durations,
    every file listed there becomes a clip (files absent from the strong TSV have no events, as
    in DCASE evaluation sets), and events past a clip's end are errors of their TSV line.
    """
    strong_tsv = Path(strong_tsv)
    sink = _Sink(on_error, report, strong_tsv)
    rows, first_line = _strong_rows(strong_tsv, sink)
    durs = _durations_rows(Path(durations_tsv), sink) if durations_tsv is not None else None
    base = Path(audio_dir) if audio_dir is not None else strong_tsv.parent
    clips = []
    for fname, evs in rows.items():
        try:
            duration = None
            if durs is not None:
                if fname not in durs:
                    raise _Bad(f"'{fname}' has no duration in {durations_tsv}")
                duration = durs[fname][0]
            for ev, ln in evs:
                problem = _event_problem(ev.label, ev.onset, ev.offset, duration)
                if problem:
                    sink.error(strong_tsv, f"{fname}: {problem}", ln)
                    raise _Skip
            audio = _resolve(fname, base)
            if check_audio:
                _check_audio_exists(audio)
        except _Bad as e:
            sink.error(strong_tsv, str(e), first_line.get(fname))
            continue
        except _Skip:
            continue
        clips.append(Clip(audio=audio, events=[e for e, _ in evs], duration=duration))
    if durs is not None:
        for fname, (d, ln) in durs.items():
            if fname in rows or fname in first_line:  # listed (possibly dropped as bad) in strong
                continue
            audio = _resolve(fname, base)
            if check_audio and not _is_url(audio) and not os.path.isfile(audio):
                sink.error(durations_tsv, f"audio file not found: {audio}", ln)
                continue
            clips.append(Clip(audio=audio, duration=d))
    sink.ok(len(clips))
    sink.done()
    return clips


class _Skip(Exception):
    """Internal: the error was already reported; drop the entry."""


def clips_from_weak(
    weak_tsv: PathLike,
    audio_dir: PathLike | None = None,
    check_audio: bool = True,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[Clip]:
    """Clips with clip-level `labels` from a DCASE weak-label TSV."""
    weak_tsv = Path(weak_tsv)
    sink = _Sink(on_error, report, weak_tsv)
    base = Path(audio_dir) if audio_dir is not None else weak_tsv.parent
    clips = []
    for fname, (labels, ln) in _weak_rows(weak_tsv, sink).items():
        audio = _resolve(fname, base)
        if check_audio and not _is_url(audio) and not os.path.isfile(audio):
            sink.error(weak_tsv, f"audio file not found: {audio}", ln)
            continue
        clips.append(Clip(audio=audio, labels=labels))
    sink.ok(len(clips))
    sink.done()
    return clips


# ----------------------------------------------------------------------------- JSON with line numbers

_WS = re.compile(r"[ \t\n\r]*")


class _JsonDoc:
    """Scan a JSON document's top-level containers keeping each element's starting line, so that
    errors in one entry of a big JSON file point at its line, as they do for JSONL."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.dec = json.JSONDecoder()
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def skip(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def value(self, i: int) -> tuple[Any, int]:
        return self.dec.raw_decode(self.text, i)

    def array(self, i: int) -> list[tuple[Any, int]]:
        """Elements (value, start offset) of the array starting at offset i."""
        t = self.text
        items: list[tuple[Any, int]] = []
        i = self.skip(i + 1)
        if t[i : i + 1] == "]":
            return items
        while True:
            start = i
            val, i = self.value(i)
            items.append((val, start))
            i = self.skip(i)
            c = t[i : i + 1]
            if c == ",":
                i = self.skip(i + 1)
            elif c == "]":
                return items
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", t, i)

    def object(self, i: int) -> list[tuple[str, Any, int]]:
        """Members (key, value, value start offset) of the object starting at offset i."""
        t = self.text
        items: list[tuple[str, Any, int]] = []
        i = self.skip(i + 1)
        if t[i : i + 1] == "}":
            return items
        while True:
            if t[i : i + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", t, i)
            key, i = json.decoder.scanstring(t, i + 1)  # type: ignore[attr-defined]
            i = self.skip(i)
            if t[i : i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", t, i)
            i = self.skip(i + 1)
            start = i
            val, i = self.value(i)
            items.append((key, val, start))
            i = self.skip(i)
            c = t[i : i + 1]
            if c == ",":
                i = self.skip(i + 1)
            elif c == "}":
                return items
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", t, i)


def _json_entries(path: Path) -> list[tuple[Any, int, str | None]]:
    """Entries of a JSON file as (entry, line, key-from-a-keyed-dict). Accepts a top-level list,
    {"data": [...]}, or a dict keyed by id whose values are entries or lists of entries."""
    text = read_text_file(path)
    doc = _JsonDoc(text)
    try:
        json.loads(text)  # whole-document syntax check first: its error has the exact line/column
        i = doc.skip(0)
        c = text[i : i + 1]
        if c == "[":
            return [(v, doc.line(s), None) for v, s in doc.array(i)]
        if c == "{":
            members = doc.object(i)
            if len(members) == 1 and members[0][0] == "data" and isinstance(members[0][1], list):
                return [(v, doc.line(s), None) for v, s in doc.array(members[0][2])]
            out: list[tuple[Any, int, str | None]] = []
            for key, val, s in members:
                if isinstance(val, list):
                    out.extend((v, doc.line(vs), key) for v, vs in doc.array(s))
                else:
                    out.append((val, doc.line(s), key))
            return out
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON ({e.msg} at column {e.colno})", e.lineno) from None
    raise DataFormatError(path, "expected a JSON list of entries, {\"data\": [...]} or a dict keyed by audio id", 1)


# ----------------------------------------------------------------------------- AudioGrounding JSON


@dataclass
class GroundingPhrase:
    """One query phrase of a caption and where it sounds.

    segments: [(onset, offset), ...] in seconds; empty if the phrase is not heard.
    meta: other fields of the phrase (AudioGrounding's start_index / end_index token span).
    """

    phrase: str
    segments: list[tuple[float, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroundingItem:
    """One caption of one clip with its grounded phrases (an AudioGrounding entry).

    audio: audio path (joined with `audio_dir` when read with one, else the file's `audio_id`).
    meta: other entry fields (e.g. `audiocap_id`), written back unchanged.
    """

    audio: str
    caption: str
    phrases: list[GroundingPhrase] = field(default_factory=list)
    duration: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _text_field(value: Any, what: str) -> str:
    if isinstance(value, list) and all(isinstance(t, str) for t in value):  # token list
        value = " ".join(value)
    if not isinstance(value, str):
        raise _Bad(f"'{what}' must be a string or a list of tokens")
    return value


def _grounding_item(entry: Any, key: str | None, audio_dir: Path | None) -> GroundingItem:
    if not isinstance(entry, dict):
        raise _Bad(f"expected an object per entry, got {type(entry).__name__}")
    audio_key = next((k for k in ("audio_id", "audio") if k in entry), None)
    audio_id = entry[audio_key] if audio_key else key
    if not isinstance(audio_id, str) or not audio_id.strip():
        raise _Bad("missing required field 'audio_id'")
    if "phrases" not in entry:
        raise _Bad(f"entry '{audio_id}' is missing required field 'phrases'")
    cap_key = next((k for k in ("tokens", "caption") if k in entry), None)
    caption = _text_field(entry[cap_key], cap_key) if cap_key else ""
    duration = _duration(entry.get("duration"))
    raw = entry["phrases"]
    if not isinstance(raw, list):
        raise _Bad(f"entry '{audio_id}': 'phrases' must be a list")
    phrases = []
    for j, p in enumerate(raw):
        if not isinstance(p, dict) or "phrase" not in p:
            raise _Bad(f"entry '{audio_id}': phrases[{j}] must be an object with 'phrase' and 'segments'")
        text = _text_field(p["phrase"], f"phrases[{j}].phrase")
        if not text.strip():
            raise _Bad(f"entry '{audio_id}': phrases[{j}] is empty")
        segs_raw = p.get("segments", [])
        if not isinstance(segs_raw, list):
            raise _Bad(f"entry '{audio_id}': phrase '{text}': 'segments' must be a list of [onset, offset]")
        segs = []
        for s in segs_raw:
            if not isinstance(s, (list, tuple)) or len(s) != 2:
                raise _Bad(f"entry '{audio_id}': phrase '{text}': segment {json.dumps(s)} is not [onset, offset]")
            on, off = _num(s[0], "onset"), _num(s[1], "offset")
            problem = _event_problem(text, on, off, duration)
            if problem:
                raise _Bad(f"entry '{audio_id}': {problem}")
            segs.append((on, off))
        phrases.append(GroundingPhrase(text, segs, {k: v for k, v in p.items() if k not in ("phrase", "segments")}))
    audio = _resolve(audio_id, audio_dir) if audio_dir is not None else audio_id
    skip = {audio_key, cap_key, "phrases", "duration"}
    meta = {k: v for k, v in entry.items() if k not in skip}
    return GroundingItem(audio=audio, caption=caption, phrases=phrases, duration=duration, meta=meta)


def read_grounding_json(
    path: PathLike,
    audio_dir: PathLike | None = None,
    check_audio: bool = False,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[GroundingItem]:
    """Read AudioGrounding labels: a list of {"audio_id", "tokens", "phrases": [{"phrase",
    "segments": [[onset, offset], ...], ...}], ...} (also {"data": [...]} or a dict keyed by
    audio id). Errors name the line where the bad entry starts.

    With `audio_dir`, `GroundingItem.audio` is the resolved path; without it, the raw `audio_id`
    (`check_audio` then has nothing to check and is ignored).
    """
    path = Path(path)
    sink = _Sink(on_error, report, path)
    base = Path(audio_dir) if audio_dir is not None else None
    items = []
    for entry, ln, key in _json_entries(path):
        try:
            item = _grounding_item(entry, key, base)
            if check_audio and base is not None:
                _check_audio_exists(item.audio)
        except _Bad as e:
            sink.error(path, str(e), ln)
            continue
        items.append(item)
    sink.ok(len(items))
    sink.done()
    return items


def write_grounding_json(path: PathLike, items: Iterable[GroundingItem], audio_dir: PathLike | None = None) -> Path:
    """Write AudioGrounding JSON (a list of entries). `audio_id` is the item's audio path relative
    to `audio_dir` when given (the inverse of reading with that `audio_dir`), else `item.audio`."""
    path = Path(path)
    base = Path(os.path.abspath(audio_dir)) if audio_dir is not None else None
    entries = []
    for i, it in enumerate(items, start=1):
        audio_id = _rel_audio(it.audio, base, absolute=False) if base is not None else it.audio
        entry: dict[str, Any] = {"audio_id": audio_id, "tokens": it.caption}
        if it.duration is not None:
            entry["duration"] = float(it.duration)
        phrases = []
        for p in it.phrases:
            for on, off in p.segments:
                problem = _event_problem(p.phrase, float(on), float(off), it.duration)
                if problem:
                    raise DataFormatError(path, f"cannot write item {i} ({audio_id}): {problem}")
            d: dict[str, Any] = {"phrase": p.phrase, **p.meta}
            d["segments"] = [[round(float(on), 6), round(float(off), 6)] for on, off in p.segments]
            phrases.append(d)
        entry["phrases"] = phrases
        for k, v in it.meta.items():
            entry.setdefault(k, v)
        entries.append(entry)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def grounding_to_clips(items: Iterable[GroundingItem]) -> list[Clip]:
    """One clip per grounding item: captions=[caption], one event per segment with label = phrase.
    meta["phrases"] lists every phrase, including ones with no segments (negative queries)."""
    clips = []
    for it in items:
        events = [Event(p.phrase, float(on), float(off)) for p in it.phrases for on, off in p.segments]
        meta = dict(it.meta)
        meta["phrases"] = [p.phrase for p in it.phrases]
        clips.append(
            Clip(audio=it.audio, captions=[it.caption] if it.caption.strip() else [], events=events,
                 duration=it.duration, meta=meta)
        )
    return clips


# ----------------------------------------------------------------------------- classification


def _default_esc50_audio_dir(csv_path: Path) -> Path:
    # Official ESC-50 layout: meta/esc50.csv next to audio/
    cand = csv_path.parent.parent / "audio"
    return cand if cand.is_dir() else csv_path.parent


def read_esc50_csv(
    path: PathLike,
    audio_dir: PathLike | None = None,
    folds: int | Iterable[int] | None = None,
    check_audio: bool = True,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[Clip]:
    """ESC-50-style CSV `filename,fold,target,category[,...]` -> clips with labels=[category].

    meta holds fold (int), target (int) and every extra column as its string (e.g. esc10,
    src_file, take). `audio_dir` defaults to ../audio next to the CSV's folder (ESC-50 layout),
    else the CSV's folder. `folds` keeps only those folds.
    """
    path = Path(path)
    _require_file(path)
    sink = _Sink(on_error, report, path)
    base = Path(audio_dir) if audio_dir is not None else _default_esc50_audio_dir(path)
    keep = None if folds is None else ({int(folds)} if isinstance(folds, int) else {int(f) for f in folds})
    clips = []
    with open(path, **_TEXT_KW, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, "empty file", 1)
        bad = _csv_utf8_problem(header, None)
        if bad:
            raise DataFormatError(path, bad, reader.line_num)
        header = [h.strip() for h in header]
        missing = [c for c in ("filename", "fold", "target", "category") if c not in header]
        if missing:
            raise DataFormatError(path, f"header lacks required column(s) {', '.join(missing)}; got {header}", 1)
        col = {h: i for i, h in enumerate(header)}
        for row in reader:
            ln = reader.line_num
            if not any(c.strip() for c in row):
                continue
            try:
                bad = _csv_utf8_problem(row, header)
                if bad:
                    raise _Bad(bad)
                if len(row) != len(header):
                    raise _Bad(f"expected {len(header)} comma-separated columns, got {len(row)}")
                fname, category = row[col["filename"]].strip(), row[col["category"]].strip()
                if not fname:
                    raise _Bad("empty filename")
                if not category:
                    raise _Bad("empty category")
                fold, target = _int(row[col["fold"]], "fold"), _int(row[col["target"]], "target")
                if keep is not None and fold not in keep:
                    continue
                audio = _resolve(fname, base)
                if check_audio:
                    _check_audio_exists(audio)
            except _Bad as e:
                sink.error(path, str(e), ln)
                continue
            meta: dict[str, Any] = {"fold": fold, "target": target}
            meta.update({h: row[i] for h, i in col.items() if h not in ("filename", "fold", "target", "category")})
            clips.append(Clip(audio=audio, labels=[category], meta=meta))
    sink.ok(len(clips))
    sink.done()
    return clips


def _csv_utf8_problem(row: Sequence[str], header: Sequence[str] | None) -> str | None:
    """Where a CSV row (decoded with surrogateescape) is not valid UTF-8, by field (a quoted field
    may span lines, so a column number would mislead)."""
    for i, cell in enumerate(row):
        m = _BAD_BYTE.search(cell)
        if m is not None:
            name = f"'{header[i]}'" if header is not None and i < len(header) else str(i + 1)
            return f"not valid UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} in field {name}); save the file as UTF-8"
    return None


def _int(s: str, what: str) -> int:
    try:
        return int(s.strip())
    except ValueError:
        raise _Bad(f"non-integer {what} {s!r}") from None


def write_esc50_csv(path: PathLike, clips: Sequence[Clip], audio_dir: PathLike | None = None) -> Path:
    """Write an ESC-50-style CSV. Each clip needs exactly one label and meta["fold"]; a missing
    meta["target"] becomes the label's index in the sorted label set. `filename` is relative to
    `audio_dir` when given (and the audio lies inside it), else the file's basename.
    Extra meta keys become extra columns (first-seen order)."""
    path = Path(path)
    base = Path(os.path.abspath(audio_dir)) if audio_dir is not None else None
    cats = sorted({c.labels[0] for c in clips if len(c.labels) == 1})
    extra: list[str] = []
    for c in clips:
        for k in c.meta:
            if k not in ("fold", "target") and k not in extra:
                extra.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["filename", "fold", "target", "category", *extra])
    for i, c in enumerate(clips, start=1):
        if len(c.labels) != 1:
            raise DataFormatError(path, f"cannot write clip {i} ({c.key}): needs exactly one label, has {c.labels}")
        if "fold" not in c.meta:
            raise DataFormatError(path, f"cannot write clip {i} ({c.key}): meta has no 'fold'")
        fname = _rel_audio(c.audio, base, absolute=False) if base is not None else os.path.basename(c.audio)
        if base is not None and os.path.isabs(fname):
            fname = os.path.basename(c.audio)
        target = c.meta.get("target", cats.index(c.labels[0]))
        w.writerow([fname, int(c.meta["fold"]), int(target), c.labels[0], *[c.meta.get(k, "") for k in extra]])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def read_class_folders(root: PathLike) -> list[Clip]:
    """Folder-per-class dataset: `root/<class>/**/<file>` -> clips with labels=[class name with
    '_' as ' '] and meta["target"] = class index (sorted folder order). Hidden entries are ignored;
    audio files are those with an extension in finelap.audio.AUDIO_EXTENSIONS."""
    from ..audio import AUDIO_EXTENSIONS  # lazy: finelap.audio imports torch

    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(root, "not a directory")
    clips = []
    target = 0
    for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in cls.rglob("*")
            if p.is_file()
            and p.suffix.lower() in AUDIO_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(cls).parts)
        )
        if not files:
            continue
        label = cls.name.replace("_", " ")
        clips.extend(Clip(audio=str(p), labels=[label], meta={"target": target}) for p in files)
        target += 1
    if not clips:
        raise DataFormatError(root, f"no class folders with audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    return clips


# ----------------------------------------------------------------------------- WebDataset shards

_AUDIO_KEYS = ("flac", "wav", "ogg", "mp3", "opus")
_TAR_FORMAT = tarfile.PAX_FORMAT


def _flac_bytes(audio: bytes | None, path: str) -> bytes:
    """FLAC bytes for a sample: FLAC input is copied untouched; anything else libsndfile reads is
    re-encoded losslessly for PCM (16-bit for <=16-bit/lossy sources, 24-bit otherwise)."""
    import soundfile as sf

    if audio is None:
        if not os.path.isfile(path):
            raise AudioError(path, "file not found")
        with open(path, "rb") as f:
            audio = f.read()
    if audio[:4] == b"fLaC":
        return audio
    try:
        with sf.SoundFile(io.BytesIO(audio)) as f:
            sr, subtype = f.samplerate, f.subtype
            if subtype in ("PCM_16", "PCM_S8", "PCM_U8", "ULAW", "ALAW", "VORBIS", "OPUS", "MPEG_LAYER_III"):
                out_subtype, data = "PCM_16", f.read(dtype="int16", always_2d=True)
            else:
                out_subtype = "PCM_24"
                # float sources may exceed full scale; clip so the integer conversion cannot wrap
                data = np.clip(f.read(dtype="float64", always_2d=True), -1.0, 1.0 - 2.0**-23)
    except Exception as e:
        raise AudioError(path, f"cannot decode audio to re-encode as FLAC ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise AudioError(path, "zero-length audio (no samples)")
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="FLAC", subtype=out_subtype)
    return buf.getvalue()


def _bytes_duration(b: bytes, source: str) -> float:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(b)) as f:
            return f.frames / float(f.samplerate)
    except Exception as e:
        raise AudioError(source, f"corrupt or unreadable audio ({type(e).__name__}: {e})") from None


def _sample_key(key: str, used: set[str]) -> str:
    # WebDataset splits "<key>.<ext>" at the first dot of the basename, so keys may hold no dots
    # (nor slashes, which would make a sub-folder).
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", key) or "sample"
    k, n = base, 1
    while k in used:
        k, n = f"{base}_{n}", n + 1
    used.add(k)
    return k


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same input always gives byte-identical shards (cacheable, diffable).
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    tar.addfile(ti, io.BytesIO(data))


class _ShardWriter:
    """Write one shard to a temp file and rename it into place when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        from ..utils import public_mode

        public_mode(self.tmp)
        self.tar = tarfile.open(self.tmp, "w", format=_TAR_FORMAT)
        self.n = 0

    def add(self, key: str, files: Mapping[str, bytes]) -> None:
        for ext in sorted(files):
            _add_member(self.tar, f"{key}.{ext}", files[ext])
        self.n += 1

    def close(self) -> Path:
        self.tar.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def write_webdataset(
    out_dir: PathLike,
    clips_with_audio: Iterable[Clip | tuple[Clip, bytes]],
    shard_size: int = 1000,
    pattern: str = "shard-%06d.tar",
) -> list[Path]:
    """Write WebDataset tar shards: per sample `<key>.flac` and `<key>.json`.

    clips_with_audio: clips (audio read from `clip.audio`) or (clip, audio bytes) pairs. FLAC is
        stored as-is; other formats are decoded and re-encoded as FLAC.
    The json holds the manifest fields minus `audio`; `id` is always written (clip.key) and a
    missing duration is filled in from the audio. Keys are clip keys made WebDataset-safe
    ([A-Za-z0-9_-], deduplicated). Members have fixed mtime/uid/gid/mode and a sorted order, so
    equal input gives byte-identical shards. Returns the shard paths in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    used: set[str] = set()
    writer: _ShardWriter | None = None
    try:
        for i, item in enumerate(clips_with_audio):
            clip, data = item if isinstance(item, tuple) else (item, None)
            source = clip.audio if data is None else f"{clip.audio} (bytes)"
            flac = _flac_bytes(data, clip.audio if data is None else source)
            if clip.duration is None:
                clip = replace(clip, duration=_bytes_duration(flac, source))
            if clip.id is None:
                clip = replace(clip, id=clip.key)
            problem = _clip_problem(clip, check_audio=False)
            try:
                if problem:
                    raise _Bad(problem)
                js = json.dumps(_clip_to_obj(clip, None), ensure_ascii=False, allow_nan=False)
            except (_Bad, TypeError, ValueError) as e:
                raise DataFormatError(source, f"cannot write clip {i + 1} ('{clip.key}') to a shard: {e}") from None
            if writer is None:
                writer = _ShardWriter(out / (pattern % len(shards)))
            writer.add(_sample_key(clip.key, used), {"flac": flac, "json": js.encode("utf-8")})
            if writer.n >= shard_size:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return shards


def _expand_braces(url: str) -> list[str]:
    """WebDataset-style `shard-{000000..000009}.tar` (zero padding kept) and `{a,b}` lists."""
    m = re.search(r"\{([^{}]*)\}", url)
    if not m:
        return [url]
    head, tail, body = url[: m.start()], url[m.end() :], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo)
        parts = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [u for p in parts for u in _expand_braces(head + p + tail)]


def _shard_paths(urls_or_dir: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [urls_or_dir] if isinstance(urls_or_dir, (str, os.PathLike)) else list(urls_or_dir)
    out: list[Path] = []
    for u in items:
        s = os.fspath(u)
        if os.path.isdir(s):
            tars = sorted(Path(s).glob("*.tar"))
            if not tars:
                raise DataFormatError(s, "no .tar shards in this directory")
            out.extend(tars)
            continue
        for e in _expand_braces(s):
            if _is_url(e):
                raise DataFormatError(e, "only local shard files are supported here; use webdataset for remote URLs")
            if not os.path.isfile(e):
                raise DataFormatError(e, "shard not found")
            out.append(Path(e))
    return out


def _split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) as WebDataset splits it: at the first dot of the basename."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else None


def iter_webdataset(
    urls_or_dir: PathLike | Sequence[PathLike],
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> Iterator[tuple[Clip, bytes]]:
    """Stream (clip, audio bytes) from local WebDataset shards (a directory of .tar files, one
    shard, a brace pattern or a list). Clip.audio is "<shard>#<key>"; decode the bytes with
    `decode_audio_bytes`. Each sample needs a .json and an audio member (flac preferred)."""
    shards = _shard_paths(urls_or_dir)
    sink = _Sink(on_error, report, shards[0].parent if len(shards) > 1 else shards[0])

    def make(shard: Path, key: str, files: dict[str, bytes]) -> tuple[Clip, bytes] | None:
        try:
            if "json" not in files:
                raise _Bad(f"sample '{key}' has no .json member")
            ext = next((e for e in _AUDIO_KEYS if e in files), None)
            if ext is None:
                raise _Bad(f"sample '{key}' has no audio member ({', '.join('.' + e for e in _AUDIO_KEYS)})")
            try:
                obj = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Bad(f"sample '{key}': invalid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise _Bad(f"sample '{key}': .json must hold an object")
            if "audio" in obj:  # foreign shards may record the source path; keep it, not as the path
                obj = {("source_audio" if k == "audio" else k): v for k, v in obj.items()}
            clip = _clip_fields(obj, f"{shard}#{key}")
        except _Bad as e:
            sink.error(shard, str(e))
            return None
        sink.ok()
        return clip, files[ext]

    for shard in shards:
        try:
            with tarfile.open(shard, "r|*") as tar:  # stream mode: no seeking, works on pipes too
                key: str | None = None
                files: dict[str, bytes] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    split = _split_member(member.name)
                    if split is None or os.path.basename(split[0]).startswith(("__", ".")):
                        continue
                    k, ext = split
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if k != key:
                        if key is not None:
                            got = make(shard, key, files)
                            if got is not None:
                                yield got
                        key, files = k, {}
                    files[ext.lower()] = data
                if key is not None:
                    got = make(shard, key, files)
                    if got is not None:
                        yield got
        except tarfile.TarError as e:
            raise DataFormatError(shard, f"not a readable tar shard ({e})") from None
    sink.done()


def decode_audio_bytes(
    b: bytes, sample_rate: int | None = 16000, mono: bool = True, source: str = "<bytes>"
) -> np.ndarray:
    """Decode audio bytes (any libsndfile format) to float32: (N,) if mono else (C, N),
    resampled to `sample_rate` (None keeps the stored rate). AudioError names `source`."""
    import soundfile as sf

    try:
        data, sr = sf.read(io.BytesIO(b), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(source, f"corrupt or unreadable audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise AudioError(source, "zero-length audio (no samples)")
    if not np.isfinite(data).all():
        raise AudioError(source, "contains NaN or Inf samples")
    x = data.T
    if mono:
        x = x.mean(axis=0)
    if sample_rate is not None and sr != sample_rate:
        from ..audio import resample  # lazy: finelap.audio imports torch

        x = resample(x, sr, sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- dispatcher


def _sniff_tsv(path: Path) -> str:
    """'strong', 'weak' or 'durations' from the header or, without one, the column layout."""
    rows = []
    for _, row, _undecodable in _tsv_rows(path):  # the reader reports undecodable lines
        rows.append(row)
        if len(rows) >= 50:
            break
    if not rows:
        raise DataFormatError(path, "empty TSV file")
    lower = [c.strip().lower() for c in rows[0]]
    if "onset" in lower or "event_label" in lower:
        return "strong"
    if len(lower) > 1 and lower[1] in ("event_labels", "labels"):
        return "weak"
    if len(lower) > 1 and lower[1] == "duration":
        return "durations"
    width = max(len(r) for r in rows)
    if width >= 3:
        return "strong"
    if width == 2:
        body = rows[1:] if lower[0] in _FILENAME_NAMES else rows
        try:
            for r in body:
                if len(r) == 2:
                    float(r[1])
            return "durations"
        except ValueError:
            return "weak"
    return "strong"  # filenames only: clips without events


def _clips_from_json(path: Path, check_audio: bool, sink: _Sink) -> list[Clip]:
    """A .json array of manifest objects (like JSONL, but one document)."""
    clips = []
    for entry, ln, _ in _json_entries(path):
        try:
            if not isinstance(entry, dict):
                raise _Bad(f"expected an object per entry, got {type(entry).__name__}")
            clip = _clip_from_manifest_obj(entry, path.parent, check_audio)
        except _Bad as e:
            sink.error(path, str(e), ln)
            continue
        clips.append(clip)
    sink.ok(len(clips))
    return clips


def load_clips(
    path: PathLike,
    audio_dir: PathLike | None = None,
    durations: PathLike | None = None,
    folds: int | Iterable[int] | None = None,
    check_audio: bool = True,
    on_error: OnError = "raise",
    report: ReadReport | None = None,
) -> list[Clip]:
    """Read clips from any supported format, chosen by extension and contents:

    - `.jsonl` manifest; `.json` AudioGrounding (entries with "phrases") or a JSON array of
      manifest objects (entries with "audio");
    - `.tsv` DCASE strong labels (`durations` = its durations TSV) or weak labels;
    - `.csv` ESC-50 style (`folds` selects folds);
    - `.tar`, a brace pattern, or a directory of `.tar` shards: WebDataset (Clip.audio = "shard#key");
    - any other directory: one folder per class.
    `audio_dir` resolves TSV/CSV/grounding filenames (default: next to the label file).
    """
    s = os.fspath(path)
    p = Path(s)
    suffix = p.suffix.lower()
    if durations is not None and suffix != ".tsv":
        raise ConfigError(f"durations= only applies to a DCASE strong-label .tsv, not {s}")
    if folds is not None and suffix != ".csv":
        raise ConfigError(f"folds= only applies to an ESC-50 style .csv, not {s}")
    if "{" in s and suffix == ".tar":
        return [c for c, _ in iter_webdataset(s, on_error=on_error, report=report)]
    if not p.exists():
        raise DataFormatError(p, "not found")
    if p.is_dir():
        if any(p.glob("*.tar")):
            return [c for c, _ in iter_webdataset(p, on_error=on_error, report=report)]
        return read_class_folders(p)
    if suffix == ".jsonl":
        return read_manifest(p, check_audio=check_audio, on_error=on_error, report=report)
    if suffix == ".tar":
        return [c for c, _ in iter_webdataset(p, on_error=on_error, report=report)]
    if suffix == ".tsv":
        kind = _sniff_tsv(p)
        if kind == "strong":
            return clips_from_dcase(p, audio_dir, durations, check_audio=check_audio, on_error=on_error, report=report)
        if durations is not None:
            raise ConfigError(f"durations= only applies to strong labels; {s} looks like {kind} labels")
        if kind == "weak":
            return clips_from_weak(p, audio_dir, check_audio=check_audio, on_error=on_error, report=report)
        raise DataFormatError(
            p, "this is a durations TSV (filename, duration) with no labels; pass it as durations= with a strong-label TSV"
        )
    if suffix == ".csv":
        return read_esc50_csv(p, audio_dir, folds, check_audio=check_audio, on_error=on_error, report=report)
    if suffix == ".json":
        entries = _json_entries(p)
        first = next((e for e, _, _ in entries if isinstance(e, dict)), {})
        if "audio" in first and "phrases" not in first:
            sink = _Sink(on_error, report, p)
            clips = _clips_from_json(p, check_audio, sink)
            sink.done()
            return clips
        items = read_grounding_json(
            p, audio_dir if audio_dir is not None else p.parent, check_audio=check_audio, on_error=on_error, report=report
        )
        return grounding_to_clips(items)
    raise DataFormatError(
        p, f"unknown data format '{suffix or '(no extension)'}'; expected .jsonl, .json, .tsv, .csv, .tar or a directory"
    )
