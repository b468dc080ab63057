"""Where the GPU time of one network pass goes: torch.profiler kernel tables at true scale.

Cases (``full`` config, bf16 weights, the condition tokens of a synthetic image with their K/V cached,
SLaT structure warmed as the sampler runs it):
one SLaT flow pass at each ``--objects`` voxel set (B = 1 and the CFG pair, B = 2), one SS flow pass
(B = 2), the mesh decoder network on the voxel set, and the decoder after uniform aggregation at
``--scale`` (reduce + network, what Fast-SAM3D's aggregation runs). For each: wall time, summed CUDA
kernel time, and the top kernels by CUDA time, written to ``kernel_profile.md``.

    python benchmarks/kernel_profile.py --out runs/kernel_profile
    python benchmarks/kernel_profile.py --cases slat --compile-slat --objects 007_tuna_fish_can   # compiled torso
    python benchmarks/kernel_profile.py --config mini --device cpu --out /tmp/kp   # smoke test
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fs3d_accel.accel.mesh_aggregation import quantize_tokens
from fs3d_accel.model.sparse import persistent_structure, release_structure
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.seams import SparseTokens
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.ss import ss_noise
from stage_latency import add_conv_args, apply_conv_args, load_coords, synthetic_inputs


CASES = ("slat", "mesh", "aggregation", "ss")


def profile_case(name: str, fn, device: torch.device, top: int) -> list[str]:
    """Warm up, then profile 3 calls; the table lists per-call averages."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts):  # the profiler's own start-up (CUPTI) is slow the first time
        fn()
        sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        sync()
    wall = (time.perf_counter() - t0) / 3
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = [e for e in events if getattr(e, attr, 0) > 0 and (device.type != "cuda" or e.device_type.name == "CUDA")]
    kernels.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in kernels) / 3 / 1e3
    lines = [f"## {name}", "", f"wall per call {wall * 1e3:.1f} ms; summed {'CUDA kernel' if device.type == 'cuda' else 'CPU op'} "
             f"time per call {total:.1f} ms; launches per call {sum(e.count for e in kernels) // 3}", "",
             "| kernel | ms per call | calls per call |", "|---|---|---|"]
    for e in kernels[:top]:
        lines.append(f"| `{e.key[:90]}` | {getattr(e, attr) / 3 / 1e3:.2f} | {e.count // 3} |")
    print("\n".join(lines), flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--objects", default="007_tuna_fish_can,021_bleach_cleanser")
    ap.add_argument("--scale", type=float, default=1.5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    ap.add_argument("--compile-slat", action="store_true",
                    help="SLaT passes through the torch.compile'd transformer torso (RunOptions.compile_slat)")
    add_conv_args(ap)
    ap.add_argument("--out", default="runs/kernel_profile")
    args = ap.parse_args()
    cases = args.cases.split(",")
    if sorted(set(cases) - set(CASES)):
        raise SystemExit(f"--cases: unknown {sorted(set(cases) - set(CASES))}; choose from {list(CASES)}")
    apply_conv_args(args)
    if args.scale < 1:
        raise SystemExit(f"--scale is an aggregation factor S >= 1, got {args.scale}")
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16
    pipe = Pipeline.from_config(args.config, seed=0, device="cpu").to(dtype).to(dev)
    cfg = pipe.config
    coords = load_coords(cfg.slat_flow.resolution, dev)
    unknown = sorted(set(args.objects.split(",")) - set(coords))
    if unknown:
        raise SystemExit(f"--objects: {unknown} not in the coordinate file (has {sorted(coords)})")
    g = torch.Generator(device="cpu").manual_seed(0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [f"# Kernel profile, config `{args.config}`, {name}, torch {torch.__version__}", ""]
    with torch.no_grad():
        # the real condition tokens of a synthetic image (SS 7,528 and SLaT 5,496 at full size): the
        # cross-attention cost depends on their number (runs before session 5 used 64 random tokens)
        inputs = pipe.prepare(*synthetic_inputs(cfg.image_size, seed=0)).to(dev)
        slat_cond = pipe.slat.condition(**{k: v.to(dtype) for k, v in inputs.slat_kwargs().items()})
        cond = torch.cat([slat_cond, slat_cond * 0], 0)
        lines += [f"Condition tokens: SLaT {slat_cond.shape[1]}, from the condition fuser on a synthetic image.", ""]
        kv2, kv1 = pipe.slat.flow.precompute_cond_kv(cond), pipe.slat.flow.precompute_cond_kv(cond[:1])
        torso = None
        if args.compile_slat:
            opts = RunOptions(precision="bf16", compile_slat=True)
            try:
                opts.check_device(dev)
            except ValueError as e:
                raise SystemExit(f"--compile-slat: {e}") from None
            torso = pipe.slat.compiled_torso(opts)  # the same compiled torso the sampler uses
            kv2, kv1 = opts.compiled_region_inputs((kv2, kv1))
            lines += ["SLaT passes run the transformer blocks through `torch.compile(dense_torso)` "
                      "(`RunOptions.compile_slat`).", ""]
        for obj in args.objects.split(","):
            c = coords[obj]
            n = c.shape[0]
            c2 = torch.cat([c, c + torch.tensor([1, 0, 0, 0], device=dev, dtype=c.dtype)], 0)
            f = torch.randn(n, cfg.slat_flow.in_channels, generator=g).to(dev, dtype)
            for b, cc, kv in ((1, c, kv1), (2, c2, kv2)) if "slat" in cases else ():
                st = persistent_structure()
                tt = torch.full((b,), 500.0, device=dev)
                ff = f if b == 1 else torch.cat([f, f], 0)
                lines += profile_case(f"SLaT flow pass, {obj} (N = {n}), B = {b}",
                                      lambda: pipe.slat.flow(ff, cc, tt, None, cond_kv=kv, structure=st, torso=torso),
                                      dev, args.top)
                release_structure(st)
            feats = torch.randn(n, cfg.slat_flow.in_channels, generator=g).to(dev, dtype)
            if "mesh" in cases:
                lines += profile_case(f"mesh decoder network, {obj} (N = {n})",
                                      lambda: pipe.decode.decoder(feats, c), dev, args.top)

            def aggregated():
                tok = quantize_tokens(SparseTokens(coords=c, resolution=cfg.slat_flow.resolution, feats=feats), args.scale)
                return pipe.decode.decoder(tok.feats, tok.coords.to(torch.int32))

            if "aggregation" in cases:
                lines += profile_case(f"aggregation S = {args.scale} + mesh decoder network, {obj}", aggregated,
                                      dev, args.top)
        if "ss" not in cases:
            (out / "kernel_profile.md").write_text("\n".join(lines) + "\n")
            return
        ss_cond = pipe.ss.condition(**{k: v.to(dtype) for k, v in inputs.ss_kwargs().items()})
        ss_cond = torch.cat([ss_cond, ss_cond * 0], 0)
        ss_kv = pipe.ss.flow.precompute_cond_kv(ss_cond)
        lat = {k: torch.cat([v, v], 0).to(dev, dtype) for k, v in ss_noise(cfg, g).items()}
        tt = torch.full((2,), 500.0, device=dev)
        d = torch.zeros(2, device=dev)
        lines += profile_case("SS flow pass, B = 2", lambda: pipe.ss.flow(lat, tt, ss_cond, d, cond_kv=ss_kv), dev, args.top)
    (out / "kernel_profile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
