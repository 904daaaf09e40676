"""Audio towers, re-exported from where they live (the old import path keeps working):

- `encoder_base`: the contract every encoder keeps (`AudioEncoder`, `AudioFeatures`, frame counts
  from a `Timeline`, nothing cropped at random);
- `layers`: layers shared by encoders and heads (masked norms, rotary transformer blocks);
- `own_encoders`: finelap's CPU-sized "cnn" and "transformer";
- `hf_encoders`: Hugging Face towers ("hf") and the base of the published fixed-window towers;
- `encoder_registry`: names -> builders with typed options (`register_audio_encoder`).

Importing this module registers "cnn", "transformer" and "hf".
"""
from __future__ import annotations

from .encoder_base import AudioEncoder, AudioFeatures, lengths_to_mask
from .hf_encoders import WAVE_FAMILY, HFAudioEncoder, HFOptions, PublishedWindowEncoder, _WindowBackend
from .layers import MaskedNorm, TransformerBlock, attention_masks, rotary_tables
from .own_encoders import CNN_STAGES_DEFAULT, CNNEncoder, CNNOptions, MelFrontEnd, TransformerEncoder, TransformerOptions

__all__ = [
    "AudioFeatures",
    "AudioEncoder",
    "PublishedWindowEncoder",
    "CNNEncoder",
    "TransformerEncoder",
    "HFAudioEncoder",
    "CNNOptions",
    "TransformerOptions",
    "HFOptions",
    "TransformerBlock",
    "MaskedNorm",
    "MelFrontEnd",
    "CNN_STAGES_DEFAULT",
    "WAVE_FAMILY",
    "lengths_to_mask",
    "rotary_tables",
    "attention_masks",
    "_WindowBackend",
]
