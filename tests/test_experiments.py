"""Experiment helpers, notebook utilities and figure functions of notebooks 02-05 on tiny inputs."""
from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import trimesh

from fs3d_accel.accel import SpectralTokenAggregation, UniformTokenMerge
from fs3d_accel.model.configs import SamplerConfig
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.seams import Accelerator, StepEvent
from fs3d_analysis import experiments as ex
from fs3d_analysis import notebook_utils as nu
from fs3d_analysis import plots
from fs3d_analysis.record import SLaTUpdateRecorder


@pytest.fixture(scope="module")
def base_run(mini_pipe, scene):
    """One plain run of the session's random mini pipeline (3 + 3 sampler steps)."""
    trace = ex.VelocityTrace()
    rec = SLaTUpdateRecorder(compute_freq=True)
    run = ex.run_with_recorders(mini_pipe, scene, rec, trace)
    return run, trace, rec


# ---------------------------------------------------------------------------------------------
# notebook_utils
# ---------------------------------------------------------------------------------------------


def test_quick_mode_and_pick(monkeypatch):
    monkeypatch.setenv("FS3D_QUICK", "1")
    assert nu.quick_mode() and nu.pick(8, 2) == 2
    monkeypatch.setenv("FS3D_QUICK", "0")
    assert not nu.quick_mode() and nu.pick(8, 2) == 8
    monkeypatch.delenv("FS3D_QUICK")
    assert not nu.quick_mode()
    monkeypatch.setenv("FS3D_QUICK", "maybe")
    with pytest.raises(ValueError, match="FS3D_QUICK"):
        nu.quick_mode()


def test_config_name(monkeypatch):
    monkeypatch.delenv("FS3D_CONFIG", raising=False)
    assert nu.config_name() == "mini"
    monkeypatch.setenv("FS3D_CONFIG", "huge")
    with pytest.raises(ValueError, match="huge"):
        nu.config_name()
    if not torch.cuda.is_available():
        monkeypatch.setenv("FS3D_CONFIG", "full")
        with pytest.raises(ValueError, match="CUDA"):
            nu.config_name()


def test_load_pipeline_without_weights(monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError("weights of 'sam3d-mini' are not in this installation")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: missing()))
    monkeypatch.delenv("FS3D_ALLOW_RANDOM", raising=False)
    with pytest.raises(FileNotFoundError, match="FS3D_ALLOW_RANDOM=1"):
        nu.load_pipeline(config="mini")
    sentinel = object()
    monkeypatch.setattr(nu, "random_pipeline", lambda config, device: sentinel)
    monkeypatch.setenv("FS3D_ALLOW_RANDOM", "1")
    assert nu.load_pipeline(config="mini") is sentinel


def test_set_samplers_and_run_size(monkeypatch):
    pipe = Pipeline.from_config("mini", device="meta")
    nu.set_samplers(pipe, slat_steps=4)
    assert pipe.config.slat_sampler.steps == 4 and pipe.slat.cfg.slat_sampler.steps == 4
    assert pipe.config.slat_sampler.cfg_strength == 1.0 and pipe.config.ss_sampler.steps == 25
    with pytest.raises(ValueError, match="slat_steps"):
        nu.set_samplers(pipe, slat_steps=0)
    monkeypatch.setenv("FS3D_QUICK", "1")
    monkeypatch.delenv("FS3D_SLAT_STEPS", raising=False)
    assert nu.run_size_steps() == (None, nu.QUICK_SLAT_STEPS)
    monkeypatch.setenv("FS3D_SLAT_STEPS", "12")
    assert nu.run_size_steps() == (None, 12)
    monkeypatch.setenv("FS3D_SLAT_STEPS", "x")
    with pytest.raises(ValueError, match="FS3D_SLAT_STEPS"):
        nu.run_size_steps()
    monkeypatch.delenv("FS3D_THREADS", raising=False)
    assert nu.run_size_threads() == 1
    monkeypatch.setenv("FS3D_THREADS", "3")
    assert nu.run_size_threads() == 3
    monkeypatch.setenv("FS3D_QUICK", "0")
    monkeypatch.delenv("FS3D_THREADS")
    assert nu.run_size_threads() is None


# ---------------------------------------------------------------------------------------------
# running stages
# ---------------------------------------------------------------------------------------------


def test_run_stages_matches_pipeline_and_reuses_cache(mini_pipe, base_run):
    run, _, _ = base_run
    ref = mini_pipe.run_prepared(run.inputs, seed=0)
    assert torch.equal(ref.slat.feats, run.slat.feats)
    assert np.array_equal(ref.mesh.vertices, run.mesh.vertices)
    again = ex.run_stages(mini_pipe, run.inputs, ss=run.ss, until="slat")
    assert set(again.timings) == {"slat"} and again.decode is None
    assert torch.equal(again.slat.feats, run.slat.feats)
    with pytest.raises(ValueError, match="until"):
        ex.run_stages(mini_pipe, run.inputs, until="mesh")
    with pytest.raises(ValueError, match="ss output"):
        ex.run_stages(mini_pipe, run.inputs, slat=run.slat)


def test_using_accel_restores_on_error(mini_pipe):
    before = mini_pipe.accel
    with pytest.raises(RuntimeError):
        with ex.using_accel(mini_pipe, Accelerator(name="x")):
            assert mini_pipe.accel.name == "x"
            raise RuntimeError
    assert mini_pipe.accel is before


def test_screen_samples(mini_pipe, scene):
    img, mask, pm = scene
    big = SimpleNamespace(name="big", image=img, mask=mask, pointmap=pm)
    small = SimpleNamespace(name="small", image=img, mask=mask & (np.arange(mask.shape[1]) < 30), pointmap=pm)
    kept, table = ex.screen_samples(mini_pipe, [big, small], n=1, cheapest_first=True)
    assert list(table["object"]) == ["small"] and list(kept) == ["small"]
    kept, table = ex.screen_samples(mini_pipe, [big, small], n=1, cheapest_first=True, prefer=["big"])
    assert list(table["object"]) == ["big"]
    kept, table = ex.screen_samples(mini_pipe, [big], min_tokens=10 ** 9)
    assert kept == {} and not table["kept"].any()


# ---------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------


def test_rel_error_and_occupancy_iou():
    assert ex.rel_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert math.isnan(ex.rel_error(torch.ones(2), torch.zeros(2)))
    assert ex.rel_error({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])},
                        {"a": torch.tensor([0.0]), "b": torch.tensor([4.0])}) == 0.75
    with pytest.raises(ValueError, match="keys"):
        ex.rel_error({"a": torch.ones(1)}, {"b": torch.ones(1)})
    a = torch.tensor([1.0, 1.0, -1.0, -1.0])
    b = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert ex.occupancy_iou(a, b) == pytest.approx(1 / 3)
    assert ex.occupancy_iou(-torch.ones(3), -torch.ones(3)) == 1.0


def test_token_share_for_energy():
    assert ex.token_share_for_energy(np.array([3.0, 4.0]), 0.5) == 0.5  # 16 of 25 >= 12.5
    assert ex.token_share_for_energy(np.array([3.0, 4.0]), 0.9) == 1.0
    assert ex.token_share_for_energy(np.ones(10), 0.5) == 0.5
    assert ex.token_share_for_energy(np.array([0.0, 10.0, 0.0, 0.0]), 0.99) == 0.25
    assert math.isnan(ex.token_share_for_energy(np.zeros(4), 0.5))
    with pytest.raises(ValueError, match="energy"):
        ex.token_share_for_energy(np.ones(3), 0.0)


def test_ss_dynamics_relative_difference():
    traj = pd.DataFrame({"run": 0, "modality": "shape", "step": [0, 1, 2], "v_norm": [2.0, 4.0, 4.0],
                         "dv_norm": [np.nan, 1.0, 2.0]})
    out = ex.ss_dynamics(traj)
    assert np.isnan(out["rel_dv"][0]) and list(out["rel_dv"][1:]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="dv_norm"):
        ex.ss_dynamics(traj.drop(columns="dv_norm"))


def test_cfg_switch_steps():
    assert ex.cfg_switch_steps(SamplerConfig(steps=25, rescale_t=3.0, cfg_strength=7.0)) == [19]
    assert ex.cfg_switch_steps(SamplerConfig(steps=25, cfg_strength=0.0)) == []


def test_mesh_complexity_and_gt_voxels():
    box = trimesh.creation.box((0.9, 0.9, 0.9))
    c = ex.mesh_complexity(box, resolution=16)
    assert c["area_ratio"] == pytest.approx(6 / (36 * math.pi) ** (1 / 3), rel=1e-6)
    assert c["surface_voxels"] > 0
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    assert ex.mesh_complexity(sphere, 16)["area_ratio"] == pytest.approx(1.0, abs=0.01)
    logits = ex.gt_voxel_logits(trimesh.creation.box((0.5, 0.5, 0.5)), 8)
    assert logits.shape == (8, 8, 8) and set(logits.unique().tolist()) == {-1.0, 1.0}
    assert float(logits[4, 4, 4]) == 1.0 and float(logits[0, 0, 0]) == -1.0


def test_mesh_agreement_identity(base_run):
    run, _, _ = base_run
    m = ex.mesh_agreement(run.mesh, run.mesh, n_points=500)
    assert m == {"chamfer": 0.0, "f_score": 100.0}


# ---------------------------------------------------------------------------------------------
# 02 / 03 / 04 / 05 helpers
# ---------------------------------------------------------------------------------------------


def test_ss_cache_run(mini_pipe, base_run):
    run, _, _ = base_run
    # 3 SS steps, k=3 without warm-up: step 0 computed, step 1 extrapolated, step 2 (last) computed
    traj, summary = ex.ss_cache_run(mini_pipe, run.inputs, run.ss, k=3, warmup=0)
    ext = traj[traj["decision"] == "extrapolated"]
    assert set(ext["step"]) == {1} and (ext["rel_err"] > 0).all()
    assert summary["full_steps"] == 2
    # k=1 computes every step: bit-identical to the plain run, no drift
    _, same = ex.ss_cache_run(mini_pipe, run.inputs, run.ss, k=1)
    assert same["rotation_error_deg"] == 0.0 and same["translation_error"] == 0.0
    assert same["occupancy_iou"] == 1.0 and same["shape_latent_rel_err"] == 0.0


def test_extrapolation_sweep_tables(mini_pipe, base_run):
    run, _, _ = base_run
    traj, drift = ex.extrapolation_error_sweep(mini_pipe, run.inputs, ks=(3,), modes=("paper", "released"), warmup=0,
                                               base_ss=run.ss, object="o")
    assert list(drift["mode"]) == ["paper", "released"] and (drift["object"] == "o").all()
    err = ex.extrapolation_error_table(traj)
    assert set(err["mode"]) == {"paper", "released"} and (err["steps"] == 1).all()
    # the shape modality does not depend on the layout mode
    shape = err[err["modality"] == "shape"].set_index("mode")["rel_err_mean"]
    assert shape["paper"] == shape["released"]


def _trace(v: list[torch.Tensor], n: int) -> ex.VelocityTrace:
    tr = ex.VelocityTrace()
    coords = torch.zeros((n, 4), dtype=torch.int32)
    coords[:, 1] = torch.arange(n)
    for s, vs in enumerate(v):
        tr(StepEvent("slat", s, len(v), 0.0, vs, vs, "computed", 1.0, extras={"coords": coords}))
    return tr


def test_saliency_ranking_on_constructed_trace():
    n = 20
    d = torch.linspace(0.1, 2.0, n)[:, None].repeat(1, 8)
    # each token's next update is twice its previous change: A ranks it perfectly
    v = [torch.zeros(n, 8), d, 3 * d, 7 * d]
    rank = ex.saliency_ranking(_trace(v, n), top=0.25)
    a = rank[rank["signal"] == "A"]
    assert list(a["step"]) == [2, 3]
    assert a["spearman"].tolist() == pytest.approx([1.0, 1.0]) and a["topk_recall"].tolist() == [1.0, 1.0]
    assert set(rank["signal"]) == {"J", "M", "A", "S_freq", "random"}
    with pytest.raises(ValueError, match="recorded steps"):
        ex.saliency_ranking(_trace(v[:2], n))


def test_velocity_trace_and_concentration(base_run):
    run, trace, rec = base_run
    assert len(trace.v) == 3 and trace.v[0].shape == run.slat.feats.shape
    conc = ex.update_concentration(rec.tokens_frame(run=0), energies=(0.5, 1.0))
    assert set(conc["key"]) == {"v_norm", "dv_norm"}
    assert (conc.loc[conc["energy"] == 1.0, "token_share"] == 1.0).all()
    assert conc["token_share"].between(0, 1).all()


def test_topk_sweep_keep_all_is_exact(mini_pipe, base_run):
    run, _, _ = base_run
    out = ex.topk_sweep(mini_pipe, run, keeps=(1.0, 0.2))
    assert list(out["keep"]) == [1.0, 0.2]
    exact = out.iloc[0]
    assert exact["slat_rel_err"] == 0.0 and exact["f_score"] == 100.0 and exact["chamfer"] == 0.0
    assert out.iloc[1]["slat_rel_err"] > 0


def test_choose_scales_and_hfer_row(base_run):
    run, _, _ = base_run
    row = ex.hfer_row(run.inputs, run.ss)
    assert 0 <= row["hfer_2d"] <= 1 and 0 <= row["hfer_3d"] <= 1
    assert row["S"] == SpectralTokenAggregation().choose_scale(row["score"])
    table = pd.DataFrame({"object": ["a", "b", "c"], "hfer_2d": [0.8, 0.9, 0.2], "hfer_3d": [0.2, 0.9, 0.2]})
    out = ex.choose_scales(table, w=0.5, tau_low=0.5, tau_high=0.7)
    assert out["score"].tolist() == pytest.approx([0.5, 0.9, 0.2])
    assert out["S"].tolist() == [2.0, 1.25, 2.0]


def test_decode_cache_and_variants(mini_pipe, base_run):
    run, _, _ = base_run
    hfer = pd.DataFrame([{"object": "o", **ex.hfer_row(run.inputs, run.ss)}])
    cache = ex.DecodeCache(mini_pipe, {"o": run})
    variants = {"identity": lambda o: ("S=1", UniformTokenMerge(scale=1.0)),
                **ex.aggregation_variants(hfer, uniform=(2.0,))}
    d = cache.compare(variants).set_index("variant")
    assert d.loc["identity", "f_score"] == 100.0 and d.loc["identity", "tokens_after"] == len(run.slat.coords)
    assert d.loc["uniform S=2", "tokens_after"] < len(run.slat.coords)
    assert d.loc["adaptive", "S"] == hfer["S"][0]
    # adaptive and uniform share the decode of the same S
    assert len(cache._cache) == len({"S=1", f"S={hfer['S'][0]:g}", "S=2"})
    with pytest.raises(ValueError, match="pre-decoder"):
        ex.aggregation_variants(hfer, SpectralTokenAggregation.released())


def test_ablation_factories_and_table():
    fac = ex.ablation_factories()
    assert len(fac) == 8 and "ablation:none" in fac and "ablation:ss+slat+mesh" in fac
    none, full = fac["ablation:none"](), fac["ablation:ss+slat+mesh"]()
    assert none.ss_policy is None and none.slat_policy is None and none.decoder_transform is None
    assert full.ss_policy is not None and full.slat_policy is not None and full.decoder_transform is not None
    only_mesh = fac["ablation:mesh"]()
    assert only_mesh.ss_policy is None and only_mesh.decoder_transform is not None
    summary = pd.DataFrame({"method": ["base", *fac], "f_score": range(9)})
    t = ex.ablation_table(summary)
    assert t["method"].iloc[0] == "ablation:none" and t["method"].iloc[-1] == "ablation:ss+slat+mesh"
    assert t.loc[t["method"] == "ablation:ss+mesh", ["ss", "slat", "mesh"]].values.tolist() == [[True, False, True]]
    assert set(ex.method_factories()) == set(ex.PAPER_METHODS)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _tokens_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for step in range(3):
        for t in range(12):
            rows.append({"run": 0, "step": step, "token": t, "x": t % 4, "y": t // 4, "z": 1,
                         "v_norm": rng.random(), "dv_norm": rng.random() if step else np.nan})
    return pd.DataFrame(rows)


def test_plots_draw_and_check_columns(base_run):
    _, trace, _ = base_run
    dyn = ex.ss_dynamics(pd.DataFrame({"run": 0, "modality": ["shape", "scale"] * 3, "step": [0, 0, 1, 1, 2, 2],
                                       "v_norm": [2.0, 1, 3, 1, 3, 2], "dv_norm": [np.nan, np.nan, 1, 0.5, 0.2, 1],
                                       "cos_prev": [np.nan, np.nan, 0.9, 0.5, 0.99, 0.2], "role": "x"}))
    err = pd.DataFrame({"k": [2, 3, 2, 3], "mode": ["paper"] * 2 + ["released"] * 2, "modality": "shape",
                        "rel_err_mean": [0.1, 0.2, 0.1, 0.3]})
    drift = pd.DataFrame({"k": [2, 4], "mode": "paper", "rotation_error_deg": [1.0, 2],
                          "translation_error_rel": [0.1, 0.2], "occupancy_iou": [0.9, 0.8]})
    step_err = pd.DataFrame({"step": [0, 1], "modality": "shape", "rel_err": [0.0, 0.1],
                             "decision": ["computed", "extrapolated"]})
    tok = _tokens_frame()
    hfer = pd.DataFrame({"object": ["a", "b", "c"], "hfer_2d": [0.2, 0.5, 0.8], "hfer_3d": [0.3, 0.6, 0.9],
                         "score": [0.2, 0.5, 0.8], "area_ratio": [1.0, 1.5, 2.0], "hfer_2d_gt": [0.1, 0.4, 0.9]})
    detail = pd.DataFrame({"object": ["a", "a"], "variant": ["adaptive", "uniform S=2"], "S": [1.5, 2.0],
                           "tokens_before": 10, "tokens_after": [6, 4], "f_score": [99.0, 95.0],
                           "chamfer": [0.01, 0.02]})
    summary = pd.DataFrame({"method": ["base", "fast-sam3d", "ablation:ss"], "speedup": [1.0, 2.0, 1.3],
                            "f_score": [50.0, 48.0, 49.0]})
    figs = [plots.plot_ss_velocity_dynamics(dyn, marks=[1]), plots.plot_extrapolation_error_vs_k(err),
            plots.plot_pose_drift_vs_k(drift), plots.plot_ss_step_error(step_err, marks=[1]),
            plots.plot_update_slices(tok, [1, 2]), plots.plot_update_scatter3d(tok, 1),
            plots.plot_energy_concentration(ex.update_concentration(tok)),
            plots.plot_saliency_ranking(ex.saliency_ranking(trace)),
            plots.plot_topk_tradeoff(pd.DataFrame({"keep": [0.1, 0.2], "slat_rel_err": [0.2, 0.1],
                                                   "time_slat": [1.0, 2], "time_slat_base": 3.0})),
            plots.plot_hfer_distribution(hfer), plots.plot_hfer_vs_complexity(hfer, x="area_ratio", ys=("hfer_2d_gt",)),
            plots.plot_detail_loss(detail), plots.plot_speed_quality(summary, time_note="CPU wall time")]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs)
    plt.close("all")
    with pytest.raises(ValueError, match="lacks columns"):
        plots.plot_pose_drift_vs_k(drift.drop(columns="occupancy_iou"))
    with pytest.raises(ValueError, match="no tokens on the slice"):
        plots.plot_update_slices(tok, [1], index=7)
    with pytest.raises(ValueError, match="empty table"):
        plots.plot_speed_quality(summary.iloc[:0])
