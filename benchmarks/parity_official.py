"""Numerical parity of our SAM 3D Objects reimplementation with the OFFICIAL model code.

Builds the official modules (``sam3d_objects``, imported from a checkout outside this repository,
never copied) at small dimensions, builds ours with :func:`parity_config` (= ``mini_config()`` with
the few changes the official classes need, listed in :data:`DEVIATIONS`), loads the SAME random
weights into both through our official-layout state dicts (``pipe.state_dicts(layout="official")``,
prefixes stripped as the official loader does: ``_base_models.generator.`` /
``_base_models.condition_embedder.``, strict), feeds both the same inputs and noise and compares
stage by stage:

==========================  =================================================================
stage                       what is compared
==========================  =================================================================
ss.condition / slat.cond.   fuser tokens (DINOv2 from the local dinov2 checkout, point map)
ss.flow velocity            one backbone call: same latents, t, condition, d = 0
ss sampler latents          official ``ShortCut`` + ``ClassifierFreeGuidance...`` Euler loop vs
                            our ``EulerFlowSampler`` + ``SSStage.velocity_net`` (same schedule)
ss.decoder logits           dense occupancy logits on the same latent
slat.flow velocity          one backbone call: same feats, coords, t, condition
slat sampler latents        official ``FlowMatching`` loop vs ours (same noise and coords)
mesh decoder features       the 101 FlexiCubes channels at the subdivided voxels, matched by
                            coordinate (official ``to_representation`` bypassed)
==========================  =================================================================

Each stage is measured with our fp32 weights and with our bf16 weights (``RunOptions("bf16")``),
always against the official model in fp32. Errors: max / mean absolute, and relative = error
divided by max |official| (scale-free; element-wise relative error is meaningless near zeros).

Work-arounds (none changes what is compared):

- spconv's CPU build (2.3.8) cannot add a bias inside a sparse convolution, and its SubMConv3d
  output on CPU depends on uninitialised memory (see :func:`_reference_convs`). Every official
  spconv SubMConv3d therefore computes through :func:`subm_conv_reference`, an independent exact
  submanifold conv (coordinate lookup, float64 accumulation; at kernel size 1 it reproduces spconv's raw
  ``weight.view(C_in, C_out)``, see ``fs3d_accel.checkpoint``); module tree, weights, biases (non-zero)
  and data flow stay official.
- ``kaolin`` (FlexiCubes input checks) is replaced by an empty module; explicit ``device="cuda"``
  tensor creations while building the mesh decoder (FlexiCubes tables, unused here) become meta.
- ``torchvision._meta_registrations`` is skipped (CUDA torchvision wheel next to a CPU torch).
- ``torch.hub.load("facebookresearch/dinov2", ...)`` builds ``DinoVisionTransformer`` from the
  local dinov2 checkout with the hub entry's arguments (``dinov2_vitl14_reg``: LayerScale 1.0,
  MemEffAttention blocks, 4 registers, antialiased pos-embed interpolation, offset 0) but the
  width/depth/heads/image size of our config; no weights are downloaded.
- ``LIDRA_SKIP_INIT`` is set (``sam3d_objects.init`` is not shipped).

Set-up: see ``benchmarks/make_official_manifest.py`` (venv ``/tmp/offvenv``). Run::

    PYTHONPATH=/work/main:/tmp/official/facebookresearch+sam-3d-objects \\
        /tmp/offvenv/bin/python benchmarks/parity_official.py --out benchmarks/results [--full-ss]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.official_stubs import STUB_ROOTS, StubFinder  # noqa: E402,F401 (STUB_ROOTS re-exported)
from fs3d_accel.model.configs import ModelConfig, SamplerConfig, mini_config  # noqa: E402
from fs3d_accel.model.random_weights import perturb_zero_inits  # noqa: E402

DEFAULT_OFFICIAL = Path(os.environ.get("FS3D_OFFICIAL", "/tmp/official/facebookresearch+sam-3d-objects"))
DEFAULT_DINOV2 = Path(os.environ.get("FS3D_DINOV2", "/tmp/official/facebookresearch+dinov2"))
DEFAULT_HF = Path(os.environ.get("FS3D_HF_CONFIGS", "/tmp/official/wlfeng0509+Fast-SAM3D/checkpoints/hf"))

#: where parity_config() differs from mini_config(), and why
DEVIATIONS = (
    "ss_condition.point.num_heads 4 -> 16: the official PointPatchEmbed hard-codes 16 heads in its "
    "window block (embed_dim 64 -> head dim 4).",
    "mesh_decoder.model_channels 96 -> 256, upsample_channels (32, 16) -> (64, 32), num_groups 8 -> 32: "
    "the official SLatMeshDecoder hard-codes upsample widths model_channels // 4, // 8 and "
    "GroupNorm32 with 32 groups, so the mini widths are not representable.",
)


def parity_config(base: ModelConfig | None = None) -> ModelConfig:
    """``mini_config()`` made representable by the official classes (see :data:`DEVIATIONS`)."""
    cfg = base or mini_config()
    point = replace(cfg.ss_condition.point, num_heads=16)
    md = replace(cfg.mesh_decoder, model_channels=256, upsample_channels=(64, 32), num_groups=32)
    cfg = replace(cfg, name="parity-mini", ss_condition=replace(cfg.ss_condition, point=point),
                  slat_condition=replace(cfg.slat_condition, point=point), mesh_decoder=md)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Official code set-up
# ---------------------------------------------------------------------------------------------


_BOOTSTRAPPED: dict[str, Any] = {}


def official_available(official: Path = DEFAULT_OFFICIAL) -> str | None:
    """``None`` when the official code can be used here, else the reason why not."""
    import importlib.util
    if importlib.util.find_spec("sam3d_objects") is None and not (official / "sam3d_objects").is_dir():
        return f"sam3d_objects is not importable and {official} has no checkout"
    for mod in ("hydra", "omegaconf", "spconv", "timm", "optree", "loguru"):
        if importlib.util.find_spec(mod) is None:
            return f"official dependency {mod!r} is not installed (see benchmarks/make_official_manifest.py)"
    return None


def bootstrap(official: Path = DEFAULT_OFFICIAL, dinov2: Path = DEFAULT_DINOV2) -> StubFinder:
    """Make ``sam3d_objects`` importable on a CPU machine (idempotent; see module docstring)."""
    if "finder" in _BOOTSTRAPPED:
        return _BOOTSTRAPPED["finder"]
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")
    if str(official) not in sys.path:
        sys.path.insert(0, str(official))
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    finder = StubFinder()
    sys.meta_path.insert(0, finder)
    real_load = torch.hub.load

    def hub_load(repo_or_dir, model, *args, source="github", **kwargs):
        if repo_or_dir != "facebookresearch/dinov2":
            return real_load(repo_or_dir, model, *args, source=source, **kwargs)
        if str(dinov2) not in sys.path:
            sys.path.insert(0, str(dinov2))
        from functools import partial

        from dinov2.layers import MemEffAttention
        from dinov2.layers import NestedTensorBlock as Block
        from dinov2.models.vision_transformer import DinoVisionTransformer
        if model != "dinov2_vitl14_reg":
            raise ValueError(f"parity harness only knows dinov2_vitl14_reg, got {model!r}")
        kwargs.pop("verbose", None)
        vit = dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                   init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=4,
                   interpolate_antialias=True, interpolate_offset=0.0)
        vit.update(kwargs)
        return DinoVisionTransformer(block_fn=partial(Block, attn_class=MemEffAttention), **vit)

    torch.hub.load = hub_load
    _BOOTSTRAPPED["finder"] = finder
    return finder


def _cuda_to_meta():
    from torch.overrides import TorchFunctionMode

    class CudaToMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            def fix(a):
                if isinstance(a, torch.device) and a.type == "cuda":
                    return torch.device("meta")
                if isinstance(a, str) and a.split(":")[0] == "cuda":
                    return "meta"
                return a
            return func(*(fix(a) for a in args), **{k: fix(v) for k, v in (kwargs or {}).items()})

    return CudaToMeta()


def _dino_overrides(node, dino, prenorm: bool) -> None:
    node.input_size = dino.image_size
    node.prenorm_features = prenorm
    node.backbone_kwargs = {"img_size": dino.image_size, "patch_size": dino.patch_size,
                            "embed_dim": dino.embed_dim, "depth": dino.depth, "num_heads": dino.num_heads,
                            "mlp_ratio": dino.mlp_ratio, "num_register_tokens": dino.num_registers}


def official_yamls(cfg: ModelConfig, hf: Path = DEFAULT_HF, pipeline_fp16: bool = False) -> dict[str, Any]:
    """The HF yamls' model nodes with every dimension overridden to ``cfg``.

    ``pipeline_fp16``: keep the yamls' ``use_fp16`` (SLaT flow torso and mesh decoder torso in fp16,
    as the official pipeline runs them on a GPU); by default (parity, CPU) every model is fp32."""
    from omegaconf import OmegaConf
    out: dict[str, Any] = {}
    # --- SS generator + fuser
    y = OmegaConf.load(hf / "ss_generator.yaml")["module"]
    gen, bb, f = y.generator.backbone, y.generator.backbone.reverse_fn.backbone, cfg.ss_flow
    gen.no_shortcut = True
    _sampler_overrides(gen, cfg.ss_sampler)
    bb.model_channels, bb.cond_channels, bb.num_blocks = f.model_channels, f.cond_channels, f.num_blocks
    bb.num_heads, bb.mlp_ratio, bb.resolution, bb.in_channels = f.num_heads, f.mlp_ratio, f.resolution, f.in_channels
    bb.out_channels = f.in_channels
    for m in bb.latent_mapping.values():
        m.model_channels = f.model_channels
        m.pos_embedder.model_channels = f.model_channels
    bb.latent_mapping.shape.pos_embedder.resolution = f.resolution
    bb.latent_mapping.shape.in_channels = f.in_channels
    out["ss_generator"] = gen
    out["ss_condition"] = _fuser_overrides(y.condition_embedder.backbone, cfg.ss_condition)
    # --- SLaT generator + fuser
    y = OmegaConf.load(hf / "slat_generator.yaml")["module"]
    gen, bb, f = y.generator.backbone, y.generator.backbone.reverse_fn.backbone, cfg.slat_flow
    _sampler_overrides(gen, cfg.slat_sampler)
    bb.model_channels, bb.cond_channels, bb.num_blocks = f.model_channels, f.cond_channels, f.num_blocks
    bb.num_heads, bb.mlp_ratio, bb.resolution, bb.in_channels = f.num_heads, f.mlp_ratio, f.resolution, f.in_channels
    bb.out_channels = f.in_channels
    bb.io_block_channels = list(f.io_block_channels)
    bb.patch_size = 2 ** len(f.io_block_channels)
    if not pipeline_fp16:
        bb.use_fp16 = False
    out["slat_generator"] = gen
    out["slat_condition"] = _fuser_overrides(y.condition_embedder.backbone, cfg.slat_condition)
    # --- decoders
    d = OmegaConf.load(hf / "ss_decoder.yaml")
    sd = cfg.ss_decoder
    d.channels, d.latent_channels = list(sd.channels), sd.latent_channels
    d.num_res_blocks, d.num_res_blocks_middle = sd.num_res_blocks, sd.num_res_blocks_middle
    out["ss_decoder"] = d
    d = OmegaConf.load(hf / "slat_decoder_mesh.yaml")
    md = cfg.mesh_decoder
    c = md.model_channels
    if tuple(md.upsample_channels) != (c // 4, c // 8) or md.num_groups != 32 or md.out_channels != 101:
        raise ValueError(f"mesh decoder {md} is not representable by the official SLatMeshDecoder "
                         "(upsample widths model_channels//4, //8; 32 groups; 101 outputs); use parity_config()")
    d.resolution, d.model_channels, d.latent_channels = md.resolution, c, md.latent_channels
    d.num_blocks, d.num_heads, d.mlp_ratio, d.window_size = md.num_blocks, md.num_heads, md.mlp_ratio, md.window_size
    if not pipeline_fp16:
        d.use_fp16 = False
    out["mesh_decoder"] = d
    return out


def _sampler_overrides(gen, s: SamplerConfig) -> None:
    gen.inference_steps = s.steps
    gen.rescale_t = s.rescale_t
    gen.time_scale = s.time_scale
    gen.reverse_fn.strength = s.cfg_strength
    gen.reverse_fn.interval = list(s.cfg_interval)


def _fuser_overrides(node, c):
    for entry in node.embedder_list:
        emb = entry[0]
        if emb._target_.endswith(".Dino"):
            _dino_overrides(emb, c.dino, c.prenorm_features)
        elif emb._target_.endswith(".PointPatchEmbed"):
            emb.embed_dim, emb.input_size, emb.patch_size = c.point.embed_dim, c.point.input_size, c.point.patch_size
            if c.point.num_heads != 16 or c.point.mlp_ratio != 2.0:
                raise ValueError("official PointPatchEmbed hard-codes num_heads=16, mlp_ratio=2.0; use parity_config()")
        else:
            raise ValueError(f"unknown embedder {emb._target_}")
    node.projection_net_hidden_dim_multiplier = c.ffn_multiplier
    return node


def subm_conv_reference(feats: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Submanifold conv by coordinate lookup (independent of spconv and of our implementation).

    ``weight`` is spconv's (C_out, k, k, k, C_in); output row i = bias + sum over offsets (a, b, c)
    of W[:, a, b, c, :] @ feats[voxel at coords_i + (a, b, c) - k // 2] (cross-correlation, as dense
    ``conv3d(weight.permute(0, 4, 1, 2, 3), padding=k // 2)`` restricted to the input sites).

    Except at k = 1, where it computes what spconv 2.x computes: ``feats @ weight.view(C_in, C_out)``, a raw
    reinterpretation of the weight, not its transpose (spconv issue #450; spconv-triton does the same). The official
    checkpoints were trained with that; ``fs3d_accel.checkpoint`` converts those weights.
    """
    k = weight.shape[1]
    if k == 1:
        out = feats.double() @ weight.reshape(weight.shape[-1], weight.shape[0]).double()
        return (out if bias is None else out + bias.double()).to(feats.dtype)
    r = k // 2
    c = indices.long()
    ext = int(c[:, 1:].max()) + 2 * r + 1

    def code(cc: Tensor) -> Tensor:
        return ((cc[:, 0] * ext + cc[:, 1] + r) * ext + cc[:, 2] + r) * ext + cc[:, 3] + r

    keys = code(c)
    skeys, order = torch.sort(keys)
    out = torch.zeros(len(c), weight.shape[0], dtype=torch.float64, device=feats.device)
    f = feats.double()
    for a in range(k):
        for b in range(k):
            for e in range(k):
                nb = c.clone()
                nb[:, 1:] += torch.tensor([a - r, b - r, e - r], device=c.device)
                q = code(nb)
                pos = torch.searchsorted(skeys, q).clamp(max=len(skeys) - 1)
                hit = skeys[pos] == q
                if hit.any():
                    src = order[pos[hit]]
                    out[hit] += f[src] @ weight[:, a, b, e, :].double().T
    if bias is not None:
        out += bias.double()
    return out.to(feats.dtype)


def _reference_convs(module: torch.nn.Module) -> int:
    """Route every official spconv ``SubMConv3d`` through :func:`subm_conv_reference`.

    Why: the spconv 2.3.8 CPU build cannot add a bias inside the conv ("cpu don't support act and
    bias"), and, worse, its SubMConv3d output on CPU depends on uninitialised memory (the same call
    on the same tensor gives results off by ~0.2 once the allocator hands back used memory; checked
    against a dense conv3d). The official module tree, weights, indice keys and data flow stay
    as they are; only the arithmetic of the conv is replaced by an exact, independent one.
    """
    import spconv.pytorch as spc
    n = 0
    for m in module.modules():
        if isinstance(m, spc.SparseConv3d) or (isinstance(m, spc.SubMConv3d) and not m.subm):
            raise NotImplementedError("strided sparse conv in the official model: no reference implemented")
        if isinstance(m, spc.SubMConv3d):
            def forward(x, _m=m):
                out = subm_conv_reference(x.features, x.indices, _m.weight, _m.bias)
                return x.replace_feature(out)
            m.forward = forward
            n += 1
    return n


@dataclass
class OfficialModels:
    """The official modules (``None`` for those not built: see ``build_official(only=...)``)."""
    ss_generator: Any = None    # ShortCut(reverse_fn=CFG(backbone=SparseStructureFlowTdfyWrapper))
    ss_condition: Any = None    # EmbedderFuser
    ss_decoder: Any = None      # SparseStructureDecoderTdfyWrapper
    slat_generator: Any = None  # FlowMatching(reverse_fn=CFG(backbone=SLatFlowModelTdfyWrapper))
    slat_condition: Any = None
    mesh_decoder: Any = None    # SLatMeshDecoderTdfyWrapper, to_representation bypassed
    reference_convs: int = 0

    @property
    def ss_flow(self):
        return self.ss_generator.reverse_fn.backbone

    @property
    def slat_flow(self):
        return self.slat_generator.reverse_fn.backbone


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The official ``filter_and_remove_prefix_state_dict_fn``: keep keys with prefix, drop it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


#: the official modules build_official() can build
OFFICIAL_MODULES = ("ss_generator", "ss_condition", "ss_decoder", "slat_generator", "slat_condition", "mesh_decoder")


def build_official(cfg: ModelConfig, files: dict[str, dict[str, Tensor]], hf: Path = DEFAULT_HF, *,
                   only: tuple[str, ...] | None = None, reference_convs: bool = True,
                   pipeline_fp16: bool = False) -> OfficialModels:
    """Instantiate the official modules at ``cfg``'s dims and strictly load ``files``
    (``pipe.state_dicts(layout="official")``) into them.

    ``only``: build just these (names of :data:`OFFICIAL_MODULES`; the condition fusers need the
    dinov2 checkout). ``reference_convs``: route the spconv SubMConv3d layers through
    :func:`subm_conv_reference` (CPU; off to keep the real sparse-conv kernels on a GPU).
    ``pipeline_fp16``: see :func:`official_yamls`."""
    from hydra.utils import instantiate
    unknown = sorted(set(only or ()) - set(OFFICIAL_MODULES))
    if unknown:
        raise ValueError(f"unknown official modules {unknown}; choose from {OFFICIAL_MODULES}")
    nodes = official_yamls(cfg, hf, pipeline_fp16=pipeline_fp16)
    if only is not None:
        nodes = {k: v for k, v in nodes.items() if k in only}
    mods = {}
    for name, node in nodes.items():
        if name == "mesh_decoder":
            with _cuda_to_meta():
                mods[name] = instantiate(node)
        else:
            mods[name] = instantiate(node)
    gen, cond = "_base_models.generator.", "_base_models.condition_embedder."
    loads = {"ss_generator": _strip(files["ss_generator"], gen), "ss_condition": _strip(files["ss_generator"], cond),
             "slat_generator": _strip(files["slat_generator"], gen),
             "slat_condition": _strip(files["slat_generator"], cond),
             "ss_decoder": files["ss_decoder"], "mesh_decoder": files["slat_decoder_mesh"]}
    for name, sd in loads.items():
        if name not in mods:
            continue
        mods[name].load_state_dict({k: v.detach().clone().float() for k, v in sd.items()}, strict=True)
        mods[name].eval()
    if "mesh_decoder" in mods:
        mods["mesh_decoder"].to_representation = lambda h: h  # network output, no FlexiCubes extraction
    convs = sum(_reference_convs(mods[k]) for k in ("slat_generator", "mesh_decoder")
                if k in mods) if reference_convs else 0
    return OfficialModels(**mods, reference_convs=convs)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    stage: str
    precision: str
    max_abs: float
    mean_abs: float
    max_rel: float   # max |ours - official| / max |official|
    mean_rel: float  # mean |ours - official| / mean |official|
    ref_scale: float  # max |official|
    numel: int

    def as_line(self) -> str:
        return (f"| {self.stage} | {self.precision} | {self.max_abs:.3e} | {self.mean_abs:.3e} | "
                f"{self.max_rel:.3e} | {self.mean_rel:.3e} | {self.ref_scale:.3e} | {self.numel} |")


def _flat(x) -> Tensor:
    if isinstance(x, dict):
        return torch.cat([x[k].detach().float().reshape(-1) for k in sorted(x)])
    return x.detach().float().reshape(-1)


def compare(stage: str, precision: str, official, ours) -> Row:
    if isinstance(official, dict):
        if sorted(official) != sorted(ours):
            raise ValueError(f"{stage}: keys differ: official {sorted(official)} vs ours {sorted(ours)}")
        for k in official:
            if tuple(official[k].shape) != tuple(ours[k].shape):
                raise ValueError(f"{stage}[{k}]: shape {tuple(official[k].shape)} vs ours {tuple(ours[k].shape)}")
    elif tuple(official.shape) != tuple(ours.shape):
        raise ValueError(f"{stage}: shape {tuple(official.shape)} vs ours {tuple(ours.shape)}")
    a, b = _flat(official), _flat(ours)
    d = (a - b).abs()
    scale = float(a.abs().max())
    return Row(stage, precision, float(d.max()), float(d.mean()), float(d.max()) / max(scale, 1e-30),
               float(d.mean()) / max(float(a.abs().mean()), 1e-30), scale, a.numel())


TABLE_HEADER = ("| stage | ours | max abs | mean abs | max rel | mean rel | max abs(official) | elements |\n"
                "|---|---|---|---|---|---|---|---|")


def format_table(rows: list[Row]) -> str:
    return "\n".join([TABLE_HEADER] + [r.as_line() for r in rows])


def _sorted_by_coords(coords: Tensor, feats: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    c = coords.long()
    key = ((c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]) * resolution + c[:, 3]
    order = torch.argsort(key)
    return key[order], feats[order]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_scene(h: int = 96, w: int = 120, seed: int = 0):
    """Synthetic image / mask / camera-frame point map (tilted plane at z ~ 2, some invalid pixels)."""
    from fs3d_accel.synthetic import synthetic_scene

    img, mask, pm = synthetic_scene(h, w, seed)
    pm[:4, :4] = np.nan
    return img, mask, pm


def random_coords(resolution: int, n: int, seed: int) -> Tensor:
    """(<= n, 4) int32 unique voxel coords [0, x, y, z] in a blob, sorted (what the SS stage emits)."""
    g = torch.Generator().manual_seed(seed)
    centre = resolution / 2
    pts = centre + torch.randn(4 * n, 3, generator=g) * resolution / 8
    pts = pts.round().clamp(0, resolution - 1).long()
    c = torch.unique(pts, dim=0)[:n]
    c = c[torch.randperm(len(c), generator=g)]
    c = torch.unique(c, dim=0)  # sorted lexicographically
    return torch.cat([torch.zeros(len(c), 1, dtype=torch.long), c], 1).to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Stage runners
# ---------------------------------------------------------------------------------------------
def _ours_pipelines(cfg: ModelConfig, seed: int):
    from fs3d_accel.pipeline import Pipeline
    from fs3d_accel.stages.options import RunOptions
    pipe = Pipeline.from_config(cfg, seed=seed).eval()
    pipe16 = Pipeline.from_config(cfg, seed=seed).eval()
    pipe16.load_state_dicts(pipe.state_dicts(layout="ours"), layout="ours")
    pipe16 = pipe16.to(torch.bfloat16)
    pipe16.options = RunOptions(precision="bf16")
    return {"fp32": pipe, "bf16": pipe16}


def run_parity(cfg: ModelConfig | None = None, seed: int = 0, num_voxels: int = 300,
               hf: Path = DEFAULT_HF, log: Callable[[str], None] = print) -> tuple[list[Row], dict[str, Any]]:
    """All stage comparisons; returns (rows, info)."""
    from fs3d_accel.samplers import EulerFlowSampler
    from fs3d_accel.stages.options import RunOptions
    cfg = cfg or parity_config()
    torch.manual_seed(seed)
    pipes = _ours_pipelines(cfg, seed)
    perturb_zero_inits(pipes["fp32"])  # zero-initialised layers would hide what feeds them
    pipes["bf16"].load_state_dicts({k: v.to(torch.bfloat16) for k, v in pipes["fp32"].state_dicts("ours").items()},
                                   layout="ours")
    t0 = time.perf_counter()
    off = build_official(cfg, pipes["fp32"].state_dicts(layout="official"), hf)
    info: dict[str, Any] = {"build_official_s": time.perf_counter() - t0, "reference_convs": off.reference_convs}
    rows: list[Row] = []
    opts = {"fp32": RunOptions(), "bf16": RunOptions(precision="bf16")}
    g = torch.Generator().manual_seed(seed + 7)

    img, mask, pm = make_scene(seed=seed)
    inputs = pipes["fp32"].prepare(img, mask, pm)

    with torch.no_grad():
        # ---- condition fusers
        ss_kw, slat_kw = inputs.ss_kwargs(), inputs.slat_kwargs()
        ref_ss_cond = off.ss_condition(**{k: v.clone() for k, v in ss_kw.items()})
        ref_slat_cond = off.slat_condition(**{k: v.clone() for k, v in slat_kw.items()})
        for prec, pipe in pipes.items():
            dt = opts[prec].compute_dtype()
            rows.append(compare("ss.condition tokens", prec, ref_ss_cond,
                                pipe.ss.condition(**{k: v.to(dt) for k, v in ss_kw.items()}).float()))
            rows.append(compare("slat.condition tokens", prec, ref_slat_cond,
                                pipe.slat.condition(**{k: v.to(dt) for k, v in slat_kw.items()}).float()))
        cond_ss, cond_slat = ref_ss_cond.float(), ref_slat_cond.float()

        # ---- SS flow: one backbone call (conditional, and the CFG 'add_flag' unconditional branch)
        shapes = pipes["fp32"].ss.flow.latent_shapes(1)
        lat = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        t = torch.tensor([0.37 * 1000.0])
        d = torch.tensor([0.0])
        ref_v = off.ss_flow({k: v.clone() for k, v in lat.items()}, t, cond_ss, d=d)
        ref_vu = off.ss_flow({k: v.clone() for k, v in lat.items()}, t, cond_ss, d=d, cfg=True)
        for prec, pipe in pipes.items():
            dt = opts[prec].compute_dtype()
            v = pipe.ss.flow({k: x.to(dt) for k, x in lat.items()}, t, cond_ss.to(dt), d.to(dt))
            rows.append(compare("ss.flow velocity (1 call)", prec, ref_v, {k: x.float() for k, x in v.items()}))
            vu = pipe.ss.flow({k: x.to(dt) for k, x in lat.items()}, t, (cond_ss * 0).to(dt), d.to(dt))
            rows.append(compare("ss.flow velocity, uncond branch", prec, ref_vu, {k: x.float() for k, x in vu.items()}))

        # ---- SS sampler loop
        noise = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        sgen = off.ss_generator
        sgen._generate_noise = lambda shape, device: {k: v.clone() for k, v in noise.items()}
        t0 = time.perf_counter()
        ref_ss = sgen(shapes, "cpu", cond_ss)
        info["official_ss_sampler_s"] = time.perf_counter() - t0
        ours_ss = {}
        for prec, pipe in pipes.items():
            net = pipe.ss.velocity_net(cond_ss, cfg.ss_sampler, opts[prec])
            ours_ss[prec] = EulerFlowSampler(cfg.ss_sampler, "ss").sample({k: v.clone() for k, v in noise.items()}, net)
            rows.append(compare(f"ss sampler latents ({cfg.ss_sampler.steps} steps, cfg {cfg.ss_sampler.cfg_strength})",
                                prec, ref_ss, ours_ss[prec]))

        # ---- SS decoder (on the official sampler's shape latent)
        r = cfg.ss_flow.resolution
        z = ref_ss["shape"].permute(0, 2, 1).contiguous().view(1, cfg.ss_flow.in_channels, r, r, r)
        ref_logits = off.ss_decoder(z.clone())
        for prec, pipe in pipes.items():
            got = pipe.ss.decoder(z.to(opts[prec].compute_dtype())).float()
            rows.append(compare("ss.decoder occupancy logits", prec, ref_logits, got))
            rows.append(Row("ss.decoder occupancy (logit>0) mismatches", prec,
                            float(((ref_logits > 0) != (got > 0)).sum()), float(((ref_logits > 0) != (got > 0)).float().mean()),
                            float("nan"), float("nan"), 1.0, ref_logits.numel()))

        # ---- SLaT flow: one backbone call
        coords = random_coords(cfg.slat_flow.resolution, num_voxels, seed)
        n = len(coords)
        info["slat_voxels"] = n
        feats = torch.randn(n, cfg.slat_flow.in_channels, generator=g)
        t = torch.tensor([0.61 * 1000.0])
        ref_v = off.slat_flow(feats[None].clone(), t, cond_slat, coords.numpy())[0]
        ref_vu = off.slat_flow(feats[None].clone(), t, cond_slat, coords.numpy(), cfg=True)[0]
        for prec, pipe in pipes.items():
            dt = opts[prec].compute_dtype()
            v = pipe.slat.flow(feats.to(dt), coords, t, cond_slat.to(dt)).float()
            rows.append(compare("slat.flow velocity (1 call)", prec, ref_v, v))
            vu = pipe.slat.flow(feats.to(dt), coords, t, (cond_slat * 0).to(dt)).float()
            rows.append(compare("slat.flow velocity, uncond branch", prec, ref_vu, vu))

        # ---- SLaT sampler loop
        noise = torch.randn(n, cfg.slat_flow.in_channels, generator=g)
        lgen = off.slat_generator
        lgen._generate_noise = lambda shape, device: noise[None].clone()
        t0 = time.perf_counter()
        ref_slat = lgen((1, n, cfg.slat_flow.in_channels), "cpu", cond_slat, coords.numpy())[0]
        info["official_slat_sampler_s"] = time.perf_counter() - t0
        for prec, pipe in pipes.items():
            net = pipe.slat.velocity_net(cond_slat, coords, cfg.slat_sampler, opts[prec])
            got = EulerFlowSampler(cfg.slat_sampler, "slat").sample(noise.clone(), net)
            rows.append(compare(f"slat sampler latents ({cfg.slat_sampler.steps} steps, cfg {cfg.slat_sampler.cfg_strength})",
                                prec, ref_slat, got))

        # ---- mesh decoder network (de-normalised SLaT of the official sampler)
        mean = torch.tensor(cfg.slat_mean)
        std = torch.tensor(cfg.slat_std)
        slat = ref_slat * std + mean
        bb = off.mesh_decoder
        from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp
        h = bb(sp.SparseTensor(feats=slat.clone(), coords=coords.int()))
        res = cfg.mesh_decoder.output_resolution
        ref_key, ref_feats = _sorted_by_coords(h.coords, h.feats, res)
        info["mesh_decoder_out_voxels"] = len(ref_key)
        for prec, pipe in pipes.items():
            out = pipe.decode.decoder(slat.to(opts[prec].compute_dtype()), coords)
            key, f = _sorted_by_coords(out.coords, out.feats.float(), res)
            if not torch.equal(key, ref_key):
                raise AssertionError(f"mesh decoder output coordinates differ ({len(key)} vs {len(ref_key)} voxels)")
            rows.append(compare("mesh decoder 101-ch features (by coord)", prec, ref_feats, f))
    return rows, info


def full_ss_backbone_pass(seed: int = 0, cond_tokens: int = 512, hf: Path = DEFAULT_HF) -> tuple[Row, dict[str, Any]]:
    """One fp32 SS backbone call at the official (full) dimensions, official vs ours, same random
    weights. ``cond_tokens`` condition tokens (the real fuser gives 7528; fewer keeps the CPU pass
    short; the backbone is agnostic to their number)."""
    from hydra.utils import instantiate

    from fs3d_accel.model.configs import full_config
    from fs3d_accel.model.ss_flow import SSFlowModel
    cfg = full_config()
    torch.manual_seed(seed)
    ours = SSFlowModel(cfg.ss_flow).eval()
    node = official_yamls(cfg, hf)["ss_generator"].reverse_fn.backbone
    off = instantiate(node).eval()
    off.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    lat = {k: torch.randn(s, generator=g) for k, s in ours.latent_shapes(1).items()}
    cond = torch.randn(1, cond_tokens, cfg.ss_flow.cond_channels, generator=g)
    t, d = torch.tensor([370.0]), torch.tensor([0.0])
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = off({k: v.clone() for k, v in lat.items()}, t, cond, d=d)
        t_off = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = ours(lat, t, cond, d)
        t_ours = time.perf_counter() - t0
    return compare(f"FULL dims ss.flow velocity (1 call, {cond_tokens} cond tokens)", "fp32", ref, got), \
        {"full_official_s": t_off, "full_ours_s": t_ours}


def check_pose_decoding() -> list[str]:
    """Our ``decode_layout`` vs the official pose decoder (when importable); returns report lines."""
    lines = []
    try:
        from sam3d_objects.pipeline.inference_utils import get_pose_decoder  # noqa: F401
    except Exception as exc:  # pytorch3d & co. missing on this machine
        lines.append(f"official pose decoder not importable here ({type(exc).__name__}: {exc}); "
                     "compared by reading the code (see report)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path, default=DEFAULT_OFFICIAL)
    ap.add_argument("--dinov2", type=Path, default=DEFAULT_DINOV2)
    ap.add_argument("--hf-configs", type=Path, default=DEFAULT_HF)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--voxels", type=int, default=300)
    ap.add_argument("--full-ss", action="store_true", help="also one full-dims fp32 SS backbone pass (slow)")
    ap.add_argument("--full-cond-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    why = official_available(args.official)
    if why:
        raise SystemExit(f"cannot run parity: {why}")
    finder = bootstrap(args.official, args.dinov2)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = parity_config()
    rows, info = run_parity(cfg, seed=args.seed, num_voxels=args.voxels, hf=args.hf_configs)
    if args.full_ss:
        row, extra = full_ss_backbone_pass(args.seed, args.full_cond_tokens, args.hf_configs)
        rows.append(row)
        info.update(extra)
    import subprocess
    try:
        head = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    import spconv
    lines = [
        "# Parity with the official SAM 3D Objects code",
        "",
        f"Official code: facebookresearch/sam-3d-objects@{head} (imported, not copied); spconv {spconv.__version__} "
        f"(CPU build); torch {torch.__version__}; CPU, {torch.get_num_threads()} threads. Stubbed imports: "
        f"{sorted(finder.touched) or 'none'}. Generated by `benchmarks/parity_official.py`.",
        "",
        f"Config: `parity_config()` = `mini_config()` with: " + " ".join(f"({i + 1}) {d}" for i, d in enumerate(DEVIATIONS)),
        f"Samplers: SS {cfg.ss_sampler}, SLaT {cfg.slat_sampler}. SLaT/mesh stages on {info['slat_voxels']} voxels "
        f"(mesh decoder output: {info['mesh_decoder_out_voxels']} voxels at {cfg.mesh_decoder.output_resolution}^3).",
        f"Same random weights in both (ours -> `state_dicts('official')` -> strict official load); layers that "
        f"initialise to zero were randomised first. The {info['reference_convs']} official spconv SubMConv3d layers compute "
        "through an exact reference (spconv's CPU build cannot add biases and reads uninitialised memory; see the script).",
        "Official always fp32; 'ours' = our weights in fp32 or bf16. rel = error / max|official| (max) and "
        "mean error / mean|official| (mean).",
        "",
        format_table(rows),
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in info.items() if k.endswith("_s")),
    ]
    lines += check_pose_decoding()
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity_official_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
