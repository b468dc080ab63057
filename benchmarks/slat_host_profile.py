"""Where a SLaT call's host time goes, per sampler step, for objects of sizes the process has not met.

Session 17's run over 16 new sizes showed each extra eager SLaT pass before the whole-pass graphs record costing ~30 ms
more than a replay (variants ``-ac-w2/3/4``): at 4-6k voxels an eager pass is host-bound. This script measures that
directly. For each variant it compiles on a warm-up object, then runs the SLaT sampler once per object of a new size
and records, per sampler step, the host time of the velocity call (``time.perf_counter`` around it, no device sync:
what the Python side spends launching, recording or replaying) and the GPU time between CUDA events recorded before and
after it (on the same stream, so the span includes any wait for earlier work). With ``--cprofile`` the last object runs
under :mod:`cProfile` (its times are inflated by the profiler; read it for attribution, not for totals; with
``--cprofile-steps K`` only from the call's start to the end of step K, e.g. 1 for the first step's recording), whose
top functions by own and cumulative time, and the callers of the eight costliest, go to ``host_profile_<variant>.txt``
(the raw stats to ``host_profile_<variant>.prof``, for ``pstats`` or snakeviz). With ``--trace`` it runs under
``torch.profiler`` with the Python stack instead (``--trace-steps K``: to the end of step K, default 1), and the GPU's
idle time in that window is billed to the host code open at each moment (``fs3d_analysis.profile.idle_attribution``):
which of our functions the GPU waits on while a new object's first step builds its tables and records its graphs.

    python benchmarks/slat_host_profile.py --device cuda --config full \\
        --variants compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac --sizes 5000,14171 --cprofile --out runs/slat_host

Writes ``slat_host_steps.csv`` (one row per step and object), ``README.md`` (per variant and object: host and GPU
seconds of the first steps, of the steady replays, and of the whole call) and the cProfile tables. On the CPU (``--config
mini``) it checks the script only.
"""
from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.slat_many_sizes import SHAPES, object_coords, slat_condition  # noqa: E402
from benchmarks.stage_latency import (SHORT, checked_device, checked_variants, distinct_counts,  # noqa: E402
                                      synthetic_inputs, variant_label, variant_options)
from fs3d_accel.model.sparse import release_structure  # noqa: E402
from fs3d_analysis.profile.idle_attribution import (IdleAttribution, PartTime, attribute_idle, load_trace,  # noqa: E402
                                                    part_times)
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_accel.samplers import EulerFlowSampler  # noqa: E402
from fs3d_accel.stages.slat import slat_noise  # noqa: E402

CSV_NAME = "slat_host_steps.csv"
COLUMNS = ("variant", "object", "N", "call", "step", "host_ms", "gpu_ms")


class StepClock:
    """Wraps a velocity function: host milliseconds of each call, and CUDA events around it (on CUDA). With
    ``profiler`` (a cProfile, or a :class:`TorchTrace`) and ``profile_steps`` > 0, the profiler is turned off after
    that many calls (the rest of the call runs unprofiled)."""

    def __init__(self, net, device: torch.device, profiler: "cProfile.Profile | TorchTrace | None" = None,
                 profile_steps: int = 0) -> None:
        self.net, self.device = net, device
        self.profiler, self.profile_steps = profiler, profile_steps
        self.host_ms: list[float] = []
        self.events: list[tuple] = []

    def __call__(self, *args, **kwargs):
        cuda = self.device.type == "cuda"
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self.host_ms.append(1e3 * (time.perf_counter() - t0))
        if self.profiler is not None and len(self.host_ms) == self.profile_steps:
            self.profiler.disable()
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        return out

    def gpu_ms(self) -> list[float]:
        """Event span of each call (after a device sync); NaN off CUDA."""
        if self.device.type != "cuda":
            return [float("nan")] * len(self.host_ms)
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in self.events]


def object_sizes_per_variant(sizes: list[int], variants: int) -> list[list[int]]:
    """Each variant's object sizes: ``sizes`` shifted by 3 voxels per variant, so that every variant meets sizes no
    earlier variant of the process has met (each GEMM shape's first call at a new token count costs host time)."""
    shifted = [[n + 3 * k for n in sizes] for k in range(variants)]
    flat = [n for row in shifted for n in row]
    if len(set(flat)) != len(flat) or min(sizes) - 7 < 1:
        raise SystemExit(f"--sizes {sizes}: with {variants} variants (each shifted by 3 voxels) two objects would share "
                         f"a size, or the warm-up size (the smallest minus 7) would be below 1; space the sizes further "
                         f"apart")
    return shifted


class TorchTrace:
    """``torch.profiler`` over part of a call, with the Python stack (``with_stack=True``), for
    ``fs3d_analysis.profile.idle_attribution``: the same ``enable`` / ``disable`` as a cProfile, so that
    :class:`StepClock` stops it after the profiled steps. ``disable`` synchronises first, so that the kernels the
    profiled steps queued are in the trace (the rest of the call then starts on an idle GPU: read the trace, not the
    profiled call's total)."""

    def __init__(self, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile
        self.device = device
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=acts, with_stack=True)
        self.running = False

    def enable(self) -> None:
        if not self.running:
            self.prof.start()
            self.running = True

    def disable(self) -> None:
        if self.running:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.stop()
            self.running = False

    def export(self, path: Path) -> None:
        """The Chrome trace (gzip where ``path`` ends in ``.gz``)."""
        self.prof.export_chrome_trace(str(path))


def run_object(stage, noise, cond, coords, sampler_cfg, opts, device,
               profiler: "cProfile.Profile | TorchTrace | None" = None, profile_steps: int = 0):
    """One SLaT sampler call; returns (per-step host ms, per-step GPU ms, call wall seconds, call GPU seconds).
    ``profiler`` runs from the call's start to its end, or to the end of step ``profile_steps`` where that is > 0."""
    structures: list[dict] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    try:
        if profiler is not None:
            profiler.enable()
        clock = StepClock(stage.velocity_net(cond, coords, sampler_cfg, opts, structures), device, profiler,
                          profile_steps)
        EulerFlowSampler(sampler_cfg, "slat").sample(noise.clone(), clock)
    finally:
        if profiler is not None:
            profiler.disable()
        for s in structures:
            release_structure(s)
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        gpu_s = start.elapsed_time(end) / 1e3
    else:
        gpu_s = float("nan")
    return clock.host_ms, clock.gpu_ms(), time.perf_counter() - t0, gpu_s


def profile_table(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_callers(8)  # who calls the eight costliest functions
    return out.getvalue()


@dataclass(frozen=True)
class HostPart:
    """A named part of a SLaT call's host work in a cProfile: the summed inclusive time of ``functions`` ((file
    suffix, function name) pairs; an empty suffix matches any file), counting only their calls from ``only_from`` or
    leaving out those from ``not_from`` (each a (file suffix, function name) caller), and the part it lies ``within``
    ("" for a top-level part)."""

    name: str
    what: str
    functions: tuple[tuple[str, str], ...]
    only_from: tuple[str, str] | None = None
    not_from: tuple[str, str] | None = None
    within: str = ""


_BUILD = ("model/slat_flow.py", "build_structure")
#: the parts :func:`host_split` names. Limits: "torso launches" matches inductor's ``repeated_subgraph<N>`` functions in
#: any file, so a profile that also covers SS's compiled blocks counts those too; "tables" is the build the pieces path
#: makes before its first step (``graph_record_first``), and reads 0 where a variant builds its tables inside its
#: first, eager pass
HOST_PARTS = (
    HostPart("tables", "the CFG pair's coordinate structure: neighbour tables, tiles, pooling maps",
             (("stages/slat.py", "build_both_tables"),)),
    HostPart("tables: input path run", "the input path run to build them and its values dropped (the build before "
             "session 23, or RunOptions.slat_tables_by_pass)", (("model/slat_flow.py", "_io_in"),), only_from=_BUILD,
             within="tables"),
    HostPart("condition K/V", "the condition's cross-attention K/V, once per object", (("stages/slat.py", "kv_of"),)),
    HostPart("IO blocks", "the pass's input and output res-blocks: sparse convs, their fused element-wise steps",
             (("model/slat_flow.py", "_io_in"), ("model/slat_flow.py", "_io_out")), not_from=_BUILD),
    HostPart("torso launches", "the compiled transformer blocks' Python wrapper: GEMMs, Triton and FA4 launches",
             (("", "repeated_subgraph*"),)),
    HostPart("piece captures", "beginning and ending each piece's capture (capture_end instantiates the graph)",
             (("torch/cuda/graphs.py", "capture_begin"), ("torch/cuda/graphs.py", "capture_end"))),
    HostPart("piece replays", "queueing each recorded piece on the caller's stream",
             (("torch/cuda/graphs.py", "replay"),)),
    HostPart("hook check", "the torso's check that no module hooks sit on its blocks",
             (("model/slat_flow.py", "_check_no_block_hooks"),)),
)


def _matches(func: tuple, pattern: tuple[str, str]) -> bool:
    """``pattern`` = (file suffix, function name); a name ending in "*" is a prefix followed by digits only (inductor
    numbers its ``repeated_subgraph`` functions: two in session 23's torso profile, 24 in session 26's of the fastest
    path)."""
    file, _, name = func
    if not file.endswith(pattern[0]):
        return False
    if pattern[1].endswith("*"):
        prefix = pattern[1][:-1]
        return name.startswith(prefix) and name[len(prefix):].isdigit()
    return name == pattern[1]


def host_split(prof_path: Path | str) -> tuple[list[dict], float]:
    """Group a saved cProfile (``host_profile_<variant>.prof``) into :data:`HOST_PARTS`: per part, the summed inclusive
    ms of its functions and their calls (restricted by caller where the part says so), the part it lies within; and
    the profile's total ms. The top-level parts do not share calls, though a function may still run inside another
    part's (cProfile cannot tell), so their shares need not add up to 1. The times are cProfile's, which inflates
    Python-heavy code: compare parts with each other, not with an unprofiled call."""
    profile = pstats.Stats(str(prof_path))
    stats, total = profile.stats, 1e3 * profile.total_tt
    rows = []
    for part in HOST_PARTS:
        ms, calls = 0.0, 0
        for func, (_, ncalls, _, ct, callers) in stats.items():
            if not any(_matches(func, f) for f in part.functions):
                continue
            picked = [v for c, v in callers.items() if _matches(c, part.only_from or part.not_from)] \
                if (part.only_from or part.not_from) else []
            sub_calls, sub_ct = sum(v[1] for v in picked), sum(v[3] for v in picked)
            if part.only_from:
                ms, calls = ms + 1e3 * sub_ct, calls + sub_calls
            else:
                ms, calls = ms + 1e3 * (ct - sub_ct), calls + ncalls - sub_calls
        rows.append({"part": part.name, "ms": ms, "calls": calls, "within": part.within, "what": part.what})
    return rows, total


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per (variant, object): the first three steps' host and GPU ms, the median of the rest, the call's totals."""
    out = []
    keys = sorted({(r["variant"], r["object"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for v, o in keys:
        steps = [r for r in rows if r["variant"] == v and r["object"] == o and r["step"] >= 0]
        call = next(r for r in rows if r["variant"] == v and r["object"] == o and r["step"] < 0)
        rest = steps[3:]
        out.append({"variant": v, "object": o, "N": call["N"],
                    "first host ms": ", ".join(f"{r['host_ms']:.1f}" for r in steps[:3]),
                    "first GPU ms": ", ".join(f"{r['gpu_ms']:.1f}" for r in steps[:3]),
                    "later host ms (median)": statistics.median(r["host_ms"] for r in rest) if rest else float("nan"),
                    "later GPU ms (median)": statistics.median(r["gpu_ms"] for r in rest) if rest else float("nan"),
                    "host ms, all steps": sum(r["host_ms"] for r in steps),
                    "call wall ms": call["host_ms"], "call GPU ms": call["gpu_ms"]})
    return out


IDLE_COLUMNS = ("variant", "attribution", "key", "idle_ms", "share")
#: keys per attribution kept in ``idle_attribution.csv`` (the rest summed in one row): a traced first step bills its
#: idle to thousands of Python frames, most of them a few microseconds
IDLE_CSV_TOP = 60
#: what each attribution of :class:`IdleAttribution` bills the idle to, for the README
IDLE_KINDS = (("project", "innermost project function"), ("project_path", "its chain of project functions"),
              ("python", "innermost Python function of any file"), ("op", "innermost host op or CUDA call"))


#: the parts of a SLaT call's first step the README times (label, ``file function``): ``graph_piece_end`` runs inside
#: the input path's and the torso's calls, so its row overlaps theirs
FIRST_STEP_PARTS = (("call setup (velocity_net)", "slat.py velocity_net"),
                    ("CFG pair's tables", "slat.py build_both_tables"),
                    ("batch-1 tables", "slat.py build_plain_tables"),
                    ("condition K/V", "slat.py kv_of"),
                    ("block modulations", "slat.py block_modulations"),
                    ("input path", "slat_flow.py _io_in"),
                    ("torso (compiled, recorded in pieces)", "slat.py torso"),
                    ("piece ends (inside the rows above)", "graphs.py graph_piece_end"),
                    ("output path", "slat_flow.py _io_out"))
PART_COLUMNS = ("variant", "part", "calls", "host_ms", "busy_ms", "idle_ms")


def _append_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_idle_attribution(out: Path, variant: str, trace_path: Path) -> tuple[IdleAttribution, list[PartTime]]:
    """Bill the traced window's GPU idle to host code (``idle_attribution.attribute_idle``) and time its parts
    (:data:`FIRST_STEP_PARTS`); append the rows to ``idle_attribution.csv`` and ``first_step_parts.csv``."""
    events = load_trace(trace_path)
    result = attribute_idle(events)
    parts = part_times(events, FIRST_STEP_PARTS)
    _append_csv(out / "idle_attribution.csv", IDLE_COLUMNS,
                [{"variant": variant, **r} for r in result.rows(top=IDLE_CSV_TOP)])
    _append_csv(out / "first_step_parts.csv", PART_COLUMNS, [{"variant": variant, **vars(p)} for p in parts])
    return result, parts


def idle_lines(tables: dict[str, tuple[IdleAttribution, list[PartTime]]], meta: dict, top: int) -> list[str]:
    """The README's section on the traced calls: per variant, the window, its GPU idle, and the ``top`` keys of each
    attribution."""
    if not tables:
        return []
    steps = meta.get("trace_steps", 0)
    lines = ["", "## Where the GPU waited in the traced call", "",
             f"The last object ran under `torch.profiler` with the Python stack, "
             f"{'the whole call' if not steps else f'from the call start to the end of step {steps}'} "
             "(`trace_<variant>.json.gz`, Chrome format). Every microsecond in which no kernel, copy or memset ran "
             "is billed to the host code open at that moment (`fs3d_analysis.profile.idle_attribution`). The Python "
             "tracer slows the host, so the milliseconds are inflated: compare shares. The largest "
             f"{IDLE_CSV_TOP} keys of each attribution (the rest summed in one row): `idle_attribution.csv`.", ""]
    for v, (t, parts) in tables.items():
        lines += [f"### `{v}`", "", f"Window {t.window_us / 1e3:.1f} ms, GPU busy {t.busy_us / 1e3:.1f} ms, idle "
                  f"{t.idle_us / 1e3:.1f} ms.", "", "By part, in the order they start (`first_step_parts.csv`):", "",
                  "| part | calls | host ms | GPU busy ms | GPU idle ms |", "|---|---|---|---|---|"]
        lines += [f"| {p.part} | {p.calls} | {p.host_ms:.2f} | {p.busy_ms:.2f} | {p.idle_ms:.2f} |" for p in parts]
        lines.append("")
        rows = t.rows()
        for kind, what in IDLE_KINDS:
            picked = [r for r in rows if r["attribution"] == kind][:top]
            lines += [f"By {what}:", "", "| key | idle ms | share |", "|---|---|---|"]
            lines += [f"| `{r['key']}` | {r['idle_ms']:.2f} | {100 * r['share']:.1f}% |" for r in picked]
            lines.append("")
    return lines


def write_readme(out: Path, rows: list[dict], meta: dict,
                 idle_tables: dict[str, tuple[IdleAttribution, list[PartTime]]] | None = None,
                 top: int = 12) -> None:
    import pandas as pd
    table = pd.DataFrame(summary_rows(rows))
    lines = ["# Host time per SLaT sampler step (`benchmarks/slat_host_profile.py`)", "",
             f"Device **{meta['device']}**, torch {meta['torch']}, config `{meta['config']}`. Each object has a size "
             f"the process has not met (the warm-up object, N = {meta['warmup_N']}, compiles and is not listed). Host "
             "ms: `perf_counter` around each velocity call, no sync. GPU ms: CUDA events before and after it on the "
             "stream (the span includes waiting for earlier work). Steps with CFG make one batched call.", ""]
    for v, label in meta["variants"].items():
        lines.append(f"- `{v}`: {label}")
    lines += ["", table.to_markdown(index=False, floatfmt=".1f"), "",
              f"Every step: `{CSV_NAME}`." + (" cProfile of the last object: `host_profile_<variant>.txt`."
                                              if meta["cprofile"] else "")]
    lines += idle_lines(idle_tables or {}, meta, min(top, 15))
    (out / "README.md").write_text("\n".join(lines) + "\n")


def reread(folder: Path, top: int) -> None:
    """Rewrite a run folder's ``README.md``, ``idle_attribution.csv`` and ``first_step_parts.csv`` from its
    ``meta.json``, ``slat_host_steps.csv`` and the traces in it (``trace_<variant>.json.gz``): for a run made before
    the current tables existed, or after the attribution changed. Raises SystemExit naming what is missing."""
    missing = [name for name in ("meta.json", CSV_NAME) if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"--reread {folder}: no {' or '.join(missing)} there (not a slat_host_profile.py run folder)")
    meta = json.loads((folder / "meta.json").read_text())
    rows = []
    for r in csv.DictReader(open(folder / CSV_NAME)):
        rows.append({**r, "N": int(r["N"]), "call": int(r["call"]), "step": int(r["step"]),
                     "host_ms": float(r["host_ms"]), "gpu_ms": float(r["gpu_ms"])})
    for name in ("idle_attribution.csv", "first_step_parts.csv"):
        (folder / name).unlink(missing_ok=True)
    tables = {}
    for v in meta["variants"]:
        trace = folder / f"trace_{v}.json.gz"
        if trace.exists():
            tables[v] = write_idle_attribution(folder, v, trace)
    if meta.get("trace") and not tables:
        raise SystemExit(f"--reread {folder}: the run traced its last objects, and no trace_<variant>.json.gz is there")
    write_readme(folder, rows, meta, tables, top)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="full", choices=("mini", "full"))
    ap.add_argument("--variants", default="compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac",
                    help=f"comma-separated, from {sorted(SHORT)}")
    ap.add_argument("--sizes", default="5000,14171", help="comma-separated voxel counts, each a new object")
    ap.add_argument("--shapes", default="crops", choices=SHAPES)
    ap.add_argument("--cprofile", action="store_true", help="run the last object under cProfile")
    ap.add_argument("--cprofile-steps", type=int, default=0,
                    help="with --cprofile, profile from the call's start to the end of this many sampler steps (0: "
                         "the whole call); 1 isolates the first step, where a new object's graphs are recorded")
    ap.add_argument("--trace", action="store_true",
                    help="run the last object under torch.profiler with the Python stack instead, and bill the GPU's "
                         "idle time to the host code open at each moment (idle_<variant>.csv, the README's table; "
                         "the trace itself: trace_<variant>.json.gz)")
    ap.add_argument("--trace-steps", type=int, default=1,
                    help="with --trace, trace from the call's start to the end of this many sampler steps (0: the "
                         "whole call; default 1, the first step)")
    ap.add_argument("--repeat", type=int, default=0,
                    help="run each object this many more times after its first call (a size the process has met: "
                         "cuBLAS and the compiled code warm, the graphs recorded again per call); with --cprofile the "
                         "last object's last repeat is profiled; objects are then labelled <index>m<meeting>")
    ap.add_argument("--top", type=int, default=40, help="functions listed per cProfile table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="the run folder (required unless --reread)")
    ap.add_argument("--reread", type=Path, default=None,
                    help="rewrite the README and the trace tables of this run folder from its files, running nothing")
    args = ap.parse_args(argv)
    if args.reread is not None:
        reread(args.reread, args.top)
        return
    if args.out is None:
        raise SystemExit("--out is required (the run folder), unless --reread names one to rewrite")
    if args.repeat < 0:
        raise SystemExit(f"--repeat must be >= 0 (extra calls per object), got {args.repeat}")
    if args.cprofile_steps < 0 or (args.cprofile_steps and not args.cprofile):
        raise SystemExit(f"--cprofile-steps must be >= 0 and needs --cprofile, got {args.cprofile_steps}"
                         f"{'' if args.cprofile else ' without --cprofile'}")
    if args.trace and args.cprofile:
        raise SystemExit("--trace and --cprofile each profile the last object; choose one (either profiler would "
                         "inflate what the other measures)")
    if args.trace_steps < 0:
        raise SystemExit(f"--trace-steps must be >= 0 (0: the whole call), got {args.trace_steps}")
    if args.top < 1:
        raise SystemExit(f"--top must be >= 1 (functions listed per cProfile table), got {args.top}")
    dev = checked_device(args.device)
    variants = checked_variants(args.variants, dev)
    sizes = distinct_counts(args.sizes, "--sizes")
    dtype = variant_options(variants[0]).weight_dtype

    shifted = object_sizes_per_variant(sizes, len(variants))
    pipe = Pipeline.from_config(args.config, seed=args.seed, device="cpu")
    resolution = pipe.config.slat_flow.resolution
    warm_n = min(sizes) - 7  # a size none of the objects has
    try:
        # one new object per (variant, size): each variant meets sizes the process has not seen
        coords = {v: [c.to(dev) for c in object_coords(shifted[k], resolution, args.seed + k, args.shapes)]
                  for k, v in enumerate(variants)}
        warm = object_coords([warm_n], resolution, args.seed + 10_000, args.shapes)[0].to(dev)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    pipe = pipe.to(dtype).to(dev)
    inp = pipe.prepare(*synthetic_inputs(pipe.config.image_size)).to(dev)
    stage, sampler_cfg = pipe.slat, pipe.config.slat_sampler
    for flag, steps in (("--cprofile-steps", args.cprofile_steps), ("--trace-steps", args.trace_steps)):
        if steps > sampler_cfg.steps:
            raise SystemExit(f"{flag} {steps}: the SLaT sampler of config {args.config!r} has {sampler_cfg.steps} "
                             f"steps (0 profiles the whole call)")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "config": args.config, "sizes": sizes, "warmup_N": len(warm), "seed": args.seed, "cprofile": args.cprofile,
            "cprofile_steps": args.cprofile_steps, "trace": args.trace, "trace_steps": args.trace_steps,
            "variants": {v: f"{variant_label(v)} = {variant_options(v)}" for v in variants}}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    for name in ("idle_attribution.csv", "first_step_parts.csv"):  # appended per traced variant: none from earlier runs
        (args.out / name).unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    chans = pipe.config.slat_flow.in_channels
    rows: list[dict] = []
    idle_tables: dict[str, tuple[IdleAttribution, list[PartTime]]] = {}
    with torch.no_grad(), open(args.out / CSV_NAME, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for v in variants:
            opts = variant_options(v)
            cond = slat_condition(stage, inp, opts, dev)
            t0 = time.perf_counter()
            run_object(stage, slat_noise(len(warm), chans, gen).to(dev), cond, warm, sampler_cfg, opts, dev)
            print(f"{v}: warm-up call (N={len(warm)}) {time.perf_counter() - t0:.1f} s", flush=True)
            calls = [(i, r) for i in range(len(coords[v])) for r in range(args.repeat + 1)]
            for i, r in calls:
                c = coords[v][i]
                last = (i, r) == calls[-1]
                profiler = (cProfile.Profile() if args.cprofile and last else TorchTrace(dev) if args.trace and last
                            else None)
                host, gpu, wall_s, gpu_s = run_object(stage, slat_noise(len(c), chans, gen).to(dev), cond, c,
                                                      sampler_cfg, opts, dev, profiler,
                                                      args.trace_steps if args.trace else args.cprofile_steps)
                obj = i if not args.repeat else f"{i}m{r + 1}"  # object index and meeting (never read as a number)
                new = [{"variant": v, "object": obj, "N": len(c), "call": int(profiler is not None), "step": k,
                        "host_ms": h, "gpu_ms": g} for k, (h, g) in enumerate(zip(host, gpu))]
                new.append({"variant": v, "object": obj, "N": len(c), "call": int(profiler is not None), "step": -1,
                            "host_ms": 1e3 * wall_s, "gpu_ms": 1e3 * gpu_s})
                rows += new
                writer.writerows(new)
                fh.flush()
                print(f"{v} N={len(c)}{f' meeting {r + 1}' if args.repeat else ''}"
                      f"{' (' + type(profiler).__name__ + ')' if profiler else ''}: call {1e3 * wall_s:.1f} ms wall, "
                      f"{1e3 * gpu_s:.1f} ms GPU; first steps host "
                      f"{', '.join(f'{h:.1f}' for h in host[:3])} ms, GPU {', '.join(f'{g:.1f}' for g in gpu[:3])} ms",
                      flush=True)
                if isinstance(profiler, TorchTrace):
                    trace_path = args.out / f"trace_{v}.json.gz"
                    profiler.export(trace_path)
                    idle_tables[v] = write_idle_attribution(args.out, v, trace_path)
                elif profiler is not None:
                    (args.out / f"host_profile_{v}.txt").write_text(profile_table(profiler, args.top))
                    profiler.dump_stats(args.out / f"host_profile_{v}.prof")
    write_readme(args.out, rows, meta, idle_tables, args.top)


if __name__ == "__main__":
    main()
