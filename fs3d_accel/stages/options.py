"""Run options of the exact fast path: precision, batched CFG, condition K/V cache.

None of these changes what is computed beyond floating-point rounding: ``fp32`` with every switch off
is the reference. ``autocast-fp16`` is how the official pipeline runs (fp32 weights, fp16 autocast);
``fp16`` / ``bf16`` hold the weights in half precision (norms still computed in fp32).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .held import HeldLease

PRECISIONS = ("fp32", "autocast-fp16", "autocast-bf16", "fp16", "bf16")
CUDA_ONLY_PRECISIONS = ("autocast-fp16", "fp16")
#: stages that can choose their attention kernel (``RunOptions.attention_kernel_sites``)
KERNEL_STAGES = ("ss", "slat", "decode")
#: the attention roles a site may name after its stage ("slat.cross"); see ``model/attention_kernels.py``
KERNEL_ROLES = ("self", "cross")
#: every accepted entry of ``RunOptions.attention_kernel_sites``: a stage (all its attention) or stage.role
KERNEL_SITES = KERNEL_STAGES + tuple(f"{st}.{r}" for st in KERNEL_STAGES for r in KERNEL_ROLES)
#: torch.compile modes accepted by ``compile_mode`` (inductor only).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_backends() -> tuple[str, ...]:
    """Names accepted by ``RunOptions.compile_backend``: "inductor" plus every registered dynamo
    backend, debug ones included (``list_backends()`` hides "eager" / "aot_eager" by default)."""
    import torch._dynamo
    return tuple(sorted({"inductor", *torch._dynamo.list_backends(exclude_tags=())}))


#: Test-only switch: lets ``check_device`` accept ``compile_ss`` / ``compile_slat`` on the CPU (tests patch it with a
#: debug ``compile_backend``); the user-facing check stays CUDA-only.
_ALLOW_CPU_COMPILE = False
#: Test-only switch: lets ``check_device`` accept ``cuda_graphs`` on the CPU, where
#: :class:`~fs3d_accel.stages.graphs.GraphedCall` runs every call eagerly (tests check the wiring).
_ALLOW_CPU_GRAPHS = False


@contextlib.contextmanager
def _entered_together(*contexts):
    """Enter ``contexts`` when the ``with`` block starts (not when this is called), leave them in reverse order."""
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


@dataclass(frozen=True)
class RunOptions:
    precision: str = "fp32"
    #: run the conditional and unconditional CFG branches as one batch of 2
    batch_cfg: bool = False
    #: compute each block's cross-attention K/V of the (constant) condition once per object
    cache_cond_kv: bool = False
    #: torch.compile the SS flow network forward (one static-shape graph, the MoT block body compiled
    #: once and reused by every block; see ``SSStage.compiled_flow``); CUDA only. ``compile_mode`` is
    #: passed to torch.compile ("default", "reduce-overhead" = CUDA graphs, "max-autotune" = autotuned Triton GEMM
    #: templates, whose epilogues can take the following element-wise ops, and coordinate-descent tuning of the
    #: other kernels, plus CUDA graphs; "max-autotune-no-cudagraphs").
    compile_ss: bool = False
    #: torch.compile the SLaT flow's 24 transformer blocks (``SLaTFlowModel.dense_torso``) with the
    #: token count dynamic, so one graph per batch size serves every object; the sparse IO res-blocks,
    #: the sampler loop, CFG and the K/V cache stay eager. CUDA only. Same ``compile_mode`` /
    #: ``compile_backend`` as ``compile_ss``. Module hooks on the SLaT blocks cannot fire inside it
    #: (the flow refuses to run it while any are registered).
    compile_slat: bool = False
    compile_mode: str = "default"
    #: SLaT's own compile mode where it should differ from ``compile_mode`` (None: the same). Under "reduce-overhead"
    #: SLaT records its CUDA graphs anew for every token count (a capture per new object), while SS replays one static
    #: graph with the held K/V; "default" in SLaT trades those captures for per-kernel launches. Which wins depends on
    #: the machine: on one H100 lease SLaT was 7-8% faster in "default", on another 1-67% slower
    #: (``results/base_vs_official_h100/session11/``). :meth:`for_stage` gives the options a stage runs under.
    slat_compile_mode: str | None = None
    #: torch.compile backend of ``compile_ss`` / ``compile_slat``: "inductor" (the default) or any registered dynamo
    #: backend ("eager" / "aot_eager" let tests check graph breaks and recompiles on the CPU).
    compile_backend: str = "inductor"
    #: replay each fixed-shape flow pass from a CUDA graph (``stages/graphs.py``): every SS pass that
    #: is not torch.compile'd, and the full-token SLaT passes of an object (its coordinate structure is
    #: built on the first pass, or earlier by ``build_structure`` with ``async_graph_capture``; the first pass runs
    #: eagerly, the second is captured, the rest replay). CUDA only; needs weights in
    #: the compute precision (fp32 / fp16 / bf16), not an autocast precision, and (with ``compile_slat``) a
    #: SLaT compile mode without graphs of its own ("default" via ``slat_compile_mode``): inductor's graphs
    #: cannot be recorded inside this capture.
    cuda_graphs: bool = False
    #: record those graphs without first synchronising the device (``GraphedCall.async_capture``): the host records
    #: while the GPU still runs the steps already queued. Session 14/15's idle timelines found the GPU waiting ~50 ms
    #: per recording at 14k SLaT voxels behind ``torch.cuda.graph``'s synchronisation; a SLaT object records a
    #: second graph (batch 1) once CFG ends, by which time earlier replays are queued. With ``batch_cfg`` the SLaT
    #: stage also builds the unguided structure's tables at the first guided step (``SLaTFlowModel.build_structure``:
    #: the tables alone since session 23; before, the input path with its values discarded, not counted in the
    #: benchmarks' executed FLOPs: ``slat_tables_by_pass``), so that the unguided
    #: pass's first (eager) call and its recording need no sync, except on a process's first object, where that call
    #: compiles the batch-1 torso (whose first launches are tuned with device syncs).
    #: Session 16 (H100): SLaT over 16 new sizes of 4-6k voxels a median 0.241 s against 0.355 s for inductor's graphs,
    #: faster at 16 of 16; per object at 14k faster in 4 of 6 rounds (part of the named path
    #: ``compiled-zkv-fa4-all-sqfa2-ge-ac``). Without ``torch.cuda.graph``'s cache flush, the private pools of finished
    #: objects' graphs stay reserved until an allocation fails (then freed behind a device sync; session 16: 7.7 ->
    #: 16.5 GB reserved over 32 objects): over many objects, pair it with ``shared_graph_pool``. Needs ``cuda_graphs``.
    async_graph_capture: bool = False
    #: record SLaT's whole-pass graphs (the CFG-batched one and the batch-1 one) at their first call, with no eager
    #: warm-up pass before them, once this stage has run a pass of that batch size eagerly in the process with the same
    #: options and compiled torso (so the torso and the attention kernels have met that kind of pass): their tables
    #: come from ``SLaTFlowModel.build_structure``, built at the first guided step. Saves the first step's eager
    #: launches, which the GPU waits on at the start of each object (session 16: ~50 ms of idle GPU in the first two
    #: tenths of a 14k call). Something still lazy for a new size (a kernel compiled just in time) would now run inside
    #: the recording; a first-call recording that fails warns, runs that step eagerly and records at the next, and
    #: that kind of pass is warmed again for the rest of the process. The record of passes run lives on the SLaT stage
    #: (``_graph_passes_run``) and does not see ``torch._dynamo.reset()``: after one, clear it or build a new pipeline.
    #: Needs ``cuda_graphs``, ``async_graph_capture`` and ``batch_cfg``. Session 17 (H100): bit-identical to the warmed
    #: recording (GPU test); alone, no gain on a second meeting of 16 new sizes (+9 ms, faster at 5 of 16); with the
    #: GELU epilogue kept to SS (``gelu_epilogue_sites``) the fastest SLaT call over new sizes on an H100 at 4-6k and an
    #: H200 at 12-20k: the named path ``compiled-zkv-fa4-all-sqfa2-ge-ac-stream`` (``results/slat_many_sizes_session17/``;
    #: on an H100 at 12-20k, timed with ``unguided_graph_ahead=8`` added, no faster than ``-ac``, session 18:
    #: ``results/slat_many_sizes_session18/``).
    graph_record_first: bool = False
    #: eager passes each SLaT whole-pass graph runs before it records (``GraphedCall(warmup=...)``; 1 = the first pass
    #: eager, the second records). Built to hide the recording's host time behind GPU work queued by more eager passes;
    #: measured the other way round (session 17, H100, 16 new sizes of 4-6k voxels, second meeting): 2, 3 and 4 passes
    #: were slower at 16 of 16 sizes, by a median 33, 65 and 78 ms, since an eager SLaT pass is itself host-bound
    #: (``results/slat_many_sizes_session17/warmup/``). Kept as the measured alternative; leave it at 1.
    #: ``graph_record_first`` (0 from the second object on) takes precedence where it applies. Needs ``cuda_graphs``
    #: for any value but 1.
    slat_graph_warmup: int = 1
    #: record SLaT's batch-1 graph (the conditional pass of the steps after CFG ends) right after the k-th guided
    #: full-token step instead of at the first unguided step (0: off). After CFG's last guided steps the host is only a
    #: few replays ahead of the GPU (it blocks once ~8 are queued), so the batch-1 recording at CFG's end, with its
    #: cuBLAS first calls at a new token count, idles the GPU (session 17, H100, 9-14k voxels: ~30 ms with
    #: ``graph_record_first``, ~100 ms without). Recorded early, its host time overlaps the guided replays queued
    #: ahead; the values are the same graph's. Only with ``graph_record_first`` (the recording needs no eager
    #: warm-up), from the second object on, where an unguided step follows. Session 18 (H100): its GPU tests passed
    #: (bit-identical to the recording at the first call); per object with the epilogue kept (variant ``-ac-rf-ua``)
    #: 0.526-0.544 s against 0.519-0.551 s for ``-ac`` at 14k over three rounds, 0.823 against 0.792 s at 20k; on the
    #: stream path over new sizes of 12-20k it did not make that path faster than ``-ac``
    #: (``results/base_vs_official_h100/session18/``, ``results/slat_many_sizes_session18/``). Kept as an option.
    unguided_graph_ahead: int = 0
    #: record SLaT's whole-pass graphs in pieces (``GraphedCall(in_pieces=True)``): one for the input path, one per
    #: this many transformer blocks, one for the output path (``slat_flow.use_graph_pieces``; 0: one graph per pass).
    #: At a call, each piece is queued as soon as it is recorded, so the GPU computes the pass while the host records
    #: the rest of it. Built for the first SLaT pass of an object, recorded with nothing queued ahead: its whole
    #: recording (26.5-36 ms of host time at 14k on an H100, more with the tables' host reads) idled the GPU, where in
    #: pieces the GPU idles for about the recording's host time less the pass's GPU time (~18 ms at 14k). Later steps
    #: replay the pieces in order (one launch each). The same kernels on the same inputs (bit-identical to the single
    #: graphs in the GPU tests, ``tests/test_graph_pieces.py``). Session 19, H100: with ``graph_record_first`` and
    #: ``unguided_graph_ahead=8``, per object at 14k 0.518 / 0.518 s with 2-block pieces against 0.538 / 0.531 s without
    #: (4-block pieces 0.550 / 0.555 s), the longest idle stretch 5 against 28 ms
    #: (``results/base_vs_official_h100/session19/``); over 6 new sizes of 12-20k no gain against ``-ac`` (0.578 / 0.520
    #: against 0.544 / 0.516 s, ``results/slat_many_sizes_session19/``). Needs ``cuda_graphs`` and
    #: ``async_graph_capture``.
    slat_graph_piece_blocks: int = 0
    #: with ``slat_graph_piece_blocks``: after this many calls of a whole-pass graph that ran its pieces, record the
    #: pass again as one graph (without a sync and without running it, while the pieces' replays queued ahead keep the
    #: GPU busy) and replay that from then on (``GraphedCall(merge_after=...)``; 0: keep the pieces). Why: 2-block
    #: pieces are 14 graph launches per pass, and the later tenths of session 19's profiled 14k call idled 2.5-4.1% with
    #: them against 1.9-3.4% without (~3 ms per object; one profiled call per variant). The merged recording costs the
    #: pass's recording host time again (26.5-36 ms at 14k), hidden only where that many ms of replays are queued ahead.
    #: The same kernels (GPU tests, session 20). Timed in session 20 together with ``derive_unguided_tables``
    #: (``results/base_vs_official_h100/session20/``): per object at 14k 0.516 / 0.526 s against 0.555 / 0.554 s for the
    #: plain pieces in the same run, at 20k 0.765 / 0.776 against 0.772 / 0.794 s; against ``-ac`` within the rounds'
    #: spread (0.522 / 0.568 s).
    slat_graph_merge_after: int = 0
    #: with ``slat_graph_merge_after``: the merged graph records the SLaT torso compiled without piece ends and with
    #: its blocks inlined into one graph (``slat_block_regions=False``'s torso), so that inductor fuses across block
    #: boundaries on every step after the merge (the pieces' ends and the nested regions keep each block apart). The
    #: first merge of each kind of pass in a process runs that torso once eagerly first (it compiles then; the stage
    #: remembers the kinds warmed, which ``torch._dynamo.reset()`` does not clear: a merge that would then compile inside
    #: its recording fails, warns, and keeps the pieces). Same math, other rounding.
    slat_merge_inlined: bool = False
    #: make SLaT's batch-1 coordinate structure (the unguided passes' neighbour tables, down-sampling maps and token
    #: counts) by slicing the CFG pair's, whose two elements repeat the object's coordinates
    #: (``sparse.first_element_structure``), instead of building it from the coordinates: the same tables without that
    #: build's host reads (one of the two table builds at the start of each object; session 19's cProfile put the two at
    #: about a quarter of the first SLaT step's host time at 14k, ``results/slat_host_profile_h100/session19/``). The
    #: pair's tables are then built first. Where the pair's structure holds an entry it cannot slice, the batch-1
    #: structure is built as before. Needs ``batch_cfg``. CPU-tested (the same tables, key by key; the same outputs);
    #: on the GPU timed only together with ``slat_graph_merge_after`` (session 20, see there).
    derive_unguided_tables: bool = False
    #: build SLaT's coordinate structures the way sessions 16-22 did: by running the flow's input path and dropping
    #: its values (convs, norms and linears launched for nothing). Off (since session 23), ``build_structure`` builds
    #: the same tables alone (``SparseResBlock3d.prepare``; the same entries, tensor for tensor). The tables-by-pass
    #: build took 11.2 of the 71 ms cProfile saw in a 14k call's first step, about half of it computing values to drop
    #: (``results/slat_host_profile_h100/session23/``). Kept to time the two side by side (variant suffix ``-tp``).
    #: Session 24 (H100, 14k, pieces path, three rounds): the tables-only build was faster in 3 of 3 rounds, 0.503-0.505 s
    #: per SLaT call against 0.512-0.514 s with this on, about 2 ms of it the dropped GPU work
    #: (``results/base_vs_official_h100/session24/tables_only/``).
    slat_tables_by_pass: bool = False
    #: one CUDA-graph memory pool, kept by the SLaT stage, for the graphs of every SLaT object
    #: (``stages.graphs.GraphPool``, ``SLaTStage.graph_pool``) instead of a private pool per graph: the batch-1 graph
    #: recorded once CFG ends reuses the batch-2 graph's temporaries, and the next object reuses this one's memory,
    #: instead of asking for fresh device memory inside each recording (session 15's lead for why the asynchronous
    #: recording did not gain per object at 14k; without ``torch.cuda.graph``'s cache flush, finished objects' private
    #: pools stay cached). The pool keeps the largest object's size. Session 16 (H100): per object within 2% of
    #: ``async_graph_capture`` alone (1.197-1.222 s at 14k; slower in 3 of 4 pairs). Session 17 (H100, 16 new sizes
    #: twice): reserved memory rose 0.37 GB over the first pass and not at all over the second (``async_graph_capture``
    #: alone: ~3.6 GB per pass), but it ran after two other variants, so this fits a flat pool without showing one;
    #: 13 ms slower than ``async_graph_capture`` alone on the second meeting. Needs ``cuda_graphs``.
    shared_graph_pool: bool = False
    #: in the unconditional CFG branch the condition tokens are all zero, so each cross-attention's L keys
    #: are one repeated vector (the ``to_kv`` bias), and so are its values: keep one key and value instead
    #: of L (the softmax over equal scores is uniform and returns that value either way). Saves that
    #: branch's cross-attention (~a third of an SS pass): attention over one key is its value broadcast to
    #: every query, with no kernel launched (``layers.attention``). Needs ``cache_cond_kv``.
    collapse_zero_cond: bool = False
    #: with ``collapse_zero_cond``: the unconditional rows' cross-attention output, ``to_out`` of their one value for
    #: every query, is projected once per row and block instead of projecting every query through ``to_q`` and every
    #: (equal) output row through ``to_out`` (``layers.projected_cross_attention``). Saves two tokens x C x C GEMMs per
    #: block and guided pass, which also lowers the FLOPs executed. Same math, other rounding.
    one_key_projection: bool = False
    #: kernel of the networks' unmasked attention ("sdpa", or "flash-attn-cute" = FlashAttention-4, CUDA
    #: only, needs ``flash_attn.cute`` importable; see ``model/attention_kernels.py``). Entered by
    #: :meth:`network_context` around every network call. Same math, different rounding.
    attention_kernel: str = "sdpa"
    #: where ``attention_kernel`` runs: a stage ("ss", "slat", "decode": all its attention) or one role of it
    #: ("ss.cross", "slat.self", ...); everything else keeps SDPA. In kernel time (CUDA-graph replay) FA4 beats
    #: cuDNN at every SS and SLaT site on the H100; its per-call host cost shows only without CUDA graphs
    #: (``benchmarks/results/attention_kernels_h100/session12/``).
    attention_kernel_sites: tuple[str, ...] = ("ss", "slat", "decode")
    #: FA4 tile shapes per site: ``(site, tiles)`` pairs, ``site`` a stage or ``stage.role`` that runs FA4 (a role
    #: entry overrides its stage's), ``tiles`` as :meth:`FlashAttnTiles.parse` reads them ("128x128",
    #: "192x128:no-rs"). Sites not named keep FA4's own tile table. Same math, different rounding.
    attention_kernel_tiles: tuple[tuple[str, str], ...] = ()
    #: how FA4 is called (``attention_kernels.FA4_CALLS``): "custom-op" (``torch.library.custom_op``, the path since
    #: session 6) or "direct" (an operator registered through ``torch.library.Library`` whose kernel calls FA4's forward
    #: function itself: the same kernel and arguments, less host work per call, which SLaT's per-object graph
    #: recording pays 96-192 times; see ``attention_kernels.FA4_CALLS``). Needs ``attention_kernel="flash-attn-cute"``.
    #: Bit-identical to "custom-op" on an H100 and faster per object (session 21; the named path
    #: ``compiled-zkv-fa4-all-sqfa2-ge-ac-fd``). "kernel": the direct operator's schema, launching the compiled kernel
    #: FA4's forward cached after one call through that forward per signature (``model.fa4_kernel_call``), without the
    #: forward's Python per call: bit-identical on an H100, 23-37 µs of host per call (session 21; the named path
    #: ``compiled-zkv-fa4-all-sqfa2-ge-ac-fk``). Both inference only: gradients are refused.
    fa4_call: str = "custom-op"
    #: unmasked attention calls of the SS stage with at most this many queries take the small-query path
    #: (``small_query_kernel``) instead of the fused kernel of ``attention_kernel``; 0 = off. Aimed at the SS layout
    #: stream: 4 pose queries over ~4.1k / 7.5k keys, 1,200 calls per SS sampler call, which cuDNN and FA4 take
    #: 0.046-0.081 ms each for (from CUDA graphs on the H100, session 13; presumably one CTA per (batch, head)).
    small_query_attention: int = 0
    #: how the small-query path computes: "sdpa-flash2" (SDPA's FlashAttention-2, which splits the keys over CTAs:
    #: 0.018-0.020 ms per layout call, SS sampler 5% faster; ``attention_kernels.flash2_small_query_attention``) or
    #: "fp32-matmul" (two fp32 matmuls + softmax, ``attention_kernels.small_query_attention``: 0.20-0.34 ms per call,
    #: slower than the fused kernels; kept as the measured alternative)
    small_query_kernel: str = "fp32-matmul"
    #: the transformer MLPs' first Linear + tanh-GELU as one cuBLASLt GEMM with a bias + GELU epilogue
    #: (``layers.use_gelu_epilogue``; fp16 / bf16 CUDA only, elsewhere the two steps run as before): saves the
    #: element-wise GELU kernel's read and write of the (tokens x 4C) hidden activation. Same math, different rounding.
    #: Acts on the fp16 / bf16 precisions only (the fp32 and autocast ones keep fp32 weights and the two steps).
    #: Session 13 (H100, without FA4, one round): the GELU kernels gone, each sampler's kernels 0.023-0.026 s shorter
    #: (``results/base_vs_official_h100/session13/gelu_epilogue/``). Session 14, on the fastest path: SS sampler
    #: 0.678-0.682 -> 0.657 s (55.3% MFU of executed FLOPs), quality unchanged to run-to-run noise; the named path
    #: ``compiled-zkv-fa4-all-sqfa2-ge`` has it (``results/base_vs_official_h100/session14/``).
    gelu_epilogue: bool = False
    #: the stages whose MLPs take the GELU epilogue when ``gelu_epilogue`` is on. A cuBLAS GEMM pays host time at its
    #: first call with a token count the process has not met (session 17, H200: 4-5 ms per shape, 10 ms for the
    #: epilogue GEMM; ``results/gemm_first_call_h200/``), which a benchmark repeating one object never sees. SS's shapes
    #: never change, so there it is paid once per process; SLaT and the mesh decoder meet new counts with every object.
    #: Over new sizes SLaT was faster with the epilogue in SS only (``results/slat_many_sizes_session17/``); repeating
    #: one object, the epilogue saves SLaT ~17-25 ms of kernels per object at 14-20k voxels.
    gelu_epilogue_sites: tuple[str, ...] = KERNEL_STAGES
    #: token buckets for the compiled SLaT torso (``slat_flow.use_token_buckets``; 0: off): each object's torso tokens
    #: are padded up to a bucket (``bucket_tokens``: buckets ``step`` of the size apart, e.g. 1/16), the padding left
    #: out as self-attention keys (FA4's used-key counts, or an SDPA key mask) and its outputs dropped; with a SLaT
    #: compile mode that captures CUDA graphs the condition K/V are held between calls too. Objects in one bucket
    #: then share the torso's CUDA graphs, where today every object records two (session 14: ~30-50 ms of idle GPU
    #: each, ``results/base_vs_official_h100/session14/``). It pays only under a SLaT compile mode with CUDA graphs
    #: (elsewhere there is nothing to share) and with FA4 at SLaT's self-attention: FA4 skips the all-padding key
    #: tiles, so the padding costs up to ``step`` more torso work, while SDPA's key mask rules out its FlashAttention-2
    #: backend. The held K/V stay allocated between calls. Measured over new sizes on an H100: with inductor's graphs
    #: (``-ge-tb``, session 16, 4-6k voxels) 0.327 against 0.355 s for ``-ge``; inside the whole-pass graphs (``-ac-tb``,
    #: session 18, 12-20k, where it only saves cuBLAS first calls) slower than ``-ac``, 0.596 / 0.572 against 0.541 /
    #: 0.498 s on the first / second meeting (``results/slat_many_sizes_session18/``). Needs ``compile_slat``.
    slat_token_bucket: float = 0.0
    #: the SLaT IO res-blocks' element-wise steps (fp32 LayerNorm, casts, adaLN modulation, SiLU) as two functions
    #: torch.compile'd with ``compile_backend`` (``slat_flow.use_fused_io_blocks``): one fused kernel each instead of
    #: about a dozen launches per block; the sparse convs stay as they are. Session 14's kernel table had ~0.03 s of
    #: such kernels per SLaT call at 14k, and found SLaT host-bound at 5k. Session 15 (H100): the LayerNorm kernels
    #: went from 0.0095 to 0.0010 s and the copies from 0.018 to 0.008 s per call at 14k, mean ΔF1 −0.026 against
    #: fp32 (``results/base_vs_official_h100/session15/``). Needs ``compile_slat`` and a weight precision (not
    #: autocast). Skipped where module hooks sit on the norms or global module hooks are registered.
    fuse_slat_io: bool = False
    #: algorithm of the sparse convolutions (SLaT IO blocks, mesh decoder) whose ``SparseConv3d.impl`` is "auto":
    #: "auto" keeps the class rule (the Triton implicit GEMM for fp16 / bf16 inference on NVIDIA GPUs of compute
    #: capability 8.0+, else "gather-or-transform"); "implicit" forces the Triton kernel (CUDA only), which never writes the gathered
    #: neighbour block; "implicit-skip" is that kernel over rows sorted by their neighbours, each tile of rows running only
    #: the kernel offsets some row of it has (``sparse_conv_triton.neighbour_tiles``) in one flat loop,
    #: "implicit-skip-nested" the same skipping in the original loop nest, and "implicit-flat" the flat loop without
    #: skipping. On the H100 (session 18, ``results/sparse_conv_kernels_h100/session18``) "implicit-skip" and
    #: "implicit-flat" gave outputs bit-identical to "implicit"'s, and "implicit-skip" took the SLaT pass's convs from
    #: 3.73 to 3.48 ms and left the mesh decoder's at 7.4 ms. "implicit-skip-nested" (session 20,
    #: ``results/sparse_conv_kernels_h100/session20``) is bit-identical too; the mesh decoder's timed convs 7.52 -> 6.47
    #: ms, and inside the SLaT sampler the convs' kernel time per call 44.6 -> 40.9 ms at 14k and 74.1 -> 61.6 ms at 20k
    #: (``results/base_vs_official_h100/session20/``), though the calls were not faster beyond the rounds' spread.
    #: "gather-or-transform" is the rule before
    #: session 8 (cuBLAS on materialised blocks);
    #: "gather" / "transform" / "scatter" as in ``SparseConv3d``. Same values to rounding. Entered by
    #: :meth:`network_context`.
    sparse_conv: str = "auto"
    #: inductor's coordinate-descent tuning of the launch settings (block sizes, warps, stages) of the Triton kernels it
    #: generates, at the SS flow's and the SLaT torso's compilation (``torch.compile(options=...)``: the compile mode's
    #: own options plus ``coordinate_descent_tuning``). Why: inductor's fused element-wise and norm kernels were 9.9% of
    #: SLaT's kernel time at 14k in session 19 (``results/base_vs_official_h100/session19/``), launched with heuristic
    #: settings; ``max-autotune`` turns this tuning on too, but also swaps cuBLAS GEMMs for Triton templates (session
    #: 10: not faster). Longer first compilations; the kernels compute the same values up to the reduction order a
    #: tuned setting may change. Needs the inductor backend. **Measured slower** on an H100 (session 20,
    #: ``results/base_vs_official_h100/session20/coordinate_descent/``): the fused kernels' time per SLaT call at 14k
    #: went 47.7 -> 52.4 ms (and 47.6 -> 60.3 ms beside the nested tiled conv), and 7 of 8 calls were slower; off by default
    #: and in every named path.
    coordinate_descent: bool = False
    #: compile the SLaT torso's 24 transformer blocks as nested compile regions (True: the block traced and compiled
    #: once, its kernels shared by all 24) or inlined into one graph (False). Why False: a region's output is a graph
    #: boundary, so inductor cannot fuse across blocks; each block ends in an element-wise kernel of its own, the MLP's
    #: gated residual add (``triton_poi_fused_add_mul_split_unsqueeze_view_7``: 312 launches, 7.8 ms of a 14k call in
    #: session 15's kernel table), that inlined blocks can fuse into the next block's first norm. Inlining compiles the
    #: 24 blocks' graph (longer first compilation; identical kernels are generated once). The same math, rounded in a
    #: different kernel. Needs ``compile_slat``; variant suffix ``-nr``. Session 24 (H100, 14k, three rounds each,
    #: ``results/base_vs_official_h100/session24/inlined_blocks_*``): the fused Triton kernels 1.4-2.5 ms and 600-975
    #: launches fewer per SLaT call; on ``-ac-fk`` faster in 3 of 3 rounds (0.502-0.509 s against 0.505-0.517 s), on the
    #: faster pieces path (``slat_graph_piece_blocks=2``) equal (0.4945-0.4960 s both), since every other block boundary
    #: there is a piece end, an op that orders the kernels around it. So no named path turns it off.
    slat_block_regions: bool = True
    #: compile the SLaT torso with inductor's C++ wrapper (``cpp_wrapper``): the generated code that launches the
    #: torso's Triton kernels and calls its GEMMs is C++ instead of Python. Why: a new object's first SLaT step is
    #: recorded on the host while the GPU waits, and half of it is the torso's recording, spread over inductor's Python
    #: wrapper, Triton's launcher and the GEMM calls (session 28's trace, ``results/slat_host_profile_h100/session28/``).
    #: Custom ops (FA4's kernel call, the graph pieces' ends) are still called through the dispatcher into Python.
    #: Needs the blocks inlined (``slat_block_regions=False``): in torch 2.11-2.13 the C++ wrapper cannot generate
    #: nested compile regions ("codegen invoke_subgraph is not implemented for cpp wrapper", session 22). The same
    #: kernels, so the same values as the Python wrapper (tested on the CPU). Longer first compilation (a C++ build).
    #: Built in session 28 and checked on the CPU. **Fails at full size on the GPU** (session 29, H100, torch 2.11,
    #: ``results/base_vs_official_h100/session29/ab2/``): the generated C++ uses a size array (``int_array_86``) before
    #: its declaration, and g++ refuses it. An inductor code generation bug the 4-block CPU torso does not meet: torch
    #: 2.11 keys its size-array cache on short-lived bound methods, so a name can be reused before its declaration
    #: (torch 2.13 keys on the methods' owner instead). Since session 29 the stage installs a fix
    #: for such a torch before compiling (``stages.inductor_compat``; a no-op on 2.13), not yet run on the GPU. So it has
    #: never been timed. In session 30 (H100) the fix held (every size array declared before use in the generated
    #: files), but the build of the generated C++ did not finish within a call; since then the entry is built apart,
    #: at -O1 (``cpp_wrapper_build_separate``, :meth:`compile_kwargs`). Variant suffixes ``-nr-cw``, ``-lk-ci-nr-cw``.
    slat_cpp_wrapper: bool = False
    #: keep inductor's run-time checks in the SLaT torso's generated wrapper (``size_asserts``, ``alignment_asserts``,
    #: ``scalar_asserts``): every call of the compiled torso checks each input's sizes, strides and alignment, and each
    #: extern kernel's output (cuBLAS GEMMs, FA4's kernel call, the pieces' ends), ~1,000 checks in a new object's first
    #: SLaT step, which the host runs while the GPU waits (session 28's trace counted 1,034 ``assert_size_stride`` calls
    #: in it). False drops them: the same kernels on the same buffers, so the same values, only a wrong-shaped input is
    #: no longer caught inside the wrapper (the stage builds every input itself, and the graphs replay what was
    #: recorded). Needs ``compile_slat`` and the inductor backend; a compilation of its own (inductor's settings are in
    #: its cache key). Variant suffix ``-na``. Session 29 (H100, 14k, ``results/base_vs_official_h100/session29/ab1/``):
    #: against ``-lk-ci`` -4.8 (a faster host in that unit), +3.5, -1.9 and +1.2 ms per call, no gain shown; the first
    #: step's host time moves by ~25 ms between meetings, far more than the checks' ~1 ms. Off in every named path.
    slat_wrapper_asserts: bool = True
    #: compute each SLaT transformer block's adaLN output (shift, scale and gate of both branches: a Linear of the
    #: timestep embedding) once per sampler step and batch size, keep it on the stage across calls
    #: (``SLaTStage.block_modulations``), and pass it into the flow, instead of every pass computing it again. It depends
    #: on the step and the weights only, not on the object, so every object sampled with the same schedule reuses it.
    #: Why: those are 24 small GEMMs per pass, each reading a 1024 x 6144 weight for two rows (session 24's 14k kernel
    #: table, ``results/base_vs_official_h100/session24/``: ``nvjet_sm90_tst_64x8_64x16_4x1_v_bz_bias_TNT``, 675 launches,
    #: 5.4 ms per call, 600 of them the blocks'; plus a SiLU kernel per block and pass), and each launch adds a gap inside
    #: the recorded graphs. The same ops on the same shapes compute the kept values, so eager passes give bit-identical
    #: outputs (tested in fp32 on the CPU and on the GPU); a compiled torso may round its own in-graph computation
    #: differently. Keyed by the step, batch, dtypes, device and every involved parameter's identity, version, dtype and
    #: device (weights changed in place, replaced or moved are picked up; a change written through ``.data`` bypasses
    #: the version counter and is not). Inference only: refused where gradients would flow into those parameters.
    #: Variant suffix ``-cm``. Session 24 (H100, 14k, pieces path, one process with the reference, three rounds;
    #: ``results/base_vs_official_h100/session24/kept_modulations/``): kernel time 5.6 ms and 1,174 launches less per
    #: call (kernels alone at 57.3% of the executed FLOPs against 56.6%); calls faster in 2 of 3 rounds, in a run whose
    #: reference drifted and stalled in an allocation, so the per-call gain is not settled.
    cache_block_modulations: bool = False
    #: the same for the SLaT flow's timestep embedding and its IO res-blocks' scale and shift (``emb_layers``: a SiLU
    #: and a Linear of the embedding per block): computed once per sampler step and batch size, kept on the stage
    #: across calls (``SLaTStage.io_modulations``, packed in one tensor) and passed into the flow, so that no pass runs
    #: the timestep embedder (its sinusoid and two-layer MLP) or the IO blocks' ``emb_layers``: about a dozen small
    #: kernels per pass, each a launch gap inside the recorded graphs, and host work in a new object's first step. The
    #: same ops on the same shapes compute the kept values, so outputs are bit-identical (tested on the CPU). Hooks on
    #: the embedder or the IO blocks' ``emb_layers`` fire when the values are computed, not at every pass. Inference
    #: only, as ``cache_block_modulations``. Variant suffix ``-ci``.
    cache_io_modulations: bool = False
    #: with ``collapse_zero_cond`` and a compiled SLaT torso: make the cached condition K/V the torso takes with fewer
    #: host operations (``stages.cond_kv.lean_slat_cond_kv``): per block one ``to_kv`` over the batch as before and
    #: one contiguous copy each of the conditional rows' keys and values, while the all-zero rows' one key and value
    #: come from ``to_kv``'s bias (what ``to_kv`` of a zero token is, exactly), made once and kept on the stage across
    #: objects. The same values as the default path (tested bit for bit): the default collapses every row through
    #: slicing, copies each of the four per-element tensors, and walks the tree with ``pytree``, which the session 28
    #: trace of a 14k call's first step billed ~7% of the GPU's wait to (``results/slat_host_profile_h100/session28/``).
    #: Host work only: the compiled torso is the same. Not with ``slat_token_bucket`` (whose K/V live in held buffers).
    #: Variant suffix ``-lk``; timed with ``cache_io_modulations`` as ``-lk-ci`` against the named path: faster in 4 of
    #: 4 rounds of session 28's second process and 3 of 4 of session 29's (by 0.1-6.4 ms; the other round, 0.5 ms
    #: slower, ran both units with a slow host), slower in 3 of 4 of session 28's first, whose host was slow in some
    #: calls; 0.3 GB less peak memory (``results/base_vs_official_h100/session29/``). On the GPU its sam3d-mini results
    #: equal the named path's on all 28 objects (session 30); since then part of the named path ``…-mi-lk-ci``.
    lean_cond_kv: bool = False
    #: with ``lean_cond_kv``: project each conditional row's key and value once per call by two GEMMs on ``to_kv``'s
    #: weight halves (``stages.cond_kv.project_cond_rows``) and share them between the CFG pair's K/V and the batch-1
    #: passes' K/V, instead of one ``to_kv`` per set over its whole batch (the zero row included) and a contiguous
    #: copy each of k and v: per 14k call on an H100, 96 copy kernels (1.5 ms) and 24 GEMMs over the zero row fewer
    #: (session 30's kernel table), and ~120 host operations fewer in the first step, where the GPU waits for the
    #: host. The same dot products; bit-identical on the CPU (tested) and, at full size on an H100, the same latents
    #: bit for bit although cuBLAS runs other kernels for the halves. Against ``-lk-ci`` (session 30, two processes,
    #: ``results/base_vs_official_h100/session30/``): faster in 6 of 7 rounds, median −4.0 ms per 14k call, 0.38 GB
    #: less peak memory; 1.107 TFLOP fewer executed per call (200.145 against 201.251: one condition row projected
    #: where the lean path projects three). On an H200 its sam3d-mini results equal ``-lk-ci``'s on all 28 objects
    #: (session 31); since then part of the named path ``…-mi-lk-ci-sk``. Variant suffix ``-sk``.
    split_cond_kv: bool = False
    #: SLaT's output path: the up-sampling res-block runs its first norm and SiLU and its skip linear on the coarse
    #: rows, gathers the skip's 128-channel output instead of its 2,048-channel input, and its first conv reads the
    #: coarse rows through a table composed with the up-sampling map (``slat_flow.use_coarse_upsample``,
    #: ``SparseConv3d.forward_gathered``). Each of those steps acts row by row and nearest up-sampling copies rows,
    #: so each fine row gets the same values (bit for bit on the CPU, tested; the skip's GEMM then has fewer rows,
    #: which a GPU's GEMM library may tile differently). Per 14k pass it drops the (2N, 2,048) gather (session 30's
    #: kernel table: 50 launches, 1.75 ms per call) and runs the norm and the skip GEMM on the coarse rows. On an H200
    #: (session 31, ``results/base_vs_official_h200/session31/``): ~3.25 ms less in the kernels it changes per 14k
    #: call in three profiled calls, the same latents bit for bit and the same sam3d-mini results as ``-sk``, 0.15 GB
    #: less peak memory; per call faster in only 6 of 11 rounds (median −1.1 ms), so not part of a named path. Variant
    #: suffix ``-cu``.
    slat_coarse_upsample: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile_mode {self.compile_mode!r}; choose one of {COMPILE_MODES}")
        # "inductor" is checked without importing torch._dynamo (RunOptions() is built on every run)
        if self.compile_backend != "inductor" and self.compile_backend not in compile_backends():
            raise ValueError(f"unknown compile_backend {self.compile_backend!r}; "
                             f"choose one of {compile_backends()}")
        if self.compile_backend != "inductor" and self.compile_mode != "default":
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile_backend='inductor', "
                             f"got {self.compile_backend!r}")
        if self.slat_compile_mode is not None:
            if self.slat_compile_mode not in COMPILE_MODES:
                raise ValueError(f"unknown slat_compile_mode {self.slat_compile_mode!r}; choose one of "
                                 f"{COMPILE_MODES} (or None: compile_mode)")
            if not self.compile_slat:
                raise ValueError(f"slat_compile_mode {self.slat_compile_mode!r} is the mode of compile_slat, "
                                 f"which is off: it would change nothing (set compile_slat=True)")
            if self.compile_backend != "inductor" and self.slat_compile_mode != "default":
                raise ValueError(f"slat_compile_mode {self.slat_compile_mode!r} needs compile_backend='inductor', "
                                 f"got {self.compile_backend!r}")
        from ..model.attention_kernels import ATTENTION_KERNELS
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"unknown attention_kernel {self.attention_kernel!r}; choose one of {ATTENTION_KERNELS}")
        if isinstance(self.attention_kernel_sites, str):
            raise ValueError(f"attention_kernel_sites is a tuple of sites, got the string "
                             f"{self.attention_kernel_sites!r}; write ({self.attention_kernel_sites!r},)")
        bad = sorted(set(self.attention_kernel_sites) - set(KERNEL_SITES))
        if bad:
            raise ValueError(f"attention_kernel_sites: unknown {bad}; choose from {KERNEL_SITES}")
        if self.attention_kernel == "sdpa" and self.attention_kernel_sites != KERNEL_STAGES:
            raise ValueError(f"attention_kernel_sites {self.attention_kernel_sites} choose where a kernel other than "
                             f"SDPA runs; with attention_kernel='sdpa' they change nothing (set attention_kernel)")
        if self.attention_kernel != "sdpa" and not self.attention_kernel_sites:
            raise ValueError(f"attention_kernel {self.attention_kernel!r} with no attention_kernel_sites would "
                             f"never run; name at least one of {KERNEL_SITES}")
        self._check_kernel_tiles()
        if (not isinstance(self.small_query_attention, int) or isinstance(self.small_query_attention, bool)
                or not 0 <= self.small_query_attention <= 64):
            raise ValueError(f"small_query_attention is a query count in [0, 64] (0: off): its path holds B x H x Lq x "
                             f"Lk fp32 scores, got {self.small_query_attention!r}")
        if not isinstance(self.gelu_epilogue, bool):
            raise ValueError(f"gelu_epilogue is a bool, got {self.gelu_epilogue!r}")
        sites = self.gelu_epilogue_sites
        if (not isinstance(sites, tuple) or not sites or not all(isinstance(x, str) for x in sites)
                or not set(sites) <= set(KERNEL_STAGES) or len(set(sites)) != len(sites)):
            raise ValueError(f"gelu_epilogue_sites is a non-empty tuple of distinct stages from {KERNEL_STAGES}, got "
                             f"{sites!r}")
        # one spelling per set of stages, so that equal settings compare (and key graph passes) equal
        object.__setattr__(self, "gelu_epilogue_sites", tuple(st for st in KERNEL_STAGES if st in sites))
        if not self.gelu_epilogue and self.gelu_epilogue_sites != KERNEL_STAGES:
            raise ValueError(f"gelu_epilogue_sites {self.gelu_epilogue_sites} choose where the GELU epilogue runs, and "
                             f"gelu_epilogue is off: they change nothing (set gelu_epilogue=True)")
        from ..model.slat_flow import check_piece_blocks, check_token_bucket
        check_token_bucket(self.slat_token_bucket)
        if not isinstance(self.fuse_slat_io, bool):
            raise ValueError(f"fuse_slat_io is a bool, got {self.fuse_slat_io!r}")
        if self.fuse_slat_io and not self.compile_slat:
            raise ValueError("fuse_slat_io compiles the SLaT IO blocks' element-wise steps with compile_slat's backend, "
                             "and compile_slat is off (set compile_slat=True)")
        if self.fuse_slat_io and self.precision.startswith("autocast"):
            raise ValueError(f"fuse_slat_io keeps the eager ops under autocast, so with precision {self.precision!r} it "
                             f"would change nothing; use a weight precision (fp32, fp16 or bf16)")
        if self.slat_token_bucket and not self.compile_slat:
            raise ValueError(f"slat_token_bucket {self.slat_token_bucket!r} pads the compiled SLaT torso's tokens, "
                             f"and compile_slat is off: it would change nothing (set compile_slat=True)")
        from ..model.attention_kernels import SMALL_QUERY_KERNELS, SMALL_QUERY_MATMUL
        if self.small_query_kernel not in SMALL_QUERY_KERNELS:
            raise ValueError(f"unknown small_query_kernel {self.small_query_kernel!r}; choose one of "
                             f"{SMALL_QUERY_KERNELS}")
        if self.small_query_kernel != SMALL_QUERY_MATMUL and not self.small_query_attention:
            raise ValueError(f"small_query_kernel {self.small_query_kernel!r} with small_query_attention=0 would never "
                             f"run; give small_query_attention a query count")
        from ..model.sparse import CONV_IMPLS
        if self.sparse_conv not in CONV_IMPLS:
            raise ValueError(f"unknown sparse_conv {self.sparse_conv!r}; choose one of {CONV_IMPLS}")
        if self.collapse_zero_cond and not self.cache_cond_kv:
            raise ValueError("collapse_zero_cond works on the cached condition K/V; set cache_cond_kv=True")
        if not isinstance(self.one_key_projection, bool):
            raise ValueError(f"one_key_projection is a bool, got {self.one_key_projection!r}")
        if self.one_key_projection and not self.collapse_zero_cond:
            raise ValueError("one_key_projection projects the one value of the zero condition's collapsed K/V; without "
                             "collapse_zero_cond=True no row has one key and it would do nothing")
        if self.cuda_graphs and self.precision.startswith("autocast"):
            raise ValueError(f"cuda_graphs needs weights in the compute precision (fp32, fp16 or bf16); "
                             f"precision {self.precision!r} casts inside autocast, whose weight cache "
                             f"cannot live in a CUDA graph")
        if not isinstance(self.async_graph_capture, bool):
            raise ValueError(f"async_graph_capture is a bool, got {self.async_graph_capture!r}")
        if self.async_graph_capture and not self.cuda_graphs:
            raise ValueError("async_graph_capture changes how cuda_graphs records its graphs, and cuda_graphs is off: "
                             "it would change nothing (set cuda_graphs=True)")
        if not isinstance(self.graph_record_first, bool):
            raise ValueError(f"graph_record_first is a bool, got {self.graph_record_first!r}")
        if self.graph_record_first and not (self.cuda_graphs and self.async_graph_capture and self.batch_cfg):
            raise ValueError("graph_record_first records SLaT's whole-pass graphs without a warm-up pass, from tables "
                             "built for the asynchronous recording: it needs cuda_graphs, async_graph_capture and "
                             "batch_cfg")
        if isinstance(self.slat_graph_warmup, bool) or not isinstance(self.slat_graph_warmup, int) \
                or self.slat_graph_warmup < 1:
            raise ValueError(f"slat_graph_warmup is the number of eager SLaT passes before each whole-pass graph records, "
                             f"an int >= 1 (graph_record_first is the way to record at the first call), got "
                             f"{self.slat_graph_warmup!r}")
        if self.slat_graph_warmup != 1 and not self.cuda_graphs:
            raise ValueError("slat_graph_warmup sets when cuda_graphs' SLaT graphs record, and cuda_graphs is off: it would "
                             "change nothing (set cuda_graphs=True)")
        if isinstance(self.unguided_graph_ahead, bool) or not isinstance(self.unguided_graph_ahead, int) \
                or self.unguided_graph_ahead < 0:
            raise ValueError(f"unguided_graph_ahead is the guided step after which SLaT's batch-1 graph records, an int "
                             f">= 0 (0: off), got {self.unguided_graph_ahead!r}")
        if self.unguided_graph_ahead and not self.graph_record_first:
            raise ValueError("unguided_graph_ahead records SLaT's batch-1 graph before its first call, which needs "
                             "graph_record_first (a recording without an eager warm-up pass)")
        check_piece_blocks(self.slat_graph_piece_blocks)
        if isinstance(self.slat_graph_merge_after, bool) or not isinstance(self.slat_graph_merge_after, int) \
                or self.slat_graph_merge_after < 0:
            raise ValueError(f"slat_graph_merge_after is the calls that run a pass's pieces before they are merged "
                             f"into one graph, an int >= 0 (0: never), got {self.slat_graph_merge_after!r}")
        if not isinstance(self.coordinate_descent, bool):
            raise ValueError(f"coordinate_descent is a bool, got {self.coordinate_descent!r}")
        if self.coordinate_descent and (self.compile_backend != "inductor"
                                        or not (self.compile_ss or self.compile_slat)):
            raise ValueError("coordinate_descent tunes the Triton kernels inductor generates: it needs the inductor "
                             "backend and compile_ss or compile_slat")
        if not isinstance(self.cache_io_modulations, bool):
            raise ValueError(f"cache_io_modulations is a bool, got {self.cache_io_modulations!r}")
        if not isinstance(self.lean_cond_kv, bool):
            raise ValueError(f"lean_cond_kv is a bool, got {self.lean_cond_kv!r}")
        if self.lean_cond_kv and not (self.collapse_zero_cond and self.compile_slat):
            raise ValueError("lean_cond_kv makes the collapsed condition K/V the compiled SLaT torso takes: it needs "
                             "collapse_zero_cond=True and compile_slat=True")
        if not isinstance(self.slat_coarse_upsample, bool):
            raise ValueError(f"slat_coarse_upsample is a bool, got {self.slat_coarse_upsample!r}")
        if not isinstance(self.split_cond_kv, bool):
            raise ValueError(f"split_cond_kv is a bool, got {self.split_cond_kv!r}")
        if self.split_cond_kv and not self.lean_cond_kv:
            raise ValueError("split_cond_kv refines the lean condition K/V: it needs lean_cond_kv=True")
        if self.lean_cond_kv and self.slat_token_bucket:
            raise ValueError("lean_cond_kv does not apply with slat_token_bucket: the bucketed torso's K/V go into "
                             "buffers held between calls, which the default path fills; turn one of them off")
        if not isinstance(self.cache_block_modulations, bool):
            raise ValueError(f"cache_block_modulations is a bool, got {self.cache_block_modulations!r}")
        if not isinstance(self.slat_block_regions, bool):
            raise ValueError(f"slat_block_regions is a bool, got {self.slat_block_regions!r}")
        if not self.slat_block_regions and not self.compile_slat:
            raise ValueError("slat_block_regions=False inlines the blocks of the compiled SLaT torso: it needs "
                             "compile_slat=True")
        if not isinstance(self.slat_cpp_wrapper, bool):
            raise ValueError(f"slat_cpp_wrapper is a bool, got {self.slat_cpp_wrapper!r}")
        if self.slat_cpp_wrapper and not (self.compile_slat and self.compile_backend == "inductor"):
            raise ValueError("slat_cpp_wrapper compiles the SLaT torso with inductor's C++ wrapper: it needs "
                             "compile_slat=True and compile_backend='inductor'")
        if not isinstance(self.slat_wrapper_asserts, bool):
            raise ValueError(f"slat_wrapper_asserts is a bool, got {self.slat_wrapper_asserts!r}")
        if not self.slat_wrapper_asserts and not (self.compile_slat and self.compile_backend == "inductor"):
            raise ValueError("slat_wrapper_asserts=False drops the checks of inductor's generated SLaT torso: it needs "
                             "compile_slat=True and compile_backend='inductor'")
        if self.slat_cpp_wrapper and self.slat_block_regions:
            raise ValueError("slat_cpp_wrapper needs slat_block_regions=False: inductor's C++ wrapper cannot generate "
                             "the nested compile regions the torso's blocks are compiled as otherwise ('codegen "
                             "invoke_subgraph is not implemented for cpp wrapper')")
        if not isinstance(self.slat_tables_by_pass, bool):
            raise ValueError(f"slat_tables_by_pass is a bool, got {self.slat_tables_by_pass!r}")
        if not isinstance(self.derive_unguided_tables, bool):
            raise ValueError(f"derive_unguided_tables is a bool, got {self.derive_unguided_tables!r}")
        if self.derive_unguided_tables and not self.batch_cfg:
            raise ValueError("derive_unguided_tables slices SLaT's batch-1 structure from the CFG pair's, which only "
                             "batch_cfg builds: set batch_cfg=True")
        if not isinstance(self.slat_merge_inlined, bool):
            raise ValueError(f"slat_merge_inlined is a bool, got {self.slat_merge_inlined!r}")
        if self.slat_merge_inlined and not (self.slat_graph_merge_after and self.compile_slat):
            raise ValueError("slat_merge_inlined records the merged graph from the compiled torso with its blocks "
                             "inlined; it needs slat_graph_merge_after > 0 and compile_slat=True")
        if self.slat_graph_merge_after and not self.slat_graph_piece_blocks:
            raise ValueError("slat_graph_merge_after merges graphs recorded in pieces, and slat_graph_piece_blocks is 0: "
                             "it would change nothing (set slat_graph_piece_blocks)")
        if self.slat_graph_piece_blocks and not (self.cuda_graphs and self.async_graph_capture):
            raise ValueError("slat_graph_piece_blocks records SLaT's whole-pass graphs in pieces, each run while the "
                             "host records the next: it needs cuda_graphs and async_graph_capture")
        if not isinstance(self.shared_graph_pool, bool):
            raise ValueError(f"shared_graph_pool is a bool, got {self.shared_graph_pool!r}")
        if self.shared_graph_pool and not self.cuda_graphs:
            raise ValueError("shared_graph_pool gives cuda_graphs' SLaT graphs one memory pool, and cuda_graphs is off: "
                             "it would change nothing (set cuda_graphs=True)")
        slat_mode = self.slat_compile_mode or self.compile_mode
        if self.cuda_graphs and self.compile_slat and slat_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"cuda_graphs captures each SLaT pass in one CUDA graph, and SLaT's compile mode "
                             f"{slat_mode!r} records its own (cudagraph trees) inside it; a graph cannot be captured "
                             f"inside another's capture: set slat_compile_mode='default' or cuda_graphs=False")

    def _check_kernel_tiles(self) -> None:
        from ..model.attention_kernels import FlashAttnTiles
        if not isinstance(self.attention_kernel_tiles, tuple) or any(
                not isinstance(e, tuple) or len(e) != 2 or not all(isinstance(x, str) for x in e)
                for e in self.attention_kernel_tiles):
            raise ValueError(f"attention_kernel_tiles is a tuple of (site, tiles) string pairs, e.g. (('ss.self', "
                             f"'128x128'),), got {self.attention_kernel_tiles!r}")
        sites = [site for site, _ in self.attention_kernel_tiles]
        if len(set(sites)) != len(sites):
            raise ValueError(f"attention_kernel_tiles names a site twice: {sites}")
        for site, spec in self.attention_kernel_tiles:
            if site not in KERNEL_SITES:
                raise ValueError(f"attention_kernel_tiles: unknown site {site!r}; choose from {KERNEL_SITES}")
            stage, _, role = site.partition(".")
            runs_fa4 = self.attention_kernel != "sdpa" and any(
                r in self.kernel_roles(stage) for r in ((role,) if role else KERNEL_ROLES))
            if not runs_fa4:
                raise ValueError(f"attention_kernel_tiles: no attention at site {site!r} runs FlashAttention-4 "
                                 f"(attention_kernel={self.attention_kernel!r}, attention_kernel_sites="
                                 f"{self.attention_kernel_sites}); its tiles would never be used")
            FlashAttnTiles.parse(spec)
        from ..model.attention_kernels import FA4_CALL_CUSTOM_OP, FA4_CALLS
        if self.fa4_call not in FA4_CALLS:
            raise ValueError(f"unknown fa4_call {self.fa4_call!r}; choose one of {FA4_CALLS}")
        if self.fa4_call != FA4_CALL_CUSTOM_OP and self.attention_kernel == "sdpa":
            raise ValueError(f"fa4_call={self.fa4_call!r} changes how FlashAttention-4 is called, but "
                             f"attention_kernel='sdpa' never calls it")

    def kernel_tiles(self, stage: str) -> dict:
        """FA4 tiles per attention role of ``stage`` (``attention_kernel_tiles``; a role entry overrides its stage's)."""
        from ..model.attention_kernels import FlashAttnTiles
        tiles = dict(self.attention_kernel_tiles)
        out = {}
        for role in self.kernel_roles(stage):
            spec = tiles.get(f"{stage}.{role}", tiles.get(stage))
            if spec is not None:
                out[role] = FlashAttnTiles.parse(spec)
        return out

    def compile_kwargs(self, mode: str, cpp_wrapper: bool = False, wrapper_asserts: bool = True) -> dict:
        """``torch.compile`` keyword arguments for compile mode ``mode`` under these options: ``{"mode": mode}``, or with
        ``coordinate_descent``, ``cpp_wrapper`` or without ``wrapper_asserts`` the mode's inductor options plus the
        tuning, the C++ wrapper and / or the checks turned off (torch.compile takes a mode or options, not both);
        nothing for a backend other than inductor.

        ``cpp_wrapper`` (the SLaT torso's ``slat_cpp_wrapper``): only for a graph without nested compile regions, which
        the C++ wrapper cannot generate in torch 2.11-2.13 (session 22, H100: ``results/base_vs_official_h100/session22/``);
        the SS flow compiles its blocks as such regions, so it never asks for it. ``wrapper_asserts`` False (the SLaT
        torso's ``slat_wrapper_asserts``): no size, stride, alignment or scalar checks in the generated wrapper."""
        if self.compile_backend != "inductor":
            return {}
        if not (self.coordinate_descent or cpp_wrapper or not wrapper_asserts):
            return {"mode": mode}
        from torch._inductor import list_mode_options
        extra = {"coordinate_descent_tuning": True} if self.coordinate_descent else {}
        if cpp_wrapper:
            # the generated entry (host-side glue, ~1.5 MB of C++ for the full-size torso) built apart from any CPU
            # kernels, at -O1: where the entry and kernels build as one unit it is compiled at -O3, and at full size
            # on the GPU's torch 2.11 that build outlasted a ~355 s call (session 30); torch 2.13 builds a GPU
            # wrapper at -O1 anyway (its comment: "the C++ wrapper is just glue")
            extra.update(cpp_wrapper=True, cpp_wrapper_build_separate=True)
        if not wrapper_asserts:
            extra.update(size_asserts=False, alignment_asserts=False, scalar_asserts=False)
        return {"options": {**list_mode_options(mode), **extra}}

    @property
    def compile_key(self) -> tuple:
        """What makes a compiled SS flow or SLaT torso differ besides the compile mode: backend, the inductor
        settings of :meth:`compile_kwargs`, how FA4 is called (an op traced into the graph), and whether the one-key
        cross-attention rows are projected once (``one_key_projection``, read when the graph is traced)."""
        return self.compile_backend, self.coordinate_descent, self.fa4_call, self.one_key_projection

    def for_stage(self, stage: str) -> "RunOptions":
        """The options ``stage`` ("ss", "slat" or "decode") runs under: for "slat" with a ``slat_compile_mode``, that mode
        as ``compile_mode`` (so the compiled torso, its cache key and :attr:`compile_uses_cuda_graphs` follow it);
        otherwise these options. Idempotent: a stage's options map to themselves."""
        if stage not in KERNEL_STAGES:
            raise ValueError(f"stage must be one of {KERNEL_STAGES}, got {stage!r}")
        if stage == "slat" and self.slat_compile_mode is not None:
            return self.derived("slat", lambda: dataclasses.replace(self, compile_mode=self.slat_compile_mode,
                                                                    slat_compile_mode=None))
        return self

    def derived(self, key: str, make: Callable[[], "RunOptions"]) -> "RunOptions":
        """Options derived from these ones by ``make``, made once per instance and ``key`` and kept on it: every SLaT
        call derives the same ones, and each ``dataclasses.replace`` runs the whole validation again, host time a new
        object's first step waits for (session 28's trace). The options are frozen, so what ``make`` derives from them
        cannot go stale; the kept ones are not fields (equality, hashing and ``repr`` ignore them)."""
        kept = self.__dict__.get("_derived")
        if kept is None:
            kept = {}
            object.__setattr__(self, "_derived", kept)
        if key not in kept:
            kept[key] = make()
        return kept[key]

    def check_device(self, device: torch.device | str) -> None:
        dev = torch.device(device)
        if dev.type != "cuda" and self.compile_ss and not _ALLOW_CPU_COMPILE:
            raise ValueError(f"compile_ss is CUDA-only (inductor/CUDA graphs); device is {dev}")
        if dev.type != "cuda" and self.compile_slat and not _ALLOW_CPU_COMPILE:
            raise ValueError(f"compile_slat is CUDA-only (inductor/CUDA graphs); device is {dev}")
        if dev.type != "cuda" and self.cuda_graphs and not _ALLOW_CPU_GRAPHS:
            raise ValueError(f"cuda_graphs is CUDA-only; device is {dev}")
        if dev.type != "cuda" and self.precision in CUDA_ONLY_PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is CUDA-only (fp16 kernels); "
                             f"device is {dev}. Use 'fp32' or 'bf16' on CPU.")
        from ..model.sparse import TRITON_CONV_IMPLS
        if self.sparse_conv in TRITON_CONV_IMPLS:
            from ..model.sparse_conv_triton import triton_unavailable
            why = triton_unavailable(dev)
            if why is not None:
                raise ValueError(f"sparse_conv {self.sparse_conv!r}: {why}")
        if (self.small_query_kernel == "sdpa-flash2" and self.small_query_attention and dev.type == "cuda"
                and self.precision not in ("fp16", "bf16", "autocast-fp16", "autocast-bf16")):
            raise ValueError(f"small_query_kernel 'sdpa-flash2' runs SDPA's FlashAttention-2, which takes fp16 / bf16 "
                             f"CUDA tensors; precision {self.precision!r} gives it fp32 ones. Use a half precision, or "
                             f"small_query_kernel 'fp32-matmul'")
        if (self.small_query_kernel == "sdpa-flash2" and self.small_query_attention and dev.type == "cuda"
                and torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] < 8):
            raise ValueError(f"small_query_kernel 'sdpa-flash2': SDPA's FlashAttention-2 needs compute capability "
                             f"8.0+, {torch.cuda.get_device_name(dev)} has {torch.cuda.get_device_capability(dev)}")
        if self.attention_kernel != "sdpa":
            from ..model.attention_kernels import flash_attn_cute_unavailable
            why = flash_attn_cute_unavailable(dev)
            if why is not None:
                raise ValueError(f"attention_kernel {self.attention_kernel!r}: {why}")
            if self.precision not in ("fp16", "bf16", "autocast-fp16", "autocast-bf16"):
                raise ValueError(f"attention_kernel {self.attention_kernel!r} takes fp16 / bf16 tensors; "
                                 f"precision {self.precision!r} would run every attention through SDPA")

    def prepare_cond_kv(self, kv, zero_rows: list[bool], compiled: bool, held: "HeldLease | None" = None,
                        name: str = "cond"):
        """Cached condition K/V as the flows take them: collapsed for the all-zero rows (the
        unconditional branch) when ``collapse_zero_cond``, and as independent copies for a compiled flow.

        ``held`` (the call's lease on a store the stage keeps: the SS stage passes one, the SLaT stage with token
        buckets) and ``name`` ("cond", "uncond" or "both"): under a compile mode that captures CUDA graphs the copies
        go into buffers held between calls, at the same addresses call after call (:mod:`fs3d_accel.stages.held`)."""
        if self.collapse_zero_cond:
            from ..model.layers import collapse_zero_condition_kv, map_kv_pairs
            kv = map_kv_pairs(lambda pair: collapse_zero_condition_kv(pair, zero_rows), kv)
        if not compiled:
            return kv
        if held is not None and self.compile_uses_cuda_graphs:
            return held.inputs(kv, name, self.compiled_region_inputs)
        return self.compiled_region_inputs(kv)

    def compiled_region_inputs(self, tree):
        """Independent contiguous copies of the tensors in ``tree`` (cached condition K/V) for a compiled
        flow: a nested compile region refuses inputs that alias one another, and ``precompute_cond_kv``
        returns k and v as views of one tensor. Same values, so same results. Under the compile modes that
        capture CUDA graphs (:attr:`compile_uses_cuda_graphs`) the copies are also marked static addresses, so
        inductor's CUDA graphs read them in place instead of copying them into graph buffers on every replay."""
        from torch.utils import _pytree as pytree
        out = pytree.tree_map(lambda t: t.clone(memory_format=torch.contiguous_format)
                              if isinstance(t, torch.Tensor) else t, tree)
        if self.compile_uses_cuda_graphs:
            from torch._dynamo import mark_static_address
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    mark_static_address(t)
        return out

    @property
    def compile_uses_cuda_graphs(self) -> bool:
        """Whether inductor captures the compiled regions in CUDA graphs (cudagraph trees): "reduce-overhead", and
        "max-autotune" (autotuned GEMM templates and coordinate-descent tuning, plus the same CUDA graphs); not
        "default" or "max-autotune-no-cudagraphs". Those modes need the inductor backend (``__post_init__``); other
        dynamo backends run in "default" mode, and the "cudagraphs" backend's own graphs are not covered here."""
        return self.compile_mode in ("reduce-overhead", "max-autotune")

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)

    def compute_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        """dtype of the tensors fed to the networks (matches the weights)."""
        return self.weight_dtype

    def network_context(self, device: torch.device | str, stage: str):
        """What every network call of ``stage`` ("ss", "slat" or "decode") runs under: :meth:`autocast`,
        ``attention_kernel`` for the attention roles :meth:`kernel_roles` selects (SDPA for the others) with the FA4
        tiles of :meth:`kernel_tiles`, the small-query path (``small_query_attention``), the MLPs' GELU epilogue
        (``gelu_epilogue`` at ``gelu_epilogue_sites``), SLaT's token buckets (``slat_token_bucket``) and fused IO steps
        (``fuse_slat_io``), the
        graph pieces' ends (``slat_graph_piece_blocks``) and the coarse up-sampling (``slat_coarse_upsample``), these
        four for stage "slat" only, the ``sparse_conv``
        algorithm, how FA4 is called (``fa4_call``) and the one-key rows' projection (``one_key_projection``)."""
        from ..model.attention_kernels import use_attention_kernel, use_fa4_call, use_small_query_path
        from ..model.layers import use_gelu_epilogue, use_one_key_projection
        from ..model.slat_flow import use_coarse_upsample, use_fused_io_blocks, use_graph_pieces, use_token_buckets
        from ..model.sparse import use_conv_impl
        return _entered_together(self.autocast(device),
                                 use_attention_kernel(self.attention_kernel, self.kernel_roles(stage),
                                                      self.kernel_tiles(stage)),
                                 use_small_query_path(self.small_query_attention if stage == "ss" else 0,
                                                      self.small_query_kernel),
                                 use_gelu_epilogue(self.gelu_epilogue and stage in self.gelu_epilogue_sites),
                                 use_token_buckets(self.slat_token_bucket if stage == "slat" else 0.0),
                                 use_graph_pieces(self.slat_graph_piece_blocks if stage == "slat" else 0),
                                 use_fused_io_blocks(self.compile_backend if self.fuse_slat_io and stage == "slat"
                                                     else None),
                                 use_coarse_upsample(self.slat_coarse_upsample and stage == "slat"),
                                 use_conv_impl(self.sparse_conv),
                                 use_fa4_call(self.fa4_call),
                                 use_one_key_projection(self.one_key_projection))

    def kernel_roles(self, stage: str) -> tuple[str, ...]:
        """The attention roles of ``stage`` that run ``attention_kernel`` (per ``attention_kernel_sites``)."""
        if stage not in KERNEL_STAGES:
            raise ValueError(f"stage must be one of {KERNEL_STAGES}, got {stage!r}")
        if stage in self.attention_kernel_sites:
            return KERNEL_ROLES
        return tuple(r for r in KERNEL_ROLES if f"{stage}.{r}" in self.attention_kernel_sites)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype :meth:`autocast` runs the networks' ops in; None where it enters no autocast."""
        return {"autocast-fp16": torch.float16, "autocast-bf16": torch.bfloat16}.get(self.precision)

    def autocast(self, device: torch.device | str):
        dtype = self.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


#: named settings of the exact fast path (CLI ``--fast-path``), each one step further than the last;
#: timings and quality of each: ``benchmarks/results/base_vs_official_h100/NOTES.md``. On CUDA the bf16 settings'
#: sparse convolutions run the Triton implicit GEMM (``sparse_conv="auto"``, since session 8; see ``SparseConv3d``);
#: the fp32 ones keep cuBLAS.
FAST_PATHS: dict[str, RunOptions] = {
    "off": RunOptions(),
    "fp32-cfg-kv": RunOptions(batch_cfg=True, cache_cond_kv=True),
    "bf16": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True),
    "compiled": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True),
    "compiled-zkv": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True,
                               compile_slat=True, collapse_zero_cond=True),
    # + CUDA graphs (reduce-overhead) in both stages: the fastest setting without FA4 (session 11: 1.44 s per object
    # at 14k on an H100, SS 0.74 s with its held K/V; ``results/base_vs_official_h100/session11/``)
    "compiled-zkv-ro": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True,
                                  compile_slat=True, collapse_zero_cond=True, compile_mode="reduce-overhead"),
    # + FlashAttention-4 in SLaT (self and cross) and CUDA graphs (reduce-overhead), which hide FA4's per-call host
    # cost; needs flash_attn.cute (optional install). SS keeps cuDNN SDPA (its headline: session 11, 1.39 s per object
    # at 14k); ``compiled-zkv-fa4-all`` below also moves SS to FA4.
    # SLaT in the default mode (``slat_compile_mode="default"``) was 7% faster on one lease and 4-67% slower on another
    # (session 11, ``results/base_vs_official_h100/session11/``): graphs are the choice that did not lose badly. Over 16
    # new sizes with FA4 in SLaT the default mode was 0.27-0.44 s slower per call (session 13,
    # ``results/slat_many_sizes_h100_fa4_host/``).
    "compiled-zkv-fa4": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True,
                                   compile_slat=True, collapse_zero_cond=True, compile_mode="reduce-overhead",
                                   attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",)),
    # + FlashAttention-4 at SS's attention too: faster than cuDNN per kernel at every SS shape once timed from CUDA
    # graphs, and the SS sampler took 0.704-0.706 s against 0.740-0.747 s for ``compiled-zkv-fa4`` in three processes on
    # one H100 lease (session 12, ``results/base_vs_official_h100/session12/``); quality changes comparable in size to those of
    # the other switches that change SS's rounding (``results/fast_path_quality_h100/fa4_ss/``).
    "compiled-zkv-fa4-all": RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True,
                                       compile_slat=True, collapse_zero_cond=True, compile_mode="reduce-overhead",
                                       attention_kernel="flash-attn-cute", attention_kernel_sites=("ss", "slat")),
}
# + the SS layout stream's attention (4 pose queries over ~4.1k / 7.5k keys, 1,200 calls per SS sampler call) on
# SDPA's FlashAttention-2, which splits the keys over CTAs: 0.020 / 0.018 ms per call against FA4's 0.047 / 0.081
# from CUDA graphs; SS sampler 0.668-0.670 s against 0.706-0.709 s, per object at 14k 1.29-1.34 s against
# 1.36-1.42 s for ``compiled-zkv-fa4`` in 3 rounds (session 13, H100, ``results/base_vs_official_h100/session13/``);
# quality: mean ΔF1 −0.06 against ``compiled-zkv-fa4-all`` (``results/fast_path_quality_h100/small_query_fa2/``).
FAST_PATHS["compiled-zkv-fa4-all-sqfa2"] = dataclasses.replace(FAST_PATHS["compiled-zkv-fa4-all"],
                                                           small_query_attention=16, small_query_kernel="sdpa-flash2")
# + the transformer MLPs' first GEMM with cuBLASLt's bias + GELU epilogue (``gelu_epilogue``): SS sampler 0.657 s
# against 0.678-0.682 s in two rounds on one H100 (55.3% of the run's measured matmul peak, of executed FLOPs),
# SLaT 0.606-0.618 s against 0.614-0.686 s (session 14, ``results/base_vs_official_h100/session14/``); quality:
# mean ΔF1 +0.37 against ``compiled-zkv-fa4-all-sqfa2``, inside the 0.46 that setting itself moved between two runs
# (``results/fast_path_quality_h100/gelu_epilogue/``).
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge"] = dataclasses.replace(FAST_PATHS["compiled-zkv-fa4-all-sqfa2"],
                                                              gelu_epilogue=True)
# + SLaT's passes as two whole CUDA graphs of our own (one per CFG batch) recorded without a device sync, the IO blocks'
# element-wise steps compiled inside them, and SLaT's torso compiled without inductor's graphs (``slat_compile_mode=
# "default"``, ``cuda_graphs``, ``async_graph_capture``, ``fuse_slat_io``). Over 16 new sizes of 4-6k voxels, each met
# once, the SLaT call took a median 0.241 s against 0.355 s, faster at 16 of 16 (session 16, H100,
# ``results/slat_many_sizes_h100_session16/``); per object at 14k (median of two rounds on each of three H100s)
# 1.201 / 1.241 / 1.240 s against 1.268 / 1.248 / 1.264 s, at 20k 1.463 / 1.500 s against 1.550 / 1.520 s
# (``results/base_vs_official_h100/session16/``). Its values equal those of the same graphs recorded with a sync on all
# 28 objects; against fp32, mean F1 30.34 against 30.26 (``results/fast_path_quality_h100/async_capture/``).
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge"], slat_compile_mode="default", cuda_graphs=True,
    async_graph_capture=True, fuse_slat_io=True)

# The headline path with FlashAttention-4 called through the operator registered with ``torch.library.Library`` whose
# kernel calls FA4's forward function itself (``fa4_call="direct"``): the same kernel with the same arguments (bit-
# identical in the GPU test, ``tests/test_fa4_direct_call.py``), 50-85 against 85-103 µs of host time per call
# (``results/attention_host_cost_h100/session21/``), which SLaT's per-object graph recording pays 96-192 times. Per
# object on one H100, three rounds each in two runs (session 21, ``results/base_vs_official_h100/session21/``): SLaT at
# 14k 0.523 / 0.535 / 0.527 and 0.556 / 0.527 / 0.540 s against 0.547 / 0.579 / 0.544 and 0.560 / 0.534 / 0.571 s for
# ``-ge-ac`` (6 of 6 faster), at 20k faster in 5 of 6; the SS sampler 0.648-0.656 against 0.656-0.658 s (3 of 3).
# Inference only: the direct operator refuses gradients and FA4's MLA case with a clear error.
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-fd"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac"], fa4_call="direct")
# The headline path with FA4's cached compiled kernel launched directly after one call through FA4's forward per
# signature (``fa4_call="kernel"``, ``model.fa4_kernel_call``): bit-identical to FA4's forward at every length tried,
# and a CUDA graph's replay of it equals the eager launch (GPU tests, ``tests/test_fa4_kernel_call.py``), 23-37 µs of
# host per call against 48-73 µs for the direct operator and 24-44 µs for cuDNN SDPA
# (``results/attention_host_cost_h100/session21_lease2/``). Per object against ``-ge-ac-fd`` on a second H100 lease (session 21,
# ``results/base_vs_official_h100/session21/fa4_kernel*/``): SLaT at 14k 0.505-0.512 against 0.504-0.514 s, faster in
# 5 of 6 rounds; at 20k 5 of 6; the SS sampler 2 of 3 (0.643-0.648 s for both). Small (mostly under 1%), but mostly
# the same direction.
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-fk"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac"], fa4_call="kernel")

# For a stream of objects of new sizes (a dataset run), where every SLaT object meets new token counts: the GELU
# epilogue kept to SS (``gelu_epilogue_sites``), since a cuBLAS GEMM pays host time at its first call with a new token
# count (H200: ~5 ms per shape, ~10 ms for the epilogue GEMM; ``results/gemm_first_call_h200/``), and SLaT's graphs
# recorded at their first call from the second object on (``graph_record_first``; bit-identical to the warmed recording
# in the GPU test). SLaT call over new sizes (``results/slat_many_sizes_session17/``): H200 at 12-20k voxels, each
# variant in its own process, 0.511 against 0.606 s for ``-ge-ac`` on a first meeting and 0.495 against 0.529 s on the
# second (8 of 8 faster each); H100 at 4-6k 0.214 against 0.227 s on the second meeting (14 of 16; its first-meeting
# lead, 0.208 against 0.272 s, is flattered by running after ``-ge-ac`` in the same process). But on an H100 at 12-20k
# voxels, each variant in its own process (session 18, with ``unguided_graph_ahead=8`` added,
# ``results/slat_many_sizes_session18/``), it tied ``-ge-ac`` on the first meeting (0.541 s each, 4 of 8 faster) and
# lost on the second (0.540 against 0.498 s, 0 of 8): which path wins a dataset run depends on the machine. Repeating
# one object, as
# the per-object benchmark does, it is not faster: H100 per object 1.265 against 1.263 s at 14k, 1.558 against 1.498 s
# at 20k, where no first call is left and the epilogue's kernel saving counts (``results/base_vs_official_h100/
# session17/``). The mesh decoder, which also meets new token counts with every object, loses the epilogue too.
# Quality, measured directly (session 18, H100, ``results/fast_path_quality_h100/stream_session18/``): sam3d-mini mean F1
# 30.42 against 30.51 for ``-ge-ac`` and 30.26 in fp32 (mean ΔF1 −0.09 against ``-ge-ac``, at most 0.66; no object's
# voxel count changes).
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-stream"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac"], gelu_epilogue_sites=("ss",), graph_record_first=True)

# The headline path with SLaT's whole-pass graphs recorded in pieces of 2 transformer blocks, each queued as soon as it
# is recorded (``slat_graph_piece_blocks``), the CFG-batched graph at the first step without an eager pass and the
# batch-1 graph after the 8th guided step (``graph_record_first``, ``unguided_graph_ahead``): the first pass's recording
# then overlaps its own GPU work instead of idling the GPU. Per object, two rounds on one H100 (session 19,
# ``results/base_vs_official_h100/session19/pieces/``): SLaT 0.518 / 0.518 s against 0.588 / 0.529 s for ``-ge-ac`` at
# 14k, 0.780 / 0.796 s against 0.834 / 0.780 s at 20k; the longest idle stretch of the profiled 14k call went from 56
# to 5 ms. The same kernels on the same inputs as the single graphs (GPU test, ``tests/test_graph_pieces.py``), so the
# values of ``-ge-ac``. Over new sizes it did not gain (6 sizes of 12-20k, one process each: 0.578 / 0.520 s against
# 0.544 / 0.516 s for ``-ge-ac`` on the first / second meeting, ``results/slat_many_sizes_session19/``): a path for
# repeated sizes, like ``-ge-ac``; which wins in a dataset run is open.
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac"], graph_record_first=True, unguided_graph_ahead=8,
    slat_graph_piece_blocks=2)
# + every SLaT switch timed on the pieces path since (the suffixes of ``base_vs_official.py``'s variant of the same
# options, ``...-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi``): the pieces merged into one graph after 4 calls (``-m4``, from the
# torso with its blocks inlined, ``-mi``: faster than without in 5 of 6 rounds, a small gain), the batch-1 tables sliced from the pair's (``-dt``), the nested tiled
# sparse conv (``-nc``), FA4's compiled kernel launched directly (``-fk``, inference only), the blocks' adaLN outputs kept
# per step (``-cm``) and the unconditional rows' cross-attention projected once (``-ok``). SLaT at 14k on an H100
# (session 25, ``results/base_vs_official_h100/session25/``): 0.4784-0.4848 s against 0.4986-0.5013 s for the pieces path
# with ``-m4-dt-nc-fk`` in 6 of 6 rounds; quality within the fast path's spread (mean F1 30.41 against fp32's 30.26,
# ``results/fast_path_quality_h100/session25_fastest/``)
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces"], slat_graph_merge_after=4, derive_unguided_tables=True,
    sparse_conv="implicit-skip-nested", fa4_call="kernel", cache_block_modulations=True, one_key_projection=True,
    slat_merge_inlined=True)
# + the condition K/V made with fewer host operations (``-lk``) and the timestep embedding with the IO blocks' scale and
# shift kept per step (``-ci``): faster than the path above in 7 of 8 rounds over two processes (sessions 28-29, by
# 0.1-6.4 ms per SLaT call at 14k on an H100; the other round ran both units on a slow host), 0.3 GB less peak memory
# (``results/base_vs_official_h100/session29/``); both exact on the CPU, and on the GPU its sam3d-mini results equal
# the path above's on all 28 objects (session 30, ``results/fast_path_quality_h100/session30_lk_ci/``).
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi"], lean_cond_kv=True,
    cache_io_modulations=True)
# + the condition rows' K/V projected once per call on ``to_kv``'s weight halves (``-sk``): faster than the path above
# in 6 of 7 rounds over two processes (session 30, median −4.0 ms per SLaT call at 14k on an H100), 0.38 GB less peak
# memory, the same latents bit for bit there (``results/base_vs_official_h100/session30/``); on an H200 its sam3d-mini
# results equal the path above's on all 28 objects (session 31, ``results/fast_path_quality_h200/session31_sk_cu/``).
FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk"] = dataclasses.replace(
    FAST_PATHS["compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci"], split_cond_kv=True)


def fast_path(name: str) -> RunOptions:
    """The named fast-path setting (:data:`FAST_PATHS`)."""
    if name not in FAST_PATHS:
        raise ValueError(f"unknown fast path {name!r}; choose one of {list(FAST_PATHS)}")
    return FAST_PATHS[name]
