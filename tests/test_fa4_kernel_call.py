"""``fa4_kernel_call.Fa4KernelCall`` (``RunOptions.fa4_call="kernel"``): FA4's cached compiled kernel launched without
FA4's forward function after one call per signature. On the CPU a stand-in plays FA4's forward: it keeps a compile
cache the way FA4 does (looked up with ``in`` and ``[]``) and its "compiled kernel" takes FA4's SM90 call arguments
and writes SDPA into the output. The GPU tests compare with FA4's own forward where FA4 is importable."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from fs3d_accel.model import attention_kernels as ak
from fs3d_accel.model.fa4_kernel_call import SM90_CALL_PARAMETERS, Fa4KernelCall


def _reference(q, k, v, scale=None, seqused_k=None):
    """Attention of (B, L, H, D) tensors (H a multiple of the keys' heads), batch element b over its first
    seqused_k[b] keys."""
    ratio = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(ratio, dim=2), v.repeat_interleave(ratio, dim=2)
    outs = []
    for b in range(q.shape[0]):
        n = k.shape[1] if seqused_k is None else int(seqused_k[b])
        qb, kb, vb = (t[b:b + 1].transpose(1, 2).float() for t in (q, k[:, :n], v[:, :n]))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(1, 2))
    return torch.cat(outs).to(q.dtype)


class StandInForward:
    """FA4's ``_flash_attn_fwd`` as far as :class:`Fa4KernelCall` relies on it: a compile cache keyed by what the call
    fixes, one compiled kernel per key, called with the SM90 arguments. ``calls``: the forward's own calls;
    ``launches``: the key of each kernel call (from the forward or from the launcher), so that a test sees which
    compiled kernel a launch used."""

    def __init__(self):
        self.compile_cache: dict = {}
        self.calls = 0
        self.launches: list = []

    @staticmethod
    def key(q, k, v, tile_mn=None, mma_pv_is_rs=None, intra_wg_overlap=None, seqused_k=None):
        return (q.dtype, q.shape[-1], v.shape[-1], q.shape[2] // k.shape[2], tile_mn, mma_pv_is_rs, intra_wg_overlap,
                seqused_k is None, q.requires_grad)

    def kernel(self, key, q, k, v, out, lse, scale, cu_q, cu_k, seqused_q, seqused_k, page_table, window_left,
               window_right, sink, block_sparse, aux, cu_total_m, cu_total_splits):
        assert lse is None and cu_q is None and cu_k is None and seqused_q is None and page_table is None
        assert window_left is None and window_right is None and sink is None and block_sparse is None
        assert aux == ("no", "aux") and cu_total_m is None and cu_total_splits is None
        self.launches.append(key)
        out.copy_(_reference(q, k, v, scale, seqused_k))

    def __call__(self, q, k, v, tile_mn=None, mma_pv_is_rs=None, intra_wg_overlap=None, seqused_k=None):
        self.calls += 1
        key = self.key(q, k, v, tile_mn, mma_pv_is_rs, intra_wg_overlap, seqused_k)
        if key not in self.compile_cache:
            self.compile_cache[key] = functools.partial(self.kernel, key)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
        self.compile_cache[key](q, k, v, out, None, 1.0 / math.sqrt(q.shape[-1]), None, None, None, seqused_k,
                                None, None, None, None, None, ("no", "aux"), None, None)
        return out, None, None, None


@pytest.fixture
def fwd():
    return StandInForward()


def _launcher(fwd, settings=(0, False), launchable=True):
    return Fa4KernelCall(forward=fwd, launchable=lambda q: launchable, key_settings=lambda: settings,
                         no_aux_data=lambda: ("no", "aux"))


def _qkv(lq, lk, b=2, h=4, d=16, dv=16, dtype=torch.bfloat16, seed=0, hk=None):
    g = torch.Generator().manual_seed(seed)
    hk = h if hk is None else hk
    return (torch.randn(b, lq, h, d, generator=g, dtype=dtype), torch.randn(b, lk, hk, d, generator=g, dtype=dtype),
            torch.randn(b, lk, hk, dv, generator=g, dtype=dtype))


def test_the_first_call_primes_and_later_calls_of_any_length_launch_the_kernel_alone(fwd):
    call = _launcher(fwd)
    q, k, v = _qkv(5, 7)
    first = call(q, k, v)
    assert (fwd.calls, len(fwd.launches), dict(call.counts)) == (1, 1, {"primed": 1})
    assert torch.equal(first, fwd(q, k, v)[0])
    fwd.calls, fwd.launches = 0, []
    for lq, lk in ((5, 7), (11, 3), (64, 64)):  # lengths are runtime values of one compiled kernel
        q, k, v = _qkv(lq, lk, seed=lq)
        out = call(q, k, v)
        assert torch.equal(out, _reference(q, k, v, 1.0 / math.sqrt(16))), (lq, lk)
        assert out.shape == (2, lq, 4, 16) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert fwd.calls == 0 and fwd.launches == [fwd.key(q, k, v)] * 3
    assert dict(call.counts) == {"primed": 1, "launched": 3}
    assert len(call.entries) == 1 and fwd.compile_cache.__class__ is dict  # FA4's cache attribute is given back


def test_each_signature_primes_once_and_launches_its_own_kernel(fwd):
    """Each signature (tiles, used key counts, value head dim, dtype, query heads per key head) gets the compiled
    kernel FA4's forward looked up for it, and later calls of that signature launch that kernel, not another's."""
    call = _launcher(fwd)
    q, k, v = _qkv(5, 7)
    tiles = ak.FlashAttnTiles(128, 96, False, True)
    counts = torch.tensor([7, 4], dtype=torch.int32)
    cases = [((q, k, v), {}), ((q, k, v), {"tiles": tiles}), ((q, k, v), {"seqused_k": counts}),
             (_qkv(5, 7, dv=32), {}), (_qkv(5, 7, dtype=torch.float16), {}), (_qkv(5, 7, h=4, hk=2), {})]
    for rep in range(2):
        for (a, b, c), kw in cases:
            t = kw.get("tiles")
            out = call(a, b, c, t, kw.get("seqused_k"))
            fa4_kw = {} if t is None else dict(tile_mn=(t.tile_m, t.tile_n), mma_pv_is_rs=t.mma_pv_is_rs,
                                               intra_wg_overlap=t.intra_wg_overlap)
            assert fwd.launches[-1] == fwd.key(a, b, c, seqused_k=kw.get("seqused_k"), **fa4_kw), (rep, kw)
            assert torch.equal(out, _reference(a, b, c, 1.0 / math.sqrt(a.shape[-1]), kw.get("seqused_k")))
    assert dict(call.counts) == {"primed": 6, "launched": 6} and len(call.entries) == 6
    assert fwd.calls == 6
    call.key_settings = lambda: (1, False)  # FA4's log level enters its compile key: another signature
    call(q, k, v)
    assert call.counts["primed"] == 7


@pytest.mark.parametrize("case", ["requires grad", "fp32", "last dim strided", "broadcast", "no keys", "not launchable",
                                  "int64 counts", "counts of another length", "strided counts", "unaligned",
                                  "stride not a multiple of 16 bytes", "keys of another dtype", "no heads"])
def test_calls_outside_the_plain_case_go_through_the_forward(fwd, case):
    call = _launcher(fwd, launchable=case != "not launchable")
    q, k, v = _qkv(5, 7)
    call(q, k, v)  # primed: the plain signature has an entry
    used = None
    if case == "requires grad":
        q = q.clone().requires_grad_()
    elif case == "fp32":
        q, k, v = (t.float() for t in (q, k, v))
    elif case == "last dim strided":
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif case == "broadcast":
        k = k[:1].expand(2, -1, -1, -1)
    elif case == "no keys":
        k, v = k[:, :0], v[:, :0]
    elif case == "int64 counts":
        used = torch.tensor([7, 4])
    elif case == "counts of another length":
        used = torch.tensor([7, 4, 1], dtype=torch.int32)
    elif case == "strided counts":
        used = torch.tensor([7, 0, 4, 0], dtype=torch.int32)[::2]
    elif case == "unaligned":  # the same values one element past an aligned start
        q = torch.cat([q.new_zeros(1), q.flatten()])[1:].view(q.shape)
    elif case == "stride not a multiple of 16 bytes":  # 20 bf16 elements per row, 16 used
        q = torch.cat([q, q.new_zeros(2, 5, 4, 4)], dim=-1)[..., :16]
    elif case == "keys of another dtype":
        k = k.half()
    elif case == "no heads":
        q, k, v = q[:, :, :0], k[:, :, :0], v[:, :, :0]
    fwd.calls = 0
    if case not in ("no keys", "no heads", "keys of another dtype"):  # inputs the stand-in itself cannot take
        call(q, k, v, None, used)
        assert fwd.calls == 1
    assert call.signature(q, k, v, None, used) is None
    assert call.counts["launched"] == 0


def test_a_forward_that_looks_up_no_kernel_or_two_is_named(fwd):
    def no_cache_lookup(q, k, v, **kw):
        return _reference(q, k, v), None
    no_cache_lookup.compile_cache = {}
    call = _launcher(no_cache_lookup)
    with pytest.raises(RuntimeError, match="looked up 0 compiled kernels.*fa4_call='direct'"):
        call(*_qkv(5, 7))
    assert no_cache_lookup.compile_cache == {} and type(no_cache_lookup.compile_cache) is dict

    def two_lookups(q, k, v, **kw):  # e.g. another FA4 call elsewhere during the first call
        two_lookups.compile_cache["a"] = two_lookups.compile_cache["b"] = fwd.kernel
        return _reference(q, k, v), None
    two_lookups.compile_cache = {}
    call = _launcher(two_lookups)
    with pytest.raises(RuntimeError, match="looked up 2 compiled kernels"):
        call(*_qkv(5, 7))
    assert not call.entries


def test_the_cache_attribute_is_given_back_when_the_forward_raises(fwd):
    def failing(q, k, v, **kw):
        raise RuntimeError("compile failed")
    cache = {}
    failing.compile_cache = cache
    call = _launcher(failing)
    with pytest.raises(RuntimeError, match="compile failed"):
        call(*_qkv(5, 7))
    assert failing.compile_cache is cache and not call.entries


def test_the_kernel_op_refuses_what_the_direct_op_refuses():
    q, kv = torch.randn(1, 3, 2, 512), torch.randn(1, 4, 2, 512)
    with pytest.raises(ValueError, match="fa4_call='kernel' does not take keys that are the values at head dim 512"):
        ak._flash_attn_cute_forward_kernel(q, kv, kv)
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        torch.ops.fs3d.flash_attn_cute_kernel(x, x, x)


def test_the_sm90_argument_list_is_fa4s_where_fa4_is_importable():
    pytest.importorskip("flash_attn.cute.flash_fwd_sm90", reason="FA4 (flash_attn.cute) is not installed")
    import inspect
    from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
    assert tuple(inspect.signature(FlashAttentionForwardSm90.__call__).parameters)[1:] == SM90_CALL_PARAMETERS


def _fa4_on_sm90():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    why = ak.flash_attn_cute_unavailable(torch.device("cuda"))
    if why:
        pytest.skip(why)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the kernel call launches FA4's SM90 kernel; other GPUs fall back to FA4's forward")


def test_the_launched_kernel_gives_fa4s_output_at_every_length_on_the_gpu():
    """Primed at one length, the launches give ``_flash_attn_fwd``'s output bit for bit at others: self- and cross
    attention, FA4's tile table and a tile override, with and without used key counts, as FA4's sites call it."""
    _fa4_on_sm90()
    from flash_attn.cute.interface import _flash_attn_fwd
    call = Fa4KernelCall()
    g = torch.Generator(device="cuda").manual_seed(0)
    tiles = ak.FlashAttnTiles(128, 128)
    for lq, lk in ((300, 517), (4096, 4096), (1000, 77), (14171, 14171), (20581, 1374)):
        q = torch.randn(2, lq, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(2, lk, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        counts = torch.tensor([lk, max(1, lk // 3)], device="cuda", dtype=torch.int32)
        for t, used in ((None, None), (tiles, None), (None, counts)):
            kw = {} if t is None else dict(tile_mn=(t.tile_m, t.tile_n), mma_pv_is_rs=t.mma_pv_is_rs,
                                           intra_wg_overlap=t.intra_wg_overlap)
            if used is not None:
                kw["seqused_k"] = used
            with torch.no_grad():
                want = _flash_attn_fwd(q, k, v, **kw)[0]
                got = call(q, k, v, t, used)
            assert torch.equal(got, want) and got.stride() == want.stride(), (lq, lk, t, used)
    assert call.counts["primed"] == 3 and call.counts["launched"] == 12 and call.counts["fell back"] == 0


def test_the_launched_kernel_replays_in_a_cuda_graph():
    _fa4_on_sm90()
    call = Fa4KernelCall()
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, n, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16) for n in (700, 900, 900))
    with torch.no_grad():
        eager = call(q, k, v)  # primes outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call(q, k, v)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, call(q, k, v))
    assert call.counts["launched"] == 2


def test_the_kernel_path_checks_the_key_counts_like_the_other_calls(monkeypatch):
    """Bad counts are refused by name; good ones reach the launcher contiguous."""
    seen = []
    monkeypatch.setattr(ak, "_check_forward_inputs", lambda *a: None)  # past the CUDA-only check, on the CPU
    monkeypatch.setattr(ak, "FA4_KERNEL_CALL", lambda q, k, v, tiles, used: seen.append(used) or q)
    q = torch.randn(2, 4, 2, 8, dtype=torch.bfloat16)
    for bad in (torch.tensor([4, 2]), torch.tensor([[4, 2]], dtype=torch.int32)):
        with pytest.raises(ValueError, match="seqused_k must be a 1-D int32 tensor"):
            ak._flash_attn_cute_forward_kernel(q, q, q, None, bad)
    ak._flash_attn_cute_forward_kernel(q, q, q, None, torch.tensor([4, 0, 2, 0], dtype=torch.int32)[::2])
    assert len(seen) == 1 and seen[0].is_contiguous() and seen[0].tolist() == [4, 2]
