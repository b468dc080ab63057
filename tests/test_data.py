"""Layouts, renderer, corpus (on a handful of shapes), datasets and the shipped samples."""
import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from fs3d_analysis.data.corpus import Manifest, build_corpus, default_root, load_manifest, prepare_shape
from fs3d_analysis.data.dataset import SAMPLES_DIR, RenderedDataset, Sample, load_shipped_samples
from fs3d_analysis.data.layout import Layout, quaternion_to_matrix
from fs3d_analysis.data.render import Camera, SceneObject, depth_to_pointmap, render
from fs3d_analysis.data.sources import list_shapes, load_mesh_file


def surface_distance(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    _, d, _ = trimesh.proximity.closest_point(mesh, points)
    return d


# --- layout -----------------------------------------------------------------------------------

def test_layout_convention_row_vectors_and_quaternion():
    q = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])  # 90 deg about z, wxyz
    r = quaternion_to_matrix(q)
    np.testing.assert_allclose(r, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    lay = Layout.from_quaternion(q, [0, 0, 2], 0.5)
    # x_cam = (s * x) @ R + t
    np.testing.assert_allclose(lay.apply(np.array([[1.0, 0, 0]])), [[0, -0.5, 2]], atol=1e-12)
    np.testing.assert_allclose(lay.to_quaternion(), q, atol=1e-12)
    np.testing.assert_allclose(lay.scale, [0.5, 0.5, 0.5])
    pts = np.random.default_rng(0).random((5, 3))
    np.testing.assert_allclose(lay.inverse_apply(lay.apply(pts)), pts, atol=1e-12)
    rnd = Rotation.random(random_state=3)
    xyzw = rnd.as_quat()
    lay2 = Layout(rnd.as_matrix(), np.zeros(3), 1.0)
    assert abs(np.dot(lay2.to_quaternion(), [xyzw[3], *xyzw[:3]])) == pytest.approx(1.0)
    assert Layout.from_dict(json.loads(json.dumps(lay.as_dict()))).to_quaternion() == pytest.approx(q)


def test_layout_validation():
    with pytest.raises(ValueError, match="proper rotation"):
        Layout(np.diag([1.0, 1.0, -1.0]), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        Layout(np.eye(3), np.zeros(3), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"translation must have shape \(3,\)"):
        Layout(np.eye(3), np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="finite"):
        Layout(np.eye(3), [0, np.nan, 0], 1.0)


# --- renderer ---------------------------------------------------------------------------------

def test_render_cube_mask_area_and_depth():
    cam = Camera.from_fov(128, fov_deg=60.0)
    side, z = 0.5, 2.0
    r = render([SceneObject("cube", trimesh.creation.box(), Layout(np.eye(3), [0, 0, z], side))], cam)
    # front face at depth z - side/2; pixel centres strictly inside its projection are covered
    zf = z - side / 2
    half_px = side / 2 * cam.fx / zf
    centres = np.arange(cam.width) + 0.5 - cam.cx
    n = int((np.abs(centres) < half_px).sum())
    assert r.mask(0).sum() == n * n == 32 * 32
    covered = r.mask(0)
    np.testing.assert_allclose(r.depth[covered], zf, rtol=1e-6)
    np.testing.assert_allclose(r.pointmap[covered][:, 2], zf, rtol=1e-6)
    # PyTorch3D frame: pixel right of centre -> x negative; pixel below centre -> y negative
    p = r.pointmap[70, 70]
    assert p[0] < 0 and p[1] < 0
    np.testing.assert_allclose(p[:2], [-(70.5 - cam.cx) * zf / cam.fx, -(70.5 - cam.cy) * zf / cam.fy], rtol=1e-5)
    assert np.isinf(r.depth[0, 0]) and np.isnan(r.pointmap[0, 0]).all() and r.instance[0, 0] == -1
    assert r.rgb.dtype == np.uint8 and r.rgb.shape == (128, 128, 3)


def test_render_pointmap_lies_on_posed_mesh_and_projects_back():
    mesh = trimesh.creation.icosphere(3, radius=0.5)
    lay = Layout(Rotation.from_euler("xyz", [20, 40, 60], degrees=True).as_matrix(), [0.1, -0.05, 1.5], 0.4)
    cam = Camera.from_fov(96)
    r = render([SceneObject("ball", mesh, lay)], cam)
    pts = r.pointmap[r.mask(0)]
    posed = trimesh.Trimesh(lay.apply(mesh.vertices), mesh.faces, process=False)
    assert surface_distance(posed, pts.astype(np.float64)).max() < 1e-5
    uv = cam.project(pts)
    vv, uu = np.nonzero(r.mask(0))
    np.testing.assert_allclose(uv, np.stack([uu + 0.5, vv + 0.5], 1), atol=1e-3)
    np.testing.assert_array_equal(depth_to_pointmap(r.depth, cam), r.pointmap)


def test_render_occlusion_between_objects():
    cam = Camera.from_fov(64)
    near = SceneObject("near", trimesh.creation.box(), Layout(np.eye(3), [0, 0, 1.0], 0.2))
    far = SceneObject("far", trimesh.creation.box(), Layout(np.eye(3), [0, 0, 2.0], 0.6))
    r = render([far, near], cam)
    assert r.instance[32, 32] == 1  # the near box hides the far one at the centre
    assert r.mask(0).sum() > 0 and not np.any(r.mask(0) & r.mask(1))
    with pytest.raises(ValueError, match="behind the camera"):
        render([SceneObject("x", trimesh.creation.box(), Layout(np.eye(3), [0, 0, 0.1], 1.0))], cam)


# --- corpus -----------------------------------------------------------------------------------

def test_sources_listing():
    refs = list_shapes()
    by_source = {s: [r for r in refs if r.source == s] for s in {r.source for r in refs}}
    assert len(by_source["ycb"]) == 78
    assert len(by_source["pybullet_procedural"]) == 1000
    assert all(r.split == "eval" for r in by_source["ycb"])
    assert all(r.split == "train" for r in refs if r.source != "ycb")
    with pytest.raises(ValueError, match="unknown corpus sources"):
        list_shapes(["shapenet"])


def test_build_corpus_small(tmp_path):
    m = build_corpus(tmp_path, resolution=32, progress=False, limit=1, n_procedural=2, workers=1, n_surface_points=256)
    assert {e.source for e in m.split("eval")} == {"ycb"}
    assert {e.source for e in m.split("train")} == {"pybullet_procedural", "pybullet_props", "procedural"}
    assert not ({e.name for e in m.split("eval")} & {e.name for e in m.split("train")})
    m.check_split()
    again = load_manifest(tmp_path, resolution=32)
    assert again.entries == m.entries
    shape = again.load(m.split("eval")[0])
    assert shape.occupancy.shape == (32, 32, 32) and shape.occupancy.any()
    assert np.ptp(shape.mesh.vertices, axis=0).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(shape.mesh.bounds.sum(axis=0), 0.0, atol=1e-6)  # centred box
    assert shape.surface_points.shape == (256, 3) and np.abs(shape.surface_points).max() <= 0.5 + 1e-6
    # a resumed build reuses the files and gives the same manifest
    assert build_corpus(tmp_path, resolution=32, progress=False, limit=1, n_procedural=2, workers=1,
                        n_surface_points=256).entries == m.entries


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FS3D_CACHE", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("FS3D_CACHE")
    assert default_root() == Path("~/.cache/fs3d").expanduser()


def test_check_split_detects_overlap(tmp_path):
    m = build_corpus(tmp_path, resolution=16, progress=False, sources=["ycb"], limit=1, workers=1, n_surface_points=16)
    e = m.entries[0]
    leaked = type(e)(**{**e.__dict__, "name": "copy_in_train", "source": "procedural", "split": "train"})
    bad = Manifest(m.folder, m.resolution, m.n_surface_points, m.entries + (leaked,))
    with pytest.raises(ValueError, match="identical geometry in eval and train"):
        bad.check_split()
    wrong = type(e)(**{**e.__dict__, "split": "train"})
    with pytest.raises(ValueError, match="belongs to split eval"):
        Manifest(m.folder, m.resolution, m.n_surface_points, (wrong,)).check_split()


def test_bad_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.obj"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no triangles"):
        load_mesh_file(empty)
    with pytest.raises(FileNotFoundError):
        load_mesh_file(tmp_path / "missing.obj")
    with pytest.raises(ValueError, match="empty"):
        prepare_shape(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int)))
    nan = trimesh.creation.box()
    nan.vertices[3] = [np.nan, 0, 0]
    with pytest.raises(ValueError, match="not finite"):
        prepare_shape(nan)


def test_prepare_shape_is_robust_to_holes():
    closed = trimesh.creation.icosphere(3, radius=2.0)
    holed = trimesh.Trimesh(closed.vertices, closed.faces[30:], process=False)
    _, occ_closed, _ = prepare_shape(closed, resolution=32, n_surface_points=8)
    _, occ_holed, _ = prepare_shape(holed, resolution=32, n_surface_points=8)
    assert occ_closed.mean() == pytest.approx(np.pi / 6, abs=0.06)  # ball in its unit box
    assert (occ_closed != occ_holed).mean() < 0.01


# --- datasets ---------------------------------------------------------------------------------

def test_rendered_dataset_is_deterministic_and_scene_level():
    meshes = [(f"s{i}", trimesh.creation.icosphere(2, radius=0.5)) for i in range(3)]
    ds = RenderedDataset.from_meshes(meshes, num_scenes=2, objects_per_scene=2, image_size=64, seed=5)
    assert len(ds) == 4
    a, b = ds[0], ds[1]
    assert isinstance(a, Sample) and a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    assert a.mask.dtype == bool and a.pointmap.dtype == np.float32 and a.pointmap.shape == (64, 64, 3)
    assert a.scene_id == b.scene_id == 0 and a.image is b.image and not np.any(a.mask & b.mask)
    again = RenderedDataset.from_meshes(meshes, num_scenes=2, objects_per_scene=2, image_size=64, seed=5)[3]
    np.testing.assert_array_equal(again.image, ds[3].image)
    assert np.isfinite(a.pointmap[a.mask]).all()
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="objects_per_scene"):
        RenderedDataset.from_meshes(meshes, objects_per_scene=4)


def test_sample_validation():
    s = load_shipped_samples()[0]
    with pytest.raises(TypeError, match="image must be uint8"):
        Sample(s.image.astype(np.float32), s.mask, s.pointmap, s.mesh, s.layout, "x", s.intrinsics)
    with pytest.raises(ValueError, match="mask is empty"):
        Sample(s.image, np.zeros_like(s.mask), s.pointmap, s.mesh, s.layout, "x", s.intrinsics)


def test_shipped_samples():
    size = sum(p.stat().st_size for p in SAMPLES_DIR.iterdir())
    assert size < 5e6
    samples = load_shipped_samples()
    assert len(samples) == 8
    for s in samples:
        assert s.image.shape == (160, 160, 3) and s.mask.sum() >= 64
        assert len(s.mesh.faces) <= 4000
        assert np.abs(s.mesh.vertices).max() <= 0.5 + 1e-6
        assert s.name[:3].isdigit()  # YCB ids
        pts = s.pointmap[s.mask].astype(np.float64)
        assert np.isfinite(pts).all()
        # the point map on the mask lies on the GT mesh posed by the GT layout
        assert surface_distance(s.posed_mesh(), pts).max() < 1e-4
    scene = [s for s in samples if s.scene_id == samples[-1].scene_id]
    assert len(scene) == 2 and np.array_equal(scene[0].image, scene[1].image)
