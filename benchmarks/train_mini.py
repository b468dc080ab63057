"""Train sam3d-mini (all four stages in one process) on the packed training shards.

GPU entry point (needs only torch, numpy, safetensors):

    PYTHONPATH=. python benchmarks/train_mini.py --data .carry/train_data --out $OUT \
        --ss-vae-s 60 --slat-vae-s 120 --ss-flow-s 150 --slat-flow-s 150 [--resume .carry/ckpt]

Writes ``<out>/ckpt/<component>.pt`` (fp32, EMA weights for the flows and fusers),
``<out>/ckpt/stats.json`` (latent normalisation), ``<out>/train_log.csv`` and ``<out>/run.json``.
``--resume`` loads components from an earlier run; ``--skip-vae`` then keeps the VAEs frozen.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fs3d_accel.pipeline import Pipeline
from fs3d_accel.training.data import build_trainset, load_shards
from fs3d_accel.training.trainers import MiniTrainer, StageConfig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(".carry/train_data"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-shapes", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="per stage (CPU smoke tests)")
    ap.add_argument("--ss-vae-s", type=float, default=60)
    ap.add_argument("--slat-vae-s", type=float, default=120)
    ap.add_argument("--ss-flow-s", type=float, default=150)
    ap.add_argument("--slat-flow-s", type=float, default=150)
    ap.add_argument("--batch-ss-vae", type=int, default=32)
    ap.add_argument("--batch-slat-vae", type=int, default=8)
    ap.add_argument("--batch-ss-flow", type=int, default=64)
    ap.add_argument("--batch-slat-flow", type=int, default=16)
    ap.add_argument("--lr-flow", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="pre-processing processes (0: cores - 2)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="scale the stage budgets so the whole run ends by then (data prep included)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    raw = load_shards(a.data, a.max_shapes)
    log(f"loaded {len(raw.names)} shapes, {len(raw)} views")
    lattice = not (a.skip_vae and a.slat_flow_s <= 0)  # SS-only runs need no corner SDFs
    ts = build_trainset(raw, a.device, log=log, workers=a.workers, lattice=lattice)  # forks before CUDA is initialised
    pipe = Pipeline.from_config("mini", seed=a.seed, device=a.device)
    tr = MiniTrainer(pipe, ts, a.out, printer=log, seed=a.seed)
    loaded = tr.load(a.resume) if a.resume is not None else []
    if "ss.flow" not in loaded:
        pipe.ss.flow.zero_init_()
    log(f"resumed components: {loaded}")
    ms = a.max_steps
    budgets = {"ss_vae": 0.0 if a.skip_vae else a.ss_vae_s, "slat_vae": 0.0 if a.skip_vae else a.slat_vae_s,
               "ss_flow": a.ss_flow_s, "slat_flow": a.slat_flow_s}
    if a.deadline_s is not None:
        left = a.deadline_s - (time.perf_counter() - t0) - 40  # encode + saves
        f = min(1.0, left / max(1.0, sum(budgets.values())))
        budgets = {k: v * f for k, v in budgets.items()}
        log(f"stage budgets scaled by {f:.2f}: {budgets}")
    if a.device == "cuda":
        log(f"GPU memory in use: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    if not a.skip_vae:
        tr.ss_vae(StageConfig(budgets["ss_vae"], a.batch_ss_vae, 1e-3, ms, warmup=50))
        tr.slat_vae(StageConfig(budgets["slat_vae"], a.batch_slat_vae, 1e-3, ms, warmup=50))
        tr.stats.pop("slat_mean", None)  # decoder/encoder changed: re-measure
        tr.stats.pop("slat_std", None)
        tr.save(a.out / "ckpt")
    tr.encode(slat=lattice)
    tr.ss_flow(StageConfig(budgets["ss_flow"], a.batch_ss_flow, a.lr_flow, ms, weight_decay=0.01))
    tr.save(a.out / "ckpt")
    if budgets["slat_flow"] > 0:
        tr.slat_flow(StageConfig(budgets["slat_flow"], a.batch_slat_flow, a.lr_flow, ms, weight_decay=0.01))
    tr.save(a.out / "ckpt")
    info = {"views": len(raw), "shapes": len(raw.names), "seconds": time.perf_counter() - t0,
            "timings": ts.timings, "resumed": loaded, "args": {k: str(v) for k, v in vars(a).items()},
            "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}
    (a.out / "run.json").write_text(json.dumps(info, indent=1))
    log(f"saved checkpoint to {a.out / 'ckpt'}")
    return info


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
