"""Ray path of the calibration: ``calibrate(..., measure_fn=RayMeasurePool(...).measure)`` and
``fs3d calibrate --ray --workers N``.

Runs on a local 2-CPU Ray cluster with the fast mini pipeline (3 sampler steps, sparsified occupancy)
rebuilt bit for bit in every actor, 2 shipped objects and 2 trials: the Ray-measured trials must carry
exactly the serial trials' quality columns (timing columns aside).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from fs3d_analysis.distributed import ray_available

needs_ray = pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install 'fs3d[ray]')")

import conftest  # noqa: E402
from conftest import fast_mini_config  # noqa: E402
from fs3d_accel.accel.presets import load_preset  # noqa: E402
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_analysis.calibrate import QualityConstraint, SearchSpace, calibrate  # noqa: E402
from fs3d_analysis.data import load_shipped_samples  # noqa: E402

SPACE = SearchSpace(k=(1, 3), beta=None, keep=(0.2, 1.0), E=None, w=None, tau_low=None, tau_high=None)
LOOSE = QualityConstraint(max_f1_drop=100.0, max_viou_drop=1.0)
#: columns that depend on wall time (``pareto`` ranks by ``speedup_wall``)
TIMING = ("speedup_wall", "time_total", "duration_s", "pareto")


def quality(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=[c for c in table.columns if c in TIMING or c.startswith("time_")])


def samples():
    return load_shipped_samples()[:2]  # what `fs3d calibrate --dataset shipped` takes with limit 2


def never(*args, **kwargs):
    pytest.fail("re-measured a finished trial or the cached base")


@dataclass(frozen=True)
class MiniFactory:
    """The conftest ``mini_pipe`` rebuilt in an actor: ``shift`` is what ``sparsify_occupancy``
    subtracted from the SS decoder's output bias."""

    shift: float

    def __call__(self, device: str = "cpu") -> Pipeline:
        pipe = Pipeline.from_config(fast_mini_config(), seed=0, device=device)
        with torch.no_grad():
            pipe.ss.decoder.out_layer[2].bias -= torch.tensor(self.shift, dtype=torch.float32)
        return pipe


@pytest.fixture(scope="module")
def factory(mini_pipe):
    fresh = Pipeline.from_config(fast_mini_config(), seed=0)
    f = MiniFactory(float((fresh.ss.decoder.out_layer[2].bias - mini_pipe.ss.decoder.out_layer[2].bias).item()))
    assert torch.equal(f().ss.decoder.out_layer[2].bias, mini_pipe.ss.decoder.out_layer[2].bias)
    return f


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster shared by the tests (the pools only add actors to it)."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(conftest)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@needs_ray
def test_ray_measured_trials_equal_the_serial_ones_and_resume(ray_cluster, mini_pipe, factory, tmp_path):
    from fs3d_analysis.distributed import RayMeasurePool

    objs = samples()
    kw = dict(n_trials=2, seed=0, warmup=False, dataset_name="shipped")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as in a CPU actor
    try:
        ref = calibrate(mini_pipe, objs, SPACE, LOOSE, out_dir=tmp_path / "serial", **kw)
    finally:
        torch.set_num_threads(threads)
    with RayMeasurePool(factory, 2, use_gpu=False) as pool:  # not warmed: no timing is compared here
        got = calibrate(mini_pipe, objs, SPACE, LOOSE, out_dir=tmp_path / "ray", measure_fn=pool.measure, **kw)
        assert pool.pool.stats.finished == 3 * len(objs) and pool.pool.stats.retries == 0  # base + 2 trials

    assert list(got.trials["trial"]) == [0, 1] and set(got.trials["state"]) == {"COMPLETE"}
    assert got.trials.loc[0, "k"] == 3 and got.trials.loc[0, "keep"] == pytest.approx(0.2)  # enqueued paper point
    pd.testing.assert_frame_equal(quality(got.trials), quality(ref.trials))
    pd.testing.assert_frame_equal(quality(got.objects), quality(ref.objects))
    pd.testing.assert_frame_equal(quality(got.base), quality(ref.base))
    assert list(got.objects["object"]) == [s.name for s in objs] * 2
    assert (got.objects["time_total"] > 0).all() and (got.base["time_total"] > 0).all()
    for name in ("study.db", "base.csv", "trials.csv", "trial_objects.csv", "pareto.png", "preset.json"):
        assert (tmp_path / "ray" / name).is_file(), name

    # resuming does not depend on how the trials were measured: nothing runs again
    again = calibrate(mini_pipe, objs, SPACE, LOOSE, out_dir=tmp_path / "ray", measure_fn=never, **kw)
    assert len(again.trials) == 2 and again.best["trial"] == got.best["trial"]
    pd.testing.assert_frame_equal(quality(again.trials), quality(got.trials))


@needs_ray
def test_cli_ray_workers_runs_end_to_end(ray_cluster, mini_pipe, factory, tmp_path, monkeypatch, capsys):
    from fs3d_accel import cli
    from fs3d_analysis.distributed import CliPipeFactory, RayMeasurePool

    made, warmed = [], []
    real_from_args, real_warmup = CliPipeFactory.from_args, RayMeasurePool.warmup

    def from_args(args):  # the real factory's sam3d-mini (25 steps) takes ~8 s per object on one core
        made.append(real_from_args(args))
        return factory

    def warmup(self, sample, seed=0):
        warmed.append(sample.name)
        return real_warmup(self, sample, seed)

    monkeypatch.setattr(CliPipeFactory, "from_args", staticmethod(from_args))
    monkeypatch.setattr(RayMeasurePool, "warmup", warmup)
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: mini_pipe)
    args = cli.build_parser().parse_args(["calibrate", "--ray", "--workers", "2", "--trials", "2",
                                          "--max-f1-drop", "100", "--out", str(tmp_path)])
    args.limit, args.max_viou_drop = 2, 1.0  # no flags for these; calibrate.main reads them when present
    assert args.fn(args) == 0

    assert made == [CliPipeFactory(weights="sam3d-mini", checkpoint=None, config=None)]
    assert warmed == [samples()[0].name]  # once, before the search
    out = capsys.readouterr().out
    assert "measuring on 2 Ray workers (cpu)" in out and "preset" in out
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert list(trials["trial"]) == [0, 1] and set(trials["state"]) == {"COMPLETE"}
    assert set(pd.read_csv(tmp_path / "trial_objects.csv")["object"]) == {s.name for s in samples()}
    assert (tmp_path / "study.db").is_file() and (tmp_path / "base.csv").is_file()
    preset = load_preset(tmp_path / "preset.json")
    assert set(preset.hyperparameters) == set(SearchSpace().names)
    assert preset.dataset["objects"] == [s.name for s in samples()]


@pytest.mark.parametrize("argv, msg", [
    (["--workers", "2"], "--workers 2 needs --ray"),
    (["--ray", "--workers", "0"], "--workers must be >= 1, got 0"),
    (["--ray", "--workers", "-1"], "--workers must be >= 1, got -1"),
])
def test_cli_rejects_bad_workers_before_loading_a_model(argv, msg):
    from fs3d_accel.cli import main

    with pytest.raises(SystemExit, match=msg):
        main(["calibrate", *argv, "--weights", "no-such-weights"])


def test_calibrate_rejects_a_measure_fn_that_is_not_callable(tmp_path):
    with pytest.raises(TypeError, match="measure_fn must be callable"):
        calibrate(None, [object()], n_trials=1, out_dir=tmp_path, measure_fn="ray")
