"""torch.compile of the SS flow (``RunOptions.compile_ss``), checked on the CPU with debug backends.

Two objects' full 25-step SS sampling (default CFG schedule, so batched CFG switches between batch 2
and batch 1) must compile the flow forward to one graph per batch size: no graph break and no other
recompile (either, times a 24-block model, is what made inductor compile for minutes on the GPU), with
the same latents as the uncompiled run. The SS flow is the mini one with a 4^3 shape grid to keep the test fast; graph
structure does not depend on the grid size.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import COMPILE_CASES, mini_ss_setup
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.ss import SSStage


@pytest.fixture(scope="module")
def ss_setup():
    """A mini SS stage (4^3 shape grid), two objects (condition tokens, noise) and the 25-step sampler."""
    stage, objects, sampler = mini_ss_setup()
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled", None)


@torch.no_grad()
def _sample(stage: SSStage, cond, noise, sampler, options: RunOptions):
    options.check_device("cpu")
    return EulerFlowSampler(sampler, "ss").sample(dict(noise), stage.velocity_net(cond, sampler, options))


@COMPILE_CASES
def test_compiled_ss_one_graph_no_recompile(ss_setup, cpu_compile, backend, batch_cfg, cache_kv, tol):
    stage, objects, sampler = ss_setup
    plain = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=cache_kv)
    opts = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=cache_kv, compile_ss=True, compile_backend=backend)
    for cond, noise in objects:
        ref = _sample(stage, cond, noise, sampler, plain)
        out = _sample(stage, cond, noise, sampler, opts)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=tol, atol=tol, msg=k)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    # 2 objects x 25 steps: compiled once per batch size (the CFG pair, and the unguided batch-1 steps)
    batch_sizes = 2 if batch_cfg else 1
    assert counters["stats"]["unique_graphs"] == batch_sizes, dict(counters["stats"])


def test_compile_backend_validation():
    assert RunOptions(compile_backend="eager").compile_backend == "eager"
    with pytest.raises(ValueError, match="unknown compile_backend 'no-such-backend'"):
        RunOptions(compile_ss=True, compile_backend="no-such-backend")
    with pytest.raises(ValueError, match="unknown compile_mode"):
        RunOptions(compile_ss=True, compile_mode="fastest")
    with pytest.raises(ValueError, match="needs compile_backend='inductor'"):
        RunOptions(compile_ss=True, compile_backend="eager", compile_mode="reduce-overhead")
    # the user-facing device check is unchanged: compile_ss stays CUDA-only
    with pytest.raises(ValueError, match="compile_ss is CUDA-only"):
        RunOptions(compile_ss=True, compile_backend="eager").check_device("cpu")
