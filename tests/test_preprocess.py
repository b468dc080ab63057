"""Input validation and the official pre-processing / pose decoding."""
import numpy as np
import pytest
import torch

from fs3d_accel.pose import Layout, decode_layout, matrix_to_quaternion, rotation_6d_to_matrix
from fs3d_accel.model.configs import ROTATION_6D_MEAN, ROTATION_6D_STD
from fs3d_accel.preprocess import InputError, crop_box, normalize_pointmap, prepare_inputs


def _scene(h=40, w=60):
    img = np.full((h, w, 3), 128, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[10:20, 20:40] = True
    ys, xs = np.mgrid[0:h, 0:w]
    pm = np.stack([xs * 0.01, ys * 0.01, np.full((h, w), 2.0)], -1).astype(np.float32)
    return img, mask, pm


def test_prepare_shapes_and_ranges():
    img, mask, pm = _scene()
    p = prepare_inputs(img, mask, pm, size=56)
    assert p.image.shape == (1, 3, 56, 56) and p.rgb_pointmap.shape == (1, 3, 56, 56)
    assert 0 <= float(p.image.min()) and float(p.image.max()) <= 1
    assert set(torch.unique(p.mask).tolist()) <= {0.0, 1.0}
    # object-centric normalisation: the masked points' median is at the origin
    assert torch.allclose(p.pointmap_shift, torch.tensor([0.295, 0.145, 2.0]), atol=1e-6)


def test_crop_box_square_with_factor():
    m = torch.zeros(50, 50, dtype=torch.bool)
    m[10:21, 5:36] = True  # h = 10, w = 30 (max - min)
    top, left, size = crop_box(m, 1.2)
    assert (top, left, size) == (-3, 2, 36)  # centred on (cy, cx) = (15, 20); may leave the image


def test_normalize_pointmap_unit_scale():
    pm = torch.zeros(3, 4, 4)
    pm[0] = torch.arange(16.).reshape(4, 4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    n, scale, shift = normalize_pointmap(pm, mask)
    assert torch.allclose(shift, torch.tensor([7.5, 0, 0]))
    # deviations |x - 7.5| over pixels: median = 4.0
    assert torch.allclose(scale, torch.full((3,), 4.0))


@pytest.mark.parametrize("mutate, message", [
    (lambda i, m, p: (i, np.zeros_like(m), p), "mask is empty"),
    (lambda i, m, p: (i, np.ones_like(m), p), "every pixel"),
    (lambda i, m, p: (i, m.astype(np.uint8) * 7, p), "binary"),
    (lambda i, m, p: (i, m[:-1], p), "differs from image size"),
    (lambda i, m, p: (i[..., :2], m, p), "HxWx3"),
    (lambda i, m, p: (i.astype(np.int32), m, p), "dtype"),
    (lambda i, m, p: (i.astype(np.float32), m, p), r"\[0,1\]"),
    (lambda i, m, p: (i, m, p[..., :2]), "pointmap must be HxWx3"),
    (lambda i, m, p: (i, m, p[:-1]), "pointmap size"),
    (lambda i, m, p: (i, m, np.full_like(p, np.nan)), "no finite point"),
    (lambda i, m, p: (i, m, None), "pointmap is required"),
])
def test_bad_inputs_raise_specific_errors(mutate, message):
    img, mask, pm = _scene()
    with pytest.raises(InputError, match=message):
        prepare_inputs(*mutate(img, mask, pm), size=28)


def test_rotation_6d_gram_schmidt_columns():
    d6 = torch.tensor([2.0, 0, 0, 1.0, 3.0, 0], dtype=torch.float64)
    r = rotation_6d_to_matrix(d6)
    assert torch.allclose(r, torch.eye(3, dtype=torch.float64))
    d6 = torch.tensor([0.0, 1, 0, -1, 0, 0], dtype=torch.float64)
    r = rotation_6d_to_matrix(d6)
    assert torch.allclose(r[:, 0], torch.tensor([0.0, 1, 0], dtype=torch.float64))
    assert torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64))
    assert torch.isclose(torch.det(r), torch.tensor(1.0, dtype=torch.float64))


def test_quaternion_of_90deg_about_z():
    r = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    q = matrix_to_quaternion(r)
    s = 2 ** -0.5
    assert torch.allclose(q, torch.tensor([s, 0, 0, s], dtype=torch.float64))


def test_decode_layout_metric_composition():
    mean, std = torch.tensor(ROTATION_6D_MEAN), torch.tensor(ROTATION_6D_STD)
    d6 = (torch.tensor([1.0, 0, 0, 0, 1, 0]) - mean) / std
    lat = {"6drotation_normalized": d6.view(1, 1, 6), "scale": torch.log(torch.tensor([[[0.5, 0.5, 0.5]]])),
           "translation": torch.tensor([[[0.1, -0.2, 1.0]]]), "translation_scale": torch.zeros(1, 1, 1)}
    lay = decode_layout(lat, torch.full((3,), 2.0), torch.tensor([0.0, 0.0, 3.0]), downsample_factor=1)
    assert np.allclose(lay.rotation, np.eye(3), atol=1e-5)
    assert np.allclose(lay.scale, [1.0, 1.0, 1.0], atol=1e-6)
    assert np.allclose(lay.translation, [0.2, -0.4, 5.0], atol=1e-6)
    assert np.allclose(lay.apply(np.array([[0.5, 0, 0]])), [[0.7, -0.4, 5.0]], atol=1e-5)
    assert isinstance(lay, Layout)
