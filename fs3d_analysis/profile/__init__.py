"""Module-level profiling of a pipeline: latency, FLOPs, traces and a roofline view.

    df = profile_latency(pipe, Workload.synthetic(), modules="auto")     # CUDA events / wall clock
    fl = count_flops(pipe, Workload.synthetic())                         # FlopCounterMode + fvcore
    trace(pipe, Workload.synthetic(), "runs/trace")                      # TensorBoard / Perfetto
    peak = measure_matmul_peak("cuda", torch.float16)
    roofline_table(df, fl, peak)
"""
from .closed_form import (linear_flops, padded_attention_flops, sdpa_flops, sparse_conv_flops, submanifold_pairs,
                          transformer_block_flops, varlen_attention_flops, window_lengths)
from .flops import FLOP_RULES, count_flops, neighbour_pair_count, register_flop_rule, stage_flops_table
from .latency import ModuleTimer, device_name, profile_latency, stage_table
from .modules import CATEGORIES, select_modules
from .workload import Workload, make_runner, replace_coords, shell_coords, synthetic_inputs, voxelize_mesh

__all__ = [
    "CATEGORIES", "FLOP_RULES", "ModuleTimer", "Workload", "count_flops", "device_name", "linear_flops",
    "make_runner", "neighbour_pair_count", "padded_attention_flops", "profile_latency", "register_flop_rule",
    "replace_coords", "sdpa_flops", "select_modules", "shell_coords", "sparse_conv_flops", "stage_flops_table",
    "stage_table", "submanifold_pairs", "synthetic_inputs", "transformer_block_flops", "varlen_attention_flops",
    "voxelize_mesh", "window_lengths",
]
