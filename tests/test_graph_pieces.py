"""SLaT whole-pass graphs recorded in pieces (``RunOptions.slat_graph_piece_blocks``, ``GraphedCall(in_pieces=True)``):
where the flow marks piece ends, that the marks change no value (eager, compiled torso, sampler), the options' checks,
and on a GPU that the pieces, run while the host records the next, replay like one graph and like eager."""
import dataclasses
import warnings

import pytest
import torch

import fs3d_accel.stages.graphs as graphs_mod
import fs3d_accel.stages.options as options_mod
from conftest import assert_same_ss_slat, fast_mini_config, make_scene, random_slat_inputs, run_ss_slat_each, \
    sparsify_occupancy
from fs3d_accel.model.slat_flow import SLaTFlowModel, current_graph_pieces, use_graph_pieces
from fs3d_accel.model.sparse import persistent_structure, release_structure
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.graphs import GraphedCall, graph_piece_end
from fs3d_accel.stages.options import RunOptions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class PieceEnds:
    """Counts ``graph_piece_end`` calls (by the recording hook the op calls) without recording anything."""

    def __init__(self) -> None:
        self.cuts = 0

    def cut(self) -> None:
        self.cuts += 1


def count_piece_ends(fn) -> int:
    spy = PieceEnds()
    graphs_mod._PIECES.active = spy
    try:
        fn()
    finally:
        graphs_mod._PIECES.active = None
    return spy.cuts


def mini_flow(num_blocks: int = 5):
    cfg, coords, feats, cond = random_slat_inputs(n=200)
    cfg = dataclasses.replace(cfg, num_blocks=num_blocks)
    torch.manual_seed(0)
    return SLaTFlowModel(cfg).eval(), coords, feats, cond


@pytest.mark.parametrize("blocks,expected", [(0, 0), (1, 2 + 4), (2, 2 + 2), (3, 2 + 1), (5, 2), (9, 2)])
def test_the_flow_marks_its_input_path_every_k_blocks_and_its_torso_end(blocks, expected):
    """Five blocks: a piece end after the input path, after every ``blocks`` blocks but the last, and after the last
    block; none without pieces. The values are the same with and without the marks."""
    flow, coords, feats, cond = mini_flow(5)
    t = torch.full((1,), 300.0)
    with torch.no_grad():
        plain = flow(feats, coords, t, cond)
        with use_graph_pieces(blocks):
            assert current_graph_pieces() == blocks
            out = []
            assert count_piece_ends(lambda: out.append(flow(feats, coords, t, cond))) == expected
    assert current_graph_pieces() == 0
    assert torch.equal(plain, out[0])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_the_compiled_torso_keeps_its_piece_ends_and_values(backend):
    """The torso compiled (dynamo with the eager backend, and aot_eager, which functionalises the op's declared
    mutation, on the CPU) calls the op at run time, once per piece end, and gives the uncompiled values; without
    pieces it has no piece end."""
    flow, coords, feats, cond = mini_flow(4)
    t = torch.full((1,), 300.0)
    torch._dynamo.reset()
    torso = torch.compile(flow.dense_torso, backend=backend)
    with torch.no_grad():
        plain = flow(feats, coords, t, cond)
        assert count_piece_ends(lambda: flow(feats, coords, t, cond, torso=torso)) == 0
        with use_graph_pieces(2):
            out = []
            assert count_piece_ends(lambda: out.append(flow(feats, coords, t, cond, torso=torso))) == 2 + 1
    assert torch.equal(plain, out[0])


def test_a_piece_end_outside_a_recording_does_nothing():
    x = torch.arange(4.0)
    graph_piece_end(x)
    assert torch.equal(x, torch.arange(4.0))


def test_options_check_the_pieces_setting():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="slat_graph_piece_blocks is the transformer blocks per recorded piece"):
            RunOptions(slat_graph_piece_blocks=bad)
    with pytest.raises(ValueError, match="needs cuda_graphs and async_graph_capture"):
        RunOptions(slat_graph_piece_blocks=4)
    with pytest.raises(ValueError, match="slat_graph_piece_blocks is the transformer blocks"):
        with use_graph_pieces(-2):
            pass


def test_graphed_call_checks_its_pieces_argument():
    with pytest.raises(ValueError, match="in_pieces runs each recorded piece while the host records the next"):
        GraphedCall(lambda x: x, in_pieces=True)
    with pytest.raises(TypeError, match="in_pieces must be True or False"):
        GraphedCall(lambda x: x, async_capture=True, in_pieces=1)


def test_pieces_change_no_value_of_the_stages_on_cpu(monkeypatch):
    """The sampler with the pieces' ends marked (graphs run eagerly on the CPU) gives the same SS and SLaT outputs."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=3), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    plain = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])[0]
    spy = PieceEnds()
    graphs_mod._PIECES.active = spy  # counts the flow's piece ends (nothing records on the CPU)
    try:
        pieces = run_ss_slat_each(pipe, inputs, [RunOptions(**base, slat_graph_piece_blocks=1)])[0]
    finally:
        graphs_mod._PIECES.active = None
    blocks = pipe.config.slat_flow.num_blocks
    passes = pipe.config.slat_sampler.steps  # one network call per step (batched CFG)
    assert spy.cuts == passes * (blocks + 1)  # input path, every block but the last, the torso's end
    assert_same_ss_slat(plain, pieces)


def test_more_piece_blocks_than_blocks_is_refused(monkeypatch):
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    blocks = pipe.config.slat_flow.num_blocks
    options = RunOptions(batch_cfg=True, cuda_graphs=True, async_graph_capture=True,
                         slat_graph_piece_blocks=blocks + 1)
    cond = torch.zeros(1, 3, pipe.config.slat_flow.cond_channels)
    with pytest.raises(ValueError, match=f"more than the SLaT flow's {blocks} transformer blocks"):
        pipe.slat.velocity_net(cond, torch.zeros(1, 4, dtype=torch.int32), pipe.config.slat_sampler, options, [])


def test_options_check_the_merge_setting():
    base = dict(cuda_graphs=True, async_graph_capture=True)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="slat_graph_merge_after is the calls that run a pass's pieces"):
            RunOptions(**base, slat_graph_piece_blocks=2, slat_graph_merge_after=bad)
    with pytest.raises(ValueError, match="slat_graph_piece_blocks is 0"):
        RunOptions(**base, slat_graph_merge_after=4)
    with pytest.raises(ValueError, match="merge_after must be an int >= 0"):
        GraphedCall(lambda x: x, async_capture=True, in_pieces=True, merge_after=-1)
    with pytest.raises(ValueError, match="it needs in_pieces=True"):
        GraphedCall(lambda x: x, async_capture=True, merge_after=2)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
def cuda_flow(num_blocks: int = 4):
    flow, coords, feats, cond = mini_flow(num_blocks)
    flow = flow.cuda()
    coords, feats, cond = coords.cuda(), feats.cuda(), cond.cuda()
    return flow, coords, feats, flow.precompute_cond_kv(cond), persistent_structure()


@cuda
@pytest.mark.parametrize("warmup", [0, 1])
def test_pieces_replay_like_one_graph_and_like_eager(warmup):
    """A flow with 4 blocks cut every block: 1 + 3 + 1 piece ends, so 6 pieces. The recording call, run piece by
    piece, and the replays equal eager calls and the single graph's, bit for bit."""
    flow, coords, feats, kv, structure = cuda_flow(4)
    t = torch.full((1,), 500.0, device="cuda")
    with torch.no_grad():
        flow(feats, coords, t, None, cond_kv=kv, structure=structure)  # tables built (host reads) before recording

        def fn(f, tt):
            with use_graph_pieces(1):
                return flow(f, coords, tt, None, cond_kv=kv, structure=structure)
        one = GraphedCall(lambda f, tt: flow(f, coords, tt, None, cond_kv=kv, structure=structure), warmup=warmup,
                          async_capture=True)
        pieces = GraphedCall(fn, warmup=warmup, async_capture=True, in_pieces=True)
        eager = [flow(feats * (i + 1), coords, t * (i + 1), None, cond_kv=kv, structure=structure) for i in range(4)]
        single = [one(feats * (i + 1), t * (i + 1)) for i in range(4)]
        split = [pieces(feats * (i + 1), t * (i + 1)) for i in range(4)]
    torch.cuda.synchronize()
    entry = next(iter(pieces._captured.values()))
    assert 1 + len(entry.more) == 6
    assert pieces.captures == 1 and pieces.replays == 4 - warmup
    for a, b, c in zip(eager, single, split):
        assert torch.equal(a, c) and torch.equal(b, c)
    release_structure(structure)


@cuda
def test_pieces_run_while_the_host_records_the_next():
    """At the recording call, the first piece is queued before the last one is recorded: an event recorded at the
    second piece end (on the caller's stream, behind the first piece) completes while the recording still runs."""
    flow, coords, feats, kv, structure = cuda_flow(4)
    t = torch.full((1,), 500.0, device="cuda")
    main = torch.cuda.current_stream()
    seen = []
    replays = []
    original_replay = torch.cuda.CUDAGraph.replay

    def counted_replay(graph):
        replays.append(torch.cuda.current_stream())
        return original_replay(graph)

    class Watch(graphs_mod._PieceRecording):
        def end(self):
            super().end()  # the piece recorded and queued; the next capture has not begun (a sync is legal here)
            if len(self.graphs) == 2:
                # both pieces were launched on the caller's stream before the third is recorded, and have run
                assert len(replays) == 2 and all(s == main for s in replays)
                done = torch.cuda.Event()
                done.record(main)
                done.synchronize()
                seen.append(True)
    with torch.no_grad():
        flow(feats, coords, t, None, cond_kv=kv, structure=structure)

        def fn(f, tt):
            with use_graph_pieces(1):
                return flow(f, coords, tt, None, cond_kv=kv, structure=structure)
        original = graphs_mod._PieceRecording
        graphs_mod._PieceRecording = Watch
        torch.cuda.CUDAGraph.replay = counted_replay
        try:
            out = GraphedCall(fn, warmup=0, async_capture=True, in_pieces=True)(feats, t)
        finally:
            graphs_mod._PieceRecording = original
            torch.cuda.CUDAGraph.replay = original_replay
        eager = flow(feats, coords, t, None, cond_kv=kv, structure=structure)
    assert seen == [True]
    assert torch.equal(out, eager)
    release_structure(structure)


@cuda
def test_prepare_records_the_pieces_without_running_them_and_the_call_replays():
    flow, coords, feats, kv, structure = cuda_flow(2)
    t = torch.full((1,), 500.0, device="cuda")
    with torch.no_grad():
        flow(feats, coords, t, None, cond_kv=kv, structure=structure)

        def fn(f, tt):
            with use_graph_pieces(1):
                return flow(f, coords, tt, None, cond_kv=kv, structure=structure)
        g = GraphedCall(fn, warmup=0, async_capture=True, in_pieces=True)
        replays = []
        original_replay = torch.cuda.CUDAGraph.replay
        torch.cuda.CUDAGraph.replay = lambda graph: (replays.append(graph), original_replay(graph))[1]
        try:
            assert g.prepare(feats * 0, t)  # recorded on other inputs
        finally:
            torch.cuda.CUDAGraph.replay = original_replay
        entry = next(iter(g._captured.values()))
        assert not entry.ran and g.replays == 0 and replays == [] and len(entry.more) == 3
        out = g(feats, t)
        eager = flow(feats, coords, t, None, cond_kv=kv, structure=structure)
    assert g.replays == 1 and torch.equal(out, eager)
    release_structure(structure)


def fn_pieces(flow, coords, kv, structure):
    def fn(f, tt):
        with use_graph_pieces(1):
            return flow(f, coords, tt, None, cond_kv=kv, structure=structure)
    return fn


def assert_no_recording_left() -> None:
    assert getattr(graphs_mod._PIECES, "active", None) is None
    with torch.cuda.stream(graphs_mod._capture_stream(torch.device("cuda", torch.cuda.current_device()))):
        assert not torch.cuda.is_current_stream_capturing()


@cuda
def test_a_failed_piece_recording_ends_cleanly_and_the_next_records():
    flow, coords, feats, kv, structure = cuda_flow(2)
    t = torch.full((1,), 500.0, device="cuda")
    calls = []

    def failing(f, tt):
        with use_graph_pieces(1):
            out = flow(f, coords, tt, None, cond_kv=kv, structure=structure)
        calls.append(1)
        raise RuntimeError("boom after the last piece end")
    with torch.no_grad():
        flow(feats, coords, t, None, cond_kv=kv, structure=structure)
        g = GraphedCall(failing, warmup=0, async_capture=True, in_pieces=True)
        with pytest.raises(RuntimeError, match="boom"):
            g(feats, t)
        assert_no_recording_left()
        with pytest.raises(RuntimeError, match="failed before"):
            g(feats, t)
        for fail in ("python", "sync"):  # in a middle piece: a Python error, and a sync that invalidates the capture
            def hook(module, args, output, fail=fail):
                if fail == "sync":
                    output.feats.sum().item()
                else:
                    raise RuntimeError("boom in block 1")
            handle = flow.blocks[1].register_forward_hook(hook)
            try:
                with pytest.raises(RuntimeError):
                    GraphedCall(fn_pieces(flow, coords, kv, structure), warmup=0, async_capture=True,
                                in_pieces=True)(feats, t)
            finally:
                handle.remove()
            assert_no_recording_left()

        def fn(f, tt):
            with use_graph_pieces(1):
                return flow(f, coords, tt, None, cond_kv=kv, structure=structure)
        out = GraphedCall(fn, warmup=0, async_capture=True, in_pieces=True)(feats, t)
        eager = flow(feats, coords, t, None, cond_kv=kv, structure=structure)
    assert calls == [1] and torch.equal(out, eager)
    release_structure(structure)


@cuda
def test_stages_with_pieces_on_cuda_give_the_single_graphs_values():
    """The SLaT sampler with its whole-pass graphs in pieces (warmed, record-first, record-first around the torso
    compiled by inductor, and merged into one graph after the first call) equals the single graphs, and the pieces
    were recorded."""
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=3), seed=0, device="cuda")
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    recorded = []
    original = graphs_mod._record_in_pieces

    def spy(fn, inputs, pool, run):
        pieces, output = original(fn, inputs, pool, run)
        recorded.append(len(pieces))
        return pieces, output
    graphs_mod._record_in_pieces = spy
    merges = []
    original_merge = GraphedCall._merge
    GraphedCall._merge = lambda self, entry: (merges.append(1), original_merge(self, entry))[1]
    try:
        for extra in ({}, {"graph_record_first": True}, {"graph_record_first": True, "compile_slat": True},
                      {"slat_graph_merge_after": 1, "graph_record_first": True}):
            pieces = {"slat_graph_piece_blocks": 2, **{k: v for k, v in extra.items() if k == "slat_graph_merge_after"}}
            extra = {k: v for k, v in extra.items() if k != "slat_graph_merge_after"}
            recorded.clear(), merges.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a failed merge warns: fail the test instead
                runs = [run_ss_slat_each(pipe, inputs, [RunOptions(**base, **extra, **(pieces if k else {}))],
                                         seed=s)[0] for k in (0, 1) for s in (0, 1)]
            # a graph merges on its second call that finds pieces: with 3 SLaT steps only the unguided graph is
            # called twice, hence record-first (no warm-up call) for the merge case
            assert bool(merges) == ("slat_graph_merge_after" in pieces)
            assert_same_ss_slat(runs[0], runs[2])
            assert_same_ss_slat(runs[1], runs[3])
            blocks = pipe.config.slat_flow.num_blocks
            assert recorded and all(n == 2 + -(-blocks // 2) for n in recorded)  # the pieces were recorded
    finally:
        graphs_mod._record_in_pieces = original
        GraphedCall._merge = original_merge


@cuda
@pytest.mark.parametrize("record_call", ["call", "prepare"])
def test_merged_pieces_replay_like_eager_and_keep_the_inputs(record_call):
    """``merge_after=2``: two calls run the pieces, the third records one graph on the same input buffers and replays
    it; every call equals eager, and the pieces stay referenced (their replays may still be queued)."""
    flow, coords, feats, kv, structure = cuda_flow(4)
    t = torch.full((1,), 500.0, device="cuda")
    with torch.no_grad():
        flow(feats, coords, t, None, cond_kv=kv, structure=structure)
        g = GraphedCall(fn_pieces(flow, coords, kv, structure), warmup=0, async_capture=True, in_pieces=True,
                        merge_after=2)
        if record_call == "prepare":
            assert g.prepare(feats, t)
        entry = None
        outs, eager = [], []
        inputs = None
        for i in range(5):
            outs.append(g(feats * (i + 1), t * (i + 1)))
            eager.append(flow(feats * (i + 1), coords, t * (i + 1), None, cond_kv=kv, structure=structure))
            entry = next(iter(g._captured.values()))
            assert (len(entry.more) == 5) == (i < 2), i  # pieces for two calls, then one graph
            inputs = inputs or list(entry.inputs)
            assert all(a is b for a, b in zip(inputs, entry.inputs))  # the merged graph reads the same buffers
    torch.cuda.synchronize()
    assert g.captures == 2 and len(entry.retired) == 6 + 1  # the six pieces and their output
    for a, b in zip(outs, eager):
        assert torch.equal(a, b)
    release_structure(structure)
