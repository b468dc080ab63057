"""The attention-kernel switch (``model/attention_kernels.py``, ``RunOptions.attention_kernel``): validation,
the context restored after errors, and every unmasked attention of the SS and SLaT samplers routed through
the FlashAttention-4 custom op while it is selected (a CPU stand-in plays FA4 here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fs3d_accel.model import attention_kernels as ak
from fs3d_accel.model.layers import attention, cross_attention
from fs3d_accel.stages.options import KERNEL_ROLES, RunOptions
from fs3d_analysis.data import load_shipped_samples

from conftest import assert_same_ss_slat, light_bf16_pipe, run_ss_slat_each


def _sdpa_reference(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class _Calls(list):
    """(Lq, Lk) of every stand-in call; ``tiles`` holds each call's FA4 tiles (None: FA4's own table)."""

    def __init__(self) -> None:
        super().__init__()
        self.tiles: list[ak.FlashAttnTiles | None] = []

    def clear(self) -> None:
        super().clear()
        self.tiles.clear()


@pytest.fixture
def stand_in(monkeypatch):
    """FA4 replaced by SDPA on the CPU; records the (Lq, Lk) and the tiles of every call."""
    calls = _Calls()

    def fake(q, k, v, tiles=None):
        calls.append((q.shape[1], k.shape[1]))
        calls.tiles.append(tiles)
        return _sdpa_reference(q, k, v)
    monkeypatch.setattr(ak, "_flash_attn_cute_forward", fake)
    return calls


def test_unknown_kernel_rejected():
    with pytest.raises(ValueError, match="unknown attention_kernel 'fa9'"):
        RunOptions(attention_kernel="fa9")
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        with ak.use_attention_kernel("fa9"):
            pass


def test_flash_kernel_refused_on_cpu_with_the_reason():
    opts = RunOptions(precision="bf16", attention_kernel=ak.FLASH_ATTN_CUTE)
    with pytest.raises(ValueError, match="runs on CUDA devices"):
        opts.check_device("cpu")


def test_context_restored_after_an_exception():
    assert ak.current_attention_kernel() == ak.SDPA
    with pytest.raises(RuntimeError, match="boom"):
        with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
            assert ak.current_attention_kernel() == ak.FLASH_ATTN_CUTE
            raise RuntimeError("boom")
    assert ak.current_attention_kernel() == ak.SDPA


def test_real_kernel_on_cpu_tensors_names_the_problem():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ak.flash_attn_cute(q, q, q)


def test_attention_dispatch(stand_in):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 16, generator=g, dtype=torch.bfloat16) for n in (5, 7, 7))
    with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
        out = attention(q, k, v)
        attention(q.float(), k.float(), v.float())  # fp32: stays on SDPA
        attention(q, k, v, mask=torch.ones(2, 1, 1, 7, dtype=torch.bool))  # masked: stays on SDPA
    attention(q, k, v)  # outside the context: SDPA
    assert stand_in == [(5, 7)]
    assert torch.equal(out, _sdpa_reference(q, k, v))


def test_samplers_route_every_unmasked_attention(stand_in):
    """bf16 mini pipeline, both samplers: with the kernel selected, the results equal the SDPA run bit for bit
    (the stand-in is SDPA) and the stand-in saw self- and cross-attention calls of both stages."""
    sample = load_shipped_samples()[0]
    pipe = light_bf16_pipe(ss_steps=2, slat_steps=2)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    base = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True)
    (reference,) = run_ss_slat_each(pipe, inputs, [base])
    assert stand_in == []
    routed = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, attention_kernel=ak.FLASH_ATTN_CUTE)
    pipe.options = routed
    ss = pipe.run_ss(inputs, seed=0)
    ss_calls = len(stand_in)
    assert_same_ss_slat(reference, (ss, pipe.run_slat(inputs, ss, seed=0)))
    shape_tokens = pipe.config.ss_flow.num_shape_tokens
    ss_seen, slat_seen = stand_in[:ss_calls], stand_in[ss_calls:]
    assert (shape_tokens, shape_tokens) in ss_seen  # SS shape-stream self-attention
    assert any(lq == shape_tokens and lk != shape_tokens for lq, lk in ss_seen)  # SS cross-attention
    cond_tokens = {lk for lq, lk in ss_seen if lq == shape_tokens and lk != shape_tokens}
    assert any(lq == lk for lq, lk in slat_seen)  # SLaT self-attention
    assert any(lq != lk for lq, lk in slat_seen)  # SLaT cross-attention
    assert cond_tokens and slat_seen
    assert ak.current_attention_kernel() == ak.SDPA


def test_samplers_route_only_the_chosen_sites(stand_in):
    """Sites ("ss.cross",): every routed call is an SS cross-attention (shape or layout queries over the
    condition tokens), none is self-attention or SLaT; latents equal the SDPA run bit for bit."""
    sample = load_shipped_samples()[0]
    pipe = light_bf16_pipe(ss_steps=2, slat_steps=2)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    base = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True)
    routed = RunOptions(precision="bf16", batch_cfg=True, cache_cond_kv=True, attention_kernel=ak.FLASH_ATTN_CUTE,
                        attention_kernel_sites=("ss.cross",))
    assert_same_ss_slat(*run_ss_slat_each(pipe, inputs, [base, routed]))
    cond_tokens = {lk for _, lk in stand_in}
    assert len(cond_tokens) == 1 and stand_in  # one condition length: only cross-attention was routed
    shape_tokens = pipe.config.ss_flow.num_shape_tokens
    assert cond_tokens != {shape_tokens}
    assert {lq for lq, _ in stand_in} >= {shape_tokens}


def test_kernel_per_role(stand_in):
    """Only the selected roles go to the kernel; cross_attention calls are "cross", plain calls "self"."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=torch.bfloat16) for n in (3, 6, 6))
    with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, roles=("cross",)):
        assert ak.current_attention_kernel("self") == ak.SDPA
        assert ak.current_attention_kernel("cross") == ak.FLASH_ATTN_CUTE
        attention(q, q, q)
        assert stand_in == []
        out = cross_attention(q, (k, v))
        assert stand_in == [(3, 6)]
        attention(q, k, v, role="cross")
        assert stand_in == [(3, 6), (3, 6)]
    assert torch.equal(out, _sdpa_reference(q, k, v))
    with pytest.raises(ValueError, match="attention role must be one of"):
        attention(q, q, q, role="selfish")
    with pytest.raises(ValueError, match="attention role must be one of"):  # masked calls check it too
        attention(q, q, q, mask=torch.ones(1, 1, 1, 3, dtype=torch.bool), role="selfish")
    with pytest.raises(ValueError, match="attention role must be one of"):
        with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, roles=("self", "x")):
            pass
    assert ak.current_attention_kernel("cross") == ak.SDPA


def test_sites_name_stages_or_roles():
    assert KERNEL_ROLES == ak.ATTENTION_ROLES
    with pytest.raises(ValueError, match=r"attention_kernel_sites: unknown \['slat.mlp', 'vae'\]"):
        RunOptions(attention_kernel_sites=("ss", "vae", "slat.mlp"))
    with pytest.raises(ValueError, match="tuple of sites, got the string 'slat'"):
        RunOptions(attention_kernel_sites="slat")
    with pytest.raises(ValueError, match="with attention_kernel='sdpa' they change nothing"):
        RunOptions(attention_kernel_sites=("slat",))
    opts = RunOptions(attention_kernel=ak.FLASH_ATTN_CUTE, attention_kernel_sites=("ss.cross", "slat", "slat.self"))
    assert opts.kernel_roles("ss") == ("cross",)
    assert opts.kernel_roles("slat") == ("self", "cross")
    assert opts.kernel_roles("decode") == ()
    with pytest.raises(ValueError, match="stage must be one of"):
        opts.kernel_roles("mesh")


def test_kernel_only_in_the_chosen_stages(stand_in):
    with pytest.raises(ValueError, match="would never run"):
        RunOptions(attention_kernel=ak.FLASH_ATTN_CUTE, attention_kernel_sites=())
    opts = RunOptions(precision="bf16", attention_kernel=ak.FLASH_ATTN_CUTE, attention_kernel_sites=("slat",))
    q = torch.randn(1, 3, 2, 8, dtype=torch.bfloat16)
    for stage, routed in (("ss", False), ("slat", True), ("decode", False)):
        stand_in.clear()
        with opts.network_context("cpu", stage):
            attention(q, q, q)
        assert bool(stand_in) is routed, stage
    with pytest.raises(ValueError, match="stage must be one of"):
        opts.network_context("cpu", "mesh")
    context = opts.network_context("cpu", "slat")
    assert ak.current_attention_kernel() == ak.SDPA  # nothing entered before the with block
    with pytest.raises(RuntimeError, match="boom"):
        with context:
            assert ak.current_attention_kernel() == ak.FLASH_ATTN_CUTE
            raise RuntimeError("boom")
    assert ak.current_attention_kernel() == ak.SDPA


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_custom_op_inside_the_compiled_flows(stand_in, cpu_compile, backend):
    """The FA4 custom op inside the compiled SS flow and SLaT torso: no graph break on it (aot_eager traces it
    through its fake implementation), the stand-in runs, and the latents equal the compiled SDPA run's."""
    from torch._dynamo.utils import counters
    sample = load_shipped_samples()[0]
    pipe = light_bf16_pipe(ss_steps=2, slat_steps=2)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    common = dict(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                  compile_backend=backend)
    outs, graphs = [], []
    for opts in (RunOptions(**common), RunOptions(attention_kernel=ak.FLASH_ATTN_CUTE, **common)):
        pipe.options = opts
        ss = pipe.run_ss(inputs, seed=0)
        outs.append((ss, pipe.run_slat(inputs, ss, seed=0)))
        graphs.append(counters["stats"]["unique_graphs"])
    (ss0, sl0), (ss1, sl1) = outs
    assert stand_in, "the compiled flows never called the FA4 op"
    breaks = [str(k) for k in counters["graph_break"]]
    assert not [b for b in breaks if "flash_attn_cute" in b], breaks
    # the kernel choice is guarded: the FA4 run compiled its own SS and SLaT graphs instead of reusing SDPA's
    assert graphs[0] >= 2 and graphs[1] >= 2 * graphs[0], graphs
    tol = 0.0 if backend == "eager" else 2e-2
    for key in ss0.latents:
        torch.testing.assert_close(ss0.latents[key], ss1.latents[key], rtol=0, atol=tol)
    torch.testing.assert_close(sl0.slat, sl1.slat, rtol=0, atol=tol)


def test_flop_counter_counts_the_op_like_sdpa(stand_in):
    """FlopCounterMode sees FA4 through the op's formula: torch's own SDPA count for the same shapes (GPU SDPA
    kernels are counted with it), and the stand-in's SDPA inside the op is not counted a second time."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    q = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 7, 4, 16, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter, ak.use_attention_kernel(ak.FLASH_ATTN_CUTE):
        attention(q, k, k)
    assert stand_in == [(5, 7)]
    expected = sdpa_flop_count((2, 4, 5, 16), (2, 4, 7, 16), (2, 4, 7, 16))
    assert counter.get_total_flops() == expected == 4 * 2 * 4 * 5 * 7 * 16


def test_tiles_parse_and_validate():
    assert ak.FlashAttnTiles.parse("192x128") == ak.FlashAttnTiles(192, 128, True, True)
    t = ak.FlashAttnTiles.parse(" 128x96:no-rs:no-overlap ")
    assert t == ak.FlashAttnTiles(128, 96, False, False) and t.label == "128x96:no-rs:no-overlap"
    assert ak.FlashAttnTiles.parse(t.label) == t
    assert ak.FlashAttnTiles.parse("64x128:no-overlap").label == "64x128:no-overlap"
    for bad, msg in (("128", "written MxN"), ("128x128:rs", "written MxN"), ("128x128:no-overlap:no-rs", "written MxN"), ("96x128", "tile_m must be 64, 128 or 192"),
                     ("128x100", "multiple of 16"), ("128x272", "multiple of 16 in \\[16, 256\\]")):
        with pytest.raises(ValueError, match=msg):
            ak.FlashAttnTiles.parse(bad)


def test_tiles_reach_the_kernel_per_role(stand_in):
    """The tiles of the context reach the FA4 call of their role; a role without tiles gets None (FA4's table); the
    values equal SDPA's (the stand-in) and the context is restored after an exception."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 2, 8, generator=g, dtype=torch.bfloat16) for n in (3, 5, 5))
    t = ak.FlashAttnTiles(128, 96, False, True)
    with pytest.raises(RuntimeError, match="boom"):
        with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, tiles={"cross": t}):
            assert ak.current_flash_attn_tiles("cross") == t and ak.current_flash_attn_tiles("self") is None
            out = cross_attention(q, (k, v))
            attention(q, q, q)
            raise RuntimeError("boom")
    assert stand_in == [(3, 5), (3, 3)] and stand_in.tiles == [t, None]
    assert torch.equal(out, _sdpa_reference(q, k, v))
    assert ak.current_flash_attn_tiles("cross") is None and ak.current_attention_kernel("cross") == ak.SDPA


def test_tiles_for_a_role_without_fa4_are_refused():
    t = ak.FlashAttnTiles(128, 128)
    with pytest.raises(ValueError, match="tiles for role 'self' would never be used: that role runs 'sdpa'"):
        with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, roles=("cross",), tiles={"self": t}):
            pass
    with pytest.raises(ValueError, match="would never be used"):
        with ak.use_attention_kernel(ak.SDPA, tiles={"self": t}):
            pass
    with pytest.raises(ValueError, match="attention role must be one of"):
        with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, tiles={"mlp": t}):
            pass
    with pytest.raises(ValueError, match="must be a FlashAttnTiles, got str"):
        with ak.use_attention_kernel(ak.FLASH_ATTN_CUTE, tiles={"self": "128x128"}):
            pass


def test_run_options_tiles_per_site():
    fa4 = dict(precision="bf16", attention_kernel=ak.FLASH_ATTN_CUTE)
    opts = RunOptions(**fa4, attention_kernel_sites=("ss", "slat.cross"),
                      attention_kernel_tiles=(("ss", "192x96"), ("ss.self", "128x128:no-rs"), ("slat", "128x160")))
    assert opts.kernel_tiles("ss") == {"self": ak.FlashAttnTiles(128, 128, False, True),
                                       "cross": ak.FlashAttnTiles(192, 96)}
    assert opts.kernel_tiles("slat") == {"cross": ak.FlashAttnTiles(128, 160)}  # the stage entry reaches its FA4 role
    assert opts.kernel_tiles("decode") == {}
    assert RunOptions(**fa4).kernel_tiles("ss") == {}
    with pytest.raises(ValueError, match="no attention at site 'ss' runs FlashAttention-4"):
        RunOptions(attention_kernel_tiles=(("ss", "128x128"),))
    with pytest.raises(ValueError, match="no attention at site 'slat.self' runs FlashAttention-4"):
        RunOptions(**fa4, attention_kernel_sites=("slat.cross",), attention_kernel_tiles=(("slat.self", "128x128"),))
    with pytest.raises(ValueError, match="unknown site 'vae'"):
        RunOptions(**fa4, attention_kernel_tiles=(("vae", "128x128"),))
    with pytest.raises(ValueError, match="names a site twice"):
        RunOptions(**fa4, attention_kernel_tiles=(("ss", "128x128"), ("ss", "192x128")))
    for bad in (("ss", "128x128"), [("ss", "128x128")], (("ss", ak.FlashAttnTiles(128, 128)),), (("ss", 128),)):
        with pytest.raises(ValueError, match="tuple of \\(site, tiles\\) string pairs"):
            RunOptions(**fa4, attention_kernel_tiles=bad)
    with pytest.raises(ValueError, match="tile_m must be"):
        RunOptions(**fa4, attention_kernel_tiles=(("ss", "32x128"),))


def test_tiles_reach_the_kernel_inside_the_compiled_flows(stand_in, cpu_compile):
    """Through the mini samplers compiled with aot_eager (the op traced through its fake, run through the stand-in):
    SS calls carry SS's tiles and SLaT calls SLaT's, and a second tile choice compiles its own graphs instead of
    replaying the first choice's tile values."""
    sample = load_shipped_samples()[0]
    pipe = light_bf16_pipe(ss_steps=2, slat_steps=2)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    common = dict(precision="bf16", batch_cfg=True, cache_cond_kv=True, compile_ss=True, compile_slat=True,
                  compile_backend="aot_eager", attention_kernel=ak.FLASH_ATTN_CUTE)
    ss_t, slat_t, other = ak.FlashAttnTiles(128, 96), ak.FlashAttnTiles(64, 128, False, False), ak.FlashAttnTiles(192, 64)
    for ss_spec, expect_ss in (("128x96", ss_t), ("192x64", other)):
        stand_in.clear()
        pipe.options = RunOptions(**common, attention_kernel_tiles=(("ss", ss_spec),
                                                                    ("slat", "64x128:no-rs:no-overlap")))
        ss = pipe.run_ss(inputs, seed=0)
        n_ss = len(stand_in)
        pipe.run_slat(inputs, ss, seed=0)
        assert n_ss and len(stand_in) > n_ss
        assert set(stand_in.tiles[:n_ss]) == {expect_ss}
        assert set(stand_in.tiles[n_ss:]) == {slat_t}


def _fa4_missing() -> str | None:
    return ak.flash_attn_cute_unavailable("cuda") if torch.cuda.is_available() else "needs a CUDA device"


@pytest.mark.skipif(_fa4_missing() is not None, reason=f"real FlashAttention-4: {_fa4_missing()}")
@pytest.mark.parametrize("spec", ["128x128", "192x128:no-rs", "128x96:no-overlap"])
def test_real_fa4_tiles_match_sdpa(spec):
    """On the GPU: FA4 with the given tiles equals FA4's own table and SDPA to bf16 rounding, at an SS-like shape whose
    query count is not a multiple of either tile height."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, 64, device="cuda", generator=g, dtype=torch.bfloat16) for n in (1000, 1500, 1500))
    tiled = ak.flash_attn_cute_tiled(q, k, v, ak.FlashAttnTiles.parse(spec))
    torch.testing.assert_close(tiled.float(), _sdpa_reference(q, k, v).float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(tiled.float(), ak.flash_attn_cute(q, k, v).float(), rtol=0, atol=2e-2)
