"""SLaT's batch-1 coordinate structure sliced from the CFG pair's (``sparse.first_element_structure``,
``RunOptions.derive_unguided_tables``): the same tables as a fresh build, key by key and level by level, the same flow
outputs, refusals where it cannot slice, and unchanged stage outputs with fewer structure builds."""
import pytest
import torch

import fs3d_accel.stages.options as options_mod
from conftest import assert_same_ss_slat, assert_same_structure, fast_mini_config, make_scene, random_slat_inputs, run_ss_slat_each, \
    sparsify_occupancy, spy_structure_builds
from fs3d_accel.model.slat_flow import SLaTFlowModel
from fs3d_accel.model.sparse import first_element_structure, persistent_structure, release_structure
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions


def pair_of(coords: torch.Tensor) -> torch.Tensor:
    second = coords.clone()
    second[:, 0] = 1
    return torch.cat([coords, second], 0)


def built(flow, feats, coords, batch: int) -> dict:
    structure = persistent_structure()
    with torch.no_grad():
        flow.build_structure(feats, coords, torch.full((batch,), 300.0), batch, structure)
    return structure


def test_the_sliced_structure_equals_a_fresh_build_and_gives_the_same_pass():
    cfg, coords, feats, cond = random_slat_inputs(n=300)
    flow = SLaTFlowModel(cfg).eval()
    pair = built(flow, torch.cat([feats, feats]), pair_of(coords), 2)
    fresh = built(flow, feats, coords, 1)
    target = persistent_structure()
    assert first_element_structure(pair, coords, target)
    assert target["checked_input"][0] is coords  # the plain passes' own coords tensor, as the flow checks
    assert_same_structure(target, fresh)
    down = next(v for k, v in target.items() if isinstance(k, tuple) and k[0] == "downsample")
    assert down[3][("upsample_source", 2)][2] is target  # the coarse level points back at this structure
    t = torch.full((1,), 300.0)
    with torch.no_grad():
        a = flow(feats, coords, t, cond, structure=target)
        b = flow(feats, coords, t, cond, structure=fresh)
        c = flow(feats, coords, t, cond)
    assert torch.equal(a, b) and torch.equal(a, c)
    for s in (pair, fresh, target):
        release_structure(s)


def test_slicing_refuses_what_it_cannot_do_and_leaves_the_target_alone():
    cfg, coords, feats, _ = random_slat_inputs(n=200)
    flow = SLaTFlowModel(cfg).eval()
    single = built(flow, feats, coords, 1)
    target = persistent_structure()
    assert not first_element_structure(persistent_structure(), coords, target)  # nothing built
    assert not first_element_structure(single, coords, target)  # batch 1: nothing to slice
    pair = built(flow, torch.cat([feats, feats]), pair_of(coords), 2)
    assert not first_element_structure(pair, coords[:100], target)  # not the repeated coordinates' count
    pair[("something", "new")] = torch.zeros(1)
    assert not first_element_structure(pair, coords, target)  # an entry it does not know
    assert target == persistent_structure()
    del pair[("something", "new")]
    seqlens = next(v for k, v in pair.items() if isinstance(k, tuple) and k[0] == "downsample")[3]["seqlens"]
    seqlens[1] += 1  # elements of different sizes: not a repeated batch
    assert not first_element_structure(pair, coords, target) and target == persistent_structure()
    seqlens[1] -= 1
    # the batch's own entries (its graphs, a pool lease) and lazily rebuilt conv layouts are not inherited
    pair[("cuda_graph", 1)] = object()
    pair[("subm_tiles", 3, True)] = object()
    assert first_element_structure(pair, coords, target)
    assert ("cuda_graph", 1) not in target and ("subm_tiles", 3, True) not in target
    assert not first_element_structure(pair, coords, target)  # built already: left as it is


def test_options_check_derive_unguided_tables():
    with pytest.raises(ValueError, match="derive_unguided_tables is a bool"):
        RunOptions(batch_cfg=True, derive_unguided_tables=1)
    with pytest.raises(ValueError, match="only batch_cfg builds"):
        RunOptions(derive_unguided_tables=True)


@pytest.mark.parametrize("extra", [{}, {"cuda_graphs": True}, {"cuda_graphs": True, "async_graph_capture": True}])
def test_stage_outputs_are_unchanged_with_one_structure_build_fewer(monkeypatch, extra):
    """Lazily (the first unguided pass; also where the pair's structure holds its graphs) and ahead (the asynchronous
    recording's early table build): the same SS and SLaT outputs, and the flow builds the batch-1 structure from
    coordinates no more."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=4), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    batches = spy_structure_builds(monkeypatch)
    base = dict(batch_cfg=True, cache_cond_kv=True, **extra)
    plain = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])[0]
    built_plain, batches[:] = list(batches), []
    sliced = run_ss_slat_each(pipe, inputs, [RunOptions(**base, derive_unguided_tables=True)])[0]
    assert sorted(built_plain) == [1, 2] and batches == [2]
    assert_same_ss_slat(plain, sliced)


def test_tables_by_pass_is_the_reference_of_the_tables_only_build(monkeypatch):
    """``slat_tables_by_pass`` (the build before session 23, kept to time against) gives the same SS and SLaT outputs
    as the tables-only build, through the asynchronous recording's early table build; and it takes a bool only."""
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=4), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    inputs = pipe.prepare(*make_scene(pipe.config.image_size))
    passes = []
    original = SLaTFlowModel._io_in
    monkeypatch.setattr(SLaTFlowModel, "_io_in",
                        lambda self, x, emb, *rest: (passes.append(len(x)), original(self, x, emb, *rest))[1])
    base = dict(batch_cfg=True, cache_cond_kv=True, cuda_graphs=True, async_graph_capture=True)
    tables_only = run_ss_slat_each(pipe, inputs, [RunOptions(**base)])[0]
    passes_tables_only, passes[:] = list(passes), []
    by_pass = run_ss_slat_each(pipe, inputs, [RunOptions(**base, slat_tables_by_pass=True)])[0]
    assert_same_ss_slat(tables_only, by_pass)
    # the batch-1 structure's early build ran the input path (the pair's builds its tables in its first, eager pass: a
    # process's first object)
    assert passes[1:] == passes_tables_only and passes[0] == min(passes_tables_only)
    with pytest.raises(ValueError, match="slat_tables_by_pass is a bool"):
        RunOptions(slat_tables_by_pass=1)


def _torso_level(structure: dict) -> tuple[torch.Tensor, dict]:
    """The coarsest level of a structure, where the torso's tokens (and their position embedding) live: its
    coordinates (the last down-sampling map's) and its cache."""
    cache, coords = structure, None
    while True:
        down = next((v for k, v in cache.items() if isinstance(k, tuple) and k[0] == "downsample"), None)
        if down is None:
            return coords, cache
        coords, cache = down[0], down[3]


def test_the_position_embedding_is_built_with_the_tables_sliced_and_read_by_every_pass():
    """build_structure keeps the torso level's position embedding (the tokens' coordinates alone decide it); the batch-1
    structure sliced from the pair's holds element 0's rows, equal to a fresh build's; a pass with the structure reads
    it instead of running the embedder (same output bit for bit), unless the embedder has hooks, which then fire."""
    from fs3d_accel.model.slat_flow import pos_emb_key
    cfg, coords, feats, cond = random_slat_inputs(n=300)
    flow = SLaTFlowModel(cfg).eval()
    key = pos_emb_key(flow.torso_dtype)
    pair = built(flow, torch.cat([feats, feats]), pair_of(coords), 2)
    fresh = built(flow, feats, coords, 1)
    level_coords, level = _torso_level(fresh)
    with torch.no_grad():
        expected = flow.pos_embedder(level_coords[:, 1:]).to(flow.torso_dtype)
    assert torch.equal(level[key], expected)
    target = persistent_structure()
    assert first_element_structure(pair, coords, target)
    assert torch.equal(_torso_level(target)[1][key], level[key])
    assert len(_torso_level(pair)[1][key]) == 2 * len(level[key])
    pair_level = _torso_level(pair)[1]
    pair_level[key], whole = level[key], pair_level[key]  # rows that are not the pair's: refused
    assert not first_element_structure(pair, coords, persistent_structure())
    pair_level[key] = whole
    calls = []
    flow.pos_embedder.forward = lambda c, _f=flow.pos_embedder.forward: calls.append(1) or _f(c)
    t = torch.full((1,), 300.0)
    with torch.no_grad():
        kept = flow(feats, coords, t, cond, structure=target)
        assert calls == []  # read from the structure
        plain = flow(feats, coords, t, cond)
        assert calls == [1]  # no structure: computed in the pass
        fired = []
        handle = flow.pos_embedder.register_forward_hook(lambda *a: fired.append(1))
        try:
            hooked = flow(feats, coords, t, cond, structure=target)
        finally:
            handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # a global hook sees it too
        try:
            flow(feats, coords, t, cond, structure=target)
        finally:
            handle.remove()
    assert fired == [1] and calls == [1, 1, 1] and torch.equal(kept, plain) and torch.equal(kept, hooked)
    for s in (pair, fresh, target):
        release_structure(s)

