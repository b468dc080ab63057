"""Synthetic velocity fields and a small real-model harness for testing step policies and token
transforms (used by the tests and handy in notebooks).

- :func:`ss_field` / :func:`slat_field`: analytic velocity functions with the samplers' signature
  ``net(x, t, active)`` (``active`` rows only, as the SLaT network does).
- :func:`mini_harness`: the ``mini`` pipeline (random weights, seed 0) on a synthetic object, with
  the stage conditions precomputed so a policy run costs only its network passes. Built once per
  process (cached).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..model.configs import LAYOUT_MODALITIES, SamplerConfig
from ..samplers import EulerFlowSampler
from ..seams import EventBus, Latent, StepPolicy

SS_KEYS = {"6drotation_normalized": 6, "scale": 3, "shape": 8, "translation": 3, "translation_scale": 1}


def ss_latent(num_shape_tokens: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """A small SS-like modality dict (keys sorted as the SS stage draws them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"shape": (1, num_shape_tokens, 8)}
    shapes.update({k: (1, 1, c) for k, c in LAYOUT_MODALITIES.items()})
    return {k: torch.randn(shapes[k], generator=g) for k in sorted(shapes)}


def ss_field(kind: str = "nonlinear") -> Callable[[Latent, float, Tensor | None], Latent]:
    """``"linear"``: v = a + b t per modality (independent of x); ``"nonlinear"``: depends on x and t."""

    def net(x: Latent, t: float, active: Tensor | None) -> Latent:
        out = {}
        for i, (k, v) in enumerate(x.items()):
            idx = torch.arange(v.numel(), dtype=v.dtype, device=v.device).reshape(v.shape)
            if kind == "linear":
                out[k] = (0.1 * (i + 1)) * idx.cos() + (1.0 + 0.5 * i) * t * idx.sin()
            else:
                out[k] = torch.sin(3 * v + t * (i + 1)) + 0.3 * (idx + 1).log() * t ** 2
        return out

    return net


def slat_field(kind: str = "nonlinear", rate: Tensor | None = None) -> Callable[[Tensor, float, Tensor | None], Tensor]:
    """SLaT-like field on (N,C) features; ``active`` selects rows. ``"constant"``: all ones."""

    def net(x: Tensor, t: float, active: Tensor | None) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device) if active is None else active
        xs = x[rows]
        if kind == "constant":
            return torch.ones_like(xs)
        r = (rows.to(x.dtype) + 1)[:, None] if rate is None else rate.to(x.device)[rows][:, None]
        if kind == "linear":
            return r * (1 + t) * torch.ones_like(xs)
        return torch.sin(2 * xs + r * t) + 0.1 * r

    return net


def run_sampler(x0: Latent, net: Callable[..., Latent], policy: StepPolicy | None = None, *, steps: int = 10,
                rescale_t: float = 1.0, stage: str = "ss", extras: dict[str, Any] | None = None,
                events: EventBus | None = None) -> Latent:
    cfg = SamplerConfig(steps=steps, rescale_t=rescale_t)
    return EulerFlowSampler(cfg, stage).sample(x0, net, policy, events, extras)


# ---------------------------------------------------------------------------------------------
# real (mini) model harness
# ---------------------------------------------------------------------------------------------


def synthetic_object(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """image uint8 (H,W,3), mask bool (H,W) with a blob, pointmap float32 (H,W,3) at z = 2."""
    rng = np.random.RandomState(0)
    img = (rng.rand(size, size, 3) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    mask = ((yy - c) ** 2 + (xx - c) ** 2) < (size / 4) ** 2
    pm = np.zeros((size, size, 3), np.float32)
    pm[..., 0], pm[..., 1], pm[..., 2] = (xx - c) / size, (yy - c) / size, 2.0
    return img, mask, pm


@dataclass
class MiniHarness:
    """The mini pipeline plus precomputed conditions; ``ss``/``slat`` are small stage outputs."""

    pipe: Any
    inputs: Any
    ss_cond: Tensor
    slat_cond: Tensor
    ss: Any        # SSOutput with at most ``num_tokens`` coords
    slat: Any      # SLaTOutput of a plain run on those coords

    @torch.no_grad()
    def ss_run(self, policy: StepPolicy | None, steps: int = 4, events: EventBus | None = None,
               cfg_strength: float = 0.0) -> dict[str, Tensor]:
        """Run the SS sampler with the real SS flow network (no decoder)."""
        from ..stages.ss import ss_noise
        from ..stages.options import RunOptions
        cfg = SamplerConfig(steps=steps, rescale_t=3.0, cfg_strength=cfg_strength)
        net = self.pipe.ss.velocity_net(self.ss_cond, cfg, RunOptions())
        x0 = ss_noise(self.pipe.config, torch.Generator().manual_seed(0))
        return EulerFlowSampler(cfg, "ss").sample(x0, net, policy, events)

    @torch.no_grad()
    def slat_run(self, policy: StepPolicy | None, steps: int = 4, events: EventBus | None = None,
                 cfg_strength: float = 0.0) -> Tensor:
        """Run the SLaT sampler with the real SLaT flow network on ``ss.coords``."""
        from ..stages.options import RunOptions
        from ..stages.slat import slat_noise
        cfg = SamplerConfig(steps=steps, cfg_strength=cfg_strength)
        coords = self.ss.coords
        net = self.pipe.slat.velocity_net(self.slat_cond, coords, cfg, RunOptions())
        x0 = slat_noise(coords.shape[0], self.pipe.config.slat_flow.in_channels, torch.Generator().manual_seed(1))
        extras = {"coords": coords, "occupancy": self.ss.occupancy_logits > 0,
                  "occupancy_logits": self.ss.occupancy_logits, "resolution": self.ss.resolution}
        return EulerFlowSampler(cfg, "slat").sample(x0, net, policy, events, extras)


def cube_object(r: int = 16, lo: int = 4, hi: int = 11) -> tuple[Tensor, Tensor]:
    """Occupancy logits of a solid cube [lo, hi]^3 in an r^3 grid (+1 inside, -1 outside) and its
    surface voxels as (N, 4) int32 coords with batch 0."""
    logits = -torch.ones(r, r, r)
    logits[lo:hi + 1, lo:hi + 1, lo:hi + 1] = 1.0
    occ = logits > 0
    inner = torch.zeros_like(occ)
    inner[lo + 1:hi, lo + 1:hi, lo + 1:hi] = True
    xyz = torch.nonzero(occ & ~inner).to(torch.int32)
    return logits, torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)


def _block_subset(coords: Tensor, num_tokens: int) -> Tensor:
    """The ``num_tokens`` coords nearest to the occupied voxels' centroid (a compact blob)."""
    xyz = coords[:, 1:].double()
    d = (xyz - xyz.mean(0)).norm(dim=1)
    idx = torch.argsort(d, stable=True)[:num_tokens].sort().values
    return coords[idx]


@functools.lru_cache(maxsize=2)
def mini_harness(num_tokens: int = 160, slat_steps: int = 2) -> MiniHarness:
    """Build (once per process) the mini pipeline on :func:`synthetic_object` with at most
    ``num_tokens`` SLaT tokens (a compact blob of the surface voxels) so that tests stay fast."""
    from ..pipeline import Pipeline
    pipe = Pipeline.from_config("mini", seed=0)
    img, mask, pm = synthetic_object()
    inputs = pipe.prepare(img, mask, pm)
    with torch.no_grad():
        ss_cond = pipe.ss.condition(**inputs.ss_kwargs()).float()
        slat_cond = pipe.slat.condition(**inputs.slat_kwargs()).float()
        harness = MiniHarness(pipe, inputs, ss_cond, slat_cond, None, None)
        latents = harness.ss_run(None, steps=2)
        ss = pipe.ss.decode_structure(latents, inputs, torch.Generator().manual_seed(0))
        ss = replace(ss, coords=_block_subset(ss.coords, num_tokens))
        harness.ss = ss
        slat = pipe.run_slat(inputs, ss, seed=0, sampler=SamplerConfig(steps=slat_steps, cfg_strength=0.0))
        harness.slat = slat
    return harness


__all__ = ["MiniHarness", "cube_object", "mini_harness", "run_sampler", "slat_field", "ss_field", "ss_latent", "synthetic_object"]
