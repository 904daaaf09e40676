"""`finelap classify | detect | ground | embed` end to end on generated audio files with a tiny
checkpoint: outputs, files written (DCASE TSV, score TSVs, PNG plots, embeddings), and one-line
errors with exit code 2 for bad input."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.cli import main
from finelap.infer import Pipeline
from test_infer import SR, make_checkpoint, test_signal

from _figures import assert_png_picture, lane_spans, score_curves


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_infer")
    out = {"ckpt": make_checkpoint(root), "dir": root / "audio"}
    out["dir"].mkdir()
    for name, sec, seed in (("a.wav", 4.0, 1), ("b.flac", 2.5, 2)):
        sf.write(out["dir"] / name, test_signal(sec, seed), SR)
        out[name] = out["dir"] / name
    sub = out["dir"] / "sub"
    sub.mkdir()
    sf.write(sub / "c.ogg", test_signal(1.0, 3), SR)
    (sub / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
    return out


@pytest.fixture(scope="module")
def pipe(files) -> Pipeline:
    return Pipeline.from_pretrained(files["ckpt"])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_help_mentions_checkpoint(capsys):
    for cmd in ("classify", "detect", "ground", "embed"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--checkpoint" in capsys.readouterr().out


def test_classify_table_and_json(files, pipe, capsys):
    rc, out, _ = run(capsys, "classify", files["a.wav"], files["b.flac"], "--labels", "dog;rain;siren", "--top-k", "2",
                     "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0
    assert "the sound of {}" in out and str(files["a.wav"]) in out and str(files["b.flac"]) in out
    assert out.count("\n     1  ") == 2 and "     3  " not in out  # top-2 rows per file
    rc, out, _ = run(capsys, "classify", files["a.wav"], "--labels", "dog;rain;siren", "--json", "--top-k", "3",
                     "--checkpoint", files["ckpt"])  # fmt: skip
    res = json.loads(out)["results"][0]
    preds = res["predictions"]
    api = pipe.classify(str(files["a.wav"]), ["dog", "rain", "siren"], top_k=3)
    assert [p["label"] for p in preds] == [p["label"] for p in api]
    np.testing.assert_allclose([p["score"] for p in preds], [p["score"] for p in api], rtol=1e-6)
    assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-5)


def test_detect_writes_dcase_tsv_scores_and_plots(files, pipe, capsys, tmp_path, saved_figures):
    labels = ["dog", "rain"]
    scores = pipe.frame_scores(str(files["a.wav"]), labels).scores  # the checkpoint's template, as detect
    thr = float(np.median(scores))
    out_tsv, scores_dir, png = tmp_path / "det.tsv", tmp_path / "scores", tmp_path / "det.png"
    rc, _, err = run(capsys, "detect", files["a.wav"], files["b.flac"], "--labels", "dog;rain", "--threshold", thr,
                     "--out", out_tsv, "--scores-out", scores_dir, "--plot", png, "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0, err
    with open(out_tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows and list(rows[0]) == ["filename", "onset", "offset", "event_label"]
    api = pipe.detect([str(files["a.wav"]), str(files["b.flac"])], labels, threshold=thr)  # one list per file
    assert [(r["filename"], float(r["onset"]), float(r["offset"]), r["event_label"]) for r in rows] == [
        (name, r["onset"], r["offset"], r["label"]) for name, file_rows in zip(("a.wav", "b.flac"), api) for r in file_rows
    ]
    for name, audio, dur in (("a", files["a.wav"], 4.0), ("b", files["b.flac"], 2.5)):
        with open(scores_dir / f"{name}.tsv", newline="") as f:
            srows = list(csv.reader(f, delimiter="\t"))
        assert srows[0] == ["onset", "offset", "dog", "rain"]
        assert float(srows[1][0]) == 0.0 and float(srows[-1][1]) == pytest.approx(dur)
        # one plot per input, showing that file's scores and the detections written to the TSV
        assert_png_picture(tmp_path / f"det_{name}.png")
        (fig,) = [f for f in saved_figures if f.axes[0].get_title().startswith(f"{audio.name}: detection")]
        curves = score_curves(fig)
        file_scores = pipe.frame_scores(str(audio), labels).scores
        for k, label in enumerate(labels):
            np.testing.assert_allclose(curves[label], file_scores[:, k], atol=1e-6)
            want = [(float(r["onset"]), float(r["offset"])) for r in rows if r["filename"] == audio.name and r["event_label"] == label]
            np.testing.assert_allclose(lane_spans(fig, f"detected: {label}"), np.reshape(sorted(want), (-1, 2)), atol=1e-3)
    # without --out: printed with their score; --json: machine-readable, the API's dicts plus the file name
    rc, out, _ = run(capsys, "detect", files["a.wav"], "--labels", "dog;rain", "--threshold", thr, "--json", "--checkpoint", files["ckpt"])
    events = json.loads(out)["events"]
    assert rc == 0 and all(e.pop("filename") == "a.wav" for e in events)
    assert events == pipe.detect(str(files["a.wav"]), labels, threshold=thr)
    rc, out, _ = run(capsys, "detect", files["a.wav"], "--labels", "dog", "--threshold", "1.0", "--checkpoint", files["ckpt"])
    assert rc == 0 and "no events above the threshold" in out and "threshold 1 (given threshold) used for 'dog'" in out


def test_nothing_found_names_the_threshold_used_for_each_query(files, capsys, tmp_path):
    """A calibrated checkpoint with its own threshold for 'dog' and a global one for the rest: the
    "nothing found" notes (CLI, library, plot) give each query the threshold it was held to,
    rounded, and say which it is."""
    cal = {"threshold": 0.912345, "class_thresholds": {"dog": 0.954321}, "median_filter_s": 0.0, "min_duration_s": 0.0,
           "merge_gap_s": 0.0, "classes": ["dog", "rain"], "data": "val.jsonl", "score": 0.5}  # fmt: skip
    ck = make_checkpoint(tmp_path, "calibrated", calibration=json.dumps(cal))  # a random model: peaks far below both
    png = tmp_path / "g.png"
    rc, out, err = run(capsys, "ground", files["a.wav"], "dog", "rain", "--plot", png, "--checkpoint", ck)
    assert rc == 0, err
    notes = [ln for ln in out.splitlines() if "no segment: " in ln]
    assert len(notes) == 2, out
    assert "threshold 0.954 (per-class threshold)" in notes[0] and "threshold 0.912 (global threshold)" in notes[1], out
    assert "0.912345" not in out + err and "0.954321" not in out + err
    rc, out, _ = run(capsys, "ground", files["a.wav"], "dog", "rain", "--json", "--checkpoint", ck)
    q = json.loads(out)["queries"]
    assert [(x["threshold"], x["threshold_kind"]) for x in q] == [(0.954321, "per-class"), (0.912345, "global")]
    rc, out, err = run(capsys, "detect", files["a.wav"], "--labels", "dog", "--checkpoint", ck)
    assert rc == 0 and "no events above the threshold" in out and "0.954 (per-class threshold) used for 'dog'" in out, out
    # the library says the same on stderr
    cpipe = Pipeline.from_pretrained(ck)
    assert cpipe.ground(str(files["a.wav"]), "rain") == []
    assert "threshold 0.912 (global threshold) used for 'rain'" in capsys.readouterr().err
    assert cpipe.detect(str(files["a.wav"]), ["dog"]) == []
    assert "threshold 0.954 (per-class threshold) used for 'dog'" in capsys.readouterr().err
    # with --threshold, every query is held to the given one
    rc, out, _ = run(capsys, "ground", files["a.wav"], "dog", "--threshold", "0.99", "--checkpoint", ck)
    assert "no segment: the highest probability" in out and "under the threshold 0.99 (given threshold)" in out, out


def test_ground_prints_segments_json_and_plot(files, pipe, capsys, tmp_path, saved_figures):
    fs = pipe.frame_scores(str(files["a.wav"]), ["a dog barking"])
    thr = float(np.quantile(fs.scores, 0.7))
    png = tmp_path / "g.png"
    rc, out, err = run(capsys, "ground", files["a.wav"], "a dog barking", "--threshold", thr, "--plot", png,
                       "--json", "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0, err
    q = json.loads(out)["queries"]
    assert q[0]["text"] == "a dog barking"
    assert q[0]["segments"] == pipe.ground(str(files["a.wav"]), "a dog barking", threshold=thr)
    assert q[0]["segments"] and set(q[0]["segments"][0]) == {"onset", "offset", "score", "label"}
    assert_png_picture(png)
    (fig,) = saved_figures
    np.testing.assert_allclose(score_curves(fig)["a dog barking"], fs.scores[:, 0], atol=1e-6)
    np.testing.assert_allclose(lane_spans(fig, "detected: a dog barking"), [(s["onset"], s["offset"]) for s in q[0]["segments"]], atol=1e-3)
    rc, out, _ = run(capsys, "ground", files["a.wav"], "a dog barking", "rain", "--threshold", "1.0", "--checkpoint", files["ckpt"])
    assert rc == 0 and out.count("no segment: the highest probability") == 2


def test_embed_folder_skips_broken_files(files, pipe, capsys, tmp_path):
    out = tmp_path / "emb.npy"
    rc, _, err = run(capsys, "embed", files["dir"], "--out", out, "--frames", "--checkpoint", files["ckpt"])
    assert rc == 1, err  # some files failed: the others are written, the status says so
    assert "finelap embed: skipped" in err and "broken.wav" in err
    paths = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert [Path(p).name for p in paths] == ["a.wav", "b.flac", "c.ogg"]  # sorted, recursive
    emb = np.load(out)
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(emb, pipe.embed_audio(paths), atol=1e-5)
    failed = (tmp_path / "emb.failed.tsv").read_text().splitlines()
    assert len(failed) == 2 and "broken.wav" in failed[1]
    fr = np.load(tmp_path / "emb.frames.npz")
    counts = np.diff(fr["offsets"])
    assert list(counts) == [pipe.timeline.num_frames_for_samples(int(s * SR)) for s in (4.0, 2.5, 1.0)]
    assert fr["frames"].shape == (counts.sum(), 16) and float(fr["frame_rate_hz"]) == 25.0
    np.testing.assert_allclose(fr["frames"][: counts[0]], pipe.embed_frames(paths[0]).embeds, atol=1e-5)


def test_classify_and_detect_take_a_folder(files, pipe, capsys, tmp_path):
    """A folder stands for its audio files (recursive, sorted): the same results as naming them,
    the broken file inside is skipped and reported (exit 1), and an empty folder is a user error."""
    named = [files["a.wav"], files["b.flac"], files["dir"] / "sub" / "c.ogg"]
    rc, out, err = run(capsys, "classify", files["dir"], "--labels", "dog;rain;siren", "--json", "--checkpoint", files["ckpt"])
    assert rc == 1 and "finelap classify: skipped" in err and "broken.wav" in err
    got = json.loads(out)["results"]
    assert [Path(r["file"]).name for r in got] == ["a.wav", "b.flac", "c.ogg"]
    api = pipe.classify([str(f) for f in named], ["dog", "rain", "siren"], top_k=3)
    for r, a in zip(got, api):
        np.testing.assert_allclose([p["score"] for p in r["predictions"]], [p["score"] for p in a], rtol=1e-6)
    by_folder, by_name = tmp_path / "folder.tsv", tmp_path / "named.tsv"
    rc, _, err = run(capsys, "detect", files["dir"], "--labels", "dog;rain", "--threshold", 0.0, "--out", by_folder,
                     "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 1 and "broken.wav" in err
    rc, _, err = run(capsys, "detect", *named, "--labels", "dog;rain", "--threshold", 0.0, "--out", by_name,
                     "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0, err
    rows = by_folder.read_text().splitlines()
    assert rows == by_name.read_text().splitlines() and len(rows) > 3
    assert {r.split("\t")[0] for r in rows[1:]} == {"a.wav", "b.flac", "c.ogg"}
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    sf.write(empty / ".hidden" / "x.wav", test_signal(1.0, 4), SR)  # hidden entries are not searched
    rc, _, err = run(capsys, "classify", empty, "--labels", "dog", "--checkpoint", files["ckpt"])
    assert rc == 2 and err.strip().splitlines() == [f"finelap classify: error: {empty}: folder holds no audio files "
                                                    f"(looked recursively for .aif .aiff .flac .mp3 .oga .ogg .opus .wav)"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "{dir}/missing.wav", "--labels", "dog"], "missing.wav: file not found"),
        (["classify", "{dir}/sub/broken.wav", "--labels", "dog"], "broken.wav: corrupt or unreadable"),
        (["detect", "{a}", "--labels", ";"], "empty label list"),
        (["ground", "{a}", " "], "empty text query"),
        (["classify", "{a}", "--labels", "dog;dog"], "duplicate label 'dog'"),
        (["detect", "{a}", "--labels", "dog", "--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["embed", "{dir}/sub/nothing_here", "--out", "{dir}/x.npy"], "nothing_here: file not found"),
        (["classify", "{a}", "--labels", "dog", "--checkpoint", "{dir}/no_ckpt"], "checkpoint directory does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(files, capsys, argv, message):
    fill = {"dir": files["dir"], "a": files["a.wav"]}
    argv = [a.format(**fill) for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", str(files["ckpt"])]
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"finelap {argv[0]}: error:"), err


def test_wrong_checkpoint_version_is_one_line(files, capsys, tmp_path):
    import shutil

    ck = tmp_path / "future"
    shutil.copytree(files["ckpt"], ck)
    meta = json.loads((ck / "config.json").read_text())
    meta["format_version"] = 42
    (ck / "config.json").write_text(json.dumps(meta))
    rc, _, err = run(capsys, "ground", files["a.wav"], "a dog", "--checkpoint", ck)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "format 42 is newer" in err


def test_uncalibrated_checkpoint_warns_in_one_line(files, capsys):
    """The fixture checkpoint has no frame objective: the default threshold draws one warning line."""
    rc, _, err = run(capsys, "detect", files["a.wav"], "--labels", "dog", "--checkpoint", files["ckpt"])
    assert rc == 0
    lines = [l for l in err.splitlines() if "warning" in l]
    assert len(lines) == 1 and lines[0].startswith("finelap detect: warning: ") and "without a frame objective" in lines[0]
    rc, _, err = run(capsys, "detect", files["a.wav"], "--labels", "dog", "--threshold", "0.3", "--checkpoint", files["ckpt"])
    assert rc == 0 and "warning" not in err


# ============================================================================ help, flags, labels


def _subparsers():
    import argparse

    from finelap.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_help_shows_examples_defaults_once_and_every_flag_has_help(capsys):
    import argparse
    import importlib

    from finelap.cli import COMMANDS

    parser, subs = _subparsers()
    for name, (module, _) in COMMANDS.items():
        doc = importlib.import_module(module).__doc__
        with pytest.raises(SystemExit):
            main([name, "--help"])
        out = capsys.readouterr().out
        # the whole docstring, line by line (examples keep their line breaks)
        example_lines = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("finelap ")]
        assert example_lines, f"{name}: its docstring has no example"
        for ln in example_lines:
            assert ln in out, f"{name} --help lacks the example {ln!r}"
        assert "(default: None)" not in out and "(default: False)" not in out
        for action in subs[name]._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            formatted = subs[name].formatter_class("x")._get_help_string(action)
            shown = formatted % {"default": action.default} if "%(default)" in formatted else formatted
            assert shown.count("default") <= 1, f"{name} {action.option_strings}: {shown!r}"
            if "default" in action.help:  # the help says it already: nothing appended
                assert formatted == action.help
    # a default the help text does not mention is shown once, by the formatter
    main_help = subs["classify"].format_help()
    assert "labels shown per file (default: 5)" in " ".join(main_help.split())
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "build, update or inspect" in top  # and `index update` exists:
    assert subs["index"].parse_args(["update", "x.idx"]).action == "update"


def test_flag_names_are_unified_and_old_spellings_still_work(capsys):
    _, subs = _subparsers()
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in subs.items()}
    assert {"--no-plots"} <= flags["synth"] & flags["eval"]
    assert {"--top-k", "-k"} <= flags["classify"] & flags["search"]
    assert "--data" in flags["eval"]
    for name in ("synth", "corpus", "train", "embed", "detect", "eval", "index"):
        assert "--out" in flags[name], name
    # the old --no-plot of synth still parses, into the same option, and is not advertised
    a = subs["synth"].parse_args(["--pool", "p.csv", "--out", "o", "--no-plot"])
    assert a.no_plots is True
    assert "--no-plot " not in subs["synth"].format_help() and "--no-plots" in subs["synth"].format_help()


@pytest.mark.parametrize(
    "text, labels",
    [
        ("dog;rain;siren", ["dog", "rain", "siren"]),
        ("dog, rain ,siren", ["dog", "rain", "siren"]),
        ('dog barking;"rain, heavy"', ["dog barking", "rain, heavy"]),
        ('"a ""quoted"" word", b', ['a "quoted" word', "b"]),
        ("dog;rain;", ["dog", "rain"]),
    ],
)
def test_label_strings(text, labels):
    from finelap.infer import parse_labels

    assert parse_labels(text) == labels


def test_labels_flag_counts_and_reads_files(files, pipe, capsys, tmp_path):
    rc, out, err = run(capsys, "classify", files["a.wav"], "--labels", 'dog barking;"rain, heavy",siren', "--json",
                       "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0
    assert "3 labels: dog barking; rain, heavy; siren" in err.splitlines()
    assert sorted(p["label"] for p in json.loads(out)["results"][0]["predictions"]) == ["dog barking", "rain, heavy", "siren"]
    lf = tmp_path / "labels.txt"
    lf.write_text("rain, heavy  # commas are kept in a file\n\ndog\n")
    rc, out, err = run(capsys, "classify", files["a.wav"], "--labels", f"@{lf}", "--json", "--checkpoint", files["ckpt"])
    assert rc == 0 and "2 labels: rain, heavy; dog" in err
    rc, _, err = run(capsys, "classify", files["a.wav"], "--labels", 'dog;"rain', "--checkpoint", files["ckpt"])
    assert rc == 2 and "unclosed double quote" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_label_file_may_be_a_pipe(tmp_path):
    """`--labels @<(grep dog labels.txt)`: the shell passes /dev/fd/N, a pipe, not a regular file."""
    import threading

    from finelap.commands._pipeline import read_labels
    from finelap.errors import DataFormatError

    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a dog barking\nrain, heavy\n"), daemon=True)
    writer.start()
    assert read_labels(f"@{fifo}") == ["a dog barking", "rain, heavy"]
    writer.join(5)
    with pytest.raises(DataFormatError, match="is a directory"):
        read_labels(f"@{tmp_path}")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "{dir}/missing.wav", "--labels", "dog"], "missing.wav: file not found"),
        (["classify", "{a}", "--labels", "dog;dog"], "duplicate label 'dog'"),
        (["classify", "{a}", "--labels", "@{dir}/nolabels.txt"], "label file not found"),
        (["detect", "{a}", "--labels", "dog", "--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["detect", "{a}", "--labels", "dog", "--plot", "{dir}/p.png", "--reference", "{dir}/nope.tsv"], "reference TSV not found"),
        (["ground", "{dir}/missing.wav", "a dog"], "missing.wav: file not found"),
        (["caption", "{a}"], "not trained with a caption decoder"),
        (["eval", "sed", "--data", "{dir}/nope.jsonl", "--out", "{dir}/x.json"], "nope.jsonl: file not found"),
        (["eval", "zeroshot", "--data", "{a}", "--labels", ";", "--out", "{dir}/x.json"], "empty label list"),
    ],
)
def test_user_errors_are_reported_before_the_model_loads(files, capsys, monkeypatch, argv, message):
    import finelap.models.build as build

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(build, "load_pretrained", no_model)
    fill = {"dir": files["dir"], "a": files["a.wav"]}
    argv = [a.format(**fill) for a in argv] + ["--checkpoint", str(files["ckpt"])]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(AssertionError, match="model was loaded"):  # the patch is where models load
        main(["classify", str(files["a.wav"]), "--labels", "dog", "--checkpoint", str(files["ckpt"])])


def test_plot_reference_overlay_comes_from_the_tsv_rows_of_that_file(files, pipe, capsys, monkeypatch, tmp_path):
    ref = tmp_path / "strong.tsv"
    ref.write_text("filename\tonset\toffset\tevent_label\n"
                   "audio/a.wav\t0.5\t1.25\tdog\n"
                   "a.wav\t2.0\t3.0\tDog\n"
                   "b.flac\t0.1\t0.2\tdog\n"
                   "a.wav\t1.0\t2.0\tcar horn\n")  # fmt: skip
    seen = []
    orig = Pipeline.plot

    def spy(self, *a, **kw):
        seen.append(kw)
        return orig(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "plot", spy)
    png = tmp_path / "d.png"
    rc, _, err = run(capsys, "detect", files["a.wav"], "--labels", "dog;rain", "--threshold", "0.99", "--plot", png,
                     "--reference", ref, "--log-scale", "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0, err
    assert seen[0]["reference"] == [[(0.5, 1.25), (2.0, 3.0)], []] and seen[0]["log_scale"] is True
    assert "'car horn', not among the queries" in err
    assert_png_picture(png)
    rc, _, err = run(capsys, "ground", files["a.wav"], "a dog", "--plot", png, "--reference", ref, "--checkpoint", files["ckpt"])
    assert rc == 0 and seen[1]["reference"] == [[]] and seen[1]["log_scale"] is False


def test_index_update_reuses_the_recorded_checkpoint_and_folder(files, capsys, tmp_path):
    import shutil

    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(files["a.wav"], lib / "a.wav")
    idx = tmp_path / "lib.idx"
    ck = tmp_path / "ckpt_ema"  # a checkpoint with EMA weights, indexed with the raw ones (--no-ema)
    shutil.copytree(files["ckpt"], ck)
    shutil.copy(ck / "model.safetensors", ck / "ema.safetensors")
    rc, out, err = run(capsys, "index", "build", lib, "--out", idx, "--checkpoint", ck, "--no-ema")
    assert rc == 0, err
    assert json.loads(out)["added"] == 1
    shutil.copy(files["b.flac"], lib / "b.flac")
    rc, out, err = run(capsys, "index", "update", idx)
    assert rc == 0, err
    counts = json.loads(out)
    assert counts["added"] == 1 and counts["unchanged"] == 1
    assert "recorded in the index" in err
    rc, out, err = run(capsys, "search", "a dog barking", "--index", idx, "--top-k", "1", "--json")  # the raw weights too
    assert rc == 0, err
    assert len(json.loads(out)) == 1
    rc, _, err = run(capsys, "index", "update", tmp_path / "no.idx")
    assert rc == 2 and len(err.strip().splitlines()) == 1
