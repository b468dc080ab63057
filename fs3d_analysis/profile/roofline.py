"""Roofline view: achieved FLOP/s per module against the device's measured peaks.

``measure_matmul_peak`` times large square matrix products (the best a module can hope for);
``measure_memory_bandwidth`` times a device-to-device copy. A module's arithmetic intensity is its
FLOPs over ``bytes_min`` (inputs + outputs + weights once per call, a lower bound of its traffic);
below the ridge point ``peak_flops / bandwidth`` it is memory-bound (it cannot reach the matmul
peak even with perfect kernels), above it compute-bound. ``fraction_of_roof`` says how far the
module is from what its bound allows: a small fraction on a compute-bound module points to
launch/host overhead or poor kernels rather than to the hardware.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .latency import device_name


@dataclass(frozen=True)
class DevicePeak:
    """Measured peaks: FLOP/s of a ``size``^3 matmul in ``dtype`` and copy bandwidth (bytes/s)."""

    device: str
    dtype: str
    flops_per_s: float
    bytes_per_s: float
    size: int

    @property
    def tflops(self) -> float:
        return self.flops_per_s / 1e12

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOPs/byte) where the memory and compute roofs meet."""
        return self.flops_per_s / self.bytes_per_s


def _time(fn, device: torch.device, iters: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def measure_memory_bandwidth(device: str | torch.device = "cpu", megabytes: int | None = None, iters: int = 5) -> float:
    """Copy bandwidth in bytes/s (read + write counted), from a ``megabytes`` buffer copy."""
    dev = torch.device(device)
    mb = megabytes or (1024 if dev.type == "cuda" else 128)
    n = mb * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    sec = _time(lambda: dst.copy_(src), dev, iters)
    return 2 * n * 4 / sec


def measure_matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        size: int | None = None, iters: int | None = None, bandwidth: bool = True) -> DevicePeak:
    """Peak FLOP/s of a square matmul (2 n^3 FLOPs) on ``device`` in ``dtype`` (best of 3 timings),
    plus the copy bandwidth when ``bandwidth``. Defaults: n = 8192 on CUDA, 1024 on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 matmul is not a meaningful CPU peak; use float32 or bfloat16")
    n = size or (8192 if dev.type == "cuda" else 1024)
    it = iters or (20 if dev.type == "cuda" else 3)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    with torch.no_grad():
        best = min(_time(lambda: torch.mm(a, b), dev, it) for _ in range(3))
    bw = measure_memory_bandwidth(dev) if bandwidth else float("nan")
    return DevicePeak(device_name(dev), str(dtype).replace("torch.", ""), 2 * n ** 3 / best, bw, n)


def roofline_table(latency: pd.DataFrame, flops: pd.DataFrame, peak: DevicePeak | float) -> pd.DataFrame:
    """Join latency and FLOPs per module: achieved FLOP/s, fraction of the matmul peak,
    arithmetic intensity, bound (compute / memory) and fraction of the roof its bound allows.

    ``peak``: a :class:`DevicePeak` or a FLOP/s number (then no memory roof: ``bound`` is NaN).
    Both tables must come from the same inputs (FLOPs and time per run).
    """
    for name, df, cols in (("latency", latency, ("module", "total_s")), ("flops", flops, ("module", "flops"))):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} table lacks columns {missing}")
    if isinstance(peak, DevicePeak):
        pf, bw = peak.flops_per_s, peak.bytes_per_s
    else:
        pf, bw = float(peak), float("nan")
    if not pf > 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {pf}")
    fcols = ["module", "flops"] + [c for c in ("bytes_min", "rule") if c in flops.columns]
    df = latency.merge(flops[fcols], on="module", how="inner")
    df["achieved_flops_per_s"] = df["flops"] / df["total_s"]
    df["achieved_tflops"] = df["achieved_flops_per_s"] / 1e12
    df["fraction_of_peak"] = df["achieved_flops_per_s"] / pf
    if "bytes_min" in df.columns and bw == bw:
        ai = df["flops"] / df["bytes_min"].replace(0, np.nan)
        df["intensity"] = ai
        roof = np.minimum(pf, ai * bw)
        df["roof_flops_per_s"] = roof
        df["bound"] = np.where(ai.isna(), None, np.where(ai >= pf / bw, "compute", "memory"))
        df["fraction_of_roof"] = df["achieved_flops_per_s"] / roof
    else:
        df["intensity"] = np.nan
        df["roof_flops_per_s"] = pf
        df["bound"] = None
        df["fraction_of_roof"] = df["fraction_of_peak"]
    df.attrs.update({"peak_flops_per_s": pf, "bandwidth_bytes_per_s": bw,
                     "peak": peak if isinstance(peak, DevicePeak) else None})
    return df


__all__ = ["DevicePeak", "measure_matmul_peak", "measure_memory_bandwidth", "roofline_table"]
