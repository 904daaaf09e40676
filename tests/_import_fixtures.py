"""Fixtures for the importer tests: tiny random reference models in their published layouts.

Nothing downloads: tokenizers are built here from a byte-level alphabet, models from tiny configs.
The LAION-CLAP layout is written from the key names and shapes of LAION-AI/CLAP's htsat.py and
model.py (audio_branch / text_branch / *_projection Sequentials, fused qkv, torchlibrosa
extractor weights, tscam head, shifted-window attn_mask buffers, DDP `module.` prefix,
`{"state_dict": ...}` wrapper), starting from transformers' ClapModel, which is then the
independent reference the imported model is compared with.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch


def _byte_alphabet() -> list[str]:
    """GPT-2/RoBERTa's byte-to-unicode table (256 printable stand-ins for the bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def roberta_tokenizer(dest: Path):
    """A byte-level RoBERTa tokenizer without merges (261 tokens: <s> <pad> </s> <unk>, bytes, <mask>)."""
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in _byte_alphabet():
        vocab[c] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tok = RobertaTokenizer(vocab=vocab, merges=[])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(dest))
    return tok


def tiny_clap(fusion: bool = False, seed: int = 0):
    """A random transformers ClapModel (HTS-AT: spec 64, 16 mel, depths 2/2, window 4; RoBERTa: 1
    layer of width 16) in eval mode, with non-trivial BatchNorm statistics and logit scale."""
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    torch.manual_seed(seed)
    ac = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_embeds_hidden_size=8, depths=[2, 2], num_attention_heads=[2, 2],
                         window_size=4, hidden_size=16, projection_dim=12, enable_fusion=fusion,
                         fusion_type="aff_2d" if fusion else None)  # fmt: skip
    tc = ClapTextConfig(vocab_size=261, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=90, projection_dim=12)  # fmt: skip
    model = ClapModel(ClapConfig(text_config=tc.to_dict(), audio_config=ac.to_dict(), projection_dim=12))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 5.0)
            elif name.endswith("running_var"):
                buf.uniform_(20.0, 60.0)  # log-mel dB spread, so normalised inputs are O(1)
        model.logit_scale_a.fill_(2.7)
    return model.eval()


def save_hf_clap(model, dest: Path) -> Path:
    """The Hugging Face ClapModel folder layout: config.json, model.safetensors, tokenizer,
    preprocessor_config.json (front-end of LAION-CLAP at 48 kHz, 10-s clips)."""
    import json

    model.save_pretrained(str(dest))
    roberta_tokenizer(dest)
    (dest / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "ClapFeatureExtractor", "feature_size": 16, "sampling_rate": 48000, "hop_length": 480,
        "fft_window_size": 1024, "frequency_min": 50, "frequency_max": 14000, "max_length_s": 10,
    }))  # fmt: skip
    return dest


def roberta_dir(model, dest: Path) -> Path:
    """A local "roberta-base" folder for the LAION layout's --text-model: the tiny tower's config
    (as RobertaConfig) and tokenizer."""
    from transformers import RobertaConfig

    tc = model.config.text_config
    RobertaConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=tc.num_hidden_layers,
                  num_attention_heads=tc.num_attention_heads, intermediate_size=tc.intermediate_size,
                  max_position_embeddings=tc.max_position_embeddings, type_vocab_size=tc.type_vocab_size,
                  layer_norm_eps=tc.layer_norm_eps, pad_token_id=1).save_pretrained(str(dest))  # fmt: skip
    roberta_tokenizer(dest)
    return dest


# transformers' ClapAudio block names -> LAION-CLAP's (HTS-AT SwinTransformerBlock)
_TO_LAION = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attn.relative_position_index"),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)


def laion_state(model) -> dict[str, torch.Tensor]:
    """The LAION-CLAP checkpoint layout of `model` (HTS-AT + RoBERTa), with the training-only
    tensors a real release also holds (extractor weights, tagging head, MLP-loss transforms)."""
    cfg = model.config.audio_config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("audio_model.audio_encoder."):
            name = k[len("audio_model.audio_encoder."):]
            name = name.replace("batch_norm.", "bn0.") if name.startswith("batch_norm.") else name
            m = re.match(r"^(layers\.\d+\.blocks\.\d+\.)(.*)$", name)
            if m:
                head, rest = m.groups()
                q = re.match(r"^attention\.self\.(query|key|value)\.(weight|bias)$", rest)
                if q:
                    qkv.setdefault(f"audio_branch.{head}attn.qkv.{q.group(2)}", {})[q.group(1)] = v
                    continue
                for a, b in _TO_LAION:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                name = head + rest
            out["audio_branch." + name] = v.clone()
        elif k.startswith("text_model."):
            out["text_branch." + k[len("text_model."):]] = v.clone()
        elif k.startswith(("audio_projection.", "text_projection.")):
            which, lin, rest = k.split(".", 2)
            out[f"{which}.{0 if lin == 'linear1' else 2}.{rest}"] = v.clone()
        else:
            out[k] = v.clone()
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    # shifted-window masks of every odd block: (nW, w*w, w*w) at that stage's resolution
    w = cfg.window_size
    grid = cfg.spec_size // cfg.patch_stride[0]
    for i, depth in enumerate(cfg.depths):
        res = grid // 2**i
        for j in range(1, depth, 2):
            out[f"audio_branch.layers.{i}.blocks.{j}.attn_mask"] = torch.zeros((res // w) ** 2, w * w, w * w)
    n_fft, nm, f = 1024, cfg.num_mel_bins, cfg.patch_embeds_hidden_size * 2 ** (len(cfg.depths) - 1)
    out["audio_branch.spectrogram_extractor.stft.conv_real.weight"] = torch.randn(n_fft // 2 + 1, 1, n_fft)
    out["audio_branch.spectrogram_extractor.stft.conv_imag.weight"] = torch.randn(n_fft // 2 + 1, 1, n_fft)
    out["audio_branch.logmel_extractor.melW"] = torch.randn(n_fft // 2 + 1, nm)
    out["audio_branch.tscam_conv.weight"] = torch.randn(527, f, 2, 3)
    out["audio_branch.tscam_conv.bias"] = torch.randn(527)
    out["audio_branch.head.weight"] = torch.randn(527, 527)
    out["audio_branch.head.bias"] = torch.randn(527)
    d = model.config.projection_dim
    for t in ("audio_transform", "text_transform"):
        out[f"{t}.sequential.0.weight"] = torch.randn(d, d)
        out[f"{t}.sequential.0.bias"] = torch.randn(d)
    return out


def save_laion_pt(model, path: Path) -> Path:
    """What LAION-CLAP's training writes: {"epoch", "name", "state_dict": {"module." + key: tensor}}."""
    sd = {"module." + k: v for k, v in laion_state(model).items()}
    torch.save({"epoch": 45, "name": "tiny", "state_dict": sd}, str(path))
    return path


def flam_heads(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenFLAM's per-text MLPs (adobe-research/openflam model.py FLAM.init_per_text_logit_scale_bias):
    fc_per_text_logit_{scale,bias} = Linear(H, H), GELU, Linear(H, 1) on the RoBERTa pooler output
    (H = text width), random here, with the reference's init offsets (log 10 and -8) on the last bias."""
    import math

    g = torch.Generator().manual_seed(seed)
    h = model.config.text_config.hidden_size
    out = {}
    for w, off in (("scale", math.log(10.0)), ("bias", -8.0)):
        out[f"fc_per_text_logit_{w}.0.weight"] = torch.randn(h, h, generator=g) / math.sqrt(h)
        out[f"fc_per_text_logit_{w}.0.bias"] = 0.1 * torch.randn(h, generator=g)
        out[f"fc_per_text_logit_{w}.2.weight"] = 0.3 * torch.randn(1, h, generator=g)
        out[f"fc_per_text_logit_{w}.2.bias"] = off + 0.1 * torch.randn(1, generator=g)
    return out


def save_flam_pth(model, path: Path, seed: int = 0) -> Path:
    """OpenFLAM's release layout: a plain state dict (no wrapper, no `module.`), LAION-CLAP's names
    for HTS-AT/RoBERTa/projections and logit_scale_a, no MLP-loss transforms, plus aed_logit_scale
    and the per-text MLPs."""
    sd = {k: v for k, v in laion_state(model).items() if not k.startswith(("audio_transform.", "text_transform.")) and k != "logit_scale_t"}
    sd["aed_logit_scale"] = torch.zeros(())
    sd.update(flam_heads(model, seed))
    torch.save(sd, str(path))
    return path


# ---------------------------------------------------------------------------- FineLAP

# A tiny FineLAP in the layout of xiquan-li/FineLAP (`models/finelap.py` FineLAP with
# `models/audio_encoder.py` AudioEncoder type "eat", which wraps the vendored EAT's
# MaeImageClassificationModel around a data2vec-multi Data2VecMultiModel). Key names and shapes, read
# from that code (EAT-base values in brackets):
#   audio_encoder.audio_enc.model.modality_encoders.IMAGE.local_encoder.proj.{weight (D,1,16,16), bias}
#   audio_encoder.audio_enc.model.modality_encoders.IMAGE.fixed_positional_encoder.positions (1, max_length*8, D)
#   audio_encoder.audio_enc.model.modality_encoders.IMAGE.extra_tokens (1, 1, D)
#   audio_encoder.audio_enc.model.modality_encoders.IMAGE.context_encoder.norm.{weight,bias} (D,)  [prenet_depth 0]
#   audio_encoder.audio_enc.model.modality_encoders.IMAGE.decoder.*   (CNN decoder; absent after
#       remove_pretraining_modules, kept here to check it is dropped)
#   audio_encoder.audio_enc.model.blocks.{i}.{attn.qkv (3D,D), attn.proj, norm1, norm2, mlp.fc1 (4D,D), mlp.fc2}  [12 blocks, 12 heads]
#   audio_encoder.audio_enc.{fc_norm, head (527, D)}   (EAT's AudioSet classifier, unused)
#   text_encoder.text_encoder.*   (RobertaModel(add_pooling_layer=False))
#   global_audio_proj.{0,2} / global_text_proj.{0,2}   Linear(D|768, E), ReLU, Linear(E, E)   [E 1024]
#   local_audio_proj.0 Linear(D, E); local_audio_proj.1.layers.{0,1}.* nn.TransformerEncoderLayer(E, 8, 4E, relu, batch_first)
#   temp_global, b_global, temp_local, b_local   0-d
FL_DIM, FL_DEPTH, FL_HEADS, FL_EMBED, FL_POS_ROWS = 128, 2, 2, 32, 80  # tiny: 2 heads of 64 (finelap derives heads = D / 64)
FL_TEMP = {"temp_global": 0.07, "b_global": -4.0, "temp_local": 0.1, "b_local": -6.0}


def tiny_roberta_config():
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=261, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                         max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # fmt: skip


def finelap_roberta_dir(dest: Path) -> Path:
    """The local "roberta-base" folder for --text-model: the tiny tower's config and tokenizer."""
    tiny_roberta_config().save_pretrained(str(dest))
    roberta_tokenizer(dest)
    return dest


def finelap_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in FineLAP's state-dict layout (tiny config above), scaled so that every
    layer matters (LayerNorm affines, biases and the CLS token are random, not their inits)."""
    import math

    from torch import nn
    from transformers import RobertaModel

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return s * torch.randn(*shape, generator=g)

    d, e = FL_DIM, FL_EMBED
    eat = "audio_encoder.audio_enc.model."
    img = eat + "modality_encoders.IMAGE."
    sd: dict[str, torch.Tensor] = {
        img + "local_encoder.proj.weight": rnd(d, 1, 16, 16, s=1 / 16),
        img + "local_encoder.proj.bias": rnd(d, s=0.1),
        img + "fixed_positional_encoder.positions": rnd(1, FL_POS_ROWS * 8, d, s=0.5),
        img + "extra_tokens": rnd(1, 1, d),
        img + "context_encoder.norm.weight": 1 + rnd(d, s=0.1),
        img + "context_encoder.norm.bias": rnd(d, s=0.1),
        img + "decoder.blocks.0.0.weight": rnd(d, 1, 3, 3),
        img + "decoder.proj.weight": rnd(d, d),
        "audio_encoder.audio_enc.fc_norm.weight": rnd(d),
        "audio_encoder.audio_enc.fc_norm.bias": rnd(d),
        "audio_encoder.audio_enc.head.weight": rnd(527, d),
        "audio_encoder.audio_enc.head.bias": rnd(527),
    }
    for i in range(FL_DEPTH):
        b = f"{eat}blocks.{i}."
        for name, (o, n) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d)}.items():
            sd[b + name + ".weight"] = rnd(o, n, s=1 / math.sqrt(n))
            sd[b + name + ".bias"] = rnd(o, s=0.1)
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"] = 1 + rnd(d, s=0.1)
            sd[b + n + ".bias"] = rnd(d, s=0.1)
    torch.manual_seed(seed)
    text = RobertaModel(tiny_roberta_config(), add_pooling_layer=False)
    for k, v in text.state_dict().items():
        sd["text_encoder.text_encoder." + k] = v.clone()
    h = text.config.hidden_size
    for name, din in (("global_audio_proj", d), ("global_text_proj", h)):
        sd[f"{name}.0.weight"] = rnd(e, din, s=1 / math.sqrt(din))
        sd[f"{name}.0.bias"] = rnd(e, s=0.1)
        sd[f"{name}.2.weight"] = rnd(e, e, s=1 / math.sqrt(e))
        sd[f"{name}.2.bias"] = rnd(e, s=0.1)
    sd["local_audio_proj.0.weight"] = rnd(e, d, s=1 / math.sqrt(d))
    sd["local_audio_proj.0.bias"] = rnd(e, s=0.1)
    layer = nn.TransformerEncoderLayer(e, 8, 4 * e, 0.1, activation="relu", batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for k, v in enc.state_dict().items():
        sd["local_audio_proj.1." + k] = v + (rnd(*v.shape, s=0.1) if k.endswith(("norm1.weight", "norm2.weight", "bias")) else 0)
    for k, v in FL_TEMP.items():
        sd[k] = torch.tensor(v)
    return sd


def save_finelap_pt(path: Path, seed: int = 0) -> Path:
    """What FineLAP's training (and utils/fix_ckpt.py) writes: {"model", "optimizer", "config", "epoch"}."""
    torch.save({"model": finelap_state(seed), "optimizer": {"state": {}, "param_groups": []},
                "config": {"model_args": {"embed_size": FL_EMBED}}, "epoch": 14}, str(path))  # fmt: skip
    return path


# ----------------------------------------------------------------------------- CLI smoke steps shared by the importer tests


def write_noise_clips(folder: Path, seconds, sample_rate: int, seed: int = 0) -> Path:
    """c0.wav, c1.wav, ... of low white noise with the given durations, in `folder`."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sec in enumerate(seconds):
        sf.write(folder / f"c{i}.wav", (0.1 * rng.standard_normal(int(sec * sample_rate))).astype(np.float32), sample_rate)
    return folder


def cli_detect_and_ground(main, ckpt: Path, wav: Path, tmp_path: Path, capsys) -> None:
    """`finelap detect --out TSV` and `finelap ground --json` on one file at threshold 0.5 both run
    and write what they promise."""
    import json

    tsv = tmp_path / "det.tsv"
    assert main(["detect", str(wav), "--labels", "dog;rain", "--threshold", "0.5", "--out", str(tsv),
                 "--checkpoint", str(ckpt)]) == 0  # fmt: skip
    assert tsv.read_text().startswith("filename\tonset\toffset\tevent_label")
    capsys.readouterr()
    assert main(["ground", str(wav), "a dog barking", "--threshold", "0.5", "--json", "--checkpoint", str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["queries"][0]["text"] == "a dog barking"


def cli_zeroshot(main, ckpt: Path, audio: Path, tmp_path: Path, rows: str) -> dict:
    """`finelap eval zeroshot` on an ESC-50-style CSV (`rows`: its lines after the header) of the
    clips in `audio`; checks its top-1 accuracy against the checkpoint's own clip and prompt
    embeddings scored here, and returns the result JSON."""
    import json

    import numpy as np
    import pytest

    from finelap.eval.tasks import make_prompt
    from finelap.infer import Pipeline

    csv = tmp_path / "meta.csv"
    csv.write_text("filename,fold,target,category\n" + rows)
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(csv), "--audio-dir", str(audio), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    items = [line.split(",") for line in rows.strip().splitlines()]
    labels = sorted({r[3] for r in items})
    pipe = Pipeline.from_pretrained(ckpt)
    sims = pipe.embed_audio([str(audio / r[0]) for r in items]) @ pipe.embed_text([make_prompt(pipe.prompt_template, l) for l in labels]).T
    truth = np.array([labels.index(r[3]) for r in items])
    assert res["labels"] == labels and res["n_items"] == len(items)
    right = [bool((sims[i, t] > np.delete(sims[i], t)).all()) for i, t in enumerate(truth)]  # a tie is a miss
    assert res["top1_accuracy"] == pytest.approx(float(np.mean(right)))
    return res
