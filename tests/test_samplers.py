"""Sampler schedules, CFG and the step-policy seam, on analytic velocity fields."""
import math

import pytest
import torch

from fs3d_accel.model.configs import SamplerConfig, full_config
from fs3d_accel.samplers import EulerFlowSampler, cfg_active, count_network_passes, guided, time_grid
from fs3d_accel.seams import EventBus, IdentityPolicy, StepEvent


def test_time_grid_identity_and_rescale():
    assert time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    g = time_grid(25, 3.0)
    assert g[0] == 0.0 and g[-1] == 1.0
    # t / (1 + (r-1)(1-t)) at t = 0.5, r = 3 -> 0.25
    assert math.isclose(time_grid(2, 3.0)[1], 0.25)
    assert all(a < b for a, b in zip(g, g[1:]))


def test_official_schedules_pass_counts():
    cfg = full_config()
    # performance anchors: SS 44 passes (19 guided steps x 2 + 6), SLaT 38 (13 x 2 + 12)
    assert count_network_passes(cfg.ss_sampler) == 44
    assert count_network_passes(cfg.slat_sampler) == 38


def test_cfg_interval_and_formula():
    cfg = SamplerConfig(steps=4, cfg_strength=2.0, cfg_interval=(0.0, 500.0))
    assert cfg_active(cfg, 0.5) and not cfg_active(cfg, 0.75)
    calls = []

    def net(x, t, active, uncond):
        calls.append(uncond)
        return x * 0 + (1.0 if not uncond else 3.0)

    v = guided(net, cfg)(torch.zeros(2), 0.25, None)
    assert torch.equal(v, torch.full((2,), (1 + 2.0) * 1.0 - 2.0 * 3.0))
    assert calls == [False, True]
    calls.clear()
    guided(net, cfg)(torch.zeros(2), 0.75, None)
    assert calls == [False]


def test_euler_integrates_constant_velocity_exactly():
    s = EulerFlowSampler(SamplerConfig(steps=5, rescale_t=3.0), "slat")
    x = s.sample(torch.zeros(3, 2), lambda x, t, a: torch.ones_like(x))
    assert torch.allclose(x, torch.ones(3, 2), atol=1e-6)


def test_identity_policy_bit_identical_and_events():
    s = EulerFlowSampler(SamplerConfig(steps=6), "ss")
    net = lambda x, t, a: {k: torch.sin(v * 3 + t) for k, v in x.items()}
    x0 = {"a": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), "b": torch.ones(1, 1)}
    bus = EventBus()
    seen: list[StepEvent] = []
    bus.subscribe(seen.append)
    plain = s.sample(x0, net)
    ident = s.sample(x0, net, IdentityPolicy(), bus)
    assert all(torch.equal(plain[k], ident[k]) for k in plain)
    assert [e.step for e in seen] == list(range(6))
    assert all(e.decision == "computed" and e.active_fraction == 1.0 for e in seen)


class _BadShape:
    def velocity(self, ctx, compute):
        return compute()[:1]


class _NoCompute:
    def velocity(self, ctx, compute):
        ctx.decision = "extrapolated"
        return torch.zeros_like(ctx.x)


def test_policy_shape_errors_and_skip_decision():
    s = EulerFlowSampler(SamplerConfig(steps=3), "slat")
    with pytest.raises(ValueError, match="velocity shape"):
        s.sample(torch.zeros(4, 2), lambda x, t, a: x, _BadShape())
    bus = EventBus()
    seen = []
    with bus.listening(seen.append):
        out = s.sample(torch.ones(4, 2), lambda x, t, a: x, _NoCompute(), bus)
    assert torch.equal(out, torch.ones(4, 2))
    assert {e.decision for e in seen} == {"extrapolated"}
    assert len(bus) == 0


def test_carved_compute_reports_fraction():
    class Half:
        def velocity(self, ctx, compute):
            idx = torch.arange(0, ctx.x.shape[0], 2)
            v = torch.zeros_like(ctx.x)
            v[idx] = compute(idx)
            return v

    seen = []
    bus = EventBus()
    bus.subscribe(seen.append)
    EulerFlowSampler(SamplerConfig(steps=2), "slat").sample(torch.zeros(10, 2), lambda x, t, a: x[a] + 1, Half(), bus)
    assert [e.decision for e in seen] == ["carved", "carved"]
    assert seen[0].active_fraction == pytest.approx(0.5)


def test_listener_removed_after_exception():
    bus = EventBus()
    with pytest.raises(RuntimeError):
        with bus.listening(lambda e: None):
            raise RuntimeError("boom")
    assert len(bus) == 0
