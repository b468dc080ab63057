"""Per-object coordinate structure reused across SLaT sampler steps: same outputs, built once."""
import pytest
import torch

import fs3d_accel.model.sparse as sparse
from conftest import fast_mini_config, make_scene, random_slat_inputs, sparsify_occupancy
from fs3d_accel.model.slat_flow import SLaTFlowModel
from fs3d_accel.model.sparse import persistent_structure, release_structure
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.slat import SLaTStage


def test_flow_with_structure_equals_without_and_builds_tables_once(monkeypatch):
    cfg, coords, feats, cond = random_slat_inputs()
    torch.manual_seed(0)
    flow = SLaTFlowModel(cfg).eval()
    calls = {"n": 0}
    real = sparse._linear_keys

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(sparse, "_linear_keys", counting)
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = [flow(feats * (i + 1), coords, t, cond) for i in range(3)]
        per_pass = calls["n"] // 3
        assert per_pass > 0
        calls["n"] = 0
        structure = persistent_structure()
        cached = [flow(feats * (i + 1), coords, t, cond, structure=structure) for i in range(3)]
    assert calls["n"] == per_pass  # the first call builds every table; the next two reuse them
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    assert any(isinstance(k, tuple) and k[0] == "downsample" for k in structure)
    with pytest.raises(ValueError, match="same coords tensor"):
        flow(feats, coords.clone(), t, cond, structure=structure)
    release_structure(structure)
    assert structure == {}


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_slat_stage_output_is_unchanged_by_the_structure_cache(monkeypatch, batch_cfg):
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=3), seed=0)
    sparsify_occupancy(pipe, occupied_fraction=0.02)
    pipe.options = RunOptions(batch_cfg=batch_cfg)
    img, mask, pm = make_scene()
    inputs = pipe.prepare(img, mask, pm)
    ss = pipe.run_ss(inputs, seed=0)
    cached = pipe.run_slat(inputs, ss, seed=0)
    original = SLaTStage.velocity_net
    monkeypatch.setattr(SLaTStage, "velocity_net",
                        lambda self, cond, coords, cfg, options, structures=None: original(self, cond, coords, cfg,
                                                                                           options, None))
    plain = pipe.run_slat(inputs, ss, seed=0)
    assert torch.equal(cached.feats, plain.feats)
