"""FlashAttention-4's compiled SM90 forward kernel launched again without FA4's per-call Python
(``RunOptions.fa4_call="kernel"``).

Why: with ``fa4_call="direct"`` an FA4 call still costs the host 50-85 µs on the H100 (session 21,
``benchmarks/results/attention_host_cost_h100/session21/``), most of it inside FA4's ``_flash_attn_fwd``: argument
checks, the tile configuration, a compile key of ~57 fields hashed twice and the argument lists, before it calls the
kernel it compiled once and cached. SLaT's per-object graph recording pays that 96-192 times per object, with the GPU
idle meanwhile. Every length in the compiled kernel is a runtime value (FA4 marks the tensors' layouts dynamic), so
one compiled kernel serves every sequence length of a given dtype, head dim, head ratio and option set.

How: the first call of each :func:`signature` goes through ``_flash_attn_fwd`` itself, with its compile cache wrapped
for that call by a recorder that notes the key the call looks up; the compiled function stored under that key is
kept. Later calls with the signature allocate the output as ``_flash_attn_fwd`` does and call the compiled function
with the arguments it passes on SM90 (``flash_attn/cute/interface.py`` at commit 0251105, the forward's call
arguments for ``arch // 10 == 9`` without ``qv``): the same kernel, the same arguments, so the same output.

The signature holds every input of FA4's compile key that can differ between this project's calls: dtype, head dims,
query heads per key head, whether ``seqused_k`` is given, the tile override, FA4's log level and CLC-scheduler
default, and the device. What else the key holds is fixed by the arguments this path passes (no causal mask, window,
softcap, score or mask mod, paged or split KV, varlen ``cu_seqlens``, ``lse``). Anything outside that case goes to
``_flash_attn_fwd``: gradients, non-contiguous or broadcast (zero-stride) inputs, unaligned pointers, empty inputs,
another architecture than SM90, or an FA4 whose SM90 kernel takes other call arguments than the ones checked.

Safe inside CUDA graph capture once a signature is primed (nothing synchronises; the kernel launches on the current
stream, as FA4's own call does); the first call of a signature may compile, so make it before a capture. It swaps FA4's
cache attribute for the call's duration, under a lock; an FA4 call made elsewhere in the process at that moment,
outside this path, would be recorded too, and if it looked up another key the first call refuses with a clear error
instead of keeping a wrong kernel. What
is checked of FA4 itself: the SM90 kernel's parameter names, FA4's own arch choice, and that the call looked up exactly
one compiled kernel. Another FA4 version could change what its key means without changing those; the GPU tests
(``tests/test_fa4_kernel_call.py``) are the check to run after an FA4 update.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from collections import Counter
from typing import Callable, Optional

import torch
from torch import Tensor

#: the parameters of ``FlashAttentionForwardSm90.__call__`` (after ``self``) that :meth:`Fa4KernelCall._launch`
#: passes positionally, in order (``stream`` is no call argument: the compiled function takes the current stream)
SM90_CALL_PARAMETERS = ("mQ", "mK", "mV", "mO", "mLSE", "softmax_scale", "mCuSeqlensQ", "mCuSeqlensK", "mSeqUsedQ",
                        "mSeqUsedK", "mPageTable", "window_size_left", "window_size_right", "learnable_sink",
                        "blocksparse_tensors", "aux_data", "mCuTotalMBlocks", "mCuTotalSplitsMBlocks", "stream")
_HALF = (torch.bfloat16, torch.float16)
#: held while a first call swaps FA4's compile-cache attribute (one process-wide cache, so one lock)
_PRIME_LOCK = threading.Lock()


def fa4_forward() -> Callable:
    """FA4's forward function, looked up at call time (tests stand in for it)."""
    from flash_attn.cute.interface import _flash_attn_fwd
    return _flash_attn_fwd


def sm90_kernel_takes_known_arguments(q: Tensor) -> bool:
    """True where ``q``'s device is SM90, FA4 picks its SM90 kernels (its own arch choice, which
    ``FLASH_ATTENTION_ARCH`` can override, is read too) and that forward kernel takes :data:`SM90_CALL_PARAMETERS`."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
    from flash_attn.cute.interface import _get_device_arch
    if _get_device_arch() // 10 != 9:
        return False
    names = tuple(inspect.signature(FlashAttentionForwardSm90.__call__).parameters)[1:]
    return names == SM90_CALL_PARAMETERS


def fa4_key_settings() -> tuple:
    """FA4's process-wide settings that enter its compile key: log level and CLC-scheduler default."""
    from flash_attn.cute import fa_logging, utils
    return fa_logging.get_fa_log_level(), utils._get_use_clc_scheduler_default()


def fa4_no_aux_data() -> object:
    """What FA4's forward passes for "no aux tensors or scalars": ``AuxData(None, None)`` (an immutable tuple)."""
    from flash_attn.cute.utils import AuxData
    return AuxData(None, None)


def _forward_kwargs(tiles, seqused_k: Tensor | None) -> dict:
    kw: dict = {}
    if tiles is not None:
        kw.update(tile_mn=(tiles.tile_m, tiles.tile_n), mma_pv_is_rs=tiles.mma_pv_is_rs,
                  intra_wg_overlap=tiles.intra_wg_overlap)
    if seqused_k is not None:
        kw["seqused_k"] = seqused_k
    return kw


class _KeyRecorder:
    """Stands in for ``_flash_attn_fwd.compile_cache`` during one call and remembers the keys that call looked up
    (one, for the calls this path takes)."""

    def __init__(self, inner):
        self.inner, self.keys = inner, []

    def __contains__(self, key) -> bool:
        self.keys.append(key)
        return key in self.inner

    def __getitem__(self, key):
        self.keys.append(key)
        return self.inner[key]

    def __setitem__(self, key, value) -> None:
        self.keys.append(key)
        self.inner[key] = value


def _plain_layout(t: Tensor) -> bool:
    """FA4 would use ``t`` as it is (last stride 1, other strides multiples of 16 bytes, 16-byte aligned) and treat no
    mode as broadcast (no zero stride): the conditions under which the compile key and the call arguments are those
    this path assumes."""
    s = t.stride()
    per16 = 16 // t.element_size()
    return (s[-1] == 1 and 0 not in s and t.data_ptr() % 16 == 0 and all(x % per16 == 0 for x in s[:-1]))


@dataclasses.dataclass
class Fa4KernelCall:
    """Calls FA4's forward for (B, Lq, H, D) queries over (B, Lk, Hkv, D) keys and (B, Lk, Hkv, Dv) values, launching
    the cached compiled kernel directly after a signature's first call (see the module docstring). ``forward``,
    ``launchable``, ``key_settings`` and ``no_aux_data``: None means FA4's own (:func:`fa4_forward`,
    :func:`sm90_kernel_takes_known_arguments`, :func:`fa4_key_settings`, :func:`fa4_no_aux_data`); tests pass
    stand-ins. ``counts``: "primed", "launched" and "fell back" calls, for tests and diagnostics."""
    forward: Optional[Callable] = None
    launchable: Optional[Callable[[Tensor], bool]] = None
    key_settings: Optional[Callable[[], tuple]] = None
    no_aux_data: Optional[Callable[[], object]] = None
    entries: dict = dataclasses.field(default_factory=dict)
    counts: Counter = dataclasses.field(default_factory=Counter)
    _launchable_devices: dict = dataclasses.field(default_factory=dict)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, tiles=None, seqused_k: Tensor | None = None) -> Tensor:
        sig = self.signature(q, k, v, tiles, seqused_k)
        if sig is None:
            self.counts["fell back"] += 1
            return self._forward()(q, k, v, **_forward_kwargs(tiles, seqused_k))[0]
        entry = self.entries.get(sig)
        if entry is None:
            return self._prime(q, k, v, tiles, seqused_k, sig)
        self.counts["launched"] += 1
        return self._launch(entry, q, k, v, seqused_k)

    def signature(self, q: Tensor, k: Tensor, v: Tensor, tiles, seqused_k: Tensor | None) -> tuple | None:
        """The cache key of this call's compiled kernel, or None where the call must go through FA4's forward."""
        if not all(type(t) is Tensor for t in (q, k, v)):  # fake tensors, subclasses
            return None
        if q.requires_grad or k.requires_grad or v.requires_grad:
            return None  # FA4 then also writes the log-sum-exp (also under no_grad): another kernel
        dt = q.dtype
        if dt not in _HALF or k.dtype != dt or v.dtype != dt or q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            return None
        b, lq, h, d = q.shape
        hk = k.shape[2]
        if k.device != q.device or v.device != q.device:
            return None
        if (k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or v.shape[1] != k.shape[1] or v.shape[2] != hk
                or b * lq * h * d == 0 or k.shape[1] == 0 or hk == 0 or h % hk != 0):
            return None
        if not (_plain_layout(q) and _plain_layout(k) and _plain_layout(v)):
            return None
        if seqused_k is not None and (seqused_k.dtype != torch.int32 or tuple(seqused_k.shape) != (b,)
                                      or seqused_k.stride(0) != 1 or seqused_k.device != q.device):
            return None
        if not self._launchable(q):
            return None
        settings = (self.key_settings or fa4_key_settings)()
        return (q.device, dt, d, v.shape[3], h // hk, seqused_k is None, tiles, settings)

    def _forward(self) -> Callable:
        return self.forward or fa4_forward()

    def _launchable(self, q: Tensor) -> bool:
        if self.launchable is not None:
            return self.launchable(q)
        if q.device not in self._launchable_devices:
            self._launchable_devices[q.device] = sm90_kernel_takes_known_arguments(q)
        return self._launchable_devices[q.device]

    def _prime(self, q, k, v, tiles, seqused_k, sig) -> Tensor:
        """One call through FA4's forward, keeping the compiled function under the key it looked up. Under a lock
        (the forward's cache attribute is swapped for the call's duration), and only a call that looked up exactly one
        key is kept."""
        fwd = self._forward()
        with _PRIME_LOCK:
            cache = fwd.compile_cache
            recorder = _KeyRecorder(cache)
            fwd.compile_cache = recorder
            try:
                out = fwd(q, k, v, **_forward_kwargs(tiles, seqused_k))[0]
            finally:
                fwd.compile_cache = cache
        keys = set(recorder.keys)
        if len(keys) != 1 or next(iter(keys)) not in cache:
            raise RuntimeError(f"FA4's forward looked up {len(keys)} compiled kernels (not one) for a call "
                               "fa4_call='kernel' takes; this FA4 differs from the one it was written for (commit "
                               "0251105): use fa4_call='direct'")
        no_aux = (self.no_aux_data or fa4_no_aux_data)()
        self.entries[sig] = (cache[next(iter(keys))], 1.0 / math.sqrt(q.shape[-1]), no_aux)
        self.counts["primed"] += 1
        return out

    @staticmethod
    def _launch(entry, q: Tensor, k: Tensor, v: Tensor, seqused_k: Tensor | None) -> Tensor:
        """The compiled kernel with the arguments FA4's forward passes on SM90 (its default scale 1/sqrt(D))."""
        kernel, scale, no_aux = entry
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        kernel(q, k, v, out, None, scale,
               None, None, None, seqused_k, None,  # cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table
               None, None, None,  # window_size_left, window_size_right, learnable_sink
               None, no_aux,  # block-sparse tensors, aux tensors and scalars
               None, None)  # cu_total_m_blocks, cu_total_splits_m_blocks
        return out


__all__ = ["Fa4KernelCall", "SM90_CALL_PARAMETERS", "fa4_forward", "fa4_key_settings", "fa4_no_aux_data",
           "sm90_kernel_takes_known_arguments"]
