"""Shared fixtures: a small, fast mini pipeline (random weights) and a synthetic scene."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fs3d_accel.model.configs import SamplerConfig, mini_config


def make_scene(h: int = 64, w: int = 80, seed: int = 0):
    """Synthetic image / mask / camera-frame point map (a tilted plane at z ~ 2)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = True
    ys, xs = np.mgrid[0:h, 0:w]
    pm = np.stack([(xs - w / 2) * 0.01, (ys - h / 2) * 0.01, 2.0 + 0.002 * xs], -1).astype(np.float32)
    return img, mask, pm


def fast_mini_config(ss_steps: int = 3, slat_steps: int = 3):
    """The mini architecture with short sampler schedules (CFG kept on, so both branches run)."""
    cfg = mini_config()
    return cfg.with_samplers(SamplerConfig(steps=ss_steps, rescale_t=3.0, cfg_strength=7.0),
                             SamplerConfig(steps=slat_steps, rescale_t=1.0, cfg_strength=1.0))


def sparsify_occupancy(pipe, occupied_fraction: float = 0.03, seed: int = 0) -> None:
    """Shift the random SS decoder's output bias so that about ``occupied_fraction`` of the grid is
    occupied: random weights otherwise fill half the volume and make the sparse stages slow."""
    img, mask, pm = make_scene()
    inputs = pipe.prepare(img, mask, pm)
    ss = pipe.run_ss(inputs, seed=seed)
    q = torch.quantile(ss.occupancy_logits.flatten(), 1 - occupied_fraction)
    with torch.no_grad():
        pipe.ss.decoder.out_layer[2].bias -= q


@pytest.fixture(scope="session")
def scene():
    return make_scene()


@pytest.fixture(scope="session")
def mini_pipe():
    from fs3d_accel.pipeline import Pipeline
    pipe = Pipeline.from_config(fast_mini_config(), seed=0)
    sparsify_occupancy(pipe)
    return pipe
