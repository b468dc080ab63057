"""Error-bounded step skipping with a cached tangent (EasyCache, arXiv 2507.02860; the released
Fast-SAM3D SLaT cache is a variant of it).

On a full step s the rule stores the tangent Delta = v_s - x_s and a transformation rate k. On
each later step it adds e_s = k * mean|x_s - x_{s-1}| / (mean|v_ref| + 1e-6) to an accumulated
error E; while E < threshold the step reuses v_s = x_s + Delta, otherwise it computes and E resets
to 0. Norms are mean absolute values over all elements (all modalities for the SS dict latent).

Two variants:

- ``"easycache"`` (the EasyCache reference code): k = mean|v_s - v_f| / mean|x_s - x_f| between the
  current and the last full step f; v_ref = v_f (last computed output).
- ``"released"`` (Fast-SAM3D ``cal_type`` + ``Euler_end_slat``): k_new = mean|v_s - v_{s-1}| /
  mean|x_{s-1} - x_b| (lagged: x_b is the input of the full step before, ``prev_prev_x``),
  k <- 0.7 k + 0.3 k_new; v_ref = v_{s-1}, the velocity used at the previous step (possibly an
  estimate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..seams import Latent, StepContext
from ._common import add, check_choice, check_int, check_nonneg, check_range, mean_abs, mean_abs_diff, sub

VARIANTS = ("easycache", "released")


@dataclass(frozen=True)
class TangentCacheRule:
    """Parameters of the skip rule; methods act on a per-run state dict."""

    threshold: float
    warmup: int
    variant: str = "easycache"
    #: weight of the old k in k <- ema * k + (1 - ema) * k_new (0: take the newest k)
    ema: float = 0.0
    #: number of final steps that are always computed (EasyCache: 1)
    final_full: int = 0

    def __post_init__(self) -> None:
        check_nonneg("threshold", self.threshold)
        check_int("warmup", self.warmup, 0)
        check_choice("variant", self.variant, VARIANTS)
        check_range("ema", self.ema, 0.0, 1.0, high_open=True)
        check_int("final_full", self.final_full, 0)

    def should_compute(self, ctx: StepContext, st: dict[str, Any]) -> bool:
        """Decide the step (accumulating the error estimate); call once per step."""
        s = ctx.step
        st.setdefault("error", 0.0)
        if s < self.warmup or s >= ctx.num_steps - self.final_full:
            return True
        if st.get("k") is None or st.get("prev_x") is None:
            return True
        if self.variant == "released" and st.get("prev_prev_x") is None:
            return True
        v_ref = st["prev_v"] if self.variant == "released" else st["full_v"]
        e = st["k"] * mean_abs_diff(ctx.x, st["prev_x"]) / (mean_abs(v_ref) + 1e-6)
        st["error"] += e
        ctx.info["step_cache"] = {"error": st["error"], "k": st["k"], "increment": e}
        return st["error"] >= self.threshold

    def after_compute(self, ctx: StepContext, st: dict[str, Any], v: Latent) -> None:
        """Bookkeeping after a full (or carved) evaluation ``v`` at ``ctx.x``."""
        x = ctx.x
        k_new = None
        if self.variant == "released":
            if st.get("prev_v") is not None and st.get("prev_prev_x") is not None:
                k_new = mean_abs_diff(v, st["prev_v"]) / (mean_abs_diff(st["prev_x"], st["prev_prev_x"]) + 1e-8)
            if st.get("prev_x") is not None:
                st["prev_prev_x"] = st["prev_x"]
        elif st.get("full_v") is not None:
            k_new = mean_abs_diff(v, st["full_v"]) / (mean_abs_diff(x, st["full_x"]) + 1e-8)
        if k_new is not None:
            k_old = st.get("k")
            st["k"] = k_new if k_old is None else self.ema * k_old + (1 - self.ema) * k_new
        st["prev_x"] = x
        st["prev_v"] = v
        st["full_x"] = x
        st["full_v"] = v
        st["tangent"] = sub(v, x)
        st["error"] = 0.0
        info = ctx.info.setdefault("step_cache", {})
        info.update({"k": st.get("k"), "full": True})

    def reuse(self, ctx: StepContext, st: dict[str, Any]) -> Latent:
        """Skipped step: v = x + cached tangent (no network)."""
        v = add(ctx.x, st["tangent"])
        st["prev_x"] = ctx.x
        st["prev_v"] = v
        ctx.decision = "cached"
        ctx.active_fraction = 0.0
        ctx.info.setdefault("step_cache", {})["full"] = False
        return v


__all__ = ["TangentCacheRule", "VARIANTS"]
