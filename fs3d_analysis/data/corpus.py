"""Shape corpus on disk: normalised meshes, occupancies and surface samples, plus a manifest.

Layout: ``<root>/corpus/r<resolution>/<source>/<name>.npz`` and ``manifest.json`` next to the
source folders.  ``root`` is the argument, else ``$FS3D_CACHE``, else ``~/.cache/fs3d``.

Each shape file holds

* ``vertices`` (V, 3) float32, ``faces`` (F, 3) int32: the mesh *normalised* (axis-aligned box
  centred at 0, longest side 1, so it lies in [-0.5, 0.5]^3; SAM 3D's object-local frame, see
  `fs3d_analysis.metrics.geometry`), in the source's own orientation;
* ``occupancy`` packed bits of a bool (R, R, R) solid occupancy over [-0.5, 0.5]^3 (winding
  number inside test OR surface voxel, robust for open scans; `occupancy_grid`);
* ``surface_points`` (N, 3) float32: area-uniform surface samples for metrics;
* ``entry``: the manifest entry as JSON, so an interrupted build resumes without redoing work.

Splits: ``eval`` = YCB scans only; ``train`` = pybullet_data objects and procedural shapes
(`sources.SOURCES`).  The manifest records the split of every shape and `check_split` refuses a
manifest in which a name or a geometry (hash of the occupancy) appears in both splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import multiprocessing as mp
import numpy as np
import trimesh

from fs3d_analysis.data.sources import SOURCES, ShapeRef, list_shapes, load_raw_mesh
from fs3d_analysis.metrics.geometry import normalize_mesh, occupancy_grid, sample_surface, validate_mesh

__all__ = ["ShapeEntry", "CorpusShape", "Manifest", "build_corpus", "load_manifest", "default_root", "prepare_shape"]

MANIFEST_VERSION = 1


def default_root() -> Path:
    """``$FS3D_CACHE`` or ``~/.cache/fs3d``."""
    env = os.environ.get("FS3D_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/fs3d").expanduser()


@dataclass(frozen=True)
class ShapeEntry:
    name: str
    source: str
    split: str
    file: str  # relative to the corpus folder
    kind: str
    n_vertices: int
    n_faces: int
    input_watertight: bool
    occupancy_fraction: float
    geometry_hash: str
    origin: str  # source file or "procedural:<index>"


@dataclass(frozen=True, eq=False)
class CorpusShape:
    """One loaded shape: normalised mesh, occupancy (R, R, R) bool, surface points (N, 3)."""

    entry: ShapeEntry
    mesh: trimesh.Trimesh
    occupancy: np.ndarray
    surface_points: np.ndarray

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Manifest:
    folder: Path
    resolution: int
    n_surface_points: int
    entries: tuple[ShapeEntry, ...]
    skipped: tuple[dict, ...] = ()
    sources: dict = field(default_factory=dict)
    build_seconds: float = 0.0
    workers: int = 1
    version: int = MANIFEST_VERSION

    def split(self, name: str) -> list[ShapeEntry]:
        if name not in ("eval", "train"):
            raise ValueError(f"split must be 'eval' or 'train', got {name!r}")
        return [e for e in self.entries if e.split == name]

    def entry(self, name: str) -> ShapeEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"shape {name!r} not in the corpus manifest {self.folder / 'manifest.json'}")

    def check_split(self) -> None:
        """Raise ValueError if a source feeds the wrong split or a name/geometry is in both splits."""
        for e in self.entries:
            want = SOURCES[e.source].split if e.source in SOURCES else None
            if want is not None and e.split != want:
                raise ValueError(f"shape {e.name}: source {e.source} belongs to split {want}, manifest says {e.split}")
        ev, tr = self.split("eval"), self.split("train")
        names = {e.name for e in ev} & {e.name for e in tr}
        if names:
            raise ValueError(f"corpus split overlap: names in both eval and train: {sorted(names)[:10]}")
        hashes = {e.geometry_hash: e.name for e in ev}
        clash = [(hashes[e.geometry_hash], e.name) for e in tr if e.geometry_hash in hashes]
        if clash:
            raise ValueError(f"corpus split overlap: identical geometry in eval and train: {clash[:10]}")

    def load(self, name_or_entry: Union[str, ShapeEntry]) -> CorpusShape:
        e = self.entry(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
        with np.load(self.folder / e.file) as z:
            r = int(z["resolution"])
            occ = np.unpackbits(z["occupancy"])[: r ** 3].reshape(r, r, r).astype(bool)
            mesh = trimesh.Trimesh(z["vertices"].astype(np.float64), z["faces"].astype(np.int64), process=False)
            return CorpusShape(e, mesh, occ, z["surface_points"].astype(np.float64))

    def save(self) -> Path:
        d = {
            "version": self.version,
            "resolution": self.resolution,
            "n_surface_points": self.n_surface_points,
            "normalisation": "axis-aligned box centred at 0, longest side 1 ([-0.5, 0.5]^3); "
                             "occupancy over [-0.5, 0.5]^3, voxel [i,j,k] <-> (x,y,z)",
            "build_seconds": self.build_seconds,
            "workers": self.workers,
            "sources": self.sources,
            "counts": {s: len(self.split(s)) for s in ("eval", "train")},
            "shapes": [asdict(e) for e in self.entries],
            "skipped": list(self.skipped),
        }
        path = self.folder / "manifest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, folder: Union[str, Path]) -> "Manifest":
        """Read ``<folder>/manifest.json`` (folder = ``<root>/corpus/r<resolution>``)."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"no corpus manifest at {path}; build it with build_corpus()")
        d = json.loads(path.read_text())
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {d.get('version')} != {MANIFEST_VERSION}; rebuild the corpus")
        return cls(
            folder=folder, resolution=d["resolution"], n_surface_points=d["n_surface_points"],
            entries=tuple(ShapeEntry(**e) for e in d["shapes"]), skipped=tuple(d["skipped"]),
            sources=d["sources"], build_seconds=d["build_seconds"], workers=d.get("workers", 1),
        )


def prepare_shape(
    mesh: trimesh.Trimesh, resolution: int = 64, n_surface_points: int = 4096, seed: int = 0, name: str = "mesh"
) -> tuple[trimesh.Trimesh, np.ndarray, np.ndarray]:
    """Validate and normalise `mesh`; return (normalised mesh, occupancy (R,R,R) bool, surface points (N,3)).

    Raises ValueError for empty meshes, non-finite vertices or degenerate geometry.
    """
    validate_mesh(mesh, name)
    mesh = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    mesh.remove_unreferenced_vertices()
    norm_mesh, _ = normalize_mesh(mesh)
    occ = occupancy_grid(norm_mesh, resolution)
    if not occ.any():
        raise ValueError(f"{name}: occupancy is empty at resolution {resolution}")
    pts = sample_surface(norm_mesh, n_surface_points, seed=seed)
    return norm_mesh, occ, pts


def _build_one(args: tuple[ShapeRef, Path, int, int, int, bool]) -> dict:
    ref, folder, resolution, n_points, seed, rebuild = args
    rel = f"{ref.source}/{ref.name}.npz"
    out = folder / rel
    if out.is_file() and not rebuild:
        try:
            with np.load(out) as z:
                if int(z["resolution"]) == resolution and len(z["surface_points"]) == n_points:
                    return {"entry": json.loads(str(z["entry"]))}
        except Exception:  # a torn file from an interrupted build: redo it
            pass
    try:
        raw, kind = load_raw_mesh(ref, seed)
        mesh, occ, pts = prepare_shape(raw, resolution, n_points, seed=seed, name=ref.name)
    except (ValueError, FileNotFoundError) as e:
        return {"skipped": {"name": ref.name, "source": ref.source, "reason": str(e)}}
    packed = np.packbits(occ.ravel())
    entry = ShapeEntry(
        name=ref.name, source=ref.source, split=ref.split, file=rel, kind=kind,
        n_vertices=len(mesh.vertices), n_faces=len(mesh.faces), input_watertight=bool(raw.is_watertight),
        occupancy_fraction=float(occ.mean()), geometry_hash=hashlib.sha1(packed.tobytes()).hexdigest(),
        origin=ref.path if ref.path is not None else f"procedural:{ref.index}",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez_compressed(
        tmp, vertices=mesh.vertices.astype(np.float32), faces=mesh.faces.astype(np.int32), occupancy=packed,
        resolution=np.int64(resolution), surface_points=pts.astype(np.float32), entry=json.dumps(asdict(entry)),
    )
    tmp.replace(out)
    return {"entry": asdict(entry)}


def build_corpus(
    root: Optional[Union[str, Path]] = None,
    resolution: int = 64,
    progress: bool = True,
    *,
    sources: Sequence[str] = tuple(SOURCES),
    limit: Optional[int] = None,
    n_procedural: int = 200,
    n_surface_points: int = 4096,
    workers: Optional[int] = None,
    seed: int = 0,
    rebuild: bool = False,
) -> Manifest:
    """Build (or resume) the corpus under ``<root>/corpus/r<resolution>`` and return its manifest.

    `limit` keeps the first shapes per source (quick tests); `workers` processes (default: all
    cores).  Files that fail validation are skipped and listed in ``manifest.skipped`` with the
    reason (and a warning); `rebuild` recomputes files that already exist.
    """
    if resolution < 8:
        raise ValueError(f"build_corpus: resolution must be >= 8, got {resolution}")
    if n_surface_points < 1:
        raise ValueError(f"build_corpus: n_surface_points must be >= 1, got {n_surface_points}")
    workers = workers or os.cpu_count() or 1
    folder = Path(root).expanduser() if root is not None else default_root()
    folder = folder / "corpus" / f"r{resolution}"
    folder.mkdir(parents=True, exist_ok=True)
    refs = list_shapes(sources, limit=limit, n_procedural=n_procedural)
    jobs = [(r, folder, resolution, n_surface_points, seed, rebuild) for r in refs]
    t0 = time.perf_counter()
    results: Iterable[dict]
    if workers == 1:
        results = map(_build_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork" if os.name == "posix" else "spawn"))
        results = pool.map(_build_one, jobs, chunksize=4)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(jobs), desc=f"fs3d corpus r{resolution}", unit="shape")
    try:
        out = list(results)
    finally:
        if pool is not None:
            pool.shutdown()
    entries = tuple(ShapeEntry(**r["entry"]) for r in out if "entry" in r)
    skipped = tuple(r["skipped"] for r in out if "skipped" in r)
    if skipped:
        import warnings

        warnings.warn(f"build_corpus: skipped {len(skipped)} invalid shapes (see manifest 'skipped'): "
                      f"{[s['name'] for s in skipped][:5]}", stacklevel=2)
    manifest = Manifest(
        folder=folder, resolution=resolution, n_surface_points=n_surface_points, entries=entries,
        skipped=skipped, sources={k: asdict(v) for k, v in SOURCES.items() if k in sources},
        build_seconds=time.perf_counter() - t0, workers=workers,
    )
    manifest.check_split()
    manifest.save()
    return manifest


def load_manifest(root: Optional[Union[str, Path]] = None, resolution: int = 64) -> Manifest:
    """The manifest of a corpus built by `build_corpus(root, resolution)`."""
    folder = Path(root).expanduser() if root is not None else default_root()
    return Manifest.read(folder / "corpus" / f"r{resolution}")
