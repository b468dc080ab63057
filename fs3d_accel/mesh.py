"""Triangle mesh result type with export through trimesh."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .pose import Layout

EXPORT_FORMATS = (".glb", ".ply", ".obj")


@dataclass
class Mesh:
    """Vertices (V,3) float32, faces (F,3) int64, optional vertex colours (V,3) uint8."""

    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.vertices = np.asarray(self.vertices, dtype=np.float32)
        self.faces = np.asarray(self.faces, dtype=np.int64)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"vertices must be (V,3), got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be (F,3), got {self.faces.shape}")
        if len(self.faces) and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ValueError("faces index vertices out of range")
        if self.vertex_colors is not None:
            self.vertex_colors = np.asarray(self.vertex_colors, dtype=np.uint8)

    @property
    def is_empty(self) -> bool:
        return len(self.faces) == 0

    def to_trimesh(self):
        import trimesh
        return trimesh.Trimesh(vertices=self.vertices, faces=self.faces, vertex_colors=self.vertex_colors,
                               process=False)

    def transformed(self, layout: Layout) -> "Mesh":
        """This mesh (object frame) placed in the camera frame by ``layout``."""
        return Mesh(layout.apply(self.vertices).astype(np.float32), self.faces.copy(), self.vertex_colors)

    def export(self, path: str | Path) -> Path:
        """Write .glb, .ply or .obj (chosen by suffix)."""
        path = Path(path)
        if path.suffix.lower() not in EXPORT_FORMATS:
            raise ValueError(f"unsupported mesh format {path.suffix!r}; use one of {EXPORT_FORMATS}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_trimesh().export(path)
        return path
