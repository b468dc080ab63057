"""Baselines (TaylorSeer, EasyCache, random drop, uniform merge, Fast3Dcache) and the method registry."""
import pytest
import torch

from fs3d_accel.accel import (METHODS, EasyCache, Fast3DCache, FastSAM3D, RandomTokenDrop, ShadowPolicy,
                              SpectralTokenAggregation, SSModalityCache, TaylorSeer, UniformTokenMerge, make_method)
from fs3d_accel.accel.mesh_aggregation import quantize_tokens
from fs3d_accel.accel.testing import mini_harness, run_sampler, slat_field, ss_field, ss_latent
from fs3d_accel.seams import EventBus, SparseTokens, TransformContext


def _events(policy, net, x0, steps, stage="ss"):
    bus = EventBus()
    seen = []
    bus.subscribe(seen.append)
    out = run_sampler(x0, net, policy, steps=steps, stage=stage, events=bus)
    return out, seen


def _slat_x0(n=12, seed=0):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ TaylorSeer
def test_taylorseer_schedule_and_exact_linear_forecast():
    assert TaylorSeer().schedule(25) == [0, 1, 5, 9, 13, 17, 21]
    for order in (1, 2):
        _, seen = _events(ShadowPolicy(TaylorSeer(interval=4, order=order)), ss_field("linear"), ss_latent(), 12)
        assert [e.step for e in seen if e.decision == "extrapolated"] == [2, 3, 4, 6, 7, 8, 10, 11]
        for e in seen:
            for k in e.v:
                torch.testing.assert_close(e.v[k], e.info["v_true"][k], rtol=0, atol=2e-5)
    rate = torch.arange(12, dtype=torch.float32)
    _, seen = _events(ShadowPolicy(TaylorSeer()), slat_field("linear", rate), _slat_x0(), 12, stage="slat")
    for e in seen:
        torch.testing.assert_close(e.v, e.info["v_true"], rtol=0, atol=2e-5)


def test_taylorseer_order_zero_reuses_last_velocity():
    _, seen = _events(TaylorSeer(interval=3, order=0, warmup=1), slat_field(), _slat_x0(), 6, stage="slat")
    assert [e.decision for e in seen] == ["computed", "extrapolated", "extrapolated"] * 2
    assert torch.equal(seen[1].v, seen[0].v) and torch.equal(seen[5].v, seen[3].v)


# ------------------------------------------------------------------ EasyCache
def test_easycache_warmup_last_step_and_tangent_reuse():
    _, seen = _events(EasyCache(threshold=1e9), slat_field(), _slat_x0(), 25, stage="slat")
    decisions = [e.decision for e in seen]
    assert decisions[:5] == ["computed"] * 5          # 5 warm-up steps (20 % of 25)
    assert decisions[-1] == "computed" and set(decisions[5:-1]) == {"cached"}
    tangent = seen[4].v - seen[4].x
    for e in seen[5:-1]:
        torch.testing.assert_close(e.v, e.x + tangent, rtol=0, atol=0)


def test_easycache_handles_modality_dicts():
    _, seen = _events(EasyCache(threshold=0.5, warmup_fraction=0.1), ss_field(), ss_latent(), 20)
    assert "cached" in {e.decision for e in seen}


# ------------------------------------------------------------------ token transforms
def _tokens(n=20, feats=True):
    g = torch.Generator().manual_seed(0)
    xyz = torch.randint(0, 16, (n, 3), generator=g, dtype=torch.int32)
    xyz = torch.unique(xyz, dim=0)
    coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)
    return SparseTokens(coords=coords, resolution=16, feats=torch.randn(len(coords), 3, generator=g) if feats else None)


def test_random_drop_is_seeded_and_order_preserving():
    tok = _tokens()
    n = len(tok)
    a, st = RandomTokenDrop(keep=0.5, seed=1).reduce(tok, TransformContext())
    b, _ = RandomTokenDrop(keep=0.5, seed=1).reduce(tok, TransformContext())
    c, _ = RandomTokenDrop(keep=0.5, seed=2).reduce(tok, TransformContext())
    assert len(a) == round(0.5 * n) and st.info["tokens_after"] == len(a)
    assert torch.equal(a.coords, b.coords) and not torch.equal(a.coords, c.coords)
    rows = [tok.coords.tolist().index(r) for r in a.coords.tolist()]
    assert rows == sorted(rows) and torch.equal(a.feats, tok.feats[rows])
    same, _ = RandomTokenDrop(keep=1.0).reduce(tok, TransformContext())
    assert same is tok


def test_uniform_merge_matches_quantisation():
    tok = _tokens()
    out, st = UniformTokenMerge(scale=2.0).reduce(tok, TransformContext())
    ref = quantize_tokens(tok, 2.0)
    assert torch.equal(out.coords, ref.coords) and torch.equal(out.feats, ref.feats) and st.scale == 2.0
    same, st1 = UniformTokenMerge(scale=1.0).reduce(tok, TransformContext())
    assert same is tok and st1.scale == 1.0


# ------------------------------------------------------------------ Fast3Dcache
def test_fast3dcache_schedule_and_budget():
    policy = Fast3DCache()
    assert [s for s in range(25) if policy.is_correction(s)] == [0, 1, 9, 17]
    n = 50
    _, seen = _events(policy, slat_field(), _slat_x0(n), 25, stage="slat")
    streak = torch.zeros(n, dtype=torch.long)
    for e in seen:
        if e.step in (0, 1, 9, 17):
            assert e.decision == "computed"
            streak.zero_()
            continue
        sel = e.info["carving"]["selected"]
        assert int((~sel).sum()) <= int(0.9 * n)
        streak = torch.where(sel, torch.zeros_like(streak), streak + 1)
        assert int(streak.max()) <= 4  # streak limit 5 -> at most 4 consecutive frozen selections
    assert seen[2].decision == "carved" and int((~seen[2].info["carving"]["selected"]).sum()) == 45


# ------------------------------------------------------------------ errors and identity
@pytest.mark.parametrize("make, msg", [
    (lambda: TaylorSeer(interval=0), "interval must be >= 1"),
    (lambda: TaylorSeer(order=-1), "order must be >= 0"),
    (lambda: EasyCache(threshold=-1.0), "threshold must be >= 0"),
    (lambda: EasyCache(warmup_fraction=1.5), "warmup_fraction must be in"),
    (lambda: RandomTokenDrop(keep=0.0), r"keep must be in \(0.0, 1.0\]"),
    (lambda: UniformTokenMerge(scale=0.5), "scale must be >= 1"),
    (lambda: Fast3DCache(skip_ratio=1.0), r"skip_ratio must be in \[0.0, 1.0\)"),
    (lambda: Fast3DCache(streak_limit=0), "streak_limit must be >= 1"),
])
def test_bad_hyperparameters(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


@pytest.mark.parametrize("policy", [TaylorSeer(interval=1), EasyCache(threshold=0.0), Fast3DCache(skip_ratio=0.0)])
def test_do_nothing_is_bit_identical(policy):
    x0 = _slat_x0(16)
    base = run_sampler(x0, slat_field(), None, steps=25, stage="slat")
    assert torch.equal(base, run_sampler(x0, slat_field(), policy, steps=25, stage="slat"))
    if not isinstance(policy, Fast3DCache):
        b = run_sampler(ss_latent(), ss_field(), None, steps=12)
        s = run_sampler(ss_latent(), ss_field(), policy, steps=12)
        assert all(torch.equal(b[k], s[k]) for k in b)


# ------------------------------------------------------------------ registry
def test_registry_names_slots_and_overrides():
    assert sorted(METHODS) == sorted(["base", "fast-sam3d", "fast-sam3d-released", "taylorseer", "easycache",
                                      "random-drop", "uniform-merge", "fast3dcache"])
    for name in METHODS:
        assert make_method(name).name == name
    fs = make_method("fast-sam3d")
    assert isinstance(fs.ss_policy, SSModalityCache) and fs.ss_policy.beta == 0.7
    assert isinstance(fs.decoder_transform, SpectralTokenAggregation) and fs.coords_transform is None
    rel = make_method("fast-sam3d-released")
    assert rel.coords_transform.placement == "pre_slat" and rel.decoder_transform is None
    assert rel.ss_policy.layout_mode == "released" and rel.slat_policy.carving.carve_ratio == 0.1
    assert rel.slat_policy.step_cache.threshold == 1.5 and rel.slat_policy.step_cache.warmup == 3
    acc = make_method("fast-sam3d", ss__k=4, mesh=None, carving__carve_ratio=0.2)
    assert acc.ss_policy.k == 4 and acc.decoder_transform is None and acc.slat_policy.carving.carve_ratio == 0.2
    assert acc.name == "fast-sam3d[carving__carve_ratio=0.2,mesh=None,ss__k=4]"
    assert make_method("taylorseer", interval=5).ss_policy.interval == 5
    assert make_method("random-drop").coords_transform is not None
    assert make_method("uniform-merge", placement="pre_slat").coords_transform.scale == 1.5
    assert FastSAM3D(ss=None, slat=None, mesh=None).describe()["ss_policy"] == "None"
    with pytest.raises(ValueError, match="unknown method 'teacache'"):
        make_method("teacache")
    with pytest.raises(ValueError, match="unknown override 'ss__gamma'"):
        make_method("fast-sam3d", ss__gamma=1.0)
    with pytest.raises(ValueError, match="bad override for method 'easycache'"):
        make_method("easycache", interval=3)


def test_mini_pipeline_baselines_do_nothing_bit_identical():
    h = mini_harness()
    ss_base, slat_base = h.ss_run(None, steps=4), h.slat_run(None, steps=4)
    for policy in (TaylorSeer(interval=1), EasyCache(threshold=0.0)):
        ss = h.ss_run(policy, steps=4)
        assert all(torch.equal(ss_base[k], ss[k]) for k in ss_base)
        assert torch.equal(slat_base, h.slat_run(policy, steps=4))
    assert torch.equal(slat_base, h.slat_run(Fast3DCache(skip_ratio=0.0), steps=4))
    fast = h.slat_run(Fast3DCache(full_steps=1, correction_every=3), steps=4)
    assert torch.isfinite(fast).all() and not torch.equal(fast, slat_base)
