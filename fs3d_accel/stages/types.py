"""Typed outputs of the pipeline stages (each stage can be re-run alone from the previous output)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..mesh import Mesh
from ..pose import Layout
from ..seams import TransformState


@dataclass
class SSOutput:
    """Sparse-structure stage: SS latents, occupancy, surface voxels and the decoded layout."""

    latents: dict[str, Tensor]     # final SS latents: shape (1, R^3, 8) and the layout tokens
    occupancy_logits: Tensor       # (R_occ, R_occ, R_occ) SS decoder logits (occupied iff > 0)
    coords: Tensor                 # (N,4) int32 [batch,x,y,z] surface voxels fed to SLaT
    coords_original: Tensor        # (M,4) all occupied voxels before surface pruning
    downsample_factor: int         # 2 when the voxel budget forced a coarser grid, else 1
    layout: Layout                 # metric camera-frame pose
    resolution: int                # occupancy resolution R_occ


@dataclass
class SLaTOutput:
    """Structured-latent stage: per-voxel latent on the (possibly transformed) coords."""

    coords: Tensor                 # (N',4) int32 coordinates the SLaT ran on
    feats: Tensor                  # (N',8) sampler output (normalised latent)
    slat: Tensor                   # (N',8) de-normalised latent (feats * std + mean)
    resolution: int
    coords_state: TransformState = field(default_factory=TransformState)


@dataclass
class DecodeOutput:
    """Mesh decoder stage: mesh in the object frame and posed in the camera frame."""

    mesh: Mesh
    posed_mesh: Mesh
    num_tokens: int                # tokens that entered the mesh decoder
    decoder_state: TransformState = field(default_factory=TransformState)
    info: dict[str, Any] = field(default_factory=dict)
