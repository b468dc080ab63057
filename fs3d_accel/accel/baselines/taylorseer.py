"""TaylorSeer baseline (Liu et al., "From Reusing to Forecasting", arXiv 2503.06923).

Full network evaluations on a fixed interval; in between, the velocity is forecast by a Taylor
series whose derivatives are backward divided differences of the last full evaluations
(F_{i+1} = (F_i(s_f) - F_i(s_f')) / (s_f - s_f'), v(s) = sum_i F_i (s - s_f)^i / i!).

Settings and where they come from:
- ``interval=4``: the TaylorSeer-DiT README's recommended ``--interval 4`` (DiT-XL/2, 50 steps).
- ``warmup=2``: TaylorSeer-DiT ``cache_init`` ``first_enhance = 2`` (first two steps computed).
- ``order=2``: the README pairs interval 4 with ``max_order 4`` at 50 steps; with our 25-step
  samplers a 4th-order forecast would need 5 full steps (about 18 sampler steps) of history, so we
  use order 2 (the TaylorSeer FLUX default ``max_order=2``); pass ``order=1`` for first order.
- Schedule: the TaylorSeer ``cal_type`` counter (full when ``interval - 1`` steps were skipped);
  the last step is not forced full.
Applied uniformly to the whole velocity: every modality of the SS sampler and every token of the
SLaT sampler (TaylorSeer proper caches per block; at the velocity level this is "TaylorSeer-Lite").
``interval=1`` computes every step (bit-identical to the plain sampler).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...seams import ComputeFn, Latent, StepContext
from .._common import check_int, counter_schedule, policy_state, taylor_eval, update_factors


@dataclass(frozen=True)
class TaylorSeer:
    interval: int = 4
    order: int = 2
    warmup: int = 2

    def __post_init__(self) -> None:
        check_int("interval", self.interval, 1)
        check_int("order", self.order, 0)
        check_int("warmup", self.warmup, 0)

    def schedule(self, num_steps: int) -> list[int]:
        full = counter_schedule(num_steps, self.interval, self.warmup, None)
        return [s for s, f in enumerate(full) if f]

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        st = policy_state(ctx, self)
        if "full" not in st:
            st["full"] = counter_schedule(ctx.num_steps, self.interval, self.warmup, None)
            st["factors"], st["last"] = None, None
        if st["full"][ctx.step] or st["factors"] is None:
            v = compute()
            dist = None if st["last"] is None else float(ctx.step - st["last"])
            old = st["factors"]
            if isinstance(v, dict):
                st["factors"] = {k: update_factors(None if old is None else old[k], t, dist, self.order)
                                 for k, t in v.items()}
            else:
                st["factors"] = update_factors(old, v, dist, self.order)
            st["last"] = ctx.step
            return v
        x = float(ctx.step - st["last"])
        ctx.decision = "extrapolated"
        ctx.active_fraction = 0.0
        f = st["factors"]
        if isinstance(f, dict):
            return {k: taylor_eval(fk, x) for k, fk in f.items()}
        return taylor_eval(f, x)

    @property
    def tag(self) -> str:
        return f"taylorseer-N{self.interval}-O{self.order}-w{self.warmup}"
