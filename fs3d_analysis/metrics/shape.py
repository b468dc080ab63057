"""Shape metrics: Chamfer distance, F-score, volumetric IoU.

All take inputs in one normalised frame (see `fs3d_analysis.metrics.geometry`: box centred at 0,
longest side 1), so distances are fractions of the object's largest extent.

* Chamfer distance: ``mean_x min_y |x - y| + mean_y min_x |x - y|`` (Euclidean, not squared, sum of
  both directions; the definition of `point_cloud_utils.chamfer_distance`).
* F-score at threshold tau (default 0.05): precision = share of predicted points within tau of the
  ground truth, recall = share of ground-truth points within tau of the prediction (distance
  ``< tau``), ``F = 100 * 2PR / (P + R)``, in percent (0-100) as the paper reports F1@0.05 = 92.34.
* Volumetric IoU: |A and B| / |A or B| of solid occupancies on a 64^3 grid over [-0.5, 0.5]^3
  (`occupancy_grid`); meshes that stick out of the grid raise instead of being cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from fs3d_analysis.metrics.geometry import _check_points, align, occupancy_grid, sample_surface

__all__ = ["chamfer_distance", "f_score", "volume_iou", "ShapeMetrics", "shape_metrics", "nearest_distances"]


def nearest_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d_ab, d_ba): for each point of `a` the distance to the nearest of `b`, and vice versa."""
    a = _check_points(a, "a")
    b = _check_points(b, "b")
    d_ab, _ = cKDTree(b).query(a, k=1)
    d_ba, _ = cKDTree(a).query(b, k=1)
    return d_ab, d_ba


def chamfer_distance(pred: np.ndarray, gt: np.ndarray) -> float:
    """Symmetric Chamfer distance of two (N, 3) point sets (see module docstring); 0 iff identical sets."""
    d_pg, d_gp = nearest_distances(pred, gt)
    return float(d_pg.mean() + d_gp.mean())


def f_score(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.05) -> float:
    """F-score in percent (0-100) at distance `threshold`; (N, 3) point sets in the normalised frame."""
    if not threshold > 0.0:
        raise ValueError(f"f_score: threshold must be > 0, got {threshold}")
    d_pg, d_gp = nearest_distances(pred, gt)
    precision = float((d_pg < threshold).mean())
    recall = float((d_gp < threshold).mean())
    if precision + recall == 0.0:
        return 0.0
    return 100.0 * 2.0 * precision * recall / (precision + recall)


OccOrMesh = Union[np.ndarray, trimesh.Trimesh]


def _occupancy(x: OccOrMesh, resolution: int, bounds: tuple[float, float], name: str) -> np.ndarray:
    if isinstance(x, trimesh.Trimesh):
        return occupancy_grid(x, resolution, bounds[0], bounds[1])
    g = np.asarray(x)
    if g.dtype != bool:
        raise TypeError(f"volume_iou: {name} must be a bool occupancy grid or a trimesh.Trimesh, got dtype {g.dtype}")
    if g.ndim != 3:
        raise ValueError(f"volume_iou: {name} occupancy must be 3-D, got shape {g.shape}")
    return g


def volume_iou(
    pred: OccOrMesh, gt: OccOrMesh, resolution: int = 64, bounds: tuple[float, float] = (-0.5, 0.5)
) -> float:
    """Volumetric IoU of two bool grids of equal shape, or of two meshes voxelised at `resolution`^3
    over the cube ``bounds`` (default the normalised unit cube)."""
    a = _occupancy(pred, resolution, bounds, "pred")
    b = _occupancy(gt, resolution, bounds, "gt")
    if a.shape != b.shape:
        raise ValueError(f"volume_iou: grid shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        raise ValueError("volume_iou: both occupancies are empty")
    return float(np.logical_and(a, b).sum() / union)


@dataclass(frozen=True)
class ShapeMetrics:
    chamfer: float
    f_score: float
    volume_iou: float

    def as_dict(self) -> dict[str, float]:
        return {"chamfer": self.chamfer, "f_score": self.f_score, "volume_iou": self.volume_iou}


def shape_metrics(
    pred: trimesh.Trimesh,
    gt: trimesh.Trimesh,
    n_points: int = 10_000,
    threshold: float = 0.05,
    resolution: int = 64,
    mode: Literal["independent", "gt"] = "independent",
    seed: int = 0,
) -> ShapeMetrics:
    """CD, F-score and vIoU of two meshes after `align(pred, gt, mode)`.

    Surface samples: `n_points` per mesh, seeded.  The vIoU grid is the unit cube [-0.5, 0.5]^3; with
    ``mode="gt"`` a prediction that leaves it (pose off) widens the grid to the smallest centred
    cube holding both meshes (same `resolution`, coarser voxels) instead of cutting the mesh.
    """
    p, g = align(pred, gt, mode)
    half = max(0.5, float(np.abs(p.vertices).max()), float(np.abs(g.vertices).max()))
    pp = sample_surface(p, n_points, seed=seed)
    gp = sample_surface(g, n_points, seed=seed)  # same seed: identical meshes give identical samples
    return ShapeMetrics(
        chamfer=chamfer_distance(pp, gp),
        f_score=f_score(pp, gp, threshold),
        volume_iou=volume_iou(p, g, resolution, (-half, half)),
    )
