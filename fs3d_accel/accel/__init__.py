"""Training-free accelerators (Fast-SAM3D and the baselines it is compared with).

    acc = FastSAM3D()                                   # paper settings
    acc = make_method("fast-sam3d-released")            # what the released code runs
    acc = make_method("fast-sam3d", ss__k=4, mesh=None) # component overrides / switches
    pipe.with_accel(acc)

Every method is an :class:`~fs3d_accel.seams.Accelerator`; its step policies keep per-run state in
``StepContext.state`` only, so one instance can serve many objects.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..seams import Accelerator
from .baselines import EasyCache, Fast3DCache, RandomTokenDrop, TaylorSeer, UniformTokenMerge
from .mesh_aggregation import SpectralTokenAggregation
from .shadow import ShadowPolicy
from .slat_carving import SLaTTokenCarving
from .slat_step_cache import SLaTPolicy, SLaTStepCache
from .spectral import HFERConfig, hfer, hfer_2d, hfer_3d, voxel_highfreq_scores
from .ss_cache import SSModalityCache

_DEFAULT: Any = object()


def _place(acc_kw: dict[str, Any], transform: Any) -> None:
    """Put a token transform in the slot its placement names."""
    if transform is None:
        return
    placement = getattr(transform, "placement", "pre_decoder")
    acc_kw["coords_transform" if placement == "pre_slat" else "decoder_transform"] = transform


def FastSAM3D(ss: SSModalityCache | None = _DEFAULT, slat: Any = _DEFAULT,
              mesh: Any = _DEFAULT, name: str = "fast-sam3d") -> Accelerator:
    """The three Fast-SAM3D modules as one :class:`Accelerator`; pass ``None`` to switch one off.

    Defaults (paper): ``SSModalityCache(k=3, beta=0.7, warmup=2)``,
    ``SLaTPolicy(SLaTTokenCarving(keep=0.1), SLaTStepCache(threshold=1.5, warmup=3))``,
    ``SpectralTokenAggregation()`` before the mesh decoder. A mesh transform with
    ``placement="pre_slat"`` goes to the ``coords_transform`` slot, otherwise ``decoder_transform``.
    """
    if ss is _DEFAULT:
        ss = SSModalityCache()
    if slat is _DEFAULT:
        slat = SLaTPolicy(SLaTTokenCarving(), SLaTStepCache())
    if mesh is _DEFAULT:
        mesh = SpectralTokenAggregation()
    kw: dict[str, Any] = dict(ss_policy=ss, slat_policy=slat, name=name)
    _place(kw, mesh)
    return Accelerator(**kw)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

#: component -> (class, default kwargs) for the two Fast-SAM3D variants
_FS3D_PARTS: dict[str, dict[str, tuple[type, Callable[[], dict[str, Any]]]]] = {
    "fast-sam3d": {
        "ss": (SSModalityCache, lambda: {}),
        "carving": (SLaTTokenCarving, lambda: {}),
        "step_cache": (SLaTStepCache, lambda: {}),
        "mesh": (SpectralTokenAggregation, lambda: {}),
    },
    "fast-sam3d-released": {
        # README / infer.sh: k=3, warm-up 2, beta 0.5 (a no-op there); thresh 1.5, warm-up 3, ratio 0.1
        "ss": (SSModalityCache, lambda: dict(beta=0.5, layout_mode="released")),
        "carving": (SLaTTokenCarving, lambda: dict(carve_ratio=0.1, gamma=0.7, magnitude_weight=0.3,
                                                   freq_weight=0.3, max_frozen_steps=4, start_step=2,
                                                   change_reference="selection", hfer=HFERConfig())),
        "step_cache": (SLaTStepCache, lambda: dict(threshold=1.5, warmup=3, mode="released")),
        "mesh": (SpectralTokenAggregation, lambda: dict(placement="pre_slat", min_tokens=2048, max_tokens=42000,
                                                        zero_hfer_is_identity=True)),
    },
}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build_fast_sam3d(method: str, overrides: dict[str, Any]) -> Accelerator:
    parts = _FS3D_PARTS[method]
    switches = {k: overrides.pop(k) for k in ("ss", "slat", "mesh", "carving", "step_cache") if k in overrides}
    per_part: dict[str, dict[str, Any]] = {p: {} for p in parts}
    for key, value in overrides.items():
        part, sep, param = key.partition("__")
        if not sep or part not in parts or param not in _fields(parts[part][0]):
            valid = sorted(f"{p}__{f}" for p, (cls, _) in parts.items() for f in _fields(cls))
            raise ValueError(f"unknown override {key!r} for {method!r}; use component switches "
                             f"ss/slat/carving/step_cache/mesh (an instance or None) or one of {valid}")
        per_part[part][param] = value

    def build(part: str) -> Any:
        if part in switches:
            if per_part[part]:
                raise ValueError(f"both {part}=... and {part}__* overrides given")
            return switches[part]
        cls, defaults = parts[part]
        kw = defaults()
        kw.update(per_part[part])
        if part == "carving" and "keep" in per_part[part]:
            kw.pop("carve_ratio", None)
        if part == "carving" and "carve_ratio" in per_part[part]:
            kw.pop("keep", None)
        return cls(**kw)

    ss = build("ss")
    if "slat" in switches:
        if per_part["carving"] or per_part["step_cache"] or "carving" in switches or "step_cache" in switches:
            raise ValueError("slat=... replaces the whole SLaT policy; do not combine it with carving/step_cache")
        slat = switches["slat"]
    else:
        carving, cache = build("carving"), build("step_cache")
        slat = None if carving is None and cache is None else SLaTPolicy(carving, cache)
    return FastSAM3D(ss=ss, slat=slat, mesh=build("mesh"), name=method)


def _single(make: Callable[[dict[str, Any]], Accelerator]) -> Callable[[str, dict[str, Any]], Accelerator]:
    return lambda method, kw: make(kw)


def _transform_method(cls: type, name: str) -> Callable[[dict[str, Any]], Accelerator]:
    def make(kw: dict[str, Any]) -> Accelerator:
        acc_kw: dict[str, Any] = dict(name=name)
        _place(acc_kw, cls(**kw))
        return Accelerator(**acc_kw)
    return make


def _both_samplers(cls: type, name: str) -> Callable[[dict[str, Any]], Accelerator]:
    def make(kw: dict[str, Any]) -> Accelerator:
        policy = cls(**kw)
        return Accelerator(ss_policy=policy, slat_policy=policy, name=name)
    return make


def _base(kw: dict[str, Any]) -> Accelerator:
    if kw:
        raise ValueError(f"method 'base' takes no overrides, got {sorted(kw)}")
    return Accelerator(name="base")


METHODS: dict[str, Callable[[str, dict[str, Any]], Accelerator]] = {
    "base": _single(_base),
    "fast-sam3d": _build_fast_sam3d,
    "fast-sam3d-released": _build_fast_sam3d,
    "taylorseer": _single(_both_samplers(TaylorSeer, "taylorseer")),
    "easycache": _single(_both_samplers(EasyCache, "easycache")),
    "random-drop": _single(_transform_method(RandomTokenDrop, "random-drop")),
    "uniform-merge": _single(_transform_method(UniformTokenMerge, "uniform-merge")),
    "fast3dcache": _single(lambda kw: Accelerator(slat_policy=Fast3DCache(**kw), name="fast3dcache")),
}


def make_method(name: str, **overrides: Any) -> Accelerator:
    """Build a named method. Overrides go to the method's constructor; for ``fast-sam3d`` and
    ``fast-sam3d-released`` use ``<component>__<param>`` (components ``ss``, ``carving``,
    ``step_cache``, ``mesh``) or switch a component with ``ss=None`` / ``slat=None`` / ``mesh=None``
    (or pass an instance). The accelerator's name records the overrides, e.g.
    ``fast-sam3d[ss__k=4]``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    try:
        acc = METHODS[name](name, dict(overrides))
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"bad override for method {name!r}: {e}") from e
        raise
    if overrides:
        acc.name = name + "[" + ",".join(f"{k}={overrides[k]!r}" for k in sorted(overrides)) + "]"
    return acc


__all__ = [
    "EasyCache", "Fast3DCache", "FastSAM3D", "HFERConfig", "METHODS", "RandomTokenDrop", "SLaTPolicy",
    "SLaTStepCache", "SLaTTokenCarving", "SSModalityCache", "ShadowPolicy", "SpectralTokenAggregation",
    "TaylorSeer", "UniformTokenMerge", "hfer", "hfer_2d", "hfer_3d", "make_method", "voxel_highfreq_scores",
]

# calibrated presets, pluggable signals, instance-adaptive control (re-exports)
from .presets import from_preset  # noqa: E402
from .signals import available_signals, get_signal, register_signal  # noqa: E402
from .adaptive import AdaptiveFastSAM3D  # noqa: E402

FastSAM3D.from_preset = from_preset  # type: ignore[attr-defined]
