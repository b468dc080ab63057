"""Evaluation harness: run methods over a dataset and write one tidy table.

One row per (object, method, setting) with the paper's metrics (CD, F1@0.05, vIoU, 3D-IoU, rotation /
translation error), per-stage and object time, and what the accelerator decided (network passes per
stage, mean active token fraction, aggregation factor S). Rows are appended to
``<out>/results.csv`` as they finish, so an interrupted run resumes where it stopped.

Shape metrics compare the predicted mesh and the ground-truth mesh in the object frame, each
normalised to its bounding box (centre 0, longest side 1; ``shape_metrics(mode="independent")``);
layout metrics compare the predicted camera-frame pose with the ground truth (3D IoU of the posed
unit cubes, geodesic rotation error, translation error in point-map units).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from fs3d_accel.pipeline import Pipeline, Result
from fs3d_accel.seams import Accelerator, StepEvent

KEY = ["object", "method", "setting"]
METRICS = ["chamfer", "f_score", "volume_iou", "box_iou_3d", "rotation_error_deg", "translation_error"]
#: what ``run_one`` measures besides the metrics (failed runs leave these empty)
RUN_COLUMNS = ["time_total", "time_ss", "time_slat", "time_decode", "ss_steps_computed", "ss_steps",
               "ss_mean_active", "slat_steps_computed", "slat_steps", "slat_mean_active", "n_voxels",
               "n_slat_tokens", "n_decoder_tokens", "aggregation_S"]
#: column order of a new ``results.csv``
COLUMNS = KEY + METRICS + RUN_COLUMNS + ["error", "device", "config", "seed"]


def append_row(csv: Path, row: Mapping) -> None:
    """Append one row to ``results.csv`` in the file's own column order (``COLUMNS`` for a new file).

    Rows of failed runs lack the run columns: aligning by name keeps every value under its column
    (appending a shorter row as-is would shift values). A field the file has no column for raises,
    rather than being dropped.
    """
    csv = Path(csv)
    new = not (csv.is_file() and csv.stat().st_size)
    if new:
        header = COLUMNS + [k for k in row if k not in COLUMNS]
    else:
        with csv.open() as f:
            header = f.readline().rstrip("\n").split(",")
        extra = [k for k in row if k not in header]
        if extra:
            raise ValueError(f"{csv}: the row has columns {extra} that the file lacks; use another out_dir")
    pd.DataFrame([dict(row)]).reindex(columns=header).to_csv(csv, mode="a", header=new, index=False)


@dataclass
class DecisionCounter:
    """Counts network passes and token fractions per stage from StepEvents."""

    computed: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    active: dict[str, list[float]] = field(default_factory=dict)

    def __call__(self, event) -> None:
        if not isinstance(event, StepEvent):
            return
        s = event.stage
        self.steps[s] = self.steps.get(s, 0) + 1
        if event.decision in ("computed", "carved"):
            self.computed[s] = self.computed.get(s, 0) + 1
        self.active.setdefault(s, []).append(event.active_fraction)

    def as_row(self) -> dict[str, float]:
        row = {}
        for s in ("ss", "slat"):
            row[f"{s}_steps_computed"] = self.computed.get(s, 0)
            row[f"{s}_steps"] = self.steps.get(s, 0)
            fr = self.active.get(s, [])
            row[f"{s}_mean_active"] = float(np.mean(fr)) if fr else float("nan")
        return row


def score(result: Result, sample) -> dict[str, float]:
    """Shape and layout metrics of one result against a dataset sample."""
    from fs3d_analysis.metrics import layout_metrics, shape_metrics

    pred = result.mesh.to_trimesh()
    if len(pred.faces) == 0:
        return {m: float("nan") for m in METRICS}
    sm = shape_metrics(pred, sample.mesh, mode="independent").as_dict()
    try:
        lm = layout_metrics(result.layout, sample.layout)
    except ValueError as exc:  # e.g. a degenerate pose: report, do not drop the row
        lm = {"box_iou_3d": float("nan"), "rotation_error_deg": float("nan"),
              "translation_error": float("nan"), "error": str(exc)}
    return {**sm, **{k: lm[k] for k in ("box_iou_3d", "rotation_error_deg", "translation_error")}}


def failed_scores() -> dict[str, float]:
    """Metrics of a run that produced no mesh: F1, vIoU and box IoU 0; distances undefined."""
    return {"chamfer": float("nan"), "f_score": 0.0, "volume_iou": 0.0, "box_iou_3d": 0.0,
            "rotation_error_deg": float("nan"), "translation_error": float("nan")}


def run_one(pipe: Pipeline, sample, accel: Accelerator | None, seed: int) -> tuple[Result, dict]:
    """Run one object with one accelerator; returns the result and its table row (without keys)."""
    counter = DecisionCounter()
    pipe.with_accel(accel)
    try:
        with pipe.events.listening(counter):
            t0 = time.perf_counter()
            result = pipe(sample.image, sample.mask, pointmap=sample.pointmap, seed=seed)
            total = time.perf_counter() - t0
    finally:
        pipe.with_accel(None)
    row = {"time_total": total, **{f"time_{k}": v for k, v in result.timings.items()}, **counter.as_row(),
           "n_voxels": int(result.ss.coords.shape[0]), "n_slat_tokens": int(result.slat.coords.shape[0]),
           "n_decoder_tokens": result.decode.num_tokens,
           "aggregation_S": float(result.slat.coords_state.scale * result.decode.decoder_state.scale)}
    return result, row


def evaluate(pipe: Pipeline, samples: Sequence, methods: Mapping[str, Callable[[], Accelerator | None]],
             out_dir: str | Path, seed: int = 0, setting: str = "default", progress: bool = True,
             on_result: Callable[[str, object, Result], None] | None = None) -> pd.DataFrame:
    """Evaluate every method on every sample; resumable through ``<out_dir>/results.csv``.

    ``methods`` maps a method name to a factory returning a fresh :class:`Accelerator` (``None`` =
    plain pipeline). Returns the full table (previous rows included).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    done = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=KEY)
    finished = set(map(tuple, done[KEY].astype(str).values.tolist())) if len(done) else set()
    todo = [(s, m) for s in samples for m in methods if (s.name, m, setting) not in finished]
    for sample, method in tqdm(todo, desc=f"eval {setting}", disable=not progress):
        accel = methods[method]()  # bad method settings raise here, before any run
        try:
            result, row = run_one(pipe, sample, accel, seed)
        except ValueError as exc:
            # e.g. the SS stage found no occupied voxel (thin objects on a weak model): a failed
            # reconstruction scores 0 (not NaN, which would silently drop it from the means)
            row = {"object": sample.name, "method": method, "setting": setting, **failed_scores(),
                   "error": f"{type(exc).__name__}: {exc}", "device": str(pipe.device),
                   "config": pipe.config.name, "seed": seed}
            append_row(csv, row)
            continue
        row = {"object": sample.name, "method": method, "setting": setting, **score(result, sample), **row,
               "error": "", "device": str(pipe.device), "config": pipe.config.name, "seed": seed}
        append_row(csv, row)
        if on_result is not None:
            on_result(method, sample, result)
    return pd.read_csv(csv)


def summarize(table: pd.DataFrame, base: str = "base") -> pd.DataFrame:
    """Paper-style table: mean metrics per method/setting, object time and speedup over ``base``."""
    cols = [c for c in METRICS + ["time_ss", "time_slat", "time_decode", "time_total",
                                  "ss_steps_computed", "slat_steps_computed", "slat_mean_active", "aggregation_S"]
            if c in table]
    g = table.groupby(["method", "setting"], sort=False)[cols].mean()
    if base in table["method"].values:
        base_time = table[table.method == base].groupby("object")["time_total"].mean()
        per = table.assign(speedup=table["object"].map(base_time) / table["time_total"])
        g["speedup"] = per.groupby(["method", "setting"], sort=False)["speedup"].mean()
    g["objects"] = table.groupby(["method", "setting"], sort=False)["object"].nunique()
    return g.reset_index()


def load_dataset(name: str, limit: int | None = None):
    """``shipped`` (samples inside the package), ``ycb`` (rendered from the corpus' eval split), or the
    path of a folder of samples in the shipped format (``samples.npz`` + ``meshes.npz``, e.g.
    ``benchmarks/data/ycb_scale/objects``)."""
    from pathlib import Path

    from fs3d_analysis.data import load_shipped_samples
    if name == "shipped":
        samples = list(load_shipped_samples())
    elif name == "ycb":
        from fs3d_analysis.data.corpus import load_manifest
        from fs3d_analysis.data.dataset import RenderedDataset
        samples = list(RenderedDataset.from_corpus(load_manifest(), "eval"))
    elif (Path(name) / "samples.npz").is_file():
        samples = list(load_shipped_samples(name))
    else:
        raise ValueError(f"unknown dataset {name!r}; use 'shipped', 'ycb' or a folder holding samples.npz "
                         f"and meshes.npz")
    return samples[:limit] if limit else samples


def main(args) -> int:
    """``fs3d eval`` entry point. ``--methods`` takes registered names and ``preset:PATH`` files."""
    from fs3d_accel.accel.presets import method_factory
    from fs3d_accel.cli import _load_pipeline

    from fs3d_analysis.distributed import check_ray_args

    use_ray, _ = check_ray_args(args)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    samples = load_dataset(args.dataset, args.limit)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise SystemExit(f"--methods names no method: {args.methods!r}")
    # an unknown name or a bad preset file fails here, before any model is loaded or run
    methods = {m: method_factory(m) for m in names}
    if use_ray:  # --ray: pairs spread over Ray actors (fs3d_analysis.distributed)
        from fs3d_analysis.distributed import eval_main as ray_eval_main
        table = ray_eval_main(args, samples, methods)
    else:
        table = evaluate(_load_pipeline(args), samples, methods, args.out, seed=args.seed)
    summary = summarize(table)
    summary.to_csv(Path(args.out) / "summary.csv", index=False)
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return 0


PAPER_METHODS = ("base", "fast-sam3d", "fast-sam3d-released", "taylorseer", "easycache", "random-drop",
                 "uniform-merge", "fast3dcache")


def method_factories(names: Iterable[str] = PAPER_METHODS) -> dict[str, Callable[[], Accelerator]]:
    """Name -> factory for the registry's methods or ``preset:PATH`` files (fresh accelerator per object)."""
    from fs3d_accel.accel.presets import method_factory
    return {n: method_factory(n) for n in names}


def ablation_factories() -> dict[str, Callable[[], Accelerator]]:
    """The paper's 8-row ablation: every subset of {SS cache, SLaT carving+cache, mesh aggregation}."""
    from itertools import product

    from fs3d_accel.accel import make_method

    out: dict[str, Callable[[], Accelerator]] = {}
    for ss, slat, mesh in product((False, True), repeat=3):
        name = "ablation[" + ",".join(n for n, on in (("SS", ss), ("SLaT", slat), ("Mesh", mesh)) if on) + "]"
        if not (ss or slat or mesh):
            name = "ablation[none]"
        off = {k: None for k, on in (("ss", ss), ("slat", slat), ("mesh", mesh)) if not on}
        out[name] = (lambda off=off: make_method("fast-sam3d", **off))
    return out
