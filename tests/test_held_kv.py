"""Cached condition K/V at stable addresses for compiled flows under CUDA graphs (``RunOptions.held_region_inputs``).

inductor's CUDA graphs re-record a compiled flow whenever a static input (the cached K/V are marked static) has moved;
a fresh K/V per object moved them every time. Under the compile modes that capture graphs, the stages therefore copy
each object's K/V into buffers they keep. These tests check the buffers are reused exactly when they can be, that
nothing changes for the other modes, that two SS objects sampled through the held buffers give the uncompiled
results bit for bit (debug dynamo backend on the CPU, with the graph-capturing mode's flag forced on), and that SLaT,
which records a graph per object size anyway, keeps its K/V per call.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import mini_ss_setup
from fs3d_accel.model.configs import mini_config
from fs3d_accel.model.sparse import release_structure
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.slat import SLaTStage, slat_noise

GRAPHS = RunOptions(compile_mode="reduce-overhead")


def _kv(seed: int, rows: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(1, rows, 2, 4, generator=g, dtype=dtype), torch.randn(1, rows, 2, 4, generator=g, dtype=dtype)),)


def _ptrs(tree) -> list[int]:
    return [t.data_ptr() for pair in tree for t in pair]


def test_same_kind_of_tree_is_copied_into_the_held_buffers():
    held: dict = {}
    first = GRAPHS.held_region_inputs(_kv(0), held, "both")
    second_src = _kv(1)
    second = GRAPHS.held_region_inputs(second_src, held, "both")
    assert _ptrs(second) == _ptrs(first)  # same buffers ...
    for (k, v), (k0, v0) in zip(second, second_src):  # ... now holding the new values
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert {t._dynamo_static_input_type for pair in second for t in pair} == {"unguarded"}
    assert set(held) == {"both"}


@pytest.mark.parametrize("other", [
    lambda: _kv(1, rows=6),                     # another key count
    lambda: _kv(1, dtype=torch.float64),        # another dtype
    lambda: _kv(1) + _kv(2),                    # another structure
])
def test_another_kind_of_tree_gets_new_buffers(other):
    held: dict = {}
    first = GRAPHS.held_region_inputs(_kv(0), held, "both")
    src = other()
    out = GRAPHS.held_region_inputs(src, held, "both")
    assert not set(_ptrs(out)) & set(_ptrs(first))
    for (k, v), (k0, v0) in zip(out, src):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert held["both"][1][0] is out[0][0]  # the new buffers are the ones held from now on


def test_names_hold_separate_buffers():
    held: dict = {}
    a = GRAPHS.held_region_inputs(_kv(0), held, "cond")
    b = GRAPHS.held_region_inputs(_kv(1), held, "uncond")
    assert not set(_ptrs(a)) & set(_ptrs(b))
    assert torch.equal(a[0][0], _kv(0)[0][0])  # "uncond" did not overwrite "cond"


@pytest.mark.parametrize("options, compiled", [
    (RunOptions(), True),                                      # default mode: no CUDA graphs
    (RunOptions(compile_mode="max-autotune-no-cudagraphs"), True),
    (RunOptions(compile_mode="reduce-overhead"), False),      # not compiled: the K/V go in as they are
])
def test_prepare_cond_kv_holds_nothing_without_cuda_graphs(options, compiled):
    held: dict = {}
    kv = _kv(0)
    out = options.prepare_cond_kv(kv, [False], compiled, held, "cond")
    assert held == {}
    if compiled:  # independent copies, as before
        assert not set(_ptrs(out)) & set(_ptrs(kv))
    else:
        assert out is kv


@pytest.fixture
def graphs_flag(monkeypatch, cpu_compile):
    """Debug dynamo backend on the CPU, with the stages told the compile mode captures CUDA graphs (the only way the
    held path runs without a GPU)."""
    monkeypatch.setattr(RunOptions, "compile_uses_cuda_graphs", property(lambda self: True))


@torch.no_grad()
@pytest.mark.parametrize("collapse", [False, True])
def test_ss_objects_through_held_kv_equal_uncompiled(graphs_flag, collapse):
    stage, objects, sampler = mini_ss_setup()
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=collapse)
    held = dataclasses.replace(plain, compile_ss=True, compile_backend="eager")
    seen = []
    for cond, noise in objects:
        ref = EulerFlowSampler(sampler, "ss").sample(dict(noise), stage.velocity_net(cond, sampler, plain))
        out = EulerFlowSampler(sampler, "ss").sample(dict(noise), stage.velocity_net(cond, sampler, held))
        for k in ref:
            assert torch.equal(out[k], ref[k]), k
        seen.append([t.data_ptr() for t in stage._held_kv["both"][1]])
    assert seen[0] == seen[1]  # the second object's K/V went into the first one's buffers
    stage.__dict__.pop("_compiled", None)


@torch.no_grad()
def test_slat_holds_no_kv(graphs_flag):
    """SLaT records one CUDA graph per token count, so a new object records anyway; held K/V would only let repeats
    of one object (what the benchmarks time) replay where a real object records. Its K/V stay per call."""
    cfg = mini_config()
    torch.manual_seed(0)
    stage = SLaTStage(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    n, r = 120, cfg.slat_flow.resolution
    idx = torch.randperm(r ** 3, generator=gen)[:n].sort().values
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.long),
                        torch.stack([idx // (r * r), (idx // r) % r, idx % r], 1)], 1).int()
    cond = torch.randn(1, 24, cfg.slat_flow.cond_channels, generator=gen)
    options = RunOptions(batch_cfg=True, cache_cond_kv=True, compile_slat=True, compile_backend="eager")
    sampler = dataclasses.replace(cfg.slat_sampler, steps=2)
    structures: list[dict] = []
    try:
        net = stage.velocity_net(cond, coords, sampler, options, structures)
        EulerFlowSampler(sampler, "slat").sample(slat_noise(n, cfg.slat_flow.in_channels, gen), net,
                                                 extras={"coords": coords})
    finally:
        for s in structures:
            release_structure(s)
    assert "_held_kv" not in stage.__dict__
    stage.__dict__.pop("_compiled_torso", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor's CUDA graphs)")
@torch.no_grad()
def test_compiled_ss_under_cuda_graphs_records_nothing_for_a_second_object():
    """The regression itself, on a GPU: under reduce-overhead the first object records the SS flow's graphs, the
    second (new condition, new noise, so a new K/V) only replays them, and its latents match an eager run's to within
    the rounding of compiled bf16 kernels."""
    import torch._dynamo

    from fs3d_analysis.profile.latency import cuda_graph_recordings
    stage, objects, sampler = mini_ss_setup()
    stage = stage.to("cuda", torch.bfloat16)
    options = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True,
                         compile_ss=True, compile_mode="reduce-overhead")
    torch._dynamo.reset()
    try:
        outs, recorded = [], []
        for cond, noise in objects:
            before = cuda_graph_recordings(torch.device("cuda"))
            net = stage.velocity_net(cond.cuda(), sampler, options)
            outs.append(EulerFlowSampler(sampler, "ss").sample({k: v.cuda() for k, v in noise.items()}, net))
            recorded.append(cuda_graph_recordings(torch.device("cuda")) - before)
        assert recorded[0] >= 1 and recorded[1] == 0, recorded
        eager = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True)
        cond, noise = objects[1]
        ref = EulerFlowSampler(sampler, "ss").sample({k: v.cuda() for k, v in noise.items()},
                                                    stage.velocity_net(cond.cuda(), sampler, eager))
        for k in ref:  # compiled bf16 kernels round differently over 25 steps: a relative bound, not bits
            rel = float((outs[1][k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp_min(1e-6))
            assert rel < 0.05, (k, rel)
    finally:
        stage.__dict__.pop("_compiled", None)
        torch._dynamo.reset()
