"""``RunOptions.one_key_projection``: the unconditional CFG rows' cross-attention projected once.

Under ``collapse_zero_cond`` the unconditional rows' cross-attention attends over one key, so its output is that key's
value for every query, and ``to_out`` maps those equal rows to one row. With ``one_key_projection`` those rows skip
``to_q`` and get ``to_out(value)`` broadcast. Checked: the math against the plain path (fp32 rounding), that the skipped
projections really are skipped (rows seen by ``to_q`` / ``to_out``, and the FLOP count drops by exactly the two GEMMs),
whole SS and SLaT samplers (eager, batched and unbatched CFG, the compiled SLaT torso), bit-identical outputs with the
option off, and bad inputs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import mini_slat_object, record_size
from fs3d_accel.model.configs import mini_config
from fs3d_accel.model.layers import (collapse_zero_condition_kv, cross_attention, one_key_output,
                                     projected_cross_attention, use_one_key_projection)
from fs3d_accel.model.sparse import release_structure
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.slat import SLaTStage
from fs3d_accel.stages.ss import SSStage, ss_noise

C, H, L, LC = 32, 4, 10, 7  # channels, heads, query tokens, condition tokens


def _projections(seed: int = 0) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    to_q, to_kv, to_out = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)
    for m in (to_q, to_kv, to_out):
        nn.init.normal_(m.bias, std=0.1)  # the zero condition's keys and values are the to_kv bias: not zero
    return to_q, to_kv, to_out


def _pair_kv(to_kv: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, zero) condition rows through to_kv: k, v each (2, LC, H, C // H)."""
    cond = torch.cat([torch.randn(1, LC, C), torch.zeros(1, LC, C)])
    k, v = to_kv(cond).view(2, LC, 2, H, C // H).unbind(2)
    return k, v


def _plain(x, kv, to_q, to_out):
    q = to_q(x).reshape(x.shape[0], x.shape[1], H, C // H)
    return to_out(cross_attention(q, kv).reshape(x.shape))


def _hooked_rows(modules: list[nn.Module]):
    """Rows of every input the ``modules`` see, and the hook handles (removed by the caller)."""
    rows: list[int] = []
    handles = [m.register_forward_pre_hook(lambda m, args: rows.append(args[0].numel() // args[0].shape[-1]))
               for m in modules]
    return rows, handles


@torch.no_grad()
def test_one_key_rows_get_the_projected_value_and_skip_to_q():
    to_q, to_kv, to_out = _projections()
    x = torch.randn(2, L, C)
    collapsed = collapse_zero_condition_kv(_pair_kv(to_kv), [False, True])
    reference = _plain(x, collapsed, to_q, to_out)
    q_rows, handles = _hooked_rows([to_q])
    out_rows, more = _hooked_rows([to_out])
    with use_one_key_projection(True):
        got = projected_cross_attention(x, collapsed, to_q, to_out, H)
    for h in handles + more:
        h.remove()
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    # the zero row: to_out of its one value, the same for all L queries; to_q saw the conditional row only
    expected_zero = to_out(collapsed[3].reshape(1, C))
    assert torch.equal(got[1], expected_zero.expand(L, C))
    assert q_rows == [L] and sorted(out_rows) == [1, L]


@torch.no_grad()
def test_off_is_the_plain_path_bit_for_bit_and_a_batch_of_keys_is_untouched():
    to_q, to_kv, to_out = _projections(1)
    x = torch.randn(2, L, C)
    full = _pair_kv(to_kv)
    collapsed = collapse_zero_condition_kv(full, [False, True])
    assert torch.equal(projected_cross_attention(x, collapsed, to_q, to_out, H), _plain(x, collapsed, to_q, to_out))
    with use_one_key_projection(True):  # no one-key element: the plain path, bit for bit
        assert torch.equal(projected_cross_attention(x, full, to_q, to_out, H), _plain(x, full, to_q, to_out))


@torch.no_grad()
def test_an_all_zero_batch_is_one_projected_row():
    to_q, to_kv, to_out = _projections(2)
    x = torch.randn(3, L, C)
    k, v = _pair_kv(to_kv)
    one = collapse_zero_condition_kv((k[1:], v[1:]), [True])  # (k[:, :1], v[:, :1]), shared by the batch
    q_rows, handles = _hooked_rows([to_q])
    with use_one_key_projection(True):
        got = projected_cross_attention(x, one, to_q, to_out, H)
    handles[0].remove()
    assert q_rows == [] and got.shape == (3, L, C)
    torch.testing.assert_close(got, _plain(x, one, to_q, to_out), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_flops_drop_by_the_two_skipped_gemms():
    """Per one-key element: to_q over L rows (2 L C^2) and to_out over L rows, less the one projected row (2 C^2)."""
    to_q, to_kv, to_out = _projections(3)
    x = torch.randn(2, L, C)
    collapsed = collapse_zero_condition_kv(_pair_kv(to_kv), [False, True])
    counts = []
    for on in (False, True):
        with use_one_key_projection(on), FlopCounterMode(display=False) as counter:
            projected_cross_attention(x, collapsed, to_q, to_out, H)
        counts.append(counter.get_total_flops())
    assert counts[0] - counts[1] == 2 * (2 * L * C * C) - 2 * C * C


@torch.no_grad()
def test_under_autocast_the_projected_row_is_in_the_autocast_dtype():
    to_q, to_kv, to_out = _projections(4)
    x = torch.randn(2, L, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cached K/V computed under autocast, as the stages do
        collapsed = collapse_zero_condition_kv(_pair_kv(to_kv), [False, True])
        reference = _plain(x, collapsed, to_q, to_out)
        with use_one_key_projection(True):
            got = projected_cross_attention(x, collapsed, to_q, to_out, H)
    assert got.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=2e-2)


def test_bad_inputs_are_refused():
    to_q, to_kv, to_out = _projections(5)
    with pytest.raises(ValueError, match="one-key value"):
        one_key_output(torch.zeros(1, 3, H, C // H), to_out)
    with pytest.raises(ValueError, match="takes a bool"):
        with use_one_key_projection(1):
            pass
    with pytest.raises(ValueError, match="per-element K/V pairs for a batch of 3"):
        with use_one_key_projection(True):
            projected_cross_attention(torch.zeros(3, L, C), collapse_zero_condition_kv(
                _pair_kv(to_kv), [False, True]), to_q, to_out, H)
    with pytest.raises(ValueError, match="without collapse_zero_cond"):
        RunOptions(cache_cond_kv=True, one_key_projection=True)
    with pytest.raises(ValueError, match="one_key_projection is a bool"):
        RunOptions(cache_cond_kv=True, collapse_zero_cond=True, one_key_projection="yes")


def test_the_switch_comes_back_after_an_exception():
    from fs3d_accel.model.layers import current_one_key_projection
    with pytest.raises(RuntimeError):
        with use_one_key_projection(True):
            assert current_one_key_projection()
            raise RuntimeError("boom")
    assert not current_one_key_projection()


# ----------------------------------------------------------------------------------------------------------------
# whole samplers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini():
    """The mini SS and SLaT stages (biases made non-zero) and their config, its samplers shortened to 5 steps (their
    other settings kept): both schedules still hold guided and unguided steps, which the row counts below need."""
    cfg = mini_config()
    cfg = dataclasses.replace(cfg, ss_flow=dataclasses.replace(cfg.ss_flow, resolution=4))
    cfg = cfg.with_samplers(dataclasses.replace(cfg.ss_sampler, steps=5),
                            dataclasses.replace(cfg.slat_sampler, steps=5))
    from fs3d_accel.samplers import count_network_passes
    assert all(s.steps < count_network_passes(s) < 2 * s.steps for s in (cfg.ss_sampler, cfg.slat_sampler))
    torch.manual_seed(0)
    ss, slat = SSStage(cfg).eval(), SLaTStage(cfg).eval()
    with torch.no_grad():
        for m in [*ss.modules(), *slat.modules()]:
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
    return cfg, ss, slat


def _options(batch_cfg: bool, on: bool, **kw) -> RunOptions:
    return RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, collapse_zero_cond=True, one_key_projection=on, **kw)


@pytest.mark.parametrize("batch_cfg", [True, False])
@torch.no_grad()
def test_ss_sampler_same_with_projected_one_key_rows(mini, batch_cfg):
    cfg, ss, _ = mini
    g = torch.Generator().manual_seed(0)
    cond, noise = torch.randn(1, 40, cfg.ss_flow.cond_channels, generator=g), ss_noise(cfg, g)
    outs, rows_by_setting = [], []
    for on in (False, True):
        rows, handles = _hooked_rows([blk.cross_attn[s].to_q for blk in ss.flow.blocks for s in blk.cross_attn])
        try:
            net = ss.velocity_net(cond, cfg.ss_sampler, _options(batch_cfg, on))
            outs.append(EulerFlowSampler(cfg.ss_sampler, "ss").sample(dict(noise), net))
        finally:
            for h in handles:
                h.remove()
        rows_by_setting.append(sum(rows))
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-5, atol=1e-5, msg=k)
    # to_q no longer sees the unconditional rows (batched with the conditional ones or in passes of their own)
    assert rows_by_setting[0] - rows_by_setting[1] == _uncond_rows(cfg.ss_sampler, rows_by_setting[1]) > 0


def _uncond_rows(sampler_cfg, cond_rows: int) -> int:
    """to_q rows of the unconditional passes, given those of the conditional ones (``cond_rows``, the same every
    step): one pass's worth per guided step."""
    from fs3d_accel.samplers import count_network_passes
    guided = count_network_passes(sampler_cfg) - sampler_cfg.steps
    return cond_rows * guided // sampler_cfg.steps


@pytest.mark.parametrize("batch_cfg, compiled", [(True, False), (False, False), (True, True)])
@torch.no_grad()
def test_slat_sampler_same_with_projected_one_key_rows(mini, batch_cfg, compiled, cpu_compile):
    cfg, _, slat = mini
    coords, cond, noise = mini_slat_object(cfg)
    outs, rows_by_setting = [], []
    for on in (False, True):
        opts = _options(batch_cfg, on, compile_slat=compiled, compile_backend="eager")
        structures: list[dict] = []
        # the compiled torso refuses hooks on its blocks: count rows on the eager paths only
        rows, handles = _hooked_rows([] if compiled else [b.cross_attn.to_q for b in slat.flow.blocks])
        try:
            net = slat.velocity_net(cond, coords, cfg.slat_sampler, opts, structures)
            outs.append(EulerFlowSampler(cfg.slat_sampler, "slat").sample(noise.clone(), net))
        finally:
            for h in handles:
                h.remove()
            for s in structures:
                release_structure(s)
        rows_by_setting.append(sum(rows))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    if not compiled:
        assert rows_by_setting[0] - rows_by_setting[1] == _uncond_rows(cfg.slat_sampler, rows_by_setting[1]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_slat_on_cuda_with_graphs_same_with_projected_one_key_rows(compiled):
    """On the GPU with whole-pass CUDA graphs (and the inductor-compiled torso): the same latents to fp32 rounding."""
    from conftest import mini_slat_setup, sample_slat
    stage, objects, sampler = mini_slat_setup((300,))
    stage = stage.cuda()
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
    cond, coords, noise = (x.cuda() for x in objects[0])
    common = dict(cuda_graphs=True, async_graph_capture=True, compile_slat=compiled)
    without = sample_slat(stage, cond, coords, noise, sampler, _options(True, False, **common))
    with_ = sample_slat(stage, cond, coords, noise, sampler, _options(True, True, **common))
    print(f"compiled={compiled}: max abs diff {float((with_ - without).abs().max()):.3g}")
    torch.testing.assert_close(with_, without, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# the sparse and dense paths, on layouts the samplers do not make
# ----------------------------------------------------------------------------------------------------------------
def _sparse_input(lengths: list[int], seed: int = 0):
    from fs3d_accel.model.sparse import SparseTensor
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.cat([torch.full((n, 1), b), torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long),
                                                                       torch.zeros(n, dtype=torch.long)], 1)], 1)
                        for b, n in enumerate(lengths)]).int()
    return SparseTensor(torch.randn(sum(lengths), C, generator=g), coords)


def _per_element_kv(to_kv: nn.Linear, zero_rows: list[bool], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.stack([torch.zeros(LC, C) if z else torch.randn(LC, C, generator=g) for z in zero_rows])
    k, v = to_kv(cond).view(len(zero_rows), LC, 2, H, C // H).unbind(2)
    return collapse_zero_condition_kv((k, v), zero_rows)


@pytest.mark.parametrize("lengths, zero_rows", [([5, 9, 3], [True, False, True]), ([4, 9], [True, False]),
                                                ([9, 4], [False, True])])
@torch.no_grad()
def test_sparse_cross_attention_with_unequal_elements_matches_the_plain_path(lengths, zero_rows):
    from fs3d_accel.model.sparse import SparseCrossAttention
    attn = SparseCrossAttention(C, C, H)
    for m in (attn.to_q, attn.to_kv, attn.to_out):
        nn.init.normal_(m.bias, std=0.1)
    x = _sparse_input(lengths)
    kv = _per_element_kv(attn.to_kv, zero_rows)
    plain = attn(x, kv=kv).feats
    with use_one_key_projection(True):
        got = attn(x, kv=kv).feats
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    start = 0
    for n, zero in zip(lengths, zero_rows):  # each zero element's rows are one row, repeated
        rows = got[start:start + n]
        assert torch.equal(rows, rows[:1].expand_as(rows)) == zero or n == 1
        start += n


@torch.no_grad()
def test_pair_forms_with_distinct_one_key_rows_match_the_plain_path():
    """A (k, v) pair whose B rows each hold one (distinct) key: every element gets its own row's value, on the dense
    and the sparse path."""
    from fs3d_accel.model.sparse import SparseCrossAttention
    attn = SparseCrossAttention(C, C, H)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(3, 1, H, C // H, generator=g), torch.randn(3, 1, H, C // H, generator=g)
    dense_x = torch.randn(3, L, C, generator=g)
    sparse_x = _sparse_input([4, 6, 2])
    plain_dense, plain_sparse = attn.dense(dense_x, kv=(k, v)), attn(sparse_x, kv=(k, v)).feats
    with use_one_key_projection(True):
        torch.testing.assert_close(attn.dense(dense_x, kv=(k, v)), plain_dense, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(attn(sparse_x, kv=(k, v)).feats, plain_sparse, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_malformed_one_key_kv_is_refused_as_the_plain_path_refuses_it():
    from fs3d_accel.model.sparse import SparseCrossAttention
    attn = SparseCrossAttention(C, C, H)
    one = torch.zeros(1, 1, H, C // H)
    with use_one_key_projection(True):
        with pytest.raises(ValueError, match="one-key K/V do not match"):  # k batch 3, v batch 1
            attn.dense(torch.zeros(3, L, C), kv=(torch.zeros(3, 1, H, C // H), one))
        with pytest.raises(ValueError, match="one-key K/V do not match"):  # heads split other than num_heads
            attn.dense(torch.zeros(1, L, C), kv=(torch.zeros(1, 1, 2 * H, C // H // 2),) * 2)
        with pytest.raises(ValueError, match="3 query segments but 1 / 1 condition rows"):
            attn(_sparse_input([2, 3, 4]), kv=(one, one))
        with pytest.raises(ValueError, match="1 per-element K/V pairs for 2 batch elements"):
            attn(_sparse_input([2, 3]), kv=(one, one, one))  # an odd count: not pairs of the 2 elements
        with pytest.raises(ValueError, match="one-key K/V do not match"):
            attn(_sparse_input([2, 3]), kv=(one, torch.zeros(1, 1, H, C // H + 1), one, one))


@pytest.mark.parametrize("stage_name", ["ss", "slat"])
@torch.no_grad()
def test_the_compiled_flows_take_the_one_key_path(mini, stage_name, cpu_compile, monkeypatch, run_time_sizes):
    """The compiled SS flow and SLaT torso (eager backend) call ``one_key_output`` with the option on and never without
    it: equal outputs alone could not tell, since the two paths compute the same math."""
    import fs3d_accel.model.layers as layers
    import fs3d_accel.model.sparse as sparse
    calls = run_time_sizes  # counted through an operator, which runs at every call of the compiled code too
    original = layers.one_key_output

    def counted(v, to_out):
        return original(record_size(v, 0), to_out)
    monkeypatch.setattr(layers, "one_key_output", counted)
    monkeypatch.setattr(sparse, "one_key_output", counted)
    cfg, ss, slat = mini
    for on in (False, True):
        calls.clear()
        if stage_name == "ss":
            g = torch.Generator().manual_seed(0)
            cond, noise = torch.randn(1, 40, cfg.ss_flow.cond_channels, generator=g), ss_noise(cfg, g)
            opts = _options(True, on, compile_ss=True, compile_backend="eager")
            EulerFlowSampler(cfg.ss_sampler, "ss").sample(dict(noise), ss.velocity_net(cond, cfg.ss_sampler, opts))
        else:
            coords, cond, noise = mini_slat_object(cfg)
            structures: list[dict] = []
            try:
                opts = _options(True, on, compile_slat=True, compile_backend="eager")
                net = slat.velocity_net(cond, coords, cfg.slat_sampler, opts, structures)
                EulerFlowSampler(cfg.slat_sampler, "slat").sample(noise.clone(), net)
            finally:
                for s in structures:
                    release_structure(s)
        assert bool(calls) == on, (on, len(calls))


@torch.no_grad()
def test_dense_elements_in_any_order_match_the_plain_path():
    to_q, to_kv, to_out = _projections(6)
    x = torch.randn(3, L, C)
    kv = _per_element_kv(to_kv, [True, False, False], seed=1)
    with use_one_key_projection(True):
        got = projected_cross_attention(x, kv, to_q, to_out, H)
    torch.testing.assert_close(got, _plain(x, kv, to_q, to_out), rtol=1e-6, atol=1e-6)
