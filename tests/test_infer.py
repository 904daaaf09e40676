"""Inference Pipeline and HEAR API on tiny CPU models saved as real checkpoints (nothing downloads).

The "local" model (CNN with eval-mode batch norm + a frame head with windowed attention) has a
receptive field well inside the streaming margin, so streamed long-audio frames must equal
one-pass frames. Its norm statistics are calibrated on a few random clips so the untrained model
actually responds to its input (otherwise every comparison below would be vacuous).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import soundfile as sf
import torch

from finelap import infer
from finelap.config import load_run_config
from finelap.errors import AudioError, CheckpointError, ConfigError, FinelapError
from finelap.hear import get_scene_embeddings, get_timestamp_embeddings, load_model
from finelap.infer import Pipeline, display_mel_stream, parse_labels
from finelap.models.audio_encoders import MaskedNorm
from finelap.models.build import build_model
from finelap.train.checkpoint import save_checkpoint
from tinyfactory import TINY_CNN, tiny_text_dir

from _figures import assert_png_picture, lane_spans, score_curves

SR = 16000


def test_signal(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise floor with a tone burst (random pitch) every half second: frames differ from each other."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SR))
    t = np.arange(n) / SR
    x = 0.05 * rng.standard_normal(n)
    for k in range(0, n, SR // 2):
        x[k : k + SR // 4] += 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t[k : k + SR // 4])
    return x.astype(np.float32)


test_signal.__test__ = False  # a helper, not a test


def make_checkpoint(root: Path, name: str = "ckpt", flam: bool = False, local: bool = True, overrides: Sequence[str] = (),
                    **eval_overrides) -> Path:  # fmt: skip
    """Tiny model -> save_checkpoint, like a training run would. clip 2 s, max 4 s (long-audio
    averaging kicks in above 4 s)."""
    text = tiny_text_dir(root / "text")
    cnn = dict(TINY_CNN, norm="batch" if local else "group")
    ov = [
        "audio.clip_seconds=2.0",
        "audio.max_seconds=4.0",
        "model.audio_encoder=cnn",
        "model.audio=" + json.dumps(cnn),
        f"model.text.path={text}",
        "model.text.freeze=true",
        "model.embed_dim=16",
        "model.frame_head_heads=2",
        "eval.prompt_template=the sound of {}",
    ]
    if local:
        ov.append("model.frame_head_window=3")
    if flam:
        ov.append("model.text_conditioned_scale_bias=true")
    ov += [f"eval.{k}={v}" for k, v in eval_overrides.items()] + list(overrides)
    cfg = load_run_config(None, ov)
    torch.manual_seed(0)
    model = build_model(cfg)
    # calibrate batch-norm statistics on random clips (momentum 1: copy the batch statistics)
    norms = [m for m in model.modules() if isinstance(m, MaskedNorm)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.encode_audio(torch.from_numpy(np.stack([test_signal(2.0, seed=s) for s in range(4)])))
    for m in norms:
        m.momentum = 0.1
    if flam:  # spread the per-text biases, so calibration is not a constant shift
        with torch.no_grad():
            torch.nn.init.normal_(model.frame_scale_bias.bias_mlp[-1].weight, std=2.0)
    model.eval()
    return save_checkpoint(root / name, model, cfg, step=0, rng=False, update_latest=False,
                           preprocessing={"frame_rate_hz": model.frame_rate_hz})  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("infer")


@pytest.fixture(scope="module")
def ckpt(root) -> Path:
    return make_checkpoint(root)


@pytest.fixture(scope="module")
def pipe(ckpt) -> Pipeline:
    return Pipeline.from_pretrained(ckpt, window_s=5.0, margin_s=2.0)


def one_pass_probs(pipe: Pipeline, wave: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the whole wave through the model at once -> (probabilities (T, N), frame embeds (T, D))."""
    with torch.inference_mode():
        a = pipe.model.encode_audio(torch.from_numpy(wave)[None])
        t = pipe.model.encode_text(texts)
        return torch.sigmoid(pipe.model.frame_logits(a, t))[0].numpy(), a.frame_embeds[0].numpy()


# ============================================================================ embeddings


def test_embed_shapes_norms_and_similarity(pipe, tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, test_signal(1.5, seed=3), SR)
    a = pipe.embed_audio([str(wav), test_signal(3.0), test_signal(0.3, seed=1)], sample_rate=SR)
    assert a.shape == (3, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert pipe.embed_audio(test_signal(1.0), sample_rate=SR).shape == (1, 16)  # a single input is one row
    t = pipe.embed_text(["a dog barking", "rain"])
    assert t.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    sim = pipe.similarity([str(wav)], ["a dog barking", "rain"])
    np.testing.assert_allclose(sim, a[:1] @ t.T, atol=1e-5)
    s, b = (float(v.detach()) for v in pipe.model.clip_scale_and_bias())
    np.testing.assert_allclose(pipe.similarity([str(wav)], ["a dog barking", "rain"], logits=True), s * sim + b, rtol=1e-5, atol=1e-4)


def test_embeddings_respond_to_input_and_batching_does_not_change_them(pipe):
    xs = [test_signal(3.0, seed=1), test_signal(1.0, seed=2), test_signal(0.01, seed=3)]
    batched = pipe.embed_audio(xs, batch_size=3, sample_rate=SR)
    single = np.concatenate([pipe.embed_audio(x, sample_rate=SR) for x in xs])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # the untrained model is not constant


def test_determinism(ckpt):
    x = test_signal(9.0, seed=4)
    p1 = Pipeline.from_pretrained(ckpt, window_s=5.0)
    p2 = Pipeline.from_pretrained(ckpt, window_s=5.0)
    np.testing.assert_array_equal(p1.embed_audio(x, sample_rate=SR), p1.embed_audio(x, sample_rate=SR))
    np.testing.assert_array_equal(p1.embed_audio(x, sample_rate=SR), p2.embed_audio(x, sample_rate=SR))
    np.testing.assert_array_equal(p1.frame_scores(x, ["dog"], sample_rate=SR).scores, p2.frame_scores(x, ["dog"], sample_rate=SR).scores)


def test_long_audio_clip_embedding_is_fixed_window_average(pipe):
    """9 s > max_seconds (4 s): windows of clip_seconds (2 s) at 0, 2, 4, 6 and the last one moved
    back to [7, 9) with weight 0.5 (it adds 1 s), averaged and renormalised; never random crops."""
    x = test_signal(9.0, seed=5)
    windows = [(0, 2, 1.0), (2, 4, 1.0), (4, 6, 1.0), (6, 8, 1.0), (7, 9, 0.5)]
    with torch.inference_mode():
        embs = [pipe.model.encode_audio(torch.from_numpy(x[a * SR : b * SR])[None]).audio_embeds[0].double() for a, b, _ in windows]
    ref = sum(w * e for (_, _, w), e in zip(windows, embs))
    ref = (ref / ref.norm()).float().numpy()
    np.testing.assert_allclose(pipe.embed_audio(x, sample_rate=SR)[0], ref, atol=1e-5)
    # up to max_seconds: one pass over the whole input
    y = x[: 4 * SR]
    with torch.inference_mode():
        whole = pipe.model.encode_audio(torch.from_numpy(y)[None]).audio_embeds[0].numpy()
    np.testing.assert_allclose(pipe.embed_audio(y, sample_rate=SR)[0], whole, atol=1e-5)


# ============================================================================ frame scores, long audio


def test_long_audio_frames_equal_one_pass(pipe):
    x = test_signal(23.0, seed=6)[: 23 * SR - 77]  # not a multiple of anything
    texts = ["a dog barking", "rain falling"]
    fs = pipe.frame_scores(x, texts, sample_rate=SR, template="{}")  # 5 s windows + 2 s margins: 5 windows; texts as given
    ref, ref_frames = one_pass_probs(pipe, x, texts)
    assert fs.scores.shape == ref.shape == (pipe.timeline.num_frames_for_samples(len(x)), 2)
    np.testing.assert_allclose(fs.scores, ref, rtol=1e-4, atol=1e-6)
    frames = pipe.embed_frames(x, sample_rate=SR).embeds
    np.testing.assert_allclose(frames, ref_frames, atol=1e-5)
    # non-vacuous: frames differ along time much more than the tolerance
    assert np.abs(ref_frames - ref_frames.mean(0)).max() > 0.1
    # seconds: frame j starts at j / 25 Hz, from the model's Timeline
    np.testing.assert_allclose(fs.times[:3], [0.0, 0.04, 0.08])
    assert fs.duration_s == pytest.approx(len(x) / SR)


def test_parallel_windows_equal_sequential_and_restore_threads(ckpt):
    x = test_signal(12.0, seed=13)
    seq = Pipeline.from_pretrained(ckpt, window_s=3.0, workers=1)
    par = Pipeline.from_pretrained(ckpt, window_s=3.0, workers=3)
    threads = torch.get_num_threads()
    np.testing.assert_allclose(par.frame_scores(x, ["dog"], sample_rate=SR).scores, seq.frame_scores(x, ["dog"], sample_rate=SR).scores, rtol=1e-5, atol=1e-7)
    xs = [test_signal(s, seed=k) for k, s in enumerate((1.0, 2.0, 3.0, 5.0))]
    np.testing.assert_allclose(par.embed_audio(xs, batch_size=1, sample_rate=SR), seq.embed_audio(xs, batch_size=1, sample_rate=SR), atol=1e-6)
    assert torch.get_num_threads() == threads  # the workers' thread setting does not leak


def test_long_file_is_streamed_from_disk_and_equals_array(pipe, tmp_path, monkeypatch):
    x = test_signal(13.0, seed=7)
    path = tmp_path / "long.flac"
    sf.write(path, x, SR)
    from_array = pipe.frame_scores(sf.read(path, dtype="float32")[0], ["dog"], sample_rate=SR)
    monkeypatch.setattr(infer.sources, "_IN_MEMORY_S", 5.0)  # force the window-by-window file reader
    src = pipe._open(path)
    assert src.wave is None  # really streamed
    from_file = pipe.frame_scores(path, ["dog"])
    np.testing.assert_allclose(from_file.scores, from_array.scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pipe.embed_audio(path), pipe.embed_audio(sf.read(path, dtype="float32")[0], sample_rate=SR), atol=1e-5)


def test_audio_shorter_than_one_frame(pipe, tmp_path):
    x = test_signal(1.0)[:100]  # 100 samples: less than one 40 ms frame
    fs = pipe.frame_scores(x, ["dog", "rain"], sample_rate=SR)
    assert fs.scores.shape == (1, 2) and np.isfinite(fs.scores).all()
    assert pipe.embed_audio(x, sample_rate=SR).shape == (1, 16)
    path = tmp_path / "tiny.wav"
    sf.write(path, x[:50], SR)
    rows = pipe.detect(path, ["dog"], threshold=0.0)
    assert rows == [{"onset": 0.0, "offset": round(50 / SR, 3), "label": "dog",
                     "score": pytest.approx(float(pipe.frame_scores(path, ["dog"]).scores.max()))}]  # fmt: skip


def test_frame_scores_dataframe_is_sed_scores_eval_format(pipe):
    x = test_signal(2.5)
    fs = pipe.frame_scores(x, ["dog", "rain"], sample_rate=SR)
    df = fs.to_dataframe()
    assert list(df.columns) == ["onset", "offset", "dog", "rain"]
    assert df["onset"].iloc[0] == 0.0 and df["offset"].iloc[-1] == pytest.approx(2.5)
    np.testing.assert_allclose(df[["dog", "rain"]].to_numpy(), fs.scores[: len(df)], rtol=1e-6)


# ============================================================================ detect / ground / classify


def _naive_segments(p: np.ndarray, thr: float, hop: float, dur: float) -> list[tuple[float, float, float]]:
    """Reference: runs of frames with p > thr, in seconds (last offset clipped), with max p."""
    out, j = [], 0
    while j < len(p):
        if p[j] > thr:
            k = j
            while k < len(p) and p[k] > thr:
                k += 1
            out.append((round(j * hop, 3), round(min(k * hop, dur), 3), float(p[j:k].max())))
            j = k
        else:
            j += 1
    return out


def test_detect_rows_match_naive_thresholding(pipe, tmp_path):
    x = test_signal(6.0, seed=8)
    path = tmp_path / "scene.wav"
    sf.write(path, x, SR)
    labels = ["dog", "rain"]
    ref = pipe.frame_scores(path, labels).scores  # same prompts as detect; the file (16-bit PCM), not the float array
    thr = float(np.median(ref[:, 0]))
    rows = pipe.detect(str(path), labels, threshold=thr)
    assert rows, "median threshold must give detections"
    for r in rows:
        assert set(r) == {"onset", "offset", "score", "label"}
        assert r["label"] in labels
        assert 0.0 <= r["onset"] < r["offset"] <= 6.0
        assert r["score"] > thr
    for k, lab in enumerate(labels):
        got = [(r["onset"], r["offset"], r["score"]) for r in rows if r["label"] == lab]
        want = _naive_segments(ref[:, k], thr, 0.04, 6.0)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-5)
    # post-processing in seconds: min duration drops short events, merge gap merges close ones
    long_only = pipe.detect(str(path), labels, threshold=thr, min_duration_s=0.3)
    assert all(r["offset"] - r["onset"] >= 0.3 - 1e-6 for r in long_only) and len(long_only) < len(rows)
    merged = pipe.detect(str(path), labels, threshold=thr, merge_gap_s=0.5)
    assert len(merged) < len(rows)
    smoothed = pipe.detect(str(path), labels, threshold=thr, median_filter_s=0.4)
    assert smoothed != rows


def test_detect_uses_checkpoint_defaults(root):
    ck = make_checkpoint(root, "ckpt_defaults", sed_threshold=0.0, min_event_s=100.0)
    p = Pipeline.from_pretrained(ck)
    assert p.detect(test_signal(2.0), ["dog"], sample_rate=SR) == []  # every event is shorter than min_event_s
    assert len(p.detect(test_signal(2.0), ["dog"], min_duration_s=0.0, sample_rate=SR)) == 1  # threshold 0: one event


def test_frame_scores_without_a_frame_objective_warn_once_on_default_threshold(root):
    clip_only = Pipeline.from_pretrained(make_checkpoint(root, "ckpt_clip_only", overrides=["loss.frame=null"]))
    assert not clip_only.frame_trained
    with pytest.warns(UserWarning, match=r"without a frame objective .*at most 0\.50"):
        clip_only.detect(test_signal(2.0), ["dog"], sample_rate=SR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_only.detect(test_signal(2.0), ["dog"], sample_rate=SR)  # once per pipeline
        fresh = Pipeline.from_pretrained(make_checkpoint(root, "ckpt_clip_only2", overrides=["loss.frame=null"]))
        fresh.detect(test_signal(2.0), ["dog"], threshold=0.3, sample_rate=SR)  # an explicit threshold is the user's choice
        framed = Pipeline.from_pretrained(make_checkpoint(root, "ckpt_framed", overrides=["loss.frame=finelap"]))
        assert framed.frame_trained
        framed.detect(test_signal(2.0), ["dog"], sample_rate=SR)


def test_ground_equals_single_label_detect(pipe):
    x = test_signal(5.0, seed=9)
    fs = pipe.frame_scores(x, ["a dog barking"], sample_rate=SR)
    thr = float(np.quantile(fs.scores, 0.6))
    segs = pipe.ground(x, "a dog barking", threshold=thr, sample_rate=SR)
    rows = pipe.detect(x, ["a dog barking"], threshold=thr, sample_rate=SR)  # one prompt rule: the checkpoint's template
    assert segs and segs == rows  # same dicts, label = the phrase


def test_classify_probabilities(pipe):
    x = test_signal(2.0, seed=10)
    labels = ["dog", "rain", "cat", "car horn"]
    full = pipe.classify(x, labels, top_k=None, sample_rate=SR)
    assert all(set(r) == {"label", "score"} for r in full)
    assert sorted(r["label"] for r in full) == sorted(labels)
    probs = [r["score"] for r in full]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
    # parity: softmax of scaled cosines with the checkpoint's template
    logits = pipe.similarity(x, [f"the sound of {l}" for l in labels], logits=True, sample_rate=SR)[0]
    ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    by_label = {r["label"]: r["score"] for r in full}
    np.testing.assert_allclose([by_label[l] for l in labels], ref, rtol=1e-4)
    assert pipe.classify(x, labels, top_k=2, sample_rate=SR) == full[:2]
    assert pipe.classify(x, "dog;rain;cat;car horn", top_k=None, sample_rate=SR) == full  # ';'-separated string
    multi = {r["label"]: r["score"] for r in pipe.classify(x, labels, top_k=None, multi_label=True, sample_rate=SR)}
    np.testing.assert_allclose([multi[l] for l in labels], 1 / (1 + np.exp(-logits)), rtol=1e-4)
    batch = pipe.classify([x, x], labels, top_k=1, sample_rate=SR)
    assert len(batch) == 2 and batch[0] == batch[1] and batch[0][0]["label"] == full[0]["label"]
    assert batch[0][0]["score"] == pytest.approx(full[0]["score"], rel=1e-5)
    other = pipe.classify(x, labels, template="{}", top_k=None, sample_rate=SR)
    assert other != full  # the template matters


# ============================================================================ input types


def test_multichannel_arrays_are_one_downmixed_clip(pipe):
    """A stereo (frames, 2) array is one clip (it used to be a batch of 48,000 one-sample rows),
    downmixed to the channel mean, whichever axis holds the channels."""
    left, right = test_signal(3.0, seed=20), test_signal(3.0, seed=21)
    stereo = np.stack([left, right], axis=1)  # (frames, 2), as soundfile reads it
    mono = (left + right) / 2
    labels = ["dog", "rain", "siren"]
    got = pipe.classify(stereo, labels, sample_rate=SR)
    assert len(got) == 3 and all(set(r) == {"label", "score"} for r in got)  # one clip, not 48,000
    want = pipe.classify(mono, labels, sample_rate=SR)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], rtol=1e-5)
    ref = pipe.embed_audio(mono, sample_rate=SR)
    np.testing.assert_allclose(pipe.embed_audio(stereo, sample_rate=SR), ref, atol=1e-6)
    np.testing.assert_allclose(pipe.embed_audio(stereo.T.copy(), sample_rate=SR), ref, atol=1e-6)  # (2, frames)
    np.testing.assert_allclose(pipe.embed_audio(torch.from_numpy(stereo), sample_rate=SR), ref, atol=1e-6)
    fs = pipe.frame_scores(stereo, ["dog"], sample_rate=SR)
    np.testing.assert_allclose(fs.scores, pipe.frame_scores(mono, ["dog"], sample_rate=SR).scores, rtol=1e-5, atol=1e-7)
    # (6, 4): both dimensions could be channels; stated, it is (samples, channels)
    tiny = np.stack([test_signal(1.0, seed=k)[:6] for k in range(4)], axis=1)  # (6, 4)
    with pytest.raises(FinelapError, match="channel_axis"):
        pipe.embed_audio(tiny, sample_rate=SR)
    np.testing.assert_allclose(pipe.embed_audio(tiny, sample_rate=SR, channel_axis=1),
                               pipe.embed_audio(tiny.mean(axis=1), sample_rate=SR), atol=1e-6)  # fmt: skip
    # a batch of clips is a list: one result per clip, in order
    batch = pipe.classify([stereo, mono], labels, sample_rate=SR)
    assert len(batch) == 2 and [r["label"] for r in batch[0]] == [r["label"] for r in want]
    with pytest.raises(FinelapError, match="as a list"):
        pipe.embed_audio(np.stack([stereo, stereo]), sample_rate=SR)  # 3-D


def test_arrays_need_a_sample_rate_and_hf_dicts_carry_it(pipe):
    x = test_signal(2.0, seed=22)
    with pytest.raises(FinelapError, match=r"audio_0: an audio array needs its sample rate: pass sample_rate="):
        pipe.classify(x, ["dog"])
    with pytest.raises(FinelapError, match="sample rate"):
        pipe.frame_scores(x, ["dog"])
    ref = pipe.embed_audio(x, sample_rate=SR)
    for key in ("array", "raw"):
        np.testing.assert_allclose(pipe.embed_audio({key: x, "sampling_rate": SR}), ref, atol=1e-6)
    # at another rate: resampled to the model's, as the array with sample_rate= is
    from finelap.audio import resample

    x8 = resample(x, SR, 8000)
    d8 = pipe.embed_audio({"array": x8, "sampling_rate": 8000})
    np.testing.assert_allclose(d8, pipe.embed_audio(x8, sample_rate=8000), atol=1e-6)
    assert np.abs(d8 - pipe.embed_audio(x8, sample_rate=SR)).max() > 1e-3  # the rate is really used
    rows = pipe.detect({"array": x, "sampling_rate": SR}, ["dog"], threshold=0.0, min_duration_s=0.0)
    assert rows == pipe.detect(x, ["dog"], threshold=0.0, min_duration_s=0.0, sample_rate=SR)
    batch = pipe.detect([{"array": x, "sampling_rate": SR}, x[: SR // 2]], ["dog"], threshold=0.0, min_duration_s=0.0,
                        sample_rate=SR)  # fmt: skip
    assert len(batch) == 2 and batch[0] == rows and batch[1][0]["offset"] == pytest.approx(0.5)
    with pytest.raises(FinelapError, match="'sampling_rate'"):
        pipe.embed_audio({"array": x})
    with pytest.raises(FinelapError, match="says sampling_rate=8000 but sample_rate=16000"):
        pipe.embed_audio({"array": x8, "sampling_rate": 8000}, sample_rate=SR)
    with pytest.raises(FinelapError, match="holds numbers"):
        pipe.embed_audio([0.0, 0.1, 0.2], sample_rate=SR)


# ============================================================================ FLAM calibration


def test_flam_calibrated_probabilities(root):
    p = Pipeline.from_pretrained(make_checkpoint(root, "flam", flam=True), window_s=5.0)
    assert p.has_calibration
    x = test_signal(7.0, seed=11)
    texts = ["a dog barking", "rain falling", "a cat meowing"]
    auto = p.frame_scores(x, texts, sample_rate=SR, template="{}")
    assert auto.calibrated
    with torch.inference_mode():
        a = p.model.encode_audio(torch.from_numpy(x)[None])
        t = p.model.encode_text(texts)
        logits = p.model.frame_logits(a, t)[0].double().numpy()
        beta = t.frame_logit_bias.double().numpy()
    assert np.ptp(beta) > 0.1  # per-text biases really differ
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    prob = sig(logits)
    np.testing.assert_allclose(auto.scores, prob / (prob + sig(beta)), rtol=1e-4)  # p / (p + sigmoid(beta))
    plain = p.frame_scores(x, texts, calibrated=False, sample_rate=SR, template="{}")
    assert not plain.calibrated
    np.testing.assert_allclose(plain.scores, prob, rtol=1e-4)
    # search-index hook: the same numbers from stored embeddings
    te = p.embed_text(texts[:1])[0]
    np.testing.assert_allclose(p.frame_scores_from_embeddings(te, a.frame_embeds[0].numpy()), auto.scores[:, 0], rtol=1e-4)


def test_calibrated_requires_per_text_bias(pipe):
    assert not pipe.has_calibration
    with pytest.raises(ConfigError, match="per-text"):
        pipe.frame_scores(test_signal(1.0), ["dog"], calibrated=True, sample_rate=SR)


# ============================================================================ bad input


def test_bad_inputs(pipe, tmp_path):
    x = test_signal(1.0)
    with pytest.raises(FinelapError, match="empty label list"):
        pipe.classify(x, [], sample_rate=SR)
    with pytest.raises(FinelapError, match="empty label list"):
        pipe.detect(x, ";", sample_rate=SR)
    with pytest.raises(FinelapError, match="duplicate label 'dog'"):
        parse_labels(["dog", "rain", "dog"])
    with pytest.raises(FinelapError, match="empty text"):
        pipe.ground(x, "  ", sample_rate=SR)
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav: file not found"):
        pipe.embed_audio([x, str(missing)], sample_rate=SR)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(AudioError, match="corrupt.wav: corrupt or unreadable"):
        pipe.detect(corrupt, ["dog"])
    with pytest.raises(FinelapError, match="empty audio"):
        pipe.embed_audio(np.zeros(0, np.float32), sample_rate=SR)
    with pytest.raises(FinelapError, match="NaN"):
        pipe.frame_scores(np.full(100, np.nan, np.float32), ["dog"], sample_rate=SR)
    with pytest.raises(ConfigError, match="template"):
        pipe.classify(x, ["dog"], template="no placeholder", sample_rate=SR)
    with pytest.raises(ConfigError, match="threshold"):
        pipe.detect(x, ["dog"], threshold=2.0, sample_rate=SR)


def test_embed_files_reports_bad_files_instead_of_raising(pipe, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, test_signal(1.0), SR)
    corrupt = tmp_path / "bad.wav"
    corrupt.write_bytes(b"not audio at all")
    res = list(pipe.embed_files([good, tmp_path / "missing.wav", corrupt], with_frames=True))
    assert [r.path.name for r in res] == ["good.wav", "missing.wav", "bad.wav"]
    assert res[0].error is None and res[1].error == "file not found" and "corrupt" in res[2].error
    np.testing.assert_allclose(res[0].clip_embedding, pipe.embed_audio(good)[0], atol=1e-6)
    assert res[0].frame_embeddings.shape == (pipe.timeline.num_frames_for_samples(SR), 16)
    assert res[0].frame_rate_hz == 25.0 and res[0].duration_s == pytest.approx(1.0)


def test_index_built_with_the_pipeline_ranks_as_its_embeddings_do(pipe, tmp_path):
    """The Pipeline is the library's own `finelap.search.Embedder`: an index built through it
    ranks files exactly as its clip/text embeddings say, and stays usable when reopened."""
    from finelap.search import Index

    lib = tmp_path / "lib"
    lib.mkdir()
    names = [f"s{i}.wav" for i in range(5)]
    for i, n in enumerate(names):
        sf.write(lib / n, test_signal(1.0 + 0.25 * i, seed=i), SR)
    (lib / "corrupt.wav").write_bytes(b"not audio at all")
    idx = Index.build(lib, pipe, tmp_path / "idx", show_progress=False)
    assert idx.paths == names and [f["path"] for f in idx.failed] == ["corrupt.wav"]
    query = "a dog barking"
    sims = pipe.embed_audio([str(lib / n) for n in names]) @ pipe.embed_text([query])[0]
    assert np.diff(np.sort(sims)).min() > 1e-4  # a strict order to check
    want = [names[i] for i in np.argsort(-sims)]
    hits = idx.search(query, k=5)
    assert [h.rel_path for h in hits] == want
    np.testing.assert_allclose([h.score for h in hits], np.sort(sims)[::-1], atol=1e-5)
    again = Index.load(tmp_path / "idx", embedder=pipe).search(query, k=5)
    assert [h.rel_path for h in again] == want


def test_checkpoint_errors(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "no_such_checkpoint")
    with pytest.raises(CheckpointError, match="not a finelap checkpoint"):
        Pipeline.from_pretrained(tmp_path)  # an existing folder that is not a checkpoint
    import shutil

    future = tmp_path / "future"
    shutil.copytree(ckpt, future)
    meta = json.loads((future / "config.json").read_text())
    meta["format_version"] = 999
    (future / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 999 is newer"):
        Pipeline.from_pretrained(future)


# ============================================================================ HEAR API


def test_hear_api(ckpt, monkeypatch):
    model = load_model(str(ckpt), window_s=5.0)
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000 and model.scene_embedding_size == 16 and model.timestamp_embedding_size == 16
    audio = torch.from_numpy(np.stack([test_signal(2.0, seed=s) for s in range(3)]))
    scene = get_scene_embeddings(audio, model)
    assert isinstance(scene, torch.Tensor) and scene.shape == (3, 16) and scene.dtype == torch.float32
    np.testing.assert_allclose(scene.numpy(), model.pipeline.embed_audio(list(audio.numpy()), sample_rate=SR), atol=1e-6)
    emb, ts = get_timestamp_embeddings(audio, model)
    t = model.pipeline.timeline.num_frames_for_samples(2 * SR)
    assert emb.shape == (3, t, 16) and ts.shape == (3, t)
    np.testing.assert_allclose(ts[0, :3].numpy(), [20.0, 60.0, 100.0])  # frame centres in ms (40 ms frames)
    assert torch.equal(ts[0], ts[2])
    for i in range(3):  # batched equals per sound
        np.testing.assert_allclose(emb[i].numpy(), model.pipeline.embed_frames(audio[i].numpy(), sample_rate=SR).embeds, atol=1e-5)
    # longer than one streaming window: streamed per sound, still equal to one pass (local model)
    long = torch.from_numpy(np.stack([test_signal(8.0, seed=s) for s in range(2)]))
    emb_l, ts_l = get_timestamp_embeddings(long, model)
    _, ref = one_pass_probs(model.pipeline, long[1].numpy(), ["dog"])
    np.testing.assert_allclose(emb_l[1].numpy(), ref, atol=1e-5)
    assert ts_l.shape == emb_l.shape[:2]
    monkeypatch.delenv("FINELAP_CHECKPOINT", raising=False)
    with pytest.raises(CheckpointError, match="FINELAP_CHECKPOINT"):
        load_model("")
    monkeypatch.setenv("FINELAP_CHECKPOINT", str(ckpt))
    assert load_model("").scene_embedding_size == 16
    with pytest.raises(FinelapError, match="n_sounds, n_samples"):
        get_scene_embeddings(audio[0], model)


# ============================================================================ plots


def test_display_mel_stream_equals_one_pass_log_mel(pipe):
    from finelap.audio import LogMel

    x = test_signal(70.0, seed=12)
    src = pipe._open(x, SR)
    db, tl, cfg = display_mel_stream(src, SR, max_columns=50)  # pool 141 frames, 2 chunks
    with torch.inference_mode():
        full = LogMel(cfg)(torch.from_numpy(x)).numpy()
    pool = tl.downsample
    assert pool == 141 and db.shape[1] == -(-full.shape[1] // pool)
    ref = np.stack([full[:, i : i + pool].mean(axis=1) for i in range(0, full.shape[1], pool)], axis=1)
    np.testing.assert_allclose(db, ref, atol=2e-3)


def test_plot_shows_the_scores_segments_and_spectrogram(pipe, tmp_path, saved_figures):
    x = test_signal(3.0)
    fs = pipe.frame_scores(x, ["dog", "rain"], sample_rate=SR)
    out = pipe.plot(x, fs, tmp_path / "p.png", segments=[[(0.5, 1.0)], []], threshold=0.5, sample_rate=SR,
                    reference=[[(0.4, 1.2)], [(2.0, 2.5)]])  # fmt: skip
    assert out == tmp_path / "p.png"
    assert_png_picture(out)
    (fig,) = saved_figures
    curves = score_curves(fig)
    np.testing.assert_allclose(np.stack([curves["dog"], curves["rain"]], axis=1), fs.scores)
    np.testing.assert_allclose(lane_spans(fig, "detected: dog"), [(0.5, 1.0)])
    assert lane_spans(fig, "detected: rain").size == 0
    np.testing.assert_allclose(lane_spans(fig, "reference: rain"), [(2.0, 2.5)])
    spec = fig.axes[0]
    assert spec.get_xlim() == pytest.approx((0.0, 3.0)) and spec.images[0].get_extent()[1] == pytest.approx(3.0, abs=0.05)
