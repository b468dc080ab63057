"""Figures of the profiling tables (matplotlib / seaborn; callers pick the backend, e.g. Agg).

Every function takes a table from :mod:`fs3d_analysis.profile`, draws on ``ax`` (a new figure when
omitted) and returns the figure, so notebooks can ``fig.savefig("figures/01_....png")``.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

STAGE_ORDER = ("ss", "slat", "decode", "model")


def _ax(ax, size=(6, 3.5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=size, constrained_layout=True)
        return fig, ax
    return ax.figure, ax


def _stage_rows(latency: pd.DataFrame) -> pd.DataFrame:
    st = latency[latency["category"] == "stage"]
    if st.empty:  # a plain module: its root
        st = latency[latency["module"] == ""]
    order = [s for s in STAGE_ORDER if s in set(st["stage"])]
    return st.set_index("stage").loc[order].reset_index()


def plot_stage_share(latency: pd.DataFrame, ax=None, title: str | None = None):
    """Stacked bar of stage seconds with the share of the run written on each part."""
    st = _stage_rows(latency)
    fig, ax = _ax(ax, (7, 2.2))
    left = 0.0
    colors = sns.color_palette("deep", len(st))
    total = float(st["total_s"].sum())
    for (_, row), c in zip(st.iterrows(), colors):
        ax.barh([0], [row["total_s"]], left=left, color=c, label=row["stage"])
        ax.text(left + row["total_s"] / 2, 0, f"{row['stage']}\n{row['total_s']:.2f} s ({row['total_s'] / total:.0%})",
                ha="center", va="center", fontsize=8)
        left += row["total_s"]
    ax.set_yticks([])
    ax.set_xlabel(f"seconds per object ({latency.attrs.get('timer', '?')}, {latency.attrs.get('device', '?')})")
    ax.set_title(title or "Stage share of one run")
    return fig


def plot_top_modules(latency: pd.DataFrame, n: int = 15, by: str = "self_s", categories=None, ax=None):
    """The ``n`` modules with the largest ``by`` (default: self time, so parents do not hide their
    children), coloured by category. Stages and networks are left out unless asked for."""
    df = latency
    if categories is None:
        df = df[~df["category"].isin(["stage", "network"])]
    else:
        df = df[df["category"].isin(list(categories))]
    df = df.nlargest(n, by)
    fig, ax = _ax(ax, (7, 0.3 * len(df) + 1))
    sns.barplot(data=df, y="module", x=by, hue="category", dodge=False, ax=ax)
    ax.set_xlabel(f"{by} (seconds per run)")
    ax.set_ylabel("")
    ax.set_title(f"Top {len(df)} modules by {by}")
    return fig


def plot_flops_vs_time(roofline: pd.DataFrame, ax=None, min_flops: float = 1.0):
    """Scatter of FLOPs vs seconds per module (log-log) with lines of constant throughput at the
    matmul peak and at 10% / 1% of it."""
    df = roofline[(roofline["flops"] >= min_flops) & (roofline["total_s"] > 0)]
    df = df[~df["category"].isin(["stage"])]
    fig, ax = _ax(ax, (6.5, 4.5))
    sns.scatterplot(data=df, x="total_s", y="flops", hue="category", style="stage", ax=ax, s=40)
    ax.set_xscale("log")
    ax.set_yscale("log")
    peak = roofline.attrs.get("peak_flops_per_s")
    if peak and len(df):
        xs = np.logspace(np.log10(df["total_s"].min() / 2), np.log10(df["total_s"].max() * 2), 50)
        for frac, ls in ((1.0, "-"), (0.1, "--"), (0.01, ":")):
            ax.plot(xs, xs * peak * frac, ls, color="grey", lw=1, label=f"{frac:.0%} of matmul peak")
    ax.set_xlabel("seconds per run")
    ax.set_ylabel("FLOPs per run")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("FLOPs vs time per module")
    return fig


def plot_roofline(roofline: pd.DataFrame, ax=None, min_flops: float = 1.0):
    """Classic roofline: achieved FLOP/s vs arithmetic intensity (FLOPs / minimum bytes)."""
    df = roofline[(roofline["flops"] >= min_flops) & roofline["intensity"].notna()]
    df = df[~df["category"].isin(["stage"])]
    fig, ax = _ax(ax, (6.5, 4.5))
    sns.scatterplot(data=df, x="intensity", y="achieved_flops_per_s", hue="category", ax=ax, s=40)
    pf, bw = roofline.attrs.get("peak_flops_per_s"), roofline.attrs.get("bandwidth_bytes_per_s")
    if pf and bw and bw == bw and len(df):
        xs = np.logspace(np.log10(max(df["intensity"].min() / 4, 1e-3)), np.log10(df["intensity"].max() * 4), 100)
        ax.plot(xs, np.minimum(pf, xs * bw), color="k", lw=1.2, label="roof (measured)")
        ax.axvline(pf / bw, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / byte, lower bound of traffic)")
    ax.set_ylabel("achieved FLOP/s")
    ax.legend(fontsize=7)
    ax.set_title("Roofline per module")
    return fig


def plot_flops_vs_voxels(sweep: pd.DataFrame, targets: dict[str, float] | None = None, ax=None):
    """TFLOPs per object of each stage against the number of active voxels N (benchmark sweep:
    columns ``num_voxels``, ``stage``, ``tflops_per_object``), with horizontal target lines."""
    fig, ax = _ax(ax, (6.5, 4))
    sns.lineplot(data=sweep, x="num_voxels", y="tflops_per_object", hue="stage", marker="o", ax=ax)
    for name, val in (targets or {}).items():
        ax.axhline(val, ls="--", lw=1, color="grey")
        ax.text(ax.get_xlim()[0], val, f" {name}", va="bottom", fontsize=8)
    ax.set_xlabel("active voxels N")
    ax.set_ylabel("TFLOPs per object")
    ax.set_title("FLOPs vs sparse size")
    return fig


__all__ = ["plot_flops_vs_time", "plot_flops_vs_voxels", "plot_roofline", "plot_stage_share", "plot_top_modules"]
