"""Decision traces recorded on one run are replayed with the same amount of network work."""
import torch

from fs3d_accel.accel.replay import DecisionRecorder, DecisionTrace, ReplayPolicy, load_traces, replay_accelerator, save_traces
from fs3d_accel.model.configs import SamplerConfig
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.seams import EventBus


def _count_net(calls):
    def net(x, t, active):
        calls.append(None if active is None else int(active.numel()))
        return (x if active is None else x[active]) * 0 + t
    return net


def test_replay_matches_recorded_work_and_roundtrips(tmp_path):
    steps = [("computed", 1.0), ("extrapolated", 0.0), ("carved", 0.25), ("cached", 0.0), ("computed", 1.0)]
    trace = DecisionTrace(method="m", object="o", ss=[], slat=steps,
                          decoder_transform={"kind": "merge", "S": 2.0, "placement": "pre_decoder"})
    save_traces([trace], tmp_path / "t.json")
    (back,) = load_traces(tmp_path / "t.json")
    assert back == trace
    calls = []
    bus = EventBus()
    rec = DecisionRecorder("m", "o")
    bus.subscribe(rec)
    acc = replay_accelerator(back)
    EulerFlowSampler(SamplerConfig(steps=5), "slat").sample(torch.zeros(8, 2), _count_net(calls), acc.slat_policy, bus)
    assert calls == [None, 2, None]
    assert [d for d, _ in rec.trace.slat] == [d for d, _ in steps]
    assert acc.decoder_transform.scale == 2.0 and acc.coords_transform is None


def test_replay_rejects_wrong_step_count():
    import pytest
    with pytest.raises(ValueError, match="trace has 2 slat steps"):
        EulerFlowSampler(SamplerConfig(steps=3), "slat").sample(
            torch.zeros(4, 2), lambda x, t, a: x, ReplayPolicy([("computed", 1.0)] * 2))
