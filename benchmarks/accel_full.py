"""Per-object speedup of every method at true scale: ``full`` config on one GPU, decisions replayed
from sam3d-mini runs on the same YCB objects (``benchmarks/record_decisions.py``).

For each object the SLaT and decoder stages run on the real 64^3 surface voxels of that YCB scan
(``benchmarks/data/ycb_shipped_surface_coords_r64.npz``); the SS stage runs the full sampler. Each
method replays its recorded decisions (steps computed, fraction of tokens, aggregation S) through
:func:`fs3d_accel.accel.replay.replay_accelerator`. Same process, same inputs, CUDA events, one
global warm-up, medians of ``--repeats``. The decode column is the mesh-decoder network (mesh
extraction runs on the CPU and is not part of any method's change).

    python benchmarks/accel_full.py --traces benchmarks/results/decisions_mini.json --out runs/accel_full
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from fs3d_accel.accel.replay import load_traces, replay_accelerator
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.seams import SparseTokens, TransformContext
from fs3d_accel.stages.options import RunOptions

from stage_latency import SHORT, _markdown, synthetic_inputs, variant_label, variant_options

COORDS = Path(__file__).parent / "data" / "ycb_shipped_surface_coords_r64.npz"


def cuda_time(fn, device):
    if device.type != "cuda":
        import time
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    out = fn()
    b.record()
    torch.cuda.synchronize()
    return out, a.elapsed_time(b) / 1000


def run_object(pipe, inputs, coords, seed=0):
    """(ss, slat, decode-network) seconds for the pipeline's current accelerator."""
    dev = pipe.device
    ss, t_ss = cuda_time(lambda: pipe.run_ss(inputs, seed=seed), dev)
    ss = dataclasses.replace(ss, coords=coords, resolution=pipe.config.slat_flow.resolution)
    slat, t_slat = cuda_time(lambda: pipe.run_slat(inputs, ss, seed=seed), dev)

    def decode():
        tokens = SparseTokens(coords=slat.coords, resolution=slat.resolution, feats=slat.slat)
        if pipe.accel.decoder_transform is not None:
            tokens, _ = pipe.accel.decoder_transform.reduce(
                tokens, TransformContext(mask=inputs.mask_full, occupancy_logits=ss.occupancy_logits))
        dtype = pipe.options.compute_dtype(dev)
        with torch.no_grad(), pipe.options.network_context(dev, "decode"):
            return pipe.decode.decoder(tokens.feats.to(dtype), tokens.coords.to(torch.int32))

    _, t_dec = cuda_time(decode, dev)
    return t_ss, t_slat, t_dec, int(slat.coords.shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="benchmarks/results/decisions_mini.json")
    ap.add_argument("--config", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variant", default="bf16-cfg-kv", help=f"run options, one of {sorted(SHORT)}, optionally with FA4 tiles: "
                                                         "NAME@SITE=TILES[+SITE=TILES]")
    ap.add_argument("--objects", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--object-warmup", type=int, default=1,
                    help="untimed runs of each (object, method) before its timed repeats: first use of new "
                         "shapes (attention plans, allocator growth) is not charged to one method")
    ap.add_argument("--out", default="runs/accel_full")
    args = ap.parse_args()
    if args.object_warmup < 0 or args.repeats < 1:
        raise SystemExit(f"--object-warmup must be >= 0 and --repeats >= 1, got {args.object_warmup} and {args.repeats}")
    try:
        opts: RunOptions = variant_options(args.variant)
    except ValueError as exc:
        raise SystemExit(f"--variant: {exc}") from None
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_config(args.config, seed=0, device="cpu")
    if opts.weight_dtype != torch.float32:
        pipe = pipe.to(opts.weight_dtype)
    pipe = pipe.to(dev)
    pipe.options = opts
    traces = load_traces(args.traces)
    all_coords = np.load(COORDS)
    res = pipe.config.slat_flow.resolution
    objects = [o for o in dict.fromkeys(t.object for t in traces) if o in all_coords.files][: args.objects]
    img, mask, pm = synthetic_inputs(pipe.config.image_size)
    inputs = pipe.prepare(img, mask, pm).to(dev)

    def coords_of(name):
        xyz = torch.from_numpy(all_coords[name].astype(np.int64))
        if res != 64:
            xyz = torch.unique(xyz * res // 64, dim=0)
        return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(torch.int32).to(dev)

    import pandas as pd
    rows = []
    with torch.no_grad():
        pipe.with_accel(None)
        run_object(pipe, inputs, coords_of(objects[0]))  # global warm-up
        for obj in objects:
            coords = coords_of(obj)
            for trace in [t for t in traces if t.object == obj]:
                pipe.with_accel(replay_accelerator(trace))
                for _ in range(args.object_warmup):
                    run_object(pipe, inputs, coords)
                times = [run_object(pipe, inputs, coords) for _ in range(args.repeats)]
                med = [statistics.median(x[i] for x in times) for i in range(3)]
                rows.append(dict(object=obj, method=trace.method, N=int(coords.shape[0]), slat_tokens=times[0][3],
                                 ss_full_steps=sum(d == "computed" for d, _ in trace.ss),
                                 slat_full_steps=sum(d in ("computed", "carved") for d, _ in trace.slat),
                                 time_ss=med[0], time_slat=med[1], time_decode_net=med[2], time_total=sum(med)))
                print(f"{obj:22s} {trace.method:22s} " + " ".join(f"{v:.3f}" for v in med), flush=True)
            pd.DataFrame(rows).to_csv(out / "accel_full_partial.csv", index=False)  # a killed run keeps its rows
        pipe.with_accel(None)

    df = pd.DataFrame(rows)
    base = df[df.method == "base"].set_index("object")["time_total"]
    df["speedup"] = df["object"].map(base) / df["time_total"]
    df.to_csv(out / "accel_full.csv", index=False)
    summary = df.groupby("method", sort=False)[["time_ss", "time_slat", "time_decode_net", "time_total", "speedup"]].mean()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    meta = {"device": device_name, "config": args.config, "options": dataclasses.asdict(opts),
            "objects": objects, "repeats": args.repeats, "torch": torch.__version__}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    text = "\n".join([f"# Per-object speedup at `{args.config}` scale on **{device_name}**",
                      f"Run options: {variant_label(args.variant)}; decisions replayed from sam3d-mini; objects: {objects};"
                      f" medians of {args.repeats} after a global warm-up and {args.object_warmup} untimed run(s) per (object, method); seconds.", "", _markdown(summary), ""])
    (out / "accel_full.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
