"""Stage 1: sparse structure (condition -> SS flow sampler -> SS decoder -> voxels, layout)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.condition import ConditionFuser
from ..model.configs import LAYOUT_MODALITIES, ModelConfig, SamplerConfig
from ..model.ss_decoder import SSDecoder
from ..model.ss_flow import CondKV, SSFlowModel
from ..pose import decode_layout
from ..preprocess import PreparedInputs
from ..samplers import EulerFlowSampler, cfg_active, guided, time_grid
from ..seams import EventBus, StepPolicy
from .graphs import GraphedCall
from .held import HoldsInputs
from .options import RunOptions
from .types import SSOutput


def ss_latent_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-modality latent shapes (batch 1), keys in sorted order as the official sampler draws them."""
    shapes = {"shape": (1, cfg.ss_flow.num_shape_tokens, cfg.ss_flow.in_channels)}
    shapes.update({k: (1, 1, c) for k, c in LAYOUT_MODALITIES.items()})
    return {k: shapes[k] for k in sorted(shapes)}


def ss_noise(cfg: ModelConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """Initial noise, drawn on the CPU in sorted modality order (device independent)."""
    return {k: torch.randn(s, generator=generator) for k, s in ss_latent_shapes(cfg).items()}


def surface_voxels(occupied: Tensor) -> Tensor:
    """Keep occupied voxels whose 3x3x3 neighbourhood is not fully occupied (official pruning)."""
    occ = occupied.float()[None, None]
    counts = F.conv3d(occ, torch.ones(1, 1, 3, 3, 3, dtype=occ.dtype, device=occ.device), padding=1)[0, 0]
    return occupied & (counts < 27)


def downsample_coords(coords: Tensor, resolution: int, max_voxels: int,
                      generator: torch.Generator | None) -> tuple[Tensor, int]:
    """Above ``max_voxels``, halve the coordinates into the centred half-size box, dedupe, and
    randomly subsample to the budget (official ``downsample_sparse_structure``)."""
    if coords.shape[0] <= max_voxels:
        return coords, 1
    xyz = coords[:, 1:].float()
    half = torch.round((xyz - resolution / 2) / 2 + resolution / 2).to(torch.int32)
    c = torch.unique(torch.cat([coords[:, :1], half], 1), dim=0)
    if c.shape[0] > max_voxels:
        perm = torch.randperm(c.shape[0], generator=generator)[:max_voxels]
        c = c[perm.sort().values]
    return c.to(torch.int32), 2


class SSStage(HoldsInputs, nn.Module):
    """Condition embedding, SS flow sampling, SS decoding, voxel extraction and layout decoding.

    Under a compile mode with CUDA graphs the condition K/V stay in held buffers between calls (:class:`HoldsInputs`):
    at full size and bf16 a collapsed CFG-pair set is ~1.5 GB, and the unguided steps hold a conditional set too."""

    name = "ss"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.condition = ConditionFuser(cfg.ss_condition)
        self.flow = SSFlowModel(cfg.ss_flow)
        self.decoder = SSDecoder(cfg.ss_decoder)

    def compiled_flow(self, options: RunOptions) -> nn.Module:
        """The SS flow network, torch.compile'd when ``options.compile_ss`` (cached per backend and mode;
        kept out of the module tree so state dicts and hooks see the plain module names).

        Static shapes (``dynamic=False``): the forward is one graph per batch size (2 for the batched CFG
        pair, 1 for the unguided steps), and the MoT blocks run as a nested compile region so the block
        body is compiled once, not 24 times. Only the network forward is compiled; the sampler loop,
        CFG and the K/V cache stay eager. The batch-1 graph doubles the one-off compile time but
        saves more per object than an eager batch-1 pass would (those passes are host-bound).
        """
        if not options.compile_ss:
            return self.flow
        cache = self.__dict__.setdefault("_compiled", {})
        key = (options.compile_mode, *options.compile_key)
        if key not in cache:
            cache[key] = torch.compile(self.flow, backend=options.compile_backend, dynamic=False,
                                       **options.compile_kwargs(options.compile_mode))
        return cache[key]

    def velocity_net(self, cond: Tensor, sampler_cfg: SamplerConfig, options: RunOptions):
        compiled = self.compiled_flow(options) if options.compile_ss else None
        d = torch.zeros(1, device=cond.device) if self.cfg.ss_flow.is_shortcut_model else None
        dtype = options.compute_dtype(cond.device)
        plain = self.flow

        kv_cache: dict[str, CondKV] = {}
        held_kv = self.held_inputs().lease()  # K/V at stable addresses for CUDA graphs (stages/held.py)

        def kv_of(name: str, c: Tensor, zero_rows: list[bool]) -> CondKV | None:
            """K/V of condition ``name``, computed on its first pass, once per object, outside any compiled region
            (``zero_rows``: which batch rows are the all-zero unconditional condition; see
            ``RunOptions.prepare_cond_kv``). Lazily: with batched CFG the separate unconditional K/V is never
            used, and a full-size K/V set is ~3 GB in fp32."""
            if not options.cache_cond_kv:
                return None
            if name not in kv_cache:
                kv_cache[name] = options.prepare_cond_kv(plain.precompute_cond_kv(c.to(dtype)), zero_rows,
                                                         compiled is not None, held_kv, name)
            return kv_cache[name]

        uncond = cond * 0
        graphs: dict[int, GraphedCall] = {}  # one per condition tensor (cond, uncond, both)

        def run(x: dict[str, Tensor], t: float, c: Tensor, kv: CondKV | None) -> dict[str, Tensor]:
            b = c.shape[0]
            use_compiled = compiled is not None
            flow = compiled if use_compiled else plain
            # t and d are tensors (values never guarded), every input keeps its shape across steps
            tt = torch.full((b,), t * sampler_cfg.time_scale, device=c.device)
            dd = None if d is None else d.expand(b) * sampler_cfg.time_scale
            keys = list(x)

            def call(tt: Tensor, *xs: Tensor) -> list[Tensor]:
                xb = {k: v.to(dtype) for k, v in zip(keys, xs)}
                with options.network_context(c.device, "ss"):
                    out = flow(xb, tt, c.to(dtype), dd, cond_kv=kv) if kv is not None else flow(xb, tt, c.to(dtype), dd)
                return [out[k].float() for k in keys]

            if options.cuda_graphs and not use_compiled:
                call = graphs.setdefault(id(c), GraphedCall(call, async_capture=options.async_graph_capture))
            return dict(zip(keys, call(tt, *(x[k] for k in keys))))

        def net_cond(x, t, active, is_uncond):
            if is_uncond:
                return run(x, t, uncond, kv_of("uncond", uncond, [True]))
            return run(x, t, cond, kv_of("cond", cond, [False]))

        batched = None
        if options.batch_cfg:
            both = torch.cat([cond, uncond], 0)

            def batched(x, t, active):
                xx = {k: torch.cat([v, v], 0) for k, v in x.items()}
                out = run(xx, t, both, kv_of("both", both, [False, True]))
                return {k: v[:1] for k, v in out.items()}, {k: v[1:] for k, v in out.items()}

        return guided(net_cond, sampler_cfg, batched)

    @torch.no_grad()
    def forward(self, inputs: PreparedInputs, *, generator: torch.Generator, policy: StepPolicy | None = None,
                events: EventBus | None = None, options: RunOptions | None = None,
                sampler: SamplerConfig | None = None, noise: dict[str, Tensor] | None = None) -> SSOutput:
        latents = self.sample_latents(inputs, generator=generator, policy=policy, events=events, options=options,
                                      sampler=sampler, noise=noise)
        return self.decode_structure(latents, inputs, generator, options)

    @torch.no_grad()
    def sample_latents(self, inputs: PreparedInputs, *, generator: torch.Generator, policy: StepPolicy | None = None,
                       events: EventBus | None = None, options: RunOptions | None = None,
                       sampler: SamplerConfig | None = None, noise: dict[str, Tensor] | None = None
                       ) -> dict[str, Tensor]:
        """The SS sampler alone (condition, noise, flow): the latents :meth:`decode_structure` turns into voxels. On
        the exact fast path it reads no device data on the host, so its GPU work can be queued behind other work
        (``fs3d_accel.stream``); the decoding synchronises."""
        options = options or RunOptions()
        sampler_cfg = sampler or self.cfg.ss_sampler
        device = next(self.flow.parameters()).device
        inp = inputs.to(device)
        with options.network_context(device, "ss"):
            cond = self.condition(**{k: v.to(options.compute_dtype(device)) for k, v in inp.ss_kwargs().items()})
        cond = cond.float()
        x0 = noise if noise is not None else ss_noise(self.cfg, generator)
        x0 = {k: v.to(device) for k, v in x0.items()}
        net = self.velocity_net(cond, sampler_cfg, options)
        return EulerFlowSampler(sampler_cfg, "ss").sample(x0, net, policy, events)

    @torch.no_grad()
    def decode_structure(self, latents: dict[str, Tensor], inputs: PreparedInputs, generator: torch.Generator | None,
                         options: RunOptions | None = None) -> SSOutput:
        """SS latents -> occupancy -> surface voxels, and the layout tokens -> metric pose."""
        options = options or RunOptions()
        r = self.cfg.ss_flow.resolution
        shape = latents["shape"]
        z = shape.permute(0, 2, 1).reshape(shape.shape[0], shape.shape[2], r, r, r)
        device = next(self.decoder.parameters()).device
        with options.network_context(device, "ss"):
            logits = self.decoder(z.to(device, options.compute_dtype(device)))[0, 0].float()
        occupied = logits > 0
        coords_all = torch.nonzero(occupied).to(torch.int32)
        coords_all = torch.cat([torch.zeros_like(coords_all[:, :1]), coords_all], 1)
        surf = surface_voxels(occupied)
        coords = torch.nonzero(surf).to(torch.int32)
        coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1)
        res = logits.shape[-1]
        coords, factor = downsample_coords(coords.cpu(), res, self.cfg.max_voxels, generator)
        layout = decode_layout(latents, inputs.pointmap_scale, inputs.pointmap_shift, factor)
        return SSOutput(latents=latents, occupancy_logits=logits, coords=coords.to(logits.device),
                        coords_original=coords_all, downsample_factor=factor, layout=layout, resolution=res)
