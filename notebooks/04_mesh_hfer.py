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
# # 04 · Mesh decoding: spectral complexity decides how far to aggregate
#
# **Observation (paper, Sec. 3.3).** Objects differ in geometric complexity; simple ones survive
# coarser decoder tokens without visible loss, complex ones do not. **Signal:** the high-frequency
# energy ratio (HFER) of the 2D object mask (with its texture, as the released code) and of the 3D
# coarse voxels, joined as H = w HFER_2D + (1 - w) HFER_3D. **Accelerator:**
# `SpectralTokenAggregation` merges decoder tokens by S = 2 (H <= tau_low), 1.5, or 1.25
# (H >= tau_high). **Effect:** detail lost against the un-aggregated decode, adaptive vs uniform
# merging.
#
# Model from `load_pipeline()` (shipped `sam3d-mini`; random weights only with
# `FS3D_ALLOW_RANDOM=1`, for development). `FS3D_QUICK=1` shrinks the run for CI (two objects
# through the model, 8 SLaT steps, six extra YCB renders); `FS3D_SLAT_STEPS` overrides the SLaT
# schedule.
#
# **What our run shows** (shipped `sam3d-mini` run-3 weights, full size on a 2-core CPU: all 8
# shipped objects through the model with 25 SLaT steps, 994-4978 tokens each, plus 70 more YCB
# renders for the ground-truth check; the numbers in the text below are from that run, the printed
# tables are the measurement of *your* run): on ground truth, the **3D** HFER of the voxels tracks
# complexity (Spearman 0.47 over 78 objects) while the textured 2D HFER does not (-0.10); the
# model's *own* 3D HFER hardly varies between objects (0.74-0.80) and does not track complexity
# (0.05 over 8). The default score is 90 % 2D, so the aggregation factor follows the image texture,
# and at this model size every object survives even S = 2, losing at most about 2 F1 points.

# %%
import matplotlib

matplotlib.use("Agg")
import ipywidgets as widgets
import pandas as pd

from fs3d_accel.accel import SpectralTokenAggregation
from fs3d_analysis import experiments as ex
from fs3d_analysis import plots
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.notebook_utils import (QUICK_OBJECTS, apply_run_size, banner, figures_dir, interact_static, load_pipeline,
                                          pick, show)

pd.set_option("display.width", 160)
pd.set_option("display.precision", 3)
FIG = figures_dir()
pipe = apply_run_size(load_pipeline())
print(banner(pipe))
shipped = list(load_shipped_samples())
shipped_names = {s.name for s in shipped}
extra_names = [n for n in ex.ycb_names() if n not in shipped_names][: pick(None, 6)]
# SS first: objects whose structure is (nearly) empty have nothing to aggregate
ss_runs, screened = ex.screen_samples(pipe, shipped, n=pick(None, 2), cheapest_first=True,
                                      prefer=pick((), QUICK_OBJECTS))
print(screened.to_string(index=False))
print("model runs:", list(ss_runs), "| extra YCB renders (ground-truth HFER only):", len(extra_names))

# %% [markdown]
# ## 1. HFER per object, as the aggregation measures it
# Each object runs through the pipeline once (stage outputs cached in `runs`); `hfer_row` measures
# HFER exactly as `SpectralTokenAggregation` does before the mesh decoder (mask + image texture,
# SS occupancy logits) and the factor S it would pick with the defaults (w = 0.9, tau = 0.5 / 0.7).
#
# *In our run* (8 shipped objects): 2D HFER 0.11 (apple) to 0.60 (cracker box), the model's 3D HFER
# 0.74-0.80; with w = 0.9 the score is essentially the 2D term, so the cracker box (printed
# texture, 0.61) and the hammer (0.54) get S = 1.5 and the six others S = 2; no object reaches
# tau_high = 0.7 (S = 1.25).

# %%
runs = {}
for name, ss_run in ss_runs.items():
    runs[name] = ex.run_stages(pipe, ss_run.inputs, ss=ss_run.ss)
    runs[name].timings["ss"] = ss_run.timings["ss"]
hfer = pd.DataFrame([{"object": o, **ex.hfer_row(r.inputs, r.ss)} for o, r in runs.items()])
show(plots.plot_hfer_distribution(hfer), FIG / "04_hfer_distribution.png")
hfer[["object", "hfer_2d", "hfer_2d_silhouette", "hfer_3d", "score", "n_tokens", "S"]]

# %% [markdown]
# ## 2. Does HFER track object complexity?
# Model-free check on ground truth: HFER of the rendered mask and of the GT mesh's voxels (at the
# model's occupancy resolution) against a complexity measure of the GT mesh, for the shipped
# samples and more YCB scans rendered the same way. Complexity = `area_ratio`, the surface area
# relative to a sphere of the convex hull's volume (1 for a sphere; thin, folded, hollow shapes
# score high). The count of surface voxels is in the table too, but on normalised meshes it
# mostly measures bulk (a large box has many surface voxels and little detail). The model's own
# 3D HFER (from its predicted occupancy) is the third panel, for the objects that ran through the
# pipeline.
#
# *In our run* (78 ground-truth objects: the 8 shipped + 70 YCB renders): Spearman with area_ratio
# is 0.47 for the GT 3D HFER, 0.20 for the silhouette-only 2D HFER and -0.10 for the textured 2D
# HFER; for the model's own 3D HFER it is 0.05 (8 objects). So the paper's premise holds for the
# 3D spectrum of the true shape, only weakly for the silhouette and not for the textured mask the
# released code uses (texture, not geometry, drives it); and the mini model's predicted occupancy
# (32^3) varies too little in spectrum between objects to carry the signal.

# %%
res = pipe.config.occupancy_resolution
extra = ex.ycb_samples(extra_names) if extra_names else []
gt = pd.DataFrame([{**ex.gt_hfer_row(s, res), "source": "shipped"} for s in shipped]
                  + [{**ex.gt_hfer_row(s, res), "source": "ycb render"} for s in extra])
gt = gt.merge(hfer[["object", "hfer_3d"]], on="object", how="left")
show(plots.plot_hfer_vs_complexity(gt, x="area_ratio", ys=("hfer_2d_gt", "hfer_3d_gt", "hfer_3d")),
     FIG / "04_hfer_vs_complexity.png")
gt[["hfer_2d_gt", "hfer_2d_silhouette_gt", "hfer_3d_gt", "surface_voxels", "area_ratio"]].corr("spearman").round(2)

# %% [markdown]
# ## 3. Detail loss: adaptive vs uniform aggregation
# Only the decoder re-runs (`DecodeCache` keeps the SLaT output of each object). Each variant is
# compared with the un-aggregated decode of the same structured latent (Chamfer, F1@0.05 after the
# base mesh's normalisation). Uniform S = 1.5 is the middle factor; S = 2 the most aggressive.
#
# *In our run* (8 objects): mean F1@0.05 against the un-aggregated decode is 99.6 for uniform
# S = 1.5, 99.3 for adaptive and 99.2 for uniform S = 2 (worst object: 021_bleach_cleanser, 98.0 at
# S = 2; Chamfer 0.026-0.038 throughout). Adaptive equals uniform S = 2 on the six objects it sends
# to S = 2 and uniform S = 1.5 on the other two; it saves the point lost by S = 2 on the cracker
# box (98.9 -> 99.9). At 32^3 every object survives the coarsest merge almost intact, so the
# paper's "complex objects lose detail" effect is too small here to separate simple from complex
# shapes.

# %%
cache = ex.DecodeCache(pipe, runs)
detail = cache.compare(ex.aggregation_variants(hfer))
show(plots.plot_detail_loss(detail), FIG / "04_detail_loss.png")
detail.pivot_table(index="object", columns="variant", values=["S", "f_score", "chamfer"]).round(3)

# %% [markdown]
# ## 4. Turn the knobs
# w, tau_low and tau_high change only the decision: S is recomputed from the cached HFER values and
# the decoder re-runs only for objects whose S is new (decodes are cached per object and S; the
# adaptive and uniform merges share them, both quantise the tokens by S).

# %%
def draw_aggregation(w: float = 0.9, tau_low: float = 0.5, tau_high: float = 0.7) -> None:
    if tau_low > tau_high:
        print(f"tau_low ({tau_low}) must be <= tau_high ({tau_high})")
        return
    agg = SpectralTokenAggregation(w=w, tau_low=tau_low, tau_high=tau_high)
    d = cache.compare(ex.aggregation_variants(hfer, agg))
    show(plots.plot_detail_loss(d, title=f"w={w:g}, tau_low={tau_low:g}, tau_high={tau_high:g}"))


interact_static(draw_aggregation,
                w=widgets.FloatSlider(value=0.9, min=0.0, max=1.0, step=0.05, description="w"),
                tau_low=widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="tau_low"),
                tau_high=widgets.FloatSlider(value=0.7, min=0.0, max=1.0, step=0.05, description="tau_high"))
