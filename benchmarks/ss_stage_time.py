"""Time the SS stage of whichever ``fs3d_accel`` comes first on ``PYTHONPATH``: two versions of the code, side by side.

Made for one question (session 8): did a code change slow the compiled SS sampler, or did the machine change? Put an
older version's package in another folder and run this script once per version, on one warm machine::

    git archive 273fa0a fs3d_accel ':!fs3d_accel/weights' | (mkdir -p old && tar x -C old)
    PYTHONPATH=$PWD/old:$PWD python benchmarks/ss_stage_time.py     # the old package
    PYTHONPATH=$PWD python benchmarks/ss_stage_time.py              # this checkout

Full config, bf16, random weights, the synthetic scene of ``stage_latency.py``; ``RunOptions`` of
``compile-all-zkv-ro`` (compiled SS flow under CUDA graphs, batched CFG, condition K/V cache, one-key K/V).
One SS stage call = condition embedding + 25-step sampler + SS decoder + voxel extraction. CUDA events after
``--warmup`` calls (the first compiles), median and minimum of ``--repeats``. The scene comes from
``benchmarks/synthetic_scene.py`` (numpy only, so an old package version can run it too).
"""
from __future__ import annotations

import argparse
import statistics

import torch
from synthetic_scene import synthetic_inputs  # benchmarks/, this script's folder (first on sys.path)

import fs3d_accel
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions

OPTIONS = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                     collapse_zero_cond=True, compile_mode="reduce-overhead")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        raise SystemExit(f"--warmup and --repeats must be >= 1 (the first call compiles), got {args.warmup}, "
                         f"{args.repeats}")
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
