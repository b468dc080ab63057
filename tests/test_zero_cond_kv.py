"""``RunOptions.collapse_zero_cond``: the unconditional CFG branch's cross-attention over one key.

The unconditional branch feeds all-zero condition tokens, so every key (and every value) of its
cross-attention is the ``to_kv`` bias; attention over one of them gives the same output. Checked on the
attention itself, and on whole SS and SLaT samplers (batched and unbatched CFG, eager and the compiled
SLaT torso) against the uncollapsed run. On the CPU's math path softmax divides by L, so the two agree to
float rounding rather than bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from conftest import mini_slat_object, record_size
from fs3d_accel.model.configs import mini_config
from fs3d_accel.model.layers import collapse_zero_condition_kv, cross_attention, map_kv_pairs
from fs3d_accel.model.sparse import release_structure
from fs3d_accel.model.ss_flow import CrossAttention
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.slat import SLaTStage
from fs3d_accel.stages.ss import SSStage, ss_noise


@torch.no_grad()
def test_attention_over_one_key_of_a_zero_condition():
    torch.manual_seed(0)
    attn = CrossAttention(32, 24, 4)
    torch.nn.init.normal_(attn.to_kv.bias)
    cond = torch.cat([torch.randn(1, 50, 24), torch.zeros(1, 50, 24)])
    x = torch.randn(2, 9, 32)
    full = attn.kv(cond)
    collapsed = collapse_zero_condition_kv(full, [False, True])
    assert len(collapsed) == 4 and collapsed[0].shape[1] == 50 and collapsed[2].shape[1] == 1
    torch.testing.assert_close(attn(x, kv=collapsed), attn(x, kv=full), rtol=1e-6, atol=1e-6)
    # the conditional row's attention is untouched: the same SDPA on the same tensors
    q = torch.randn(2, 9, 4, 8)
    assert torch.equal(cross_attention(q, collapsed)[:1], cross_attention(q[:1], (full[0][:1], full[1][:1])))
    assert collapse_zero_condition_kv(full, [False, False]) is full
    one = collapse_zero_condition_kv((full[0][1:], full[1][1:]), [True])  # a batch of one zero row
    assert len(one) == 2 and one[0].shape[:2] == (1, 1)
    torch.testing.assert_close(attn(x[1:], kv=one), attn(x[1:], kv=(full[0][1:], full[1][1:])), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="zero_rows has 1 entries, K/V batch is 2"):
        collapse_zero_condition_kv(full, [True])
    with pytest.raises(ValueError, match="2 per-element K/V pairs for a batch of 1"):
        cross_attention(q[:1], collapsed)
    with pytest.raises(ValueError, match="expected a .k, v. pair, got 4 tensors"):
        map_kv_pairs(lambda p: p, [collapsed])
    with pytest.raises(TypeError, match="not a cached K/V structure"):
        map_kv_pairs(lambda p: p, [full[0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_one_key_is_its_value_without_a_kernel(dtype, monkeypatch):
    """Softmax over one score is exactly 1: the output is the value for every query, bit for bit what SDPA
    returns; the shortcut launches no attention kernel."""
    import torch.nn.functional as F

    from fs3d_accel.model import layers
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 8, generator=g).to(dtype) for n in (9, 1, 1))
    kernel = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def no_kernel(*args, **kwargs):
        raise AssertionError("an attention kernel ran for a single key")

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", no_kernel)
    out = layers.attention(q, k, v, role="cross")
    assert out.shape == (2, 9, 4, 8) and out.dtype == dtype
    assert torch.equal(out, kernel) and torch.equal(out, v.expand(2, 9, 4, 8))
    assert torch.equal(layers.attention(q, k[:1], v[:1]), v[:1].expand(2, 9, 4, 8))  # one K/V row for the batch
    with pytest.raises(ValueError, match="attention inputs do not match"):
        layers.attention(q, k[:, :, :2], v)  # 2 heads of keys for 4 heads of queries
    with pytest.raises(ValueError, match="attention inputs do not match"):
        layers.attention(q, k[..., :4], v)  # head dim 4 of keys for 8 of queries
    with pytest.raises(ValueError, match="attention inputs do not match"):
        layers.attention(q, k, v.double())
    with pytest.raises(AssertionError, match="an attention kernel ran"):
        layers.attention(q, k, v, mask=torch.ones(2, 1, 9, 1, dtype=torch.bool))  # masked: the kernel decides


def test_one_key_shortcut_under_autocast_gradients_and_the_fa4_switch(monkeypatch):
    import torch.nn.functional as F

    from fs3d_accel.model import attention_kernels as ak
    from fs3d_accel.model import layers
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 4, 8, generator=g) for n in (9, 1, 1))
    with torch.autocast("cpu", torch.bfloat16):  # the dtype SDPA would return, and its values
        out = layers.attention(q, k, v)
        ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    # gradients: exactly SDPA's for v; q and k get none (their exact gradient is zero)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    layers.attention(qq, kk, vv).square().sum().backward()
    vr = v.clone().requires_grad_()
    F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), vr.transpose(1, 2)).square().sum().backward()
    assert torch.equal(vv.grad, vr.grad) and qq.grad is None and kk.grad is None
    # with FlashAttention-4 selected, a one-key call still launches nothing
    calls = []
    monkeypatch.setattr(ak, "_flash_attn_cute_forward", lambda *a: calls.append(a))
    with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
        assert torch.equal(layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), role="cross"),
                           v.bfloat16().expand(2, 9, 4, 8))
    assert calls == []


def test_collapse_needs_the_kv_cache():
    with pytest.raises(ValueError, match="collapse_zero_cond works on the cached condition K/V"):
        RunOptions(collapse_zero_cond=True)
    assert RunOptions(cache_cond_kv=True, collapse_zero_cond=True).collapse_zero_cond


@pytest.fixture
def key_counts(monkeypatch, run_time_sizes):
    """Records the number of keys of every cross-attention SDPA call (dense and sparse paths), so the
    sampler tests can see the one-key path was taken and not just that the outputs agree."""
    import fs3d_accel.model.layers as layers
    import fs3d_accel.model.sparse as sparse
    attention, sdpa = layers.attention, sparse._sdpa

    # recorded through an operator (``record_size``), which runs at every call of the compiled SLaT torso too
    def rec_attention(q, k, v, mask=None, role="self"):
        return attention(q, record_size(k, 1), v, mask, role=role)

    def rec_sdpa(q, k, v, mask=None, role="self"):
        return sdpa(q, record_size(k, 1), v, mask, role=role)

    monkeypatch.setattr(layers, "attention", rec_attention)
    monkeypatch.setattr(sparse, "_sdpa", rec_sdpa)
    return run_time_sizes


@pytest.fixture(scope="module")
def mini():
    import dataclasses
    cfg = mini_config()
    cfg = dataclasses.replace(cfg, ss_flow=dataclasses.replace(cfg.ss_flow, resolution=4))
    torch.manual_seed(0)
    return cfg, SSStage(cfg).eval(), SLaTStage(cfg).eval()


def _bias_nonzero(module: torch.nn.Module) -> None:
    """Random biases everywhere, so the zero condition's keys and values are not zero themselves."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.1)


@pytest.mark.parametrize("batch_cfg", [True, False])
@torch.no_grad()
def test_ss_sampler_same_with_collapsed_uncond_kv(mini, batch_cfg, key_counts):
    cfg, ss, _ = mini
    _bias_nonzero(ss.flow)
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 40, cfg.ss_flow.cond_channels, generator=g), ss_noise(cfg, g)
    outs = []
    for collapse in (False, True):
        opts = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, collapse_zero_cond=collapse)
        net = ss.velocity_net(cond, cfg.ss_sampler, opts)
        key_counts.clear()
        outs.append(EulerFlowSampler(cfg.ss_sampler, "ss").sample(dict(noise), net))
        # cross-attention keys: 40 condition tokens, or 1 for the collapsed zero condition
        assert (1 in key_counts) == collapse and 40 in key_counts
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("batch_cfg, compiled", [(True, False), (False, False), (True, True)])
@torch.no_grad()
def test_slat_sampler_same_with_collapsed_uncond_kv(mini, batch_cfg, compiled, cpu_compile, key_counts):
    cfg, _, slat = mini
    _bias_nonzero(slat.flow)
    coords, cond, noise = mini_slat_object(cfg)
    outs = []
    for collapse in (False, True):
        opts = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, collapse_zero_cond=collapse,
                          compile_slat=compiled, compile_backend="eager")
        structures: list[dict] = []
        try:
            net = slat.velocity_net(cond, coords, cfg.slat_sampler, opts, structures)
            key_counts.clear()
            outs.append(EulerFlowSampler(cfg.slat_sampler, "slat").sample(noise.clone(), net))
            assert (1 in key_counts) == collapse and 24 in key_counts
        finally:
            for s in structures:
                release_structure(s)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage_name", ["ss", "slat"])
def test_batched_cfg_computes_no_separate_unconditional_kv(stage_name, monkeypatch):
    """With batched CFG the unconditional K/V set is only ever used inside the batched pair, so it is not computed
    on its own (it was, before the K/V became lazy: 1.5 TFLOP and ~1.5 GB fp32 per object at full size)."""
    from conftest import fast_mini_config, run_ss_slat_each
    from fs3d_accel.pipeline import Pipeline
    from fs3d_analysis.data import load_shipped_samples
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=3, slat_steps=3), seed=0)
    flow = getattr(pipe, stage_name).flow
    seen: list[tuple[int, bool]] = []
    original = flow.precompute_cond_kv

    def record(c):
        seen.append((c.shape[0], bool((c == 0).all())))
        return original(c)

    monkeypatch.setattr(flow, "precompute_cond_kv", record)
    sample = load_shipped_samples()[0]
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    run_ss_slat_each(pipe, inputs, [RunOptions(batch_cfg=True, cache_cond_kv=True)])
    assert (2, False) in seen  # the batched (cond, uncond) pair
    assert (1, True) not in seen  # no unconditional set of its own
    assert len(seen) == len(set(seen))  # each set once per object
