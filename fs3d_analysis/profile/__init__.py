"""Module-level profiling of a pipeline: latency, FLOPs, traces and a roofline view.

    wl = Workload.synthetic(coords=shell_coords(64, 13000))            # realistic sparse size
    lat = profile_latency(pipe, wl, modules="auto")                    # CUDA events / wall clock
    fl = count_flops(pipe, wl)                                         # FlopCounterMode + fvcore
    trace(pipe, wl, "runs/trace")                                      # TensorBoard / Perfetto
    roofline_table(lat, fl, measure_matmul_peak("cuda", torch.float16))
    kernel_time(lambda: run(), "cuda").seconds / wall_s                # GPU busy: host- or GPU-bound?
    attribute_idle(load_trace("trace.json.gz")).by_project             # which host code the GPU waits on
    probe_host("cuda").us_per_op                                       # how fast the host runs right now
"""
from .busy import KernelTime, kernel_time, sum_device_events
from .closed_form import (linear_flops, padded_attention_flops, sdpa_flops, sparse_conv_flops, submanifold_pairs,
                          transformer_block_flops, varlen_attention_flops, window_lengths)
from .host_probe import HostProbe, probe_host
from .idle_attribution import IdleAttribution, PartTime, attribute_idle, load_trace, part_times
from .flops import FLOP_RULES, count_flops, neighbour_pair_count, register_flop_rule, stage_flops_table
from .latency import ModuleTimer, device_name, profile_latency, stage_table
from .modules import CATEGORIES, select_modules
from .roofline import DevicePeak, measure_matmul_peak, measure_memory_bandwidth, roofline_table
from .trace import trace
from .workload import Workload, make_runner, replace_coords, shell_coords, synthetic_inputs, voxelize_mesh

__all__ = [
    "CATEGORIES", "DevicePeak", "FLOP_RULES", "HostProbe", "IdleAttribution", "KernelTime", "ModuleTimer", "PartTime",
    "Workload", "attribute_idle", "count_flops", "device_name", "kernel_time", "load_trace", "part_times",
    "probe_host", "sum_device_events",
    "linear_flops", "make_runner", "measure_matmul_peak", "measure_memory_bandwidth", "neighbour_pair_count",
    "padded_attention_flops", "profile_latency", "register_flop_rule", "replace_coords", "roofline_table",
    "sdpa_flops", "select_modules", "shell_coords", "sparse_conv_flops", "stage_flops_table", "stage_table",
    "submanifold_pairs", "synthetic_inputs", "trace", "transformer_block_flops", "varlen_attention_flops",
    "voxelize_mesh", "window_lengths",
]
