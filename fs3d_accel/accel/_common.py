"""Small helpers shared by the step policies: argument checks, latent arithmetic, fixed schedules
and TaylorSeer-style finite-difference factors.

Everything here is stateless; per-run state lives in ``StepContext.state`` (fresh per sampler run).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..seams import Latent, StepContext, tree_map, tree_map2

# ---------------------------------------------------------------------------------------------
# argument checks (clear errors, never silent clamping)
# ---------------------------------------------------------------------------------------------


def check_int(name: str, value: Any, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """``value`` must lie in the interval (``low_open``/``high_open`` exclude the end points)."""
    v = check_real(name, value)
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def check_nonneg(name: str, value: Any) -> None:
    v = check_real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# latent arithmetic (tensor or modality dict)
# ---------------------------------------------------------------------------------------------


def flat(x: Latent) -> Tensor:
    """All elements of a latent as one float64 vector (dict keys in their order)."""
    if isinstance(x, dict):
        return torch.cat([v.reshape(-1).double() for v in x.values()])
    return x.reshape(-1).double()


def mean_abs(x: Latent) -> float:
    """Mean absolute value over every element of the latent (EasyCache's norm)."""
    return float(flat(x).abs().mean())


def mean_abs_diff(a: Latent, b: Latent) -> float:
    return float((flat(a) - flat(b)).abs().mean())


def sub(a: Latent, b: Latent) -> Latent:
    return tree_map2(lambda u, v: u - v, a, b)


def add(a: Latent, b: Latent) -> Latent:
    return tree_map2(lambda u, v: u + v, a, b)


def clone(x: Latent) -> Latent:
    return tree_map(lambda v: v.clone(), x)


# ---------------------------------------------------------------------------------------------
# fixed full/skip schedule (TaylorSeer's ``cal_type`` counter, also the released SS cache)
# ---------------------------------------------------------------------------------------------


def counter_schedule(num_steps: int, interval: int, warmup: int, always_full_from: int | None) -> list[bool]:
    """``full[s]`` for s in 0..num_steps-1.

    Step s is full if ``s < warmup``, or the skip counter reached ``interval - 1``, or
    ``always_full_from`` is set and ``s >= always_full_from``. A full step resets the counter to 0;
    a skipped step increments it. ``interval=1`` makes every step full.
    """
    check_int("num_steps", num_steps, 1)
    full: list[bool] = []
    counter = 0
    for s in range(num_steps):
        is_full = s < warmup or counter == interval - 1 or (always_full_from is not None and s >= always_full_from)
        if is_full:
            counter = 0
        else:
            counter += 1
        full.append(is_full)
    return full


# ---------------------------------------------------------------------------------------------
# TaylorSeer factors: F_0 = v(s_f), F_{i+1} = (F_i(s_f) - F_i(s_f')) / (s_f - s_f')
# ---------------------------------------------------------------------------------------------


def update_factors(old: list[Tensor] | None, v: Tensor, distance: float | None, order: int) -> list[Tensor]:
    """New Taylor factors after a full evaluation ``v`` at distance ``distance`` (in steps) from the
    previous full evaluation (``None`` when there is none). Higher factors need older ones, so
    after n full steps at most n-1 derivative factors exist."""
    new = [v]
    if old is None or distance is None:
        return new
    for i in range(order):
        if i >= len(old):
            break
        new.append((new[i] - old[i]) / distance)
    return new


def taylor_eval(factors: list[Tensor], x: float) -> Tensor:
    """sum_i F_i x^i / i!  (``x`` = steps since the last full evaluation)."""
    out = factors[0]
    for i in range(1, len(factors)):
        out = out + factors[i] * (x ** i / math.factorial(i))
    return out


def history_velocity(ctx: StepContext, back: int = 1) -> Latent | None:
    """Velocity used ``back`` steps ago (``None`` if the run is younger)."""
    if len(ctx.history) < back:
        return None
    return ctx.history[-back].v


def policy_state(ctx: StepContext, owner: object) -> dict[str, Any]:
    """The per-run scratch dict of one policy component (namespaced by its class name and id, so
    composed policies never share keys; it lives in ``ctx.state`` and dies with the run)."""
    key = f"{type(owner).__name__}@{id(owner):x}"
    return ctx.state.setdefault(key, {})
