"""The seams through which accelerators and recorders observe or alter a pipeline run.

Nothing here knows about a particular model. Samplers call a *velocity function* once per step;
a :class:`StepPolicy` wraps that call (it may compute the network, a subset of tokens, or skip the
network and extrapolate). Every step emits a :class:`StepEvent` on an :class:`EventBus`; recorders
subscribe to events and never reach into model internals. Token-level transforms
(:class:`TokenTransform`) sit between stages (after the SS stage, before the mesh decoder).

Latents: the SS stage's latent is a ``dict[str, Tensor]`` (one entry per modality, batch first);
the SLaT stage's latent is a ``Tensor`` of shape ``(N, C)`` (features of the N sparse voxels of one
object).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

Latent = Union[Tensor, dict[str, Tensor]]

#: Decisions a step can report. ``computed``: full network pass; ``carved``: network on a token
#: subset; ``extrapolated``: velocity predicted from history without the network; ``cached``:
#: a previous velocity (or tangent) reused.
DECISIONS = ("computed", "carved", "extrapolated", "cached")


def tree_map(fn: Callable[[Tensor], Tensor], x: Latent) -> Latent:
    """Apply ``fn`` to a tensor or to every tensor of a modality dict (keys kept in order)."""
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return fn(x)


def tree_map2(fn: Callable[[Tensor, Tensor], Tensor], a: Latent, b: Latent) -> Latent:
    """Binary :func:`tree_map` over two latents of the same structure."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            raise ValueError(f"latent structures differ: {list(a)} vs {type(b).__name__}")
        return {k: fn(a[k], b[k]) for k in a}
    return fn(a, b)


@dataclass
class StepRecord:
    """What happened at one past step (kept in :attr:`StepContext.history`)."""

    step: int
    t: float
    x: Latent
    v: Latent
    decision: str


@dataclass
class StepContext:
    """Everything a policy may look at when deciding how to produce the velocity of one step.

    ``state`` is a scratch dict private to the policy for the current stage run (it is created
    fresh for every sampler run, so no state leaks between objects). ``extras`` carries
    stage-specific read-only inputs (for SLaT: ``coords`` (N,4) int and ``occupancy`` (R,R,R) bool).
    """

    stage: str
    step: int
    num_steps: int
    t: float
    t_next: float
    x: Latent
    history: list[StepRecord]
    extras: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    #: set by the policy (or by ``compute``) to one of :data:`DECISIONS`
    decision: str | None = None
    #: fraction of tokens that went through the network at this step (1.0 for a full pass)
    active_fraction: float = 0.0
    #: free-form per-step information a policy wants recorders to see (e.g. saliency maps)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dt(self) -> float:
        return self.t_next - self.t


#: ``compute(active=None)`` runs the network at the current step. With ``active`` (a LongTensor of
#: token indices, SLaT only) it runs the network on that subset and returns velocities for those
#: rows only, shape ``(len(active), C)``.
ComputeFn = Callable[..., Latent]


@runtime_checkable
class StepPolicy(Protocol):
    """Wraps the velocity call of a sampler step. Must return a latent shaped like ``ctx.x``."""

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent: ...


class IdentityPolicy:
    """Always runs the full network: the plain pipeline."""

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        return compute()

    def __repr__(self) -> str:
        return "IdentityPolicy()"


@dataclass
class StepEvent:
    """Emitted after every sampler step (also when the policy skipped the network)."""

    stage: str
    step: int
    num_steps: int
    t: float
    x: Latent
    v: Latent
    decision: str
    active_fraction: float
    info: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageEvent:
    """Emitted when a stage starts (``phase='start'``) or ends (``phase='end'``)."""

    stage: str
    phase: str
    payload: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[Any], None]


class EventBus:
    """Minimal publish/subscribe for :class:`StepEvent` and :class:`StageEvent`.

    ``subscribe`` returns a handle whose ``remove()`` detaches the listener; ``listening`` is a
    context manager that always detaches, also when the body raises.
    """

    def __init__(self) -> None:
        self._listeners: dict[int, Listener] = {}
        self._next = 0

    def subscribe(self, listener: Listener) -> "Subscription":
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        key = self._next
        self._next += 1
        self._listeners[key] = listener
        return Subscription(self, key)

    def _remove(self, key: int) -> None:
        self._listeners.pop(key, None)

    @contextlib.contextmanager
    def listening(self, *listeners: Listener) -> Iterator[None]:
        subs = [self.subscribe(fn) for fn in listeners]
        try:
            yield
        finally:
            for s in subs:
                s.remove()

    def emit(self, event: Any) -> None:
        for fn in list(self._listeners.values()):
            fn(event)

    def __len__(self) -> int:
        return len(self._listeners)


@dataclass
class Subscription:
    bus: EventBus
    key: int

    def remove(self) -> None:
        self.bus._remove(self.key)


# ---------------------------------------------------------------------------------------------
# Token transforms (between stages)
# ---------------------------------------------------------------------------------------------


@dataclass
class SparseTokens:
    """Sparse voxels of one object: ``coords`` (N,4) int32 [batch, x, y, z] at ``resolution``^3,
    optional ``feats`` (N,C) and optional per-voxel ``scores`` (N,)."""

    coords: Tensor
    resolution: int
    feats: Tensor | None = None
    scores: Tensor | None = None

    def __post_init__(self) -> None:
        if self.coords.ndim != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be (N,4) [batch,x,y,z], got {tuple(self.coords.shape)}")
        if self.feats is not None and self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"feats rows {self.feats.shape[0]} != coords rows {self.coords.shape[0]}")

    def __len__(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class TransformContext:
    """Per-object inputs a token transform may use to decide (e.g. HFER of mask and voxels)."""

    mask: Tensor | None = None            # (H,W) bool, the object mask as given
    occupancy_logits: Tensor | None = None  # (R,R,R) SS decoder output
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransformState:
    """What a transform returns so that its effect can be undone (e.g. the factor S)."""

    scale: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TokenTransform(Protocol):
    """Reduces the sparse tokens of one object and knows how to map results back.

    ``reduce`` returns the new tokens and a state; ``restore_vertices`` maps mesh vertices decoded
    from the reduced tokens (in the normalised object cube) back to the original frame.
    """

    def reduce(self, tokens: SparseTokens, ctx: TransformContext) -> tuple[SparseTokens, TransformState]: ...

    def restore_vertices(self, vertices: Tensor, state: TransformState) -> Tensor: ...


class IdentityTransform:
    """Leaves the tokens as they are."""

    def reduce(self, tokens: SparseTokens, ctx: TransformContext) -> tuple[SparseTokens, TransformState]:
        return tokens, TransformState()

    def restore_vertices(self, vertices: Tensor, state: TransformState) -> Tensor:
        return vertices

    def __repr__(self) -> str:
        return "IdentityTransform()"


@dataclass
class Accelerator:
    """A bundle of seam plug-ins. Any field left ``None`` means "plain pipeline" for that seam.

    ``coords_transform`` runs after the SS stage on the sparse structure (before the SLaT stage,
    where the released Fast-SAM3D code aggregates); ``decoder_transform`` runs on the structured
    latent right before the mesh decoder (where the paper describes aggregation).
    """

    ss_policy: StepPolicy | None = None
    slat_policy: StepPolicy | None = None
    coords_transform: TokenTransform | None = None
    decoder_transform: TokenTransform | None = None
    name: str = "custom"

    def describe(self) -> dict[str, str]:
        return {k: repr(getattr(self, k)) for k in
                ("ss_policy", "slat_policy", "coords_transform", "decoder_transform")}


__all__ = [
    "Accelerator", "ComputeFn", "DECISIONS", "EventBus", "IdentityPolicy", "IdentityTransform",
    "Latent", "SparseTokens", "StageEvent", "StepContext", "StepEvent", "StepPolicy", "StepRecord",
    "Subscription", "TokenTransform", "TransformContext", "TransformState", "tree_map", "tree_map2",
]
