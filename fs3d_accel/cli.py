"""``fs3d`` command line: run the pipeline, build data, profile, evaluate, calibrate, reproduce."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def workspace_arg(raw: str) -> str | int:
    """``--cublaslt-workspace-kib``: ``auto`` or a whole number of KiB >= 0 (argparse type: anything else raises
    ArgumentTypeError, which argparse reports as a usage error naming the option)."""
    if raw == "auto":
        return raw
    try:
        kib = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a whole number of KiB >= 0, got {raw!r}") from None
    if kib < 0:
        raise argparse.ArgumentTypeError(f"a workspace size must be >= 0 KiB, got {kib}")
    return kib


def chosen_workspace_kib(setting: str | int, fast_path_name: str, device: str) -> int | None:
    """The cuBLASLt workspace (KiB) ``--cublaslt-workspace-kib setting`` asks for, None for PyTorch's default.

    ``auto``: 0 on CUDA for a fast path with the GELU epilogue (``RunOptions.gelu_epilogue``, the ``-ge`` paths), whose
    bias/GELU-epilogue GEMMs otherwise run a dynamically scheduled kernel with a memset in front of every call
    (``fs3d_accel.cuda_settings``), unless ``CUBLASLT_WORKSPACE_SIZE`` is exported, which then stands; otherwise
    PyTorch's default (also for a name that is not a fast path, which the caller refuses). A number is taken as given.
    Why 0: with it the named fastest path's SLaT call was faster in 4 of 4 consecutive process pairs on H100s and its
    SS call in 3 of 3 (sessions 26-27, 0.4-1.5% with one pair at 4.4%), and its outputs on sam3d-mini's 28 objects
    were the same (``benchmarks/results/base_vs_official_h100/session27/``)."""
    from .cuda_settings import cublaslt_workspace_kib
    from .stages.options import FAST_PATHS
    if setting != "auto":
        return int(setting)
    exported = cublaslt_workspace_kib()
    if exported is not None:
        return exported
    import torch
    options = FAST_PATHS.get(fast_path_name)
    if torch.device(device).type == "cuda" and options is not None and options.gelu_epilogue:
        return 0
    return None


def apply_workspace_setting(setting: str | int, fast_path_name: str, device: str) -> int | None:
    """Set the cuBLASLt workspace ``--cublaslt-workspace-kib`` asks for (:func:`chosen_workspace_kib`); returns it.

    A number that can no longer apply (CUDA already initialised in this process with another value) is refused with
    SystemExit. ``auto`` is a preference: where it can no longer apply, it warns and leaves the process as it is."""
    import warnings
    from .cuda_settings import set_cublaslt_workspace
    try:
        kib = chosen_workspace_kib(setting, fast_path_name, device)
        if kib is not None:
            set_cublaslt_workspace(kib)
        return kib
    except RuntimeError as e:
        if setting == "auto":
            warnings.warn(f"--cublaslt-workspace-kib auto: not applied ({e})", RuntimeWarning, stacklevel=2)
            return None
        raise SystemExit(f"--cublaslt-workspace-kib: {e}") from e
    except ValueError as e:
        raise SystemExit(f"--cublaslt-workspace-kib: {e}") from e


def _load_pipeline(args) -> "object":
    from .pipeline import Pipeline
    from .stages.options import fast_path
    # first: PyTorch reads the workspace once per process, and the device checks below may initialise CUDA
    apply_workspace_setting(getattr(args, "cublaslt_workspace_kib", "auto"), getattr(args, "fast_path", "off"),
                            args.device)
    try:
        options = fast_path(getattr(args, "fast_path", "off"))
        options.check_device(args.device)
    except ValueError as e:
        raise SystemExit(f"--fast-path: {e}") from e
    slat_mode = getattr(args, "slat_compile_mode", None)
    if slat_mode is not None:
        import dataclasses
        try:
            options = dataclasses.replace(options, slat_compile_mode=slat_mode)
        except ValueError as e:
            raise SystemExit(f"--slat-compile-mode: {e}") from e
    if args.checkpoint:
        pipe = Pipeline.from_checkpoint(args.checkpoint, config=args.config, device=args.device)
    elif args.weights == "random":
        pipe = Pipeline.from_config(args.config or "mini", device=args.device)
    else:
        pipe = Pipeline.from_pretrained(args.weights, device=args.device)
    return pipe.with_options(options)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="sam3d-mini", help="shipped weights name, or 'random' (seeded random init)")
    p.add_argument("--checkpoint", default=None, help="official checkpoint folder or our model.safetensors")
    p.add_argument("--config", default=None, help="config name (mini|full) for --checkpoint / random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast-path", default="off", choices=list(_fast_path_names()),
                   help="exact fast-path setting: off (fp32 reference), fp32-cfg-kv, bf16 (bf16 weights, batched CFG, "
                        "cached condition K/V), compiled (+ torch.compile, CUDA), compiled-zkv (+ one-key K/V of the "
                        "zero condition, CUDA), compiled-zkv-ro (+ CUDA graphs), compiled-zkv-fa4 (+ FlashAttention-4 "
                        "in SLaT and CUDA graphs; needs flash_attn.cute), compiled-zkv-fa4-all (FlashAttention-4 in SS "
                        "too), compiled-zkv-fa4-all-sqfa2 (+ the SS layout stream's 4-query attention on SDPA's "
                        "FlashAttention-2), compiled-zkv-fa4-all-sqfa2-ge (+ the MLPs' GELU in the GEMM epilogue), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac (+ SLaT passes as whole CUDA graphs recorded without a "
                        "device sync: the fastest per object when objects repeat, session 16), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-fd (-ge-ac with FA4 called through an operator of our own "
                        "that calls FA4's forward function directly: bit-identical, less host time per call; SLaT "
                        "per object faster in 6 of 6 rounds at 14k on an H100, session 21; inference only), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-fk (-ge-ac with FA4's cached compiled kernel launched "
                        "directly: bit-identical, 23-37 us of host per FA4 call; per object a little faster than "
                        "-fd, session 21; inference only), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-stream (the GELU epilogue in SS only and SLaT's graphs "
                        "recorded at their first call: the fastest SLaT call over a stream of new object sizes on "
                        "an H200 at 12-20k voxels and an H100 at 4-6k, session 17; on an H100 at 12-20k, timed "
                        "with the early batch-1 recording added, no faster than -ge-ac, session 18), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces (-ge-ac with SLaT's graphs recorded at their first "
                        "call in pieces of 2 blocks, each run while the host records the next: SLaT per object at "
                        "14k 0.518 s against 0.529-0.588 s for -ge-ac on an H100; over new sizes of 12-20k no faster, "
                        "session 19), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi (the pieces path with every "
                        "SLaT switch timed on it since, the suffixes of base_vs_official.py: SLaT at 14k "
                        "0.478-0.485 s against 0.499-0.501 s on an H100, session 25; inference only), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci (the same "
                        "with the condition K/V made lean and the IO modulations kept per step; faster in 7 of 8 "
                        "rounds at 14k on H100s, sessions 28-29, the same sam3d-mini results, session 30), "
                        "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk (the fastest: the same "
                        "with the condition rows' K/V projected once per call; faster in 6 of 7 rounds at 14k on "
                        "H100s, session 30, the same sam3d-mini results on an H200, session 31)")
    p.add_argument("--cublaslt-workspace-kib", default="auto", type=workspace_arg,
                   help="cuBLASLt workspace for the whole process, in KiB (fs3d_accel.cuda_settings). auto (default): "
                        "0 for a fast path with the GELU epilogue (-ge) on CUDA, which removes a memset in front of "
                        "each bias/GELU-epilogue GEMM (the named fastest path's SS and SLaT calls faster in every "
                        "A/B pair of processes on H100s, sessions 26-27), unless CUBLASLT_WORKSPACE_SIZE is exported; "
                        "otherwise PyTorch's default. A number sets it (must come before any GPU work of the process)")
    p.add_argument("--slat-compile-mode", default=None, choices=_compile_modes(),
                   help="SLaT's own torch.compile mode, overriding the fast path's for SLaT only (e.g. 'default' to "
                        "skip SLaT's per-object CUDA-graph captures: 0.17 s per new object size faster on an H100 in session 12, "
                        "slower on one host in session 11, and 0.27-0.44 s slower with FlashAttention-4 in SLaT in "
                        "session 13)")


def _compile_modes():
    from .stages.options import COMPILE_MODES
    return COMPILE_MODES


def _fast_path_names():
    from .stages.options import FAST_PATHS
    return FAST_PATHS


def cmd_run(args) -> int:
    """Reconstruct one object: from an image/mask/point-map .npz or a shipped sample index."""
    import numpy as np
    pipe = _load_pipeline(args)
    if args.sample is not None:
        from fs3d_analysis.data import load_shipped_samples
        s = load_shipped_samples()[args.sample]
        image, mask, pointmap = s.image, s.mask, s.pointmap
    else:
        if not args.inputs:
            raise SystemExit("give --sample N or --inputs file.npz (arrays image, mask, pointmap)")
        data = np.load(args.inputs)
        missing = {"image", "mask", "pointmap"} - set(data.files)
        if missing:
            raise SystemExit(f"{args.inputs} lacks arrays: {sorted(missing)}")
        image, mask, pointmap = data["image"], data["mask"], data["pointmap"]
    if args.method != "base":
        from .accel.presets import method_factory
        pipe.with_accel(method_factory(args.method)())
    res = pipe(image, mask, pointmap=pointmap, seed=args.seed)
    out = Path(args.out)
    res.posed_mesh.export(out) if args.posed else res.mesh.export(out)
    lay = res.layout
    print(f"wrote {out} ({len(res.mesh.vertices)} vertices, {len(res.mesh.faces)} faces)")
    print(f"layout: scale {lay.scale.round(4).tolist()} translation {lay.translation.round(4).tolist()}")
    print("stage seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in res.timings.items()))
    return 0


def cmd_reproduce(args) -> int:
    from fs3d_analysis.report import reproduce
    try:
        reproduce(out_dir=Path(args.out), device=args.device, quick=args.quick, weights=args.weights,
                  config=args.config, allow_random=args.allow_random)
    except ValueError as e:
        raise SystemExit(f"fs3d reproduce: {e}") from e
    return 0


def cmd_data(args) -> int:
    from fs3d_analysis.data.corpus import build_corpus
    manifest = build_corpus(root=args.root, resolution=args.resolution, progress=True)
    print(manifest)
    return 0


def cmd_eval(args) -> int:
    from fs3d_analysis.eval import main as eval_main
    return eval_main(args)


def cmd_calibrate(args) -> int:
    from fs3d_analysis.calibrate import main as calibrate_main
    return calibrate_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fs3d", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="reconstruct one object to a mesh file")
    _add_model_args(p)
    p.add_argument("--sample", type=int, default=None, help="index of a shipped sample")
    p.add_argument("--inputs", default=None, help=".npz with image (HxWx3 uint8), mask (HxW bool), pointmap (HxWx3)")
    p.add_argument("--method", default="base", help="accelerator: base, fast-sam3d, taylorseer, ..., or preset:NAME|PATH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--posed", action="store_true", help="export the mesh in the camera frame")
    p.add_argument("--out", default="runs/mesh.glb")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("reproduce", help="the whole story on the embedded model: report under runs/")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default="sam3d-mini")
    p.add_argument("--quick", action="store_true", help="fewer objects and repeats (CI)")
    p.add_argument("--config", choices=["mini", "full"], default=None,
                   help="model size: mini (embedded trained model; default on cpu) or full (default on cuda; "
                   "weights from FS3D_CHECKPOINT)")
    p.add_argument("--allow-random", action="store_true",
                   help="full size without FS3D_CHECKPOINT: random weights, timings only")
    p.set_defaults(fn=cmd_reproduce)

    p = sub.add_parser("data", help="build the shape corpus (evaluation + training split)")
    p.add_argument("action", choices=["build"])
    p.add_argument("--root", default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("eval", help="evaluate methods on a dataset -> tidy table")
    _add_model_args(p)
    p.add_argument("--methods", default="base,fast-sam3d",
                   help="comma-separated method names; preset:NAME|PATH for a calibrated preset")
    p.add_argument("--dataset", default="shipped")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--ray", action="store_true", help="spread (object, method) pairs over Ray actors (one model "
                   "replica each: one per GPU with --device cuda, else one per CPU)")
    p.add_argument("--workers", type=int, default=None, help="number of Ray actors (default: GPUs or CPUs)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("calibrate", help="search accelerator thresholds under a quality constraint")
    _add_model_args(p)
    p.add_argument("--dataset", default="shipped")
    p.add_argument("--limit", type=int, default=None, help="first N objects of the dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--max-f1-drop", type=float, default=0.5, help="allowed mean F1@0.05 loss, points (0-100)")
    p.add_argument("--max-viou-drop", type=float, default=0.01, help="allowed mean volumetric-IoU loss (0-1)")
    p.add_argument("--objective", choices=["wall", "passes"], default="wall",
                   help="speedup to maximise: measured wall time, or network-pass equivalents (deterministic; "
                   "the better proxy for a large model when calibrating with a small one)")
    p.add_argument("--quality", choices=["fast", "exact"], default="fast",
                   help="vIoU from filled surface voxels (fast) or winding numbers as fs3d eval scores (exact)")
    p.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    p.add_argument("--out", default="runs/calibrate")
    p.add_argument("--ray", action="store_true", help="measure each trial's objects in parallel on Ray actors (one "
                   "model replica each: one per GPU with --device cuda, else one per CPU)")
    p.add_argument("--workers", type=int, default=None, help="number of Ray actors (default: GPUs or CPUs)")
    p.set_defaults(fn=cmd_calibrate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
