"""Reports (finelap.eval.report) and figures (finelap.eval.plots): strict, stable JSON; Markdown
that lists metrics, template and skipped files; figures that draw the numbers they were given
(read from the saved matplotlib figures) into PNGs that decode to real pictures; score/detection
files that the standard readers load back."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from finelap.audio import LogMel, MelConfig, Timeline, audio_duration
from finelap.data.manifests import GroundingItem, GroundingPhrase, read_strong_tsv
from finelap.data.types import Clip, Event
from finelap.errors import DataFormatError
from finelap.eval import plots as P
from finelap.eval.report import to_jsonable, write_report
from finelap.eval.tasks import Evaluatable, FrameScores, PostProcess, evaluate_grounding, evaluate_sed, evaluate_zeroshot

from _figures import assert_png_picture, axes_titled, lane_spans, score_curves, texts, tick_labels


def _tone(path: Path, seconds: float = 2.0, sr: int = 16000, f0: float = 880.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * f0 * t) * (t > seconds / 3) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    sf.write(str(path), x.astype(np.float32), sr)
    return str(path)


def _strict_load(path: Path) -> dict:
    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=no_constants)


# ----------------------------------------------------------------------------- fixtures: small results


def _zeroshot_result(tmp_path: Path) -> dict:
    labels = ["dog", "rain", "siren"]
    clips = [Clip(audio=_tone(tmp_path / f"{l}{j}.wav", 0.3), labels=[l]) for l in labels for j in range(2)]
    clips.append(Clip(audio=str(tmp_path / "missing.wav"), labels=["dog"]))
    truth = {c.audio: labels.index(c.labels[0]) for c in clips}

    def embed_audio(paths):
        for p in paths:
            audio_duration(p)
        return np.eye(3)[[truth[p] for p in paths]]

    fns = Evaluatable(embed_audio=embed_audio, embed_text=lambda ts: np.eye(3)[[labels.index(t.split()[-1]) for t in ts]])
    return evaluate_zeroshot(fns, clips)


def _sed_setup(tmp_path: Path):
    clips = [
        Clip(audio=_tone(tmp_path / "a.wav"), events=[Event("beep", 0.7, 2.0)], duration=2.0),
        Clip(audio=_tone(tmp_path / "b.wav"), events=[Event("beep", 0.7, 2.0), Event("hum", 0.0, 0.5)], duration=2.0),
    ]
    ev = {c.audio: c.events for c in clips}

    def frame_scores(path, texts):
        audio_duration(path)
        tl = Timeline(25.0)
        y = tl.rasterize([(e.label, e.onset, e.offset) for e in ev[path]], [t.split()[-1] for t in texts], tl.num_frames(2.0))
        return FrameScores(0.1 + 0.8 * y, tl, 2.0)

    return clips, Evaluatable(frame_scores=frame_scores, name="oracle")


# ----------------------------------------------------------------------------- report


def test_zeroshot_report_files_json_and_markdown(tmp_path, saved_figures):
    r = _zeroshot_result(tmp_path / "audio")
    r["made_up_undefined_metric"] = float("nan")  # must become null, not NaN
    cfg = {"preset": "finelap", "eval": {"prompt_template": "the sound of {}"}, "lr": np.float32(1e-3)}
    paths = write_report(r, tmp_path / "out" / "zs.json", cfg, {"checkpoint": "ckpt/final"})
    assert set(paths) == {"json", "md", "confusion", "per_class_ap"}
    for k in ("confusion", "per_class_ap"):
        assert paths[k].name == f"zs_{k}.png"
        assert_png_picture(paths[k])
    # the figures show this result: its confusion matrix (2 clips per class, all right) and its APs
    confusion, ap = saved_figures
    (image,) = confusion.axes[0].images
    np.testing.assert_array_equal(image.get_array(), np.eye(3))
    assert tick_labels(confusion.axes[0]) == ["dog", "rain", "siren"] and texts(confusion.axes[0]) == ["2", "2", "2"]
    assert "top-1 accuracy 1.000, 6 clips" in confusion.axes[0].get_title()
    assert [b.get_width() for b in ap.axes[0].patches] == [1.0, 1.0, 1.0]
    doc = _strict_load(paths["json"])
    assert doc["task"] == "zeroshot" and doc["top1_accuracy"] == 1.0 and doc["top5_accuracy"] == 1.0 and doc["mAP"] == 1.0
    assert doc["prompt_template"] == "the sound of {}"
    assert doc["checkpoint_config"]["preset"] == "finelap" and doc["checkpoint_config"]["lr"] == pytest.approx(1e-3)
    assert doc["made_up_undefined_metric"] is None
    assert doc["skipped"] == [{"path": str(tmp_path / "audio" / "missing.wav"), "error": "file not found"}]
    assert doc["files"] == {"confusion": "zs_confusion.png", "per_class_ap": "zs_per_class_ap.png"}
    assert "artifacts" not in doc and doc["extra"] == {"checkpoint": "ckpt/final"}
    md = paths["md"].read_text()
    assert "| top1_accuracy | 1.0000 |" in md and "`the sound of {}`" in md
    assert "](zs_confusion.png)" in md and "](zs_per_class_ap.png)" in md
    assert "missing.wav" in md and "file not found" in md and "ckpt/final" in md


def test_report_json_is_stable(tmp_path):
    r = _zeroshot_result(tmp_path / "audio")
    a = write_report(r, tmp_path / "one" / "OUT.json", {"x": 1}, plots=False)
    b = write_report(r, tmp_path / "two" / "OUT.json", {"x": 1}, plots=False)
    assert a["json"].read_bytes() == b["json"].read_bytes()
    assert a["md"].read_bytes() == b["md"].read_bytes()
    assert set(a) == {"json", "md"}  # plots=False: no PNG


def test_sed_report_writes_scores_detections_and_timelines(tmp_path, saved_figures):
    clips, fns = _sed_setup(tmp_path)
    r = evaluate_sed(fns, clips, postprocess=PostProcess(median_filter_s=0.1))
    paths = write_report(r, tmp_path / "rep" / "sed.json")
    assert {"json", "md", "psd_roc", "timeline_0", "timeline_1", "detections", "scores"} <= set(paths)
    assert_png_picture(paths["psd_roc"])
    assert_png_picture(paths["timeline_0"])
    roc = axes_titled(saved_figures[0], "PSD-ROC (")
    assert [ln.get_label() for ln in roc.get_lines()] == list(r["artifacts"]["psd_roc"])
    assert all(ln.get_ydata()[-1] == 1.0 for ln in roc.get_lines())  # the oracle finds every event
    # the example timeline of b.wav: its scores as evaluated, its two reference events in the lanes
    (timeline,) = [f for f in saved_figures if f.axes[0].get_title() == "b.wav: SED scores (oracle)"]
    (ex,) = [e for e in r["artifacts"]["examples"] if e["audio"].endswith("b.wav")]
    for label, (on, off) in (("beep", (0.7, 2.0)), ("hum", (0.0, 0.5))):
        np.testing.assert_allclose(score_curves(timeline)[label], ex["scores"][:, ex["queries"].index(label)])
        np.testing.assert_allclose(lane_spans(timeline, f"reference: {label}"), [(on, off)])
    doc = _strict_load(paths["json"])
    for k in ("PSDS1", "PSDS2", "event_F1", "segment_F1", "frame_AUROC"):
        assert k in doc
    assert doc["event_F1"] == 1.0 and doc["n_detections"] == 3 and "detections" not in doc
    assert doc["postprocess"]["median_filter_s"] == 0.1
    # detections: a DCASE strong-label TSV the project's own reader loads back
    back = read_strong_tsv(paths["detections"])
    got = sorted((f, e.onset, e.offset, e.label) for f, evs in back.items() for e in evs)
    assert got == sorted((d["filename"], d["onset"], d["offset"], d["event_label"]) for d in r["detections"])
    # scores: sed_scores_eval's own reader gives back the evaluated DataFrames
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        from sed_scores_eval.base_modules.io import read_sed_scores
    for key, df in r["artifacts"]["scores"].items():
        back_df = read_sed_scores(str(paths["scores"] / f"{key}.tsv"))
        assert list(back_df.columns) == list(df.columns)
        np.testing.assert_allclose(back_df.to_numpy(dtype=float), df.to_numpy(dtype=float), rtol=0, atol=1e-12)


def test_example_timelines_read_a_long_file_window_by_window(tmp_path, monkeypatch):
    """The report's timeline of a 10-min file computes its spectrogram from spans of the file: the
    whole file is never decoded at once (a 30-min file took ~1 GB that way)."""
    import finelap.audio
    import finelap.streaming
    from finelap.eval.report import _plot_examples

    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", 8000, 1, subtype="PCM_16") as f:
        for _ in range(10):
            f.write(np.zeros(8000 * 60, np.int16))
    spans: list[float | None] = []

    def recording(original):
        def load(p, sr, *a, **kw):
            spans.append(kw.get("duration_s"))
            return original(p, sr, *a, **kw)
        return load

    for mod in (finelap.audio, finelap.streaming):
        monkeypatch.setattr(mod, "load_audio", recording(mod.load_audio))
    n = 600 * 25
    ex = {"audio": str(path), "scores": np.zeros((n, 1), np.float32), "timeline": Timeline(25.0), "queries": ["dog"],
          "duration_s": 600.0, "detections": [[]], "ground_truth": [[(1.0, 2.0)]], "threshold": [0.5]}  # fmt: skip
    out = _plot_examples([ex], tmp_path / "rep", 16000)
    assert_png_picture(out["timeline_0"])
    assert spans and all(d is not None and d <= 120 for d in spans), spans


def test_grounding_report_and_missing_example_audio(tmp_path):
    item = GroundingItem(audio=_tone(tmp_path / "g.wav"), caption="a beep", duration=2.0,
                         phrases=[GroundingPhrase("a beep", [(0.7, 2.0)]), GroundingPhrase("a cat", [])])  # fmt: skip

    def frame_scores(path, texts):
        tl = Timeline(25.0)
        y = tl.rasterize([("a beep", 0.7, 2.0)], list(texts), tl.num_frames(2.0))
        return FrameScores(y, tl, 2.0)

    r = evaluate_grounding(Evaluatable(frame_scores=frame_scores, prompt_template="{}"), [item])  # phrases as given
    assert r["grounding_event_F1"] == 1.0
    r["artifacts"]["examples"].append(dict(r["artifacts"]["examples"][0], audio=str(tmp_path / "deleted.wav")))
    paths = write_report(r, tmp_path / "g.json")
    assert "timeline_0" in paths and "timeline_1" not in paths  # unreadable example: no plot, no crash
    doc = _strict_load(paths["json"])
    assert doc["grounding_PSDS"] > 0.99 and doc["grounding_frame_AUROC"] == 1.0
    lines = paths["detections"].read_text().splitlines()
    # 0.7 s is mid-frame at 25 Hz; the half-covered frame (0.68-0.72 s) counts as positive
    assert lines == ["filename\tonset\toffset\tevent_label\titem", "g.wav\t0.68\t2.0\ta beep\t0"]


def test_to_jsonable():
    obj = {"a": np.float32(0.5), "b": [np.int64(3), (1, 2)], "c": float("inf"), "d": np.array([1.0, np.nan]),
           "e": Path("x/y"), 5: {"f": np.bool_(True)}, "g": torch.tensor(2.5)}  # fmt: skip
    assert to_jsonable(obj) == {"a": 0.5, "b": [3, [1, 2]], "c": None, "d": [1.0, None], "e": "x/y", "5": {"f": True}, "g": 2.5}
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})


# ----------------------------------------------------------------------------- plots


def test_plot_timeline_from_wave_and_from_mel(tmp_path, saved_figures):
    sr = 16000
    wave = sf.read(_tone(tmp_path / "t.wav", 3.0))[0].astype(np.float32)
    tl = Timeline(25.0)
    s = np.clip(np.random.default_rng(0).random((75, 2)), 0, 1)
    p = P.plot_timeline(wave, s, tl, ["beep", "a much longer query about a hum"], tmp_path / "w.png", sample_rate=sr,
                        detections=[[(1.0, 3.0)], []], ground_truth=[[(1.0, 3.0)], [(0.0, 0.5)]], threshold=0.5,
                        title="wave input")  # fmt: skip
    assert_png_picture(p)
    fig = saved_figures[-1]
    spec, curves, lanes = fig.axes[:3]
    assert spec.get_title() == "wave input" and spec.get_xlim() == pytest.approx((0.0, 3.0))
    assert spec.images[0].get_extent()[:2] == pytest.approx((0.0, 3.0), abs=0.02)  # the spectrogram spans the audio
    drawn = score_curves(fig)
    np.testing.assert_allclose(np.stack([drawn["beep"], drawn["a much longer query about a hum"]], axis=1), s)  # as given
    hum = "a much longer query about a hum"
    for label, span in (("detected: beep", (1.0, 3.0)), ("reference: beep", (1.0, 3.0)), (f"reference: {hum}", (0.0, 0.5))):
        np.testing.assert_allclose(lane_spans(fig, label), [span])
    assert lane_spans(fig, f"detected: {hum}").size == 0
    assert [ln.get_ydata()[0] for ln in curves.get_lines() if ln.get_linestyle() == "--"] == [0.5]
    assert tick_labels(lanes) == ["a much longer query abo…", "beep"]  # first query on top, long names shortened
    cfg = MelConfig()
    mel = LogMel(cfg)(torch.from_numpy(wave)).numpy()
    p = P.plot_timeline(mel, s[:, :1], tl, ["beep"], tmp_path / "m.png", audio_timeline=Timeline.from_mel(cfg), mel_config=cfg)
    assert_png_picture(p)
    spec = saved_figures[-1].axes[0]
    np.testing.assert_array_equal(spec.images[0].get_array(), mel)  # the given mel, drawn as is
    assert spec.get_ylabel() == "frequency (Hz)" and "1k" in tick_labels(spec)
    with pytest.raises(ValueError, match="audio_timeline"):
        P.plot_timeline(mel, s[:, :1], tl, ["beep"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        P.plot_timeline(wave, s, tl, ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one list of segments per query"):
        P.plot_timeline(wave, s, tl, ["a", "b"], tmp_path / "x.png", detections=[[]])


def test_display_mel_matches_logmel_and_pools_long_audio():
    sr = 16000
    x = (0.1 * np.random.default_rng(1).standard_normal(sr * 70)).astype(np.float32)  # > one 60 s chunk
    cfg = MelConfig(sample_rate=sr, compute_dtype="float32")
    ref = LogMel(cfg)(torch.from_numpy(x)).numpy()
    db, tl, _ = P.display_mel(x, sr, max_columns=10**6)
    assert db.shape == ref.shape and tl.frame_rate_hz == 100.0
    # chunks are exact away from the chunk seam (one frame each side sees zero padding)
    close = np.isclose(db, ref, atol=1e-3).all(axis=0)
    assert close.sum() >= ref.shape[1] - 4
    pooled, tl2, _ = P.display_mel(x, sr, max_columns=500)
    assert pooled.shape[1] <= 500 and tl2.frame_edges(pooled.shape[1])[-1] == pytest.approx(70.0, abs=2 * tl2.hop_s)
    np.testing.assert_allclose(pooled[:, 0], ref[:, : round(100 / tl2.frame_rate_hz)].mean(axis=1), atol=1e-3)


def test_similarity_heatmap_confusion_ap_psd_roc(tmp_path, saved_figures):
    wave = sf.read(_tone(tmp_path / "t.wav", 2.0))[0].astype(np.float32)
    sims = np.random.default_rng(0).random((50, 3))
    assert_png_picture(P.plot_similarity_heatmap(wave, sims, Timeline(25.0), ["a", "b", "c"], tmp_path / "h.png"))
    heat = saved_figures[-1].axes[1]
    (mesh,) = heat.collections
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 50), sims.T)  # one row per text, first on top
    assert tick_labels(heat) == ["a", "b", "c"] and heat.get_ylim() == (2.5, -0.5)
    np.testing.assert_allclose(mesh.get_coordinates()[0, [0, -1], 0], [0.0, 2.0])  # 50 frames at 25 Hz
    assert_png_picture(P.plot_confusion([[3, 1], [0, 4]], ["dog", "cat"], tmp_path / "c.png"))
    ax = saved_figures[-1].axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])  # row-normalised
    assert texts(ax) == ["3", "1", "4"] and tick_labels(ax, "x") == tick_labels(ax) == ["dog", "cat"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class") and "accuracy 0.875, 8 clips" in ax.get_title()
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        P.plot_confusion([[3, 1], [0, 4]], ["a", "b", "c"], tmp_path / "c.png")
    assert_png_picture(P.plot_per_class_ap([0.2, None, 0.9], ["a", "b", "c"], tmp_path / "ap.png"))
    ax = saved_figures[-1].axes[0]
    bars = sorted(ax.patches, key=lambda b: -b.get_y())  # top to bottom: best first, undefined last
    assert [b.get_width() for b in bars] == [0.9, 0.2, 0.0] and tick_labels(ax) == ["c", "a", "b"]
    assert sorted(texts(ax)) == ["0.20", "0.90", "n/a"] and ax.get_legend().get_texts()[0].get_text() == "mAP = 0.550"
    curves = {"PSDS1": (np.array([0.0, 20.0, 60.0, np.inf]), np.array([0.2, 0.5, 0.8, 0.9]))}
    assert_png_picture(P.plot_psd_roc(curves, tmp_path / "roc.png"))
    ax = saved_figures[-1].axes[0]
    (line,) = ax.get_lines()
    assert line.get_label() == "PSDS1" and line.get_drawstyle() == "steps-post" and ax.get_xlim() == (0.0, 100.0)
    # the non-finite point is dropped; the last step reaches the end of the integrated range
    np.testing.assert_allclose(line.get_xdata(), [0.0, 20.0, 60.0, 100.0])
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.5, 0.8, 0.8])


def test_comparison_bars(tmp_path, saved_figures):
    res = {"clap": {"top1": 0.3, "psds": None}, "finelap": {"top1": 0.25, "psds": 0.12}, "flam": {"top1": float("nan")}}
    assert_png_picture(P.plot_comparison(res, [("top1", "zero-shot top-1"), ("psds", "PSDS1")], tmp_path / "cmp.png"))
    ax = saved_figures[-1].axes[0]
    bars = sorted(ax.patches, key=lambda b: b.get_x())  # metric groups left to right, models in order within
    np.testing.assert_allclose([b.get_height() for b in bars], [0.3, 0.25, 0.0, 0.0, 0.12, 0.0])  # missing = 0 ...
    assert [t for t in texts(ax) if t == "n/a"] == ["n/a"] * 3  # ... and labelled "n/a"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clap", "finelap", "flam"]
    assert tick_labels(ax, "x") == ["zero-shot\ntop-1", "PSDS1"]
    with pytest.raises(ValueError, match="at least one"):
        P.plot_comparison({}, [("top1", "top-1")], tmp_path / "x.png")


def test_training_curves(tmp_path, saved_figures):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "step,lr,train/clip/sigmoid,train/loss,grad_norm,val/top1_accuracy\n"
        "1,0.001,2.0,2.5,1.0,\n2,0.0009,1.5,1.9,0.8,\n2,,,,,0.25\n4,0.0005,1.0,1.2,0.5,\n4,,,,,0.5\n"
    )
    assert_png_picture(P.plot_training_curves(csv_path, tmp_path / "curves.png"))
    fig = saved_figures[-1]
    for title, want in (("total loss", [2.5, 1.9, 1.2]), ("clip loss", [2.0, 1.5, 1.0]), ("learning rate", [0.001, 0.0009, 0.0005]),
                        ("validation metrics", [0.25, 0.5])):  # fmt: skip
        (line,) = axes_titled(fig, title).get_lines()
        np.testing.assert_allclose(line.get_ydata(), want)
        np.testing.assert_allclose(line.get_xdata(), [1, 2, 4] if len(want) == 3 else [2, 4])
    bad = tmp_path / "bad.csv"
    bad.write_text("iteration,loss\n1,2\n")
    with pytest.raises(DataFormatError, match="'step' column"):
        P.plot_training_curves(bad, tmp_path / "x.png")
    with pytest.raises(DataFormatError, match="not found"):
        P.plot_training_curves(tmp_path / "nope.csv", tmp_path / "x.png")


def test_sed_report_states_the_psds_protocol_and_explains_a_zero(tmp_path):
    clips, fns = _sed_setup(tmp_path)
    inner = fns.frame_scores

    def half_wrong(path, texts):  # "hum" scored backwards: its PSDS is 0, "beep" is perfect
        fs = inner(path, texts)
        s = fs.scores.copy()
        k = [t.split()[-1] for t in texts].index("hum")
        s[:, k] = 1.0 - s[:, k]
        return FrameScores(s, fs.timeline, 2.0)

    r = evaluate_sed(Evaluatable(frame_scores=half_wrong, name="half"), clips, postprocess=PostProcess(median_filter_s=0.12))
    paths = write_report(r, tmp_path / "rep" / "sed.json", plots=False)
    doc = _strict_load(paths["json"])
    assert set(doc["psds"]) == {"PSDS1", "PSDS2", "PSDS1_raw", "PSDS2_raw"}
    b = doc["psds"]["PSDS1"]
    assert b["params"]["alpha_st"] == 1.0 and b["per_class"]["hum"] == 0.0 and b["per_class"]["beep"] > 0.9
    assert doc["PSDS1"] == 0.0 and b["alpha_st0"] > 0.4 and "spread" in b["note"]
    md = paths["md"].read_text()
    assert "## PSDS (DCASE, sed_scores_eval)" in md and "median-filtered over 0.12 s" in md and b["note"] in md
    assert "| PSDS1_raw |" in md
    # the filtered score tables reproduce the reported PSDS1 with a direct call
    from finelap.eval import metrics as M

    M._sse()
    from sed_scores_eval.base_modules.io import read_sed_scores

    filt = {p.stem: read_sed_scores(p) for p in (tmp_path / "rep" / "sed_scores_filtered").glob("*.tsv")}
    gt = {Path(c.audio).stem: [(e.onset, e.offset, e.label) for e in c.events] for c in clips}
    assert set(filt) == set(gt)
    assert M.psds1(filt, gt, {k: 2.0 for k in gt}).value == pytest.approx(doc["PSDS1"], abs=1e-9)
