"""Which host code the GPU waits on: a profiled window's GPU idle time, billed to what the host was running.

``busy.gpu_timeline`` finds where in a call the GPU waits and names the host *op* open at the start of each long
gap; inside the first step of a SLaT call most of the waiting is hundreds of short gaps while the host runs Python
(building tables, launching compiled code, recording graph pieces), where no op or only a launch is open. This module
reads a Chrome trace written by ``torch.profiler`` with ``with_stack=True`` (its ``python_function`` events are the
Python call stack) and splits every microsecond of GPU idle over the innermost frame open on the host's main thread at
that moment:

    idle = idle_intervals(window, busy_intervals(events))
    by_frame = idle_by_innermost(idle, frames(events, keep=project_frame))   # {frame: idle us}

With ``keep`` limited to the project's own files, each idle microsecond goes to the innermost *project* function on the
stack (``slat_flow.py(..): build_structure``), whatever torch internals it was inside; :func:`frame_paths` gives the
chain of project frames above it. The Python tracer slows the host (every call is recorded), so the totals are inflated;
read the shares for attribution, as with cProfile. We write the sweep ourselves: Holistic Trace Analysis's idle-time
analysis splits idle by kernel and stream, not by host frame.
"""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .busy import _merge

#: Chrome-trace categories of work on the GPU (kineto's names)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
#: Chrome-trace categories of host events that name what the host runs: ops and CUDA runtime / driver calls
HOST_OP_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver")

_PY_NAME = re.compile(r"^(?P<file>.*?)\((?P<line>\d+)\): (?P<func>.*)$")


@dataclass(frozen=True)
class Span:
    """One host event: start and end in microseconds, its name, and its thread."""

    start: float
    end: float
    name: str
    tid: int | str = 0


def load_trace(path: str | Path) -> list[dict]:
    """The ``traceEvents`` of a Chrome trace (``.json`` or ``.json.gz``, as ``torch.profiler`` exports it)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        data = json.load(fh)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list (not a Chrome trace?)")
    return events


def _complete(events: Iterable[dict], categories: tuple[str, ...]) -> Iterable[dict]:
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in categories and "ts" in e:
            yield e


def busy_intervals(events: Iterable[dict]) -> list[tuple[float, float]]:
    """(start, end) of every kernel, copy and memset, merged where they overlap (several streams busy together)."""
    return _merge([(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                   for e in _complete(events, DEVICE_CATEGORIES)])


def idle_intervals(window: tuple[float, float], busy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of ``window`` (start, end) not covered by the sorted, disjoint ``busy`` intervals."""
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"the window spans no time ({lo} to {hi} us)")
    out, at = [], lo
    for a, b in busy:
        if b <= at:
            continue
        if a >= hi:
            break
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out


def main_thread(spans: Iterable[Span]) -> int | str | None:
    """The thread with the most host time in ``spans`` (the Python main thread in a profiled call); None if empty."""
    totals: Counter = Counter()
    for s in spans:
        totals[s.tid] += s.end - s.start
    return totals.most_common(1)[0][0] if totals else None


def frames(events: Iterable[dict], keep: Callable[[str], bool] = lambda name: True,
           categories: tuple[str, ...] = ("python_function",)) -> list[Span]:
    """Host spans of ``categories`` (by default the Python tracer's frames, named ``file(line): function``) whose
    name ``keep`` accepts, on the main thread only (other threads' frames would interleave with its stack)."""
    spans = [Span(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e.get("name", "")),
                  e.get("tid", 0)) for e in _complete(events, categories)]
    tid = main_thread(spans)
    return [s for s in spans if s.tid == tid and keep(s.name)]


def project_frame(roots: tuple[str, ...] = ("fs3d_accel/", "fs3d_analysis/", "benchmarks/")
                  ) -> Callable[[str], bool]:
    """A ``keep`` for :func:`frames`: Python frames in the project's own files (by path part)."""
    def keep(name: str) -> bool:
        m = _PY_NAME.match(name)
        return m is not None and any(r in m.group("file").replace("\\", "/") for r in roots)
    return keep


def short_frame(name: str) -> str:
    """``/long/path/fs3d_accel/model/sparse.py(249): neighbour_table`` -> ``sparse.py:249 neighbour_table``; other
    names unchanged."""
    m = _PY_NAME.match(name)
    if m is None:
        return name
    return f"{Path(m.group('file')).name}:{m.group('line')} {m.group('func')}"


def _innermost_sweep(idle: list[tuple[float, float]], spans: list[Span]):
    """Yield (idle microseconds, the open spans outermost first) for every stretch of ``idle`` between two span
    boundaries. Spans of one thread nest; the innermost open one is the latest started (ties: the shortest)."""
    points = sorted({p for a, b in idle for p in (a, b)} | {p for s in spans for p in (s.start, s.end)})
    order = sorted(spans, key=lambda s: (s.start, -(s.end - s.start)))
    nxt, stack, k = 0, [], 0
    for a, b in zip(points, points[1:]):
        while nxt < len(order) and order[nxt].start <= a:
            stack.append(order[nxt])
            nxt += 1
        stack = [s for s in stack if s.end > a]
        while k < len(idle) and idle[k][1] <= a:
            k += 1
        if k < len(idle) and idle[k][0] <= a and b <= idle[k][1]:
            yield b - a, stack


def idle_by_innermost(idle: list[tuple[float, float]], spans: list[Span], none: str = "(no frame)"
                      ) -> dict[str, float]:
    """Idle microseconds per innermost open span name (``none`` where no span is open). The values add up to the
    whole idle time."""
    out: Counter = Counter()
    for us, stack in _innermost_sweep(idle, spans):
        out[stack[-1].name if stack else none] += us
    return dict(out)


def frame_paths(idle: list[tuple[float, float]], spans: list[Span], depth: int = 3, none: str = "(no frame)",
                name: Callable[[str], str] = short_frame) -> dict[str, float]:
    """As :func:`idle_by_innermost`, keyed by the innermost ``depth`` open spans, outermost first, joined by " > "
    (who called the function the GPU waits on)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    out: Counter = Counter()
    for us, stack in _innermost_sweep(idle, spans):
        out[" > ".join(name(s.name) for s in stack[-depth:]) if stack else none] += us
    return dict(out)


@dataclass(frozen=True)
class IdleAttribution:
    """A window's GPU idle split by host code: ``by_project`` the innermost project frame, ``by_path`` its chain of
    project frames, ``by_python`` the innermost Python frame of any file, ``by_op`` the innermost host op or CUDA
    call (microseconds each)."""

    window_us: float
    busy_us: float
    idle_us: float
    by_project: dict[str, float]
    by_path: dict[str, float]
    by_python: dict[str, float]
    by_op: dict[str, float]

    def rows(self, top: int | None = None) -> list[dict]:
        """One row per (attribution, key): idle ms and its share of the window's idle, largest first per attribution.
        ``top``: only the ``top`` largest keys of each attribution, and one more row, "(N other keys)", with the sum of
        the rest, so that each attribution still adds up to the whole idle."""
        if top is not None and top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        out = []
        for kind, table in (("project", self.by_project), ("project_path", self.by_path),
                            ("python", self.by_python), ("op", self.by_op)):
            ranked = sorted(table.items(), key=lambda kv: -kv[1])
            kept, rest = (ranked, []) if top is None else (ranked[:top], ranked[top:])
            rows = [(short_frame(key) if kind != "project_path" else key, us) for key, us in kept]
            if rest:
                rows.append((f"({len(rest)} other keys)", sum(us for _, us in rest)))
            out += [{"attribution": kind, "key": key, "idle_ms": us / 1e3,
                     "share": us / self.idle_us if self.idle_us else 0.0} for key, us in rows]
        return out


def attribute_idle(events: list[dict], window: tuple[float, float] | None = None,
                   keep_project: Callable[[str], bool] | None = None, depth: int = 3) -> IdleAttribution:
    """Split the GPU idle of ``window`` (default: the first to the last event, host or device) of a trace's events
    over the host code open at each moment. Raises ValueError if the trace holds no Python frames (profile with
    ``with_stack=True``)."""
    keep_project = keep_project or project_frame()
    busy = busy_intervals(events)
    py = frames(events)
    if not py:
        raise ValueError("the trace holds no python_function events: record it with torch.profiler's with_stack=True")
    if window is None:
        starts = [s.start for s in py] + [a for a, _ in busy]
        ends = [s.end for s in py] + [b for _, b in busy]
        window = (min(starts), max(ends))
    lo, hi = window
    idle = idle_intervals(window, busy)
    busy_us = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in busy)
    project = [s for s in py if keep_project(s.name)]
    ops = frames(events, categories=HOST_OP_CATEGORIES)
    return IdleAttribution(window_us=hi - lo, busy_us=busy_us, idle_us=sum(b - a for a, b in idle),
                           by_project=idle_by_innermost(idle, project), by_path=frame_paths(idle, project, depth),
                           by_python=idle_by_innermost(idle, py), by_op=idle_by_innermost(idle, ops))


@dataclass(frozen=True)
class PartTime:
    """One named part of a traced window: its calls (outermost ones: a recursive or nested call is not counted twice),
    host milliseconds inside them, and the GPU's busy and idle milliseconds during them."""

    part: str
    calls: int
    host_ms: float
    busy_ms: float
    idle_ms: float


def part_times(events: list[dict], parts: Iterable[tuple[str, str]], window: tuple[float, float] | None = None
               ) -> list[PartTime]:
    """For each (label, function) of ``parts`` (``function`` as :func:`short_frame` writes it without the line:
    ``slat.py build_both_tables``), the main thread's calls of it in ``window`` (default: the whole trace) and how
    busy the GPU was while they ran: which part of a call the GPU waits through, in time order of the parts'
    first calls in the window (parts never called last)."""
    py = frames(events)
    busy = busy_intervals(events)
    lo, hi = window if window is not None else (-float("inf"), float("inf"))
    timed = []
    for label, function in parts:
        file, _, func = function.partition(" ")
        spans = sorted((s for s in py if lo <= s.start < hi and _is(s.name, file, func)), key=lambda s: s.start)
        outer: list[Span] = []  # a call inside another call of the same function counts once
        for s in spans:
            if not outer or s.start >= outer[-1].end:
                outer.append(s)
        host = sum(s.end - s.start for s in outer)
        on = sum(max(0.0, min(b, s.end) - max(a, s.start)) for s in outer for a, b in busy)
        first = outer[0].start if outer else float("inf")
        timed.append((first, PartTime(label, len(outer), host / 1e3, on / 1e3, (host - on) / 1e3)))
    return [p for _, p in sorted(timed, key=lambda fp: fp[0])]


def _is(name: str, file: str, func: str) -> bool:
    m = _PY_NAME.match(name)
    return m is not None and m.group("func") == func and Path(m.group("file")).name == file
