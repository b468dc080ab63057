"""Spectral-aware token aggregation: HFER, factor choice, quantisation, restore map, pipeline identity."""
import pytest
import torch

from fs3d_accel.accel import FastSAM3D, SpectralTokenAggregation, make_method
from fs3d_accel.accel.mesh_aggregation import quantize_tokens, shrink_tokens
from fs3d_accel.accel.spectral import HFERConfig, hfer, hfer_2d, hfer_3d, voxel_highfreq_scores
from fs3d_accel.accel.testing import mini_harness
from fs3d_accel.seams import SparseTokens, TransformContext, TransformState


def _tokens(xyz, feats=None, res=32):
    xyz = torch.tensor(xyz, dtype=torch.int32)
    coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)
    return SparseTokens(coords=coords, resolution=res, feats=None if feats is None else torch.tensor(feats))


def _checker(*shape):
    idx = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    return (sum(idx) % 2).double()


# ------------------------------------------------------------------ HFER
def test_hfer_constant_is_zero_checkerboard_is_one():
    assert hfer(torch.full((32, 32), 3.0), 4) == 0.0
    assert hfer(torch.full((8, 8, 8), 1.0), 1, spectrum="magnitude", remove_dc=False) == 0.0
    assert hfer(_checker(32, 32), 4) == pytest.approx(1.0, abs=1e-12)
    assert hfer(_checker(16, 16, 16), 2, spectrum="magnitude") == pytest.approx(1.0, abs=1e-12)
    # with the DC bin kept, a 0/1 checkerboard splits its |F| evenly between DC and Nyquist
    assert hfer(_checker(16, 16, 16), 2, spectrum="magnitude", remove_dc=False) == pytest.approx(0.5, abs=1e-12)


def test_hfer_of_masks_and_voxels():
    full = torch.ones(40, 40, dtype=torch.bool)
    assert hfer_2d(full, HFERConfig.paper()) == pytest.approx(0.0, abs=1e-9)     # constant crop
    assert hfer_2d(full, HFERConfig()) < 0.01                                   # Hann window only
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    checker = ((yy // 2 + xx // 2) % 2).bool()   # 2-px squares: period 4 px = 64 bins > cut-off 38 at 256 px
    assert hfer_2d(checker, HFERConfig.paper()) > 0.95
    assert hfer_2d(checker, HFERConfig()) > 0.7  # |F| magnitudes weigh the Hann leakage more than |F|^2
    occ = torch.where(_checker(16, 16, 16).bool(), 1.0, -1.0)
    assert hfer_3d(occ, HFERConfig.paper()) == pytest.approx(1.0, abs=1e-9)
    assert hfer_3d(torch.ones(16, 16, 16), HFERConfig()) == 0.0
    with pytest.raises(ValueError, match="mask is empty"):
        hfer_2d(torch.zeros(8, 8, dtype=torch.bool))


def test_per_voxel_scores_are_normalised_and_larger_at_sharp_features():
    logits = -torch.ones(16, 16, 16)
    logits[4:12, 4:12, 4:12] = 1.0
    coords = torch.tensor([[0, 4, 4, 4], [0, 4, 4, 8], [0, 4, 8, 8]], dtype=torch.int32)
    s = voxel_highfreq_scores((logits > 0).double(), coords, 0.125)
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0
    assert s[0] > s[1] > s[2]  # corner > edge > face centre


# ------------------------------------------------------------------ factor choice
def test_choose_scale_thresholds():
    t = SpectralTokenAggregation()
    assert [t.choose_scale(x) for x in (0.9, 0.7, 0.69, 0.51, 0.5, 0.1)] == [1.25, 1.25, 1.5, 1.5, 2.0, 2.0]


def test_released_token_limits_scale_with_resolution():
    t = SpectralTokenAggregation.released()
    m = {"hfer_2d": 0.8, "hfer_3d": 0.8, "score": 0.8}
    assert t.decide(511, 32, m) == (1.0, "min_tokens")       # 2048 * (32/64)^2 = 512
    assert t.decide(512, 32, m) == (1.25, "score")
    assert t.decide(10500, 32, m) == (2.0, "max_tokens")     # 42000 / 4
    assert t.decide(2047, 64, m) == (1.0, "min_tokens")
    assert t.decide(3000, 64, {"hfer_2d": 0.0, "hfer_3d": 0.5, "score": 0.05}) == (1.0, "zero_hfer")


@pytest.mark.parametrize("kw, msg", [
    (dict(tau_low=0.8, tau_high=0.7), r"tau_low \(0.8\) must be <= tau_high \(0.7\)"),
    (dict(tau_low=-0.1), r"tau_low must be in \[0.0, 1.0\]"),
    (dict(w=1.5), r"w must be in \[0.0, 1.0\]"),
    (dict(scales=(1.25, 0.5, 2.0)), r"scales\[1\] must be >= 1"),
    (dict(scales=(1.25, 2.0)), "3-tuple"),
    (dict(placement="mid"), "placement must be one of"),
    (dict(min_tokens=0), "min_tokens must be >= 1"),
])
def test_bad_hyperparameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SpectralTokenAggregation(**kw)
    with pytest.raises(ValueError, match=r"cutoff_3d must be in \(0.0, 0.5\]"):
        HFERConfig(cutoff_3d=-0.1)


# ------------------------------------------------------------------ reductions
def test_quantisation_of_known_voxel_set():
    tok = _tokens([[0, 0, 0], [1, 0, 1], [2, 3, 4], [3, 3, 5], [5, 5, 5]],
                  feats=[[1.0, -5.0], [2.0, -7.0], [0.5, 3.0], [-1.0, 4.0], [9.0, 9.0]])
    out = quantize_tokens(tok, 2.0)
    assert out.coords.tolist() == [[0, 0, 0, 0], [0, 1, 1, 2], [0, 2, 2, 2]]
    assert out.feats.tolist() == [[2.0, -5.0], [0.5, 4.0], [9.0, 9.0]]
    out15 = quantize_tokens(tok, 1.5)   # floor(p / 1.5): 0,0,1,2,3 for p = 0,1,2,3,5
    assert out15.coords[:, 1:].tolist() == [[0, 0, 0], [1, 2, 2], [2, 2, 3], [3, 3, 3]]
    assert out15.feats.tolist() == [[2.0, -5.0], [0.5, 3.0], [-1.0, 4.0], [9.0, 9.0]]


def test_pre_decoder_restore_maps_voxel_q_to_q_times_s():
    t = SpectralTokenAggregation(scales=(2.0, 2.0, 2.0))
    tok = _tokens([[p, p, p] for p in range(10)], feats=[[float(p)] for p in range(10)], res=32)
    out, st = t.reduce(tok, TransformContext(mask=torch.ones(8, 8, dtype=torch.bool), occupancy_logits=torch.ones(32, 32, 32)))
    assert st.scale == 2.0 and len(out) == 5 and st.info["tokens_before"] == 10 and st.info["tokens_after"] == 5
    assert set(st.info) >= {"hfer_2d", "hfer_3d", "score", "S", "tokens_before", "tokens_after"}
    r = 32
    u = torch.tensor([[1 / r - 0.5, 2 / r - 0.5, 4.5 / r - 0.5]])  # grid positions 1, 2, 4.5 in the reduced grid
    back = t.restore_vertices(u, st)
    torch.testing.assert_close(back, torch.tensor([[2 / r - 0.5, 4 / r - 0.5, 9 / r - 0.5]]))


def test_released_shrink_about_bbox_centre():
    tok = _tokens([[p, 7, 3] for p in range(10)])
    out, aff = shrink_tokens(tok, 2.0)
    # target 5, t_min 2.5: round(p/9*4 + 2.5) -> 2,3,3,4,4,5,5,6,6,6 (round half to even), clamped to [2, 6]
    assert out.coords[:, 1].tolist() == [2, 3, 4, 5, 6]
    assert out.coords[:, 2:].unique(dim=0).tolist() == [[7, 3]]           # flat axes untouched
    assert aff["affine_a"] == [2.0, 1.0, 1.0] and aff["affine_b"] == [-4.0, 0.0, 0.0]
    t = SpectralTokenAggregation(placement="pre_slat", scales=(2.0, 2.0, 2.0))
    st = TransformState(scale=2.0, info={"resolution": 32, **aff})
    u = torch.tensor([[2 / 32 - 0.5, 7 / 32 - 0.5, 0.0]])                  # reduced bbox ends -> original ends
    torch.testing.assert_close(t.restore_vertices(u, st), torch.tensor([[0 / 32 - 0.5, 7 / 32 - 0.5, 0.0]]))
    torch.testing.assert_close(t.restore_vertices(torch.tensor([[7 / 32 - 0.5, 0.0, 0.0]]), st),
                               torch.tensor([[10 / 32 - 0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="pre_slat"):
        t.reduce(_tokens([[1, 2, 3], [4, 5, 6]], feats=[[1.0], [2.0]]),
                 TransformContext(info={"hfer_2d": 0.1}, occupancy_logits=torch.ones(32, 32, 32)))


def test_identity_scale_returns_same_tokens_and_vertices():
    t = SpectralTokenAggregation(scales=(1.0, 1.0, 1.0))
    tok = _tokens([[3, 1, 2], [0, 0, 0]], feats=[[1.0], [2.0]])
    out, st = t.reduce(tok, TransformContext(info={"hfer_2d": 0.3}, occupancy_logits=torch.ones(32, 32, 32)))
    assert out is tok and st.scale == 1.0 and st.info["hfer_2d"] == 0.3
    v = torch.rand(5, 3) - 0.5
    assert t.restore_vertices(v, st) is v


# ------------------------------------------------------------------ mini pipeline
def test_mini_pipeline_identity_and_restored_extent():
    h = mini_harness()
    pipe = h.pipe
    try:
        base = pipe.with_accel(None).run_decode(h.inputs, h.ss, h.slat)
        ident = pipe.with_accel(FastSAM3D(ss=None, slat=None, mesh=SpectralTokenAggregation(scales=(1.0, 1.0, 1.0))))
        same = ident.run_decode(h.inputs, h.ss, h.slat)
        assert torch.equal(torch.as_tensor(base.mesh.vertices), torch.as_tensor(same.mesh.vertices))
        pre_slat = SpectralTokenAggregation.released(scales=(1.0, 1.0, 1.0), min_tokens=1, max_tokens=10 ** 6)
        pipe.with_accel(FastSAM3D(ss=None, slat=None, mesh=pre_slat))
        slat = pipe.run_slat(h.inputs, h.ss, seed=0, sampler=type(h.pipe.config.slat_sampler)(steps=2, cfg_strength=0.0))
        assert torch.equal(slat.feats, h.slat.feats)
        merged = pipe.with_accel(make_method("uniform-merge", scale=2.0)).run_decode(h.inputs, h.ss, h.slat)
        assert merged.num_tokens < base.num_tokens and merged.decoder_state.scale == 2.0
        vb, vm = torch.as_tensor(base.mesh.vertices), torch.as_tensor(merged.mesh.vertices)
        # restored mesh occupies the original extent (within two 1/32 voxels)
        assert (vb.min(0).values - vm.min(0).values).abs().max() < 2 / 32
        assert (vb.max(0).values - vm.max(0).values).abs().max() < 2 / 32
    finally:
        pipe.with_accel(None)
