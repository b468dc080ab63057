"""Spatiotemporal token carving for the SLaT sampler (Fast-SAM3D, Sec. 3.2, spatial part).

At a carving step only the most salient tokens enter the SLaT network (``compute(active)``); the
others reuse the velocity they had at the previous step. Saliency per token i:

    J_i = (1 - w_f) * (w_M * M^_i + gamma * A^_i) + w_f * S^_i

with M_i = ||v_i||_2 of the previous step's velocity (the current one is unknown before the pass),
A_i = ||v_i - v'_i||_2 the change against a reference velocity v' (``change_reference="step"``: the
step before, i.e. the change between the two most recent velocities; ``"selection"``: the velocity
seen at the previous carving step, as the released tracker), and ^ = min-max normalisation over the
tokens, (u - min) / (max - min + 1e-6). The frequency term is

    S_freq(i) = minmax_j( |IFFT3( FFT3(V) * 1[ ||k|| >= c R ] )|(p_j) )(i)

with V the (R,R,R) coarse-voxel field (``hfer.voxel_values``: 0/1 occupancy, or the positive
occupancy logits as the released code), k the integer FFT frequency vector, c = ``hfer.cutoff_3d``
(0.125, i.e. 8 bins at 64^3), p_j the voxel of token j: the magnitude of the high-pass-filtered
occupancy at each token, large at edges, corners and thin parts (computed once per run, see
:func:`token_freq_scores` for where V comes from when a coordinate transform moved the tokens).

Paper: w_M = 1, w_f = 1/2 (J = 1/2 (M + gamma A) + 1/2 S), gamma = 1 (not given in the paper).
Released: J = 0.3 S + 0.7 (0.3 M + 0.7 A), i.e. w_M = 0.3, gamma = 0.7, w_f = 0.3.

The lowest-J tokens are frozen; a token frozen at ``max_frozen_steps`` consecutive carving steps is
forced back into the network (released: streak cap 4).

Pluggable signals (:mod:`fs3d_accel.accel.signals`): ``signals={"M": w1, "A": w2, "S_freq": w3, ...}``
replaces the formula above by J = sum_name w_name * minmax(signal_name) over registered token-level
signals (gamma / magnitude_weight / freq_weight are then unused). ``{"M": 0.5, "A": 0.5,
"S_freq": 0.5}`` gives exactly the paper's J.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..seams import ComputeFn, Latent, StepContext
from ._common import check_choice, check_int, check_nonneg, check_range, policy_state
from .signals import TokenInputs, check_weights, token_signal_values
from .spectral import HFERConfig, coords_grid, minmax, voxel_grid, voxel_highfreq_scores

CHANGE_REFERENCES = ("step", "selection")


def token_freq_scores(extras: dict[str, Any], hfer: HFERConfig) -> tuple[Tensor, str]:
    """Per-token S_freq in [0,1] (float64, (N,)) and where it came from.

    ``extras["token_scores"]`` (precomputed, e.g. max-pooled through a coordinate transform) wins;
    else the occupancy logits when every token voxel is occupied in them ("occupancy"); else (the
    tokens were moved by a coordinate transform) the binary grid of the token voxels ("coords").
    """
    if extras.get("token_scores") is not None:
        return minmax(torch.as_tensor(extras["token_scores"]).double().cpu()), "extras"
    coords = extras.get("coords")
    if coords is None:
        raise ValueError("SLaT carving needs extras['coords'] (N,4) to compute the frequency saliency "
                         "(or set freq_weight=0)")
    logits = extras.get("occupancy_logits")
    c = coords[:, 1:].long().cpu()
    if logits is not None:
        r = logits.shape[0]
        if len(c) and int(c.min()) >= 0 and int(c.max()) < r and bool((logits.cpu()[c[:, 0], c[:, 1], c[:, 2]] > 0).all()):
            return voxel_highfreq_scores(voxel_grid(logits, hfer), coords, hfer.cutoff_3d), "occupancy"
        res = r
    else:
        res = int(extras.get("resolution") or (int(c.max()) + 1))
    return voxel_highfreq_scores(coords_grid(coords, res), coords, hfer.cutoff_3d), "coords"


def token_norm(v: Tensor) -> Tensor:
    """Per-token L2 norm over channels, float64 (N,)."""
    return v.double().norm(dim=-1)


def host_f64(v: Tensor, memo: dict[str, Any] | None = None) -> Tensor:
    """``v`` as a float64 CPU tensor (copied in its own dtype, then widened: same values, half the
    transfer). ``memo`` (a per-run dict) keeps the last two conversions, so the previous step's
    velocity, which becomes the next step's reference, crosses to the host only once."""
    if memo is not None:
        for src, version, host in memo.get("host_f64", ()):
            if src is v and src._version == version:  # same tensor, not modified in place since
                return host
    host = v.detach().cpu().double()
    if memo is not None:
        memo["host_f64"] = (memo.get("host_f64", ())[-1:]) + ((v, v._version, host),)
    return host


def saliency(v_prev: Tensor, v_ref: Tensor | None, s_freq: Tensor, *, gamma: float, freq_weight: float,
             magnitude_weight: float, memo: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """M, A (raw), their normalised forms and J (float64 on the CPU, (N,) each) -- see the module
    docstring. Inputs may live on any device; the (N,) scores are small, so they are moved to the CPU
    (``memo``: see :func:`host_f64`)."""
    v_prev = host_f64(v_prev, memo)
    m = token_norm(v_prev)
    a = torch.zeros_like(m) if v_ref is None else token_norm(v_prev - host_f64(v_ref, memo))
    mh, ah, sh = minmax(m, 1e-6), minmax(a, 1e-6), minmax(s_freq.double(), 1e-6)
    j = (1 - freq_weight) * (magnitude_weight * mh + gamma * ah) + freq_weight * sh
    return {"M": m, "A": a, "M_hat": mh, "A_hat": ah, "S_freq": sh, "J": j}


def signal_saliency(weights: tuple[tuple[str, float], ...], inputs: TokenInputs,
                    cache: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Raw values of each named token signal and J = sum w * minmax(value, 1e-6) (float64 CPU, (N,))."""
    out: dict[str, Tensor] = {}
    j: Tensor | None = None
    for name, w in weights:
        raw = token_signal_values(name, inputs, cache)
        out[name] = raw
        term = w * minmax(raw, 1e-6)
        j = term if j is None else j + term
    assert j is not None
    out["J"] = j
    return out


def lowest_k(j: Tensor, k: int) -> Tensor:
    """Bool mask (N,) of the ``k`` smallest entries of the 1-D ``j``, ties broken by lower index:
    exactly the first ``k`` of a stable ascending argsort, found with one O(N) selection
    (``kthvalue``) instead of a full sort."""
    n = j.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=j.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=j.device)
    if bool(torch.isnan(j).any()):  # sort order of NaN: keep the plain argsort semantics
        frozen = torch.zeros(n, dtype=torch.bool, device=j.device)
        frozen[torch.argsort(j, stable=True)[:k]] = True
        return frozen
    t = torch.kthvalue(j, k).values
    below = j < t
    ties = j == t
    need = k - int(below.sum())
    return below | (ties & (torch.cumsum(ties, 0) <= need))


def select_frozen(j: Tensor, n_skip: int, streak: Tensor, max_frozen: int) -> tuple[Tensor, Tensor]:
    """The ``n_skip`` lowest-``j`` tokens, minus those already frozen ``max_frozen`` times in a row.

    Returns (frozen bool mask (N,), new streak). Ties break by token index (stable sort).
    """
    j, streak = j.cpu(), streak.cpu()
    frozen = lowest_k(j, n_skip)
    frozen &= streak < max_frozen
    new_streak = torch.where(frozen, streak + 1, torch.zeros_like(streak))
    return frozen, new_streak


def _fill_active(v_prev: Tensor, frozen: Tensor, compute: ComputeFn) -> Tensor:
    """Network on the non-frozen rows; frozen rows keep ``v_prev`` (one out-of-place index_copy
    instead of clone + index_put: same values)."""
    active = torch.nonzero(~frozen).flatten().to(v_prev.device)
    out = compute(active)
    return v_prev.index_copy(0, active, out.to(v_prev.dtype))


@dataclass(frozen=True)
class SLaTTokenCarving:
    """Recompute only the salient SLaT tokens; the rest reuse their previous velocity.

    Give either ``keep`` (paper: fraction of tokens RECOMPUTED, K = ceil(keep N); paper top-10 %)
    or ``carve_ratio`` (released semantics: fraction FROZEN, floor(ratio N) lowest-J tokens; README
    0.1 = 90 % recomputed). Default: keep = 0.1. ``keep=1`` (or ``carve_ratio=0``) never carves and
    is bit-identical to the plain sampler. Carving starts at ``start_step`` (released: 2) and needs a
    previous velocity. ``hfer`` sets the S_freq grid and cut-off. ``signals`` (``{name: weight}`` of
    registered token signals) switches to the pluggable saliency (module docstring).
    """

    keep: float | None = None
    carve_ratio: float | None = None
    gamma: float = 1.0
    freq_weight: float = 0.5
    magnitude_weight: float = 1.0
    max_frozen_steps: int = 4
    start_step: int = 2
    change_reference: str = "step"
    hfer: HFERConfig = field(default_factory=HFERConfig.paper)
    signals: Any = None

    def __post_init__(self) -> None:
        if self.keep is not None and self.carve_ratio is not None:
            raise ValueError("give either keep (fraction recomputed) or carve_ratio (fraction frozen), not both")
        if self.keep is None and self.carve_ratio is None:
            object.__setattr__(self, "keep", 0.1)
        if self.keep is not None:
            check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        else:
            check_range("carve_ratio", self.carve_ratio, 0.0, 1.0, high_open=True)
        check_nonneg("gamma", self.gamma)
        check_range("freq_weight", self.freq_weight, 0.0, 1.0)
        check_nonneg("magnitude_weight", self.magnitude_weight)
        check_int("max_frozen_steps", self.max_frozen_steps, 0)
        check_int("start_step", self.start_step, 1)
        check_choice("change_reference", self.change_reference, CHANGE_REFERENCES)
        if not isinstance(self.hfer, HFERConfig):
            raise TypeError(f"hfer must be an HFERConfig, got {type(self.hfer).__name__}")
        if self.signals is not None:
            object.__setattr__(self, "signals", check_weights(self.signals, "token"))

    @classmethod
    def released(cls, carve_ratio: float = 0.1, **kw: Any) -> "SLaTTokenCarving":
        """The released code's carving (README ratio 0.1; weights 0.3 S + 0.49 A + 0.21 M)."""
        base = dict(carve_ratio=carve_ratio, gamma=0.7, magnitude_weight=0.3, freq_weight=0.3, max_frozen_steps=4,
                    start_step=2, change_reference="selection", hfer=HFERConfig())
        base.update(kw)
        return cls(**base)

    def num_frozen(self, n: int) -> int:
        if self.keep is not None:
            return n - min(n, max(1, math.ceil(self.keep * n - 1e-9)))
        return int(self.carve_ratio * n)

    # ------------------------------------------------------------------ policy
    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        x = ctx.x
        if isinstance(x, dict):
            raise TypeError("SLaTTokenCarving works on the SLaT (N,C) latent, not the SS modality dict")
        n = x.shape[0]
        n_skip = self.num_frozen(n)
        st = policy_state(ctx, self)
        if ctx.step < self.start_step or not ctx.history or n_skip <= 0 or self.max_frozen_steps == 0:
            st["streak"] = None  # a full pass refreshes every token
            return compute()
        v_prev = ctx.history[-1].v
        if self.change_reference == "step":
            v_ref = ctx.history[-2].v if len(ctx.history) >= 2 else None
        else:
            v_ref = st.get("last_selection_v")
        st["last_selection_v"] = v_prev
        if self.signals is not None:
            return self._carve_with_signals(ctx, compute, st, v_prev, v_ref, n_skip)
        if "s_freq" not in st:
            if self.freq_weight > 0:
                st["s_freq"], st["s_freq_source"] = token_freq_scores(ctx.extras, self.hfer)
            else:
                st["s_freq"], st["s_freq_source"] = torch.zeros(n, dtype=torch.float64), "none"
        if st["s_freq"].numel() != n:
            raise ValueError(f"frequency scores have {st['s_freq'].numel()} rows, latent has {n} tokens")
        sal = saliency(v_prev, v_ref, st["s_freq"], gamma=self.gamma, freq_weight=self.freq_weight,
                       magnitude_weight=self.magnitude_weight, memo=st)
        streak = st.get("streak")
        if streak is None:
            streak = torch.zeros(n, dtype=torch.long)
        frozen, st["streak"] = select_frozen(sal["J"], n_skip, streak, self.max_frozen_steps)
        ctx.info["carving"] = {k: sal[k].float() for k in ("M", "A", "S_freq", "J")}
        ctx.info["carving"].update(selected=~frozen, freq_source=st["s_freq_source"])
        if not bool(frozen.any()):
            return compute()
        return _fill_active(v_prev, frozen, compute)

    def _carve_with_signals(self, ctx: StepContext, compute: ComputeFn, st: dict[str, Any], v_prev: Tensor,
                            v_ref: Tensor | None, n_skip: int) -> Latent:
        """The carving step with J from the named signals (same freezing rule as the paper's J)."""
        n = ctx.x.shape[0]
        inputs = TokenInputs(v_prev=v_prev, v_ref=v_ref, extras=ctx.extras, hfer=self.hfer, step=ctx.step,
                             num_steps=ctx.num_steps)
        sal = signal_saliency(self.signals, inputs, st.setdefault("signal_cache", {}))
        streak = st.get("streak")
        if streak is None:
            streak = torch.zeros(n, dtype=torch.long)
        frozen, st["streak"] = select_frozen(sal["J"], n_skip, streak, self.max_frozen_steps)
        ctx.info["carving"] = {k: v.float() for k, v in sal.items()}
        ctx.info["carving"].update(selected=~frozen, freq_source="signals")
        if not bool(frozen.any()):
            return compute()
        return _fill_active(v_prev, frozen, compute)

    @property
    def tag(self) -> str:
        frac = f"keep{self.keep:g}" if self.keep is not None else f"carve{self.carve_ratio:g}"
        if self.signals is not None:
            sig = "+".join(f"{w:g}{name}" for name, w in self.signals)
            return f"carving-{frac}-{sig}-f{self.max_frozen_steps}"
        return f"carving-{frac}-g{self.gamma:g}-wf{self.freq_weight:g}-wm{self.magnitude_weight:g}-f{self.max_frozen_steps}"


__all__ = ["CHANGE_REFERENCES", "SLaTTokenCarving", "host_f64", "lowest_k", "saliency", "select_frozen", "signal_saliency", "token_freq_scores",
           "token_norm"]
