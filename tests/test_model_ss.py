"""SS-stage reference modules: condition fuser, SS flow (MoT) model, SS decoder.

Mini config for behaviour; full config built on the meta device for checkpoint key/shape parity
with ``sam3d-architecture.md`` sections 2.7, 4.1 and 5.
"""
from __future__ import annotations

import pytest
import torch

from fs3d_accel.model.condition import ConditionFuser, DinoEmbedder, PointPatchEmbed
from fs3d_accel.model.configs import SSDecoderConfig, full_config, mini_config
from fs3d_accel.model.ss_decoder import SSDecoder, pixel_shuffle_3d
from fs3d_accel.model.ss_flow import SSFlowModel

MINI = mini_config()
FULL = full_config()
LAYOUT = ("6drotation_normalized", "scale", "translation", "translation_scale")
MODALITIES = ("6drotation_normalized", "scale", "shape", "translation", "translation_scale")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def flow() -> SSFlowModel:
    torch.manual_seed(0)
    return SSFlowModel(MINI.ss_flow).eval()


def _latents(model: SSFlowModel, b: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in model.latent_shapes(b).items()}


def _flow_inputs(model: SSFlowModel, b: int = 2):
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(b, 50, MINI.ss_flow.cond_channels, generator=g)
    t = torch.tensor([100.0, 750.0])[:b]
    d = torch.zeros(b)
    return _latents(model, b), t, cond, d


def _images(b: int = 2, size: int | None = None, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    s = size or MINI.image_size
    img = torch.rand(b, 3, s, s, generator=g)
    mask = (torch.rand(b, 1, s, s, generator=g) > 0.5).float()
    pm = torch.randn(b, 3, s, s, generator=g)
    return img, mask, pm


# ------------------------------------------------------------------------------------ SS flow
@torch.no_grad()
def test_ss_flow_output_keys_shapes_and_finite(flow):
    lat, t, cond, d = _flow_inputs(flow)
    out = flow(lat, t, cond, d)
    assert list(out) == sorted(MODALITIES)
    r3 = MINI.ss_flow.resolution ** 3
    assert out["shape"].shape == (2, r3, 8)
    assert {k: out[k].shape[1:] for k in LAYOUT} == {
        "6drotation_normalized": (1, 6), "scale": (1, 3), "translation": (1, 3), "translation_scale": (1, 1)}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(v.abs().sum() > 0 for v in out.values())


@torch.no_grad()
def test_ss_flow_deterministic_and_seeded(flow):
    lat, t, cond, d = _flow_inputs(flow)
    a, b = flow(lat, t, cond, d), flow(lat, t, cond, d)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    twin = SSFlowModel(MINI.ss_flow).eval()
    c = twin(lat, t, cond, d)
    assert all(torch.equal(a[k], c[k]) for k in a)


@torch.no_grad()
def test_mot_shape_stream_ignores_layout_but_layout_sees_shape(flow):
    lat, t, cond, d = _flow_inputs(flow)
    base = flow(lat, t, cond, d)
    moved = dict(lat)
    for k in LAYOUT:
        moved[k] = lat[k] + 3.0
    out = flow(moved, t, cond, d)
    assert torch.equal(out["shape"], base["shape"])  # shape stream never reads layout tokens
    assert not torch.allclose(out["scale"], base["scale"])
    moved = dict(lat, shape=lat["shape"] + 1.0)
    out = flow(moved, t, cond, d)
    for k in LAYOUT:
        assert (out[k] - base[k]).abs().max() > 1e-4, k


@torch.no_grad()
def test_ss_flow_depends_on_t_d_and_cond(flow):
    lat, t, cond, d = _flow_inputs(flow)
    base = flow(lat, t, cond, d)
    for changed in (flow(lat, t + 10, cond, d), flow(lat, t, cond, d + 50), flow(lat, t, cond * 0, d)):
        assert not torch.allclose(changed["shape"], base["shape"])


@torch.no_grad()
def test_cond_kv_fast_path_is_bit_identical(flow):
    lat, t, cond, d = _flow_inputs(flow)
    kv = flow.precompute_cond_kv(cond)
    assert len(kv) == MINI.ss_flow.num_blocks and set(kv[0]) == {"shape", "6drotation_normalized"}
    a = flow(lat, t, cond, d)
    b = flow(lat, t, cond, d, cond_kv=kv)
    assert all(torch.equal(a[k], b[k]) for k in a)
    kv0 = flow.precompute_cond_kv(cond * 0)
    assert all(torch.equal(x, y) for x, y in zip(flow(lat, t, cond * 0, d).values(),
                                                 flow(lat, t, cond * 0, d, cond_kv=kv0).values()))


def test_ss_flow_input_errors(flow):
    lat, t, cond, d = _flow_inputs(flow)
    with pytest.raises(ValueError, match="latent keys"):
        flow({k: v for k, v in lat.items() if k != "scale"}, t, cond, d)
    with pytest.raises(ValueError, match="'shape' must have shape"):
        flow(dict(lat, shape=lat["shape"][:, :10]), t, cond, d)
    with pytest.raises(ValueError, match="cond must have shape"):
        flow(lat, t, cond[..., :7], d)
    with pytest.raises(ValueError, match="t must have shape"):
        flow(lat, torch.zeros(3), cond, d)
    with pytest.raises(ValueError, match="cond_kv has"):
        flow(lat, t, cond, d, cond_kv=[])


def test_ss_flow_shape_pos_emb_is_ij_sincos_buffer(flow):
    pe = flow.latent_mapping["shape"].pos_emb
    assert "latent_mapping.shape.pos_emb" in flow.state_dict()
    assert not isinstance(pe, torch.nn.Parameter)
    r, c = MINI.ss_flow.resolution, MINI.ss_flow.model_channels
    fdim = c // 3 // 2
    n = 1 * r * r + 2 * r + 3  # voxel (x=1, y=2, z=3)
    freqs = 1.0 / 10000 ** (torch.arange(fdim) / fdim)
    expected = torch.cat([torch.cat([torch.sin(v * freqs), torch.cos(v * freqs)]) for v in (1.0, 2.0, 3.0)])
    assert torch.allclose(pe[n, :6 * fdim], expected, atol=1e-6)
    assert torch.equal(pe[n, 6 * fdim:], torch.zeros(c - 6 * fdim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_ss_flow_low_precision_params(dtype):
    torch.manual_seed(0)
    model = SSFlowModel(MINI.ss_flow).eval().to(dtype)
    lat, t, cond, d = _flow_inputs(model)
    out = model(lat, t, cond, d)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


# ------------------------------------------------------------------------------------ SS decoder
def test_pixel_shuffle_3d_channel_to_offset_exact():
    c, h, w, dd = 2, 2, 3, 4
    x = torch.arange(c * 8 * h * w * dd, dtype=torch.float32).reshape(1, c * 8, h, w, dd)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, c, 2 * h, 2 * w, 2 * dd)
    for cc in range(c):
        for a in range(2):
            for b in range(2):
                for e in range(2):
                    src = x[0, cc * 8 + a * 4 + b * 2 + e]
                    assert torch.equal(y[0, cc, a::2, b::2, e::2], src)


@torch.no_grad()
def test_ss_decoder_mini_shape_and_finite():
    torch.manual_seed(0)
    dec = SSDecoder(MINI.ss_decoder).eval()
    r = MINI.ss_flow.resolution
    out = dec(torch.randn(1, 8, r, r, r))
    assert out.shape == (1, 1, 4 * r, 4 * r, 4 * r)
    assert torch.isfinite(out).all()
    dec16 = SSDecoder(MINI.ss_decoder).eval().to(torch.bfloat16)
    out16 = dec16(torch.randn(1, 8, r // 2, r // 2, r // 2))  # half the grid: bf16 3D convs are slow on the CPU
    assert out16.shape == (1, 1, 2 * r, 2 * r, 2 * r) and out16.dtype == torch.float32 and torch.isfinite(out16).all()


@pytest.mark.parametrize("channels,factor,n_blocks", [((8,), 1, 2), ((8, 4), 2, 5), ((8, 8, 4, 4), 8, 11)])
@torch.no_grad()
def test_ss_decoder_any_number_of_levels(channels, factor, n_blocks):
    dec = SSDecoder(SSDecoderConfig(channels=channels)).eval()
    assert len(dec.blocks) == n_blocks
    assert dec(torch.randn(1, 8, 2, 2, 2)).shape == (1, 1, 2 * factor, 2 * factor, 2 * factor)


def test_ss_decoder_rejects_bad_input():
    dec = SSDecoder(SSDecoderConfig(channels=(8,)))
    with pytest.raises(ValueError, match="SSDecoder expects"):
        dec(torch.randn(1, 4, 2, 2, 2))


# ------------------------------------------------------------------------------------ condition
@pytest.fixture(scope="module")
def ss_fuser() -> ConditionFuser:
    torch.manual_seed(0)
    return ConditionFuser(MINI.ss_condition).eval()


@torch.no_grad()
def test_fuser_token_counts(ss_fuser):
    img, mask, pm = _images()
    out = ss_fuser(img, mask, img, mask, pm, pm)
    cfg = MINI.ss_condition
    assert out.shape == (2, cfg.num_tokens, cfg.cond_dim) == (2, 4 * 65 + 2 * 64, 128)
    assert torch.isfinite(out).all()
    torch.manual_seed(0)
    slat = ConditionFuser(MINI.slat_condition).eval()
    out = slat(img, mask, img, mask)
    assert out.shape == (2, MINI.slat_condition.num_tokens, 128) == (2, 4 * 69, 128)


@torch.no_grad()
def test_fuser_token_order_and_idx_emb(ss_fuser):
    """Same input as cropped and full: blocks differ exactly by idx_emb[0] - idx_emb[1]."""
    img, mask, pm = _images()
    out = ss_fuser(img, mask, img, mask, pm, pm)
    n, p = 65, 64
    diff = ss_fuser.idx_emb[0] - ss_fuser.idx_emb[1]
    for start, length in ((0, n), (2 * n, n), (4 * n, p)):
        got = out[:, start:start + length] - out[:, start + length:start + 2 * length]
        assert torch.allclose(got, diff.expand_as(got), atol=1e-5)
    # block 0 = projected DINO(image) + idx_emb[0]
    ref = ss_fuser.projection_nets[0](ss_fuser.module_list[0](img)) + ss_fuser.idx_emb[0]
    assert torch.allclose(out[:, :n], ref, atol=1e-6)
    ref = ss_fuser.projection_nets[2](ss_fuser.module_list[2](pm)) + ss_fuser.idx_emb[1]
    assert torch.allclose(out[:, 4 * n + p:], ref, atol=1e-6)


def test_fuser_input_errors(ss_fuser):
    img, mask, pm = _images(b=1)
    with pytest.raises(ValueError, match="'pointmap' is required"):
        ss_fuser(img, mask, img, mask)
    with pytest.raises(ValueError, match="image must have 3 channels"):
        ss_fuser(img[:, :2], mask, img, mask, pm, pm)
    with pytest.raises(ValueError, match="different batch sizes"):
        ss_fuser(img, mask, img.repeat(2, 1, 1, 1), mask, pm, pm)
    with pytest.raises(ValueError, match="same spatial size"):
        ss_fuser(img, mask[..., :50, :50], img, mask, pm, pm)
    slat = ConditionFuser(MINI.slat_condition)
    with pytest.raises(ValueError, match="no point-map embedder"):
        slat(img, mask, img, mask, pm, pm)


@torch.no_grad()
def test_dino_embedder_preprocessing_and_tokens():
    torch.manual_seed(0)
    dcfg = MINI.ss_condition.dino
    post, pre = DinoEmbedder(dcfg, False).eval(), DinoEmbedder(dcfg, True).eval()
    pre.load_state_dict(post.state_dict())
    assert "mean" not in post.state_dict() and "std" not in post.state_dict()
    _, mask, _ = _images(b=1)
    a = post(mask)
    assert torch.equal(a, post(mask.repeat(1, 3, 1, 1)))
    assert a.shape == (1, 1 + dcfg.num_patches, dcfg.embed_dim)
    b = pre(mask)
    assert b.shape == (1, 1 + dcfg.num_registers + dcfg.num_patches, dcfg.embed_dim)
    assert torch.allclose(b.mean(-1), torch.zeros(b.shape[:2]), atol=1e-5)
    # resize: a 2x image of constant 2x2 blocks equals the original after bilinear downsampling
    img = torch.rand(1, 3, dcfg.image_size, dcfg.image_size)
    assert torch.allclose(post(img.repeat_interleave(2, -1).repeat_interleave(2, -2)), post(img), atol=1e-4)


@torch.no_grad()
def test_dino_token_layout_registers_without_pos_embed():
    torch.manual_seed(0)
    dcfg = MINI.ss_condition.dino
    vit = DinoEmbedder(dcfg).backbone
    x = torch.rand(2, 3, dcfg.image_size, dcfg.image_size)
    tok = vit.prepare_tokens(x)
    r = dcfg.num_registers
    assert tok.shape == (2, 1 + r + dcfg.num_patches, dcfg.embed_dim)
    assert torch.equal(tok[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[:, 0].expand(2, -1))
    assert torch.equal(tok[:, 1:r + 1], vit.register_tokens.expand(2, -1, -1))
    patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    assert torch.equal(tok[:, r + 1:], patches)
    feats = vit.forward_features(x)
    assert torch.equal(feats["x_norm_patchtokens"], vit.norm(feats["x_prenorm"])[:, r + 1:])


@torch.no_grad()
def test_point_patch_embed_invalid_pixels_and_windows():
    torch.manual_seed(0)
    pcfg = MINI.ss_condition.point
    emb = PointPatchEmbed(pcfg).eval()
    s, p, g = pcfg.input_size, pcfg.patch_size, pcfg.grid
    pos = emb.pos_embed.flatten(2).transpose(1, 2)
    nan = torch.full((1, 3, s, s), float("nan"))
    out = emb(nan) - pos
    assert out.shape == (1, g * g, pcfg.embed_dim)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)
    # NaN, +inf and a single non-finite coordinate are all "invalid": same output
    pm = torch.randn(1, 3, s, s)
    a, b, c = pm.clone(), pm.clone(), pm.clone()
    a[:, :, 3, 5] = float("nan")
    b[:, :, 3, 5] = float("inf")
    c[:, 1, 3, 5] = float("-inf")
    oa = emb(a)
    assert torch.isfinite(oa).all()
    assert torch.equal(oa, emb(b)) and torch.equal(oa, emb(c))
    # a pixel only affects its own window; windows are row-major: pixel (y, x) -> window (y//p)*g + x//p
    d = pm.clone()
    y, x = p + 2, 2 * p + 1
    d[:, :, y, x] += 1.0
    changed = (emb(d) - emb(pm)).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [(y // p) * g + x // p]
    # input at a different size is nearest-resized
    big = pm.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(emb(big), emb(pm))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_fuser_low_precision_params(dtype):
    torch.manual_seed(0)
    fuser = ConditionFuser(MINI.ss_condition).eval().to(dtype)
    img, mask, pm = _images(b=1)
    pm[:, :, :10] = float("nan")
    out = fuser(img, mask, img, mask, pm, pm)
    assert out.dtype == dtype and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ full config keys
def _doc_ss_flow_shapes(c: int = 1024, blocks: int = 24) -> dict[str, tuple[int, ...]]:
    ex: dict[str, tuple[int, ...]] = {}
    for e in ("t_embedder", "d_embedder"):
        ex.update({f"{e}.mlp.0.weight": (c, 256), f"{e}.mlp.0.bias": (c,),
                   f"{e}.mlp.2.weight": (c, c), f"{e}.mlp.2.bias": (c,)})
    for m, ch in {"6drotation_normalized": 6, "scale": 3, "shape": 8, "translation": 3,
                  "translation_scale": 1}.items():
        ex.update({f"latent_mapping.{m}.input_layer.weight": (c, ch), f"latent_mapping.{m}.input_layer.bias": (c,),
                   f"latent_mapping.{m}.out_layer.weight": (ch, c), f"latent_mapping.{m}.out_layer.bias": (ch,),
                   f"latent_mapping.{m}.pos_emb": (4096, c) if m == "shape" else (1, c)})
    for i in range(blocks):
        p = f"blocks.{i}."
        ex.update({p + "adaLN_modulation.1.weight": (6 * c, c), p + "adaLN_modulation.1.bias": (6 * c,)})
        for s in ("shape", "6drotation_normalized"):
            ex.update({
                f"{p}norm2.{s}.weight": (c,), f"{p}norm2.{s}.bias": (c,),
                f"{p}self_attn.to_qkv.{s}.weight": (3 * c, c), f"{p}self_attn.to_qkv.{s}.bias": (3 * c,),
                f"{p}self_attn.q_rms_norm.{s}.gamma": (16, 64), f"{p}self_attn.k_rms_norm.{s}.gamma": (16, 64),
                f"{p}self_attn.to_out.{s}.weight": (c, c), f"{p}self_attn.to_out.{s}.bias": (c,),
                f"{p}cross_attn.{s}.to_q.weight": (c, c), f"{p}cross_attn.{s}.to_q.bias": (c,),
                f"{p}cross_attn.{s}.to_kv.weight": (2 * c, c), f"{p}cross_attn.{s}.to_kv.bias": (2 * c,),
                f"{p}cross_attn.{s}.to_out.weight": (c, c), f"{p}cross_attn.{s}.to_out.bias": (c,),
                f"{p}mlp.{s}.mlp.0.weight": (4 * c, c), f"{p}mlp.{s}.mlp.0.bias": (4 * c,),
                f"{p}mlp.{s}.mlp.2.weight": (c, 4 * c), f"{p}mlp.{s}.mlp.2.bias": (c,)})
    return ex


def _doc_ss_decoder_shapes() -> dict[str, tuple[int, ...]]:
    def res(p: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,), f"{p}.conv1.weight": (c, c, 3, 3, 3),
                f"{p}.conv1.bias": (c,), f"{p}.norm2.weight": (c,), f"{p}.norm2.bias": (c,),
                f"{p}.conv2.weight": (c, c, 3, 3, 3), f"{p}.conv2.bias": (c,)}
    ex = {"input_layer.weight": (512, 8, 3, 3, 3), "input_layer.bias": (512,),
          "blocks.2.conv.weight": (1024, 512, 3, 3, 3), "blocks.2.conv.bias": (1024,),
          "blocks.5.conv.weight": (256, 128, 3, 3, 3), "blocks.5.conv.bias": (256,),
          "out_layer.0.weight": (32,), "out_layer.0.bias": (32,),
          "out_layer.2.weight": (1, 32, 3, 3, 3), "out_layer.2.bias": (1,)}
    for p, c in (("middle_block.0", 512), ("middle_block.1", 512), ("blocks.0", 512), ("blocks.1", 512),
                 ("blocks.3", 128), ("blocks.4", 128), ("blocks.6", 32), ("blocks.7", 32)):
        ex.update(res(p, c))
    return ex


def _doc_dino_shapes(prefix: str, d: int = 1024, depth: int = 24) -> dict[str, tuple[int, ...]]:
    ex = {f"{prefix}cls_token": (1, 1, d), f"{prefix}register_tokens": (1, 4, d),
          f"{prefix}pos_embed": (1, 1370, d), f"{prefix}mask_token": (1, d),
          f"{prefix}patch_embed.proj.weight": (d, 3, 14, 14), f"{prefix}patch_embed.proj.bias": (d,),
          f"{prefix}norm.weight": (d,), f"{prefix}norm.bias": (d,)}
    for i in range(depth):
        p = f"{prefix}blocks.{i}."
        ex.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                   p + "attn.qkv.bias": (3 * d,), p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                   p + "ls1.gamma": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                   p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
                   p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,), p + "ls2.gamma": (d,)})
    return ex


def _doc_fuser_shapes(pointmap: bool) -> dict[str, tuple[int, ...]]:
    ex = {**_doc_dino_shapes("module_list.0.backbone."), **_doc_dino_shapes("module_list.1.backbone."),
          "idx_emb": (3, 1024)}
    dims = (1024, 1024, 512) if pointmap else (1024, 1024)
    for i, d in enumerate(dims):
        ex.update({f"projection_nets.{i}.0.weight": (d,), f"projection_nets.{i}.0.bias": (d,),
                   f"projection_nets.{i}.1.w1.weight": (2816, d), f"projection_nets.{i}.1.w3.weight": (2816, d),
                   f"projection_nets.{i}.1.w2.weight": (1024, 2816)})
    if pointmap:
        p = "module_list.2."
        ex.update({p + "point_proj.weight": (512, 3), p + "point_proj.bias": (512,),
                   p + "invalid_xyz_token": (512,), p + "pos_embed": (1, 512, 32, 32),
                   p + "pos_embed_window": (1, 65, 512), p + "cls_token": (1, 1, 512),
                   p + "blocks.0.norm1.weight": (512,), p + "blocks.0.norm1.bias": (512,),
                   p + "blocks.0.attn.qkv.weight": (1536, 512), p + "blocks.0.attn.qkv.bias": (1536,),
                   p + "blocks.0.attn.proj.weight": (512, 512), p + "blocks.0.attn.proj.bias": (512,),
                   p + "blocks.0.norm2.weight": (512,), p + "blocks.0.norm2.bias": (512,),
                   p + "blocks.0.mlp.fc1.weight": (1024, 512), p + "blocks.0.mlp.fc1.bias": (1024,),
                   p + "blocks.0.mlp.fc2.weight": (512, 1024), p + "blocks.0.mlp.fc2.bias": (512,)})
    return ex


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _assert_same(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    assert sorted(set(got) - set(expected)) == [], "unexpected keys"
    assert sorted(set(expected) - set(got)) == [], "missing keys"
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert bad == {}


def test_full_ss_flow_state_dict_matches_doc():
    with torch.device("meta"):
        m = SSFlowModel(FULL.ss_flow)
    shapes = _shapes(m)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6144, 1024)
    assert shapes["latent_mapping.shape.pos_emb"] == (4096, 1024)
    _assert_same(shapes, _doc_ss_flow_shapes())
    assert list(m.latent_mapping) == list(MODALITIES)


def test_full_ss_decoder_state_dict_matches_doc():
    with torch.device("meta"):
        m = SSDecoder(FULL.ss_decoder)
    shapes = _shapes(m)
    assert shapes["blocks.2.conv.weight"] == (1024, 512, 3, 3, 3)
    _assert_same(shapes, _doc_ss_decoder_shapes())


@pytest.mark.parametrize("which", ["ss", "slat"])
def test_full_fuser_state_dict_matches_doc(which):
    cfg = FULL.ss_condition if which == "ss" else FULL.slat_condition
    with torch.device("meta"):
        m = ConditionFuser(cfg)
    shapes = _shapes(m)
    assert shapes["module_list.0.backbone.pos_embed"] == (1, 1370, 1024)
    if which == "ss":
        assert shapes["projection_nets.2.1.w1.weight"] == (2816, 512)
    _assert_same(shapes, _doc_fuser_shapes(pointmap=which == "ss"))
    # 4 x 1370 + 2 x 1024 = 7528 (the doc's "7508" in 5.4 is an arithmetic slip); SLaT 4 x 1374
    assert cfg.num_tokens == (4 * 1370 + 2 * 1024 if which == "ss" else 4 * 1374)
