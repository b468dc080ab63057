"""Training-curve figure (loss per stage against step) from ``train_log.csv``."""
from __future__ import annotations

import csv
from pathlib import Path

STAGE_TITLES = {"ss_vae": "SS VAE (BCE + dice + KL)", "slat_vae": "SLaT VAE (corner-SDF L1, 1/128 units)",
                "ss_flow": "SS flow (velocity MSE, shape + layout)", "slat_flow": "SLaT flow (velocity MSE)"}


def read_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["aux"] == "end":
                continue
            out.setdefault(row["stage"], []).append((int(row["step"]), float(row["loss"])))
    return out


def plot_curves(log_csv: str | Path, out_png: str | Path, title: str = "sam3d-mini training") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = read_log(log_csv)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, stage in zip(axes, STAGE_TITLES):
        pts = data.get(stage, [])
        if pts:
            s, l = zip(*pts)
            ax.plot(s, l, lw=1.2)
            ax.set_yscale("log")
        ax.set_title(STAGE_TITLES[stage], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (logged every 25 steps)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
