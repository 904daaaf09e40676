"""Tests for finelap.eval.metrics: hand-checkable toy values, brute-force references for ranking
metrics/AP/AUROC, and parity of the SED/grounding wrappers with direct sed_scores_eval calls."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from finelap.audio import Timeline
from finelap.eval import metrics as M
from conftest import record_statistics_sizes


def _sse():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        import sed_scores_eval
        from sed_scores_eval.base_modules.scores import create_score_dataframe  # noqa: F401
    return sed_scores_eval


# ============================================================================ retrieval


def _brute_ranks(sim: np.ndarray, t2a_idx: np.ndarray, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Sort every candidate list explicitly, breaking ties against (pessimistic) or in favour of
    (optimistic) the relevant items, and take the position of the first relevant one."""
    n_t, n_a = sim.shape
    worst = ties == "pessimistic"

    def first_relevant(scores: np.ndarray, relevant: np.ndarray) -> int:
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], bool(relevant[j]) == worst))
        return next(pos for pos, j in enumerate(order, start=1) if relevant[j])

    t2a = np.array([first_relevant(sim[i], np.arange(n_a) == t2a_idx[i]) for i in range(n_t)])
    a2t = np.array([first_relevant(sim[:, j], t2a_idx == j) for j in range(n_a)])
    return t2a, a2t


def _brute_retrieval(sim, t2a_idx, ties):
    t2a, a2t = _brute_ranks(sim, t2a_idx, ties)
    out = {}
    for k in (1, 5, 10):
        out[f"text_to_audio_R@{k}"] = sum(r <= k for r in t2a) / len(t2a)
    for k in (1, 5, 10):
        out[f"audio_to_text_R@{k}"] = sum(r <= k for r in a2t) / len(a2t)
    out["mAP@10"] = sum((1.0 / r if r <= 10 else 0.0) for r in t2a) / len(t2a)
    out["text_to_audio_mean_rank"] = float(np.mean(t2a))
    out["text_to_audio_median_rank"] = float(np.median(t2a))
    out["audio_to_text_mean_rank"] = float(np.mean(a2t))
    out["audio_to_text_median_rank"] = float(np.median(a2t))
    return out


def test_retrieval_hand_3x3():
    # text i belongs to audio i; own-clip scores rank 1, 2, 3 in their rows
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.3, 0.2], [0.7, 0.6, 0.1]])
    r = M.retrieval_metrics(sim, np.array([0, 1, 2]))
    assert r["text_to_audio_R@1"] == pytest.approx(1 / 3)
    assert r["text_to_audio_R@5"] == 1.0 and r["text_to_audio_R@10"] == 1.0
    assert r["mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert r["text_to_audio_mean_rank"] == 2.0 and r["text_to_audio_median_rank"] == 2.0
    # columns: audio0 [.9,.8,.7] -> text0 first; audio1 [.1,.3,.6] -> text1 second; audio2 [.5,.2,.1] -> third
    assert r["audio_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["audio_to_text_mean_rank"] == 2.0
    assert set(r) == {
        "text_to_audio_R@1", "text_to_audio_R@5", "text_to_audio_R@10",
        "audio_to_text_R@1", "audio_to_text_R@5", "audio_to_text_R@10", "mAP@10",
        "text_to_audio_mean_rank", "text_to_audio_median_rank",
        "audio_to_text_mean_rank", "audio_to_text_median_rank",
    }  # fmt: skip


def test_retrieval_hand_multi_caption():
    # two clips with two captions each
    sim = np.array([[0.2, 0.9], [0.8, 0.1], [0.3, 0.4], [0.7, 0.6]])
    t2a, a2t = M.retrieval_ranks(sim, np.array([0, 0, 1, 1]))
    assert t2a.tolist() == [2, 1, 1, 2]
    # audio0: best caption t1 (0.8) is top of its column; audio1: best caption t3 (0.6) is below t0 (0.9)
    assert a2t.tolist() == [1, 2]
    r = M.retrieval_metrics(sim, np.array([0, 0, 1, 1]))
    assert r["text_to_audio_R@1"] == 0.5 and r["audio_to_text_R@1"] == 0.5
    assert r["mAP@10"] == pytest.approx((0.5 + 1 + 1 + 0.5) / 4)


def test_retrieval_ties_constant_scores():
    sim = np.zeros((6, 3))  # a collapsed model
    g = np.array([0, 0, 1, 1, 2, 2])
    t2a, a2t = M.retrieval_ranks(sim, g, ties="pessimistic")
    assert t2a.tolist() == [3] * 6  # all other clips tie with the right one
    assert a2t.tolist() == [5] * 3  # 4 foreign captions tie with the best own caption
    t2a, a2t = M.retrieval_ranks(sim, g, ties="optimistic")
    assert t2a.tolist() == [1] * 6 and a2t.tolist() == [1] * 3


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_vs_brute_force(ties, seed):
    rng = np.random.default_rng(seed)
    n_a = 23
    caps = rng.integers(1, 6, size=n_a)  # 1..5 captions per clip
    g = rng.permutation(np.repeat(np.arange(n_a), caps))
    sim = rng.normal(size=(len(g), n_a))
    sim[np.arange(len(g)), g] += 1.0  # make it a half-decent model so all ranks occur
    sim = np.round(sim, 1)  # plenty of exact ties
    got = M.retrieval_metrics(sim, g, ties=ties)
    ref = _brute_retrieval(sim, g, ties)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    # chunking must not change anything
    a = M.retrieval_ranks(sim, g, ties=ties, chunk_size=7)
    b = M.retrieval_ranks(sim, g, ties=ties)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_retrieval_bad_input():
    sim = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(ValueError, match="no caption"):
        M.retrieval_metrics(sim, np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        M.retrieval_metrics(sim, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        M.retrieval_metrics(sim, np.array([0, 1, 2, 3]))
    sim[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.retrieval_metrics(sim, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="ties"):
        M.retrieval_metrics(np.eye(3), np.arange(3), ties="random")


# ============================================================================ AP / classification


def _brute_ap(scores, labels):
    pos = [i for i in range(len(labels)) if labels[i]]
    if not pos:
        return float("nan")
    precs = []
    for i in pos:
        above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
        precs.append(sum(labels[j] for j in above) / len(above))
    return sum(precs) / len(pos)


def _brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_ap_and_auc_textbook_example():
    # the example in scikit-learn's documentation of average_precision_score / roc_auc_score
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert M.average_precision(s, y) == pytest.approx(0.8333333333)
    assert M.roc_auc(s, y) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(3))
def test_ap_and_auc_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(size=n) + y, 1)  # ties
    assert M.average_precision(s, y) == pytest.approx(_brute_ap(s, y), abs=1e-12)
    assert M.roc_auc(s, y) == pytest.approx(_brute_auc(s, y), abs=1e-12)
    assert M.frame_auroc(s, y.astype(int)) == pytest.approx(_brute_auc(s, y), abs=1e-12)


def test_ap_auc_degenerate():
    assert math.isnan(M.average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    assert math.isnan(M.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="only one class"):
        M.frame_auroc(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="binary"):
        M.roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))
    # all scores equal: AUROC 0.5, AP = prevalence
    assert M.roc_auc(np.zeros(4), np.array([0, 1, 0, 1])) == 0.5
    assert M.average_precision(np.zeros(4), np.array([0, 1, 0, 0])) == 0.25


def test_classification_hand_two_classes():
    col0 = np.array([0.9, 0.8, 0.3, 0.1])
    scores = np.stack([col0, 1 - col0], axis=1)
    targets = np.array([0, 1, 0, 1])
    r = M.classification_metrics(scores, targets)
    # class 0 ranking: pos, neg, pos, neg -> AP = (1 + 2/3) / 2; class 1 symmetric
    assert r["per_class_AP"] == pytest.approx([5 / 6, 5 / 6])
    assert r["mAP"] == pytest.approx(5 / 6)
    # argmax predictions: 0, 0, 1, 1
    assert r["top1_accuracy"] == 0.5
    assert r["top5_accuracy"] == 1.0  # k is capped at C = 2
    assert r["confusion_matrix"] == [[1, 1], [1, 1]]


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_classification_topk_vs_brute_force(ties):
    rng = np.random.default_rng(3)
    n, c = 80, 12
    scores = np.round(rng.normal(size=(n, c)), 1)
    targets = rng.integers(0, c, size=n)
    r = M.classification_metrics(scores, targets, ks=(1, 3, 5), ties=ties)
    for k in (1, 3, 5):
        hits = 0
        for i in range(n):
            order = sorted(range(c), key=lambda j: (-scores[i, j], (j == targets[i]) == (ties == "pessimistic")))
            hits += targets[i] in order[:k]
        assert r[f"top{k}_accuracy"] == pytest.approx(hits / n), k
    ref_ap = [_brute_ap(scores[:, k], targets == k) for k in range(c)]
    got = [np.nan if a is None else a for a in r["per_class_AP"]]
    np.testing.assert_allclose(got, ref_ap, atol=1e-12)
    assert r["mAP"] == pytest.approx(np.nanmean(ref_ap))
    cm = np.array(r["confusion_matrix"])
    assert cm.sum() == n and np.trace(cm) == int(np.sum(np.argmax(scores, 1) == targets))


def test_classification_multilabel_and_missing_class():
    rng = np.random.default_rng(4)
    n, c = 40, 5
    t = (rng.random((n, c)) < 0.3).astype(int)
    t[:, 2] = 0  # a class without positives: AP undefined, excluded from mAP
    s = rng.normal(size=(n, c)) + t
    r = M.classification_metrics(s, t)
    assert "top1_accuracy" not in r and "confusion_matrix" not in r
    assert r["per_class_AP"][2] is None
    ref = [_brute_ap(s[:, k], t[:, k]) for k in (0, 1, 3, 4)]
    assert r["mAP"] == pytest.approx(np.mean(ref))
    with pytest.raises(ValueError, match="0/1"):
        M.classification_metrics(s, t * 2)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        M.classification_metrics(s, np.full(n, 5))


# ============================================================================ SED

CLASSES = ["dog", "cat"]
# events cover < 10% of the file each: otherwise PSDS2 (dtc = 0.1) accepts one detection spanning
# the whole file as a true positive, and the reversed scores below would score PSDS2 = 1
GT_ONE = {"f1": [(2.0, 2.8, "dog"), (6.0, 6.5, "cat")]}
DUR_ONE = {"f1": 10.0}


def _perfect_one_file(reverse: bool = False) -> dict[str, pd.DataFrame]:
    tl = Timeline(frame_rate_hz=10.0)
    s = np.zeros((100, 2))
    s[20:28, 0] = 1.0
    s[60:65, 1] = 1.0
    if reverse:
        s = 1.0 - s
    return {"f1": M.scores_to_dataframe(s, tl, CLASSES, duration_s=10.0)}


def test_sed_perfect_and_reversed_one_file():
    good, bad = _perfect_one_file(), _perfect_one_file(reverse=True)
    p1 = M.psds1(good, GT_ONE, DUR_ONE)
    assert p1.value == pytest.approx(1.0)
    assert p1.per_class == pytest.approx({"dog": 1.0, "cat": 1.0})
    assert M.psds2(good, GT_ONE, DUR_ONE).value == pytest.approx(1.0)
    f = M.collar_f1(good, GT_ONE)
    assert f["event_F1_macro"] == 1.0 and f["event_F1_micro"] == 1.0
    assert f["event_per_class"]["dog"] == {"F1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 1, "fp": 0, "n_ref": 1}
    assert M.segment_f1(good, GT_ONE, DUR_ONE)["segment_F1_macro"] == 1.0
    assert M.sed_frame_auroc(good, GT_ONE)["frame_AUROC_macro"] == 1.0

    # reversed scores: the complement of every event is detected
    assert M.psds1(bad, GT_ONE, DUR_ONE).value == 0.0
    assert M.psds2(bad, GT_ONE, DUR_ONE).value < 0.5
    assert M.collar_f1(bad, GT_ONE)["event_F1_macro"] == 0.0
    # 1 s segments: each class is active in all 10 segments (the event's own segment included,
    # since the complement covers its tail), so precision 1/10, recall 1, F1 = 2/11
    seg = M.segment_f1(bad, GT_ONE, DUR_ONE)
    assert seg["segment_F1_macro"] == pytest.approx(2 / 11)
    assert seg["segment_per_class"]["dog"]["tp"] == 1 and seg["segment_per_class"]["dog"]["fp"] == 9
    assert M.sed_frame_auroc(bad, GT_ONE)["frame_AUROC_macro"] == 0.0


def test_psds2_with_one_class():
    """One event class: PSDS2's cross-trigger term has no other class, so it is zero (it crashed
    inside sed_scores_eval with 'unhashable type: numpy.ndarray')."""
    tl = Timeline(frame_rate_hz=10.0)
    gt = {"f1": [(2.0, 2.8, "dog")], "f2": [(6.0, 6.5, "dog")]}
    dur = {"f1": 10.0, "f2": 10.0}
    perfect = np.zeros((100, 1))
    perfect[20:28, 0] = 1.0
    noisy = perfect.copy()
    noisy[70:90, 0] = 0.95  # a false alarm scored above the event in f2: finding that event costs a false positive
    f2 = np.zeros((100, 1))
    f2[60:65, 0] = 0.9
    scores = {"f1": M.scores_to_dataframe(noisy, tl, ["dog"], 10.0), "f2": M.scores_to_dataframe(f2, tl, ["dog"], 10.0)}
    p2 = M.psds2(scores, gt, dur)
    assert p2.params == M.PSDS2_PARAMS and set(p2.per_class) == {"dog"}
    assert 0.0 < p2.value < 1.0
    # = the same detection criteria without the (empty) cross-trigger term
    ref = M.psds(scores, gt, dur, **{**M.PSDS2_PARAMS, "cttc": None, "alpha_ct": 0.0})
    assert p2.value == pytest.approx(ref.value)
    good = {"f1": M.scores_to_dataframe(perfect, tl, ["dog"], 10.0), "f2": scores["f2"]}
    assert M.psds2(good, gt, dur).value == pytest.approx(1.0)


def _random_sed_set(seed: int, n_files: int = 6, classes=("a", "b", "c")):
    """Library-format inputs built exactly as sed_scores_eval's docs show: create_score_dataframe
    with onset timestamps plus a final offset; gt {file: [(onset, offset, label)]}."""
    from sed_scores_eval.base_modules.scores import create_score_dataframe

    rng = np.random.default_rng(seed)
    scores, gt, dur = {}, {}, {}
    for f in range(n_files):
        key = f"file{f}"
        d = float(rng.uniform(8, 12))
        n = int(d / 0.064)
        ts = np.arange(n + 1) * 0.064
        ts[-1] = d
        events = []
        raw = rng.normal(size=(n, len(classes))) - 0.8  # mostly below 0.5 after the sigmoid
        centers = 0.5 * (ts[:-1] + ts[1:])
        for k, c in enumerate(classes):
            # at most one short event per class and file (< 10% of the file, see GT_ONE), so that
            # PSDS2 is not trivially 1
            if rng.random() < 0.25:
                continue
            on = round(float(rng.uniform(0, d - 1.0)), 3)
            off = round(on + float(rng.uniform(0.3, 0.75)), 3)
            events.append((on, off, c))
            inside = (centers >= on) & (centers < off)
            raw[inside, k] += 1.4
            raw[inside, (k + 1) % len(classes)] += 0.9  # confusion with the next class: cross triggers
            # a detection that only partly overlaps the event: sensitive to dtc/gtc
            sh = rng.integers(3, 9)
            raw[np.roll(inside, sh) & ~inside, k] += 1.0
        s = 1 / (1 + np.exp(-np.apply_along_axis(lambda x: np.convolve(x, np.ones(5) / 5, "same"), 0, raw)))
        scores[key] = create_score_dataframe(s, ts, list(classes))
        gt[key] = sorted(events)
        dur[key] = d
    return scores, gt, dur


@pytest.fixture(scope="module")
def sed_set():
    _sse()
    # 40 files so that eFPR (per hour) has room below 100/h; seed picked so that the values below
    # move when any of dtc, gtc, alpha_st (PSDS1) or dtc, gtc, alpha_ct (PSDS2) is changed
    return _random_sed_set(2, n_files=40)


def test_psds_wrappers_equal_direct_calls(sed_set):
    sse = _sse()
    scores, gt, dur = sed_set
    # DCASE parameters spelled out here, independently of metrics.PSDS*_PARAMS
    p1 = sse.intersection_based.psds(
        scores=scores, ground_truth=gt, audio_durations=dur,
        dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0,
    )  # fmt: skip
    p2 = sse.intersection_based.psds(
        scores=scores, ground_truth=gt, audio_durations=dur,
        dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0,
    )  # fmt: skip
    for ours, ref in ((M.psds1(scores, gt, dur), p1), (M.psds2(scores, gt, dur), p2)):
        assert 0.01 < ours.value < 0.99  # a non-trivial operating range (0.026 and 0.30 here)
        assert ours.value == ref[0]
        assert ours.per_class == {k: float(v) for k, v in ref[1].items()}
        np.testing.assert_array_equal(ours.etpr, ref[2][0])
        np.testing.assert_array_equal(ours.efpr, ref[2][1])
        assert set(ours.per_class_roc) == {"a", "b", "c"}
    assert M.psds1(scores, gt, dur).value != M.psds2(scores, gt, dur).value
    # the data distinguishes the DCASE parameters from near neighbours (so the parity above pins them)
    v1, v2 = p1[0], p2[0]
    for changed in (dict(dtc=0.6), dict(gtc=0.6), dict(alpha_st=0.9)):
        assert M.psds(scores, gt, dur, **{**M.PSDS1_PARAMS, **changed}).value != v1, changed
    for changed in (dict(dtc=0.2), dict(gtc=0.2), dict(alpha_ct=0.4)):
        assert M.psds(scores, gt, dur, **{**M.PSDS2_PARAMS, **changed}).value != v2, changed
    d = M.psds2(scores, gt, dur).to_dict()
    assert d["params"]["cttc"] == 0.3 and len(d["psd_roc"]["efpr"]) == len(d["psd_roc"]["etpr"])


def _long_sed_file(n_frames: int, seed: int = 0):
    """One long file of 40-ms noisy scores (nearly every frame a distinct score) for 2 classes, a
    few short events per class, confusions and near misses: the case whose cost grows with the
    square of the file's length in sed_scores_eval."""
    from sed_scores_eval.base_modules.scores import create_score_dataframe

    rng = np.random.default_rng(seed)
    ts = np.arange(n_frames + 1) * 0.04
    d = float(ts[-1])
    raw = 0.3 * rng.normal(size=(n_frames, 2)) - 3.0  # a low, noisy background
    centers = 0.5 * (ts[:-1] + ts[1:])
    events = []
    for j, on in enumerate(np.linspace(5.0, d - 10.0, 8)):
        k = j % 2
        off = on + float(rng.uniform(0.5, 3.0))
        events.append((round(float(on), 3), round(off, 3), "ab"[k]))
        inside = (centers >= on) & (centers < off)
        raw[inside, k] += float(rng.uniform(2.0, 4.5))
        raw[inside, 1 - k] += 2.5  # cross triggers
        raw[np.roll(inside, 20) & ~inside, k] += 3.0  # a detection next to the event
    s = 1 / (1 + np.exp(-raw))
    return {"long": create_score_dataframe(s, ts, ["a", "b"])}, {"long": sorted(events)}, {"long": d}


def test_psds_on_a_long_file_is_exact_in_bounded_memory(monkeypatch):
    """sed_scores_eval evaluates every distinct score of a file as a threshold at once: (U, M, G)
    arrays (U distinct scores, M detections, G events), tens of GB for a 30-min file. The wrapper
    squeezes the stretches between events and counts the detections there in closed form, and
    goes through the thresholds in blocks without the detections that overlap no event: the
    arrays the statistics see stay small and the PSDS is bit-identical to a direct call, with
    the squeezing and without it (blocks alone)."""
    sse = _sse()
    from sed_scores_eval.intersection_based import intermediate_statistics as ib

    scores, gt, dur = _long_sed_file(3000)
    refs = {
        name: sse.intersection_based.psds(scores=scores, ground_truth=gt, audio_durations=dur, dtc_threshold=p["dtc"],
                                          gtc_threshold=p["gtc"], cttc_threshold=p["cttc"], alpha_ct=p["alpha_ct"],
                                          alpha_st=p["alpha_st"], max_efpr=p["max_efpr"])
        for name, p in (("PSDS1", M.PSDS1_PARAMS), ("PSDS2", M.PSDS2_PARAMS))
    }  # fmt: skip
    seen = record_statistics_sizes(monkeypatch, ib)
    monkeypatch.setattr(M, "INTERSECTION_BLOCK", 50_000, raising=False)  # several threshold blocks per file and class
    for squeeze in (True, False):
        if not squeeze:
            monkeypatch.setattr(M, "_squeeze_background", lambda *a: None, raising=False)
        for name, fn in (("PSDS1", M.psds1), ("PSDS2", M.psds2)):
            seen.clear()
            ours = fn(scores, gt, dur)
            ref = refs[name]
            assert 0.0 < max(ours.per_class.values()) < 1.0 and 0.0 <= ours.value < 1.0  # not trivial
            assert ours.value == ref[0] and ours.per_class == {k: float(v) for k, v in ref[1].items()}, (name, squeeze)
            np.testing.assert_array_equal(ours.etpr, ref[2][0])
            np.testing.assert_array_equal(ours.efpr, ref[2][1])
            # sed_scores_eval's own path: one (~3000 thresholds, ~1000 detections) array per class
            assert seen and max(seen) <= 100_000, (name, squeeze, len(seen), max(seen))
            if not squeeze:
                assert len(seen) > 2, (name, seen)  # the threshold blocks


def test_collar_statistics_on_a_long_file_are_exact_in_bounded_memory(monkeypatch):
    """The same for the collar-based statistics that calibration searches thresholds on: equal to
    sed_scores_eval's own, and the arrays its statistics see stay small."""
    _sse()
    from sed_scores_eval.base_modules.statistics import accumulated_intermediate_statistics_from_deltas
    from sed_scores_eval.collar_based import intermediate_statistics as cb

    scores, gt, _ = _long_sed_file(3000)
    collars = dict(onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2)
    ref = accumulated_intermediate_statistics_from_deltas(cb.intermediate_statistics_deltas(scores, gt, **collars))
    f_ref = _sse().collar_based.fscore(scores=scores, ground_truth=gt, threshold=0.5, **collars)  # direct, before recording
    seen = record_statistics_sizes(monkeypatch, cb)
    ours = accumulated_intermediate_statistics_from_deltas(M.collar_deltas(scores, gt, **collars))
    for c in ("a", "b"):
        np.testing.assert_array_equal(ours[c][0], ref[c][0])
        for k in ("tps", "fps"):
            np.testing.assert_array_equal(ours[c][1][k], ref[c][1][k])
        assert ref[c][1]["tps"].max() >= 1 and len(ref[c][0]) > 1000  # events found; thousands of thresholds
    assert seen and max(seen) <= 100_000, (len(seen), max(seen))
    # collar F1 at a threshold on raw scores (as grounding reports it) goes the same way
    seen.clear()
    f1 = M.collar_f1(scores, gt, threshold=0.5)
    assert 0.0 < f1["event_F1_micro"] < 1.0
    assert f1["event_F1_micro"] == f_ref[0]["micro_average"] and f1["event_F1_macro"] == f_ref[0]["macro_average"]
    assert seen and max(seen) <= 100_000, (len(seen), max(seen))


def test_dcase_parameter_constants():
    # DESIGN.md "Metric protocols" (cttc is not exercised by the data above, so pin it here)
    assert M.PSDS1_PARAMS == dict(dtc=0.7, gtc=0.7, cttc=None, alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0)
    assert M.PSDS2_PARAMS == dict(dtc=0.1, gtc=0.1, cttc=0.3, alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0)
    assert M.GROUNDING_PSDS_PARAMS["dtc"] == M.GROUNDING_PSDS_PARAMS["gtc"] == 0.5


def test_f1_wrappers_equal_direct_calls(sed_set):
    sse = _sse()
    scores, gt, dur = sed_set
    f, p, r, _ = sse.collar_based.fscore(
        scores=scores, ground_truth=gt, threshold=0.5, onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2
    )
    ours = M.collar_f1(scores, gt, threshold=0.5)
    assert ours["event_F1_macro"] == f["macro_average"] and ours["event_F1_micro"] == f["micro_average"]
    assert ours["event_precision_micro"] == p["micro_average"] and ours["event_recall_macro"] == r["macro_average"]
    assert {c: v["F1"] for c, v in ours["event_per_class"].items()} == {c: f[c] for c in ("a", "b", "c")}
    assert 0.0 < ours["event_F1_macro"] < 1.0
    f, p, r, _ = sse.segment_based.fscore(
        scores=scores, ground_truth=gt, audio_durations=dur, threshold=0.5, segment_length=1.0
    )
    ours = M.segment_f1(scores, gt, dur)
    assert ours["segment_F1_macro"] == f["macro_average"] and ours["segment_F1_micro"] == f["micro_average"]
    assert 0.0 < ours["segment_F1_micro"] < 1.0
    # per-class thresholds pass through
    thr = {"a": 0.3, "b": 0.5, "c": 0.7}
    f, *_ = sse.collar_based.fscore(
        scores=scores, ground_truth=gt, threshold=thr, onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2
    )
    assert M.collar_f1(scores, gt, threshold=thr)["event_F1_macro"] == f["macro_average"]


def test_sed_frame_auroc_vs_brute_force(sed_set):
    scores, gt, _ = sed_set
    got = M.sed_frame_auroc(scores, gt)
    for c in ("a", "b", "c"):
        s_all, y_all = [], []
        for key, df in scores.items():
            for _, row in df.iterrows():
                center = 0.5 * (row["onset"] + row["offset"])
                s_all.append(row[c])
                y_all.append(any(on <= center < off for on, off, lab in gt[key] if lab == c))
        assert got["frame_AUROC_per_class"][c] == pytest.approx(_brute_auc(s_all, y_all), abs=1e-12)
    assert got["frame_AUROC_macro"] == pytest.approx(np.mean(list(got["frame_AUROC_per_class"].values())))


def test_sed_input_cleaning():
    sse = _sse()
    good = _perfect_one_file()
    quiet = good["f1"].copy()
    quiet[CLASSES] = 0.1  # a second file with no events and low scores
    two = {"f1": good["f1"], "f2": quiet}
    dur = {"f1": 10.0, "f2": 10.0, "unused": 3.0}
    # a file without events may be left out of the ground truth (DCASE TSV convention)
    ref = sse.intersection_based.psds(
        scores=two, ground_truth={**GT_ONE, "f2": []}, audio_durations={"f1": 10.0, "f2": 10.0},
        dtc_threshold=0.7, gtc_threshold=0.7, alpha_st=1.0, max_efpr=100.0,
    )  # fmt: skip
    assert M.psds1(two, GT_ONE, dur).value == ref[0]
    # overlapping / touching events of a class are merged (the library asserts on them)
    split = {"f1": [(2.0, 2.3, "dog"), (2.3, 2.6, "dog"), (2.5, 2.8, "dog"), (6.0, 6.5, "cat")]}
    assert M.psds1(good, split, DUR_ONE).value == pytest.approx(1.0)
    assert M.collar_f1(good, split)["event_per_class"]["dog"]["n_ref"] == 1
    with pytest.raises(ValueError, match="no scores"):
        M.psds1(good, {**GT_ONE, "other": [(0.0, 1.0, "dog")]}, DUR_ONE)
    with pytest.raises(ValueError, match="'bird' is not a scored class"):
        M.collar_f1(good, {"f1": [(0.0, 1.0, "bird")]})
    with pytest.raises(ValueError, match="onset < offset"):
        M.collar_f1(good, {"f1": [(2.0, 1.0, "dog")]})
    with pytest.raises(ValueError, match=r"\['cat'\] have no ground-truth event"):
        M.segment_f1(good, {"f1": GT_ONE["f1"][:1]}, DUR_ONE)
    with pytest.raises(ValueError, match="no duration"):
        M.psds1(good, GT_ONE, {"zzz": 1.0})
    with pytest.raises(ValueError, match="f1.*NaN"):
        bad = good["f1"].copy()
        bad.loc[3, "dog"] = np.nan
        M.psds1({"f1": bad}, GT_ONE, DUR_ONE)
    with pytest.raises(ValueError, match="'f1'.*columns"):
        M.psds1({"f1": good["f1"][["dog", "cat"]]}, GT_ONE, DUR_ONE)


def test_scores_to_dataframe_uses_timeline():
    tl = Timeline(frame_rate_hz=25.0, offset_s=0.0)
    s = np.random.default_rng(0).random((30, 2))
    df = M.scores_to_dataframe(s, tl, CLASSES, duration_s=1.1)
    # frames starting at >= 1.1 s (28, 29) are padding and dropped; the last one ends at 1.1 s
    assert len(df) == 28 and list(df.columns) == ["onset", "offset", "dog", "cat"]
    assert df["onset"].iloc[1] == pytest.approx(0.04) and df["offset"].iloc[-1] == pytest.approx(1.1)
    np.testing.assert_array_equal(df[CLASSES].to_numpy(), s[:28])
    full = M.scores_to_dataframe(s, tl, CLASSES)
    assert len(full) == 30 and full["offset"].iloc[-1] == pytest.approx(1.2)
    with pytest.raises(ValueError, match="clashes"):
        M.scores_to_dataframe(s, tl, ["onset", "cat"])


# ============================================================================ grounding


def _grounding_set(reverse: bool = False):
    tl = Timeline(frame_rate_hz=10.0)
    spans = {"q0": [(1.0, 3.0)], "q1": [(0.5, 1.5), (6.0, 9.0)], "q2": [(4.0, 4.6)]}
    scores, dur = {}, {}
    for q, segs in spans.items():
        s = np.zeros((100, 1))
        for on, off in segs:
            s[int(on * 10) : int(off * 10), 0] = 0.9
        if reverse:
            s = 1.0 - s
        scores[q] = M.scores_to_dataframe(s, tl, [f"phrase {q}"], duration_s=10.0)
        dur[q] = 10.0
    return scores, spans, dur


def test_grounding_perfect_and_reversed():
    r = M.grounding_metrics(*_grounding_set())
    assert r["grounding_PSDS"] == pytest.approx(1.0)
    assert r["grounding_event_F1"] == 1.0
    assert r["grounding_frame_AUROC"] == 1.0
    assert r["n_queries"] == 3
    bad = M.grounding_metrics(*_grounding_set(reverse=True))
    assert bad["grounding_PSDS"] < 0.1 and bad["grounding_event_F1"] == 0.0 and bad["grounding_frame_AUROC"] == 0.0


def test_grounding_equals_direct_sed_scores_eval():
    sse = _sse()
    from sed_scores_eval.base_modules.scores import create_score_dataframe

    rng = np.random.default_rng(5)
    scores, gt, lib_scores, lib_gt, dur = {}, {}, {}, {}, {}
    ts = np.arange(101) * 0.1
    for i in range(8):
        q = f"clip{i // 2}#phrase{i}"
        on = float(rng.uniform(0, 6))
        segs = [(round(on, 2), round(on + rng.uniform(0.5, 3.0), 2))]
        s = rng.random(100)
        s[int(segs[0][0] * 10) : int(segs[0][1] * 10)] += 0.4  # overlapping score ranges: imperfect
        scores[q] = create_score_dataframe(s[:, None], ts, ["similarity"])
        lib_scores[q] = create_score_dataframe(s[:, None], ts, ["query"])
        gt[q], lib_gt[q] = segs, [(a, b, "query") for a, b in segs]
        dur[q] = 10.0
    ours = M.grounding_metrics(scores, gt, dur)
    ref = sse.intersection_based.psds(
        scores=lib_scores, ground_truth=lib_gt, audio_durations=dur,
        dtc_threshold=0.5, gtc_threshold=0.5, cttc_threshold=None, alpha_ct=0.0, alpha_st=0.0, max_efpr=100.0,
    )  # fmt: skip
    assert ours["grounding_PSDS"] == ref[0] and 0.0 < ours["grounding_PSDS"] < 1.0
    f, *_ = sse.collar_based.fscore(
        scores=lib_scores, ground_truth=lib_gt, threshold=0.5, onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2
    )
    assert ours["grounding_event_F1"] == f["query"] and 0.0 < ours["grounding_event_F1"] < 1.0
    s_all = np.concatenate([df["similarity"].to_numpy() for df in scores.values()])
    c = 0.5 * (ts[:-1] + ts[1:])
    y_all = np.concatenate([(c >= gt[q][0][0]) & (c < gt[q][0][1]) for q in scores])
    assert ours["grounding_frame_AUROC"] == pytest.approx(_brute_auc(s_all, y_all))
    with pytest.raises(ValueError, match="no ground-truth event"):
        M.grounding_metrics(scores, {q: [] for q in scores}, dur)
    with pytest.raises(ValueError, match="exactly one score column"):
        M.grounding_metrics({"q": lib_scores["clip0#phrase0"].assign(extra=0.0)}, {"q": []}, {"q": 10.0})


# ============================================================================ post-processing


def _brute_median_reflect(x: np.ndarray, n: int) -> np.ndarray:
    h = n // 2
    padded = np.concatenate([x[:h][::-1], x, x[len(x) - h :][::-1]])  # scipy 'reflect': d c b a | a b c d
    return np.array([np.median(padded[i : i + n]) for i in range(len(x))])


def test_median_filter_seconds():
    rng = np.random.default_rng(0)
    x = rng.random((50, 2))
    # 100 Hz: 0.05 s -> 5 frames; 0.04 s -> 4 frames, made odd -> 5; per-class windows
    y = M.median_filter_seconds(x, 100.0, [0.05, 0.09])
    np.testing.assert_allclose(y[:, 0], _brute_median_reflect(x[:, 0], 5))
    np.testing.assert_allclose(y[:, 1], _brute_median_reflect(x[:, 1], 9))
    np.testing.assert_allclose(M.median_filter_seconds(x, 100.0, 0.04), M.median_filter_seconds(x, 100.0, 0.05))
    np.testing.assert_array_equal(M.median_filter_seconds(x, 100.0, 0.0), x)
    # a 2-frame spike vanishes under a 0.5 s window at 10 Hz (5 frames); a 1-D input stays 1-D
    spike = np.zeros(20)
    spike[8:10] = 1.0
    assert M.median_filter_seconds(spike, 10.0, 0.5).max() == 0.0
    with pytest.raises(ValueError, match="one value per class"):
        M.median_filter_seconds(x, 100.0, [0.1, 0.2, 0.3])


def test_binarize_and_segment_matches_sed_scores_eval():
    _sse()
    from sed_scores_eval.base_modules.detection import scores_to_event_list

    tl = Timeline(frame_rate_hz=20.0)
    rng = np.random.default_rng(2)
    s = rng.random((137, 3))
    df = M.scores_to_dataframe(s, tl, ["x", "y", "z"], duration_s=6.83)
    ref = scores_to_event_list(df, np.array([0.5, 0.7, 0.3]))
    got = M.binarize_and_segment(s, tl, threshold=[0.5, 0.7, 0.3], duration_s=6.83, classes=["x", "y", "z"])
    assert len(got) == len(ref) > 10
    for (a0, a1, al), (b0, b1, bl) in zip(sorted(got), sorted(ref)):
        assert al == bl and a0 == pytest.approx(b0) and a1 == pytest.approx(b1)


def test_binarize_and_segment_merge_and_min_duration():
    tl = Timeline(frame_rate_hz=10.0)
    s = np.zeros(40)
    s[5:10] = 0.8  # 0.5-1.0 s
    s[11:15] = 0.8  # 1.1-1.5 s: gap of 0.1 s to the first
    s[30] = 0.8  # 3.0-3.1 s: 0.1 s long
    ev = M.binarize_and_segment(s, tl, 0.5)
    assert [(round(a, 6), round(b, 6)) for a, b, _ in ev] == [(0.5, 1.0), (1.1, 1.5), (3.0, 3.1)]
    ev = M.binarize_and_segment(s, tl, 0.5, min_duration_s=0.2, merge_gap_s=0.15)
    assert [(round(a, 6), round(b, 6), c) for a, b, c in ev] == [(0.5, 1.5, 0)]
    # threshold is strict (score > threshold), as in sed_scores_eval
    assert M.binarize_and_segment(s, tl, 0.8) == []
