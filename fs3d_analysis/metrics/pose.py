"""Layout metrics: 3D IoU of oriented boxes, rotation and translation errors.

Conventions (SAM 3D layout, see `fs3d_analysis.data.layout`):

* A layout's box is the object-local box mapped to the camera frame, by default the unit cube
  [-0.5, 0.5]^3 (`Layout.box_corners`); pass tighter local bounds (e.g. the normalised GT mesh's
  box) to `Layout.box_corners` and give the corners here.  The IoU is exact: the intersection of
  the two convex boxes is computed from their half-spaces (scipy `HalfspaceIntersection`).
* Rotation error: geodesic angle ``arccos((trace(Ra^T Rb) - 1) / 2)`` in degrees, in [0, 180].
  Object symmetries are not taken into account.
* Translation error: Euclidean distance in camera units (metres in our renders); with
  ``relative=True`` divided by the ground truth's distance to the camera ``|t_gt|``.
"""
from __future__ import annotations

from typing import Union

import numpy as np
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection, QhullError

from fs3d_analysis.data.layout import Layout, quaternion_to_matrix

__all__ = ["box_iou_3d", "rotation_error_deg", "translation_error", "layout_metrics"]

BoxLike = Union[Layout, np.ndarray]
RotLike = Union[Layout, np.ndarray]


def _corners(box: BoxLike, name: str) -> np.ndarray:
    if isinstance(box, Layout):
        return box.box_corners()
    c = np.asarray(box, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3 or len(c) < 4:
        raise ValueError(f"box_iou_3d: {name} must be a Layout or (8, 3) corners, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"box_iou_3d: {name} corners are not finite")
    return c


def _hull(c: np.ndarray, name: str) -> ConvexHull:
    try:
        hull = ConvexHull(c)
    except QhullError as e:
        raise ValueError(f"box_iou_3d: {name} box is degenerate (zero volume)") from e
    if hull.volume <= 0:
        raise ValueError(f"box_iou_3d: {name} box is degenerate (zero volume)")
    return hull


def box_iou_3d(a: BoxLike, b: BoxLike) -> float:
    """Exact IoU of two convex boxes given as `Layout` (unit cube mapped by it) or (8, 3) corners."""
    ha, hb = _hull(_corners(a, "a"), "a"), _hull(_corners(b, "b"), "b")
    eq = np.vstack([ha.equations, hb.equations])  # rows (n, d): n.x + d <= 0 inside
    normals, offsets = eq[:, :3], eq[:, 3]
    # Chebyshev centre: the deepest point inside both; radius 0 means they at most touch.
    norm = np.linalg.norm(normals, axis=1)
    res = linprog(
        c=[0, 0, 0, -1], A_ub=np.hstack([normals, norm[:, None]]), b_ub=-offsets,
        bounds=[(None, None)] * 3 + [(0, None)], method="highs",
    )
    size = min(ha.volume, hb.volume) ** (1.0 / 3.0)
    if res.status != 0 or res.x[3] <= 1e-9 * size:
        return 0.0
    inter = HalfspaceIntersection(eq, res.x[:3])
    vol = ConvexHull(inter.intersections).volume
    return float(vol / (ha.volume + hb.volume - vol))


def _rotation(r: RotLike, name: str) -> np.ndarray:
    if isinstance(r, Layout):
        return r.rotation
    a = np.asarray(r, dtype=np.float64)
    if a.shape == (4,):
        return quaternion_to_matrix(a)
    if a.shape != (3, 3):
        raise ValueError(f"rotation_error_deg: {name} must be a Layout, (3, 3) matrix or (4,) wxyz quaternion, got {a.shape}")
    if not np.all(np.isfinite(a)) or np.abs(a @ a.T - np.eye(3)).max() > 1e-4:
        raise ValueError(f"rotation_error_deg: {name} is not a rotation matrix")
    return a


def rotation_error_deg(pred: RotLike, gt: RotLike) -> float:
    """Geodesic angle between two rotations, degrees in [0, 180]."""
    ra, rb = _rotation(pred, "pred"), _rotation(gt, "gt")
    cos = (np.trace(ra.T @ rb) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))  # clip only absorbs rounding


def translation_error(pred: Union[Layout, np.ndarray], gt: Union[Layout, np.ndarray], relative: bool = False) -> float:
    """|t_pred - t_gt| (camera units); with `relative`, divided by |t_gt|."""
    ta = pred.translation if isinstance(pred, Layout) else np.asarray(pred, dtype=np.float64)
    tb = gt.translation if isinstance(gt, Layout) else np.asarray(gt, dtype=np.float64)
    if ta.shape != (3,) or tb.shape != (3,):
        raise ValueError(f"translation_error: expected (3,) vectors, got {ta.shape} and {tb.shape}")
    if not (np.all(np.isfinite(ta)) and np.all(np.isfinite(tb))):
        raise ValueError("translation_error: translations must be finite")
    err = float(np.linalg.norm(ta - tb))
    if relative:
        d = float(np.linalg.norm(tb))
        if d == 0.0:
            raise ValueError("translation_error: relative error undefined for t_gt = 0")
        err /= d
    return err


def layout_metrics(pred: Layout, gt: Layout) -> dict[str, float]:
    """Box IoU (unit-cube boxes), rotation error (deg), translation error (abs and relative), scale ratio."""
    return {
        "box_iou_3d": box_iou_3d(pred, gt),
        "rotation_error_deg": rotation_error_deg(pred, gt),
        "translation_error": translation_error(pred, gt),
        "translation_error_rel": translation_error(pred, gt, relative=True),
        "scale_ratio": float(np.mean(pred.scale) / np.mean(gt.scale)),
    }
