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
# # 00 · The embedded model: how sam3d-mini was trained and what it reconstructs
#
# Every other notebook measures the paper's observations on `sam3d-mini`, the `mini` configuration
# of our SAM 3D Objects implementation, trained here from scratch (no official weights can be had
# in this environment). Before reading those observations, look at the model itself: its training
# losses (from the logs shipped beside the weights) and its reconstructions of held-out YCB objects
# next to the ground truth, with the depth-based visual hull as a trivial baseline on the same
# objects. Details, data and the full evaluation: `fs3d_accel/weights/sam3d-mini/MODEL_CARD.md`.
#
# `FS3D_QUICK=1` (CI) reconstructs 2 objects instead of 12.
#
# **What our run shows** (full size, 12 objects, default samplers, 2-core CPU; the printed tables
# are the measurement of *your* run): round and cylindrical objects are reconstructed well (apple
# F1 75 / vIoU 0.79, master chef can 62 / 0.65), boxes come out with rounded edges, thin objects
# (scissors, hammer) far too thick, the pitcher loses its handle, and the bleach cleanser of the
# shipped two-object scene falls apart (F1 10); on these 12 objects the model is level with the
# visual hull in F1 and ahead in vIoU. A whole image-to-mesh run takes 2-5 s per object.

# %%
import matplotlib

matplotlib.use("Agg")
import time

import numpy as np
import pandas as pd
import trimesh

from fs3d_accel.training.curves import plot_curves
from fs3d_accel.training.evaluate import visual_hull_mesh
from fs3d_accel.weights import WEIGHTS_DIR
from fs3d_analysis import plots
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.metrics import shape_metrics
from fs3d_analysis.notebook_utils import banner, figures_dir, load_pipeline, pick, repo_root, show

pd.set_option("display.width", 160)
pd.set_option("display.precision", 3)
FIG = figures_dir()
pipe = load_pipeline()
print(banner(pipe))

# %% [markdown]
# ## 1. Training curves
# Two runs on one H100: run 2 trained all four stages (VAEs, SS flow, SLaT flow) from scratch in
# ~6 minutes of optimisation; run 3 resumed it and trained only the two flows for another 173 s
# each (VAEs frozen). The continuation is drawn after run 2's last step.

# %%
card = WEIGHTS_DIR / "sam3d-mini"
path = plot_curves(card / "train_log_run2.csv", FIG / "00_training_curves.png",
                   continuation=card / "train_log_run3.csv", continuation_label="run 3 (continuation)")
logs = pd.concat([pd.read_csv(card / "train_log_run2.csv").assign(run=2),
                  pd.read_csv(card / "train_log_run3.csv").assign(run=3)])
print(logs.groupby(["run", "stage"])["loss"].agg(["first", "last", "count"]))
from IPython.display import Image, display  # noqa: E402

display(Image(filename=str(path)))

# %% [markdown]
# ## 2. Reconstructions of held-out YCB objects
# The 8 shipped samples and 4 more YCB renders (`benchmarks/data/ycb_scale/objects`), never seen in
# training, seed 0, the default samplers. Scores are *posed*: the predicted and the ground-truth
# mesh in the camera frame, both normalised by the ground-truth box (F1@0.05 in percent, vIoU).
# The visual hull extrudes the mask along the view rays using the same depth the model receives.

# %%
samples = list(load_shipped_samples()) + list(load_shipped_samples(repo_root() / "benchmarks" / "data" / "ycb_scale"
                                                                   / "objects"))[:4]
samples = samples[: pick(12, 2)]


def posed_scores(mesh: trimesh.Trimesh, sample) -> dict:
    m = shape_metrics(mesh, sample.posed_mesh(), mode="gt", n_points=4000).as_dict()
    return {"f1_posed": m["f_score"], "viou_posed": m["volume_iou"]}


rows, results, scores = [], [], []
for s in samples:
    t0 = time.perf_counter()
    res = pipe(s.image, s.mask, pointmap=s.pointmap, seed=0)
    seconds = time.perf_counter() - t0
    pm = res.posed_mesh
    ours = posed_scores(trimesh.Trimesh(pm.vertices.astype(np.float64), pm.faces, process=False), s)
    hull = posed_scores(visual_hull_mesh(s.mask, s.pointmap, s.intrinsics), s)
    rows.append({"object": s.name, "seconds": seconds, "voxels": int(res.ss.coords.shape[0]),
                 "F1 mini": ours["f1_posed"], "vIoU mini": ours["viou_posed"],
                 "F1 visual hull": hull["f1_posed"], "vIoU visual hull": hull["viou_posed"]})
    results.append(res)
    scores.append(ours)
table = pd.DataFrame(rows)
print(table.to_string(index=False))
print(table.drop(columns="object").mean().to_string())

# %%
fig = plots.reconstruction_gallery(samples, results, metrics=scores,
                                   title=f"sam3d-mini (default samplers, seed 0) on {len(samples)} held-out YCB "
                                         "objects: input | reconstruction (posed, input camera) | ground truth")
show(fig, FIG / "00_reconstructions.png")

# %% [markdown]
# *In our run* (12 objects, 3.6 s per object on average): sam3d-mini F1 51.3 / vIoU 0.45, the visual
# hull 51.1 / 0.41 on the same objects: level in F1, ahead in vIoU. On the 25 further held-out renders
# of the model card sam3d-mini is clearly ahead (F1 57.0 / vIoU 0.44 against 47.0 / 0.34). The
# project's targets (F1 >= 70, vIoU >= 0.45) are not reached. Keep this in mind when reading
# notebooks 02-07: the observations are those of this small model.
