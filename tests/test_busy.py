"""``fs3d_analysis.profile.busy``: kernel-time summing over profiler rows, and CPU devices refused."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from fs3d_analysis.profile.busy import (KernelTime, device_sequence, gpu_timeline, idle_before, kernel_class,
                                       kernel_time, most_often_after, split_events, sum_device_events)


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
    with pytest.raises(ValueError, match="top must be"):
        gpu_timeline([(0.0, 1.0)], [], top=-1)
    with pytest.raises(ValueError, match="span no time"):
        gpu_timeline([(5.0, 5.0)], [])


def test_timeline_trailing_idle_and_top():
    # busy 0-100 and 150-200 us; the host runs on to 600 us (e.g. a synchronisation after the last kernel)
    tl = gpu_timeline([(0.0, 100.0), (150.0, 200.0)], [(0.0, 600.0, "call"), (250.0, 600.0, "cudaDeviceSynchronize")],
                      bins=3, top=1)
    assert tl.window_ms == pytest.approx(0.6) and tl.idle_ms == pytest.approx(0.45)
    assert tl.idle_by_tenth == pytest.approx((0.25, 1.0, 1.0))  # 100-150 in the first 200 us, then idle
    assert len(tl.gaps) == 1 and (tl.gaps[0].start_ms, tl.gaps[0].ms) == (pytest.approx(0.2), pytest.approx(0.4))
    assert tl.gaps[0].host == "call"  # the synchronisation opened after the gap began
    assert gpu_timeline([(0.0, 100.0)], [(0.0, 600.0, "call")], top=0).gaps == ()


def _event(start, end, device, name="k", **kw) -> SimpleNamespace:
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device, name=name, **kw)


def test_split_events_keeps_work_and_host_spans():
    events = [_event(0.0, 10.0, DeviceType.CUDA, "nvjet", device_index=0),
              _event(5.0, 50.0, DeviceType.CUDA, "gpu_user_annotation", device_index=0, is_user_annotation=True),
              _event(12.0, 20.0, DeviceType.CUDA, "kernel on another GPU", device_index=1),
              _event(30.0, 30.0, DeviceType.CUDA, "[memory]", device_index=0),  # an instant: no work
              _event(0.0, 40.0, DeviceType.CPU, "aten::linear"),
              _event(15.0, 15.0, DeviceType.CPU, "[memory]")]
    device, host = split_events(events, device_index=0)
    assert device == [(0.0, 10.0)]
    assert host == [(0.0, 40.0, "aten::linear")]
    assert split_events(events)[0] == [(0.0, 10.0), (12.0, 20.0)]  # every GPU without an index


def test_device_sum_leaves_out_gpu_annotations():
    rows = [_row(DeviceType.CUDA, 100.0, 1, "nvjet"),
            SimpleNamespace(key="gpu_user_annotation", device_type=DeviceType.CUDA, device_time_total=900.0, count=1,
                            is_user_annotation=True)]
    assert sum_device_events(rows) == KernelTime(seconds=pytest.approx(1e-4), launches=1)


def test_device_sequence_selects_as_split_events_in_start_order():
    events = [_event(12.0, 20.0, DeviceType.CUDA, "b", device_index=0),
              _event(0.0, 10.0, DeviceType.CUDA, "a", device_index=0),
              _event(5.0, 50.0, DeviceType.CUDA, "gpu_user_annotation", device_index=0, is_user_annotation=True),
              _event(1.0, 2.0, DeviceType.CUDA, "other GPU", device_index=1),
              _event(30.0, 30.0, DeviceType.CUDA, "[memory]", device_index=0),
              _event(0.0, 40.0, DeviceType.CPU, "aten::linear")]
    assert device_sequence(events, device_index=0) == [(0.0, 10.0, "a"), (12.0, 20.0, "b")]


def test_idle_before_charges_each_gap_to_the_kernel_after_it():
    # a 0-10, memset 11-12 (1 us wait), a 14-20 (2 us), b 15-30 overlaps a (no wait), Memset 33-34 (3 us after b's end)
    seq = [(14.0, 20.0, "a"), (0.0, 10.0, "a"), (11.0, 12.0, "Memset"), (15.0, 30.0, "b"), (33.0, 34.0, "Memset")]
    got = idle_before(seq)
    assert got == {"a": (pytest.approx(2e-6), 2), "Memset": (pytest.approx(4e-6), 2), "b": (0.0, 1)}
    # the values add up to the idle between the first event's start and the last one's end
    assert sum(s for s, _ in got.values()) == pytest.approx((34.0 - 0.0 - (10 + 1 + 16 + 1)) / 1e6)
    assert idle_before([]) == {}
    with pytest.raises(ValueError, match="ends before it starts"):
        idle_before([(5.0, 4.0, "x")])


def test_most_often_after_names_each_kernels_usual_predecessor():
    # start order: gemm, Memset, fa, gemm, Memset, fa, norm, Memset, fa (events given out of order)
    seq = [(0.0, 1.0, "gemm"), (2.0, 3.0, "Memset"), (4.0, 5.0, "fa"), (6.0, 7.0, "gemm"), (8.0, 9.0, "Memset"),
           (10.0, 11.0, "fa"), (12.0, 13.0, "norm"), (14.0, 15.0, "Memset"), (16.0, 17.0, "fa")]
    got = most_often_after(reversed(seq))
    assert got == {"gemm": ("", 1), "Memset": ("gemm", 2), "fa": ("Memset", 3), "norm": ("fa", 1)}
    assert most_often_after([]) == {}
