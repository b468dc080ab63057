"""EasyCache baseline (Zhou et al., "Less is Enough", arXiv 2507.02860).

Runtime-adaptive step reuse: after a full step the transformation rate k = mean|v_s - v_f| /
mean|x_s - x_f| (f = previous full step) is stored with the tangent v - x; each later step adds
k * mean|x_s - x_{s-1}| / mean|v_f| to an accumulated error and reuses v = x + (v - x)_f until
the error reaches ``threshold`` (see :mod:`fs3d_accel.accel.tangent_cache`).

Settings and where they come from (EasyCache reference code, Wan2.1/2.2 scripts):
- ``threshold=0.05``: ``--thresh`` default 0.05 (the paper's tau = 5 %).
- ``warmup_fraction=0.2``: the reference computes the first ``ret_steps`` steps (10 of 50 for
  Wan2.1, i.e. 20 %) -> 5 of our 25 steps.
- ``final_full=1``: the reference always computes the last step.
The guided (CFG-combined) velocity is cached as a whole (the reference caches the conditional and
unconditional branches separately with one decision). Applied to both samplers; norms run over all
SS modalities together. ``threshold=0`` never skips (bit-identical to the plain sampler).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...seams import ComputeFn, Latent, StepContext
from .._common import check_int, check_nonneg, check_range, policy_state
from ..tangent_cache import TangentCacheRule


@dataclass(frozen=True)
class EasyCache:
    threshold: float = 0.05
    warmup_fraction: float = 0.2
    final_full: int = 1

    def __post_init__(self) -> None:
        check_nonneg("threshold", self.threshold)
        check_range("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        check_int("final_full", self.final_full, 0)

    def rule(self, num_steps: int) -> TangentCacheRule:
        warmup = int(round(self.warmup_fraction * num_steps))
        return TangentCacheRule(self.threshold, warmup, variant="easycache", ema=0.0, final_full=self.final_full)

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        st = policy_state(ctx, self)
        rule = self.rule(ctx.num_steps)
        if not rule.should_compute(ctx, st):
            return rule.reuse(ctx, st)
        v = compute()
        rule.after_compute(ctx, st, v)
        return v

    @property
    def tag(self) -> str:
        return f"easycache-t{self.threshold:g}-w{self.warmup_fraction:g}"
