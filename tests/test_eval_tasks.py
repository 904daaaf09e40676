"""Evaluators (finelap.eval.tasks) driven by FAKE model functions whose right answers are known:
oracle embedders/frame scorers must score perfectly, deliberately wrong ones must score exactly
as badly as hand-counted, an honest imperfect model on real ESC-50 clips scores exactly what
numpy/scikit-learn compute, post-processing is in seconds (frame-rate independent), and
unreadable files are skipped and reported."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from finelap.audio import Timeline, audio_duration
from finelap.data.manifests import GroundingItem, GroundingPhrase, read_esc50_csv
from finelap.data.types import Clip, Event
from finelap.errors import FinelapError
from finelap.eval import metrics as M
from finelap.eval.tasks import (
    TASKS,
    Evaluatable,
    FrameScores,
    PostProcess,
    evaluate_grounding,
    evaluate_retrieval,
    evaluate_sed,
    evaluate_zeroshot,
    make_prompt,
)

TEMPLATE = "the sound of {}"


def _wav(path, seconds: float = 0.2, sr: int = 8000) -> str:
    sf.write(str(path), (0.01 * np.random.default_rng(0).standard_normal(int(seconds * sr))).astype(np.float32), sr)
    return str(path)


def _onehot(i: int, d: int) -> np.ndarray:
    v = np.zeros(d, dtype=np.float32)
    v[i] = 1.0
    return v


# ============================================================================ zero-shot


def _zs_setup(tmp_path, n_classes=8, per_class=2):
    labels = [f"class_{k}" for k in range(n_classes)]
    clips = []
    for k, lab in enumerate(labels):
        for j in range(per_class):
            clips.append(Clip(audio=_wav(tmp_path / f"{lab}_{j}.wav"), labels=[lab]))
    return labels, clips


def _zs_fns(labels, label_of, template=TEMPLATE, calls=None):
    """Audio -> one-hot of label_of(path); prompt -> one-hot of its label. Reading the header makes
    missing/corrupt files raise AudioError as a real model's loader would."""
    d = len(labels)
    prompt_to_label = {make_prompt(template, l): l for l in labels}

    def embed_audio(paths):
        if calls is not None:
            calls.append(len(paths))
        for p in paths:
            audio_duration(p)
        return np.stack([_onehot(labels.index(label_of(p)), d) for p in paths])

    def embed_text(texts):
        return np.stack([_onehot(labels.index(prompt_to_label[t]), d) for t in texts])

    return Evaluatable(embed_audio=embed_audio, embed_text=embed_text, prompt_template=template, name="oracle")


def test_zeroshot_oracle_is_perfect(tmp_path):
    labels, clips = _zs_setup(tmp_path)
    truth = {c.audio: c.labels[0] for c in clips}
    r = evaluate_zeroshot(_zs_fns(labels, truth.__getitem__), clips)
    assert r["task"] == "zeroshot" and r["n_items"] == 16 and r["labels"] == labels
    assert r["top1_accuracy"] == 1.0 and r["top5_accuracy"] == 1.0 and r["mAP"] == 1.0
    assert r["prompt_template"] == TEMPLATE and r["skipped"] == []
    assert np.array_equal(np.array(r["confusion_matrix"]), 2 * np.eye(8, dtype=int))
    assert r["per_class_AP"] == {l: 1.0 for l in labels}


def test_zeroshot_wrong_and_half_wrong_embedders(tmp_path):
    labels, clips = _zs_setup(tmp_path)
    truth = {c.audio: c.labels[0] for c in clips}
    shift = lambda p: labels[(labels.index(truth[p]) + 1) % len(labels)]  # noqa: E731
    r = evaluate_zeroshot(_zs_fns(labels, shift), clips)
    # every clip looks like the next class: its true class ties with 6 others at 0 (pessimistic
    # rank 8 of 8), so not even top-5
    assert r["top1_accuracy"] == 0.0 and r["top5_accuracy"] == 0.0
    cm = np.array(r["confusion_matrix"])
    assert all(cm[k, (k + 1) % 8] == 2 for k in range(8)) and cm.sum() == 16
    # clips "_0" right, clips "_1" wrong: exactly half
    half = lambda p: truth[p] if p.endswith("_0.wav") else shift(p)  # noqa: E731
    r = evaluate_zeroshot(_zs_fns(labels, half), clips)
    assert r["top1_accuracy"] == 0.5


def test_zeroshot_prompts_use_template_and_underscores(tmp_path):
    seen = []
    labels, clips = _zs_setup(tmp_path, n_classes=3, per_class=1)
    fns = _zs_fns(labels, {c.audio: c.labels[0] for c in clips}.__getitem__, template="a recording of {}.")
    inner = fns.embed_text
    fns.embed_text = lambda texts: (seen.extend(texts), inner(texts))[1]
    r = evaluate_zeroshot(fns, clips, template="a recording of {}.")
    assert seen == ["a recording of class 0.", "a recording of class 1.", "a recording of class 2."]
    assert r["prompt_template"] == "a recording of {}."
    with pytest.raises(FinelapError, match="exactly once"):
        evaluate_zeroshot(fns, clips, template="no placeholder")


def test_zeroshot_skips_missing_and_corrupt_files(tmp_path):
    labels, clips = _zs_setup(tmp_path, n_classes=4, per_class=2)
    truth = {c.audio: c.labels[0] for c in clips}
    missing = str(tmp_path / "gone.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF-not-really-a-wave" * 10)
    truth[missing] = truth[str(corrupt)] = "class_0"
    bad = [Clip(audio=missing, labels=["class_0"]), Clip(audio=str(corrupt), labels=["class_0"])]
    calls: list[int] = []
    fns = _zs_fns(labels, truth.__getitem__, calls=calls)
    r = evaluate_zeroshot(fns, clips[:3] + bad + clips[3:], batch_size=4)
    assert [s["path"] for s in r["skipped"]] == [missing, str(corrupt)]
    assert r["skipped"][0]["error"] == "file not found"
    assert "corrupt" in r["skipped"][1]["error"]
    assert r["n_items"] == 8 and r["top1_accuracy"] == 1.0  # the good files are all still scored
    assert calls[0] == 4 and 1 in calls  # failing batch was retried file by file


def test_zeroshot_all_files_bad_is_a_clear_error(tmp_path):
    labels = ["a", "b"]
    clips = [Clip(audio=str(tmp_path / "x.wav"), labels=["a"])]
    with pytest.raises(FinelapError, match="all 1 files were skipped"):
        evaluate_zeroshot(_zs_fns(labels, lambda p: "a"), clips)


def test_zeroshot_label_errors(tmp_path):
    labels, clips = _zs_setup(tmp_path, n_classes=2, per_class=1)
    fns = _zs_fns(labels, {c.audio: c.labels[0] for c in clips}.__getitem__)
    with pytest.raises(FinelapError, match="label list is empty"):
        evaluate_zeroshot(fns, clips, labels=[])
    with pytest.raises(FinelapError, match="no label list was given"):
        evaluate_zeroshot(fns, [Clip(audio=c.audio) for c in clips])
    with pytest.raises(FinelapError, match=r"not in the label list"):
        evaluate_zeroshot(fns, clips, labels=["class_0"])
    with pytest.raises(FinelapError, match="more than once"):
        evaluate_zeroshot(fns, clips, labels=["class_0", "class_1", "class_0"])
    with pytest.raises(FinelapError, match="needs embed_audio"):
        evaluate_zeroshot(Evaluatable(embed_text=fns.embed_text), clips)


def test_zeroshot_multilabel_reports_map_only(tmp_path):
    labels = ["a", "b", "c"]
    clips = [Clip(audio=_wav(tmp_path / f"{i}.wav"), labels=ls) for i, ls in enumerate([["a", "b"], ["c"], ["b"]])]
    emb = {clips[0].audio: [1, 1, 0], clips[1].audio: [0, 0, 1], clips[2].audio: [0, 1, 0]}

    fns = Evaluatable(
        embed_audio=lambda ps: np.array([emb[p] for p in ps], dtype=np.float32),
        embed_text=lambda ts: np.eye(3, dtype=np.float32)[[labels.index(t.split()[-1]) for t in ts]],
    )
    r = evaluate_zeroshot(fns, clips)
    assert r["multi_label"] is True and r["mAP"] == 1.0 and "top1_accuracy" not in r


def test_zeroshot_calibrated_examples(tmp_path):
    labels, clips = _zs_setup(tmp_path, n_classes=3, per_class=1)
    fns = _zs_fns(labels, {c.audio: c.labels[0] for c in clips}.__getitem__)
    fns.clip_scale_bias = (10.0, -5.0)
    r = evaluate_zeroshot(fns, clips, n_examples=2)
    top = r["examples"][0]["top3"][0]
    assert top["label"] == "class_0" and top["probability"] == pytest.approx(1 / (1 + np.exp(-5.0)), abs=1e-4)
    assert len(r["examples"]) == 2


def _band_features(path: str, n_bands: int = 24) -> np.ndarray:
    """A crude, model-free audio embedding: mean log energy in `n_bands` log-spaced bands
    (50 Hz-16 kHz) over 2048-sample frames, centred and L2-normalised."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    frames = x[: len(x) // 2048 * 2048].reshape(-1, 2048) * np.hanning(2048)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)
    freqs = np.fft.rfftfreq(2048, 1 / sr)
    edges = np.geomspace(50.0, 16000.0, n_bands + 1)
    v = np.log(np.array([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])]) + 1e-10)
    v -= v.mean()
    return v / np.linalg.norm(v)


def test_zeroshot_on_real_esc50_matches_an_independent_computation(esc50_dir):
    """Real ESC-50 clips scored by an honest, imperfect model: a nearest-centroid classifier on
    band energies whose "text" embedding of a class is the centroid of that class's fold-1 clips,
    evaluated on fold-2 clips (no shared recordings across folds). The evaluator's numbers must
    equal metrics computed here directly (numpy + scikit-learn), whatever order the clips come in."""
    from sklearn.metrics import average_precision_score, confusion_matrix

    meta = read_esc50_csv(esc50_dir / "meta" / "esc50.csv")
    labels = sorted({c.labels[0] for c in meta})
    assert len(labels) == 40

    def first(fold, n):  # the first n clips of each class in a fold
        out = {l: [c for c in meta if c.meta["fold"] == fold and c.labels[0] == l][:n] for l in labels}
        return [c for l in labels for c in out[l]]

    train, test = first(1, 2), first(2, 2)
    feats = {c.audio: _band_features(c.audio) for c in train + test}
    centroid = {l: np.mean([feats[c.audio] for c in train if c.labels[0] == l], axis=0) for l in labels}
    prompt_to_label = {make_prompt(TEMPLATE, l): l for l in labels}
    fns = Evaluatable(
        embed_audio=lambda paths: np.stack([feats[p] for p in paths]),
        embed_text=lambda texts: np.stack([centroid[prompt_to_label[t]] / np.linalg.norm(centroid[prompt_to_label[t]]) for t in texts]),
        prompt_template=TEMPLATE,
        name="band-centroid",
    )
    # the same model scored by hand
    a = np.stack([feats[c.audio] for c in test])
    t = np.stack([centroid[l] / np.linalg.norm(centroid[l]) for l in labels])
    s = a @ t.T  # (80 clips, 40 classes), continuous: no ties
    truth = np.array([labels.index(c.labels[0]) for c in test])
    top5 = np.argsort(-s, axis=1)[:, :5]
    want_top1 = float(np.mean(s.argmax(axis=1) == truth))
    want_top5 = float(np.mean([truth[i] in top5[i] for i in range(len(test))]))
    want_ap = [average_precision_score(truth == k, s[:, k]) for k in range(len(labels))]
    assert 0.05 < want_top1 < 0.9 and want_top1 < want_top5  # better than chance (1/40), far from perfect

    for order in (test, test[::-1]):
        r = evaluate_zeroshot(fns, order)
        assert r["n_items"] == 80 and r["labels"] == labels and r["skipped"] == []
        assert r["top1_accuracy"] == pytest.approx(want_top1, abs=1e-12)
        assert r["top5_accuracy"] == pytest.approx(want_top5, abs=1e-12)
        assert r["mAP"] == pytest.approx(float(np.mean(want_ap)), abs=1e-9)
        assert [r["per_class_AP"][l] for l in labels] == pytest.approx(want_ap, abs=1e-9)
        np.testing.assert_array_equal(np.array(r["confusion_matrix"]), confusion_matrix(truth, s.argmax(axis=1), labels=range(40)))


# ============================================================================ retrieval


def _retrieval_setup(tmp_path, n=6):
    clips = [Clip(audio=_wav(tmp_path / f"r{i}.wav"), captions=[f"caption {i} a", f"caption {i} b"]) for i in range(n)]
    return clips


def _retrieval_fns(clips, owner_of_caption):
    """Audio i -> one-hot e_i; a caption -> e_owner, or owner None -> e_n, a direction no clip has."""
    n = len(clips)
    index = {c.audio: i for i, c in enumerate(clips)}

    def embed_audio(paths):
        for p in paths:
            audio_duration(p)
        return np.stack([_onehot(index[p], n + 1) for p in paths])

    def embed_text(texts):
        return np.stack([_onehot(n if owner_of_caption(t) is None else owner_of_caption(t), n + 1) for t in texts])

    return Evaluatable(embed_audio=embed_audio, embed_text=embed_text)


def test_retrieval_oracle_and_multicaption_protocol(tmp_path):
    clips = _retrieval_setup(tmp_path)
    own = lambda t: int(t.split()[1])  # noqa: E731
    r = evaluate_retrieval(_retrieval_fns(clips, own), clips)
    assert r["task"] == "retrieval" and r["n_items"] == 6 and r["n_captions"] == 12
    for k in (1, 5, 10):
        assert r[f"text_to_audio_R@{k}"] == 1.0 and r[f"audio_to_text_R@{k}"] == 1.0
    assert r["mAP@10"] == 1.0
    # the "b" captions match nothing (every clip scores 0: pessimistic rank 6 of 6), the "a"
    # captions are perfect: t2a averages over captions (R@1 = 0.5), a2t counts a hit on ANY
    # caption of the clip (R@1 = 1)
    half = lambda t: own(t) if t.endswith("a") else None  # noqa: E731
    r = evaluate_retrieval(_retrieval_fns(clips, half), clips)
    assert r["text_to_audio_R@1"] == 0.5 and r["audio_to_text_R@1"] == 1.0
    assert r["text_to_audio_R@5"] == 0.5 and r["text_to_audio_R@10"] == 1.0
    assert r["mAP@10"] == pytest.approx(0.5 * 1 + 0.5 * (1 / 6))
    # "b" captions point at the next clip: clip i now ties its own "a" caption with caption
    # (i-1) "b", and ties count against it (pessimistic): a2t rank 2
    shifted = lambda t: own(t) if t.endswith("a") else (own(t) + 1) % 6  # noqa: E731
    r = evaluate_retrieval(_retrieval_fns(clips, shifted), clips)
    assert r["audio_to_text_R@1"] == 0.0 and r["audio_to_text_R@5"] == 1.0 and r["text_to_audio_R@1"] == 0.5


def test_retrieval_template_is_applied_to_captions_verbatim(tmp_path):
    clips = [Clip(audio=_wav(tmp_path / "t.wav"), captions=["a snake_case caption"])]
    seen: list[str] = []
    fns = _retrieval_fns(clips, lambda t: 0)
    inner = fns.embed_text
    fns.embed_text = lambda ts: (seen.extend(ts), inner(ts))[1]
    r = evaluate_retrieval(fns, clips, template="audio of {}")
    assert seen == ["audio of a snake_case caption"] and r["prompt_template"] == "audio of {}"
    assert evaluate_retrieval(fns, clips)["prompt_template"] == "{}" and seen[-1] == "a snake_case caption"


def test_retrieval_skips_missing_audio_and_its_captions(tmp_path):
    clips = _retrieval_setup(tmp_path, 4)
    gone = Clip(audio=str(tmp_path / "gone.wav"), captions=["caption 9 a"])
    r = evaluate_retrieval(_retrieval_fns(clips + [gone], lambda t: int(t.split()[1])), clips[:2] + [gone] + clips[2:])
    assert r["n_items"] == 4 and r["n_captions"] == 8 and r["text_to_audio_R@1"] == 1.0
    assert r["skipped"] == [{"path": gone.audio, "error": "file not found"}]


def test_retrieval_needs_captions(tmp_path):
    clips = [Clip(audio=_wav(tmp_path / "a.wav"))]
    with pytest.raises(FinelapError, match="captions"):
        evaluate_retrieval(_retrieval_fns(clips, lambda t: 0), clips)


def test_retrieval_rejects_bad_embedding_shape(tmp_path):
    clips = _retrieval_setup(tmp_path, 2)
    fns = Evaluatable(embed_audio=lambda ps: np.ones((len(ps) + 1, 3)), embed_text=lambda ts: np.ones((len(ts), 3)))
    with pytest.raises(FinelapError, match=r"shape \(2, D\)"):
        evaluate_retrieval(fns, clips)


# ============================================================================ post-processing in seconds


def _step_signal(rate: float, duration: float = 4.0) -> tuple[np.ndarray, Timeline]:
    """0 until 2.0 s then 1, plus a 0.1 s spike at 1.0 s; sampled on a `rate` Hz frame grid."""
    tl = Timeline(rate)
    t = tl.frame_start(np.arange(tl.num_frames(duration)))
    s = ((t >= 2.0 - 1e-9) | ((t >= 1.0 - 1e-9) & (t < 1.1 - 1e-9))).astype(np.float64)
    return s[:, None], tl


@pytest.mark.parametrize("rate", [10.0, 50.0])
def test_median_filter_in_seconds_is_rate_independent(rate):
    s, tl = _step_signal(rate)
    assert PostProcess().detect(s, tl, ["a"], 4.0) == [(1.0, pytest.approx(1.1), "a"), (2.0, 4.0, "a")]
    # 0.5 s window = 5 frames at 10 Hz, 25 at 50 Hz: the 0.1 s spike goes, the step stays
    assert PostProcess(median_filter_s=0.5).detect(s, tl, ["a"], 4.0) == [(2.0, 4.0, "a")]


def test_min_duration_and_merge_gap_seconds():
    tl = Timeline(20.0)
    s = np.zeros((80, 1))
    s[6:12] = 0.9  # 0.3-0.6 s (0.3 s long, 0.4 s before the next)
    s[20:40] = 0.9  # 1.0-2.0 s
    s[44:60] = 0.9  # 2.2-3.0 s, 0.2 s after the previous one
    det = lambda **kw: [(round(a, 6), round(b, 6)) for a, b, _ in PostProcess(**kw).detect(s, tl, ["x"], 4.0)]  # noqa: E731
    assert det() == [(0.3, 0.6), (1.0, 2.0), (2.2, 3.0)]
    assert det(min_duration_s=0.5) == [(1.0, 2.0), (2.2, 3.0)]
    assert det(merge_gap_s=0.3) == [(0.3, 0.6), (1.0, 3.0)]
    assert det(merge_gap_s=0.1) == [(0.3, 0.6), (1.0, 2.0), (2.2, 3.0)]
    assert det(threshold=0.95) == []


def test_postprocess_per_class_values_and_validation():
    pp = PostProcess(threshold={"dog": 0.3, "*": 0.6}, median_filter_s={"dog": 0.2, "siren": 0.0})
    assert pp.values("threshold", ["dog", "cat"]).tolist() == [0.3, 0.6]
    with pytest.raises(FinelapError, match="no value for class"):
        pp.values("median_filter_s", ["cat"])
    with pytest.raises(FinelapError, match=r"in \[0, 1\]"):
        PostProcess(threshold=1.5)
    with pytest.raises(FinelapError, match=">= 0"):
        PostProcess(min_duration_s=-1)
    with pytest.raises(FinelapError, match="unknown postprocess"):
        PostProcess.from_dict({"median_s": 1})
    assert PostProcess.from_dict(pp.to_dict()) == pp


# ============================================================================ SED

SED_EVENTS = {
    "f0": [Event("dog", 0.5, 1.5), Event("siren", 2.0, 3.5)],
    "f1": [Event("siren", 0.0, 1.0), Event("dog", 1.5, 2.0), Event("dog", 3.0, 4.0)],
    "f2": [],  # a negative file
}


def _sed_clips(tmp_path):
    return [Clip(audio=_wav(tmp_path / f"{k}.wav"), events=list(ev), duration=4.0) for k, ev in SED_EVENTS.items()]


def _oracle_frame_scores(clips, rate=10.0, shift_s=0.0, hole=None, template=TEMPLATE):
    """Scores = 1 inside the true events (optionally shifted, or with a hole (t0, t1)), else 0."""
    events = {c.audio: c.events for c in clips}

    def frame_scores(path, texts):
        audio_duration(path)
        labels = [t[len("the sound of "):] if template == TEMPLATE else t for t in texts]
        tl = Timeline(rate)
        n = tl.num_frames(4.0)
        evs = [(e.label, min(4.0, e.onset + shift_s), min(4.0, e.offset + shift_s)) for e in events[path]]
        y = tl.rasterize(evs, labels, n)
        if hole is not None:
            t = tl.frame_start(np.arange(n))
            y[(t >= hole[0] - 1e-9) & (t < hole[1] - 1e-9)] = 0.0
        return FrameScores(scores=y, timeline=tl, duration_s=4.0)

    return Evaluatable(frame_scores=frame_scores, name="oracle")


@pytest.mark.parametrize("rate", [10.0, 16.0])
def test_sed_oracle_scores_perfectly(tmp_path, rate):
    clips = _sed_clips(tmp_path)
    r = evaluate_sed(_oracle_frame_scores(clips, rate), clips)
    assert r["task"] == "sed" and r["classes"] == ["dog", "siren"] and r["n_items"] == 3 and r["n_events"] == 5
    assert r["PSDS1"] > 0.99 and r["PSDS2"] > 0.99
    assert r["event_F1"] == 1.0 and r["segment_F1"] == 1.0 and r["frame_AUROC"] == 1.0
    assert r["per_class"]["dog"]["n_events"] == 3 and r["per_class"]["siren"]["event_F1"] == 1.0
    rows = sorted((d["filename"], d["onset"], d["offset"], d["event_label"]) for d in r["detections"])
    want = sorted((f"{k}.wav", e.onset, e.offset, e.label) for k, evs in SED_EVENTS.items() for e in evs)
    assert rows == want
    assert set(r["artifacts"]["scores"]) == {"f0", "f1", "f2"}
    assert r["postprocess"] == PostProcess().to_dict() and r["prompt_template"] == TEMPLATE


def _direct_sed_inputs(fns, clips):
    """Score DataFrames, ground truth and durations built by hand from fns, for direct metric calls."""
    dfs, gt = {}, {}
    for c in clips:
        fs = fns.frame_scores(c.audio, [make_prompt(TEMPLATE, "dog"), make_prompt(TEMPLATE, "siren")])
        dfs[c.key] = M.scores_to_dataframe(fs.scores, fs.timeline, ["dog", "siren"], 4.0)
        gt[c.key] = [(e.onset, e.offset, e.label) for e in c.events]
    return dfs, gt, {k: 4.0 for k in dfs}


def test_sed_matches_direct_metric_calls(tmp_path):
    """The evaluator's PSDS equals metrics.psds1 on DataFrames built by hand from the same scores."""
    clips = _sed_clips(tmp_path)
    fns = _oracle_frame_scores(clips, 10.0, shift_s=0.3)
    r = evaluate_sed(fns, clips)
    dfs, gt, dur = _direct_sed_inputs(fns, clips)
    assert r["PSDS1"] == M.psds1(dfs, gt, dur).value
    assert r["PSDS2"] == M.psds2(dfs, gt, dur).value
    assert r["event_F1"] == M.collar_f1(dfs, gt, 0.5)["event_F1_macro"]
    assert r["segment_F1"] == M.segment_f1(dfs, gt, dur, 0.5)["segment_F1_macro"]


def test_sed_psds_variants(tmp_path):
    """Extra PSDS settings: PSDS1's own parameters reproduce PSDS1; alpha_st = 0 equals a direct
    metrics.psds call and can only raise the value (it drops the penalty on the class spread)."""
    clips = _sed_clips(tmp_path)
    fns = _oracle_frame_scores(clips, 10.0, shift_s=0.3)
    variants = {"same": dict(M.PSDS1_PARAMS), "no_st": {**M.PSDS1_PARAMS, "alpha_st": 0.0}}
    r = evaluate_sed(fns, clips, psds_variants=variants)
    assert r["psds_variants"]["same"] == r["PSDS1"]
    direct = M.psds(*_direct_sed_inputs(fns, clips), **variants["no_st"]).value
    assert r["psds_variants"]["no_st"] == direct >= r["PSDS1"]
    assert "psds_variants" not in evaluate_sed(fns, clips)
    with pytest.raises(FinelapError, match="psds_variants\\['bad'\\].*alpha"):
        evaluate_sed(fns, clips, psds_variants={"bad": {"alpha": 1.0}})


def test_sed_shifted_scores_score_worse(tmp_path):
    clips = _sed_clips(tmp_path)
    good = evaluate_sed(_oracle_frame_scores(clips), clips)
    bad = evaluate_sed(_oracle_frame_scores(clips, shift_s=1.0), clips)
    assert bad["event_F1"] < 0.5 < good["event_F1"] and bad["PSDS1"] < good["PSDS1"]


def test_sed_merge_gap_changes_f1_but_not_psds(tmp_path):
    clips = _sed_clips(tmp_path)
    fns = _oracle_frame_scores(clips, 10.0, hole=(2.6, 2.8))  # a 0.2 s dropout inside f0's siren
    split = evaluate_sed(fns, clips)
    merged = evaluate_sed(fns, clips, postprocess=PostProcess(merge_gap_s=0.3))
    assert split["per_class"]["siren"]["event_F1"] < 1.0 and merged["per_class"]["siren"]["event_F1"] == 1.0
    assert merged["PSDS1"] == split["PSDS1"]  # PSDS is threshold-free, on the raw scores
    sirens = [(d["onset"], d["offset"]) for d in merged["detections"] if d["filename"] == "f0.wav" and d["event_label"] == "siren"]
    assert sirens == [(2.0, 3.5)]


def test_sed_skips_missing_file_and_reports_it(tmp_path):
    clips = _sed_clips(tmp_path)
    gone = Clip(audio=str(tmp_path / "gone.wav"), events=[Event("dog", 0.0, 1.0)], duration=4.0)
    r = evaluate_sed(_oracle_frame_scores(clips + [gone]), clips + [gone])
    assert r["skipped"] == [{"path": gone.audio, "error": "file not found"}]
    assert r["n_items"] == 3 and r["event_F1"] == 1.0


def test_sed_class_errors_and_classes_without_events(tmp_path):
    clips = _sed_clips(tmp_path)
    fns = _oracle_frame_scores(clips)
    with pytest.raises(FinelapError, match="class list is empty"):
        evaluate_sed(fns, clips, classes=[])
    with pytest.raises(FinelapError, match="no event classes"):
        evaluate_sed(fns, [Clip(audio=c.audio, duration=4.0) for c in clips])
    r = evaluate_sed(fns, clips, classes=["dog", "siren", "cat"])
    assert r["classes_without_events"] == ["cat"] and set(r["per_class"]) == {"dog", "siren"}
    assert r["event_F1"] == 1.0
    with pytest.raises(FinelapError, match="needs frame_scores"):
        evaluate_sed(Evaluatable(), clips)


def test_sed_rejects_logits_instead_of_probabilities(tmp_path):
    clips = _sed_clips(tmp_path)
    fns = Evaluatable(frame_scores=lambda p, t: FrameScores(np.full((40, len(t)), 3.0), Timeline(10.0), 4.0))
    with pytest.raises(FinelapError, match="probabilities"):
        evaluate_sed(fns, clips)


# ============================================================================ grounding


def _grounding_setup(tmp_path):
    items = [
        GroundingItem(audio=_wav(tmp_path / "g0.wav"), caption="a dog barks then a car passes", duration=4.0,
                      phrases=[GroundingPhrase("a dog barks", [(0.5, 1.5), (2.5, 3.0)]), GroundingPhrase("a car passes", [(1.0, 3.5)])]),
        GroundingItem(audio=_wav(tmp_path / "g1.wav"), caption="birds sing, nobody speaks", duration=4.0,
                      phrases=[GroundingPhrase("birds sing", [(0.0, 4.0)]), GroundingPhrase("nobody speaks", [])]),
    ]  # fmt: skip
    return items


def _grounding_fns(items, rate=10.0):
    # the evaluator prompts phrases as labels (the Evaluatable's template, make_prompt)
    segs = {(it.audio, make_prompt(TEMPLATE, p.phrase)): p.segments for it in items for p in it.phrases}

    def frame_scores(path, texts):
        audio_duration(path)
        tl = Timeline(rate)
        n = tl.num_frames(4.0)
        cols = [tl.rasterize([("q", on, off) for on, off in segs[(path, t)]], ["q"], n)[:, 0] for t in texts]
        return FrameScores(np.stack(cols, axis=1), tl, 4.0)

    return Evaluatable(frame_scores=frame_scores, prompt_template=TEMPLATE, name="oracle")


def test_grounding_oracle_and_skip(tmp_path):
    items = _grounding_setup(tmp_path)
    gone = GroundingItem(audio=str(tmp_path / "gone.wav"), caption="x", phrases=[GroundingPhrase("x", [(0.0, 1.0)])])
    r = evaluate_grounding(_grounding_fns(items + []), items[:1] + [gone] + items[1:])
    assert r["task"] == "grounding" and r["n_items"] == 2 and r["n_queries"] == 4 and r["n_queries_without_segments"] == 1
    assert r["grounding_PSDS"] > 0.99 and r["grounding_event_F1"] == 1.0 and r["grounding_frame_AUROC"] == 1.0
    assert r["skipped"] == [{"path": gone.audio, "error": "file not found"}]
    dog = [(d["onset"], d["offset"]) for d in r["detections"] if d["phrase"] == "a dog barks"]
    assert dog == [(0.5, 1.5), (2.5, 3.0)]
    assert r["prompt_template"] == TEMPLATE  # phrases are prompted as labels are
    # TextToAudioGrounding's protocol on the oracle: every max_efpr gives PSDS ~1, th_auc 0.98
    # (F1 = 1 at each of TAG's thresholds 0.01, 0.03, ..., 0.99; the trapezoid spans [0.01, 0.99]
    # of the width-1 range and [0.21, 0.79] of the width-0.6 one, as TAG's sklearn `auc` does)
    assert all(r[f"psds@max_efpr={m}"] > 0.99 for m in (400, 600, 800, 1000))
    assert r["psds@max_efpr=None"] is None  # normalised by the largest eFPR, which is 0 here
    assert r["th_auc@0.00~1.00"] == pytest.approx(0.98) and r["th_auc@0.20~0.80"] == pytest.approx(0.58 / 0.6)


def test_grounding_wrong_scores_score_worse(tmp_path):
    items = _grounding_setup(tmp_path)
    fns = _grounding_fns(items)
    inner = fns.frame_scores
    fns.frame_scores = lambda p, t: FrameScores(1.0 - inner(p, t).scores, Timeline(10.0), 4.0)  # inverted
    r = evaluate_grounding(fns, items)
    assert r["grounding_frame_AUROC"] == 0.0 and r["grounding_event_F1"] < 0.5 and r["grounding_PSDS"] < 0.5


def test_grounding_needs_phrases(tmp_path):
    with pytest.raises(FinelapError, match="phrases"):
        evaluate_grounding(_grounding_fns([]), [GroundingItem(audio="x.wav", caption="c")])


def test_task_table_names():
    assert set(TASKS) == {"retrieval", "zeroshot", "sed", "grounding"}


# ============================================================================ the field's protocol, stated


def _noisy_oracle(clips, rate=10.0, seed=0):
    """Oracle scores (events 0.7-0.9, background 0-0.4) with one-frame spikes of 0.95 that a
    median filter removes, so the filter changes PSDS."""
    inner = _oracle_frame_scores(clips, rate)
    rng = np.random.default_rng(seed)
    shape = (int(4.0 * rate), 2)
    noise = {c.audio: rng.uniform(0, 0.2, size=shape) for c in clips}
    spikes = {c.audio: rng.random(shape) < 0.08 for c in clips}

    def frame_scores(path, texts):
        y = inner.frame_scores(path, texts).scores
        s = np.where(y > 0, 0.7, 0.2) + noise[path]
        s[spikes[path] & (y == 0)] = 0.95
        return FrameScores(s, Timeline(rate), 4.0)

    return Evaluatable(frame_scores=frame_scores, prompt_template=TEMPLATE, name="noisy")


def test_psds1_equals_a_direct_sed_scores_eval_call_on_the_post_processed_scores(tmp_path):
    """Parity: the reported PSDS1/PSDS2 are sed_scores_eval's own `intersection_based.psds` on the
    median-filtered scores (the checkpoint's post-processing); PSDS1_raw on the raw ones."""
    sed_scores_eval = M._sse()  # the library itself (imported quietly)

    clips = _sed_clips(tmp_path)
    fns = _noisy_oracle(clips)
    pp = PostProcess(median_filter_s=0.5)
    r = evaluate_sed(fns, clips, postprocess=pp)
    dfs, gt, dur = _direct_sed_inputs(fns, clips)
    filt = {}
    for k, df in dfs.items():
        s = M.median_filter_seconds(df[["dog", "siren"]].to_numpy(), 10.0, 0.5)  # 5 frames at 10 Hz
        filt[k] = sed_scores_eval.base_modules.scores.create_score_dataframe(s, np.r_[df["onset"].to_numpy(), 4.0], ["dog", "siren"])
    kw = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0, unit_of_time="hour")
    direct = sed_scores_eval.intersection_based.psds(scores=filt, ground_truth=gt, audio_durations=dur, **kw)[0]
    direct_raw = sed_scores_eval.intersection_based.psds(scores=dfs, ground_truth=gt, audio_durations=dur, **kw)[0]
    assert r["PSDS1"] == pytest.approx(direct, abs=1e-12) and r["PSDS1_raw"] == pytest.approx(direct_raw, abs=1e-12)
    assert r["PSDS1"] != r["PSDS1_raw"]  # the filter matters here
    direct_no_st = sed_scores_eval.intersection_based.psds(scores=filt, ground_truth=gt, audio_durations=dur, **{**kw, "alpha_st": 0.0})[0]
    assert r["PSDS1_alpha_st0"] == pytest.approx(direct_no_st, abs=1e-9)  # exact recombination of the same ROCs
    block = r["psds"]["PSDS1"]
    assert block["params"] == M.PSDS1_PARAMS and "median-filtered over 0.5 s" in block["scores"]
    per = np.array(list(block["per_class"].values()))
    assert block["per_class_mean"] == pytest.approx(per.mean()) and block["per_class_std"] == pytest.approx(per.std())
    assert r["psds"]["PSDS1_raw"]["scores"].startswith("raw")


def test_a_zero_psds_is_explained(tmp_path):
    """One class found perfectly, the other never: PSDS1 (alpha_st = 1) is 0 from the spread
    penalty, and the note says so with the alpha_st = 0 value; with both classes missed, the
    note blames localisation."""
    clips = _sed_clips(tmp_path)
    good = _oracle_frame_scores(clips, 10.0)

    def half(path, texts):
        fs = good.frame_scores(path, texts)
        s = fs.scores.copy()
        s[:, 1] = 1.0 - s[:, 1]  # siren: inverted
        return FrameScores(s, fs.timeline, 4.0)

    r = evaluate_sed(Evaluatable(frame_scores=half, prompt_template=TEMPLATE), clips)
    b = r["psds"]["PSDS1"]
    assert r["PSDS1"] == 0.0 and b["alpha_st0"] > 0.4 and "spread" in b["note"] and f"{b['alpha_st0']:.3f}" in b["note"]
    inv = Evaluatable(frame_scores=lambda p, t: FrameScores(1.0 - good.frame_scores(p, t).scores, Timeline(10.0), 4.0),
                      prompt_template=TEMPLATE)  # fmt: skip
    z = evaluate_sed(inv, clips)["psds"]["PSDS1"]
    assert z["value"] == 0.0 and z["alpha_st0"] == 0.0 and "localisation" in z["note"]
    assert evaluate_sed(good, clips)["psds"]["PSDS1"]["note"] is None


def test_tag_precision_recall_hand_counted():
    """TextToAudioGrounding's criteria (dtc = gtc = 0.5) on hand-made spans."""
    gts = {"q1": np.array([[1.0, 3.0]]), "q2": np.array([[0.0, 1.0], [2.0, 4.0]])}
    dets = {
        "q1": np.array([[1.5, 3.5]]),  # 1.5 of 2 s on the reference (>= dtc), covers 1.5/2 (>= gtc): TP both ways
        "q2": np.array([[0.0, 0.4], [2.5, 5.5]]),  # covers 0.4 of [0,1] (< gtc); 1.5 of 3 s on [2,4] (dtc 0.5), covers 0.75
    }
    p, r = M._tag_precision_recall(dets, gts, 0.5, 0.5)
    # references found: q1's and q2's [2, 4] -> 2 of 3; detections correct: q1's and q2's second -> 2 of 3
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert M._tag_precision_recall({}, gts, 0.5, 0.5) == (0.0, 0.0)


def test_tag_segments_join_gaps_up_to_half_a_second():
    tl = Timeline(10.0)
    s = np.zeros(40)
    s[5:10] = s[14:20] = s[30:32] = 0.9  # gaps of 4 frames (0.4 s) and 10 frames (1.0 s)
    segs = M._tag_segments(s, tl, 0.5, 5)  # ceil(0.5 s x 10 Hz) = 5 frames
    np.testing.assert_allclose(segs, [[0.5, 2.0], [3.0, 3.2]])


def test_tag_metrics_with_overlapping_segments_of_one_phrase():
    """Two events of one class can overlap in a soundscape: the phrase's segments are merged
    (sed_scores_eval rejects overlapping references), as for SED, instead of crashing."""
    tl = Timeline(10.0)
    s = np.zeros(100)
    s[30:95] = 0.9
    overlapping = M.tag_grounding_metrics({"q": s}, {"q": tl}, {"q": [(3.2, 8.2), (5.4, 9.9)]}, {"q": 10.0})
    merged = M.tag_grounding_metrics({"q": s}, {"q": tl}, {"q": [(3.2, 9.9)]}, {"q": 10.0})
    assert overlapping["th_auc"] == merged["th_auc"] and overlapping["psds"] == merged["psds"]
