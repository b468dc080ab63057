"""SLaT flow transformer (stage 2): velocity of the structured latent on sparse voxels.

Architecture and state-dict keys follow ``sam3d-architecture.md`` section 3 (keys relative to the
checkpoint prefix ``reverse_fn.backbone.``): sparse IO res-blocks around a stack of modulated
sparse transformer blocks with full self-attention per batch element and cross-attention to the
condition tokens.

Token subset seam: ``forward`` works on whatever voxels it is given. A caller that passes only
``feats[active], coords[active]`` gets velocities for those rows; the dropped voxels are then
absent as convolution neighbours, pooling members and attention keys for the kept ones (as in the
released Fast-SAM3D carving code, which slices the coordinates before the network call).
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import SLaTFlowConfig
from .layers import AbsolutePositionEmbedder, FeedForwardNet, LayerNorm32, TimestepEmbedder, zero_module
from .sparse import (SparseConv3d, SparseCrossAttention, SparseDownsample, SparseLinear, SparseSelfAttention,
                     SparseTensor, SparseUpsample)

#: res-blocks per IO level (official ``num_io_res_blocks``; the last one of each input level
#: downsamples, the first one of each output level upsamples)
NUM_IO_RES_BLOCKS = 2
#: LayerNorm32 eps of the res-blocks and transformer blocks
NORM_EPS = 1e-6

#: the compiled torso's token-bucket step (:func:`use_token_buckets`; 0: off)
_TOKEN_BUCKET: ContextVar[float] = ContextVar("fs3d_slat_token_bucket", default=0.0)
#: the torch.compile backend of the IO res-blocks' fused element-wise steps (:func:`use_fused_io_blocks`; None: off)
_FUSED_IO: ContextVar[str | None] = ContextVar("fs3d_slat_fused_io", default=None)
#: whether the output path's up-sampling block runs its row-wise steps on the coarse rows (:func:`use_coarse_upsample`)
_COARSE_UPSAMPLE: ContextVar[bool] = ContextVar("fs3d_slat_coarse_upsample", default=False)
#: transformer blocks per piece of a CUDA graph recorded in pieces (:func:`use_graph_pieces`; 0: no piece ends)
_PIECE_BLOCKS: ContextVar[int] = ContextVar("fs3d_slat_piece_blocks", default=0)


@contextlib.contextmanager
def _set_within(var: ContextVar, value) -> Iterator[None]:
    """``var`` set to ``value`` within the block and restored on exit, errors included (the ``use_*`` scopes)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _norm_silu(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """SiLU(LayerNorm32(x)) with an affine norm: the res-block's first step, as its eager ops."""
    y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)
    return F.silu(y)


def _norm_modulate_silu(h: Tensor, scale: Tensor, shift: Tensor, batch_idx: Tensor | None, eps: float) -> Tensor:
    """SiLU(LayerNorm32(h) * (1 + scale) + shift) with the per-batch (B, C) modulation broadcast to the rows
    (``batch_idx``; None for one batch element): the res-block's second step, as its eager ops."""
    y = F.layer_norm(h.float(), h.shape[-1:], None, None, eps).to(h.dtype)
    if batch_idx is None:
        scale, shift = scale[0], shift[0]
    else:
        scale, shift = scale[batch_idx], shift[batch_idx]
    return F.silu(y * (1 + scale) + shift)


_FUSED_FNS: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {}


def _rows_dynamic(compiled: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``compiled`` (built with ``dynamic=False``) with the row count dynamic, so one graph serves every object: dim 0
    of the features (the first argument) and of the row index (a 1-D integer tensor). Everything else stays static,
    so each channel width keeps a kernel specialised to it."""
    def call(*args):
        for a in args:
            if isinstance(a, Tensor) and (a is args[0] or (a.ndim == 1 and not a.is_floating_point())):
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args)
    return call


def _fused_io_fns(backend: str) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The two steps torch.compile'd with ``backend`` (rows dynamic, channels static: :func:`_rows_dynamic`), cached."""
    if backend not in _FUSED_FNS:
        _FUSED_FNS[backend] = tuple(_rows_dynamic(torch.compile(fn, backend=backend, dynamic=False))
                                    for fn in (_norm_silu, _norm_modulate_silu))
    return _FUSED_FNS[backend]


def current_fused_io() -> str | None:
    """The backend the SLaT IO res-blocks compile their element-wise steps with here (None: eager ops)."""
    return _FUSED_IO.get()


@contextlib.contextmanager
def use_fused_io_blocks(backend: str | None) -> Iterator[None]:
    """Within the block, each SLaT IO res-block runs its two element-wise steps (fp32 LayerNorm, cast, modulation,
    SiLU) as torch.compile'd functions of ``backend``: one fused kernel each under inductor, where the eager ops launch
    about a dozen (the sparse convs stay as they are). None: the eager ops. Restored on exit, errors included."""
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"use_fused_io_blocks takes a torch.compile backend name or None, got {backend!r}")
    with _set_within(_FUSED_IO, backend):
        yield


def current_coarse_upsample() -> bool:
    """Whether the SLaT up-sampling res-block runs on the coarse rows here (:func:`use_coarse_upsample`)."""
    return _COARSE_UPSAMPLE.get()


@contextlib.contextmanager
def use_coarse_upsample(on: bool) -> Iterator[None]:
    """Within the block, a SLaT res-block that up-samples runs its first norm and SiLU and its skip linear on the
    coarse rows, gathers the skip's output (128 channels) instead of the block's input (2,048), and lets its first
    conv read the coarse rows through its composed table (``SparseConv3d.forward_gathered``). Each of those steps acts
    row by row, and nearest up-sampling copies rows, so each fine row gets what it got before (bit for bit on the CPU,
    tested). Restored on exit, errors included."""
    if not isinstance(on, bool):
        raise ValueError(f"use_coarse_upsample takes True or False, got {on!r}")
    with _set_within(_COARSE_UPSAMPLE, on):
        yield


def bucket_tokens(n: int, step: float) -> int:
    """``n`` rounded up to its token bucket: a multiple of the largest power of two m <= max(1, step * n), so the padding
    (< m) is below ``step`` of ``n`` and there are about 1 / step buckets per doubling of ``n`` (16 for 1/16).
    ``step`` 0 returns ``n``."""
    if n < 1:
        raise ValueError(f"token count must be >= 1, got {n}")
    if not 0.0 <= step <= 1.0:
        raise ValueError(f"token bucket step must be in [0, 1], got {step}")
    if step == 0.0:
        return n
    m = 1 << max(0, math.floor(math.log2(max(1.0, step * n))))
    return -(-n // m) * m


def check_token_bucket(step: float) -> None:
    """Reject a token-bucket step that is not a number in [0, 1] (0: off)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 <= step <= 1.0:
        raise ValueError(f"slat_token_bucket is a step in [0, 1] (0: off; 1/16: buckets 1/16 of the size apart), "
                         f"got {step!r}")


def current_token_bucket() -> float:
    """The token-bucket step the compiled SLaT torso runs under (0: off)."""
    return _TOKEN_BUCKET.get()


@contextlib.contextmanager
def use_token_buckets(step: float) -> Iterator[None]:
    """Within the block, the compiled SLaT torso (``forward(..., torso=...)``) pads each object's tokens up to
    :func:`bucket_tokens` and leaves the padding out as self-attention keys. Objects whose token counts share a
    bucket then share one shape, so CUDA graphs recorded for one replay for the others. Restored on exit, errors
    included."""
    check_token_bucket(step)
    with _set_within(_TOKEN_BUCKET, float(step)):
        yield


def check_piece_blocks(blocks: int) -> None:
    """Reject a pieces setting that is not an int >= 0."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"slat_graph_piece_blocks is the transformer blocks per recorded piece, an int >= 0 (0: one "
                         f"graph per pass), got {blocks!r}")


def current_graph_pieces() -> int:
    """Transformer blocks per piece the SLaT flow marks for a recording in pieces (0: none marked)."""
    return _PIECE_BLOCKS.get()


@contextlib.contextmanager
def use_graph_pieces(blocks: int) -> Iterator[None]:
    """Within the block, the SLaT flow calls ``graph_piece_end`` after its input path, after every ``blocks``
    transformer blocks and after the last one (``stages.graphs``): the points where a ``GraphedCall(in_pieces=True)``
    recording ends one graph and starts the next. Outside such a recording the calls do nothing. 0: no calls (the
    default; the compiled torso is then the one without them). Restored on exit, errors included."""
    check_piece_blocks(blocks)
    with _set_within(_PIECE_BLOCKS, blocks):
        yield


def _piece_end(x: Tensor) -> None:
    from ..stages.graphs import graph_piece_end  # the op lives with the recordings it cuts
    graph_piece_end(x)


class SparseResBlock3d(nn.Module):
    """Sparse conv res-block with timestep adaLN (scale, shift) on the second norm.

    Keys: ``norm1`` (affine), ``conv1.conv``, ``conv2.conv`` (zero-init), ``emb_layers.1``
    (emb -> 2*out, first half scale, second half shift), ``skip_connection`` (SparseLinear, only
    when channels change). Down/upsampling happens FIRST, before the residual split.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 downsample: bool = False, upsample: bool = False) -> None:
        super().__init__()
        if downsample and upsample:
            raise ValueError("a res-block cannot both downsample and upsample")
        out_channels = out_channels or channels
        self.channels, self.out_channels = channels, out_channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=NORM_EPS)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=NORM_EPS)
        self.conv1 = SparseConv3d(channels, out_channels, 3)
        self.conv2 = zero_module(SparseConv3d(out_channels, out_channels, 3))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = SparseLinear(channels, out_channels) if channels != out_channels else nn.Identity()
        self.updown: nn.Module | None = None
        if downsample:
            self.updown = SparseDownsample(2)
        elif upsample:
            self.updown = SparseUpsample(2)

    def emb_modulation(self, emb: Tensor) -> Tensor:
        """(B, E) -> (B, 2 * out_channels): the timestep embedding's scale (first half) and shift for the second norm;
        a function of the sampler step alone (``SLaTFlowModel.io_modulations`` computes it for every IO block ahead)."""
        lin = self.emb_layers[1]
        return self.emb_layers(emb.to(lin.weight.dtype))

    def forward(self, x: SparseTensor, emb: Tensor, mod: Tensor | None = None) -> SparseTensor:
        """``mod`` (optional, (B, 2 * out_channels)): this block's :meth:`emb_modulation` of ``emb``, computed ahead."""
        scale, shift = (self.emb_modulation(emb) if mod is None else mod).chunk(2, dim=1)
        if self._coarse_upsample():
            return self._forward_coarse(x, scale, shift)
        if self.updown is not None:
            x = self.updown(x)
        backend = current_fused_io()
        if backend is not None and not self._fused_bypassed(x.feats):
            norm_silu, norm_modulate_silu = _fused_io_fns(backend)
            if scale.shape[0] != x.batch_size:
                raise ValueError(f"per-batch values have {scale.shape[0]} rows, batch_size is {x.batch_size}")
            h = self.conv1(x.replace(norm_silu(x.feats, self.norm1.weight, self.norm1.bias, self.norm1.eps)))
            f = norm_modulate_silu(h.feats, scale, shift, None if x.batch_size == 1 else x.batch_idx, self.norm2.eps)
            h = self.conv2(h.replace(f))
            return h.replace(h.feats + self.skip_connection(x).feats)
        h = x.replace(F.silu(self.norm1(x.feats)))
        h = self.conv1(h)
        f = self.norm2(h.feats) * (1 + x.per_row(scale)) + x.per_row(shift)
        h = self.conv2(h.replace(F.silu(f)))
        return h.replace(h.feats + self.skip_connection(x).feats)

    def _coarse_upsample(self) -> bool:
        """Whether this forward runs on the coarse rows (:func:`use_coarse_upsample`): an up-sampling block, asked for,
        and nothing observing the steps it moves (module hooks on the norm, the skip, the conv or the up-sampling,
        or global module hooks: they would see other rows or not fire)."""
        if not (isinstance(self.updown, SparseUpsample) and current_coarse_upsample()):
            return False
        from torch.nn.modules import module as module_mod
        watched = (self.norm1, self.conv1, self.updown, self.skip_connection)
        return not (any(m._forward_hooks or m._forward_pre_hooks for m in watched)
                    or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)

    def _forward_coarse(self, x: SparseTensor, scale: Tensor, shift: Tensor) -> SparseTensor:
        """:meth:`forward` of an up-sampling block with the row-wise steps on the coarse rows of ``x``: the norm and
        SiLU, and the skip linear, whose 128-channel output is gathered instead of the 2,048-channel input; the first
        conv reads the coarse rows through its composed table. The same values for every fine row."""
        fine_coords, inverse, fine_cache = self.updown.source(x)
        fine = SparseTensor(x.feats.new_empty(len(inverse), 0), fine_coords, fine_cache)
        backend = current_fused_io()
        if backend is not None and not self._fused_bypassed(x.feats):
            norm_silu, norm_modulate_silu = _fused_io_fns(backend)
            if scale.shape[0] != fine.batch_size:
                raise ValueError(f"per-batch values have {scale.shape[0]} rows, batch_size is {fine.batch_size}")
            h = self.conv1.forward_gathered(fine, norm_silu(x.feats, self.norm1.weight, self.norm1.bias,
                                                            self.norm1.eps), inverse)
            f = norm_modulate_silu(h.feats, scale, shift, None if fine.batch_size == 1 else fine.batch_idx,
                                   self.norm2.eps)
        else:
            h = self.conv1.forward_gathered(fine, F.silu(self.norm1(x.feats)), inverse)
            f = F.silu(self.norm2(h.feats) * (1 + fine.per_row(scale)) + fine.per_row(shift))
        h = self.conv2(h.replace(f))
        return h.replace(h.feats + self.skip_connection(x).feats[inverse])

    def prepare_coarse_upsample(self, x: SparseTensor) -> None:
        """For an up-sampling block: build the composed table its first conv reads on the coarse path
        (:meth:`_forward_coarse`), from the coarse tensor ``x`` (zero-width features do), outside any recorded graph."""
        if not isinstance(self.updown, SparseUpsample):
            return
        fine_coords, inverse, fine_cache = self.updown.source(x)
        fine = SparseTensor(x.feats.new_empty(len(inverse), 0), fine_coords, fine_cache)
        self.conv1.prepare_gathered(fine, inverse, len(x))

    def prepare(self, x: SparseTensor) -> SparseTensor:
        """Build on the caches the tables a forward on ``x`` would read (down/upsampling maps, both convs' neighbour
        tables) without computing the block: ``x``'s features only give the device (the convs' algorithms follow
        their weights' dtype or autocast), so a zero-width tensor keeps the down-sampling's pooling empty. Returns
        the tensor at the block's output coordinates, with features as wide as ``x``'s
        (``SLaTFlowModel.build_structure``)."""
        if self.updown is not None:
            x = self.updown(x)
        if x.batch_size > 1:
            _ = x.batch_idx  # the adaLN's per-row scale and shift index with it
        self.conv1.prepare(x)
        self.conv2.prepare(x)  # its input has conv1's coordinates: the same table (one cache entry)
        return x

    def _fused_bypassed(self, feats: Tensor) -> bool:
        """Where the fused steps would change what observers see: module hooks on the norms, or global module hooks
        (the fused steps call no norm module), and autocast (kept on the eager ops to stay with the measured path)."""
        from torch.nn.modules import module as module_mod
        return bool(self.norm1._forward_hooks or self.norm1._forward_pre_hooks or self.norm2._forward_hooks
                    or self.norm2._forward_pre_hooks or module_mod._global_forward_hooks
                    or module_mod._global_forward_pre_hooks or torch.is_autocast_enabled(feats.device.type))


class ModulatedSparseTransformerCrossBlock(nn.Module):
    """adaLN-gated self-attention, plain cross-attention, adaLN-gated MLP on sparse tokens.

    norm1/norm3: LayerNorm32 no affine; norm2: affine; all eps 1e-6. ``adaLN_modulation`` =
    (SiLU, Linear(C, 6C)) chunked as shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_rms_norm: bool = True) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=NORM_EPS)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=NORM_EPS)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=NORM_EPS)
        self.self_attn = SparseSelfAttention(channels, num_heads, mode="full", qk_rms_norm=qk_rms_norm)
        self.cross_attn = SparseCrossAttention(channels, ctx_channels, num_heads)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def modulation_vector(self, emb: Tensor) -> Tensor:
        """(B, E) -> (B, 6C): the adaLN output, a function of the timestep embedding alone (so of the sampler step,
        not of the object: ``SLaTFlowModel.block_modulations`` computes it for all blocks ahead)."""
        return self.adaLN_modulation(emb.to(self.adaLN_modulation[1].weight.dtype))

    def _modulation(self, emb: Tensor, mods: Tensor | None = None) -> tuple[Tensor, ...]:
        """(B, E) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, C); from ``mods``
        ((B, 6C), :meth:`modulation_vector` computed ahead) where given, without computing it again."""
        return (self.modulation_vector(emb) if mods is None else mods).chunk(6, dim=1)

    def _residuals(self, f: Tensor, mods, self_attn: Callable[[Tensor], Tensor],
                   cross_attn: Callable[[Tensor], Tensor]) -> Tensor:
        """The block's math on features ``f`` with modulations broadcastable to ``f``; shared by the
        sparse :meth:`forward` and the dense :meth:`dense_forward` so the two cannot drift apart."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = self.norm1(f) * (1 + scale_msa) + shift_msa
        f = f + self_attn(h) * gate_msa
        f = f + cross_attn(self.norm2(f))
        h = self.norm3(f) * (1 + scale_mlp) + shift_mlp
        return f + self.mlp(h) * gate_mlp

    def forward(self, x: SparseTensor, emb: Tensor, context: Tensor | None = None,
                context_kv: tuple[Tensor, Tensor] | None = None, mods: Tensor | None = None) -> SparseTensor:
        """``mods`` (optional, (B, 6C)): this block's :meth:`modulation_vector` of ``emb``, computed ahead."""
        mods = [x.per_row(m) for m in self._modulation(emb, mods)]
        f = self._residuals(x.feats, mods, lambda h: self.self_attn(x.replace(h)).feats,
                            lambda h: self.cross_attn(x.replace(h), context, context_kv).feats)
        return x.replace(f)

    def dense_forward(self, f: Tensor, emb: Tensor, context: Tensor | None = None,
                      context_kv: tuple[Tensor, Tensor] | None = None, key_len: Tensor | None = None,
                      mods: Tensor | None = None) -> Tensor:
        """The block on B equal-length batch elements laid out densely, (B, L, C) -> (B, L, C).

        The same values as :meth:`forward` on those tokens, on plain tensors (what torch.compile of
        the SLaT torso traces; see :meth:`SLaTFlowModel.dense_torso`). Submodule hooks do not fire.
        ``key_len`` ((B,)): tokens from ``key_len[b]`` on are padding, left out as self-attention keys. ``mods``
        ((B, 6C), optional): this block's :meth:`modulation_vector`, computed ahead.
        """
        mods = [m[:, None] for m in self._modulation(emb, mods)]
        return self._residuals(f, mods, lambda h: self.self_attn.dense(h, key_len),
                               lambda h: self.cross_attn.dense(h, context, context_kv))


@torch.compiler.nested_compile_region
def _dense_block_region(block: ModulatedSparseTransformerCrossBlock, f: Tensor, emb: Tensor,
                        context: Tensor | None, context_kv: tuple[Tensor, ...] | None,
                        key_len: Tensor | None = None, mods: Tensor | None = None) -> Tensor:
    """One transformer block as a nested compile region: traced and compiled once, reused by all 24
    blocks (weights are graph inputs), as the SS flow's ``_block_region``. Only used while compiling."""
    return block.dense_forward(f, emb, context, context_kv, key_len, mods)


def pos_emb_key(dtype: torch.dtype) -> tuple:
    """The structure entry (of the torso's resolution level) holding its tokens' position embedding in ``dtype``."""
    return ("pos_emb", dtype)


class SLaTFlowModel(nn.Module):
    """Velocity network of the SLaT stage (official ``SLatFlowModel``, keys as its checkpoint)."""

    #: under torch.compile, run each block of :meth:`dense_torso` as a nested compile region (the
    #: block compiled once, not 24 times); eager calls are unaffected
    compile_block_regions: bool = True

    def __init__(self, cfg: SLaTFlowConfig) -> None:
        super().__init__()
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(f"model_channels {cfg.model_channels} not divisible by num_heads {cfg.num_heads}")
        if not cfg.io_block_channels:
            raise ValueError("io_block_channels must name at least one IO level")
        if cfg.resolution % 2 ** len(cfg.io_block_channels):
            raise ValueError(f"resolution {cfg.resolution} not divisible by 2^{len(cfg.io_block_channels)}")
        self.cfg = cfg
        c, emb = cfg.model_channels, cfg.model_channels
        io = list(cfg.io_block_channels)
        self.t_embedder = TimestepEmbedder(c)
        self.input_layer = SparseLinear(cfg.in_channels, io[0])
        self.input_blocks = nn.ModuleList()
        for chan, next_chan in zip(io, io[1:] + [c]):
            self.input_blocks.extend(SparseResBlock3d(chan, emb, chan) for _ in range(NUM_IO_RES_BLOCKS - 1))
            self.input_blocks.append(SparseResBlock3d(chan, emb, next_chan, downsample=True))
        self.pos_embedder = AbsolutePositionEmbedder(c)
        self.blocks = nn.ModuleList(
            ModulatedSparseTransformerCrossBlock(c, cfg.cond_channels, cfg.num_heads, cfg.mlp_ratio, qk_rms_norm=True)
            for _ in range(cfg.num_blocks))
        self.out_blocks = nn.ModuleList()
        for chan, prev_chan in zip(reversed(io), [c] + list(reversed(io[1:]))):
            self.out_blocks.append(SparseResBlock3d(prev_chan * 2, emb, chan, upsample=True))
            self.out_blocks.extend(SparseResBlock3d(chan * 2, emb, chan) for _ in range(NUM_IO_RES_BLOCKS - 1))
        self.out_layer = SparseLinear(io[0], cfg.in_channels)

    @property
    def torso_dtype(self) -> torch.dtype:
        """dtype of the blocks' parameters (fp16 when the official ``use_fp16`` is mirrored)."""
        return self.blocks[0].adaLN_modulation[1].weight.dtype if len(self.blocks) else self.input_layer.weight.dtype

    def _sparse_input(self, feats: Tensor, coords: Tensor, batch: int, structure: dict | None) -> SparseTensor:
        """The validated sparse input; with a ``structure``, validated once for its coordinates."""
        checked = None if structure is None else structure.get("checked_input")
        if checked is not None:
            if checked[0] is not coords or checked[1] != batch:
                raise ValueError("a persistent structure must be used with the same coords tensor and batch size "
                                 "on every call (make one per coordinate set)")
            return SparseTensor(feats, checked[2], structure)
        if int(coords[:, 1:].max()) >= self.cfg.resolution:
            raise ValueError(f"coords exceed resolution {self.cfg.resolution}")
        x = SparseTensor.create(feats, coords, batch_size=batch)
        if structure is None:
            return x
        structure.update(x.cache)
        structure["checked_input"] = (coords, batch, x.coords)
        return SparseTensor(feats, x.coords, structure)

    def block_modulations(self, t: Tensor) -> Tensor:
        """(num_blocks, B, 6C): every transformer block's adaLN output at the scaled timesteps ``t`` ((B,)), as the
        blocks compute it from the timestep embedding (the same ops on the same shapes). It depends on the sampler step
        and the weights only, not on the object, so a caller may compute it once per step of its schedule and pass it
        as ``forward``'s ``block_mods`` (``SLaTStage``'s cache under ``RunOptions.cache_block_modulations``)."""
        t = t.reshape(-1)
        emb = self.t_embedder(t)
        return torch.stack([block.modulation_vector(emb) for block in self.blocks])

    def check_block_mods(self, block_mods: Tensor, batch: int, device: torch.device) -> None:
        """Refuse ``block_mods`` that are not :meth:`block_modulations` of ``batch`` rows on ``device`` in the dtype the
        blocks compute them in here (autocast's, else their weights'): other rows would broadcast over the wrong
        elements, and another dtype would silently promote the features (fp32 values into a bf16 torso)."""
        expected = (len(self.blocks), batch, 6 * self.cfg.model_channels)
        if tuple(block_mods.shape) != expected:
            raise ValueError(f"block_mods must be (num_blocks, batch, 6 * model_channels) = {expected}, got "
                             f"{tuple(block_mods.shape)}")
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.blocks[0].adaLN_modulation[1].weight.dtype if len(self.blocks) else block_mods.dtype)
        if block_mods.dtype != dtype or block_mods.device != device:
            raise ValueError(f"block_mods must be {dtype} on {device} (what the blocks compute them as here), got "
                             f"{block_mods.dtype} on {block_mods.device}")

    @property
    def io_blocks(self) -> list[SparseResBlock3d]:
        """The input then the output res-blocks, in the order :meth:`io_modulations` packs their modulations."""
        return [*self.input_blocks, *self.out_blocks]

    def io_modulation_widths(self) -> list[int]:
        """Width of each packed part of :meth:`io_modulations`' rows: the embedding's, then each IO block's."""
        return [self.cfg.model_channels] + [2 * blk.out_channels for blk in self.io_blocks]

    def io_modulations(self, t: Tensor) -> Tensor:
        """(B * (C + sum of 2 * out_channels),): the timestep embedding of the scaled timesteps ``t`` ((B,)) followed by
        every IO res-block's :meth:`SparseResBlock3d.emb_modulation` of it, each part (B, width) row-major and packed
        one after the other (so that each, viewed back, is contiguous like the tensor it replaces). Like
        :meth:`block_modulations`, a function of the sampler step and the weights only: a caller may compute it once
        per step and pass it as ``forward``'s ``io_mods`` (``SLaTStage``'s cache under
        ``RunOptions.cache_io_modulations``), so that a pass runs neither the timestep embedder nor the IO blocks'
        ``emb_layers``. The same ops on the same shapes as the pass, so the same values. Needs one dtype for the
        embedding and every IO block's output (a flow converted as a whole, as every precision here makes it)."""
        t = t.reshape(-1)
        emb = self.t_embedder(t)
        parts = [emb] + [blk.emb_modulation(emb) for blk in self.io_blocks]
        dtypes = {p.dtype for p in parts}
        if len(dtypes) != 1:
            raise ValueError(f"io_modulations packs the timestep embedding and the IO blocks' modulations in one "
                             f"tensor, and they come out in {sorted(str(d) for d in dtypes)}: convert the flow as a whole")
        return torch.cat([p.reshape(-1) for p in parts])

    def unpack_io_modulations(self, io_mods: Tensor, batch: int, device: torch.device) -> tuple[Tensor, list[Tensor]]:
        """The embedding ((B, C)) and each IO block's modulation ((B, 2 * out_channels)) as contiguous views of
        :meth:`io_modulations`' packed tensor; refused where its size, dtype or device is not that of ``batch`` rows
        here (the blocks' weights' dtype, or autocast's)."""
        widths = self.io_modulation_widths()
        if io_mods.ndim != 1 or io_mods.numel() != batch * sum(widths):
            raise ValueError(f"io_mods must be io_modulations of {batch} rows: a flat tensor of {batch * sum(widths)} "
                             f"values, got shape {tuple(io_mods.shape)}")
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.t_embedder.mlp[0].weight.dtype)
        if io_mods.dtype != dtype or io_mods.device != device:
            raise ValueError(f"io_mods must be {dtype} on {device} (what the flow computes them as here), got "
                             f"{io_mods.dtype} on {io_mods.device}")
        parts, at = [], 0
        for w in widths:
            parts.append(io_mods[at:at + batch * w].view(batch, w))
            at += batch * w
        return parts[0], parts[1:]

    def precompute_cond_kv(self, cond: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-block cross-attention (k, v), each (B, L, H, D); the same for every sampler step.

        Passing the result as ``cond_kv`` gives bit-identical outputs to passing ``cond``.
        """
        cond = cond.to(self.torso_dtype)
        return [blk.cross_attn.context_kv(cond) for blk in self.blocks]

    def dense_torso(self, f: Tensor, emb: Tensor, context: Tensor | None,
                    cond_kv: list[tuple[Tensor, Tensor]] | None = None, key_len: Tensor | None = None,
                    piece_blocks: int = 0, *, block_regions: bool = True,
                    block_mods: Tensor | None = None) -> Tensor:
        """The transformer blocks on B equal-length batch elements, (B, L, C) -> (B, L, C).

        This is what ``RunOptions.compile_slat`` compiles (with L dynamic, so one graph serves every
        object): under torch.compile each block runs as a nested compile region, so the block body is
        compiled once. The same values as the sparse block loop of :meth:`forward`. ``key_len`` ((B,), with
        token buckets): the real token counts; the tokens after them are padding, left out as keys. ``piece_blocks``
        (:func:`use_graph_pieces`): a piece end after every that many blocks but the last. ``block_regions`` False
        (``RunOptions.slat_block_regions``): under torch.compile the blocks are inlined into one graph instead of
        nested regions, so that inductor can fuse across block boundaries. ``block_mods`` ((num_blocks, B, 6C),
        :meth:`block_modulations`): each block's adaLN output computed ahead, used instead of computing it from ``emb``.
        """
        if not isinstance(block_regions, bool):
            raise ValueError(f"block_regions is a bool, got {block_regions!r}")
        regions = block_regions and self.compile_block_regions and torch.compiler.is_compiling()
        if block_mods is not None:
            self.check_block_mods(block_mods, f.shape[0], f.device)
        for i, block in enumerate(self.blocks):
            kv = None if cond_kv is None else cond_kv[i]
            mods = None if block_mods is None else block_mods[i]
            f = (_dense_block_region(block, f, emb, context, kv, key_len, mods) if regions
                 else block.dense_forward(f, emb, context, kv, key_len, mods))
            if piece_blocks and (i + 1) % piece_blocks == 0 and i + 1 < len(self.blocks):
                _piece_end(f)
        return f

    def _check_no_block_hooks(self) -> None:
        # an explicit walk over the child dicts (a third of named_modules' host time: this runs at every eager or
        # recorded torso pass, the first of which the GPU waits for); the names only when there is something to report
        stack = [self.blocks]
        while stack:
            m = stack.pop()
            if m._forward_hooks or m._forward_pre_hooks:
                break
            stack.extend(c for c in m._modules.values() if c is not None)
        else:
            return
        hooked = [name for name, m in self.blocks.named_modules()
                  if m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            raise ValueError(f"the compiled SLaT torso (compile_slat) runs the transformer blocks as one "
                             f"function, so the module hooks on blocks.{hooked[0]} (and {len(hooked) - 1} "
                             f"more) would never fire; remove them or turn compile_slat off")

    def forward(self, feats: Tensor, coords: Tensor, t: Tensor, cond: Tensor | None,
                cond_kv: list[tuple[Tensor, Tensor]] | None = None,
                structure: dict | None = None, torso: Callable[..., Tensor] | None = None,
                block_mods: Tensor | None = None, io_mods: Tensor | None = None) -> Tensor:
        """feats (N, in_ch), coords (N, 4) int [batch, x, y, z] sorted by batch, t (B,) already
        scaled by the sampler's time scale, cond (B, L, cond_ch) -> velocity (N, in_ch).

        Row r uses t[coords[r, 0]] and cond[coords[r, 0]]. ``cond_kv`` (from
        :meth:`precompute_cond_kv`) replaces ``cond`` in the cross-attention. ``structure`` (from
        :func:`~fs3d_accel.model.sparse.persistent_structure`), passed with the same ``coords`` on every
        call, keeps the coordinate-derived tables across calls: the checks and tables that need the
        host run on the first call only. Outputs are the same with or without it.

        ``torso`` (the torch.compile'd :meth:`dense_torso`) replaces the block loop when every batch
        element has the same number of tokens (one object, or the CFG pair); otherwise the loop runs.
        ``block_mods`` (:meth:`block_modulations` of these ``t``, computed ahead): the blocks' adaLN outputs, so that
        the blocks do not compute them again. ``io_mods`` (:meth:`io_modulations` of these ``t``, computed ahead): the
        timestep embedding and the IO res-blocks' scale and shift, so that the pass computes neither.
        """
        cfg = self.cfg
        if feats.ndim != 2 or feats.shape[1] != cfg.in_channels:
            raise ValueError(f"feats must be (N, {cfg.in_channels}), got {tuple(feats.shape)}")
        if cond_kv is None:
            if cond is None or cond.ndim != 3 or cond.shape[2] != cfg.cond_channels:
                raise ValueError(f"cond must be (B, L, {cfg.cond_channels}), got "
                                 f"{None if cond is None else tuple(cond.shape)}")
            batch = cond.shape[0]
        else:
            if len(cond_kv) != len(self.blocks):
                raise ValueError(f"cond_kv has {len(cond_kv)} entries, model has {len(self.blocks)} blocks")
            first = cond_kv[0]  # (k, v), or the per-element form (collapse_zero_condition_kv)
            batch = first[0].shape[0] if len(first) == 2 else len(first) // 2
        if len(feats) == 0:
            raise ValueError("SLaT flow model needs at least one voxel")
        t = t.reshape(-1)
        if t.numel() == 1 and batch > 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"t has {t.numel()} entries, cond batch is {batch}")
        if block_mods is not None:
            self.check_block_mods(block_mods, batch, feats.device)
        x = self._sparse_input(feats, coords, batch, structure)
        dtype = self.torso_dtype
        if io_mods is None:
            emb, io_parts = self.t_embedder(t), None
        else:
            emb, io_parts = self.unpack_io_modulations(io_mods, batch, feats.device)
        n_in = len(self.input_blocks)
        h, skips = self._io_in(x, emb, None if io_parts is None else io_parts[:n_in])
        ctx = None if cond_kv is not None else cond.to(dtype)
        pieces = current_graph_pieces()
        if pieces:
            _piece_end(h.feats)
        if torso is not None and len(set(h.seqlens)) == 1:
            self._check_no_block_hooks()
            mods_kw = {} if block_mods is None else {"block_mods": block_mods}
            f = h.feats.view(h.batch_size, -1, h.num_channels)
            step = current_token_bucket()
            if step:  # pad to the token bucket; the padding is masked as keys and its outputs dropped
                n = f.shape[1]
                f = F.pad(f, (0, 0, 0, bucket_tokens(n, step) - n))
                key_len = torch.full((h.batch_size,), n, dtype=torch.int32, device=f.device)
                torch._dynamo.maybe_mark_dynamic(f, 1)  # token count: one graph for every object
                out = torso(f, emb, ctx, cond_kv, key_len, *([pieces] if pieces else []), **mods_kw)[:, :n]
            else:
                torch._dynamo.maybe_mark_dynamic(f, 1)  # token count: one graph for every object
                out = torso(f, emb, ctx, cond_kv, *([None, pieces] if pieces else []), **mods_kw)
            h = h.replace(out.reshape(len(h), -1))
        else:
            for i, block in enumerate(self.blocks):
                h = block(h, emb, ctx, None if cond_kv is None else cond_kv[i],
                          None if block_mods is None else block_mods[i])
                if pieces and (i + 1) % pieces == 0 and i + 1 < len(self.blocks):
                    _piece_end(h.feats)
        if pieces:
            _piece_end(h.feats)
        return self._io_out(h, skips, emb, feats.dtype, None if io_parts is None else io_parts[n_in:])

    def _io_in(self, x: SparseTensor, emb: Tensor, mods: list[Tensor] | None = None
               ) -> tuple[SparseTensor, list[Tensor]]:
        """Input layer, input res-blocks (down-sampling) and the position embedding: the torso's tokens and the
        skips. ``mods``: the input blocks' modulations, computed ahead (:meth:`io_modulations`)."""
        dtype = self.torso_dtype
        h = self.input_layer(x)
        h = h.replace(h.feats.to(dtype))
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, None if mods is None else mods[i])
            skips.append(h.feats)
        pe = h.cache.get(pos_emb_key(dtype))  # made by build_structure for these coordinates, where it ran
        if pe is None or self._pos_embedder_observed():
            pe = self.pos_embedder(h.coords[:, 1:]).to(dtype)
        return h.replace(h.feats + pe), skips

    def _pos_embedder_observed(self) -> bool:
        """Whether hooks would see the position embedder run (its own, or global module hooks): then each pass runs
        it, instead of reading the structure's kept embedding."""
        from torch.nn.modules import module as module_mod
        return bool(self.pos_embedder._forward_hooks or self.pos_embedder._forward_pre_hooks
                    or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)

    def _io_out(self, h: SparseTensor, skips: list[Tensor], emb: Tensor, out_dtype: torch.dtype,
                mods: list[Tensor] | None = None) -> Tensor:
        """Output res-blocks (up-sampling, with the skips), final norm and output layer: the velocity. ``mods``: the
        output blocks' modulations, computed ahead (:meth:`io_modulations`)."""
        for i, (block, skip) in enumerate(zip(self.out_blocks, reversed(skips))):
            h = block(h.replace(torch.cat([h.feats, skip], dim=1)), emb, None if mods is None else mods[i])
        f = h.feats.to(out_dtype)
        f = F.layer_norm(f, f.shape[-1:])
        return self.out_layer(h.replace(f.to(self.out_layer.weight.dtype))).feats.to(out_dtype)

    @torch.no_grad()
    def build_structure(self, feats: Tensor, coords: Tensor, t: Tensor, batch: int, structure: dict,
                        by_pass: bool = False) -> None:
        """Fill a :func:`~fs3d_accel.model.sparse.persistent_structure` for ``coords`` without a pass: the input
        path's tables alone (its convs' neighbour tables, the down-sampling maps, which also serve the output path's
        up-sampling, and the torso's token layout: what needs the host; since session 29 also the torso level's
        position embedding, which every pass then reads), built by ``SparseResBlock3d.prepare`` with
        zero-width features, so that no conv, norm or linear runs. ``feats`` and ``t`` are checked, not used. A
        later :meth:`forward` with this structure then reads no device data on the host (checked by
        ``tests/test_cuda_graphs.py``), so it can be recorded into a CUDA graph behind queued work. Until session 23
        this ran the whole input path and discarded its values: 11.2 of the 71 ms of host time cProfile saw in a 14k
        call's first step, about half of it the convs, norms and linears no longer run
        (``benchmarks/results/slat_host_profile_h100/session23``); on an H100 the SLaT call at 14k got 8-9 ms faster
        (session 24, ``benchmarks/results/base_vs_official_h100/session24/tables_only``). Hooks on the flow
        and its convs, norms and linears do not fire; hooks on its down-sampling modules do (zero-width inputs).
        ``by_pass``: the earlier way (``RunOptions.slat_tables_by_pass``, to time the two side by side): the input
        path runs on ``feats`` and ``t`` and its values are dropped; its submodules' hooks fire."""
        if feats.ndim != 2 or feats.shape[1] != self.cfg.in_channels:
            raise ValueError(f"feats must be (N, {self.cfg.in_channels}), got {tuple(feats.shape)}")
        if structure is None:
            raise ValueError("build_structure fills a persistent structure; got None")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if len(coords) and int(coords[:, 0].max()) >= batch:
            raise ValueError(f"coords name batch element {int(coords[:, 0].max())}, but batch is {batch}")
        t = t.reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"t has {t.numel()} entries, batch is {batch}")
        if not isinstance(by_pass, bool):
            raise ValueError(f"by_pass is a bool, got {by_pass!r}")
        x = self._sparse_input(feats, coords, batch, structure)
        if by_pass:
            h, _ = self._io_in(x, self.t_embedder(t.expand(batch) if t.numel() == 1 else t))
        else:  # only the tables: no features flow (zero channels), so no conv, norm or linear runs
            h = x.replace(x.feats[:, :0].to(self.torso_dtype))
            for block in self.input_blocks:
                h = block.prepare(h)
        _ = (h.seqlens, h.layout)  # the torso's (or the block loop's) per-element token counts and slices
        if current_coarse_upsample():  # the up-sampling block's composed conv table (use_coarse_upsample)
            for block in self.out_blocks:
                block.prepare_coarse_upsample(h)
        if h.cache.get("persistent"):
            # the torso's position embedding depends on these coordinates alone: made here, outside any recorded
            # graph, and read by every pass (_io_in), which otherwise computes it again (an outer product, sin, cos,
            # two cats, a pad and a cast per pass: ~1.7 ms of kernels in a 14k call, session 29's CPU op log)
            h.cache[pos_emb_key(self.torso_dtype)] = self.pos_embedder(h.coords[:, 1:]).to(self.torso_dtype)
