"""The object stream (``fs3d_accel.stream``): the next object's SS sampler queued behind the current object's SLaT
start changes the order of work across objects, never an object's result; after ``prepare(build_tables=True)`` the
SLaT sampler reads no device data on the host (what lets its GPU work queue behind other work)."""
import dataclasses
import json

import pytest
import torch
from test_cuda_graphs import HOST_SYNC_OPS, OpLog

import fs3d_accel.stages.options as options_mod
from conftest import fast_mini_config, sparsify_occupancy, spy_structure_builds, two_object_scene
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions


@pytest.fixture(scope="module")
def stream_pipe():
    pipe = Pipeline.from_config(fast_mini_config(), seed=0)
    sparsify_occupancy(pipe)
    return pipe


@pytest.fixture(scope="module")
def objects(stream_pipe):
    """Three prepared objects of different sizes (the two boxes of the synthetic scene, and the first again)."""
    objs = two_object_scene()
    return [stream_pipe.prepare(o.image, o.mask, o.pointmap) for o in objs + objs[:1]]


@pytest.fixture(scope="module")
def plain_runs():
    """The plain ``run_prepared`` results of the bit-for-bit cases, kept per option set (default, or the whole-pass
    graph path): the pipeline is deterministic for a seed, so the cases with the same options compare with the same
    runs."""
    return {}


def _assert_same_result(a, b) -> None:
    for key in a.ss.latents:
        assert torch.equal(a.ss.latents[key], b.ss.latents[key]), key
    assert torch.equal(a.ss.coords, b.ss.coords)
    assert torch.equal(a.slat.feats, b.slat.feats)
    assert not b.slat.feats.requires_grad and not b.ss.latents["shape"].requires_grad  # inference, as run_prepared
    assert torch.equal(torch.as_tensor(a.mesh.vertices), torch.as_tensor(b.mesh.vertices))
    assert a.seed == b.seed


@pytest.mark.parametrize("graphs, overlap", [(False, True), (True, True), (False, False), ("sliced", True)])
def test_stream_results_equal_plain_runs_bit_for_bit(stream_pipe, objects, plain_runs, monkeypatch, graphs, overlap):
    """Each streamed object equals its own ``run_prepared`` with the same seed: with the default options, and with
    the whole-pass graph path (``cuda_graphs`` with batched CFG, run eagerly on the CPU) whose tables ``prepare``
    builds ahead (also with the batch-1 tables sliced from the pair's, ``derive_unguided_tables``, against plain runs
    without it); with the mesh extraction on the worker thread and without. The plain runs of one option set are made
    once (by the first case that needs them) and compared with every case of those options."""
    if graphs:
        monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stream_pipe.options = RunOptions(cuda_graphs=True, batch_cfg=True) if graphs else RunOptions()
    try:
        seeds = [3, 4, 3]
        if bool(graphs) not in plain_runs:
            plain_runs[bool(graphs)] = [stream_pipe.run_prepared(inp, seed=s) for inp, s in zip(objects, seeds)]
        plain = plain_runs[bool(graphs)]
        built = []
        if graphs == "sliced":
            stream_pipe.options = RunOptions(cuda_graphs=True, batch_cfg=True, derive_unguided_tables=True)
            built = spy_structure_builds(monkeypatch)
        streamed = list(stream_pipe.run_stream(objects, seeds, overlap_extraction=overlap))
        if graphs == "sliced":
            assert built == [2, 2, 2]  # each object built its pair's structure; the batch-1 ones were sliced
    finally:
        stream_pipe.options = RunOptions()
    assert len(streamed) == 3
    assert len({len(r.ss.coords) for r in plain[:2]}) == 2  # two sizes: the stream is not one shape repeated
    for a, b in zip(plain, streamed):
        _assert_same_result(a, b)
        assert b.timings.keys() == {"stream_s"} and b.timings["stream_s"] > 0


def test_stream_with_the_compiled_slat_torso_equals_plain_runs(stream_pipe, objects, monkeypatch, cpu_compile):
    """The whole-pass graph path with the compiled SLaT torso (dynamo's eager backend on the CPU): the tables
    ``prepare`` builds serve the compiled passes, and every streamed object equals its plain run."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stream_pipe.options = RunOptions(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, compile_slat=True,
                                     compile_backend="eager")
    try:
        plain = [stream_pipe.run_prepared(inp, seed=s) for inp, s in zip(objects[:2], [5, 6])]
        streamed = list(stream_pipe.run_stream(objects[:2], [5, 6]))
    finally:
        stream_pipe.options = RunOptions()
    assert len(streamed) == 2
    for a, b in zip(plain, streamed):
        _assert_same_result(a, b)


def test_prepared_slat_sampler_reads_no_device_data(stream_pipe, objects, monkeypatch):
    """After ``prepare(build_tables=True)`` on the whole-pass graph path, the SLaT sampler's passes, both the
    CFG-batched and the unguided ones (CFG ends before the last step of this schedule), run no op that copies device data to
    the host and make no tensor from host data; without the prebuilt tables the first pass does (so the check can
    fail)."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stream_pipe.options = RunOptions(cuda_graphs=True, batch_cfg=True)
    sampler = dataclasses.replace(stream_pipe.config.slat_sampler, steps=4, cfg_interval=(0.0, 500.0))
    try:
        ss = stream_pipe.run_ss(objects[0], seed=0)
        ops = {}
        for build in (True, False):
            run = stream_pipe.slat.prepare(objects[0], ss, generator=torch.Generator().manual_seed(1),
                                           options=stream_pipe.options, sampler=sampler, build_tables=build)
            net, seen = run.net, set()

            def logged(*args, _net=net, _seen=seen, **kwargs):
                # the passes only: the sampler's time grid is a CPU tensor read on the host by design
                with OpLog() as log:
                    out = _net(*args, **kwargs)
                # lift_fresh: a tensor made from host data, a blocking host-to-device copy on a GPU
                _seen.update(set(log.ops) & (HOST_SYNC_OPS | {"lift_fresh"}))
                return out
            run.net = logged
            run.sample()
            ops[build] = seen
    finally:
        stream_pipe.options = RunOptions()
    assert ops[True] == set()
    assert ops[False]  # the first pass builds the tables itself


def test_slat_run_samples_once_and_releases_its_structures_after_errors(stream_pipe, objects, monkeypatch):
    """A prepared call whose sampler fails frees its coordinate structures (and their graphs); it cannot be sampled
    twice, nor after ``release``."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    opts = RunOptions(cuda_graphs=True, batch_cfg=True)
    ss = stream_pipe.run_ss(objects[0], seed=0)

    run = stream_pipe.slat.prepare(objects[0], ss, generator=torch.Generator().manual_seed(1), options=opts,
                                   build_tables=True)
    structures = list(run.structures)
    assert structures and all(len(s) for s in structures)
    def failing(*args, **kwargs):
        raise RuntimeError("velocity failed")
    run.net = failing
    with pytest.raises(RuntimeError, match="velocity failed"):
        run.sample()
    assert run.structures == [] and all(len(s) == 0 for s in structures)
    with pytest.raises(RuntimeError, match="has run or been released"):
        run.sample()
    run2 = stream_pipe.slat.prepare(objects[0], ss, generator=torch.Generator().manual_seed(1), options=opts)
    run2.release()
    with pytest.raises(RuntimeError, match="has run or been released"):
        run2.sample()


def test_stream_rejects_bad_input_when_called(stream_pipe, objects):
    """Refused at the call, before any result is asked for."""
    with pytest.raises(ValueError, match="one seed per object: 3 objects, 2 seeds"):
        stream_pipe.run_stream(objects, [0, 1])
    with pytest.raises(TypeError, match=r"seeds must be integers, got \[1.5\]"):
        stream_pipe.run_stream(objects, [0, 1.5, 2])
    with pytest.raises(TypeError, match="seeds must be integers, got \\[True\\]"):
        stream_pipe.run_stream(objects, [0, True, 2])
    with pytest.raises(TypeError, match="object 1: run_stream takes PreparedInputs"):
        stream_pipe.run_stream([objects[0], "image.png"])
    with pytest.raises(TypeError, match="overlap_extraction must be True or False"):
        stream_pipe.run_stream(objects, overlap_extraction="no")
    ss = stream_pipe.run_ss(objects[0], seed=0)
    with pytest.raises(TypeError, match="build_tables must be True or False"):
        stream_pipe.slat.prepare(objects[0], ss, generator=torch.Generator(), build_tables=1)
    assert list(stream_pipe.run_stream([])) == []


def test_stream_closed_early_leaves_no_worker_thread(stream_pipe, objects):
    """A consumer that stops after the first result: closing the stream ends its extraction worker."""
    import threading
    stream = stream_pipe.run_stream(objects)
    first = next(stream)
    assert first.seed == 0
    assert any(t.name.startswith("fs3d-extract") for t in threading.enumerate())
    stream.close()
    assert not any(t.name.startswith("fs3d-extract") for t in threading.enumerate())


@pytest.mark.parametrize("overlap", [True, False])
def test_stream_error_propagates_and_the_next_object_is_not_run(stream_pipe, objects, overlap):
    """A failing object stops the stream with its error; the results before it are yielded first (also the one whose
    mesh was still being extracted on the worker)."""
    got = []
    calls = []

    def structure(latents, inp, generator):
        calls.append(inp)
        if len(calls) == 2:
            raise ValueError("no voxel")
        return stream_pipe.ss.decode_structure(latents, inp, generator, stream_pipe.options)
    with pytest.raises(ValueError, match="no voxel"):
        for r in stream_pipe.run_stream(objects, structure=structure, overlap_extraction=overlap):
            got.append(r)
    assert len(got) == 1 and len(calls) == 2
    assert got[0].mesh.vertices.shape[0] > 0


def test_stream_reports_a_failed_extraction_at_its_object(stream_pipe, objects, monkeypatch):
    """An extraction that fails on the worker raises at its object's turn, after the results before it."""
    real = stream_pipe.decode.extract
    count = []

    def extract(*args, **kwargs):
        count.append(1)
        if len(count) == 2:
            raise RuntimeError("marching cubes failed")
        return real(*args, **kwargs)
    monkeypatch.setattr(stream_pipe.decode, "extract", extract)
    got = []
    with pytest.raises(RuntimeError, match="marching cubes failed"):
        for r in stream_pipe.run_stream(objects):
            got.append(r)
    assert len(got) == 1


def test_stream_throughput_script_runs_every_mode_on_new_sizes(tmp_path):
    """The benchmark's CPU smoke run (3 sampler steps, for time): one row per round and mode, each mode on sizes of its
    own, the steps in the metadata, and a README."""
    import csv

    from benchmarks.stream_throughput import main
    main(["--device", "cpu", "--config", "mini", "--variant", "fp32", "--objects", "2", "--min-voxels", "60",
          "--max-voxels", "90", "--rounds", "1", "--steps", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "meta.json").read_text())["steps"] == {"ss": 3, "slat": 3}
    rows = list(csv.DictReader(open(tmp_path / "stream_throughput.csv")))
    assert [r["mode"] for r in rows] == ["sequential", "stream-gpu", "stream"]
    sizes = [set(r["sizes"].split()) for r in rows]
    assert all(not (a & b) for i, a in enumerate(sizes) for b in sizes[i + 1:])  # no mode meets another's sizes
    assert all(float(r["seconds"]) > 0 and r["objects"] == "2" for r in rows)
    assert "against its sequential mode" in (tmp_path / "README.md").read_text()


def test_stream_throughput_script_times_the_stream_without_extraction(tmp_path, monkeypatch):
    """``--modes`` with the extraction-free modes: rows for those modes only, no extraction called in them, and the
    decode stage's extraction restored after."""
    import csv

    from benchmarks import stream_throughput as st
    calls = []
    made = []
    original = st.Pipeline.from_config

    def from_config(*args, **kwargs):
        pipe = original(*args, **kwargs)
        made.append(pipe)
        real = pipe.decode.extract

        def spy(*a, **k):
            calls.append(1)
            return real(*a, **k)
        pipe.decode.extract = spy
        made.append(spy)
        return pipe
    monkeypatch.setattr(st.Pipeline, "from_config", staticmethod(from_config))
    st.main(["--device", "cpu", "--config", "mini", "--variant", "fp32", "--objects", "1", "--min-voxels", "60",
             "--max-voxels", "90", "--rounds", "1", "--modes", "stream-noextract,sequential-noextract",
             "--steps", "3", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "stream_throughput.csv")))
    assert [r["mode"] for r in rows] == ["sequential-noextract", "stream-noextract"]
    assert calls == []  # neither mode extracted a mesh (the spy wraps the extraction the stream would call)
    assert made[0].decode.extract is made[1]  # the spy is back in place after the stream's no-op
    assert "| 1 | stream-noextract |" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--modes", "stream,nope"], "--modes: each of"),
    (["--modes", "stream,stream"], "--modes: each of"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--variant", "fp32,bf16"], "one variant"),
    (["--variant", "fp32", "--objects", "8", "--min-voxels", "60", "--max-voxels", "70"],
     "sizes of two rounds or modes coincide"),
])
def test_stream_throughput_script_rejects_bad_arguments(tmp_path, args, message):
    from benchmarks.stream_throughput import main
    with pytest.raises(SystemExit, match=message):
        main(["--device", "cpu", "--config", "mini", "--out", str(tmp_path)] + args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: the stream with CUDA graphs recorded without a sync")
def test_stream_on_cuda_equals_plain_runs_with_async_graphs():
    """On a GPU, with SLaT's whole-pass graphs recorded without a sync (the recording then overlaps the next object's
    queued SS work), every streamed object equals its plain run bit for bit."""
    pipe = Pipeline.from_config(fast_mini_config(), seed=0)
    sparsify_occupancy(pipe)
    pipe = pipe.to("cuda").with_options(RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True,
                                                   cuda_graphs=True, async_graph_capture=True))
    objs = two_object_scene()
    inputs = [pipe.prepare(o.image, o.mask, o.pointmap) for o in objs + objs[:1]]
    plain = [pipe.run_prepared(inp, seed=s) for inp, s in zip(inputs, [0, 1, 2])]
    streamed = list(pipe.run_stream(inputs, [0, 1, 2]))
    assert len(streamed) == 3
    for a, b in zip(plain, streamed):
        _assert_same_result(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CUDA's synchronisation debug mode")
def test_prepared_slat_sampler_does_not_synchronise_on_cuda():
    """What the stream relies on, checked where it matters: after ``prepare(build_tables=True)`` the SLaT sampler with
    whole-pass graphs recorded without a sync makes no synchronising CUDA call (``torch.cuda.set_sync_debug_mode``
    raises on one: ``.item()``, a device-to-host copy, a blocking host-to-device copy), so its work can queue behind
    the next object's SS sampler."""
    pipe = Pipeline.from_config(fast_mini_config(), seed=0)
    sparsify_occupancy(pipe)
    pipe = pipe.to("cuda").with_options(RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True,
                                                   cuda_graphs=True, async_graph_capture=True))
    o = two_object_scene()[0]
    inp = pipe.prepare(o.image, o.mask, o.pointmap)
    pipe.run_prepared(inp, seed=0)  # lazy initialisation (cuBLAS handles, kernels' first loads) out of the way
    ss = pipe.run_ss(inp, seed=1)
    run = pipe.slat.prepare(inp, ss, generator=torch.Generator().manual_seed(2), options=pipe.options,
                            build_tables=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run.sample()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.feats).all()


def test_mesh_extract_time_script(tmp_path):
    """The extraction timing runs on a full-size stand-in (the 256^3 grid) and refuses unknown objects."""
    import json

    from benchmarks.mesh_extract_time import main
    main(["--objects", "007_tuna_fish_can", "--repeats", "1", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "mesh_extract_time.json").read_text())
    (row,) = meta["rows"]
    assert row["voxels_64"] == 14171 and row["rows_256"] > 16 * 14171 and row["faces"] > 0 and row["median_s"] > 0
    with pytest.raises(SystemExit, match="unknown"):
        main(["--objects", "no_such_object", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        main(["--repeats", "0", "--out", str(tmp_path)])
