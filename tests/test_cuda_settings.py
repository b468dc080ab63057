"""``fs3d_accel.cuda_settings``: the process-wide cuBLASLt workspace, set only while it can still apply."""
from __future__ import annotations

import pytest
import torch

from fs3d_accel import cuda_settings as cs


def test_unset_means_pytorchs_default(env):
    assert cs.cublaslt_workspace_kib() is None
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, " ")
    assert cs.cublaslt_workspace_kib() is None


def test_set_before_cuda_writes_the_variable_pytorch_reads(env):
    env.setattr(torch.cuda, "is_initialized", lambda: False)
    cs.set_cublaslt_workspace(0)
    assert cs.cublaslt_workspace_kib() == 0
    cs.set_cublaslt_workspace(4096)
    assert cs.cublaslt_workspace_kib() == 4096


def test_after_cuda_is_initialised_only_the_value_already_set_is_accepted(env):
    env.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before CUDA is initialised"):
        cs.set_cublaslt_workspace(0)
    assert cs.cublaslt_workspace_kib() is None  # nothing written
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, "0")
    cs.set_cublaslt_workspace(0)  # already in force: nothing to change
    with pytest.raises(RuntimeError, match="CUBLASLT_WORKSPACE_SIZE=1024"):
        cs.set_cublaslt_workspace(1024)


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True, None])
def test_bad_sizes_are_refused(env, bad):
    with pytest.raises(ValueError, match="KiB"):
        cs.set_cublaslt_workspace(bad)


@pytest.mark.parametrize("raw", ["big", "-4", "1.5"])
def test_an_exported_value_pytorch_would_not_read_is_refused(env, raw):
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, raw)
    with pytest.raises(ValueError, match=cs.CUBLASLT_WORKSPACE_ENV):
        cs.cublaslt_workspace_kib()
