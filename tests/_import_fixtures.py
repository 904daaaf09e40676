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
