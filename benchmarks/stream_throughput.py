"""Objects per second over a stream of new object sizes: one object after another, or the object stream.

``fs3d_accel.stream`` queues the next object's SS sampler behind the current object's SLaT start, so that the GPU has
work while the host builds SLaT's tables and records its graphs (the start-of-call idle that keeps SLaT's call at ~50%
of the executed FLOPs while its kernels run at ~57.5% at 14k on an H100, ``results/base_vs_official_h100/session18/``).
This times three modes in one process: ``sequential`` runs each object's stages in ``Pipeline.run_prepared``'s order
(SS sampler, its decoding, SLaT, mesh decoder and extraction); ``stream-gpu`` runs ``fs3d_accel.stream.run_stream``
with each mesh extracted in turn; ``stream`` runs it with the extraction (marching cubes on the host) on a worker
thread while the next object's GPU work runs. ``--modes`` adds ``sequential-noextract`` and ``stream-noextract``: the
same two orders without the extraction, timing the stream's GPU part apart from the host's marching cubes. Every object is a new size for the process (a seeded crop of a YCB surface as in
``slat_many_sizes.py``, substituted for the SS stage's decoded voxels, whose count random weights do not make
meaningful), and each round and mode gets sizes of its own (shifted by a few voxels), so every timed object is a first
meeting, as in a dataset run (the sequential mode also reports its mesh extraction's host seconds per object: on
random weights the decoded surfaces are noisy, so the extraction is likely longer than on trained weights). Rounds
alternate the modes' order. Per mode: seconds of the whole stream (``stage_latency.Timer``, one call), per object,
and its ratio against sequential within the round. ``--steps`` shortens both samplers (default: the config's 25), for
a quick look or a smoke run; the committed results use the default.

    python benchmarks/stream_throughput.py --device cuda --config full \\
        --variant compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac --objects 8 --rounds 2 --out runs/stream

Writes ``stream_throughput.csv`` (one row per round and mode), ``README.md`` and ``meta.json``. On the CPU
(``--config mini``) it checks the script, not a timing.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.slat_many_sizes import object_coords, object_sizes  # noqa: E402
from benchmarks.stage_latency import (SHORT, Timer, checked_device, checked_variants,  # noqa: E402
                                      synthetic_inputs, variant_label, variant_options)
from fs3d_accel.pipeline import Pipeline  # noqa: E402
from fs3d_accel.stream import run_stream  # noqa: E402
from fs3d_analysis.notebook_utils import set_samplers  # noqa: E402
from fs3d_analysis.profile.latency import sync_device  # noqa: E402

CSV_NAME = "stream_throughput.csv"
COLUMNS = ("round", "mode", "objects", "seconds", "per_object_s", "extract_s_per_object", "sizes")
#: sequential: ``run_prepared``'s order; stream-gpu: the object stream with each mesh extracted in turn on the main
#: thread (what queuing the next SS buys alone); stream: the object stream with the extraction on a worker thread;
#: sequential-noextract / stream-noextract: the same two orders without the mesh extraction (the decoder network still
#: runs and its output still comes back to the host), so that the GPU part of a stream is timed apart from the host's
#: marching cubes, which bounded session 19's stream on random weights
MODES = ("sequential", "stream-gpu", "stream", "sequential-noextract", "stream-noextract")
DEFAULT_MODES = "sequential,stream-gpu,stream"
#: each mode's baseline in the README's ratio column
BASELINE = {"stream-gpu": "sequential", "stream": "sequential", "stream-noextract": "sequential-noextract"}


def fixed_structure(pipe: Pipeline, coords: list[torch.Tensor]):
    """A ``decode_structure`` stand-in that decodes as the SS stage does, then substitutes the next object's voxels."""
    remaining = iter(coords)

    def structure(latents, inputs, generator):
        ss = pipe.ss.decode_structure(latents, inputs, generator, pipe.options)
        c = next(remaining)
        return dataclasses.replace(ss, coords=c.to(ss.coords.device))
    return structure


def run_sequential(pipe: Pipeline, inputs, seeds, structure, extract: bool = True) -> float | None:
    """Each object's stages in ``Pipeline.run_prepared``'s order, with ``structure`` decoding the SS latents. Returns
    the host seconds spent in mesh extraction (timed after the decoder network's GPU work is done); without
    ``extract``, the network's output is copied to the host instead and None is returned."""
    extract_s = 0.0
    for inp, seed in zip(inputs, seeds):
        gen_ss, gen_slat = pipe._generators(seed)
        latents = pipe.ss.sample_latents(inp, generator=gen_ss, policy=pipe.accel.ss_policy, events=pipe.events,
                                         options=pipe.options)
        ss = structure(latents, inp, gen_ss)
        slat = pipe.slat(inp, ss, generator=gen_slat, policy=pipe.accel.slat_policy, events=pipe.events,
                         options=pipe.options, coords_transform=pipe.accel.coords_transform)
        # run_decode's two halves, the extraction timed on its own (the sync only moves the wait)
        network = pipe.decode.run_network(inp, ss, slat, options=pipe.options,
                                          decoder_transform=pipe.accel.decoder_transform)
        if not extract:
            network.out.feats.float().cpu(), network.out.coords.cpu()  # as the stream's host copies
            continue
        sync_device(pipe.device)
        start = time.perf_counter()
        pipe.decode.extract(network, ss, slat, decoder_transform=pipe.accel.decoder_transform,
                            coords_transform=pipe.accel.coords_transform)
        extract_s += time.perf_counter() - start
    return extract_s if extract else None


def run_streamed(pipe: Pipeline, inputs, seeds, structure, overlap_extraction: bool = True) -> None:
    for _ in run_stream(pipe, inputs, seeds, structure=structure, overlap_extraction=overlap_extraction):
        pass


def run_streamed_without_extraction(pipe: Pipeline, inputs, seeds, structure) -> None:
    """The object stream with the decode stage's extraction replaced by a no-op for the call (restored after, errors
    included): its host copies of the network's output still run."""
    real = pipe.decode.extract
    pipe.decode.extract = lambda *args, **kwargs: None
    try:
        run_streamed(pipe, inputs, seeds, structure, overlap_extraction=False)
    finally:
        pipe.decode.extract = real


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds of one call of ``fn()`` by ``stage_latency.Timer``, what it returned)."""
    returned = []
    seconds = Timer(device, warmup=0, repeats=1)(lambda: returned.append(fn()))["median_s"]
    return seconds, returned[0]


def write_readme(out: Path, rows: list[dict], meta: dict) -> None:
    lines = ["# Objects per stream: sequential against the object stream (`benchmarks/stream_throughput.py`)", "",
             f"Device **{meta['device']}**, torch {meta['torch']}, `{meta['config']}` config, variant "
             f"`{meta['variant']}`, {meta['objects']} objects of new sizes per round and mode "
             f"(about {min(meta['sizes'])}-{max(meta['sizes'])} voxels, shifted by a few per round and mode: the "
             f"CSV's `sizes`), {meta['rounds']} rounds, {meta['steps']['ss']} SS and {meta['steps']['slat']} SLaT "
             "sampler steps.", "",
             "| round | mode | seconds | per object | against its sequential mode |", "| --- | --- | --- | --- | --- |"]
    for r in sorted({row["round"] for row in rows}):
        pair = {row["mode"]: row for row in rows if row["round"] == r}
        for m in MODES:
            if m in pair:
                base = BASELINE.get(m)
                ratio = f"{pair[m]['seconds'] / pair[base]['seconds']:.3f}" if base in pair else ""
                lines.append(f"| {r} | {m} | {pair[m]['seconds']:.3f} | {pair[m]['per_object_s']:.3f} | {ratio} |")
    for m in MODES:
        per = [row["per_object_s"] for row in rows if row["mode"] == m]
        if per:
            lines.append(f"\n{m}: median {statistics.median(per):.3f} s per object over {len(per)} rounds")
    ext = [row["extract_s_per_object"] for row in rows if row["mode"] == "sequential"]
    if ext:
        lines.append(f"\nsequential mode's mesh extraction (host, after the decoder network): median "
                     f"{statistics.median(ext):.3f} s per object")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="full", choices=("mini", "full"))
    ap.add_argument("--variant", default="compile-all-zkv-fa4-ro-sqfa2-ge-slatcg-io-ac",
                    help=f"one benchmark variant, from {sorted(SHORT)}")
    ap.add_argument("--objects", type=int, default=8, help="objects (distinct sizes) per round and mode")
    ap.add_argument("--min-voxels", type=int, default=12000)
    ap.add_argument("--max-voxels", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {list(MODES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="SS and SLaT sampler steps (default: the config's, 25): fewer for a quick look at the modes")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise SystemExit(f"--modes: each of {list(MODES)} at most once, at least one; got {args.modes!r}")
    modes = [m for m in MODES if m in modes]  # a fixed order
    dev = checked_device(args.device)
    if "," in args.variant:
        raise SystemExit(f"--variant: one variant, got {args.variant!r} (the modes are what this compares)")
    variant = checked_variants(args.variant, dev)[0]
    opts = variant_options(variant)
    try:
        sizes = object_sizes(args.objects, args.min_voxels, args.max_voxels)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    # each round and mode meets sizes of its own: +3 voxels per (round, mode) slot, and the warm-up others still
    k = len(modes)
    slots = {(r, m): [n + 3 * (k * r + i) for n in sizes] for r in range(1, args.rounds + 1) for i, m in enumerate(modes)}
    warm_sizes = [n + 3 * (k * args.rounds + k) for n in sizes[:2]]
    every = [n for v in slots.values() for n in v] + warm_sizes
    if len(set(every)) != len(every):
        raise SystemExit(f"sizes of two rounds or modes coincide (each meets its own, {3} voxels apart per slot): "
                         f"spread --min-voxels .. --max-voxels wider or use fewer --objects / --rounds")

    pipe = set_samplers(Pipeline.from_config(args.config, seed=args.seed, device="cpu"), args.steps, args.steps).to(dev)
    pipe.with_options(opts)
    resolution = pipe.config.slat_flow.resolution
    try:
        coords = {k: object_coords(v, resolution, args.seed) for k, v in slots.items()}
        warm_coords = object_coords(warm_sizes, resolution, args.seed + 10_000)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    inp = pipe.prepare(*synthetic_inputs(pipe.config.image_size))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "config": args.config,
            "steps": {"ss": pipe.config.ss_sampler.steps, "slat": pipe.config.slat_sampler.steps},
            "variant": variant, "variant_options": f"{variant_label(variant)} = {opts}",
            "objects": len(sizes), "sizes": sizes, "rounds": args.rounds, "seed": args.seed, "modes": modes,
            "timing": "one call per round and mode (stage_latency.Timer: CUDA events after a synchronisation, "
                      "synchronised at the end); every object a new size"}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    runners = {"sequential": run_sequential, "stream": run_streamed,
               "stream-gpu": lambda *a: run_streamed(*a, overlap_extraction=False),
               "sequential-noextract": lambda *a: run_sequential(*a, extract=False),
               "stream-noextract": run_streamed_without_extraction}
    with torch.no_grad():
        for m in modes:  # compiles, and each mode's first call of each kind of pass
            t, _ = timed(lambda: runners[m](pipe, [inp] * len(warm_coords), range(len(warm_coords)),
                                            fixed_structure(pipe, warm_coords)), dev)
            print(f"warm-up {m}: {t:.1f} s", flush=True)
        rows = []
        with open(args.out / CSV_NAME, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in range(1, args.rounds + 1):
                for m in (modes if r % 2 else modes[::-1]):
                    objs = coords[(r, m)]
                    sec, extract_s = timed(lambda: runners[m](pipe, [inp] * len(objs), range(len(objs)),
                                                              fixed_structure(pipe, objs)), dev)
                    row = {"round": r, "mode": m, "objects": len(objs), "seconds": sec,
                           "per_object_s": sec / len(objs),
                           "extract_s_per_object": "" if extract_s is None else extract_s / len(objs),
                           "sizes": " ".join(str(len(c)) for c in objs)}
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                    print(f"round {r} {m}: {sec:.3f} s, {sec / len(objs):.3f} s per object", flush=True)
    write_readme(args.out, rows, meta)
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
