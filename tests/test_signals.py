"""Heterogeneity-signal API: registry, plugging signals into carving and aggregation, built-ins."""
import math

import pytest
import torch

from fs3d_accel.accel import SLaTTokenCarving, SpectralTokenAggregation, available_signals, get_signal, register_signal
from fs3d_accel.accel.signals import (PAPER_WEIGHTS, TokenInputs, normal_variation_field, token_signal_values,
                                      unregister_signal)
from fs3d_accel.accel.testing import cube_object, run_sampler, slat_field, ss_latent
from fs3d_accel.seams import EventBus, StepRecord, TransformContext


def _run(policy, steps=6, seed=0):
    logits, coords = cube_object()
    extras = {"coords": coords, "occupancy_logits": logits, "resolution": 16}
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    x0 = torch.randn(coords.shape[0], 8, generator=torch.Generator().manual_seed(seed))
    out = run_sampler(x0, slat_field("nonlinear"), policy, steps=steps, stage="slat", extras=extras, events=bus)
    return out, seen, coords


class _XCoord:
    """A test signal: the token's x coordinate (static)."""

    name, level, static = "test_x", "token", True

    def compute(self, inputs, **kw):
        return inputs.extras["coords"][:, 1].double()


@pytest.fixture
def x_signal():
    register_signal(_XCoord)
    yield
    unregister_signal("test_x")


def test_registry_lists_builtins_by_level_and_rejects_bad_names():
    assert {"M", "A", "S_freq", "NV"} <= set(available_signals("token"))
    assert {"layout_jitter", "update_concentration"} <= set(available_signals("step"))
    assert available_signals("instance") == ["HFER"]
    assert get_signal("S_freq").level == "token"
    with pytest.raises(ValueError, match=r"unknown signal 'nope'; available: \['A', "):
        get_signal("nope")
    with pytest.raises(ValueError, match="'HFER' is a instance-level signal; this place needs a token-level"):
        get_signal("HFER", "token")
    with pytest.raises(ValueError, match="level must be one of"):
        available_signals("pixel")


def test_register_validates_and_refuses_duplicates(x_signal):
    assert "test_x" in available_signals("token")
    with pytest.raises(ValueError, match="'test_x' is already registered"):
        register_signal(_XCoord())

    class NoLevel:
        name = "bad"

        def compute(self, inputs):
            return 0.0

    with pytest.raises(ValueError, match="level must be one of"):
        register_signal(NoLevel())
    with pytest.raises(TypeError, match="non-empty str attribute 'name'"):
        register_signal(type("Anon", (), {"name": "", "level": "token", "compute": lambda s, i: 0})())


def test_default_weights_reproduce_the_paper_selection_exactly():
    base_out, base_seen, _ = _run(SLaTTokenCarving(keep=0.25))
    sig_out, sig_seen, _ = _run(SLaTTokenCarving(keep=0.25, signals=PAPER_WEIGHTS))
    carved = [i for i, e in enumerate(base_seen) if "carving" in e.info]
    assert carved == [2, 3, 4, 5]
    for i in carved:
        a, b = base_seen[i].info["carving"], sig_seen[i].info["carving"]
        assert torch.equal(a["selected"], b["selected"])
        assert torch.equal(a["J"], b["J"])
        assert b["freq_source"] == "signals"
    assert torch.equal(base_out, sig_out)


def test_custom_signal_plugs_into_carving_and_sets_the_selection(x_signal):
    _, seen, coords = _run(SLaTTokenCarving(keep=0.25, max_frozen_steps=100, signals={"test_x": 1.0}))
    _, base_seen, _ = _run(SLaTTokenCarving(keep=0.25, max_frozen_steps=100))
    n = coords.shape[0]
    sel = seen[2].info["carving"]["selected"]
    k = math.ceil(0.25 * n)
    x = coords[:, 1]
    # top-K by x, ties broken towards the higher token index (stable ascending sort freezes the first)
    frozen_expected = torch.argsort(x.double(), stable=True)[: n - k]
    expected = torch.ones(n, dtype=torch.bool)
    expected[frozen_expected] = False
    assert torch.equal(sel, expected)
    assert int(x[sel].min()) >= int(x[~sel].max())
    assert not torch.equal(sel, base_seen[2].info["carving"]["selected"])
    assert torch.equal(seen[2].info["carving"]["test_x"], x.float())


@pytest.mark.parametrize("signals, err, msg", [
    ({}, ValueError, "at least one signal"),
    ({"nope": 1.0}, ValueError, "unknown signal 'nope'"),
    ({"M": -1.0}, ValueError, "weight of signal 'M' must be a finite number >= 0"),
    ({"M": 0.0, "A": 0.0}, ValueError, "all signal weights are 0"),
    ({"layout_jitter": 1.0}, ValueError, "step-level signal"),
])
def test_bad_signal_weights(signals, err, msg):
    with pytest.raises(err, match=msg):
        SLaTTokenCarving(signals=signals)


def test_token_signal_size_mismatch_is_reported():
    class Short:
        name, level = "short", "token"

        def compute(self, inputs, **kw):
            return torch.zeros(3)

    register_signal(Short())
    try:
        inp = TokenInputs(v_prev=torch.ones(5, 2), v_ref=None, extras={})
        with pytest.raises(ValueError, match="'short' returned 3 values for 5 tokens"):
            token_signal_values("short", inp)
    finally:
        unregister_signal("short")


def test_m_and_a_are_the_paper_terms():
    v = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    ref = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    inp = TokenInputs(v_prev=v, v_ref=ref, extras={})
    assert token_signal_values("M", inp).tolist() == [5.0, 1.0]
    assert token_signal_values("A", inp).tolist() == [4.0, 0.0]
    assert token_signal_values("A", TokenInputs(v_prev=v, v_ref=None, extras={})).tolist() == [0.0, 0.0]


def test_normal_variation_is_zero_on_flat_faces_and_largest_at_corners():
    r, lo, hi = 24, 6, 17
    occ = torch.zeros(r, r, r)
    occ[lo:hi + 1, lo:hi + 1, lo:hi + 1] = 1
    nv = normal_variation_field(occ)
    mid = (lo + hi) // 2
    face, edge, corner = float(nv[lo, mid, mid]), float(nv[lo, lo, mid]), float(nv[lo, lo, lo])
    assert face < 1e-9
    assert corner > edge > 0.05
    assert float(nv.min()) >= 0 and float(nv.max()) <= 1
    logits, coords = cube_object()
    inp = TokenInputs(v_prev=None, v_ref=None, extras={"coords": coords, "occupancy_logits": logits})
    vals = token_signal_values("NV", inp)
    assert vals.shape == (coords.shape[0],)
    torch.testing.assert_close(vals, normal_variation_field((logits > 0).double())[tuple(coords[:, 1:].long().T)])


def test_step_signals_on_a_known_history():
    a, b, c = ss_latent(seed=0), ss_latent(seed=1), ss_latent(seed=2)
    hist = [StepRecord(step=i, t=0.0, x=v, v=v, decision="computed") for i, v in enumerate((a, b, c))]

    def lay(v):
        return torch.cat([t.reshape(-1).double() for k, t in v.items() if k != "shape"])

    expected = 0.5 * (float((lay(b) - lay(a)).norm() / (lay(a).norm() + 1e-8))
                      + float((lay(c) - lay(b)).norm() / (lay(b).norm() + 1e-8)))
    ctx = type("Ctx", (), {"history": hist})()
    assert get_signal("layout_jitter").compute(ctx) == pytest.approx(expected, rel=1e-12)

    v0 = torch.zeros(10, 2)
    v1 = torch.zeros(10, 2)
    v1[3, 0] = 3.0
    v1[:, 1] = 1.0  # every token moves 1, token 3 moves sqrt(10)
    hist2 = [StepRecord(0, 0.0, v0, v0, "computed"), StepRecord(1, 0.1, v1, v1, "computed")]
    ctx2 = type("Ctx", (), {"history": hist2})()
    conc = get_signal("update_concentration").compute(ctx2)
    assert conc == pytest.approx(math.sqrt(10) / (math.sqrt(10) + 9), rel=1e-12)


def test_aggregation_takes_a_named_instance_signal():
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = True
    logits = -torch.ones(16, 16, 16)
    logits[4:12, 4:12, 4:12] = 1.0
    ctx = TransformContext(mask=mask, occupancy_logits=logits)
    agg = SpectralTokenAggregation()
    assert get_signal("HFER").compute(ctx, w=agg.w, hfer=agg.hfer) == agg.measure(ctx)["score"]

    class Const:
        name, level = "test_const", "instance"

        def compute(self, ctx, **kw):
            return 0.95

    register_signal(Const())
    try:
        custom = SpectralTokenAggregation(signal="test_const")
        assert custom.measure(ctx) == {"score": 0.95}
        assert custom.decide(100, 16, custom.measure(ctx)) == (1.25, "score")  # >= tau_high: complex
        assert custom.tag.endswith("-test_const")
    finally:
        unregister_signal("test_const")
    with pytest.raises(ValueError, match="'M' is a token-level signal"):
        SpectralTokenAggregation(signal="M")
