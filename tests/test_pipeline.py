"""End-to-end behaviour of the reference pipeline: seams, determinism, checkpoints, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fs3d_accel.checkpoint import CheckpointError, to_official
from fs3d_accel.model.configs import full_config, get_config
from fs3d_accel.pipeline import Pipeline
from fs3d_accel.preprocess import InputError
from fs3d_accel.seams import Accelerator, IdentityPolicy, IdentityTransform
from fs3d_accel.stages.options import RunOptions

from conftest import fast_mini_config, light_mini_config, sparsify_occupancy

MANIFEST = Path(__file__).parent / "data" / "official_manifest.json"


def test_full_config_matches_official_manifest_on_meta():
    """Every official key and shape, nothing extra, for the four checkpoint files."""
    manifest = json.loads(MANIFEST.read_text())["files"]
    pipe = Pipeline.from_config("full", device="meta")
    assert next(pipe.parameters()).device.type == "meta"
    ours = pipe.state_dicts(layout="official")
    assert set(ours) == {f.removesuffix(".ckpt") for f in manifest}
    for fname, entry in manifest.items():
        got = {k: list(v.shape) for k, v in ours[fname.removesuffix(".ckpt")].items()}
        want = entry["keys"]
        assert sorted(set(want) - set(got)) == [], f"{fname}: missing"
        assert sorted(set(got) - set(want)) == [], f"{fname}: extra"
        bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert bad == {}, f"{fname}: shape mismatches"


def _run(pipe, scene, seed=0):
    img, mask, pm = scene
    return pipe(img, mask, pointmap=pm, seed=seed)


def test_mini_end_to_end_mesh_and_layout(mini_pipe, scene):
    res = _run(mini_pipe, scene)
    mesh = res.mesh
    assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()
    assert np.abs(mesh.vertices).max() <= 0.5 + 1e-3  # normalised object cube
    r = res.layout.rotation
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-6) and np.isclose(np.linalg.det(r), 1.0)
    assert (res.layout.scale > 0).all()
    assert np.allclose(res.posed_mesh.vertices, res.layout.apply(mesh.vertices), atol=1e-5)
    assert set(res.timings) == {"ss", "slat", "decode"}
    assert res.slat.coords.shape[0] == res.ss.coords.shape[0] > 0


def test_same_seed_bit_identical_and_seed_matters(mini_pipe, scene):
    a, b = _run(mini_pipe, scene, 0), _run(mini_pipe, scene, 0)
    assert torch.equal(a.slat.feats, b.slat.feats)
    assert np.array_equal(a.mesh.vertices, b.mesh.vertices)
    assert all(torch.equal(a.ss.latents[k], b.ss.latents[k]) for k in a.ss.latents)
    c = _run(mini_pipe, scene, 1)
    assert not torch.equal(a.ss.latents["shape"], c.ss.latents["shape"])


def test_identity_accelerator_bit_identical(mini_pipe, scene):
    base = _run(mini_pipe, scene)
    try:
        mini_pipe.with_accel(Accelerator(ss_policy=IdentityPolicy(), slat_policy=IdentityPolicy(),
                                         coords_transform=IdentityTransform(),
                                         decoder_transform=IdentityTransform(), name="identity"))
        acc = _run(mini_pipe, scene)
    finally:
        mini_pipe.with_accel(None)
    assert np.array_equal(base.mesh.vertices, acc.mesh.vertices)
    assert np.array_equal(base.mesh.faces, acc.mesh.faces)
    assert torch.equal(base.slat.feats, acc.slat.feats)


def test_stages_rerun_alone(mini_pipe, scene):
    res = _run(mini_pipe, scene, seed=3)
    slat = mini_pipe.run_slat(res.inputs, res.ss, seed=3)
    assert torch.equal(slat.feats, res.slat.feats)
    dec = mini_pipe.run_decode(res.inputs, res.ss, slat)
    assert np.array_equal(dec.mesh.vertices, res.mesh.vertices)


def test_events_per_step_and_nothing_left_after_exception(mini_pipe, scene):
    seen = []
    with mini_pipe.events.listening(seen.append):
        _run(mini_pipe, scene)
    steps = [e for e in seen if hasattr(e, "decision")]
    cfg = mini_pipe.config
    assert len(steps) == cfg.ss_sampler.steps + cfg.slat_sampler.steps
    assert [e.phase for e in seen if hasattr(e, "phase")] == ["start", "end"] * 3
    assert len(mini_pipe.events) == 0

    class Boom:
        def velocity(self, ctx, compute):
            if ctx.step == 1:
                raise RuntimeError("policy failed")
            return compute()

    mini_pipe.with_accel(Accelerator(slat_policy=Boom()))
    try:
        with pytest.raises(RuntimeError, match="policy failed"):
            with mini_pipe.events.listening(lambda e: None):
                _run(mini_pipe, scene)
    finally:
        mini_pipe.with_accel(None)
    assert len(mini_pipe.events) == 0
    hooks = [m for m in mini_pipe.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []
    # the run after the failure is the plain one again
    again = _run(mini_pipe, scene)
    assert len(again.mesh.faces) > 0


def test_checkpoint_round_trip_ours_and_official(tmp_path, mini_pipe, scene):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in mini_pipe.state_dicts("ours").items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.txt").write_text("mini")
    loaded = Pipeline.from_checkpoint(tmp_path / "model.safetensors", config=fast_mini_config())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k

    off = tmp_path / "official"
    off.mkdir()
    for name, d in mini_pipe.state_dicts("official").items():
        payload = {"state_dict": d} if name.endswith("generator") else d
        torch.save(payload, off / f"{name}.ckpt")
    loaded2 = Pipeline.from_checkpoint(off, config=fast_mini_config())
    for k, v in loaded2.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_errors_list_keys(tmp_path, mini_pipe):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in mini_pipe.state_dicts("ours").items()}
    broken = dict(sd)
    broken.pop("ss.flow.t_embedder.mlp.0.weight")
    broken["ss.flow.extra"] = torch.zeros(1)
    broken["slat.flow.out_layer.bias"] = torch.zeros(5)
    save_file(broken, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError) as err:
        Pipeline.from_checkpoint(tmp_path / "b.safetensors", config="mini")
    msg = str(err.value)
    assert "ss.flow.t_embedder.mlp.0.weight" in msg and "ss.flow.extra" in msg
    assert "slat.flow.out_layer.bias: checkpoint (5,)" in msg
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        Pipeline.from_checkpoint(tmp_path / "corrupt.safetensors", config="mini")
    with pytest.raises(CheckpointError, match="does not exist"):
        Pipeline.from_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config"):
        Pipeline.from_checkpoint(tmp_path / "b.safetensors")


def test_official_layout_prefixes():
    sd = {"ss.flow.a": torch.zeros(1), "ss.condition.b": torch.zeros(1), "decode.decoder.c": torch.zeros(1)}
    off = to_official(sd)
    assert set(off["ss_generator"]) == {"_base_models.generator.reverse_fn.backbone.a",
                                        "_base_models.condition_embedder.b"}
    assert set(off["slat_decoder_mesh"]) == {"c"}
    with pytest.raises(CheckpointError, match="belongs to no official"):
        to_official({"weird.key": torch.zeros(1)})


def test_config_and_option_errors(mini_pipe, scene):
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown precision"):
        RunOptions(precision="int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Pipeline.from_config("mini", device="cuda")
        old = mini_pipe.options
        mini_pipe.options = RunOptions(precision="fp16")
        try:
            with pytest.raises(ValueError, match="CUDA-only"):
                _run(mini_pipe, scene)
        finally:
            mini_pipe.options = old
    img, mask, _ = scene
    with pytest.raises(InputError, match="no point map given"):
        mini_pipe(img, mask)


def test_bf16_weights_close_to_fp32(scene):
    """Half-precision weights (bf16 on CPU) run and stay near the fp32 SS latents."""
    pipe = Pipeline.from_config(light_mini_config(ss_steps=2), seed=0)  # thin SS decoder: bf16 3D convs are slow here
    inputs = pipe.prepare(*scene)
    ref = pipe.run_ss(inputs, seed=0)
    pipe16 = Pipeline.from_config(light_mini_config(ss_steps=2), seed=0).to(torch.bfloat16)
    pipe16.options = RunOptions(precision="bf16")
    out = pipe16.run_ss(inputs, seed=0)
    err = (out.latents["shape"] - ref.latents["shape"]).abs().max().item()
    scale = ref.latents["shape"].abs().max().item()
    assert err < 0.1 * scale, (err, scale)


def test_batched_cfg_and_cond_kv_match_reference(scene):
    pipe = Pipeline.from_config(fast_mini_config(ss_steps=2, slat_steps=2), seed=0)
    sparsify_occupancy(pipe)
    inputs = pipe.prepare(*scene)
    ref_ss = pipe.run_ss(inputs, seed=0)
    ref_slat = pipe.run_slat(inputs, ref_ss, seed=0)
    pipe.options = RunOptions(batch_cfg=True, cache_cond_kv=True)
    ss = pipe.run_ss(inputs, seed=0)
    slat = pipe.run_slat(inputs, ref_ss, seed=0)
    for k in ref_ss.latents:
        assert torch.allclose(ss.latents[k], ref_ss.latents[k], atol=1e-4, rtol=1e-4), k
    assert torch.allclose(slat.feats, ref_slat.feats, atol=1e-4, rtol=1e-4)


def test_xz_compressed_checkpoint_loads_the_same_weights_and_bad_files_fail_clearly(tmp_path, mini_pipe):
    """The package ships its weights as model.safetensors.xz; a folder holding only that file loads."""
    import lzma

    from safetensors.torch import save

    from fs3d_accel.checkpoint import CheckpointError

    sd = {k: v.contiguous() for k, v in mini_pipe.state_dicts("ours").items()}
    (tmp_path / "model.safetensors.xz").write_bytes(lzma.compress(save(sd), preset=0))  # the fastest xz preset
    loaded = Pipeline.from_checkpoint(tmp_path, config=fast_mini_config())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    (tmp_path / "model.safetensors.xz").write_bytes(b"not xz")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*model.safetensors.xz"):
        Pipeline.from_checkpoint(tmp_path, config=fast_mini_config())
