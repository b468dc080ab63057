"""Shared fixtures: a small, fast mini pipeline (random weights) and a synthetic scene."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the implicit-GEMM sparse conv) run on the CPU through Triton's interpreter. Set before
    # anything imports triton: the interpreter patches triton.language when triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fs3d_accel.model.configs import SamplerConfig, mini_config
from fs3d_accel.synthetic import sparsify_occupancy, synthetic_scene  # noqa: F401 (re-exported to tests)


def make_scene(h: int = 64, w: int = 80, seed: int = 0):
    """Synthetic image / mask / camera-frame point map (a tilted plane at z ~ 2)."""
    return synthetic_scene(h, w, seed)


def random_slat_inputs(n: int = 300, seed: int = 0, batch: int = 1):
    """(mini SLaT flow config, coords (batch*n, 4) int32 sorted by batch, feats, cond (batch, 7, C)):
    n distinct random voxels at the mini resolution, repeated per batch element (the CFG-pair layout)."""
    import torch
    cfg = mini_config().slat_flow
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(cfg.resolution ** 3, generator=g)[:n].sort().values
    xyz = torch.stack([flat // cfg.resolution ** 2, (flat // cfg.resolution) % cfg.resolution,
                       flat % cfg.resolution], 1)
    coords = torch.cat([torch.cat([torch.full((n, 1), b, dtype=torch.long), xyz], 1) for b in range(batch)], 0).int()
    feats = torch.randn(coords.shape[0], cfg.in_channels, generator=g)
    cond = torch.randn(batch, 7, cfg.cond_channels, generator=g)
    return cfg, coords, feats, cond


def mini_slat_object(cfg, n: int = 200, seed: int = 1):
    """One SLaT object at the mini resolution of ``cfg`` (a ModelConfig): sorted distinct voxel coordinates (n, 4)
    int32 of batch 0, condition tokens (1, 24, C) and SLaT noise, from one generator seeded ``seed``."""
    import torch
    from fs3d_accel.stages.slat import slat_noise
    g = torch.Generator().manual_seed(seed)
    r = cfg.slat_flow.resolution
    idx = torch.randperm(r ** 3, generator=g)[:n].sort().values
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.long),
                        torch.stack([idx // (r * r), (idx // r) % r, idx % r], 1)], 1).int()
    cond = torch.randn(1, 24, cfg.slat_flow.cond_channels, generator=g)
    return coords, cond, slat_noise(n, cfg.slat_flow.in_channels, g)


def fast_mini_config(ss_steps: int = 3, slat_steps: int = 3):
    """The mini architecture with short sampler schedules (CFG kept on, so both branches run)."""
    cfg = mini_config()
    return cfg.with_samplers(SamplerConfig(steps=ss_steps, rescale_t=3.0, cfg_strength=7.0),
                             SamplerConfig(steps=slat_steps, rescale_t=1.0, cfg_strength=1.0))


def light_mini_config(ss_steps: int = 3, slat_steps: int = 3):
    """:func:`fast_mini_config` with a thinner SS decoder (channels (8, 4, 4), one res block per level), for tests of
    bf16 runs on the CPU that do not test the decoder: bf16 3D convolutions take the CPU's slow path, 17 s per SS run
    with the mini decoder. The SS and SLaT flows are the mini ones."""
    cfg = fast_mini_config(ss_steps, slat_steps)
    return dataclasses.replace(cfg, ss_decoder=dataclasses.replace(cfg.ss_decoder, channels=(8, 4, 4), num_res_blocks=1,
                                                                   num_res_blocks_middle=1))


def light_bf16_pipe(ss_steps: int = 2, slat_steps: int = 2):
    """The mini pipeline of :func:`light_mini_config` (random weights), its occupancy sparsified to ~3% (a few hundred
    SLaT voxels on shipped sample 0 instead of ~8400), cast to bf16: cheap on the CPU, for tests of the flows'
    attention."""
    from fs3d_accel.pipeline import Pipeline
    pipe = Pipeline.from_config(light_mini_config(ss_steps, slat_steps), seed=0)
    sparsify_occupancy(pipe)
    return pipe.to(torch.bfloat16)


@pytest.fixture
def env(monkeypatch):
    """``monkeypatch`` with ``CUBLASLT_WORKSPACE_SIZE`` absent, and restored (removed) after the test even where the code
    under test wrote ``os.environ`` itself: setenv first, so that monkeypatch records the variable to undo (delenv of
    an absent variable records nothing)."""
    from fs3d_accel.cuda_settings import CUBLASLT_WORKSPACE_ENV
    monkeypatch.setenv(CUBLASLT_WORKSPACE_ENV, "")
    monkeypatch.delenv(CUBLASLT_WORKSPACE_ENV)
    return monkeypatch


#: the list the ``run_time_sizes`` fixture fills (None outside that fixture)
_run_time_sizes: list[int] | None = None


@torch.library.custom_op("fs3d_tests::record_size", mutates_args=())
def record_size(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Appends ``x.shape[dim]`` to the ``run_time_sizes`` fixture's list at every call and returns a copy of ``x``: for
    spies on calls made inside torch.compile'd code. An operator runs there at every call of the graph, as its other
    ops do, whereas a Python list appended to in the traced code makes dynamo guard on the list's length, so that
    every call recompiles (and past the recompile limit the code runs uncompiled)."""
    if _run_time_sizes is not None:
        _run_time_sizes.append(x.shape[dim])
    return x.clone()


@record_size.register_fake
def _record_size_fake(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.empty_like(x)


@pytest.fixture
def run_time_sizes(monkeypatch) -> list[int]:
    """The sizes :func:`record_size` records while the test runs, in call order."""
    import sys
    sizes: list[int] = []
    monkeypatch.setattr(sys.modules[__name__], "_run_time_sizes", sizes)
    return sizes


@dataclass
class SceneObject:
    """The fields of a dataset sample that scene mode reads."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    pointmap: np.ndarray
    scene_id: int = 3
    object_index: int = 0


def two_object_scene() -> list[SceneObject]:
    """Two small boxes in the synthetic image (few voxels: fast), in object order."""
    img, _, pm = make_scene()
    objs = []
    for i, (r, c) in enumerate(((slice(10, 26), slice(8, 28)), (slice(36, 54), slice(50, 70)))):
        m = np.zeros(img.shape[:2], bool)
        m[r, c] = True
        objs.append(SceneObject(f"box{i}", img, m, pm, object_index=i))
    return objs


@pytest.fixture(scope="session")
def scene():
    return make_scene()


@pytest.fixture(scope="session")
def mini_pipe():
    from fs3d_accel.pipeline import Pipeline
    pipe = Pipeline.from_config(fast_mini_config(), seed=0)
    sparsify_occupancy(pipe)
    return pipe


@pytest.fixture
def cpu_compile(monkeypatch):
    """Allow compile_ss / compile_slat on the CPU (test-only switch, used with debug dynamo backends)
    and start and end from a clean dynamo state with cleared counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import fs3d_accel.stages.options as options_mod
    monkeypatch.setattr(options_mod, "_ALLOW_CPU_COMPILE", True)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


#: (dynamo backend, batch_cfg, cache_cond_kv, tolerance) cases of the compiled-flow tests. aot_eager may
#: trace composite / view ops into functional decompositions, which can reorder float32 arithmetic by an
#: ulp per op; 1e-5 on O(1) latents is far below anything a sampler could show. eager runs the very same
#: kernels, so it must be exact.
COMPILE_CASES = pytest.mark.parametrize("backend, batch_cfg, cache_kv, tol", [
    ("eager", True, True, 0.0),
    ("eager", False, False, 0.0),
    ("aot_eager", True, True, 1e-5),
])


def run_ss_slat_each(pipe, inputs, options_list, seed: int = 0) -> list:
    """(SS output, SLaT output) of ``pipe`` on ``inputs`` under each ``RunOptions`` of ``options_list``."""
    outs = []
    for opts in options_list:
        pipe.options = opts
        ss = pipe.run_ss(inputs, seed=seed)
        outs.append((ss, pipe.run_slat(inputs, ss, seed=seed)))
    return outs


def assert_same_ss_slat(a, b) -> None:
    """Two (SS, SLaT) results equal bit for bit: every SS latent and the SLaT features."""
    (ss0, sl0), (ss1, sl1) = a, b
    assert ss0.latents.keys() == ss1.latents.keys()
    for key in ss0.latents:
        assert torch.equal(ss0.latents[key], ss1.latents[key]), key
    assert torch.equal(sl0.feats, sl1.feats)


def random_coords(res: int, batch: int, frac: float, seed: int = 0) -> torch.Tensor:
    """Random distinct voxels per batch element, rows sorted by batch, (N, 4) int32."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batch):
        keep = torch.rand(res ** 3, generator=g) < frac
        idx = torch.nonzero(keep)[:, 0]
        xyz = torch.stack([idx // res ** 2, (idx // res) % res, idx % res], dim=1)
        out.append(torch.cat([torch.full((len(xyz), 1), b), xyz], dim=1))
    return torch.cat(out).int()


def mini_slat_setup(sizes: tuple[int, ...], steps: int | None = None):
    """A mini SLaT stage (eval, seed 0) and one object per size: condition tokens (1, 24, C), sorted distinct voxel
    coordinates (n, 4) int32 of batch 0, and SLaT noise; plus the stage's sampler config, its schedule shortened to
    ``steps`` when given (its other settings kept; 5 steps still give guided and unguided steps: t = 0, 0.2, 0.4 are
    guided, 0.6 and 0.8 are not)."""
    from fs3d_accel.stages.slat import SLaTStage, slat_noise
    cfg = mini_config()
    torch.manual_seed(0)
    stage = SLaTStage(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    r = cfg.slat_flow.resolution
    objects = []
    for n in sizes:
        idx = torch.randperm(r ** 3, generator=gen)[:n].sort().values
        xyz = torch.stack([idx // (r * r), (idx // r) % r, idx % r], 1)
        coords = torch.cat([torch.zeros(n, 1, dtype=torch.long), xyz], 1).int()
        objects.append((torch.randn(1, 24, cfg.slat_flow.cond_channels, generator=gen), coords,
                        slat_noise(n, cfg.slat_flow.in_channels, gen)))
    sampler = cfg.slat_sampler if steps is None else dataclasses.replace(cfg.slat_sampler, steps=steps)
    return stage, objects, sampler


@torch.no_grad()
def sample_slat(stage, cond, coords, noise, sampler, options) -> torch.Tensor:
    """One SLaT sampler run of ``stage`` on the noise's device (options checked for that device first), its coordinate
    structures released afterwards."""
    from fs3d_accel.model.sparse import release_structure
    from fs3d_accel.samplers import EulerFlowSampler
    options.check_device(noise.device)
    structures: list[dict] = []
    try:
        net = stage.velocity_net(cond, coords, sampler, options, structures)
        return EulerFlowSampler(sampler, "slat").sample(noise.clone(), net, extras={"coords": coords})
    finally:
        for s in structures:
            release_structure(s)


def assert_kept_values_follow_weight(stage, obj, sampler, kept, plain, weight: torch.Tensor) -> None:
    """Options ``kept`` keep per-step values computed from ``weight``: after changing it in place (as load_state_dict
    writes), the SLaT latents of ``obj`` (cond, coords, noise) change and equal those of ``plain``, which computes
    them in every pass; restored, they are the first ones again."""
    cond, coords, noise = obj
    before = sample_slat(stage, cond, coords, noise, sampler, kept)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        after = sample_slat(stage, cond, coords, noise, sampler, kept)
        assert not torch.equal(after, before)
        assert torch.equal(after, sample_slat(stage, cond, coords, noise, sampler, plain))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert torch.equal(sample_slat(stage, cond, coords, noise, sampler, kept), before)


def mini_ss_setup():
    """A mini SS stage (4^3 shape grid: graph structure does not depend on the grid size), two objects (condition
    tokens, noise) and the 25-step sampler with CFG."""
    import dataclasses

    from fs3d_accel.model.configs import mini_config
    from fs3d_accel.stages.ss import SSStage, ss_noise
    cfg = mini_config()
    cfg = dataclasses.replace(cfg, ss_flow=dataclasses.replace(cfg.ss_flow, resolution=4))
    torch.manual_seed(0)
    stage = SSStage(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    objects = [(torch.randn(1, 40, cfg.ss_flow.cond_channels, generator=gen), ss_noise(cfg, gen)) for _ in range(2)]
    assert cfg.ss_sampler.steps == 25 and cfg.ss_sampler.cfg_strength > 0
    return stage, objects, cfg.ss_sampler


def spy_structure_builds(monkeypatch) -> list[int]:
    """The batch sizes of the SLaT coordinate structures the flow builds from coordinates (a persistent structure met
    without its tables), in order: a list the caller reads after running (``derive_unguided_tables`` slices instead)."""
    from fs3d_accel.model.slat_flow import SLaTFlowModel
    batches: list[int] = []
    original = SLaTFlowModel._sparse_input

    def spy(self, feats, coords, batch, structure):
        if structure is not None and "checked_input" not in structure:
            batches.append(batch)
        return original(self, feats, coords, batch, structure)
    monkeypatch.setattr(SLaTFlowModel, "_sparse_input", spy)
    return batches


def same_value(a, b) -> bool:
    """Equal cache values: tensors by dtype and content, through lists, tuples, dicts and dataclasses (the tiled
    conv's ``NeighbourTiles``)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(same_value(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def assert_same_structure(a: dict, b: dict, seen=None) -> None:
    """Same keys and equal values at every level; an up-sampling entry names its own tree's finer level."""
    seen = set() if seen is None else seen
    if id(a) in seen:
        return
    seen.add(id(a))
    assert set(a) == set(b), (set(a) ^ set(b))
    for key in a:
        va, vb = a[key], b[key]
        if key == "checked_input":
            assert va[1] == vb[1] and torch.equal(va[2], vb[2])
        elif isinstance(key, tuple) and key[0] == "downsample":
            for x, y in zip(va[:3], vb[:3]):
                assert torch.equal(x, y), key
            assert_same_structure(va[3], vb[3], seen)
        elif isinstance(key, tuple) and key[0] == "upsample_source":
            assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
            assert_same_structure(va[2], vb[2], seen)
        else:
            assert same_value(va, vb), key


#: which rows of a batch are the unconditional (all-zero) condition, for the condition K/V tests: pair, batch-1 and
#: longer batches, zero rows first, last and between
KV_ZERO_ROWS = [[False, True], [False], [True], [False, False], [True, True], [True, False, True], [False, True, False]]


@pytest.fixture(scope="module")
def kv_slat_setup():
    """The condition K/V tests' mini SLaT stage, two objects (230 and 150 voxels) and a 5-step sampler
    (:func:`mini_slat_setup`); the stage's compiled torso is dropped after the module."""
    stage, objects, sampler = mini_slat_setup((230, 150), steps=5)
    yield stage, objects, sampler
    stage.__dict__.pop("_compiled_torso", None)


def assert_same_kv_sets(out, ref, n_blocks: int) -> None:
    """``out`` and ``ref`` are the same cached condition K/V sets: per block the same number of tensors, each equal in
    shape, dtype and bits, contiguous, and no two tensors of one block in one storage (a nested compile region refuses
    inputs that alias)."""
    assert len(out) == len(ref) == n_blocks
    for got, want in zip(out, ref):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            assert a.is_contiguous()
        storages = {t.untyped_storage().data_ptr() for t in got}
        assert len(storages) == len(got), "two tensors of one block share storage (a nested region refuses them)"
