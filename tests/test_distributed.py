"""Ray path of the evaluation harness: same table as ``evaluate``, resumable, survives dying workers.

Runs on a local 2-CPU Ray cluster with the fast mini pipeline; a cheap deterministic ``score`` stands
in for the shape metrics (the real ones take tens of seconds on random-weight meshes) in both paths.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from fs3d_analysis.distributed import ray_available

pytestmark = pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install 'fs3d[ray]')")

import conftest  # noqa: E402
from conftest import fast_mini_config, sparsify_occupancy, two_object_scene  # noqa: E402
from fs3d_accel.accel import make_method  # noqa: E402
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_analysis.data import load_shipped_samples  # noqa: E402
from fs3d_analysis.eval import KEY, METRICS, evaluate  # noqa: E402


@dataclass(frozen=True)
class MiniFactory:
    """The conftest mini pipeline, built identically in every actor: ``shift`` is what
    ``sparsify_occupancy`` subtracts from the SS decoder's output bias (found once, in the driver)."""

    shift: float | None = None

    def __call__(self, device: str = "cpu") -> Pipeline:
        pipe = Pipeline.from_config(fast_mini_config(), seed=0, device=device)
        if self.shift is not None:
            with torch.no_grad():
                pipe.ss.decoder.out_layer[2].bias -= torch.tensor(self.shift, dtype=torch.float32)
        return pipe


def cheap_score(result, sample) -> dict[str, float]:
    """Deterministic stand-in for ``eval.score`` with the same keys."""
    v = np.asarray(result.mesh.vertices, np.float64)
    return {"chamfer": float(np.abs(v).mean()), "f_score": float(len(result.mesh.faces)),
            "volume_iou": float(v.sum()), "box_iou_3d": float(len(v)),
            "rotation_error_deg": float(result.slat.feats.double().sum()),
            "translation_error": float(result.ss.latents["shape"].double().abs().sum())}


@dataclass(frozen=True)
class CrashOnce:
    """Method factory whose first call (over all actors) kills its worker process."""

    marker: str

    def __call__(self):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
        os._exit(1)


@dataclass(frozen=True)
class AlwaysCrash:
    def __call__(self):
        os._exit(1)


@dataclass(frozen=True)
class BadMethod:
    def __call__(self):
        raise ValueError("bad accelerator settings")


def merge():
    return make_method("uniform-merge", scale=2.0)


METHODS = {"base": lambda: None, "uniform-merge": merge}
TIME_COLS = lambda t: [c for c in t.columns if c.startswith("time_")]  # noqa: E731


def samples():
    s = load_shipped_samples()
    return [s[4], s[5]]


def canonical(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=TIME_COLS(table)).sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def mini():
    """(factory, pipe): the sparsified mini pipeline and a factory that rebuilds it bit for bit."""
    pipe = Pipeline.from_config(fast_mini_config(), seed=0)
    before = pipe.ss.decoder.out_layer[2].bias.clone()
    sparsify_occupancy(pipe)
    factory = MiniFactory(float((before - pipe.ss.decoder.out_layer[2].bias).item()))
    assert torch.equal(factory().ss.decoder.out_layer[2].bias, pipe.ss.decoder.out_layer[2].bias)
    return factory, pipe


@pytest.fixture(scope="module")
def pool(mini):
    """A local 2-CPU Ray cluster and two actors holding the mini pipeline (shared by the tests)."""
    import ray
    from ray import cloudpickle

    from fs3d_analysis.distributed import ReplicaPool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(conftest)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        with ReplicaPool(mini[0], num_workers=2, use_gpu=False, score_fn=cheap_score) as p:
            yield p
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(mini, tmp_path_factory):
    """The single-process harness on the same inputs (one torch thread, as in a CPU actor)."""
    out = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("fs3d_analysis.eval.score", cheap_score)
            table = evaluate(mini[1], samples(), METHODS, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out / "results.csv", table


def evaluate_ray_(pool, out, methods=METHODS, objects=None, **kw):
    from fs3d_analysis.distributed import evaluate_ray

    return evaluate_ray(None, objects or samples(), methods, out, pool=pool, progress=False, **kw)


def test_same_table_as_evaluate_and_resumes_its_file(pool, reference, tmp_path):
    ref_csv, ref = reference
    lines = ref_csv.read_text().splitlines(keepends=True)
    # the plain harness already finished the base rows: the Ray path must only add the others
    (tmp_path / "results.csv").write_text(lines[0] + "".join(ln for ln in lines[1:] if ",base," in ln))
    table = evaluate_ray_(pool, tmp_path)
    assert table.attrs["computed"] == 2 and table.attrs["retries"] == 0 and table.attrs["workers"] == 2
    assert len(table) == 4 and not table.duplicated(KEY).any()
    assert list(table.columns) == list(ref.columns)
    base = table[table.method == "base"].set_index("object")["time_total"]
    pd.testing.assert_series_equal(base, ref[ref.method == "base"].set_index("object")["time_total"])
    pd.testing.assert_frame_equal(canonical(table), canonical(ref))
    assert set(METRICS) <= set(table.columns) and (table.device == "cpu").all()
    again = evaluate_ray_(pool, tmp_path)
    assert again.attrs["computed"] == 0 and again.attrs["workers"] == 0
    pd.testing.assert_frame_equal(again, table)


def test_killed_worker_loses_nothing_and_duplicates_nothing(pool, reference, tmp_path):
    _, ref = reference
    marker = tmp_path / "crashed"
    started = pool.stats.actors_started
    table = evaluate_ray_(pool, tmp_path, {"base": CrashOnce(str(marker))})
    assert marker.exists() and pool.stats.actors_started == started + 1
    assert table.attrs["retries"] == 1 and table.attrs["computed"] == 2
    assert sorted(table.object) == sorted(s.name for s in samples()) and not table.duplicated(KEY).any()
    pd.testing.assert_frame_equal(canonical(table), canonical(ref[ref.method == "base"]))


def test_scenes_on_actors_match_local_scene_mode(pool, mini):
    from fs3d_analysis.distributed import reconstruct_scenes_ray
    from fs3d_analysis.scene import batched_ss

    scene = two_object_scene()
    table = reconstruct_scenes_ray(None, scene + samples()[:1], seed=0, pool=pool)
    assert list(table.scene_id) == [3, 4] and list(table.n_objects) == [2, 1]
    row = table.iloc[0]
    assert row.objects == "box0;box1" and row.ss_batched and row.slat_batched and row.device == "cpu"
    assert row.time_total >= row.time_ss + row.time_slat + row.time_decode > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the voxels of the local (batched) SS stage, one thread as in the actor
        ss = batched_ss(mini[1], [mini[1].prepare(o.image, o.mask, o.pointmap) for o in scene], seed=0)
    finally:
        torch.set_num_threads(threads)
    assert row.n_voxels == sum(int(s.coords.shape[0]) for s in ss)


def test_measure_pool_matches_calibrate_measure(pool, mini):
    from fs3d_analysis.calibrate import measure
    from fs3d_analysis.distributed import RayMeasurePool

    objs = samples()[1:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = measure(mini[1], objs, merge(), seed=0, quality="fast")
    finally:
        torch.set_num_threads(threads)
    with RayMeasurePool(None, pool=pool) as mp:
        got = mp.measure(None, objs, merge(), seed=0, quality="fast")
    assert list(got.columns) == list(ref.columns) and list(got.object) == [s.name for s in objs]
    pd.testing.assert_frame_equal(got.drop(columns=TIME_COLS(got)), ref.drop(columns=TIME_COLS(ref)))
    assert len(pool.actors) == 2  # the shared pool was not closed


def test_worker_dying_every_time_raises_after_max_retries(pool, tmp_path):
    with pytest.raises(RuntimeError, match=r"048_hammer.*died 2 times \(max_retries=1\)"):  # 1 try + 1 retry
        evaluate_ray_(pool, tmp_path, {"base": AlwaysCrash()}, samples()[1:], max_retries=1)
    assert not (tmp_path / "results.csv").exists()
    assert len(pool.actors) == 2  # dead actors were replaced: the pool is still usable


def test_error_in_the_work_propagates_without_retry(pool, tmp_path):
    started = pool.stats.actors_started
    with pytest.raises(ValueError, match="bad accelerator settings"):
        evaluate_ray_(pool, tmp_path, {"base": BadMethod()}, samples()[:1])
    assert pool.stats.actors_started == started and not (tmp_path / "results.csv").exists()


def test_pool_rejects_bad_arguments():
    from fs3d_analysis.distributed import ReplicaPool

    with pytest.raises(ValueError, match="num_workers"):
        ReplicaPool(MiniFactory(), num_workers=0)
    with pytest.raises(ValueError, match="max_retries"):
        ReplicaPool(MiniFactory(), max_retries=-1)
    with pytest.raises(TypeError, match="pipe_factory"):
        ReplicaPool("mini")


class _NoVoxel:
    def velocity(self, ctx, compute):
        raise ValueError("the SS stage produced no occupied voxel")


class NoVoxelMethod:
    """A method whose run fails like a thin object on a weak model (a zero row, not a crash)."""

    def __call__(self):
        from fs3d_accel.seams import Accelerator

        return Accelerator(ss_policy=_NoVoxel())


def test_failed_pair_lands_under_the_right_columns(pool, tmp_path):
    """A failed pair's CSV text has fewer columns than a full row; appended after one, every value
    must stay under its own column (found on the GPU run: a shifted row broke the header check)."""
    evaluate_ray_(pool, tmp_path, {"base": lambda: None}, samples()[:1])
    table = evaluate_ray_(pool, tmp_path, {"broken": NoVoxelMethod()}, samples()[:1]).set_index("method")
    assert table.loc["broken", "device"] == "cpu" and table.loc["broken", "f_score"] == 0.0
    assert "no occupied voxel" in table.loc["broken", "error"] and pd.isna(table.loc["broken", "time_total"])
    assert table.loc["base", "time_total"] > 0 and pd.isna(table.loc["base", "error"])


def test_split_evenly_shares_and_bad_input():
    from fs3d_analysis.distributed import split_evenly

    assert split_evenly(range(7), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1, 2], 5) == [[1], [2]]
    with pytest.raises(ValueError, match="parts"):
        split_evenly([1], 0)


def test_one_scene_split_over_actors_keeps_every_object(pool, mini):
    from fs3d_analysis.distributed import reconstruct_scene_split
    from fs3d_analysis.scene import reconstruct_scene

    scene = two_object_scene()
    row = reconstruct_scene_split(pool, scene, seed=0)
    assert row["workers"] == 2 and row["n_objects"] == 2 and [s["objects"] for s in row["shares"]] == ["box0", "box1"]
    assert row["time_total"] >= row["share_time_total_max"] > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # each object alone (a share of one) = the per-object pipeline run
        local = reconstruct_scene(mini[1], scene, seed=0, batch=False)
    finally:
        torch.set_num_threads(threads)
    assert row["n_voxels"] == sum(int(r.ss.coords.shape[0]) for r in local.results)
