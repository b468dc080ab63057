"""Reconstruction metrics on analytic cases, against point-cloud-utils and brute force."""
import numpy as np
import point_cloud_utils as pcu
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from fs3d_analysis.data.layout import Layout
from fs3d_analysis.metrics import (
    align,
    box_iou_3d,
    chamfer_distance,
    f_score,
    normalize_mesh,
    occupancy_grid,
    rotation_error_deg,
    sample_surface,
    shape_metrics,
    translation_error,
    volume_iou,
)
from fs3d_analysis.data.procedural import procedural_shape

CUBE_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float) - 0.5


def rot(axis: str, deg: float) -> np.ndarray:
    return Rotation.from_euler(axis, deg, degrees=True).as_matrix()


# --- identical inputs -------------------------------------------------------------------------

def test_identical_meshes_are_perfect():
    mesh, _ = normalize_mesh(procedural_shape(1)[1])
    m = shape_metrics(mesh, mesh.copy(), n_points=2000)
    pts = sample_surface(mesh, 2000)
    assert chamfer_distance(pts, pts) == 0.0
    assert f_score(pts, pts) == 100.0
    assert m.volume_iou == 1.0
    assert m.f_score == 100.0 and m.chamfer == 0.0


# --- shifted unit cubes -----------------------------------------------------------------------

@pytest.mark.parametrize("d, cd, f1", [(0.1, 0.2, 0.0), (0.03, 0.06, 100.0)])
def test_shifted_cube_corners_chamfer_and_fscore(d, cd, f1):
    # every corner's nearest neighbour is its own shifted copy (d < 0.5), at distance d
    b = CUBE_CORNERS + [d, 0, 0]
    assert chamfer_distance(CUBE_CORNERS, b) == pytest.approx(cd)
    assert f_score(CUBE_CORNERS, b, 0.05) == pytest.approx(f1)


def test_fscore_precision_recall():
    # 8 exact points + 2 far-away extra predictions: P = 0.8, R = 1 -> F = 2*0.8/1.8
    pred = np.vstack([CUBE_CORNERS, [[5, 5, 5], [6, 6, 6]]])
    assert f_score(pred, CUBE_CORNERS) == pytest.approx(100 * 1.6 / 1.8)
    assert f_score(CUBE_CORNERS, pred) == pytest.approx(100 * 1.6 / 1.8)


def test_volume_iou_shifted_cubes_exact_voxel_count():
    # half side 16.25 voxels: faces inside voxels 15 and 48, so 34 occupied voxels per axis.
    h = 16.25 / 64
    a = trimesh.creation.box(extents=(2 * h,) * 3)
    occ = occupancy_grid(a)
    idx = np.argwhere(occ)
    assert occ.sum() == 34 ** 3
    assert idx.min() == 15 and idx.max() == 48
    b = a.copy()
    b.apply_translation([8 / 64, 0, 0])  # shift by 8 voxels: overlap 26 of 34 in x
    assert volume_iou(a, b) == pytest.approx(26 / 42)
    assert volume_iou(occ, occupancy_grid(b)) == pytest.approx(26 / 42)


def test_box_iou_analytic():
    eye = Layout(np.eye(3), np.zeros(3), 1.0)
    assert box_iou_3d(eye, eye) == pytest.approx(1.0)
    assert box_iou_3d(eye, Layout(np.eye(3), [0.5, 0, 0], 1.0)) == pytest.approx(1 / 3)
    # unit square rotated 45 deg about z: octagon of area 2(sqrt2 - 1) -> IoU = 1/sqrt2
    assert box_iou_3d(eye, Layout(rot("z", 45), np.zeros(3), 1.0)) == pytest.approx(1 / np.sqrt(2))
    assert box_iou_3d(eye, Layout(np.eye(3), [3, 0, 0], 1.0)) == 0.0
    assert box_iou_3d(eye, Layout(np.eye(3), [1, 0, 0], 1.0)) == 0.0  # touching faces
    # corners input and a box nested inside: IoU = volume ratio
    assert box_iou_3d(CUBE_CORNERS, 0.5 * CUBE_CORNERS) == pytest.approx(0.125)


def test_rotation_and_translation_errors():
    assert rotation_error_deg(rot("x", 90), np.eye(3)) == pytest.approx(90.0)
    assert rotation_error_deg(rot("z", 30) @ rot("y", 20), rot("z", 30) @ rot("y", 20)) == pytest.approx(0.0, abs=1e-5)
    a = Layout(rot("y", 10), [0, 0, 2.0], 0.3)
    b = Layout(rot("y", 100), [0.3, 0.4, 2.0], 0.3)
    assert rotation_error_deg(a, b) == pytest.approx(90.0)
    assert rotation_error_deg(a.to_quaternion(), b.to_quaternion()) == pytest.approx(90.0)
    assert translation_error(a, b) == pytest.approx(0.5)
    assert translation_error(b, a, relative=True) == pytest.approx(0.25)


# --- agreement with point-cloud-utils and brute force ----------------------------------------

@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_chamfer_matches_point_cloud_utils(index):
    a = sample_surface(normalize_mesh(procedural_shape(index)[1])[0], 1500, seed=1)
    b = sample_surface(normalize_mesh(procedural_shape(index + 4)[1])[0], 1200, seed=2)
    assert chamfer_distance(a, b) == pytest.approx(float(pcu.chamfer_distance(a, b)), rel=1e-9)


def test_fscore_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.random((300, 3)), rng.random((250, 3)) + 0.02
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    p, r = (d.min(1) < 0.05).mean(), (d.min(0) < 0.05).mean()
    assert f_score(a, b) == pytest.approx(100 * 2 * p * r / (p + r))


def test_volume_iou_sphere_scaling():
    # concentric spheres r=0.3 and 0.4: IoU ~ (3/4)^3 up to the surface-voxel layer
    s1 = trimesh.creation.icosphere(4, radius=0.3)
    s2 = trimesh.creation.icosphere(4, radius=0.4)
    assert volume_iou(s1, s2) == pytest.approx(0.75 ** 3, abs=0.04)


# --- normalisation and alignment ---------------------------------------------------------------

def test_normalize_and_align():
    mesh = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    mesh.apply_translation([3, -1, 7])
    n, norm = normalize_mesh(mesh)
    np.testing.assert_allclose(n.bounds, [[-0.5, -0.25, -0.125], [0.5, 0.25, 0.125]])
    np.testing.assert_allclose(norm.invert(n.vertices), mesh.vertices)
    big = mesh.copy()
    big.apply_scale(3.0)
    p, g = align(big, mesh, "independent")
    np.testing.assert_allclose(p.vertices, g.vertices, atol=1e-12)
    p, g = align(big, mesh, "gt")
    assert np.ptp(p.vertices, axis=0).max() == pytest.approx(3.0)


# --- errors ------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        chamfer_distance(np.zeros((0, 3)), CUBE_CORNERS)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        f_score(np.zeros((4, 2)), CUBE_CORNERS)
    with pytest.raises(ValueError, match="not finite"):
        chamfer_distance(np.array([[np.nan, 0, 0]]), CUBE_CORNERS)
    with pytest.raises(TypeError, match="sample_surface"):
        chamfer_distance(trimesh.creation.box(), CUBE_CORNERS)
    with pytest.raises(ValueError, match="threshold"):
        f_score(CUBE_CORNERS, CUBE_CORNERS, threshold=0.0)
    with pytest.raises(ValueError, match="outside the grid"):
        volume_iou(trimesh.creation.box(extents=(2, 2, 2)), trimesh.creation.box())
    with pytest.raises(TypeError, match="bool occupancy"):
        volume_iou(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool))
    with pytest.raises(ValueError, match="empty"):
        volume_iou(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool))
    with pytest.raises(ValueError, match="degenerate"):
        box_iou_3d(np.zeros((8, 3)), CUBE_CORNERS)
    with pytest.raises(ValueError, match="rotation matrix"):
        rotation_error_deg(2 * np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="empty"):
        normalize_mesh(trimesh.Trimesh())
    bad = trimesh.creation.box()
    bad.vertices[0, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        normalize_mesh(bad)
