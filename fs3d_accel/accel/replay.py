"""Record an accelerator's decisions on one model and replay them on another.

Used to measure speedups at true scale: the methods run on the trained ``sam3d-mini`` (where their
decisions depend on real shapes), a :class:`DecisionRecorder` keeps per-step decisions and
token fractions plus the aggregation factor chosen per object, and :func:`replay_accelerator`
makes an :class:`~fs3d_accel.seams.Accelerator` that performs exactly that much network work on the
``full`` model (same steps computed, same fraction of tokens, same S).

What replay does not reproduce: the values (skipped steps reuse the previous velocity rather than
the method's extrapolation, carved steps compute a seeded random subset of the recorded size) and
the method's own bookkeeping (saliency, FFTs), which are small next to network passes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..seams import Accelerator, StageEvent, StepContext, StepEvent
from .baselines import RandomTokenDrop, UniformTokenMerge


@dataclass
class DecisionTrace:
    """What one method decided on one object."""

    method: str
    object: str
    ss: list[tuple[str, float]] = field(default_factory=list)      # (decision, active fraction) per step
    slat: list[tuple[str, float]] = field(default_factory=list)
    coords_transform: dict[str, Any] | None = None                # {"kind": "merge"|"drop", ...}
    decoder_transform: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecisionTrace":
        return cls(method=d["method"], object=d["object"], ss=[tuple(x) for x in d["ss"]],
                   slat=[tuple(x) for x in d["slat"]], coords_transform=d.get("coords_transform"),
                   decoder_transform=d.get("decoder_transform"))


def describe_transform(transform: Any, state) -> dict[str, Any] | None:
    """A replayable description of what a token transform did to one object."""
    if transform is None:
        return None
    placement = getattr(transform, "placement", "pre_decoder")
    if isinstance(transform, RandomTokenDrop):
        return {"kind": "drop", "keep": float(transform.keep), "placement": placement, "seed": transform.seed}
    s = float(state.info.get("S", state.scale)) if state is not None else 1.0
    return {"kind": "merge", "S": s, "placement": placement}


class DecisionRecorder:
    """Event listener collecting a :class:`DecisionTrace` (token transforms read from the result)."""

    def __init__(self, method: str, obj: str) -> None:
        self.trace = DecisionTrace(method=method, object=obj)

    def __call__(self, event: Any) -> None:
        if isinstance(event, StepEvent) and event.stage in ("ss", "slat"):
            getattr(self.trace, event.stage).append((event.decision, float(event.active_fraction)))

    def finish(self, accel: Accelerator, result) -> DecisionTrace:
        self.trace.coords_transform = describe_transform(accel.coords_transform, result.slat.coords_state)
        self.trace.decoder_transform = describe_transform(accel.decoder_transform, result.decode.decoder_state)
        return self.trace


class ReplayPolicy:
    """Performs the recorded amount of network work at every step."""

    def __init__(self, steps: list[tuple[str, float]], seed: int = 0) -> None:
        self.steps = list(steps)
        self.seed = seed

    def velocity(self, ctx: StepContext, compute):
        if ctx.num_steps != len(self.steps):
            raise ValueError(f"trace has {len(self.steps)} {ctx.stage} steps, sampler runs {ctx.num_steps}")
        decision, frac = self.steps[ctx.step]
        if decision == "computed" or not ctx.history:
            return compute()
        prev = ctx.history[-1].v
        if decision == "carved":
            n = ctx.x.shape[0]
            k = max(1, int(round(frac * n)))
            g = torch.Generator().manual_seed(self.seed * 100003 + ctx.step)
            active = torch.randperm(n, generator=g)[:k].sort().values.to(ctx.x.device)
            v = prev.clone()
            v[active] = compute(active)
            return v
        ctx.decision = decision
        ctx.active_fraction = 0.0
        return prev

    def __repr__(self) -> str:
        return f"ReplayPolicy({sum(d == 'computed' for d, _ in self.steps)} full / {len(self.steps)} steps)"


def _transform(desc: dict[str, Any] | None):
    if desc is None:
        return None
    if desc["kind"] == "drop":
        return RandomTokenDrop(keep=desc["keep"], placement=desc["placement"], seed=desc.get("seed", 0))
    if desc["S"] == 1.0:
        return None
    return UniformTokenMerge(scale=desc["S"], placement=desc["placement"])


def replay_accelerator(trace: DecisionTrace) -> Accelerator:
    """An accelerator doing the traced amount of work (see module docstring)."""
    coords_t = _transform(trace.coords_transform)
    dec_t = _transform(trace.decoder_transform)
    return Accelerator(ss_policy=ReplayPolicy(trace.ss) if trace.ss else None,
                       slat_policy=ReplayPolicy(trace.slat) if trace.slat else None,
                       coords_transform=coords_t, decoder_transform=dec_t, name=f"replay:{trace.method}")


def save_traces(traces: list[DecisionTrace], path: str | Path) -> None:
    Path(path).write_text(json.dumps([t.to_dict() for t in traces], indent=1))


def load_traces(path: str | Path) -> list[DecisionTrace]:
    return [DecisionTrace.from_dict(d) for d in json.loads(Path(path).read_text())]
