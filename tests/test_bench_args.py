"""Benchmark scripts refuse arguments that would silently measure something else (checked before any GPU work)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(1, str(BENCH))  # ss_stage_time imports its scene module from its own folder, as when run as a script
from benchmarks import fast_path_quality, sparse_conv_kernels, ss_stage_time  # noqa: E402
from benchmarks.stage_latency import synthetic_inputs  # noqa: E402
from benchmarks.synthetic_scene import synthetic_inputs as scene  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--max-voxels", "0"], "--max-voxels must be >= 1"),
    (["--max-voxels", "-5"], "--max-voxels must be >= 1"),  # a negative slice would silently drop voxels
    (["--repeats", "0"], "--repeats >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_sparse_conv_kernels_rejects_bad_counts(argv, message):
    with pytest.raises(SystemExit, match=message):
        sparse_conv_kernels.main(argv + ["--device", "cpu"])


def test_ss_stage_time_rejects_bad_counts_and_needs_cuda():
    with pytest.raises(SystemExit, match="must be >= 1"):
        ss_stage_time.main(["--repeats", "0"])
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA device"):
            ss_stage_time.main([])


def test_fast_path_quality_direct_references_needs_settings(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fast_path_quality.py", "--direct-references"])
    with pytest.raises(SystemExit, match="name the settings too"):
        fast_path_quality.main()


def test_one_synthetic_scene_for_every_benchmark():
    assert synthetic_inputs is scene
    img, mask, pm = scene(32)
    assert img.shape == (32, 32, 3) and mask.sum() == 16 * 11 and pm.shape == (32, 32, 3)
