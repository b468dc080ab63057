"""Cached condition K/V at stable addresses for compiled flows under CUDA graphs (``fs3d_accel.stages.held``).

inductor's CUDA graphs re-record a compiled flow whenever a static input (the cached K/V are marked static) has moved;
a fresh K/V per object moved them every time. Under the compile modes that capture graphs, the SS stage therefore
copies each object's K/V into buffers it keeps. These tests check that the buffers are reused exactly when they can
be (same kind of tree, no other live call reading them), that nothing is held for the other modes, and that objects
sampled through the held buffers give the uncompiled results bit for bit (debug dynamo backend on the CPU, with the
graph-capturing mode's flag forced on), also with two velocity functions alive at once.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import mini_ss_setup
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.stages.held import HeldInputs
from fs3d_accel.stages.options import RunOptions


def _kv(seed: int, rows: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(1, rows, 2, 4, generator=g, dtype=dtype),
             torch.randn(1, rows, 2, 4, generator=g, dtype=dtype)),)


def _ptrs(tree) -> list[int]:
    return [t.data_ptr() for pair in tree for t in pair]


COPIES = RunOptions(compile_mode="reduce-overhead").compiled_region_inputs


def _held(lease, tree, key="both"):
    return lease.inputs(tree, key, COPIES)


def test_same_kind_of_tree_is_copied_into_the_held_buffers():
    store = HeldInputs()
    first_lease = store.lease()
    first = _held(first_lease, _kv(0))
    del first_lease  # that call is over
    second_src = _kv(1)
    second = _held(store.lease(), second_src)
    assert _ptrs(second) == _ptrs(first)  # same buffers ...
    for (k, v), (k0, v0) in zip(second, second_src):  # ... now holding the new values
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert {t._dynamo_static_input_type for pair in second for t in pair} == {"unguarded"}
    assert store.keys() == ["both"]


def test_a_live_lease_keeps_its_buffers():
    """While one call can still read its buffers, another call gets copies of its own and writes nothing there."""
    store = HeldInputs()
    a = store.lease()
    first = _held(a, _kv(0))
    other = _held(store.lease(), _kv(1))
    assert not set(_ptrs(other)) & set(_ptrs(first))
    assert torch.equal(first[0][0], _kv(0)[0][0])  # a's K/V untouched
    assert store.buffers("both")[0] is first[0][0]  # and still the held set


@pytest.mark.parametrize("other", [
    lambda: _kv(1, rows=6),                     # another key count
    lambda: _kv(1, dtype=torch.float64),        # another dtype
    lambda: _kv(1) + _kv(2),                    # another structure
    lambda: tuple((k.to("meta"), v.to("meta")) for k, v in _kv(1)),  # another device
])
def test_another_kind_of_tree_gets_new_buffers(other):
    store = HeldInputs()
    first = _held(store.lease(), _kv(0))
    src = other()
    out = _held(store.lease(), src)
    if src[0][0].device.type != "meta":  # meta tensors have no data to compare or point to
        assert not set(_ptrs(out)) & set(_ptrs(first))
        for (k, v), (k0, v0) in zip(out, src):
            assert torch.equal(k, k0) and torch.equal(v, v0)
    assert store.buffers("both")[0] is out[0][0]  # the new buffers are the ones held from now on


def test_buffers_made_in_inference_mode_are_not_written_outside_it():
    store = HeldInputs()
    with torch.inference_mode():
        first = _held(store.lease(), _kv(0))
    out = _held(store.lease(), _kv(1))  # copy_ into an inference tensor would raise here
    assert out[0][0] is not first[0][0] and torch.equal(out[0][0], _kv(1)[0][0])


def test_names_hold_separate_buffers_and_release_drops_them():
    store = HeldInputs()
    lease = store.lease()
    a = _held(lease, _kv(0), "cond")
    _held(lease, _kv(1), "uncond")
    assert torch.equal(a[0][0], _kv(0)[0][0])  # "uncond" did not overwrite "cond"
    assert store.keys() == ["cond", "uncond"]
    store.release()
    assert store.keys() == []


@pytest.mark.parametrize("options, compiled", [
    (RunOptions(), True),                                      # default mode: no CUDA graphs
    (RunOptions(compile_mode="max-autotune-no-cudagraphs"), True),
    (RunOptions(compile_mode="reduce-overhead"), False),      # not compiled: the K/V go in as they are
])
def test_prepare_cond_kv_holds_nothing_without_cuda_graphs(options, compiled):
    store = HeldInputs()
    kv = _kv(0)
    out = options.prepare_cond_kv(kv, [False], compiled, store.lease(), "cond")
    assert store.keys() == []
    if compiled:  # independent copies, as before
        assert not set(_ptrs(out)) & set(_ptrs(kv))
    else:
        assert out is kv


@pytest.fixture
def graphs_flag(monkeypatch, cpu_compile):
    """Debug dynamo backend on the CPU, with the stages told the compile mode captures CUDA graphs (the only way the
    held path runs without a GPU)."""
    monkeypatch.setattr(RunOptions, "compile_uses_cuda_graphs", property(lambda self: True))


def _sample(stage, cond, noise, sampler, options, net=None):
    net = net or stage.velocity_net(cond, sampler, options)
    return EulerFlowSampler(sampler, "ss").sample(dict(noise), net)


@torch.no_grad()
@pytest.mark.parametrize("collapse", [False, True])
def test_ss_objects_through_held_kv_equal_uncompiled(graphs_flag, collapse):
    stage, objects, sampler = mini_ss_setup()
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=collapse)
    held = dataclasses.replace(plain, compile_ss=True, compile_backend="eager")
    seen = []
    for cond, noise in objects:
        ref = _sample(stage, cond, noise, sampler, plain)
        out = _sample(stage, cond, noise, sampler, held)
        for k in ref:
            assert torch.equal(out[k], ref[k]), k
        seen.append([t.data_ptr() for t in stage.held_inputs().buffers("both") if isinstance(t, torch.Tensor)])
    assert seen[0] == seen[1]  # the second object's K/V went into the first one's buffers
    stage.release_held_inputs()
    assert stage.held_inputs().keys() == []
    stage.__dict__.pop("_compiled", None)


@torch.no_grad()
def test_moving_or_casting_the_stage_releases_the_held_buffers(graphs_flag):
    stage, objects, sampler = mini_ss_setup()
    held = RunOptions(batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_backend="eager")
    cond, noise = objects[0]
    _sample(stage, cond, noise, sampler, held)
    assert stage.held_inputs().keys() != []
    stage.to(torch.float64).to(torch.float32)
    assert stage.held_inputs().keys() == []
    stage.__dict__.pop("_compiled", None)


@torch.no_grad()
def test_two_live_velocity_functions_do_not_share_buffers(graphs_flag):
    """Object A's velocity function stays alive while object B is sampled (as a guided batch keeps its conditional
    and unconditional functions); sampling A again must still see A's condition."""
    stage, objects, sampler = mini_ss_setup()
    held = RunOptions(batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_backend="eager")
    (cond_a, noise_a), (cond_b, noise_b) = objects
    net_a = stage.velocity_net(cond_a, sampler, held)
    first = _sample(stage, cond_a, noise_a, sampler, held, net_a)
    _sample(stage, cond_b, noise_b, sampler, held)
    again = _sample(stage, cond_a, noise_a, sampler, held, net_a)
    for k in first:
        assert torch.equal(again[k], first[k]), k
    stage.__dict__.pop("_compiled", None)


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
