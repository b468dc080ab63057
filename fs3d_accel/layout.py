"""Object layout (pose) in SAM 3D's convention.

SAM 3D places an object-local point ``x`` (normalised cube, about [-0.5, 0.5]^3) in the camera with
PyTorch3D's row-vector `Transform3d` order: scale, then rotate, then translate::

    x_cam = (scale * x) @ R + t          # x: (N, 3) rows

where ``R = quaternion_to_matrix(q)`` for the wxyz quaternion ``q`` the pipeline outputs (the
standard Hamilton rotation matrix; note the row-vector product, i.e. ``R.T @ x`` in column form).
The camera frame is PyTorch3D's: x left, y up, z forward (OpenCV x and y negated).  Units are
those of the point map (metres in our renders).  The pipeline produces values of this same type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Layout", "quaternion_to_matrix", "matrix_to_quaternion"]


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix of a unit wxyz quaternion (same formula as pytorch3d)."""
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (4,):
        raise ValueError(f"quaternion must have shape (4,) (w, x, y, z), got {q.shape}")
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"quaternion must be finite and non-zero, got {q}")
    w, x, y, z = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """wxyz unit quaternion with w >= 0 such that ``quaternion_to_matrix(q) == r``."""
    from scipy.spatial.transform import Rotation

    xyzw = Rotation.from_matrix(np.asarray(r, dtype=np.float64)).as_quat()
    q = np.array([xyzw[3], xyzw[0], xyzw[1], xyzw[2]])
    return -q if q[0] < 0 else q


def _vec3(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.shape == ():
        a = np.full(3, float(a))
    if a.shape != (3,):
        raise ValueError(f"Layout.{name} must have shape (3,), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"Layout.{name} must be finite, got {a}")
    return a


@dataclass(frozen=True, eq=False)  # array fields: no element-wise ==
class Layout:
    """Pose of one object: ``x_cam = (scale * x) @ rotation + translation`` (see module docstring).

    rotation: (3, 3) proper rotation; translation: (3,) camera frame; scale: (3,) positive
    (isotropic in SAM 3D outputs, kept as (3,) to match them).
    """

    rotation: np.ndarray
    translation: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        r = np.asarray(self.rotation, dtype=np.float64)
        if r.shape != (3, 3):
            raise ValueError(f"Layout.rotation must have shape (3, 3), got {r.shape}")
        if not np.all(np.isfinite(r)):
            raise ValueError("Layout.rotation must be finite")
        if np.abs(r @ r.T - np.eye(3)).max() > 1e-3 or np.linalg.det(r) < 0:
            raise ValueError(f"Layout.rotation is not a proper rotation (R R^T != I or det < 0): {r.tolist()}")
        t = _vec3(self.translation, "translation")
        s = _vec3(self.scale, "scale")
        if np.any(s <= 0):
            raise ValueError(f"Layout.scale must be positive, got {s}")
        object.__setattr__(self, "rotation", r)
        object.__setattr__(self, "translation", t)
        object.__setattr__(self, "scale", s)

    @classmethod
    def from_quaternion(cls, quaternion: np.ndarray, translation: Any, scale: Any) -> "Layout":
        """From SAM 3D's outputs: wxyz `quaternion` (4,), `translation` (3,), `scale` (3,) or scalar."""
        return cls(quaternion_to_matrix(quaternion), translation, scale)

    def to_quaternion(self) -> np.ndarray:
        """wxyz quaternion (w >= 0) of `rotation`, as SAM 3D reports it."""
        return matrix_to_quaternion(self.rotation)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Object-local (N, 3) points to the camera frame."""
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"Layout.apply: expected (N, 3) points, got shape {p.shape}")
        return (p * self.scale) @ self.rotation + self.translation

    def inverse_apply(self, points: np.ndarray) -> np.ndarray:
        """Camera-frame (N, 3) points to the object-local frame."""
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"Layout.inverse_apply: expected (N, 3) points, got shape {p.shape}")
        return ((p - self.translation) @ self.rotation.T) / self.scale

    def box_corners(self, lo: Any = -0.5, hi: Any = 0.5) -> np.ndarray:
        """(8, 3) camera-frame corners of the local box [lo, hi] (default the unit cube)."""
        lo3, hi3 = _vec3(lo, "box lo"), _vec3(hi, "box hi")
        if np.any(hi3 <= lo3):
            raise ValueError(f"box_corners: need hi > lo per axis, got lo={lo3}, hi={hi3}")
        idx = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        corners = np.where(idx == 0, lo3, hi3)
        return self.apply(corners)

    def as_dict(self) -> dict[str, list]:
        return {"rotation": self.rotation.tolist(), "translation": self.translation.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(np.asarray(d["rotation"]), np.asarray(d["translation"]), np.asarray(d["scale"]))
