"""With the condition's K/V cached, the SLaT stage hands the flow no condition tensor: the flow reads only the K/V, so
the per-pass cast of the (B, L, C) condition (session 29's CPU op log found it recorded into every pass's graph) is
gone, and the samples are the same."""
from __future__ import annotations

import torch

from conftest import mini_slat_setup, sample_slat
from fs3d_accel.stages.options import RunOptions


def test_the_flow_gets_no_condition_with_cached_kv_and_its_samples_are_unchanged():
    stage, objects, sampler = mini_slat_setup((40,))
    cond, coords, noise = objects[0]
    seen = []
    handle = stage.flow.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args[3], "cond_kv" in kwargs)),
                                                  with_kwargs=True)
    try:
        cached = sample_slat(stage, cond, coords, noise, sampler, RunOptions(batch_cfg=True, cache_cond_kv=True))
        calls = len(seen)
        plain = sample_slat(stage, cond, coords, noise, sampler, RunOptions(batch_cfg=True))
    finally:
        handle.remove()
    assert calls > 0 and all(c is None and has_kv for c, has_kv in seen[:calls])
    # without cached K/V the flow still gets the condition, and computes its K/V itself: the same samples (K/V made
    # once or per pass are the same ops on the same values)
    assert all(c is not None and not has_kv for c, has_kv in seen[calls:]) and len(seen) > calls
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
