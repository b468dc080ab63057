"""Reconstruction metrics (shape: CD, F-score, vIoU; layout: 3D box IoU, rotation/translation error).

Normalisation conventions are documented in `geometry` (shape frame), `shape` and `pose`.
"""
from fs3d_analysis.metrics.geometry import (
    Normalization,
    align,
    as_mesh,
    bbox_normalization,
    normalize_mesh,
    occupancy_grid,
    sample_surface,
    surface_voxels,
    validate_mesh,
)
from fs3d_analysis.metrics.pose import box_iou_3d, layout_metrics, rotation_error_deg, translation_error
from fs3d_analysis.metrics.shape import ShapeMetrics, chamfer_distance, f_score, shape_metrics, volume_iou

__all__ = [
    "Normalization", "align", "as_mesh", "bbox_normalization", "normalize_mesh", "occupancy_grid",
    "sample_surface", "surface_voxels", "validate_mesh",
    "box_iou_3d", "layout_metrics", "rotation_error_deg", "translation_error",
    "ShapeMetrics", "chamfer_distance", "f_score", "shape_metrics", "volume_iou",
]
