# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Trying a new heterogeneity signal
#
# Fast-SAM3D's SLaT carving ranks tokens by J = 1/2 (M + gamma A) + 1/2 S_freq: the last update's
# magnitude M, its abrupt change A and a geometric term S_freq (the 3D-FFT high-pass intensity of the
# coarse voxels at the token). The signals are pluggable (`fs3d_accel.accel.signals`): a registered
# signal is used by name, `SLaTTokenCarving(signals={"M": 0.5, "A": 0.5, "NV": 0.5})`, without
# touching the policy.
#
# **New signal (beyond the paper): NV, normal variation of the occupancy surface.** Smooth the
# binary occupancy, take unit normals from its gradient, and score each voxel by
# 1 - |mean of the normals in its 3x3x3 neighbourhood|: 0 on flat faces, large at edges, corners and
# thin parts. It is a local curvature proxy with no global frequency cut-off.
#
# **Questions.** (1) Does NV rank tokens by their *true next-step update* ||v_s - v_{s-1}|| better
# than S_freq? (Spearman rank correlation per step, from the plain trajectory.) (2) At equal keep
# ratio, does carving with NV in place of S_freq lose less quality against the plain pipeline?
#
# Measured on `load_pipeline()` (shipped `sam3d-mini`; `FS3D_ALLOW_RANDOM=1` for development only).
# `FS3D_QUICK=1` shrinks the run (the 2 smallest objects, banana and bleach cleanser; keep 0.2; 8 SLaT steps; one
# thread).
#
# **What our run shows** (shipped `sam3d-mini` run-3 weights, full size: 6 objects, keep 0.1 / 0.2 /
# 0.4, 25 SLaT steps, one CPU thread, 5.5 min; the numbers in the text below are from that run, the
# printed tables are the measurement of *your* run): NV does **not** beat S_freq. Neither geometric
# term ranks the next update (Spearman NV -0.03, S_freq -0.06), and carving with NV in J loses more
# of the plain trajectory than the paper's J at keep 0.1 and 0.2.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from fs3d_accel.accel import SLaTTokenCarving, available_signals
from fs3d_accel.accel.signals import PAPER_WEIGHTS, TokenInputs, token_signal_values
from fs3d_accel.seams import Accelerator, StepEvent
from fs3d_analysis.calibrate import quality_metrics
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.notebook_utils import QUICK_OBJECTS, apply_run_size, banner, figures_dir, load_pipeline, pick, show

pd.set_option("display.width", 160)
pd.set_option("display.precision", 4)
FIG = figures_dir()
pipe = apply_run_size(load_pipeline())
print(banner(pipe))
shipped = list(load_shipped_samples())
samples = pick(shipped[:6], [s for s in shipped if s.name in QUICK_OBJECTS])
KEEPS = pick((0.1, 0.2, 0.4), (0.2,))
print("objects:", [s.name for s in samples], "| keep ratios:", KEEPS)
print({lvl: available_signals(lvl) for lvl in ("token", "step", "instance")})

# %% [markdown]
# ## 1. Signals against the true next-step update
# One plain run per object; a listener keeps the SLaT velocities. At step s >= 2 every token signal
# is computed from what a policy would know before the pass (v_{s-1}, v_{s-2}, the voxels) and
# rank-correlated with the true update ||v_s - v_{s-1}||. `J paper` is the paper's combination,
# `J NV` the same with NV in place of S_freq.

# %%
SIGNALS = {"M": {"M": 1.0}, "A": {"A": 1.0}, "S_freq": {"S_freq": 1.0}, "NV": {"NV": 1.0},
           "J paper": PAPER_WEIGHTS, "J NV": {"M": 0.5, "A": 0.5, "NV": 0.5}}


def combined(weights, inputs, cache):
    from fs3d_accel.accel.spectral import minmax
    return sum(w * minmax(token_signal_values(n, inputs, cache), 1e-6) for n, w in weights.items())


base_results, rows = {}, []
for s in samples:
    vs, extras = [], {}

    def keep_v(e, vs=vs, extras=extras):
        if isinstance(e, StepEvent) and e.stage == "slat":
            vs.append(e.v.detach().double().cpu())
            extras.update(e.extras)

    with pipe.events.listening(keep_v):
        pipe.with_accel(None)
        base_results[s.name] = pipe(s.image, s.mask, pointmap=s.pointmap, seed=0)
    cache = {}
    for step in range(2, len(vs)):
        inputs = TokenInputs(v_prev=vs[step - 1], v_ref=vs[step - 2], extras=extras, step=step, num_steps=len(vs))
        target = (vs[step] - vs[step - 1]).norm(dim=-1).numpy()
        for label, weights in SIGNALS.items():
            score = combined(weights, inputs, cache).numpy()
            rho = spearmanr(score, target).statistic if np.ptp(score) > 0 else np.nan
            rows.append({"object": s.name, "step": step, "signal": label, "spearman": rho})
corr = pd.DataFrame(rows)
corr.groupby("signal")["spearman"].agg(["mean", "std", "count"]).sort_values("mean", ascending=False)

# %% [markdown]
# ## 2. Carving quality at equal keep ratio
# Only the SLaT carving is switched on (no step cache, no aggregation), so the differences come from
# the ranking alone. Quality is measured against the plain run of the same object and seed: the
# relative error of the SLaT latent, and the F1@0.05 / vIoU drop against the ground truth.

# %%
VARIANTS = {"S_freq (paper J)": PAPER_WEIGHTS, "NV (J with NV)": {"M": 0.5, "A": 0.5, "NV": 0.5}}
q_rows = []
for s in samples:
    b = base_results[s.name]
    qb = quality_metrics(b, s)
    for keep in KEEPS:
        for label, weights in VARIANTS.items():
            acc = Accelerator(slat_policy=SLaTTokenCarving(keep=keep, signals=weights), name=label)
            pipe.with_accel(acc)
            r = pipe(s.image, s.mask, pointmap=s.pointmap, seed=0)
            pipe.with_accel(None)
            q = quality_metrics(r, s)
            lat = float((r.slat.feats - b.slat.feats).norm() / b.slat.feats.norm())
            q_rows.append({"object": s.name, "keep": keep, "variant": label, "slat_rel_err": lat,
                           "f1_drop": qb["f_score"] - q["f_score"], "viou_drop": qb["volume_iou"] - q["volume_iou"]})
quality = pd.DataFrame(q_rows)
quality.groupby(["keep", "variant"])[["slat_rel_err", "f1_drop", "viou_drop"]].mean()

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for label, g in corr.groupby("signal"):
    m = g.groupby("step")["spearman"].mean()
    axes[0].plot(m.index, m.values, marker="o", ms=3, label=label,
                 lw=2.2 if label in ("NV", "S_freq") else 1.0)
axes[0].axhline(0, c="k", lw=0.6)
axes[0].set(xlabel="SLaT step s", ylabel="Spearman vs ||v_s - v_{s-1}||",
            title="Which signal predicts the next update?")
axes[0].legend(fontsize=8)
agg = quality.groupby(["keep", "variant"])["slat_rel_err"].mean().unstack("variant")
agg.plot.bar(ax=axes[1], rot=0)
axes[1].set(xlabel="keep ratio (fraction recomputed)", ylabel="SLaT latent rel. error vs plain",
            title="Carving damage at equal keep")
fig.tight_layout()
show(fig, FIG / "07_new_signal.png")

# %% [markdown]
# Read the left panel as: a signal is useful for carving when it ranks the tokens that will move
# most at the next step first (high rank correlation). The geometric terms (S_freq, NV) are constant
# per object and can only help by breaking ties among tokens with similar dynamics. The right panel
# is the test that matters: at the same keep ratio, the variant with the smaller latent error keeps
# more of the plain trajectory. If NV does not beat S_freq on this model, the paper's FFT term is
# the better geometric prior here; the point of the API is that this comparison is a dozen lines,
# not a fork of the policy.
#
# *In our run* (6 objects, 138 object-steps): mean Spearman with the next update A 0.51, NV -0.03,
# S_freq -0.06, J NV -0.09, J paper -0.09, M -0.38. Of the dynamic terms only A leads; M is
# anti-correlated (as in notebook 03), which is why both J variants, which add M and A with equal
# weight, rank no better than chance. Carving at equal keep, final-latent error against the plain
# run: keep 0.1: paper J 0.40, J with NV 0.57; keep 0.2: 0.54 vs 0.67; keep 0.4: 0.68 vs 0.64. The
# F1 and vIoU drops against ground truth are within ±0.5 points and ±0.007 for both variants (noise
# at this size). So NV is not a better geometric prior than S_freq here (only at keep 0.4 is it
# slightly better), and neither geometric term carries information on this model; the signal worth
# trying next is A alone, or J with a negative weight on M.
#
# Adding your own signal:
#
# ```python
# from fs3d_accel.accel import register_signal
#
# @register_signal
# class Height:
#     name, level, static = "height", "token", True
#     def compute(self, inputs, **kw):
#         return inputs.extras["coords"][:, 3].double()
#
# SLaTTokenCarving(keep=0.2, signals={"M": 0.5, "A": 0.5, "height": 0.5})
# ```
