"""A ``flash_attn`` stand-in built on PyTorch SDPA, for running the OFFICIAL SAM 3D code where the
flash-attention package does not exist (the lent GPU machine has no registry and no flash_attn wheel).

Why: with ``SPARSE_ATTN_BACKEND=sdpa`` the official sparse attention calls its ``masked_sdpa``, which
builds a dense ``(sum N_q) x (sum N_kv)`` additive mask with one slice assignment per segment. For the
mesh decoder's windowed attention that is one kernel per window and an N x N mask (N ~ 10^5 voxels:
tens of GB), i.e. a slowdown the official pipeline never has, since on an H100 it selects flash_attn.
The functions below take flash_attn's variable-length calling convention (packed tokens + cumulative
sequence lengths) and compute exactly softmax(q k^T / sqrt(C)) v per segment, with segments of equal
(q, kv) lengths batched into one ``scaled_dot_product_attention`` call (which dispatches to PyTorch's
own flash / memory-efficient kernels on CUDA). This is the "SDPA grouped per window" path of
``performance-anchors.md``: the official modules stay unmodified; only the package they import is
replaced. :func:`install` registers it as ``flash_attn`` in ``sys.modules``; then set
``SPARSE_ATTN_BACKEND=flash_attn`` before the official ``sparse`` package is imported.

Differences from flash_attn: with several segments, their lengths are read back to the host (one
sync per call; the official callers build ``cu_seqlens`` from host lists with a blocking copy anyway);
a single segment is taken as the whole tensor without a read-back (checked against the host-side
``max_seqlen`` the callers pass); dropout, causal masks, softmax_scale
other than the default and windowed (local) attention raise instead of being ignored.
"""
from __future__ import annotations

import sys
import types
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

__version__ = "0.0.0+fs3d-sdpa-shim"


def _check_kwargs(kwargs: dict) -> None:
    dropout = kwargs.pop("dropout_p", 0.0)
    causal = kwargs.pop("causal", False)
    scale = kwargs.pop("softmax_scale", None)
    window = kwargs.pop("window_size", (-1, -1))
    kwargs.pop("deterministic", None)
    kwargs.pop("return_attn_probs", None)
    if dropout:
        raise NotImplementedError(f"sdpa shim: dropout_p={dropout} is not supported (inference only)")
    if causal:
        raise NotImplementedError("sdpa shim: causal attention is not supported (SAM 3D does not use it)")
    if scale is not None:
        raise NotImplementedError(f"sdpa shim: softmax_scale={scale} is not supported (default 1/sqrt(C) only)")
    if tuple(window) != (-1, -1):
        raise NotImplementedError(f"sdpa shim: window_size={window} is not supported")
    if kwargs:
        raise TypeError(f"sdpa shim: unexpected arguments {sorted(kwargs)}")


def _sdpa_bnhc(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """[B, L, H, C] layout in and out (flash_attn's)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _lengths(cu: Tensor) -> tuple[list[int], list[int]]:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of >= 2 offsets, got shape {tuple(cu.shape)}")
    offs = cu.tolist()
    lens = [b - a for a, b in zip(offs[:-1], offs[1:])]
    if any(n < 0 for n in lens):
        raise ValueError("cu_seqlens must be non-decreasing")
    return offs[:-1], lens


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None) -> Tensor:
    """Block-diagonal attention over packed segments: q [Tq, H, C], k/v [Tk, H, C] -> [Tq, H, Cv].

    One segment each (a single object, e.g. the SLaT flow at batch 1) needs no host read-back: the
    segment must then be the whole tensor, which the callers' host-side ``max_seqlen`` confirms.
    Otherwise the lengths are read back once (a host sync) and checked against the tensors."""
    if cu_seqlens_q.shape == (2,) and cu_seqlens_k.shape == (2,) and max_seqlen_q is not None \
            and max_seqlen_k is not None:
        if (max_seqlen_q, max_seqlen_k) != (q.shape[0], k.shape[0]):
            raise ValueError(f"one segment of max length {max_seqlen_q} / {max_seqlen_k} but the tensors hold "
                             f"{q.shape[0]} / {k.shape[0]} tokens")
        return _sdpa_bnhc(q[None], k[None], v[None])[0]
    starts_q, lens_q = _lengths(cu_seqlens_q)
    starts_k, lens_k = _lengths(cu_seqlens_k)
    if len(lens_q) != len(lens_k):
        raise ValueError(f"{len(lens_q)} query segments but {len(lens_k)} key segments")
    if sum(lens_q) != q.shape[0] or sum(lens_k) != k.shape[0]:
        raise ValueError(f"segment lengths sum to {sum(lens_q)} / {sum(lens_k)} tokens, tensors hold "
                         f"{q.shape[0]} / {k.shape[0]}")
    if len(lens_q) == 1:
        return _sdpa_bnhc(q[None], k[None], v[None])[0]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (a, b) in enumerate(zip(lens_q, lens_k)):
        if a:
            if not b:
                raise ValueError(f"segment {i} has {a} queries but no keys")
            groups[(a, b)].append(i)
    dev = q.device
    for (lq, lk), idx in groups.items():
        sq = torch.tensor([starts_q[i] for i in idx], device=dev)
        sk = torch.tensor([starts_k[i] for i in idx], device=dev)
        iq = (sq[:, None] + torch.arange(lq, device=dev)).reshape(-1)
        ik = (sk[:, None] + torch.arange(lk, device=dev)).reshape(-1)
        g = len(idx)
        o = _sdpa_bnhc(q[iq].view(g, lq, *q.shape[1:]), k[ik].view(g, lk, *k.shape[1:]),
                       v[ik].view(g, lk, *v.shape[1:]))
        out[iq] = o.reshape(g * lq, *o.shape[2:])
    return out


# ---- flash_attn's public functions (the ones the official sparse / dense attention calls) ----


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, **kwargs) -> Tensor:
    _check_kwargs(kwargs)
    q, k, v = qkv.unbind(dim=1)
    return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, **kwargs) -> Tensor:
    _check_kwargs(kwargs)
    k, v = kv.unbind(dim=1)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, **kwargs) -> Tensor:
    _check_kwargs(kwargs)
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def flash_attn_qkvpacked_func(qkv: Tensor, **kwargs) -> Tensor:
    _check_kwargs(kwargs)
    q, k, v = qkv.unbind(dim=2)
    return _sdpa_bnhc(q, k, v)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, **kwargs) -> Tensor:
    _check_kwargs(kwargs)
    k, v = kv.unbind(dim=2)
    return _sdpa_bnhc(q, k, v)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    _check_kwargs(kwargs)
    return _sdpa_bnhc(q, k, v)


_EXPORTS = ("flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_func",
            "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_func")


def install() -> types.ModuleType:
    """Register this shim as ``flash_attn`` (refuses to shadow a real flash_attn already imported).

    A ``flash_attn`` package that exports none of these functions (the flash-attention repository's
    ``flash_attn/cute`` = FlashAttention-4 under an empty ``__init__``, as the FA4 benchmarks carry it) gets
    them added instead, so the official code's FA2 calls and FA4's ``flash_attn.cute`` both resolve."""
    current = sys.modules.get("flash_attn")
    if current is not None:
        if getattr(current, "__version__", "") == __version__:
            return current
        if hasattr(current, "__path__") and not any(hasattr(current, name) for name in _EXPORTS):
            for name in _EXPORTS:
                setattr(current, name, globals()[name])
            current.__version__ = __version__
            return current
        raise RuntimeError(f"a real flash_attn ({getattr(current, '__version__', '?')}) is already imported")
    mod = types.ModuleType("flash_attn")
    mod.__version__ = __version__
    mod.__doc__ = __doc__
    for name in _EXPORTS:
        setattr(mod, name, globals()[name])
    sys.modules["flash_attn"] = mod
    return mod


__all__ = [*_EXPORTS, "install", "varlen_attention"]
