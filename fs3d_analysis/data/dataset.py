"""Datasets of rendered objects that the pipeline and the eval harness consume directly.

A `Sample` is one object in one rendered image: ``image`` (H, W, 3) uint8, ``mask`` (H, W) bool
(visible pixels of this object), ``pointmap`` (H, W, 3) float32 in the PyTorch3D camera frame
(NaN where nothing is hit; other objects of the scene are in it too), ``mesh`` the ground-truth
mesh in the normalised object-local frame ([-0.5, 0.5]^3) and ``layout`` its ground-truth pose
(``x_cam = (s * x) @ R + t``, see `fs3d_analysis.data.layout`).

* `RenderedDataset` renders on the fly, deterministically from ``(seed, scene index)``, from any
  list of (name, normalised mesh) or from the corpus (`RenderedDataset.from_corpus`).
* `load_shipped_samples()` loads the small fixed subset in ``fs3d_analysis/data/samples/`` (YCB
  objects, 160x160; regenerate with ``python -m fs3d_analysis.data.build_samples``); it needs no
  network and no corpus build.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import trimesh

from fs3d_analysis.data.layout import Layout
from fs3d_analysis.data.render import Camera, Rendering, depth_to_pointmap, random_scene
from fs3d_analysis.metrics.geometry import validate_mesh

__all__ = ["Sample", "SampleSet", "RenderedDataset", "load_shipped_samples", "save_samples", "SAMPLES_DIR"]

SAMPLES_DIR = Path(__file__).parent / "samples"


@dataclass(frozen=True, eq=False)
class Sample:
    """One object in one image (see module docstring for shapes, frames and units)."""

    image: np.ndarray
    mask: np.ndarray
    pointmap: np.ndarray
    mesh: trimesh.Trimesh
    layout: Layout
    name: str
    intrinsics: np.ndarray  # (3, 3) OpenCV pixel intrinsics
    scene_id: int = 0
    object_index: int = 0

    def __post_init__(self) -> None:
        im, m, pm = self.image, self.mask, self.pointmap
        if not (isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3):
            raise TypeError(f"Sample {self.name}: image must be uint8 (H, W, 3), got "
                            f"{getattr(im, 'dtype', type(im))} {getattr(im, 'shape', '')}")
        h, w = im.shape[:2]
        if not (isinstance(m, np.ndarray) and m.dtype == bool and m.shape == (h, w)):
            raise TypeError(f"Sample {self.name}: mask must be bool {(h, w)}, got "
                            f"{getattr(m, 'dtype', type(m))} {getattr(m, 'shape', '')}")
        if not m.any():
            raise ValueError(f"Sample {self.name}: mask is empty")
        if not (isinstance(pm, np.ndarray) and pm.dtype == np.float32 and pm.shape == (h, w, 3)):
            raise TypeError(f"Sample {self.name}: pointmap must be float32 {(h, w, 3)}, got "
                            f"{getattr(pm, 'dtype', type(pm))} {getattr(pm, 'shape', '')}")
        validate_mesh(self.mesh, f"Sample {self.name} mesh")
        if not isinstance(self.layout, Layout):
            raise TypeError(f"Sample {self.name}: layout must be a Layout, got {type(self.layout).__name__}")

    @property
    def camera(self) -> Camera:
        k = self.intrinsics
        return Camera(self.image.shape[1], self.image.shape[0], float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]))

    def posed_mesh(self) -> trimesh.Trimesh:
        """The ground-truth mesh in the camera frame."""
        return trimesh.Trimesh(self.layout.apply(self.mesh.vertices), np.asarray(self.mesh.faces), process=False)


class SampleSet(Sequence[Sample]):
    """An in-memory list of samples."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self._samples = list(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return SampleSet(self._samples[i])
        return self._samples[i]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._samples]


def _samples_from_rendering(r: Rendering, scene_id: int) -> list[Sample]:
    return [
        Sample(r.rgb, r.mask(i), r.pointmap, o.mesh, o.layout, o.name, r.camera.K, scene_id, i)
        for i, o in enumerate(r.objects)
    ]


class RenderedDataset(Sequence[Sample]):
    """Random renders of normalised meshes; item ``i`` is object ``i % k`` of scene ``i // k``.

    With one object per scene, scene ``j`` shows shape ``j % n_shapes``; with several, each scene
    draws `objects_per_scene` distinct shapes.  Everything is a function of ``(seed, scene)``.
    """

    def __init__(
        self,
        names: Sequence[str],
        load_mesh: Callable[[str], trimesh.Trimesh],
        num_scenes: Optional[int] = None,
        objects_per_scene: int = 1,
        image_size: int = 256,
        fov_deg: float = 50.0,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.2, 0.5),
        depth_range: tuple[float, float] = (0.9, 1.6),
    ) -> None:
        if len(names) == 0:
            raise ValueError("RenderedDataset: no shapes given")
        if not 1 <= objects_per_scene <= len(names):
            raise ValueError(f"RenderedDataset: objects_per_scene must be in [1, {len(names)}], got {objects_per_scene}")
        self.names = list(names)
        self.num_scenes = len(names) if num_scenes is None else int(num_scenes)
        if self.num_scenes < 1:
            raise ValueError(f"RenderedDataset: num_scenes must be >= 1, got {num_scenes}")
        self.objects_per_scene = objects_per_scene
        self.camera = Camera.from_fov(image_size, fov_deg=fov_deg)
        self.seed = seed
        self.layout_kwargs = {"scale_range": scale_range, "depth_range": depth_range}
        self._load = lru_cache(maxsize=128)(load_mesh)
        self._scene_cache: Optional[tuple[int, list[Sample]]] = None

    @classmethod
    def from_meshes(cls, meshes: Sequence[tuple[str, trimesh.Trimesh]], **kwargs) -> "RenderedDataset":
        table = dict(meshes)
        return cls(list(table), table.__getitem__, **kwargs)

    @classmethod
    def from_corpus(cls, manifest, split: str = "eval", **kwargs) -> "RenderedDataset":
        """Render the shapes of one split of a corpus `Manifest` (see `fs3d_analysis.data.corpus`)."""
        entries = manifest.split(split)
        return cls([e.name for e in entries], lambda n: manifest.load(n).mesh, **kwargs)

    def __len__(self) -> int:
        return self.num_scenes * self.objects_per_scene

    def scene_shapes(self, scene: int) -> list[str]:
        if self.objects_per_scene == 1:
            return [self.names[scene % len(self.names)]]
        rng = np.random.default_rng([self.seed, scene, 1])
        return [self.names[i] for i in rng.choice(len(self.names), self.objects_per_scene, replace=False)]

    def scene(self, scene: int) -> list[Sample]:
        """All samples (one per object) of scene `scene`; they share image and point map."""
        if not 0 <= scene < self.num_scenes:
            raise IndexError(f"scene {scene} out of range [0, {self.num_scenes})")
        if self._scene_cache is not None and self._scene_cache[0] == scene:
            return self._scene_cache[1]
        meshes = [(n, self._load(n)) for n in self.scene_shapes(scene)]
        r = random_scene(meshes, self.camera, np.random.default_rng([self.seed, scene]), **self.layout_kwargs)
        samples = _samples_from_rendering(r, scene)
        self._scene_cache = (scene, samples)
        return samples

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return SampleSet([self[j] for j in range(*i.indices(len(self)))])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range [0, {n})")
        i %= n
        return self.scene(i // self.objects_per_scene)[i % self.objects_per_scene]

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def save_samples(samples: Sequence[Sample], folder: Union[str, Path], attribution: str = "") -> list[Path]:
    """Write samples compactly: ``samples.npz`` (images, packed masks, z-depth, poses) and
    ``meshes.npz`` (vertices float32 / faces int32 per distinct mesh name).  The point map is not
    stored: it is recomputed exactly from depth and intrinsics on load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    depth = np.stack([np.where(np.isfinite(s.pointmap[..., 2]), s.pointmap[..., 2], np.inf) for s in samples])
    meta = [{"name": s.name, "scene_id": s.scene_id, "object_index": s.object_index} for s in samples]
    np.savez_compressed(
        folder / "samples.npz",
        images=np.stack([s.image for s in samples]),
        masks=np.packbits(np.stack([s.mask for s in samples]), axis=-1),
        depth=depth.astype(np.float32),
        intrinsics=np.stack([s.intrinsics for s in samples]),
        rotation=np.stack([s.layout.rotation for s in samples]),
        translation=np.stack([s.layout.translation for s in samples]),
        scale=np.stack([s.layout.scale for s in samples]),
        meta=json.dumps({"samples": meta, "attribution": attribution}),
    )
    meshes = {}
    for s in samples:
        meshes[f"{s.name}/vertices"] = np.asarray(s.mesh.vertices, dtype=np.float32)
        meshes[f"{s.name}/faces"] = np.asarray(s.mesh.faces, dtype=np.int32)
    np.savez_compressed(folder / "meshes.npz", **meshes)
    return [folder / "samples.npz", folder / "meshes.npz"]


def load_shipped_samples(folder: Union[str, Path, None] = None) -> SampleSet:
    """The fixed samples shipped in the package (no network, no corpus); see `save_samples`."""
    folder = SAMPLES_DIR if folder is None else Path(folder)
    path = folder / "samples.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped samples at {path}; run python -m fs3d_analysis.data.build_samples")
    with np.load(path) as z, np.load(folder / "meshes.npz") as zm:
        meta = json.loads(str(z["meta"]))["samples"]
        h, w = z["images"].shape[1:3]
        masks = np.unpackbits(z["masks"], axis=-1)[..., :w].astype(bool)
        meshes = {
            m["name"]: trimesh.Trimesh(zm[f"{m['name']}/vertices"].astype(np.float64),
                                       zm[f"{m['name']}/faces"].astype(np.int64), process=False)
            for m in meta
        }
        out = []
        for i, m in enumerate(meta):
            k = z["intrinsics"][i]
            cam = Camera(int(w), int(h), float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]))
            layout = Layout(z["rotation"][i], z["translation"][i], z["scale"][i])
            out.append(Sample(z["images"][i], masks[i], depth_to_pointmap(z["depth"][i], cam), meshes[m["name"]],
                              layout, m["name"], cam.K, int(m["scene_id"]), int(m["object_index"])))
    return SampleSet(out)
