"""Token buckets for the compiled SLaT torso (``RunOptions.slat_token_bucket``, ``slat_flow.use_token_buckets``).

Every object has its own torso token count, so inductor's CUDA graphs record the torso anew for each object. With
buckets, the torso's tokens are padded up to a bucket and the padding is left out as self-attention keys, so objects
of one bucket share one shape (and, with the condition K/V held, one set of graphs). These tests check the bucket
sizes, that padded attention and the padded torso give the unpadded values on the CPU (SDPA's key mask; FA4 gets the
used-key counts instead, checked with a stand-in), that the switch is validated and entered for SLaT only, and that
the SLaT stage holds its K/V across objects exactly when buckets and CUDA graphs are both on.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import mini_slat_setup, sample_slat
from fs3d_accel.model import attention_kernels as ak
from fs3d_accel.model.layers import attention
from fs3d_accel.model.slat_flow import bucket_tokens, current_token_bucket, use_token_buckets
from fs3d_accel.stages.options import RunOptions


def test_bucket_sizes():
    assert [bucket_tokens(n, 1 / 16) for n in (1, 16, 17, 100, 4000, 4096, 4097)] == [1, 16, 17, 100, 4096, 4096, 4352]
    assert bucket_tokens(3500, 0.0) == 3500 and bucket_tokens(3500, 1 / 8) == 3584 and bucket_tokens(3500, 1.0) == 4096
    sizes = [bucket_tokens(n, 1 / 16) for n in range(1, 20000)]
    assert all(b >= n and b - n <= n / 16 for n, b in zip(range(1, 20000), sizes))  # padding within the step
    assert len(set(sizes[2048:4096])) == 16  # 16 buckets per doubling at 1/16 (n = 2049 ... 4096)
    with pytest.raises(ValueError, match="token count must be >= 1"):
        bucket_tokens(0, 1 / 16)
    with pytest.raises(ValueError, match="token bucket step must be in"):
        bucket_tokens(10, 1.5)


def test_option_validated_and_entered_for_slat_only():
    opts = RunOptions(compile_slat=True, slat_token_bucket=1 / 16)
    with opts.network_context("cpu", "slat"):
        assert current_token_bucket() == 1 / 16
    with opts.network_context("cpu", "ss"):
        assert current_token_bucket() == 0.0
    assert current_token_bucket() == 0.0
    with pytest.raises(ValueError, match="compile_slat is off"):
        RunOptions(slat_token_bucket=1 / 16)
    for bad in (-0.1, 1.5, True, "1/16"):
        with pytest.raises(ValueError, match="slat_token_bucket is a step in"):
            RunOptions(compile_slat=True, slat_token_bucket=bad)
    with pytest.raises(ValueError, match="slat_token_bucket is a step in"):
        with use_token_buckets(2.0):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with use_token_buckets(0.25):
            raise RuntimeError("inside")
    assert current_token_bucket() == 0.0  # restored after the error


def _padded(q, k, v, n, total):
    """q, k, v with their first n tokens kept and garbage appended up to ``total``."""
    g = torch.Generator().manual_seed(1)
    return [torch.cat([x[:, :n], 100 * torch.randn(x.shape[0], total - n, *x.shape[2:], generator=g)], 1)
            for x in (q, k, v)]


def test_attention_leaves_padded_keys_out():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 8, generator=g) for _ in range(3))
    ref = attention(q, k, v)
    qp, kp, vp = _padded(q, k, v, 10, 16)
    out = attention(qp, kp, vp, key_len=torch.tensor([10, 10]))
    torch.testing.assert_close(out[:, :10], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a mask or key_len"):
        attention(qp, kp, vp, mask=torch.ones(2, 1, 1, 16, dtype=torch.bool), key_len=torch.tensor([10, 10]))
    with pytest.raises(ValueError, match=r"key_len must be \(B,\) = \(2,\)"):
        attention(qp, kp, vp, key_len=torch.tensor([10]))
    for bad in ([0, 10], [10, 17]):  # no key at all (a softmax over nothing), or more keys than there are
        with pytest.raises(ValueError, match=r"key_len counts must be in \[1, 16\]"):
            attention(qp, kp, vp, key_len=torch.tensor(bad))


def test_flash_attention_gets_the_used_key_counts(monkeypatch):
    """On FA4 the padding goes in as ``seqused_k`` (int32), not as a mask (stand-in for the kernel on the CPU)."""
    seen = []

    def fake(q, k, v, tiles=None, seqused_k=None):
        seen.append(seqused_k)
        n = k.shape[1] if seqused_k is None else int(seqused_k[0])
        return attention(q.float(), k[:, :n].float(), v[:, :n].float()).to(q.dtype)
    monkeypatch.setattr(ak, "_flash_attn_cute_forward", fake)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=g).bfloat16() for _ in range(3))
    with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
        out = attention(q, k, v, key_len=torch.tensor([9, 9]))
        attention(q, k, v)  # unpadded calls keep flash_attn_func's path (no counts)
    assert seen[0].dtype == torch.int32 and seen[0].tolist() == [9, 9] and seen[1] is None
    torch.testing.assert_close(out, attention(q.float(), k[:, :9].float(), v[:, :9].float()).bfloat16())


@pytest.fixture(scope="module")
def slat_setup():
    # close sizes: their coarse token counts (290, 282) share the bucket 320 at 1/4
    stage, objects, sampler = mini_slat_setup((300, 290), steps=5)
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled_torso", None)


@torch.no_grad()
def test_padded_torso_gives_the_unpadded_velocity(slat_setup):
    stage, objects, _ = slat_setup
    flow = stage.flow
    cond, coords, noise = objects[0]
    shapes = []

    def torso(*args):
        shapes.append((args[0].shape[1], None if len(args) < 5 else args[4].tolist()))
        return flow.dense_torso(*args)

    t = torch.tensor([400.0])
    ref = flow(noise, coords, t, cond, torso=torso)
    with use_token_buckets(1 / 4):
        out = flow(noise, coords, t, cond, torso=torso)
        kv = flow.precompute_cond_kv(cond)
        out_kv = flow(noise, coords, t, None, cond_kv=kv, torso=torso)
    with use_token_buckets(1e-6):  # a bucket of one token: no padding, but the counts still go in (same graph)
        torch.testing.assert_close(flow(noise, coords, t, cond, torso=torso), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_kv, ref, rtol=1e-5, atol=1e-5)
    (n, none), (padded, key_len), _, (unpadded, counts) = shapes
    assert none is None and key_len == [n] and padded == bucket_tokens(n, 1 / 4) > n
    assert unpadded == n and counts == [n]


@torch.no_grad()
def test_non_finite_padding_does_not_reach_real_tokens(slat_setup):
    """Padded keys get zero weight, but 0 x NaN is NaN: the padded keys and values are zeroed before the kernel."""
    attn = slat_setup[0].flow.blocks[0].self_attn
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2, 10, attn.channels, generator=g)
    ref = attn.dense(real)
    padded = torch.cat([real, torch.full((2, 6, attn.channels), float("nan"))], 1)
    padded[1, 12] = float("inf")
    out = attn.dense(padded, torch.tensor([10, 10], dtype=torch.int32))
    assert torch.isfinite(out[:, :10]).all()
    torch.testing.assert_close(out[:, :10], ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_slat_stage_holds_its_kv_only_with_buckets_and_graphs(slat_setup, cpu_compile, monkeypatch):
    """Compiled (debug backend) SLaT with buckets: the same samples as without, and, where the compile mode captures
    CUDA graphs (flag forced on: the held path's only way to run without a GPU), the second object's K/V go into the
    first one's buffers. Without buckets nothing is held: every object records its own graphs anyway."""
    stage, objects, sampler = slat_setup
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True)
    bucketed = dataclasses.replace(plain, compile_slat=True, compile_backend="eager", slat_token_bucket=1 / 4)
    for cond, coords, noise in objects:
        ref = sample_slat(stage, cond, coords, noise, sampler, plain)
        torch.testing.assert_close(sample_slat(stage, cond, coords, noise, sampler, bucketed), ref, rtol=1e-4, atol=1e-4)
    assert stage.held_inputs().keys() == []  # no CUDA graphs: nothing held
    monkeypatch.setattr(RunOptions, "compile_uses_cuda_graphs", property(lambda self: True))
    seen = []
    for cond, coords, noise in objects:
        ref = sample_slat(stage, cond, coords, noise, sampler, plain)
        torch.testing.assert_close(sample_slat(stage, cond, coords, noise, sampler, bucketed), ref, rtol=1e-4, atol=1e-4)
        seen.append([t.data_ptr() for t in stage.held_inputs().buffers("both") if isinstance(t, torch.Tensor)])
    assert seen[0] and seen[0] == seen[1]
    import copy
    assert copy.deepcopy(stage.held_inputs()).keys() == []  # a copied stage allocates its own buffers
    stage.to(torch.float64).to(torch.float32)  # moving or casting the stage drops them
    assert stage.held_inputs().keys() == []
    sample_slat(stage, *objects[0], sampler, dataclasses.replace(bucketed, slat_token_bucket=0.0))
    assert stage.held_inputs().keys() == []  # graphs without buckets: nothing held


@torch.no_grad()
def test_bucketed_torso_compiles_once_per_batch_size(slat_setup, cpu_compile):
    """aot_eager (the compile path without inductor): with buckets, one graph per batch size serves both objects (the
    token count stays dynamic, the counts are a tensor input) with no graph break; turning buckets off in the same
    process adds one graph per batch size (the torso then takes no counts), and the samples match the uncompiled ones."""
    from torch._dynamo.utils import counters
    stage, objects, sampler = slat_setup
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True)
    bucketed = dataclasses.replace(plain, compile_slat=True, compile_backend="aot_eager", slat_token_bucket=1 / 4)
    for cond, coords, noise in objects:
        torch.testing.assert_close(sample_slat(stage, cond, coords, noise, sampler, bucketed),
                                   sample_slat(stage, cond, coords, noise, sampler, plain), rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    sample_slat(stage, *objects[0], sampler, dataclasses.replace(bucketed, slat_token_bucket=0.0))
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    stage.__dict__.pop("_compiled_torso", None)


def test_fa4_keyword_arguments_for_tiles_and_counts():
    """What ``_flash_attn_fwd`` receives (the FA4 call itself needs CUDA tensors, so the arguments are checked here)."""
    counts = torch.tensor([9, 9], dtype=torch.int32)
    assert ak.flash_attn_fwd_kwargs(None, None) == {}  # flash_attn_func's path
    assert ak.flash_attn_fwd_kwargs(None, counts)["seqused_k"] is counts
    tiled = ak.flash_attn_fwd_kwargs(ak.FlashAttnTiles(128, 128, False, True), counts)
    assert tiled["tile_mn"] == (128, 128) and tiled["mma_pv_is_rs"] is False and tiled["intra_wg_overlap"] is True
    assert torch.equal(tiled["seqused_k"], counts)
    with pytest.raises(ValueError, match="seqused_k must be a 1-D int32 tensor"):
        ak.flash_attn_fwd_kwargs(None, counts.long())


def _fa4_missing() -> str | None:
    return ak.flash_attn_cute_unavailable("cuda") if torch.cuda.is_available() else "needs a CUDA device"


@pytest.mark.skipif(_fa4_missing() is not None, reason=f"real FlashAttention-4: {_fa4_missing()}")
@torch.no_grad()
def test_real_fa4_used_key_counts_equal_the_unpadded_call():
    """On the GPU: FA4 over keys padded from 1,500 to 1,536 (a SLaT-torso-like shape, the last key tile partly padded,
    the padding filled with large values) with ``seqused_k`` equals FA4 over the 1,500 real keys, to bf16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1500, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    pad = 100 * torch.ones(2, 36, 16, 64, device="cuda", dtype=torch.bfloat16)
    qp, kp, vp = (torch.cat([x, pad], 1) for x in (q, k, v))
    with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
        out = attention(qp, kp, vp, key_len=torch.tensor([1500, 1500], device="cuda"))
        ref = attention(q, k, v)
    torch.testing.assert_close(out[:, :1500].float(), ref.float(), rtol=0, atol=2e-2)


@torch.no_grad()
def test_buckets_inside_whole_pass_graphs_give_the_unbucketed_samples(slat_setup, cpu_compile, monkeypatch):
    """Token buckets with SLaT's whole-pass graphs recorded without a sync (session 17's candidate ``-ac-tb``: buckets
    would let cuBLAS's per-shape algorithm cache serve every object of a bucket). On the CPU the graphs run eagerly;
    the bucketed samples equal the unbucketed whole-pass ones to float32 rounding, and nothing is held (SLaT's torso
    records no graphs of its own in this mode: each object's whole-pass graphs hold its K/V)."""
    import fs3d_accel.stages.options as options_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stage, objects, sampler = slat_setup
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True)
    whole = dataclasses.replace(plain, compile_slat=True, compile_backend="aot_eager", slat_compile_mode="default",
                                cuda_graphs=True, async_graph_capture=True, fuse_slat_io=True)
    bucketed = dataclasses.replace(whole, slat_token_bucket=1 / 4)
    for cond, coords, noise in objects:
        ref = sample_slat(stage, cond, coords, noise, sampler, plain)
        torch.testing.assert_close(sample_slat(stage, cond, coords, noise, sampler, whole), ref, rtol=0, atol=0)
        torch.testing.assert_close(sample_slat(stage, cond, coords, noise, sampler, bucketed), ref, rtol=1e-5,
                                   atol=1e-5)
    assert stage.held_inputs().keys() == []
    stage.__dict__.pop("_compiled_torso", None)
