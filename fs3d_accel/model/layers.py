"""Building blocks shared by the SAM 3D modules (names and math follow the official modules)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, result cast back."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos first, 256 frequencies) followed by a 2-layer MLP.

    The input ``t`` is already multiplied by the sampler's time scale (1000).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        if t.ndim == 0:
            t = t[None]
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class AbsolutePositionEmbedder(nn.Module):
    """Parameter-free sin/cos embedding of integer coordinates (one block per axis, sin then cos).

    ``freq_dim = channels // in_channels // 2``; the result is zero-padded to ``channels``.
    """

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.freq_dim = channels // in_channels // 2
        freqs = 1.0 / (10000 ** (torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, coords: Tensor) -> Tensor:
        """coords: (N, in_channels) -> (N, channels) float32."""
        n, d = coords.shape
        if d != self.in_channels:
            raise ValueError(f"expected coords with {self.in_channels} columns, got {d}")
        out = torch.outer(coords.reshape(-1).float(), self.freqs.to(coords.device))
        out = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(n, -1)
        if out.shape[1] < self.channels:
            out = torch.cat([out, out.new_zeros(n, self.channels - out.shape[1])], dim=-1)
        return out


class MultiHeadRMSNorm(nn.Module):
    """q/k RMS norm: F.normalize over head_dim, times gamma (heads, head_dim), times sqrt(head_dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., heads, head_dim)."""
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)


class FeedForwardNet(nn.Module):
    """``mlp`` = Linear(c -> c*ratio), GELU(tanh), Linear(c*ratio -> c) (official key layout)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on (B, L, H, D) tensors; returns (B, L, H, D).

    ``mask`` (optional): boolean (B, 1, Lq, Lk) or (B, 1, 1, Lk), True = attend.
    """
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x * (1 + scale) + shift (shift/scale broadcast over tokens)."""
    return x * (1 + scale) + shift


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m
