"""Numerical parity with the OFFICIAL SAM 3D Objects modules (``benchmarks/parity_official.py``).

The official tests run only where ``sam3d_objects`` and its dependencies are importable (the
project venv does not have them; see ``benchmarks/make_official_manifest.py`` for the throw-away
venv). The reference sparse conv used to work around spconv's CPU build is tested everywhere.

Tolerance: fp32 stages must agree to ``FP32_REL_TOL`` = 1e-5 of the largest official value
(observed: 0 for the condition fusers, SS flow, SS sampler and SS decoder, which are bit-identical;
<= 1e-6 for the SLaT flow / sampler and the mesh decoder, whose sums run in another order).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import parity_official as po  # noqa: E402
from fs3d_accel.model.configs import SamplerConfig, mini_config  # noqa: E402

FP32_REL_TOL = 1e-5
#: bf16 weights vs official fp32: a sanity bound (observed ~1-4e-2 of the largest value)
BF16_REL_TOL = 0.1


def _skip_reason() -> str | None:
    why = po.official_available(po.DEFAULT_OFFICIAL)
    if why:
        return why
    for name, path in (("FS3D_DINOV2 (dinov2 checkout)", po.DEFAULT_DINOV2 / "dinov2"),
                       ("FS3D_HF_CONFIGS (HF yaml folder)", po.DEFAULT_HF / "ss_generator.yaml")):
        if not path.exists():
            return f"{name} not found at {path}"
    return None


SKIP = _skip_reason()


def test_reference_subm_conv_equals_dense_conv3d():
    g = torch.Generator().manual_seed(0)
    coords = po.random_coords(10, 120, seed=3)
    feats = torch.randn(len(coords), 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    got = po.subm_conv_reference(feats, coords, w, b)
    c = coords.long()
    dense = torch.zeros(1, 5, 10, 10, 10, dtype=torch.float64)
    dense[0, :, c[:, 1], c[:, 2], c[:, 3]] = feats.T
    ref = F.conv3d(dense, w.permute(0, 4, 1, 2, 3), b, padding=1)[0][:, c[:, 1], c[:, 2], c[:, 3]].T
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_reference_1x1_conv_is_spconvs_raw_weight_view():
    """spconv 2.x (and spconv-triton) compute a 1x1x1 SubMConv3d as features @ weight.view(C_in, C_out): the raw
    memory of the (C_out, 1, 1, 1, C_in) tensor, not its transpose. The reference reproduces that exactly."""
    w = torch.arange(6, dtype=torch.float64).reshape(3, 1, 1, 1, 2)  # C_out 3, C_in 2
    feats = torch.tensor([[1.0, 10.0]], dtype=torch.float64)
    # view(2, 3) = [[0, 1, 2], [3, 4, 5]]: row 0 + 10 x row 1; the transpose would give [10, 32, 54]
    got = po.subm_conv_reference(feats, torch.tensor([[0, 0, 0, 0]]), w, torch.zeros(3, dtype=torch.float64))
    assert got.tolist() == [[30.0, 41.0, 52.0]]


def test_our_conv_on_converted_official_1x1_weights_computes_what_spconv_computes():
    """A mesh-decoder skip conv loaded from official files (``from_official``) gives spconv's output, and
    ``to_official`` writes back the same bytes."""
    from fs3d_accel.checkpoint import from_official, to_official
    from fs3d_accel.model.sparse import SparseConv3d, SparseTensor
    g = torch.Generator().manual_seed(1)
    coords = po.random_coords(8, 60, seed=2)
    feats = torch.randn(len(coords), 6, generator=g)
    official = {"upsample.0.skip_connection.conv.weight": torch.randn(4, 1, 1, 1, 6, generator=g),
                "upsample.0.skip_connection.conv.bias": torch.randn(4, generator=g)}
    ours = from_official({"slat_decoder_mesh": official})
    conv = SparseConv3d(6, 4, 1)
    conv.load_state_dict({k.removeprefix("decode.decoder.upsample.0.skip_connection."): v for k, v in ours.items()})
    with torch.no_grad():
        got = conv(SparseTensor.create(feats, coords)).feats
    ref = po.subm_conv_reference(feats, coords, official["upsample.0.skip_connection.conv.weight"],
                                 official["upsample.0.skip_connection.conv.bias"])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    back = to_official(ours)["slat_decoder_mesh"]
    assert all(torch.equal(back[k], v) for k, v in official.items())
    # a 3x3x3 weight and the dense SS decoder's 1x1x1 conv weights keep their values
    w3 = torch.randn(4, 3, 3, 3, 6, generator=g)
    assert torch.equal(from_official({"slat_decoder_mesh": {"blocks.0.conv.weight": w3}})["decode.decoder.blocks.0.conv.weight"], w3)
    dense = torch.randn(4, 6, 1, 1, 1, generator=g)
    assert torch.equal(from_official({"ss_decoder": {"x.conv.weight": dense}})["ss.decoder.x.conv.weight"], dense)


def test_parity_config_changes_only_what_official_hard_codes():
    mini, par = mini_config(), po.parity_config()
    assert par.ss_flow == mini.ss_flow and par.slat_flow == mini.slat_flow and par.ss_decoder == mini.ss_decoder
    assert par.ss_condition.dino == mini.ss_condition.dino
    assert par.ss_condition.point.num_heads == 16
    md = par.mesh_decoder
    assert md.upsample_channels == (md.model_channels // 4, md.model_channels // 8) and md.num_groups == 32
    assert len(po.DEVIATIONS) == 2


@pytest.mark.official
@pytest.mark.skipif(SKIP is not None, reason=f"official SAM 3D code unavailable: {SKIP}")
def test_stage_by_stage_parity_with_official():
    po.bootstrap(po.DEFAULT_OFFICIAL, po.DEFAULT_DINOV2)
    cfg = po.parity_config().with_samplers(SamplerConfig(steps=3, rescale_t=3.0, cfg_strength=7.0),
                                           SamplerConfig(steps=3, rescale_t=1.0, cfg_strength=1.0))
    rows, info = po.run_parity(cfg, seed=0, num_voxels=150, log=lambda s: None)
    assert info["reference_convs"] == 14  # 8 SLaT res-block convs + 3 convs in each of 2 subdivide blocks
    stages = {r.stage for r in rows}
    assert len(stages) == 11 and len(rows) == 22
    for r in rows:
        if "mismatches" in r.stage:
            if r.precision == "fp32":
                assert r.max_abs == 0, r
            continue
        assert r.ref_scale > 0.5, f"{r.stage}: official output is (near) zero, the comparison would be vacuous"
        tol = FP32_REL_TOL if r.precision == "fp32" else BF16_REL_TOL
        assert math.isfinite(r.max_rel) and r.max_rel < tol, f"{r.stage} ({r.precision}): {r}"
    # bf16 really ran in lower precision (otherwise the bf16 rows would prove nothing)
    assert all(r.max_abs > 0 for r in rows if r.precision == "bf16" and "mismatches" not in r.stage)
