"""Stage 2: structured latent (SLaT flow sampler on the sparse voxels of stage 1)."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref

import torch
from torch import Tensor, nn

from ..model.condition import ConditionFuser
from ..model.configs import ModelConfig, SamplerConfig
from ..model.slat_flow import SLaTFlowModel
from ..model.sparse import first_element_structure, persistent_structure, release_structure
from ..preprocess import PreparedInputs
from ..samplers import EulerFlowSampler, cfg_active, guided, time_grid
from ..seams import (EventBus, SparseTokens, StepPolicy, TokenTransform, TransformContext, TransformState)
from .cond_kv import lean_slat_cond_kv, project_cond_rows, split_slat_cond_kv
from .graphs import GraphedCall, GraphPool
from .held import HoldsInputs
from .inductor_compat import install_stable_writeline_key
from .options import RunOptions
from .types import SLaTOutput, SSOutput

#: entries of the stage's kept block modulations (``SLaTStage.block_modulations``) before it is emptied: one schedule
#: fills two per step (the CFG pair's and the unguided batch), so this holds a few schedules
_MODULATION_CACHE_ENTRIES = 256

#: dynamo graphs the compiled SLaT torsos may hold together (all settings and batch sizes share dense_torso's code
#: object, and with it one recompile limit): each setting compiles one graph per batch size (two more with token buckets)
_TORSO_RECOMPILE_LIMIT = 64


def slat_noise(num_voxels: int, channels: int, generator: torch.Generator) -> Tensor:
    """Initial SLaT noise (N, C), drawn on the CPU."""
    return torch.randn((num_voxels, channels), generator=generator)


class _PoolLease:
    """A call's hold on :meth:`SLaTStage.graph_pool` (weakly referenced: the hold ends when the call's structures
    are released)."""

    __slots__ = ("__weakref__",)


class SLaTStage(HoldsInputs, nn.Module):
    """Condition embedding (no point map) and the SLaT flow sampler on sparse voxels. With token buckets
    (``RunOptions.slat_token_bucket``) under a compile mode with CUDA graphs, the condition K/V stay in held buffers
    between calls (:class:`HoldsInputs`), so that objects of one bucket replay one another's graphs."""

    name = "slat"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.condition = ConditionFuser(cfg.slat_condition)
        self.flow = SLaTFlowModel(cfg.slat_flow)
        self.register_buffer("mean", torch.tensor(cfg.slat_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.slat_std, dtype=torch.float32), persistent=False)

    def compiled_torso(self, options: RunOptions):
        """The SLaT flow's transformer blocks (:meth:`SLaTFlowModel.dense_torso`), torch.compile'd when
        ``options.compile_slat`` (cached per backend and mode, kept out of the module tree), else None. The mode is
        SLaT's own (``options.for_stage("slat")``: ``slat_compile_mode`` where set).

        The token count is marked dynamic at each call, so one graph per batch size (1, and 2 for the
        CFG pair) serves objects of every size (and one more per batch size with token buckets, whose torso
        takes the real token counts too); each block is a nested compile region, or with
        ``options.slat_block_regions`` off, the blocks are inlined into one graph.
        """
        if not options.compile_slat:
            return None
        options = options.for_stage("slat")
        cache = self.__dict__.setdefault("_compiled_torso", {})
        # the pieces' ends are compiled into the torso (a static argument): a compiled function per setting. Dynamo
        # still keeps every setting's graphs on dense_torso's one code object and counts them against one recompile
        # limit (8 by default: four settings x two batch sizes), so the wrapper raises that limit, and makes hitting it
        # an error instead of a torso that silently runs uncompiled
        key = (options.compile_mode, options.slat_graph_piece_blocks, options.slat_block_regions,
               options.cache_block_modulations, *options.compile_key, options.slat_cpp_wrapper,
               options.slat_wrapper_asserts)
        if key not in cache:
            flow = self.flow
            if options.slat_cpp_wrapper:
                # torch 2.11's C++ wrapper can reuse a size array's name before its declaration (inductor_compat)
                install_stable_writeline_key()

            def inlined_blocks(*args, **kwargs):
                return flow.dense_torso(*args, block_regions=False, **kwargs)

            compiled = torch.compile(flow.dense_torso if options.slat_block_regions else inlined_blocks,
                                     backend=options.compile_backend,
                                     **options.compile_kwargs(options.compile_mode, options.slat_cpp_wrapper,
                                                              options.slat_wrapper_asserts))

            def torso(*args, **kwargs):
                # only the token count is dynamic (the flow marks it): without this, dynamo would make
                # the batch dimension dynamic too once it has seen 2 and 1, and specialise it back
                # inside the per-element K/V path (a recompile torch 2.13 fails on in nested regions)
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=_TORSO_RECOMPILE_LIMIT,
                                                fail_on_recompile_limit_hit=True):
                    return compiled(*args, **kwargs)

            cache[key] = torso
        return cache[key]

    def _modulation_params(self, kind: str) -> list[Tensor]:
        """The parameters the kept modulations of ``kind`` depend on ("block": the timestep embedder's and every
        transformer block's adaLN; "io": the timestep embedder's and every IO res-block's ``emb_layers``), read by a
        plain walk over the modules' own dicts: current after a Parameter or a submodule is replaced, at a fraction of
        ``parameters()``'s host time (each step of each call looks them up, and the step after a new object's first
        waits for it)."""
        flow = self.flow
        owners = ([b.adaLN_modulation for b in flow.blocks] if kind == "block"
                  else [b.emb_layers for b in flow.io_blocks])
        stack, params = [flow.t_embedder, *owners], []
        while stack:
            m = stack.pop()
            params += [p for p in m._parameters.values() if p is not None]
            stack += [c for c in m._modules.values() if c is not None]
        return params

    def _kept_per_step(self, kind: str, t: float, batch: int, dtype: torch.dtype, device: torch.device,
                       options: RunOptions | None) -> Tensor:
        """The kept modulations of ``kind`` (see :meth:`block_modulations`; "io": :meth:`io_modulations`)."""
        flow = self.flow
        params = self._modulation_params(kind)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            option = "cache_block_modulations" if kind == "block" else "cache_io_modulations"
            raise ValueError(f"{option} keeps values computed without gradients, so the timestep embedder and the "
                             f"modulating layers would get none: run under torch.no_grad() or turn the option off to "
                             f"train through the SLaT flow")
        device = torch.device(device)
        autocast = options.autocast_dtype if options is not None else None
        if autocast is None and torch.is_autocast_enabled(device.type):
            autocast = torch.get_autocast_dtype(device.type)
        key = (kind, float(t), batch, dtype, autocast, device,
               tuple((id(p), p._version, p.dtype, p.device) for p in params))
        cache: dict = self.__dict__.setdefault("_block_modulations", {})
        entry = cache.get(key)
        if entry is None:
            if len(cache) >= _MODULATION_CACHE_ENTRIES:
                cache.clear()  # a schedule has ~2 x steps entries per kind; more means settings or weights changed
            context = options.network_context(device, "slat") if options is not None else contextlib.nullcontext()
            compute = flow.block_modulations if kind == "block" else flow.io_modulations
            with torch.no_grad(), context:
                # the parameters go with the values: while the entry lives, no other tensor can take their ids
                entry = cache[key] = (compute(torch.full((batch,), float(t), device=device)), params)
        return entry[0]

    def block_modulations(self, t: float, batch: int, dtype: torch.dtype, device: torch.device,
                          options: RunOptions | None = None) -> Tensor:
        """The SLaT flow's :meth:`~fs3d_accel.model.slat_flow.SLaTFlowModel.block_modulations` at the scaled timestep
        ``t`` for ``batch`` rows (``RunOptions.cache_block_modulations``), kept across calls: they depend on the step
        and the weights only, so every object sampled with the same schedule reuses them. Computed from
        ``torch.full((batch,), t)`` as the sampler's pass builds its timesteps, so the values are the ones the blocks
        would compute. Keyed by the step, the batch, ``dtype`` (the blocks'), the autocast dtype, the device, and each
        involved parameter's identity, version, dtype and device: weights changed in place (``copy_``,
        ``load_state_dict``), replaced by new Parameters or moved are picked up; a change written through ``.data``
        bypasses the version counter and is not. Each entry keeps its parameters alive, so that their ids cannot be
        reused by others while it lives. Up to ``_MODULATION_CACHE_ENTRIES`` entries (at full size 24 x B x 6144 values,
        0.6 MB for the bf16 CFG pair) stay on
        the device until :meth:`clear_block_modulations`. The values carry no autograd history, so gradients through the
        blocks' adaLN are refused. ``options``: the call's settings; the values are then computed, where not kept yet,
        under its ``network_context`` for stage "slat", and the autocast dtype of the key is the one that context sets
        (so that a kept entry is found without entering it); without, under whatever context the caller entered."""
        return self._kept_per_step("block", t, batch, dtype, device, options)

    def io_modulations(self, t: float, batch: int, dtype: torch.dtype, device: torch.device,
                       options: RunOptions | None = None) -> Tensor:
        """The SLaT flow's :meth:`~fs3d_accel.model.slat_flow.SLaTFlowModel.io_modulations` (the timestep embedding and
        the IO res-blocks' scale and shift, packed) at the scaled timestep ``t`` for ``batch`` rows
        (``RunOptions.cache_io_modulations``), kept across calls as :meth:`block_modulations` keeps those (same keys,
        same store, same limits; its parameters are the timestep embedder's and the IO blocks' ``emb_layers``)."""
        return self._kept_per_step("io", t, batch, dtype, device, options)

    def clear_block_modulations(self) -> None:
        """Drop the kept modulations (:meth:`block_modulations`, :meth:`io_modulations`) and the device memory they
        hold."""
        self.__dict__.pop("_block_modulations", None)

    def graph_pool(self, lease: "_PoolLease") -> GraphPool:
        """The stage's kept CUDA-graph memory pool (``RunOptions.shared_graph_pool``) for the call holding ``lease``:
        successive objects record into one pool and reuse its memory. While another live call holds it (concurrent
        calls on one stage, whose replays could overlap), the call gets a pool of its own."""
        slot = self.__dict__.setdefault("_graph_pool", {"pool": GraphPool(), "holder": None})
        holder = slot["holder"]() if slot["holder"] is not None else None
        if holder is not None and holder is not lease:
            return GraphPool()
        slot["holder"] = weakref.ref(lease)
        return slot["pool"]

    def velocity_net(self, cond: Tensor, coords: Tensor, sampler_cfg: SamplerConfig, options: RunOptions,
                     structures: list[dict] | None = None):
        """The guided velocity function of the sampler. With ``structures`` (a list the caller owns and
        releases with :func:`release_structure`), passes over all tokens reuse one coordinate structure
        per coordinate set (plain and CFG-batched) instead of rebuilding it every step."""
        options = options.for_stage("slat")
        flow = self.flow
        if options.slat_graph_piece_blocks > len(flow.blocks):
            raise ValueError(f"slat_graph_piece_blocks={options.slat_graph_piece_blocks} is more than the SLaT flow's "
                             f"{len(flow.blocks)} transformer blocks (use at most {len(flow.blocks)}: pieces for the "
                             f"input path, the torso and the output path)")
        cache = structures is not None or options.cuda_graphs
        if cache and structures is None:
            raise ValueError("cuda_graphs needs a structures list (the graphs live in the coordinate structures)")
        plain_structure = persistent_structure() if cache else None
        if cache:
            structures.append(plain_structure)
        dtype = options.compute_dtype(cond.device)
        uncond = cond * 0
        torso = self.compiled_torso(options)

        kv_cache: dict[str, object] = {}
        # (options, device, batch) of the whole-pass graphs' passes this stage has run in the process: with
        # graph_record_first, a graph of a kind already met records at its first call, from prebuilt tables
        passes_run: set = self.__dict__.setdefault("_graph_passes_run", set())
        first_call_failed: set = self.__dict__.setdefault("_graph_first_call_failed", set())
        record_first = options.graph_record_first and cache

        def pass_kind(batch: int) -> tuple:
            # the options by repr (hashable even where a field holds a list), and the compiled torso itself: a new
            # torso (another compile key, a reset cache) compiles again at its first pass, which must then be eager
            return repr(options), str(cond.device), batch, id(torso)
        graph_pool = None
        if options.shared_graph_pool:
            # the call holds the stage's kept pool for as long as its graphs live (they go with plain_structure)
            lease = plain_structure[("graph_pool_lease",)] = _PoolLease()
            graph_pool = self.graph_pool(lease)
        # Held K/V buffers only with token buckets: inductor's CUDA graphs record one graph per token count, so without
        # buckets each object of a new size records anyway, and held buffers would only make repeats of one object
        # (benchmarks) replay where a real new object records: per-object timings would flatter the stage. With
        # buckets, objects of one bucket share a shape, and the held K/V let them share its graphs.
        held_kv = (self.held_inputs().lease() if options.slat_token_bucket and torso is not None
                   and options.compile_uses_cuda_graphs else None)

        def kv_of(name: str, c: Tensor, zero_rows: list[bool]):
            """Cached K/V of condition ``name``, computed on its first pass, once per object (``zero_rows``: which
            batch rows are the all-zero unconditional condition; see ``RunOptions.prepare_cond_kv``). Lazily:
            with batched CFG the separate unconditional K/V is never used."""
            if not options.cache_cond_kv:
                return None
            if name not in kv_cache:
                if options.split_cond_kv:  # the condition's rows projected once per call, shared by every set
                    if "_cond_rows" not in kv_cache:
                        kv_cache["_cond_rows"] = project_cond_rows(flow.blocks, cond.to(dtype).to(flow.torso_dtype))
                    kv_cache[name] = split_slat_cond_kv(self.__dict__.setdefault("_zero_row_kv", {}), flow.blocks,
                                                        kv_cache["_cond_rows"], zero_rows,
                                                        options.compile_uses_cuda_graphs)
                elif options.lean_cond_kv:  # (the options refuse it without a compiled torso and with held K/V)
                    kv_cache[name] = lean_slat_cond_kv(self.__dict__.setdefault("_zero_row_kv", {}), flow.blocks,
                                                       c.to(dtype).to(flow.torso_dtype), zero_rows,
                                                       options.compile_uses_cuda_graphs)
                else:
                    kv_cache[name] = options.prepare_cond_kv(flow.precompute_cond_kv(c.to(dtype)), zero_rows,
                                                             torso is not None, held_kv, name)
            return kv_cache[name]

        # slat_merge_inlined: the merged graphs record the torso compiled without piece ends, its blocks inlined
        merged_options = (options.derived("slat_merged", lambda: dataclasses.replace(
            options, slat_graph_piece_blocks=0, slat_graph_merge_after=0, slat_merge_inlined=False,
            slat_block_regions=False)) if options.slat_merge_inlined else None)
        merged_torso = self.compiled_torso(merged_options) if merged_options is not None else None
        # kinds of merged pass (the warm keys below) that have run eagerly in the process: their first call compiles,
        # which a recording cannot do, so a merge records only after one eager call
        merged_warm: set = self.__dict__.setdefault("_merged_torso_warm", set())

        def new_graphed(call, warmup: int, merged=None) -> GraphedCall:
            """A whole-pass graph of this call's settings (recording mode, pieces, memory pool; with
            ``slat_merge_inlined``, ``merged`` = (the call recorded at the merge, its key in the warm set))."""
            merged_call, warm_key = merged if merged is not None else (None, None)
            return GraphedCall(call, warmup=warmup, async_capture=options.async_graph_capture, pool=graph_pool,
                               in_pieces=bool(options.slat_graph_piece_blocks),
                               merge_after=options.slat_graph_merge_after, merged_fn=merged_call,
                               merged_warmup=None if merged_call is None else (lambda: warm_key not in merged_warm))

        def run(feats: Tensor, c_coords: Tensor, t: float, c: Tensor, ckv, structure=None,
                prepare_only: bool = False) -> Tensor | None:
            """The flow's velocity at ``feats`` (replayed from the structure's graph where there is one); with
            ``prepare_only``, record that graph now (``graph_record_first``'s recording without a warm-up) and return
            None without running it."""
            if prepare_only and not (record_first and options.cuda_graphs and structure is not None):
                raise ValueError("prepare_only records a whole-pass graph without a warm-up; it needs "
                                 "graph_record_first, cuda_graphs and a coordinate structure")
            tt = torch.full((c.shape[0],), t * sampler_cfg.time_scale, device=c.device)
            extra = {} if structure is None else {"structure": structure}
            if torso is not None:
                extra["torso"] = torso
            args = (feats, tt)
            kept = []  # which kept per-step values follow feats and tt as arguments, in order
            for kind, on in (("block", options.cache_block_modulations), ("io", options.cache_io_modulations)):
                if on:
                    args += (self._kept_per_step(kind, t * sampler_cfg.time_scale, c.shape[0], flow.torso_dtype,
                                                 c.device, options),)
                    kept.append(f"{kind}_mods")

            def make_call(call_options: RunOptions, call_extra: dict):
                def call(f: Tensor, tt: Tensor, *mods: Tensor) -> Tensor:
                    # the kept modulations are arguments (not closures) so that a replayed graph reads each step's own
                    # values
                    mods_kw = dict(zip(kept, mods, strict=True))
                    with call_options.network_context(c.device, "slat"):
                        if ckv is not None:
                            # the flow reads the cached K/V, never the condition: no per-pass cast of it (session 29's
                            # CPU op log found it: (B, L, 1024) fp32 -> bf16 in every pass, recorded into its graph)
                            out = flow(f.to(dtype), c_coords, tt, None, cond_kv=ckv, **mods_kw, **call_extra)
                        else:
                            out = flow(f.to(dtype), c_coords, tt, c.to(dtype), **mods_kw, **call_extra)
                    return out.float()
                return call

            call = make_call(options, extra)
            merged = None
            if merged_options is not None and structure is not None:
                plain_merged = make_call(merged_options, {**extra, "torso": merged_torso})
                # what makes the merged torso compile another graph: the options (pass_kind: also the batch and the
                # device), the torso itself, and the form of the K/V it reads (one key for a zero condition's rows)
                warm_key = (pass_kind(c.shape[0]), id(merged_torso),
                            None if not ckv else tuple(tuple(t.shape) for t in ckv[0]))

                def merged_call(*a: Tensor) -> Tensor:
                    out = plain_merged(*a)
                    if not (a[0].is_cuda and torch.cuda.is_current_stream_capturing()):
                        merged_warm.add(warm_key)  # ran eagerly: compiled for this kind of pass
                    return out
                merged = (merged_call, warm_key)

            if options.cuda_graphs and structure is not None:
                # full-token passes over one coordinate set: same shapes every step. One graph per
                # condition (the plain structure serves the cond and the uncond pass); the graphs live
                # in the structure and go with release_structure at the end of the object
                slot = ("cuda_graph", id(c))
                graphed = structure.get(slot)
                if not record_first:
                    if graphed is None:
                        graphed = structure[slot] = new_graphed(call, options.slat_graph_warmup, merged)
                    return graphed(*args)
                kind = pass_kind(c.shape[0])
                if prepare_only:
                    if graphed is not None:
                        raise ValueError(f"a graph for this pass is in the structure already ({slot}); prepare_only "
                                         f"would replace it")
                    graphed = structure[slot] = new_graphed(call, 0, merged)
                    try:
                        graphed.prepare(*args)
                    except Exception as exc:
                        # as a failed first-call recording: this kind of pass is warmed from now on, and the step
                        # that needs the graph makes a warmed one
                        warnings.warn(f"SLaT graph recorded ahead of its first call failed ({type(exc).__name__}: "
                                      f"{exc}); the step that needs it warms it instead, and this kind of pass is "
                                      f"warmed from now on", RuntimeWarning, stacklevel=2)
                        first_call_failed.add(kind)
                        del structure[slot]
                    return None
                if graphed is None:
                    # no eager warm-up where the tables exist and this kind of pass has run in the process
                    skip = kind in passes_run and kind not in first_call_failed and "checked_input" in structure
                    graphed = structure[slot] = new_graphed(call, 0 if skip else options.slat_graph_warmup, merged)
                try:
                    out = graphed(*args)
                except Exception as exc:
                    if graphed.warmup != 0 or graphed.captures:
                        raise
                    # the first-call recording failed (something was still lazy for this size): run this step
                    # eagerly instead and record at the next, as without graph_record_first, for this kind of pass
                    # from now on in the process
                    warnings.warn(f"SLaT graph recorded at its first call failed ({type(exc).__name__}: {exc}); "
                                  f"running the step eagerly, recording at the next, and warming this kind of pass "
                                  f"from now on", RuntimeWarning, stacklevel=2)
                    first_call_failed.add(kind)
                    graphed = structure[slot] = new_graphed(call, options.slat_graph_warmup, merged)
                    out = graphed(*args)
                passes_run.add(kind)
                return out
            return call(*args)

        def select(x: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor]:
            if active is None:
                return x, coords
            return x[active], coords[active]

        pair_structures: list[dict] = []  # the CFG pair's structure once made (``derive_unguided_tables``)

        def derive_plain() -> bool:
            """The plain structure sliced from the CFG pair's (built), where ``derive_unguided_tables`` asks for it."""
            if not (options.derive_unguided_tables and pair_structures and "checked_input" in pair_structures[0]):
                return False  # not asked, or the pair's tables are not built yet (a schedule that starts unguided)
            if first_element_structure(pair_structures[0], coords, plain_structure):
                return True
            warnings.warn("derive_unguided_tables: the CFG pair's coordinate structure holds an entry that cannot be "
                          "sliced; building the batch-1 structure from the coordinates instead", RuntimeWarning,
                          stacklevel=2)
            return False

        def net_cond(x, t, active, is_uncond):
            f, c = select(x, active)
            structure = plain_structure if active is None else None
            if structure is not None and "checked_input" not in structure:
                derive_plain()
            if is_uncond:
                return run(f, c, t, uncond, kv_of("uncond", uncond, [True]), structure)
            return run(f, c, t, cond, kv_of("cond", cond, [False]), structure)

        def cfg_coords(c: Tensor) -> Tensor:
            c1 = c.clone()
            c1[:, 0] = 1
            return torch.cat([c, c1], 0)

        batched = None
        if options.batch_cfg:
            both = torch.cat([cond, uncond], 0)
            both_coords = cfg_coords(coords) if cache else None
            both_structure = persistent_structure() if cache else None
            if cache:
                structures.append(both_structure)
                pair_structures.append(both_structure)

            # With graphs recorded asynchronously, the unguided pass's first (eager) call and its recording, once
            # CFG ends, must not synchronise, or they drain the guided replays queued ahead of them. Building the
            # plain structure's tables would: so they are built at the first guided full-token step, while the GPU
            # is still idle from the object's start, tables alone (``build_structure``: no network pass, unless
            # ``slat_tables_by_pass``). On a process's first object the unguided pass's first call
            # still syncs: it compiles the batch-1 torso. Only where an unguided step is still to come and the tables
            # are not built yet (a schedule may start unguided); a step policy that later skips every unguided step
            # makes it wasted work.
            warm_unguided = [options.cuda_graphs and options.async_graph_capture and cache]
            grid = time_grid(sampler_cfg.steps, sampler_cfg.rescale_t)[:-1]

            def build_plain_tables(x, t):
                later_unguided = any(not cfg_active(sampler_cfg, tk) for tk in grid if tk > t)
                if not later_unguided or "checked_input" in plain_structure:
                    return
                if options.derive_unguided_tables:
                    build_pair_tables(x, t)  # its tables are needed first anyway; the plain ones are then sliced
                if not derive_plain():
                    tt = torch.full((cond.shape[0],), t * sampler_cfg.time_scale, device=cond.device)
                    with options.network_context(cond.device, "slat"):
                        flow.build_structure(x.to(dtype), coords, tt, cond.shape[0], plain_structure,
                                             by_pass=options.slat_tables_by_pass)

            def build_pair_tables(x, t):
                if "checked_input" not in both_structure:
                    batch = both.shape[0]
                    tt = torch.full((batch,), t * sampler_cfg.time_scale, device=cond.device)
                    with options.network_context(cond.device, "slat"):
                        flow.build_structure(torch.cat([x, x], 0).to(dtype), both_coords, tt, batch, both_structure,
                                             by_pass=options.slat_tables_by_pass)

            def build_both_tables(x, t):
                """The CFG-batched structure's tables, so that its graph records at the first step (graph_record_first)
                instead of after an eager pass; only once this kind of pass has run in the process."""
                kind = pass_kind(both.shape[0])
                if record_first and kind in passes_run and kind not in first_call_failed:
                    build_pair_tables(x, t)

            guided_full_steps = [0]
            guided_in_grid = sum(cfg_active(sampler_cfg, tk) for tk in grid)
            if record_first and options.unguided_graph_ahead > guided_in_grid:
                warnings.warn(f"unguided_graph_ahead={options.unguided_graph_ahead} is past this schedule's "
                              f"{guided_in_grid} guided steps: the batch-1 graph records at its first call instead",
                              RuntimeWarning, stacklevel=2)
            elif record_first and options.unguided_graph_ahead and guided_in_grid == len(grid):
                warnings.warn(f"unguided_graph_ahead={options.unguided_graph_ahead}: this schedule guides every step, "
                              f"so there is no batch-1 graph to record ahead", RuntimeWarning, stacklevel=2)

            def record_unguided_ahead(x, t):
                """After the ``unguided_graph_ahead``-th guided full-token step, record the batch-1 graph of the first
                unguided step (the conditional pass after CFG ends) now, while replays are queued ahead of the host:
                only where such a step follows, its tables are built, and that kind of pass records without a warm-up."""
                guided_full_steps[0] += 1
                if not (record_first and options.unguided_graph_ahead == guided_full_steps[0]):
                    return
                later = [tk for tk in grid if tk > t and not cfg_active(sampler_cfg, tk)]
                kind = pass_kind(cond.shape[0])
                if (later and "checked_input" in plain_structure and kind in passes_run
                        and kind not in first_call_failed and ("cuda_graph", id(cond)) not in plain_structure):
                    run(x, coords, later[0], cond, kv_of("cond", cond, [False]), plain_structure, prepare_only=True)

            def batched(x, t, active):
                f, c = select(x, active)
                if active is None and cache and warm_unguided[0]:
                    warm_unguided[0] = False
                    build_both_tables(x, t)
                    build_plain_tables(x, t)
                if active is None and cache:
                    out = run(torch.cat([f, f], 0), both_coords, t, both, kv_of("both", both, [False, True]),
                              both_structure)
                    record_unguided_ahead(x, t)
                else:
                    out = run(torch.cat([f, f], 0), cfg_coords(c), t, both, kv_of("both", both, [False, True]))
                n = f.shape[0]
                return out[:n], out[n:]

        def build_tables(x: Tensor) -> None:
            """Build the coordinate structures' tables of the full-token passes this schedule runs, now
            (``SLaTFlowModel.build_structure``; ``SLaTStage.prepare(build_tables=True)``); a structure whose tables
            exist is left as it is."""
            if not cache:
                return
            grid = time_grid(sampler_cfg.steps, sampler_cfg.rescale_t)[:-1]
            guided_ts = [tk for tk in grid if cfg_active(sampler_cfg, tk)]
            unguided_ts = [tk for tk in grid if not cfg_active(sampler_cfg, tk)]
            with options.network_context(cond.device, "slat"):
                if options.batch_cfg and guided_ts and "checked_input" not in both_structure:
                    batch = both.shape[0]
                    tt = torch.full((batch,), guided_ts[0] * sampler_cfg.time_scale, device=cond.device)
                    flow.build_structure(torch.cat([x, x], 0).to(dtype), both_coords, tt, batch, both_structure,
                                         by_pass=options.slat_tables_by_pass)
                # the plain structure serves the unguided passes, and every pass without batched CFG
                plain_ts = unguided_ts if options.batch_cfg else grid
                if plain_ts and "checked_input" not in plain_structure and not derive_plain():
                    tt = torch.full((cond.shape[0],), plain_ts[0] * sampler_cfg.time_scale, device=cond.device)
                    flow.build_structure(x.to(dtype), coords, tt, cond.shape[0], plain_structure,
                                         by_pass=options.slat_tables_by_pass)

        velocity = guided(net_cond, sampler_cfg, batched)
        velocity.build_tables = build_tables
        return velocity

    @torch.no_grad()
    def forward(self, inputs: PreparedInputs, ss: SSOutput, *, generator: torch.Generator,
                policy: StepPolicy | None = None, events: EventBus | None = None,
                options: RunOptions | None = None, sampler: SamplerConfig | None = None,
                coords_transform: TokenTransform | None = None, noise: Tensor | None = None) -> SLaTOutput:
        return self.prepare(inputs, ss, generator=generator, policy=policy, events=events, options=options,
                            sampler=sampler, coords_transform=coords_transform, noise=noise).sample()

    @torch.no_grad()
    def prepare(self, inputs: PreparedInputs, ss: SSOutput, *, generator: torch.Generator,
                policy: StepPolicy | None = None, events: EventBus | None = None,
                options: RunOptions | None = None, sampler: SamplerConfig | None = None,
                coords_transform: TokenTransform | None = None, noise: Tensor | None = None,
                build_tables: bool = False) -> "SLaTRun":
        """Everything of a SLaT call before its sampler (token transform, condition, noise on the device, the velocity
        function); :meth:`SLaTRun.sample` runs the sampler. ``build_tables``: also build the coordinate structures'
        tables of the full-token passes now (``flow.build_structure``: the host reads of a first pass), so that on the
        exact fast path the sampler then reads no device data on the host and its GPU work can queue behind other
        work (``fs3d_accel.stream``). It builds the structures the passes over all tokens reuse (every call has them);
        the values are the same."""
        if not isinstance(build_tables, bool):
            raise TypeError(f"build_tables must be True or False, got {build_tables!r}")
        options = options or RunOptions()
        sampler_cfg = sampler or self.cfg.slat_sampler
        device = next(self.flow.parameters()).device
        coords = ss.coords.to(device)
        state = TransformState()
        token_scores = None
        if coords_transform is not None:
            tokens, state = coords_transform.reduce(
                SparseTokens(coords=coords, resolution=ss.resolution),
                TransformContext(mask=inputs.mask_full, occupancy_logits=ss.occupancy_logits,
                                 info={"image": inputs.image_full}))
            coords = tokens.coords.to(device=device, dtype=torch.int32)
            token_scores = tokens.scores
        if coords.shape[0] == 0:
            raise ValueError("the SS stage produced no occupied voxel; nothing for the SLaT stage to refine")
        inp = inputs.to(device)
        with options.network_context(device, "slat"):
            cond = self.condition(**{k: v.to(options.compute_dtype(device)) for k, v in inp.slat_kwargs().items()})
        cond = cond.float()
        x0 = noise if noise is not None else slat_noise(coords.shape[0], self.cfg.slat_flow.in_channels, generator)
        if x0.shape != (coords.shape[0], self.cfg.slat_flow.in_channels):
            raise ValueError(f"SLaT noise shape {tuple(x0.shape)} != ({coords.shape[0]}, {self.cfg.slat_flow.in_channels})")
        structures: list[dict] = []
        try:
            net = self.velocity_net(cond, coords, sampler_cfg, options, structures)
            x0 = x0.to(device)
            if build_tables:
                net.build_tables(x0)
        except BaseException:
            for structure in structures:
                release_structure(structure)
            raise
        return SLaTRun(stage=self, sampler_cfg=sampler_cfg, x0=x0, net=net, structures=structures, policy=policy,
                       events=events, coords=coords, ss=ss, state=state, token_scores=token_scores)


class SLaTRun:
    """A prepared SLaT call (:meth:`SLaTStage.prepare`): :meth:`sample` runs its sampler once and releases its
    coordinate structures (and their CUDA graphs) after, errors included; :meth:`release` does that without
    sampling."""

    def __init__(self, *, stage: SLaTStage, sampler_cfg: SamplerConfig, x0: Tensor, net, structures: list[dict],
                 policy: StepPolicy | None, events: EventBus | None, coords: Tensor, ss: SSOutput,
                 state: TransformState, token_scores: Tensor | None) -> None:
        self.stage, self.sampler_cfg, self.x0, self.net = stage, sampler_cfg, x0, net
        self.structures, self.policy, self.events = structures, policy, events
        self.coords, self.ss, self.state, self.token_scores = coords, ss, state, token_scores
        self.done = False

    @torch.no_grad()
    def sample(self) -> SLaTOutput:
        if self.done:
            raise RuntimeError("this prepared SLaT call has run or been released already; prepare another")
        self.done = True
        ss = self.ss
        occupancy = ss.occupancy_logits > 0
        try:
            feats = EulerFlowSampler(self.sampler_cfg, "slat").sample(
                self.x0, self.net, self.policy, self.events,
                extras={"coords": self.coords, "occupancy": occupancy, "occupancy_logits": ss.occupancy_logits,
                        "resolution": ss.resolution, "token_scores": self.token_scores})
        finally:
            self.release()
        slat = feats * self.stage.std + self.stage.mean
        return SLaTOutput(coords=self.coords, feats=feats, slat=slat, resolution=ss.resolution,
                          coords_state=self.state)

    def release(self) -> None:
        """Free the coordinate structures (idempotent); the call cannot be sampled after."""
        self.done = True
        for structure in self.structures:
            release_structure(structure)
        self.structures = []
