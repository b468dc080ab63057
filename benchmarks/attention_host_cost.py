"""Host time per attention call, issued eagerly and recorded into a CUDA graph, per call path.

Why: SLaT's kernels alone reach 55% of the executed FLOPs at 14k voxels on the H100 (session 20), the call ~51%: the
rest is the GPU waiting while the host records each object's graphs (``results/base_vs_official_h100/session20/``).
cProfile of one recording (session 19, ``results/slat_host_profile_h100/session19/repeat/``) put the
FlashAttention-4 call path, our ``fs3d::flash_attn_cute`` custom op around ``flash_attn.cute``, at ~0.33 ms per call
of torch's custom-op wrapper alone (96 calls per object), inflated by the profiler by an unknown factor. This
measures it without a profiler, layer by layer, so that the next change aims at the right layer:

- ``SDPA cuDNN``: PyTorch's SDPA with the cuDNN backend (a C++ path: the floor for one attention call);
- ``FA4 flash_attn_func``: FA4's public entry;
- ``FA4 _flash_attn_fwd``: the forward function behind it (no autograd Function);
- ``fs3d custom op``: ``torch.ops.fs3d.flash_attn_cute``, as the model calls it (dispatcher, autograd wrapper,
  aliasing check, then ``flash_attn_func``);
- ``lean op``: a candidate, not used by the model: ``_flash_attn_fwd`` registered as an operator through
  ``torch.library.Library`` directly (:func:`lean_op`: one Python function per call behind the dispatcher, without
  ``custom_op``'s autograd and aliasing-check layers and without FA4's autograd Function). If it is much cheaper than
  ``fs3d custom op``, the model's op can be registered that way.

Two modes per path, each ``--calls`` calls in a row, median over ``--repeats``:

- ``issued``: host seconds from the first call to the return of the last, on a free GPU (the calls queue, nothing
  waits: ``--calls`` stays far below the launch queue's depth), then one synchronisation outside the timing;
- ``recorded``: host seconds to record the same calls into one CUDA graph (``torch.cuda.graph``; never replayed). This
  is the cost the per-object recording pays per attention call.

Run on the GPU machine (FA4 carried as in ``GPU_RUNBOOK.md``):

    python benchmarks/attention_host_cost.py --device cuda --out runs/attention_host_cost

On the CPU (tests) only SDPA runs, ``issued`` only, and ``--max-tokens`` shortens the shapes so that it is quick.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.attention_kernels import SHAPES, AttnShape  # noqa: E402

MODES = ("issued", "recorded")
#: the sampler sites whose shapes this times (the compiled samplers' calls, ``AttnShape.site``)
SITE_SHAPES = tuple(s for s in SHAPES if s.site is not None)


#: the ``torch.library.Library`` fragments :func:`lean_op` defined, kept alive (an operator lives as long as its
#: library object); name -> (library, op)
_LEAN_OPS: dict[str, tuple] = {}


def lean_op(name: str, fn: Callable, dispatch_key: str) -> Callable:
    """``fn(q, k, v) -> Tensor`` as the operator ``torch.ops.fs3d_bench.<name>`` registered for ``dispatch_key`` only
    ("CUDA", "CPU"), through ``torch.library.Library``: the dispatcher calls ``fn`` directly (no autograd kernel, no
    fake kernel: this measures a call, it is not for ``torch.compile``). Registered once per name."""
    if name not in _LEAN_OPS:
        lib = torch.library.Library("fs3d_bench", "FRAGMENT")
        lib.define(f"{name}(Tensor q, Tensor k, Tensor v) -> Tensor")
        lib.impl(name, fn, dispatch_key)
        _LEAN_OPS[name] = (lib, getattr(torch.ops.fs3d_bench, name))
    return _LEAN_OPS[name][1]


def call_paths(device: torch.device) -> dict[str, Callable]:
    """Name -> attention(q, k, v) on (B, L, H, d) tensors, for every path reachable on ``device``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def sdpa(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    paths: dict[str, Callable] = {"SDPA cuDNN" if device.type == "cuda" else "SDPA math": sdpa}
    from fs3d_accel.model.attention_kernels import flash_attn_cute_unavailable
    if device.type == "cuda" and flash_attn_cute_unavailable(device) is None:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.interface import _flash_attn_fwd
        paths["FA4 flash_attn_func"] = lambda q, k, v: flash_attn_func(q, k, v)
        paths["FA4 _flash_attn_fwd"] = lambda q, k, v: _flash_attn_fwd(q, k, v)[0]
        paths["fs3d custom op"] = lambda q, k, v: torch.ops.fs3d.flash_attn_cute(q, k, v)
        paths["lean op"] = lean_op("fa4_fwd", lambda q, k, v: _flash_attn_fwd(q, k, v)[0], "CUDA")
    return paths


def host_seconds_per_call(fn: Callable[[], object], calls: int, repeats: int, device: torch.device,
                          mode: str) -> float:
    """Median over ``repeats`` of the host seconds per call of ``calls`` calls of ``fn`` in a row (``mode``: see the
    module docstring). ``fn`` must have run on ``device`` before (JIT compilation and lazy initialisation are not
    what this measures)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if calls < 1 or repeats < 1:
        raise ValueError(f"calls and repeats must be >= 1, got {calls} and {repeats}")
    if mode == "recorded" and device.type != "cuda":
        raise ValueError("the recorded mode records a CUDA graph; it needs a CUDA device")
    cuda = device.type == "cuda"
    pool = torch.cuda.graph_pool_handle() if mode == "recorded" else None
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        if mode == "issued":
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append(time.perf_counter() - t0)
        else:
            graph = torch.cuda.CUDAGraph()
            t0 = time.perf_counter()
            with torch.cuda.graph(graph, pool=pool):
                for _ in range(calls):
                    fn()
            times.append(time.perf_counter() - t0)
            del graph
        if cuda:
            torch.cuda.synchronize(device)
    return statistics.median(times) / calls


def warm(fn: Callable[[], object], device: torch.device) -> None:
    """Run ``fn`` twice, on a side stream on CUDA (as graph capture wants its first calls made off the capture)."""
    if device.type != "cuda":
        fn(), fn()
        return
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn(), fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)


def shortened(shape: AttnShape, max_tokens: int | None) -> AttnShape:
    """``shape`` with query and key lengths cut to ``max_tokens`` (None: unchanged)."""
    if max_tokens is None:
        return shape
    return replace(shape, q_len=min(shape.q_len, max_tokens), kv_len=min(shape.kv_len, max_tokens))


def measure(device: torch.device, calls: int, repeats: int, modes: tuple[str, ...], max_tokens: int | None,
            dtype: torch.dtype) -> list[dict]:
    rows = []
    paths = call_paths(device)
    for shape in (shortened(s, max_tokens) for s in SITE_SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, n, shape.heads, shape.head_dim, device=device, generator=g, dtype=dtype)
                   for n in (shape.q_len, shape.kv_len, shape.kv_len))
        for name, path in paths.items():
            fn = lambda: path(q, k, v)  # noqa: E731
            with torch.no_grad():
                warm(fn, device)
                for mode in modes:
                    row = {"site": shape.site, "B": shape.batch, "Lq": shape.q_len, "Lk": shape.kv_len, "path": name,
                           "mode": mode}
                    try:
                        row["host_us"] = 1e6 * host_seconds_per_call(fn, calls, repeats, device, mode)
                    except Exception as exc:  # a path that cannot be recorded is a result, not a crash
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(row)
                    print(f"{shape.site:10s} {name:22s} {mode:8s} "
                          + (f"{row['host_us']:.1f} us per call" if "host_us" in row else row["error"]), flush=True)
    return rows


def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    import pandas as pd
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "attention_host_cost.csv", index=False)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    lines = [f"# Host time per attention call (`benchmarks/attention_host_cost.py`)", "",
             f"Device **{meta['device']}**, torch {meta['torch']}, {meta['dtype']}, {meta['calls']} calls in a row, "
             f"median of {meta['repeats']}" + (f", lengths cut to {meta['max_tokens']} tokens"
                                               if meta["max_tokens"] else "") + ". Microseconds of host time per call.",
             ""]
    if "host_us" in df:
        table = df.pivot_table(index=["site", "path"], columns="mode", values="host_us", sort=False)
        lines += [table.round(1).to_markdown(), ""]
    for r in rows:
        if "error" in r and r["error"] == r["error"]:
            lines.append(f"- {r['site']} {r['path']} {r['mode']}: {r['error']}")
    (out / "attention_host_cost.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calls", type=int, default=48, help="calls in a row (48: one SLaT pass's attention calls)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {list(MODES)}")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="cut query and key lengths to this many tokens (smoke tests on the CPU); recorded in meta")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {bad or 'empty'}; choose from {list(MODES)}")
    if args.calls < 1 or args.repeats < 1:
        ap.error(f"--calls and --repeats must be >= 1, got {args.calls} and {args.repeats}")
    if args.max_tokens is not None and args.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if "recorded" in modes and not args.device.startswith("cuda"):
        ap.error("--modes recorded records CUDA graphs; on the CPU use --modes issued")
    args.modes = modes
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = measure(device, args.calls, args.repeats, args.modes, args.max_tokens, dtype)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "calls": args.calls, "repeats": args.repeats,
            "max_tokens": args.max_tokens, "modes": list(args.modes)}
    write_outputs(rows, meta, args.out)


if __name__ == "__main__":
    main()
