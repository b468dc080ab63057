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
``benchmarks/synthetic_scene.py`` (numpy only, so an old package version can run it too). It also prints how many
CUDA graphs inductor recorded during the timed calls: 0 when the compiled flow only replays (session 10 found 9 in 5
calls before the SS stage held its K/V at stable addresses). ``--save`` keeps the last call's SS latents and occupancy
logits, ``--compare-with`` says whether another version's saved outputs are bit-identical to this version's (for
changes meant to leave every value unchanged). That comparison means something
only where both versions build the same random weights from the seed and one version gives the same bits from one
process to the next: run the old version twice first (``--save`` then ``--compare-with``) as the control::

    PYTHONPATH=$PWD/old:$PWD python benchmarks/ss_stage_time.py --save /tmp/old.pt
    PYTHONPATH=$PWD python benchmarks/ss_stage_time.py --compare-with /tmp/old.pt
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from synthetic_scene import synthetic_inputs  # benchmarks/, this script's folder (first on sys.path)

import fs3d_accel
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions
from fs3d_analysis.profile.latency import cuda_graph_recordings

OPTIONS = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                     collapse_zero_cond=True, compile_mode="reduce-overhead")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--save", type=Path, default=None,
                    help="write the last call's SS latents and occupancy logits here (torch.save)")
    ap.add_argument("--compare-with", type=Path, default=None,
                    help="a --save file of another version: print whether this version's outputs are bit-identical")
    args = ap.parse_args(argv)
    # checked before minutes of GPU time, not after
    if args.compare_with is not None and not args.compare_with.is_file():
        raise SystemExit(f"--compare-with: no file {args.compare_with} (write one with --save)")
    if args.save is not None and not args.save.parent.is_dir():
        raise SystemExit(f"--save: folder {args.save.parent} does not exist")
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
        recorded_before = cuda_graph_recordings()
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = pipe.run_ss(inp, seed=0)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000)
    recorded = cuda_graph_recordings() - recorded_before
    print(f"{fs3d_accel.__file__} on {torch.cuda.get_device_name()}: SS stage median {statistics.median(times):.4f} s, "
          f"min {min(times):.4f} s over {args.repeats}; {recorded} CUDA graphs recorded during the timed calls",
          flush=True)
    outputs = ss_outputs(out)
    if args.compare_with is not None:  # before --save: the same path for both compares the file with itself
        print(compare(outputs, torch.load(args.compare_with)), flush=True)
    if args.save is not None:
        torch.save(outputs, args.save)


def ss_outputs(out) -> dict[str, torch.Tensor]:
    """The SS stage's numeric outputs on the CPU: every latent and the occupancy logits."""
    tensors = {f"latents.{k}": v for k, v in out.latents.items()}
    tensors["occupancy_logits"] = out.occupancy_logits
    return {k: v.detach().float().cpu() for k, v in tensors.items()}


def compare(mine: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> str:
    """One line per output: bit-identical, or the largest absolute difference (and any key or shape mismatch)."""
    lines = []
    for k in sorted(set(mine) | set(other)):
        if k not in mine or k not in other:
            lines.append(f"{k}: only in {'this version' if k in mine else 'the other version'}")
        elif mine[k].shape != other[k].shape or mine[k].dtype != other[k].dtype:
            lines.append(f"{k}: {tuple(mine[k].shape)} {mine[k].dtype} here, {tuple(other[k].shape)} "
                         f"{other[k].dtype} there")
        elif torch.equal(mine[k].view(torch.int32), other[k].view(torch.int32)):  # bits (fp32): -0.0 vs 0.0, NaNs
            lines.append(f"{k}: bit-identical")
        else:
            lines.append(f"{k}: max abs diff {float((mine[k] - other[k]).abs().max()):.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
