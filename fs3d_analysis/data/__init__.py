"""Evaluation and training data: shape corpus, offline renderer, datasets, layouts.

* `layout`: `Layout` (SAM 3D pose convention ``x_cam = (s * x) @ R + t``, PyTorch3D camera frame).
* `sources` / `corpus`: YCB scans (eval) and pybullet_data + procedural shapes (train), normalised
  to [-0.5, 0.5]^3 with occupancies and surface samples; `build_corpus()`.
* `render`: CPU ray-casting renderer (RGB, mask, depth, point map, GT layout).
* `dataset`: `Sample`, `RenderedDataset`, `load_shipped_samples()`.
"""
from fs3d_analysis.data.layout import Layout
from fs3d_analysis.data.corpus import Manifest, build_corpus, load_manifest
from fs3d_analysis.data.dataset import RenderedDataset, Sample, SampleSet, load_shipped_samples
from fs3d_analysis.data.render import Camera, Rendering, SceneObject, render

__all__ = [
    "Layout", "Manifest", "build_corpus", "load_manifest", "RenderedDataset", "Sample", "SampleSet",
    "load_shipped_samples", "Camera", "Rendering", "SceneObject", "render",
]
