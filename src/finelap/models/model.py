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

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import Timeline
from ..errors import ConfigError
from ..model_config import ModelConfig
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
from .slap_modules import build_caption_decoder, build_slap_predictor
from .text_encoders import HFTextEncoder

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
    "frame_similarity",
    "frame_logits",
]

# ----------------------------------------------------------------------------- config

# `ModelConfig` lives in finelap.model_config (no torch, so finelap.config can type RunConfig.model);
# it is re-exported here, where it used to be defined.


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


def frame_similarity(frame_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """<frame, text> for every frame and text: (..., T, D) x (N, D) shared by every clip, or
    x (..., N, D) per clip (FineLAP's phrase sets) -> (..., T, N). Embeddings are L2-normalised by
    the model, so this is the cosine."""
    return torch.matmul(frame_embeds, text_embeds.transpose(-1, -2))


def frame_logits(frame_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """Frame-text logits z = scale * <frame, text> + bias: the one definition that the model,
    inference and the frame losses share (the chunked frame losses use `frame_similarity`, since
    their gradient needs the product itself).

    frame_embeds (..., T, D); text_embeds (N, D) or (..., N, D) (see `frame_similarity`); scale,
    bias: scalars / 0-dim, per text (N,), or per clip and text (..., 1, N). Returns (..., T, N).
    """
    return scale * frame_similarity(frame_embeds, text_embeds) + bias


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
        # SLAP's trainable extras (last, as the training hook used to attach them: same initialisation)
        self.caption_decoder = build_caption_decoder(cfg.caption_decoder, da, self.text.tokenizer) if cfg.caption_decoder else None
        self.slap_predictor = build_slap_predictor(da) if cfg.slap_predictor else None
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
        self,
        wave: torch.Tensor,
        lengths: torch.Tensor | None = None,
        mask_frames: torch.Tensor | None = None,
        frame_rows: torch.Tensor | None = None,
        wave_digests: Sequence[str] | None = None,
        wave_decoded: Sequence[bool] | None = None,
    ) -> AudioOutput:
        """wave (B, N) at `sample_rate`, lengths (B,) -> AudioOutput (T = timeline.num_frames_for_samples(N)).

        frame_rows (B,) bool: the clips whose frame embeddings are wanted; the frame head runs on
        those rows only and the others' frame embeddings are zeros (the trainer passes the clips
        with strong labels when every frame loss reads only those). Ignored with a codebook, which
        pools every clip's frame embeddings into its clip embedding. wave_digests: each item's
        `feature_cache.wave_digest`, when known, for the feature cache of a frozen tower.
        wave_decoded: False for items the loader did not decode (`Batch.wave_decoded`); only the
        feature cache can encode them."""
        if self.feature_cache is not None and mask_frames is None and getattr(self.audio, "frozen", False):
            feats = self.feature_cache.encode(self.audio, wave, lengths, wave_digests, wave_decoded)
        else:
            if wave_decoded is not None and not all(wave_decoded):
                raise RuntimeError("encode_audio: some inputs were not decoded (the loader relied on the feature cache), "
                                   "but this call does not use the cache")  # fmt: skip
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
            rows = None if frame_rows is None or self.codebook is not None else frame_rows.to(device=x.device, dtype=torch.bool)
            if rows is None or bool(rows.all()):
                frame_embeds = self._frame_embeds(x, m, feats)
            else:
                idx = rows.nonzero().squeeze(1)
                part = self._frame_embeds(x[idx], m[idx], feats, idx) if len(idx) else None
                frame_embeds = x.new_zeros(x.shape[0], x.shape[1], self.cfg.embed_dim, dtype=part.dtype if part is not None else x.dtype)
                if part is not None:
                    frame_embeds = frame_embeds.index_copy(0, idx, part)
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

    def _frame_embeds(self, x: torch.Tensor, m: torch.Tensor, feats: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Frame embeddings (b, T, D) of encoder frames x (b, T, Da) with mask m; `rows` indexes
        `feats` when x holds only some of its clips."""
        if self.frame_head is None:
            return self.clip_head.project(x)
        if self.cfg.frame_head_per_window and self.la_block is None and feats.context_frames is not None:
            ctx, cm = feats.context_frames, feats.context_mask
            if rows is not None:
                ctx, cm = ctx[rows], (cm[rows] if cm is not None else None)
            return self.frame_head(ctx, cm)[:, : x.shape[1]]
        return self.frame_head(x, m)

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
        return frame_logits(audio.frame_embeds, text.text_embeds, s, b)

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


def param_groups(
    model: FineLAPModel, base_lr: float, weight_decay: float, lr_mult: Mapping[str, float] | None = None
) -> list[dict]:
    """AdamW parameter groups: per tower (audio, text, heads) x (decay, no_decay).

    lr = base_lr * tower lr_mult (audio: encoder.lr_mult, text: cfg.text.lr_mult) * prefix
    multiplier. `lr_mult` (train.lr_mult) maps parameter-name prefixes to multipliers: a prefix
    covers the parameter of that name and every name below it ("clip_head" covers
    "clip_head.mlp.0.weight"; "audio.stem" the audio encoder's stem); the longest covering prefix
    applies, and its parameters get groups of their own, "<tower>/<prefix>/<decay|no_decay>". A
    prefix that covers no parameter is a ConfigError (a typo would otherwise change nothing).
    Frozen parameters (requires_grad False) and parameters whose multiplier is 0 are left out.
    Each group carries "name" and "lr_mult" so schedulers can rescale it.
    """
    prefixes = {str(k): float(v) for k, v in (lr_mult or {}).items()}
    all_names = [n for n, _ in model.named_parameters()]
    for pre in prefixes:
        if not any(n == pre or n.startswith(pre + ".") for n in all_names):
            top = sorted({n.split(".")[0] for n in all_names})
            raise ConfigError(f"train.lr_mult: {pre!r} is not the name (or a dotted start) of any model parameter; top-level modules: {', '.join(top)}")

    def prefix_of(name: str) -> str | None:
        covering = [p for p in prefixes if name == p or name.startswith(p + ".")]
        return max(covering, key=len) if covering else None

    towers = {
        "audio": (model.audio, model.audio.lr_mult),
        "text": (model.text, model.text.cfg.lr_mult),
    }
    tower_ids = {id(p) for mod, _ in towers.values() for p in mod.parameters()}
    groups: list[dict] = []

    def add(name: str, named: list[tuple[str, nn.Parameter]], nd: set[str], mult: float, full: Callable[[str], str]) -> None:
        for pre in (None, *prefixes):  # the unprefixed parameters first: with no lr_mult, one pair of groups per tower
            m = mult * (prefixes[pre] if pre is not None else 1.0)
            mine = [(n, p) for n, p in named if p.requires_grad and prefix_of(full(n)) == pre]
            if m == 0 or not mine:
                continue
            decay = [p for n, p in mine if n not in nd]
            no_decay = [p for n, p in mine if n in nd]
            group = name if pre is None else f"{name}/{pre}"
            for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
                if params:
                    groups.append({"name": f"{group}/{suffix}", "params": params, "lr": base_lr * m, "lr_mult": m, "weight_decay": wd})

    for name, (mod, mult) in towers.items():
        add(name, list(mod.named_parameters()), _no_decay_names(mod), mult, lambda n, t=name: f"{t}.{n}")
    heads = [(n, p) for n, p in model.named_parameters() if id(p) not in tower_ids]
    add("heads", heads, _no_decay_names(model), 1.0, lambda n: n)
    return groups
