"""Instance-adaptive control (beyond the paper): pick the SS stride k and the SLaT carving keep ratio
per object from signals measured in the object's own first steps.

The paper fixes k and keep for a dataset. Objects differ: a layout velocity that jitters during the
SS warm-up makes the SS extrapolation risky (use a smaller k), and a SLaT update that concentrates
in few tokens can be carved harder (smaller keep) than one spread over the whole object.

- :class:`AdaptiveSSCache`: computes the first ``warmup`` SS steps, measures a step-level signal
  (default ``layout_jitter``), then runs :class:`SSModalityCache` with the k it maps to.
- :class:`AdaptiveCarving`: runs full passes until the template carving's ``start_step``, measures
  ``update_concentration`` of the last update, then carves with the keep ratio it maps to.

The mapping is a step function: ``options[i]`` with ``i`` = number of ``thresholds`` (ascending) that
are <= the signal value; so ``options[0]`` serves the smallest values. With one option the
controller is exactly the fixed setting (bit-identical); ``ks=(1,)`` and ``keeps=(1.0,)`` are the
plain pipeline. Decisions are published in ``ctx.info["adaptive"]``. Thresholds are data-dependent:
measure the signals on your objects first (notebook 06).
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..seams import Accelerator, ComputeFn, Latent, StepContext
from ._common import check_int, check_real, policy_state
from .mesh_aggregation import SpectralTokenAggregation
from .signals import get_signal
from .slat_carving import SLaTTokenCarving
from .slat_step_cache import SLaTPolicy, SLaTStepCache
from .ss_cache import SSModalityCache

_DEFAULT: Any = object()


def choose(value: float, thresholds: Sequence[float], options: Sequence[Any]) -> tuple[int, Any]:
    """(index, option): ``options[#{t in thresholds : t <= value}]``."""
    i = bisect.bisect_right(list(thresholds), value)
    return i, options[i]


def _check_mapping(name: str, options: tuple, thresholds: tuple) -> None:
    if not isinstance(options, tuple) or not options:
        raise ValueError(f"{name} must be a non-empty tuple, got {options!r}")
    if not isinstance(thresholds, tuple):
        raise TypeError(f"thresholds for {name} must be a tuple, got {type(thresholds).__name__}")
    if len(thresholds) != len(options) - 1:
        raise ValueError(f"{len(options)} {name} need {len(options) - 1} thresholds, got {len(thresholds)}")
    vals = [check_real(f"threshold {i}", t) for i, t in enumerate(thresholds)]
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"thresholds must increase strictly, got {thresholds}")


@dataclass(frozen=True)
class AdaptiveSSCache:
    """SS modality cache whose k is chosen per object after the warm-up (module docstring).

    ``ks[i]`` serves signal values in [thresholds[i-1], thresholds[i]); the default maps small layout
    jitter to a long stride. ``beta``, ``order``, ``layout_mode`` go to every
    :class:`SSModalityCache` candidate; their warm-up is ``warmup`` (>= 2: the jitter needs two
    velocities).
    """

    ks: tuple[int, ...] = (4, 3, 2)
    thresholds: tuple[float, ...] = (0.06, 0.12)
    signal: str = "layout_jitter"
    warmup: int = 2
    beta: float = 0.7
    order: int = 1
    layout_mode: str = "paper"

    def __post_init__(self) -> None:
        _check_mapping("ks", self.ks, self.thresholds)
        for k in self.ks:
            check_int("k", k, 1)
        check_int("warmup", self.warmup, 2)
        get_signal(self.signal, "step")
        cands = tuple(SSModalityCache(k=k, beta=self.beta, warmup=self.warmup, order=self.order,
                                      layout_mode=self.layout_mode) for k in self.ks)
        object.__setattr__(self, "_candidates", cands)

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        st = policy_state(ctx, self)
        cands: tuple[SSModalityCache, ...] = self._candidates  # type: ignore[attr-defined]
        if "choice" not in st:
            if ctx.step < self.warmup:
                v = compute()
                for c in cands:  # every candidate computes its warm-up steps: feed it the one pass
                    c.velocity(ctx, lambda *a, _v=v, **k: _v)
                ctx.info["adaptive"] = {"phase": "warmup"}
                return v
            st["value"] = float(get_signal(self.signal, "step").compute(ctx))
            st["choice"], _ = choose(st["value"], self.thresholds, self.ks)
        chosen = cands[st["choice"]]
        ctx.info["adaptive"] = {"signal": self.signal, "value": st["value"], "k": chosen.k}
        return chosen.velocity(ctx, compute)

    @property
    def tag(self) -> str:
        return (f"adass-k{'/'.join(map(str, self.ks))}-t{'/'.join(f'{t:g}' for t in self.thresholds)}"
                f"-w{self.warmup}-b{self.beta:g}")


@dataclass(frozen=True)
class AdaptiveCarving:
    """SLaT token carving whose keep ratio is chosen per object at the first carving step.

    ``keeps[i]`` serves signal values in [thresholds[i-1], thresholds[i]); the default maps a diffuse
    update (low concentration) to a larger keep. ``carving`` is the template (its ``keep`` /
    ``carve_ratio`` are replaced by each option; every other field is kept).
    """

    keeps: tuple[float, ...] = (0.4, 0.2, 0.1)
    thresholds: tuple[float, ...] = (0.2, 0.4)
    signal: str = "update_concentration"
    carving: SLaTTokenCarving = field(default_factory=SLaTTokenCarving)

    def __post_init__(self) -> None:
        _check_mapping("keeps", self.keeps, self.thresholds)
        if not isinstance(self.carving, SLaTTokenCarving):
            raise TypeError(f"carving must be a SLaTTokenCarving template, got {type(self.carving).__name__}")
        get_signal(self.signal, "step")
        cands = tuple(dataclasses.replace(self.carving, keep=kp, carve_ratio=None) for kp in self.keeps)
        object.__setattr__(self, "_candidates", cands)

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        st = policy_state(ctx, self)
        cands: tuple[SLaTTokenCarving, ...] = self._candidates  # type: ignore[attr-defined]
        if "choice" not in st:
            if ctx.step < self.carving.start_step or not ctx.history:
                return compute()  # what every candidate does before it may carve
            st["value"] = float(get_signal(self.signal, "step").compute(ctx))
            st["choice"], _ = choose(st["value"], self.thresholds, self.keeps)
        chosen = cands[st["choice"]]
        v = chosen.velocity(ctx, compute)
        ctx.info["adaptive"] = {"signal": self.signal, "value": st["value"], "keep": chosen.keep}
        return v

    @property
    def tag(self) -> str:
        return (f"adacarve-keep{'/'.join(f'{k:g}' for k in self.keeps)}"
                f"-t{'/'.join(f'{t:g}' for t in self.thresholds)}")


@dataclass(frozen=True)
class AdaptiveSLaTPolicy(SLaTPolicy):
    """As :class:`~fs3d_accel.accel.slat_step_cache.SLaTPolicy`, but the carving may be adaptive."""

    carving: SLaTTokenCarving | AdaptiveCarving | None = None
    carving_types: ClassVar[tuple[type, ...]] = (SLaTTokenCarving, AdaptiveCarving)


def AdaptiveFastSAM3D(ss: AdaptiveSSCache | SSModalityCache | None = _DEFAULT,
                      carving: AdaptiveCarving | SLaTTokenCarving | None = _DEFAULT,
                      step_cache: SLaTStepCache | None = _DEFAULT, mesh: Any = _DEFAULT,
                      name: str = "fast-sam3d-adaptive") -> Accelerator:
    """Fast-SAM3D with per-object k and keep. Defaults: :class:`AdaptiveSSCache`,
    :class:`AdaptiveCarving` with the paper template, ``SLaTStepCache()`` and
    ``SpectralTokenAggregation()``; pass ``None`` to switch a part off."""
    from . import FastSAM3D

    ss = AdaptiveSSCache() if ss is _DEFAULT else ss
    carving = AdaptiveCarving() if carving is _DEFAULT else carving
    step_cache = SLaTStepCache() if step_cache is _DEFAULT else step_cache
    mesh = SpectralTokenAggregation() if mesh is _DEFAULT else mesh
    slat = None if carving is None and step_cache is None else AdaptiveSLaTPolicy(carving, step_cache)
    return FastSAM3D(ss=ss, slat=slat, mesh=mesh, name=name)


__all__ = ["AdaptiveCarving", "AdaptiveFastSAM3D", "AdaptiveSLaTPolicy", "AdaptiveSSCache", "choose"]
