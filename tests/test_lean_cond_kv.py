"""The SLaT torso's cached condition K/V made with fewer host operations (``RunOptions.lean_cond_kv``).

It must hand the compiled torso the very tensors the default path makes (``precompute_cond_kv`` then
``prepare_cond_kv``): equal bit for bit, in the same form, each an independent contiguous tensor; the zero rows' one
key and value are the ``to_kv`` bias, kept across calls and remade when the weights change.
"""
from __future__ import annotations

import pytest
import torch

from conftest import KV_ZERO_ROWS, assert_same_kv_sets, sample_slat
from fs3d_accel.stages.cond_kv import lean_slat_cond_kv
from fs3d_accel.stages.options import RunOptions


def _default(flow, cond, zero_rows, compiled=True):
    return RunOptions(cache_cond_kv=True, collapse_zero_cond=True).prepare_cond_kv(
        flow.precompute_cond_kv(cond), zero_rows, compiled)


def _condition(flow, zero_rows, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(len(zero_rows), 24, flow.cfg.cond_channels, generator=g).to(dtype)
    cond[torch.tensor(zero_rows)] = 0  # the unconditional rows: an all-zero condition
    return cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_rows", KV_ZERO_ROWS)
@torch.no_grad()
def test_the_same_tensors_as_the_default_path(kv_slat_setup, zero_rows, dtype):
    stage, _, _ = kv_slat_setup
    flow = stage.flow.to(dtype)
    try:
        cond = _condition(flow, zero_rows, dtype)
        ref = _default(flow, cond, zero_rows)
        out = lean_slat_cond_kv({}, flow.blocks, cond, zero_rows)
        assert_same_kv_sets(out, ref, len(flow.blocks))
    finally:
        stage.flow.float()


@torch.no_grad()
def test_zero_rows_are_kept_across_calls_and_remade_when_weights_change(kv_slat_setup):
    stage, _, _ = kv_slat_setup
    flow = stage.flow
    store: dict = {}
    rows = [False, True]
    cond = _condition(flow, rows, torch.float32)
    first = lean_slat_cond_kv(store, flow.blocks, cond, rows)
    again = lean_slat_cond_kv(store, flow.blocks, _condition(flow, rows, torch.float32, seed=1), rows)
    assert again[0][2] is first[0][2] and again[-1][3] is first[-1][3]  # the zero row's key and value, kept
    assert again[0][0] is not first[0][0]  # the conditional rows are the object's own
    bias = flow.blocks[0].cross_attn.to_kv.bias
    saved = bias.detach().clone()
    try:
        bias.add_(1.0)  # in place, as load_state_dict writes
        changed = lean_slat_cond_kv(store, flow.blocks, cond, rows)
        assert not torch.equal(changed[0][2], first[0][2])
        for got, want in zip(changed, _default(flow, cond, rows)):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        bias.copy_(saved)


def test_bad_inputs_are_refused(kv_slat_setup):
    stage, _, _ = kv_slat_setup
    cond = _condition(stage.flow, [False, True], torch.float32)
    with pytest.raises(ValueError, match="zero_rows has 1 entries, the condition batch is 2"):
        lean_slat_cond_kv({}, stage.flow.blocks, cond, [True])
    with pytest.raises(ValueError, match="lean_cond_kv is a bool"):
        RunOptions(lean_cond_kv="yes")
    with pytest.raises(ValueError, match="needs collapse_zero_cond=True and compile_slat=True"):
        RunOptions(batch_cfg=True, cache_cond_kv=True, lean_cond_kv=True)
    with pytest.raises(ValueError, match="lean_cond_kv does not apply with slat_token_bucket"):
        RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True, compile_slat=True,
                   slat_token_bucket=0.0625, lean_cond_kv=True)


def test_stage_with_a_compiled_torso_gives_the_same_latents(kv_slat_setup, cpu_compile, monkeypatch):
    """The whole SLaT sampler with the compiled torso (eager backend: the same kernels), CFG batched, through the
    whole-pass graph calls (eager on the CPU): bit-identical latents with the lean K/V, on two objects (the kept zero
    rows reused)."""
    import fs3d_accel.stages.options as options_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stage, objects, sampler = kv_slat_setup
    common = dict(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True, compile_slat=True,
                  compile_backend="eager", cuda_graphs=True)
    calls = []
    real = lean_slat_cond_kv
    monkeypatch.setattr("fs3d_accel.stages.slat.lean_slat_cond_kv",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    saved = stage.__dict__.pop("_compiled_torso", None)
    try:
        for cond, coords, noise in objects:
            ref = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common))
            out = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common, lean_cond_kv=True))
            assert torch.equal(out, ref)
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        if saved is not None:
            stage.__dict__["_compiled_torso"] = saved
    assert [False, True] in calls  # the CFG pair's K/V came from the lean path
    assert len(stage.__dict__["_zero_row_kv"]) == 1


def test_derived_options_are_made_once_and_stay_out_of_equality():
    opts = RunOptions(precision="bf16", compile_slat=True, compile_mode="reduce-overhead", slat_compile_mode="default")
    slat = opts.for_stage("slat")
    assert slat is opts.for_stage("slat") and slat.compile_mode == "default" and slat.slat_compile_mode is None
    assert slat.for_stage("slat") is slat
    made = []
    assert opts.derived("x", lambda: made.append(1) or slat) is opts.derived("x", lambda: made.append(1) or opts)
    assert made == [1]
    twin = RunOptions(precision="bf16", compile_slat=True, compile_mode="reduce-overhead", slat_compile_mode="default")
    assert twin == opts and hash(twin) == hash(opts) and repr(twin) == repr(opts)


def test_time_grid_hands_out_a_fresh_list_of_the_same_values():
    from fs3d_accel.samplers import time_grid
    a = time_grid(25, 3.0)
    a[0] = 99.0  # a caller changing its list changes no later grid
    b = time_grid(25, 3.0)
    assert b[0] == 0.0 and b[-1] == 1.0 and len(b) == 26 and b is not time_grid(25, 3.0)
    ts = torch.linspace(0.0, 1.0, 26, dtype=torch.float64)
    assert b == [float(t) for t in ts / (1 + 2.0 * (1 - ts))]
    for bad in (0, 2.5, True):  # a float is not truncated, a bool is not a count
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            time_grid(bad)
    import numpy as np
    assert time_grid(np.int64(25), 3.0) == b  # NumPy integers are counts too
