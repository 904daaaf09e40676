"""`finelap classify | detect | ground | embed` end to end on generated audio files with a tiny
checkpoint: outputs, files written (DCASE TSV, score TSVs, PNG plots, embeddings), and one-line
errors with exit code 2 for bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from finelap.cli import main
from finelap.infer import Pipeline
from test_infer import SR, make_checkpoint, test_signal

PNG = b"\x89PNG\r\n\x1a\n"


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
    preds = [(p["label"], p["prob"]) for p in res["predictions"]]
    api = pipe.classify(str(files["a.wav"]), ["dog", "rain", "siren"], top_k=3)
    assert [l for l, _ in preds] == [l for l, _ in api]
    np.testing.assert_allclose([p for _, p in preds], [p for _, p in api], rtol=1e-6)
    assert sum(p for _, p in preds) == pytest.approx(1.0, abs=1e-5)


def test_detect_writes_dcase_tsv_scores_and_plots(files, pipe, capsys, tmp_path):
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
    api = pipe.detect([str(files["a.wav"]), str(files["b.flac"])], labels, threshold=thr)
    assert [(r["filename"], float(r["onset"]), float(r["offset"]), r["event_label"]) for r in rows] == [
        (r["filename"], r["onset"], r["offset"], r["event_label"]) for r in api
    ]
    for name, dur in (("a", 4.0), ("b", 2.5)):
        with open(scores_dir / f"{name}.tsv", newline="") as f:
            srows = list(csv.reader(f, delimiter="\t"))
        assert srows[0] == ["onset", "offset", "dog", "rain"]
        assert float(srows[1][0]) == 0.0 and float(srows[-1][1]) == pytest.approx(dur)
        assert (tmp_path / f"det_{name}.png").read_bytes()[:8] == PNG  # one plot per input
    # without --out: printed with confidence; --json: machine-readable
    rc, out, _ = run(capsys, "detect", files["a.wav"], "--labels", "dog;rain", "--threshold", thr, "--json", "--checkpoint", files["ckpt"])
    assert rc == 0 and json.loads(out)["events"] == pipe.detect(str(files["a.wav"]), labels, threshold=thr)
    rc, out, _ = run(capsys, "detect", files["a.wav"], "--labels", "dog", "--threshold", "1.0", "--checkpoint", files["ckpt"])
    assert rc == 0 and "no events above threshold 1" in out


def test_ground_prints_segments_json_and_plot(files, pipe, capsys, tmp_path):
    fs = pipe.frame_scores(str(files["a.wav"]), ["a dog barking"])
    thr = float(np.quantile(fs.scores, 0.7))
    png = tmp_path / "g.png"
    rc, out, err = run(capsys, "ground", files["a.wav"], "a dog barking", "--threshold", thr, "--plot", png,
                       "--json", "--checkpoint", files["ckpt"])  # fmt: skip
    assert rc == 0, err
    q = json.loads(out)["queries"]
    assert q[0]["text"] == "a dog barking"
    assert q[0]["segments"] == pipe.ground(str(files["a.wav"]), "a dog barking", threshold=thr)
    assert png.read_bytes()[:8] == PNG
    rc, out, _ = run(capsys, "ground", files["a.wav"], "a dog barking", "rain", "--threshold", "1.0", "--checkpoint", files["ckpt"])
    assert rc == 0 and out.count("no segment above the threshold") == 2


def test_embed_folder_skips_broken_files(files, pipe, capsys, tmp_path):
    out = tmp_path / "emb.npy"
    rc, _, err = run(capsys, "embed", files["dir"], "--out", out, "--frames", "--checkpoint", files["ckpt"])
    assert rc == 0, err
    assert "broken.wav" in err and "warning" in err
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
