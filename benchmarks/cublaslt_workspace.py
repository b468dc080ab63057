"""Does cuBLASLt queue a memset before the SAM 3D transformers' epilogue GEMMs, and does a zero workspace remove it?

One process per setting (PyTorch reads ``CUBLASLT_WORKSPACE_SIZE`` once per process), e.g. on the GPU machine::

    PYTHONPATH=$PWD python benchmarks/cublaslt_workspace.py
    CUBLASLT_WORKSPACE_SIZE=0 PYTHONPATH=$PWD python benchmarks/cublaslt_workspace.py

For the SLaT torso's GEMM shapes at 14k voxels (M ~ 3.8-4k tokens of the CFG pair; the MLP's 1024 -> 4096 with the
GELU epilogue, its 4096 -> 1024, the 1024 -> 1024 projections, the 1024 -> 3072 QKV) it records 20 calls in a CUDA graph,
times 20 replays (CUDA events: microseconds per GEMM, memsets included) and lists the device events of one replay:
how many memsets it held and which kernel cuBLASLt chose. Session 26's output is in
``results/base_vs_official_h100/session26/cublaslt_workspace.txt``.
"""
import os, torch
from torch.profiler import profile, ProfilerActivity
if not torch.cuda.is_available():  # added after session 26's run (which had a GPU); the timing below is unchanged
    raise SystemExit("cublaslt_workspace.py times cuBLASLt GEMMs in CUDA graphs: it needs a CUDA device")
dev = torch.device("cuda"); torch.manual_seed(0)
res = []
for M in (3788, 4000):
    for (K, N, act) in ((1024, 4096, True), (4096, 1024, False), (1024, 1024, False), (1024, 3072, False)):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16); w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / 32
        b = torch.randn(N, device=dev, dtype=torch.bfloat16)
        f = (lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)) if act else (lambda: torch.addmm(b, x, w.t()))
        for _ in range(3): f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(20): f()
        for _ in range(3): g.replay()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20): g.replay()
        e.record(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay(); torch.cuda.synchronize()
        names = [ev.name for ev in prof.events() if getattr(ev.device_type, "name", "") == "CUDA"]
        res.append(f"M={M} K={K} N={N} gelu={act}: {s.elapsed_time(e)/400*1e3:.1f} us/gemm, memsets {sum('Memset' in n for n in names)}/20, kernel {[n for n in names if 'Memset' not in n][0][:60]}")
print(os.environ.get("CUBLASLT_WORKSPACE_SIZE", "default"), *res, sep="\n  ")
