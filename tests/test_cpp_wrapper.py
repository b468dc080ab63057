"""The SLaT torso compiled with inductor's C++ wrapper (``RunOptions.slat_cpp_wrapper``) or without its run-time checks
(``RunOptions.slat_wrapper_asserts``): refused where they cannot work, asked of torch.compile as inductor options, and
on the CPU the same values as the default wrapper (the same kernels), graph pieces' ends included."""
from __future__ import annotations

import contextlib

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
    assert opts.compile_kwargs("default", cpp_wrapper=True) == {
        "options": {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}}  # the glue built at -O1
    with_tuning = RunOptions(**BASE, slat_block_regions=False, slat_cpp_wrapper=True, coordinate_descent=True)
    kw = with_tuning.compile_kwargs("max-autotune-no-cudagraphs", cpp_wrapper=True)
    assert kw["options"]["cpp_wrapper"] is True and kw["options"]["coordinate_descent_tuning"] is True
    assert kw["options"]["cpp_wrapper_build_separate"] is True
    assert kw["options"]["max_autotune"] is True and "mode" not in kw


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
    assert kw == {"options": {"cpp_wrapper": True, "cpp_wrapper_build_separate": True, **off}}
    # every key is one this torch's inductor knows (torch.compile refuses unknown ones only at the first call)
    import torch._inductor.config as inductor_config
    assert all(hasattr(inductor_config, k) for k in kw["options"])


@torch.no_grad()
def test_cpp_wrapper_and_unchecked_torsos_equal_the_python_wrapper_on_the_cpu(cpu_compile):
    """The inlined mini torso, a piece end after every 2 blocks (a custom op the C++ code calls through the
    dispatcher), compiled three ways: the default Python wrapper, the C++ wrapper, and the Python wrapper without its
    checks. The same outputs, bit for bit; three compiled torsos on the stage; and the default's generated module calls
    ``assert_size_stride`` where the unchecked one never does (those two compiled with a fresh inductor cache, so that
    their modules are loaded here and not hit from an earlier test)."""
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.utils import fresh_cache
    stage, _, _ = mini_slat_setup(())
    flow = stage.flow
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 40, flow.cfg.model_channels, generator=g)
    emb = flow.t_embedder(torch.tensor([500.0, 500.0]))
    cond = torch.randn(2, 24, flow.cfg.cond_channels, generator=g)
    kv = flow.precompute_cond_kv(cond)
    outs, sources = {}, {}
    for name, extra in (("default", {}), ("cpp", {"slat_cpp_wrapper": True}),
                        ("unchecked", {"slat_wrapper_asserts": False})):
        with fresh_cache() if name != "cpp" else contextlib.nullcontext():
            before = set(PyCodeCache.modules)
            torso = stage.compiled_torso(RunOptions(**BASE, slat_block_regions=False, **extra))
            torch._dynamo.maybe_mark_dynamic(f, 1)
            outs[name] = torso(f, emb, None, kv, None, 2)
            sources[name] = "".join(open(m.__file__).read() for m in set(PyCodeCache.modules) - before)
    assert torch.equal(outs["default"], outs["cpp"]) and torch.equal(outs["default"], outs["unchecked"])
    torch.testing.assert_close(outs["default"], flow.dense_torso(f, emb, None, kv, None, 2), rtol=1e-5, atol=1e-5)
    assert "assert_size_stride(" in sources["default"] and "assert_size_stride(" not in sources["unchecked"]
    assert sorted(k[-2:] for k in stage.__dict__["_compiled_torso"]) == [(False, False), (False, True), (True, True)]
