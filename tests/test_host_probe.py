"""``fs3d_analysis.profile.host_probe``: the fixed mix of host work timed before each benchmark unit."""
from __future__ import annotations

import statistics

import pytest
import torch

from fs3d_analysis.profile import host_probe as hp


def test_probe_times_its_mix_per_operation(monkeypatch):
    """The per-operation value is each round's time over its 3 x ops operations, and the probe reads their median."""
    ticks = iter([0.0, 0.0006, 1.0, 1.0009, 2.0, 2.0003])  # three rounds of 100 iterations: 600, 900, 300 us
    monkeypatch.setattr(hp.time, "perf_counter", lambda: next(ticks))
    calls = []
    real = torch.empty
    monkeypatch.setattr(hp.torch, "empty", lambda *a, **k: calls.append(a) or real(*a, **k))
    probe = hp.probe_host("cpu", ops=100, repeats=3)
    assert len(calls) == 300  # every iteration allocates
    assert probe.repeats_us == pytest.approx((2.0, 3.0, 1.0))  # us per op: 600 / 300, 900 / 300, 300 / 300
    assert probe.us_per_op == pytest.approx(statistics.median(probe.repeats_us)) == pytest.approx(2.0)


def test_a_real_probe_is_positive():
    probe = hp.probe_host(torch.device("cpu"), ops=20, repeats=3)
    assert len(probe.repeats_us) == 3 and all(v > 0 for v in probe.repeats_us) and probe.us_per_op > 0


@pytest.mark.parametrize("kw, message", [({"ops": 0}, "ops must be an int >= 1"), ({"ops": True}, "ops must be"),
                                         ({"repeats": 0}, "repeats must be an int >= 1"),
                                         ({"repeats": 2.5}, "repeats must be")])
def test_bad_arguments_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        hp.probe_host("cpu", **kw)
