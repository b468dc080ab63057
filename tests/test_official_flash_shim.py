"""The SDPA stand-in for flash_attn that runs the official code's sparse attention: exact block-diagonal
attention per segment, flash_attn's packing conventions, bad inputs rejected."""
from __future__ import annotations

import sys

import pytest
import torch

from benchmarks import official_flash_shim as shim


def _reference(q, k, v, lens_q, lens_k):
    """Segment by segment with an explicit softmax (float64)."""
    out, a, b = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = (t.double() for t in (q[a:a + lq], k[b:b + lk], v[b:b + lk]))
        w = torch.einsum("qhc,khc->hqk", qs, ks) / qs.shape[-1] ** 0.5
        out.append(torch.einsum("hqk,khc->qhc", w.softmax(-1), vs))
        a, b = a + lq, b + lk
    return torch.cat(out).float()


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def test_varlen_matches_per_segment_attention_with_repeated_and_single_lengths():
    g = torch.Generator().manual_seed(0)
    lens = [5, 3, 5, 1, 8, 3]  # groups of equal length, and singletons
    q, k, v = (torch.randn(sum(lens), 2, 4, generator=g) for _ in range(3))
    out = shim.flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), _cu(lens), max(lens))
    assert out.shape == (sum(lens), 2, 4)
    torch.testing.assert_close(out, _reference(q, k, v, lens, lens), atol=1e-5, rtol=1e-5)


def test_kvpacked_cross_attention_with_different_query_and_key_lengths():
    g = torch.Generator().manual_seed(1)
    lq, lk = [7, 2], [4, 4]
    q = torch.randn(9, 3, 8, generator=g)
    k, v = torch.randn(8, 3, 8, generator=g), torch.randn(8, 3, 8, generator=g)
    out = shim.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), _cu(lq), _cu(lk), 7, 4)
    torch.testing.assert_close(out, _reference(q, k, v, lq, lk), atol=1e-5, rtol=1e-5)
    out3 = shim.flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), 7, 4)
    torch.testing.assert_close(out3, out)


def test_dense_packed_functions_keep_flash_layout():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(3, 6, 3, 2, 4, generator=g)  # [B, N, 3, H, C]
    out = shim.flash_attn_qkvpacked_func(qkv)
    assert out.shape == (3, 6, 2, 4)
    q, k, v = qkv.unbind(2)
    for b in range(3):
        torch.testing.assert_close(out[b], _reference(q[b], k[b], v[b], [6], [6]), atol=1e-5, rtol=1e-5)


def test_unsupported_options_and_bad_offsets_raise():
    qkv = torch.randn(4, 3, 1, 2)
    with pytest.raises(NotImplementedError, match="causal"):
        shim.flash_attn_varlen_qkvpacked_func(qkv, _cu([4]), 4, causal=True)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        shim.flash_attn_varlen_qkvpacked_func(qkv, _cu([4]), 4, dropout_p=0.1)
    with pytest.raises(ValueError, match="sum to 5"):
        shim.flash_attn_varlen_qkvpacked_func(qkv, _cu([2, 3]), 3)
    with pytest.raises(ValueError, match="non-decreasing"):
        shim.flash_attn_varlen_qkvpacked_func(qkv, torch.tensor([0, 3, 2, 4]), 3)


def test_install_registers_once_and_refuses_to_shadow_a_real_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    mod = shim.install()
    assert sys.modules["flash_attn"] is mod and shim.install() is mod
    assert mod.flash_attn_varlen_func is shim.flash_attn_varlen_func
    fake = type(sys)("flash_attn")
    fake.__version__ = "2.7.4"
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    with pytest.raises(RuntimeError, match="real flash_attn"):
        shim.install()
    # a package holding only FA4 (flash_attn/cute under an empty __init__) gets the functions added, stays a package
    fa4_only = type(sys)("flash_attn")
    fa4_only.__path__ = ["/somewhere/flash_attn"]
    monkeypatch.setitem(sys.modules, "flash_attn", fa4_only)
    assert shim.install() is fa4_only and fa4_only.flash_attn_func is shim.flash_attn_func
    assert shim.install() is fa4_only  # recognised as installed
    fa4_only.flash_attn_func = lambda *a: None  # ... but one that already has an FA2 function is a real package
    del fa4_only.__version__
    with pytest.raises(RuntimeError, match="real flash_attn"):
        shim.install()


def test_single_segment_is_the_whole_tensor():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 2, 4, generator=g) for _ in range(3))
    out = shim.flash_attn_varlen_func(q, k, v, _cu([6]), _cu([6]), 6, 6)
    torch.testing.assert_close(out, _reference(q, k, v, [6], [6]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one segment of max length 5 / 6 but the tensors hold 6 / 6"):
        shim.flash_attn_varlen_func(q, k, v, _cu([5]), _cu([6]), 5, 6)
