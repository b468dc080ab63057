"""Sparse voxel ops, SLaT flow model and mesh decoder/extraction (pure PyTorch reference)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
from conftest import random_coords

from fs3d_accel.model.configs import full_config, mini_config
from fs3d_accel.model.mesh_decoder import MeshDecoder
from fs3d_accel.model.mesh_extract import CUBE_CORNERS, EmptyMeshError, extract_mesh
from fs3d_accel.model.slat_flow import SLaTFlowModel
from fs3d_accel.model.sparse import (SparseConv3d, SparseDownsample, SparseGroupNorm32, SparseSubdivide, SparseTensor,
                                     SparseUpsample, dense_cross_attention, neighbour_table, subdivide_coords, varlen_attention,
                                     windowed_attention)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def shell_coords(res: int, r_in: float, r_out: float) -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = (g.float() + 0.5 - res / 2).norm(dim=-1)
    c = g[(d >= r_in) & (d < r_out)]
    return torch.cat([torch.zeros(len(c), 1, dtype=torch.long), c], 1).int()


def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Overwrite every parameter (zero-init convs included) so that all paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def dense_grid(x: SparseTensor, res: int) -> torch.Tensor:
    grid = torch.zeros(x.batch_size, x.num_channels, res, res, res)
    c = x.coords.long()
    grid[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = x.feats
    return grid


# ----------------------------------------------------------------------------------------------
# sparse tensor and convolution
# ----------------------------------------------------------------------------------------------
def test_sparse_tensor_layout_and_validation():
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2], [1, 0, 0, 0]], dtype=torch.int32)
    x = SparseTensor.create(torch.randn(3, 2), coords)
    assert x.batch_size == 2
    assert x.layout == [slice(0, 2), slice(2, 3)]
    y = x.replace(torch.zeros(3, 5))
    assert y.cache is x.cache and y.num_channels == 5
    with pytest.raises(ValueError, match="sorted by batch"):
        SparseTensor.create(torch.randn(3, 2), coords[[2, 0, 1]])
    with pytest.raises(ValueError, match="rows"):
        SparseTensor(torch.randn(2, 2), coords)
    with pytest.raises(ValueError, match="batch_size"):
        SparseTensor.create(torch.randn(3, 2), coords, batch_size=1)


@pytest.mark.parametrize("k,impl", [(1, "auto"), (3, "gather"), (3, "scatter"), (5, "gather"), (3, "transform"),
                                    (5, "transform")])
def test_sparse_conv_matches_dense_conv3d(k, impl):
    torch.manual_seed(0)
    res = 9
    coords = random_coords(res, batch=2, frac=0.35)
    x = SparseTensor.create(torch.randn(len(coords), 5), coords)
    conv = SparseConv3d(5, 7, k)
    conv.impl = impl
    conv.gather_chunk_elements = 1000  # several row chunks
    with torch.no_grad():
        conv.conv.bias.normal_()
    out = conv(x)
    dense = F.conv3d(dense_grid(x, res), conv.conv.weight.permute(0, 4, 1, 2, 3), conv.conv.bias, padding=k // 2)
    c = coords.long()
    expected = dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
    assert conv.conv.weight.shape == (7, k, k, k, 5)
    torch.testing.assert_close(out.feats, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["gather", "scatter", "transform"])
def test_sparse_conv_kernel_orientation(impl):
    # weight[:, 2, 1, 1, :] multiplies the neighbour at x+1; voxels at x=0,1,2 on one line
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]], dtype=torch.int32)
    x = SparseTensor.create(torch.tensor([[1.0], [10.0], [100.0]]), coords)
    conv = SparseConv3d(1, 1, 3)
    conv.impl = impl
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.bias.zero_()
        conv.conv.weight[0, 2, 1, 1, 0] = 1.0
    assert conv(x).feats[:, 0].tolist() == [10.0, 100.0, 0.0]


@pytest.mark.parametrize("c_in, c_out", [(16, 3), (3, 16)])
def test_sparse_conv_transform_equals_gather(c_in, c_out):
    """The transform-first conv gives the gather conv's values (only the order of the sums differs), in
    fp32 and with bf16 features and weights (partial products summed in fp32), with row chunks."""
    torch.manual_seed(1)
    coords = random_coords(8, batch=2, frac=0.3)
    x = SparseTensor.create(torch.randn(len(coords), c_in), coords)
    conv = SparseConv3d(c_in, c_out, 3)
    conv.gather_chunk_elements = 500
    with torch.no_grad():
        conv.conv.bias.normal_()
        outs = {}
        for impl in ("gather", "transform"):
            conv.impl = impl
            outs[impl] = conv(x).feats
        torch.testing.assert_close(outs["transform"], outs["gather"], atol=1e-5, rtol=1e-5)
        xb, cb = x.replace(x.feats.bfloat16()), conv.bfloat16()
        cb.impl = "transform"
        got = cb(xb).feats
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), outs["gather"], atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="'transform'"):
        conv.impl = "nope"
        conv(x)


def test_neighbour_table_cached_and_duplicates_rejected():
    coords = random_coords(6, 1, 0.5)
    x = SparseTensor.create(torch.randn(len(coords), 3), coords)
    conv = SparseConv3d(3, 3, 3)
    conv(x)
    table = x.cache[("subm_table", 3)]
    conv(x.replace(torch.randn(len(coords), 3)))
    assert x.cache[("subm_table", 3)] is table
    dup = torch.cat([coords[:1], coords[:1]])
    with pytest.raises(ValueError, match="duplicate"):
        conv(SparseTensor.create(torch.randn(2, 3), dup))


# ----------------------------------------------------------------------------------------------
# resolution changes and norms
# ----------------------------------------------------------------------------------------------
def test_downsample_means_and_upsample_round_trip():
    coords = random_coords(8, batch=2, frac=0.4, seed=1)
    # both batch elements own voxel (0, 0, 0, 0)-cells: they must not merge
    feats = torch.randn(len(coords), 4, dtype=torch.float64)
    x = SparseTensor.create(feats, coords)
    down = SparseDownsample(2)(x)
    cells: dict[tuple, list[int]] = {}
    for i, (b, cx, cy, cz) in enumerate(coords.tolist()):
        cells.setdefault((b, cx // 2, cy // 2, cz // 2), []).append(i)
    assert [tuple(c) for c in down.coords.tolist()] == sorted(cells)
    # official semantics: scatter_reduce 'mean' over a zero start (include_self) = sum / (count + 1)
    expected = torch.stack([feats[cells[tuple(c)]].sum(0) / (len(cells[tuple(c)]) + 1)
                            for c in down.coords.tolist()])
    torch.testing.assert_close(down.feats, expected, atol=1e-12, rtol=0)
    assert down.batch_size == 2
    up = SparseUpsample(2)(down)
    assert torch.equal(up.coords, coords)
    for i, c in enumerate(coords.tolist()):
        j = sorted(cells).index((c[0], c[1] // 2, c[2] // 2, c[3] // 2))
        assert torch.equal(up.feats[i], down.feats[j])
    assert up.cache is x.cache  # fine neighbour tables are reused
    with pytest.raises(ValueError, match="SparseDownsample"):
        SparseUpsample(2)(x)


def test_subdivide_coordinates_exact():
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 5]], dtype=torch.int32)
    x = SparseTensor.create(torch.tensor([[1.0], [2.0]]), coords)
    y = SparseSubdivide()(x)
    expected = [[b, 2 * cx + i, 2 * cy + j, 2 * cz + k]
                for b, cx, cy, cz in coords.tolist() for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    assert y.coords.tolist() == expected
    assert y.feats[:, 0].tolist() == [1.0] * 8 + [2.0] * 8
    assert torch.equal(subdivide_coords(coords), y.coords)


def test_subdivided_neighbour_table_equals_hashed():
    coords = random_coords(6, batch=2, frac=0.3, seed=4)
    x = SparseTensor.create(torch.randn(len(coords), 2), coords)
    y = SparseSubdivide()(SparseSubdivide()(x))  # derived from the parent's table, twice
    fresh = SparseTensor.create(y.feats, y.coords.clone())  # no parent link: hashed
    assert torch.equal(neighbour_table(y, 3), neighbour_table(fresh, 3))
    assert "subdivided_from" in y.cache and "subdivided_from" not in fresh.cache


def test_sparse_group_norm_per_batch_element():
    coords = random_coords(5, batch=2, frac=0.5, seed=2)
    x = SparseTensor.create(torch.randn(len(coords), 8) * 3 + 1, coords)
    gn = SparseGroupNorm32(4, 8)
    out = gn(x)
    for sl in x.layout:
        ref = F.group_norm(x.feats[sl].t()[None], 4, gn.weight, gn.bias, gn.eps)[0].t()
        torch.testing.assert_close(out.feats[sl], ref)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def test_varlen_attention_batched_equals_separate():
    torch.manual_seed(0)
    lens = [7, 13]
    q, k, v = (torch.randn(sum(lens), 2, 8) for _ in range(3))
    out = varlen_attention(q, k, v, lens)
    sep = torch.cat([varlen_attention(q[a:b], k[a:b], v[a:b], [b - a]) for a, b in ((0, 7), (7, 20))])
    torch.testing.assert_close(out, sep, atol=1e-6, rtol=1e-6)
    # no leakage: changing element 1's keys leaves element 0's output unchanged
    k2 = k.clone()
    k2[7:] += 5
    assert torch.equal(varlen_attention(q, k2, v, lens)[:7], out[:7])
    with pytest.raises(ValueError, match="segment"):
        varlen_attention(q, k, v, [7, 12])


def test_dense_cross_attention_batched_equals_separate():
    torch.manual_seed(0)
    lens = [5, 11]
    q = torch.randn(16, 2, 8)
    k, v = torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    out = dense_cross_attention(q, k, v, lens)
    sep = torch.cat([dense_cross_attention(q[:5], k[:1], v[:1], [5]),
                     dense_cross_attention(q[5:], k[1:], v[1:], [11])])
    torch.testing.assert_close(out, sep, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shift", [0, 2])
def test_windowed_attention_equals_naive_loop(shift):
    torch.manual_seed(0)
    coords = random_coords(10, batch=2, frac=0.3, seed=3)
    n = len(coords)
    q, k, v = (torch.randn(n, 3, 8) for _ in range(3))
    out = windowed_attention(q, k, v, coords, window=4, shift=shift)
    c = coords.long()
    wkey = torch.cat([c[:, :1], (c[:, 1:] + shift) // 4], dim=1)
    windows, inverse = torch.unique(wkey, dim=0, return_inverse=True)
    expected = torch.empty_like(q)
    for w in range(len(windows)):
        idx = torch.nonzero(inverse == w)[:, 0]
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q[idx], k[idx]) / math.sqrt(8), dim=-1)
        expected[idx] = torch.einsum("hqk,khd->qhd", att, v[idx])
    sizes = torch.bincount(inverse)
    assert len(windows) > 8 and sizes.min() < sizes.max()  # several windows, of different sizes
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# SLaT flow model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_slat():
    cfg = mini_config().slat_flow
    model = SLaTFlowModel(cfg).eval()
    randomize_(model)
    coords = shell_coords(cfg.resolution, 6.0, 7.5)
    feats = torch.randn(len(coords), cfg.in_channels, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(2, 20, cfg.cond_channels, generator=torch.Generator().manual_seed(2))
    return model, feats, coords, cond


def test_slat_mini_forward_shape_and_subset(mini_slat):
    model, feats, coords, cond = mini_slat
    assert 500 < len(coords) < 1500
    with torch.no_grad():
        v = model(feats, coords, torch.tensor([300.0]), cond[:1])
        assert v.shape == feats.shape and torch.isfinite(v).all()
        active = torch.arange(0, len(coords), 3)
        vs = model(feats[active], coords[active], torch.tensor([300.0]), cond[:1])
    assert vs.shape == (len(active), 8) and torch.isfinite(vs).all()
    # dropped voxels are absent as context, so kept rows change
    assert not torch.allclose(vs, v[active], atol=1e-4)


def test_slat_mini_batched_equals_single(mini_slat):
    model, feats, coords, cond = mini_slat
    n = len(coords)
    coords2 = torch.cat([coords, coords.clone().index_fill_(1, torch.tensor([0]), 1)])
    feats2 = torch.cat([feats, feats])
    with torch.no_grad():
        single = model(feats, coords, torch.tensor([300.0]), cond[:1])
        same = model(feats2, coords2, torch.tensor([300.0, 300.0]), cond[:1].expand(2, -1, -1))
        torch.testing.assert_close(same[:n], single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(same[n:], single, atol=1e-5, rtol=1e-5)
        # different t and cond per batch row pick the right ones
        other = model(feats, coords, torch.tensor([700.0]), cond[1:])
        mixed = model(feats2, coords2, torch.tensor([300.0, 700.0]), cond)
    torch.testing.assert_close(mixed[:n], single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[n:], other, atol=1e-5, rtol=1e-5)


def test_slat_precomputed_cond_kv_bit_identical(mini_slat):
    model, feats, coords, cond = mini_slat
    with torch.no_grad():
        a = model(feats, coords, torch.tensor([300.0]), cond[:1])
        kv = model.precompute_cond_kv(cond[:1])
        b = model(feats, coords, torch.tensor([300.0]), None, cond_kv=kv)
    assert torch.equal(a, b)


def test_slat_input_errors(mini_slat):
    model, feats, coords, cond = mini_slat
    with pytest.raises(ValueError, match="feats"):
        model(feats[:, :4], coords, torch.tensor([1.0]), cond[:1])
    with pytest.raises(ValueError, match="cond"):
        model(feats, coords, torch.tensor([1.0]), cond[:1, :, :5])
    with pytest.raises(ValueError, match="resolution"):
        model(feats, coords * 4, torch.tensor([1.0]), cond[:1])


def _slat_res_block(c_in: int, c_out: int, emb: int, skip: bool) -> dict[str, tuple]:
    d = {"norm1.weight": (c_in,), "norm1.bias": (c_in,),
         "conv1.conv.weight": (c_out, 3, 3, 3, c_in), "conv1.conv.bias": (c_out,),
         "conv2.conv.weight": (c_out, 3, 3, 3, c_out), "conv2.conv.bias": (c_out,),
         "emb_layers.1.weight": (2 * c_out, emb), "emb_layers.1.bias": (2 * c_out,)}
    if skip:
        d |= {"skip_connection.weight": (c_out, c_in), "skip_connection.bias": (c_out,)}
    return d


def test_slat_full_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = SLaTFlowModel(full_config().slat_flow)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    c = 1024
    expected = {"t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,),
                "t_embedder.mlp.2.weight": (c, c), "t_embedder.mlp.2.bias": (c,),
                "input_layer.weight": (128, 8), "input_layer.bias": (128,),
                "out_layer.weight": (8, 128), "out_layer.bias": (8,)}
    for prefix, block in (("input_blocks.0.", _slat_res_block(128, 128, c, False)),
                          ("input_blocks.1.", _slat_res_block(128, c, c, True)),
                          ("out_blocks.0.", _slat_res_block(2 * c, 128, c, True)),
                          ("out_blocks.1.", _slat_res_block(256, 128, c, True))):
        expected |= {prefix + k: v for k, v in block.items()}
    for i in range(24):
        p = f"blocks.{i}."
        expected |= {p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                     p + "self_attn.to_qkv.weight": (3 * c, c), p + "self_attn.to_qkv.bias": (3 * c,),
                     p + "self_attn.q_rms_norm.gamma": (16, 64), p + "self_attn.k_rms_norm.gamma": (16, 64),
                     p + "self_attn.to_out.weight": (c, c), p + "self_attn.to_out.bias": (c,),
                     p + "cross_attn.to_q.weight": (c, c), p + "cross_attn.to_q.bias": (c,),
                     p + "cross_attn.to_kv.weight": (2 * c, c), p + "cross_attn.to_kv.bias": (2 * c,),
                     p + "cross_attn.to_out.weight": (c, c), p + "cross_attn.to_out.bias": (c,),
                     p + "mlp.mlp.0.weight": (4 * c, c), p + "mlp.mlp.0.bias": (4 * c,),
                     p + "mlp.mlp.2.weight": (c, 4 * c), p + "mlp.mlp.2.bias": (c,),
                     p + "adaLN_modulation.1.weight": (6 * c, c), p + "adaLN_modulation.1.bias": (6 * c,)}
    assert sd == expected
    assert sd["input_blocks.1.conv1.conv.weight"] == (1024, 3, 3, 3, 128)
    assert sd["out_blocks.0.norm1.weight"] == (2048,)
    assert sd["blocks.23.adaLN_modulation.1.weight"] == (6144, 1024)


def test_mesh_decoder_full_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = MeshDecoder(full_config().mesh_decoder)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    c = 768
    expected = {"input_layer.weight": (c, 8), "input_layer.bias": (c,),
                "out_layer.weight": (101, 96), "out_layer.bias": (101,)}
    for i in range(12):
        p = f"blocks.{i}."
        expected |= {p + "attn.to_qkv.weight": (3 * c, c), p + "attn.to_qkv.bias": (3 * c,),
                     p + "attn.to_out.weight": (c, c), p + "attn.to_out.bias": (c,),
                     p + "mlp.mlp.0.weight": (4 * c, c), p + "mlp.mlp.0.bias": (4 * c,),
                     p + "mlp.mlp.2.weight": (c, 4 * c), p + "mlp.mlp.2.bias": (c,)}
    for i, (a, b) in enumerate(((768, 192), (192, 96))):
        p = f"upsample.{i}."
        expected |= {p + "act_layers.0.weight": (a,), p + "act_layers.0.bias": (a,),
                     p + "out_layers.0.conv.weight": (b, 3, 3, 3, a), p + "out_layers.0.conv.bias": (b,),
                     p + "out_layers.1.weight": (b,), p + "out_layers.1.bias": (b,),
                     p + "out_layers.3.conv.weight": (b, 3, 3, 3, b), p + "out_layers.3.conv.bias": (b,),
                     p + "skip_connection.conv.weight": (b, 1, 1, 1, a), p + "skip_connection.conv.bias": (b,)}
    assert sd == expected
    assert sd["upsample.0.skip_connection.conv.weight"] == (192, 1, 1, 1, 768)
    assert model.blocks[1].attn.shift_window == 4 and model.blocks[0].attn.shift_window == 0


# ----------------------------------------------------------------------------------------------
# mesh decoder and extraction
# ----------------------------------------------------------------------------------------------
def test_mesh_decoder_mini_output_structure():
    cfg = mini_config().mesh_decoder
    model = MeshDecoder(cfg).eval()
    randomize_(model, std=0.05, seed=4)
    coords = shell_coords(cfg.resolution, 5.0, 6.5)
    feats = torch.randn(len(coords), 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(feats, coords)
    assert out.num_channels == 101
    assert torch.equal(out.coords, subdivide_coords(subdivide_coords(coords)))
    assert int(out.coords[:, 1:].max()) < cfg.output_resolution
    assert torch.isfinite(out.feats).all()
    meshes = extract_mesh(out, cfg.output_resolution)
    assert len(meshes) == 1 and meshes[0][1].dtype == np.int64


def _sphere_output(res: int, r: float, batch: int = 0, color_logit: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    vox = g[((g.float() + 0.5) / res - 0.5).norm(dim=-1) < r + 2.0 / res]
    corners = (vox[:, None, :] + CUBE_CORNERS[None]).float() / res - 0.5
    feats = torch.zeros(len(vox), 101)
    feats[:, :8] = corners.norm(dim=-1) - r + 1.0 / res  # cancels the official -1/res bias
    feats[:, 53:] = color_logit
    coords = torch.cat([torch.full((len(vox), 1), batch), vox], 1).int()
    return feats, coords


def test_extract_mesh_sphere_closed_and_accurate():
    res = 48
    f0, c0 = _sphere_output(res, 0.3, 0, color_logit=1.0)
    f1, c1 = _sphere_output(res, 0.2, 1, color_logit=-2.0)
    out = SparseTensor.create(torch.cat([f0, f1]), torch.cat([c0, c1]))
    meshes = extract_mesh(out, res)
    assert len(meshes) == 2
    for (verts, faces, colors), r, logit in zip(meshes, (0.3, 0.2), (1.0, -2.0)):
        mesh = trimesh.Trimesh(verts, faces, process=False)
        assert mesh.is_watertight and mesh.is_winding_consistent
        assert mesh.volume > 0  # outward normals
        assert abs(mesh.volume - 4 / 3 * math.pi * r ** 3) < 0.02 * 4 / 3 * math.pi * r ** 3
        assert np.abs(np.linalg.norm(verts, axis=1) - r).max() < 1.0 / res
        assert verts.dtype == np.float32 and faces.dtype == np.int64
        np.testing.assert_allclose(colors, 1 / (1 + math.exp(-logit)), atol=1e-6)


def test_extract_mesh_without_surface_raises():
    feats, coords = _sphere_output(16, 0.3)
    feats[:, :8] = 0.5  # everything outside
    with pytest.raises(EmptyMeshError, match="zero crossing"):
        extract_mesh(SparseTensor.create(feats, coords), 16)
    assert issubclass(EmptyMeshError, ValueError)
    with pytest.raises(ValueError, match="101"):
        extract_mesh(SparseTensor.create(feats[:, :50], coords), 16)


def test_corner_grid_index_is_each_corners_flat_vertex_index():
    """Cube origin index plus a constant per corner: the flat (res+1)^3 index of every corner's own coordinates."""
    from fs3d_accel.model.mesh_extract import _corner_grid_index
    res = 7
    coords = torch.tensor([[0, 0, 0], [6, 6, 6], [1, 5, 3], [6, 0, 2]])
    corners = coords[:, None, :] + CUBE_CORNERS[None]
    g = res + 1
    expected = (corners[..., 0] * g + corners[..., 1]) * g + corners[..., 2]
    assert torch.equal(_corner_grid_index(coords.int(), res), expected)
