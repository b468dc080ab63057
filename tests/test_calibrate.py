"""Calibration (search space, constraint, Optuna study, outputs), presets and the adaptive controller."""
import json
import math

import optuna
import pandas as pd
import pytest
import torch

from fs3d_accel.accel import FastSAM3D, SSModalityCache, SLaTTokenCarving, from_preset, make_method
from fs3d_accel.accel.adaptive import AdaptiveCarving, AdaptiveFastSAM3D, AdaptiveSLaTPolicy, AdaptiveSSCache, choose
from fs3d_accel.accel.presets import Preset, load_preset, save_preset
from fs3d_accel.accel.signals import get_signal
from fs3d_accel.accel.testing import mini_harness, run_sampler, slat_field, ss_field, ss_latent
from fs3d_accel.seams import EventBus
from fs3d_analysis import calibrate as cal
from fs3d_analysis.calibrate import QualityConstraint, SearchSpace, calibrate, compare, pareto_mask

# ---------------------------------------------------------------------------------------------
# search space and constraint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, msg", [
    (dict(k=None, beta=None, keep=None, E=None, w=None, tau_low=None, tau_high=None), "empty search space"),
    (dict(keep=(0.5, 0.2)), "keep: low 0.5 > high 0.2"),
    (dict(keep=(0.0, 0.5)), r"keep: bounds \(0.0, 0.5\) leave the valid range \(0.0, 1.0\]"),
    (dict(beta=(0.5, 1.0)), r"beta: bounds .* leave the valid range \[0.0, 1.0\)"),
    (dict(k=(0, 3)), "k: bounds"),
    (dict(k=(1.0, 3.0)), "k: bounds must be integers"),
    (dict(E=(0.0, math.inf)), "bounds must be finite"),
    (dict(w=(0.2,)), r"w: bounds must be a \(low, high\) pair"),
    (dict(tau_low=(0.8, 0.9), tau_high=(0.1, 0.5)), "no tau_low < tau_high possible"),
    (dict(tau_low=(0.75, 0.9), tau_high=None), "no tau_low < tau_high possible"),  # default tau_high 0.7
    (dict(method="taylorseer"), "method must be"),
    (dict(fixed={"ss__k": 2}), r"\['ss__k'\] are both searched and fixed"),
    (dict(fixed={"ss__bogus": 2}), "unknown override 'ss__bogus'"),
])
def test_search_space_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SearchSpace(**kw)


def test_suggest_keeps_tau_low_below_tau_high_and_inside_bounds():
    space = SearchSpace(tau_low=(0.2, 0.8), tau_high=(0.3, 0.9))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = []
    study.optimize(lambda t: points.append(space.suggest(t)) or 0.0, n_trials=150)
    for p in points:
        assert 0.2 <= p["tau_low"] < p["tau_high"] <= 0.9 and p["tau_high"] >= 0.3
        assert isinstance(p["k"], int) and 1 <= p["k"] <= 5
        make_method("fast-sam3d", **space.overrides(p))  # every point builds
    assert min(p["tau_low"] for p in points) < 0.3 and max(p["tau_low"] for p in points) > 0.7


def test_reference_point_is_the_paper_setting_inside_the_ranges():
    assert SearchSpace().reference() == {"k": 3, "beta": 0.7, "keep": 0.1, "E": 1.5, "w": 0.9, "tau_low": 0.5,
                                         "tau_high": 0.7}
    assert SearchSpace(keep=(0.2, 0.5), k=(4, 6)).reference()["keep"] == 0.2
    assert SearchSpace(keep=(0.2, 0.5), k=(4, 6)).reference()["k"] == 4


def test_constraint_and_aggregates():
    c = QualityConstraint(max_f1_drop=0.5, max_viou_drop=0.01)
    assert c.violations(0.25, 0.02) == [-0.25, pytest.approx(0.01)]
    assert c.satisfied(0.5, 0.01) and not c.satisfied(0.51, 0.0) and not c.satisfied(float("nan"), 0.0)
    with pytest.raises(ValueError, match="max_f1_drop must be a finite number >= 0"):
        QualityConstraint(max_f1_drop=-1)
    base = pd.DataFrame({"object": ["a", "b"], "time_total": [2.0, 4.0], "passes": [10.0, 10.0],
                         "ss_passes": [5.0, 5.0], "slat_passes": [5.0, 5.0], "n_decoder_tokens": [100, 100],
                         "f_score": [90.0, 80.0], "volume_iou": [0.5, 0.7]})
    meth = pd.DataFrame({"object": ["b", "a"], "time_total": [1.0, 2.0], "passes": [5.0, 3.0],
                         "ss_passes": [2.0, 2.0], "slat_passes": [3.0, 1.0], "n_decoder_tokens": [50, 50],
                         "f_score": [79.0, 89.0], "volume_iou": [0.69, 0.5]})
    agg = compare(base, meth)
    assert agg["speedup_wall"] == pytest.approx(6.0 / 3.0)
    assert agg["speedup_passes"] == pytest.approx(20.0 / 8.0)
    assert agg["ss_pass_ratio"] == pytest.approx(10 / 4) and agg["slat_pass_ratio"] == pytest.approx(10 / 4)
    assert agg["decoder_token_ratio"] == 2.0
    assert agg["f1_drop"] == pytest.approx(1.0) and agg["viou_drop"] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="different objects"):
        compare(base, meth.iloc[:1])


def test_pareto_mask():
    speed = [1.0, 2.0, 2.0, 3.0, 1.5, float("nan")]
    drop = [0.0, 0.5, 0.4, 2.0, 0.6, 0.0]
    assert pareto_mask(speed, drop).tolist() == [True, False, True, True, False, False]


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

HP = {"k": 4, "beta": 0.6, "keep": 0.3, "E": 0.8, "w": 0.7, "tau_low": 0.3, "tau_high": 0.6}


def test_preset_round_trip_same_hyperparameters_and_behaviour(tmp_path):
    path = save_preset(tmp_path / "p.json", HP, dataset={"name": "shipped"}, constraint={"max_f1_drop": 0.5},
                       measured={"speedup_wall": 1.7, "f1_drop": float("nan")})
    data = json.loads(path.read_text())
    assert data["format"] == "fs3d-accel-preset" and data["measured"]["f1_drop"] is None
    assert load_preset(path).hyperparameters == HP
    acc, acc2 = from_preset(path), FastSAM3D.from_preset(str(path))
    direct = make_method("fast-sam3d", ss__k=4, ss__beta=0.6, carving__keep=0.3, step_cache__threshold=0.8,
                         mesh__w=0.7, mesh__tau_low=0.3, mesh__tau_high=0.6)
    assert acc.describe() == direct.describe() == acc2.describe() and acc.name == direct.name
    ss, slat, mesh = acc.ss_policy, acc.slat_policy, acc.decoder_transform
    assert (ss.k, ss.beta, slat.carving.keep, slat.step_cache.threshold, mesh.w, mesh.tau_low, mesh.tau_high) == \
        (4, 0.6, 0.3, 0.8, 0.7, 0.3, 0.6)
    n = 30
    xyz = torch.randint(0, 8, (n, 3), generator=torch.Generator().manual_seed(0))
    ex = {"coords": torch.cat([torch.zeros(n, 1), xyz], 1).to(torch.int32), "resolution": 8}
    xs = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    sa = run_sampler(xs, slat_field(), acc.slat_policy, steps=9, stage="slat", extras=ex)
    sb = run_sampler(xs, slat_field(), direct.slat_policy, steps=9, stage="slat", extras=ex)
    assert torch.equal(sa, sb) and not torch.equal(sa, run_sampler(xs, slat_field(), None, steps=9, stage="slat"))
    x0 = ss_latent()
    a = run_sampler(x0, ss_field(), acc.ss_policy, steps=9)
    b = run_sampler(x0, ss_field(), direct.ss_policy, steps=9)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preset file"):
        from_preset(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not an accelerator preset"):
        from_preset(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['kk'\]"):
        Preset(hyperparameters={"kk": 1})
    with pytest.raises(ValueError, match=r"\['ss__k'\] given both"):
        Preset(hyperparameters={"k": 2}, overrides={"ss__k": 3})


# ---------------------------------------------------------------------------------------------
# adaptive controller
# ---------------------------------------------------------------------------------------------


def _ss_run(policy, steps=10):
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    out = run_sampler(ss_latent(), ss_field(), policy, steps=steps, events=bus)
    return out, seen


def test_choose_step_function():
    assert [choose(v, (0.1, 0.2), ("a", "b", "c"))[1] for v in (0.05, 0.1, 0.15, 0.2, 0.9)] == list("abbcc")


def test_adaptive_do_nothing_is_bit_identical_on_the_real_mini_networks():
    h = mini_harness()
    ss_base = h.ss_run(None, steps=5)
    ss_same = h.ss_run(AdaptiveSSCache(ks=(1,), thresholds=()), steps=5)
    assert all(torch.equal(ss_base[k], ss_same[k]) for k in ss_base)
    slat_base = h.slat_run(None, steps=5)
    policy = AdaptiveSLaTPolicy(AdaptiveCarving(keeps=(1.0,), thresholds=()), None)
    assert torch.equal(slat_base, h.slat_run(policy, steps=5))
    acc = AdaptiveFastSAM3D(ss=AdaptiveSSCache(ks=(1,), thresholds=()),
                            carving=AdaptiveCarving(keeps=(1.0,), thresholds=()), step_cache=None, mesh=None)
    assert acc.coords_transform is None and acc.decoder_transform is None
    assert torch.equal(slat_base, h.slat_run(acc.slat_policy, steps=5))


def test_single_option_equals_the_fixed_setting():
    a, _ = _ss_run(AdaptiveSSCache(ks=(3,), thresholds=(), beta=0.6))
    b, _ = _ss_run(SSModalityCache(k=3, beta=0.6, warmup=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    net, x0 = slat_field("nonlinear"), torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    ex = {"coords": torch.zeros(30, 4, dtype=torch.int32)}
    tmpl = SLaTTokenCarving(freq_weight=0.0)
    fa = run_sampler(x0, net, AdaptiveCarving(keeps=(0.3,), thresholds=(), carving=tmpl), steps=8, stage="slat",
                     extras=ex)
    fb = run_sampler(x0, net, SLaTTokenCarving(keep=0.3, freq_weight=0.0), steps=8, stage="slat", extras=ex)
    assert torch.equal(fa, fb)


def test_adaptive_ss_picks_k_from_the_warmup_jitter():
    _, seen = _ss_run(SSModalityCache(k=1, warmup=2), steps=10)

    class Ctx:
        history = [type("R", (), {"v": e.v})() for e in seen[:2]]

    jitter = get_signal("layout_jitter").compute(Ctx())
    cases = (((jitter * 0.5, jitter * 2), 3), ((jitter * 2, jitter * 3), 4), ((jitter / 3, jitter / 2), 2))
    for thresholds, k in cases:
        out, ev = _ss_run(AdaptiveSSCache(ks=(4, 3, 2), thresholds=thresholds), steps=10)
        assert ev[2].info["adaptive"]["k"] == k and ev[2].info["adaptive"]["value"] == pytest.approx(jitter)
        full = [e.step for e in ev if e.decision == "computed"]
        assert full == SSModalityCache(k=k, warmup=2).schedule(10)
        ref, _ = _ss_run(SSModalityCache(k=k, warmup=2), steps=10)
        assert all(torch.equal(out[key], ref[key]) for key in out)


def test_adaptive_carving_picks_keep_from_update_concentration():
    net, n = slat_field("nonlinear"), 40
    x0 = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    ex = {"coords": torch.zeros(n, 4, dtype=torch.int32)}
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    tmpl = SLaTTokenCarving(freq_weight=0.0)
    run_sampler(x0, net, AdaptiveCarving(keeps=(0.5, 0.2), thresholds=(0.0,), carving=tmpl), steps=6, stage="slat",
                extras=ex, events=bus)
    assert seen[2].info["adaptive"]["keep"] == 0.2  # any concentration >= 0 selects the second option
    assert seen[2].active_fraction == pytest.approx(math.ceil(0.2 * n) / n)
    conc = seen[2].info["adaptive"]["value"]
    assert 0.1 <= conc <= 1.0
    with pytest.raises(ValueError, match="2 keeps need 1 thresholds, got 0"):
        AdaptiveCarving(keeps=(0.5, 0.2), thresholds=())
    with pytest.raises(ValueError, match="thresholds must increase strictly"):
        AdaptiveSSCache(ks=(4, 3, 2), thresholds=(0.2, 0.1))
    with pytest.raises(ValueError, match="warmup must be >= 2"):
        AdaptiveSSCache(warmup=1)


# ---------------------------------------------------------------------------------------------
# the calibration loop (tiny: 2 trials, 1 object, short samplers)
# ---------------------------------------------------------------------------------------------


def test_calibrate_bad_inputs(mini_pipe, tmp_path):
    with pytest.raises(ValueError, match="n_trials must be >= 1"):
        calibrate(mini_pipe, [object()], n_trials=0, out_dir=tmp_path)
    with pytest.raises(TypeError, match="n_trials must be an int"):
        calibrate(mini_pipe, [object()], n_trials=2.0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one sample"):
        calibrate(mini_pipe, [], n_trials=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="objective must be one of"):
        calibrate(mini_pipe, [object()], n_trials=1, out_dir=tmp_path, objective="flops")


def test_calibrate_tiny_writes_csv_preset_and_plot_and_resumes(mini_pipe, tmp_path, monkeypatch):
    from fs3d_analysis.data import load_shipped_samples

    samples = load_shipped_samples()[:1]
    space = SearchSpace(k=(1, 3), beta=None, keep=(0.2, 1.0), E=None, w=None, tau_low=None, tau_high=None)
    loose = QualityConstraint(max_f1_drop=100.0, max_viou_drop=1.0)
    res = calibrate(mini_pipe, samples, space, loose, n_trials=2, out_dir=tmp_path, seed=0, warmup=False,
                    dataset_name="shipped", figure_paths=[tmp_path / "fig" / "pareto.png"])
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert list(trials["trial"]) == [0, 1] and set(trials["state"]) == {"COMPLETE"}
    assert {"k", "keep", "speedup_wall", "speedup_passes", "f1_drop", "viou_drop", "feasible", "pareto"} <= set(trials)
    assert trials.loc[0, "k"] == 3 and trials.loc[0, "keep"] == pytest.approx(0.2)  # the paper point, moved inside
    objs = pd.read_csv(tmp_path / "trial_objects.csv")
    assert len(objs) == 2 and set(objs["object"]) == {samples[0].name}
    # network passes are exact: 3 SS steps (k=3 with warm-up 2 computes all three), carving keeps >= 20 %
    assert (objs["ss_passes"] == 3).all() and (objs["slat_passes"] <= 3).all()
    assert res.best is not None and trials["feasible"].all()
    best = trials.sort_values(["speedup_wall", "f1_drop"], ascending=[False, True]).iloc[0]
    assert res.best["trial"] == best["trial"]
    preset = load_preset(res.preset_path)
    assert preset.hyperparameters == {"k": int(best["k"]), "keep": pytest.approx(best["keep"])}
    assert preset.dataset["objects"] == [samples[0].name] and preset.constraint["max_f1_drop"] == 100.0
    acc = from_preset(res.preset_path)
    assert acc.ss_policy.k == int(best["k"]) and acc.slat_policy.carving.keep == pytest.approx(best["keep"])
    assert res.pareto_path.stat().st_size > 1000 and (tmp_path / "fig" / "pareto.png").is_file()
    assert (tmp_path / "base.csv").is_file() and (tmp_path / "study.db").is_file()

    # resume: the study already holds 2 trials and the base is cached, so nothing runs again
    monkeypatch.setattr(cal, "measure", lambda *a, **k: pytest.fail("re-ran a finished trial or the base"))
    again = calibrate(mini_pipe, samples, space, loose, n_trials=2, out_dir=tmp_path, seed=0, dataset_name="shipped")
    assert again.best["trial"] == res.best["trial"] and len(again.trials) == 2
    with pytest.raises(ValueError, match="holds a calibration with different settings"):
        calibrate(mini_pipe, samples, space, QualityConstraint(), n_trials=3, out_dir=tmp_path)


def test_cli_rejects_zero_trials_before_loading_a_model():
    from fs3d_accel.cli import main

    with pytest.raises(SystemExit, match="--trials must be >= 1, got 0"):
        main(["calibrate", "--trials", "0", "--weights", "no-such-weights"])


# ---------------------------------------------------------------------------------------------
# method names on the command line: registered names and preset:PATH
# ---------------------------------------------------------------------------------------------


def test_method_factory_builds_fresh_preset_accelerators_named_after_the_file(tmp_path):
    from fs3d_accel.accel.presets import method_factory
    path = save_preset(tmp_path / "ycb.json", {"k": 2, "keep": 0.4})
    factory = method_factory(f"preset:{path}")
    a, b = factory(), factory()
    assert a is not b and a.name == b.name == f"preset:{path}"
    assert a.ss_policy.k == 2 and a.slat_policy.carving.keep == 0.4
    assert method_factory("taylorseer")().name == "taylorseer"


def test_method_factory_rejects_unknown_names_and_bad_presets(tmp_path):
    from fs3d_accel.accel.presets import method_factory
    with pytest.raises(ValueError, match="unknown method 'fast-sam4d'"):
        method_factory("fast-sam4d")
    with pytest.raises(ValueError, match="give the preset file"):
        method_factory("preset:")
    with pytest.raises(FileNotFoundError, match="no preset file"):
        method_factory(f"preset:{tmp_path / 'none.json'}")
    bad = save_preset(tmp_path / "bad.json", {"k": 0})
    with pytest.raises(ValueError, match="k"):
        method_factory(f"preset:{bad}")


def test_calibrate_cli_rejects_a_negative_viou_budget():
    from fs3d_accel.cli import main
    with pytest.raises(SystemExit, match="max_viou_drop must be a finite number >= 0"):
        main(["calibrate", "--max-viou-drop", "-0.1", "--trials", "1"])


def test_shipped_preset_loads_by_name_everywhere():
    from fs3d_accel.accel.presets import method_factory, shipped_presets
    assert "sam3d-mini-ycb" in shipped_presets()
    acc = method_factory("preset:sam3d-mini-ycb")()
    assert acc.name == "preset:sam3d-mini-ycb" and acc.ss_policy.k == 4
    assert abs(acc.slat_policy.carving.keep - 0.6834283796733843) < 1e-12
    assert FastSAM3D.from_preset("sam3d-mini-ycb").ss_policy.k == 4
    with pytest.raises(FileNotFoundError, match="no shipped preset named 'sam3d-maxi'"):
        method_factory("preset:sam3d-maxi")
