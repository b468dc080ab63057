"""How much of a call's wall time the GPU spends running kernels: the host-bound vs GPU-bound test.

A call whose summed kernel time is far below its wall time waits on the host (Python, kernel launches,
synchronisations); its time then depends on the CPU it runs next to, not on the GPU. That is why the
official SAM 3D code's timings move between machine leases while a compiled, GPU-bound path's do not.

    kernels = kernel_time(lambda: sampler(...), torch.device("cuda"))
    busy = kernels.seconds / median_wall_seconds
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class KernelTime:
    """Summed device time of one call's kernels, memory copies and memsets, and how many were launched."""

    seconds: float
    launches: int


def sum_device_events(events: Iterable[Any]) -> KernelTime:
    """Sum ``torch.profiler`` ``key_averages()`` rows that ran on the GPU.

    Rows carry ``device_type`` (a ``DeviceType``), ``device_time_total`` (microseconds) and ``count``.
    CPU rows (operators, whose ``device_time_total`` repeats their kernels' time) are left out, so no
    kernel is counted twice.
    """
    seconds, launches = 0.0, 0
    for e in events:
        if getattr(e.device_type, "name", str(e.device_type)) != "CUDA":
            continue
        seconds += e.device_time_total / 1e6
        launches += e.count
    return KernelTime(seconds=seconds, launches=launches)


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
    return sum_device_events(prof.key_averages())


__all__ = ["KernelTime", "kernel_time", "sum_device_events"]
