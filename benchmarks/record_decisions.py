"""Run every method on the embedded sam3d-mini over the shipped YCB samples and record what each
decided (steps computed, token fractions, aggregation factor S) plus its quality, for replay at full
scale by ``benchmarks/accel_full.py``.

    python benchmarks/record_decisions.py --out benchmarks/results/decisions_mini.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fs3d_accel.accel.presets import method_factory
from fs3d_accel.accel.replay import DecisionRecorder, save_traces
from fs3d_accel.pipeline import Pipeline
from fs3d_analysis.data import load_shipped_samples
from fs3d_analysis.eval import run_one, score

METHODS = "base,fast-sam3d,fast-sam3d-released,taylorseer,easycache,random-drop,uniform-merge,fast3dcache"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default=METHODS, help="method names; preset:NAME|PATH for a calibrated preset")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/decisions_mini.json")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained("sam3d-mini")
    samples = list(load_shipped_samples())[: args.limit]
    traces, rows = [], []
    methods = {m: method_factory(m) for m in args.methods.split(",")}  # bad names fail before any run
    for sample in samples:
        for method, make in methods.items():
            accel = make()
            rec = DecisionRecorder(method, sample.name)
            with pipe.events.listening(rec):
                result, row = run_one(pipe, sample, accel, args.seed)
            traces.append(rec.finish(accel, result))
            rows.append({"object": sample.name, "method": method, **score(result, sample), **row})
            print(f"{sample.name:24s} {method:22s} ss {row['ss_steps_computed']:2d} slat {row['slat_steps_computed']:2d} "
                  f"active {row['slat_mean_active']:.2f} S {row['aggregation_S']:.2f} F1 {rows[-1]['f_score']:.1f}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_traces(traces, out)
    pd.DataFrame(rows).to_csv(out.with_suffix(".csv"), index=False)


if __name__ == "__main__":
    main()
