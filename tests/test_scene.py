"""Scene mode: the objects of one image batched through SS (and SLaT) equal the per-object runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fast_mini_config, sparsify_occupancy
from conftest import SceneObject, two_object_scene as conftest_two_object_scene
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.seams import Accelerator, IdentityPolicy
from fs3d_accel.stages.options import RunOptions
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.scene import (batched_slat, batched_ss, check_scene, group_scenes, reconstruct_scene,
                                 scene_row)

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mini_pipe():
    """The conftest mini pipeline with 2-step samplers and a sparser SS output (~1% occupied): fast."""
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.01)
    return pipe


def two_object_scene():
    """The conftest two-box scene, listed in reverse object order."""
    return conftest_two_object_scene()[::-1]


def test_group_scenes_orders_objects_and_finds_the_shipped_pair():
    scenes = group_scenes(load_shipped_samples())
    assert [s.name for s in scenes[6]] == ["021_bleach_cleanser", "077_rubiks_cube"]
    assert sorted(scenes) == [0, 1, 2, 3, 4, 5, 6] and all(len(v) == 1 for k, v in scenes.items() if k != 6)
    assert [o.name for o in group_scenes(two_object_scene())[3]] == ["box0", "box1"]


def test_check_scene_rejects_mixed_or_empty_input():
    objs = two_object_scene()
    assert check_scene(objs) == 3
    with pytest.raises(ValueError, match="at least one"):
        check_scene([])
    other = SceneObject("x", objs[0].image, objs[0].mask, objs[0].pointmap, scene_id=4)
    with pytest.raises(ValueError, match=r"several scenes \[3, 4\]"):
        check_scene([objs[0], other])
    small = SceneObject("y", objs[0].image[:32], objs[0].mask[:32], objs[0].pointmap[:32])
    with pytest.raises(ValueError, match="different image shapes"):
        check_scene([objs[0], small])
    with pytest.raises(ValueError, match="batch_slat=True needs batch=True"):
        reconstruct_scene(None, objs, batch=False, batch_slat=True)


@pytest.fixture(scope="module")
def shipped_scene_ss(mini_pipe):
    """The shipped two-object scene: prepared inputs and the per-object SS outputs (seed 5)."""
    objs = group_scenes(load_shipped_samples())[6]
    inputs = [mini_pipe.prepare(s.image, s.mask, s.pointmap) for s in objs]
    return inputs, [mini_pipe.run_ss(i, seed=5) for i in inputs]


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_batched_ss_equals_per_object_on_the_shipped_scene(mini_pipe, shipped_scene_ss, batch_cfg):
    pipe = mini_pipe
    inputs, ref = shipped_scene_ss
    old = pipe.options
    pipe.options = RunOptions(batch_cfg=batch_cfg)
    try:
        got = batched_ss(pipe, inputs, seed=5)
    finally:
        pipe.options = old
    assert len(got) == 2
    for r, g in zip(ref, got):
        assert set(g.latents) == set(r.latents)
        for k in r.latents:
            assert g.latents[k].shape == r.latents[k].shape
            torch.testing.assert_close(g.latents[k], r.latents[k], **TOL)
        torch.testing.assert_close(g.occupancy_logits, r.occupancy_logits, **TOL)
        assert torch.equal(g.coords, r.coords) and g.downsample_factor == r.downsample_factor
        np.testing.assert_allclose(g.layout.translation, r.layout.translation, rtol=1e-4, atol=1e-5)
    # the two objects really differ (so equality above is per object, not a broadcast)
    assert not torch.allclose(got[0].latents["shape"], got[1].latents["shape"])


def test_reconstruct_scene_batched_equals_per_object(mini_pipe):
    pipe = mini_pipe
    objs = two_object_scene()
    ref = reconstruct_scene(pipe, objs, seed=2, batch=False)
    assert ref.objects == ["box1", "box0"] and not ref.ss_batched and not ref.slat_batched
    single = pipe(objs[0].image, objs[0].mask, pointmap=objs[0].pointmap, seed=2)
    assert torch.equal(single.slat.feats, ref.results[0].slat.feats)
    np.testing.assert_array_equal(single.mesh.vertices, ref.results[0].mesh.vertices)

    got = reconstruct_scene(pipe, objs, seed=2, batch=True)
    assert got.ss_batched and got.slat_batched and got.objects == ref.objects
    for r, g in zip(ref.results, got.results):
        assert torch.equal(g.ss.coords, r.ss.coords) and torch.equal(g.slat.coords, r.slat.coords)
        torch.testing.assert_close(g.slat.feats, r.slat.feats, **TOL)
        assert g.mesh.vertices.shape == r.mesh.vertices.shape
        np.testing.assert_allclose(g.mesh.vertices, r.mesh.vertices, rtol=1e-4, atol=1e-4)
    t = got.timings
    assert set(t) == {"prepare", "ss", "slat", "decode", "total"}
    assert t["total"] >= t["prepare"] + t["ss"] + t["slat"] + t["decode"] > 0
    assert sum(r.timings["ss"] for r in got.results) == pytest.approx(t["ss"])

    row = scene_row(got, "cpu")
    assert (row["scene_id"], row["objects"], row["n_objects"]) == (3, "box1;box0", 2)
    assert row["n_voxels"] == sum(int(r.ss.coords.shape[0]) for r in ref.results)
    assert row["time_total"] == t["total"] and row["ss_batched"] and row["slat_batched"]

    # with an SS step policy the SS stage runs per object (exactly the reference); SLaT stays batched
    pipe.with_accel(Accelerator(ss_policy=IdentityPolicy(), name="identity-ss"))
    try:
        with pytest.raises(ValueError, match="SS step policy"):
            batched_ss(pipe, [r.inputs for r in ref.results], seed=2)
        mixed = reconstruct_scene(pipe, objs, seed=2, batch=True)
    finally:
        pipe.with_accel(None)
    assert not mixed.ss_batched and mixed.slat_batched
    for r, m in zip(ref.results, mixed.results):
        for k in r.ss.latents:
            assert torch.equal(m.ss.latents[k], r.ss.latents[k])
        torch.testing.assert_close(m.slat.feats, r.slat.feats, **TOL)


def test_batched_slat_checks_its_inputs(mini_pipe):
    with pytest.raises(ValueError, match="as many SS outputs"):
        batched_slat(mini_pipe, [], [])
    mini_pipe.with_accel(Accelerator(slat_policy=IdentityPolicy(), name="identity-slat"))
    try:
        with pytest.raises(ValueError, match="SLaT step policy"):
            batched_slat(mini_pipe, [object()], [object()])
    finally:
        mini_pipe.with_accel(None)


def test_batched_slat_builds_coordinate_tables_once_and_releases_them(monkeypatch):
    """Scene SLaT reuses one coordinate structure per coordinate set across steps (as the
    per-object stage does): the tables are built as often for 4 steps as for 1, and freed after."""
    import fs3d_accel.model.sparse as sparse
    import fs3d_analysis.scene as scene_mod

    objs = two_object_scene()
    counts, released = {}, []
    real_keys, real_release = sparse._linear_keys, scene_mod.release_structure

    def counting_keys(*a, **k):
        counts["n"] = counts.get("n", 0) + 1
        return real_keys(*a, **k)

    def recording_release(structure):
        real_release(structure)
        released.append(structure)

    monkeypatch.setattr(sparse, "_linear_keys", counting_keys)
    monkeypatch.setattr(scene_mod, "release_structure", recording_release)
    per_steps = {}
    for steps in (1, 4):
        pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=steps), seed=0)
        sparsify_occupancy(pipe, occupied_fraction=0.01)
        inputs = [pipe.prepare(o.image, o.mask, o.pointmap) for o in objs]
        ss = [pipe.run_ss(i, seed=2) for i in inputs]
        counts["n"], released[:] = 0, []
        batched_slat(pipe, inputs, ss, seed=2)
        per_steps[steps] = counts["n"]
        assert len(released) >= 1 and all(s == {} for s in released)
    assert per_steps[1] > 0 and per_steps[4] == per_steps[1]


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_batched_ss_through_held_kv_equals_uncompiled(mini_pipe, shipped_scene_ss, batch_cfg, monkeypatch,
                                                      cpu_compile):
    """The guided batch keeps a conditional and an unconditional velocity function alive at once; with the SS
    stage's held K/V (the CUDA-graph path, forced on the CPU with the eager backend) each must keep its own condition
    (a store keyed only by name let the second overwrite the first's K/V)."""
    monkeypatch.setattr(RunOptions, "compile_uses_cuda_graphs", property(lambda self: True))
    pipe = mini_pipe
    inputs, _ = shipped_scene_ss
    old = pipe.options
    try:
        pipe.options = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True)
        ref = batched_ss(pipe, inputs, seed=5)
        pipe.options = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, compile_ss=True, compile_backend="eager")
        got = batched_ss(pipe, inputs, seed=5)
    finally:
        pipe.options = old
        pipe.ss.release_held_inputs()
        pipe.ss.__dict__.pop("_compiled", None)
    for r, g in zip(ref, got):
        for k in r.latents:
            assert torch.equal(g.latents[k], r.latents[k]), k
