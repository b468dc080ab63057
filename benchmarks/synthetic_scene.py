"""The synthetic scene the GPU benchmarks time (numpy only, so that any version of the package can use it)."""
from __future__ import annotations

import numpy as np


def synthetic_inputs(size: int = 518, seed: int = 0):
    """(image uint8 HxWx3 of noise, mask with a centred box, camera-frame point map of a plane at z = 2)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = True
    ys, xs = np.mgrid[0:size, 0:size]
    pm = np.stack([(xs - size / 2) / size, (ys - size / 2) / size, np.full((size, size), 2.0)], -1).astype(np.float32)
    return img, mask, pm
