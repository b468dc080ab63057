"""Render the TRAINING split and pack it compactly into shard files (CPU host only).

Per shape: the normalised mesh (decimated to at most ``max_faces``; float16 vertices, uint16
faces). Per view (``views`` per shape): the object's visible pixels (mask bits, their RGB and
float16 z-depth), the background parameters (gradient colours, noise std and seed, so the full
image can be rebuilt), the focal length and the GT layout of the canonical mesh in the camera.
Geometry targets (occupancy, corner SDF) are computed later on the GPU from mesh + layout
(``fs3d_accel.training.geometry``), which keeps the shards small.

Renderer and shape list come from ``fs3d_analysis.data`` (imported lazily: this module is a
build tool, not part of the inference package). Only sources whose split is ``train`` are used;
YCB (evaluation) is refused.
"""
from __future__ import annotations

import argparse
import json
import zlib
import time
from pathlib import Path

import numpy as np

IMAGE_SIZE = 112
FOV_DEG = 50.0


def _decimate(v: np.ndarray, f: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    if len(f) <= max_faces:
        return v, f
    import point_cloud_utils as pcu
    vd, fd, _, _ = pcu.decimate_triangle_mesh(np.ascontiguousarray(v, np.float64), np.ascontiguousarray(f, np.int32),
                                              max_faces)
    if len(fd) < 8:
        raise ValueError("decimation collapsed the mesh")
    return np.asarray(vd), np.asarray(fd)


def render_shape(mesh, rng: np.random.Generator, views: int, min_pixels: int = 48) -> list[dict]:
    """Render ``views`` random single-object views of a normalised trimesh; returns packed dicts."""
    from fs3d_analysis.data.render import Camera, SceneObject, random_layout, random_lighting, render

    cam = Camera.from_fov(IMAGE_SIZE, fov_deg=FOV_DEG)
    out = []
    tries = 0
    while len(out) < views and tries < 8 * views:
        tries += 1
        try:
            layout = random_layout(rng, cam)
        except ValueError:  # scale/depth draw that does not fit the frustum: draw again
            continue
        light = random_lighting(rng)
        seed = int(rng.integers(2 ** 31))
        r = render([SceneObject("obj", mesh, layout, rng.uniform(0.1, 1.0, 3))], cam, light, seed=seed)
        m = r.instance == 0
        if m.sum() < min_pixels or m.all():
            continue
        out.append({
            "mask": np.packbits(m.ravel()),
            "rgb": r.rgb[m].astype(np.uint8),
            "depth": r.depth[m].astype(np.float16),
            "bg": np.concatenate([light.background[0], light.background[1], [light.noise]]).astype(np.float32),
            "bg_seed": np.int64(seed),
            "focal": np.float32(cam.fx),
            "rotation": layout.rotation.astype(np.float32),
            "translation": layout.translation.astype(np.float32),
            "scale": np.float32(layout.scale[0]),
        })
    return out


def write_shard(path: Path, shapes: list[dict]) -> None:
    """Concatenate per-shape / per-view records into flat arrays with offsets."""
    verts = [s["vertices"] for s in shapes]
    faces = [s["faces"] for s in shapes]
    views = [(i, v) for i, s in enumerate(shapes) for v in s["views"]]
    np.savez_compressed(
        path,
        names=np.array([s["name"] for s in shapes]),
        vert_offsets=np.cumsum([0] + [len(v) for v in verts]).astype(np.int64),
        face_offsets=np.cumsum([0] + [len(f) for f in faces]).astype(np.int64),
        vertices=np.concatenate(verts).astype(np.float16),
        faces=np.concatenate(faces).astype(np.uint16),
        view_shape=np.array([i for i, _ in views], dtype=np.int32),
        pix_offsets=np.cumsum([0] + [len(v["rgb"]) for _, v in views]).astype(np.int64),
        masks=np.stack([v["mask"] for _, v in views]),
        rgb=np.concatenate([v["rgb"] for _, v in views]),
        depth=np.concatenate([v["depth"] for _, v in views]),
        bg=np.stack([v["bg"] for _, v in views]),
        bg_seed=np.array([v["bg_seed"] for _, v in views], dtype=np.int64),
        focal=np.array([v["focal"] for _, v in views], dtype=np.float32),
        rotation=np.stack([v["rotation"] for _, v in views]),
        translation=np.stack([v["translation"] for _, v in views]),
        scale=np.array([v["scale"] for _, v in views], dtype=np.float32),
        image_size=np.int64(IMAGE_SIZE),
    )


def build(out_dir: Path, views: int = 3, max_faces: int = 1500, n_procedural: int = 300, limit: int | None = None,
          shard_size: int = 200, seed: int = 0) -> dict:
    """Build all shards under ``out_dir``; resumable (existing shards are kept)."""
    from fs3d_analysis.data.sources import list_shapes, load_raw_mesh
    from fs3d_analysis.metrics.geometry import normalize_mesh
    import trimesh

    sources = ("pybullet_procedural", "pybullet_props", "procedural")
    refs = list_shapes(sources, limit=limit, n_procedural=n_procedural)
    for r in refs:
        if r.split != "train":
            raise ValueError(f"{r.name}: source {r.source} is not a training source")
    # interleave sources so every shard is a mix
    rng0 = np.random.default_rng(seed)
    refs = [refs[i] for i in rng0.permutation(len(refs))]
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"shapes": 0, "views": 0, "skipped": []}
    t0 = time.time()
    for k in range(0, len(refs), shard_size):
        path = out_dir / f"shard_{k // shard_size:03d}.npz"
        if path.exists():
            continue
        shapes = []
        for ref in refs[k:k + shard_size]:
            try:
                raw, _ = load_raw_mesh(ref, seed)
                raw = trimesh.Trimesh(np.asarray(raw.vertices), np.asarray(raw.faces), process=True)
                v, f = _decimate(np.asarray(raw.vertices), np.asarray(raw.faces), max_faces)
                mesh, _ = normalize_mesh(trimesh.Trimesh(v, f, process=False))
                trimesh.repair.fix_normals(mesh)  # outward faces: the GPU SDF takes its sign from them
                if mesh.is_watertight and mesh.volume < 0:
                    mesh.invert()
                if len(mesh.vertices) >= 65535:
                    raise ValueError("too many vertices for uint16 faces")
                rng = np.random.default_rng([seed, zlib.crc32(ref.name.encode())])
                vs = render_shape(mesh, rng, views)
                if not vs:
                    raise ValueError("no view with enough visible pixels")
            except Exception as e:  # noqa: BLE001 - a broken source mesh is skipped and listed
                stats["skipped"].append(f"{ref.name}: {type(e).__name__}: {e}")
                continue
            shapes.append({"name": ref.name, "vertices": np.asarray(mesh.vertices), "faces": np.asarray(mesh.faces),
                           "views": vs})
        write_shard(path, shapes)
        stats["shapes"] += len(shapes)
        stats["views"] += sum(len(s["views"]) for s in shapes)
        print(f"{path.name}: {len(shapes)} shapes, {path.stat().st_size / 2**20:.2f} MiB, {time.time() - t0:.0f}s",
              flush=True)
    (out_dir / "build.json").write_text(json.dumps(stats, indent=1))
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".carry/train_data"))
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--max-faces", type=int, default=1500)
    ap.add_argument("--n-procedural", type=int, default=300)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=200)
    args = ap.parse_args()
    print(build(args.out, args.views, args.max_faces, args.n_procedural, args.limit, args.shard_size))


if __name__ == "__main__":
    main()
