"""Closed-form FLOP counts of the building blocks (convention: 1 multiply-add = 2 FLOPs).

Only multiply-accumulates of matrix products, convolutions and attention are counted (the same
ops ``torch.utils.flop_counter.FlopCounterMode`` counts); bias additions, norms, activations,
softmax and element-wise ops are not. These functions are independent of the model code (the
neighbour count is computed here from the coordinates, not taken from ``fs3d_accel``), so tests can
use them as ground truth.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor


def linear_flops(rows: int, c_in: int, c_out: int) -> int:
    """``rows`` x (c_in -> c_out) linear layer, bias excluded."""
    return 2 * rows * c_in * c_out


def sdpa_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, v_dim: int | None = None) -> int:
    """softmax(Q K^T) V on (batch, heads, q_len, head_dim) queries: QK^T plus AV."""
    v_dim = head_dim if v_dim is None else v_dim
    return 2 * batch * heads * q_len * k_len * (head_dim + v_dim)


def varlen_attention_flops(heads: int, q_lens: Sequence[int], k_lens: Sequence[int] | None, head_dim: int,
                           v_dim: int | None = None) -> int:
    """Attention of each query segment over its own key segment (what flash-attn varlen computes):
    ``2 * heads * sum_i(lq_i * lk_i) * (head_dim + v_dim)``; padding is not counted."""
    k_lens = q_lens if k_lens is None else k_lens
    if len(q_lens) != len(k_lens):
        raise ValueError(f"{len(q_lens)} query segments vs {len(k_lens)} key segments")
    v_dim = head_dim if v_dim is None else v_dim
    return 2 * heads * sum(int(a) * int(b) for a, b in zip(q_lens, k_lens)) * (head_dim + v_dim)


def padded_attention_flops(heads: int, q_lens: Sequence[int], head_dim: int, k_lens: Sequence[int] | None = None,
                           v_dim: int | None = None) -> int:
    """What a padded batch of segments costs in SDPA: every segment padded to the longest."""
    k_lens = q_lens if k_lens is None else k_lens
    return sdpa_flops(len(q_lens), heads, max(q_lens), max(k_lens), head_dim, v_dim)


def submanifold_pairs(coords: Tensor, kernel_size: int) -> int:
    """Number of (output site, input site) pairs of a submanifold convolution: for every active
    site, the active sites in its k^3 neighbourhood (itself included). Computed with a Python set
    (independent of the model's hashing)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    pts = {tuple(int(v) for v in row) for row in coords.tolist()}
    if len(pts) != coords.shape[0]:
        raise ValueError("duplicate coordinates")
    p = kernel_size // 2
    rng = range(-p, p + 1)
    count = 0
    for b, x, y, z in pts:
        for dx, dy, dz in itertools.product(rng, rng, rng):
            if (b, x + dx, y + dy, z + dz) in pts:
                count += 1
    return count


def sparse_conv_flops(pairs: int, c_in: int, c_out: int) -> int:
    """Submanifold sparse convolution: one (c_in -> c_out) product per neighbour pair, bias excluded."""
    return 2 * pairs * c_in * c_out


def window_lengths(coords: Tensor, window: int, shift: int = 0) -> list[int]:
    """Token count of every non-empty swin window ``(xyz + shift) // window`` (per batch element)."""
    c = coords.long()
    w = torch.div(c[:, 1:] + shift, window, rounding_mode="floor")
    keys = torch.cat([c[:, :1], w], 1)
    _, counts = torch.unique(keys, dim=0, return_counts=True)
    return [int(n) for n in counts.tolist()]


def transformer_block_flops(tokens: Sequence[int], channels: int, heads: int, mlp_hidden: int,
                            attn_segments: Sequence[int] | None = None, context_len: int = 0,
                            context_dim: int | None = None, adaln_rows: int = 0) -> int:
    """One transformer block on ``sum(tokens)`` tokens split into batch elements ``tokens``.

    Self-attention (qkv + core + out projection) over ``attn_segments`` (defaults to ``tokens``:
    full attention per batch element), optional cross-attention to ``context_len`` tokens of
    ``context_dim`` per batch element (q, kv, core, out), MLP (two linears), and an adaLN
    modulation linear (C -> 6C) on ``adaln_rows`` rows (one per batch element when used).
    """
    n = sum(int(t) for t in tokens)
    d = channels // heads
    segs = list(tokens) if attn_segments is None else list(attn_segments)
    if sum(segs) != n:
        raise ValueError(f"attention segments cover {sum(segs)} tokens, the block has {n}")
    f = linear_flops(n, channels, 3 * channels) + varlen_attention_flops(heads, segs, None, d) \
        + linear_flops(n, channels, channels)
    if context_len:
        cdim = context_dim or channels
        f += linear_flops(n, channels, channels)                                   # to_q
        f += linear_flops(len(tokens) * context_len, cdim, 2 * channels)           # to_kv
        f += varlen_attention_flops(heads, tokens, [context_len] * len(tokens), d)  # core
        f += linear_flops(n, channels, channels)                                   # to_out
    f += linear_flops(n, channels, mlp_hidden) + linear_flops(n, mlp_hidden, channels)
    f += linear_flops(adaln_rows, channels, 6 * channels)
    return f


__all__ = ["linear_flops", "padded_attention_flops", "sdpa_flops", "sparse_conv_flops", "submanifold_pairs",
           "transformer_block_flops", "varlen_attention_flops", "window_lengths"]
