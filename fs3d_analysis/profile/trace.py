"""torch.profiler traces with one labelled range per stage, sampler step and network pass.

Ranges come from forward hooks on the stage and network modules and from the pipeline's
``StepEvent`` stream (``pipe.events``); no model code is touched. The trace is written by
``torch.profiler.tensorboard_trace_handler`` as
``out_dir/plugins/profile/<run>/<worker>.<timestamp>.pt.trace.json``: a Chrome-trace JSON that opens
in Perfetto (ui.perfetto.dev), chrome://tracing, Holistic Trace Analysis, and TensorBoard with the
torch-tb-profiler plugin (``tensorboard --logdir out_dir``).

Range names: ``stage:<stage>``, ``<stage>/step <k>`` (``<stage>/step <k> [<decision>]`` when the
policy skipped the network), ``net:<module path>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function

from .latency import _device_of, sync_device
from .modules import is_pipeline, network_paths, stage_roots
from .workload import make_runner


class _Ranges:
    """Opens/closes record_function ranges from hooks and step events."""

    def __init__(self, root: nn.Module, sampler_nets: set[str]) -> None:
        self.root = root
        self.pipeline = is_pipeline(root)
        self.stages = {p: s for s, p in stage_roots(root).items()}
        self.nets = [n for n in network_paths(root) if n not in self.stages]
        self.sampler_nets = sampler_nets
        self.open_step: dict[str, Any] = {}
        self.step_index: dict[str, int] = {}
        self.open: dict[str, list[Any]] = {}
        self.handles: list[Any] = []
        self.subscription = None
        #: networks called since the last step event, per stage (to learn the sampler networks)
        self.seen_since_step: dict[str, set[str]] = {}
        self.learned: set[str] = set()

    def _enter(self, key: str, name: str) -> None:
        rf = record_function(name)
        rf.__enter__()
        self.open.setdefault(key, []).append(rf)

    def _exit(self, key: str) -> None:
        stack = self.open.get(key)
        if stack:
            stack.pop().__exit__(None, None, None)

    def _stage_of_net(self, path: str) -> str:
        return path.split(".", 1)[0] if self.pipeline else "model"

    def attach(self) -> None:
        mods = dict(self.root.named_modules())
        for path, stage in self.stages.items():
            m = mods[path]
            self.handles.append(m.register_forward_pre_hook(self._stage_pre(stage)))
            self.handles.append(m.register_forward_hook(self._stage_post(stage), always_call=True))
        for path in self.nets:
            m = mods[path]
            self.handles.append(m.register_forward_pre_hook(self._net_pre(path)))
            self.handles.append(m.register_forward_hook(self._net_post(path), always_call=True))
        events = getattr(self.root, "events", None)
        if events is not None and hasattr(events, "subscribe"):
            self.subscription = events.subscribe(self._on_event)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.subscription is not None:
            self.subscription.remove()
            self.subscription = None
        for key in list(self.open):
            while self.open[key]:
                self._exit(key)

    def _stage_pre(self, stage: str):
        def hook(mod, args):
            self.step_index[stage] = 0
            self.seen_since_step[stage] = set()
            self._enter(f"stage:{stage}", f"stage:{stage}")
        return hook

    def _stage_post(self, stage: str):
        def hook(mod, args, out):
            if self.open_step.pop(stage, None):
                self._exit(f"step:{stage}")
            self._exit(f"stage:{stage}")
        return hook

    def _net_pre(self, path: str):
        def hook(mod, args):
            stage = self._stage_of_net(path)
            self.seen_since_step.setdefault(stage, set()).add(path)
            if path in self.sampler_nets and not self.open_step.get(stage):
                k = self.step_index.get(stage, 0)
                self._enter(f"step:{stage}", f"{stage}/step {k}")
                self.open_step[stage] = True
            self._enter(f"net:{path}", f"net:{path}")
        return hook

    def _net_post(self, path: str):
        def hook(mod, args, out):
            self._exit(f"net:{path}")
        return hook

    def _on_event(self, ev: Any) -> None:
        if type(ev).__name__ != "StepEvent":
            return
        stage = ev.stage
        k = self.step_index.get(stage, 0)
        if k >= 1:  # the first window also holds the condition networks
            self.learned |= self.seen_since_step.get(stage, set())
        self.seen_since_step[stage] = set()
        if self.open_step.pop(stage, None):
            self._exit(f"step:{stage}")
        else:  # the policy produced this step without a network pass
            with record_function(f"{stage}/step {k} [{ev.decision}]"):
                pass
        self.step_index[stage] = k + 1


def trace(pipe: nn.Module, inputs: Any, out_dir: str | Path, run_name: str = "fs3d", worker: str = "worker0",
          warmup: int = 1, record_shapes: bool = False, profile_memory: bool = False,
          with_stack: bool = False) -> Path:
    """Profile one run with torch.profiler and write a TensorBoard-layout Chrome trace.

    Returns the path of the written ``*.pt.trace.json``. ``warmup`` runs happen before profiling
    (they also teach which networks the samplers call, so step ranges wrap them). Hooks and the
    event subscription are removed also when the run raises.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not run_name or "/" in run_name:
        raise ValueError(f"run_name must be a non-empty name without '/', got {run_name!r}")
    run = make_runner(pipe, inputs)
    device = _device_of(pipe)
    run_dir = Path(out_dir) / "plugins" / "profile" / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    before = set(run_dir.glob(f"{worker}*.pt.trace.json"))

    sampler_nets = {n for n in network_paths(pipe) if n.endswith(".flow")}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    with torch.no_grad():
        if warmup:
            learner = _Ranges(pipe, sampler_nets)
            learner.attach()
            try:
                for _ in range(warmup):
                    run()
            finally:
                learner.detach()
            sampler_nets |= learner.learned
        ranges = _Ranges(pipe, sampler_nets)
        ranges.attach()
        try:
            with torch.profiler.profile(
                    activities=activities, record_shapes=record_shapes, profile_memory=profile_memory,
                    with_stack=with_stack,
                    on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir), worker_name=worker)):
                run()
                sync_device(device)
        finally:
            ranges.detach()
    written = sorted(set(run_dir.glob(f"{worker}*.pt.trace.json")) - before)
    if not written:
        raise RuntimeError(f"torch.profiler wrote no trace into {run_dir}")
    return written[-1]


__all__ = ["trace"]
