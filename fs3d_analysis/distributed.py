"""Evaluation sweeps, calibration measurements and scenes spread over Ray actors.

One actor holds one model replica: one GPU per actor (``num_gpus=1``) when the driver sees CUDA,
else one CPU core per actor (``num_cpus=1``; Ray then limits the actor's torch to one thread). The
model is built inside every actor by ``pipe_factory(device)`` (``device`` is ``"cuda"`` or
``"cpu"``), so it must build the same weights everywhere (a checkpoint, or a seeded random init).

Work is handed out one item at a time per actor from a queue held by the driver. When an actor dies
(process killed, ``os._exit``, node lost: a ``RayActorError``), the item it held goes back to the front
of the queue and a fresh actor takes the dead one's place; an item that kills ``max_retries + 1``
actors raises. An exception raised by the work itself (a bug, bad input) is not retried: it
propagates, as in the single-process harness. The driver is the only writer of results, and writes
each result once, when it arrives, so nothing is lost or duplicated.

* :func:`evaluate_ray`: the :func:`fs3d_analysis.eval.evaluate` sweep over (object, method) pairs.
  Each pair runs through ``evaluate`` itself inside the actor (same ``run_one``, ``score``, columns
  and CSV formatting); the driver appends the returned CSV row to ``<out>/results.csv``. Resumable
  exactly like ``evaluate`` (pairs already in ``results.csv`` are skipped), and the two harnesses can
  resume each other's files.
* :class:`RayMeasurePool`: a drop-in for :func:`fs3d_analysis.calibrate.measure` with the objects of a
  trial measured in parallel; ``fs3d calibrate --ray`` and ``calibrate(..., measure_fn=pool.measure)``.
* :func:`reconstruct_scenes_ray`: :func:`fs3d_analysis.scene.reconstruct_scene` per scene, scenes
  spread over the actors; one row of per-scene times per scene.
* :func:`reconstruct_scene_split`: one scene's objects spread over the actors (one batched share per
  GPU), for the per-scene time of a single large scene.

Ray is optional (``pip install fs3d[ray]``); everything here raises a clear ImportError without it.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import pandas as pd

from fs3d_analysis.eval import KEY

log = logging.getLogger(__name__)

PipeFactory = Callable[[str], Any]


def ray_available() -> bool:
    """Whether ``ray`` can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised only without ray
        raise ImportError("the Ray path needs ray: pip install 'fs3d[ray]' (or pip install ray)") from exc
    return ray


def check_ray_args(args) -> tuple[bool, int | None]:
    """``(use_ray, workers)`` from a CLI namespace's ``--ray`` / ``--workers``; exits with a clear message
    for ``--workers`` without ``--ray``, a count below 1, or ``--ray`` without ray installed."""
    use_ray, workers = bool(getattr(args, "ray", False)), getattr(args, "workers", None)
    if workers is not None and not use_ray:
        raise SystemExit(f"--workers {workers} needs --ray (it is the number of Ray actors)")
    if workers is not None and workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {workers}")
    if use_ray and not ray_available():
        raise SystemExit("--ray needs ray: pip install 'fs3d[ray]' (or pip install ray)")
    return use_ray, workers


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _check_retries(max_retries: Any) -> int:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    return max_retries


# ---------------------------------------------------------------------------------------------
# The actor: one model replica
# ---------------------------------------------------------------------------------------------


def _writable(sample):
    """``sample`` with its read-only arrays copied: Ray hands numpy arrays out of the object store
    read-only (zero-copy), and torch warns on (and must never write through) such arrays."""
    import dataclasses

    import numpy as np

    if not dataclasses.is_dataclass(sample):
        return sample
    ro = {f.name: getattr(sample, f.name).copy() for f in dataclasses.fields(sample) if f.init
          and isinstance(getattr(sample, f.name), np.ndarray) and not getattr(sample, f.name).flags.writeable}
    return dataclasses.replace(sample, **ro) if ro else sample


class _Replica:
    """Body of the Ray actor: builds the pipeline once, then runs one work item per call."""

    def __init__(self, pipe_factory: PipeFactory, device: str, score_fn: Callable | None = None) -> None:
        import os

        self.pipe = pipe_factory(device)
        self.pid = os.getpid()
        if score_fn is not None:
            # this process is ours alone: evaluate() inside it scores with score_fn
            import fs3d_analysis.eval as ev
            ev.score = score_fn

    def ping(self) -> int:
        return self.pid

    def eval_pair(self, sample, method: str, methods: Mapping[str, Callable], seed: int, setting: str) -> str:
        """One (object, method) pair through ``evaluate``; returns its results.csv text (header + row)."""
        from fs3d_analysis.eval import evaluate

        with tempfile.TemporaryDirectory(prefix="fs3d-ray-") as tmp:
            evaluate(self.pipe, [_writable(sample)], {method: methods[method]}, tmp, seed=seed, setting=setting,
                     progress=False)
            return (Path(tmp) / "results.csv").read_text()

    def measure(self, sample, accel, seed: int, quality: str) -> list[dict]:
        """``calibrate.measure`` on one object; its rows as records."""
        from fs3d_analysis.calibrate import measure

        return measure(self.pipe, [_writable(sample)], accel, seed, quality).to_dict(orient="records")

    def warmup(self, sample, seed: int) -> int:
        """One untimed run (kernels, allocator, caches), as ``calibrate.run_warmup`` does serially."""
        from fs3d_analysis.eval import run_one

        run_one(self.pipe, _writable(sample), None, seed)
        return self.pid

    def scene(self, samples: list, seed: int, batch: bool) -> dict:
        """``reconstruct_scene`` on one scene; its per-scene row."""
        from fs3d_analysis.scene import reconstruct_scene, scene_row

        result = reconstruct_scene(self.pipe, [_writable(s) for s in samples], seed, batch=batch)
        return scene_row(result, str(self.pipe.device))


@dataclass
class PoolStats:
    """What a pool did: items finished, actors that died (and were replaced), actors started."""

    finished: int = 0
    retries: int = 0
    actors_started: int = 0


class ReplicaPool:
    """Ray actors, each holding one pipeline replica, fed one item at a time by the driver.

    ``num_workers=None``: one actor per GPU of the Ray cluster when ``use_gpu``, else one per CPU.
    ``use_gpu=None``: GPUs when the driver sees CUDA; ``cap`` bounds the number of actors (no more
    actors than work items). ``score_fn`` replaces ``eval.score`` in the actors. Starts
    ``ray.init`` (no dashboard) if Ray is not running yet and shuts it down again in :meth:`close`.
    """

    def __init__(self, pipe_factory: PipeFactory, num_workers: int | None = None, use_gpu: bool | None = None,
                 max_retries: int = 3, score_fn: Callable | None = None, cap: int | None = None) -> None:
        if not callable(pipe_factory):
            raise TypeError(f"pipe_factory must be callable (device -> Pipeline), got {type(pipe_factory).__name__}")
        _check_retries(max_retries)
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 1):
            raise ValueError(f"num_workers must be an int >= 1 or None, got {num_workers!r}")
        ray = _ray()
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        self.use_gpu = _cuda_available() if use_gpu is None else bool(use_gpu)
        resources = ray.cluster_resources()
        kind = "GPU" if self.use_gpu else "CPU"
        available = int(resources.get(kind, 0))
        if available < 1:
            raise ValueError(f"the Ray cluster has no {kind} for a worker (resources {resources})")
        self.num_workers = min(num_workers or available, cap or 10**9)
        self.max_retries = max_retries
        self.device = "cuda" if self.use_gpu else "cpu"
        opts: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0}
        if self.use_gpu:
            opts["num_gpus"] = 1
        self._cls = ray.remote(**opts)(_Replica)
        self._factory = ray.put(pipe_factory)
        self._score_fn = score_fn
        self.stats = PoolStats()
        self._actors: list[Any] = []
        for _ in range(self.num_workers):
            self._actors.append(self._start())

    def _start(self):
        self.stats.actors_started += 1
        return self._cls.remote(self._factory, self.device, self._score_fn)

    def _replace(self, slot: int) -> None:
        ray = _ray()
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self._actors[slot] = self._start()

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        """``actor.<method>(*args)`` on every actor (no retry); their results in actor order."""
        ray = _ray()
        return ray.get([getattr(a, method).remote(*args) for a in self._actors])

    @property
    def actors(self) -> list[Any]:
        """The live actor handles (for monitoring, or for killing one in a test)."""
        return list(self._actors)

    def map_unordered(self, method: str, items: Sequence[tuple[Hashable, tuple]],
                      on_submit: Callable[[Hashable, int], None] | None = None,
                      max_retries: int | None = None) -> Iterator[tuple[Hashable, Any]]:
        """Call ``actor.<method>(*args)`` for every ``(key, args)``; yields ``(key, value)`` as they finish.

        Each key is yielded exactly once. ``on_submit(key, slot)`` is called when an item is handed
        to actor ``slot`` (a hook for progress display and for tests). ``max_retries`` overrides
        the pool's for this call.
        """
        limit = self.max_retries if max_retries is None else _check_retries(max_retries)
        ray = _ray()
        from ray.exceptions import RayActorError, WorkerCrashedError

        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("map_unordered keys must be unique")
        queue = deque(items)
        idle = deque(range(len(self._actors)))
        flight: dict[Any, tuple[int, Hashable, tuple]] = {}
        failures: dict[Hashable, int] = {}
        try:
            while queue or flight:
                while queue and idle:
                    slot = idle.popleft()
                    key, args = queue.popleft()
                    ref = getattr(self._actors[slot], method).remote(*args)
                    flight[ref] = (slot, key, args)
                    if on_submit is not None:
                        on_submit(key, slot)
                ready, _ = ray.wait(list(flight), num_returns=1)
                ref = ready[0]
                slot, key, args = flight.pop(ref)
                try:
                    value = ray.get(ref)
                except (RayActorError, WorkerCrashedError) as exc:
                    failures[key] = failures.get(key, 0) + 1
                    self._replace(slot)  # the pool stays whole, also when we give up below
                    if failures[key] > limit:
                        raise RuntimeError(f"{key!r}: its worker died {failures[key]} times "
                                           f"(max_retries={limit}); last error: {exc}") from exc
                    self.stats.retries += 1
                    log.warning("worker %d died on %r (%s); retrying on another worker", slot, key,
                                type(exc).__name__)
                    queue.appendleft((key, args))
                    idle.append(slot)
                    continue
                idle.append(slot)
                self.stats.finished += 1
                yield key, value
        finally:  # an error or an abandoned generator: drop what is still queued on the actors
            for ref in flight:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # already finished, or not cancellable while running
                    pass

    def close(self) -> None:
        ray = _ray()
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self._actors = []
        if self._own_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Evaluation sweep
# ---------------------------------------------------------------------------------------------


def _finished(csv: Path) -> set[tuple[str, str, str]]:
    if not csv.is_file():
        return set()
    done = pd.read_csv(csv)
    return set(map(tuple, done[KEY].astype(str).values.tolist())) if len(done) else set()


def _append(csv: Path, text: str, key: tuple) -> None:
    """Append a one-pair results.csv (header + row) produced by ``evaluate`` to ``csv``, aligned by
    column name (a failed pair's row has fewer columns); values keep their exact text."""
    import csv as csvlib
    import io

    from fs3d_analysis.eval import append_row

    records = list(csvlib.DictReader(io.StringIO(text)))
    if len(records) != 1:
        raise ValueError(f"{key}: expected one result row, got {len(records)}")
    append_row(csv, records[0])


def evaluate_ray(pipe_factory: PipeFactory, samples: Sequence, methods: Mapping[str, Callable],
                 out_dir: str | Path, num_workers: int | None = None, seed: int = 0, setting: str = "default",
                 max_retries: int = 3, *, use_gpu: bool | None = None, score_fn: Callable | None = None,
                 progress: bool = True, pool: ReplicaPool | None = None) -> pd.DataFrame:
    """:func:`fs3d_analysis.eval.evaluate` with the (object, method) pairs spread over Ray actors.

    Writes the same ``<out_dir>/results.csv`` rows (in arrival order) and returns the full table like
    ``evaluate``; ``table.attrs`` holds ``computed`` (pairs run now), ``retries`` (worker deaths
    survived), ``workers`` and ``wall_s``. ``methods`` values are factories (pickled to the actors).
    ``score_fn(result, sample)`` replaces ``eval.score`` inside the actors (e.g. a cheaper metric);
    ``pool`` reuses a running :class:`ReplicaPool` (then ``pipe_factory``, ``num_workers``,
    ``use_gpu`` and ``score_fn`` are the pool's).
    """
    from tqdm.auto import tqdm

    samples = list(samples)
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        raise ValueError("sample names must be unique (they key the results table)")
    if not methods:
        raise ValueError("no methods to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    finished = _finished(csv)
    todo = [(s, m) for s in samples for m in methods if (s.name, m, setting) not in finished]
    t0 = time.perf_counter()
    stats = PoolStats()
    n_workers = 0
    if todo:
        own = pool is None
        if own:
            pool = ReplicaPool(pipe_factory, num_workers, use_gpu, max_retries, score_fn, cap=len(todo))
        ray = _ray()
        try:
            before = PoolStats(**vars(pool.stats))
            refs = {s.name: ray.put(s) for s in {s.name: s for s, _ in todo}.values()}
            methods_ref = ray.put(dict(methods))
            items = [((s.name, m, setting), (refs[s.name], m, methods_ref, seed, setting)) for s, m in todo]
            bar = tqdm(total=len(items), desc=f"eval {setting} (ray x{pool.num_workers})", disable=not progress)
            for key, text in pool.map_unordered("eval_pair", items, max_retries=max_retries):
                _append(csv, text, key)
                bar.update(1)
            bar.close()
            stats = PoolStats(pool.stats.finished - before.finished, pool.stats.retries - before.retries,
                              pool.stats.actors_started - before.actors_started)
            n_workers = pool.num_workers
        finally:
            if own:
                pool.close()
    table = pd.read_csv(csv)
    table.attrs.update(computed=stats.finished, retries=stats.retries, workers=n_workers,
                       wall_s=time.perf_counter() - t0)
    return table


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


class RayMeasurePool:
    """Drop-in for :func:`fs3d_analysis.calibrate.measure`: one trial's objects measured in parallel.

    ``pool.measure(pipe, samples, accel, seed, quality)`` returns the table ``calibrate.measure``
    returns (same columns, rows in sample order); ``pipe`` is ignored (the actors hold replicas built
    by ``pipe_factory``). The accelerator is pickled to the actors, so every object starts from a
    fresh copy of it (the serial ``measure`` reuses one instance; the registry's policies reset per
    object, so the two agree). On CPU each actor has one core: wall-time speedups measured this
    way are single-thread speedups.

    Wired into the calibration: ``calibrate(pipe, samples, ..., measure_fn=pool.measure)`` measures the
    base and every trial with it (``pipe`` then only names the model in the study's settings), and
    ``fs3d calibrate --ray [--workers N]`` (:func:`fs3d_analysis.calibrate.main`) builds the pool from
    the model arguments (:class:`CliPipeFactory`) and calls :meth:`warmup` once before a wall-time search.
    """

    def __init__(self, pipe_factory: PipeFactory | None, num_workers: int | None = None,
                 use_gpu: bool | None = None, max_retries: int = 3, pool: ReplicaPool | None = None) -> None:
        self._own = pool is None
        self.pool = ReplicaPool(pipe_factory, num_workers, use_gpu, max_retries) if pool is None else pool
        self._refs: dict[int, Any] = {}

    def warmup(self, sample, seed: int = 0) -> None:
        """One untimed run of ``sample`` on every actor (wall-time objectives need warm replicas)."""
        self.pool.broadcast("warmup", self._ref(sample), seed)

    def _ref(self, sample):
        key = id(sample)
        if key not in self._refs:
            self._refs[key] = (sample, _ray().put(sample))  # keep the sample alive: ids stay unique
        return self._refs[key][1]

    def measure(self, pipe, samples: Sequence, accel, seed: int = 0, quality: str = "fast") -> pd.DataFrame:
        samples = list(samples)
        accel_ref = _ray().put(accel)
        items = [(i, (self._ref(s), accel_ref, seed, quality)) for i, s in enumerate(samples)]
        rows: dict[int, list[dict]] = dict(self.pool.map_unordered("measure", items))
        return pd.DataFrame([r for i in range(len(samples)) for r in rows[i]])

    __call__ = measure

    def close(self) -> None:
        self._refs.clear()
        if self._own:
            self.pool.close()

    def __enter__(self) -> "RayMeasurePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


def reconstruct_scenes_ray(pipe_factory: PipeFactory, samples: Sequence, seed: int = 0, batch: bool = True,
                           num_workers: int | None = None, *, use_gpu: bool | None = None,
                           max_retries: int = 3, pool: ReplicaPool | None = None) -> pd.DataFrame:
    """Every scene of ``samples`` through ``reconstruct_scene`` on the actors; one row per scene
    (``scene_row`` columns), in scene order."""
    from fs3d_analysis.scene import group_scenes

    scenes = group_scenes(samples)
    if not scenes:
        raise ValueError("no samples")
    own = pool is None
    if own:
        pool = ReplicaPool(pipe_factory, num_workers, use_gpu, max_retries, cap=len(scenes))
    ray = _ray()
    try:
        items = [(sid, (ray.put(objs), seed, batch)) for sid, objs in scenes.items()]
        rows = dict(pool.map_unordered("scene", items))
    finally:
        if own:
            pool.close()
    return pd.DataFrame([rows[sid] for sid in scenes])


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """``items`` cut into ``min(parts, len(items))`` contiguous shares whose sizes differ by at most one."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an int >= 1, got {parts!r}")
    items = list(items)
    parts = min(parts, len(items))
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + q + (i < r)
        out.append(items[start:stop])
        start = stop
    return out


def reconstruct_scene_split(pool: ReplicaPool, samples: Sequence, seed: int = 0, batch: bool = True) -> dict:
    """One scene spread over the pool's actors: its objects cut into one contiguous share per actor,
    each share reconstructed (batched) by ``reconstruct_scene`` on its own replica.

    Every object keeps the seeds of the single-object pipeline, so the split changes no result beyond
    batched-matmul rounding. Returns the scene's row: ``time_total`` is the driver's wall clock from
    dispatch to the last share (Ray overhead included), ``time_<stage>_max`` the slowest share's stage
    time, ``shares`` the per-share rows.
    """
    from fs3d_analysis.scene import check_scene

    samples = list(samples)
    scene_id = check_scene(samples)
    ray = _ray()
    shares = split_evenly(samples, pool.num_workers)
    items = [(i, (ray.put([_writable(s) for s in share]), seed, batch)) for i, share in enumerate(shares)]
    t0 = time.perf_counter()
    rows = dict(pool.map_unordered("scene", items))
    wall = time.perf_counter() - t0
    ordered = [rows[i] for i in range(len(shares))]
    stages = sorted({k for r in ordered for k in r if k.startswith("time_") and k != "time_total"})
    return {"scene_id": scene_id, "n_objects": len(samples), "workers": len(shares), "time_total": wall,
            **{f"{k}_max": max(r.get(k, 0.0) for r in ordered) for k in stages},
            "share_time_total_max": max(r["time_total"] for r in ordered),
            "n_voxels": sum(r["n_voxels"] for r in ordered), "n_faces": sum(r["n_faces"] for r in ordered),
            "shares": ordered}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliPipeFactory:
    """Builds the pipeline the ``fs3d`` model arguments name, on the device an actor is given."""

    weights: str = "sam3d-mini"
    checkpoint: str | None = None
    config: str | None = None
    fast_path: str = "off"
    slat_compile_mode: str | None = None
    #: ``--cublaslt-workspace-kib`` (``auto`` or KiB), applied in each actor's process before its model is built
    cublaslt_workspace_kib: str | int = "auto"

    @classmethod
    def from_args(cls, args) -> "CliPipeFactory":
        return cls(weights=args.weights, checkpoint=args.checkpoint, config=args.config,
                   fast_path=getattr(args, "fast_path", "off"),
                   slat_compile_mode=getattr(args, "slat_compile_mode", None),
                   cublaslt_workspace_kib=getattr(args, "cublaslt_workspace_kib", "auto"))

    def __call__(self, device: str = "cpu"):
        from fs3d_accel.cli import _load_pipeline

        return _load_pipeline(argparse.Namespace(weights=self.weights, checkpoint=self.checkpoint,
                                                 config=self.config, device=device, fast_path=self.fast_path,
                                                 slat_compile_mode=self.slat_compile_mode,
                                                 cublaslt_workspace_kib=self.cublaslt_workspace_kib))


def eval_main(args, samples: Sequence, methods: Mapping[str, Callable]) -> pd.DataFrame:
    """The ``fs3d eval --ray`` sweep (``--workers N``; default one per GPU, else per CPU)."""
    use_gpu = str(args.device).startswith("cuda")
    return evaluate_ray(CliPipeFactory.from_args(args), samples, methods, args.out,
                        num_workers=getattr(args, "workers", None), seed=args.seed, use_gpu=use_gpu)


__all__ = ["CliPipeFactory", "PoolStats", "check_ray_args", "RayMeasurePool", "ReplicaPool", "eval_main", "evaluate_ray",
           "ray_available", "reconstruct_scene_split", "reconstruct_scenes_ray", "split_evenly"]
