"""The implicit-GEMM sparse conv (Triton) computes what the gather conv computes; the algorithm switch is scoped.

The kernel runs here through Triton's CPU interpreter (``TRITON_INTERPRET=1``), which executes the same kernel
code (loads, masks, ``tl.dot``) with NumPy; on a GPU it compiles to the CUDA kernel that the benchmarks time.
"""
from __future__ import annotations

import pytest
import torch
from conftest import random_coords

from fs3d_accel.model import sparse_conv_triton as sct
from fs3d_accel.model.sparse import SparseConv3d, SparseTensor, neighbour_table, use_conv_impl
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions

pytest.importorskip("triton")


@pytest.fixture
def interpreter():
    """On a CPU, conftest runs Triton kernels through the interpreter (set before triton is imported)."""
    if not sct.interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 before triton is imported (conftest sets it on machines "
                    "without CUDA); test_implicit_on_cuda covers the GPU")


def _conv(c_in: int, c_out: int, k: int = 3, seed: int = 0) -> SparseConv3d:
    torch.manual_seed(seed)
    conv = SparseConv3d(c_in, c_out, k)
    with torch.no_grad():
        conv.conv.bias.normal_()
    return conv


def _outputs(conv: SparseConv3d, x: SparseTensor) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for impl in ("gather", "implicit"):
            conv.impl = impl
            out[impl] = conv(x).feats
    conv.impl = "auto"
    return out


@pytest.mark.parametrize("k,c_in,c_out", [(3, 20, 24), (3, 5, 40), (5, 7, 3)])
def test_implicit_equals_gather_fp32(interpreter, k, c_in, c_out):
    """Same products summed in another order (C_in, C_out not multiples of the tile: masked edges), two batch
    elements, IEEE fp32 dot products: agreement to fp32 rounding."""
    coords = random_coords(7, batch=2, frac=0.3, seed=k)
    x = SparseTensor.create(torch.randn(len(coords), c_in), coords)
    out = _outputs(_conv(c_in, c_out, k), x)
    assert out["implicit"].shape == (len(coords), c_out) and out["implicit"].dtype == torch.float32
    torch.testing.assert_close(out["implicit"], out["gather"], atol=2e-6, rtol=1e-5)


def test_implicit_orientation_and_absent_neighbours(interpreter):
    """weight[:, 2, 1, 1, :] multiplies the neighbour at x+1; the last voxel has none there (a zero row)."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]], dtype=torch.int32)
    x = SparseTensor.create(torch.tensor([[1.0], [10.0], [100.0]]), coords)
    conv = SparseConv3d(1, 1, 3)
    conv.impl = "implicit"
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.bias.fill_(0.5)
        conv.conv.weight[0, 2, 1, 1, 0] = 1.0
        assert conv(x).feats[:, 0].tolist() == [10.5, 100.5, 0.5]


def test_implicit_half_precision_within_bound_of_fp32(interpreter):
    """fp16 features and weights, fp32 accumulation, output rounded to fp16: within fp16 rounding of fp32."""
    coords = random_coords(7, batch=1, frac=0.4)
    x = SparseTensor.create(torch.randn(len(coords), 32), coords)
    conv = _conv(32, 16)
    ref = _outputs(conv, x)["gather"]
    half = conv.half()
    half.impl = "implicit"
    with torch.no_grad():
        got = half(x.replace(x.feats.half())).feats
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=2e-3)


def test_implicit_rejects_bad_inputs(interpreter):
    coords = random_coords(5, batch=1, frac=0.4)
    x = SparseTensor.create(torch.randn(len(coords), 4), coords)
    table = neighbour_table(x, 3)
    w = torch.randn(6, 27 * 4)
    with pytest.raises(ValueError, match="share one dtype"):
        sct.implicit_gemm_subm_conv(x.feats, table, w.half(), None)
    with pytest.raises(ValueError, match="weight must be"):
        sct.implicit_gemm_subm_conv(x.feats, table, torch.randn(6, 26 * 4), None)
    with pytest.raises(ValueError, match="table must be"):
        sct.implicit_gemm_subm_conv(x.feats, table[:-1], w, None)


def test_implicit_needs_cuda_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    coords = random_coords(5, batch=1, frac=0.4)
    x = SparseTensor.create(torch.randn(len(coords), 4), coords)
    conv = SparseConv3d(4, 4, 3)
    conv.impl = "implicit"
    with torch.no_grad(), pytest.raises(RuntimeError, match="CUDA devices"):
        conv(x)
    with pytest.raises(ValueError, match="sparse_conv 'implicit'.*CUDA"):
        RunOptions(sparse_conv="implicit").check_device("cpu")


def test_use_conv_impl_overrides_auto_only_and_restores_after_errors():
    coords = random_coords(5, batch=1, frac=0.4)
    x = SparseTensor.create(torch.randn(len(coords), 4), coords)
    auto, fixed = SparseConv3d(4, 4, 3), SparseConv3d(4, 4, 3)
    fixed.impl = "gather"
    seen = []
    for conv in (auto, fixed):
        conv._scatter = lambda x, feats, _c=conv: seen.append(_c) or feats  # type: ignore[method-assign]
    with pytest.raises(KeyError):
        with use_conv_impl("scatter"):
            auto(x)
            fixed(x)  # its own impl wins over the block's choice
            raise KeyError("boom")
    assert seen == [auto]
    auto(x)  # the override is gone after the exception: "auto" is the class rule again (gather on CPU)
    assert seen == [auto]
    with pytest.raises(ValueError, match="sparse conv algorithm must be one of"):
        with use_conv_impl("im2col"):
            pass
    with pytest.raises(ValueError, match="unknown sparse_conv"):
        RunOptions(sparse_conv="im2col")


def test_auto_never_picks_the_kernel_without_backward_when_gradients_are_needed():
    """On CUDA "auto" is the implicit GEMM for inference, but a training step (gradients) gets gather-or-transform;
    naming "implicit" there is refused instead of silently cutting the weights out of the graph."""
    conv, cuda = SparseConv3d(64, 8, 3), torch.device("cuda")
    assert conv.algorithm(cuda) == "implicit"  # triton is importable (this module skips otherwise)
    assert conv.algorithm(cuda, needs_grad=True) == "transform"  # 64 >= 8 x 8: the gather-or-transform rule
    assert conv.algorithm(torch.device("cpu")) == "gather"
    with pytest.raises(ValueError, match="no backward"):
        conv.algorithm(cuda, impl="implicit", needs_grad=True)
    with use_conv_impl("implicit"), pytest.raises(ValueError, match="no backward"):
        conv.algorithm(cuda, needs_grad=True)
    coords = random_coords(5, batch=1, frac=0.4)
    x = SparseTensor.create(torch.randn(len(coords), 64), coords)
    conv.impl = "implicit"
    with pytest.raises(ValueError, match="no backward"):
        conv(x)  # the weights require grad and grad mode is on


def test_slat_flow_with_implicit_conv_option_matches_gather(interpreter):
    """``RunOptions.sparse_conv`` reaches every conv of a SLaT flow pass through ``network_context``: the pass with
    the implicit kernel equals the default pass to fp32 rounding."""
    pipe = Pipeline.from_config("mini", seed=0, device="cpu")
    coords = random_coords(pipe.config.slat_flow.resolution, batch=1, frac=0.0006, seed=3)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(coords), 8, generator=g)
    cond = torch.randn(1, 8, pipe.config.slat_flow.cond_channels, generator=g)
    tt = torch.full((1,), 400.0)
    calls = []
    real = sct.implicit_gemm_subm_conv

    def counted(*args):
        calls.append(1)
        return real(*args)

    with torch.no_grad():
        with RunOptions().network_context("cpu", "slat"):
            ref = pipe.slat.flow(feats, coords, tt, cond)
        sct.implicit_gemm_subm_conv, saved = counted, sct.implicit_gemm_subm_conv
        try:
            with RunOptions(sparse_conv="implicit").network_context("cpu", "slat"):
                got = pipe.slat.flow(feats, coords, tt, cond)
        finally:
            sct.implicit_gemm_subm_conv = saved
    n_convs = sum(isinstance(m, SparseConv3d) and m.kernel_size > 1 for m in pipe.slat.flow.modules())
    assert len(calls) == n_convs > 0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or sct.interpreting(), reason="needs CUDA, compiled Triton")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_implicit_on_cuda(dtype, atol):
    """The compiled kernel (autotuned tiles) against the gather conv on the GPU, at SLaT-like channel counts."""
    coords = random_coords(24, batch=2, frac=0.2).cuda()
    x = SparseTensor.create(torch.randn(len(coords), 128, device="cuda"), coords)
    conv = _conv(128, 96).cuda()
    ref = _outputs(conv, x)["gather"]
    conv = conv.to(dtype)
    conv.impl = "implicit"
    with torch.no_grad():
        got = conv(x.replace(x.feats.to(dtype))).feats
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=0.02)
