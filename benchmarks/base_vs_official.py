"""The OFFICIAL SAM 3D Objects modules next to our pipeline, per stage, in one process on one device.

Same random weights (ours, with the zero-initialised layers filled in by ``perturb_zero_inits`` so that every layer
reaches the compared outputs, -> ``pipe.state_dicts('official')`` -> strict official load, as in
``parity_official.py``), same condition tokens, same noise and the same voxels (surface voxels of
real YCB scans, ``benchmarks/data/ycb_surface_coords_r64.npz``), at the official dimensions
(``--config full``). Timed units:

==========  ==================================================================================
stage       what one call does
==========  ==================================================================================
ss          SS generator sampler: 25 Euler steps with CFG 7 on t <= 0.5 (44 network passes);
            official ``ShortCut(CFG(SparseStructureFlowTdfyWrapper))`` vs our ``EulerFlowSampler``
            + ``SSStage.velocity_net`` (condition K/V cache and CFG batching included in the time)
slat        SLaT generator sampler at N voxels: 25 steps, CFG 1 on t <= 0.5 (38 passes);
            official ``FlowMatching(CFG(SLatFlowModelTdfyWrapper))`` vs ours
mesh        mesh decoder network (sparse swin transformer + 2 subdivisions, 101 output channels;
            the official ``to_representation`` / our mesh extraction are not timed)
==========  ==================================================================================

Variants: ``official`` runs the official modules as the official pipeline runs them on a GPU
(``InferencePipeline.sample_sparse_structure`` / ``sample_slat`` / ``decode_slat`` with
``pipeline.yaml``'s ``dtype: float16``): SS generator fp32 weights under fp16 autocast; SLaT generator
with the yaml's ``use_fp16: true`` (fp16 torso) under fp16 autocast; mesh decoder with ``use_fp16: true``,
no autocast. ``official-compile`` adds what ``pipeline.yaml``'s ``compile_model: true`` does to the
timed stages: ``torch.compile(ss_generator.reverse_fn.inner_forward, mode=--official-compile-mode,
fullgraph=True, dynamic=False)`` (SS stage only). That is the official pipeline's default, so the per-object table
gives ``official-compile`` the ``official`` SLaT and mesh-decoder times of its round and a second speedup column
against it. On the H100, ``max-autotune`` had not finished compiling after 9 minutes (session 9);
``--official-compile-mode reduce-overhead`` (the same CUDA graphs, cuBLAS GEMMs) compiles in 1-3 minutes and
stands in for it. Every other name is one of our
``stage_latency.py`` variants (``RunOptions``). On a CPU (smoke test) the official modules run in fp32.

Per unit: official seconds, ours seconds, speedup vs official, MFU (model FLOPs of the unit, counted
once with FlopCounterMode on our fp32 network with the present-neighbour sparse conv, over the bf16
matmul peak measured in the same run, both from ``stage_latency.py``), peak memory
(``torch.cuda.max_memory_allocated`` over the timed calls, only that stage's network resident) and
the largest difference of the output from the official one. Timing: one first call (includes
compilation and autotuning, reported separately), ``--warmup`` untimed calls, then the median of
``--repeats`` calls timed with CUDA events (perf_counter on CPU).

Official code on the GPU: dense attention (SS flow) through the official ``sdpa`` backend
(``ATTN_BACKEND=sdpa``); sparse attention (SLaT, mesh decoder) through the official ``flash_attn`` path,
as the official pipeline selects it on an H100, with ``flash_attn`` provided by
``official_flash_shim.py`` (exact SDPA per group of equal-length segments; flash_attn is not installable
there). ``--official-attn sdpa`` uses the official ``masked_sdpa`` instead (a dense N x N block-diagonal
mask: far slower and N^2 memory, not what the pipeline runs). Sparse convolutions through spconv-triton, registered as ``spconv`` /
``spconv.pytorch`` by :func:`setup_spconv`. On a CPU the official spconv SubMConv3d layers compute
through ``parity_official.subm_conv_reference`` (spconv-triton has no CPU kernels; spconv's CPU build
cannot add biases), so CPU timings of the official SLaT / mesh stages are meaningless: the CPU run
proves the import chain, the wiring and the output agreement only.

The GPU machine has no registry: the official source, the HF yamls and the official code's pure-python
dependencies travel as ``.whl/official.tar.xz`` (~1.1 MB, git-ignored; layout ``sam-3d-objects/``
(sam3d_objects + OFFICIAL_COMMIT), ``hf/`` (the 4 yamls + pipeline.yaml), ``deps/`` (hydra-core 1.3.2,
omegaconf 2.3.1, antlr4-python3-runtime 4.9.3, PyYAML 6.0.4 without its C extension, optree 0.20.0 for
cp311 + cp312, loguru, einops, easydict, astor, plyfile, spconv-triton 1.0.0); see ``README.txt`` inside).
The dinov2 checkout is not needed (no condition fuser of the official code is built). GPU call
(carry ``.whl/official.tar.xz``)::

    mkdir -p /tmp/off && tar xJf .whl/official.tar.xz -C /tmp/off && \
    export PYTHONPATH=/tmp/off/deps:$PWD FS3D_OFFICIAL=/tmp/off/sam-3d-objects FS3D_HF_CONFIGS=/tmp/off/hf \
           ATTN_BACKEND=sdpa TRITON_CACHE_DIR=/tmp/triton && \
    cd benchmarks && timeout 570 python base_vs_official.py --device cuda --config full --out $OUT/bvo

CPU smoke test (same import chain: unpack the bundle, PYTHONPATH=<bundle>/deps:<repo>)::

    python benchmarks/base_vs_official.py --device cpu --config mini --steps 2 --max-voxels 200 \
        --objects 021_bleach_cleanser --variants official,fp32,bf16-cfg-kv --warmup 0 --repeats 1 --out /tmp/bvo

MFU (executed) divides the FLOPs a unit actually executes instead: our samplers counted once per unit, run uncompiled
in fp32 with the same FLOP-changing switches (:func:`counting_options`): the condition K/V cache computes the K/V once
per object, the one-key K/V of the zero condition skips the unconditional branch's attention over L keys, and the
one-key projection also its ``to_q`` and all but one row of its ``to_out``. MFU
counts those skipped FLOPs as done, so it overstates the hardware's utilisation of those variants.

``--rounds R`` times every unit R times, round after round, and takes each speedup within its round (the host-bound
official time drifts within a lease). ``--gpu-busy`` adds GPU busy, every kernel (``kernels.csv``), a kernel-class
table and ``kernel_classes.png``, and where in the profiled call the GPU waited (``idle.csv``: idle share per tenth of
the call, longest idle stretches and the host events open in them). ``python base_vs_official.py --replot FOLDER`` re-renders a finished run's
README and figures from its CSVs, without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import parity_official as po  # noqa: E402
from fs3d_accel.cuda_settings import cublaslt_workspace_kib, set_cublaslt_workspace  # noqa: E402
from fs3d_accel.model.attention_kernels import FA4_KERNEL_CALL  # noqa: E402
from fs3d_accel.model.random_weights import perturb_zero_inits  # noqa: E402
from fs3d_analysis.profile.latency import cuda_graph_recordings, sync_device  # noqa: E402
from fs3d_analysis.profile.gc_pauses import GCPauses, freeze_after_warmup  # noqa: E402
from fs3d_analysis.profile.host_probe import probe_host  # noqa: E402
from fs3d_analysis.profile.busy import (KERNEL_CLASSES, IdleGap, KernelTime, Timeline, kernel_class,  # noqa: E402
                                        kernel_time)
from fs3d_analysis.profile.shape_only import skip_heavy_ops  # noqa: E402
from benchmarks.stage_latency import (COORDS_FILE, FLOP_CLASSES, SHORT, Timer, add_conv_args,  # noqa: E402
                                      apply_conv_args, count_flops, count_flops_by_class, load_coords,
                                      record_matmul_peak,
                                      synthetic_inputs, variant_label, variant_options)

OFFICIAL_VARIANTS = ("official", "official-compile")
STAGES = ("ss", "slat", "mesh")
STAGE_LABELS = {"ss": "SS generator sampler", "slat": "SLaT generator sampler", "mesh": "mesh decoder network"}
DEFAULT_OBJECTS = "021_bleach_cleanser,007_tuna_fish_can,013_apple"  # N = 5,192 / 14,171 / 20,581 at 64^3
#: the headline pair first: a run cut short by the time limit keeps official vs our fastest exact path
DEFAULT_VARIANTS = "official,compile-all-zkv,compile-all,bf16-cfg-kv,official-like"
#: official HF yamls that parity_official.official_yamls() reads
HF_FILES = ("ss_generator.yaml", "slat_generator.yaml", "ss_decoder.yaml", "slat_decoder_mesh.yaml")
CSV_NAME, README_NAME, FIG_NAME = "base_vs_official.csv", "README.md", "base_vs_official.png"
KERNELS_CSV_NAME, KERNEL_FIG_NAME, IDLE_CSV_NAME = "kernels.csv", "kernel_classes.png", "idle.csv"
COLUMNS = ["round", "variant", "stage", "object", "N", "median_s", "min_s", "first_call_s", "n", "speedup_vs_official",
           "model_tflop", "achieved_tflops", "mfu", "executed_tflop", "mfu_executed", "kernel_s", "mfu_kernels",
           "round_peak_tflops", "mfu_executed_round_peak", "launches", "gpu_busy",
           "graphs_recorded_per_call", "peak_mem_gb", "resident_gb",
           "gc_per_call", "gc_gen2_per_call", "gc_ms_per_call", "gc_longest_ms", "host_probe_us",
           "max_abs_vs_official", "rel_vs_official", "max_abs_vs_first", "precision", "error"]


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def _known_objects() -> list[str]:
    import numpy as np
    return sorted(np.load(COORDS_FILE).files)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--config", default="full", help="full (official dims) or mini (parity_config(): CPU smoke test)")
    ap.add_argument("--objects", default=DEFAULT_OBJECTS, help="comma list of YCB objects (SLaT and mesh stages)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first call")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls (median reported)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every unit this many times, round after round (all variants in each round). The "
                         "official code is host-bound and its time drifts within a lease; a speedup taken within "
                         "one round compares calls minutes apart, and the spread over rounds shows the drift. "
                         "--gpu-busy profiles in round 1 only")
    ap.add_argument("--order", choices=ROUND_ORDERS, default="alternate",
                    help="the variants' order per round: 'fixed' (as listed, every round) or 'alternate' (as listed in "
                         "odd rounds, reversed in even ones), so that a drift of the machine within a round does not "
                         "always favour the same variants")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma list of {list(OFFICIAL_VARIANTS)} and our stage_latency variants {sorted(SHORT)}; "
                         "ours may name FA4 tiles per site: NAME@SITE=TILES[+SITE=TILES], e.g. "
                         "compile-all-zkv-fa4-ro@ss.self=128x128+slat=192x128")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {list(STAGES)}")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps of both samplers (default: 25, official)")
    ap.add_argument("--max-voxels", type=int, default=None,
                    help="keep at most this many voxels per object (a random subset; CPU smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official-precision", default="auto", choices=["auto", "pipeline", "fp32"],
                    help="pipeline: fp16 torsos + fp16 autocast as the official pipeline runs (the default on "
                         "CUDA); fp32: everything fp32, no autocast (the default on CPU)")
    ap.add_argument("--official-compile-mode", default="max-autotune",
                    help="torch.compile mode of the official-compile variant (pipeline.yaml's _compile: max-autotune, "
                         "which did not finish compiling in 9 min on an H100; reduce-overhead stands in for it)")
    ap.add_argument("--official", type=Path, default=po.DEFAULT_OFFICIAL,
                    help="sam-3d-objects checkout (folder holding sam3d_objects/); env FS3D_OFFICIAL")
    ap.add_argument("--hf-configs", type=Path, default=po.DEFAULT_HF,
                    help="folder of the official HF yamls; env FS3D_HF_CONFIGS")
    ap.add_argument("--official-attn", default="flash-shim", choices=["flash-shim", "sdpa"],
                    help="official sparse attention: flash-shim = the official flash_attn path served by SDPA per "
                         "group of equal-length segments (official_flash_shim.py; flash_attn is not installable "
                         "there), sdpa = the official masked_sdpa (dense N x N block-diagonal mask)")
    ap.add_argument("--official-convs", default="spconv", choices=["spconv", "reference"],
                    help="official SubMConv3d arithmetic on CUDA: spconv (spconv-triton, timed as the pipeline "
                         "would run) or reference (parity_official.subm_conv_reference: exact float64 coordinate "
                         "lookup, for parity checks; slow). CPU always uses the reference")
    ap.add_argument("--tf32", default="on", choices=["on", "off"],
                    help="TF32 tensor cores for fp32 matmuls/convs on CUDA (on: as stage_latency.py; off: fp32 "
                         "parity at full fp32 precision)")
    add_conv_args(ap)  # our SparseConv3d algorithm (auto: see SparseConv3d)
    ap.add_argument("--peak-every-round", action="store_true",
                    help="measure the matmul peak again before every round after the first (a power-limited H100's "
                         "short measurement moves by 5-7%% within a lease): each round's own peak is in the "
                         "round_peak_tflops column, and MFU stays against the largest measurement of the run")
    ap.add_argument("--cublaslt-workspace-kib", type=int, default=None,
                    help="cuBLASLt workspace for the whole process (KiB; fs3d_accel.cuda_settings): 0 makes cuBLASLt "
                         "pick its static-scheduler GEMMs, which need no memset before each call (default: "
                         "PyTorch's, 32 MiB on Hopper, or CUBLASLT_WORKSPACE_SIZE where exported)")
    ap.add_argument("--python-gc", default="on", choices=["on", "frozen"],
                    help="Python's garbage collector during the timed calls: on (as Python leaves it), or frozen: "
                         "gc.freeze() after each unit's first call, so the collections of the timed calls skip every "
                         "object alive after compiling (fs3d_analysis.profile.gc_pauses). Either way the collections "
                         "inside the warm-up and timed calls are recorded (gc_* columns)")
    ap.add_argument("--gpu-busy", action="store_true",
                    help="profile one more call per unit and report its summed kernel time over the median wall "
                         "time (GPU busy; far below 100%% means the call waits on the host), every kernel "
                         "(kernels.csv) and where in the call the GPU waited (idle.csv). CUDA only")
    ap.add_argument("--flops-only", action="store_true",
                    help="no timing: model and executed FLOPs of every variant and unit (products skipped, "
                         "shapes kept: fs3d_analysis.profile.shape_only), to flops.csv; runs on a CPU at full size "
                         "in minutes, for any variant")
    ap.add_argument("--out", type=Path, default=Path("runs/base_vs_official"))
    return ap


def _split(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SystemExit(f"--{what}: empty list")
    dup = sorted({v for v in items if items.count(v) > 1})
    if dup:
        raise SystemExit(f"--{what}: listed twice: {dup}")
    return items


def parse_args(argv: list[str] | None = None, check_cuda: bool = True) -> argparse.Namespace:
    """Parse and validate; every error is a SystemExit with a message naming the argument."""
    args = build_parser().parse_args(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"--device: {exc}") from None
    if dev.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda[:N] or cpu, got {args.device!r}")
    if dev.type == "cuda" and check_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu for the smoke test)")
    args.device = dev
    if args.gpu_busy and dev.type != "cuda":
        raise SystemExit("--gpu-busy: kernel time apart from wall time exists on a CUDA device only")
    if args.official_precision == "auto":
        args.official_precision = "pipeline" if dev.type == "cuda" else "fp32"
    if args.config not in ("full", "mini"):
        raise SystemExit(f"--config must be 'full' or 'mini', got {args.config!r}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if args.cublaslt_workspace_kib is not None and args.cublaslt_workspace_kib < 0:
        raise SystemExit(f"--cublaslt-workspace-kib must be >= 0 KiB, got {args.cublaslt_workspace_kib}")
    if args.flops_only and (args.gpu_busy or args.rounds > 1):
        raise SystemExit("--flops-only times nothing: --gpu-busy and --rounds do not apply")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.max_voxels is not None and args.max_voxels < 1:
        raise SystemExit(f"--max-voxels must be >= 1, got {args.max_voxels}")
    if args.gather_chunk is not None and args.gather_chunk < 1:
        raise SystemExit(f"--gather-chunk must be >= 1 element, got {args.gather_chunk}")
    args.stages = _split(args.stages, "stages")
    bad = sorted(set(args.stages) - set(STAGES))
    if bad:
        raise SystemExit(f"--stages: unknown {bad}; choose from {list(STAGES)}")
    args.stages = [s for s in STAGES if s in args.stages]
    args.objects = _split(args.objects, "objects")
    known = _known_objects()
    bad = sorted(set(args.objects) - set(known))
    if bad:
        raise SystemExit(f"--objects: {bad} not in {COORDS_FILE.name} (has {known})")
    variants = _split(args.variants, "variants")
    ours = [v for v in variants if v not in OFFICIAL_VARIANTS]
    for v in ours:
        try:
            variant_options(v)
        except ValueError as exc:
            raise SystemExit(f"--variants {v}: {exc} (or one of {list(OFFICIAL_VARIANTS)})") from None
    for v in variants:
        if args.flops_only:
            break  # nothing runs as the variant: its FLOPs are counted uncompiled in fp32
        if v == "official-compile":
            if dev.type != "cuda":
                raise SystemExit("--variants official-compile: torch.compile of the official code is CUDA-only here")
            continue
        if v not in OFFICIAL_VARIANTS:
            try:
                variant_options(v).check_device(dev)
            except ValueError as exc:
                raise SystemExit(f"--variants {v}: {exc}") from None
    # official variants first: ours are compared with the official outputs of the same run
    args.variants = [v for v in OFFICIAL_VARIANTS if v in variants] + ours
    if any(v in OFFICIAL_VARIANTS for v in args.variants) and not args.flops_only:
        if not (args.official / "sam3d_objects").is_dir():
            raise SystemExit(f"--official / FS3D_OFFICIAL: no sam3d_objects package under {args.official}")
        missing = [f for f in HF_FILES if not (args.hf_configs / f).is_file()]
        if missing:
            raise SystemExit(f"--hf-configs / FS3D_HF_CONFIGS: {missing} missing in {args.hf_configs}")
    return args


# ---------------------------------------------------------------------------------------------
# Official code set-up
# ---------------------------------------------------------------------------------------------
def setup_spconv(device: torch.device) -> tuple[str, bool]:
    """Make ``import spconv.pytorch`` work for the official code; returns (description, reference_convs).

    CUDA: spconv-triton (it does not register itself as ``spconv``, so ``spconv`` and
    ``spconv.pytorch`` become aliases of ``spconv_triton`` / ``spconv_triton.pytorch``). CPU: the real
    spconv if installed, else the same alias (construction and data structures only); on CPU every
    official SubMConv3d then computes through ``parity_official.subm_conv_reference``.
    """
    import importlib.util
    existing = sys.modules.get("spconv")
    aliased = existing is not None and str(getattr(existing, "__version__", "")).startswith("spconv_triton")
    if device.type != "cuda" and not aliased and (existing is not None or importlib.util.find_spec("spconv")):
        import spconv
        return f"spconv {spconv.__version__} (CPU build), SubMConv3d through the exact reference conv", True
    try:
        import spconv_triton
        import spconv_triton.pytorch as stp
    except ImportError as exc:
        raise SystemExit(f"spconv-triton is not importable ({exc}); put the official bundle's deps on PYTHONPATH") from None
    current = sys.modules.get("spconv.pytorch")
    if current is not None and current is not stp:
        raise SystemExit("a real spconv is already imported; cannot alias spconv to spconv_triton")
    alias = types.ModuleType("spconv")
    alias.__version__ = f"spconv_triton-{spconv_triton.__version__}"
    alias.__path__ = []  # a package, so `import spconv.pytorch` resolves through sys.modules
    alias.pytorch = stp
    alias.constants = spconv_triton.constants
    sys.modules["spconv"] = alias
    sys.modules["spconv.pytorch"] = stp
    if device.type == "cuda":
        return f"spconv-triton {spconv_triton.__version__} (aliased as spconv)", False
    return (f"spconv-triton {spconv_triton.__version__} aliased as spconv (no CPU kernels): "
            "SubMConv3d through the exact reference conv"), True


def setup_official(args) -> dict[str, Any]:
    """Attention backends, spconv, stubs; returns facts for the report."""
    os.environ.setdefault("ATTN_BACKEND", "sdpa")  # dense attention (SS flow): the official SDPA path
    if args.official_attn == "flash-shim":
        # sparse attention: the official flash_attn path, served by PyTorch SDPA per group of equal-length
        # segments (official_flash_shim); the official `sdpa` path builds a dense N x N mask instead
        from benchmarks import official_flash_shim
        official_flash_shim.install()
        os.environ["SPARSE_ATTN_BACKEND"] = "flash_attn"
    else:
        os.environ["SPARSE_ATTN_BACKEND"] = "sdpa"
    if "sam3d_objects.model.backbone.tdfy_dit.modules.sparse" in sys.modules:
        raise SystemExit("the official sparse package was imported before its attention backend was chosen")
    spconv_desc, reference = setup_spconv(args.device)
    if args.official_convs == "reference" and not reference:
        reference = True
        spconv_desc += "; SubMConv3d through the exact reference conv (--official-convs reference: parity, not speed)"
    finder = po.bootstrap(args.official)
    return {"spconv": spconv_desc, "reference_convs": reference, "stubbed": finder,
            "attn_backend": os.environ["ATTN_BACKEND"], "sparse_attn_backend": os.environ["SPARSE_ATTN_BACKEND"]}


def official_commit(official: Path) -> str:
    """From ``<official>/OFFICIAL_COMMIT`` (the bundle writes it), else the parity report, else unknown."""
    f = official / "OFFICIAL_COMMIT"
    if f.is_file():
        return f.read_text().strip()
    rep = ROOT / "benchmarks" / "results" / "parity_official_cpu.md"
    if rep.is_file():
        m = re.search(r"sam-3d-objects@([0-9a-f]{40})", rep.read_text())
        if m:
            return m.group(1) + " (from parity_official_cpu.md)"
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------------------------
def model_config(args):
    from fs3d_accel.model.configs import full_config, mini_config
    cfg = full_config() if args.config == "full" else po.parity_config(mini_config())
    if args.steps is not None:
        cfg = cfg.with_samplers(replace(cfg.ss_sampler, steps=args.steps), replace(cfg.slat_sampler, steps=args.steps))
    return cfg


def object_coords(args, resolution: int) -> dict[str, torch.Tensor]:
    """(N, 4) int32 [0, x, y, z] per object, sorted; optionally a random subset of --max-voxels."""
    coords = load_coords(resolution, "cpu")
    out = {}
    for i, name in enumerate(args.objects):
        c = coords[name]
        if args.max_voxels is not None and len(c) > args.max_voxels:
            g = torch.Generator().manual_seed(args.seed + 100 + i)
            keep = torch.randperm(len(c), generator=g)[:args.max_voxels].sort().values
            c = c[keep]
        out[name] = c.contiguous()
    return out


def stage_copy(stage: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of one of our stages without its condition fuser, in ``dtype``."""
    saved = stage._modules.get("condition")
    if saved is not None:
        stage._modules["condition"] = None
    try:
        dup = copy.deepcopy(stage)
    finally:
        if saved is not None:
            stage._modules["condition"] = saved
    dup.__dict__.pop("_compiled", None)
    dup.__dict__.pop("_compiled_torso", None)
    dup.__dict__.pop("_graph_passes_run", None)  # graph_record_first's record of passes run: tied to the torso
    dup.__dict__.pop("_graph_first_call_failed", None)
    dup.__dict__.pop("_merged_torso_warm", None)  # slat_merge_inlined's warmed merged passes: tied to the torso too
    dup.__dict__.pop("_graph_pool", None)
    dup.__dict__.pop("_held_inputs", None)
    # kept values: the copy remakes its own (in its dtype, from its weights)
    for kept in ("_block_modulations", "_zero_row_kv"):
        dup.__dict__.pop(kept, None)
    return dup.to(dtype).eval()


def host_cpu() -> str:
    """CPU model and core count of this machine: host-bound timings depend on it."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure(fn: Callable[[], Any], dev: torch.device, warmup: int, repeats: int,
            freeze_gc: bool = False) -> tuple[Any, dict]:
    """First call (timed alone: includes compilation / autotuning), then stage_latency.Timer
    (``warmup`` untimed calls, median of ``repeats``); peak memory over the timed calls, the CUDA graphs recorded
    per call after the first (inductor's, 0 where the compiled regions only replay, plus the stages' own whole-pass
    graphs, two per SLaT object by design), and Python's garbage collections inside the warm-up and timed calls
    (``gc_*``, per call). ``freeze_gc``: ``gc.freeze()`` after the first call (``--python-gc frozen``)."""
    sync_device(dev)
    resident = torch.cuda.memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
    t0 = time.perf_counter()
    out = fn()
    sync_device(dev)
    first = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    recorded = cuda_graph_recordings(dev)
    if freeze_gc:
        freeze_after_warmup()
    with GCPauses() as pauses:
        r = Timer(dev, warmup, repeats)(fn)
    recorded = cuda_graph_recordings(dev) - recorded
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
    return out, {"median_s": r["median_s"], "min_s": r["min_s"], "n": r["n"], "first_call_s": first,
                 "graphs_recorded_per_call": recorded / (warmup + repeats) if warmup + repeats else float("nan"),
                 "peak_mem_gb": peak, "resident_gb": resident,
                 **(pauses.per_call(warmup + repeats) if warmup + repeats else {})}


def _flat(x) -> torch.Tensor:
    if isinstance(x, dict):
        return torch.cat([x[k].detach().float().reshape(-1).cpu() for k in sorted(x)])
    return x.detach().float().reshape(-1).cpu()


def difference(ref, got) -> tuple[float, float]:
    """(max |got - ref|, that / max |ref|); NaN where shapes differ. Outputs of :func:`mesh_output`
    ((voxel keys, features)) must cover the same voxels: features of different voxel sets are not
    comparable row by row, so a mismatch raises (the unit then records it as its error)."""
    if isinstance(ref, tuple):
        (ref_keys, ref), (got_keys, got) = ref, got
        if not torch.equal(ref_keys, got_keys):
            missing = int((~torch.isin(got_keys, ref_keys)).sum())
            raise ValueError(f"output voxel sets differ: {len(got_keys)} voxels vs {len(ref_keys)} official, "
                             f"{missing} not among the official ones")
    a, b = _flat(ref), _flat(got)
    if a.shape != b.shape:
        return float("nan"), float("nan")
    d = float((a - b).abs().max()) if a.numel() else 0.0
    return d, d / max(float(a.abs().max()) if a.numel() else 0.0, 1e-30)


# ---------------------------------------------------------------------------------------------
# Runners (each returns a zero-argument callable producing the unit's output on the CPU-comparable form)
# ---------------------------------------------------------------------------------------------
def official_amp(dev: torch.device, precision: str):
    """fp16 autocast as the official pipeline runs the generators ('pipeline'); nothing for 'fp32'."""
    return torch.autocast(dev.type, dtype=torch.float16) if precision == "pipeline" else contextlib.nullcontext()


def official_ss_fn(gen, noise: dict[str, torch.Tensor], cond: torch.Tensor, dev: torch.device, precision: str):
    shapes = {k: tuple(v.shape) for k, v in noise.items()}
    gen._generate_noise = lambda shape, device: {k: v.clone() for k, v in noise.items()}

    def fn():
        with official_amp(dev, precision):
            return gen(shapes, dev, cond)
    return fn


def official_slat_fn(gen, noise: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor, dev: torch.device,
                     precision: str):
    coords_np = coords.cpu().numpy()  # the pipeline passes coords.cpu().numpy()
    gen._generate_noise = lambda shape, device: noise[None].clone()

    def fn():
        with official_amp(dev, precision):
            return gen((1, noise.shape[0], noise.shape[1]), dev, cond, coords_np)[0]
    return fn


def official_mesh_fn(dec, latent: torch.Tensor, coords: torch.Tensor):
    from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp

    def fn():  # decode_slat: no autocast; the fp16 torso casts inside
        return dec(sp.SparseTensor(feats=latent, coords=coords))
    return fn


def ours_ss_fn(stage, noise: dict[str, torch.Tensor], cond: torch.Tensor, sampler_cfg, opts):
    from fs3d_accel.samplers import EulerFlowSampler

    def fn():
        net = stage.velocity_net(cond, sampler_cfg, opts)
        return EulerFlowSampler(sampler_cfg, "ss").sample({k: v.clone() for k, v in noise.items()}, net)
    return fn


def ours_slat_fn(stage, noise: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor, sampler_cfg, opts):
    from fs3d_accel.model.sparse import release_structure
    from fs3d_accel.samplers import EulerFlowSampler

    def fn():
        structures: list[dict] = []
        try:
            net = stage.velocity_net(cond, coords, sampler_cfg, opts, structures)
            return EulerFlowSampler(sampler_cfg, "slat").sample(noise.clone(), net)
        finally:
            for s in structures:
                release_structure(s)
    return fn


def ours_mesh_fn(stage, latent: torch.Tensor, coords: torch.Tensor, opts, dev: torch.device):
    dtype = opts.compute_dtype(dev)

    def fn():
        with opts.network_context(dev, "decode"):
            return stage.decoder(latent.to(dtype), coords)
    return fn


def mesh_output(out, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxel keys, features), sorted by voxel: official and ours emit voxels in different orders, and
    :func:`difference` checks that both cover the same voxels before comparing features."""
    return po._sorted_by_coords(out.coords.cpu(), out.feats.float().cpu(), resolution)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def unit_flops(base, cfg, stage: str, dev: torch.device, cond: torch.Tensor | None = None,
               coords: torch.Tensor | None = None, latent: torch.Tensor | None = None) -> float:
    """Model FLOPs of one unit: FlopCounterMode on our fp32 network (SparseConv3d 'scatter':
    present neighbours only), times the sampler's network passes (count_network_passes)."""
    from fs3d_accel.model.sparse import SparseConv3d
    from fs3d_accel.samplers import count_network_passes
    from fs3d_accel.stages.ss import ss_latent_shapes
    impl = SparseConv3d.impl
    SparseConv3d.impl = "scatter"
    try:
        with torch.no_grad(), skip_heavy_ops():  # shapes are all a count needs (exact: tests/test_shape_only.py)
            if stage == "ss":
                net = base.ss.flow.to(dev)
                lat = {k: torch.zeros(s, device=dev) for k, s in ss_latent_shapes(cfg).items()}
                d = torch.zeros(1, device=dev) if cfg.ss_flow.is_shortcut_model else None
                f = count_flops(lambda: net(lat, torch.full((1,), 500.0, device=dev), cond.to(dev), d))
                return f * count_network_passes(cfg.ss_sampler)
            if stage == "slat":
                net = base.slat.flow.to(dev)
                feats = torch.zeros(len(coords), cfg.slat_flow.in_channels, device=dev)
                f = count_flops(lambda: net(feats, coords.to(dev), torch.full((1,), 500.0, device=dev), cond.to(dev)))
                return f * count_network_passes(cfg.slat_sampler)
            net = base.decode.decoder.to(dev)
            return count_flops(lambda: net(latent.to(dev), coords.to(dev)))
    finally:
        SparseConv3d.impl = impl
        for m in (base.ss.flow, base.slat.flow, base.decode.decoder):
            m.to("cpu")
        _free(dev)


#: the options that change what a sampler computes (not only how): the rest (precision, batching, compilation,
#: graphs, attention kernel) run the same FLOPs. ``slat_token_bucket`` adds padded work, left out of the count on
#: purpose: MFU stays measured against the useful FLOPs
FLOP_OPTIONS = ("cache_cond_kv", "collapse_zero_cond", "one_key_projection")
#: SLaT switches that change the executed FLOPs but cannot run in the counting run (they need the compiled torso, or
#: step aside under the counter's global module hooks): :func:`executed_flops` counts the run without them and takes
#: off what they skip, from the same run's shapes (:func:`moved_flops`)
MOVED_FLOP_OPTIONS = ("split_cond_kv", "slat_coarse_upsample")


#: how the variants are ordered in each round (``--order``)
ROUND_ORDERS = ("fixed", "alternate")


def round_order(variants: list[str], rnd: int, order: str) -> list[str]:
    """The variants in the order round ``rnd`` (from 1) measures them: as listed, or with ``order`` "alternate"
    reversed in even rounds (a machine that drifts within a round then favours no variant every time)."""
    if order not in ROUND_ORDERS:
        raise ValueError(f"order must be one of {ROUND_ORDERS}, got {order!r}")
    if rnd < 1:
        raise ValueError(f"rounds count from 1, got {rnd}")
    return list(variants)[::-1] if order == "alternate" and rnd % 2 == 0 else list(variants)


def counting_options(opts):
    """``opts`` as an uncompiled fp32 SDPA run with the same FLOP-changing switches (:data:`FLOP_OPTIONS`):
    FlopCounterMode sees every op of it (it cannot see inside compiled graphs or CUDA graph replays)."""
    from fs3d_accel.stages.options import RunOptions
    return RunOptions(**{"batch_cfg": opts.batch_cfg, **{k: getattr(opts, k) for k in FLOP_OPTIONS}})


def executed_flops(stage_module: torch.nn.Module, make_fn, dev: torch.device, switches=None) -> dict[str, float]:
    """FLOPs one call of the unit actually executes, per operator class and in total (``count_flops_by_class``):
    ``make_fn()``'s sampler run once under FlopCounterMode on the fp32 ``stage_module`` (the K/V cache computes the
    condition K/V once per object, the one-key K/V skips the unconditional branch's attention over L keys), where
    ``model_tflop`` counts every network pass in full. ``switches`` (the variant's options): the SLaT switches of
    :data:`MOVED_FLOP_OPTIONS` it has, taken off the count (:func:`moved_flops`)."""
    from fs3d_accel.model.sparse import SparseConv3d
    impl = SparseConv3d.impl
    SparseConv3d.impl = "scatter"  # present neighbours only, as unit_flops
    try:
        stage_module.to(dev)
        with torch.no_grad(), skip_heavy_ops(), moved_flops(stage_module, switches) as saved:
            out = count_flops_by_class(make_fn())  # shapes are all a count needs (exact: tests/test_shape_only.py)
        out["matmul"] -= saved[0]
        out["total"] -= saved[0]
        return out
    finally:
        SparseConv3d.impl = impl
        stage_module.to("cpu")
        _free(dev)


@contextlib.contextmanager
def moved_flops(stage_module: torch.nn.Module, switches):
    """Within the block, record what the counting run computes that the variant's :data:`MOVED_FLOP_OPTIONS` skip, as
    matmul FLOPs in the yielded one-element list (2 x rows x in x out per linear, as FlopCounterMode counts
    ``addmm``):

    - ``split_cond_kv``: every ``to_kv`` projection of the counting run's K/V sets (the CFG pair's, the zero row
      included, and the batch-1 set's), less one projection of the condition's rows, which the switch makes once per
      call and shares;
    - ``slat_coarse_upsample``: the up-sampling blocks' skip linear on the fine rows, less the same on the coarse
      rows."""
    saved = [0.0]
    if switches is None or not any(getattr(switches, k) for k in MOVED_FLOP_OPTIONS):
        yield saved
        return
    flow = stage_module.flow
    handles = []

    def kv_flops(rows: int) -> float:
        return float(sum(2 * rows * b.cross_attn.to_kv.in_features * b.cross_attn.to_kv.out_features
                         for b in flow.blocks))

    if switches.split_cond_kv:
        real = flow.precompute_cond_kv
        batches: list[tuple[int, int]] = []

        def recording(cond):
            batches.append((cond.shape[0], cond.shape[1]))
            return real(cond)
        flow.precompute_cond_kv = recording  # an instance attribute over the method, for this run only
    if switches.slat_coarse_upsample:
        def skip_rows(block, args):
            coarse = args[0]
            fine_rows = len(block.updown.source(coarse)[1])
            lin = block.skip_connection
            saved[0] += 2.0 * (fine_rows - len(coarse)) * lin.in_features * lin.out_features
        handles = [b.register_forward_pre_hook(skip_rows) for b in flow.out_blocks
                   if b.updown is not None and hasattr(b.updown, "source")]
    try:
        yield saved
    finally:
        for h in handles:
            h.remove()
        if switches.split_cond_kv:
            del flow.precompute_cond_kv  # the recording instance attribute goes; the method shows through again
    if switches.split_cond_kv and batches:
        rows_kept = 1  # the stage's condition is one row (its K/V sets name one conditional row: kv_of)
        saved[0] += sum(kv_flops(b * length) for b, length in batches) - kv_flops(rows_kept * batches[0][1])


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return format(x, spec)


def _percent(x) -> str:
    """A fraction as "12.3%"; empty for a missing value."""
    return "" if x is None or x != x else f"{100 * x:.1f}%"


def complete_rows(rows: list[dict], peak_tflops: float | None, round_peaks: dict | None = None) -> list[dict]:
    """Fill speedup vs official (the official unit of the same round), achieved TFLOP/s and MFU (in place;
    returns rows). Profiled units (``kernel_s``) also get ``mfu_kernels``: executed FLOPs over their summed kernel
    time, what the call would reach if the GPU never waited on the host. ``round_peaks`` (round -> TFLOP/s, from
    ``--peak-every-round``; JSON keys may be strings) adds each row's own round's peak and its executed MFU against
    it; every other MFU stays against ``peak_tflops``, the largest measurement."""
    by_round = {int(k): float(v) for k, v in (round_peaks or {}).items()}
    official = {(r.get("round", 1), r["stage"], r.get("object")): r["median_s"] for r in rows
                if r["variant"] == "official" and not r.get("error")}
    for r in rows:
        t = r.get("median_s", float("nan"))
        ref = official.get((r.get("round", 1), r["stage"], r.get("object")))
        r["speedup_vs_official"] = ref / t if ref and t == t and t > 0 else float("nan")
        f = r.get("model_tflop", float("nan"))
        r["achieved_tflops"] = f / t if f == f and t == t and t > 0 else float("nan")
        r["mfu"] = r["achieved_tflops"] / peak_tflops if peak_tflops and r["achieved_tflops"] == r["achieved_tflops"] \
            else float("nan")
        e = r.get("executed_tflop", float("nan"))
        r["mfu_executed"] = e / t / peak_tflops if peak_tflops and e == e and t == t and t > 0 else float("nan")
        own = by_round.get(int(r.get("round", 1)))
        if own is not None:
            r["round_peak_tflops"] = own
            r["mfu_executed_round_peak"] = e / t / own if e == e and t == t and t > 0 else float("nan")
        if "kernel_s" in r:  # the profiled unit's summed kernels: the MFU of a call that never waited on the host
            k = r["kernel_s"]
            r["mfu_kernels"] = e / k / peak_tflops if peak_tflops and e == e and k == k and k > 0 else float("nan")
    return rows


def readme_text(rows: list[dict], meta: dict) -> str:
    lines = [f"# Official SAM 3D Objects modules vs ours, per stage (`benchmarks/base_vs_official.py`)", "",
             f"Device **{meta.get('device')}**, torch {meta.get('torch')}, config `{meta.get('config')}`, "
             f"official code facebookresearch/sam-3d-objects@{meta.get('official_commit')} (imported, not copied).",
             f"Timing: {meta.get('timing')}. Seed {meta.get('seed')}, sampler steps SS {meta.get('ss_steps')}, "
             f"SLaT {meta.get('slat_steps')}.",
             f"Official attention: ATTN_BACKEND={meta.get('attn_backend')}, SPARSE_ATTN_BACKEND="
             f"{meta.get('sparse_attn_backend')}; sparse convs: {meta.get('spconv')}.",
             *([f"cuBLASLt workspace: {meta['cublaslt_workspace_kib']} KiB for the whole process "
                "(`CUBLASLT_WORKSPACE_SIZE`, `--cublaslt-workspace-kib`; every variant of the run, the official one "
                "too)."] if meta.get("cublaslt_workspace_kib") is not None else []),
             f"Measured bf16 matmul peak: {_fmt(meta.get('peak_tflops'), '.0f') or 'n/a (no GPU)'} TFLOP/s"
             + peak_provenance(meta) + "; "
             "MFU = model FLOPs of the unit (FlopCounterMode on our fp32 network, present sparse-conv neighbours "
             "only, x network passes of the schedule) / median time / that peak.", ""]
    lines += [f"- `{k}`: {v}" for k, v in meta.get("variants", {}).items()]
    busy = any("gpu_busy" in r for r in rows)
    if busy:
        lines += ["GPU busy = summed CUDA kernel time of one extra, profiled call / median wall time; far below 100% "
                  "means the call waits on the host (Python, launches), so its time depends on the CPU next to the "
                  "GPU. MFU (kernels) = executed FLOPs / that summed kernel time / the peak: the ceiling of a call whose "
                  "GPU never waits.",
                  f"Host CPU: {meta.get('host_cpu', 'unknown')}.", ""]
    lines += ["", "Graphs recorded / call = CUDA graphs recorded per call after the first (warm-up and timed calls). "
              "Inductor's cudagraph trees: 0 where a compiled setting only replays; 1 or more where every call pays a "
              "synchronisation and a capture (a moved static input, or a new dynamic size). Since session 16 the "
              "count also includes the stages' own whole-pass graphs (`cuda_graphs`): two per SLaT call by design, "
              "recorded without a sync with `async_graph_capture`; earlier runs of those variants show 0 for them. "
              "Empty in runs made before the column existed (session 10's included).",
              "", "Max abs diff vs first unit = the largest difference of the unit's output from the output of the "
              "process's first unit of the same stage and object (the first row of that stage and object in round 1; "
              "0 there): 0 for a variant whose switches change no value and for a repeat of the same variant, so it "
              "shows which switches round differently, on this GPU, without an official run. Since session 30."]
    multi = len({r.get("round", 1) for r in rows}) > 1
    round_peak = any("round_peak_tflops" in r for r in rows)
    header = (["round"] if multi else []) + [
        "stage", "object", "N", "variant", "median s", "first call s", "speedup vs official", "TFLOP", "TFLOP/s", "MFU",
        "MFU (executed)"] + (["round's peak TFLOP/s", "MFU (executed, round's peak)"] if round_peak else []) + (
        ["GPU busy", "MFU (kernels)", "launches"] if busy else []) + [
        "graphs recorded / call", "peak GB", "resident GB", "max abs diff vs official", "rel",
        "max abs diff vs first unit"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lead = f"| {r.get('round', 1)} " if multi else ""
        if r.get("error"):
            lines.append(lead + f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {r.get('object') or ''} | "
                         f"{_fmt(r.get('N'), 'd')} | {r['variant']} | ERROR: {r['error'][:120]} |"
                         + "|" * (len(header) - len(lead and "x") - 5))  # the row's other cells, empty
            continue
        mfu = r.get("mfu", float("nan"))
        lines.append(
            lead + f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {r.get('object') or ''} | "
            f"{_fmt(r.get('N'), 'd')} | "
            f"{r['variant']} | {_fmt(r['median_s'], '.4f')} | {_fmt(r.get('first_call_s'), '.3f')} | "
            f"{_fmt(r.get('speedup_vs_official'), '.2f')} | {_fmt(r.get('model_tflop'), '.4g')} | "
            f"{_fmt(r.get('achieved_tflops'), '.1f')} | {_percent(mfu)} | {_percent(r.get('mfu_executed'))} | "
            + (f"{_fmt(r.get('round_peak_tflops'), '.0f')} | {_percent(r.get('mfu_executed_round_peak'))} | "
               if round_peak else "")
            + (f"{_fmt(100 * r['gpu_busy'], '.0f')}% | {_percent(r.get('mfu_kernels'))} | {r['launches']} | "
               if "gpu_busy" in r else "| | | " if busy else "")
            + f"{_fmt(r.get('graphs_recorded_per_call'), '.2g')} | "
            f"{_fmt(r.get('peak_mem_gb'), '.2f')} | {_fmt(r.get('resident_gb'), '.2f')} | "
            f"{_fmt(r.get('max_abs_vs_official'), '.3g')} | {_fmt(r.get('rel_vs_official'), '.3g')} | "
            f"{_fmt(r.get('max_abs_vs_first'), '.3g')} |")
    per_object = per_object_lines(rows)
    if per_object:
        lines += [""] + per_object
    classes = kernel_class_lines(rows)
    if classes:
        lines += [""] + classes
    idle = idle_lines(rows)
    if idle:
        lines += [""] + idle
    collections = gc_lines(rows, meta)
    if collections:
        lines += [""] + collections
    lines += ["", "## How the official modules run here", ""] + [f"- {n}" for n in meta.get("notes", [])]
    return "\n".join(lines) + "\n"


def gc_lines(rows: list[dict], meta: dict) -> list[str]:
    """The Python garbage collections inside each unit's warm-up and timed calls (``gc_*`` columns) and the host
    probe before it (``host_probe_us``), or nothing where no row has them (runs made before the columns existed)."""
    have = [r for r in rows if _fmt(r.get("gc_ms_per_call"), ".2f") or _fmt(r.get("host_probe_us"), ".2f")]
    if not have:
        return []
    frozen = meta.get("python_gc") == "frozen"
    multi = len({r.get("round", 1) for r in rows}) > 1
    lines = ["Python's garbage collections inside the warm-up and timed calls, per call"
             + (" (`--python-gc frozen`: `gc.freeze()` after each unit's first call)" if frozen else
                " (the collector as Python leaves it)") + "; a full collection walks every object alive, the "
             "compiled code's included. Host probe: microseconds per operation of a fixed mix of host work (a device "
             "allocation, a tiny kernel launch, a Python call: `fs3d_analysis.profile.host_probe`) timed right before "
             "the unit; a unit whose probe reads high ran on a slower host, which moves host-bound calls:", "",
             "| " + ("round | " if multi else "") + "stage | object | variant | collections | full | ms | longest ms | "
             "host probe us/op |",
             "|" + "---|" * (9 if multi else 8)]
    for r in have:
        lines.append("| " + (f"{r.get('round', 1)} | " if multi else "")
                     + f"{STAGE_LABELS.get(r['stage'], r['stage'])} | {r.get('object') or ''} | {r['variant']} | "
                     f"{_fmt(r.get('gc_per_call'), '.2f')} | {_fmt(r.get('gc_gen2_per_call'), '.2f')} | "
                     f"{_fmt(r.get('gc_ms_per_call'), '.2f')} | {_fmt(r.get('gc_longest_ms'), '.2f')} | "
                     f"{_fmt(r.get('host_probe_us'), '.2f')} |")
    return lines


def peak_provenance(meta: dict) -> str:
    """Where the MFU denominator came from, for the README: the largest of the run's measurements, taken at its start,
    before each later round that measured one (``--peak-every-round``: ``peak_tflops_by_round``) and at its end where
    that measurement was made (``peak_at_end``; runs written before the key existed: inferred from the count)."""
    runs = meta.get("peak_tflops_runs") or ()
    if len(runs) < 2:
        return ""
    later = sorted(int(k) for k in (meta.get("peak_tflops_by_round") or {}) if int(k) > 1)
    at_end = meta.get("peak_at_end", len(runs) == 1 + len(later) + 1)
    parts = ["at the run's start"]
    if later:
        parts.append(f"before round {later[0]}" if len(later) == 1 else
                     f"before rounds {later[0]}-{later[-1]}" if later == list(range(later[0], later[-1] + 1)) else
                     "before rounds " + ", ".join(map(str, later)))
    if at_end:
        parts.append("at the end")
    where = ("measured at the run's start and end" if parts == ["at the run's start", "at the end"] else
             "measured " + ", ".join(parts[:-1]) + " and " + parts[-1])
    values = ", ".join(f"{p:.0f}" for p in runs[:-1]) + f" and {runs[-1]:.0f}"
    return f" (the largest of {values}, {where})" if len(runs) > 2 else f" (the larger of {values}, {where})"


def per_object_totals(rows: list[dict]) -> list[dict]:
    """SS + SLaT(object) + mesh(object) per round, variant and object, where all three were measured in that round;
    ``speedup`` against the official total of the same round, ``speedup_vs_compiled`` against ``official-compile``'s.

    ``official-compile`` is the official pipeline as shipped (``compile_model: true``), which compiles only the SS
    generator among the timed stages: a SLaT or mesh-decoder time it lacks is the uncompiled official one of the
    same round (listed in ``borrowed``), so its total is what the pipeline's default spends per object."""
    ok = [r for r in rows if not r.get("error")]
    out = []
    for rnd in sorted({r.get("round", 1) for r in ok}):
        here = [r for r in ok if r.get("round", 1) == rnd]
        ss = {r["variant"]: r["median_s"] for r in here if r["stage"] == "ss"}
        objs = []
        for r in here:
            if r["stage"] == "slat" and r.get("object") not in objs:
                objs.append(r["object"])
        totals = []
        for o in objs:
            for v in ss:
                parts, borrowed = {}, []
                for stage in ("slat", "mesh"):
                    own = [r for r in here if r["variant"] == v and r["stage"] == stage and r.get("object") == o]
                    if not own and v == "official-compile":
                        own = [r for r in here if r["variant"] == "official" and r["stage"] == stage
                               and r.get("object") == o]
                        borrowed += [stage] if own else []
                    if own:
                        parts[stage] = own[0]
                if len(parts) == 2:
                    totals.append(dict(round=rnd, object=o, N=parts["slat"]["N"], variant=v, borrowed=borrowed,
                                       seconds=ss[v] + parts["slat"]["median_s"] + parts["mesh"]["median_s"]))
        for key, ref_variant in (("speedup", "official"), ("speedup_vs_compiled", "official-compile")):
            ref = {t["object"]: t["seconds"] for t in totals if t["variant"] == ref_variant}
            for t in totals:
                t[key] = ref[t["object"]] / t["seconds"] if t["object"] in ref else float("nan")
        out += totals
    return out


def per_object_lines(rows: list[dict]) -> list[str]:
    """The per-object table (one row per round, variant and object); with several rounds, also the median and
    range of each variant's seconds and same-round speedups over the rounds (each over the rounds that have it)."""
    totals = per_object_totals(rows)
    if not totals:
        return []
    rounds = sorted({t["round"] for t in totals})
    compiled = any(t["variant"] == "official-compile" for t in totals)
    cols = [("speedup", "speedup vs official (same round)")]
    if compiled:
        cols.append(("speedup_vs_compiled", "speedup vs official-compile (same round)"))
    lines = ["## Per object (SS sampler + SLaT sampler + mesh decoder network)", ""]
    borrowed = sorted({s for t in totals for s in t["borrowed"]})
    if borrowed:
        lines += ["`official-compile` is the official pipeline's default (`compile_model: true`): it compiles the SS "
                  f"generator only, so its {' and '.join(borrowed)} seconds are `official`'s of the same round.", ""]
    lines += ["| round | object | N | variant | seconds | " + " | ".join(c for _, c in cols) + " |",
              "|---|---|---|---|---|" + "---|" * len(cols)]
    lines += [f"| {t['round']} | {t['object']} | {t['N']} | {t['variant']} | {t['seconds']:.3f} | "
              + " | ".join(_fmt(t[k], '.2f') for k, _ in cols) + " |" for t in totals]
    if len(rounds) > 1:
        lines += ["", f"Over {len(rounds)} rounds (median, and min-max; a speedup over the rounds that have its "
                  "reference):", "",
                  "| object | variant | seconds | " + " | ".join(c for _, c in cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        keys = []
        for t in totals:
            if (t["object"], t["variant"]) not in keys:
                keys.append((t["object"], t["variant"]))
        for o, v in keys:
            mine = [t for t in totals if (t["object"], t["variant"]) == (o, v)]
            sec = [t["seconds"] for t in mine]
            texts = []
            for k, _ in cols:
                sp = [t[k] for t in mine if t[k] == t[k]]
                texts.append(f"{statistics.median(sp):.2f} ({min(sp):.2f}-{max(sp):.2f})"
                             + (f" [{len(sp)} of {len(mine)} rounds]" if 0 < len(sp) < len(mine) else "")
                             if sp else "")
            lines.append(f"| {o} | {v} | {statistics.median(sec):.3f} ({min(sec):.3f}-{max(sec):.3f}) | "
                         + " | ".join(texts) + " |")
    return lines


def write_figure(rows: list[dict], path: Path) -> str | None:
    """Grouped bars (seconds per unit and variant, log scale); None, or why no figure was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no figure"
    ok = [r for r in rows if not r.get("error") and r.get("median_s", float("nan")) == r.get("median_s")]
    if not ok:
        return "no successful unit: no figure"
    units, variants = [], []
    for r in ok:
        u = (r["stage"], r.get("object"), r.get("N"))
        if u not in units:
            units.append(u)
        if r["variant"] not in variants:
            variants.append(r["variant"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(units)), 4.5))
    w = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs, ys = [], []
        for i, u in enumerate(units):
            m = [r for r in ok if r["variant"] == v and (r["stage"], r.get("object"), r.get("N")) == u]
            if m:  # several rounds: their median
                xs.append(i + (j - (len(variants) - 1) / 2) * w)
                ys.append(statistics.median(r["median_s"] for r in m))
                sps = [r.get("speedup_vs_official", float("nan")) for r in m]
                sps = [x for x in sps if x == x]
                sp = statistics.median(sps) if sps else float("nan")
                if sp == sp and v != "official":
                    ax.text(xs[-1], ys[-1], f"{sp:.1f}x", ha="center", va="bottom", fontsize=7)
        ax.bar(xs, ys, width=w, label=v)
    ax.set_xticks(range(len(units)))
    ax.set_xticklabels([STAGE_LABELS[s] + ("" if n is None or n != n else f"\n{o}\nN={int(n):,}") for s, o, n in units],
                       fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median seconds (log)")
    ax.set_title("official SAM 3D Objects modules vs ours (labels: speedup vs official)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


_NOTES_PRINTED: set[str] = set()


KERNEL_LABELS = [label for label, _ in KERNEL_CLASSES] + ["other"]


def write_kernel_csv(rows: list[dict], path: Path) -> None:
    """Every kernel of every ``--gpu-busy`` unit: seconds and launches in its one profiled call, class, and the GPU
    idle in front of its launches (``idle_before_s``, :func:`~fs3d_analysis.profile.busy.idle_before`) and the kernel it
    most often follows with how often (``most_often_after``, ``after_count``; :func:`~fs3d_analysis.profile.busy.
    most_often_after`); the last three are empty for runs made before session 26."""
    import csv
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "stage", "object", "N", "kernel", "class", "seconds", "launches", "idle_before_s",
                    "idle_before_launches", "most_often_after", "after_count"])
        for r in rows:
            waits, after = r.get("idle_before") or {}, r.get("after") or {}
            kernels = r.get("kernels", {})
            # names the per-kernel sums lack (the timeline's events of one GPU, the sums' of all) get a row of 0 s
            names = sorted(kernels, key=lambda k: -kernels[k][0]) + sorted(set(waits) - set(kernels))
            for name in names:
                sec, count = kernels.get(name, (0.0, 0))
                wait, prev = waits.get(name), after.get(name)
                w.writerow([r["variant"], r["stage"], r.get("object") or "", r.get("N") or "", name,
                            kernel_class(name), f"{sec:.6g}", count, "" if wait is None else f"{wait[0]:.6g}",
                            "" if wait is None else wait[1], "" if prev is None else prev[0],
                            "" if prev is None else prev[1]])


def kernel_class_seconds(row: dict) -> dict[str, float]:
    """One profiled unit's kernel seconds per class (every label of KERNEL_LABELS), plus "idle": median wall time
    minus summed kernel time."""
    by = dict.fromkeys(KERNEL_LABELS, 0.0)
    by.update(KernelTime(row["kernel_s"], row.get("launches", 0), row["kernels"]).by_class())
    by["idle"] = row["median_s"] - row["kernel_s"]
    return by


def write_kernel_figure(rows: list[dict], path: Path) -> str | None:
    """Stacked bars: each profiled unit's wall time split into kernel classes and GPU idle; None, or why no
    figure was drawn."""
    profiled = [r for r in rows if r.get("kernels") and not r.get("error")]
    if not profiled:
        return "no profiled unit: no kernel-class figure"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd
    except ImportError:
        return "matplotlib / pandas not importable: no kernel-class figure"
    labels = [f"{r['variant']}\n{STAGE_LABELS.get(r['stage'], r['stage'])}"
              + (f", N={int(r['N']):,}" if r.get("N") else "") for r in profiled]
    df = pd.DataFrame([kernel_class_seconds(r) for r in profiled], index=labels)
    df = df.loc[:, (df != 0).any()]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(df) + 1.5))
    df.iloc[::-1].plot.barh(stacked=True, ax=ax, width=0.75, colormap="tab10")
    ax.set_xlabel("seconds per call (kernel time by class; idle = wall time minus kernel time)")
    ax.set_title("where the GPU time goes (one profiled call per unit)", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def kernel_class_lines(rows: list[dict]) -> list[str]:
    """Per profiled unit: kernel seconds by class (where the GPU time goes), and the host's share."""
    profiled = [r for r in rows if r.get("kernels")]
    if not profiled:
        return []
    lines = ["## Where the GPU time goes (one profiled call per unit)", "",
             f"Seconds of kernel time by class (`{KERNELS_CSV_NAME}` lists every kernel); 'idle' = median wall "
             "time minus summed kernel time (the GPU waits on the host; negative when the profiled call's kernels "
             "ran longer than the median unprofiled call).", "",
             "| stage | object | variant | " + " | ".join(KERNEL_LABELS) + " | idle |",
             "|---|---|---|" + "---|" * (len(KERNEL_LABELS) + 1)]
    for r in profiled:
        by = kernel_class_seconds(r)
        lines.append(f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {r.get('object') or ''} | {r['variant']} | "
                     + " | ".join(f"{by[lbl]:.4f}" for lbl in KERNEL_LABELS) + f" | {by['idle']:.4f} |")
    waited = [r for r in profiled if r.get("idle_before")]
    if waited:
        lines += ["", f"GPU idle in front of kernels (the profiled call, from its first kernel to its last; "
                  f"`idle_before_s` in `{KERNELS_CSV_NAME}`): by class, and the {IDLE_BEFORE_TOP} kernels waited in "
                  "front of longest. Inside CUDA graphs each kernel waits ~1-2 us for the one before it, so a call of "
                  "thousands of short kernels loses time there even when the host is far ahead.", "",
                  "| stage | object | variant | idle ms | " + " | ".join(KERNEL_LABELS) + " |",
                  "|---|---|---|---|" + "---|" * len(KERNEL_LABELS)]
        for r in waited:
            by = dict.fromkeys(KERNEL_LABELS, 0.0)
            for name, (sec, _) in r["idle_before"].items():
                by[kernel_class(name)] += sec
            lines.append(f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {r.get('object') or ''} | {r['variant']} | "
                         f"{1e3 * sum(by.values()):.2f} | " + " | ".join(f"{1e3 * by[lbl]:.2f}" for lbl in KERNEL_LABELS)
                         + " |")
        lines += ["", "| variant | kernel | launches | idle ms in front | us per launch | most often after |",
                  "|---|---|---|---|---|---|"]
        for r in waited:
            top = sorted(r["idle_before"].items(), key=lambda kv: -kv[1][0])[:IDLE_BEFORE_TOP]
            after = r.get("after") or {}
            lines += [f"| {r['variant']} | `{name[:90]}` | {count} | {1e3 * sec:.2f} | {1e6 * sec / count:.2f} | "
                      + (f"`{after[name][0][:60]}` ({after[name][1]}x) |" if name in after else "|")
                      for name, (sec, count) in top]
    return lines


#: kernels listed per profiled unit in the README's idle-in-front table
IDLE_BEFORE_TOP = 8


def write_idle_csv(rows: list[dict], path: Path) -> None:
    """Where each ``--gpu-busy`` unit's profiled call waited: the idle fraction of every tenth of the call, and its
    longest idle stretches with the host events open when each began (``busy.gpu_timeline``)."""
    import csv
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "stage", "object", "N", "what", "index", "start_ms", "ms", "idle_fraction", "host",
                    "idle_ms"])
        for r in rows:
            tl = r.get("timeline")
            if tl is None:
                continue
            key = [r["variant"], r["stage"], r.get("object") or "", r.get("N") or ""]
            # full precision (repr), so that --replot renders the same README from the file
            w.writerow(key + ["call", 0, 0.0, repr(tl.window_ms), repr(tl.idle_ms / tl.window_ms), "",
                              repr(tl.idle_ms)])
            for i, frac in enumerate(tl.idle_by_tenth):
                part = tl.window_ms / len(tl.idle_by_tenth)
                w.writerow(key + ["tenth", i, repr(i * part), repr(part), repr(frac), "", ""])
            for i, g in enumerate(tl.gaps):
                w.writerow(key + ["gap", i, repr(g.start_ms), repr(g.ms), "", g.host, ""])


def idle_lines(rows: list[dict]) -> list[str]:
    """Per profiled unit: the idle share of each tenth of its profiled call and its three longest idle stretches."""
    timed = [r for r in rows if r.get("timeline") is not None]
    if not timed:
        return []
    lines = ["## Where in the call the GPU waits (the profiled call of each unit)", "",
             f"Idle % of each tenth of the profiled call (its first to its last event), and its longest idle "
             f"stretches with the host events open when each began (`{IDLE_CSV_NAME}` has eight per unit). The "
             "profiler slows the host, so the idle here is larger than in unprofiled calls; where it sits is the "
             "point.", "",
             "| stage | object | variant | call ms | idle ms | idle % by tenth | longest idle stretches (start ms: ms, host) |",
             "|---|---|---|---|---|---|---|"]
    for r in timed:
        tl = r["timeline"]
        tenths = " ".join(f"{100 * f:.0f}" for f in tl.idle_by_tenth)
        gaps = "; ".join(f"{g.start_ms:.1f}: {g.ms:.1f} ({g.host or '-'})" for g in tl.gaps[:3])
        lines.append(f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {r.get('object') or ''} | {r['variant']} | "
                     f"{tl.window_ms:.1f} | {tl.idle_ms:.1f} | {tenths} | {gaps.replace('|', '/')} |")
    return lines


def write_outputs(rows: list[dict], out: Path, meta: dict) -> None:
    """CSV, README table, JSON meta and the figure (called after every unit)."""
    import csv
    rows = complete_rows(rows, meta.get("peak_tflops"), meta.get("peak_tflops_by_round"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV_NAME, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    # each optional file is written where its data exists and removed where it does not (a reused folder keeps no stale
    # file for --replot to read back)
    for name, write, present in ((KERNELS_CSV_NAME, write_kernel_csv, any("kernels" in r for r in rows)),
                                 (IDLE_CSV_NAME, write_idle_csv, any(r.get("timeline") is not None for r in rows))):
        packed = out / (name + ".xz")  # committed results keep kernels.csv xz-compressed: --replot keeps that form
        if present:
            write(rows, out / name)
            if packed.is_file():
                import lzma
                packed.write_bytes(lzma.compress((out / name).read_bytes(), preset=9))
                (out / name).unlink()
        else:
            (out / name).unlink(missing_ok=True)
            packed.unlink(missing_ok=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / README_NAME).write_text(readme_text(rows, meta))
    whys = [write_figure(rows, out / FIG_NAME)]
    if any(r.get("kernels") for r in rows):
        whys.append(write_kernel_figure(rows, out / KERNEL_FIG_NAME))
    for why in whys:
        if why and why not in _NOTES_PRINTED:
            print(f"note: {why}", flush=True)
            _NOTES_PRINTED.add(why)


_INT_COLUMNS = {"round", "N", "n", "launches"}
_TEXT_COLUMNS = {"variant", "stage", "object", "precision", "error"}


def load_outputs(folder: Path) -> tuple[list[dict], dict]:
    """Rows and meta of a finished run, read back from its CSVs and meta.json (``--replot``): numbers as numbers,
    empty cells left out, each profiled unit's kernels from ``kernels.csv`` (or ``kernels.csv.xz``) and its idle
    timeline from ``idle.csv``."""
    import csv
    folder = Path(folder)
    missing = [n for n in (CSV_NAME, "meta.json") if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"--replot: {folder} has no {', '.join(missing)} (not a base_vs_official.py output folder)")
    rows = []
    with open(folder / CSV_NAME) as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if v == "" or v is None:
                    continue
                row[k] = v if k in _TEXT_COLUMNS else int(float(v)) if k in _INT_COLUMNS else float(v)
            row.setdefault("object", None)
            row.setdefault("N", None)
            rows.append(row)
    kernels_csv = folder / KERNELS_CSV_NAME
    if not kernels_csv.is_file() and kernels_csv.with_name(KERNELS_CSV_NAME + ".xz").is_file():
        kernels_csv = kernels_csv.with_name(KERNELS_CSV_NAME + ".xz")  # committed results store it compressed
    if kernels_csv.is_file():
        import lzma
        with (lzma.open(kernels_csv, "rt") if kernels_csv.suffix == ".xz" else open(kernels_csv)) as fh:
            for k in csv.DictReader(fh):
                unit = [r for r in rows if (r["variant"], r["stage"], r.get("object") or "") ==
                        (k["variant"], k["stage"], k["object"]) and "kernel_s" in r]
                if not unit:
                    raise SystemExit(f"--replot: {KERNELS_CSV_NAME} names a unit missing from {CSV_NAME}: "
                                     f"{k['variant']} {k['stage']} {k['object']}")
                unit[0].setdefault("kernels", {})[k["kernel"]] = (float(k["seconds"]), int(k["launches"]))
                if k.get("idle_before_s"):  # absent in runs before session 26; its own count since the column exists
                    unit[0].setdefault("idle_before", {})[k["kernel"]] = (
                        float(k["idle_before_s"]), int(k.get("idle_before_launches") or k["launches"]))
                if k.get("after_count"):
                    unit[0].setdefault("after", {})[k["kernel"]] = (k["most_often_after"], int(k["after_count"]))
    if (folder / IDLE_CSV_NAME).is_file():
        with open(folder / IDLE_CSV_NAME) as fh:
            parts: dict[tuple, dict] = {}
            for k in csv.DictReader(fh):
                part = parts.setdefault((k["variant"], k["stage"], k["object"]), {"tenth": [], "gap": []})
                if k["what"] == "call":
                    # files of session 14 have no idle_ms column: the fraction (4 decimals) times the window
                    idle_ms = (float(k["idle_ms"]) if k.get("idle_ms") else
                               float(k["idle_fraction"]) * float(k["ms"]))
                    part["call"] = (float(k["ms"]), idle_ms)
                elif k["what"] == "tenth":
                    part["tenth"].append(float(k["idle_fraction"]))
                else:
                    part["gap"].append(IdleGap(float(k["start_ms"]), float(k["ms"]), k["host"]))
        for key, part in parts.items():
            unit = [r for r in rows if (r["variant"], r["stage"], r.get("object") or "") == key and "kernel_s" in r]
            if not unit or "call" not in part:
                raise SystemExit(f"--replot: {IDLE_CSV_NAME} names a unit missing from {CSV_NAME} or has no 'call' "
                                 f"row: {' '.join(key)}")
            unit[0]["timeline"] = Timeline(part["call"][0], part["call"][1], tuple(part["tenth"]), tuple(part["gap"]))
    return rows, json.loads((folder / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def repeat_notes(variants: list[str]) -> list[str]:
    """Caveats for variants whose timings here flatter them: this script repeats one object, and with SLaT token buckets
    the held condition K/V let every repeat replay the first call's CUDA graphs, where a stream of new objects replays
    only when an earlier object used the same bucket."""
    flattered = [v for v in variants if v not in OFFICIAL_VARIANTS and variant_options(v).slat_token_bucket]
    if not flattered:
        return []
    note = (f"{', '.join(f'`{v}`' for v in flattered)}: SLaT token buckets hold the condition K/V, so the repeated "
            f"calls of one object here replay its CUDA graphs; its SLaT times are a lower bound. For new objects, "
            f"time it with slat_many_sizes.py (pass 1)")
    print(f"note: {note}", flush=True)
    return [note]


def official_notes(meta: dict, precision: str) -> list[str]:
    gpu = precision == "pipeline"
    return [
        "Modules built from the official HF yamls with every dimension set to the config "
        "(`parity_official.official_yamls`), random weights loaded strictly from our `state_dicts('official')`.",
        ("SS generator: fp32 weights (yaml `use_fp16: false`) under `torch.autocast('cuda', float16)`, as "
         "`sample_sparse_structure` with pipeline.yaml `dtype: float16`. SLaT generator: yaml `use_fp16: true` "
         "(fp16 torso) under the same autocast, as `sample_slat`. Mesh decoder: yaml `use_fp16: true`, no autocast, "
         "as `decode_slat`." if gpu else
         "`--official-precision fp32`: every official module in fp32, no autocast (not how the pipeline runs "
         "them on a GPU; the CPU default)."),
        "Condition tokens come from OUR condition fusers (fp32; bit-identical to the official ones in "
        "parity_official_cpu.md) and are fed to both; the official fusers (and the dinov2 checkout) are not built.",
        "Noise: the official samplers' `_generate_noise` returns our noise (same draw for both).",
        (f"Attention: dense `{meta.get('attn_backend')}` (SS flow). Sparse (SLaT full, mesh-decoder windowed): "
         + ("the official flash_attn path, with `flash_attn` provided by `official_flash_shim.py` (exact "
            "per-segment SDPA, equal-length segments batched; flash_attn itself is not installable there), as the "
            "official pipeline selects flash_attn on an H100."
            if meta.get("sparse_attn_backend") == "flash_attn" else
            "the official `masked_sdpa` (dense block-diagonal additive mask over all tokens; pessimistic: the "
            "official pipeline selects flash_attn on an H100).")),
        f"Sparse convs: {meta.get('spconv')}.",
        "Not timed: condition fusers, SS decoder, voxel extraction / downsampling, FlexiCubes mesh extraction "
        "(`to_representation` bypassed), Gaussian decoders, layout post-optimisation.",
        "`official-compile` (if run): pipeline.yaml `compile_model: true` compiles "
        "`ss_generator.reverse_fn.inner_forward` (and the condition embedders and SS decoder, untimed here) with "
        "`mode=max-autotune, fullgraph=True, dynamic=False`; here the same call with "
        f"mode `{meta.get('official_compile_mode')}`.",
    ]


def run(args) -> list[dict]:
    from fs3d_accel.pipeline import Pipeline
    from fs3d_accel.stages.slat import slat_noise
    from fs3d_accel.stages.ss import ss_noise

    dev = args.device
    apply_conv_args(args)
    # TF32 for fp32 matmuls as stage_latency.py (speed); --tf32 off for fp32 parity at full precision
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    want_official = any(v in OFFICIAL_VARIANTS for v in args.variants) and not args.flops_only
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "config": args.config, "seed": args.seed,
        "timing": (f"one first call, {args.warmup} warm-up, median of {args.repeats} "
                   + ("(CUDA events)" if dev.type == "cuda" else "(perf_counter)")),
        "variant_order": args.order,
        "official_commit": official_commit(args.official) if want_official else "not run",
        "official_compile_mode": args.official_compile_mode, "tf32": args.tf32 == "on", "host_cpu": host_cpu(),
        "our_conv_impl": args.conv_impl, "our_gather_chunk": args.gather_chunk,
        "cublaslt_workspace_kib": cublaslt_workspace_kib(), "python_gc": args.python_gc,
        "variants": {v: ("official modules, as the official pipeline runs them" if v == "official" else
                         "official + torch.compile of the SS CFG step" if v == "official-compile" else
                         f"ours: {variant_label(v)} = {variant_options(v)}") for v in args.variants},
    }
    if want_official:
        info = setup_official(args)
        meta.update({k: info[k] for k in ("spconv", "attn_backend", "sparse_attn_backend")})
    else:
        meta.update(spconv="not used", attn_backend="n/a", sparse_attn_backend="n/a")
    cfg = model_config(args)
    meta.update(ss_steps=cfg.ss_sampler.steps, slat_steps=cfg.slat_sampler.steps, ss_sampler=str(cfg.ss_sampler),
                slat_sampler=str(cfg.slat_sampler))
    meta["notes"] = official_notes(meta, args.official_precision) + repeat_notes(args.variants)
    meta["official_precision"] = args.official_precision
    t0 = time.perf_counter()
    base = Pipeline.from_config(cfg, seed=args.seed, device="cpu").eval()
    # the zero-initialised layers would hide what feeds them from the output comparison (session 8: before this,
    # no 3^3 sparse conv's values reached the compared SLaT and mesh-decoder outputs)
    meta["zero_inits_filled"] = len(perturb_zero_inits(base))
    print(f"built our {args.config} pipeline in {time.perf_counter() - t0:.1f} s", flush=True)
    coords = object_coords(args, cfg.slat_flow.resolution)
    meta["objects"] = {k: len(v) for k, v in coords.items()}

    # ---- inputs shared by every variant: condition tokens (ours, fp32), noise, SLaT latents
    img, mask, pm = synthetic_inputs(cfg.image_size, seed=args.seed)
    inputs = base.prepare(img, mask, pm).to(dev)
    with torch.no_grad():
        cond = {}
        for name, kw in (("ss", inputs.ss_kwargs()), ("slat", inputs.slat_kwargs())):
            fuser = getattr(base, name).condition.to(dev)
            with skip_heavy_ops() if args.flops_only else contextlib.nullcontext():  # only its shape matters then
                cond[name] = fuser(**kw).float()
            fuser.to("cpu")
            _free(dev)
    g = torch.Generator().manual_seed(args.seed + 1)
    noise_ss = {k: v.to(dev) for k, v in ss_noise(cfg, g).items()}
    noise_slat = {k: slat_noise(len(c), cfg.slat_flow.in_channels, g).to(dev) for k, c in coords.items()}
    mean, std = torch.tensor(cfg.slat_mean), torch.tensor(cfg.slat_std)
    latent = {k: (torch.randn(len(c), cfg.slat_flow.in_channels, generator=g) * std + mean).to(dev)
              for k, c in coords.items()}
    coords = {k: v.to(dev) for k, v in coords.items()}
    meta["cond_tokens"] = {k: list(v.shape) for k, v in cond.items()}
    if args.flops_only:  # the condition tokens exist; the fusers (two DINO ViT-Ls at full size) only hold memory now
        for name in ("ss", "slat"):
            getattr(base, name).condition = torch.nn.Identity()
        gc.collect()

    # ---- FLOPs and matmul peak
    t0 = time.perf_counter()
    flops: dict[tuple[str, str | None], float] = {}
    if "ss" in args.stages:
        flops[("ss", None)] = unit_flops(base, cfg, "ss", dev, cond=cond["ss"])
    for o in args.objects:
        if "slat" in args.stages:
            flops[("slat", o)] = unit_flops(base, cfg, "slat", dev, cond=cond["slat"], coords=coords[o])
        if "mesh" in args.stages:
            flops[("mesh", o)] = unit_flops(base, cfg, "mesh", dev, coords=coords[o], latent=latent[o])
    meta["peak_tflops"] = None
    if not args.flops_only:  # measured again after the last round (record_matmul_peak keeps the larger)
        record_matmul_peak(meta, dev)
    print(f"FLOPs counted in {time.perf_counter() - t0:.1f} s; matmul peak {meta['peak_tflops']}", flush=True)

    # ---- official modules
    off = None
    if want_official:
        t0 = time.perf_counter()
        need = tuple({"ss": "ss_generator", "slat": "slat_generator", "mesh": "mesh_decoder"}[s] for s in args.stages)
        off = po.build_official(cfg, base.state_dicts("official"), args.hf_configs, only=need,
                                reference_convs=info["reference_convs"],
                                pipeline_fp16=args.official_precision == "pipeline")
        meta["official_build_s"] = time.perf_counter() - t0
        meta["official_reference_convs"] = off.reference_convs
        meta["official_stubbed_imports"] = sorted(info["stubbed"].touched)
        print(f"built official modules {need} in {meta['official_build_s']:.1f} s", flush=True)

    rows: list[dict] = []
    ref_out: dict[tuple[str, str | None], Any] = {}
    first_out: dict[tuple[str, str | None], Any] = {}  # the process's first output per (stage, object)
    res_out = cfg.mesh_decoder.output_resolution

    rnd = 1  # the round being measured (set by the loop below)

    executed: dict[tuple, dict[str, float]] = {}  # executed FLOPs (per class) per (stage, object, FLOP switches)

    def executed_tflop(variant: str, stage: str, obj: str | None, flop_class: str = "total") -> float:
        """Model FLOPs for the official code and the mesh decoder (they skip nothing); counted for our samplers.
        ``flop_class`` ("attention", "matmul", "conv") gives one class of a counted sampler (NaN where only the
        model total is known)."""
        model = flops.get((stage, obj), float("nan"))
        if variant in OFFICIAL_VARIANTS or stage == "mesh" or model != model:
            return model / 1e12 if flop_class == "total" else float("nan")
        full = variant_options(variant)
        opts = counting_options(full)
        moved = tuple(getattr(full, k) for k in MOVED_FLOP_OPTIONS) if stage == "slat" else ()
        key = (stage, obj) + tuple(getattr(opts, k) for k in FLOP_OPTIONS) + moved
        if key not in executed:
            if not any(getattr(opts, k) for k in FLOP_OPTIONS) and not any(moved):
                executed[key] = {"total": model}  # nothing skipped: the model count
            elif stage == "ss":
                executed[key] = executed_flops(base.ss, lambda: ours_ss_fn(base.ss, noise_ss, cond["ss"],
                                                                           cfg.ss_sampler, opts), dev)
            else:
                executed[key] = executed_flops(base.slat, lambda: ours_slat_fn(
                    base.slat, noise_slat[obj], cond["slat"], coords[obj], cfg.slat_sampler, opts), dev,
                    switches=full)
        return executed[key].get(flop_class, float("nan")) / 1e12

    if args.flops_only:
        return flops_only_rows(args, flops, executed_tflop, coords, meta)

    def unit(variant: str, stage: str, obj: str | None, module: torch.nn.Module, make_fn, post, precision: str):
        row = {"round": rnd, "variant": variant, "stage": stage, "object": obj,
               "N": None if obj is None else len(coords[obj]), "precision": precision,
               "model_tflop": flops.get((stage, obj), float("nan")) / 1e12}
        try:  # an auxiliary count: a failure leaves it empty and keeps the timing
            row["executed_tflop"] = executed_tflop(variant, stage, obj)
        except Exception:
            traceback.print_exc()
            print(f"executed FLOPs of {variant} {stage} {obj or ''} not counted (see above)", flush=True)
        kernel_calls_before = Counter(FA4_KERNEL_CALL.counts)
        try:
            module.to(dev)
            with torch.no_grad():
                fn = make_fn()
                # the host's speed right before the unit: tells a slow-host unit apart from a slower variant
                row["host_probe_us"] = probe_host(dev).us_per_op
                out, r = measure(fn, dev, args.warmup, args.repeats, freeze_gc=args.python_gc == "frozen")
                if args.gpu_busy and rnd == 1:
                    k = kernel_time(fn, dev)
                    r.update(kernel_s=k.seconds, launches=k.launches, gpu_busy=k.seconds / r["median_s"],
                             kernels=k.by_kernel, timeline=k.timeline, idle_before=k.idle_before,
                             after=k.after)
            row.update(r)
            got = post(out)
            if variant == "official" and (stage, obj) not in ref_out:
                ref_out[(stage, obj)] = got
                row.update(max_abs_vs_official=0.0, rel_vs_official=0.0)
            elif (stage, obj) in ref_out:
                d, rel = difference(ref_out[(stage, obj)], got)
                row.update(max_abs_vs_official=d, rel_vs_official=rel)
            if (stage, obj) not in first_out:
                first_out[(stage, obj)] = got
                row.update(max_abs_vs_first=0.0)
            else:
                try:
                    row.update(max_abs_vs_first=difference(first_out[(stage, obj)], got)[0])
                except ValueError:  # meshes over other voxel sets: no row-by-row difference (not the unit's error)
                    row.update(max_abs_vs_first=float("nan"))
        except Exception as exc:  # keep going: one failing unit must not lose the others
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
            row.setdefault("median_s", float("nan"))
        finally:
            module.to("cpu")  # also drops our SS stage's held K/V (SSStage._apply), which would inflate later units
            _free(dev)
        record_fa4_kernel_calls(meta, f"{rnd} {variant} {stage} {obj or ''}", kernel_calls_before)
        rows.append(row)
        print(f"{'round ' + str(rnd) + ' ' if args.rounds > 1 else ''}{variant:>16} {stage:>4} {obj or '':>20} "
              f"N={row['N'] or '':>6} "
              f"median {row.get('median_s', float('nan')):.4f} s  first {row.get('first_call_s', float('nan')):.3f} s"
              + (f"  gc {row['gc_ms_per_call']:.1f} ms/call ({row['gc_gen2_per_call']:.2f} full)"
                 if "gc_ms_per_call" in row else "")
              + (f"  host probe {row['host_probe_us']:.2f} us/op" if "host_probe_us" in row else "")
              + (f"  ERROR {row['error']}" if row.get("error") else ""), flush=True)
        write_outputs(rows, args.out, meta)  # after every unit: a killed run keeps its rows

    ss_post = lambda out: {k: v.float().cpu() for k, v in out.items()}  # noqa: E731
    slat_post = lambda out: out.float().cpu()  # noqa: E731
    mesh_post = lambda out: mesh_output(out, res_out)  # noqa: E731
    off_prec = ("SS fp32+fp16 autocast; SLaT fp16 torso+fp16 autocast; mesh fp16 torso"
                if args.official_precision == "pipeline" else "fp32")
    copies: dict[tuple[str, str], torch.nn.Module] = {}
    for rnd in range(1, args.rounds + 1):
        if args.peak_every_round and meta["peak_tflops"] is not None:
            record_round_peak(meta, dev, rnd)
        for variant in round_order(args.variants, rnd, args.order):
            if variant in OFFICIAL_VARIANTS:
                compiled = variant == "official-compile"
                for stage in args.stages:
                    if compiled and stage != "ss":
                        print(f"official-compile: the pipeline compiles nothing in the {stage} stage "
                              "(same as official); skipped", flush=True)
                        continue
                    if stage == "ss":
                        gen = off.ss_generator
                        cfgf = gen.reverse_fn
                        saved = cfgf.__dict__.get("inner_forward")
                        if compiled:
                            import torch._dynamo as dynamo
                            dynamo.config.cache_size_limit = 64
                            dynamo.config.accumulated_cache_size_limit = 2048
                            dynamo.config.capture_scalar_outputs = True
                            cfgf.inner_forward = torch.compile(type(cfgf).inner_forward.__get__(cfgf),
                                                               mode=args.official_compile_mode, fullgraph=True,
                                                               dynamic=False)
                        try:
                            unit(variant, "ss", None, gen, lambda: official_ss_fn(gen, noise_ss, cond["ss"], dev, args.official_precision),
                                 ss_post, off_prec + (f" + torch.compile({args.official_compile_mode})" if compiled else ""))
                        finally:
                            if compiled:
                                if saved is None:
                                    cfgf.__dict__.pop("inner_forward", None)
                                else:
                                    cfgf.inner_forward = saved
                        continue
                    for o in args.objects:
                        if stage == "slat":
                            gen = off.slat_generator
                            unit(variant, "slat", o, gen,
                                 lambda: official_slat_fn(gen, noise_slat[o], cond["slat"], coords[o], dev,
                                                          args.official_precision),
                                 slat_post, off_prec)
                        else:
                            dec = off.mesh_decoder
                            unit(variant, "mesh", o, dec, lambda: official_mesh_fn(dec, latent[o], coords[o]),
                                 mesh_post, off_prec)
                continue
            opts = variant_options(variant)
            for stage in args.stages:
                st = copies.get((variant, stage))
                if st is None:
                    st = stage_copy({"ss": base.ss, "slat": base.slat, "mesh": base.decode}[stage], opts.weight_dtype)
                    if rnd < args.rounds:  # kept for the next round: a compiled copy compiles once
                        copies[(variant, stage)] = st
                if stage == "ss":
                    unit(variant, "ss", None, st, lambda: ours_ss_fn(st, noise_ss, cond["ss"], cfg.ss_sampler, opts),
                         ss_post, opts.precision)
                for o in args.objects if stage != "ss" else ():
                    if stage == "slat":
                        unit(variant, "slat", o, st,
                             lambda: ours_slat_fn(st, noise_slat[o], cond["slat"], coords[o], cfg.slat_sampler, opts),
                             slat_post, opts.precision)
                    else:
                        unit(variant, "mesh", o, st, lambda: ours_mesh_fn(st, latent[o], coords[o], opts, dev),
                             mesh_post, opts.precision)
                del st
    if rows and meta["peak_tflops"] is not None:  # the end's measurement; every MFU is then against the larger
        try:
            record_matmul_peak(meta, dev)
        except Exception:  # the rows are written already: keep them against the start's peak, and say so
            traceback.print_exc()
            print("the matmul peak could not be measured again at the end; MFU stays against the start's", flush=True)
        else:
            meta["peak_at_end"] = True
            print(f"matmul peak measured again: {meta['peak_tflops_runs'][-1]:.0f} TFLOP/s; MFU against "
                  f"{meta['peak_tflops']:.0f}", flush=True)
            write_outputs(rows, args.out, meta)
    return rows


def record_round_peak(meta: dict, dev: torch.device, rnd: int, measure=None) -> None:
    """``--peak-every-round``: round ``rnd``'s matmul peak into ``meta["peak_tflops_by_round"]`` (round 1's is the run's
    start measurement; later rounds measure again through :func:`record_matmul_peak`, ``measure`` as there). A failed
    measurement leaves that round without a peak of its own (its rows keep MFU against the largest) instead of ending
    the run."""
    if rnd > 1:
        try:
            record_matmul_peak(meta, dev, measure)
        except Exception:
            traceback.print_exc()
            print(f"round {rnd}: the matmul peak could not be measured; the round has no peak of its own", flush=True)
            return
    meta.setdefault("peak_tflops_by_round", {})[str(rnd)] = meta["peak_tflops_runs"][-1]
    print(f"round {rnd}: matmul peak {meta['peak_tflops_runs'][-1]:.0f} TFLOP/s", flush=True)


def record_fa4_kernel_calls(meta: dict, unit: str, before: Counter) -> None:
    """``fa4_call="kernel"``: how a unit's FA4 calls went since ``before`` (a copy of ``FA4_KERNEL_CALL.counts``):
    "primed", "launched" and "fell back", under ``meta["fa4_kernel_call_counts"][unit]``, so that a timing on the kernel
    path shows whether it launched the compiled kernel or fell back to FA4's forward. Nothing for a unit without such
    calls."""
    calls = FA4_KERNEL_CALL.counts - before
    if calls:
        meta.setdefault("fa4_kernel_call_counts", {})[unit] = dict(calls)


FLOPS_CSV_NAME = "flops.csv"


def flops_only_rows(args, flops: dict, executed_tflop, coords: dict, meta: dict) -> list[dict]:
    """``--flops-only``: model and executed TFLOP of every variant and unit, written to flops.csv and README.md."""
    import csv
    rows = []
    for variant in args.variants:
        for (stage, obj), model in flops.items():
            rows.append(dict(variant=variant, stage=stage, object=obj, N=None if obj is None else len(coords[obj]),
                             model_tflop=model / 1e12, executed_tflop=executed_tflop(variant, stage, obj),
                             **{f"executed_{c}_tflop": executed_tflop(variant, stage, obj, c) for c in FLOP_CLASSES}))
            print(f"{variant:>16} {stage:>4} {obj or '':>20} model {rows[-1]['model_tflop']:.4f} "
                  f"executed {rows[-1]['executed_tflop']:.4f} TFLOP", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cols = ["variant", "stage", "object", "N", "model_tflop", "executed_tflop"] + [
        f"executed_{c}_tflop" for c in FLOP_CLASSES]
    with open(args.out / FLOPS_CSV_NAME, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows({k: ("" if r[k] is None or r[k] != r[k] else r[k]) for k in cols} for r in rows)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    lines = ["# Model and executed FLOPs per unit (`base_vs_official.py --flops-only`)", "",
             f"Config `{meta.get('config')}`, condition tokens {meta.get('cond_tokens')}, sampler steps SS "
             f"{meta.get('ss_steps')}, SLaT {meta.get('slat_steps')}. Model: one network pass in full x the "
             "sampler's passes (what the official code runs). Executed: one sampler run with the variant's "
             "FLOP-changing switches (condition K/V cache, one-key K/V of the zero condition; the split condition "
             "K/V and the coarse up-sampling taken off the count from the same run's shapes, `moved_flops`).", "",
             "Per class: the executed FLOPs of attention (SDPA / FA4), matmuls, and convolutions (dense ones and "
             "SLaT's sparse ones, attributed per `SparseConv3d` module whatever operators they count as); empty where "
             "nothing is skipped and only the model total was counted.", "",
             "| variant | stage | object | N | model TFLOP | executed TFLOP | executed / model | attention | matmul "
             "| conv |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {STAGE_LABELS.get(r['stage'], r['stage'])} | {r['object'] or ''} | "
              f"{_fmt(r['N'], 'd')} | {r['model_tflop']:.4f} | {r['executed_tflop']:.4f} | "
              f"{r['executed_tflop'] / r['model_tflop']:.3f} | "
              + " | ".join(_fmt(r[f"executed_{c}_tflop"], ".4f") for c in FLOP_CLASSES) + " |" for r in rows]
    (args.out / README_NAME).write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--replot"]:  # re-render a finished run's README and figures from its files
        if len(argv) != 2:
            raise SystemExit("usage: base_vs_official.py --replot OUTPUT_FOLDER")
        rows, meta = load_outputs(Path(argv[1]))
        write_outputs(rows, Path(argv[1]), meta)
        print(f"re-rendered {argv[1]} from its {CSV_NAME}" + (f" and {KERNELS_CSV_NAME}" if any(
            r.get("kernels") for r in rows) else ""), flush=True)
        return
    # the workspace before parse_args: its device checks query the GPU, which initialises CUDA, after which the size
    # may no longer apply (PyTorch reads it once per process); a negative size is left to parse_args' message
    early = build_parser().parse_args(argv)
    if early.cublaslt_workspace_kib is not None and early.cublaslt_workspace_kib >= 0:
        set_cublaslt_workspace(early.cublaslt_workspace_kib)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    print((args.out / README_NAME).read_text())
    failed = [r for r in rows if r.get("error")]
    if failed:
        print(f"{len(failed)} unit(s) failed; see the error column", flush=True)


if __name__ == "__main__":
    main()
