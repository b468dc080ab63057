"""Scale-out on Ray: the YCB evaluation sweep and one multi-object scene on 1..N GPUs.

One process, same inputs (``benchmarks/data/ycb_scale``, made by ``make_scale_samples.py``), same
seeds, sam3d-mini weights (the only weights here that make real shapes):

1. plain: ``fs3d_analysis.eval.evaluate`` in this process on one device (after one warm-up object);
2. Ray with ``w`` workers for each ``w`` in ``--workers`` (one model replica per GPU):
   ``evaluate_ray`` over the same (object, method) pairs (replicas warmed up first), and the scene
   (12 objects of one image) split over the workers by ``reconstruct_scene_split``;
3. the scene in this process on one device, batched and object by object.

Writes ``scale_ray.md`` (throughput, speedup over 1 worker, Ray overhead against the plain run,
per-scene time), ``scale_ray.csv`` and each harness' ``results.csv``; the quality columns of every
Ray table are compared with the plain table (max abs difference per metric).

    python benchmarks/scale_ray.py --device cuda --workers 1,2 --out runs/scale_ray
    python benchmarks/scale_ray.py --device cpu --workers 1,2 --limit 2 --scene-limit 3   # smoke test
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fs3d_accel.accel import make_method
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.distributed import CliPipeFactory, ReplicaPool, evaluate_ray, reconstruct_scene_split
from fs3d_analysis.eval import KEY, evaluate, run_one
from fs3d_analysis.scene import reconstruct_scene

DATA = Path(__file__).parent / "data" / "ycb_scale"


def quality_diff(plain: pd.DataFrame, other: pd.DataFrame) -> dict[str, float]:
    """Max |difference| per non-timing numeric column over the pairs both tables hold (NaN == NaN)."""
    a = plain.set_index(KEY).sort_index()
    b = other.set_index(KEY).sort_index()
    if set(a.index) != set(b.index):
        raise ValueError(f"tables hold different pairs: {sorted(set(a.index) ^ set(b.index))[:5]}")
    b = b.loc[a.index]
    out = {}
    for col in a.columns:
        if col.startswith("time") or col == "speedup" or not pd.api.types.is_numeric_dtype(a[col]):
            continue
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        both_nan = np.isnan(x) & np.isnan(y)
        d = np.abs(x - y)
        d[both_nan] = 0.0
        out[col] = float(np.nanmax(d)) if len(d) else 0.0
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", default="1,2", help="comma list of Ray worker counts (GPUs on cuda)")
    ap.add_argument("--methods", default="base,fast-sam3d")
    ap.add_argument("--limit", type=int, default=None, help="objects of the sweep (default: all 20)")
    ap.add_argument("--scene-limit", type=int, default=None, help="objects of the scene (default: all 12)")
    ap.add_argument("--scene-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="sam3d-mini")
    ap.add_argument("--plain-threads", type=int, default=1,
                    help="torch CPU threads of the plain harness; 1 = what a Ray actor (num_cpus=1) gets, so the "
                         "comparison is like for like (torch's default of one per core made the CPU-side mesh "
                         "extraction 4.6x slower on the 32-core GPU host)")
    ap.add_argument("--out", default="runs/scale_ray")
    args = ap.parse_args()
    for flag in ("limit", "scene_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.scene_repeats < 1:
        raise SystemExit(f"--scene-repeats must be >= 1, got {args.scene_repeats}")
    if args.plain_threads < 1:
        raise SystemExit(f"--plain-threads must be >= 1, got {args.plain_threads}")
    torch.set_num_threads(args.plain_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    objects = list(load_shipped_samples(DATA / "objects"))[: args.limit]
    scene = list(load_shipped_samples(DATA / "scene"))[: args.scene_limit]
    names = [m for m in args.methods.split(",") if m]
    methods = {m: (lambda m=m: make_method(m)) for m in names}
    factory = CliPipeFactory(weights=args.weights)
    use_gpu = args.device.startswith("cuda")
    rows: list[dict] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    # 1. plain harness in this process
    pipe = factory(args.device)
    run_one(pipe, objects[0], None, args.seed)  # warm-up (kernels, allocator)
    sync(args.device)
    t0 = time.perf_counter()
    plain = evaluate(pipe, objects, methods, out / "plain", seed=args.seed, progress=False)
    sync(args.device)
    plain_wall = time.perf_counter() - t0
    pairs = len(objects) * len(methods)
    rows.append(dict(harness="plain", workers=1, pairs=pairs, eval_wall_s=plain_wall, pairs_per_s=pairs / plain_wall))
    log(f"plain: {pairs} pairs in {plain_wall:.1f} s")

    # scene in this process (one device): batched and object by object
    for batch in (True, False):
        reconstruct_scene(pipe, scene, args.seed, batch=batch)  # warm-up of this path
        times = [reconstruct_scene(pipe, scene, args.seed, batch=batch).timings["total"]
                 for _ in range(args.scene_repeats)]
        rows.append(dict(harness="plain", workers=1, scene=f"{len(scene)} objects, "
                         f"{'batched' if batch else 'per object'}", scene_total_s=statistics.median(times)))
        log(f"plain scene batch={batch}: {statistics.median(times):.2f} s")
    del pipe
    if use_gpu:
        torch.cuda.empty_cache()

    diffs = {}
    for w in [int(x) for x in args.workers.split(",")]:
        t_init = time.perf_counter()
        with ReplicaPool(factory, num_workers=w, use_gpu=use_gpu) as pool:
            if pool.num_workers != w:
                raise SystemExit(f"asked for {w} workers, the Ray cluster gave {pool.num_workers}")
            pool.broadcast("warmup", objects[0], args.seed)
            init_s = time.perf_counter() - t_init
            table = evaluate_ray(None, objects, methods, out / f"ray{w}", seed=args.seed, pool=pool, progress=False)
            wall = table.attrs["wall_s"]
            diffs[w] = quality_diff(plain, table)
            rows.append(dict(harness="ray", workers=w, pairs=pairs, eval_wall_s=wall, pairs_per_s=pairs / wall,
                             pool_start_and_warmup_s=init_s, retries=table.attrs["retries"],
                             max_quality_diff=max(diffs[w].values(), default=0.0)))
            log(f"ray x{w}: {pairs} pairs in {wall:.1f} s (pool start + warm-up {init_s:.1f} s), "
                f"max quality diff vs plain {rows[-1]['max_quality_diff']:.3g}")
            reconstruct_scene_split(pool, scene, args.seed)  # warm-up of the scene path on every replica
            times = [reconstruct_scene_split(pool, scene, args.seed)["time_total"] for _ in range(args.scene_repeats)]
            rows.append(dict(harness="ray", workers=w, scene=f"{len(scene)} objects, batched per worker",
                             scene_total_s=statistics.median(times)))
            log(f"ray x{w} scene: {statistics.median(times):.2f} s")

    df = pd.DataFrame(rows)
    df.to_csv(out / "scale_ray.csv", index=False)
    ev = df[df.eval_wall_s.notna()].copy() if "eval_wall_s" in df else df.iloc[:0]
    one = ev[(ev.harness == "ray") & (ev.workers == 1)]["eval_wall_s"]
    if len(one):
        ev["speedup_vs_ray1"] = float(one.iloc[0]) / ev["eval_wall_s"]
    ev["overhead_vs_plain"] = ev["eval_wall_s"] / plain_wall - 1
    ev = ev[[c for c in ("harness", "workers", "pairs", "eval_wall_s", "pairs_per_s", "speedup_vs_ray1",
                         "overhead_vs_plain", "pool_start_and_warmup_s", "retries", "max_quality_diff") if c in ev]]
    sc = df[df.scene_total_s.notna()][["harness", "workers", "scene", "scene_total_s"]] if "scene_total_s" in df else df.iloc[:0]
    device = torch.cuda.get_device_name() if use_gpu else "cpu"
    ngpu = torch.cuda.device_count() if use_gpu else 0
    import ray
    meta = {"device": device, "gpus": ngpu, "torch": torch.__version__, "ray": ray.__version__, "weights": args.weights,
            "plain_threads": args.plain_threads,
            "objects": [s.name for s in objects], "scene": [s.name for s in scene], "methods": names,
            "seed": args.seed, "quality_diffs": {str(k): v for k, v in diffs.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    fmt = lambda d: d.to_string(index=False, float_format=lambda x: f"{x:.3f}")  # noqa: E731 (no tabulate there)
    text = "\n".join([
        f"# Ray scale-out on {ngpu} x {device}" if use_gpu else "# Ray scale-out on CPU workers",
        f"sam3d-mini, {len(objects)} YCB objects x methods {names} (seed {args.seed}); scene of {len(scene)} objects;"
        f" medians of {args.scene_repeats} scene runs after a warm-up. torch {torch.__version__}, ray {ray.__version__}.",
        "", "## Evaluation sweep", "", "```", fmt(ev), "```", "",
        "Quality columns, Ray vs plain (max |diff| per metric): "
        + "; ".join(f"x{w}: {max(d.values(), default=0.0):.3g}" for w, d in diffs.items()), "",
        "## One scene", "", "```", fmt(sc), "```", ""])
    (out / "scale_ray.md").write_text(text)
    log(text)


if __name__ == "__main__":
    sys.exit(main())
