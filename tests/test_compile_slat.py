"""torch.compile of the SLaT flow's transformer blocks (``RunOptions.compile_slat``), on the CPU.

The compiled torso runs the blocks densely on (B, L, C) with the token count L marked dynamic. Two
objects of different sizes, each through the full 25-step SLaT sampler with batched CFG (batch 2 on
the guided steps, batch 1 after), must give one graph per batch size, no graph break and no recompile
for the second object, and the same features as the uncompiled run. The dense block math is also
checked directly against the sparse block loop (eager: the very same kernels, so exactly equal).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import COMPILE_CASES, fast_mini_config, mini_slat_setup, sample_slat
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions


@pytest.fixture(scope="module")
def slat_setup():
    """A mini SLaT stage and two objects (condition tokens, coordinates, noise) of different sizes."""
    stage, objects, sampler = mini_slat_setup((300, 180))
    assert sampler.steps == 25 and sampler.cfg_strength > 0
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled_torso", None)


@COMPILE_CASES
def test_compiled_slat_torso_one_graph_per_batch_size(slat_setup, cpu_compile, backend, batch_cfg, cache_kv, tol):
    stage, objects, sampler = slat_setup
    plain = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=cache_kv)
    opts = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=cache_kv, compile_slat=True, compile_backend=backend)
    for cond, coords, noise in objects:
        ref = sample_slat(stage, cond, coords, noise, sampler, plain)
        out = sample_slat(stage, cond, coords, noise, sampler, opts)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    # 2 objects (different token counts) x 25 steps: one graph per batch size, none per object
    assert counters["stats"]["unique_graphs"] == (2 if batch_cfg else 1), dict(counters["stats"])


@torch.no_grad()
def test_dense_torso_equals_sparse_blocks(slat_setup):
    """dense_torso on (B, L, C) gives exactly the sparse block loop's values, for one object and for
    the CFG pair, with the condition tokens or their cached K/V."""
    stage, objects, _ = slat_setup
    flow = stage.flow
    cond, coords, noise = objects[0]
    pair = torch.cat([coords, coords.clone()], 0)
    pair[len(coords):, 0] = 1
    cases = [(noise, coords, torch.tensor([400.0]), cond),
             (torch.cat([noise, noise]), pair, torch.tensor([400.0, 400.0]), torch.cat([cond, cond * 0]))]
    calls = []

    def torso(*args):
        calls.append(args[0].shape)
        return flow.dense_torso(*args)

    for feats, c, t, cnd in cases:
        ref = flow(feats, c, t, cnd)
        assert torch.equal(flow(feats, c, t, cnd, torso=torso), ref)
        kv = flow.precompute_cond_kv(cnd)
        assert torch.equal(flow(feats, c, t, None, cond_kv=kv, torso=torso), ref)
    # the torso really ran, on (B, L, C) with L the coarse token count of each batch element
    assert [s[0] for s in calls] == [1, 1, 2, 2] and len({s[1] for s in calls}) == 1


@torch.no_grad()
def test_torso_falls_back_for_unequal_batch_elements(slat_setup):
    """Batch elements of different token counts cannot be laid out densely: the sparse loop runs
    (the torso is never called) and gives the per-element results."""
    stage, objects, _ = slat_setup
    flow = stage.flow
    (c1, x1, n1), (c2, x2, n2) = objects
    x2 = x2.clone()
    x2[:, 0] = 1
    called = []

    def torso(*args):
        called.append(1)
        return flow.dense_torso(*args)

    out = flow(torch.cat([n1, n2]), torch.cat([x1, x2]), torch.tensor([300.0, 300.0]), torch.cat([c1, c2]),
               torso=torso)
    assert not called
    torch.testing.assert_close(out[:len(n1)], flow(n1, x1, torch.tensor([300.0]), c1), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_compiled_torso_refuses_block_hooks(slat_setup):
    """Hooks on the SLaT blocks would silently never fire inside the compiled torso: refused, and
    the refusal names the hooked module."""
    stage, objects, _ = slat_setup
    flow = stage.flow
    cond, coords, noise = objects[0]
    handle = flow.blocks[3].mlp.register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(ValueError, match=r"blocks\.3\.mlp.*compile_slat off"):
            flow(noise, coords, torch.tensor([100.0]), cond, torso=flow.dense_torso)
        flow(noise, coords, torch.tensor([100.0]), cond)  # the plain loop is fine
    finally:
        handle.remove()
    flow(noise, coords, torch.tensor([100.0]), cond, torso=flow.dense_torso)


def test_block_hook_check_finds_pre_hooks_deep_down_and_skips_empty_children(slat_setup):
    """The torso's hook check walks every module under the blocks (pre-hooks too, a child set to None skipped) and
    names the first hooked one in named_modules order."""
    flow = slat_setup[0].flow
    flow._check_no_block_hooks()  # nothing hooked
    deepest = [name for name, m in flow.blocks.named_modules() if not m._modules][-1]
    module = flow.blocks.get_submodule(deepest)
    flow.blocks[0].register_module("unused", None)
    handles = [module.register_forward_pre_hook(lambda *a: None)]
    try:
        with pytest.raises(ValueError, match=rf"blocks\.{re.escape(deepest)} \(and 0 more\)"):
            flow._check_no_block_hooks()
        handles.append(flow.blocks[1].register_forward_hook(lambda *a: None))
        with pytest.raises(ValueError, match=r"blocks\.1 \(and 1 more\)"):
            flow._check_no_block_hooks()
    finally:
        for h in handles:
            h.remove()
        del flow.blocks[0]._modules["unused"]
    flow._check_no_block_hooks()


def test_compile_slat_is_cuda_only():
    with pytest.raises(ValueError, match="compile_slat is CUDA-only"):
        RunOptions(compile_slat=True).check_device("cpu")
    with pytest.raises(ValueError, match="needs compile_backend='inductor'"):
        RunOptions(compile_slat=True, compile_backend="eager", compile_mode="reduce-overhead")


def test_compiled_region_inputs_are_independent_copies():
    """Cached K/V given to a compiled region: k and v are views of one tensor in the cache, and a nested
    compile region refuses aliasing inputs, so they are copied apart (same values, same structure)."""
    kv = torch.randn(1, 5, 2, 4, 8)
    tree = [(kv[:, :, 0], kv[:, :, 1]), (kv[:, :, 1], kv[:, :, 0])]
    out = RunOptions().compiled_region_inputs(tree)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(p, tuple) for p in out)
    ptrs = {kv.untyped_storage().data_ptr()}
    for (k, v), (k0, v0) in zip(out, tree):
        assert k.is_contiguous() and v.is_contiguous()
        assert torch.equal(k, k0) and torch.equal(v, v0)
        ptrs |= {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    assert len(ptrs) == 5  # the source and four separate copies


@pytest.mark.parametrize("mode, static", [("default", False), ("reduce-overhead", True), ("max-autotune", True),
                                          ("max-autotune-no-cudagraphs", False)])
def test_compiled_region_inputs_are_static_under_cuda_graph_modes(mode, static):
    """The copies are marked static addresses exactly when the compile mode captures CUDA graphs, so replays read
    the cached K/V in place instead of copying them into graph buffers."""
    options = RunOptions(compile_mode=mode)
    assert options.compile_uses_cuda_graphs is static
    out = options.compiled_region_inputs([(torch.zeros(2, 3), torch.ones(2, 3))])
    marks = {getattr(t, "_dynamo_static_input_type", None) for pair in out for t in pair}
    assert marks == ({"unguarded"} if static else {None})


def test_slat_compile_mode_is_checked():
    with pytest.raises(ValueError, match="unknown slat_compile_mode 'fastest'"):
        RunOptions(compile_slat=True, slat_compile_mode="fastest")
    with pytest.raises(ValueError, match="slat_compile_mode 'default' is the mode of compile_slat, which is off"):
        RunOptions(compile_ss=True, compile_mode="reduce-overhead", slat_compile_mode="default")
    with pytest.raises(ValueError, match="slat_compile_mode 'reduce-overhead' needs compile_backend='inductor'"):
        RunOptions(compile_slat=True, compile_backend="eager", slat_compile_mode="reduce-overhead")
    RunOptions(compile_slat=True, compile_backend="eager", slat_compile_mode="default")  # accepted


def test_for_stage_gives_slat_its_own_compile_mode():
    both = RunOptions(compile_ss=True, compile_slat=True, compile_mode="reduce-overhead",
                      slat_compile_mode="max-autotune-no-cudagraphs")
    assert both.for_stage("ss") is both and both.for_stage("decode") is both
    slat = both.for_stage("slat")
    assert slat.compile_mode == "max-autotune-no-cudagraphs" and slat.slat_compile_mode is None
    assert slat.for_stage("slat") is slat  # idempotent: the SLaT stage may apply it at every entry point
    assert both.compile_uses_cuda_graphs and not slat.compile_uses_cuda_graphs
    same = RunOptions(compile_slat=True, compile_mode="reduce-overhead")
    assert same.for_stage("slat") is same  # no slat_compile_mode: compile_mode serves both stages
    with pytest.raises(ValueError, match="stage must be one of"):
        both.for_stage("mesh")


def test_slat_stage_compiles_in_its_own_mode_and_marks_no_static_inputs(slat_setup, monkeypatch):
    """With SS under CUDA graphs and SLaT in the default mode, the SLaT torso is compiled in "default" and its
    cached K/V are plain copies (not static addresses, which only CUDA-graph modes need)."""
    stage, objects, sampler = slat_setup
    modes = []

    def fake_compile(fn, backend=None, mode=None, **kw):
        modes.append(mode)
        return fn  # the eager torso: this test checks the wiring, not inductor

    marked = []
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t, *a, **k: marked.append(t))
    cond, coords, noise = objects[1]
    saved = stage.__dict__.pop("_compiled_torso", None)

    def run(**modes_kw):
        options = RunOptions(batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True, **modes_kw)
        stage.__dict__.pop("_compiled_torso", None)
        modes.clear(), marked.clear()
        with torch.no_grad():
            net = stage.velocity_net(cond, coords, sampler, options, [])
            net(noise, 0.5, None)
        return list(stage.__dict__["_compiled_torso"])

    try:
        assert run(compile_mode="reduce-overhead", slat_compile_mode="default") == [
            ("default", 0, True, False, "inductor", False, "custom-op", False, False, True)]
        assert modes == ["default"] and marked == []
        # the same options without slat_compile_mode: SLaT under CUDA graphs, its K/V marked static
        assert run(compile_mode="reduce-overhead") == [("reduce-overhead", 0, True, False, "inductor", False, "custom-op",
                                                        False, False, True)]
        assert modes == ["reduce-overhead"] and len(marked) > 0
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        if saved is not None:
            stage.__dict__["_compiled_torso"] = saved


def test_coordinate_descent_passes_the_modes_options_plus_the_tuning(monkeypatch):
    """``coordinate_descent``: torch.compile gets the compile mode's inductor options plus the tuning (it takes a mode or
    options, not both), the SLaT torso is cached per setting, and bad settings are refused."""
    from torch._inductor import list_mode_options
    plain = RunOptions(compile_slat=True, compile_mode="reduce-overhead")
    tuned = RunOptions(compile_slat=True, compile_mode="reduce-overhead", coordinate_descent=True)
    assert plain.compile_kwargs("reduce-overhead") == {"mode": "reduce-overhead"}
    assert tuned.compile_kwargs("reduce-overhead") == {
        "options": {**list_mode_options("reduce-overhead"), "coordinate_descent_tuning": True}}
    assert tuned.compile_kwargs("default") == {"options": {"coordinate_descent_tuning": True}}
    assert RunOptions(compile_slat=True, compile_backend="eager").compile_kwargs("default") == {}
    with pytest.raises(ValueError, match="coordinate_descent is a bool"):
        RunOptions(compile_slat=True, coordinate_descent=1)
    with pytest.raises(ValueError, match="needs the inductor backend and compile_ss or compile_slat"):
        RunOptions(coordinate_descent=True)
    with pytest.raises(ValueError, match="needs the inductor backend"):
        RunOptions(compile_slat=True, compile_backend="eager", coordinate_descent=True)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    stage = pipe.slat
    stage.__dict__.pop("_compiled_torso", None)
    try:
        stage.compiled_torso(plain), stage.compiled_torso(tuned), stage.compiled_torso(tuned)
        assert calls == [{"backend": "inductor", "mode": "reduce-overhead"},
                         {"backend": "inductor", **tuned.compile_kwargs("reduce-overhead")}]
        assert sorted(k[5] for k in stage.__dict__["_compiled_torso"]) == [False, True]
        # how FA4 is called gets a compiled torso of its own too (not a recompile of the same function)
        stage.compiled_torso(RunOptions(compile_slat=True, compile_mode="reduce-overhead",
                                        attention_kernel="flash-attn-cute", fa4_call="direct"))
        assert sorted(k[6] for k in stage.__dict__["_compiled_torso"]) == ["custom-op", "custom-op", "direct"]
        calls.clear()
        ss_plain = RunOptions(compile_ss=True, compile_mode="reduce-overhead")
        ss_tuned = RunOptions(compile_ss=True, compile_mode="reduce-overhead", coordinate_descent=True)
        pipe.ss.compiled_flow(ss_plain), pipe.ss.compiled_flow(ss_tuned), pipe.ss.compiled_flow(ss_tuned)
        assert [c.get("mode", c.get("options")) for c in calls] == [
            "reduce-overhead", ss_tuned.compile_kwargs("reduce-overhead")["options"]]
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        pipe.ss.__dict__.pop("_compiled", None)


def test_block_regions_off_inlines_the_blocks_with_the_same_values(slat_setup, cpu_compile, monkeypatch):
    """``slat_block_regions=False``: the compiled torso traces the 24 blocks inline (no nested region in its graph),
    is cached under its own key, and gives exactly the values of the torso with nested regions (both graphs run
    eagerly here, so the same kernels)."""
    stage, objects, sampler = slat_setup
    real_compile = torch.compile
    graphs: list[str] = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, backend=None, mode=None, **kw:
                        real_compile(fn, backend=recording_backend, dynamic=kw.get("dynamic")))
    cond, coords, noise = objects[0]
    saved = stage.__dict__.pop("_compiled_torso", None)
    outs, codes = {}, {}
    try:
        for regions in (True, False):
            graphs.clear()
            torch._dynamo.reset()
            options = RunOptions(batch_cfg=True, cache_cond_kv=True, compile_slat=True, compile_backend="eager",
                                 slat_block_regions=regions)
            with torch.no_grad():
                outs[regions] = stage.velocity_net(cond, coords, sampler, options, [])(noise, 0.5, None)
            codes[regions] = "\n".join(graphs)
        assert sorted(k[2] for k in stage.__dict__["_compiled_torso"]) == [False, True]
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        if saved is not None:
            stage.__dict__["_compiled_torso"] = saved
    assert codes[True].count("invoke_subgraph") >= len(stage.flow.blocks)  # one region call per block
    assert "invoke_subgraph" not in codes[False] and codes[False]
    assert torch.equal(outs[False], outs[True])


def test_block_regions_setting_is_checked():
    with pytest.raises(ValueError, match="slat_block_regions is a bool"):
        RunOptions(compile_slat=True, slat_block_regions=0)
    with pytest.raises(ValueError, match="slat_block_regions=False inlines the blocks of the compiled SLaT torso"):
        RunOptions(slat_block_regions=False)
