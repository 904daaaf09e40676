"""`finelap import laion-clap`: LAION-CLAP checkpoints (their .pt layout and the Hugging Face ClapModel
layout) become finelap checkpoints whose outputs equal transformers' ClapModel.

What these tests prove: for random weights in tiny configs, (1) the front-end equals the
log-mel of transformers' ClapFeatureExtractor (slaney filters for non-fusion models, HTK filters
for fusion models) to 1e-4 dB; (2) every tensor of both layouts lands where it belongs: clip
embeddings, text embeddings, per-frame embeddings (the HTS-AT token grid averaged over frequency,
through the audio projection) and frame logits equal ClapModel's to 1e-4; (3) the import is a
normal checkpoint that the CLI runs end to end. What they cannot prove: that the real
checkpoints hold exactly the key set of our LAION fixture (written from the reference code, not
from a downloaded file), nor the published accuracy (see docs/published-models.md).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from finelap.cli import main
from finelap.models.build import load_pretrained
from finelap.models.published import ReferenceLogMel, SourceError, import_checkpoint

from _import_fixtures import cli_detect_and_ground, cli_zeroshot, roberta_dir, roberta_tokenizer, save_hf_clap, save_laion_pt, tiny_clap

SR = 48000
TEXTS = ["a dog barks", "rain on a roof", "an engine idling nearby"]


def _reference(model, wave: torch.Tensor, texts: list[str], tok, fusion: bool) -> dict[str, torch.Tensor]:
    """ClapModel's own outputs; features from transformers' ClapFeatureExtractor."""
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=SR, hop_length=480, fft_window_size=1024,
                              frequency_min=50, frequency_max=14000)  # fmt: skip
    filters = fe.mel_filters if fusion else fe.mel_filters_slaney
    mel = np.stack([fe._np_extract_fbank_features(w.double().numpy(), filters) for w in wave])
    x = torch.from_numpy(mel).float()[:, None]
    kw = {"input_features": x.repeat(1, 4, 1, 1), "is_longer": torch.zeros(len(x), 1, dtype=torch.bool)} if fusion else {"input_features": x}
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model.audio_model(**kw)
        audio = F.normalize(model.audio_projection(a.pooler_output), dim=-1)
        frames = F.normalize(model.audio_projection(a.last_hidden_state.mean(2).transpose(1, 2)), dim=-1)
        text = F.normalize(model.text_projection(model.text_model(**enc).pooler_output), dim=-1)
        s = model.logit_scale_a.exp()
    return {"audio": audio, "frames": frames, "text": text, "clip_logits": s * audio @ text.T,
            "frame_logits": s * frames @ text.T}  # fmt: skip


def _compare(ckpt: Path, model, tok, fusion: bool) -> None:
    fl, run_cfg, _ = load_pretrained(ckpt)
    enc = fl.audio
    win = enc.backend.window_samples
    fpw = enc.backend.frames_per_window
    g = torch.Generator().manual_seed(1)
    wave = 0.3 * torch.randn(2, win, generator=g)
    ref = _reference(model, wave, TEXTS, tok, fusion)
    with torch.no_grad():
        a = fl.encode_audio(wave)
        t = fl.encode_text(TEXTS)
        assert a.frame_mask.sum(1).tolist() == [fpw, fpw]  # one window: its frames, the dangling Timeline frame masked
        torch.testing.assert_close(a.audio_embeds, ref["audio"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.frame_embeds[:, :fpw], ref["frames"], atol=1e-4, rtol=0)
        torch.testing.assert_close(t.text_embeds, ref["text"], atol=1e-4, rtol=0)
        torch.testing.assert_close(fl.clip_logits(a, t), ref["clip_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(fl.frame_logits(a, t)[:, :fpw], ref["frame_logits"], atol=1e-4, rtol=0)
    assert run_cfg.eval.prompt_template == "This is a sound of {}."
    assert fl.timeline.frame_rate_hz == pytest.approx(SR * fpw / win)


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_front_end_equals_clap_feature_extractor(scale):
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=SR, hop_length=480, fft_window_size=1024, frequency_min=50, frequency_max=14000)
    ours = ReferenceLogMel(SR, 1024, 480, 64, 50.0, 14000.0, scale)
    w = np.random.default_rng(0).standard_normal((2, 30000)) * 0.1
    ref = np.stack([fe._np_extract_fbank_features(x, fe.mel_filters if scale == "htk" else fe.mel_filters_slaney) for x in w])
    got = ours(torch.from_numpy(w).float()).double().numpy()
    assert got.shape == ref.shape == (2, 1 + 30000 // 480, 64)
    # float32 input to our STFT: 1e-4 dB where there is energy (the signal is white noise)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_hf_clap_folder_imports_with_parity(tmp_path):
    model = tiny_clap()
    src = save_hf_clap(model, tmp_path / "hf")
    out = import_checkpoint("laion-clap", src, None, tmp_path / "ckpt")
    assert (out / "model.safetensors").is_file() and (out / "text" / "config.json").is_file()
    assert not list((out / "text").glob("*.safetensors"))  # weights are stored once, in model.safetensors
    _compare(out, model, roberta_tokenizer(tmp_path / "tok"), fusion=False)


@pytest.mark.parametrize("fusion", [False, True])
def test_laion_pt_imports_with_parity(tmp_path, fusion):
    model = tiny_clap(fusion=fusion, seed=3)
    pt = save_laion_pt(model, tmp_path / "630k-tiny.pt")
    out = import_checkpoint("laion-clap", pt, roberta_dir(model, tmp_path / "roberta"), tmp_path / "ckpt")
    meta = json.loads((out / "config.json").read_text())
    audio = meta["config"]["model"]["audio"]
    assert audio["config"]["enable_fusion"] is fusion and audio["mel_scale"] == ("htk" if fusion else "slaney")
    assert audio["config"]["spec_size"] == 64  # read off the shifted-window attention masks
    assert meta["preprocessing"]["sample_rate"] == SR and meta["preprocessing"]["imported_from"] == "laion-clap"
    _compare(out, model, roberta_tokenizer(tmp_path / "tok"), fusion=fusion)


def test_checkpoint_is_relocatable(tmp_path):
    """The text folder is found relative to the checkpoint, so a moved checkpoint still loads."""
    model = tiny_clap()
    out = import_checkpoint("laion-clap", save_hf_clap(model, tmp_path / "hf"), None, tmp_path / "a" / "ckpt")
    moved = tmp_path / "b" / "ckpt"
    moved.parent.mkdir()
    (tmp_path / "a" / "ckpt").rename(moved)
    fl, _, _ = load_pretrained(moved)
    assert Path(fl.text.path) == moved / "text"


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_sources_give_one_line_errors(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(SourceError, match="weights-only"):
        import_checkpoint("laion-clap", evil, tmp_path, tmp_path / "o1")
    capsys.readouterr()
    assert main(["import", "laion-clap", str(evil), "--text-model", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "this must never run" not in err and err.count("\n") == 1 and "weights-only" in err
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(SourceError, match="unexpected LAION-CLAP parameter 'encoder.weight'"):
        import_checkpoint("laion-clap", other, tmp_path, tmp_path / "o3")
    with pytest.raises(SourceError, match="need --text-model"):
        import_checkpoint("laion-clap", other, None, tmp_path / "o4")
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "keep.txt").write_text("mine")
    model = tiny_clap()
    src = save_hf_clap(model, tmp_path / "hf")
    with pytest.raises(SourceError, match="already exists"):
        import_checkpoint("laion-clap", src, None, tmp_path / "o5")
    with pytest.raises(SourceError, match="not a finelap checkpoint"):
        import_checkpoint("laion-clap", src, None, tmp_path / "o5", overwrite=True)
    assert (tmp_path / "o5" / "keep.txt").read_text() == "mine"


def test_cli_import_then_classify_detect_ground_eval(tmp_path, capsys):
    """A converted random-weight checkpoint runs through the commands a user would try; audio longer
    than the model's window goes through finelap's windows and streaming."""
    model = tiny_clap(seed=5)
    pt = save_laion_pt(model, tmp_path / "clap.pt")
    ckpt = tmp_path / "ckpt"
    assert main(["import", "laion-clap", str(pt), "--text-model", str(roberta_dir(model, tmp_path / "rb")), "--out", str(ckpt)]) == 0
    rng = np.random.default_rng(0)
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, sec in enumerate((1.0, 7.3, 3.0, 2.0)):
        sf.write(audio / f"c{i}.wav", (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
    capsys.readouterr()
    assert main(["classify", str(audio / "c1.wav"), "--labels", "dog;rain", "--json", "--checkpoint", str(ckpt)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["template"] == "This is a sound of {}."
    assert sum(p["score"] for p in res["results"][0]["predictions"]) == pytest.approx(1.0, abs=1e-5)
    cli_detect_and_ground(main, ckpt, audio / "c1.wav", tmp_path, capsys)
    zs = cli_zeroshot(main, ckpt, audio, tmp_path, "c0.wav,1,0,dog\nc1.wav,1,1,rain\nc2.wav,2,0,dog\nc3.wav,2,1,rain\n")
    assert zs["n_items"] == 4  # and its top-1 accuracy is the checkpoint's embeddings' (cli_zeroshot checks)
    # the 7.3-s file (longer than the 2.55-s window) is scored on the Timeline's frames, all of them
    from finelap.infer import Pipeline

    pipe = Pipeline.from_pretrained(ckpt)
    fs = pipe.frame_scores(str(audio / "c1.wav"), ["dog"])
    assert fs.scores.shape == (pipe.timeline.num_frames_for_samples(int(7.3 * SR)), 1)
    assert np.isfinite(fs.scores).all()
    # the HEAR API on the imported model: 48 kHz input, timestamps at the 3.2 Hz frame centres (scaled
    # to the tiny model's window)
    from finelap import hear

    hm = hear.load_model(str(ckpt))
    assert hm.sample_rate == SR
    x = torch.from_numpy((0.1 * rng.standard_normal((2, 3 * SR))).astype(np.float32))
    emb, ts = hear.get_timestamp_embeddings(x, hm)
    assert emb.shape[:2] == ts.shape == (2, pipe.timeline.num_frames_for_samples(3 * SR))
    assert float(ts[0, 1] - ts[0, 0]) == pytest.approx(1000.0 / pipe.frame_rate_hz)
    assert hear.get_scene_embeddings(x, hm).shape == (2, hm.scene_embedding_size)


def test_htsat_encoder_contract_padding_and_timeline(tmp_path):
    """The `htsat` encoder keeps finelap's encoder contract: T from the Timeline, a padded batch equals
    per-item encoding on valid frames, and a frame is valid iff it starts before the end of the audio."""
    model = tiny_clap(seed=11)
    fl, _, _ = load_pretrained(import_checkpoint("laion-clap", save_hf_clap(model, tmp_path / "hf"), None, tmp_path / "ckpt"))
    enc = fl.audio
    spf, win = enc.timeline.hop_length, enc.backend.window_samples
    g = torch.Generator().manual_seed(0)
    long_n, short_n = win + win // 2 + 7, win // 3
    wave = torch.zeros(2, long_n)
    wave[0] = 0.2 * torch.randn(long_n, generator=g)
    wave[1, :short_n] = 0.2 * torch.randn(short_n, generator=g)
    with torch.no_grad():
        batch = enc(wave, torch.tensor([long_n, short_n]))
        alone = enc(wave[1:, :short_n])
    assert batch.frames.shape[1] == enc.timeline.num_frames_for_samples(long_n)
    assert batch.frame_mask.sum(1).tolist() == [-(-long_n // spf), -(-short_n // spf)]
    k = -(-short_n // spf)
    torch.testing.assert_close(batch.frames[1, :k], alone.frames[0, :k], atol=1e-5, rtol=0)
    assert not batch.frames[1, k:].any()  # padding frames are zero and masked


def test_new_model_traits_reject_bad_values():
    from finelap.errors import ConfigError
    from finelap.models.model import ModelConfig
    from finelap.models.text_encoders import TextEncoderConfig

    with pytest.raises(ConfigError, match="head_activation"):
        ModelConfig(head_activation="tanh")
    with pytest.raises(ConfigError, match="scale_bias_input"):
        ModelConfig(scale_bias_input="words")
    with pytest.raises(ConfigError, match="codebook"):
        ModelConfig(scale_bias_input="pooled", codebook_size=8, text_conditioned_scale_bias=True)
    with pytest.raises(ConfigError, match="text.weights"):
        TextEncoderConfig(weights="random")
    assert TextEncoderConfig(pooling="pooler", weights="checkpoint").pooling == "pooler"
