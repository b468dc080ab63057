"""Scene mode: reconstruct every object of one image, batching the stages where shapes allow.

The SS latents have the same shape for every object (``(1, R^3, 8)`` + the layout tokens), so the B
objects of a scene go through the SS flow sampler as one batch of B (2B with batched CFG). The
per-object SLaT latents differ in length (N_i voxels); the sparse SLaT flow still takes them in one
call through the batch column of the coordinates (rows of object i carry batch index i). The mesh
decoder runs per object.

Every object gets the seeds the single-object pipeline uses (``pipe(image, mask, seed=seed)``), with
its own noise generator, so a batched scene equals the per-object runs up to floating-point
reassociation of the batched matrix products (checked in ``tests/test_scene.py``).

Batching needs the step decisions of every object to be its own: with an SS (SLaT) step policy or a
SLaT coordinate transform set on ``pipe.accel`` that stage runs per object and the result says so
(``ss_batched`` / ``slat_batched``). Listeners on ``pipe.events`` see the batched latents of a
batched stage (one StepEvent per step for the whole scene).

The per-scene time (:attr:`SceneResult.timings`, ``"total"``) is the wall time from the scene's
images to all its meshes, the quantity of the paper's scene column.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, TypeVar

import pandas as pd
import torch
from torch import Tensor

from fs3d_accel.pipeline import SLAT_SEED_OFFSET, Pipeline, Result
from fs3d_accel.seams import StageEvent
from fs3d_accel.preprocess import PreparedInputs
from fs3d_accel.model.sparse import release_structure
from fs3d_accel.samplers import EulerFlowSampler, guided
from fs3d_accel.stages.slat import slat_noise
from fs3d_accel.stages.ss import ss_noise
from fs3d_accel.stages.types import SLaTOutput, SSOutput

T = TypeVar("T")


@dataclass
class SceneResult:
    """All objects of one scene, in the order given, and the scene's wall seconds per stage."""

    scene_id: int
    objects: list[str]
    results: list[Result]
    #: wall seconds for the whole scene: prepare, ss, slat, decode, total
    timings: dict[str, float] = field(default_factory=dict)
    ss_batched: bool = False
    slat_batched: bool = False

    def __len__(self) -> int:
        return len(self.results)


def group_scenes(samples: Sequence) -> dict[int, list]:
    """Samples grouped by ``scene_id`` (first-seen order), each scene ordered by ``object_index``."""
    scenes: dict[int, list] = {}
    for s in samples:
        scenes.setdefault(int(s.scene_id), []).append(s)
    return {k: sorted(v, key=lambda s: s.object_index) for k, v in scenes.items()}


def check_scene(samples: Sequence) -> int:
    """The common ``scene_id`` of ``samples``; raises if they are empty or from different scenes."""
    samples = list(samples)
    if not samples:
        raise ValueError("a scene needs at least one sample")
    ids = sorted({int(s.scene_id) for s in samples})
    if len(ids) != 1:
        raise ValueError(f"samples come from several scenes {ids}; call reconstruct_scene once per scene "
                         "(see group_scenes)")
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of scene {ids[0]} have different image shapes {sorted(shapes)}")
    return ids[0]


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The SS and SLaT noise generators of ``Pipeline`` for ``seed``."""
    return torch.Generator().manual_seed(int(seed)), torch.Generator().manual_seed(int(seed) + SLAT_SEED_OFFSET)


def _conditions(pipe: Pipeline, stage, inputs: list[PreparedInputs],
                kwargs: Callable[[PreparedInputs], dict]) -> Tensor:
    """One condition-embedder call for the B objects (inputs concatenated on the batch axis)."""
    device = pipe.device
    opts = pipe.options
    dtype = opts.compute_dtype(device)
    per = [kwargs(i.to(device)) for i in inputs]
    batch = {k: torch.cat([p[k] for p in per], 0).to(dtype) for k in per[0]}
    with opts.network_context(device, "ss" if stage is pipe.ss else "slat"):
        return stage.condition(**batch).float()


def _guided_batch(make_raw: Callable[[Tensor], Callable], cond: Tensor, sampler_cfg, batch_cfg: bool,
                  cat: Callable[[T, T], T], split: Callable[[T, int], tuple[T, T]]):
    """CFG over a batch of B objects from a stage's ``velocity_net`` run without guidance.

    ``make_raw(c)`` returns the stage's conditional velocity for condition batch ``c`` (guidance off);
    the unconditional branch is the same network with ``c * 0``, as in the stages.
    """
    uncond = cond * 0
    raw_c, raw_u = make_raw(cond), make_raw(uncond)

    def net_cond(x, t, active, is_uncond):
        return (raw_u if is_uncond else raw_c)(x, t, active)

    batched = None
    if batch_cfg:
        raw_both = make_raw(torch.cat([cond, uncond], 0))

        def batched(x, t, active):
            return split(raw_both(cat(x, x), t, active), cond.shape[0])

    return guided(net_cond, sampler_cfg, batched)


@torch.no_grad()
def batched_ss(pipe: Pipeline, inputs: Sequence[PreparedInputs], seed: int = 0) -> list[SSOutput]:
    """The SS stage for B objects with one flow call per step (no SS step policy allowed).

    Object i gets the noise and the voxel sub-sampling generator ``pipe.run_ss(inputs[i], seed)`` uses.
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("batched_ss needs at least one object")
    if pipe.accel.ss_policy is not None:
        raise ValueError(f"batched_ss cannot batch an SS step policy ({pipe.accel.name}): its decisions "
                         "would be shared by all objects; run the objects one by one")
    ss, cfg, opts = pipe.ss, pipe.config.ss_sampler, pipe.options
    device = pipe.device
    cond = _conditions(pipe, ss, inputs, PreparedInputs.ss_kwargs)
    gens = [_generators(seed)[0] for _ in inputs]
    noises = [ss_noise(pipe.config, g) for g in gens]
    x0 = {k: torch.cat([n[k] for n in noises], 0).to(device) for k in noises[0]}
    raw_cfg, raw_opts = replace(cfg, cfg_strength=0.0), replace(opts, batch_cfg=False)
    net = _guided_batch(lambda c: ss.velocity_net(c, raw_cfg, raw_opts), cond, cfg, opts.batch_cfg,
                        cat=lambda a, b: {k: torch.cat([a[k], b[k]], 0) for k in a},
                        split=lambda v, n: ({k: x[:n] for k, x in v.items()}, {k: x[n:] for k, x in v.items()}))
    latents = EulerFlowSampler(cfg, "ss").sample(x0, net, None, pipe.events)
    return [ss.decode_structure({k: v[i:i + 1] for k, v in latents.items()}, inp, g, opts)
            for i, (inp, g) in enumerate(zip(inputs, gens))]


@torch.no_grad()
def batched_slat(pipe: Pipeline, inputs: Sequence[PreparedInputs], ss_outputs: Sequence[SSOutput],
                 seed: int = 0) -> list[SLaTOutput]:
    """The SLaT stage for B objects in one sparse flow call per step (batch column = object index).

    Needs a plain SLaT stage (no SLaT step policy, no coordinate transform on ``pipe.accel``).
    """
    inputs, ss_outputs = list(inputs), list(ss_outputs)
    if len(inputs) != len(ss_outputs) or not inputs:
        raise ValueError(f"batched_slat needs as many SS outputs as inputs (>= 1), got {len(inputs)} and "
                         f"{len(ss_outputs)}")
    if pipe.accel.slat_policy is not None or pipe.accel.coords_transform is not None:
        raise ValueError(f"batched_slat cannot batch a SLaT step policy or coordinate transform "
                         f"({pipe.accel.name}); run the objects one by one")
    slat, cfg, opts = pipe.slat, pipe.config.slat_sampler, pipe.options
    device = pipe.device
    counts = [int(s.coords.shape[0]) for s in ss_outputs]
    if min(counts) == 0:
        raise ValueError("the SS stage produced no occupied voxel for an object; nothing for the SLaT stage to refine")
    coords = []
    for i, s in enumerate(ss_outputs):
        c = s.coords.to(device=device, dtype=torch.int32).clone()
        c[:, 0] = i
        coords.append(c)
    coords_b = torch.cat(coords, 0)
    b = len(inputs)
    coords_2b = torch.cat([coords_b, coords_b + torch.tensor([b, 0, 0, 0], dtype=torch.int32, device=device)], 0)
    cond = _conditions(pipe, slat, inputs, PreparedInputs.slat_kwargs)
    chans = pipe.config.slat_flow.in_channels
    x0 = torch.cat([slat_noise(n, chans, _generators(seed)[1]) for n in counts], 0).to(device)
    raw_cfg, raw_opts = replace(cfg, cfg_strength=0.0), replace(opts, batch_cfg=False)
    # one coordinate structure per coordinate set, reused by every step (and home of the CUDA graphs
    # when ``opts.cuda_graphs``); released below
    structures: list[dict] = []

    def make_raw(c: Tensor):
        return slat.velocity_net(c, coords_2b if c.shape[0] == 2 * b else coords_b, raw_cfg, raw_opts, structures)

    net = _guided_batch(make_raw, cond, cfg, opts.batch_cfg, cat=lambda a, c: torch.cat([a, c], 0),
                        split=lambda v, n: (v[:v.shape[0] // 2], v[v.shape[0] // 2:]))
    try:
        feats = EulerFlowSampler(cfg, "slat").sample(x0, net, None, pipe.events, extras={"coords": coords_b})
    finally:
        for structure in structures:
            release_structure(structure)
    out = []
    for s, f in zip(ss_outputs, torch.split(feats, counts, 0)):
        out.append(SLaTOutput(coords=s.coords.to(device), feats=f, slat=f * slat.std + slat.mean,
                              resolution=s.resolution))
    return out


def reconstruct_scene(pipe: Pipeline, samples: Sequence, seed: int = 0, batch: bool = True,
                      batch_slat: bool | None = None) -> SceneResult:
    """Reconstruct all objects of one scene (same image, one mask each).

    ``batch=False`` runs the objects one by one (the reference). ``batch=True`` batches the SS stage
    (and the SLaT stage when ``batch_slat``, default = ``batch``) wherever ``pipe.accel`` allows it.
    Per-object ``Result.timings`` hold each object's share of a batched stage (scene time / B).
    """
    samples = list(samples)
    scene_id = check_scene(samples)
    batch_slat = batch if batch_slat is None else batch_slat
    if batch_slat and not batch:
        raise ValueError("batch_slat=True needs batch=True")
    pipe.options.check_device(pipe.device)
    b = len(samples)
    timings: dict[str, float] = {}
    sync = (lambda: torch.cuda.synchronize(pipe.device)) if pipe.device.type == "cuda" else (lambda: None)

    def timed(name: str, fn: Callable[[], T]) -> T:
        emit = name != "prepare"  # listeners know the pipeline's stage names only
        if emit:
            pipe.events.emit(StageEvent(name, "start", {"scene": scene_id}))
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        dt = time.perf_counter() - t0
        timings[name] = timings.get(name, 0.0) + dt
        if emit:
            pipe.events.emit(StageEvent(name, "end", {"scene": scene_id, "seconds": dt}))
        return out

    t_start = time.perf_counter()
    inputs = timed("prepare", lambda: [pipe.prepare(s.image, s.mask, s.pointmap) for s in samples])
    ss_batched = batch and pipe.accel.ss_policy is None
    per: list[dict[str, float]] = [{} for _ in samples]
    if ss_batched:
        ss = timed("ss", lambda: batched_ss(pipe, inputs, seed))
        for p in per:
            p["ss"] = timings["ss"] / b
    else:
        ss = []
        for i, inp in enumerate(inputs):
            t0 = time.perf_counter()
            ss.append(timed("ss", lambda: pipe.run_ss(inp, seed)))
            per[i]["ss"] = time.perf_counter() - t0
    slat_batched = bool(batch_slat) and pipe.accel.slat_policy is None and pipe.accel.coords_transform is None
    if slat_batched:
        slats = timed("slat", lambda: batched_slat(pipe, inputs, ss, seed))
        for p in per:
            p["slat"] = timings["slat"] / b
    else:
        slats = []
        for i, (inp, s) in enumerate(zip(inputs, ss)):
            t0 = time.perf_counter()
            slats.append(timed("slat", lambda: pipe.run_slat(inp, s, seed)))
            per[i]["slat"] = time.perf_counter() - t0
    results = []
    for i, (inp, s, sl) in enumerate(zip(inputs, ss, slats)):
        t0 = time.perf_counter()
        dec = timed("decode", lambda: pipe.run_decode(inp, s, sl))
        per[i]["decode"] = time.perf_counter() - t0
        results.append(Result(inputs=inp, ss=s, slat=sl, decode=dec, seed=seed, timings=per[i]))
    timings["total"] = time.perf_counter() - t_start
    return SceneResult(scene_id=scene_id, objects=[s.name for s in samples], results=results, timings=timings,
                       ss_batched=ss_batched, slat_batched=slat_batched)


def scene_row(result: SceneResult, device: str = "") -> dict:
    """One row of the per-scene time table (the paper's scene column is ``time_total``)."""
    return {"scene_id": result.scene_id, "objects": ";".join(result.objects), "n_objects": len(result),
            **{f"time_{k}": v for k, v in result.timings.items()},
            "n_voxels": sum(int(r.ss.coords.shape[0]) for r in result.results),
            "n_faces": sum(len(r.mesh.faces) for r in result.results),
            "ss_batched": result.ss_batched, "slat_batched": result.slat_batched, "device": device}


def scene_times(pipe: Pipeline, samples: Sequence, seed: int = 0, batch: bool = True) -> pd.DataFrame:
    """Reconstruct every scene of ``samples`` (grouped by ``scene_id``); one :func:`scene_row` each."""
    return pd.DataFrame([scene_row(reconstruct_scene(pipe, objs, seed, batch=batch), str(pipe.device))
                         for objs in group_scenes(samples).values()])


__all__ = ["SceneResult", "batched_slat", "batched_ss", "check_scene", "group_scenes", "reconstruct_scene",
           "scene_row", "scene_times"]
