"""Process-wide CUDA library settings that must be made before the first GPU work of a process.

cuBLASLt's workspace size is one: PyTorch reads ``CUBLASLT_WORKSPACE_SIZE`` (KiB) once, when it first needs the
workspace, and keeps that size for the process. With a workspace, cuBLASLt's heuristics pick, for several of the SAM 3D
transformers' GEMMs with a bias or GELU epilogue, a kernel with a dynamic tile scheduler whose semaphores are zeroed by a
``cudaMemsetAsync`` before every call; with none (0), the same tile shape with a static scheduler (``..._ssched_...``)
and no memset. On the H100 (session 26, ``benchmarks/results/base_vs_official_h100/session26/``) that removed 1,248
memsets per SLaT call at 14k voxels (each ~1 us of kernel plus ~2 us the graph waits in front of it), and the
GELU-epilogue GEMM of the SLaT MLP ran 4% faster in graph replays. It cannot be a per-call :class:`RunOptions` switch:
the size is fixed per process, so it is offered here and by ``benchmarks/base_vs_official.py --cublaslt-workspace-kib``.
Session 27 timed it in alternating processes (faster in every pair, SS and SLaT) and found the fast path's outputs
unchanged, so ``fs3d --cublaslt-workspace-kib auto`` (the CLI's default) asks for 0 on the GELU-epilogue fast paths on
CUDA (``fs3d_accel.cli.chosen_workspace_kib``).
"""
from __future__ import annotations

import os

import torch

#: the environment variable PyTorch reads (KiB) for its cuBLASLt workspace
CUBLASLT_WORKSPACE_ENV = "CUBLASLT_WORKSPACE_SIZE"


def cublaslt_workspace_kib() -> int | None:
    """The cuBLASLt workspace this process asked for (KiB), or None where it is left to PyTorch's default. Refuses a
    value PyTorch would not read as a size."""
    raw = os.environ.get(CUBLASLT_WORKSPACE_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{CUBLASLT_WORKSPACE_ENV}={raw!r} is not a whole number of KiB") from None
    if value < 0:
        raise ValueError(f"{CUBLASLT_WORKSPACE_ENV}={raw!r}: a workspace size must be >= 0 KiB")
    return value


def set_cublaslt_workspace(kib: int) -> None:
    """Ask for a cuBLASLt workspace of ``kib`` KiB in this process (0: none, so no GEMM needs its workspace zeroed).

    Must run before CUDA is initialised in the process, since PyTorch may already have read the size at the first
    cuBLASLt matmul; where CUDA is initialised and the variable already holds this value, nothing changes. Refuses
    anything but an int >= 0, and a different value once CUDA is initialised (the setting would silently not apply)."""
    if isinstance(kib, bool) or not isinstance(kib, int):
        raise ValueError(f"the cuBLASLt workspace is a whole number of KiB, got {kib!r}")
    if kib < 0:
        raise ValueError(f"the cuBLASLt workspace must be >= 0 KiB, got {kib}")
    if os.environ.get(CUBLASLT_WORKSPACE_ENV) == str(kib):
        return
    if torch.cuda.is_initialized():
        raise RuntimeError(f"set the cuBLASLt workspace ({CUBLASLT_WORKSPACE_ENV}={kib}) before CUDA is initialised: "
                           "PyTorch reads it once per process, so after the first GPU work it may not apply. Set it "
                           "at the start of the process, or export it before starting Python")
    os.environ[CUBLASLT_WORKSPACE_ENV] = str(kib)


__all__ = ["CUBLASLT_WORKSPACE_ENV", "cublaslt_workspace_kib", "set_cublaslt_workspace"]
