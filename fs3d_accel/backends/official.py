"""The project's seams on the official SAM 3D Objects code (package ``sam3d_objects``), imported,
never vendored.

What it gives: every sampler step of the official generators goes through a
:class:`~fs3d_accel.seams.StepPolicy` and emits a :class:`~fs3d_accel.seams.StepEvent`; stage
boundaries emit :class:`~fs3d_accel.seams.StageEvent`; forward pre/post hooks attach to named
submodules. All patches are instance attributes that are removed on exit, also when the run raises.

Official names this module relies on (facebookresearch/sam-3d-objects @ cf06676, Nov 2025):

- ``sam3d_objects.model.backbone.generator.flow_matching.model.FlowMatching`` (SLaT generator) and its
  subclass ``...generator.shortcut.model.ShortCut`` (SS generator) keep their ODE solver in the
  instance attribute ``_solver`` (name in ``_solver_method``, ``"euler"`` in the HF configs).
  ``generate_iter`` calls ``self._solver.solve_iter(self._generate_dynamics, x0, t_seq, *args, **kw)``;
  ShortCut puts its step size ``d`` first in ``args``.
- ``...flow_matching.solver.ODESolver.solve_iter(dynamics_fn, x_init, times, *args, **kw)`` calls
  ``self.step(dynamics_fn, x_t, t0, dt, *args, **kw)`` once per pair of consecutive times, and
  ``Euler.step`` evaluates ``dynamics_fn(x_t, t, *args, **kw)`` exactly once (velocity = the
  classifier-free-guided output of ``reverse_fn``, a ``ClassifierFreeGuidance`` module), then
  returns ``x_t + v * dt`` per tensor. We patch ``solve_iter`` (to learn the time grid) and ``step``
  (to let the policy produce the velocity) on the solver *instance*; the update arithmetic stays
  the official ``Euler.step``.
- ``sam3d_objects.pipeline.inference_pipeline.InferencePipeline``: ``models`` (``nn.ModuleDict`` with
  ``ss_generator``, ``slat_generator``, ``ss_decoder``, ``slat_decoder_mesh``, ``slat_decoder_gs``,
  ``slat_decoder_gs_4``, ``ss_encoder``), ``condition_embedders`` (dict with
  ``ss_condition_embedder``, ``slat_condition_embedder``), the stage methods
  ``sample_sparse_structure``, ``sample_slat``, ``decode_slat``; ``sample_slat`` passes the voxel
  coordinates as the last positional conditional argument (numpy ``(N, 4)``).
- ``sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap`` (the class named by
  the HF ``pipeline.yaml``) and its ``run(image, mask, seed, ...)``.

Latents as policies see them: SS = the official dict of ``(B, L, C)`` tensors (keys in the order the
official code builds them); SLaT = ``(N, 8)`` (the official ``(1, N, 8)`` without its batch axis).
Not supported here: token subsets (``compute(active=...)`` raises ``NotImplementedError``) and token
transforms (an :class:`~fs3d_accel.seams.Accelerator` with ``coords_transform`` or
``decoder_transform`` is refused).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..seams import (DECISIONS, Accelerator, EventBus, IdentityPolicy, Latent, StageEvent, StepContext,
                     StepEvent, StepPolicy, StepRecord)

PACKAGE = "sam3d_objects"
INSTALL_HINT = (
    "the official SAM 3D Objects package `sam3d_objects` is not importable. Install it from "
    "https://github.com/facebookresearch/sam-3d-objects (e.g. `pip install -e .` in a checkout, with "
    "its requirements: hydra-core, omegaconf, optree, loguru, timm==0.9.16, spconv, ...) and download "
    "the gated checkpoints (Hugging Face `facebook/sam-3d-objects`) into checkpoints/hf/"
)
STAGE_GENERATORS = {"ss": "ss_generator", "slat": "slat_generator"}
#: pipeline methods that bound each stage (for StageEvents and timing)
STAGE_METHODS = {"ss": "sample_sparse_structure", "slat": "sample_slat", "decode": "decode_slat"}


def is_available() -> bool:
    """Whether ``sam3d_objects`` can be imported (without importing it)."""
    return importlib.util.find_spec(PACKAGE) is not None


def require_official() -> None:
    """Raise a clear ImportError when the official package is missing.

    Also sets ``LIDRA_SKIP_INIT`` (as the official notebook wrapper does): ``sam3d_objects/__init__``
    otherwise imports ``sam3d_objects.init``, which the public repository does not ship.
    """
    if not is_available():
        raise ImportError(INSTALL_HINT)
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")


# ---------------------------------------------------------------------------------------------
# Step seam on one official generator
# ---------------------------------------------------------------------------------------------


def _slat_extras(args: tuple) -> dict[str, Any]:
    """Voxel coordinates from the SLaT generator's conditional args (last array-like (N, 4))."""
    for a in reversed(args):
        shape = getattr(a, "shape", None)
        if shape is not None and len(shape) == 2 and shape[1] == 4:
            return {"coords": torch.as_tensor(a)}
    return {}


def _check_velocity(v: Latent, x: Latent, stage: str, step: int) -> None:
    if isinstance(x, dict):
        if not isinstance(v, dict) or list(v) != list(x):
            got = list(v) if isinstance(v, dict) else type(v).__name__
            raise ValueError(f"{stage} step {step}: policy returned {got}, expected keys {list(x)}")
        for k in x:
            if v[k].shape != x[k].shape:
                raise ValueError(f"{stage} step {step}: velocity[{k!r}] shape {tuple(v[k].shape)} "
                                 f"!= latent shape {tuple(x[k].shape)}")
    elif not isinstance(v, Tensor) or v.shape != x.shape:
        raise ValueError(f"{stage} step {step}: velocity shape {tuple(getattr(v, 'shape', ()))} "
                         f"!= latent shape {tuple(x.shape)}")


class _Run:
    """Per-sampler-run state (fresh for every ``solve_iter`` call, so nothing leaks between objects)."""

    def __init__(self, times: list[float], extras: dict[str, Any]) -> None:
        self.times = times
        self.num_steps = len(times) - 1
        self.step = 0
        self.history: list[StepRecord] = []
        self.state: dict[str, Any] = {}
        self.extras = extras


class StepPatch:
    """Routes the velocity of every step of one official generator through a :class:`StepPolicy`.

    ``generator`` is an official ``FlowMatching``/``ShortCut`` instance (anything with a ``_solver``
    that has ``solve_iter`` and ``step`` as described in the module docstring). Use as a context
    manager; on exit the solver's own methods are back, also after an exception.
    """

    def __init__(self, generator: Any, stage: str, policy: StepPolicy | None = None,
                 events: EventBus | None = None,
                 extras_fn: Callable[[tuple], dict[str, Any]] | None = None,
                 extras: Mapping[str, Any] | None = None) -> None:
        if stage not in STAGE_GENERATORS:
            raise ValueError(f"stage must be one of {sorted(STAGE_GENERATORS)}, got {stage!r}")
        solver = getattr(generator, "_solver", None)
        if solver is None or not callable(getattr(solver, "step", None)) \
                or not callable(getattr(solver, "solve_iter", None)):
            raise TypeError(f"{type(generator).__name__} has no `_solver` with step/solve_iter; "
                            "expected an official FlowMatching/ShortCut generator")
        method = getattr(generator, "_solver_method", "euler")
        if method != "euler":
            raise ValueError(f"step policies need one velocity per step (euler solver); the {stage} "
                             f"generator uses {method!r}")
        policy = policy if policy is not None else IdentityPolicy()
        if not callable(getattr(policy, "velocity", None)):
            raise TypeError(f"policy must have velocity(ctx, compute), got {type(policy).__name__}")
        self.generator, self.stage, self.policy, self.events = generator, stage, policy, events
        self.extras_fn = extras_fn if extras_fn is not None else (_slat_extras if stage == "slat" else None)
        self.extras = dict(extras or {})
        self._solver = solver
        self._saved: dict[str, Any] | None = None
        self._run: _Run | None = None

    # -- latent views -------------------------------------------------------------------------
    def _to_policy(self, x: Latent) -> Latent:
        if self.stage == "slat" and isinstance(x, Tensor):
            if x.ndim != 3 or x.shape[0] != 1:
                raise ValueError(f"slat latent must be (1, N, C), got {tuple(x.shape)}")
            return x[0]
        return x

    def _from_policy(self, v: Latent) -> Latent:
        if self.stage == "slat" and isinstance(v, Tensor):
            return v[None]
        return v

    # -- patched solver methods ---------------------------------------------------------------
    def _solve_iter(self, dynamics_fn, x_init, times, *args, **kwargs):
        extras = dict(self.extras)
        if self.extras_fn is not None:
            extras.update(self.extras_fn(args))
        self._run = _Run([float(t) for t in times], extras)
        try:
            yield from self._saved["solve_iter"](dynamics_fn, x_init, times, *args, **kwargs)
        finally:
            self._run = None

    def _step(self, dynamics_fn, x_t, t, dt, *args, **kwargs):
        run = self._run
        if run is None:
            raise RuntimeError(f"{self.stage}: solver.step called outside solve_iter")
        k = run.step
        x_view = self._to_policy(x_t)
        ctx = StepContext(stage=self.stage, step=k, num_steps=run.num_steps, t=float(t),
                          t_next=float(t + dt), x=x_view, history=run.history, extras=run.extras,
                          state=run.state)

        def compute(active: Tensor | None = None) -> Latent:
            if active is not None:
                raise NotImplementedError("the official backend has no token-subset forward; "
                                          "compute(active=...) works only on the reference model")
            ctx.decision = "computed"
            ctx.active_fraction = 1.0
            return self._to_policy(dynamics_fn(x_t, t, *args, **kwargs))

        calls: list[Latent] = []

        def policy_dynamics(x, tt, *a, **kw):
            if calls:
                raise RuntimeError(f"{self.stage}: the solver evaluated the velocity twice in one step")
            v = self.policy.velocity(ctx, compute)
            _check_velocity(v, x_view, self.stage, k)
            calls.append(v)
            return self._from_policy(v)

        x_next = self._saved["step"](policy_dynamics, x_t, t, dt, *args, **kwargs)
        v = calls[0]
        decision = ctx.decision or "cached"
        if decision not in DECISIONS:
            raise ValueError(f"policy set unknown decision {decision!r}; expected one of {DECISIONS}")
        if self.events is not None and len(self.events):
            self.events.emit(StepEvent(stage=self.stage, step=k, num_steps=run.num_steps, t=ctx.t,
                                       x=x_view, v=v, decision=decision,
                                       active_fraction=ctx.active_fraction, info=ctx.info,
                                       extras=run.extras))
        run.history.append(StepRecord(step=k, t=ctx.t, x=x_view, v=v, decision=decision))
        run.step += 1
        return x_next

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> "StepPatch":
        if self._saved is not None:
            raise RuntimeError("StepPatch is already active")
        d = vars(self._solver)
        if getattr(self._solver, "_fs3d_patched", False):
            raise RuntimeError(f"the {self.stage} generator's solver is already patched")
        self._saved = {
            "solve_iter": self._solver.solve_iter, "step": self._solver.step,
            "own": {n: d[n] for n in ("solve_iter", "step") if n in d},
        }
        self._solver.solve_iter = self._solve_iter
        self._solver.step = self._step
        self._solver._fs3d_patched = True
        return self

    def __exit__(self, *exc) -> None:
        saved, self._saved = self._saved, None
        for name in ("solve_iter", "step"):
            if name in saved["own"]:
                setattr(self._solver, name, saved["own"][name])
            else:
                delattr(self._solver, name)
        del self._solver._fs3d_patched
        self._run = None


# ---------------------------------------------------------------------------------------------
# Forward hooks on named submodules
# ---------------------------------------------------------------------------------------------

PreHook = Callable[[str, nn.Module, tuple], None]
PostHook = Callable[[str, nn.Module, tuple, Any], None]


@contextlib.contextmanager
def module_hooks(roots: Mapping[str, nn.Module], names: Iterable[str] | Callable[[str], bool],
                 pre: PreHook | None = None, post: PostHook | None = None) -> Iterator[list[str]]:
    """Forward pre/post hooks on submodules named ``<root>.<named_modules name>``.

    ``names`` is a list of such names (each must exist) or a predicate over all names. Yields the
    hooked names; every hook is removed on exit, also when the body raises.
    """
    if pre is None and post is None:
        raise ValueError("give at least one of pre= or post=")
    table = {f"{root}.{n}" if n else root: m
             for root, mod in roots.items() if mod is not None for n, m in mod.named_modules()}
    if callable(names):
        chosen = [n for n in table if names(n)]
    else:
        chosen = list(names)
        missing = [n for n in chosen if n not in table]
        if missing:
            raise KeyError(f"no submodule named {missing[:5]}; names look like {list(table)[:3]}")
    handles = []
    try:
        for n in chosen:
            m = table[n]
            if pre is not None:
                handles.append(m.register_forward_pre_hook(lambda mod, args, _n=n: pre(_n, mod, args)))
            if post is not None:
                handles.append(m.register_forward_hook(lambda mod, args, out, _n=n: post(_n, mod, args, out)))
        yield chosen
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# The pipeline adapter
# ---------------------------------------------------------------------------------------------


class OfficialPipeline:
    """The official ``InferencePipelinePointMap`` with the project's seams.

        pipe = OfficialPipeline.from_config("checkpoints/hf/pipeline.yaml")
        with pipe.events.listening(recorder):
            out = pipe.run(image, mask, seed=0, accel=my_accel)   # official output dict

    ``pipeline`` may be any already built official pipeline object.
    """

    def __init__(self, pipeline: Any, events: EventBus | None = None) -> None:
        require_official()
        for attr in ("models", "run"):
            if not hasattr(pipeline, attr):
                raise TypeError(f"expected an official InferencePipeline, got {type(pipeline).__name__} "
                                f"without `{attr}`")
        self.pipeline = pipeline
        self.events = events if events is not None else EventBus()

    @classmethod
    def from_config(cls, config_file: str | os.PathLike, compile: bool = False,
                    events: EventBus | None = None) -> "OfficialPipeline":
        """Build the pipeline from the HF ``pipeline.yaml`` the way the official notebook wrapper
        does (paths relative to the yaml's folder, pytorch3d renderer, ``compile_model`` = compile)."""
        require_official()
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        config_file = os.fspath(config_file)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"pipeline config not found: {config_file}")
        config = OmegaConf.load(config_file)
        config.rendering_engine = "pytorch3d"
        config.compile_model = compile
        config.workspace_dir = os.path.dirname(os.path.abspath(config_file))
        return cls(instantiate(config), events)

    # -- modules --------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Root modules by name: the pipeline's ``models`` entries and its condition embedders."""
        roots = {k: m for k, m in self.pipeline.models.items() if m is not None}
        for k, m in getattr(self.pipeline, "condition_embedders", {}).items():
            if isinstance(m, nn.Module):
                roots[k] = m
        return roots

    def generator(self, stage: str) -> Any:
        if stage not in STAGE_GENERATORS:
            raise ValueError(f"stage must be one of {sorted(STAGE_GENERATORS)}, got {stage!r}")
        return self.pipeline.models[STAGE_GENERATORS[stage]]

    def hooks(self, names: Iterable[str] | Callable[[str], bool], pre: PreHook | None = None,
              post: PostHook | None = None):
        """:func:`module_hooks` over :meth:`modules` (names like ``ss_generator.reverse_fn.backbone.blocks.0``)."""
        return module_hooks(self.modules(), names, pre, post)

    # -- seams ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accelerated(self, accel: Accelerator | None = None) -> Iterator[None]:
        """Install the accelerator's step policies and stage events for the body; always undone."""
        accel = accel or Accelerator(name="base")
        unsupported = [n for n in ("coords_transform", "decoder_transform") if getattr(accel, n) is not None]
        if unsupported:
            raise NotImplementedError(f"the official backend does not support {unsupported} yet")
        with contextlib.ExitStack() as stack:
            for stage in STAGE_GENERATORS:
                policy = accel.ss_policy if stage == "ss" else accel.slat_policy
                stack.enter_context(StepPatch(self.generator(stage), stage, policy, self.events))
            stack.enter_context(self._stage_events())
            yield

    @contextlib.contextmanager
    def _stage_events(self) -> Iterator[None]:
        pipe = self.pipeline
        patched = []

        def wrap(stage: str, fn: Callable) -> Callable:
            def timed(*args, **kwargs):
                self.events.emit(StageEvent(stage, "start", {"backend": "official"}))
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.events.emit(StageEvent(stage, "end", {"output": out, "backend": "official",
                                                           "seconds": time.perf_counter() - t0}))
                return out
            return timed

        try:
            for stage, meth in STAGE_METHODS.items():
                if meth in vars(pipe):
                    raise RuntimeError(f"pipeline.{meth} is already patched on this instance")
                setattr(pipe, meth, wrap(stage, getattr(pipe, meth)))
                patched.append(meth)
            yield
        finally:
            for meth in patched:
                delattr(pipe, meth)

    def run(self, image, mask=None, seed: int | None = 0, accel: Accelerator | None = None,
            **run_kwargs) -> dict:
        """``InferencePipelinePointMap.run`` under :meth:`accelerated`. Defaults match the
        official notebook wrapper (no mesh post-processing or texture baking, vertex colours)."""
        kwargs = dict(stage1_only=False, with_mesh_postprocess=False, with_texture_baking=False,
                      with_layout_postprocess=True, use_vertex_color=True)
        kwargs.update(run_kwargs)
        with self.accelerated(accel):
            return self.pipeline.run(image, mask, seed, **kwargs)


__all__ = ["INSTALL_HINT", "OfficialPipeline", "StepPatch", "is_available", "module_hooks",
           "require_official"]
