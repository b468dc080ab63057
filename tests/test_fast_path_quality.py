"""``benchmarks/fast_path_quality.py``: one-switch references pulled in, and the one-switch table on synthetic rows."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import fast_path_quality as fpq  # noqa: E402

S = fpq.SHORT


def test_references_come_before_the_settings_that_need_them():
    got = fpq.with_references(["fp32", S["compile-all-zkv"], S["bf16-cfg-zkv"], S["compile-all"]])
    assert got == ["fp32", S["bf16-cfg-kv"], S["compile-all"], S["compile-all-zkv"], S["bf16-cfg-zkv"]]
    assert fpq.with_references(["fp32", "fp32"]) == ["fp32"]


def test_direct_references_leave_out_the_chain():
    gt, fa4 = S["compile-all-zkv-fa4-slat-ro-gt"], S["compile-all-zkv-fa4-slat-ro"]
    assert fpq.with_references(["fp32", gt], chain=False) == ["fp32", fa4, gt]
    assert fpq.with_references(["fp32", gt]) == ["fp32", S["bf16-cfg-kv"], S["compile-all"], S["compile-all-zkv"],
                                                 fa4, gt]


def test_one_switch_table(tmp_path, monkeypatch):
    rows = []
    for setting, f1, iou, voxels in (("fp32", 50.0, 0.5, 100), (S["bf16-cfg-kv"], 49.0, 0.48, 101),
                                     (S["bf16-cfg-zkv"], 49.0, 0.48, 101)):
        for obj, shift in (("a", 0.0), ("b", 1.0)):
            rows.append({"setting": setting, "dataset": "d", "object": obj, "f_score": f1 + shift,
                         "volume_iou": iou, "chamfer": 0.1, "box_iou_3d": 0.5, "n_voxels": voxels})
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    fpq.write_report(pd.DataFrame(rows), tmp_path, SimpleNamespace(device="cpu", seed=0, datasets="d"))
    text = (tmp_path / "fast_path_quality.md").read_text()
    assert (f"| {S['bf16-cfg-zkv']} | {S['bf16-cfg-kv']} | +0.000 | 0.000 | +0.0000 | 0.0000 | 0 of 2 |") in text
    assert f"| {S['bf16-cfg-kv']} | 49.5000 | 0.4800 | 0.1000 | 0.5000 | 1.000 | 0.0200 | 2 of 2 |" in text
    assert "cuBLASLt workspace" not in text
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "0")  # a run that set it says so
    fpq.write_report(pd.DataFrame(rows), tmp_path, SimpleNamespace(device="cpu", seed=0, datasets="d"))
    assert "cuBLASLt workspace: 0 KiB for every setting" in (tmp_path / "fast_path_quality.md").read_text()
