"""Modality-aware step caching for the sparse-structure (SS) sampler (Fast-SAM3D, Sec. 3.1).

The SS flow model denoises one shape latent (``"shape"``) and four layout tokens
(``"6drotation_normalized"``, ``"scale"``, ``"translation"``, ``"translation_scale"``). Shape
velocities evolve smoothly and are extrapolated; layout velocities jitter, so the paper anchors
their extrapolation to the last full evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..seams import ComputeFn, Latent, StepContext
from ._common import (check_choice, check_int, check_range, counter_schedule, policy_state, taylor_eval,
                      update_factors)

#: the released code hard-codes the always-full tail at step 24 (it assumes 25 SS steps)
RELEASED_END_STEP = 24
LAYOUT_MODES = ("paper", "released")


@dataclass(frozen=True)
class SSModalityCache:
    """Full SS network evaluations on a fixed schedule; extrapolated velocities in between.

    Schedule (TaylorSeer-style counter, as the released ``cache_utils_ss``): step s is computed
    fully if ``s < warmup``, or ``k - 1`` steps were skipped since the last full step, or it is the
    last step (``layout_mode="released"``: every ``s >= 24``, the released hard-coded tail, which
    equals "last step" for the official 25 steps). 25 steps, k=3, warm-up 2 ->
    {0,1,4,7,10,13,16,19,22,24}. ``k=1`` computes every step (bit-identical to the plain sampler).

    Extrapolation on a skipped step s, with s_f the last and s_f' the previous full step
    (distances in step indices, as the paper's (v_t - v_{t+k})/k and the released code):
    ``order=1``: v_lin = v(s_f) + (s - s_f) (v(s_f) - v(s_f')) / (s_f - s_f'); ``order=2`` adds the
    TaylorSeer second divided difference (F_2 (s - s_f)^2 / 2). Before two full steps exist the
    extrapolation is the last full velocity (zeroth order).

    Shape (``shape_keys``) always uses v_lin. Layout (every other key):
    ``layout_mode="paper"``: v = beta * v_lin + (1 - beta) * v(s_f) (anchor = last full evaluation);
    ``layout_mode="released"``: v = v_lin, beta has no effect (the released blend is overwritten,
    see implementation notes Sec. 2 and 7.1).
    Paper hyperparameters: k=3, beta in 0.5-0.7 (0.7 in the grid search), first-order differences;
    warm-up 2 from the released ``--ss_warmup``.
    """

    k: int = 3
    beta: float = 0.7
    warmup: int = 2
    order: int = 1
    layout_mode: str = "paper"
    shape_keys: tuple[str, ...] = ("shape",)

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_range("beta", self.beta, 0.0, 1.0, high_open=True)
        check_int("warmup", self.warmup, 0)
        check_int("order", self.order, 0)
        check_choice("layout_mode", self.layout_mode, LAYOUT_MODES)
        if not isinstance(self.shape_keys, tuple) or not all(isinstance(k, str) for k in self.shape_keys):
            raise TypeError(f"shape_keys must be a tuple of str, got {self.shape_keys!r}")

    # ------------------------------------------------------------------ schedule
    def is_full_schedule(self, num_steps: int) -> list[bool]:
        tail = RELEASED_END_STEP if self.layout_mode == "released" else num_steps - 1
        return counter_schedule(num_steps, self.k, self.warmup, tail)

    def schedule(self, num_steps: int) -> list[int]:
        """Indices of the fully computed steps of a ``num_steps`` run."""
        return [s for s, f in enumerate(self.is_full_schedule(num_steps)) if f]

    # ------------------------------------------------------------------ policy
    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        st = policy_state(ctx, self)
        if "full" not in st:
            st["full"] = self.is_full_schedule(ctx.num_steps)
            st["full_steps"] = []
            st["factors"] = None
        if st["full"][ctx.step] or st["factors"] is None:
            v = compute()
            if not isinstance(v, dict):
                raise TypeError("SSModalityCache expects the SS modality dict latent; use TaylorSeer for tensors")
            prev = st["full_steps"][-1] if st["full_steps"] else None
            dist = None if prev is None else float(ctx.step - prev)
            old = st["factors"]
            st["factors"] = {key: update_factors(None if old is None else old[key], val, dist, self.order)
                             for key, val in v.items()}
            st["full_steps"].append(ctx.step)
            ctx.info["ss_cache"] = {"full": True}
            return v
        last = st["full_steps"][-1]
        x = float(ctx.step - last)
        out: dict[str, Tensor] = {}
        for key, factors in st["factors"].items():
            lin = taylor_eval(factors, x)
            if key in self.shape_keys or self.layout_mode == "released":
                out[key] = lin
            else:
                out[key] = self.beta * lin + (1.0 - self.beta) * factors[0]
        ctx.decision = "extrapolated"
        ctx.active_fraction = 0.0
        ctx.info["ss_cache"] = {"full": False, "distance": x, "anchor_step": last}
        return out

    @property
    def tag(self) -> str:
        """Short canonical name of this setting (for tables and file names)."""
        return f"ssc-k{self.k}-w{self.warmup}-o{self.order}-b{self.beta:g}-{self.layout_mode}"


__all__ = ["LAYOUT_MODES", "RELEASED_END_STEP", "SSModalityCache"]
