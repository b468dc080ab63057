"""Turn a training checkpoint into the shipped ``sam3d-mini`` weights (fp16 safetensors, our layout)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..pipeline import Pipeline
from ..weights import WEIGHTS_DIR, WEIGHTS_FILE, sha256_bytes
from .trainers import MiniTrainer


def load_trained_pipeline(ckpt: str | Path, device: str = "cpu") -> tuple[Pipeline, dict]:
    """Pipeline('mini') with the generator/decoder weights of a training checkpoint folder, and its stats.

    Raises if the checkpoint lacks any pipeline component or if the config's SLaT normalisation
    differs from the one the checkpoint was trained with (the pipeline de-normalises with the config).
    """
    ckpt = Path(ckpt)
    pipe = Pipeline.from_config("mini", device=device)
    sd = pipe.state_dict()
    new = {}
    for stem, names in MiniTrainer.GROUPS.items():
        blob = torch.load(ckpt / f"{stem}.pt", map_location="cpu", weights_only=True)
        for name in names:
            if name in MiniTrainer.COMPONENTS:
                for k, v in blob[name].items():
                    new[f"{name}.{k}"] = v
    pipe.load_state_dicts({k: v.to(sd[k].dtype) for k, v in new.items()}, layout="ours")
    stats = json.loads((ckpt / "stats.json").read_text())
    cfg = pipe.config
    for key in ("slat_mean", "slat_std"):
        want = torch.tensor(stats[key])
        if not torch.allclose(torch.tensor(getattr(cfg, key)), want, rtol=1e-4, atol=1e-5):
            raise ValueError(f"mini_config().{key} = {getattr(cfg, key)} but the checkpoint was trained with "
                             f"{stats[key]}: update fs3d_accel/model/configs.py")
    pipe.source = f"train:{ckpt}"
    return pipe, stats


def export_weights(pipe: Pipeline, out_dir: str | Path | None = None) -> tuple[Path, str]:
    """Write ``model.safetensors.xz`` (fp16 safetensors, keys = ``Pipeline.from_config('mini').state_dict()``,
    xz-compressed) and ``config.txt``; returns (path, sha256 of the uncompressed safetensors bytes)."""
    import lzma

    from safetensors.torch import save

    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR / "sam3d-mini"
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in pipe.state_dict().items()}
    data = save(sd, metadata={"config": "mini", "format": "fs3d-ours"})
    path = out / WEIGHTS_FILE
    path.write_bytes(lzma.compress(data, preset=9))
    (out / "config.txt").write_text("mini\n")
    return path, sha256_bytes(data)
