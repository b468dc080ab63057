"""Sparse-structure flow model: mixture-of-transformers over a shape and a layout token stream.

Reimplements the official ``SparseStructureFlowTdfyWrapper`` (``sam3d-architecture.md`` section 2):
the shape latent (B, R^3, 8) and four pose modalities (one token each) are embedded, the pose
tokens are merged into one layout stream, and every block has per-stream weights. Shape queries
attend only to shape keys; layout queries attend to layout + shape keys. Output = flow velocity
per modality.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import LAYOUT_MODALITIES, LAYOUT_STREAM_ORDER, SSFlowConfig
from .layers import (AbsolutePositionEmbedder, FeedForwardNet, LayerNorm32, MultiHeadRMSNorm, TimestepEmbedder,
                     attention, modulate, projected_cross_attention)

SHAPE = "shape"
LAYOUT = "6drotation_normalized"
#: Token streams of the MoT blocks (official ``latent_names`` order).
STREAMS = (SHAPE, LAYOUT)

#: Cached cross-attention keys/values: one dict per block, stream -> (k, v), each (B, L, H, D).
CondKV = list[dict[str, tuple[Tensor, Tensor]]]


def shape_position_embedding(resolution: int, channels: int) -> Tensor:
    """(R^3, C) sin/cos embedding of the voxel grid, token n = x * R^2 + y * R + z ('ij' order)."""
    ar = torch.arange(resolution)
    coords = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), dim=-1).reshape(-1, 3)
    return AbsolutePositionEmbedder(channels, in_channels=3)(coords)


class Latent(nn.Module):
    """One modality's input/output mapping: ``input_layer`` + ``pos_emb``, ``out_layer``.

    ``pos_emb`` is a learnt (tokens, C) parameter for pose modalities, and a fixed persistent buffer
    (R^3, C) for the shape modality (it is in the official checkpoint).
    """

    def __init__(self, in_channels: int, channels: int, pos_emb: Tensor | None = None, tokens: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.input_layer = nn.Linear(in_channels, channels)
        self.out_layer = nn.Linear(channels, in_channels)
        if pos_emb is None:
            self.pos_emb = nn.Parameter(torch.zeros(tokens, channels))
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        else:
            self.register_buffer("pos_emb", pos_emb, persistent=True)

    @property
    def num_tokens(self) -> int:
        return self.pos_emb.shape[0]

    def to_input(self, x: Tensor) -> Tensor:
        h = self.input_layer(x.to(self.input_layer.weight.dtype))
        return h + self.pos_emb[None].to(h.dtype)

    def to_output(self, h: Tensor) -> Tensor:
        h = F.layer_norm(h.float(), h.shape[-1:], eps=1e-5)
        return self.out_layer(h.to(self.out_layer.weight.dtype))


class MoTSelfAttention(nn.Module):
    """Per-stream qkv / q,k RMS norm / output projection; shape attends shape, layout attends both."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = channels // num_heads
        self.to_qkv = nn.ModuleDict({s: nn.Linear(channels, 3 * channels) for s in STREAMS})
        self.q_rms_norm = nn.ModuleDict({s: MultiHeadRMSNorm(head_dim, num_heads) for s in STREAMS})
        self.k_rms_norm = nn.ModuleDict({s: MultiHeadRMSNorm(head_dim, num_heads) for s in STREAMS})
        self.to_out = nn.ModuleDict({s: nn.Linear(channels, channels) for s in STREAMS})

    def _qkv(self, s: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, c = x.shape
        q, k, v = self.to_qkv[s](x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.q_rms_norm[s](q), self.k_rms_norm[s](k), v

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        qs, ks, vs = self._qkv(SHAPE, x[SHAPE])
        ql, kl, vl = self._qkv(LAYOUT, x[LAYOUT])
        out = {
            SHAPE: attention(qs, ks, vs),
            LAYOUT: attention(ql, torch.cat([kl, ks], dim=1), torch.cat([vl, vs], dim=1)),
        }
        return {s: self.to_out[s](o.flatten(2)) for s, o in out.items()}


class CrossAttention(nn.Module):
    """Queries from the stream, keys/values from the condition tokens (no qk norm)."""

    def __init__(self, channels: int, cond_channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(cond_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def kv(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """cond (B, L, Cc) -> k, v each (B, L, H, D); cacheable across sampler steps."""
        b, n, _ = cond.shape
        k, v = self.to_kv(cond).reshape(b, n, 2, self.num_heads, -1).unbind(2)
        return k, v

    def forward(self, x: Tensor, cond: Tensor | None = None, kv=None) -> Tensor:
        """``kv``: cached K/V (a (k, v) pair, or per-element pairs from ``collapse_zero_condition_kv``)."""
        return projected_cross_attention(x, kv if kv is not None else self.kv(cond), self.to_q, self.to_out,
                                         self.num_heads)


class MoTBlock(nn.Module):
    """MoT modulated cross block; one adaLN modulation shared by both streams."""

    def __init__(self, channels: int, cond_channels: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.ModuleDict({s: LayerNorm32(channels, elementwise_affine=True, eps=1e-6) for s in STREAMS})
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MoTSelfAttention(channels, num_heads)
        self.cross_attn = nn.ModuleDict({s: CrossAttention(channels, cond_channels, num_heads) for s in STREAMS})
        self.mlp = nn.ModuleDict({s: FeedForwardNet(channels, mlp_ratio) for s in STREAMS})
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def cond_kv(self, cond: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        return {s: self.cross_attn[s].kv(cond) for s in STREAMS}

    def forward(self, x: dict[str, Tensor], t_emb: Tensor, cond: Tensor,
                kv: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, Tensor]:
        mods = self.adaLN_modulation(t_emb).unsqueeze(1).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        attn = self.self_attn({s: modulate(self.norm1(h), shift_msa, scale_msa) for s, h in x.items()})
        x = {s: h + gate_msa * attn[s] for s, h in x.items()}
        x = {s: h + self.cross_attn[s](self.norm2[s](h), cond, None if kv is None else kv[s]) for s, h in x.items()}
        return {s: h + gate_mlp * self.mlp[s](modulate(self.norm3(h), shift_mlp, scale_mlp)) for s, h in x.items()}


@torch.compiler.nested_compile_region
def _block_region(blk: MoTBlock, h: dict[str, Tensor], t_emb: Tensor, cond: Tensor,
                  kv: dict[str, tuple[Tensor, Tensor]] | None) -> dict[str, Tensor]:
    """One MoT block as a nested compile region: under torch.compile the identical block body is traced
    and compiled once and reused by all blocks (weights are graph inputs), instead of unrolling 24
    copies into the graph, which is what makes compiling the full model slow. Only used while compiling."""
    return blk(h, t_emb, cond, kv)


class SSFlowModel(nn.Module):
    """Official ``SparseStructureFlowTdfyWrapper`` (MoT backbone of the SS generator).

    ``forward(latents, t, cond, d)``: latents {shape: (B, R^3, 8), 6drotation_normalized: (B, 1, 6),
    scale: (B, 1, 3), translation: (B, 1, 3), translation_scale: (B, 1, 1)}, t (B,) already times
    1000, cond (B, L, Cc) condition tokens -> velocities with the same keys/shapes (sorted keys).
    """

    #: under torch.compile, run each block through :func:`_block_region` (compile the block once);
    #: eager calls are unaffected. Pass cached K/V through ``RunOptions.compiled_region_inputs`` when compiling.
    compile_block_regions: bool = True

    def __init__(self, cfg: SSFlowConfig) -> None:
        super().__init__()
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(f"model_channels {cfg.model_channels} not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        c = cfg.model_channels
        self.t_embedder = TimestepEmbedder(c)
        if cfg.is_shortcut_model:
            self.d_embedder = TimestepEmbedder(c)
        channels = {**LAYOUT_MODALITIES, SHAPE: cfg.in_channels}
        # official ModuleDict order: 6drotation_normalized, scale, shape, translation, translation_scale
        self.latent_mapping = nn.ModuleDict({
            m: Latent(channels[m], c, shape_position_embedding(cfg.resolution, c) if m == SHAPE else None)
            for m in sorted(channels)})
        self.blocks = nn.ModuleList(MoTBlock(c, cfg.cond_channels, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.num_blocks))
        self._init_weights()

    # ---------------------------------------------------------------- init
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        embedders = [self.t_embedder] + ([self.d_embedder] if self.cfg.is_shortcut_model else [])
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)

    def zero_init_(self) -> None:
        """adaLN-Zero initialisation (zero modulation and output layers) for training from scratch.

        Not the default: a zero-initialised model outputs zero velocities, which hides bugs in tests.
        """
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        for lat in self.latent_mapping.values():
            nn.init.zeros_(lat.out_layer.weight)
            nn.init.zeros_(lat.out_layer.bias)

    # ---------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].adaLN_modulation[1].weight.dtype if len(self.blocks) else torch.float32

    def latent_shapes(self, batch_size: int = 1) -> dict[str, tuple[int, int, int]]:
        """Shapes of the latents (sorted keys), as the sampler draws its initial noise."""
        return {m: (batch_size, lat.num_tokens, lat.in_channels) for m, lat in self.latent_mapping.items()}

    def _check_latents(self, latents: dict[str, Tensor]) -> int:
        if not isinstance(latents, dict):
            raise TypeError(f"latents must be a dict of tensors, got {type(latents).__name__}")
        expected = set(self.latent_mapping)
        if set(latents) != expected:
            raise ValueError(f"latent keys {sorted(latents)} != expected {sorted(expected)}")
        b = latents[SHAPE].shape[0]
        for m, shape in self.latent_shapes(b).items():
            if tuple(latents[m].shape) != shape:
                raise ValueError(f"latent {m!r} must have shape {shape}, got {tuple(latents[m].shape)}")
        return b

    def _check_cond(self, cond: Tensor, b: int) -> None:
        if cond.ndim != 3 or cond.shape[0] != b or cond.shape[2] != self.cfg.cond_channels:
            raise ValueError(f"cond must have shape ({b}, L, {self.cfg.cond_channels}), got {tuple(cond.shape)}")

    def precompute_cond_kv(self, cond: Tensor) -> CondKV:
        """Cross-attention keys/values of every block and stream for fixed condition tokens.

        Pass the result as ``forward(..., cond_kv=...)`` to skip the per-step ``to_kv(cond)``; the
        result is bit-identical to the plain path. Compute it separately for the zeroed
        (unconditional CFG) condition.
        """
        cond = cond.to(self.dtype)
        return [blk.cond_kv(cond) for blk in self.blocks]

    # ---------------------------------------------------------------- forward
    def forward(self, latents: dict[str, Tensor], t: Tensor, cond: Tensor, d: Tensor | None = None,
                cond_kv: CondKV | None = None) -> dict[str, Tensor]:
        b = self._check_latents(latents)
        self._check_cond(cond, b)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},) or be a scalar, got {tuple(t.shape)}")
        if cond_kv is not None and len(cond_kv) != len(self.blocks):
            raise ValueError(f"cond_kv has {len(cond_kv)} entries, model has {len(self.blocks)} blocks")

        lm = self.latent_mapping
        h = {
            SHAPE: lm[SHAPE].to_input(latents[SHAPE]),
            LAYOUT: torch.cat([lm[m].to_input(latents[m]) for m in LAYOUT_STREAM_ORDER], dim=1),
        }
        t_emb = self.t_embedder(t)
        if d is not None:
            if not self.cfg.is_shortcut_model:
                raise ValueError("d (shortcut step size) given but the model has no d_embedder")
            if d.ndim == 0:
                d = d.expand(b)
            t_emb = t_emb + self.d_embedder(d)

        dtype = self.dtype
        h = {s: x.to(dtype) for s, x in h.items()}
        t_emb = t_emb.to(dtype)
        cond = cond.to(dtype)
        regions = self.compile_block_regions and torch.compiler.is_compiling()
        for i, blk in enumerate(self.blocks):
            kv = None if cond_kv is None else cond_kv[i]
            h = _block_region(blk, h, t_emb, cond, kv) if regions else blk(h, t_emb, cond, kv)

        out = {SHAPE: lm[SHAPE].to_output(h[SHAPE])}
        splits = [lm[m].num_tokens for m in LAYOUT_STREAM_ORDER]
        for m, hm in zip(LAYOUT_STREAM_ORDER, h[LAYOUT].split(splits, dim=1)):
            out[m] = lm[m].to_output(hm)
        in_dtype = latents[SHAPE].dtype
        return {m: out[m].to(in_dtype) for m in sorted(out)}
