"""Heads: the decoupled projector (clip MLP and frame transformer), text projection, logit scale/bias,
and the pieces the other presets need (MGA-CLAP codebook with sparsemax and locality-aware block,
FLAM's text-conditioned scale and bias).

All embedding heads return L2-normalised vectors; logits are `scale * cos + bias`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import TransformerBlock, attention_masks, rotary_tables

__all__ = [
    "masked_mean",
    "masked_max",
    "ClipHead",
    "FrameHead",
    "PostNormFrameHead",
    "TextHead",
    "ScaleBias",
    "TextConditionedScaleBias",
    "sparsemax",
    "CodebookAggregator",
    "CodebookOutput",
    "LocalityAwareBlock",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, D), mask (B, T) bool -> (B, D) mean over valid steps (a fully masked row gives 0)."""
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, D), mask (B, T) bool -> (B, D) max over valid steps (a fully masked row gives 0)."""
    if mask is None:
        return x.amax(1)
    top = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return torch.where(mask.any(1, keepdim=True), top, torch.zeros_like(top))


CLIP_POOLINGS = ("mean", "cls", "meanmax")
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


HEAD_STYLES = ("mlp", "ln_mlp")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0, activation: str = "gelu", style: str = "mlp") -> nn.Module:
    """style "mlp": Linear, act, Dropout, Linear. "ln_mlp": LayerNorm, Linear, act, LayerNorm, Linear
    (MGA-CLAP's frame_proj / word_proj, same indices)."""
    if style not in HEAD_STYLES:
        raise ConfigError(f"head style must be one of {HEAD_STYLES}, got {style!r}")
    if hidden == 0:
        return nn.Linear(in_dim, out_dim)
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"head activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    act = _ACTIVATIONS[activation]()
    if style == "ln_mlp":
        return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), act, nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), act, nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class ClipHead(nn.Module):
    """Clip embedding from frames: pooled frames -> 2-layer GELU MLP -> L2 norm.

    pooling: "mean" (masked mean of the frames), "cls" (the encoder's CLS vector) or "meanmax"
    (masked mean and masked max concatenated: 2 * Din inputs; for a frozen pretrained tower the max
    keeps short events that a mean over a long clip dilutes).
    input_norm: LayerNorm (no affine) on the pooled vector before the MLP, so every feature of a
    frozen tower speaks at one scale.
    forward(frames (B, T, Din), mask (B, T), cls (B, Din) | None) -> (B, Dout), unit norm.
    `project(frames)` applies the same MLP per frame (frame stream when no frame head is used;
    with "meanmax" a single frame is its own mean and max).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int | None = None, pooling: str = "mean", dropout: float = 0.0, activation: str = "gelu",
        style: str = "mlp", input_norm: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if pooling not in CLIP_POOLINGS:
            raise ConfigError(f"clip head pooling must be one of {CLIP_POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        pooled = 2 * in_dim if pooling == "meanmax" else in_dim
        self.norm = nn.LayerNorm(pooled, elementwise_affine=False) if input_norm else None
        self.mlp = _mlp(pooled, in_dim if hidden is None else hidden, out_dim, dropout, activation, style)

    def pool(self, frames: torch.Tensor, mask: torch.Tensor | None, cls: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "cls":
            if cls is None:
                raise ConfigError("clip head pooling='cls' but the audio encoder returns no CLS token; use pooling='mean'")
            return cls
        mean = masked_mean(frames, mask)
        if self.pooling == "mean":
            return mean
        return torch.cat([mean, masked_max(frames, mask)], dim=-1)

    def _mlp_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x if self.norm is None else self.norm(x))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None, cls: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self._mlp_in(self.pool(frames, mask, cls)), dim=-1)

    def project(self, frames: torch.Tensor) -> torch.Tensor:
        if self.pooling == "meanmax":
            frames = torch.cat([frames, frames], dim=-1)
        return F.normalize(self._mlp_in(frames), dim=-1)


class FrameHead(nn.Module):
    """Frame embeddings: Linear -> `layers` transformer blocks over the (masked) frames -> L2 norm.

    forward(frames (B, T, Din), mask (B, T)) -> (B, T, Dout), unit norm. window=None: global
    attention; an int restricts each frame to +-window neighbours. Rotary positions, no length limit.
    """

    def __init__(
        self, in_dim: int, out_dim: int, layers: int = 1, heads: int = 4, window: int | None = None, mlp_ratio: float = 2.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if layers < 0:
            raise ConfigError(f"frame head layers must be >= 0, got {layers}")
        self.proj = nn.Linear(in_dim, out_dim)
        self.blocks = nn.ModuleList(TransformerBlock(out_dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(out_dim) if layers else nn.Identity()
        self.heads, self.window = heads, window

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(frames)
        if self.blocks:
            b, t, d = x.shape
            fm = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
            am = attention_masks(fm, self.window)
            rope = rotary_tables(t, d // self.heads, device=x.device, dtype=x.dtype)
            for blk in self.blocks:
                x = blk(x, am, rope)
            x = self.norm(x)
        return F.normalize(x, dim=-1)


class PostNormFrameHead(nn.Module):
    """Frame embeddings with FineLAP's local projector layout: Linear -> `layers` post-norm
    `torch.nn.TransformerEncoderLayer`s (ReLU feed-forward, no positions, no final norm) -> L2 norm.

    forward(frames (B, T, Din), mask (B, T)) -> (B, T, Dout), unit norm. Keys are the valid frames
    (every query also sees itself, so no row is empty). block: attention is confined to
    consecutive blocks of `block` frames, the fixed windows of the encoder, as in a reference model
    that projected one window at a time; None: global attention.
    """

    def __init__(self, in_dim: int, out_dim: int, layers: int = 2, heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, block: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if layers < 1:
            raise ConfigError(f"post-norm frame head needs layers >= 1, got {layers}")
        if out_dim % heads:
            raise ConfigError(f"frame head dim ({out_dim}) must be divisible by heads ({heads})")
        if block is not None and block < 1:
            raise ConfigError(f"frame head block must be >= 1, got {block}")
        self.proj = nn.Linear(in_dim, out_dim)
        layer = nn.TransformerEncoderLayer(out_dim, heads, int(out_dim * mlp_ratio), dropout, activation="relu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.heads, self.block = heads, block

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(frames)
        b, t, _ = x.shape
        fm = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
        allowed = fm[:, None, :].expand(b, t, t)
        if self.block is not None:
            blk = torch.arange(t, device=x.device) // self.block
            allowed = allowed & (blk[:, None] == blk[None, :])
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=x.device)
        if bool(allowed.all()):
            x = self.encoder(x)
        else:
            bias = torch.zeros(b, t, t, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
            x = self.encoder(x, mask=bias.repeat_interleave(self.heads, dim=0))
        return F.normalize(x, dim=-1)


class TextHead(nn.Module):
    """Text projection to the shared space: MLP (hidden=0: linear) -> L2 norm. Works on (N, H) or (N, L, H).

    identity=True: no projection at all (in_dim must equal out_dim): the audio heads learn to map
    into the text tower's own space, which keeps its geometry for words never seen in training.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, dropout: float = 0.0, activation: str = "gelu",
                 style: str = "mlp", identity: bool = False) -> None:  # fmt: skip
        super().__init__()
        if identity:
            if in_dim != out_dim:
                raise ConfigError(f"an identity text projection needs model.embed_dim = the text tower's width ({in_dim}), got {out_dim}")
            self.mlp: nn.Module = nn.Identity()
        else:
            self.mlp = _mlp(in_dim, max(in_dim, out_dim) if hidden is None else hidden, out_dim, dropout, activation, style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class ScaleBias(nn.Module):
    """Logit scale and bias: logits = scale * cos + bias. The scale is stored as log(scale) (positive,
    and multiplicative updates), clamped at `max_scale` when read.

    forward() -> (scale, bias), 0-d tensors. learnable=False keeps them as buffers.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, learnable: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        if not init_scale > 0:
            raise ConfigError(f"logit scale must be positive, got {init_scale}")
        log_scale = torch.tensor(math.log(init_scale))
        bias = torch.tensor(float(init_bias))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("log_scale", log_scale)
            self.register_buffer("bias", bias)
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_scale.clamp(max=self.max_log_scale).exp(), self.bias


class TextConditionedScaleBias(nn.Module):
    """FLAM's per-text calibration: alpha(t) = exp(MLP_a(t)), beta(t) = MLP_b(t).

    The last layers start at zero weights with biases log(init_scale) and init_bias, so every text
    starts at alpha = init_scale (10) and beta = init_bias (-8). forward(text (N, Dt)) -> (scale (N,), bias (N,)).
    """

    def __init__(self, text_dim: int, hidden: int = 256, init_scale: float = 10.0, init_bias: float = -8.0, max_scale: float = 100.0) -> None:
        super().__init__()
        if not init_scale > 0:
            raise ConfigError(f"logit scale must be positive, got {init_scale}")
        self.scale_mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.bias_mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        for mlp, b0 in ((self.scale_mlp, math.log(init_scale)), (self.bias_mlp, float(init_bias))):
            nn.init.zeros_(mlp[-1].weight)
            nn.init.constant_(mlp[-1].bias, b0)
        self.max_log_scale = math.log(max_scale)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale = self.scale_mlp(text).squeeze(-1).clamp(max=self.max_log_scale)
        return log_scale.exp(), self.bias_mlp(text).squeeze(-1)


# ============================================================================ sparsemax


class _Sparsemax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        z = x.transpose(dim, -1)
        z = z - z.amax(-1, keepdim=True)  # shift-invariant; keeps cumsum well conditioned
        zs = z.sort(-1, descending=True).values
        k = torch.arange(1, z.shape[-1] + 1, device=x.device, dtype=x.dtype)
        cs = zs.cumsum(-1)
        # the support of sparsemax is a prefix of the sorted values: k such that 1 + k z_(k) > sum_{j<=k} z_(j)
        kz = (1 + k * zs > cs).sum(-1, keepdim=True)
        tau = (cs.gather(-1, kz - 1) - 1) / kz.to(x.dtype)
        out = (z - tau).clamp(min=0).transpose(dim, -1).contiguous()
        ctx.save_for_backward(out)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        s = (out > 0).to(g.dtype)
        # Jacobian of sparsemax: diag(s) - s s^T / |S|
        v = (g * s).sum(ctx.dim, keepdim=True) / s.sum(ctx.dim, keepdim=True)
        return s * (g - v), None


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo, 2016): Euclidean projection of x onto the simplex along `dim`.

    Exact (sorting), with the analytic gradient. Entries of -inf get weight 0 (a row needs at least
    one finite entry).
    """
    return _Sparsemax.apply(x, dim)


@dataclass
class CodebookOutput:
    """embeds (B, D) aggregated codeword embeddings (not normalised); weights (B, K) sparse, rows sum to 1."""

    embeds: torch.Tensor
    weights: torch.Tensor


class CodebookAggregator(nn.Module):
    """MGA-CLAP's modality-shared codebook.

    For a sequence x (B, L, D) (frames or words) with mask (B, L): affinity to codeword k is
    max_l <x_l, c_k> / (sqrt(D) * temperature) over valid steps; weights = sparsemax over k; the
    embedding is sum_k w_k c_k. Both modalities use the same instance, so they share the codewords.

    masked="exclude" leaves masked steps out of the max; masked="zero" gives them affinity 0, as
    MGA-CLAP's released code does (it multiplies the affinities by the word mask before the max).
    """

    def __init__(self, dim: int, size: int = 512, temperature: float = 1.0) -> None:
        super().__init__()
        if size < 2:
            raise ConfigError(f"codebook size must be >= 2, got {size}")
        if not temperature > 0:
            raise ConfigError(f"codebook temperature must be positive, got {temperature}")
        self.codebook = nn.Parameter(torch.randn(size, dim))
        self.temperature = temperature
        self.dim = dim

    def affinities(self, x: torch.Tensor, mask: torch.Tensor | None = None, masked: str = "exclude") -> torch.Tensor:
        """(B, L, D) -> (B, K): max over valid steps of the scaled dot products."""
        if masked not in ("exclude", "zero"):
            raise ConfigError(f"codebook masked must be 'exclude' or 'zero', got {masked!r}")
        a = torch.matmul(x, self.codebook.t()) / (math.sqrt(self.dim) * self.temperature)
        if mask is not None:
            a = a.masked_fill(~mask[..., None], float("-inf") if masked == "exclude" else 0.0)
        return a.amax(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, masked: str = "exclude") -> CodebookOutput:
        w = sparsemax(self.affinities(x, mask, masked), dim=-1)
        return CodebookOutput(embeds=w @ self.codebook, weights=w)


class LocalityAwareBlock(nn.Module):
    """MGA-CLAP's locality-aware block: value-value self-attention without a feed-forward, added
    residually on top of the encoder's last frames. Attending by value similarity (instead of
    query-key) keeps each frame's output close to frames that sound alike, which preserves locality
    for frame-text alignment.

    forward(x (B, T, D), mask (B, T)) -> (B, T, D).
    """

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        v = self.v(self.norm(x)).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        fm = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
        a = F.scaled_dot_product_attention(v, v, v, attn_mask=attention_masks(fm, None))
        return x + self.proj(a.transpose(1, 2).reshape(b, t, d))
