"""Training-curve figure (loss per stage against step) from ``train_log.csv``, optionally followed by
a continuation run's log (its steps appended after the first run's last step, resume point marked)."""
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


def last_steps(path: str | Path) -> dict[str, int]:
    """Steps each stage ran in a log (its ``end`` row, else its last logged step)."""
    out: dict[str, int] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            out[row["stage"]] = max(out.get(row["stage"], 0), int(row["step"]))
    return out


def plot_curves(log_csv: str | Path, out_png: str | Path, title: str = "sam3d-mini training",
                continuation: str | Path | None = None, continuation_label: str = "continuation") -> Path:
    """``continuation``: log of a run resumed from ``log_csv``'s checkpoint; its stages are drawn after
    the first run's last step of the same stage, with a dashed line at the resume point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = read_log(log_csv)
    cont = read_log(continuation) if continuation is not None else {}
    offsets = last_steps(log_csv)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, stage in zip(axes, STAGE_TITLES):
        pts = data.get(stage, [])
        if pts:
            s, l = zip(*pts)
            ax.plot(s, l, lw=1.2)
            ax.set_yscale("log")
        if cont.get(stage):
            off = offsets.get(stage, 0)
            s, l = zip(*cont[stage])
            ax.plot([off + x for x in s], l, lw=1.2, color="tab:orange", label=continuation_label)
            ax.axvline(off, color="k", ls="--", lw=0.8)
            ax.set_yscale("log")
            ax.legend(fontsize=8)
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
