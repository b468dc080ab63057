"""Random weights for comparisons: the layers SAM 3D initialises to zero, filled in.

The res-blocks' second 3^3 convs (SLaT flow, mesh-decoder subdivision blocks) start at zero, as in the official
code. With
those zeros, whatever the layer before them computes never reaches the network's output. A comparison on freshly
built random weights would then pass whatever those layers compute: two sparse-conv algorithms, or our model
against the official one. The parity harness, the official-vs-ours benchmark and the sparse-conv benchmark fill
them in first.
"""
from __future__ import annotations

import torch
from torch import nn


def perturb_zero_inits(model: nn.Module, seed: int = 123, scale: float = 0.05) -> list[str]:
    """Fill every all-zero parameter of ``model`` (except mask tokens) with ``scale`` x N(0, 1) values drawn from
    ``seed``; returns the names filled. Parameters that are not all zero keep their values."""
    g = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 1 and p.numel() and float(p.abs().max()) == 0.0 and not name.endswith("mask_token"):
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
                filled.append(name)
    return filled
