"""Adaptive step caching for the SLaT sampler and its composition with token carving
(Fast-SAM3D, Sec. 3.2, temporal part)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..seams import ComputeFn, Latent, StepContext
from ._common import check_choice, check_int, check_nonneg, policy_state
from .slat_carving import SLaTTokenCarving
from .tangent_cache import TangentCacheRule

STEP_CACHE_MODES = ("paper", "released")


@dataclass(frozen=True)
class SLaTStepCache:
    """Curvature-driven step skipping with a cached tangent v - x and accumulated-error refresh.

    Steps ``< warmup`` are computed. Afterwards each step adds e = k * mean|x_s - x_{s-1}| /
    mean|v_ref| to E (k = transformation rate, the paper's curvature kappa) and reuses
    v = x + (v - x)_last while E < ``threshold`` (``E`` in the paper); otherwise it computes and
    E := 0. ``threshold=0`` never skips (bit-identical to the plain sampler).

    ``mode="released"``: the released ``cal_type``/``Euler_end_slat`` rule (lagged input change,
    k EMA 0.7 old / 0.3 new, v_ref = previous step's velocity). ``mode="paper"``: the EasyCache
    formulation the paper cites (k between the current and the last full step, v_ref = last
    computed velocity). Defaults are the released README settings (threshold 1.5, warm-up 3); the
    paper gives no value for E.
    """

    threshold: float = 1.5
    warmup: int = 3
    mode: str = "paper"

    def __post_init__(self) -> None:
        check_nonneg("threshold", self.threshold)
        check_int("warmup", self.warmup, 0)
        check_choice("mode", self.mode, STEP_CACHE_MODES)

    @property
    def rule(self) -> TangentCacheRule:
        if self.mode == "released":
            return TangentCacheRule(self.threshold, self.warmup, variant="released", ema=0.7)
        return TangentCacheRule(self.threshold, self.warmup, variant="easycache", ema=0.0)

    def should_compute(self, ctx: StepContext) -> bool:
        return self.rule.should_compute(ctx, policy_state(ctx, self))

    def after_compute(self, ctx: StepContext, v: Latent) -> None:
        self.rule.after_compute(ctx, policy_state(ctx, self), v)

    def reuse(self, ctx: StepContext) -> Latent:
        return self.rule.reuse(ctx, policy_state(ctx, self))

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        if not self.should_compute(ctx):
            return self.reuse(ctx)
        v = compute()
        self.after_compute(ctx, v)
        return v

    @property
    def tag(self) -> str:
        return f"stepcache-E{self.threshold:g}-w{self.warmup}-{self.mode}"


@dataclass(frozen=True)
class SLaTPolicy:
    """Step cache decides compute vs reuse; on computed steps the carving picks the token subset.

    Either part may be ``None``; with both ``None`` it is the plain sampler.
    """

    carving: SLaTTokenCarving | None = None
    step_cache: SLaTStepCache | None = None
    #: the carving classes this policy accepts (subclasses widen it)
    carving_types: ClassVar[tuple[type, ...]] = (SLaTTokenCarving,)

    def __post_init__(self) -> None:
        if self.carving is not None and not isinstance(self.carving, self.carving_types):
            names = ", ".join(t.__name__ for t in self.carving_types)
            raise TypeError(f"carving must be {names} or None, got {type(self.carving).__name__}")
        if self.step_cache is not None and not isinstance(self.step_cache, SLaTStepCache):
            raise TypeError(f"step_cache must be SLaTStepCache or None, got {type(self.step_cache).__name__}")

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        if self.step_cache is not None and not self.step_cache.should_compute(ctx):
            return self.step_cache.reuse(ctx)
        v = self.carving.velocity(ctx, compute) if self.carving is not None else compute()
        if self.step_cache is not None:
            self.step_cache.after_compute(ctx, v)
        return v

    @property
    def tag(self) -> str:
        parts = [p.tag for p in (self.carving, self.step_cache) if p is not None]
        return "+".join(parts) or "slat-identity"


__all__ = ["STEP_CACHE_MODES", "SLaTPolicy", "SLaTStepCache"]
