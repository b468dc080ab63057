"""The SLaT flow's timestep embedding and IO res-blocks' scale and shift computed once per step and kept
(``RunOptions.cache_io_modulations``): the same ops on the same shapes, so every output must be bit-identical to
computing them inside each pass; the kept values must be used (wrong ones change the latents) and follow the weights."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_kept_values_follow_weight, mini_slat_setup, random_slat_inputs, sample_slat
from fs3d_accel.model.slat_flow import SLaTFlowModel
from fs3d_accel.stages.options import RunOptions


@pytest.fixture(scope="module")
def slat_setup():
    stage, objects, sampler = mini_slat_setup((240, 160), steps=5)
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled_torso", None)
    stage.clear_block_modulations()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_flow_with_io_modulations_computed_ahead_is_bit_identical(batch, dtype):
    cfg, coords, feats, cond = random_slat_inputs(batch=batch)
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    with torch.no_grad():  # the IO blocks' second convs start at zero: give them weights, so their modulation counts
        for blk in flow.io_blocks:
            blk.conv2.conv.weight.normal_(0, 0.05)
    flow = flow.to(dtype)
    feats, cond = feats.to(dtype), cond.to(dtype)
    t = torch.full((batch,), 640.0)
    io = flow.io_modulations(t)
    widths = flow.io_modulation_widths()
    assert io.shape == (batch * sum(widths),) and widths[0] == cfg.model_channels and len(widths) == 1 + 4
    emb, parts = flow.unpack_io_modulations(io, batch, feats.device)
    assert emb.is_contiguous() and all(p.is_contiguous() for p in parts)
    assert torch.equal(emb, flow.t_embedder(t))
    kv = flow.precompute_cond_kv(cond)
    mods = flow.block_modulations(t)
    for torso in (None, flow.dense_torso):
        ref = flow(feats, coords, t, cond, torso=torso)
        assert torch.equal(flow(feats, coords, t, cond, torso=torso, io_mods=io), ref)
        assert torch.equal(flow(feats, coords, t, None, cond_kv=kv, torso=torso, block_mods=mods, io_mods=io), ref)
    # the values really are used: another step's give other velocities, and so do other IO-block parts alone
    other = flow.io_modulations(t * 0 + 100.0)
    assert not torch.equal(flow(feats, coords, t, cond, io_mods=other), flow(feats, coords, t, cond))
    io_only = io.clone()
    io_only[batch * widths[0]:] = other[batch * widths[0]:]  # the embedding kept, the IO blocks' parts another step's
    assert not torch.equal(flow(feats, coords, t, cond, io_mods=io_only), flow(feats, coords, t, cond))


@torch.no_grad()
def test_flow_refuses_io_modulations_of_the_wrong_form():
    cfg, coords, feats, cond = random_slat_inputs(batch=1)
    flow = SLaTFlowModel(cfg).eval()
    t = torch.tensor([500.0])
    two = flow.io_modulations(torch.full((2,), 500.0))
    with pytest.raises(ValueError, match="io_mods must be io_modulations of 1 rows"):
        flow(feats, coords, t, cond, io_mods=two)
    with pytest.raises(ValueError, match="io_mods must be io_modulations of 1 rows"):
        flow(feats, coords, t, cond, io_mods=two[: two.numel() // 2].view(1, -1))
    with pytest.raises(ValueError, match="io_mods must be torch.float32 on cpu"):
        flow(feats, coords, t, cond, io_mods=flow.io_modulations(t).double())
    flow.out_blocks[0].emb_layers[1].to(torch.bfloat16)  # a flow not converted as a whole
    with pytest.raises(ValueError, match="convert the flow as a whole"):
        flow.io_modulations(t)


@pytest.mark.parametrize("with_block_mods", [False, True])
def test_stage_keeps_io_modulations_and_gives_the_same_latents(slat_setup, monkeypatch, with_block_mods):
    """Two objects through the whole SLaT sampler (CFG batched): bit-identical latents; after the first object, no
    pass runs the timestep embedder any more (every embedding comes from the kept values)."""
    stage, objects, sampler = slat_setup
    stage.clear_block_modulations()
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True, cache_block_modulations=with_block_mods)
    kept = RunOptions(batch_cfg=True, cache_cond_kv=True, cache_block_modulations=with_block_mods,
                      cache_io_modulations=True)
    calls = []
    real = stage.flow.t_embedder.forward
    monkeypatch.setattr(stage.flow.t_embedder, "forward", lambda t: calls.append(t.numel()) or real(t))
    for i, (cond, coords, noise) in enumerate(objects):
        ref = sample_slat(stage, cond, coords, noise, sampler, plain)
        calls.clear()
        out = sample_slat(stage, cond, coords, noise, sampler, kept)
        assert torch.equal(out, ref)
        if i == 1:
            assert calls == [], "a pass ran the timestep embedder although its values were kept"
    stage.clear_block_modulations()


def test_stage_passes_its_kept_io_modulations_into_the_pass(slat_setup, monkeypatch):
    stage, objects, sampler = slat_setup
    cond, coords, noise = objects[1]
    kept = RunOptions(batch_cfg=True, cache_cond_kv=True, cache_io_modulations=True)
    right = sample_slat(stage, cond, coords, noise, sampler, kept)
    real = stage._kept_per_step
    monkeypatch.setattr(stage, "_kept_per_step", lambda kind, t, *rest: real(kind, 0.0, *rest))
    assert not torch.equal(sample_slat(stage, cond, coords, noise, sampler, kept), right)


def test_stage_picks_up_io_weights_changed_in_place(slat_setup):
    stage, objects, sampler = slat_setup
    kept = RunOptions(batch_cfg=True, cache_cond_kv=True, cache_io_modulations=True)
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True)
    # the embedder (a parameter of the kept values; the IO blocks' own modulations act through zero-initialised
    # convolutions in these random weights, so the embedding is what reaches the output here)
    assert_kept_values_follow_weight(stage, objects[0], sampler, kept, plain, stage.flow.t_embedder.mlp[2].weight)


def test_kept_io_modulations_refuse_gradients_and_bad_options(slat_setup):
    stage, _, _ = slat_setup
    with pytest.raises(ValueError, match="cache_io_modulations keeps values computed without gradients"):
        stage.io_modulations(500.0, 1, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="cache_io_modulations is a bool"):
        RunOptions(cache_io_modulations=1)


def test_stage_with_a_compiled_torso_and_graph_calls_gives_the_same_latents(slat_setup, cpu_compile, monkeypatch):
    """The compiled torso (eager backend: the same kernels) with the kept embedding as its input, and the whole-pass
    graph calls (eager on the CPU) passing the kept values as arguments: the same latents, with the lean K/V too."""
    import fs3d_accel.stages.options as options_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stage, objects, sampler = slat_setup
    cond, coords, noise = objects[0]
    common = dict(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True, compile_slat=True,
                  compile_backend="eager", cuda_graphs=True, cache_block_modulations=True)
    saved = stage.__dict__.pop("_compiled_torso", None)
    try:
        ref = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common))
        out = sample_slat(stage, cond, coords, noise, sampler,
                          RunOptions(**common, cache_io_modulations=True, lean_cond_kv=True))
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        if saved is not None:
            stage.__dict__["_compiled_torso"] = saved
    assert torch.equal(out, ref)
