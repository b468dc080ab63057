"""The SLaT flow's cached condition K/V, made with few host operations (``RunOptions.lean_cond_kv``).

A new object's first SLaT step runs while the GPU waits for the host (session 28's trace of a 14k call:
``benchmarks/results/slat_host_profile_h100/session28/``), so every host operation there lengthens the call. The default
path (``SLaTFlowModel.precompute_cond_kv``, then ``RunOptions.prepare_cond_kv``) computes each block's K/V over the
batch, slices every row (one key for the all-zero rows), walks the result with ``pytree`` and copies each of the
per-element tensors. This module makes the same tensors directly: per block one ``to_kv`` as before, one copy each of
the conditional rows' keys and values, and the all-zero rows' one key and value taken from ``to_kv``'s bias (``to_kv``
of a zero token is its bias, exactly: the GEMM adds nothing to it), made once and kept across objects.

``RunOptions.split_cond_kv`` goes one step further (:func:`project_cond_rows`, :func:`split_slat_cond_kv`): each
conditional row's key and value come from two GEMMs on ``to_kv``'s weight halves, made once per call and shared by
every K/V set of the call (the CFG pair's and the batch-1 passes'), so that no copy runs and no GEMM projects the zero
rows or the same row twice. Per 14k call on the named path that is 96 strided copies and 24 GEMMs fewer (session 30's
kernel table: ``benchmarks/results/base_vs_official_h100/session30/``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: kept zero-row K/V entries per stage: one per (dtype, device, weights); more means weights or settings changed
_ZERO_KV_ENTRIES = 4


def _zero_row_kv(store: dict, blocks: nn.ModuleList, dtype, device) -> list[tuple[Tensor, Tensor]]:
    """Per block, the (1, 1, H, D) key and value of an all-zero condition row in ``dtype``: ``to_kv``'s bias halves
    (zeros without a bias), independent contiguous tensors, kept in ``store`` keyed by ``dtype``, ``device`` and each
    ``to_kv`` parameter's identity and version (a weight changed in place, replaced or moved is picked up; a change
    through ``.data`` is not). Each entry keeps its parameters alive, so that their ids cannot be reused."""
    params = [p for blk in blocks for p in blk.cross_attn.to_kv.parameters()]
    key = (dtype, str(device), tuple((id(p), p._version, p.dtype, str(p.device)) for p in params))
    entry = store.get(key)
    if entry is None:
        if len(store) >= _ZERO_KV_ENTRIES:
            store.clear()
        kv = []
        for blk in blocks:
            cross = blk.cross_attn
            heads, width = cross.num_heads, cross.channels
            bias = cross.to_kv.bias
            row = (bias.detach().to(device=device, dtype=dtype) if bias is not None
                   else cross.to_kv.weight.new_zeros(2 * width, dtype=dtype, device=device))
            kv.append((row[:width].reshape(1, 1, heads, -1).clone(), row[width:].reshape(1, 1, heads, -1).clone()))
        entry = store[key] = (kv, params)
    return entry[0]


def _copy(t: Tensor) -> Tensor:
    """A contiguous copy, always (``contiguous()`` returns a view as is where its strides already count as contiguous,
    e.g. a single condition token, and k and v would then share storage)."""
    return t.clone(memory_format=torch.contiguous_format)


def lean_slat_cond_kv(store: dict, blocks: nn.ModuleList, cond: Tensor, zero_rows: list[bool],
                      mark_static: bool = False) -> list[tuple[Tensor, ...]]:
    """The compiled SLaT torso's cached condition K/V for ``cond`` ((B, L, Cc), already in the torso's dtype), rows
    ``zero_rows`` all-zero: the same tensors ``RunOptions.prepare_cond_kv(flow.precompute_cond_kv(cond), zero_rows,
    compiled=True)`` returns under ``collapse_zero_cond`` (per block ``(k, v)`` for a batch without zero rows,
    ``(k[:, :1], v[:, :1])`` when every row is zero, else the per-element form ``(k0, v0, k1, v1, ...)``), each an
    independent contiguous tensor. The zero rows' one-key tensors come from ``store`` (:func:`_zero_row_kv`) and are
    shared across calls, once per call (a batch with several zero rows gets its own copies for the later ones: a
    nested compile region refuses inputs that alias). ``mark_static``: mark each tensor a static address (compile modes
    that capture CUDA graphs, as ``RunOptions.compiled_region_inputs``)."""
    b, length, _ = cond.shape
    if len(zero_rows) != b:
        raise ValueError(f"zero_rows has {len(zero_rows)} entries, the condition batch is {b}")
    out: list[tuple[Tensor, ...]] = []
    zero_kv = None
    for i, blk in enumerate(blocks):
        cross = blk.cross_attn
        kv = cross.to_kv(cond).view(b, length, 2, cross.num_heads, -1)
        if not any(zero_rows):
            out.append((_copy(kv[:, :, 0]), _copy(kv[:, :, 1])))
            continue
        if zero_kv is None:
            zero_kv = _zero_row_kv(store, blocks, kv.dtype, kv.device)
        rows = [] if all(zero_rows) else [(_copy(kv[r:r + 1, :, 0]), _copy(kv[r:r + 1, :, 1]))
                                          for r, zero in enumerate(zero_rows) if not zero]
        out.append(_with_zero_rows(rows, zero_kv[i], zero_rows))
    return _marked(out) if mark_static else out


def _with_zero_rows(rows: list[tuple[Tensor, Tensor]], zero_kv: tuple[Tensor, Tensor],
                    zero_rows: list[bool]) -> tuple[Tensor, ...]:
    """One block's K/V set for a batch with zero rows: ``(k[:, :1], v[:, :1])`` of the kept one-key tensors when every
    row is zero, else the per-element form, the non-zero rows taking ``rows`` in order and the zero rows the kept
    tensors (the first zero row shares them, later ones get copies: a nested compile region refuses aliasing inputs)."""
    kz, vz = zero_kv
    if all(zero_rows):
        b = len(zero_rows)
        return kz.expand(b, 1, *kz.shape[2:]).clone(), vz.expand(b, 1, *vz.shape[2:]).clone()
    parts: list[Tensor] = []
    first_zero, j = True, 0
    for zero in zero_rows:
        if zero:
            parts += [kz, vz] if first_zero else [kz.clone(), vz.clone()]
            first_zero = False
        else:
            parts += list(rows[j])
            j += 1
    return tuple(parts)


def _marked(out: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    """``out`` with each tensor marked a static address (compile modes that capture CUDA graphs)."""
    from torch._dynamo import mark_static_address
    for entry in out:
        for t in entry:
            mark_static_address(t)
    return out


def project_cond_rows(blocks: nn.ModuleList, cond: Tensor) -> list[list[tuple[Tensor, Tensor]]]:
    """Per block, per row of ``cond`` ((B, L, Cc), already in the torso's dtype): that row's cross-attention key and
    value, (1, L, H, D) each, as two ``F.linear`` on ``to_kv``'s weight and bias halves. Each is its own contiguous
    tensor, so no copy separates k from v (the nested compile region refuses inputs that alias). Row ``r`` of
    ``to_kv(cond)`` holds the same dot products; whether the GEMM library rounds them the same for the halves as for
    the whole weight is its choice of kernel: bit-identical on the CPU (tested), and the same latents bit for bit at
    full size on an H100 (``benchmarks/results/base_vs_official_h100/session30/``)."""
    if cond.ndim != 3:
        raise ValueError(f"cond must be (B, L, C), got {tuple(cond.shape)}")
    out: list[list[tuple[Tensor, Tensor]]] = []
    for blk in blocks:
        cross = blk.cross_attn
        width, heads = cross.channels, cross.num_heads
        w, bias = cross.to_kv.weight, cross.to_kv.bias
        rows = []
        for r in range(cond.shape[0]):
            row = cond[r:r + 1]
            k = F.linear(row, w[:width], None if bias is None else bias[:width])
            v = F.linear(row, w[width:], None if bias is None else bias[width:])
            rows.append((k.view(1, row.shape[1], heads, -1), v.view(1, row.shape[1], heads, -1)))
        out.append(rows)
    return out


def split_slat_cond_kv(store: dict, blocks: nn.ModuleList, rows_kv: list[list[tuple[Tensor, Tensor]]],
                       zero_rows: list[bool], mark_static: bool = False) -> list[tuple[Tensor, ...]]:
    """The same K/V sets as :func:`lean_slat_cond_kv`, assembled from ``rows_kv`` (:func:`project_cond_rows` of the
    call's condition): the batch's non-zero rows are the condition's rows in order, the zero rows take the kept
    one-key tensors (a set of zero rows only does not read ``rows_kv``). The row tensors are shared by every set of
    the call (each set's own tensors stay distinct); a set without zero rows and more than one row stacks them (one
    copy), as ``to_kv`` over the batch would give."""
    if not zero_rows:
        raise ValueError("zero_rows names no batch row: a K/V set needs at least one")
    n_cond = sum(not z for z in zero_rows)
    if len(rows_kv) != len(blocks):
        raise ValueError(f"rows_kv has {len(rows_kv)} blocks, the flow has {len(blocks)}")
    if n_cond and any(len(rows) != n_cond for rows in rows_kv):
        raise ValueError(f"rows_kv holds {len(rows_kv[0])} condition rows per block, zero_rows names {n_cond} "
                         f"non-zero rows")
    w = blocks[0].cross_attn.to_kv.weight
    zero_kv = _zero_row_kv(store, blocks, w.dtype, w.device) if any(zero_rows) else None
    out: list[tuple[Tensor, ...]] = []
    for i, rows in enumerate(rows_kv):
        if not any(zero_rows):
            out.append(rows[0] if n_cond == 1 else (torch.cat([k for k, _ in rows]), torch.cat([v for _, v in rows])))
            continue
        out.append(_with_zero_rows(rows, zero_kv[i], zero_rows))
    return _marked(out) if mark_static else out
