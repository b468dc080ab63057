"""Building blocks shared by the SAM 3D modules (names and math follow the official modules)."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from . import attention_kernels


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, result cast back."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos first, 256 frequencies) followed by a 2-layer MLP.

    The input ``t`` is already multiplied by the sampler's time scale (1000).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        if t.ndim == 0:
            t = t[None]
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class AbsolutePositionEmbedder(nn.Module):
    """Parameter-free sin/cos embedding of integer coordinates (one block per axis, sin then cos).

    ``freq_dim = channels // in_channels // 2``; the result is zero-padded to ``channels``.
    """

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels
        self.freq_dim = channels // in_channels // 2
        freqs = 1.0 / (10000 ** (torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, coords: Tensor) -> Tensor:
        """coords: (N, in_channels) -> (N, channels) float32."""
        n, d = coords.shape
        if d != self.in_channels:
            raise ValueError(f"expected coords with {self.in_channels} columns, got {d}")
        out = torch.outer(coords.reshape(-1).float(), self.freqs.to(coords.device))
        out = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(n, -1)
        if out.shape[1] < self.channels:
            out = torch.cat([out, out.new_zeros(n, self.channels - out.shape[1])], dim=-1)
        return out


class MultiHeadRMSNorm(nn.Module):
    """q/k RMS norm: F.normalize over head_dim, times gamma (heads, head_dim), times sqrt(head_dim)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., heads, head_dim)."""
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)


#: whether :class:`FeedForwardNet` runs its first Linear and GELU as one GEMM with a GELU epilogue (where it can)
_gelu_epilogue = False


@register_flop_formula(torch.ops.aten._addmm_activation)
def _addmm_activation_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """The fused Linear + GELU's GEMM, as FlopCounterMode counts ``addmm`` (2 * M * K * N; the epilogue and the bias
    add are not counted, as for ``addmm``). Without this rule, FLOP counts (and MFU) would miss every MLP that runs
    under :func:`use_gelu_epilogue`."""
    m, k = mat1_shape
    return 2 * m * k * mat2_shape[1]


def current_gelu_epilogue() -> bool:
    """Whether :class:`FeedForwardNet` fuses its GELU into the first GEMM here (:func:`use_gelu_epilogue`)."""
    return _gelu_epilogue


@contextlib.contextmanager
def use_gelu_epilogue(on: bool) -> Iterator[None]:
    """Inside the block, :class:`FeedForwardNet` on fp16 / bf16 CUDA tensors computes Linear + tanh-GELU as one
    ``torch._addmm_activation`` call: cuBLASLt's bias + GELU epilogue instead of a GEMM followed by an element-wise
    kernel that reads and writes the (tokens x 4C) hidden activation again. The previous choice comes back after, also
    when the block raises."""
    with _module_switch("_gelu_epilogue", on, "use_gelu_epilogue"):
        yield


@contextlib.contextmanager
def _module_switch(name: str, on: bool, caller: str) -> Iterator[None]:
    """Set this module's bool switch ``name`` to ``on`` inside the block, the previous value back after (also when the
    block raises); ``caller`` names the public context manager in the error for a non-bool."""
    if not isinstance(on, bool):
        raise ValueError(f"{caller} takes a bool, got {on!r}")
    previous = globals()[name]
    globals()[name] = on
    try:
        yield
    finally:
        globals()[name] = previous


class FeedForwardNet(nn.Module):
    """``mlp`` = Linear(c -> c*ratio), GELU(tanh), Linear(c*ratio -> c) (official key layout).

    Under :func:`use_gelu_epilogue` with fp16 / bf16 CUDA inputs of the weights' dtype, the first Linear and the GELU
    run as one cuBLASLt GEMM with a bias + GELU epilogue (``torch._addmm_activation``; inductor keeps it as one extern
    call). On CUDA that epilogue is the tanh approximation, the model's GELU (checked on the GPU by
    ``tests/test_gelu_epilogue.py``); on a CPU ``_addmm_activation`` computes the exact (erf) GELU instead, so the fused
    call is never taken there. It has no derivative either, so it is skipped where autograd would record it (inference
    runs under ``no_grad``), under autocast, and where module hooks sit on the Linear or the GELU (the per-module
    profilers of ``fs3d_analysis.profile`` would otherwise see neither). FlopCounterMode counts the fused GEMM as it
    counts ``addmm``. Same math on CUDA, different rounding."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self.mlp
        if (_gelu_epilogue and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and x.dtype == fc1.weight.dtype and fc1.bias is not None and x.numel()
                # module hooks on the Linear or the GELU (the per-module profilers) would never fire for a fused call
                and not (fc1._forward_hooks or fc1._forward_pre_hooks or act._forward_hooks or act._forward_pre_hooks)
                # autocast would not recast the fused op as it recasts the two steps: keep those under autocast
                and not torch.is_autocast_enabled("cuda")
                # the fused op has no derivative: where autograd would record it, keep the two steps
                and not (torch.is_grad_enabled()
                         and any(t is not None and t.requires_grad for t in (x, fc1.weight, fc1.bias)))):
            hidden = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return fc2(hidden.view(*x.shape[:-1], hidden.shape[-1]))
        return self.mlp(x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, role: str = "self",
              key_len: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on (B, L, H, D) tensors; returns (B, L, H, D).

    ``mask`` (optional): boolean (B, 1, Lq, Lk) or (B, 1, 1, Lk), True = attend. ``key_len`` (optional, not with
    ``mask``): (B,) integer counts in [1, Lk]; batch element b attends to its first ``key_len[b]`` keys only, the rest
    being padding (the SLaT torso's token buckets). FlashAttention-4 takes it as its used-key counts and skips the
    key tiles that are all padding; SDPA takes it as a key mask, which rules out its FlashAttention-2 backend. The
    counts are checked on CPU tensors outside torch.compile; on CUDA a check would synchronise with the device, so
    there they are trusted (the SLaT flow builds them from the token count itself). ``role`` ("self" or "cross")
    says what the call does, so the kernel can be chosen per role: unmasked fp16 / bf16 calls of a role
    selected by ``use_attention_kernel("flash-attn-cute", roles)`` go to FlashAttention-4
    (:mod:`fs3d_accel.model.attention_kernels`; CUDA tensors only, others raise there); everything else to SDPA.

    Unmasked attention over ONE key needs no kernel: the softmax of a single score is exactly 1, so every query's
    output is that key's value, returned as a broadcast view (gradients reach ``v`` only, as they do in exact
    arithmetic). PyTorch's FlashAttention-2 computes exactly that (a weight of exp(0) = 1, a sum of one term);
    cuDNN and FlashAttention-4 fuse the max subtraction into an FMA and may land within output rounding of it.
    Bit-equal to SDPA in the CPU tests; not yet compared on the GPU. This is the unconditional CFG branch's
    cross-attention under ``collapse_zero_cond`` (one key per head: :func:`collapse_zero_condition_kv`), which
    otherwise launched one kernel per block, stream and CFG step (912 FlashAttention-2 launches per SS sampler
    call in session 7's kernel table).
    """
    kernel = attention_kernels.current_attention_kernel(role)  # also rejects an unknown role, masked or not
    if key_len is not None:
        if mask is not None:
            raise ValueError("attention takes a mask or key_len (padded keys), not both")
        if key_len.shape != (k.shape[0],):
            raise ValueError(f"key_len must be (B,) = ({k.shape[0]},), got {tuple(key_len.shape)}")
        if (not key_len.is_cuda and not torch.compiler.is_compiling()
                and bool(((key_len < 1) | (key_len > k.shape[1])).any())):
            raise ValueError(f"key_len counts must be in [1, {k.shape[1]}] (the keys present), got {key_len.tolist()}")
        if kernel == attention_kernels.FLASH_ATTN_CUTE and q.dtype in (torch.float16, torch.bfloat16):
            return attention_kernels.flash_attn_cute_tiled(q, k, v, attention_kernels.current_flash_attn_tiles(role),
                                                           seqused_k=key_len.to(torch.int32))
        mask = (torch.arange(k.shape[1], device=k.device) < key_len[:, None])[:, None, None, :]
    if mask is None and k.shape[1] == 1:
        if (k.shape[0] not in (1, q.shape[0]) or v.shape[:3] != k.shape[:3] or q.shape[2:] != k.shape[2:]
                or q.dtype != v.dtype or q.device != v.device):
            raise ValueError(f"attention inputs do not match: q {tuple(q.shape)} {q.dtype} {q.device}, k "
                             f"{tuple(k.shape)}, v {tuple(v.shape)} {v.dtype} {v.device} (B, L, H, D)")
        if torch.is_autocast_enabled(v.device.type):  # SDPA runs in the autocast dtype: so does its output
            v = v.to(torch.get_autocast_dtype(v.device.type))
        return v.expand(q.shape[0], q.shape[1], v.shape[2], v.shape[3])
    small_query_limit = attention_kernels.current_small_query_limit()
    if mask is None and small_query_limit and q.shape[1] <= small_query_limit:
        return attention_kernels.small_query_path(q, k, v)
    if mask is None and kernel == attention_kernels.FLASH_ATTN_CUTE and q.dtype in (torch.float16, torch.bfloat16):
        return attention_kernels.flash_attn_cute_tiled(q, k, v, attention_kernels.current_flash_attn_tiles(role))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def cross_attention(q: Tensor, kv: tuple[Tensor, ...]) -> Tensor:
    """q (B, Lq, H, D) against cached K/V: ``(k, v)`` for the whole batch (one SDPA call), or the
    per-element form ``(k_0, v_0, ..., k_{B-1}, v_{B-1})``, each (1, L_i, H, D), whose elements may have
    different key counts (one call per element; see :func:`collapse_zero_condition_kv`). A flat tuple of
    tensors rather than a list of pairs: torch.compile's nested regions take it as plain inputs."""
    if len(kv) == 2:
        return attention(q, kv[0], kv[1], role="cross")
    if len(kv) != 2 * q.shape[0]:
        raise ValueError(f"{len(kv) // 2} per-element K/V pairs for a batch of {q.shape[0]} queries")
    return torch.cat([attention(q[i:i + 1], kv[2 * i], kv[2 * i + 1], role="cross") for i in range(q.shape[0])],
                     dim=0)


#: whether :func:`projected_cross_attention` projects a one-key batch element's value once (:func:`use_one_key_projection`)
_one_key_projection = False


def current_one_key_projection() -> bool:
    """Whether :func:`projected_cross_attention` projects one-key elements once here (:func:`use_one_key_projection`)."""
    return _one_key_projection


@contextlib.contextmanager
def use_one_key_projection(on: bool) -> Iterator[None]:
    """Inside the block, :func:`projected_cross_attention` gives each batch element whose cached K/V hold ONE key (the
    unconditional CFG rows under ``collapse_zero_cond``) ``to_out`` of that key's value for every query, projected once,
    instead of projecting every query through ``to_q``, attending (which returns the value for every query) and
    projecting every row through ``to_out``. The previous choice comes back after, also when the block raises."""
    with _module_switch("_one_key_projection", on, "use_one_key_projection"):
        yield


def one_key_output(v: Tensor, to_out: nn.Module) -> Tensor:
    """``to_out`` of the value of a one-key cached K/V: v (B, 1, H, D) -> (B, 1, C), the cross-attention's output for
    every query of those B elements (softmax over a single score is exactly 1). Under autocast the value is first cast to
    the autocast dtype, as :func:`attention` returns it."""
    if v.ndim != 4 or v.shape[1] != 1:
        raise ValueError(f"one_key_output takes a one-key value (B, 1, H, D), got {tuple(v.shape)}")
    if torch.is_autocast_enabled(v.device.type):
        v = v.to(torch.get_autocast_dtype(v.device.type))
    return to_out(v.reshape(v.shape[0], 1, v.shape[2] * v.shape[3]))


def is_one_key(k: Tensor) -> bool:
    """Whether cached keys k (B, L, H, D) hold a single key (a zero condition collapsed by
    :func:`collapse_zero_condition_kv`)."""
    return k.shape[1] == 1


def check_one_key_kv(k: Tensor, v: Tensor, rows: int, num_heads: int, channels: int, device: torch.device) -> None:
    """Refuse a one-key K/V pair that :func:`attention` would refuse for these queries: ``rows`` query batch elements
    (k's batch must be 1 or that), ``num_heads`` heads of ``channels // num_heads``, on ``device``."""
    head_dim = channels // num_heads
    if (k.ndim != 4 or v.ndim != 4 or k.shape[0] not in (1, rows) or v.shape[:3] != k.shape[:3]
            or tuple(k.shape[2:]) != (num_heads, head_dim) or v.shape[3] != head_dim
            or k.device != device or v.device != device):
        raise ValueError(f"one-key K/V do not match {rows} query rows of {num_heads} heads x {head_dim} on {device}: "
                         f"k {tuple(k.shape)} {k.device}, v {tuple(v.shape)} {v.device} (B, 1, H, D)")


def projected_cross_attention(x: Tensor, kv: tuple[Tensor, ...], to_q: nn.Module, to_out: nn.Module,
                              num_heads: int) -> Tensor:
    """``to_out(cross_attention(to_q(x), kv))`` for dense queries x (B, L, C) and cached K/V in either form of
    :func:`cross_attention`; heads are the channels split into ``num_heads`` groups.

    Under :func:`use_one_key_projection`, batch elements whose K/V hold one key skip ``to_q`` and the attention: their
    output is :func:`one_key_output` broadcast to all L queries. Same math (attention over one key returns its value
    for every query, and ``to_out`` maps equal rows to equal rows), other rounding (a one-row GEMM instead of rows of a
    larger one); it saves two L x C x C GEMMs per such element and call, which also lowers the FLOPs executed."""
    b, l, c = x.shape
    if c % num_heads:
        raise ValueError(f"channels {c} not divisible by num_heads {num_heads}")

    def attended(xs: Tensor, pair: tuple[Tensor, ...]) -> Tensor:
        q = to_q(xs).reshape(xs.shape[0], l, num_heads, c // num_heads)
        return to_out(cross_attention(q, pair).reshape(xs.shape[0], l, c))

    if not _one_key_projection:
        return attended(x, kv)
    if len(kv) == 2:
        if not is_one_key(kv[0]):
            return attended(x, kv)
        check_one_key_kv(kv[0], kv[1], b, num_heads, c, x.device)
        return one_key_output(kv[1], to_out).expand(b, l, c)
    if len(kv) != 2 * b:
        raise ValueError(f"{len(kv) // 2} per-element K/V pairs for a batch of {b} queries")
    parts = []
    for i in range(b):
        k, v = kv[2 * i], kv[2 * i + 1]
        if is_one_key(k):
            check_one_key_kv(k, v, 1, num_heads, c, x.device)
            parts.append(one_key_output(v, to_out).expand(1, l, c))
        else:
            parts.append(attended(x[i:i + 1], (k, v)))
    return torch.cat(parts, dim=0)


def collapse_zero_condition_kv(kv: tuple[Tensor, Tensor], zero_rows: list[bool]) -> tuple[Tensor, ...]:
    """Cached (k, v) of a batch whose rows ``zero_rows`` come from an all-zero condition (the
    unconditional CFG branch): those rows keep ONE key and value instead of L.

    Why it is exact: ``to_kv`` of a zero token is its bias, so all L keys of such a row are equal and all
    L values are equal; softmax over equal scores is uniform and the output is that one value, which is
    also the output of attention over a single key. (On the GPU's fp32-accumulating kernels both give the
    value exactly; a CPU math path may differ by an ulp.) Returns ``kv`` unchanged when no row is zero,
    ``(k[:, :1], v[:, :1])`` for a single zero row, else the per-element form of :func:`cross_attention`.
    """
    k, v = kv
    if len(zero_rows) != k.shape[0]:
        raise ValueError(f"zero_rows has {len(zero_rows)} entries, K/V batch is {k.shape[0]}")
    if not any(zero_rows):
        return kv
    if all(zero_rows):
        return k[:, :1], v[:, :1]
    out: list[Tensor] = []
    for i, zero in enumerate(zero_rows):
        out += [k[i:i + 1, :1], v[i:i + 1, :1]] if zero else [k[i:i + 1], v[i:i + 1]]
    return tuple(out)


def map_kv_pairs(fn, tree):
    """Apply ``fn`` to every (k, v) pair of a cached-K/V structure (lists and dicts of pairs: the SLaT
    flow's per-block list, the SS flow's per-block dict of streams)."""
    if isinstance(tree, tuple) and all(isinstance(t, Tensor) for t in tree):
        if len(tree) != 2:
            raise ValueError(f"expected a (k, v) pair, got {len(tree)} tensors (already collapsed?)")
        return fn(tree)
    if isinstance(tree, list):
        return [map_kv_pairs(fn, t) for t in tree]
    if isinstance(tree, dict):
        return {k: map_kv_pairs(fn, t) for k, t in tree.items()}
    raise TypeError(f"not a cached K/V structure: {type(tree).__name__}")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x * (1 + scale) + shift (shift/scale broadcast over tokens)."""
    return x * (1 + scale) + shift


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m
