"""Every CLI command over a corpus of bad and odd inputs that this module generates: no traceback,
no hang, no NaN in any output, every bad file named, and the exit status of the rule in
`finelap.commands._failures` (0: all processed, 1: some files failed, 2: user error / none worked).

The corpus: an empty file, a truncated WAV, NaN and Inf samples, 1 sample, 6 channels, 8 kHz and
192 kHz, a 30-min file (silence at 8 kHz, cheap to write), random bytes, a text file with an audio
extension, a broken symlink, unicode and space names, non-UTF-8 label files and manifests, and
one-class references. Commands run in-process through `finelap.cli.main` (fast), each under an
alarm that turns a hang into a failure.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import finelap.audio
from finelap.cli import main
from finelap.data.manifests import write_durations_tsv, write_grounding_json, write_manifest, write_strong_tsv
from finelap.data.manifests import GroundingItem, GroundingPhrase
from finelap.data.types import Clip, Event

from test_infer import make_checkpoint
from tinyfactory import TINY_CNN, tiny_text_dir

REPO = Path(__file__).resolve().parents[1]
SR = 16000
LATIN1 = "caf\xe9".encode("latin-1")  # not UTF-8

# usable, if odd: processed (the truncated one with a warning naming it)
ODD = ["good.wav", "naïve café ünï.wav", "with space.flac", "one_sample.wav", "six_channels.wav", "rate8k.wav",
       "rate192k.flac", "truncated.wav"]  # fmt: skip
# unusable: skipped and named by multi-file commands, a one-line error (exit 2) on their own
BAD = {
    "empty.wav": "empty file (0 bytes)",
    "nan.wav": "NaN or Inf",
    "inf.wav": "NaN or Inf",
    "garbage.wav": "corrupt or unreadable",
    "text.ogg": "corrupt or unreadable",
    "broken_link.wav": "broken symbolic link",
}


def _noise(n: int, seed: int, channels: int = 1) -> np.ndarray:
    x = 0.1 * np.random.default_rng(seed).standard_normal((n, channels) if channels > 1 else n)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    a = root / "audio"
    a.mkdir()
    sf.write(a / "good.wav", _noise(int(1.5 * SR), 0), SR)
    sf.write(a / "naïve café ünï.wav", _noise(SR, 1), SR)
    sf.write(a / "with space.flac", _noise(SR, 2), SR)
    sf.write(a / "one_sample.wav", np.array([0.1], np.float32), SR)
    sf.write(a / "six_channels.wav", _noise(SR, 3, channels=6), SR)
    sf.write(a / "rate8k.wav", _noise(8000, 4), 8000)
    sf.write(a / "rate192k.flac", _noise(96000, 5), 192000)
    sf.write(root / "full.wav", _noise(2 * SR, 6), SR, subtype="PCM_16")
    (a / "truncated.wav").write_bytes((root / "full.wav").read_bytes()[: 44 + 7040])  # 0.22 s of a 2-s file
    (a / "empty.wav").write_bytes(b"")
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        x = _noise(SR, 7)
        x[100] = value
        sf.write(a / name, x, SR, subtype="FLOAT")
    (a / "garbage.wav").write_bytes(np.random.default_rng(8).bytes(5000))
    (a / "text.ogg").write_text("this is a text file, not audio\n")
    os.symlink(a / "gone.wav", a / "broken_link.wav")
    # 30 min of silence at 8 kHz, written in blocks (29 MB of PCM_16)
    long = root / "long" / "long30min.wav"
    long.parent.mkdir()
    with sf.SoundFile(long, "w", 8000, 1, subtype="PCM_16") as f:
        block = np.zeros(8000 * 60, np.int16)
        for _ in range(30):
            f.write(block)
    labels = root / "labels_latin1.txt"
    labels.write_bytes(b"dog\n" + LATIN1 + b"\n")
    return {"root": root, "audio": a, "long": long, "labels_latin1": labels, "ckpt": make_checkpoint(root),
            "slap": _slap_checkpoint(root)}  # fmt: skip


def _slap_checkpoint(root: Path) -> Path:
    """A tiny random-weight checkpoint with a caption decoder (preset slap)."""
    import torch

    from finelap.config import load_run_config
    from finelap.models.build import build_model
    from finelap.train.checkpoint import save_checkpoint

    ov = [f"model.audio={json.dumps(TINY_CNN)}", f"model.text.path={tiny_text_dir(root / 'text')}", "model.text.freeze=true",
          "model.embed_dim=16", "model.frame_head_heads=2", "audio.clip_seconds=2.0", "audio.max_seconds=2.0"]  # fmt: skip
    cfg = load_run_config(REPO / "configs" / "slap.yaml", ov)
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_checkpoint(root / "slap" / "final", model, cfg, step=1, rng=False, update_latest=False)


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (SIGALRM; the test runs in the main thread)."""

    def fire(signum, frame):  # noqa: ANN001 (signal API)
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(capsys, *argv, limit: int = 120) -> tuple[int, str, str]:
    """finelap ARGV in-process: (exit status, stdout, stderr); never a traceback."""
    getattr(finelap.audio, "_WARNED_TRUNCATED", set()).clear()  # each command reports the truncated file itself
    capsys.readouterr()
    with deadline(limit):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out, cap.err
    return rc, cap.out, cap.err


def one_line_error(err: str, command: str, *needles: str) -> None:
    """One error line, the last one (status lines such as "1 label: dog" may come before an error
    found while decoding)."""
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith(f"finelap {command}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], (n, err)


def paths(corpus, names) -> list[str]:
    return [str(corpus["audio"] / n) for n in names]


def _finite(x) -> bool:
    return bool(np.isfinite(np.asarray(x, dtype=np.float64)).all())


# ============================================================================ multi-file commands


def check_skipped(err: str, command: str) -> None:
    """Every unusable file named with its reason; the truncated one named in a warning."""
    for name, problem in BAD.items():
        line = next((ln for ln in err.splitlines() if f"finelap {command}: skipped" in ln and name in ln), None)
        assert line is not None and problem in line, (name, err)
    assert any("truncated.wav: truncated file" in ln for ln in err.splitlines()), err
    assert f"{len(BAD)} of {len(BAD) + len(ODD)} files failed" in err, err


def test_classify_skips_bad_files_reports_them_and_exits_1(corpus, capsys):
    files = paths(corpus, ODD[:4] + list(BAD) + ODD[4:])  # bad files in the middle
    rc, out, err = run(capsys, "classify", *files, "--labels", "dog;rain", "--json", "--batch-size", "2",
                       "--checkpoint", corpus["ckpt"])  # fmt: skip
    assert rc == 1, err
    res = json.loads(out)
    assert [Path(r["file"]).name for r in res["results"]] == ODD
    assert all(_finite([p["score"] for p in r["predictions"]]) for r in res["results"])
    assert sorted(Path(f["file"]).name for f in res["failed"]) == sorted(BAD)
    check_skipped(err, "classify")
    # the table output too: the good files are printed
    rc, out, _ = run(capsys, "classify", *paths(corpus, ["good.wav", "nan.wav"]), "--labels", "dog", "--checkpoint", corpus["ckpt"])
    assert rc == 1 and "good.wav" in out


def test_detect_writes_results_for_the_good_files(corpus, capsys, tmp_path):
    files = paths(corpus, list(BAD) + ODD)
    tsv, scores = tmp_path / "det.tsv", tmp_path / "scores"
    rc, out, err = run(capsys, "detect", *files, "--labels", "dog;rain", "--threshold", "0.5", "--out", tsv,
                       "--scores-out", scores, "--checkpoint", corpus["ckpt"])  # fmt: skip
    assert rc == 1, err
    check_skipped(err, "detect")
    assert tsv.read_text().startswith("filename\tonset\toffset\tevent_label\n")
    written = sorted(p.name for p in scores.iterdir())
    assert written == sorted(Path(n).stem + ".tsv" for n in ODD)
    for p in scores.iterdir():
        vals = np.loadtxt(p, delimiter="\t", skiprows=1, ndmin=2)
        assert len(vals) >= 1 and _finite(vals) and (vals[:, 2:] >= 0).all() and (vals[:, 2:] <= 1).all()


def test_caption_skips_bad_files_and_needs_a_decoder(corpus, capsys):
    files = paths(corpus, list(BAD) + ODD)
    rc, out, err = run(capsys, "caption", *files, "--checkpoint", corpus["slap"], "--beam", "1", "--max-len", "4", "--json")
    assert rc == 1, err
    res = json.loads(out)
    assert [Path(r["file"]).name for r in res["results"]] == ODD
    assert sorted(Path(f["file"]).name for f in res["failed"]) == sorted(BAD)
    check_skipped(err, "caption")
    rc, _, err = run(capsys, "caption", *paths(corpus, ["good.wav"]), "--checkpoint", corpus["ckpt"])
    assert rc == 2
    one_line_error(err, "caption", "not trained with a caption decoder (preset slap)")


def test_embed_lists_every_bad_file_including_a_broken_link(corpus, capsys, tmp_path):
    out = tmp_path / "emb.npy"
    rc, _, err = run(capsys, "embed", corpus["audio"], "--out", out, "--frames", "--checkpoint", corpus["ckpt"])
    assert rc == 1, err
    check_skipped(err, "embed")  # same wording as the other commands
    kept = [Path(p).name for p in (tmp_path / "emb.paths.txt").read_text(encoding="utf-8").splitlines()]
    assert sorted(kept) == sorted(ODD)
    failed = (tmp_path / "emb.failed.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert sorted(Path(ln.split("\t")[0]).name for ln in failed) == sorted(BAD)
    emb = np.load(out)
    assert emb.shape == (len(ODD), 16) and _finite(emb)
    assert _finite(np.load(tmp_path / "emb.frames.npz")["frames"])


@pytest.mark.parametrize("name", list(BAD))
def test_a_single_bad_file_is_a_one_line_error(corpus, capsys, name):
    f = corpus["audio"] / name
    for argv in (["classify", f, "--labels", "dog"], ["detect", f, "--labels", "dog"], ["ground", f, "a dog"]):
        rc, _, err = run(capsys, *argv, "--checkpoint", corpus["ckpt"])
        assert rc == 2, (argv, err)
        one_line_error(err, argv[0], name, BAD[name])


def test_ground_odd_files_and_the_30_minute_file(corpus, capsys):
    for name in ODD:
        rc, out, err = run(capsys, "ground", corpus["audio"] / name, "a dog barking", "--json", "--threshold", "0.5",
                           "--checkpoint", corpus["ckpt"])  # fmt: skip
        assert rc == 0, (name, err)
        assert all(_finite([s["confidence"] for s in q["segments"]]) for q in json.loads(out)["queries"])
    # 30 minutes (streamed window by window): every frame scored, nothing NaN
    rc, out, err = run(capsys, "detect", corpus["long"], "--labels", "dog", "--threshold", "0.5",
                       "--scores-out", corpus["root"] / "long_scores.tsv", "--checkpoint", corpus["ckpt"], limit=300)  # fmt: skip
    assert rc == 0, err
    vals = np.loadtxt(corpus["root"] / "long_scores.tsv", delimiter="\t", skiprows=1, ndmin=2)
    assert vals[-1, 1] == pytest.approx(1800.0) and _finite(vals)


def test_label_file_that_is_not_utf8(corpus, capsys):
    rc, _, err = run(capsys, "classify", corpus["audio"] / "good.wav", "--labels", f"@{corpus['labels_latin1']}",
                     "--checkpoint", corpus["ckpt"])  # fmt: skip
    assert rc == 2
    one_line_error(err, "classify", "labels_latin1.txt:2: not valid UTF-8 text (byte 0xe9 at column 4)")


# ============================================================================ evaluation, index, synth


def _clips(corpus, names, one_class: str = "a dog barking") -> list[Clip]:
    return [Clip(str(corpus["audio"] / n), events=[Event(one_class, 0.1, 0.4)], captions=[f"{one_class} {i}"],
                 labels=[one_class]) for i, n in enumerate(names)]  # fmt: skip


def _report(out: Path) -> dict:
    res = json.loads(out.read_text(encoding="utf-8"))
    nums = [v for v in res.values() if isinstance(v, float)]
    assert nums and all(math.isfinite(v) for v in nums), res
    return res


def test_eval_one_class_references_and_bad_files(corpus, capsys, tmp_path):
    names = ["good.wav", "naïve café ünï.wav", "with space.flac", "nan.wav", "garbage.wav", "broken_link.wav"]
    man = tmp_path / "one_class.jsonl"
    write_manifest(man, _clips(corpus, names), absolute=True)
    ck = corpus["ckpt"]
    # SED with one event class (PSDS2's cross-trigger term used to crash sed_scores_eval)
    rc, _, err = run(capsys, "eval", "sed", "--checkpoint", ck, "--data", man, "--out", tmp_path / "sed.json", "--no-plots")
    assert rc == 0, err
    res = _report(tmp_path / "sed.json")
    assert set(res["per_class"]) == {"a dog barking"} and 0.0 <= res["PSDS2"] <= 1.0
    assert sorted(Path(s["path"]).name for s in res["skipped"]) == ["broken_link.wav", "garbage.wav", "nan.wav"]
    # the same one-class reference as DCASE TSV + durations
    good = [c for c in _clips(corpus, names[:3])]
    write_strong_tsv(tmp_path / "strong.tsv", {Path(c.audio).name: c.events for c in good})
    write_durations_tsv(tmp_path / "dur.tsv", {"good.wav": 1.5, "naïve café ünï.wav": 1.0, "with space.flac": 1.0})
    rc, _, err = run(capsys, "eval", "sed", "--checkpoint", ck, "--data", tmp_path / "strong.tsv", "--audio-dir", corpus["audio"],
                     "--durations", tmp_path / "dur.tsv", "--out", tmp_path / "sed2.json", "--no-plots")  # fmt: skip
    assert rc == 0, err
    assert _report(tmp_path / "sed2.json")["PSDS2"] == pytest.approx(res["PSDS2"])
    # retrieval and zero-shot over the same files (unreadable ones skipped and listed)
    for task in ("retrieval", "zeroshot"):
        rc, _, err = run(capsys, "eval", task, "--checkpoint", ck, "--data", man, "--out", tmp_path / f"{task}.json", "--no-plots")
        assert rc == 0, (task, err)
        assert len(_report(tmp_path / f"{task}.json")["skipped"]) == 3
    # grounding: one phrase on the readable files
    items = [GroundingItem(str(corpus["audio"] / n), "a dog barking", [GroundingPhrase("a dog barking", [(0.1, 0.4)])])
             for n in names[:3]]  # fmt: skip
    write_grounding_json(tmp_path / "gr.json", items)
    rc, _, err = run(capsys, "eval", "grounding", "--checkpoint", ck, "--data", tmp_path / "gr.json", "--out", tmp_path / "gr_out.json",
                     "--no-plots")  # fmt: skip
    assert rc == 0, err
    _report(tmp_path / "gr_out.json")


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv"])
def test_eval_data_file_that_is_not_utf8(corpus, capsys, tmp_path, fmt):
    good = str(corpus["audio"] / "good.wav")
    body = {
        "jsonl": json.dumps({"audio": good, "events": [{"label": "dog", "onset": 0.1, "offset": 0.4}]}).encode() + b"\n"
                 + json.dumps({"audio": good, "captions": ["x"]}).encode()[:-2] + b', "labels": ["' + LATIN1 + b'"]}\n',
        "tsv": b"filename\tonset\toffset\tevent_label\ngood.wav\t0.1\t0.4\t" + LATIN1 + b"\n",
        "csv": b"filename,fold,target,category\ngood.wav,1,0," + LATIN1 + b"\n",
    }[fmt]
    data = tmp_path / f"data.{fmt}"
    data.write_bytes(body)
    task = {"jsonl": "sed", "tsv": "sed", "csv": "zeroshot"}[fmt]
    rc, _, err = run(capsys, "eval", task, "--checkpoint", corpus["ckpt"], "--data", data, "--audio-dir", corpus["audio"],
                     "--out", tmp_path / "x.json")  # fmt: skip
    assert rc == 2
    one_line_error(err, "eval", f"data.{fmt}:2: not valid UTF-8 text (byte 0xe9")


def test_train_manifest_that_is_not_utf8(corpus, capsys, tmp_path):
    from tinyfactory import tiny_overrides

    man = tmp_path / "train.jsonl"
    good = json.dumps({"audio": str(corpus["audio"] / "good.wav"), "captions": ["a dog"]}).encode()
    man.write_bytes(good + b"\n" + good[:-1] + b', "labels": ["' + LATIN1 + b'"]}\n')
    rc, _, err = run(capsys, "train", "--config", REPO / "configs" / "finelap.yaml", *tiny_overrides(corpus["root"], man, out="train_run"))
    assert rc == 2
    one_line_error(err, "train", "train.jsonl:2: not valid UTF-8 text (byte 0xe9")


def test_index_build_and_search_name_every_bad_file(corpus, capsys, tmp_path):
    idx = tmp_path / "idx"
    rc, out, err = run(capsys, "index", "build", corpus["audio"], "--checkpoint", corpus["ckpt"], "--out", idx, "--frames")
    assert rc == 1, err  # some files failed, the others are indexed
    res = json.loads(out)
    text = json.dumps(res["failed"], ensure_ascii=False)
    for name in BAD:
        assert name in text, (name, res["failed"])
    assert res["total"] == len(ODD)
    check_skipped(err, "index")  # same wording as the other multi-file commands
    # update retries the failed files: still failing, still named, still exit 1
    rc, out, err = run(capsys, "index", "update", idx)
    assert rc == 1, err
    for name, problem in BAD.items():
        assert any(f"finelap index: skipped" in ln and name in ln and problem in ln for ln in err.splitlines()), (name, err)
    rc, out, err = run(capsys, "search", "a dog barking", "--index", idx, "--json")
    assert rc == 0, err
    hits = json.loads(out)
    scores = [h["score"] for h in (hits["results"] if isinstance(hits, dict) else hits)]
    assert scores and _finite(scores)


def test_index_exit_status_follows_the_multi_file_rule(corpus, capsys, tmp_path):
    import shutil

    folder = tmp_path / "sounds"
    folder.mkdir()
    shutil.copy(corpus["audio"] / "garbage.wav", folder / "garbage.wav")
    idx = tmp_path / "idx"
    # nothing could be indexed: exit 2, one error line after the file is named
    rc, _, err = run(capsys, "index", "build", folder, "--checkpoint", corpus["ckpt"], "--out", idx)
    assert rc == 2, err
    assert "finelap index: skipped" in err and "garbage.wav" in err and BAD["garbage.wav"] in err, err
    one_line_error(err, "index", "none of the 1 input files could be processed")
    # one good file next to it: exit 1; then update after the bad one is gone: exit 0
    shutil.copy(corpus["audio"] / "good.wav", folder / "good.wav")
    rc, out, err = run(capsys, "index", "build", folder, "--checkpoint", corpus["ckpt"], "--out", idx)
    assert rc == 1 and json.loads(out)["total"] == 1, err
    assert "1 of 2 files failed" in err, err
    (folder / "garbage.wav").unlink()
    rc, out, err = run(capsys, "index", "update", idx)
    assert rc == 0 and json.loads(out)["failed"] == [], err


def test_synth_with_a_bad_pool(corpus, capsys, tmp_path):
    a = corpus["audio"]
    pool = [Clip(str(a / n), labels=[lab]) for n, lab in
            (("good.wav", "noise"), ("with space.flac", "hiss"), ("six_channels.wav", "noise"), ("empty.wav", "noise"),
             ("nan.wav", "hiss"), ("garbage.wav", "hiss"), ("text.ogg", "noise"), ("broken_link.wav", "noise"))]  # fmt: skip
    write_manifest(tmp_path / "pool.jsonl", pool, absolute=True)
    rc, out, err = run(capsys, "synth", "--pool", tmp_path / "pool.jsonl", "--out", tmp_path / "out", "--splits", "test=2",
                       "--duration", "2", "--workers", "1", "--no-plot", "--max-events", "2")  # fmt: skip
    assert rc == 0, err
    for name in ("empty.wav", "nan.wav", "garbage.wav", "text.ogg", "broken_link.wav"):
        assert name in out + err, (name, out, err)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"audio": "' + LATIN1 + b'.wav", "labels": ["x"]}\n')
    rc, _, err = run(capsys, "synth", "--pool", tmp_path / "latin1.jsonl", "--out", tmp_path / "out2", "--splits", "test=1")
    assert rc == 2
    one_line_error(err, "synth", "latin1.jsonl:1: not valid UTF-8")
