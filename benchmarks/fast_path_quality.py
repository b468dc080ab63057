"""Does the exact fast path change what sam3d-mini reconstructs? Quality with each switch on and off.

Runs the embedded sam3d-mini (base method, no accelerator) over held-out YCB objects under several
``RunOptions`` and scores every result against the ground truth (``fs3d_analysis.eval.score``):

* ``fp32``: the reference;
* ``fp32 + batched CFG + K/V cache``: exact rearrangements (floating-point reassociation only);
* ``bf16 + batched CFG + K/V cache``: bf16 weights, what the GPU timings use;
* ``... + torch.compile (SS, SLaT blocks)``: CUDA only;
* ``... + one-key K/V of the zero condition``: compiled, CUDA only; and the same switch without compilation in
  fp32 (``fp32-cfg-zkv``) and bf16 (``bf16-cfg-zkv``), which run on a CPU too;
* ``... + FlashAttention-4 in SLaT, CUDA graphs`` (``compile-all-zkv-fa4-slat-ro``): CUDA with ``flash_attn.cute``;
* the same two compiled settings with the sparse-conv algorithm before session 8 (``compile-all-zkv-gt``,
  ``compile-all-zkv-fa4-slat-ro-gt``), against the Triton implicit GEMM that CUDA runs by default since then.

The SLaT coordinate-structure cache is always on, and the sparse conv is ``"auto"`` unless a setting names one (the
Triton implicit GEMM for half precision on CUDA since session 8; elsewhere "gather-or-transform": the gather, or on
CUDA the transform where C_in >= 8 C_out).
Besides the comparison with fp32, every setting that adds one switch to another setting is compared with that
setting (``ONE_SWITCH_REF``; asking for the first brings the second along), so a switch's own effect is not
mixed with the precision's.

    python benchmarks/fast_path_quality.py --out benchmarks/results/fast_path_quality_cpu
    python benchmarks/fast_path_quality.py --device cuda --settings fp32,bf16-cfg-kv,compile-all
    python benchmarks/fast_path_quality.py --settings fp32-cfg-zkv,bf16-cfg-zkv
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stage_latency import SHORT as _LATENCY_SHORT, VARIANTS as _LATENCY_VARIANTS  # noqa: E402
from fs3d_accel.cuda_settings import cublaslt_workspace_kib, set_cublaslt_workspace  # noqa: E402
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_accel.stages.options import RunOptions  # noqa: E402
from fs3d_analysis.data import load_shipped_samples  # noqa: E402
from fs3d_analysis.eval import run_one, score  # noqa: E402

_CFG_KV = dict(batch_cfg=True, cache_cond_kv=True)
_COMPILED = dict(precision="bf16", compile_ss=True, compile_slat=True, **_CFG_KV)
SETTINGS = {
    "fp32": RunOptions(),
    "fp32 + batched CFG + K/V cache": RunOptions(**_CFG_KV),
    "bf16 + batched CFG + K/V cache": RunOptions(precision="bf16", **_CFG_KV),
    "bf16 + batched CFG + K/V cache + torch.compile (SS, SLaT blocks)": RunOptions(**_COMPILED),
    "... + one-key K/V of the zero condition": RunOptions(collapse_zero_cond=True, **_COMPILED),
    "fp32 + batched CFG + K/V cache + one-key K/V of the zero condition": RunOptions(collapse_zero_cond=True,
                                                                                    **_CFG_KV),
    "bf16 + batched CFG + K/V cache + one-key K/V of the zero condition": RunOptions(
        precision="bf16", collapse_zero_cond=True, **_CFG_KV),
    "... + one-key K/V + FlashAttention-4 in SLaT, CUDA graphs (reduce-overhead)": RunOptions(
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",),
        compile_mode="reduce-overhead", **_COMPILED),
    # the sparse-conv algorithm before session 8: on a GPU the settings above use the Triton implicit GEMM ("auto")
    "... + one-key K/V + FlashAttention-4 in SLaT, CUDA graphs, gather-or-transform sparse conv": RunOptions(
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("slat",),
        compile_mode="reduce-overhead", sparse_conv="gather-or-transform", **_COMPILED),
    # the same conv switch without FA4 (which travels to the GPU machine in three calls): compile-all-zkv with the
    # sparse-conv algorithm before session 8
    "... + one-key K/V of the zero condition, gather-or-transform sparse conv": RunOptions(
        collapse_zero_cond=True, sparse_conv="gather-or-transform", **_COMPILED),
    # FA4 in SS too (session 12: faster than cuDNN per kernel at every site when timed from CUDA graphs)
    "... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs (reduce-overhead)": RunOptions(
        collapse_zero_cond=True, attention_kernel="flash-attn-cute", attention_kernel_sites=("ss", "slat"),
        compile_mode="reduce-overhead", **_COMPILED),
}
# the SS layout stream's 4-query attention as fp32 matmuls (session 12's candidate; slower per call, session 13)
SETTINGS["... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs, small-query attention as matmuls"] = (
    dataclasses.replace(SETTINGS["... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs (reduce-overhead)"],
                        small_query_attention=16))
# the same calls through SDPA's FlashAttention-2, which splits the keys (``compiled-zkv-fa4-all-sqfa2``)
SETTINGS["... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs, small-query attention by FlashAttention-2"] = (
    dataclasses.replace(SETTINGS["... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs (reduce-overhead)"],
                        small_query_attention=16, small_query_kernel="sdpa-flash2"))
# the MLPs' first GEMM with cuBLASLt's bias + GELU epilogue, on compile-all-zkv (no FA4: one call can run it)
SETTINGS["... + one-key K/V of the zero condition, GELU in the GEMM epilogue"] = dataclasses.replace(
    SETTINGS["... + one-key K/V of the zero condition"], gelu_epilogue=True)
# the same epilogue on ``compiled-zkv-fa4-all-sqfa2`` (the named path ``compiled-zkv-fa4-all-sqfa2-ge``)
SETTINGS["... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs, small-query attention by FlashAttention-2, "
         "GELU in the GEMM epilogue"] = dataclasses.replace(
    SETTINGS["... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs, small-query attention by FlashAttention-2"],
    gelu_epilogue=True)
# the SLaT candidates of session 14 on that path, one switch each: token buckets for the torso (padding masked as keys;
# the same values up to rounding, which this measures), and the IO res-blocks' element-wise steps compiled (inductor
# drops the bf16 rounding between them)
_GE = ("... + one-key K/V + FlashAttention-4 in SS and SLaT, CUDA graphs, small-query attention by FlashAttention-2, "
       "GELU in the GEMM epilogue")
for _label, _switch in ((", SLaT token buckets", {"slat_token_bucket": 1 / 16}),
                        (", fused SLaT IO steps", {"fuse_slat_io": True})):
    SETTINGS[_GE + _label] = dataclasses.replace(SETTINGS[_GE], **_switch)
# session 15's SLaT: whole-pass CUDA graphs (one step: SLaT's compile mode without graphs of its own, so that the pass
# can be captured whole), then the same recorded without a sync (the unguided tables built early, without a pass), each with the
# fused IO steps. Both replay the same compiled kernels as the setting they build on
SETTINGS[_GE + ", SLaT passes as whole CUDA graphs, fused SLaT IO steps"] = dataclasses.replace(
    SETTINGS[_GE + ", fused SLaT IO steps"], slat_compile_mode="default", cuda_graphs=True)
SETTINGS[_GE + ", SLaT passes as whole CUDA graphs recorded without a sync, fused SLaT IO steps"] = dataclasses.replace(
    SETTINGS[_GE + ", SLaT passes as whole CUDA graphs, fused SLaT IO steps"], async_graph_capture=True)
# session 17's path for streams of new object sizes (``compiled-zkv-fa4-all-sqfa2-ge-ac-stream``): the GELU epilogue in
# SS only (SLaT's and the mesh decoder's GELU outside the GEMM), and SLaT's graphs recorded at their first call from the
# second object on (the same values as the warmed recording: a GPU test checks it bit for bit)
SETTINGS[_GE + ", SLaT passes as whole CUDA graphs recorded without a sync or a warm-up pass, GELU epilogue in SS only, "
         "fused SLaT IO steps"] = dataclasses.replace(
    SETTINGS[_GE + ", SLaT passes as whole CUDA graphs recorded without a sync, fused SLaT IO steps"],
    gelu_epilogue_sites=("ss",), graph_record_first=True)
SHORT = dict(zip(("fp32", "fp32-cfg-kv", "bf16-cfg-kv", "compile-all", "compile-all-zkv", "fp32-cfg-zkv",
                  "bf16-cfg-zkv", "compile-all-zkv-fa4-slat-ro", "compile-all-zkv-fa4-slat-ro-gt",
                  "compile-all-zkv-gt", "compile-all-zkv-fa4-ro", "compile-all-zkv-fa4-ro-sq",
                  "compile-all-zkv-fa4-ro-sqfa2", "compile-all-zkv-ge", "compile-all-zkv-fa4-ro-sqfa2-ge",
                  "compile-all-zkv-fa4-ro-sqfa2-ge-tb", "compile-all-zkv-fa4-ro-sqfa2-ge-io",
                  "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io", "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac",
                  "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-sg"), SETTINGS))
#: setting -> the setting it differs from by one switch (same weights and precision unless the switch is it); a named
#: path's setting maps to the setting it extends, several switches apart (see where it is added below)
ONE_SWITCH_REF = {SHORT["compile-all"]: SHORT["bf16-cfg-kv"], SHORT["compile-all-zkv"]: SHORT["compile-all"],
                  SHORT["fp32-cfg-zkv"]: SHORT["fp32-cfg-kv"], SHORT["bf16-cfg-zkv"]: SHORT["bf16-cfg-kv"],
                  # one step (FA4's kernel in SLaT; CUDA graphs replay the compiled kernels unchanged)
                  SHORT["compile-all-zkv-fa4-slat-ro"]: SHORT["compile-all-zkv"],
                  # one switch: the sparse-conv algorithm (implicit GEMM -> gather-or-transform)
                  SHORT["compile-all-zkv-fa4-slat-ro-gt"]: SHORT["compile-all-zkv-fa4-slat-ro"],
                  SHORT["compile-all-zkv-gt"]: SHORT["compile-all-zkv"],
                  # one switch: FA4's kernel at SS's attention too
                  SHORT["compile-all-zkv-fa4-ro"]: SHORT["compile-all-zkv-fa4-slat-ro"],
                  # one switch: the small-query path
                  SHORT["compile-all-zkv-fa4-ro-sq"]: SHORT["compile-all-zkv-fa4-ro"],
                  SHORT["compile-all-zkv-fa4-ro-sqfa2"]: SHORT["compile-all-zkv-fa4-ro"],
                  # one switch: the GELU epilogue
                  SHORT["compile-all-zkv-ge"]: SHORT["compile-all-zkv"],
                  SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]: SHORT["compile-all-zkv-fa4-ro-sqfa2"],
                  SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-tb"]: SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"],
                  SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-io"]: SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"],
                  SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io"]: SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-io"],
                  SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"]: SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io"],
                  # one rounding switch (SLaT's and the decoder's GELU outside the GEMM); the first-call recording
                  # changes no value
                  SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-sg"]:
                      SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"]}
# session 25, on the headline path: each SLaT block's adaLN output computed once per step and kept across calls (the
# compiled torso no longer computes it in its own kernels: other rounding), then the unconditional rows' cross-attention
# projected once (a one-row GEMM instead of rows of the batch's)
_AC = SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"]
for _short, _base, _suffix, _switch in (
        ("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-cm", _AC, ", block modulations kept per step",
         {"cache_block_modulations": True}),
        ("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-cm-ok", _AC + ", block modulations kept per step",
         ", the unconditional rows' cross-attention projected once", {"one_key_projection": True})):
    SETTINGS[_base + _suffix] = dataclasses.replace(SETTINGS[_base], **_switch)
    SHORT[_short] = _base + _suffix
    ONE_SWITCH_REF[_base + _suffix] = _base
# the fastest SLaT variant of session 25's timings (``base_vs_official.py``'s variant of that name), against ``-ac-cm-ok``:
# it adds the pieces path's recording switches (which change no value), the nested tiled sparse conv and the merge from
# the inlined torso (both other rounding)
_FASTEST = "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi"
SETTINGS[_LATENCY_SHORT[_FASTEST]] = _LATENCY_VARIANTS[_LATENCY_SHORT[_FASTEST]]
SHORT[_FASTEST] = _LATENCY_SHORT[_FASTEST]
ONE_SWITCH_REF[SHORT[_FASTEST]] = SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-cm-ok"]
# its successor (sessions 28-29's timings, the named path since session 30's quality run): the lean condition K/V and the IO modulations kept per step, two
# switches that are exact on the CPU, against the named path itself
_LEAN = _FASTEST + "-lk-ci"
SETTINGS[_LATENCY_SHORT[_LEAN]] = _LATENCY_VARIANTS[_LATENCY_SHORT[_LEAN]]
SHORT[_LEAN] = _LATENCY_SHORT[_LEAN]
ONE_SWITCH_REF[SHORT[_LEAN]] = SHORT[_FASTEST]
# the named path of session 30 (``…-mi-lk-ci``) with the condition rows' K/V projected once per call (``-sk``: the
# same dot products, possibly other GEMM kernels on the GPU), against it; the named path ``…-mi-lk-ci-sk`` since its
# quality run in session 31 (the same results on all 28 objects)
_SPLIT = _LEAN + "-sk"
SETTINGS[_LATENCY_SHORT[_SPLIT]] = _LATENCY_VARIANTS[_LATENCY_SHORT[_SPLIT]]
SHORT[_SPLIT] = _LATENCY_SHORT[_SPLIT]
ONE_SWITCH_REF[SHORT[_SPLIT]] = SHORT[_LEAN]
# ... and the up-sampling block on the coarse rows (``-cu``: the same row-wise steps on fewer rows, the skip GEMM with
# fewer rows), against ``-sk``
_COARSE = _SPLIT + "-cu"
SETTINGS[_LATENCY_SHORT[_COARSE]] = _LATENCY_VARIANTS[_LATENCY_SHORT[_COARSE]]
SHORT[_COARSE] = _LATENCY_SHORT[_COARSE]
ONE_SWITCH_REF[SHORT[_COARSE]] = SHORT[_SPLIT]
DATASETS = {"shipped": None, "ycb_scale": Path(__file__).parent / "data" / "ycb_scale" / "objects"}
METRICS = ["f_score", "volume_iou", "chamfer", "box_iou_3d"]


def with_references(labels: list[str], chain: bool = True) -> list[str]:
    """``labels`` without repeats, each one-switch reference inserted before the first setting that needs it; with
    ``chain`` the references' own references too (down to a setting that has none), else only the direct ones."""
    out: list[str] = []

    def add(label: str, depth: int = 0) -> None:
        if label in out:
            return
        if label in ONE_SWITCH_REF and (chain or depth == 0):
            add(ONE_SWITCH_REF[label], depth + 1)
        out.append(label)

    for label in labels:
        add(label)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="shipped,ycb_scale", help=f"comma list of {sorted(DATASETS)}")
    ap.add_argument("--limit", type=int, default=None, help="objects per dataset (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/fast_path_quality")
    ap.add_argument("--settings", default=None,
                    help=f"comma list of {list(SHORT)} (default: all that run on the device; fp32 is always run "
                         "first, as the reference)")
    ap.add_argument("--direct-references", action="store_true",
                    help="with --settings: add only each setting's own one-switch reference, not the references' "
                         "references (a GPU call that ran the whole chain for one new setting ran out of time)")
    ap.add_argument("--cublaslt-workspace-kib", type=int, default=None,
                    help="cuBLASLt workspace for the whole process (KiB; fs3d_accel.cuda_settings): 0 as in "
                         "base_vs_official.py's timing of it, to check that the GEMM kernels it picks keep the quality "
                         "(default: PyTorch's, or CUBLASLT_WORKSPACE_SIZE where exported)")
    args = ap.parse_args()
    try:  # an exported size PyTorch would not read is refused now, not in the report after the run
        cublaslt_workspace_kib()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.cublaslt_workspace_kib is not None:
        if args.cublaslt_workspace_kib < 0:
            raise SystemExit(f"--cublaslt-workspace-kib must be >= 0 KiB, got {args.cublaslt_workspace_kib}")
        set_cublaslt_workspace(args.cublaslt_workspace_kib)  # before any GPU work: read once per process
    if args.direct_references and args.settings is None:
        raise SystemExit("--direct-references chooses the references of --settings; name the settings too")
    if args.settings is None:
        # the default leaves out what needs a CUDA device elsewhere, and FA4 (an optional install): name it to run it
        wanted = [k for k, v in SETTINGS.items()
                  if (args.device.startswith("cuda") or not v.compile_ss) and v.attention_kernel == "sdpa"]
    else:
        bad = sorted(set(args.settings.split(",")) - set(SHORT))
        if bad:
            raise SystemExit(f"--settings: unknown {bad}; choose from {list(SHORT)}")
        wanted = with_references(["fp32"] + [SHORT[k] for k in args.settings.split(",")],
                                 chain=not args.direct_references)
    for label in wanted:
        try:
            SETTINGS[label].check_device(args.device)
        except ValueError as exc:
            raise SystemExit(f"--settings: {label!r}: {exc}") from None
    names = args.datasets.split(",")
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise SystemExit(f"--datasets: unknown {unknown}; choose from {sorted(DATASETS)}")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    samples = [(d, s) for d in names for s in list(load_shipped_samples(DATASETS[d]) if DATASETS[d]
                                                  else load_shipped_samples())[: args.limit]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in wanted:
        opts = SETTINGS[label]
        pipe = Pipeline.from_pretrained("sam3d-mini", device=args.device)
        if opts.weight_dtype != torch.float32:
            pipe = pipe.to(opts.weight_dtype)
        pipe.options = opts
        for dataset, sample in samples:
            result, row = run_one(pipe, sample, None, args.seed)
            rows.append({"setting": label, "dataset": dataset, "object": sample.name, **score(result, sample),
                         "n_voxels": row["n_voxels"], "time_total": row["time_total"]})
            print(f"{label:32s} {sample.name:26s} F1 {rows[-1]['f_score']:.2f} vIoU {rows[-1]['volume_iou']:.3f}",
                  flush=True)
            # after every object: a GPU call cut by its time limit keeps every row it finished (session 15 lost
            # a setting's 16 finished objects to a per-setting write)
            pd.DataFrame(rows).to_csv(out / "fast_path_quality.csv", index=False)
    write_report(pd.DataFrame(rows), out, args)


def write_report(df: pd.DataFrame, out: Path, args) -> None:
    ref = df[df.setting == "fp32"].set_index(["dataset", "object"])
    lines = ["# sam3d-mini quality with the exact fast path on and off", "",
             f"Device `{args.device}`, torch {torch.__version__}, seed {args.seed}, datasets {args.datasets}; "
             f"{df.object.nunique()} objects. Mean over objects, and the largest per-object change against fp32."
             + (f" cuBLASLt workspace: {cublaslt_workspace_kib()} KiB for every setting (`CUBLASLT_WORKSPACE_SIZE`)."
                if cublaslt_workspace_kib() is not None else ""), "",
             "| setting | " + " | ".join(f"mean {m}" for m in METRICS) + " | max abs ΔF1 | max abs ΔvIoU | voxel-count changes |",
             "|---|" + "---|" * (len(METRICS) + 3)]
    summary = {}
    for label, g in df.groupby("setting", sort=False):
        g = g.set_index(["dataset", "object"])
        d_f1 = (g.f_score - ref.f_score).abs().max()
        d_iou = (g.volume_iou - ref.volume_iou).abs().max()
        changed = int((g.n_voxels != ref.n_voxels).sum())
        means = [g[m].mean() for m in METRICS]
        summary[label] = {"means": dict(zip(METRICS, means)), "max_abs_dF1": d_f1, "max_abs_dvIoU": d_iou,
                          "voxel_count_changes": changed}
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in means)
                     + f" | {d_f1:.3f} | {d_iou:.4f} | {changed} of {len(g)} |")
    paired = [label for label in df.setting.unique() if ONE_SWITCH_REF.get(label) in set(df.setting)]
    if paired:
        lines += ["", "Each setting against the setting it is compared with: one switch apart, except a named path's "
                  "setting against the setting it extends (same weights; the same precision unless the switch is the "
                  "precision); Δ = setting − against:", "",
                  "| setting | against | mean ΔF1 | max abs ΔF1 | mean ΔvIoU | max abs ΔvIoU | voxel-count changes |",
                  "|---|---|---|---|---|---|---|"]
    for label in paired:
        ref_label = ONE_SWITCH_REF[label]
        g = df[df.setting == label].set_index(["dataset", "object"])
        same = df[df.setting == ref_label].set_index(["dataset", "object"])
        d_f1, d_iou = g.f_score - same.f_score, g.volume_iou - same.volume_iou
        changed = int((g.n_voxels != same.n_voxels).sum())
        summary[label]["vs_" + ref_label] = {"mean_dF1": d_f1.mean(), "max_abs_dF1": d_f1.abs().max(),
                                             "mean_dvIoU": d_iou.mean(), "max_abs_dvIoU": d_iou.abs().max(),
                                             "voxel_count_changes": changed}
        lines.append(f"| {label} | {ref_label} | {d_f1.mean():+.3f} | {d_f1.abs().max():.3f} | {d_iou.mean():+.4f} | "
                     f"{d_iou.abs().max():.4f} | {changed} of {len(g)} |")
    (out / "fast_path_quality.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
