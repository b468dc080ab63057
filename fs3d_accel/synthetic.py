"""Synthetic inputs and random-weight helpers for tests, notebooks' development mode and benchmarks.

A seeded random pipeline is useful for profiling and for exercising code paths, but its SS decoder
marks about half of the occupancy grid, which makes every sparse stage slow; :func:`sparsify_occupancy`
shifts the decoder's output bias so that a chosen fraction of the grid is occupied instead.
"""
from __future__ import annotations

import numpy as np
import torch


def synthetic_scene(h: int = 64, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (uint8 HxWx3, seeded noise), mask (a centred box) and camera-frame point map (a plane
    tilted along x at z ~ 2 m)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = True
    ys, xs = np.mgrid[0:h, 0:w]
    pm = np.stack([(xs - w / 2) * 0.01, (ys - h / 2) * 0.01, 2.0 + 0.002 * xs], -1).astype(np.float32)
    return img, mask, pm


def sparsify_occupancy(pipe, occupied_fraction: float = 0.03, seed: int = 0, sampler=None) -> float:
    """Shift the SS decoder's output bias so that about ``occupied_fraction`` of the grid is occupied
    on :func:`synthetic_scene` (``sampler``: SS sampler override, e.g. a short one to start fast).
    Returns the shift subtracted from the bias."""
    if not 0 < occupied_fraction < 1:
        raise ValueError(f"occupied_fraction must be in (0, 1), got {occupied_fraction}")
    img, mask, pm = synthetic_scene()
    ss = pipe.run_ss(pipe.prepare(img, mask, pm), seed=seed, sampler=sampler)
    q = torch.quantile(ss.occupancy_logits.flatten().float().cpu(), 1 - occupied_fraction)
    bias = pipe.ss.decoder.out_layer[2].bias
    with torch.no_grad():
        bias -= q.to(bias.device, bias.dtype)
    return float(q)


__all__ = ["sparsify_occupancy", "synthetic_scene"]
