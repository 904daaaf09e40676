from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.errors import AudioError, ConfigError, DataFormatError
from finelap.data.manifests import (
    GroundingItem,
    GroundingPhrase,
    ReadReport,
    clips_from_dcase,
    clips_from_weak,
    decode_audio_bytes,
    grounding_to_clips,
    iter_manifest,
    iter_webdataset,
    load_clips,
    read_class_folders,
    read_durations_tsv,
    read_esc50_csv,
    read_grounding_json,
    read_manifest,
    read_strong_tsv,
    read_weak_tsv,
    validate_clips,
    write_durations_tsv,
    write_esc50_csv,
    write_grounding_json,
    write_manifest,
    write_strong_tsv,
    write_webdataset,
    write_weak_tsv,
)
from finelap.data.types import Clip, Event

SR = 8000


def _wav(path: Path, seconds: float = 0.5, seed: int = 0, sr: int = SR, fmt: str = "WAV", subtype: str = "PCM_16") -> np.ndarray:
    """Write a small noise file; returns the int16 samples written, shape (N,)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * sr)) * 32767).astype(np.int16)
    sf.write(str(path), x, sr, format=fmt, subtype=subtype)
    return x


def _lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    d = tmp_path / "audio"
    for i, name in enumerate(["a.wav", "b.wav", "c.wav"]):
        _wav(d / name, seed=i)
    return d


# ----------------------------------------------------------------------------- JSONL


def test_manifest_round_trip_relative_paths_and_meta(tmp_path, audio_dir):
    clips = [
        Clip(
            audio=str(audio_dir / "a.wav"),
            captions=["a dog barks while cars pass"],
            events=[Event("dog barking", 1.2, 2.0), Event("car", 0.0, 10.0)],
            labels=["Dog"],
            duration=10.0,
            id="clip-a",
            meta={"source": "freesound", "nested": {"k": [1, 2]}},
        ),
        Clip(audio=str(audio_dir / "b.wav")),  # no supervision at all
        Clip(audio=str(audio_dir / "c.wav"), captions=["rain", "heavy rain"], duration=0.5),
    ]
    path = write_manifest(tmp_path / "train.jsonl", clips)
    raw = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["audio"] for r in raw] == ["audio/a.wav", "audio/b.wav", "audio/c.wav"]
    assert raw[0]["source"] == "freesound" and raw[0]["events"][0] == {"label": "dog barking", "onset": 1.2, "offset": 2.0}
    back = read_manifest(path)
    assert back == clips
    # and again: writing what we read gives the same file
    write_manifest(tmp_path / "again.jsonl", back)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()
    assert list(iter_manifest(path)) == clips


def test_manifest_unknown_keys_survive_round_trip(tmp_path, audio_dir):
    line = {"audio": "audio/a.wav", "captions": ["x"], "license": "CC-BY", "split": {"fold": 3}}
    src = _lines(tmp_path / "m.jsonl", [json.dumps(line)])
    (clip,) = read_manifest(src)
    assert clip.meta == {"license": "CC-BY", "split": {"fold": 3}}
    out = write_manifest(tmp_path / "out.jsonl", [clip])
    assert json.loads(out.read_text()) == line


def test_manifest_relative_path_resolution(tmp_path, audio_dir):
    sub = tmp_path / "manifests" / "v1"
    sub.mkdir(parents=True)
    abs_c = str(audio_dir / "c.wav")
    src = _lines(
        sub / "m.jsonl",
        [
            json.dumps({"audio": "../../audio/a.wav"}),
            "",  # blank lines are ignored
            json.dumps({"audio": abs_c, "caption": "single caption spelling"}),
        ],
    )
    a, c = read_manifest(src)
    assert a.audio == str(audio_dir / "a.wav")  # normalised, absolute
    assert c.audio == abs_c and c.captions == ["single caption spelling"] and c.meta == {}
    # audio outside the manifest folder is written absolute, inside it relative
    out = write_manifest(sub / "out.jsonl", [a, Clip(audio=str(sub / "x.wav"))])
    written = [json.loads(l)["audio"] for l in out.read_text().splitlines()]
    assert written == [str(audio_dir / "a.wav"), "x.wav"]
    # relative_to: a manifest that will live next to audio/
    out2 = write_manifest(sub / "out2.jsonl", [a], relative_to=tmp_path)
    assert json.loads(out2.read_text())["audio"] == "audio/a.wav"
    out3 = write_manifest(tmp_path / "abs.jsonl", [a], absolute=True)
    assert json.loads(out3.read_text())["audio"] == str(audio_dir / "a.wav")


GOOD = {"audio": "audio/a.wav", "captions": ["ok"], "duration": 10.0}


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"audio": "audio/a.wav", "captions": ["x"]', "invalid JSON"),
        (json.dumps({"audio": "audio/a.wav", "events": [{"label": "dog", "onset": 2.0, "offset": 2.0}]}), "onset 2 >= offset 2"),
        (json.dumps({"audio": "audio/a.wav", "events": [{"label": "dog", "onset": 3.0, "offset": 1.0}]}), ">= offset"),
        (json.dumps({"audio": "audio/a.wav", "events": [{"label": "dog", "onset": -0.5, "offset": 1.0}]}), "negative onset"),
        (json.dumps({"audio": "audio/a.wav", "duration": 5.0, "events": [{"label": "dog", "onset": 1, "offset": 5.1}]}), "past the end"),
        (json.dumps({"captions": ["no audio"]}), "missing required field 'audio'"),
        (json.dumps({"audio": "audio/a.wav", "events": [{"label": "dog", "onset": "soon", "offset": 1.0}]}), "non-numeric onset"),
        (json.dumps({"audio": "audio/a.wav", "events": [{"label": "dog", "offset": 1.0}]}), "missing required field 'onset'"),
        (json.dumps({"audio": "audio/missing.wav"}), "audio file not found"),
        (json.dumps(["audio/a.wav"]), "expected a JSON object"),
        (json.dumps({"audio": "audio/a.wav", "duration": -1}), "duration must be > 0"),
    ],
)
def test_manifest_validation_names_file_and_line(tmp_path, audio_dir, bad_line, problem):
    path = _lines(tmp_path / "bad_manifest.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(DataFormatError) as ei:
        read_manifest(path)
    msg = str(ei.value)
    assert "bad_manifest.jsonl:3:" in msg and problem in msg
    assert ei.value.line == 3 and ei.value.path == str(path)


def test_manifest_duration_tolerance_and_check_audio_off(tmp_path, audio_dir):
    ok = {"audio": "audio/a.wav", "duration": 10.0, "events": [{"label": "x", "onset": 9.0, "offset": 10.0005}]}
    too_far = {"audio": "audio/a.wav", "duration": 10.0, "events": [{"label": "x", "onset": 9.0, "offset": 10.002}]}
    assert len(read_manifest(_lines(tmp_path / "ok.jsonl", [json.dumps(ok)]))) == 1
    with pytest.raises(DataFormatError, match="far.jsonl:1:"):
        read_manifest(_lines(tmp_path / "far.jsonl", [json.dumps(too_far)]))
    ghost = _lines(tmp_path / "ghost.jsonl", [json.dumps({"audio": "nowhere/z.wav"})])
    assert read_manifest(ghost, check_audio=False)[0].audio == str(tmp_path / "nowhere" / "z.wav")


def test_manifest_skip_mode_collects_errors(tmp_path, audio_dir, capsys):
    path = _lines(
        tmp_path / "mixed.jsonl",
        [json.dumps(GOOD), "not json", json.dumps({"audio": "audio/gone.wav"}), json.dumps(GOOD)],
    )
    report = ReadReport()
    clips = read_manifest(path, on_error="skip", report=report)
    assert len(clips) == 2 and report.n_ok == 2 and report.n_skipped == 2
    assert [e.line for e in report.errors] == [2, 3]
    assert "mixed.jsonl:2: invalid JSON" in report.messages[0]
    assert "mixed.jsonl:3: audio file not found" in report.messages[1]
    # without a report the skips are not silent: a summary goes to stderr
    assert len(read_manifest(path, on_error="skip")) == 2
    err = capsys.readouterr().err
    assert "skipped 2 bad entries" in err and "mixed.jsonl:2" in err
    with pytest.raises(ValueError, match="on_error"):
        read_manifest(path, on_error="ignore")  # type: ignore[arg-type]


def test_validate_clips_and_write_refuses_bad_clips(tmp_path, audio_dir):
    clips = [
        Clip(audio=str(audio_dir / "a.wav"), duration=1.0, events=[Event("x", 0.1, 0.5)]),
        Clip(audio=str(audio_dir / "b.wav"), duration=1.0, events=[Event("x", 0.5, 1.5)], id="bad-one"),
        Clip(audio=str(tmp_path / "missing.wav")),
    ]
    with pytest.raises(DataFormatError, match=r"my_source:2: clip 'bad-one'.*past the end"):
        validate_clips(clips, "my_source")
    report = ReadReport()
    ok = validate_clips(clips, "my_source", check_audio=True, on_error="skip", report=report)
    assert ok == clips[:1] and [e.line for e in report.errors] == [2, 3]
    with pytest.raises(DataFormatError, match=r"out.jsonl:2: cannot write clip 'bad-one'"):
        write_manifest(tmp_path / "out.jsonl", clips)
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(DataFormatError, match="not JSON-serialisable"):
        write_manifest(tmp_path / "out.jsonl", [Clip(audio="a.wav", meta={"obj": object()})])
    with pytest.raises(DataFormatError, match="clashes"):
        write_manifest(tmp_path / "out.jsonl", [Clip(audio="a.wav", meta={"events": []})])


# ----------------------------------------------------------------------------- DCASE TSV


def test_strong_tsv_round_trip_and_headerless(tmp_path):
    events = {
        "a.wav": [Event("Dog", 0.5, 1.25), Event("Speech", 2.0, 9.999)],
        "sub/b.wav": [],
        "c.wav": [Event("Alarm_bell_ringing", 0.0, 0.000125)],
    }
    path = write_strong_tsv(tmp_path / "strong.tsv", events)
    text = path.read_text()
    assert text.splitlines()[0] == "filename\tonset\toffset\tevent_label"
    assert "sub/b.wav\t\t\t" in text.splitlines()
    assert read_strong_tsv(path) == events
    # without header; a bare filename row is a clip without events too
    nohead = _lines(tmp_path / "nohead.tsv", ["a.wav\t0.5\t1.25\tDog", "d.wav", "a.wav\t2\t3\tCat"])
    assert read_strong_tsv(nohead) == {"a.wav": [Event("Dog", 0.5, 1.25), Event("Cat", 2.0, 3.0)], "d.wav": []}
    # header columns in another order are mapped by name
    reordered = _lines(tmp_path / "reordered.tsv", ["event_label\tfilename\tonset\toffset", "Dog\ta.wav\t1\t2"])
    assert read_strong_tsv(reordered) == {"a.wav": [Event("Dog", 1.0, 2.0)]}


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ("b.wav\t1.0\t2.0", "expected 4 tab-separated columns"),
        ("b.wav\tone\t2.0\tDog", "non-numeric onset 'one'"),
        ("b.wav\t1.0\tx\tDog", "non-numeric offset"),
        ("b.wav\t2.0\t2.0\tDog", "onset 2 >= offset 2"),
        ("b.wav\t-1\t2.0\tDog", "negative onset"),
        ("b.wav\t\t2.0\tDog", "empty onset or offset"),
        ("b.wav\t1\t2\t", "empty event_label"),
    ],
)
def test_strong_tsv_validation_names_file_and_line(tmp_path, bad_row, problem):
    path = _lines(tmp_path / "labels_strong.tsv", ["filename\tonset\toffset\tevent_label", "a.wav\t0\t1\tDog", bad_row])
    with pytest.raises(DataFormatError) as ei:
        read_strong_tsv(path)
    assert "labels_strong.tsv:3:" in str(ei.value) and problem in str(ei.value)


def test_strong_tsv_skip_drops_the_whole_file(tmp_path):
    path = _lines(
        tmp_path / "s.tsv",
        ["filename\tonset\toffset\tevent_label", "a.wav\t0\t1\tDog", "b.wav\t0\t1\tDog", "b.wav\t3\t2\tCat", "c.wav\t\t\t"],
    )
    report = ReadReport()
    out = read_strong_tsv(path, on_error="skip", report=report)
    # keeping b.wav's first event would make its (bad) Cat event a false negative
    assert out == {"a.wav": [Event("Dog", 0.0, 1.0)], "c.wav": []}
    assert report.n_skipped == 1 and report.errors[0].line == 4


def test_durations_and_weak_tsv_round_trip_and_errors(tmp_path):
    durs = {"a.wav": 10.0, "b.wav": 9.87654}
    p = write_durations_tsv(tmp_path / "durations.tsv", durs)
    assert read_durations_tsv(p) == durs
    assert read_durations_tsv(_lines(tmp_path / "d2.tsv", ["a.wav\t10"])) == {"a.wav": 10.0}
    with pytest.raises(DataFormatError, match=r"d3.tsv:2: non-numeric duration"):
        read_durations_tsv(_lines(tmp_path / "d3.tsv", ["filename\tduration", "a.wav\tten"]))
    with pytest.raises(DataFormatError, match=r"d4.tsv:2: duplicate filename 'a.wav' \(first on line 1\)"):
        read_durations_tsv(_lines(tmp_path / "d4.tsv", ["a.wav\t1", "a.wav\t2"]))

    weak = {"a.wav": ["Dog", "Speech"], "b.wav": [], "c.wav": ["Alarm_bell_ringing"]}
    w = write_weak_tsv(tmp_path / "weak.tsv", weak)
    assert w.read_text().splitlines()[1] == "a.wav\tDog,Speech"
    assert read_weak_tsv(w) == weak
    with pytest.raises(DataFormatError, match=r"w2.tsv:3: expected 2 tab-separated columns"):
        read_weak_tsv(_lines(tmp_path / "w2.tsv", ["filename\tevent_labels", "a.wav\tDog", "b.wav\tDog\textra"]))
    with pytest.raises(DataFormatError, match="comma"):
        write_weak_tsv(tmp_path / "w3.tsv", {"a.wav": ["Dog, barking"]})


def test_clips_from_dcase_with_durations(tmp_path, audio_dir):
    strong = write_strong_tsv(tmp_path / "meta" / "strong.tsv", {"a.wav": [Event("Dog", 0.1, 0.4)], "b.wav": []})
    durs = write_durations_tsv(tmp_path / "meta" / "durations.tsv", {"a.wav": 0.5, "b.wav": 0.5, "c.wav": 0.5})
    clips = clips_from_dcase(strong, audio_dir, durs)
    assert [c.audio for c in clips] == [str(audio_dir / n) for n in ("a.wav", "b.wav", "c.wav")]
    assert clips[0].events == [Event("Dog", 0.1, 0.4)] and clips[0].duration == 0.5
    assert clips[1].events == [] and clips[2].events == [] and clips[2].key == "c"
    # event past the clip's end: reported at its line in the strong TSV
    past = _lines(tmp_path / "meta" / "past.tsv", ["filename\tonset\toffset\tevent_label", "a.wav\t0\t0.2\tDog", "a.wav\t0.3\t0.9\tCat"])
    with pytest.raises(DataFormatError, match=r"past.tsv:3: a.wav: event 'Cat': offset 0.9 is past the end"):
        clips_from_dcase(past, audio_dir, durs)
    missing = _lines(tmp_path / "meta" / "miss.tsv", ["a.wav\t0\t0.2\tDog", "zz.wav\t0\t0.2\tDog"])
    with pytest.raises(DataFormatError, match=r"miss.tsv:2: audio file not found"):
        clips_from_dcase(missing, audio_dir)
    with pytest.raises(DataFormatError, match=r"miss.tsv:2: 'zz.wav' has no duration"):
        clips_from_dcase(missing, audio_dir, durs, check_audio=False)
    report = ReadReport()
    assert len(clips_from_dcase(missing, audio_dir, on_error="skip", report=report)) == 1
    assert report.n_skipped == 1
    # a file dropped for a bad row must not come back as an event-free clip from the durations
    cols = _lines(tmp_path / "meta" / "cols.tsv", ["a.wav\t0\t0.2\tDog", "b.wav\t0\t0.2"])
    report = ReadReport()
    kept = clips_from_dcase(cols, audio_dir, durs, on_error="skip", report=report)
    assert [c.key for c in kept] == ["a", "c"] and report.errors[0].line == 2
    weak = write_weak_tsv(tmp_path / "meta" / "weak.tsv", {"a.wav": ["Dog"], "b.wav": []})
    assert [(c.key, c.labels) for c in clips_from_weak(weak, audio_dir)] == [("a", ["Dog"]), ("b", [])]


# ----------------------------------------------------------------------------- AudioGrounding

GROUNDING = [
    {
        "audiocap_id": 91139,
        "audio_id": "Y7fmOlUlwoNg.wav",
        "tokens": "a man speaks while a dog barks",
        "phrases": [
            {"phrase": "a man speaks", "start_index": 0, "end_index": 2, "segments": [[0.0, 1.5], [4.25, 6.0]]},
            {"phrase": "a dog barks", "start_index": 4, "end_index": 6, "segments": [[2.0, 3.0]]},
        ],
    },
    {
        "audiocap_id": 12,
        "audio_id": "Yabc.wav",
        "tokens": "rain falls",
        "phrases": [{"phrase": "rain falls", "start_index": 0, "end_index": 1, "segments": []}],
    },
]


def test_grounding_round_trip_and_layouts(tmp_path):
    src = tmp_path / "test.json"
    src.write_text(json.dumps(GROUNDING, indent=2))
    items = read_grounding_json(src)
    assert items[0] == GroundingItem(
        audio="Y7fmOlUlwoNg.wav",
        caption="a man speaks while a dog barks",
        phrases=[
            GroundingPhrase("a man speaks", [(0.0, 1.5), (4.25, 6.0)], {"start_index": 0, "end_index": 2}),
            GroundingPhrase("a dog barks", [(2.0, 3.0)], {"start_index": 4, "end_index": 6}),
        ],
        meta={"audiocap_id": 91139},
    )
    out = write_grounding_json(tmp_path / "out.json", items)
    assert json.loads(out.read_text()) == GROUNDING  # the file itself round-trips
    assert read_grounding_json(out) == items
    # with audio_dir: paths resolved on read, made relative again on write
    adir = tmp_path / "wavs"
    resolved = read_grounding_json(src, audio_dir=adir)
    assert resolved[0].audio == str(adir / "Y7fmOlUlwoNg.wav")
    out2 = write_grounding_json(tmp_path / "out2.json", resolved, audio_dir=adir)
    assert json.loads(out2.read_text()) == GROUNDING
    # {"data": [...]} and a dict keyed by audio id
    (tmp_path / "data.json").write_text(json.dumps({"data": GROUNDING}))
    assert read_grounding_json(tmp_path / "data.json") == items
    keyed = {e["audio_id"]: {k: v for k, v in e.items() if k != "audio_id"} for e in GROUNDING}
    (tmp_path / "keyed.json").write_text(json.dumps(keyed))
    assert read_grounding_json(tmp_path / "keyed.json") == items
    # token lists are joined
    tok = [dict(GROUNDING[1], tokens=["rain", "falls"])]
    (tmp_path / "tok.json").write_text(json.dumps(tok))
    assert read_grounding_json(tmp_path / "tok.json")[0].caption == "rain falls"


def test_grounding_to_clips():
    items = [
        GroundingItem("x.wav", "a man speaks while a dog barks",
                      [GroundingPhrase("a man speaks", [(0.0, 1.5), (4.0, 6.0)]), GroundingPhrase("a cat", [])],
                      duration=10.0, meta={"audiocap_id": 1}),
    ]
    (clip,) = grounding_to_clips(items)
    assert clip.captions == ["a man speaks while a dog barks"] and clip.duration == 10.0
    assert clip.events == [Event("a man speaks", 0.0, 1.5), Event("a man speaks", 4.0, 6.0)]
    assert clip.meta == {"audiocap_id": 1, "phrases": ["a man speaks", "a cat"]}


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda e: e["phrases"][0].update(segments=[[2.0, 1.0]]), "onset 2 >= offset 1"),
        (lambda e: e["phrases"][0].update(segments=[[-1.0, 1.0]]), "negative onset"),
        (lambda e: e["phrases"][0].update(segments=[[1.0]]), "is not [onset, offset]"),
        (lambda e: e["phrases"][0].update(segments=[["a", 1.0]]), "non-numeric onset"),
        (lambda e: e.pop("phrases"), "missing required field 'phrases'"),
        (lambda e: e.pop("audio_id"), "missing required field 'audio_id'"),
        (lambda e: e.update(duration=5.0, phrases=[{"phrase": "p", "segments": [[1.0, 6.0]]}]), "past the end"),
    ],
)
def test_grounding_validation_names_file_and_line(tmp_path, mutate, problem):
    entries = json.loads(json.dumps(GROUNDING))
    mutate(entries[1])
    text = json.dumps(entries, indent=2)
    # the entry's line is where its object starts in the file
    start_line = text[: text.index('"audiocap_id": 12')].count("\n")
    path = tmp_path / "grounding_bad.json"
    path.write_text(text)
    with pytest.raises(DataFormatError) as ei:
        read_grounding_json(path)
    assert f"grounding_bad.json:{start_line}:" in str(ei.value) and problem in str(ei.value)
    report = ReadReport()
    assert len(read_grounding_json(path, on_error="skip", report=report)) == 1 and report.errors[0].line == start_line


def test_grounding_invalid_json_reports_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"audio_id": "a.wav",\n   "phrases": [}\n]\n')
    with pytest.raises(DataFormatError, match=r"broken.json:3: invalid JSON"):
        read_grounding_json(path)


# ----------------------------------------------------------------------------- ESC-50 CSV / class folders


def test_esc50_csv_round_trip_folds_and_errors(tmp_path):
    root = tmp_path / "esc"
    names = ["1-1-A-0.wav", "1-2-A-1.wav", "2-3-B-0.wav"]
    for i, n in enumerate(names):
        _wav(root / "audio" / n, seconds=0.1, seed=i)
    csv_path = _lines(
        root / "meta" / "esc50.csv",
        [
            "filename,fold,target,category,esc10,src_file,take",
            "1-1-A-0.wav,1,0,dog,True,1,A",
            "1-2-A-1.wav,1,1,rooster,False,2,A",
            '2-3-B-0.wav,2,0,dog,True,"3,x",B',  # quoted comma stays one column
        ],
    )
    clips = read_esc50_csv(csv_path)  # audio_dir defaults to ../audio
    assert [c.audio for c in clips] == [str(root / "audio" / n) for n in names]
    assert clips[0].labels == ["dog"] and clips[0].key == "1-1-A-0"
    assert clips[2].meta == {"fold": 2, "target": 0, "esc10": "True", "src_file": "3,x", "take": "B"}
    assert [c.key for c in read_esc50_csv(csv_path, folds=[2])] == ["2-3-B-0"]
    assert len(read_esc50_csv(csv_path, folds=1)) == 2
    out = write_esc50_csv(tmp_path / "esc" / "meta" / "copy.csv", clips, audio_dir=root / "audio")
    assert out.read_text() == csv_path.read_text()
    assert read_esc50_csv(out) == clips

    bad = _lines(root / "meta" / "bad.csv", ["filename,fold,target,category", "1-1-A-0.wav,1,0,dog", "1-2-A-1.wav,one,1,rooster"])
    with pytest.raises(DataFormatError, match=r"bad.csv:3: non-integer fold 'one'"):
        read_esc50_csv(bad)
    cols = _lines(root / "meta" / "cols.csv", ["filename,fold,target,category", "1-1-A-0.wav,1,0"])
    with pytest.raises(DataFormatError, match=r"cols.csv:2: expected 4 comma-separated columns, got 3"):
        read_esc50_csv(cols)
    head = _lines(root / "meta" / "head.csv", ["filename,fold,category", "1-1-A-0.wav,1,dog"])
    with pytest.raises(DataFormatError, match=r"head.csv:1: header lacks required column\(s\) target"):
        read_esc50_csv(head)
    gone = _lines(root / "meta" / "gone.csv", ["filename,fold,target,category", "1-1-A-0.wav,1,0,dog", "nope.wav,1,0,dog"])
    with pytest.raises(DataFormatError, match=r"gone.csv:3: audio file not found"):
        read_esc50_csv(gone)


def test_esc50_real_metadata(esc50_dir):
    clips = read_esc50_csv(esc50_dir / "meta" / "esc50.csv")
    assert len(clips) == 1280
    assert len({c.labels[0] for c in clips}) == 40
    assert sorted({c.meta["fold"] for c in clips}) == [1, 2, 3, 4]
    # the dev subset keeps the original ESC-50 target ids (40 of 0..49), one per category
    pairs = {(c.labels[0], c.meta["target"]) for c in clips}
    assert len(pairs) == 40 and len({t for _, t in pairs}) == 40 and all(0 <= t < 50 for _, t in pairs)
    first = clips[0]
    assert first.audio == str(esc50_dir / "audio" / "1-100032-A-0.ogg")
    assert first.labels == ["dog"] and first.meta["src_file"] == "100032" and first.meta["take"] == "A"
    assert len(read_esc50_csv(esc50_dir / "meta" / "esc50.csv", folds=[1])) == 320
    assert load_clips(esc50_dir / "meta" / "esc50.csv", folds=[2, 3]) == [c for c in clips if c.meta["fold"] in (2, 3)]


def test_class_folders(tmp_path):
    root = tmp_path / "classes"
    _wav(root / "dog_bark" / "b.wav")
    _wav(root / "dog_bark" / "a.flac", fmt="FLAC")
    _wav(root / "cat" / "nested" / "c.wav")
    (root / "cat" / "notes.txt").write_text("not audio")
    _wav(root / ".cache" / "x.wav")
    (root / "empty_class").mkdir()
    clips = read_class_folders(root)
    assert [(Path(c.audio).relative_to(root).as_posix(), c.labels, c.meta["target"]) for c in clips] == [
        ("cat/nested/c.wav", ["cat"], 0),
        ("dog_bark/a.flac", ["dog bark"], 1),
        ("dog_bark/b.wav", ["dog bark"], 1),
    ]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataFormatError, match="no class folders with audio"):
        read_class_folders(tmp_path / "nothing")


# ----------------------------------------------------------------------------- WebDataset


def _wds_inputs(tmp_path: Path) -> tuple[list, dict[str, np.ndarray]]:
    src = tmp_path / "src"
    pcm = {
        "a": _wav(src / "a.wav", seed=1),
        "b": _wav(src / "b.flac", seed=2, fmt="FLAC"),
        "c": _wav(src / "c.ogg", seed=3, fmt="OGG", subtype="VORBIS"),
        "d": _wav(src / "d.wav", seed=4),
    }
    d_bytes = (src / "d.wav").read_bytes()
    items = [
        Clip(audio=str(src / "a.wav"), captions=["noise a"], events=[Event("hiss", 0.1, 0.3)], duration=0.5, id="a",
             meta={"license": "CC0"}),
        Clip(audio=str(src / "b.flac"), labels=["Hiss"], duration=0.5, id="b"),
        Clip(audio=str(src / "c.ogg"), captions=["lossy"], duration=0.5, id="c"),
        (Clip(audio="in-memory.wav", captions=["from bytes"], id="d.with.dots"), d_bytes),  # no duration: filled in
    ]
    return items, pcm


def test_webdataset_round_trip_and_audio(tmp_path):
    items, pcm = _wds_inputs(tmp_path)
    shards = write_webdataset(tmp_path / "shards", items, shard_size=3)
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    with tarfile.open(shards[0]) as t:
        members = t.getmembers()
        assert [m.name for m in members] == ["a.flac", "a.json", "b.flac", "b.json", "c.flac", "c.json"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
        assert "audio" not in json.loads(t.extractfile("a.json").read())
    # FLAC input is stored byte-for-byte
    with tarfile.open(shards[0]) as t:
        assert t.extractfile("b.flac").read() == (tmp_path / "src" / "b.flac").read_bytes()

    got = list(iter_webdataset(tmp_path / "shards"))
    clips = [c for c, _ in got]
    assert [c.audio for c in clips] == [f"{shards[0]}#a", f"{shards[0]}#b", f"{shards[0]}#c", f"{shards[1]}#d_with_dots"]
    for (clip, _), item in zip(got[:3], items[:3]):
        assert Clip(**{**clip.__dict__, "audio": item.audio}) == item
    assert clips[3].id == "d.with.dots" and clips[3].duration == pytest.approx(0.5) and clips[3].captions == ["from bytes"]
    for (clip, b) in got:
        assert b[:4] == b"fLaC"
    # lossless for PCM sources (wav -> flac, flac copied, bytes -> flac)
    for (clip, b), key in zip(got, ["a", "b", None, "d"]):
        if key is None:
            continue
        x = decode_audio_bytes(b, sample_rate=None)
        np.testing.assert_array_equal(x, pcm[key].astype(np.float32) / 32768.0)
    # same reading from a single shard, a brace pattern and a list
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    assert [c for c, _ in iter_webdataset(pattern)] == clips
    assert [c for c, _ in iter_webdataset([shards[1]])] == clips[3:]


def test_webdataset_is_deterministic(tmp_path):
    items, _ = _wds_inputs(tmp_path)
    a = write_webdataset(tmp_path / "one", items, shard_size=2)
    b = write_webdataset(tmp_path / "two", items, shard_size=2)
    assert len(a) == 2
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()
    c = write_webdataset(tmp_path / "three", items[:3] + [items[0]], shard_size=2)
    assert c[0].read_bytes() == a[0].read_bytes()
    assert c[1].read_bytes() != a[1].read_bytes()
    with tarfile.open(c[1]) as t:  # a repeated key is made unique instead of merging samples
        assert [m.name for m in t.getmembers()] == ["c.flac", "c.json", "a_1.flac", "a_1.json"]


def test_webdataset_library_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    items, _ = _wds_inputs(tmp_path)
    shards = write_webdataset(tmp_path / "shards", items, shard_size=3)
    ours = list(iter_webdataset(tmp_path / "shards"))
    ds = wds.WebDataset([str(s) for s in shards], shardshuffle=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == ["a", "b", "c", "d_with_dots"]
    for s, (clip, audio) in zip(samples, ours):
        assert s["flac"] == audio
        meta = json.loads(s["json"])
        assert meta["id"] == clip.id and meta.get("captions", []) == clip.captions


def test_webdataset_errors(tmp_path):
    with pytest.raises(AudioError, match="file not found"):
        write_webdataset(tmp_path / "w", [Clip(audio=str(tmp_path / "nope.wav"))])
    _wav(tmp_path / "x.wav")
    with pytest.raises(DataFormatError, match=r"x.wav: cannot write clip 1 .*past the end"):
        write_webdataset(tmp_path / "w", [Clip(audio=str(tmp_path / "x.wav"), events=[Event("e", 0.0, 3.0)])])
    assert not list((tmp_path / "w").glob("*"))  # nothing half-written
    # a shard with a sample lacking its json
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as t:
        data = b"fLaC...."
        ti = tarfile.TarInfo("k.flac")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    with pytest.raises(DataFormatError, match=r"bad.tar: sample 'k' has no .json member"):
        list(iter_webdataset(bad))
    report = ReadReport()
    assert list(iter_webdataset(bad, on_error="skip", report=report)) == [] and report.n_skipped == 1
    with pytest.raises(DataFormatError, match="shard not found"):
        list(iter_webdataset(tmp_path / "missing.tar"))
    (tmp_path / "nottar.tar").write_bytes(b"hello")
    with pytest.raises(DataFormatError, match="not a readable tar shard"):
        list(iter_webdataset(tmp_path / "nottar.tar"))


def test_decode_audio_bytes(tmp_path):
    x = _wav(tmp_path / "s.wav", seconds=0.5, sr=8000)
    b = (tmp_path / "s.wav").read_bytes()
    y = decode_audio_bytes(b, sample_rate=16000)
    assert y.dtype == np.float32 and y.shape == (8000,)
    stereo = io.BytesIO()
    sf.write(stereo, np.stack([x, x], 1), 8000, format="FLAC")
    assert decode_audio_bytes(stereo.getvalue(), sample_rate=None, mono=False).shape == (2, 4000)
    with pytest.raises(AudioError, match="shard.tar#k: corrupt"):
        decode_audio_bytes(b"not audio", source="shard.tar#k")


# ----------------------------------------------------------------------------- dispatcher


def test_load_clips_dispatches_on_format(tmp_path, audio_dir):
    m = write_manifest(tmp_path / "m.jsonl", [Clip(audio=str(audio_dir / "a.wav"), captions=["x"])])
    assert load_clips(m)[0].captions == ["x"]

    strong = write_strong_tsv(tmp_path / "strong.tsv", {"a.wav": [Event("Dog", 0.0, 0.2)]})
    durs = write_durations_tsv(tmp_path / "durations.tsv", {"a.wav": 0.5, "b.wav": 0.5})
    got = load_clips(strong, audio_dir=audio_dir, durations=durs)
    assert [(c.key, c.events, c.duration) for c in got] == [("a", [Event("Dog", 0.0, 0.2)], 0.5), ("b", [], 0.5)]
    nohead = _lines(tmp_path / "nohead.tsv", ["a.wav\t0\t0.2\tDog"])
    assert load_clips(nohead, audio_dir=audio_dir)[0].events == [Event("Dog", 0.0, 0.2)]
    weak = write_weak_tsv(tmp_path / "weak.tsv", {"a.wav": ["Dog"]})
    assert load_clips(weak, audio_dir=audio_dir)[0].labels == ["Dog"]
    weak_nohead = _lines(tmp_path / "weak2.tsv", ["a.wav\tDog,Cat"])
    assert load_clips(weak_nohead, audio_dir=audio_dir)[0].labels == ["Dog", "Cat"]
    with pytest.raises(DataFormatError, match="durations TSV"):
        load_clips(durs)

    g = tmp_path / "g.json"
    g.write_text(json.dumps(GROUNDING))
    gc = load_clips(g, check_audio=False)
    assert gc[0].audio == str(tmp_path / "Y7fmOlUlwoNg.wav") and gc[0].events[0] == Event("a man speaks", 0.0, 1.5)
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"audio": "audio/b.wav", "labels": ["B"]}]))
    assert load_clips(arr)[0].audio == str(audio_dir / "b.wav")

    esc = _lines(tmp_path / "e.csv", ["filename,fold,target,category", "a.wav,1,0,dog", "b.wav,2,1,cat"])
    assert [c.labels for c in load_clips(esc, audio_dir=audio_dir, folds=[2])] == [["cat"]]

    items = [Clip(audio=str(audio_dir / "a.wav"), id="a", duration=0.5)]
    write_webdataset(tmp_path / "wds", items)
    (wclip,) = load_clips(tmp_path / "wds")
    assert wclip.audio.endswith("shard-000000.tar#a") and wclip.duration == 0.5

    classes = tmp_path / "classes"
    _wav(classes / "dog" / "x.wav")
    assert load_clips(classes)[0].labels == ["dog"]

    with pytest.raises(DataFormatError, match="unknown data format '.txt'"):
        load_clips(_lines(tmp_path / "x.txt", ["hi"]))
    with pytest.raises(ConfigError, match="folds="):
        load_clips(m, folds=[1])
    with pytest.raises(ConfigError, match="durations="):
        load_clips(m, durations=durs)
    with pytest.raises(DataFormatError, match="not found"):
        load_clips(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- text encoding

LATIN1 = "caf\xe9".encode("latin-1")  # b"caf\xe9": not UTF-8 (0xe9 starts a 3-byte sequence)


def _raw(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_manifest_non_utf8_line_names_file_line_and_byte(tmp_path, audio_dir):
    good = json.dumps(GOOD).encode()
    path = _raw(tmp_path / "m.jsonl", [good, b'{"audio": "audio/a.wav", "captions": ["' + LATIN1 + b'"]}', good])
    with pytest.raises(DataFormatError) as ei:
        read_manifest(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: not valid UTF-8 text (byte 0xe9 at column 43)"), msg
    report = ReadReport()
    assert len(read_manifest(path, on_error="skip", report=report)) == 2  # the other lines are read
    assert report.n_skipped == 1 and report.errors[0].line == 2
    # a BOM is still fine, and valid non-ASCII text is kept
    ok = _raw(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + json.dumps({"audio": "audio/a.wav", "captions": ["café"]}, ensure_ascii=False).encode()])
    assert read_manifest(ok, check_audio=False)[0].captions == ["café"]


def test_dcase_tsvs_non_utf8(tmp_path):
    strong = _raw(tmp_path / "s.tsv", [b"filename\tonset\toffset\tevent_label", b"a.wav\t0\t1\tDog",
                                        b"b.wav\t0\t1\tDog", b"b.wav\t2\t3\t" + LATIN1, b"c.wav\t\t\t"])
    with pytest.raises(DataFormatError, match=r"s\.tsv:4: not valid UTF-8 text \(byte 0xe9 at column 14\)"):
        read_strong_tsv(strong)
    with pytest.raises(DataFormatError, match=r"s\.tsv:4: not valid UTF-8"):
        load_clips(strong, check_audio=False)  # the format sniffer does not trip over it first
    report = ReadReport()
    # skip mode drops the whole file whose row is unreadable (its other event would be a false negative)
    assert read_strong_tsv(strong, on_error="skip", report=report) == {"a.wav": [Event("Dog", 0.0, 1.0)], "c.wav": []}
    assert report.n_skipped == 1 and report.errors[0].line == 4
    dur = _raw(tmp_path / "d.tsv", [b"filename\tduration", b"a.wav\t1.0", LATIN1 + b".wav\t2.0"])
    with pytest.raises(DataFormatError, match=r"d\.tsv:3: not valid UTF-8"):
        read_durations_tsv(dur)
    assert read_durations_tsv(dur, on_error="skip", report=ReadReport()) == {"a.wav": 1.0}
    weak = _raw(tmp_path / "w.tsv", [b"filename\tevent_labels", b"a.wav\tDog," + LATIN1])
    with pytest.raises(DataFormatError, match=r"w\.tsv:2: not valid UTF-8"):
        read_weak_tsv(weak)


def test_esc50_csv_and_json_non_utf8(tmp_path):
    csv_path = _raw(tmp_path / "meta" / "e.csv", [b"filename,fold,target,category", b"a.wav,1,0,dog", b"b.wav,1,1," + LATIN1])
    with pytest.raises(DataFormatError, match=r"e\.csv:3: not valid UTF-8 text \(byte 0xe9 in field 'category'\)"):
        read_esc50_csv(csv_path, check_audio=False)
    report = ReadReport()
    clips = read_esc50_csv(csv_path, check_audio=False, on_error="skip", report=report)
    assert [c.labels for c in clips] == [["dog"]] and report.n_skipped == 1 and report.errors[0].line == 3
    header = _raw(tmp_path / "h.csv", [b"filename,fold,target," + LATIN1])
    with pytest.raises(DataFormatError, match=r"h\.csv:1: not valid UTF-8"):
        read_esc50_csv(header, check_audio=False)
    js = _raw(tmp_path / "g.json", [b"[", b'{"audio_id": "a.wav", "caption": "x", "phrases": []},',
                                    b'{"audio_id": "' + LATIN1 + b'.wav", "caption": "y", "phrases": []}', b"]"])
    with pytest.raises(DataFormatError, match=r"g\.json:3: not valid UTF-8 text \(byte 0xe9 at column 18\)"):
        read_grounding_json(js, check_audio=False)
