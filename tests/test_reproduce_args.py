"""`fs3d reproduce` argument checks: every bad combination fails before a notebook runs."""
from __future__ import annotations

import pytest
import torch

from fs3d_accel.cli import main
from fs3d_analysis.report import reproduce


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="tpu"), "device must be 'cpu' or 'cuda'"),
    (dict(device="cpu", config="huge"), "config must be 'mini' or 'full'"),
    (dict(device="cpu", config="full"), "config 'full' needs --device cuda"),
    (dict(device="cpu", weights="sam3d-base"), "use the embedded 'sam3d-mini'"),
    (dict(device="cpu", config="mini", allow_random=True), "--allow-random only applies to config 'full'"),
])
def test_reproduce_rejects_bad_arguments_before_running(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reproduce(out_dir=tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_reproduce_on_cuda_without_a_gpu_says_so(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        reproduce(out_dir=tmp_path / "r", device="cuda", config="mini")


def test_reproduce_full_without_checkpoint_needs_allow_random(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the checkpoint check on any machine
    monkeypatch.delenv("FS3D_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="--allow-random"):
        reproduce(out_dir=tmp_path / "r", device="cuda")
    assert not (tmp_path / "r").exists()


def test_cli_turns_reproduce_errors_into_a_clean_exit(tmp_path):
    with pytest.raises(SystemExit, match="fs3d reproduce: config 'full' needs --device cuda"):
        main(["reproduce", "--config", "full", "--out", str(tmp_path / "r")])
