"""Mesh extraction from the mesh decoder's 101-channel sparse output.

NOT FlexiCubes. The official decoder runs FlexiCubes (deformed grid vertices, learnt per-cube
weights). We only use the SDF: per-cube corner values (channels 0:8, plus the official -1/res bias)
are averaged onto the shared (res+1)^3 grid vertices, untouched grid vertices are set to +1
(outside, as the official densification does), and marching cubes (scikit-image) extracts the
zero level set, keeping only the faces that lie in active (decoded) cubes, as FlexiCubes only
extracts inside the cubes it is given: without that filter the +1 default of the untouched
vertices inside a closed object would add a spurious inner surface along the inner side of the
decoded surface shell. The deform [8:32] and weights [32:53] channels are ignored, so vertices differ from
the official mesh by up to about one voxel and the topology can differ where FlexiCubes' weights
matter. Colours: corner RGB (channels 53 + 6*corner + {0,1,2}, sigmoid) averaged onto the grid,
then interpolated trilinearly to the mesh vertices over touched grid vertices only.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .sparse import SparseTensor

#: Corner order of a cube (FlexiCubes convention: x fastest, then y, then z). UNCERTAIN vs the
#: official channel order; only the averaging onto grid vertices depends on it.
CUBE_CORNERS = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0],
                             [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.long)
SDF_CHANNELS = slice(0, 8)
COLOR_START = 53
COLOR_PER_CORNER = 6
NUM_CHANNELS = 101


class EmptyMeshError(ValueError):
    """The SDF grid has no zero crossing (all inside or all outside), so there is no surface."""


def _corner_grid_index(coords: Tensor, res: int) -> Tensor:
    """(N, 3) voxel coords -> (N, 8) flat indices into the (res+1)^3 vertex grid: each cube's origin index plus each
    corner's constant offset (the same integers as indexing every corner's coordinates, without the (N, 8, 3)
    intermediate, which took 0.12 of the extraction's 0.82 s at 14k on the 2-core CPU machine)."""
    g = res + 1
    c = coords.long()
    base = (c[:, 0] * g + c[:, 1]) * g + c[:, 2]
    offsets = (CUBE_CORNERS[:, 0] * g + CUBE_CORNERS[:, 1]) * g + CUBE_CORNERS[:, 2]
    return base[:, None] + offsets[None]


def _vertex_means(inv: Tensor, counts: Tensor, values: Tensor) -> Tensor:
    """Mean of ``values`` (M, C) per distinct grid vertex (``inv`` (M,) into U vertices) -> (U, C)."""
    sums = torch.zeros(len(counts), values.shape[1], dtype=torch.float64)
    sums.index_add_(0, inv, values.double())
    return (sums / counts[:, None]).float()


def _interpolate_touched(uidx: Tensor, vals: Tensor, pts: Tensor, g: int) -> Tensor:
    """Trilinear interpolation at pts (V, 3) (grid index units) over touched grid vertices only."""
    p0 = pts.floor().long().clamp_(0, g - 2)
    frac = pts - p0
    acc = torch.zeros(len(pts), vals.shape[1], dtype=torch.float64)
    wsum = torch.zeros(len(pts), dtype=torch.float64)
    for corner in CUBE_CORNERS:
        p = p0 + corner
        flat = (p[:, 0] * g + p[:, 1]) * g + p[:, 2]
        pos = torch.searchsorted(uidx, flat).clamp_(max=len(uidx) - 1)
        hit = uidx[pos] == flat
        w = torch.where(corner.bool(), frac, 1 - frac).prod(1).double() * hit
        acc += w[:, None] * vals[pos].double()
        wsum += w
    return (acc / wsum.clamp(min=1e-12)[:, None]).float()


def _keep_active_cubes(verts: np.ndarray, faces: np.ndarray, cube_coords: Tensor, res: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Drop faces whose cube (floor of the face centroid, in grid units) is not an active voxel,
    then drop unreferenced vertices."""
    active = np.zeros((res, res, res), dtype=bool)
    c = cube_coords.numpy()
    active[c[:, 0], c[:, 1], c[:, 2]] = True
    cell = np.clip(np.floor(verts[faces].mean(axis=1)).astype(np.int64), 0, res - 1)
    faces = faces[active[cell[:, 0], cell[:, 1], cell[:, 2]]]
    used = np.unique(faces)
    remap = np.full(len(verts), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return verts[used], remap[faces]


def extract_mesh(out: SparseTensor, resolution: int, with_color: bool = True
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per batch element: (vertices (V,3) float32 in [-0.5,0.5]^3, faces (F,3) int64, colours (V,3) or None).

    ``out``: 101-channel sparse tensor at ``resolution``^3 (the mesh decoder output). Faces are
    oriented with outward normals (negative SDF = inside). Raises :class:`EmptyMeshError` when an
    element has no zero crossing.
    """
    from skimage.measure import marching_cubes

    if out.num_channels != NUM_CHANNELS:
        raise ValueError(f"expected {NUM_CHANNELS} channels (FlexiCubes layout), got {out.num_channels}")
    if len(out) and int(out.coords[:, 1:].max()) >= resolution:
        raise ValueError(f"coords exceed resolution {resolution}")
    g = resolution + 1
    results = []
    feats = out.feats.detach().float().cpu()
    coords = out.coords.cpu()
    for b, sl in enumerate(out.layout):
        if sl.stop == sl.start:
            raise EmptyMeshError(f"batch element {b} has no voxels")
        idx = _corner_grid_index(coords[sl, 1:], resolution).reshape(-1)
        sdf = feats[sl, SDF_CHANNELS] - 1.0 / resolution  # official sdf bias
        uidx, inv, counts = torch.unique(idx, return_inverse=True, return_counts=True)
        counts = counts.double()
        sdf_mean = _vertex_means(inv, counts, sdf.reshape(-1, 1))
        grid = torch.ones(g ** 3, dtype=torch.float32)  # untouched vertices: outside
        grid[uidx] = sdf_mean[:, 0]
        grid_np = grid.view(g, g, g).numpy()
        # the grid's range from the touched values and the untouched vertices' +1 (no pass over the whole grid)
        untouched = len(uidx) < g ** 3
        lo = min(float(sdf_mean.min()), 1.0) if untouched else float(sdf_mean.min())
        hi = max(float(sdf_mean.max()), 1.0) if untouched else float(sdf_mean.max())
        if not lo < 0 < hi:
            raise EmptyMeshError(f"batch element {b}: SDF has no zero crossing (range [{lo:.4g}, {hi:.4g}])")
        # skimage's default winding ('descent') gives outward normals for negative-inside fields
        verts, faces, _, _ = marching_cubes(grid_np, level=0.0, gradient_direction="descent")
        verts, faces = _keep_active_cubes(verts, faces, coords[sl, 1:], resolution)
        if len(faces) == 0:
            raise EmptyMeshError(f"batch element {b}: no surface inside the decoded cubes")
        colors = None
        if with_color:
            rgb = feats[sl, COLOR_START:].reshape(-1, 8, COLOR_PER_CORNER)[..., :3].sigmoid()
            rgb_mean = _vertex_means(inv, counts, rgb.reshape(-1, 3))
            colors = _interpolate_touched(uidx, rgb_mean, torch.from_numpy(np.ascontiguousarray(verts)).double(), g).numpy()
        vertices = (verts / resolution - 0.5).astype(np.float32)
        results.append((vertices, faces.astype(np.int64), colors))
    return results
