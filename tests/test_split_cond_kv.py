"""The condition rows' K/V projected once per call and shared by the call's K/V sets (``RunOptions.split_cond_kv``).

On the CPU the two GEMMs on ``to_kv``'s weight halves give the bits of ``to_kv`` over the whole weight, so the sets
must equal the lean path's (and so the default path's) bit for bit, in the same form, each set's tensors in their own
storage; the pair's set and the batch-1 set share the conditional row's tensors; the sampler's latents stay the same.
"""
from __future__ import annotations

import pytest
import torch

from conftest import KV_ZERO_ROWS, assert_same_kv_sets, sample_slat
from fs3d_accel.stages.cond_kv import lean_slat_cond_kv, project_cond_rows, split_slat_cond_kv
from fs3d_accel.stages.options import RunOptions


def _rows(flow, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 24, flow.cfg.cond_channels, generator=g).to(dtype)


def _batch(cond_rows, zero_rows):
    """The batch a K/V set is made for: the condition's rows in order at the non-zero places, zeros elsewhere."""
    out = torch.zeros(len(zero_rows), *cond_rows.shape[1:], dtype=cond_rows.dtype)
    out[~torch.tensor(zero_rows)] = cond_rows[:sum(not z for z in zero_rows)]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_rows", KV_ZERO_ROWS)
@torch.no_grad()
def test_the_same_sets_as_the_lean_path(kv_slat_setup, zero_rows, dtype):
    stage, _, _ = kv_slat_setup
    flow = stage.flow.to(dtype)
    try:
        n_cond = max(1, sum(not z for z in zero_rows))
        cond = _rows(flow, n_cond, dtype)
        rows = project_cond_rows(flow.blocks, cond)
        assert len(rows) == len(flow.blocks) and all(len(r) == n_cond for r in rows)
        out = split_slat_cond_kv({}, flow.blocks, rows, zero_rows)
        ref = lean_slat_cond_kv({}, flow.blocks, _batch(cond, zero_rows), zero_rows)
        assert_same_kv_sets(out, ref, len(flow.blocks))
    finally:
        stage.flow.float()


@torch.no_grad()
def test_the_sets_of_one_call_share_the_rows(kv_slat_setup):
    stage, _, _ = kv_slat_setup
    flow = stage.flow
    rows = project_cond_rows(flow.blocks, _rows(flow, 1, torch.float32))
    store: dict = {}
    pair = split_slat_cond_kv(store, flow.blocks, rows, [False, True])
    single = split_slat_cond_kv(store, flow.blocks, rows, [False])
    for p, s, ((k, v),) in zip(pair, single, rows):
        assert p[0] is k and p[1] is v and s[0] is k and s[1] is v
    assert len(store) == 1  # the zero row's key and value, made once


def test_bad_inputs_are_refused(kv_slat_setup):
    stage, _, _ = kv_slat_setup
    flow = stage.flow
    rows = project_cond_rows(flow.blocks, _rows(flow, 1, torch.float32))
    with pytest.raises(ValueError, match="rows_kv holds 1 condition rows per block, zero_rows names 2 non-zero rows"):
        split_slat_cond_kv({}, flow.blocks, rows, [False, False, True])
    with pytest.raises(ValueError, match="zero_rows names no batch row"):
        split_slat_cond_kv({}, flow.blocks, rows, [])
    with pytest.raises(ValueError, match=f"rows_kv has {len(rows) - 1} blocks, the flow has {len(rows)}"):
        split_slat_cond_kv({}, flow.blocks, rows[:-1], [False, True])
    with pytest.raises(ValueError, match=r"cond must be \(B, L, C\)"):
        project_cond_rows(flow.blocks, torch.zeros(24, flow.cfg.cond_channels))
    with pytest.raises(ValueError, match="split_cond_kv is a bool"):
        RunOptions(split_cond_kv=1)
    with pytest.raises(ValueError, match="split_cond_kv refines the lean condition K/V: it needs lean_cond_kv=True"):
        RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True, compile_slat=True,
                   split_cond_kv=True)


def test_stage_gives_the_same_latents_as_the_lean_path(kv_slat_setup, cpu_compile, monkeypatch):
    """The whole SLaT sampler with the compiled torso (eager backend), CFG batched, through the whole-pass graph calls
    (eager on the CPU): bit-identical latents with the split K/V, which projects the condition once per call."""
    import fs3d_accel.stages.options as options_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stage, objects, sampler = kv_slat_setup
    common = dict(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True, compile_slat=True,
                  compile_backend="eager", cuda_graphs=True, lean_cond_kv=True)
    projected = []
    real = project_cond_rows
    monkeypatch.setattr("fs3d_accel.stages.slat.project_cond_rows",
                        lambda *a, **k: projected.append(a[1].shape) or real(*a, **k))
    saved = stage.__dict__.pop("_compiled_torso", None)
    try:
        for cond, coords, noise in objects:
            ref = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common))
            out = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common, split_cond_kv=True))
            assert torch.equal(out, ref)
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        if saved is not None:
            stage.__dict__["_compiled_torso"] = saved
    assert len(projected) == len(objects)  # once per call, for every K/V set of it
