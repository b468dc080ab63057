"""Named fast-path settings (``stages.options.FAST_PATHS``), ``Pipeline.with_options`` and ``--fast-path``."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fs3d_accel import cli
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import FAST_PATHS, RunOptions, fast_path
from fs3d_analysis.distributed import CliPipeFactory


def test_named_fast_paths():
    assert list(FAST_PATHS) == ["off", "fp32-cfg-kv", "bf16", "compiled", "compiled-zkv", "compiled-zkv-ro",
                                "compiled-zkv-fa4", "compiled-zkv-fa4-all", "compiled-zkv-fa4-all-sqfa2",
                                "compiled-zkv-fa4-all-sqfa2-ge", "compiled-zkv-fa4-all-sqfa2-ge-ac",
                                "compiled-zkv-fa4-all-sqfa2-ge-ac-fd", "compiled-zkv-fa4-all-sqfa2-ge-ac-fk",
                                "compiled-zkv-fa4-all-sqfa2-ge-ac-stream", "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces",
                                "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi",
                                "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci",
                                "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk"]
    for suffix, call in (("fd", "direct"), ("fk", "kernel")):
        assert fast_path(f"compiled-zkv-fa4-all-sqfa2-ge-ac-{suffix}") == dataclasses.replace(
            fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac"), fa4_call=call)
    pieces = fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces")
    assert pieces == dataclasses.replace(fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac"), graph_record_first=True,
                                         unguided_graph_ahead=8, slat_graph_piece_blocks=2)
    fastest = fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi")
    assert fastest == dataclasses.replace(pieces, slat_graph_merge_after=4, derive_unguided_tables=True,
                                          sparse_conv="implicit-skip-nested", fa4_call="kernel",
                                          cache_block_modulations=True, one_key_projection=True,
                                          slat_merge_inlined=True)
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci") == dataclasses.replace(
        fastest, lean_cond_kv=True, cache_io_modulations=True)
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk") == dataclasses.replace(
        fastest, lean_cond_kv=True, cache_io_modulations=True, split_cond_kv=True)
    ro = fast_path("compiled-zkv-ro")
    assert ro.compile_mode == "reduce-overhead" and ro.for_stage("slat") is ro and ro.attention_kernel == "sdpa"
    fa4 = fast_path("compiled-zkv-fa4")
    assert fa4.kernel_roles("slat") == ("self", "cross") and fa4.kernel_roles("ss") == ()
    assert fa4.compile_mode == "reduce-overhead" and fa4.collapse_zero_cond
    # CUDA graphs in both stages (SLaT's graphs hide FA4's per-call host cost)
    assert fa4.for_stage("slat") is fa4 and fa4.for_stage("slat").compile_uses_cuda_graphs
    fa4_all = fast_path("compiled-zkv-fa4-all")
    assert fa4_all.kernel_roles("ss") == fa4_all.kernel_roles("slat") == ("self", "cross")
    assert fa4_all.kernel_roles("decode") == () and fa4_all.kernel_tiles("ss") == {}  # FA4's own tile table
    assert fa4_all == dataclasses.replace(fa4, attention_kernel_sites=("ss", "slat"))
    assert fast_path("compiled-zkv-fa4-all-sqfa2") == dataclasses.replace(fa4_all, small_query_attention=16,
                                                                        small_query_kernel="sdpa-flash2")
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge") == dataclasses.replace(fast_path("compiled-zkv-fa4-all-sqfa2"),
                                                                           gelu_epilogue=True)
    ac = fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac")
    assert ac.cuda_graphs and ac.async_graph_capture and ac.fuse_slat_io and not ac.shared_graph_pool
    # SS keeps inductor's graphs; SLaT's torso is compiled without them, since our whole-pass graphs record it
    assert ac.for_stage("ss").compile_uses_cuda_graphs and not ac.for_stage("slat").compile_uses_cuda_graphs
    stream = fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-stream")
    assert stream == dataclasses.replace(ac, gelu_epilogue_sites=("ss",), graph_record_first=True)
    assert fast_path("off") == RunOptions()
    assert fast_path("bf16").weight_dtype == torch.bfloat16 and fast_path("bf16").cache_cond_kv
    assert fast_path("compiled-zkv").collapse_zero_cond and fast_path("compiled-zkv").compile_slat
    with pytest.raises(ValueError, match="unknown fast path 'fastest'"):
        fast_path("fastest")


def test_with_options_casts_weights_and_checks_the_device():
    pipe = Pipeline.from_config("mini", device="cpu")
    with pytest.raises(ValueError, match="compile_ss is CUDA-only"):
        pipe.with_options(fast_path("compiled"))
    assert pipe.options == RunOptions()  # a refused setting leaves the pipeline as it was
    assert next(pipe.parameters()).dtype == torch.float32
    assert pipe.with_options(fast_path("bf16")) is pipe
    assert pipe.options == fast_path("bf16")
    assert {p.dtype for p in pipe.parameters()} == {torch.bfloat16}


def test_cli_fast_path(tmp_path):
    args = cli.build_parser().parse_args(["run", "--weights", "random", "--sample", "0", "--fast-path", "compiled"])
    with pytest.raises(SystemExit, match="--fast-path: compile_ss is CUDA-only"):
        args.fn(args)
    with pytest.raises(SystemExit):  # argparse rejects unknown names
        cli.build_parser().parse_args(["run", "--fast-path", "fastest"])
    args = cli.build_parser().parse_args(["eval", "--fast-path", "bf16"])
    assert CliPipeFactory.from_args(args).fast_path == "bf16"
    args = cli.build_parser().parse_args(["eval", "--fast-path", "compiled-zkv-ro", "--slat-compile-mode", "default"])
    factory = CliPipeFactory.from_args(args)  # the Ray workers build the same options as the local CLI
    assert (factory.fast_path, factory.slat_compile_mode) == ("compiled-zkv-ro", "default")


def test_cli_run_with_the_bf16_fast_path(tmp_path, capsys, monkeypatch):
    """``fs3d run --fast-path bf16`` end to end on the shipped sam3d-mini weights, writing a mesh. For time, the mini
    config the CLI loads them into has 3-step SS and SLaT schedules (CFG on), and the mask is a thin bar (~3800 voxels
    instead of ~5900): the bf16 SS decoder's 3D convolutions (CPU slow path, ~17 s) are most of what is left."""
    from conftest import fast_mini_config
    from fs3d_accel.model import configs
    monkeypatch.setitem(configs.CONFIGS, "mini", lambda: fast_mini_config(ss_steps=3, slat_steps=3))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[28:36, 8:56] = True
    ys, xs = np.mgrid[0:64, 0:64]
    pointmap = np.stack([(xs - 32) / 64, (ys - 32) / 64, np.full((64, 64), 2.0)], -1).astype(np.float32)
    np.savez(tmp_path / "in.npz", image=image, mask=mask, pointmap=pointmap)
    args = cli.build_parser().parse_args(["run", "--inputs", str(tmp_path / "in.npz"),
                                          "--fast-path", "bf16", "--out", str(tmp_path / "m.ply")])
    loaded = []
    monkeypatch.setattr(Pipeline, "with_options", lambda self, opts, _orig=Pipeline.with_options:
                        loaded.append(self) or _orig(self, opts))
    assert args.fn(args) == 0
    (pipe,) = loaded  # the shipped weights, in bf16, with the short schedules
    assert pipe.source.startswith("pretrained:sam3d-mini") and pipe.options == fast_path("bf16")
    assert pipe.config.ss_sampler.steps == pipe.config.slat_sampler.steps == 3
    assert {p.dtype for p in pipe.parameters()} == {torch.bfloat16}
    assert (tmp_path / "m.ply").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


@torch.no_grad()
def test_accelerator_on_the_compiled_path_is_exact(cpu_compile):
    """Fast-SAM3D (step caching, token carving: SLaT passes over token subsets) through the compiled
    SS flow and SLaT torso (dynamo's eager backend on the CPU: same kernels), with the one-key zero
    condition: the same latents as without compilation."""
    from fs3d_accel.accel.presets import method_factory
    from fs3d_analysis.data import load_shipped_samples
    s = load_shipped_samples()[0]
    base = RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True)
    results = []
    for opts in (base, RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True, compile_ss=True,
                                  compile_slat=True, compile_backend="eager")):
        pipe = Pipeline.from_pretrained("sam3d-mini").with_options(opts).with_accel(method_factory("fast-sam3d")())
        results.append(pipe(s.image, s.mask, pointmap=s.pointmap, seed=0))
    from torch._dynamo.utils import counters
    # the compiled path really ran: SS flow graphs and SLaT torso graphs (one per batch size each)
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    a, b = results
    for k in a.ss.latents:
        assert torch.equal(a.ss.latents[k], b.ss.latents[k]), k
    assert torch.equal(a.slat.coords, b.slat.coords) and torch.equal(a.slat.feats, b.slat.feats)


def test_cli_slat_compile_mode(monkeypatch):
    """--slat-compile-mode overrides SLaT's mode in the chosen fast path; a fast path without compile_slat refuses it."""
    import fs3d_accel.stages.options as options_mod
    seen = []
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_COMPILE", True)  # the CPU accepts compile settings (not run here)
    monkeypatch.setattr(Pipeline, "with_options", lambda self, opts: seen.append(opts) or self)
    args = cli.build_parser().parse_args(["run", "--weights", "random", "--sample", "0", "--fast-path",
                                          "compiled-zkv-ro", "--slat-compile-mode", "default"])
    cli._load_pipeline(args)
    assert seen[-1] == dataclasses.replace(fast_path("compiled-zkv-ro"), slat_compile_mode="default")
    assert seen[-1].for_stage("slat").compile_mode == "default" and seen[-1].compile_mode == "reduce-overhead"
    args = cli.build_parser().parse_args(["run", "--weights", "random", "--sample", "0", "--fast-path", "bf16",
                                          "--slat-compile-mode", "default"])
    with pytest.raises(SystemExit, match="--slat-compile-mode: slat_compile_mode 'default' is the mode of compile_slat"):
        cli._load_pipeline(args)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--slat-compile-mode", "fastest"])
    # the Ray workers' factory forwards it to the same loader
    CliPipeFactory(weights="random", fast_path="compiled-zkv-ro", slat_compile_mode="max-autotune-no-cudagraphs")()
    assert seen[-1].for_stage("slat").compile_mode == "max-autotune-no-cudagraphs"


def test_named_fast_paths_are_the_benchmarked_variants():
    """The README quotes benchmark variants' timings for these names: they must stay the same settings."""
    from benchmarks.stage_latency import SHORT, VARIANTS
    assert fast_path("compiled-zkv-ro") == VARIANTS[SHORT["compile-all-zkv-ro"]]
    assert fast_path("compiled-zkv-fa4") == VARIANTS[SHORT["compile-all-zkv-fa4-slat-ro"]]
    assert fast_path("compiled-zkv") == VARIANTS[SHORT["compile-all-zkv"]]
    assert fast_path("compiled-zkv-fa4-all") == VARIANTS[SHORT["compile-all-zkv-fa4-ro"]]
    assert fast_path("compiled-zkv-fa4-all-sqfa2") == VARIANTS[SHORT["compile-all-zkv-fa4-ro-sqfa2"]]
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge") == VARIANTS[SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]]
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac") == VARIANTS[SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"]]
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-fd") == VARIANTS[
        SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-fd"]]
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-fk") == VARIANTS[
        SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-fk"]]
    assert (fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-stream")
            == VARIANTS[SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-sg"]])
    fastest = "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-ua-gp2-m4-dt-nc-fk-cm-ok-mi"
    assert fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi") == VARIANTS[SHORT[fastest]]
    assert (fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci")
            == VARIANTS[SHORT[fastest + "-lk-ci"]])
    assert (fast_path("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk")
            == VARIANTS[SHORT[fastest + "-lk-ci-sk"]])
    # and the quality run's settings (benchmarks/fast_path_quality.py) are the same paths
    from benchmarks import fast_path_quality as fpq
    for name, short in (("compiled-zkv-fa4-all-sqfa2-ge-ac", "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"),
                        ("compiled-zkv-fa4-all-sqfa2-ge-ac-stream", "compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-rf-sg"),
                        ("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi", fastest),
                        ("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci", fastest + "-lk-ci"),
                        ("compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi-lk-ci-sk",
                         fastest + "-lk-ci-sk")):
        assert fast_path(name) == fpq.SETTINGS[fpq.SHORT[short]], name
