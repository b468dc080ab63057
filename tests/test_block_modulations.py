"""Each SLaT block's adaLN output computed once per sampler step and kept (``RunOptions.cache_block_modulations``).

The modulations depend on the timestep and the weights only, so the stage computes them per (step, batch) once and
reuses them for every later pass and object. On the CPU the kept values come from the very same ops, so every output
must be bit-identical to computing them inside each pass; the cache must pick up weights changed in place.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_kept_values_follow_weight, mini_slat_setup, random_slat_inputs, sample_slat
from fs3d_accel.model.slat_flow import SLaTFlowModel
from fs3d_accel.stages.options import RunOptions


@pytest.fixture(scope="module")
def slat_setup():
    stage, objects, sampler = mini_slat_setup((260, 170), steps=5)
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled_torso", None)
    stage.__dict__.pop("_block_modulations", None)


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_flow_with_block_modulations_computed_ahead_is_bit_identical(batch):
    """The sparse block loop and the dense torso, with condition tokens or cached K/V: the same bits."""
    cfg, coords, feats, cond = random_slat_inputs(batch=batch)
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    t = torch.full((batch,), 640.0)
    mods = flow.block_modulations(t)
    assert mods.shape == (cfg.num_blocks, batch, 6 * cfg.model_channels)
    kv = flow.precompute_cond_kv(cond)
    for torso in (None, flow.dense_torso):
        ref = flow(feats, coords, t, cond, torso=torso)
        assert torch.equal(flow(feats, coords, t, cond, torso=torso, block_mods=mods), ref)
        assert torch.equal(flow(feats, coords, t, None, cond_kv=kv, torso=torso, block_mods=mods), ref)
    # the values really are used, by the block loop and by the dense torso: another step's give other velocities
    other = flow.block_modulations(t * 0 + 100.0)
    for torso in (None, flow.dense_torso):
        assert not torch.equal(flow(feats, coords, t, cond, torso=torso, block_mods=other),
                               flow(feats, coords, t, cond, torso=torso))


@torch.no_grad()
def test_flow_refuses_block_modulations_of_the_wrong_shape():
    cfg, coords, feats, cond = random_slat_inputs(batch=1)
    flow = SLaTFlowModel(cfg).eval()
    t = torch.tensor([500.0])
    mods = flow.block_modulations(torch.full((2,), 500.0))  # a batch of 2 for a batch-1 pass
    with pytest.raises(ValueError, match=r"block_mods must be \(num_blocks, batch, 6 \* model_channels\)"):
        flow(feats, coords, t, cond, block_mods=mods)
    with pytest.raises(ValueError, match="block_mods must be"):
        flow(feats, coords, t, cond, block_mods=mods[:-1, :1])
    with pytest.raises(ValueError, match="block_mods must be torch.float32 on cpu"):
        flow(feats, coords, t, cond, block_mods=mods[:, :1].to("meta"))
    with pytest.raises(ValueError, match="block_mods must be torch.float32 on cpu"):
        flow(feats, coords, t, cond, block_mods=mods[:, :1].int())
    with pytest.raises(ValueError, match=r"block_mods must be torch.float32 on cpu .* got torch.float64"):
        flow(feats, coords, t, cond, block_mods=mods[:, :1].double())  # would promote the features silently
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the blocks compute them in its dtype
        with pytest.raises(ValueError, match="block_mods must be torch.bfloat16 on cpu"):
            flow(feats, coords, t, cond, block_mods=mods[:, :1])
        flow(feats, coords, t, cond, block_mods=flow.block_modulations(t))  # accepted
    # the dense torso checks them too (what the compiled torso runs)
    f = torch.zeros(1, 5, cfg.model_channels)
    with pytest.raises(ValueError, match=r"block_mods must be \(num_blocks, batch, 6 \* model_channels\)"):
        flow.dense_torso(f, flow.t_embedder(t), cond, block_mods=mods)
    with pytest.raises(ValueError, match="block_regions is a bool"):
        flow.dense_torso(f, flow.t_embedder(t), cond, block_regions="no")


def _counting(stage, monkeypatch) -> list:
    """Record every (t, batch) the flow computes block modulations for."""
    computed = []
    real = stage.flow.block_modulations

    def counted(t):
        computed.append((float(t[0]), t.numel()))
        return real(t)

    monkeypatch.setattr(stage.flow, "block_modulations", counted)
    return computed


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_stage_keeps_modulations_per_step_and_gives_the_same_latents(slat_setup, monkeypatch, batch_cfg):
    """Two objects through the whole SLaT sampler (CFG on): bit-identical latents with the kept modulations, which
    are computed once per (step, batch) on the first object and never again on the second."""
    stage, objects, sampler = slat_setup
    stage.__dict__.pop("_block_modulations", None)
    computed = _counting(stage, monkeypatch)
    plain = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True)
    kept = RunOptions(batch_cfg=batch_cfg, cache_cond_kv=True, cache_block_modulations=True)
    for i, (cond, coords, noise) in enumerate(objects):
        ref = sample_slat(stage, cond, coords, noise, sampler, plain)
        out = sample_slat(stage, cond, coords, noise, sampler, kept)
        assert torch.equal(out, ref)
        if i == 0:
            first = list(computed)
    assert computed == first, "the second object recomputed modulations"
    assert len(set(first)) == len(first), "a (step, batch) was computed twice"
    batches = {b for _, b in first}
    assert batches == ({1, 2} if batch_cfg else {1})
    steps = {t for t, _ in first}
    assert len(steps) == sampler.steps


def _other_steps_modulations(stage, monkeypatch):
    """Make the stage's kept modulations those of another step (t = 0): the latents must change if they are used."""
    real = stage._kept_per_step
    monkeypatch.setattr(stage, "_kept_per_step",
                        lambda kind, t, *rest: real(kind, 0.0 if kind == "block" else t, *rest))


def test_stage_passes_its_kept_modulations_into_the_pass(slat_setup, monkeypatch):
    """The stage's passes use the kept values (not only compute them): wrong ones change the latents."""
    stage, objects, sampler = slat_setup
    cond, coords, noise = objects[1]
    kept = RunOptions(batch_cfg=True, cache_cond_kv=True, cache_block_modulations=True)
    right = sample_slat(stage, cond, coords, noise, sampler, kept)
    _other_steps_modulations(stage, monkeypatch)
    assert not torch.equal(sample_slat(stage, cond, coords, noise, sampler, kept), right)


def test_kept_modulations_are_keyed_by_autocast_and_parameters(slat_setup):
    """Autocast (another compute dtype) and replaced parameters (whose ids Python may reuse) get entries of their own."""
    stage, _, _ = slat_setup
    stage.clear_block_modulations()
    with torch.no_grad():
        plain = stage.block_modulations(500.0, 2, torch.float32, torch.device("cpu"))
        assert stage.block_modulations(500.0, 2, torch.float32, torch.device("cpu")) is plain
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = stage.block_modulations(500.0, 2, torch.float32, torch.device("cpu"))
        assert cast.dtype == torch.bfloat16 and plain.dtype == torch.float32
        lin = stage.flow.blocks[0].adaLN_modulation[1]
        saved = lin.weight
        try:
            for _ in range(5):  # new Parameters, each at version 0, freed ones' ids free for reuse
                lin.weight = torch.nn.Parameter(saved.detach() * 2, requires_grad=False)
                fresh = stage.block_modulations(500.0, 2, torch.float32, torch.device("cpu"))
                assert torch.equal(fresh, stage.flow.block_modulations(torch.full((2,), 500.0)))
                assert not torch.equal(fresh[0], plain[0])
        finally:
            lin.weight = saved
    assert len(stage.__dict__["_block_modulations"]) == 7
    stage.clear_block_modulations()
    assert "_block_modulations" not in stage.__dict__


def test_kept_modulations_refuse_gradients(slat_setup):
    stage, _, _ = slat_setup
    with pytest.raises(ValueError, match="keeps values computed without gradients"):
        stage.block_modulations(500.0, 1, torch.float32, torch.device("cpu"))


def test_stage_picks_up_weights_changed_in_place(slat_setup):
    """After an in-place change of one block's adaLN weights (as load_state_dict makes), the kept modulations are
    recomputed: the latents equal those of a pass that computes them itself."""
    stage, objects, sampler = slat_setup
    kept = RunOptions(batch_cfg=True, cache_cond_kv=True, cache_block_modulations=True)
    plain = RunOptions(batch_cfg=True, cache_cond_kv=True)
    assert_kept_values_follow_weight(stage, objects[1], sampler, kept, plain,
                                     stage.flow.blocks[-1].adaLN_modulation[1].weight)


@pytest.mark.parametrize("graphs", [False, True])
def test_stage_with_a_compiled_torso_and_graph_calls_gives_the_same_latents(slat_setup, cpu_compile, monkeypatch,
                                                                           graphs):
    """The compiled torso (debug backend) takes the kept modulations as an input, and the whole-pass graph calls
    (eager on the CPU) pass them as an argument: the same latents as computing them in each pass."""
    import fs3d_accel.stages.options as options_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_GRAPHS", True)
    stage, objects, sampler = slat_setup
    cond, coords, noise = objects[0]
    common = dict(batch_cfg=True, cache_cond_kv=True, compile_slat=True, compile_backend="aot_eager",
                  cuda_graphs=graphs)
    saved = stage.__dict__.pop("_compiled_torso", None)
    try:
        ref = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common))
        out = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common, cache_block_modulations=True))
        _other_steps_modulations(stage, monkeypatch)  # and the compiled torso really reads them
        wrong = sample_slat(stage, cond, coords, noise, sampler, RunOptions(**common, cache_block_modulations=True))
    finally:
        stage.__dict__.pop("_compiled_torso", None)
        if saved is not None:
            stage.__dict__["_compiled_torso"] = saved
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(wrong, out)


def test_cache_block_modulations_setting_is_checked():
    with pytest.raises(ValueError, match="cache_block_modulations is a bool"):
        RunOptions(cache_block_modulations="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("async_capture", [False, True])
def test_replayed_graphs_read_each_steps_kept_modulations_on_cuda(monkeypatch, async_capture):
    """On the GPU, whole-pass graphs recorded at one step replay at the others: they must read each step's kept
    modulations (a graph input), not the recorded step's. Eager networks, so the same kernels either way: the same
    latents as the graphs without kept modulations, and as no graphs at all; another step's values change them."""
    stage, objects, sampler = mini_slat_setup((300,))
    stage = stage.cuda()
    cond, coords, noise = (x.cuda() for x in objects[0])

    def run(**kw):
        return sample_slat(stage, cond, coords, noise, sampler, RunOptions(batch_cfg=True, cache_cond_kv=True, **kw))

    graphs = dict(cuda_graphs=True, async_graph_capture=async_capture)
    eager = run()
    assert torch.equal(run(**graphs), eager)
    assert torch.equal(run(**graphs, cache_block_modulations=True), eager)
    if async_capture:  # the compiled torso (inductor) computes the modulations in its own kernels: close, not equal
        compiled = dict(compile_slat=True, **graphs)
        without, with_kept = run(**compiled), run(**compiled, cache_block_modulations=True)
        print("compiled torso, kept modulations against in-graph: max abs diff",
              float((with_kept - without).abs().max()))
        torch.testing.assert_close(with_kept, without, rtol=1e-4, atol=1e-4)
    _other_steps_modulations(stage, monkeypatch)  # the replays read the kept values: another step's change the latents
    assert not torch.equal(run(**graphs, cache_block_modulations=True), eager)


def test_kept_modulations_keyed_by_the_options_autocast_without_entering_it(slat_setup):
    """Given the call's options, the key takes the autocast dtype their context sets, and a miss computes the values
    inside that context: the same entry as computing them under the context by hand."""
    from fs3d_accel.stages.options import RunOptions
    stage, _, _ = slat_setup
    stage.clear_block_modulations()
    cpu = torch.device("cpu")
    opts = RunOptions(precision="autocast-bf16", batch_cfg=True, cache_cond_kv=True, cache_block_modulations=True)
    assert opts.autocast_dtype is torch.bfloat16 and RunOptions(precision="bf16").autocast_dtype is None
    with torch.no_grad():
        via_options = stage.block_modulations(500.0, 2, torch.float32, cpu, opts)
        assert via_options.dtype == torch.bfloat16  # computed inside the options' autocast
        with opts.network_context(cpu, "slat"):
            by_hand = stage.block_modulations(500.0, 2, torch.float32, cpu)
        assert by_hand is via_options  # one entry: the same key inside the context and from the options
        plain = stage.block_modulations(500.0, 2, torch.float32, cpu, RunOptions(batch_cfg=True, cache_cond_kv=True))
        assert plain.dtype == torch.float32
    assert len(stage.__dict__["_block_modulations"]) == 2
    stage.clear_block_modulations()


def test_kept_modulations_follow_a_replaced_adaln_module(slat_setup):
    """The kept module list follows the flow: a block's adaLN module replaced by another gives new values."""
    stage, _, _ = slat_setup
    stage.clear_block_modulations()
    cpu = torch.device("cpu")
    block = stage.flow.blocks[0]
    saved = block.adaLN_modulation
    try:
        with torch.no_grad():
            before = stage.block_modulations(500.0, 1, torch.float32, cpu)
            twin = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(*saved[1].weight.shape[::-1]))
            twin[1].weight.copy_(saved[1].weight * 3)
            twin[1].bias.copy_(saved[1].bias)
            block.adaLN_modulation = twin.requires_grad_(False)
            after = stage.block_modulations(500.0, 1, torch.float32, cpu)
        assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
        assert torch.equal(after, stage.flow.block_modulations(torch.full((1,), 500.0)))
    finally:
        block.adaLN_modulation = saved
        stage.clear_block_modulations()


def test_kept_modulations_follow_a_replaced_linear_inside_the_adaln(slat_setup):
    """A Linear replaced inside a block's adaLN Sequential (the Sequential itself the same object) gives new values."""
    stage, _, _ = slat_setup
    stage.clear_block_modulations()
    cpu = torch.device("cpu")
    seq = stage.flow.blocks[1].adaLN_modulation
    saved = seq[1]
    try:
        with torch.no_grad():
            before = stage.block_modulations(500.0, 1, torch.float32, cpu)
            twin = torch.nn.Linear(saved.in_features, saved.out_features)
            twin.weight.copy_(saved.weight * 2)
            twin.bias.copy_(saved.bias)
            seq[1] = twin
            after = stage.block_modulations(500.0, 1, torch.float32, cpu)
        assert not torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])
        assert torch.equal(after, stage.flow.block_modulations(torch.full((1,), 500.0)))
    finally:
        seq[1] = saved
        stage.clear_block_modulations()
