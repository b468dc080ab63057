"""Implicit-GEMM submanifold convolution in Triton (``SparseConv3d.impl = "implicit"``).

The "gather" algorithm of :class:`~fs3d_accel.model.sparse.SparseConv3d` writes the (N, k^3 * C_in) block of
neighbour features to memory and reads it back in one cuBLAS matmul. Here each program gathers its rows'
neighbour features straight into the matmul's operand tiles (through the same neighbour table), so that block
never exists: the same products, summed in fp32 in a different order, with k^3 * C_in * C_out multiply-adds
per voxel (absent neighbours are zero rows, as in "gather"). On the H100 the gathers were 59% of the mesh
decoder's and 13% of the SLaT sampler's GPU time (``benchmarks/results/base_vs_official_h100/session7``).

Written here rather than taken from spconv / spconv-triton: those need their own sparse-tensor types and rule
books and autotune for minutes on first use (their 1x1x1 path also applies a raw view of the weight, see
``fs3d_accel.checkpoint``); this kernel reads our neighbour table as it is.

A tiled variant (:func:`implicit_gemm_subm_conv_tiled`, ``SparseConv3d.impl`` "implicit-skip" and relatives) runs
the same products over rows sorted by which neighbours they have, each tile of rows skipping the kernel offsets
none of its rows has (:func:`neighbour_tiles`). It adds the same products in the same offset order, so it agrees with
this kernel up to the summation inside each autotuned tile shape; on the H100 (session 18) its outputs were
bit-identical to this kernel's, the SLaT pass's convs went from 3.73 to 3.48 ms and the mesh decoder's stayed at 7.4 ms: the skipped work
(24-40% of (tile, offset) pairs at 64^3) shows only partly in the time, so "auto" keeps this kernel.

CUDA only (NVIDIA, compute capability 8.0 or newer). No backward pass: ``SparseConv3d`` uses it for inference only.
Tile sizes are autotuned per channel pair on first use (1-10 s on the H100) and the choice is cached on disk with
Triton's kernels. The tests run the kernel on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

#: tile shapes tried on the first call per (C_in, C_out, dtype) on CUDA (``triton.autotune``). Session 23 added three
#: BLOCK_K = 128 shapes to both lists (one channel block per offset at C_in = 128) and timed them beside these in
#: ``benchmarks/results/sparse_conv_kernels_h100/session23``: no pass got faster beyond the sweep's spread, so they are
#: not listed (each shape adds tuning time at first use). That sweep timed single calls from the host, which
#: overstates these short kernels; the sweep now times graph replays
_CUDA_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (128, 256, 64, 8, 3),
]
#: the one tile shape used by the interpreter (no autotuning there)
_INTERPRETER_TILE = (32, 32, 16)
#: row-tile heights the tiled kernel's lists are built for (:func:`neighbour_tiles`); its autotuned BLOCK_M is one
TILE_ROWS = (64, 128)
#: tile shapes tried by the tiled kernel (BLOCK_M one of ``TILE_ROWS``)
_CUDA_TILED_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 32, 4, 5),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 3),
]
#: the tiled kernel's tile shape in the interpreter (BLOCK_M one of ``TILE_ROWS``)
_INTERPRETER_TILED_TILE = (64, 32, 16)


#: input dtypes "auto" hands to the kernel: the measured ones (bf16 on the H100; fp16 takes the same tensor-core
#: path). fp32 runs IEEE dot products on CUDA cores and was never timed, so "auto" keeps cuBLAS there.
AUTO_DTYPES = (torch.bfloat16, torch.float16)


def triton_unavailable(device: torch.device | str) -> str | None:
    """Why the implicit-GEMM conv cannot run on ``device`` here, or None when it can."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "the implicit-GEMM sparse conv needs triton (pip install triton; CUDA builds of torch ship it)"
    if device.type != "cuda":
        if interpreting():
            return None
        return (f"the implicit-GEMM sparse conv is a Triton kernel for CUDA devices, got {device} "
                f"(TRITON_INTERPRET=1 runs it on the CPU for tests, very slowly)")
    if torch.version.hip is not None:
        return "the implicit-GEMM sparse conv is written and measured for NVIDIA GPUs, not ROCm"
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
        return (f"the implicit-GEMM sparse conv needs compute capability 8.0 or newer (bf16 tensor cores), "
                f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    return None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _build():
    """Define the kernel (imports triton on first use only: CPU installs of this package do not need it)."""
    global offset_block  # Triton looks a jit function's callees up in the module's globals, not in this closure
    import triton
    import triton.language as tl

    # n_rows not specialised (Triton would compile separate variants for a count of 1, for counts divisible by 16 and
    # for the rest): one binary serves every object size, so a new size never compiles inside a CUDA-graph recording
    @triton.jit(do_not_specialize=["n_rows"])
    def subm_conv_kernel(feats, table, weight, bias, out, n_rows,
                         C_IN: tl.constexpr, C_OUT: tl.constexpr, K3: tl.constexpr, HAS_BIAS: tl.constexpr,
                         DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[r, :] = bias + sum_k sum_c feats[table[r, k], c] * weight[:, k * C_IN + c]
        # (table[r, k] == n_rows: no neighbour, a zero row)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        col_ok = cols < C_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(K3):
            nbr = tl.load(table + rows.to(tl.int64) * K3 + k, mask=row_ok, other=n_rows).to(tl.int64)
            present = nbr < n_rows
            for c0 in range(0, C_IN, BLOCK_K):
                ch = c0 + tl.arange(0, BLOCK_K)
                ch_ok = ch < C_IN
                a = tl.load(feats + nbr[:, None] * C_IN + ch[None, :],
                            mask=present[:, None] & ch_ok[None, :], other=0.0)
                # weight is (C_out, K3 * C_in) row-major: the (BLOCK_K, BLOCK_N) tile is read transposed
                b = tl.load(weight + cols[None, :].to(tl.int64) * (K3 * C_IN) + k * C_IN + ch[:, None],
                            mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rows[:, None].to(tl.int64) * C_OUT + cols[None, :], acc.to(out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    # The tiled variant: one program per tile of BLOCK_M rows in the order of ``perm`` (rows sorted by which neighbours
    # they have) and BLOCK_N output channels. Each tile runs only the offsets its list names (those at which some row
    # of the tile has a neighbour), in ascending order: a skipped offset would only add exact zeros. FLAT_LOOP: one
    # loop over (listed offset, channel block), so that Triton's software pipelining overlaps the next offset's gathers
    # with the current MMA (the loop nest pipelines only its inner loop of C_IN / BLOCK_K steps).
    @triton.jit
    def offset_block(acc, feats, weight, nbr, present, k, c0, cols, col_ok, C_IN: tl.constexpr, K3: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
        # acc += feats[nbr, c0:c0+BLOCK_K] @ weight[cols, k*C_IN + c0 : ...]^T, absent neighbours as zero rows (the
        # tiled kernel's two loops share it; the original kernel keeps its own body, as measured)
        ch = c0 + tl.arange(0, BLOCK_K)
        ch_ok = ch < C_IN
        a = tl.load(feats + nbr.to(tl.int64)[:, None] * C_IN + ch[None, :],
                    mask=present[:, None] & ch_ok[None, :], other=0.0)
        b = tl.load(weight + cols[None, :].to(tl.int64) * (K3 * C_IN) + k * C_IN + ch[:, None],
                    mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit(do_not_specialize=["n_rows", "n_pad"])
    def subm_conv_tiled_kernel(feats, table_t, perm, offs_a, counts_a, offs_b, counts_b, weight, bias, out,
                               n_rows, n_pad,
                               C_IN: tl.constexpr, C_OUT: tl.constexpr, K3: tl.constexpr, HAS_BIAS: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, TILE_A: tl.constexpr, FLAT_LOOP: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # table_t: (K3, n_pad) int32, column j = the neighbour rows of the row at sorted position j (n_rows: none)
        # perm: (n_pad,) int32, the row at sorted position j (n_rows: padding); offs_*: (tiles, K3) int32 offsets,
        # the first counts_*[tile] of them the tile's; lists "a" are for BLOCK_M == TILE_A, "b" for the other height
        tile = tl.program_id(0)
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(perm + slots)
        row_ok = rows < n_rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        if BLOCK_M == TILE_A:
            offs = offs_a
            n_off = tl.load(counts_a + tile)
        else:
            offs = offs_b
            n_off = tl.load(counts_b + tile)
        NUM_CB: tl.constexpr = (C_IN + BLOCK_K - 1) // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FLAT_LOOP:
            for i in range(n_off * NUM_CB):
                k = tl.load(offs + tile * K3 + i // NUM_CB)
                nbr = tl.load(table_t + k.to(tl.int64) * n_pad + slots)
                acc = offset_block(acc, feats, weight, nbr, nbr < n_rows, k, (i % NUM_CB) * BLOCK_K, cols, col_ok,
                                   C_IN, K3, DOT_PRECISION, BLOCK_K)
        else:  # the original kernel's loop nest, over the listed offsets only
            for j in range(n_off):
                k = tl.load(offs + tile * K3 + j)
                nbr = tl.load(table_t + k.to(tl.int64) * n_pad + slots)
                for c0 in range(0, C_IN, BLOCK_K):
                    acc = offset_block(acc, feats, weight, nbr, nbr < n_rows, k, c0, cols, col_ok,
                                       C_IN, K3, DOT_PRECISION, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rows[:, None].to(tl.int64) * C_OUT + cols[None, :], acc.to(out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    tuned_tiled = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for m, n, k, w, s in _CUDA_TILED_CONFIGS],
        key=["C_IN", "C_OUT", "K3", "DOT_PRECISION", "FLAT_LOOP"],
        cache_results=True,
    )(subm_conv_tiled_kernel)

    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for m, n, k, w, s in _CUDA_CONFIGS],
        # the argument dtypes are part of the key anyway; the row count is not (tiles tuned at the first call's N)
        key=["C_IN", "C_OUT", "K3", "DOT_PRECISION"],
        # keep the choice on disk (Triton's cache dir): a new process skips the ~1-10 s of tuning per channel pair
        cache_results=True,
    )(subm_conv_kernel)
    return triton, subm_conv_kernel, tuned, subm_conv_tiled_kernel, tuned_tiled


def tuned_choices() -> dict[str, dict[str, str]]:
    """The tile shapes the autotuners chose in this process, per kernel ("implicit", "tiled") and tuning key
    (C_IN, C_OUT, K3, ... as Triton keys them): what a sweep records beside its timings. Empty before the first
    CUDA call."""
    built = _KERNELS.get(False)
    if built is None:
        return {}
    return {name: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
            for name, tuner in (("implicit", built[2]), ("tiled", built[4]))}


#: built kernels, per interpreter mode (the interpreter is chosen when the kernel is defined)
_KERNELS: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """The built kernels for the current interpreter mode (built on first use)."""
    if interpreting() not in _KERNELS:
        _KERNELS[interpreting()] = _build()
    return _KERNELS[interpreting()]


def _check_features(feats: Tensor) -> int:
    """Refuse a device the kernels cannot run on and features that are not (N, C_in) half or fp32; returns N."""
    why = triton_unavailable(feats.device)
    if why is not None:
        raise RuntimeError(why)
    if feats.dim() != 2 or feats.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"features must be (N, C_in) fp16 / bf16 / fp32, got {tuple(feats.shape)} {feats.dtype}")
    return feats.shape[0]


def _check_weight(feats: Tensor, neighbours: Tensor, what: str, k3: int, weight: Tensor, bias: Tensor | None) -> int:
    """Refuse tensors on several devices, a weight that is not (C_out, K3 * C_in) and mixed dtypes; returns C_out."""
    devices = {t.device for t in (feats, neighbours, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"features, {what}, weight and bias must be on one device, got {sorted(map(str, devices))}")
    c_in, c_out = feats.shape[1], weight.shape[0]
    if weight.shape != (c_out, k3 * c_in):
        raise ValueError(f"weight must be (C_out, K3 * C_in) = (C_out, {k3 * c_in}), got {tuple(weight.shape)}")
    if weight.dtype != feats.dtype or (bias is not None and bias.dtype != feats.dtype):
        raise ValueError(f"features, weight and bias must share one dtype, got {feats.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    return c_out


def implicit_gemm_subm_conv(feats: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Submanifold conv of ``feats`` (N, C_in) through ``table`` (N, K3) int64 neighbour rows (N = absent).

    ``weight``: (C_out, K3 * C_in), offset-major as ``SparseConv3d``'s ``conv.weight.reshape(C_out, -1)``.
    Returns (N, C_out) in ``feats``' dtype, products summed in fp32 (fp32 inputs: IEEE fp32, no TF32).
    """
    n = _check_features(feats)
    if table.dim() != 2 or table.shape[0] != n:
        raise ValueError(f"table must be (N={n}, K3), got {tuple(table.shape)}")
    c_out = _check_weight(feats, table, "table", table.shape[1], weight, bias)
    k3 = table.shape[1]
    triton, plain, tuned = _kernels()[:3]
    feats, table, weight = feats.contiguous(), table.contiguous(), weight.contiguous()
    out = feats.new_empty(n, c_out)
    if n == 0:
        return out
    args = dict(C_IN=feats.shape[1], C_OUT=c_out, K3=k3, HAS_BIAS=bias is not None,
                DOT_PRECISION="ieee" if feats.dtype == torch.float32 else "tf32")
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    if interpreting():
        bm, bn, bk = _INTERPRETER_TILE
        grid = (triton.cdiv(n, bm), triton.cdiv(c_out, bn))
        plain[grid](feats, table, weight, bias_arg, out, n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **args)
    else:
        def grid(meta):
            return triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"])
        with torch.cuda.device(feats.device):  # Triton launches on the current device
            tuned[grid](feats, table, weight, bias_arg, out, n, **args)
    return out


@dataclass(frozen=True)
class NeighbourTiles:
    """A neighbour table laid out for :func:`implicit_gemm_subm_conv_tiled`: rows sorted by which neighbours they
    have (so that the rows of one tile tend to share them), the table transposed in that order, and per tile of
    ``height`` rows (each of :data:`TILE_ROWS`) the kernel offsets at which some row of the tile has a neighbour.
    Built once per coordinate set (:func:`neighbour_tiles`), with device ops only (no host synchronisation)."""

    #: (N,) rows of the table this was built from
    n_rows: int
    #: kernel offsets (table columns)
    k3: int
    #: (n_pad,) int32: the row at each sorted position; ``n_rows`` for the padding up to a multiple of every height
    perm: Tensor
    #: (k3, n_pad) int32: the neighbour rows of the row at each sorted position (``n_rows``: none)
    table_t: Tensor
    #: tile height -> (n_pad / height, k3) int32 offsets, each tile's own first, in ascending order
    offsets: dict[int, Tensor]
    #: tile height -> (n_pad / height,) int32: how many of the tile's offsets ``offsets`` lists first
    counts: dict[int, Tensor]
    #: rows of the features the kernel reads: ``n_rows`` (a submanifold conv reads its own rows), or fewer for a layout
    #: composed with a row map (:func:`compose_tiles`: the conv of gathered features, read where they come from)
    n_source: int | None = None

    @property
    def source_rows(self) -> int:
        """Rows of the features :func:`implicit_gemm_subm_conv_tiled` takes with this layout."""
        return self.n_rows if self.n_source is None else self.n_source

    def work_fraction(self, height: int) -> Tensor:
        """The share of (tile, offset) pairs the tiled kernel runs at tile ``height`` (1 without skipping; all-padding
        tiles count, with no offset): a 0-dim device tensor (reading it syncs)."""
        return self.counts[height].sum() / (self.counts[height].numel() * self.k3)


def neighbour_tiles(table: Tensor, skip: bool = True, heights: tuple[int, ...] = TILE_ROWS) -> NeighbourTiles:
    """Lay out ``table`` ((N, K3) neighbour rows, N = absent, as ``sparse.neighbour_table``) for the tiled kernel.

    ``skip``: sort the rows by their set of present neighbours (a K3-bit key; K3 <= 62) and list per tile only the
    offsets some row of it has; off, the rows keep their order and every tile lists all offsets (the same kernel
    without skipping, for measuring the flat loop on its own). Why sort: in the rows' own (coordinate) order almost
    every tile of 64 has a neighbour at almost every offset (98% at 14k surface voxels), though each row has about
    half of them; sorted by that key, 60-80% of (tile, offset) pairs remain (``benchmarks/sparse_conv_kernels.py``
    reports the fraction per conv)."""
    if table.dim() != 2:
        raise ValueError(f"table must be (N, K3), got {tuple(table.shape)}")
    if table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
        raise TypeError(f"table must hold integer row indices, got {table.dtype}")
    if not heights or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 or h & (h - 1) for h in heights):
        raise ValueError(f"tile heights must be powers of two, got {heights!r}")
    n, k3 = table.shape
    if skip and k3 > 62:
        raise ValueError(f"sorting rows by their neighbours needs K3 <= 62 (a 64-bit key), got K3 = {k3}")
    device = table.device
    present = table < n
    if skip:
        bits = torch.ones(k3, dtype=torch.int64, device=device) << torch.arange(k3, device=device)
        perm = torch.argsort((present.long() * bits).sum(1), stable=True)
    else:
        perm = torch.arange(n, device=device)
    step = max(heights)
    n_pad = max(step, -(-n // step) * step)
    pad = n_pad - n
    perm_p = torch.cat([perm, perm.new_full((pad,), n)]).to(torch.int32)
    table_t = torch.cat([table[perm], table.new_full((pad, k3), n)]).t().contiguous().to(torch.int32)
    offsets, counts = {}, {}
    order = torch.arange(k3, device=device)
    for h in heights:
        has = (table_t < n).t().reshape(n_pad // h, h, k3).any(1) if skip else \
            torch.ones(n_pad // h, k3, dtype=torch.bool, device=device)
        # the tile's offsets first, each group in ascending order: key (absent, offset)
        offsets[h] = torch.argsort((~has).long() * k3 + order, dim=1).to(torch.int32)
        counts[h] = has.sum(1).to(torch.int32)
    return NeighbourTiles(n_rows=n, k3=k3, perm=perm_p, table_t=table_t, offsets=offsets, counts=counts)


def compose_tiles(tiles: NeighbourTiles, source_rows: Tensor, n_source: int, check: bool = True) -> NeighbourTiles:
    """``tiles`` for features given as ``source[source_rows]`` (``source`` with ``n_source`` rows, ``source_rows`` one
    index per row of the table, e.g. a nearest up-sampling's fine-to-coarse map): each present neighbour index ``j``
    becomes ``source_rows[j]``, so the kernel reads the row the gathered one would copy, and the gathered block is never
    written. The same rows, offsets and products in the same order as the tiled conv of the gathered features, so the
    same values bit for bit. Absent neighbours keep the marker ``n_rows``, which needs ``n_source <= n_rows`` (the
    kernel takes an index below ``n_rows`` as present). ``check``: refuse a map with a row outside ``[0, n_source)``,
    which the kernel would read out of bounds; that reads the device (a synchronisation), so a caller recording a CUDA
    graph passes False. Otherwise device ops only."""
    if isinstance(n_source, bool) or not isinstance(n_source, int) or not 0 <= n_source <= tiles.n_rows:
        raise ValueError(f"n_source must be an int in [0, {tiles.n_rows}] (the table's rows), got {n_source!r}")
    if tiles.n_source is not None:
        raise ValueError("these tiles are already composed with a row map; compose the original layout")
    if source_rows.shape != (tiles.n_rows,) or source_rows.dtype.is_floating_point or source_rows.dtype == torch.bool:
        raise ValueError(f"source_rows must be ({tiles.n_rows},) integer row indices, got "
                         f"{tuple(source_rows.shape)} {source_rows.dtype}")
    if source_rows.device != tiles.table_t.device:
        raise ValueError(f"source_rows is on {source_rows.device}, the tiles on {tiles.table_t.device}")
    if check and len(source_rows) and bool(((source_rows < 0) | (source_rows >= n_source)).any()):
        raise ValueError(f"source_rows holds rows outside [0, {n_source}): the kernel would read past the source")
    marker = source_rows.new_full((1,), tiles.n_rows)
    lookup = torch.cat([source_rows, marker]).to(torch.int32)  # the marker row maps to itself
    table_t = lookup[tiles.table_t.long()]
    return replace(tiles, table_t=table_t, n_source=n_source)


def implicit_gemm_subm_conv_tiled(feats: Tensor, tiles: NeighbourTiles, weight: Tensor, bias: Tensor | None,
                                  flat_loop: bool = True) -> Tensor:
    """:func:`implicit_gemm_subm_conv` through a :class:`NeighbourTiles` layout: the same products and the same
    fp32 sums in the same offset order per output row (an offset a tile skips would only add zeros). ``flat_loop``:
    one loop over (listed offset, channel block) instead of the original loop nest (offsets outside, channel blocks
    inside), so that Triton's software pipelining spans the offsets too. ``feats`` has ``tiles.source_rows`` rows:
    the table's own for a submanifold conv, or the source rows of a layout :func:`compose_tiles` made."""
    n_in = _check_features(feats)
    if tiles.source_rows != n_in:
        raise ValueError(f"the neighbour tiles read {tiles.source_rows} feature rows, the features have {n_in}")
    n = tiles.n_rows
    if set(tiles.offsets) != set(TILE_ROWS):
        raise ValueError(f"the neighbour tiles must hold lists for tile heights {TILE_ROWS}, got {sorted(tiles.offsets)}")
    k3 = tiles.k3
    c_out = _check_weight(feats, tiles.table_t, "tiles", k3, weight, bias)
    triton, _, _, plain, tuned = _kernels()
    feats, weight = feats.contiguous(), weight.contiguous()
    out = feats.new_empty(n, c_out)
    if n == 0:
        return out
    a, b = TILE_ROWS
    n_pad = tiles.table_t.shape[1]
    args = dict(C_IN=feats.shape[1], C_OUT=c_out, K3=k3, HAS_BIAS=bias is not None, TILE_A=a, FLAT_LOOP=bool(flat_loop),
                DOT_PRECISION="ieee" if feats.dtype == torch.float32 else "tf32")
    lists = (tiles.table_t, tiles.perm, tiles.offsets[a], tiles.counts[a], tiles.offsets[b], tiles.counts[b])
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    if interpreting():
        bm, bn, bk = _INTERPRETER_TILED_TILE
        grid = (n_pad // bm, triton.cdiv(c_out, bn))
        plain[grid](feats, *lists, weight, bias_arg, out, n, n_pad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **args)
    else:
        def grid(meta):
            return n_pad // meta["BLOCK_M"], triton.cdiv(c_out, meta["BLOCK_N"])
        with torch.cuda.device(feats.device):
            tuned[grid](feats, *lists, weight, bias_arg, out, n, n_pad, **args)
    return out
