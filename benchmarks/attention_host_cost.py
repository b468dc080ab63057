"""Host time per attention call, issued eagerly and recorded into a CUDA graph, per call path.

Why: SLaT's kernels alone reach 55% of the executed FLOPs at 14k voxels on the H100 (session 20, with the nested tiled
conv), the calls 49-51%: the rest is the GPU waiting, mostly while the host records the object's graphs
(``results/base_vs_official_h100/session20/``). cProfile of one recording (session 19,
``results/slat_host_profile_h100/session19/repeat/``, times inflated by the profiler) put an FA4 call at ~0.39 ms of
host time: ~0.28 ms in FA4's ``flash_attn_func`` and ~0.11 ms in the layers of our ``fs3d::flash_attn_cute`` custom op
above it (96 calls for ``-ac-rf``'s two recorded passes). This measures it without a profiler, layer by layer, so that
the next change aims at the right layer:

- ``SDPA cuDNN``: PyTorch's SDPA with the cuDNN backend (a C++ path: the floor for one attention call; its backend
  context is entered once, outside the timing);
- ``FA4 flash_attn_func``: FA4's public entry;
- ``FA4 _flash_attn_fwd``: the forward function behind it (no autograd Function);
- ``fs3d custom op``: ``torch.ops.fs3d.flash_attn_cute.default``, as inductor's code calls it (dispatcher, autograd
  wrapper, aliasing check, then ``flash_attn_func``);
- ``fs3d direct op``: ``torch.ops.fs3d.flash_attn_cute_direct.default`` (``RunOptions.fa4_call="direct"``): an
  operator registered through ``torch.library.Library`` whose kernel calls ``_flash_attn_fwd`` itself, without
  ``custom_op``'s autograd and aliasing-check layers and without FA4's autograd Function.
- ``fs3d kernel op``: ``torch.ops.fs3d.flash_attn_cute_kernel.default`` (``RunOptions.fa4_call="kernel"``): the same
  schema, launching the compiled kernel ``_flash_attn_fwd`` cached (``model.fa4_kernel_call``) after the warm-up's
  call through ``_flash_attn_fwd``.

Two modes per path, each ``--calls`` calls in a row, median over ``--repeats``:

- ``issued``: host seconds from the first call to the return of the last, on a free GPU (the calls queue, nothing
  waits: ``--calls`` stays far below the launch queue's depth), then one synchronisation outside the timing;
- ``recorded``: host seconds of the same calls while they are recorded into a CUDA graph the way the samplers record
  (``stages.graphs``: the capture stream, ``thread_local`` capture mode, no device sync, a fresh memory pool), timed
  from after ``capture_begin`` to before ``capture_end``; ``capture_end`` (the graph's instantiation) is reported apart
  (``end_ms``), once per graph. One untimed recording comes first. The graphs are never replayed.

Run on the GPU machine (FA4 carried as in ``GPU_RUNBOOK.md``):

    python benchmarks/attention_host_cost.py --device cuda --out runs/attention_host_cost

On the CPU (tests) only SDPA runs, ``issued`` only, and ``--max-tokens`` shortens the shapes so that it is quick.
"""
from __future__ import annotations

import argparse
import contextlib
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


def call_paths(device: torch.device) -> tuple[dict[str, tuple[Callable, Callable]], str | None]:
    """Name -> (attention(q, k, v) on (B, L, H, d) tensors, a context factory entered around its warm-up and timing)
    for every path reachable on ``device``, and why the FA4 paths are missing (None where they are present)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    paths = {"SDPA cuDNN" if device.type == "cuda" else "SDPA math": (sdpa, lambda: sdpa_kernel([backend]))}
    from fs3d_accel.model.attention_kernels import flash_attn_cute_unavailable
    why = flash_attn_cute_unavailable(device) if device.type == "cuda" else "FA4 runs on CUDA only"
    if why is None:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.interface import _flash_attn_fwd
        plain = contextlib.nullcontext
        op, direct = torch.ops.fs3d.flash_attn_cute.default, torch.ops.fs3d.flash_attn_cute_direct.default
        kernel = torch.ops.fs3d.flash_attn_cute_kernel.default
        paths["FA4 flash_attn_func"] = (lambda q, k, v: flash_attn_func(q, k, v), plain)
        paths["FA4 _flash_attn_fwd"] = (lambda q, k, v: _flash_attn_fwd(q, k, v)[0], plain)
        paths["fs3d custom op"] = (lambda q, k, v: op(q, k, v), plain)
        paths["fs3d direct op"] = (lambda q, k, v: direct(q, k, v), plain)
        paths["fs3d kernel op"] = (lambda q, k, v: kernel(q, k, v), plain)
    return paths, why


def host_times(fn: Callable[[], object], calls: int, repeats: int, device: torch.device, mode: str) -> dict:
    """``per_call_s``: the median over ``repeats`` of the host seconds per call of ``calls`` calls of ``fn`` in a row
    (``mode``: see the module docstring); ``end_s`` (recorded mode, else None): the median seconds of ``capture_end``.
    ``fn`` must have run on ``device`` before (JIT compilation and lazy initialisation are not what this measures)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if calls < 1 or repeats < 1:
        raise ValueError(f"calls and repeats must be >= 1, got {calls} and {repeats}")
    if mode == "recorded" and device.type != "cuda":
        raise ValueError("the recorded mode records a CUDA graph; it needs a CUDA device")
    per_call, ends = [], []
    if mode == "recorded":
        record(fn, calls, device)  # untimed: the capture stream's own first-use work
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if mode == "issued":
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) / calls)
        else:
            loop_s, end_s = record(fn, calls, device)
            per_call.append(loop_s / calls)
            ends.append(end_s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {"per_call_s": statistics.median(per_call), "end_s": statistics.median(ends) if ends else None}


def record(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """Record ``calls`` calls of ``fn`` into a new CUDA graph with the samplers' own recorder
    (``stages.graphs._record_without_sync``: its capture stream and lock, ``thread_local`` mode, no device sync, a fresh
    pool, a failed recording ended cleanly) and return the host seconds of the calls and of what follows them
    (``capture_end``, the graph's instantiation). The graph is dropped unreplayed, and its pool's memory handed
    back (``empty_cache``, after the timing): a dropped graph's private pool stays reserved until then, so repeated
    recordings would otherwise grow the reserved memory (session 21's GPU test: +8 MB over three)."""
    from fs3d_accel.stages.graphs import _record_without_sync
    marks: dict[str, float] = {}

    def calls_in_a_row(_):
        marks["start"] = time.perf_counter()
        for _ in range(calls):
            fn()
        marks["calls_done"] = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    _record_without_sync(graph, calls_in_a_row, [torch.empty(0, device=device)])
    ended = time.perf_counter()
    del graph
    torch.cuda.empty_cache()
    return marks["calls_done"] - marks["start"], ended - marks["calls_done"]


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
            dtype: torch.dtype, paths: dict[str, tuple[Callable, Callable]], done=None) -> list[dict]:
    """Rows of every (site, path, mode); ``done(rows)`` is called after each path (a killed run keeps its rows). A
    path that fails is a row with its error, not a crash; after a failed recording no further recording is tried
    (a capture that failed inside CUDA can leave state behind that would skew the next)."""
    rows: list[dict] = []
    recording_failed = ""
    for shape in (shortened(s, max_tokens) for s in SITE_SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, n, shape.heads, shape.head_dim, device=device, generator=g, dtype=dtype)
                   for n in (shape.q_len, shape.kv_len, shape.kv_len))
        for name, (path, context) in paths.items():
            fn = lambda: path(q, k, v)  # noqa: E731
            base = {"site": shape.site, "B": shape.batch, "Lq": shape.q_len, "Lk": shape.kv_len, "path": name}
            with torch.no_grad(), context():
                try:
                    warm(fn, device)
                except Exception as exc:  # noqa: BLE001 - a path that cannot run here is a result
                    rows += [{**base, "mode": m, "error": f"warm-up: {_one_line(exc)}"} for m in modes]
                    modes_left = ()
                else:
                    modes_left = modes
                for mode in modes_left:
                    row = {**base, "mode": mode}
                    if mode == "recorded" and recording_failed:
                        row["error"] = f"not tried after an earlier failed recording ({recording_failed})"
                    else:
                        try:
                            t = host_times(fn, calls, repeats, device, mode)
                            row["host_us"] = 1e6 * t["per_call_s"]
                            if t["end_s"] is not None:
                                row["end_ms"] = 1e3 * t["end_s"]
                        except Exception as exc:  # noqa: BLE001
                            row["error"] = _one_line(exc)
                            if mode == "recorded":
                                recording_failed = f"{name} at {shape.site}"
                    rows.append(row)
                    print(f"{shape.site:10s} {name:22s} {mode:8s} "
                          + (f"{row['host_us']:.1f} us per call" if "host_us" in row else row["error"]), flush=True)
            if done is not None:
                done(rows)
    return rows


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


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
        if "end_ms" in df:
            table = table.join(df.pivot_table(index=["site", "path"], values="end_ms", sort=False)
                               .rename(columns={"end_ms": "capture_end ms"}))
        lines += [table.round(1).to_markdown(), ""]
    if meta.get("fa4_missing"):
        lines.append(f"- FA4 paths not timed: {meta['fa4_missing']}")
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
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index: "cuda" means the current device
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # the capture stream and the recordings belong to this device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    paths, fa4_missing = call_paths(device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "calls": args.calls, "repeats": args.repeats,
            "max_tokens": args.max_tokens, "modes": list(args.modes), "paths": list(paths), "fa4_missing": fa4_missing}
    rows = measure(device, args.calls, args.repeats, args.modes, args.max_tokens, dtype, paths,
                   done=lambda rows: write_outputs(rows, meta, args.out))
    write_outputs(rows, meta, args.out)


if __name__ == "__main__":
    main()
