"""Layers shared by the encoders and the heads: masked norms, rotary positions, the pre-norm
transformer block and its attention masks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["MaskedNorm", "TransformerBlock", "attention_masks", "rotary_tables"]


class MaskedNorm(nn.Module):
    """BatchNorm or GroupNorm whose statistics use only valid time steps.

    x (B, C, ..., T) with mask (B, T) bool. kind="batch": per-channel statistics over batch and
    valid positions in training, running statistics in eval (then the mask is irrelevant).
    kind="group": per-sample statistics over each channel group and valid positions.
    kind="layer": statistics over channels (and frequency) at each time step: no batch statistics
        and no pooling over time, so outputs are independent of other items and of far-away audio
        (exact gradient accumulation and DDP parity, and windowed long audio stitches seamlessly).
    Padded positions are normalised too (their values are masked by the caller).
    """

    def __init__(self, channels: int, kind: str = "batch", groups: int = 8, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if kind not in ("batch", "group", "layer"):
            raise ConfigError(f"norm must be 'batch', 'group' or 'layer', got {kind!r}")
        self.kind, self.eps, self.momentum = kind, eps, momentum
        self.groups = math.gcd(groups, channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if kind == "batch":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.weight.view(shape), self.bias.view(shape)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in float32 (autocast/bf16 runs)
            return self._forward(x.float(), mask).to(x.dtype)
        return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        full = mask is None or bool(mask.all())
        if self.kind == "batch":
            # F.batch_norm refuses one value per channel in training; the masked path handles it
            if not self.training or (full and x.numel() > x.shape[1]):
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
                )
            if mask is None:
                mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
            m = mask.view(mask.shape[0], 1, *([1] * (x.dim() - 3)), mask.shape[1]).to(x.dtype)
            dims = [0] + list(range(2, x.dim()))
            count = m.sum() * math.prod(x.shape[2:-1])
            mean = (x * m).sum(dims) / count
            shape = (1, -1) + (1,) * (x.dim() - 2)
            var = ((x - mean.view(shape)).square() * m).sum(dims) / count
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
            w, b = self._affine(x)
            return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * w + b
        if self.kind == "layer":  # per (sample, time step): local in time, batch-independent
            # time to dim 1 so F.layer_norm's fused kernel normalises the trailing (C, ...) dims:
            # ~5x faster than spelling the statistics out, forward + backward
            y = F.layer_norm(x.movedim(-1, 1), x.shape[1:-1], eps=self.eps).movedim(1, -1).contiguous()
            w, b = self._affine(x)
            return torch.addcmul(b, y, w)
        # group norm, per sample
        if full:
            return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)
        bsz, c = x.shape[:2]
        xg = x.reshape(bsz, self.groups, c // self.groups, *x.shape[2:])
        m = mask.view(bsz, 1, 1, *([1] * (x.dim() - 3)), mask.shape[1]).to(x.dtype)
        dims = list(range(2, xg.dim()))
        count = m.sum(dims, keepdim=True) * (c // self.groups) * math.prod(x.shape[2:-1])
        mean = (xg * m).sum(dims, keepdim=True) / count
        var = ((xg - mean).square() * m).sum(dims, keepdim=True) / count
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape_as(x)
        w, b = self._affine(x)
        return y * w + b


def rotary_tables(n: int, head_dim: int, base: float = 10000.0, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (n, head_dim) for rotary position embeddings (rotate-half convention)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

    x (B, T, D); attn_mask (B, 1, T, T) bool, True = may attend; rope (cos, sin) each (T, D/heads).
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _apply_rotary(q, *rope), _apply_rotary(k, *rope)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


def attention_masks(frame_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) bool: keys must be valid (and within `window` frames when given).

    Every query may attend to itself, so padded queries (whose outputs are discarded) never see an
    empty row, which would give NaN.
    """
    t = frame_mask.shape[1]
    allowed = frame_mask[:, None, None, :]
    if window is not None:
        idx = torch.arange(t, device=frame_mask.device)
        allowed = allowed & ((idx[:, None] - idx[None, :]).abs() <= window)
    return allowed | torch.eye(t, dtype=torch.bool, device=frame_mask.device)


