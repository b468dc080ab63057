"""Stage-by-stage latency of the reference pipeline at true scale (``full`` config) on one GPU.

Times, with CUDA events after warm-up (medians of ``--repeats``):
  * SS stage (condition + 25-step sampler with CFG 7 + SS decoder + voxel extraction + layout),
  * one SS flow network pass,
  * SLaT stage (condition + 25-step sampler with CFG 1) on the surface voxels of real YCB scans
    voxelised to 64^3 (``benchmarks/data/ycb_surface_coords_r64.npz``), and one SLaT pass per N,
  * mesh decoder network (sparse swin transformer + 2 subdivisions) per N,
for several precision / fast-path variants, and writes a Markdown + CSV table with the device name
and the parameter count of each stage.

    python benchmarks/stage_latency.py --out runs/stage_latency            # GPU, full config
    python benchmarks/stage_latency.py --config mini --device cpu --repeats 1 --variants fp32  # smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from benchmarks/
    sys.path.insert(0, str(ROOT))
from benchmarks.synthetic_scene import synthetic_inputs  # noqa: E402,F401 (re-exported to the other benchmarks)
from fs3d_accel.model.sparse import CONV_IMPLS  # noqa: E402
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_accel.stages.options import RunOptions  # noqa: E402

#: where FlashAttention-4 beat cuDNN SDPA per call launched from Python on the H100 (session 6,
#: ``results/attention_kernels_h100/run_fa4``): SS cross-attention (435 vs 392 TFLOP/s), SLaT self (352 vs 311) and
#: cross (407 vs 337); not SS self (308 vs 403). Timed from CUDA graphs (session 12, ``.../session12/``) FA4 wins at SS
#: self too (494 vs 475); launched one by one, most likely its host cost was in those numbers (inferred: the two
#: timings ran on different machines). Kept for the session 7 variants.
FA4_FASTER_SITES = ("ss.cross", "slat.self", "slat.cross")

VARIANTS = {
    "official-like (fp32 weights, fp16 autocast)": RunOptions(precision="autocast-fp16"),
    "fp32": RunOptions(precision="fp32"),
    "bf16 weights": RunOptions(precision="bf16"),
    "bf16 + batched CFG": RunOptions(precision="bf16", batch_cfg=True),
    "bf16 + batched CFG + cond K/V cache": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True),
    "... + torch.compile (SS)": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True),
    "... + compile with CUDA graphs (SS)": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True,
                                                      compile_ss=True, compile_mode="reduce-overhead"),
    "... + CUDA graphs (SS, SLaT; eager kernels)": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True,
                                                              cuda_graphs=True),
    "... + torch.compile (SS) + CUDA graphs (SLaT)": RunOptions(precision="bf16", batch_cfg=True,
                                                                cache_cond_kv=True, compile_ss=True, cuda_graphs=True),
    "... + torch.compile (SS, SLaT blocks)": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True,
                                                        compile_ss=True, compile_slat=True),
    "... + torch.compile (SS, SLaT blocks) + CUDA graphs (SLaT)": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True, cuda_graphs=True),
    "... + torch.compile (SS, SLaT blocks) + one-key K/V of the zero condition": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True),
    "... + one-key K/V of the zero condition + FlashAttention-4": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute"),
    "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",)),
    "... + one-key K/V of the zero condition, reduce-overhead": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, compile_mode="reduce-overhead"),
    "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT, reduce-overhead": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",),
        compile_mode="reduce-overhead"),
    "... + one-key K/V of the zero condition + FlashAttention-4 where it is faster per kernel": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=FA4_FASTER_SITES),
    "... + one-key K/V of the zero condition + FlashAttention-4 where it is faster per kernel, reduce-overhead":
        RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                   collapse_zero_cond=True, attention_kernel="flash-attn-cute",
                   attention_kernel_sites=FA4_FASTER_SITES, compile_mode="reduce-overhead"),
    "... + torch.compile reduce-overhead (SS, SLaT blocks)": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        compile_mode="reduce-overhead"),
    # the sparse-conv algorithm of "auto" before session 8 (cuBLAS on gathered / transformed blocks), for comparisons
    "... + one-key K/V of the zero condition, reduce-overhead, gather-or-transform sparse conv": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, compile_mode="reduce-overhead", sparse_conv="gather-or-transform"),
    "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT, reduce-overhead, gather-or-transform "
    "sparse conv": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",),
        compile_mode="reduce-overhead", sparse_conv="gather-or-transform"),
    # per-stage compile modes (session 11): CUDA graphs in SS, where one static graph replays with the held K/V, and
    # the default mode in SLaT, whose graphs are recorded anew for every token count. Machine-dependent: SLaT 7-8% faster
    # than under reduce-overhead on one H100 lease, 1-67% slower on another (results/base_vs_official_h100/session11/)
    "... + one-key K/V of the zero condition, reduce-overhead in SS only": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, compile_mode="reduce-overhead", slat_compile_mode="default"),
    "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT, reduce-overhead in SS only": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",),
        compile_mode="reduce-overhead", slat_compile_mode="default"),
    # FA4 at every SS and SLaT attention under CUDA graphs: the setting to try with tuned FA4 tiles (``NAME@SITE=TILES``)
    "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead": RunOptions(
        precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("ss", "slat"),
        compile_mode="reduce-overhead"),
}
# + the SS layout stream's attention (4 queries) as fp32 matmuls instead of a fused kernel (session 13: slower)
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
         "attention as matmuls"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead"],
    small_query_attention=16)
# + the same calls through SDPA's FlashAttention-2, which splits the keys over CTAs (session 13: SS 5% faster;
# the named fast path ``compiled-zkv-fa4-all-sqfa2``)
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
         "attention by FlashAttention-2"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead"],
    small_query_attention=16, small_query_kernel="sdpa-flash2")
# + the MLPs' first GEMM with cuBLASLt's bias + GELU epilogue (``RunOptions.gelu_epilogue``): without FA4, so one GPU
# call can time it, and on the fastest FA4 path
VARIANTS["... + one-key K/V of the zero condition, reduce-overhead, GELU in the GEMM epilogue"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition, reduce-overhead"], gelu_epilogue=True)
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
             "attention by FlashAttention-2"], gelu_epilogue=True)
# the same with SLaT's whole pass (IO blocks + compiled torso, default mode) captured in one CUDA graph per object and
# batch size (``cuda_graphs``, ``stages.graphs.GraphedCall``) instead of inductor's graphs of the torso alone: one launch
# per step where session 14's idle timeline found SLaT host-bound at 5k (the eager IO blocks around each replay)
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
             "attention by FlashAttention-2, GELU in the GEMM epilogue"], slat_compile_mode="default", cuda_graphs=True)
# the GELU path with token buckets for the SLaT torso (``slat_token_bucket``: pad to buckets 1/16 of the size apart, the
# padding masked as keys, the K/V held), so objects of one bucket share the torso's CUDA graphs instead of recording two
# each (session 14's idle timeline); measured over many sizes by ``slat_many_sizes.py``
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT token buckets"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
             "attention by FlashAttention-2, GELU in the GEMM epilogue"], slat_token_bucket=1 / 16)
# the GELU path with the SLaT IO res-blocks' element-wise steps compiled (``fuse_slat_io``): ~0.03 s of LayerNorm,
# cast and SiLU kernels per SLaT call at 14k in session 14's kernel table, and the host time of their launches at 5k
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, fused SLaT IO steps"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead, small-query "
             "attention by FlashAttention-2, GELU in the GEMM epilogue"], fuse_slat_io=True)
# both SLaT host-time cuts together: the whole-pass graph with the IO blocks' element-wise steps compiled inside it
# (the graph removes their launches' host time, the fusion their ~0.03 s of kernels at 14k)
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs, fused SLaT IO "
         "steps"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, "
             "small-query attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs"],
    fuse_slat_io=True)
# ... with those graphs recorded without a device synchronisation (``async_graph_capture``): the batch-1 graph, recorded
# once CFG ends, then waits behind the replays already queued instead of idling the GPU
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs recorded without "
         "a sync, fused SLaT IO steps"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, "
             "small-query attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs, "
             "fused SLaT IO steps"], async_graph_capture=True)
# ... and one memory pool kept by the SLaT stage for every graph (``shared_graph_pool``): the batch-1 recording reuses
# the batch-2 graph's temporaries, and the next object this one's memory, instead of asking for fresh device memory
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs recorded without "
         "a sync in one memory pool, fused SLaT IO steps"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
             "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs recorded without "
             "a sync, fused SLaT IO steps"], shared_graph_pool=True)
# ... with the CFG-batched graph recorded at the first step, without an eager warm-up pass, once the process has run
# that kind of pass (``graph_record_first``; its tables come from ``build_structure``)
VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
         "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs recorded without "
         "a sync or a warm-up pass, fused SLaT IO steps"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
             "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs recorded without "
             "a sync, fused SLaT IO steps"], graph_record_first=True)
# ... with 2-4 eager passes before each SLaT graph records (``slat_graph_warmup``): the eager passes queue GPU work
# ahead of the recording's host time, so the asynchronous recording overlaps them instead of idling the GPU
AC_LONG = ("... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, small-query "
           "attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs recorded without "
           "a sync, fused SLaT IO steps")
WARMUP_LONG = ("... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, "
               "small-query attention by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs "
               "recorded without a sync after {n} eager passes, fused SLaT IO steps")
for _n in (2, 3, 4):
    VARIANTS[WARMUP_LONG.format(n=_n)] = dataclasses.replace(VARIANTS[AC_LONG], slat_graph_warmup=_n)
# ... with the GELU epilogue in SS only (``gelu_epilogue_sites``): a cuBLAS GEMM pays host time at its first call with a
# new token count (~5 ms per shape, ~10 ms for the epilogue GEMM, session 17), which every new SLaT object meets; alone
# and with the graphs recorded at their first call
SS_GELU_LONG = ("... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, reduce-overhead in SS, "
                "small-query attention by FlashAttention-2, GELU in SS's GEMM epilogue, SLaT passes as whole CUDA graphs "
                "recorded without a sync{rf}, fused SLaT IO steps")
VARIANTS[SS_GELU_LONG.format(rf="")] = dataclasses.replace(VARIANTS[AC_LONG], gelu_epilogue_sites=("ss",))
VARIANTS[SS_GELU_LONG.format(rf=" or a warm-up pass")] = dataclasses.replace(
    VARIANTS[AC_LONG], gelu_epilogue_sites=("ss",), graph_record_first=True)
# ... with the torso's tokens in buckets 1/16 apart (``slat_token_bucket``, session 14's buckets inside the whole-pass
# graphs): every object of a bucket meets the torso's GEMM shapes at the counts cuBLAS has already chosen algorithms
# for, so the first-call host cost is paid once per bucket instead of once per object, and the GELU epilogue can stay
TB_AC_LONG = AC_LONG.replace("fused SLaT IO steps", "fused SLaT IO steps, SLaT token buckets")
VARIANTS[TB_AC_LONG] = dataclasses.replace(VARIANTS[AC_LONG], slat_token_bucket=1 / 16)
# ... the stream path with its batch-1 graph recorded after the 8th guided step (``unguided_graph_ahead``): the host is
# then ~8 replays ahead, so that recording's host time (with its cuBLAS first calls) overlaps queued GPU work instead of
# idling the GPU at CFG's end
UA_LONG = SS_GELU_LONG.format(rf=" or a warm-up pass, the unguided one ahead of its first call")
VARIANTS[UA_LONG] = dataclasses.replace(VARIANTS[SS_GELU_LONG.format(rf=" or a warm-up pass")], unguided_graph_ahead=8)
# ... the headline path (GELU epilogue in SS and SLaT) with both SLaT graphs recorded without a warm-up pass: the
# CFG-batched one at its first call, the batch-1 one after the 8th guided step, while replays are queued. For repeated
# objects, where the epilogue pays and no cuBLAS first call is left: what remains of the start-of-object and CFG-end idle
RF_UA_LONG = AC_LONG.replace("recorded without a sync", "recorded without a sync or a warm-up pass, the unguided one "
                             "ahead of its first call")
VARIANTS[RF_UA_LONG] = dataclasses.replace(VARIANTS[AC_LONG], graph_record_first=True, unguided_graph_ahead=8)
# ... with the whole-pass graphs recorded in pieces of n transformer blocks (``slat_graph_piece_blocks``), each queued
# as soon as it is recorded: the first pass's recording, made with nothing queued ahead, then overlaps its own pieces'
# GPU work; alone (warmed recording) and with the recordings of ``-rf-ua``
GP_LONG = "{base}, recorded in pieces of {n} blocks"
for _n in (2, 4, 8):
    VARIANTS[GP_LONG.format(base=RF_UA_LONG, n=_n)] = dataclasses.replace(VARIANTS[RF_UA_LONG],
                                                                          slat_graph_piece_blocks=_n)
VARIANTS[GP_LONG.format(base=AC_LONG, n=4)] = dataclasses.replace(VARIANTS[AC_LONG], slat_graph_piece_blocks=4)
# ... the 2-block pieces merged into one graph after 4 calls (``slat_graph_merge_after``): the pieces' extra launches
# (~3 ms per call at 14k, session 19) on the later steps only
GP_MERGE_LONG = GP_LONG.format(base=RF_UA_LONG, n=2) + ", merged after 4 calls"
VARIANTS[GP_MERGE_LONG] = dataclasses.replace(VARIANTS[GP_LONG.format(base=RF_UA_LONG, n=2)], slat_graph_merge_after=4)
# ... and the batch-1 structure sliced from the CFG pair's (``derive_unguided_tables``): one table build fewer, with its
# host reads, at the start of each object
GP_MERGE_DT_LONG = GP_MERGE_LONG + ", batch-1 tables sliced from the pair's"
VARIANTS[GP_MERGE_DT_LONG] = dataclasses.replace(VARIANTS[GP_MERGE_LONG], derive_unguided_tables=True)
# ... the headline path with inductor's coordinate-descent tuning of its generated Triton kernels (``coordinate_descent``)
CD_LONG = AC_LONG + ", coordinate-descent tuned Triton kernels"
VARIANTS[CD_LONG] = dataclasses.replace(VARIANTS[AC_LONG], coordinate_descent=True)
# ... the merged pieces with sliced tables, with the nested tiled sparse conv (``sparse_conv="implicit-skip-nested"``:
# 3.32 against 3.46 ms per SLaT pass in session 19's cut-off sweep), and that with coordinate descent too: every
# kernel-side change of sessions 18-19 at once, to see how far SLaT at 14k gets
NC_LONG = GP_MERGE_DT_LONG + ", nested tiled sparse conv"
VARIANTS[NC_LONG] = dataclasses.replace(VARIANTS[GP_MERGE_DT_LONG], sparse_conv="implicit-skip-nested")
NC_CD_LONG = NC_LONG + ", coordinate-descent tuned Triton kernels"
VARIANTS[NC_CD_LONG] = dataclasses.replace(VARIANTS[NC_LONG], coordinate_descent=True)
# ... FA4 called through the operator registered with torch.library.Library, whose kernel calls FA4's forward directly
# (``fa4_call="direct"``): the same kernels, less host work per FA4 call in each object's graph recording
FD_LONG = AC_LONG + ", FA4 called directly"
VARIANTS[FD_LONG] = dataclasses.replace(VARIANTS[AC_LONG], fa4_call="direct")
NC_FD_LONG = NC_LONG + ", FA4 called directly"
VARIANTS[NC_FD_LONG] = dataclasses.replace(VARIANTS[NC_LONG], fa4_call="direct")
# ... FA4's cached compiled kernel launched without FA4's forward function after one call per signature
# (``fa4_call="kernel"``): the same kernels, without the ~40-90 µs of Python the forward costs per call (session 21)
FK_LONG = AC_LONG + ", FA4's compiled kernel launched directly"
VARIANTS[FK_LONG] = dataclasses.replace(VARIANTS[AC_LONG], fa4_call="kernel")
NC_FK_LONG = NC_LONG + ", FA4's compiled kernel launched directly"
VARIANTS[NC_FK_LONG] = dataclasses.replace(VARIANTS[NC_LONG], fa4_call="kernel")
# ... and with its tables built by running the input path, as before session 23 (``slat_tables_by_pass``): the
# reference to time the tables-only build against, side by side
NC_FK_TP_LONG = NC_FK_LONG + ", tables built by running the input path"
VARIANTS[NC_FK_TP_LONG] = dataclasses.replace(VARIANTS[NC_FK_LONG], slat_tables_by_pass=True)
# ... and with the torso's 24 blocks inlined into one compiled graph instead of nested regions
# (``slat_block_regions=False``): inductor may then fuse each block's closing gated residual add into the next block's
# first norm (session 15: 312 launches of that add, 7.8 ms per 14k call)
NC_FK_NR_LONG = NC_FK_LONG + ", the torso's blocks inlined into one graph"
VARIANTS[NC_FK_NR_LONG] = dataclasses.replace(VARIANTS[NC_FK_LONG], slat_block_regions=False)
# (the pieces' ends stay fusion barriers there: an op between two blocks. Without pieces, every block boundary can fuse)
FK_NR_LONG = FK_LONG + ", the torso's blocks inlined into one graph"
VARIANTS[FK_NR_LONG] = dataclasses.replace(VARIANTS[FK_LONG], slat_block_regions=False)
# ... the pieces path with each SLaT block's adaLN output computed once per step and kept across calls
# (``cache_block_modulations``): 24 small GEMMs (and SiLU kernels) fewer per pass; in session 24's kernel table that GEMM
# had 675 launches (5.4 ms) per 14k call, 600 of them the blocks'
NC_FK_CM_LONG = NC_FK_LONG + ", block modulations kept per step"
VARIANTS[NC_FK_CM_LONG] = dataclasses.replace(VARIANTS[NC_FK_LONG], cache_block_modulations=True)
# ... and the unconditional rows' cross-attention projected once per block (``one_key_projection``): under
# ``collapse_zero_cond`` their attention returns the one value for every query, so their ``to_q`` GEMM is unused and
# their ``to_out`` GEMM maps equal rows; one row through ``to_out`` replaces both (by arithmetic ~4.7 TFLOP fewer per 14k
# SLaT call, and the cross-attention's ``cat`` then feeds an add that can fuse it). Alone and with the kept modulations
NC_FK_OK_LONG = NC_FK_LONG + ", the unconditional rows' cross-attention projected once"
VARIANTS[NC_FK_OK_LONG] = dataclasses.replace(VARIANTS[NC_FK_LONG], one_key_projection=True)
NC_FK_CM_OK_LONG = NC_FK_CM_LONG + ", the unconditional rows' cross-attention projected once"
VARIANTS[NC_FK_CM_OK_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_LONG], one_key_projection=True)
# ... and the merged graphs recorded from the torso compiled without piece ends, its blocks inlined
# (``slat_merge_inlined``): the steps after the merge get ``-nr``'s fusions across block boundaries, which session 24
# found equal on the pieces path because the piece ends kept the blocks apart there
NC_FK_CM_OK_MI_LONG = NC_FK_CM_OK_LONG + ", merged from the inlined torso"
VARIANTS[NC_FK_CM_OK_MI_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_LONG], slat_merge_inlined=True)
# ... and the CFG pair's condition K/V made with fewer host operations (``lean_cond_kv``: the same tensors; the zero
# rows' one key and value from the ``to_kv`` bias, kept across objects), for the first step's host time (session 28)
NC_FK_CM_OK_MI_LK_LONG = NC_FK_CM_OK_MI_LONG + ", the condition K/V made lean"
VARIANTS[NC_FK_CM_OK_MI_LK_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LONG], lean_cond_kv=True)
# ... and the timestep embedding and the IO blocks' scale and shift kept per step (``cache_io_modulations``), alone and
# with the lean K/V
NC_FK_CM_OK_MI_CI_LONG = NC_FK_CM_OK_MI_LONG + ", the IO modulations kept per step"
VARIANTS[NC_FK_CM_OK_MI_CI_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LONG], cache_io_modulations=True)
NC_FK_CM_OK_MI_LK_CI_LONG = NC_FK_CM_OK_MI_LK_LONG + ", the IO modulations kept per step"
VARIANTS[NC_FK_CM_OK_MI_LK_CI_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LK_LONG], cache_io_modulations=True)
# ... the named path with the pieces' torso inlined (``slat_block_regions=False``), and with that torso compiled with
# inductor's C++ wrapper (``slat_cpp_wrapper``; built in session 28, checked on the CPU only), for the torso's
# recording in a new object's first step
NC_FK_CM_OK_MI_NR_LONG = NC_FK_CM_OK_MI_LONG + ", the pieces' torso inlined"
VARIANTS[NC_FK_CM_OK_MI_NR_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LONG], slat_block_regions=False)
NC_FK_CM_OK_MI_NR_CW_LONG = NC_FK_CM_OK_MI_NR_LONG + ", compiled with inductor's C++ wrapper"
VARIANTS[NC_FK_CM_OK_MI_NR_CW_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_NR_LONG], slat_cpp_wrapper=True)
# ... the lean K/V and kept IO modulations with the torso's generated wrapper left without its run-time checks
# (``slat_wrapper_asserts=False``, session 29: no gain shown), and with the inlined torso through the C++ wrapper, with
# and without them (session 29: the C++ wrapper's code did not compile at full size on the GPU)
NC_FK_CM_OK_MI_LK_CI_NA_LONG = NC_FK_CM_OK_MI_LK_CI_LONG + ", no checks in the torso's wrapper"
VARIANTS[NC_FK_CM_OK_MI_LK_CI_NA_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LK_CI_LONG],
                                                             slat_wrapper_asserts=False)
NC_FK_CM_OK_MI_LK_CI_NR_CW_LONG = (NC_FK_CM_OK_MI_LK_CI_LONG
                                   + ", the pieces' torso inlined, compiled with inductor's C++ wrapper")
VARIANTS[NC_FK_CM_OK_MI_LK_CI_NR_CW_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LK_CI_LONG],
                                                                slat_block_regions=False, slat_cpp_wrapper=True)
NC_FK_CM_OK_MI_LK_CI_NR_CW_NA_LONG = NC_FK_CM_OK_MI_LK_CI_NR_CW_LONG + ", no checks in the torso's wrapper"
VARIANTS[NC_FK_CM_OK_MI_LK_CI_NR_CW_NA_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LK_CI_NR_CW_LONG],
                                                                   slat_wrapper_asserts=False)
# ... and each conditional row's K/V projected once per call by two GEMMs on to_kv's halves, shared by the pair's and
# the batch-1 sets (``split_cond_kv``, session 30): no copies, no GEMM over the zero row
NC_FK_CM_OK_MI_LK_CI_SK_LONG = NC_FK_CM_OK_MI_LK_CI_LONG + ", the condition rows' K/V projected once per call"
VARIANTS[NC_FK_CM_OK_MI_LK_CI_SK_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LK_CI_LONG], split_cond_kv=True)
# ... and SLaT's up-sampling block on the coarse rows (``slat_coarse_upsample``, session 30, CPU only so far): the
# 2,048-channel gather gone, the norm and the skip GEMM on the coarse rows, the first conv through a composed table
NC_FK_CM_OK_MI_LK_CI_SK_CU_LONG = NC_FK_CM_OK_MI_LK_CI_SK_LONG + ", the up-sampling block on the coarse rows"
VARIANTS[NC_FK_CM_OK_MI_LK_CI_SK_CU_LONG] = dataclasses.replace(VARIANTS[NC_FK_CM_OK_MI_LK_CI_SK_LONG],
                                                                slat_coarse_upsample=True)
# max-autotune: inductor benchmarks Triton GEMM templates against cuBLAS per shape (element-wise epilogues fuse into
# the templates) and captures the same CUDA graphs as reduce-overhead; minutes of first-call autotuning, cached in
# TORCHINDUCTOR_CACHE_DIR for later processes on the machine (session 10: not faster, results/base_vs_official_h100/)
VARIANTS["... + one-key K/V of the zero condition, max-autotune"] = dataclasses.replace(
    VARIANTS["... + one-key K/V of the zero condition, reduce-overhead"], compile_mode="max-autotune")
SHORT = {"official-like": "official-like (fp32 weights, fp16 autocast)", "fp32": "fp32", "bf16": "bf16 weights",
         "bf16-cfg": "bf16 + batched CFG", "bf16-cfg-kv": "bf16 + batched CFG + cond K/V cache",
         "compile": "... + torch.compile (SS)", "cudagraphs": "... + compile with CUDA graphs (SS)",
         "graphs": "... + CUDA graphs (SS, SLaT; eager kernels)",
         "compile-graphs": "... + torch.compile (SS) + CUDA graphs (SLaT)",
         "compile-all": "... + torch.compile (SS, SLaT blocks)",
         "compile-all-graphs": "... + torch.compile (SS, SLaT blocks) + CUDA graphs (SLaT)",
         "compile-all-ro": "... + torch.compile reduce-overhead (SS, SLaT blocks)",
         "compile-all-zkv": "... + torch.compile (SS, SLaT blocks) + one-key K/V of the zero condition",
         "compile-all-zkv-fa4": "... + one-key K/V of the zero condition + FlashAttention-4",
         "compile-all-zkv-fa4-slat": "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT",
         "compile-all-zkv-ro": "... + one-key K/V of the zero condition, reduce-overhead",
         "compile-all-zkv-ma": "... + one-key K/V of the zero condition, max-autotune",
         "compile-all-zkv-ro-gt": "... + one-key K/V of the zero condition, reduce-overhead, gather-or-transform "
                                  "sparse conv",
         "compile-all-zkv-fa4-slat-ro-gt": "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT, "
                                           "reduce-overhead, gather-or-transform sparse conv",
         "compile-all-zkv-fa4-slat-ro": "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT, "
                                        "reduce-overhead",
         "compile-all-zkv-ssro": "... + one-key K/V of the zero condition, reduce-overhead in SS only",
         "compile-all-zkv-fa4-slat-ssro": "... + one-key K/V of the zero condition + FlashAttention-4 in SLaT, "
                                          "reduce-overhead in SS only",
         "compile-all-zkv-fa4-best": "... + one-key K/V of the zero condition + FlashAttention-4 where it is faster "
                                     "per kernel",
         "compile-all-zkv-fa4-best-ro": "... + one-key K/V of the zero condition + FlashAttention-4 where it is "
                                        "faster per kernel, reduce-overhead",
         "compile-all-zkv-fa4-ro": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, "
                                   "reduce-overhead",
         "compile-all-zkv-fa4-ro-sq": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, "
                                      "reduce-overhead, small-query attention as matmuls",
         "compile-all-zkv-fa4-ro-sqfa2": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, "
                                         "reduce-overhead, small-query attention by FlashAttention-2",
         "compile-all-zkv-ro-ge": "... + one-key K/V of the zero condition, reduce-overhead, GELU in the GEMM epilogue",
         "compile-all-zkv-fa4-ro-sqfa2-ge": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, "
                                            "reduce-overhead, small-query attention by FlashAttention-2, GELU in the "
                                            "GEMM epilogue",
         "compile-all-zkv-fa4-ro-sqfa2-ge-tb": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, "
                                               "reduce-overhead, small-query attention by FlashAttention-2, GELU in the "
                                               "GEMM epilogue, SLaT token buckets",
         "compile-all-zkv-fa4-ro-sqfa2-ge-io": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and SLaT, "
                                               "reduce-overhead, small-query attention by FlashAttention-2, GELU in the "
                                               "GEMM epilogue, fused SLaT IO steps",
         "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg": "... + one-key K/V of the zero condition + FlashAttention-4 in SS and "
                                                   "SLaT, reduce-overhead in SS, small-query attention by FlashAttention-2, "
                                                   "GELU in the GEMM epilogue, SLaT passes as whole CUDA graphs",
         "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io": "... + one-key K/V of the zero condition + FlashAttention-4 in SS "
                                                      "and SLaT, reduce-overhead in SS, small-query attention by "
                                                      "FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as whole "
                                                      "CUDA graphs, fused SLaT IO steps",
         "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac": "... + one-key K/V of the zero condition + FlashAttention-4 in "
                                                         "SS and SLaT, reduce-overhead in SS, small-query attention by "
                                                         "FlashAttention-2, GELU in the GEMM epilogue, SLaT passes as "
                                                         "whole CUDA graphs recorded without a sync, fused SLaT IO steps",
         "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-sp": "... + one-key K/V of the zero condition + FlashAttention-4 "
                                                            "in SS and SLaT, reduce-overhead in SS, small-query attention "
                                                            "by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes "
                                                            "as whole CUDA graphs recorded without a sync in one memory "
                                                            "pool, fused SLaT IO steps",
         "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf": "... + one-key K/V of the zero condition + FlashAttention-4 "
                                                            "in SS and SLaT, reduce-overhead in SS, small-query attention "
                                                            "by FlashAttention-2, GELU in the GEMM epilogue, SLaT passes "
                                                            "as whole CUDA graphs recorded without a sync or a warm-up "
                                                            "pass, fused SLaT IO steps"}
SHORT.update({f"compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-w{_n}": WARMUP_LONG.format(n=_n) for _n in (2, 3, 4)})
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-sg"] = SS_GELU_LONG.format(rf="")
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-sg"] = SS_GELU_LONG.format(rf=" or a warm-up pass")
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-tb"] = TB_AC_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-sg-ua"] = UA_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua"] = RF_UA_LONG
SHORT.update({f"compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp{_n}": GP_LONG.format(base=RF_UA_LONG, n=_n)
              for _n in (2, 4, 8)})
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-gp4"] = GP_LONG.format(base=AC_LONG, n=4)
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4"] = GP_MERGE_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt"] = GP_MERGE_DT_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-cd"] = CD_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc"] = NC_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-cd"] = NC_CD_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-fd"] = FD_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fd"] = NC_FD_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-fk"] = FK_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk"] = NC_FK_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-tp"] = NC_FK_TP_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-nr"] = NC_FK_NR_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-fk-nr"] = FK_NR_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm"] = NC_FK_CM_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-ok"] = NC_FK_OK_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok"] = NC_FK_CM_OK_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi"] = NC_FK_CM_OK_MI_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk"] = NC_FK_CM_OK_MI_LK_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-ci"] = NC_FK_CM_OK_MI_CI_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk-ci"] = NC_FK_CM_OK_MI_LK_CI_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-nr"] = NC_FK_CM_OK_MI_NR_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-nr-cw"] = NC_FK_CM_OK_MI_NR_CW_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk-ci-na"] = NC_FK_CM_OK_MI_LK_CI_NA_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk"] = NC_FK_CM_OK_MI_LK_CI_SK_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk-cu"] = (
    NC_FK_CM_OK_MI_LK_CI_SK_CU_LONG)
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk-ci-nr-cw"] = NC_FK_CM_OK_MI_LK_CI_NR_CW_LONG
SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi-lk-ci-nr-cw-na"] = (
    NC_FK_CM_OK_MI_LK_CI_NR_CW_NA_LONG)


#: separates a variant's short name from its FA4 tiles: ``compile-all-zkv-fa4-ro@ss.self=128x128+slat=192x128``
TILES_MARK, TILES_SEP = "@", "+"


def _split_variant(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    base, mark, rest = name.partition(TILES_MARK)
    if base not in SHORT:
        raise ValueError(f"unknown variant {base!r}; choose from {sorted(SHORT)}")
    if not mark:
        return base, ()
    pairs = []
    for entry in rest.split(TILES_SEP):
        site, eq, spec = entry.partition("=")
        if not eq or not site or not spec:
            raise ValueError(f"variant {name!r}: FA4 tiles are written NAME@SITE=TILES[+SITE=TILES...] "
                             f"(e.g. compile-all-zkv-fa4-ro@ss.self=128x128+slat=192x128), got {entry!r}")
        pairs.append((site, spec))
    return base, tuple(pairs)


def variant_options(name: str) -> RunOptions:
    """Run options of a benchmark variant: a short name of :data:`SHORT`, optionally with FA4 tiles per site after
    ``@`` (``RunOptions.attention_kernel_tiles``). Raises ValueError naming the problem."""
    base, tiles = _split_variant(name)
    opts = VARIANTS[SHORT[base]]
    return dataclasses.replace(opts, attention_kernel_tiles=tiles) if tiles else opts


def variant_label(name: str) -> str:
    """The long description of a benchmark variant (with its FA4 tiles, where named)."""
    base, tiles = _split_variant(name)
    return SHORT[base] + ("" if not tiles else ", FA4 tiles " + ", ".join(f"{s} {t}" for s, t in tiles))


def checked_device(name: str) -> torch.device:
    """``--device``, refused (SystemExit) where it names CUDA and none is available."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available")
    return dev


def checked_variants(spec: str, device: torch.device) -> list[str]:
    """The comma-separated ``--variants`` of a script that holds one model in memory: each known (FA4 tiles allowed),
    named once, runnable on ``device``, all in one weight precision; otherwise SystemExit naming the problem."""
    variants = [v for v in spec.split(",") if v]
    if not variants:
        raise SystemExit(f"--variants: none given; choose from {sorted(SHORT)}")
    for v in variants:
        try:
            variant_options(v)
        except ValueError as e:
            raise SystemExit(f"--variants {v}: {e}") from None
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:
        raise SystemExit(f"--variants: {repeated} named twice (their rows would merge in the summary)")
    for v in variants:
        try:
            variant_options(v).check_device(device)
        except ValueError as e:
            raise SystemExit(f"--variants {v}: {e}") from e
    dtype = variant_options(variants[0]).weight_dtype
    if any(variant_options(v).weight_dtype != dtype for v in variants):
        raise SystemExit("--variants: all variants must hold the weights in one precision (one model in memory)")
    return variants


def distinct_counts(spec: str, flag: str) -> list[int]:
    """A comma-separated list of distinct positive integers (``--sizes``), or SystemExit naming ``flag``."""
    try:
        counts = [int(s) for s in spec.split(",") if s]
    except ValueError:
        raise SystemExit(f"{flag}: comma-separated integers, got {spec!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SystemExit(f"{flag}: distinct counts >= 1, got {spec!r}")
    return counts


#: outputs of every variant are compared with this one's (same weights, inputs, seeds)
REFERENCE_VARIANT = "bf16-cfg-kv"
COORDS_FILE = Path(__file__).parent / "data" / "ycb_surface_coords_r64.npz"


class Timer:
    """CUDA-event (or wall-clock on CPU) timing of a callable: warm-up, then the median of repeats."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def add_conv_args(ap: argparse.ArgumentParser) -> None:
    """--conv-impl / --gather-chunk: which sparse-conv algorithm the run uses (shared with kernel_profile)."""
    ap.add_argument("--conv-impl", default="auto", choices=list(CONV_IMPLS),
                    help="SparseConv3d.impl (auto = the Triton implicit GEMM for fp16/bf16 inference on NVIDIA sm80+, else "
                         "gather-or-transform: transform on CUDA when C_in >= 8 C_out, else gather; scatter was the "
                         "GPU default before run 3). Any value but auto fixes every conv's algorithm, over the "
                         "variants' RunOptions.sparse_conv")
    ap.add_argument("--gather-chunk", type=int, default=None,
                    help="SparseConv3d.gather_chunk_elements (elements of one gathered block)")


def apply_conv_args(args: argparse.Namespace) -> None:
    from fs3d_accel.model.sparse import SparseConv3d
    if args.gather_chunk is not None and args.gather_chunk < 1:
        raise SystemExit(f"--gather-chunk must be >= 1 element, got {args.gather_chunk}")
    SparseConv3d.impl = args.conv_impl
    if args.gather_chunk is not None:
        SparseConv3d.gather_chunk_elements = SparseConv3d.gather_chunk_elements_cuda = args.gather_chunk


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 30) -> float | None:
    """Measured bf16 matmul throughput (TFLOP/s) of an n x n x n product: the MFU denominator."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    r = Timer(device, 3, repeats)(lambda: a @ b)
    return 2 * n ** 3 / r["median_s"] / 1e12


def record_matmul_peak(meta: dict, device: torch.device, measure=None) -> None:
    """Measure the matmul peak once more into ``meta["peak_tflops_runs"]`` and make ``meta["peak_tflops"]`` (the MFU
    denominator) the largest measurement so far. One short timing of a power-limited GPU is not steady: session 20
    measured 788 and 734 TFLOP/s in two consecutive runs on one lease, while the same calls ran equally fast. A run that
    measures at its start and at its end and divides by the larger quotes the lower, conservative MFU. Off CUDA
    (``measure`` gives None) nothing is recorded and the peak stays None. ``measure`` (default
    :func:`matmul_peak_tflops`) takes the device and returns TFLOP/s. A run cut off before its end keeps only the
    start's measurement."""
    value = (measure or matmul_peak_tflops)(device)
    meta.setdefault("peak_tflops", None)
    if value is None:
        return
    if not value > 0:
        raise ValueError(f"a measured matmul peak must be > 0 TFLOP/s, got {value!r}")
    runs = meta.setdefault("peak_tflops_runs", [])
    runs.append(float(value))
    meta["peak_tflops"] = max(runs)


def count_flops(fn) -> float:
    """FLOPs of one call (torch.utils.flop_counter: matmuls, convolutions, attention; the CPU SDPA kernels, which
    torch's counter does not know, through ``sdpa_flop_mapping``). The total only: nothing here is classified, so an
    operator :func:`flop_class` does not know cannot stop a timing run."""
    from torch.utils.flop_counter import FlopCounterMode

    from fs3d_analysis.profile.flops import sdpa_flop_mapping
    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        fn()
    return float(counter.get_total_flops())


#: operator classes of :func:`count_flops_by_class`, named as the kernel classes of ``fs3d_analysis.profile.busy``
#: that run them on the GPU (so FLOPs per class over kernel seconds per class is a class's achieved TFLOP/s)
FLOP_CLASSES = ("attention", "matmul", "conv")


def flop_class(op_name: str) -> str:
    """The class of an operator FlopCounterMode counts: attention (SDPA in any backend, the FA4 custom op), matmul
    (mm / addmm / bmm / baddbmm) or conv (dense convolutions); raises on anything else, so a new counted op is
    classified on purpose instead of silently."""
    name = op_name.split(".")[-1] if op_name.startswith("aten.") else op_name
    if "attention" in name or "flash_attn" in name:
        return "attention"
    if name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm"):
        return "matmul"
    if "convolution" in name or name.startswith(("conv", "_slow_conv")):
        return "conv"
    raise ValueError(f"FLOP class of operator {op_name!r} unknown; add it to flop_class")


def count_flops_by_class(fn) -> dict[str, float]:
    """FLOPs of one call per :data:`FLOP_CLASSES` class, and their ``"total"``. Sparse convolutions
    (``SparseConv3d``) count as "conv" whatever operators they run (their matmuls under the scatter algorithm): on the
    GPU their own kernel runs them, so their FLOPs must not inflate the matmul class."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.utils.flop_counter import FlopCounterMode

    from fs3d_accel.model.sparse import SparseConv3d
    from fs3d_analysis.profile.flops import sdpa_flop_mapping
    sparse_conv, started = [0.0], {}

    def before(module, args):
        if isinstance(module, SparseConv3d):
            started[id(module)] = counter.get_total_flops()

    def after(module, args, output):
        if isinstance(module, SparseConv3d):
            sparse_conv[0] += counter.get_total_flops() - started.pop(id(module))

    with FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
        try:
            fn()
        finally:
            for h in handles:
                h.remove()
    out = dict.fromkeys(FLOP_CLASSES, 0.0)
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        out[flop_class(str(op))] += float(n)
    if sparse_conv[0] > out["matmul"] + 1e-6 * max(sparse_conv[0], 1.0):
        raise RuntimeError(f"sparse-conv FLOPs {sparse_conv[0]} exceed the matmul class {out['matmul']}: they ran as "
                           "other operators; classify them there")
    out["matmul"] -= sparse_conv[0]
    out["conv"] += sparse_conv[0]
    out["total"] = float(counter.get_total_flops())
    if abs(sum(out[c] for c in FLOP_CLASSES) - out["total"]) > 1e-6 * max(out["total"], 1.0):
        raise RuntimeError(f"FLOP classes {out} do not add up to the total")
    return out


def load_coords(resolution: int, device) -> dict[str, torch.Tensor]:
    data = np.load(COORDS_FILE)
    out = {}
    for name in data.files:
        xyz = torch.from_numpy(data[name].astype(np.int64))
        if resolution != 64:
            xyz = torch.unique(xyz * resolution // 64, dim=0)
        c = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(torch.int32)
        out[name] = c.to(device)
    return out


def param_counts(pipe: Pipeline) -> dict[str, int]:
    return {f"{s}.{c}": sum(p.numel() for p in m.parameters())
            for s in ("ss", "slat", "decode") for c, m in getattr(pipe, s).named_children()}


def _markdown(df) -> str:
    try:
        return df.to_markdown(floatfmt=".4f")
    except ImportError:  # tabulate missing (the GPU image has no registry)
        return "```\n" + df.to_string(float_format=lambda x: f"{x:.4f}") + "\n```"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default="official-like,bf16,bf16-cfg,bf16-cfg-kv",
                    help=f"comma list of {sorted(SHORT)}")
    ap.add_argument("--slat-sampler-n", type=int, default=13151, help="N closest to this gets the full SLaT sampler timing")
    ap.add_argument("--objects", default=None, help="comma list of YCB names to time (default: every one in the file)")
    add_conv_args(ap)
    ap.add_argument("--out", default="runs/stage_latency")
    args = ap.parse_args()
    apply_conv_args(args)
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(dev, args.warmup, args.repeats)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    base = Pipeline.from_config(args.config, seed=0, device="cpu")
    counts = param_counts(base)
    ref_state = {k: v.clone() for k, v in base.state_dict().items()}
    img, mask, pm = synthetic_inputs(base.config.image_size)
    inputs = base.prepare(img, mask, pm)
    coords = load_coords(base.config.slat_flow.resolution, dev)
    if args.objects:
        wanted = args.objects.split(",")
        unknown = sorted(set(wanted) - set(coords))
        if unknown:
            raise SystemExit(f"--objects: {unknown} not in {COORDS_FILE.name} (has {sorted(coords)})")
        coords = {k: coords[k] for k in wanted}
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    extra = {"peak_tflops": matmul_peak_tflops(dev), "flops": {}, "parity": {}}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        chosen = {short: (variant_label(short), variant_options(short)) for short in args.variants.split(",")}
    except ValueError as exc:
        raise SystemExit(f"--variants: {exc}") from None
    for short, (label, opts) in chosen.items():
        pipe = Pipeline.from_config(args.config, seed=0, device="cpu")
        pipe.load_state_dict(ref_state)
        if opts.weight_dtype != torch.float32:
            pipe = pipe.to(opts.weight_dtype)
        pipe = pipe.to(dev)
        pipe.options = opts
        inp = inputs.to(dev)
        with torch.no_grad():
            t0 = time.perf_counter()
            ss = pipe.run_ss(inp, seed=0)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0  # includes torch.compile / CUDA-graph capture where switched on
            rows.append(dict(variant=label, stage="SS stage, first call (compile/capture included)", N=None,
                             median_s=first, min_s=first, n=1))
            r = timer(lambda: pipe.run_ss(inp, seed=0))
            rows.append(dict(variant=label, stage="SS stage (cond + 25 steps + decoder)", N=None, **r))
            outputs[short] = {f"ss.{k}": v.float().cpu() for k, v in pipe.run_ss(inp, seed=0).latents.items()}
            cond = pipe.ss.condition(**{k: v.to(opts.weight_dtype) for k, v in inp.ss_kwargs().items()})
            lat = {k: v.to(dev, opts.weight_dtype) for k, v in ss.latents.items()}
            tt = torch.full((1,), 500.0, device=dev)
            d = torch.zeros(1, device=dev)
            with opts.network_context(dev, "ss"):
                r = timer(lambda: pipe.ss.flow(lat, tt, cond, d))
                if "SS flow pass" not in extra["flops"]:
                    extra["flops"]["SS flow pass"] = count_flops(lambda: pipe.ss.flow(lat, tt, cond, d))
            rows.append(dict(variant=label, stage="SS flow, one pass (B=1)", N=None, **r))
            r = timer(lambda: pipe.ss.decoder(ss.latents["shape"].permute(0, 2, 1).reshape(
                1, 8, *(3 * [pipe.config.ss_flow.resolution])).to(dev, opts.weight_dtype)))
            rows.append(dict(variant=label, stage="SS decoder", N=None, **r))
            target = min(coords, key=lambda k: abs(coords[k].shape[0] - args.slat_sampler_n))
            slat_cond = pipe.slat.condition(**{k: v.to(opts.weight_dtype) for k, v in inp.slat_kwargs().items()})
            for name, c in sorted(coords.items(), key=lambda kv: kv[1].shape[0]):
                n = c.shape[0]
                feats = torch.randn(n, 8, device=dev, dtype=opts.weight_dtype)
                with opts.network_context(dev, "slat"):
                    r = timer(lambda: pipe.slat.flow(feats, c, tt, slat_cond))
                rows.append(dict(variant=label, stage="SLaT flow, one pass", N=n, object=name, **r))
                with opts.network_context(dev, "decode"):
                    r = timer(lambda: pipe.decode.decoder(feats, c))
                rows.append(dict(variant=label, stage="mesh decoder network", N=n, object=name, **r))
                if name == target:
                    ss_n = dataclasses.replace(ss, coords=c)
                    r = timer(lambda: pipe.run_slat(inp, ss_n, seed=0))
                    rows.append(dict(variant=label, stage="SLaT stage (cond + 25 steps)", N=n, object=name, **r))
                    outputs[short]["slat.feats"] = pipe.run_slat(inp, ss_n, seed=0).feats.float().cpu()
                    if "SLaT flow pass" not in extra["flops"]:
                        with opts.network_context(dev, "slat"):
                            extra["flops"]["SLaT flow pass"] = count_flops(lambda: pipe.slat.flow(feats, c, tt, slat_cond))
                        with opts.network_context(dev, "decode"):
                            extra["flops"]["mesh decoder network"] = count_flops(lambda: pipe.decode.decoder(feats, c))
                        extra["slat_n"] = n
        print(f"done {label}", flush=True)
        del pipe
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ref = outputs.get(REFERENCE_VARIANT)
        if ref is not None:
            for v, outs in outputs.items():
                extra["parity"][v] = {k: float((outs[k] - ref[k]).abs().max()) for k in ref if k in outs}
        write_tables(rows, out, args, device_name, counts, extra)  # after every variant: a killed run keeps its rows


def efficiency_lines(df, extra: dict, config) -> list[str]:
    """Per-object generation time (SS stage + SLaT stage + mesh decoder network) per variant, and the
    transformer stages' MFU: FLOPs of the network passes the sampler runs / stage time / matmul peak."""
    from fs3d_accel.samplers import count_network_passes
    peak, flops = extra.get("peak_tflops"), extra.get("flops", {})
    n = extra.get("slat_n")
    passes = {"SS": count_network_passes(config.ss_sampler), "SLaT": count_network_passes(config.slat_sampler)}
    lines = ["## Per object and MFU", "",
             f"Measured bf16 matmul peak: {peak:.0f} TFLOP/s (8192^3). " if peak else "No GPU: no MFU. ",
             f"FLOPs per pass (FlopCounterMode): " + ", ".join(f"{k} {v / 1e12:.2f} TF" for k, v in flops.items())
             + f"; sample passes per object: SS {passes['SS']}, SLaT {passes['SLaT']} (N = {n}).", "",
             "| variant | SS stage s | SLaT stage s | mesh decoder s | per object s | SS MFU | SLaT MFU |",
             "|---|---|---|---|---|---|---|"]
    for variant, g in df.groupby("variant", sort=False):
        def med(stage, N=None):
            sel = g[g.stage == stage] if N is None else g[(g.stage == stage) & (g.N == N)]
            return float(sel.median_s.iloc[0]) if len(sel) else float("nan")
        ss, sl, dec = med("SS stage (cond + 25 steps + decoder)"), med("SLaT stage (cond + 25 steps)", n), \
            med("mesh decoder network", n)
        mfu = {}
        for key, t, stage in (("SS", ss, "SS flow pass"), ("SLaT", sl, "SLaT flow pass")):
            f = flops.get(stage)
            mfu[key] = (f"{100 * f * passes[key] / t / (peak * 1e12):.0f}%" if peak and f and t == t else "n/a")
        lines.append(f"| {variant} | {ss:.3f} | {sl:.3f} | {dec:.3f} | {ss + sl + dec:.3f} | {mfu['SS']} | {mfu['SLaT']} |")
    parity = extra.get("parity", {})
    if parity:
        lines += ["", f"## Outputs against `{REFERENCE_VARIANT}` (max |difference|, same weights, inputs and seeds)", "",
                  "| variant | " + " | ".join(next(iter(parity.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(parity.values())))]
        lines += [f"| {v} | " + " | ".join(f"{x:.3g}" for x in d.values()) + " |" for v, d in parity.items()]
    return lines


def write_tables(rows: list[dict], out: Path, args, device_name: str, counts: dict[str, int],
                 extra: dict | None = None) -> None:
    import pandas as pd
    df = pd.DataFrame(rows)
    df.to_csv(out / "stage_latency.csv", index=False)
    meta = {"device": device_name, "config": args.config, "conv_impl": args.conv_impl,
            "gather_chunk": args.gather_chunk, "torch": torch.__version__, "repeats": args.repeats,
            "warmup": args.warmup, "param_counts": counts, "total_params": sum(counts.values()), **(extra or {})}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    piv = df.pivot_table(index=["stage", "N"], columns="variant", values="median_s", dropna=False)
    piv = piv.dropna(how="all")
    lines = [f"# Stage latency, config `{args.config}`, device **{device_name}**, torch {torch.__version__}, "
             f"sparse conv `{args.conv_impl}`",
             f"CUDA-event medians of {args.repeats} after {args.warmup} warm-up; seconds.", "",
             _markdown(piv), "", "## Parameters per stage component", "",
             "| component | parameters |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in counts.items()]
    lines.append(f"| total | {sum(counts.values()):,} |")
    if extra:
        from fs3d_accel.model.configs import get_config
        lines += [""] + efficiency_lines(df, extra, get_config(args.config))
    (out / "stage_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
