"""How much of a call's wall time the GPU spends running kernels: the host-bound vs GPU-bound test.

A call whose summed kernel time is far below its wall time waits on the host (Python, kernel launches,
synchronisations); its time then depends on the CPU it runs next to, not on the GPU. That is why the
official SAM 3D code's timings move between machine leases while a compiled, GPU-bound path's do not.

    kernels = kernel_time(lambda: sampler(...), torch.device("cuda"))
    busy = kernels.seconds / median_wall_seconds
"""
from __future__ import annotations

import re
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
class KernelTime:
    """Summed device time of one call's kernels, memory copies and memsets, and how many were launched;
    ``by_kernel`` maps each kernel name to its (seconds, launches)."""

    seconds: float
    launches: int
    by_kernel: dict[str, tuple[float, int]] = field(default_factory=dict, compare=False)

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
    time) are left out, so no kernel is counted twice.
    """
    seconds, launches = 0.0, 0
    by_kernel: dict[str, tuple[float, int]] = {}
    for e in events:
        if getattr(e.device_type, "name", str(e.device_type)) != "CUDA":
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
    return sum_device_events(prof.key_averages())


__all__ = ["KERNEL_CLASSES", "KernelTime", "kernel_class", "kernel_time", "sum_device_events"]
