"""`finelap import finelap`: FineLAP's `finelap_fixed.pt` becomes a finelap checkpoint (EAT encoder,
decoupled projector) whose outputs equal an independent re-statement of the reference forward.

What these tests prove: (1) the torch Kaldi fbank equals a naive per-frame numpy implementation of
Kaldi's documented algorithm with FineLAP's options to 1e-4; (2) for random weights in a tiny
config of the layout read from xiquan-li/FineLAP (and its vendored EAT), clip embeddings (MLP on
CLS), frame embeddings (patch rows averaged over frequency, Linear + post-norm transformer),
text embeddings (`<s>` state + MLP) and clip/frame logits (cos / temp + b) equal a plain-torch
re-statement of the reference forward written here from the state dict, to 1e-4, for a 10-s
clip (fbank zero-padded to 1024 frames, as EAT_preprocess does) and for the first window of a
longer one; (3) the import runs through the CLI. What they cannot prove: that the release holds
exactly this key set (written from the reference code, not read from a downloaded file), the
number of EAT attention heads (not stored in weights; 64 channels per head assumed), or the
published numbers (see docs/published-models.md).
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
from finelap.models.build import load_pretrained
from finelap.models.eat import kaldi_fbank
from finelap.models.published import SourceError, import_checkpoint

from _import_fixtures import (
    FL_TEMP, cli_detect_and_ground, cli_zeroshot, finelap_roberta_dir, finelap_state, roberta_tokenizer, save_finelap_pt,
    write_noise_clips,
)

SR = 16000
TEXTS = ["a dog barks", "rain on a roof", "an engine idling nearby"]


# ------------------------------------------------------------------ naive reference front-end


def _naive_fbank(x: np.ndarray) -> np.ndarray:
    """Kaldi fbank, frame by frame (the algorithm of Kaldi's feature-window.cc / mel-computations.cc
    with FineLAP's options: 25 ms / 10 ms at 16 kHz, snip edges, remove DC, pre-emphasis 0.97,
    symmetric Hann ("hanning"), 512-point power spectrum, 128 mel bins 20 Hz..Nyquist, log with
    float32-eps floor, no energy, no dither). x (N,) float64 -> (T, 128)."""
    win, hop, nfft, nm = 400, 160, 512, 128

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(SR / 2)
    step = (hi - lo) / (nm + 1)
    banks = np.zeros((nm, nfft // 2 + 1))
    for m in range(nm):
        left, center, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for b in range(nfft // 2):  # Kaldi leaves the Nyquist bin out
            z = mel(b * SR / nfft)
            if left < z < right:
                banks[m, b] = (z - left) / (center - left) if z <= center else (right - z) / (right - center)
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (win - 1)) for i in range(win)])
    out = []
    for t in range(1 + (len(x) - win) // hop):
        fr = x[t * hop : t * hop + win].copy()
        fr -= fr.mean()
        for i in range(win - 1, 0, -1):
            fr[i] -= 0.97 * fr[i - 1]
        fr[0] -= 0.97 * fr[0]
        spec = np.fft.rfft(np.concatenate([fr * hann, np.zeros(nfft - win)]))
        e = banks @ (spec.real**2 + spec.imag**2)
        out.append(np.log(np.maximum(e, np.finfo(np.float32).eps)))
    return np.array(out)


def _naive_eat_input(x: np.ndarray) -> torch.Tensor:
    """FineLAP's EAT_preprocess: fbank, zero-pad (or cut) to 1024 frames, (x + 4.268) / (4.569 * 2)."""
    fb = _naive_fbank(x)[:1024]
    fb = np.concatenate([fb, np.zeros((1024 - len(fb), 128))]) if len(fb) < 1024 else fb
    return torch.from_numpy((fb - -4.268) / (4.569 * 2)).float()


@pytest.mark.parametrize("n", [400, 16000 + 123, 2 * 16000 + 7])
def test_kaldi_fbank_equals_naive_kaldi(n):
    rng = np.random.default_rng(n)
    t = np.arange(n) / SR
    x = 0.3 * rng.standard_normal(n) + 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2  # with a DC offset
    x[: n // 4] *= 1e-4  # a quiet stretch: the log floor region
    ours = kaldi_fbank(torch.from_numpy(x)[None].float())[0].numpy()
    ref = _naive_fbank(x.astype(np.float32).astype(np.float64))
    assert ours.shape == ref.shape == (1 + (n - 400) // 160, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ naive reference model


def _ln(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _lin(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    a = torch.softmax((q * (d // heads) ** -0.5) @ k.transpose(-1, -2), dim=-1)
    return (a @ v).transpose(1, 2).reshape(b, n, d)


def _reference(sd: dict, waves: list[np.ndarray], texts: list[str], tok) -> dict[str, torch.Tensor]:
    """FineLAP's forward (get_global_audio_embeds / get_dense_audio_embeds / get_global_text_embeds
    and the logits of infer/pipeline.py), re-stated with plain tensor ops from the state dict."""
    from transformers import RobertaModel

    from _import_fixtures import FL_HEADS, tiny_roberta_config

    eat = "audio_encoder.audio_enc.model."
    img = eat + "modality_encoders.IMAGE."
    mel = torch.stack([_naive_eat_input(w) for w in waves])  # (B, 1024, 128)
    b = mel.shape[0]
    w = sd[img + "local_encoder.proj.weight"]  # (D, 1, 16, 16)
    d = w.shape[0]
    # 16x16 patches in time-major order: patch (r, c) covers frames 16r.., mel bins 16c..
    patches = mel.reshape(b, 64, 16, 8, 16).permute(0, 1, 3, 2, 4).reshape(b, 512, 256)
    x = patches @ w.reshape(d, 256).T + sd[img + "local_encoder.proj.bias"]
    x = x + sd[img + "fixed_positional_encoder.positions"][0, :512]
    x = torch.cat([sd[img + "extra_tokens"].expand(b, 1, d), x], 1)
    x = _ln(x, sd, img + "context_encoder.norm", 1e-6)
    i = 0
    while f"{eat}blocks.{i}.norm1.weight" in sd:
        p = f"{eat}blocks.{i}."
        q, k, v = _lin(x, sd, p + "attn.qkv").chunk(3, dim=-1)
        x = _ln(x + _lin(_attend(q, k, v, FL_HEADS), sd, p + "attn.proj"), sd, p + "norm1", 1e-6)
        h = _lin(F.gelu(_lin(x, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        x = _ln(x + h, sd, p + "norm2", 1e-6)
        i += 1
    cls, rows = x[:, 0], x[:, 1:].reshape(b, 64, 8, d).mean(2)
    audio = F.normalize(_lin(torch.relu(_lin(cls, sd, "global_audio_proj.0")), sd, "global_audio_proj.2"), dim=-1)
    y = _lin(rows, sd, "local_audio_proj.0")
    for j in range(2):
        p = f"local_audio_proj.1.layers.{j}."
        win, bin_ = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
        q, k, v = (y @ win.T + bin_).chunk(3, dim=-1)
        y = _ln(y + _lin(_attend(q, k, v, 8), sd, p + "self_attn.out_proj"), sd, p + "norm1", 1e-5)
        y = _ln(y + _lin(torch.relu(_lin(y, sd, p + "linear1")), sd, p + "linear2"), sd, p + "norm2", 1e-5)
    frames = F.normalize(y, dim=-1)
    text_model = RobertaModel(tiny_roberta_config(), add_pooling_layer=False).eval()
    text_model.load_state_dict({k[len("text_encoder.text_encoder."):]: v for k, v in sd.items()
                                if k.startswith("text_encoder.text_encoder.")})  # fmt: skip
    enc = tok(texts, padding="longest", truncation=True, max_length=30, return_tensors="pt")
    with torch.no_grad():
        s0 = text_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)[0][:, 0]
    text = F.normalize(_lin(torch.relu(_lin(s0, sd, "global_text_proj.0")), sd, "global_text_proj.2"), dim=-1)
    return {"audio": audio, "frames": frames, "text": text,
            "clip_logits": audio @ text.T / FL_TEMP["temp_global"] + FL_TEMP["b_global"],
            "frame_logits": frames @ text.T / FL_TEMP["temp_local"] + FL_TEMP["b_local"]}  # fmt: skip


def _import(tmp_path, seed: int = 0):
    pt = save_finelap_pt(tmp_path / "finelap_fixed.pt", seed)
    return import_checkpoint("finelap", pt, finelap_roberta_dir(tmp_path / "roberta"), tmp_path / "ckpt")


def test_finelap_imports_with_parity(tmp_path):
    ckpt = _import(tmp_path, seed=3)
    fl, run_cfg, _ = load_pretrained(ckpt)
    assert fl.timeline.frame_rate_hz == pytest.approx(6.25)  # 64 frames of 0.16 s per 10.24-s window
    rng = np.random.default_rng(0)
    ten = (0.2 * rng.standard_normal(10 * SR)).astype(np.float32)
    ten[3 * SR : 4 * SR] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(SR) / SR).astype(np.float32)
    long = (0.2 * rng.standard_normal(int(13.1 * SR))).astype(np.float32)  # the reference cuts it to 10.24 s
    sd = finelap_state(3)
    tok = roberta_tokenizer(tmp_path / "tok")
    ref = _reference(sd, [ten.astype(np.float64), long.astype(np.float64)], TEXTS, tok)
    wave = torch.zeros(2, len(long))
    wave[0, : len(ten)], wave[1] = torch.from_numpy(ten), torch.from_numpy(long)
    with torch.no_grad():
        a = fl.encode_audio(wave, torch.tensor([len(ten), len(long)]))
        t = fl.encode_text(TEXTS)
        assert a.frame_mask.sum(1).tolist() == [63, 82]  # ceil(n / 2560): frames that start before the end
        torch.testing.assert_close(t.text_embeds, ref["text"], atol=1e-4, rtol=0)
        # clip: the CLS token of the (first) window; the long file's clip embedding averages its two windows
        torch.testing.assert_close(a.audio_embeds[0], ref["audio"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.frame_embeds[0, :63], ref["frames"][0, :63], atol=1e-4, rtol=0)
        torch.testing.assert_close(a.frame_embeds[1, :64], ref["frames"][1], atol=1e-4, rtol=0)
        torch.testing.assert_close(fl.clip_logits(a, t)[0], ref["clip_logits"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(fl.frame_logits(a, t)[0, :63], ref["frame_logits"][0, :63], atol=1e-4, rtol=0)
        torch.testing.assert_close(fl.frame_logits(a, t)[1, :64], ref["frame_logits"][1], atol=1e-4, rtol=0)
        # a batch of one gives the same (padding elsewhere in the batch changes nothing)
        solo = fl.encode_audio(torch.from_numpy(ten)[None])
        torch.testing.assert_close(solo.frame_embeds[0], a.frame_embeds[0, :63], atol=1e-5, rtol=0)
    assert run_cfg.eval.prompt_template == "The sound of {}"
    assert run_cfg.eval.median_filter_s == pytest.approx(0.48)


def test_finelap_pipeline_frame_scores_match_reference(tmp_path):
    """The pipeline (streamed frame scores, sigmoid(cos / temp + b)) on a 10-s clip."""
    from finelap.infer import Pipeline

    ckpt = _import(tmp_path, seed=4)
    pipe = Pipeline.from_pretrained(ckpt)
    x = (0.2 * np.random.default_rng(1).standard_normal(10 * SR)).astype(np.float32)
    ref = _reference(finelap_state(4), [x.astype(np.float64)], TEXTS, roberta_tokenizer(tmp_path / "tok"))
    fs = pipe.frame_scores(x, TEXTS, sample_rate=SR, calibrated=False, template="{}")  # FineLAP SED: raw phrases
    assert fs.scores.shape == (pipe.timeline.num_frames_for_samples(len(x)), 3)
    np.testing.assert_allclose(fs.scores[:63], torch.sigmoid(ref["frame_logits"][0, :63]).numpy(), atol=1e-4, rtol=0)


def test_converter_mutation_is_caught(tmp_path, monkeypatch):
    """Swapping two EAT block tensors in the converter breaks parity (the test is not vacuous)."""
    import finelap.models.published as pub

    orig = pub.finelap_to_finelap

    def swapped(state, path="x"):
        out, arch = orig(state, path)
        a, b = "audio.backend.vit.blocks.0.norm1.weight", "audio.backend.vit.blocks.0.norm2.weight"
        out[a], out[b] = out[b], out[a]
        return out, arch

    monkeypatch.setattr(pub, "finelap_to_finelap", swapped)
    ckpt = _import(tmp_path, seed=5)
    fl, _, _ = load_pretrained(ckpt)
    x = (0.2 * np.random.default_rng(2).standard_normal(10 * SR)).astype(np.float32)
    ref = _reference(finelap_state(5), [x.astype(np.float64)], TEXTS, roberta_tokenizer(tmp_path / "tok"))
    with torch.no_grad():
        got = fl.encode_audio(torch.from_numpy(x)[None]).frame_embeds[0, :63]
    assert (got - ref["frames"][0, :63]).abs().max() > 1e-3


def test_bad_finelap_sources(tmp_path):
    pt = save_finelap_pt(tmp_path / "f.pt")
    with pytest.raises(SourceError, match="need --text-model"):
        import_checkpoint("finelap", pt, None, tmp_path / "o1")
    other = tmp_path / "other.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(SourceError, match="not a FineLAP checkpoint"):
        import_checkpoint("finelap", other, finelap_roberta_dir(tmp_path / "rb"), tmp_path / "o2")
    sd = finelap_state()
    sd["local_audio_proj.2.weight"] = torch.zeros(2, 2)
    torch.save({"model": sd}, tmp_path / "gru.pt")
    with pytest.raises(SourceError, match="local projector"):
        import_checkpoint("finelap", tmp_path / "gru.pt", tmp_path / "rb", tmp_path / "o3")
    # the same weights as safetensors under a wrapper prefix import too
    from safetensors.torch import save_file

    save_file({"model." + k: v.contiguous() for k, v in finelap_state().items()}, str(tmp_path / "m.safetensors"))
    assert import_checkpoint("finelap", tmp_path / "m.safetensors", tmp_path / "rb", tmp_path / "o4").is_dir()


def test_cli_import_then_classify_detect_ground(tmp_path, capsys):
    """A converted random-weight checkpoint runs through the commands a user would try, on files
    shorter and longer than the 10.24-s window (windows + streaming)."""
    pt = save_finelap_pt(tmp_path / "finelap_fixed.pt", seed=6)
    ckpt = tmp_path / "ckpt"
    assert main(["import", "finelap", str(pt), "--text-model", str(finelap_roberta_dir(tmp_path / "rb")), "--out", str(ckpt)]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["preprocessing"]["frame_rate_hz"] == pytest.approx(6.25)
    audio = write_noise_clips(tmp_path / "audio", (2.0, 23.0), SR, seed=0)
    capsys.readouterr()
    assert main(["classify", str(audio / "c0.wav"), "--labels", "dog;rain", "--json", "--checkpoint", str(ckpt)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["template"] == "The sound of {}"
    cli_detect_and_ground(main, ckpt, audio / "c1.wav", tmp_path, capsys)
    assert cli_zeroshot(main, ckpt, audio, tmp_path, "c0.wav,1,0,dog\nc1.wav,1,1,rain\n")["n_items"] == 2
    from finelap.infer import Pipeline

    pipe = Pipeline.from_pretrained(ckpt)
    fs = pipe.frame_scores(str(audio / "c1.wav"), ["dog"])
    assert fs.scores.shape == (pipe.timeline.num_frames_for_samples(23 * SR), 1) and np.isfinite(fs.scores).all()


def test_model_traits_reject_contradictions():
    from finelap.errors import ConfigError
    from finelap.models.model import ModelConfig

    with pytest.raises(ConfigError, match="frame_head_style"):
        ModelConfig(frame_head_style="fancy")
    with pytest.raises(ConfigError, match="frame_head_per_window"):
        ModelConfig(frame_head_per_window=True)  # needs the post-norm head
    with pytest.raises(ConfigError, match="rotary frame head only"):
        ModelConfig(frame_head_style="post_norm", frame_head_window=4)


def test_post_norm_frame_head_blocks_and_masks():
    """Per-window attention: a frame's output depends only on its own block's valid frames."""
    from finelap.models.heads import PostNormFrameHead

    torch.manual_seed(0)
    head = PostNormFrameHead(6, 16, layers=2, heads=8, block=4).eval()
    x = torch.randn(1, 10, 6)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 9] = False
    y = head(x, mask)
    x2 = x.clone()
    x2[0, 4:8] += 1.0  # the second block
    x2[0, 9] = 100.0  # a masked frame of the third block
    y2 = head(x2, mask)
    torch.testing.assert_close(y2[0, :4], y[0, :4])
    torch.testing.assert_close(y2[0, 8], y[0, 8])
    assert (y2[0, 4:8] - y[0, 4:8]).abs().max() > 1e-3


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_pickle_is_refused(tmp_path, capsys):
    import pickle

    evil = tmp_path / "finelap_fixed.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"x": _Evil()}}, f)
    rb = finelap_roberta_dir(tmp_path / "rb")
    with pytest.raises(SourceError, match="weights-only"):
        import_checkpoint("finelap", evil, rb, tmp_path / "o1")
    assert "this must never run" not in capsys.readouterr().out
    # a bare state dict (what the hint above produces) imports
    torch.save(finelap_state(), tmp_path / "bare.pt")
    assert import_checkpoint("finelap", tmp_path / "bare.pt", rb, tmp_path / "o2").is_dir()
