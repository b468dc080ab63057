"""Point-map estimation plug-ins.

The official pipeline estimates a camera-frame point map with MoGe when the user gives none. Here
the estimator is a plug-in: any callable ``(image uint8 HxWx3) -> point map float32 HxWx3`` in the
PyTorch3D camera frame (x left, y up, z forward). :class:`MoGeDepthEstimator` wraps MoGe when its
package and weights are present.
"""
from __future__ import annotations

import importlib.util
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DepthEstimator(Protocol):
    def __call__(self, image: np.ndarray) -> np.ndarray: ...


class MoGeDepthEstimator:
    """MoGe v1 point-map estimator (``moge.model.v1.MoGeModel``), as the official pipeline uses.

    MoGe returns OpenCV-frame points (x right, y down); the official pipeline flips x and y into the
    PyTorch3D camera frame, and so do we.
    """

    def __init__(self, weights: str, device: str = "cuda") -> None:
        if importlib.util.find_spec("moge") is None:
            raise ImportError("MoGe is not installed: `pip install git+https://github.com/microsoft/MoGe` "
                              "(and download its weights), or pass a point map to the pipeline")
        import torch
        from moge.model.v1 import MoGeModel  # type: ignore

        self.torch = torch
        self.device = device
        self.model = MoGeModel.from_pretrained(weights).to(device).eval()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.asarray(image)).float().div(255).permute(2, 0, 1).to(self.device)
        with torch.no_grad():
            out = self.model.infer(x, force_projection=False)
        pts = out["points"].float().cpu().numpy()
        pts[..., 0] *= -1
        pts[..., 1] *= -1
        return pts
