"""Recorders: SS trajectories, SLaT update maps, HFER per object."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fs3d_accel.accel import ShadowPolicy, SLaTTokenCarving, SpectralTokenAggregation, SSModalityCache
from fs3d_accel.accel.testing import mini_harness, run_sampler, slat_field, ss_field, ss_latent
from fs3d_accel.seams import EventBus, SparseTokens, StageEvent, TransformContext
from fs3d_analysis.record import HFERRecorder, SLaTUpdateRecorder, SSTrajectoryRecorder


def test_ss_trajectory_rows_values_and_shadow_error():
    bus = EventBus()
    rec = SSTrajectoryRecorder(method="ssc")
    seen = []
    with bus.listening(rec, seen.append):
        run_sampler(ss_latent(), ss_field("nonlinear"), ShadowPolicy(SSModalityCache(k=3, warmup=2)), steps=7,
                    events=bus)
    assert len(bus) == 0                                    # detached after the run
    df = rec.to_frame()
    assert len(df) == 7 * 5 and set(df["modality"]) == set(ss_latent())
    assert (df["method"] == "ssc").all() and (df["run"] == 0).all()
    assert set(df.loc[df.modality == "shape", "role"]) == {"shape"}
    assert set(df.loc[df.modality != "shape", "role"]) == {"layout"}
    shape = df[df.modality == "shape"].set_index("step")
    v = {e.step: e.v["shape"].double().reshape(-1) for e in seen}
    assert shape.loc[3, "v_norm"] == pytest.approx(float(v[3].norm()))
    assert shape.loc[3, "dv_norm"] == pytest.approx(float((v[3] - v[2]).norm()))
    assert shape.loc[3, "d2v_norm"] == pytest.approx(float((v[3] - 2 * v[2] + v[1]).norm()))
    assert shape.loc[3, "cos_prev"] == pytest.approx(float(v[3] @ v[2] / (v[3].norm() * v[2].norm())))
    assert math.isnan(shape.loc[0, "dv_norm"]) and math.isnan(shape.loc[1, "d2v_norm"])
    assert list(shape["decision"]) == ["computed", "computed", "extrapolated", "extrapolated", "computed",
                                       "extrapolated", "computed"]
    assert (shape.loc[shape.decision == "computed", "err_norm"] == 0).all()
    assert (shape.loc[shape.decision == "extrapolated", "err_norm"] > 0).all()
    # a second object is a new run
    with bus.listening(rec):
        run_sampler(ss_latent(seed=1), ss_field(), None, steps=3, events=bus)
    df = rec.to_frame()
    assert sorted(df["run"].unique()) == [0, 1] and df[df.run == 1]["err_norm"].isna().all()


def _cube():
    logits = -torch.ones(12, 12, 12)
    logits[3:9, 3:9, 3:9] = 1.0
    xyz = torch.nonzero(logits > 0).to(torch.int32)
    return logits, torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)


def test_slat_update_maps_from_carving_policy():
    logits, coords = _cube()
    n = coords.shape[0]
    extras = {"coords": coords, "occupancy_logits": logits, "resolution": 12}
    bus = EventBus()
    rec = SLaTUpdateRecorder(obj="cube")
    x0 = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    with rec.attach(bus):
        run_sampler(x0, slat_field(), ShadowPolicy(SLaTTokenCarving(keep=0.2)), steps=5, stage="slat", extras=extras,
                    events=bus)
    df = rec.to_frame()
    assert list(df["step"]) == list(range(5)) and (df["obj"] == "cube").all()
    assert list(df["decision"]) == ["computed", "computed", "carved", "carved", "carved"]
    assert df.loc[2, "n_selected"] == math.ceil(0.2 * n) and df.loc[0, "n_selected"] == n
    arr = rec.arrays[(0, 2)]
    assert set(arr) == {"v_norm", "dv_norm", "M", "A", "S_freq", "J", "selected", "err_norm"}
    assert arr["selected"].dtype == bool and arr["selected"].sum() == math.ceil(0.2 * n)
    assert np.isnan(rec.arrays[(0, 0)]["dv_norm"]).all() and "M" not in rec.arrays[(0, 0)]
    assert np.allclose(rec.arrays[(0, 0)]["err_norm"], 0)
    long = rec.tokens_frame()
    assert len(long) == 5 * n and {"x", "y", "z", "J"} <= set(long.columns)
    vol = rec.volume("J", step=2)
    assert vol.shape == (9, 9, 9) and np.isnan(vol[0, 0, 0])
    c = coords[5]
    assert vol[c[1], c[2], c[3]] == pytest.approx(arr["J"][5])


def test_slat_recorder_computes_frequency_for_plain_runs():
    logits, coords = _cube()
    bus = EventBus()
    rec = SLaTUpdateRecorder(compute_freq=True)
    with rec.attach(bus):
        run_sampler(torch.zeros(coords.shape[0], 8), slat_field(), None, steps=2, stage="slat",
                    extras={"coords": coords, "occupancy_logits": logits}, events=bus)
    s = rec.arrays[(0, 0)]["S_freq"]
    assert s.min() == 0.0 and s.max() == pytest.approx(1.0) and not np.isnan(rec.to_frame()["S_freq_mean"]).any()


def test_hfer_recorder_rows_from_stage_events():
    t = SpectralTokenAggregation()
    logits, coords = _cube()
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 10:20] = True
    tokens = SparseTokens(coords=coords, resolution=12, feats=torch.randn(coords.shape[0], 8))
    _, state = t.reduce(tokens, TransformContext(mask=mask, occupancy_logits=logits))
    bus = EventBus()
    rec = HFERRecorder(method="fast-sam3d")
    with rec.attach(bus):
        bus.emit(StageEvent("ss", "start"))
        bus.emit(StageEvent("slat", "end", {"output": SimpleNamespace(coords_state=SimpleNamespace(info={}, scale=1.0))}))
        bus.emit(StageEvent("decode", "end", {"output": SimpleNamespace(decoder_state=state)}))
    df = rec.to_frame()
    assert len(df) == 1                                   # the empty coords state is skipped
    row = df.iloc[0]
    assert row["slot"] == "decoder_transform" and row["run"] == 0 and row["method"] == "fast-sam3d"
    assert row["S"] == state.scale and row["tokens_before"] == coords.shape[0]
    assert row["score"] == pytest.approx(0.9 * row["hfer_2d"] + 0.1 * row["hfer_3d"])
    out = rec.measure(mask, logits, obj="box")
    assert rec.to_frame().iloc[-1]["slot"] == "measure" and out["hfer_2d"] == pytest.approx(row["hfer_2d"])


def test_recorders_on_mini_pipeline_events():
    h = mini_harness()
    bus = EventBus()
    ss_rec, slat_rec = SSTrajectoryRecorder(), SLaTUpdateRecorder(compute_freq=True)
    with bus.listening(ss_rec, slat_rec):
        h.ss_run(ShadowPolicy(SSModalityCache(k=2, warmup=1)), steps=3, events=bus)
        h.slat_run(SLaTTokenCarving(keep=0.5), steps=3, events=bus)
    ss_df, slat_df = ss_rec.to_frame(), slat_rec.to_frame()
    assert len(ss_df) == 3 * 5 and ss_df["err_norm"].notna().all()
    assert list(slat_df["decision"]) == ["computed", "computed", "carved"]
    assert slat_df["n_tokens"].iloc[0] == h.ss.coords.shape[0]
