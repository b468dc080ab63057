"""The shipped sam3d-mini weights: integrity (sha256 in the model card, exact key set) and a
deterministic reconstruction of one shipped YCB sample above a stated F1 floor.

The reconstruction uses short samplers (SS 10 steps, SLaT 4 steps without CFG) so the test stays
fast on a laptop CPU; the model card reports the full default-sampler numbers.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fs3d_accel.weights import SHIPPED, WEIGHTS_DIR, WEIGHTS_FILE, safetensors_bytes, sha256_bytes

FOLDER = WEIGHTS_DIR / SHIPPED["sam3d-mini"][0]
WEIGHTS = FOLDER / WEIGHTS_FILE
#: F1@0.05 (posed, GT-box normalised, 4000 points) floor for the short-sampler reconstruction of
#: 011_banana (a small object: ~2400 voxels, fast on CPU). Measured 51.5 with the run-3 weights
#: (49.9-55.3 over seeds 0-2; the run-2 weights scored 24.5); the mean-shape baseline, which is given
#: the GT layout, scores 26.8 (see MODEL_CARD.md), so the floor asks for clearly more than that with
#: a wide margin below the measured value. A random-init model yields no surface.
F1_FLOOR = 35.0
SAMPLE = "011_banana"

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"shipped weights absent: {WEIGHTS}")


def test_sha256_matches_model_card():
    card = (FOLDER / "MODEL_CARD.md").read_text()
    m = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", card)
    assert m, "MODEL_CARD.md must state the sha256 of model.safetensors"
    assert sha256_bytes(safetensors_bytes(WEIGHTS)) == m.group(1)  # the decompressed bytes
    assert WEIGHTS.stat().st_size < 20_000_000 and not (FOLDER / "model.safetensors").exists()
    assert (FOLDER / "config.txt").read_text().strip() == "mini"


def test_keys_and_dtypes_match_the_mini_pipeline():
    from safetensors.torch import load

    from fs3d_accel.pipeline import Pipeline
    sd = load(safetensors_bytes(WEIGHTS))
    expected = Pipeline.from_config("mini", device="meta").state_dict()
    assert set(sd) == set(expected)
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(expected[k].shape), k
        assert v.dtype == (torch.float16 if expected[k].is_floating_point() else expected[k].dtype), k


def test_from_pretrained_reconstructs_a_shipped_sample():
    from fs3d_accel.pipeline import Pipeline
    from fs3d_analysis.data.dataset import load_shipped_samples
    from fs3d_analysis.metrics import shape_metrics

    pipe = Pipeline.from_pretrained("sam3d-mini")
    assert pipe.source == "pretrained:sam3d-mini"
    sample = next(s for s in load_shipped_samples() if s.name == SAMPLE)
    inputs = pipe.prepare(sample.image, sample.mask, sample.pointmap)
    cfg = pipe.config
    ss = pipe.run_ss(inputs, seed=0, sampler=replace(cfg.ss_sampler, steps=10))
    slat = pipe.run_slat(inputs, ss, seed=0, sampler=replace(cfg.slat_sampler, steps=4, cfg_strength=0.0))
    dec = pipe.run_decode(inputs, ss, slat)
    pred = dec.posed_mesh.to_trimesh()
    m = shape_metrics(pred, sample.posed_mesh(), mode="gt", n_points=4000)
    assert m.f_score >= F1_FLOOR, f"F1@0.05 {m.f_score:.1f} below the floor {F1_FLOOR}"
    # the layout places the object where it is: centre within 10 % of the camera distance
    gt_c = (sample.posed_mesh().vertices.min(0) + sample.posed_mesh().vertices.max(0)) / 2
    assert float(((dec.posed_mesh.vertices.min(0) + dec.posed_mesh.vertices.max(0)) / 2 - gt_c).__abs__().max()) \
        < 0.1 * float(abs(gt_c[2]))
