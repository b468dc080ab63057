"""How fast the host runs right now: a fixed micro-workload timed before each benchmark unit.

Session 28 found the host of the lent H100 machine running every operation of a traced SLaT call 1.5-1.8x slower in
some calls than in others of the same code (``aten::empty`` 8.7 against 4.9-5.5 us, ``cudaLaunchKernel`` 10.0-10.4
against 6.9-8.6 us; ``benchmarks/results/slat_host_profile_h100/session28/``), in states lasting seconds, long enough
to move a whole unit's median of host-bound calls by 10-25 ms. Timing the same small mix of host work before each unit
tells such a unit apart from a real difference between variants:

    probe = probe_host(torch.device("cuda"))
    probe.us_per_op        # median microseconds per operation of the mix

The mix is what a host-bound SLaT first step is made of: a device allocation through the caching allocator, a tiny
kernel launch and a plain Python call. It queues a few hundred tiny kernels on the GPU and synchronises once first,
so that it does not time the tail of earlier work.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostProbe:
    """Median microseconds per operation of the probe's mix over its repeats, and each repeat's value."""

    us_per_op: float
    repeats_us: tuple[float, ...]


def _python_call(x: int) -> int:
    return x + 1


def probe_host(device: torch.device | str, ops: int = 200, repeats: int = 5) -> HostProbe:
    """Time ``repeats`` rounds of ``ops`` x (a 64-element allocation on ``device``, an in-place add on it, a Python
    call) with ``time.perf_counter``; the median round, per operation (three per iteration). Raises ValueError for
    ``ops`` or ``repeats`` below 1."""
    if isinstance(ops, bool) or not isinstance(ops, int) or ops < 1:
        raise ValueError(f"ops must be an int >= 1, got {ops!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rounds = []
    with torch.no_grad():
        for _ in range(repeats):
            acc = 0
            t0 = time.perf_counter()
            for i in range(ops):
                x = torch.empty(64, device=device)
                x.add_(1.0)
                acc = _python_call(acc)
            rounds.append(1e6 * (time.perf_counter() - t0) / (3 * ops))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return HostProbe(us_per_op=statistics.median(rounds), repeats_us=tuple(rounds))
