"""Render the held-out YCB inputs of the scale-out benchmark (``benchmarks/scale_ray.py``).

    python benchmarks/make_scale_samples.py            # -> benchmarks/data/ycb_scale/{objects,scene}

* ``objects``: 20 single-object images of 20 YCB scans (the first 20 in name order that are not
  among the shipped samples), 160 px, as the shipped samples are made.
* ``scene``: one image holding 12 further YCB scans (one sample per object, shared image and
  point map), the paper's "scene" workload.

The GPU machine has no YCB package and no registry, so the renders travel with the repository
(``fs3d_analysis.data.save_samples`` format, read back by ``load_shipped_samples(folder)``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fs3d_analysis.data.build_samples import ATTRIBUTION, IMAGE_SIZE, SCENE, SINGLE, decimated_ycb
from fs3d_analysis.data.dataset import RenderedDataset, Sample, save_samples
from fs3d_analysis.data.sources import list_shapes

OUT = Path(__file__).parent / "data" / "ycb_scale"
SEED = 77
N_OBJECTS = 20
N_SCENE = 12


def held_out_names() -> list[str]:
    """YCB names not used by the shipped samples, in name order."""
    shipped = set(SINGLE) | set(SCENE)
    return [s.name for s in list_shapes(["ycb"]) if s.name not in shipped]


def decimated_meshes(names: list[str], count: int) -> list[tuple[str, object]]:
    """The first ``count`` of ``names`` whose scan decimates (a few YCB scans are non-manifold: skipped,
    and said so)."""
    out = []
    for name in names:
        if len(out) == count:
            break
        try:
            out.append((name, decimated_ycb(name)))
        except ValueError as exc:
            print(f"skipping {name}: {exc}")
    if len(out) < count:
        raise ValueError(f"only {len(out)} usable held-out YCB scans, {count} wanted")
    return out


def build(out: Path = OUT, n_objects: int = N_OBJECTS, n_scene: int = N_SCENE) -> list[Path]:
    meshes = decimated_meshes(held_out_names(), n_objects + n_scene)
    single = RenderedDataset.from_meshes(meshes[:n_objects], image_size=IMAGE_SIZE,
                                         seed=SEED, scale_range=(0.3, 0.4), depth_range=(0.95, 1.2))
    paths = save_samples([single[i] for i in range(len(single))], out / "objects", ATTRIBUTION)
    scene = RenderedDataset.from_meshes(meshes[n_objects:], num_scenes=1,
                                        objects_per_scene=n_scene, image_size=IMAGE_SIZE, seed=SEED,
                                        scale_range=(0.12, 0.2), depth_range=(1.0, 1.4))
    scene_samples = [Sample(s.image, s.mask, s.pointmap, s.mesh, s.layout, s.name, s.intrinsics, 1000, s.object_index)
                     for s in scene.scene(0)]
    paths += save_samples(scene_samples, out / "scene", ATTRIBUTION)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    paths = build(args.out)
    print(f"wrote {[str(p) for p in paths]} ({sum(p.stat().st_size for p in paths) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
