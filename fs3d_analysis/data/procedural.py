"""Procedurally generated training shapes: trimesh primitives and CSG booleans.

`procedural_shape(index, seed)` is a pure function of its arguments, so the corpus can be rebuilt
bit for bit.  Even indices are single trimesh primitives (box, cylinder, capsule, cone, sphere,
torus, annulus) with random proportions; odd indices are booleans (union / difference /
intersection) of 2-4 randomly placed signed-distance primitives, meshed with marching cubes.
Booleans are done on signed distances rather than with a mesh-boolean engine so that no optional
dependency (manifold3d, blender, openscad) is needed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation
from skimage.measure import marching_cubes

__all__ = ["procedural_shape", "primitive_shape", "csg_shape"]

SDF = Callable[[np.ndarray], np.ndarray]


def primitive_shape(rng: np.random.Generator) -> tuple[str, trimesh.Trimesh]:
    """One random trimesh primitive (name, mesh), randomly rotated."""
    kind = rng.choice(["box", "cylinder", "capsule", "cone", "sphere", "torus", "annulus"])
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if kind == "box":
        mesh = trimesh.creation.box(extents=[u(0.2, 1.0), u(0.2, 1.0), u(0.2, 1.0)])
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=u(0.1, 0.5), height=u(0.2, 1.0), sections=int(rng.integers(6, 48)))
    elif kind == "capsule":
        mesh = trimesh.creation.capsule(height=u(0.1, 1.0), radius=u(0.1, 0.4))
    elif kind == "cone":
        mesh = trimesh.creation.cone(radius=u(0.2, 0.5), height=u(0.2, 1.0), sections=int(rng.integers(4, 48)))
    elif kind == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=int(rng.integers(1, 4)), radius=0.5)
        mesh.apply_scale([u(0.4, 1.0), u(0.4, 1.0), u(0.4, 1.0)])
    elif kind == "torus":
        major = u(0.25, 0.5)
        mesh = trimesh.creation.torus(major_radius=major, minor_radius=u(0.05, 0.8 * major))
    else:
        r_out = u(0.2, 0.5)
        mesh = trimesh.creation.annulus(r_min=u(0.3, 0.9) * r_out, r_max=r_out, height=u(0.1, 0.8))
    m = np.eye(4)
    m[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    mesh.apply_transform(m)
    return str(kind), mesh


def _sdf_primitive(rng: np.random.Generator) -> tuple[str, SDF]:
    kind = str(rng.choice(["sphere", "box", "cylinder", "torus", "capsule"]))
    rot = Rotation.random(random_state=rng).as_matrix()
    centre = rng.uniform(-0.25, 0.25, size=3)
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    def local(p: np.ndarray) -> np.ndarray:
        return (p - centre) @ rot

    if kind == "sphere":
        r = u(0.15, 0.4)
        return kind, lambda p: np.linalg.norm(local(p), axis=-1) - r
    if kind == "box":
        h = np.array([u(0.08, 0.35), u(0.08, 0.35), u(0.08, 0.35)])

        def box(p: np.ndarray) -> np.ndarray:
            q = np.abs(local(p)) - h
            return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(axis=-1), 0)

        return kind, box
    if kind == "cylinder":
        r, h = u(0.06, 0.3), u(0.1, 0.4)

        def cyl(p: np.ndarray) -> np.ndarray:
            q = local(p)
            d = np.stack([np.linalg.norm(q[..., :2], axis=-1) - r, np.abs(q[..., 2]) - h], axis=-1)
            return np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(axis=-1), 0)

        return kind, cyl
    if kind == "torus":
        big, small = u(0.15, 0.3), u(0.04, 0.12)

        def torus(p: np.ndarray) -> np.ndarray:
            q = local(p)
            return np.hypot(np.linalg.norm(q[..., :2], axis=-1) - big, q[..., 2]) - small

        return kind, torus
    r, h = u(0.05, 0.2), u(0.05, 0.3)

    def capsule(p: np.ndarray) -> np.ndarray:
        q = local(p).copy()
        q[..., 2] -= np.clip(q[..., 2], -h, h)
        return np.linalg.norm(q, axis=-1) - r

    return kind, capsule


def csg_shape(rng: np.random.Generator, resolution: int = 64) -> tuple[str, trimesh.Trimesh]:
    """Boolean combination of 2-4 SDF primitives, meshed by marching cubes on a `resolution`^3 grid."""
    g = np.linspace(-0.75, 0.75, resolution)
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1)
    for _ in range(50):  # some draws give an empty set (e.g. disjoint intersection): redraw
        kind, f = _sdf_primitive(rng)
        d = f(pts)
        names = [kind]
        for _ in range(int(rng.integers(1, 4))):
            op = str(rng.choice(["union", "difference", "intersection"], p=[0.5, 0.35, 0.15]))
            kind, f = _sdf_primitive(rng)
            e = f(pts)
            d = np.minimum(d, e) if op == "union" else np.maximum(d, -e) if op == "difference" else np.maximum(d, e)
            names.append(f"{op}-{kind}")
        inside = int((d < 0).sum())
        if inside >= 200 and d[0, :, :].min() > 0 and d[-1].min() > 0 and d[:, 0].min() > 0 \
                and d[:, -1].min() > 0 and d[:, :, 0].min() > 0 and d[:, :, -1].min() > 0:
            step = g[1] - g[0]
            v, faces, _, _ = marching_cubes(d, level=0.0, spacing=(step, step, step))
            mesh = trimesh.Trimesh(v + g[0], faces[:, ::-1], process=True)
            mesh = max(mesh.split(only_watertight=False), key=lambda m: len(m.faces))
            return "csg_" + "_".join(names), mesh
    raise RuntimeError("csg_shape: no non-empty boolean shape in 50 draws")


def procedural_shape(index: int, seed: int = 0) -> tuple[str, trimesh.Trimesh]:
    """Deterministic shape number `index` (even: primitive, odd: boolean); returns (kind, mesh)."""
    if index < 0:
        raise ValueError(f"procedural_shape: index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    return primitive_shape(rng) if index % 2 == 0 else csg_shape(rng)
