"""Module-level latency: forward pre/post hooks, CUDA events, one synchronisation per run.

On CUDA every selected module call records a start and an end ``torch.cuda.Event`` in its hooks;
the events are resolved after the run with a single ``torch.cuda.synchronize`` (no per-module
syncs, so kernels keep queueing as in an unprofiled run). On CPU the hooks read
``time.perf_counter`` (exact there: CPU ops are synchronous) and the ``timer`` column says
``wall_clock``. Peak memory (CUDA only) is tracked by folding ``max_memory_allocated`` into every
open call at each hook and resetting the peak counter, so nested calls each get their own peak.

Hooks are removed when the run ends or raises.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .modules import ModuleSpec, category, depth, is_pipeline, nearest_selected_parent, network_paths, \
    select_modules, stage_of, stage_roots
from .workload import make_runner

CUDA_TIMER = "cuda_event"
CPU_TIMER = "wall_clock"


def _device_of(root: nn.Module) -> torch.device:
    try:
        return next(root.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on a CPU, whose ops run synchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_graph_recordings(device: torch.device | str | int | None = None) -> int:
    """How many CUDA graphs have been recorded on ``device`` (default: the current CUDA device) so far: those of
    inductor's CUDA-graph trees (torch.compile's "reduce-overhead" / "max-autotune") plus those of the stages' own
    ``GraphedCall`` objects (``RunOptions.cuda_graphs``); 0 where none ran (a CPU device included). For inductor's, a
    recording after the warm-up calls means a region re-recorded instead of replaying (a static input moved, or a size
    is new); the stages' own graphs live with one object's structures, so every SLaT call records its two by design.
    Inductor's are counted by walking the trees, since torch keeps no public counter."""
    dev = torch.device("cuda") if device is None else torch.device("cuda", device) if isinstance(device, int) \
        else torch.device(device)  # torch rejects a negative index or an unknown device string here
    if dev.type != "cuda":
        return 0
    index = torch.cuda.current_device() if dev.index is None else dev.index  # "cuda": the current device
    from torch._inductor import cudagraph_trees

    from fs3d_accel.stages.graphs import recordings
    manager = cudagraph_trees.get_container(index).tree_manager
    if manager is None:
        return recordings(index)
    nodes, stack = recordings(index), [node for group in manager.roots.values() for node in group]
    while stack:
        node = stack.pop()
        nodes += 1
        stack.extend(child for group in node.children.values() for child in group)
    return nodes


@dataclass
class _Frame:
    path: str
    start: Any
    peak: int = 0
    entry_alloc: int = 0


@dataclass
class _Call:
    start: Any
    end: Any
    peak: int
    entry_alloc: int


class ModuleTimer:
    """Context manager that times every call of the given modules (path -> module).

    ``calls[path]`` holds the raw records of the current run; :meth:`resolve` synchronises once
    and returns path -> list of seconds (one per call).
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, memory: bool = True) -> None:
        self.modules = modules
        self.device = device
        self.cuda = device.type == "cuda"
        self.memory = memory and self.cuda
        self.calls: dict[str, list[_Call]] = {p: [] for p in modules}
        self._stack: list[_Frame] = []
        self._handles: list[Any] = []
        #: CUDA events are reused across runs (creating one costs tens of microseconds)
        self._pool: list[Any] = []

    # -- time stamps
    def _stamp(self) -> Any:
        if self.cuda:
            ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _fold_peak(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        for fr in self._stack:
            fr.peak = max(fr.peak, peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    # -- hooks
    def _pre(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: Any) -> None:
            alloc = 0
            if self.memory:
                self._fold_peak()
                alloc = torch.cuda.memory_allocated(self.device)
            self._stack.append(_Frame(path, self._stamp(), alloc, alloc))
        return hook

    def _post(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            end = self._stamp()
            if self.memory:
                self._fold_peak()
            # the frame of this call is the innermost open frame with this path
            for i in range(len(self._stack) - 1, -1, -1):
                if self._stack[i].path == path:
                    fr = self._stack.pop(i)
                    self.calls[path].append(_Call(fr.start, end, fr.peak, fr.entry_alloc))
                    return
        return hook

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError("ModuleTimer is already attached")
        try:
            for path, mod in self.modules.items():
                self._handles.append(mod.register_forward_pre_hook(self._pre(path)))
                self._handles.append(mod.register_forward_hook(self._post(path), always_call=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def __enter__(self) -> "ModuleTimer":
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget the calls of the last run (call after :meth:`resolve`: its events are reused)."""
        if self.cuda:
            for calls in self.calls.values():
                for c in calls:
                    self._pool.extend((c.start, c.end))
        self.calls = {p: [] for p in self.modules}
        self._stack.clear()

    def resolve(self) -> dict[str, list[tuple[float, int, int]]]:
        """path -> [(seconds, peak_alloc_bytes, entry_alloc_bytes)] per call (one sync)."""
        sync_device(self.device)
        out: dict[str, list[tuple[float, int, int]]] = {}
        for path, calls in self.calls.items():
            if self.cuda:
                out[path] = [(c.start.elapsed_time(c.end) / 1e3, c.peak, c.entry_alloc) for c in calls]
            else:
                out[path] = [(c.end - c.start, 0, 0) for c in calls]
        return out


def _pct(x: list[float], q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def _timed_runs(run: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        run()
        sync_device(device)
        out.append(time.perf_counter() - t0)
    return out


def profile_latency(pipe: nn.Module, inputs: Any, modules: ModuleSpec = "auto", warmup: int = 1,
                    repeats: int = 3, memory: bool = True, measure_overhead: bool = True) -> pd.DataFrame:
    """Time every selected module of ``pipe`` while it runs on ``inputs``.

    Returns one row per (stage, module path, module type) with: ``calls`` (per run), ``total_s``
    (median over repeats of the module's summed time per run) with ``total_p10_s``/``total_p90_s``,
    per-call ``call_median_s`` / ``call_p10_s`` / ``call_p90_s``, ``self_s`` (total minus the
    selected sub-modules directly under it), ``share_stage`` and ``share_run`` (of ``total_s``),
    ``peak_alloc_bytes`` (max over calls of the peak allocated CUDA memory during the call; NaN on
    CPU) and ``peak_delta_bytes`` (that peak minus the memory allocated at call entry), ``timer``.

    ``attrs``: ``timer``, ``device``, ``repeats``, ``warmup``, ``run_s`` (median profiled run),
    ``unprofiled_run_s``, ``overhead_frac`` (profiled / unprofiled - 1, same process and inputs,
    runs interleaved), ``stage_s`` (stage -> seconds), ``num_hooked_modules``.

    Memory (CUDA, ``memory=True``) is read in one extra run after the timed ones, because reading
    and resetting the allocator's peak in every hook is slow enough to distort the times.

    ``inputs``: see :func:`~fs3d_analysis.profile.workload.make_runner`; ``modules``: see
    :func:`~fs3d_analysis.profile.modules.select_modules`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    run = make_runner(pipe, inputs)
    device = _device_of(pipe)
    selected = select_modules(pipe, modules)
    pipeline = is_pipeline(pipe)
    nets = network_paths(pipe)
    roots = stage_roots(pipe)

    with torch.no_grad():
        for _ in range(warmup):
            run()
        per_repeat: list[dict[str, list[tuple[float, int, int]]]] = []
        wall: list[float] = []
        unprofiled: list[float] = []
        # timing runs never track memory: reading/resetting the allocator's peak costs ~0.3 ms per
        # hook on an H100 host, which would distort the times it sits between
        timer = ModuleTimer(selected, device, memory=False)
        for _ in range(repeats):
            if measure_overhead:  # interleaved with the profiled runs, so drift hits both alike
                unprofiled.extend(_timed_runs(run, device, 1))
            with timer:
                timer.reset()
                sync_device(device)
                t0 = time.perf_counter()
                run()
                per_repeat.append(timer.resolve())  # the one synchronisation of this run
                wall.append(time.perf_counter() - t0)
        mem_calls: dict[str, list[tuple[float, int, int]]] = {}
        if memory and device.type == "cuda":
            mem_timer = ModuleTimer(selected, device, memory=True)
            with mem_timer:
                torch.cuda.reset_peak_memory_stats(device)
                run()
                mem_calls = mem_timer.resolve()

    timer_name = CUDA_TIMER if device.type == "cuda" else CPU_TIMER
    run_s = float(np.median(wall))
    called = [p for p in selected if any(rep[p] for rep in per_repeat)]
    parent = {p: nearest_selected_parent(p, called) for p in called}
    totals = {p: [sum(t for t, _, _ in rep[p]) for rep in per_repeat] for p in called}
    child_totals = {p: np.zeros(repeats) for p in called}
    for p in called:
        if parent[p] is not None:
            child_totals[parent[p]] += np.asarray(totals[p])
    stage_s = {s: float(np.median(totals[r])) for s, r in roots.items() if r in totals}

    rows = []
    for p in called:
        mod = selected[p]
        calls = [c for rep in per_repeat for c in rep[p]]
        secs = [c[0] for c in calls]
        total = float(np.median(totals[p]))
        stage = stage_of(p, pipeline)
        stage_total = stage_s.get(stage, float("nan"))
        mem = mem_calls.get(p) or []
        rows.append({
            "stage": stage,
            "module": p,
            "type": type(mod).__name__,
            "category": category(mod, p, pipeline, nets),
            "depth": depth(p),
            "calls": len(calls) / repeats,
            "total_s": total,
            "total_p10_s": _pct(totals[p], 10),
            "total_p90_s": _pct(totals[p], 90),
            "call_median_s": float(np.median(secs)),
            "call_p10_s": _pct(secs, 10),
            "call_p90_s": _pct(secs, 90),
            "self_s": float(np.median(np.asarray(totals[p]) - child_totals[p])),
            "share_stage": total / stage_total if stage_total == stage_total and stage_total > 0 else float("nan"),
            "share_run": total / run_s if run_s > 0 else float("nan"),
            "peak_alloc_bytes": float(max(c[1] for c in mem)) if mem else float("nan"),
            "peak_delta_bytes": float(max(c[1] - c[2] for c in mem)) if mem else float("nan"),
            "timer": timer_name,
        })
    df = pd.DataFrame(rows)
    unprof = float(np.median(unprofiled)) if unprofiled else float("nan")
    df.attrs.update({
        "timer": timer_name,
        "device": device_name(device),
        "repeats": repeats,
        "warmup": warmup,
        "run_s": run_s,
        "unprofiled_run_s": unprof,
        "overhead_frac": run_s / unprof - 1 if unprofiled else float("nan"),
        "stage_s": stage_s,
        "num_hooked_modules": len(selected),
        "note": ("CUDA events recorded in forward hooks, resolved after one synchronisation per run"
                 if timer_name == CUDA_TIMER else
                 "CPU: time.perf_counter in forward hooks (wall clock); no memory tracking"),
    })
    return df


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def stage_table(latency: pd.DataFrame) -> pd.DataFrame:
    """The stage rows of a latency table: stage, seconds, share of the run."""
    st = latency[latency["category"].isin(["stage"]) | (latency["module"] == "")]
    return st[["stage", "total_s", "share_run"]].reset_index(drop=True)


__all__ = ["CPU_TIMER", "CUDA_TIMER", "ModuleTimer", "device_name", "profile_latency", "stage_table"]
