"""Run a stream of objects with the next object's SS sampler queued behind the current object's SLaT start.

Why: on the exact fast path SLaT's kernels alone run at ~57.5% of the executed FLOPs at 14k voxels on an H100, but its
call runs at ~50%: the GPU idles 50-72 ms at the start of each call, most of it while the host records the CFG-batched
CUDA graph with nothing queued ahead of it (``benchmarks/results/base_vs_official_h100/session18/``). One object's SLaT
needs its own SS result, so within an object nothing can fill that gap; in a stream the next object's SS sampler can.
Each object then runs:

1. ``decode_structure`` of its SS latents (synchronises: the voxel count decides SLaT's shapes);
2. ``SLaTStage.prepare(build_tables=True)``: condition, noise, and every host read of SLaT's first passes (the
   coordinate structures' tables), while the GPU is idle anyway;
3. the next object's SS sampler (``SSStage.sample_latents``), queued without waiting for it: ~0.65 s of GPU work;
4. ``SLaTRun.sample()``: the eager pass or recording of SLaT's graphs now overlaps step 3's GPU work, and SLaT's kernels
   queue behind it;
5. the mesh decoder network; the mesh extraction (marching cubes and colours on the host: ~1.4-2.2 s per 14k-voxel
   object at the full config's 256^3 on this project's 2-core CPU machine, none of it GPU work) runs on a worker
   thread while the next object's steps 1-5 run (``overlap_extraction``).

Each object's result is what :meth:`Pipeline.run_prepared` gives it (the same seeds, generators and operations per
object; only the order of work across objects changes): ``tests/test_stream.py`` checks it bit for bit. What it buys
is throughput, not latency (an object's SLaT waits for the next object's SS): measure it with
``benchmarks/stream_throughput.py``. It pays only where the SLaT sampler reads no device data on the host after
``prepare`` (the exact fast path with ``cuda_graphs``; step policies that read device values synchronise and so drain
the queue, with the same results).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

from .preprocess import PreparedInputs
from .stages.types import SSOutput

if TYPE_CHECKING:
    from .pipeline import Pipeline, Result

#: ``decode(latents, inputs, generator) -> SSOutput``: how SS latents become voxels (default: the SS stage's own)
StructureFn = Callable[[dict, PreparedInputs, object], SSOutput]


def run_stream(pipe: "Pipeline", inputs: Sequence[PreparedInputs], seeds: Iterable[int] | None = None, *,
               structure: StructureFn | None = None, overlap_extraction: bool = True) -> Iterator["Result"]:
    """Yield each object's :class:`~fs3d_accel.pipeline.Result`, in order, with the next object's SS sampler queued
    behind the current object's SLaT start (module docstring). ``seeds``: one per object (default 0, 1, 2, ...).
    ``structure``: replaces the SS stage's ``decode_structure`` (benchmarks feed fixed voxels this way). Each result's
    ``timings`` has ``stream_s``: the host seconds the stream spent on it since the previous result (the caller's time
    between results not counted; the first object's includes its SS sampler). No stage events are emitted (the stages
    interleave); step events are, as in a plain run. ``overlap_extraction``: extract each object's mesh (marching
    cubes on the host, ~1.4-2.2 s per 14k-voxel object at full size on 2 CPU cores) on a worker thread while the next
    object's stages run; each result then comes once the next object's GPU work is queued."""
    from .pipeline import Result

    items = list(inputs)
    seed_list = list(range(len(items))) if seeds is None else [int(s) for s in seeds]
    if len(seed_list) != len(items):
        raise ValueError(f"run_stream needs one seed per object: {len(items)} objects, {len(seed_list)} seeds")
    for i, item in enumerate(items):
        if not isinstance(item, PreparedInputs):
            raise TypeError(f"object {i}: run_stream takes PreparedInputs (Pipeline.prepare), got {type(item).__name__}")
    if not items:
        return
    pipe.options.check_device(pipe.device)
    decode_structure = structure or (lambda lat, inp, gen: pipe.ss.decode_structure(lat, inp, gen, pipe.options))

    def queue_ss(k: int):
        generator = pipe._generators(seed_list[k])[0]
        latents = pipe.ss.sample_latents(items[k], generator=generator, policy=pipe.accel.ss_policy,
                                         events=pipe.events, options=pipe.options)
        return latents, generator

    resumed = time.perf_counter()  # the generator's own time between results, not its caller's
    extractor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs3d-extract") if overlap_extraction else None
    waiting = None  # (future of the previous object's DecodeOutput, its Result fields)
    pending = queue_ss(0)
    try:
        for i, inp in enumerate(items):
            latents, generator = pending
            pending = None
            ss = decode_structure(latents, inp, generator)
            run = pipe.slat.prepare(inp, ss, generator=pipe._generators(seed_list[i])[1],
                                    policy=pipe.accel.slat_policy, events=pipe.events, options=pipe.options,
                                    coords_transform=pipe.accel.coords_transform, build_tables=True)
            try:
                if i + 1 < len(items):
                    pending = queue_ss(i + 1)
                slat = run.sample()
            finally:
                run.release()
            network = pipe.decode.run_network(inp, ss, slat, options=pipe.options,
                                              decoder_transform=pipe.accel.decoder_transform)
            fields = dict(inputs=inp, ss=ss, slat=slat, seed=seed_list[i])
            extract = partial(pipe.decode.extract, network, ss, slat, decoder_transform=pipe.accel.decoder_transform,
                              coords_transform=pipe.accel.coords_transform)
            if extractor is None:
                result = Result(decode=extract(), **fields, timings={"stream_s": time.perf_counter() - resumed})
                yield result
                resumed = time.perf_counter()
                continue
            # this object's mesh is extracted on the worker while the next object's GPU work is queued; the previous
            # object's result is complete once its extraction is
            future = extractor.submit(extract)
            if waiting is not None:
                yield _finished(*waiting, resumed)
                resumed = time.perf_counter()
            waiting = (future, fields)
        if waiting is not None:
            last, waiting = waiting, None
            yield _finished(*last, resumed)
    except Exception:
        # an object failed: the one before it is complete once its extraction is, and comes first (a failed
        # extraction raises its own error there)
        if waiting is not None:
            last, waiting = waiting, None
            yield _finished(*last, resumed)
        raise
    finally:
        if extractor is not None:
            extractor.shutdown(wait=True, cancel_futures=True)


def _finished(future, fields: dict, resumed: float) -> "Result":
    from .pipeline import Result
    decode = future.result()  # re-raises the extraction's error
    return Result(decode=decode, **fields, timings={"stream_s": time.perf_counter() - resumed})


__all__ = ["run_stream"]
