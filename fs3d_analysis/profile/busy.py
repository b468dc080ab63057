"""How much of a call's wall time the GPU spends running kernels: the host-bound vs GPU-bound test.

A call whose summed kernel time is far below its wall time waits on the host (Python, kernel launches,
synchronisations); its time then depends on the CPU it runs next to, not on the GPU. That is why the
official SAM 3D code's timings move between machine leases while a compiled, GPU-bound path's do not.

    kernels = kernel_time(lambda: sampler(...), torch.device("cuda"))
    busy = kernels.seconds / median_wall_seconds
    kernels.timeline.idle_by_tenth      # where in the call the GPU waits: spread out, or at one place
    kernels.timeline.gaps[0].host       # what the host was doing during the longest wait
    kernels.idle_before                 # which kernels the GPU waited in front of (launch gaps inside CUDA graphs)
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile


#: kernel classes, first match wins (names as the profiler reports them on an H100: cuDNN's and FA's attention,
#: cuBLAS's nvjet / cutlass GEMMs, inductor's generated triton kernels, ATen's element-wise and copy kernels)
#: inductor names its kernels after the ops they fuse ("triton_per_fused__scaled_dot_product_cudnn_attention_..."
#: is the q/k norm in front of an attention), so the triton test comes first
KERNEL_CLASSES: tuple[tuple[str, re.Pattern], ...] = (
    ("fused (triton)", re.compile(r"^triton_")),
    ("attention", re.compile(r"sdpa|fmha|flash|attention|attn", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|cublas|wgmma|matmul|sm90_xmma|convolution|implicit_convolve", re.I)),
    ("copy / memset", re.compile(r"^memcpy|^memset|copy_kernel|CatArray|gather|scatter|index", re.I)),
    ("norm / reduce", re.compile(r"norm|reduce|softmax", re.I)),
    ("element-wise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
)


def kernel_class(name: str) -> str:
    """Which class of :data:`KERNEL_CLASSES` a kernel name falls in; "other" when none matches."""
    for label, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return label
    return "other"


@dataclass(frozen=True)
class IdleGap:
    """One stretch of a profiled call in which no kernel, copy or memset ran on the GPU: its start (ms after the
    call's first event), its length (ms), and the host events open when it began (outermost first, the last
    three; e.g. ``cudaStreamSynchronize`` or a CUDA-graph capture's ``cudaStreamEndCapture``)."""

    start_ms: float
    ms: float
    host: str


@dataclass(frozen=True)
class Timeline:
    """Where in one profiled call the GPU waited. ``window_ms`` spans the call's first event to its last (host or
    device); ``idle_by_tenth`` is the idle fraction of each tenth of that window (a recording or a warm-up at the
    start shows as idle first tenths, host-bound steps as idle spread over all of them); ``gaps`` are the longest
    idle stretches, longest first."""

    window_ms: float
    idle_ms: float
    idle_by_tenth: tuple[float, ...]
    gaps: tuple[IdleGap, ...]


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def gpu_timeline(device: list[tuple[float, float]], host: list[tuple[float, float, str]], *,
                 bins: int = 10, top: int = 8) -> Timeline:
    """The idle structure of one call from its events' (start, end) times in microseconds: ``device`` the
    kernels, copies and memsets, ``host`` the CPU events as (start, end, name). Overlapping device events count
    once (concurrent streams are busy together). ``bins`` equal parts of the call (``Timeline.idle_by_tenth`` has
    one value per part: tenths with the default), the ``top`` longest idle stretches. Raises ValueError without
    device events, for an empty window, or for bad ``bins`` / ``top``."""
    if not device:
        raise ValueError("no device events: nothing ran on the GPU in the profiled call")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    busy = _merge(device)
    t0 = min([busy[0][0]] + [a for a, _, _ in host])
    t1 = max([busy[-1][1]] + [b for _, b, _ in host])
    if t1 <= t0:
        raise ValueError(f"the events span no time ({t0} to {t1} us): no window to divide")
    idle = [(a, b) for a, b in zip([t0] + [e for _, e in busy], [s for s, _ in busy] + [t1]) if b > a]
    width = (t1 - t0) / bins
    tenths = []
    for i in range(bins):
        lo, hi = t0 + i * width, t0 + (i + 1) * width
        tenths.append(sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in idle) / width)

    def host_at(t: float) -> str:
        open_ = sorted((a, -b, name) for a, b, name in host if a <= t < b)
        return " > ".join(name for _, _, name in open_[-3:])

    longest = sorted(idle, key=lambda g: g[0] - g[1])[:top]
    gaps = tuple(IdleGap((a - t0) / 1e3, (b - a) / 1e3, host_at(a)) for a, b in longest)
    return Timeline(window_ms=(t1 - t0) / 1e3, idle_ms=sum(b - a for a, b in idle) / 1e3,
                    idle_by_tenth=tuple(tenths), gaps=gaps)


def idle_before(sequence: Iterable[tuple[float, float, str]]) -> dict[str, tuple[float, int]]:
    """Per kernel name, the GPU idle in front of its launches: (seconds, launches), from device events as (start, end,
    name) in microseconds. A launch's idle is the time from the latest end of all earlier events to its start (zero
    where it overlaps them), so the values add up to the idle between the first and the last event. Inside a CUDA
    graph each kernel waits ~1-2 us after the one it depends on; summed per name, this shows where a call of
    thousands of short kernels loses its time, and which kernels a fusion would save the most waiting in front of."""
    out: dict[str, tuple[float, int]] = {}
    latest = None
    for start, end, name in sorted(sequence):
        if end < start:
            raise ValueError(f"device event {name!r} ends before it starts ({start} > {end} us)")
        gap = 0.0 if latest is None else max(0.0, start - latest)
        sec, count = out.get(name, (0.0, 0))
        out[name] = (sec + gap / 1e6, count + 1)
        latest = end if latest is None else max(latest, end)
    return out


def most_often_after(sequence: Iterable[tuple[float, float, str]]) -> dict[str, tuple[str, int]]:
    """Per kernel name, the kernel that most often started right before it, and how often: from device events as
    (start, end, name), in start order ("" before the first). Names the source of a kernel nobody launches by name,
    such as a ``Memset (Device)`` queued by a library ahead of its own kernel; ties go to the name met first."""
    counts: dict[str, Counter] = {}
    previous = ""
    for _, _, name in sorted(sequence):
        counts.setdefault(name, Counter())[previous] += 1
        previous = name
    return {name: c.most_common(1)[0] for name, c in counts.items()}


def device_sequence(events: Iterable[Any], device_index: int | None = None) -> list[tuple[float, float, str]]:
    """The GPU's kernels, copies and memsets of ``torch.profiler`` events as (start, end, name) in microseconds, in
    start order, with the same selection as :func:`split_events` (user annotations and instants left out)."""
    out = []
    for e in events:
        if getattr(e.device_type, "name", str(e.device_type)) != "CUDA" or getattr(e, "is_user_annotation", False):
            continue
        if device_index is not None and getattr(e, "device_index", device_index) != device_index:
            continue
        if e.time_range.end > e.time_range.start:
            out.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(out)


def split_events(events: Iterable[Any], device_index: int | None = None
                 ) -> tuple[list[tuple[float, float]], list[tuple[float, float, str]]]:
    """``torch.profiler`` events (``prof.events()``: ``time_range`` in microseconds, ``device_type``, ``name``) as the
    (device, host) spans :func:`gpu_timeline` takes. Device spans are the GPU's kernels, copies and memsets on
    ``device_index`` (every GPU when None); GPU-side user annotations (``record_function`` ranges mirrored on the GPU
    timeline) are left out, since they would cover the idle inside them. Instants (allocation records) are dropped."""
    device, host = [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if span[1] <= span[0]:
            continue
        if getattr(e.device_type, "name", str(e.device_type)) == "CUDA":
            if getattr(e, "is_user_annotation", False):
                continue
            if device_index is not None and getattr(e, "device_index", device_index) != device_index:
                continue
            device.append(span)
        else:
            host.append((*span, e.name))
    return device, host


@dataclass(frozen=True)
class KernelTime:
    """Summed device time of one call's kernels, memory copies and memsets, and how many were launched;
    ``by_kernel`` maps each kernel name to its (seconds, launches); ``timeline`` (from :func:`kernel_time`
    only) where in the call the GPU waited; ``idle_before`` (from :func:`kernel_time` only; :func:`idle_before`) the
    GPU idle in front of each kernel name's launches, from the call's first device event to its last; ``after``
    (from :func:`kernel_time` only; :func:`most_often_after`) the kernel each name most often follows."""

    seconds: float
    launches: int
    by_kernel: dict[str, tuple[float, int]] = field(default_factory=dict, compare=False)
    timeline: Timeline | None = field(default=None, compare=False)
    idle_before: dict[str, tuple[float, int]] = field(default_factory=dict, compare=False)
    after: dict[str, tuple[str, int]] = field(default_factory=dict, compare=False)

    def by_class(self) -> dict[str, float]:
        """Seconds per :func:`kernel_class`, largest first."""
        out: dict[str, float] = {}
        for name, (sec, _) in self.by_kernel.items():
            out[kernel_class(name)] = out.get(kernel_class(name), 0.0) + sec
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def sum_device_events(events: Iterable[Any]) -> KernelTime:
    """Sum ``torch.profiler`` ``key_averages()`` rows that ran on the GPU.

    Rows carry ``key`` (the kernel name), ``device_type`` (a ``DeviceType``), ``device_time_total``
    (microseconds) and ``count``. CPU rows (operators, whose ``device_time_total`` repeats their kernels'
    time) and GPU-side user annotations (ranges over kernels) are left out, so no kernel is counted twice.
    """
    seconds, launches = 0.0, 0
    by_kernel: dict[str, tuple[float, int]] = {}
    for e in events:
        if getattr(e.device_type, "name", str(e.device_type)) != "CUDA" or getattr(e, "is_user_annotation", False):
            continue
        sec = e.device_time_total / 1e6
        seconds += sec
        launches += e.count
        name = getattr(e, "key", "?")
        prev = by_kernel.get(name, (0.0, 0))
        by_kernel[name] = (prev[0] + sec, prev[1] + e.count)
    return KernelTime(seconds=seconds, launches=launches, by_kernel=by_kernel)


def kernel_time(fn: Callable[[], Any], device: torch.device | str) -> KernelTime:
    """Profile one call of ``fn`` (already warmed up) and return its summed kernel time.

    The profiler slows the host side of this one call, not its kernels, so compare the result with the
    wall time of unprofiled calls. CUDA only: a CPU has no separate device time to compare.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"kernel_time needs a CUDA device (kernels run apart from the host there), got {device}")
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    total = sum_device_events(prof.key_averages())
    index = torch.cuda.current_device() if device.index is None else device.index
    events = prof.events()
    dev, host = split_events(events, index)
    timeline = gpu_timeline(dev, host) if dev else None
    sequence = device_sequence(events, index)
    return dataclasses.replace(total, timeline=timeline, idle_before=idle_before(sequence),
                               after=most_often_after(sequence))


__all__ = ["KERNEL_CLASSES", "IdleGap", "KernelTime", "Timeline", "device_sequence", "gpu_timeline", "idle_before",
           "kernel_class", "kernel_time", "most_often_after", "split_events", "sum_device_events"]
