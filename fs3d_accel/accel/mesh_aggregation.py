"""Spectral-aware token aggregation (Fast-SAM3D, Sec. 3.3) and the coordinate reductions it uses.

Per object: joint score H = w * HFER(2D mask) + (1 - w) * HFER(3D voxels); factor
S = scales[0] (complex, H >= tau_high), scales[1] (tau_low < H < tau_high), scales[2] (simple,
H <= tau_low). Two placements:

- ``"pre_decoder"`` (paper): on the structured latent right before the mesh decoder.
  q = floor(p / S) per axis, duplicates merged, features max-pooled over the merged voxels.
  Reduced voxel q covers original voxels [q S, (q + 1) S), so a decoded vertex at grid position g'
  (voxel units of the R^3 grid, g' = (u + 0.5) R for u in [-0.5, 0.5]) maps back to g = S g'.
- ``"pre_slat"`` (released): on the SS coordinates before the SLaT stage (no features yet). Per
  axis the coordinates shrink about the bounding-box centre (notes Sec. 4.4): size = max - min + 1,
  target = size / S, t_min = min + (size - target) / 2, p' = round((p - min) / (max - min)
  (target - 1) + t_min) clamped to [floor(t_min), floor(t_min + target - 1)]. Restoring maps the
  reduced bounding box [min', max' + 1] affinely onto the original [min, max + 1] per axis. An axis
  one voxel thick is left unchanged (the released code divides by zero there). The released
  overrides apply: N < min_tokens -> S = 1, N >= max_tokens -> S = 2, either HFER == 0 -> S = 1.
  Thresholds are given for the 64^3 grid and scaled by (R / 64)^2 (surface voxel counts grow with
  the area): 2048 / 42000 at 64^3 become 512 / 10500 at the mini model's 32^3.

``signal`` names the registered instance-level signal that gives the score (default ``"HFER"``,
the joint score above; :mod:`fs3d_accel.accel.signals`), so another complexity measure plugs in
without touching this class.

With S = 1 the tokens are returned unchanged (same object, same order) and vertices are not
touched, so the transform is then bit-identical to the plain pipeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..seams import SparseTokens, TransformContext, TransformState
from ._common import check_choice, check_int, check_range, check_real
from .spectral import HFERConfig, hfer_2d, hfer_3d

PLACEMENTS = ("pre_decoder", "pre_slat")
REFERENCE_RESOLUTION = 64


# ---------------------------------------------------------------------------------------------
# coordinate reductions
# ---------------------------------------------------------------------------------------------


_KEY_LIMIT = 1 << 62


def _row_keys(q: Tensor) -> Tensor | None:
    """One int64 per row of q (N,4) whose order is the rows' lexicographic order (mixed radix over
    the per-column ranges), or ``None`` when the ranges are too wide for int64. Sorting these keys
    is much cheaper than ``torch.unique(dim=0)``'s row comparisons (CPU and CUDA); one host sync."""
    q64 = q.long()
    lo = q64.min(0).values
    spans = (q64.max(0).values - lo + 1).tolist()
    total = 1
    for s in spans:
        total *= s
    if total >= _KEY_LIMIT:
        return None
    rel = q64 - lo
    key = rel[:, 0]
    for ax in range(1, q64.shape[1]):
        key = key * spans[ax] + rel[:, ax]
    return key


def _unique_rows(q: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted unique rows, inverse) exactly as ``torch.unique(q, dim=0, return_inverse=True)``."""
    key = _row_keys(q) if q.shape[0] else None
    if key is None:
        return torch.unique(q, dim=0, return_inverse=True)
    ukey, inv = torch.unique(key, sorted=True, return_inverse=True)
    # any member row of a group stands for it (the members are equal rows)
    first = torch.empty(ukey.shape[0], dtype=torch.long, device=q.device)
    first.scatter_(0, inv, torch.arange(q.shape[0], device=q.device))
    return q[first], inv


def _merge(q: Tensor, tokens: SparseTokens) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Dedupe rows of q (N,4) (sorted lexicographically) and max-pool feats / scores over duplicates."""
    uniq, inv = _unique_rows(q)
    m = uniq.shape[0]

    def pool(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        flat = x.reshape(x.shape[0], -1)
        out = torch.zeros((m, flat.shape[1]), dtype=flat.dtype, device=flat.device)
        out = out.scatter_reduce(0, inv.to(flat.device)[:, None].expand(-1, flat.shape[1]), flat, "amax",
                                 include_self=False)
        return out.reshape((m,) + tuple(x.shape[1:]))

    return uniq.to(torch.int32), pool(tokens.feats), pool(tokens.scores)


def quantize_tokens(tokens: SparseTokens, scale: float) -> SparseTokens:
    """floor(p / S) on x, y, z (batch kept), duplicates merged with max-pooled feats and scores."""
    c = tokens.coords
    xyz = torch.floor(c[:, 1:].double() / scale).to(c.dtype)
    q = torch.cat([c[:, :1], xyz], 1)
    coords, feats, scores = _merge(q, tokens)
    return SparseTokens(coords=coords, resolution=tokens.resolution, feats=feats, scores=scores)


def shrink_tokens(tokens: SparseTokens, scale: float) -> tuple[SparseTokens, dict[str, list[float]]]:
    """Released bbox-centred shrink by ``scale`` (module docstring); returns the tokens and the
    per-axis affine map reduced grid -> original grid (``a``, ``b``: g = a g' + b)."""
    c = tokens.coords
    xyz = c[:, 1:].double()
    lo, hi = xyz.min(0).values, xyz.max(0).values
    out = xyz.clone()
    # the per-axis parameters as Python floats (same IEEE double arithmetic, one host sync)
    for ax, (l, h) in enumerate(zip(lo.tolist(), hi.tolist())):
        if h == l:
            continue
        size = h - l + 1
        target = size / scale
        t_min = l + (size - target) / 2
        t_max = t_min + target - 1
        p = torch.round((xyz[:, ax] - l) / (h - l) * (target - 1) + t_min)
        out[:, ax] = torch.clamp(p, float(math.floor(t_min)), float(math.floor(t_max)))
    q = torch.cat([c[:, :1], out.to(c.dtype)], 1)
    coords, feats, scores = _merge(q, tokens)
    lo2, hi2 = coords[:, 1:].double().min(0).values, coords[:, 1:].double().max(0).values
    a = (hi - lo + 1) / (hi2 - lo2 + 1)
    b = lo - a * lo2
    reduced = SparseTokens(coords=coords, resolution=tokens.resolution, feats=feats, scores=scores)
    return reduced, {"affine_a": a.tolist(), "affine_b": b.tolist()}


def restore_affine(vertices: Tensor, resolution: int, a: list[float], b: list[float]) -> Tensor:
    """Map vertices in the normalised cube of the reduced grid back: u -> (a (u + 0.5) R + b) / R - 0.5."""
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be (V,3), got {tuple(vertices.shape)}")
    at = torch.tensor(a, dtype=torch.float64, device=vertices.device)
    bt = torch.tensor(b, dtype=torch.float64, device=vertices.device)
    g = (vertices.double() + 0.5) * resolution
    return ((at * g + bt) / resolution - 0.5).to(vertices.dtype)


def reduce_with(tokens: SparseTokens, scale: float, placement: str) -> tuple[SparseTokens, dict[str, Any]]:
    """Apply the placement's reduction (``scale == 1``: the tokens unchanged, no map)."""
    if scale == 1.0:
        return tokens, {"affine_a": None, "affine_b": None}
    if len(tokens) == 0:
        raise ValueError("cannot aggregate an empty token set")
    if placement == "pre_decoder":
        return quantize_tokens(tokens, scale), {"affine_a": [scale] * 3, "affine_b": [0.0] * 3}
    if tokens.feats is not None:
        raise ValueError("placement 'pre_slat' shrinks coordinates before the SLaT stage; got tokens with feats")
    return shrink_tokens(tokens, scale)


def restore_from_state(vertices: Tensor, state: TransformState) -> Tensor:
    """Undo :func:`reduce_with` on decoded vertices (identity when nothing was reduced)."""
    a, b = state.info.get("affine_a"), state.info.get("affine_b")
    if a is None or state.scale == 1.0:
        return vertices
    return restore_affine(vertices, int(state.info["resolution"]), a, b)


def _check_scale(name: str, s: Any) -> None:
    v = check_real(name, s)
    if v < 1.0:
        raise ValueError(f"{name} must be >= 1 (a downsampling factor), got {s}")


# ---------------------------------------------------------------------------------------------
# the transform
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralTokenAggregation:
    """Instance-adaptive token aggregation driven by HFER (see the module docstring).

    Defaults: w = 0.9, tau_low = 0.5, tau_high = 0.7, S in (1.25, 1.5, 2.0) (released code and
    paper), HFER as the released code (:class:`~fs3d_accel.accel.spectral.HFERConfig`), paper
    placement. ``scales=(1, 1, 1)`` never aggregates. ``ctx.info["hfer_2d"]`` (precomputed) and
    ``ctx.info["image"]`` (H,W,3 uint8, for the released texture-in-mask 2D HFER) are honoured.
    """

    w: float = 0.9
    tau_low: float = 0.5
    tau_high: float = 0.7
    scales: tuple[float, float, float] = (1.25, 1.5, 2.0)
    placement: str = "pre_decoder"
    hfer: HFERConfig = field(default_factory=HFERConfig)
    min_tokens: int | None = None
    max_tokens: int | None = None
    zero_hfer_is_identity: bool = False
    signal: str = "HFER"

    def __post_init__(self) -> None:
        check_range("w", self.w, 0.0, 1.0)
        check_range("tau_low", self.tau_low, 0.0, 1.0)
        check_range("tau_high", self.tau_high, 0.0, 1.0)
        if self.tau_low > self.tau_high:
            raise ValueError(f"tau_low ({self.tau_low}) must be <= tau_high ({self.tau_high})")
        if not isinstance(self.scales, tuple) or len(self.scales) != 3:
            raise ValueError(f"scales must be a 3-tuple (complex, medium, simple), got {self.scales!r}")
        for i, s in enumerate(self.scales):
            _check_scale(f"scales[{i}]", s)
        check_choice("placement", self.placement, PLACEMENTS)
        if not isinstance(self.hfer, HFERConfig):
            raise TypeError(f"hfer must be an HFERConfig, got {type(self.hfer).__name__}")
        for name in ("min_tokens", "max_tokens"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.signal != "HFER":
            from .signals import get_signal
            get_signal(self.signal, "instance")

    @classmethod
    def released(cls, **kw: Any) -> "SpectralTokenAggregation":
        """The released code: pre-SLaT bbox shrink, 2048 / 42000 token overrides, zero HFER -> S = 1."""
        base: dict[str, Any] = dict(placement="pre_slat", min_tokens=2048, max_tokens=42000, zero_hfer_is_identity=True)
        base.update(kw)
        return cls(**base)

    # ------------------------------------------------------------------ decision
    def choose_scale(self, score: float) -> float:
        if score >= self.tau_high:
            return float(self.scales[0])
        if score <= self.tau_low:
            return float(self.scales[2])
        return float(self.scales[1])

    def _limit(self, value: int | None, resolution: int) -> float | None:
        if value is None:
            return None
        return value * (resolution / REFERENCE_RESOLUTION) ** 2

    def measure(self, ctx: TransformContext) -> dict[str, float]:
        """HFER of the mask and the voxels, and the joint score (or the named signal's score)."""
        if self.signal != "HFER":
            from .signals import get_signal
            return {"score": float(get_signal(self.signal, "instance").compute(ctx, w=self.w, hfer=self.hfer))}
        h2 = ctx.info.get("hfer_2d")
        if h2 is None:
            if ctx.mask is None:
                raise ValueError("SpectralTokenAggregation needs TransformContext.mask (or info['hfer_2d'])")
            image = ctx.info.get("image")
            h2 = hfer_2d(ctx.mask, self.hfer, None if image is None else torch.as_tensor(image))
        if ctx.occupancy_logits is None:
            raise ValueError("SpectralTokenAggregation needs TransformContext.occupancy_logits")
        h3 = hfer_3d(ctx.occupancy_logits, self.hfer)
        return {"hfer_2d": float(h2), "hfer_3d": float(h3), "score": self.w * float(h2) + (1 - self.w) * float(h3)}

    def decide(self, n_tokens: int, resolution: int, measured: dict[str, float]) -> tuple[float, str]:
        """(S, reason) for an object with ``n_tokens`` voxels at ``resolution``^3."""
        lo, hi = self._limit(self.min_tokens, resolution), self._limit(self.max_tokens, resolution)
        if hi is not None and n_tokens >= hi:
            return 2.0, "max_tokens"
        if lo is not None and n_tokens < lo:
            return 1.0, "min_tokens"
        zero = "hfer_2d" in measured and (measured["hfer_2d"] == 0 or measured["hfer_3d"] == 0)
        if self.zero_hfer_is_identity and zero:
            return 1.0, "zero_hfer"
        return self.choose_scale(measured["score"]), "score"

    # ------------------------------------------------------------------ TokenTransform
    def reduce(self, tokens: SparseTokens, ctx: TransformContext) -> tuple[SparseTokens, TransformState]:
        if self.placement == "pre_slat" and tokens.feats is not None:
            raise ValueError("placement 'pre_slat' shrinks coordinates before the SLaT stage; got tokens with feats "
                             "(use placement='pre_decoder' for the structured latent)")
        measured = self.measure(ctx)
        scale, reason = self.decide(len(tokens), tokens.resolution, measured)
        if self.placement == "pre_slat" and scale != 1.0 and tokens.scores is None:
            # carry the per-voxel S_freq through the shrink (max-fused), as the released code does
            from .slat_carving import token_freq_scores
            s_freq, _ = token_freq_scores({"coords": tokens.coords, "occupancy_logits": ctx.occupancy_logits},
                                          self.hfer)
            tokens = SparseTokens(coords=tokens.coords, resolution=tokens.resolution, scores=s_freq)
        reduced, affine = reduce_with(tokens, scale, self.placement)
        info = dict(measured, S=scale, reason=reason, placement=self.placement, tokens_before=len(tokens),
                    tokens_after=len(reduced), resolution=tokens.resolution, **affine)
        return reduced, TransformState(scale=scale, info=info)

    def restore_vertices(self, vertices: Tensor, state: TransformState) -> Tensor:
        return restore_from_state(vertices, state)

    @property
    def tag(self) -> str:
        s = "-".join(f"{x:g}" for x in self.scales)
        sig = "" if self.signal == "HFER" else f"-{self.signal}"
        return f"sta-w{self.w:g}-t{self.tau_low:g}-{self.tau_high:g}-S{s}-{self.placement}{sig}"


__all__ = ["PLACEMENTS", "SpectralTokenAggregation", "quantize_tokens", "reduce_with", "restore_affine",
           "restore_from_state", "shrink_tokens"]
