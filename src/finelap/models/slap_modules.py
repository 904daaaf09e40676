"""SLAP's extra trainable modules of a `FineLAPModel`, built by the model from its config
(`ModelConfig.caption_decoder`, `ModelConfig.slap_predictor`):

- ``model.caption_decoder``: a `CaptionDecoder` over the audio encoder's frames, using the text
  tower's tokenizer ([CLS] start, [SEP] end, [PAD]).
- ``model.slap_predictor``: Linear-GELU-Linear (Da -> Da) on the student's frames (the
  BYOL/data2vec predictor that makes student and teacher asymmetric).

The training hook that uses them is `finelap.train.slap`.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..model_config import CaptionDecoderConfig
from .decoder import CaptionDecoder, special_token_ids

__all__ = ["DECODER_ATTR", "PREDICTOR_ATTR", "build_caption_decoder", "build_slap_predictor"]

DECODER_ATTR = "caption_decoder"
PREDICTOR_ATTR = "slap_predictor"


def build_caption_decoder(cfg: CaptionDecoderConfig, dim_audio: int, tokenizer: Any) -> CaptionDecoder:
    """A fresh caption decoder reading (B, T, dim_audio) frames, over `tokenizer`'s vocabulary and
    its start/end/pad tokens (ConfigError when the tokenizer lacks one)."""
    bos, eos, pad = special_token_ids(tokenizer)
    return CaptionDecoder(int(dim_audio), len(tokenizer), cfg.dim, cfg.layers, cfg.heads, cfg.max_len, bos_id=bos, eos_id=eos, pad_id=pad)


def build_slap_predictor(dim: int) -> nn.Sequential:
    """The distillation predictor: (..., dim) -> (..., dim), Linear-GELU-Linear."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
