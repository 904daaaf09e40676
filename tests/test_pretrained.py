"""The pretrained aisfx audio tower: front-end, network layout, safe loading, streaming, feature cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finelap.errors import CheckpointError, ConfigError
from finelap.models import pretrained as P
from finelap.models.feature_cache import FeatureCache, supports_feature_cache
from finelap.models.pretrained import AisfxEncoder, AisfxFrontEnd, htk_mel_filterbank


def _weights_installed() -> bool:
    try:
        P.aisfx_weight_file()
        return True
    except CheckpointError:
        return False


needs_weights = pytest.mark.skipif(not _weights_installed(), reason="aisfx==0.1.2 is not installed (make install adds it with --no-deps)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aisfx_cache")


@pytest.fixture(scope="module")
def state(cache) -> dict:
    if not _weights_installed():
        pytest.skip("aisfx==0.1.2 is not installed")
    return P.aisfx_state_dict(cache=cache)


def _encoder(state: dict | None = None, **kw) -> AisfxEncoder:
    enc = AisfxEncoder(pretrained=False, **kw)
    if state is not None:
        enc.net.load_state_dict(state)
    else:  # random weights and non-trivial BN statistics, so layout bugs show
        torch.manual_seed(0)
        for m in enc.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)
    return enc


# ----------------------------------------------------------------------------- front-end


def test_mel_filterbank_matches_librosa_htk_l1():
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=44100, n_fft=2048, n_mels=96, fmin=0.0, fmax=22050.0, htk=True, norm=1)
    ours = htk_mel_filterbank()
    assert ours.shape == (96, 1025)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-9)  # every triangle sums to 1


def _librosa_logmel(y: np.ndarray) -> np.ndarray:
    import librosa

    s = librosa.feature.melspectrogram(y=y, sr=44100, n_fft=2048, win_length=2048, hop_length=1024, n_mels=96, fmin=0.0,
                                       fmax=22050.0, htk=True, norm=1.0, power=2.0, center=True, pad_mode="constant")
    return (np.log10(s * 1e4 + 1.0) / P.LOG_SCALE).T  # (T, 96)


def test_frontend_matches_librosa_on_a_tone_and_noise():
    pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    t = np.arange(44100 * 2) / 44100
    y = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    out, n = AisfxFrontEnd()(torch.from_numpy(y)[None], torch.tensor([y.size]))
    ref = _librosa_logmel(y)
    assert out.shape[1] == ref.shape[0] == 1 + y.size // 1024 and int(n[0]) == ref.shape[0]
    assert float(np.abs(out[0].numpy() - ref).max()) < 1e-4


def test_frontend_matches_librosa_on_real_esc50(esc50_dir):
    pytest.importorskip("librosa")
    from finelap.audio import load_audio

    files = sorted((esc50_dir / "audio").glob("*.ogg"))[:6]
    fe = AisfxFrontEnd()
    worst = 0.0
    for f in files:
        y = load_audio(f, 44100)
        out, _ = fe(torch.from_numpy(y)[None], torch.tensor([y.size]))
        worst = max(worst, float(np.abs(out[0].numpy() - _librosa_logmel(y)).max()))
    assert worst < 1e-4, worst  # measured ~6e-6 (float32 STFT vs librosa's)


# ----------------------------------------------------------------------------- network


def _reference_embedding(state: dict, logmel: torch.Tensor) -> torch.Tensor:
    """The released network's forward written out op by op from its state dict (no finelap module):
    4 x [conv3x3 -> BN -> ReLU] x 2, max-pool 2x2 after blocks 1-3, frequency mean, time max."""
    x = logmel[:, None]
    for b in range(1, 5):
        for j in (1, 2):
            x = F.conv2d(x, state[f"conv_block{b}.conv{j}.weight"], padding=1)
            x = F.batch_norm(x, state[f"conv_block{b}.bn{j}.running_mean"], state[f"conv_block{b}.bn{j}.running_var"],
                             state[f"conv_block{b}.bn{j}.weight"], state[f"conv_block{b}.bn{j}.bias"], False, 0.0, 1e-5)
            x = F.relu(x)
        if b < 4:
            x = F.max_pool2d(x, 2)
    return x.mean(3).amax(2)


@pytest.mark.parametrize("pretrained", [False, True])
def test_original_layout_gives_the_reference_embedding(pretrained, request):
    state = request.getfixturevalue("state") if pretrained else None
    enc = _encoder(state, layers=(4,), hop_frames=8)
    sd = {k: v for k, v in enc.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.manual_seed(1)
    wave = 0.1 * torch.randn(2, 1024 * (8 * 17 - 1))  # 1 + N // 1024 = 136 mel frames: no partial pools
    with torch.no_grad():
        mel, _ = enc.frontend(wave, torch.tensor([wave.shape[1]] * 2))
        ref = _reference_embedding(sd, mel)
        ours = enc(wave).cls
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_dilated_map_even_frames_equal_the_original_map():
    enc4, enc8 = _encoder(layers=(4,), hop_frames=4), _encoder(layers=(4,), hop_frames=8)
    enc8.net.load_state_dict(enc4.net.state_dict())
    wave = 0.1 * torch.randn(1, 44100 * 4)
    with torch.no_grad():
        a, b = enc4(wave).frames[0], enc8(wave).frames[0]
    assert a.shape[0] == 2 * b.shape[0] - (1 if enc4.num_frames(wave.shape[1]) % 2 else 0) or a.shape[0] in (2 * b.shape[0], 2 * b.shape[0] - 1)
    torch.testing.assert_close(a[0::2][: b.shape[0] - 1], b[:-1], atol=1e-5, rtol=1e-5)
    assert enc4.frame_rate_hz == pytest.approx(44100 / 4096) and enc8.frame_rate_hz == pytest.approx(44100 / 8192)


@pytest.mark.parametrize("layers", [(4, 2), (4,), (1, 3)])
def test_padded_batch_equals_single_item_passes(layers):
    enc = _encoder(layers=layers)
    lengths = torch.tensor([44100 * 3, 44100 + 777, 5000, 2047])
    wave = 0.1 * torch.randn(4, int(lengths.max()))
    with torch.no_grad():
        out = enc(wave, lengths)
        for i, n in enumerate(lengths.tolist()):
            one = enc(wave[i : i + 1, :n])
            t = one.frames.shape[1]
            assert int(out.frame_mask[i].sum()) == t == enc.num_frames(n)
            torch.testing.assert_close(out.frames[i, :t], one.frames[0], atol=1e-5, rtol=1e-5)
            assert float(out.frames[i, t:].abs().max() if t < out.frames.shape[1] else 0.0) == 0.0
            torch.testing.assert_close(out.cls[i], one.cls[0], atol=1e-5, rtol=1e-5)
    assert out.frames.shape[-1] == enc.dim == sum(P.CHANNELS[i - 1] for i in layers)


def test_streamed_long_audio_equals_one_pass():
    from finelap.streaming import array_reader, stream_frames

    enc = _encoder()
    x = (0.1 * np.random.default_rng(0).standard_normal(44100 * 25)).astype(np.float32)
    with torch.no_grad():
        whole = enc(torch.from_numpy(x)[None]).frames[0]
    chunks = list(stream_frames(lambda w, n: enc(w, n).frames, array_reader(x), x.size, enc.timeline, window_s=6.0, margin_s=2.0))
    stitched = torch.cat([c for _, c in chunks])
    assert stitched.shape == whole.shape and len(chunks) > 3
    torch.testing.assert_close(stitched, whole, atol=1e-4, rtol=1e-4)


def test_freeze_and_trainable_blocks():
    enc = _encoder()
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc2 = AisfxEncoder(pretrained=False, freeze=False, trainable_blocks=1)
    trainable = {n.split(".")[1] for n, p in enc2.named_parameters() if p.requires_grad}
    assert trainable == {"conv_block4"}
    enc2.train()
    assert not any(m.training for m in enc2.net.modules() if isinstance(m, torch.nn.BatchNorm2d))  # BN stats stay fixed
    with pytest.raises(ConfigError, match="layers"):
        AisfxEncoder(pretrained=False, layers=(5,))
    with pytest.raises(ConfigError, match="hop_frames"):
        AisfxEncoder(pretrained=False, hop_frames=2)


# ----------------------------------------------------------------------------- safe loading


@needs_weights
def test_weights_convert_once_and_reload_from_the_cache(tmp_path, monkeypatch):
    sd = P.aisfx_state_dict(cache=tmp_path)
    assert len(sd) == 40 and sd["conv_block4.conv2.weight"].shape == (512, 512, 3, 3)
    files = list(tmp_path.glob("aisfx-*.safetensors"))
    assert len(files) == 1
    # the second load must not touch the pickle
    monkeypatch.setattr(P, "_load_pickle_safely", lambda p: (_ for _ in ()).throw(AssertionError("unpickled again")))
    again = P.aisfx_state_dict(cache=tmp_path)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


@needs_weights
def test_a_modified_weight_file_is_refused_before_unpickling(tmp_path, monkeypatch):
    bad = tmp_path / "checkpoint.pth"
    shutil.copy(P.aisfx_weight_file(), bad)
    with open(bad, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    called = []
    monkeypatch.setattr(P, "_load_pickle_safely", lambda p: called.append(p))
    with pytest.raises(CheckpointError, match="sha256"):
        P.aisfx_state_dict(bad, cache=tmp_path / "c")
    assert not called


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps aisfx==0.1.2"):
        P.aisfx_weight_file()


@needs_weights
def test_pretrained_features_separate_real_classes(esc50_dir, state):
    """The released weights must describe real sounds: nearest-centroid on clip vectors of two
    ESC-50 classes (fold 1 centroids, fold 2 queries) is far above chance."""
    from finelap.audio import load_audio
    from finelap.data.manifests import read_esc50_csv

    clips = [c for c in read_esc50_csv(esc50_dir / "meta" / "esc50.csv", esc50_dir / "audio") if c.labels[0] in ("dog", "rain", "church_bells", "crow", "siren", "rooster")]
    enc = _encoder(state, layers=(4,))
    vec = {}
    with torch.no_grad():
        for c in clips:
            if int(c.meta["fold"]) in (1, 2):
                vec[c.key] = enc(torch.from_numpy(load_audio(c.audio, 44100))[None]).cls[0]
    classes = sorted({c.labels[0] for c in clips})
    cent = torch.stack([torch.stack([vec[c.key] for c in clips if c.labels[0] == k and int(c.meta["fold"]) == 1]).mean(0) for k in classes])
    test = [c for c in clips if int(c.meta["fold"]) == 2 and c.key in vec]
    pred = [int(torch.cdist(vec[c.key][None], cent).argmin()) for c in test]
    acc = np.mean([classes[p] == c.labels[0] for p, c in zip(pred, test)])
    assert acc > 0.6, acc  # chance is 1/len(classes) (< 0.2 here)


# ----------------------------------------------------------------------------- feature cache


def test_feature_cache_returns_exactly_the_encoder_output_and_persists(tmp_path):
    enc = _encoder()
    assert supports_feature_cache(enc)
    lengths = torch.tensor([44100 * 2, 30000, 44100])
    wave = 0.1 * torch.randn(3, int(lengths.max()))
    with torch.no_grad():
        ref = enc(wave, lengths)
    cache = FeatureCache(tmp_path)
    got = cache.encode(enc, wave, lengths)
    assert cache.stats()["misses"] == 3
    for a, b in ((got.frames, ref.frames), (got.cls, ref.cls)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.frame_mask, ref.frame_mask)
    # the same inputs in another order and batch: all hits; a fresh cache object reads the disk
    again = FeatureCache(tmp_path).encode(enc, wave[[2, 0]], lengths[[2, 0]])
    torch.testing.assert_close(again.frames[1], ref.frames[0])
    # one changed sample is a different input
    w2 = wave.clone()
    w2[0, 5] += 0.01
    c2 = FeatureCache(tmp_path)
    c2.encode(enc, w2[:1], lengths[:1])
    assert c2.stats()["misses"] == 1
    # different tower options never share entries
    other = _encoder(layers=(4,))
    assert other.cache_key() != enc.cache_key()
    # the key is remembered, and changes when the weights change in place (e.g. load_state_dict)
    key = enc.cache_key()
    assert enc.cache_key() == key
    state = {k: v.clone() for k, v in enc.net.state_dict().items()}
    state["conv_block1.conv1.weight"][0, 0, 0, 0] += 1.0
    enc.net.load_state_dict(state)
    assert enc.cache_key() != key


def test_unfrozen_tower_is_not_cached():
    enc = AisfxEncoder(pretrained=False, freeze=False)
    assert not supports_feature_cache(enc)


def test_cached_and_uncached_training_give_the_same_loss(tmp_path):
    """One training step's loss terms and gradients are the same with and without the cache."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tinyfactory import tiny_dataset, tiny_overrides

    from finelap.config import load_run_config
    from finelap.data.batching import ClipDataset, Collate, split_by_supervision
    from finelap.data.manifests import read_manifest
    from finelap.losses.compose import LossConfig
    from finelap.models.build import build_model
    from finelap.train.loop import build_clusters, forward_backward

    man = tiny_dataset(tmp_path / "data", n=6)
    ov = [o for o in tiny_overrides(tmp_path, man) if not o.startswith(("model.audio=", "model.audio_encoder="))]
    cfg = load_run_config("sfx", ov + ['model.audio={"layers": [4, 2], "freeze": true, "pretrained": false}',
                                       "model.embed_dim=32"])  # the recipe has no text projection: embed_dim = the text width
    torch.manual_seed(0)
    model = build_model(cfg)
    clips = read_manifest(man)
    clusters = build_clusters(model, clips, cfg)
    ds = ClipDataset(clips, model.sample_rate, 2.0, random_crop=False, clusters=clusters, phrases_per_clip=4)
    batch = Collate(model.timeline, 4)([ds[i] for i in range(6)])
    loss_cfg = cfg.loss if isinstance(cfg.loss, LossConfig) else LossConfig(**cfg.loss)
    model.train()
    t1 = forward_backward(model, loss_cfg, batch, clusters)
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.feature_cache = FeatureCache(None)
    t2 = forward_backward(model, loss_cfg, batch, clusters)  # fills the cache
    model.zero_grad(set_to_none=True)
    t3 = forward_backward(model, loss_cfg, batch, clusters)  # reads it
    g3 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model.feature_cache.stats()["hits"] == 6 and model.feature_cache.stats()["misses"] == 6
    assert set(t1) == set(t3)
    for k in t1:
        assert t1[k] == pytest.approx(t2[k], rel=1e-5, abs=1e-6) and t1[k] == pytest.approx(t3[k], rel=1e-5, abs=1e-6)
    assert set(g1) == set(g3) and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g3[n], atol=1e-5, rtol=1e-4)
    # digests made where the batch is collated (the loading workers) name the same entries
    from finelap.data.batching import wave_digest

    batch_d = Collate(model.timeline, 4, digests=True)([ds[i] for i in range(6)])
    assert batch_d.wave_digests == [wave_digest(batch.wave[i, : int(batch.lengths[i])]) for i in range(6)]
    assert len(set(batch_d.wave_digests)) == 6
    model.zero_grad(set_to_none=True)
    t4 = forward_backward(model, loss_cfg, batch_d, clusters)
    assert model.feature_cache.stats()["hits"] == 12 and model.feature_cache.stats()["misses"] == 6
    assert all(t4[k] == pytest.approx(t1[k], rel=1e-5, abs=1e-6) for k in t1)


def test_workers_skip_decoding_inputs_whose_features_are_on_disk(tmp_path):
    """With a cache folder, items are named by file identity; once their features are on disk the
    loader returns them undecoded, and the step's loss is the same as with decoded audio."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tinyfactory import tiny_dataset, tiny_overrides

    from finelap.config import load_run_config
    from finelap.data.batching import ClipDataset, Collate
    from finelap.data.manifests import read_manifest
    from finelap.losses.compose import LossConfig
    from finelap.models.build import build_model
    from finelap.models.feature_cache import CachedOnDisk
    from finelap.train.loop import build_clusters, forward_backward

    man = tiny_dataset(tmp_path / "data", n=6)
    ov = [o for o in tiny_overrides(tmp_path, man) if not o.startswith(("model.audio=", "model.audio_encoder="))]
    cfg = load_run_config("sfx", ov + ['model.audio={"layers": [4, 2], "freeze": true, "pretrained": false}', "model.embed_dim=32"])
    torch.manual_seed(0)
    model = build_model(cfg)
    clips = read_manifest(man)
    clusters = build_clusters(model, clips, cfg)
    loss_cfg = cfg.loss if isinstance(cfg.loss, LossConfig) else LossConfig(**cfg.loss)
    model.train()
    ds = ClipDataset(clips, model.sample_rate, 1.5, random_crop=True, clusters=clusters, phrases_per_clip=4)
    keys = [(3, i, i) for i in range(6)]  # (step, slot, index): random crops of the 2-s clips
    plain = Collate(model.timeline, 4)([ds[k] for k in keys])
    t0 = forward_backward(model, loss_cfg, plain, clusters)
    model.zero_grad(set_to_none=True)

    model.feature_cache = FeatureCache(tmp_path / "cache")
    ds.skip_decode = CachedOnDisk(tmp_path / "cache", model.audio.cache_key())
    first = Collate(model.timeline, 4, digests=True)([ds[k] for k in keys])
    assert first.wave_decoded is None and all(d.startswith("file:") for d in first.wave_digests)
    torch.testing.assert_close(first.wave, plain.wave)  # the same crops as without skipping
    t1 = forward_backward(model, loss_cfg, first, clusters)  # computes and stores the features
    model.zero_grad(set_to_none=True)
    second = Collate(model.timeline, 4, digests=True)([ds[k] for k in keys])
    assert second.wave_decoded == [False] * 6 and not second.wave.abs().any()
    assert second.wave_digests == first.wave_digests and torch.equal(second.lengths, plain.lengths)
    assert second.events == plain.events and second.phrases == plain.phrases and second.captions == plain.captions
    model.feature_cache = FeatureCache(tmp_path / "cache")  # a new process: only the disk has them
    t2 = forward_backward(model, loss_cfg, second, clusters)
    assert model.feature_cache.stats()["disk_hits"] == 6 and model.feature_cache.stats()["misses"] == 0
    for k in t0:
        assert t1[k] == pytest.approx(t0[k], rel=1e-5, abs=1e-6) and t2[k] == pytest.approx(t0[k], rel=1e-5, abs=1e-6)
    # an edited file gets a new key and is decoded again
    path = Path(str(clips[0].audio))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = Collate(model.timeline, 4, digests=True)([ds[k] for k in keys])
    assert third.wave_decoded == [True] + [False] * 5 and third.wave_digests[0] != first.wave_digests[0]
    # entries that vanish between loading and encoding: a clear error, never features of silence
    import shutil

    shutil.rmtree(tmp_path / "cache")
    model.feature_cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="cache folder cleaned"):
        forward_backward(model, loss_cfg, second, clusters)


def test_length_groups_keep_similar_lengths_together():
    from finelap.models.feature_cache import _length_groups

    lengths = [441000, 220500, 441000, 220500, 230000, 10]
    groups = _length_groups(lengths, [10, 11, 12, 13, 14, 15], max_group=2)
    assert sorted(i for g in groups for i in g) == [10, 11, 12, 13, 14, 15]
    for g in groups:
        ls = [lengths[i - 10] for i in g]
        assert max(ls) <= 1.25 * min(ls) and len(g) <= 2


def test_no_checkpoint_tells_the_user_what_to_pass(monkeypatch):
    from finelap.infer import Pipeline

    monkeypatch.delenv("FINELAP_CHECKPOINT", raising=False)
    with pytest.raises(CheckpointError, match="make demo"):
        Pipeline.from_pretrained()

def test_cli_without_checkpoint_says_how_to_get_one(monkeypatch, capsys, tmp_path):
    import soundfile as sf

    from finelap.cli import main

    monkeypatch.delenv("FINELAP_CHECKPOINT", raising=False)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    rc = main(["classify", str(wav), "--labels", "dog;rain"])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint DIR" in err and "make demo" in err and "Traceback" not in err
