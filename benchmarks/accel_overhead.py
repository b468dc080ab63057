"""CPU timing of the accelerators' own per-object bookkeeping at full-scale sizes (no networks).

What is timed (medians of ``--repeats``, ``time.perf_counter``, CPU):

- :class:`SpectralTokenAggregation` (``fast-sam3d`` decoder transform): ``measure`` (HFER of a
  518x518 mask and of the 64^3 occupancy logits the ``full`` SS stage yields: 16^3 latent x 4),
  ``decide`` and ``reduce`` (measure + decide + floor(p/S) quantisation with max-pooled feats of
  width 8) on the real YCB surface voxels (``--object``, N ~ 20k for ``013_apple``); the bare
  quantisation ``quantize_tokens`` at S = 1.25 / 1.5 / 2; the released pre-SLaT variant.
- the SLaT step policies driven by :class:`~fs3d_accel.samplers.EulerFlowSampler` for 25 steps on
  (N, 8) latents, with a stub network returning a precomputed random velocity per step (rows
  ``active`` on carved steps), so the time minus the identity policy's is the policy's own cost:
  ``fast-sam3d`` (carving keep 0.1 + step cache), ``fast-sam3d-released``, ``fast3dcache``.

A second pass counts host-synchronisation points per call (``.item()``, ``float()/int()/bool()``
of a tensor, ``.tolist()``, ``.numpy()``, ``.cpu()``): on a GPU each of these blocks the host.

    OMP_NUM_THREADS=2 python benchmarks/accel_overhead.py --label after

``--label before`` saves the numbers as JSON next to the Markdown; the Markdown
(``benchmarks/results/accel_overhead_cpu.md``) shows every saved label side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fs3d_accel.accel import SLaTPolicy, SLaTStepCache, SLaTTokenCarving, SpectralTokenAggregation
from fs3d_accel.accel.baselines.fast3dcache import Fast3DCache
from fs3d_accel.accel.mesh_aggregation import quantize_tokens
from fs3d_accel.accel.spectral import hfer_2d, hfer_3d
from fs3d_accel.model.configs import SamplerConfig
from fs3d_accel.samplers import EulerFlowSampler
from fs3d_accel.seams import IdentityPolicy, SparseTokens, TransformContext

ROOT = Path(__file__).parent
COORDS = ROOT / "data" / "ycb_shipped_surface_coords_r64.npz"
RESULTS = ROOT / "results"
RES = 64          # full config: SS flow 16^3 latent, SS decoder upsamples x4 -> 64^3 occupancy logits
MASK_SIZE = 518   # full config image size
CHANNELS = 8      # SLaT latent width
STEPS = 25


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def load_coords(name: str) -> torch.Tensor:
    """(N,4) int32 [0, x, y, z] surface voxels of one YCB object at 64^3."""
    data = np.load(COORDS)
    if name not in data.files:
        raise ValueError(f"unknown object {name!r}; known: {sorted(data.files)}")
    xyz = torch.from_numpy(data[name].astype(np.int64))
    return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(torch.int32)


def make_logits(coords: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(64,64,64) float32 logits: positive exactly at the token voxels (as the SS stage yields them)."""
    g = torch.Generator().manual_seed(seed)
    logits = -torch.rand((RES,) * 3, generator=g) - 0.1
    c = coords[:, 1:].long()
    logits[c[:, 0], c[:, 1], c[:, 2]] = torch.rand(len(c), generator=g) * 5 + 0.1
    return logits


def make_mask(seed: int = 0) -> torch.Tensor:
    """A 518x518 bool mask: an ellipse with a wavy boundary (some high-frequency content)."""
    yy, xx = torch.meshgrid(torch.arange(MASK_SIZE, dtype=torch.float64),
                            torch.arange(MASK_SIZE, dtype=torch.float64), indexing="ij")
    ang = torch.atan2(yy - 250, xx - 270)
    r = 1 + 0.08 * torch.sin(9 * ang + seed)
    return ((yy - 250) / 160) ** 2 + ((xx - 270) / 120) ** 2 <= r ** 2


def make_velocities(n: int, seed: int = 0) -> list[torch.Tensor]:
    """One deterministic (N,8) float32 velocity per step (smoothly varying, as a sampler's are)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn((n, CHANNELS), generator=g)
    return [base + 0.3 * torch.randn((n, CHANNELS), generator=g) * (1 + k / STEPS) for k in range(STEPS)]


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


@contextmanager
def count_syncs() -> Iterator[dict[str, int]]:
    """Count calls of host-synchronising Tensor methods while the block runs (per method name)."""
    counts = {m: 0 for m in SYNC_METHODS}
    saved = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

    def wrap(name: str, orig: Callable) -> Callable:
        def inner(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)
        return inner

    for m in SYNC_METHODS:
        setattr(torch.Tensor, m, wrap(m, saved[m]))
    try:
        yield counts
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)


def sync_summary(fn: Callable[[], Any]) -> str:
    """'item 3, cpu 5, ...' for one call of ``fn`` (non-zero entries only)."""
    with count_syncs() as c:
        fn()
    parts = [f"{k.strip('_')} {v}" for k, v in c.items() if v]
    return ", ".join(parts) or "none"


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------


def stub_net(vels: list[torch.Tensor]) -> Callable:
    """net(x, t, active): the precomputed velocity of the step at flow time t (rows ``active``)."""
    steps = {t: k for k, t in enumerate(EulerFlowSampler(SamplerConfig(steps=STEPS), "slat").grid()[:-1])}

    def net(x: torch.Tensor, t: float, active: torch.Tensor | None) -> torch.Tensor:
        v = vels[steps[t]]
        return v if active is None else v[active]

    return net


def run_policy(policy: Any, x0: torch.Tensor, net: Callable, extras: dict[str, Any]) -> torch.Tensor:
    """25 plain Euler steps driven through ``policy`` (fresh per-run state)."""
    sampler = EulerFlowSampler(SamplerConfig(steps=STEPS, cfg_strength=0.0), "slat")
    return sampler.sample(x0, net, policy, None, extras=extras)


def policies() -> dict[str, Any]:
    """The SLaT policies of the methods (as make_method builds them)."""
    return {
        "identity (stub net + sampler only)": IdentityPolicy(),
        "fast-sam3d (carving keep 0.1 + step cache)": SLaTPolicy(SLaTTokenCarving(), SLaTStepCache()),
        "fast-sam3d carving only": SLaTTokenCarving(),
        "fast-sam3d-released (carve 0.1 + cache)": SLaTPolicy(SLaTTokenCarving.released(),
                                                              SLaTStepCache(mode="released")),
        "fast3dcache": Fast3DCache(),
    }


def transform_cases(coords: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable]:
    """Name -> zero-argument callable for the decoder / coordinate transforms."""
    feats = torch.randn((len(coords), CHANNELS), generator=torch.Generator().manual_seed(1))
    tokens = SparseTokens(coords=coords, resolution=RES, feats=feats)
    ctx = TransformContext(mask=mask, occupancy_logits=logits)
    sta = SpectralTokenAggregation()
    measured = sta.measure(ctx)
    rel = SpectralTokenAggregation.released()
    bare = SparseTokens(coords=coords, resolution=RES)
    cases: dict[str, Callable] = {
        "STA.measure (HFER 2D 518^2 + 3D 64^3)": lambda: sta.measure(ctx),
        "  hfer_2d (518^2 mask)": lambda: hfer_2d(mask, sta.hfer),
        "  hfer_3d (64^3 logits)": lambda: hfer_3d(logits, sta.hfer),
        "STA.decide": lambda: sta.decide(len(tokens), RES, measured),
        "STA.reduce (measure + decide + quantise)": lambda: sta.reduce(tokens, ctx),
    }
    for s in (1.25, 1.5, 2.0):
        cases[f"quantize_tokens S={s:g}"] = (lambda s=s: quantize_tokens(tokens, s))
    cases["released STA.reduce (pre_slat shrink + S_freq)"] = lambda: rel.reduce(bare, ctx)
    return cases


def measure_all(obj: str, repeats: int) -> dict[str, dict[str, Any]]:
    """{case: {"seconds": median, "syncs": summary}} for every transform and policy case."""
    torch.manual_seed(0)
    coords = load_coords(obj)
    logits, mask = make_logits(coords), make_mask()
    out: dict[str, dict[str, Any]] = {}
    for name, fn in transform_cases(coords, logits, mask).items():
        out[name] = {"seconds": median_time(fn, repeats), "syncs": sync_summary(fn)}
        print(f"{name:50s} {out[name]['seconds'] * 1e3:9.2f} ms   syncs: {out[name]['syncs']}", flush=True)
    n = len(coords)
    vels = make_vels_cached(n)
    net = stub_net(vels)
    x0 = torch.randn((n, CHANNELS), generator=torch.Generator().manual_seed(2))
    extras = {"coords": coords, "occupancy_logits": logits, "occupancy": logits > 0, "resolution": RES,
              "token_scores": None}
    for name, pol in policies().items():
        fn = lambda pol=pol: run_policy(pol, x0, net, extras)  # noqa: E731
        out[name] = {"seconds": median_time(fn, repeats), "syncs": sync_summary(fn)}
        print(f"{name:50s} {out[name]['seconds'] * 1e3:9.2f} ms   syncs: {out[name]['syncs']}", flush=True)
    out["_meta"] = {"object": obj, "N": n, "torch": torch.__version__, "threads": torch.get_num_threads()}
    return out


_VELS: dict[int, list[torch.Tensor]] = {}


def make_vels_cached(n: int) -> list[torch.Tensor]:
    if n not in _VELS:
        _VELS[n] = make_velocities(n)
    return _VELS[n]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def write_markdown(labels: dict[str, dict[str, Any]], path: Path) -> None:
    """One table: a time column (ms) per label, the host-sync counts of the last label."""
    names = [k for k in next(iter(labels.values())) if k != "_meta"]
    last = list(labels)[-1]
    meta = labels[last]["_meta"]
    head = "| case | " + " | ".join(f"{lab} (ms)" for lab in labels) + f" | value reads per call ({last}) |"
    lines = [
        "# Accelerator bookkeeping overhead (CPU)",
        "",
        f"CPU only (no GPU), `benchmarks/accel_overhead.py`, object `{meta['object']}` (N = {meta['N']} "
        f"surface voxels at 64^3), feats width {CHANNELS}, 518x518 mask, 64^3 occupancy logits, "
        f"{STEPS} SLaT steps with a stub network; torch {meta['torch']}, {meta['threads']} threads; "
        "medians of 5 after one warm-up. Policy rows include the stub network and the Euler updates: "
        "subtract the identity row for the policy's own cost. Value reads = calls of `.item()`, `float()`, "
        "`int()`, `bool()`, `.tolist()`, `.numpy()`, `.cpu()` on a tensor; each is a host sync when that tensor "
        "lives on a GPU (here everything is on the CPU, so they are plain reads). The machine is shared "
        "(2 cores, other jobs running): with 2 threads small ops pay OpenMP contention, so the "
        "1-thread columns are the steadier comparison.",
        "",
        head,
        "|" + "---|" * (len(labels) + 2),
    ]
    for name in names:
        cols = [f"{labels[lab][name]['seconds'] * 1e3:.1f}" if name in labels[lab] else "-" for lab in labels]
        lines.append(f"| {name.strip()} | " + " | ".join(cols) + f" | {labels[last][name]['syncs']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object", default="013_apple")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="after", help="column name; saved as JSON so later runs show it too")
    ap.add_argument("--out", default=str(RESULTS / "accel_overhead_cpu.md"))
    args = ap.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = measure_all(args.object, args.repeats)
    store = out.with_suffix(".json")
    labels: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    labels[args.label] = result
    store.write_text(json.dumps(labels, indent=1))
    write_markdown(labels, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
