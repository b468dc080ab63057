"""The SLaT sampler over a stream of objects of distinct sizes: what CUDA-graph recording costs per new object.

Under ``compile_mode="reduce-overhead"`` inductor records a CUDA graph pair (batch 2 and 1) for every token count it
has not seen, keeps it in the cudagraph tree, and records again for a seen count whenever SLaT's per-call K/V have
moved; in the default mode nothing is recorded and every kernel is launched from Python. ``base_vs_official.py``
repeats one object, so it cannot show what a dataset run pays: a capture per new size, and whether graph memory grows
with the number of sizes. This script runs the SLaT sampler (full 25-step schedule,
batched CFG) once per object over ``--objects`` distinct sizes, twice (``--passes``: the second pass meets every size
again), for each variant, in one process, and records per call: seconds (CUDA events), graphs recorded (inductor's,
and since session 16 also the stages' own whole-pass graphs: two per object for ``cuda_graphs`` variants), reserved and
allocated GPU memory. Sizes are spread evenly over ``--min-voxels`` .. ``--max-voxels``; each object is a seeded
planar crop of the largest YCB surface at the flow's resolution (``--shapes crops``) or voxels scattered over all YCB
surfaces (``--shapes scattered``, many more downsampled tokens per voxel). Values do not matter for timing; the
condition tokens come from the real condition fuser on the synthetic scene. Reserved memory is the caching allocator's
(CUDA-graph pools included), cumulative over the variants in run order: a later variant starts from what an earlier one
left reserved. Host-side caches are cumulative too: cuBLAS picks an algorithm at each GEMM shape's first call with a
new token count (~5 ms of host time each, session 17, ``results/gemm_first_call_h200/``) and keeps it for the process,
so a later variant's pass 1 finds the shapes it shares with an earlier variant already cached. To compare first
meetings, run one variant per process.

    python benchmarks/slat_many_sizes.py --device cuda --config full \\
        --variants compile-all-zkv-ro,compile-all-zkv-ssro --objects 24 --out runs/slat_many_sizes

Writes ``slat_many_sizes.csv`` (one row per call, after every call), ``README.md`` (medians per variant and pass,
graphs and memory at the end, each later variant against the first paired by size) and ``slat_many_sizes.png``. On
the CPU it runs uncompiled variants only (``--config mini``: a check of the script, not a timing).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.stage_latency import (COORDS_FILE, SHORT, Timer, checked_device, checked_variants,  # noqa: E402
                                      synthetic_inputs, variant_label, variant_options)
from benchmarks.base_vs_official import ours_slat_fn  # noqa: E402  (one sampler call, structures released)
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_accel.stages.slat import slat_noise  # noqa: E402
from fs3d_analysis.profile.latency import cuda_graph_recordings  # noqa: E402

CSV_NAME = "slat_many_sizes.csv"
COLUMNS = ("variant", "pass", "index", "N", "seconds", "graphs_recorded", "reserved_gb", "allocated_gb")


def object_sizes(count: int, low: int, high: int) -> list[int]:
    """``count`` distinct token counts spread evenly over [low, high] (both included)."""
    if count < 1:
        raise ValueError(f"--objects must be >= 1, got {count}")
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= --min-voxels <= --max-voxels, got {low}, {high}")
    sizes = sorted({int(round(v)) for v in np.linspace(low, high, count)})
    if len(sizes) < count:
        raise ValueError(f"{count} distinct sizes do not fit in [{low}, {high}]")
    return sizes


def warmup_size(sizes: list[int]) -> int:
    """A token count for the compiling first call that none of the timed objects has (so the first timed call of
    each size is new to the compiled code), near the middle of the range."""
    taken, n = set(sizes), (sizes[0] + sizes[-1]) // 2
    while n in taken:
        n += 1
    return n


def surface_voxels(resolution: int, largest_only: bool) -> torch.Tensor:
    """(M, 3) distinct int64 surface voxels at ``resolution`` of the YCB objects in ``COORDS_FILE``: all of them pooled,
    or only the largest."""
    data = np.load(COORDS_FILE)
    names = [max(data.files, key=lambda f: len(data[f]))] if largest_only else data.files
    xyz = torch.cat([torch.from_numpy(data[name].astype(np.int64)) for name in names])
    if resolution != 64:
        xyz = xyz * resolution // 64
    return torch.unique(xyz, dim=0)


#: how ``object_coords`` makes an object of N voxels: "crops" = the N voxels of the largest YCB surface on one side of
#: a plane of seeded random direction (a contiguous surface patch: the flow's downsampled token count grows with N as
#: for a real object); "scattered" = N voxels drawn at random from all YCB surfaces pooled (spread over the grid, so
#: many more downsampled tokens than a real object of N voxels; session 11's H200 run used it)
SHAPES = ("crops", "scattered")


def object_coords(sizes: list[int], resolution: int, seed: int, shapes: str = "crops") -> list[torch.Tensor]:
    """One (N, 4) int32 [0, x, y, z] coordinate set per size, sorted, made as ``shapes`` says (:data:`SHAPES`)."""
    if shapes not in SHAPES:
        raise ValueError(f"unknown shapes {shapes!r}; choose one of {SHAPES}")
    pool = surface_voxels(resolution, largest_only=shapes == "crops")
    if max(sizes) > len(pool):
        raise ValueError(f"--max-voxels {max(sizes)} exceeds the {len(pool)} distinct voxels available at "
                         f"resolution {resolution} ({shapes})")
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(seed + i)
        if shapes == "crops":
            direction = torch.randn(3, generator=g, dtype=torch.float64)
            keep = torch.argsort(pool.double() @ direction, stable=True)[:n].sort().values
        else:
            keep = torch.randperm(len(pool), generator=g)[:n].sort().values
        xyz = pool[keep]
        out.append(torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(torch.int32).contiguous())
    return out


def slat_condition(stage, inputs, opts, device: torch.device) -> torch.Tensor:
    """The SLaT condition tokens of ``inputs`` under ``opts`` (its precision and kernels)."""
    with opts.network_context(device, "slat"):
        return stage.condition(**{k: x.to(opts.compute_dtype(device)) for k, x in inputs.slat_kwargs().items()})


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant and pass: median and max seconds, graphs recorded, reserved memory at the end of the pass."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for p in sorted({r["pass"] for r in rows if r["variant"] == variant}):
            sel = [r for r in rows if r["variant"] == variant and r["pass"] == p]
            out.append({"variant": variant, "pass": p, "calls": len(sel),
                        "median_s": statistics.median(r["seconds"] for r in sel),
                        "max_s": max(r["seconds"] for r in sel),
                        "graphs_recorded": sum(r["graphs_recorded"] for r in sel),
                        "reserved_gb_end": sel[-1]["reserved_gb"]})
    return out


def paired(rows: list[dict]) -> list[dict]:
    """Per variant after the first, and pass: the median over sizes of (this variant's seconds - the first variant's at
    the same size and pass), and at how many of those sizes it was faster. Pairing by size removes the spread between
    sizes, which is larger than most differences between variants."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    seconds = {(r["variant"], r["pass"], r["N"]): r["seconds"] for r in rows}
    out = []
    for variant in variants[1:]:
        for p in sorted({r["pass"] for r in rows if r["variant"] == variant}):
            diffs = [seconds[(variant, p, n)] - seconds[(variants[0], p, n)]
                     for (v, q, n) in seconds if v == variant and q == p and (variants[0], p, n) in seconds]
            if diffs:
                out.append({"variant": variant, "against": variants[0], "pass": p, "sizes": len(diffs),
                            "median_diff_s": statistics.median(diffs), "faster_at": sum(d < 0 for d in diffs)})
    return out


def write_readme(out: Path, rows: list[dict], meta: dict) -> None:
    lines = ["# SLaT sampler over objects of distinct sizes (`benchmarks/slat_many_sizes.py`)", "",
             f"Device **{meta['device']}**, torch {meta['torch']}, config `{meta['config']}`, "
             f"{meta['objects']} sizes from {meta['sizes'][0]} to {meta['sizes'][-1]} voxels "
             f"(`--shapes {meta['shapes']}`), {meta['passes']} "
             f"passes (pass 2 meets every size again). One call per object; the first call of each variant, on an "
             f"object of another size ({meta['warmup_N']} voxels), compiles where the variant compiles and is not "
             f"counted." + (" CPU: a check of the script, not a timing." if meta["device"] == "cpu" else ""), ""]
    lines += [f"- `{v}`: {desc}" for v, desc in meta["variants"].items()]
    lines += ["", "| variant | pass | calls | median s | max s | graphs recorded | reserved GB at the end |",
              "|---|---|---|---|---|---|---|"]
    for s in summarise(rows):
        lines.append(f"| {s['variant']} | {s['pass']} | {s['calls']} | {s['median_s']:.4f} | {s['max_s']:.4f} | "
                     f"{s['graphs_recorded']} | {s['reserved_gb_end']:.2f} |")
    pairs = paired(rows)
    if pairs:
        lines += ["", f"Paired by size against `{pairs[0]['against']}` (median over sizes of the difference; "
                      "negative = faster). In pass 1 a later variant finds the GEMM shapes it shares with an earlier "
                      "one in cuBLAS's per-process cache: compare first meetings across processes.", "", "| variant | pass | sizes | median difference s | faster at |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['variant']} | {d['pass']} | {d['sizes']} | {d['median_diff_s']:+.4f} | {d['faster_at']} of "
                  f"{d['sizes']} |" for d in pairs]
    lines += ["", f"Every call: `{CSV_NAME}`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == variant]
        x = range(len(sel))
        ax_t.plot(x, [r["seconds"] for r in sel], marker=".", label=variant)
        ax_m.plot(x, [r["reserved_gb"] for r in sel], marker=".", label=variant)
    ax_t.set(xlabel="call (pass 1, then pass 2)", ylabel="SLaT sampler seconds")
    ax_m.set(xlabel="call (pass 1, then pass 2)", ylabel="reserved GPU memory (GB)")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "slat_many_sizes.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="full", choices=("mini", "full"))
    ap.add_argument("--variants", default="compile-all-zkv-ro,compile-all-zkv-ssro",
                    help=f"comma-separated, from {sorted(SHORT)}; each may name FA4 tiles: NAME@SITE=TILES[+SITE=TILES]")
    ap.add_argument("--objects", type=int, default=24, help="how many distinct sizes")
    ap.add_argument("--min-voxels", type=int, default=2000)
    ap.add_argument("--max-voxels", type=int, default=20000)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--shapes", default="crops", choices=SHAPES,
                    help="crops of the largest YCB surface (like real objects), or voxels scattered over all of them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.passes < 1:
        raise SystemExit(f"--passes must be >= 1, got {args.passes}")
    dev = checked_device(args.device)
    variants = checked_variants(args.variants, dev)
    dtype = variant_options(variants[0]).weight_dtype
    try:
        sizes = object_sizes(args.objects, args.min_voxels, args.max_voxels)
    except ValueError as e:
        raise SystemExit(str(e)) from e

    pipe = Pipeline.from_config(args.config, seed=args.seed, device="cpu")
    resolution = pipe.config.slat_flow.resolution
    try:
        coords = [c.to(dev) for c in object_coords(sizes, resolution, args.seed, args.shapes)]
        warm_coords = object_coords([warmup_size(sizes)], resolution, args.seed + 10_000, args.shapes)[0]
    except ValueError as e:
        raise SystemExit(str(e)) from e
    warm_coords = warm_coords.to(dev)
    pipe = pipe.to(dtype).to(dev)
    inp = pipe.prepare(*synthetic_inputs(pipe.config.image_size)).to(dev)
    stage, sampler_cfg = pipe.slat, pipe.config.slat_sampler
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "config": args.config, "shapes": args.shapes, "objects": len(sizes), "sizes": sizes, "passes": args.passes,
            "warmup_N": len(warm_coords), "seed": args.seed,
            "variants": {v: f"{variant_label(v)} = {variant_options(v)}" for v in variants}}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    timer, rows = Timer(dev, warmup=0, repeats=1), []  # one timed call per object: each size is met once per pass
    gen = torch.Generator().manual_seed(args.seed)
    noises = [slat_noise(len(c), pipe.config.slat_flow.in_channels, gen).to(dev) for c in coords]
    warm_noise = slat_noise(len(warm_coords), pipe.config.slat_flow.in_channels, gen).to(dev)
    with torch.no_grad(), open(args.out / CSV_NAME, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for v in variants:
            opts = variant_options(v)
            cond = slat_condition(stage, inp, opts, dev)
            t0 = time.perf_counter()
            ours_slat_fn(stage, warm_noise, cond, warm_coords, sampler_cfg, opts)()  # compiles
            print(f"{v}: first call (N={len(warm_coords)}) {time.perf_counter() - t0:.1f} s", flush=True)
            for p in range(1, args.passes + 1):
                for i, (c, noise) in enumerate(zip(coords, noises)):
                    before = cuda_graph_recordings(dev)
                    sec = timer(ours_slat_fn(stage, noise, cond, c, sampler_cfg, opts))["median_s"]
                    row = {"variant": v, "pass": p, "index": i, "N": len(c), "seconds": sec,
                           "graphs_recorded": cuda_graph_recordings(dev) - before,
                           "reserved_gb": torch.cuda.memory_reserved(dev) / 1e9 if dev.type == "cuda" else 0.0,
                           "allocated_gb": torch.cuda.memory_allocated(dev) / 1e9 if dev.type == "cuda" else 0.0}
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                print(f"{v} pass {p}: median {statistics.median(r['seconds'] for r in rows[-len(coords):]):.4f} s, "
                      f"{sum(r['graphs_recorded'] for r in rows[-len(coords):])} graphs recorded", flush=True)
    write_readme(args.out, rows, meta)
    plot(args.out, rows)


if __name__ == "__main__":
    main()
