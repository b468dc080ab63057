"""Time the SS stage of whichever ``fs3d_accel`` comes first on ``PYTHONPATH``: two versions of the code, side by side.

Made for one question (session 8): did a code change slow the compiled SS sampler, or did the machine change? Put an
older version's package in another folder and run this script once per version, on one warm machine::

    git archive 273fa0a fs3d_accel ':!fs3d_accel/weights' | (mkdir -p old && tar x -C old)
    PYTHONPATH=$PWD/old:$PWD python benchmarks/ss_stage_time.py     # the old package
    PYTHONPATH=$PWD python benchmarks/ss_stage_time.py              # this checkout

Full config, bf16, random weights, the synthetic scene of ``stage_latency.py``; ``RunOptions`` of
``compile-all-zkv-ro`` (compiled SS flow under CUDA graphs, batched CFG, condition K/V cache, one-key K/V).
One SS stage call = condition embedding + 25-step sampler + SS decoder + voxel extraction. CUDA events after
``--warmup`` calls (the first compiles), median and minimum of ``--repeats``.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

import fs3d_accel
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions

OPTIONS = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                     collapse_zero_cond=True, compile_mode="reduce-overhead")


def synthetic_inputs(size: int = 518, seed: int = 0):
    """The synthetic scene of ``stage_latency.synthetic_inputs``, repeated here: an old package's benchmarks folder
    may not match this one."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = True
    ys, xs = np.mgrid[0:size, 0:size]
    pm = np.stack([(xs - size / 2) / size, (ys - size / 2) / size, np.full((size, size), 2.0)], -1).astype(np.float32)
    return img, mask, pm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ss_stage_time.py times the compiled SS stage on a CUDA device; none is available")
    pipe = Pipeline.from_config("full", seed=0, device="cpu").to(torch.bfloat16).to("cuda")
    pipe.options = OPTIONS
    inp = pipe.prepare(*synthetic_inputs(pipe.config.image_size)).to("cuda")
    times = []
    with torch.no_grad():
        for _ in range(args.warmup):
            pipe.run_ss(inp, seed=0)
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            pipe.run_ss(inp, seed=0)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000)
    print(f"{fs3d_accel.__file__} on {torch.cuda.get_device_name()}: SS stage median {statistics.median(times):.4f} s, "
          f"min {min(times):.4f} s over {args.repeats}", flush=True)


if __name__ == "__main__":
    main()
