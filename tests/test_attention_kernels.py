"""``benchmarks/attention_kernels.py``: FLOP count, the report on synthetic rows, CPU refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import attention_kernels as ak  # noqa: E402


def test_flops_of_one_call():
    shape = ak.AttnShape("x", batch=2, q_len=3, kv_len=5, heads=4, head_dim=8)
    assert shape.flops == 4 * 2 * 4 * 3 * 5 * 8


def test_shapes_are_the_full_config():
    from fs3d_accel.model.configs import full_config
    cfg = full_config()
    assert ak.HEADS == cfg.slat_flow.num_heads == cfg.ss_flow.num_heads
    assert ak.HEAD_DIM == cfg.slat_flow.model_channels // cfg.slat_flow.num_heads
    assert ak.SHAPES[0].q_len == cfg.ss_flow.num_shape_tokens


def test_cpu_is_refused():
    with pytest.raises(SystemExit, match="CUDA"):
        ak.main(["--device", "cpu"])


def test_report_marks_the_fastest_and_keeps_refusals(tmp_path):
    rows = [{"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "a", "ms": 2.0, "tflops": 100.0, "max_abs_err": 1e-3},
            {"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "b", "ms": 1.0, "tflops": 200.0, "max_abs_err": 2e-3},
            {"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "c", "error": "RuntimeError: no kernel"},
            {"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "d", "ms": 0.5, "tflops": 400.0, "max_abs_err": 0.5}]
    meta = {"device": "GPU", "torch": "2", "dtype": "bf16", "warmup": 1, "repeats": 2, "flash_impls": []}
    text = ak.write_report(rows, meta, tmp_path)
    assert "| **b** | 1.000 | 200 | 0.002 |" in text and "| a | 2.000 | 100 | 0.001 |" in text
    assert "| c | refused: RuntimeError: no kernel | | |" in text and "none" in text
    assert "| d | 0.500 | 400 | 0.5 (WRONG: above 0.01) |" in text  # fastest, but wrong: not marked
    assert "FlashAttention-4 through the fs3d custom op: not checked" in text
    assert (tmp_path / "attention_kernels.csv").is_file()
