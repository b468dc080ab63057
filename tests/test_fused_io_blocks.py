"""The SLaT IO res-blocks' element-wise steps as compiled functions (``RunOptions.fuse_slat_io``,
``slat_flow.use_fused_io_blocks``).

Under inductor each step (fp32 LayerNorm, cast, modulation, SiLU) becomes one fused kernel. On the CPU the debug
backends check the wiring: with "eager" the compiled steps run the very ops of the eager block, so the flow's output is
bit-identical; with "aot_eager" it matches to rounding, without graph breaks and with one graph per step for every
object size. Hooks on the norms and autocast keep the eager ops; the switch is validated and entered for SLaT only.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import mini_slat_setup, sample_slat
from fs3d_accel.model.slat_flow import current_fused_io, use_fused_io_blocks
from fs3d_accel.stages.options import RunOptions


@pytest.fixture(scope="module")
def slat_setup():
    stage, objects, sampler = mini_slat_setup((300, 180))
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled_torso", None)


def _one_pass(stage_or_flow, obj, batch: int):
    """One flow call on the object (batch 1) or on its CFG pair (batch 2)."""
    flow = getattr(stage_or_flow, "flow", stage_or_flow)
    cond, coords, noise = obj
    if batch == 2:
        pair = torch.cat([coords, coords.clone()], 0)
        pair[len(coords):, 0] = 1
        return flow(torch.cat([noise, noise]), pair, torch.tensor([400.0, 400.0]), torch.cat([cond, cond * 0]))
    return flow(noise, coords, torch.tensor([400.0]), cond)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the res-blocks that took the fused steps."""
    from fs3d_accel.model import slat_flow
    calls = []
    real = slat_flow._fused_io_fns
    monkeypatch.setattr(slat_flow, "_fused_io_fns", lambda backend: calls.append(backend) or real(backend))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_backend_is_bit_identical(slat_setup, cpu_compile, fused_calls, batch, dtype):
    """The casts around the fp32 LayerNorm matter in bf16: there too the compiled steps (debug backend) give the eager
    block's bits."""
    import copy
    stage, objects, _ = slat_setup
    flow = copy.deepcopy(stage.flow).to(dtype)
    for cond, coords, noise in objects:
        obj = (cond.to(dtype), coords, noise.to(dtype))
        ref = _one_pass(flow, obj, batch)
        fused_calls.clear()
        with use_fused_io_blocks("eager"):
            assert torch.equal(_one_pass(flow, obj, batch), ref)
        assert len(fused_calls) == len(flow.input_blocks) + len(flow.out_blocks)  # every block fused


@torch.no_grad()
def test_aot_eager_matches_without_graph_breaks_or_per_size_graphs(slat_setup, cpu_compile):
    from torch._dynamo.utils import counters
    stage, objects, _ = slat_setup
    graphs = []
    for obj in objects:  # two sizes, each as one object and as the CFG pair
        for batch in (1, 2):
            ref = _one_pass(stage, obj, batch)
            with use_fused_io_blocks("aot_eager"):
                torch.testing.assert_close(_one_pass(stage, obj, batch), ref, rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    # graphs per channel width and batch form (row index or none), static in both; none more for the second size
    assert 0 < graphs[0] == graphs[1], graphs


@torch.no_grad()
def test_hooks_on_the_norms_global_hooks_and_autocast_keep_the_eager_ops(slat_setup, cpu_compile, fused_calls):
    from torch.nn.modules.module import register_module_forward_hook
    stage, objects, _ = slat_setup
    blocks = len(stage.flow.input_blocks) + len(stage.flow.out_blocks)
    seen = []
    handles = [stage.flow.input_blocks[0].norm1.register_forward_hook(lambda m, a, o: seen.append("norm1")),
               stage.flow.out_blocks[0].norm2.register_forward_pre_hook(lambda m, a: seen.append("norm2"))]
    try:
        with use_fused_io_blocks("eager"):
            _one_pass(stage, objects[0], 1)
    finally:
        for h in handles:
            h.remove()
    assert seen == ["norm1", "norm2"] and len(fused_calls) == blocks - 2  # all but the two hooked blocks
    fused_calls.clear()
    handle = register_module_forward_hook(lambda m, a, o: None)  # global hooks would miss the norms: eager ops
    try:
        with use_fused_io_blocks("eager"):
            _one_pass(stage, objects[0], 1)
    finally:
        handle.remove()
    assert fused_calls == []
    with use_fused_io_blocks("eager"), torch.autocast("cpu", dtype=torch.bfloat16):
        _one_pass(stage, objects[0], 1)
    assert fused_calls == []


@torch.no_grad()
def test_sampler_with_the_option_matches(slat_setup, cpu_compile):
    stage, objects, sampler = slat_setup
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True)
    fused = dataclasses.replace(plain, compile_slat=True, compile_backend="eager", fuse_slat_io=True)
    cond, coords, noise = objects[1]
    assert torch.equal(sample_slat(stage, cond, coords, noise, sampler, fused),
                       sample_slat(stage, cond, coords, noise, sampler,
                                   dataclasses.replace(fused, fuse_slat_io=False)))


def test_option_validated_and_entered_for_slat_only():
    opts = RunOptions(compile_slat=True, compile_backend="aot_eager", fuse_slat_io=True)
    with opts.network_context("cpu", "slat"):
        assert current_fused_io() == "aot_eager"
    for stage in ("ss", "decode"):
        with opts.network_context("cpu", stage):
            assert current_fused_io() is None
    with pytest.raises(ValueError, match="compile_slat is off"):
        RunOptions(fuse_slat_io=True)
    with pytest.raises(ValueError, match="would change nothing; use a weight precision"):
        RunOptions(precision="autocast-bf16", compile_slat=True, fuse_slat_io=True)
    with pytest.raises(ValueError, match="fuse_slat_io is a bool"):
        RunOptions(compile_slat=True, fuse_slat_io=1)
    with pytest.raises(ValueError, match="backend name or None"):
        with use_fused_io_blocks(3):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with use_fused_io_blocks("eager"):
            raise RuntimeError("inside")
    assert current_fused_io() is None
