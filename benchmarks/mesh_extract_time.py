"""Host seconds of the mesh extraction (``fs3d_accel.model.mesh_extract.extract_mesh``) at the full config's size.

The per-object benchmarks time the mesh decoder network only; the extraction after it (vertex means over the SDF
corners, marching cubes on the (res+1)^3 grid, colours) runs on the host. This times it on a decoder-output stand-in of
a real object's size: the surface voxels of a YCB scan at 64^3 (``stage_latency.load_coords``), subdivided twice to
the decoder's 256^3 as the mesh decoder does, with an SDF of a sphere through them (so the zero crossing has the
object's extent) and small random colours. Values are not a trained decoder's; the grid, the voxel count and the work
per voxel are.

    python benchmarks/mesh_extract_time.py --objects 007_tuna_fish_can,013_apple --repeats 3 --out runs/mesh_extract
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.stage_latency import load_coords  # noqa: E402
from fs3d_accel.model.mesh_extract import NUM_CHANNELS, extract_mesh  # noqa: E402
from fs3d_accel.model.sparse import SparseTensor, subdivide_coords  # noqa: E402

RESOLUTION = 256  # the full config's mesh decoder output resolution (64^3 subdivided twice)


def stand_in(coords64: torch.Tensor, seed: int = 0) -> SparseTensor:
    """A 101-channel decoder output at 256^3 over ``coords64`` subdivided twice: SDF of a sphere, small colours."""
    c = subdivide_coords(subdivide_coords(coords64))
    xyz = c[:, 1:].float() / RESOLUTION - 0.5
    r = xyz.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(c), NUM_CHANNELS, generator=g) * 0.01
    feats[:, :8] = (r - r.median()).expand(-1, 8)
    return SparseTensor.create(feats, c.int())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", default="007_tuna_fish_can,013_apple")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    coords = load_coords(64, "cpu")
    names = [n for n in args.objects.split(",") if n]
    unknown = [n for n in names if n not in coords]
    if not names:
        raise SystemExit("--objects: none given")
    if unknown:
        raise SystemExit(f"--objects: unknown {unknown}; the coordinate file has {sorted(coords)}")
    if len(set(names)) != len(names):
        raise SystemExit(f"--objects: named twice: {sorted({n for n in names if names.count(n) > 1})}")
    rows = []
    for name in names:
        x = stand_in(coords[name])
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            verts, faces, _ = extract_mesh(x, RESOLUTION)[0]
            times.append(time.perf_counter() - start)
        rows.append({"object": name, "voxels_64": len(coords[name]), "rows_256": len(x), "faces": len(faces),
                     "seconds": times, "median_s": statistics.median(times)})
        print(f"{name}: N = {len(coords[name])}, {len(x)} rows at 256^3, median {statistics.median(times):.3f} s "
              f"({', '.join(f'{t:.3f}' for t in times)})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    (args.out / "mesh_extract_time.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
