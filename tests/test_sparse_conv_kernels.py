"""``benchmarks/sparse_conv_kernels.py``: conv inputs recorded (hooks gone after errors), each algorithm timed and
checked against the fp32 gather result, the report redrawn from its files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import random_coords
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import sparse_conv_kernels as sck  # noqa: E402
from benchmarks.stage_latency import Timer  # noqa: E402
from fs3d_accel.model.sparse import SparseConv3d, SparseTensor  # noqa: E402
from fs3d_accel.model.sparse_conv_triton import interpreting  # noqa: E402


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.point = SparseConv3d(6, 12, 3), SparseConv3d(12, 5, 3), SparseConv3d(5, 5, 1)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.point(self.b(self.a(x)))


def _input() -> SparseTensor:
    coords = random_coords(6, batch=2, frac=0.3)
    return SparseTensor.create(torch.randn(len(coords), 6, generator=torch.Generator().manual_seed(0)), coords)


def test_capture_records_every_3d_conv_and_removes_its_hooks_after_errors():
    net, x = TwoConvs(), _input()
    with torch.no_grad():
        calls = sck.capture_conv_inputs(lambda: net(x), net)
    assert [(name, conv) for name, conv, _ in calls] == [("a", net.a), ("b", net.b)]  # not the 1x1x1 conv
    assert calls[0][2] is x and calls[1][2].num_channels == 12
    def fails():
        net(x)
        raise RuntimeError("boom")

    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        sck.capture_conv_inputs(fails, net)
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_measure_times_each_algorithm_and_reports_its_error(tmp_path):
    net, x = TwoConvs(), _input()
    impls = ("gather", "transform", "implicit") if interpreting() else ("gather", "transform")
    with torch.no_grad():
        calls = sck.capture_conv_inputs(lambda: net(x), net)
        rows = sck.measure("toy", calls, Timer(torch.device("cpu"), 0, 1), impls)
    assert [(r["module"], r["c_in"], r["c_out"], r["rows"]) for r in rows] == [("a", 6, 12, len(x)), ("b", 12, 5, len(x))]
    for r in rows:
        assert r["auto"] == r["before"] == "gather"  # on a CPU both rules give the gather
        assert r["fastest"] in impls and r["gflop"] == pytest.approx(2 * r["rows"] * 27 * r["c_in"] * r["c_out"] / 1e9)
        assert all(r[f"{i}_err"] < 1e-5 and r[f"{i}_ms"] > 0 and r[f"{i}_first_s"] > 0 for i in impls)
        # a CPU has no launch to hide: the kernel time is the host-timed call's
        assert all(r[f"{i}_ms"] == r[f"{i}_call_ms"] for i in impls)
    df = pd.DataFrame(rows)
    table = sck.summary(df, impls)
    assert table.loc[0, "gather (ms)"] == pytest.approx(df["gather_ms"].sum())
    assert table.loc[0, "fastest per call (ms)"] <= min(table.loc[0, f"{i} (ms)"] for i in impls)
    df.to_csv(tmp_path / "sparse_conv_kernels.csv", index=False)
    (tmp_path / "meta.json").write_text(json.dumps({"device": "cpu", "config": "toy", "dtype": "fp32",
                                                    "object": "random", "voxels": len(x)}))
    sck.main(["--replot", str(tmp_path)])
    assert (tmp_path / "sparse_conv_kernels.png").stat().st_size > 0


def test_main_records_the_inputs_with_the_gather_conv(monkeypatch, tmp_path):
    """The recording pass must not run the implicit kernel: its first call (tile tuning, or the on-disk cache)
    belongs to measure()'s ``implicit_first_s``."""
    seen: list[str] = []
    real = sck.capture_conv_inputs

    def spy(run, model):
        def run_and_look():
            import fs3d_accel.model.sparse as sparse  # the use_conv_impl choice in force (on a CPU "auto" is
            seen.append(sparse._conv_impl_override)   # the gather anyway, so the resolved algorithm cannot tell)
            return run()
        return real(run_and_look, model)

    class Recorded(Exception):
        pass

    def stop(*args, **kwargs):
        raise Recorded  # both passes are recorded before anything is measured: stop there

    monkeypatch.setattr(sck, "capture_conv_inputs", spy)
    monkeypatch.setattr(sck, "measure", stop)
    with pytest.raises(Recorded):
        sck.main(["--config", "mini", "--device", "cpu", "--max-voxels", "50", "--warmup", "0", "--repeats", "1",
                  "--out", str(tmp_path)])
    assert seen == ["gather", "gather"]  # the SLaT pass and the mesh-decoder pass
