"""Benchmark scripts refuse arguments that would silently measure something else (checked before any GPU work)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


def test_fast_path_quality_refuses_a_negative_cublaslt_workspace(monkeypatch):
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "")  # restored (removed where absent) after the test
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE")
    monkeypatch.setattr(sys, "argv", ["fast_path_quality.py", "--cublaslt-workspace-kib", "-1"])
    with pytest.raises(SystemExit, match="--cublaslt-workspace-kib must be >= 0 KiB"):
        fast_path_quality.main()
    import os
    assert "CUBLASLT_WORKSPACE_SIZE" not in os.environ  # nothing set on the way to the refusal
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "lots")  # an exported size PyTorch would not read: refused up front
    monkeypatch.setattr(sys, "argv", ["fast_path_quality.py"])
    with pytest.raises(SystemExit, match="CUBLASLT_WORKSPACE_SIZE='lots' is not a whole number of KiB"):
        fast_path_quality.main()


def test_one_synthetic_scene_for_every_benchmark():
    assert synthetic_inputs is scene
    img, mask, pm = scene(32)
    assert img.shape == (32, 32, 3) and mask.sum() == 16 * 11 and pm.shape == (32, 32, 3)


def test_ss_stage_time_compares_outputs_bit_for_bit():
    from types import SimpleNamespace
    out = SimpleNamespace(latents={"shape": torch.ones(1, 4, 8, dtype=torch.bfloat16), "scale": torch.zeros(1, 1, 3)},
                          occupancy_logits=torch.arange(8.0).reshape(2, 2, 2))
    mine = ss_stage_time.ss_outputs(out)
    assert sorted(mine) == ["latents.scale", "latents.shape", "occupancy_logits"]
    assert mine["latents.shape"].dtype == torch.float32
    other = {k: v.clone() for k, v in mine.items()}
    other["occupancy_logits"][0, 0, 1] += 0.25
    other["extra"] = torch.zeros(1)
    del other["latents.scale"]
    assert ss_stage_time.compare(mine, other).splitlines() == [
        "extra: only in the other version", "latents.scale: only in this version", "latents.shape: bit-identical",
        "occupancy_logits: max abs diff 0.25"]
    signed = {"occupancy_logits": mine["occupancy_logits"].clone()}
    signed["occupancy_logits"][0, 0, 0] = -0.0  # equal as numbers, not as bits
    assert "occupancy_logits: max abs diff 0" in ss_stage_time.compare({"occupancy_logits": mine["occupancy_logits"]},
                                                                        signed)
    other["latents.shape"] = torch.ones(1, 5, 8)
    assert ("latents.shape: (1, 4, 8) torch.float32 here, (1, 5, 8) torch.float32 there"
            in ss_stage_time.compare(mine, other))
    other["latents.shape"] = torch.ones(1, 4, 8, dtype=torch.float64)
    assert "torch.float32 here, (1, 4, 8) torch.float64 there" in ss_stage_time.compare(mine, other)


def test_ss_stage_time_rejects_missing_files_before_running(tmp_path):
    with pytest.raises(SystemExit, match="--compare-with: no file"):
        ss_stage_time.main(["--compare-with", str(tmp_path / "old.pt")])
    with pytest.raises(SystemExit, match="--save: folder .* does not exist"):
        ss_stage_time.main(["--save", str(tmp_path / "nowhere" / "old.pt")])


def test_variant_names_carry_fa4_tiles():
    """``NAME@SITE=TILES[+SITE=TILES]``: the named variant with ``attention_kernel_tiles`` set, labelled with them; a
    plain name is the variant itself; malformed or unusable tiles are refused by name."""
    import dataclasses

    from benchmarks.stage_latency import SHORT, VARIANTS, variant_label, variant_options
    base = VARIANTS[SHORT["compile-all-zkv-fa4-ro"]]
    assert base.attention_kernel_sites == ("ss", "slat") and base.compile_mode == "reduce-overhead"
    assert variant_options("compile-all-zkv-fa4-ro") is base
    opts = variant_options("compile-all-zkv-fa4-ro@ss.self=128x128+slat=192x96:no-rs")
    assert opts == dataclasses.replace(base, attention_kernel_tiles=(("ss.self", "128x128"), ("slat", "192x96:no-rs")))
    assert variant_label("compile-all-zkv-fa4-ro@ss.self=128x128") == (
        SHORT["compile-all-zkv-fa4-ro"] + ", FA4 tiles ss.self 128x128")
    for bad, message in (("warp@ss=128x128", "unknown variant 'warp'"),
                         ("compile-all-zkv-fa4-ro@ss.self", "written NAME@SITE=TILES"),
                         ("compile-all-zkv-fa4-ro@", "written NAME@SITE=TILES"),
                         ("compile-all-zkv-fa4-slat-ro@ss.self=128x128", "no attention at site 'ss.self' runs"),
                         ("compile-all-zkv-fa4-ro@ss=128x100", "multiple of 16")):
        with pytest.raises(ValueError, match=message):
            variant_options(bad)


def test_flops_split_by_class_adds_up():
    """count_flops_by_class: exact counts per class on a tiny workload (linear, batched matmul, SDPA on the CPU through
    the custom mapping, a dense conv), summing to count_flops; an operator of no known class is refused by name."""
    import torch.nn.functional as F

    from benchmarks.stage_latency import count_flops, count_flops_by_class, flop_class
    lin, conv = torch.nn.Linear(8, 16), torch.nn.Conv3d(2, 3, 3)
    q = torch.randn(1, 2, 5, 4)

    def work():
        lin(torch.randn(3, 8))
        F.scaled_dot_product_attention(q, q, q)
        conv(torch.randn(1, 2, 4, 4, 4))
        torch.randn(2, 3, 4) @ torch.randn(2, 4, 5)
    split = count_flops_by_class(work)
    assert split == {"attention": 4 * 2 * 5 * 5 * 4, "matmul": 2 * 3 * 8 * 16 + 2 * 2 * 3 * 4 * 5,
                     "conv": 2 * (3 * 2 * 2 * 2) * (2 * 27), "total": 4400.0}
    assert count_flops(work) == 4400.0
    assert flop_class("fs3d.flash_attn_cute") == "attention" and flop_class("aten.baddbmm") == "matmul"
    with pytest.raises(ValueError, match="FLOP class of operator 'aten.cumsum' unknown"):
        flop_class("aten.cumsum")


def test_sparse_conv_flops_count_as_conv():
    """A SparseConv3d's products (matmuls under the scatter algorithm) land in the conv class, and the hooks that
    attribute them are removed after the count, also when the counted call raises."""
    from benchmarks.stage_latency import count_flops_by_class
    from fs3d_accel.model.sparse import SparseConv3d, SparseTensor
    from torch.nn.modules import module as module_mod
    conv = SparseConv3d(4, 6, 3)
    conv.impl = "scatter"
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 2, 2]], dtype=torch.int32)
    x = SparseTensor(torch.randn(3, 4), coords)
    lin = torch.nn.Linear(6, 2)
    hooks_before = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    alone = count_flops_by_class(lambda: conv(x))
    both = count_flops_by_class(lambda: lin(conv(x).feats))
    assert alone["conv"] > 0 and alone["matmul"] == 0 and alone["total"] == alone["conv"]
    assert both["conv"] == alone["conv"] and both["matmul"] == 2 * 3 * 6 * 2
    with pytest.raises(RuntimeError, match="boom"):
        count_flops_by_class(lambda: (conv(x), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == hooks_before


def test_small_query_variants_differ_from_their_parent_by_the_path_alone():
    """The ``-sq`` / ``-sqfa2`` benchmark variants and quality settings are FA4-in-SS plus the small-query path (fp32
    matmuls / SDPA's FlashAttention-2) and nothing else, so a timing or quality difference is that path's."""
    import dataclasses

    from benchmarks.stage_latency import variant_options
    parent = variant_options("compile-all-zkv-fa4-ro")
    for name, kernel in (("compile-all-zkv-fa4-ro-sq", "fp32-matmul"), ("compile-all-zkv-fa4-ro-sqfa2", "sdpa-flash2")):
        assert variant_options(name) == dataclasses.replace(parent, small_query_attention=16, small_query_kernel=kernel)
        setting = fast_path_quality.SHORT[name]
        assert fast_path_quality.ONE_SWITCH_REF[setting] == fast_path_quality.SHORT["compile-all-zkv-fa4-ro"]
        assert fast_path_quality.SETTINGS[setting] == dataclasses.replace(
            fast_path_quality.SETTINGS[fast_path_quality.SHORT["compile-all-zkv-fa4-ro"]], small_query_attention=16,
            small_query_kernel=kernel)


def test_gelu_epilogue_variants_differ_from_their_parent_by_the_switch_alone():
    import dataclasses

    from benchmarks.stage_latency import variant_options
    for name, parent in (("compile-all-zkv-ro-ge", "compile-all-zkv-ro"),
                         ("compile-all-zkv-fa4-ro-sqfa2-ge", "compile-all-zkv-fa4-ro-sqfa2")):
        assert variant_options(name) == dataclasses.replace(variant_options(parent), gelu_epilogue=True)
    q = fast_path_quality
    assert q.SETTINGS[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"]] == \
        variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac")
    assert q.ONE_SWITCH_REF[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac"]] == \
        q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io"]
    assert q.SETTINGS[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io"]] == \
        variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io")
    assert q.ONE_SWITCH_REF[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io"]] == q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-io"]
    assert q.SETTINGS[q.SHORT["compile-all-zkv-ge"]] == dataclasses.replace(
        q.SETTINGS[q.SHORT["compile-all-zkv"]], gelu_epilogue=True)
    assert q.ONE_SWITCH_REF[q.SHORT["compile-all-zkv-ge"]] == q.SHORT["compile-all-zkv"]
    assert q.SETTINGS[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]] == dataclasses.replace(
        q.SETTINGS[q.SHORT["compile-all-zkv-fa4-ro-sqfa2"]], gelu_epilogue=True)
    assert q.ONE_SWITCH_REF[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]] == q.SHORT["compile-all-zkv-fa4-ro-sqfa2"]


def test_every_benchmark_variant_builds_and_the_whole_pass_graph_variant_changes_slat_only():
    """Every short name resolves to valid options, and ``-slatcg`` is the GELU path with SLaT's passes captured whole
    (SLaT in the default compile mode inside them), SS untouched."""
    import dataclasses

    from benchmarks.stage_latency import SHORT, variant_options
    for name in SHORT:
        variant_options(name)
    ge = variant_options("compile-all-zkv-fa4-ro-sqfa2-ge")
    cg = variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg")
    assert cg == dataclasses.replace(ge, slat_compile_mode="default", cuda_graphs=True)
    assert cg.for_stage("ss").compile_uses_cuda_graphs and not cg.for_stage("slat").compile_uses_cuda_graphs
    assert variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-tb") == dataclasses.replace(ge, slat_token_bucket=1 / 16)
    assert variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-io") == dataclasses.replace(ge, fuse_slat_io=True)
    assert variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io") == dataclasses.replace(cg, fuse_slat_io=True)
    assert variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac") == dataclasses.replace(
        cg, fuse_slat_io=True, async_graph_capture=True)
    assert variant_options("compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac-sp") == dataclasses.replace(
        cg, fuse_slat_io=True, async_graph_capture=True, shared_graph_pool=True)
    assert fast_path_quality.SETTINGS[fast_path_quality.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-io"]] == \
        dataclasses.replace(fast_path_quality.SETTINGS[fast_path_quality.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]],
                            fuse_slat_io=True)
    q = fast_path_quality
    assert q.SETTINGS[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-tb"]] == dataclasses.replace(
        q.SETTINGS[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]], slat_token_bucket=1 / 16)
    assert q.ONE_SWITCH_REF[q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge-tb"]] == q.SHORT["compile-all-zkv-fa4-ro-sqfa2-ge"]


def test_bucketed_variants_get_the_repeat_caveat():
    from benchmarks import base_vs_official as bvo
    assert bvo.repeat_notes(["official", "compile-all-zkv-fa4-ro-sqfa2-ge"]) == []
    (note,) = bvo.repeat_notes(["official", "compile-all-zkv-fa4-ro-sqfa2-ge-tb"])
    assert note.startswith("`compile-all-zkv-fa4-ro-sqfa2-ge-tb`: SLaT token buckets") and "lower bound" in note
