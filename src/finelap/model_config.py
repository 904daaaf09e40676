"""The model's architecture as typed configuration: `ModelConfig` and the dataclasses it holds.

This module imports no torch and no model code (floor 2, next to `finelap.config`), so that
`RunConfig.model` is typed and a config error surfaces before the heavy imports. The classes are
re-exported where they used to live: `finelap.models.model.ModelConfig`,
`finelap.models.text_encoders.TextEncoderConfig`.

Every module of `finelap.models.model.FineLAPModel` is built from these fields: the towers
(`audio_encoder` + `audio`, a registry name such as "cnn", "aisfx", "htsat", "eat", and `text`),
the heads, MGA-CLAP's codebook (`codebook_size`), FLAM's per-text scale/bias
(`text_conditioned_scale_bias`), and SLAP's caption decoder (`caption_decoder`) and distillation
predictor (`slap_predictor`). Loading a checkpoint builds the model from its config.json and then
loads the weights; nothing is inferred from the state dict.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["CaptionDecoderConfig", "ModelConfig", "TextEncoderConfig"]


@dataclass
class CaptionDecoderConfig:
    """SLAP's caption decoder (`finelap.models.decoder.CaptionDecoder`): a causal transformer of
    `layers` pre-norm blocks of width `dim` with `heads` attention heads, over captions of at most
    `max_len` tokens (start token included). Its vocabulary and start/end/pad tokens are the text
    tower's tokenizer's; it reads the audio encoder's frames."""

    dim: int = 256
    layers: int = 2
    heads: int = 4
    max_len: int = 32

    def __post_init__(self) -> None:
        for k in ("dim", "layers", "heads"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.caption_decoder.{k} must be >= 1, got {getattr(self, k)}")
        if self.dim % self.heads:
            raise ConfigError(f"model.caption_decoder.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.max_len < 2:
            raise ConfigError(f"model.caption_decoder.max_len must be >= 2 (a word and the end token), got {self.max_len}")


@dataclass
class TextEncoderConfig:
    """Text tower settings.

    path: local HF model directory; None = bundled all-MiniLM-L6-v2.
    pooling: "mean" (masked mean of token states, sentence-transformers style), "cls" (the first
      token's last hidden state) or "pooler" (the model's own pooler_output: BERT/RoBERTa's
      tanh(dense(first token)), what LAION-CLAP and FLAM use).
    max_length: tokens per text after truncation (phrases and captions are short).
    freeze: no gradients, tower kept in eval mode (dropout off), pooled outputs cached.
    lr_mult: learning-rate multiplier for this tower (see `param_groups`).
    cache_size: entries in the pooled-embedding cache used by `embed_cached`.
    weights: "pretrained" loads the weights stored in `path`; "checkpoint" builds the architecture
      from `path`'s config.json only (imported published models: the finelap checkpoint holds the
      tower's weights, `path` only its config and tokenizer). A relative `path` is resolved against
      the checkpoint directory by `load_pretrained`.
    pooler_layer: False builds the tower without its pooler (BERT/RoBERTa `add_pooling_layer=False`),
      as MGA-CLAP's text tower was trained; then pooling cannot be "pooler".
    """

    path: str | None = None
    pooling: str = "mean"
    max_length: int = 32
    freeze: bool = False
    lr_mult: float = 1.0
    cache_size: int = 8192
    weights: str = "pretrained"
    pooler_layer: bool = True

    def __post_init__(self) -> None:
        if not self.pooler_layer and self.pooling == "pooler":
            raise ConfigError("text.pooling='pooler' needs the pooler layer (text.pooler_layer=False removes it)")
        if self.pooling not in ("mean", "cls", "pooler"):
            raise ConfigError(f"text.pooling must be 'mean', 'cls' or 'pooler', got {self.pooling!r}")
        if self.weights not in ("pretrained", "checkpoint"):
            raise ConfigError(f"text.weights must be 'pretrained' or 'checkpoint', got {self.weights!r}")
        if self.max_length < 2:
            raise ConfigError(f"text.max_length must be >= 2 (room for special tokens), got {self.max_length}")
        if self.lr_mult < 0:
            raise ConfigError(f"text.lr_mult must be >= 0, got {self.lr_mult}")
        if self.cache_size < 0:
            raise ConfigError(f"text.cache_size must be >= 0, got {self.cache_size}")




@dataclass
class ModelConfig:
    """Architecture of the two-tower model.

    audio_encoder / audio: registry name and its keyword options (e.g. {"dim": 256, "mel": {...}},
      or {"path": "/models/wavlm"} for "hf"; "freeze" and "lr_mult" are accepted by all).
    text: the text tower. embed_dim: shared embedding size D.
    clip_pooling: "mean" over valid frames, the encoder's "cls", or "meanmax" (mean and max of the
      frames concatenated). clip_input_norm: LayerNorm (no affine) on the pooled vector before the
      clip MLP. clip_head_hidden: MLP width (None: encoder width). text_head_hidden: None =
      max(H, D), 0 = linear projection. text_projection: "mlp" (TextHead) or "identity" (no text
      projection: embed_dim must equal the text tower's width; unseen words keep the tower's geometry).
    frame_head: the decoupled frame projector (Linear + transformer); False = the clip head's MLP
      applied to each frame (a coupled projector, CLAP-style).
    clip_/frame_ scale and bias: initial logit scale/bias and whether they learn.
    text_conditioned_scale_bias: FLAM's per-text frame scale/bias MLPs (init frame_scale_init,
      frame_bias_init); otherwise one learnable scalar pair.
    codebook_size > 0: MGA-CLAP's shared codebook pools frames and words into the clip embeddings.
    la_block: MGA-CLAP's locality-aware (value-value attention) block on the encoder frames.
    head_activation: the hidden activation of the clip and text MLPs ("gelu", or "relu" as in
      LAION-CLAP's projections, for imported checkpoints).
    scale_bias_input / scale_bias_hidden: what the per-text scale/bias MLPs read ("embeds": the
      projected text embedding; "pooled": the text tower's pooled output, as OpenFLAM's MLPs do)
      and their hidden width.
    head_style: "mlp" (Linear, act, Linear) or "ln_mlp" (LayerNorm, Linear, act, LayerNorm, Linear:
      MGA-CLAP's frame_proj / word_proj) for the clip and text MLPs.
    codebook_inputs: what the codebook pools: "normalized" frame/word embeddings, or the
      "projected" ones before L2 normalisation (MGA-CLAP's released code).
    codebook_words: which text tokens the codebook pools: "tokens" (all under the attention mask)
      or "words" (MGA-CLAP: the first token dropped, special tokens and padding given affinity 0).
    frame_head_style: "rotary" (finelap's pre-norm rotary blocks, `FrameHead`) or "post_norm"
      (FineLAP's released local projector: torch post-norm TransformerEncoder layers with a ReLU
      feed-forward and no positions, `PostNormFrameHead`). frame_head_mlp_ratio: feed-forward width
      / embed_dim. frame_head_per_window: the post-norm head attends within each fixed window of
      the audio encoder only, over the window's frames as the reference saw them (padding
      included; the encoder's `context_frames`), as a model that projected one 10.24-s input at a
      time did.
    caption_decoder: SLAP's caption decoder (`CaptionDecoderConfig`); None: none. loss.caption
      needs one (a run config that turns the loss on gets the default sizes; see
      `finelap.config.RunConfig`).
    slap_predictor: SLAP's distillation predictor, Linear-GELU-Linear (Da -> Da) on the student's
      frames (the BYOL/data2vec predictor that makes student and teacher asymmetric); loss.distill
      needs it (turned on with the loss).
    """

    audio_encoder: str = "cnn"
    audio: dict = field(default_factory=dict)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256
    clip_pooling: str = "mean"
    clip_head_hidden: int | None = None
    text_head_hidden: int | None = None
    clip_input_norm: bool = False
    text_projection: str = "mlp"
    frame_head: bool = True
    frame_head_layers: int = 1
    frame_head_heads: int = 4
    frame_head_window: int | None = None
    dropout: float = 0.0
    clip_scale_init: float = 10.0
    clip_bias_init: float = -10.0
    clip_scale_bias_learnable: bool = True
    frame_scale_init: float = 10.0
    frame_bias_init: float = -10.0
    frame_scale_bias_learnable: bool = True
    text_conditioned_scale_bias: bool = False
    max_logit_scale: float = 100.0
    codebook_size: int = 0
    codebook_temperature: float = 1.0
    la_block: bool = False
    head_activation: str = "gelu"
    scale_bias_input: str = "embeds"
    scale_bias_hidden: int = 256
    head_style: str = "mlp"
    codebook_inputs: str = "normalized"
    codebook_words: str = "tokens"
    frame_head_style: str = "rotary"
    frame_head_mlp_ratio: float = 2.0
    frame_head_per_window: bool = False
    caption_decoder: CaptionDecoderConfig | None = None
    slap_predictor: bool = False

    def __post_init__(self) -> None:
        if self.head_style not in ("mlp", "ln_mlp"):
            raise ConfigError(f"model.head_style must be 'mlp' or 'ln_mlp', got {self.head_style!r}")
        if self.codebook_inputs not in ("normalized", "projected"):
            raise ConfigError(f"model.codebook_inputs must be 'normalized' or 'projected', got {self.codebook_inputs!r}")
        if self.codebook_words not in ("tokens", "words"):
            raise ConfigError(f"model.codebook_words must be 'tokens' or 'words', got {self.codebook_words!r}")
        if self.codebook_inputs == "projected" and self.codebook_size and self.frame_head:
            raise ConfigError("model.codebook_inputs='projected' pools the clip MLP's per-frame projections; it needs frame_head=false")
        if self.frame_head_style not in ("rotary", "post_norm"):
            raise ConfigError(f"model.frame_head_style must be 'rotary' or 'post_norm', got {self.frame_head_style!r}")
        if not self.frame_head_mlp_ratio > 0:
            raise ConfigError(f"model.frame_head_mlp_ratio must be positive, got {self.frame_head_mlp_ratio}")
        if self.frame_head_per_window and (not self.frame_head or self.frame_head_style != "post_norm"):
            raise ConfigError("model.frame_head_per_window needs frame_head: true and frame_head_style: post_norm")
        if self.frame_head and self.frame_head_style == "post_norm" and self.frame_head_window is not None:
            raise ConfigError("model.frame_head_window (local attention) applies to the rotary frame head only")
        if self.scale_bias_input not in ("embeds", "pooled"):
            raise ConfigError(f"model.scale_bias_input must be 'embeds' or 'pooled', got {self.scale_bias_input!r}")
        if self.scale_bias_input == "pooled" and self.codebook_size:
            raise ConfigError("model.scale_bias_input='pooled' needs the pooled text output, which the codebook (codebook_size > 0) replaces")
        if self.head_activation not in ("gelu", "relu"):
            raise ConfigError(f"model.head_activation must be 'gelu' or 'relu', got {self.head_activation!r}")
        if isinstance(self.text, dict):
            try:
                self.text = TextEncoderConfig(**self.text)
            except TypeError as e:
                raise ConfigError(f"model.text: {e}") from None
        if isinstance(self.caption_decoder, dict):
            try:
                self.caption_decoder = CaptionDecoderConfig(**self.caption_decoder)
            except TypeError as e:
                raise ConfigError(f"model.caption_decoder: {e}") from None
        if not isinstance(self.audio, dict):
            raise ConfigError(f"model.audio must be a mapping of encoder options, got {type(self.audio).__name__}")
        if self.embed_dim <= 0:
            raise ConfigError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if self.clip_pooling not in ("mean", "cls", "meanmax"):
            raise ConfigError(f"model.clip_pooling must be 'mean', 'cls' or 'meanmax', got {self.clip_pooling!r}")
        if self.text_projection not in ("mlp", "identity"):
            raise ConfigError(f"model.text_projection must be 'mlp' or 'identity', got {self.text_projection!r}")
        if self.clip_scale_init <= 0 or self.frame_scale_init <= 0:
            raise ConfigError("model.*_scale_init must be positive")
        if max(self.clip_scale_init, self.frame_scale_init) > self.max_logit_scale:
            raise ConfigError(f"initial logit scales exceed max_logit_scale={self.max_logit_scale}")
        if self.codebook_size < 0 or self.codebook_size == 1:
            raise ConfigError(f"model.codebook_size must be 0 (off) or >= 2, got {self.codebook_size}")
        if self.codebook_size and self.clip_pooling == "meanmax":
            raise ConfigError("model.codebook_size > 0 pools frames through the codebook; clip_pooling='meanmax' contradicts it")
        if self.codebook_size and self.clip_pooling == "cls":
            raise ConfigError("model.codebook_size > 0 pools frames through the codebook; clip_pooling='cls' contradicts it")
        if self.frame_head and self.frame_head_layers < 0:
            raise ConfigError("model.frame_head_layers must be >= 0")
        if self.frame_head and self.embed_dim % self.frame_head_heads:
            raise ConfigError(f"model.embed_dim ({self.embed_dim}) must be divisible by frame_head_heads ({self.frame_head_heads})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**d)
