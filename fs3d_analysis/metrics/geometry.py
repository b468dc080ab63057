"""Mesh validation, normalisation, alignment, surface sampling and voxel occupancy.

Normalisation convention (used by the corpus, the renderer and every shape metric):

* A mesh is *normalised* when the centre of its axis-aligned bounding box is the origin and the
  longest side of that box is 1, so it fits in the cube [-0.5, 0.5]^3.  This is SAM 3D's
  object-local frame (mesh/Gaussian coordinates in about [-0.5, 0.5]^3), so an F-score threshold
  of 0.05 means 5 % of the object's largest extent.
* `normalize_mesh` returns the normalised copy and the `Normalization(center, scale)` that made it:
  ``x_norm = (x - center) / scale``.
* `align(pred, gt, mode)` puts a prediction and its ground truth in one frame: ``"independent"``
  normalises each by its own box (shape-only comparison, pose ignored), ``"gt"`` applies the
  ground truth's normalisation to both (shape and pose, e.g. meshes posed in the camera frame).

Occupancy convention: a grid of ``resolution^3`` voxels over ``[lo, hi]^3`` (default the unit cube
[-0.5, 0.5]^3); voxel ``[i, j, k]`` covers x in ``lo + [i, i+1) * pitch`` (i indexes x, j y, k z).
A voxel is occupied when its centre is inside the mesh (generalised winding number > 0.5, which is
robust to holes and inconsistent orientation) *or* the surface passes through it (so thin sheets
and open scans are not lost).  Surface voxels are found by sampling every triangle on a
barycentric lattice finer than half a voxel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import point_cloud_utils as pcu
import trimesh
from scipy import ndimage

MeshOrPoints = Union[trimesh.Trimesh, np.ndarray]

__all__ = [
    "Normalization",
    "bbox_normalization",
    "validate_mesh",
    "as_mesh",
    "normalize_mesh",
    "align",
    "sample_surface",
    "occupancy_grid",
    "surface_voxels",
    "voxel_centers",
]


def validate_mesh(mesh: trimesh.Trimesh, name: str = "mesh") -> trimesh.Trimesh:
    """Check that `mesh` is a non-empty triangle mesh with finite vertices and a non-degenerate box.

    Raises TypeError / ValueError naming the problem; returns the mesh unchanged.
    """
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"{name}: expected trimesh.Trimesh, got {type(mesh).__name__}")
    v = np.asarray(mesh.vertices)
    f = np.asarray(mesh.faces)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"{name}: mesh is empty (no vertices)")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"{name}: mesh is empty (no triangle faces)")
    if not np.all(np.isfinite(v)):
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} vertices are not finite (NaN or inf)")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{name}: face indices out of range [0, {len(v)})")
    used = v[np.unique(f)]
    extent = np.ptp(used, axis=0)
    if extent.max() <= 0.0:
        raise ValueError(f"{name}: mesh is degenerate (all vertices coincide)")
    return mesh


def as_mesh(vertices: np.ndarray, faces: np.ndarray, name: str = "mesh") -> trimesh.Trimesh:
    """Build a validated Trimesh from arrays without trimesh's merging/processing."""
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    return validate_mesh(mesh, name)


@dataclass(frozen=True, eq=False)
class Normalization:
    """``x_norm = (x - center) / scale``; `scale` is the longest side of the axis-aligned box."""

    center: np.ndarray  # (3,)
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.center) / self.scale

    def invert(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) * self.scale + self.center


def _points_of(x: MeshOrPoints, name: str) -> np.ndarray:
    if isinstance(x, trimesh.Trimesh):
        validate_mesh(x, name)
        return np.asarray(x.vertices, dtype=np.float64)[np.unique(x.faces)]
    return _check_points(x, name)


def _check_points(points: np.ndarray, name: str = "points") -> np.ndarray:
    if isinstance(points, trimesh.Trimesh):
        raise TypeError(f"{name}: expected an (N, 3) point array, got a mesh; use sample_surface(mesh, n)")
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name}: expected an (N, 3) array, got shape {p.shape}")
    if len(p) == 0:
        raise ValueError(f"{name}: point set is empty")
    if not np.issubdtype(p.dtype, np.number):
        raise TypeError(f"{name}: expected a numeric array, got dtype {p.dtype}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: {int((~np.isfinite(p)).any(axis=1).sum())} points are not finite")
    return p.astype(np.float64, copy=False)


def bbox_normalization(x: MeshOrPoints, name: str = "mesh") -> Normalization:
    """Normalisation that maps the axis-aligned box of `x` to a centred box of longest side 1."""
    p = _points_of(x, name)
    lo, hi = p.min(axis=0), p.max(axis=0)
    scale = float((hi - lo).max())
    if scale <= 0.0:
        raise ValueError(f"{name}: zero extent, cannot normalise")
    return Normalization(center=(lo + hi) / 2.0, scale=scale)


def _transform(x: MeshOrPoints, norm: Normalization) -> MeshOrPoints:
    if isinstance(x, trimesh.Trimesh):
        return trimesh.Trimesh(norm.apply(x.vertices), np.asarray(x.faces), process=False)
    return norm.apply(x)


def normalize_mesh(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, Normalization]:
    """Return the normalised copy of `mesh` (box centred at 0, longest side 1) and the map used."""
    norm = bbox_normalization(mesh)
    return _transform(mesh, norm), norm


def align(
    pred: MeshOrPoints, gt: MeshOrPoints, mode: Literal["independent", "gt"] = "independent"
) -> tuple[MeshOrPoints, MeshOrPoints]:
    """Bring a prediction and its ground truth into one normalised frame (see module docstring).

    ``"independent"``: each is normalised by its own bounding box (shape only; assumes both are in
    the same canonical orientation).  ``"gt"``: both are mapped by the ground truth's normalisation,
    so pose, scale and shape errors all count.  Meshes stay meshes, (N, 3) arrays stay arrays.
    """
    if mode == "independent":
        return _transform(pred, bbox_normalization(pred, "pred")), _transform(gt, bbox_normalization(gt, "gt"))
    if mode == "gt":
        _points_of(pred, "pred")
        norm = bbox_normalization(gt, "gt")
        return _transform(pred, norm), _transform(gt, norm)
    raise ValueError(f"align: mode must be 'independent' or 'gt', got {mode!r}")


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
    """`n` points uniformly (area-weighted) on the surface, deterministic for a given `seed`.

    Returns (n, 3) float64.
    """
    validate_mesh(mesh)
    if n < 1:
        raise ValueError(f"sample_surface: n must be >= 1, got {n}")
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = area.sum()
    if not total > 0.0:
        raise ValueError("sample_surface: mesh has zero surface area")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(f), size=n, p=area / total)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    bc = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=1)
    return np.einsum("nk,nkd->nd", bc, tri[face])


def voxel_centers(resolution: int, lo: float = -0.5, hi: float = 0.5) -> np.ndarray:
    """(R, R, R, 3) centres of the occupancy grid described in the module docstring."""
    pitch = (hi - lo) / resolution
    g = lo + (np.arange(resolution) + 0.5) * pitch
    return np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1)


def _lattice_points(tri: np.ndarray, max_spacing: float) -> np.ndarray:
    """Points on a barycentric lattice of each triangle (vertices and edges included)."""
    edges = np.stack(
        [np.linalg.norm(tri[:, 1] - tri[:, 0], axis=1),
         np.linalg.norm(tri[:, 2] - tri[:, 1], axis=1),
         np.linalg.norm(tri[:, 0] - tri[:, 2], axis=1)], axis=1
    ).max(axis=1)
    steps = np.maximum(1, np.ceil(edges / max_spacing).astype(np.int64))
    out = []
    for n in np.unique(steps):
        idx = np.nonzero(steps == n)[0]
        a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = a + b <= n
        bc = np.stack([a[keep], b[keep], n - a[keep] - b[keep]], axis=1) / n  # (L, 3)
        # chunk to bound memory for huge triangles x many faces
        chunk = max(1, 2_000_000 // len(bc))
        for s in range(0, len(idx), chunk):
            t = tri[idx[s:s + chunk]]
            out.append(np.einsum("lk,tkd->tld", bc, t).reshape(-1, 3))
    return np.concatenate(out, axis=0)


def surface_voxels(mesh: trimesh.Trimesh, resolution: int = 64, lo: float = -0.5, hi: float = 0.5) -> np.ndarray:
    """Bool (R, R, R) grid of voxels the surface passes through (parts outside the grid ignored)."""
    validate_mesh(mesh)
    pitch = (hi - lo) / resolution
    tri = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)]
    pts = _lattice_points(tri, pitch / 2.0)
    ijk = np.floor((pts - lo) / pitch).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < resolution), axis=1)
    grid = np.zeros((resolution,) * 3, dtype=bool)
    ijk = ijk[ok]
    grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    return grid


def occupancy_grid(
    mesh: trimesh.Trimesh, resolution: int = 64, lo: float = -0.5, hi: float = 0.5, check_bounds: bool = True
) -> np.ndarray:
    """Solid occupancy (bool (R, R, R)) of `mesh` on the grid over [lo, hi]^3 (see module docstring).

    With `check_bounds` a mesh that sticks out of the grid raises ValueError rather than being cut
    off silently; normalise it first (`normalize_mesh`).
    """
    validate_mesh(mesh)
    if resolution < 2:
        raise ValueError(f"occupancy_grid: resolution must be >= 2, got {resolution}")
    if not hi > lo:
        raise ValueError(f"occupancy_grid: need hi > lo, got lo={lo}, hi={hi}")
    v = np.asarray(mesh.vertices, dtype=np.float64)
    if check_bounds:
        tol = 1e-6 * (hi - lo)
        used = v[np.unique(mesh.faces)]
        if used.min() < lo - tol or used.max() > hi + tol:
            raise ValueError(
                f"occupancy_grid: mesh spans [{used.min():.4f}, {used.max():.4f}], outside the grid [{lo}, {hi}]; "
                "normalise it first (normalize_mesh / align)"
            )
    surface = surface_voxels(mesh, resolution, lo, hi)
    centers = voxel_centers(resolution, lo, hi)
    f = np.ascontiguousarray(mesh.faces, dtype=np.int32)
    vc = np.ascontiguousarray(v)

    def inside_at(idx: np.ndarray) -> np.ndarray:
        wn = np.asarray(pcu.triangle_soup_fast_winding_number(vc, f, centers[tuple(idx.T)]))
        return np.abs(wn) > 0.5

    # Inside/outside is constant on each connected region of non-surface voxels unless the surface
    # has holes wider than a voxel.  Test a few voxels per region; evaluate every voxel of a region
    # only where they disagree (open scans), which keeps the exact winding-number answer.
    labels, n = ndimage.label(~surface)
    occ = surface.copy()
    rng = np.random.default_rng(0)
    order = np.argsort(labels, axis=None, kind="stable")
    bounds = np.searchsorted(labels.ravel()[order], np.arange(1, n + 2))
    for r in range(n):
        flat = order[bounds[r]:bounds[r + 1]]
        idx = np.stack(np.unravel_index(flat, labels.shape), axis=1)
        probe = idx if len(idx) <= 64 else idx[rng.choice(len(idx), 64, replace=False)]
        votes = inside_at(probe)
        if votes.all():
            occ[tuple(idx.T)] = True
        elif votes.any():
            occ[tuple(idx.T)] = inside_at(idx)
    return occ
