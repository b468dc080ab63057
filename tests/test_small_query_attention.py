"""The small-query attention path (``attention_kernels.small_query_attention``, ``RunOptions.small_query_attention``):
the same softmax attention as SDPA to rounding, taken only by unmasked calls with few queries, restored after errors,
validated, and through the mini SS sampler (whose layout stream has 4 queries) close to the fused-kernel run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fs3d_accel.model import attention_kernels as ak
from fs3d_accel.model.layers import attention, cross_attention
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions
from fs3d_analysis.data import load_shipped_samples

from conftest import fast_mini_config


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_equals_sdpa_to_rounding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) * 3 for n in (4, 300, 300))  # large logits: a peaked softmax
    torch.testing.assert_close(ak.small_query_attention(q, k, v), _sdpa(q, k, v), rtol=1e-5, atol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = ak.small_query_attention(qb, kb, vb)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 3, 16)
    exact = _sdpa(qb.float(), kb.float(), vb.float())  # the same bf16 inputs in fp32 math
    assert (out.float() - exact).abs().max() <= exact.abs().max() * 2 ** -8  # within bf16 output rounding


def test_autocast_keeps_fp32_scores_and_returns_sdpa_dtype():
    """Under autocast the products stay fp32 (autocast is off inside; it would recast them to bf16), the output has
    the dtype SDPA returns there, and large logits stay finite."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) for n in (4, 200, 200))
    q = q * 40  # logits far beyond bf16's fine range
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ak.small_query_attention(q, k, v)
        ref = _sdpa(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.isfinite(out).all()
    exact = _sdpa(q.double(), k.double(), v.double())
    assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + exact.abs().max() * 2 ** -8


def test_zero_queries_never_take_it_while_off(monkeypatch):
    monkeypatch.setattr(ak, "small_query_attention", lambda *a: pytest.fail("the path is off"))
    q, k = torch.randn(1, 0, 2, 8), torch.randn(1, 5, 2, 8)
    assert attention(q, k, k).shape == (1, 0, 2, 8)


def test_only_calls_with_few_queries_take_it(monkeypatch):
    taken = []
    real = ak.small_query_attention
    monkeypatch.setattr(ak, "small_query_attention", lambda q, k, v: taken.append(q.shape[1]) or real(q, k, v))
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 50, 2, 8, generator=g) for _ in range(2))
    few, many = torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 40, 2, 8, generator=g)
    attention(few, k, v)  # off by default
    with pytest.raises(RuntimeError, match="boom"):
        with ak.use_small_query_path(16):
            assert ak.current_small_query_limit() == 16
            out = cross_attention(few, (k, v))
            attention(many, k, v)  # 40 > 16: the fused kernel
            attention(few, k, v, mask=torch.ones(1, 1, 1, 50, dtype=torch.bool))  # masked: SDPA
            attention(few, k[:, :1], v[:, :1])  # one key: no kernel at all
            raise RuntimeError("boom")
    assert taken == [4] and ak.current_small_query_limit() == 0
    torch.testing.assert_close(out, _sdpa(few, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, True, 1.5, 65])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match="small_query_attention is a query count in \\[0, 64\\]"):
        RunOptions(small_query_attention=bad)
    if bad != 65:
        with pytest.raises(ValueError, match="max_queries must be an int >= 0"):
            with ak.use_small_query_path(bad):
                pass


def test_run_options_enter_the_path_in_ss_only():
    """The SS stage's layout stream is what the path is for: SLaT and the decoder keep their fused kernels."""
    opts = RunOptions(small_query_attention=8)
    for stage, limit in (("ss", 8), ("slat", 0), ("decode", 0)):
        with opts.network_context("cpu", stage):
            assert ak.current_small_query_limit() == limit, stage
    assert ak.current_small_query_limit() == 0
    with RunOptions().network_context("cpu", "ss"):
        assert ak.current_small_query_limit() == 0


def test_mini_ss_sampler_matches_the_fused_run():
    """fp32 mini pipeline: the layout stream's 4-query attention through the small-query path gives the same SS latents
    as SDPA up to fp32 rounding carried through the sampler; the shape stream (its queries are many) is unchanged."""
    sample = load_shipped_samples()[0]
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=3, slat_steps=2), seed=0)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    outs = []
    for opts in (RunOptions(batch_cfg=True, cache_cond_kv=True),
                 RunOptions(batch_cfg=True, cache_cond_kv=True, small_query_attention=16)):
        pipe.options = opts
        outs.append(pipe.run_ss(inputs, seed=0).latents)
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(outs[0][key], outs[1][key]) for key in outs[0])  # the path did run


def test_inside_the_compiled_ss_flow(cpu_compile):
    """The compiled SS flow (aot_eager on the CPU) takes the path without a graph break, and turning it on compiles a
    new graph instead of replaying the fused-kernel one (the limit is guarded)."""
    from torch._dynamo.utils import counters
    sample = load_shipped_samples()[0]
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    common = dict(batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_backend="aot_eager")
    outs, graphs = [], []
    for limit in (0, 16):
        pipe.options = RunOptions(small_query_attention=limit, **common)
        outs.append(pipe.run_ss(inputs, seed=0).latents)
        graphs.append(counters["stats"]["unique_graphs"])
    assert not [str(k) for k in counters["graph_break"] if "einsum" in str(k) or "small_query" in str(k)]
    assert graphs[1] > graphs[0] >= 1
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-4)


def test_flash2_kernel_equals_sdpa_and_is_taken_when_chosen(monkeypatch):
    """``small_query_kernel="sdpa-flash2"``: the same few-query calls go to SDPA's FlashAttention-2 backend instead of
    the fp32 matmuls (on the CPU SDPA's flash backend is the CPU kernel; same math), and the choice is restored."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (4, 300, 300))
    torch.testing.assert_close(ak.flash2_small_query_attention(q, k, v), _sdpa(q, k, v), rtol=1e-5, atol=1e-5)
    taken = []
    real = ak.flash2_small_query_attention
    monkeypatch.setattr(ak, "flash2_small_query_attention", lambda q, k, v: taken.append(q.shape[1]) or real(q, k, v))
    monkeypatch.setattr(ak, "small_query_attention", lambda *a: pytest.fail("the fp32-matmul kernel was not chosen"))
    with ak.use_small_query_path(16, ak.SMALL_QUERY_FA2):
        assert ak.current_small_query_kernel() == "sdpa-flash2"
        out = attention(q, k, v)
        attention(torch.randn(2, 40, 3, 16), k, v)  # 40 > 16 queries: the fused kernel
    assert taken == [4] and ak.current_small_query_kernel() == ak.SMALL_QUERY_MATMUL
    torch.testing.assert_close(out, _sdpa(q, k, v), rtol=1e-5, atol=1e-5)


def test_small_query_kernel_choice_is_validated_and_reaches_ss():
    with pytest.raises(ValueError, match="FlashAttention-2, which takes fp16 / bf16 CUDA tensors; precision 'fp32'"):
        RunOptions(small_query_attention=16, small_query_kernel="sdpa-flash2").check_device("cuda")
    RunOptions(small_query_attention=16, small_query_kernel="sdpa-flash2").check_device("cpu")  # the CPU flash kernel
    RunOptions(precision="bf16", small_query_attention=16, small_query_kernel="sdpa-flash2").check_device("cuda")
    with pytest.raises(ValueError, match="unknown small_query_kernel 'cudnn'"):
        RunOptions(small_query_attention=16, small_query_kernel="cudnn")
    with pytest.raises(ValueError, match="'sdpa-flash2' with small_query_attention=0 would never run"):
        RunOptions(small_query_kernel="sdpa-flash2")
    with pytest.raises(ValueError, match="small-query kernel must be one of"):
        with ak.use_small_query_path(4, "fa4"):
            pass
    opts = RunOptions(small_query_attention=8, small_query_kernel="sdpa-flash2")
    with opts.network_context("cpu", "ss"):
        assert (ak.current_small_query_limit(), ak.current_small_query_kernel()) == (8, "sdpa-flash2")
    with opts.network_context("cpu", "slat"):
        assert ak.current_small_query_limit() == 0


def test_flash2_kernel_inside_the_compiled_ss_flow(cpu_compile, monkeypatch):
    """The FA2 choice traces without a graph break in the compiled SS flow (aot_eager on the CPU) and gives the fused
    run's latents to fp32 rounding."""
    from torch._dynamo.utils import counters
    sample = load_shipped_samples()[0]
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    common = dict(batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_backend="aot_eager")
    counters.clear()
    outs, graphs, taken = [], [], []
    real = ak.flash2_small_query_attention
    monkeypatch.setattr(ak, "flash2_small_query_attention", lambda q, k, v: taken.append(q.shape[1]) or real(q, k, v))
    for extra in ({}, dict(small_query_attention=16, small_query_kernel="sdpa-flash2")):
        pipe.options = RunOptions(**common, **extra)
        outs.append(pipe.run_ss(inputs, seed=0).latents)
        graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[1] > graphs[0] >= 1 and taken and set(taken) == {4}  # a new graph, traced through the FA2 kernel
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention-2 is SDPA's CUDA flash backend)")
def test_flash2_kernel_on_cuda_matches_fp32_math_eager_and_compiled():
    """On the GPU, at the SS layout stream's shape (4 queries over 4,100 keys, bf16): SDPA's FlashAttention-2 backend
    gives fp32 math's attention within bf16 output rounding, eager and under inductor with CUDA graphs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16) for n in (4, 4100, 4100))
    exact = _sdpa(q.float(), k.float(), v.float())
    compiled = torch.compile(ak.flash2_small_query_attention, mode="reduce-overhead", dynamic=False)
    for fn in (ak.flash2_small_query_attention, compiled, compiled):  # each output checked before the next call
        out = fn(q, k, v)  # (a CUDA-graph replay reuses its output buffer)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        assert (out.float() - exact).abs().max() <= exact.abs().max() * 2 ** -7
