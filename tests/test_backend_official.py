"""The official-package adapter: imports without the package, patches restore, policies steer steps.

The seam tests without the package drive :class:`StepPatch` through a minimal solver that follows
the documented official contract (``solve_iter`` calls ``self.step`` once per step, ``step``
evaluates the velocity once). The ``official`` tests repeat the key checks on the real official
``FlowMatching`` / ``ShortCut`` / ``ClassifierFreeGuidance`` classes with a tiny random backbone.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from torch import nn

from fs3d_accel.backends import official
from fs3d_accel.backends.official import OfficialPipeline, StepPatch, is_available, module_hooks
from fs3d_accel.seams import EventBus, IdentityPolicy, StageEvent, StepEvent


# ---------------------------------------------------------------------------------------------
# Import when the package is absent
# ---------------------------------------------------------------------------------------------


def _hide_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] == "sam3d_objects" else real(name, *a, **k))


def test_absent_package_imports_cleanly_and_constructing_raises_with_install_hint(monkeypatch):
    _hide_package(monkeypatch)
    mod = importlib.reload(official)  # module import must not need the package
    assert mod.is_available() is False
    with pytest.raises(ImportError, match="sam3d_objects") as err:
        mod.OfficialPipeline(object())
    assert "pip install" in str(err.value) and "facebookresearch/sam-3d-objects" in str(err.value)
    with pytest.raises(ImportError, match="not importable"):
        mod.OfficialPipeline.from_config("checkpoints/hf/pipeline.yaml")
    importlib.reload(official)


# ---------------------------------------------------------------------------------------------
# StepPatch on a solver with the official contract
# ---------------------------------------------------------------------------------------------


class ContractEuler:
    """Same call contract as the official ODESolver/Euler (see official.py docstring)."""

    def solve_iter(self, dynamics_fn, x_init, times, *args, **kwargs):
        x = x_init
        for t0, t1 in zip(times[:-1], times[1:]):
            x = self.step(dynamics_fn, x, t0, t1 - t0, *args, **kwargs)
            yield x, t0

    def step(self, dynamics_fn, x_t, t, dt, *args, **kwargs):
        v = dynamics_fn(x_t, t, *args, **kwargs)
        if isinstance(x_t, dict):
            return {k: x_t[k] + v[k] * dt for k in x_t}
        return x_t + v * dt


class ContractGenerator:
    _solver_method = "euler"

    def __init__(self):
        self._solver = ContractEuler()
        self.calls = 0

    def net(self, x, t, *args):
        self.calls += 1
        if isinstance(x, dict):
            return {k: -v + float(t) for k, v in x.items()}
        return -x + float(t)

    def generate(self, x0, times, *args):
        for x, _ in self._solver.solve_iter(self.net, x0, times, *args):
            pass
        return x


TIMES = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])


class ReuseEveryOther:
    """Computes on even steps, reuses the last velocity on odd ones."""

    def velocity(self, ctx, compute):
        if ctx.step % 2 == 0:
            return compute()
        ctx.decision = "cached"
        return ctx.history[-1].v


def test_identity_policy_is_bit_identical_and_emits_one_event_per_step():
    gen = ContractGenerator()
    x0 = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    plain = gen.generate(x0, TIMES)
    bus, events = EventBus(), []
    with bus.listening(events.append), StepPatch(gen, "ss", IdentityPolicy(), bus):
        patched = gen.generate(x0, TIMES)
    assert torch.equal(plain, patched)
    assert [e.step for e in events] == [0, 1, 2, 3]
    assert [e.t for e in events] == [0.0, 0.25, 0.5, 0.75]
    assert all(isinstance(e, StepEvent) and e.decision == "computed" and e.active_fraction == 1.0 for e in events)
    assert all(e.num_steps == 4 and e.stage == "ss" for e in events)


def test_policy_decides_velocity_and_network_calls():
    gen = ContractGenerator()
    x0 = {"shape": torch.ones(1, 3, 2), "scale": torch.zeros(1, 1, 3)}
    bus, events = EventBus(), []
    with bus.listening(events.append), StepPatch(gen, "ss", ReuseEveryOther(), bus):
        gen.generate(x0, TIMES)
    assert gen.calls == 2
    assert [e.decision for e in events] == ["computed", "cached", "computed", "cached"]
    assert torch.equal(events[1].v["shape"], events[0].v["shape"])


def test_slat_latent_is_seen_without_batch_axis_and_coords_reach_extras():
    gen = ContractGenerator()
    coords = torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6]], dtype=torch.int32)
    seen = []

    class Spy:
        def velocity(self, ctx, compute):
            v = compute()
            seen.append((tuple(ctx.x.shape), tuple(v.shape), ctx.extras["coords"].tolist(), ctx.dt))
            return v

    with StepPatch(gen, "slat", Spy()):
        gen.generate(torch.zeros(1, 2, 8), TIMES, "cond", coords.numpy())
    assert seen[0] == ((2, 8), (2, 8), coords.tolist(), 0.25)
    assert len(seen) == 4


def test_patch_is_removed_after_exception_and_after_normal_exit():
    gen = ContractGenerator()

    class Boom:
        def velocity(self, ctx, compute):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with StepPatch(gen, "ss", Boom()):
            gen.generate(torch.zeros(1, 2, 2), TIMES)
    assert "step" not in vars(gen._solver) and "solve_iter" not in vars(gen._solver)
    assert not hasattr(gen._solver, "_fs3d_patched")
    with StepPatch(gen, "ss"):
        pass
    assert "step" not in vars(gen._solver)


def test_step_patch_refuses_bad_setups():
    gen = ContractGenerator()
    with pytest.raises(ValueError, match="stage must be one of"):
        StepPatch(gen, "decode")
    with pytest.raises(TypeError, match="_solver"):
        StepPatch(object(), "ss")
    gen._solver_method = "midpoint"
    with pytest.raises(ValueError, match="euler"):
        StepPatch(gen, "ss")
    gen._solver_method = "euler"
    with StepPatch(gen, "ss"):
        with pytest.raises(RuntimeError, match="already patched"):
            StepPatch(gen, "ss").__enter__()


def test_wrong_velocity_shape_unknown_decision_and_token_subsets_are_errors():
    gen = ContractGenerator()

    class WrongShape:
        def velocity(self, ctx, compute):
            return torch.zeros(3)

    class BadDecision:
        def velocity(self, ctx, compute):
            v = compute()
            ctx.decision = "guessed"
            return v

    class Carve:
        def velocity(self, ctx, compute):
            return compute(active=torch.tensor([0]))

    for policy, exc, msg in ((WrongShape(), ValueError, "velocity shape"),
                             (BadDecision(), ValueError, "unknown decision"),
                             (Carve(), NotImplementedError, "token-subset")):
        with pytest.raises(exc, match=msg), StepPatch(gen, "slat", policy):
            gen.generate(torch.zeros(1, 2, 8), TIMES)


# ---------------------------------------------------------------------------------------------
# Forward hooks
# ---------------------------------------------------------------------------------------------


def test_module_hooks_fire_in_order_and_are_removed_on_error():
    roots = {"a": nn.Sequential(nn.Linear(2, 3), nn.ReLU()), "b": nn.Linear(3, 1)}
    log = []
    with module_hooks(roots, ["a.0", "b"], pre=lambda n, m, args: log.append(("pre", n)),
                      post=lambda n, m, args, out: log.append(("post", n, tuple(out.shape)))) as names:
        roots["b"](roots["a"](torch.zeros(4, 2)))
    assert names == ["a.0", "b"]
    assert log == [("pre", "a.0"), ("post", "a.0", (4, 3)), ("pre", "b"), ("post", "b", (4, 1))]
    with pytest.raises(ZeroDivisionError):
        with module_hooks(roots, lambda n: n.startswith("a."), post=lambda *a: None) as names:
            assert names == ["a.0", "a.1"]
            1 / 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for r in roots.values() for m in r.modules())
    with pytest.raises(KeyError, match="a.7"):
        with module_hooks(roots, ["a.7"], pre=lambda *a: None):
            pass
    with pytest.raises(ValueError, match="pre= or post="):
        with module_hooks(roots, ["a"]):
            pass


# ---------------------------------------------------------------------------------------------
# Against the real official sampler classes (skipped without the package)
# ---------------------------------------------------------------------------------------------


class TinyBackbone(nn.Module):
    """Random linear velocity field; the CFG 'add_flag' branch zeroes the condition."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls = 0

    def forward(self, x, t, cond, *extra, d=None, cfg=False):
        self.calls += 1
        c = cond * 0 if cfg else cond

        def f(v):
            return self.lin(v) + c.mean() + t.reshape(-1)[0] / 1000

        return {k: f(v) for k, v in x.items()} if isinstance(x, dict) else f(x)


@pytest.mark.official
@pytest.mark.skipif(not is_available(), reason="sam3d_objects not importable")
def test_real_official_flow_matching_and_shortcut_steps(monkeypatch):
    monkeypatch.setenv("LIDRA_SKIP_INIT", "true")
    from sam3d_objects.model.backbone.generator.classifier_free_guidance import ClassifierFreeGuidance
    from sam3d_objects.model.backbone.generator.flow_matching.model import FlowMatching
    from sam3d_objects.model.backbone.generator.shortcut.model import ShortCut

    torch.manual_seed(0)
    cond = torch.randn(1, 4, 8)
    for cls, shape, stage, extra in ((FlowMatching, (1, 6, 8), "slat", ()),
                                     (ShortCut, {"shape": (1, 6, 8), "scale": (1, 1, 8)}, "ss", ())):
        backbone = TinyBackbone(8)
        cfg = ClassifierFreeGuidance(backbone, p_unconditional=0.0, strength=2.0,
                                     unconditional_handling="add_flag", interval=[0, 500])
        kw = {"no_shortcut": True} if cls is ShortCut else {}
        gen = cls(reverse_fn=cfg, inference_steps=4, rescale_t=3, **kw).eval()
        with torch.no_grad():
            torch.manual_seed(1)
            plain = gen(shape, "cpu", cond, *extra)
            plain_calls, backbone.calls = backbone.calls, 0
            bus, events = EventBus(), []
            with bus.listening(events.append), StepPatch(gen, stage, IdentityPolicy(), bus):
                torch.manual_seed(1)
                same = gen(shape, "cpu", cond, *extra)
            assert backbone.calls == plain_calls
            flat = (lambda o: list(o.values())) if isinstance(plain, dict) else (lambda o: [o])
            assert all(torch.equal(a, b) for a, b in zip(flat(plain), flat(same)))
            assert [e.step for e in events] == [0, 1, 2, 3] and events[0].t == 0.0
            # rescale_t=3 warps t=0.25 to 0.25 / (1 + 2 * 0.75) = 0.1
            assert events[1].t == pytest.approx(0.1)
            backbone.calls = 0
            with StepPatch(gen, stage, ReuseEveryOther()):
                gen(shape, "cpu", cond, *extra)
            # CFG active for t*1000 <= 500: the two computed steps (t=0, 0.25) each take 2 passes
            assert backbone.calls == 4
        assert "step" not in vars(gen._solver) and "solve_iter" not in vars(gen._solver)
    assert os.environ["LIDRA_SKIP_INIT"] == "true"
