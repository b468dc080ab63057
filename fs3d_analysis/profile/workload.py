"""What a profiler runs: synthetic inputs, sampler overrides and realistic sparse voxel sets.

With random weights the SS stage's occupancy is noise (about half the grid), so the SLaT and
decoder stages would see an unrealistic voxel set. :class:`Workload` can replace the SS stage's
coordinates by the surface voxels of a real mesh (:func:`voxelize_mesh`) or of synthetic shells with
a chosen count (:func:`shell_coords`), then runs ``run_slat`` / ``run_decode`` on those.

Every profiler entry point takes ``inputs`` and turns it into a zero-argument callable with
:func:`make_runner`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .modules import is_pipeline


def synthetic_inputs(size: int = 96, seed: int = 0, depth: float = 2.0) -> dict[str, np.ndarray]:
    """A noise image (uint8 HxWx3), a disc mask (bool HxW) and a plane point map at z = ``depth``."""
    if size < 16:
        raise ValueError(f"synthetic image size must be >= 16, got {size}")
    rng = np.random.default_rng(seed)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c, r = (size - 1) / 2, size / 4
    mask = (yy - c) ** 2 + (xx - c) ** 2 < r ** 2
    f = float(size)  # focal length ~ image size
    pointmap = np.stack([(xx - c) / f * depth, (yy - c) / f * depth, np.full_like(xx, depth)], -1)
    return {"image": image, "mask": mask, "pointmap": pointmap.astype(np.float32)}


def _with_batch(xyz: Tensor) -> Tensor:
    xyz = xyz.to(torch.int32)
    return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)


def shell_coords(resolution: int, num_voxels: int, thickness: float = 1.0, spacing: int = 3) -> Tensor:
    """(N, 4) int32 [0, x, y, z]: concentric spherical shells (outermost first) at ``resolution``^3,
    trimmed to exactly ``num_voxels`` voxels (inner shells are added until there are enough).

    Each shell is a surface one voxel thick, so the neighbourhood statistics (about 8-9 active
    neighbours per voxel) resemble the surface voxels the SS stage produces.
    """
    if num_voxels < 1:
        raise ValueError(f"num_voxels must be >= 1, got {num_voxels}")
    r = resolution
    ar = torch.arange(r, dtype=torch.float32)
    g = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), -1)
    dist = ((g - (r - 1) / 2) ** 2).sum(-1).sqrt()
    chosen: list[Tensor] = []
    total = 0
    radius = (r - 1) / 2 - 0.5
    while total < num_voxels and radius > 1:
        shell = torch.nonzero((dist <= radius) & (dist > radius - thickness))
        chosen.append(shell)
        total += len(shell)
        radius -= spacing
    if total < num_voxels:
        raise ValueError(f"cannot place {num_voxels} shell voxels in a {r}^3 grid (max {total})")
    xyz = torch.cat(chosen)[:num_voxels]
    order = torch.argsort((xyz[:, 0] * r + xyz[:, 1]) * r + xyz[:, 2])
    return _with_batch(xyz[order])


def voxelize_mesh(mesh: Any, resolution: int, fill: float = 0.95) -> Tensor:
    """Surface voxels (N, 4) int32 [0, x, y, z] of a trimesh mesh scaled to fit ``fill`` of the grid.

    The mesh is centred on its bounding box and scaled so its longest side spans ``fill*resolution``
    voxels (like the SS stage's normalised object cube).
    """
    import trimesh

    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"expected a trimesh.Trimesh, got {type(mesh).__name__}")
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    lo, hi = mesh.bounds
    extent = float((hi - lo).max())
    if extent <= 0:
        raise ValueError("mesh has zero extent")
    m = mesh.copy()
    m.apply_translation(-(lo + hi) / 2)
    m.apply_scale(fill * resolution / extent)
    m.apply_translation([resolution / 2] * 3)
    vox = m.voxelized(pitch=1.0)
    pts = vox.points  # voxel centres in the scaled frame
    idx = np.floor(pts).astype(np.int64)
    idx = idx[((idx >= 0) & (idx < resolution)).all(1)]
    idx = np.unique(idx, axis=0)
    return _with_batch(torch.from_numpy(idx))


def replace_coords(ss: Any, coords: Tensor) -> Any:
    """An SS output whose voxels are ``coords``; occupancy logits rebuilt to agree (+1 / -1)."""
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be (N, 4) [batch, x, y, z], got {tuple(coords.shape)}")
    r = int(ss.resolution)
    if int(coords[:, 1:].max()) >= r or int(coords.min()) < 0:
        raise ValueError(f"coords must lie in [0, {r}) for this SS output")
    logits = torch.full((r, r, r), -1.0, device=ss.occupancy_logits.device)
    c = coords.long().to(logits.device)
    logits[c[:, 1], c[:, 2], c[:, 3]] = 1.0
    coords = coords.to(device=ss.coords.device, dtype=torch.int32)
    return dataclasses.replace(ss, coords=coords, coords_original=coords, occupancy_logits=logits,
                               downsample_factor=1)


@dataclass
class Workload:
    """One object's run of a pipeline with optional overrides.

    ``ss_sampler`` / ``slat_sampler``: :class:`~fs3d_accel.model.configs.SamplerConfig` overrides
    (fewer steps for quick CPU runs); ``coords``: (N, 4) voxels that replace the SS output before
    the SLaT stage. Stage events are emitted as ``Pipeline.run_prepared`` does.
    """

    image: Any = None
    mask: Any = None
    pointmap: Any = None
    seed: int = 0
    ss_sampler: Any = None
    slat_sampler: Any = None
    coords: Tensor | None = None
    prepared: Any = None

    @classmethod
    def synthetic(cls, size: int = 96, **kwargs: Any) -> "Workload":
        return cls(**synthetic_inputs(size), **kwargs)

    def prepare(self, pipe: nn.Module) -> Any:
        if self.prepared is None:
            if self.image is None or self.mask is None:
                raise ValueError("Workload needs image and mask (or prepared inputs)")
            self.prepared = pipe.prepare(self.image, self.mask, self.pointmap)
        return self.prepared

    def run(self, pipe: nn.Module) -> dict[str, Any]:
        from fs3d_accel.seams import StageEvent

        inputs = self.prepare(pipe)
        out: dict[str, Any] = {}

        def staged(name: str, fn: Callable[[], Any]) -> Any:
            pipe.events.emit(StageEvent(name, "start"))
            res = fn()
            pipe.events.emit(StageEvent(name, "end", {"output": res}))
            out[name] = res
            return res

        ss = staged("ss", lambda: pipe.run_ss(inputs, self.seed, sampler=self.ss_sampler))
        if self.coords is not None:
            ss = replace_coords(ss, self.coords)
            out["ss"] = ss
        slat = staged("slat", lambda: pipe.run_slat(inputs, ss, self.seed, sampler=self.slat_sampler))
        staged("decode", lambda: pipe.run_decode(inputs, ss, slat))
        return out


def make_runner(target: nn.Module, inputs: Any) -> Callable[[], Any]:
    """Zero-argument callable running ``target`` on ``inputs``.

    ``inputs``: a callable (run as is), a :class:`Workload`, pipeline ``PreparedInputs`` (run with
    seed 0), a dict (``target(**inputs)``), or a tuple/list (``target(*inputs)``); a single tensor is
    ``target(inputs)``.
    """
    if isinstance(inputs, Workload):
        if not is_pipeline(target):
            raise TypeError("a Workload needs a Pipeline target")
        inputs.prepare(target)
        return lambda: inputs.run(target)
    if callable(inputs) and not isinstance(inputs, nn.Module):
        return inputs
    if type(inputs).__name__ == "PreparedInputs":
        return lambda: target.run_prepared(inputs, 0)
    if isinstance(inputs, dict):
        return lambda: target(**inputs)
    if isinstance(inputs, (tuple, list)):
        return lambda: target(*inputs)
    if isinstance(inputs, Tensor):
        return lambda: target(inputs)
    raise TypeError(f"cannot run a {type(target).__name__} on inputs of type {type(inputs).__name__}")


__all__ = ["Workload", "make_runner", "replace_coords", "shell_coords", "synthetic_inputs", "voxelize_mesh"]
