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
5. the mesh decoder network, and copies of its output to pinned host memory (asynchronous). The mesh extraction
   (marching cubes and colours: 0.81 s per 14k-voxel object at the full config's 256^3 on this project's 2-core
   CPU machine, ``benchmarks/results/mesh_extract_cpu/``) then runs on a worker thread on those host copies, handed over after the next object's step 1 (which
   synchronises anyway, so the copies are done), while the next object's steps 2-5 run (``overlap_extraction``). The
   worker makes no CUDA call: a synchronising call from another thread would spoil a CUDA-graph recording made in
   ``torch.cuda.graph``'s global capture mode. With token transforms (``decoder_transform``, ``coords_transform``),
   whose vertex restores may read device state, the extraction stays on the main thread.

Each object's result is what :meth:`Pipeline.run_prepared` gives it (the same seeds, generators and operations per
object; only the order of work across objects changes): ``tests/test_stream.py`` checks it bit for bit. What it buys
is throughput, not latency (an object's SLaT waits for the next object's SS): measure it with
``benchmarks/stream_throughput.py``. It pays only where the SLaT sampler reads no device data on the host after
``prepare`` (the exact fast path with ``cuda_graphs``; step policies that read device values synchronise and so drain
the queue, with the same results).
"""
from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import torch

from .model.sparse import SparseTensor
from .preprocess import PreparedInputs
from .stages.decode import DecodedNetwork
from .stages.types import SSOutput

if TYPE_CHECKING:
    from .pipeline import Pipeline, Result

#: ``decode(latents, inputs, generator) -> SSOutput``: how SS latents become voxels (default: the SS stage's own)
StructureFn = Callable[[dict, PreparedInputs, object], SSOutput]


def run_stream(pipe: "Pipeline", inputs: Sequence[PreparedInputs], seeds: Iterable[int] | None = None, *,
               structure: StructureFn | None = None, overlap_extraction: bool = True) -> Iterator["Result"]:
    """Each object's :class:`~fs3d_accel.pipeline.Result`, in order, with the next object's SS sampler queued
    behind the current object's SLaT start (module docstring). ``seeds``: one per object (default 0, 1, 2, ...).
    ``structure``: replaces the SS stage's ``decode_structure`` (benchmarks feed fixed voxels this way). Each result's
    ``timings`` has ``stream_s``: the host seconds the stream spent on it since the previous result (the caller's time
    between results not counted; the first object's includes its SS sampler). No stage events are emitted, and the
    step events of different objects interleave (the next object's SS steps come before this object's SLaT steps),
    with nothing naming the object: a recorder that assumes one object at a time must not subscribe.
    ``overlap_extraction``: extract each object's mesh on a worker thread while the next object's stages run; each
    result then comes once the next object's GPU work is queued. The arguments are checked here, before the first
    result is asked for."""
    items = list(inputs)
    seed_list = list(range(len(items))) if seeds is None else list(seeds)
    bad = [s for s in seed_list if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
    if bad:
        raise TypeError(f"run_stream seeds must be integers, got {bad[:3]!r}")
    seed_list = [int(s) for s in seed_list]
    if len(seed_list) != len(items):
        raise ValueError(f"run_stream needs one seed per object: {len(items)} objects, {len(seed_list)} seeds")
    for i, item in enumerate(items):
        if not isinstance(item, PreparedInputs):
            raise TypeError(f"object {i}: run_stream takes PreparedInputs (Pipeline.prepare), got {type(item).__name__}")
    if not isinstance(overlap_extraction, bool):
        raise TypeError(f"overlap_extraction must be True or False, got {overlap_extraction!r}")
    if items:
        pipe.options.check_device(pipe.device)
    transforms = pipe.accel.decoder_transform is not None or pipe.accel.coords_transform is not None
    return _stream(pipe, items, seed_list, structure, overlap_extraction and not transforms)


class _Finishing:
    """One object between its decoder network and its result: the network's output copied to pinned host memory
    (asynchronously, behind an event), then extracted on the worker or inline."""

    def __init__(self, pipe: "Pipeline", network: DecodedNetwork, fields: dict) -> None:
        self.pipe, self.fields, self.source = pipe, fields, network
        out = network.out
        self.event = None
        self.host = None
        if out.feats.device.type == "cuda":
            feats = out.feats.detach().float()
            self.host = (torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True),
                         torch.empty(out.coords.shape, dtype=out.coords.dtype, pin_memory=True))
            self.host[0].copy_(feats, non_blocking=True)
            self.host[1].copy_(out.coords, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        self.network = None
        self.future = None

    def host_ready(self) -> None:
        """Wait for the copies (on the main thread, where the caller synchronises anyway), then wrap them; off CUDA
        the network's own output is extracted."""
        if self.network is not None:
            return
        if self.event is None:
            self.network = self.source
        else:
            self.event.synchronize()
            out = self.source.out
            self.network = DecodedNetwork(out=SparseTensor.create(*self.host, batch_size=out.cache.get("batch_size")),
                                          num_tokens=self.source.num_tokens, state=self.source.state)
        self.source = self.event = self.host = None

    def extract(self):
        return self.pipe.decode.extract(self.network, self.fields["ss"], self.fields["slat"],
                                        decoder_transform=self.pipe.accel.decoder_transform,
                                        coords_transform=self.pipe.accel.coords_transform)

    def start(self, extractor: ThreadPoolExecutor | None) -> None:
        self.host_ready()
        if extractor is not None:
            self.future = extractor.submit(self.extract)

    def result(self, resumed: float) -> "Result":
        from .pipeline import Result
        if self.future is None:
            self.host_ready()
            decode = self.extract()
        else:
            decode = self.future.result()  # re-raises the extraction's error
        return Result(decode=decode, **self.fields, timings={"stream_s": time.perf_counter() - resumed})


def _stream(pipe: "Pipeline", items: list[PreparedInputs], seed_list: list[int], structure: StructureFn | None,
            overlap_extraction: bool) -> Iterator["Result"]:
    if not items:
        return
    decode_structure = structure or (lambda lat, inp, gen: pipe.ss.decode_structure(lat, inp, gen, pipe.options))

    def queue_ss(k: int):
        generator = pipe._generators(seed_list[k])[0]
        latents = pipe.ss.sample_latents(items[k], generator=generator, policy=pipe.accel.ss_policy,
                                         events=pipe.events, options=pipe.options)
        return latents, generator

    resumed = time.perf_counter()  # the generator's own time between results, not its caller's
    extractor = None
    extraction_failed = False

    def finish(done: _Finishing, since: float) -> "Result":
        nonlocal extraction_failed
        try:
            return done.result(since)
        except Exception:
            extraction_failed = True
            raise

    def drain(objects) -> Iterator["Result"]:
        """The results of the objects still between their network and their result, in order."""
        nonlocal resumed
        for done in objects:
            if done is not None:
                if done.future is None:
                    done.start(extractor)
                yield finish(done, resumed)
                resumed = time.perf_counter()

    started = None  # the previous object: host copies done, its extraction running on the worker
    copying = None  # the current object's predecessor whose host copies are queued, not yet handed to the worker
    try:
        if overlap_extraction:
            extractor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs3d-extract")
        pending = queue_ss(0)
        for i, inp in enumerate(items):
            latents, generator = pending
            pending = None
            ss = decode_structure(latents, inp, generator)  # synchronises: the copies queued before are done
            if copying is not None:
                copying.start(extractor)
                started, copying = copying, None
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
            copying = _Finishing(pipe, network, dict(inputs=inp, ss=ss, slat=slat, seed=seed_list[i]))
            if not overlap_extraction:
                done, copying = copying, None
                yield finish(done, resumed)
                resumed = time.perf_counter()
            elif started is not None:
                done, started = started, None
                yield finish(done, resumed)
                resumed = time.perf_counter()
        last, started, copying = (started, copying), None, None
        yield from drain(last)
    except Exception:
        # an object failed: the ones before it come first, in order, once extracted (a failed extraction raises its
        # own error there); after a failed extraction, nothing after that object comes
        if extraction_failed:
            raise
        last, started, copying = (started, copying), None, None
        yield from drain(last)
        raise
    finally:
        if extractor is not None:
            extractor.shutdown(wait=True, cancel_futures=True)


__all__ = ["run_stream"]
