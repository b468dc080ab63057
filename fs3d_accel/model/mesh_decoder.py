"""SLaT mesh decoder: swin sparse transformer, two subdivide blocks, FlexiCubes-layout head.

Architecture and keys follow ``sam3d-architecture.md`` section 4.2 (plain state dict, no prefix).
Output channels (101, FlexiCubes order): sdf [0:8], deform [8:32], weights [32:53], color [53:101].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .configs import MeshDecoderConfig
from .layers import AbsolutePositionEmbedder, FeedForwardNet, LayerNorm32, zero_module
from .sparse import (SparseConv3d, SparseGroupNorm32, SparseLinear, SparseSelfAttention, SparseSiLU,
                     SparseTensor, subdivide_like)

NORM_EPS = 1e-6


class SparseTransformerBlock(nn.Module):
    """Pre-LN block (LayerNorm32 without affine): x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, window_size: int, shift_window: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=NORM_EPS)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=NORM_EPS)
        self.attn = SparseSelfAttention(channels, num_heads, mode="windowed", window_size=window_size,
                                        shift_window=shift_window, qk_rms_norm=False)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def forward(self, x: SparseTensor) -> SparseTensor:
        f = x.feats
        f = f + self.attn(x.replace(self.norm1(f))).feats
        f = f + self.mlp(self.norm2(f))
        return x.replace(f)


class SparseSubdivideBlock3d(nn.Module):
    """GroupNorm+SiLU, subdivide to 2x resolution, conv-GN-SiLU-conv(zero) + k1-conv skip.

    Keys: ``act_layers.0`` (GroupNorm), ``out_layers.0.conv``, ``out_layers.1`` (GroupNorm),
    ``out_layers.3.conv`` (zero-init), ``skip_connection.conv`` (k=1; Identity if channels equal).
    """

    def __init__(self, channels: int, out_channels: int, num_groups: int = 32) -> None:
        super().__init__()
        for c in (channels, out_channels):
            if c % num_groups:
                raise ValueError(f"channels {c} not divisible by num_groups {num_groups}")
        self.act_layers = nn.Sequential(SparseGroupNorm32(num_groups, channels), SparseSiLU())
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, out_channels, 3),
            SparseGroupNorm32(num_groups, out_channels),
            SparseSiLU(),
            zero_module(SparseConv3d(out_channels, out_channels, 3)),
        )
        self.skip_connection = SparseConv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.act_layers(x)
        # both subdivisions share one coordinate set (and its neighbour tables)
        h = subdivide_like(x, h.feats)
        xs = h.replace(x.feats.repeat_interleave(8, dim=0))
        h = self.out_layers(h)
        return h.replace(h.feats + self.skip_connection(xs).feats)


class MeshDecoder(nn.Module):
    """SLaT (N, 8) at ``resolution``^3 -> 101 FlexiCubes channels at ``output_resolution``^3."""

    def __init__(self, cfg: MeshDecoderConfig) -> None:
        super().__init__()
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(f"model_channels {cfg.model_channels} not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        c = cfg.model_channels
        self.input_layer = SparseLinear(cfg.latent_channels, c)
        self.pos_embedder = AbsolutePositionEmbedder(c)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(c, cfg.num_heads, cfg.mlp_ratio, cfg.window_size,
                                   shift_window=(cfg.window_size // 2) * (i % 2))
            for i in range(cfg.num_blocks))
        chans = [c] + list(cfg.upsample_channels)
        self.upsample = nn.ModuleList(
            SparseSubdivideBlock3d(a, b, cfg.num_groups) for a, b in zip(chans[:-1], chans[1:]))
        self.out_layer = SparseLinear(chans[-1], cfg.out_channels)

    @property
    def torso_dtype(self) -> torch.dtype:
        return self.blocks[0].attn.to_qkv.weight.dtype if len(self.blocks) else self.input_layer.weight.dtype

    def forward(self, feats: Tensor, coords: Tensor) -> SparseTensor:
        """feats (N, 8) de-normalised SLaT, coords (N, 4) int [batch, x, y, z] sorted by batch."""
        cfg = self.cfg
        if feats.ndim != 2 or feats.shape[1] != cfg.latent_channels:
            raise ValueError(f"feats must be (N, {cfg.latent_channels}), got {tuple(feats.shape)}")
        if len(feats) == 0:
            raise ValueError("mesh decoder needs at least one voxel")
        if int(coords[:, 1:].max()) >= cfg.resolution:
            raise ValueError(f"coords exceed resolution {cfg.resolution}")
        x = SparseTensor.create(feats, coords)
        dtype = self.torso_dtype
        h = self.input_layer(x)
        h = h.replace((h.feats + self.pos_embedder(h.coords[:, 1:]).to(h.feats.dtype)).to(dtype))
        for block in self.blocks:
            h = block(h)
        for block in self.upsample:
            h = block(h)
        h = h.replace(h.feats.to(feats.dtype))
        return self.out_layer(h.replace(h.feats.to(self.out_layer.weight.dtype)))
