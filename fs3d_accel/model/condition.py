"""Condition embedders: DINOv2 image/mask encoder, point-map patch embedder and the token fuser.

Module trees and parameter names follow the official checkpoints (``EmbedderFuser`` with
``module_list.{0,1}.backbone.*`` DINOv2 ViTs, ``module_list.2.*`` point-map embedder,
``idx_emb`` and ``projection_nets``), see ``sam3d-architecture.md`` section 5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import ConditionConfig, DinoConfig, PointEmbedConfig
from .layers import LayerNorm32, attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _init_linear(m: nn.Module) -> None:
    """trunc-normal(0.02) weights and zero biases for every Linear below ``m``."""
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


def _check_image(name: str, x: Tensor, channels: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] not in channels:
        raise ValueError(f"{name} must have {' or '.join(map(str, channels))} channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


# --------------------------------------------------------------------------------------------
# ViT block (timm / DINOv2 key names)
# --------------------------------------------------------------------------------------------
class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and output ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v).reshape(b, n, c))


class ViTMlp(nn.Module):
    """``fc1`` -> exact GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (DINOv2 ``ls1``/``ls2``)."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x)).

    ``layer_scale=False`` gives the timm ``Block`` without LayerScale (no ``ls*`` parameters).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps=eps)
        self.attn = ViTAttention(dim, num_heads)
        self.ls1: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = LayerNorm32(dim, eps=eps)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))
        self.ls2: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# DINOv2
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (``proj`` Conv2d) -> (B, grid^2, D) tokens, row-major."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINOv2 ViT with register tokens (hub ``dinov2_vit*_reg`` parameter names).

    Token order after ``prepare_tokens``: [cls, registers (R), patches (grid^2)]; the positional
    embedding is added to cls + patches before the registers are inserted.
    """

    def __init__(self, cfg: DinoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference, kept for checkpoint keys
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.blocks = nn.ModuleList(ViTBlock(d, cfg.num_heads, cfg.mlp_ratio, layer_scale=True)
                                    for _ in range(cfg.depth))
        self.norm = LayerNorm32(d, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        _init_linear(self)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) image -> (B, 1 + R + grid^2, D) tokens."""
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
            raise ValueError(f"DinoViT expects (B, 3, {s}, {s}) input, got {tuple(x.shape)}")
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        return torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """DINOv2 ``forward_features``: post-norm cls/register/patch tokens and the pre-norm tokens."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        r = self.cfg.num_registers
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1:],
            "x_prenorm": x,
        }


class DinoEmbedder(nn.Module):
    """Image (or mask) -> DINO tokens, the official ``Dino`` embedder (child ``backbone``).

    Input (B, 1|3, H, W) in [0, 1]; resized to ``image_size`` (bilinear), 1 channel repeated to 3,
    ImageNet-normalised. Output (B, 1 + grid^2, D) post-norm [cls, patches], or with
    ``prenorm_features`` (B, 1 + R + grid^2, D) = affine-free layer norm of all pre-norm tokens.
    """

    def __init__(self, cfg: DinoConfig, prenorm_features: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.prenorm_features = prenorm_features
        self.embed_dim = cfg.embed_dim
        self.backbone = DinoViT(cfg)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return 1 + self.cfg.num_patches + (self.cfg.num_registers if self.prenorm_features else 0)

    def preprocess(self, x: Tensor) -> Tensor:
        _check_image("DINO input", x, (1, 3))
        s = self.cfg.image_size
        x = x.float()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return (x - self.mean.float()) / self.std.float()

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone.forward_features(self.preprocess(x))
        if self.prenorm_features:
            xp = feats["x_prenorm"]
            return F.layer_norm(xp.float(), xp.shape[-1:]).to(xp.dtype)
        return torch.cat([feats["x_norm_clstoken"][:, None], feats["x_norm_patchtokens"]], dim=1)


# --------------------------------------------------------------------------------------------
# Point map
# --------------------------------------------------------------------------------------------
class PointPatchEmbed(nn.Module):
    """Point map (B, 3, H, W), NaN/inf = invalid -> (B, grid^2, E) window tokens.

    Per pixel: ``point_proj`` of xyz, or ``invalid_xyz_token`` where any coordinate is not finite.
    Each ``patch_size``^2 window gets a ``cls_token`` + ``pos_embed_window`` and goes through one
    ViT block (``blocks.0``); the window's cls output plus ``pos_embed`` is its token.
    """

    def __init__(self, cfg: PointEmbedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, p, g = cfg.embed_dim, cfg.patch_size, cfg.grid
        self.embed_dim = e
        self.point_proj = nn.Linear(3, e)
        self.invalid_xyz_token = nn.Parameter(torch.zeros(e))
        self.pos_embed = nn.Parameter(torch.zeros(1, e, g, g))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, 1 + p * p, e))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.blocks = nn.ModuleList([ViTBlock(e, cfg.num_heads, cfg.mlp_ratio, layer_scale=False)])
        for prm in (self.invalid_xyz_token, self.pos_embed, self.pos_embed_window, self.cls_token):
            nn.init.trunc_normal_(prm, std=0.02)
        _init_linear(self)

    @property
    def num_tokens(self) -> int:
        return self.cfg.grid ** 2

    def forward(self, pointmap: Tensor) -> Tensor:
        _check_image("pointmap", pointmap, (3,))
        s, p, g, e = self.cfg.input_size, self.cfg.patch_size, self.cfg.grid, self.cfg.embed_dim
        b = pointmap.shape[0]
        xyz = pointmap.float()
        if xyz.shape[-2:] != (s, s):
            xyz = F.interpolate(xyz, size=(s, s), mode="nearest")
        xyz = xyz.permute(0, 2, 3, 1)  # (B, S, S, 3)
        valid = torch.isfinite(xyz).all(dim=-1, keepdim=True)
        xyz = torch.where(valid, xyz, torch.zeros_like(xyz))
        w = self.point_proj.weight
        tok = self.point_proj(xyz.to(w.dtype))
        tok = torch.where(valid, tok, self.invalid_xyz_token.to(tok.dtype))
        # (B, g, p, g, p, E) -> (B * g * g, p * p, E): windows row-major, pixels row-major inside
        tok = tok.reshape(b, g, p, g, p, e).permute(0, 1, 3, 2, 4, 5).reshape(b * g * g, p * p, e)
        tok = torch.cat([self.cls_token.expand(tok.shape[0], -1, -1).to(tok.dtype), tok], dim=1)
        tok = tok + self.pos_embed_window
        for blk in self.blocks:
            tok = blk(tok)
        out = tok[:, 0].reshape(b, g * g, e)
        return out + self.pos_embed.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Fuser
# --------------------------------------------------------------------------------------------
class FeedForward(nn.Module):
    """llama3 SwiGLU feed-forward without biases: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


#: Fuser inputs per embedder: (kwarg name, positional group) with group 0 = cropped, 1 = full.
FUSER_INPUTS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("image", 0), ("rgb_image", 1)),
    (("mask", 0), ("rgb_image_mask", 1)),
    (("pointmap", 0), ("rgb_pointmap", 1)),
)


class ConditionFuser(nn.Module):
    """Official ``EmbedderFuser``: embeds each input, projects it to ``cond_dim``, adds ``idx_emb``.

    Output (B, cfg.num_tokens, cond_dim), token blocks in the order image, rgb_image, mask,
    rgb_image_mask [, pointmap, rgb_pointmap].
    """

    def __init__(self, cfg: ConditionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        embedders: list[nn.Module] = [DinoEmbedder(cfg.dino, cfg.prenorm_features),
                                      DinoEmbedder(cfg.dino, cfg.prenorm_features)]
        if cfg.use_pointmap:
            embedders.append(PointPatchEmbed(cfg.point))
        self.module_list = nn.ModuleList(embedders)
        # row 2 is never used; the official fuser allocates it all the same
        self.idx_emb = nn.Parameter(torch.zeros(3, cfg.cond_dim))
        nn.init.normal_(self.idx_emb, std=0.02)
        self.projection_nets = nn.ModuleList(
            nn.Sequential(LayerNorm32(m.embed_dim, eps=1e-5), FeedForward(m.embed_dim, cfg.ffn_hidden, cfg.cond_dim))
            for m in embedders)
        for net in self.projection_nets:
            for lin in net[1].modules():
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)

    def _validate(self, inputs: dict[str, Tensor | None]) -> None:
        channels = {"image": (3,), "rgb_image": (3,), "mask": (1, 3), "rgb_image_mask": (1, 3),
                    "pointmap": (3,), "rgb_pointmap": (3,)}
        for name, x in inputs.items():
            if x is None:
                if self.cfg.use_pointmap or name not in ("pointmap", "rgb_pointmap"):
                    raise ValueError(f"condition input {name!r} is required by this fuser but was None")
                continue
            if name in ("pointmap", "rgb_pointmap") and not self.cfg.use_pointmap:
                raise ValueError(f"{name!r} given but this fuser has no point-map embedder (use_pointmap=False)")
            _check_image(name, x, channels[name])
        present = {k: v for k, v in inputs.items() if v is not None}
        batch = {k: v.shape[0] for k, v in present.items()}
        if len(set(batch.values())) != 1:
            raise ValueError(f"condition inputs have different batch sizes: {batch}")
        for a, b in (("image", "mask"), ("rgb_image", "rgb_image_mask")):
            if present[a].shape[-2:] != present[b].shape[-2:]:
                raise ValueError(f"{a} {tuple(present[a].shape[-2:])} and {b} {tuple(present[b].shape[-2:])} "
                                 "must have the same spatial size")
        if self.cfg.use_pointmap:
            for a, b in (("image", "pointmap"), ("rgb_image", "rgb_pointmap")):
                if present[a].shape[-2:] != present[b].shape[-2:]:
                    raise ValueError(f"{a} {tuple(present[a].shape[-2:])} and {b} "
                                     f"{tuple(present[b].shape[-2:])} must have the same spatial size")

    def forward(self, image: Tensor, mask: Tensor, rgb_image: Tensor, rgb_image_mask: Tensor,
                pointmap: Tensor | None = None, rgb_pointmap: Tensor | None = None) -> Tensor:
        inputs = {"image": image, "rgb_image": rgb_image, "mask": mask, "rgb_image_mask": rgb_image_mask,
                  "pointmap": pointmap, "rgb_pointmap": rgb_pointmap}
        self._validate(inputs)
        tokens = []
        for embedder, proj, names in zip(self.module_list, self.projection_nets, FUSER_INPUTS):
            for name, group in names:
                tok = proj(embedder(inputs[name]))
                tokens.append(tok + self.idx_emb[group].to(tok.dtype))
        return torch.cat(tokens, dim=1)
