"""Which attention kernel is fastest at SAM 3D's attention shapes on this GPU? (head dim 64)

Half of a compiled SLaT or SS pass is attention (``results/kernel_profile_h100/``), so the fast exact path
is bounded by the attention kernel. This times every exact kernel reachable from this PyTorch build on the
shapes the samplers run: each ``scaled_dot_product_attention`` backend (cuDNN, FlashAttention-2, memory
efficient) and ``flex_attention`` compiled with its default and a few explicit Triton tile settings. The
report lists the FlashAttention implementations PyTorch could activate
(``torch.nn.attention.list_flash_attention_impls``: FA3 / FA4 packages register there when installed). CUDA events, warm-up, median of ``--repeats``;
TFLOP/s = 4 B H Lq Lk d / time. Every output is compared with the fp32 math backend; a kernel further off than
``MAX_ABS_ERR`` is marked wrong in the report and never marked fastest.

Shapes (full config, N = 14,171 surface voxels of 007_tuna_fish_can -> 3,619 SLaT tokens; the condition
tokens of a real image: SS 7,528, SLaT 5,496):

    python benchmarks/attention_kernels.py --out runs/attention_kernels

``--timing graph`` times each kernel replayed from a CUDA graph (20 calls per graph), as the samplers run under
``reduce-overhead``; ``launch`` times calls issued one by one from Python, which adds each call's host time where the
kernel is too short to hide it (FlashAttention-4's 0.2-0.4 ms calls here). The kernel table defaults to ``launch`` (as
sessions 6-11 ran it), the ``--fa4-tiles`` sweep to ``graph``.

``--fa4-tiles`` (needs ``flash_attn.cute``) sweeps FlashAttention-4's Hopper tile shapes (``FlashAttnTiles``) at the
shapes the compiled samplers run (``AttnShape.site``), next to cuDNN and FA4's own tile table, and writes
``fa4_tiles.json``: per site the fastest tiles and a ready ``NAME@SITE=TILES`` suffix for the benchmark variants:

    python benchmarks/attention_kernels.py --fa4-tiles default --out runs/fa4_tiles    # --timing graph implied
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.stage_latency import Timer  # noqa: E402

HEADS, HEAD_DIM = 16, 64
#: pose tokens of the SS layout stream (one per layout modality)
LAYOUT_TOKENS = 4


@dataclass(frozen=True)
class AttnShape:
    """One attention call of a sampler pass: batch (2 = the CFG pair), query and key lengths."""

    name: str
    batch: int
    q_len: int
    kv_len: int
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    #: the ``RunOptions.attention_kernel_sites`` entry whose calls have this shape in the compiled samplers with the
    #: one-key zero condition (``compile-all-zkv*``), or None for a shape they do not run
    site: str | None = None

    @property
    def flops(self) -> float:
        """QK^T and PV products: 2 * 2 * B * H * Lq * Lk * d."""
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


SHAPES = (
    AttnShape("SS self (shape stream), CFG pair", 2, 4096, 4096, site="ss.self"),
    AttnShape("SS cross, CFG pair", 2, 4096, 7528),
    # with the one-key zero condition the unconditional branch needs no kernel: only the conditional one runs
    AttnShape("SS cross, conditional branch", 1, 4096, 7528, site="ss.cross"),
    AttnShape("SLaT self, N=14,171, CFG pair", 2, 3619, 3619, site="slat.self"),
    AttnShape("SLaT cross, N=14,171, CFG pair", 2, 3619, 5496),
    AttnShape("SLaT cross, N=14,171, conditional branch", 1, 3619, 5496, site="slat.cross"),
    AttnShape("SLaT self, N=14,171, one branch", 1, 3619, 3619),
    # the SS layout stream: 4 pose tokens attending to layout + shape keys, and to the condition tokens. Few FLOPs,
    # but 2 of every 4 SS attention launches (1,200 per SS sampler call); presumably latency-bound (a fused kernel's
    # query tile holds all 4 queries, so one CTA per head and batch element walks all the keys). Read the ms here
    AttnShape("SS self (layout stream: 4 queries), CFG pair", 2, LAYOUT_TOKENS, LAYOUT_TOKENS + 4096),
    AttnShape("SS cross (layout stream: 4 queries), conditional branch", 1, LAYOUT_TOKENS, 7528),
)

#: FA4 tile shapes ``--fa4-tiles default`` tries: FA4's own choice at head dim 64 (192x128) and its neighbours, with
#: 128-row tiles (32 query blocks per head at 4,096 tokens instead of 22) and P@V / overlap switched off
FA4_TILE_SWEEP = ("192x128", "192x128:no-rs", "192x96", "192x160", "192x192", "128x128", "128x128:no-rs",
                  "128x128:no-overlap", "128x96", "128x160", "128x176", "128x192", "64x128", "64x192")

#: largest query count the small-query path (``small_query_attention``) is timed at
SMALL_QUERY_MAX = 64

#: largest |out - fp32 math| accepted from a half-precision kernel (the measured ones are 3e-4 to 1e-3)
MAX_ABS_ERR = 1e-2

#: flex_attention Triton tiles tried besides its default choice (BLOCK_M, BLOCK_N, num_warps, num_stages)
FLEX_TILES = ((128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3))


def sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend
    return {"cuDNN": SDPBackend.CUDNN_ATTENTION, "FlashAttention-2 (PyTorch)": SDPBackend.FLASH_ATTENTION,
            "memory-efficient": SDPBackend.EFFICIENT_ATTENTION}


def registered_flash_impls() -> list[str]:
    """FlashAttention implementations PyTorch can activate here (FA3 / FA4 packages register themselves)."""
    try:
        from torch.nn.attention import list_flash_attention_impls
    except ImportError:
        return []
    return list(list_flash_attention_impls())


def kernels(device: torch.device | None = None) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                     torch.Tensor]]:
    """Name -> attention(q, k, v) for every kernel to try, on (B, L, H, d) tensors as the model holds them
    (SDPA and flex take (B, H, L, d) views, as ``fs3d_accel.model.layers.attention`` passes them)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    def heads_first(fn):
        return lambda q, k, v: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    out: dict[str, Callable] = {}
    for name, backend in sdpa_backends().items():
        def run(q, k, v, _b=backend):
            with sdpa_kernel([_b]):
                return F.scaled_dot_product_attention(q, k, v)
        out[f"SDPA {name}"] = heads_first(run)
    flex = torch.compile(flex_attention, dynamic=False)
    out["flex_attention (default tiles)"] = heads_first(lambda q, k, v: flex(q, k, v))
    for bm, bn, warps, stages in FLEX_TILES:
        opts = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
        out[f"flex_attention {bm}x{bn} w{warps} s{stages}"] = heads_first(
            lambda q, k, v, _o=opts: flex(q, k, v, kernel_options=_o))
    from fs3d_accel.model.attention_kernels import (flash_attn_cute, flash_attn_cute_unavailable,
                                                    small_query_attention)
    small = torch.compile(small_query_attention, dynamic=False)

    def small_query_path(q, k, v):
        if q.shape[1] > SMALL_QUERY_MAX:
            raise ValueError(f"the small-query path is for at most {SMALL_QUERY_MAX} queries (it holds fp32 scores)")
        return small(q, k, v)
    out[f"fp32 matmuls + softmax, compiled (small-query path, <= {SMALL_QUERY_MAX} queries)"] = small_query_path
    if device is not None and flash_attn_cute_unavailable(device) is None:
        out["FlashAttention-4 (flash_attn.cute, fs3d custom op)"] = flash_attn_cute
    return out


def fa4_tile_kernels(specs: list[str]) -> dict[str, Callable]:
    """cuDNN SDPA, FA4 with its own tile table, and FA4 with each tile shape of ``specs`` (``FlashAttnTiles``)."""
    from fs3d_accel.model.attention_kernels import FlashAttnTiles, flash_attn_cute, flash_attn_cute_tiled
    out = {"SDPA cuDNN": kernels()["SDPA cuDNN"], f"{FA4_PREFIX} own table": flash_attn_cute}
    for spec in specs:
        tiles = FlashAttnTiles.parse(spec)
        out[f"{FA4_PREFIX} {tiles.label}"] = lambda q, k, v, _t=tiles: flash_attn_cute_tiled(q, k, v, _t)
    return out


FA4_PREFIX = "FA4"
#: how much faster than FA4's own table explicit tiles must be to be suggested
TILE_MARGIN = 0.05


def best_fa4_tiles(rows: list[dict]) -> dict:
    """Per sampler site: cuDNN's and FA4's own TFLOP/s, and the fastest correct FA4 tiles, from sweep ``rows``; plus the
    ``NAME@SITE=TILES`` suffixes that give every site (``all``) or SLaT's sites (``slat``) their fastest tiles, for the
    sites where those beat FA4's own table (empty where none does: keep the plain variant name)."""
    site_of = {s.name: s.site for s in SHAPES}
    sites: dict[str, dict] = {}
    for r in rows:
        site = site_of.get(r["shape"])
        if site is None or "ms" not in r or r["max_abs_err"] > MAX_ABS_ERR:
            continue
        entry = sites.setdefault(site, {"shape": r["shape"]})
        if r["kernel"] == "SDPA cuDNN":
            entry["cudnn_tflops"] = r["tflops"]
        elif r["kernel"] == f"{FA4_PREFIX} own table":
            entry["fa4_own_tflops"] = r["tflops"]
        elif r["kernel"].startswith(FA4_PREFIX + " ") and r["tflops"] > entry.get("best_tflops", 0.0):
            entry.update(best_tiles=r["kernel"][len(FA4_PREFIX) + 1:], best_tflops=r["tflops"])
    # a site gets tiles only where they beat FA4's own table by more than the noise between two timings of one kernel
    # (session 12: FA4's own table and explicit 192 x 128, the same tiles, differed by up to 5% from CUDA graphs)
    tuned = {s: e["best_tiles"] for s, e in sites.items()
             if "best_tiles" in e and e["best_tflops"] > (1 + TILE_MARGIN) * e.get("fa4_own_tflops", 0.0)}
    for s, e in sites.items():
        e["tiles_beat_own_table"] = s in tuned
    return {"sites": sites,
            "suffix": {"all": "+".join(f"{s}={t}" for s, t in tuned.items()),
                       "slat": "+".join(f"{s}={t}" for s, t in tuned.items() if s.startswith("slat."))}}


def activated_flash_kernel(impl: str) -> dict[str, Callable]:
    """Activate a registered FlashAttention implementation (process-wide, irreversible) and return the SDPA
    flash backend, which now dispatches to it."""
    from torch.nn.attention import SDPBackend, activate_flash_attention_impl, sdpa_kernel
    activate_flash_attention_impl(impl)

    def run(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
    return {f"SDPA flash backend, {impl} activated": run}


#: calls captured in one CUDA graph under ``--timing graph`` (the replay's time is divided by this)
GRAPH_CALLS = 20


def graph_replay(fn: Callable[[], torch.Tensor], calls: int = GRAPH_CALLS) -> Callable[[], None]:
    """A callable that replays ``calls`` back-to-back calls of ``fn`` from one CUDA graph: the kernels' own time,
    without the per-call host cost (Python, argument checks, launch) that a 0.3 ms attention call may not hide. This
    is how the samplers run attention under ``reduce-overhead``. ``fn`` is warmed up on a side stream first, as
    capture requires (JIT compilation and lazy init happen there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def measure(shapes, dtype: torch.dtype, warmup: int, repeats: int, device: torch.device,
            candidates: dict[str, Callable] | None = None, timing: str = "launch") -> list[dict]:
    """Time every candidate at every shape: ``timing`` "launch" times calls issued one by one from Python (host cost
    included where the kernel is too short to hide it), "graph" the same calls replayed from a CUDA graph
    (:func:`graph_replay`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    candidates = kernels(device) if candidates is None else candidates
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, n, shape.heads, shape.head_dim, device=device, generator=g, dtype=dtype)
                   for n in (shape.q_len, shape.kv_len, shape.kv_len))
        with sdpa_kernel([SDPBackend.MATH]):
            ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        for name, fn in candidates.items():
            row = {"shape": shape.name, "B": shape.batch, "Lq": shape.q_len, "Lk": shape.kv_len, "kernel": name}
            try:
                out = fn(q, k, v)
                row["max_abs_err"] = (out.float() - ref).abs().max().item()
                if timing == "graph":
                    t = Timer(device, warmup, repeats)(graph_replay(lambda: fn(q, k, v)))["median_s"] / GRAPH_CALLS
                else:
                    t = Timer(device, warmup, repeats)(lambda: fn(q, k, v))["median_s"]
                row["timing"] = timing
                row.update(ms=t * 1e3, tflops=shape.flops / t / 1e12)
            except Exception as exc:  # a backend that refuses a shape is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            print(f"{shape.name:36s} {name:36s} " + (f"{row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s"
                                                     if "ms" in row else row["error"]), flush=True)
    return rows


def write_report(rows: list[dict], meta: dict, out: Path) -> str:
    import pandas as pd
    df = pd.DataFrame(rows)
    lines = ["# Attention kernels at SAM 3D's shapes (`benchmarks/attention_kernels.py`)", "",
             f"Device **{meta['device']}**, torch {meta['torch']}, {meta['dtype']}, heads {HEADS}, head dim "
             f"{HEAD_DIM}; CUDA events, {meta['warmup']} warm-up, median of {meta['repeats']}"
             + (f" replays of {GRAPH_CALLS} calls captured in one CUDA graph (kernel time). "
                if meta.get("timing") == "graph" else " calls launched one by one from Python. ")
             + f"Registered FlashAttention implementations: {meta['flash_impls'] or 'none'}"
             + (f"; activated {meta['flash_impl_activated']}" if meta.get("flash_impl_activated") else "")
             + (f"; activation failed: {meta['flash_impl_error']}" if meta.get("flash_impl_error") else "") + ". "
             + f"FlashAttention-4 through the fs3d custom op: {meta.get('flash_attn_cute', 'not checked')}.", ""]
    for shape, g in df.groupby("shape", sort=False):
        lines += [f"## {shape}", "", "| kernel | ms | TFLOP/s | max abs err vs fp32 math |", "|---|---|---|---|"]
        ok = g[g["max_abs_err"] <= MAX_ABS_ERR] if "max_abs_err" in g else g.iloc[:0]
        best = ok["ms"].min() if len(ok) else float("nan")
        for _, r in g.iterrows():
            if isinstance(r.get("error"), str):
                lines.append(f"| {r['kernel']} | refused: {r['error']} | | |")
                continue
            wrong = "" if r["max_abs_err"] <= MAX_ABS_ERR else f" (WRONG: above {MAX_ABS_ERR:g})"
            mark = "**" if r["ms"] == best else ""
            lines.append(f"| {mark}{r['kernel']}{mark} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                         f"{r['max_abs_err']:.2g}{wrong} |")
        lines.append("")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_kernels.md").write_text(text)
    df.to_csv(out / "attention_kernels.csv", index=False)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--flash-impl", default=None,
                    help="also activate this registered FlashAttention implementation (e.g. FA4, needs its package "
                         "importable) and time the SDPA flash backend through it, after every other kernel")
    ap.add_argument("--fa4-tiles", default=None,
                    help="instead of the kernel table: sweep FA4 tile shapes at the samplers' shapes, 'default' "
                         f"({', '.join(FA4_TILE_SWEEP)}) or a comma list like '128x128,192x128:no-rs'")
    ap.add_argument("--timing", default=None, choices=["launch", "graph"],
                    help="launch: calls issued one by one from Python (host cost included where a call is too short "
                         f"to hide it); graph: {GRAPH_CALLS} calls replayed from one CUDA graph (kernel time, as the "
                         "samplers run under reduce-overhead). Default: graph for --fa4-tiles (its suggestions are for "
                         "the samplers), launch for the kernel table (as sessions 6-11 ran it)")
    ap.add_argument("--shapes", default=None,
                    help="time only the shapes whose name contains this text (case-insensitive), e.g. 'layout' for "
                         "the SS layout stream's two shapes")
    ap.add_argument("--out", type=Path, default=Path("runs/attention_kernels"))
    args = ap.parse_args(argv)
    if args.shapes is not None and not args.shapes.strip():
        raise SystemExit("--shapes: give some text of a shape name (e.g. 'layout'), or leave --shapes out for all")
    shapes = [s for s in SHAPES if args.shapes is None or args.shapes.lower() in s.name.lower()]
    if not shapes:
        raise SystemExit(f"--shapes {args.shapes!r} matches none of {[s.name for s in SHAPES]}")
    if args.fa4_tiles is not None:
        from fs3d_accel.model.attention_kernels import FlashAttnTiles
        specs = list(FA4_TILE_SWEEP) if args.fa4_tiles == "default" else [t for t in args.fa4_tiles.split(",") if t]
        try:
            [FlashAttnTiles.parse(t) for t in specs]
        except ValueError as exc:
            raise SystemExit(f"--fa4-tiles: {exc}") from None
        if not specs:
            raise SystemExit("--fa4-tiles: no tile shape given")
        if args.flash_impl:
            raise SystemExit("--fa4-tiles replaces the kernel table, so --flash-impl would time nothing; run them apart")
        labels = [FlashAttnTiles.parse(t).label for t in specs]
        repeated = sorted({t for t in labels if labels.count(t) > 1})
        if repeated:
            raise SystemExit(f"--fa4-tiles: {repeated} named twice (their rows would merge)")
    if args.timing is None:
        args.timing = "graph" if args.fa4_tiles is not None else "launch"
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: the attention kernels compared here are CUDA kernels; "
                         "no CUDA device is available")
    if args.warmup < 0 or args.repeats < 1:
        raise SystemExit(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "dtype": args.dtype,
            "warmup": args.warmup, "repeats": args.repeats, "timing": args.timing, "flash_impls": registered_flash_impls()}
    from fs3d_accel.model.attention_kernels import flash_attn_cute_unavailable
    meta["flash_attn_cute"] = flash_attn_cute_unavailable(device) or "timed"
    # one compiled flex_attention graph per (shape, tile setting): keep them all compiled
    import torch._dynamo.config as dynamo_config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)
    if args.fa4_tiles is not None:
        if meta["flash_attn_cute"] != "timed":
            raise SystemExit(f"--fa4-tiles: {meta['flash_attn_cute']}")
        meta["fa4_tiles"] = specs
        sited = [s for s in shapes if s.site]
        if not sited:
            raise SystemExit(f"--fa4-tiles sweeps the samplers' sites; --shapes {args.shapes!r} leaves none")
        rows = measure(sited, dtype, args.warmup, args.repeats, device,
                       candidates=fa4_tile_kernels(specs), timing=args.timing)
        best = best_fa4_tiles(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fa4_tiles.json").write_text(json.dumps(best, indent=2))
        print(write_report(rows, meta, args.out))
        print(json.dumps(best, indent=2))
        return
    rows = measure(shapes, dtype, args.warmup, args.repeats, device, timing=args.timing)
    if args.flash_impl:
        try:
            extra = activated_flash_kernel(args.flash_impl)
        except Exception as exc:  # the package is missing or refuses this GPU: say so in the report
            meta["flash_impl_error"] = f"{type(exc).__name__}: {exc}"
            print(f"--flash-impl {args.flash_impl}: {meta['flash_impl_error']}", flush=True)
        else:
            meta["flash_impl_activated"] = args.flash_impl
            rows += measure(shapes, dtype, args.warmup, args.repeats, device, candidates=extra, timing=args.timing)
            rows.sort(key=lambda r: [s.name for s in SHAPES].index(r["shape"]))
    print(write_report(rows, meta, args.out))


if __name__ == "__main__":
    main()
