"""The SLaT torso compiled with inductor's C++ wrapper (``RunOptions.slat_cpp_wrapper``) or without its run-time checks
(``RunOptions.slat_wrapper_asserts``): refused where they cannot work, asked of torch.compile as inductor options, and
on the CPU the same values as the default wrapper (the same kernels), graph pieces' ends included."""
from __future__ import annotations

import pytest
import torch

from conftest import mini_slat_setup
from fs3d_accel.stages.options import RunOptions

BASE = dict(precision="fp32", batch_cfg=True, cache_cond_kv=True, compile_slat=True)


def test_the_options_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="slat_cpp_wrapper is a bool"):
        RunOptions(slat_cpp_wrapper="yes")
    with pytest.raises(ValueError, match="needs compile_slat=True and compile_backend='inductor'"):
        RunOptions(batch_cfg=True, slat_cpp_wrapper=True)
    with pytest.raises(ValueError, match="needs compile_slat=True and compile_backend='inductor'"):
        RunOptions(**BASE, compile_backend="eager", slat_block_regions=False, slat_cpp_wrapper=True)
    with pytest.raises(ValueError, match="needs slat_block_regions=False"):
        RunOptions(**BASE, slat_cpp_wrapper=True)


def test_compile_kwargs_ask_for_the_cpp_wrapper_as_an_inductor_option():
    opts = RunOptions(**BASE, slat_block_regions=False, slat_cpp_wrapper=True)
    assert opts.compile_kwargs("default") == {"mode": "default"}  # the SS flow never asks for it
    assert opts.compile_kwargs("default", cpp_wrapper=True) == {"options": {"cpp_wrapper": True}}
    with_tuning = RunOptions(**BASE, slat_block_regions=False, slat_cpp_wrapper=True, coordinate_descent=True)
    kw = with_tuning.compile_kwargs("max-autotune-no-cudagraphs", cpp_wrapper=True)
    assert kw["options"]["cpp_wrapper"] is True and kw["options"]["coordinate_descent_tuning"] is True
    assert kw["options"]["max_autotune"] is True and "mode" not in kw


@torch.no_grad()
def test_cpp_wrapper_torso_equals_the_python_wrapper_on_the_cpu(cpu_compile):
    """Both wrappers compile the inlined mini torso with a piece end after every 2 blocks (a custom op the C++ code
    calls through the dispatcher): the same outputs, bit for bit, and the stage keeps them as two compiled torsos."""
    stage, _, _ = mini_slat_setup(())
    flow = stage.flow
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 40, flow.cfg.model_channels, generator=g)
    emb = flow.t_embedder(torch.tensor([500.0, 500.0]))
    cond = torch.randn(2, 24, flow.cfg.cond_channels, generator=g)
    kv = flow.precompute_cond_kv(cond)
    outs = []
    for cpp in (False, True):
        torso = stage.compiled_torso(RunOptions(**BASE, slat_block_regions=False, slat_cpp_wrapper=cpp))
        torch._dynamo.maybe_mark_dynamic(f, 1)
        outs.append(torso(f, emb, None, kv, None, 2))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], flow.dense_torso(f, emb, None, kv, None, 2), rtol=1e-5, atol=1e-5)
    assert sorted(k[-2] for k in stage.__dict__["_compiled_torso"]) == [False, True]


def test_the_options_refuse_dropping_checks_without_an_inductor_torso():
    with pytest.raises(ValueError, match="slat_wrapper_asserts is a bool"):
        RunOptions(slat_wrapper_asserts=0)
    with pytest.raises(ValueError, match="needs compile_slat=True and compile_backend='inductor'"):
        RunOptions(batch_cfg=True, slat_wrapper_asserts=False)
    with pytest.raises(ValueError, match="needs compile_slat=True and compile_backend='inductor'"):
        RunOptions(**BASE, compile_backend="eager", slat_wrapper_asserts=False)


def test_compile_kwargs_turn_the_checks_off_as_inductor_options():
    opts = RunOptions(**BASE, slat_wrapper_asserts=False)
    assert opts.compile_kwargs("default") == {"mode": "default"}  # the SS flow keeps its checks
    off = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
    assert opts.compile_kwargs("default", wrapper_asserts=False) == {"options": off}
    kw = opts.compile_kwargs("default", cpp_wrapper=True, wrapper_asserts=False)
    assert kw == {"options": {"cpp_wrapper": True, **off}}
    # every key is one this torch's inductor knows (torch.compile refuses unknown ones only at the first call)
    import torch._inductor.config as inductor_config
    assert all(hasattr(inductor_config, k) for k in off)


@torch.no_grad()
def test_torso_without_checks_equals_the_default_and_has_none_in_its_code(cpu_compile):
    """The inlined mini torso compiled with and without the
    wrapper's checks: the same outputs bit for bit, two compiled torsos on the stage, and the generated code of the
    second never calls ``assert_size_stride`` (read from its generated module)."""
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.utils import fresh_cache
    stage, _, _ = mini_slat_setup(())
    flow = stage.flow
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2, 40, flow.cfg.model_channels, generator=g)
    emb = flow.t_embedder(torch.tensor([300.0, 300.0]))
    cond = torch.randn(2, 24, flow.cfg.cond_channels, generator=g)
    kv = flow.precompute_cond_kv(cond)
    outs, sources = [], []
    for asserts in (True, False):
        with fresh_cache():  # a compilation of its own, not a hit of an earlier test's: its code is loaded here
            before = set(PyCodeCache.modules)
            torso = stage.compiled_torso(RunOptions(**BASE, slat_block_regions=False, slat_wrapper_asserts=asserts))
            torch._dynamo.maybe_mark_dynamic(f, 1)
            outs.append(torso(f, emb, None, kv, None, 2))
            sources.append("".join(open(m.__file__).read() for m in set(PyCodeCache.modules) - before))
    assert torch.equal(outs[0], outs[1])
    assert "assert_size_stride(" in sources[0] and "assert_size_stride(" not in sources[1]
    assert sorted(k[-1] for k in stage.__dict__["_compiled_torso"]) == [False, True]
