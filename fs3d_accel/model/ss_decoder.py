"""Sparse-structure VAE decoder: dense 3D conv net, latent (B, 8, R, R, R) -> occupancy logits.

Reimplements the official ``SparseStructureDecoderTdfyWrapper`` (``sam3d-architecture.md`` 4.1):
input conv, middle res-blocks, per-level res-blocks with conv + 3D pixel-shuffle upsampling
between levels, and a norm / SiLU / conv head. A voxel is occupied where its logit is > 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import SSDecoderConfig
from .layers import LayerNorm32


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """(B, C*f^3, H, W, D) -> (B, C, fH, fW, fD); channel c*f^3 + a*f^2 + b*f + e -> offset (a, b, e)."""
    bsz, ch, h, w, d = x.shape
    f3 = factor ** 3
    if ch % f3:
        raise ValueError(f"channels {ch} not divisible by factor^3 = {f3}")
    c = ch // f3
    x = x.reshape(bsz, c, factor, factor, factor, h, w, d)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(bsz, c, h * factor, w * factor, d * factor)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel dim of a (B, C, *spatial) tensor, computed in float32."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.movedim(1, -1)
        return super().forward(x).movedim(-1, 1)


class ResBlock3d(nn.Module):
    """h = conv1(SiLU(norm1 x)); h = conv2(SiLU(norm2 h)); return h + skip(x)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = ChannelLayerNorm32(channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm32(out_channels, eps=1e-5)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection: nn.Module = (nn.Conv3d(channels, out_channels, 1) if channels != out_channels
                                           else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class UpsampleBlock3d(nn.Module):
    """Conv3d(c_in -> 8 c_out) then 3D pixel shuffle: doubles the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SSDecoder(nn.Module):
    """Dense decoder: (B, latent_channels, R, R, R) -> (B, 1, R*f, R*f, R*f) logits, f = 2^(levels-1)."""

    def __init__(self, cfg: SSDecoderConfig) -> None:
        super().__init__()
        if not cfg.channels:
            raise ValueError("SSDecoderConfig.channels must not be empty")
        self.cfg = cfg
        ch = cfg.channels
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*(ResBlock3d(ch[0]) for _ in range(cfg.num_res_blocks_middle)))
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks.extend(ResBlock3d(c) for _ in range(cfg.num_res_blocks))
            if i + 1 < len(ch):
                blocks.append(UpsampleBlock3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(ChannelLayerNorm32(ch[-1], eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(ch[-1], 1, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.input_layer.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"SSDecoder expects (B, {self.cfg.latent_channels}, R, R, R), got {tuple(x.shape)}")
        h = self.input_layer(x.to(self.dtype))
        h = self.middle_block(h)
        for blk in self.blocks:
            h = blk(h)
        return self.out_layer(h).to(x.dtype)
