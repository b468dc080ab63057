"""Host cost of a cuBLAS GEMM at a token count the process has not met: which calls pay it, and how often.

Session 17's host profile of SLaT calls at new sizes put ~0.16 s of one new 14k object (under cProfile) in the
transformer MLP's first GEMM (tokens x 1024 -> 4096, with or without the GELU epilogue), while the other GEMMs of the
same blocks at the same token count stayed cheap. This script times each call on the host, one at a time (the device synchronised before and
after, so no queue of earlier work can block the launch), over ``--blocks`` distinct weights per shape (as the 24
blocks of a pass) and ``--sizes`` new token counts, each met twice (``repeat``: the second meeting shows what is cached
per process; each op runs at the sizes shifted by 2 rows per op, so that its first meeting is its own). The ops:
``torch.addmm`` (bias + GEMM, as inductor calls it), ``torch._addmm_activation`` with GELU (the
epilogue), and ``torch.mm`` without bias, at the MLP's two shapes and the attention's input projection.

    python benchmarks/gemm_first_call.py --device cuda --out runs/gemm_first_call

Writes ``gemm_first_call.csv`` (one row per call) and ``README.md`` (per op and shape: the first call at each new
size, the later blocks' calls at that size, and the second meeting). CPU runs check the script only.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.stage_latency import checked_device, distinct_counts  # noqa: E402

CSV_NAME = "gemm_first_call.csv"
COLUMNS = ("op", "shape", "meeting", "M", "block", "host_ms", "total_ms")
#: (name, in features, out features): the SLaT blocks' MLP in and out GEMMs and the self-attention's QKV projection
SHAPES = (("mlp.fc1", 1024, 4096), ("mlp.fc2", 4096, 1024), ("attn.qkv", 1024, 3072))


def op_fns(name: str):
    """``fn(x, weight, bias) -> tensor`` of op ``name``."""
    if name == "addmm":
        return lambda x, w, b: torch.addmm(b, x, w.t())
    if name == "addmm-gelu":
        return lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    if name == "mm":
        return lambda x, w, b: torch.mm(x, w.t())
    raise ValueError(f"unknown op {name!r}; choose addmm, addmm-gelu or mm")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_call(fn, args, dev: torch.device) -> tuple[float, float]:
    """(host ms of the call alone, ms until the device finished it), the device idle before it."""
    sync(dev)
    t0 = time.perf_counter()
    fn(*args)
    t1 = time.perf_counter()
    sync(dev)
    return 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ops", default="addmm,addmm-gelu,mm")
    ap.add_argument("--sizes", default="7001,7203,9007,11111,14343", help="new token counts, comma-separated")
    ap.add_argument("--blocks", type=int, default=6, help="distinct weights per shape")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    dev = checked_device(args.device)
    ops = [o for o in args.ops.split(",") if o]
    if not ops or len(set(ops)) != len(ops):
        raise SystemExit(f"--ops: distinct op names, at least one, got {args.ops!r} (a repeated op's rows would merge)")
    for o in ops:
        try:
            op_fns(o)
        except ValueError as e:
            raise SystemExit(f"--ops: {e}") from None
    sizes = distinct_counts(args.sizes, "--sizes")
    shifted = [n + 2 * k for n in sizes for k in range(len(ops))]
    if len(set(shifted)) != len(shifted):
        raise SystemExit(f"--sizes {sizes}: each op runs at the sizes shifted by 2 rows per op, and two would meet; space "
                         f"the sizes further apart")
    if args.blocks < 2:
        raise SystemExit(f"--blocks must be >= 2 (the first call against the later ones), got {args.blocks}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    weights = {name: [((torch.randn(n_out, n_in, generator=gen) * 0.02).to(dev, dtype),
                       torch.zeros(n_out, device=dev, dtype=dtype)) for _ in range(args.blocks)]
               for name, n_in, n_out in SHAPES}
    # warm every op at one size first: the process's first cuBLAS calls (handle, workspace) are not the question
    warm_x = {n_in: torch.randn(512, n_in, device=dev, dtype=dtype) for _, n_in, _ in SHAPES}
    for o in ops:
        for name, n_in, _ in SHAPES:
            op_fns(o)(warm_x[n_in], *weights[name][0])
    sync(dev)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "blas": str(torch.backends.cuda.preferred_blas_library()) if dev.type == "cuda" else "",
            "CUDA_MODULE_LOADING": os.environ.get("CUDA_MODULE_LOADING", "(unset: lazy)"), "sizes": sizes,
            "blocks": args.blocks, "ops": ops}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    rows = []
    with open(args.out / CSV_NAME, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for meeting in (1, 2):
            for base_m in sizes:
                for k, o in enumerate(ops):
                    # each op at counts of its own (shifted by 2 rows per op), so that no op meets a count an earlier
                    # op of the loop has met: the first meeting is the op's own
                    m = base_m + 2 * k
                    xs = {n_in: torch.randn(m, n_in, device=dev, dtype=dtype) for _, n_in, _ in SHAPES}
                    fn = op_fns(o)
                    for name, n_in, _ in SHAPES:
                        for b, (w, bias) in enumerate(weights[name]):
                            host, total = timed_call(fn, (xs[n_in], w, bias), dev)
                            row = {"op": o, "shape": name, "meeting": meeting, "M": m, "block": b,
                                   "host_ms": host, "total_ms": total}
                            rows.append(row)
                            writer.writerow(row)
    lines = ["# Host cost of cuBLAS GEMMs at new token counts (`benchmarks/gemm_first_call.py`)", "",
             f"Device **{meta['device']}**, torch {meta['torch']}, {meta['dtype']}, preferred BLAS {meta['blas']}, "
             f"CUDA_MODULE_LOADING {meta['CUDA_MODULE_LOADING']}. Each call alone (device synchronised before and "
             f"after); {args.blocks} weights per shape; sizes {sizes}, each met twice. Host ms: the call's own time on "
             "the host.", "",
             "| op | shape | meeting | host ms, block 0 (median over sizes) | max | host ms, blocks 1+ (median) | max |",
             "|---|---|---|---|---|---|---|"]
    for o in ops:
        for name, _, _ in SHAPES:
            for meeting in (1, 2):
                sel = [r for r in rows if r["op"] == o and r["shape"] == name and r["meeting"] == meeting]
                first = [r["host_ms"] for r in sel if r["block"] == 0]
                later = [r["host_ms"] for r in sel if r["block"] > 0]
                lines.append(f"| {o} | {name} | {meeting} | {statistics.median(first):.3f} | {max(first):.3f} | "
                             f"{statistics.median(later):.3f} | {max(later):.3f} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
