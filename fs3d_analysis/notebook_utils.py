"""What every observation notebook needs: the pipeline to study, the run size, where figures go,
and interactive knobs that still give static output when a notebook runs headless (CI, nbmake).

Environment:

- ``FS3D_CONFIG``: ``mini`` (default, CPU) or ``full`` (needs CUDA);
- ``FS3D_QUICK=1``: CI size (few samples, short sweeps, 8 SLaT steps) -- see :func:`quick_mode`,
  :func:`pick`, :func:`apply_run_size`;
- ``FS3D_SS_STEPS`` / ``FS3D_SLAT_STEPS``: override the sampler steps, ``FS3D_THREADS`` the torch
  CPU threads (:func:`apply_run_size`; quick mode uses one thread);
- ``FS3D_ALLOW_RANDOM=1``: development only; without shipped weights, use a seeded random-weight
  pipeline whose SS decoder is biased to a sparse occupancy (random weights otherwise fill half the
  grid and the sparse stages crawl). Measurements on it say nothing about the paper's claims.
- ``FS3D_CHECKPOINT``: official checkpoint folder (or our ``model.safetensors``) for ``full``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from fs3d_accel.model.configs import SamplerConfig
from fs3d_accel.pipeline import Pipeline

CONFIGS = ("mini", "full")
PRETRAINED = {"mini": "sam3d-mini"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
T = TypeVar("T")


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r}: use 1/0 (or true/false)")


def quick_mode() -> bool:
    """``FS3D_QUICK=1``: the CI size (a few samples, short sweeps)."""
    return _flag("FS3D_QUICK")


def allow_random() -> bool:
    """``FS3D_ALLOW_RANDOM=1``: random weights are acceptable when no trained weights exist."""
    return _flag("FS3D_ALLOW_RANDOM")


def pick(full: T, quick: T) -> T:
    """``quick`` in quick mode, else ``full`` (sample counts, sweep grids)."""
    return quick if quick_mode() else full


def config_name() -> str:
    """``FS3D_CONFIG`` (default ``mini``); ``full`` needs a CUDA device."""
    name = os.environ.get("FS3D_CONFIG", "mini").strip() or "mini"
    if name not in CONFIGS:
        raise ValueError(f"FS3D_CONFIG={name!r}: use one of {CONFIGS}")
    if name == "full" and not torch.cuda.is_available():
        raise ValueError("FS3D_CONFIG=full needs a CUDA GPU; use the default 'mini' on CPU")
    return name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def repo_root() -> Path:
    """The repository root (notebooks run from ``notebooks/`` or from the root)."""
    here = Path.cwd()
    for p in (here, *here.parents):
        if (p / "fs3d_accel").is_dir() and (p / "pyproject.toml").is_file():
            return p
    return Path(__file__).resolve().parents[1]


def figures_dir() -> Path:
    """``FS3D_FIGURES`` (set by ``fs3d reproduce`` so a run never overwrites the committed figures),
    else the repository's ``figures/``."""
    env = os.environ.get("FS3D_FIGURES", "").strip()
    out = Path(env) if env else repo_root() / "figures"
    out.mkdir(parents=True, exist_ok=True)
    return out


def random_pipeline(config: str = "mini", device: str | torch.device = "cpu", seed: int = 0,
                    occupied_fraction: float = 0.03) -> Pipeline:
    """Seeded random weights, SS decoder output bias shifted so that about ``occupied_fraction`` of
    the occupancy grid is set on a synthetic scene (:func:`fs3d_accel.synthetic.sparsify_occupancy`;
    a 3-step SS run sets the quantile, to keep start-up short)."""
    from fs3d_accel.synthetic import sparsify_occupancy

    if not 0 < occupied_fraction < 1:
        raise ValueError(f"occupied_fraction must be in (0, 1), got {occupied_fraction}")
    pipe = Pipeline.from_config(config, seed=seed, device=device)
    sparsify_occupancy(pipe, occupied_fraction, seed, sampler=SamplerConfig(steps=3, rescale_t=3.0, cfg_strength=7.0))
    pipe.source = f"config:{config} (random init, sparsified to {occupied_fraction:g})"
    return pipe


def weights_fingerprint(pipe: Pipeline) -> str:
    """12 hex digits identifying the pipeline's weights (its source and a checksum of every parameter):
    resumable result folders are keyed by it, so rows measured with other weights are never reused."""
    import hashlib

    h = hashlib.sha1(f"{pipe.config.name}|{pipe.source}".encode())
    with torch.no_grad():
        for name, p in pipe.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()) if p.numel() else 0.0:.17g}".encode())
    return h.hexdigest()[:12]


def is_random(pipe: Pipeline) -> bool:
    """True for a random-weight pipeline (its measurements do not test the paper's claims)."""
    return pipe.source.startswith("config:")


def load_pipeline(device: str | torch.device | None = None, config: str | None = None) -> Pipeline:
    """The pipeline the notebooks study.

    ``mini``: the shipped ``sam3d-mini`` weights. ``full``: ``FS3D_CHECKPOINT`` (official folder or
    our safetensors). Without weights, a random sparse pipeline if ``FS3D_ALLOW_RANDOM=1``, else a
    FileNotFoundError saying what to do.
    """
    config = config or config_name()
    if config not in CONFIGS:
        raise ValueError(f"config {config!r}: use one of {CONFIGS}")
    device = device or default_device()
    try:
        if config == "mini":
            return Pipeline.from_pretrained(PRETRAINED["mini"], device=device)
        ckpt = os.environ.get("FS3D_CHECKPOINT")
        if not ckpt:
            raise FileNotFoundError("FS3D_CONFIG=full needs FS3D_CHECKPOINT=<official checkpoint folder>")
        return Pipeline.from_checkpoint(ckpt, config="full", device=device)
    except FileNotFoundError as exc:
        if allow_random():
            return random_pipeline(config, device=device)
        raise FileNotFoundError(
            f"no trained weights for config {config!r} ({exc}). The notebooks measure the paper's claims and "
            "need a model that generates shapes; for development only, set FS3D_ALLOW_RANDOM=1 to run them on "
            "random weights.") from exc


def set_samplers(pipe: Pipeline, ss_steps: int | None = None, slat_steps: int | None = None) -> Pipeline:
    """Shorten (or lengthen) the sampler schedules of ``pipe`` in place, keeping their other
    settings (rescale, CFG); ``None`` keeps a schedule. For CI-sized runs on a CPU: the trained mini
    model's larger objects have 5-6 k SLaT tokens, and 25 SLaT steps x 2 CFG passes take minutes
    there. Returns ``pipe``."""
    from dataclasses import replace

    for name, steps in (("ss_steps", ss_steps), ("slat_steps", slat_steps)):
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{name} must be a positive int or None, got {steps!r}")
    cfg = pipe.config
    cfg = cfg.with_samplers(replace(cfg.ss_sampler, steps=ss_steps) if ss_steps else None,
                            replace(cfg.slat_sampler, steps=slat_steps) if slat_steps else None)
    pipe.config = cfg
    for stage in (pipe.ss, pipe.slat, pipe.decode):
        stage.cfg = cfg  # the stages read their sampler schedule from here at run time
    return pipe


#: SLaT steps in quick mode (CI): enough for the step-wise observations, minutes less on a CPU
QUICK_SLAT_STEPS = 8
#: shipped samples visited first in quick mode: with ``sam3d-mini`` the smallest non-empty
#: structures (about 1.2 k and 2.2 k SLaT tokens); the SS screen still checks them
QUICK_OBJECTS = ("011_banana", "021_bleach_cleanser")


def _steps_env(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"environment variable {name}={raw!r}: use a positive integer")
    return int(raw)


def run_size_steps() -> tuple[int | None, int | None]:
    """(SS steps, SLaT steps) for this run: ``FS3D_SS_STEPS`` / ``FS3D_SLAT_STEPS`` when set, else
    quick mode shortens the SLaT sampler to :data:`QUICK_SLAT_STEPS`; ``None`` = the config's."""
    ss, slat = _steps_env("FS3D_SS_STEPS"), _steps_env("FS3D_SLAT_STEPS")
    if slat is None and quick_mode():
        slat = QUICK_SLAT_STEPS
    return ss, slat


def run_size_threads() -> int | None:
    """torch CPU threads for this run: ``FS3D_THREADS`` when set, else 1 in quick mode (CI runs on
    shared, oversubscribed CPUs, where busy-waiting OpenMP threads made a mini-model run 10-16x
    slower than one thread), else ``None`` (torch's default)."""
    n = _steps_env("FS3D_THREADS")
    return 1 if n is None and quick_mode() else n


def apply_run_size(pipe: Pipeline) -> Pipeline:
    """:func:`set_samplers` with :func:`run_size_steps`, and ``torch.set_num_threads`` with
    :func:`run_size_threads` (both no-ops at full size without overrides). Returns ``pipe``."""
    threads = run_size_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return set_samplers(pipe, *run_size_steps())


def banner(pipe: Pipeline) -> str:
    """One line naming the model, the device and the run size (print it at the top of a notebook)."""
    size = "quick (FS3D_QUICK=1)" if quick_mode() else "full size"
    ss, slat = pipe.config.ss_sampler, pipe.config.slat_sampler
    threads = f" ({torch.get_num_threads()} threads)" if pipe.device.type == "cpu" else ""
    line = (f"model: {pipe.source} | config {pipe.config.name} | device {pipe.device}{threads} | {size} | "
            f"samplers: SS {ss.steps} steps (CFG {ss.cfg_strength:g}), "
            f"SLaT {slat.steps} steps (CFG {slat.cfg_strength:g})")
    if is_random(pipe):
        line += "\nWARNING: random weights -- figures show the machinery, not the paper's observations."
    return line


def interact_static(draw: Callable[..., Any], **controls: Any) -> None:
    """Sliders that re-run ``draw(**values)`` on change, plus one draw with the current values now.

    The first draw is ordinary cell output, so a headless run (nbmake, nbconvert) records it and
    saves its figures; in a live notebook later draws appear in the output area under the sliders.
    ``controls`` are ipywidgets value widgets keyed by ``draw``'s parameter names.
    """
    import ipywidgets as widgets
    from IPython.display import display

    out = widgets.Output()

    def redraw(_change: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            draw(**{k: c.value for k, c in controls.items()})

    for c in controls.values():
        c.observe(redraw, names="value")
    display(widgets.VBox([*controls.values(), out]))
    draw(**{k: c.value for k, c in controls.items()})


def show(fig: Any, path: Path | None = None, dpi: int = 120) -> None:
    """Save ``fig`` (if ``path``), display it and close it (keeps memory flat under Agg)."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    display(fig)
    plt.close(fig)


__all__ = [
    "CONFIGS", "QUICK_OBJECTS", "QUICK_SLAT_STEPS", "allow_random", "banner", "config_name", "default_device",
    "figures_dir", "interact_static", "is_random", "load_pipeline", "pick", "quick_mode", "random_pipeline",
    "repo_root", "run_size_steps", "run_size_threads", "apply_run_size", "set_samplers", "show",
]
