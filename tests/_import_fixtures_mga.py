"""Fixtures for `finelap import mgaclap`: a tiny random MGA-CLAP `model.pt` in the layout of
Ming-er/MGA-CLAP's ASE.state_dict(), and a tiny offline bert-base-uncased stand-in.

Key names and shapes written down from the reference code (models/ase_model.py, htsat.py,
feature_extractor.py, text_encoder.py, pretrain.py):

    audio_encoder.audio_enc.audio_feats_extractor.mel_trans.stft.conv_{real,imag}.weight  (n_fft/2+1, 1, n_fft)
    audio_encoder.audio_enc.audio_feats_extractor.log_trans.melW                         (n_fft/2+1, n_mels)
    audio_encoder.audio_enc.{bn0, patch_embed, layers.i.blocks.j.{norm1, attn.qkv, attn.proj,
        attn.relative_position_bias_table, attn.relative_position_index, norm2, mlp.fc1, mlp.fc2},
        layers.i.blocks.j.attn_mask (shifted blocks), layers.i.downsample, norm, tscam_conv, head}
                                                                     (LAION-CLAP's HTS-AT names)
    text_encoder.text_encoder.*            BertModel(add_pooling_layer=False), with the
                                           embeddings.position_ids buffer of older transformers
    frame_proj.{0,1,3,4}.*, word_proj.{0,1,3,4}.*   LayerNorm, Linear, (GELU), LayerNorm, Linear
    temp ()                                learnt temperature
    codebook (K, E)                        the shared codebook (K = 4096, E = 1024 in the release)

The file is `{"model": state_dict, "optimizer": ..., "config": ..., "epoch": ...}` (pretrain.py).
The HTS-AT part starts from transformers' ClapModel (via _import_fixtures.laion_state), which the
tests then run directly as the independent reference for the trunk.
"""
from __future__ import annotations

from pathlib import Path

import torch

from _import_fixtures import laion_state, tiny_clap

EMBED = 12  # the tiny "embed_size" (1024 in the release)
CODES = 48  # the tiny codebook size (4096 in the release)
TEMP = 0.05

_WORDS = ["a", "dog", "barks", "rain", "on", "roof", "an", "engine", "idling", "nearby", "can", "be", "heard", "male",
          "speech", "siren", "the", "car", "horn"]  # fmt: skip


def bert_tokenizer(dest: Path):
    """A WordPiece (bert-base-uncased style, lower-casing) tokenizer with a tiny vocabulary."""
    from transformers import BertTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab_file=str(dest / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(dest))
    return tok


def tiny_bert(seed: int = 0):
    """A random BertModel without pooler (width 16, 1 layer), eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(bert_vocab()), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False).eval()


def bert_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]


def bert_dir(bert, dest: Path) -> Path:
    """A local "bert-base-uncased" folder for --text-model: the tiny tower's config and tokenizer."""
    bert.config.save_pretrained(str(dest))
    bert_tokenizer(dest)
    return dest


def _proj(g: torch.Generator, d_in: int, d_hidden: int, d_out: int) -> dict[str, torch.Tensor]:
    return {
        "0.weight": 1.0 + 0.2 * torch.randn(d_in, generator=g), "0.bias": 0.1 * torch.randn(d_in, generator=g),
        "1.weight": torch.randn(d_hidden, d_in, generator=g) / d_in**0.5, "1.bias": 0.1 * torch.randn(d_hidden, generator=g),
        "3.weight": 1.0 + 0.2 * torch.randn(d_hidden, generator=g), "3.bias": 0.1 * torch.randn(d_hidden, generator=g),
        "4.weight": torch.randn(d_out, d_hidden, generator=g) / d_hidden**0.5, "4.bias": 0.1 * torch.randn(d_out, generator=g),
    }  # fmt: skip


def mga_state(clap, bert, seed: int = 0, codebook_scale: float = 1000.0) -> dict[str, torch.Tensor]:
    """ASE.state_dict() of a tiny MGA-CLAP: `clap`'s HTS-AT (a transformers ClapModel) in LAION
    names under audio_encoder.audio_enc., `bert` under text_encoder.text_encoder., random
    projections, temperature and codebook. The codebook is scaled so that affinities (divided by
    sqrt(E) * 1000 as in the reference) spread enough for a sparse sparsemax support."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, v in laion_state(clap).items():
        if not k.startswith("audio_branch."):
            continue
        name = k[len("audio_branch."):]
        name = name.replace("spectrogram_extractor.", "audio_feats_extractor.mel_trans.")
        name = name.replace("logmel_extractor.", "audio_feats_extractor.log_trans.")
        sd["audio_encoder.audio_enc." + name] = v
    for k, v in bert.state_dict().items():
        sd["text_encoder.text_encoder." + k] = v.clone()
    sd["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    width_a = clap.config.audio_config.hidden_size
    for k, v in _proj(g, width_a, EMBED, EMBED).items():
        sd["frame_proj." + k] = v
    for k, v in _proj(g, bert.config.hidden_size, EMBED, EMBED).items():
        sd["word_proj." + k] = v
    sd["temp"] = torch.tensor(TEMP)
    sd["codebook"] = codebook_scale * torch.randn(CODES, EMBED, generator=g) / EMBED**0.5
    return sd


def save_mga_pt(path: Path, clap, bert, seed: int = 0) -> Path:
    """What MGA-CLAP's pretrain.py writes: {"model", "optimizer", "config" (plain YAML data), "epoch"}."""
    obj = {
        "model": mga_state(clap, bert, seed),
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0, 1, 2]}]},
        "config": {"embed_size": EMBED, "temp": 0.07, "audio_args": {"sr": 32000, "n_fft": 1024, "hop_length": 320, "n_mels": 16},
                   "text_encoder_args": {"type": "bert-base-uncased", "freeze": False}},
        "epoch": 10,
    }  # fmt: skip
    torch.save(obj, str(path))
    return path


def tiny_mga(seed: int = 0):
    """(ClapModel whose audio tower is the HTS-AT, BertModel) for one tiny MGA-CLAP."""
    return tiny_clap(seed=seed), tiny_bert(seed=seed + 100)
