"""``RunOptions.slat_merge_inlined`` and ``GraphedCall(merged_fn=...)``: the merged recording of a pass recorded in
pieces records another function (the SLaT torso compiled without piece ends, its blocks inlined), warmed by one eager
call the first time. Settings and arguments are checked on the CPU; on the GPU the merged graph must replay the merged
function's values, and the SLaT sampler must give the pieces' latents to rounding."""
from __future__ import annotations

import warnings

import pytest
import torch

from fs3d_accel.stages.graphs import GraphedCall
from fs3d_accel.stages.options import RunOptions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_MERGING = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True,
                slat_graph_piece_blocks=2, slat_graph_merge_after=1, graph_record_first=True)


def test_the_option_needs_a_merge_and_the_compiled_torso():
    with pytest.raises(ValueError, match="slat_merge_inlined is a bool"):
        RunOptions(**_MERGING, compile_slat=True, slat_merge_inlined=1)
    with pytest.raises(ValueError, match="needs slat_graph_merge_after > 0 and compile_slat=True"):
        RunOptions(**_MERGING, slat_merge_inlined=True)  # no compiled torso
    with pytest.raises(ValueError, match="needs slat_graph_merge_after > 0 and compile_slat=True"):
        RunOptions(**{**_MERGING, "slat_graph_merge_after": 0}, compile_slat=True, slat_merge_inlined=True)
    assert RunOptions(**_MERGING, compile_slat=True, slat_merge_inlined=True).slat_merge_inlined


def test_graphed_call_checks_its_merged_function():
    with pytest.raises(ValueError, match="merged_fn is recorded when the pieces are merged; it needs merge_after"):
        GraphedCall(lambda x: x, async_capture=True, in_pieces=True, merged_fn=lambda x: x)
    with pytest.raises(ValueError, match="merged_warmup says whether merged_fn needs an eager call"):
        GraphedCall(lambda x: x, async_capture=True, in_pieces=True, merge_after=2, merged_warmup=lambda: True)


def test_off_cuda_the_call_runs_fn_not_the_merged_function():
    g = GraphedCall(lambda x: x + 1, async_capture=True, in_pieces=True, merge_after=1, merged_fn=lambda x: x + 2)
    x = torch.zeros(3)
    for _ in range(3):
        assert torch.equal(g(x), x + 1)


@cuda
@pytest.mark.parametrize("warm", [True, False])
def test_the_merged_graph_replays_the_merged_function(warm):
    """Two calls replay the pieces of ``fn``; the third records ``merged_fn`` (after one eager call of it where
    ``merged_warmup`` says so) on the same input buffers, and from then on the calls give ``merged_fn``'s values."""
    from fs3d_accel.stages.graphs import graph_piece_end

    def fn(x):
        y = x * 2
        graph_piece_end(y)
        return y + 1

    eager_calls = []

    def merged(x):
        if not torch.cuda.is_current_stream_capturing():
            eager_calls.append(1)
        return x * 3  # differs from fn on purpose: the test must see which function the merged graph holds

    g = GraphedCall(fn, warmup=0, async_capture=True, in_pieces=True, merge_after=2, merged_fn=merged,
                    merged_warmup=lambda: warm)
    x = torch.arange(4.0, device="cuda")
    outs = [g(x * (i + 1)) for i in range(4)]
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        expected = x * (i + 1) * 2 + 1 if i < 2 else x * (i + 1) * 3
        assert torch.equal(out, expected), i
    assert len(eager_calls) == (1 if warm else 0)
    assert g.captures == 2


@cuda
def test_slat_with_the_inlined_merge_gives_the_pieces_latents():
    """The mini SLaT sampler on the GPU with the inductor torso, pieces merged after one call: with the inlined merge
    the latents match the plain merge to fp32 rounding, a merge happened in both, and nothing warned (a failed merge
    warns)."""
    from conftest import mini_slat_setup, sample_slat
    stage, objects, sampler = mini_slat_setup((300, 260))
    stage = stage.cuda()
    merges = []
    original = GraphedCall._merge
    GraphedCall._merge = lambda self, entry: (merges.append(self.merged_fn is not None), original(self, entry))[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for cond, coords, noise in objects:  # the second object merges without an eager warm-up
                cond, coords, noise = cond.cuda(), coords.cuda(), noise.cuda()
                plain = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**_MERGING, compile_slat=True))
                inlined = sample_slat(stage, cond, coords, noise, sampler,
                                      RunOptions(**_MERGING, compile_slat=True, slat_merge_inlined=True))
                print(f"N={len(coords)}: max abs diff {float((inlined - plain).abs().max()):.3g}")
                torch.testing.assert_close(inlined, plain, rtol=1e-4, atol=1e-4)
    finally:
        GraphedCall._merge = original
    assert False in merges and True in merges
    assert len(stage.__dict__.get("_merged_torso_warm", ())) >= 1


def test_the_stage_asks_for_the_inlined_torso_and_keeps_its_values_on_cpu(monkeypatch, cpu_compile):
    """On the CPU the graphs run eagerly (no merge): the stage builds the piece-free, inlined torso next to the pieces'
    one (two compiled-torso keys) and the latents are those without the option, bit for bit."""
    import fs3d_accel.stages.options as options_mod
    from conftest import mini_slat_setup, sample_slat
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stage, objects, sampler = mini_slat_setup((200,))
    cond, coords, noise = objects[0]
    common = dict(_MERGING, compile_slat=True, compile_backend="eager")
    plain = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common))
    keys_before = set(stage.__dict__["_compiled_torso"])
    inlined = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common, slat_merge_inlined=True))
    new_keys = set(stage.__dict__["_compiled_torso"]) - keys_before
    assert [(k[1], k[2]) for k in new_keys] == [(0, False)]  # no piece ends, blocks inlined
    assert torch.equal(inlined, plain)


def _spied_stage_run(monkeypatch, **options):
    """Run the mini SLaT sampler on the CPU with ``options`` on top of the merging ones, spying on what the stage hands
    GraphedCall: returns (the GraphedCalls made, with ``last_args``; the torso calls as (piece blocks, block regions);
    the piece ends met; the stage; the structures to release)."""
    import types

    import fs3d_accel.stages.graphs as graphs_mod
    import fs3d_accel.stages.options as options_mod
    import fs3d_accel.stages.slat as slat_mod
    from conftest import mini_slat_setup
    from fs3d_accel.samplers import EulerFlowSampler
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    created: list = []

    class Spy(GraphedCall):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            created.append(self)

        def __call__(self, *args):
            self.last_args = args
            return super().__call__(*args)
    monkeypatch.setattr(slat_mod, "GraphedCall", Spy)
    torso_calls: list = []
    original = slat_mod.SLaTStage.compiled_torso

    def spy_torso(self, opts):
        torso, opts = original(self, opts), opts.for_stage("slat")

        def counted(*a, **k):
            torso_calls.append((opts.slat_graph_piece_blocks, opts.slat_block_regions))
            return torso(*a, **k)
        return counted
    monkeypatch.setattr(slat_mod.SLaTStage, "compiled_torso", spy_torso)
    piece_ends: list = []
    # the piece ends met, counted where the real ``graph_piece_end`` op looks for a recording in progress (none on the
    # CPU): the op runs this Python at every call, inside the compiled torso too, where a list appended to in the
    # traced code itself would make dynamo guard on its length and recompile the torso at every call
    monkeypatch.setattr(graphs_mod, "_PIECES", types.SimpleNamespace(
        active=types.SimpleNamespace(cut=lambda: piece_ends.append(1))))
    stage, objects, sampler = mini_slat_setup((200,))
    cond, coords, noise = objects[0]
    structures: list[dict] = []
    with torch.no_grad():
        opts = RunOptions(**{**_MERGING, **options}, compile_slat=True, compile_backend="eager",
                          slat_merge_inlined=True)
        net = stage.velocity_net(cond, coords, sampler, opts, structures)
        EulerFlowSampler(sampler, "slat").sample(noise.clone(), net)
    return created, torso_calls, piece_ends, stage, structures


def test_the_stages_merged_call_runs_the_inlined_torso_without_piece_ends(monkeypatch, cpu_compile):
    """What the stage hands GraphedCall as ``merged_fn`` (called eagerly here, as the merge's warm-up calls it): the
    torso compiled without piece ends and with its blocks inlined, no piece end anywhere in the pass, and the kind of
    pass remembered as warmed; ``fn`` keeps the pieces' torso and ends."""
    from fs3d_accel.model.sparse import release_structure
    created, torso_calls, piece_ends, stage, structures = _spied_stage_run(monkeypatch)
    try:
        with torch.no_grad():
            assert created and all(g.merged_fn is not None and g.merged_warmup() for g in created)
            g = created[0]
            torso_calls.clear(), piece_ends.clear()
            g.fn(*g.last_args)
            assert torso_calls == [(2, True)] and piece_ends  # the pieces' torso, with its ends
            torso_calls.clear(), piece_ends.clear()
            g.merged_fn(*g.last_args)
            assert torso_calls == [(0, False)] and not piece_ends
            assert not g.merged_warmup()  # warmed: the merge records without another eager call
    finally:
        for s in structures:
            release_structure(s)


def test_the_warm_set_tells_the_conditional_and_unconditional_passes_apart(monkeypatch, cpu_compile):
    """Without batched CFG the conditional and the unconditional pass are both batch 1, but the unconditional one reads
    one-key K/V (another graph of the merged torso): warming one must not mark the other as warmed."""
    from fs3d_accel.model.sparse import release_structure
    created, _, _, stage, structures = _spied_stage_run(monkeypatch, batch_cfg=False, graph_record_first=False,
                                                        collapse_zero_cond=True)
    try:
        with torch.no_grad():
            assert len(created) == 2
            cond_pass, uncond_pass = created
            cond_pass.merged_fn(*cond_pass.last_args)
            assert not cond_pass.merged_warmup() and uncond_pass.merged_warmup()
            uncond_pass.merged_fn(*uncond_pass.last_args)
            assert not uncond_pass.merged_warmup()
    finally:
        for s in structures:
            release_structure(s)


def test_merged_outputs_must_match_the_pieces_and_the_functions_must_be_callable():
    from fs3d_accel.stages.graphs import _check_same_outputs
    a, b = torch.zeros(2, 3), torch.zeros(2, 3)
    _check_same_outputs(a, b)
    _check_same_outputs({"x": [a]}, {"x": [b]})
    for merged, pieces in ((torch.zeros(2, 4), b), (torch.zeros(2, 3, dtype=torch.float64), b), ([a], b),
                           ({"y": [a]}, {"x": [b]})):
        with pytest.raises(ValueError, match="merged_fn's outputs differ from the pieces'"):
            _check_same_outputs(merged, pieces)
    with pytest.raises(TypeError, match="merged_fn must be callable"):
        GraphedCall(lambda x: x, async_capture=True, in_pieces=True, merge_after=1, merged_fn=3)
    with pytest.raises(TypeError, match="merged_warmup must be callable"):
        GraphedCall(lambda x: x, async_capture=True, in_pieces=True, merge_after=1, merged_fn=lambda x: x,
                    merged_warmup=True)


def test_the_torso_fails_loudly_at_its_recompile_limit(monkeypatch, cpu_compile):
    """Dynamo counts every torso graph against one limit (one code object); past it the torso must raise, not run
    uncompiled. With the limit patched to 1, the sampler's second torso graph (the unguided steps' batch 1 after the
    CFG pair's batch 2, or the nested block region's) is one too many."""
    import fs3d_accel.stages.slat as slat_mod
    from conftest import mini_slat_setup, sample_slat
    from fs3d_accel.samplers import count_network_passes
    stage, objects, sampler = mini_slat_setup((120,))
    assert count_network_passes(sampler) < 2 * sampler.steps  # some steps unguided: the sampler needs both batches
    cond, coords, noise = objects[0]
    monkeypatch.setattr(slat_mod, "_TORSO_RECOMPILE_LIMIT", 1)
    # alone it raises FailOnRecompileLimitHit; after other compiled tests in the process dynamo may stop at the nested
    # block region first, as Unsupported: either way an error, never an uncompiled torso
    with pytest.raises((torch._dynamo.exc.FailOnRecompileLimitHit, torch._dynamo.exc.Unsupported)):
        sample_slat(stage, cond, coords, noise, sampler,
                    RunOptions(batch_cfg=True, cache_cond_kv=True, compile_slat=True, compile_backend="eager"))
