"""The implicit-GEMM sparse conv (Triton) computes what the gather conv computes; the algorithm switch is scoped.

On a machine without CUDA the kernel runs through Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest),
which executes the same kernel code (loads, masks, ``tl.dot``) with NumPy; with CUDA the same tests run the compiled
kernel on the GPU. (The interpreter gets bf16 ``tl.dot`` wrong, so bf16 is checked on the GPU only.)
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
def device() -> torch.device:
    """Where the kernel runs: the GPU when there is one, else the CPU through the interpreter (conftest)."""
    if torch.cuda.is_available() and not sct.interpreting():
        return torch.device("cuda")
    if not sct.interpreting():
        pytest.skip("no CUDA, and TRITON_INTERPRET was not set before triton was imported (conftest sets it)")
    return torch.device("cpu")


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
def test_implicit_equals_gather_fp32(device, k, c_in, c_out):
    """Same products summed in another order (C_in, C_out not multiples of the tile: masked edges), two batch
    elements, IEEE fp32 dot products: agreement to fp32 rounding."""
    coords = random_coords(7, batch=2, frac=0.3, seed=k).to(device)
    x = SparseTensor.create(torch.randn(len(coords), c_in, device=device), coords)
    out = _outputs(_conv(c_in, c_out, k).to(device), x)
    assert out["implicit"].shape == (len(coords), c_out) and out["implicit"].dtype == torch.float32
    torch.testing.assert_close(out["implicit"], out["gather"], atol=2e-6, rtol=1e-5)


def test_implicit_orientation_and_absent_neighbours(device):
    """weight[:, 2, 1, 1, :] multiplies the neighbour at x+1; the last voxel has none there (a zero row)."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]], dtype=torch.int32, device=device)
    x = SparseTensor.create(torch.tensor([[1.0], [10.0], [100.0]], device=device), coords)
    conv = SparseConv3d(1, 1, 3).to(device)
    conv.impl = "implicit"
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.bias.fill_(0.5)
        conv.conv.weight[0, 2, 1, 1, 0] = 1.0
        assert conv(x).feats[:, 0].tolist() == [10.5, 100.5, 0.5]


def test_implicit_without_bias_and_with_no_rows(device):
    """The kernel's no-bias path is the biased result minus the bias; zero rows give an empty (0, C_out) output."""
    coords = random_coords(6, batch=1, frac=0.4).to(device)
    x = SparseTensor.create(torch.randn(len(coords), 9, device=device), coords)
    conv = _conv(9, 11).to(device)
    table, w = neighbour_table(x, 3), conv.conv.weight.detach().reshape(11, -1)
    b = conv.conv.bias.detach()
    with_bias = sct.implicit_gemm_subm_conv(x.feats, table, w, b)
    torch.testing.assert_close(sct.implicit_gemm_subm_conv(x.feats, table, w, None), with_bias - b,
                               atol=2e-6, rtol=1e-5)
    empty = sct.implicit_gemm_subm_conv(x.feats[:0], table[:0], w, b)
    assert empty.shape == (0, 11) and empty.dtype == torch.float32


def test_implicit_follows_autocast_like_the_cublas_algorithms(device):
    """Under autocast the gather conv's matmul runs in the autocast dtype and returns it; so does the implicit one
    (fp32 features and weights cast to fp16 first), with the same values to fp16 rounding."""
    coords = random_coords(6, batch=1, frac=0.4).to(device)
    x = SparseTensor.create(torch.randn(len(coords), 16, device=device), coords)
    conv = _conv(16, 8).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        out = _outputs(conv, x)
    assert out["gather"].dtype == out["implicit"].dtype == torch.float16
    torch.testing.assert_close(out["implicit"].float(), out["gather"].float(), atol=2e-3, rtol=2e-3)


def test_implicit_half_precision_within_bound_of_fp32(device):
    """fp16 features and weights, fp32 accumulation, output rounded to fp16: within fp16 rounding of fp32."""
    coords = random_coords(7, batch=1, frac=0.4).to(device)
    x = SparseTensor.create(torch.randn(len(coords), 32, device=device), coords)
    conv = _conv(32, 16).to(device)
    ref = _outputs(conv, x)["gather"]
    half = conv.half()
    half.impl = "implicit"
    with torch.no_grad():
        got = half(x.replace(x.feats.half())).feats
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=2e-3)


def test_implicit_rejects_bad_inputs(device):
    coords = random_coords(5, batch=1, frac=0.4).to(device)
    x = SparseTensor.create(torch.randn(len(coords), 4, device=device), coords)
    table = neighbour_table(x, 3)
    w = torch.randn(6, 27 * 4, device=device)
    with pytest.raises(ValueError, match="share one dtype"):
        sct.implicit_gemm_subm_conv(x.feats, table, w.half(), None)
    with pytest.raises(ValueError, match="weight must be"):
        sct.implicit_gemm_subm_conv(x.feats, table, torch.randn(6, 26 * 4, device=device), None)
    with pytest.raises(ValueError, match="table must be"):
        sct.implicit_gemm_subm_conv(x.feats, table[:-1], w, None)
    with pytest.raises(ValueError, match="fp16 / bf16 / fp32"):
        sct.implicit_gemm_subm_conv(x.feats.double(), table, w.double(), None)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="one device"):
            sct.implicit_gemm_subm_conv(x.feats, table.cpu(), w, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
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
    conv, cuda, bf16 = SparseConv3d(64, 8, 3), torch.device("cuda"), torch.bfloat16
    if sct.triton_unavailable(cuda) is None:  # on a CPU machine: triton importable, no device to ask
        assert conv.algorithm(cuda, dtype=bf16) == conv.algorithm(cuda, dtype=torch.float16) == "implicit"
    assert conv.algorithm(cuda, dtype=bf16, needs_grad=True) == "transform"  # 64 >= 8 x 8: gather-or-transform
    assert conv.algorithm(cuda, dtype=torch.float32) == "transform"  # fp32 never measured: cuBLAS
    assert conv.algorithm(torch.device("cpu"), dtype=bf16) == "gather"
    with pytest.raises(ValueError, match="no backward"):
        conv.algorithm(cuda, dtype=bf16, impl="implicit", needs_grad=True)
    with use_conv_impl("implicit"), pytest.raises(ValueError, match="no backward"):
        conv.algorithm(cuda, dtype=bf16, needs_grad=True)
    coords = random_coords(5, batch=1, frac=0.4)
    x = SparseTensor.create(torch.randn(len(coords), 64), coords)
    conv.impl = "implicit"
    with pytest.raises(ValueError, match="no backward"):
        conv(x)  # the weights require grad and grad mode is on


def test_slat_flow_with_implicit_conv_option_matches_gather(device):
    """``RunOptions.sparse_conv`` reaches every conv of a SLaT flow pass through ``network_context``: the pass with
    the implicit kernel equals the gather pass to fp32 rounding. Every parameter gets random values first: a fresh
    model zero-initialises each res-block's second conv and the output layer, which would hide any conv error."""
    pipe = Pipeline.from_config("mini", seed=0, device="cpu").to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.slat.flow.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    coords = random_coords(6, batch=1, frac=0.5, seed=3).to(device)  # a dense blob: most voxels have neighbours
    feats = torch.randn(len(coords), 8, generator=g).to(device)
    cond = torch.randn(1, 8, pipe.config.slat_flow.cond_channels, generator=g).to(device)
    tt = torch.full((1,), 400.0, device=device)
    calls = []
    real = sct.implicit_gemm_subm_conv

    def counted(*args):
        calls.append(1)
        return real(*args)

    with torch.no_grad():
        with RunOptions(sparse_conv="gather").network_context(device, "slat"):
            ref = pipe.slat.flow(feats, coords, tt, cond)
        sct.implicit_gemm_subm_conv, saved = counted, sct.implicit_gemm_subm_conv
        try:
            with RunOptions(sparse_conv="implicit").network_context(device, "slat"):
                got = pipe.slat.flow(feats, coords, tt, cond)
        finally:
            sct.implicit_gemm_subm_conv = saved
    n_convs = sum(isinstance(m, SparseConv3d) and m.kernel_size > 1 for m in pipe.slat.flow.modules())
    assert len(calls) == n_convs > 0
    assert ref.abs().mean() > 1e-3  # the output depends on the convs (not the zero of an untrained output layer)
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


# ----------------------------------------------------------------------------------------------
# The tiled kernel: rows sorted by their neighbours, each tile skipping the offsets none of its rows has
# ----------------------------------------------------------------------------------------------
def _surface_coords(device) -> torch.Tensor:
    """The voxels of two hollow boxes (a surface: every row lacks some neighbours, and sorted tiles can skip some),
    two batch elements, (N, 4) int32."""
    r = torch.arange(12)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    shell = g[((g == 0) | (g == 11)).any(1)]
    coords = torch.cat([torch.cat([torch.full((len(shell), 1), b), shell], 1) for b in (0, 1)])
    return coords.int().to(device)


def test_neighbour_tiles_layout_invariants():
    """perm is a permutation of the rows (then padding), table_t is the table in that order, and each tile lists the
    offsets at which some row of it has a neighbour first, ascending, then the others; without skipping, every
    offset in table order."""
    coords = _surface_coords("cpu")
    x = SparseTensor.create(torch.zeros(len(coords), 1), coords)
    table = neighbour_table(x, 3)
    n = len(table)
    for skip in (True, False):
        t = sct.neighbour_tiles(table, skip=skip)
        n_pad = t.table_t.shape[1]
        assert n_pad % max(sct.TILE_ROWS) == 0 and n_pad >= n
        assert t.perm.dtype == t.table_t.dtype == torch.int32
        assert torch.equal(t.perm[:n].long().sort().values, torch.arange(n)) and bool((t.perm[n:] == n).all())
        assert torch.equal(t.table_t[:, :n].t().long(), table[t.perm[:n].long()])
        assert bool((t.table_t[:, n:] == n).all())
        if not skip:
            assert torch.equal(t.perm[:n].long(), torch.arange(n))
        for h in sct.TILE_ROWS:
            has = (t.table_t < n).t().reshape(-1, h, 27).any(1) if skip else torch.ones(n_pad // h, 27, dtype=torch.bool)
            assert torch.equal(t.counts[h].long(), has.sum(1))
            for tile in range(n_pad // h):
                c = int(t.counts[h][tile])
                listed = t.offsets[h][tile].long()
                assert sorted(listed.tolist()) == list(range(27))
                assert torch.equal(listed[:c], torch.nonzero(has[tile])[:, 0])
        if skip:
            # the point of sorting: on a surface, fewer (tile, offset) pairs remain than in coordinate order
            unsorted = sct.neighbour_tiles(table, skip=False)
            in_order = (unsorted.table_t < n).t().reshape(-1, 64, 27).any(1).float().mean()
            assert float(t.work_fraction(64)) < 0.9 * float(in_order)


def test_neighbour_tiles_rejects_bad_inputs():
    table = torch.zeros(5, 27, dtype=torch.long)
    with pytest.raises(ValueError, match=r"table must be \(N, K3\)"):
        sct.neighbour_tiles(table[0])
    with pytest.raises(ValueError, match="powers of two"):
        sct.neighbour_tiles(table, heights=(48,))
    with pytest.raises(ValueError, match="powers of two"):
        sct.neighbour_tiles(table, heights=())
    with pytest.raises(TypeError, match="integer row indices, got torch.float32"):
        sct.neighbour_tiles(table.float())
    with pytest.raises(ValueError, match="K3 <= 62"):
        sct.neighbour_tiles(torch.zeros(5, 125, dtype=torch.long))
    assert sct.neighbour_tiles(torch.zeros(5, 125, dtype=torch.long), skip=False).k3 == 125


@pytest.mark.parametrize("height", sct.TILE_ROWS)
def test_tiled_kernel_reads_the_lists_of_its_tile_height(device, monkeypatch, height):
    """Each tile height's lists (``TILE_A`` or the other, chosen by BLOCK_M) give the gather conv's values: in the
    interpreter BLOCK_M is set to each height in turn (on the GPU the autotuner picks one)."""
    if device.type == "cuda":
        pytest.skip("the interpreter's tile is what is set here; on the GPU the autotuner picks the height")
    monkeypatch.setattr(sct, "_INTERPRETER_TILED_TILE", (height, 32, 16))
    coords = _surface_coords(device)
    x = SparseTensor.create(torch.randn(len(coords), 12, device=device), coords)
    conv = _conv(12, 20).to(device)
    out = {}
    with torch.no_grad():
        for impl in ("gather", "implicit-skip", "implicit-skip-nested"):
            conv.impl = impl
            out[impl] = conv(x).feats
    tiles = x.cache[("subm_tiles", 3, True)]
    assert float(tiles.work_fraction(height)) < 1
    for impl in ("implicit-skip", "implicit-skip-nested"):
        torch.testing.assert_close(out[impl], out["gather"], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("c_in,c_out", [(20, 24), (5, 40)])
def test_tiled_kernels_equal_each_other_and_the_implicit_conv(device, c_in, c_out):
    """The three tiled variants add the same products in the same offset order per row (skipping leaves out only
    exact zeros): on the GPU the skipping and the flat kernel agree exactly (the interpreter's NumPy matmuls may round
    a row differently at another position in its tile), and all agree with the original kernel and with the gather
    conv to fp32 rounding."""
    coords = _surface_coords(device)
    x = SparseTensor.create(torch.randn(len(coords), c_in, device=device), coords)
    conv = _conv(c_in, c_out).to(device)
    out = {}
    with torch.no_grad():
        for impl in ("gather", "implicit", "implicit-skip", "implicit-skip-nested", "implicit-flat"):
            conv.impl = impl
            out[impl] = conv(x).feats
    assert float(x.cache[("subm_tiles", 3, True)].work_fraction(64)) < 1  # skipping did happen
    if device.type == "cuda":  # one kernel, one autotuned tile shape; only the row order and the skipped zeros differ
        assert torch.equal(out["implicit-skip"], out["implicit-flat"])
    for impl in ("implicit-skip", "implicit-skip-nested", "implicit-flat"):
        torch.testing.assert_close(out[impl], out["implicit"], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out[impl], out["gather"], atol=2e-6, rtol=1e-5)


def test_tiled_kernel_rejects_bad_inputs(device):
    coords = _surface_coords(device)
    x = SparseTensor.create(torch.randn(len(coords), 4, device=device), coords)
    tiles = sct.neighbour_tiles(neighbour_table(x, 3))
    w = torch.randn(6, 27 * 4, device=device)
    with pytest.raises(ValueError, match="the neighbour tiles read .* feature rows, the features have"):
        sct.implicit_gemm_subm_conv_tiled(x.feats[:-1], tiles, w, None)
    with pytest.raises(ValueError, match="tile heights"):
        sct.implicit_gemm_subm_conv_tiled(x.feats, sct.neighbour_tiles(neighbour_table(x, 3), heights=(64,)), w, None)
    with pytest.raises(ValueError, match="weight must be"):
        sct.implicit_gemm_subm_conv_tiled(x.feats, tiles, torch.randn(6, 26 * 4, device=device), None)
    with pytest.raises(ValueError, match="share one dtype"):
        sct.implicit_gemm_subm_conv_tiled(x.feats, tiles, w.half(), None)
    empty = sct.implicit_gemm_subm_conv_tiled(x.feats[:0], sct.neighbour_tiles(neighbour_table(x, 3)[:0]), w, None)
    assert empty.shape == (0, 6)


def test_tiled_impls_refused_for_training():
    conv = _conv(4, 4)
    for impl in ("implicit-skip", "implicit-skip-nested", "implicit-flat"):
        with pytest.raises(ValueError, match=f"the '{impl}' sparse conv .Triton. has no backward"):
            conv.algorithm(torch.device("cuda"), dtype=torch.bfloat16, impl=impl, needs_grad=True)


def test_tuned_choices_name_the_chosen_tile_per_channel_pair(device):
    """What the sweep records: after a CUDA call, the implicit kernel's choice for its (C_in, C_out, K3) key; the
    interpreter tunes nothing, so there it is empty. Every tile-shape list holds only shapes the kernels can take."""
    for configs in (sct._CUDA_CONFIGS, sct._CUDA_TILED_CONFIGS):
        assert len(set(configs)) == len(configs)
        for m, n, k, warps, stages in configs:
            assert all(v > 0 and v & (v - 1) == 0 for v in (m, n, k, warps)) and stages >= 1
    assert all(cfg[0] in sct.TILE_ROWS for cfg in sct._CUDA_TILED_CONFIGS)
    coords = random_coords(6, batch=1, frac=0.4, seed=3).to(device)
    x = SparseTensor.create(torch.randn(len(coords), 16, device=device), coords)
    sct.implicit_gemm_subm_conv(x.feats, neighbour_table(x, 3), torch.randn(8, 27 * 16, device=device), None)
    choices = sct.tuned_choices()
    if device.type == "cpu":
        assert choices == {}
    else:
        import ast
        chosen = [cfg for key, cfg in choices["implicit"].items() if ast.literal_eval(key)[:3] == (16, 8, 27)]
        shapes = {f"BLOCK_M: {m}, BLOCK_N: {n}, BLOCK_K: {k}, num_warps: {w}" for m, n, k, w, _ in sct._CUDA_CONFIGS}
        assert len(chosen) == 1 and any(shape in chosen[0] for shape in shapes), chosen

