"""``fs3d_analysis.profile.busy``: kernel-time summing over profiler rows, and CPU devices refused."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from fs3d_analysis.profile.busy import KernelTime, kernel_time, sum_device_events


def _row(device: DeviceType, us: float, count: int) -> SimpleNamespace:
    return SimpleNamespace(device_type=device, device_time_total=us, count=count)


def test_sums_only_device_rows():
    rows = [_row(DeviceType.CUDA, 1500.0, 3), _row(DeviceType.CPU, 9000.0, 50),  # an operator: repeats its kernels
            _row(DeviceType.CUDA, 250.0, 2)]
    got = sum_device_events(rows)
    assert got == KernelTime(seconds=pytest.approx(0.00175), launches=5)


def test_no_device_rows_is_zero():
    assert sum_device_events([_row(DeviceType.CPU, 10.0, 1)]) == KernelTime(seconds=0.0, launches=0)


def test_cpu_device_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernel_time(lambda: torch.ones(2) + 1, "cpu")
