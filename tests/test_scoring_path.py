"""One scoring path, end to end on a tiny trained checkpoint: training calibrates the final
checkpoint and reports what `finelap eval` reports; `detect`, `frame_scores` and `eval sed` give
the same per-frame probabilities; `finelap calibrate` stores settings that every command uses."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finelap.cli import main
from finelap.config import load_run_config
from finelap.data.manifests import read_manifest
from finelap.infer import Pipeline
from finelap.train.loop import train

from tinyfactory import tiny_dataset, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    man = tiny_dataset(tmp / "data", n=8)
    cfg = load_run_config(REPO / "configs" / "finelap.yaml",
                          tiny_overrides(tmp, man, **{"train.max_steps": 2, "data.val": f"[{man}]"}))  # fmt: skip
    return train(cfg, progress=False), man, tmp


def _last_val_row(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/PSDS1")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v != ""}


def test_training_calibrates_the_final_checkpoint_and_reports_what_eval_reports(trained, capsys):
    ckpt, man, tmp = trained
    cal = json.loads((ckpt / "config.json").read_text())["config"]["eval"]["calibration"]
    assert cal is not None and 0 <= cal["threshold"] <= 1 and cal["data"] == str(man) and "event F1" in cal["criterion"]
    assert set(cal["classes"]) == {e.label for c in read_manifest(man) for e in c.events}
    val = _last_val_row(ckpt.parent)
    out = tmp / "ev" / "sed.json"
    assert main(["eval", "sed", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "detection settings:" in err and "calibrated on" in err  # said once, with where from
    res = json.loads(out.read_text())
    for k in ("PSDS1", "PSDS2", "event_F1", "frame_AUROC"):
        assert val[f"val/{k}"] == pytest.approx(res[k], abs=1e-9), k
    assert res["postprocess"]["median_filter_s"] == cal["median_filter_s"]
    out = tmp / "ev" / "zs.json"
    assert main(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(out), "--no-plots"]) == 0
    zs = json.loads(out.read_text())
    assert val["val/top1_accuracy"] == pytest.approx(zs["top1_accuracy"], abs=1e-9) and val["val/mAP"] == pytest.approx(zs["mAP"], abs=1e-9)


def test_detect_frame_scores_and_eval_sed_give_the_same_probabilities(trained, tmp_path):
    ckpt, man, _ = trained
    clip = next(c for c in read_manifest(man) if c.events)
    label = clip.events[0].label
    pipe = Pipeline.from_pretrained(ckpt)
    api = pipe.frame_scores(clip.audio, [label]).scores[:, 0]
    # finelap detect --scores-out
    det_tsv = tmp_path / "det.tsv"
    assert main(["detect", clip.audio, "--labels", label, "--scores-out", str(det_tsv), "--checkpoint", str(ckpt)]) == 0
    with open(det_tsv, newline="") as f:
        det = np.array([float(r[label]) for r in csv.DictReader(f, delimiter="\t")])
    # finelap eval sed: the per-file score tables of the report
    out = tmp_path / "sed.json"
    labels = sorted({e.label for c in read_manifest(man) for e in c.events})  # 2+ classes (PSDS2 needs cross-triggers)
    assert main(["eval", "sed", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(out), "--no-plots",
                 "--labels", ";".join(labels)]) == 0  # fmt: skip
    with open(tmp_path / "sed_scores" / f"{clip.key}.tsv", newline="") as f:
        ev = np.array([float(r[label]) for r in csv.DictReader(f, delimiter="\t")])
    n = len(det)
    assert n == len(ev) and n >= len(api) - 1  # frames past the end of the audio are dropped from the tables
    np.testing.assert_allclose(det, api[:n], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ev, api[:n], rtol=1e-6, atol=1e-7)
    # ground of the label as a phrase: the same prompt, the same probabilities
    np.testing.assert_allclose(pipe.frame_scores(clip.audio, [label.replace(" ", "_")]).scores[:, 0], api, rtol=1e-6)


def test_calibrate_command_stores_settings_that_detect_uses(trained, tmp_path, capsys):
    ckpt, man, _ = trained
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(out), "--min-class-events", "1"]) == 0
    printed = capsys.readouterr().out
    assert "micro event F1" in printed
    rec = json.loads((out / "config.json").read_text())["config"]["eval"]["calibration"]
    assert set(rec["class_thresholds"]) == set(rec["classes"])  # every class has >= 1 event
    pipe = Pipeline.from_pretrained(out)
    label = rec["classes"][0]
    st = pipe.detection_settings([label, "a violin playing"], announce=False)
    assert st.source == "calibration" and st.uncalibrated_queries == ["a violin playing"]
    assert st.postprocess.threshold == {label: rec["class_thresholds"][label], "*": rec["threshold"]}
    # an older checkpoint (config.json without eval.calibration) loads with today's defaults, and
    # recalibrating does not change the embedder id (search indexes stay valid)
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    meta = json.loads((old / "config.json").read_text())
    del meta["config"]["eval"]["calibration"], meta["config"]["eval"]["calibrate_after_training"]
    (old / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    old_pipe = Pipeline.from_pretrained(old)
    assert old_pipe.detection_settings([label], announce=False).source == "defaults"
    before = old_pipe.embedder_id
    assert main(["calibrate", "--checkpoint", str(old), "--data", str(man)]) == 0
    assert Pipeline.from_pretrained(old).detection_settings([label], announce=False).source == "calibration"
    assert Pipeline.from_pretrained(old).embedder_id == before
    # the detect command says which settings it used, once, and where they come from
    capsys.readouterr()
    assert main(["detect", str(man.parent / "clip000.wav"), "--labels", f"{label};a violin playing", "--checkpoint", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("detection settings:") == 1 and "calibrated on" in err and "'a violin playing'" in err


def test_nothing_above_the_threshold_says_the_peak_and_what_to_pass(trained, capsys):
    ckpt, man, _ = trained
    wav = str(man.parent / "clip000.wav")
    assert main(["ground", wav, "a dog barking", "--threshold", "1.0", "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "no segment: the highest probability" in out and "under the threshold 1" in out and "highest probability" in out and "try --threshold" in out
    assert main(["detect", wav, "--labels", "a dog barking", "--threshold", "1.0", "--checkpoint", str(ckpt)]) == 0
    assert "try --threshold" in capsys.readouterr().out
    pipe = Pipeline.from_pretrained(ckpt)
    peak = float(pipe.frame_scores(wav, ["a dog barking"]).scores.max())
    assert pipe.ground(wav, "a dog barking", threshold=1.0) == []
    err = capsys.readouterr().err
    assert f"the highest probability was {peak:.3g}" in err and "pass threshold=" in err


def test_calibrate_user_errors_are_one_line_before_the_model_loads(trained, tmp_path, capsys, monkeypatch):
    ckpt, man, _ = trained
    import finelap.infer as infer

    def no_model(*a, **k):
        raise AssertionError("the model must not load for a data error")

    monkeypatch.setattr(infer.Pipeline, "from_pretrained", no_model)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    captions_only = tmp_path / "caps.jsonl"
    captions_only.write_text(json.dumps({"audio": str(man.parent / "clip001.wav"), "captions": ["a cat"]}) + "\n")
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(captions_only)]) == 2
    assert "strong labels" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(man.parent)]) == 2
    assert "already exists" in capsys.readouterr().err
