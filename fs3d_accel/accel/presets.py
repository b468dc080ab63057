"""Calibrated accelerator settings saved as JSON presets, and loading them back.

A preset records what :func:`fs3d_analysis.calibrate.calibrate` chose: the method, the searched
hyperparameters (k, beta, keep, E, w, tau_low, tau_high), the dataset and quality constraint it was
chosen under, and the numbers measured there::

    acc = from_preset("runs/calibrate/preset.json")      # == FastSAM3D.from_preset(...)
    pipe.with_accel(acc)

The short hyperparameter names map to :func:`~fs3d_accel.accel.make_method` overrides
(:data:`HYPERPARAMETERS`); ``overrides`` holds any further fixed ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..seams import Accelerator

FORMAT = "fs3d-accel-preset"
VERSION = 1

#: short name -> make_method override of the Fast-SAM3D methods
HYPERPARAMETERS: dict[str, str] = {
    "k": "ss__k",
    "beta": "ss__beta",
    "keep": "carving__keep",
    "E": "step_cache__threshold",
    "w": "mesh__w",
    "tau_low": "mesh__tau_low",
    "tau_high": "mesh__tau_high",
}


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars -> Python, tuples -> lists); NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Preset:
    """One calibrated setting. ``hyperparameters`` uses the short names of :data:`HYPERPARAMETERS`."""

    hyperparameters: dict[str, Any]
    method: str = "fast-sam3d"
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    constraint: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.hyperparameters, Mapping):
            raise TypeError(f"hyperparameters must be a mapping, got {type(self.hyperparameters).__name__}")
        unknown = sorted(set(self.hyperparameters) - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"unknown hyperparameters {unknown}; known: {sorted(HYPERPARAMETERS)}")
        clash = sorted(HYPERPARAMETERS[h] for h in self.hyperparameters if HYPERPARAMETERS[h] in self.overrides)
        if clash:
            raise ValueError(f"{clash} given both as hyperparameters and as overrides")

    def make_kwargs(self) -> dict[str, Any]:
        """The ``make_method`` overrides this preset stands for."""
        kw = {HYPERPARAMETERS[h]: v for h, v in self.hyperparameters.items()}
        kw.update(self.overrides)
        return kw

    def build(self) -> Accelerator:
        from . import make_method
        return make_method(self.method, **self.make_kwargs())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **_plain(asdict(self))}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preset":
        if data.get("format") != FORMAT:
            raise ValueError(f"not an accelerator preset: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"preset version {data.get('version')!r} is not supported (this code reads {VERSION})")
        if "hyperparameters" not in data:
            raise ValueError("preset lacks 'hyperparameters'")
        kw = {k: data[k] for k in ("hyperparameters", "method", "overrides", "dataset", "constraint", "measured",
                                   "model", "notes") if k in data}
        return cls(**kw)


def load_preset(path: str | Path) -> Preset:
    """Read a preset JSON file (clear errors for a missing file or another format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no preset file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset is a JSON object, got {type(data).__name__}")
    return Preset.from_dict(data)


def save_preset(path: str | Path, hyperparameters: Mapping[str, Any], **kw: Any) -> Path:
    """Write a preset (see :class:`Preset` for the keyword fields); returns the path."""
    return Preset(hyperparameters=dict(hyperparameters), **kw).save(path)


def from_preset(preset: str | Path | Preset | Mapping[str, Any]) -> Accelerator:
    """The :class:`~fs3d_accel.seams.Accelerator` a preset (file path, shipped preset name, dict or
    :class:`Preset`) describes."""
    if isinstance(preset, Preset):
        return preset.build()
    if isinstance(preset, Mapping):
        return Preset.from_dict(preset).build()
    return load_preset(resolve_preset_path(preset)).build()


#: prefix of a method name that names a preset file instead of a registered method
PRESET_PREFIX = "preset:"
#: presets that ship with the package, by name (``preset:sam3d-mini-ycb``)
SHIPPED_PRESETS = Path(__file__).parent / "shipped_presets"


def shipped_presets() -> list[str]:
    """Names of the presets shipped with the package (``sam3d-mini-ycb``: calibrated on the 8 shipped
    YCB samples with sam3d-mini, F1 drop <= 0.5 and vIoU drop <= 0.01; see its ``notes``)."""
    return sorted(p.stem for p in SHIPPED_PRESETS.glob("*.json"))


def resolve_preset_path(spec: str | Path) -> Path:
    """A preset file path, or the name of a shipped preset (an existing file wins)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = SHIPPED_PRESETS / f"{spec}.json"
    if isinstance(spec, str) and "/" not in spec and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no preset file at {path} and no shipped preset named {str(spec)!r} "
                            f"(shipped: {shipped_presets()})")


def method_factory(spec: str) -> Callable[[], Accelerator]:
    """A factory of fresh accelerators for a method name as the command line takes it: a registered
    method (``fast-sam3d``, ``taylorseer``, ...) or ``preset:PATH`` (a calibrated preset file, or the
    name of a shipped preset such as ``preset:sam3d-mini-ycb``). The
    name or file is checked here, before any model runs; each call of the factory builds a new
    accelerator (policies keep per-object state). Preset accelerators are named by the spec as given
    (``preset:sam3d-mini-ycb``), so tables say which preset ran."""
    from . import make_method
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method name must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith(PRESET_PREFIX):
        path = spec[len(PRESET_PREFIX):]
        if not path:
            raise ValueError(f"{spec!r}: give the preset file after '{PRESET_PREFIX}'")
        preset = load_preset(resolve_preset_path(path))
        preset.build()  # bad hyperparameters fail now

        def build() -> Accelerator:
            acc = preset.build()
            acc.name = spec
            return acc
        return build
    make_method(spec)  # an unknown name fails here
    return lambda: make_method(spec)


__all__ = ["FORMAT", "HYPERPARAMETERS", "PRESET_PREFIX", "Preset", "SHIPPED_PRESETS", "VERSION", "from_preset",
           "load_preset", "method_factory", "resolve_preset_path", "save_preset", "shipped_presets"]
