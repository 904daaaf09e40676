"""The two-tower model with typed outputs.

audio: encoder frames (B, T, Da) -> clip head -> audio_embeds (B, D)
                                 -> frame head -> frame_embeds (B, T, D)      (decoupled projector)
text:  text tower -> text head -> text_embeds (N, D)
logits: clip  = clip_scale  * <audio_embeds, text_embeds>  + clip_bias         (B, N)
        frame = frame_scale * <frame_embeds, text_embeds>  + frame_bias        (B, T, N)

Options for the other presets are traits in `ModelConfig`, never names: `codebook_size > 0`
(MGA-CLAP shared codebook pools frames and words), `la_block` (locality-aware block before the
heads), `text_conditioned_scale_bias` (FLAM: per-text frame scale and bias).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import Timeline
from ..errors import ConfigError
from ..registry import AUDIO_ENCODERS
from .encoder_base import AudioEncoder
from .encoder_registry import build_audio_encoder, register_audio_encoder
from .heads import (
    ClipHead,
    CodebookAggregator,
    FrameHead,
    LocalityAwareBlock,
    PostNormFrameHead,
    ScaleBias,
    TextConditionedScaleBias,
    TextHead,
)
from .text_encoders import HFTextEncoder, TextEncoderConfig

__all__ = [
    "AUDIO_ENCODERS",
    "register_audio_encoder",
    "build_audio_encoder",
    "ModelConfig",
    "AudioOutput",
    "TextOutput",
    "ModelOutput",
    "FineLAPModel",
    "param_groups",
]

# ----------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- outputs


@dataclass
class AudioOutput:
    """audio_embeds (B, D) and frame_embeds (B, T, D), unit norm; frame_mask (B, T) bool;
    frames (B, T, Da) raw encoder frames (for distillation); timeline maps frame j to seconds."""

    audio_embeds: torch.Tensor
    frame_embeds: torch.Tensor
    frame_mask: torch.Tensor
    frame_rate_hz: float
    timeline: Timeline
    frames: torch.Tensor
    codebook_weights: torch.Tensor | None = None


@dataclass
class TextOutput:
    """text_embeds (N, D) unit norm; pooled (N, H) text-tower output (None under the codebook);
    frame_logit_scale / frame_logit_bias (N,) when per-text (FLAM), else None."""

    text_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    frame_logit_scale: torch.Tensor | None = None
    frame_logit_bias: torch.Tensor | None = None
    codebook_weights: torch.Tensor | None = None


@dataclass
class ModelOutput:
    """Everything the losses need. Scales/biases are 0-d tensors, or (N,) per text for FLAM's frame
    stream; both broadcast against (..., N) logits."""

    audio_embeds: torch.Tensor
    frame_embeds: torch.Tensor
    frame_mask: torch.Tensor
    text_embeds: torch.Tensor
    clip_logit_scale: torch.Tensor
    clip_logit_bias: torch.Tensor
    frame_logit_scale: torch.Tensor
    frame_logit_bias: torch.Tensor
    frames: torch.Tensor
    frame_rate_hz: float


# ----------------------------------------------------------------------------- model


class FineLAPModel(nn.Module):
    """Two-tower audio-text model with clip and frame embeddings.

    `audio_encoder` / `text_encoder` may be passed in (tests, custom towers); otherwise they are
    built from `cfg`.
    """

    def __init__(
        self,
        cfg: ModelConfig | None = None,
        audio_encoder: AudioEncoder | None = None,
        text_encoder: HFTextEncoder | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        self.audio = audio_encoder if audio_encoder is not None else build_audio_encoder(cfg.audio_encoder, **cfg.audio)
        self.text = text_encoder if text_encoder is not None else HFTextEncoder(cfg.text)
        da, dt, d = self.audio.dim, self.text.hidden_size, cfg.embed_dim
        self.la_block = LocalityAwareBlock(da) if cfg.la_block else None
        self.clip_head = ClipHead(da, d, cfg.clip_head_hidden, cfg.clip_pooling, cfg.dropout, cfg.head_activation, cfg.head_style,
                                  cfg.clip_input_norm)  # fmt: skip
        self.frame_head: nn.Module | None = None
        if cfg.frame_head and cfg.frame_head_style == "post_norm":
            block = None
            if cfg.frame_head_per_window:
                block = getattr(getattr(self.audio, "backend", None), "frames_per_window", None)
                if block is None:
                    raise ConfigError(f"model.frame_head_per_window needs a fixed-window audio encoder; {cfg.audio_encoder!r} has no windows")
            self.frame_head = PostNormFrameHead(da, d, cfg.frame_head_layers, cfg.frame_head_heads, cfg.frame_head_mlp_ratio,
                                                cfg.dropout, block)  # fmt: skip
        elif cfg.frame_head:
            self.frame_head = FrameHead(da, d, cfg.frame_head_layers, cfg.frame_head_heads, cfg.frame_head_window,
                                        cfg.frame_head_mlp_ratio, cfg.dropout)  # fmt: skip
        self.text_head = TextHead(dt, d, cfg.text_head_hidden, cfg.dropout, cfg.head_activation, cfg.head_style,
                                  cfg.text_projection == "identity")  # fmt: skip
        self.clip_scale_bias = ScaleBias(cfg.clip_scale_init, cfg.clip_bias_init, cfg.clip_scale_bias_learnable, cfg.max_logit_scale)
        if cfg.text_conditioned_scale_bias:
            self.frame_scale_bias: nn.Module = TextConditionedScaleBias(
                dt if cfg.scale_bias_input == "pooled" else d, hidden=cfg.scale_bias_hidden,
                init_scale=cfg.frame_scale_init, init_bias=cfg.frame_bias_init, max_scale=cfg.max_logit_scale,
            )
        else:
            self.frame_scale_bias = ScaleBias(
                cfg.frame_scale_init, cfg.frame_bias_init, cfg.frame_scale_bias_learnable, cfg.max_logit_scale
            )
        self.codebook = CodebookAggregator(d, cfg.codebook_size, cfg.codebook_temperature) if cfg.codebook_size else None
        # set by the trainer for frozen pretrained towers (models.feature_cache): encoder frames computed once per input
        self.feature_cache: Any = None

    # ------------------------------------------------------------------ properties
    @property
    def timeline(self) -> Timeline:
        return self.audio.timeline

    @property
    def sample_rate(self) -> int:
        return self.audio.sample_rate

    @property
    def frame_rate_hz(self) -> float:
        return self.audio.timeline.frame_rate_hz

    # ------------------------------------------------------------------ towers
    def encode_audio(
        self, wave: torch.Tensor, lengths: torch.Tensor | None = None, mask_frames: torch.Tensor | None = None
    ) -> AudioOutput:
        """wave (B, N) at `sample_rate`, lengths (B,) -> AudioOutput (T = timeline.num_frames_for_samples(N))."""
        if self.feature_cache is not None and mask_frames is None and getattr(self.audio, "frozen", False):
            feats = self.feature_cache.encode(self.audio, wave, lengths)
        else:
            feats = self.audio(wave, lengths, mask_frames)
        x, m = feats.frames, feats.frame_mask
        if self.la_block is not None:
            x = self.la_block(x, m)
        weights = None
        if self.codebook is not None and self.cfg.codebook_inputs == "projected":  # MGA-CLAP: pool before normalising
            projected = self.clip_head.mlp(x)
            frame_embeds = F.normalize(projected, dim=-1)
            cb = self.codebook(projected, m)
            audio_embeds, weights = F.normalize(cb.embeds, dim=-1), cb.weights
        else:
            if self.frame_head is None:
                frame_embeds = self.clip_head.project(x)
            elif self.cfg.frame_head_per_window and self.la_block is None and feats.context_frames is not None:
                frame_embeds = self.frame_head(feats.context_frames, feats.context_mask)[:, : x.shape[1]]
            else:
                frame_embeds = self.frame_head(x, m)
            if self.codebook is not None:
                cb = self.codebook(frame_embeds, m)
                audio_embeds, weights = F.normalize(cb.embeds, dim=-1), cb.weights
            else:
                audio_embeds = self.clip_head(x, m, feats.cls)
        frame_embeds = frame_embeds * m[..., None].to(frame_embeds.dtype)
        return AudioOutput(
            audio_embeds=audio_embeds,
            frame_embeds=frame_embeds,
            frame_mask=m,
            frame_rate_hz=feats.frame_rate_hz,
            timeline=self.audio.timeline,
            frames=feats.frames,
            codebook_weights=weights,
        )

    def encode_text(self, texts: Sequence[str]) -> TextOutput:
        """N strings -> TextOutput(text_embeds (N, D), ...). Pooled text-tower outputs come from the
        cache whenever no gradient can reach the tower (frozen, eval mode, or no_grad)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        weights = None
        pooled = None
        if self.codebook is not None:
            tf = self.text.encode(texts)
            tokens, mask, masked = tf.tokens, tf.mask, "exclude"
            if self.cfg.codebook_words == "words":  # MGA-CLAP: word tokens after [CLS]; [SEP]/padding score 0
                tokens, mask, masked = tokens[:, 1:], ~tf.special[:, 1:], "zero"  # type: ignore[index]
            words = self.text_head.mlp(tokens) if self.cfg.codebook_inputs == "projected" else self.text_head(tokens)
            cb = self.codebook(words, mask, masked)
            text_embeds, weights = F.normalize(cb.embeds, dim=-1), cb.weights
        else:
            pooled = self.text.embed_cached(texts)
            text_embeds = self.text_head(pooled)
        scale = bias = None
        if isinstance(self.frame_scale_bias, TextConditionedScaleBias):
            scale, bias = self.frame_scale_bias(pooled if self.cfg.scale_bias_input == "pooled" else text_embeds)
        return TextOutput(text_embeds, pooled, scale, bias, weights)

    # ------------------------------------------------------------------ logits
    def clip_scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip_scale_bias()

    def frame_scale_and_bias(self, text: TextOutput) -> tuple[torch.Tensor, torch.Tensor]:
        if text.frame_logit_scale is not None:
            return text.frame_logit_scale, text.frame_logit_bias  # type: ignore[return-value]
        return self.frame_scale_bias()

    def clip_logits(self, audio: AudioOutput, text: TextOutput) -> torch.Tensor:
        """(B, N) = clip_scale * cos + clip_bias."""
        s, b = self.clip_scale_bias()
        return s * audio.audio_embeds @ text.text_embeds.t() + b

    def frame_logits(self, audio: AudioOutput, text: TextOutput) -> torch.Tensor:
        """(B, T, N) = frame_scale * cos + frame_bias (values at padded frames are meaningless; use frame_mask)."""
        s, b = self.frame_scale_and_bias(text)
        return s * torch.matmul(audio.frame_embeds, text.text_embeds.t()) + b

    def frame_scores(self, wave: torch.Tensor, lengths: torch.Tensor | None, texts: Sequence[str]) -> torch.Tensor:
        """(B, T, N) frame-text logits; apply sigmoid for probabilities. Padded frames: see encode_audio's mask."""
        return self.frame_logits(self.encode_audio(wave, lengths), self.encode_text(texts))

    def forward(
        self, wave: torch.Tensor, lengths: torch.Tensor | None, texts: Sequence[str], mask_frames: torch.Tensor | None = None
    ) -> ModelOutput:
        a = self.encode_audio(wave, lengths, mask_frames)
        t = self.encode_text(texts)
        cs, cb = self.clip_scale_bias()
        fs, fb = self.frame_scale_and_bias(t)
        return ModelOutput(
            audio_embeds=a.audio_embeds,
            frame_embeds=a.frame_embeds,
            frame_mask=a.frame_mask,
            text_embeds=t.text_embeds,
            clip_logit_scale=cs,
            clip_logit_bias=cb,
            frame_logit_scale=fs,
            frame_logit_bias=fb,
            frames=a.frames,
            frame_rate_hz=a.frame_rate_hz,
        )


# ----------------------------------------------------------------------------- optimiser groups

_NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


def _no_decay_names(module: nn.Module) -> set[str]:
    """Biases, norm weights, embeddings and scalar/vector parameters (scales, biases, tokens) are not decayed."""
    from .layers import MaskedNorm

    out: set[str] = set()
    for mname, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if p.dim() < 2 or isinstance(mod, _NO_DECAY_TYPES + (MaskedNorm,)) or "embeddings" in full:
                out.add(full)
    return out


def param_groups(model: FineLAPModel, base_lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: per tower (audio, text, heads) x (decay, no_decay).

    lr = base_lr * tower lr_mult (audio: encoder.lr_mult, text: cfg.text.lr_mult). Frozen parameters
    (requires_grad False) and towers with lr_mult 0 are left out. Each group carries "name" and
    "lr_mult" so schedulers can rescale it.
    """
    towers = {
        "audio": (model.audio, model.audio.lr_mult),
        "text": (model.text, model.text.cfg.lr_mult),
    }
    tower_ids = {id(p) for mod, _ in towers.values() for p in mod.parameters()}
    groups: list[dict] = []

    def add(name: str, named: list[tuple[str, nn.Parameter]], nd: set[str], mult: float) -> None:
        if mult == 0:
            return
        decay = [p for n, p in named if p.requires_grad and n not in nd]
        no_decay = [p for n, p in named if p.requires_grad and n in nd]
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": f"{name}/{suffix}", "params": params, "lr": base_lr * mult, "lr_mult": mult, "weight_decay": wd})

    for name, (mod, mult) in towers.items():
        add(name, list(mod.named_parameters()), _no_decay_names(mod), mult)
    heads = [(n, p) for n, p in model.named_parameters() if id(p) not in tower_ids]
    add("heads", heads, _no_decay_names(model), 1.0)
    return groups
