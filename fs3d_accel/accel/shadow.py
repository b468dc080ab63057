"""Shadow mode: run an accelerator's policy but also compute the true velocity at every step.

The trajectory is the inner policy's (the returned velocity is the inner one, bit for bit);
``ctx.info["v_true"]`` holds the full-network velocity at the same x_t, so recorders can measure
extrapolation / reuse / carving error step by step. Costs one extra network pass per step where
the inner policy did not already run a full pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..seams import ComputeFn, IdentityPolicy, Latent, StepContext, StepPolicy


@dataclass(frozen=True)
class ShadowPolicy:
    inner: Any = None

    def __post_init__(self) -> None:
        if self.inner is not None and not isinstance(self.inner, StepPolicy):
            raise TypeError(f"inner must be a StepPolicy (has .velocity(ctx, compute)), got {type(self.inner).__name__}")

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        inner = self.inner or IdentityPolicy()
        full: list[Latent] = []

        def watched(active=None):
            out = compute(active)
            if active is None:
                full.append(out)
            return out

        v = inner.velocity(ctx, watched)
        if full:
            v_true = full[-1]
        else:
            decision, frac = ctx.decision, ctx.active_fraction
            v_true = compute()
            ctx.decision, ctx.active_fraction = decision, frac
        ctx.info["v_true"] = v_true
        ctx.info["shadow_extra_pass"] = not full
        return v

    @property
    def tag(self) -> str:
        return f"shadow({getattr(self.inner, 'tag', repr(self.inner))})"


__all__ = ["ShadowPolicy"]
