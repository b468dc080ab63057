"""Which sparse-conv algorithm is fastest at each submanifold conv of the SLaT flow and the mesh decoder?

The gathers of the "gather" algorithm were 59% of the mesh decoder's and 13% of the SLaT sampler's GPU time on the
H100 (``results/base_vs_official_h100/session7``). This runs one real pass of each network (``--config``, random
weights with the zero-initialised layers filled in, the surface voxels of one YCB scan; the SLaT pass as the
sampler batches the CFG pair: 2 x N rows), records the input of every ``SparseConv3d`` call, and times each
algorithm on exactly those inputs: "gather",
"transform" and "implicit" (the Triton implicit-GEMM kernel, ``fs3d_accel/model/sparse_conv_triton.py``), its tiled
variants "implicit-flat", "implicit-skip" and "implicit-skip-nested" (rows sorted by their neighbours, each tile of
rows skipping the offsets none of its rows has; with the share of work they skip and the cost of their layout), plus
what "auto" picks (``--impls`` picks a subset). On CUDA, ``<algorithm>_ms`` is the kernel time without the host's
launch work: the call replayed from a CUDA graph of many calls (``triton.testing.do_bench_cudagraph``, median), as the
samplers replay their graphs; ``<algorithm>_call_ms`` is one call timed from the host between CUDA events after
warm-up (median), which includes the Python and launch work of the call whenever that outlasts the kernel. Runs before
session 23 have only the second, under the name ``<algorithm>_ms``: the SLaT pass's convs (0.2-1 ms each) read
3.14-3.35 ms where session 22's profiler bounds their kernels in the sampler at 2.98 ms (about 2.06 ms). The implicit kernel autotunes its tiles on the first call
(timed apart, as ``<algorithm>_first_s``). The inputs are recorded with "gather", so that column is a process's
first call only for "transform" and "implicit": the implicit kernel's shows its tile tuning or, in a later process
on the same machine, whether the on-disk autotune cache spared it (one tuning per channel pair: the first conv of
each pair carries it).
Each output is compared with the fp32 "gather" result on fp32 copies of the same input and weights.

    python benchmarks/sparse_conv_kernels.py --out runs/sparse_conv               # GPU, full config
    TRITON_INTERPRET=1 python benchmarks/sparse_conv_kernels.py --config mini --device cpu --max-voxels 300 \\
        --repeats 1 --warmup 0 --out /tmp/sc                                       # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.stage_latency import Timer, _markdown, load_coords  # noqa: E402
from fs3d_accel.model.random_weights import perturb_zero_inits  # noqa: E402
from fs3d_accel.model.sparse import (TRITON_CONV_IMPLS, SparseConv3d, SparseTensor, neighbour_table,  # noqa: E402
                                     neighbour_tiles, use_conv_impl)
from fs3d_accel.model.sparse_conv_triton import TILE_ROWS, triton_unavailable, tuned_choices  # noqa: E402
from fs3d_accel.model.sparse_conv_triton import neighbour_tiles as tiles_layout  # noqa: E402
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_analysis.profile.latency import sync_device  # noqa: E402

IMPLS = ("gather", "transform", "implicit", "implicit-flat", "implicit-skip", "implicit-skip-nested")


def capture_conv_inputs(run, model: torch.nn.Module) -> list[tuple[str, SparseConv3d, SparseTensor]]:
    """(module name, conv, input) of every ``SparseConv3d`` call while ``run()`` runs; hooks removed after."""
    calls: list[tuple[str, SparseConv3d, SparseTensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, _n=name: calls.append((_n, mod, args[0])))
               for name, m in model.named_modules() if isinstance(m, SparseConv3d) and m.kernel_size > 1]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def run_conv(conv: SparseConv3d, x: SparseTensor, impl: str) -> torch.Tensor:
    """``conv(x)`` with algorithm ``impl``; the conv's own ``impl`` (instance or class attribute) comes back after."""
    own = conv.__dict__.get("impl")
    conv.impl = impl
    try:
        return conv(x).feats
    finally:
        if own is None:
            del conv.impl  # back to the class attribute (e.g. a --conv-impl choice)
        else:
            conv.impl = own


#: how long (ms) the CUDA graph of repeated calls that times one algorithm runs (``do_bench_cudagraph``'s ``rep``)
GRAPH_REP_MS = 40


def kernel_seconds(fn, device: torch.device, call_s: float) -> float:
    """GPU time of one ``fn()`` without the host's launch work: on CUDA, replayed from a CUDA graph of repeated calls
    (median; ``fn`` must be capturable, so its tables and autotuning must exist already); elsewhere ``call_s``, the
    host-timed call (a CPU has no launch to hide)."""
    if device.type != "cuda":
        return call_s
    from triton.testing import do_bench_cudagraph
    with torch.cuda.device(device):
        return do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median") / 1e3


def measure(network: str, calls, timer: Timer, impls: tuple[str, ...]) -> list[dict]:
    rows = []
    for name, conv, x in calls:
        n, k3 = len(x), conv.kernel_size ** 3
        flops = 2.0 * n * k3 * conv.in_channels * conv.out_channels
        ref_conv = SparseConv3d(conv.in_channels, conv.out_channels, conv.kernel_size).to(x.feats.device)
        ref_conv.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
        with torch.no_grad():
            ref = run_conv(ref_conv, x.replace(x.feats.float()), "gather")
            row = dict(network=network, module=name, rows=n, c_in=conv.in_channels, c_out=conv.out_channels,
                       gflop=flops / 1e9, auto=conv.algorithm(x.feats.device, dtype=x.feats.dtype),
                       before=conv.algorithm(x.feats.device, dtype=x.feats.dtype, impl="gather-or-transform"))
            outs = {}
            for impl in impls:
                sync_device(x.feats.device)
                start = time.perf_counter()
                out = outs[impl] = run_conv(conv, x, impl)  # first call: autotuning / table building, timed apart
                sync_device(x.feats.device)
                row[f"{impl}_first_s"] = time.perf_counter() - start
                row[f"{impl}_err"] = float((out.float() - ref).abs().max())
                call_s = timer(lambda: run_conv(conv, x, impl))["median_s"]
                t = kernel_seconds(lambda: run_conv(conv, x, impl), x.feats.device, call_s)
                row[f"{impl}_ms"] = 1e3 * t
                row[f"{impl}_call_ms"] = 1e3 * call_s
                row[f"{impl}_tflops"] = flops / t / 1e12
            for impl in ("implicit-flat", "implicit-skip", "implicit-skip-nested"):
                if impl in outs and "implicit" in outs:
                    # the tiled kernels sum the same products in the same offset order: equal up to the tile shapes
                    row[f"{impl}_vs_implicit"] = float((outs[impl].float() - outs["implicit"].float()).abs().max())
            if "implicit-skip" in impls:
                tiles = neighbour_tiles(x, conv.kernel_size, skip=True)
                for h in TILE_ROWS:  # share of (tile, offset) pairs the skipping kernel runs
                    row[f"skip_work_{h}"] = float(tiles.work_fraction(h))
                # building the layout, once per coordinate set and kernel size (the timed calls reuse it, as the
                # timed implicit calls reuse the neighbour table)
                table = neighbour_table(x, conv.kernel_size)
                row["skip_layout_ms"] = 1e3 * timer(lambda: tiles_layout(table, skip=True))["median_s"]
                row["rows_with_neighbour"] = float((table < len(x)).float().mean())
        ms = {i: row[f"{i}_ms"] for i in impls}
        row["fastest"] = min(ms, key=ms.get)
        row["auto_ms"] = ms.get(row["auto"], float("nan"))
        row["before_ms"] = ms.get(row["before"], float("nan"))  # NaN where --impls left it out
        rows.append(row)
        print(f"{network} {name}: " + ", ".join(f"{i} {ms[i]:.3f} ms (first call {row[f'{i}_first_s']:.2f} s)"
                                                for i in impls), flush=True)
    return rows


def summary(df, impls: tuple[str, ...]):
    """Per network: the summed conv time of one pass with each algorithm, with "auto", with the "auto" rule before
    session 8 (gather-or-transform) and with the fastest per call."""
    import pandas as pd
    out = []
    for net, g in df.groupby("network", sort=False):
        row = {"network": net, "convs": len(g)}
        row.update({f"{i} (ms)": g[f"{i}_ms"].sum() for i in impls})
        row["auto (ms)"] = g["auto_ms"].sum(skipna=False)
        row["gather-or-transform (ms)"] = g["before_ms"].sum(skipna=False)
        row["fastest per call (ms)"] = g[[f"{i}_ms" for i in impls]].min(axis=1).sum()
        out.append(row)
    return pd.DataFrame(out)


def plot(df, impls: tuple[str, ...], path: Path, title: str) -> None:
    """Milliseconds per conv call and algorithm (log scale), one panel per network."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    long = df.melt(id_vars=["network", "module", "rows", "c_in", "c_out"], value_vars=[f"{i}_ms" for i in impls],
                   var_name="algorithm", value_name="ms")
    long["algorithm"] = long["algorithm"].str.removesuffix("_ms")
    long["conv"] = (long["module"] + "\n" + long["rows"].astype(str) + " rows, " + long["c_in"].astype(str) + "->"
                    + long["c_out"].astype(str))
    nets = list(dict.fromkeys(long["network"]))
    widths = [long[long.network == n]["conv"].nunique() for n in nets]  # panel width ~ its number of convs
    fig, axes = plt.subplots(1, len(nets), figsize=(3 + 1.3 * sum(widths), 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, net in zip(axes[0], nets):
        sns.barplot(data=long[long.network == net], x="conv", y="ms", hue="algorithm", hue_order=list(impls), ax=ax)
        ax.set_yscale("log")
        ax.set_title(net)
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--object", default="007_tuna_fish_can", help="YCB scan whose surface voxels are used")
    ap.add_argument("--max-voxels", type=int, default=None, help="keep the first this many voxels (smoke tests)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/sparse_conv"))
    ap.add_argument("--replot", type=Path, default=None, help="redraw the figure of a finished run's folder (no GPU)")
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help=f"comma-separated algorithms to time, of {', '.join(IMPLS)} (default: all)")
    args = ap.parse_args(argv)
    chosen = tuple(i.strip() for i in args.impls.split(","))
    if not chosen or any(i not in IMPLS for i in chosen) or len(set(chosen)) != len(chosen):
        raise SystemExit(f"--impls must name distinct algorithms of {IMPLS}, got {args.impls!r}")
    if args.max_voxels is not None and args.max_voxels < 1:
        raise SystemExit(f"--max-voxels must be >= 1, got {args.max_voxels}")
    if args.warmup < 0 or args.repeats < 1:
        raise SystemExit(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup}, {args.repeats}")
    import pandas as pd
    if args.replot is not None:
        df = pd.read_csv(args.replot / "sparse_conv_kernels.csv")
        meta = json.loads((args.replot / "meta.json").read_text())
        plot(df, tuple(i for i in IMPLS if f"{i}_ms" in df), args.replot / "sparse_conv_kernels.png",
             _title(meta))
        return

    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    why = triton_unavailable(dev)
    impls = chosen if why is None else tuple(i for i in chosen if i not in TRITON_CONV_IMPLS)
    if not impls:
        raise SystemExit(f"--impls: none of {chosen} can run here ({why})")
    if why is not None:
        print(f"implicit-GEMM conv not timed: {why}", flush=True)
    pipe = Pipeline.from_config(args.config, seed=0, device="cpu")
    perturb_zero_inits(pipe)  # else every res-block's second conv is zero and its error column says nothing
    pipe = pipe.to(dtype).to(dev)
    coords = load_coords(pipe.config.slat_flow.resolution, dev)
    if args.object not in coords:
        raise SystemExit(f"--object: {args.object!r} not in the coordinate file (has {sorted(coords)})")
    c = coords[args.object][: args.max_voxels]
    n = len(c)
    c_pair = torch.cat([c, torch.cat([torch.ones_like(c[:, :1]), c[:, 1:]], 1)])  # the CFG pair, batch rows 0 and 1
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 64, pipe.config.slat_flow.cond_channels, generator=g).to(dev, dtype)
    tt = torch.full((2,), 500.0, device=dev)
    timer = Timer(dev, args.warmup, args.repeats)
    rows = []
    with torch.no_grad(), use_conv_impl("gather"):
        # the inputs are recorded with the gather conv, so that each algorithm's first call in this process happens
        # in measure(): the implicit kernel's ``implicit_first_s`` then shows its tile tuning (first process on a
        # machine, first conv of each channel pair) or the on-disk autotune cache at work (later processes)
        slat_calls = capture_conv_inputs(
            lambda: pipe.slat.flow(torch.randn(2 * n, 8, generator=g).to(dev, dtype), c_pair, tt, cond), pipe.slat.flow)
        dec_calls = capture_conv_inputs(
            lambda: pipe.decode.decoder(torch.randn(n, 8, generator=g).to(dev, dtype), c), pipe.decode.decoder)
    with torch.no_grad():
        rows += measure("SLaT flow, CFG pair", slat_calls, timer, impls)
        rows += measure("mesh decoder", dec_calls, timer, impls)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "sparse_conv_kernels.csv", index=False)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "config": args.config, "dtype": args.dtype,
            "object": args.object, "voxels": n, "warmup": args.warmup, "repeats": args.repeats,
            "implicit": why or "timed",
            "timing": ("`<algorithm>_ms`: " + (f"kernel time, triton.testing.do_bench_cudagraph (rep {GRAPH_REP_MS} ms, "
                                                "median)" if dev.type == "cuda" else "the host-timed call")
                       + f"; `<algorithm>_call_ms`: one call from the host, {args.warmup} warm-up, median of "
                         f"{args.repeats}"),
            # which tile shape each channel pair's autotuning chose (configs in sparse_conv_triton._CUDA_*CONFIGS)
            "autotune_choices": tuned_choices()}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    cols = ["network", "module", "rows", "c_in", "c_out", "auto", "before"] + [f"{i}_ms" for i in impls] + \
           [f"{i}_call_ms" for i in impls] + [f"{i}_tflops" for i in impls] + ["fastest"] + \
           [f"{i}_err" for i in impls] + \
           [c for c in df.columns if c.endswith("_vs_implicit") or c.startswith("skip_work_")
                                   or c in ("rows_with_neighbour", "skip_layout_ms")]
    text = "\n".join([
        "# Sparse-conv algorithms at each conv of one pass (`benchmarks/sparse_conv_kernels.py`)", "",
        f"Device **{device_name}**, torch {torch.__version__}, `{args.config}` config, {args.dtype}, {args.object} "
        f"(N = {n} voxels; the SLaT pass holds the CFG pair, 2N rows at 64^3). `*_ms`: kernel time, the call replayed "
        f"from a CUDA graph of repeated calls (median; on a CPU the host-timed call); `*_call_ms`: one call timed from "
        f"the host, CUDA events, {args.warmup} warm-up, median of {args.repeats}. `*_err`: largest |difference| from "
        f"the fp32 gather result; `*_vs_implicit`: from the implicit kernel's; `skip_work_<rows>`: the share of (tile, offset) pairs implicit-skip runs at that tile "
        f"height; `rows_with_neighbour`: the share of (row, offset) pairs with a neighbour. Implicit GEMM: "
        f"{meta['implicit']}.", "",
        "## Per network: conv time of one pass", "", _markdown(summary(df, impls)), "",
        "## Per conv call", "", _markdown(df[cols]), ""])
    (args.out / "sparse_conv_kernels.md").write_text(text)
    plot(df, impls, args.out / "sparse_conv_kernels.png", _title(meta))
    print(text)


def _title(meta: dict) -> str:
    return (f"sparse conv per call, one pass each: {meta['device']}, {meta['config']} config, {meta['dtype']}, "
            f"{meta['object']} (N = {meta['voxels']})")


if __name__ == "__main__":
    main()
