"""``fs3d_analysis.profile.idle_attribution``: GPU idle billed to the host code open at each moment, on a hand-made
Chrome trace whose answer is worked out below, and on a real ``torch.profiler`` trace of a CPU call."""
from __future__ import annotations

import gzip
import json

import pytest

from fs3d_analysis.profile import idle_attribution as ia

OUTER = "/x/fs3d_accel/stages/slat.py(10): outer"
INNER = "/x/fs3d_accel/model/sparse.py(5): inner"
LIB = "/usr/lib/torch/foo.py(1): lib"


def _x(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def _trace():
    # GPU: [10, 30] (two overlapping kernels), [50, 60], a copy [70, 75]  -> busy 35 us of the window [0, 100]
    # idle: [0, 10], [30, 50], [60, 70], [75, 100] = 65 us
    return [_x("kernel", "k1", 10, 10, 7), _x("kernel", "k2", 15, 15, 7), _x("kernel", "k3", 50, 10, 7),
            _x("gpu_memcpy", "Memcpy HtoD", 70, 5, 7),
            _x("python_function", OUTER, 0, 100), _x("python_function", INNER, 30, 25),
            _x("python_function", LIB, 35, 10),
            _x("python_function", "/x/fs3d_accel/bg.py(1): other_thread", 0, 5, tid=2),  # not the main thread
            _x("cpu_op", "aten::nonzero", 40, 10), _x("cuda_runtime", "cudaStreamSynchronize", 41, 8),
            {"ph": "i", "cat": "kernel", "name": "instant", "ts": 20}]  # not a complete event: ignored


def test_attribution_splits_the_idle_exactly():
    r = ia.attribute_idle(_trace())
    assert (r.window_us, r.busy_us, r.idle_us) == (100.0, 35.0, 65.0)
    # innermost project frame: `inner` holds [30, 50] (the library frame inside it is not the project's)
    assert r.by_project == {OUTER: 45.0, INNER: 20.0}
    assert r.by_python == {OUTER: 45.0, INNER: 10.0, LIB: 10.0}
    assert r.by_op == {"(no frame)": 55.0, "aten::nonzero": 2.0, "cudaStreamSynchronize": 8.0}
    assert r.by_path == {"slat.py:10 outer": 45.0, "slat.py:10 outer > sparse.py:5 inner": 20.0}
    for table in (r.by_project, r.by_python, r.by_op, r.by_path):
        assert sum(table.values()) == r.idle_us
    rows = r.rows()
    assert rows[0] == {"attribution": "project", "key": "slat.py:10 outer", "idle_ms": 0.045,
                       "share": 45.0 / 65.0}
    assert [x["key"] for x in rows if x["attribution"] == "op"] == ["(no frame)", "cudaStreamSynchronize",
                                                                     "aten::nonzero"]


def test_window_limits_the_idle():
    r = ia.attribute_idle(_trace(), window=(25.0, 65.0))
    # busy in the window: [25, 30] and [50, 60]; idle [30, 50] and [60, 65]
    assert (r.window_us, r.busy_us, r.idle_us) == (40.0, 15.0, 25.0)
    assert r.by_project == {INNER: 20.0, OUTER: 5.0}


def test_intervals_and_names():
    assert ia.busy_intervals(_trace()) == [(10.0, 30.0), (50.0, 60.0), (70.0, 75.0)]
    assert ia.idle_intervals((0, 100), [(-5, 3), (10, 30), (90, 120)]) == [(3, 10), (30, 90)]
    assert ia.idle_intervals((0, 10), []) == [(0, 10)]
    assert ia.short_frame(INNER) == "sparse.py:5 inner" and ia.short_frame("aten::mm") == "aten::mm"
    keep = ia.project_frame()
    assert keep(OUTER) and not keep(LIB) and not keep("aten::mm")
    assert ia.main_thread([]) is None


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="with_stack=True"):
        ia.attribute_idle([_x("kernel", "k", 0, 5)])
    with pytest.raises(ValueError, match="spans no time"):
        ia.idle_intervals((5, 5), [])
    with pytest.raises(ValueError, match="depth must be >= 1"):
        ia.frame_paths([(0, 1)], [], depth=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="no traceEvents"):
        ia.load_trace(bad)


def test_load_trace_reads_gzip(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": _trace()}, fh)
    assert ia.attribute_idle(ia.load_trace(path)).idle_us == 65.0


def test_a_real_cpu_trace_bills_every_idle_microsecond(tmp_path):
    """On the CPU nothing runs on a GPU: the whole window is idle, and the innermost project frame of a profiled call
    is the function that made it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def project_work():
        return torch.randn(64, 64) @ torch.randn(64, 64)

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        project_work()
    path = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(path))
    r = ia.attribute_idle(ia.load_trace(path), keep_project=ia.project_frame(("test_idle_attribution.py",)))
    assert r.busy_us == 0.0 and r.idle_us == pytest.approx(r.window_us)
    assert sum(r.by_project.values()) == pytest.approx(r.idle_us)
    assert any(k.endswith(": project_work") for k in r.by_project)
    assert any(k.startswith("aten::") for k in r.by_op)


def test_part_times_time_each_part_and_its_gpu_wait():
    events = _trace() + [_x("python_function", OUTER, 120, 10)]  # a second, later call of `outer`
    parts = ia.part_times(events, [("inner part", "sparse.py inner"), ("outer part", "slat.py outer"),
                                   ("absent", "slat.py nothing")])
    assert [p.part for p in parts] == ["outer part", "inner part", "absent"]  # by first call
    outer, inner, absent = parts
    # outer: [0, 100] (busy 35) and [120, 130] (busy 0); inner: [30, 55] (busy [50, 55] = 5)
    assert (outer.calls, outer.host_ms, outer.busy_ms, outer.idle_ms) == (2, 0.11, 0.035, 0.075)
    assert (inner.calls, inner.host_ms, inner.busy_ms, inner.idle_ms) == (1, 0.025, 0.005, 0.02)
    assert (absent.calls, absent.host_ms) == (0, 0.0)


def test_rows_keep_the_largest_keys_and_sum_the_rest():
    r = ia.attribute_idle(_trace())
    rows = [x for x in r.rows(top=1) if x["attribution"] == "python"]
    assert [x["key"] for x in rows] == ["slat.py:10 outer", "(2 other keys)"]
    assert rows[1]["idle_ms"] == 0.02 and sum(x["share"] for x in rows) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top must be >= 1"):
        r.rows(top=0)
