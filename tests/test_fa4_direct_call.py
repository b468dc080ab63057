"""``RunOptions.fa4_call="direct"`` (``attention_kernels.use_fa4_call``): FA4 reached through an operator registered
with ``torch.library.Library`` whose kernel calls FA4's forward function, instead of the ``custom_op``. On the CPU a
stand-in plays FA4's forward (SDPA), as in ``test_attention_kernel_option.py``; the GPU test compares the two calls
with the real FA4 where it is importable."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fs3d_accel.model import attention_kernels as ak
from fs3d_accel.model.layers import attention
from fs3d_accel.stages.options import RunOptions

from conftest import assert_same_ss_slat, light_bf16_pipe


def _sdpa_reference(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.fixture
def stand_ins(monkeypatch):
    """The three FA4 entries replaced by SDPA on the CPU; each records (path, Lq, Lk, tiles, seqused_k) per call."""
    calls = []

    def make(path):
        def fake(q, k, v, tiles=None, seqused_k=None):
            calls.append((path, q.shape[1], k.shape[1], tiles, None if seqused_k is None else seqused_k.tolist()))
            return _sdpa_reference(q, k, v)
        return fake
    monkeypatch.setattr(ak, "_flash_attn_cute_forward", make("custom-op"))
    monkeypatch.setattr(ak, "_flash_attn_cute_forward_direct", make("direct"))
    monkeypatch.setattr(ak, "_flash_attn_cute_forward_kernel", make("kernel"))
    return calls


def test_the_choice_is_checked_and_restored_after_errors():
    assert ak.current_fa4_call() == ak.FA4_CALL_CUSTOM_OP
    with pytest.raises(ValueError, match="the FA4 call must be one of"):
        with ak.use_fa4_call("fast"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with ak.use_fa4_call(ak.FA4_CALL_DIRECT):
            assert ak.current_fa4_call() == ak.FA4_CALL_DIRECT
            raise RuntimeError("boom")
    assert ak.current_fa4_call() == ak.FA4_CALL_CUSTOM_OP


def test_options_check_the_setting():
    with pytest.raises(ValueError, match="unknown fa4_call 'fast'"):
        RunOptions(attention_kernel=ak.FLASH_ATTN_CUTE, fa4_call="fast")
    with pytest.raises(ValueError, match="attention_kernel='sdpa' never calls it"):
        RunOptions(fa4_call="direct")
    opts = RunOptions(precision="bf16", attention_kernel=ak.FLASH_ATTN_CUTE, fa4_call="direct")
    with opts.network_context("cpu", "slat"):
        assert ak.current_fa4_call() == ak.FA4_CALL_DIRECT
    assert ak.current_fa4_call() == ak.FA4_CALL_CUSTOM_OP


def test_fa4s_mla_special_case_is_refused():
    """``flash_attn_func`` runs another kernel when the keys are the values at head dim 512: not the same call."""
    q, kv = torch.randn(1, 3, 2, 512), torch.randn(1, 4, 2, 512)
    with pytest.raises(ValueError, match="head dim 512"):
        ak._flash_attn_cute_forward_direct(q, kv, kv)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):  # distinct keys and values: only the device is wrong
        ak._flash_attn_cute_forward_direct(q, kv, kv.clone())


def test_the_direct_op_on_cpu_tensors_names_the_problem():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        torch.ops.fs3d.flash_attn_cute_direct(q, q, q)


def test_each_call_goes_through_the_chosen_operator_with_its_tiles_and_key_counts(stand_ins):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 16, generator=g, dtype=torch.bfloat16) for n in (5, 7, 7))
    tiles = ak.FlashAttnTiles(128, 96, False, True)
    counts = torch.tensor([7, 4])
    with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, tiles={"cross": tiles}):
        plain = attention(q, k, v)
        with ak.use_fa4_call(ak.FA4_CALL_DIRECT):
            direct = attention(q, k, v)
            attention(q, k, v, role="cross")
            attention(q, k, v, key_len=counts)
    assert torch.equal(direct, _sdpa_reference(q, k, v))  # the op hands the stand-in's output back unchanged
    assert stand_ins == [("custom-op", 5, 7, None, None), ("direct", 5, 7, None, None), ("direct", 5, 7, tiles, None),
                         ("direct", 5, 7, None, [7, 4])]


def test_the_flop_counter_counts_the_direct_op_like_the_custom_op(stand_ins):
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 7, 4, 16, dtype=torch.bfloat16)
    counts = []
    for call in ak.FA4_CALLS:
        with FlopCounterMode(display=False) as counter, ak.use_attention_kernel(ak.FLASH_ATTN_CUTE), \
                ak.use_fa4_call(call):
            attention(q, k, k)
        counts.append(counter.get_total_flops())
    assert counts == [4 * 2 * 4 * 5 * 7 * 16] * 3
    assert [c[0] for c in stand_ins] == list(ak.FA4_CALLS)


def test_no_gradient_through_the_direct_op(stand_ins):
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="computes no gradients"):
        torch.ops.fs3d.flash_attn_cute_direct(q, q, q)
    with torch.no_grad():  # inference: fine
        assert torch.equal(torch.ops.fs3d.flash_attn_cute_direct(q, q, q), _sdpa_reference(q, q, q))
    with torch.inference_mode():
        torch.ops.fs3d.flash_attn_cute_direct(q, q, q)
    assert [c[0] for c in stand_ins] == ["direct", "direct"]
    with pytest.raises(ValueError, match="computes no gradients"):
        torch.ops.fs3d.flash_attn_cute_kernel(q, q, q)



@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_the_direct_op_inside_the_compiled_flows(stand_ins, cpu_compile, backend):
    """The direct op traced into the compiled SS flow and SLaT torso (through its fake kernel, without a graph break);
    the latents equal the custom op's, bit for bit with the eager backend, and only the direct path ran."""
    from torch._dynamo.utils import counters
    pytest.importorskip("trimesh", reason="the shipped samples load through the corpus module, which needs trimesh")
    from fs3d_analysis.data import load_shipped_samples
    sample = load_shipped_samples()[0]
    pipe = light_bf16_pipe(ss_steps=2, slat_steps=2)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    common = dict(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                  compile_backend=backend, attention_kernel=ak.FLASH_ATTN_CUTE)
    outs, paths = [], []
    for call in ak.FA4_CALLS:
        stand_ins.clear()
        pipe.options = RunOptions(fa4_call=call, **common)
        ss = pipe.run_ss(inputs, seed=0)
        outs.append((ss, pipe.run_slat(inputs, ss, seed=0)))
        paths.append({c[0] for c in stand_ins})
    assert paths == [{"custom-op"}, {"direct"}, {"kernel"}]
    breaks = [str(k) for k in counters["graph_break"]]
    assert not [b for b in breaks if "flash_attn_cute" in b], breaks
    assert_same_ss_slat(outs[0], outs[1])
    assert_same_ss_slat(outs[0], outs[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_direct_call_gives_the_custom_ops_output_on_the_gpu():
    why = ak.flash_attn_cute_unavailable(torch.device("cuda"))
    if why:
        pytest.skip(why)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16) for n in (300, 517, 517))
    tiles = ak.FlashAttnTiles(128, 128)
    counts = torch.tensor([517, 300], device="cuda", dtype=torch.int32)
    for t, used in ((None, None), (tiles, None), (None, counts)):
        with torch.no_grad(), ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
            a = ak.flash_attn_cute_tiled(q, k, v, t, seqused_k=used)
            with ak.use_fa4_call(ak.FA4_CALL_DIRECT):
                b = ak.flash_attn_cute_tiled(q, k, v, t, seqused_k=used)
            with ak.use_fa4_call(ak.FA4_CALL_KERNEL):
                c = [ak.flash_attn_cute_tiled(q, k, v, t, seqused_k=used) for _ in range(2)]  # primes, then launches
        assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype, (t, used)
        for x in c:
            assert torch.equal(a, x) and a.stride() == x.stride() and a.dtype == x.dtype, (t, used)
