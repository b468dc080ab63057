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
# # 06 · Calibrating the accelerators for a dataset, and per-object control
#
# The paper fixes Fast-SAM3D's hyperparameters once (k = 3, beta = 0.7, top-10 % carving, step-cache
# threshold E, w = 0.9, tau = 0.5 / 0.7). On another model or dataset those may be too timid or too
# aggressive. `fs3d_analysis.calibrate` searches (k, beta, keep, E, w, tau_low < tau_high) with
# Optuna for the **fastest setting whose mean quality loss against the plain pipeline stays within a
# budget** (F1@0.05 drop <= 0.5 points and vIoU drop <= 0.01), writes every trial to a tidy CSV, draws
# the Pareto front and saves the chosen setting as a preset that `FastSAM3D.from_preset` loads.
#
# Speed is measured twice: wall time (the objective; noisy on a shared CPU) and network-pass
# equivalents (deterministic: a computed step counts 1, a carved step its active token fraction).
#
# The last section goes beyond the paper: an **instance-adaptive controller** that picks k and the
# carving keep ratio per object from its own first steps, compared with fixed settings.
#
# Measured on `load_pipeline()` (shipped `sam3d-mini`; `FS3D_ALLOW_RANDOM=1` for development only).
# `FS3D_QUICK=1`: 4 trials on the 2 smallest objects (banana, bleach cleanser), 8 SLaT steps, one thread.
#
# **Our run** (the committed `figures/06_pareto.png`): shipped `sam3d-mini` run-3 weights, **full
# size** (30 trials on the 8 shipped objects, default 25-step samplers; 11.6 min on our 2-core CPU).
# The numbers quoted below are from that run; the printed tables are the measurement of *your* run
# (CI runs the quick mode: 4 trials on 2 objects, 8 SLaT steps). The search scores quality with the fast vIoU
# (`quality="fast"`), which reads much lower than the exact one on this model's open meshes (0.05
# vs 0.26): compare drops, not levels. `fs3d calibrate --quality exact --objective passes` is the
# stricter version; its preset, checked on 20 held-out objects, ships as `preset:sam3d-mini-ycb`
# (`benchmarks/results/accel_quality_cpu/README.md`).

# %%
import json
import shutil

import matplotlib

matplotlib.use("Agg")
import pandas as pd
from IPython.display import Image, display

from fs3d_accel.accel import FastSAM3D, make_method
from fs3d_accel.accel.adaptive import AdaptiveCarving, AdaptiveFastSAM3D, AdaptiveSSCache
from fs3d_accel.seams import StageEvent, StepEvent
from fs3d_analysis.calibrate import (QualityConstraint, SearchSpace, calibrate, compare, early_signals, measure,
                                     quantile_thresholds)
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.notebook_utils import (QUICK_OBJECTS, apply_run_size, banner, figures_dir, load_pipeline, pick,
                                          quick_mode, repo_root)

pd.set_option("display.width", 180)
pd.set_option("display.precision", 4)
FIG = figures_dir()
pipe = apply_run_size(load_pipeline())
print(banner(pipe))
shipped = list(load_shipped_samples())
samples = pick(shipped[:8], [s for s in shipped if s.name in QUICK_OBJECTS])
N_TRIALS = pick(30, 4)
OUT = repo_root() / "runs" / ("06_calibrate_quick" if quick_mode() else "06_calibrate")
shutil.rmtree(OUT, ignore_errors=True)  # a fresh study; rerunning calibrate() on OUT would resume it
print("objects:", [s.name for s in samples], "| trials:", N_TRIALS, "| out:", OUT)

# %% [markdown]
# ## 1. The search
# The default space: k in [1, 5], beta in [0.3, 0.95], keep in [0.05, 1], E in [0, 3], w in [0.5, 1],
# tau_low in [0.1, 0.6], tau_high in [0.3, 0.95] sampled above tau_low. The first trial is the paper's
# setting; Optuna's TPE sampler proposes the rest (multi-objective: speedup up, F1 drop down, with the
# quality budget as constraints). The plain pipeline runs once per object (after one untimed warm-up
# run) and is cached in `OUT/base.csv`.

# %%
space = SearchSpace()
constraint = QualityConstraint(max_f1_drop=0.5, max_viou_drop=0.01)
res = calibrate(pipe, samples, space, constraint, n_trials=N_TRIALS, out_dir=OUT, seed=0, dataset_name="shipped",
                figure_paths=[FIG / "06_pareto.png"])
cols = ["trial", *space.names, "speedup_wall", "speedup_passes", "f1_drop", "viou_drop", "feasible", "pareto"]
res.trials[cols].sort_values("speedup_wall", ascending=False)

# %%
display(Image(filename=str(FIG / "06_pareto.png")))
print("base (plain pipeline):")
res.base[["object", "f_score", "volume_iou", "time_total", "passes"]]

# %% [markdown]
# Grey points break the quality budget (dashed line: the F1 budget; the vIoU budget is checked too),
# blue ones meet it; the orange step line is the Pareto front over all trials, the star the chosen
# setting. A speedup below 1 in wall time with a pass ratio above 1 means the saved network passes
# did not pay for the policy's overhead at this model size (on a mini model the network is cheap).
#
# *In our run* (full size: 30 trials, 8 objects): 23 of the 30 trials meet the budget. The paper's
# setting (trial 0: k = 3, beta = 0.7, keep = 0.1, E = 1.5, w = 0.9, tau = 0.5 / 0.7) is the fastest
# (4.3x wall, 4.1x network passes) but **breaks the F1 budget** (F1 drop 0.72 points; vIoU drop
# 0.001). The chosen setting is trial 25 (k = 3, beta = 0.62, keep = 0.17, E = 1.76, w = 0.93,
# tau = 0.48 / 0.87): 3.7x wall, 4.05x passes, F1 drop 0.26, vIoU drop -0.0003. So on eight
# objects the paper's setting sits just past the quality budget, and a slightly gentler carving
# (keep 0.17 instead of 0.1) brings it back at almost the same pass count. The wall-time ratio is
# noisy on a shared CPU: the paper setting measured 3.95x in section 3. The absolute F1 is low
# (base around 25) because this fast metric compares the object-frame mesh, which for `sam3d-mini`
# is camera-aligned (see its model card), with the canonical ground truth; only the drops are
# meaningful here.

# %% [markdown]
# ## 2. The preset: save, reload, same behaviour
# `preset.json` holds the chosen hyperparameters, the dataset, the constraint and the measured
# numbers. `FastSAM3D.from_preset(path)` rebuilds the accelerator; rerunning one object with it
# reproduces the trial's quality exactly (the pipeline is deterministic for a seed).

# %%
if res.preset_path is None:
    print("no trial met the constraint: no preset (loosen the budget or run more trials)")
else:
    preset = json.loads(res.preset_path.read_text())
    print(json.dumps({k: preset[k] for k in ("method", "hyperparameters", "constraint", "measured")}, indent=1))
    acc = FastSAM3D.from_preset(res.preset_path)
    print(acc.name)
    again = measure(pipe, samples[:1], acc, seed=0)
    trial_rows = res.objects[(res.objects["trial"] == preset["measured"]["trial"])
                             & (res.objects["object"] == samples[0].name)]
    same = abs(float(again["f_score"].iloc[0]) - float(trial_rows["f_score"].iloc[0])) < 1e-9
    print(f"F1 of {samples[0].name}: reloaded preset {again['f_score'].iloc[0]:.4f}, "
          f"trial {trial_rows['f_score'].iloc[0]:.4f} -> identical: {same}")
    assert same

# %% [markdown]
# Resuming: the study lives in `OUT/study.db`, so calling `calibrate` again with the same settings
# runs only the missing trials (here none) and returns the same choice.

# %%
again_res = calibrate(pipe, samples, space, constraint, n_trials=N_TRIALS, out_dir=OUT, seed=0,
                      dataset_name="shipped")
print("trials:", len(again_res.trials), "| same choice:",
      (again_res.best or {}).get("trial") == (res.best or {}).get("trial"))

# %% [markdown]
# ## 3. Beyond the paper: per-object k and keep
# `AdaptiveFastSAM3D` measures two signals in each object's own first steps
# (`fs3d_accel.accel.signals`):
#
# - `layout_jitter`: relative change of the layout-token velocity over the SS warm-up (2 steps). A
#   jittery layout is risky to extrapolate -> smaller k; a calm one -> larger k.
# - `update_concentration`: share of the last SLaT update carried by the top 10 % of tokens, at the
#   first carving step. A concentrated update can be carved harder -> smaller keep.
#
# The thresholds are placed at the terciles of the signals on these objects (in-sample: with a
# larger dataset, set them on a calibration split).

# %%
sig = early_signals(pipe, samples)
jit_t = quantile_thresholds(sig["layout_jitter"], 3)
conc_t = quantile_thresholds(sig["update_concentration"], 3)
print("layout_jitter thresholds:", jit_t, "| update_concentration thresholds:", conc_t)
sig

# %%
def adaptive():
    return AdaptiveFastSAM3D(ss=AdaptiveSSCache(ks=(4, 3, 2), thresholds=jit_t),
                             carving=AdaptiveCarving(keeps=(0.4, 0.2, 0.1), thresholds=conc_t))


methods = {"fixed k=3 keep=0.1 (paper)": lambda: make_method("fast-sam3d"),
           "fixed k=4 keep=0.1": lambda: make_method("fast-sam3d", ss__k=4),
           "fixed k=2 keep=0.4": lambda: make_method("fast-sam3d", ss__k=2, carving__keep=0.4),
           "adaptive (per object)": adaptive}
if res.preset_path is not None:
    methods["calibrated preset"] = lambda: FastSAM3D.from_preset(res.preset_path)
if quick_mode():
    methods = {k: v for k, v in methods.items() if k in ("fixed k=3 keep=0.1 (paper)", "adaptive (per object)")}


class Decisions:
    """Per object: the k and keep the adaptive controller chose (from ctx.info['adaptive'])."""

    def __init__(self):
        self.rows, self.i = [], -1

    def __call__(self, e):
        if isinstance(e, StageEvent) and e.stage == "ss" and e.phase == "start":
            self.i += 1
            self.rows.append({"object": samples[self.i % len(samples)].name})
        elif isinstance(e, StepEvent) and "adaptive" in e.info:
            a = e.info["adaptive"]
            for key in ("k", "keep"):
                if key in a:
                    self.rows[-1].setdefault(key, a[key])


rows, choices = [], None
for name, factory in methods.items():
    dec = Decisions()
    with pipe.events.listening(dec):
        table = measure(pipe, samples, factory(), seed=0)
    if name.startswith("adaptive"):
        choices = pd.DataFrame(dec.rows)
    agg = compare(res.base, table)
    rows.append({"method": name, **{k: agg[k] for k in ("speedup_wall", "speedup_passes", "ss_pass_ratio",
                                                        "slat_pass_ratio", "f1_drop", "viou_drop")},
                 "meets budget": constraint.satisfied(agg["f1_drop"], agg["viou_drop"])})
adaptive_table = pd.DataFrame(rows)
adaptive_table.to_csv(OUT / "adaptive_vs_fixed.csv", index=False)
adaptive_table

# %%
print("adaptive choices per object:")
choices.merge(sig, on="object")

# %% [markdown]
# Read the table as: the adaptive controller is worth having if it sits on or above the fixed
# settings' speed/quality trade-off, i.e. it is at least as fast as a fixed setting of similar
# quality, or better in quality at similar speed. With few objects the tercile thresholds are
# in-sample and degenerate (with two objects they fall between the two values), so the controller
# can only send one object to each end of its range; its value shows on datasets with mixed
# difficulty.
#
# *In our run* (full size: 8 objects): layout_jitter ranges 0.13-0.27 and update_concentration
# only 0.228-0.257, so the carving signal barely separates the objects. The controller chose k = 2
# for the three most jittery layouts (pitcher, scissors, hammer) and k = 4 for the calmest (apple,
# bleach cleanser, banana). Its keep choices are made on the object's own run, after its own SS
# stage, so they can differ from the signal table above (computed with the default SS cache).
#
# | setting | wall | passes | F1 drop | vIoU drop | meets budget |
# |---|---|---|---|---|---|
# | fixed paper (k = 3, keep = 0.1) | 3.95x | 4.10x | 0.72 | 0.0011 | no |
# | fixed k = 4, keep = 0.1 | 4.40x | 4.90x | 0.35 | 0.0021 | yes |
# | fixed k = 2, keep = 0.4 | 3.19x | 2.92x | -1.13 | -0.0040 | yes |
# | adaptive (per object) | 3.75x | 3.71x | -1.88 | -0.0023 | yes |
# | calibrated preset (trial 25) | 3.96x | 4.05x | 0.26 | -0.0003 | yes |
#
# The adaptive controller is the best in quality (F1 +1.9 points over base) at 3.7x passes, a point
# no fixed setting here reaches (k = 2 / keep = 0.4 is both slower and worse). It is not the
# fastest: fixed k = 4 is faster and still inside the budget on these objects. With in-sample
# tercile thresholds on eight objects this is a first reading, not a verdict.
