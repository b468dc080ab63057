"""CUDA-graph replay of flow passes (``RunOptions.cuda_graphs``): options checks, capturability of the
SLaT flow with a persistent structure (no host-synchronising op after the first pass), eager
fallback and unchanged outputs on the CPU; replay equals eager where a GPU is present."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fs3d_accel.stages.options as options_mod
from conftest import (assert_same_ss_slat, assert_same_structure, fast_mini_config, make_scene, random_slat_inputs,
                      run_ss_slat_each, sparsify_occupancy)
from fs3d_accel.model.slat_flow import SLaTFlowModel
from fs3d_accel.model.sparse import persistent_structure, release_structure
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.graphs import GraphedCall
from fs3d_accel.stages.options import RunOptions

#: aten ops that copy a device value to the host (or size an output by data): illegal in a capture
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "masked_select", "equal", "is_nonzero",
                 "_assert_async", "bincount", "histc", "repeat_interleave without output_size"}


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
            name = "repeat_interleave without output_size"  # sizes its output from device data
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_options_reject_graphs_with_autocast_and_off_cuda():
    with pytest.raises(ValueError, match="cuda_graphs needs weights in the compute precision"):
        RunOptions(precision="autocast-bf16", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs is CUDA-only"):
        RunOptions(precision="bf16", cuda_graphs=True).check_device("cpu")


def test_options_reject_whole_pass_graphs_around_inductor_graphs():
    """cuda_graphs captures a SLaT pass; a SLaT compile mode with its own CUDA graphs would record inside that capture."""
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match=f"SLaT's compile mode '{mode}' records its own"):
            RunOptions(precision="bf16", compile_slat=True, compile_mode=mode, cuda_graphs=True)
        with pytest.raises(ValueError, match=f"SLaT's compile mode '{mode}' records its own"):
            RunOptions(precision="bf16", compile_slat=True, slat_compile_mode=mode, cuda_graphs=True)
    # SLaT in the default mode may sit inside the pass's graph while SS keeps inductor's graphs (SS compiled ignores
    # cuda_graphs), and an uncompiled SLaT with SS in reduce-overhead is fine too
    RunOptions(precision="bf16", compile_ss=True, compile_slat=True, compile_mode="reduce-overhead",
               slat_compile_mode="default", cuda_graphs=True)
    RunOptions(precision="bf16", compile_ss=True, compile_mode="reduce-overhead", cuda_graphs=True)
    RunOptions(precision="bf16", cuda_graphs=True).check_device("cuda")  # accepted


@pytest.mark.parametrize("batch", [1, 2])
def test_slat_flow_after_its_first_pass_runs_no_host_sync(batch):
    """What makes a SLaT pass capturable: with the structure built, no op reads device data on the host."""
    cfg, coords, feats, cond = random_slat_inputs(batch=batch)
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    kv = flow.precompute_cond_kv(cond)
    structure = persistent_structure()
    t = torch.full((batch,), 500.0)
    with torch.no_grad():
        with OpLog() as first:
            flow(feats, coords, t, None, cond_kv=kv, structure=structure)
        with OpLog() as second:
            flow(feats * 2, coords, t, None, cond_kv=kv, structure=structure)
    assert HOST_SYNC_OPS & set(first.ops), "the first pass builds the tables (and syncs): the probe must see it"
    assert not HOST_SYNC_OPS & set(second.ops), sorted(HOST_SYNC_OPS & set(second.ops))
    release_structure(structure)


def test_graphed_call_is_eager_on_cpu_and_checks_its_arguments():
    calls = []

    def fn(a, b):
        calls.append(1)
        return {"s": a + b, "p": [a * b]}

    g = GraphedCall(fn)
    a, b = torch.arange(3.0), torch.ones(3)
    for _ in range(3):
        out = g(a, b)
    assert torch.equal(out["s"], a + b) and torch.equal(out["p"][0], a * b)
    assert len(calls) == 3 and g.captures == 0 and g.replays == 0
    with pytest.raises(TypeError, match="must be tensors"):
        g(a, 1.0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warmup must be an int >= 0"):
            GraphedCall(fn, warmup=bad)
    assert torch.equal(GraphedCall(fn, warmup=0)(a, b)["s"], a + b)  # records at the first call on CUDA; eager here
    with pytest.raises(ValueError, match="async_capture records without waiting"):
        GraphedCall(fn, async_capture=True, side_stream_warmup=True)
    ga = GraphedCall(fn, async_capture=True)  # eager on the CPU too
    assert torch.equal(ga(a, b)["s"], a + b) and ga.captures == 0


def test_options_reject_async_capture_without_graphs():
    with pytest.raises(ValueError, match="async_graph_capture changes how cuda_graphs records"):
        RunOptions(precision="bf16", async_graph_capture=True)
    with pytest.raises(ValueError, match="async_graph_capture is a bool"):
        RunOptions(precision="bf16", cuda_graphs=True, async_graph_capture=1)
    RunOptions(precision="bf16", cuda_graphs=True, async_graph_capture=True)  # accepted
    with pytest.raises(ValueError, match="shared_graph_pool gives cuda_graphs' SLaT graphs one memory pool"):
        RunOptions(precision="bf16", shared_graph_pool=True)
    with pytest.raises(ValueError, match="shared_graph_pool is a bool"):
        RunOptions(precision="bf16", cuda_graphs=True, shared_graph_pool="yes")
    for missing in ("cuda_graphs", "async_graph_capture", "batch_cfg"):
        kw = dict(cuda_graphs=True, async_graph_capture=True, batch_cfg=True)
        kw[missing] = False
        if missing == "cuda_graphs":
            kw["async_graph_capture"] = False
        with pytest.raises(ValueError, match="graph_record_first records SLaT's whole-pass graphs"):
            RunOptions(precision="bf16", graph_record_first=True, **kw)
    with pytest.raises(ValueError, match="graph_record_first is a bool"):
        RunOptions(precision="bf16", cuda_graphs=True, async_graph_capture=True, batch_cfg=True, graph_record_first=1)


@pytest.mark.parametrize("async_capture,shared_pool", [(False, False), (True, False), (True, True)])
def test_stages_pass_the_capture_mode_to_their_graphs(monkeypatch, async_capture, shared_pool):
    """SS's and SLaT's graphs record as ``RunOptions.async_graph_capture`` says (and run eagerly on the CPU); with
    ``shared_graph_pool`` every SLaT graph of successive objects gets the stage's one kept pool (never created on the
    CPU), and a call made while another live call holds it gets a pool of its own."""
    from fs3d_accel.stages import graphs as graphs_mod, slat as slat_mod, ss as ss_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    made, pools = [], []

    class Spy(graphs_mod.GraphedCall):
        def __init__(self, fn, **kw):
            made.append(kw.get("async_capture"))
            if "pool" in kw:  # the SLaT stage's graphs
                pools.append(kw["pool"])
            super().__init__(fn, **kw)

    monkeypatch.setattr(ss_mod, "GraphedCall", Spy)
    monkeypatch.setattr(slat_mod, "GraphedCall", Spy)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    img, mask, pm = make_scene(pipe.config.image_size)
    opts = RunOptions(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=async_capture,
                      shared_graph_pool=shared_pool)
    run_ss_slat_each(pipe, pipe.prepare(img, mask, pm), [opts, opts])  # two objects
    assert made and set(made) == {async_capture}
    assert pools
    if not shared_pool:
        assert set(map(id, pools)) == {id(None)}
    else:
        kept = pipe.slat.graph_pool(slat_mod._PoolLease())  # no call holds it now: the kept one
        assert all(p is kept for p in pools) and kept._handles == {}
        holder = slat_mod._PoolLease()
        assert pipe.slat.graph_pool(holder) is kept
        other = pipe.slat.graph_pool(slat_mod._PoolLease())  # while ``holder`` lives: a pool of its own
        assert isinstance(other, graphs_mod.GraphPool) and other is not kept
        del holder
        assert pipe.slat.graph_pool(slat_mod._PoolLease()) is kept


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_stages_with_cuda_graphs_switched_on_give_the_same_output_on_cpu(monkeypatch, batch_cfg):
    """The wiring (graph per condition / per structure) leaves every value unchanged."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=3, slat_steps=3), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    img, mask, pm = make_scene(pipe.config.image_size)
    inputs = pipe.prepare(img, mask, pm)
    assert_same_ss_slat(*run_ss_slat_each(pipe, inputs, [
        RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, cuda_graphs=graphs) for graphs in (False, True)]))


def test_slat_velocity_net_with_graphs_needs_a_structures_list(monkeypatch):
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    cond = torch.zeros(1, 3, pipe.config.slat_flow.cond_channels)
    coords = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="cuda_graphs needs a structures list"):
        pipe.slat.velocity_net(cond, coords, pipe.config.slat_sampler, RunOptions(cuda_graphs=True))


def cuda_slat_flow_inputs():
    """A random mini SLaT flow on the GPU with 500 tokens, its condition K/V and a persistent structure."""
    cfg, coords, feats, cond = random_slat_inputs(n=500)
    flow = SLaTFlowModel(cfg).eval().cuda()
    coords, feats, cond = coords.cuda(), feats.cuda(), cond.cuda()
    return flow, coords, feats, flow.precompute_cond_kv(cond), persistent_structure()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_equals_eager_on_cuda():
    flow, coords, feats, kv, structure = cuda_slat_flow_inputs()
    t = torch.full((1,), 500.0, device="cuda")
    g = GraphedCall(lambda f, tt: flow(f, coords, tt, None, cond_kv=kv, structure=structure))
    from fs3d_analysis.profile.latency import cuda_graph_recordings
    before = cuda_graph_recordings()
    with torch.no_grad():
        eager = [flow(feats * (i + 1), coords, t * (i + 1), None, cond_kv=kv) for i in range(4)]
        graphed = [g(feats * (i + 1), t * (i + 1)) for i in range(4)]
    assert g.captures == 1 and g.replays == 3 and cuda_graph_recordings() == before + 1
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)
    release_structure(structure)



@pytest.mark.parametrize("batch_cfg,schedule", [(False, "guided first"), (True, "guided first"),
                                                (True, "unguided first"), (True, "unguided, guided, unguided")])
def test_async_capture_builds_the_unguided_tables_early_and_changes_no_value(monkeypatch, batch_cfg, schedule):
    """With asynchronous recording, the batched-CFG SLaT run builds the plain (unguided) structure's tables once, at
    its first guided step, by the flow's table build alone (``build_structure``); the unguided passes then use that
    very structure and read no device data on the host (what lets the unguided graph's first call and recording, once
    CFG ends, queue behind the guided replays). No extra network pass runs and every value stays bit-identical. Nothing is built early
    without batched CFG, when no unguided step comes after the guided ones, or when an unguided step before them has
    built the tables already."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    cfg = fast_mini_config(ss_steps=2, slat_steps=3)  # SLaT at t = 0, 1/3, 2/3; CFG on [0, 500]: 2 guided + 1 unguided
    interval = {"guided first": (0.0, 500.0), "unguided first": (300.0, 1000.0),
                "unguided, guided, unguided": (300.0, 500.0)}[schedule]
    cfg = cfg.with_samplers(cfg.ss_sampler, dataclasses.replace(cfg.slat_sampler, cfg_interval=interval))
    pipe = Pipeline.from_config(cfg, seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    img, mask, pm = make_scene(pipe.config.image_size)
    inputs = pipe.prepare(img, mask, pm)
    flow = pipe.slat.flow
    passes, built, syncs = [], [], []  # per pass: (rows, structure); per build: (rows, batch, structure)
    log = OpLog()

    def before(m, args, kwargs):
        passes.append((args[0].shape[0], kwargs.get("structure")))
        log.ops.clear()
        log.__enter__()

    def after(m, args, kwargs, out):
        log.__exit__(None, None, None)
        syncs.append(bool(HOST_SYNC_OPS & set(log.ops)))

    hooks = [flow.register_forward_pre_hook(before, with_kwargs=True),
             flow.register_forward_hook(after, with_kwargs=True)]
    real_build = flow.build_structure
    monkeypatch.setattr(flow, "build_structure", lambda f, c, t, b, s, **kw: (built.append((len(f), b, s)),
                                                                               real_build(f, c, t, b, s, **kw)))
    try:
        plain, early = run_ss_slat_each(pipe, inputs, [
            RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=a)
            for a in (False, True)])
    finally:
        for h in hooks:
            h.remove()
    assert_same_ss_slat(plain, early)
    n = plain[1].feats.shape[0]
    rows = [r for r, _ in passes]
    half = len(passes) // 2
    expected_rows = {"guided first": [2 * n, 2 * n, n], "unguided first": [n, 2 * n, 2 * n],
                     "unguided, guided, unguided": [n, 2 * n, n]}[schedule]
    if not batch_cfg:  # 2 x (cond, uncond) + 1
        assert rows == [n] * 10 and built == []
    elif schedule == "guided first":
        assert rows == expected_rows * 2 and [(r, b) for r, b, _ in built] == [(n, 1)]
        (_, _, tables), = built
        unguided = [i for i in range(half, len(passes)) if rows[i] == n]
        assert unguided and all(passes[i][1] is tables for i in unguided)  # the structure the build filled
        assert not any(syncs[i] for i in unguided)  # ... serves the unguided pass without a host sync
        assert syncs[half]  # while the first guided pass still builds its own tables (the probe sees syncs)
    else:
        assert rows == expected_rows * 2 and built == []


@pytest.mark.parametrize("batch,use_torso", [(1, False), (1, True), (2, True)])
def test_a_structure_built_by_the_io_path_serves_a_pass_without_host_syncs(batch, use_torso):
    """``build_structure`` leaves every table a pass needs (no op of the following pass reads device data on the
    host), and that pass gives the same values as one that builds its own tables. ``use_torso``: the dense torso path
    (what the compiled SLaT runs; here uncompiled), else the sparse block loop."""
    cfg, coords, feats, cond = random_slat_inputs(batch=batch)
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    kv = flow.precompute_cond_kv(cond)
    t = torch.full((batch,), 500.0)
    torso = flow.dense_torso if use_torso else None
    prebuilt = persistent_structure()
    with torch.no_grad():
        with OpLog() as building:
            flow.build_structure(feats, coords, t, batch, prebuilt)
        with OpLog() as passing:
            out = flow(feats * 2, coords, t, None, cond_kv=kv, structure=prebuilt, torso=torso)
        ref = flow(feats * 2, coords, t, None, cond_kv=kv, structure=persistent_structure(), torso=torso)
    assert HOST_SYNC_OPS & set(building.ops), "building the tables syncs: the probe must see it"
    assert not HOST_SYNC_OPS & set(passing.ops), sorted(HOST_SYNC_OPS & set(passing.ops))
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="t has 3 entries"):
        flow.build_structure(feats, coords, torch.ones(3), batch, persistent_structure())
    with pytest.raises(ValueError, match="feats must be"):
        flow.build_structure(feats[:, :1], coords, t, batch, persistent_structure())
    with pytest.raises(ValueError, match="batch must be a positive int"):
        flow.build_structure(feats, coords, t[:1], 0, persistent_structure())
    if batch == 2:  # coords of two elements declared as one
        with pytest.raises(ValueError, match="coords name batch element 1, but batch is 1"):
            flow.build_structure(feats, coords, t[:1], 1, persistent_structure())


def _structure_keys(cache: dict, prefix: tuple = ()) -> set:
    """Every entry of a persistent structure as a key path, following the down-sampling memos into the coarser
    caches."""
    keys = set()
    for key, value in cache.items():
        keys.add(prefix + (key,))
        if isinstance(key, tuple) and key[0] == "downsample":
            keys |= _structure_keys(value[3], prefix + (key,))
    return keys


@pytest.mark.parametrize("impl", ["auto", "implicit", "implicit-flat", "implicit-skip", "implicit-skip-nested",
                                  "gather", "transform", "scatter"])
@pytest.mark.parametrize("batch", [1, 2])
def test_build_structure_builds_the_tables_a_pass_would_and_computes_nothing(monkeypatch, impl, batch):
    """The tables-only ``build_structure`` (session 23) leaves exactly the entries of the build before it (the input
    path run and its values dropped, ``by_pass=True``), equal tensor for tensor, for every conv algorithm's table kind,
    and runs no conv, matmul or norm; a whole pass after it (input path, torso, output path) adds no entry, so nothing
    is left for a recording to build. The Triton kernels are stood in for by zeros (the tables they read are built by
    the conv before it calls them; their values are not what this checks, and the interpreter would take minutes)."""
    from fs3d_accel.model import sparse_conv_triton as sct
    from fs3d_accel.model.sparse import use_conv_impl
    monkeypatch.setattr(sct, "implicit_gemm_subm_conv", lambda f, table, w, b: f.new_zeros(len(f), w.shape[0]))
    monkeypatch.setattr(sct, "implicit_gemm_subm_conv_tiled",
                        lambda f, tiles, w, b, flat_loop: f.new_zeros(len(f), w.shape[0]))
    cfg, coords, feats, cond = random_slat_inputs(batch=batch)
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    t = torch.full((batch,), 500.0)
    built, passed = persistent_structure(), persistent_structure()
    with torch.no_grad(), use_conv_impl(impl):
        with OpLog() as building:
            flow.build_structure(feats, coords, t, batch, built)
        with OpLog() as by_pass:  # the reference: what build_structure did before, the input path run and dropped
            flow.build_structure(feats, coords, t, batch, passed, by_pass=True)
        keys = _structure_keys(built)
        flow(feats, coords, t, cond, structure=built, torso=flow.dense_torso)
    computing = {"addmm", "mm", "bmm", "linear", "native_layer_norm", "convolution"}
    assert not computing & set(building.ops) and computing & set(by_pass.ops)
    assert _structure_keys(built) == keys  # the pass found every table built
    assert_same_structure(built, passed)
    release_structure(built)
    release_structure(passed)
    with pytest.raises(ValueError, match="by_pass is a bool"):
        flow.build_structure(feats, coords, t, batch, persistent_structure(), by_pass="yes")


def test_build_structure_tables_serve_the_fused_io_path():
    """The same with the IO res-blocks' fused element-wise steps (``use_fused_io_blocks``, eager backend): their
    per-row scale and shift read ``batch_idx``, which the tables-only build leaves too."""
    from fs3d_accel.model.slat_flow import use_fused_io_blocks
    cfg, coords, feats, cond = random_slat_inputs(batch=2)
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    t = torch.full((2,), 500.0)
    built = persistent_structure()
    with torch.no_grad(), use_fused_io_blocks("eager"):
        flow.build_structure(feats, coords, t, 2, built)
        keys = _structure_keys(built)
        flow(feats, coords, t, cond, structure=built, torso=flow.dense_torso)
    assert ("batch_idx",) in keys and _structure_keys(built) == keys
    release_structure(built)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_async_capture_records_behind_queued_work_and_replays_like_eager():
    """The recording starts and ends while the GPU still runs ~0.5 s of queued work (a spin kernel; an event recorded
    after it is still pending once the recording returns: no device sync), and replays equal eager."""
    flow, coords, feats, kv, structure = cuda_slat_flow_inputs()
    t = torch.full((1,), 500.0, device="cuda")
    g = GraphedCall(lambda f, tt: flow(f, coords, tt, None, cond_kv=kv, structure=structure), async_capture=True)
    with torch.no_grad():
        eager = [flow(feats * (i + 1), coords, t * (i + 1), None, cond_kv=kv) for i in range(4)]
        graphed, pending_after_recording = [], None
        for i in range(4):
            if i == 1:  # the second call records (warmup=1), then replays
                torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU spinning, whatever the matmul precision
                queued = torch.cuda.Event()
                queued.record()
            graphed.append(g(feats * (i + 1), t * (i + 1)))
            if i == 1:
                pending_after_recording = not queued.query()
    torch.cuda.synchronize()
    assert g.captures == 1 and g.replays == 3
    assert pending_after_recording, "the recording waited for the queued work (a device sync)"
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)
    release_structure(structure)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("illegal", [False, True])
def test_failed_async_recording_is_not_retried_and_leaves_cuda_usable(illegal):
    """A recording that raises (a Python error, or an illegal sync that invalidates the capture) re-raises, is refused
    on the next call instead of being retried, and leaves the stream and the allocator usable for the next graph."""
    x = torch.ones(8, device="cuda")

    def fails(v):
        y = v * 2
        if torch.cuda.is_current_stream_capturing():
            if illegal:
                y.sum().item()  # a device-to-host copy inside a capture: CUDA invalidates the capture
            raise ValueError("boom inside the recording")
        return y

    bad = GraphedCall(fails, async_capture=True)
    assert torch.equal(bad(x), x * 2)  # eager warm-up
    with pytest.raises((ValueError, RuntimeError)) as first:
        bad(x)  # the recording
    assert illegal or "boom inside the recording" in str(first.value)
    with pytest.raises(RuntimeError, match="(?s)failed before .* not retried"):
        bad(x)
    assert not torch.cuda.is_current_stream_capturing()
    again = GraphedCall(lambda v: v + 1, async_capture=True)
    for _ in range(3):
        out = again(x)
    assert torch.equal(out, x + 1) and again.captures == 1 and again.replays == 2
    torch.cuda.empty_cache()
    assert torch.equal(torch.ones(1 << 20, device="cuda").sum().cpu(), torch.tensor(float(1 << 20)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("async_capture", [False, True])
def test_graphs_in_one_pool_replay_like_eager_in_any_order(async_capture):
    """Two graphs share one memory pool (the second recorded after the first, while the first is already replaying):
    their replays, interleaved in either order, equal eager (the pool hands the second recording only the first's
    temporaries, never its static inputs or outputs). The doubling in the second graph is undone exactly. Once both
    are gone, a third graph records into the kept pool without reserving new device memory."""
    from fs3d_accel.stages.graphs import GraphPool
    flow, coords, feats, kv, structure = cuda_slat_flow_inputs()
    pool = GraphPool()
    g1 = GraphedCall(lambda f, tt: flow(f, coords, tt, None, cond_kv=kv, structure=structure),
                     async_capture=async_capture, pool=pool)
    g2 = GraphedCall(lambda f, tt: flow(f, coords, tt, None, cond_kv=kv, structure=structure) * 2,
                     async_capture=async_capture, pool=pool)
    t = torch.full((1,), 500.0, device="cuda")
    with torch.no_grad():
        eager = [flow(feats * (i + 1), coords, t * (i + 1), None, cond_kv=kv) for i in range(6)]
        got = []
        for i in range(6):  # g1, g2, g1, g2, ...: each warmed, recorded, then replayed in alternation
            g = g1 if i % 2 == 0 else g2
            got.append(g(feats * (i + 1), t * (i + 1)) / (1 if g is g1 else 2))
        for i in range(6):
            g = g2 if i % 2 == 0 else g1
            got.append(g(feats * (i + 1), t * (i + 1)) / (1 if g is g1 else 2))
    torch.cuda.synchronize()
    assert g1.captures == 1 and g2.captures == 1
    (e1,), (e2,) = g1._captured.values(), g2._captured.values()
    assert e1.graph.pool() == e2.graph.pool() == pool.handle()  # one pool, not a private one each
    for a, b in zip(eager + eager, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the next "object": the first one's graphs are gone, a new graph of the same size records into the kept pool,
    # reusing its memory (no new device memory reserved), and replays like eager
    del g1, g2, e1, e2
    reserved = torch.cuda.memory_reserved()
    g3 = GraphedCall(lambda f, tt: flow(f, coords, tt, None, cond_kv=kv, structure=structure),
                     async_capture=async_capture, pool=pool)
    with torch.no_grad():
        again = [g3(feats * (i + 1), t * (i + 1)) for i in range(3)]
    torch.cuda.synchronize()
    assert g3.captures == 1 and torch.cuda.memory_reserved() <= reserved
    for a, b in zip(eager, again):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    release_structure(structure)


def spy_slat_graph_warmups(monkeypatch, base: type = GraphedCall) -> list[int]:
    """Patch the SLaT stage's ``GraphedCall`` with a subclass of ``base`` that records each graph's ``warmup``
    (the eager calls before its recording) in the returned list."""
    from fs3d_accel.stages import slat as slat_mod
    warmups: list[int] = []

    class Spy(base):
        def __init__(self, fn, **kw):
            warmups.append(kw.get("warmup", 1))
            super().__init__(fn, **kw)

    monkeypatch.setattr(slat_mod, "GraphedCall", Spy)
    return warmups


def objects_with_flow_hook(pipe, inputs, options: RunOptions, on_pass, seeds=(0, 1)) -> list:
    """(SS, SLaT) outputs of one object per seed under ``options``, with ``on_pass(module, args)`` called before every
    SLaT flow pass (removed afterwards, errors included), the device synchronised at the end."""
    hook = pipe.slat.flow.register_forward_pre_hook(on_pass)
    try:
        outs = [run_ss_slat_each(pipe, inputs, [options], seed=s)[0] for s in seeds]
    finally:
        hook.remove()
    torch.cuda.synchronize()
    return outs


def test_record_first_skips_the_warm_up_pass_from_the_second_object_on(monkeypatch):
    """With ``graph_record_first``, the first object's SLaT graphs are warmed by an eager pass as before (this kind of
    pass has not run in the process); from the second object on, both graphs record at their first call
    (``warmup=0``): the CFG-batched structure's tables are built at the first step by the table build alone, beside the
    unguided ones, and that first pass reads no device data on the host. Every value is unchanged."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    warmups = spy_slat_graph_warmups(monkeypatch)
    cfg = fast_mini_config(ss_steps=2, slat_steps=3)  # SLaT: 2 guided steps, then 1 unguided
    pipe = Pipeline.from_config(cfg, seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    img, mask, pm = make_scene(pipe.config.image_size)
    inputs = pipe.prepare(img, mask, pm)
    flow = pipe.slat.flow
    built, syncs, rows = [], [], []
    log = OpLog()

    def before(m, args, kwargs):
        rows.append(args[0].shape[0])
        log.ops.clear()
        log.__enter__()

    def after(m, args, kwargs, out):
        log.__exit__(None, None, None)
        syncs.append(bool(HOST_SYNC_OPS & set(log.ops)))

    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    (reference,) = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])  # another kind: does not count as met
    warmups.clear()
    hooks = [flow.register_forward_pre_hook(before, with_kwargs=True),
             flow.register_forward_hook(after, with_kwargs=True)]
    real_build = flow.build_structure
    monkeypatch.setattr(flow, "build_structure", lambda f, c, t, b, st, **kw: (built.append((len(f), b)),
                                                                                real_build(f, c, t, b, st, **kw)))
    try:
        first, second = run_ss_slat_each(pipe, inputs, [RunOptions(**base, graph_record_first=True)] * 2)
    finally:
        for h in hooks:
            h.remove()
    assert_same_ss_slat(reference, first)
    assert_same_ss_slat(reference, second)
    n = first[1].feats.shape[0]
    assert warmups == [1, 1, 0, 0]  # object 1: batch 2 then batch 1, each warmed; object 2: recorded at once
    assert built == [(n, 1), (2 * n, 2), (n, 1)]  # object 2 also builds the batched tables at its first step
    assert rows == [2 * n, 2 * n, n] * 2
    assert syncs[0] and not syncs[3]  # object 2's first guided pass reads nothing on the host: it can be recorded
    assert not syncs[5]  # nor does its first unguided pass


def test_a_failed_first_call_recording_falls_back_to_the_warm_up(monkeypatch):
    """A graph recorded at its first call that fails (here: made to raise, as a JIT compile or a host read inside the
    recording would) warns, runs that step eagerly, records at the next step, and gives the same values; that kind of
    pass is then warmed again on later objects instead of failing on each."""
    from fs3d_accel.stages import graphs as graphs_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    failed = []

    class FailsAtFirstCall(graphs_mod.GraphedCall):
        def __call__(self, *args):
            if self.warmup == 0 and not failed:
                failed.append(args[0].shape[0])
                raise RuntimeError("operation not permitted when stream is capturing")
            return super().__call__(*args)

    warmups = spy_slat_graph_warmups(monkeypatch, FailsAtFirstCall)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=3), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    (reference,) = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])
    warmups.clear()
    rf = RunOptions(**base, graph_record_first=True)
    first, = run_ss_slat_each(pipe, inputs, [rf])
    with pytest.warns(RuntimeWarning, match="recorded at its first call failed .*operation not permitted"):
        second, = run_ss_slat_each(pipe, inputs, [rf])
    third, = run_ss_slat_each(pipe, inputs, [rf])
    for out in (first, second, third):
        assert_same_ss_slat(reference, out)
    n = first[1].feats.shape[0]
    assert failed == [2 * n]  # the batched graph's first-call recording of object 2
    # object 1 warmed; object 2: batched graph at once (fails, replaced by a warmed one), batch-1 graph at once;
    # object 3: the failed kind warmed again, the other still recorded at once
    assert warmups == [1, 1, 0, 1, 0, 1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_record_first_on_cuda_equals_the_warmed_recording(monkeypatch):
    """On a GPU, over objects of two sizes: with ``graph_record_first`` the second object's graphs record at their
    first call (``warmup=0``, with no eager flow pass before them) and give the values of graphs recorded after an
    eager pass, bit for bit; each object makes exactly its two SLaT graphs."""
    warmups = spy_slat_graph_warmups(monkeypatch)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=3), seed=0, device="cuda")
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    warmed = [run_ss_slat_each(pipe, inputs, [RunOptions(**base)], seed=s)[0] for s in (0, 1)]
    sizes = [w[1].feats.shape[0] for w in warmed]
    assert sizes[0] != sizes[1]  # the second object brings a new size
    eager_passes = []
    warmups.clear()
    first = objects_with_flow_hook(pipe, inputs, RunOptions(**base, graph_record_first=True),
                                   lambda m, a: eager_passes.append(torch.cuda.is_current_stream_capturing()))
    for a, b in zip(warmed, first):
        assert_same_ss_slat(a, b)
    assert warmups == [1, 1, 0, 0]
    # object 1: warm-up (batch 2), recording (batch 2), warm-up (batch 1); object 2: the two recordings alone
    assert eager_passes == [False, True, False, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kept_pool_records_again_after_its_graphs_are_destroyed():
    """The sequence that broke a ``torch.cuda.MemPool``-kept pool on torch 2.11 (session 16): a graph recorded into
    the kept pool, destroyed, then a new recording into the same pool, three times over, each replaying like eager."""
    import gc

    from fs3d_accel.stages.graphs import GraphPool
    pool, x = GraphPool(), torch.ones(1 << 16, device="cuda")
    for i in range(3):
        for async_capture in (True, False):
            g = GraphedCall(lambda v, k=i + 2: v * k, async_capture=async_capture, pool=pool)
            outs = [g(x) for _ in range(3)]  # eager warm-up, recording, replay
            torch.cuda.synchronize()
            assert g.captures == 1 and all(torch.equal(o, x * (i + 2)) for o in outs)
            (entry,) = g._captured.values()
            assert entry.graph.pool() == pool.handle()
            del g, entry, outs
            gc.collect()


def test_options_reject_a_bad_slat_graph_warmup():
    base = dict(precision="bf16", cuda_graphs=True)
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="slat_graph_warmup is the number of eager SLaT passes"):
            RunOptions(**base, slat_graph_warmup=bad)
    with pytest.raises(ValueError, match="slat_graph_warmup sets when cuda_graphs' SLaT graphs record"):
        RunOptions(precision="bf16", slat_graph_warmup=3)
    assert RunOptions(**base, slat_graph_warmup=3).slat_graph_warmup == 3
    RunOptions(precision="bf16", slat_graph_warmup=1)  # the default needs no graphs


@pytest.mark.parametrize("warmup", [1, 3])
def test_slat_graph_warmup_sets_the_eager_passes_before_each_recording(monkeypatch, warmup):
    """``slat_graph_warmup`` eager passes run before each SLaT whole-pass graph records (on a GPU: the flow runs
    eagerly that many times per batch size, then once more inside the recording, and never again: the rest are
    replays), and the values equal the default's bit for bit. On the CPU the graphs run eagerly: only their
    ``warmup`` and the values are checked there."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    warmups = spy_slat_graph_warmups(monkeypatch)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=12), seed=0,
                                device="cuda" if on_gpu else "cpu")
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    (reference,) = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])
    passes = []  # (batch rows, inside a recording) of each flow call
    hook = pipe.slat.flow.register_forward_pre_hook(
        lambda m, a: passes.append((a[0].shape[0], on_gpu and torch.cuda.is_current_stream_capturing())))
    warmups.clear()
    try:
        (warmed,) = run_ss_slat_each(pipe, inputs, [RunOptions(**base, slat_graph_warmup=warmup)])
    finally:
        hook.remove()
    assert_same_ss_slat(reference, warmed)
    assert warmups == [warmup, warmup]  # the CFG-batched graph and the unguided one
    if on_gpu:
        n = warmed[1].feats.shape[0]
        for rows in (2 * n, n):
            calls = [capturing for r, capturing in passes if r == rows]
            assert calls == [False] * warmup + [True], (rows, calls)  # enough steps of each kind to record


def test_options_reject_a_bad_unguided_graph_ahead():
    base = dict(precision="bf16", cuda_graphs=True, async_graph_capture=True, batch_cfg=True)
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="unguided_graph_ahead is the guided step"):
            RunOptions(**base, graph_record_first=True, unguided_graph_ahead=bad)
    with pytest.raises(ValueError, match="unguided_graph_ahead records SLaT's batch-1 graph before its first call"):
        RunOptions(**base, unguided_graph_ahead=3)
    assert RunOptions(**base, graph_record_first=True, unguided_graph_ahead=3).unguided_graph_ahead == 3


def _spy_prepares(monkeypatch, flow_calls: list) -> tuple[list[int], list]:
    """Patch the SLaT stage's ``GraphedCall`` so that each ``prepare`` appends how many flow passes had run by then
    (first list), and every call of any instance appends (instance, signature, prepared by this instance?) (second)."""
    from fs3d_accel.stages import slat as slat_mod
    prepared: list[int] = []
    calls: list = []

    class Spy(GraphedCall):
        def prepare(self, *args):
            prepared.append(len(flow_calls))
            self.prepared_signature = self.signature(args)
            return super().prepare(*args)

        def __call__(self, *args):
            calls.append((self, self.signature(args), getattr(self, "prepared_signature", None)))
            return super().__call__(*args)

    monkeypatch.setattr(slat_mod, "GraphedCall", Spy)
    return prepared, calls


def test_unguided_graph_recorded_ahead_changes_no_value(monkeypatch):
    """``unguided_graph_ahead=3``: from the second object on, the batch-1 graph of the steps after CFG is recorded right
    after the third guided step (by ``GraphedCall.prepare``), not at the first unguided step; the first object, whose
    batch-1 pass has not run in the process yet, is warmed as before. Every value equals ``graph_record_first``
    alone. On the CPU ``prepare`` records nothing (the graphs run eagerly)."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    flow_calls: list = []
    prepared, graphed_calls = _spy_prepares(monkeypatch, flow_calls)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=12), seed=0)  # 7 guided, then 5 unguided
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True, graph_record_first=True)
    reference = run_ss_slat_each(pipe, inputs, [RunOptions(**base)] * 2)
    hook = pipe.slat.flow.register_forward_pre_hook(lambda m, a: flow_calls.append(a[0].shape[0]))
    graphed_calls.clear()
    try:
        ahead = run_ss_slat_each(pipe, inputs, [RunOptions(**base, unguided_graph_ahead=3)] * 2)
    finally:
        hook.remove()
    for a, b in zip(reference, ahead):
        assert_same_ss_slat(a, b)
    n = ahead[0][1].feats.shape[0]
    per_object = len(flow_calls) // 2
    # object 1 met the batch-1 kind under other options (another repr): warmed, nothing prepared. Object 2: prepared
    # once, after its third guided pass (plus the build_structure passes, which are not flow forward calls)
    assert prepared == [per_object + 3], (prepared, flow_calls)
    assert flow_calls[per_object:per_object + 3] == [2 * n] * 3
    # object 2's batch-1 steps (5 after CFG) are all served by the instance prepare made, at the signature it recorded
    batch1 = [(g, sig, prep) for g, sig, prep in graphed_calls if sig[0][0][0] == n and sig[1][0] == (1,)]
    assert len(batch1) == 10  # 5 per object
    served = batch1[5:]
    assert len({id(g) for g, _, _ in served}) == 1 and all(prep == sig for _, sig, prep in served)
    assert all(prep is None for _, _, prep in batch1[:5])  # object 1: warmed as before, nothing prepared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unguided_graph_recorded_ahead_on_cuda_replays_at_its_first_step(monkeypatch):
    """On a GPU, over objects of two sizes: with ``unguided_graph_ahead`` the second object's batch-1 graph records
    inside the guided steps, and the first unguided step only replays (no flow pass after that recording), bit for bit
    the values of ``graph_record_first`` alone."""
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=12), seed=0, device="cuda")
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True, graph_record_first=True)
    plain = [run_ss_slat_each(pipe, inputs, [RunOptions(**base)], seed=s)[0] for s in (0, 1)]
    assert plain[0][1].feats.shape[0] != plain[1][1].feats.shape[0]  # the second object brings a new size
    passes = []
    prepared, _ = _spy_prepares(monkeypatch, passes)
    ahead = objects_with_flow_hook(pipe, inputs, RunOptions(**base, unguided_graph_ahead=2),
                                   lambda m, a: passes.append((a[0].shape[0], torch.cuda.is_current_stream_capturing())))
    for a, b in zip(plain, ahead):
        assert_same_ss_slat(a, b)
    n2 = ahead[1][1].feats.shape[0]
    # the options' repr is new, so object 1 warms both kinds; object 2 records both at once: the batched graph at the
    # first step, the batch-1 graph ahead, and runs no flow pass after that
    second = passes[-2:]
    assert second == [(2 * n2, True), (n2, True)], passes
    assert prepared == [len(passes) - 1]  # the batch-1 recording is the prepared one, after the batched recording


def test_graphed_call_prepare_needs_no_warm_up_and_is_a_no_op_off_cuda():
    a = torch.randn(3, 4)
    g = GraphedCall(lambda x: x * 2, warmup=0)
    assert g.prepare(a) is False and g.captures == 0  # on the CPU calls run eagerly: nothing to record
    assert torch.equal(g(a), a * 2)
    with pytest.raises(ValueError, match="prepare records without an eager warm-up call; this GraphedCall has warmup=1"):
        GraphedCall(lambda x: x * 2).prepare(a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("async_capture", [False, True])
def test_graphed_call_prepare_records_and_the_next_call_replays(async_capture):
    calls = []

    def fn(x):
        calls.append(torch.cuda.is_current_stream_capturing())
        return x * 2 + 1

    a = torch.randn(64, 32, device="cuda")
    g = GraphedCall(fn, warmup=0, async_capture=async_capture)
    assert g.prepare(a) is True and g.captures == 1 and g.replays == 0 and calls == [True]
    assert g.prepare(a) is False  # recorded already
    out = g(a + 1)
    torch.cuda.synchronize()
    assert g.replays == 1 and calls == [True]  # replayed: fn not called again
    torch.testing.assert_close(out, (a + 1) * 2 + 1, rtol=0, atol=0)


def test_unguided_graph_ahead_past_the_guided_steps_warns(monkeypatch):
    """A step past the schedule's guided steps cannot record anything ahead: the option warns instead of doing nothing
    silently, and the values stay those of ``graph_record_first`` alone."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=12), seed=0)  # 7 guided steps
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True, graph_record_first=True)
    (reference,) = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])
    with pytest.warns(RuntimeWarning, match="unguided_graph_ahead=8 is past this schedule's 7 guided steps"):
        (late,) = run_ss_slat_each(pipe, inputs, [RunOptions(**base, unguided_graph_ahead=8)])
    assert_same_ss_slat(reference, late)
    pipe3 = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)  # 2 steps, both guided
    sparsify_occupancy(pipe3, occupied_fraction=0.02)
    inputs3 = pipe3.prepare(*make_scene(pipe3.config.image_size))
    with pytest.warns(RuntimeWarning, match="this schedule guides every step"):
        run_ss_slat_each(pipe3, inputs3, [RunOptions(**base, unguided_graph_ahead=1)])


def test_conv_prepare_refuses_what_forward_refuses_and_builds_nothing_for_1x1x1():
    """``SparseConv3d.prepare`` names an unknown algorithm as ``forward`` does, leaving the cache as it was; a 1x1x1 conv
    reads no table, so it builds none."""
    from fs3d_accel.model.sparse import SparseConv3d, SparseTensor
    cfg, coords, feats, _ = random_slat_inputs(batch=1)
    x = SparseTensor.create(feats[:, :0], coords, batch_size=1)
    before = set(x.cache)
    conv = SparseConv3d(4, 4, 3)
    conv.impl = "bogus"
    with pytest.raises(ValueError, match="SparseConv3d.impl must be one of .* got 'bogus'"):
        conv.prepare(x)
    with pytest.raises(ValueError, match="SparseConv3d.impl must be one of .* got 'bogus'"):
        conv(x.replace(torch.zeros(len(coords), 4)))
    assert set(x.cache) == before
    SparseConv3d(4, 4, 1).prepare(x)
    assert set(x.cache) == before
    conv.impl = "gather"
    conv.prepare(x)
    assert set(x.cache) - before == {("subm_table", 3)}
