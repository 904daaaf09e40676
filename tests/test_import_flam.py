"""`finelap import flam`: OpenFLAM's `open_flam_oct17.pth` layout becomes a finelap checkpoint whose
frame scores are OpenFLAM's unbiased scores.

What these tests prove: for random weights in a tiny config of the layout read from
adobe-research/openflam (LAION-CLAP names + `fc_per_text_logit_{scale,bias}` MLPs on the RoBERTa
pooler output + `aed_logit_scale`), the imported model's clip/text/frame embeddings equal
transformers' ClapModel's, its per-text scale alpha(t) = exp(MLP_s(pooler)) and bias
beta(t) = MLP_b(pooler) equal a direct computation, and `Pipeline.frame_scores` (which streams)
returns the unbiased map p / (p + sigmoid(beta)), p = sigmoid(alpha cos + beta), all to 1e-4; the
import runs through the CLI. What they cannot prove: that the release's key set is exactly the
fixture's (written from the reference code) or the published numbers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from finelap.cli import main
from finelap.infer import Pipeline
from finelap.models.published import SourceError, import_checkpoint

from _import_fixtures import flam_heads, roberta_dir, roberta_tokenizer, save_flam_pth, save_laion_pt, tiny_clap
from test_import_laion_clap import SR, TEXTS, _reference


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    h = F.gelu(x @ w[f"{name}.0.weight"].T + w[f"{name}.0.bias"])
    return (h @ w[f"{name}.2.weight"].T + w[f"{name}.2.bias"]).squeeze(-1)


def test_flam_imports_with_unbiased_frame_scores(tmp_path):
    model = tiny_clap(seed=7)
    pt = save_flam_pth(model, tmp_path / "open_flam_tiny.pth", seed=2)
    ckpt = import_checkpoint("flam", pt, roberta_dir(model, tmp_path / "roberta"), tmp_path / "ckpt")
    pipe = Pipeline.from_pretrained(ckpt)
    fl = pipe.model
    win, fpw = fl.audio.backend.window_samples, fl.audio.backend.frames_per_window
    wave = 0.3 * torch.randn(1, win, generator=torch.Generator().manual_seed(4))
    tok = roberta_tokenizer(tmp_path / "tok")
    ref = _reference(model, wave, TEXTS, tok, fusion=False)
    heads = flam_heads(model, seed=2)
    with torch.no_grad():
        pooler = model.text_model(**tok(TEXTS, padding=True, return_tensors="pt")).pooler_output
        alpha, beta = _mlp(pooler, heads, "fc_per_text_logit_scale").exp(), _mlp(pooler, heads, "fc_per_text_logit_bias")
        p = torch.sigmoid(alpha * (ref["frames"][0] @ ref["text"].T) + beta)
        unbiased = p / (p + torch.sigmoid(beta))
        a, t = fl.encode_audio(wave), fl.encode_text(TEXTS)
    torch.testing.assert_close(a.audio_embeds, ref["audio"], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.frame_embeds[:, :fpw], ref["frames"], atol=1e-4, rtol=0)
    torch.testing.assert_close(t.text_embeds, ref["text"], atol=1e-4, rtol=0)
    torch.testing.assert_close(t.frame_logit_scale, alpha, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(t.frame_logit_bias, beta, atol=1e-4, rtol=0)
    fs = pipe.frame_scores(wave[0].numpy(), TEXTS, sample_rate=pipe.sample_rate)  # streamed, calibrated by default (per-text biases)
    assert fs.calibrated
    np.testing.assert_allclose(fs.scores[:fpw], unbiased.numpy(), atol=1e-4, rtol=0)
    # search scores stored frames against a query embedding: the per-text alpha/beta come along
    emb = pipe.embed_text(TEXTS)
    for k in range(len(TEXTS)):
        curve = pipe.frame_scores_from_embeddings(emb[k], a.frame_embeds[0, :fpw].numpy())
        np.testing.assert_allclose(curve, unbiased[:, k].numpy(), atol=1e-4, rtol=0)
    assert pipe.prompt_template == "{}" and pipe.config.eval.median_filter_s == pytest.approx(3 / 3.2)
    assert pipe.frame_trained  # FLAM's frame objective: no "uncalibrated" warning


def test_flam_source_errors(tmp_path):
    model = tiny_clap()
    laion = save_laion_pt(model, tmp_path / "laion.pt")  # a LAION-CLAP file is not an OpenFLAM one
    with pytest.raises(SourceError, match="not an OpenFLAM checkpoint"):
        import_checkpoint("flam", laion, roberta_dir(model, tmp_path / "rb"), tmp_path / "o")
    with pytest.raises(SourceError, match="need --text-model"):
        import_checkpoint("flam", laion, None, tmp_path / "o")


def test_cli_import_flam_then_commands(tmp_path, capsys):
    model = tiny_clap(seed=9)
    pt = save_flam_pth(model, tmp_path / "flam.pth")
    ckpt = tmp_path / "ckpt"
    assert main(["import", "flam", str(pt), "--text-model", str(roberta_dir(model, tmp_path / "rb")), "--out", str(ckpt)]) == 0
    rng = np.random.default_rng(1)
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, sec in enumerate((1.5, 6.1, 2.0, 3.2)):
        sf.write(audio / f"c{i}.wav", (0.1 * rng.standard_normal(int(sec * 16000))).astype(np.float32), 16000)
    capsys.readouterr()
    assert main(["classify", str(audio / "c1.wav"), "--labels", "dog;rain", "--json", "--checkpoint", str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "{}"
    tsv = tmp_path / "det.tsv"
    assert main(["detect", str(audio / "c1.wav"), str(audio / "c2.wav"), "--labels", "dog;rain", "--out", str(tsv),
                 "--checkpoint", str(ckpt)]) == 0  # fmt: skip
    assert tsv.read_text().startswith("filename\tonset\toffset\tevent_label")
    capsys.readouterr()
    assert main(["ground", str(audio / "c1.wav"), "a dog barking", "--json", "--checkpoint", str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["queries"][0]["text"] == "a dog barking"
    strong = tmp_path / "strong.tsv"
    strong.write_text("filename\tonset\toffset\tevent_label\nc0.wav\t0.2\t1.0\tdog\nc1.wav\t1.0\t4.0\train\nc3.wav\t0.5\t2.5\tdog\n")
    dur = tmp_path / "dur.tsv"
    dur.write_text("filename\tduration\nc0.wav\t1.5\nc1.wav\t6.1\nc2.wav\t2.0\nc3.wav\t3.2\n")
    out = tmp_path / "sed.json"
    assert main(["eval", "sed", "--checkpoint", str(ckpt), "--data", str(strong), "--audio-dir", str(audio),
                 "--durations", str(dur), "--out", str(out), "--no-plots"]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    assert "PSDS1" in res and 0.0 <= res["frame_AUROC"] <= 1.0
    idx = tmp_path / "idx"
    assert main(["index", "build", str(audio), "--checkpoint", str(ckpt), "--out", str(idx), "--frames"]) == 0
    capsys.readouterr()
    assert main(["search", "a dog barking", "--index", str(idx)]) == 0
    assert "c1.wav" in capsys.readouterr().out
