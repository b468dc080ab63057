"""``fs3d_analysis.profile.busy``: kernel-time summing over profiler rows, and CPU devices refused."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from fs3d_analysis.profile.busy import KernelTime, gpu_timeline, kernel_class, kernel_time, sum_device_events


def _row(device: DeviceType, us: float, count: int, key: str = "k") -> SimpleNamespace:
    return SimpleNamespace(key=key, device_type=device, device_time_total=us, count=count)


def test_sums_only_device_rows():
    rows = [_row(DeviceType.CUDA, 1500.0, 3, "nvjet_sm90_tst_256x128"),
            _row(DeviceType.CPU, 9000.0, 50, "aten::linear"),  # an operator: repeats its kernels
            _row(DeviceType.CUDA, 250.0, 2, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
            _row(DeviceType.CUDA, 100.0, 1, "nvjet_sm90_tst_256x128")]  # same kernel again: merged
    got = sum_device_events(rows)
    assert got == KernelTime(seconds=pytest.approx(0.00185), launches=6)
    assert got.by_kernel == {"nvjet_sm90_tst_256x128": (pytest.approx(0.0016), 4),
                             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": (pytest.approx(0.00025), 2)}
    assert got.by_class() == {"matmul": pytest.approx(0.0016), "attention": pytest.approx(0.00025)}
    assert list(got.by_class()) == ["matmul", "attention"]  # largest first


@pytest.mark.parametrize("name,label", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
    ("kernel_cutlass_FlashAttentionForwardSm90_object_at", "attention"),
    ("nvjet_sm90_tst_256x112_64x4_2x1_v_bz_coopA_bias_TNT", "matmul"),
    ("void at::native::vectorized_gather_kernel<16, long>(char*)", "copy / memset"),
    ("Memset (Device)", "copy / memset"),
    ("triton_per_fused__to_copy_add_mul_native_layer_norm_split", "fused (triton)"),
    ("triton_per_fused__scaled_dot_product_cudnn_attention__to_copy_clamp_min", "fused (triton)"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "norm / reduce"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add>", "element-wise"),
    ("some_custom_kernel", "other"),
    ("void at::native::unrolled_elementwise_kernel<convert_to_float>", "element-wise"),  # "convert" is no conv
])
def test_kernel_classes(name, label):
    assert kernel_class(name) == label


def test_no_device_rows_is_zero():
    assert sum_device_events([_row(DeviceType.CPU, 10.0, 1)]) == KernelTime(seconds=0.0, launches=0)


def test_cpu_device_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernel_time(lambda: torch.ones(2) + 1, "cpu")


def test_timeline_idle_tenths_and_gaps():
    # window 0..1000 us (the host events span it); kernels busy 100-300, 250-400 (overlap: counted once), 900-1000
    device = [(100.0, 300.0), (250.0, 400.0), (900.0, 1000.0)]
    host = [(0.0, 1000.0, "sampler"), (400.0, 900.0, "record"), (450.0, 800.0, "cudaStreamEndCapture"),
            (0.0, 50.0, "setup")]
    tl = gpu_timeline(device, host, bins=10, top=2)
    assert tl.window_ms == pytest.approx(1.0)
    assert tl.idle_ms == pytest.approx(0.6)  # 0-100 and 400-900
    assert tl.idle_by_tenth == pytest.approx((1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0))
    assert [(g.start_ms, g.ms) for g in tl.gaps] == [(pytest.approx(0.4), pytest.approx(0.5)),
                                                    (pytest.approx(0.0), pytest.approx(0.1))]
    assert tl.gaps[0].host == "sampler > record"  # the capture opened after the gap began
    assert tl.gaps[1].host == "sampler > setup"


def test_timeline_device_only_and_bad_input():
    tl = gpu_timeline([(10.0, 20.0), (30.0, 40.0)], [], bins=2)
    assert tl.window_ms == pytest.approx(0.03) and tl.idle_ms == pytest.approx(0.01)
    assert tl.idle_by_tenth == pytest.approx((1 / 3, 1 / 3))  # the gap 20-30 straddles the middle (25)
    assert tl.gaps[0].host == ""
    with pytest.raises(ValueError, match="no device events"):
        gpu_timeline([], [(0.0, 1.0, "x")])
    with pytest.raises(ValueError, match="bins must be"):
        gpu_timeline([(0.0, 1.0)], [], bins=0)
