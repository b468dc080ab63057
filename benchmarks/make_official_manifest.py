"""Build ``tests/data/official_manifest.json``: key names and shapes of the official SAM 3D Objects
checkpoints, produced by instantiating the OFFICIAL model classes on ``torch.device("meta")``.

Why: our reference implementation must load the released ``.ckpt`` files strictly, so its
``state_dict`` must match the official one key for key and shape for shape. This script asks the
official code itself (no weights needed) and writes the answer as test data. It is a developer tool:
tests read the JSON it wrote; nothing imports this file.

Nothing of the official code is copied into this repository; it is imported from a checkout outside
it. Set-up used to produce the committed manifest (CPU machine, Python 3.11, torch 2.13 CPU)::

    # sources (any way of getting these commits works)
    git clone https://github.com/facebookresearch/sam-3d-objects /tmp/official/sam-3d-objects
    git clone https://github.com/facebookresearch/dinov2          /tmp/official/dinov2
    git clone https://github.com/wlfeng0509/Fast-SAM3D            /tmp/official/Fast-SAM3D  # HF yamls
    # a throw-away venv that sees the project's torch (a .pth file pointing at its site-packages)
    python -m venv /tmp/offvenv
    echo /work/main/.venv/lib/python3.11/site-packages > \
        /tmp/offvenv/lib/python3.11/site-packages/zz_mainvenv.pth
    /tmp/offvenv/bin/pip install hydra-core==1.3.2 omegaconf optree loguru easydict einops astor \
        plyfile spconv==2.3.8          # spconv 2.3.8 = the CPU build of the pinned spconv-cu121 2.3.8
    /tmp/offvenv/bin/pip install --no-deps timm==0.9.16 torchvision==0.28.0
    /tmp/offvenv/bin/python benchmarks/make_official_manifest.py \
        --official /tmp/official/sam-3d-objects --dinov2 /tmp/official/dinov2 \
        --hf-configs /tmp/official/Fast-SAM3D/checkpoints/hf --out tests/data/official_manifest.json

What is stubbed, and why that does not change any key or shape:
- ``kaolin`` (only ``check_tensor`` asserts inside FlexiCubes' forward) is replaced by an empty
  module; any other missing optional import aborts the run (``STUB_ROOTS`` lists the stubbed ones
  and the manifest's ``source`` records which were actually touched).
- ``torchvision._meta_registrations`` is skipped because the PyPI torchvision wheel is a CUDA
  build whose C ops do not load next to a CPU torch; only pure-Python torchvision parts are used
  (``Normalize``, ``FrozenBatchNorm2d`` imports).
- ``torch.hub.load("facebookresearch/dinov2", name, source="github")`` inside the official ``Dino``
  embedder is redirected to the local dinov2 checkout (``source="local"``) with
  ``pretrained=False``: same architecture code, no weight download (the .ckpt overwrites the weights).
- explicit ``device="cuda"`` tensor creations during construction become meta tensors (the mesh
  decoder's FlexiCubes tables; plain attributes, not parameters or buffers).
- ``LIDRA_SKIP_INIT`` is set, as the official notebook does (``sam3d_objects.init`` is not shipped).

spconv (real, CPU build 2.3.8) constructs ``SubMConv3d.weight`` as ``(C_out, k, k, k, C_in)``; the
manifest therefore records that layout for every sparse-conv weight.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.official_stubs import STUB_ROOTS, StubFinder  # noqa: E402,F401 (STUB_ROOTS: see docstring)

#: which official files we describe, and how the pipeline builds and loads each one
#: (``sam3d_objects/pipeline/inference_pipeline.py``: ``init_ss_generator``,
#: ``init_ss_condition_embedder``, ``init_slat_generator``, ``init_ss_decoder``,
#: ``init_slat_decoder_mesh``).
FILES = {
    "ss_generator.ckpt": {
        "yaml": "ss_generator.yaml",
        "state_dict_key": "state_dict",
        "parts": [("_base_models.generator.", ("module", "generator", "backbone")),
                  ("_base_models.condition_embedder.", ("module", "condition_embedder", "backbone"))],
    },
    "slat_generator.ckpt": {
        "yaml": "slat_generator.yaml",
        "state_dict_key": "state_dict",
        "parts": [("_base_models.generator.", ("module", "generator", "backbone")),
                  ("_base_models.condition_embedder.", ("module", "condition_embedder", "backbone"))],
    },
    "ss_decoder.ckpt": {"yaml": "ss_decoder.yaml", "state_dict_key": None, "parts": [("", ())]},
    "slat_decoder_mesh.ckpt": {"yaml": "slat_decoder_mesh.yaml", "state_dict_key": None,
                               "parts": [("", ())]},
}


def _git_head(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bootstrap(official: Path, dinov2: Path) -> StubFinder:
    os.environ.setdefault("LIDRA_SKIP_INIT", "1")  # sam3d_objects/__init__.py: skip sam3d_objects.init
    sys.path.insert(0, str(official))
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    finder = StubFinder()
    sys.meta_path.insert(0, finder)

    import torch

    real_load = torch.hub.load

    def local_dinov2(repo_or_dir, model, *args, source="github", **kwargs):
        if repo_or_dir == "facebookresearch/dinov2":
            kwargs.pop("verbose", None)
            return real_load(str(dinov2), model, *args, source="local", pretrained=False, **kwargs)
        return real_load(repo_or_dir, model, *args, source=source, **kwargs)

    torch.hub.load = local_dinov2
    return finder


def _cuda_to_meta_mode():
    """A torch function mode that turns explicit ``device="cuda"`` factory calls into meta ones.

    The mesh decoder builds its (parameter-free, non-``nn.Module``) FlexiCubes tables with
    ``device="cuda"`` hard-coded; on a CPU machine that would abort construction.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    class CudaToMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            def fix(a):
                if isinstance(a, torch.device) and a.type == "cuda":
                    return torch.device("meta")
                if isinstance(a, str) and a.split(":")[0] == "cuda":
                    return "meta"
                return a

            args = tuple(fix(a) for a in args)
            kwargs = {k: fix(v) for k, v in (kwargs or {}).items()}
            return func(*args, **kwargs)

    return CudaToMeta()


def _select(cfg, path: tuple[str, ...]):
    for k in path:
        cfg = cfg[k]
    return cfg


def build_manifest(official: Path, dinov2: Path, hf_configs: Path) -> dict:
    finder = _bootstrap(official, dinov2)
    import torch
    import timm
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    files: dict[str, dict] = {}
    buffers: dict[str, list[str]] = {}
    fp16: dict[str, list[str]] = {}
    for fname, spec in FILES.items():
        cfg_all = OmegaConf.load(hf_configs / spec["yaml"])
        keys: dict[str, list[int]] = {}
        buffers[fname], fp16[fname] = [], []
        for prefix, path in spec["parts"]:
            cfg = _select(cfg_all, path)
            if "pretrained_ckpt_path" in cfg:  # the pipeline deletes it before instantiating
                del cfg["pretrained_ckpt_path"]
            with torch.device("meta"), _cuda_to_meta_mode():
                module = instantiate(cfg)
            buffer_names = {n for n, _ in module.named_buffers()}
            for name, tensor in module.state_dict().items():  # persistent buffers only
                keys[prefix + name] = list(tensor.shape)
                if name in buffer_names:
                    buffers[fname].append(prefix + name)
                if tensor.dtype == torch.float16:
                    fp16[fname].append(prefix + name)
            del module
        files[fname] = {"state_dict_key": spec["state_dict_key"], "keys": keys}

    import spconv

    fork = hf_configs.parent.parent
    source = (
        "Instantiated the official model classes on torch.device('meta') with hydra.utils.instantiate "
        "on the HF yaml configs, exactly as sam3d_objects/pipeline/inference_pipeline.py does "
        "(generator = yaml[module][generator][backbone] with prefix '_base_models.generator.', "
        "condition embedder = yaml[module][condition_embedder][backbone] with prefix "
        "'_base_models.condition_embedder.'; decoders = whole yaml, no prefix), then dumped "
        "module.state_dict() names/shapes (persistent buffers included, non-persistent excluded). "
        f"Code: github.com/facebookresearch/sam-3d-objects@{_git_head(official)}; "
        f"DINOv2 via torch.hub source=local from github.com/facebookresearch/dinov2@{_git_head(dinov2)} "
        f"(pretrained=False); HF yamls from github.com/wlfeng0509/Fast-SAM3D@{_git_head(fork)} "
        f"checkpoints/hf/; timm {timm.__version__}; spconv {spconv.__version__} (CPU build; "
        "SubMConv3d weight layout (C_out, k, k, k, C_in)); torch "
        f"{torch.__version__}. Stubbed imports: {sorted(finder.touched) or 'none'} "
        "(kaolin: FlexiCubes input checks only). Generated by benchmarks/make_official_manifest.py."
    )
    return {
        "source": source,
        "files": files,
        # persistent buffers among the keys (everything else is an nn.Parameter)
        "buffers": buffers,
        # keys whose tensor the official constructor makes float16 (use_fp16: true); load_state_dict
        # casts to these dtypes, so the stored dtype inside the .ckpt files is not implied
        "float16_keys": fp16,
    }


def dumps_compact(obj: dict) -> str:
    """JSON with one key per line and each shape list kept on its own line (diff-friendly)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([0-9,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(re.findall(r"\d+", m.group(1))) + "]", text) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="checkout of sam-3d-objects")
    ap.add_argument("--dinov2", type=Path, required=True, help="checkout of facebookresearch/dinov2")
    ap.add_argument("--hf-configs", type=Path, required=True,
                    help="folder with the HF yamls (Fast-SAM3D checkpoints/hf)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    manifest = build_manifest(args.official, args.dinov2, args.hf_configs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps_compact(manifest))
    for fname, entry in manifest["files"].items():
        n = sum(1 for _ in entry["keys"])
        print(f"{fname}: {n} keys")


if __name__ == "__main__":
    main()
