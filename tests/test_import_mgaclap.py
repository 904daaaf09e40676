"""`finelap import mgaclap`: MGA-CLAP's `model.pt` layout becomes a finelap checkpoint whose frame
embeddings, codebook clip/text embeddings and frame scores equal an independent computation.

What these tests prove: for random weights in a tiny config of the layout read from Ming-er/MGA-CLAP
(tests/_import_fixtures_mga.py), (1) finelap's front-end equals transformers' ClapFeatureExtractor
log-mel at MGA-CLAP's settings (32 kHz, STFT 1024 / hop 320, 64 slaney mel bands 50-14000 Hz) to
1e-4 dB; (2) the imported model's frame embeddings equal the locality-aware frames computed here
from transformers' ClapAudioModel (the HTS-AT trunk) plus a plain-torch restatement of MGA-CLAP's
value path, regrouping and frame_proj; its clip and text embeddings equal a naive restatement of
the shared codebook (affinities / sqrt(E) / 1000, word mask multiplied in, sorted-threshold
sparsemax) on transformers' BertModel; and the (streamed) frame scores equal sigmoid(cos / temp), all
to 1e-4; mutations (plain HTS-AT frames, excluded instead of zeroed masked words) change the
result; (3) the import runs through the CLI. What they cannot prove: that the Drive release holds
exactly the fixture's key set (read from the code, not from the file), and the published numbers.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from finelap.cli import main
from finelap.infer import Pipeline
from finelap.models.build import load_pretrained
from finelap.models.published import ReferenceLogMel, SourceError, import_checkpoint

from _import_fixtures import cli_detect_and_ground, cli_zeroshot, roberta_dir, save_laion_pt, tiny_clap, write_noise_clips
from _import_fixtures_mga import TEMP, bert_dir, bert_tokenizer, mga_state, save_mga_pt, tiny_mga

SR = 32000
TEXTS = ["a dog barks", "siren", "an engine idling nearby can be heard"]


def _features(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """transformers' ClapFeatureExtractor log-mel at MGA-CLAP's front-end settings, (K, 1, T, n_mels)."""
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(feature_size=n_mels, sampling_rate=SR, hop_length=320, fft_window_size=1024,
                              frequency_min=50, frequency_max=14000)  # fmt: skip
    mel = np.stack([fe._np_extract_fbank_features(w.double().numpy(), fe.mel_filters_slaney) for w in wave])
    return torch.from_numpy(mel).float()[:, None]


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])


def _proj(x, sd, name):
    """MGA-CLAP's frame_proj / word_proj: LayerNorm, Linear, GELU, LayerNorm, Linear."""
    h = F.gelu(F.linear(_ln(x, sd, name + ".0"), sd[name + ".1.weight"], sd[name + ".1.bias"]))
    return F.linear(_ln(h, sd, name + ".3"), sd[name + ".4.weight"], sd[name + ".4.bias"])


def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo (2016), row-wise: tau from the largest k with 1 + k z_(k) > sum_{j<=k} z_(j)."""
    out = torch.empty_like(z)
    for i, row in enumerate(z.double()):
        zs = torch.sort(row, descending=True).values
        ks = [k for k in range(1, len(zs) + 1) if 1 + k * zs[k - 1] > zs[:k].sum()]
        k = max(ks)
        tau = (zs[:k].sum() - 1) / k
        out[i] = torch.clamp(row - tau, min=0).to(z.dtype)
    return out


def _codebook(x: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Modality_Shared_Codebook as written in the reference: (x C^T / sqrt(E)) * mask / 1000, max over
    steps, sparsemax, weights @ C; then L2-normalised as the callers do."""
    a = x @ codebook.T / math.sqrt(codebook.shape[1])
    if mask is not None:
        a = a * mask[..., None]
    a = (a / 1000.0).amax(1)
    return F.normalize(_sparsemax(a) @ codebook, dim=-1), _sparsemax(a)


def _reference(clap, bert, sd, wave, texts, tok) -> dict[str, torch.Tensor]:
    """Frames of MGA-CLAP's locality-aware block, restated with plain ops on the fixture's tensors
    (LAION/MGA names), on top of transformers' HTS-AT trunk; text through transformers' BertModel."""
    cfg = clap.config.audio_config
    am = clap.audio_model
    enc = am.audio_encoder
    with torch.no_grad():
        out = am(input_features=_features(wave, cfg.num_mel_bins), output_hidden_states=True)
        # input of the last stage (after the previous stage's patch merging), then its blocks but the last
        x = out.hidden_states[-2]  # (K, C, H, W)
        k, c, hh, ww = x.shape
        h = x.permute(0, 2, 3, 1).reshape(k, hh * ww, c)
        last = len(cfg.depths) - 1
        for blk in enc.layers[last].blocks[:-1]:
            h = blk(h, (hh, ww))[0]
        pre = f"audio_encoder.audio_enc.layers.{last}.blocks.{cfg.depths[last] - 1}."
        qkv_w, qkv_b = sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]
        value = F.linear(_ln(h, sd, pre + "norm1"), qkv_w[2 * c :], qkv_b[2 * c :])
        v = h + F.linear(value, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        v = v + _ln(v, sd, pre + "norm2")
        v = _ln(v, sd, "audio_encoder.audio_enc.norm")
        # HTSAT_Swin_Transformer.forward_features' regrouping, step by step
        ratio = cfg.spec_size // cfg.num_mel_bins
        v = v.permute(0, 2, 1).contiguous().reshape(k, c, hh, ww)
        cfb = hh // ratio
        v = v.reshape(k, c, hh // cfb, cfb, ww).permute(0, 1, 3, 2, 4).contiguous().reshape(k, c, cfb, -1)
        frame_feats = v.mean(2).permute(0, 2, 1)  # (K, T', C)
        frame_proj = _proj(frame_feats, sd, "frame_proj")
        audio, aw = _codebook(frame_proj, sd["codebook"])
        t = tok(texts, padding="longest", truncation=True, max_length=30, return_tensors="pt", return_special_tokens_mask=True)
        hs = bert(input_ids=t["input_ids"], attention_mask=t["attention_mask"])[0]
        words = _proj(hs[:, 1:], sd, "word_proj")
        mask = (1 - t["special_tokens_mask"][:, 1:]).float()
        text, tw = _codebook(words, sd["codebook"], mask)
        frames = F.normalize(frame_proj, dim=-1)
    return {"frames": frames, "audio": audio, "text": text, "audio_w": aw, "text_w": tw, "words": words, "mask": mask,
            "plain_frames": F.normalize(_proj(out.last_hidden_state.mean(2).transpose(1, 2), sd, "frame_proj"), dim=-1)}  # fmt: skip


def test_front_end_equals_clap_feature_extractor_at_mga_settings():
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 20000)) * 0.1).float()
    ref = _features(w, 64)[:, 0].double().numpy()
    got = ReferenceLogMel(SR, 1024, 320, 64, 50.0, 14000.0, "slaney")(w).double().numpy()
    assert got.shape == ref.shape == (2, 1 + 20000 // 320, 64)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_mgaclap_imports_with_parity(tmp_path):
    clap, bert = tiny_mga(seed=3)
    pt = save_mga_pt(tmp_path / "model.pt", clap, bert, seed=1)
    sd = mga_state(clap, bert, seed=1)
    ckpt = import_checkpoint("mgaclap", pt, bert_dir(bert, tmp_path / "bert"), tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    audio_cfg = meta["config"]["model"]["audio"]
    assert audio_cfg["locality_aware"] is True and audio_cfg["sample_rate"] == SR and audio_cfg["hop_length"] == 320
    assert audio_cfg["mel_scale"] == "slaney" and audio_cfg["config"]["spec_size"] == 64
    assert meta["preprocessing"]["imported_from"] == "mgaclap"
    fl, run_cfg, _ = load_pretrained(ckpt)
    assert run_cfg.eval.prompt_template == "{} can be heard"
    assert not list((ckpt / "text").glob("*.safetensors"))
    win, fpw = fl.audio.backend.window_samples, fl.audio.backend.frames_per_window
    assert fl.timeline.frame_rate_hz == pytest.approx(SR * fpw / win)
    g = torch.Generator().manual_seed(5)
    wave = 0.3 * torch.randn(2, win, generator=g)
    tok = bert_tokenizer(tmp_path / "tok")
    ref = _reference(clap, bert, sd, wave, TEXTS, tok)
    assert 1 < int((ref["audio_w"] > 0).sum(1).min()) and int((ref["audio_w"] > 0).sum(1).max()) < ref["audio_w"].shape[1]  # sparse
    with torch.no_grad():
        a, t = fl.encode_audio(wave), fl.encode_text(TEXTS)
        assert a.frame_mask.sum(1).tolist() == [fpw, fpw]
        torch.testing.assert_close(a.frame_embeds[:, :fpw], ref["frames"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.audio_embeds, ref["audio"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.codebook_weights, ref["audio_w"], atol=1e-4, rtol=0)
        torch.testing.assert_close(t.text_embeds, ref["text"], atol=1e-4, rtol=0)
        torch.testing.assert_close(fl.clip_logits(a, t), ref["audio"] @ ref["text"].T / TEMP, atol=1e-3, rtol=0)
        cos = ref["frames"] @ ref["text"].T  # (2, T', N): the authors' frame scores
        torch.testing.assert_close(fl.frame_logits(a, t)[:, :fpw] * TEMP, cos, atol=1e-4, rtol=0)
        assert (ref["plain_frames"] - ref["frames"]).abs().max() > 1e-2  # mutation: plain HTS-AT frames differ
        # a codebook of small affinities, where sparsemax's support reaches codewords that no real word
        # matches: there the masked positions' zeros decide the text embedding
        small = mga_state(clap, bert, seed=1, codebook_scale=100.0)
        fl.codebook.codebook.copy_(small["codebook"])
        ref2 = _reference(clap, bert, small, wave, TEXTS, tok)
        a2, t2 = fl.encode_audio(wave), fl.encode_text(TEXTS)
        torch.testing.assert_close(a2.audio_embeds, ref2["audio"], atol=1e-4, rtol=0)
        torch.testing.assert_close(t2.text_embeds, ref2["text"], atol=1e-4, rtol=0)
        cb = small["codebook"]
        excl = (ref2["words"] @ cb.T / math.sqrt(cb.shape[1]) / 1000.0).masked_fill(ref2["mask"][..., None] == 0, float("-inf")).amax(1)
        assert (F.normalize(_sparsemax(excl) @ cb, dim=-1) - ref2["text"]).abs().max() > 1e-2  # mutation: excluding them differs
        fl.codebook.codebook.copy_(sd["codebook"])
    # Pipeline.frame_scores streams; two windows of audio are scored as two independent windows
    pipe = Pipeline.from_pretrained(ckpt)
    long = torch.cat([wave[0], wave[1]])
    fs = pipe.frame_scores(long.numpy(), TEXTS, sample_rate=SR, template="{}")  # the SED / grounding scripts: bare texts
    want = torch.sigmoid(torch.cat([cos[0], cos[1]]) / TEMP).numpy()
    assert fs.scores.shape[0] >= 2 * fpw
    np.testing.assert_allclose(fs.scores[: 2 * fpw], want, atol=1e-4, rtol=0)
    assert not pipe.frame_trained  # no frame objective upstream: thresholds need calibration
    # a file of many windows, streamed in chunks on 3 threads, equals one pass on the file's window grid
    par = Pipeline.from_pretrained(ckpt, window_s=6.0, margin_s=1.0, workers=3)
    n = int(7.5 * win)
    wave_long = 0.3 * torch.randn(1, n, generator=torch.Generator().manual_seed(8))
    streamed = par.frame_scores(wave_long[0].numpy(), TEXTS, sample_rate=SR, template="{}").scores
    with torch.no_grad():
        one = torch.sigmoid(fl.frame_logits(fl.encode_audio(wave_long), fl.encode_text(TEXTS)))[0].numpy()
    assert streamed.shape[0] == fl.timeline.num_frames_for_samples(n)
    np.testing.assert_allclose(streamed, one[: streamed.shape[0]], atol=1e-4, rtol=0)


def test_mgaclap_source_errors(tmp_path):
    clap, bert = tiny_mga()
    laion = save_laion_pt(clap, tmp_path / "laion.pt")
    with pytest.raises(SourceError, match="not an MGA-CLAP checkpoint"):
        import_checkpoint("mgaclap", laion, bert_dir(bert, tmp_path / "bert"), tmp_path / "o1")
    pt = save_mga_pt(tmp_path / "model.pt", clap, bert)
    with pytest.raises(SourceError, match="need --text-model"):
        import_checkpoint("mgaclap", pt, None, tmp_path / "o2")
    with pytest.raises(SourceError, match="does not match"):  # a RoBERTa folder of another width
        import_checkpoint("mgaclap", pt, roberta_dir(tiny_clap_wide(), tmp_path / "rb"), tmp_path / "o3")


def tiny_clap_wide():
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    ac = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_embeds_hidden_size=8, depths=[2, 2], num_attention_heads=[2, 2],
                         window_size=4, hidden_size=16, projection_dim=12)  # fmt: skip
    tc = ClapTextConfig(vocab_size=261, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=90, projection_dim=12)  # fmt: skip
    return ClapModel(ClapConfig(text_config=tc.to_dict(), audio_config=ac.to_dict(), projection_dim=12))


def test_cli_import_mgaclap_then_commands(tmp_path, capsys):
    clap, bert = tiny_mga(seed=4)
    pt = save_mga_pt(tmp_path / "model.pt", clap, bert)
    ckpt = tmp_path / "ckpt"
    assert main(["import", "mgaclap", str(pt), "--text-model", str(bert_dir(bert, tmp_path / "bert")), "--out", str(ckpt)]) == 0
    audio = write_noise_clips(tmp_path / "audio", (1.5, 7.3), 16000, seed=2)  # 7.3 s: longer than the tiny model's 2.55-s window
    capsys.readouterr()
    assert main(["classify", str(audio / "c0.wav"), "--labels", "dog;rain", "--json", "--checkpoint", str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "{} can be heard"
    cli_detect_and_ground(main, ckpt, audio / "c1.wav", tmp_path, capsys)
    emb = tmp_path / "emb.npy"
    assert main(["embed", str(audio), "--out", str(emb), "--checkpoint", str(ckpt)]) == 0
    assert np.load(emb).shape == (2, 12)
    assert cli_zeroshot(main, ckpt, audio, tmp_path, "c0.wav,1,0,dog\nc1.wav,1,1,rain\n")["n_items"] == 2
    pipe = Pipeline.from_pretrained(ckpt)
    fs = pipe.frame_scores(str(audio / "c1.wav"), ["dog"])
    assert fs.scores.shape == (pipe.timeline.num_frames_for_samples(int(7.3 * SR)), 1) and np.isfinite(fs.scores).all()


def test_mga_model_traits_reject_bad_values():
    from finelap.errors import ConfigError
    from finelap.models.model import ModelConfig
    from finelap.models.text_encoders import TextEncoderConfig

    with pytest.raises(ConfigError, match="head_style"):
        ModelConfig(head_style="prenorm")
    with pytest.raises(ConfigError, match="codebook_inputs"):
        ModelConfig(codebook_inputs="raw")
    with pytest.raises(ConfigError, match="codebook_words"):
        ModelConfig(codebook_words="all")
    with pytest.raises(ConfigError, match="frame_head=false"):
        ModelConfig(codebook_size=8, codebook_inputs="projected", frame_head=True)
    with pytest.raises(ConfigError, match="pooler"):
        TextEncoderConfig(pooling="pooler", pooler_layer=False)

