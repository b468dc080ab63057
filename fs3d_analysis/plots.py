"""Seaborn figures of the observation notebooks, one function per figure, each taking the tidy
table that the matching helper of :mod:`fs3d_analysis.experiments` returns and returning the
matplotlib ``Figure`` (callers save it; nothing here writes files or calls ``plt.show``, except
:func:`reconstruction_gallery`, which also saves its figure when given a ``path``).

Profiling figures (notebook 01) live in :mod:`fs3d_analysis.profile.plots`.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

sns.set_theme(style="whitegrid", context="notebook")

ROLE_PALETTE = {"shape": "#1f77b4", "layout": "#d62728"}
MODALITY_LABELS = {"shape": "shape", "6drotation_normalized": "rotation (6D)", "scale": "scale",
                   "translation": "translation", "translation_scale": "translation scale"}


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: table lacks columns {missing}")
    if len(df) == 0:
        raise ValueError(f"{what}: empty table")


def _modality_palette(mods: Sequence[str]) -> dict[str, tuple]:
    layout = [m for m in mods if m != "shape"]
    reds = sns.color_palette("Reds_d", max(len(layout), 1))
    pal = {m: c for m, c in zip(layout, reds)}
    pal["shape"] = ROLE_PALETTE["shape"]
    return pal


# ---------------------------------------------------------------------------------------------
# 02 SS trajectories
# ---------------------------------------------------------------------------------------------


def _mark_steps(ax, marks: Sequence[int], label: str = "CFG on/off") -> None:
    for i, s in enumerate(marks):
        ax.axvline(s - 0.5, color="0.5", ls="--", lw=0.9, zorder=0, label=label if i == 0 else None)


def plot_ss_velocity_dynamics(dyn: pd.DataFrame, marks: Sequence[int] = (), title: str | None = None) -> Figure:
    """Per-modality velocity norm, relative first difference and cosine to the previous step over
    the SS sampler steps (:func:`~fs3d_analysis.experiments.ss_dynamics`); shape blue, layout red.
    Several runs/objects: median line with the inter-quartile band. ``marks``: steps where
    guidance switches (dashed; see :func:`~fs3d_analysis.experiments.cfg_switch_steps`)."""
    _need(dyn, ["step", "modality", "v_norm", "rel_dv", "cos_prev"], "plot_ss_velocity_dynamics")
    mods = sorted(dyn["modality"].unique(), key=lambda m: (m != "shape", m))
    pal = _modality_palette(mods)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, col, label in zip(axes, ("v_norm", "rel_dv", "cos_prev"),
                              ("||v_s||", "||v_s - v_(s-1)|| / ||v_(s-1)||", "cos(v_s, v_(s-1))")):
        sns.lineplot(data=dyn, x="step", y=col, hue="modality", hue_order=mods, palette=pal, ax=ax,
                     estimator="median", errorbar=("pi", 50), marker="o", markersize=3, legend=ax is axes[0])
        ax.set_ylabel(label)
        _mark_steps(ax, marks)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    if axes[0].get_legend() is not None:
        h, lab = axes[0].get_legend_handles_labels()
        axes[0].legend(h, [MODALITY_LABELS.get(x, x) for x in lab], fontsize=8)
    fig.suptitle(title or "SS sampler: shape vs layout velocity dynamics")
    fig.tight_layout()
    return fig


def plot_extrapolation_error_vs_k(err: pd.DataFrame, title: str | None = None) -> Figure:
    """Relative error of the extrapolated velocity against the true one (extrapolated steps only)
    vs the stride k, per modality, one panel per layout mode
    (:func:`~fs3d_analysis.experiments.extrapolation_error_table` or the per-step table)."""
    y = "rel_err_mean" if "rel_err_mean" in err.columns else "rel_err"
    _need(err, ["k", "mode", "modality", y], "plot_extrapolation_error_vs_k")
    if y == "rel_err" and "decision" in err.columns:
        err = err[err["decision"] == "extrapolated"]
    mods = sorted(err["modality"].unique(), key=lambda m: (m != "shape", m))
    modes = list(dict.fromkeys(err["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sns.lineplot(data=err[err["mode"] == mode], x="k", y=y, hue="modality", hue_order=mods,
                     palette=_modality_palette(mods), marker="o", ax=ax, errorbar=("pi", 50), legend=ax is axes[0][0])
        ax.set_yscale("log")
        ax.set_title(f"layout mode: {mode}" + (" (beta anchor)" if mode == "paper" else " (no anchor)"))
        ax.set_ylabel("||v_extrap - v_true|| / ||v_true||")
        ax.set_xticks(sorted(err["k"].unique()))
        if ax.get_legend() is not None:
            h, lab = ax.get_legend_handles_labels()
            ax.legend(h, [MODALITY_LABELS.get(x, x) for x in lab], fontsize=8)
    fig.suptitle(title or "SS modality cache: extrapolation error vs stride k")
    fig.tight_layout()
    return fig


def plot_pose_drift_vs_k(drift: pd.DataFrame, title: str | None = None) -> Figure:
    """Final layout of the cached run against the plain run vs k: rotation error (deg), relative
    translation error, and the occupancy IoU (shape); hue = layout mode (beta anchor or not)."""
    _need(drift, ["k", "mode", "rotation_error_deg", "translation_error_rel", "occupancy_iou"], "plot_pose_drift_vs_k")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, col, label in zip(axes, ("rotation_error_deg", "translation_error_rel", "occupancy_iou"),
                              ("rotation drift (deg)", "translation drift / |t|", "occupancy IoU vs base")):
        sns.lineplot(data=drift, x="k", y=col, hue="mode", style="mode", markers=True, ax=ax, errorbar=("pi", 50),
                     legend=ax is axes[0])
        ax.set_ylabel(label)
        ax.set_xticks(sorted(drift["k"].unique()))
        if col != "occupancy_iou":
            ax.axvspan(3.5, max(drift["k"].max(), 4) + 0.5, color="0.9", zorder=0)
    fig.suptitle(title or "Layout drift of the final pose vs k (shaded: k >= 4)")
    fig.tight_layout()
    return fig


def plot_ss_step_error(traj: pd.DataFrame, marks: Sequence[int] = (), title: str | None = None) -> Figure:
    """One cached SS run: per-step relative error of the velocity used against the true one (0 on
    computed steps), per modality (the interactive view of notebook 02)."""
    _need(traj, ["step", "modality", "rel_err", "decision"], "plot_ss_step_error")
    mods = sorted(traj["modality"].unique(), key=lambda m: (m != "shape", m))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.lineplot(data=traj, x="step", y="rel_err", hue="modality", hue_order=mods, palette=_modality_palette(mods),
                 marker="o", ax=ax)
    for s in traj.loc[traj["decision"] != "extrapolated", "step"].unique():
        ax.axvline(s, color="0.85", lw=0.8, zorder=0)
    _mark_steps(ax, marks)
    ax.set_ylabel("||v_used - v_true|| / ||v_true||")
    ax.set_title(title or "per-step velocity error (grey lines: full network steps)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 03 SLaT sparsity
# ---------------------------------------------------------------------------------------------


def densest_slice(tokens: pd.DataFrame, axis: str = "z") -> int:
    """The coordinate along ``axis`` holding the most tokens (for a 2D slice)."""
    return int(tokens.drop_duplicates("token")[axis].value_counts().idxmax())


def plot_update_slices(tokens: pd.DataFrame, steps: Sequence[int], keys: Sequence[str] = ("v_norm", "dv_norm"),
                       axis: str = "z", index: int | None = None, resolution: int | None = None,
                       title: str | None = None) -> Figure:
    """Per-token maps on one slice of the voxel grid (rows: ``keys``, columns: ``steps``); empty
    voxels blank. ``tokens``: :meth:`SLaTUpdateRecorder.tokens_frame` (one run). Each row shares
    one colour scale (per-step maxima differ, so this shows where, and when, updates happen)."""
    _need(tokens, ["step", "token", "x", "y", "z", *keys], "plot_update_slices")
    if axis not in ("x", "y", "z"):
        raise ValueError(f"axis must be x, y or z, got {axis!r}")
    index = densest_slice(tokens, axis) if index is None else index
    u, v = [a for a in ("x", "y", "z") if a != axis]
    res = resolution or int(tokens[["x", "y", "z"]].to_numpy().max()) + 1
    sl = tokens[tokens[axis] == index]
    if len(sl) == 0:
        raise ValueError(f"plot_update_slices: no tokens on the slice {axis} = {index}")
    # crop to the object's extent on this slice (+1 voxel), the rest of the grid is empty
    lo_u, hi_u = max(int(sl[u].min()) - 1, 0), min(int(sl[u].max()) + 2, res)
    lo_v, hi_v = max(int(sl[v].min()) - 1, 0), min(int(sl[v].max()) + 2, res)
    labels = {"v_norm": "M = |v|", "dv_norm": "A = |v_s - v_(s-1)|", "J": "J", "selected": "selected",
              "err_norm": "|v - v_true|"}
    fig, axes = plt.subplots(len(keys), len(steps), figsize=(2.3 * len(steps) + 1, 2.3 * len(keys) + 0.6),
                             squeeze=False)
    for r, key in enumerate(keys):
        vals = sl[sl["step"].isin(steps)][key].astype(float) if key in sl else pd.Series(dtype=float)
        vmax = float(np.nanpercentile(vals, 99)) if vals.notna().any() else 1.0
        im = None
        for c, step in enumerate(steps):
            ax = axes[r][c]
            g = sl[sl["step"] == step]
            img = np.full((res, res), np.nan)
            if key in g:
                img[g[u].to_numpy(), g[v].to_numpy()] = g[key].astype(float).to_numpy()
            im = ax.imshow(img[lo_u:hi_u, lo_v:hi_v].T, origin="lower", cmap="magma", vmin=0, vmax=vmax or 1.0,
                           interpolation="nearest", extent=(lo_u - 0.5, hi_u - 0.5, lo_v - 0.5, hi_v - 0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {step}", fontsize=9)
            if c == 0:
                ax.set_ylabel(labels.get(key, key), fontsize=9)
        if im is not None:
            fig.colorbar(im, ax=list(axes[r]), shrink=0.8, pad=0.01)
    fig.suptitle(title or f"SLaT per-token updates on the slice {axis} = {index}")
    return fig


def plot_update_scatter3d(tokens: pd.DataFrame, step: int, key: str = "dv_norm", title: str | None = None) -> Figure:
    """3D scatter of the tokens at one step coloured by ``key`` (largest drawn last, on top)."""
    _need(tokens, ["step", "x", "y", "z", key], "plot_update_scatter3d")
    g = tokens[tokens["step"] == step].sort_values(key)
    if len(g) == 0:
        raise ValueError(f"plot_update_scatter3d: no tokens at step {step}")
    fig = plt.figure(figsize=(6, 5.5))
    ax = fig.add_subplot(projection="3d")
    p = ax.scatter(g["x"], g["y"], g["z"], c=g[key], cmap="magma", s=6, depthshade=False)
    fig.colorbar(p, ax=ax, shrink=0.6, label=key)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("z")
    ax.set_title(title or f"step {step}: {key} per token")
    return fig


def plot_energy_concentration(conc: pd.DataFrame, title: str | None = None) -> Figure:
    """Share of tokens holding 50/80/90 % of the update energy per step, for M and A; the dotted
    lines are what uniform updates would give (token share = energy share)."""
    _need(conc, ["step", "key", "energy", "token_share"], "plot_energy_concentration")
    keys = list(dict.fromkeys(conc["key"]))
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        d = conc[conc["key"] == key]
        sns.lineplot(data=d, x="step", y="token_share", hue="energy", palette="viridis", marker="o", ax=ax,
                     legend="full")
        for e in d["energy"].unique():
            ax.axhline(e, ls=":", color="0.6", lw=0.8)
        ax.set_title({"v_norm": "M = |v|", "dv_norm": "A = |v_s - v_(s-1)|"}.get(key, key))
        ax.set_ylabel("share of tokens")
        ax.set_ylim(0, 1)
    fig.suptitle(title or "How concentrated are the SLaT updates? (fewer tokens = sparser)")
    fig.tight_layout()
    return fig


def plot_saliency_ranking(rank: pd.DataFrame, title: str | None = None) -> Figure:
    """Spearman correlation of each saliency signal with the next-step update, and top-K recall,
    per step (:func:`~fs3d_analysis.experiments.saliency_ranking`)."""
    _need(rank, ["step", "signal", "spearman", "topk_recall"], "plot_saliency_ranking")
    order = [s for s in ("J", "M", "A", "S_freq", "random") if s in set(rank["signal"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, col in zip(axes, ("spearman", "topk_recall")):
        sns.lineplot(data=rank, x="step", y=col, hue="signal", hue_order=order, marker="o", ax=ax,
                     legend=ax is axes[0])
    top = float(rank["top"].iloc[0]) if "top" in rank else None
    axes[0].axhline(0, color="0.5", lw=0.8)
    axes[0].set_ylabel("Spearman(signal, |v_s - v_(s-1)|)")
    axes[1].set_ylabel(f"top-{top:.0%} recall" if top else "top-K recall")
    if top:
        axes[1].axhline(top, ls=":", color="0.5", lw=0.8)
    fig.suptitle(title or "Does the saliency J rank the tokens that change next?")
    fig.tight_layout()
    return fig


def plot_topk_tradeoff(topk: pd.DataFrame, title: str | None = None) -> Figure:
    """Carving alone at each keep fraction: structured-latent error, mesh agreement with the base
    (F1 and Chamfer, if measured) and SLaT time relative to the base (CPU or GPU wall time)."""
    _need(topk, ["keep", "slat_rel_err", "time_slat"], "plot_topk_tradeoff")
    panels = [("slat_rel_err", "SLaT latent rel. error vs base")]
    if "f_score" in topk:
        panels += [("f_score", "F1@0.05 vs base mesh (%)"), ("chamfer", "Chamfer vs base mesh")]
    d = topk.copy()
    if "time_slat_base" in d:
        d["slat_time_ratio"] = d["time_slat"] / d["time_slat_base"]
        panels.append(("slat_time_ratio", "SLaT time / base"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels):
        sns.lineplot(data=d, x="keep", y=col, marker="o", ax=ax, errorbar=("pi", 50))
        ax.set_ylabel(label)
        ax.set_xlabel("keep (fraction of tokens recomputed)")
    fig.suptitle(title or "Token carving: choice of top-K")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 04 HFER and mesh aggregation
# ---------------------------------------------------------------------------------------------


def plot_hfer_distribution(hfer: pd.DataFrame, columns: Sequence[str] = ("hfer_2d", "hfer_3d", "score"),
                           tau: tuple[float, float] | None = (0.5, 0.7), title: str | None = None) -> Figure:
    """Per-object HFER values (2D mask, 3D voxels, joint score), one strip per signal, objects
    labelled; the aggregation thresholds tau_low / tau_high drawn on the joint score."""
    cols = [c for c in columns if c in hfer.columns]
    _need(hfer, ["object", *cols], "plot_hfer_distribution")
    long = hfer.melt(id_vars=["object"], value_vars=cols, var_name="signal", value_name="HFER")
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cols) + 3), 4.2))
    sns.stripplot(data=long, x="signal", y="HFER", hue="object", size=8, jitter=0.15, ax=ax)
    if tau is not None and "score" in cols:
        i = cols.index("score")
        for t, ls in zip(tau, ("--", "-.")):
            ax.hlines(t, i - 0.4, i + 0.4, colors="k", linestyles=ls, lw=1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title or "HFER per object (dashed: tau_low, tau_high on the joint score)")
    fig.tight_layout()
    return fig


def plot_hfer_vs_complexity(hfer: pd.DataFrame, x: str = "surface_voxels",
                            ys: Sequence[str] = ("hfer_2d_gt", "hfer_3d_gt"), hue: str | None = "source",
                            title: str | None = None) -> Figure:
    """HFER (one panel per column in ``ys``) against a complexity measure of the GT mesh, with the
    Spearman correlation in each panel title."""
    from scipy.stats import spearmanr

    ys = [y for y in ys if y in hfer.columns]
    _need(hfer, [x, *ys], "plot_hfer_vs_complexity")
    hue = hue if hue and hue in hfer.columns else None
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4.2), squeeze=False)
    for ax, y in zip(axes[0], ys):
        d = hfer[[x, y] + ([hue] if hue else [])].dropna()
        sns.scatterplot(data=d, x=x, y=y, hue=hue, ax=ax, s=45, legend=ax is axes[0][0])
        if len(d) >= 3:
            sns.regplot(data=d, x=x, y=y, scatter=False, ax=ax, color="0.3", line_kws={"lw": 1})
            rho = spearmanr(d[x], d[y]).statistic
            ax.set_title(f"{y}: Spearman rho = {rho:.2f} (n = {len(d)})", fontsize=10)
        if "object" in hfer.columns and len(d) <= 12:
            for _, r in hfer.loc[d.index].iterrows():
                ax.annotate(str(r["object"]).split("_", 1)[-1][:12], (r[x], r[y]), fontsize=7, alpha=0.8)
    fig.suptitle(title or f"HFER vs object complexity ({x})")
    fig.tight_layout()
    return fig


def plot_detail_loss(detail: pd.DataFrame, metrics: Sequence[str] = ("f_score", "chamfer"),
                     title: str | None = None) -> Figure:
    """Per object: agreement of the aggregated decode with the un-aggregated one (one panel per
    metric) for adaptive vs uniform merging (the chosen S written on the adaptive bars), and the
    share of decoder tokens kept."""
    _need(detail, ["object", "variant", "S", "tokens_before", "tokens_after", *metrics], "plot_detail_loss")
    d = detail.copy()
    d["tokens_kept"] = d["tokens_after"] / d["tokens_before"]
    objects = list(dict.fromkeys(d["object"]))
    variants = list(dict.fromkeys(d["variant"]))
    labels = {"f_score": "F1@0.05 vs base mesh (%)", "chamfer": "Chamfer vs base mesh",
              "tokens_kept": "decoder tokens kept"}
    cols = [*metrics, "tokens_kept"]
    fig, axes = plt.subplots(1, len(cols), figsize=(min(6.5, 0.9 * len(objects) + 2.5) * len(cols), 4.4), squeeze=False)
    for i, (ax, col) in enumerate(zip(axes[0], cols)):
        sns.barplot(data=d, x="object", y=col, hue="variant", order=objects, hue_order=variants, ax=ax, legend=i == 0)
        ax.set_ylabel(labels.get(col, col))
        if col == "f_score":
            lo = float(np.nanmin(d[col])) if d[col].notna().any() else 0.0
            ax.set_ylim(max(0.0, lo - 5), 100.5)
        for cont, var in zip(ax.containers, variants):
            if var == "adaptive" and i == 0:
                s_vals = d[d["variant"] == var].set_index("object").reindex(objects)["S"]
                ax.bar_label(cont, labels=[f"S={v:g}" for v in s_vals], fontsize=7, padding=2)
        ax.tick_params(axis="x", rotation=30)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    if axes[0][0].get_legend() is not None:
        axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title or "Detail loss: adaptive (HFER) vs uniform token aggregation")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 05 methods
# ---------------------------------------------------------------------------------------------


def plot_speed_quality(summary: pd.DataFrame, quality: str = "f_score", speed: str = "speedup",
                       title: str | None = None, time_note: str = "") -> Figure:
    """Speed-up over the base against a quality metric, one point per method
    (:func:`fs3d_analysis.eval.summarize`); ablation rows (``ablation:*``) as hollow squares."""
    _need(summary, ["method", speed, quality], "plot_speed_quality")
    d = summary.copy()
    d["kind"] = np.where(d["method"].str.startswith("ablation:"), "ablation", "method")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    meth = d[d["kind"] == "method"]
    sns.scatterplot(data=meth, x=speed, y=quality, hue="method", s=90, ax=ax, legend=False)
    abl = d[d["kind"] == "ablation"]
    if len(abl):
        ax.scatter(abl[speed], abl[quality], marker="s", facecolors="none", edgecolors="0.3", s=60, label="ablation")
        ax.legend(fontsize=8, loc="best")
    for _, r in d.iterrows():
        ax.annotate(str(r["method"]).removeprefix("ablation:"), (r[speed], r[quality]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points", color="0.35" if r["kind"] == "ablation" else "k")
    ax.axvline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel(f"speed-up over base ({time_note or 'wall time'})")
    ax.set_ylabel({"f_score": "F1@0.05 (%)", "chamfer": "Chamfer distance"}.get(quality, quality))
    ax.set_title(title or "Speed vs quality")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# 06 reconstructions
# ---------------------------------------------------------------------------------------------

GALLERY_COLORS = {"pred": np.array([0.90, 0.55, 0.20]), "gt": np.array([0.45, 0.62, 0.85])}


def _sample_camera(sample):
    """The sample's pinhole camera: ``sample.camera`` if it has one, else built from
    ``sample.intrinsics`` and the image size."""
    from fs3d_analysis.data.render import Camera

    cam = getattr(sample, "camera", None)
    if isinstance(cam, Camera):
        return cam
    k = getattr(sample, "intrinsics", None)
    if k is None:
        raise ValueError(f"reconstruction_gallery: sample {getattr(sample, 'name', '?')!r} has neither a camera "
                         "nor intrinsics; the reconstruction cannot be rendered from the input view")
    k = np.asarray(k, dtype=np.float64)
    h, w = np.asarray(sample.image).shape[:2]
    return Camera(int(w), int(h), float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]))


def _posed_trimesh(result):
    """Camera-frame trimesh of a pipeline ``Result`` (its posed mesh), an ``fs3d_accel`` ``Mesh`` or a
    trimesh; None for a failed run (None / exception / empty mesh)."""
    import trimesh

    if result is None or isinstance(result, BaseException):
        return None
    mesh = getattr(result, "posed_mesh", result)
    if not isinstance(mesh, trimesh.Trimesh):
        mesh = trimesh.Trimesh(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), process=False)
    return mesh if len(mesh.faces) else None


def _render_view(mesh, camera, color, scale: int, near: float = 1e-3):
    """(H*scale, W*scale, 3) uint8 render of a camera-frame mesh through ``camera`` (white
    background) and its hit mask, with :func:`fs3d_analysis.data.render.render`; faces reaching
    closer than ``near`` to the camera plane are dropped."""
    from fs3d_analysis.data.layout import Layout
    from fs3d_analysis.data.render import Camera, Lighting, SceneObject, render

    cam = Camera(camera.width * scale, camera.height * scale, camera.fx * scale, camera.fy * scale,
                 camera.cx * scale, camera.cy * scale)
    light = Lighting(direction=np.array([-0.35, -0.45, 1.0]) / np.linalg.norm([-0.35, -0.45, 1.0]),
                     ambient=0.3, diffuse=0.7, background=(np.ones(3), np.ones(3)))
    import trimesh

    v, f = np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces)
    front = (v[f][..., 2] > near).all(axis=1)  # near-plane culling: the renderer needs z > 0
    if not front.any():
        raise ValueError("the mesh lies entirely behind the camera")
    used, faces = np.unique(f[front], return_inverse=True)
    mesh = trimesh.Trimesh(v[used], faces.reshape(-1, 3), process=False)
    r = render([SceneObject("mesh", mesh, Layout(np.eye(3), np.zeros(3), np.ones(3)), color)], cam, light)
    return r.rgb, r.instance >= 0


def _crop_box(boxes: Sequence[tuple[float, float, float, float]], w: int, h: int, pad: float = 0.25):
    """Square (x0, x1, y0, y1) around the union of pixel boxes, padded, kept inside the image."""
    x0 = min(b[0] for b in boxes); x1 = max(b[1] for b in boxes)  # noqa: E702
    y0 = min(b[2] for b in boxes); y1 = max(b[3] for b in boxes)  # noqa: E702
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * pad), float(max(w, h)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx, sy = min(side, w), min(side, h)
    lo_x = float(np.clip(cx - sx / 2, 0, w - sx))
    lo_y = float(np.clip(cy - sy / 2, 0, h - sy))
    return lo_x, lo_x + sx, lo_y, lo_y + sy


def _hit_box(hit: np.ndarray, scale: int):
    ys, xs = np.nonzero(hit)
    if len(xs) == 0:
        return None
    return xs.min() / scale, (xs.max() + 1) / scale, ys.min() / scale, (ys.max() + 1) / scale


def _metric_text(m) -> str:
    if not m:
        return ""
    f1 = m.get("f1_posed", m.get("f_score"))
    viou = m.get("viou_posed", m.get("volume_iou"))
    parts = []
    if f1 is not None and np.isfinite(f1):
        parts.append(f"F1 {f1:.1f}")
    if viou is not None and np.isfinite(viou):
        parts.append(f"vIoU {viou:.2f}")
    return " · ".join(parts)


def reconstruction_gallery(samples: Sequence, results: Sequence, path=None, metrics: Sequence | None = None,
                           show_gt: bool = True, ncols: int = 2, render_scale: int = 2, crop: bool = True,
                           notes: Sequence[str] | None = None, n_points: int = 4000, panel_in: float = 2.3,
                           dpi: int = 110, title: str | None = None) -> Figure:
    """Inputs beside their reconstructions: per object the input image with the mask outline
    (green), the reconstructed *posed* mesh rendered from the input camera (orange; the mask outline
    dashed on top, to judge placement) and, if ``show_gt`` and the sample has ``posed_mesh()``, the
    ground-truth mesh from the same camera (blue). ``ncols`` objects per figure row.

    ``samples``: objects with ``image``, ``mask``, ``name`` and ``camera`` or ``intrinsics`` (e.g.
    :class:`fs3d_analysis.data.Sample`); ``results``: per sample a pipeline ``Result``, a ``Mesh`` /
    trimesh in the camera frame, or None / an exception for a failed run (drawn as such).
    ``metrics``: per sample a dict with ``f1_posed``/``viou_posed`` (or ``f_score``/``volume_iou``);
    if None they are computed here for samples with a GT: F1@0.05 and vIoU with
    :func:`fs3d_analysis.metrics.shape_metrics` (``mode="gt"``, ``n_points`` surface points: the
    posed metrics of the model card). ``notes``: an extra line per object (e.g. run time). Renders use
    :func:`fs3d_analysis.data.render.render` at ``render_scale`` x the input resolution; ``crop``
    zooms every panel of an object onto the same square around its mask and renders.

    The figure is ``(ncols * panels * panel_in) x (rows * (panel_in + 0.55) + 0.5)`` inches; it is
    saved at ``dpi`` to ``path`` when given (no tight bbox, so the PNG size is that times ``dpi``)."""
    samples, results = list(samples), list(results)
    if len(samples) == 0:
        raise ValueError("reconstruction_gallery: no samples")
    if len(results) != len(samples):
        raise ValueError(f"reconstruction_gallery: {len(samples)} samples but {len(results)} results")
    if metrics is not None and len(metrics) != len(samples):
        raise ValueError(f"reconstruction_gallery: {len(samples)} samples but {len(metrics)} metric rows")
    if notes is not None and len(notes) != len(samples):
        raise ValueError(f"reconstruction_gallery: {len(samples)} samples but {len(notes)} notes")
    if ncols < 1 or render_scale < 1:
        raise ValueError("reconstruction_gallery: ncols and render_scale must be >= 1")
    has_gt = [callable(getattr(s, "posed_mesh", None)) for s in samples]
    show_gt = bool(show_gt and any(has_gt))
    panels = 3 if show_gt else 2
    ncols = min(ncols, len(samples))
    nrows = -(-len(samples) // ncols)
    fig, axes = plt.subplots(nrows, ncols * panels, squeeze=False,
                             figsize=(ncols * panels * panel_in, nrows * (panel_in + 0.55) + 0.5))
    for ax in axes.flat:
        ax.set_axis_off()

    for i, (sample, result) in enumerate(zip(samples, results)):
        r, c0 = divmod(i, ncols)
        row_axes = axes[r][c0 * panels: (c0 + 1) * panels]
        name = str(getattr(sample, "name", f"object {i}"))
        image, mask = np.asarray(sample.image), np.asarray(sample.mask, dtype=bool)
        h, w = mask.shape
        camera = _sample_camera(sample)
        if (camera.width, camera.height) != (w, h):
            raise ValueError(f"reconstruction_gallery: {name}: camera {camera.width}x{camera.height} != image {w}x{h}")
        ext = (0, w, h, 0)
        boxes = []
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes.append((xs.min(), xs.max() + 1, ys.min(), ys.max() + 1))

        pred = _posed_trimesh(result)
        gt = sample.posed_mesh() if show_gt and has_gt[i] else None
        views = {}
        for key, mesh in (("pred", pred), ("gt", gt)):
            if mesh is None:
                continue
            try:
                views[key] = _render_view(mesh, camera, GALLERY_COLORS[key], render_scale)
            except ValueError as exc:  # e.g. a prediction reaching behind the camera
                views[key] = exc
                continue
            b = _hit_box(views[key][1], render_scale)
            if b is not None:
                boxes.append(b)
        m = metrics[i] if metrics is not None else None
        if m is None and pred is not None and gt is not None:
            from fs3d_analysis.metrics import shape_metrics
            m = shape_metrics(pred, gt, mode="gt", n_points=n_points).as_dict()
        if m is None and pred is None and gt is not None:
            m = {"f_score": 0.0, "volume_iou": 0.0}  # a failed run scores 0, as in the model card

        box = _crop_box(boxes, w, h) if crop and boxes else (0, w, 0, h)
        xx, yy = np.arange(w) + 0.5, np.arange(h) + 0.5

        ax = row_axes[0]
        ax.imshow(image, extent=ext, interpolation="nearest")
        if mask.any():
            ax.contour(xx, yy, mask.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        ax.set_title(name if notes is None else f"{name}\n{notes[i]}", fontsize=8)

        for ax, key, label in zip(row_axes[1:], ("pred", "gt"), ("reconstruction", "ground truth")):
            v = views.get(key)
            if isinstance(v, tuple):
                ax.imshow(v[0], extent=ext, interpolation="bilinear")
                if mask.any():
                    ax.contour(xx, yy, mask.astype(float), levels=[0.5], colors="k", linewidths=0.7,
                               linestyles="--", alpha=0.6)
            else:
                ax.imshow(np.ones((h, w, 3)), extent=ext)
                why = ("no mesh (run failed)" if key == "pred" else "no GT") if v is None else f"not rendered:\n{v}"
                ax.text(w / 2, h / 2, why, ha="center", va="center", fontsize=7, color="0.3", wrap=True)
            if key == "pred":
                mt = _metric_text(m)
                ax.set_title(f"{label}\n{mt} (posed)" if mt else label, fontsize=8)
            else:
                ax.set_title(label, fontsize=8)

        for ax in row_axes:
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(box[0], box[1])
            ax.set_ylim(box[3], box[2])
            ax.set_aspect("equal")
            ax.grid(False)
    fig.suptitle(title or "Inputs (mask outlined) and reconstructions rendered from the input camera", wrap=True)
    fig.tight_layout()
    if path is not None:
        from pathlib import Path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


__all__ = [
    "densest_slice", "plot_detail_loss", "plot_energy_concentration", "plot_extrapolation_error_vs_k",
    "plot_hfer_distribution", "plot_hfer_vs_complexity", "plot_pose_drift_vs_k", "plot_saliency_ranking",
    "plot_speed_quality", "plot_ss_step_error", "plot_ss_velocity_dynamics", "plot_topk_tradeoff",
    "plot_update_scatter3d", "plot_update_slices", "reconstruction_gallery",
]
