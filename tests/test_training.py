"""CPU tests of the sam3d-mini training code: encoders, geometry targets, one step of each stage,
checkpoint round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fs3d_accel.model.configs import SSDecoderConfig, mini_config
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.pose import decode_layout
from fs3d_accel.training.data import TrainSet, layout_tokens
from fs3d_accel.training.encoders import SLaTEncoder, SSEncoder, kl_divergence
from fs3d_accel.training.geometry import lattice_offsets, sample_oriented_surface, sampled_sdf, view_geometry
from fs3d_accel.training.trainers import MiniTrainer, StageConfig, corner_targets, run_stage


def _box_mesh(half: float = 0.25):
    import trimesh
    m = trimesh.creation.box(extents=[2 * half] * 3)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


def test_ss_encoder_shapes():
    cfg = mini_config().ss_decoder
    enc = SSEncoder(cfg)
    mean, logvar = enc(torch.zeros(2, 1, 32, 32, 32))
    assert mean.shape == (2, 8, 8, 8, 8) and logvar.shape == (2, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="SSEncoder expects"):
        enc(torch.zeros(2, 32, 32, 32))


def test_slat_encoder_shapes_and_kl_zero_at_prior():
    enc = SLaTEncoder(in_features=125, channels=16, latent_channels=8)
    coords = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [1, 3, 3, 3]], dtype=torch.int32)
    mean, logvar = enc(torch.zeros(3, 125), coords)
    assert mean.shape == (3, 8) and logvar.shape == (3, 8)
    assert kl_divergence(torch.zeros(4, 8), torch.zeros(4, 8)).item() == 0.0
    with pytest.raises(ValueError, match="SLaTEncoder expects"):
        enc(torch.zeros(3, 7), coords)


def test_sampled_sdf_of_a_box_is_close_to_exact():
    v, f = _box_mesh(0.25)
    pts, nrm = sample_oriented_surface(v, f, 4096, torch.Generator().manual_seed(0))
    q = torch.tensor([[0.0, 0, 0], [0.3, 0, 0], [0.26, 0.1, 0.0], [0.2, 0.0, 0.1]])
    exact = torch.tensor([-0.25, 0.05, 0.01, -0.05])
    got = sampled_sdf(q, pts, nrm, near=0.06)
    assert torch.allclose(got, exact, atol=0.01), got


def test_view_geometry_box_is_view_aligned_and_targets_index_corners():
    v, f = _box_mesh(0.5)  # canonical unit cube
    pts, nrm = sample_oriented_surface(v, f, 8192, torch.Generator().manual_seed(0))
    g = view_geometry(v, pts, nrm, torch.eye(3), torch.tensor([0.0, 0.0, 2.0]), 0.4, res=8, sub=4)
    assert torch.allclose(g.center, torch.tensor([0.0, 0.0, 2.0])) and math.isclose(float(g.size), 0.4, rel_tol=1e-6)
    assert g.occupancy.all()  # the cube fills the normalised grid
    # surface voxels of a full 8^3 grid = its outer shell
    assert len(g.coords) == 8 ** 3 - 6 ** 3
    assert g.corner_sdf.shape == (len(g.coords), 125)
    # corner_targets: the output cube at 4*voxel + (1,2,3) takes lattice corners (1..2, 2..3, 3..4)
    out_coords = torch.zeros(64, 4, dtype=torch.int32)
    out_coords[5, 1:] = torch.tensor([1, 2, 3])
    lattice = torch.arange(125, dtype=torch.float32)[None]
    tgt = corner_targets(out_coords, lattice)
    off = lattice_offsets(4)
    expected = [int(((off == torch.tensor([1 + dx, 2 + dy, 3 + dz])).all(1)).nonzero()) for dx, dy, dz in
                [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]]
    assert tgt[5].tolist() == expected


def test_layout_tokens_invert_decode_layout():
    center = torch.tensor([[0.1, -0.2, 1.5]])
    size = torch.tensor([0.3])
    scale, shift = torch.tensor([0.05]), torch.tensor([[0.1, -0.1, 1.4]])
    tok = layout_tokens(center, size, scale, shift)
    lay = decode_layout(tok, scale.repeat(3), shift[0])
    np.testing.assert_allclose(lay.rotation, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(lay.translation, center[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(lay.scale, [0.3] * 3, rtol=1e-5)


def _tiny_trainset(n: int = 2) -> TrainSet:
    occ = torch.zeros(n, 32, 32, 32, dtype=torch.bool)
    occ[:, 12:20, 12:20, 12:20] = True
    from fs3d_accel.stages.ss import surface_voxels
    coords = [torch.nonzero(surface_voxels(o)).to(torch.int32)[:40] for o in occ]
    sdf = [torch.linspace(-0.02, 0.02, 125).repeat(len(c), 1).half() for c in coords]
    s = 112
    cond = {k: torch.rand(n, 3 if k in ("image", "rgb_image", "pointmap", "rgb_pointmap") else 1, s, s).half()
            for k in ("image", "mask", "rgb_image", "rgb_image_mask", "pointmap", "rgb_pointmap")}
    return TrainSet(cond=cond, scene_scale=torch.ones(n), scene_shift=torch.zeros(n, 3), occupancy=occ,
                    coords=coords, corner_sdf=sdf, center=torch.tensor([[0, 0, 2.0]] * n), size=torch.ones(n) * 0.5,
                    view_shape=torch.arange(n))


def test_each_stage_runs_one_step_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    pipe = Pipeline.from_config("mini")
    ts = _tiny_trainset()
    tr = MiniTrainer(pipe, ts, tmp_path, printer=lambda *_: None)
    one = dict(seconds=1e9, batch=1, lr=1e-4, max_steps=1)
    tr.ss_vae(StageConfig(**one))
    tr.slat_vae(StageConfig(**one))
    stats = tr.encode()
    assert len(stats["ss_latent_std"]) == 8 and len(stats["slat_std"]) == 8
    assert tr.shape_latents.shape == (2, 512, 8)
    # the folded SS std makes the normalised latents unit-scale per channel
    assert torch.allclose(tr.shape_latents.std(dim=(0, 1)), torch.ones(8), atol=1e-3)
    tr.ss_flow(StageConfig(**one))
    tr.slat_flow(StageConfig(**one))
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("stage,step") and {r.split(",")[0] for r in rows[1:]} == {
        "ss_vae", "slat_vae", "ss_flow", "slat_flow"}
    tr.save(tmp_path / "ckpt")
    pipe2 = Pipeline.from_config("mini", seed=1)
    tr2 = MiniTrainer(pipe2, ts, tmp_path / "b", printer=lambda *_: None)
    loaded = tr2.load(tmp_path / "ckpt")
    assert set(loaded) == set(MiniTrainer.COMPONENTS) | {"ss_encoder", "slat_encoder"}
    for k, v in pipe2.ss.flow.state_dict().items():
        assert torch.allclose(v, tr.emas["ss.flow"].shadow[k].half().float(), atol=0), k
    assert tr2.stats == stats
    # export refuses a checkpoint whose SLaT normalisation differs from mini_config's
    from fs3d_accel.training.export import load_trained_pipeline
    with pytest.raises(ValueError, match="update fs3d_accel/model/configs.py"):
        load_trained_pipeline(tmp_path / "ckpt")


def test_run_stage_reduces_a_quadratic_and_rejects_nan(tmp_path):
    from fs3d_accel.training.trainers import CSVLog
    w = torch.nn.Parameter(torch.tensor([3.0]))
    log = CSVLog(tmp_path / "l.csv")
    run_stage("q", StageConfig(1e9, 1, 0.1, max_steps=200, warmup=1), [w], lambda s: ((w ** 2).sum(), ""), log,
              lambda *_: None)
    assert abs(w.item()) < 0.5
    with pytest.raises(FloatingPointError, match="loss is nan"):
        run_stage("n", StageConfig(1e9, 1, 0.1, max_steps=2), [w], lambda s: (w.sum() * float("nan"), ""), log,
                  lambda *_: None)
