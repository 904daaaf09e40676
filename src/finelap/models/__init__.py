"""Model towers and heads: audio encoders (frames first), text encoders, decoupled projector heads,
and the two-tower `FineLAPModel` with typed outputs. transformers is imported only when a Hugging
Face tower is built."""
from __future__ import annotations

from .audio_encoders import AudioEncoder, AudioFeatures, CNNEncoder, HFAudioEncoder, TransformerEncoder
from .heads import (
    ClipHead,
    CodebookAggregator,
    FrameHead,
    LocalityAwareBlock,
    ScaleBias,
    TextConditionedScaleBias,
    TextHead,
    sparsemax,
)
from .model import (
    AUDIO_ENCODERS,
    AudioOutput,
    FineLAPModel,
    ModelConfig,
    ModelOutput,
    TextOutput,
    build_audio_encoder,
    param_groups,
    register_audio_encoder,
)
from .text_encoders import HFTextEncoder, TextEncoderConfig, TextFeatures, default_text_model_path

__all__ = [
    "AudioEncoder",
    "AudioFeatures",
    "CNNEncoder",
    "TransformerEncoder",
    "HFAudioEncoder",
    "ClipHead",
    "FrameHead",
    "TextHead",
    "ScaleBias",
    "TextConditionedScaleBias",
    "CodebookAggregator",
    "LocalityAwareBlock",
    "sparsemax",
    "AUDIO_ENCODERS",
    "register_audio_encoder",
    "build_audio_encoder",
    "ModelConfig",
    "AudioOutput",
    "TextOutput",
    "ModelOutput",
    "FineLAPModel",
    "param_groups",
    "HFTextEncoder",
    "TextEncoderConfig",
    "TextFeatures",
    "default_text_model_path",
]
