"""Ground-truth geometry on the GPU: signed distances to a triangle mesh, occupancy, corner SDFs.

Everything is brute force over (query point, triangle) pairs in chunks, in float32, so it runs
wherever torch runs (the GPU machine has no trimesh / point-cloud-utils). Sign = generalised
winding number (> 0.5 inside), robust to open or non-manifold meshes.

Frames: the *object frame* is the view-aligned normalised cube: the posed mesh (camera frame)
re-centred at its bounding-box centre and divided by its longest side, with no rotation, so the
GT layout is ``R = I``, ``t = centre``, ``s = longest side`` (``x_cam = s * x + t``).
Voxel ``(x, y, z)`` of the ``R``-grid covers ``[x/R - 0.5, (x+1)/R - 0.5]`` (same as the
pipeline's mesh extractor). A surface voxel's corner lattice has ``(sub+1)^3`` points at
``(sub * voxel + (i, j, k)) / (R * sub) - 0.5`` for ``i, j, k`` in ``0..sub`` (i slowest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..stages.ss import surface_voxels

#: query points x triangles per chunk (bounds the temporaries to a few hundred MB on the GPU)
PAIR_CHUNK = 1 << 23


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _seg_dist2(p: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Squared distance of points p (M,1,3) to segments u->v (1,F,3)."""
    e = v - u
    t = (_dot(p - u, e) / _dot(e, e).clamp_min(1e-20)).clamp(0, 1)
    d = p - (u + t[..., None] * e)
    return _dot(d, d)


def _chunk_pairs(points: Tensor, tri: Tensor, fn) -> Tensor:
    m = max(1, PAIR_CHUNK // max(1, tri.shape[0]))
    return torch.cat([fn(points[i:i + m]) for i in range(0, points.shape[0], m)]) if len(points) else \
        points.new_zeros(0)


def unsigned_distance(points: Tensor, tri: Tensor) -> Tensor:
    """(M,) distance of points (M,3) to the nearest of triangles (F,3,3)."""
    a, b, c = (tri[None, :, i] for i in range(3))
    n = torch.cross(b - a, c - a, dim=-1)
    area2 = _dot(n, n)
    nn_ = n / area2.clamp_min(1e-30).sqrt()[..., None]
    ok = area2 > 1e-24

    def fn(p: Tensor) -> Tensor:
        p = p[:, None]
        inside = (_dot(torch.cross(b - a, p - a, dim=-1), n) >= 0) & \
                 (_dot(torch.cross(c - b, p - b, dim=-1), n) >= 0) & \
                 (_dot(torch.cross(a - c, p - c, dim=-1), n) >= 0) & ok
        dp = _dot(p - a, nn_) ** 2
        de = torch.minimum(torch.minimum(_seg_dist2(p, a, b), _seg_dist2(p, b, c)), _seg_dist2(p, c, a))
        return torch.where(inside, dp, de).amin(1)

    return _chunk_pairs(points, tri, fn).clamp_min(0).sqrt()


def winding_number(points: Tensor, tri: Tensor) -> Tensor:
    """(M,) generalised winding number (Van Oosterom-Strackee solid angles / 4 pi)."""
    def fn(p: Tensor) -> Tensor:
        a, b, c = (tri[None, :, i] - p[:, None] for i in range(3))
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = _dot(a, torch.cross(b, c, dim=-1))
        den = la * lb * lc + _dot(a, b) * lc + _dot(b, c) * la + _dot(c, a) * lb
        return torch.atan2(det, den).sum(1) / (2 * math.pi)

    return _chunk_pairs(points, tri, fn)


def signed_distance(points: Tensor, tri: Tensor) -> Tensor:
    """(M,) signed distance, negative inside (winding number > 0.5)."""
    d = unsigned_distance(points, tri)
    inside = winding_number(points, tri).abs() > 0.5
    return torch.where(inside, -d, d)


def grid_centers(res: int, device=None) -> Tensor:
    g = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / res - 0.5
    return torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)


def lattice_offsets(sub: int, device=None) -> Tensor:
    """((sub+1)^3, 3) integer offsets (i slowest) of a voxel's corner lattice."""
    r = torch.arange(sub + 1, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


@dataclass
class ViewGeometry:
    """GT geometry of one view in the view-aligned object frame."""

    occupancy: Tensor      # (R, R, R) bool
    coords: Tensor         # (N, 3) int32 surface voxels of ``occupancy``
    corner_sdf: Tensor     # (N, (sub+1)^3) float32 signed distance at the corner lattice (object units)
    center: Tensor         # (3,) camera-frame bbox centre (= layout translation)
    size: Tensor           # () longest side (= layout scale)


def view_aligned_triangles(vertices: Tensor, faces: Tensor, rotation: Tensor, translation: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pose the canonical mesh (``x_cam = (s x) @ R + t``) and normalise it without rotation.

    Returns (triangles (F,3,3) in the object frame, centre (3,), longest side ())."""
    cam = (vertices.float() * scale) @ rotation.float() + translation.float()
    lo, hi = cam.amin(0), cam.amax(0)
    center = (lo + hi) / 2
    size = (hi - lo).max()
    local = (cam - center) / size
    return local[faces.long()], center, size


def view_geometry(vertices: Tensor, faces: Tensor, rotation: Tensor, translation: Tensor, scale: float,
                  res: int = 32, sub: int = 4) -> ViewGeometry:
    """Occupancy (voxels whose centre is inside or within half a voxel diagonal of the surface),
    its surface voxels and their corner-lattice SDF for one posed mesh."""
    tri, center, size = view_aligned_triangles(vertices, faces, rotation, translation, scale)
    dev = tri.device
    sdf_c = signed_distance(grid_centers(res, dev), tri).view(res, res, res)
    occ = sdf_c < (math.sqrt(3) / 2) / res
    coords = torch.nonzero(surface_voxels(occ)).to(torch.int32)
    lat = coords[:, None, :].long() * sub + lattice_offsets(sub, dev)[None]  # (N, L, 3)
    g = res * sub + 1
    keys = (lat[..., 0] * g + lat[..., 1]) * g + lat[..., 2]
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
    pts = torch.stack([uniq // (g * g), (uniq // g) % g, uniq % g], -1).float() / (res * sub) - 0.5
    sdf_l = signed_distance(pts, tri)[inv].view(coords.shape[0], -1)
    return ViewGeometry(occ, coords, sdf_l, center, size)
