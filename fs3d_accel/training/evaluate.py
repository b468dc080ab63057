"""Evaluate sam3d-mini on held-out renders against two trivial baselines (CPU host tool).

Uses ``fs3d_analysis.metrics`` (imported lazily; this is an evaluation tool, not inference code).

Frames. sam3d-mini is trained with *view-aligned* object frames (layout rotation = identity:
the object frame is the camera frame re-centred and scaled), so its object-frame mesh is not in
the canonical orientation of the YCB scans. Metrics are therefore taken on meshes in the camera
frame:

* ``posed``: prediction and GT posed mesh, both normalised by the GT's bounding box
  (``align(mode="gt")``): shape, scale and position errors all count.
* ``shape``: each posed mesh normalised by its own box (``mode="independent"``): shape only.
* layout: 3D IoU of the unit-cube boxes, translation error and scale ratio against the GT's
  *view-aligned* layout (identity rotation, bounding-box centre, longest side), the layout
  convention the model predicts. Rotation error is not reported (identity by construction).

Baselines: ``mean-shape`` = the training views' mean 32^3 occupancy (marching cubes at 0.5) placed
with the GT view-aligned layout; ``visual-hull`` = the mask extruded along the view rays from the
point map's front surface to a depth equal to the visible extent.
"""
from __future__ import annotations

import math
import time

import numpy as np


def view_aligned_gt(posed_vertices: np.ndarray) -> tuple[np.ndarray, float]:
    lo, hi = posed_vertices.min(0), posed_vertices.max(0)
    return (lo + hi) / 2, float((hi - lo).max())


def _marching(grid: np.ndarray, level: float, origin: np.ndarray, pitch: np.ndarray):
    import trimesh
    from skimage.measure import marching_cubes
    g = np.pad(grid.astype(np.float32), 1)
    v, f, _, _ = marching_cubes(g, level=level)
    v = (v - 1 + 0.5) * pitch + origin
    return trimesh.Trimesh(v, f[:, ::-1], process=False)


def mean_shape_mesh(mean_occupancy: np.ndarray, center: np.ndarray, size: float):
    r = mean_occupancy.shape[0]
    m = _marching(mean_occupancy, 0.5, np.full(3, -0.5), np.full(3, 1.0 / r))
    m.vertices = m.vertices * size + center
    return m


def visual_hull_mesh(mask: np.ndarray, pointmap: np.ndarray, intrinsics: np.ndarray, res: int = 48):
    """Mask extruded along the view rays from the visible surface to ``z_min + visible extent``."""
    pts = pointmap[mask]
    pts = pts[np.isfinite(pts).all(1)]
    lo, hi = pts.min(0), pts.max(0)
    depth_extent = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    z0, z1 = float(lo[2]), float(lo[2]) + depth_extent
    pad = 0.15 * (hi - lo)
    # the silhouette widens with depth under perspective: take the box at the far depth
    scale_far = z1 / max(float(lo[2]), 1e-6)
    xy_lo = np.minimum(lo[:2] - pad[:2], lo[:2] * scale_far - pad[:2])
    xy_hi = np.maximum(hi[:2] + pad[:2], hi[:2] * scale_far + pad[:2])
    origin = np.array([xy_lo[0], xy_lo[1], z0])
    ext = np.array([xy_hi[0] - xy_lo[0], xy_hi[1] - xy_lo[1], z1 - z0])
    pitch = ext / res
    ii = (np.arange(res) + 0.5)
    x, y, z = np.meshgrid(origin[0] + ii * pitch[0], origin[1] + ii * pitch[1], origin[2] + ii * pitch[2],
                          indexing="ij")
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    u = np.floor(-x / z * fx + cx).astype(np.int64)
    v = np.floor(-y / z * fy + cy).astype(np.int64)
    h, w = mask.shape
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    uc, vc = np.clip(u, 0, w - 1), np.clip(v, 0, h - 1)
    front = np.where(mask, pointmap[..., 2], np.inf)
    front = np.where(np.isfinite(front), front, np.inf)
    inside = ok & mask[vc, uc] & (z >= front[vc, uc] - pitch[2])
    if not inside.any():
        raise ValueError("visual hull is empty")
    return _marching(inside.astype(np.float32), 0.5, origin, pitch)


def _metrics(pred, gt_posed, pred_center, pred_size, gt_center, gt_size, n_points: int = 10_000) -> dict:
    from fs3d_analysis.data.layout import Layout as ALayout
    from fs3d_analysis.metrics import box_iou_3d, shape_metrics
    posed = shape_metrics(pred, gt_posed, mode="gt", n_points=n_points)
    shape = shape_metrics(pred, gt_posed, mode="independent", n_points=n_points)
    lp = ALayout(np.eye(3), pred_center, np.full(3, pred_size))
    lg = ALayout(np.eye(3), gt_center, np.full(3, gt_size))
    return {"cd_posed": posed.chamfer, "f1_posed": posed.f_score, "viou_posed": posed.volume_iou,
            "cd_shape": shape.chamfer, "f1_shape": shape.f_score, "viou_shape": shape.volume_iou,
            "box_iou_3d": box_iou_3d(lp, lg), "trans_err": float(np.linalg.norm(pred_center - gt_center)),
            "trans_err_rel": float(np.linalg.norm(pred_center - gt_center) / np.linalg.norm(gt_center)),
            "scale_ratio": pred_size / gt_size}


def evaluate(pipe, samples, mean_occupancy: np.ndarray, seed: int = 0,
             methods=("sam3d-mini", "mean-shape", "visual-hull"), ss_sampler=None, slat_sampler=None,
             n_points: int = 10_000) -> list[dict]:
    """One row per (sample, method) with the metrics above (NaN + ``error`` when a method fails).

    ``ss_sampler`` / ``slat_sampler``: optional :class:`SamplerConfig` overrides of the pipeline's."""
    import trimesh
    rows = []
    for s in samples:
        gt_posed = s.posed_mesh()
        gc, gs = view_aligned_gt(np.asarray(gt_posed.vertices))
        for m in methods:
            t0 = time.perf_counter()
            row = {"sample": s.name, "method": m}
            try:
                if m == "sam3d-mini":
                    inp = pipe.prepare(s.image, s.mask, s.pointmap)
                    ss = pipe.run_ss(inp, seed=seed, sampler=ss_sampler)
                    slat = pipe.run_slat(inp, ss, seed=seed, sampler=slat_sampler)
                    res = pipe.run_decode(inp, ss, slat)
                    res.layout, res.ss = ss.layout, ss
                    pm = res.posed_mesh
                    pred = trimesh.Trimesh(pm.vertices.astype(np.float64), pm.faces, process=False)
                    pc, ps = np.asarray(res.layout.translation), float(np.mean(res.layout.scale))
                    row["voxels"] = int(res.ss.coords.shape[0])
                elif m == "mean-shape":
                    pred = mean_shape_mesh(mean_occupancy, gc, gs)
                    pc, ps = gc, gs
                else:
                    pred = visual_hull_mesh(s.mask, s.pointmap, s.intrinsics)
                    pc, ps = view_aligned_gt(np.asarray(pred.vertices))
                row.update(_metrics(pred, gt_posed, np.asarray(pc, dtype=np.float64), ps, gc, gs, n_points))
            except Exception as e:  # noqa: BLE001 - a failed reconstruction is a result, recorded as such
                row.update({"error": f"{type(e).__name__}: {e}", "f1_posed": 0.0, "f1_shape": 0.0,
                            "viou_posed": 0.0, "viou_shape": 0.0, "box_iou_3d": 0.0})
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    return rows

