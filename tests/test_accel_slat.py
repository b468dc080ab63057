"""SLaT token carving, adaptive step cache and their composition."""
import math

import pytest
import torch

from fs3d_accel.accel import SLaTPolicy, SLaTStepCache, SLaTTokenCarving
from fs3d_accel.accel.slat_carving import saliency, select_frozen
from fs3d_accel.accel.spectral import HFERConfig, voxel_grid, voxel_highfreq_scores
from fs3d_accel.accel.tangent_cache import TangentCacheRule
from fs3d_accel.accel.testing import cube_object, mini_harness, run_sampler, slat_field
from fs3d_accel.seams import EventBus


def _run(policy, net, n=None, steps=8, extras=None, seed=0):
    extras = extras or {}
    n = n or (extras["coords"].shape[0] if "coords" in extras else 12)
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    x0 = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    out = run_sampler(x0, net, policy, steps=steps, stage="slat", extras=extras, events=bus)
    return out, seen


def test_constant_field_selects_by_frequency_alone():
    logits, coords = cube_object()
    n = coords.shape[0]
    extras = {"coords": coords, "occupancy_logits": logits, "resolution": 16}
    calls = []
    net = slat_field("constant")

    def counting(x, t, active):
        calls.append(None if active is None else active.clone())
        return net(x, t, active)

    policy = SLaTTokenCarving(keep=0.25, max_frozen_steps=100)
    _, seen = _run(policy, counting, steps=4, extras=extras)
    cfg = HFERConfig.paper()
    s = voxel_highfreq_scores(voxel_grid(logits, cfg), coords, cfg.cutoff_3d)
    assert float(s.max() - s.min()) > 0.1  # corners/edges differ from faces: the test has signal
    info = seen[2].info["carving"]
    assert seen[2].decision == "carved"
    sel = info["selected"]
    assert int(sel.sum()) == math.ceil(0.25 * n)
    assert torch.equal(info["M"], torch.full((n,), math.sqrt(8.0)))   # constant field: M, A flat
    assert torch.equal(info["A"], torch.zeros(n))
    torch.testing.assert_close(info["J"].double(), 0.5 * s / (1 + 1e-6), rtol=0, atol=1e-6)
    assert float(s[sel].min()) >= float(s[~sel].max())                 # top-K by S_freq
    assert torch.equal(calls[2], torch.nonzero(sel).flatten())           # only selected rows computed
    assert calls[0] is None and calls[1] is None                          # before start_step: full


def test_frozen_tokens_reuse_previous_velocity_and_streak_is_bounded():
    n = 40
    policy = SLaTTokenCarving(keep=0.1, freq_weight=0.0, max_frozen_steps=3)
    _, seen = _run(policy, slat_field("nonlinear"), n=n, steps=14)
    streak = torch.zeros(n, dtype=torch.long)
    for prev, e in zip(seen, seen[1:]):
        if "carving" not in e.info:
            continue
        sel = e.info["carving"]["selected"]
        assert torch.equal(e.v[~sel], prev.v[~sel])
        streak = torch.where(sel, torch.zeros_like(streak), streak + 1)
        assert int(streak.max()) <= 3
    assert any(e.decision == "carved" for e in seen)


def test_select_frozen_released_streak_rule():
    j = torch.tensor([0.0, 0.1, 0.2, 0.9])
    frozen, streak = select_frozen(j, 2, torch.tensor([0, 4, 0, 0]), 4)
    assert frozen.tolist() == [True, False, False, False]  # token 1 hit the cap and is refreshed
    assert streak.tolist() == [1, 0, 0, 0]


def test_saliency_weights_paper_and_released():
    v = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    s = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    paper = saliency(v, ref, s, gamma=1.0, freq_weight=0.5, magnitude_weight=1.0)
    eps = 1 + 1e-6 / 2  # min-max denominators: 2 + 1e-6 (M, A) and 1 + 1e-6 (S)
    torch.testing.assert_close(paper["J"], torch.tensor([0.5 + 0.0, 0.5 * (1 / eps + 1 / eps), 0.5 * (0.5 / eps + 0.5 / (1 + 1e-6))], dtype=torch.float64), rtol=0, atol=1e-5)
    rel = saliency(v, ref, s, gamma=0.7, freq_weight=0.3, magnitude_weight=0.3)
    torch.testing.assert_close(rel["J"], 0.3 * rel["S_freq"] + 0.49 * rel["A_hat"] + 0.21 * rel["M_hat"])


def test_released_ratio_semantics():
    assert SLaTTokenCarving.released(carve_ratio=0.1).num_frozen(100) == 10
    assert SLaTTokenCarving.released(carve_ratio=0.15).num_frozen(7) == 1
    assert SLaTTokenCarving(keep=0.1).num_frozen(100) == 90
    assert SLaTTokenCarving(keep=0.1).num_frozen(7) == 6
    assert SLaTTokenCarving(keep=1.0).num_frozen(7) == 0


@pytest.mark.parametrize("kw, err, msg", [
    (dict(keep=0.0), ValueError, r"keep must be in \(0.0, 1.0\]"),
    (dict(keep=1.5), ValueError, r"keep must be in \(0.0, 1.0\]"),
    (dict(keep=0.1, carve_ratio=0.1), ValueError, "either keep"),
    (dict(carve_ratio=1.0), ValueError, r"carve_ratio must be in \[0.0, 1.0\)"),
    (dict(gamma=-1.0), ValueError, "gamma must be >= 0"),
    (dict(freq_weight=1.2), ValueError, "freq_weight must be in"),
    (dict(max_frozen_steps=-1), ValueError, "max_frozen_steps must be >= 0"),
    (dict(change_reference="x"), ValueError, "change_reference must be one of"),
])
def test_carving_bad_hyperparameters(kw, err, msg):
    with pytest.raises(err, match=msg):
        SLaTTokenCarving(**kw)


def test_step_cache_bad_hyperparameters():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        SLaTStepCache(threshold=-0.1)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        SLaTStepCache(warmup=-2)
    with pytest.raises(ValueError, match="mode must be one of"):
        SLaTStepCache(mode="fast")


def test_missing_coords_is_a_clear_error():
    with pytest.raises(ValueError, match="extras\\['coords'\\]"):
        _run(SLaTTokenCarving(keep=0.5), slat_field(), n=10, steps=4)


@pytest.mark.parametrize("mode, first_skip", [("paper", 2), ("released", 3)])
def test_step_cache_skips_with_cached_tangent(mode, first_skip):
    policy = SLaTStepCache(threshold=1e9, warmup=0, mode=mode)
    _, seen = _run(policy, slat_field("nonlinear"), n=10, steps=8)
    decisions = [e.decision for e in seen]
    assert decisions == ["computed"] * first_skip + ["cached"] * (8 - first_skip)
    last_full = seen[first_skip - 1]
    tangent = last_full.v - last_full.x
    for e in seen[first_skip:]:
        torch.testing.assert_close(e.v, e.x + tangent, rtol=0, atol=0)


def test_step_cache_error_increment_matches_definition():
    rule = TangentCacheRule(threshold=1e9, warmup=0, variant="easycache")
    policy = SLaTStepCache(threshold=1e9, warmup=0, mode="paper")
    _, seen = _run(policy, slat_field("nonlinear"), n=10, steps=5)
    x0, x1, x2 = seen[0].x, seen[1].x, seen[2].x
    v0, v1 = seen[0].v, seen[1].v
    d = lambda a, b: float((a.double() - b.double()).abs().mean())  # noqa: E731
    k = d(v1, v0) / (d(x1, x0) + 1e-8)
    inc = k * d(x2, x1) / (float(v1.double().abs().mean()) + 1e-6)
    assert seen[2].info["step_cache"]["increment"] == pytest.approx(inc, rel=1e-9)
    assert rule.variant == "easycache"


def test_threshold_refresh_resets_error():
    th = 0.6
    _, seen = _run(SLaTStepCache(threshold=th, warmup=2, mode="paper"), slat_field("nonlinear"), n=10, steps=16)
    decisions = [e.decision for e in seen]
    assert "cached" in decisions and decisions.count("computed") > 3
    for e in seen[2:]:
        err = e.info["step_cache"]["error"]
        assert (err < th) == (e.decision == "cached")


def test_do_nothing_bit_identical_and_no_state_leak():
    net = slat_field("nonlinear")
    base, _ = _run(None, net, n=16, steps=9)
    for policy in (SLaTPolicy(), SLaTPolicy(SLaTTokenCarving(keep=1.0), SLaTStepCache(threshold=0.0)),
                   SLaTTokenCarving(carve_ratio=0.0), SLaTTokenCarving(keep=0.5, max_frozen_steps=0),
                   SLaTStepCache(threshold=0.0)):
        same, _ = _run(policy, net, n=16, steps=9, extras={"coords": torch.zeros(16, 4, dtype=torch.int32)})
        assert torch.equal(base, same), policy
    policy = SLaTPolicy(SLaTTokenCarving(keep=0.3, freq_weight=0.0), SLaTStepCache(threshold=0.3, warmup=2))
    _run(policy, net, n=23, steps=9, seed=5)  # another object with another token count
    reused, _ = _run(policy, net, n=16, steps=9)
    fresh, _ = _run(SLaTPolicy(SLaTTokenCarving(keep=0.3, freq_weight=0.0), SLaTStepCache(threshold=0.3, warmup=2)),
                    net, n=16, steps=9)
    assert torch.equal(reused, fresh)


def test_composed_policy_carves_only_computed_steps():
    policy = SLaTPolicy(SLaTTokenCarving(keep=0.5, freq_weight=0.0), SLaTStepCache(threshold=0.6, warmup=2))
    _, seen = _run(policy, slat_field("nonlinear"), n=20, steps=16)
    decisions = {e.decision for e in seen}
    assert {"carved", "cached"} <= decisions
    for e in seen:
        if e.decision == "cached":
            assert "carving" not in e.info
        if e.decision == "carved":
            assert e.active_fraction == pytest.approx(int(e.info["carving"]["selected"].sum()) / 20)


def test_mini_pipeline_slat_do_nothing_and_carving():
    h = mini_harness()
    base = h.slat_run(None, steps=4)
    same = h.slat_run(SLaTPolicy(SLaTTokenCarving(keep=1.0), SLaTStepCache(threshold=0.0)), steps=4)
    assert torch.equal(base, same)
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    fast = h.slat_run(SLaTPolicy(SLaTTokenCarving(keep=0.25), None), steps=4, events=bus)
    n = h.ss.coords.shape[0]
    assert [e.decision for e in seen] == ["computed", "computed", "carved", "carved"]
    assert seen[2].active_fraction == pytest.approx(math.ceil(0.25 * n) / n)
    assert seen[2].info["carving"]["freq_source"] == "occupancy"
    assert torch.isfinite(fast).all() and not torch.equal(fast, base)
