"""Flow-matching samplers with the schedules the official SAM 3D pipeline runs.

Convention (rectified flow, sigma_min = 0): ``x_t = (1 - t) x0 + t x1`` with ``x0 ~ N(0, I)``
noise at t = 0 and data at t = 1; the network predicts ``v = x1 - x0``. Euler steps
``x <- x + v (t_{k+1} - t_k)`` over the grid ``t_k = k / S`` warped by
``t <- t / (1 + (r - 1)(1 - t))`` (r = ``rescale_t``; r = 1 is the identity).

Classifier-free guidance, as the official ``ClassifierFreeGuidance`` applies it: active where
``interval[0] <= t * time_scale <= interval[1]``; then ``v = (1 + s) v_cond - s v_uncond`` for every
modality, where the unconditional branch is the same network with the condition tokens multiplied by
zero. Outside the interval only the conditional pass runs.

The SS generator is the official ``ShortCut`` model run in its non-distilled mode: the same Euler
loop, with a step-size embedding ``d = 0`` added to the time embedding.

Each step's velocity goes through a :class:`~fs3d_accel.seams.StepPolicy` and emits a
:class:`~fs3d_accel.seams.StepEvent`.
"""
from __future__ import annotations

import functools
import operator

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .model.configs import SamplerConfig
from .seams import (DECISIONS, EventBus, IdentityPolicy, Latent, StepContext, StepEvent, StepPolicy,
                    StepRecord, tree_map, tree_map2)

#: ``net(x, t, active) -> v``: the guided network velocity at flow time ``t`` (not scaled).
VelocityNet = Callable[[Latent, float, "Tensor | None"], Latent]


def time_grid(steps: int, rescale_t: float = 1.0) -> list[float]:
    """The S+1 flow times of an S-step sampler, warped by ``rescale_t`` (official ``_prepare_t``). A new list each call,
    from values computed once per (steps, rescale_t): the SLaT stage asks for the grid several times per call, in
    the first step, which the GPU waits for."""
    try:  # any integer type (NumPy's too); a float is refused, not truncated
        count = operator.index(steps)
    except TypeError:
        count = None
    if isinstance(steps, bool) or count is None or count < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return list(_time_grid(count, float(rescale_t)))


@functools.lru_cache(maxsize=64)
def _time_grid(steps: int, rescale_t: float) -> tuple[float, ...]:
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if rescale_t != 1.0:
        ts = ts / (1 + (rescale_t - 1) * (1 - ts))
    return tuple(float(t) for t in ts)


def cfg_active(cfg: SamplerConfig, t: float) -> bool:
    """Whether classifier-free guidance applies at flow time ``t``."""
    if cfg.cfg_strength <= 0:
        return False
    lo, hi = cfg.cfg_interval
    return lo <= t * cfg.time_scale <= hi


def apply_cfg(v_cond: Latent, v_uncond: Latent, strength: float) -> Latent:
    """``(1 + s) v_cond - s v_uncond`` per modality."""
    return tree_map2(lambda c, u: (1 + strength) * c - strength * u, v_cond, v_uncond)


def count_network_passes(cfg: SamplerConfig) -> int:
    """Network passes of one plain run: 2 per guided step, 1 per unguided step."""
    grid = time_grid(cfg.steps, cfg.rescale_t)
    return sum(2 if cfg_active(cfg, t) else 1 for t in grid[:-1])


def _check_like(v: Latent, x: Latent, stage: str, step: int) -> None:
    if isinstance(x, dict):
        if not isinstance(v, dict) or list(v) != list(x):
            raise ValueError(f"{stage} step {step}: policy returned keys "
                             f"{list(v) if isinstance(v, dict) else type(v).__name__}, expected {list(x)}")
        for k in x:
            if v[k].shape != x[k].shape:
                raise ValueError(f"{stage} step {step}: velocity[{k}] shape {tuple(v[k].shape)} != {tuple(x[k].shape)}")
    elif not isinstance(v, Tensor) or v.shape != x.shape:
        raise ValueError(f"{stage} step {step}: velocity shape {getattr(v, 'shape', None)} != {tuple(x.shape)}")


@dataclass
class EulerFlowSampler:
    """Euler flow-matching sampler driven through a step policy."""

    config: SamplerConfig
    stage: str

    def grid(self) -> list[float]:
        return time_grid(self.config.steps, self.config.rescale_t)

    def sample(
        self,
        x: Latent,
        net: VelocityNet,
        policy: StepPolicy | None = None,
        events: EventBus | None = None,
        extras: dict[str, Any] | None = None,
    ) -> Latent:
        """Integrate from noise ``x`` (t = 0) to data (t = 1).

        ``net(x, t, active)`` returns the (guided) velocity; ``active`` is ``None`` for a full
        pass or a LongTensor of token rows (SLaT only), in which case it returns those rows only.
        """
        policy = policy or IdentityPolicy()
        grid = self.grid()
        n = self.config.steps
        history: list[StepRecord] = []
        state: dict[str, Any] = {}
        extras = dict(extras or {})
        for k in range(n):
            t, t_next = grid[k], grid[k + 1]
            ctx = StepContext(stage=self.stage, step=k, num_steps=n, t=t, t_next=t_next, x=x,
                              history=history, extras=extras, state=state)
            x_now = x

            def compute(active: Tensor | None = None, _ctx: StepContext = ctx, _x: Latent = x_now,
                        _t: float = t) -> Latent:
                if active is None:
                    _ctx.decision = "computed"
                    _ctx.active_fraction = 1.0
                    return net(_x, _t, None)
                if isinstance(_x, dict):
                    raise ValueError(f"{self.stage}: token subsets are only supported for sparse (SLaT) latents")
                if active.dtype not in (torch.int64, torch.int32) or active.ndim != 1:
                    raise ValueError("active must be a 1-D integer tensor of token indices")
                _ctx.decision = "carved"
                _ctx.active_fraction = float(active.numel()) / max(1, _x.shape[0])
                return net(_x, _t, active)

            v = policy.velocity(ctx, compute)
            _check_like(v, x, self.stage, k)
            decision = ctx.decision or "cached"
            if decision not in DECISIONS:
                raise ValueError(f"policy set unknown decision {decision!r}; expected one of {DECISIONS}")
            if events is not None and len(events):
                events.emit(StepEvent(stage=self.stage, step=k, num_steps=n, t=t, x=x, v=v,
                                      decision=decision, active_fraction=ctx.active_fraction,
                                      info=ctx.info, extras=extras))
            history.append(StepRecord(step=k, t=t, x=x, v=v, decision=decision))
            dt = t_next - t
            x = tree_map2(lambda a, b: a + b * dt, x, v)
        return x


def guided(net_cond: Callable[[Latent, float, "Tensor | None", bool], Latent], cfg: SamplerConfig,
           batched: Callable[[Latent, float, "Tensor | None"], tuple[Latent, Latent]] | None = None) -> VelocityNet:
    """Build a guided velocity function from ``net_cond(x, t, active, uncond)``.

    ``batched(x, t, active) -> (v_cond, v_uncond)`` (optional) computes both CFG branches in one
    network pass; results are identical up to floating-point reassociation.
    """

    def velocity(x: Latent, t: float, active: Tensor | None) -> Latent:
        if not cfg_active(cfg, t):
            return net_cond(x, t, active, False)
        if batched is not None:
            v_c, v_u = batched(x, t, active)
        else:
            v_c = net_cond(x, t, active, False)
            v_u = net_cond(x, t, active, True)
        return apply_cfg(v_c, v_u, cfg.cfg_strength)

    return velocity


__all__ = ["EulerFlowSampler", "apply_cfg", "cfg_active", "count_network_passes", "guided", "time_grid",
           "tree_map"]
