"""Which modules a profiler looks at, what kind they are, and which stage they belong to.

Module paths are ``root.named_modules()`` names (``slat.flow.blocks.0.self_attn``); the root
itself has the path ``""``. For a :class:`~fs3d_accel.pipeline.Pipeline` the stage of a module is
the first path component (``ss`` / ``slat`` / ``decode``); for any other root it is ``"model"``.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Union

from torch import nn

#: Categories a module can fall in (column ``category``); also accepted as ``modules=`` specs.
CATEGORIES = ("stage", "network", "block", "attention", "mlp", "sparse_conv", "conv", "norm", "embedder",
              "linear", "other")
#: Pipeline stage names, in run order.
PIPELINE_STAGES = ("ss", "slat", "decode")
#: Root name used as the stage of a plain module.
MODEL_STAGE = "model"

ModuleSpec = Union[None, int, str, type, Callable[[str, nn.Module], bool], Iterable]


def is_pipeline(root: nn.Module) -> bool:
    """A root whose children include the pipeline stages (duck-typed: no import of fs3d_accel)."""
    names = {n for n, _ in root.named_children()}
    return all(s in names for s in PIPELINE_STAGES)


def depth(path: str) -> int:
    """0 for the root, 1 for its children, ..."""
    return 0 if path == "" else path.count(".") + 1


def stage_of(path: str, pipeline: bool) -> str:
    if not pipeline:
        return MODEL_STAGE
    head = path.split(".", 1)[0]
    return head if head in PIPELINE_STAGES else "pipeline"


def stage_roots(root: nn.Module) -> dict[str, str]:
    """stage name -> module path whose time/FLOPs define the stage (``""`` for a plain module)."""
    if is_pipeline(root):
        return {s: s for s in PIPELINE_STAGES}
    return {MODEL_STAGE: ""}


def network_paths(root: nn.Module) -> list[str]:
    """The networks of a pipeline (children of the stages: ``ss.flow``, ``decode.decoder`` ...).

    These are the units that run whole "network passes"; for a plain module it is the root.
    """
    if not is_pipeline(root):
        return [""]
    out = []
    for s in PIPELINE_STAGES:
        for name, _ in getattr(root, s).named_children():
            out.append(f"{s}.{name}")
    return out


def category(module: nn.Module, path: str = "", pipeline: bool = False, networks: Iterable[str] = ()) -> str:
    """Coarse kind of a module, by path for stages/networks and by class otherwise."""
    if pipeline and path in PIPELINE_STAGES:
        return "stage"
    if path in set(networks):
        return "network"
    name = type(module).__name__
    low = name.lower()
    if "attention" in low:
        return "attention"
    if "feedforward" in low or "mlp" in low:
        return "mlp"
    if "sparseconv" in low:
        return "sparse_conv"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if "norm" in low:
        return "norm"
    if "embed" in low:
        return "embedder"
    if isinstance(module, nn.Linear):
        return "linear"
    if "block" in low:
        return "block"
    return "other"


#: what ``modules="auto"`` (the default) selects besides stages and networks
AUTO_DEPTH = 4
AUTO_CATEGORIES = ("attention", "mlp", "sparse_conv")


def _matcher(spec, root: nn.Module) -> Callable[[str, nn.Module], bool]:
    pipeline = is_pipeline(root)
    networks = set(network_paths(root))

    def cat(p: str, m: nn.Module) -> str:
        return category(m, p, pipeline, networks)

    if spec is None or spec == "auto":
        return lambda p, m: depth(p) <= AUTO_DEPTH or cat(p, m) in AUTO_CATEGORIES
    if isinstance(spec, bool):
        raise TypeError("modules= must be an int depth, a category, a type, a glob, a callable or a list of those")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"module depth must be >= 0, got {spec}")
        return lambda p, m: depth(p) <= spec
    if isinstance(spec, str):
        if spec == "all":
            return lambda p, m: True
        if spec == "leaves":
            return lambda p, m: next(iter(m.children()), None) is None
        if spec in CATEGORIES:
            return lambda p, m: cat(p, m) == spec
        return lambda p, m: fnmatch.fnmatchcase(p, spec)
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(f"module type {spec.__name__} is not an nn.Module subclass")
        return lambda p, m: isinstance(m, spec)
    if callable(spec):
        return lambda p, m: bool(spec(p, m))
    if isinstance(spec, Iterable):
        parts = [_matcher(s, root) for s in spec]
        if not parts:
            raise ValueError("modules= got an empty list")
        return lambda p, m: any(f(p, m) for f in parts)
    raise TypeError(f"unsupported modules= spec of type {type(spec).__name__}")


def select_modules(root: nn.Module, spec: ModuleSpec = "auto") -> dict[str, nn.Module]:
    """Path -> module for every module the spec selects, plus the stage roots (always kept, so
    shares of a stage can be computed). Containers that are never called (ModuleList, ModuleDict)
    are skipped.

    ``spec``: ``"auto"`` (stages, networks, depth <= 4, and all attention / MLP / sparse conv
    modules), an ``int`` depth, a category from :data:`CATEGORIES`, ``"all"``, ``"leaves"``, an
    ``nn.Module`` subclass, a glob on the path (``"slat.flow.blocks.*"``), a callable
    ``(path, module) -> bool``, or a list of these (union).
    """
    match = _matcher(spec, root)
    keep = set(stage_roots(root).values())
    out: dict[str, nn.Module] = {}
    for path, mod in root.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        if path in keep or match(path, mod):
            out[path] = mod
    return out


def nearest_selected_parent(path: str, selected: Iterable[str]) -> str | None:
    """Closest proper ancestor of ``path`` among ``selected`` (``""`` is the root), or None."""
    sel = set(selected)
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, -1, -1):
        cand = ".".join(parts[:i])
        if cand in sel:
            return cand
    return None


__all__ = ["AUTO_CATEGORIES", "AUTO_DEPTH", "CATEGORIES", "MODEL_STAGE", "PIPELINE_STAGES", "category", "depth",
           "is_pipeline", "nearest_selected_parent", "network_paths", "select_modules", "stage_of", "stage_roots"]
