"""VAE encoders that inference does not need (the decoders live in ``fs3d_accel.model``).

* :class:`SSEncoder`: dense 3D conv net, occupancy (B, 1, 4R, 4R, 4R) -> mean, logvar (B, 8, R, R, R);
  the mirror of :class:`~fs3d_accel.model.ss_decoder.SSDecoder` (strided convs instead of pixel
  shuffle).
* :class:`SLaTEncoder`: per surface voxel, the truncated SDF at its (sub+1)^3 corner lattice
  (scaled to [-1, 1]) -> mean, logvar (N, 8), with sparse 3x3x3 convolutions for neighbour context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.configs import SSDecoderConfig
from ..model.layers import LayerNorm32
from ..model.sparse import SparseConv3d, SparseLinear, SparseTensor
from ..model.ss_decoder import ChannelLayerNorm32, ResBlock3d


class SSEncoder(nn.Module):
    """Occupancy (B, 1, D, D, D) -> (mean, logvar), each (B, latent_channels, D/f, D/f, D/f)."""

    def __init__(self, cfg: SSDecoderConfig) -> None:
        super().__init__()
        ch = list(reversed(cfg.channels))  # fine -> coarse, e.g. 16, 32, 64
        self.cfg = cfg
        self.input_layer = nn.Conv3d(1, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(ch):
            blocks.extend(ResBlock3d(c) for _ in range(cfg.num_res_blocks))
            if i + 1 < len(ch):
                blocks.append(nn.Conv3d(c, ch[i + 1], 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.middle_block = nn.Sequential(*(ResBlock3d(ch[-1]) for _ in range(cfg.num_res_blocks_middle)))
        self.out_layer = nn.Sequential(ChannelLayerNorm32(ch[-1], eps=1e-5), nn.SiLU(),
                                       nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1))

    def forward(self, occ: Tensor) -> tuple[Tensor, Tensor]:
        if occ.ndim != 5 or occ.shape[1] != 1:
            raise ValueError(f"SSEncoder expects (B, 1, D, D, D), got {tuple(occ.shape)}")
        h = self.middle_block(self.blocks(self.input_layer(occ.float() * 2 - 1)))
        mean, logvar = self.out_layer(h).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)


class _SparseResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(c, eps=1e-6)
        self.conv1 = SparseConv3d(c, c, 3)
        self.norm2 = LayerNorm32(c, eps=1e-6)
        self.conv2 = SparseConv3d(c, c, 3)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        return x.replace(x.feats + h.feats)


class SLaTEncoder(nn.Module):
    """Corner-lattice SDF per surface voxel (N, in_features) -> (mean, logvar), each (N, latent)."""

    def __init__(self, in_features: int = 125, channels: int = 96, latent_channels: int = 8,
                 num_blocks: int = 2) -> None:
        super().__init__()
        self.in_features = in_features
        self.input_layer = nn.Sequential(nn.Linear(in_features, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.blocks = nn.ModuleList(_SparseResBlock(channels) for _ in range(num_blocks))
        self.out_norm = LayerNorm32(channels, eps=1e-6)
        self.out_layer = SparseLinear(channels, 2 * latent_channels)

    def forward(self, feats: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """feats (N, in_features) in [-1, 1]; coords (N, 4) int [batch, x, y, z] sorted by batch."""
        if feats.ndim != 2 or feats.shape[1] != self.in_features:
            raise ValueError(f"SLaTEncoder expects feats (N, {self.in_features}), got {tuple(feats.shape)}")
        x = SparseTensor.create(self.input_layer(feats.float()), coords)
        for blk in self.blocks:
            x = blk(x)
        out = self.out_layer(x.replace(self.out_norm(x.feats))).feats
        mean, logvar = out.chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)


def reparameterize(mean: Tensor, logvar: Tensor) -> Tensor:
    return mean + torch.randn_like(mean) * (0.5 * logvar).exp()


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
