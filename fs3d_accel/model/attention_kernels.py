"""Which kernel runs the model's unmasked attention: PyTorch SDPA (default) or FlashAttention-4 (CuTe DSL).

Half of a compiled SS or SLaT pass is attention at head dim 64, and cuDNN's SDPA kernel runs it at 300-400
TFLOP/s on an H100 (``benchmarks/results/attention_kernels_h100/``). FlashAttention-4's Hopper kernel
(``flash_attn.cute``, from the flash-attention repository's ``flash_attn/cute``; it JIT-compiles through
``nvidia-cutlass-dsl``) is an alternative. It computes the same softmax attention with a different
accumulation order, so outputs differ from SDPA's by rounding only.

The choice is a context (:func:`use_attention_kernel`), entered by ``RunOptions.network_context`` around every
network call, so model code stays kernel-agnostic. Each attention call names its role ("self" or "cross"), and
the context picks the kernel per role and stage. Timed from CUDA graphs (kernel time, as the samplers run under
``reduce-overhead``), FA4 is faster than cuDNN at every SS and SLaT shape on the H100 (441-511 against 362-475
TFLOP/s at the four sampler sites; ``benchmarks/results/attention_kernels_h100/session12/``). Timed one launch at a
time (on another machine) it lost at SS self-attention, which sessions 6-11 took for the kernel: most likely each
call's host time, which a 0.2-0.3 ms kernel cannot hide. FA4 is
wrapped in a ``torch.library`` custom op with a fake (meta) implementation: ``torch.compile`` treats it as one opaque call instead of tracing the CuTe DSL.
PyTorch's own ``activate_flash_attention_impl("FA4")`` route is not used: in torch 2.11 it does not match the
current ``flash_attn.cute`` return signature (``ValueError: too many values to unpack``, measured on the H100).

FA4's Hopper kernel takes its tile shape from a per-head-dim table (192 x 128 query x key tiles at head dim 64,
P@V from registers, intra-warpgroup overlap), tuned on long square problems. SAM 3D's calls are short (4,096 SS
tokens, ~3-4k SLaT tokens, a CFG batch of 1-2 with 16 heads): a 192-row tile gives 22 query blocks per head where
128 gives 32, which changes how evenly the CTAs fill the 132 SMs. :class:`FlashAttnTiles` lets a caller pick the tile
per role (``use_attention_kernel(..., tiles=...)``, ``RunOptions.attention_kernel_tiles``);
``benchmarks/attention_kernels.py --fa4-tiles`` times the candidates at the samplers' shapes. Any tile computes the
same attention; only the accumulation order (rounding) changes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .fa4_kernel_call import Fa4KernelCall

SDPA = "sdpa"
FLASH_ATTN_CUTE = "flash-attn-cute"
ATTENTION_KERNELS = (SDPA, FLASH_ATTN_CUTE)
#: what an attention call does: tokens attending to their own set ("self") or to condition tokens ("cross")
ATTENTION_ROLES = ("self", "cross")


@dataclass(frozen=True)
class FlashAttnTiles:
    """Tile configuration of FA4's Hopper forward kernel: ``tile_m`` query rows per CTA (64 per MMA warpgroup:
    64, 128 or 192), ``tile_n`` keys per step (a multiple of 16, at most 256), P@V with P from registers
    (``mma_pv_is_rs``) and the softmax of one block overlapped with the next block's QK^T (``intra_wg_overlap``).
    Written ``"192x128"`` (both flags on) or ``"128x128:no-rs:no-overlap"``."""

    tile_m: int
    tile_n: int
    mma_pv_is_rs: bool = True
    intra_wg_overlap: bool = True

    def __post_init__(self) -> None:
        if self.tile_m not in (64, 128, 192):
            raise ValueError(f"FA4 tile_m must be 64, 128 or 192 (64 rows per MMA warpgroup), got {self.tile_m}")
        if not (16 <= self.tile_n <= 256 and self.tile_n % 16 == 0):
            raise ValueError(f"FA4 tile_n must be a multiple of 16 in [16, 256], got {self.tile_n}")

    @classmethod
    def parse(cls, spec: str) -> "FlashAttnTiles":
        m = re.fullmatch(r"(\d+)x(\d+)(:no-rs)?(:no-overlap)?", spec.strip())
        if m is None:
            raise ValueError(f"FA4 tiles are written MxN with optional ':no-rs' then ':no-overlap' (e.g. '128x128', "
                             f"'192x128:no-rs', '128x128:no-rs:no-overlap'), got {spec!r}")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3) is None, m.group(4) is None)

    @property
    def label(self) -> str:
        return (f"{self.tile_m}x{self.tile_n}" + ("" if self.mma_pv_is_rs else ":no-rs")
                + ("" if self.intra_wg_overlap else ":no-overlap"))


#: (kernel, roles it applies to, FA4 tiles per role: absent = FA4's own table); every other role runs SDPA
_current: tuple[str, tuple[str, ...], dict[str, FlashAttnTiles]] = (SDPA, ATTENTION_ROLES, {})


def check_role(role: str) -> None:
    if role not in ATTENTION_ROLES:
        raise ValueError(f"attention role must be one of {ATTENTION_ROLES}, got {role!r}")


def current_attention_kernel(role: str = "self") -> str:
    """The kernel that runs unmasked attention of ``role`` here."""
    check_role(role)
    name, roles, _ = _current
    return name if role in roles else SDPA


def current_flash_attn_tiles(role: str = "self") -> FlashAttnTiles | None:
    """The FA4 tiles chosen for ``role`` here, or None for FA4's own table."""
    check_role(role)
    return _current[2].get(role)


@contextlib.contextmanager
def use_attention_kernel(name: str, roles: tuple[str, ...] = ATTENTION_ROLES,
                         tiles: Mapping[str, FlashAttnTiles] | None = None) -> Iterator[None]:
    """Run unmasked attention of ``roles`` with kernel ``name`` inside the block (other roles: SDPA), FA4 with
    ``tiles[role]`` where given; the previous choice comes back after, also when the block raises."""
    global _current
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {name!r}")
    for role in roles:
        check_role(role)
    tiles = dict(tiles or {})
    for role, t in tiles.items():
        check_role(role)
        if name != FLASH_ATTN_CUTE or role not in roles:
            raise ValueError(f"FA4 tiles for role {role!r} would never be used: that role runs "
                             f"{name if role in roles else SDPA!r} here")
        if not isinstance(t, FlashAttnTiles):
            raise ValueError(f"tiles[{role!r}] must be a FlashAttnTiles, got {type(t).__name__}")
    previous, _current = _current, (name, tuple(roles), tiles)
    try:
        yield
    finally:
        _current = previous


#: how the small-query path computes its calls: two fp32 matmuls and a softmax (:func:`small_query_attention`; measured
#: slower than the fused kernels), or PyTorch SDPA's FlashAttention-2 (:func:`flash2_small_query_attention`), which
#: splits the keys across CTAs (2.4x / 4.4x faster than FA4 per layout-stream call on the H100, session 13)
SMALL_QUERY_MATMUL = "fp32-matmul"
SMALL_QUERY_FA2 = "sdpa-flash2"
SMALL_QUERY_KERNELS = (SMALL_QUERY_MATMUL, SMALL_QUERY_FA2)

#: (largest query count that takes the small-query path, 0: none do; how it computes them)
_small_query: tuple[int, str] = (0, SMALL_QUERY_MATMUL)


def current_small_query_limit() -> int:
    """The largest query count that takes the small-query path here (0: the path is off)."""
    return _small_query[0]


def current_small_query_kernel() -> str:
    """How the small-query path computes its calls here (one of :data:`SMALL_QUERY_KERNELS`)."""
    return _small_query[1]


@contextlib.contextmanager
def use_small_query_path(max_queries: int, kernel: str = SMALL_QUERY_MATMUL) -> Iterator[None]:
    """Inside the block, unmasked attention with at most ``max_queries`` queries runs the small-query path (0 turns
    it off), computed by ``kernel``; the previous choice comes back after, also when the block raises."""
    global _small_query
    if not isinstance(max_queries, int) or isinstance(max_queries, bool) or max_queries < 0:
        raise ValueError(f"max_queries must be an int >= 0 (0: off), got {max_queries!r}")
    if kernel not in SMALL_QUERY_KERNELS:
        raise ValueError(f"small-query kernel must be one of {SMALL_QUERY_KERNELS}, got {kernel!r}")
    previous, _small_query = _small_query, (max_queries, kernel)
    try:
        yield
    finally:
        _small_query = previous


def small_query_path(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of a few queries by the kernel :func:`use_small_query_path` chose."""
    if _small_query[1] == SMALL_QUERY_FA2:
        return flash2_small_query_attention(q, k, v)
    return small_query_attention(q, k, v)


def flash2_small_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA restricted to its FlashAttention-2 backend, on (B, L, H, D) tensors. With few queries FA2's forward
    splits the keys over several CTAs per (batch, head) when one CTA each would leave most SMs idle (PyTorch's copy of
    flash-attention's split-KV heuristic: ``flash_fwd_splitkv_kernel`` + ``flash_fwd_splitkv_combine_kernel`` in the SS
    sampler's kernel table), where FA4 (no split-KV on Hopper at the measured commit), and presumably cuDNN, walk all
    the keys in one CTA. At the SS layout stream's shapes on the H100, from CUDA graphs: 0.020 / 0.018 ms per call
    against FA4's 0.047 / 0.081 and cuDNN's 0.046 / 0.077 (session 13,
    ``benchmarks/results/attention_kernels_h100/session13/``). Same math,
    different rounding. FA2 needs fp16 / bf16 CUDA tensors (autocast supplies them); on a CPU SDPA's flash backend is
    the CPU's own kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2))
    return out.transpose(1, 2)


def small_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of a few (B, Lq, H, D) queries over (B, Lk, H, D) keys / values, as two batched matmuls and a
    softmax in fp32; output in the dtype SDPA would return.

    Session 12's candidate for the SS layout stream (4 pose queries over ~4.1k or 7.5k keys, 1,200 calls per SS sampler
    call), where the fused kernels presumably give each (batch, head) one CTA that walks every key. Same math with fp32
    scores (TF32 products where ``torch.backends.cuda.matmul.allow_tf32`` is on; bf16 and fp16 inputs are exact in TF32): only
    the rounding differs. Autocast is switched off inside (it would recast the products to half precision); the output
    has the dtype SDPA would return (the autocast dtype under autocast). Measured slower than the fused kernels on the
    H100 (0.20 / 0.34 ms per call compiled, against FA4's 0.047 / 0.081 ms, from CUDA graphs; session 13,
    ``benchmarks/results/attention_kernels_h100/session13/``): :func:`flash2_small_query_attention` is the faster path.
    """
    device_type = q.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype
    with torch.autocast(device_type, enabled=False):
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float() * q.shape[-1] ** -0.5, k.float())
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
    return out.to(out_dtype)


def flash_attn_cute_unavailable(device: torch.device | str) -> str | None:
    """Why FlashAttention-4 cannot run on ``device`` here, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FlashAttention-4 runs on CUDA devices (Hopper or Blackwell), got {device}"
    try:  # finding the submodule imports the parent package, whose own imports may fail
        found = importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute")
    except ImportError as exc:
        found, reason = False, f": {exc}"
    else:
        reason = ""
    if not found:
        return ("flash_attn.cute is not importable (install flash-attn-4, or put the flash-attention "
                f"repository's flash_attn/cute and nvidia-cutlass-dsl on the path){reason}")
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return f"FlashAttention-4 needs compute capability 9.x or 10.x, {torch.cuda.get_device_name(device)} has " \
               f"{torch.cuda.get_device_capability(device)}"
    return None


def _flash_attn_cute_forward(q: Tensor, k: Tensor, v: Tensor, tiles: FlashAttnTiles | None = None,
                             seqused_k: Tensor | None = None) -> Tensor:
    """The FA4 call itself (looked up at call time, so tests can stand in for it). With ``tiles`` or ``seqused_k``
    ((B,) int32: batch element b attends to its first ``seqused_k[b]`` keys only) it calls
    ``flash_attn.cute.interface._flash_attn_fwd``, the forward function behind ``flash_attn_func`` and the only
    entry that takes a tile shape or used key counts for a dense batch (a private name: measured at flash-attention
    commit 0251105, the one ``benchmarks/results/attention_kernels_h100/NOTES.md`` records; another commit may rename
    it; ``seqused_k`` there has not run on a GPU yet)."""
    if not q.is_cuda:
        raise ValueError(f"the {FLASH_ATTN_CUTE!r} attention kernel runs on CUDA tensors, got {q.device}; "
                         f"use {SDPA!r} here")
    kw = flash_attn_fwd_kwargs(tiles, seqused_k)
    if not kw:
        from flash_attn.cute import flash_attn_func
        out = flash_attn_func(q, k, v)
    else:
        from flash_attn.cute.interface import _flash_attn_fwd
        out = _flash_attn_fwd(q, k, v, **kw)
    return out[0] if isinstance(out, tuple) else out


def flash_attn_fwd_kwargs(tiles: FlashAttnTiles | None, seqused_k: Tensor | None) -> dict:
    """The keyword arguments of ``_flash_attn_fwd`` for ``tiles`` and ``seqused_k`` (empty: neither, and
    ``flash_attn_func`` serves the call)."""
    kw: dict = {}
    if tiles is not None:
        kw.update(tile_mn=(tiles.tile_m, tiles.tile_n), mma_pv_is_rs=tiles.mma_pv_is_rs,
                  intra_wg_overlap=tiles.intra_wg_overlap)
    if seqused_k is not None:
        kw["seqused_k"] = checked_seqused_k(seqused_k)
    return kw


def checked_seqused_k(seqused_k: Tensor) -> Tensor:
    """``seqused_k`` as FA4 takes it (contiguous), after checking it is a 1-D int32 tensor of key counts."""
    if seqused_k.dtype != torch.int32 or seqused_k.ndim != 1:
        raise ValueError(f"seqused_k must be a 1-D int32 tensor (one count per batch element), got "
                         f"{seqused_k.dtype} {tuple(seqused_k.shape)}")
    return seqused_k.contiguous()


@torch.library.custom_op("fs3d::flash_attn_cute", mutates_args=())
def flash_attn_cute(q: Tensor, k: Tensor, v: Tensor, tile_m: int = 0, tile_n: int = 0, mma_pv_is_rs: bool = True,
                    intra_wg_overlap: bool = True, seqused_k: Optional[Tensor] = None) -> Tensor:
    """Softmax attention of (B, Lq, H, D) queries over (B, Lk, H, D) keys / values, scale 1/sqrt(D). ``tile_m`` /
    ``tile_n`` 0: FA4's own tile table; otherwise :class:`FlashAttnTiles` fields (plain values, so the op's schema
    and ``torch.compile``'s graphs carry them). ``seqused_k`` ((B,) int32, optional): the keys each batch element
    uses, from the first; the rest are padding."""
    tiles = None if tile_m == 0 and tile_n == 0 else FlashAttnTiles(tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap)
    if seqused_k is None:
        return _flash_attn_cute_forward(q, k, v, tiles).contiguous()
    return _flash_attn_cute_forward(q, k, v, tiles, seqused_k=seqused_k).contiguous()


@flash_attn_cute.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, tile_m: int = 0, tile_n: int = 0, mma_pv_is_rs: bool = True,
      intra_wg_overlap: bool = True, seqused_k: Optional[Tensor] = None) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def flash_attn_cute_tiled(q: Tensor, k: Tensor, v: Tensor, tiles: FlashAttnTiles | None,
                          seqused_k: Tensor | None = None) -> Tensor:
    """FA4 attention with ``tiles`` (None: FA4's table) and optional used key counts, through the operator
    :func:`use_fa4_call` selects (:func:`flash_attn_cute`, ``torch.ops.fs3d.flash_attn_cute_direct`` or
    ``torch.ops.fs3d.flash_attn_cute_kernel``)."""
    op = flash_attn_cute if _fa4_call == FA4_CALL_CUSTOM_OP else _DIRECT_OP if _fa4_call == FA4_CALL_DIRECT \
        else _KERNEL_OP
    if tiles is None:
        return op(q, k, v, seqused_k=seqused_k)
    return op(q, k, v, tiles.tile_m, tiles.tile_n, tiles.mma_pv_is_rs, tiles.intra_wg_overlap, seqused_k=seqused_k)


#: how the model's FA4 calls reach FlashAttention-4. "custom-op": :func:`flash_attn_cute`, a
#: ``torch.library.custom_op`` whose CUDA kernel calls FA4's ``flash_attn_func`` (the path since session 6).
#: "direct": ``torch.ops.fs3d.flash_attn_cute_direct``, an operator defined through ``torch.library.Library`` whose
#: kernel calls FA4's forward function ``_flash_attn_fwd`` itself (:func:`_flash_attn_cute_forward_direct`). That is
#: the same kernel with the same arguments (``flash_attn_func`` passes them on unchanged at the carried commit
#: 0251105; its one special case, keys that are the values at head dim 512, is refused here), so the outputs are the
#: same. What it leaves out is host work: ``custom_op``'s Python autograd and
#: aliasing-check layers (~0.08 ms) and FA4's autograd Function (~0.08 ms) of the ~0.39 ms an FA4 call cost the host
#: under cProfile (session 19, ``results/slat_host_profile_h100/session19/repeat/``, inflated by the profiler;
#: 96-192 FA4 calls per object, each of them in SLaT's per-object graph recording). No gradients: a call whose inputs
#: require them, with grad mode on, is refused. On an H100 (session 21): bit-identical to "custom-op" (GPU test);
#: 50-85 against 85-103 µs of host per call, against 40-91 µs for ``_flash_attn_fwd`` alone
#: (``benchmarks/attention_host_cost.py``, ``results/attention_host_cost_h100/session21/``); per object SLaT faster
#: in 6 of 6 rounds at 14k and 5 of 6 at 20k (variants ``-fd`` of ``benchmarks/stage_latency.py``,
#: ``results/base_vs_official_h100/session21/``).
#: "kernel": ``torch.ops.fs3d.flash_attn_cute_kernel``, the direct operator's schema, whose kernel launches the
#: compiled SM90 kernel FA4's forward cached, after one call through that forward per signature
#: (:class:`fa4_kernel_call.Fa4KernelCall`): the same kernel with the same arguments, without the forward's ~40-90 µs
#: of Python per call; anything outside the plain case it was written for goes through the forward. On an H100
#: (session 21): bit-identical to the forward at every length tried, and a CUDA graph's replay equals the eager
#: launch; 23-37 µs of host per call (``results/attention_host_cost_h100/session21_lease2/``).
FA4_CALL_CUSTOM_OP = "custom-op"
FA4_CALL_DIRECT = "direct"
FA4_CALL_KERNEL = "kernel"
FA4_CALLS = (FA4_CALL_CUSTOM_OP, FA4_CALL_DIRECT, FA4_CALL_KERNEL)
_fa4_call = FA4_CALL_CUSTOM_OP


def current_fa4_call() -> str:
    """How FA4 is called here (:data:`FA4_CALLS`)."""
    return _fa4_call


@contextlib.contextmanager
def use_fa4_call(name: str) -> Iterator[None]:
    """Call FA4 through ``name`` (:data:`FA4_CALLS`) inside the block; the previous choice comes back after, also
    when the block raises."""
    global _fa4_call
    if name not in FA4_CALLS:
        raise ValueError(f"the FA4 call must be one of {FA4_CALLS}, got {name!r}")
    previous, _fa4_call = _fa4_call, name
    try:
        yield
    finally:
        _fa4_call = previous


def _check_forward_inputs(q: Tensor, k: Tensor, v: Tensor, call: str) -> None:
    """What the direct and kernel calls refuse: FA4's MLA special case, which ``flash_attn_func`` would route to
    another kernel, and tensors off CUDA."""
    if k is v and v.shape[-1] == 512:  # flash_attn_func would switch to its MLA kernel here; this call would not
        raise ValueError(f"fa4_call={call!r} does not take keys that are the values at head dim 512 (FA4's MLA "
                         "special case); use fa4_call='custom-op'")
    if not q.is_cuda:
        raise ValueError(f"the {FLASH_ATTN_CUTE!r} attention kernel runs on CUDA tensors, got {q.device}; "
                         f"use {SDPA!r} here")


def _flash_attn_cute_forward_direct(q: Tensor, k: Tensor, v: Tensor, tiles: FlashAttnTiles | None = None,
                                    seqused_k: Tensor | None = None) -> Tensor:
    """FA4's forward function called directly (looked up at call time, so tests can stand in for it): what
    ``flash_attn_func`` runs inside its autograd Function, with ``tiles`` and ``seqused_k`` as in
    :func:`_flash_attn_cute_forward`."""
    _check_forward_inputs(q, k, v, FA4_CALL_DIRECT)
    from flash_attn.cute.interface import _flash_attn_fwd
    return _flash_attn_fwd(q, k, v, **flash_attn_fwd_kwargs(tiles, seqused_k))[0]


#: the launcher of ``fa4_call="kernel"``: its compiled-kernel entries live as long as the process
FA4_KERNEL_CALL = Fa4KernelCall()


def _flash_attn_cute_forward_kernel(q: Tensor, k: Tensor, v: Tensor, tiles: FlashAttnTiles | None = None,
                                    seqused_k: Tensor | None = None) -> Tensor:
    """FA4's cached compiled kernel launched by :data:`FA4_KERNEL_CALL` (looked up at call time, so tests can stand
    in for it), with ``tiles`` and ``seqused_k`` as in :func:`_flash_attn_cute_forward`."""
    _check_forward_inputs(q, k, v, FA4_CALL_KERNEL)
    return FA4_KERNEL_CALL(q, k, v, tiles, None if seqused_k is None else checked_seqused_k(seqused_k))


#: the operator library of ``fs3d::flash_attn_cute_direct`` and ``fs3d::flash_attn_cute_kernel`` (an operator lives
#: as long as its library object)
_DIRECT_LIB = torch.library.Library("fs3d", "FRAGMENT")
_INFERENCE_OP_ARGS = ("(Tensor q, Tensor k, Tensor v, int tile_m=0, int tile_n=0, bool mma_pv_is_rs=True, "
                      "bool intra_wg_overlap=True, Tensor? seqused_k=None) -> Tensor")


def _refuse_gradients(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The direct and kernel operators have no derivative; torch's fallback for such an operator would let a backward
    pass through it with only a warning, so a call that could need gradients is refused here instead."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("fa4_call='direct' or 'kernel' computes no gradients (FA4 is called for inference); run "
                         "under torch.no_grad(), or use fa4_call='custom-op'")


def _inference_op_kernel(forward_name: str):
    """The kernel of an inference-only FA4 operator: refuses gradients, turns the schema's plain tile values back into
    :class:`FlashAttnTiles`, and calls the module function ``forward_name`` (looked up at each call, so tests can
    stand in for it)."""
    def kernel(q: Tensor, k: Tensor, v: Tensor, tile_m: int = 0, tile_n: int = 0, mma_pv_is_rs: bool = True,
               intra_wg_overlap: bool = True, seqused_k: Optional[Tensor] = None) -> Tensor:
        _refuse_gradients(q, k, v)
        tiles = None if tile_m == 0 and tile_n == 0 else FlashAttnTiles(tile_m, tile_n, mma_pv_is_rs,
                                                                         intra_wg_overlap)
        return globals()[forward_name](q, k, v, tiles, seqused_k).contiguous()
    return kernel


def _inference_op_fake(q: Tensor, k: Tensor, v: Tensor, tile_m: int = 0, tile_n: int = 0,
                       mma_pv_is_rs: bool = True, intra_wg_overlap: bool = True,
                       seqused_k: Optional[Tensor] = None) -> Tensor:
    _refuse_gradients(q, k, v)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# every backend (the kernels themselves refuse non-CUDA tensors with a clear message); no autograd kernel
for _name, _forward in (("flash_attn_cute_direct", "_flash_attn_cute_forward_direct"),
                        ("flash_attn_cute_kernel", "_flash_attn_cute_forward_kernel")):
    _DIRECT_LIB.define(_name + _INFERENCE_OP_ARGS, tags=(torch.Tag.pt2_compliant_tag,))
    _DIRECT_LIB.impl(_name, _inference_op_kernel(_forward), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fs3d::{_name}", _inference_op_fake, lib=_DIRECT_LIB)
_DIRECT_OP = torch.ops.fs3d.flash_attn_cute_direct.default
_KERNEL_OP = torch.ops.fs3d.flash_attn_cute_kernel.default


@register_flop_formula([torch.ops.fs3d.flash_attn_cute, torch.ops.fs3d.flash_attn_cute_direct,
                        torch.ops.fs3d.flash_attn_cute_kernel])
def _flash_attn_cute_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV products, as FlopCounterMode counts SDPA: 2 * B * H * Lq * Lk * (D + Dv). Without this rule,
    FLOP counts (and the MFU built on them) would miss every attention that runs through FA4."""
    b, lq, h, d = q_shape
    lk, dv = k_shape[1], v_shape[-1]
    return 2 * b * h * lq * lk * (d + dv)


__all__ = ["ATTENTION_KERNELS", "ATTENTION_ROLES", "FA4_CALLS", "FA4_CALL_CUSTOM_OP", "FA4_CALL_DIRECT",
           "FA4_CALL_KERNEL", "FA4_KERNEL_CALL",
           "FLASH_ATTN_CUTE", "FlashAttnTiles", "SDPA", "check_role",
           "SMALL_QUERY_FA2", "SMALL_QUERY_KERNELS", "SMALL_QUERY_MATMUL", "current_attention_kernel",
           "current_fa4_call", "current_flash_attn_tiles", "current_small_query_kernel", "current_small_query_limit",
           "flash2_small_query_attention", "flash_attn_cute", "flash_attn_cute_tiled", "flash_attn_cute_unavailable",
           "checked_seqused_k", "flash_attn_fwd_kwargs", "small_query_attention", "small_query_path",
           "use_attention_kernel",
           "use_fa4_call", "use_small_query_path"]
