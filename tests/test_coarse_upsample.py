"""SLaT's up-sampling res-block on the coarse rows (``RunOptions.slat_coarse_upsample``).

Its first norm and SiLU and its skip linear act row by row, and nearest up-sampling copies rows, so running them on the
coarse rows and gathering afterwards (the skip's 128 channels instead of the block's 2,048) must give every fine row
the same values; the first conv reads the coarse rows through a neighbour table composed with the up-sampling map
(``sparse_conv_triton.compose_tiles``), the same products in the same order as the tiled conv of the gathered rows.
On the CPU the Triton kernel runs in its interpreter (conftest sets ``TRITON_INTERPRET``).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import mini_slat_setup, random_coords, sample_slat

from fs3d_accel.model import sparse_conv_triton as sct
from fs3d_accel.model.slat_flow import SparseResBlock3d, current_coarse_upsample, use_coarse_upsample
from fs3d_accel.model.sparse import (_TILED_IMPLS, SparseConv3d, SparseDownsample, SparseTensor, neighbour_tiles,
                                     persistent_structure, release_structure, use_conv_impl)
from fs3d_accel.stages.options import RunOptions

TILED = ("implicit-skip", "implicit-skip-nested", "implicit-flat")


@pytest.fixture(scope="module")
def slat_setup():
    stage, objects, sampler = mini_slat_setup((230, 150), steps=5)
    yield stage, objects, sampler


def _fine_and_coarse(seed: int = 0):
    """A fine sparse tensor of two batch elements, its 2x down-sampled coarse tensor and the fine-to-coarse map."""
    coords = random_coords(8, batch=2, frac=0.35, seed=seed)
    fine = SparseTensor.create(torch.randn(len(coords), 3), coords, batch_size=2)
    coarse = SparseDownsample(2)(fine)
    _, inverse, _ = coarse.cache[("upsample_source", 2)]
    return fine, coarse, inverse


@pytest.mark.parametrize("impl", TILED + ("gather",))
@torch.no_grad()
def test_the_conv_of_gathered_rows_reads_them_where_they_come_from(impl):
    if impl in TILED and not sct.interpreting():
        pytest.skip("the tiled kernel needs CUDA or Triton's interpreter")
    fine, coarse, inverse = _fine_and_coarse()
    torch.manual_seed(1)
    conv = SparseConv3d(6, 5)
    conv.conv.bias.normal_()
    source = torch.randn(len(coarse), 6)
    conv.impl = impl
    want = conv(fine.replace(source[inverse])).feats
    got = conv.forward_gathered(fine, source, inverse).feats
    assert got.shape == (len(fine), 5) and torch.equal(got, want)
    if impl in TILED:  # the layout it read was composed with the map and kept on the fine cache
        key = ("subm_tiles_gathered", 3, _TILED_IMPLS[impl][0])
        assert fine.cache[key][0] is inverse and fine.cache[key][1].source_rows == len(coarse)
    with pytest.raises(ValueError, match=r"source must be \(M, 6\)"):
        conv.forward_gathered(fine, source[:, :5], inverse)
    with pytest.raises(ValueError, match="one row index per voxel of x"):
        conv.forward_gathered(fine, source, inverse[:-1])


def test_compose_tiles_refuses_maps_it_cannot_honour():
    fine, coarse, inverse = _fine_and_coarse()
    from fs3d_accel.model.sparse import neighbour_table
    tiles = sct.neighbour_tiles(neighbour_table(fine, 3))
    composed = sct.compose_tiles(tiles, inverse, len(coarse))
    assert composed.n_rows == len(fine) and composed.source_rows == len(coarse) and tiles.source_rows == len(fine)
    # present entries point at the coarse rows, absent ones keep the marker
    present = tiles.table_t < len(fine)
    assert torch.equal(composed.table_t[present], inverse[tiles.table_t[present].long()].int())
    assert bool((composed.table_t[~present] == len(fine)).all())
    with pytest.raises(ValueError, match=rf"n_source must be an int in \[0, {len(fine)}\]"):
        sct.compose_tiles(tiles, inverse, len(fine) + 1)
    with pytest.raises(ValueError, match="already composed"):
        sct.compose_tiles(composed, inverse, len(coarse))
    with pytest.raises(ValueError, match="integer row indices"):
        sct.compose_tiles(tiles, inverse.float(), len(coarse))
    with pytest.raises(ValueError, match="integer row indices"):
        sct.compose_tiles(tiles, inverse[:-1], len(coarse))
    # a row past the source (or negative) would be read out of bounds by the kernel
    for bad in (len(coarse), -1):
        wrong = inverse.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=rf"source_rows holds rows outside \[0, {len(coarse)}\)"):
            sct.compose_tiles(tiles, wrong, len(coarse))
    fine2, _, _ = _fine_and_coarse()
    conv = SparseConv3d(3, 2)
    conv.impl = "implicit-skip-nested"
    wrong = inverse.clone()
    wrong[0] = len(coarse)
    if sct.interpreting():  # the conv's own composition checks the map too
        with torch.no_grad(), pytest.raises(ValueError, match="source_rows holds rows outside"):
            conv.forward_gathered(fine2, torch.randn(len(coarse), 3), wrong)


@pytest.mark.parametrize("fused", [False, True])
def test_the_stage_gives_the_same_latents_through_the_coarse_path(slat_setup, cpu_compile, monkeypatch, fused):
    stage, objects, sampler = slat_setup
    assert any(b.updown is not None for b in stage.flow.out_blocks)  # the mini flow up-samples
    calls = []
    real = SparseResBlock3d._forward_coarse
    monkeypatch.setattr(SparseResBlock3d, "_forward_coarse",
                        lambda self, *a: calls.append(len(a[0])) or real(self, *a))
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True)
    if fused:
        plain = dataclasses.replace(plain, compile_slat=True, compile_backend="eager", fuse_slat_io=True)
    for cond, coords, noise in objects:
        want = sample_slat(stage, cond, coords, noise, sampler, plain)
        assert not calls
        got = sample_slat(stage, cond, coords, noise, sampler, dataclasses.replace(plain, slat_coarse_upsample=True))
        assert torch.equal(got, want)
        assert calls and all(n < len(coords) * 2 for n in calls)  # the block ran on the coarse rows
        calls.clear()


def test_hooks_on_the_moved_steps_keep_the_fine_path(slat_setup):
    stage, objects, sampler = slat_setup
    block = next(b for b in stage.flow.out_blocks if b.updown is not None)
    seen = []
    handle = block.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        cond, coords, noise = objects[1]
        want = sample_slat(stage, cond, coords, noise, sampler, RunOptions())
        n_plain = list(seen)
        seen.clear()
        got = sample_slat(stage, cond, coords, noise, sampler, RunOptions(slat_coarse_upsample=True))
    finally:
        handle.remove()
    assert torch.equal(got, want) and seen == n_plain and set(seen) == {len(coords)}  # the norm saw the fine rows


@torch.no_grad()
def test_build_structure_prepares_the_composed_table(slat_setup):
    stage, objects, _ = slat_setup
    flow = stage.flow
    _, coords, noise = objects[0]
    structure = persistent_structure()
    try:
        with use_coarse_upsample(True), use_conv_impl("implicit-skip-nested"):
            assert current_coarse_upsample()
            flow.build_structure(noise, coords, torch.zeros(1), 1, structure)
        kept = [v for k, v in structure.items() if isinstance(k, tuple) and k[0] == "subm_tiles_gathered"]
        assert len(kept) == 1 and kept[0][1].n_rows == len(coords) and kept[0][1].source_rows < len(coords)
        assert kept[0][1].table_t.shape == neighbour_tiles(
            SparseTensor(noise, structure["checked_input"][2], structure), 3).table_t.shape
    finally:
        release_structure(structure)
    assert not current_coarse_upsample()


def test_the_option_is_validated_and_entered_for_slat_only():
    opts = RunOptions(slat_coarse_upsample=True)
    with opts.network_context("cpu", "slat"):
        assert current_coarse_upsample()
    with opts.network_context("cpu", "decode"):
        assert not current_coarse_upsample()
    with pytest.raises(ValueError, match="slat_coarse_upsample is a bool"):
        RunOptions(slat_coarse_upsample=1)
    with pytest.raises(ValueError, match="use_coarse_upsample takes True or False"):
        with use_coarse_upsample("yes"):
            pass


@torch.no_grad()
def test_the_batch_one_structure_still_slices_from_the_pairs(slat_setup):
    """``derive_unguided_tables`` slices the batch-1 structure from the CFG pair's: the composed layout is one of the
    entries each structure builds for itself, so the slicing neither refuses the pair's structure nor copies it."""
    from fs3d_accel.model.sparse import first_element_structure
    stage, objects, _ = slat_setup
    _, coords, noise = objects[0]
    c1 = coords.clone()
    c1[:, 0] = 1
    pair, plain = persistent_structure(), persistent_structure()
    try:
        with use_coarse_upsample(True), use_conv_impl("implicit-skip-nested"):
            stage.flow.build_structure(torch.cat([noise, noise]), torch.cat([coords, c1]), torch.zeros(2), 2, pair)
        assert any(isinstance(k, tuple) and k[0] == "subm_tiles_gathered" for k in pair)
        assert first_element_structure(pair, coords, plain)
        assert not any(isinstance(k, tuple) and k[0] == "subm_tiles_gathered" for k in plain)
    finally:
        release_structure(pair)
        release_structure(plain)
