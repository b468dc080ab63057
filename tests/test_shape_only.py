"""``fs3d_analysis.profile.shape_only``: with the heavy products skipped, a FLOP count of the samplers equals the
count of the real run exactly (the premise of ``base_vs_official.py --flops-only``), and the mode leaves."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fs3d_accel.model.configs import mini_config
from fs3d_accel.samplers import count_network_passes
from fs3d_accel.stages.options import RunOptions
from fs3d_accel.stages.slat import SLaTStage
from fs3d_accel.stages.ss import SSStage, ss_latent_shapes
from fs3d_analysis.profile import shell_coords
from fs3d_analysis.profile.flops import sdpa_flop_mapping
from fs3d_analysis.profile.shape_only import SkipHeavyOps, skip_heavy_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import base_vs_official as bvo  # noqa: E402


@pytest.fixture(scope="module")
def stages():
    cfg = mini_config()
    torch.manual_seed(0)
    return cfg, SSStage(cfg).eval(), SLaTStage(cfg).eval()


def _count(fn, skip: bool) -> tuple[int, int]:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_flop_mapping()) as counter:
        if skip:
            with skip_heavy_ops() as mode:
                fn()
            return counter.get_total_flops(), mode.skipped
        fn()
    return counter.get_total_flops(), 0


@pytest.mark.parametrize("opts", [RunOptions(batch_cfg=True),
                                  RunOptions(cache_cond_kv=True),
                                  RunOptions(batch_cfg=True, cache_cond_kv=True, collapse_zero_cond=True)],
                         ids=["plain", "kv", "zkv"])
def test_skipped_products_count_the_same_flops(stages, opts):
    cfg, ss, slat = stages
    # the mini schedules cut from 25 to 5 steps, for time: each still has guided and unguided steps
    ss_sampler, slat_sampler = (dataclasses.replace(s, steps=5) for s in (cfg.ss_sampler, cfg.slat_sampler))
    for s in (ss_sampler, slat_sampler):
        assert s.steps < count_network_passes(s) < 2 * s.steps
    cond = torch.randn(1, 20, cfg.ss_flow.cond_channels)
    noise = {k: torch.randn(*s) for k, s in ss_latent_shapes(cfg).items()}
    coords = shell_coords(cfg.slat_flow.resolution, 300)
    noise_slat = torch.randn(len(coords), cfg.slat_flow.in_channels)
    for fn in (bvo.ours_ss_fn(ss, noise, cond, ss_sampler, opts),
               bvo.ours_slat_fn(slat, noise_slat, cond, coords, slat_sampler, opts)):
        real, _ = _count(fn, skip=False)
        shaped, skipped = _count(fn, skip=True)
        assert shaped == real > 0
        assert skipped > 0


def test_products_return_zeros_of_the_right_shape_and_the_mode_leaves():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    q = torch.randn(1, 2, 6, 8)
    with skip_heavy_ops() as mode:
        out = a @ b
        att = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        s = a + 1  # not a product: computed
    assert out.shape == (3, 5) and not out.any()
    assert att.shape == q.shape and not att.any()
    assert torch.equal(s, a + 1)
    assert mode.skipped == 2 and isinstance(mode, SkipHeavyOps)
    assert torch.allclose(a @ b, torch.mm(a, b)) and (a @ b).any()  # gone after the block
    with pytest.raises(RuntimeError, match="boom"):
        with skip_heavy_ops():
            raise RuntimeError("boom")
    assert (a @ b).any()
