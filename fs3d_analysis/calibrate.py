"""Calibrate Fast-SAM3D's hyperparameters for a dataset: the fastest setting whose quality stays close
to the plain pipeline.

Search space (:class:`SearchSpace`): SS stride ``k`` and layout blend ``beta``, SLaT carving ``keep``
(top-K fraction recomputed), SLaT step-cache threshold ``E``, aggregation weight ``w`` and thresholds
``tau_low < tau_high``. Each trial runs the method on every object (same seeds as the base run) and
measures

- ``speedup_wall``: sum of base wall seconds / sum of the method's (the objective by default);
- ``speedup_passes``: the same ratio of network-pass equivalents of the two samplers (a computed step
  counts 1, a carved step its active token fraction, an extrapolated / cached step 0), which is
  deterministic, while CPU wall time is noisy; ``decoder_token_ratio`` for the aggregation;
- ``f1_drop`` / ``viou_drop``: mean over objects of base minus method F1@0.05 (points, 0-100) and
  volumetric IoU, both against the ground truth.

A trial is feasible when ``f1_drop <= max_f1_drop`` and ``viou_drop <= max_viou_drop``
(:class:`QualityConstraint`). The chosen setting is the feasible trial with the largest speedup; it is
written as a preset (:mod:`fs3d_accel.accel.presets`) that ``from_preset`` loads.

Why Optuna and not Ray Tune: the trials here are sequential pipeline runs in one process on one
device (a laptop CPU or one GPU), so Optuna's in-process ``study.optimize`` needs no cluster or
scheduler; its TPE sampler handles the conditional range (tau_high > tau_low) by define-by-run,
supports constraints and multi-objective search (TPE, NSGA-II) for the Pareto front; and an SQLite
RDB storage in ``out_dir`` makes an interrupted calibration resume where it stopped. Ray Tune would
add a Ray runtime for parallelism that one device cannot use. What does parallelise is the objects
of one trial: ``measure_fn`` (``fs3d calibrate --ray [--workers N]``) measures them on Ray actors, one
model replica each (:class:`fs3d_analysis.distributed.RayMeasurePool`), while the trials stay sequential
in the one study.

Outputs in ``out_dir``: ``study.db`` (Optuna storage), ``base.csv`` (the base run, computed once),
``trials.csv`` (one row per trial), ``trial_objects.csv`` (one row per trial x object),
``pareto.png``, ``preset.json``.

Quality metrics: ``quality="exact"`` uses :func:`fs3d_analysis.eval.score` (the tables' metrics);
``quality="fast"`` (default) computes the same F1@0.05, but the vIoU from surface voxels plus
``binary_fill_holes`` instead of winding numbers (equal for closed surfaces; the exact solid test
takes ~1 min per noisy mesh of an untrained model).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from fs3d_accel.accel.presets import HYPERPARAMETERS, Preset, from_preset
from fs3d_accel.seams import Accelerator

STUDY_NAME = "fs3d-calibrate"
QUALITY_MODES = ("fast", "exact")
OBJECTIVES = ("wall", "passes")
SAMPLERS = ("tpe", "nsga2")

#: paper / released defaults of the searched hyperparameters (enqueued as the first trial)
PAPER_DEFAULTS: dict[str, float] = {"k": 3, "beta": 0.7, "keep": 0.1, "E": 1.5, "w": 0.9, "tau_low": 0.5,
                                    "tau_high": 0.7}
#: valid domain per hyperparameter: (low, high, low_open, high_open)
DOMAINS: dict[str, tuple[float, float, bool, bool]] = {
    "k": (1, math.inf, False, True), "beta": (0.0, 1.0, False, True), "keep": (0.0, 1.0, True, False),
    "E": (0.0, math.inf, False, True), "w": (0.0, 1.0, False, False), "tau_low": (0.0, 1.0, False, False),
    "tau_high": (0.0, 1.0, False, False),
}
TAU_GAP = 1e-3


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityConstraint:
    """Allowed mean quality loss against the base pipeline: F1@0.05 in points (0-100), vIoU absolute."""

    max_f1_drop: float = 0.5
    max_viou_drop: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_f1_drop", "max_viou_drop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def violations(self, f1_drop: float, viou_drop: float) -> list[float]:
        """Optuna constraint values (<= 0 is feasible); a NaN metric counts as infeasible."""
        bad = 1e9
        return [bad if not math.isfinite(f1_drop) else f1_drop - self.max_f1_drop,
                bad if not math.isfinite(viou_drop) else viou_drop - self.max_viou_drop]

    def satisfied(self, f1_drop: float, viou_drop: float) -> bool:
        return all(v <= 0 for v in self.violations(f1_drop, viou_drop))


def _check_bounds(name: str, bounds: Any) -> tuple[float, float]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"{name}: bounds must be a (low, high) pair or None, got {bounds!r}")
    lo, hi = bounds
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: bounds must be finite numbers, got {bounds!r}")
    if name == "k" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ValueError(f"k: bounds must be integers, got {bounds!r}")
    if lo > hi:
        raise ValueError(f"{name}: low {lo} > high {hi}")
    dlo, dhi, lo_open, hi_open = DOMAINS[name]
    for v in (lo, hi):
        if (v <= dlo if lo_open else v < dlo) or (v >= dhi if hi_open else v > dhi):
            interval = f"{'(' if lo_open else '['}{dlo}, {dhi}{')' if hi_open else ']'}"
            raise ValueError(f"{name}: bounds {bounds!r} leave the valid range {interval}")
    return lo, hi


@dataclass(frozen=True)
class SearchSpace:
    """Ranges ``(low, high)`` of the searched hyperparameters; ``None`` holds one at the method's
    default. ``fixed`` adds further ``make_method`` overrides (e.g. ``{"mesh": None}``).
    tau_high is sampled above the sampled tau_low (by at least 1e-3)."""

    k: tuple[int, int] | None = (1, 5)
    beta: tuple[float, float] | None = (0.3, 0.95)
    keep: tuple[float, float] | None = (0.05, 1.0)
    E: tuple[float, float] | None = (0.0, 3.0)
    w: tuple[float, float] | None = (0.5, 1.0)
    tau_low: tuple[float, float] | None = (0.1, 0.6)
    tau_high: tuple[float, float] | None = (0.3, 0.95)
    method: str = "fast-sam3d"
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("fast-sam3d", "fast-sam3d-released"):
            raise ValueError(f"method must be 'fast-sam3d' or 'fast-sam3d-released', got {self.method!r}")
        if not self.names:
            raise ValueError("empty search space: give a (low, high) range for at least one of "
                             f"{list(HYPERPARAMETERS)}")
        for n in self.names:
            object.__setattr__(self, n, _check_bounds(n, getattr(self, n)))
        if not isinstance(self.fixed, Mapping):
            raise TypeError(f"fixed must be a mapping of make_method overrides, got {type(self.fixed).__name__}")
        clash = sorted(HYPERPARAMETERS[n] for n in self.names if HYPERPARAMETERS[n] in self.fixed)
        if clash:
            raise ValueError(f"{clash} are both searched and fixed")
        lo_range, hi_range = self.tau_range("tau_low"), self.tau_range("tau_high")
        if not lo_range[0] + TAU_GAP <= hi_range[1]:
            raise ValueError(f"no tau_low < tau_high possible: tau_low >= {lo_range[0]} but tau_high <= {hi_range[1]}")
        from fs3d_accel.accel import make_method
        make_method(self.method, **self.overrides(self.reference()))  # bad fixed overrides fail here, not mid-search

    @property
    def names(self) -> list[str]:
        """The searched hyperparameters, in :data:`HYPERPARAMETERS` order."""
        return [n for n in HYPERPARAMETERS if getattr(self, n) is not None]

    def default(self, name: str) -> Any:
        """The value a hyperparameter has when not searched (fixed override, else the method default)."""
        key = HYPERPARAMETERS[name]
        if key in self.fixed:
            return self.fixed[key]
        from fs3d_accel.accel import make_method
        acc = make_method(self.method)
        part, param = key.split("__")
        obj = {"ss": acc.ss_policy, "mesh": acc.decoder_transform or acc.coords_transform,
               "carving": getattr(acc.slat_policy, "carving", None),
               "step_cache": getattr(acc.slat_policy, "step_cache", None)}[part]
        return getattr(obj, param, None)

    def tau_range(self, name: str) -> tuple[float, float]:
        r = getattr(self, name)
        if r is not None:
            return r
        v = float(self.default(name))
        return v, v

    def reference(self) -> dict[str, Any]:
        """A valid point of the space (the paper defaults moved into the ranges)."""
        out: dict[str, Any] = {}
        for n in self.names:
            lo, hi = getattr(self, n)
            out[n] = min(max(PAPER_DEFAULTS[n], lo), hi)
        if "tau_low" in out and "tau_high" in out and out["tau_high"] < out["tau_low"] + TAU_GAP:
            out["tau_low"], out["tau_high"] = self.tau_range("tau_low")[0], self.tau_range("tau_high")[1]
        elif "tau_low" in out and out["tau_low"] + TAU_GAP > self.tau_range("tau_high")[1]:
            out["tau_low"] = self.tau_range("tau_low")[0]
        elif "tau_high" in out and out["tau_high"] < self.tau_range("tau_low")[0] + TAU_GAP:
            out["tau_high"] = self.tau_range("tau_high")[1]
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample one point with an Optuna trial (define-by-run: tau_high's range follows tau_low)."""
        out: dict[str, Any] = {}
        for n in self.names:
            lo, hi = getattr(self, n)
            if n == "k":
                out[n] = trial.suggest_int(n, lo, hi)
            elif n == "tau_low":
                out[n] = trial.suggest_float(n, lo, min(hi, self.tau_range("tau_high")[1] - TAU_GAP))
            elif n == "tau_high":
                t_lo = out.get("tau_low", self.tau_range("tau_low")[0])
                out[n] = trial.suggest_float(n, max(lo, t_lo + TAU_GAP), hi)
            else:
                out[n] = trial.suggest_float(n, lo, hi)
        return out

    def overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``make_method`` overrides for a point of the space (fixed ones included)."""
        kw = {HYPERPARAMETERS[n]: params[n] for n in self.names}
        kw.update(self.fixed)
        return kw

    def build(self, params: Mapping[str, Any]) -> Accelerator:
        from fs3d_accel.accel import make_method
        return make_method(self.method, **self.overrides(params))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fixed"] = {k: (repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                      for k, v in self.fixed.items()}
        return d


# ---------------------------------------------------------------------------------------------
# measuring one setting
# ---------------------------------------------------------------------------------------------


def fast_shape_metrics(pred, gt, n_points: int = 10_000, threshold: float = 0.05, resolution: int = 64,
                       seed: int = 0) -> dict[str, float]:
    """CD and F1@``threshold`` as :func:`fs3d_analysis.metrics.shape_metrics` (mode ``independent``),
    vIoU from surface voxels + ``scipy.ndimage.binary_fill_holes`` (see the module docstring)."""
    from scipy import ndimage

    from fs3d_analysis.metrics.geometry import align, sample_surface, surface_voxels
    from fs3d_analysis.metrics.shape import chamfer_distance, f_score

    p, g = align(pred, gt, "independent")
    half = max(0.5, float(np.abs(p.vertices).max()), float(np.abs(g.vertices).max()))
    pp, gp = sample_surface(p, n_points, seed=seed), sample_surface(g, n_points, seed=seed)
    a = ndimage.binary_fill_holes(surface_voxels(p, resolution, -half, half))
    b = ndimage.binary_fill_holes(surface_voxels(g, resolution, -half, half))
    union = np.logical_or(a, b).sum()
    viou = float(np.logical_and(a, b).sum() / union) if union else float("nan")
    return {"chamfer": chamfer_distance(pp, gp), "f_score": f_score(pp, gp, threshold), "volume_iou": viou}


def quality_metrics(result, sample, quality: str = "fast") -> dict[str, float]:
    """Shape metrics of one result against its sample (NaN for an empty mesh)."""
    if quality == "exact":
        from fs3d_analysis.eval import score
        return {k: v for k, v in score(result, sample).items() if k in ("chamfer", "f_score", "volume_iou")}
    pred = result.mesh.to_trimesh()
    if len(pred.faces) == 0:
        return {"chamfer": float("nan"), "f_score": float("nan"), "volume_iou": float("nan")}
    return fast_shape_metrics(pred, sample.mesh)


def measure(pipe, samples: Sequence, accel: Accelerator | None, seed: int = 0,
            quality: str = "fast") -> pd.DataFrame:
    """One row per object: wall seconds, network-pass equivalents, decoder tokens and shape metrics."""
    from fs3d_analysis.eval import run_one

    rows = []
    for s in samples:
        result, row = run_one(pipe, s, accel, seed)
        ss_passes = row["ss_mean_active"] * row["ss_steps"]
        slat_passes = row["slat_mean_active"] * row["slat_steps"]
        rows.append({"object": s.name, **quality_metrics(result, s, quality), "time_total": row["time_total"],
                     **{k: row.get(k, float("nan")) for k in ("time_ss", "time_slat", "time_decode")},
                     "ss_passes": ss_passes, "slat_passes": slat_passes, "passes": ss_passes + slat_passes,
                     "n_decoder_tokens": row["n_decoder_tokens"], "aggregation_S": row["aggregation_S"]})
    return pd.DataFrame(rows)


def compare(base: pd.DataFrame, method: pd.DataFrame) -> dict[str, float]:
    """Trial aggregates of a method table against the base table (same objects)."""
    if sorted(base["object"]) != sorted(method["object"]):
        raise ValueError("base and method tables cover different objects")
    b = base.set_index("object").loc[method["object"]]
    m = method.set_index("object")
    ratio = lambda num, den: float(num.sum() / den.sum()) if float(den.sum()) > 0 else float("inf")  # noqa: E731
    return {
        "speedup_wall": ratio(b["time_total"], m["time_total"]),
        "speedup_passes": ratio(b["passes"], m["passes"]),
        "ss_pass_ratio": ratio(b["ss_passes"], m["ss_passes"]),
        "slat_pass_ratio": ratio(b["slat_passes"], m["slat_passes"]),
        "decoder_token_ratio": ratio(b["n_decoder_tokens"], m["n_decoder_tokens"]),
        "f1_drop": float((b["f_score"] - m["f_score"]).mean()),
        "viou_drop": float((b["volume_iou"] - m["volume_iou"]).mean()),
        "f1": float(m["f_score"].mean()),
        "viou": float(m["volume_iou"].mean()),
        "time_total": float(m["time_total"].sum()),
    }


# ---------------------------------------------------------------------------------------------
# Pareto front and plot
# ---------------------------------------------------------------------------------------------


def pareto_mask(speedup: Sequence[float], drop: Sequence[float]) -> np.ndarray:
    """True for points no other point dominates (speedup >=, drop <=, one strictly)."""
    s, d = np.asarray(speedup, float), np.asarray(drop, float)
    ok = np.isfinite(s) & np.isfinite(d)
    out = np.zeros(len(s), bool)
    for i in np.nonzero(ok)[0]:
        dom = ok & (s >= s[i]) & (d <= d[i]) & ((s > s[i]) | (d < d[i]))
        out[i] = not dom.any()
    return out


def plot_pareto(trials: pd.DataFrame, constraint: QualityConstraint, path: str | Path,
                objective: str = "wall", chosen: int | None = None, title: str | None = None) -> Path:
    """Speedup against F1 drop per trial: feasible trials highlighted, the Pareto front drawn, the
    chosen trial starred, the F1 budget dashed. Saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    col = f"speedup_{objective}"
    done = trials[trials["state"] == "COMPLETE"] if "state" in trials else trials
    fig, ax = plt.subplots(figsize=(6, 4.2))
    feas = done[done["feasible"].astype(bool)]
    infeas = done[~done["feasible"].astype(bool)]
    ax.scatter(infeas["f1_drop"], infeas[col], c="0.7", s=28, label="violates constraint", zorder=2)
    ax.scatter(feas["f1_drop"], feas[col], c="tab:blue", s=36, label="feasible", zorder=3)
    front = done[pareto_mask(done[col], done["f1_drop"])].sort_values("f1_drop")
    if len(front):
        ax.step(front["f1_drop"], front[col], where="post", c="tab:orange", lw=1.2, label="Pareto front", zorder=1)
    if chosen is not None and (done["trial"] == chosen).any():
        row = done[done["trial"] == chosen].iloc[0]
        ax.scatter([row["f1_drop"]], [row[col]], marker="*", s=220, c="tab:red", edgecolor="k",
                   label=f"chosen (trial {chosen})", zorder=4)
    ax.axvline(constraint.max_f1_drop, ls="--", c="tab:red", lw=1, label=f"F1 budget {constraint.max_f1_drop:g}")
    ax.axhline(1.0, ls=":", c="k", lw=0.8)
    ax.set_xlabel("F1@0.05 drop vs base (points)")
    ax.set_ylabel("speedup vs base (" + ("wall time" if objective == "wall" else "network passes") + ")")
    ax.set_title(title or "Calibration trials")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the calibration
# ---------------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """What :func:`calibrate` produced. ``best`` is ``None`` when no trial met the constraint."""

    out_dir: Path
    trials: pd.DataFrame
    objects: pd.DataFrame
    base: pd.DataFrame
    best: dict[str, Any] | None
    preset_path: Path | None
    pareto_path: Path
    csv_path: Path
    study: Any = None

    def accelerator(self) -> Accelerator:
        if self.preset_path is None:
            raise ValueError("no trial met the quality constraint, so there is no preset; loosen the constraint "
                             "or search more trials")
        return from_preset(self.preset_path)


def _fingerprint(pipe, samples: Sequence, seed: int, quality: str) -> dict[str, Any]:
    return {"objects": [s.name for s in samples], "seed": seed, "quality": quality,
            "config": getattr(getattr(pipe, "config", None), "name", "?"), "device": str(getattr(pipe, "device", "?")),
            "model": str(getattr(pipe, "source", "?"))}


def _base_table(pipe, samples: Sequence, out: Path, seed: int, quality: str, warmup: bool = True,
                measure_fn: Callable[..., pd.DataFrame] | None = None) -> pd.DataFrame:
    """The base run, cached in ``base.csv`` (+ ``base.json`` with what it was computed for);
    measured by ``measure_fn`` (default :func:`measure`)."""
    csv, meta = out / "base.csv", out / "base.json"
    fp = _fingerprint(pipe, samples, seed, quality)
    if csv.is_file() and meta.is_file() and json.loads(meta.read_text()) == fp:
        return pd.read_csv(csv)
    if warmup:
        run_warmup(pipe, samples[0], seed)
    base = (measure if measure_fn is None else measure_fn)(pipe, samples, None, seed, quality)
    base.to_csv(csv, index=False)
    meta.write_text(json.dumps(fp))
    return base


def run_warmup(pipe, sample, seed: int = 0) -> None:
    """One untimed run, so that one-off costs (allocator, kernel selection) do not count against the base."""
    pipe.with_accel(None)
    pipe(sample.image, sample.mask, pointmap=sample.pointmap, seed=seed)


def _trial_rows(study, space: SearchSpace, constraint: QualityConstraint,
                objective: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, obj_rows = [], []
    for t in study.trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        row.update({n: t.params.get(n, float("nan")) for n in space.names})
        agg = t.user_attrs.get("aggregates", {})
        row.update(agg)
        if agg:
            row["feasible"] = constraint.satisfied(agg["f1_drop"], agg["viou_drop"])
        else:
            row["feasible"] = False
        row["method"] = t.user_attrs.get("method", "")
        row["duration_s"] = t.duration.total_seconds() if t.duration is not None else float("nan")
        rows.append(row)
        for o in t.user_attrs.get("objects", []):
            obj_rows.append({"trial": t.number, **o})
    trials = pd.DataFrame(rows)
    if len(trials) and f"speedup_{objective}" in trials:
        done = trials["state"] == "COMPLETE"
        trials["pareto"] = False
        trials.loc[done, "pareto"] = pareto_mask(trials.loc[done, f"speedup_{objective}"],
                                                 trials.loc[done, "f1_drop"])
    return trials, pd.DataFrame(obj_rows)


def choose_best(trials: pd.DataFrame, objective: str = "wall") -> pd.Series | None:
    """The feasible completed trial with the largest speedup (ties: smaller F1 drop, then lower number)."""
    if not len(trials) or "feasible" not in trials:
        return None
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)]
    if not len(ok):
        return None
    col = f"speedup_{objective}"
    return ok.sort_values([col, "f1_drop", "trial"], ascending=[False, True, True]).iloc[0]


#: Optuna >= 5 reads constraints the objective sets on the trial; older versions need constraints_func
def _trial_constraints() -> bool:
    import optuna
    return hasattr(optuna.trial.Trial, "set_constraint")


def _make_sampler(name: str, seed: int, constraint: QualityConstraint):
    import optuna

    def constraints(trial) -> list[float]:
        agg = trial.user_attrs.get("aggregates")
        if not agg:
            return [1e9, 1e9]
        return constraint.violations(agg["f1_drop"], agg["viou_drop"])

    kw: dict[str, Any] = {} if _trial_constraints() else {"constraints_func": constraints}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, **kw)
        return optuna.samplers.NSGAIISampler(seed=seed, **kw)


def calibrate(pipe, samples: Sequence, space: SearchSpace | None = None,
              constraint: QualityConstraint | None = None, n_trials: int = 20,
              out_dir: str | Path = "runs/calibrate", seed: int = 0, *, objective: str = "wall",
              quality: str = "fast", sampler: str = "tpe", dataset_name: str = "custom",
              enqueue_defaults: bool = True, figure_paths: Sequence[str | Path] = (),
              warmup: bool = True, progress: bool = False,
              measure_fn: Callable[..., pd.DataFrame] | None = None) -> CalibrationResult:
    """Search ``space`` for the fastest setting that meets ``constraint`` on ``samples``.

    ``n_trials`` is the total the study should hold: a rerun on the same ``out_dir`` resumes (finished
    trials are kept in ``study.db``) and only runs what is missing. ``objective``: ``"wall"`` (measured
    wall time) or ``"passes"`` (network-pass equivalents). ``enqueue_defaults`` makes the first trial
    the paper's setting (moved into the ranges). ``figure_paths``: extra copies of the Pareto plot.
    ``warmup``: one untimed plain run (of ``pipe``, in this process) before the timed base run.
    ``measure_fn(pipe, samples, accel, seed, quality)`` measures the base and every trial and returns
    :func:`measure`'s table; ``None`` (default) is :func:`measure` itself, serially in this process.
    ``RayMeasurePool(...).measure`` (:mod:`fs3d_analysis.distributed`) measures a trial's objects in
    parallel on Ray actors; warm its actors with ``pool.warmup`` for a wall-time objective (then
    ``warmup=False``: the local run would only warm ``pipe``). ``measure_fn`` is not part of the stored
    settings, so a study can be resumed with either.
    """
    import optuna

    space = space if space is not None else SearchSpace()
    constraint = constraint if constraint is not None else QualityConstraint()
    if not isinstance(space, SearchSpace):
        raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
    if not isinstance(constraint, QualityConstraint):
        raise TypeError(f"constraint must be a QualityConstraint, got {type(constraint).__name__}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int):
        raise TypeError(f"n_trials must be an int, got {n_trials!r}")
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if measure_fn is None:
        measure_fn = measure  # looked up per call (tests replace the module's measure)
    elif not callable(measure_fn):
        raise TypeError(f"measure_fn must be callable like measure(pipe, samples, accel, seed, quality), "
                        f"got {type(measure_fn).__name__}")
    samples = list(samples)
    if not samples:
        raise ValueError("calibrate needs at least one sample")
    for name, value, choices in (("objective", objective, OBJECTIVES), ("quality", quality, QUALITY_MODES),
                                 ("sampler", sampler, SAMPLERS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"space": space.to_dict(), "constraint": asdict(constraint), "objective": objective,
             **_fingerprint(pipe, samples, seed, quality)}
    setup = json.loads(json.dumps(setup))
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, load_if_exists=True,
                                    directions=["maximize", "minimize"],
                                    sampler=_make_sampler(sampler, seed, constraint))
        stored = study.user_attrs.get("setup")
        if stored is None:
            study.set_user_attr("setup", setup)
            if enqueue_defaults:
                study.enqueue_trial(space.reference())
        elif stored != setup:
            diff = sorted(k for k in setup if stored.get(k) != setup[k])
            raise ValueError(f"{out} holds a calibration with different settings ({diff}); use another out_dir")

        base = _base_table(pipe, samples, out, seed, quality, warmup, measure_fn)

        def write_tables(*_: Any) -> None:
            trials, objs = _trial_rows(study, space, constraint, objective)
            trials.to_csv(out / "trials.csv", index=False)
            objs.to_csv(out / "trial_objects.csv", index=False)

        def objective_fn(trial) -> tuple[float, float]:
            params = space.suggest(trial)
            acc = space.build(params)
            table = measure_fn(pipe, samples, acc, seed, quality)
            agg = compare(base, table)
            trial.set_user_attr("aggregates", agg)
            trial.set_user_attr("method", acc.name)
            trial.set_user_attr("objects", json.loads(table.to_json(orient="records")))
            if _trial_constraints():
                for key, v in zip(("f1_drop", "viou_drop"), constraint.violations(agg["f1_drop"], agg["viou_drop"])):
                    trial.set_constraint(key, v)
            drop = agg["f1_drop"] if math.isfinite(agg["f1_drop"]) else 1e9
            return agg[f"speedup_{objective}"], drop

        finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
        remaining = n_trials - finished
        if remaining > 0:
            study.optimize(objective_fn, n_trials=remaining, callbacks=[write_tables], show_progress_bar=progress)
        write_tables()
    finally:
        optuna.logging.set_verbosity(verbosity)

    trials, objs = _trial_rows(study, space, constraint, objective)
    best_row = choose_best(trials, objective)
    best = preset_path = None
    if best_row is not None:
        params = dict(study.trials[int(best_row["trial"])].params)  # exact types (k stays an int)
        measured = {k: _py(best_row[k]) for k in ("speedup_wall", "speedup_passes", "ss_pass_ratio",
                                                  "slat_pass_ratio", "decoder_token_ratio", "f1_drop",
                                                  "viou_drop", "f1", "viou") if k in best_row}
        measured.update(trial=int(best_row["trial"]), base_f1=float(base["f_score"].mean()),
                        base_viou=float(base["volume_iou"].mean()), base_time_total=float(base["time_total"].sum()),
                        objective=objective, quality=quality)
        preset = Preset(hyperparameters=params, method=space.method, overrides=dict(space.fixed),
                        dataset={"name": dataset_name, "objects": [s.name for s in samples], "seed": seed},
                        constraint=asdict(constraint), measured=measured,
                        model={"config": setup["config"], "device": setup["device"], "source": setup["model"]},
                        notes=f"chosen by fs3d_analysis.calibrate over {len(trials)} trials")
        preset_path = preset.save(out / "preset.json")
        best = {**params, **measured}
    pareto = plot_pareto(trials, constraint, out / "pareto.png", objective,
                         None if best is None else best["trial"],
                         title=f"Calibration on {dataset_name} ({len(samples)} objects)")
    for extra in figure_paths:
        plot_pareto(trials, constraint, extra, objective, None if best is None else best["trial"],
                    title=f"Calibration on {dataset_name} ({len(samples)} objects)")
    return CalibrationResult(out_dir=out, trials=trials, objects=objs, base=base, best=best, preset_path=preset_path,
                             pareto_path=pareto, csv_path=out / "trials.csv", study=study)


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


# ---------------------------------------------------------------------------------------------
# instance-adaptive control: thresholds from the data
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


class _Probe:
    """Runs full passes and evaluates a step-level signal at step ``at``, then stops the sampler."""

    def __init__(self, name: str, at: int) -> None:
        from fs3d_accel.accel.signals import get_signal
        self.signal, self.at, self.value = get_signal(name, "step"), at, float("nan")

    def velocity(self, ctx, compute):
        if ctx.step == self.at:
            self.value = float(self.signal.compute(ctx))
            raise _Stop
        return compute()


def early_signals(pipe, samples: Sequence, seed: int = 0, ss_signal: str = "layout_jitter", ss_at: int = 2,
                  slat_signal: str = "update_concentration", slat_at: int = 2) -> pd.DataFrame:
    """The step-level signals the adaptive controller decides from, per object (base trajectory up to
    the decision step only: the runs stop there). One row per object."""
    from fs3d_accel.seams import Accelerator as Acc

    rows = []
    for s in samples:
        inputs = pipe.prepare(s.image, s.mask, s.pointmap)
        probe = _Probe(ss_signal, ss_at)
        try:
            pipe.with_accel(Acc(ss_policy=probe))
            pipe.run_ss(inputs, seed)
        except _Stop:
            pass
        finally:
            pipe.with_accel(None)
        ss = pipe.run_ss(inputs, seed)
        probe2 = _Probe(slat_signal, slat_at)
        try:
            pipe.with_accel(Acc(slat_policy=probe2))
            pipe.run_slat(inputs, ss, seed)
        except _Stop:
            pass
        finally:
            pipe.with_accel(None)
        rows.append({"object": s.name, ss_signal: probe.value, slat_signal: probe2.value,
                     "n_voxels": int(ss.coords.shape[0])})
    return pd.DataFrame(rows)


def quantile_thresholds(values: Sequence[float], n_options: int) -> tuple[float, ...]:
    """``n_options - 1`` thresholds at the inner quantiles of ``values`` (equal-count bins), strictly
    increasing (ties nudged by 1e-9 relative)."""
    v = np.asarray([x for x in values if math.isfinite(x)], float)
    if n_options < 1:
        raise ValueError(f"n_options must be >= 1, got {n_options}")
    if n_options > 1 and not len(v):
        raise ValueError("no finite signal values to place thresholds at")
    qs = [float(np.quantile(v, i / n_options)) for i in range(1, n_options)]
    for i in range(1, len(qs)):
        if qs[i] <= qs[i - 1]:
            qs[i] = qs[i - 1] + max(abs(qs[i - 1]), 1.0) * 1e-9
    return tuple(qs)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(args) -> int:
    """``fs3d calibrate``: search the default space on a dataset; writes ``<out>/`` (module docstring).

    ``--ray`` measures each trial's objects on Ray actors (``--workers N``; default one per GPU with
    ``--device cuda``, else one per CPU), warmed up once before the search.
    """
    from fs3d_accel.cli import _load_pipeline
    from fs3d_analysis.eval import load_dataset

    try:
        constraint = QualityConstraint(max_f1_drop=args.max_f1_drop,
                                       max_viou_drop=getattr(args, "max_viou_drop", QualityConstraint.max_viou_drop))
    except ValueError as e:
        raise SystemExit(f"bad quality constraint: {e}") from e
    if args.trials < 1:
        raise SystemExit(f"--trials must be >= 1, got {args.trials}")
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {limit}")
    objective, quality = getattr(args, "objective", "wall"), getattr(args, "quality", "fast")
    sampler = getattr(args, "sampler", "tpe")
    from fs3d_analysis.distributed import check_ray_args
    use_ray, workers = check_ray_args(args)
    pipe = _load_pipeline(args)
    samples = load_dataset(args.dataset, limit)
    seed = getattr(args, "seed", 0)
    kw = dict(n_trials=args.trials, out_dir=args.out, seed=seed, objective=objective, quality=quality,
              sampler=sampler, dataset_name=args.dataset, progress=True)
    t0 = time.perf_counter()
    if use_ray:
        from fs3d_analysis.distributed import CliPipeFactory, RayMeasurePool
        with RayMeasurePool(CliPipeFactory.from_args(args), workers,
                            use_gpu=str(args.device).startswith("cuda")) as pool:
            print(f"measuring on {pool.pool.num_workers} Ray workers ({pool.pool.device})")
            if objective == "wall" and samples:
                pool.warmup(samples[0], seed)  # every actor; the driver's pipe measures nothing
            res = calibrate(pipe, samples, SearchSpace(), constraint, warmup=False, measure_fn=pool.measure, **kw)
    else:
        res = calibrate(pipe, samples, SearchSpace(), constraint, **kw)
    cols = ["trial", *SearchSpace().names, "speedup_wall", "speedup_passes", "f1_drop", "viou_drop", "feasible"]
    print(res.trials[[c for c in cols if c in res.trials]].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"{len(res.trials)} trials in {time.perf_counter() - t0:.0f} s; table {res.csv_path}, plot {res.pareto_path}")
    if res.best is None:
        print("no trial met the constraint; no preset written")
        return 1
    print(f"preset {res.preset_path}: " + ", ".join(f"{k}={res.best[k]:.4g}" for k in SearchSpace().names)
          + f"; speedup {res.best['speedup_wall']:.3g}x wall, {res.best['speedup_passes']:.3g}x passes")
    return 0


__all__ = ["CalibrationResult", "DOMAINS", "PAPER_DEFAULTS", "QualityConstraint", "SearchSpace", "calibrate",
           "choose_best", "compare", "early_signals", "fast_shape_metrics", "main", "measure", "pareto_mask",
           "plot_pareto", "quality_metrics", "quantile_thresholds"]
