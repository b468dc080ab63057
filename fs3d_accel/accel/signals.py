"""Heterogeneity signals: named, pluggable scores that accelerator policies decide from.

A signal has a ``name``, a ``level`` and ``compute(inputs, **kw)``:

- ``"token"``: one score per SLaT token, ``compute(TokenInputs) -> Tensor (N,)`` (float64, CPU).
  :class:`~fs3d_accel.accel.slat_carving.SLaTTokenCarving` takes ``signals={"M": 0.5, ...}`` and
  ranks tokens by J = sum_name weight * minmax(signal); a signal with ``static = True`` is computed
  once per run (geometry-only scores).
- ``"step"``: one number per sampler step from the run so far, ``compute(StepContext) -> float``
  (used by :mod:`fs3d_accel.accel.adaptive` to pick k and the carving keep ratio per object).
- ``"instance"``: one number per object, ``compute(TransformContext, w=..., hfer=...) -> float``
  (:class:`~fs3d_accel.accel.mesh_aggregation.SpectralTokenAggregation` takes ``signal="HFER"``).

Built-ins reuse the paper's code paths: ``M`` (update magnitude ||v_prev||), ``A`` (abrupt change
||v_prev - v_ref||), ``S_freq`` (3D FFT high-pass intensity, :func:`token_freq_scores`), ``HFER``
(w HFER_2D + (1 - w) HFER_3D). Beyond the paper: ``NV`` (normal variation of the occupancy surface,
a curvature proxy), ``layout_jitter`` and ``update_concentration`` (step level).

A new signal plugs into a policy without touching the policy::

    @register_signal
    class Height:
        name, level, static = "height", "token", True
        def compute(self, inputs, **kw):
            return inputs.extras["coords"][:, 3].double()

    SLaTTokenCarving(signals={"M": 0.5, "A": 0.5, "height": 0.5})
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from .spectral import HFERConfig, coords_grid

LEVELS = ("token", "step", "instance")

#: the modalities of the SS latent that are not the shape latent (the layout tokens)
SHAPE_KEY = "shape"


@runtime_checkable
class HeterogeneitySignal(Protocol):
    """A named score; see the module docstring for what ``compute`` receives at each level."""

    name: str
    level: str

    def compute(self, inputs: Any, **kw: Any) -> Tensor | float: ...


@dataclass
class TokenInputs:
    """What a token-level signal sees at one SLaT step.

    ``v_prev`` (N,C): the previous step's velocity (the current one is unknown before the pass);
    ``v_ref`` (N,C) or ``None``: the reference for change signals (set by the policy's
    ``change_reference``); ``extras``: the sampler extras (``coords`` (N,4), ``occupancy_logits``
    (R,R,R), ``resolution``, ``token_scores``); ``hfer``: grid/cut-off convention.
    """

    v_prev: Tensor | None
    v_ref: Tensor | None
    extras: Mapping[str, Any]
    hfer: HFERConfig = field(default_factory=HFERConfig.paper)
    step: int = 0
    num_steps: int = 0

    @property
    def num_tokens(self) -> int:
        if self.v_prev is not None:
            return int(self.v_prev.shape[0])
        coords = self.extras.get("coords")
        if coords is None:
            raise ValueError("TokenInputs has neither v_prev nor extras['coords']; cannot tell the token count")
        return int(coords.shape[0])


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, HeterogeneitySignal] = {}


def _check_signal(sig: Any) -> None:
    name = getattr(sig, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"a signal needs a non-empty str attribute 'name', got {name!r}")
    if getattr(sig, "level", None) not in LEVELS:
        raise ValueError(f"signal {name!r}: level must be one of {LEVELS}, got {getattr(sig, 'level', None)!r}")
    if not callable(getattr(sig, "compute", None)):
        raise TypeError(f"signal {name!r} has no callable compute(inputs, **kw)")


def register_signal(signal: Any = None, *, replace: bool = False) -> Any:
    """Add a signal (an instance, or a class with a no-argument constructor) to the registry.

    Usable as ``register_signal(obj)`` or as a class decorator. A name that is already taken raises
    unless ``replace=True``. Returns what it was given (so decorated classes stay classes).
    """
    if signal is None:
        return lambda s: register_signal(s, replace=replace)
    inst = signal() if isinstance(signal, type) else signal
    _check_signal(inst)
    if inst.name in _REGISTRY and not replace:
        raise ValueError(f"signal {inst.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[inst.name] = inst
    return signal


def unregister_signal(name: str) -> None:
    """Remove a signal (tests and notebooks that register temporary ones)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown signal {name!r}; available: {available_signals()}")
    del _REGISTRY[name]


def get_signal(name: str, level: str | None = None) -> HeterogeneitySignal:
    """The registered signal ``name``; with ``level``, also check that it works at that level."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown signal {name!r}; available: {available_signals()}")
    sig = _REGISTRY[name]
    if level is not None and sig.level != level:
        raise ValueError(f"signal {name!r} is a {sig.level}-level signal; this place needs a {level}-level one "
                         f"({available_signals(level)})")
    return sig


def available_signals(level: str | None = None) -> list[str]:
    """Sorted names of the registered signals (of one level if given)."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return sorted(n for n, s in _REGISTRY.items() if level is None or s.level == level)


def token_signal_values(name: str, inputs: TokenInputs, cache: dict[str, Tensor] | None = None) -> Tensor:
    """Raw (N,) float64 CPU values of a token signal; static ones are memoised in ``cache``."""
    sig = get_signal(name, "token")
    static = bool(getattr(sig, "static", False))
    if static and cache is not None and name in cache:
        return cache[name]
    out = torch.as_tensor(sig.compute(inputs)).detach().double().cpu().reshape(-1)
    n = inputs.num_tokens
    if out.numel() != n:
        raise ValueError(f"signal {name!r} returned {out.numel()} values for {n} tokens")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"signal {name!r} returned non-finite values")
    if static and cache is not None:
        cache[name] = out
    return out


def check_weights(weights: Mapping[str, float] | tuple[tuple[str, float], ...],
                  level: str) -> tuple[tuple[str, float], ...]:
    """Validate ``{signal name: weight}`` (registered names of ``level``, finite weights >= 0, not all 0)
    and return it as a tuple of pairs (hashable, in the given order)."""
    pairs = tuple(weights.items()) if isinstance(weights, Mapping) else tuple(weights)
    if not pairs:
        raise ValueError("signals must name at least one signal, e.g. {'M': 0.5, 'A': 0.5, 'S_freq': 0.5}")
    seen = set()
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"signals must map names to weights, got item {item!r}")
        name, w = item
        if name in seen:
            raise ValueError(f"signal {name!r} given twice")
        seen.add(name)
        get_signal(name, level)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of signal {name!r} must be a finite number >= 0, got {w!r}")
    if all(w == 0 for _, w in pairs):
        raise ValueError("all signal weights are 0: nothing to rank tokens by")
    return tuple((n, float(w)) for n, w in pairs)


# ---------------------------------------------------------------------------------------------
# built-in token signals (the paper's, via the existing carving code)
# ---------------------------------------------------------------------------------------------


def _token_norm(v: Tensor) -> Tensor:
    from .slat_carving import token_norm
    return token_norm(v.detach().cpu())


@dataclass(frozen=True)
class UpdateMagnitude:
    """M_i = ||v_prev_i||_2: how much token i moved at the last step."""

    name: str = "M"
    level: str = "token"
    static: bool = False

    def compute(self, inputs: TokenInputs, **kw: Any) -> Tensor:
        if inputs.v_prev is None:
            raise ValueError("signal 'M' needs the previous velocity (TokenInputs.v_prev)")
        return _token_norm(inputs.v_prev)


@dataclass(frozen=True)
class AbruptChange:
    """A_i = ||v_prev_i - v_ref_i||_2 (0 when there is no reference yet)."""

    name: str = "A"
    level: str = "token"
    static: bool = False

    def compute(self, inputs: TokenInputs, **kw: Any) -> Tensor:
        if inputs.v_prev is None:
            raise ValueError("signal 'A' needs the previous velocity (TokenInputs.v_prev)")
        if inputs.v_ref is None:
            return torch.zeros(inputs.v_prev.shape[0], dtype=torch.float64)
        return _token_norm(inputs.v_prev.detach().double().cpu() - inputs.v_ref.detach().double().cpu())


@dataclass(frozen=True)
class FrequencySaliency:
    """S_freq: high-pass magnitude of the coarse voxels at each token, in [0,1] (static per run)."""

    name: str = "S_freq"
    level: str = "token"
    static: bool = True

    def compute(self, inputs: TokenInputs, **kw: Any) -> Tensor:
        from .slat_carving import token_freq_scores
        return token_freq_scores(dict(inputs.extras), inputs.hfer)[0]


def token_occupancy(extras: Mapping[str, Any]) -> Tensor:
    """Binary (R,R,R) float64 occupancy the tokens live in: the occupancy logits > 0 when every token
    voxel is occupied there, else (a coordinate transform moved the tokens) the token voxels."""
    coords = extras.get("coords")
    if coords is None:
        raise ValueError("this signal needs extras['coords'] (N,4)")
    c = coords[:, 1:].long().cpu()
    logits = extras.get("occupancy_logits")
    if logits is not None:
        occ = logits.detach().cpu() > 0
        r = occ.shape[0]
        if len(c) and int(c.min()) >= 0 and int(c.max()) < r and bool(occ[c[:, 0], c[:, 1], c[:, 2]].all()):
            return occ.double()
        res = r
    else:
        res = int(extras.get("resolution") or (int(c.max()) + 1))
    return coords_grid(coords, res)


def normal_variation_field(occ: Tensor, sigma: float = 1.0) -> Tensor:
    """Per-voxel normal variation of the surface of a binary (R,R,R) grid, in [0, 1] (float64).

    The grid is Gaussian-smoothed (std ``sigma`` voxels), its gradient g gives the unit normals
    n = g / |g| wherever |g| > 1e-6; NV(p) = 1 - |sum_q n_q| / #q over the 3x3x3 neighbourhood q of p
    (normals that agree, as on a flat face, give 0; edges, corners and thin parts give larger values).
    Voxels with no normal in their neighbourhood get 0.
    """
    if occ.ndim != 3:
        raise ValueError(f"occupancy must be (R,R,R), got {tuple(occ.shape)}")
    x = occ.double()[None, None]
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    for dim in range(3):  # separable blur, zero padding (outside the grid is empty)
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(k1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad), k1.reshape(shape))
    g = torch.stack(torch.gradient(x[0, 0]), 0)  # (3,R,R,R)
    mag = g.norm(dim=0)
    valid = mag > 1e-6
    n = torch.where(valid, g / mag.clamp_min(1e-12), torch.zeros_like(g))
    box = torch.ones(1, 1, 3, 3, 3, dtype=torch.float64)
    s = F.conv3d(n[:, None], box, padding=1)[:, 0]          # (3,R,R,R)
    cnt = F.conv3d(valid.double()[None, None], box, padding=1)[0, 0]
    nv = 1.0 - s.norm(dim=0) / cnt.clamp_min(1.0)
    return torch.where(cnt > 0, nv, torch.zeros_like(nv)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class NormalVariation:
    """Beyond the paper: NV_i = normal variation of the occupancy surface at token i's voxel
    (:func:`normal_variation_field`), a local-curvature proxy. Static per run; unlike S_freq it has
    no global cut-off, so it does not flag a large flat face of a thin object."""

    name: str = "NV"
    level: str = "token"
    static: bool = True
    sigma: float = 1.0

    def compute(self, inputs: TokenInputs, **kw: Any) -> Tensor:
        field_ = normal_variation_field(token_occupancy(inputs.extras), self.sigma)
        c = inputs.extras["coords"][:, 1:].long().cpu()
        return field_[c[:, 0], c[:, 1], c[:, 2]]


# ---------------------------------------------------------------------------------------------
# step-level signals (early-step statistics for instance-adaptive control)
# ---------------------------------------------------------------------------------------------


def _layout_vector(v: Mapping[str, Tensor]) -> Tensor:
    parts = [t.detach().reshape(-1).double().cpu() for k, t in v.items() if k != SHAPE_KEY]
    if not parts:
        raise ValueError("the SS latent has no layout modalities (only 'shape')")
    return torch.cat(parts)


@dataclass(frozen=True)
class LayoutJitter:
    """Mean relative change of the layout-token velocity between consecutive past steps:
    mean_s ||v_s^L - v_{s-1}^L|| / (||v_{s-1}^L|| + 1e-8) over the SS history (L = every modality
    but ``shape``). Large when the layout velocity jitters, so extrapolating it is risky."""

    name: str = "layout_jitter"
    level: str = "step"

    def compute(self, ctx: Any, **kw: Any) -> float:
        hist = ctx.history
        if len(hist) < 2:
            raise ValueError("layout_jitter needs at least two past SS steps")
        vs = [_layout_vector(h.v) for h in hist]
        rel = [float((b - a).norm() / (a.norm() + 1e-8)) for a, b in zip(vs, vs[1:])]
        return sum(rel) / len(rel)


@dataclass(frozen=True)
class UpdateConcentration:
    """Share of the last SLaT update carried by the top ``top`` fraction of tokens:
    sum of the ceil(top N) largest ||v_{s-1,i} - v_{s-2,i}|| over their total (||v_{s-1,i}|| when
    only one step is known). ``top`` (uniform updates) .. 1 (all change in a few tokens)."""

    name: str = "update_concentration"
    level: str = "step"
    top: float = 0.1

    def compute(self, ctx: Any, **kw: Any) -> float:
        hist = ctx.history
        if not hist:
            raise ValueError("update_concentration needs at least one past SLaT step")
        v1 = hist[-1].v.detach().double().cpu()
        d = (v1 - hist[-2].v.detach().double().cpu()) if len(hist) >= 2 else v1
        a = d.norm(dim=-1)
        total = float(a.sum())
        if total <= 0:
            return self.top
        k = max(1, math.ceil(self.top * a.numel() - 1e-9))
        return float(torch.topk(a, k).values.sum()) / total


# ---------------------------------------------------------------------------------------------
# instance-level signal (the aggregation's joint HFER)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JointHFER:
    """H = w HFER_2D(mask) + (1 - w) HFER_3D(voxels), exactly as
    :meth:`SpectralTokenAggregation.measure` computes it."""

    name: str = "HFER"
    level: str = "instance"

    def compute(self, ctx: Any, w: float = 0.9, hfer: HFERConfig | None = None, **kw: Any) -> float:
        from .mesh_aggregation import SpectralTokenAggregation
        return SpectralTokenAggregation(w=w, hfer=hfer or HFERConfig()).measure(ctx)["score"]


for _sig in (UpdateMagnitude(), AbruptChange(), FrequencySaliency(), NormalVariation(), LayoutJitter(),
             UpdateConcentration(), JointHFER()):
    register_signal(_sig)

#: weights that make ``SLaTTokenCarving(signals=...)`` rank exactly as the paper's J
PAPER_WEIGHTS: dict[str, float] = {"M": 0.5, "A": 0.5, "S_freq": 0.5}

__all__ = [
    "AbruptChange", "FrequencySaliency", "HeterogeneitySignal", "JointHFER", "LEVELS", "LayoutJitter",
    "NormalVariation", "PAPER_WEIGHTS", "TokenInputs", "UpdateConcentration", "UpdateMagnitude",
    "available_signals", "check_weights", "get_signal", "normal_variation_field", "register_signal",
    "token_occupancy", "token_signal_values", "unregister_signal",
]
