"""`finelap eval`, `finelap index` and `finelap search` end to end on a tiny trained checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finelap.cli import main
from finelap.config import load_run_config
from finelap.data.manifests import (GroundingItem, GroundingPhrase, read_manifest, write_durations_tsv, write_esc50_csv,
                                    write_grounding_json, write_strong_tsv)
from finelap.eval.tasks import make_prompt
from finelap.infer import Pipeline
from finelap.train.loop import train

from _figures import assert_png_picture
from tinyfactory import tiny_dataset, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    man = tiny_dataset(tmp / "data", n=8)
    cfg = load_run_config(REPO / "configs" / "finelap.yaml", tiny_overrides(tmp, man, **{"train.max_steps": 2}))
    return train(cfg, progress=False), man, tmp


def test_eval_sed_from_manifest_and_dcase_tsv(trained, capsys):
    ckpt, man, tmp = trained
    out = tmp / "sed" / "sed.json"
    assert main(["eval", "sed", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(out), "--no-plots"]) == 0
    res = json.loads(out.read_text())
    for key in ("PSDS1", "PSDS2", "event_F1", "segment_F1", "frame_AUROC", "prompt_template"):
        assert key in res, key
    assert out.with_suffix(".md").exists()
    # the same data as DCASE TSV + durations + audio dir gives the same numbers
    clips = read_manifest(man)  # caption-only clips are files without events (negatives)
    write_strong_tsv(tmp / "strong.tsv", {Path(c.audio).name: c.events for c in clips})
    write_durations_tsv(tmp / "dur.tsv", {Path(c.audio).name: c.duration for c in clips})
    out2 = tmp / "sed2.json"
    assert main(["eval", "sed", "--checkpoint", str(ckpt), "--data", str(tmp / "strong.tsv"), "--audio-dir", str(man.parent),
                 "--durations", str(tmp / "dur.tsv"), "--out", str(out2), "--no-plots"]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["PSDS1"] == pytest.approx(res["PSDS1"]) and res2["frame_AUROC"] == pytest.approx(res["frame_AUROC"])


def test_eval_zeroshot_csv_retrieval_grounding(trained, saved_figures):
    ckpt, man, tmp = trained
    clips = read_manifest(man)
    for i, c in enumerate(clips):
        c.meta.update({"fold": 1 + i % 2, "target": 0})
    write_esc50_csv(tmp / "meta.csv", clips, audio_dir=man.parent)
    out = tmp / "zs.json"
    assert main(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(tmp / "meta.csv"), "--audio-dir", str(man.parent),
                 "--folds", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # the checkpoint's own embeddings of the fold-2 clips and label prompts, scored here by hand
    test = [c for c in clips if c.meta["fold"] == 2]
    labels = sorted({c.labels[0] for c in test})
    pipe = Pipeline.from_pretrained(ckpt)
    sims = pipe.embed_audio([c.audio for c in test]) @ pipe.embed_text([make_prompt(pipe.prompt_template, l) for l in labels]).T
    truth, pred = np.array([labels.index(c.labels[0]) for c in test]), sims.argmax(axis=1)
    right = [bool((sims[i, t] > np.delete(sims[i], t)).all()) for i, t in enumerate(truth)]  # a tie is a miss
    assert res["labels"] == labels and res["n_items"] == 4 and res["top1_accuracy"] == pytest.approx(np.mean(right))
    cm = np.zeros((len(labels), len(labels)), int)
    np.add.at(cm, (truth, pred), 1)
    assert res["confusion_matrix"] == cm.tolist()
    assert_png_picture(tmp / "zs_confusion.png")
    (confusion,) = [f for f in saved_figures if f.axes[0].get_xlabel() == "predicted class"]
    np.testing.assert_allclose(confusion.axes[0].images[0].get_array(), cm / cm.sum(axis=1, keepdims=True))
    out = tmp / "ret.json"
    assert main(["eval", "retrieval", "--checkpoint", str(ckpt), "--data", str(man), "--out", str(out), "--no-plots"]) == 0
    assert "text_to_audio_R@1" in json.loads(out.read_text())
    items = [GroundingItem(Path(c.audio).name, c.events[0].label, [GroundingPhrase(c.events[0].label, [(c.events[0].onset, c.events[0].offset)])],
                           duration=c.duration) for c in clips if c.events]
    write_grounding_json(tmp / "gr.json", items)
    out = tmp / "gr_out.json"
    assert main(["eval", "grounding", "--checkpoint", str(ckpt), "--data", str(tmp / "gr.json"), "--audio-dir", str(man.parent),
                 "--out", str(out), "--no-plots"]) == 0
    assert "grounding_PSDS" in json.loads(out.read_text())


def test_eval_bad_input_one_line_errors(trained, tmp_path, capsys):
    ckpt, man, _ = trained
    assert main(["eval", "sed", "--checkpoint", str(tmp_path / "nope"), "--data", str(man), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint directory does not exist" in err[0]
    assert main(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(man), "--labels", "", "--out", str(tmp_path / "y.json")]) == 2


def test_index_build_and_search(trained, tmp_path, capsys):
    ckpt, man, _ = trained
    idx = tmp_path / "idx"
    assert main(["index", "build", str(man.parent), "--checkpoint", str(ckpt), "--out", str(idx), "--frames"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["added"] == 8
    assert main(["index", "build", str(man.parent), "--checkpoint", str(ckpt), "--out", str(idx), "--frames"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] == 8
    assert main(["search", "a dog barking", "--index", str(idx), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["onset"] is not None and h["offset"] > h["onset"] for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
