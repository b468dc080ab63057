"""Which kernel runs the model's unmasked attention: PyTorch SDPA (default) or FlashAttention-4 (CuTe DSL).

Half of a compiled SS or SLaT pass is attention at head dim 64, and cuDNN's SDPA kernel runs it at 300-400
TFLOP/s on an H100 (``benchmarks/results/attention_kernels_h100/``). FlashAttention-4's Hopper kernel
(``flash_attn.cute``, from the flash-attention repository's ``flash_attn/cute``; it JIT-compiles through
``nvidia-cutlass-dsl``) is an alternative. It computes the same softmax attention with a different
accumulation order, so outputs differ from SDPA's by rounding only.

The choice is a context (:func:`use_attention_kernel`), entered by ``RunOptions.network_context`` around every
network call, so model code stays kernel-agnostic. Each attention call names its role ("self" or "cross"), and
the context picks the kernel per role: per kernel, FA4 is faster than cuDNN at SAM 3D's cross-attention shapes
and at SLaT's self-attention, but slower at SS's self-attention, so the best choice differs by call site. FA4 is
wrapped in a ``torch.library`` custom op with a fake (meta) implementation: ``torch.compile`` treats it as one opaque call instead of tracing the CuTe DSL.
PyTorch's own ``activate_flash_attention_impl("FA4")`` route is not used: in torch 2.11 it does not match the
current ``flash_attn.cute`` return signature (``ValueError: too many values to unpack``, measured on the H100).
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

SDPA = "sdpa"
FLASH_ATTN_CUTE = "flash-attn-cute"
ATTENTION_KERNELS = (SDPA, FLASH_ATTN_CUTE)
#: what an attention call does: tokens attending to their own set ("self") or to condition tokens ("cross")
ATTENTION_ROLES = ("self", "cross")

#: (kernel, roles it applies to); every other role runs SDPA
_current: tuple[str, tuple[str, ...]] = (SDPA, ATTENTION_ROLES)


def check_role(role: str) -> None:
    if role not in ATTENTION_ROLES:
        raise ValueError(f"attention role must be one of {ATTENTION_ROLES}, got {role!r}")


def current_attention_kernel(role: str = "self") -> str:
    """The kernel that runs unmasked attention of ``role`` here."""
    check_role(role)
    name, roles = _current
    return name if role in roles else SDPA


@contextlib.contextmanager
def use_attention_kernel(name: str, roles: tuple[str, ...] = ATTENTION_ROLES) -> Iterator[None]:
    """Run unmasked attention of ``roles`` with kernel ``name`` inside the block (other roles: SDPA); the
    previous choice comes back after, also when the block raises."""
    global _current
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {name!r}")
    for role in roles:
        check_role(role)
    previous, _current = _current, (name, tuple(roles))
    try:
        yield
    finally:
        _current = previous


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


def _flash_attn_cute_forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The FA4 call itself (looked up at call time, so tests can stand in for it)."""
    if not q.is_cuda:
        raise ValueError(f"the {FLASH_ATTN_CUTE!r} attention kernel runs on CUDA tensors, got {q.device}; "
                         f"use {SDPA!r} here")
    from flash_attn.cute import flash_attn_func
    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op("fs3d::flash_attn_cute", mutates_args=())
def flash_attn_cute(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of (B, Lq, H, D) queries over (B, Lk, H, D) keys / values, scale 1/sqrt(D)."""
    return _flash_attn_cute_forward(q, k, v).contiguous()


@flash_attn_cute.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@register_flop_formula(torch.ops.fs3d.flash_attn_cute)
def _flash_attn_cute_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV products, as FlopCounterMode counts SDPA: 2 * B * H * Lq * Lk * (D + Dv). Without this rule,
    FLOP counts (and the MFU built on them) would miss every attention that runs through FA4."""
    b, lq, h, d = q_shape
    lk, dv = k_shape[1], v_shape[-1]
    return 2 * b * h * lq * lk * (d + dv)


__all__ = ["ATTENTION_KERNELS", "ATTENTION_ROLES", "FLASH_ATTN_CUTE", "SDPA", "check_role", "current_attention_kernel",
           "flash_attn_cute", "flash_attn_cute_unavailable", "use_attention_kernel"]
