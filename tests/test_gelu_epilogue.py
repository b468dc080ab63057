"""``RunOptions.gelu_epilogue`` / ``layers.use_gelu_epilogue``: the transformer MLP's first Linear + tanh-GELU as one
cuBLASLt GEMM with a GELU epilogue. Off by default, restored after errors, validated, never taken on a CPU (where
``torch._addmm_activation`` computes the exact GELU, not the model's tanh one), and on the GPU equal to the two-step
MLP to rounding, eager and compiled."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fs3d_accel.model.layers import FeedForwardNet, current_gelu_epilogue, use_gelu_epilogue
from fs3d_accel.stages.options import RunOptions


def test_off_by_default_restored_after_errors_and_validated():
    assert current_gelu_epilogue() is False and RunOptions().gelu_epilogue is False
    with pytest.raises(RuntimeError, match="boom"):
        with use_gelu_epilogue(True):
            assert current_gelu_epilogue() is True
            raise RuntimeError("boom")
    assert current_gelu_epilogue() is False
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="use_gelu_epilogue takes a bool"):
            with use_gelu_epilogue(bad):
                pass
        with pytest.raises(ValueError, match="gelu_epilogue is a bool"):
            RunOptions(gelu_epilogue=bad)


def test_run_options_enter_it_for_every_stage():
    opts = RunOptions(gelu_epilogue=True)
    for stage in ("ss", "slat", "decode"):
        with opts.network_context("cpu", stage):
            assert current_gelu_epilogue() is True, stage
    assert current_gelu_epilogue() is False


def test_epilogue_sites_choose_the_stages_and_are_validated():
    """``gelu_epilogue_sites`` keeps the epilogue to the stages named (session 17: SS only, since SLaT and the mesh
    decoder meet a new token count, and cuBLASLt's first-call host cost, with every object)."""
    opts = RunOptions(precision="bf16", gelu_epilogue=True, gelu_epilogue_sites=("ss",))
    seen = {}
    for stage in ("ss", "slat", "decode"):
        with opts.network_context("cpu", stage):
            seen[stage] = current_gelu_epilogue()
    assert seen == {"ss": True, "slat": False, "decode": False}
    assert not current_gelu_epilogue()
    for bad in (("ss", "mesh"), (), "ss", ["ss"], ("ss", "ss"), (["ss"],)):
        with pytest.raises(ValueError, match="gelu_epilogue_sites is a non-empty tuple of distinct stages"):
            RunOptions(precision="bf16", gelu_epilogue=True, gelu_epilogue_sites=bad)
    # one spelling per set: the order given does not make another setting
    reordered = RunOptions(precision="bf16", gelu_epilogue=True, gelu_epilogue_sites=("slat", "ss"))
    assert reordered.gelu_epilogue_sites == ("ss", "slat")
    assert reordered == RunOptions(precision="bf16", gelu_epilogue=True, gelu_epilogue_sites=("ss", "slat"))
    with pytest.raises(ValueError, match="gelu_epilogue is off: they change nothing"):
        RunOptions(precision="bf16", gelu_epilogue_sites=("ss",))


def test_cpu_never_takes_the_fused_call(monkeypatch):
    """On a CPU ``_addmm_activation(use_gelu=True)`` is the exact (erf) GELU, not the model's: the MLP must keep its two
    steps there, and give the same bits with the switch on."""
    cpu_fused = torch._addmm_activation(torch.zeros(3), torch.ones(1, 2), torch.ones(2, 3), use_gelu=True)
    assert torch.equal(cpu_fused, F.gelu(torch.full((1, 3), 2.0)))  # erf GELU: why the CPU is excluded
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("fused call taken on a CPU"))
    torch.manual_seed(0)
    net = FeedForwardNet(16).bfloat16()
    x = torch.randn(2, 5, 16).bfloat16()
    off = net(x)
    with use_gelu_epilogue(True):
        assert torch.equal(net(x), off)


def test_flop_counter_counts_the_fused_gemm():
    """FlopCounterMode counts ``_addmm_activation`` as it counts ``addmm`` (2 M K N), so MFU built on FLOP counts does
    not lose the MLPs that run fused."""
    from torch.utils.flop_counter import FlopCounterMode
    x, w, b = torch.randn(8, 64), torch.randn(128, 64), torch.randn(128)
    with FlopCounterMode(display=False) as fused:
        torch._addmm_activation(b, x, w.t(), use_gelu=True)
    with FlopCounterMode(display=False) as plain:
        torch.addmm(b, x, w.t())
    assert fused.get_total_flops() == plain.get_total_flops() == 2 * 8 * 64 * 128


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuBLASLt's GELU epilogue)")


@cuda
def test_cuda_epilogue_is_the_tanh_gelu():
    """fp32 on the GPU: the fused call matches tanh-GELU to fp32 rounding and differs from the erf GELU by more."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, w, b = (torch.randn(*s, device="cuda", generator=g) for s in ((64, 256), (512, 256), (512,)))
    # no TF32 in these fp32 GEMMs (the public switch: monkeypatching ``matmul.allow_tf32`` fails to undo on
    # torch 2.11, whose cuBLAS module serves that name through __getattr__)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
        pre = torch.addmm(b, x, w.t())
    finally:
        torch.set_float32_matmul_precision(before)
    to_tanh = (fused - F.gelu(pre, approximate="tanh")).abs().max().item()
    to_erf = (fused - F.gelu(pre)).abs().max().item()
    assert to_tanh < 1e-4 < to_erf, (to_tanh, to_erf)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_cuda_mlp_with_the_epilogue_matches_the_two_steps(dtype):
    """A transformer MLP of the full model's width at the SS layout stream's 8 rows and a shape-stream-like 1,024 rows:
    the fused path is taken, and equals the two-step MLP within half-precision rounding, eager and compiled."""
    torch.manual_seed(0)
    net = FeedForwardNet(1024).cuda().to(dtype)
    taken = []
    real = torch._addmm_activation
    for rows in (8, 1024):
        x = torch.randn(1, rows, 1024, device="cuda", dtype=dtype)
        exact = net.float()(x.float())
        net.to(dtype)
        two_step = net(x)
        compiled = torch.compile(net, dynamic=False)
        with use_gelu_epilogue(True):
            torch._addmm_activation = lambda *a, **k: taken.append(rows) or real(*a, **k)
            try:
                fused = net(x)
            finally:
                torch._addmm_activation = real
            from torch._inductor.utils import run_and_get_code
            fused_compiled, code = run_and_get_code(compiled, x)
            assert "_addmm_activation" in "\n".join(code)  # inductor keeps the fused call (one extern kernel)
        scale = exact.abs().max()
        for out in (fused, fused_compiled):
            assert out.dtype == dtype and out.shape == x.shape
            err = (out.float() - exact).abs().max()
            assert err <= 2 * (two_step.float() - exact).abs().max() + scale * 2 ** -8, (rows, err)
    assert taken == [8, 1024]


@cuda
def test_cuda_keeps_the_two_steps_where_autograd_records(monkeypatch):
    """``_addmm_activation`` has no derivative: with grad enabled and trainable weights the MLP keeps its two steps, so
    a backward pass still works with the switch on."""
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("fused call taken under autograd"))
    net = FeedForwardNet(64).cuda().bfloat16()
    x = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    with use_gelu_epilogue(True):
        net(x).float().sum().backward()
        net.mlp[0].weight.requires_grad_(False)  # a trainable bias alone also needs the two steps
        net(x).float().sum().backward()
    assert net.mlp[0].weight.grad is not None and net.mlp[0].bias.grad is not None


@cuda
@torch.no_grad()
def test_cuda_keeps_the_two_steps_where_module_hooks_sit():
    """A hook on the MLP's Linear or GELU (the per-module profilers put one on every module) would never fire for the
    fused call: the MLP keeps its two steps there and the hooks see them."""
    net = FeedForwardNet(64).cuda().bfloat16()
    x = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    seen = []
    for i in (0, 1):
        handle = net.mlp[i].register_forward_hook(lambda m, a, o, _i=i: seen.append(_i))
        try:
            with use_gelu_epilogue(True):
                net(x)
        finally:
            handle.remove()
    assert seen == [0, 1]
