"""The synthetic inputs and the random-weight sparsifier shared by tests, notebooks and benchmarks."""
import numpy as np
import pytest
import torch

from conftest import fast_mini_config
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.synthetic import sparsify_occupancy, synthetic_scene


def test_synthetic_scene_shapes_and_determinism():
    img, mask, pm = synthetic_scene(16, 20, seed=3)
    assert img.shape == (16, 20, 3) and img.dtype == np.uint8 and mask.shape == (16, 20) and pm.dtype == np.float32
    assert mask.sum() == (12 - 4) * (13 - 6) and mask[4, 6] and not mask[3, 6]
    assert pm[0, 0, 2] == np.float32(2.0) and pm[0, 10, 2] == np.float32(2.02)
    np.testing.assert_array_equal(synthetic_scene(16, 20, seed=3)[0], img)


def test_sparsify_hits_the_fraction_and_rejects_bad_fractions():
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2), seed=0)
    before = pipe.ss.decoder.out_layer[2].bias.clone()
    shift = sparsify_occupancy(pipe, occupied_fraction=0.05)
    assert torch.allclose(before - pipe.ss.decoder.out_layer[2].bias, torch.full_like(before, shift))
    img, mask, pm = synthetic_scene()
    ss = pipe.run_ss(pipe.prepare(img, mask, pm), seed=0)
    occupied = float((ss.occupancy_logits > 0).float().mean())
    assert 0.04 <= occupied <= 0.06, occupied
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="occupied_fraction"):
            sparsify_occupancy(pipe, occupied_fraction=bad)


def test_weights_fingerprint_follows_the_weights_not_the_object():
    from fs3d_analysis.notebook_utils import weights_fingerprint

    a = Pipeline.from_config(fast_mini_config(ss_steps=2), seed=0)
    b = Pipeline.from_config(fast_mini_config(ss_steps=2), seed=0)
    fa = weights_fingerprint(a)
    assert len(fa) == 12 and fa == weights_fingerprint(b)
    with torch.no_grad():
        b.slat.flow.out_layer.bias.add_(1e-3)
    assert weights_fingerprint(b) != fa
    assert weights_fingerprint(Pipeline.from_config(fast_mini_config(ss_steps=2), seed=1)) != fa
