"""Offscreen CPU renderer: RGB, instance mask, depth and camera-frame point map, with GT layouts.

Rendering is exact ray casting (one ray per pixel centre) against the posed meshes with
point-cloud-utils' embree-based `ray_mesh_intersection`: headless, no GPU, no OpenGL context.
Shading is flat Lambert (two-sided) with one directional light plus ambient, on a random
gradient-and-noise background.

Conventions
* Image pixel (row v, column u) has its centre at (u + 0.5, v + 0.5); intrinsics `K` are OpenCV
  pixel intrinsics (fx, fy, cx, cy).
* Camera frame = PyTorch3D / SAM 3D: x left, y up, z forward.  The point at depth z seen through
  pixel (u, v) is ``(-(u + 0.5 - cx) z / fx, -(v + 0.5 - cy) z / fy, z)``.
* ``depth`` is z (not ray length), +inf where no object is hit; ``pointmap`` is NaN there.
* Objects are normalised meshes posed by a `Layout`: ``x_cam = (s * x) @ R + t``.  Units: metres.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import point_cloud_utils as pcu
import trimesh
from scipy.spatial.transform import Rotation

from fs3d_analysis.data.layout import Layout
from fs3d_analysis.metrics.geometry import validate_mesh

__all__ = ["Camera", "SceneObject", "Lighting", "Rendering", "render", "depth_to_pointmap", "random_layout",
           "random_lighting", "random_scene"]


@dataclass(frozen=True)
class Camera:
    """Pinhole camera with OpenCV pixel intrinsics; looks along +z of the PyTorch3D camera frame."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"Camera: image size must be positive, got {self.width}x{self.height}")
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError(f"Camera: focal lengths must be positive, got fx={self.fx}, fy={self.fy}")

    @classmethod
    def from_fov(cls, width: int, height: Optional[int] = None, fov_deg: float = 50.0) -> "Camera":
        """Square pixels, principal point at the image centre, horizontal field of view `fov_deg`."""
        height = width if height is None else height
        if not 1.0 < fov_deg < 179.0:
            raise ValueError(f"Camera.from_fov: fov_deg must be in (1, 179), got {fov_deg}")
        f = 0.5 * width / np.tan(np.radians(fov_deg) / 2.0)
        return cls(width, height, f, f, width / 2.0, height / 2.0)

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def rays(self) -> np.ndarray:
        """(H, W, 3) ray directions in the camera frame with z = 1 (so point = depth * ray)."""
        u = (np.arange(self.width) + 0.5 - self.cx) / self.fx
        v = (np.arange(self.height) + 0.5 - self.cy) / self.fy
        uu, vv = np.meshgrid(u, v)
        return np.stack([-uu, -vv, np.ones_like(uu)], axis=-1)

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) pixel coordinates (u, v) of camera-frame points (continuous, pixel centres at +0.5)."""
        p = np.asarray(points, dtype=np.float64)
        return np.stack([-p[:, 0] / p[:, 2] * self.fx + self.cx, -p[:, 1] / p[:, 2] * self.fy + self.cy], axis=1)


def depth_to_pointmap(depth: np.ndarray, camera: Camera) -> np.ndarray:
    """(H, W, 3) float32 camera-frame point map from z-depth (H, W); NaN where depth is not finite."""
    depth = np.asarray(depth)
    if depth.shape != (camera.height, camera.width):
        raise ValueError(f"depth shape {depth.shape} != camera size {(camera.height, camera.width)}")
    pm = (camera.rays() * depth[..., None].astype(np.float64)).astype(np.float32)
    pm[~np.isfinite(depth)] = np.nan
    return pm


@dataclass(frozen=True, eq=False)
class SceneObject:
    """A normalised mesh, its pose and its albedo (RGB in [0, 1])."""

    name: str
    mesh: trimesh.Trimesh
    layout: Layout
    color: np.ndarray = field(default_factory=lambda: np.array([0.7, 0.7, 0.7]))

    def posed_vertices(self) -> np.ndarray:
        return self.layout.apply(self.mesh.vertices)


@dataclass(frozen=True, eq=False)
class Lighting:
    direction: np.ndarray  # (3,) unit, camera frame, pointing from the light towards the scene
    ambient: float = 0.3
    diffuse: float = 0.7
    background: tuple[np.ndarray, np.ndarray] = (np.full(3, 0.5), np.full(3, 0.5))  # top, bottom RGB
    noise: float = 0.0  # std of background noise (RGB units in [0, 1])


@dataclass(frozen=True, eq=False)
class Rendering:
    """rgb (H,W,3) uint8; depth (H,W) float32 (+inf background); pointmap (H,W,3) float32 (NaN
    background); instance (H,W) int16 (-1 background, else index into `objects`)."""

    rgb: np.ndarray
    depth: np.ndarray
    pointmap: np.ndarray
    instance: np.ndarray
    camera: Camera
    objects: tuple[SceneObject, ...]

    def mask(self, index: int) -> np.ndarray:
        """Visible-pixel mask (H, W) bool of object `index`."""
        if not 0 <= index < len(self.objects):
            raise IndexError(f"object index {index} out of range [0, {len(self.objects)})")
        return self.instance == index


def render(
    objects: Sequence[SceneObject], camera: Camera, lighting: Optional[Lighting] = None, seed: int = 0
) -> Rendering:
    """Ray-cast `objects` (posed by their layouts) with `camera`; see module docstring."""
    if len(objects) == 0:
        raise ValueError("render: no objects given")
    if len(objects) > 32000:
        raise ValueError("render: too many objects for int16 instance ids")
    lighting = lighting or Lighting(direction=np.array([0.0, 0.0, 1.0]))
    verts, faces, owner, offset = [], [], [], 0
    for i, obj in enumerate(objects):
        validate_mesh(obj.mesh, obj.name)
        v = obj.posed_vertices()
        verts.append(v)
        faces.append(np.asarray(obj.mesh.faces, dtype=np.int64) + offset)
        owner.append(np.full(len(obj.mesh.faces), i, dtype=np.int16))
        offset += len(v)
    v = np.concatenate(verts)
    f = np.concatenate(faces)
    owner_f = np.concatenate(owner)
    if v[:, 2].min() <= 0:
        raise ValueError("render: an object reaches behind the camera (z <= 0); move it further away")

    rays = camera.rays().reshape(-1, 3)
    fid, _, t = pcu.ray_mesh_intersection(
        np.ascontiguousarray(v, dtype=np.float32), np.ascontiguousarray(f, dtype=np.int32),
        np.zeros((len(rays), 3), dtype=np.float32), np.ascontiguousarray(rays, dtype=np.float32),
    )
    fid = np.asarray(fid).astype(np.int64)
    hit = fid >= 0
    hw = (camera.height, camera.width)
    depth = np.full(len(rays), np.inf, dtype=np.float32)
    depth[hit] = np.asarray(t)[hit]  # z-component of the z=1 rays, i.e. the ray parameter itself
    depth = depth.reshape(hw)
    instance = np.full(len(rays), -1, dtype=np.int16)
    instance[hit] = owner_f[fid[hit]]

    # flat two-sided Lambert shading
    tri = v[f[fid[hit]]]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    light = -np.asarray(lighting.direction, dtype=np.float64)
    light /= np.linalg.norm(light)
    shade = lighting.ambient + lighting.diffuse * np.abs(n @ light)
    albedo = np.stack([np.asarray(o.color, dtype=np.float64) for o in objects])[instance[hit]]

    top, bottom = (np.asarray(c, dtype=np.float64) for c in lighting.background)
    a = np.linspace(0.0, 1.0, camera.height)[:, None, None]
    bg = np.broadcast_to(top * (1 - a) + bottom * a, (*hw, 3)).copy()
    if lighting.noise > 0:
        bg += np.random.default_rng(seed).normal(0.0, lighting.noise, size=bg.shape)
    img = bg.reshape(-1, 3)
    img[hit] = albedo * shade[:, None]
    rgb = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8).reshape(*hw, 3)
    return Rendering(rgb, depth, depth_to_pointmap(depth, camera), instance.reshape(hw), camera, tuple(objects))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrix (3, 3)."""
    return Rotation.random(random_state=rng).as_matrix()


def random_layout(
    rng: np.random.Generator,
    camera: Camera,
    scale_range: tuple[float, float] = (0.2, 0.5),
    depth_range: tuple[float, float] = (0.9, 1.6),
    margin: float = 0.9,
) -> Layout:
    """Random uniform rotation, isotropic scale (metres, side of the unit cube) and a translation that
    keeps the object's bounding sphere inside `margin` of the view frustum."""
    s = float(rng.uniform(*scale_range))
    z = float(rng.uniform(*depth_range))
    radius = s * np.sqrt(3) / 2
    half_w = margin * (camera.width / 2) / camera.fx * z - radius
    half_h = margin * (camera.height / 2) / camera.fy * z - radius
    if half_w <= 0 or half_h <= 0 or z - radius <= 0.05:
        raise ValueError(f"random_layout: object of scale {s:.2f} m does not fit in view at depth {z:.2f} m")
    t = np.array([rng.uniform(-half_w, half_w), rng.uniform(-half_h, half_h), z])
    return Layout(random_rotation(rng), t, np.full(3, s))


def random_lighting(rng: np.random.Generator) -> Lighting:
    """Random light direction (from the camera's hemisphere), strengths and background gradient."""
    d = rng.normal(size=3)
    d[2] = abs(d[2]) + 0.5  # light comes from behind the camera, towards +z
    return Lighting(
        direction=d / np.linalg.norm(d),
        ambient=float(rng.uniform(0.15, 0.4)),
        diffuse=float(rng.uniform(0.5, 0.85)),
        background=(rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)),
        noise=float(rng.uniform(0.0, 0.05)),
    )


def random_scene(
    meshes: Sequence[tuple[str, trimesh.Trimesh]],
    camera: Camera,
    rng: np.random.Generator,
    min_visible_pixels: int = 64,
    max_tries: int = 50,
    **layout_kwargs: Any,
) -> Rendering:
    """Render `meshes` (name, normalised mesh) with random layouts, colours and lighting.

    `layout_kwargs` go to `random_layout` (scale_range, depth_range, margin).  Redraws layouts until
    every object has at least `min_visible_pixels` visible pixels; raises RuntimeError after
    `max_tries`.
    """
    for _ in range(max_tries):
        objs = [SceneObject(name, mesh, random_layout(rng, camera, **layout_kwargs), rng.uniform(0.1, 1.0, 3))
                for name, mesh in meshes]
        r = render(objs, camera, random_lighting(rng), seed=int(rng.integers(2**31)))
        counts = np.bincount(r.instance[r.instance >= 0].astype(np.int64), minlength=len(objs))
        if counts.min() >= min_visible_pixels:
            return r
    raise RuntimeError(f"random_scene: no layout with >= {min_visible_pixels} visible pixels per object "
                       f"in {max_tries} tries; use fewer objects, a larger image or smaller scales")
