"""``benchmarks/attention_kernels.py``: FLOP count, the report on synthetic rows, CPU refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import attention_kernels as ak  # noqa: E402


def test_flops_of_one_call():
    shape = ak.AttnShape("x", batch=2, q_len=3, kv_len=5, heads=4, head_dim=8)
    assert shape.flops == 4 * 2 * 4 * 3 * 5 * 8


def test_shapes_are_the_full_config():
    from fs3d_accel.model.configs import full_config
    cfg = full_config()
    assert ak.HEADS == cfg.slat_flow.num_heads == cfg.ss_flow.num_heads
    assert ak.HEAD_DIM == cfg.slat_flow.model_channels // cfg.slat_flow.num_heads
    assert ak.SHAPES[0].q_len == cfg.ss_flow.num_shape_tokens
    from fs3d_accel.model.configs import LAYOUT_STREAM_ORDER, mini_config
    from fs3d_accel.model.ss_flow import SSFlowModel
    mini = SSFlowModel(mini_config().ss_flow)  # token counts per modality do not depend on the width
    assert ak.LAYOUT_TOKENS == sum(mini.latent_mapping[m].num_tokens for m in LAYOUT_STREAM_ORDER)
    layout = [s for s in ak.SHAPES if s.q_len == ak.LAYOUT_TOKENS]
    assert [s.kv_len for s in layout] == [ak.LAYOUT_TOKENS + cfg.ss_flow.num_shape_tokens, 7528]
    assert all(s.site is None for s in layout)  # informational: the tile sweep keys its sites on the big shapes


def test_cpu_is_refused():
    with pytest.raises(SystemExit, match="CUDA"):
        ak.main(["--device", "cpu"])


def test_report_marks_the_fastest_and_keeps_refusals(tmp_path):
    rows = [{"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "a", "ms": 2.0, "tflops": 100.0, "max_abs_err": 1e-3},
            {"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "b", "ms": 1.0, "tflops": 200.0, "max_abs_err": 2e-3},
            {"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "c", "error": "RuntimeError: no kernel"},
            {"shape": "S", "B": 2, "Lq": 4, "Lk": 4, "kernel": "d", "ms": 0.5, "tflops": 400.0, "max_abs_err": 0.5}]
    meta = {"device": "GPU", "torch": "2", "dtype": "bf16", "warmup": 1, "repeats": 2, "flash_impls": []}
    text = ak.write_report(rows, meta, tmp_path)
    assert "| **b** | 1.000 | 200 | 0.002 |" in text and "| a | 2.000 | 100 | 0.001 |" in text
    assert "| c | refused: RuntimeError: no kernel | | |" in text and "none" in text
    assert "| d | 0.500 | 400 | 0.5 (WRONG: above 0.01) |" in text  # fastest, but wrong: not marked
    assert "FlashAttention-4 through the fs3d custom op: not checked" in text
    assert (tmp_path / "attention_kernels.csv").is_file()


def test_sweep_covers_each_sampler_site_once():
    from fs3d_accel.model.attention_kernels import FlashAttnTiles
    from fs3d_accel.stages.options import KERNEL_SITES
    sites = [s.site for s in ak.SHAPES if s.site]
    assert sorted(sites) == ["slat.cross", "slat.self", "ss.cross", "ss.self"] and set(sites) <= set(KERNEL_SITES)
    by_site = {s.site: s for s in ak.SHAPES if s.site}
    assert by_site["ss.cross"].batch == 1 and by_site["slat.cross"].batch == 1  # the one-key zero condition
    assert by_site["ss.self"].batch == 2 and by_site["slat.self"].batch == 2
    labels = [FlashAttnTiles.parse(t).label for t in ak.FA4_TILE_SWEEP]
    assert len(set(labels)) == len(labels) and "192x128" in labels  # FA4's own choice at head dim 64 is in the sweep


def test_best_fa4_tiles_takes_the_fastest_correct_tiles():
    ss_self, ss_cross, slat_cross = (next(s.name for s in ak.SHAPES if s.site == site)
                                     for site in ("ss.self", "ss.cross", "slat.cross"))

    def row(shape, kernel, tflops, err=1e-3):
        return {"shape": shape, "kernel": kernel, "ms": 1.0, "tflops": tflops, "max_abs_err": err}
    rows = [row(ss_self, "SDPA cuDNN", 400.0), row(ss_self, "FA4 own table", 300.0), row(ss_self, "FA4 192x128", 301.0),
            row(ss_self, "FA4 128x128", 450.0), row(ss_self, "FA4 64x128", 900.0, err=0.5),  # wrong: never chosen
            {"shape": ss_self, "kernel": "FA4 192x192", "error": "RuntimeError: smem"},
            row(slat_cross, "SDPA cuDNN", 330.0), row(slat_cross, "FA4 own table", 400.0),
            row(slat_cross, "FA4 128x96:no-rs", 430.0), row("SS cross, CFG pair", "FA4 128x128", 999.0),
            row(ss_cross, "FA4 own table", 500.0), row(ss_cross, "FA4 192x128", 480.0)]  # own table wins here
    best = ak.best_fa4_tiles(rows)
    assert best["sites"]["ss.self"] == {"shape": ss_self, "cudnn_tflops": 400.0, "fa4_own_tflops": 300.0,
                                        "best_tiles": "128x128", "best_tflops": 450.0, "tiles_beat_own_table": True}
    assert best["sites"]["slat.cross"]["best_tiles"] == "128x96:no-rs"
    assert best["sites"]["ss.cross"]["tiles_beat_own_table"] is False
    rows.append(row(ss_self, "FA4 128x176", 310.0))  # best stays 128x128; a 3% win alone would be noise
    assert ak.best_fa4_tiles([row(ss_self, "FA4 own table", 300.0), row(ss_self, "FA4 128x176", 310.0)])["suffix"] == {
        "all": "", "slat": ""}
    assert set(best["sites"]) == {"ss.self", "ss.cross", "slat.cross"}  # the CFG-pair cross shape runs at no site
    # ss.cross keeps FA4's own table: tiles slower than no tiles are not suggested
    assert best["suffix"] == {"all": "ss.self=128x128+slat.cross=128x96:no-rs", "slat": "slat.cross=128x96:no-rs"}


@pytest.mark.parametrize("spec, message", [("128x100", "multiple of 16"), ("", "no tile shape given"),
                                           ("big", "written MxN"), ("128x128:no-rs:no-rs", "written MxN"),
                                           ("128x128, 128x128", "named twice")])
def test_bad_fa4_tiles_are_refused_before_the_device(spec, message):
    with pytest.raises(SystemExit, match=f"--fa4-tiles: .*{message}"):
        ak.main(["--device", "cpu", "--fa4-tiles", spec])


def test_fa4_tiles_and_flash_impl_are_not_combined():
    with pytest.raises(SystemExit, match="--flash-impl would time nothing"):
        ak.main(["--device", "cpu", "--fa4-tiles", "128x128", "--flash-impl", "FA4"])


def test_shape_filter_is_checked_before_the_device():
    """``--shapes`` keeps the shapes whose name holds the text (case-insensitive); one that matches nothing is refused by
    name, before any device check (so on a CPU too)."""
    with pytest.raises(SystemExit, match="--shapes 'warp' matches none of"):
        ak.main(["--shapes", "warp"])
    with pytest.raises(SystemExit, match="--shapes: give some text of a shape name"):
        ak.main(["--shapes", " "])  # would match every shape
    with pytest.raises(SystemExit, match="CUDA"):  # 'LAYOUT' matches the two layout-stream shapes: on to the device
        ak.main(["--shapes", "LAYOUT", "--device", "cpu"])
    assert len([s for s in ak.SHAPES if "layout" in s.name.lower()]) == 2
